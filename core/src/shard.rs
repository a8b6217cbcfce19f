//! The shard engine: one per executor, holding its connections, the conversations it owns,
//! their dedupe window and hot tier, and the home registry of the users hashed to it.
//!
//! # Driving a shard
//!
//! A driver (the io_uring gateway, the turmoil sim, a test) owns the sockets, the log file,
//! the clock and the channels to other shards. Each turn of its loop it:
//!
//! 1. feeds inputs: [`Shard::handle_open`], [`Shard::handle_bytes`],
//!    [`Shard::handle_written`], [`Shard::handle_closed`], [`Shard::handle_timeout`],
//!    [`Shard::handle_durable`], [`Shard::handle_log_failed`], [`Shard::handle_shard_msg`],
//!    [`Shard::handle_fetched`], [`Shard::handle_loaded`], [`Shard::handle_command`],
//!    [`Shard::handle_keys`], [`Shard::handle_drain`], [`Shard::handle_checkpoint_due`],
//!    each with the current time;
//! 2. drains [`Shard::poll_effect`]: appends bytes to the log (in order, each tagged with
//!    its [`Lsn`]), carries [`ShardMsg`]s to their shards (FIFO per pair of shards),
//!    reads history (`Fetch`) and a conversation's last durable seq (`Load`) from the
//!    log, and answers commands;
//! 3. drains [`Shard::poll_transmit`]: writes each connection's chunks with one vectored
//!    write, then reports bytes written with `handle_written`; a transmit marked `close`
//!    is written and then the socket closed (core has already forgotten the connection);
//! 4. arms one timer for [`Shard::poll_timeout`].
//!
//! The log contract: the driver makes appended bytes durable (write + fdatasync) in append
//! order, and calls `handle_durable(lsn)` when every append up to `lsn` is durable; one
//! sync may serve many appends (group commit). If a write or sync fails, it truncates the
//! log back to the last durable length and calls `handle_log_failed`: every append not yet
//! durable is then Nacked, and their seqs are handed out again (nothing was acked or
//! delivered for them, I5). Appends the driver has not polled yet are withdrawn then (they
//! fail with the rest), so a driver may take the shard's effects at any time.
//!
//! The read contract: a `Fetch` is answered with [`Shard::handle_fetched`], `Ok` with the
//! durable messages the log still holds (see [`Effect::Fetch`]), or `Err` if the read
//! failed even after the driver retried it. A failed read is never taken as history gone:
//! the client's request fails (`StorageFailed`) or its connection asks again later.
//!
//! Checkpoints: when the driver wants to bound the next start-up, it calls
//! [`Shard::handle_checkpoint_due`]; the checkpoint comes out as one `Append` of its own.
//! Recovery can then start at a checkpoint that is durable, instead of at the log's start.
//!
//! Before any of this, [`Shard::recover`] replays the shard's log records.
//!
//! # Invariants
//! - I1/I5: Ack and Deliver are produced only in `handle_durable`, for records whose
//!   append is durable.
//! - I2: a (sender, client_msg_id) in the dedupe window never gets a second seq.
//! - I3: seqs of a conversation are handed out by its owner only, consecutively.
//! - I4: a connection's push stream per conversation passes its [`ConvCursor`]: only the
//!   next seq is sent; a gap is filled by a Replay from the owner before anything later.
//! - I6: every queue here is bounded by a field of [`Limits`]; so is the state clients
//!   can grow: conversations in memory (`conversations_max`: idle direct conversations
//!   leave memory and are loaded back from the log), the hot tier (bytes and entries), the
//!   dedupe window and the homes' client_msg_id bindings. History (Sync, Pull, catch-up)
//!   goes out a page at a time as the connection drains, so a reply never outruns its
//!   reader. Each connection's frames and bytes are rate limited (token buckets).
//! - Peer input never reaches arithmetic that can overflow: seqs above [`Seq::MAX`],
//!   invalid conversation ids and oversized frames are refused where they enter; our own
//!   invariants are asserted, and the asserts and overflow checks stay on in release.
//! - A Send passes through its sender's home shard, which binds its client_msg_id to one
//!   conversation (I2 whichever shards own what), then to the conversation's owner.

use crate::auth::TokenVerifier;
use crate::connection::{Admit, Connection, ConvCursor, Phase, ReplayAsk, SyncProgress};
use crate::conv::Conversation;
use crate::dedupe::{Sequenced, Window};
use crate::hash::{Map, SeededState};
use crate::inbox::Inboxes;
use crate::limits::Limits;
use crate::log::{
    checkpoint_records, encode_record, DedupeEntry, GroupHead, InboxHead, Record, StoredMessage,
};
use crate::mesh::{
    Command, CommandError, ConnId, ConnRef, ReplayBatch, ReplayPurpose, ShardId, ShardMsg,
};
use crate::proto::meta::{self, CursorRefusal, Meta, Priority};
use crate::proto::{
    ClientMsgId, ConvId, ConvKind, Decoder, DeviceId, Encoder, ErrorCode, Frame, Seq, UserId,
};
use crate::time::Instant;
use crate::timer::{self, Wheel};
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// Conversations looked at per input when over `conversations_max`: bounded work per
/// input; the bound is met again within a few inputs even when some are in use.
const EVICT_ATTEMPTS: usize = 16;

/// How long a connection waits before it asks again for history whose read failed
/// (`StorageFailed`) or was refused for now (`RateLimited`): 1 s, long enough not to hammer
/// a failing disk, short enough that a connected device catches up soon after it heals.
const REPLAY_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// A log append's number, increasing by one per [`Effect::Append`] since start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

/// Configuration of one shard.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// This shard.
    pub id: ShardId,
    /// Shards in the gateway. Conversation ownership depends on it, so it must not change
    /// while logs exist.
    pub shard_count: u16,
    /// Bounds.
    pub limits: Limits,
    /// The key of the hasher of every map keyed by client-chosen ids. The gateway draws
    /// it from the OS at start (so collisions cannot be precomputed); the simulator and
    /// the tests fix it, so that a seed replays.
    pub hash_seed: u128,
}

/// An output for the driver, other than socket writes.
#[derive(Debug)]
pub enum Effect {
    /// Append these framed log records, then report durability of `lsn`.
    Append { lsn: Lsn, bytes: Vec<u8> },
    /// Carry `msg` to shard `to`.
    ToShard { to: ShardId, msg: ShardMsg },
    /// Read history older than the hot tier from the log and answer with
    /// [`Shard::handle_fetched`] and the same `fetch`: `Ok` with up to `limit` durable
    /// messages of `conv` with seqs in `from..=to` (`to` is the last seq before the hot
    /// tier), consecutive and in seq order, starting at the first seq `>= from` that the
    /// log still holds. Retention may have removed older segments: a first message after
    /// `from` says that the seqs before it are gone, and `Ok` with nothing says that all
    /// of `from..=to` is. `Err` only if the read failed even after retrying: that is
    /// never taken as history gone.
    Fetch {
        fetch: u64,
        conv: ConvId,
        from: Seq,
        to: Seq,
        limit: u32,
    },
    /// Find the last durable seq of the direct conversation `conv` in the log (it left
    /// memory earlier) and answer with [`Shard::handle_loaded`].
    Load { conv: ConvId },
    /// The command submitted with `token` finished.
    CommandDone {
        token: u64,
        result: Result<(), CommandError>,
    },
    /// Home: a durable message reached members homed here with no device connected (for
    /// a mobile push). Produced only when [`Shard::set_offline_push`] turned it on; one
    /// per message, never for its sender.
    Offline {
        users: Vec<UserId>,
        conv: ConvId,
        seq: Seq,
        sender: UserId,
        ts_ms: u64,
    },
}

/// Bytes to write to one connection.
#[derive(Debug)]
pub struct Transmit {
    /// The connection.
    pub conn: ConnId,
    /// Chunks to write in order (one vectored write).
    pub chunks: Vec<Bytes>,
    /// After writing, close the connection: core has already dropped it.
    pub close: bool,
}

/// Why recovery refused a log.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecoveryError {
    /// A record belongs to a conversation another shard owns: the shard count changed.
    #[error(
        "record of {conv} belongs to shard {owner}, not this one (was the shard count changed?)"
    )]
    NotOwned { conv: ConvId, owner: u16 },
    /// A conversation's seqs in the log are not consecutive.
    #[error("{conv}: seq {found} follows {last}")]
    SeqGap { conv: ConvId, last: Seq, found: Seq },
    /// A message or change for a group that was never created.
    #[error("record for group {0} that was never created")]
    UnknownGroup(ConvId),
    /// A checkpoint in the log does not match the state the records before it build: a
    /// group missing from it, in it but not created, or with other members or another
    /// last seq. The log is not what this shard wrote.
    #[error("checkpoint does not match the log before it for group {group}")]
    CheckpointMismatch { group: ConvId },
    /// The records start with a checkpoint that never ends (no record with `last`): the
    /// driver must start recovery at the first record of a whole checkpoint.
    #[error("the records start with an incomplete checkpoint")]
    IncompleteCheckpoint,
    /// An inbox record names a user homed on another shard: the shard count changed.
    #[error(
        "inbox record of user {} in {conv} belongs to shard {home}, not this one (was the shard count changed?)",
        user.0
    )]
    NotHome {
        user: UserId,
        conv: ConvId,
        home: u16,
    },
    /// A checkpoint's inboxes differ from those the records before it build.
    #[error("checkpoint does not match the log before it for the inboxes")]
    InboxMismatch,
}

/// Counters for metrics. Monotonic except `connections`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// Connections held now.
    pub connections: u64,
    /// Connections refused at the limit or while draining.
    pub refused: u64,
    /// Frames received.
    pub frames_in: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Frames queued to clients.
    pub frames_out: u64,
    /// Bytes handed to the driver to write.
    pub bytes_out: u64,
    /// Acks sent to clients.
    pub acks: u64,
    /// Nacks sent to clients.
    pub nacks: u64,
    /// Deliver frames queued to connections.
    pub deliveries: u64,
    /// Connections closed as slow consumers.
    pub slow_consumer_closes: u64,
    /// Failed authentications.
    pub auth_failures: u64,
    /// Frames refused because their connection was over its rate.
    pub rate_limited: u64,
    /// Messages made durable by this shard (as owner).
    pub messages_stored: u64,
    /// Conversations that left memory (least recently used, idle).
    pub conversations_evicted: u64,
    /// Conversations brought back from the log.
    pub conversations_loaded: u64,
    /// Conversations held in memory now (gauge).
    pub conversations: u64,
    /// Messages in the hot tier now (gauge).
    pub hot_messages: u64,
    /// Payload bytes of the hot tier now (gauge).
    pub hot_bytes: u64,
    /// Keys in the dedupe window now (gauge).
    pub dedupe_entries: u64,
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    conn: Option<Connection>,
}

#[derive(Debug)]
enum Pending {
    Message {
        msg: StoredMessage,
        waiters: Vec<(ConnRef, u32)>,
    },
    Command {
        command: Command,
        reply_to: ShardId,
        token: u64,
    },
    /// Home: `users` join `conv`'s inbox entries once durable; then `reply` is answered.
    InboxJoin {
        conv: ConvId,
        users: Vec<UserId>,
        reply: (ShardId, u64),
    },
    /// Home: `users` leave `conv`.
    InboxLeave { conv: ConvId, users: Vec<UserId> },
}

/// Owner: what waits for the members' homes to put a conversation in their inboxes.
#[derive(Debug)]
struct Join {
    /// Homes that have not answered yet.
    homes_left: usize,
    /// The first failure a home answered.
    failed: Option<ErrorCode>,
    what: JoinFor,
}

#[derive(Debug)]
enum JoinFor {
    /// The first message(s) of a direct conversation.
    Direct {
        conv: ConvId,
        waiting: Vec<ShardMsg>,
    },
    /// A command that adds members to a group.
    Command {
        command: Command,
        reply_to: ShardId,
        token: u64,
    },
}

/// A conversation's latest durable seq and that message's timestamp.
type Head = (Seq, u64);

/// Home: an inbox page waiting for its conversations' owners.
#[derive(Debug)]
struct Listing {
    to: ConnRef,
    req: u32,
    /// Per conversation of the page: its read cursor and, once its owner answered, its
    /// head (`None` inside: the user is no longer a member).
    items: Vec<(ConvId, Seq, Option<Option<Head>>)>,
    missing: usize,
    more: bool,
    failed: Option<ErrorCode>,
}

/// A Replay whose first part must come from the log, waiting for a read slot or for its
/// read. Its conversation is pinned in memory meanwhile.
#[derive(Clone, Copy, Debug)]
struct PendingFetch {
    to: ConnRef,
    conv: ConvId,
    from: Seq,
    limit: u32,
    purpose: ReplayPurpose,
    /// The last seq asked of the log (the one before the hot tier when the read started);
    /// `Seq::ZERO` while waiting for a slot.
    last: Seq,
}

/// Gathers a run of checkpoint records (see [`Record::Checkpoint`]) during recovery.
#[derive(Debug, Default)]
struct CheckpointRun {
    /// The part expected next; `None` outside a run (or after a run that broke).
    next: Option<u32>,
    groups: Vec<GroupHead>,
    dedupe: Vec<DedupeEntry>,
    inbox: Vec<InboxHead>,
    clock_ms: u64,
}

/// A whole checkpoint.
#[derive(Debug, Default)]
struct WholeCheckpoint {
    groups: Vec<GroupHead>,
    dedupe: Vec<DedupeEntry>,
    inbox: Vec<InboxHead>,
    clock_ms: u64,
}

impl CheckpointRun {
    /// Takes the next checkpoint record; returns the whole checkpoint when it is `last`.
    /// Part 0 starts a new run; a part that does not follow the one before breaks the run
    /// (what was gathered is a run cut by a crash, which means nothing) until the next
    /// part 0.
    fn push(&mut self, record: Record) -> Option<WholeCheckpoint> {
        let Some((part, last)) = record.checkpoint_part() else {
            unreachable!("only checkpoint records make a checkpoint run");
        };
        if part == 0 {
            *self = CheckpointRun::default();
        } else if self.next != Some(part) {
            *self = CheckpointRun::default();
            return None;
        }
        match record {
            Record::Checkpoint { groups, dedupe, .. } => {
                self.groups.extend(groups);
                self.dedupe.extend(dedupe);
            }
            Record::CheckpointInbox {
                clock_ms, entries, ..
            } => {
                self.inbox.extend(entries);
                self.clock_ms = self.clock_ms.max(clock_ms);
            }
            _ => unreachable!("checked above"),
        }
        if last {
            let whole = WholeCheckpoint {
                groups: std::mem::take(&mut self.groups),
                dedupe: std::mem::take(&mut self.dedupe),
                inbox: std::mem::take(&mut self.inbox),
                clock_ms: self.clock_ms,
            };
            *self = CheckpointRun::default();
            return Some(whole);
        }
        self.next = part.checked_add(1);
        None
    }
}

/// The engine of one shard.
pub struct Shard {
    id: ShardId,
    shard_count: u16,
    limits: Limits,
    verifier: TokenVerifier,
    hasher: SeededState,
    decoder: Decoder,
    /// The decoder before authentication: only an Auth of `auth_frame_bytes_max` fits.
    auth_decoder: Decoder,
    encoder: Encoder,
    now: Instant,
    draining: bool,

    slots: Vec<Slot>,
    free: Vec<u32>,
    wheel: Wheel<ConnId>,
    /// Authenticated sessions on this shard, by user.
    local: Map<UserId, Vec<(DeviceId, ConnId)>>,
    /// Home registry: where each (user, device) homed here is logged in, and since when.
    homes: Map<(UserId, DeviceId), (ConnRef, Instant)>,
    /// Devices of each user in `homes`, for `devices_per_user_max`.
    devices: Map<UserId, usize>,

    convs: Map<ConvId, Conversation>,
    /// `convs` by last use, oldest first. Lazy: an entry whose time is not its
    /// conversation's `touched` is stale and skipped (compacted when they pile up).
    lru: VecDeque<(u64, ConvId)>,
    /// The logical clock of `touched`.
    clock: u64,
    /// Direct conversations being loaded back from the log, with what waits for them.
    loading: BTreeMap<ConvId, Vec<ShardMsg>>,
    /// Owner: conversations waiting for their members' homes to add them to the inboxes,
    /// by join id; at most `loads_inflight_max`.
    joins: BTreeMap<u64, Join>,
    /// The join of each direct conversation in `joins`.
    direct_joins: BTreeMap<ConvId, u64>,
    next_join: u64,
    /// Owner: a group command is waiting for a join; later commands wait behind it, so
    /// that commands take effect in the order they came.
    command_joining: bool,
    commands_waiting: VecDeque<(Command, ShardId, u64)>,
    /// Home: the inboxes of the users homed here.
    inbox: Inboxes,
    /// Home: inbox pages waiting for owners, by id; at most `inbox_listings_max`.
    listings: BTreeMap<u64, Listing>,
    next_listing: u64,
    /// The wall clock (ms since the Unix epoch) as the driver last gave it.
    wall_ms: u64,
    /// The largest timestamp given to a message here: stamps never go below it, so they
    /// never decrease within a conversation even if the wall clock steps back.
    clock_ms: u64,
    /// Whether to produce [`Effect::Offline`].
    offline_push: bool,
    dedupe: Window,
    /// For the senders homed here: the conversation each recent client_msg_id names.
    bindings: Window<ConvId>,
    /// Hot messages in append order, for the shard-wide byte budget.
    hot_order: VecDeque<(ConvId, Seq)>,
    hot_bytes: usize,
    hot_count: usize,

    next_lsn: u64,
    append_buf: Vec<u8>,
    pending: VecDeque<(Lsn, Pending)>,

    /// Replays waiting for a log read, by fetch id: at most `fetches_inflight_max`.
    fetches: BTreeMap<u64, PendingFetch>,
    /// Replays waiting for a read slot, oldest first. Each connection has at most one
    /// replay page in flight, so this is bounded by the gateway's connections (see
    /// [`Shard::fetch_queue_max`]).
    fetch_queue: VecDeque<PendingFetch>,
    next_fetch: u64,
    /// Recovery started at a checkpoint: a direct conversation not in memory may have
    /// messages in the log before it, so it is loaded like one that left memory.
    recovered_from_checkpoint: bool,

    effects: VecDeque<Effect>,
    local_inbox: VecDeque<ShardMsg>,
    closing: VecDeque<Transmit>,
    dirty: Vec<ConnId>,
    stats: ShardStats,
    /// Planted bug for the simulator's oracle tests: skip the dedupe window.
    #[cfg(feature = "planted-bugs")]
    dedupe_off: bool,
    /// Planted bug for the simulator's oracle tests: a home puts a conversation in an
    /// inbox in memory only, and answers the join at once.
    #[cfg(feature = "planted-bugs")]
    inbox_not_durable: bool,
}

impl Shard {
    /// A shard with no state; call [`Shard::recover`] before traffic.
    pub fn new(config: ShardConfig, verifier: TokenVerifier) -> Shard {
        assert!(config.id.0 < config.shard_count, "shard id out of range");
        if let Err(e) = config.limits.validate() {
            panic!("invalid limits: {e}");
        }
        let hasher = SeededState::new(config.hash_seed);
        Shard {
            id: config.id,
            shard_count: config.shard_count,
            decoder: Decoder::new(config.limits.frame_bytes_max),
            auth_decoder: Decoder::new(config.limits.auth_frame_bytes_max),
            dedupe: Window::new(config.limits.dedupe_window_entries, hasher),
            bindings: Window::new(config.limits.dedupe_window_entries, hasher),
            limits: config.limits,
            verifier,
            hasher,
            encoder: Encoder::new(),
            now: Instant::default(),
            draining: false,
            slots: Vec::new(),
            free: Vec::new(),
            wheel: Wheel::default(),
            local: Map::with_hasher(hasher),
            homes: Map::with_hasher(hasher),
            devices: Map::with_hasher(hasher),
            convs: Map::with_hasher(hasher),
            lru: VecDeque::new(),
            clock: 0,
            loading: BTreeMap::new(),
            joins: BTreeMap::new(),
            direct_joins: BTreeMap::new(),
            next_join: 0,
            command_joining: false,
            commands_waiting: VecDeque::new(),
            inbox: Inboxes::new(hasher),
            listings: BTreeMap::new(),
            next_listing: 0,
            wall_ms: 0,
            clock_ms: 0,
            offline_push: false,
            hot_order: VecDeque::new(),
            hot_bytes: 0,
            hot_count: 0,
            next_lsn: 1,
            append_buf: Vec::new(),
            pending: VecDeque::new(),
            fetches: BTreeMap::new(),
            fetch_queue: VecDeque::new(),
            next_fetch: 1,
            recovered_from_checkpoint: false,
            effects: VecDeque::new(),
            local_inbox: VecDeque::new(),
            closing: VecDeque::new(),
            dirty: Vec::new(),
            stats: ShardStats::default(),
            #[cfg(feature = "planted-bugs")]
            dedupe_off: false,
            #[cfg(feature = "planted-bugs")]
            inbox_not_durable: false,
        }
    }

    /// Plants a bug: a home adds a conversation to an inbox in memory only (no log
    /// record) and tells the owner at once, so a crash forgets it (I9). Only for proving
    /// that the simulator's oracle catches it.
    #[cfg(feature = "planted-bugs")]
    pub fn plant_inbox_not_durable(&mut self) {
        self.inbox_not_durable = true;
    }

    /// The wall clock, in milliseconds since the Unix epoch. The driver gives it before
    /// its inputs (each loop turn); messages are stamped from it, never below a stamp
    /// given before (so a clock that steps back does not reorder timestamps).
    pub fn handle_wall_clock(&mut self, unix_ms: u64) {
        self.wall_ms = unix_ms;
    }

    /// Turns [`Effect::Offline`] on (the gateway does when an offline push hook is
    /// configured).
    pub fn set_offline_push(&mut self, on: bool) {
        self.offline_push = on;
    }

    /// Conversations in the inboxes of the users homed here (gauge).
    pub fn inbox_entries(&self) -> usize {
        self.inbox.entries()
    }

    /// Plants a bug: Sends are sequenced without looking at the dedupe window, so a retry
    /// gets a second seq (I2). Only for proving that the simulator's oracle catches it.
    #[cfg(feature = "planted-bugs")]
    pub fn plant_dedupe_off(&mut self) {
        self.dedupe_off = true;
    }

    /// This shard's id.
    pub fn id(&self) -> ShardId {
        self.id
    }

    /// The push cursors connection `id` holds (`None` if it is not open): for tests and
    /// diagnostics of the `cursors_per_conn_max` bound.
    pub fn connection_cursors(&self, id: ConnId) -> Option<usize> {
        self.conn(id).map(|c| c.convs.len())
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &ShardStats {
        &self.stats
    }

    /// The token verification keys were reloaded (SIGHUP). Sessions already authenticated
    /// keep running until their own token expires; new Auths use `verifier`.
    pub fn handle_keys(&mut self, now: Instant, verifier: TokenVerifier) {
        self.now = now;
        self.verifier = verifier;
        self.finish();
    }

    /// The shard that owns `conv`: its stable hash over the shard count.
    pub fn owner_of(conv: ConvId, shard_count: u16) -> ShardId {
        ShardId((conv.stable_hash() % u64::from(shard_count)) as u16)
    }

    /// The home shard of `user`, which tracks where its devices are logged in.
    pub fn home_of(user: UserId, shard_count: u16) -> ShardId {
        ShardId((user.0.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u16 % shard_count)
    }

    /// Rebuilds seqs, dedupe window, membership and hot tier from this shard's log
    /// records, oldest first. Call once, before any other input.
    ///
    /// The records start either at the log's beginning (every conversation from seq 1) or
    /// at the first record of a whole checkpoint ([`Record::Checkpoint`]): then the groups
    /// start from the checkpoint (members, last seq, nothing hot), a direct conversation
    /// may start at any seq (its earlier messages are before the checkpoint), and a direct
    /// conversation not met is loaded from the log when touched (`Effect::Load`). The
    /// dedupe window starts as the checkpoint recorded it (so every retry it covered is
    /// still answered, I2) and goes on with the messages replayed after it. Every later
    /// checkpoint's groups are checked against the state the records before it built
    /// ([`RecoveryError::CheckpointMismatch`]); a checkpoint cut by a crash is ignored.
    pub fn recover(
        &mut self,
        records: impl IntoIterator<Item = Record>,
    ) -> Result<(), RecoveryError> {
        let records: Vec<Record> = records.into_iter().collect();
        // Messages replayed after a checkpoint the records start with: each goes into the
        // dedupe window, so the checkpoint's oldest entries that they would push out are
        // not put in at all (a quarter of a start's time at the default window).
        let tail_messages = records
            .iter()
            .filter(|r| matches!(r, Record::Message(_)))
            .count();
        let mut records = records.into_iter().peekable();
        if records
            .peek()
            .is_some_and(|r| r.checkpoint_part().is_some())
        {
            self.recover_checkpoint_start(&mut records, tail_messages)?;
        }
        let mut run = CheckpointRun::default();
        for record in records {
            if record.checkpoint_part().is_some() {
                if let Some(whole) = run.push(record) {
                    self.check_checkpoint(&whole)?;
                }
            } else {
                // A run that another record interrupts was cut by a crash.
                run = CheckpointRun::default();
                self.recover_record(record)?;
            }
        }
        // Only now: a record for a conversation evicted halfway would look like a gap.
        self.evict_idle(usize::MAX);
        self.send_bindings_home();
        Ok(())
    }

    /// Takes the checkpoint the records start with and builds the groups from it.
    fn recover_checkpoint_start(
        &mut self,
        records: &mut std::iter::Peekable<impl Iterator<Item = Record>>,
        tail_messages: usize,
    ) -> Result<(), RecoveryError> {
        let mut run = CheckpointRun::default();
        while let Some(record) = records.next_if(|r| r.checkpoint_part().is_some()) {
            if let Some(whole) = run.push(record) {
                return self.start_at_checkpoint(whole, tail_messages);
            }
        }
        Err(RecoveryError::IncompleteCheckpoint)
    }

    /// `tail_messages`: the message records that follow the checkpoint.
    fn start_at_checkpoint(
        &mut self,
        whole: WholeCheckpoint,
        tail_messages: usize,
    ) -> Result<(), RecoveryError> {
        let WholeCheckpoint {
            groups,
            dedupe,
            inbox,
            clock_ms,
        } = whole;
        self.recovered_from_checkpoint = true;
        self.clock_ms = self.clock_ms.max(clock_ms);
        for head in inbox {
            self.check_home(head.user, head.conv)?;
            self.inbox.restore(head);
        }
        // The window as it was, oldest first: every entry is durable now, as the
        // checkpoint after them is. The replay inserts `tail_messages` new keys after
        // them (a key before the checkpoint is never stored again after it), so the
        // oldest ones beyond the window's capacity would only be pushed out again.
        let capacity = self.limits.dedupe_window_entries;
        let pushed_out = (dedupe.len() + tail_messages).saturating_sub(capacity);
        for e in dedupe.into_iter().skip(pushed_out) {
            self.check_owned(e.conv)?;
            self.dedupe.insert(
                (e.sender, e.client_msg_id),
                Sequenced {
                    conv: e.conv,
                    seq: e.seq,
                    durable: true,
                },
            );
        }
        for head in groups {
            self.check_owned(head.group)?;
            let group = head.group;
            let is_group = matches!(group.kind(), Some(ConvKind::Group(_)));
            if !is_group || self.convs.contains_key(&group) {
                return Err(RecoveryError::CheckpointMismatch { group });
            }
            let mut conv = Conversation::new(group, head.members);
            conv.last_seq = head.last_seq;
            conv.durable_seq = head.last_seq;
            self.convs.insert(group, conv);
            self.touch(group);
        }
        Ok(())
    }

    /// A checkpoint met in the middle of the records must describe exactly the groups
    /// the records before it built.
    fn check_checkpoint(&self, whole: &WholeCheckpoint) -> Result<(), RecoveryError> {
        let groups = &whole.groups;
        if whole.inbox != self.inbox.heads() {
            return Err(RecoveryError::InboxMismatch);
        }
        let mut named = std::collections::BTreeSet::new();
        for head in groups {
            let group = head.group;
            self.check_owned(group)?;
            let same = self.convs.get(&group).is_some_and(|c| {
                matches!(group.kind(), Some(ConvKind::Group(_)))
                    && c.members[..] == head.members[..]
                    && c.last_seq == head.last_seq
            });
            if !same || !named.insert(group) {
                return Err(RecoveryError::CheckpointMismatch { group });
            }
        }
        let missing = self
            .convs
            .keys()
            .filter(|id| matches!(id.kind(), Some(ConvKind::Group(_))) && !named.contains(id))
            .min();
        match missing {
            Some(&group) => Err(RecoveryError::CheckpointMismatch { group }),
            None => Ok(()),
        }
    }

    /// Replays one record other than a checkpoint.
    fn recover_record(&mut self, record: Record) -> Result<(), RecoveryError> {
        match record {
            Record::Message(msg) => self.recover_message(msg)?,
            Record::GroupCreated { group, members } => {
                self.check_owned(group)?;
                self.apply_command(&Command::CreateGroup { group, members });
            }
            Record::MembersAdded { group, members } => {
                self.check_owned(group)?;
                if !self.convs.contains_key(&group) {
                    return Err(RecoveryError::UnknownGroup(group));
                }
                self.apply_command(&Command::AddMembers { group, members });
            }
            Record::MembersRemoved { group, members } => {
                self.check_owned(group)?;
                if !self.convs.contains_key(&group) {
                    return Err(RecoveryError::UnknownGroup(group));
                }
                self.apply_command(&Command::RemoveMembers { group, members });
            }
            Record::InboxJoined { conv, users } => {
                for user in users {
                    self.check_home(user, conv)?;
                    self.inbox.join(user, conv);
                }
            }
            Record::InboxLeft { conv, users } => {
                for user in users {
                    self.check_home(user, conv)?;
                    self.inbox.leave(user, conv);
                }
            }
            Record::MessageV1(_) => unreachable!("the decoder turns MessageV1 into Message"),
            Record::Checkpoint { .. } | Record::CheckpointInbox { .. } => {
                unreachable!("checkpoint records are gathered in runs")
            }
        }
        Ok(())
    }

    /// An inbox record names a user homed here, or the shard count changed.
    fn check_home(&self, user: UserId, conv: ConvId) -> Result<(), RecoveryError> {
        let home = Shard::home_of(user, self.shard_count);
        if home != self.id {
            return Err(RecoveryError::NotHome {
                user,
                conv,
                home: home.0,
            });
        }
        Ok(())
    }

    fn recover_message(&mut self, msg: StoredMessage) -> Result<(), RecoveryError> {
        self.check_owned(msg.conv)?;
        let after_checkpoint = self.recovered_from_checkpoint;
        let conv = match self.convs.get_mut(&msg.conv) {
            Some(c) => c,
            None => match msg.conv.kind() {
                // After a checkpoint, its earlier messages are before the checkpoint.
                Some(ConvKind::Direct(..)) if after_checkpoint => {
                    self.convs.entry(msg.conv).or_insert_with(|| {
                        Conversation::reloaded(msg.conv, Seq(msg.seq.0.saturating_sub(1)))
                    })
                }
                Some(ConvKind::Direct(..)) => self
                    .convs
                    .entry(msg.conv)
                    .or_insert_with(|| Conversation::new(msg.conv, Vec::new())),
                _ => return Err(RecoveryError::UnknownGroup(msg.conv)),
            },
        };
        if msg.seq != conv.last_seq.next() {
            return Err(RecoveryError::SeqGap {
                conv: msg.conv,
                last: conv.last_seq,
                found: msg.seq,
            });
        }
        conv.last_seq = msg.seq;
        conv.joined = true;
        self.clock_ms = self.clock_ms.max(msg.ts_ms);
        let id = msg.conv;
        self.touch(id);
        self.dedupe.insert(
            (msg.sender, msg.client_msg_id),
            Sequenced {
                conv: msg.conv,
                seq: msg.seq,
                durable: true,
            },
        );
        self.push_hot(msg);
        Ok(())
    }

    /// After recovery, tells each sender's home which conversation each client_msg_id in
    /// the dedupe window names, so that a reuse for a conversation another shard owns is
    /// still recognised after a restart. One message per home shard.
    fn send_bindings_home(&mut self) {
        let mut by_home: BTreeMap<ShardId, Vec<(UserId, ClientMsgId, ConvId)>> = BTreeMap::new();
        for ((sender, id), seen) in self.dedupe.iter() {
            by_home
                .entry(Shard::home_of(sender, self.shard_count))
                .or_default()
                .push((sender, id, seen.conv));
        }
        for (home, entries) in by_home {
            self.route(home, ShardMsg::Bindings { entries });
        }
    }

    fn check_owned(&self, conv: ConvId) -> Result<(), RecoveryError> {
        let owner = Shard::owner_of(conv, self.shard_count);
        if owner != self.id {
            return Err(RecoveryError::NotOwned {
                conv,
                owner: owner.0,
            });
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------
    // Inputs
    // ---------------------------------------------------------------------------------

    /// A connection was accepted. Returns its id, or the bytes of an Error frame to write
    /// before closing it when the shard is full or draining.
    pub fn handle_open(&mut self, now: Instant) -> Result<ConnId, Bytes> {
        self.now = now;
        if self.draining || self.stats.connections as usize >= self.limits.connections_max {
            self.stats.refused += 1;
            let (code, message) = if self.draining {
                (ErrorCode::ShuttingDown, "the gateway is draining")
            } else {
                (ErrorCode::TooManyConnections, "the gateway is full")
            };
            return Err(self
                .encoder
                .encode_to_bytes(&error_meta(code, message, 0), &[]));
        }
        let conn = Connection::new(
            now,
            now + self.limits.auth_timeout,
            self.hasher,
            &self.limits,
        );
        let id = match self.free.pop() {
            Some(index) => {
                let slot = &mut self.slots[index as usize];
                slot.conn = Some(conn);
                ConnId {
                    index,
                    generation: slot.generation,
                }
            }
            None => {
                let index = u32::try_from(self.slots.len()).expect("connections_max fits u32");
                self.slots.push(Slot {
                    generation: 0,
                    conn: Some(conn),
                });
                ConnId {
                    index,
                    generation: 0,
                }
            }
        };
        self.stats.connections += 1;
        self.arm(id);
        Ok(id)
    }

    /// Bytes arrived on `conn`; whole frames are taken off the front of `buf`. On a
    /// protocol error the connection is closed with an Error frame. Bytes for a connection
    /// that is gone (closed by an earlier frame) are dropped: `buf` is left empty.
    pub fn handle_bytes(&mut self, now: Instant, conn: ConnId, buf: &mut BytesMut) {
        self.now = now;
        let before = buf.len();
        loop {
            let Some(authenticated) = self.conn(conn).map(|c| c.identity().is_some()) else {
                buf.clear();
                break;
            };
            // Before authentication only an Auth is valid, and a small one: a peer that has
            // not proved who it is cannot make the gateway buffer a large frame.
            let decoder = if authenticated {
                &self.decoder
            } else {
                &self.auth_decoder
            };
            let len = buf.len();
            match decoder.decode(buf) {
                Ok(Some(frame)) => {
                    self.stats.frames_in += 1;
                    self.handle_frame(conn, frame, len - buf.len());
                }
                Ok(None) => break,
                Err(e) => {
                    let message = e.to_string();
                    self.close(conn, e.code(), &message);
                    buf.clear();
                    break;
                }
            }
        }
        self.stats.bytes_in += (before - buf.len()) as u64;
        self.finish();
    }

    /// The driver wrote `n` bytes of `conn`'s transmits to its socket.
    pub fn handle_written(&mut self, now: Instant, conn: ConnId, n: usize) {
        self.now = now;
        let soft = self.limits.outbound_soft_bytes;
        if let Some(c) = self.conn_mut(conn) {
            c.outbox.written(n);
            if c.outbox.backlog() <= soft {
                c.degraded_since = None;
            }
            if c.outbox.backlog() == 0 {
                c.stalled_since = None;
            } else if n > 0 {
                c.stalled_since = Some(now);
            }
        }
        // The reader made room: the next page of history it asked for may go out.
        self.pump_replays(conn);
        self.finish();
    }

    /// The peer closed `conn`, or its socket failed.
    pub fn handle_closed(&mut self, now: Instant, conn: ConnId) {
        self.now = now;
        if self.conn(conn).is_some() {
            self.forget(conn);
        }
        self.finish();
    }

    /// Time passed; fires due deadlines.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        while let Some((tick, ids)) = self.wheel.pop_due(now) {
            for id in ids {
                let live = self.conn(id).is_some_and(|c| c.timer_tick == Some(tick));
                if live {
                    if let Some(c) = self.conn_mut(id) {
                        c.timer_tick = None;
                    }
                    self.check_deadlines(id);
                }
            }
        }
        self.finish();
    }

    /// Every append up to `lsn` is durable.
    pub fn handle_durable(&mut self, now: Instant, lsn: Lsn) {
        self.now = now;
        assert!(
            lsn.0 < self.next_lsn,
            "the driver reported {lsn:?} durable before it was appended"
        );
        let mut batches: BTreeMap<ConvId, Vec<StoredMessage>> = BTreeMap::new();
        while self.pending.front().is_some_and(|(l, _)| *l <= lsn) {
            let Some((_, pending)) = self.pending.pop_front() else {
                break;
            };
            match pending {
                Pending::Message { msg, waiters } => {
                    let key = (msg.sender, msg.client_msg_id);
                    self.dedupe.mark_durable(&key);
                    for (to, req) in waiters {
                        self.route(
                            to.shard,
                            ShardMsg::Acked {
                                to,
                                req,
                                client_msg_id: msg.client_msg_id,
                                conv: msg.conv,
                                seq: msg.seq,
                            },
                        );
                    }
                    self.stats.messages_stored += 1;
                    // The hot tier keeps its own compact copy: the payload received may
                    // be a slice of a large receive buffer that should not stay pinned.
                    let mut hot = msg.clone();
                    hot.payload = Bytes::copy_from_slice(&msg.payload);
                    self.push_hot(hot);
                    batches.entry(msg.conv).or_default().push(msg);
                }
                Pending::Command {
                    command,
                    reply_to,
                    token,
                } => {
                    self.apply_command(&command);
                    if let Command::RemoveMembers { group, members } = &command {
                        self.leave_inboxes(*group, members);
                    }
                    self.route(
                        reply_to,
                        ShardMsg::CommandDone {
                            token,
                            result: Ok(()),
                        },
                    );
                }
                Pending::InboxJoin { conv, users, reply } => {
                    for user in users {
                        self.inbox.join(user, conv);
                    }
                    let (to, join) = reply;
                    self.route(
                        to,
                        ShardMsg::InboxJoined {
                            join,
                            result: Ok(()),
                        },
                    );
                }
                Pending::InboxLeave { conv, users } => {
                    for user in users {
                        self.inbox.leave(user, conv);
                    }
                }
            }
        }
        for (conv_id, msgs) in batches {
            self.fan_out(conv_id, msgs);
        }
        // Conversations that were in use when new ones came may leave now.
        self.evict_idle(EVICT_ATTEMPTS);
        self.finish();
    }

    /// The driver could not make appends durable and has truncated the log back to its
    /// last durable length. Every append not yet durable is failed.
    pub fn handle_log_failed(&mut self, now: Instant) {
        self.now = now;
        // Records still being batched were never handed out; they fail with the rest. So
        // do appends handed out but not yet taken by the driver: they must never reach
        // the log after this, or a failed seq, handed out again, would be stored twice.
        self.append_buf.clear();
        self.effects
            .retain(|effect| !matches!(effect, Effect::Append { .. }));
        let failed: Vec<_> = self.pending.drain(..).collect();
        for (_, pending) in failed {
            match pending {
                Pending::Message { msg, waiters } => {
                    self.dedupe.remove_pending(&(msg.sender, msg.client_msg_id));
                    if let Some(conv) = self.convs.get_mut(&msg.conv) {
                        // Hand the seqs out again: nothing was acked or delivered for them.
                        conv.last_seq = conv.durable_seq;
                    }
                    for (to, req) in waiters {
                        self.route(
                            to.shard,
                            ShardMsg::Nacked {
                                to,
                                req,
                                client_msg_id: msg.client_msg_id,
                                conv: msg.conv,
                                code: ErrorCode::StorageFailed,
                                message: "the message could not be made durable; retry",
                            },
                        );
                    }
                }
                Pending::Command {
                    reply_to, token, ..
                } => self.route(
                    reply_to,
                    ShardMsg::CommandDone {
                        token,
                        result: Err(CommandError::StorageFailed),
                    },
                ),
                Pending::InboxJoin {
                    reply: (to, join), ..
                } => self.route(
                    to,
                    ShardMsg::InboxJoined {
                        join,
                        result: Err(ErrorCode::StorageFailed),
                    },
                ),
                // The user stays listed; the listing asks the owner, which says the user
                // is no longer a member, and the entry is left out.
                Pending::InboxLeave { .. } => {}
            }
        }
        self.finish();
    }

    /// A message from another shard (or from this one, looped back by the driver).
    pub fn handle_shard_msg(&mut self, now: Instant, msg: ShardMsg) {
        self.now = now;
        self.on_shard_msg(msg);
        self.finish();
    }

    /// A group command from the admin interface; answered by an
    /// [`Effect::CommandDone`] with `token` once durable (or refused).
    pub fn handle_command(&mut self, now: Instant, command: Command, token: u64) {
        self.now = now;
        let owner = Shard::owner_of(command.group(), self.shard_count);
        self.route(
            owner,
            ShardMsg::Command {
                command,
                reply_to: self.id,
                token,
            },
        );
        self.finish();
    }

    /// Stop accepting connections and close every connection with GoAway. In-flight
    /// appends still complete; their senders resend on reconnect and dedupe answers.
    pub fn handle_drain(&mut self, now: Instant) {
        self.now = now;
        self.draining = true;
        let ids: Vec<ConnId> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.conn.is_some())
            .map(|(i, s)| ConnId {
                index: i as u32,
                generation: s.generation,
            })
            .collect();
        for id in ids {
            let goaway = Meta::GoAway(meta::GoAway {
                code: ErrorCode::ShuttingDown,
                message: "the gateway is shutting down".into(),
                reconnect_after_ms: 1000,
            });
            self.close_with(id, &goaway);
        }
        self.finish();
    }

    /// Time for a checkpoint (the driver decides when, e.g. after so many bytes of log).
    /// Appends the checkpoint of every group this shard owns, as one [`Effect::Append`] of
    /// its own, after everything appended before: each group's members and last seq as of
    /// every record appended so far, durable or not (the checkpoint follows them in the
    /// log, so when it is durable they are too). Its Lsn becomes durable or fails like
    /// any other; a failed checkpoint is gone from the log with the rest, and nothing
    /// waits on it.
    pub fn handle_checkpoint_due(&mut self, now: Instant) {
        self.now = now;
        // Anything still batched goes out first, in its own append.
        self.finish();
        assert!(
            self.append_buf.is_empty(),
            "finish hands out every batched record"
        );
        let dedupe = self
            .dedupe
            .iter()
            .map(|((sender, client_msg_id), seen)| DedupeEntry {
                sender,
                client_msg_id,
                conv: seen.conv,
                seq: seen.seq,
            })
            .collect();
        let records = checkpoint_records(
            self.group_heads(),
            dedupe,
            self.inbox_heads(),
            self.clock_ms,
        );
        for record in records {
            encode_record(&record, &mut self.append_buf);
        }
        self.finish();
    }

    /// The inboxes as the log will have them once everything appended so far is replayed:
    /// those in memory, changed by the joins and leaves still on their way to disk.
    fn inbox_heads(&self) -> Vec<InboxHead> {
        let mut heads: BTreeMap<(UserId, ConvId), Seq> = self
            .inbox
            .heads()
            .into_iter()
            .map(|h| ((h.user, h.conv), h.read))
            .collect();
        for (_, pending) in &self.pending {
            match pending {
                Pending::InboxJoin { conv, users, .. } => {
                    for &user in users {
                        heads.entry((user, *conv)).or_insert(Seq::ZERO);
                    }
                }
                Pending::InboxLeave { conv, users } => {
                    for &user in users {
                        heads.remove(&(user, *conv));
                    }
                }
                Pending::Message { .. } | Pending::Command { .. } => {}
            }
        }
        heads
            .into_iter()
            .map(|((user, conv), read)| InboxHead { user, conv, read })
            .collect()
    }

    /// Every group this shard owns as the log will have it once everything appended so
    /// far is replayed: the groups in memory, changed by the commands still on their way
    /// to disk (they take effect in memory only once durable), in ascending id order.
    fn group_heads(&self) -> Vec<GroupHead> {
        let mut heads: BTreeMap<ConvId, (Vec<UserId>, Seq)> = self
            .convs
            .iter()
            .filter(|(id, _)| matches!(id.kind(), Some(ConvKind::Group(_))))
            .map(|(&id, c)| (id, (c.members.to_vec(), c.last_seq)))
            .collect();
        for (_, pending) in &self.pending {
            let Pending::Command { command, .. } = pending else {
                continue;
            };
            let group = command.group();
            let current = heads.get(&group).map_or(&[][..], |(m, _)| &m[..]);
            let members = members_after(current, command);
            heads.entry(group).or_insert((Vec::new(), Seq::ZERO)).0 = members;
        }
        heads
            .into_iter()
            .map(|(group, (members, last_seq))| GroupHead {
                group,
                members,
                last_seq,
            })
            .collect()
    }

    // ---------------------------------------------------------------------------------
    // Outputs
    // ---------------------------------------------------------------------------------

    /// The next effect, in the order produced.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// The next connection with bytes to write.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if let Some(t) = self.closing.pop_front() {
            return Some(t);
        }
        while let Some(id) = self.dirty.pop() {
            let encoder = &mut self.encoder;
            let Some(c) = live_conn(&mut self.slots, id) else {
                continue;
            };
            c.dirty = false;
            self.stats.frames_out += (c.notifies.len() + c.signals.len()) as u64;
            for (conv, latest_seq) in std::mem::take(&mut c.notifies) {
                c.outbox.push(
                    encoder,
                    &Meta::Notify(meta::Notify { conv, latest_seq }),
                    Bytes::new(),
                );
            }
            for (signal, payload) in std::mem::take(&mut c.signals) {
                c.outbox.push(encoder, &Meta::Signal(signal), payload);
            }
            if c.outbox.is_empty() {
                continue;
            }
            let chunks = c.outbox.take();
            self.stats.bytes_out += chunks.iter().map(|b| b.len() as u64).sum::<u64>();
            return Some(Transmit {
                conn: id,
                chunks,
                close: false,
            });
        }
        None
    }

    /// When the driver must next call [`Shard::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.wheel.next_deadline()
    }

    // ---------------------------------------------------------------------------------
    // Connections
    // ---------------------------------------------------------------------------------

    fn conn(&self, id: ConnId) -> Option<&Connection> {
        self.slots
            .get(id.index as usize)
            .filter(|s| s.generation == id.generation)
            .and_then(|s| s.conn.as_ref())
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Connection> {
        live_conn(&mut self.slots, id)
    }

    fn me(&self, conn: ConnId) -> ConnRef {
        ConnRef {
            shard: self.id,
            conn,
        }
    }

    /// Queues a frame on a live connection and enforces the outbound budget.
    fn push(&mut self, id: ConnId, meta: &Meta, payload: Bytes) {
        let now = self.now;
        let (soft, hard) = (
            self.limits.outbound_soft_bytes,
            self.limits.outbound_hard_bytes,
        );
        let encoder = &mut self.encoder;
        let Some(c) = live_conn(&mut self.slots, id) else {
            return;
        };
        if !c.dirty {
            self.dirty.push(id);
        }
        c.push(encoder, meta, payload);
        self.stats.frames_out += 1;
        let stall_starts = c.stalled_since.is_none();
        if stall_starts {
            c.stalled_since = Some(now);
        }
        let backlog = c.outbox.backlog();
        if backlog > hard {
            self.stats.slow_consumer_closes += 1;
            self.close(
                id,
                ErrorCode::SlowConsumer,
                "outbound queue over its hard budget",
            );
        } else if backlog > soft && c.degraded_since.is_none() {
            c.degraded_since = Some(now);
            self.arm(id);
        } else if stall_starts {
            self.arm(id);
        }
    }

    fn is_degraded(&self, id: ConnId) -> bool {
        self.conn(id).is_some_and(|c| c.degraded_since.is_some())
    }

    /// Closes a connection with an Error frame.
    fn close(&mut self, id: ConnId, code: ErrorCode, message: &str) {
        let meta = error_meta(code, message, 0);
        self.close_with(id, &meta);
    }

    /// Queues `last` as the connection's final frame, hands its bytes to the driver with
    /// `close`, and forgets the connection.
    fn close_with(&mut self, id: ConnId, last: &Meta) {
        let encoder = &mut self.encoder;
        let Some(c) = live_conn(&mut self.slots, id) else {
            return;
        };
        c.outbox.push(encoder, last, Bytes::new());
        self.stats.frames_out += 1;
        let chunks = c.outbox.take();
        self.stats.bytes_out += chunks.iter().map(|b| b.len() as u64).sum::<u64>();
        self.closing.push_back(Transmit {
            conn: id,
            chunks,
            close: true,
        });
        self.forget(id);
    }

    /// Drops a connection's state; its id is never valid again.
    fn forget(&mut self, id: ConnId) {
        let Some(slot) = self.slots.get_mut(id.index as usize) else {
            return;
        };
        let Some(conn) = slot.conn.take() else {
            return;
        };
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(id.index);
        self.stats.connections -= 1;
        if let Phase::Active { user, device, .. } = conn.phase {
            if let Some(list) = self.local.get_mut(&user) {
                list.retain(|&(_, c)| c != id);
                if list.is_empty() {
                    self.local.remove(&user);
                }
            }
            let home = Shard::home_of(user, self.shard_count);
            self.route(
                home,
                ShardMsg::Logout {
                    user,
                    device,
                    conn: self.me(id),
                },
            );
        }
    }

    /// Files the connection's earliest deadline in the wheel if it is earlier than the
    /// entry it has.
    fn arm(&mut self, id: ConnId) {
        let (hb, grace) = (
            self.limits.heartbeat_interval,
            self.limits.slow_consumer_grace,
        );
        let Some(c) = self.conn_mut(id) else {
            return;
        };
        let mut deadline = match c.phase {
            Phase::AwaitingAuth { deadline } => deadline,
            // Filed one tick early so that the check fires within two intervals.
            Phase::Active { .. } => Instant::from_millis(
                (c.last_rx + hb * 2)
                    .as_millis()
                    .saturating_sub(timer::TICK_MS),
            ),
        };
        for since in [c.degraded_since, c.stalled_since].into_iter().flatten() {
            deadline = deadline.min(since + grace);
        }
        for at in [c.renew_at, c.session_ends, c.replay_retry_at]
            .into_iter()
            .flatten()
        {
            deadline = deadline.min(at);
        }
        let tick = timer::tick_of(deadline);
        if c.timer_tick.is_none_or(|t| tick < t) {
            c.timer_tick = Some(tick);
            self.wheel.insert(tick, id);
        }
    }

    fn check_deadlines(&mut self, id: ConnId) {
        let now = self.now;
        let (hb, grace) = (
            self.limits.heartbeat_interval,
            self.limits.slow_consumer_grace,
        );
        let soft = self.limits.outbound_soft_bytes;
        let Some(c) = self.conn(id) else {
            return;
        };
        match c.phase {
            Phase::AwaitingAuth { deadline } if now >= deadline => {
                self.stats.auth_failures += 1;
                self.close(
                    id,
                    ErrorCode::AuthTimeout,
                    "no valid Auth within the auth deadline",
                );
                return;
            }
            Phase::Active { .. }
                if now.as_millis() + timer::TICK_MS >= (c.last_rx + hb * 2).as_millis() =>
            {
                self.close(
                    id,
                    ErrorCode::HeartbeatTimeout,
                    "no frame within two heartbeat intervals",
                );
                return;
            }
            _ => {}
        }
        if c.session_ends.is_some_and(|at| now >= at) {
            self.close(
                id,
                ErrorCode::TokenExpired,
                "the session's token expired; reconnect with a new one",
            );
            return;
        }
        if c.renew_at.is_some_and(|at| now >= at) {
            let goaway = Meta::GoAway(meta::GoAway {
                code: ErrorCode::TokenExpired,
                message: "the token expires soon; reconnect with a new one".into(),
                reconnect_after_ms: 0,
            });
            if let Some(c) = self.conn_mut(id) {
                c.renew_at = None;
            }
            self.push(id, &goaway, Bytes::new());
        }
        let Some(c) = self.conn(id) else {
            return;
        };
        if let Some(since) = c.degraded_since {
            if now >= since + grace && c.outbox.backlog() > soft {
                self.stats.slow_consumer_closes += 1;
                self.close(
                    id,
                    ErrorCode::SlowConsumer,
                    "outbound queue over its budget for longer than the grace period",
                );
                return;
            }
        }
        if let Some(since) = c.stalled_since {
            // Under the budget but not read at all: a page of history or a few frames
            // that never leave would otherwise hold the connection (and the kernel's
            // socket buffers behind it) for as long as the client keeps pinging.
            assert!(
                c.outbox.backlog() > 0,
                "a stall is tracked only with a backlog"
            );
            if now >= since + grace {
                self.stats.slow_consumer_closes += 1;
                self.close(
                    id,
                    ErrorCode::SlowConsumer,
                    "nothing could be written to the connection for the grace period",
                );
                return;
            }
        }
        if let Some(c) = self.conn_mut(id) {
            if c.replay_retry_at.is_some_and(|at| now >= at) {
                c.replay_retry_at = None;
                self.pump_replays(id);
            }
        }
        self.arm(id);
    }

    // ---------------------------------------------------------------------------------
    // Frames from clients
    // ---------------------------------------------------------------------------------

    fn handle_frame(&mut self, id: ConnId, frame: Frame, len: usize) {
        let now = self.now;
        let Some(c) = live_conn(&mut self.slots, id) else {
            return;
        };
        c.last_rx = now;
        let identity = c.identity();
        let Some((user, device)) = identity else {
            match frame.meta {
                Meta::Auth(auth) => self.on_auth(id, &auth.token),
                _ => {
                    self.stats.auth_failures += 1;
                    self.close(id, ErrorCode::NotAuthenticated, "authenticate first");
                }
            }
            return;
        };
        if !c.rate.take(&self.limits, now, len) {
            self.refuse_over_rate(id, &frame.meta);
            return;
        }
        match frame.meta {
            Meta::Send(send) => self.on_send(id, user, device, send, frame.payload),
            Meta::DeliveryAck(ack) => {
                if let Some(c) = self.conn_mut(id) {
                    if let Some(cursor) = c.convs.get_mut(&ack.conv) {
                        // Capped at what was sent, so any wire value is harmless.
                        cursor.acked = cursor.acked.max(ack.seq.min(cursor.sent));
                    }
                }
            }
            Meta::Sync(sync) => self.on_sync(id, sync),
            Meta::Pull(pull) => self.on_pull(id, pull),
            Meta::ListInbox(list) => {
                let home = Shard::home_of(user, self.shard_count);
                let msg = ShardMsg::ListInbox {
                    to: self.me(id),
                    user,
                    req: list.req,
                    after: list.after.filter(|c| c.kind().is_some()),
                    limit: list.limit,
                };
                self.route(home, msg);
            }
            Meta::Signal(signal) => {
                if frame.payload.len() > self.limits.signal_bytes_max {
                    let e = error_meta(ErrorCode::PayloadTooLarge, "signal payload too large", 0);
                    self.push(id, &e, Bytes::new());
                } else if signal.conv.kind().is_some() {
                    let owner = Shard::owner_of(signal.conv, self.shard_count);
                    self.route(
                        owner,
                        ShardMsg::Signal {
                            from: self.me(id),
                            sender: user,
                            sender_device: device,
                            conv: signal.conv,
                            kind: signal.kind,
                            payload: frame.payload,
                        },
                    );
                }
            }
            Meta::Ping(ping) => self.push(
                id,
                &Meta::Pong(meta::Pong { nonce: ping.nonce }),
                Bytes::new(),
            ),
            Meta::Pong(_) => {}
            Meta::Auth(_) => self.close(
                id,
                ErrorCode::AlreadyAuthenticated,
                "this connection is already authenticated",
            ),
            other => {
                let message = format!("{:?} frames are sent by the gateway only", other.kind());
                self.close(id, ErrorCode::UnexpectedFrame, &message);
            }
        }
    }

    /// Answers a frame over the connection's rate: a Send is Nacked and a request gets an
    /// Error, both `RateLimited` (the client retries later); what needs no answer
    /// (DeliveryAck, Signal, Pong) is dropped. The connection stays open.
    fn refuse_over_rate(&mut self, id: ConnId, meta: &Meta) {
        self.stats.rate_limited += 1;
        const WHY: &str = "over this connection's frame or byte rate; retry later";
        let answer = match meta {
            Meta::Send(send) => {
                self.stats.nacks += 1;
                Meta::Nack(meta::Nack {
                    req: send.req,
                    client_msg_id: send.client_msg_id,
                    conv: send.conv,
                    code: ErrorCode::RateLimited,
                    message: WHY.into(),
                })
            }
            Meta::Sync(sync) => error_meta(ErrorCode::RateLimited, WHY, sync.req),
            Meta::Pull(pull) => error_meta(ErrorCode::RateLimited, WHY, pull.req),
            Meta::ListInbox(list) => error_meta(ErrorCode::RateLimited, WHY, list.req),
            Meta::Ping(_) => error_meta(ErrorCode::RateLimited, WHY, 0),
            _ => return,
        };
        self.push(id, &answer, Bytes::new());
    }

    fn on_auth(&mut self, id: ConnId, token: &str) {
        let now = self.now;
        let identity = match self.verifier.verify(token, now) {
            Ok(identity) => identity,
            Err(e) => {
                self.stats.auth_failures += 1;
                let message = e.to_string();
                self.close(id, e.code(), &message);
                return;
            }
        };
        let (user, device) = (identity.user, identity.device);
        // The session lasts as long as its token (with the same leeway verification
        // allows); the client is told to renew ahead of that, at most halfway through.
        let ends = identity.expires + self.limits.token_leeway;
        let margin = self
            .limits
            .token_renew_margin
            .min(ends.saturating_since(now) / 2);
        if let Some(c) = self.conn_mut(id) {
            c.phase = Phase::Active {
                user,
                device,
                since: now,
            };
            c.session_ends = Some(ends);
            c.renew_at = Some(Instant::from_millis(
                ends.as_millis()
                    .saturating_sub(u64::try_from(margin.as_millis()).unwrap_or(u64::MAX)),
            ));
        }
        self.local.entry(user).or_default().push((device, id));
        let ok = Meta::AuthOk(meta::AuthOk {
            user,
            device,
            heartbeat_ms: u32::try_from(self.limits.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
            max_frame_bytes: self.limits.frame_bytes_max,
            max_payload_bytes: self.limits.payload_bytes_max,
        });
        self.push(id, &ok, Bytes::new());
        self.arm(id);
        let home = Shard::home_of(user, self.shard_count);
        self.route(
            home,
            ShardMsg::Login {
                user,
                device,
                conn: self.me(id),
                at: now,
            },
        );
    }

    fn on_send(
        &mut self,
        id: ConnId,
        user: UserId,
        device: DeviceId,
        send: meta::Send,
        payload: Bytes,
    ) {
        let nack = |code, message: &str| {
            Meta::Nack(meta::Nack {
                req: send.req,
                client_msg_id: send.client_msg_id,
                conv: send.conv,
                code,
                message: message.into(),
            })
        };
        let refusal = if payload.len() > self.limits.payload_bytes_max as usize {
            Some(nack(
                ErrorCode::PayloadTooLarge,
                "payload over the message maximum",
            ))
        } else if send.conv.kind().is_none() {
            Some(nack(ErrorCode::BadRequest, "invalid conversation id"))
        } else if self
            .conn(id)
            .is_some_and(|c| c.inflight_sends >= self.limits.inflight_sends_max)
        {
            Some(nack(
                ErrorCode::TooManyInflight,
                "too many sends awaiting their ack",
            ))
        } else {
            None
        };
        if let Some(nack) = refusal {
            self.stats.nacks += 1;
            self.push(id, &nack, Bytes::new());
            return;
        }
        if let Some(c) = self.conn_mut(id) {
            c.inflight_sends += 1;
        }
        let home = Shard::home_of(user, self.shard_count);
        self.route(
            home,
            ShardMsg::Submit {
                bound: false,
                from: self.me(id),
                req: send.req,
                sender: user,
                sender_device: device,
                client_msg_id: send.client_msg_id,
                conv: send.conv,
                priority: send.priority,
                payload,
            },
        );
    }

    fn on_sync(&mut self, id: ConnId, sync: meta::Sync) {
        let refusal = if self.conn(id).is_some_and(|c| c.sync.is_some()) {
            Some("a Sync is already in progress on this connection")
        } else if sync.cursors.len() > self.limits.sync_cursors_max {
            Some("too many cursors in one Sync")
        } else if sync.cursors.iter().any(|c| !c.seq.is_valid()) {
            Some("a cursor's seq is over the maximum seq")
        } else {
            None
        };
        if let Some(message) = refusal {
            let e = error_meta(ErrorCode::BadRequest, message, sync.req);
            self.push(id, &e, Bytes::new());
            return;
        }
        let limit = self.limits.sync_batch_per_conv;
        let cursors_max = self.limits.cursors_per_conn_max;
        let purpose = ReplayPurpose::Sync { req: sync.req };
        let Some(c) = self.conn_mut(id) else {
            return;
        };
        let mut refused = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for cursor in &sync.cursors {
            if cursor.conv.kind().is_none() || !seen.insert(cursor.conv) {
                refused.push(CursorRefusal {
                    conv: cursor.conv,
                    latest_seq: Seq::ZERO,
                    code: ErrorCode::BadRequest,
                });
                continue;
            }
            let state = c.cursor(cursor.conv, cursors_max);
            state.sent = state.sent.max(cursor.seq);
            state.catching_up = true;
            c.replays.push_back(ReplayAsk {
                conv: cursor.conv,
                from: Seq::ZERO,
                remaining: limit,
                purpose,
                first: Seq::ZERO,
                last: Seq::ZERO,
                available_from: None,
                retry_at: None,
            });
        }
        c.sync = Some(SyncProgress {
            req: sync.req,
            awaiting: seen.len(),
            gaps: Vec::new(),
            more: Vec::new(),
            refused,
        });
        if seen.is_empty() {
            self.finish_sync(id);
        }
        self.pump_replays(id);
    }

    fn finish_sync(&mut self, id: ConnId) {
        let Some(progress) = self.conn_mut(id).and_then(|c| c.sync.take()) else {
            return;
        };
        let done = Meta::SyncDone(meta::SyncDone {
            req: progress.req,
            gaps: progress.gaps,
            more: progress.more,
            refused: progress.refused,
        });
        self.push(id, &done, Bytes::new());
    }

    fn on_pull(&mut self, id: ConnId, pull: meta::Pull) {
        let queued_max = self.limits.pulls_queued_max;
        let refusal = if pull.conv.kind().is_none() {
            Some((ErrorCode::BadRequest, "invalid conversation id"))
        } else if pull.backward && pull.from_seq == Seq::ZERO {
            Some((
                ErrorCode::BadRequest,
                "a backward Pull ends at a seq of at least 1",
            ))
        } else if !pull.from_seq.is_valid() {
            Some((ErrorCode::BadRequest, "from_seq is over the maximum seq"))
        } else if self
            .conn(id)
            .is_some_and(|c| c.pulls_queued() >= queued_max)
        {
            Some((
                ErrorCode::RateLimited,
                "too many Pulls in progress on this connection",
            ))
        } else {
            None
        };
        if let Some((code, message)) = refusal {
            let e = error_meta(code, message, pull.req);
            self.push(id, &e, Bytes::new());
            return;
        }
        let mut limit = pull.limit.clamp(1, self.limits.pull_limit_max);
        let mut from = pull.from_seq.max(Seq(1));
        if pull.backward {
            // The `limit` messages that end at from_seq, in ascending order.
            let end = pull.from_seq.0;
            from = Seq(end.saturating_sub(u64::from(limit) - 1).max(1));
            limit = u32::try_from(end - from.0 + 1).expect("at most `limit` seqs");
        }
        if let Some(c) = self.conn_mut(id) {
            c.replays.push_back(ReplayAsk {
                conv: pull.conv,
                from,
                remaining: limit,
                purpose: ReplayPurpose::Pull { req: pull.req },
                first: Seq::ZERO,
                last: Seq::ZERO,
                available_from: None,
                retry_at: None,
            });
        }
        self.pump_replays(id);
    }

    /// Asks for the next page of the connection's front [`ReplayAsk`], unless a page is
    /// in flight or the connection has not yet written out enough of what it was sent:
    /// history goes out at the pace the reader takes it (I6), whatever its size.
    ///
    /// A catch-up waiting to be retried lets the first ask that may go pass it; when none
    /// may, the connection's timer is set for the first retry.
    fn pump_replays(&mut self, id: ConnId) {
        let (resume, now) = (self.limits.replay_resume_bytes, self.now);
        let Some(c) = self.conn_mut(id) else {
            return;
        };
        if c.replay_inflight || c.replays.is_empty() || c.outbox.backlog() > resume {
            return;
        }
        let ready = |a: &ReplayAsk| a.retry_at.is_none_or(|at| now >= at);
        match c.replays.iter().position(ready) {
            Some(0) => {}
            Some(i) => {
                let ask = c.replays.remove(i).expect("a position in the queue");
                c.replays.push_front(ask);
            }
            None => {
                if c.replay_retry_at.is_none() {
                    c.replay_retry_at = c.replays.iter().filter_map(|a| a.retry_at).min();
                    self.arm(id);
                }
                return;
            }
        }
        let Some(front) = c.replays.front_mut() else {
            return;
        };
        front.retry_at = None;
        let ask = *front;
        let Some((user, _)) = c.identity() else {
            return;
        };
        let from = match ask.purpose {
            ReplayPurpose::Pull { .. } => ask.from,
            ReplayPurpose::Sync { .. } | ReplayPurpose::CatchUp => {
                c.convs.get(&ask.conv).map_or(Seq(1), |cur| cur.sent.next())
            }
        };
        c.replay_inflight = true;
        self.ask_replay(id, user, ask.conv, from, ask.remaining, ask.purpose);
    }

    fn ask_replay(
        &mut self,
        id: ConnId,
        user: UserId,
        conv: ConvId,
        from: Seq,
        limit: u32,
        purpose: ReplayPurpose,
    ) {
        let owner = Shard::owner_of(conv, self.shard_count);
        let to = self.me(id);
        self.route(
            owner,
            ShardMsg::Replay {
                to,
                user,
                conv,
                from,
                limit,
                purpose,
            },
        );
    }

    // ---------------------------------------------------------------------------------
    // Messages between shards
    // ---------------------------------------------------------------------------------

    /// Sends `msg` to shard `to`; to this shard it is queued locally and handled before
    /// the current input returns, keeping FIFO order with everything else sent to self.
    fn route(&mut self, to: ShardId, msg: ShardMsg) {
        if to == self.id {
            self.local_inbox.push_back(msg);
        } else {
            self.effects.push_back(Effect::ToShard { to, msg });
        }
    }

    fn broadcast(&mut self, msg: ShardMsg) {
        for s in 0..self.shard_count {
            self.route(ShardId(s), msg.clone());
        }
    }

    /// Ends every input: runs what this shard sent itself and hands the batched log
    /// records to the driver as one append.
    fn finish(&mut self) {
        while let Some(msg) = self.local_inbox.pop_front() {
            self.on_shard_msg(msg);
        }
        self.stats.conversations = self.convs.len() as u64;
        self.stats.hot_messages = self.hot_count as u64;
        self.stats.hot_bytes = self.hot_bytes as u64;
        self.stats.dedupe_entries = self.dedupe.len() as u64;
        if !self.append_buf.is_empty() {
            let lsn = Lsn(self.next_lsn);
            self.next_lsn += 1;
            self.effects.push_back(Effect::Append {
                lsn,
                bytes: std::mem::take(&mut self.append_buf),
            });
        }
    }

    /// The Lsn the records being batched now will get.
    fn batch_lsn(&self) -> Lsn {
        Lsn(self.next_lsn)
    }

    fn on_shard_msg(&mut self, msg: ShardMsg) {
        let Some(msg) = self.wait_for_load(msg) else {
            return;
        };
        let Some(msg) = self.wait_for_join(msg) else {
            return;
        };
        match msg {
            ShardMsg::Submit { bound: false, .. } => self.on_submit_at_home(msg),
            ShardMsg::Bindings { entries } => {
                for (sender, id, conv) in entries {
                    if self.bindings.get(&(sender, id)).is_none() {
                        self.bindings.insert((sender, id), conv);
                    }
                }
            }
            ShardMsg::Submit {
                bound: true,
                from,
                req,
                sender,
                sender_device,
                client_msg_id,
                conv,
                priority,
                payload,
            } => self.on_submit(
                from,
                req,
                StoredMessage {
                    conv,
                    seq: Seq::ZERO,
                    sender,
                    sender_device,
                    client_msg_id,
                    high_priority: priority == Priority::High,
                    payload,
                    ts_ms: 0,
                },
            ),
            ShardMsg::Acked {
                to,
                req,
                client_msg_id,
                conv,
                seq,
            } => {
                let ack = Meta::Ack(meta::Ack {
                    req,
                    client_msg_id,
                    conv,
                    seq,
                });
                if self.answer_send(to.conn, &ack) {
                    self.stats.acks += 1;
                }
            }
            ShardMsg::Nacked {
                to,
                req,
                client_msg_id,
                conv,
                code,
                message,
            } => {
                let nack = Meta::Nack(meta::Nack {
                    req,
                    client_msg_id,
                    conv,
                    code,
                    message: message.into(),
                });
                if self.answer_send(to.conn, &nack) {
                    self.stats.nacks += 1;
                }
            }
            ShardMsg::Deliver {
                conv,
                members,
                msgs,
                sparse,
            } => {
                for id in self.local_sessions(&members) {
                    self.push_messages(id, conv, &msgs, sparse);
                }
                if self.offline_push {
                    self.offline(conv, &members, &msgs);
                }
            }
            ShardMsg::Notify {
                conv,
                members,
                latest,
            } => {
                for id in self.local_sessions(&members) {
                    self.queue_notify(id, conv, latest);
                }
            }
            ShardMsg::Replay {
                to,
                user,
                conv,
                from,
                limit,
                purpose,
            } => self.on_replay(to, user, conv, from, limit, purpose),
            ShardMsg::Replayed {
                to,
                conv,
                purpose,
                result,
            } => self.on_replayed(to.conn, conv, purpose, result),
            ShardMsg::Signal {
                from,
                sender,
                sender_device,
                conv,
                kind,
                payload,
            } => {
                let members = self
                    .members_of(conv)
                    .filter(|m| m.binary_search(&sender).is_ok());
                // Signals are ephemeral: one from a non-member is dropped without a word.
                if let Some(members) = members {
                    self.broadcast(ShardMsg::SignalFanout {
                        from,
                        sender,
                        sender_device,
                        conv,
                        kind,
                        members,
                        payload,
                    });
                }
            }
            ShardMsg::SignalFanout {
                from,
                sender,
                sender_device,
                conv,
                kind,
                members,
                payload,
            } => {
                let signal = meta::Signal {
                    conv,
                    kind,
                    sender,
                    sender_device,
                };
                for id in self.local_sessions(&members) {
                    if self.me(id) != from {
                        self.queue_signal(id, &signal, &payload);
                    }
                }
            }
            ShardMsg::Login {
                user,
                device,
                conn,
                at,
            } => self.on_login(user, device, conn, at),
            ShardMsg::Logout { user, device, conn } => {
                if self
                    .homes
                    .get(&(user, device))
                    .is_some_and(|&(c, _)| c == conn)
                {
                    self.homes.remove(&(user, device));
                    self.count_device(user, false);
                }
            }
            ShardMsg::Kick { conn, code } => {
                let message = if code == ErrorCode::TooManyDevices {
                    "this user has the maximum number of devices logged in"
                } else {
                    "this device logged in on another connection"
                };
                self.close(conn.conn, code, message);
            }
            ShardMsg::Command {
                command,
                reply_to,
                token,
            } => self.on_command(command, reply_to, token),
            ShardMsg::CommandDone { token, result } => self
                .effects
                .push_back(Effect::CommandDone { token, result }),
            ShardMsg::InboxJoin {
                reply_to,
                join,
                conv,
                users,
            } => self.on_inbox_join(reply_to, join, conv, users),
            ShardMsg::InboxJoined { join, result } => {
                let Some(j) = self.joins.get_mut(&join) else {
                    unreachable!("a home answered join {join} twice or unasked");
                };
                if let Err(code) = result {
                    j.failed.get_or_insert(code);
                }
                j.homes_left -= 1;
                if j.homes_left == 0 {
                    self.finish_join(join);
                }
            }
            ShardMsg::InboxLeave { conv, users } => {
                let users: Vec<UserId> = users
                    .into_iter()
                    .filter(|&u| self.inbox.contains(u, conv))
                    .collect();
                if !users.is_empty() {
                    let record = Record::InboxLeft {
                        conv,
                        users: users.clone(),
                    };
                    encode_record(&record, &mut self.append_buf);
                    let lsn = self.batch_lsn();
                    self.pending
                        .push_back((lsn, Pending::InboxLeave { conv, users }));
                }
            }
            ShardMsg::ListInbox {
                to,
                user,
                req,
                after,
                limit,
            } => self.on_list_inbox(to, user, req, after, limit),
            ShardMsg::Head {
                reply_to,
                listing,
                user,
                conv,
            } => {
                let head = match (self.convs.get(&conv), conv.kind()) {
                    (Some(c), _) if c.is_member(user) => Some((c.durable_seq, c.last_ts)),
                    (Some(_), _) => None,
                    // Not in memory though the user is a member: new (wait_for_load
                    // loads one that left memory), so no message yet.
                    (None, Some(ConvKind::Direct(a, b))) if user == a || user == b => {
                        Some((Seq::ZERO, 0))
                    }
                    (None, _) => None,
                };
                self.route(
                    reply_to,
                    ShardMsg::HeadIs {
                        listing,
                        conv,
                        result: Ok(head),
                    },
                );
            }
            ShardMsg::HeadIs {
                listing,
                conv,
                result,
            } => self.on_head(listing, conv, result),
            ShardMsg::InboxListed { to, req, result } => {
                let answer = match result {
                    Ok((entries, more)) => Meta::InboxPage(meta::InboxPage { req, entries, more }),
                    Err(code) => error_meta(code, "the inbox could not be listed now; retry", req),
                };
                if self.conn(to.conn).is_some() {
                    self.push(to.conn, &answer, Bytes::new());
                }
            }
        }
    }

    /// Home: for each message, the members homed here with no device logged in.
    fn offline(&mut self, conv: ConvId, members: &[UserId], msgs: &[StoredMessage]) {
        let offline: Vec<UserId> = members
            .iter()
            .copied()
            .filter(|&u| Shard::home_of(u, self.shard_count) == self.id)
            .filter(|u| !self.devices.contains_key(u))
            .collect();
        if offline.is_empty() {
            return;
        }
        for m in msgs {
            let users: Vec<UserId> = offline.iter().copied().filter(|&u| u != m.sender).collect();
            if !users.is_empty() {
                self.effects.push_back(Effect::Offline {
                    users,
                    conv,
                    seq: m.seq,
                    sender: m.sender,
                    ts_ms: m.ts_ms,
                });
            }
        }
    }

    // ---------------------------------------------------------------------------------
    // Inboxes (I9)
    // ---------------------------------------------------------------------------------

    /// Owner: holds the first message of a direct conversation until both members' homes
    /// have it in their inboxes, durably; returns the message when it can go on. A
    /// conversation with a message (or whose join finished) goes on at once.
    fn wait_for_join(&mut self, msg: ShardMsg) -> Option<ShardMsg> {
        let ShardMsg::Submit {
            bound: true,
            conv,
            sender,
            ..
        } = &msg
        else {
            return Some(msg);
        };
        let (conv, sender) = (*conv, *sender);
        let Some(ConvKind::Direct(a, b)) = conv.kind() else {
            return Some(msg);
        };
        let joined = self
            .convs
            .get(&conv)
            .is_some_and(|c| c.joined || c.last_seq != Seq::ZERO);
        if joined || (sender != a && sender != b) {
            // A non-member is refused by on_submit, with no state made.
            return Some(msg);
        }
        if let Some(id) = self.direct_joins.get(&conv) {
            let Some(Join {
                what: JoinFor::Direct { waiting, .. },
                ..
            }) = self.joins.get_mut(id)
            else {
                unreachable!("a direct join is indexed by its conversation");
            };
            if waiting.len() < self.limits.load_waiters_max {
                waiting.push(msg);
            } else {
                self.refuse_waiting(msg, ErrorCode::RateLimited);
            }
            return None;
        }
        if self.joins.len() >= self.limits.loads_inflight_max {
            self.refuse_waiting(msg, ErrorCode::RateLimited);
            return None;
        }
        let mut users = vec![a, b];
        users.dedup();
        let id = self.start_join(
            conv,
            users,
            JoinFor::Direct {
                conv,
                waiting: vec![msg],
            },
        );
        self.direct_joins.insert(conv, id);
        None
    }

    /// Owner: asks the homes of `users` to put `conv` in their inboxes; `what` goes on
    /// when all have answered ([`Shard::finish_join`]).
    fn start_join(&mut self, conv: ConvId, users: Vec<UserId>, what: JoinFor) -> u64 {
        let id = self.next_join;
        self.next_join += 1;
        let mut by_home: BTreeMap<ShardId, Vec<UserId>> = BTreeMap::new();
        for user in users {
            by_home
                .entry(Shard::home_of(user, self.shard_count))
                .or_default()
                .push(user);
        }
        self.joins.insert(
            id,
            Join {
                homes_left: by_home.len(),
                failed: None,
                what,
            },
        );
        if by_home.is_empty() {
            self.finish_join(id);
            return id;
        }
        for (home, mut users) in by_home {
            users.sort_unstable();
            users.dedup();
            self.route(
                home,
                ShardMsg::InboxJoin {
                    reply_to: self.id,
                    join: id,
                    conv,
                    users,
                },
            );
        }
        id
    }

    /// Owner: every home answered join `id`: what waited goes on, or is refused.
    fn finish_join(&mut self, id: u64) {
        let Some(join) = self.joins.remove(&id) else {
            unreachable!("join {id} finished twice");
        };
        match join.what {
            JoinFor::Direct { conv, waiting } => {
                self.direct_joins.remove(&conv);
                if let Some(code) = join.failed {
                    for msg in waiting {
                        self.refuse_waiting(msg, code);
                    }
                    return;
                }
                // A conversation with no message that left memory meanwhile is new again.
                let created = !self.convs.contains_key(&conv);
                self.convs
                    .entry(conv)
                    .or_insert_with(|| Conversation::new(conv, Vec::new()))
                    .joined = true;
                self.touch(conv);
                for msg in waiting {
                    self.on_shard_msg(msg);
                }
                if created {
                    self.evict_idle(EVICT_ATTEMPTS);
                }
            }
            JoinFor::Command {
                command,
                reply_to,
                token,
            } => {
                self.command_joining = false;
                match join.failed {
                    Some(code) => {
                        let error = if code == ErrorCode::InboxFull {
                            CommandError::BadMembers(
                                "a member's inbox holds the most conversations it may".into(),
                            )
                        } else {
                            CommandError::StorageFailed
                        };
                        self.route(
                            reply_to,
                            ShardMsg::CommandDone {
                                token,
                                result: Err(error),
                            },
                        );
                    }
                    None => self.commit_command(command, reply_to, token),
                }
                while !self.command_joining {
                    let Some((command, reply_to, token)) = self.commands_waiting.pop_front() else {
                        break;
                    };
                    self.on_command(command, reply_to, token);
                }
            }
        }
    }

    /// Home: puts `conv` in the inboxes of `users`, durably, then answers the owner.
    fn on_inbox_join(&mut self, reply_to: ShardId, join: u64, conv: ConvId, users: Vec<UserId>) {
        let answer = |result| ShardMsg::InboxJoined { join, result };
        let new: Vec<UserId> = users
            .into_iter()
            .filter(|&u| u.0 != 0 && !self.inbox.contains(u, conv))
            .collect();
        let full = new
            .iter()
            .any(|&u| self.inbox.len_of(u) >= self.limits.inbox_entries_per_user_max);
        if full {
            self.route(reply_to, answer(Err(ErrorCode::InboxFull)));
            return;
        }
        if new.is_empty() {
            self.route(reply_to, answer(Ok(())));
            return;
        }
        #[cfg(feature = "planted-bugs")]
        if self.inbox_not_durable {
            for &user in &new {
                self.inbox.join(user, conv);
            }
            self.route(reply_to, answer(Ok(())));
            return;
        }
        let record = Record::InboxJoined {
            conv,
            users: new.clone(),
        };
        encode_record(&record, &mut self.append_buf);
        let lsn = self.batch_lsn();
        self.pending.push_back((
            lsn,
            Pending::InboxJoin {
                conv,
                users: new,
                reply: (reply_to, join),
            },
        ));
    }

    /// Owner: `members` were removed from `group`: their homes take it out of their
    /// inboxes.
    fn leave_inboxes(&mut self, group: ConvId, members: &[UserId]) {
        let mut by_home: BTreeMap<ShardId, Vec<UserId>> = BTreeMap::new();
        for &user in members {
            by_home
                .entry(Shard::home_of(user, self.shard_count))
                .or_default()
                .push(user);
        }
        for (home, mut users) in by_home {
            users.sort_unstable();
            users.dedup();
            self.route(home, ShardMsg::InboxLeave { conv: group, users });
        }
    }

    /// Home: a page of `user`'s inbox for `to`; each conversation's owner is asked for its
    /// head, and the page goes out when all have answered ([`Shard::on_head`]).
    fn on_list_inbox(
        &mut self,
        to: ConnRef,
        user: UserId,
        req: u32,
        after: Option<ConvId>,
        limit: u32,
    ) {
        let limit = if limit == 0 {
            self.limits.inbox_page_max
        } else {
            limit.min(self.limits.inbox_page_max)
        };
        let (page, more) = self.inbox.page(user, after, limit as usize);
        if page.is_empty() {
            let result = Ok((Vec::new(), more));
            self.route(to.shard, ShardMsg::InboxListed { to, req, result });
            return;
        }
        if self.listings.len() >= self.limits.inbox_listings_max {
            let result = Err(ErrorCode::RateLimited);
            self.route(to.shard, ShardMsg::InboxListed { to, req, result });
            return;
        }
        let listing = self.next_listing;
        self.next_listing += 1;
        let convs: Vec<ConvId> = page.iter().map(|&(c, _)| c).collect();
        self.listings.insert(
            listing,
            Listing {
                to,
                req,
                missing: page.len(),
                items: page.into_iter().map(|(c, read)| (c, read, None)).collect(),
                more,
                failed: None,
            },
        );
        for conv in convs {
            let owner = Shard::owner_of(conv, self.shard_count);
            self.route(
                owner,
                ShardMsg::Head {
                    reply_to: self.id,
                    listing,
                    user,
                    conv,
                },
            );
        }
    }

    /// Home: an owner answered for one conversation of a listing.
    fn on_head(
        &mut self,
        listing: u64,
        conv: ConvId,
        result: Result<Option<(Seq, u64)>, ErrorCode>,
    ) {
        let Some(l) = self.listings.get_mut(&listing) else {
            unreachable!("an owner answered listing {listing} unasked");
        };
        match result {
            Ok(head) => {
                let item = l.items.iter_mut().find(|i| i.0 == conv && i.2.is_none());
                let Some(item) = item else {
                    unreachable!("an owner answered {conv} twice for listing {listing}");
                };
                item.2 = Some(head);
            }
            Err(code) => {
                l.failed.get_or_insert(code);
            }
        }
        l.missing -= 1;
        if l.missing > 0 {
            return;
        }
        let Some(l) = self.listings.remove(&listing) else {
            unreachable!("the listing is there");
        };
        let result = match l.failed {
            Some(code) => Err(code),
            None => Ok((
                l.items
                    .into_iter()
                    .filter_map(|(conv, read, head)| {
                        let (latest, ts) = head.flatten()?;
                        let read = read.min(latest);
                        Some(meta::InboxEntry {
                            conv,
                            latest_seq: latest,
                            latest_ts_ms: ts,
                            read_seq: read,
                            unread: latest.0 - read.0,
                        })
                    })
                    .collect(),
                l.more,
            )),
        };
        let (to, req) = (l.to, l.req);
        self.route(to.shard, ShardMsg::InboxListed { to, req, result });
    }

    /// Holds a Send or replay for a direct conversation that may have left memory until
    /// the log says where it is (`Effect::Load`); returns the message when it can go on.
    fn wait_for_load(&mut self, msg: ShardMsg) -> Option<ShardMsg> {
        let (conv, user) = match &msg {
            ShardMsg::Submit {
                bound: true,
                conv,
                sender,
                ..
            } => (*conv, *sender),
            ShardMsg::Replay { conv, user, .. } | ShardMsg::Head { conv, user, .. } => {
                (*conv, *user)
            }
            _ => return Some(msg),
        };
        let member = matches!(conv.kind(), Some(ConvKind::Direct(a, b)) if user == a || user == b);
        if !member || self.convs.contains_key(&conv) {
            // Groups never leave memory, and a non-member is refused without a load.
            return Some(msg);
        }
        if let Some(waiting) = self.loading.get_mut(&conv) {
            if waiting.len() < self.limits.load_waiters_max {
                waiting.push(msg);
            } else {
                self.refuse_waiting(msg, ErrorCode::RateLimited);
            }
            return None;
        }
        if self.stats.conversations_evicted == 0 && !self.recovered_from_checkpoint {
            // Nothing ever left memory and recovery read the whole log: a conversation not
            // here is new.
            return Some(msg);
        }
        if self.loading.len() >= self.limits.loads_inflight_max {
            self.refuse_waiting(msg, ErrorCode::RateLimited);
            return None;
        }
        self.loading.insert(conv, vec![msg]);
        self.effects.push_back(Effect::Load { conv });
        None
    }

    /// The sender's home: a client_msg_id names one message, so the same id for another
    /// conversation is refused here, where every Send of the sender passes, whichever
    /// shards own the two conversations (I2). Otherwise the id is bound to the
    /// conversation and the Send goes on to its owner.
    fn on_submit_at_home(&mut self, mut msg: ShardMsg) {
        let ShardMsg::Submit {
            bound,
            from,
            req,
            sender,
            client_msg_id,
            conv,
            ..
        } = &mut msg
        else {
            unreachable!("only a Submit is bound at the home");
        };
        let key = (*sender, *client_msg_id);
        match self.bindings.get(&key) {
            Some(named) if named != *conv => {
                let nack = ShardMsg::Nacked {
                    to: *from,
                    req: *req,
                    client_msg_id: *client_msg_id,
                    conv: *conv,
                    code: ErrorCode::ClientMsgIdReused,
                    message: "this client_msg_id was used for another conversation",
                };
                self.route(from.shard, nack);
                return;
            }
            Some(_) => {}
            None => self.bindings.insert(key, *conv),
        }
        *bound = true;
        let owner = Shard::owner_of(*conv, self.shard_count);
        self.route(owner, msg);
    }

    /// Answers a Send or replay that cannot wait for its conversation to load.
    fn refuse_waiting(&mut self, msg: ShardMsg, code: ErrorCode) {
        match msg {
            ShardMsg::Submit {
                from,
                req,
                client_msg_id,
                conv,
                ..
            } => self.route(
                from.shard,
                ShardMsg::Nacked {
                    to: from,
                    req,
                    client_msg_id,
                    conv,
                    code,
                    message: match code {
                        ErrorCode::InboxFull => {
                            "a member's inbox holds the most conversations it may"
                        }
                        ErrorCode::StorageFailed => {
                            "the conversation could not be made durable now; retry"
                        }
                        _ => "the conversation could not be loaded now; retry",
                    },
                },
            ),
            ShardMsg::Replay {
                to, conv, purpose, ..
            } => self.route(
                to.shard,
                ShardMsg::Replayed {
                    to,
                    conv,
                    purpose,
                    result: Err(code),
                },
            ),
            ShardMsg::Head {
                reply_to,
                listing,
                conv,
                ..
            } => self.route(
                reply_to,
                ShardMsg::HeadIs {
                    listing,
                    conv,
                    result: Err(code),
                },
            ),
            other => unreachable!("only Submit, Replay and Head wait, not {other:?}"),
        }
    }

    /// The driver found the last durable seq of `conv` for an [`Effect::Load`] (`Err` if
    /// it could not read the log: what waited is refused `StorageFailed`).
    pub fn handle_loaded(&mut self, now: Instant, conv: ConvId, result: Result<Seq, ()>) {
        self.now = now;
        if let Some(waiting) = self.loading.remove(&conv) {
            match result {
                Ok(last) => {
                    assert!(
                        !self.convs.contains_key(&conv),
                        "a loading conversation is absent"
                    );
                    self.convs.insert(conv, Conversation::reloaded(conv, last));
                    self.touch(conv);
                    self.stats.conversations_loaded += 1;
                    for msg in waiting {
                        self.on_shard_msg(msg);
                    }
                    self.evict_idle(EVICT_ATTEMPTS);
                }
                Err(()) => {
                    for msg in waiting {
                        self.refuse_waiting(msg, ErrorCode::StorageFailed);
                    }
                }
            }
        }
        self.finish();
    }

    /// Marks `id` as just used.
    fn touch(&mut self, id: ConvId) {
        self.clock += 1;
        let Some(c) = self.convs.get_mut(&id) else {
            return;
        };
        c.touched = self.clock;
        self.lru.push_back((self.clock, id));
        if self.lru.len() > 2 * self.convs.len() + 1024 {
            let convs = &self.convs;
            self.lru
                .retain(|(t, id)| convs.get(id).is_some_and(|c| c.touched == *t));
        }
    }

    /// While over `conversations_max`, the least recently used conversation leaves memory
    /// if it is idle (see [`Conversation::is_evictable`]), or goes to the back of the line.
    /// Looks at no more than `attempts` live candidates, so that one input does bounded
    /// work; conversations in use can hold the count over the bound by as many as they are.
    fn evict_idle(&mut self, attempts: usize) {
        let mut looked = 0;
        while self.convs.len() > self.limits.conversations_max && looked < attempts {
            let Some((t, id)) = self.lru.pop_front() else {
                break;
            };
            let Some(c) = self.convs.get(&id).filter(|c| c.touched == t) else {
                continue;
            };
            looked += 1;
            if c.is_evictable() {
                let (messages, bytes) = c.hot_size();
                self.hot_count -= messages;
                self.hot_bytes -= bytes;
                self.convs.remove(&id);
                self.stats.conversations_evicted += 1;
            } else {
                self.touch(id);
            }
        }
    }

    /// Queues the Ack or Nack of a Send on its connection, if it is still open, and frees
    /// its in-flight slot. Returns whether the connection was there.
    fn answer_send(&mut self, id: ConnId, answer: &Meta) -> bool {
        let Some(c) = self.conn_mut(id) else {
            return false;
        };
        c.inflight_sends = c.inflight_sends.saturating_sub(1);
        self.push(id, answer, Bytes::new());
        true
    }

    /// The members of a conversation this shard owns: stored for groups and for direct
    /// conversations with messages, derived from the id for other direct ones.
    fn members_of(&self, conv: ConvId) -> Option<Arc<[UserId]>> {
        match (self.convs.get(&conv), conv.kind()) {
            (Some(c), _) => Some(c.members.clone()),
            (None, Some(ConvKind::Direct(..))) => Some(Conversation::new(conv, Vec::new()).members),
            _ => None,
        }
    }

    /// Authenticated connections on this shard of any of `members`.
    fn local_sessions(&self, members: &[UserId]) -> Vec<ConnId> {
        let mut out = Vec::new();
        if self.local.len() < members.len() {
            for (user, sessions) in &self.local {
                if members.binary_search(user).is_ok() {
                    out.extend(sessions.iter().map(|&(_, c)| c));
                }
            }
            // `local` is a hash map: restore a deterministic order.
            out.sort_unstable();
        } else {
            for user in members {
                if let Some(sessions) = self.local.get(user) {
                    out.extend(sessions.iter().map(|&(_, c)| c));
                }
            }
        }
        out
    }

    fn on_login(&mut self, user: UserId, device: DeviceId, conn: ConnRef, at: Instant) {
        // The newest login wins; a login older than the registered one (a delayed message)
        // is the one that gets kicked. At equal times the later arrival wins.
        let key = (user, device);
        match self.homes.get(&key).copied() {
            Some((old, _)) if old == conn => {}
            Some((_, old_at)) if old_at > at => {
                self.route(
                    conn.shard,
                    ShardMsg::Kick {
                        conn,
                        code: ErrorCode::SessionTakenOver,
                    },
                );
            }
            Some((old, _)) => {
                self.homes.insert(key, (conn, at));
                self.route(
                    old.shard,
                    ShardMsg::Kick {
                        conn: old,
                        code: ErrorCode::SessionTakenOver,
                    },
                );
            }
            None if self.devices.get(&user).copied().unwrap_or(0)
                >= self.limits.devices_per_user_max =>
            {
                self.route(
                    conn.shard,
                    ShardMsg::Kick {
                        conn,
                        code: ErrorCode::TooManyDevices,
                    },
                );
            }
            None => {
                self.homes.insert(key, (conn, at));
                self.count_device(user, true);
            }
        }
    }

    /// Keeps `devices` equal to the number of `homes` entries per user.
    fn count_device(&mut self, user: UserId, added: bool) {
        let n = self.devices.entry(user).or_insert(0);
        if added {
            *n += 1;
        } else {
            assert!(*n > 0, "a device left that was never counted");
            *n -= 1;
            if *n == 0 {
                self.devices.remove(&user);
            }
        }
    }

    // ---------------------------------------------------------------------------------
    // Owner: sequencing, durability, fan-out, replay
    // ---------------------------------------------------------------------------------

    fn on_submit(&mut self, from: ConnRef, req: u32, mut msg: StoredMessage) {
        let key = (msg.sender, msg.client_msg_id);
        #[cfg(feature = "planted-bugs")]
        let seen = self.dedupe.get(&key).filter(|_| !self.dedupe_off);
        #[cfg(not(feature = "planted-bugs"))]
        let seen = self.dedupe.get(&key);
        if let Some(seen) = seen.filter(|s| s.conv != msg.conv) {
            // A client_msg_id names one message: the same id for another conversation is
            // a client bug, not a retry.
            let _ = seen;
            self.route(
                from.shard,
                ShardMsg::Nacked {
                    to: from,
                    req,
                    client_msg_id: msg.client_msg_id,
                    conv: msg.conv,
                    code: ErrorCode::ClientMsgIdReused,
                    message: "this client_msg_id was used for another conversation",
                },
            );
            return;
        }
        if let Some(seen) = seen {
            if seen.durable {
                self.route(
                    from.shard,
                    ShardMsg::Acked {
                        to: from,
                        req,
                        client_msg_id: msg.client_msg_id,
                        conv: seen.conv,
                        seq: seen.seq,
                    },
                );
            } else {
                // Still on its way to disk: answer when it gets there.
                let waiting = self.pending.iter_mut().rev().find_map(|(_, p)| match p {
                    Pending::Message { msg: m, waiters }
                        if m.conv == seen.conv && m.seq == seen.seq =>
                    {
                        Some(waiters)
                    }
                    _ => None,
                });
                match waiting {
                    Some(waiters) => waiters.push((from, req)),
                    None => unreachable!("a pending dedupe entry has a pending append"),
                }
            }
            return;
        }
        let nacked = |code, message| ShardMsg::Nacked {
            to: from,
            req,
            client_msg_id: msg.client_msg_id,
            conv: msg.conv,
            code,
            message,
        };
        // Membership first: a direct conversation's follows from its id, so a non-member
        // creates no state.
        let member = match (self.convs.get(&msg.conv), msg.conv.kind()) {
            (Some(c), _) => c.is_member(msg.sender),
            (None, Some(ConvKind::Direct(a, b))) => msg.sender == a || msg.sender == b,
            (None, _) => false,
        };
        if !member {
            let m = nacked(ErrorCode::NotMember, "not a member of this conversation");
            self.route(from.shard, m);
            return;
        }
        let created = !self.convs.contains_key(&msg.conv);
        let conv = self
            .convs
            .entry(msg.conv)
            .or_insert_with(|| Conversation::new(msg.conv, Vec::new()));
        assert!(
            conv.durable_seq <= conv.last_seq,
            "{}: durable seq {} past the last handed out {}",
            msg.conv,
            conv.durable_seq,
            conv.last_seq
        );
        msg.seq = conv.last_seq.next();
        conv.last_seq = msg.seq;
        self.clock_ms = self.clock_ms.max(self.wall_ms);
        msg.ts_ms = self.clock_ms;
        self.touch(msg.conv);
        if created {
            self.evict_idle(EVICT_ATTEMPTS);
        }
        encode_record(&Record::Message(msg.clone()), &mut self.append_buf);
        self.dedupe.insert(
            key,
            Sequenced {
                conv: msg.conv,
                seq: msg.seq,
                durable: false,
            },
        );
        let lsn = self.batch_lsn();
        self.pending.push_back((
            lsn,
            Pending::Message {
                msg,
                waiters: vec![(from, req)],
            },
        ));
    }

    fn push_hot(&mut self, msg: StoredMessage) {
        let Some(conv) = self.convs.get_mut(&msg.conv) else {
            return;
        };
        let (id, seq, bytes) = (msg.conv, msg.seq, msg.payload.len());
        if let Some(dropped) = conv.push_hot(msg, self.limits.hot_messages_per_conv) {
            self.hot_bytes -= dropped;
            self.hot_count -= 1;
        }
        self.hot_bytes += bytes;
        self.hot_count += 1;
        self.hot_order.push_back((id, seq));
        // The shard-wide budget evicts in append order; entries already dropped by the
        // per-conversation bound are skipped.
        while self.hot_bytes > self.limits.hot_bytes_per_shard
            || self.hot_count > self.limits.hot_messages_per_shard
        {
            let Some((c, s)) = self.hot_order.pop_front() else {
                break;
            };
            if let Some(dropped) = self.convs.get_mut(&c).and_then(|c| c.evict_hot(s)) {
                self.hot_bytes -= dropped;
                self.hot_count -= 1;
            }
        }
        // Entries of messages the per-conversation bound dropped are stale; compact them
        // away once they outnumber the live ones, so the queue stays within twice the
        // hot tier (amortised O(1) per message).
        if self.hot_order.len() > 2 * self.hot_count + 1024 {
            let convs = &self.convs;
            self.hot_order
                .retain(|(c, s)| convs.get(c).is_some_and(|c| *s >= c.hot_from()));
        }
    }

    fn fan_out(&mut self, conv_id: ConvId, msgs: Vec<StoredMessage>) {
        let Some(conv) = self.convs.get(&conv_id) else {
            return;
        };
        let members = conv.members.clone();
        let latest = conv.durable_seq;
        let read_diffusion = matches!(conv_id.kind(), Some(ConvKind::Group(_)))
            && members.len() > self.limits.read_diffusion_threshold;
        if read_diffusion {
            // Members pull at their own pace; high-priority messages still go out, as a
            // separate push that connections do not hold to seq order.
            self.broadcast(ShardMsg::Notify {
                conv: conv_id,
                members: members.clone(),
                latest,
            });
            let urgent: Vec<_> = msgs.into_iter().filter(|m| m.high_priority).collect();
            if !urgent.is_empty() {
                self.broadcast(ShardMsg::Deliver {
                    conv: conv_id,
                    members,
                    msgs: urgent.into(),
                    sparse: true,
                });
            }
            return;
        }
        self.broadcast(ShardMsg::Deliver {
            conv: conv_id,
            members,
            msgs: msgs.into(),
            sparse: false,
        });
    }

    /// Answers a Replay from the hot tier, or asks the driver for the older part first.
    fn on_replay(
        &mut self,
        to: ConnRef,
        user: UserId,
        conv_id: ConvId,
        from: Seq,
        limit: u32,
        purpose: ReplayPurpose,
    ) {
        let member = match (self.convs.get(&conv_id), conv_id.kind()) {
            (Some(c), _) => c.is_member(user),
            (None, Some(ConvKind::Direct(a, b))) => user == a || user == b,
            (None, _) => false,
        };
        if !member {
            self.answer_replay(to, conv_id, purpose, Err(ErrorCode::NotMember));
            return;
        }
        self.touch(conv_id);
        let from = from.max(Seq(1));
        // A conversation not in memory here is new (a direct one that left memory was
        // loaded back before this): all of it is "hot".
        let hot_from = self.convs.get(&conv_id).map_or(Seq(1), |c| c.hot_from());
        if from >= hot_from {
            // All of it is hot; the log holds everything older, which was not asked for.
            let batch = self.hot_batch(conv_id, from, limit, Vec::new(), Seq(1));
            self.answer_replay(to, conv_id, purpose, Ok(batch));
            return;
        }
        // Older than the hot tier: read it from the log, then continue from memory. The
        // conversation stays in memory until then.
        if let Some(c) = self.convs.get_mut(&conv_id) {
            c.pinned += 1;
        }
        let pending = PendingFetch {
            to,
            conv: conv_id,
            from,
            limit,
            purpose,
            last: Seq::ZERO,
        };
        if self.fetches.len() < self.limits.fetches_inflight_max {
            self.start_fetch(pending);
        } else if self.fetch_queue.len() < self.fetch_queue_max() {
            // Waits its turn: history the log holds is never reported gone for want of a
            // read slot.
            self.fetch_queue.push_back(pending);
        } else {
            self.unpin(conv_id);
            self.answer_replay(to, conv_id, purpose, Err(ErrorCode::RateLimited));
        }
    }

    /// The bound of `fetch_queue`: one replay page per connection of the gateway, each of
    /// which has at most one in flight. Only the page of a connection that closed with it
    /// still queued, when its slot was reused, can go past it; such a Replay is refused
    /// `RateLimited` (its asker, if it is still there, asks again later).
    fn fetch_queue_max(&self) -> usize {
        usize::from(self.shard_count).saturating_mul(self.limits.connections_max)
    }

    /// Asks the driver for the part of `pending` older than the hot tier.
    fn start_fetch(&mut self, mut pending: PendingFetch) {
        assert!(
            self.fetches.len() < self.limits.fetches_inflight_max,
            "a read starts only in a free slot"
        );
        let hot_from = self
            .convs
            .get(&pending.conv)
            .map(|c| c.hot_from())
            .expect("a conversation waiting for a read is pinned in memory");
        // The hot tier only moves up, so what was older than it still is.
        assert!(
            pending.from < hot_from,
            "a read is for history older than the hot tier"
        );
        pending.last = Seq(hot_from.0 - 1);
        let fetch = self.next_fetch;
        self.next_fetch += 1;
        self.fetches.insert(fetch, pending);
        self.effects.push_back(Effect::Fetch {
            fetch,
            conv: pending.conv,
            from: pending.from,
            to: pending.last,
            limit: pending.limit,
        });
    }

    /// Starts the queued reads, oldest first, while there are free slots.
    fn start_queued_fetches(&mut self) {
        while self.fetches.len() < self.limits.fetches_inflight_max {
            let Some(pending) = self.fetch_queue.pop_front() else {
                break;
            };
            self.start_fetch(pending);
        }
    }

    fn unpin(&mut self, conv: ConvId) {
        if let Some(c) = self.convs.get_mut(&conv) {
            assert!(c.pinned > 0, "{conv} unpinned more often than pinned");
            c.pinned -= 1;
        }
    }

    fn answer_replay(
        &mut self,
        to: ConnRef,
        conv: ConvId,
        purpose: ReplayPurpose,
        result: Result<ReplayBatch, ErrorCode>,
    ) {
        self.route(
            to.shard,
            ShardMsg::Replayed {
                to,
                conv,
                purpose,
                result,
            },
        );
    }

    /// `older` (read from the log, contiguous) followed by hot messages, up to `limit`.
    /// `available_from` is the lowest seq still held when `older` is empty.
    fn hot_batch(
        &self,
        conv_id: ConvId,
        from: Seq,
        limit: u32,
        older: Vec<StoredMessage>,
        available_from: Seq,
    ) -> ReplayBatch {
        let Some(conv) = self.convs.get(&conv_id) else {
            return ReplayBatch {
                msgs: Vec::new(),
                latest: Seq::ZERO,
                available_from: Seq(1),
            };
        };
        let available_from = older.first().map_or(available_from, |first| first.seq);
        let next = older
            .last()
            .map_or(from.max(available_from), |m| m.seq.next());
        let room = (limit as usize).saturating_sub(older.len());
        let mut msgs = older;
        // Only continue from memory if the log part reached the hot tier without a hole.
        if next >= conv.hot_from() {
            msgs.extend(conv.hot_range(next, room).cloned());
        }
        // One page: at most `replay_page_bytes` of payload, but always one message, so
        // that any message can be replayed; the asker comes back for the rest.
        let mut bytes = 0usize;
        let keep = msgs
            .iter()
            .position(|m| {
                bytes += m.payload.len();
                bytes > self.limits.replay_page_bytes
            })
            .map_or(msgs.len(), |over| over.max(1));
        msgs.truncate(keep);
        ReplayBatch {
            msgs,
            latest: conv.durable_seq,
            available_from,
        }
    }

    /// The driver read the log for an [`Effect::Fetch`]: `Ok` with the messages the log
    /// holds (see [`Effect::Fetch`] for what they must be), or `Err` if the read failed
    /// even after retrying. A failure is never taken as history gone: the Replay is
    /// answered `StorageFailed` (a Pull fails, a Sync or catch-up asks again later).
    pub fn handle_fetched(
        &mut self,
        now: Instant,
        fetch: u64,
        result: Result<Vec<StoredMessage>, ()>,
    ) {
        self.now = now;
        if let Some(p) = self.fetches.remove(&fetch) {
            match result {
                Ok(msgs) => self.serve_fetched(p, msgs),
                Err(()) => {
                    self.unpin(p.conv);
                    self.answer_replay(p.to, p.conv, p.purpose, Err(ErrorCode::StorageFailed));
                }
            }
            self.start_queued_fetches();
        }
        self.finish();
    }

    /// Answers a Replay with what the log returned followed by the hot tier.
    fn serve_fetched(&mut self, p: PendingFetch, msgs: Vec<StoredMessage>) {
        if let Some(first) = msgs.first() {
            assert!(
                first.conv == p.conv && (p.from..=p.last).contains(&first.seq),
                "the driver answered a read of {} {}..={} with {} {}",
                p.conv,
                p.from,
                p.last,
                first.conv,
                first.seq
            );
        }
        // A consecutive run from the first seq the log still holds.
        let mut expect = msgs.first().map_or(p.from, |m| m.seq);
        let older: Vec<_> = msgs
            .into_iter()
            .take(p.limit as usize)
            .take_while(|m| {
                let ok = m.conv == p.conv && m.seq == expect && m.seq <= p.last;
                expect = expect.next();
                ok
            })
            .collect();
        let gone_to = p.last.next();
        let hot_from = self.convs.get(&p.conv).map_or(gone_to, |c| c.hot_from());
        if older.is_empty() && gone_to < hot_from {
            // All of `from..=last` is gone, but the hot tier moved up meanwhile: the log
            // holds what lies between. Read on from there, in the slot just freed.
            self.start_fetch(PendingFetch { from: gone_to, ..p });
            return;
        }
        self.unpin(p.conv);
        // With nothing read, everything before the hot tier (as it was asked) is gone.
        let batch = self.hot_batch(p.conv, p.from, p.limit, older, gone_to);
        self.answer_replay(p.to, p.conv, p.purpose, Ok(batch));
    }

    fn on_replayed(
        &mut self,
        id: ConnId,
        conv: ConvId,
        purpose: ReplayPurpose,
        result: Result<ReplayBatch, ErrorCode>,
    ) {
        let Some(c) = self.conn_mut(id) else {
            return;
        };
        // One page in flight per connection, for its front ask: this is its answer.
        let ask = c.replays.front().copied();
        assert!(
            c.replay_inflight && ask.is_some_and(|a| a.conv == conv && a.purpose == purpose),
            "a replay page answers the connection's front ask"
        );
        c.replay_inflight = false;
        let Some(mut ask) = ask else {
            return;
        };
        match (purpose, result) {
            (ReplayPurpose::Pull { req }, Ok(batch)) => {
                for m in &batch.msgs {
                    // History asked for is sent as asked; it also moves the push cursor
                    // when it continues it.
                    if let Some(c) = self.conn_mut(id) {
                        if let Some(cursor) = c.convs.get_mut(&conv) {
                            if m.seq == cursor.sent.next() {
                                cursor.sent = m.seq;
                            }
                        }
                    }
                    self.push_deliver(id, m);
                }
                ask.available_from.get_or_insert(batch.available_from);
                if let (Some(f), Some(l)) = (batch.msgs.first(), batch.msgs.last()) {
                    if ask.first == Seq::ZERO {
                        ask.first = f.seq;
                    }
                    ask.last = l.seq;
                    ask.from = l.seq.next();
                }
                let sent = u32::try_from(batch.msgs.len()).unwrap_or(u32::MAX);
                ask.remaining = ask.remaining.saturating_sub(sent);
                let done = sent == 0 || ask.remaining == 0 || ask.last >= batch.latest;
                if done {
                    let available_from = ask.available_from.unwrap_or(Seq(1));
                    let result = Meta::PullResult(meta::PullResult {
                        req,
                        conv,
                        from_seq: ask.first,
                        to_seq: ask.last,
                        latest_seq: batch.latest,
                        available_from: if available_from > Seq(1) {
                            available_from
                        } else {
                            Seq::ZERO
                        },
                    });
                    self.push(id, &result, Bytes::new());
                }
                self.end_page(id, ask, done);
            }
            (ReplayPurpose::Pull { req }, Err(code)) => {
                // Whatever went out before stays; the request fails and may be repeated.
                let e = error_meta(code, replay_refusal(code), req);
                self.push(id, &e, Bytes::new());
                self.end_page(id, ask, true);
            }
            (ReplayPurpose::Sync { .. } | ReplayPurpose::CatchUp, Ok(batch)) => {
                let cursors_max = self.limits.cursors_per_conn_max;
                let Some(c) = self.conn_mut(id) else {
                    return;
                };
                let cursor = c.cursor(conv, cursors_max);
                let mut refused = None;
                if ask.available_from.is_none() && cursor.sent > batch.latest {
                    // The device claims seqs that do not exist: resume from the latest
                    // rather than mute the conversation, and say so.
                    refused = Some(CursorRefusal {
                        conv,
                        latest_seq: batch.latest,
                        code: ErrorCode::CursorAhead,
                    });
                    cursor.sent = batch.latest;
                }
                ask.available_from.get_or_insert(batch.available_from);
                let mut gap = None;
                if batch.available_from > cursor.sent.next() {
                    gap = Some(meta::Gap {
                        conv,
                        from_seq: cursor.sent.next(),
                        to_seq: Seq(batch.available_from.0 - 1),
                    });
                    cursor.sent = Seq(batch.available_from.0 - 1);
                }
                let to_send: Vec<_> = batch
                    .msgs
                    .iter()
                    .filter(|m| cursor.admit(m.seq) == Admit::Send)
                    .cloned()
                    .collect();
                let paged = u32::try_from(batch.msgs.len()).unwrap_or(u32::MAX);
                ask.remaining = ask.remaining.saturating_sub(paged);
                let done = paged == 0 || ask.remaining == 0 || cursor.sent >= batch.latest;
                let mut more = None;
                if done {
                    cursor.catching_up = false;
                    if cursor.sent < batch.latest {
                        more = Some(meta::Cursor {
                            conv,
                            seq: cursor.sent,
                        });
                    }
                }
                if let Some(progress) = c
                    .sync
                    .as_mut()
                    .filter(|p| ReplayPurpose::Sync { req: p.req } == purpose)
                {
                    progress.gaps.extend(gap);
                    progress.refused.extend(refused);
                    progress.more.extend(more);
                }
                for m in &to_send {
                    self.push_deliver(id, m);
                }
                if let (ReplayPurpose::CatchUp, Some(_)) = (purpose, more) {
                    self.queue_notify(id, conv, batch.latest);
                }
                self.end_page(id, ask, done);
            }
            (ReplayPurpose::Sync { .. } | ReplayPurpose::CatchUp, Err(code)) => {
                self.replay_refused(id, conv, ask, code);
            }
        }
    }

    /// A page of a Sync or catch-up was refused. For a reason that passes (the log could
    /// not be read, `StorageFailed`, or not now, `RateLimited`) the push cursor stays where
    /// it is, so nothing it did not get is skipped: a catch-up asks again after
    /// [`REPLAY_RETRY`] (the connection's other asks go first meanwhile); a Sync reports
    /// the cursor in SyncDone.refused with the code (its reply is not held up) and the
    /// connection then catches that cursor up by itself, like a gap in the live stream.
    /// Otherwise (`NotMember`) the cursor is dropped.
    fn replay_refused(&mut self, id: ConnId, conv: ConvId, ask: ReplayAsk, code: ErrorCode) {
        let transient = matches!(code, ErrorCode::StorageFailed | ErrorCode::RateLimited);
        let (now, cursors_max) = (self.now, self.limits.cursors_per_conn_max);
        let remaining = self.limits.sync_batch_per_conv;
        let Some(c) = self.conn_mut(id) else {
            return;
        };
        if transient && ask.purpose == ReplayPurpose::CatchUp {
            // To the back, to be asked for again from the cursor once the time comes.
            c.replays.pop_front();
            c.replays.push_back(ReplayAsk {
                retry_at: Some(now + REPLAY_RETRY),
                ..ask
            });
            self.pump_replays(id);
            return;
        }
        if let Some(progress) = c
            .sync
            .as_mut()
            .filter(|p| ReplayPurpose::Sync { req: p.req } == ask.purpose)
        {
            progress.refused.push(CursorRefusal {
                conv,
                latest_seq: Seq::ZERO,
                code,
            });
        }
        if transient {
            c.cursor(conv, cursors_max).catching_up = true;
            c.replays.push_back(ReplayAsk {
                conv,
                from: Seq::ZERO,
                remaining,
                purpose: ReplayPurpose::CatchUp,
                first: Seq::ZERO,
                last: Seq::ZERO,
                available_from: None,
                retry_at: None,
            });
        } else {
            c.convs.remove(&conv);
        }
        self.end_page(id, ask, true);
    }

    /// After a page: the front ask goes on with `ask` or, when `done`, leaves the queue
    /// (a Sync's SyncDone goes out with its last one); then the next page may be asked for.
    fn end_page(&mut self, id: ConnId, ask: ReplayAsk, done: bool) {
        let Some(c) = self.conn_mut(id) else {
            return;
        };
        if !done {
            if let Some(front) = c.replays.front_mut() {
                *front = ask;
            }
            self.pump_replays(id);
            return;
        }
        c.replays.pop_front();
        if let ReplayPurpose::Sync { req } = ask.purpose {
            if let Some(progress) = c.sync.as_mut().filter(|p| p.req == req) {
                progress.awaiting -= 1;
                if progress.awaiting == 0 {
                    self.finish_sync(id);
                }
            }
        }
        self.pump_replays(id);
    }

    fn push_deliver(&mut self, id: ConnId, m: &StoredMessage) {
        self.stats.deliveries += 1;
        let deliver = Meta::Deliver(meta::Deliver {
            conv: m.conv,
            seq: m.seq,
            sender: m.sender,
            sender_device: m.sender_device,
            client_msg_id: m.client_msg_id,
            priority: if m.high_priority {
                Priority::High
            } else {
                Priority::Normal
            },
            ts_ms: m.ts_ms,
        });
        self.push(id, &deliver, m.payload.clone());
    }

    /// Pushes durable messages of one conversation to one connection through its cursor.
    fn push_messages(&mut self, id: ConnId, conv: ConvId, msgs: &[StoredMessage], sparse: bool) {
        let Some(last) = msgs.last() else {
            return;
        };
        if self.is_degraded(id) && !sparse {
            // Degraded: the push turns into a Notify; the client pulls at its own pace.
            self.queue_notify(id, conv, last.seq);
            return;
        }
        let cursors_max = self.limits.cursors_per_conn_max;
        let newest_page = u64::from(self.limits.newest_page);
        let Some(c) = self.conn_mut(id) else {
            return;
        };
        if sparse {
            for m in msgs {
                self.push_deliver(id, m);
            }
            return;
        }
        let new = !c.convs.contains_key(&conv);
        let cursor: &mut ConvCursor = c.cursor(conv, cursors_max);
        if new {
            // A conversation new to the device (not in its Sync): it gets the latest
            // page, and Pulls older history backwards if it wants it.
            cursor.sent = Seq(msgs[0].seq.0.saturating_sub(newest_page));
        }
        let mut to_send = Vec::new();
        let mut request = None;
        for m in msgs {
            match cursor.admit(m.seq) {
                Admit::Send => to_send.push(m),
                Admit::Duplicate => {}
                Admit::Gap { request_from } => request = request.or(request_from),
            }
        }
        let user = c.identity().map(|(u, _)| u);
        for m in to_send {
            self.push_deliver(id, m);
        }
        if let (Some(from), Some(_)) = (request, user) {
            let limit = self.limits.sync_batch_per_conv;
            if let Some(c) = self.conn_mut(id) {
                c.replays.push_back(ReplayAsk {
                    conv,
                    from,
                    remaining: limit,
                    purpose: ReplayPurpose::CatchUp,
                    first: Seq::ZERO,
                    last: Seq::ZERO,
                    available_from: None,
                    retry_at: None,
                });
            }
            self.pump_replays(id);
        }
    }

    fn queue_notify(&mut self, id: ConnId, conv: ConvId, latest: Seq) {
        let Some(c) = self.conn_mut(id) else {
            return;
        };
        let e = c.notifies.entry(conv).or_default();
        *e = (*e).max(latest);
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(id);
        }
    }

    fn queue_signal(&mut self, id: ConnId, signal: &meta::Signal, payload: &Bytes) {
        let max = self.limits.pending_signals_max;
        if self.is_degraded(id) {
            return;
        }
        let Some(c) = self.conn_mut(id) else {
            return;
        };
        if let Some(slot) = c
            .signals
            .iter_mut()
            .find(|(s, _)| s.sender == signal.sender && s.conv == signal.conv)
        {
            *slot = (signal.clone(), payload.clone());
        } else if c.signals.len() < max {
            c.signals.push((signal.clone(), payload.clone()));
        } else {
            return;
        }
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(id);
        }
    }

    // ---------------------------------------------------------------------------------
    // Group commands
    // ---------------------------------------------------------------------------------

    /// A group command at its owner: members it adds join their inboxes first (I9), so
    /// it waits for their homes; commands after one that waits wait behind it.
    fn on_command(&mut self, command: Command, reply_to: ShardId, token: u64) {
        if self.command_joining {
            if self.commands_waiting.len() < self.limits.load_waiters_max {
                self.commands_waiting.push_back((command, reply_to, token));
            } else {
                let error = CommandError::Busy;
                let done = ShardMsg::CommandDone {
                    token,
                    result: Err(error),
                };
                self.route(reply_to, done);
            }
            return;
        }
        if let Err(e) = self.check_command(&command) {
            let done = ShardMsg::CommandDone {
                token,
                result: Err(e),
            };
            self.route(reply_to, done);
            return;
        }
        match &command {
            Command::CreateGroup { group, members } | Command::AddMembers { group, members } => {
                self.command_joining = true;
                let (group, members) = (*group, members.clone());
                self.start_join(
                    group,
                    members,
                    JoinFor::Command {
                        command,
                        reply_to,
                        token,
                    },
                );
            }
            Command::RemoveMembers { .. } => self.commit_command(command, reply_to, token),
        }
    }

    /// Appends a checked command; it takes effect once durable.
    fn commit_command(&mut self, command: Command, reply_to: ShardId, token: u64) {
        match self.check_command(&command) {
            Ok(record) => {
                encode_record(&record, &mut self.append_buf);
                let lsn = self.batch_lsn();
                self.pending.push_back((
                    lsn,
                    Pending::Command {
                        command,
                        reply_to,
                        token,
                    },
                ));
            }
            Err(e) => self.route(
                reply_to,
                ShardMsg::CommandDone {
                    token,
                    result: Err(e),
                },
            ),
        }
    }

    fn check_command(&self, command: &Command) -> Result<Record, CommandError> {
        let group = command.group();
        if !matches!(group.kind(), Some(ConvKind::Group(_))) {
            return Err(CommandError::NotAGroup(group));
        }
        let (members, exists) = match command {
            Command::CreateGroup { members, .. } => (members, false),
            Command::AddMembers { members, .. } | Command::RemoveMembers { members, .. } => {
                (members, true)
            }
        };
        if members.iter().any(|m| m.0 == 0) {
            return Err(CommandError::BadMembers("user 0 is not a user".into()));
        }
        // Commands that are pending count too: a create racing a create is refused.
        let pending_create = self.pending.iter().any(|(_, p)| {
            matches!(p, Pending::Command { command: Command::CreateGroup { group: g, .. }, .. } if *g == group)
        });
        let current = self.convs.get(&group);
        match (exists, current.is_some() || pending_create) {
            (false, true) => return Err(CommandError::AlreadyExists(group)),
            (true, false) => return Err(CommandError::NoSuchGroup(group)),
            _ => {}
        }
        let size_after = match command {
            Command::CreateGroup { members, .. } => members.len(),
            Command::AddMembers { members, .. } => {
                current.map_or(0, |c| c.members.len()) + members.len()
            }
            Command::RemoveMembers { .. } => 0,
        };
        if size_after > self.limits.group_members_max {
            return Err(CommandError::BadMembers(format!(
                "a group holds at most {} members",
                self.limits.group_members_max
            )));
        }
        let members = members.clone();
        Ok(match command {
            Command::CreateGroup { .. } => Record::GroupCreated { group, members },
            Command::AddMembers { .. } => Record::MembersAdded { group, members },
            Command::RemoveMembers { .. } => Record::MembersRemoved { group, members },
        })
    }

    fn apply_command(&mut self, command: &Command) {
        let group = command.group();
        match command {
            Command::CreateGroup { members, .. } => {
                self.convs
                    .insert(group, Conversation::new(group, members.clone()));
                self.touch(group);
            }
            Command::AddMembers { .. } | Command::RemoveMembers { .. } => {
                if let Some(c) = self.convs.get_mut(&group) {
                    let members = members_after(&c.members, command);
                    c.set_members(members);
                }
            }
        }
    }
}

/// A group's members, sorted and without repeats, after `command` changed `current`.
fn members_after(current: &[UserId], command: &Command) -> Vec<UserId> {
    let mut members = match command {
        Command::CreateGroup { members, .. } => members.clone(),
        Command::AddMembers { members, .. } => current.iter().chain(members).copied().collect(),
        Command::RemoveMembers { members, .. } => current
            .iter()
            .copied()
            .filter(|m| !members.contains(m))
            .collect(),
    };
    members.sort_unstable();
    members.dedup();
    members
}

/// The live connection `id` names, if its slot has not been reused since. A free function
/// so that callers can borrow the encoder alongside it.
fn live_conn(slots: &mut [Slot], id: ConnId) -> Option<&mut Connection> {
    slots
        .get_mut(id.index as usize)
        .filter(|s| s.generation == id.generation)
        .and_then(|s| s.conn.as_mut())
}

/// The message of the Error that answers a Pull its owner refused with `code`.
fn replay_refusal(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::StorageFailed => "the conversation's history could not be read; retry",
        ErrorCode::RateLimited => "the conversation's history cannot be read now; retry",
        ErrorCode::NotMember => "not a member of this conversation",
        _ => "cannot pull this conversation",
    }
}

fn error_meta(code: ErrorCode, message: &str, req: u32) -> Meta {
    Meta::Error(meta::Error {
        code,
        message: message.into(),
        req,
    })
}
