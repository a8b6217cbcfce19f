//! A one-thread world of shard engines on fake time: an in-memory log per shard, FIFO
//! queues between shards, and raw connections whose received frames tests decode.
//!
//! The harness is a driver like the gateway and the sim: it moves bytes and time and
//! nothing else. Logs become durable only when the test says so (or at every step with
//! `auto_sync`), which is how I1 and I5 are observed. Log reads (`Fetch`) are answered at
//! once from the log, or held (`hold_fetches`) until the test answers them, with the log
//! or with anything it likes (a failure, an answer as retention would give).
#![allow(dead_code)]

use bytes::{Bytes, BytesMut};
use imgate_core::auth::{KeyConfig, SigningKey, TokenSigner, TokenVerifier};
use imgate_core::log::{scan, MemLog, Record, StoredMessage};
use imgate_core::mesh::{Command, CommandError, ConnId, ShardId, ShardMsg};
use imgate_core::proto::meta::{self, Meta};
use imgate_core::proto::{ClientMsgId, ConvId, Decoder, DeviceId, Encoder, Seq, UserId};
use imgate_core::shard::{Effect, Lsn, RecoveryError, Shard, ShardConfig};
use imgate_core::{Instant, Limits};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

pub const SECRET: &[u8] = b"an imgate test secret of 32+ bytes!!";

/// The fake clock starts here (2026-01-01), so token expiry works in real Unix time.
pub const EPOCH: Instant = Instant::from_millis(1_767_225_600_000);

pub struct Node {
    pub shard: Shard,
    pub log: MemLog,
    /// The highest Lsn appended to `log` and the log length right after it.
    pub appended: Option<(Lsn, u64)>,
}

/// One raw client connection as the test sees it.
pub struct Conn {
    pub shard: u16,
    pub id: ConnId,
    /// Bytes the gateway wrote that the test has not decoded yet.
    pub rx: BytesMut,
    /// Frames decoded so far and not yet taken by the test.
    pub inbox: VecDeque<(Meta, Bytes)>,
    /// Whether the gateway closed it.
    pub closed: bool,
    /// Whether the client reads; if not, transmits are held (never reported written)
    /// until the gateway closes the connection, when the client reads them all.
    pub reading: bool,
    pub held: Vec<Bytes>,
    /// Leave received bytes in `rx` undecoded (a client engine reads them).
    pub raw: bool,
}

/// A log read the harness holds for the test to answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldFetch {
    pub shard: usize,
    pub fetch: u64,
    pub conv: ConvId,
    pub from: Seq,
    pub to: Seq,
    pub limit: u32,
}

pub struct World {
    pub now: Instant,
    pub nodes: Vec<Node>,
    pub limits: Limits,
    /// In flight between shards; one FIFO keeps every pair in order.
    pub mesh: VecDeque<(u16, ShardMsg)>,
    pub conns: Vec<Conn>,
    pub auto_sync: bool,
    pub commands: BTreeMap<u64, Result<(), CommandError>>,
    /// Hold log reads in `held_fetches` instead of answering them at once.
    pub hold_fetches: bool,
    pub held_fetches: VecDeque<HeldFetch>,
    /// Offline pushes the shards asked for: (user, conv, seq, sender).
    pub offline: Vec<(UserId, ConvId, Seq, UserId)>,
    encoder: Encoder,
    signer: TokenSigner,
}

pub fn verifier(limits: &Limits) -> TokenVerifier {
    TokenVerifier::new(
        &KeyConfig::Hs256 {
            secret: SECRET.to_vec(),
        },
        limits.token_leeway,
        limits.token_bytes_max,
    )
    .expect("test key")
}

impl World {
    pub fn new(shards: u16, limits: Limits) -> World {
        let nodes = (0..shards)
            .map(|i| Node {
                shard: Shard::new(
                    ShardConfig {
                        id: ShardId(i),
                        shard_count: shards,
                        limits: limits.clone(),
                        hash_seed: 0,
                    },
                    verifier(&limits),
                ),
                log: MemLog::new(),
                appended: None,
            })
            .collect();
        World {
            now: EPOCH,
            nodes,
            limits,
            mesh: VecDeque::new(),
            conns: Vec::new(),
            auto_sync: true,
            commands: BTreeMap::new(),
            hold_fetches: false,
            held_fetches: VecDeque::new(),
            offline: Vec::new(),
            encoder: Encoder::new(),
            signer: TokenSigner::new(&SigningKey::Hs256 {
                secret: SECRET.to_vec(),
            })
            .expect("test key"),
        }
    }

    pub fn token(&self, user: u64, device: u32) -> String {
        self.signer.mint(
            UserId(user),
            DeviceId(device),
            self.now + Duration::from_secs(3600),
        )
    }

    pub fn token_expiring(&self, user: u64, device: u32, at: Instant) -> String {
        self.signer.mint(UserId(user), DeviceId(device), at)
    }

    /// Opens a connection on `shard`; returns its index in `conns`.
    pub fn open(&mut self, shard: u16) -> usize {
        let id = self.nodes[shard as usize]
            .shard
            .handle_open(self.now)
            .expect("shard accepts");
        self.conns.push(Conn {
            shard,
            id,
            rx: BytesMut::new(),
            inbox: VecDeque::new(),
            closed: false,
            reading: true,
            held: Vec::new(),
            raw: false,
        });
        self.run();
        self.conns.len() - 1
    }

    /// Opens a connection and authenticates it as (user, device); drains the AuthOk.
    pub fn login(&mut self, shard: u16, user: u64, device: u32) -> usize {
        let c = self.open(shard);
        let token = self.token(user, device);
        self.frame(c, Meta::Auth(meta::Auth { token }), &[]);
        match self.take(c).first() {
            Some((Meta::AuthOk(_), _)) => c,
            other => panic!("expected AuthOk, got {other:?}"),
        }
    }

    /// Writes raw bytes to the gateway on connection `c`.
    pub fn write(&mut self, c: usize, bytes: &[u8]) {
        let conn = &self.conns[c];
        assert!(!conn.closed, "connection {c} is closed");
        let mut buf = BytesMut::from(bytes);
        self.nodes[conn.shard as usize]
            .shard
            .handle_bytes(self.now, conn.id, &mut buf);
        self.run();
    }

    /// Sends one frame on connection `c`.
    pub fn frame(&mut self, c: usize, meta: Meta, payload: &[u8]) {
        let bytes = self.encoder.encode_to_bytes(&meta, payload);
        self.write(c, &bytes);
    }

    /// Sends a Sync for one conversation from its cursor `seq`.
    pub fn sync_from(&mut self, c: usize, req: u32, conv: ConvId, seq: Seq) {
        let cursors = vec![meta::Cursor { conv, seq }];
        self.frame(c, Meta::Sync(meta::Sync { req, cursors }), &[]);
    }

    /// Sends a message; returns its client_msg_id.
    pub fn send(&mut self, c: usize, req: u32, conv: ConvId, payload: &[u8]) -> ClientMsgId {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&req.to_le_bytes());
        id[4..8].copy_from_slice(&(c as u32).to_le_bytes());
        let id = ClientMsgId(id);
        self.send_with_id(c, req, conv, id, payload);
        id
    }

    pub fn send_with_id(
        &mut self,
        c: usize,
        req: u32,
        conv: ConvId,
        id: ClientMsgId,
        payload: &[u8],
    ) {
        self.frame(
            c,
            Meta::Send(meta::Send {
                req,
                client_msg_id: id,
                conv,
                priority: meta::Priority::Normal,
            }),
            payload,
        );
    }

    /// Frames received on `c` since the last take.
    pub fn take(&mut self, c: usize) -> Vec<(Meta, Bytes)> {
        self.conns[c].inbox.drain(..).collect()
    }

    /// Lets a connection that stopped reading (`reading = false`) read again: what was
    /// held for it arrives, and the shard hears that it was written.
    pub fn resume_reading(&mut self, c: usize) {
        let conn = &mut self.conns[c];
        conn.reading = true;
        let held: Vec<Bytes> = conn.held.drain(..).collect();
        let n: usize = held.iter().map(|b| b.len()).sum();
        for chunk in held {
            conn.rx.extend_from_slice(&chunk);
        }
        let decoder = Decoder::new(u32::MAX);
        while let Some(f) = decoder.decode(&mut conn.rx).expect("gateway frames decode") {
            conn.inbox.push_back((f.meta, f.payload));
        }
        let (shard, id) = (conn.shard as usize, conn.id);
        if !conn.closed {
            self.nodes[shard].shard.handle_written(self.now, id, n);
        }
        self.run();
    }

    /// Bytes held for a connection that is not reading.
    pub fn held_bytes(&self, c: usize) -> usize {
        self.conns[c].held.iter().map(|b| b.len()).sum()
    }

    /// Closes `c` from the client side.
    pub fn hang_up(&mut self, c: usize) {
        let conn = &mut self.conns[c];
        if !conn.closed {
            conn.closed = true;
            self.nodes[conn.shard as usize]
                .shard
                .handle_closed(self.now, conn.id);
        }
        self.run();
    }

    /// Runs a group command on shard 0 and returns its outcome.
    pub fn command(&mut self, command: Command) -> Result<(), CommandError> {
        let token = self.commands.len() as u64 + 1000;
        self.nodes[0].shard.handle_command(self.now, command, token);
        self.run();
        self.commands.remove(&token).expect("command finished")
    }

    /// Moves time forward and fires timers.
    pub fn advance(&mut self, by: Duration) {
        self.now = self.now + by;
        for node in &mut self.nodes {
            node.shard.handle_timeout(self.now);
        }
        self.run();
    }

    /// Makes every shard's appended records durable and tells the shards.
    pub fn sync(&mut self) {
        for node in &mut self.nodes {
            if let Some((lsn, _)) = node.appended.take() {
                node.log.sync();
                node.shard.handle_durable(self.now, lsn);
            }
        }
        self.run_inner(false);
    }

    /// Moves effects, shard messages and bytes until nothing moves.
    pub fn run(&mut self) {
        self.run_inner(self.auto_sync);
    }

    fn run_inner(&mut self, sync: bool) {
        loop {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                while let Some(effect) = self.nodes[i].shard.poll_effect() {
                    moved = true;
                    match effect {
                        Effect::Append { lsn, bytes } => {
                            let node = &mut self.nodes[i];
                            let len = node.log.append(&bytes);
                            node.appended = Some((lsn, len));
                        }
                        Effect::ToShard { to, msg } => self.mesh.push_back((to.0, msg)),
                        Effect::CommandDone { token, result } => {
                            self.commands.insert(token, result);
                        }
                        Effect::Offline {
                            users,
                            conv,
                            seq,
                            sender,
                            ..
                        } => {
                            for user in users {
                                self.offline.push((user, conv, seq, sender));
                            }
                        }
                        Effect::Fetch {
                            fetch,
                            conv,
                            from,
                            to,
                            limit,
                        } => {
                            let held = HeldFetch {
                                shard: i,
                                fetch,
                                conv,
                                from,
                                to,
                                limit,
                            };
                            if self.hold_fetches {
                                self.held_fetches.push_back(held);
                            } else {
                                let msgs = self.nodes[i].log.fetch(conv, from, to, limit);
                                self.nodes[i]
                                    .shard
                                    .handle_fetched(self.now, fetch, Ok(msgs));
                            }
                        }
                        Effect::Load { conv } => {
                            let node = &mut self.nodes[i];
                            let last = node.log.last_durable_seq(conv);
                            node.shard.handle_loaded(self.now, conv, Ok(last));
                        }
                    }
                }
                while let Some(t) = self.nodes[i].shard.poll_transmit() {
                    moved = true;
                    let Some(c) = self
                        .conns
                        .iter_mut()
                        .find(|c| c.shard == i as u16 && c.id == t.conn && !c.closed)
                    else {
                        continue;
                    };
                    let n: usize = t.chunks.iter().map(|b| b.len()).sum();
                    if !c.reading && !t.close {
                        c.held.extend(t.chunks);
                        continue;
                    }
                    {
                        for chunk in c.held.drain(..).chain(t.chunks) {
                            c.rx.extend_from_slice(&chunk);
                        }
                        let decoder = Decoder::new(u32::MAX);
                        while !c.raw {
                            let Some(f) = decoder.decode(&mut c.rx).expect("gateway frames decode")
                            else {
                                break;
                            };
                            c.inbox.push_back((f.meta, f.payload));
                        }
                    }
                    if t.close {
                        c.closed = true;
                    } else if c.reading {
                        let id = c.id;
                        self.nodes[i].shard.handle_written(self.now, id, n);
                    }
                }
            }
            while let Some((to, msg)) = self.mesh.pop_front() {
                moved = true;
                self.nodes[to as usize]
                    .shard
                    .handle_shard_msg(self.now, msg);
            }
            if sync && self.nodes.iter().any(|n| n.appended.is_some()) {
                moved = true;
                for node in &mut self.nodes {
                    if let Some((lsn, _)) = node.appended.take() {
                        node.log.sync();
                        node.shard.handle_durable(self.now, lsn);
                    }
                }
            }
            if !moved {
                break;
            }
        }
    }

    /// Answers the oldest held log read with `result`; returns it (`None` if none is held).
    pub fn answer_fetch(&mut self, result: Result<Vec<StoredMessage>, ()>) -> Option<HeldFetch> {
        let held = self.held_fetches.pop_front()?;
        self.nodes[held.shard]
            .shard
            .handle_fetched(self.now, held.fetch, result);
        self.run();
        Some(held)
    }

    /// What the log answers to a held read.
    pub fn read_log(&self, held: &HeldFetch) -> Vec<StoredMessage> {
        self.nodes[held.shard]
            .log
            .fetch(held.conv, held.from, held.to, held.limit)
    }

    /// Answers every held read, and those they lead to, from the logs (`ok`) or with a
    /// failure; returns how many were answered.
    pub fn answer_fetches(&mut self, ok: bool) -> usize {
        let mut answered = 0;
        while let Some(held) = self.held_fetches.front().copied() {
            let result = if ok {
                Ok(self.read_log(&held))
            } else {
                Err(())
            };
            self.answer_fetch(result);
            answered += 1;
            // A shard that asks again at once for what failed would never let this end.
            assert!(answered < 100_000, "log reads never settle");
        }
        answered
    }

    /// Tells `shard` a checkpoint is due.
    pub fn checkpoint(&mut self, shard: usize) {
        self.nodes[shard].shard.handle_checkpoint_due(self.now);
        self.run();
    }

    /// Power loss on every shard: unsynced log bytes are gone, connections drop, and each
    /// shard recovers from its log.
    pub fn crash_all(&mut self) {
        for c in &mut self.conns {
            c.closed = true;
        }
        self.mesh.clear();
        // Reads in flight die with the process.
        self.held_fetches.clear();
        let count = self.nodes.len() as u16;
        for (i, node) in self.nodes.iter_mut().enumerate() {
            node.log.crash();
            node.appended = None;
            let scan = scan(node.log.bytes());
            node.log.truncate(scan.valid_len);
            let mut shard = Shard::new(
                ShardConfig {
                    id: ShardId(i as u16),
                    shard_count: count,
                    limits: self.limits.clone(),
                    hash_seed: 0,
                },
                verifier(&self.limits),
            );
            shard
                .recover(scan.records.into_iter().map(|(_, r)| r))
                .expect("recovery");
            node.shard = shard;
        }
    }

    /// A new shard `i` as this world configures it, not yet recovered.
    pub fn fresh_shard(&self, i: usize) -> Shard {
        Shard::new(
            ShardConfig {
                id: ShardId(i as u16),
                shard_count: self.nodes.len() as u16,
                limits: self.limits.clone(),
                hash_seed: 0,
            },
            verifier(&self.limits),
        )
    }

    /// Every record in shard `i`'s log, durable or not.
    pub fn records(&self, i: usize) -> Vec<Record> {
        scan(self.nodes[i].log.bytes())
            .records
            .into_iter()
            .map(|(_, r)| r)
            .collect()
    }

    /// Restarts shard `i` from `records` (a part of its log, say from a checkpoint on)
    /// instead of its whole log, which stays as it is to answer reads. Its connections
    /// drop, and what was in flight to it is lost. On an error the old shard stays.
    pub fn restart_from(&mut self, i: usize, records: Vec<Record>) -> Result<(), RecoveryError> {
        let mut shard = self.fresh_shard(i);
        shard.recover(records)?;
        for c in self.conns.iter_mut().filter(|c| c.shard as usize == i) {
            c.closed = true;
        }
        self.mesh.retain(|(to, _)| *to as usize != i);
        self.held_fetches.retain(|h| h.shard != i);
        let node = &mut self.nodes[i];
        node.log.sync();
        node.appended = None;
        node.shard = shard;
        self.run();
        Ok(())
    }

    /// Every message record in shard logs, durable or not.
    pub fn stored(&self) -> Vec<(ConvId, Seq, ClientMsgId)> {
        let mut out = Vec::new();
        for node in &self.nodes {
            for (_, r) in scan(node.log.bytes()).records {
                if let Record::Message(m) = r {
                    out.push((m.conv, m.seq, m.client_msg_id));
                }
            }
        }
        out
    }

    /// A direct conversation whose owner is `shard` (for tests that need one).
    pub fn direct_owned_by(&self, shard: u16, a: u64, from_b: u64) -> (ConvId, u64) {
        let count = self.nodes.len() as u16;
        (from_b..)
            .map(|b| (ConvId::direct(UserId(a), UserId(b)), b))
            .find(|(c, _)| Shard::owner_of(*c, count) == ShardId(shard))
            .expect("some conversation hashes to every shard")
    }
}

/// The Delivers among frames, as (conv, seq, payload).
pub fn delivers(frames: &[(Meta, Bytes)]) -> Vec<(ConvId, Seq, Bytes)> {
    frames
        .iter()
        .filter_map(|(m, p)| match m {
            Meta::Deliver(d) => Some((d.conv, d.seq, p.clone())),
            _ => None,
        })
        .collect()
}

/// The Acks among frames, as (req, seq).
pub fn acks(frames: &[(Meta, Bytes)]) -> Vec<(u32, Seq)> {
    frames
        .iter()
        .filter_map(|(m, _)| match m {
            Meta::Ack(a) => Some((a.req, a.seq)),
            _ => None,
        })
        .collect()
}

/// The error code of the last Error frame, if any.
pub fn error_code(frames: &[(Meta, Bytes)]) -> Option<imgate_core::proto::ErrorCode> {
    frames.iter().rev().find_map(|(m, _)| match m {
        Meta::Error(e) => Some(e.code),
        _ => None,
    })
}
