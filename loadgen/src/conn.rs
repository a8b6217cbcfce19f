//! One connection of a worker: core's client engine over a nonblocking socket, its place in
//! the load (send and drop schedules, the `Convs` plan), and its life across reconnects.
//!
//! A connection is a state machine the worker's event loop drives with three inputs:
//! [`Conn::handle_event`] (its socket is ready), [`Conn::handle_timer`] (the wake-up it
//! asked for came) and [`Conn::handle_phase`] (the run moved on). After each it has written
//! what its engine queued, handled the engine's events and asked the worker's timers for
//! its next wake-up. It never blocks and never sleeps; a write the socket cannot take at
//! once waits in the connection's own buffer until the socket is writable.
//!
//! Socket events carry a token of the connection's slot and the generation of its socket, so
//! an event of a socket closed earlier in the same batch cannot be taken for its successor's.
//!
//! The states of the link:
//!
//! | state      | input                                   | next state                        |
//! |------------|-----------------------------------------|-----------------------------------|
//! | (new)      | `open`                                  | Connecting, or as a broken end    |
//! | Connecting | writable and connected                  | Up (engine `handle_connected`)    |
//! | Connecting | connect error, or its deadline          | Backoff                           |
//! | Up         | EOF, socket error, `Closed` or `Dead`   | Backoff                           |
//! | Up         | a planned drop (`Reconnect`)            | Connecting at once (RST sent)     |
//! | Up         | phase Done                              | Finished                          |
//! | Backoff    | its time passed                         | Connecting                        |
//! | Backoff    | phase Done                              | Finished                          |
//!
//! Every message it sends waits in `pending`, in send order, until its Ack (or a final
//! Nack): the ledger and the ack histogram take it from there.

use crate::ledger::Seen;
use crate::spec::{ConvsSpec, Scenario, Unit};
use crate::worker::{Ctx, Phase, PAYLOAD_HEADER};
use bytes::{Buf, Bytes, BytesMut};
use imgate_core::client::{
    Client, ClientConfig, ClientError, ClientEvent, Priority, RequestFailure, SendFailure,
};
use imgate_core::proto::{ClientMsgId, ConvId, DeviceId, ErrorCode, Seq, UserId};
use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Token};
use nix::sys::socket::{self as nix_socket, sockopt, ControlMessageOwned, MsgFlags};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, IoSliceMut, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Largest latency the histograms hold: 60 s, in microseconds. Larger samples are clamped.
pub const LATENCY_MAX_US: u64 = 60_000_000;

/// Bound on the sends one wake-up catches up on; a loop stalled longer than that many
/// intervals drops the rest of its backlog (counted as `send backlog dropped`).
const CATCH_UP_MAX: u32 = 1000;

/// Reconnect backoff after an error: first and largest wait.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// How long a TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a conversation refused `RateLimited` (or not taken by a full outbox) waits
/// before it is written again, at least (`Convs`); a random fraction of it is added.
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// Bytes the engine gave that the socket has not taken yet, at most. The engine bounds what
/// it writes (256 Sends in flight of at most 64 KiB, 16 Pulls, one DeliveryAck per
/// conversation: about 16 MiB), so 32 MiB is only reached by a bug; the connection is then
/// dropped as broken rather than grow.
const UNWRITTEN_BYTES_MAX: usize = 32 * 1024 * 1024;

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The socket failed or the gateway closed it.
    Broken,
    /// A drop the scenario asked for: reconnect at once.
    Planned,
    /// The run is over.
    Finished,
}

/// Where the connection's socket is.
enum Link {
    /// Not connected, waiting for the next attempt (after `until`).
    Backoff { until: Instant },
    /// A nonblocking connect under way.
    Connecting {
        stream: TcpStream,
        deadline: Instant,
    },
    /// Connected; the engine drives the session.
    Up {
        stream: TcpStream,
        /// Bytes read and not yet a whole frame.
        rbuf: BytesMut,
        /// Bytes the socket did not take yet, in order.
        unwritten: BytesMut,
    },
    /// The run is over for this connection.
    Finished,
}

/// A message awaiting its Ack: what restores it into a rebuilt client engine, and what
/// the ledger and the latency histogram need when it is acked.
struct Sent {
    /// Intended send time, ns since the worker's epoch.
    intended: u64,
    /// The sender's number for it.
    number: u32,
    /// Sent in the load window (see `State::in_window`).
    in_window: bool,
    conv: ConvId,
    payload: Bytes,
}

/// One connection: its socket, its client engine and its place in the load.
pub struct Conn {
    /// Its slot in the worker's slab: the timer key and half of each socket token.
    slot: u32,
    /// Bumped for each socket: the other half of the token.
    generation: u32,
    link: Link,
    backoff: Duration,
    index: u32,
    conv: Option<ConvId>,
    /// Other members' connections in this worker (receivers of this one's messages).
    peers: u32,
    source: Ipv4Addr,
    client: Client,
    /// Client engines built before this one (`Convs` rebuilds it after a disconnect).
    rebuilds: u64,
    /// Messages awaiting their Ack, in send order. Acks come in send order (pipelined Sends
    /// on one connection are sequenced in order), so the one acked is almost always the
    /// first; the engine's outbox bound (4,096 by default) bounds the search otherwise.
    pending: VecDeque<(ClientMsgId, Sent)>,
    /// The `Convs` plan, this connection's user, and the next conversation of its share.
    convs: Option<ConvsSpec>,
    user: UserId,
    next_j: u64,
    /// Conversations to write again, and from when (`Convs`).
    again: VecDeque<(Instant, ConvId)>,
    /// Conversations to read back, whether they were chosen yet, and reads in flight by
    /// request number (`Convs`).
    verify_queue: VecDeque<ConvId>,
    verify_planned: bool,
    verify_pending: HashMap<u32, ConvId>,
    next_number: u32,
    /// Outbox length last told to the shared state.
    outbox_told: usize,
    authenticated: bool,
    payload: Bytes,
    send_every: Option<Duration>,
    drop_every: Option<Duration>,
    next_send: Option<Instant>,
    next_drop: Option<Instant>,
    /// The engine's timer as of the last `service` (every engine input is followed by one).
    engine_wake: Option<Instant>,
    rng: u64,
}

/// The socket token of `slot`'s socket number `generation`.
pub fn token(slot: u32, generation: u32) -> Token {
    Token(((generation as usize) << 32) | slot as usize)
}

/// The slot and generation a token was made of.
pub fn untoken(t: Token) -> (u32, u32) {
    ((t.0 & 0xFFFF_FFFF) as u32, (t.0 >> 32) as u32)
}

// Tokens hold a slot and a generation of 32 bits each.
#[cfg(not(target_pointer_width = "64"))]
compile_error!("loadgen packs socket tokens into a 64-bit usize");

impl Conn {
    /// Connection `index` (global) of `unit`, in worker slot `slot`, not yet opened.
    pub fn new(ctx: &Ctx, unit: &Unit, index: u32, slot: u32, now: Instant) -> Conn {
        let spec = &ctx.spec;
        let user = UserId(spec.user_base + u64::from(index));
        let token = ctx.signer.mint(
            user,
            DeviceId(1),
            ctx.clock.core_at(now) + Duration::from_secs(spec.token_ttl_secs),
        );
        let config = ClientConfig {
            token,
            device: DeviceId(1),
            seed: spec.user_base ^ (u64::from(index) << 32) ^ 0x1D6A7E,
            heartbeat_interval: Duration::from_secs(spec.heartbeat_secs),
            ..ClientConfig::default()
        };
        let sends = unit.senders.contains(&index) && spec.send_rate_per_sender > 0.0;
        let convs = spec.convs.filter(|_| spec.scenario == Scenario::Convs);
        let drops = spec.scenario == Scenario::Reconnect && spec.drop_rate_per_conn > 0.0;
        Conn {
            slot,
            generation: 0,
            link: Link::Backoff { until: now },
            backoff: BACKOFF_MIN,
            index,
            conv: unit.conv,
            peers: unit.members.len().saturating_sub(1) as u32,
            source: spec.sources[index as usize % spec.sources.len()],
            client: Client::new(config, BTreeMap::new()),
            rebuilds: 0,
            pending: VecDeque::new(),
            convs,
            user,
            next_j: 0,
            again: VecDeque::new(),
            verify_queue: VecDeque::new(),
            verify_planned: false,
            verify_pending: HashMap::new(),
            next_number: 1,
            outbox_told: 0,
            authenticated: false,
            payload: Bytes::from(vec![0x5a; spec.payload_bytes.max(PAYLOAD_HEADER)]),
            send_every: sends.then(|| Duration::from_secs_f64(1.0 / spec.send_rate_per_sender)),
            drop_every: drops.then(|| Duration::from_secs_f64(1.0 / spec.drop_rate_per_conn)),
            next_send: None,
            next_drop: None,
            engine_wake: None,
            rng: u64::from(index).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    /// A uniform fraction of `d`, to spread schedules.
    fn jitter(&mut self, d: Duration) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        d.mul_f64((self.rng >> 11) as f64 / (1u64 << 53) as f64)
    }

    // ---- inputs -------------------------------------------------------------------------

    /// Starts a connect (the first, or one after a backoff or a planned drop).
    pub fn open(&mut self, ctx: &mut Ctx, now: Instant) {
        debug_assert!(matches!(self.link, Link::Backoff { .. }));
        if ctx.phase == Phase::Done {
            self.link = Link::Finished;
            ctx.timers.arm(self.slot, None);
            return;
        }
        self.generation = self.generation.wrapping_add(1);
        let token = token(self.slot, self.generation);
        let opened = connect_nonblocking(self.source, ctx.spec.gateway).and_then(|mut stream| {
            ctx.registry
                .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                .map(|()| stream)
        });
        match opened {
            Ok(stream) => {
                let deadline = now + CONNECT_TIMEOUT;
                self.link = Link::Connecting { stream, deadline };
                ctx.timers.arm(self.slot, Some(deadline));
            }
            Err(e) => {
                ctx.state.error(format!("connect: {e}"), 1);
                self.end(ctx, now, End::Broken);
            }
        }
    }

    /// The socket of `generation` is ready.
    pub fn handle_event(&mut self, ctx: &mut Ctx, ev: &Event, generation: u32) {
        if generation != self.generation {
            return; // An event of a socket already closed.
        }
        match &mut self.link {
            Link::Connecting { stream, .. } => {
                let now = Instant::now();
                match connect_outcome(stream) {
                    Ok(false) => {} // Not yet: a spurious wake-up.
                    Ok(true) => {
                        let Link::Connecting { stream, .. } =
                            std::mem::replace(&mut self.link, Link::Finished)
                        else {
                            unreachable!("matched above");
                        };
                        self.link = Link::Up {
                            stream,
                            rbuf: BytesMut::new(),
                            unwritten: BytesMut::new(),
                        };
                        self.client.handle_connected(ctx.clock.core_at(now));
                        self.service(ctx, now, now);
                    }
                    Err(e) => {
                        ctx.state.error(format!("connect: {e}"), 1);
                        self.end(ctx, now, End::Broken);
                    }
                }
            }
            Link::Up {
                stream,
                rbuf,
                unwritten,
            } => {
                let mut failed = None;
                let mut eof = false;
                let mut stamp = None;
                if ev.is_writable() && !unwritten.is_empty() {
                    if let Err(e) = write_out(stream, unwritten) {
                        failed = Some(format!("write: {}", e.kind()));
                    }
                }
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    match read_available(stream, rbuf, &mut ctx.scratch, &mut ctx.cmsg) {
                        Ok((open, at)) => {
                            eof = !open;
                            stamp = at;
                        }
                        Err(e) => failed = Some(format!("read: {}", e.kind())),
                    }
                }
                let now = Instant::now();
                // Latencies end when the bytes reached the socket, as the kernel stamped
                // them; the read time only if there was no stamp.
                let arrival = stamp.map_or(now, |t| ctx.clock.instant_of_stamp(t).min(now));
                if !rbuf.is_empty() {
                    self.client.handle_bytes(ctx.clock.core_at(now), rbuf);
                }
                if let Some(why) = failed {
                    self.service(ctx, now, arrival);
                    if matches!(self.link, Link::Up { .. }) {
                        ctx.state.error(why, 1);
                        self.end(ctx, now, End::Broken);
                    }
                    return;
                }
                self.service(ctx, now, arrival);
                if eof && matches!(self.link, Link::Up { .. }) {
                    if ctx.phase < Phase::Done {
                        ctx.state.error("closed by the gateway without a frame", 1);
                    }
                    self.end(ctx, now, End::Broken);
                }
            }
            Link::Backoff { .. } | Link::Finished => {}
        }
    }

    /// The wake-up this connection asked for came (or a stale one: then nothing is due).
    /// What was due by `due_by`, the tick boundary just passed, is done now; what falls
    /// between it and `now` waits for the next boundary, so a send's intended time (its
    /// boundary) is never later than when it goes out.
    pub fn handle_timer(&mut self, ctx: &mut Ctx, now: Instant, due_by: Instant) {
        match &self.link {
            Link::Connecting { deadline, .. } => {
                if due_by >= *deadline {
                    ctx.state.error("connect: timed out", 1);
                    self.end(ctx, now, End::Broken);
                } else {
                    ctx.timers.arm(self.slot, Some(*deadline));
                }
            }
            Link::Backoff { until } => {
                if due_by >= *until {
                    self.open(ctx, now);
                } else {
                    ctx.timers.arm(self.slot, Some(*until));
                }
            }
            Link::Up { .. } => {
                if self.engine_wake.is_some_and(|t| t <= due_by) {
                    self.client.handle_timeout(ctx.clock.core_at(now));
                }
                if self.next_send.is_some_and(|t| t <= due_by) {
                    self.send_due(ctx, now, due_by);
                }
                if self.next_drop.is_some_and(|t| t <= due_by) {
                    self.next_drop = self
                        .next_drop
                        .zip(self.drop_every)
                        .map(|(t, d)| (t + d).max(now));
                    // A connection still logging in skips this drop; its timer moved on
                    // either way, so the loop never spins on a past deadline.
                    if self.authenticated {
                        ctx.state.counters.drops += 1;
                        self.end(ctx, now, End::Planned);
                        return;
                    }
                }
                self.service(ctx, now, now);
            }
            Link::Finished => {}
        }
    }

    /// The run's phase changed (`ctx.phase` is the new one).
    pub fn handle_phase(&mut self, ctx: &mut Ctx, now: Instant) {
        match self.link {
            Link::Up { .. } => self.service(ctx, now, now),
            Link::Backoff { .. } if ctx.phase == Phase::Done => {
                self.link = Link::Finished;
                ctx.timers.arm(self.slot, None);
            }
            Link::Backoff { .. } | Link::Connecting { .. } | Link::Finished => {}
        }
    }

    // ---- the session ----------------------------------------------------------------------

    /// After any input of a live session: read-back Pulls (phase Verifying), what the engine
    /// queued written, its events handled, the schedules started or stopped, and the next
    /// wake-up asked for. Ends the session if the engine or the socket says so. `arrival`
    /// is when the input's bytes reached the socket (`now` for other inputs): the end of
    /// the latencies of the Acks and Delivers it held.
    fn service(&mut self, ctx: &mut Ctx, now: Instant, arrival: Instant) {
        if ctx.phase == Phase::Verifying {
            self.verify_step(ctx, now);
        }
        if let Err(why) = self.transmit() {
            ctx.state.error(why, 1);
            self.end(ctx, now, End::Broken);
            return;
        }
        if let Some(end) = self.process_events(ctx, now, arrival) {
            // Flush what the engine queued last (an Error frame), best effort.
            let _ = self.transmit();
            self.end(ctx, now, end);
            return;
        }
        // Handling the events may have freed room for Pulls or queued a retry.
        if ctx.phase == Phase::Verifying {
            self.verify_step(ctx, now);
        }
        if let Err(why) = self.transmit() {
            ctx.state.error(why, 1);
            self.end(ctx, now, End::Broken);
            return;
        }
        if ctx.phase == Phase::Done {
            self.end(ctx, now, End::Finished);
            return;
        }
        self.arm_schedules(now, ctx.phase);
        self.engine_wake = self.client.poll_timeout().map(|t| ctx.clock.instant_of(t));
        let wake = [self.engine_wake, self.next_send, self.next_drop]
            .into_iter()
            .flatten()
            .min();
        ctx.timers.arm(self.slot, wake);
    }

    /// Writes what the engine queued (behind anything the socket did not take before).
    fn transmit(&mut self) -> Result<(), String> {
        let Link::Up {
            stream, unwritten, ..
        } = &mut self.link
        else {
            return Ok(());
        };
        while let Some(b) = self.client.poll_transmit() {
            if unwritten.is_empty() {
                // The common case: straight from the engine's buffer, no copy.
                let n = write_some(stream, &b).map_err(|e| format!("write: {}", e.kind()))?;
                unwritten.extend_from_slice(&b[n..]);
            } else {
                // The socket was full: its writable event flushes this, in order.
                unwritten.extend_from_slice(&b);
            }
        }
        if unwritten.len() > UNWRITTEN_BYTES_MAX {
            return Err(format!(
                "write: over {UNWRITTEN_BYTES_MAX} bytes the socket did not take"
            ));
        }
        Ok(())
    }

    /// The session (or the connect) is over: the socket closed, the engine told, and the
    /// next step taken (reconnect now, back off, or finish).
    fn end(&mut self, ctx: &mut Ctx, now: Instant, end: End) {
        match std::mem::replace(&mut self.link, Link::Finished) {
            Link::Up { mut stream, .. } | Link::Connecting { mut stream, .. } => {
                if end == End::Planned {
                    // An abrupt drop, as a phone losing its network: RST, no TIME_WAIT.
                    let rst = nix::libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    };
                    let _ = nix_socket::setsockopt(&stream, sockopt::Linger, &rst);
                }
                let _ = ctx.registry.deregister(&mut stream);
            }
            Link::Backoff { .. } | Link::Finished => {}
        }
        self.client.handle_disconnected(ctx.clock.core_at(now));
        if self.authenticated {
            self.authenticated = false;
            ctx.state.counters.authenticated -= 1;
        }
        let _ = self.process_events(ctx, now, now);
        if self.convs.is_some() && end != End::Finished {
            self.rebuild_client(ctx);
        }
        match end {
            End::Finished => {
                ctx.timers.arm(self.slot, None);
            }
            End::Planned => {
                self.backoff = BACKOFF_MIN;
                self.link = Link::Backoff { until: now };
                self.open(ctx, now);
            }
            End::Broken => {
                let wait = self.backoff + self.jitter(self.backoff);
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                if ctx.phase == Phase::Done {
                    ctx.timers.arm(self.slot, None);
                } else {
                    let until = now + wait;
                    self.link = Link::Backoff { until };
                    ctx.timers.arm(self.slot, Some(until));
                }
            }
        }
    }

    /// Starts the send and drop schedules when the load starts; stops them after (a
    /// `Convs` connection keeps sending while it has conversations to write again).
    fn arm_schedules(&mut self, now: Instant, phase: Phase) {
        match self.send_every.filter(|_| self.has_work(phase)) {
            None => self.next_send = None,
            Some(every) => {
                if self.next_send.is_none() {
                    self.next_send = Some(now + self.jitter(every));
                }
            }
        }
        if phase != Phase::Running {
            self.next_drop = None;
        } else if self.next_drop.is_none() {
            if let Some(every) = self.drop_every {
                self.next_drop = Some(now + self.jitter(every));
            }
        }
    }

    /// Whether there is anything to send in `phase`.
    fn has_work(&self, phase: Phase) -> bool {
        match self.convs {
            None => phase == Phase::Running && self.conv.is_some(),
            Some(c) => {
                (phase == Phase::Running && self.next_j < c.share(self.index))
                    || (matches!(phase, Phase::Running | Phase::Draining) && !self.again.is_empty())
            }
        }
    }

    /// The conversation the next send goes to, if any is due: the connection's one, or in
    /// `Convs` a conversation due to be written again, else (while running) a new one.
    fn next_conv(&mut self, due_by: Instant, phase: Phase) -> Option<ConvId> {
        let Some(c) = self.convs else {
            return self.conv;
        };
        if self.again.front().is_some_and(|&(t, _)| t <= due_by) {
            return self.again.pop_front().map(|(_, conv)| conv);
        }
        if phase == Phase::Running && self.next_j < c.share(self.index) {
            let k = c.k(self.index, self.next_j);
            self.next_j += 1;
            return Some(ConvId::direct(self.user, UserId(c.peer_base + k)));
        }
        None
    }

    /// Sends every message whose schedule time is at or before `due_by`.
    fn send_due(&mut self, ctx: &mut Ctx, now: Instant, due_by: Instant) {
        let Some(every) = self.send_every else {
            return;
        };
        let mut sent = 0;
        while let Some(at) = self.next_send.filter(|&t| t <= due_by) {
            if sent == CATCH_UP_MAX {
                let behind = (now - at).as_secs_f64() / every.as_secs_f64();
                ctx.state.error("send backlog dropped", behind as u64);
                self.next_send = Some(now + every);
                break;
            }
            let Some(conv) = self.next_conv(due_by, ctx.phase) else {
                // Nothing due: wait for the next conversation to write again, if any
                // (`arm_schedules` starts the schedule again when there is new work).
                self.next_send = self.again.front().map(|&(t, _)| t.max(at + every));
                break;
            };
            self.next_send = Some(at + every);
            sent += 1;
            // The send goes out on the tick boundary at or after its schedule time: that
            // boundary is its intended time (see the worker's module doc).
            let intended = ctx.clock.nanos_since_epoch(ctx.clock.tick_ceil(at));
            let number = self.next_number;
            let mut payload = BytesMut::from(&self.payload[..]);
            payload[0..8].copy_from_slice(&intended.to_le_bytes());
            payload[8..12].copy_from_slice(&self.index.to_le_bytes());
            payload[12..16].copy_from_slice(&number.to_le_bytes());
            let payload = payload.freeze();
            match self.client.send(
                ctx.clock.core_at(now),
                conv,
                payload.clone(),
                Priority::Normal,
            ) {
                Ok(id) => {
                    self.next_number += 1;
                    let sent = Sent {
                        intended,
                        number,
                        in_window: ctx.state.in_window,
                        conv,
                        payload,
                    };
                    self.pending.push_back((id, sent));
                    ctx.state.counters.sent += 1;
                }
                Err(ClientError::OutboxFull { .. }) if self.convs.is_some() => {
                    // Backpressure from a slow gateway: this conversation waits its turn.
                    let wait = RETRY_AFTER + self.jitter(RETRY_AFTER);
                    self.again.push_back((now + wait, conv));
                }
                Err(e) => ctx.state.error(format!("send: {e}"), 1),
            }
        }
    }

    /// After a disconnect (`Convs`): a new client engine, with no cursors, holding the
    /// unacked messages under their own ids (so a message that became durable before the
    /// disconnect is answered by dedupe, not stored twice). The old engine's cursors, one
    /// per conversation written, would make the reconnect's Sync longer than the gateway
    /// takes.
    fn rebuild_client(&mut self, ctx: &mut Ctx) {
        self.rebuilds += 1;
        let mut config = self.client.config().clone();
        // A new seed: the new engine must not draw the ids the old one drew.
        config.seed = config
            .seed
            .wrapping_add(self.rebuilds.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut client = Client::new(config, BTreeMap::new());
        // `pending` is in send order, the order the engine must get them back in.
        for (id, p) in &self.pending {
            if let Err(e) = client.restore_unacked(*id, p.conv, p.payload.clone(), Priority::Normal)
            {
                ctx.state
                    .error(format!("restoring an unacked message: {e}"), 1);
            }
        }
        self.client = client;
        // Reads in flight died with the connection: they go again.
        for (_, conv) in self.verify_pending.drain() {
            self.verify_queue.push_back(conv);
        }
    }

    /// `Convs` read-back: chooses the conversations to read (once, spread evenly over
    /// those this connection wrote) and keeps as many Pulls in flight as the engine allows.
    fn verify_step(&mut self, ctx: &mut Ctx, now: Instant) {
        let Some(c) = self.convs else {
            return;
        };
        if !self.verify_planned {
            self.verify_planned = true;
            let written = self.next_j;
            let v = c.verify_per_connection.min(written);
            for t in 0..v {
                let j = t * written / v;
                let k = c.k(self.index, j);
                self.verify_queue
                    .push_back(ConvId::direct(self.user, UserId(c.peer_base + k)));
            }
            ctx.state.verify_planned += 1;
            ctx.state.verify_open += v;
        }
        while let Some(&conv) = self.verify_queue.front() {
            // Not ready or at the engine's bound of Pulls: the rest go on a later turn.
            let Ok(req) = self.client.pull(ctx.clock.core_at(now), conv, Seq(1), 1) else {
                break;
            };
            self.verify_queue.pop_front();
            self.verify_pending.insert(req, conv);
        }
    }

    /// Handles the engine's events; says if the session must end. `arrival` is when the
    /// input that caused them reached the socket: the end of each latency measured here.
    fn process_events(&mut self, ctx: &mut Ctx, now: Instant, arrival: Instant) -> Option<End> {
        let mut end = None;
        let clock = &ctx.clock;
        let arrival_ns = clock.nanos_since_epoch(arrival);
        let st = &mut ctx.state;
        while let Some(ev) = self.client.poll_event() {
            match ev {
                ClientEvent::Authenticated { .. } => {
                    if !self.authenticated {
                        self.authenticated = true;
                        st.counters.authenticated += 1;
                    }
                    st.counters.logins += 1;
                }
                ClientEvent::Acked { client_msg_id, .. } => {
                    if let Some(sent) = take_pending(&mut self.pending, client_msg_id) {
                        if sent.in_window {
                            let lat = arrival_ns.saturating_sub(sent.intended);
                            st.ack_hist
                                .saturating_record((lat / 1000).clamp(1, LATENCY_MAX_US));
                        }
                        st.ledger.acked(self.index, sent.number);
                        st.counters.acked += 1;
                        st.owed += u64::from(self.peers);
                    }
                }
                ClientEvent::Nacked {
                    client_msg_id,
                    conv,
                    code,
                    retriable,
                    ..
                } if self.convs.is_some() && code == ErrorCode::RateLimited && !retriable => {
                    // Refused, not stored: written again later, as a new message.
                    if take_pending(&mut self.pending, client_msg_id).is_some() {
                        st.counters.rate_limited += 1;
                        let wait = RETRY_AFTER + self.jitter(RETRY_AFTER);
                        self.again.push_back((now + wait, conv));
                    }
                }
                ClientEvent::Nacked {
                    client_msg_id,
                    code,
                    retriable,
                    ..
                } => {
                    st.error(format!("nack: {code:?}"), 1);
                    if retriable {
                        self.client.retry(clock.core_at(now), client_msg_id);
                    } else {
                        take_pending(&mut self.pending, client_msg_id);
                    }
                }
                ClientEvent::SendFailed {
                    client_msg_id,
                    reason,
                    ..
                } => {
                    // After a disconnect the engine re-sends by itself after AuthOk.
                    if reason == SendFailure::Timeout {
                        st.error("send timeout", 1);
                        self.client.retry(clock.core_at(now), client_msg_id);
                    }
                }
                // Convs: nobody else writes to these conversations, so this is one of this
                // connection's own messages, replayed by a read-back Pull.
                ClientEvent::Message { .. } if self.convs.is_some() => {}
                ClientEvent::Message { payload, .. } => {
                    let Some(header) = payload.get(..PAYLOAD_HEADER) else {
                        st.error("message without a loadgen header", 1);
                        continue;
                    };
                    let mut header = header;
                    let intended = header.get_u64_le();
                    let sender = header.get_u32_le();
                    let number = header.get_u32_le();
                    let lat = arrival_ns.saturating_sub(intended);
                    st.deliver_hist
                        .saturating_record((lat / 1000).clamp(1, LATENCY_MAX_US));
                    st.counters.delivered += 1;
                    if st.ledger.received(self.index, sender, number) != Seen::Repeat {
                        st.made += 1;
                    }
                }
                ClientEvent::HistoryGap {
                    from_seq, to_seq, ..
                } => st.error("history gap", to_seq.0 - from_seq.0 + 1),
                ClientEvent::SyncFailed { reason, .. } => {
                    st.error(format!("sync failed: {reason:?}"), 1)
                }
                ClientEvent::PullDone {
                    req, latest_seq, ..
                } => {
                    if self.verify_pending.remove(&req).is_some() {
                        st.verify_open -= 1;
                        if latest_seq >= Seq(1) {
                            st.counters.verified += 1;
                        } else {
                            st.counters.verify_missing += 1;
                        }
                    }
                }
                ClientEvent::PullFailed { req, conv, reason } => {
                    let what = match &reason {
                        RequestFailure::Rejected { code, .. } => format!("{code:?}"),
                        other => format!("{other:?}"),
                    };
                    st.error(format!("pull failed: {what}"), 1);
                    if self.verify_pending.remove(&req).is_some() {
                        // Read again (a disconnect or a timeout); the deadline bounds it.
                        self.verify_queue.push_back(conv);
                    }
                }
                ClientEvent::Closed { code, message, .. } => {
                    st.error(format!("closed: {code:?}: {message}"), 1);
                    end = Some(End::Broken);
                }
                ClientEvent::Dead => {
                    st.error("gateway silent for two heartbeats", 1);
                    end = Some(End::Broken);
                }
                ClientEvent::Notify { .. }
                | ClientEvent::SyncDone { .. }
                | ClientEvent::Signal { .. }
                | ClientEvent::Inbox { .. }
                | ClientEvent::History { .. } => {}
            }
        }
        let outbox = self.client.outbox_len() + self.again.len();
        st.outboxes = st.outboxes + outbox - self.outbox_told;
        self.outbox_told = outbox;
        end
    }
}

/// Takes message `id` out of `pending` (searched from the oldest: Acks come in send order).
fn take_pending(pending: &mut VecDeque<(ClientMsgId, Sent)>, id: ClientMsgId) -> Option<Sent> {
    let i = pending.iter().position(|(p, _)| *p == id)?;
    pending.remove(i).map(|(_, sent)| sent)
}

/// A nonblocking TCP connect from `source` (port chosen by the kernel) to `gateway`, under
/// way or done, with Nagle off and the kernel's receive stamps on.
fn connect_nonblocking(source: Ipv4Addr, gateway: SocketAddr) -> io::Result<TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn};
    let SocketAddr::V4(gateway) = gateway else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "loadgen connects over IPv4 (its sources are 127.0.0.x)",
        ));
    };
    let fd = nix_socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    nix_socket::setsockopt(&fd, sockopt::TcpNoDelay, &true)?;
    nix_socket::setsockopt(&fd, sockopt::ReceiveTimestampns, &true)?;
    nix_socket::bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(source, 0)),
    )?;
    match nix_socket::connect(fd.as_raw_fd(), &SockaddrIn::from(gateway)) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(TcpStream::from_std(std::net::TcpStream::from(fd)))
}

/// Whether a nonblocking connect finished: `Ok(false)` while under way, an error if it
/// failed (as mio documents: the pending error first, then whether there is a peer).
fn connect_outcome(stream: &TcpStream) -> io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

/// Reads what the socket holds into `rbuf` through the worker's scratch buffer, so an idle
/// connection keeps no buffer of its own. Returns whether the stream is still open (`false`:
/// end of stream) and the kernel's receive stamp of the last bytes read, if any.
///
/// A read shorter than the scratch buffer emptied the socket, so it is the last: epoll
/// (edge-triggered) reports the next bytes as a new event. That saves the read that would
/// only say `WouldBlock`, one system call per frame received.
fn read_available(
    stream: &mut TcpStream,
    rbuf: &mut BytesMut,
    scratch: &mut [u8],
    cmsg: &mut [u8],
) -> io::Result<(bool, Option<SystemTime>)> {
    let mut stamp = None;
    loop {
        let mut iov = [IoSliceMut::new(scratch)];
        let got = nix_socket::recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut *cmsg),
            MsgFlags::MSG_DONTWAIT,
        );
        let msg = match got {
            Ok(msg) => msg,
            Err(nix::errno::Errno::EAGAIN) => return Ok((true, stamp)),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let n = msg.bytes;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmTimestampns(ts) = c {
                    let since = Duration::new(ts.tv_sec().max(0) as u64, ts.tv_nsec() as u32);
                    stamp = Some(UNIX_EPOCH + since);
                }
            }
        }
        if n == 0 {
            return Ok((false, stamp));
        }
        rbuf.extend_from_slice(&scratch[..n]);
        if n < scratch.len() {
            return Ok((true, stamp));
        }
    }
}

/// Writes as much of `b` as the socket takes now; returns how much.
fn write_some(stream: &mut TcpStream, b: &[u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < b.len() {
        match stream.write(&b[n..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Writes as much of `unwritten` as the socket takes now and drops it from the front.
fn write_out(stream: &mut TcpStream, unwritten: &mut BytesMut) -> io::Result<()> {
    let n = write_some(stream, unwritten)?;
    unwritten.advance(n);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_gives_back_its_slot_and_generation() {
        for (slot, generation) in [(0, 0), (1, 1), (u32::MAX - 1, 7), (42, u32::MAX)] {
            assert_eq!(untoken(token(slot, generation)), (slot, generation));
        }
        assert_ne!(
            token(3, 1),
            token(3, 2),
            "a reused slot's new socket is told apart"
        );
    }

    fn sent(number: u32) -> Sent {
        Sent {
            intended: 0,
            number,
            in_window: true,
            conv: ConvId::group(1),
            payload: Bytes::new(),
        }
    }

    #[test]
    fn pending_messages_are_taken_by_id_in_any_order() {
        let id = |n: u8| ClientMsgId([n; 16]);
        let mut pending: VecDeque<(ClientMsgId, Sent)> =
            (1..=3).map(|n| (id(n as u8), sent(n))).collect();
        assert_eq!(take_pending(&mut pending, id(2)).map(|s| s.number), Some(2));
        assert!(take_pending(&mut pending, id(2)).is_none(), "taken once");
        assert_eq!(take_pending(&mut pending, id(1)).map(|s| s.number), Some(1));
        assert_eq!(pending.len(), 1);
    }
}
