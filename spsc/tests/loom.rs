//! Model checks of the queue and of the wake-up protocol. Run with:
//! `RUSTFLAGS="--cfg loom" cargo test -p imgate-spsc --release --test loom`.
//!
//! loom runs each model under every interleaving of its threads (up to `PREEMPTIONS_MAX`
//! preemptions), lets each load return any value the memory model allows, checks every
//! `UnsafeCell` access for a data race, and fails with "deadlock" when all threads block: a
//! lost wake-up is exactly that. The last two models plant a bug and must fail, which proves
//! the others can.
#![cfg(loom)]

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use imgate_spsc::{channel, Consumer, Producer, Signal, Wake};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

/// Preemptions loom explores per execution. Most concurrency bugs need two or three; three
/// keeps every model here under a few seconds in release.
const PREEMPTIONS_MAX: usize = 3;

fn check(model: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(PREEMPTIONS_MAX);
    builder.check(model);
}

/// A level-triggered signal, modelled on the gateway's eventfd: `signal` adds to a counter,
/// `read` blocks while it is zero and then takes it. A signal raised before `read` is kept.
struct EventFd {
    count: Mutex<u64>,
    readable: Condvar,
}

impl EventFd {
    fn new() -> Self {
        Self {
            count: Mutex::new(0),
            readable: Condvar::new(),
        }
    }

    fn read(&self) -> u64 {
        let mut count = self.count.lock().unwrap();
        while *count == 0 {
            count = self.readable.wait(count).unwrap();
        }
        std::mem::take(&mut *count)
    }
}

impl Signal for EventFd {
    fn signal(&self) {
        *self.count.lock().unwrap() += 1;
        self.readable.notify_one();
    }
}

/// Which protocol the model runs: the shipped one, or one with a planted bug.
#[derive(Clone, Copy)]
enum Variant {
    Correct,
    /// The producer's `notify` has no fence between the push and the load of `sleeping`.
    NotifyWithoutFence,
    /// The consumer blocks right after `prepare_sleep`, without re-checking its queues.
    SleepWithoutRecheck,
}

/// Pushes `items` in order, retrying a full queue, and notifies after each push.
fn produce(mut tx: Producer<u32>, wake: &Wake<EventFd>, items: Range<u32>, variant: Variant) {
    for item in items {
        let mut item = item;
        while let Err(back) = tx.push(item) {
            item = back;
            thread::yield_now();
        }
        match variant {
            Variant::NotifyWithoutFence => wake.notify_without_fence(),
            Variant::Correct | Variant::SleepWithoutRecheck => wake.notify(),
        }
    }
}

/// The consumer's event loop from the protocol in `imgate_spsc::wake`: drain every queue;
/// when all are empty, prepare to sleep, re-check, and only then block on the signal. Returns
/// what each queue delivered once each has delivered `per_queue` items.
fn consume(
    rxs: &mut [Consumer<u32>],
    wake: &Wake<EventFd>,
    per_queue: usize,
    variant: Variant,
) -> Vec<Vec<u32>> {
    let mut got = vec![Vec::new(); rxs.len()];
    loop {
        for (rx, got) in rxs.iter_mut().zip(&mut got) {
            while let Some(item) = rx.pop() {
                got.push(item);
            }
        }
        if got.iter().all(|g| g.len() == per_queue) {
            return got;
        }
        wake.prepare_sleep();
        let recheck = !matches!(variant, Variant::SleepWithoutRecheck);
        if recheck && rxs.iter().any(|rx| !rx.is_empty()) {
            wake.cancel_sleep();
            continue;
        }
        wake.signal().read();
        wake.cancel_sleep();
    }
}

/// Holds loom objects on a model's main thread. loom aborts the whole test process if one of
/// its objects is dropped while a thread unwinds from a failure loom found (a deadlock, a
/// race), which would hide the report; so while unwinding this leaks its contents (the
/// execution is over anyway), and on the normal path it drops them as usual.
struct ForgetOnPanic<T>(Option<T>);

impl<T> Drop for ForgetOnPanic<T> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            std::mem::forget(self.0.take());
        }
    }
}

/// (a) Three items through a ring of two: the producer meets a full ring and retries, the
/// consumer meets an empty one and retries; every interleaving keeps order and loses nothing,
/// and no slot is read and written at once (loom's race check on the cells).
#[test]
fn fifo_and_bounded_through_a_ring_of_two() {
    check(|| {
        let (mut tx, rx) = channel::<u32>(2);
        let producer = thread::spawn(move || {
            for item in 0..3 {
                let mut item = item;
                while let Err(back) = tx.push(item) {
                    item = back;
                    thread::yield_now();
                }
            }
        });
        let mut consumer = ForgetOnPanic(Some(rx));
        let rx = consumer.0.as_mut().unwrap();
        let mut got = Vec::new();
        while got.len() < 3 {
            match rx.pop() {
                Some(item) => got.push(item),
                None => thread::yield_now(),
            }
        }
        producer.join().unwrap();
        assert_eq!(got, [0, 1, 2]);
        assert_eq!(rx.pop(), None);
    });
}

/// Counts drops in a std atomic: read only after loom has joined every thread.
static DROPS: AtomicUsize = AtomicUsize::new(0);

struct Counted;

impl Drop for Counted {
    fn drop(&mut self) {
        DROPS.fetch_add(1, Ordering::Relaxed);
    }
}

/// Items still queued are dropped exactly once by whichever end goes last, on its thread,
/// with no race against the other end's last access.
#[test]
fn leftover_items_are_dropped_once_by_the_last_end() {
    check(|| {
        DROPS.store(0, Ordering::Relaxed);
        let (mut tx, mut rx) = channel::<Counted>(2);
        let producer = thread::spawn(move || {
            assert!(tx.push(Counted).is_ok());
            assert!(tx.push(Counted).is_ok());
        });
        drop(rx.pop());
        drop(rx);
        producer.join().unwrap();
        assert_eq!(DROPS.load(Ordering::Relaxed), 2);
    });
}

/// (b) With `variant`, one producer pushes `items` to a consumer that sleeps whenever its
/// queue is empty. Passes only if the consumer always gets every item in order.
fn one_producer_one_consumer(items: u32, variant: Variant) {
    check(move || {
        let wake = Arc::new(Wake::new(EventFd::new()));
        let (tx, rx) = channel::<u32>(2);
        let producer_wake = Arc::clone(&wake);
        let producer = thread::spawn(move || produce(tx, &producer_wake, 0..items, variant));
        let mut consumer = ForgetOnPanic(Some((wake, [rx])));
        let (wake, rxs) = consumer.0.as_mut().unwrap();
        let got = consume(rxs, wake, items as usize, variant);
        producer.join().unwrap();
        assert_eq!(got, [(0..items).collect::<Vec<_>>()]);
    });
}

/// (b) No lost wake-up: the consumer may sleep before, between or after the pushes, and is
/// always woken for every item.
#[test]
fn a_sleeping_consumer_is_woken_for_every_push() {
    one_producer_one_consumer(2, Variant::Correct);
}

/// (c) The shard case: two producers, each with its own queue, share the consumer's one
/// `Wake`. Whichever order they push and notify in, the consumer gets both queues' items.
#[test]
fn two_producers_share_one_consumer_wake() {
    check(|| {
        let wake = Arc::new(Wake::new(EventFd::new()));
        let (tx_a, rx_a) = channel::<u32>(2);
        let (tx_b, rx_b) = channel::<u32>(2);
        let producers: Vec<_> = [(tx_a, 0..1), (tx_b, 10..11)]
            .into_iter()
            .map(|(tx, items)| {
                let wake = Arc::clone(&wake);
                thread::spawn(move || produce(tx, &wake, items, Variant::Correct))
            })
            .collect();
        let mut consumer = ForgetOnPanic(Some((wake, [rx_a, rx_b])));
        let (wake, rxs) = consumer.0.as_mut().unwrap();
        let got = consume(rxs, wake, 1, Variant::Correct);
        for producer in producers {
            producer.join().unwrap();
        }
        assert_eq!(got, [vec![0], vec![10]]);
    });
}

/// The planted ordering bug must be caught: without the fence in `notify`, the producer can
/// read `sleeping == false` while the consumer reads the old `tail`, and it sleeps forever.
#[test]
#[should_panic(expected = "deadlock")]
fn the_model_catches_a_notify_without_a_fence() {
    one_producer_one_consumer(1, Variant::NotifyWithoutFence);
}

/// The planted protocol bug must be caught: a consumer that blocks without re-checking misses
/// a push made between its last pop and its `prepare_sleep`.
#[test]
#[should_panic(expected = "deadlock")]
fn the_model_catches_a_consumer_that_skips_the_recheck() {
    one_producer_one_consumer(1, Variant::SleepWithoutRecheck);
}
