//! A worker process: one single-threaded tokio runtime driving its share of the connections,
//! each a task running core's client engine over a real socket.
//!
//! The parent writes the [`WorkerSpec`] as the first line of stdin, then `go` (start the
//! load) and `stop` (stop it, settle, report). The worker writes a [`WorkerLine::Progress`]
//! line a second and one [`WorkerLine::Report`] at the end, on stdout.
//!
//! Sends are open loop, as in wrk2: each sending connection has a schedule of intended send
//! times at its rate, and a message's latency is measured from its intended time, not from
//! when the (possibly late) loop got to it. So a stalled gateway shows as latency instead of
//! as fewer samples (coordinated omission).
//!
//! Every payload starts with [`PAYLOAD_HEADER`] bytes: the intended send time (ns since
//! this worker's epoch), the sender's connection index and the sender's message number.
//! A conversation's members all live in one worker, so the receiver reads the send time
//! on the same clock, and the [`Ledger`] sees both ends.
//!
//! In the `Convs` scenario a connection has no one conversation: each slot of its schedule
//! writes to the next brand-new direct conversation of its share (see [`ConvsSpec`]), a
//! Send Nacked `RateLimited` is written again later, and after the load each connection
//! reads a sample of its conversations back with Pull (phase `Verifying`). Its client
//! engine is rebuilt, unacked messages restored, after each disconnect, so a reconnect
//! never Syncs the cursors of thousands of conversations.

use crate::ledger::{Ledger, Seen};
use crate::spec::{ConvsSpec, Counters, Report, Scenario, Unit, WorkerLine, WorkerSpec};
use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use hdrhistogram::serialization::{Serializer, V2Serializer};
use hdrhistogram::Histogram;
use imgate_core::auth::{SigningKey, TokenSigner};
use imgate_core::client::{
    Client, ClientConfig, ClientError, ClientEvent, Priority, RequestFailure, SendFailure,
};
use imgate_core::proto::{ClientMsgId, ConvId, DeviceId, ErrorCode, Seq, UserId};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

/// Bytes at the front of every payload: intended send time (u64 ns), sender (u32), number
/// (u32), little-endian.
pub const PAYLOAD_HEADER: usize = 16;

/// Largest latency the histograms hold: 60 s, in microseconds. Larger samples are clamped.
const LATENCY_MAX_US: u64 = 60_000_000;

/// Bytes read from a socket at once, into the worker's one scratch buffer.
const READ_CHUNK: usize = 64 * 1024;

/// Bound on the sends one wake-up catches up on; a loop stalled longer than that many
/// intervals drops the rest of its backlog (counted as `send backlog dropped`).
const CATCH_UP_MAX: u32 = 1000;

/// Reconnect backoff after an error: first and largest wait.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// How long a TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the drain checks whether everything settled.
const SETTLE_POLL: Duration = Duration::from_millis(50);

/// How long a conversation refused `RateLimited` (or not taken by a full outbox) waits
/// before it is written again, at least (`Convs`); a random fraction of it is added.
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// Progress lines a second in the `Convs` scenario, so the parent reads the number of
/// conversations written (and samples the gateway) at a finer step than once a second.
const CONVS_PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Least time the read-back of the `Convs` scenario may take before what is left of it
/// is counted unfinished.
const VERIFY_MIN: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Connecting,
    Running,
    Draining,
    /// `Convs` only: read a sample of the conversations back.
    Verifying,
    Done,
}

/// Everything the connection tasks share (one thread, so `RefCell`).
struct State {
    counters: Counters,
    errors: BTreeMap<String, u64>,
    ledger: Ledger,
    /// Send-to-ack latency of the messages sent in the load window (`in_window`), so
    /// that its count is the window's `sent` once all are acked.
    ack_hist: Histogram<u64>,
    deliver_hist: Histogram<u64>,
    /// Between `go` and `stop`, as the window's counters see it: set in the same step
    /// that takes `at_go`, cleared in the one that takes `at_stop`. A connection task
    /// may still act on the phase it read before (a send after `stop`), so this, not
    /// the phase, says whether a send is in the window.
    in_window: bool,
    /// Sum of every client's outbox: messages not yet acked or finally refused (with, in
    /// `Convs`, conversations waiting to be written again).
    outboxes: usize,
    /// `Convs` read-back: connections that planned theirs, and reads not yet concluded.
    verify_planned: u64,
    verify_open: u64,
    /// Receptions owed for acked messages (an acked message owes one per other member)...
    owed: u64,
    /// ...and receptions made (first showings only).
    made: u64,
}

impl State {
    fn error(&mut self, kind: impl Into<String>, n: u64) {
        *self.errors.entry(kind.into()).or_default() += n;
        self.counters.errors += n;
    }
}

struct Shared {
    spec: WorkerSpec,
    epoch: Instant,
    /// Unix ms at `epoch`: the client engines' clock.
    epoch_unix_ms: u64,
    signer: TokenSigner,
    state: RefCell<State>,
}

impl Shared {
    fn core_now(&self) -> imgate_core::Instant {
        imgate_core::Instant::from_millis(
            self.epoch_unix_ms + self.epoch.elapsed().as_millis() as u64,
        )
    }

    fn instant_of(&self, t: imgate_core::Instant) -> Instant {
        self.epoch + Duration::from_millis(t.as_millis().saturating_sub(self.epoch_unix_ms))
    }

    fn nanos_since_epoch(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }
}

/// Runs a worker: reads its spec from stdin, applies the load, prints its report.
pub fn run() -> Result<()> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the worker spec from stdin")?;
    let spec: WorkerSpec = serde_json::from_str(&line).context("parsing the worker spec")?;
    crate::sys::raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let report = local.block_on(&rt, drive(spec))?;
    emit(&WorkerLine::Report(Box::new(report)));
    Ok(())
}

fn emit(line: &WorkerLine) {
    let mut out = std::io::stdout().lock();
    // A parent that went away is not an error to report anywhere else.
    let _ = serde_json::to_writer(&mut out, line);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

async fn drive(spec: WorkerSpec) -> Result<Report> {
    let signer = TokenSigner::new(&SigningKey::Hs256 {
        secret: spec.secret.clone(),
    })
    .map_err(|e| anyhow::anyhow!("the signing secret is unusable: {e}"))?;
    let hist = || Histogram::<u64>::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid bounds");
    let epoch_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let shared = Rc::new(Shared {
        epoch: Instant::now(),
        epoch_unix_ms,
        signer,
        state: RefCell::new(State {
            counters: Counters::default(),
            errors: BTreeMap::new(),
            ledger: Ledger::default(),
            ack_hist: hist(),
            deliver_hist: hist(),
            in_window: false,
            outboxes: 0,
            verify_planned: 0,
            verify_open: 0,
            owed: 0,
            made: 0,
        }),
        spec,
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Connecting);

    // Open the connections at the connect rate, in the background.
    let opener = {
        let shared = shared.clone();
        let phase_rx = phase_rx.clone();
        tokio::task::spawn_local(async move {
            let gap = Duration::from_secs_f64(1.0 / shared.spec.connect_rate.max(1.0));
            let mut next = Instant::now();
            for unit in &shared.spec.units {
                for &index in &unit.members {
                    sleep_until(next).await;
                    next += gap;
                    if *phase_rx.borrow() >= Phase::Draining {
                        return;
                    }
                    let conn = Conn::new(&shared, unit, index);
                    tokio::task::spawn_local(conn.run(shared.clone(), phase_rx.clone()));
                }
            }
        })
    };

    // Commands from the parent; progress to it.
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut tick = tokio::time::interval(if shared.spec.convs.is_some() {
        CONVS_PROGRESS_EVERY
    } else {
        Duration::from_secs(1)
    });
    // While connecting, a progress line also goes out the moment the last connection is
    // up, so the parent times the connect phase to the millisecond, not the second.
    let mut ready_check = tokio::time::interval(SETTLE_POLL);
    let mut told_ready = false;
    let connections = shared.spec.connections() as u64;
    let mut at_go = Counters::default();
    let mut go_time = None;
    let mut held_min = u64::MAX;
    let (at_stop, stop_time) = loop {
        tokio::select! {
            line = stdin.next_line() => {
                let cmd = line?.unwrap_or_else(|| "stop".into());
                let counters = shared.state.borrow().counters;
                match cmd.trim() {
                    "go" if go_time.is_none() => {
                        at_go = counters;
                        shared.state.borrow_mut().in_window = true;
                        go_time = Some(Instant::now());
                        phase_tx.send_replace(Phase::Running);
                    }
                    "stop" => {
                        shared.state.borrow_mut().in_window = false;
                        phase_tx.send_replace(Phase::Draining);
                        break (counters, Instant::now());
                    }
                    other => anyhow::bail!("unknown command from the parent: {other:?}"),
                }
            }
            _ = ready_check.tick(), if !told_ready => {
                let counters = shared.state.borrow().counters;
                if counters.authenticated == connections {
                    told_ready = true;
                    emit(&WorkerLine::Progress(counters));
                }
            }
            _ = tick.tick() => {
                let counters = shared.state.borrow().counters;
                if go_time.is_some() {
                    held_min = held_min.min(counters.authenticated);
                }
                emit(&WorkerLine::Progress(counters));
            }
        }
    };
    opener.abort();

    // Settle: every connection back up, every message acked (or finally refused) and
    // every owed reception made.
    let deadline = Instant::now() + Duration::from_secs(shared.spec.drain_secs);
    while Instant::now() < deadline {
        {
            let st = shared.state.borrow();
            if st.counters.authenticated == connections && st.outboxes == 0 && st.made >= st.owed {
                break;
            }
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }

    // Convs: read a sample of the conversations back.
    if shared
        .spec
        .convs
        .is_some_and(|c| c.verify_per_connection > 0)
    {
        // A pause first: the last writes again may have spent the connection's frame
        // budget at the gateway, and a Pull over it would be refused with a close.
        tokio::time::sleep(Duration::from_secs(1)).await;
        phase_tx.send_replace(Phase::Verifying);
        let wait = Duration::from_secs(shared.spec.drain_secs).max(VERIFY_MIN);
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            {
                let st = shared.state.borrow();
                if st.verify_planned == connections && st.verify_open == 0 {
                    break;
                }
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
        let mut st = shared.state.borrow_mut();
        let (open, unplanned) = (st.verify_open, connections - st.verify_planned);
        if open > 0 || unplanned > 0 {
            st.error(
                format!(
                    "read-back unfinished: {open} reads open, {unplanned} connections never read"
                ),
                open.max(1),
            );
        }
    }
    phase_tx.send_replace(Phase::Done);

    let st = shared.state.borrow();
    let expectations: Vec<(u32, &[u32])> = shared
        .spec
        .units
        .iter()
        .flat_map(|u| u.senders.iter().map(move |&s| (s, &u.members[..])))
        .collect();
    let verdict = st.ledger.verdict(expectations, st.outboxes as u64);
    let serialize = |h: &Histogram<u64>| -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        V2Serializer::new()
            .serialize(h, &mut buf)
            .map_err(|e| anyhow::anyhow!("serializing a histogram: {e:?}"))?;
        Ok(buf)
    };
    Ok(Report {
        totals: st.counters,
        at_go,
        at_stop,
        window_secs: go_time.map_or(0.0, |g| (stop_time - g).as_secs_f64()),
        held_min: if held_min == u64::MAX {
            st.counters.authenticated
        } else {
            held_min
        },
        errors: st.errors.clone(),
        verdict,
        ack_hist: serialize(&st.ack_hist)?,
        deliver_hist: serialize(&st.deliver_hist)?,
    })
}

/// Why a session ended.
enum End {
    /// The socket failed or the gateway closed it.
    Broken,
    /// A drop the scenario asked for: reconnect at once.
    Planned,
    /// The run is over.
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

/// One connection: its client engine and its place in the load.
struct Conn {
    index: u32,
    conv: Option<ConvId>,
    /// Other members' connections in this worker (receivers of this one's messages).
    peers: u32,
    source: Ipv4Addr,
    client: Client,
    /// Client engines built before this one (`Convs` rebuilds it after a disconnect).
    rebuilds: u64,
    /// Messages awaiting their Ack.
    pending: HashMap<ClientMsgId, Sent>,
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
    rng: u64,
}

impl Conn {
    fn new(shared: &Shared, unit: &Unit, index: u32) -> Conn {
        let spec = &shared.spec;
        let user = UserId(spec.user_base + u64::from(index));
        let token = shared.signer.mint(
            user,
            DeviceId(1),
            shared.core_now() + Duration::from_secs(spec.token_ttl_secs),
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
            index,
            conv: unit.conv,
            peers: unit.members.len().saturating_sub(1) as u32,
            source: spec.sources[index as usize % spec.sources.len()],
            client: Client::new(config, BTreeMap::new()),
            rebuilds: 0,
            pending: HashMap::new(),
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

    async fn run(mut self, shared: Rc<Shared>, mut phase: watch::Receiver<Phase>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            if *phase.borrow() == Phase::Done {
                break;
            }
            let end = match self.connect(&shared).await {
                Ok(mut stream) => {
                    self.client.handle_connected(shared.core_now());
                    let end = self.session(&mut stream, &shared, &mut phase).await;
                    if matches!(end, End::Planned) {
                        // An abrupt drop, as a phone losing its network: RST, no TIME_WAIT.
                        // tokio deprecates SO_LINGER because a non-zero linger blocks the
                        // thread on drop; a zero linger never does.
                        #[allow(deprecated)]
                        let _ = stream.set_linger(Some(Duration::ZERO));
                    }
                    end
                }
                Err(e) => {
                    shared.state.borrow_mut().error(format!("connect: {e}"), 1);
                    End::Broken
                }
            };
            self.client.handle_disconnected(shared.core_now());
            if self.authenticated {
                self.authenticated = false;
                shared.state.borrow_mut().counters.authenticated -= 1;
            }
            let _ = self.process_events(&shared);
            if self.convs.is_some() && !matches!(end, End::Finished) {
                self.rebuild_client(&shared);
            }
            match end {
                End::Finished => break,
                End::Planned => backoff = BACKOFF_MIN,
                End::Broken => {
                    let wait = backoff + self.jitter(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = phase.wait_for(|p| *p == Phase::Done) => break,
                    }
                }
            }
        }
    }

    async fn connect(&self, shared: &Shared) -> std::io::Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(self.source.into(), 0))?;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(shared.spec.gateway))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    async fn session(
        &mut self,
        stream: &mut TcpStream,
        shared: &Shared,
        phase: &mut watch::Receiver<Phase>,
    ) -> End {
        let mut rbuf = BytesMut::new();
        let mut out = BytesMut::new();
        loop {
            if *phase.borrow() == Phase::Verifying {
                self.verify_step(shared);
            }
            // Write what the engine queued, then act on its events.
            while let Some(b) = self.client.poll_transmit() {
                out.extend_from_slice(&b);
            }
            if !out.is_empty() {
                if let Err(e) = stream.write_all(&out).await {
                    shared
                        .state
                        .borrow_mut()
                        .error(format!("write: {}", e.kind()), 1);
                    return End::Broken;
                }
                out.clear();
            }
            if let Some(end) = self.process_events(shared) {
                // Flush what the engine queued last (an Error frame), best effort.
                while let Some(b) = self.client.poll_transmit() {
                    let _ = stream.write_all(&b).await;
                }
                return end;
            }

            let now_phase = *phase.borrow();
            if now_phase == Phase::Done {
                return End::Finished;
            }
            self.arm_schedules(now_phase);
            let engine_timer = self.client.poll_timeout().map(|t| shared.instant_of(t));
            let wake = [engine_timer, self.next_send, self.next_drop]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));

            tokio::select! {
                r = stream.readable() => {
                    if let Err(e) = r {
                        shared.state.borrow_mut().error(format!("read: {}", e.kind()), 1);
                        return End::Broken;
                    }
                    match read_available(stream, &mut rbuf) {
                        Ok(true) => self.client.handle_bytes(shared.core_now(), &mut rbuf),
                        Ok(false) => {
                            if now_phase < Phase::Done {
                                shared.state.borrow_mut().error("closed by the gateway without a frame", 1);
                            }
                            return End::Broken;
                        }
                        Err(e) => {
                            shared.state.borrow_mut().error(format!("read: {}", e.kind()), 1);
                            return End::Broken;
                        }
                    }
                }
                _ = sleep_until(wake) => {
                    let now = Instant::now();
                    if engine_timer.is_some_and(|t| t <= now) {
                        self.client.handle_timeout(shared.core_now());
                    }
                    if self.next_send.is_some_and(|t| t <= now) {
                        self.send_due(shared, now, now_phase);
                    }
                    if self.next_drop.is_some_and(|t| t <= now) {
                        self.next_drop = self.next_drop.zip(self.drop_every).map(|(t, d)| (t + d).max(now));
                        // A connection still logging in skips this drop; its timer moved on
                        // either way, so the loop never spins on a past deadline.
                        if self.authenticated {
                            shared.state.borrow_mut().counters.drops += 1;
                            return End::Planned;
                        }
                    }
                }
                _ = phase.changed() => {}
            }
        }
    }

    /// Starts the send and drop schedules when the load starts; stops them after (a
    /// `Convs` connection keeps sending while it has conversations to write again).
    fn arm_schedules(&mut self, phase: Phase) {
        let now = Instant::now();
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
    fn next_conv(&mut self, now: Instant, phase: Phase) -> Option<ConvId> {
        let Some(c) = self.convs else {
            return self.conv;
        };
        if self.again.front().is_some_and(|&(t, _)| t <= now) {
            return self.again.pop_front().map(|(_, conv)| conv);
        }
        if phase == Phase::Running && self.next_j < c.share(self.index) {
            let k = c.k(self.index, self.next_j);
            self.next_j += 1;
            return Some(ConvId::direct(self.user, UserId(c.peer_base + k)));
        }
        None
    }

    /// Sends every message whose intended time has come.
    fn send_due(&mut self, shared: &Shared, now: Instant, phase: Phase) {
        let Some(every) = self.send_every else {
            return;
        };
        let mut sent = 0;
        while let Some(at) = self.next_send.filter(|&t| t <= now) {
            if sent == CATCH_UP_MAX {
                let behind = (now - at).as_secs_f64() / every.as_secs_f64();
                shared
                    .state
                    .borrow_mut()
                    .error("send backlog dropped", behind as u64);
                self.next_send = Some(now + every);
                break;
            }
            let Some(conv) = self.next_conv(now, phase) else {
                // Nothing due: wait for the next conversation to write again, if any
                // (`arm_schedules` starts the schedule again when there is new work).
                self.next_send = self.again.front().map(|&(t, _)| t.max(at + every));
                break;
            };
            self.next_send = Some(at + every);
            sent += 1;
            let intended = shared.nanos_since_epoch(at);
            let number = self.next_number;
            let mut payload = BytesMut::from(&self.payload[..]);
            payload[0..8].copy_from_slice(&intended.to_le_bytes());
            payload[8..12].copy_from_slice(&self.index.to_le_bytes());
            payload[12..16].copy_from_slice(&number.to_le_bytes());
            let payload = payload.freeze();
            match self
                .client
                .send(shared.core_now(), conv, payload.clone(), Priority::Normal)
            {
                Ok(id) => {
                    self.next_number += 1;
                    let mut st = shared.state.borrow_mut();
                    let sent = Sent {
                        intended,
                        number,
                        in_window: st.in_window,
                        conv,
                        payload,
                    };
                    self.pending.insert(id, sent);
                    st.counters.sent += 1;
                }
                Err(ClientError::OutboxFull { .. }) if self.convs.is_some() => {
                    // Backpressure from a slow gateway: this conversation waits its turn.
                    let wait = RETRY_AFTER + self.jitter(RETRY_AFTER);
                    self.again.push_back((now + wait, conv));
                }
                Err(e) => shared.state.borrow_mut().error(format!("send: {e}"), 1),
            }
        }
    }

    /// After a disconnect (`Convs`): a new client engine, with no cursors, holding the
    /// unacked messages under their own ids (so a message that became durable before the
    /// disconnect is answered by dedupe, not stored twice). The old engine's cursors, one
    /// per conversation written, would make the reconnect's Sync longer than the gateway
    /// takes.
    fn rebuild_client(&mut self, shared: &Shared) {
        self.rebuilds += 1;
        let mut config = self.client.config().clone();
        // A new seed: the new engine must not draw the ids the old one drew.
        config.seed = config
            .seed
            .wrapping_add(self.rebuilds.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut client = Client::new(config, BTreeMap::new());
        let mut unacked: Vec<(&ClientMsgId, &Sent)> = self.pending.iter().collect();
        unacked.sort_by_key(|(_, p)| p.number);
        let mut st = shared.state.borrow_mut();
        for (id, p) in unacked {
            if let Err(e) = client.restore_unacked(*id, p.conv, p.payload.clone(), Priority::Normal)
            {
                st.error(format!("restoring an unacked message: {e}"), 1);
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
    fn verify_step(&mut self, shared: &Shared) {
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
            let mut st = shared.state.borrow_mut();
            st.verify_planned += 1;
            st.verify_open += v;
        }
        while let Some(&conv) = self.verify_queue.front() {
            // Not ready or at the engine's bound of Pulls: the rest go on a later turn.
            let Ok(req) = self.client.pull(shared.core_now(), conv, Seq(1), 1) else {
                break;
            };
            self.verify_queue.pop_front();
            self.verify_pending.insert(req, conv);
        }
    }

    /// Handles the engine's events; says if the session must end.
    fn process_events(&mut self, shared: &Shared) -> Option<End> {
        let mut end = None;
        let mut st = shared.state.borrow_mut();
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
                    if let Some(sent) = self.pending.remove(&client_msg_id) {
                        if sent.in_window {
                            let lat = shared
                                .nanos_since_epoch(Instant::now())
                                .saturating_sub(sent.intended);
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
                    if self.pending.remove(&client_msg_id).is_some() {
                        st.counters.rate_limited += 1;
                        let wait = RETRY_AFTER + self.jitter(RETRY_AFTER);
                        self.again.push_back((Instant::now() + wait, conv));
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
                        self.client.retry(shared.core_now(), client_msg_id);
                    } else {
                        self.pending.remove(&client_msg_id);
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
                        self.client.retry(shared.core_now(), client_msg_id);
                    }
                }
                // Convs: nobody else writes to these conversations, so this is one of this
                // connection's own messages, replayed by a read-back Pull.
                ClientEvent::Message { .. } if self.convs.is_some() => {}
                ClientEvent::Message { payload, .. } => {
                    if payload.len() < PAYLOAD_HEADER {
                        st.error("message without a loadgen header", 1);
                        continue;
                    }
                    let intended = u64::from_le_bytes(payload[0..8].try_into().unwrap());
                    let sender = u32::from_le_bytes(payload[8..12].try_into().unwrap());
                    let number = u32::from_le_bytes(payload[12..16].try_into().unwrap());
                    let lat = shared
                        .nanos_since_epoch(Instant::now())
                        .saturating_sub(intended);
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
                | ClientEvent::Signal { .. } => {}
            }
        }
        let outbox = self.client.outbox_len() + self.again.len();
        st.outboxes = st.outboxes + outbox - self.outbox_told;
        self.outbox_told = outbox;
        end
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_CHUNK]);
}

/// Reads what the socket holds into `rbuf` through the shared scratch buffer, so an idle
/// connection keeps no buffer of its own. `Ok(false)`: end of stream.
fn read_available(stream: &TcpStream, rbuf: &mut BytesMut) -> std::io::Result<bool> {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let mut any = false;
        loop {
            match stream.try_read(&mut s) {
                Ok(0) => return Ok(any),
                Ok(n) => {
                    rbuf.extend_from_slice(&s[..n]);
                    any = true;
                    if n < s.len() {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) => return Err(e),
            }
        }
    })
}
