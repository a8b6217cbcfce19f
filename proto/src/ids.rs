//! Identifier and counter newtypes shared by every layer: users, devices, conversations,
//! client message ids and sequence numbers. They are plain values, `Copy`, ordered and
//! serializable (postcard records in core use them directly).

use serde::{Deserialize, Serialize};
use std::fmt;

/// A user, as named by the `sub` claim of its token. 0 is never a valid user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UserId(pub u64);

/// One device of a user, as named by the `dev` claim of its token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeviceId(pub u32);

/// A position in one conversation's order. The first message is seq 1; `Seq(0)` means
/// "before the first message" (an empty cursor).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Seq(pub u64);

impl Seq {
    /// The cursor that holds nothing yet.
    pub const ZERO: Seq = Seq(0);

    /// The highest seq a conversation can reach, 2^63 - 1 (at a million messages a second,
    /// 290,000 years). A seq above it from a peer is invalid and refused where it enters,
    /// so that arithmetic on a seq (`next`, a range's end) never overflows.
    pub const MAX: Seq = Seq(i64::MAX as u64);

    /// Whether a peer may name this seq: at most [`Seq::MAX`].
    pub fn is_valid(self) -> bool {
        self <= Seq::MAX
    }

    /// The seq after this one. Only called on valid seqs (peer input is checked with
    /// [`Seq::is_valid`] where it enters), so it cannot overflow.
    pub fn next(self) -> Seq {
        assert!(self.is_valid(), "seq {} is over Seq::MAX", self.0);
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A client-made message id: 16 opaque bytes, unique per sender. Dedupe is keyed by
/// (sender, id), so a retry with the same id is recognised.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct ClientMsgId(pub [u8; 16]);

/// A conversation id of 128 bits.
///
/// A direct conversation between users `a <= b` is `{hi: a, lo: b}`, so its two members
/// follow from the id and need no stored membership. A group has `hi == 0` and
/// `lo` = the group id (never 0). Every other value (`hi > lo`, or `hi == 0 && lo == 0`)
/// is invalid and rejected where it enters.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct ConvId {
    /// The smaller user of a direct conversation, or 0 for a group.
    pub hi: u64,
    /// The larger user of a direct conversation, or the group id.
    pub lo: u64,
}

/// What a valid [`ConvId`] names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvKind {
    /// A conversation between two users (possibly the same user: notes to self).
    Direct(UserId, UserId),
    /// A group; membership is stored.
    Group(u64),
}

impl ConvId {
    /// The direct conversation between two users, in either order.
    pub fn direct(a: UserId, b: UserId) -> ConvId {
        assert!(a.0 != 0 && b.0 != 0, "user 0 is not a user");
        ConvId {
            hi: a.0.min(b.0),
            lo: a.0.max(b.0),
        }
    }

    /// The group with this id (never 0).
    pub fn group(id: u64) -> ConvId {
        assert!(id != 0, "group 0 is not a group");
        ConvId { hi: 0, lo: id }
    }

    /// What the id names, or `None` if it is not a valid conversation id.
    pub fn kind(self) -> Option<ConvKind> {
        match (self.hi, self.lo) {
            (0, 0) => None,
            (0, id) => Some(ConvKind::Group(id)),
            (a, b) if a <= b => Some(ConvKind::Direct(UserId(a), UserId(b))),
            _ => None,
        }
    }

    /// A stable 64-bit hash of the id, the same on every build and platform: FNV-1a over
    /// its 16 little-endian bytes, then the murmur3 finaliser, because FNV's low bits
    /// spread consecutive ids poorly and ownership is this hash modulo the shard count.
    pub fn stable_hash(self) -> u64 {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut h = OFFSET;
        let bytes = self
            .hi
            .to_le_bytes()
            .into_iter()
            .chain(self.lo.to_le_bytes());
        for b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

impl fmt::Display for ConvId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind() {
            Some(ConvKind::Direct(a, b)) => write!(f, "d:{}:{}", a.0, b.0),
            Some(ConvKind::Group(g)) => write!(f, "g:{g}"),
            None => write!(f, "invalid:{}:{}", self.hi, self.lo),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_conversation_id_is_the_same_from_either_side() {
        let (a, b) = (UserId(7), UserId(3));
        assert_eq!(ConvId::direct(a, b), ConvId::direct(b, a));
        assert_eq!(
            ConvId::direct(a, b).kind(),
            Some(ConvKind::Direct(UserId(3), UserId(7)))
        );
    }

    #[test]
    fn invalid_conversation_ids_have_no_kind() {
        assert_eq!(ConvId { hi: 0, lo: 0 }.kind(), None);
        assert_eq!(ConvId { hi: 9, lo: 2 }.kind(), None);
        assert_eq!(ConvId::group(5).kind(), Some(ConvKind::Group(5)));
    }

    #[test]
    fn stable_hash_does_not_change_between_builds() {
        // FNV-1a of the 16 little-endian bytes of (0u64, 1u64), then murmur3's fmix64,
        // computed independently.
        // A changed hash would move every conversation to another shard and orphan its log.
        assert_eq!(ConvId::group(1).stable_hash(), 0xb147_738b_d08d_dab1_u64);
    }
}
