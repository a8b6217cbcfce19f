//! The gateway host: every shard of the gateway in one task loop, over turmoil TCP, each
//! shard's log a file on turmoil's simulated disk ([`FsLog`]).
//!
//! Driver contract as in `core/src/shard.rs`: Append -> file write; group commit every
//! tick -> fdatasync -> `handle_durable(lsn)` when it returns (1-3 ms later); a failed write
//! or sync cuts the file to its durable length and calls `handle_log_failed`; Fetch reads
//! the durable part of the file; boot reads the file, scans it and truncates a torn tail. Shard messages travel one FIFO
//! queue per ordered pair; the loop delivers pairs in a seeded order and may hold a pair
//! back for a while (never reordering inside it).

use crate::disk::{self, FsLog, WriteError};
use crate::rng::Rng;
use crate::run::{core_now, CrashPoint, Planted, Rates, Shared, GROUP, USERS};
use bytes::{Bytes, BytesMut};
use imgate_core::auth::{KeyConfig, TokenVerifier};
use imgate_core::log::{scan, Record};
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
    log: FsLog,
    /// A write failed: later appends are not written, and once no sync is in flight the
    /// file is cut to its durable length and the engine told.
    failed: Option<WriteError>,
    /// Highest Lsn appended and not yet reported durable.
    appended: Option<Lsn>,
    /// Planted bug (a): reported durable, to be synced at this tick.
    lagging_sync_at: Option<u64>,
    /// An fdatasync in progress: the Lsn it covers and the tick it returns. A crash
    /// before then loses (or tears) what it was syncing.
    syncing: Option<(Lsn, u64, u64)>,
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
        let rng = Rng::new(sh.cfg.seed, 1000 + restarts);
        let planted = sh.cfg.planted;
        let limits = limits(&sh.rates);
        if !sh.booted {
            disk::prepare(sh.rates.reserves());
        }
        let mut nodes = Vec::new();
        for i in 0..shard_count as usize {
            let (mut log, bytes) = FsLog::open(i);
            let s = scan(&bytes);
            if s.valid_len < log.len() {
                // A torn or garbage tail (what a crash left of unsynced writes).
                sh.counts.torn += 1;
                if planted != Some(Planted::TornTailKept) {
                    log.truncate(s.valid_len);
                } else {
                    // Planted bug (i): appends go on after the garbage.
                    sh.event(format!("planted: shard {i} keeps its torn tail"));
                }
            }
            let mut records: Vec<(u64, Record)> = s.records;
            if planted == Some(Planted::SeqNotRecovered) && restarts > 0 {
                // Planted bug (d): recover from the log less its last message record.
                if let Some(pos) = records
                    .iter()
                    .rposition(|(_, r)| matches!(r, Record::Message(_)))
                {
                    let off = records[pos].0;
                    records.truncate(pos);
                    log.truncate(off);
                }
            }
            let records: Vec<Record> = records.into_iter().map(|(_, r)| r).collect();
            let id = ShardId(i as u16);
            let before = sh.violation_count();
            sh.oracle_len[i] = sh.oracle_len[i].min(log.len() as usize);
            sh.oracle.check_recovered(
                i as u16,
                |c| Shard::owner_of(c, shard_count) == id,
                &records,
            );
            sh.note_violations(before);
            // What a crash left of the tail (whole records of an interrupted sync) is
            // durable from now on.
            sh.observe_durable(i, &mut log);
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
            let n = records.len();
            if let Err(e) = shard.recover(records) {
                let v = format!("I3: shard {i} refused its log: {e}");
                sh.oracle.violations.push(v);
            }
            sh.event(format!("boot: shard {i} recovered {n} records"));
            nodes.push(Node {
                shard,
                log,
                failed: None,
                appended: None,
                lagging_sync_at: None,
                syncing: None,
            });
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
            frozen: false,
            full_since: None,
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
                gw.commit(shared, false);
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
        self.commit(shared, faults_on);
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
            let mut moved = false;
            for i in 0..self.nodes.len() {
                while let Some(effect) = self.nodes[i].shard.poll_effect() {
                    moved = true;
                    match effect {
                        Effect::Append { lsn, bytes } => {
                            let node = &mut self.nodes[i];
                            if node.failed.is_some() {
                                // Failed with the write before it, as it must be.
                                continue;
                            }
                            match node.log.append(&bytes) {
                                Ok(()) => node.appended = Some(lsn),
                                Err(e) => {
                                    node.failed = Some(e);
                                    let mut sh = shared.borrow_mut();
                                    match e {
                                        WriteError::Io => sh.counts.disk += 1,
                                        WriteError::Full if self.full_since.is_none() => {
                                            sh.counts.disk_full += 1;
                                            self.full_since = Some(self.tick);
                                        }
                                        WriteError::Full => {}
                                    }
                                    sh.event(format!("disk: shard {i} log write failed: {e:?}"));
                                }
                            }
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
                        } => {
                            let msgs = self.nodes[i].log.durable_messages(conv, from, to);
                            self.nodes[i].shard.handle_fetched(now, fetch, Ok(msgs));
                        }
                        Effect::Load { conv } => {
                            shared.borrow_mut().counts.loaded += 1;
                            let last = self.nodes[i].log.last_durable_seq(conv);
                            self.nodes[i].shard.handle_loaded(now, conv, Ok(last));
                        }
                        Effect::CommandDone { token, result } => {
                            self.commands.insert(token, result.is_ok());
                        }
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

    /// Group commit: one sync for every shard with appends, or a failed write.
    fn commit(&mut self, shared: &Rc<RefCell<Shared>>, faults_on: bool) {
        let now = core_now();
        let (sync_fail, planted) = {
            let sh = shared.borrow();
            (sh.rates.disk_fail, sh.cfg.planted)
        };
        for i in 0..self.nodes.len() {
            if let Some(at) = self.nodes[i].lagging_sync_at {
                if self.tick >= at {
                    self.nodes[i].lagging_sync_at = None;
                    let node = &mut self.nodes[i];
                    let len = node.log.len();
                    node.log.sync_to(len);
                    shared.borrow_mut().observe_durable(i, &mut node.log);
                }
            }
            if let Some((lsn, at, len)) = self.nodes[i].syncing {
                if self.tick < at {
                    continue;
                }
                self.nodes[i].syncing = None;
                if faults_on && self.rng.chance(sync_fail) {
                    // fdatasync returned an error: nothing it covered counts as durable.
                    let mut sh = shared.borrow_mut();
                    sh.counts.disk += 1;
                    sh.event(format!("fault: shard {i} log sync failed"));
                    self.nodes[i].failed = Some(WriteError::Io);
                } else {
                    // fdatasync returned: what was written when it started is durable (and
                    // maybe more, which the engine hears of with the next sync).
                    let node = &mut self.nodes[i];
                    node.log.sync_to(len);
                    shared.borrow_mut().observe_durable(i, &mut node.log);
                    if self.at_crash_point(shared, CrashPoint::AfterDurable) {
                        // Durable, but neither Acked nor delivered.
                        return;
                    }
                    self.nodes[i].shard.handle_durable(now, lsn);
                }
            }
            if self.nodes[i].failed.take().is_some() {
                // No sync in flight: cut the file back to its durable length, then tell the
                // engine, which fails every record that is not durable.
                let node = &mut self.nodes[i];
                let durable = node.log.durable_len();
                if planted != Some(Planted::NoTruncateOnFailure) {
                    node.log.truncate(durable);
                }
                // Planted bug (h) skips the cut: the records the engine fails stay.
                node.appended = None;
                node.shard.handle_log_failed(now);
                continue;
            }
            if self.nodes[i].appended.is_some()
                && self.at_crash_point(shared, CrashPoint::AfterAppend)
            {
                // Written, not synced: the crash loses it, or tears it at a block.
                return;
            }
            let Some(lsn) = self.nodes[i].appended.take() else {
                continue;
            };
            if planted == Some(Planted::AckBeforeDurable) && self.nodes[i].lagging_sync_at.is_none()
            {
                // Planted bug (a): report durable now, sync 50 ticks later.
                self.nodes[i].lagging_sync_at = Some(self.tick + 50);
                self.nodes[i].shard.handle_durable(now, lsn);
                continue;
            }
            // The sync takes 1-3 ms (ticks); appends meanwhile wait for the next one.
            let latency = self.rng.range(1, 4);
            let len = self.nodes[i].log.len();
            self.nodes[i].syncing = Some((lsn, self.tick + latency, len));
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
