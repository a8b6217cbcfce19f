//! The synchronisation primitives the crate is built on: std's normally, loom's under
//! `--cfg loom`, so that the model checker sees every atomic access, fence and cell access the
//! shipped code makes. The code above this module is the same in both builds.

#[cfg(loom)]
pub(crate) use loom::{
    cell::UnsafeCell,
    sync::{
        atomic::{fence, AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
};
#[cfg(not(loom))]
pub(crate) use std::sync::{
    atomic::{fence, AtomicBool, AtomicUsize, Ordering},
    Arc,
};

/// std's `UnsafeCell` behind loom's closure-based API, which is what lets loom check each
/// access for a data race.
#[cfg(not(loom))]
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        Self(std::cell::UnsafeCell::new(value))
    }

    /// Hands `f` a raw pointer to the value; the caller's protocol must make the access
    /// exclusive (loom checks that it does).
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}
