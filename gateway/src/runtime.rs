//! The gateway process: one pinned thread per shard running its [`Reactor`](crate::reactor)
//! over its own io_uring, the queues between them, the admin thread, signals and key
//! reloads. Every decision is an engine's; this module wires threads together.
//!
//! Threads:
//! - `imgate-shard-{i}`: one per shard, pinned to core `i % cores`, running
//!   [`reactor::run_shard`](crate::reactor::run_shard);
//! - `imgate-admin`: the admin HTTP server on a small tokio runtime ([`admin::spawn`]),
//!   talking to shard 0 through the same kind of queue as the shards;
//! - `imgate-keys`: reloads verification keys on SIGHUP.
//!
//! Between shards: one bounded SPSC queue per ordered pair (`imgate_spsc`), carrying
//! batches of [`ShardMsg`] in order (FIFO per pair: I4 and I8 rest on it), and one
//! wake-up per shard ([`Wake`]): a sender wakes only a shard that said it is about to
//! sleep, so a busy shard costs its senders nothing. A shard wakes a peer by posting a
//! completion on the peer's ring (IORING_OP_MSG_RING, submitted with its own turn's
//! submissions: no syscall of its own); the admin thread, which has no ring, and the
//! fallback write the peer's [`EventFd`], whose read is armed on the peer's ring.

use crate::admin::{AdminContext, AdminToken, Control};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::reactor::{AdminEnds, MeshEnds, ShardSetup};
use anyhow::{bail, Context as _, Result};
use imgate_core::auth::TokenVerifier;
use imgate_core::mesh::{Command, CommandError, ShardMsg};
use imgate_core::shard::Shard;
use imgate_core::Instant;
use imgate_spsc::{Consumer, Producer, Signal, Wake};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Batches one mesh queue (one ordered pair of shards) holds. A batch is everything a
/// shard queued for the peer in one loop turn, and the peer empties its queues every
/// turn, so 256 batches are many turns of the busiest shard; a full queue is retried.
const MESH_QUEUE_BATCHES: usize = 256;
/// Commands (and answers) in flight between the admin thread and shard 0.
const ADMIN_QUEUE: usize = 64;
/// File descriptors kept for logs, listeners and the admin server.
const RESERVED_FDS: u64 = 64;
/// The listen backlog of each shard's listener: connections the kernel completes before
/// the shard accepts them (a reconnect storm arrives faster than one turn takes).
const LISTEN_BACKLOG: i32 = 4096;

/// What one mesh queue item carries: every message for one peer queued in one loop turn,
/// in order.
pub type MeshBatch = Vec<ShardMsg>;
/// A command from the admin server and the token its answer carries.
pub type AdminRequest = (u64, Command);
/// A command's answer.
pub type AdminReply = (u64, Result<(), CommandError>);

/// The process-wide clock: wall time at start, advanced by a monotonic clock, so that
/// time never goes back while the gateway runs (see `imgate_core::time`).
#[derive(Clone, Copy)]
pub struct Clock {
    start_unix_ms: u64,
    start: std::time::Instant,
}

impl Clock {
    pub fn new() -> Clock {
        let start_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Clock {
            start_unix_ms,
            start: std::time::Instant::now(),
        }
    }

    pub fn now(&self) -> Instant {
        Instant::from_millis(self.start_unix_ms + self.start.elapsed().as_millis() as u64)
    }

    /// How long from now until `deadline` on this clock (zero if it passed).
    pub fn until(&self, deadline: Instant) -> Duration {
        Duration::from_millis(deadline.as_millis().saturating_sub(self.now().as_millis()))
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
pub struct KeyWatch {
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
    pub fn apply(&mut self, shard: &mut Shard, now: Instant, index: usize) {
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

/// A shard's wake-up descriptor: an eventfd whose read the shard keeps armed on its ring,
/// so that a write to it ends the shard's wait. Written only when the shard said it is
/// about to sleep ([`Wake`]).
pub struct EventFd(OwnedFd);

impl EventFd {
    fn new() -> std::io::Result<EventFd> {
        // SAFETY: eventfd(2) returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The descriptor, for the shard's armed read.
    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Signal for EventFd {
    fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a local array to an eventfd we own. It cannot block
        // short of 2^64-2 unread signals; a failure leaves the counter as it was, and the
        // shard wakes at its next deadline anyway.
        unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

/// A listening socket on `addr` with SO_REUSEPORT, so that every shard has its own and the
/// kernel spreads connections over them.
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<OwnedFd> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.cloexec(),
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Pins the calling thread to `cpu`. Best effort: a container may forbid it.
fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes one bit of it; sched_setaffinity
    // reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(cpu, error = %std::io::Error::last_os_error(), "pinning a shard thread");
        }
    }
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
    let metrics = Metrics::new(count);
    let clock = Clock::new();

    // The mesh: a queue per ordered pair, a wake-up per shard.
    let wakes: Vec<Arc<Wake<EventFd>>> = (0..count)
        .map(|_| EventFd::new().map(|fd| Arc::new(Wake::new(fd))))
        .collect::<std::io::Result<_>>()
        .context("creating the shards' wake-up eventfds")?;
    let rings: Arc<Vec<AtomicI32>> = Arc::new((0..count).map(|_| AtomicI32::new(-1)).collect());
    let mut inbound: Vec<Vec<Option<Consumer<MeshBatch>>>> = (0..count)
        .map(|_| (0..count).map(|_| None).collect())
        .collect();
    let mut outbound: Vec<Vec<Option<Producer<MeshBatch>>>> = (0..count)
        .map(|_| (0..count).map(|_| None).collect())
        .collect();
    for from in 0..count {
        for to in (0..count).filter(|&to| to != from) {
            let (tx, rx) = imgate_spsc::channel(MESH_QUEUE_BATCHES);
            outbound[from][to] = Some(tx);
            inbound[to][from] = Some(rx);
        }
    }

    // The admin thread and shard 0's ends of its queues. Bind first, so that a bad
    // address fails fast.
    let (req_tx, req_rx) = imgate_spsc::channel::<AdminRequest>(ADMIN_QUEUE);
    let (rep_tx, rep_rx) = imgate_spsc::channel::<AdminReply>(ADMIN_QUEUE);
    let admin_notify = Arc::new(tokio::sync::Notify::new());
    let mut admin_ends = Some(AdminEnds {
        requests: req_rx,
        replies: rep_tx,
        wake: admin_notify.clone(),
    });
    let admin_listener = std::net::TcpListener::bind(config.admin)
        .with_context(|| format!("binding the admin address {}", config.admin))?;
    let admin_token = config.admin_token().context("reading the admin token")?;
    {
        let metrics = metrics.clone();
        let stop = stop.clone();
        let shard0 = wakes[0].clone();
        // Runs on the admin thread, inside its runtime's LocalSet.
        crate::admin::spawn(admin_listener, move || {
            let control = Rc::new(AdminControl {
                tx: RefCell::new(req_tx),
                rx: RefCell::new(rep_rx),
                shard0,
                notify: admin_notify,
                next: Cell::new(1),
                waiting: RefCell::new(BTreeMap::new()),
                stop,
            });
            tokio::task::spawn_local(control.clone().dispatch_replies());
            AdminContext {
                metrics,
                control,
                token: AdminToken::new(&admin_token),
            }
        })
        .context("starting the admin thread")?;
    }

    let mut handles = Vec::new();
    for (index, (inbound, outbound)) in inbound.into_iter().zip(outbound).enumerate() {
        let setup = ShardSetup {
            index,
            count,
            config: config.clone(),
            verifier: verifier.clone(),
            metrics: metrics.clone(),
            mesh: MeshEnds {
                inbound,
                outbound,
                wakes: wakes.clone(),
                rings: rings.clone(),
            },
            admin: if index == 0 { admin_ends.take() } else { None },
            stop: stop.clone(),
            clock,
            keys: KeyWatch::new(key_updates.clone()),
            hash_seed: hash_seed().context("drawing the hash seed")?,
        };
        let stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name(format!("imgate-shard-{index}"))
            .spawn(move || {
                pin_to(index % cpus);
                let result = crate::reactor::run_shard(setup);
                if let Err(e) = &result {
                    // Not a zombie: the other shards stop too (GoAway, flush, sync), and
                    // the process exits non-zero for its supervisor to restart it.
                    tracing::error!(shard = index, error = %format!("{e:#}"), "shard failed; stopping the gateway");
                    stop.store(true, Ordering::SeqCst);
                }
                result
            })
            .with_context(|| format!("starting shard {index}"))?;
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
    key_reloader.stop();
    match failed {
        Some(e) => Err(e),
        None => {
            tracing::info!("gateway stopped cleanly");
            Ok(())
        }
    }
}

/// A command's answer, once it came, and the task waiting for it.
type Waiting = (Option<Result<(), CommandError>>, Option<Waker>);

/// The admin server's handle on the shards, on the admin thread: commands go to shard 0
/// (which routes them to the group's owner) through a queue; answers come back through
/// another, by token.
struct AdminControl {
    tx: RefCell<Producer<AdminRequest>>,
    rx: RefCell<Consumer<AdminReply>>,
    /// Shard 0's wake-up.
    shard0: Arc<Wake<EventFd>>,
    /// Rung by shard 0 after it queued answers.
    notify: Arc<tokio::sync::Notify>,
    next: Cell<u64>,
    waiting: RefCell<BTreeMap<u64, Waiting>>,
    stop: Arc<AtomicBool>,
}

impl AdminControl {
    /// Hands every queued answer to the command waiting for it; then waits for shard 0's
    /// notification. `notify_one` keeps a permit when nobody waits, so none is lost.
    async fn dispatch_replies(self: Rc<Self>) {
        loop {
            while let Some((token, result)) = self.rx.borrow_mut().pop() {
                if let Some(slot) = self.waiting.borrow_mut().get_mut(&token) {
                    slot.0 = Some(result);
                    if let Some(w) = slot.1.take() {
                        w.wake();
                    }
                }
            }
            self.notify.notified().await;
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

/// How often a command waits for room in a full queue to shard 0 (the admin's commands
/// are rare; the server's own COMMAND_TIMEOUT bounds the wait).
const ADMIN_QUEUE_RETRY: Duration = Duration::from_millis(5);

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
            let mut request = (token, cmd);
            loop {
                let pushed = self.tx.borrow_mut().push(request);
                match pushed {
                    Ok(()) => break,
                    Err(back) => {
                        request = back;
                        tokio::time::sleep(ADMIN_QUEUE_RETRY).await;
                    }
                }
            }
            self.shard0.notify();
            std::future::poll_fn(|cx| {
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
