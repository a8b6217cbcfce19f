//! The log engine against a reference model, under random schedules: appends of messages
//! of several conversations (payloads up to 9 KB) and of checkpoints when the engine asks
//! for one, I/O operations held in flight and finished in any order, history reads
//! (Fetch, Load) interleaved, faults (failed creates, writes, syncs, truncates, reads and
//! removes, a full disk), power losses that tear the unsynced tail at block granularity,
//! process restarts that keep the page cache, small segments (rotations), aligned writes
//! and retention.
//!
//! The model is the log as the shard sees it: every record appended, in append order, each
//! either durable (reported [`LogEvent::Durable`], or recovered after a restart) or pending.
//! [`LogEvent::Failed`] drops the pending ones, and the model's shard hands their seqs out
//! again (a conversation's next seq is one past its last record still in the model, as in
//! `Shard::handle_log_failed`). After a crash, the records that survive must be the durable
//! ones plus a prefix of the pending ones (a torn tail), and nothing else.
//!
//! Checked, beside the engine's own asserts (a panic fails the case):
//! 1. Durable means durable: when the engine reports an append durable, its records are in
//!    the bytes that survive a power loss at that moment; after any crash and recovery,
//!    every durable record is recovered (`Recovered::records` is exactly the surviving log
//!    from the last checkpoint on), and a Fetch of the whole conversation returns it with
//!    the same payload, unless retention removed its segment (then the answer starts later,
//!    and only past seqs of removed segments).
//! 2. Nothing invented: every record recovered or fetched was appended, and a failed
//!    record never reappears (I5): when Failed is reported, the open segment holds durable
//!    records only; a seq handed out again is recovered with the new payload or not at all.
//! 3. Seqs per conversation are consecutive in the recovered records, and Load after
//!    recovery is the last surviving seq, which is at least the last durable one.
//! 4. Fetches answer consecutive seqs from the first the log still holds, durable records
//!    only, and not short of what was durable when asked; a Fetch or Load answers `Err`
//!    only if a read fault was injected while it ran (a segment that retention removed
//!    under it is no excuse); every query is answered.
//! 5. Recovery replays from the last whole checkpoint (`records[0]` is its first record),
//!    or from the log's start if it has none. When the schedule ends, with the faults off,
//!    every append is resolved and the engine has asked for a checkpoint in time (fewer
//!    than `checkpoint_messages` messages follow the last one, or, after a failure lost
//!    one, fewer than an eighth of that more than followed it then: the engine backs off
//!    before asking again).
//!
//! A power loss keeps for each file its durable bytes and some whole blocks past them; a
//! process restart (no power loss) keeps everything written, durable or not, so what the
//! new engine recovers must be durable before it is served. Probes check property 1 without
//! ending the run: a copy of the disk loses power, a fresh engine recovers it, and the
//! result is checked and thrown away. A failed sync may drop the file's dirty pages, except
//! while a sync issued before it is unfinished: with pipelined syncs that is the O_DIRECT
//! case, where no pages wait for writeback (a buffered log syncs one at a time, see
//! `a_buffered_log_syncs_one_at_a_time_so_no_sync_hides_a_failed_writeback`). Checkpoint records carry a
//! marker group (`last_seq` = a unique id) so that every record appended is told apart.
//!
//! Cases: `IMGATE_PROPTEST_CASES`, else `PROPTEST_CASES` (as `engine_fuzz.rs` reads it),
//! else 128. `IMGATE_MODEL_TRACE=1` prints each step, operation and event. With the
//! `planted-bugs` feature, `planted_bugs_are_caught` shows that every bug the engine can
//! plant fails this model. The tests after it pin the engine bugs this model found.

use bytes::Bytes;
use imgate_core::log::{encode_record, scan, GroupHead, Record, StoredMessage};
use imgate_core::log_engine::mem_disk::{MemDisk, Started};
use imgate_core::log_engine::{
    FileId, Io, IoError, LogConfig, LogEngine, LogError, LogEvent, Op, Recovered,
};
use imgate_core::proto::{ClientMsgId, ConvId, DeviceId, Seq, UserId};
use imgate_core::shard::Lsn;
use imgate_core::Instant;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Conversations the shard writes to.
const CONVS: usize = 4;

/// Fetch ids from here on are the audit's (after a recovery).
const AUDIT: u64 = 1 << 40;

/// Operations a drive to quiescence performs at most before the engine counts as stuck.
const DRIVE_MAX: usize = 200_000;

fn conv(i: usize) -> ConvId {
    match i % CONVS {
        3 => ConvId::group(7),
        n => ConvId::direct(UserId(n as u64 + 1), UserId(n as u64 + 1001)),
    }
}

fn convs() -> impl Iterator<Item = ConvId> {
    (0..CONVS).map(conv)
}

// ---------------------------------------------------------------------------------------
// The schedule
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Act {
    /// One append of these messages (conversation, payload bytes); none: an empty append.
    Append(Vec<(u8, u16)>),
    /// If the engine asked for a checkpoint: append one (a run of two records, or one).
    Checkpoint { two: bool },
    /// Start an operation the engine issued (`pick` among them); `roll` below the case's
    /// fault rate fails it; `keep` is how many blocks a failed write applies, and whether
    /// a failed sync drops the dirty pages (0).
    Start { pick: u16, roll: u8, keep: u8 },
    /// Finish a started operation and report it.
    Finish { pick: u16 },
    /// Fetch `conv` from a seq near its durable end.
    Fetch {
        conv: u8,
        from: u8,
        span: u8,
        limit: u8,
    },
    /// Load `conv`'s last seq.
    Load { conv: u8 },
    /// Time passes (retention by age).
    Tick { ms: u32 },
    /// Power loss, `keep` blocks of each file's unsynced tail kept; a new engine recovers.
    Crash { keep: u8 },
    /// The process restarts: operations in flight are lost, the page cache is not.
    Restart,
    /// A copy of the disk loses power now and is recovered and checked.
    Probe { keep: u8 },
    /// The disk's capacity becomes what it holds plus `room` * 256 bytes (None: unbounded).
    Capacity { room: Option<u8> },
    /// Every operation in flight or issued is performed, in order, without faults.
    Drain,
}

#[derive(Clone, Debug)]
struct Case {
    segment_bytes: u64,
    segment_messages: usize,
    align: u64,
    block: usize,
    checkpoint_messages: u64,
    retention_bytes: Option<u64>,
    retention_age_ms: Option<u64>,
    read_jobs_max: usize,
    read_attempts: u32,
    /// Percent of operations that fail.
    fault_pct: u8,
    disk_full: bool,
    close_at_end: bool,
    acts: Vec<Act>,
}

fn payload_len() -> impl Strategy<Value = u16> {
    prop_oneof![6 => 0..200u16, 3 => 200..2_000u16, 1 => 4_097..9_000u16]
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        20 => proptest::collection::vec((0..CONVS as u8, payload_len()), 0..=3).prop_map(Act::Append),
        4 => any::<bool>().prop_map(|two| Act::Checkpoint { two }),
        30 => (any::<u16>(), any::<u8>(), 0..4u8).prop_map(|(pick, roll, keep)| Act::Start { pick, roll, keep }),
        30 => any::<u16>().prop_map(|pick| Act::Finish { pick }),
        6 => (0..CONVS as u8, any::<u8>(), 0..40u8, 0..12u8)
            .prop_map(|(conv, from, span, limit)| Act::Fetch { conv, from, span, limit }),
        3 => (0..CONVS as u8).prop_map(|conv| Act::Load { conv }),
        1 => prop_oneof![1..1_000u32, Just(3_600_000u32)].prop_map(|ms| Act::Tick { ms }),
        1 => prop_oneof![4 => 0..4u8, 1 => Just(64u8)].prop_map(|keep| Act::Crash { keep }),
        1 => Just(Act::Restart),
        1 => prop_oneof![4 => 0..4u8, 1 => Just(64u8)].prop_map(|keep| Act::Probe { keep }),
        1 => proptest::option::of(any::<u8>()).prop_map(|room| Act::Capacity { room }),
        2 => Just(Act::Drain),
    ]
}

prop_compose! {
    fn case()(
        segment_bytes in prop_oneof![Just(2_048u64), Just(8_192), Just(65_536)],
        segment_messages in prop_oneof![Just(3usize), Just(16), Just(1_000)],
        align in prop_oneof![2 => Just(1u64), 1 => Just(512), 1 => Just(4_096)],
        block in prop_oneof![Just(512usize), Just(4_096)],
        checkpoint_messages in prop_oneof![Just(2u64), Just(8), Just(1_000)],
        retention in prop_oneof![Just(None), Just(Some(4_096u64)), Just(Some(20_000))],
        retention_age in prop_oneof![4 => Just(None), 1 => Just(Some(60_000u64))],
        read_jobs_max in prop_oneof![Just(1usize), Just(4)],
        read_attempts in prop_oneof![Just(1u32), Just(3), Just(8)],
        (fault_pct, disk_full, close_at_end) in (
            prop_oneof![1 => Just(0u8), 2 => Just(5), 2 => Just(15), 1 => Just(35)],
            proptest::bool::weighted(0.25),
            any::<bool>(),
        ),
        acts in proptest::collection::vec(act(), 1..400),
    ) -> Case {
        Case {
            segment_bytes,
            segment_messages,
            align,
            block,
            checkpoint_messages,
            retention_bytes: retention,
            retention_age_ms: retention_age,
            read_jobs_max,
            read_attempts,
            fault_pct,
            disk_full,
            close_at_end,
            acts,
        }
    }
}

impl Case {
    fn config(&self) -> LogConfig {
        LogConfig {
            segment_bytes: self.segment_bytes,
            segment_messages: self.segment_messages,
            align: self.align,
            checkpoint_messages: self.checkpoint_messages,
            retention_bytes: self.retention_bytes,
            retention_age: self.retention_age_ms.map(Duration::from_millis),
            read_jobs_max: self.read_jobs_max,
            read_attempts: self.read_attempts,
            // As the gateway configures it: pipelined syncs with aligned (O_DIRECT)
            // writes, one at a time with buffered ones.
            syncs_inflight_max: if self.align > 1 { 2 } else { 1 },
        }
    }
}

// ---------------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------------

fn message(conv: ConvId, seq: u64, uid: u64, len: usize) -> Record {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&uid.to_le_bytes());
    Record::Message(StoredMessage {
        conv,
        seq: Seq(seq),
        sender: UserId(1 + uid % 5),
        sender_device: DeviceId(1),
        client_msg_id: ClientMsgId(id),
        high_priority: uid.is_multiple_of(3),
        payload: Bytes::from(vec![uid as u8; len]),
        ts_ms: 0,
    })
}

/// A checkpoint record: part `part` of a run (its group ascends along the run, as the
/// format has it), marked with `uid` so that every record appended is told apart.
fn checkpoint(uid: u64, part: u32, last: bool) -> Record {
    Record::Checkpoint {
        part,
        groups: vec![GroupHead {
            group: ConvId::group(u64::from(part) + 1),
            members: Vec::new(),
            last_seq: Seq(uid),
        }],
        dedupe: Vec::new(),
        last,
    }
}

fn uid_of(record: &Record) -> Option<u64> {
    match record {
        Record::Message(m) => Some(u64::from_le_bytes(m.client_msg_id.0[..8].try_into().ok()?)),
        Record::Checkpoint { groups, .. } => groups.first().map(|g| g.last_seq.0),
        _ => None,
    }
}

fn describe(record: &Record) -> String {
    match record {
        Record::Message(m) => format!("msg {}#{} uid {:?}", m.conv, m.seq.0, uid_of(record)),
        Record::Checkpoint { last, .. } => format!("ckpt uid {:?} last {last}", uid_of(record)),
        other => format!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Rec {
    record: Record,
    uid: u64,
    /// The engine (its number) and the Lsn of the append that carried it.
    gen: u64,
    lsn: u64,
    durable: bool,
}

#[derive(Clone, Debug, Default)]
struct Model {
    /// The log: every record appended and neither failed nor lost, in append order. The
    /// durable ones are a prefix.
    log: Vec<Rec>,
    /// Uids of records failed, or lost by a crash: never to be seen again.
    gone: BTreeSet<u64>,
    next_uid: u64,
}

impl Model {
    fn durable_len(&self) -> usize {
        self.log.iter().take_while(|r| r.durable).count()
    }

    fn pending(&self) -> usize {
        self.log.len() - self.durable_len()
    }

    /// The last seq of `conv` in the log (`durable_only`: among durable records).
    fn last_seq(&self, conv: ConvId, durable_only: bool) -> u64 {
        self.log
            .iter()
            .rev()
            .filter(|r| r.durable || !durable_only)
            .find_map(|r| match &r.record {
                Record::Message(m) if m.conv == conv => Some(m.seq.0),
                _ => None,
            })
            .unwrap_or(0)
    }

    fn durable_message(&self, conv: ConvId, seq: u64) -> Option<&StoredMessage> {
        self.log
            .iter()
            .filter(|r| r.durable)
            .find_map(|r| match &r.record {
                Record::Message(m) if m.conv == conv && m.seq.0 == seq => Some(m),
                _ => None,
            })
    }

    fn uid(&mut self) -> u64 {
        self.next_uid += 1;
        self.next_uid
    }

    /// Messages after the last whole checkpoint (all of them if there is none).
    fn since_checkpoint(&self) -> usize {
        let from = self
            .log
            .iter()
            .rposition(|r| matches!(r.record, Record::Checkpoint { last: true, .. }))
            .map_or(0, |j| j + 1);
        self.log[from..]
            .iter()
            .filter(|r| matches!(r.record, Record::Message(_)))
            .count()
    }

    /// The `k` first pending records survived a crash and were recovered; the rest are
    /// lost.
    fn settle(&mut self, k: usize) {
        let d = self.durable_len();
        for r in &mut self.log[d..d + k] {
            r.durable = true;
        }
        for r in self.log.drain(d + k..) {
            self.gone.insert(r.uid);
        }
    }
}

/// Where a replay of `log` starts: the first record (part 0) of its last whole checkpoint,
/// a run of parts 0, 1, ... whose last is marked `last` (`Record::Checkpoint`); the log's
/// start if it holds none.
fn replay_start(log: &[Rec]) -> usize {
    let mut run: Option<(usize, u32)> = None;
    let mut found = 0;
    for (i, r) in log.iter().enumerate() {
        run = match r.record {
            Record::Checkpoint { part: 0, .. } => Some((i, 0)),
            Record::Checkpoint { part, .. } => match run {
                Some((start, before)) if before + 1 == part => Some((start, part)),
                _ => None,
            },
            _ => None,
        };
        if let (Some((start, _)), Record::Checkpoint { last: true, .. }) = (run, &r.record) {
            found = start;
            run = None;
        }
    }
    found
}

/// What a recovery answered: its records, and a Load and a whole-history Fetch of every
/// conversation right after it.
struct Audit {
    records: Vec<Record>,
    loads: BTreeMap<ConvId, Result<Seq, ()>>,
    fetches: BTreeMap<ConvId, Result<Vec<StoredMessage>, ()>>,
}

impl Audit {
    fn new(records: Vec<Record>) -> Audit {
        Audit {
            records,
            loads: BTreeMap::new(),
            fetches: BTreeMap::new(),
        }
    }

    fn done(&self) -> bool {
        self.loads.len() == CONVS && self.fetches.len() == CONVS
    }

    fn ask(engine: &mut LogEngine, now: Instant) {
        for (i, c) in convs().enumerate() {
            engine.load(now, c);
            engine.fetch(now, AUDIT + i as u64, c, Seq(1), Seq::MAX, 1_000_000);
        }
    }

    fn take(&mut self, event: LogEvent) -> Option<LogEvent> {
        match event {
            LogEvent::Loaded { conv, result } => {
                self.loads.insert(conv, result);
                None
            }
            LogEvent::Fetched { fetch, result } if fetch >= AUDIT => {
                self.fetches.insert(conv((fetch - AUDIT) as usize), result);
                None
            }
            other => Some(other),
        }
    }
}

/// Checks what a recovery found against the model (properties 1, 2, 3 and 5): returns how
/// many pending records survived.
fn check_recovery(
    model: &Model,
    audit: &Audit,
    removed: &BTreeSet<(ConvId, u64)>,
) -> Result<usize, String> {
    let records = &audit.records;
    let d = model.durable_len();
    let mut k_found = None;
    for k in 0..=model.pending() {
        let log = &model.log[..d + k];
        let Some(start) = log.len().checked_sub(records.len()) else {
            continue;
        };
        let same = log[start..]
            .iter()
            .zip(records)
            .all(|(a, b)| a.record == *b);
        if same && start == replay_start(log) {
            k_found = Some(k);
            break;
        }
    }
    let Some(k) = k_found else {
        let all = &model.log;
        let hi = replay_start(&all[..d]);
        let mut why = format!(
            "recovered records match no crash cut of the log (durable {d}, pending {}): \
             recovered {} records, first {:?}, last {:?}; a replay of the durable log starts at \
             {hi} ({} records)",
            model.pending(),
            records.len(),
            records.first().map(describe),
            records.last().map(describe),
            d - hi,
        );
        for r in records {
            if let Some(uid) = uid_of(r) {
                if model.gone.contains(&uid) {
                    why += &format!("; recovered a failed or lost record: {}", describe(r));
                    break;
                }
                if !all.iter().any(|x| x.uid == uid) {
                    why += &format!("; recovered a record never appended: {}", describe(r));
                    break;
                }
            }
        }
        if let Some(lost) = all[hi..d].iter().find(|x| !records.contains(&x.record)) {
            why += &format!("; lost durable record {}", describe(&lost.record));
        }
        return Err(why);
    };
    let log = &model.log[..d + k];
    for c in convs() {
        let msgs: Vec<&StoredMessage> = log
            .iter()
            .filter_map(|r| match &r.record {
                Record::Message(m) if m.conv == c => Some(m),
                _ => None,
            })
            .collect();
        let last = msgs.last().map_or(0, |m| m.seq.0);
        let durable_last = model.last_seq(c, true);
        match audit.loads.get(&c) {
            Some(Ok(s)) if s.0 == last => {}
            other => {
                return Err(format!(
                    "Load({c}) after recovery answered {other:?}: the last surviving seq is \
                     {last} (last durable {durable_last}, {k} pending records survived)"
                ))
            }
        }
        let fetched = match audit.fetches.get(&c) {
            Some(Ok(f)) => f,
            other => {
                return Err(format!(
                    "Fetch of all of {c} after recovery answered {other:?}"
                ))
            }
        };
        let Some(skipped) = msgs.len().checked_sub(fetched.len()) else {
            return Err(format!(
                "Fetch of all of {c} after recovery returned {} messages, the log holds {}",
                fetched.len(),
                msgs.len()
            ));
        };
        for (i, (got, want)) in fetched.iter().zip(&msgs[skipped..]).enumerate() {
            if got != *want {
                return Err(format!(
                    "Fetch of all of {c} after recovery: message {i} is {}#{} ({} bytes), \
                     expected {}#{} ({} bytes){}",
                    got.conv,
                    got.seq.0,
                    got.payload.len(),
                    want.conv,
                    want.seq.0,
                    want.payload.len(),
                    if got.seq == want.seq {
                        ", a different payload"
                    } else {
                        ""
                    },
                ));
            }
        }
        if let Some(m) = msgs[..skipped]
            .iter()
            .find(|m| !removed.contains(&(c, m.seq.0)))
        {
            return Err(format!(
                "Fetch of all of {c} after recovery starts at {:?}, but {}#{} was not removed \
                 by retention",
                fetched.first().map(|m| m.seq.0),
                c,
                m.seq.0
            ));
        }
    }
    Ok(k)
}

// ---------------------------------------------------------------------------------------
// The harness: the engine, its disk, its operations in flight, and the model
// ---------------------------------------------------------------------------------------

/// Segments retention removed (or is removing): what they held, as scanned when the
/// engine issued the removal.
#[derive(Clone, Debug, Default)]
struct Removed {
    contents: BTreeMap<u64, Vec<(ConvId, u64)>>,
    /// Removals the current engine issued and that did not fail.
    issued: BTreeSet<u64>,
    /// Removals the current engine issued, failed or not: a read may skip a segment from
    /// the moment its removal is decided, even if the removal then fails (and is tried
    /// again later).
    decided: BTreeSet<u64>,
}

impl Removed {
    fn issue(&mut self, disk: &MemDisk, segment: u64) {
        if let Some(bytes) = disk.file(&FileId::Segment(segment).name()) {
            let seqs = scan(bytes)
                .records
                .into_iter()
                .filter_map(|(_, r)| match r {
                    Record::Message(m) => Some((m.conv, m.seq.0)),
                    _ => None,
                })
                .collect();
            self.contents.insert(segment, seqs);
        }
        self.issued.insert(segment);
        self.decided.insert(segment);
    }

    /// Messages that retention removed or is removing (`decided`: or decided to remove).
    fn seqs(&self, disk: &MemDisk, decided: bool) -> BTreeSet<(ConvId, u64)> {
        let removing = if decided { &self.decided } else { &self.issued };
        self.contents
            .iter()
            .filter(|(n, _)| {
                removing.contains(n) || disk.file(&FileId::Segment(**n).name()).is_none()
            })
            .flat_map(|(_, seqs)| seqs.iter().copied())
            .collect()
    }

    fn restart(&mut self) {
        self.issued.clear();
        self.decided.clear();
    }
}

/// The highest-numbered segment file on the disk: the open segment.
fn open_segment(disk: &MemDisk) -> Option<String> {
    disk.names()
        .into_iter()
        .filter(|n| matches!(FileId::parse(n), Some(Ok(FileId::Segment(_)))))
        .max()
}

fn used(disk: &MemDisk) -> u64 {
    disk.names()
        .iter()
        .map(|n| disk.file(n).map_or(0, |f| f.len() as u64))
        .sum()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Recovering,
    Running,
    Stopped,
    Closing,
    Closed,
}

#[derive(Debug)]
struct FetchQ {
    conv: ConvId,
    from: u64,
    to: u64,
    limit: u32,
    /// The last durable seq when it was asked.
    durable: u64,
    excused: bool,
}

#[derive(Debug)]
struct LoadQ {
    durable: u64,
    excused: bool,
}

/// What happened across cases, for the coverage test.
#[derive(Clone, Debug, Default)]
struct Stats {
    appends: u64,
    durable_events: u64,
    failed_events: u64,
    faults: u64,
    no_space: u64,
    crashes: u64,
    restarts: u64,
    probes: u64,
    recoveries: u64,
    survived_pending: u64,
    lost_pending: u64,
    replays_from_checkpoint: u64,
    rotations: u64,
    removals: u64,
    fetches_ok: u64,
    fetches_err: u64,
    fetches_past_removed: u64,
    loads_ok: u64,
    stopped: u64,
    checkpoints_appended: u64,
    closed: u64,
}

#[cfg(feature = "planted-bugs")]
type Plant = Option<imgate_core::log_engine::PlantedLogBug>;
#[cfg(not(feature = "planted-bugs"))]
type Plant = Option<()>;

struct Harness {
    config: LogConfig,
    fault_pct: u8,
    disk_full: bool,
    plant: Plant,
    disk: MemDisk,
    engine: LogEngine,
    state: State,
    /// The engine's number (a new one at each restart).
    gen: u64,
    /// The last Lsn appended to this engine, and the last it reported durable.
    lsn: u64,
    durable_lsn: u64,
    now: Instant,
    queued: Vec<Io>,
    started: Vec<(Io, Started)>,
    /// A fault was injected into this engine's operations (or the disk was full).
    faulted: bool,
    /// Recoveries that stopped in a row (after two, recovery runs without faults).
    failed_recoveries: u32,
    /// The engine asked for a checkpoint that was not appended yet.
    due: bool,
    /// The engine asked for a checkpoint that is not durable yet (appended or not).
    asked: bool,
    /// A failure lost an asked checkpoint: the engine asks again once this many durable
    /// messages follow the last checkpoint (its backoff, `checkpoint_lost`).
    retry_at: u64,
    model: Model,
    removed: Removed,
    fetches: BTreeMap<u64, FetchQ>,
    loads: BTreeMap<ConvId, LoadQ>,
    next_fetch: u64,
    /// Recovery finished: its records, until the audit has run.
    recovered: Option<Recovered>,
    audit: Option<Audit>,
    /// The engine was closed: the next recovery must find a clean tail.
    closed: bool,
    stats: Stats,
}

type Check = Result<(), String>;

fn new_engine(config: &LogConfig, now: Instant, plant: Plant) -> LogEngine {
    #[allow(unused_mut)]
    let mut engine = LogEngine::new(config.clone(), now);
    #[cfg(feature = "planted-bugs")]
    if let Some(bug) = plant {
        engine.plant(bug);
    }
    let _ = plant;
    engine
}

impl Harness {
    fn new(case: &Case, plant: Plant) -> Harness {
        let config = case.config();
        let now = Instant::from_millis(1_700_000_000_000);
        let mut disk = MemDisk::new(case.block);
        disk.capacity = None;
        Harness {
            engine: new_engine(&config, now, plant),
            config,
            fault_pct: case.fault_pct,
            disk_full: case.disk_full,
            plant,
            disk,
            state: State::Recovering,
            gen: 1,
            lsn: 0,
            durable_lsn: 0,
            now,
            queued: Vec::new(),
            started: Vec::new(),
            faulted: false,
            failed_recoveries: 0,
            due: false,
            asked: false,
            retry_at: 0,
            model: Model::default(),
            removed: Removed::default(),
            fetches: BTreeMap::new(),
            loads: BTreeMap::new(),
            next_fetch: 1,
            recovered: None,
            audit: None,
            closed: false,
            stats: Stats::default(),
        }
    }

    fn running(&self) -> bool {
        self.state == State::Running
    }

    /// Takes the engine's operations and events; runs the audit when recovery finished.
    fn collect(&mut self) -> Check {
        loop {
            while let Some(io) = self.engine.poll_io() {
                if let Op::Remove(FileId::Segment(n)) = io.op {
                    self.removed.issue(&self.disk, n);
                    self.stats.removals += 1;
                }
                if matches!(io.op, Op::Create(FileId::Segment(n)) if n > 1) {
                    self.stats.rotations += 1;
                }
                self.queued.push(io);
            }
            let Some(event) = self.engine.poll_event() else {
                break;
            };
            self.event(event)?;
        }
        if let Some(recovered) = self.recovered.take() {
            self.run_audit(recovered)?;
        }
        Ok(())
    }

    fn event(&mut self, event: LogEvent) -> Check {
        if tracing() {
            match &event {
                LogEvent::Recovered(r) => eprintln!("  recovered {} records", r.records.len()),
                e => eprintln!("  event {e:?}"),
            }
        }
        let event = match self.audit.as_mut() {
            Some(audit) => match audit.take(event) {
                Some(e) => e,
                None => return Ok(()),
            },
            None => event,
        };
        match event {
            LogEvent::Recovered(r) => {
                if self.state != State::Recovering {
                    return Err(format!("Recovered while {:?}", self.state));
                }
                self.recovered = Some(r);
            }
            LogEvent::Durable(lsn) => self.durable(lsn.0)?,
            LogEvent::Failed => self.failed()?,
            LogEvent::Fetched { fetch, result } => self.fetched(fetch, result)?,
            LogEvent::Loaded { conv, result } => self.loaded(conv, result)?,
            LogEvent::CheckpointDue => {
                self.due = true;
                self.asked = true;
            }
            LogEvent::Stopped(e) => {
                let recovering = self.state == State::Recovering;
                if !(matches!(e, LogError::Io { .. }) && self.faulted) {
                    return Err(format!(
                        "the log stopped ({}): {e} (faults injected: {})",
                        if recovering { "recovery" } else { "running" },
                        self.faulted
                    ));
                }
                if recovering {
                    self.failed_recoveries += 1;
                }
                self.stats.stopped += 1;
                self.state = State::Stopped;
            }
            LogEvent::Closed => {
                if self.state != State::Closing {
                    return Err(format!("Closed while {:?}", self.state));
                }
                self.state = State::Closed;
            }
        }
        Ok(())
    }

    fn durable(&mut self, lsn: u64) -> Check {
        if lsn < self.durable_lsn || lsn > self.lsn {
            return Err(format!(
                "Durable({lsn}) after Durable({}), with {} appended",
                self.durable_lsn, self.lsn
            ));
        }
        self.durable_lsn = lsn;
        self.stats.durable_events += 1;
        let mut newly = Vec::new();
        for r in &mut self.model.log {
            if !r.durable && r.gen == self.gen && r.lsn <= lsn {
                r.durable = true;
                newly.push(r.uid);
            }
        }
        let d = self.model.durable_len();
        if self.model.log[d..].iter().any(|r| r.durable) {
            return Err(format!("Durable({lsn}) skipped an append before it"));
        }
        let checkpointed = self.model.log.iter().any(|r| {
            newly.contains(&r.uid) && matches!(r.record, Record::Checkpoint { last: true, .. })
        });
        if checkpointed {
            self.asked = false;
            self.retry_at = 0;
        }
        if newly.is_empty() {
            return Ok(());
        }
        // Property 1, at the moment of the claim: a power loss now keeps them.
        let name = open_segment(&self.disk).ok_or("Durable with no segment on the disk")?;
        let kept: BTreeSet<u64> = scan(self.disk.durable(&name).unwrap_or_default())
            .records
            .iter()
            .filter_map(|(_, r)| uid_of(r))
            .collect();
        if let Some(lost) = newly.iter().find(|u| !kept.contains(u)) {
            let r = self
                .model
                .log
                .iter()
                .find(|r| r.uid == *lost)
                .expect("just marked");
            return Err(format!(
                "Durable({lsn}) reported {} durable, but a power loss now would lose it",
                describe(&r.record)
            ));
        }
        Ok(())
    }

    fn failed(&mut self) -> Check {
        self.stats.failed_events += 1;
        let d = self.model.durable_len();
        for r in self.model.log.drain(d..) {
            self.model.gone.insert(r.uid);
        }
        if std::mem::take(&mut self.asked) {
            let gap = (self.config.checkpoint_messages / 8).max(1);
            self.retry_at = self.model.since_checkpoint() as u64 + gap;
        }
        // I5: the failed records are gone from the disk before their seqs are handed out
        // again.
        if let Some(name) = open_segment(&self.disk) {
            for (offset, r) in scan(self.disk.file(&name).unwrap_or_default()).records {
                let ok = uid_of(&r).is_some_and(|u| self.model.log[..d].iter().any(|x| x.uid == u));
                if !ok {
                    return Err(format!(
                        "Failed reported, but {name} still holds {} at {offset}, which is not durable",
                        describe(&r)
                    ));
                }
            }
        }
        Ok(())
    }

    fn fetched(&mut self, fetch: u64, result: Result<Vec<StoredMessage>, ()>) -> Check {
        let q = self
            .fetches
            .remove(&fetch)
            .ok_or_else(|| format!("Fetched {fetch}, which was not asked or answered twice"))?;
        let c = q.conv;
        let msgs = match result {
            Ok(m) => m,
            Err(()) if q.excused => {
                self.stats.fetches_err += 1;
                return Ok(());
            }
            Err(()) => return Err(format!("{q:?} failed, though no read fault was injected")),
        };
        self.stats.fetches_ok += 1;
        let removed = self.removed.seqs(&self.disk, true);
        let lo = q.from.max(1);
        if msgs.len() > q.limit as usize {
            return Err(format!("{q:?} returned {} messages", msgs.len()));
        }
        for (i, m) in msgs.iter().enumerate() {
            let first = msgs[0].seq.0;
            if m.conv != c || m.seq.0 != first + i as u64 || m.seq.0 < lo || m.seq.0 > q.to {
                return Err(format!(
                    "{q:?} returned seqs {:?} (convs {:?})",
                    msgs.iter().map(|m| m.seq.0).collect::<Vec<_>>(),
                    msgs.iter().map(|m| m.conv).collect::<BTreeSet<_>>()
                ));
            }
            match self.model.durable_message(c, m.seq.0) {
                Some(want) if want == m => {}
                Some(_) => {
                    return Err(format!(
                        "{q:?} returned {c}#{} with another payload",
                        m.seq.0
                    ))
                }
                None => {
                    let uid = uid_of(&Record::Message(m.clone()));
                    let gone = uid.is_some_and(|u| self.model.gone.contains(&u));
                    return Err(format!(
                        "{q:?} returned {c}#{}, which is not durable (uid {uid:?}, failed or \
                         lost: {gone})",
                        m.seq.0
                    ));
                }
            }
        }
        // Where the answer starts: only past removed history.
        let first = msgs.first().map_or(q.to.min(q.durable) + 1, |m| m.seq.0);
        if q.limit > 0 || !msgs.is_empty() {
            if let Some(s) = (lo..first).find(|s| !removed.contains(&(c, *s))) {
                return Err(format!(
                    "{q:?} answered {:?}: it skipped {c}#{s}, which retention did not remove",
                    msgs.iter().map(|m| m.seq.0).collect::<Vec<_>>()
                ));
            }
            if first > lo {
                self.stats.fetches_past_removed += 1;
            }
        }
        // Where it ends: not short of what was durable when asked.
        if let Some(last) = msgs.last() {
            let last = last.seq.0;
            if last < q.to && msgs.len() < q.limit as usize && last < q.durable {
                return Err(format!(
                    "{q:?} stopped at {last}, short of the durable {}",
                    q.durable
                ));
            }
        }
        Ok(())
    }

    fn loaded(&mut self, c: ConvId, result: Result<Seq, ()>) -> Check {
        let q = self
            .loads
            .remove(&c)
            .ok_or_else(|| format!("Loaded {c}, which was not asked"))?;
        match result {
            Ok(s) => {
                self.stats.loads_ok += 1;
                let now = self.model.last_seq(c, true);
                if s.0 < q.durable || s.0 > now {
                    return Err(format!(
                        "Load({c}) answered {}: the last durable seq was {} when asked and is {now} now",
                        s.0, q.durable
                    ));
                }
                Ok(())
            }
            Err(()) if q.excused => Ok(()),
            Err(()) => Err(format!(
                "Load({c}) failed, though no read fault was injected"
            )),
        }
    }

    /// Queries in flight may now fail without a bug: a read failed under them.
    fn excuse(&mut self) {
        for q in self.fetches.values_mut() {
            q.excused = true;
        }
        for q in self.loads.values_mut() {
            q.excused = true;
        }
    }

    fn run_audit(&mut self, recovered: Recovered) -> Check {
        self.stats.recoveries += 1;
        if matches!(recovered.records.first(), Some(Record::Checkpoint { .. })) {
            self.stats.replays_from_checkpoint += 1;
        }
        let closed_before = self.closed && recovered.truncated_bytes > 0;
        self.closed = false;
        self.audit = Some(Audit::new(recovered.records));
        Audit::ask(&mut self.engine, self.now);
        self.collect()?;
        self.drive(|h| h.audit.as_ref().is_some_and(Audit::done))?;
        let audit = self.audit.take().expect("the audit runs");
        if !audit.done() {
            return Err("the audit's reads were never answered".into());
        }
        let removed = self.removed.seqs(&self.disk, false);
        let pending = self.model.pending();
        let k = check_recovery(&self.model, &audit, &removed)?;
        self.stats.survived_pending += k as u64;
        self.stats.lost_pending += (pending - k) as u64;
        self.model.settle(k);
        if closed_before {
            return Err("a log closed cleanly was recovered with a tail to cut".into());
        }
        self.failed_recoveries = 0;
        self.state = State::Running;
        Ok(())
    }

    /// Performs operations in order, without faults, until `until` holds or none is left.
    fn drive(&mut self, until: impl Fn(&Harness) -> bool) -> Check {
        for _ in 0..DRIVE_MAX {
            if until(self) {
                return Ok(());
            }
            if !self.started.is_empty() {
                let (io, started) = self.started.remove(0);
                self.complete(io, started)?;
            } else if !self.queued.is_empty() {
                let io = self.queued.remove(0);
                let started = self.disk.start(&io.op, None, 0);
                self.complete(io, started)?;
            } else {
                return Ok(());
            }
        }
        Err("the engine never stops issuing operations".into())
    }

    fn complete(&mut self, io: Io, started: Started) -> Check {
        let result = self.disk.finish(started);
        if tracing() {
            eprintln!(
                "  finish {} -> {:?}",
                op_name(&io),
                result.as_ref().map(|_| ())
            );
        }
        match (&io.op, &result) {
            (_, Err(IoError::NoSpace)) => {
                self.faulted = true;
                self.stats.no_space += 1;
            }
            (Op::Remove(FileId::Segment(n)), Err(_)) => {
                self.removed.issued.remove(n);
            }
            _ => {}
        }
        if self.state == State::Stopped {
            return Ok(());
        }
        self.engine.handle_completion(self.now, io.id, result);
        self.collect()
    }

    /// A new engine on the disk (after a power loss if `crash`): operations in flight are
    /// lost; the pending records stay pending until the audit finds what survived.
    fn restart(&mut self, crash: Option<usize>) -> Check {
        self.queued.clear();
        self.started.clear();
        if let Some(keep) = crash {
            self.disk.crash(keep);
            self.stats.crashes += 1;
        } else {
            self.stats.restarts += 1;
        }
        self.gen += 1;
        self.lsn = 0;
        self.durable_lsn = 0;
        self.due = false;
        self.asked = false;
        self.retry_at = 0;
        self.faulted = false;
        self.fetches.clear();
        self.loads.clear();
        self.removed.restart();
        self.state = State::Recovering;
        self.engine = new_engine(&self.config, self.now, self.plant);
        self.collect()
    }

    fn append(&mut self, records: Vec<Record>) -> Check {
        self.lsn += 1;
        self.stats.appends += 1;
        let mut bytes = Vec::new();
        for record in records {
            encode_record(&record, &mut bytes);
            let uid = uid_of(&record).expect("our records carry a uid");
            self.model.log.push(Rec {
                record,
                uid,
                gen: self.gen,
                lsn: self.lsn,
                durable: false,
            });
        }
        self.engine.append(self.now, Lsn(self.lsn), bytes);
        self.collect()
    }

    /// One operation in order, without a fault: progress when the action cannot apply.
    fn step(&mut self) -> Check {
        if !self.started.is_empty() {
            let (io, started) = self.started.remove(0);
            self.complete(io, started)
        } else if !self.queued.is_empty() {
            let io = self.queued.remove(0);
            let started = self.disk.start(&io.op, None, 0);
            self.complete(io, started)
        } else {
            Ok(())
        }
    }

    fn act(&mut self, act: &Act) -> Check {
        self.now = self.now + Duration::from_millis(1);
        if self.state == State::Stopped {
            return self.restart(None);
        }
        match act {
            Act::Append(msgs) => {
                if !self.running() {
                    return self.step();
                }
                let mut records = Vec::new();
                for &(c, len) in msgs {
                    let c = conv(c as usize);
                    let seq = self.model.last_seq(c, false)
                        + records
                            .iter()
                            .filter(|r| matches!(r, Record::Message(m) if m.conv == c))
                            .count() as u64
                        + 1;
                    let uid = self.model.uid();
                    records.push(message(c, seq, uid, len as usize));
                }
                if records.is_empty() {
                    // An empty append: durable with what is before it.
                    self.lsn += 1;
                    self.stats.appends += 1;
                    self.engine.append(self.now, Lsn(self.lsn), Vec::new());
                    return self.collect();
                }
                self.append(records)
            }
            Act::Checkpoint { two } => {
                if !self.running() || !self.due {
                    return self.step();
                }
                self.due = false;
                self.stats.checkpoints_appended += 1;
                let records = if *two {
                    let (a, b) = (self.model.uid(), self.model.uid());
                    vec![checkpoint(a, 0, false), checkpoint(b, 1, true)]
                } else {
                    vec![checkpoint(self.model.uid(), 0, true)]
                };
                self.append(records)
            }
            Act::Start { pick, roll, keep } => {
                if self.queued.is_empty() {
                    return Ok(());
                }
                let io = self.queued.remove(*pick as usize % self.queued.len());
                let rate = if self.state == State::Recovering {
                    if self.failed_recoveries >= 2 {
                        0
                    } else {
                        self.fault_pct / 2
                    }
                } else {
                    self.fault_pct
                };
                let can_fail = !matches!(io.op, Op::List);
                let fault = (can_fail && *roll % 100 < rate).then_some(IoError::Io);
                let mut keep = *keep as usize;
                if let (Some(_), Op::Sync(file)) = (fault, &io.op) {
                    // A failed sync may drop the dirty pages (keep 0). Not while a sync
                    // issued before it is unfinished: that one may then succeed without
                    // having written them, and the engine cannot tell; a buffered log
                    // therefore syncs one at a time (see
                    // `a_buffered_log_syncs_one_at_a_time_so_no_sync_hides_a_failed_writeback`).
                    let earlier = self
                        .queued
                        .iter()
                        .chain(self.started.iter().map(|(o, _)| o))
                        .any(|o| o.op == Op::Sync(*file) && o.id < io.id);
                    if earlier {
                        keep = keep.max(1);
                    }
                }
                if fault.is_some() {
                    self.faulted = true;
                    self.stats.faults += 1;
                    if matches!(io.op, Op::Read { .. }) {
                        self.excuse();
                    }
                }
                if tracing() {
                    eprintln!("  start {} (fault {fault:?}, keep {keep})", op_name(&io));
                }
                let started = self.disk.start(&io.op, fault, keep);
                self.started.push((io, started));
                Ok(())
            }
            Act::Finish { pick } => {
                if self.started.is_empty() {
                    return Ok(());
                }
                let (io, started) = self.started.remove(*pick as usize % self.started.len());
                self.complete(io, started)
            }
            Act::Fetch {
                conv: c,
                from,
                span,
                limit,
            } => {
                if !self.running() {
                    return self.step();
                }
                let c = conv(*c as usize);
                let durable = self.model.last_seq(c, true);
                let from = u64::from(*from) % (durable + 3);
                let to = from + u64::from(*span);
                let limit = u32::from(*limit);
                let id = self.next_fetch;
                self.next_fetch += 1;
                self.fetches.insert(
                    id,
                    FetchQ {
                        conv: c,
                        from,
                        to,
                        limit,
                        durable,
                        excused: false,
                    },
                );
                self.engine
                    .fetch(self.now, id, c, Seq(from), Seq(to), limit);
                self.collect()
            }
            Act::Load { conv: c } => {
                let c = conv(*c as usize);
                if !self.running() || self.loads.contains_key(&c) {
                    return self.step();
                }
                let durable = self.model.last_seq(c, true);
                self.loads.insert(
                    c,
                    LoadQ {
                        durable,
                        excused: false,
                    },
                );
                self.engine.load(self.now, c);
                self.collect()
            }
            Act::Tick { ms } => {
                self.now = self.now + Duration::from_millis(u64::from(*ms));
                if self.running() {
                    self.engine.handle_timeout(self.now);
                    return self.collect();
                }
                Ok(())
            }
            Act::Crash { keep } => self.restart(Some(*keep as usize)),
            Act::Restart => self.restart(None),
            Act::Probe { keep } => self.probe(*keep as usize),
            Act::Capacity { room } => {
                if self.disk_full {
                    self.disk.capacity = room.map(|r| used(&self.disk) + u64::from(r) * 256);
                }
                Ok(())
            }
            Act::Drain => self.drive(|_| false),
        }
    }

    /// A copy of the disk loses power now; a fresh engine recovers it, without faults, and
    /// what it finds is checked against the model (which does not change).
    fn probe(&mut self, keep: usize) -> Check {
        self.stats.probes += 1;
        let mut disk = self.disk.clone();
        disk.capacity = None;
        disk.crash(keep);
        let mut removed = self.removed.clone();
        removed.restart();
        let mut engine = new_engine(&self.config, self.now, self.plant);
        let mut audit: Option<Audit> = None;
        for _ in 0..DRIVE_MAX {
            while let Some(event) = engine.poll_event() {
                let event = match audit.as_mut() {
                    Some(a) => match a.take(event) {
                        Some(e) => e,
                        None => continue,
                    },
                    None => event,
                };
                match event {
                    LogEvent::Recovered(r) => {
                        audit = Some(Audit::new(r.records));
                        Audit::ask(&mut engine, self.now);
                    }
                    LogEvent::Stopped(e) => return Err(format!("probe: the log stopped: {e}")),
                    _ => {}
                }
            }
            if audit.as_ref().is_some_and(Audit::done) {
                break;
            }
            let Some(io) = engine.poll_io() else {
                return Err("probe: recovery or its reads never finished".into());
            };
            if let Op::Remove(FileId::Segment(n)) = io.op {
                removed.issue(&disk, n);
            }
            let result = disk.execute(&io.op);
            engine.handle_completion(self.now, io.id, result);
        }
        let audit = audit.ok_or("probe: recovery never finished")?;
        check_recovery(&self.model, &audit, &removed.seqs(&disk, false))
            .map(|_| ())
            .map_err(|e| format!("probe (power loss now, {keep} blocks kept): {e}"))
    }

    /// The schedule is over: the faults stop, every operation is performed, checkpoints
    /// are appended when asked; then everything must be resolved, and a restart and a power
    /// loss must find the log as it is.
    fn finish(&mut self, close: bool) -> Check {
        self.fault_pct = 0;
        self.disk.capacity = None;
        for _ in 0..DRIVE_MAX {
            if self.state == State::Stopped {
                self.restart(None)?;
            }
            if self.running() && self.due {
                self.act(&Act::Checkpoint { two: false })?;
                continue;
            }
            if self.queued.is_empty() && self.started.is_empty() {
                break;
            }
            self.step()?;
        }
        if !self.running() {
            return Err(format!(
                "the log is {:?} once the faults stopped",
                self.state
            ));
        }
        if !self.engine.is_idle() {
            return Err("the engine is not idle with nothing in flight".into());
        }
        if let Some(r) = self.model.log.iter().find(|r| !r.durable) {
            return Err(format!(
                "{} was never reported durable or failed",
                describe(&r.record)
            ));
        }
        if let Some(q) = self.fetches.values().next() {
            return Err(format!("{q:?} was never answered"));
        }
        if let Some(c) = self.loads.keys().next() {
            return Err(format!("Load({c}) was never answered"));
        }
        // After a failure lost a checkpoint the engine waits for an eighth of the
        // interval more durable messages before asking again (`checkpoint_lost`).
        let since = self.model.since_checkpoint() as u64;
        if since >= self.config.checkpoint_messages.max(self.retry_at) {
            return Err(format!(
                "{since} durable messages follow the last checkpoint (checkpoint_messages {}), \
                 and the engine does not ask for one",
                self.config.checkpoint_messages
            ));
        }
        if close {
            self.state = State::Closing;
            self.engine.close(self.now);
            self.collect()?;
            self.drive(|h| h.state == State::Closed)?;
            if self.state != State::Closed {
                return Err("close never finished".into());
            }
            self.stats.closed += 1;
            self.closed = true;
        }
        for crash in [None, Some(0)] {
            self.restart(crash)?;
            self.drive(|h| h.running())?;
            if !self.running() {
                return Err(format!("recovery without faults ended {:?}", self.state));
            }
        }
        Ok(())
    }
}

fn run(case: &Case, plant: Plant) -> Result<Stats, String> {
    let mut h = Harness::new(case, plant);
    h.collect()?;
    for (i, act) in case.acts.iter().enumerate() {
        if tracing() {
            eprintln!("step {i}: {act:?}");
        }
        h.act(act).map_err(|e| format!("step {i} ({act:?}): {e}"))?;
    }
    if tracing() {
        eprintln!("the end");
    }
    h.finish(case.close_at_end)
        .map_err(|e| format!("at the end: {e}"))?;
    Ok(h.stats)
}

/// `IMGATE_MODEL_TRACE=1` prints every step, operation and event (run one case).
fn tracing() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("IMGATE_MODEL_TRACE").is_some())
}

fn op_name(io: &Io) -> String {
    match &io.op {
        Op::Write { file, at, bytes } => {
            format!("#{} write {file:?} at {at}, {} bytes", io.id.0, bytes.len())
        }
        op => format!("#{} {op:?}", io.id.0),
    }
}

fn cases() -> u32 {
    ["IMGATE_PROPTEST_CASES", "PROPTEST_CASES"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(128)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_log_engine_keeps_what_it_reports_durable_and_nothing_else(case in case()) {
        run(&case, None).map_err(TestCaseError::fail)?;
    }
}

/// The schedules reach what the properties are about: a model that never crashes with a
/// pending tail, or never sees retention, proves nothing about them.
#[test]
fn the_schedules_reach_every_situation() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut total = Stats::default();
    for _ in 0..40 {
        let case = case().new_tree(&mut runner).expect("a case").current();
        let s = run(&case, None).unwrap_or_else(|e| panic!("{e}\n{case:?}"));
        macro_rules! add {
            ($($f:ident),*) => { $(total.$f += s.$f;)* };
        }
        add!(
            appends,
            durable_events,
            failed_events,
            faults,
            no_space,
            crashes,
            restarts,
            probes,
            recoveries,
            survived_pending,
            lost_pending,
            replays_from_checkpoint,
            rotations,
            removals,
            fetches_ok,
            fetches_err,
            fetches_past_removed,
            loads_ok,
            stopped,
            checkpoints_appended,
            closed
        );
    }
    let s = &total;
    for (what, n) in [
        ("durable events", s.durable_events),
        ("failed events", s.failed_events),
        ("faults", s.faults),
        ("full disks", s.no_space),
        ("crashes", s.crashes),
        ("restarts", s.restarts),
        ("probes", s.probes),
        ("pending records that survived a crash", s.survived_pending),
        ("pending records lost in a crash", s.lost_pending),
        ("replays from a checkpoint", s.replays_from_checkpoint),
        ("rotations", s.rotations),
        ("retention removals", s.removals),
        ("failed fetches", s.fetches_err),
        ("fetches past removed history", s.fetches_past_removed),
        ("loads", s.loads_ok),
        ("stopped logs", s.stopped),
        ("checkpoints", s.checkpoints_appended),
    ] {
        assert!(n > 0, "no {what} in 40 cases: {total:?}");
    }
    println!("{total:?}");
}

/// Every bug the engine can plant fails the model within a few hundred cases.
#[cfg(feature = "planted-bugs")]
#[test]
fn planted_bugs_are_caught() {
    use imgate_core::log_engine::PlantedLogBug;
    use proptest::strategy::ValueTree;
    for bug in [
        PlantedLogBug::AckBeforeDurable,
        PlantedLogBug::NoTruncateOnFailure,
        PlantedLogBug::TornTailKept,
        PlantedLogBug::SyncCoversLaterWrites,
        PlantedLogBug::IndexPastDurable,
        PlantedLogBug::CheckpointAheadOfDurable,
    ] {
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let caught = (0..500).find_map(|i| {
            let case = case().new_tree(&mut runner).expect("a case").current();
            let outcome = std::panic::catch_unwind(|| run(&case, Some(bug)));
            match outcome {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some((i, e)),
                Err(_) => Some((i, "the engine panicked".to_string())),
            }
        });
        let (i, why) = caught.unwrap_or_else(|| panic!("{bug:?} was not caught in 500 cases"));
        println!("{bug:?}: caught at case {i}: {why}");
    }
}

/// Found by the model: recovery served records that were written but never synced (a
/// process restart keeps the page cache), without making them durable; a power loss then
/// lost them, though the shard had served them as durable (and its dedupe would ack a
/// retry of them). Recovery now syncs the open segment before handing its records over.
#[test]
fn what_recovery_hands_over_survives_a_power_loss_after_a_process_restart() {
    let config = LogConfig::default();
    let now = Instant::from_millis(1_700_000_000_000);
    let mut disk = MemDisk::new(512);
    let recover = |disk: &mut MemDisk| -> Vec<Record> {
        let mut engine = LogEngine::new(config.clone(), now);
        let mut records = None;
        while let Some(io) = engine.poll_io() {
            let result = disk.execute(&io.op);
            engine.handle_completion(now, io.id, result);
            while let Some(event) = engine.poll_event() {
                if let LogEvent::Recovered(r) = event {
                    records = Some(r.records);
                }
            }
        }
        records.expect("recovered")
    };
    recover(&mut disk);
    let c = conv(0);
    let m = message(c, 1, 1, 10);
    let mut engine = LogEngine::new(config.clone(), now);
    while let Some(io) = engine.poll_io() {
        let result = disk.execute(&io.op);
        engine.handle_completion(now, io.id, result);
    }
    let mut bytes = Vec::new();
    encode_record(&m, &mut bytes);
    engine.append(now, Lsn(1), bytes);
    let write = engine.poll_io().expect("a write");
    assert!(matches!(write.op, Op::Write { .. }));
    disk.execute(&write.op).expect("written");
    // The process dies before the sync: the page cache keeps the write.
    drop(engine);
    assert_eq!(
        recover(&mut disk),
        vec![m.clone()],
        "recovered from the page cache"
    );
    // What was handed over is durable: a power loss keeps it.
    disk.crash(0);
    assert_eq!(recover(&mut disk), vec![m]);
}

/// Runs `engine`'s operations on `disk` in order, failing those `fail` picks; returns the
/// events.
fn drive_failing(
    engine: &mut LogEngine,
    disk: &mut MemDisk,
    mut fail: impl FnMut(&Op) -> bool,
) -> Vec<LogEvent> {
    let now = Instant::from_millis(1_700_000_000_000);
    let mut events = Vec::new();
    loop {
        while let Some(event) = engine.poll_event() {
            events.push(event);
        }
        let Some(io) = engine.poll_io() else {
            return events;
        };
        let fault = fail(&io.op).then_some(IoError::Io);
        let started = disk.start(&io.op, fault, 0);
        let result = disk.finish(started);
        engine.handle_completion(now, io.id, result);
    }
}

/// Found by the model: a checkpoint waiting for a rotation failed with it (the rotation's
/// Failed drops the appends queued behind it), but the engine still counted it as asked
/// for and never asked again: no checkpoint was ever written after, so start-up replays
/// grew without bound and retention (which keeps everything from the last checkpoint on)
/// stopped removing anything. A failed rotation now asks again, as a failed write does.
#[test]
fn a_checkpoint_lost_with_a_failed_rotation_is_asked_for_again() {
    let config = LogConfig {
        segment_messages: 1,
        checkpoint_messages: 1,
        ..LogConfig::default()
    };
    let now = Instant::from_millis(1_700_000_000_000);
    let mut disk = MemDisk::new(512);
    let mut engine = LogEngine::new(config, now);
    drive_failing(&mut engine, &mut disk, |_| false);
    let mut bytes = Vec::new();
    encode_record(&message(conv(0), 1, 1, 10), &mut bytes);
    engine.append(now, Lsn(1), bytes);
    let events = drive_failing(&mut engine, &mut disk, |_| false);
    assert!(
        events.iter().any(|e| matches!(e, LogEvent::CheckpointDue)),
        "{events:?}"
    );
    // The segment is full: the checkpoint waits for the rotation, whose first step fails.
    let mut bytes = Vec::new();
    encode_record(&checkpoint(2, 0, true), &mut bytes);
    engine.append(now, Lsn(2), bytes);
    let events = drive_failing(&mut engine, &mut disk, |op| {
        matches!(op, Op::Create(FileId::Index(_)))
    });
    let failed = events.iter().position(|e| matches!(e, LogEvent::Failed));
    assert!(failed.is_some(), "{events:?}");
    // Asked again once more messages are durable (a backoff, so that a checkpoint that
    // keeps failing does not fail every batch it joins).
    let mut bytes = Vec::new();
    encode_record(&message(conv(0), 2, 3, 10), &mut bytes);
    engine.append(now, Lsn(3), bytes);
    let events = drive_failing(&mut engine, &mut disk, |_| false);
    assert!(
        events.iter().any(|e| matches!(e, LogEvent::CheckpointDue)),
        "the checkpoint failed and is not asked for again: {events:?}"
    );
}

/// Found by the model: messages made durable by the same sync as a checkpoint before them
/// were not counted towards the next checkpoint (the count was reset after them), so the
/// engine did not ask for one though `checkpoint_messages` messages followed the last.
#[test]
fn messages_durable_with_a_checkpoint_before_them_count_towards_the_next() {
    let config = LogConfig {
        checkpoint_messages: 2,
        ..LogConfig::default()
    };
    let now = Instant::from_millis(1_700_000_000_000);
    let mut disk = MemDisk::new(512);
    let mut engine = LogEngine::new(config, now);
    drive_failing(&mut engine, &mut disk, |_| false);
    let frames = |records: &[Record]| {
        let mut bytes = Vec::new();
        for r in records {
            encode_record(r, &mut bytes);
        }
        bytes
    };
    let c = conv(0);
    engine.append(
        now,
        Lsn(1),
        frames(&[message(c, 1, 1, 10), message(c, 2, 2, 10)]),
    );
    let events = drive_failing(&mut engine, &mut disk, |_| false);
    assert!(
        events.iter().any(|e| matches!(e, LogEvent::CheckpointDue)),
        "{events:?}"
    );
    // The checkpoint and two more messages, written and synced together.
    engine.append(now, Lsn(2), frames(&[checkpoint(3, 0, true)]));
    engine.append(
        now,
        Lsn(3),
        frames(&[message(c, 3, 4, 10), message(c, 4, 5, 10)]),
    );
    let events = drive_failing(&mut engine, &mut disk, |_| false);
    assert!(
        events.iter().any(|e| matches!(e, LogEvent::CheckpointDue)),
        "two messages follow the checkpoint: {events:?}"
    );
}

/// Found by the model: a read of a removed segment's summary file that failed (EIO) was
/// taken for a missing or damaged summary, and recovery refused the log with
/// `RemovedSummary` (damage an operator would have to repair) instead of reporting the
/// I/O error, after which a restart would have recovered.
#[test]
fn a_failed_read_of_a_removed_segments_summary_is_an_io_error() {
    let config = LogConfig {
        segment_messages: 1,
        checkpoint_messages: 1,
        retention_bytes: Some(1),
        ..LogConfig::default()
    };
    let now = Instant::from_millis(1_700_000_000_000);
    let mut disk = MemDisk::new(512);
    let mut engine = LogEngine::new(config.clone(), now);
    drive_failing(&mut engine, &mut disk, |_| false);
    let c = conv(0);
    let mut uid = 0;
    for seq in 1..=4 {
        uid += 1;
        let mut bytes = Vec::new();
        encode_record(&message(c, seq, uid, 10), &mut bytes);
        engine.append(now, Lsn(uid), bytes);
        let events = drive_failing(&mut engine, &mut disk, |_| false);
        if events.iter().any(|e| matches!(e, LogEvent::CheckpointDue)) {
            uid += 1;
            let mut bytes = Vec::new();
            encode_record(&checkpoint(uid, 0, true), &mut bytes);
            engine.append(now, Lsn(uid), bytes);
            drive_failing(&mut engine, &mut disk, |_| false);
        }
    }
    let removed = FileId::Segment(1).name();
    assert!(
        disk.file(&removed).is_none(),
        "retention removed segment 1: {:?}",
        disk.names()
    );
    let mut engine = LogEngine::new(config, now);
    let events = drive_failing(&mut engine, &mut disk, |op| {
        matches!(
            op,
            Op::Read {
                file: FileId::Summary(1),
                ..
            }
        )
    });
    match events.last() {
        Some(LogEvent::Stopped(LogError::Io { .. })) => {}
        other => panic!("a failed read stopped recovery with {other:?}"),
    }
}

/// Found by the model: retention issued the removals of several segments at once, and the
/// driver may perform operations in flight in any order; a crash after a newer segment was
/// removed but before an older one was left a gap (segment 1 present, segment 2 missing),
/// and recovery then refused the log for good (`MissingSegment`). Retention now removes
/// one segment at a time, oldest first, so the segments left are always consecutive.
#[test]
fn retention_never_leaves_a_gap_whatever_order_removals_are_performed_in() {
    let config = LogConfig {
        segment_messages: 1,
        checkpoint_messages: 1_000,
        retention_bytes: Some(1),
        ..LogConfig::default()
    };
    let now = Instant::from_millis(1_700_000_000_000);
    let mut disk = MemDisk::new(512);
    let mut engine = LogEngine::new(config.clone(), now);
    drive_failing(&mut engine, &mut disk, |_| false);
    let c = conv(0);
    let mut held = Vec::new();
    let records = [
        message(c, 1, 1, 10),
        message(c, 2, 2, 10),
        message(c, 3, 3, 10),
        checkpoint(4, 0, true),
        message(c, 4, 5, 10),
        message(c, 5, 6, 10),
    ];
    for (lsn, record) in records.iter().enumerate() {
        let mut bytes = Vec::new();
        encode_record(record, &mut bytes);
        engine.append(now, Lsn(lsn as u64 + 1), bytes);
        // Every operation is performed at once, but the removals, which are held.
        while let Some(io) = engine.poll_io() {
            if matches!(io.op, Op::Remove(_)) {
                held.push(io);
                continue;
            }
            let result = disk.execute(&io.op);
            engine.handle_completion(now, io.id, result);
        }
    }
    assert!(
        !held.is_empty(),
        "retention removes the segments before the checkpoint's"
    );
    // The newest removal issued is performed first, then the process dies.
    let last = held.pop().expect("held");
    disk.execute(&last.op).expect("removed");
    let mut engine = LogEngine::new(config, now);
    let events = drive_failing(&mut engine, &mut disk, |_| false);
    assert!(
        events.iter().any(|e| matches!(e, LogEvent::Recovered(_))),
        "recovery after removals performed out of order: {events:?} (files {:?})",
        disk.names()
    );
}

/// Found by the model: a fetch whose snapshot still had a segment that retention then
/// removed read it, got `NotFound`, and counted that as a failed attempt: with few
/// attempts left it answered `Err` (the client's request fails with a storage error)
/// though no read had failed. A read of a segment removed since the snapshot now restarts
/// the job without counting an attempt (the new snapshot skips the segment).
#[test]
fn a_fetch_racing_retention_is_answered() {
    let config = LogConfig {
        segment_messages: 1,
        checkpoint_messages: 1_000,
        retention_bytes: Some(1),
        read_attempts: 1,
        ..LogConfig::default()
    };
    let now = Instant::from_millis(1_700_000_000_000);
    let mut disk = MemDisk::new(512);
    let mut engine = LogEngine::new(config, now);
    drive_failing(&mut engine, &mut disk, |_| false);
    let c = conv(0);
    let append = |engine: &mut LogEngine, disk: &mut MemDisk, lsn: u64, record: Record| {
        let mut bytes = Vec::new();
        encode_record(&record, &mut bytes);
        engine.append(now, Lsn(lsn), bytes);
        drive_failing(engine, disk, |_| false);
    };
    append(&mut engine, &mut disk, 1, message(c, 1, 1, 10));
    append(&mut engine, &mut disk, 2, message(c, 2, 2, 10));
    // The fetch's read of segment 1 is issued, and held.
    engine.fetch(now, 9, c, Seq(1), Seq(10), 10);
    let read = engine.poll_io().expect("a read");
    assert!(
        matches!(
            read.op,
            Op::Read {
                file: FileId::Index(1) | FileId::Segment(1),
                ..
            }
        ),
        "{read:?}"
    );
    let mut held = vec![read];
    // Reads of the index go on; the segment's is held.
    let segment_read = |io: &Io| {
        matches!(
            io.op,
            Op::Read {
                file: FileId::Segment(_),
                ..
            }
        )
    };
    while let Some(at) = held.iter().position(|io| !segment_read(io)) {
        let io = held.remove(at);
        let result = disk.execute(&io.op);
        engine.handle_completion(now, io.id, result);
        held.extend(std::iter::from_fn(|| engine.poll_io()));
    }
    assert!(held.iter().all(segment_read));
    // A checkpoint makes segments 1 and 2 removable; retention removes segment 1.
    append(&mut engine, &mut disk, 3, checkpoint(3, 0, true));
    append(&mut engine, &mut disk, 4, message(c, 3, 4, 10));
    engine.handle_timeout(now);
    let events = drive_failing(&mut engine, &mut disk, |_| false);
    assert!(
        disk.file(&FileId::Segment(1).name()).is_none(),
        "{:?}",
        disk.names()
    );
    // The held read now finds no segment 1.
    let mut events: Vec<LogEvent> = events;
    for io in held {
        let result = disk.execute(&io.op);
        engine.handle_completion(now, io.id, result);
        events.extend(drive_failing(&mut engine, &mut disk, |_| false));
    }
    let answer = events.iter().find_map(|e| match e {
        LogEvent::Fetched { fetch: 9, result } => Some(result.clone()),
        _ => None,
    });
    match answer {
        // Retention went on to remove segment 2: history starts at 3.
        Some(Ok(msgs)) => assert_eq!(msgs.iter().map(|m| m.seq.0).collect::<Vec<_>>(), vec![3]),
        other => panic!("the fetch answered {other:?}"),
    }
}

/// Found by the model: two syncs in flight, the first fails (the kernel may drop the dirty
/// pages with the error, MemDisk's failed sync does), the second, started after the pages
/// were dropped, succeeds and returns first. The engine took its success before it heard of
/// the failure ("after a failed sync, no later sync counts" held only for syncs that
/// returned later) and reported appends durable that the disk no longer had. Syncs'
/// returns are now taken in the order they were issued.
#[test]
fn a_sync_that_returns_before_an_earlier_failed_one_does_not_count() {
    let now = Instant::from_millis(1_700_000_000_000);
    let mut disk = MemDisk::new(512);
    let mut engine = LogEngine::new(LogConfig::default(), now);
    drive_failing(&mut engine, &mut disk, |_| false);
    let c = conv(0);
    let mut ios = Vec::new();
    for seq in 1..=2 {
        let mut bytes = Vec::new();
        encode_record(&message(c, seq, seq, 10), &mut bytes);
        engine.append(now, Lsn(seq), bytes);
        // Its write is performed; the sync that follows it is held.
        while let Some(io) = engine.poll_io() {
            if matches!(io.op, Op::Sync(_)) {
                ios.push(io);
            } else {
                let result = disk.execute(&io.op);
                engine.handle_completion(now, io.id, result);
            }
        }
    }
    let [first, second] = <[Io; 2]>::try_from(ios).expect("two syncs in flight");
    // The first fails and drops the dirty pages; the second starts after, and returns first.
    let failed = disk.start(&first.op, Some(IoError::Io), 0);
    let ok = disk.start(&second.op, None, 0);
    let result = disk.finish(ok);
    engine.handle_completion(now, second.id, result);
    let result = disk.finish(failed);
    engine.handle_completion(now, first.id, result);
    let events = drive_failing(&mut engine, &mut disk, |_| false);
    let mut all: Vec<LogEvent> = std::iter::from_fn(|| engine.poll_event()).collect();
    all.extend(events);
    let kept = scan(disk.durable(&FileId::Segment(1).name()).unwrap_or_default())
        .records
        .len();
    for e in &all {
        if let LogEvent::Durable(lsn) = e {
            assert!(
                lsn.0 as usize <= kept,
                "Durable({}) with {kept} records on the disk: {all:?}",
                lsn.0
            );
        }
    }
}

/// Two fdatasyncs in flight on one file of buffered writes: the later one fails and the
/// kernel drops the dirty pages the earlier one was due to write, and the earlier one
/// still returns success (Linux reports a writeback error to one fsync per open file
/// only). The engine cannot tell, so a buffered log syncs one at a time
/// (`LogConfig::syncs_inflight_max` = 1, which the gateway sets when the filesystem
/// refuses O_DIRECT): then there is never an earlier sync to be fooled.
#[test]
fn a_buffered_log_syncs_one_at_a_time_so_no_sync_hides_a_failed_writeback() {
    let now = Instant::from_millis(1_700_000_000_000);
    let mut disk = MemDisk::new(512);
    let config = LogConfig {
        syncs_inflight_max: 1,
        ..LogConfig::default()
    };
    let mut engine = LogEngine::new(config, now);
    drive_failing(&mut engine, &mut disk, |_| false);
    let c = conv(0);
    let mut syncs = Vec::new();
    for seq in 1..=2 {
        let mut bytes = Vec::new();
        encode_record(&message(c, seq, seq, 10), &mut bytes);
        engine.append(now, Lsn(seq), bytes);
        while let Some(io) = engine.poll_io() {
            if matches!(io.op, Op::Sync(_)) {
                syncs.push(io);
            } else {
                let result = disk.execute(&io.op);
                engine.handle_completion(now, io.id, result);
            }
        }
    }
    assert_eq!(
        syncs.len(),
        1,
        "a second sync started while one runs: {syncs:?}"
    );
    // The one sync fails and drops the pages: nothing is reported durable, and the
    // failure is reported once the segment is cut back.
    let only = syncs.remove(0);
    let failed = disk.start(&only.op, Some(IoError::Io), 0);
    let result = disk.finish(failed);
    engine.handle_completion(now, only.id, result);
    let mut events: Vec<LogEvent> = std::iter::from_fn(|| engine.poll_event()).collect();
    events.extend(drive_failing(&mut engine, &mut disk, |_| false));
    assert!(
        !events.iter().any(|e| matches!(e, LogEvent::Durable(_))),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| matches!(e, LogEvent::Failed)),
        "{events:?}"
    );
}

/// Found by the model: rebuilding a sealed segment's index and summary files (after its
/// summary could not be read) was interrupted by a process restart before the new files
/// were synced; the next start accepted them from the page cache (they are whole and
/// match), retention then removed the segment, and a power loss emptied them: the log
/// refused to open for good (`RemovedSummary`), a removed segment's index being all that
/// answers for its conversations. Retention now syncs a segment's index and summary files
/// before it removes the segment.
#[test]
fn retention_removes_a_segment_only_once_its_index_and_summary_are_durable() {
    for interrupted in [FileId::Index(1), FileId::Summary(1)] {
        let config = LogConfig {
            segment_messages: 1,
            ..LogConfig::default()
        };
        let now = Instant::from_millis(1_700_000_000_000);
        let mut disk = MemDisk::new(512);
        let mut engine = LogEngine::new(config.clone(), now);
        drive_failing(&mut engine, &mut disk, |_| false);
        let c = conv(0);
        for (lsn, record) in [
            message(c, 1, 1, 10),
            checkpoint(2, 0, true),
            message(c, 2, 3, 10),
        ]
        .iter()
        .enumerate()
        {
            let mut bytes = Vec::new();
            encode_record(record, &mut bytes);
            engine.append(now, Lsn(lsn as u64 + 1), bytes);
            drive_failing(&mut engine, &mut disk, |_| false);
        }
        assert!(
            disk.file(&FileId::Summary(1).name()).is_some(),
            "segment 1 is sealed"
        );
        // A restart fails to read segment 1's summary and rebuilds its files; the process
        // dies before one of them is synced.
        let mut engine = LogEngine::new(config.clone(), now);
        while let Some(io) = engine.poll_io() {
            if io.op == Op::Sync(interrupted) {
                break;
            }
            let fault = matches!(
                io.op,
                Op::Read {
                    file: FileId::Summary(1),
                    ..
                }
            )
            .then_some(IoError::Io);
            let started = disk.start(&io.op, fault, 0);
            let result = disk.finish(started);
            engine.handle_completion(now, io.id, result);
        }
        // The next run recovers from the page cache, and retention removes segment 1.
        let retention = LogConfig {
            retention_bytes: Some(1),
            ..config
        };
        let mut engine = LogEngine::new(retention.clone(), now);
        drive_failing(&mut engine, &mut disk, |_| false);
        assert!(
            disk.file(&FileId::Segment(1).name()).is_none(),
            "{:?}",
            disk.names()
        );
        // A power loss: what is left must open.
        disk.crash(0);
        let mut engine = LogEngine::new(retention, now);
        let events = drive_failing(&mut engine, &mut disk, |_| false);
        assert!(
            events.iter().any(|e| matches!(e, LogEvent::Recovered(_))),
            "interrupted before syncing {interrupted:?}: {events:?}"
        );
    }
}

/// Found by the model: recovery retried a failed operation of any kind, its final
/// fdatasync of the open segment included. A failed fdatasync may drop the dirty pages
/// (what a process restart had left unsynced), and the retry then succeeds with nothing to
/// write: recovery handed over records the disk no longer had. Only reads are retried now.
#[test]
fn recovery_does_not_retry_a_failed_sync() {
    let config = LogConfig::default();
    let now = Instant::from_millis(1_700_000_000_000);
    let mut disk = MemDisk::new(512);
    let mut engine = LogEngine::new(config.clone(), now);
    drive_failing(&mut engine, &mut disk, |_| false);
    let m = message(conv(0), 1, 1, 10);
    let mut bytes = Vec::new();
    encode_record(&m, &mut bytes);
    engine.append(now, Lsn(1), bytes);
    let write = engine.poll_io().expect("a write");
    disk.execute(&write.op).expect("written");
    // The process dies before the sync; the next recovery's sync fails and drops the page.
    let mut engine = LogEngine::new(config, now);
    let mut failed_once = false;
    let events = drive_failing(&mut engine, &mut disk, |op| {
        let fail = matches!(op, Op::Sync(_)) && !failed_once;
        failed_once |= fail;
        fail
    });
    assert!(failed_once, "recovery synced the open segment: {events:?}");
    let durable = scan(disk.durable(&FileId::Segment(1).name()).unwrap_or_default()).records;
    for e in &events {
        if let LogEvent::Recovered(r) = e {
            for record in &r.records {
                assert!(
                    durable.iter().any(|(_, d)| d == record),
                    "recovered {} which is not on the disk",
                    describe(record)
                );
            }
        }
    }
}
