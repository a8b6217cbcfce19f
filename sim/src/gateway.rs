//! The gateway host: every shard of the gateway in one task loop, over turmoil TCP, each
//! shard's log run by core's log engine on turmoil's simulated disk ([`disk::perform`]).
//!
//! Driver contract as in `core/src/shard.rs` and `core/src/log_engine/mod.rs`: the shard's
//! Append, Fetch and Load go to its log engine; the engine's operations are performed on
//! the disk at once and reported later (writes within a tick, syncs after 1-3 ticks,
//! reads after up to 4), several in flight and in any order, so that pipelined syncs,
//! late history reads and failures all happen; a sync may be failed by the seed. The
//! engine's events go to the shard before anything else reaches the engine. Boot runs
//! the engine's recovery and rebuilds each shard from what it hands over. Shard messages
//! travel one FIFO queue per ordered pair; the loop delivers pairs in a seeded order and
//! may hold a pair back for a while (never reordering inside it).

use crate::disk;
use crate::rng::Rng;
use crate::run::{core_now, CrashPoint, Planted, Rates, Shared, GROUP, USERS};
use bytes::{Bytes, BytesMut};
use imgate_core::auth::{KeyConfig, TokenVerifier};
use imgate_core::log::{scan, Record, StoredMessage};
use imgate_core::log_engine::{Completion, IoError, IoId, LogConfig, LogEngine, LogEvent, Op};
use imgate_core::mesh::{Command, ConnId, ShardId, ShardMsg};
use imgate_core::proto::meta::Meta;
use imgate_core::proto::{Decoder, UserId};
use imgate_core::shard::{Effect, Lsn, Shard, ShardConfig};
use imgate_core::Limits;
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use turmoil::net::{TcpListener, TcpStream};

/// The gateway's port.
pub const PORT: u16 = 9000;
/// The token secret shared by gateway and devices.
pub const SECRET: &[u8] = b"imgate sim secret, 32 bytes or more";

/// Limits of the simulated gateway: short heartbeats so that dead links show within seconds,
/// and the run's outbound budget if it has one.
pub fn limits(rates: &Rates) -> Limits {
    let mut limits = Limits {
        heartbeat_interval: Duration::from_secs(2),
        auth_timeout: Duration::from_secs(2),
        // Small reply pages, so that every Sync, Pull and catch-up of more than a few of
        // the sim's short messages runs over several pages.
        replay_page_bytes: 256,
        // A handful of conversations in memory: the sim's direct conversations leave
        // memory and come back from the log all the time.
        conversations_max: 1,
        // Room for every conversation of a device (3 users: 3 direct, 1 group), so cursors
        // are never dropped here: a dropped cursor catches up from seq 1, which at this
        // run's 256-byte pages floods the connection with repeats, and with 2 cursors a
        // connection one seed in a thousand ended its heal with sends still unacked (a
        // liveness failure, seed 990). core/tests/hostile.rs covers the bound itself.
        cursors_per_conn_max: 8,
        ..Limits::default()
    };
    if let Some((soft, hard, grace_ms)) = rates.outbound {
        limits.outbound_soft_bytes = soft;
        limits.outbound_hard_bytes = hard;
        limits.slow_consumer_grace = Duration::from_millis(grace_ms);
        // The sim's messages are small; the budget must still hold a page past the
        // resume point and one message.
        limits.payload_bytes_max = 4 * 1024;
        limits.replay_resume_bytes = soft / 2;
    }
    limits.validate().expect("the sim's limits are consistent");
    limits
}

enum IoEvent {
    Accepted(TcpStream),
    Bytes(u64, BytesMut),
    Written(u64, usize),
    Closed(u64),
}

enum WriteCmd {
    Data(Vec<Bytes>, usize),
    Close,
}

struct Conn {
    shard: usize,
    id: ConnId,
    tx: mpsc::UnboundedSender<WriteCmd>,
    /// Planted bug (c) has been applied on this connection.
    skipped: bool,
}

struct Node {
    shard: Shard,
    log: LogEngine,
    /// Operations to report at their tick: (tick, id, whether it is a segment write,
    /// what happens).
    ios: Vec<(u64, IoId, bool, Pending)>,
    /// Syncs issued and syncs whose effect took place (in issue order).
    syncs_issued: u64,
    syncs_done: u64,
    /// Writes made while a sync was in flight, each with the number of syncs issued before
    /// it: applied to the disk only once those took effect, so that a sync makes durable
    /// exactly what was written before it started (the driver contract), not the writes
    /// that completed while it ran.
    deferred: VecDeque<(u64, Op)>,
    /// A deferred write failed when it reached the disk: the next sync reports it, as the
    /// kernel reports a failed writeback.
    writeback_error: bool,
    /// The messages of each append not yet durable or failed, for the oracle.
    appended: BTreeMap<Lsn, Vec<StoredMessage>>,
}

/// What an operation in flight does when it is reported.
enum Pending {
    /// Its result, decided when it was issued.
    Done(Result<Completion, IoError>),
    /// A sync: it takes effect when reported (unless the seed failed it), covering what
    /// was written before it was issued.
    Sync {
        fail: bool,
        file: imgate_core::log_engine::FileId,
    },
}

/// The log engine's configuration in the sim: tiny segments and frequent checkpoints, so
/// that every seed rotates, checkpoints and recovers from a checkpoint.
pub fn log_config(rates: &Rates) -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        segment_messages: rates.segment_messages,
        align: rates.log_align,
        checkpoint_messages: rates.checkpoint_messages,
        read_jobs_max: 4,
        syncs_inflight_max: rates.syncs_inflight_max,
        ..LogConfig::default()
    }
}

/// The gateway host's software: boots (recovering from the logs), then loops.
pub async fn host(shared: Rc<RefCell<Shared>>, shard_count: u16) -> turmoil::Result {
    let io: Rc<RefCell<VecDeque<IoEvent>>> = Rc::new(RefCell::new(VecDeque::new()));
    let mut gw = Gateway::boot(&shared, shard_count);
    let listener = TcpListener::bind(("0.0.0.0", PORT)).await?;
    {
        let io = io.clone();
        tokio::task::spawn_local(async move {
            while let Ok((s, _)) = listener.accept().await {
                io.borrow_mut().push_back(IoEvent::Accepted(s));
            }
        });
    }
    loop {
        gw.turn(&shared, &io);
        if gw.frozen {
            // Stopped at a crash point: nothing more happens until the crash takes the host.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

struct Gateway {
    nodes: Vec<Node>,
    mesh: BTreeMap<(usize, usize), VecDeque<ShardMsg>>,
    held_until: BTreeMap<(usize, usize), u64>,
    conns: BTreeMap<u64, Conn>,
    by_id: BTreeMap<(usize, ConnId), u64>,
    next_key: u64,
    rng: Rng,
    tick: u64,
    commands: BTreeMap<u64, bool>,
    /// Stopped at an armed crash point, waiting for the crash.
    frozen: bool,
    /// The tick at which a write first found the disk full (disk-full seeds).
    full_since: Option<u64>,
    /// How far this run of the gateway's wall clock is behind sim time: after a restart
    /// it may have stepped back, and message timestamps must not.
    clock_behind_ms: u64,
}

fn verifier(limits: &Limits) -> TokenVerifier {
    TokenVerifier::new(
        &KeyConfig::Hs256 {
            secret: SECRET.to_vec(),
        },
        limits.token_leeway,
        limits.token_bytes_max,
    )
    .expect("the sim's key is valid")
}

impl Gateway {
    fn boot(shared: &Rc<RefCell<Shared>>, shard_count: u16) -> Gateway {
        let mut sh = shared.borrow_mut();
        let restarts = sh.counts.crash;
        let mut rng = Rng::new(sh.cfg.seed, 1000 + restarts);
        // Every other restart comes up with its wall clock up to 10 s behind.
        let clock_behind_ms = if restarts % 2 == 1 {
            rng.range(0, 10_000)
        } else {
            0
        };
        let planted = sh.cfg.planted;
        let limits = limits(&sh.rates);
        if !sh.booted {
            disk::prepare(sh.rates.reserves());
        }
        let mut nodes = Vec::new();
        let mut refused = false;
        for i in 0..shard_count as usize {
            let id = ShardId(i as u16);
            // The oracle's own look at the disk: every segment, scanned independently of
            // the engine. Acked messages must be there, seqs consecutive, nothing gone back.
            let mut retries = 0;
            let on_disk = disk::records_on_disk(i, &mut retries);
            sh.counts.read_retry += retries;
            let before = sh.violation_count();
            sh.oracle.check_recovered(
                i as u16,
                |c| Shard::owner_of(c, shard_count) == id,
                &on_disk,
            );
            sh.note_violations(before);
            // What a crash left of the tail (whole records of an interrupted sync) is
            // durable from now on.
            let survived: Vec<StoredMessage> = on_disk
                .into_iter()
                .filter_map(|r| match r {
                    Record::Message(m) => Some(m),
                    _ => None,
                })
                .collect();
            sh.observe_durable(i, &survived);
            let mut log = LogEngine::new(log_config(&sh.rates), core_now());
            #[cfg(test)]
            if let Some(bug) = planted.and_then(Planted::log_bug) {
                log.plant(bug);
            }
            let (recovered, early) = recover(i, &mut log, &mut sh.counts.read_retry);
            let mut records = match recovered {
                Ok(r) => {
                    if r.truncated_bytes > 0 {
                        // A torn or garbage tail (what a crash left of unsynced writes).
                        sh.counts.torn += 1;
                    }
                    sh.event(format!(
                        "boot: shard {i} log from {:?}, {} segments, {} bytes read",
                        r.replay_from, r.segments, r.read_bytes
                    ));
                    r.records
                }
                Err(e) => {
                    let v = format!("recovery: shard {i}'s log refused to open: {e}");
                    sh.oracle.violations.push(v);
                    refused = true;
                    Vec::new()
                }
            };
            if planted == Some(Planted::SeqNotRecovered) && restarts > 0 {
                // Planted driver bug (d): recover the shard from the log less its last
                // message record.
                if let Some(pos) = records
                    .iter()
                    .rposition(|r| matches!(r, Record::Message(_)))
                {
                    records.remove(pos);
                }
            }
            let mut shard = Shard::new(
                ShardConfig {
                    id,
                    shard_count,
                    limits: limits.clone(),
                    // Fixed: a seed must replay the same map iteration orders.
                    hash_seed: 0,
                },
                verifier(&limits),
            );
            #[cfg(test)]
            if planted == Some(Planted::DedupeOff) {
                shard.plant_dedupe_off();
            }
            #[cfg(test)]
            if planted == Some(Planted::InboxNotDurable) {
                shard.plant_inbox_not_durable();
            }
            let n = records.len();
            if let Err(e) = shard.recover(records) {
                let v = format!("I3: shard {i} refused its log: {e}");
                sh.oracle.violations.push(v);
            }
            sh.event(format!("boot: shard {i} recovered {n} records"));
            let mut node = Node {
                shard,
                log,
                ios: Vec::new(),
                syncs_issued: 0,
                syncs_done: 0,
                deferred: VecDeque::new(),
                writeback_error: false,
                appended: BTreeMap::new(),
            };
            for event in early {
                // What the engine asked for as it finished recovering (a checkpoint).
                if let LogEvent::CheckpointDue = event {
                    node.shard.handle_checkpoint_due(core_now());
                }
            }
            nodes.push(node);
        }
        let booted = sh.booted;
        drop(sh);
        let mut gw = Gateway {
            nodes,
            mesh: BTreeMap::new(),
            held_until: BTreeMap::new(),
            conns: BTreeMap::new(),
            by_id: BTreeMap::new(),
            next_key: 0,
            rng,
            tick: 0,
            commands: BTreeMap::new(),
            frozen: refused,
            full_since: None,
            clock_behind_ms,
        };
        if !booted {
            // Only the disk's own errors at boot: pump and commit until the command is
            // done, again if a write failed.
            let mut token = 0;
            for _ in 0..1000 {
                match (token, gw.commands.get(&token)) {
                    (_, Some(true)) => break,
                    (0, _) | (_, Some(false)) => {
                        token += 1;
                        let members = (1..=USERS).map(UserId).collect();
                        let create = Command::CreateGroup {
                            group: GROUP,
                            members,
                        };
                        gw.nodes[0].shard.handle_command(core_now(), create, token);
                    }
                    _ => {}
                }
                // Each round is a tick, so that the log's sync can return.
                gw.tick += 1;
                gw.pump_with(shared, false);
                gw.complete_io(shared, false);
            }
            let ok = gw.commands.get(&token).copied() == Some(true);
            assert!(ok, "the group could not be created at first boot");
            let mut sh = shared.borrow_mut();
            sh.booted = true;
            sh.event("boot: group created".into());
        }
        gw
    }

    fn turn(&mut self, shared: &Rc<RefCell<Shared>>, io: &Rc<RefCell<VecDeque<IoEvent>>>) {
        self.tick += 1;
        let now = core_now();
        let wall = now.as_millis().saturating_sub(self.clock_behind_ms);
        for node in &mut self.nodes {
            node.shard.handle_wall_clock(wall);
        }
        let events: Vec<IoEvent> = io.borrow_mut().drain(..).collect();
        for ev in events {
            match ev {
                IoEvent::Accepted(stream) => self.accept(shared, io, stream),
                IoEvent::Bytes(key, mut buf) => {
                    if let Some(c) = self.conns.get(&key) {
                        self.nodes[c.shard].shard.handle_bytes(now, c.id, &mut buf);
                    }
                }
                IoEvent::Written(key, n) => {
                    if let Some(c) = self.conns.get(&key) {
                        self.nodes[c.shard].shard.handle_written(now, c.id, n);
                    }
                }
                IoEvent::Closed(key) => {
                    if let Some(c) = self.conns.remove(&key) {
                        self.by_id.remove(&(c.shard, c.id));
                        self.nodes[c.shard].shard.handle_closed(now, c.id);
                    }
                }
            }
        }
        for node in &mut self.nodes {
            if node.shard.poll_timeout().is_some_and(|t| t <= now) {
                node.shard.handle_timeout(now);
            }
        }
        self.pump(shared);
        let faults_on = shared.borrow().faults_on;
        self.complete_io(shared, faults_on);
        if self.frozen {
            return;
        }
        self.pump(shared);
        self.free_space(shared);
    }

    /// Stops here if a crash is armed for `point`: the run loop crashes the host after this
    /// simulation step, before anything else of this turn is done.
    fn at_crash_point(&mut self, shared: &Rc<RefCell<Shared>>, point: CrashPoint) -> bool {
        let mut sh = shared.borrow_mut();
        if !sh.faults_on || sh.crash_point.map(|(p, _)| p) != Some(point) {
            return false;
        }
        let (_, down_ms) = sh.crash_point.take().expect("armed");
        sh.crash_now = Some((point, down_ms));
        sh.event(format!("gateway stops at crash point {point:?}"));
        self.frozen = true;
        true
    }

    fn accept(
        &mut self,
        shared: &Rc<RefCell<Shared>>,
        io: &Rc<RefCell<VecDeque<IoEvent>>>,
        stream: TcpStream,
    ) {
        let now = core_now();
        let shard = self.rng.range(0, self.nodes.len() as u64) as usize;
        let (mut rd, mut wr) = stream.into_split();
        let key = self.next_key;
        self.next_key += 1;
        let (tx, mut rx) = mpsc::unbounded_channel::<WriteCmd>();
        match self.nodes[shard].shard.handle_open(now) {
            Ok(id) => {
                shared
                    .borrow_mut()
                    .event(format!("gw: conn {key} opened on shard {shard}"));
                self.conns.insert(
                    key,
                    Conn {
                        shard,
                        id,
                        tx,
                        skipped: false,
                    },
                );
                self.by_id.insert((shard, id), key);
                let rio = io.clone();
                tokio::task::spawn_local(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        match rd.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => rio
                                .borrow_mut()
                                .push_back(IoEvent::Bytes(key, BytesMut::from(&buf[..n]))),
                        }
                    }
                    rio.borrow_mut().push_back(IoEvent::Closed(key));
                });
            }
            Err(bytes) => {
                let _ = tx.send(WriteCmd::Data(vec![bytes], 0));
                let _ = tx.send(WriteCmd::Close);
            }
        }
        let wio = io.clone();
        tokio::task::spawn_local(async move {
            while let Some(cmd) = rx.recv().await {
                match cmd {
                    WriteCmd::Data(chunks, n) => {
                        for c in chunks {
                            if wr.write_all(&c).await.is_err() {
                                wio.borrow_mut().push_back(IoEvent::Closed(key));
                                return;
                            }
                        }
                        if n > 0 {
                            wio.borrow_mut().push_back(IoEvent::Written(key, n));
                        }
                    }
                    WriteCmd::Close => break,
                }
            }
            let _ = wr.shutdown().await;
        });
    }

    /// Moves effects, transmits and shard messages until nothing moves.
    fn pump(&mut self, shared: &Rc<RefCell<Shared>>) {
        let faults_on = shared.borrow().faults_on;
        self.pump_with(shared, faults_on);
    }

    fn pump_with(&mut self, shared: &Rc<RefCell<Shared>>, faults_on: bool) {
        let now = core_now();
        let (mesh_delay, planted) = {
            let sh = shared.borrow();
            (sh.rates.mesh_delay, sh.cfg.planted)
        };
        let ms = now.as_millis();
        // Each round either moves something or ends; the engine's queues are bounded.
        for _round in 0..10_000 {
            if self.frozen {
                return;
            }
            let mut moved = false;
            for i in 0..self.nodes.len() {
                while let Some(effect) = self.nodes[i].shard.poll_effect() {
                    moved = true;
                    match effect {
                        Effect::Append { lsn, bytes } => {
                            let msgs = scan(&bytes)
                                .records
                                .into_iter()
                                .filter_map(|(_, r)| match r {
                                    Record::Message(m) => Some(m),
                                    _ => None,
                                })
                                .collect();
                            let node = &mut self.nodes[i];
                            node.appended.insert(lsn, msgs);
                            node.log.append(now, lsn, bytes);
                            self.drain_log(shared, i, faults_on);
                        }
                        Effect::ToShard { to, msg } => {
                            self.mesh
                                .entry((i, to.0 as usize))
                                .or_default()
                                .push_back(msg);
                        }
                        Effect::Fetch {
                            fetch,
                            conv,
                            from,
                            to,
                            limit,
                        } => {
                            self.nodes[i].log.fetch(now, fetch, conv, from, to, limit);
                            self.drain_log(shared, i, faults_on);
                        }
                        Effect::Load { conv } => {
                            shared.borrow_mut().counts.loaded += 1;
                            self.nodes[i].log.load(now, conv);
                            self.drain_log(shared, i, faults_on);
                        }
                        Effect::CommandDone { token, result } => {
                            self.commands.insert(token, result.is_ok());
                        }
                        // The sim has no push hook (offline push stays off).
                        Effect::Offline { .. } => {}
                    }
                }
                while let Some(t) = self.nodes[i].shard.poll_transmit() {
                    moved = true;
                    let Some(&key) = self.by_id.get(&(i, t.conn)) else {
                        continue;
                    };
                    let n: usize = t.chunks.iter().map(|b| b.len()).sum();
                    let mut chunks = t.chunks;
                    if planted == Some(Planted::NotifyDropped) {
                        if let Some(kept) = drop_notifies(&chunks) {
                            shared
                                .borrow_mut()
                                .event(format!("planted: conn {key} Notify dropped"));
                            chunks = vec![kept];
                        }
                    }
                    if planted == Some(Planted::SyncReplaySkip) {
                        let c = self.conns.get_mut(&key).expect("mapped");
                        if !c.skipped {
                            if let Some(kept) = drop_deliver_before_sync_done(&chunks) {
                                c.skipped = true;
                                shared
                                    .borrow_mut()
                                    .event(format!("planted: conn {key} replay Deliver dropped"));
                                chunks = vec![kept];
                            }
                        }
                    }
                    let c = if t.close {
                        self.by_id.remove(&(i, t.conn));
                        self.conns.remove(&key)
                    } else {
                        self.conns.get(&key).map(|c| Conn {
                            shard: c.shard,
                            id: c.id,
                            tx: c.tx.clone(),
                            skipped: c.skipped,
                        })
                    };
                    if let Some(c) = c {
                        let _ =
                            c.tx.send(WriteCmd::Data(chunks, if t.close { 0 } else { n }));
                        if t.close {
                            let _ = c.tx.send(WriteCmd::Close);
                        }
                    }
                }
            }
            // Shard pairs in a seeded order; a held pair waits, keeping its FIFO order.
            let mut pairs: Vec<(usize, usize)> = self
                .mesh
                .iter()
                .filter(|(_, q)| !q.is_empty())
                .map(|(p, _)| *p)
                .collect();
            for k in (1..pairs.len()).rev() {
                let j = self.rng.range(0, k as u64 + 1) as usize;
                pairs.swap(k, j);
            }
            for p in pairs {
                if self.held_until.get(&p).is_some_and(|&t| t > ms) {
                    continue;
                }
                if faults_on && self.rng.chance(mesh_delay) {
                    let d = self.rng.range(1, 50);
                    self.held_until.insert(p, ms + d);
                    let mut sh = shared.borrow_mut();
                    sh.counts.mesh += 1;
                    sh.event(format!("fault: shard pair {p:?} held {d}ms"));
                    continue;
                }
                let msgs: Vec<ShardMsg> =
                    self.mesh.get_mut(&p).expect("listed").drain(..).collect();
                for m in msgs {
                    moved = true;
                    self.nodes[p.1].shard.handle_shard_msg(now, m);
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// Hands shard `i`'s log events to its shard (all of them, before anything else
    /// reaches the engine), and performs the engine's new operations on the disk, to be
    /// reported at a later tick.
    fn drain_log(&mut self, shared: &Rc<RefCell<Shared>>, i: usize, faults_on: bool) {
        let now = core_now();
        while let Some(event) = self.nodes[i].log.poll_event() {
            if self.frozen {
                return;
            }
            let node = &mut self.nodes[i];
            match event {
                LogEvent::Durable(lsn) => {
                    shared
                        .borrow_mut()
                        .event(format!("log: shard {i} durable to lsn {}", lsn.0));
                    let rest = node.appended.split_off(&Lsn(lsn.0 + 1));
                    let durable = std::mem::replace(&mut node.appended, rest);
                    let msgs: Vec<StoredMessage> = durable.into_values().flatten().collect();
                    shared.borrow_mut().observe_durable(i, &msgs);
                    if self.at_crash_point(shared, CrashPoint::AfterDurable) {
                        // Durable, but neither Acked nor delivered.
                        return;
                    }
                    self.nodes[i].shard.handle_durable(now, lsn);
                }
                LogEvent::Failed => {
                    let failed: Vec<u64> = node.appended.keys().map(|l| l.0).collect();
                    shared
                        .borrow_mut()
                        .event(format!("log: shard {i} failed appends {failed:?}"));
                    node.appended.clear();
                    node.shard.handle_log_failed(now);
                }
                LogEvent::Fetched { fetch, result } => {
                    if result.is_err() {
                        shared.borrow_mut().counts.read_failed += 1;
                    }
                    node.shard.handle_fetched(now, fetch, result);
                }
                LogEvent::Loaded { conv, result } => node.shard.handle_loaded(now, conv, result),
                LogEvent::CheckpointDue => node.shard.handle_checkpoint_due(now),
                LogEvent::Stopped(e) => {
                    let mut sh = shared.borrow_mut();
                    sh.oracle
                        .violations
                        .push(format!("recovery: shard {i}'s log stopped: {e}"));
                    self.frozen = true;
                    return;
                }
                LogEvent::Recovered(_) | LogEvent::Closed => {
                    unreachable!("the sim's engines recover at boot and are never closed")
                }
            }
        }
        let sync_fail = shared.borrow().rates.disk_fail;
        while let Some(io) = self.nodes[i].log.poll_io() {
            let write = matches!(
                io.op,
                Op::Write {
                    file: imgate_core::log_engine::FileId::Segment(_),
                    ..
                }
            );
            let node = &mut self.nodes[i];
            let (pending, latency) = match &io.op {
                Op::Sync(file) => {
                    let file = *file;
                    let fail = faults_on && self.rng.chance(sync_fail);
                    node.syncs_issued += 1;
                    // Syncs of one file return in the order they were issued.
                    let after = node
                        .ios
                        .iter()
                        .filter(|p| matches!(p.3, Pending::Sync { .. }))
                        .map(|p| p.0)
                        .max()
                        .unwrap_or(0);
                    let due = (self.tick + self.rng.range(1, 4)).max(after);
                    (Pending::Sync { fail, file }, due - self.tick)
                }
                Op::Write { .. } if write && node.syncs_done < node.syncs_issued => {
                    // In the page cache, not yet where a sync in flight would find it.
                    node.deferred.push_back((node.syncs_issued, io.op.clone()));
                    (Pending::Done(Ok(Completion::Done)), self.rng.range(0, 2))
                }
                Op::Read { .. } => {
                    let result = disk::perform(i, &io.op);
                    self.count_io(shared, i, &io.op, &result);
                    (Pending::Done(result), self.rng.range(0, 5))
                }
                op => {
                    let result = disk::perform(i, op);
                    self.count_io(shared, i, op, &result);
                    (Pending::Done(result), self.rng.range(0, 2))
                }
            };
            self.nodes[i]
                .ios
                .push((self.tick + latency, io.id, write, pending));
        }
    }

    /// Counts and traces what the disk did to an operation.
    fn count_io(
        &mut self,
        shared: &Rc<RefCell<Shared>>,
        i: usize,
        op: &Op,
        result: &Result<Completion, IoError>,
    ) {
        match (op, result) {
            (Op::Read { .. }, Err(_)) => shared.borrow_mut().counts.read_retry += 1,
            (_, Err(IoError::NoSpace)) => {
                let mut sh = shared.borrow_mut();
                if self.full_since.is_none() {
                    sh.counts.disk_full += 1;
                    self.full_since = Some(self.tick);
                }
                sh.event(format!("disk: shard {i} {} failed: disk full", op_name(op)));
            }
            (_, Err(e)) => {
                let mut sh = shared.borrow_mut();
                sh.counts.disk += 1;
                sh.event(format!("disk: shard {i} {} failed: {e}", op_name(op)));
            }
            _ => {}
        }
    }

    /// A sync of shard `i` takes effect now (or fails), then the writes made while it
    /// ran reach the disk; returns its result.
    fn sync_now(
        &mut self,
        shared: &Rc<RefCell<Shared>>,
        i: usize,
        file: imgate_core::log_engine::FileId,
        fail: bool,
    ) -> Result<Completion, IoError> {
        let node = &mut self.nodes[i];
        let result = if fail || std::mem::take(&mut node.writeback_error) {
            // fdatasync returned an error (the seed's, or a failed writeback): nothing it
            // covered counts as durable.
            let mut sh = shared.borrow_mut();
            sh.counts.disk += 1;
            sh.event(format!("fault: shard {i} log sync failed"));
            Err(IoError::Io)
        } else {
            disk::perform(i, &Op::Sync(file))
        };
        self.nodes[i].syncs_done += 1;
        loop {
            let node = &mut self.nodes[i];
            let due = node
                .deferred
                .front()
                .is_some_and(|&(after, _)| after <= node.syncs_done);
            if !due {
                break;
            }
            let (_, op) = node.deferred.pop_front().expect("checked");
            let applied = disk::perform(i, &op);
            if applied.is_err() {
                self.count_io(shared, i, &op, &applied);
                self.nodes[i].writeback_error = true;
            }
        }
        result
    }

    /// Reports the operations due by this tick to their engines, in the order they are
    /// due (ties in the order they were performed).
    fn complete_io(&mut self, shared: &Rc<RefCell<Shared>>, faults_on: bool) {
        let now = core_now();
        for i in 0..self.nodes.len() {
            loop {
                if self.frozen {
                    return;
                }
                let node = &mut self.nodes[i];
                let Some(at) = node
                    .ios
                    .iter()
                    .enumerate()
                    .filter(|(_, io)| io.0 <= self.tick)
                    .min_by_key(|(_, io)| io.0)
                    .map(|(at, _)| at)
                else {
                    break;
                };
                let (_, id, write, pending) = node.ios.remove(at);
                let result = match pending {
                    Pending::Done(result) => result,
                    Pending::Sync { fail, file } => self.sync_now(shared, i, file, fail),
                };
                if write && result.is_ok() && self.at_crash_point(shared, CrashPoint::AfterAppend) {
                    // Written, not synced: the crash loses it, or tears it at a block.
                    return;
                }
                self.nodes[i].log.handle_completion(now, id, result);
                self.drain_log(shared, i, faults_on);
            }
        }
    }

    /// Disk-full seeds: a disk that stays full gets a reserve file deleted (at once once the
    /// faults stop), as an operator would free space.
    fn free_space(&mut self, shared: &Rc<RefCell<Shared>>) {
        let Some(since) = self.full_since else {
            return;
        };
        let mut sh = shared.borrow_mut();
        let (free_after_ms, reserves) = sh.rates.disk_full.unwrap_or_default();
        if sh.faults_on && self.tick < since + free_after_ms {
            return;
        }
        self.full_since = None;
        if disk::free_reserve(reserves) {
            sh.counts.freed += 1;
            sh.event("disk: a reserve file deleted".into());
        }
    }
}

/// An operation's name for the trace.
fn op_name(op: &Op) -> &'static str {
    match op {
        Op::List => "list",
        Op::Create(_) => "create",
        Op::Write { .. } => "write",
        Op::Sync(_) => "sync",
        Op::Truncate { .. } => "truncate",
        Op::Read { .. } => "read",
        Op::Remove(_) => "remove",
    }
}

/// Runs shard `i`'s log engine through recovery on the disk, each operation at once (a
/// failed read is retried by the engine). Returns what it recovered or why it refused,
/// and the events it emitted after recovering.
fn recover(
    i: usize,
    log: &mut LogEngine,
    read_retries: &mut u64,
) -> (
    Result<imgate_core::log_engine::Recovered, String>,
    Vec<LogEvent>,
) {
    let now = core_now();
    let mut recovered = None;
    let mut early = Vec::new();
    // Bounded: recovery reads and writes each file a few times at most.
    for _ in 0..1_000_000 {
        while let Some(event) = log.poll_event() {
            match event {
                LogEvent::Recovered(r) => recovered = Some(r),
                LogEvent::Stopped(e) => return (Err(e.to_string()), early),
                other => early.push(other),
            }
        }
        let Some(io) = log.poll_io() else {
            break;
        };
        let result = disk::perform(i, &io.op);
        if result.is_err() {
            *read_retries += 1;
        }
        log.handle_completion(now, io.id, result);
    }
    match recovered {
        Some(r) => (Ok(r), early),
        None => (Err("recovery did not finish".to_string()), early),
    }
}

/// The frames in `chunks`, concatenated: the bytes, and each frame's span and meta.
fn frames_of(chunks: &[Bytes]) -> (Bytes, Vec<(usize, usize, Meta)>) {
    let mut all = BytesMut::new();
    for c in chunks {
        all.extend_from_slice(c);
    }
    let whole = all.clone().freeze();
    let decoder = Decoder::new(u32::MAX);
    let mut spans = Vec::new();
    let total = all.len();
    loop {
        let start = total - all.len();
        match decoder.decode(&mut all) {
            Ok(Some(f)) => spans.push((start, total - all.len(), f.meta)),
            _ => break,
        }
    }
    (whole, spans)
}

/// `whole` without the bytes of the frames `spans` says to drop.
fn without(whole: &Bytes, spans: &[(usize, usize, Meta)], drop: &[bool]) -> Bytes {
    let mut out = BytesMut::new();
    let mut at = 0;
    for ((s, e, _), &d) in spans.iter().zip(drop) {
        if d {
            out.extend_from_slice(&whole[at..*s]);
            at = *e;
        }
    }
    out.extend_from_slice(&whole[at..]);
    out.freeze()
}

/// Planted bug (c): if `chunks` hold a SyncDone right after a Deliver, the bytes without that
/// Deliver.
fn drop_deliver_before_sync_done(chunks: &[Bytes]) -> Option<Bytes> {
    let (whole, spans) = frames_of(chunks);
    let pos = spans
        .windows(2)
        .position(|w| matches!((&w[0].2, &w[1].2), (Meta::Deliver(_), Meta::SyncDone(_))))?;
    let drop: Vec<bool> = (0..spans.len()).map(|i| i == pos).collect();
    Some(without(&whole, &spans, &drop))
}

/// Planted bug (e): `chunks` without their Notify frames, if they hold any.
fn drop_notifies(chunks: &[Bytes]) -> Option<Bytes> {
    let (whole, spans) = frames_of(chunks);
    let drop: Vec<bool> = spans
        .iter()
        .map(|(_, _, m)| matches!(m, Meta::Notify(_)))
        .collect();
    drop.contains(&true).then(|| without(&whole, &spans, &drop))
}
