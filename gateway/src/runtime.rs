//! The glommio driver of imgate-core: one pinned executor per shard, each owning its
//! listener (SO_REUSEPORT), its connections, its `Shard` engine, its log engine and the
//! log's files, and a channel mesh between shards. It moves bytes, time and log records;
//! every decision is an engine's (see the driver contracts at the top of
//! `imgate_core::shard` and `imgate_core::log_engine`).
//!
//! Per shard, these tasks share one `RefCell<State>` (never borrowed across an await):
//! - the acceptor;
//! - per connection, a reader (reads into a shard-wide scratch buffer, so an idle
//!   connection holds no read buffer) and a writer (parked while its queue is empty);
//! - per log operation, a task that performs it on the files ([`LogExecutor`]) and hands
//!   its completion to the log engine. The shard's appends, fetches and loads go to the
//!   log engine as the shard produces them; the log engine's events (durable, failed,
//!   fetched, loaded, checkpoint due) go to the shard after every call into it, before
//!   the next (`State::pump`). Group commit, pipelined syncs, rotation, the reset after a
//!   failure, reads and retention are the log engine's.
//! - one receiver and one sender task per peer shard (FIFO per pair, as the engine needs);
//! - the tick task: engine timers every 100 ms (the log's too, for retention by age),
//!   metrics, and the shutdown signal.

use crate::admin::{AdminContext, AdminToken, Control};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::notify::Notify;
use crate::storage::LogExecutor;
use anyhow::{bail, Context as _, Result};
use bytes::{Bytes, BytesMut};
use futures_lite::future::poll_fn;
use futures_lite::{AsyncRead, AsyncWrite, FutureExt as _};
use glommio::channels::channel_mesh::{MeshBuilder, Receivers, Senders};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use imgate_core::auth::TokenVerifier;
use imgate_core::log::ScanEnd;
use imgate_core::log_engine::{FileId, LogEngine, LogError, LogEvent, Op};
use imgate_core::mesh::{Command, CommandError, ConnId, ShardId, ShardMsg};
use imgate_core::shard::{Effect, Lsn, Shard, ShardConfig};
use imgate_core::Instant;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Batches in flight on one mesh channel (one ordered pair of shards) before the sender
/// task waits. A batch is everything queued for the peer since the last one, so 256
/// batches are many loop turns of the busiest shard.
const MESH_CHANNEL_SIZE: usize = 256;

/// What one mesh channel item carries: every message for one peer queued since the last
/// item, in order. One item per loop turn instead of one per message: each item can cost
/// a wake-up of the peer's executor.
type MeshBatch = Vec<ShardMsg>;
/// The shard-wide read scratch buffer. 64 KiB: one read takes what a busy socket has.
const READ_SCRATCH_BYTES: usize = 64 * 1024;
/// How often the engine's timers are driven. Its wheel has 100 ms ticks.
const TICK: Duration = Duration::from_millis(100);
/// Commands from the admin server waiting for a shard's answer.
const ADMIN_CHANNEL_SIZE: usize = 64;
/// File descriptors kept for logs, listeners and the admin server.
const RESERVED_FDS: u64 = 64;

/// The process-wide clock: wall time at start, advanced by a monotonic clock, so that
/// time never goes back while the gateway runs (see `imgate_core::time`).
#[derive(Clone, Copy)]
struct Clock {
    start_unix_ms: u64,
    start: std::time::Instant,
}

impl Clock {
    fn new() -> Clock {
        let start_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Clock {
            start_unix_ms,
            start: std::time::Instant::now(),
        }
    }

    fn now(&self) -> Instant {
        Instant::from_millis(self.start_unix_ms + self.start.elapsed().as_millis() as u64)
    }
}

/// How long a connection the engine has closed may take to write its last bytes (what was
/// queued and the final Error or GoAway) before its socket is shut down and closed anyway.
/// 2 s: a client that reads gets its last frame within a few round trips even on a slow
/// mobile link. A client that does not read (a slow consumer, the usual reason for such a
/// close) never lets the write finish; without this bound it would keep the descriptor,
/// the kernel's socket buffers and the queued backlog for as long as it likes.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// How often a closing connection that has written its last frame checks whether the
/// peer has acknowledged it. 10 ms: a fraction of a round trip on most links, and only
/// closing connections, for at most [`CLOSE_LINGER`], poll.
const ACK_POLL: Duration = Duration::from_millis(10);

/// One connection's socket and outbound queue.
///
/// Its life: open (the engine knows it) -> closing (the engine closed it and forgot it;
/// nothing more is read, the writer flushes for at most [`CLOSE_LINGER`]) -> closed (the
/// socket is shut down; the tasks end and the descriptor is closed when the last of them
/// drops this). A peer that goes away skips closing.
struct ConnIo {
    id: ConnId,
    stream: RefCell<TcpStream>,
    outq: RefCell<VecDeque<Bytes>>,
    wake_writer: Notify,
    /// Wakes a reader parked on a silent peer once the socket is shut down.
    wake_reader: Notify,
    /// Write what is queued, then close (the engine has dropped the connection).
    closing: Cell<bool>,
    /// When the last flush of a closing connection is cut short; set when the writer
    /// first sees `closing`.
    linger_until: Cell<Option<std::time::Instant>>,
    /// The socket is gone; both tasks stop.
    closed: Cell<bool>,
    /// The shard's count of open connection sockets; this one leaves it when dropped.
    sockets: Rc<Sockets>,
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        // The stream (and its descriptor) is dropped right after this, in this same call.
        self.sockets.release();
    }
}

/// The connection sockets one shard holds open: every `ConnIo` from accept until its
/// descriptor is closed. This is the driver's own count, next to the engine's
/// (`ShardStats::connections`): the engine forgets a connection the moment it closes it,
/// while the driver still holds the socket for up to [`CLOSE_LINGER`] to flush it. The
/// acceptor counts those closing sockets against `connections_max` too (see
/// `room_to_accept`), so that a stream of connections closed as slow consumers cannot hold
/// more descriptors than the limit allows.
#[derive(Default)]
struct Sockets {
    open: Cell<usize>,
    /// Wakes the acceptor when it waits for a closing socket to go.
    released: Notify,
}

impl Sockets {
    fn opened(&self) {
        self.open.set(self.open.get() + 1);
    }

    fn release(&self) {
        let open = self.open.get();
        assert!(open > 0, "a connection socket released twice");
        self.open.set(open - 1);
        self.released.notify();
    }
}

/// A command from the admin server and where to send its answer.
type AdminRequest = (u64, Command);
type AdminReply = (u64, Result<(), CommandError>);

/// One shard's log: the engine, the files it runs on, and what the driver keeps of it.
struct Log {
    engine: LogEngine,
    files: Rc<LogExecutor>,
    /// Appends handed to the engine and not yet durable, with when: for the send->ack
    /// histogram.
    appended: VecDeque<(Lsn, std::time::Instant)>,
    /// `close` was called: appends are refused from now on.
    closing: bool,
    /// The engine reported `Closed`.
    closed: bool,
    /// The engine stopped for good (`Stopped`): the shard drains and fails with this.
    stopped: Option<LogError>,
    /// Wakes the drain when the log closed or stopped.
    done: Rc<Notify>,
}

impl Log {
    /// Whether the engine takes appends (not stopped, not closing).
    fn takes_appends(&self) -> bool {
        self.engine.is_running() && !self.closing
    }
}

struct State {
    shard: Shard,
    log: Log,
    /// This state, for the log operations' tasks to come back to.
    me: Weak<RefCell<State>>,
    index: usize,
    metrics: Arc<Metrics>,
    /// The gateway's stop flag: a shard whose log stopped raises it.
    stop: Arc<AtomicBool>,
    clock: Clock,
    conns: Vec<Option<Rc<ConnIo>>>,
    mesh_out: Vec<VecDeque<ShardMsg>>,
    wake_mesh: Vec<Rc<Notify>>,
    admin_replies: VecDeque<AdminReply>,
    wake_admin: Rc<Notify>,
    scratch: Vec<u8>,
}

impl State {
    /// Carries out everything the engines produced: the shard's effects (appends, fetches
    /// and loads into the log engine, the log's events back into the shard after each of
    /// those calls), then transmits, then starts the log's new operations.
    fn pump(&mut self) {
        // Events of a call made before this pump (an operation's completion, the tick).
        self.drain_log_events();
        while let Some(effect) = self.shard.poll_effect() {
            match effect {
                Effect::Append { lsn, bytes } => self.append(lsn, bytes),
                Effect::ToShard { to, msg } => {
                    let to = to.0 as usize;
                    self.mesh_out[to].push_back(msg);
                    self.wake_mesh[to].notify();
                }
                Effect::CommandDone { token, result } => {
                    self.admin_replies.push_back((token, result));
                    self.wake_admin.notify();
                }
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
        while let Some(t) = self.shard.poll_transmit() {
            let Some(io) = self.conn(t.conn) else {
                continue;
            };
            io.outq.borrow_mut().extend(t.chunks);
            if t.close {
                io.closing.set(true);
            }
            io.wake_writer.notify();
        }
        self.start_log_ios();
    }

    /// Hands an append to the log engine, unless the log no longer takes any: once it is
    /// closing (the shard has drained) or stopped, an append is dropped; nothing is acked
    /// for it, and its sender resends on reconnect.
    fn append(&mut self, lsn: Lsn, bytes: Vec<u8>) {
        if !self.log.takes_appends() {
            tracing::debug!(
                shard = self.index,
                ?lsn,
                "an append after the log ended is dropped"
            );
            return;
        }
        self.log
            .appended
            .push_back((lsn, std::time::Instant::now()));
        let now = self.clock.now();
        self.log.engine.append(now, lsn, bytes);
        self.drain_log_events();
    }

    /// Hands every event of the log engine's last call to the shard. Called after every
    /// call into the log engine, before the next one (its driver contract): a `Failed`
    /// reaches the shard before any append the shard makes afterwards reaches the engine.
    /// What the shard produces meanwhile waits in its effects for `pump`.
    fn drain_log_events(&mut self) {
        while let Some(event) = self.log.engine.poll_event() {
            self.on_log_event(event);
        }
    }

    /// Hands one event of the log engine to the shard (or to the drain).
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
                    // The shard fails the request (StorageFailed) or asks again later;
                    // it never takes a failed read as history gone.
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
                    // The shard fails what waits for the conversation; the next touch
                    // retries.
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
                self.log.done.notify();
            }
            LogEvent::Closed => {
                self.log.closed = true;
                self.log.done.notify();
            }
            LogEvent::Recovered(_) => {
                unreachable!("the log recovers once, before the shard runs")
            }
        }
    }

    /// A time step for the log engine (retention by age).
    fn log_tick(&mut self) {
        if self.log.takes_appends() {
            let now = self.clock.now();
            self.log.engine.handle_timeout(now);
            self.drain_log_events();
        }
    }

    /// Starts closing the log: everything appended becomes durable and the open segment
    /// is cut to its last record; `Closed` follows.
    fn close_log(&mut self) {
        if self.log.engine.is_running() && !self.log.closing {
            self.log.closing = true;
            let now = self.clock.now();
            self.log.engine.close(now);
            self.drain_log_events();
        }
    }

    /// Starts a task for each operation the log engine issued.
    fn start_log_ios(&mut self) {
        while let Some(io) = self.log.engine.poll_io() {
            let state = self.me.clone();
            let files = self.log.files.clone();
            let metrics = self.metrics.clone();
            let index = self.index;
            glommio::spawn_local(async move {
                let started = std::time::Instant::now();
                let result = files.perform(&io.op).await;
                if result.is_ok() && matches!(io.op, Op::Sync(FileId::Segment(_))) {
                    // The group commit's fdatasync, from its start to its completion.
                    metrics.shard(index).record_fsync(started.elapsed());
                }
                let Some(state) = state.upgrade() else {
                    return;
                };
                let mut st = state.borrow_mut();
                let now = st.clock.now();
                st.log.engine.handle_completion(now, io.id, result);
                st.pump();
            })
            .detach();
        }
    }

    fn conn(&self, id: ConnId) -> Option<Rc<ConnIo>> {
        self.conns
            .get(id.index as usize)
            .and_then(|c| c.as_ref())
            .filter(|c| c.id == id)
            .cloned()
    }
}

type Shared = Rc<RefCell<State>>;

/// What each shard executor is handed.
struct ShardSetup {
    index: usize,
    count: usize,
    config: Config,
    verifier: TokenVerifier,
    metrics: Arc<Metrics>,
    mesh: MeshBuilder<MeshBatch, glommio::channels::channel_mesh::Full>,
    stop: Arc<AtomicBool>,
    admin: Option<(mpsc::Receiver<AdminRequest>, mpsc::Sender<AdminReply>)>,
    clock: Clock,
    /// Key sets reloaded on SIGHUP, for this shard to take.
    keys: KeyWatch,
}

/// Runs the gateway until SIGTERM, SIGINT or an admin drain; returns when every shard has
/// drained and synced its log.
pub fn run(config: Config) -> Result<()> {
    let capacity = raise_nofile_limit();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let count = if config.shards == 0 {
        cpus
    } else {
        config.shards
    };
    if count > usize::from(u16::MAX) {
        bail!("at most {} shards", u16::MAX);
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    // glommio opens directories by absolute path only ("Bad file descriptor" otherwise),
    // and the default data dir is relative.
    let mut config = config;
    config.data_dir = std::fs::canonicalize(&config.data_dir)
        .with_context(|| format!("resolving data dir {}", config.data_dir.display()))?;
    check_shard_count(&config, count)?;
    let verifier = config.verifier()?;
    let per_shard = (capacity / count as u64) as usize;
    config.limits.connections_max = config.limits.connections_max.min(per_shard.max(1));
    tracing::info!(
        shards = count,
        connections_per_shard = config.limits.connections_max,
        open_files = capacity + RESERVED_FDS,
        listen = %config.listen,
        admin = %config.admin,
        data_dir = %config.data_dir.display(),
        "starting imgate gateway"
    );

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handler")?;
    }
    let key_updates = Arc::new(KeyUpdates::default());
    let key_reloader = spawn_key_reloader(config.clone(), key_updates.clone())?;
    let io_memory = io_memory_per_executor(count);
    let metrics = Metrics::new(count);
    let clock = Clock::new();
    let mesh = MeshBuilder::full(count, MESH_CHANNEL_SIZE);
    // The bridge between the admin thread (tokio) and shard 0 (glommio): tokio's channels
    // need no runtime of their own, so each side awaits its end on its own executor.
    let (req_tx, req_rx) = mpsc::channel::<AdminRequest>(ADMIN_CHANNEL_SIZE);
    let (rep_tx, rep_rx) = mpsc::channel::<AdminReply>(ADMIN_CHANNEL_SIZE);
    let mut admin_ends = Some((req_rx, rep_tx));

    // Bind the admin port before the shards start, so that a bad address fails fast.
    let admin_addr = config.admin;
    let admin_token = config.admin_token().context("reading the admin token")?;
    let admin_listener = std::net::TcpListener::bind(admin_addr)
        .with_context(|| format!("binding the admin port {admin_addr}"))?;
    let admin_metrics = metrics.clone();
    let admin_stop = stop.clone();
    let admin = crate::admin::spawn(admin_listener, move || {
        let control = Rc::new(AdminControl::new(req_tx, admin_stop));
        tokio::task::spawn_local(control.clone().dispatch_replies(rep_rx));
        AdminContext {
            metrics: admin_metrics,
            control,
            token: AdminToken::new(&admin_token),
        }
    })
    .context("starting the admin thread")?;

    let mut handles = Vec::new();
    for index in 0..count {
        let setup = ShardSetup {
            index,
            count,
            config: config.clone(),
            verifier: verifier.clone(),
            metrics: metrics.clone(),
            mesh: mesh.clone(),
            stop: stop.clone(),
            admin: if index == 0 { admin_ends.take() } else { None },
            clock,
            keys: KeyWatch::new(key_updates.clone()),
        };
        let stop = stop.clone();
        let handle = LocalExecutorBuilder::new(Placement::Fixed(index % cpus))
            .name(&format!("imgate-shard-{index}"))
            .io_memory(io_memory)
            .spawn(move || async move {
                let result = shard_main(setup).await;
                if let Err(e) = &result {
                    // Not a zombie: the other shards stop too (GoAway, flush, sync), and
                    // the process exits non-zero for its supervisor to restart it.
                    tracing::error!(shard = index, error = %format!("{e:#}"), "shard failed; stopping the gateway");
                    stop.store(true, Ordering::SeqCst);
                }
                result
            })
            .map_err(|e| anyhow::anyhow!("starting shard {index}: {e}"))?;
        handles.push(handle);
    }
    let mut failed = None;
    for (i, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failed.get_or_insert(e);
            }
            Err(e) => {
                stop.store(true, Ordering::SeqCst);
                failed.get_or_insert(anyhow::anyhow!("shard {i} panicked: {e:?}"));
            }
        }
    }
    // The admin thread serves until the process exits; it holds nothing durable.
    drop(admin);
    key_reloader.stop();
    match failed {
        Some(e) => Err(e),
        None => {
            tracing::info!("gateway stopped cleanly");
            Ok(())
        }
    }
}

/// Verification key sets reloaded on SIGHUP, on their way from the reload thread to the
/// shards. The thread publishes each good set under the next generation; every shard
/// compares that generation with the one it applied last on each tick (one atomic load)
/// and takes a copy of the set when it moved on. A shard that misses several reloads
/// takes only the newest.
#[derive(Default)]
struct KeyUpdates {
    /// The generation of `latest`; it only grows. Read without the lock on every tick.
    generation: AtomicU64,
    /// The newest reloaded set and its generation; `None` until the first good reload.
    latest: Mutex<(u64, Option<TokenVerifier>)>,
}

impl KeyUpdates {
    fn publish(&self, verifier: TokenVerifier) {
        // No code panics while holding this lock (it only moves and clones a verifier),
        // so a poisoned lock still holds a consistent pair.
        let mut latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        let generation = latest.0 + 1;
        *latest = (generation, Some(verifier));
        self.generation.store(generation, Ordering::Release);
    }
}

/// One shard's side of [`KeyUpdates`]: the generation it applied last.
struct KeyWatch {
    updates: Arc<KeyUpdates>,
    applied: u64,
}

impl KeyWatch {
    fn new(updates: Arc<KeyUpdates>) -> KeyWatch {
        KeyWatch {
            updates,
            applied: 0,
        }
    }

    /// The newest reloaded key set, if one was published since the last call.
    fn take_new(&mut self) -> Option<TokenVerifier> {
        if self.updates.generation.load(Ordering::Acquire) == self.applied {
            return None;
        }
        let latest = self
            .updates
            .latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.applied = latest.0;
        latest.1.clone()
    }

    /// Hands `shard` the newest reloaded key set, if there is one it has not had. Called
    /// from the shard's tick, which pumps the engine's output afterwards.
    fn apply(&mut self, shard: &mut Shard, now: Instant, index: usize) {
        if let Some(verifier) = self.take_new() {
            shard.handle_keys(now, verifier);
            tracing::debug!(shard = index, generation = self.applied, "keys applied");
        }
    }
}

/// The thread that reloads the verification keys on SIGHUP.
struct KeyReloader {
    signals: signal_hook::iterator::Handle,
    thread: std::thread::JoinHandle<()>,
}

impl KeyReloader {
    /// Stops listening for SIGHUP and waits for the thread to end.
    fn stop(self) {
        self.signals.close();
        if self.thread.join().is_err() {
            tracing::error!("the key reload thread panicked");
        }
    }
}

/// Installs the SIGHUP handler (replacing SIGHUP's default, which ends the process) and
/// starts the thread that, on each SIGHUP, reads the key setting and the key files again
/// ([`Config::reload_verifier`]) and publishes the new set to the shards. A set that
/// cannot be read or used is logged and not published: the shards keep the keys they have.
fn spawn_key_reloader(config: Config, updates: Arc<KeyUpdates>) -> Result<KeyReloader> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])
        .context("installing the SIGHUP handler")?;
    let handle = signals.handle();
    let thread = std::thread::Builder::new()
        .name("imgate-keys".to_owned())
        .spawn(move || {
            // Ends when `KeyReloader::stop` closes the handle. Signals that arrive while a
            // reload runs are coalesced into one more reload.
            for _ in signals.forever() {
                reload_keys(&config, &updates);
            }
        })
        .context("starting the key reload thread")?;
    Ok(KeyReloader {
        signals: handle,
        thread,
    })
}

/// One reload: reads the key setting and files again and publishes the new set to the
/// shards, or logs why not and publishes nothing. Returns whether it published.
fn reload_keys(config: &Config, updates: &KeyUpdates) -> bool {
    match config.reload_verifier() {
        Ok(verifier) => {
            let key_ids: Vec<String> = verifier.key_ids().map(str::to_owned).collect();
            updates.publish(verifier);
            tracing::info!(?key_ids, "SIGHUP: token verification keys reloaded");
            true
        }
        Err(e) => {
            tracing::error!(
                error = %format!("{e:#}"),
                "SIGHUP: token verification keys not reloaded; the previous keys stay in use"
            );
            false
        }
    }
}

async fn shard_main(setup: ShardSetup) -> Result<()> {
    let ShardSetup {
        index,
        count,
        config,
        verifier,
        metrics,
        mesh,
        stop,
        admin,
        clock,
        mut keys,
    } = setup;
    let dir = config.data_dir.join(format!("shard-{index}"));
    let hash_seed = hash_seed().context("drawing the hash seed")?;
    let files = Rc::new(
        LogExecutor::open(dir.clone())
            .await
            .with_context(|| format!("opening the log in {}", dir.display()))?,
    );
    let mut log = LogEngine::new(config.log_config(files.align()), clock.now());
    // Recovery's operations run one at a time, before the shard exists; what the engine
    // says after `Recovered` (a checkpoint due) waits for the shard.
    let mut recovered = None;
    let mut early = Vec::new();
    for event in files.run_to_idle(&mut log, || clock.now()).await {
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
        segments = log.segments(),
        log_bytes = log.bytes(),
        read_bytes = recovery.read_bytes,
        truncated_bytes = recovery.truncated_bytes,
        rebuilt_index_files = recovery.rebuilt,
        replay_from = ?recovery.replay_from,
        index_heap_bytes = log.index_heap_bytes(),
        direct_io = files.is_direct(),
        "log recovered"
    );
    let (senders, receivers) = mesh
        .join()
        .await
        .map_err(|e| anyhow::anyhow!("joining the shard mesh: {e}"))?;
    let wake_mesh: Vec<Rc<Notify>> = (0..count).map(|_| Rc::new(Notify::default())).collect();
    let log_done = Rc::new(Notify::default());
    let state: Shared = Rc::new_cyclic(|me| {
        RefCell::new(State {
            shard,
            log: Log {
                engine: log,
                files,
                appended: VecDeque::new(),
                closing: false,
                closed: false,
                stopped: None,
                done: log_done.clone(),
            },
            me: me.clone(),
            index,
            metrics: metrics.clone(),
            stop: stop.clone(),
            clock,
            conns: Vec::new(),
            mesh_out: (0..count).map(|_| VecDeque::new()).collect(),
            wake_mesh: wake_mesh.clone(),
            admin_replies: VecDeque::new(),
            wake_admin: Rc::new(Notify::default()),
            scratch: vec![0; READ_SCRATCH_BYTES],
        })
    });
    {
        // What the log said after recovering (a checkpoint due), and the operations it
        // issued then (retention).
        let mut st = state.borrow_mut();
        for event in early {
            st.on_log_event(event);
        }
        st.pump();
    }

    let senders = Rc::new(senders);
    let receivers = Rc::new(receivers);
    for peer in (0..count).filter(|&p| p != index) {
        glommio::spawn_local(mesh_sender(
            state.clone(),
            senders.clone(),
            peer,
            wake_mesh[peer].clone(),
        ))
        .detach();
        glommio::spawn_local(mesh_receiver(state.clone(), receivers.clone(), peer)).detach();
    }
    if let Some((req_rx, rep_tx)) = admin {
        glommio::spawn_local(admin_requests(state.clone(), req_rx)).detach();
        glommio::spawn_local(admin_replies(state.clone(), rep_tx)).detach();
    }
    let listener = TcpListener::bind(config.listen)
        .map_err(|e| anyhow::anyhow!("binding {} on shard {index}: {e}", config.listen))?;
    let acceptor = glommio::spawn_local(accept_loop(
        state.clone(),
        listener,
        config.limits.connections_max,
    ));

    // The tick task's work, inline: timers, metrics, and shutdown.
    let draining_since = loop {
        glommio::timer::sleep(TICK).await;
        let mut st = state.borrow_mut();
        let now = st.clock.now();
        keys.apply(&mut st.shard, now, index);
        st.shard.handle_timeout(now);
        st.pump();
        st.log_tick();
        st.pump();
        let m = metrics.shard(index);
        m.publish(st.shard.stats());
        // The proof of life /healthz checks: a shard that stops turning goes silent.
        m.record_turn();
        #[cfg(feature = "fault-injection")]
        crate::fault::on_turn(index)?;
        if stop.load(Ordering::SeqCst) {
            st.shard.handle_drain(now);
            st.pump();
            break std::time::Instant::now();
        }
    };
    acceptor.cancel().await;
    // Let GoAway frames go out and in-flight appends become durable, within the timeout.
    loop {
        let done = {
            let st = state.borrow();
            (st.log.engine.is_idle() || st.log.stopped.is_some())
                && st.conns.iter().flatten().all(|c| c.closed.get())
        };
        if done || draining_since.elapsed() > config.shutdown_timeout {
            break;
        }
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    // Close the log: what is appended becomes durable, and the open segment is cut to its
    // last record so the next start finds no padding.
    {
        let mut st = state.borrow_mut();
        st.close_log();
        st.pump();
    }
    loop {
        {
            let st = state.borrow();
            if st.log.closed || st.log.stopped.is_some() {
                break;
            }
        }
        log_done.wait().await;
    }
    metrics.shard(index).publish(state.borrow().shard.stats());
    if let Some(error) = state.borrow_mut().log.stopped.take() {
        return Err(anyhow::Error::new(error))
            .with_context(|| format!("the log of shard {index} in {} stopped", dir.display()));
    }
    tracing::info!(shard = index, "drained");
    Ok(())
}

async fn accept_loop(state: Shared, listener: TcpListener, connections_max: usize) {
    let sockets = Rc::new(Sockets::default());
    loop {
        room_to_accept(&state, &sockets, connections_max).await;
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors or a reset during the handshake: the listener
                // is still good; wait a moment rather than spin.
                tracing::warn!(error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let opened = {
            let mut st = state.borrow_mut();
            let now = st.clock.now();
            st.shard.handle_open(now)
        };
        match opened {
            Ok(id) => {
                sockets.opened();
                let io = Rc::new(ConnIo {
                    id,
                    stream: RefCell::new(stream),
                    outq: RefCell::new(VecDeque::new()),
                    wake_writer: Notify::default(),
                    wake_reader: Notify::default(),
                    closing: Cell::new(false),
                    linger_until: Cell::new(None),
                    closed: Cell::new(false),
                    sockets: sockets.clone(),
                });
                {
                    let mut st = state.borrow_mut();
                    let i = id.index as usize;
                    if st.conns.len() <= i {
                        st.conns.resize_with(i + 1, || None);
                    }
                    // A closing connection may still sit in this slot (the engine reuses
                    // a slot as soon as it forgets a connection); its tasks keep it alive
                    // until its socket is closed.
                    st.conns[i] = Some(io.clone());
                    st.pump();
                }
                glommio::spawn_local(reader(state.clone(), io.clone())).detach();
                glommio::spawn_local(writer(state.clone(), io)).detach();
            }
            Err(refusal) => {
                glommio::spawn_local(async move {
                    let mut stream = stream;
                    // Bounded like any closing connection: the refusal fits in a fresh
                    // socket's buffer, but a peer must not hold the descriptor regardless.
                    let linger = async {
                        glommio::timer::sleep(CLOSE_LINGER).await;
                        Err::<(), _>(std::io::Error::from(std::io::ErrorKind::TimedOut))
                    };
                    let _ = write_all(&mut stream, &refusal).or(linger).await;
                    let _ = poll_fn(|cx| Pin::new(&mut stream).poll_close(cx)).await;
                })
                .detach();
            }
        }
    }
}

/// Waits while the shard's open sockets are at `connections_max` only because some of
/// them are closing (the engine no longer counts them). Those are gone within
/// [`CLOSE_LINGER`], so the wait is short; meanwhile new clients wait in the listen
/// backlog, which holds no descriptor of ours. When the engine itself is at the limit this
/// does not wait: the engine refuses the newcomer with `TooManyConnections`.
async fn room_to_accept(state: &Shared, sockets: &Sockets, connections_max: usize) {
    let started = std::time::Instant::now();
    loop {
        let known = state.borrow().shard.stats().connections;
        let open = sockets.open.get();
        if open < connections_max || open as u64 <= known {
            return;
        }
        if started.elapsed() > CLOSE_LINGER * 2 {
            // Every closing socket is released within CLOSE_LINGER; if one is not, a bug
            // holds it, and accepting on is better than refusing service for it.
            tracing::warn!(
                open,
                known,
                "closing connections outlived their linger; accepting anyway"
            );
            return;
        }
        sockets
            .released
            .wait()
            .or(glommio::timer::sleep(TICK))
            .await;
    }
}

/// Reads into the shard's scratch buffer and hands the bytes to the engine. The receive
/// buffer exists only while a frame is incomplete.
///
/// Once the engine has closed the connection (`closing`) nothing more is read: the engine
/// would not take the bytes (they would pile up here) and the peer gets nothing for them.
/// The reader ends; the writer flushes what it can and closes the socket.
async fn reader(state: Shared, io: Rc<ConnIo>) {
    let mut rx = BytesMut::new();
    loop {
        let read = poll_fn(|cx| {
            let mut st = state.borrow_mut();
            let mut stream = io.stream.borrow_mut();
            match Pin::new(&mut *stream).poll_read(cx, &mut st.scratch) {
                Poll::Ready(Ok(n)) => {
                    rx.extend_from_slice(&st.scratch[..n]);
                    Poll::Ready(Ok(n))
                }
                other => other,
            }
        })
        .or(async {
            // The writer shut the socket down; do not wait for the peer to notice.
            io.wake_reader.wait().await;
            Err(std::io::ErrorKind::ConnectionAborted.into())
        })
        .await;
        if io.closed.get() || io.closing.get() {
            return;
        }
        match read {
            Ok(n) if n > 0 => {
                let mut st = state.borrow_mut();
                let now = st.clock.now();
                st.shard.handle_bytes(now, io.id, &mut rx);
                st.pump();
                if io.closing.get() {
                    // These bytes closed it (or something else did meanwhile).
                    return;
                }
                if rx.is_empty() {
                    // Frames keep their slices alive; the connection needs no buffer now.
                    rx = BytesMut::new();
                }
            }
            _ => {
                // EOF or a socket error: the peer is gone.
                io.closed.set(true);
                io.wake_writer.notify();
                let mut st = state.borrow_mut();
                let now = st.clock.now();
                st.shard.handle_closed(now, io.id);
                st.pump();
                release(&mut st, io.id);
                return;
            }
        }
    }
}

/// How one write of a connection's queued chunks ended.
enum Flush {
    /// Everything was written.
    Written,
    /// The socket failed.
    Failed,
    /// Given up: the peer is gone, or a closing connection's linger ran out.
    CutShort,
}

/// Writes the connection's queued chunks with vectored, non-blocking `sendmsg` calls:
/// headers and the shared payload buffers go to the kernel as they are, never copied
/// into a staging buffer. When the socket is full it waits for writability.
///
/// A closing connection gets [`CLOSE_LINGER`] to flush; then, flushed or not, its socket
/// is shut down and released, whatever the peer does.
async fn writer(state: Shared, io: Rc<ConnIo>) {
    loop {
        while io.outq.borrow().is_empty() && !io.closing.get() && !io.closed.get() {
            io.wake_writer.wait().await;
        }
        if io.closed.get() {
            return;
        }
        let mut chunks: VecDeque<Bytes> = io.outq.borrow_mut().drain(..).collect();
        let flush = async {
            match write_chunks(&state, &io, &mut chunks).await {
                Ok(()) => Flush::Written,
                Err(_) => Flush::Failed,
            }
        }
        .or(cut_short(&io))
        .await;
        let done = match flush {
            Flush::Written => io.closing.get() && io.outq.borrow().is_empty(),
            Flush::Failed | Flush::CutShort => true,
        };
        if !done {
            continue;
        }
        // The engine still counts the connection only if a write failed while it was open.
        let engine_knows = !io.closing.get() && !io.closed.get();
        let fd = io.stream.borrow().as_raw_fd();
        if matches!(flush, Flush::Written) {
            // A closing connection flushed: its last frame is in the kernel, not yet at the
            // peer. Closing a socket with unread input (nothing is read once closing)
            // resets the connection, and a reset drops what the peer has not acknowledged.
            // So: FIN after the data, and wait within the linger for the acknowledgement.
            // SAFETY: shutdown(2) on a descriptor this connection owns; it stays open
            // until the stream is dropped.
            unsafe { libc::shutdown(fd, libc::SHUT_WR) };
            let acked = async {
                acknowledged(fd).await;
                Flush::Written
            };
            acked.or(cut_short(&io)).await;
        }
        // Shut both directions: the kernel drops what is unsent, and the reader, parked on
        // a peer that may never send again, is woken and ends too. The descriptor closes
        // when the last task lets go of `io`.
        // SAFETY: shutdown(2) on a descriptor this connection owns; it stays open
        // until the stream is dropped.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        io.closed.set(true);
        io.wake_reader.notify();
        let mut st = state.borrow_mut();
        if engine_knows {
            let now = st.clock.now();
            st.shard.handle_closed(now, io.id);
            st.pump();
        }
        release(&mut st, io.id);
        return;
    }
}

/// Ends when the peer has acknowledged every byte written to `fd` (or the socket cannot
/// say).
async fn acknowledged(fd: std::os::fd::RawFd) {
    loop {
        let mut unacked: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ's value on a socket, see tcp(7)) writes one int, the
        // bytes sent but not yet acknowledged, through the pointer; `fd` is open.
        let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut unacked) };
        if r < 0 || unacked <= 0 {
            return;
        }
        glommio::timer::sleep(ACK_POLL).await;
    }
}

/// Ends when the writer must stop waiting for the socket: the reader found the peer gone,
/// or the connection is closing and its linger (counted from when the writer first saw it
/// closing) has run out.
///
/// It looks at the connection every [`TICK`] instead of waiting on `wake_writer`: it runs
/// beside every write that has to wait, and being woken by each frame queued meanwhile
/// would retry the blocked send once per frame. The linger starts at most a tick late.
async fn cut_short(io: &ConnIo) -> Flush {
    loop {
        if io.closed.get() {
            return Flush::CutShort;
        }
        if io.closing.get() {
            let now = std::time::Instant::now();
            let until = io.linger_until.get().unwrap_or(now + CLOSE_LINGER);
            io.linger_until.set(Some(until));
            glommio::timer::sleep(until.saturating_duration_since(now)).await;
            return Flush::CutShort;
        }
        glommio::timer::sleep(TICK).await;
    }
}

/// Chunks handed to one `sendmsg` at most (the kernel's IOV_MAX is 1024).
const IOV_BATCH: usize = 64;

/// Writes `chunks` to the connection's socket until all are written or it fails.
///
/// Each write that makes progress is reported to the engine at once: a slow reader's
/// progress keeps its connection (the engine closes one whose writes stall for the grace
/// period), and the room it made lets the next page of history go out.
async fn write_chunks(
    state: &Shared,
    io: &ConnIo,
    chunks: &mut VecDeque<Bytes>,
) -> std::io::Result<()> {
    let fd = io.stream.borrow().as_raw_fd();
    while !chunks.is_empty() {
        let n = match sendmsg_nonblocking(fd, chunks) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Full socket: let glommio wait for writability and send the first chunk.
                let first = chunks.front().cloned().unwrap_or_default();
                poll_fn(|cx| Pin::new(&mut *io.stream.borrow_mut()).poll_write(cx, &first)).await?
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        advance(chunks, n);
        let mut st = state.borrow_mut();
        let now = st.clock.now();
        st.shard.handle_written(now, io.id, n);
        st.pump();
    }
    Ok(())
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

/// One non-blocking vectored send of up to `IOV_BATCH` chunks.
fn sendmsg_nonblocking(fd: std::os::fd::RawFd, chunks: &VecDeque<Bytes>) -> std::io::Result<usize> {
    let iov: Vec<libc::iovec> = chunks
        .iter()
        .take(IOV_BATCH)
        .map(|c| libc::iovec {
            iov_base: c.as_ptr() as *mut libc::c_void,
            iov_len: c.len(),
        })
        .collect();
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: the iovecs point into `chunks`, which outlive this call and are only read;
    // MSG_DONTWAIT keeps the executor from blocking; MSG_NOSIGNAL turns a closed peer
    // into EPIPE instead of SIGPIPE.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn release(st: &mut State, id: ConnId) {
    if let Some(slot) = st.conns.get_mut(id.index as usize) {
        if slot.as_ref().is_some_and(|c| c.id == id) {
            *slot = None;
        }
    }
}

async fn write_all(stream: &mut TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let n = poll_fn(|cx| Pin::new(&mut *stream).poll_write(cx, bytes)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
    }
    Ok(())
}

async fn mesh_sender(
    state: Shared,
    senders: Rc<Senders<MeshBatch>>,
    peer: usize,
    wake: Rc<Notify>,
) {
    loop {
        let batch: MeshBatch = state.borrow_mut().mesh_out[peer].drain(..).collect();
        if batch.is_empty() {
            wake.wait().await;
        } else if senders.send_to(peer, batch).await.is_err() {
            return;
        }
    }
}

async fn mesh_receiver(state: Shared, receivers: Rc<Receivers<MeshBatch>>, peer: usize) {
    while let Ok(Some(batch)) = receivers.recv_from(peer).await {
        let mut st = state.borrow_mut();
        let now = st.clock.now();
        for msg in batch {
            st.shard.handle_shard_msg(now, msg);
        }
        st.pump();
    }
}

async fn admin_requests(state: Shared, mut rx: mpsc::Receiver<AdminRequest>) {
    while let Some((token, command)) = rx.recv().await {
        let mut st = state.borrow_mut();
        let now = st.clock.now();
        st.shard.handle_command(now, command, token);
        st.pump();
    }
}

async fn admin_replies(state: Shared, tx: mpsc::Sender<AdminReply>) {
    let wake = state.borrow().wake_admin.clone();
    loop {
        let reply = state.borrow_mut().admin_replies.pop_front();
        match reply {
            Some(r) => {
                if tx.send(r).await.is_err() {
                    return;
                }
            }
            None => wake.wait().await,
        }
    }
}

/// A command's answer, once it came, and the task waiting for it.
type Waiting = (Option<Result<(), CommandError>>, Option<Waker>);

/// The admin server's handle on the shards: commands go to shard 0, which routes them to
/// the group's owner; answers come back by token.
struct AdminControl {
    tx: mpsc::Sender<AdminRequest>,
    next: Cell<u64>,
    waiting: RefCell<BTreeMap<u64, Waiting>>,
    stop: Arc<AtomicBool>,
}

impl AdminControl {
    fn new(tx: mpsc::Sender<AdminRequest>, stop: Arc<AtomicBool>) -> AdminControl {
        AdminControl {
            tx,
            next: Cell::new(1),
            waiting: RefCell::new(BTreeMap::new()),
            stop,
        }
    }

    /// Hands each answer from shard 0 to the command waiting for it; runs on the admin
    /// thread for as long as shard 0 holds the other end.
    async fn dispatch_replies(self: Rc<Self>, mut rx: mpsc::Receiver<AdminReply>) {
        while let Some((token, result)) = rx.recv().await {
            if let Some(slot) = self.waiting.borrow_mut().get_mut(&token) {
                slot.0 = Some(result);
                if let Some(w) = slot.1.take() {
                    w.wake();
                }
            }
        }
    }
}

/// Removes a command's entry from `waiting` when dropped.
struct Forget<'a> {
    waiting: &'a RefCell<BTreeMap<u64, Waiting>>,
    token: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.waiting.borrow_mut().remove(&self.token);
    }
}

impl Control for AdminControl {
    fn command(
        &self,
        cmd: Command,
    ) -> Pin<Box<dyn Future<Output = Result<(), CommandError>> + '_>> {
        let token = self.next.get();
        self.next.set(token + 1);
        self.waiting.borrow_mut().insert(token, (None, None));
        Box::pin(async move {
            // The entry goes when this future ends or is dropped (the admin server times
            // commands out), so a late answer cannot leave it behind.
            let _forget = Forget {
                waiting: &self.waiting,
                token,
            };
            if self.tx.send((token, cmd)).await.is_err() {
                return Err(CommandError::StorageFailed);
            }
            poll_fn(|cx| {
                let mut waiting = self.waiting.borrow_mut();
                let Some(slot) = waiting.get_mut(&token) else {
                    return Poll::Ready(Err(CommandError::StorageFailed));
                };
                match slot.0.take() {
                    Some(result) => Poll::Ready(result),
                    None => {
                        slot.1 = Some(cx.waker().clone());
                        Poll::Pending
                    }
                }
            })
            .await
        })
    }

    fn drain(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn is_draining(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    #[cfg(feature = "fault-injection")]
    fn inject(&self, shard: usize, fault: crate::fault::Fault) {
        crate::fault::request(shard, fault);
    }
}

/// Raises the soft open-file limit to the hard limit; returns the connections it allows.
fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by reference.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    if ok && lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    let limit = if ok { lim.rlim_cur } else { 1024 };
    limit.saturating_sub(RESERVED_FDS).max(1)
}

/// io_uring registered-buffer memory per executor, fitting all executors under the
/// memlock limit (8 MiB on the build machines) so glommio never skips registration.
fn io_memory_per_executor(executors: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed by reference.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0;
    let budget = if ok && lim.rlim_cur != libc::RLIM_INFINITY {
        lim.rlim_cur as usize
    } else {
        64 << 20
    };
    // Half the limit, shared; glommio and the kernel lock a little besides the buffers.
    (budget / 2 / executors).clamp(64 << 10, 8 << 20)
}

/// Refuses to start with a shard count other than the one the logs were written with:
/// conversation ownership depends on it.
fn check_shard_count(config: &Config, count: usize) -> Result<()> {
    let path = config.data_dir.join("shards");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let recorded: usize = text
                .trim()
                .parse()
                .with_context(|| format!("reading {}", path.display()))?;
            if recorded != count {
                bail!(
                    "{} was written by {recorded} shards; this gateway would run {count}. \
                     Start it with --shards {recorded}",
                    config.data_dir.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&path, format!("{count}\n"))
                .with_context(|| format!("writing {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// A fresh key for the engine's hashers, from the OS, so that nobody can precompute ids
/// that collide in this process (hash flooding).
fn hash_seed() -> std::io::Result<u128> {
    use std::io::Read;
    let mut seed = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
    Ok(u128::from_le_bytes(seed))
}

#[cfg(test)]
mod key_reload_tests {
    use super::*;
    use imgate_core::auth::{KeyConfig, VerificationKey};

    /// A verifier whose one key has id `kid`.
    fn verifier(kid: &str) -> TokenVerifier {
        TokenVerifier::with_key_set(
            &[VerificationKey {
                kid: Some(kid.to_owned()),
                key: KeyConfig::Hs256 {
                    secret: b"a-secret-of-at-least-32-bytes-long!!".to_vec(),
                },
            }],
            Duration::from_secs(30),
            4096,
        )
        .unwrap()
    }

    fn ids(v: Option<TokenVerifier>) -> Option<Vec<String>> {
        v.map(|v| v.key_ids().map(str::to_owned).collect())
    }

    #[test]
    fn every_shard_takes_each_reloaded_key_set_once() {
        let updates = Arc::new(KeyUpdates::default());
        let mut shards = [
            KeyWatch::new(updates.clone()),
            KeyWatch::new(updates.clone()),
        ];
        for watch in &mut shards {
            assert!(watch.take_new().is_none(), "nothing was reloaded yet");
        }
        updates.publish(verifier("a"));
        for watch in &mut shards {
            assert_eq!(ids(watch.take_new()), Some(vec!["a".to_owned()]));
            assert!(watch.take_new().is_none(), "taken once");
        }
    }

    #[test]
    fn a_shard_that_missed_reloads_takes_only_the_newest() {
        let updates = Arc::new(KeyUpdates::default());
        let mut early = KeyWatch::new(updates.clone());
        updates.publish(verifier("a"));
        assert_eq!(ids(early.take_new()), Some(vec!["a".to_owned()]));
        let mut late = KeyWatch::new(updates.clone());
        updates.publish(verifier("b"));
        updates.publish(verifier("c"));
        assert_eq!(ids(late.take_new()), Some(vec!["c".to_owned()]));
        assert_eq!(ids(early.take_new()), Some(vec!["c".to_owned()]));
        assert!(late.take_new().is_none() && early.take_new().is_none());
    }

    #[test]
    fn a_key_set_that_fails_to_load_is_not_published() {
        let dir = std::env::temp_dir().join(format!("imgate-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("a.secret");
        std::fs::write(&secret, "a-secret-of-at-least-32-bytes-long!!").unwrap();
        let file = dir.join("gw.toml");
        let write = |kid: &str, path: &std::path::Path| {
            let text = format!("[[keys]]\nkid = {kid:?}\nhs256_secret_file = {path:?}\n");
            std::fs::write(&file, text).unwrap();
        };
        write("a", &secret);
        let config = Config::load(Some(&file), crate::config::Overrides::default()).unwrap();
        let updates = Arc::new(KeyUpdates::default());
        let mut shard = KeyWatch::new(updates.clone());

        write("b", &dir.join("missing.secret"));
        assert!(!reload_keys(&config, &updates), "a missing key file");
        std::fs::write(&file, "[[keys]\n").unwrap();
        assert!(
            !reload_keys(&config, &updates),
            "a config that does not parse"
        );
        assert!(shard.take_new().is_none(), "nothing was published");

        write("b", &secret);
        assert!(reload_keys(&config, &updates));
        assert_eq!(ids(shard.take_new()), Some(vec!["b".to_owned()]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
