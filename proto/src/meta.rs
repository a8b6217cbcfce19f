//! The typed meta of every frame kind, and its translation to and from the flatbuffers
//! tables of `schema/imgate.fbs`.
//!
//! These plain Rust values are what the rest of imgate sees; the generated flatbuffers
//! types stay inside this crate. Reading happens only on bytes the flatbuffers verifier has
//! accepted (see [`Meta::read`]); writing goes through a caller-owned builder so that the
//! encoder reuses one allocation for every frame.
//!
//! Naming: the structs are named after their frame kinds, so `meta::Send` and `meta::Sync`
//! shadow the marker traits of the same name inside this module only.

use crate::error_code::ErrorCode;
use crate::generated::imgate::wire;
use crate::ids::{ClientMsgId, ConvId, DeviceId, Seq, UserId};
use flatbuffers::{FlatBufferBuilder, InvalidFlatbuffer, WIPOffset};

/// The frame kinds; the value is the header's `kind` byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    Auth = 1,
    AuthOk = 2,
    Send = 3,
    Ack = 4,
    Nack = 5,
    Deliver = 6,
    DeliveryAck = 7,
    Sync = 8,
    SyncDone = 9,
    Pull = 10,
    PullResult = 11,
    Notify = 12,
    Signal = 13,
    Ping = 14,
    Pong = 15,
    GoAway = 16,
    Error = 17,
    ListInbox = 18,
    InboxPage = 19,
}

impl FrameKind {
    /// Every kind, for exhaustive tests.
    pub const ALL: [FrameKind; 19] = [
        FrameKind::Auth,
        FrameKind::AuthOk,
        FrameKind::Send,
        FrameKind::Ack,
        FrameKind::Nack,
        FrameKind::Deliver,
        FrameKind::DeliveryAck,
        FrameKind::Sync,
        FrameKind::SyncDone,
        FrameKind::Pull,
        FrameKind::PullResult,
        FrameKind::Notify,
        FrameKind::Signal,
        FrameKind::Ping,
        FrameKind::Pong,
        FrameKind::GoAway,
        FrameKind::Error,
        FrameKind::ListInbox,
        FrameKind::InboxPage,
    ];

    /// The kind for a header byte, if it names one.
    pub fn from_u8(v: u8) -> Option<FrameKind> {
        // The discriminants are 1..=19 in order.
        FrameKind::ALL.get(usize::from(v).checked_sub(1)?).copied()
    }

    /// Whether frames of this kind carry a payload. For the others a non-empty payload is
    /// a malformed frame.
    pub fn has_payload(self) -> bool {
        matches!(
            self,
            FrameKind::Send | FrameKind::Deliver | FrameKind::Signal
        )
    }
}

/// Message priority.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Priority {
    /// Pushed to members of small conversations, announced by Notify in large ones.
    #[default]
    Normal,
    /// Pushed to every online member, whatever the conversation's size.
    High,
}

/// The kind of an ephemeral signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SignalKind {
    /// The sender is typing in the conversation.
    Typing,
    /// The sender stopped typing.
    StoppedTyping,
    /// The sender's presence status; the payload carries the app's status body.
    Presence,
}

/// Client -> gateway, first frame: authenticate as one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Auth {
    /// The signed token (JWT).
    pub token: String,
}

/// Gateway -> client: the connection is now a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthOk {
    /// The authenticated user.
    pub user: UserId,
    /// The authenticated device.
    pub device: DeviceId,
    /// The client must send a frame at least this often.
    pub heartbeat_ms: u32,
    /// The largest frame the gateway accepts.
    pub max_frame_bytes: u32,
    /// The largest payload the gateway accepts.
    pub max_payload_bytes: u32,
}

/// Client -> gateway: store and deliver the frame's payload as a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Send {
    /// Request number, echoed in the Ack or Nack.
    pub req: u32,
    /// Dedupe key.
    pub client_msg_id: ClientMsgId,
    /// Target conversation.
    pub conv: ConvId,
    /// Push priority.
    pub priority: Priority,
}

/// Gateway -> client: the message is durable as `seq` of `conv`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// The Send's request number.
    pub req: u32,
    /// The Send's dedupe key.
    pub client_msg_id: ClientMsgId,
    /// The conversation.
    pub conv: ConvId,
    /// The message's seq.
    pub seq: Seq,
}

/// Gateway -> client: the message was not stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nack {
    /// The Send's request number.
    pub req: u32,
    /// The Send's dedupe key.
    pub client_msg_id: ClientMsgId,
    /// The conversation.
    pub conv: ConvId,
    /// Why.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub message: String,
}

/// Gateway -> client: a durable message; the payload is its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deliver {
    /// The conversation.
    pub conv: ConvId,
    /// The message's seq.
    pub seq: Seq,
    /// Who sent it.
    pub sender: UserId,
    /// From which device.
    pub sender_device: DeviceId,
    /// The sender's dedupe key.
    pub client_msg_id: ClientMsgId,
    /// The priority it was sent with.
    pub priority: Priority,
    /// When the owner sequenced it (ms since the Unix epoch; 0: not stamped).
    pub ts_ms: u64,
}

/// Client -> gateway: this device holds every seq of `conv` up to `seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryAck {
    /// The conversation.
    pub conv: ConvId,
    /// The highest contiguous seq held.
    pub seq: Seq,
}

/// A device's position in one conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cursor {
    /// The conversation.
    pub conv: ConvId,
    /// Every seq up to this one is held.
    pub seq: Seq,
}

/// A range of seqs no longer held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Gap {
    /// The conversation.
    pub conv: ConvId,
    /// First missing seq.
    pub from_seq: Seq,
    /// Last missing seq.
    pub to_seq: Seq,
}

/// Client -> gateway: send what I miss after these cursors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sync {
    /// Request number, echoed in SyncDone.
    pub req: u32,
    /// One cursor per known conversation.
    pub cursors: Vec<Cursor>,
}

/// Gateway -> client: every Deliver answering the Sync has been sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncDone {
    /// The Sync's request number.
    pub req: u32,
    /// Ranges asked for that are no longer held.
    pub gaps: Vec<Gap>,
    /// Conversations with more to catch up than one sync sends; Pull them.
    pub more: Vec<Cursor>,
    /// Cursors not resumed as given, with the reason.
    pub refused: Vec<CursorRefusal>,
}

/// A Sync cursor the gateway did not resume as given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CursorRefusal {
    /// The conversation.
    pub conv: ConvId,
    /// Its latest seq when the Sync was answered (0 where `code` is not `CursorAhead`).
    pub latest_seq: Seq,
    /// `NotMember`, `CursorAhead` (resumed from `latest_seq`) or `BadRequest`.
    pub code: ErrorCode,
}

/// Client -> gateway: history of one conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pull {
    /// Request number, echoed in PullResult.
    pub req: u32,
    /// The conversation.
    pub conv: ConvId,
    /// First seq wanted.
    pub from_seq: Seq,
    /// At most this many messages.
    pub limit: u32,
    /// The `limit` messages ending at `from_seq` (at least 1) instead of starting there.
    pub backward: bool,
}

/// Gateway -> client: the Delivers answering a Pull have been sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PullResult {
    /// The Pull's request number.
    pub req: u32,
    /// The conversation.
    pub conv: ConvId,
    /// First seq sent, or 0.
    pub from_seq: Seq,
    /// Last seq sent, or 0.
    pub to_seq: Seq,
    /// The conversation's latest seq.
    pub latest_seq: Seq,
    /// Seqs below this are no longer held (0 when all are).
    pub available_from: Seq,
}

/// Gateway -> client: `conv` has messages up to `latest_seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notify {
    /// The conversation.
    pub conv: ConvId,
    /// Its latest seq.
    pub latest_seq: Seq,
}

/// Both ways: an ephemeral signal; the payload is optional app data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signal {
    /// The conversation.
    pub conv: ConvId,
    /// What it signals.
    pub kind: SignalKind,
    /// Set by the gateway when relaying.
    pub sender: UserId,
    /// Set by the gateway when relaying.
    pub sender_device: DeviceId,
}

/// Both ways: liveness probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ping {
    /// Echoed in the Pong.
    pub nonce: u64,
}

/// Both ways: answer to a Ping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pong {
    /// The Ping's nonce.
    pub nonce: u64,
}

/// Gateway -> client: orderly close.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoAway {
    /// Why.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub message: String,
    /// Suggested wait before reconnecting.
    pub reconnect_after_ms: u32,
}

/// Client -> gateway: a page of the user's conversations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListInbox {
    /// Request number, echoed in InboxPage.
    pub req: u32,
    /// List the conversations after this one (`None`: from the first).
    pub after: Option<ConvId>,
    /// At most this many (0: the gateway's page limit).
    pub limit: u32,
}

/// One conversation of a user's inbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InboxEntry {
    /// The conversation.
    pub conv: ConvId,
    /// Its latest durable seq (0: none yet).
    pub latest_seq: Seq,
    /// That message's server timestamp (ms since the Unix epoch; 0: none).
    pub latest_ts_ms: u64,
    /// The user's read cursor.
    pub read_seq: Seq,
    /// Messages after the read cursor.
    pub unread: u64,
}

/// Gateway -> client: a page of the inbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboxPage {
    /// The ListInbox's request number.
    pub req: u32,
    /// The entries, in ascending conversation id order.
    pub entries: Vec<InboxEntry>,
    /// More entries follow the last one.
    pub more: bool,
}

/// Gateway -> client: a request failed or the connection is closing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    /// Why.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub message: String,
    /// The request this answers, or 0.
    pub req: u32,
}

/// The meta of one frame, of any kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Meta {
    Auth(Auth),
    AuthOk(AuthOk),
    Send(Send),
    Ack(Ack),
    Nack(Nack),
    Deliver(Deliver),
    DeliveryAck(DeliveryAck),
    Sync(Sync),
    SyncDone(SyncDone),
    Pull(Pull),
    PullResult(PullResult),
    Notify(Notify),
    Signal(Signal),
    Ping(Ping),
    Pong(Pong),
    GoAway(GoAway),
    Error(Error),
    ListInbox(ListInbox),
    InboxPage(InboxPage),
}

/// Why verified meta bytes still do not make a valid frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    /// The bytes are not a valid flatbuffer of the kind's table.
    #[error("meta failed flatbuffers verification: {0}")]
    Invalid(#[from] InvalidFlatbuffer),
    /// An enum field holds a value this build does not know.
    #[error("field `{field}` holds unknown value {value}")]
    UnknownEnum {
        /// The field's name.
        field: &'static str,
        /// The value found.
        value: u8,
    },
}

impl Meta {
    /// The frame kind this meta belongs to.
    pub fn kind(&self) -> FrameKind {
        match self {
            Meta::Auth(_) => FrameKind::Auth,
            Meta::AuthOk(_) => FrameKind::AuthOk,
            Meta::Send(_) => FrameKind::Send,
            Meta::Ack(_) => FrameKind::Ack,
            Meta::Nack(_) => FrameKind::Nack,
            Meta::Deliver(_) => FrameKind::Deliver,
            Meta::DeliveryAck(_) => FrameKind::DeliveryAck,
            Meta::Sync(_) => FrameKind::Sync,
            Meta::SyncDone(_) => FrameKind::SyncDone,
            Meta::Pull(_) => FrameKind::Pull,
            Meta::PullResult(_) => FrameKind::PullResult,
            Meta::Notify(_) => FrameKind::Notify,
            Meta::Signal(_) => FrameKind::Signal,
            Meta::Ping(_) => FrameKind::Ping,
            Meta::Pong(_) => FrameKind::Pong,
            Meta::GoAway(_) => FrameKind::GoAway,
            Meta::Error(_) => FrameKind::Error,
            Meta::ListInbox(_) => FrameKind::ListInbox,
            Meta::InboxPage(_) => FrameKind::InboxPage,
        }
    }

    /// Verifies `bytes` as the table of `kind` and reads it.
    pub fn read(kind: FrameKind, bytes: &[u8]) -> Result<Meta, MetaError> {
        use flatbuffers::root;
        Ok(match kind {
            FrameKind::Auth => {
                let t = root::<wire::Auth>(bytes)?;
                Meta::Auth(Auth {
                    token: t.token().to_owned(),
                })
            }
            FrameKind::AuthOk => {
                let t = root::<wire::AuthOk>(bytes)?;
                Meta::AuthOk(AuthOk {
                    user: UserId(t.user()),
                    device: DeviceId(t.device()),
                    heartbeat_ms: t.heartbeat_ms(),
                    max_frame_bytes: t.max_frame_bytes(),
                    max_payload_bytes: t.max_payload_bytes(),
                })
            }
            FrameKind::Send => {
                let t = root::<wire::Send>(bytes)?;
                Meta::Send(Send {
                    req: t.req(),
                    client_msg_id: msg_id_from(t.client_msg_id()),
                    conv: conv_from(t.conv()),
                    priority: priority_from(t.priority())?,
                })
            }
            FrameKind::Ack => {
                let t = root::<wire::Ack>(bytes)?;
                Meta::Ack(Ack {
                    req: t.req(),
                    client_msg_id: msg_id_from(t.client_msg_id()),
                    conv: conv_from(t.conv()),
                    seq: Seq(t.seq()),
                })
            }
            FrameKind::Nack => {
                let t = root::<wire::Nack>(bytes)?;
                Meta::Nack(Nack {
                    req: t.req(),
                    client_msg_id: msg_id_from(t.client_msg_id()),
                    conv: conv_from(t.conv()),
                    code: ErrorCode::from_u16(t.code().0),
                    message: t.message().unwrap_or_default().to_owned(),
                })
            }
            FrameKind::Deliver => {
                let t = root::<wire::Deliver>(bytes)?;
                Meta::Deliver(Deliver {
                    conv: conv_from(t.conv()),
                    seq: Seq(t.seq()),
                    sender: UserId(t.sender()),
                    sender_device: DeviceId(t.sender_device()),
                    client_msg_id: msg_id_from(t.client_msg_id()),
                    priority: priority_from(t.priority())?,
                    ts_ms: t.ts_ms(),
                })
            }
            FrameKind::DeliveryAck => {
                let t = root::<wire::DeliveryAck>(bytes)?;
                Meta::DeliveryAck(DeliveryAck {
                    conv: conv_from(t.conv()),
                    seq: Seq(t.seq()),
                })
            }
            FrameKind::Sync => {
                let t = root::<wire::Sync>(bytes)?;
                Meta::Sync(Sync {
                    req: t.req(),
                    cursors: t
                        .cursors()
                        .map(|v| v.iter().map(cursor_from).collect())
                        .unwrap_or_default(),
                })
            }
            FrameKind::SyncDone => {
                let t = root::<wire::SyncDone>(bytes)?;
                Meta::SyncDone(SyncDone {
                    req: t.req(),
                    gaps: t
                        .gaps()
                        .map(|v| {
                            v.iter()
                                .map(|g| Gap {
                                    conv: conv_from(g.conv()),
                                    from_seq: Seq(g.from_seq()),
                                    to_seq: Seq(g.to_seq()),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    more: t
                        .more()
                        .map(|v| v.iter().map(cursor_from).collect())
                        .unwrap_or_default(),
                    refused: t
                        .refused()
                        .map(|v| {
                            v.iter()
                                .map(|r| CursorRefusal {
                                    conv: conv_from(r.conv()),
                                    latest_seq: Seq(r.latest_seq()),
                                    code: ErrorCode::from_u16(r.code().0),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                })
            }
            FrameKind::Pull => {
                let t = root::<wire::Pull>(bytes)?;
                Meta::Pull(Pull {
                    req: t.req(),
                    conv: conv_from(t.conv()),
                    from_seq: Seq(t.from_seq()),
                    limit: t.limit(),
                    backward: t.backward(),
                })
            }
            FrameKind::PullResult => {
                let t = root::<wire::PullResult>(bytes)?;
                Meta::PullResult(PullResult {
                    req: t.req(),
                    conv: conv_from(t.conv()),
                    from_seq: Seq(t.from_seq()),
                    to_seq: Seq(t.to_seq()),
                    latest_seq: Seq(t.latest_seq()),
                    available_from: Seq(t.available_from()),
                })
            }
            FrameKind::Notify => {
                let t = root::<wire::Notify>(bytes)?;
                Meta::Notify(Notify {
                    conv: conv_from(t.conv()),
                    latest_seq: Seq(t.latest_seq()),
                })
            }
            FrameKind::Signal => {
                let t = root::<wire::Signal>(bytes)?;
                Meta::Signal(Signal {
                    conv: conv_from(t.conv()),
                    kind: signal_kind_from(t.kind())?,
                    sender: UserId(t.sender()),
                    sender_device: DeviceId(t.sender_device()),
                })
            }
            FrameKind::Ping => Meta::Ping(Ping {
                nonce: root::<wire::Ping>(bytes)?.nonce(),
            }),
            FrameKind::Pong => Meta::Pong(Pong {
                nonce: root::<wire::Pong>(bytes)?.nonce(),
            }),
            FrameKind::GoAway => {
                let t = root::<wire::GoAway>(bytes)?;
                Meta::GoAway(GoAway {
                    code: ErrorCode::from_u16(t.code().0),
                    message: t.message().unwrap_or_default().to_owned(),
                    reconnect_after_ms: t.reconnect_after_ms(),
                })
            }
            FrameKind::Error => {
                let t = root::<wire::Error>(bytes)?;
                Meta::Error(Error {
                    code: ErrorCode::from_u16(t.code().0),
                    message: t.message().unwrap_or_default().to_owned(),
                    req: t.req(),
                })
            }
            FrameKind::ListInbox => {
                let t = root::<wire::ListInbox>(bytes)?;
                Meta::ListInbox(ListInbox {
                    req: t.req(),
                    after: t.after().map(conv_from),
                    limit: t.limit(),
                })
            }
            FrameKind::InboxPage => {
                let t = root::<wire::InboxPage>(bytes)?;
                Meta::InboxPage(InboxPage {
                    req: t.req(),
                    entries: t
                        .entries()
                        .map(|v| {
                            v.iter()
                                .map(|e| InboxEntry {
                                    conv: conv_from(e.conv()),
                                    latest_seq: Seq(e.latest_seq()),
                                    latest_ts_ms: e.latest_ts_ms(),
                                    read_seq: Seq(e.read_seq()),
                                    unread: e.unread(),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    more: t.more(),
                })
            }
        })
    }

    /// Builds this meta as the root table of `fbb`, which the caller has reset. The
    /// finished bytes are `fbb.finished_data()`.
    pub fn write(&self, fbb: &mut FlatBufferBuilder<'_>) {
        match self {
            Meta::Auth(m) => {
                let token = fbb.create_string(&m.token);
                let root = wire::Auth::create(fbb, &wire::AuthArgs { token: Some(token) });
                fbb.finish_minimal(root);
            }
            Meta::AuthOk(m) => {
                let root = wire::AuthOk::create(
                    fbb,
                    &wire::AuthOkArgs {
                        user: m.user.0,
                        device: m.device.0,
                        heartbeat_ms: m.heartbeat_ms,
                        max_frame_bytes: m.max_frame_bytes,
                        max_payload_bytes: m.max_payload_bytes,
                    },
                );
                fbb.finish_minimal(root);
            }
            Meta::Send(m) => {
                let root = wire::Send::create(
                    fbb,
                    &wire::SendArgs {
                        req: m.req,
                        client_msg_id: Some(&msg_id_to(m.client_msg_id)),
                        conv: Some(&conv_to(m.conv)),
                        priority: priority_to(m.priority),
                    },
                );
                fbb.finish_minimal(root);
            }
            Meta::Ack(m) => {
                let root = wire::Ack::create(
                    fbb,
                    &wire::AckArgs {
                        req: m.req,
                        client_msg_id: Some(&msg_id_to(m.client_msg_id)),
                        conv: Some(&conv_to(m.conv)),
                        seq: m.seq.0,
                    },
                );
                fbb.finish_minimal(root);
            }
            Meta::Nack(m) => {
                let message = fbb.create_string(&m.message);
                let root = wire::Nack::create(
                    fbb,
                    &wire::NackArgs {
                        req: m.req,
                        client_msg_id: Some(&msg_id_to(m.client_msg_id)),
                        conv: Some(&conv_to(m.conv)),
                        code: wire::ErrorCode(m.code.as_u16()),
                        message: Some(message),
                    },
                );
                fbb.finish_minimal(root);
            }
            Meta::Deliver(m) => {
                let root = wire::Deliver::create(
                    fbb,
                    &wire::DeliverArgs {
                        conv: Some(&conv_to(m.conv)),
                        seq: m.seq.0,
                        sender: m.sender.0,
                        sender_device: m.sender_device.0,
                        client_msg_id: Some(&msg_id_to(m.client_msg_id)),
                        priority: priority_to(m.priority),
                        ts_ms: m.ts_ms,
                    },
                );
                fbb.finish_minimal(root);
            }
            Meta::DeliveryAck(m) => {
                let root = wire::DeliveryAck::create(
                    fbb,
                    &wire::DeliveryAckArgs {
                        conv: Some(&conv_to(m.conv)),
                        seq: m.seq.0,
                    },
                );
                fbb.finish_minimal(root);
            }
            Meta::Sync(m) => {
                let cursors = cursors_to(fbb, &m.cursors);
                let root = wire::Sync::create(
                    fbb,
                    &wire::SyncArgs {
                        req: m.req,
                        cursors: Some(cursors),
                    },
                );
                fbb.finish_minimal(root);
            }
            Meta::SyncDone(m) => {
                let gaps: Vec<wire::Gap> = m
                    .gaps
                    .iter()
                    .map(|g| wire::Gap::new(&conv_to(g.conv), g.from_seq.0, g.to_seq.0))
                    .collect();
                let gaps = fbb.create_vector(&gaps);
                let more = cursors_to(fbb, &m.more);
                let refused: Vec<wire::CursorRefusal> = m
                    .refused
                    .iter()
                    .map(|r| {
                        wire::CursorRefusal::new(
                            &conv_to(r.conv),
                            r.latest_seq.0,
                            wire::ErrorCode(r.code.as_u16()),
                        )
                    })
                    .collect();
                let refused = fbb.create_vector(&refused);
                let root = wire::SyncDone::create(
                    fbb,
                    &wire::SyncDoneArgs {
                        req: m.req,
                        gaps: Some(gaps),
                        more: Some(more),
                        refused: Some(refused),
                    },
                );
                fbb.finish_minimal(root);
            }
            Meta::Pull(m) => {
                let root = wire::Pull::create(
                    fbb,
                    &wire::PullArgs {
                        req: m.req,
                        conv: Some(&conv_to(m.conv)),
                        from_seq: m.from_seq.0,
                        limit: m.limit,
                        backward: m.backward,
                    },
                );
                fbb.finish_minimal(root);
            }
            Meta::PullResult(m) => {
                let root = wire::PullResult::create(
                    fbb,
                    &wire::PullResultArgs {
                        req: m.req,
                        conv: Some(&conv_to(m.conv)),
                        from_seq: m.from_seq.0,
                        to_seq: m.to_seq.0,
                        latest_seq: m.latest_seq.0,
                        available_from: m.available_from.0,
                    },
                );
                fbb.finish_minimal(root);
            }
            Meta::Notify(m) => {
                let root = wire::Notify::create(
                    fbb,
                    &wire::NotifyArgs {
                        conv: Some(&conv_to(m.conv)),
                        latest_seq: m.latest_seq.0,
                    },
                );
                fbb.finish_minimal(root);
            }
            Meta::Signal(m) => {
                let root = wire::Signal::create(
                    fbb,
                    &wire::SignalArgs {
                        conv: Some(&conv_to(m.conv)),
                        kind: signal_kind_to(m.kind),
                        sender: m.sender.0,
                        sender_device: m.sender_device.0,
                    },
                );
                fbb.finish_minimal(root);
            }
            Meta::Ping(m) => {
                let root = wire::Ping::create(fbb, &wire::PingArgs { nonce: m.nonce });
                fbb.finish_minimal(root);
            }
            Meta::Pong(m) => {
                let root = wire::Pong::create(fbb, &wire::PongArgs { nonce: m.nonce });
                fbb.finish_minimal(root);
            }
            Meta::GoAway(m) => {
                let message = fbb.create_string(&m.message);
                let root = wire::GoAway::create(
                    fbb,
                    &wire::GoAwayArgs {
                        code: wire::ErrorCode(m.code.as_u16()),
                        message: Some(message),
                        reconnect_after_ms: m.reconnect_after_ms,
                    },
                );
                fbb.finish_minimal(root);
            }
            Meta::Error(m) => {
                let message = fbb.create_string(&m.message);
                let root = wire::Error::create(
                    fbb,
                    &wire::ErrorArgs {
                        code: wire::ErrorCode(m.code.as_u16()),
                        message: Some(message),
                        req: m.req,
                    },
                );
                fbb.finish_minimal(root);
            }
            Meta::ListInbox(m) => {
                let root = wire::ListInbox::create(
                    fbb,
                    &wire::ListInboxArgs {
                        req: m.req,
                        after: m.after.map(conv_to).as_ref(),
                        limit: m.limit,
                    },
                );
                fbb.finish_minimal(root);
            }
            Meta::InboxPage(m) => {
                let entries: Vec<wire::InboxEntry> = m
                    .entries
                    .iter()
                    .map(|e| {
                        wire::InboxEntry::new(
                            &conv_to(e.conv),
                            e.latest_seq.0,
                            e.latest_ts_ms,
                            e.read_seq.0,
                            e.unread,
                        )
                    })
                    .collect();
                let entries = fbb.create_vector(&entries);
                let root = wire::InboxPage::create(
                    fbb,
                    &wire::InboxPageArgs {
                        req: m.req,
                        entries: Some(entries),
                        more: m.more,
                    },
                );
                fbb.finish_minimal(root);
            }
        }
    }
}

fn conv_from(c: &wire::ConvId) -> ConvId {
    ConvId {
        hi: c.hi(),
        lo: c.lo(),
    }
}

fn conv_to(c: ConvId) -> wire::ConvId {
    wire::ConvId::new(c.hi, c.lo)
}

fn msg_id_from(m: &wire::ClientMsgId) -> ClientMsgId {
    let mut id = [0u8; 16];
    for (dst, src) in id.iter_mut().zip(m.bytes().iter()) {
        *dst = src;
    }
    ClientMsgId(id)
}

fn msg_id_to(m: ClientMsgId) -> wire::ClientMsgId {
    wire::ClientMsgId::new(&m.0)
}

fn cursor_from(c: &wire::Cursor) -> Cursor {
    Cursor {
        conv: conv_from(c.conv()),
        seq: Seq(c.seq()),
    }
}

fn cursors_to<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    cursors: &[Cursor],
) -> WIPOffset<flatbuffers::Vector<'a, wire::Cursor>> {
    let cursors: Vec<wire::Cursor> = cursors
        .iter()
        .map(|c| wire::Cursor::new(&conv_to(c.conv), c.seq.0))
        .collect();
    fbb.create_vector(&cursors)
}

fn priority_from(p: wire::Priority) -> Result<Priority, MetaError> {
    match p {
        wire::Priority::Normal => Ok(Priority::Normal),
        wire::Priority::High => Ok(Priority::High),
        other => Err(MetaError::UnknownEnum {
            field: "priority",
            value: other.0,
        }),
    }
}

fn priority_to(p: Priority) -> wire::Priority {
    match p {
        Priority::Normal => wire::Priority::Normal,
        Priority::High => wire::Priority::High,
    }
}

fn signal_kind_from(k: wire::SignalKind) -> Result<SignalKind, MetaError> {
    match k {
        wire::SignalKind::Typing => Ok(SignalKind::Typing),
        wire::SignalKind::StoppedTyping => Ok(SignalKind::StoppedTyping),
        wire::SignalKind::Presence => Ok(SignalKind::Presence),
        other => Err(MetaError::UnknownEnum {
            field: "kind",
            value: other.0,
        }),
    }
}

fn signal_kind_to(k: SignalKind) -> wire::SignalKind {
    match k {
        SignalKind::Typing => wire::SignalKind::Typing,
        SignalKind::StoppedTyping => wire::SignalKind::StoppedTyping,
        SignalKind::Presence => wire::SignalKind::Presence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_kinds_match_the_schema() {
        for kind in FrameKind::ALL {
            let generated = wire::FrameKind(kind as u8);
            assert_eq!(
                generated.variant_name(),
                Some(format!("{kind:?}").as_str()),
                "kind {kind:?}"
            );
            assert_eq!(FrameKind::from_u8(kind as u8), Some(kind));
        }
        assert_eq!(FrameKind::from_u8(0), None);
        assert_eq!(FrameKind::from_u8(20), None);
        assert_eq!(wire::FrameKind::ENUM_VALUES.len(), FrameKind::ALL.len());
    }

    #[test]
    fn error_codes_match_the_schema() {
        for code in ErrorCode::ALL {
            let generated = wire::ErrorCode(code.as_u16());
            assert_eq!(generated.variant_name(), Some(format!("{code:?}").as_str()));
            assert_eq!(ErrorCode::from_u16(code.as_u16()), code);
        }
        assert_eq!(wire::ErrorCode::ENUM_VALUES.len(), ErrorCode::ALL.len());
    }
}
