//! The worker's timer queue: one wake-up time per connection slot, in a binary heap.
//!
//! A connection asks to be woken at one time, the earliest of its engine's timer, its next
//! send, its next drop, a connect deadline or the end of a backoff; each call to
//! [`Timers::arm`] replaces the last. Replacing does not search the heap: an earlier time
//! pushes a new entry and leaves the old one stale, a later time only records what is
//! wanted. An entry is live iff it is the slot's `queued` entry; stale entries are skipped
//! when they come up, and a live entry that comes up before its slot's wanted time is pushed
//! again at that time instead of firing. So a time moved later never wakes the worker early.
//!
//! Invariant: for every slot with a wanted time, the heap holds its live entry, at or before
//! the wanted time. The heap stays under [`Timers::len_max`] entries: past it, it is rebuilt
//! from the live entries alone.
//!
//! Times are kept as nanoseconds since an epoch (`u64`), which compare in one instruction
//! where an `Instant` takes two: the heap is on the path of every message.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// Stale entries tolerated beyond two per slot before the heap is rebuilt. A connection
/// leaves at most one stale entry each time its wake-up moves earlier (a Deliver sets the
/// engine's DeliveryAck timer before the next send, say), and those are popped as their
/// times pass; the bound only caps a burst of them, so a rebuild (linear in the slots) is
/// rare.
const STALE_SLACK: usize = 4096;

/// Per slot: the time the slot wants and the time of its one live heap entry.
#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    wanted: Option<u64>,
    queued: Option<u64>,
}

/// Wake-up times by slot number (the connection's index in the worker's slab).
#[derive(Debug)]
pub struct Timers {
    epoch: Instant,
    heap: BinaryHeap<Reverse<(u64, u32)>>,
    slots: Vec<Slot>,
}

impl Timers {
    /// No slot armed; times are kept relative to `epoch` (earlier times count as it).
    pub fn new(epoch: Instant) -> Timers {
        Timers {
            epoch,
            heap: BinaryHeap::new(),
            slots: Vec::new(),
        }
    }

    fn key(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    fn instant(&self, key: u64) -> Instant {
        self.epoch + Duration::from_nanos(key)
    }

    /// Wake `slot` at `at` (replacing what it asked before), or never (`None`).
    pub fn arm(&mut self, slot: u32, at: Option<Instant>) {
        let at = at.map(|t| self.key(t));
        let i = slot as usize;
        if i >= self.slots.len() {
            self.slots.resize(i + 1, Slot::default());
        }
        let s = &mut self.slots[i];
        s.wanted = at;
        let Some(at) = at else {
            return;
        };
        if s.queued.is_none_or(|q| at < q) {
            s.queued = Some(at);
            self.heap.push(Reverse((at, slot)));
            if self.heap.len() > self.len_max() {
                self.rebuild();
            }
        }
    }

    /// The most entries the heap holds before it is rebuilt.
    pub fn len_max(&self) -> usize {
        2 * self.slots.len() + STALE_SLACK
    }

    /// Entries in the heap, stale ones included.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// The earliest wanted time of any slot. Drops the stale entries and re-queues the
    /// early ones on top of the heap, so the time returned is one some slot wants.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        self.next_key().map(|k| self.instant(k))
    }

    fn next_key(&mut self) -> Option<u64> {
        while let Some(&Reverse((at, slot))) = self.heap.peek() {
            let s = &mut self.slots[slot as usize];
            if s.queued != Some(at) {
                self.heap.pop();
                continue;
            }
            match s.wanted {
                Some(w) if w == at => return Some(at),
                Some(w) => {
                    debug_assert!(w > at, "a live entry is never later than wanted");
                    s.queued = Some(w);
                    self.heap.pop();
                    self.heap.push(Reverse((w, slot)));
                }
                None => {
                    s.queued = None;
                    self.heap.pop();
                }
            }
        }
        None
    }

    /// Moves every slot whose wanted time is at or before `now` into `due` (once each, in
    /// time order) and disarms it; the caller runs them and arms them again. Slots armed
    /// again at or before `now` while the caller runs them come up on the next call, so a
    /// slot that keeps asking for the past cannot hold the caller in one call.
    pub fn take_due(&mut self, now: Instant, due: &mut Vec<u32>) {
        let now = self.key(now);
        while let Some(at) = self.next_key() {
            if at > now {
                break;
            }
            let Some(Reverse((_, slot))) = self.heap.pop() else {
                break;
            };
            let s = &mut self.slots[slot as usize];
            s.queued = None;
            s.wanted = None;
            due.push(slot);
        }
    }

    fn rebuild(&mut self) {
        self.heap.clear();
        for (i, s) in self.slots.iter_mut().enumerate() {
            s.queued = s.wanted;
            if let Some(w) = s.wanted {
                self.heap.push(Reverse((w, i as u32)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn slots_come_due_in_time_order_once_each() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0);
        t.arm(2, Some(at(t0, 30)));
        t.arm(0, Some(at(t0, 10)));
        t.arm(1, Some(at(t0, 20)));
        assert_eq!(t.next_deadline(), Some(at(t0, 10)));
        let mut due = Vec::new();
        t.take_due(at(t0, 20), &mut due);
        assert_eq!(due, vec![0, 1]);
        due.clear();
        t.take_due(at(t0, 25), &mut due);
        assert!(due.is_empty());
        t.take_due(at(t0, 30), &mut due);
        assert_eq!(due, vec![2]);
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn a_time_moved_later_never_wakes_early_and_one_moved_earlier_does() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0);
        t.arm(0, Some(at(t0, 10)));
        t.arm(0, Some(at(t0, 50)));
        assert_eq!(t.next_deadline(), Some(at(t0, 50)), "not the stale 10 ms");
        t.arm(0, Some(at(t0, 5)));
        assert_eq!(t.next_deadline(), Some(at(t0, 5)));
        let mut due = Vec::new();
        t.take_due(at(t0, 100), &mut due);
        assert_eq!(due, vec![0], "one wake-up for three arms");
        t.arm(0, None);
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn a_slot_armed_in_the_past_while_due_waits_for_the_next_call() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0);
        t.arm(0, Some(at(t0, 1)));
        let mut due = Vec::new();
        t.take_due(at(t0, 10), &mut due);
        assert_eq!(due, vec![0]);
        t.arm(0, Some(at(t0, 2)));
        assert_eq!(t.next_deadline(), Some(at(t0, 2)));
    }

    proptest! {
        /// Whatever the arms, the heap stays bounded and the next deadline is the earliest
        /// wanted time.
        #[test]
        fn the_next_deadline_is_the_earliest_wanted(
            ops in proptest::collection::vec((0u32..8, proptest::option::of(0u64..1000)), 0..400)
        ) {
            let t0 = Instant::now();
            let mut t = Timers::new(t0);
            let mut wanted = [None; 8];
            for (slot, ms) in ops {
                let w = ms.map(|ms| at(t0, ms));
                t.arm(slot, w);
                wanted[slot as usize] = w;
                prop_assert!(t.len() <= t.len_max());
                prop_assert_eq!(t.next_deadline(), wanted.iter().flatten().min().copied());
            }
            let mut due = Vec::new();
            t.take_due(at(t0, 1000), &mut due);
            let mut expect: Vec<u32> = (0..8).filter(|&i| wanted[i as usize].is_some()).collect();
            due.sort_unstable();
            expect.sort_unstable();
            prop_assert_eq!(due, expect);
        }
    }
}
