//! A one-waiter wake-up flag for tasks on one executor: the runtime's tasks and the admin
//! server's slots wait on one each.

use futures_lite::future::poll_fn;
use std::cell::{Cell, RefCell};
use std::task::{Poll, Waker};

/// A flag one task waits on and others raise. Single-threaded (one executor); a raise
/// with nobody waiting is kept for the next wait.
#[derive(Default)]
pub(crate) struct Notify {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    /// Raises the flag and wakes the waiter, if there is one.
    pub(crate) fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Resolves once the flag is raised, and lowers it. One waiter at a time.
    pub(crate) async fn wait(&self) {
        poll_fn(|cx| {
            if self.set.replace(false) {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}
