//! Messages between shards.
//!
//! Shards share no mutable memory: everything one shard asks of another is a [`ShardMsg`]
//! that the driver carries (SPSC queues between Reactor threads in the gateway, delayable queues in the sim).
//! Immutable snapshots (`Arc<[UserId]>` member lists, `Bytes` payloads) may be shared.
//!
//! Architecture invariant: the driver delivers the messages from one shard to another in
//! the order they were produced (FIFO per ordered pair of shards). I8 (sender FIFO) and
//! I4 (in-order delivery on a connection) rest on it; messages of different pairs may
//! interleave in any way.

use crate::log::StoredMessage;
use crate::proto::meta::{InboxEntry, Priority, SignalKind};
use crate::proto::{ClientMsgId, ConvId, DeviceId, ErrorCode, Seq, UserId};
use crate::time::Instant;
use bytes::Bytes;
use std::sync::Arc;

/// A shard's index, `0..shard_count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardId(pub u16);

/// A connection, named by the shard-local slab index and a generation that changes each
/// time the index is reused, so that a message for a closed connection is recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId {
    /// Slab index.
    pub index: u32,
    /// Reuse generation of the index.
    pub generation: u32,
}

/// A connection anywhere in the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnRef {
    /// The shard holding it.
    pub shard: ShardId,
    /// The connection there.
    pub conn: ConnId,
}

/// Why a connection asked its conversation's owner for a run of messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayPurpose {
    /// Part of the client's Sync with this request number.
    Sync { req: u32 },
    /// The client's Pull with this request number.
    Pull { req: u32 },
    /// The connection saw a gap in the live stream and catches up on its own.
    CatchUp,
}

/// A group administration command, executed by the group's owner shard and made durable
/// in its log before it takes effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Create a group with these members.
    CreateGroup { group: ConvId, members: Vec<UserId> },
    /// Add members to a group.
    AddMembers { group: ConvId, members: Vec<UserId> },
    /// Remove members from a group.
    RemoveMembers { group: ConvId, members: Vec<UserId> },
}

impl Command {
    /// The group the command is about.
    pub fn group(&self) -> ConvId {
        match self {
            Command::CreateGroup { group, .. }
            | Command::AddMembers { group, .. }
            | Command::RemoveMembers { group, .. } => *group,
        }
    }
}

/// Why a command failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The id is not a group id.
    #[error("{0} is not a group id")]
    NotAGroup(ConvId),
    /// CreateGroup for a group that exists.
    #[error("group {0} already exists")]
    AlreadyExists(ConvId),
    /// A change to a group that does not exist.
    #[error("group {0} does not exist")]
    NoSuchGroup(ConvId),
    /// The member list would exceed the limit, or names user 0.
    #[error("invalid member list: {0}")]
    BadMembers(String),
    /// The log could not make the command durable; nothing changed.
    #[error("the command could not be made durable")]
    StorageFailed,
    /// Too many commands wait for members' inboxes at the group's owner; retry.
    #[error("too many group commands at once; retry")]
    Busy,
}

/// One message between shards.
#[derive(Clone, Debug)]
pub enum ShardMsg {
    /// Connection shard -> the sender's home (`bound: false`), which binds the
    /// client_msg_id to the conversation and passes it on -> owner (`bound: true`):
    /// sequence and store this message.
    Submit {
        bound: bool,
        from: ConnRef,
        req: u32,
        sender: UserId,
        sender_device: DeviceId,
        client_msg_id: ClientMsgId,
        conv: ConvId,
        priority: Priority,
        payload: Bytes,
    },
    /// A recovered shard -> senders' homes: the conversations recent client_msg_ids name.
    Bindings {
        entries: Vec<(UserId, ClientMsgId, ConvId)>,
    },
    /// Owner -> connection shard: the message is durable with this seq.
    Acked {
        to: ConnRef,
        req: u32,
        client_msg_id: ClientMsgId,
        conv: ConvId,
        seq: Seq,
    },
    /// Owner -> connection shard: the message was not stored.
    Nacked {
        to: ConnRef,
        req: u32,
        client_msg_id: ClientMsgId,
        conv: ConvId,
        code: ErrorCode,
        message: &'static str,
    },
    /// Owner -> every shard: durable messages of one conversation, in seq order, for
    /// the local devices of `members`. `sparse` marks the high-priority pushes of a
    /// read-diffusion group: they skip seqs, so they bypass the connections' cursors.
    Deliver {
        conv: ConvId,
        members: Arc<[UserId]>,
        msgs: Arc<[StoredMessage]>,
        sparse: bool,
    },
    /// Owner -> every shard: `conv` (read diffusion) has messages up to `latest`.
    Notify {
        conv: ConvId,
        members: Arc<[UserId]>,
        latest: Seq,
    },
    /// Connection shard -> owner: send `to` the messages of `conv` from `from` on.
    Replay {
        to: ConnRef,
        user: UserId,
        conv: ConvId,
        from: Seq,
        limit: u32,
        purpose: ReplayPurpose,
    },
    /// Owner -> connection shard: the answer to a Replay. `Err(NotMember)` refuses it;
    /// `Err(StorageFailed)` (the log could not be read) and `Err(RateLimited)` (not now)
    /// say nothing about the history, which must not be taken as gone.
    Replayed {
        to: ConnRef,
        conv: ConvId,
        purpose: ReplayPurpose,
        result: Result<ReplayBatch, ErrorCode>,
    },
    /// Connection shard -> owner: relay an ephemeral signal to the members.
    Signal {
        from: ConnRef,
        sender: UserId,
        sender_device: DeviceId,
        conv: ConvId,
        kind: SignalKind,
        payload: Bytes,
    },
    /// Owner -> every shard: an ephemeral signal for the local devices of `members`.
    SignalFanout {
        from: ConnRef,
        sender: UserId,
        sender_device: DeviceId,
        conv: ConvId,
        kind: SignalKind,
        members: Arc<[UserId]>,
        payload: Bytes,
    },
    /// Connection shard -> the user's home shard: (user, device) authenticated on `conn`
    /// at `at`.
    Login {
        user: UserId,
        device: DeviceId,
        conn: ConnRef,
        at: Instant,
    },
    /// Connection shard -> the user's home shard: that session ended.
    Logout {
        user: UserId,
        device: DeviceId,
        conn: ConnRef,
    },
    /// Home shard -> connection shard: close `conn`, another login took over.
    Kick {
        conn: ConnRef,
        /// Why: `SessionTakenOver` or `TooManyDevices`.
        code: ErrorCode,
    },
    /// Any shard -> the group's owner: run a command; answer `reply_to` with `token`.
    Command {
        command: Command,
        reply_to: ShardId,
        token: u64,
    },
    /// Owner -> the shard that took the command: its outcome.
    CommandDone {
        token: u64,
        result: Result<(), CommandError>,
    },
    /// Owner -> a home: put `conv` in the inboxes of `users` (homed there), durably, then
    /// answer `reply_to` with [`ShardMsg::InboxJoined`] and `join`. The owner stores the
    /// first message of a direct conversation, or adds members to a group, only after
    /// every member's home answered (I9).
    InboxJoin {
        reply_to: ShardId,
        join: u64,
        conv: ConvId,
        users: Vec<UserId>,
    },
    /// Home -> owner: the join is durable, or failed (`InboxFull`, `StorageFailed`).
    InboxJoined {
        join: u64,
        result: Result<(), ErrorCode>,
    },
    /// Owner -> a home: `users` were removed from the group `conv`.
    InboxLeave { conv: ConvId, users: Vec<UserId> },
    /// Connection shard -> the user's home: list a page of the user's inbox for `to`.
    ListInbox {
        to: ConnRef,
        user: UserId,
        req: u32,
        after: Option<ConvId>,
        limit: u32,
    },
    /// Home -> owner: the head of `conv` for the listing `listing`, as `user` sees it.
    Head {
        reply_to: ShardId,
        listing: u64,
        user: UserId,
        conv: ConvId,
    },
    /// Owner -> home: `Ok(Some((latest durable seq, its timestamp)))`, `Ok(None)` if the
    /// user is not a member, `Err` if the conversation could not be loaded now.
    HeadIs {
        listing: u64,
        conv: ConvId,
        result: Result<Option<(Seq, u64)>, ErrorCode>,
    },
    /// Home -> connection shard: the page of the inbox, and whether more follow.
    InboxListed {
        to: ConnRef,
        req: u32,
        result: Result<(Vec<InboxEntry>, bool), ErrorCode>,
    },
}

/// A run of messages answering a Replay.
#[derive(Clone, Debug)]
pub struct ReplayBatch {
    /// The messages, contiguous, in seq order, starting at `max(from, available_from)`.
    pub msgs: Vec<StoredMessage>,
    /// The conversation's last durable seq.
    pub latest: Seq,
    /// The lowest seq still held; seqs below it are gone.
    pub available_from: Seq,
}
