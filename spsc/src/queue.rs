//! A bounded, lock-free, single-producer single-consumer FIFO ring.
//!
//! Owns: the ring's slots and the two indices into it. `tail` (written only by the
//! [`Producer`]) counts items ever pushed; `head` (written only by the [`Consumer`]) counts
//! items ever popped. Both only grow, wrapping at `usize::MAX`.
//!
//! Invariants:
//! - `0 <= tail - head <= capacity` (wrapping subtraction), and exactly the slots
//!   `head..tail` (modulo capacity) hold an initialised item.
//! - A slot is written only by the producer while it is outside `head..tail`, and read only by
//!   the consumer while it is inside, so the two ends never touch the same slot at once.
//! - The producer publishes an item with a Release store of `tail` after writing its slot;
//!   the consumer Acquires `tail` before reading the slot. Symmetrically, the consumer Releases
//!   `head` after moving an item out and the producer Acquires `head` before reusing its slot.
//! - Each end keeps a cached copy of the other end's index and reloads it only when the
//!   cache says full (producer) or empty (consumer): the other side's cache line is read once
//!   per lap of the ring at most, not once per item. A stale cache is always conservative,
//!   since both indices only grow.
//! - Items still queued when both ends are gone are dropped exactly once, by the last end.
//!
//! Left to others: waking a sleeping consumer ([`crate::wake`]) and what to do with an item a
//! full queue hands back.

use std::mem::MaybeUninit;
use std::ops::Deref;

use crate::sync::{Arc, AtomicUsize, Ordering, UnsafeCell};

/// The largest capacity [`channel`] accepts. Every ring is allocated whole when it is made,
/// one per ordered pair of shards (n² of them): a queue between shards is backpressure, not
/// storage. 2^20 slots is far above any sane size and stops a misconfiguration (bytes passed
/// as slots) before it allocates gigabytes. It also keeps `capacity <= usize::MAX / 2`, which
/// wrapping indices need to tell a full ring from an empty one.
pub const CAPACITY_MAX: usize = 1 << 20;

/// Makes a queue of `capacity` slots and returns its two ends.
///
/// # Panics
/// If `capacity` is not a power of two or exceeds [`CAPACITY_MAX`]: both are configuration
/// errors. A power of two lets a slot be found with a mask instead of a division, and makes
/// indices that wrap at `usize::MAX` still land on the right slot (2^64 is a multiple of it).
pub fn channel<T>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    channel_from(capacity, 0)
}

/// [`channel`] with both indices starting at `start`, so that tests can cross the wrap of
/// `usize` in a few pushes.
pub(crate) fn channel_from<T>(capacity: usize, start: usize) -> (Producer<T>, Consumer<T>) {
    assert!(
        capacity.is_power_of_two() && capacity <= CAPACITY_MAX,
        "spsc capacity must be a power of two in 1..={CAPACITY_MAX}, got {capacity}"
    );
    let queue = Arc::new(Queue {
        slots: (0..capacity)
            .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
            .collect(),
        mask: capacity - 1,
        head: CachePadded(AtomicUsize::new(start)),
        tail: CachePadded(AtomicUsize::new(start)),
    });
    let producer = Producer {
        queue: Arc::clone(&queue),
        tail: start,
        head_cached: start,
    };
    let consumer = Consumer {
        queue,
        head: start,
        tail_cached: start,
    };
    (producer, consumer)
}

/// The ring shared by the two ends.
struct Queue<T> {
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
    /// `capacity - 1`: `index & mask` is the slot of an index.
    mask: usize,
    /// Items ever popped. Written only by the consumer.
    head: CachePadded<AtomicUsize>,
    /// Items ever pushed. Written only by the producer.
    tail: CachePadded<AtomicUsize>,
}

impl<T> Queue<T> {
    fn capacity(&self) -> usize {
        self.mask + 1
    }
}

// `Send` needs no impl: every field is `Send` when `T` is.
// SAFETY: the queue hands each `T` from the producer's thread to the consumer's, hence
// `T: Send`. Shared access from the two threads is sound because a slot is only ever touched
// by the one end that the indices give it to (see the module invariants), and the indices
// themselves are atomics.
unsafe impl<T: Send> Sync for Queue<T> {}

impl<T> Drop for Queue<T> {
    fn drop(&mut self) {
        // `&mut self`: both ends are gone, and the `Arc` that held them ordered their last
        // index stores before this point, so relaxed loads see the final values.
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::Relaxed);
        let mut index = head;
        while index != tail {
            self.slots[index & self.mask].with_mut(|slot| {
                // SAFETY: `head..tail` are exactly the initialised slots, each dropped once
                // here because `index` visits each slot of that range once; nothing else can
                // reach them since we hold the only reference.
                unsafe { (*slot).assume_init_drop() }
            });
            index = index.wrapping_add(1);
        }
    }
}

/// The sending end of a queue: only one exists, and it is `Send` but not `Clone`.
///
/// ```compile_fail,E0599
/// let (tx, _rx) = imgate_spsc::channel::<u32>(2);
/// let _second = tx.clone(); // one producer per queue, by construction
/// ```
pub struct Producer<T> {
    queue: Arc<Queue<T>>,
    /// This end's copy of `queue.tail`, which only it writes.
    tail: usize,
    /// The consumer's `head` as last loaded; `<=` the real one.
    head_cached: usize,
}

impl<T> Producer<T> {
    /// Appends `value`, or hands it back in `Err` if the queue is full: the caller keeps it
    /// and retries later. Never blocks. Call [`crate::Wake::notify`] after a batch of pushes.
    pub fn push(&mut self, value: T) -> Result<(), T> {
        let queue = &*self.queue;
        if self.tail.wrapping_sub(self.head_cached) == queue.capacity() {
            // Full by the cache, which may be stale. Acquire pairs with the consumer's
            // Release of `head`, so its read of the freed slot happens before our write.
            self.head_cached = queue.head.load(Ordering::Acquire);
            if self.tail.wrapping_sub(self.head_cached) == queue.capacity() {
                return Err(value);
            }
        }
        queue.slots[self.tail & queue.mask].with_mut(|slot| {
            // SAFETY: `tail - head < capacity`, so this slot is outside `head..tail`: the
            // consumer does not read it until we publish `tail + 1` below, and it is
            // uninitialised (never written, or moved out by the consumer before it released
            // `head`), so overwriting it leaks nothing.
            unsafe { (*slot).write(value) };
        });
        self.tail = self.tail.wrapping_add(1);
        // Release: the slot write above happens before any consumer Acquire that sees this.
        queue.tail.store(self.tail, Ordering::Release);
        Ok(())
    }

    /// True when a push would fail now. Only the consumer can make it false.
    pub fn is_full(&self) -> bool {
        let head = self.queue.head.load(Ordering::Acquire);
        self.tail.wrapping_sub(head) == self.queue.capacity()
    }

    /// The number of slots, fixed at construction.
    pub fn capacity(&self) -> usize {
        self.queue.capacity()
    }
}

/// The receiving end of a queue: only one exists, and it is `Send` but not `Clone`. Either end
/// is `Send` only if its items are:
///
/// ```compile_fail,E0277
/// fn is_send<T: Send>() {}
/// is_send::<imgate_spsc::Consumer<std::rc::Rc<u8>>>(); // an `Rc` must not change threads
/// ```
pub struct Consumer<T> {
    queue: Arc<Queue<T>>,
    /// This end's copy of `queue.head`, which only it writes.
    head: usize,
    /// The producer's `tail` as last loaded; `<=` the real one.
    tail_cached: usize,
}

impl<T> Consumer<T> {
    /// Removes and returns the oldest item, or `None` if the queue is empty. Never blocks.
    pub fn pop(&mut self) -> Option<T> {
        let queue = &*self.queue;
        if self.head == self.tail_cached {
            // Empty by the cache. Acquire pairs with the producer's Release of `tail`, so
            // its write of the slot happens before our read.
            self.tail_cached = queue.tail.load(Ordering::Acquire);
            if self.head == self.tail_cached {
                return None;
            }
        }
        let value = queue.slots[self.head & queue.mask].with_mut(|slot| {
            // SAFETY: `head < tail` as Acquired above, so this slot was initialised by the
            // producer and published before we read it; the producer will not write it again
            // until we release `head + 1` below, and advancing `head` marks it uninitialised
            // so the value is moved out exactly once.
            unsafe { (*slot).assume_init_read() }
        });
        self.head = self.head.wrapping_add(1);
        // Release: our read of the slot happens before the producer reuses it.
        queue.head.store(self.head, Ordering::Release);
        Some(value)
    }

    /// True when a pop would return `None` now. Only the producer can make it false. This is
    /// the re-check a consumer makes after [`crate::Wake::prepare_sleep`].
    pub fn is_empty(&self) -> bool {
        // Acquire so that a true "not empty" also makes the item readable by the next pop.
        self.head == self.queue.tail.load(Ordering::Acquire)
    }

    /// The number of slots, fixed at construction.
    pub fn capacity(&self) -> usize {
        self.queue.capacity()
    }
}

/// Keeps `head` and `tail` on different cache lines, so the producer's stores to one do not
/// evict the consumer's copy of the other (false sharing). 128 bytes, not 64: x86 prefetches
/// lines in adjacent pairs, and some ARM cores have 128-byte lines.
#[repr(align(128))]
struct CachePadded<T>(T);

impl<T> Deref for CachePadded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::Cell;
    use std::collections::VecDeque;
    use std::rc::Rc;

    /// Counts its drops in a shared cell, to prove each item is dropped exactly once.
    struct Counted(Rc<Cell<usize>>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }

    fn is_send<T: Send>() {}

    #[test]
    fn both_ends_are_send() {
        is_send::<Producer<Vec<u8>>>();
        is_send::<Consumer<Vec<u8>>>();
    }

    #[test]
    fn items_come_out_in_the_order_they_went_in() {
        let (mut tx, mut rx) = channel(4);
        for i in 0..3 {
            tx.push(i).unwrap();
        }
        assert_eq!(rx.pop(), Some(0));
        tx.push(3).unwrap();
        tx.push(4).unwrap();
        assert_eq!(
            (1..5).map(|_| rx.pop().unwrap()).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(rx.pop(), None);
    }

    #[test]
    fn a_full_queue_hands_the_item_back_until_a_pop_frees_a_slot() {
        let (mut tx, mut rx) = channel(2);
        assert!(!tx.is_full());
        tx.push('a').unwrap();
        tx.push('b').unwrap();
        assert!(tx.is_full());
        assert_eq!(tx.push('c'), Err('c'));
        assert_eq!(rx.pop(), Some('a'));
        assert!(!tx.is_full());
        tx.push('c').unwrap();
        assert_eq!(rx.pop(), Some('b'));
        assert_eq!(rx.pop(), Some('c'));
        assert!(rx.is_empty());
    }

    #[test]
    fn capacity_one_alternates_push_and_pop() {
        let (mut tx, mut rx) = channel(1);
        for i in 0..10 {
            tx.push(i).unwrap();
            assert_eq!(tx.push(99), Err(99));
            assert!(!rx.is_empty());
            assert_eq!(rx.pop(), Some(i));
            assert!(rx.is_empty());
        }
    }

    #[test]
    fn indices_wrap_around_usize_without_losing_order() {
        let (mut tx, mut rx) = channel_from(4, usize::MAX - 5);
        for i in 0..40 {
            tx.push(i).unwrap();
            tx.push(i + 1000).unwrap();
            assert_eq!(rx.pop(), Some(i));
            assert_eq!(rx.pop(), Some(i + 1000));
        }
        assert!(rx.is_empty());
    }

    #[test]
    #[should_panic(expected = "power of two")]
    fn a_capacity_that_is_not_a_power_of_two_is_refused() {
        let _ = channel::<u8>(3);
    }

    #[test]
    #[should_panic(expected = "power of two")]
    fn a_zero_capacity_is_refused() {
        let _ = channel::<u8>(0);
    }

    #[test]
    #[should_panic(expected = "power of two")]
    fn a_capacity_over_the_limit_is_refused() {
        let _ = channel::<u8>(CAPACITY_MAX * 2);
    }

    #[test]
    fn items_left_in_the_queue_are_dropped_once_when_both_ends_are_gone() {
        for consumer_first in [false, true] {
            let drops = Rc::new(Cell::new(0));
            let (mut tx, mut rx) = channel_from(4, usize::MAX - 1);
            let push = |tx: &mut Producer<Counted>| tx.push(Counted(Rc::clone(&drops)));
            for _ in 0..4 {
                assert!(push(&mut tx).is_ok());
            }
            drop(rx.pop().unwrap());
            drop(rx.pop().unwrap());
            for _ in 0..2 {
                assert!(push(&mut tx).is_ok());
            }
            // 6 pushed, 2 popped and dropped, 4 still queued across the wrap of usize.
            assert_eq!(drops.get(), 2);
            let rejected = tx.push(Counted(Rc::clone(&drops))).unwrap_err();
            drop(rejected);
            assert_eq!(drops.get(), 3);
            if consumer_first {
                drop(rx);
                assert_eq!(drops.get(), 3, "the producer still holds the ring");
                drop(tx);
            } else {
                drop(tx);
                drop(rx.pop().unwrap());
                assert_eq!(drops.get(), 4);
                drop(rx);
            }
            assert_eq!(drops.get(), 7);
        }
    }

    /// A million items through a small ring between two real threads, each spinning (with
    /// `yield_now`) when the ring is full or empty: FIFO and nothing lost under contention.
    #[test]
    fn a_million_items_cross_threads_in_order() {
        const ITEMS: u64 = 1_000_000;
        // Bounds the test in time: a stuck end fails it instead of hanging it.
        const RUN_MAX: std::time::Duration = std::time::Duration::from_secs(60);
        let (mut tx, mut rx) = channel(64);
        let deadline = std::time::Instant::now() + RUN_MAX;
        let producer = std::thread::spawn(move || {
            let mut full = 0u64;
            for i in 0..ITEMS {
                let mut item = i;
                while let Err(back) = tx.push(item) {
                    item = back;
                    full += 1;
                    assert!(std::time::Instant::now() < deadline, "consumer stuck");
                    std::thread::yield_now();
                }
            }
            full
        });
        let mut next = 0;
        while next < ITEMS {
            match rx.pop() {
                Some(item) => {
                    assert_eq!(item, next, "out of order or lost");
                    next += 1;
                }
                None => {
                    assert!(std::time::Instant::now() < deadline, "producer stuck");
                    std::thread::yield_now();
                }
            }
        }
        let full = producer.join().unwrap();
        assert_eq!(rx.pop(), None, "more items came out than went in");
        // Not asserted (it depends on scheduling), but shown with --nocapture.
        println!("producer found the ring full {full} times");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u32),
        Pop,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![any::<u32>().prop_map(Op::Push), Just(Op::Pop)]
    }

    proptest! {
        #[test]
        fn behaves_like_a_bounded_vecdeque(
            capacity_log2 in 0u32..4,
            start in prop_oneof![Just(0usize), Just(usize::MAX - 7), any::<usize>()],
            ops in proptest::collection::vec(op(), 0..200),
        ) {
            let capacity = 1usize << capacity_log2;
            let (mut tx, mut rx) = channel_from(capacity, start);
            let mut model = VecDeque::new();
            for op in ops {
                match op {
                    Op::Push(v) => {
                        let got = tx.push(v);
                        if model.len() == capacity {
                            prop_assert_eq!(got, Err(v));
                        } else {
                            prop_assert_eq!(got, Ok(()));
                            model.push_back(v);
                        }
                    }
                    Op::Pop => prop_assert_eq!(rx.pop(), model.pop_front()),
                }
                prop_assert_eq!(rx.is_empty(), model.is_empty());
                prop_assert_eq!(tx.is_full(), model.len() == capacity);
            }
        }
    }
}
