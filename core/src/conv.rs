//! Conversations owned by a shard: their seq counters, members, and hot tier.
//!
//! Invariants (checked where they are produced):
//! - `last_seq` is the last seq handed out; `durable_seq <= last_seq`; every seq in
//!   `durable_seq+1..=last_seq` belongs to an append not yet durable (I3, I5).
//! - The hot tier holds a contiguous run of durable messages ending at `durable_seq`.
//! - `members` is sorted and without repeats; a direct conversation's members follow
//!   from its id.

use crate::log::StoredMessage;
use crate::proto::{ConvId, ConvKind, Seq, UserId};
use std::collections::VecDeque;
use std::sync::Arc;

/// One conversation's state on its owner shard.
#[derive(Debug)]
pub struct Conversation {
    /// The id.
    pub id: ConvId,
    /// Sorted members, shared with fan-out messages (an immutable snapshot; membership
    /// changes replace it).
    pub members: Arc<[UserId]>,
    /// The last seq handed out (durable or not).
    pub last_seq: Seq,
    /// The last durable seq.
    pub durable_seq: Seq,
    /// When it was last used, on the shard's logical clock (for least-recently-used
    /// eviction).
    pub touched: u64,
    /// Log reads in flight for it: it stays in memory until they are answered.
    pub pinned: u32,
    /// The server timestamp of the message at `durable_seq` (0: none, or not known since
    /// it came back from the log).
    pub last_ts: u64,
    /// Its members' homes have it in their inboxes (I9): set once they confirmed, and for
    /// any conversation with a message (its first message waited for that).
    pub joined: bool,
    hot: VecDeque<StoredMessage>,
}

impl Conversation {
    /// A conversation with no messages. Direct conversations get their two members (one,
    /// for notes to self); groups get `members`.
    pub fn new(id: ConvId, members: Vec<UserId>) -> Conversation {
        let members = match id.kind() {
            Some(ConvKind::Direct(a, b)) => {
                let mut m = vec![a, b];
                m.dedup();
                m
            }
            _ => sorted(members),
        };
        Conversation {
            id,
            members: members.into(),
            last_seq: Seq::ZERO,
            durable_seq: Seq::ZERO,
            touched: 0,
            pinned: 0,
            last_ts: 0,
            joined: false,
            hot: VecDeque::new(),
        }
    }

    /// A direct conversation brought back from the log after it left memory: its messages
    /// up to `last_seq` are durable there, and none is hot.
    pub fn reloaded(id: ConvId, last_seq: Seq) -> Conversation {
        let mut conv = Conversation::new(id, Vec::new());
        conv.last_seq = last_seq;
        conv.durable_seq = last_seq;
        conv.joined = last_seq != Seq::ZERO;
        conv
    }

    /// Whether it may leave memory: a direct conversation (its members follow from its
    /// id and its seq counter from the log) with nothing in flight. Groups stay: they are
    /// created by operators, not by clients, so their number is not a client's to grow.
    pub fn is_evictable(&self) -> bool {
        matches!(self.id.kind(), Some(ConvKind::Direct(..)))
            && self.last_seq == self.durable_seq
            && self.pinned == 0
    }

    /// Messages and payload bytes in the hot tier.
    pub fn hot_size(&self) -> (usize, usize) {
        (
            self.hot.len(),
            self.hot.iter().map(|m| m.payload.len()).sum(),
        )
    }

    /// Whether `user` may send to and read this conversation.
    pub fn is_member(&self, user: UserId) -> bool {
        self.members.binary_search(&user).is_ok()
    }

    /// Replaces the member set.
    pub fn set_members(&mut self, members: Vec<UserId>) {
        self.members = sorted(members).into();
    }

    /// The lowest seq the hot tier can serve: everything below it is gone from memory.
    pub fn hot_from(&self) -> Seq {
        self.hot.front().map_or(self.durable_seq.next(), |m| m.seq)
    }

    /// Appends a durable message to the hot tier. Returns the bytes of the message that
    /// fell out of it when it was full, if any.
    pub fn push_hot(&mut self, msg: StoredMessage, per_conv_max: usize) -> Option<usize> {
        assert_eq!(
            msg.seq,
            self.durable_seq.next(),
            "hot tier must stay contiguous"
        );
        self.durable_seq = msg.seq;
        self.last_ts = msg.ts_ms;
        self.hot.push_back(msg);
        if self.hot.len() > per_conv_max {
            return self.hot.pop_front().map(|m| m.payload.len());
        }
        None
    }

    /// Drops the hot message `seq` if it is the oldest one held (the shard-wide byte
    /// budget evicts in append order). Returns its bytes if it was dropped.
    pub fn evict_hot(&mut self, seq: Seq) -> Option<usize> {
        if self.hot.front().is_some_and(|m| m.seq == seq) {
            return self.hot.pop_front().map(|m| m.payload.len());
        }
        None
    }

    /// Up to `limit` hot messages from `from` on, in seq order.
    pub fn hot_range(&self, from: Seq, limit: usize) -> impl Iterator<Item = &StoredMessage> {
        let start = from.0.saturating_sub(self.hot_from().0) as usize;
        self.hot.iter().skip(start).take(limit)
    }
}

fn sorted(mut members: Vec<UserId>) -> Vec<UserId> {
    members.sort_unstable();
    members.dedup();
    members
}
