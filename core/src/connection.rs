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
use crate::limits::Limits;
use crate::mesh::ReplayPurpose;
use crate::proto::meta::{CursorRefusal, Meta, Signal};
use crate::proto::{ConvId, DeviceId, Encoder, Seq, UserId};
use crate::time::Instant;
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeMap, VecDeque};

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
    /// Cursors not resumed as given.
    pub refused: Vec<CursorRefusal>,
}

/// History a connection wants from one conversation's owner, served a page at a time as
/// the connection's outbox drains (so a reply never outruns the reader).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayAsk {
    /// The conversation.
    pub conv: ConvId,
    /// The next seq to ask for (a Pull's position; Sync and catch-up resume from the
    /// push cursor instead).
    pub from: Seq,
    /// Messages still wanted.
    pub remaining: u32,
    /// What the history is for.
    pub purpose: ReplayPurpose,
    /// The first seq sent so far (a Pull's answer), `Seq::ZERO` while none.
    pub first: Seq,
    /// The last seq sent so far.
    pub last: Seq,
    /// Seqs below this were no longer held, from the first page.
    pub available_from: Option<Seq>,
    /// A catch-up whose last page could not be read (`StorageFailed`) or not now
    /// (`RateLimited`) is asked for again at this time, not before; the asks behind it go
    /// first meanwhile.
    pub retry_at: Option<Instant>,
}

/// A token bucket over the frames and bytes a connection sends (I6: one client cannot
/// take a shard's capacity). Levels are in thousandths, so that a millisecond of refill
/// is exact in integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    frames_milli: u64,
    bytes_milli: u64,
    refilled: Instant,
}

impl RateLimit {
    /// A full bucket at `now`.
    pub fn new(limits: &Limits, now: Instant) -> RateLimit {
        RateLimit {
            frames_milli: u64::from(limits.frames_burst) * 1000,
            bytes_milli: u64::from(limits.bytes_burst) * 1000,
            refilled: now,
        }
    }

    /// Takes one frame of `bytes` if the bucket holds it; false when over the rate (and
    /// nothing is taken).
    pub fn take(&mut self, limits: &Limits, now: Instant, bytes: usize) -> bool {
        let elapsed_ms = now.as_millis().saturating_sub(self.refilled.as_millis());
        self.refilled = self.refilled.max(now);
        // A rate per second is the same number of thousandths per millisecond.
        let refill = |level: u64, per_sec: u32, burst: u32| {
            level
                .saturating_add(elapsed_ms.saturating_mul(u64::from(per_sec)))
                .min(u64::from(burst) * 1000)
        };
        self.frames_milli = refill(
            self.frames_milli,
            limits.frames_per_sec,
            limits.frames_burst,
        );
        self.bytes_milli = refill(self.bytes_milli, limits.bytes_per_sec, limits.bytes_burst);
        let bytes_milli = (bytes as u64).saturating_mul(1000);
        if self.frames_milli < 1000 || self.bytes_milli < bytes_milli {
            return false;
        }
        self.frames_milli -= 1000;
        self.bytes_milli -= bytes_milli;
        true
    }
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
    /// While something is queued or handed to the driver: when the last write made
    /// progress (or when the backlog started, if nothing was written since). A client
    /// that stops reading stalls every write, however small the backlog.
    pub stalled_since: Option<Instant>,
    /// The tick of this connection's live timer-wheel entry.
    pub timer_tick: Option<u64>,
    /// Push-stream cursors by conversation; at most `Limits::cursors_per_conn_max`
    /// (see [`Connection::cursor`]).
    pub convs: Map<ConvId, ConvCursor>,
    /// Sends awaiting their Ack or Nack.
    pub inflight_sends: usize,
    /// The Sync being answered, if any.
    pub sync: Option<SyncProgress>,
    /// Notifies to send at the next transmit, coalesced to the latest seq per conversation.
    pub notifies: BTreeMap<ConvId, Seq>,
    /// Signals to send at the next transmit; latest wins per (sender, conversation).
    pub signals: Vec<(Signal, Bytes)>,
    /// History to fetch, front first; at most one page of the front ask is in flight.
    pub replays: VecDeque<ReplayAsk>,
    /// A page of the front ask of `replays` was asked for and is not answered yet.
    pub replay_inflight: bool,
    /// When the first of the asks in `replays` that wait to be retried (see
    /// [`ReplayAsk::retry_at`]) may go, while none of them may yet and nothing else is
    /// asked for: the connection's timer fires then.
    pub replay_retry_at: Option<Instant>,
    /// Frame and byte rates.
    pub rate: RateLimit,
    /// When the session's token expires (with leeway): it is closed then.
    pub session_ends: Option<Instant>,
    /// When the session is told to re-authenticate (GoAway `TokenExpired`); `None` once
    /// told.
    pub renew_at: Option<Instant>,
}

impl Connection {
    /// A connection that must authenticate by `deadline`; its maps hash with `hasher`.
    pub fn new(
        now: Instant,
        deadline: Instant,
        hasher: SeededState,
        limits: &Limits,
    ) -> Connection {
        Connection {
            phase: Phase::AwaitingAuth { deadline },
            last_rx: now,
            outbox: Outbox::default(),
            dirty: false,
            degraded_since: None,
            stalled_since: None,
            timer_tick: None,
            convs: Map::with_hasher(hasher),
            inflight_sends: 0,
            sync: None,
            notifies: BTreeMap::new(),
            signals: Vec::new(),
            replays: VecDeque::new(),
            replay_inflight: false,
            replay_retry_at: None,
            rate: RateLimit::new(limits, now),
            session_ends: None,
            renew_at: None,
        }
    }

    /// The authenticated identity, if any.
    pub fn identity(&self) -> Option<(UserId, DeviceId)> {
        match self.phase {
            Phase::Active { user, device, .. } => Some((user, device)),
            Phase::AwaitingAuth { .. } => None,
        }
    }

    /// Pulls waiting in `replays`.
    pub fn pulls_queued(&self) -> usize {
        self.replays
            .iter()
            .filter(|a| matches!(a.purpose, ReplayPurpose::Pull { .. }))
            .count()
    }

    /// Queues a frame and marks the connection for transmit.
    pub fn push(&mut self, encoder: &mut Encoder, meta: &Meta, payload: Bytes) {
        self.outbox.push(encoder, meta, payload);
        self.dirty = true;
    }

    /// The cursor of `conv`, new (all zero) if it had none. With `max` cursors already,
    /// one is dropped first: one the device has acknowledged in full if there is one,
    /// else one not catching up, else any. A client that keeps touching new conversations
    /// (its own Sends echo, Syncs name cursors) would otherwise grow the map without end.
    ///
    /// A dropped cursor costs repeats, never a loss: the next push of its conversation
    /// finds no cursor and catches the connection up from seq 1, as for a conversation it
    /// never saw (the device shows each (conv, seq) once). Starting the new cursor at that
    /// push instead would be cheaper, but would leave any gap behind it to the device's
    /// engine to notice; the simulator runs with 2 cursors a connection to keep this path
    /// busy.
    pub fn cursor(&mut self, conv: ConvId, max: usize) -> &mut ConvCursor {
        if !self.convs.contains_key(&conv) && self.convs.len() >= max.max(1) {
            let victim = self
                .convs
                .iter()
                .find(|(_, c)| c.acked >= c.sent && !c.catching_up)
                .or_else(|| self.convs.iter().find(|(_, c)| !c.catching_up))
                .or_else(|| self.convs.iter().next())
                .map(|(&k, _)| k);
            if let Some(victim) = victim {
                self.convs.remove(&victim);
            }
        }
        self.convs.entry(conv).or_default()
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

    #[test]
    fn the_rate_limit_allows_the_burst_then_the_rate() {
        let limits = Limits {
            frames_per_sec: 10,
            frames_burst: 3,
            ..Limits::default()
        };
        let ms = std::time::Duration::from_millis;
        let t0 = Instant::from_millis(1_000);
        let mut r = RateLimit::new(&limits, t0);
        assert!((0..3).all(|_| r.take(&limits, t0, 10)));
        assert!(!r.take(&limits, t0, 10), "the burst is spent");
        // 10 frames/s: one frame's worth refills in 100 ms, not in 99.
        assert!(!r.take(&limits, t0 + ms(99), 10));
        assert!(r.take(&limits, t0 + ms(100), 10));
        // A clock that steps back refills nothing and breaks nothing.
        assert!(!r.take(&limits, t0, 10));
    }

    #[test]
    fn the_rate_limit_counts_bytes_too() {
        let limits = Limits {
            bytes_per_sec: 1_000,
            bytes_burst: 300_000,
            ..Limits::default()
        };
        let t0 = Instant::from_millis(0);
        let mut r = RateLimit::new(&limits, t0);
        assert!(r.take(&limits, t0, 200_000));
        assert!(!r.take(&limits, t0, 200_000), "only 100,000 bytes are left");
        assert!(r.take(&limits, t0, 100_000));
    }
}
