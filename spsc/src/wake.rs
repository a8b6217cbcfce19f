//! The consumer's wake-up: one [`Wake`] per consumer shard, shared (through an `Arc`) by the
//! producers of all its inbound queues.
//!
//! Owns: the `sleeping` flag, by which a consumer announces that it is about to block, and
//! the [`Signal`] that unblocks it. Invariant: **no lost wake-up**: a consumer never stays
//! blocked while an item pushed before a `notify` waits in one of its queues. And a busy
//! consumer costs its producers no syscall and no write to a shared cache line.
//!
//! # The protocol
//!
//! Producer, on any shard, for each consumer it pushed to:
//! 1. `push` one or more items (each a Release store of that queue's `tail`);
//! 2. `wake.notify()`: a SeqCst fence, then a load of `sleeping`; only if it is set, a swap
//!    clears it, and the one producer whose swap saw it set calls `signal()`.
//!
//! Consumer, on its own shard, each time it has run out of work:
//! 1. `wake.prepare_sleep()`: sets `sleeping`, then a SeqCst fence;
//! 2. re-checks **every** inbound queue (`is_empty`, an Acquire load of `tail`) and anything
//!    else that is not itself a level-triggered wake source (work it queued for itself);
//! 3. if anything is there: `wake.cancel_sleep()` and back to work, without blocking;
//! 4. otherwise blocks until the signal is raised. The signal must be level-triggered: one
//!    raised before the consumer blocks is not lost (an eventfd's counter stays readable, and a
//!    completed read waits in the completion queue);
//! 5. on waking, for whatever reason: `wake.cancel_sleep()`, and back to work (draining all
//!    its queues). A wake with nothing to do is harmless; it only costs a loop.
//!
//! # Why no wake-up is lost
//!
//! This is Dekker's pattern: each side writes its variable, then reads the other's. The
//! producer writes `tail` then reads `sleeping`; the consumer writes `sleeping` then reads
//! `tail`. The failure to exclude is both reads missing both writes: the producer sees
//! `sleeping == false` and does not signal, while the consumer sees the old `tail` and
//! blocks, with an item in its queue and no signal coming.
//!
//! The two SeqCst fences `F_p` (in `notify`) and `F_c` (in `prepare_sleep`) exclude it. All
//! SeqCst fences lie in one total order S, so one of the two comes first:
//! - `F_c` before `F_p`: the consumer's write of `true` is sequenced before `F_c` and the
//!   producer's load is sequenced after `F_p`, so the load sees that `true` or a later value
//!   (C++20 [atomics.order]: fence-to-fence). A later value is a swap by another producer,
//!   or the consumer's own `cancel_sleep` after it woke. The first swap after the `true` in
//!   the flag's modification order reads it and signals (an RMW reads the value just before
//!   it), so in every case a signal is raised after the consumer set the flag, and it wakes.
//! - `F_p` before `F_c`: symmetrically, the consumer's re-check of `tail` sees the push, so it
//!   cancels and does not block.
//!
//! A Release store of `tail` followed by a SeqCst load of `sleeping` is **not** enough: S
//! orders only SeqCst operations and fences, the `tail` store is not one, and nothing else
//! orders a store before a later load of another location. Hardware does it too: x86 lets a
//! load pass an earlier store still in the store buffer (a SeqCst load is a plain `mov`), so
//! the producer can read `false` before its `tail` is visible while the consumer, symmetrically,
//! reads the old `tail`. Making the tail store and both flag accesses SeqCst would also work,
//! at the price of a full barrier on every push (an `xchg` on x86) instead of one per `notify`.
//! `tests/loom.rs` proves the model checker catches the fence-less variant.
//!
//! # Every write to `sleeping` is a swap
//!
//! The consumer sets and clears the flag with swaps, where plain stores would satisfy the
//! argument above. With only RMWs writing it, the flag's writes form one chain even in
//! loom's approximation of the memory model: loom 0.7 does not keep another thread's plain
//! store out of the gap between an RMW's read and its write (tokio-rs/loom#254), and with
//! plain stores it reports a lost wake-up that C++ forbids (two producers: one's swap reads
//! the consumer's `false` from an earlier cancel, the consumer then stores `true`, and loom
//! lets the other producer, fenced after the consumer, still read the swap's `false`). The
//! consumer's swaps run only on its way into and out of sleep, next to a syscall, and each is
//! one `xchg` on x86, the same instruction a SeqCst store compiles to.
//!
//! Cost when the consumer is busy: one fence and one load of a line the consumer writes only
//! when it goes to sleep, so the line stays shared in every producer's cache. The swap, which
//! would take the line exclusive and bounce it between producers, runs only when the flag is
//! set. Batch: one `notify` per consumer per event-loop turn covers every push before it.
//!
//! Left to the gateway: the signal itself, and a full queue. This protocol wakes a consumer
//! when a queue becomes non-empty, not a producer when one becomes non-full.

use crate::sync::{fence, AtomicBool, Ordering};

/// How a producer unblocks a sleeping consumer. In the gateway: an 8-byte write to an eventfd
/// whose read is armed on the consumer's io_uring.
///
/// It must be level-triggered: a signal raised before the consumer blocks must still wake it.
pub trait Signal: Send + Sync {
    /// Raises the signal. Called by at most one producer per sleep of the consumer.
    fn signal(&self);
}

/// One consumer's wake-up, shared by the producers of all its inbound queues (via `Arc`).
/// See the module docs for the protocol each side must follow.
pub struct Wake<S: Signal> {
    /// Set by the consumer just before it may block; cleared by whoever wakes it.
    sleeping: AtomicBool,
    signal: S,
}

impl<S: Signal> Wake<S> {
    /// A wake-up for a consumer that starts awake.
    pub fn new(signal: S) -> Self {
        Self {
            sleeping: AtomicBool::new(false),
            signal,
        }
    }

    /// Producer side: call after pushing to any of this consumer's queues (once per batch is
    /// enough). Raises the signal only if the consumer announced it is about to sleep.
    pub fn notify(&self) {
        if self.claim() {
            self.signal.signal();
        }
    }

    /// Producer side, for a producer that wakes the consumer by its own means (the gateway's
    /// shards post a message to the sleeping shard's io_uring): `true` if the consumer
    /// announced it is about to sleep and this call took that announcement, in which case
    /// the caller must wake it, exactly as [`notify`](Self::notify) would signal.
    pub fn claim(&self) -> bool {
        // F_p: orders the Release stores of `tail` made by the pushes before this call ahead
        // of the load below (see "Why no wake-up is lost"). Without it, the load may be
        // satisfied before those stores are visible.
        fence(Ordering::SeqCst);
        // Relaxed: the fence gives the ordering, and the signal carries no data (the items
        // travel through the queues' own Release/Acquire). Load first so that a busy consumer
        // costs a read of a shared line, not an RMW; the swap elects one signaller.
        self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::Relaxed)
    }

    /// Consumer side: announce that it is about to sleep. It must then re-check every inbound
    /// queue, and either [`cancel_sleep`](Self::cancel_sleep) or block on the signal.
    pub fn prepare_sleep(&self) {
        // Relaxed: F_c below is what orders this write before the re-check's loads of `tail`.
        // A swap, not a store: see "Every write to `sleeping` is a swap".
        self.sleeping.swap(true, Ordering::Relaxed);
        // F_c: pairs with F_p in `notify` (see "Why no wake-up is lost").
        fence(Ordering::SeqCst);
    }

    /// Consumer side: it is awake again, because the re-check found work or because it woke.
    /// Producers stop signalling it. Clearing late is safe: it only costs a spurious signal.
    pub fn cancel_sleep(&self) {
        // A swap, not a store: see "Every write to `sleeping` is a swap".
        self.sleeping.swap(false, Ordering::Relaxed);
    }

    /// The signal, for the consumer to block on.
    pub fn signal(&self) -> &S {
        &self.signal
    }

    /// The wrong `notify` that tests/loom.rs must catch: no fence, so the load of `sleeping`
    /// may pass the pushes' Release stores of `tail`. Exists only in loom builds.
    #[cfg(loom)]
    #[doc(hidden)]
    pub fn notify_without_fence(&self) {
        if self.sleeping.load(Ordering::SeqCst) && self.sleeping.swap(false, Ordering::SeqCst) {
            self.signal.signal();
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::channel;
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Arc, Condvar, Mutex};
    use std::thread;
    use std::time::{Duration, Instant};

    /// Counts signals, to check when one is raised.
    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl Signal for Counter {
        fn signal(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    impl Counter {
        fn count(&self) -> usize {
            self.0.load(Ordering::Relaxed)
        }
    }

    #[test]
    fn notify_does_not_signal_a_busy_consumer() {
        let wake = Wake::new(Counter::default());
        wake.notify();
        wake.notify();
        assert_eq!(wake.signal().count(), 0);
    }

    #[test]
    fn notify_signals_a_consumer_about_to_sleep_once() {
        let wake = Wake::new(Counter::default());
        wake.prepare_sleep();
        wake.notify();
        wake.notify();
        assert_eq!(
            wake.signal().count(),
            1,
            "the first notify cleared the flag"
        );
    }

    #[test]
    fn cancel_sleep_stops_the_signal() {
        let wake = Wake::new(Counter::default());
        wake.prepare_sleep();
        wake.cancel_sleep();
        wake.notify();
        assert_eq!(wake.signal().count(), 0);
    }

    /// Bounds every test below in time: a lost wake-up fails the test instead of hanging it.
    const WAIT_MAX: Duration = Duration::from_secs(30);

    /// A level-triggered signal, as an eventfd: a counter that `read` waits on and resets.
    #[derive(Default)]
    struct EventFd {
        count: Mutex<u64>,
        readable: Condvar,
    }

    impl Signal for EventFd {
        fn signal(&self) {
            *self.count.lock().unwrap() += 1;
            self.readable.notify_one();
        }
    }

    impl EventFd {
        fn read(&self) -> u64 {
            let count = self.count.lock().unwrap();
            let (mut count, timeout) = self
                .readable
                .wait_timeout_while(count, WAIT_MAX, |c| *c == 0)
                .unwrap();
            assert!(!timeout.timed_out(), "lost wake-up: blocked {WAIT_MAX:?}");
            std::mem::take(&mut *count)
        }
    }

    /// Runs the protocol on real threads: the consumer really blocks whenever it is empty, so
    /// most pushes race with a consumer going to sleep.
    #[test]
    fn a_consumer_that_sleeps_when_empty_receives_every_item_in_order() {
        const ITEMS: u64 = 200_000;
        let wake = Arc::new(Wake::new(EventFd::default()));
        let (mut tx, mut rx) = channel(64);
        let producer_wake = Arc::clone(&wake);
        let producer = thread::spawn(move || {
            let deadline = Instant::now() + WAIT_MAX;
            for i in 0..ITEMS {
                let mut item = i;
                while let Err(back) = tx.push(item) {
                    item = back;
                    assert!(Instant::now() < deadline, "consumer stopped popping");
                    thread::yield_now();
                }
                // Every few items, as a shard notifies once per event-loop turn.
                if i % 4 == 3 || i == ITEMS - 1 {
                    producer_wake.notify();
                }
            }
        });
        let (mut next, mut sleeps) = (0, 0);
        while next < ITEMS {
            while let Some(item) = rx.pop() {
                assert_eq!(item, next);
                next += 1;
            }
            if next == ITEMS {
                break;
            }
            wake.prepare_sleep();
            if !rx.is_empty() {
                wake.cancel_sleep();
                continue;
            }
            wake.signal().read();
            wake.cancel_sleep();
            sleeps += 1;
        }
        producer.join().unwrap();
        assert!(
            sleeps > 0,
            "the consumer never slept: the test proved nothing"
        );
        // Shown with --nocapture.
        println!("the consumer slept {sleeps} times");
    }
}
