//! Loom models of cross-shard routing while a device reconnects to another shard, run on
//! the real shard engines.
//!
//! Each model is three `imgate_core::shard::Shard`s on three loom threads. A thread owns its
//! shard, an in-memory log and the client side of its connections, and drives the shard
//! like the gateway does: an input (a message from another shard or bytes from a client)
//! goes to the matching `handle_*`, then `poll_effect` and `poll_transmit` are drained.
//! Appends are synced and reported durable at once: durability is not what these models
//! explore (the sim does that), message order between shards is.
//!
//! The mesh holds one FIFO queue per ordered pair of shards, as the engine requires. All
//! queues sit behind one loom `Mutex` with a `Condvar` for wake-ups, and every effect is
//! pushed in its own critical section: what the protocol can observe is the order in which
//! each shard takes messages from its peers and its clients, and loom explores every such
//! order (up to the preemption bound) exactly as it would with one lock per pair, with
//! fewer scheduling points. A receiver takes the oldest head among its queues.
//!
//! Termination: `in_flight` counts messages queued or being handled and client inputs not
//! yet fed. Work is retired only after everything it produced was queued, so once it is
//! zero nothing can move again and every thread returns.
//!
//! Faults can be planted in the driver (never in core) to show that every check fails when
//! the driver breaks a guarantee the engine relies on: `planted_*` tests expect the model
//! to report them.

use bytes::{Bytes, BytesMut};
use imgate_core::auth::{KeyConfig, SigningKey, TokenSigner, TokenVerifier};
use imgate_core::log::MemLog;
use imgate_core::mesh::{ConnId, ShardId, ShardMsg};
use imgate_core::proto::meta::{self, Meta};
use imgate_core::proto::{ClientMsgId, ConvId, Decoder, DeviceId, Encoder, ErrorCode, Seq, UserId};
use imgate_core::shard::{Effect, Shard, ShardConfig};
use imgate_core::{Instant, Limits};
use loom::sync::{Arc, Condvar, Mutex};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const SHARDS: u16 = 3;
const SECRET: &[u8] = b"an imgate loom test secret of 32+ bytes";
/// The fake clock stands still here (2026-01-01): no deadline fires in these models.
const NOW: Instant = Instant::from_millis(1_767_225_600_000);
/// Preemptions loom explores per interleaving of the takeover model: 2 explores 4,624
/// interleavings in about 3 s in debug (3 explores 62,612 in about 46 s).
const TAKEOVER_PREEMPTIONS: usize = 2;
/// Preemptions loom explores per interleaving of the reconnect model: 2 explores tens of
/// thousands of interleavings (41k-74k measured) in about 2.5 min in debug on the
/// 2-core build machine. Set
/// `LOOM_MAX_PREEMPTIONS` to explore deeper.
const RECONNECT_PREEMPTIONS: usize = 2;
/// Scheduling points of one interleaving; loom's default (1,000) is too few for three
/// engines exchanging a dozen messages.
const BRANCHES_MAX: usize = 20_000;
/// Stack of each loom thread. 8 MiB, a real thread's default.
const STACK_BYTES: usize = 8 << 20;

/// `default`, unless `LOOM_MAX_PREEMPTIONS` asks for another bound (to explore deeper).
fn preemption_bound(default: usize) -> usize {
    std::env::var("LOOM_MAX_PREEMPTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A bug a driver could have, planted to show the checks catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    /// Pair queues hand out the newest message first (not FIFO).
    LifoQueues,
    /// Kick messages are lost.
    DropKicks,
    /// The Deliver of seq 3 to shard 1 is lost.
    DropDeliverOfSeq3ToShard1,
    /// The writer of B's new connection puts each batch of bytes before the previous one
    /// on the socket.
    ReverseWritesToNewConnection,
}

// ---------------------------------------------------------------------------------------
// The mesh
// ---------------------------------------------------------------------------------------

struct MeshState {
    /// `queues[from * SHARDS + to]`: FIFO per ordered pair; each entry carries its push
    /// stamp so a receiver can take the oldest head.
    queues: Vec<VecDeque<(u64, ShardMsg)>>,
    stamp: u64,
    /// Messages queued or being handled, and client inputs not yet fed.
    in_flight: usize,
}

struct Mesh {
    state: Mutex<MeshState>,
    /// One per receiving shard: woken when a message is queued to it, or when nothing is
    /// in flight any more. Waking only the receiver keeps the interleavings loom explores
    /// to the ones that matter.
    moved: Vec<Condvar>,
    fault: Fault,
}

impl Mesh {
    fn new(fault: Fault) -> Mesh {
        let pairs = usize::from(SHARDS) * usize::from(SHARDS);
        Mesh {
            state: Mutex::new(MeshState {
                queues: (0..pairs).map(|_| VecDeque::new()).collect(),
                stamp: 0,
                in_flight: 0,
            }),
            moved: (0..SHARDS).map(|_| Condvar::new()).collect(),
            fault,
        }
    }

    fn is_lost(&self, to: u16, msg: &ShardMsg) -> bool {
        match (self.fault, msg) {
            (Fault::DropKicks, ShardMsg::Kick { .. }) => true,
            (Fault::DropDeliverOfSeq3ToShard1, ShardMsg::Deliver { msgs, .. }) => {
                to == 1 && msgs.iter().any(|m| m.seq == Seq(3))
            }
            _ => false,
        }
    }

    /// Queues `msg` from `from` to `to`, in its own critical section.
    fn push(&self, from: u16, to: u16, msg: ShardMsg) {
        if self.is_lost(to, &msg) {
            return;
        }
        let mut st = self.state.lock().expect("mesh lock");
        st.stamp += 1;
        let stamp = st.stamp;
        st.queues[usize::from(from * SHARDS + to)].push_back((stamp, msg));
        st.in_flight += 1;
        drop(st);
        self.moved[usize::from(to)].notify_one();
    }

    fn add_inputs(&self, n: usize) {
        self.state.lock().expect("mesh lock").in_flight += n;
    }

    fn in_flight(&self) -> usize {
        self.state.lock().expect("mesh lock").in_flight
    }

    /// Retires `done` finished pieces of work and takes the next one for shard `me`: the
    /// oldest message queued to it, else its next client input, else waits. `None` once
    /// nothing is in flight anywhere.
    fn next_work(&self, me: u16, done: usize, inputs: &mut VecDeque<Input>) -> Option<Work> {
        let mut st = self.state.lock().expect("mesh lock");
        st.in_flight -= done;
        if done > 0 && st.in_flight == 0 {
            self.moved.iter().for_each(Condvar::notify_one);
        }
        loop {
            if let Some(msg) = self.pop(&mut st, me) {
                return Some(Work::Msg(msg));
            }
            if let Some(input) = inputs.pop_front() {
                return Some(Work::Input(input));
            }
            if st.in_flight == 0 {
                return None;
            }
            st = self.moved[usize::from(me)].wait(st).expect("mesh lock");
        }
    }

    /// Without waiting: the oldest message queued to `me` (for single-threaded set-up).
    fn try_pop(&self, me: u16) -> Option<ShardMsg> {
        let mut st = self.state.lock().expect("mesh lock");
        self.pop(&mut st, me)
    }

    fn pop(&self, st: &mut MeshState, me: u16) -> Option<ShardMsg> {
        let from = (0..SHARDS)
            .filter_map(|from| {
                let q = &st.queues[usize::from(from * SHARDS + me)];
                q.front().map(|(stamp, _)| (*stamp, from))
            })
            .min()
            .map(|(_, from)| from)?;
        let q = &mut st.queues[usize::from(from * SHARDS + me)];
        let entry = if self.fault == Fault::LifoQueues {
            q.pop_back()
        } else {
            q.pop_front()
        };
        entry.map(|(_, msg)| msg)
    }
}

// ---------------------------------------------------------------------------------------
// One shard and its driver
// ---------------------------------------------------------------------------------------

/// What a client does on a shard.
#[derive(Clone, Debug)]
enum Input {
    /// Writes bytes on an open connection (index into `Node::conns`).
    Write { conn: usize, bytes: Bytes },
    /// Opens a new connection and writes its first bytes.
    Connect { bytes: Bytes },
}

enum Work {
    Msg(ShardMsg),
    Input(Input),
}

/// The client side of one connection: the bytes the gateway wrote, batch by batch.
struct ClientConn {
    id: ConnId,
    batches: Vec<Vec<Bytes>>,
    closed: bool,
}

struct Node {
    id: u16,
    shard: Shard,
    log: MemLog,
    conns: Vec<ClientConn>,
}

impl Node {
    fn new(id: u16) -> Node {
        let limits = Limits::default();
        let verifier = TokenVerifier::new(
            &KeyConfig::Hs256 {
                secret: SECRET.to_vec(),
            },
            limits.token_leeway,
            limits.token_bytes_max,
        )
        .expect("test key");
        let shard = Shard::new(
            ShardConfig {
                id: ShardId(id),
                shard_count: SHARDS,
                limits,
                hash_seed: 0,
            },
            verifier,
        );
        Node {
            id,
            shard,
            log: MemLog::new(),
            conns: Vec::new(),
        }
    }

    fn work(&mut self, mesh: &Mesh, work: Work) {
        match work {
            Work::Msg(msg) => self.shard.handle_shard_msg(NOW, msg),
            Work::Input(Input::Write { conn, bytes }) => {
                let c = &self.conns[conn];
                assert!(!c.closed, "scripted write on a closed connection");
                let mut buf = BytesMut::from(&bytes[..]);
                self.shard.handle_bytes(NOW, c.id, &mut buf);
            }
            Work::Input(Input::Connect { bytes }) => {
                let id = self.shard.handle_open(NOW).expect("shard accepts");
                self.conns.push(ClientConn {
                    id,
                    batches: Vec::new(),
                    closed: false,
                });
                let mut buf = BytesMut::from(&bytes[..]);
                self.shard.handle_bytes(NOW, id, &mut buf);
            }
        }
        self.drain(mesh);
    }

    /// Drains effects and transmits until the shard has nothing more to say.
    fn drain(&mut self, mesh: &Mesh) {
        loop {
            let mut moved = false;
            while let Some(effect) = self.shard.poll_effect() {
                moved = true;
                match effect {
                    Effect::Append { lsn, bytes } => {
                        self.log.append(&bytes);
                        self.log.sync();
                        self.shard.handle_durable(NOW, lsn);
                    }
                    Effect::ToShard { to, msg } => mesh.push(self.id, to.0, msg),
                    Effect::Fetch {
                        fetch,
                        conv,
                        from,
                        to,
                        limit,
                    } => {
                        let msgs = self.log.fetch(conv, from, to, limit);
                        self.shard.handle_fetched(NOW, fetch, Ok(msgs));
                    }
                    Effect::Load { conv } => {
                        let last = self.log.last_durable_seq(conv);
                        self.shard.handle_loaded(NOW, conv, Ok(last));
                    }
                    Effect::CommandDone { .. } => panic!("no commands in these models"),
                    Effect::Offline { .. } => panic!("offline push is off in these models"),
                }
            }
            while let Some(t) = self.shard.poll_transmit() {
                moved = true;
                let c = self
                    .conns
                    .iter_mut()
                    .find(|c| c.id == t.conn && !c.closed)
                    .expect("transmit for a connection the client holds");
                let n = t.chunks.iter().map(Bytes::len).sum();
                c.batches.push(t.chunks);
                if t.close {
                    c.closed = true;
                } else {
                    self.shard.handle_written(NOW, t.conn, n);
                }
            }
            if !moved {
                break;
            }
        }
    }

    /// The thread body: work until nothing is in flight anywhere.
    fn run(mut self, mesh: &Mesh, mut inputs: VecDeque<Input>) -> Node {
        let mut done = 0;
        while let Some(work) = mesh.next_work(self.id, done, &mut inputs) {
            self.work(mesh, work);
            done = 1;
        }
        self
    }

    /// Frames the client of connection `conn` received, in the order its socket got them.
    fn frames(&self, conn: usize, fault: Fault) -> Vec<(Meta, Bytes)> {
        let mut rx = BytesMut::new();
        let batches = &self.conns[conn].batches;
        if fault == Fault::ReverseWritesToNewConnection && (usize::from(self.id), conn) == NEW_B {
            batches
                .iter()
                .rev()
                .flatten()
                .for_each(|b| rx.extend_from_slice(b));
        } else {
            batches
                .iter()
                .flatten()
                .for_each(|b| rx.extend_from_slice(b));
        }
        let decoder = Decoder::new(u32::MAX);
        let mut frames = Vec::new();
        while let Some(f) = decoder.decode(&mut rx).expect("gateway frames decode") {
            frames.push((f.meta, f.payload));
        }
        assert!(rx.is_empty(), "a partial frame was left on the socket");
        frames
    }
}

/// Hands every queued message to its shard, one thread, until nothing moves.
fn settle(nodes: &mut [Node], mesh: &Mesh) {
    loop {
        let mut moved = false;
        for node in nodes.iter_mut() {
            while let Some(msg) = mesh.try_pop(node.id) {
                node.work(mesh, Work::Msg(msg));
                mesh.state.lock().expect("mesh lock").in_flight -= 1;
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    assert_eq!(mesh.in_flight(), 0, "set-up settled");
}

/// A loom thread with a stack big enough for the engine (token verification, flatbuffers);
/// loom's default coroutine stack is far smaller than a real thread's.
fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> loom::thread::JoinHandle<T> {
    loom::thread::Builder::new()
        .stack_size(STACK_BYTES)
        .spawn(f)
        .expect("spawn a loom thread")
}

/// Runs `f` on a thread of its own: the model's main thread has loom's small default
/// stack, too small for the engine.
fn on_big_stack(f: impl FnOnce() + Send + 'static) {
    spawn(f).join().expect("model thread");
}

/// Runs the concurrent part: one loom thread per shard, each feeding its inputs.
fn run_concurrently(
    nodes: Vec<Node>,
    mesh: &Arc<Mesh>,
    mut inputs: Vec<VecDeque<Input>>,
) -> Vec<Node> {
    mesh.add_inputs(inputs.iter().map(VecDeque::len).sum());
    let handles: Vec<_> = nodes
        .into_iter()
        .zip(inputs.drain(..))
        .map(|(node, inputs)| {
            let mesh = mesh.clone();
            spawn(move || node.run(&mesh, inputs))
        })
        .collect();
    let nodes: Vec<Node> = handles
        .into_iter()
        .map(|h| h.join().expect("shard thread"))
        .collect();
    assert_eq!(mesh.in_flight(), 0, "everything settled");
    nodes
}

// ---------------------------------------------------------------------------------------
// Clients' frames
// ---------------------------------------------------------------------------------------

/// Tokens minted once, outside the model (minting is deterministic but not free).
#[derive(Clone)]
struct Tokens(BTreeMap<(u64, u32), String>);

impl Tokens {
    fn new(identities: &[(u64, u32)]) -> Tokens {
        let signer = TokenSigner::new(&SigningKey::Hs256 {
            secret: SECRET.to_vec(),
        })
        .expect("test key");
        Tokens(
            identities
                .iter()
                .map(|&(u, d)| {
                    let token =
                        signer.mint(UserId(u), DeviceId(d), NOW + Duration::from_secs(3600));
                    ((u, d), token)
                })
                .collect(),
        )
    }

    fn auth(&self, user: u64, device: u32) -> Bytes {
        let token = self.0[&(user, device)].clone();
        Encoder::new().encode_to_bytes(&Meta::Auth(meta::Auth { token }), &[])
    }
}

fn send_frame(req: u32, conv: ConvId, payload: &[u8]) -> Bytes {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&req.to_le_bytes());
    Encoder::new().encode_to_bytes(
        &Meta::Send(meta::Send {
            req,
            client_msg_id: ClientMsgId(id),
            conv,
            priority: meta::Priority::Normal,
        }),
        payload,
    )
}

fn sync_frame(req: u32, conv: ConvId, seq: Seq) -> Bytes {
    Encoder::new().encode_to_bytes(
        &Meta::Sync(meta::Sync {
            req,
            cursors: vec![meta::Cursor { conv, seq }],
        }),
        &[],
    )
}

fn delivers(frames: &[(Meta, Bytes)], conv: ConvId) -> Vec<(Seq, Bytes)> {
    frames
        .iter()
        .filter_map(|(m, p)| match m {
            Meta::Deliver(d) if d.conv == conv => Some((d.seq, p.clone())),
            _ => None,
        })
        .collect()
}

fn acks(frames: &[(Meta, Bytes)]) -> Vec<(u32, Seq)> {
    frames
        .iter()
        .filter_map(|(m, _)| match m {
            Meta::Ack(a) => Some((a.req, a.seq)),
            _ => None,
        })
        .collect()
}

fn last_error(frames: &[(Meta, Bytes)]) -> Option<ErrorCode> {
    match frames.last() {
        Some((Meta::Error(e), _)) => Some(e.code),
        _ => None,
    }
}

/// I4 on one connection: the conversation's pushes are `first, first + 1, ...` with no
/// repeat, no gap and nothing out of order.
fn assert_in_order_from(seqs: &[Seq], first: u64, who: &str) {
    for (i, seq) in seqs.iter().enumerate() {
        assert_eq!(
            seq.0,
            first + i as u64,
            "I4 violated on {who}: Delivers {seqs:?} are not consecutive from seq {first}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Scenario 1: a device reconnects to another shard while messages are being delivered
// ---------------------------------------------------------------------------------------

const A: u64 = 1;
const DEVICE: u32 = 1;
const PAYLOADS: [&[u8]; 3] = [b"message one", b"message two", b"message three"];

/// A user B whose direct conversation with A is owned by shard 2 and whose home is
/// shard 2, so that the takeover (Login 1->2, Kick 2->0) crosses shards too.
fn pick_b() -> (u64, ConvId) {
    (2..)
        .map(|b| (b, ConvId::direct(UserId(A), UserId(b))))
        .find(|&(b, conv)| {
            Shard::owner_of(conv, SHARDS) == ShardId(2)
                && Shard::home_of(UserId(b), SHARDS) == ShardId(2)
        })
        .expect("some user fits")
}

/// Connection indices in their shard's `conns`.
const OLD_B: (usize, usize) = (0, 0);
const A_CONN: (usize, usize) = (0, 1);
const NEW_B: (usize, usize) = (1, 0);

static RECONNECT_ITERATIONS: AtomicUsize = AtomicUsize::new(0);

fn reconnect_model(fault: Fault) -> usize {
    let (b, conv) = pick_b();
    let tokens = Tokens::new(&[(A, DEVICE), (b, DEVICE)]);
    RECONNECT_ITERATIONS.store(0, Ordering::SeqCst);
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(preemption_bound(RECONNECT_PREEMPTIONS));
    builder.max_branches = BRANCHES_MAX;
    builder.check(move || {
        RECONNECT_ITERATIONS.fetch_add(1, Ordering::SeqCst);
        let tokens = tokens.clone();
        on_big_stack(move || {
            let mesh = Arc::new(Mesh::new(fault));
            let mut nodes: Vec<Node> = (0..SHARDS).map(Node::new).collect();

            // Set-up, one thread: B's device and A on shard 0; seq 1 reaches B.
            for user in [b, A] {
                nodes[0].work(
                    &mesh,
                    Work::Input(Input::Connect {
                        bytes: tokens.auth(user, DEVICE),
                    }),
                );
            }
            settle(&mut nodes, &mesh);
            nodes[A_CONN.0].work(
                &mesh,
                Work::Input(Input::Write {
                    conn: A_CONN.1,
                    bytes: send_frame(1, conv, PAYLOADS[0]),
                }),
            );
            settle(&mut nodes, &mesh);
            let old = delivers(&nodes[OLD_B.0].frames(OLD_B.1, Fault::None), conv);
            assert_eq!(old, vec![(Seq(1), Bytes::from_static(PAYLOADS[0]))]);

            // Concurrently: A pipelines messages 2 and 3 on shard 0 while B's device
            // reconnects on shard 1 (Auth, then Sync from seq 1, in one write).
            let mut reconnect = tokens.auth(b, DEVICE).to_vec();
            reconnect.extend_from_slice(&sync_frame(7, conv, Seq(1)));
            let inputs = vec![
                VecDeque::from([
                    Input::Write {
                        conn: A_CONN.1,
                        bytes: send_frame(2, conv, PAYLOADS[1]),
                    },
                    Input::Write {
                        conn: A_CONN.1,
                        bytes: send_frame(3, conv, PAYLOADS[2]),
                    },
                ]),
                VecDeque::from([Input::Connect {
                    bytes: reconnect.into(),
                }]),
                VecDeque::new(),
            ];
            let nodes = run_concurrently(nodes, &mesh, inputs);
            check_reconnect(&nodes, conv, fault);
        });
    });
    RECONNECT_ITERATIONS.load(Ordering::SeqCst)
}

fn check_reconnect(nodes: &[Node], conv: ConvId, fault: Fault) {
    let frames = |(shard, conn): (usize, usize)| nodes[shard].frames(conn, fault);
    let (a, old, new) = (frames(A_CONN), frames(OLD_B), frames(NEW_B));

    // I8: A's pipelined sends got seqs in send order, acked in that order.
    assert_eq!(
        acks(&a),
        vec![(1, Seq(1)), (2, Seq(2)), (3, Seq(3))],
        "I8 violated: A's Acks"
    );

    // The takeover: the old connection is closed with SessionTakenOver, the new stays.
    assert!(
        nodes[OLD_B.0].conns[OLD_B.1].closed,
        "the old connection of B's device was not closed"
    );
    assert_eq!(
        last_error(&old),
        Some(ErrorCode::SessionTakenOver),
        "the old connection was not closed with SessionTakenOver"
    );
    assert!(
        !nodes[NEW_B.0].conns[NEW_B.1].closed,
        "the new connection was closed"
    );
    assert!(
        new.iter()
            .any(|(m, _)| matches!(m, Meta::SyncDone(d) if d.req == 7)),
        "the Sync was not answered"
    );

    // I4 on every connection, and no loss: the new connection gets 2 and 3 after its
    // cursor, A's connection every seq.
    let seqs = |d: &[(Seq, Bytes)]| d.iter().map(|(s, _)| *s).collect::<Vec<_>>();
    let (a_d, old_d, new_d) = (
        delivers(&a, conv),
        delivers(&old, conv),
        delivers(&new, conv),
    );
    assert_in_order_from(&seqs(&new_d), 2, "B's new connection");
    assert_eq!(
        seqs(&new_d).last(),
        Some(&Seq(3)),
        "loss: B's new connection never got seq 3"
    );
    assert_in_order_from(&seqs(&old_d), 1, "B's old connection");
    assert_in_order_from(&seqs(&a_d), 1, "A's connection");
    assert_eq!(seqs(&a_d).len(), 3, "loss: A's connection missed a seq");

    // Display is exactly once: dedupe by seq; every copy has the right payload.
    let mut display: BTreeMap<Seq, Bytes> = BTreeMap::new();
    for (seq, payload) in old_d.iter().chain(&new_d) {
        let want = PAYLOADS[(seq.0 - 1) as usize];
        assert_eq!(&payload[..], want, "seq {seq:?} names another message");
        display.entry(*seq).or_insert_with(|| payload.clone());
    }
    assert_eq!(
        display.keys().copied().collect::<Vec<_>>(),
        vec![Seq(1), Seq(2), Seq(3)],
        "B's device does not hold exactly seqs 1..=3"
    );
}

#[test]
fn a_device_reconnecting_to_another_shard_during_delivery_loses_and_repeats_nothing() {
    let iterations = reconnect_model(Fault::None);
    println!(
        "reconnect model: {iterations} interleavings explored, preemption bound {}",
        preemption_bound(RECONNECT_PREEMPTIONS)
    );
    assert!(iterations > 1, "loom explored a single interleaving");
}

#[test]
#[should_panic(expected = "I8 violated")]
fn planted_non_fifo_pair_queues_are_caught_by_the_reconnect_model() {
    reconnect_model(Fault::LifoQueues);
}

#[test]
#[should_panic(expected = "the old connection of B's device was not closed")]
fn planted_lost_kick_is_caught_by_the_reconnect_model() {
    reconnect_model(Fault::DropKicks);
}

#[test]
#[should_panic(expected = "loss: B's new connection never got seq 3")]
fn planted_lost_deliver_is_caught_by_the_reconnect_model() {
    reconnect_model(Fault::DropDeliverOfSeq3ToShard1);
}

#[test]
#[should_panic(expected = "I4 violated on B's new connection")]
fn planted_reordered_socket_writes_are_caught_by_the_reconnect_model() {
    reconnect_model(Fault::ReverseWritesToNewConnection);
}

// ---------------------------------------------------------------------------------------
// Scenario 2: one device logs in on two shards at once
// ---------------------------------------------------------------------------------------

/// A user homed on shard 2, so both logins cross shards to reach the home.
fn pick_user_homed_on_2() -> u64 {
    (1..)
        .find(|&u| Shard::home_of(UserId(u), SHARDS) == ShardId(2))
        .expect("some user is homed on shard 2")
}

static TAKEOVER_ITERATIONS: AtomicUsize = AtomicUsize::new(0);

fn takeover_model(fault: Fault) -> usize {
    let user = pick_user_homed_on_2();
    let tokens = Tokens::new(&[(user, DEVICE)]);
    TAKEOVER_ITERATIONS.store(0, Ordering::SeqCst);
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(preemption_bound(TAKEOVER_PREEMPTIONS));
    builder.max_branches = BRANCHES_MAX;
    builder.check(move || {
        TAKEOVER_ITERATIONS.fetch_add(1, Ordering::SeqCst);
        let tokens = tokens.clone();
        on_big_stack(move || {
            let mesh = Arc::new(Mesh::new(fault));
            let nodes: Vec<Node> = (0..SHARDS).map(Node::new).collect();
            let login = || {
                VecDeque::from([Input::Connect {
                    bytes: tokens.auth(user, DEVICE),
                }])
            };
            let inputs = vec![login(), login(), VecDeque::new()];
            let nodes = run_concurrently(nodes, &mesh, inputs);

            let mut survivors = 0;
            for node in &nodes[..2] {
                let frames = node.frames(0, fault);
                assert!(
                    matches!(frames.first(), Some((Meta::AuthOk(_), _))),
                    "a login was not accepted: {frames:?}"
                );
                if node.conns[0].closed {
                    assert_eq!(
                        last_error(&frames),
                        Some(ErrorCode::SessionTakenOver),
                        "a login was closed for another reason"
                    );
                } else {
                    survivors += 1;
                }
            }
            assert_eq!(
                survivors, 1,
                "two logins of one device: {survivors} connections survived, not exactly one"
            );
        });
    });
    TAKEOVER_ITERATIONS.load(Ordering::SeqCst)
}

#[test]
fn one_device_logging_in_on_two_shards_at_once_keeps_exactly_one_connection() {
    let iterations = takeover_model(Fault::None);
    println!(
        "takeover model: {iterations} interleavings explored, preemption bound {}",
        preemption_bound(TAKEOVER_PREEMPTIONS)
    );
    assert!(iterations > 1, "loom explored a single interleaving");
}

#[test]
#[should_panic(expected = "not exactly one")]
fn planted_lost_kick_is_caught_by_the_takeover_model() {
    takeover_model(Fault::DropKicks);
}
