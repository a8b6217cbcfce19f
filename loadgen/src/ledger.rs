//! The correctness ledger: which messages each sender got acked and each receiver was shown,
//! and what that says about loss, duplication and order.
//!
//! Every message loadgen sends carries its sender and a per-sender number (1, 2, 3, ...) in
//! its payload, so a receiver can tell, without asking anyone, whether a message is new,
//! a repeat, or late. The client engine already hides repeats of one (conv, seq) and
//! orders by seq; what the ledger catches is what the engine cannot: the gateway giving one
//! message two seqs (a duplicate, I2), sequencing a sender's messages out of send order (I8),
//! or never delivering an acked message (I1, I4).
//!
//! Invariants: `Track` holds a sender's numbers as "everything up to `contiguous`" plus the
//! few above it, so it stays small while messages arrive in order; a number is counted at
//! most once per receiver.

use std::collections::{BTreeSet, HashMap};

/// A set of message numbers (1, 2, 3, ...), compact while they come in order.
#[derive(Debug, Default, Clone)]
pub struct Track {
    /// Every number in 1..=contiguous is in the set.
    contiguous: u32,
    /// Numbers above `contiguous + 1` that are in the set.
    ahead: BTreeSet<u32>,
    /// The largest number in the set.
    max: u32,
}

/// How a number relates to a [`Track`] it was added to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// New, and larger than every number before it.
    InOrder,
    /// New, but a larger number was already there.
    Late,
    /// Already there.
    Repeat,
}

impl Track {
    /// Adds `n` (from 1) and says how it relates to what was there.
    pub fn insert(&mut self, n: u32) -> Seen {
        if n == 0 || self.contains(n) {
            return Seen::Repeat;
        }
        let late = n < self.max;
        self.max = self.max.max(n);
        if n == self.contiguous + 1 {
            self.contiguous = n;
            while self.ahead.remove(&(self.contiguous + 1)) {
                self.contiguous += 1;
            }
        } else {
            self.ahead.insert(n);
        }
        if late {
            Seen::Late
        } else {
            Seen::InOrder
        }
    }

    /// Whether `n` is in the set.
    pub fn contains(&self, n: u32) -> bool {
        (n != 0 && n <= self.contiguous) || self.ahead.contains(&n)
    }

    /// How many numbers of `self` are missing from `other`.
    pub fn missing_from(&self, other: &Track) -> u64 {
        if self.max <= other.contiguous {
            return 0;
        }
        (1..=self.max)
            .filter(|&n| self.contains(n) && !other.contains(n))
            .count() as u64
    }

    /// How many numbers the set holds.
    pub fn len(&self) -> u64 {
        u64::from(self.contiguous) + self.ahead.len() as u64
    }
}

/// The verdict of a ledger.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Verdict {
    /// Acked messages some member never received.
    pub lost: u64,
    /// Messages a receiver was shown twice (under two seqs: the engine drops same-seq
    /// repeats itself).
    pub duplicated: u64,
    /// Messages shown after a later message of the same sender in the same conversation.
    pub reordered: u64,
    /// Messages still unacked when the run ended (neither acked nor finally refused).
    pub unresolved: u64,
}

/// Acks per sender and receptions per (receiver, sender), for one worker's connections.
///
/// Senders and receivers are connection indexes; `expect` says which receivers must get
/// a sender's messages (every other member of its conversation).
#[derive(Debug, Default)]
pub struct Ledger {
    acked: HashMap<u32, Track>,
    received: HashMap<(u32, u32), Track>,
    duplicated: u64,
    reordered: u64,
}

impl Ledger {
    /// `sender`'s message `n` was acked.
    pub fn acked(&mut self, sender: u32, n: u32) {
        self.acked.entry(sender).or_default().insert(n);
    }

    /// `receiver` was shown `sender`'s message `n`.
    pub fn received(&mut self, receiver: u32, sender: u32, n: u32) -> Seen {
        let seen = self
            .received
            .entry((receiver, sender))
            .or_default()
            .insert(n);
        match seen {
            Seen::Repeat => self.duplicated += 1,
            Seen::Late => self.reordered += 1,
            Seen::InOrder => {}
        }
        seen
    }

    /// Acked messages of `sender` that `receiver` has not been shown.
    pub fn missing(&self, sender: u32, receiver: u32) -> u64 {
        let Some(acked) = self.acked.get(&sender) else {
            return 0;
        };
        match self.received.get(&(receiver, sender)) {
            Some(got) => acked.missing_from(got),
            None => acked.len(),
        }
    }

    /// The verdict, given each sender's receivers and the count of unresolved sends.
    pub fn verdict<'a>(
        &self,
        expectations: impl IntoIterator<Item = (u32, &'a [u32])>,
        unresolved: u64,
    ) -> Verdict {
        let lost = expectations
            .into_iter()
            .map(|(sender, receivers)| {
                receivers
                    .iter()
                    .filter(|&&r| r != sender)
                    .map(|&r| self.missing(sender, r))
                    .sum::<u64>()
            })
            .sum();
        Verdict {
            lost,
            duplicated: self.duplicated,
            reordered: self.reordered,
            unresolved,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_track_classifies_in_order_late_and_repeated_numbers() {
        let mut t = Track::default();
        assert_eq!(t.insert(1), Seen::InOrder);
        assert_eq!(t.insert(3), Seen::InOrder);
        assert_eq!(t.insert(2), Seen::Late);
        assert_eq!(t.insert(2), Seen::Repeat);
        assert_eq!(t.insert(0), Seen::Repeat);
        assert_eq!(t.len(), 3);
        assert!(t.ahead.is_empty(), "3 joined the contiguous prefix");
    }

    #[test]
    fn the_ledger_counts_loss_duplication_and_reordering() {
        let mut l = Ledger::default();
        for n in 1..=5 {
            l.acked(1, n);
        }
        // Receiver 2 gets 1, 3, 2 (late), 3 again (repeat); never 4 or 5.
        for n in [1, 3, 2, 3] {
            l.received(2, 1, n);
        }
        // Receiver 3 gets everything.
        for n in 1..=5 {
            l.received(3, 1, n);
        }
        let members = [1u32, 2, 3];
        let v = l.verdict([(1u32, &members[..])], 0);
        assert_eq!(
            v,
            Verdict {
                lost: 2,
                duplicated: 1,
                reordered: 1,
                unresolved: 0
            }
        );
    }

    #[test]
    fn a_receiver_that_got_nothing_lost_every_acked_message() {
        let mut l = Ledger::default();
        l.acked(7, 1);
        l.acked(7, 2);
        let members = [7u32, 8];
        assert_eq!(l.verdict([(7u32, &members[..])], 3).lost, 2);
        // An unacked message received is not "lost" for the sender that was never acked.
        l.received(8, 9, 1);
        let members = [9u32, 8];
        assert_eq!(l.verdict([(9u32, &members[..])], 0).lost, 0);
    }

    proptest! {
        /// Track agrees with a plain set, whatever the order of insertion.
        #[test]
        fn track_matches_a_set(ns in proptest::collection::vec(1u32..64, 0..200)) {
            let mut t = Track::default();
            let mut set = BTreeSet::new();
            let mut max = 0;
            for n in ns {
                let expected = if set.contains(&n) {
                    Seen::Repeat
                } else if n < max {
                    Seen::Late
                } else {
                    Seen::InOrder
                };
                prop_assert_eq!(t.insert(n), expected);
                set.insert(n);
                max = max.max(n);
            }
            prop_assert_eq!(t.len(), set.len() as u64);
            for n in 0..70 {
                prop_assert_eq!(t.contains(n), set.contains(&n));
            }
        }
    }
}
