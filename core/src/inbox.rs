//! Inboxes: for each user homed on a shard, the conversations the user is in and the
//! user's read cursor in each (I9).
//!
//! The home shard keeps this durably in its log ([`crate::log::Record::InboxJoined`],
//! [`crate::log::Record::InboxLeft`], and the inbox part of every checkpoint). A
//! conversation's owner asks its members' homes to add it before its first message is
//! stored, and before members are added to a group, so a device that was offline learns
//! every conversation of its user from its home on its next connection.
//!
//! Invariants:
//! - Each user's entries are at most `Limits::inbox_entries_per_user_max` (checked by the
//!   shard before it appends a join); `entries` is the sum over users.
//! - A user with no entry has no map here: memory is per entry, not per user ever seen.
//! - A read cursor only moves forward.

use crate::hash::{Map, SeededState};
use crate::log::InboxHead;
use crate::proto::{ConvId, Seq, UserId};
use std::collections::BTreeMap;

/// The inboxes of the users homed on one shard.
#[derive(Debug)]
pub struct Inboxes {
    users: Map<UserId, BTreeMap<ConvId, Seq>>,
    entries: usize,
}

impl Inboxes {
    /// No inboxes.
    pub fn new(hasher: SeededState) -> Inboxes {
        Inboxes {
            users: Map::with_hasher(hasher),
            entries: 0,
        }
    }

    /// Whether `conv` is in `user`'s inbox.
    pub fn contains(&self, user: UserId, conv: ConvId) -> bool {
        self.users.get(&user).is_some_and(|m| m.contains_key(&conv))
    }

    /// Conversations in `user`'s inbox.
    pub fn len_of(&self, user: UserId) -> usize {
        self.users.get(&user).map_or(0, BTreeMap::len)
    }

    /// Entries over all users.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Adds `conv` to `user`'s inbox (read cursor 0); nothing if it is there.
    pub fn join(&mut self, user: UserId, conv: ConvId) {
        let inbox = self.users.entry(user).or_default();
        if let std::collections::btree_map::Entry::Vacant(e) = inbox.entry(conv) {
            e.insert(Seq::ZERO);
            self.entries += 1;
        }
    }

    /// Removes `conv` from `user`'s inbox; nothing if it is not there.
    pub fn leave(&mut self, user: UserId, conv: ConvId) {
        if let Some(inbox) = self.users.get_mut(&user) {
            if inbox.remove(&conv).is_some() {
                self.entries -= 1;
            }
            if inbox.is_empty() {
                self.users.remove(&user);
            }
        }
    }

    /// Up to `limit` entries of `user` after `after` (from the first if `None`), in
    /// ascending conversation order, with their read cursors, and whether more follow.
    pub fn page(
        &self,
        user: UserId,
        after: Option<ConvId>,
        limit: usize,
    ) -> (Vec<(ConvId, Seq)>, bool) {
        let Some(inbox) = self.users.get(&user) else {
            return (Vec::new(), false);
        };
        let mut range: Box<dyn Iterator<Item = (&ConvId, &Seq)>> = match after {
            Some(after) => Box::new(
                inbox.range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            ),
            None => Box::new(inbox.iter()),
        };
        let page: Vec<(ConvId, Seq)> = range.by_ref().take(limit).map(|(&c, &s)| (c, s)).collect();
        (page, range.next().is_some())
    }

    /// Every entry, in ascending (user, conversation) order, as a checkpoint records them.
    pub fn heads(&self) -> Vec<InboxHead> {
        let mut heads: Vec<InboxHead> = self
            .users
            .iter()
            .flat_map(|(&user, inbox)| {
                inbox
                    .iter()
                    .map(move |(&conv, &read)| InboxHead { user, conv, read })
            })
            .collect();
        heads.sort_unstable();
        heads
    }

    /// Restores one entry from a checkpoint.
    pub fn restore(&mut self, head: InboxHead) {
        self.join(head.user, head.conv);
        if let Some(read) = self
            .users
            .get_mut(&head.user)
            .and_then(|m| m.get_mut(&head.conv))
        {
            *read = head.read;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(n: u64) -> ConvId {
        ConvId::group(n)
    }

    #[test]
    fn pages_walk_the_entries_in_order_and_say_when_more_follow() {
        let mut inboxes = Inboxes::new(SeededState::new(1));
        let u = UserId(5);
        for n in [3, 1, 2, 4] {
            inboxes.join(u, conv(n));
        }
        inboxes.join(u, conv(2));
        assert_eq!(inboxes.len_of(u), 4);
        assert_eq!(inboxes.entries(), 4);
        let (first, more) = inboxes.page(u, None, 3);
        assert_eq!(
            first.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![conv(1), conv(2), conv(3)]
        );
        assert!(more);
        let (rest, more) = inboxes.page(u, Some(conv(3)), 3);
        assert_eq!(rest, vec![(conv(4), Seq::ZERO)]);
        assert!(!more);
        inboxes.leave(u, conv(4));
        inboxes.leave(u, conv(9));
        let (exact, more) = inboxes.page(u, Some(conv(2)), 1);
        assert_eq!(exact.len(), 1);
        assert!(!more, "nothing follows the last entry");
        for n in 1..=3 {
            inboxes.leave(u, conv(n));
        }
        assert_eq!(inboxes.entries(), 0);
        assert!(inboxes.users.is_empty(), "an empty inbox holds no memory");
    }

    #[test]
    fn heads_round_trip_with_read_cursors() {
        let mut inboxes = Inboxes::new(SeededState::new(1));
        inboxes.restore(InboxHead {
            user: UserId(2),
            conv: conv(1),
            read: Seq(7),
        });
        inboxes.join(UserId(1), conv(3));
        inboxes.join(UserId(2), conv(1));
        let heads = inboxes.heads();
        assert_eq!(
            heads,
            vec![
                InboxHead {
                    user: UserId(1),
                    conv: conv(3),
                    read: Seq::ZERO
                },
                InboxHead {
                    user: UserId(2),
                    conv: conv(1),
                    read: Seq(7)
                },
            ],
            "a join of an entry that is there keeps its read cursor"
        );
    }
}
