//! Per-connection state on the shard that holds the socket: the session phase, the
//! outbound queue with its byte budget (I6), and the per-conversation delivery cursors
//! that keep the push stream in seq order (I4).
//!
//! State table (phase changes happen only here and in `shard.rs`):
//!
//! | from          | event                         | to                       |
//! |---------------|-------------------------------|--------------------------|
//! | AwaitingAuth  | valid Auth                    | Active                   |
//! | AwaitingAuth  | other frame, bad token, timer | closed with Error        |
//! | Active        | frames                        | Active                   |
//! | Active        | silence for 2 heartbeats      | closed (HeartbeatTimeout)|
//! | Active        | over hard budget / grace      | closed (SlowConsumer)    |
//! | Active        | takeover, drain               | closed (Error / GoAway)  |

use crate::hash::{Map, SeededState};
use crate::proto::meta::{Meta, Signal};
use crate::proto::{ConvId, DeviceId, Encoder, Seq, UserId};
use crate::time::Instant;
use bytes::{Bytes, BytesMut};
use std::collections::BTreeMap;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Connected; only Auth is accepted, until the deadline.
    AwaitingAuth { deadline: Instant },
    /// Authenticated as (user, device).
    Active {
        user: UserId,
        device: DeviceId,
        since: Instant,
    },
}

/// The push-stream position of one conversation on one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConvCursor {
    /// Every seq up to this one has been queued to the connection, in order.
    pub sent: Seq,
    /// A catch-up Replay is outstanding; live messages past a gap wait for it.
    pub catching_up: bool,
    /// The device's cumulative DeliveryAck.
    pub acked: Seq,
}

/// What the connection shard does with one pushed message, given its cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// The next seq: send it.
    Send,
    /// Already sent: drop it.
    Duplicate,
    /// Past a gap: drop it and ask the owner for the gap, if not already asking.
    Gap { request_from: Option<Seq> },
}

impl ConvCursor {
    /// Decides on a pushed seq and advances the cursor when it is sent.
    pub fn admit(&mut self, seq: Seq) -> Admit {
        if seq <= self.sent {
            Admit::Duplicate
        } else if seq == self.sent.next() {
            self.sent = seq;
            Admit::Send
        } else if self.catching_up {
            Admit::Gap { request_from: None }
        } else {
            self.catching_up = true;
            Admit::Gap {
                request_from: Some(self.sent.next()),
            }
        }
    }
}

/// A Sync being answered: SyncDone goes out when every owner has replied.
#[derive(Debug)]
pub struct SyncProgress {
    /// The Sync's request number.
    pub req: u32,
    /// Replays not yet answered.
    pub awaiting: usize,
    /// Ranges found to be gone.
    pub gaps: Vec<crate::proto::meta::Gap>,
    /// Conversations with more than one batch to catch up.
    pub more: Vec<crate::proto::meta::Cursor>,
}

/// Frames waiting to be written to one socket, and the bytes the driver holds.
///
/// Headers and metas are packed into one buffer; a payload becomes its own chunk, so the
/// driver writes the chunks with one vectored write and payloads are never copied.
#[derive(Debug, Default)]
pub struct Outbox {
    heads: BytesMut,
    chunks: Vec<Bytes>,
    queued: usize,
    unwritten: usize,
}

impl Outbox {
    /// Encodes one frame into the queue.
    pub fn push(&mut self, encoder: &mut Encoder, meta: &Meta, payload: Bytes) {
        let before = self.heads.len();
        let payload = encoder.encode(meta, payload, &mut self.heads);
        self.queued += self.heads.len() - before + payload.len();
        if !payload.is_empty() {
            self.chunks.push(self.heads.split().freeze());
            self.chunks.push(payload);
        }
    }

    /// Whether anything is queued.
    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// Hands the queued chunks to the driver; they count against the budget until the
    /// driver reports them written.
    pub fn take(&mut self) -> Vec<Bytes> {
        if !self.heads.is_empty() {
            self.chunks.push(self.heads.split().freeze());
        }
        // Give an idle connection's buffer back instead of keeping its capacity.
        self.heads = BytesMut::new();
        self.unwritten += self.queued;
        self.queued = 0;
        std::mem::take(&mut self.chunks)
    }

    /// The driver wrote `n` bytes.
    pub fn written(&mut self, n: usize) {
        self.unwritten = self.unwritten.saturating_sub(n);
    }

    /// Bytes queued or handed out but not written: what the budget bounds.
    pub fn backlog(&self) -> usize {
        self.queued + self.unwritten
    }
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    /// Session phase.
    pub phase: Phase,
    /// When the last frame arrived.
    pub last_rx: Instant,
    /// Frames to write.
    pub outbox: Outbox,
    /// Whether the driver must be told to poll this connection's transmit.
    pub dirty: bool,
    /// When the backlog went over the soft budget, while it stays over.
    pub degraded_since: Option<Instant>,
    /// The tick of this connection's live timer-wheel entry.
    pub timer_tick: Option<u64>,
    /// Push-stream cursors by conversation.
    pub convs: Map<ConvId, ConvCursor>,
    /// Sends awaiting their Ack or Nack.
    pub inflight_sends: usize,
    /// The Sync being answered, if any.
    pub sync: Option<SyncProgress>,
    /// Notifies to send at the next transmit, coalesced to the latest seq per conversation.
    pub notifies: BTreeMap<ConvId, Seq>,
    /// Signals to send at the next transmit; latest wins per (sender, conversation).
    pub signals: Vec<(Signal, Bytes)>,
}

impl Connection {
    /// A connection that must authenticate by `deadline`; its maps hash with `hasher`.
    pub fn new(now: Instant, deadline: Instant, hasher: SeededState) -> Connection {
        Connection {
            phase: Phase::AwaitingAuth { deadline },
            last_rx: now,
            outbox: Outbox::default(),
            dirty: false,
            degraded_since: None,
            timer_tick: None,
            convs: Map::with_hasher(hasher),
            inflight_sends: 0,
            sync: None,
            notifies: BTreeMap::new(),
            signals: Vec::new(),
        }
    }

    /// The authenticated identity, if any.
    pub fn identity(&self) -> Option<(UserId, DeviceId)> {
        match self.phase {
            Phase::Active { user, device, .. } => Some((user, device)),
            Phase::AwaitingAuth { .. } => None,
        }
    }

    /// Queues a frame and marks the connection for transmit.
    pub fn push(&mut self, encoder: &mut Encoder, meta: &Meta, payload: Bytes) {
        self.outbox.push(encoder, meta, payload);
        self.dirty = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_sends_in_order_drops_repeats_and_asks_once_for_a_gap() {
        let mut c = ConvCursor::default();
        assert_eq!(c.admit(Seq(1)), Admit::Send);
        assert_eq!(c.admit(Seq(1)), Admit::Duplicate);
        assert_eq!(
            c.admit(Seq(4)),
            Admit::Gap {
                request_from: Some(Seq(2))
            }
        );
        assert_eq!(c.admit(Seq(5)), Admit::Gap { request_from: None });
        assert_eq!(c.admit(Seq(2)), Admit::Send);
        assert_eq!(c.sent, Seq(2));
    }
}
