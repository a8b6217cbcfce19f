//! A coarse timer wheel for per-connection deadlines (auth, heartbeat, slow consumer).
//!
//! Deadlines are grouped into ticks; a connection sits in at most one live bucket, and a
//! deadline that moves later is not re-filed until its old bucket fires (lazy re-arming).
//! So an idle connection costs one small entry and no work between its deadlines, and the
//! wheel costs one `Vec` per occupied tick, not a timer per connection.
//!
//! Entries are `(key, tick)` pairs; an entry is stale when the owner's current tick for
//! that key is different. The owner (the shard) keeps the current tick per connection and
//! skips stale entries when a bucket fires.

use crate::time::Instant;
use std::collections::BTreeMap;

/// Tick length. 100 ms: deadlines of seconds need no finer grain.
pub const TICK_MS: u64 = 100;

/// The tick a deadline is filed under: the first tick at or after it.
pub fn tick_of(deadline: Instant) -> u64 {
    deadline.as_millis().div_ceil(TICK_MS)
}

/// Buckets of keys by tick.
#[derive(Debug)]
pub struct Wheel<K> {
    buckets: BTreeMap<u64, Vec<K>>,
}

impl<K> Default for Wheel<K> {
    fn default() -> Self {
        Wheel {
            buckets: BTreeMap::new(),
        }
    }
}

impl<K> Wheel<K> {
    /// Files `key` under `tick`.
    pub fn insert(&mut self, tick: u64, key: K) {
        self.buckets.entry(tick).or_default().push(key);
    }

    /// The earliest instant at which a bucket is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.buckets
            .keys()
            .next()
            .map(|t| Instant::from_millis(t * TICK_MS))
    }

    /// Takes the earliest bucket if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(u64, Vec<K>)> {
        let (&tick, _) = self.buckets.first_key_value()?;
        if tick * TICK_MS > now.as_millis() {
            return None;
        }
        self.buckets.pop_first()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_fires_at_its_tick_and_not_before() {
        let mut w = Wheel::default();
        w.insert(tick_of(Instant(1_050)), 'a');
        assert_eq!(w.next_deadline(), Some(Instant(1_100)));
        assert!(w.pop_due(Instant(1_099)).is_none());
        assert_eq!(w.pop_due(Instant(1_100)), Some((11, vec!['a'])));
        assert!(w.pop_due(Instant(5_000)).is_none());
    }
}
