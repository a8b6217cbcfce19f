//! The client engine: one device's side of the imgate protocol, sans-I/O.
//!
//! It owns everything a classic IM client keeps per connection and across reconnects: the
//! Auth handshake, request numbers and their deadlines, the outbox of unacked messages (re-sent
//! with the same `client_msg_id` after a reconnect, which I2 dedupe makes safe), pipelined
//! Sends (I8), the per-conversation cursor with its reorder buffer (so the app sees each seq
//! exactly once and in order, I4), gap repair by Sync and Pull, cumulative DeliveryAcks, and
//! heartbeats (I7). `loadgen` drives it over real sockets and `sim` over simulated ones.
//!
//! It leaves to the driver: the socket, the clock, reconnect policy and backoff, persistence
//! of [`Client::cursors`], and what the app does with messages.
//!
//! # Driver contract (quinn-proto style)
//!
//! 1. [`Client::new`] with the cursors persisted by the previous run, then
//!    [`Client::restore_unacked`] for each message of the app's persisted outbox, in send order.
//! 2. Transport up: [`Client::handle_connected`] (queues Auth), with a fresh receive buffer.
//! 3. After every input, that is [`Client::handle_bytes`] (bytes read), [`Client::handle_timeout`]
//!    (the timer set from `poll_timeout` fired) or an app call ([`Client::send`],
//!    [`Client::retry`], [`Client::pull`], [`Client::signal`]), the driver:
//!    1. writes every buffer from [`Client::poll_transmit`] to the socket, in order, until `None`;
//!    2. drains [`Client::poll_event`] until `None`; on [`ClientEvent::Closed`] or
//!       [`ClientEvent::Dead`] it flushes what step 1 gave and closes the socket;
//!    3. re-arms its single timer at [`Client::poll_timeout`] (`None`: no timer).
//! 4. Transport gone (EOF, error, or closed after `Closed`/`Dead`):
//!    [`Client::handle_disconnected`]; every pending request fails with an event. Reconnect when
//!    the app likes and go back to 2.
//! 5. Persist [`Client::cursors`] after `Message`/`HistoryGap` events as the app sees fit, and
//!    the outbox: a message (with the id [`Client::send`] returned) until its `Acked` or final
//!    `Nacked`.
//!
//! # Connection states
//!
//! | state          | input                                          | next state                          |
//! |----------------|------------------------------------------------|-------------------------------------|
//! | Disconnected   | `handle_connected`                             | Authenticating (Auth queued)        |
//! | Authenticating | AuthOk                                         | Ready (Sync, then the outbox)       |
//! | Authenticating, Ready | Error, GoAway, decode error, protocol violation | Closing (`Closed`)         |
//! | Authenticating, Ready | nothing received for 2 heartbeat intervals | Closing (`Dead`)               |
//! | any            | `handle_disconnected`                          | Disconnected (pending requests fail)|
//! | not Disconnected | `handle_connected`                           | as `handle_disconnected`, then Authenticating |
//!
//! Invariants:
//! - Before AuthOk nothing but Auth is written; app Sends wait in the outbox.
//! - After AuthOk the first frame is Sync, then the outbox in original send order.
//! - A message leaves the outbox only on its Ack or a final Nack; a retry always carries the
//!   same `client_msg_id`. Sends in flight never exceed `inflight_sends_max`.
//! - Per conversation, `Message` events come in strictly increasing seq order with no seq twice,
//!   and the cursor only moves forward. A seq this device sent itself is reported once, by
//!   `Acked`, and advances the cursor when its turn comes; it is not reported as a `Message`.
//! - At most one automatic Pull per conversation is in flight, and automatic Pulls wait until
//!   the Sync is answered. An automatic Pull repeats itself only if the last one advanced the
//!   cursor, so a gateway that answers with nothing cannot make the client spin.
//! - Every queue is bounded by a named limit: sends in flight, the outbox, Pulls in flight, the
//!   reorder buffer and gap ranges per conversation. The one unbounded map is the set of
//!   known conversations, which the gateway bounds by membership (one cursor per conversation
//!   the user belongs to); output and events are drained by the driver after every input.
//! - Peer input never panics: a bad frame ends the connection with `Closed` and a reason.

use crate::limits::Limits;
use crate::time::Instant;
use bytes::{Bytes, BytesMut};
use imgate_proto::frame::{Decoder, Encoder, Frame, HEADER_LEN};
use imgate_proto::meta::{self, Cursor, CursorRefusal, Gap, InboxEntry, Meta};
use imgate_proto::{ClientMsgId, ConvId, DeviceId, ErrorCode, Seq, UserId};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

pub use imgate_proto::meta::{Priority, SignalKind};

/// The version byte that opens every `ClientMsgId` this engine makes.
pub const CLIENT_MSG_ID_VERSION: u8 = 1;

/// Gap ranges remembered per conversation while the cursor has not reached them. Gaps come
/// from history trimmed at the bottom of a conversation, so one or two per conversation is the
/// norm; beyond 64 the highest are forgotten and a later Pull reports them again.
const GONE_RANGES_PER_CONV_MAX: usize = 64;

/// Frame bytes of a Send or Signal besides its payload: the header and the largest meta, with
/// room to spare. Used to keep a payload's frame below 4 GiB, which the encoder requires.
const FRAME_OVERHEAD_BYTES: u32 = 512;

/// Draws of a new `ClientMsgId` before giving up. A repeat needs a 48-bit collision within one
/// millisecond among the ids still in the outbox; a second draw in a row is already beyond
/// belief, so four means the generator is broken.
const CLIENT_MSG_ID_DRAWS_MAX: usize = 4;

/// How a client engine behaves, with every bound it keeps that is not in [`Limits`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// The signed token (JWT) sent in Auth. Default: empty (a test or tool sets it).
    pub token: String,
    /// This device, as in the token; its low 3 bytes go into every `ClientMsgId`.
    pub device: DeviceId,
    /// Seed of the `ClientMsgId` generator. Give each client run its own seed (mix in a run or
    /// restart counter): two runs of one device with the same seed in the same millisecond
    /// would make the same ids, and dedupe would take the second message for a retry.
    pub seed: u64,
    /// How long a Send, Sync or Pull may wait for its answer. Default 10 s: a durable ack takes
    /// milliseconds (group commit), so 10 s only expires on a stalled link or gateway.
    pub request_timeout: Duration,
    /// Send a Ping after this long without sending; declare the gateway dead after twice this
    /// long without receiving. The gateway's AuthOk may shorten it. Default: the gateway's
    /// default, [`Limits::heartbeat_interval`] (30 s, for mobile NAT timeouts).
    pub heartbeat_interval: Duration,
    /// Sends awaiting their Ack at once; more wait in the outbox. Default: the gateway's own
    /// bound, [`Limits::inflight_sends_max`] (256), so the gateway never has to Nack
    /// `TooManyInflight`.
    pub inflight_sends_max: usize,
    /// Unacked messages held (in flight, queued, or waiting for a retry). Over it,
    /// [`Client::send`] fails with [`ClientError::OutboxFull`]: backpressure to the app.
    /// Default 4096: sixteen windows of in-flight sends, minutes of chat on a bad link.
    pub outbox_max: usize,
    /// Pulls in flight at once, automatic and app-made together. Default 16: enough to repair
    /// many conversations after a reconnect without flooding the gateway.
    pub pulls_inflight_max: usize,
    /// Out-of-order messages held per conversation until the gap before them is filled.
    /// Beyond it the highest seq is dropped and fetched again by Pull. Default: the gateway's
    /// hot tier per conversation, [`Limits::hot_messages_per_conv`] (256).
    pub reorder_max_per_conv: usize,
    /// Whether the engine Pulls by itself: gaps, `Notify` beyond the cursor, `SyncDone.more`.
    /// Default true; loadgen and tests may turn it off and Pull explicitly.
    pub auto_pull: bool,
    /// The `limit` of automatic Pulls. Default: the gateway's cap, [`Limits::pull_limit_max`].
    pub pull_limit: u32,
    /// How long a moved cursor may wait for its cumulative DeliveryAck. Any frame written
    /// sooner carries the pending DeliveryAcks along. Default 200 ms: delivery receipts
    /// stay prompt, and a device receiving a steady stream sends a few acks a second
    /// instead of one per message (each a write and a gateway read). Zero: one with every
    /// transmit.
    pub delivery_ack_delay: Duration,
    /// Largest frame accepted from the gateway; a bigger one closes the connection. Default:
    /// [`Limits::frame_bytes_max`] (256 KiB), which covers the largest Deliver.
    pub max_frame_bytes: u32,
    /// Largest payload [`Client::send`] and [`Client::signal`] accept (the gateway's AuthOk may
    /// lower it). Default: [`Limits::payload_bytes_max`] (64 KiB).
    pub payload_bytes_max: u32,
    /// Messages a conversation new to this device starts with: its latest page; older
    /// history is for [`Client::pull_before`]. Default: the gateway's,
    /// [`Limits::newest_page`] (50).
    pub newest_page: u32,
    /// Cursors per Sync; more are split over Syncs sent one after another. Default: the
    /// gateway's bound, [`Limits::sync_cursors_max`] (4096).
    pub sync_cursors_max: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        let limits = Limits::default();
        ClientConfig {
            token: String::new(),
            device: DeviceId(0),
            seed: 0,
            request_timeout: Duration::from_secs(10),
            heartbeat_interval: limits.heartbeat_interval,
            inflight_sends_max: limits.inflight_sends_max,
            outbox_max: 4096,
            pulls_inflight_max: 16,
            reorder_max_per_conv: limits.hot_messages_per_conv,
            auto_pull: true,
            pull_limit: limits.pull_limit_max,
            delivery_ack_delay: Duration::from_millis(200),
            max_frame_bytes: limits.frame_bytes_max,
            payload_bytes_max: limits.payload_bytes_max,
            newest_page: limits.newest_page,
            sync_cursors_max: limits.sync_cursors_max,
        }
    }
}

impl ClientConfig {
    /// Checks that the settings make a working client.
    pub fn validate(&self) -> Result<(), String> {
        if self.request_timeout.is_zero() || self.heartbeat_interval.is_zero() {
            return Err("request_timeout and heartbeat_interval must be positive".into());
        }
        if self.inflight_sends_max == 0 || self.outbox_max == 0 || self.pulls_inflight_max == 0 {
            return Err(
                "inflight_sends_max, outbox_max and pulls_inflight_max must be positive".into(),
            );
        }
        if self.pull_limit == 0 || self.newest_page == 0 || self.sync_cursors_max == 0 {
            return Err("pull_limit, newest_page and sync_cursors_max must be positive".into());
        }
        if (self.max_frame_bytes as usize) < HEADER_LEN {
            return Err(format!("max_frame_bytes must be at least {HEADER_LEN}"));
        }
        if self.payload_bytes_max > u32::MAX - FRAME_OVERHEAD_BYTES {
            return Err("payload_bytes_max leaves no room for a frame header".into());
        }
        Ok(())
    }
}

/// Why an app call was refused. Nothing was queued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The call needs an authenticated connection (wait for [`ClientEvent::Authenticated`]).
    #[error("not authenticated")]
    NotReady,
    /// The outbox holds `outbox_max` unacked messages; wait for Acks.
    #[error("the outbox holds its maximum of {max} unacked messages")]
    OutboxFull {
        /// The configured bound.
        max: usize,
    },
    /// `pulls_inflight_max` Pulls are already in flight.
    #[error("{max} pulls are already in flight")]
    TooManyPulls {
        /// The configured bound.
        max: usize,
    },
    /// The payload is over the configured or the gateway's maximum.
    #[error("payload of {len} bytes is over the maximum of {max}")]
    PayloadTooLarge {
        /// The payload's length.
        len: usize,
        /// The maximum in force.
        max: usize,
    },
    /// The conversation id is not a valid one.
    #[error("{0} is not a valid conversation id")]
    InvalidConversation(ConvId),
    /// [`Client::pull_before`] a seq with nothing before it.
    #[error("no message comes before seq {}", .0 .0)]
    NothingBefore(Seq),
}

/// Why a Send got no answer. The message stays in the outbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendFailure {
    /// No Ack or Nack within `request_timeout`. [`Client::retry`] re-sends it now; the next
    /// reconnect re-sends it anyway. A late Ack is still recognised.
    Timeout,
    /// The connection went away first. It is re-sent after the next AuthOk.
    Disconnected,
}

/// Why a Sync or Pull got no answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestFailure {
    /// No answer within `request_timeout`.
    Timeout,
    /// The connection went away first.
    Disconnected,
    /// The gateway answered with an Error frame naming this request.
    Rejected {
        /// The gateway's code.
        code: ErrorCode,
        /// The gateway's message.
        message: String,
    },
}

/// What [`Client::retry`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryOutcome {
    /// A Send with the same `client_msg_id` was queued for transmission now.
    Sent,
    /// Not connected or at `inflight_sends_max`: it goes out, in send order, as soon as it can.
    Queued,
    /// It is already in flight; nothing was done.
    InFlight,
    /// No such message in the outbox (acked, finally nacked, or never sent).
    Unknown,
}

/// What the engine tells the app and the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// AuthOk arrived: the connection is a session. Sync and the outbox follow.
    Authenticated {
        /// The authenticated user.
        user: UserId,
        /// The authenticated device.
        device: DeviceId,
        /// The heartbeat interval in force (the smaller of the config's and the gateway's).
        heartbeat_interval: Duration,
        /// The largest payload the gateway accepts.
        max_payload_bytes: u32,
    },
    /// A sent message is durable as `seq` of `conv` (I1).
    Acked {
        /// The message's id.
        client_msg_id: ClientMsgId,
        /// Its conversation.
        conv: ConvId,
        /// Its seq.
        seq: Seq,
    },
    /// The gateway refused a message. If `retriable` (`StorageFailed`, `TooManyInflight`) it
    /// stays in the outbox for [`Client::retry`] or the next reconnect; otherwise it is gone.
    Nacked {
        /// The message's id.
        client_msg_id: ClientMsgId,
        /// Its conversation.
        conv: ConvId,
        /// The gateway's code.
        code: ErrorCode,
        /// The gateway's message.
        message: String,
        /// Whether the message was kept for a retry.
        retriable: bool,
    },
    /// A Send got no answer; the message stays in the outbox.
    SendFailed {
        /// The message's id.
        client_msg_id: ClientMsgId,
        /// Its conversation.
        conv: ConvId,
        /// Why.
        reason: SendFailure,
    },
    /// A message for the app: exactly once per (conv, seq), in seq order per conversation.
    Message {
        /// Its conversation.
        conv: ConvId,
        /// Its seq.
        seq: Seq,
        /// Who sent it.
        sender: UserId,
        /// From which device.
        sender_device: DeviceId,
        /// The sender's id for it.
        client_msg_id: ClientMsgId,
        /// Its priority.
        priority: Priority,
        /// When its owner sequenced it (ms since the Unix epoch; 0: not stamped).
        ts_ms: u64,
        /// Its body, a slice of the receive buffer.
        payload: Bytes,
    },
    /// An older message the app asked for with [`Client::pull_before`]: below the cursor,
    /// so not a `Message`; reported for every seq the Pull returns, in ascending order.
    History {
        /// Its conversation.
        conv: ConvId,
        /// Its seq.
        seq: Seq,
        /// Who sent it.
        sender: UserId,
        /// From which device.
        sender_device: DeviceId,
        /// The sender's id for it.
        client_msg_id: ClientMsgId,
        /// When its owner sequenced it.
        ts_ms: u64,
        /// Its body.
        payload: Bytes,
    },
    /// A page of the user's inbox, listed after AuthOk (before the Sync): the app's
    /// conversation list. `more` says whether another page follows.
    Inbox {
        /// The conversations of this page, with their latest seq and timestamp, the user's
        /// read cursor and unread count.
        entries: Vec<InboxEntry>,
        /// Another page follows.
        more: bool,
    },
    /// The gateway announced messages up to `latest_seq` (read diffusion).
    Notify {
        /// The conversation.
        conv: ConvId,
        /// Its latest seq.
        latest_seq: Seq,
    },
    /// The Sync sent after AuthOk is answered: its Delivers have all arrived.
    SyncDone {
        /// The Sync's request number.
        req: u32,
        /// Ranges gone for good (each also reported as `HistoryGap` when the cursor reaches it).
        gaps: Vec<Gap>,
        /// Conversations with more to fetch than one Sync sends (pulled if `auto_pull`).
        more: Vec<Cursor>,
        /// Cursors the gateway did not resume as given: `CursorAhead` (this engine moved
        /// its cursor back to `latest_seq`), `NotMember` (the cursor is forgotten) or
        /// `BadRequest`.
        refused: Vec<CursorRefusal>,
    },
    /// The Sync got no answer.
    SyncFailed {
        /// The Sync's request number.
        req: u32,
        /// Why.
        reason: RequestFailure,
    },
    /// A Pull is answered: its Delivers have all arrived.
    PullDone {
        /// The Pull's request number.
        req: u32,
        /// The conversation.
        conv: ConvId,
        /// First seq sent, or 0.
        from_seq: Seq,
        /// Last seq sent, or 0.
        to_seq: Seq,
        /// The conversation's latest seq.
        latest_seq: Seq,
    },
    /// A Pull got no answer.
    PullFailed {
        /// The Pull's request number.
        req: u32,
        /// The conversation.
        conv: ConvId,
        /// Why.
        reason: RequestFailure,
    },
    /// Seqs `from_seq..=to_seq` of `conv` are gone for good; the cursor moved past them. It
    /// comes in seq order among the `Message` events of its conversation.
    HistoryGap {
        /// The conversation.
        conv: ConvId,
        /// First missing seq.
        from_seq: Seq,
        /// Last missing seq.
        to_seq: Seq,
    },
    /// An ephemeral signal relayed by the gateway.
    Signal {
        /// The conversation.
        conv: ConvId,
        /// What it signals.
        kind: SignalKind,
        /// Who sent it.
        sender: UserId,
        /// From which device.
        sender_device: DeviceId,
        /// The app's data, possibly empty.
        payload: Bytes,
    },
    /// The connection is finished: the driver flushes `poll_transmit` and closes the socket,
    /// then calls `handle_disconnected`.
    Closed {
        /// Why.
        code: ErrorCode,
        /// A human-readable reason.
        message: String,
        /// The gateway's suggested wait before reconnecting (GoAway only).
        reconnect_after: Option<Duration>,
        /// True for the gateway's Error or GoAway; false when this engine found the stream
        /// broken (decode error or protocol violation; it queued an Error frame saying why).
        by_gateway: bool,
    },
    /// Nothing arrived from the gateway for two heartbeat intervals (I7): the driver drops the
    /// socket and calls `handle_disconnected`.
    Dead,
}

/// Counters for tests, loadgen reports and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Delivers dropped because their seq was already delivered or buffered.
    pub duplicates_dropped: u64,
    /// Delivers held in a reorder buffer because a seq before them was missing.
    pub reordered_buffered: u64,
    /// Buffered seqs dropped because a reorder buffer was full (fetched again by Pull).
    pub reorder_overflow_dropped: u64,
    /// Acks, Nacks, SyncDones and PullResults that matched nothing pending.
    pub stale_responses: u64,
    /// Sends re-sent by `retry` or after a reconnect.
    pub sends_resent: u64,
    /// Pings sent because the connection was idle.
    pub pings_sent: u64,
    /// Pulls sent by the engine itself.
    pub auto_pulls: u64,
}

/// The client engine. See the module doc for the driver contract.
pub struct Client {
    config: ClientConfig,
    state: State,
    decoder: Decoder,
    encoder: Encoder,
    /// Encoded frames not yet handed to the driver.
    out: BytesMut,
    events: VecDeque<ClientEvent>,
    /// The latest time any input carried; the engine's clock never goes back.
    now: Instant,
    last_sent: Instant,
    last_recv: Instant,
    rng: SplitMix64,
    next_req: u32,
    ping_nonce: u64,

    /// Unacked messages by send order.
    outbox: BTreeMap<u64, OutboxEntry>,
    /// `client_msg_id` to send order; the same keys as `outbox`.
    outbox_index: BTreeMap<ClientMsgId, u64>,
    /// Send orders of the entries in state `Queued`, exactly.
    send_queue: BTreeSet<u64>,
    next_order: u64,
    sends_in_flight: usize,

    /// Requests awaiting an answer, by request number.
    pending: BTreeMap<u32, Pending>,
    /// The same requests by deadline: the timer queue.
    deadlines: BTreeSet<(Instant, u32)>,
    syncs_pending: usize,
    pulls_in_flight: usize,
    lists_pending: usize,

    /// Per conversation: the highest seq delivered to the app contiguously.
    cursors: BTreeMap<ConvId, Seq>,
    convs: BTreeMap<ConvId, ConvState>,
    /// Conversations whose cursor moved since the last DeliveryAck.
    ack_dirty: BTreeSet<ConvId>,
    /// When the DeliveryAcks of `ack_dirty` must go out at the latest (`None` iff empty).
    ack_due: Option<Instant>,
    /// Conversations an automatic Pull should look at.
    pull_wanted: BTreeSet<ConvId>,
    /// After AuthOk: the inbox is being listed; the Syncs and the outbox wait for it.
    listing: bool,
    /// Cursors for the Syncs still to send on this connection, one Sync at a time.
    syncs_queued: VecDeque<Vec<Cursor>>,
    stats: ClientStats,
}

#[derive(Clone, Copy, Debug)]
enum State {
    Disconnected,
    Authenticating,
    /// Carries what AuthOk said, so nothing session-dependent exists before it.
    Ready(Session),
    Closing,
}

#[derive(Clone, Copy, Debug)]
struct Session {
    /// The authenticated user, to recognise this device's own messages.
    user: UserId,
    heartbeat: Duration,
    payload_bytes_max: usize,
}

struct OutboxEntry {
    id: ClientMsgId,
    conv: ConvId,
    priority: Priority,
    payload: Bytes,
    state: SendState,
    /// Send frames written for it so far.
    attempts: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SendState {
    /// Waiting for room in flight (or for AuthOk); listed in `send_queue`.
    Queued,
    /// Sent as request `req`, awaiting Ack or Nack.
    InFlight { req: u32 },
    /// Timed out or retriably nacked: waits for `retry` or the next AuthOk.
    Parked,
}

struct Pending {
    deadline: Instant,
    kind: PendingKind,
}

#[derive(Clone, Copy, Debug)]
enum PendingKind {
    Send {
        order: u64,
    },
    Sync,
    Pull {
        conv: ConvId,
        cursor_at_issue: Seq,
        auto: bool,
    },
    ListInbox,
}

#[derive(Default)]
struct ConvState {
    /// The highest seq the gateway has shown to exist.
    latest_known: Seq,
    /// Seqs above `cursor + 1`, held until the gap before them closes.
    reorder: BTreeMap<Seq, Slot>,
    /// Disjoint ranges `from -> to` the gateway said are gone, not yet reached by the cursor.
    gone: BTreeMap<Seq, Seq>,
    /// The automatic Pull in flight, if any.
    auto_pull_req: Option<u32>,
    /// Pull at least once more even if nothing looks missing (`SyncDone.more`).
    pull_forced: bool,
    /// The app's backward Pull in flight: its request and the seqs it asked for, which
    /// come as `History`.
    history: Option<(u32, Seq, Seq)>,
}

enum Slot {
    Message(Delivered),
    /// A seq this device sent (known from its Ack): advances the cursor without an event.
    Own,
}

struct Delivered {
    sender: UserId,
    sender_device: DeviceId,
    client_msg_id: ClientMsgId,
    priority: Priority,
    ts_ms: u64,
    payload: Bytes,
}

/// SplitMix64: a tiny, well-mixed PRNG, so that ids are deterministic per seed.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Lays out a `ClientMsgId`: version byte, the device's low 3 bytes, the low 6 bytes of the
/// time in ms, 6 random bytes (all big-endian).
fn make_client_msg_id(device: DeviceId, now: Instant, random: u64) -> ClientMsgId {
    let mut id = [0u8; 16];
    id[0] = CLIENT_MSG_ID_VERSION;
    id[1..4].copy_from_slice(&device.0.to_be_bytes()[1..4]);
    id[4..10].copy_from_slice(&now.as_millis().to_be_bytes()[2..8]);
    id[10..16].copy_from_slice(&random.to_be_bytes()[2..8]);
    ClientMsgId(id)
}

/// The seq after `s`, saturating: seqs near 2^64 come only from a broken peer, and a cursor
/// that stops there is harmless where a panic would not be.
fn succ(s: Seq) -> Seq {
    Seq(s.0.saturating_add(1))
}

impl Client {
    /// A disconnected client that knows `cursors` (persisted by a previous run; entries with
    /// invalid conversation ids are dropped).
    ///
    /// # Panics
    /// If `config` fails [`ClientConfig::validate`]: a bug of the caller.
    pub fn new(config: ClientConfig, cursors: BTreeMap<ConvId, Seq>) -> Client {
        if let Err(why) = config.validate() {
            panic!("invalid ClientConfig: {why}");
        }
        let cursors: BTreeMap<ConvId, Seq> = cursors
            .into_iter()
            .filter(|(conv, _)| conv.kind().is_some())
            .collect();
        Client {
            decoder: Decoder::new(config.max_frame_bytes),
            encoder: Encoder::new(),
            rng: SplitMix64(config.seed),
            config,
            state: State::Disconnected,
            out: BytesMut::new(),
            events: VecDeque::new(),
            now: Instant::default(),
            last_sent: Instant::default(),
            last_recv: Instant::default(),
            next_req: 1,
            ping_nonce: 0,
            outbox: BTreeMap::new(),
            outbox_index: BTreeMap::new(),
            send_queue: BTreeSet::new(),
            next_order: 0,
            sends_in_flight: 0,
            pending: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            syncs_pending: 0,
            pulls_in_flight: 0,
            lists_pending: 0,
            cursors,
            convs: BTreeMap::new(),
            ack_dirty: BTreeSet::new(),
            ack_due: None,
            pull_wanted: BTreeSet::new(),
            listing: false,
            syncs_queued: VecDeque::new(),
            stats: ClientStats::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Whether the connection is an authenticated session (AuthOk arrived, not closed since).
    pub fn is_authenticated(&self) -> bool {
        matches!(self.state, State::Ready(_))
    }

    /// Whether a transport is attached (between `handle_connected` and `handle_disconnected`).
    pub fn is_connected(&self) -> bool {
        !matches!(self.state, State::Disconnected)
    }

    /// Per conversation, the highest seq delivered to the app contiguously: what to persist.
    pub fn cursors(&self) -> &BTreeMap<ConvId, Seq> {
        &self.cursors
    }

    /// The counters.
    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// Unacked messages held (in flight, queued, or waiting for a retry).
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Sends awaiting their Ack on this connection.
    pub fn sends_in_flight(&self) -> usize {
        self.sends_in_flight
    }

    /// Requests (Send, Sync, Pull) awaiting an answer on this connection.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    // ---- inputs -------------------------------------------------------------------------

    /// The transport is up: queues Auth. Called on an attached client, it first does what
    /// `handle_disconnected` does. If no AuthOk (or anything) arrives within two heartbeat
    /// intervals, `Dead` follows; the gateway's own auth deadline usually answers first.
    pub fn handle_connected(&mut self, now: Instant) {
        self.advance(now);
        if self.is_connected() {
            self.handle_disconnected(now);
        }
        self.state = State::Authenticating;
        self.next_req = 1;
        self.last_recv = self.now;
        let auth = Meta::Auth(meta::Auth {
            token: self.config.token.clone(),
        });
        self.queue_frame(&auth, Bytes::new());
    }

    /// The transport is gone: every pending request fails with an event (`SendFailed`
    /// `Disconnected` per in-flight Send, in send order; then `SyncFailed`/`PullFailed`).
    /// Unacked messages stay in the outbox for the next AuthOk.
    pub fn handle_disconnected(&mut self, now: Instant) {
        self.advance(now);
        if !self.is_connected() {
            return;
        }
        self.state = State::Disconnected;
        self.out.clear();
        self.ack_dirty.clear();
        self.listing = false;
        self.syncs_queued.clear();
        self.ack_due = None;
        self.pull_wanted.clear();
        let mut sends: Vec<(u64, u32)> = Vec::new();
        let mut others: Vec<u32> = Vec::new();
        for (&req, p) in &self.pending {
            match p.kind {
                PendingKind::Send { order } => sends.push((order, req)),
                PendingKind::Sync | PendingKind::Pull { .. } | PendingKind::ListInbox => {
                    others.push(req)
                }
            }
        }
        sends.sort_unstable();
        let reqs = sends.into_iter().map(|(_, req)| req).chain(others);
        for req in reqs {
            if let Some(kind) = self.take_request(req, |_| true) {
                self.fail_request(req, kind, RequestFailure::Disconnected);
            }
        }
        assert!(self.pending.is_empty() && self.deadlines.is_empty());
        assert!(self.sends_in_flight == 0 && self.syncs_pending == 0 && self.pulls_in_flight == 0);
        assert!(self.lists_pending == 0);
    }

    /// Bytes arrived: decodes and handles every whole frame at the front of `buf`, leaving a
    /// partial frame for the next read. A decode error or protocol violation ends the
    /// connection (`Closed`); bytes after that are discarded.
    pub fn handle_bytes(&mut self, now: Instant, buf: &mut BytesMut) {
        self.advance(now);
        // Each turn consumes a whole frame from `buf` or ends the loop, so it is bounded by
        // the buffer's length.
        while matches!(self.state, State::Authenticating | State::Ready(_)) {
            match self.decoder.decode(buf) {
                Ok(Some(frame)) => {
                    self.last_recv = self.now;
                    self.handle_frame(frame);
                }
                Ok(None) => break,
                Err(e) => self.fail_connection(e.code(), e.to_string()),
            }
        }
        if !matches!(self.state, State::Authenticating | State::Ready(_)) {
            buf.clear();
        }
        self.service();
    }

    /// Time passed: expires requests (`SendFailed`/`SyncFailed`/`PullFailed` with `Timeout`),
    /// sends a Ping after a heartbeat interval of not sending, and emits `Dead` after two
    /// intervals of not receiving. Calling it early is harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
        let Some(heartbeat) = self.heartbeat() else {
            return;
        };
        // Each turn removes one deadline, so the loop is bounded by the pending requests.
        while let Some(&(deadline, req)) = self.deadlines.first() {
            if deadline > self.now {
                break;
            }
            if let Some(kind) = self.take_request(req, |_| true) {
                self.fail_request(req, kind, RequestFailure::Timeout);
            }
        }
        if self.now >= self.last_recv + heartbeat.saturating_mul(2) {
            self.events.push_back(ClientEvent::Dead);
            self.state = State::Closing;
            self.out.clear();
            return;
        }
        if self.is_authenticated() && self.now >= self.last_sent + heartbeat {
            self.ping_nonce = self.ping_nonce.wrapping_add(1);
            let ping = Meta::Ping(meta::Ping {
                nonce: self.ping_nonce,
            });
            self.queue_frame(&ping, Bytes::new());
            self.stats.pings_sent += 1;
        }
        self.service();
    }

    /// Queues a message for `conv` and returns its new `client_msg_id`. It is sent at once if
    /// authenticated and under `inflight_sends_max`, else it waits in the outbox (in order).
    pub fn send(
        &mut self,
        now: Instant,
        conv: ConvId,
        payload: Bytes,
        priority: Priority,
    ) -> Result<ClientMsgId, ClientError> {
        self.advance(now);
        self.check_outgoing(conv, &payload)?;
        if self.outbox.len() >= self.config.outbox_max {
            return Err(ClientError::OutboxFull {
                max: self.config.outbox_max,
            });
        }
        let id = self.new_client_msg_id();
        self.enqueue(id, conv, payload, priority);
        Ok(id)
    }

    /// Adds a message to the outbox behind the others and sends what there is room for.
    fn enqueue(&mut self, id: ClientMsgId, conv: ConvId, payload: Bytes, priority: Priority) {
        let order = self.next_order;
        self.next_order += 1;
        self.outbox.insert(
            order,
            OutboxEntry {
                id,
                conv,
                priority,
                payload,
                state: SendState::Queued,
                attempts: 0,
            },
        );
        self.outbox_index.insert(id, order);
        self.send_queue.insert(order);
        self.pump_sends();
    }

    /// Puts back a message of the app's persisted outbox after a restart: one it sent in an
    /// earlier run and never saw `Acked` or finally `Nacked`. It keeps its `client_msg_id`, so if
    /// a copy became durable before the restart, the gateway's dedupe (I2) answers with that
    /// copy's seq instead of storing it again. It waits in the outbox behind those already
    /// there and goes out after the next AuthOk, like any unacked message. An id already in the
    /// outbox is left as it is.
    pub fn restore_unacked(
        &mut self,
        id: ClientMsgId,
        conv: ConvId,
        payload: Bytes,
        priority: Priority,
    ) -> Result<(), ClientError> {
        self.check_outgoing(conv, &payload)?;
        if self.outbox_index.contains_key(&id) {
            return Ok(());
        }
        if self.outbox.len() >= self.config.outbox_max {
            return Err(ClientError::OutboxFull {
                max: self.config.outbox_max,
            });
        }
        self.enqueue(id, conv, payload, priority);
        Ok(())
    }

    /// Re-sends an unacked message with the same `client_msg_id` (after `SendFailed` or a
    /// retriable `Nacked`).
    pub fn retry(&mut self, now: Instant, id: ClientMsgId) -> RetryOutcome {
        self.advance(now);
        let Some(&order) = self.outbox_index.get(&id) else {
            return RetryOutcome::Unknown;
        };
        let Some(state) = self.outbox.get(&order).map(|e| e.state) else {
            return RetryOutcome::Unknown;
        };
        if let SendState::InFlight { .. } = state {
            return RetryOutcome::InFlight;
        }
        if self.is_authenticated()
            && !self.listing
            && self.sends_in_flight < self.config.inflight_sends_max
        {
            self.send_queue.remove(&order);
            self.transmit_send(order);
            RetryOutcome::Sent
        } else {
            if let Some(entry) = self.outbox.get_mut(&order) {
                entry.state = SendState::Queued;
            }
            self.send_queue.insert(order);
            RetryOutcome::Queued
        }
    }

    /// Asks for up to `limit` messages of `conv` from `from` on; returns the request number
    /// (echoed in `PullDone`/`PullFailed`). The Delivers go through the same cursor as any
    /// other, so seqs at or below the cursor are dropped as duplicates.
    pub fn pull(
        &mut self,
        now: Instant,
        conv: ConvId,
        from: Seq,
        limit: u32,
    ) -> Result<u32, ClientError> {
        self.advance(now);
        if conv.kind().is_none() {
            return Err(ClientError::InvalidConversation(conv));
        }
        if !self.is_authenticated() {
            return Err(ClientError::NotReady);
        }
        if self.pulls_in_flight >= self.config.pulls_inflight_max {
            return Err(ClientError::TooManyPulls {
                max: self.config.pulls_inflight_max,
            });
        }
        Ok(self.start_pull(conv, from, limit, false, false))
    }

    /// Asks for the up to `limit` messages of `conv` just before seq `before` (older
    /// history, newest first: a device that started a conversation at its latest page pages
    /// back with the lowest seq it holds). They come as [`ClientEvent::History`] in ascending
    /// seq order, then `PullDone`; returns the request number. One at a time per
    /// conversation.
    pub fn pull_before(
        &mut self,
        now: Instant,
        conv: ConvId,
        before: Seq,
        limit: u32,
    ) -> Result<u32, ClientError> {
        self.advance(now);
        if conv.kind().is_none() {
            return Err(ClientError::InvalidConversation(conv));
        }
        if before.0 <= 1 {
            return Err(ClientError::NothingBefore(before));
        }
        if !self.is_authenticated() {
            return Err(ClientError::NotReady);
        }
        let busy = self.convs.get(&conv).is_some_and(|st| st.history.is_some());
        if busy || self.pulls_in_flight >= self.config.pulls_inflight_max {
            return Err(ClientError::TooManyPulls {
                max: self.config.pulls_inflight_max,
            });
        }
        let limit = limit.clamp(1, self.config.pull_limit);
        let to = Seq(before.0 - 1);
        let from = Seq(to.0.saturating_sub(u64::from(limit) - 1).max(1));
        let req = self.start_pull(conv, to, limit, false, true);
        self.convs.entry(conv).or_default().history = Some((req, from, to));
        Ok(req)
    }

    /// Sends an ephemeral signal (typing, presence). Signals are never queued across
    /// reconnects: they need an authenticated connection.
    pub fn signal(
        &mut self,
        now: Instant,
        conv: ConvId,
        kind: SignalKind,
        payload: Bytes,
    ) -> Result<(), ClientError> {
        self.advance(now);
        self.check_outgoing(conv, &payload)?;
        if !self.is_authenticated() {
            return Err(ClientError::NotReady);
        }
        let signal = Meta::Signal(meta::Signal {
            conv,
            kind,
            sender: UserId(0),
            sender_device: DeviceId(0),
        });
        self.queue_frame(&signal, payload);
        Ok(())
    }

    // ---- outputs ------------------------------------------------------------------------

    /// The next bytes to write: every frame queued since the last call, in one buffer (one
    /// write per loop turn; this copies client payloads, which are small, and keeps the driver
    /// simple). Adds one cumulative DeliveryAck per conversation whose cursor moved, once
    /// `delivery_ack_delay` has passed or when other frames are going out anyway.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        let acks_due = !self.out.is_empty() || self.ack_due.is_some_and(|due| due <= self.now);
        if self.is_authenticated() && acks_due {
            self.ack_due = None;
            while let Some(conv) = self.ack_dirty.pop_first() {
                let ack = Meta::DeliveryAck(meta::DeliveryAck {
                    conv,
                    seq: self.cursor(conv),
                });
                self.queue_frame(&ack, Bytes::new());
            }
        }
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.split().freeze())
        }
    }

    /// The next event for the app or the driver.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// When `handle_timeout` should next be called: the earliest of a request deadline, the
    /// next Ping and the liveness deadline. `None` while no connection is live.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let heartbeat = self.heartbeat()?;
        let mut at = self.last_recv + heartbeat.saturating_mul(2);
        if self.is_authenticated() {
            at = at.min(self.last_sent + heartbeat);
        }
        if let Some(&(deadline, _)) = self.deadlines.first() {
            at = at.min(deadline);
        }
        if let Some(due) = self.ack_due.filter(|_| self.is_authenticated()) {
            at = at.min(due);
        }
        Some(at)
    }

    // ---- frames -------------------------------------------------------------------------

    fn handle_frame(&mut self, frame: Frame) {
        let Frame { meta, payload, .. } = frame;
        let kind = meta.kind();
        if matches!(
            meta,
            Meta::Auth(_)
                | Meta::Send(_)
                | Meta::DeliveryAck(_)
                | Meta::Sync(_)
                | Meta::Pull(_)
                | Meta::ListInbox(_)
        ) {
            self.fail_connection(
                ErrorCode::UnexpectedFrame,
                format!("{kind:?} frames are sent by clients only"),
            );
            return;
        }
        let before_auth_ok = matches!(
            meta,
            Meta::AuthOk(_) | Meta::Error(_) | Meta::GoAway(_) | Meta::Ping(_) | Meta::Pong(_)
        );
        if !self.is_authenticated() && !before_auth_ok {
            self.fail_connection(
                ErrorCode::UnexpectedFrame,
                format!("{kind:?} frame before AuthOk"),
            );
            return;
        }
        match meta {
            Meta::AuthOk(m) => self.on_auth_ok(m),
            Meta::Ack(m) => self.on_ack(m),
            Meta::Nack(m) => self.on_nack(m),
            Meta::Deliver(m) => self.on_deliver(m, payload),
            Meta::SyncDone(m) => self.on_sync_done(m),
            Meta::PullResult(m) => self.on_pull_result(m),
            Meta::Notify(m) => self.on_notify(m),
            Meta::Signal(m) => {
                if self.check_conv(m.conv) {
                    self.events.push_back(ClientEvent::Signal {
                        conv: m.conv,
                        kind: m.kind,
                        sender: m.sender,
                        sender_device: m.sender_device,
                        payload,
                    });
                }
            }
            Meta::Ping(m) => {
                // Before AuthOk nothing but Auth may be written, so a Ping then goes unanswered.
                if self.is_authenticated() {
                    self.queue_frame(&Meta::Pong(meta::Pong { nonce: m.nonce }), Bytes::new());
                }
            }
            Meta::Pong(_) => {}
            Meta::GoAway(m) => self.close_by_gateway(
                m.code,
                m.message,
                Some(Duration::from_millis(u64::from(m.reconnect_after_ms))),
            ),
            Meta::Error(m) => self.on_error(m),
            Meta::InboxPage(m) => self.on_inbox_page(m),
            // Rejected above.
            Meta::Auth(_)
            | Meta::Send(_)
            | Meta::DeliveryAck(_)
            | Meta::Sync(_)
            | Meta::Pull(_)
            | Meta::ListInbox(_) => {}
        }
    }

    fn on_auth_ok(&mut self, m: meta::AuthOk) {
        if !matches!(self.state, State::Authenticating) {
            self.fail_connection(ErrorCode::UnexpectedFrame, "second AuthOk".into());
            return;
        }
        let mut heartbeat = self.config.heartbeat_interval;
        if m.heartbeat_ms > 0 {
            heartbeat = heartbeat.min(Duration::from_millis(u64::from(m.heartbeat_ms)));
        }
        let mut payload_bytes_max = self.config.payload_bytes_max as usize;
        if m.max_payload_bytes > 0 {
            payload_bytes_max = payload_bytes_max.min(m.max_payload_bytes as usize);
        }
        self.state = State::Ready(Session {
            user: m.user,
            heartbeat,
            payload_bytes_max,
        });
        self.events.push_back(ClientEvent::Authenticated {
            user: m.user,
            device: m.device,
            heartbeat_interval: heartbeat,
            max_payload_bytes: m.max_payload_bytes,
        });
        // The inbox first: it names the conversations this device does not know yet.
        self.listing = true;
        self.list_inbox(None);
    }

    fn list_inbox(&mut self, after: Option<ConvId>) {
        let req = self.start_request(PendingKind::ListInbox);
        let list = Meta::ListInbox(meta::ListInbox {
            req,
            after,
            limit: 0,
        });
        self.queue_frame(&list, Bytes::new());
    }

    fn on_inbox_page(&mut self, m: meta::InboxPage) {
        if self
            .take_request(m.req, |k| matches!(k, PendingKind::ListInbox))
            .is_none()
        {
            self.stats.stale_responses += 1;
            return;
        }
        for e in &m.entries {
            if !self.check_conv(e.conv) {
                return;
            }
            if !self.cursors.contains_key(&e.conv) {
                // New to this device: it starts at the latest page (I9, newest first).
                let start = e
                    .latest_seq
                    .0
                    .saturating_sub(u64::from(self.config.newest_page));
                self.cursors.insert(e.conv, Seq(start));
            }
            let st = self.convs.entry(e.conv).or_default();
            st.latest_known = st.latest_known.max(e.latest_seq);
        }
        let next = m.entries.last().map(|e| e.conv).filter(|_| m.more);
        self.events.push_back(ClientEvent::Inbox {
            entries: m.entries,
            more: m.more,
        });
        match next {
            Some(after) => self.list_inbox(Some(after)),
            None => self.start_syncs(),
        }
    }

    /// The inbox is listed (or could not be): Sync every known conversation, in Syncs of
    /// at most `sync_cursors_max` cursors sent one after another, then the outbox.
    fn start_syncs(&mut self) {
        if !self.listing {
            return;
        }
        self.listing = false;
        let cursors: Vec<Cursor> = self
            .cursors
            .iter()
            .map(|(&conv, &seq)| Cursor { conv, seq })
            .collect();
        self.syncs_queued = cursors
            .chunks(self.config.sync_cursors_max)
            .map(<[Cursor]>::to_vec)
            .collect();
        self.next_sync();
        // Everything unacked goes again, in original send order, after the first Sync.
        for (&order, entry) in self.outbox.iter_mut() {
            assert!(!matches!(entry.state, SendState::InFlight { .. }));
            entry.state = SendState::Queued;
            self.send_queue.insert(order);
        }
    }

    /// Sends the next queued Sync (an empty one if none is queued and none was sent).
    fn next_sync(&mut self) {
        let cursors = self.syncs_queued.pop_front().unwrap_or_default();
        let req = self.start_request(PendingKind::Sync);
        self.queue_frame(&Meta::Sync(meta::Sync { req, cursors }), Bytes::new());
    }

    fn on_ack(&mut self, m: meta::Ack) {
        // Matched by id, not req: an Ack for an earlier attempt of a retried message counts.
        let Some(order) = self.outbox_index.remove(&m.client_msg_id) else {
            self.stats.stale_responses += 1;
            return;
        };
        self.send_queue.remove(&order);
        let Some(entry) = self.outbox.remove(&order) else {
            return;
        };
        if let SendState::InFlight { req } = entry.state {
            self.take_request(req, |k| matches!(k, PendingKind::Send { .. }));
        }
        self.events.push_back(ClientEvent::Acked {
            client_msg_id: entry.id,
            conv: entry.conv,
            seq: m.seq,
        });
        self.record_own(entry.conv, m.seq);
    }

    fn on_nack(&mut self, m: meta::Nack) {
        let Some(&order) = self.outbox_index.get(&m.client_msg_id) else {
            self.stats.stale_responses += 1;
            return;
        };
        if let Some(SendState::InFlight { req }) = self.outbox.get(&order).map(|e| e.state) {
            self.take_request(req, |k| matches!(k, PendingKind::Send { .. }));
        }
        self.apply_nack(order, m.code, m.message);
    }

    /// A Nack (or an Error naming a Send): final unless the code says a retry can succeed.
    fn apply_nack(&mut self, order: u64, code: ErrorCode, message: String) {
        let retriable = matches!(code, ErrorCode::StorageFailed | ErrorCode::TooManyInflight);
        self.send_queue.remove(&order);
        let (id, conv) = if retriable {
            let Some(entry) = self.outbox.get_mut(&order) else {
                return;
            };
            entry.state = SendState::Parked;
            (entry.id, entry.conv)
        } else {
            let Some(entry) = self.outbox.remove(&order) else {
                return;
            };
            self.outbox_index.remove(&entry.id);
            (entry.id, entry.conv)
        };
        self.events.push_back(ClientEvent::Nacked {
            client_msg_id: id,
            conv,
            code,
            message,
            retriable,
        });
    }

    fn on_deliver(&mut self, m: meta::Deliver, payload: Bytes) {
        if !self.check_conv(m.conv) {
            return;
        }
        if m.seq == Seq::ZERO {
            self.fail_connection(ErrorCode::MalformedFrame, "Deliver with seq 0".into());
            return;
        }
        // One of this device's own unacked messages, durable while its Ack was lost (a
        // replay after a reconnect): it is the Ack, so it is reported once, by `Acked`.
        let own = matches!(&self.state, State::Ready(s) if s.user == m.sender)
            && self.outbox_index.contains_key(&m.client_msg_id);
        if own {
            self.on_ack(meta::Ack {
                req: 0,
                client_msg_id: m.client_msg_id,
                conv: m.conv,
                seq: m.seq,
            });
        }
        let conv = m.conv;
        // A conversation new to this device starts where the gateway starts it: at its
        // latest page (the first Deliver of a conversation not in the Sync).
        let cursor = *self
            .cursors
            .entry(conv)
            .or_insert(Seq(m.seq.0.saturating_sub(1)));
        let st = self.convs.entry(conv).or_default();
        st.latest_known = st.latest_known.max(m.seq);
        if m.seq <= cursor {
            match st.history {
                Some((_, from, to)) if (from..=to).contains(&m.seq) => {
                    self.events.push_back(ClientEvent::History {
                        conv,
                        seq: m.seq,
                        sender: m.sender,
                        sender_device: m.sender_device,
                        client_msg_id: m.client_msg_id,
                        ts_ms: m.ts_ms,
                        payload,
                    });
                }
                _ => self.stats.duplicates_dropped += 1,
            }
            return;
        }
        let slot = Slot::Message(Delivered {
            sender: m.sender,
            sender_device: m.sender_device,
            client_msg_id: m.client_msg_id,
            priority: m.priority,
            ts_ms: m.ts_ms,
            payload,
        });
        if m.seq == succ(cursor) {
            // The slot at cursor + 1 is drained at once, so it never counts against the bound.
            st.reorder.insert(m.seq, slot);
            self.drain(conv);
            return;
        }
        if self.buffer(conv, m.seq, slot) {
            self.stats.reordered_buffered += 1;
        }
        if self.config.auto_pull {
            self.pull_wanted.insert(conv);
        }
    }

    fn on_sync_done(&mut self, m: meta::SyncDone) {
        if self
            .take_request(m.req, |k| matches!(k, PendingKind::Sync))
            .is_none()
        {
            // A late answer still carries true facts about the history; use them.
            self.stats.stale_responses += 1;
        }
        for gap in &m.gaps {
            if !self.check_conv(gap.conv) {
                return;
            }
            if gap.from_seq == Seq::ZERO || gap.from_seq > gap.to_seq {
                continue;
            }
            self.cursors.entry(gap.conv).or_default();
            self.add_gone(gap.conv, gap.from_seq, gap.to_seq);
            self.drain(gap.conv);
            if self.config.auto_pull {
                // Checked when Pulls are issued: seqs between the cursor and a gap that
                // starts further on are still missing.
                self.pull_wanted.insert(gap.conv);
            }
        }
        for more in &m.more {
            if !self.check_conv(more.conv) {
                return;
            }
            self.cursors.entry(more.conv).or_default();
            self.convs.entry(more.conv).or_default().pull_forced = true;
            if self.config.auto_pull {
                self.pull_wanted.insert(more.conv);
            }
        }
        for r in &m.refused {
            if !self.check_conv(r.conv) {
                return;
            }
            match r.code {
                // The gateway resumes the push stream after `latest_seq`: so must we, or
                // we would hold every new message as if it came before our cursor.
                ErrorCode::CursorAhead if r.latest_seq.is_valid() => {
                    self.cursors.insert(r.conv, r.latest_seq);
                    self.convs.remove(&r.conv);
                }
                ErrorCode::NotMember => {
                    self.cursors.remove(&r.conv);
                    self.convs.remove(&r.conv);
                }
                _ => {}
            }
        }
        self.events.push_back(ClientEvent::SyncDone {
            req: m.req,
            gaps: m.gaps,
            more: m.more,
            refused: m.refused,
        });
        if !self.syncs_queued.is_empty() && self.syncs_pending == 0 && self.is_authenticated() {
            self.next_sync();
        }
    }

    fn on_pull_result(&mut self, m: meta::PullResult) {
        if !self.check_conv(m.conv) {
            return;
        }
        let conv = m.conv;
        let issued = self.take_request(m.req, |k| matches!(k, PendingKind::Pull { .. }));
        if issued.is_none() {
            self.stats.stale_responses += 1;
        }
        self.cursors.entry(conv).or_default();
        let st = self.convs.entry(conv).or_default();
        st.latest_known = st.latest_known.max(m.latest_seq);
        if m.available_from.0 > 1 {
            self.add_gone(conv, Seq(1), Seq(m.available_from.0 - 1));
            self.drain(conv);
        }
        if let Some(st) = self.convs.get_mut(&conv) {
            if st.history.is_some_and(|h| h.0 == m.req) {
                st.history = None;
            }
        }
        if let Some(PendingKind::Pull {
            cursor_at_issue, ..
        }) = issued
        {
            // Pull again by itself only after progress, so a gateway that answers with
            // nothing cannot make the client spin; new frames (Notify, a gap) re-arm it.
            let progressed = self.cursor(conv) > cursor_at_issue;
            if self.config.auto_pull && progressed && self.needs_pull(conv) {
                self.pull_wanted.insert(conv);
            }
        }
        self.events.push_back(ClientEvent::PullDone {
            req: m.req,
            conv,
            from_seq: m.from_seq,
            to_seq: m.to_seq,
            latest_seq: m.latest_seq,
        });
    }

    fn on_notify(&mut self, m: meta::Notify) {
        if !self.check_conv(m.conv) {
            return;
        }
        let newest_page = u64::from(self.config.newest_page);
        let cursor = *self
            .cursors
            .entry(m.conv)
            .or_insert(Seq(m.latest_seq.0.saturating_sub(newest_page)));
        let st = self.convs.entry(m.conv).or_default();
        st.latest_known = st.latest_known.max(m.latest_seq);
        self.events.push_back(ClientEvent::Notify {
            conv: m.conv,
            latest_seq: m.latest_seq,
        });
        if self.config.auto_pull && m.latest_seq > cursor {
            self.pull_wanted.insert(m.conv);
        }
    }

    fn on_error(&mut self, m: meta::Error) {
        // Request-level codes naming a pending request fail that request only; anything else
        // is the gateway closing the connection.
        let request_level = matches!(
            m.code,
            ErrorCode::NotMember
                | ErrorCode::PayloadTooLarge
                | ErrorCode::StorageFailed
                | ErrorCode::TooManyInflight
                | ErrorCode::BadRequest
                | ErrorCode::HistoryUnavailable
        );
        if m.req != 0 && request_level {
            if let Some(kind) = self.take_request(m.req, |_| true) {
                let reason = RequestFailure::Rejected {
                    code: m.code,
                    message: m.message,
                };
                self.fail_request(m.req, kind, reason);
                return;
            }
        }
        self.close_by_gateway(m.code, m.message, None);
    }

    // ---- requests -----------------------------------------------------------------------

    fn start_request(&mut self, kind: PendingKind) -> u32 {
        let req = self.alloc_req();
        let deadline = self.now + self.config.request_timeout;
        match kind {
            PendingKind::Send { .. } => self.sends_in_flight += 1,
            PendingKind::Sync => self.syncs_pending += 1,
            PendingKind::Pull { .. } => self.pulls_in_flight += 1,
            PendingKind::ListInbox => self.lists_pending += 1,
        }
        self.pending.insert(req, Pending { deadline, kind });
        self.deadlines.insert((deadline, req));
        assert!(self.sends_in_flight <= self.config.inflight_sends_max);
        assert!(self.pulls_in_flight <= self.config.pulls_inflight_max);
        assert!(self.syncs_pending <= 1, "one Sync at a time");
        assert!(self.lists_pending <= 1, "one ListInbox at a time");
        assert!(
            self.pending.len()
                == self.sends_in_flight
                    + self.syncs_pending
                    + self.pulls_in_flight
                    + self.lists_pending
        );
        req
    }

    /// The next free request number of this connection (from 1; 0 means "no request").
    fn alloc_req(&mut self) -> u32 {
        // Of pending.len() + 1 consecutive numbers at least one is free, and pending is far
        // smaller than the u32 space (bounded by the in-flight limits).
        for _ in 0..=self.pending.len() {
            let req = self.next_req;
            self.next_req = self.next_req.wrapping_add(1).max(1);
            if !self.pending.contains_key(&req) {
                return req;
            }
        }
        unreachable!("more pending requests than request numbers")
    }

    /// Removes request `req` if it is pending and `expect` accepts its kind, and undoes its
    /// bookkeeping. `None` if no such request is pending.
    fn take_request(
        &mut self,
        req: u32,
        expect: impl Fn(&PendingKind) -> bool,
    ) -> Option<PendingKind> {
        if !expect(&self.pending.get(&req)?.kind) {
            return None;
        }
        let p = self.pending.remove(&req)?;
        self.deadlines.remove(&(p.deadline, req));
        match p.kind {
            PendingKind::Send { .. } => self.sends_in_flight -= 1,
            PendingKind::Sync => self.syncs_pending -= 1,
            PendingKind::ListInbox => self.lists_pending -= 1,
            PendingKind::Pull { conv, auto, .. } => {
                self.pulls_in_flight -= 1;
                if auto {
                    if let Some(st) = self.convs.get_mut(&conv) {
                        if st.auto_pull_req == Some(req) {
                            st.auto_pull_req = None;
                        }
                    }
                }
            }
        }
        Some(p.kind)
    }

    /// Reports a request, already taken, as failed.
    fn fail_request(&mut self, req: u32, kind: PendingKind, reason: RequestFailure) {
        match kind {
            PendingKind::Send { order } => {
                let in_flight_as_req = self
                    .outbox
                    .get(&order)
                    .is_some_and(|e| e.state == SendState::InFlight { req });
                if !in_flight_as_req {
                    return;
                }
                let send_reason = match reason {
                    RequestFailure::Timeout => SendFailure::Timeout,
                    RequestFailure::Disconnected => SendFailure::Disconnected,
                    RequestFailure::Rejected { code, message } => {
                        self.apply_nack(order, code, message);
                        return;
                    }
                };
                let Some(entry) = self.outbox.get_mut(&order) else {
                    return;
                };
                if send_reason == SendFailure::Timeout {
                    entry.state = SendState::Parked;
                } else {
                    entry.state = SendState::Queued;
                    self.send_queue.insert(order);
                }
                self.events.push_back(ClientEvent::SendFailed {
                    client_msg_id: entry.id,
                    conv: entry.conv,
                    reason: send_reason,
                });
            }
            PendingKind::Sync => self
                .events
                .push_back(ClientEvent::SyncFailed { req, reason }),
            PendingKind::Pull { conv, .. } => {
                if let Some(st) = self.convs.get_mut(&conv) {
                    if st.history.is_some_and(|h| h.0 == req) {
                        st.history = None;
                    }
                }
                self.events
                    .push_back(ClientEvent::PullFailed { req, conv, reason });
            }
            // The Syncs go on with the conversations the device knows; the next
            // connection lists the inbox again.
            PendingKind::ListInbox => {
                if self.is_authenticated() {
                    self.start_syncs();
                } else {
                    self.listing = false;
                }
            }
        }
    }

    // ---- sending ------------------------------------------------------------------------

    fn check_outgoing(&self, conv: ConvId, payload: &Bytes) -> Result<(), ClientError> {
        if conv.kind().is_none() {
            return Err(ClientError::InvalidConversation(conv));
        }
        let max = match self.state {
            State::Ready(s) => s.payload_bytes_max,
            _ => self.config.payload_bytes_max as usize,
        };
        if payload.len() > max {
            return Err(ClientError::PayloadTooLarge {
                len: payload.len(),
                max,
            });
        }
        Ok(())
    }

    fn new_client_msg_id(&mut self) -> ClientMsgId {
        for _ in 0..CLIENT_MSG_ID_DRAWS_MAX {
            let id = make_client_msg_id(self.config.device, self.now, self.rng.next_u64());
            if !self.outbox_index.contains_key(&id) {
                return id;
            }
        }
        unreachable!("{CLIENT_MSG_ID_DRAWS_MAX} colliding 48-bit draws: the generator is broken")
    }

    /// Sends queued messages, in send order, while there is room in flight.
    fn pump_sends(&mut self) {
        if self.listing {
            // The outbox goes after the first Sync, which waits for the inbox.
            return;
        }
        if !self.is_authenticated() {
            return;
        }
        while self.sends_in_flight < self.config.inflight_sends_max {
            let Some(order) = self.send_queue.pop_first() else {
                break;
            };
            self.transmit_send(order);
        }
    }

    /// Sends outbox entry `order` (taken off `send_queue` by the caller) as a new request.
    fn transmit_send(&mut self, order: u64) {
        let Some(entry) = self.outbox.get(&order) else {
            return;
        };
        let (id, conv, priority, payload) =
            (entry.id, entry.conv, entry.priority, entry.payload.clone());
        let req = self.start_request(PendingKind::Send { order });
        if let Some(entry) = self.outbox.get_mut(&order) {
            entry.state = SendState::InFlight { req };
            if entry.attempts > 0 {
                self.stats.sends_resent += 1;
            }
            entry.attempts = entry.attempts.saturating_add(1);
        }
        let send = Meta::Send(meta::Send {
            req,
            client_msg_id: id,
            conv,
            priority,
        });
        self.queue_frame(&send, payload);
    }

    fn start_pull(
        &mut self,
        conv: ConvId,
        from: Seq,
        limit: u32,
        auto: bool,
        backward: bool,
    ) -> u32 {
        let cursor_at_issue = self.cursor(conv);
        let req = self.start_request(PendingKind::Pull {
            conv,
            cursor_at_issue,
            auto,
        });
        if auto {
            let st = self.convs.entry(conv).or_default();
            st.auto_pull_req = Some(req);
            st.pull_forced = false;
            self.stats.auto_pulls += 1;
        }
        let pull = Meta::Pull(meta::Pull {
            req,
            conv,
            from_seq: from,
            limit,
            backward,
        });
        self.queue_frame(&pull, Bytes::new());
        req
    }

    /// Issues the automatic Pulls that are wanted, have room, and are still needed. They wait
    /// while the Sync is pending: its replay may fill the gap by itself.
    fn issue_pulls(&mut self) {
        if !self.config.auto_pull || !self.is_authenticated() || self.syncs_pending > 0 {
            return;
        }
        let wanted: Vec<ConvId> = self.pull_wanted.iter().copied().collect();
        for conv in wanted {
            if self.pulls_in_flight >= self.config.pulls_inflight_max {
                break;
            }
            if self
                .convs
                .get(&conv)
                .is_some_and(|st| st.auto_pull_req.is_some())
            {
                // Re-examined when that Pull is answered.
                continue;
            }
            self.pull_wanted.remove(&conv);
            if self.needs_pull(conv) {
                let from = succ(self.cursor(conv));
                self.start_pull(conv, from, self.config.pull_limit, true, false);
            }
        }
    }

    fn needs_pull(&self, conv: ConvId) -> bool {
        let cursor = self.cursor(conv);
        self.convs.get(&conv).is_some_and(|st| {
            st.pull_forced
                || st.latest_known > cursor
                || !st.reorder.is_empty()
                || !st.gone.is_empty()
        })
    }

    /// Work that follows any input: queued Sends and wanted Pulls.
    fn service(&mut self) {
        self.pump_sends();
        self.issue_pulls();
    }

    fn queue_frame(&mut self, meta: &Meta, payload: Bytes) {
        // `encode` panics only on a payload for a kind without one, or a frame over 4 GiB:
        // payloads come only with Send and Signal, capped by `check_outgoing` at
        // payload_bytes_max, which `validate` keeps below 4 GiB minus the frame overhead.
        let payload = self.encoder.encode(meta, payload, &mut self.out);
        self.out.extend_from_slice(&payload);
        self.last_sent = self.now;
    }

    // ---- receiving ----------------------------------------------------------------------

    fn cursor(&self, conv: ConvId) -> Seq {
        self.cursors.get(&conv).copied().unwrap_or_default()
    }

    /// A seq this device sent was acked: it counts as held when the cursor reaches it.
    fn record_own(&mut self, conv: ConvId, seq: Seq) {
        let cursor = *self.cursors.entry(conv).or_default();
        if seq <= cursor {
            return;
        }
        if seq == succ(cursor) {
            self.convs
                .entry(conv)
                .or_default()
                .reorder
                .insert(seq, Slot::Own);
            self.drain(conv);
        } else {
            self.buffer(conv, seq, Slot::Own);
        }
    }

    /// Holds `slot` at `seq` (above cursor + 1) within the bound; returns whether it was new.
    fn buffer(&mut self, conv: ConvId, seq: Seq, slot: Slot) -> bool {
        let max = self.config.reorder_max_per_conv;
        let st = self.convs.entry(conv).or_default();
        if st.reorder.contains_key(&seq) {
            self.stats.duplicates_dropped += 1;
            return false;
        }
        st.reorder.insert(seq, slot);
        if st.reorder.len() > max {
            // The highest seq is the one a Pull from the cursor reaches last anyway.
            let dropped = st.reorder.pop_last().map(|(s, _)| s);
            self.stats.reorder_overflow_dropped += 1;
            return dropped != Some(seq);
        }
        true
    }

    /// Records that seqs `from..=to` of `conv` are gone, merged with the ranges already known.
    fn add_gone(&mut self, conv: ConvId, from: Seq, to: Seq) {
        let from = from.max(succ(self.cursor(conv)));
        if to < from {
            return;
        }
        let st = self.convs.entry(conv).or_default();
        // The ranges are disjoint and sorted, so their ends rise with their starts: walking
        // down from the last range starting at or before to + 1, the touching ones come first.
        let touching: Vec<Seq> = st
            .gone
            .range(..=succ(to))
            .rev()
            .take_while(|(_, &end)| succ(end) >= from)
            .map(|(&start, _)| start)
            .collect();
        let (mut lo, mut hi) = (from, to);
        for start in touching {
            if let Some(end) = st.gone.remove(&start) {
                lo = lo.min(start);
                hi = hi.max(end);
            }
        }
        st.gone.insert(lo, hi);
        while st.gone.len() > GONE_RANGES_PER_CONV_MAX {
            st.gone.pop_last();
        }
    }

    /// Moves the cursor of `conv` as far as buffered seqs and gone ranges allow, emitting
    /// `Message` and `HistoryGap` events in seq order.
    fn drain(&mut self, conv: ConvId) {
        let Some(st) = self.convs.get_mut(&conv) else {
            return;
        };
        let cursor = self.cursors.entry(conv).or_default();
        let start = *cursor;
        // Each turn moves the cursor forward over a buffered seq or a gone range, so the loop
        // is bounded by the reorder buffer plus the gone ranges.
        loop {
            let next = succ(*cursor);
            if next == *cursor {
                break;
            }
            if let Some(slot) = st.reorder.remove(&next) {
                *cursor = next;
                if let Slot::Message(m) = slot {
                    self.events.push_back(ClientEvent::Message {
                        conv,
                        seq: next,
                        sender: m.sender,
                        sender_device: m.sender_device,
                        client_msg_id: m.client_msg_id,
                        priority: m.priority,
                        ts_ms: m.ts_ms,
                        payload: m.payload,
                    });
                }
                continue;
            }
            let Some((&from, &to)) = st.gone.range(..=next).next_back() else {
                break;
            };
            if to < next {
                break;
            }
            // A seq we hold inside the gone range is still delivered: the gap stops before it.
            let end = match st.reorder.first_key_value() {
                Some((&held, _)) if held <= to => {
                    assert!(
                        held > next,
                        "the reorder buffer holds only seqs above the cursor"
                    );
                    Seq(held.0 - 1)
                }
                _ => to,
            };
            self.events.push_back(ClientEvent::HistoryGap {
                conv,
                from_seq: next,
                to_seq: end,
            });
            *cursor = end;
            if end == to {
                st.gone.remove(&from);
            }
        }
        if *cursor != start {
            self.ack_dirty.insert(conv);
            let due = self.now + self.config.delivery_ack_delay;
            self.ack_due.get_or_insert(due);
        }
    }

    // ---- connection ---------------------------------------------------------------------

    fn advance(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    /// The heartbeat interval while a connection is live.
    fn heartbeat(&self) -> Option<Duration> {
        match self.state {
            State::Authenticating => Some(self.config.heartbeat_interval),
            State::Ready(s) => Some(s.heartbeat),
            State::Disconnected | State::Closing => None,
        }
    }

    /// Rejects an invalid conversation id from the gateway by closing the connection.
    fn check_conv(&mut self, conv: ConvId) -> bool {
        if conv.kind().is_some() {
            return true;
        }
        self.fail_connection(
            ErrorCode::MalformedFrame,
            format!("invalid conversation id {conv}"),
        );
        false
    }

    /// The stream from the gateway is broken: tell it why (if a session allows writing) and
    /// ask the driver to close.
    fn fail_connection(&mut self, code: ErrorCode, message: String) {
        self.out.clear();
        if self.is_authenticated() {
            let error = Meta::Error(meta::Error {
                code,
                message: message.clone(),
                req: 0,
            });
            self.queue_frame(&error, Bytes::new());
        }
        self.state = State::Closing;
        self.events.push_back(ClientEvent::Closed {
            code,
            message,
            reconnect_after: None,
            by_gateway: false,
        });
    }

    fn close_by_gateway(&mut self, code: ErrorCode, message: String, after: Option<Duration>) {
        self.out.clear();
        self.state = State::Closing;
        self.events.push_back(ClientEvent::Closed {
            code,
            message,
            reconnect_after: after,
            by_gateway: true,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Instant = Instant(1_700_000_000_000);
    const HEARTBEAT_MS: u32 = 30_000;

    fn conv() -> ConvId {
        ConvId::direct(UserId(1), UserId(2))
    }

    fn other_conv() -> ConvId {
        ConvId::group(9)
    }

    fn config() -> ClientConfig {
        ClientConfig {
            token: "token-of-device-7".into(),
            device: DeviceId(7),
            seed: 42,
            // Most tests look at each DeliveryAck as it is made; one test covers the delay.
            delivery_ack_delay: Duration::ZERO,
            ..ClientConfig::default()
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Feeds one gateway frame, built by proto's encoder, through `handle_bytes`.
    fn feed(c: &mut Client, now: Instant, meta: Meta, payload: &[u8]) {
        let bytes = Encoder::new().encode_to_bytes(&meta, payload);
        let mut buf = BytesMut::from(&bytes[..]);
        c.handle_bytes(now, &mut buf);
        assert!(buf.is_empty(), "a whole frame is consumed");
    }

    /// Every frame the client wants written, decoded by proto's decoder.
    fn sent(c: &mut Client) -> Vec<Frame> {
        let decoder = Decoder::new(u32::MAX);
        let mut frames = Vec::new();
        while let Some(bytes) = c.poll_transmit() {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Some(frame) = decoder.decode(&mut buf).unwrap() {
                frames.push(frame);
            }
            assert!(buf.is_empty(), "poll_transmit hands out whole frames");
        }
        frames
    }

    fn sent_metas(c: &mut Client) -> Vec<Meta> {
        sent(c).into_iter().map(|f| f.meta).collect()
    }

    fn events(c: &mut Client) -> Vec<ClientEvent> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    fn auth_ok() -> Meta {
        Meta::AuthOk(meta::AuthOk {
            user: UserId(1),
            device: DeviceId(7),
            heartbeat_ms: HEARTBEAT_MS,
            max_frame_bytes: 256 * 1024,
            max_payload_bytes: 64 * 1024,
        })
    }

    fn deliver(conv: ConvId, seq: u64) -> Meta {
        Meta::Deliver(meta::Deliver {
            conv,
            seq: Seq(seq),
            sender: UserId(2),
            sender_device: DeviceId(3),
            client_msg_id: ClientMsgId([seq as u8; 16]),
            priority: Priority::Normal,
            ts_ms: 0,
        })
    }

    /// A Deliver of this client's own message `id` (user 1, device 7).
    fn own_deliver(conv: ConvId, seq: u64, id: ClientMsgId) -> Meta {
        Meta::Deliver(meta::Deliver {
            sender: UserId(1),
            sender_device: DeviceId(7),
            client_msg_id: id,
            ..match deliver(conv, seq) {
                Meta::Deliver(d) => d,
                _ => unreachable!(),
            }
        })
    }

    fn body(seq: u64) -> Vec<u8> {
        format!("message {seq}").into_bytes()
    }

    fn feed_deliver(c: &mut Client, now: Instant, conv: ConvId, seq: u64) {
        feed(c, now, deliver(conv, seq), &body(seq));
    }

    fn sync_done(req: u32, gaps: Vec<Gap>, more: Vec<Cursor>) -> Meta {
        Meta::SyncDone(meta::SyncDone {
            req,
            gaps,
            more,
            refused: Vec::new(),
        })
    }

    /// A client that connected and got AuthOk at T0; returns it with its Sync's req. The
    /// Auth and Sync frames and the Authenticated event are consumed.
    fn authenticated(config: ClientConfig, cursors: BTreeMap<ConvId, Seq>) -> (Client, u32) {
        let mut c = Client::new(config, cursors);
        c.handle_connected(T0);
        assert!(matches!(sent_metas(&mut c)[..], [Meta::Auth(_)]));
        feed(&mut c, T0, auth_ok(), &[]);
        let frames = sent_metas(&mut c);
        let [Meta::ListInbox(list)] = &frames[..] else {
            panic!("ListInbox alone after AuthOk, got {frames:?}");
        };
        assert_eq!(list.after, None);
        let page = Meta::InboxPage(meta::InboxPage {
            req: list.req,
            entries: Vec::new(),
            more: false,
        });
        feed(&mut c, T0, page, &[]);
        let frames = sent_metas(&mut c);
        let Some(Meta::Sync(sync)) = frames.first() else {
            panic!("Sync first after the inbox, got {frames:?}");
        };
        let req = sync.req;
        assert!(matches!(
            events(&mut c)[..],
            [ClientEvent::Authenticated { .. }, ClientEvent::Inbox { .. }]
        ));
        (c, req)
    }

    /// Feeds AuthOk, checks that ListInbox alone follows, and answers it with an empty
    /// page; the Authenticated and Inbox events stay queued.
    fn auth_ok_and_empty_inbox(c: &mut Client, now: Instant) {
        feed(c, now, auth_ok(), &[]);
        let frames = sent_metas(c);
        let [Meta::ListInbox(list)] = &frames[..] else {
            panic!("ListInbox alone after AuthOk, got {frames:?}");
        };
        let page = Meta::InboxPage(meta::InboxPage {
            req: list.req,
            entries: Vec::new(),
            more: false,
        });
        feed(c, now, page, &[]);
    }

    /// An authenticated client that knows `conv()` from seq 0, whose Sync was answered with
    /// nothing.
    fn synced(config: ClientConfig) -> Client {
        let (mut c, req) = authenticated(config, BTreeMap::from([(conv(), Seq::ZERO)]));
        feed(&mut c, T0, sync_done(req, vec![], vec![]), &[]);
        assert!(matches!(events(&mut c)[..], [ClientEvent::SyncDone { .. }]));
        assert!(sent(&mut c).is_empty());
        c
    }

    fn messages(events: &[ClientEvent]) -> Vec<(ConvId, u64, Bytes)> {
        events
            .iter()
            .filter_map(|e| match e {
                ClientEvent::Message {
                    conv, seq, payload, ..
                } => Some((*conv, seq.0, payload.clone())),
                _ => None,
            })
            .collect()
    }

    fn pulls(metas: &[Meta]) -> Vec<meta::Pull> {
        metas
            .iter()
            .filter_map(|m| match m {
                Meta::Pull(p) => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    fn sends(metas: &[Meta]) -> Vec<meta::Send> {
        metas
            .iter()
            .filter_map(|m| match m {
                Meta::Send(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    fn send_text(c: &mut Client, now: Instant, text: &str) -> ClientMsgId {
        c.send(now, conv(), Bytes::from(text.to_owned()), Priority::Normal)
            .unwrap()
    }

    #[test]
    fn auth_goes_first_then_sync_with_every_cursor_then_the_outbox_in_send_order() {
        let cursors = BTreeMap::from([(conv(), Seq(5)), (other_conv(), Seq(2))]);
        let mut c = Client::new(config(), cursors);
        let a = send_text(&mut c, T0, "a");
        let b = send_text(&mut c, T0, "b");
        assert!(
            sent(&mut c).is_empty(),
            "nothing is written without a transport"
        );

        c.handle_connected(T0);
        let frames = sent_metas(&mut c);
        assert_eq!(
            frames,
            vec![Meta::Auth(meta::Auth {
                token: "token-of-device-7".into()
            })]
        );
        let d = send_text(&mut c, T0, "d");
        assert!(sent(&mut c).is_empty(), "only Auth before AuthOk");
        assert!(!c.is_authenticated());

        auth_ok_and_empty_inbox(&mut c, T0 + ms(5));
        assert!(c.is_authenticated());
        assert!(matches!(
            events(&mut c)[..],
            [
                ClientEvent::Authenticated {
                    user: UserId(1),
                    ..
                },
                ClientEvent::Inbox { more: false, .. }
            ]
        ));
        let frames = sent(&mut c);
        let kinds: Vec<_> = frames.iter().map(|f| f.kind()).collect();
        use imgate_proto::FrameKind as K;
        assert_eq!(kinds, vec![K::Sync, K::Send, K::Send, K::Send]);
        let Meta::Sync(sync) = &frames[0].meta else {
            unreachable!()
        };
        assert_eq!(
            sync.cursors,
            vec![
                Cursor {
                    conv: other_conv(),
                    seq: Seq(2)
                },
                Cursor {
                    conv: conv(),
                    seq: Seq(5)
                },
            ],
            "every known conversation, in ConvId order"
        );
        let ids: Vec<_> = frames[1..]
            .iter()
            .map(|f| match &f.meta {
                Meta::Send(s) => s.client_msg_id,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, vec![a, b, d]);
        let payloads: Vec<_> = frames[1..].iter().map(|f| f.payload.clone()).collect();
        assert_eq!(payloads, vec!["a", "b", "d"]);
        assert_eq!(c.sends_in_flight(), 3);
    }

    #[test]
    fn duplicate_deliver_is_dropped_and_counted() {
        let mut c = synced(config());
        feed_deliver(&mut c, T0, conv(), 1);
        feed_deliver(&mut c, T0, conv(), 1);
        feed_deliver(&mut c, T0, conv(), 2);
        feed_deliver(&mut c, T0, conv(), 1);
        let got = messages(&events(&mut c));
        assert_eq!(
            got.iter().map(|m| m.1).collect::<Vec<_>>(),
            vec![1, 2],
            "each seq reaches the app once"
        );
        assert_eq!(c.stats().duplicates_dropped, 2);
        assert_eq!(c.cursors()[&conv()], Seq(2));
    }

    fn entry(conv: ConvId, latest: u64) -> InboxEntry {
        InboxEntry {
            conv,
            latest_seq: Seq(latest),
            latest_ts_ms: 1_000 + latest,
            read_seq: Seq::ZERO,
            unread: latest,
        }
    }

    fn third_conv() -> ConvId {
        ConvId::group(77)
    }

    #[test]
    fn the_inbox_is_listed_page_by_page_and_new_conversations_start_at_their_latest_page() {
        let mut c = Client::new(
            ClientConfig {
                newest_page: 10,
                sync_cursors_max: 2,
                ..config()
            },
            BTreeMap::from([(conv(), Seq(3))]),
        );
        c.handle_connected(T0);
        sent(&mut c);
        let a = send_text(&mut c, T0, "queued before AuthOk");
        feed(&mut c, T0, auth_ok(), &[]);
        let [Meta::ListInbox(first)] = &sent_metas(&mut c)[..] else {
            panic!("ListInbox alone after AuthOk");
        };
        let page = Meta::InboxPage(meta::InboxPage {
            req: first.req,
            entries: vec![entry(conv(), 8), entry(other_conv(), 25)],
            more: true,
        });
        feed(&mut c, T0, page, &[]);
        let [Meta::ListInbox(second)] = &sent_metas(&mut c)[..] else {
            panic!("the next page is asked for, and nothing else yet");
        };
        assert_eq!(second.after, Some(other_conv()));
        let page = Meta::InboxPage(meta::InboxPage {
            req: second.req,
            entries: vec![entry(third_conv(), 4)],
            more: false,
        });
        feed(&mut c, T0, page, &[]);
        let inbox_events: Vec<_> = events(&mut c)
            .into_iter()
            .filter_map(|e| match e {
                ClientEvent::Inbox { entries, more } => Some((entries.len(), more)),
                _ => None,
            })
            .collect();
        assert_eq!(inbox_events, vec![(2, true), (1, false)]);
        // Known: its own cursor. New: the latest page (25 - 10), or all of a short one.
        assert_eq!(c.cursors()[&conv()], Seq(3));
        assert_eq!(c.cursors()[&other_conv()], Seq(15));
        assert_eq!(c.cursors()[&third_conv()], Seq(0));
        // Three cursors in Syncs of two: the first Sync, then the outbox.
        let frames = sent_metas(&mut c);
        let Meta::Sync(sync) = &frames[0] else {
            panic!("Sync first after the inbox, got {frames:?}");
        };
        assert_eq!(sync.cursors.len(), 2);
        assert_eq!(
            sends(&frames)
                .iter()
                .map(|s| s.client_msg_id)
                .collect::<Vec<_>>(),
            vec![a]
        );
        feed(&mut c, T0, sync_done(sync.req, vec![], vec![]), &[]);
        let frames = sent_metas(&mut c);
        let [Meta::Sync(rest)] = &frames[..] else {
            panic!("the second Sync after the first is answered, got {frames:?}");
        };
        let all: BTreeMap<ConvId, Seq> = sync
            .cursors
            .iter()
            .chain(&rest.cursors)
            .map(|c| (c.conv, c.seq))
            .collect();
        assert_eq!(&all, c.cursors(), "every cursor once over the two Syncs");
        feed(&mut c, T0, sync_done(rest.req, vec![], vec![]), &[]);
        assert!(sent_metas(&mut c)
            .iter()
            .all(|m| !matches!(m, Meta::Sync(_))));
    }

    #[test]
    fn a_listing_that_fails_lets_the_sync_go_on_with_what_is_known() {
        let mut c = Client::new(config(), BTreeMap::from([(conv(), Seq(3))]));
        c.handle_connected(T0);
        sent(&mut c);
        feed(&mut c, T0, auth_ok(), &[]);
        assert!(matches!(sent_metas(&mut c)[..], [Meta::ListInbox(_)]));
        c.handle_timeout(T0 + config().request_timeout);
        let frames = sent_metas(&mut c);
        let Some(Meta::Sync(sync)) = frames.first() else {
            panic!("Sync after the listing timed out, got {frames:?}");
        };
        assert_eq!(
            sync.cursors,
            vec![Cursor {
                conv: conv(),
                seq: Seq(3)
            }]
        );
    }

    #[test]
    fn a_conversation_first_met_live_starts_at_its_first_deliver() {
        let mut c = synced(config());
        feed_deliver(&mut c, T0, other_conv(), 41);
        feed_deliver(&mut c, T0, other_conv(), 42);
        let got: Vec<u64> = messages(&events(&mut c)).iter().map(|m| m.1).collect();
        assert_eq!(got, vec![41, 42], "no pull of the 40 before it");
        assert!(pulls(&sent_metas(&mut c)).is_empty());
        assert_eq!(c.cursors()[&other_conv()], Seq(42));
    }

    #[test]
    fn older_history_comes_backwards_as_history_events() {
        let mut c = synced(ClientConfig {
            auto_pull: false,
            ..config()
        });
        feed_deliver(&mut c, T0, other_conv(), 41);
        events(&mut c);
        sent(&mut c);
        assert!(matches!(
            c.pull_before(T0, other_conv(), Seq(1), 5),
            Err(ClientError::NothingBefore(_))
        ));
        let req = c.pull_before(T0, other_conv(), Seq(41), 5).unwrap();
        let p = pulls(&sent_metas(&mut c));
        assert_eq!(p.len(), 1);
        assert!(p[0].backward);
        assert_eq!((p[0].from_seq, p[0].limit), (Seq(40), 5));
        assert!(
            c.pull_before(T0, other_conv(), Seq(41), 5).is_err(),
            "one backward pull per conversation at a time"
        );
        for seq in 36..=41 {
            feed_deliver(&mut c, T0, other_conv(), seq);
        }
        let result = Meta::PullResult(meta::PullResult {
            req,
            conv: other_conv(),
            from_seq: Seq(36),
            to_seq: Seq(40),
            latest_seq: Seq(41),
            available_from: Seq(0),
        });
        feed(&mut c, T0, result, &[]);
        let ev = events(&mut c);
        let history: Vec<u64> = ev
            .iter()
            .filter_map(|e| match e {
                ClientEvent::History { seq, .. } => Some(seq.0),
                _ => None,
            })
            .collect();
        assert_eq!(
            history,
            vec![36, 37, 38, 39, 40],
            "41 is a duplicate, not history"
        );
        assert!(messages(&ev).is_empty());
        assert_eq!(c.cursors()[&other_conv()], Seq(41));
        feed_deliver(&mut c, T0, other_conv(), 39);
        assert!(
            events(&mut c).is_empty(),
            "after the PullDone a repeat is a duplicate"
        );
    }

    #[test]
    fn out_of_order_delivers_are_buffered_and_released_in_seq_order() {
        let mut c = synced(ClientConfig {
            auto_pull: false,
            ..config()
        });
        feed_deliver(&mut c, T0, conv(), 3);
        feed_deliver(&mut c, T0, conv(), 2);
        feed_deliver(&mut c, T0, conv(), 3);
        assert!(messages(&events(&mut c)).is_empty());
        assert_eq!(c.stats().reordered_buffered, 2);
        assert_eq!(c.stats().duplicates_dropped, 1);
        assert!(
            sent(&mut c).is_empty(),
            "no Pull without auto_pull, no DeliveryAck yet"
        );

        feed_deliver(&mut c, T0, conv(), 1);
        let got = messages(&events(&mut c));
        assert_eq!(
            got,
            vec![
                (conv(), 1, Bytes::from(body(1))),
                (conv(), 2, Bytes::from(body(2))),
                (conv(), 3, Bytes::from(body(3))),
            ]
        );
        assert_eq!(c.cursors()[&conv()], Seq(3));
        assert_eq!(
            sent_metas(&mut c),
            vec![Meta::DeliveryAck(meta::DeliveryAck {
                conv: conv(),
                seq: Seq(3)
            })],
            "one cumulative DeliveryAck for the three"
        );
    }

    #[test]
    fn a_delivery_ack_waits_its_delay_unless_another_frame_goes_first() {
        let ack = |seq| {
            Meta::DeliveryAck(meta::DeliveryAck {
                conv: conv(),
                seq: Seq(seq),
            })
        };
        let mut c = synced(ClientConfig {
            delivery_ack_delay: ms(200),
            ..config()
        });
        feed_deliver(&mut c, T0, conv(), 1);
        feed_deliver(&mut c, T0 + ms(150), conv(), 2);
        assert!(sent(&mut c).is_empty(), "held for the delay");
        assert_eq!(
            c.poll_timeout(),
            Some(T0 + ms(200)),
            "the timer is armed at the first move's deadline"
        );
        c.handle_timeout(T0 + ms(199));
        assert!(sent(&mut c).is_empty());
        c.handle_timeout(T0 + ms(200));
        assert_eq!(
            sent_metas(&mut c),
            vec![ack(2)],
            "one ack for both, on time"
        );
        assert!(c.poll_timeout() > Some(T0 + ms(200)), "nothing left to ack");

        // A Send going out carries the pending ack along, before its deadline.
        feed_deliver(&mut c, T0 + ms(300), conv(), 3);
        c.send(
            T0 + ms(301),
            conv(),
            Bytes::from_static(b"hi"),
            Priority::Normal,
        )
        .unwrap();
        let metas = sent_metas(&mut c);
        assert!(matches!(metas[..], [Meta::Send(_), _]), "{metas:?}");
        assert_eq!(metas[1], ack(3));
        assert!(sent(&mut c).is_empty());
    }

    #[test]
    fn delivery_acks_are_coalesced_per_conversation_per_transmit() {
        let mut c = synced(config());
        for seq in 1..=4 {
            feed_deliver(&mut c, T0, conv(), seq);
        }
        feed_deliver(&mut c, T0, other_conv(), 1);
        let acks = sent_metas(&mut c);
        assert_eq!(
            acks,
            vec![
                Meta::DeliveryAck(meta::DeliveryAck {
                    conv: other_conv(),
                    seq: Seq(1)
                }),
                Meta::DeliveryAck(meta::DeliveryAck {
                    conv: conv(),
                    seq: Seq(4)
                }),
            ],
            "one cumulative ack per conversation, in ConvId order"
        );
        assert!(sent(&mut c).is_empty());
    }

    #[test]
    fn reorder_buffer_overflow_drops_the_highest_seq() {
        let mut c = synced(ClientConfig {
            auto_pull: false,
            reorder_max_per_conv: 2,
            ..config()
        });
        for seq in [4, 3, 5, 2] {
            feed_deliver(&mut c, T0, conv(), seq);
        }
        assert_eq!(c.stats().reorder_overflow_dropped, 2);
        feed_deliver(&mut c, T0, conv(), 1);
        let got: Vec<u64> = messages(&events(&mut c)).iter().map(|m| m.1).collect();
        assert_eq!(
            got,
            vec![1, 2, 3],
            "4 and 5 were dropped and are left to Pull"
        );
    }

    #[test]
    fn a_gap_triggers_one_pull_from_the_cursor_when_auto_pull() {
        let mut c = synced(config());
        feed_deliver(&mut c, T0, conv(), 1);
        sent(&mut c);
        feed_deliver(&mut c, T0, conv(), 4);
        let frames = sent_metas(&mut c);
        let p = pulls(&frames);
        assert_eq!(p.len(), 1, "{frames:?}");
        assert_eq!(p[0].conv, conv());
        assert_eq!(p[0].from_seq, Seq(2));
        assert_eq!(p[0].limit, config().pull_limit);

        feed_deliver(&mut c, T0, conv(), 5);
        assert!(
            pulls(&sent_metas(&mut c)).is_empty(),
            "one Pull per conversation in flight"
        );

        // The Pull's answer fills the gap; nothing is missing, so no further Pull.
        feed_deliver(&mut c, T0, conv(), 2);
        feed_deliver(&mut c, T0, conv(), 3);
        let result = Meta::PullResult(meta::PullResult {
            req: p[0].req,
            conv: conv(),
            from_seq: Seq(2),
            to_seq: Seq(5),
            latest_seq: Seq(5),
            available_from: Seq(0),
        });
        feed(&mut c, T0, result, &[]);
        let ev = events(&mut c);
        let got: Vec<u64> = messages(&ev).iter().map(|m| m.1).collect();
        assert_eq!(got, vec![1, 2, 3, 4, 5]);
        assert!(ev.iter().any(|e| matches!(e, ClientEvent::PullDone { .. })));
        assert!(pulls(&sent_metas(&mut c)).is_empty());
    }

    #[test]
    fn a_gap_does_not_pull_without_auto_pull() {
        let mut c = synced(ClientConfig {
            auto_pull: false,
            ..config()
        });
        feed_deliver(&mut c, T0, conv(), 3);
        feed(
            &mut c,
            T0,
            Meta::Notify(meta::Notify {
                conv: conv(),
                latest_seq: Seq(9),
            }),
            &[],
        );
        assert!(pulls(&sent_metas(&mut c)).is_empty());
    }

    #[test]
    fn gap_pulls_wait_for_the_sync_to_be_answered() {
        let (mut c, sync_req) = authenticated(config(), BTreeMap::from([(conv(), Seq::ZERO)]));
        feed_deliver(&mut c, T0, conv(), 3);
        assert!(
            pulls(&sent_metas(&mut c)).is_empty(),
            "the Sync replay may still fill the gap"
        );
        feed(&mut c, T0, sync_done(sync_req, vec![], vec![]), &[]);
        let p = pulls(&sent_metas(&mut c));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].from_seq, Seq(1));
    }

    #[test]
    fn ack_is_matched_by_client_msg_id_even_when_the_req_differs() {
        let mut c = synced(config());
        let id = send_text(&mut c, T0, "hello");
        let s = sends(&sent_metas(&mut c));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].client_msg_id, id);
        let ack = |req| {
            Meta::Ack(meta::Ack {
                req,
                client_msg_id: id,
                conv: conv(),
                seq: Seq(1),
            })
        };
        feed(&mut c, T0 + ms(3), ack(s[0].req.wrapping_add(100)), &[]);
        assert_eq!(
            events(&mut c),
            vec![ClientEvent::Acked {
                client_msg_id: id,
                conv: conv(),
                seq: Seq(1)
            }]
        );
        assert_eq!(c.outbox_len(), 0);
        assert_eq!(c.pending_requests(), 0, "the Send's request is finished");

        feed(&mut c, T0 + ms(4), ack(s[0].req), &[]);
        assert!(
            events(&mut c).is_empty(),
            "a repeated Ack is not reported twice"
        );
        assert_eq!(c.stats().stale_responses, 1);
    }

    #[test]
    fn an_acked_own_message_advances_the_cursor_without_a_message_event() {
        let mut c = synced(config());
        feed_deliver(&mut c, T0, conv(), 1);
        let id = send_text(&mut c, T0, "mine");
        let s = sends(&sent_metas(&mut c));
        // Seq 2 went to someone else; ours is 3.
        let ack = Meta::Ack(meta::Ack {
            req: s[0].req,
            client_msg_id: id,
            conv: conv(),
            seq: Seq(3),
        });
        feed(&mut c, T0, ack, &[]);
        feed_deliver(&mut c, T0, conv(), 2);
        feed_deliver(&mut c, T0, conv(), 4);
        let got: Vec<u64> = messages(&events(&mut c)).iter().map(|m| m.1).collect();
        assert_eq!(got, vec![1, 2, 4]);
        assert_eq!(c.cursors()[&conv()], Seq(4));
        assert!(pulls(&sent_metas(&mut c)).is_empty());
    }

    #[test]
    fn an_own_message_replayed_before_its_ack_is_reported_once_as_acked() {
        let mut c = synced(config());
        let id = send_text(&mut c, T0, "mine");
        let _ = sent_metas(&mut c);
        // The Ack is lost with the connection; the replay brings the message back first.
        c.handle_disconnected(T0);
        let _ = events(&mut c);
        c.handle_connected(T0);
        let _ = sent_metas(&mut c);
        feed(&mut c, T0, auth_ok(), &[]);
        let own = own_deliver(conv(), 1, id);
        feed(&mut c, T0, own, b"mine");
        // The resend's Ack arrives later and must not report it again.
        let ack = Meta::Ack(meta::Ack {
            req: 99,
            client_msg_id: id,
            conv: conv(),
            seq: Seq(1),
        });
        feed(&mut c, T0, ack, &[]);
        let evs = events(&mut c);
        assert!(
            messages(&evs).is_empty(),
            "own message shown as a Message: {evs:?}"
        );
        let acked = evs
            .iter()
            .filter(
                |e| matches!(e, ClientEvent::Acked { client_msg_id, .. } if *client_msg_id == id),
            )
            .count();
        assert_eq!(acked, 1, "{evs:?}");
        assert_eq!(c.outbox_len(), 0);
        assert_eq!(c.cursors()[&conv()], Seq(1));
    }

    #[test]
    fn a_restored_outbox_is_resent_with_its_ids_and_a_replayed_copy_counts_as_its_ack() {
        // The first run sends two messages and dies before either Ack; the app persisted them.
        let mut first = synced(config());
        let a = send_text(&mut first, T0, "a");
        let b = send_text(&mut first, T0, "b");
        let _ = sent_metas(&mut first);

        // The next run restores them (a repeated restore is a no-op) and sends one more.
        let mut c = Client::new(
            ClientConfig {
                seed: 43,
                ..config()
            },
            BTreeMap::new(),
        );
        for (id, text) in [(a, "a"), (b, "b"), (a, "a")] {
            let payload = Bytes::from_static(text.as_bytes());
            c.restore_unacked(id, conv(), payload, Priority::Normal)
                .unwrap();
        }
        assert_eq!(c.outbox_len(), 2);
        let d = send_text(&mut c, T0, "d");
        assert!(sent(&mut c).is_empty(), "nothing before AuthOk");
        c.handle_connected(T0);
        assert!(matches!(sent_metas(&mut c)[..], [Meta::Auth(_)]));
        auth_ok_and_empty_inbox(&mut c, T0);
        let frames = sent(&mut c);
        assert_eq!(frames[0].kind(), imgate_proto::FrameKind::Sync);
        let metas: Vec<Meta> = frames.iter().map(|f| f.meta.clone()).collect();
        let ids: Vec<ClientMsgId> = sends(&metas).iter().map(|s| s.client_msg_id).collect();
        assert_eq!(ids, vec![a, b, d]);
        assert_eq!(frames[1].payload, "a");

        // `a` became durable before the crash: the Sync replays it, and that is its Ack.
        let own = own_deliver(conv(), 1, a);
        feed(&mut c, T0, own, b"a");
        let evs = events(&mut c);
        assert!(messages(&evs).is_empty(), "{evs:?}");
        assert!(evs.contains(&ClientEvent::Acked {
            client_msg_id: a,
            conv: conv(),
            seq: Seq(1)
        }));
        assert_eq!(c.outbox_len(), 2);
        let bad = c.restore_unacked(a, ConvId { hi: 0, lo: 0 }, Bytes::new(), Priority::Normal);
        assert!(matches!(bad, Err(ClientError::InvalidConversation(_))));
    }

    #[test]
    fn sends_beyond_the_in_flight_limit_wait_and_go_out_in_order_as_acks_free_room() {
        let mut c = synced(ClientConfig {
            inflight_sends_max: 2,
            ..config()
        });
        let ids: Vec<_> = (0..3)
            .map(|i| send_text(&mut c, T0, &i.to_string()))
            .collect();
        let s = sends(&sent_metas(&mut c));
        assert_eq!(
            s.iter().map(|s| s.client_msg_id).collect::<Vec<_>>(),
            ids[..2].to_vec()
        );
        assert_eq!(c.outbox_len(), 3, "the third waits, it is not dropped");
        let ack = Meta::Ack(meta::Ack {
            req: s[0].req,
            client_msg_id: ids[0],
            conv: conv(),
            seq: Seq(1),
        });
        feed(&mut c, T0, ack, &[]);
        let s = sends(&sent_metas(&mut c));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].client_msg_id, ids[2]);
    }

    #[test]
    fn a_full_outbox_refuses_new_messages() {
        let mut c = Client::new(
            ClientConfig {
                outbox_max: 2,
                ..config()
            },
            BTreeMap::new(),
        );
        send_text(&mut c, T0, "a");
        send_text(&mut c, T0, "b");
        assert_eq!(
            c.send(T0, conv(), Bytes::from_static(b"c"), Priority::Normal),
            Err(ClientError::OutboxFull { max: 2 })
        );
        assert_eq!(c.outbox_len(), 2);
    }

    #[test]
    fn a_final_nack_drops_the_message_and_a_retriable_one_keeps_it() {
        let mut c = synced(config());
        let a = send_text(&mut c, T0, "a");
        let b = send_text(&mut c, T0, "b");
        let s = sends(&sent_metas(&mut c));
        let nack = |i: usize, id, code| {
            Meta::Nack(meta::Nack {
                req: s[i].req,
                client_msg_id: id,
                conv: conv(),
                code,
                message: "no".into(),
            })
        };
        feed(&mut c, T0, nack(0, a, ErrorCode::NotMember), &[]);
        feed(&mut c, T0, nack(1, b, ErrorCode::StorageFailed), &[]);
        let ev = events(&mut c);
        assert!(matches!(
            &ev[..],
            [
                ClientEvent::Nacked {
                    code: ErrorCode::NotMember,
                    retriable: false,
                    ..
                },
                ClientEvent::Nacked {
                    code: ErrorCode::StorageFailed,
                    retriable: true,
                    ..
                }
            ]
        ));
        assert_eq!(c.outbox_len(), 1);
        assert_eq!(c.retry(T0, a), RetryOutcome::Unknown);
        assert_eq!(c.retry(T0, b), RetryOutcome::Sent);
        let s = sends(&sent_metas(&mut c));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].client_msg_id, b);
        assert_eq!(c.retry(T0, b), RetryOutcome::InFlight);
    }

    #[test]
    fn disconnect_fails_in_flight_sends_and_reconnect_resends_them_with_the_same_ids() {
        let mut c = synced(config());
        let a = send_text(&mut c, T0, "a");
        let b = send_text(&mut c, T0, "b");
        let first = sends(&sent_metas(&mut c));
        assert_eq!(first.len(), 2);

        c.handle_disconnected(T0 + ms(10));
        assert_eq!(
            events(&mut c),
            vec![
                ClientEvent::SendFailed {
                    client_msg_id: a,
                    conv: conv(),
                    reason: SendFailure::Disconnected
                },
                ClientEvent::SendFailed {
                    client_msg_id: b,
                    conv: conv(),
                    reason: SendFailure::Disconnected
                },
            ]
        );
        assert_eq!(c.outbox_len(), 2);
        assert_eq!(c.pending_requests(), 0);
        assert_eq!(c.poll_timeout(), None);
        let d = send_text(&mut c, T0 + ms(20), "d");
        assert!(sent(&mut c).is_empty());

        c.handle_connected(T0 + ms(30));
        assert!(matches!(sent_metas(&mut c)[..], [Meta::Auth(_)]));
        auth_ok_and_empty_inbox(&mut c, T0 + ms(40));
        let frames = sent(&mut c);
        assert_eq!(frames[0].kind(), imgate_proto::FrameKind::Sync);
        let metas: Vec<Meta> = frames.iter().map(|f| f.meta.clone()).collect();
        let again = sends(&metas);
        assert_eq!(
            again.iter().map(|s| s.client_msg_id).collect::<Vec<_>>(),
            vec![a, b, d]
        );
        assert_eq!(frames[1].payload, "a");
        assert_eq!(c.stats().sends_resent, 2);

        // The Ack on the new connection is matched.
        let ack = Meta::Ack(meta::Ack {
            req: again[1].req,
            client_msg_id: b,
            conv: conv(),
            seq: Seq(2),
        });
        feed(&mut c, T0 + ms(50), ack, &[]);
        let ev = events(&mut c);
        assert!(ev.contains(&ClientEvent::Acked {
            client_msg_id: b,
            conv: conv(),
            seq: Seq(2)
        }));
        assert_eq!(c.outbox_len(), 2);
    }

    #[test]
    fn parked_messages_are_resent_after_the_next_auth_ok() {
        let mut c = synced(config());
        let a = send_text(&mut c, T0, "a");
        let b = send_text(&mut c, T0, "b");
        let s = sends(&sent_metas(&mut c));
        // `a` is nacked retriably, `b` times out: both wait, neither is re-sent by itself.
        let nack = Meta::Nack(meta::Nack {
            req: s[0].req,
            client_msg_id: a,
            conv: conv(),
            code: ErrorCode::TooManyInflight,
            message: String::new(),
        });
        feed(&mut c, T0, nack, &[]);
        c.handle_timeout(T0 + config().request_timeout);
        assert!(sends(&sent_metas(&mut c)).is_empty());
        assert_eq!(c.outbox_len(), 2);

        c.handle_disconnected(T0 + config().request_timeout);
        c.handle_connected(T0 + config().request_timeout);
        assert!(matches!(sent_metas(&mut c)[..], [Meta::Auth(_)]));
        auth_ok_and_empty_inbox(&mut c, T0 + config().request_timeout);
        let again = sends(&sent_metas(&mut c));
        assert_eq!(
            again.iter().map(|s| s.client_msg_id).collect::<Vec<_>>(),
            vec![a, b]
        );
    }

    #[test]
    fn disconnect_fails_pending_sync_and_pulls() {
        let (mut c, sync_req) = authenticated(config(), BTreeMap::new());
        let pull_req = c.pull(T0, conv(), Seq(1), 10).unwrap();
        c.handle_disconnected(T0);
        assert_eq!(
            events(&mut c),
            vec![
                ClientEvent::SyncFailed {
                    req: sync_req,
                    reason: RequestFailure::Disconnected
                },
                ClientEvent::PullFailed {
                    req: pull_req,
                    conv: conv(),
                    reason: RequestFailure::Disconnected
                },
            ]
        );
        assert_eq!(c.pull(T0, conv(), Seq(1), 10), Err(ClientError::NotReady));
    }

    #[test]
    fn an_unanswered_send_times_out_and_a_retry_keeps_its_id() {
        let mut c = synced(config());
        let timeout = config().request_timeout;
        let sent_at = T0 + ms(100);
        let id = send_text(&mut c, sent_at, "x");
        let first = sends(&sent_metas(&mut c));
        assert_eq!(c.poll_timeout(), Some(sent_at + timeout));

        c.handle_timeout(sent_at + (timeout - ms(1)));
        assert!(events(&mut c).is_empty());
        // Keep the connection alive (a Pong) so only the request expires.
        feed(
            &mut c,
            sent_at + (timeout - ms(1)),
            Meta::Pong(meta::Pong { nonce: 0 }),
            &[],
        );
        c.handle_timeout(sent_at + timeout);
        assert_eq!(
            events(&mut c),
            vec![ClientEvent::SendFailed {
                client_msg_id: id,
                conv: conv(),
                reason: SendFailure::Timeout
            }]
        );
        assert_eq!(c.outbox_len(), 1, "a timed-out message stays in the outbox");
        assert_eq!(c.sends_in_flight(), 0);

        assert_eq!(c.retry(sent_at + timeout, id), RetryOutcome::Sent);
        let second = sends(&sent_metas(&mut c));
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].client_msg_id, id);
        assert_ne!(second[0].req, first[0].req);

        // The Ack of the first attempt arrives late and still settles the message.
        let ack = Meta::Ack(meta::Ack {
            req: first[0].req,
            client_msg_id: id,
            conv: conv(),
            seq: Seq(1),
        });
        feed(&mut c, sent_at + timeout + ms(1), ack, &[]);
        assert!(matches!(events(&mut c)[..], [ClientEvent::Acked { .. }]));
        assert_eq!(c.outbox_len(), 0);
        assert_eq!(c.pending_requests(), 0);
    }

    #[test]
    fn an_unanswered_pull_times_out() {
        let mut c = synced(config());
        let req = c.pull(T0, conv(), Seq(1), 10).unwrap();
        c.handle_timeout(T0 + config().request_timeout);
        assert_eq!(
            events(&mut c),
            vec![ClientEvent::PullFailed {
                req,
                conv: conv(),
                reason: RequestFailure::Timeout
            }]
        );
    }

    #[test]
    fn an_idle_connection_pings_after_one_interval_and_is_dead_after_two_silent_ones() {
        let mut c = synced(config());
        let hb = ms(u64::from(HEARTBEAT_MS));
        assert_eq!(c.poll_timeout(), Some(T0 + hb));
        c.handle_timeout(T0 + (hb - ms(1)));
        assert!(sent(&mut c).is_empty());

        c.handle_timeout(T0 + hb);
        let frames = sent_metas(&mut c);
        assert!(matches!(frames[..], [Meta::Ping(_)]), "{frames:?}");
        assert_eq!(c.poll_timeout(), Some(T0 + hb * 2));
        assert!(events(&mut c).is_empty());

        c.handle_timeout(T0 + (hb * 2 - ms(1)));
        assert!(events(&mut c).is_empty());
        c.handle_timeout(T0 + hb * 2);
        assert_eq!(events(&mut c), vec![ClientEvent::Dead]);
        assert!(!c.is_authenticated());
        assert_eq!(c.poll_timeout(), None);
        assert!(sent(&mut c).is_empty());
    }

    #[test]
    fn anything_received_keeps_the_connection_alive() {
        let mut c = synced(config());
        let hb = ms(u64::from(HEARTBEAT_MS));
        c.handle_timeout(T0 + hb);
        sent(&mut c);
        feed(
            &mut c,
            T0 + hb + ms(10),
            Meta::Pong(meta::Pong { nonce: 1 }),
            &[],
        );
        c.handle_timeout(T0 + hb * 2);
        assert!(
            events(&mut c).is_empty(),
            "a Pong resets the liveness deadline"
        );
        assert!(matches!(sent_metas(&mut c)[..], [Meta::Ping(_)]));
    }

    #[test]
    fn a_gateway_ping_is_answered_with_its_nonce() {
        let mut c = synced(config());
        feed(&mut c, T0, Meta::Ping(meta::Ping { nonce: 77 }), &[]);
        assert_eq!(
            sent_metas(&mut c),
            vec![Meta::Pong(meta::Pong { nonce: 77 })]
        );
    }

    #[test]
    fn notify_beyond_the_cursor_triggers_a_pull_until_caught_up() {
        let mut c = synced(ClientConfig {
            pull_limit: 2,
            ..config()
        });
        let notify = |latest| {
            Meta::Notify(meta::Notify {
                conv: conv(),
                latest_seq: Seq(latest),
            })
        };
        feed(&mut c, T0, notify(3), &[]);
        assert_eq!(
            events(&mut c),
            vec![ClientEvent::Notify {
                conv: conv(),
                latest_seq: Seq(3)
            }]
        );
        let p = pulls(&sent_metas(&mut c));
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].from_seq, p[0].limit), (Seq(1), 2));

        // The first batch stops at the limit: the client pulls the rest by itself.
        feed_deliver(&mut c, T0, conv(), 1);
        feed_deliver(&mut c, T0, conv(), 2);
        let result = |req, from, to| {
            Meta::PullResult(meta::PullResult {
                req,
                conv: conv(),
                from_seq: Seq(from),
                to_seq: Seq(to),
                latest_seq: Seq(3),
                available_from: Seq(0),
            })
        };
        feed(&mut c, T0, result(p[0].req, 1, 2), &[]);
        let p2 = pulls(&sent_metas(&mut c));
        assert_eq!(p2.len(), 1);
        assert_eq!(p2[0].from_seq, Seq(3));
        feed_deliver(&mut c, T0, conv(), 3);
        feed(&mut c, T0, result(p2[0].req, 3, 3), &[]);
        assert!(pulls(&sent_metas(&mut c)).is_empty());
        let got: Vec<u64> = messages(&events(&mut c)).iter().map(|m| m.1).collect();
        assert_eq!(got, vec![1, 2, 3]);

        // A Notify at or below the cursor asks for nothing.
        feed(&mut c, T0, notify(3), &[]);
        assert!(pulls(&sent_metas(&mut c)).is_empty());
    }

    #[test]
    fn a_pull_answered_with_nothing_is_not_repeated_by_itself() {
        let mut c = synced(config());
        feed(
            &mut c,
            T0,
            Meta::Notify(meta::Notify {
                conv: conv(),
                latest_seq: Seq(5),
            }),
            &[],
        );
        let p = pulls(&sent_metas(&mut c));
        let empty = Meta::PullResult(meta::PullResult {
            req: p[0].req,
            conv: conv(),
            from_seq: Seq(0),
            to_seq: Seq(0),
            latest_seq: Seq(5),
            available_from: Seq(0),
        });
        feed(&mut c, T0, empty, &[]);
        assert!(pulls(&sent_metas(&mut c)).is_empty());
    }

    #[test]
    fn sync_done_gap_emits_history_gap_and_advances_the_cursor() {
        let (mut c, sync_req) = authenticated(config(), BTreeMap::from([(conv(), Seq(2))]));
        // The replay starts after the gap.
        feed_deliver(&mut c, T0, conv(), 8);
        let gap = Gap {
            conv: conv(),
            from_seq: Seq(3),
            to_seq: Seq(7),
        };
        feed(&mut c, T0, sync_done(sync_req, vec![gap], vec![]), &[]);
        let ev = events(&mut c);
        assert_eq!(
            ev[0],
            ClientEvent::HistoryGap {
                conv: conv(),
                from_seq: Seq(3),
                to_seq: Seq(7)
            }
        );
        assert!(matches!(ev[1], ClientEvent::Message { seq: Seq(8), .. }));
        assert!(matches!(ev[2], ClientEvent::SyncDone { .. }));
        assert_eq!(c.cursors()[&conv()], Seq(8));
        assert_eq!(
            sent_metas(&mut c),
            vec![Meta::DeliveryAck(meta::DeliveryAck {
                conv: conv(),
                seq: Seq(8)
            })],
            "the gap is closed, so nothing is pulled"
        );
    }

    #[test]
    fn sync_done_more_pulls_from_the_cursor() {
        let (mut c, sync_req) = authenticated(config(), BTreeMap::from([(conv(), Seq(2))]));
        let more = Cursor {
            conv: conv(),
            seq: Seq(2),
        };
        feed(&mut c, T0, sync_done(sync_req, vec![], vec![more]), &[]);
        let p = pulls(&sent_metas(&mut c));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].from_seq, Seq(3));
    }

    #[test]
    fn pull_result_available_from_reports_the_gap_and_delivers_what_is_held() {
        let mut c = synced(ClientConfig {
            auto_pull: false,
            ..config()
        });
        let req = c.pull(T0, conv(), Seq(1), 100).unwrap();
        // Seq 4 arrived earlier and is held; 1..=5 are gone; 6 follows.
        feed_deliver(&mut c, T0, conv(), 4);
        feed_deliver(&mut c, T0, conv(), 6);
        let result = Meta::PullResult(meta::PullResult {
            req,
            conv: conv(),
            from_seq: Seq(6),
            to_seq: Seq(6),
            latest_seq: Seq(6),
            available_from: Seq(6),
        });
        feed(&mut c, T0, result, &[]);
        let ev: Vec<_> = events(&mut c)
            .into_iter()
            .filter(|e| {
                matches!(
                    e,
                    ClientEvent::Message { .. } | ClientEvent::HistoryGap { .. }
                )
            })
            .collect();
        let summary: Vec<String> = ev
            .iter()
            .map(|e| match e {
                ClientEvent::Message { seq, .. } => format!("m{seq}"),
                ClientEvent::HistoryGap {
                    from_seq, to_seq, ..
                } => format!("gap{from_seq}-{to_seq}"),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(summary, vec!["gap1-3", "m4", "gap5-5", "m6"]);
        assert_eq!(c.cursors()[&conv()], Seq(6));
    }

    #[test]
    fn an_error_naming_a_pending_pull_fails_only_that_pull() {
        let mut c = synced(config());
        let req = c.pull(T0, conv(), Seq(1), 10).unwrap();
        let error = Meta::Error(meta::Error {
            code: ErrorCode::BadRequest,
            message: "bad".into(),
            req,
        });
        feed(&mut c, T0, error, &[]);
        assert!(matches!(
            events(&mut c)[..],
            [ClientEvent::PullFailed {
                reason: RequestFailure::Rejected {
                    code: ErrorCode::BadRequest,
                    ..
                },
                ..
            }]
        ));
        assert!(c.is_authenticated());
    }

    #[test]
    fn go_away_and_connection_errors_close() {
        let mut c = synced(config());
        let go_away = Meta::GoAway(meta::GoAway {
            code: ErrorCode::ShuttingDown,
            message: "drain".into(),
            reconnect_after_ms: 500,
        });
        feed(&mut c, T0, go_away, &[]);
        assert_eq!(
            events(&mut c),
            vec![ClientEvent::Closed {
                code: ErrorCode::ShuttingDown,
                message: "drain".into(),
                reconnect_after: Some(ms(500)),
                by_gateway: true
            }]
        );
        assert!(!c.is_authenticated());
        assert_eq!(c.poll_timeout(), None);

        let (mut c, _) = authenticated(config(), BTreeMap::new());
        let error = Meta::Error(meta::Error {
            code: ErrorCode::SessionTakenOver,
            message: "elsewhere".into(),
            req: 0,
        });
        feed(&mut c, T0, error, &[]);
        assert!(matches!(
            events(&mut c)[..],
            [ClientEvent::Closed {
                code: ErrorCode::SessionTakenOver,
                by_gateway: true,
                ..
            }]
        ));
    }

    #[test]
    fn a_decode_error_closes_the_connection_with_a_reason() {
        let mut c = synced(config());
        let mut garbage = BytesMut::from(&b"XXXXXXXXXXXXXXXXXXXXXXXX"[..]);
        c.handle_bytes(T0, &mut garbage);
        assert!(matches!(
            events(&mut c)[..],
            [ClientEvent::Closed {
                code: ErrorCode::BadMagic,
                by_gateway: false,
                ..
            }]
        ));
        assert!(matches!(
            sent_metas(&mut c)[..],
            [Meta::Error(meta::Error {
                code: ErrorCode::BadMagic,
                ..
            })]
        ));
        // Whatever follows is ignored until the driver reconnects.
        feed_deliver(&mut c, T0, conv(), 1);
        assert!(events(&mut c).is_empty());
        assert_eq!(c.cursors().get(&conv()), Some(&Seq::ZERO));
    }

    #[test]
    fn a_deliver_before_auth_ok_is_a_protocol_violation() {
        let mut c = Client::new(config(), BTreeMap::new());
        c.handle_connected(T0);
        sent(&mut c);
        feed_deliver(&mut c, T0, conv(), 1);
        assert!(matches!(
            events(&mut c)[..],
            [ClientEvent::Closed {
                code: ErrorCode::UnexpectedFrame,
                by_gateway: false,
                ..
            }]
        ));
        assert!(sent(&mut c).is_empty(), "nothing but Auth before AuthOk");
    }

    #[test]
    fn frames_split_across_reads_are_reassembled() {
        let mut c = synced(config());
        let mut enc = Encoder::new();
        let mut stream = BytesMut::new();
        for seq in 1..=3 {
            stream.extend_from_slice(&enc.encode_to_bytes(&deliver(conv(), seq), &body(seq)));
        }
        let mut buf = BytesMut::new();
        for byte in stream.iter() {
            buf.extend_from_slice(&[*byte]);
            c.handle_bytes(T0, &mut buf);
        }
        let got: Vec<u64> = messages(&events(&mut c)).iter().map(|m| m.1).collect();
        assert_eq!(got, vec![1, 2, 3]);
    }

    #[test]
    fn client_msg_ids_are_unique_and_deterministic_per_seed() {
        let ids = |seed: u64| {
            let mut c = Client::new(
                ClientConfig {
                    seed,
                    outbox_max: 1000,
                    ..config()
                },
                BTreeMap::new(),
            );
            (0..1000)
                .map(|_| send_text(&mut c, T0, "x"))
                .collect::<Vec<_>>()
        };
        let a = ids(1);
        assert_eq!(a, ids(1), "the same seed makes the same ids");
        let b = ids(2);
        assert!(
            a.iter().zip(&b).all(|(x, y)| x != y),
            "another seed, other ids"
        );
        let unique: BTreeSet<_> = a.iter().collect();
        assert_eq!(unique.len(), a.len(), "unique within one millisecond");
        let id = a[0].0;
        assert_eq!(id[0], CLIENT_MSG_ID_VERSION);
        assert_eq!(id[1..4], [0, 0, 7], "the device's low 3 bytes");
        assert_eq!(
            id[4..10],
            T0.as_millis().to_be_bytes()[2..8],
            "the time in ms"
        );
    }

    #[test]
    fn invalid_app_input_is_refused_without_queueing() {
        let mut c = synced(config());
        let bad = ConvId { hi: 5, lo: 1 };
        assert_eq!(
            c.send(T0, bad, Bytes::new(), Priority::Normal),
            Err(ClientError::InvalidConversation(bad))
        );
        let big = Bytes::from(vec![0u8; 64 * 1024 + 1]);
        assert!(matches!(
            c.send(T0, conv(), big, Priority::Normal),
            Err(ClientError::PayloadTooLarge { .. })
        ));
        assert_eq!(c.outbox_len(), 0);
        assert!(sent(&mut c).is_empty());
    }

    #[test]
    fn signals_go_both_ways() {
        let mut c = synced(config());
        c.signal(T0, conv(), SignalKind::Typing, Bytes::new())
            .unwrap();
        assert!(matches!(
            sent_metas(&mut c)[..],
            [Meta::Signal(meta::Signal {
                kind: SignalKind::Typing,
                ..
            })]
        ));
        let relayed = Meta::Signal(meta::Signal {
            conv: conv(),
            kind: SignalKind::Presence,
            sender: UserId(2),
            sender_device: DeviceId(3),
        });
        feed(&mut c, T0, relayed, b"online");
        assert_eq!(
            events(&mut c),
            vec![ClientEvent::Signal {
                conv: conv(),
                kind: SignalKind::Presence,
                sender: UserId(2),
                sender_device: DeviceId(3),
                payload: Bytes::from_static(b"online"),
            }]
        );
    }
}
