//! The Reactor: one shard's event loop over its own io_uring, on its own pinned thread.
//!
//! Each turn of the loop:
//! 1. takes every completion from the ring and hands it to the engine that waits for it:
//!    accepted sockets and received bytes to the [`Shard`], sent byte counts to the shard
//!    (`handle_written`), log completions to the [`LogEngine`] (whose events go to the
//!    shard right after each call into it, before the next: its driver contract);
//! 2. takes every batch of messages the other shards queued for this one (FIFO per pair)
//!    and admin commands (shard 0);
//! 3. fires what is due: the shard's timers (`poll_timeout`), the housekeeping tick
//!    ([`TICK`]: metrics, `/healthz`'s proof of life, key reloads, the stop flag, the log's
//!    retention by age), closing sockets' lingers;
//! 4. turns the engines' output into submissions: appends, fetches and loads into the log
//!    engine and its operations onto the ring; messages for other shards into their queues
//!    (with a wake-up if the peer sleeps); per connection, everything this turn queued in
//!    one vectored send (at most one in flight per connection);
//! 5. submits and waits in one `io_uring_enter`: for a completion, a wake-up from another
//!    thread (an eventfd read armed on the ring), or the next deadline, whichever is first.
//!
//! A connection's sockets and buffers are the Reactor's [`Sock`]s: a compact record, no
//! task, future or timer. Receives are multishot from the ring's provided buffers, so an
//! idle connection holds no buffer; bytes are copied into the connection's `rx` only
//! while a frame is incomplete. Payloads go to the kernel as the `Bytes` the engine made
//! (shared by every recipient), never copied.
//!
//! The Reactor decides nothing (see the driver contracts in `imgate_core::shard` and
//! `imgate_core::log_engine`): it moves bytes, completions and time.

use crate::config::Config;
use crate::log_files::{LogFiles, TAG_KIND_MASK, TAG_LOG};
use crate::metrics::Metrics;
use crate::runtime::{AdminReply, AdminRequest, Clock, EventFd, KeyWatch, MeshBatch};
use crate::uring::{Done, OpId, Owned, Ring, TAG_WAKE_FAILED, TAG_WOKEN};
use anyhow::{Context as _, Result};
use bytes::{Bytes, BytesMut};
use imgate_core::auth::TokenVerifier;
use imgate_core::log::ScanEnd;
use imgate_core::log_engine::{FileId, IoId, LogEngine, LogError, LogEvent, Op};
use imgate_core::mesh::{ConnId, ShardId};
use imgate_core::shard::{Effect, Lsn, Shard, ShardConfig};
use imgate_spsc::{Consumer, Producer, Signal, Wake};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The housekeeping tick: metrics, the proof of life `/healthz` reads, key reloads, the
/// stop flag and the log's retention by age. 100 ms: `/healthz` calls a shard silent after
/// 2 s, and a SIGTERM is seen within a tick. The shard's own timers are not on this tick;
/// the loop wakes for `Shard::poll_timeout` itself.
pub const TICK: Duration = Duration::from_millis(100);

/// How long a connection the engine has closed may take to write its last bytes (what was
/// queued and the final Error or GoAway) before its socket is shut down anyway. 2 s: a
/// client that reads gets its last frame within a few round trips even on a slow mobile
/// link; one that does not read (the usual reason for such a close) cannot hold the
/// descriptor, the kernel's buffers and the backlog for longer.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// How often closing connections that wrote their last frame check whether the peer
/// acknowledged it (SIOCOUTQ). 10 ms: a fraction of a round trip on most links, and only
/// while some connection is closing.
const ACK_POLL: Duration = Duration::from_millis(10);

/// How long to wait before accepting again after accept failed (out of descriptors, say).
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// How soon to retry a peer's queue that was full. The peer empties it within its turn.
const MESH_RETRY: Duration = Duration::from_millis(1);

/// Ring operation tags: the kind in the top byte (the log's is [`TAG_LOG`]), then for
/// connection operations the socket's generation (24 bits) and index (32 bits).
const TAG_ACCEPT: u64 = 1 << 56;
const TAG_WAKE: u64 = 2 << 56;
const TAG_RECV: u64 = 4 << 56;
const TAG_SEND: u64 = 5 << 56;
/// Cancels: their completions say nothing the cancelled operation's will not.
const TAG_CANCEL: u64 = 6 << 56;
const TAG_GENERATION_MASK: u64 = 0xff_ffff;

/// Where a socket is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The slot is free.
    Free,
    /// The engine knows the connection (`conn`).
    Open,
    /// The engine closed and forgot it (or refused it): its last bytes are written, then
    /// FIN, then the peer's acknowledgement is awaited, all within [`CLOSE_LINGER`].
    Closing,
    /// Shut down: the descriptor closes once no operation on it is in flight.
    Gone,
}

/// What only a closing socket needs.
struct Closing {
    /// When the linger runs out.
    until: Instant,
    /// FIN was sent (everything queued was written).
    fin: bool,
}

/// One connection's socket: the Reactor's whole per-connection state. Compact (its size is
/// asserted in a test); what only closing sockets need is boxed.
struct Sock {
    fd: RawFd,
    generation: u32,
    phase: Phase,
    /// The multishot receive, while armed.
    recv: Option<OpId>,
    /// A send is in flight.
    sending: bool,
    /// Queued for the next send (after the one in flight).
    queued: bool,
    /// The engine's id of the connection (while `Open`).
    conn: ConnId,
    /// The bytes of an incomplete frame; empty (no allocation) otherwise.
    rx: BytesMut,
    /// Chunks waiting for a send.
    out: VecDeque<Bytes>,
    closing: Option<Box<Closing>>,
}

impl Sock {
    fn free() -> Sock {
        Sock {
            fd: -1,
            generation: 0,
            phase: Phase::Free,
            recv: None,
            sending: false,
            queued: false,
            conn: ConnId {
                index: u32::MAX,
                generation: 0,
            },
            rx: BytesMut::new(),
            out: VecDeque::new(),
            closing: None,
        }
    }
}

/// One shard's log: the engine, the files it runs on, and what the driver keeps of it.
struct Log {
    engine: LogEngine,
    files: LogFiles,
    /// Appends handed to the engine and not yet durable, with when: for the send->ack
    /// histogram.
    appended: VecDeque<(Lsn, Instant)>,
    /// Segment syncs in flight and when each started: for the fsync histogram.
    syncs: Vec<(IoId, Instant)>,
    /// `close` was called: appends are refused from now on.
    closing: bool,
    /// The engine reported `Closed`.
    closed: bool,
    /// The engine stopped for good (`Stopped`): the shard drains and fails with this.
    stopped: Option<LogError>,
}

impl Log {
    fn takes_appends(&self) -> bool {
        self.engine.is_running() && !self.closing
    }
}

/// This shard's ends of the mesh: a queue from and to every other shard.
pub struct MeshEnds {
    /// Indexed by peer shard; `None` at this shard's own index.
    pub inbound: Vec<Option<Consumer<MeshBatch>>>,
    pub outbound: Vec<Option<Producer<MeshBatch>>>,
    /// Each shard's wake-up, this one's included.
    pub wakes: Vec<Arc<Wake<EventFd>>>,
    /// Each shard's ring descriptor once its ring exists (-1 before and after): a sleeping
    /// peer is woken by a completion this shard's ring posts on it (IORING_OP_MSG_RING),
    /// which costs no syscall of its own; its eventfd is the fallback.
    pub rings: Arc<Vec<AtomicI32>>,
}

/// Shard 0's ends of the admin thread's queues.
pub struct AdminEnds {
    pub requests: Consumer<AdminRequest>,
    pub replies: Producer<AdminReply>,
    /// Wakes the admin thread's reply dispatcher.
    pub wake: Arc<tokio::sync::Notify>,
}

/// Everything a shard thread is handed.
pub struct ShardSetup {
    pub index: usize,
    pub count: usize,
    pub config: Config,
    pub verifier: TokenVerifier,
    pub metrics: Arc<Metrics>,
    pub mesh: MeshEnds,
    pub admin: Option<AdminEnds>,
    pub stop: Arc<AtomicBool>,
    pub clock: Clock,
    pub keys: KeyWatch,
    pub hash_seed: u128,
}

/// Where the shard is in its life.
enum Stage {
    Serving,
    /// Stop was asked: GoAway sent, waiting for sockets to close and appends to become
    /// durable, within the shutdown timeout.
    Draining {
        since: Instant,
    },
    /// The log was asked to close.
    ClosingLog,
}

pub struct Reactor {
    index: usize,
    ring: Ring,
    shard: Shard,
    log: Log,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    clock: Clock,
    keys: KeyWatch,
    config: Config,
    connections_max: usize,

    listener: Option<OwnedFd>,
    /// The multishot accept, while armed.
    accepting: Option<OpId>,
    /// Its cancel was asked for (no room, or draining).
    accept_cancelled: bool,
    /// Accepting waits: until this time (a failed accept), or for a closing socket to go.
    accept_paused_until: Option<Instant>,

    socks: Vec<Sock>,
    free_socks: Vec<u32>,
    /// Sockets not free.
    socks_open: usize,
    /// Engine connection index -> socket index.
    by_conn: Vec<u32>,
    /// Sockets with chunks to send this turn.
    to_send: Vec<u32>,
    /// Sockets closing or gone, checked when `close_check` is due.
    closing: Vec<u32>,
    close_check: Option<Instant>,
    /// Receives that ended for want of buffers (ENOBUFS), armed again next turn.
    rearm: Vec<u32>,

    mesh: MeshEnds,
    /// Messages for each peer not yet in its queue.
    mesh_out: Vec<Vec<imgate_core::mesh::ShardMsg>>,
    mesh_retry: Option<Instant>,
    admin: Option<AdminEnds>,
    admin_replies: VecDeque<AdminReply>,
    wake_fd: RawFd,

    next_tick: Instant,
    stage: Stage,
    done: Vec<Done>,
}

/// Opens the log, recovers it, builds the shard and runs the loop until the shard has
/// drained and its log closed. The caller's thread becomes the shard's.
pub fn run_shard(setup: ShardSetup) -> Result<()> {
    let ShardSetup {
        index,
        count,
        config,
        verifier,
        metrics,
        mesh,
        admin,
        stop,
        clock,
        keys,
        hash_seed,
    } = setup;
    let dir = config.data_dir.join(format!("shard-{index}"));
    let mut ring = Ring::new().context("creating the shard's io_uring")?;
    let mut files = LogFiles::open(dir.clone())
        .with_context(|| format!("opening the log in {}", dir.display()))?;
    let mut engine = LogEngine::new(config.log_config(files.align()), clock.now());
    // Recovery's operations run one at a time, before the shard exists; what the engine
    // says after `Recovered` (a checkpoint due) waits for the shard.
    let mut recovered = None;
    let mut early = Vec::new();
    for event in files.run_to_idle(&mut ring, &mut engine, || clock.now()) {
        match event {
            LogEvent::Recovered(r) => recovered = Some(r),
            LogEvent::Stopped(e) => {
                return Err(anyhow::Error::new(e))
                    .with_context(|| format!("opening the log in {}", dir.display()))
            }
            other => early.push(other),
        }
    }
    let recovery = recovered
        .with_context(|| format!("recovering the log in {}: it never finished", dir.display()))?;
    let mut shard = Shard::new(
        ShardConfig {
            id: ShardId(index as u16),
            shard_count: count as u16,
            limits: config.limits.clone(),
            hash_seed,
        },
        verifier,
    );
    let records = recovery.records.len();
    shard
        .recover(recovery.records)
        .with_context(|| format!("recovering shard {index} from {}", dir.display()))?;
    // Zero padding is what every restart without a clean close finds (nothing is lost
    // with it); a torn record is an append cut by a crash, never acknowledged; a corrupt
    // frame at the tail may have been.
    match recovery.tail {
        ScanEnd::Corrupt { offset, reason } => tracing::error!(
            shard = index, offset, %reason, truncated_bytes = recovery.truncated_bytes,
            "corrupt record cut from the end of the log; if it was acknowledged, it is lost"
        ),
        ScanEnd::Torn { offset } => tracing::warn!(
            shard = index,
            offset,
            truncated_bytes = recovery.truncated_bytes,
            "torn record cut from the end of the log (an append cut by a crash)"
        ),
        ScanEnd::Clean | ScanEnd::ZeroTail { .. } => {}
    }
    tracing::info!(
        shard = index,
        records,
        segments = engine.segments(),
        log_bytes = engine.bytes(),
        read_bytes = recovery.read_bytes,
        truncated_bytes = recovery.truncated_bytes,
        rebuilt_index_files = recovery.rebuilt,
        replay_from = ?recovery.replay_from,
        index_heap_bytes = engine.index_heap_bytes(),
        direct_io = files.is_direct(),
        "log recovered"
    );
    let listener = crate::runtime::bind_reuseport(config.listen)
        .with_context(|| format!("binding {} on shard {index}", config.listen))?;
    let wake_fd = mesh.wakes[index].signal().fd();
    mesh.rings[index].store(ring.fd(), Ordering::Release);
    let now = Instant::now();
    let mut reactor = Reactor {
        index,
        ring,
        shard,
        log: Log {
            engine,
            files,
            appended: VecDeque::new(),
            syncs: Vec::new(),
            closing: false,
            closed: false,
            stopped: None,
        },
        metrics,
        stop,
        clock,
        keys,
        connections_max: config.limits.connections_max,
        config,
        listener: Some(listener),
        accepting: None,
        accept_cancelled: false,
        accept_paused_until: None,
        socks: Vec::new(),
        free_socks: Vec::new(),
        socks_open: 0,
        by_conn: Vec::new(),
        to_send: Vec::new(),
        closing: Vec::new(),
        close_check: None,
        rearm: Vec::new(),
        mesh_out: (0..count).map(|_| Vec::new()).collect(),
        mesh,
        mesh_retry: None,
        admin,
        admin_replies: VecDeque::new(),
        wake_fd,
        next_tick: now,
        stage: Stage::Serving,
        done: Vec::new(),
    };
    // What the log said after recovering (a checkpoint due), and the operations it issued
    // then (retention).
    for event in early {
        reactor.on_log_event(event);
    }
    reactor.run()
}

impl Reactor {
    fn run(&mut self) -> Result<()> {
        self.ring.read_eventfd(self.wake_fd, TAG_WAKE);
        self.arm_accept();
        loop {
            // Messages sequenced this turn are stamped from it (core keeps stamps from
            // going back if the wall clock does).
            self.shard.handle_wall_clock(wall_clock_ms());
            let mut done = std::mem::take(&mut self.done);
            self.ring.complete(&mut done);
            for d in done.drain(..) {
                self.on_done(d);
            }
            self.done = done;
            self.take_inbound();
            let now = Instant::now();
            self.fire_timers(now)?;
            if self.advance_stage(now)? {
                return self.finish();
            }
            self.pump();
            self.flush_mesh(now);
            self.flush_admin();
            self.start_sends();
            self.rearm_receives();
            self.wait(now)?;
        }
    }

    /// The shard's turn is over: submits and sleeps until a completion, a wake-up or the
    /// next deadline.
    fn wait(&mut self, now: Instant) -> Result<()> {
        let wake = self.mesh.wakes[self.index].clone();
        wake.prepare_sleep();
        let timeout = if self.has_inbound() {
            Some(Duration::ZERO)
        } else {
            Some(self.next_deadline(now).saturating_duration_since(now))
        };
        let result = self.ring.submit_and_wait(timeout);
        wake.cancel_sleep();
        result.context("waiting on the shard's io_uring")
    }

    fn next_deadline(&self, now: Instant) -> Instant {
        let mut at = self.next_tick;
        if let Some(t) = self.shard.poll_timeout() {
            at = at.min(now + self.clock.until(t));
        }
        for t in [self.close_check, self.accept_paused_until, self.mesh_retry]
            .into_iter()
            .flatten()
        {
            at = at.min(t);
        }
        at
    }

    fn has_inbound(&self) -> bool {
        self.mesh.inbound.iter().flatten().any(|c| !c.is_empty())
            || self.admin.as_ref().is_some_and(|a| !a.requests.is_empty())
    }

    // ---------------------------------------------------------------------------------
    // Completions
    // ---------------------------------------------------------------------------------

    fn on_done(&mut self, d: Done) {
        match d.tag & TAG_KIND_MASK {
            TAG_ACCEPT => self.on_accept(d),
            TAG_WAKE => {
                // Woken through the eventfd (the admin thread, or a peer's fallback): what
                // was queued is taken this turn.
                self.ring.read_eventfd(self.wake_fd, TAG_WAKE);
            }
            TAG_WOKEN => {
                // A peer's ring posted this: what it queued is taken this turn.
            }
            TAG_WAKE_FAILED => {
                // A wake-up could not be posted (a peer's ring is gone, say): wake every
                // peer through its eventfd instead; a spurious wake-up costs one turn.
                tracing::warn!(error = %std::io::Error::from_raw_os_error(-d.result), "posting a wake-up to a peer's ring");
                for (peer, wake) in self.mesh.wakes.iter().enumerate() {
                    if peer != self.index {
                        wake.signal().signal();
                    }
                }
            }
            TAG_LOG => {
                if let Some((id, result)) = self.log.files.complete(&mut self.ring, d) {
                    if let Some(at) = self.log.syncs.iter().position(|(s, _)| *s == id) {
                        let (_, started) = self.log.syncs.swap_remove(at);
                        if result.is_ok() {
                            // The group commit's fdatasync, from its start to its completion.
                            self.metrics
                                .shard(self.index)
                                .record_fsync(started.elapsed());
                        }
                    }
                    let now = self.clock.now();
                    self.log.engine.handle_completion(now, id, result);
                    self.drain_log_events();
                }
            }
            TAG_RECV => self.on_recv(d),
            TAG_SEND => self.on_sent(d),
            TAG_CANCEL => {}
            other => unreachable!("a completion with an unknown tag kind {other:#x}"),
        }
    }

    fn on_accept(&mut self, d: Done) {
        if !d.is_more() {
            self.accepting = None;
            self.accept_cancelled = false;
        }
        if d.result < 0 {
            if d.result == -libc::ECANCELED {
                self.check_room();
            } else {
                // Out of descriptors or a reset during the handshake: the listener is
                // still good; wait a moment rather than spin.
                tracing::warn!(error = %std::io::Error::from_raw_os_error(-d.result), "accept failed");
                self.accept_paused_until = Some(Instant::now() + ACCEPT_RETRY);
            }
            return;
        }
        let fd = d.result;
        set_nodelay(fd);
        let now = self.clock.now();
        let i = self.new_sock(fd);
        match self.shard.handle_open(now) {
            Ok(conn) => {
                let sock = &mut self.socks[i as usize];
                sock.phase = Phase::Open;
                sock.conn = conn;
                let ci = conn.index as usize;
                if self.by_conn.len() <= ci {
                    self.by_conn.resize(ci + 1, u32::MAX);
                }
                self.by_conn[ci] = i;
                self.arm_recv(i);
            }
            Err(refusal) => {
                // Refused (full or draining): the refusal is written like any closing
                // connection's last frame, bounded by the linger.
                let sock = &mut self.socks[i as usize];
                sock.out.push_back(refusal);
                self.start_closing(i);
            }
        }
        self.check_room();
    }

    fn on_recv(&mut self, d: Done) {
        let Some(i) = self.sock_of(d.tag) else {
            unreachable!("a receive outlives its socket");
        };
        let sock = &mut self.socks[i as usize];
        assert_eq!(
            sock.recv,
            Some(d.op),
            "a receive completion of the armed receive"
        );
        if !d.is_more() {
            sock.recv = None;
        }
        if let Some(bid) = d.buffer() {
            if sock.phase == Phase::Open && d.result > 0 {
                sock.rx
                    .extend_from_slice(self.ring.received(bid, d.result as usize));
            }
            self.ring.recycle(bid);
        }
        let phase = self.socks[i as usize].phase;
        match d.result {
            n if n > 0 => {
                if phase == Phase::Open {
                    let sock = &mut self.socks[i as usize];
                    let conn = sock.conn;
                    let mut rx = std::mem::take(&mut sock.rx);
                    let now = self.clock.now();
                    self.shard.handle_bytes(now, conn, &mut rx);
                    if !rx.is_empty() {
                        // An incomplete frame: the only per-connection buffer. Frames keep
                        // their slices alive, so an emptied buffer is simply dropped.
                        self.socks[i as usize].rx = rx;
                    }
                }
                // Nothing more is read once the engine closed the connection: it would
                // not take the bytes, and the peer gets nothing for them.
                let sock = &self.socks[i as usize];
                if sock.recv.is_none() && sock.phase == Phase::Open {
                    self.arm_recv(i);
                }
            }
            n if n == -libc::ENOBUFS => {
                // The shard's receive buffers ran out between two turns; they are back by
                // the next one. The bytes wait in the socket meanwhile.
                if phase == Phase::Open && self.socks[i as usize].recv.is_none() {
                    self.rearm.push(i);
                }
            }
            0 if phase == Phase::Closing => {
                // The peer finished sending; it may still read our last frame.
            }
            n if n == -libc::ECANCELED && phase != Phase::Open => {}
            _ => {
                // EOF or an error: the peer is gone.
                self.peer_gone(i);
            }
        }
        self.maybe_release(i);
    }

    fn on_sent(&mut self, d: Done) {
        let Some(i) = self.sock_of(d.tag) else {
            unreachable!("a send outlives its socket");
        };
        let Owned::Send(bufs) = d.owned else {
            unreachable!("a send gives back its chunks");
        };
        let sock = &mut self.socks[i as usize];
        sock.sending = false;
        if d.result <= 0 || sock.phase == Phase::Gone {
            // A failed socket (or one shut down meanwhile): the peer is gone.
            self.peer_gone(i);
            return;
        }
        let n = d.result as usize;
        let mut chunks: VecDeque<Bytes> = bufs.into_chunks().into();
        advance(&mut chunks, n);
        // What this send did not take goes before what was queued meanwhile.
        chunks.append(&mut sock.out);
        sock.out = chunks;
        if !sock.out.is_empty() {
            self.queue_send(i);
        }
        let sock = &self.socks[i as usize];
        if sock.phase == Phase::Open {
            let (conn, now) = (sock.conn, self.clock.now());
            // Each write that made progress is reported at once: a slow reader's progress
            // keeps its connection, and the room it made lets the next page of history go.
            self.shard.handle_written(now, conn, n);
        } else if sock.phase == Phase::Closing && sock.out.is_empty() {
            self.close_check = Some(Instant::now());
        }
    }

    // ---------------------------------------------------------------------------------
    // Sockets
    // ---------------------------------------------------------------------------------

    fn new_sock(&mut self, fd: RawFd) -> u32 {
        let i = match self.free_socks.pop() {
            Some(i) => i,
            None => {
                self.socks.push(Sock::free());
                u32::try_from(self.socks.len() - 1).expect("fewer than 2^32 sockets")
            }
        };
        let sock = &mut self.socks[i as usize];
        assert_eq!(sock.phase, Phase::Free);
        let generation = sock.generation.wrapping_add(1);
        *sock = Sock::free();
        sock.generation = generation;
        sock.fd = fd;
        sock.phase = Phase::Gone; // until the caller says what it is
        self.socks_open += 1;
        i
    }

    fn tag(&self, kind: u64, i: u32) -> u64 {
        let generation = u64::from(self.socks[i as usize].generation) & TAG_GENERATION_MASK;
        kind | generation << 32 | u64::from(i)
    }

    /// The socket a connection operation's tag names; it is alive while any operation
    /// on it is in flight.
    fn sock_of(&self, tag: u64) -> Option<u32> {
        let i = (tag & 0xffff_ffff) as u32;
        let generation = (tag >> 32) & TAG_GENERATION_MASK;
        let sock = self.socks.get(i as usize)?;
        (sock.phase != Phase::Free
            && u64::from(sock.generation) & TAG_GENERATION_MASK == generation)
            .then_some(i)
    }

    fn conn_sock(&self, conn: ConnId) -> Option<u32> {
        let i = *self.by_conn.get(conn.index as usize)?;
        let sock = self.socks.get(i as usize)?;
        (sock.phase == Phase::Open && sock.conn == conn).then_some(i)
    }

    fn arm_recv(&mut self, i: u32) {
        let tag = self.tag(TAG_RECV, i);
        let sock = &mut self.socks[i as usize];
        assert!(sock.recv.is_none(), "one receive per socket");
        let fd = sock.fd;
        sock.recv = Some(self.ring.recv_multi(fd, tag));
    }

    fn rearm_receives(&mut self) {
        for i in std::mem::take(&mut self.rearm) {
            let sock = &self.socks[i as usize];
            if sock.phase == Phase::Open && sock.recv.is_none() {
                self.arm_recv(i);
            }
        }
    }

    fn queue_send(&mut self, i: u32) {
        let sock = &mut self.socks[i as usize];
        if !sock.queued {
            sock.queued = true;
            self.to_send.push(i);
        }
    }

    /// One send per socket with something queued and none in flight: everything this turn
    /// produced for a connection goes in one submission.
    fn start_sends(&mut self) {
        for i in std::mem::take(&mut self.to_send) {
            let tag = self.tag(TAG_SEND, i);
            let sock = &mut self.socks[i as usize];
            sock.queued = false;
            if sock.sending
                || sock.out.is_empty()
                || !matches!(sock.phase, Phase::Open | Phase::Closing)
            {
                continue;
            }
            sock.sending = true;
            let chunks: Vec<Bytes> = sock.out.drain(..).collect();
            let fd = sock.fd;
            self.ring.send(fd, chunks, tag);
        }
    }

    /// The engine closed the connection (or refused it): write what is queued, then FIN,
    /// within the linger.
    fn start_closing(&mut self, i: u32) {
        let sock = &mut self.socks[i as usize];
        sock.phase = Phase::Closing;
        sock.rx = BytesMut::new();
        if let Some(recv) = sock.recv {
            // Nothing more is read: the engine would not take the bytes, and a peer that
            // keeps sending must meet a full socket, not a sink.
            self.ring.cancel(recv, TAG_CANCEL);
        }
        let sock = &mut self.socks[i as usize];
        sock.closing = Some(Box::new(Closing {
            until: Instant::now() + CLOSE_LINGER,
            fin: false,
        }));
        self.closing.push(i);
        self.queue_send(i);
        self.close_check = Some(Instant::now());
    }

    /// The peer went away (EOF, a failed receive or send): the engine forgets the
    /// connection if it still knew it, and the socket is shut down.
    fn peer_gone(&mut self, i: u32) {
        let sock = &self.socks[i as usize];
        if sock.phase == Phase::Open {
            let (conn, now) = (sock.conn, self.clock.now());
            self.shard.handle_closed(now, conn);
        }
        self.shut_down(i);
    }

    /// Shuts the socket down both ways: the kernel drops what is unsent and ends the
    /// receive; the descriptor closes once no operation on it is in flight.
    fn shut_down(&mut self, i: u32) {
        let sock = &mut self.socks[i as usize];
        if sock.phase == Phase::Gone || sock.phase == Phase::Free {
            self.maybe_release(i);
            return;
        }
        sock.phase = Phase::Gone;
        sock.closing = None;
        sock.out.clear();
        sock.rx = BytesMut::new();
        let fd = sock.fd;
        // SAFETY: shutdown(2) on a descriptor this socket owns; it stays open until
        // `maybe_release` closes it.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        if sock.recv.is_some() || sock.sending {
            // shutdown ends a receive with EOF; the cancel makes sure of it, and of a send
            // parked on a peer that stopped reading.
            self.ring.cancel_fd(fd, TAG_CANCEL);
        }
        self.maybe_release(i);
    }

    /// Closes a gone socket's descriptor and frees its slot once nothing is in flight.
    fn maybe_release(&mut self, i: u32) {
        let sock = &mut self.socks[i as usize];
        if sock.phase != Phase::Gone || sock.recv.is_some() || sock.sending {
            return;
        }
        // SAFETY: close(2) of the descriptor this socket owns, once: the phase goes to
        // Free right after, and no operation on it is in flight.
        unsafe { libc::close(sock.fd) };
        sock.phase = Phase::Free;
        sock.fd = -1;
        sock.out = VecDeque::new();
        sock.closing = None;
        self.free_socks.push(i);
        self.socks_open -= 1;
        self.check_room();
    }

    /// Closing sockets: FIN once flushed, then released once acknowledged or when the
    /// linger runs out.
    fn check_closing(&mut self, now: Instant) {
        let mut next: Option<Instant> = None;
        let mut keep = Vec::new();
        for i in std::mem::take(&mut self.closing) {
            let sock = &mut self.socks[i as usize];
            if sock.phase != Phase::Closing {
                continue;
            }
            let closing = sock
                .closing
                .as_mut()
                .expect("a closing socket has its state");
            let until = closing.until;
            if now >= until {
                self.shut_down(i);
                continue;
            }
            if !closing.fin && !sock.sending && sock.out.is_empty() {
                // Its last frame is in the kernel, not yet at the peer. Closing with
                // unread input would reset the connection and drop what the peer has not
                // acknowledged; so FIN after the data, and wait for the acknowledgement.
                closing.fin = true;
                // SAFETY: shutdown(2) on a descriptor this socket owns.
                unsafe { libc::shutdown(sock.fd, libc::SHUT_WR) };
            }
            if closing.fin && unacknowledged(sock.fd) == 0 {
                self.shut_down(i);
                continue;
            }
            let poll = if closing.fin { now + ACK_POLL } else { until };
            next = Some(next.map_or(poll, |n| n.min(poll)));
            keep.push(i);
        }
        self.closing = keep;
        self.close_check = next;
    }

    // ---------------------------------------------------------------------------------
    // Accepting
    // ---------------------------------------------------------------------------------

    fn arm_accept(&mut self) {
        if self.accepting.is_some() || self.accept_paused_until.is_some() {
            return;
        }
        if !matches!(self.stage, Stage::Serving) {
            return;
        }
        let Some(listener) = &self.listener else {
            return;
        };
        if !self.has_room() {
            return;
        }
        let fd = listener.as_raw_fd();
        self.accepting = Some(self.ring.accept_multi(fd, TAG_ACCEPT));
    }

    /// Whether a new socket may be accepted. Closing sockets count against
    /// `connections_max` (so that a stream of connections closed as slow consumers cannot
    /// hold more descriptors than allowed); while only they fill it, new clients wait in
    /// the listen backlog, which holds no descriptor of ours. When the engine itself is at
    /// the limit, accepting goes on: the engine refuses newcomers with
    /// `TooManyConnections`.
    fn has_room(&self) -> bool {
        let known = self.shard.stats().connections;
        self.socks_open < self.connections_max || self.socks_open as u64 <= known
    }

    /// Pauses the multishot accept when there is no room, and arms it again when there is.
    fn check_room(&mut self) {
        if let Some(op) = self.accepting.filter(|_| !self.has_room()) {
            // Cancelled; its last completion clears `accepting`, and a socket's release
            // arms it again.
            if !self.accept_cancelled {
                self.accept_cancelled = true;
                self.ring.cancel(op, TAG_CANCEL);
            }
        } else if self.accepting.is_none() {
            self.arm_accept();
        }
    }

    // ---------------------------------------------------------------------------------
    // Timers and stages
    // ---------------------------------------------------------------------------------

    fn fire_timers(&mut self, now: Instant) -> Result<()> {
        let engine_now = self.clock.now();
        if self.shard.poll_timeout().is_some_and(|t| t <= engine_now) {
            self.shard.handle_timeout(engine_now);
        }
        if self.close_check.is_some_and(|t| t <= now) {
            self.check_closing(now);
        }
        if self.accept_paused_until.is_some_and(|t| t <= now) {
            self.accept_paused_until = None;
            self.arm_accept();
        }
        if self.mesh_retry.is_some_and(|t| t <= now) {
            self.mesh_retry = None;
        }
        if now >= self.next_tick {
            self.next_tick = now + TICK;
            self.keys.apply(&mut self.shard, engine_now, self.index);
            if self.log.takes_appends() {
                self.log.engine.handle_timeout(engine_now);
                self.drain_log_events();
            }
            let m = self.metrics.shard(self.index);
            m.publish(self.shard.stats());
            // The proof of life /healthz checks: a shard that stops turning goes silent.
            m.record_turn();
            #[cfg(feature = "fault-injection")]
            crate::fault::on_turn(self.index)?;
        }
        Ok(())
    }

    /// Moves the shard through drain and log close; `true` once it is done.
    fn advance_stage(&mut self, now: Instant) -> Result<bool> {
        match self.stage {
            Stage::Serving => {
                if self.stop.load(Ordering::SeqCst) {
                    let engine_now = self.clock.now();
                    self.shard.handle_drain(engine_now);
                    self.stage = Stage::Draining { since: now };
                    self.stop_accepting();
                }
                Ok(false)
            }
            Stage::Draining { since } => {
                let settled = (self.log.engine.is_idle() || self.log.stopped.is_some())
                    && self.socks_open == 0;
                if settled || since.elapsed() > self.config.shutdown_timeout {
                    // Close the log: what is appended becomes durable, and the open
                    // segment is cut to its last record so the next start finds no
                    // padding.
                    if self.log.engine.is_running() && !self.log.closing {
                        self.log.closing = true;
                        let engine_now = self.clock.now();
                        self.log.engine.close(engine_now);
                        self.drain_log_events();
                    }
                    self.stage = Stage::ClosingLog;
                }
                Ok(false)
            }
            Stage::ClosingLog => Ok(self.log.closed || self.log.stopped.is_some()),
        }
    }

    fn stop_accepting(&mut self) {
        if let Some(op) = self.accepting.filter(|_| !self.accept_cancelled) {
            self.accept_cancelled = true;
            self.ring.cancel(op, TAG_CANCEL);
        }
    }

    fn finish(&mut self) -> Result<()> {
        // Peers fall back to the eventfd from now on; the ring's descriptor closes with it.
        self.mesh.rings[self.index].store(-1, Ordering::Release);
        if self.log.closed {
            assert_eq!(
                self.log.files.in_flight(),
                0,
                "a closed log has nothing in flight"
            );
        }
        self.metrics.shard(self.index).publish(self.shard.stats());
        if let Some(error) = self.log.stopped.take() {
            return Err(anyhow::Error::new(error))
                .with_context(|| format!("the log of shard {} stopped", self.index));
        }
        tracing::info!(shard = self.index, "drained");
        Ok(())
    }

    // ---------------------------------------------------------------------------------
    // Engines
    // ---------------------------------------------------------------------------------

    /// Carries out everything the engines produced: the shard's effects (appends, fetches
    /// and loads into the log engine, the log's events back into the shard after each of
    /// those calls), then transmits, then the log's new operations onto the ring.
    fn pump(&mut self) {
        loop {
            self.drain_log_events();
            let mut any = false;
            while let Some(effect) = self.shard.poll_effect() {
                any = true;
                self.on_effect(effect);
            }
            while let Some(t) = self.shard.poll_transmit() {
                any = true;
                let Some(i) = self.conn_sock(t.conn) else {
                    continue;
                };
                self.socks[i as usize].out.extend(t.chunks);
                if t.close {
                    if let Some(ci) = self.by_conn.get_mut(t.conn.index as usize) {
                        *ci = u32::MAX;
                    }
                    self.start_closing(i);
                } else {
                    self.queue_send(i);
                }
            }
            while let Some(io) = self.log.engine.poll_io() {
                any = true;
                if matches!(io.op, Op::Sync(FileId::Segment(_))) {
                    self.log.syncs.push((io.id, Instant::now()));
                }
                self.log.files.start(&mut self.ring, io);
            }
            if !any {
                return;
            }
        }
    }

    fn on_effect(&mut self, effect: Effect) {
        match effect {
            Effect::Append { lsn, bytes } => {
                if !self.log.takes_appends() {
                    // Once the log is closing or stopped an append is dropped: nothing is
                    // acked for it, and its sender resends on reconnect.
                    tracing::debug!(
                        shard = self.index,
                        ?lsn,
                        "an append after the log ended is dropped"
                    );
                    return;
                }
                self.log.appended.push_back((lsn, Instant::now()));
                let now = self.clock.now();
                self.log.engine.append(now, lsn, bytes);
                self.drain_log_events();
            }
            Effect::ToShard { to, msg } => self.mesh_out[to.0 as usize].push(msg),
            Effect::CommandDone { token, result } => self.admin_replies.push_back((token, result)),
            // Offline push is not turned on yet (no hook is wired).
            Effect::Offline { .. } => {}
            Effect::Fetch {
                fetch,
                conv,
                from,
                to,
                limit,
            } => {
                if self.log.engine.is_running() {
                    let now = self.clock.now();
                    self.log.engine.fetch(now, fetch, conv, from, to, limit);
                    self.drain_log_events();
                } else {
                    // Stopped or closed: nothing more is read. The shard is draining.
                    tracing::debug!(shard = self.index, %conv, "a fetch after the log ended");
                }
            }
            Effect::Load { conv } => {
                if self.log.engine.is_running() {
                    let now = self.clock.now();
                    self.log.engine.load(now, conv);
                    self.drain_log_events();
                } else {
                    tracing::debug!(shard = self.index, %conv, "a load after the log ended");
                }
            }
        }
    }

    /// Hands every event of the log engine's last call to the shard. Called after every
    /// call into the log engine, before the next one (its driver contract).
    fn drain_log_events(&mut self) {
        while let Some(event) = self.log.engine.poll_event() {
            self.on_log_event(event);
        }
    }

    fn on_log_event(&mut self, event: LogEvent) {
        let now = self.clock.now();
        match event {
            LogEvent::Durable(lsn) => {
                let m = self.metrics.shard(self.index);
                while let Some(&(appended, at)) = self.log.appended.front() {
                    if appended > lsn {
                        break;
                    }
                    self.log.appended.pop_front();
                    m.record_ack_latency(at.elapsed(), 1);
                }
                self.shard.handle_durable(now, lsn);
            }
            LogEvent::Failed => {
                tracing::error!(
                    shard = self.index,
                    "log append failed; failing the sends not yet durable"
                );
                self.metrics.shard(self.index).log_failed();
                self.log.appended.clear();
                self.shard.handle_log_failed(now);
            }
            LogEvent::Fetched { fetch, result } => {
                if result.is_err() {
                    // The shard fails the request (StorageFailed) or asks again later; it
                    // never takes a failed read as history gone.
                    tracing::error!(
                        shard = self.index,
                        fetch,
                        "reading history from the log failed"
                    );
                }
                self.shard.handle_fetched(now, fetch, result);
            }
            LogEvent::Loaded { conv, result } => {
                if result.is_err() {
                    tracing::error!(shard = self.index, %conv, "loading a conversation's head from the log failed");
                }
                self.shard.handle_loaded(now, conv, result);
            }
            LogEvent::CheckpointDue => {
                // A checkpoint appended while closing would be dropped: the next start
                // replays a little more instead.
                if self.log.takes_appends() {
                    self.shard.handle_checkpoint_due(now);
                }
            }
            LogEvent::Stopped(error) => {
                tracing::error!(shard = self.index, %error, "the log stopped; stopping the gateway");
                self.log.stopped = Some(error);
                self.stop.store(true, Ordering::SeqCst);
            }
            LogEvent::Closed => self.log.closed = true,
            LogEvent::Recovered(_) => unreachable!("the log recovers once, before the shard runs"),
        }
    }

    // ---------------------------------------------------------------------------------
    // Other threads
    // ---------------------------------------------------------------------------------

    /// Takes every batch the peers queued (FIFO per pair) and the admin's commands.
    fn take_inbound(&mut self) {
        let now = self.clock.now();
        for peer in 0..self.mesh.inbound.len() {
            let Some(queue) = self.mesh.inbound[peer].as_mut() else {
                continue;
            };
            while let Some(batch) = queue.pop() {
                for msg in batch {
                    self.shard.handle_shard_msg(now, msg);
                }
            }
        }
        if let Some(admin) = self.admin.as_mut() {
            while let Some((token, command)) = admin.requests.pop() {
                self.shard.handle_command(now, command, token);
            }
        }
    }

    /// Puts each peer's messages of this turn into its queue as one batch, and wakes the
    /// peer if it sleeps. A full queue is retried shortly (the peer drains it each turn);
    /// the messages wait here meanwhile, in order.
    fn flush_mesh(&mut self, now: Instant) {
        for peer in 0..self.mesh_out.len() {
            if self.mesh_out[peer].is_empty() {
                continue;
            }
            let Some(queue) = self.mesh.outbound[peer].as_mut() else {
                unreachable!("a shard sends itself no mesh message");
            };
            let batch = std::mem::take(&mut self.mesh_out[peer]);
            if let Err(batch) = queue.push(batch) {
                self.mesh_out[peer] = batch;
                self.mesh_retry = Some(now + MESH_RETRY);
            }
            self.wake_peer(peer);
        }
    }

    /// Wakes `peer` if it announced it is about to sleep: by a completion posted on its
    /// ring at this turn's submit, or through its eventfd if its ring is not there.
    fn wake_peer(&mut self, peer: usize) {
        let wake = &self.mesh.wakes[peer];
        if !wake.claim() {
            return;
        }
        match self.mesh.rings[peer].load(Ordering::Acquire) {
            fd if fd >= 0 => self.ring.post_wake(fd),
            _ => wake.signal().signal(),
        }
    }

    fn flush_admin(&mut self) {
        let Some(admin) = self.admin.as_mut() else {
            self.admin_replies.clear();
            return;
        };
        let mut sent = false;
        while let Some(reply) = self.admin_replies.pop_front() {
            match admin.replies.push(reply) {
                Ok(()) => sent = true,
                Err(reply) => {
                    self.admin_replies.push_front(reply);
                    self.mesh_retry = Some(Instant::now() + MESH_RETRY);
                    break;
                }
            }
        }
        if sent {
            admin.wake.notify_one();
        }
    }
}

/// Drops `n` written bytes from the front of `chunks`.
fn advance(chunks: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let Some(front) = chunks.front_mut() else {
            return;
        };
        if n >= front.len() {
            n -= front.len();
            chunks.pop_front();
        } else {
            bytes::Buf::advance(front, n);
            n = 0;
        }
    }
    while chunks.front().is_some_and(|c| c.is_empty()) {
        chunks.pop_front();
    }
}

/// Bytes written to `fd` that the peer has not acknowledged (0 if the socket cannot say).
fn unacknowledged(fd: RawFd) -> i32 {
    let mut unacked: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ's value on a socket, see tcp(7)) writes one int through
    // the pointer; `fd` is open.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut unacked) };
    if r < 0 {
        0
    } else {
        unacked
    }
}

fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one int from the pointer; `fd` is a socket we own.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// The wall clock in milliseconds since the Unix epoch (0 if it is before it).
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_record_stays_compact() {
        // fd, generation, phase and flags (12), the engine's id (8), the armed receive (8),
        // the incomplete frame (32), the queue of chunks (32), and a pointer to what only
        // closing sockets need (8): 100, padded to 104. The kernel's own socket is ~4 KB.
        assert!(
            std::mem::size_of::<Sock>() <= 104,
            "Sock grew to {} bytes",
            std::mem::size_of::<Sock>()
        );
    }

    #[test]
    fn advance_drops_whole_and_partial_chunks() {
        let mut chunks: VecDeque<Bytes> = vec![
            Bytes::from_static(b"abc"),
            Bytes::from_static(b"de"),
            Bytes::from_static(b"fgh"),
        ]
        .into();
        advance(&mut chunks, 4);
        assert_eq!(
            chunks,
            vec![Bytes::from_static(b"e"), Bytes::from_static(b"fgh")]
        );
        advance(&mut chunks, 4);
        assert!(chunks.is_empty());
    }
}
