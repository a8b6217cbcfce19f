//! The engine fuzz driver (issue 10), shared by the proptest fuzz (`engine_fuzz.rs`) and the
//! cargo-fuzz target (`fuzz/fuzz_targets/engine.rs`), so that both fuzz the same thing.
//!
//! It owns the ops a fuzz case is made of ([`Op`]), the small limits the shards run with
//! ([`limits`]), and [`run`]: it plays the ops on a [`World`] of [`SHARDS`] shards and, after
//! every step, checks that nothing panicked and that
//!
//! - I1/I5: every Ack and every Deliver names a message durable in its owner's log, and a
//!   Deliver carries that message's client_msg_id (no seq names two messages);
//! - I2: a (sender, client_msg_id) is acked with one (conv, seq) only;
//! - I3: each conversation's stored seqs are 1, 2, 3, ... without a gap or a repeat;
//! - I4 (nothing skipped): the harness's log keeps all history, so no Sync reports a gap
//!   and no Pull reports history gone, whatever happened to the reads (held, answered
//!   late, failed);
//! - I6: every shard's state is within its bounds (conversations, hot tier, dedupe) and
//!   what it holds for a reader that stopped reading stays within the hard budget.
//!
//! How ops are generated is left to each fuzzer (proptest strategies, or bytes read with
//! `arbitrary`). The crate that includes this module must also have the test harness as
//! `crate::harness`.

use crate::harness::World;
use bytes::Bytes;
use imgate_core::log::{scan, Record};
use imgate_core::mesh::Command;
use imgate_core::proto::meta::{self, Meta};
use imgate_core::proto::{ClientMsgId, ConvId, Seq, UserId};
use imgate_core::Limits;
use std::collections::BTreeMap;
use std::time::Duration;

/// Shards in the world; ops name a shard in `0..SHARDS`.
pub const SHARDS: u16 = 2;
/// Users with a token; ops name a user in `1..=USERS`. Groups 1 and 2 are made of them.
pub const USERS: u64 = 4;

/// Fails the check with a message, like `assert!` but returning `Err`.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// Fails the check unless both sides are equal, showing both and a message.
macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($msg:tt)+) => {{
        let (left, right) = (&$left, &$right);
        if left != right {
            return Err(format!(
                "{}: left {:?}, right {:?}",
                format_args!($($msg)+),
                left,
                right
            ));
        }
    }};
}

/// Small bounds, so that the fuzz reaches them: a few conversations in memory, a short
/// dedupe window... every bound still consistent (`Limits::validate`).
pub fn limits() -> Limits {
    Limits {
        payload_bytes_max: 2_000,
        outbound_soft_bytes: 3_000,
        outbound_hard_bytes: 12_000,
        replay_page_bytes: 1_000,
        replay_resume_bytes: 1_500,
        hot_messages_per_conv: 1,
        hot_messages_per_shard: 12,
        hot_bytes_per_shard: 8_000,
        conversations_max: 3,
        dedupe_window_entries: 4_096,
        pull_limit_max: 7,
        sync_batch_per_conv: 5,
        sync_cursors_max: 6,
        pulls_queued_max: 3,
        inflight_sends_max: 8,
        frames_per_sec: 50,
        frames_burst: 40,
        devices_per_user_max: 2,
        pending_signals_max: 2,
        loads_inflight_max: 2,
        load_waiters_max: 3,
        fetches_inflight_max: 1,
        ..Limits::default()
    }
}

/// One step of a fuzz case. Connections are numbered in the order of their `Login`s.
#[derive(Clone, Debug)]
pub enum Op {
    /// A connection opens on a shard and authenticates as (user, device).
    Login { shard: u16, user: u64, device: u32 },
    /// A frame on a connection (it may be closed by now: then nothing is written).
    Frame {
        conn: usize,
        frame: Meta,
        len: usize,
    },
    /// The client hangs up.
    HangUp { conn: usize },
    /// The client stops reading, or starts again.
    Reading { conn: usize, on: bool },
    /// Appends become durable.
    Sync,
    /// Time passes.
    Advance { ms: u64 },
    /// Power loss on every shard.
    Crash,
    /// A shard writes a checkpoint (every later recovery checks it).
    Checkpoint { shard: u16 },
    /// Log reads are held from now on (`true`), or answered at once again (and every
    /// held one is answered from the log).
    HoldReads { on: bool },
    /// Every held log read is answered, from the log or with a failure.
    AnswerReads { ok: bool },
}

/// What the clients were told, checked against the logs after every step.
#[derive(Default)]
struct Seen {
    /// (sender, client_msg_id) -> the (conv, seq) it was acked with.
    acked: BTreeMap<(u64, ClientMsgId), (ConvId, Seq)>,
    /// Frames already checked, per connection.
    checked: Vec<usize>,
    /// Who each connection logged in as.
    users: Vec<u64>,
}

/// Every message durable in some shard's log: (conv, seq) -> its client_msg_id.
fn durable(w: &World) -> BTreeMap<(ConvId, Seq), ClientMsgId> {
    let mut out = BTreeMap::new();
    for node in &w.nodes {
        let len = node.log.durable_len() as usize;
        for (_, r) in scan(&node.log.bytes()[..len]).records {
            if let Record::Message(m) = r {
                out.insert((m.conv, m.seq), m.client_msg_id);
            }
        }
    }
    out
}

/// Checks the invariants against the frames each connection received so far (`all`).
/// `settled`: every append was just made durable, so nothing holds a conversation in
/// memory but being a group.
fn check(
    w: &World,
    seen: &mut Seen,
    all: &[Vec<(Meta, Bytes)>],
    settled: bool,
) -> Result<(), String> {
    let stored = durable(w);
    // I3: consecutive seqs from 1 per conversation.
    let mut last: BTreeMap<ConvId, Seq> = BTreeMap::new();
    for &(conv, seq) in stored.keys() {
        let prev = last.insert(conv, seq).unwrap_or(Seq::ZERO);
        ensure_eq!(seq, prev.next(), "I3: {} after {} in {}", seq, prev, conv);
    }
    for (i, frames) in all.iter().enumerate() {
        let user = seen.users[i];
        for (m, _) in &frames[seen.checked[i]..] {
            match m {
                Meta::Ack(a) => {
                    ensure_eq!(
                        stored.get(&(a.conv, a.seq)),
                        Some(&a.client_msg_id),
                        "I1: ack of a message not durable"
                    );
                    let first = *seen
                        .acked
                        .entry((user, a.client_msg_id))
                        .or_insert((a.conv, a.seq));
                    ensure_eq!(first, (a.conv, a.seq), "I2: two answers for one id");
                }
                Meta::Deliver(d) => {
                    ensure_eq!(
                        stored.get(&(d.conv, d.seq)),
                        Some(&d.client_msg_id),
                        "I5: deliver of a message not durable, or of another message"
                    );
                }
                Meta::SyncDone(d) => {
                    ensure!(
                        d.gaps.is_empty(),
                        "I4: history the log holds skipped: {d:?}"
                    );
                }
                Meta::PullResult(r) => {
                    ensure_eq!(
                        r.available_from,
                        Seq::ZERO,
                        "I4: history the log holds reported gone"
                    );
                }
                _ => {}
            }
        }
        seen.checked[i] = frames.len();
    }
    // I6: the shards' state within bounds.
    let l = limits();
    for node in &w.nodes {
        let s = node.shard.stats();
        // Groups never leave memory (two here); conversations with appends in flight wait.
        if settled {
            ensure!(s.conversations <= (l.conversations_max + 2) as u64, "{s:?}");
        }
        ensure!(s.hot_messages <= l.hot_messages_per_shard as u64, "{s:?}");
        ensure!(s.hot_bytes <= l.hot_bytes_per_shard as u64, "{s:?}");
        ensure!(s.dedupe_entries <= l.dedupe_window_entries as u64, "{s:?}");
    }
    for i in 0..w.conns.len() {
        ensure!(
            w.held_bytes(i) <= l.outbound_hard_bytes + l.frame_bytes_max as usize,
            "connection {} holds {} bytes",
            i,
            w.held_bytes(i)
        );
    }
    Ok(())
}

/// Plays `ops` on a fresh world with groups 1 (every user) and 2 (even users), checking
/// the invariants after every op. `Err` says which check failed; a panic is a finding too.
pub fn run(ops: Vec<Op>) -> Result<(), String> {
    let mut w = World::new(SHARDS, limits());
    for g in 1..=2u64 {
        w.command(Command::CreateGroup {
            group: ConvId::group(g),
            members: (1..=USERS)
                .filter(|u| u % g == 0 || g == 1)
                .map(UserId)
                .collect(),
        })
        .map_err(|e| format!("creating group {g}: {e}"))?;
    }
    let mut seen = Seen::default();
    let mut frames: Vec<Vec<(Meta, Bytes)>> = Vec::new();
    for op in ops {
        let settled = matches!(op, Op::Sync);
        match op {
            Op::Login {
                shard,
                user,
                device,
            } => {
                let c = w.open(shard);
                let token = w.token(user, device);
                w.frame(c, Meta::Auth(meta::Auth { token }), &[]);
                seen.users.push(user);
                seen.checked.push(0);
                frames.push(Vec::new());
            }
            Op::Frame { conn, frame, len } => {
                if conn < w.conns.len() && !w.conns[conn].closed {
                    w.frame(conn, frame, &vec![0x5a; len]);
                }
            }
            Op::HangUp { conn } => {
                if conn < w.conns.len() {
                    w.hang_up(conn);
                }
            }
            Op::Reading { conn, on } => {
                if conn < w.conns.len() && !w.conns[conn].closed {
                    if on {
                        w.resume_reading(conn);
                    } else {
                        w.conns[conn].reading = false;
                    }
                }
            }
            Op::Sync => w.sync(),
            Op::Advance { ms } => w.advance(Duration::from_millis(ms)),
            Op::Crash => w.crash_all(),
            Op::Checkpoint { shard } => {
                if shard < SHARDS {
                    w.checkpoint(usize::from(shard));
                }
            }
            Op::HoldReads { on } => {
                w.hold_fetches = on;
                if !on {
                    w.answer_fetches(true);
                }
            }
            Op::AnswerReads { ok } => {
                w.answer_fetches(ok);
            }
        }
        for (i, f) in frames.iter_mut().enumerate() {
            f.extend(w.take(i));
        }
        check(&w, &mut seen, &frames, settled)?;
    }
    Ok(())
}
