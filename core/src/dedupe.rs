//! The dedupe window: which (sender, client_msg_id) pairs a shard has already sequenced.
//!
//! I2: a Send repeated inside the window gets the same (conv, seq) back and stores nothing
//! new. The window is bounded by entry count (oldest out first), so it is deterministic
//! and its memory is fixed; it is rebuilt from the log on recovery, so it survives
//! restarts. An entry is `Pending` while its record is not yet durable: a retry that
//! arrives then waits for the same durability point instead of being sequenced twice.

use crate::hash::{Map, SeededState};
use crate::proto::{ClientMsgId, ConvId, Seq, UserId};
use std::collections::VecDeque;

/// The dedupe key.
pub type DedupeKey = (UserId, ClientMsgId);

/// What the window knows of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sequenced {
    /// The conversation the message went to.
    pub conv: ConvId,
    /// Its seq there.
    pub seq: Seq,
    /// Whether its record is durable yet.
    pub durable: bool,
}

/// A bounded map from dedupe key to what is known of it: the seq it got (the owner's
/// window, `Window<Sequenced>`) or the conversation it names (the sender's home's
/// bindings, `Window<ConvId>`, which make a client_msg_id reused for another conversation
/// get one answer whichever shards own the two).
#[derive(Debug)]
pub struct Window<V = Sequenced> {
    capacity: usize,
    map: Map<DedupeKey, V>,
    order: VecDeque<DedupeKey>,
}

impl<V: Copy> Window<V> {
    /// A window remembering up to `capacity` keys, hashed with `hasher`.
    pub fn new(capacity: usize, hasher: SeededState) -> Window<V> {
        assert!(capacity > 0);
        Window {
            capacity,
            map: Map::with_hasher(hasher),
            order: VecDeque::new(),
        }
    }

    /// What `key` got, if it is in the window.
    pub fn get(&self, key: &DedupeKey) -> Option<V> {
        self.map.get(key).copied()
    }

    /// Remembers `key`; the oldest key leaves when the window is full. A key that is still
    /// pending is never evicted before it is durable: pending keys are at most the
    /// in-flight sends, far fewer than the capacity.
    pub fn insert(&mut self, key: DedupeKey, value: V) {
        if self.map.insert(key, value).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    /// Keys remembered.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Every key and value, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (DedupeKey, V)> + '_ {
        self.order
            .iter()
            .filter_map(|k| self.map.get(k).map(|v| (*k, *v)))
    }
}

impl Window<Sequenced> {
    /// Marks a pending key durable.
    pub fn mark_durable(&mut self, key: &DedupeKey) {
        if let Some(v) = self.map.get_mut(key) {
            v.durable = true;
        }
    }

    /// Forgets a pending key whose record failed to become durable.
    pub fn remove_pending(&mut self, key: &DedupeKey) {
        if self.map.get(key).is_some_and(|v| !v.durable) {
            self.map.remove(key);
            if let Some(pos) = self.order.iter().rposition(|k| k == key) {
                self.order.remove(pos);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> DedupeKey {
        (UserId(1), ClientMsgId([n; 16]))
    }

    fn at(seq: u64) -> Sequenced {
        Sequenced {
            conv: ConvId::group(1),
            seq: Seq(seq),
            durable: true,
        }
    }

    #[test]
    fn the_oldest_key_leaves_a_full_window() {
        let mut w: Window = Window::new(2, SeededState::default());
        w.insert(key(1), at(1));
        w.insert(key(2), at(2));
        w.insert(key(3), at(3));
        assert_eq!(w.get(&key(1)), None);
        assert_eq!(w.get(&key(3)), Some(at(3)));
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn a_failed_pending_key_is_forgotten_but_a_durable_one_is_not() {
        let mut w: Window = Window::new(4, SeededState::default());
        w.insert(
            key(1),
            Sequenced {
                durable: false,
                ..at(1)
            },
        );
        w.insert(key(2), at(2));
        w.remove_pending(&key(1));
        w.remove_pending(&key(2));
        assert_eq!(w.get(&key(1)), None);
        assert_eq!(w.get(&key(2)), Some(at(2)));
    }
}
