//! The hasher of every map keyed by values a client chooses (user ids, conversation ids,
//! client message ids): SipHash-1-3 with a secret key, as std's `RandomState`, but with
//! the key passed in, so that the gateway seeds it per process (no precomputed collisions,
//! no hash flooding) while the simulator and the tests fix it (same seed, same run).

use siphasher::sip::SipHasher13;
use std::hash::BuildHasher;

/// A `BuildHasher` of SipHash-1-3 keyed by a 128-bit seed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeededState {
    k0: u64,
    k1: u64,
}

impl SeededState {
    /// A hasher keyed by `seed`. The gateway draws the seed from the OS at start; tests
    /// and the simulator pass a constant.
    pub fn new(seed: u128) -> SeededState {
        SeededState {
            k0: seed as u64,
            k1: (seed >> 64) as u64,
        }
    }
}

impl BuildHasher for SeededState {
    type Hasher = SipHasher13;

    fn build_hasher(&self) -> SipHasher13 {
        SipHasher13::new_with_keys(self.k0, self.k1)
    }
}

/// A hash map keyed by client-chosen values.
pub type Map<K, V> = std::collections::HashMap<K, V, SeededState>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn the_seed_changes_every_hash_and_the_same_seed_repeats_them() {
        let a = SeededState::new(1);
        let b = SeededState::new(2);
        assert_eq!(a.hash_one(42u64), SeededState::new(1).hash_one(42u64));
        assert_ne!(a.hash_one(42u64), b.hash_one(42u64));
    }
}
