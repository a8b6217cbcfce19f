//! The log engine: every durability decision of a shard's log, sans-I/O.
//!
//! The shard engine appends framed records (`Effect::Append`), wants to hear when they are
//! durable (`handle_durable`) or failed (`handle_log_failed`), reads history older than its
//! hot tier (`Effect::Fetch`) and the last seq of a conversation that left memory
//! (`Effect::Load`). This engine sits between it and the disk: it decides what to write
//! where, when to sync, when a segment is sealed, how a failure is undone, what recovery
//! keeps, where a read looks, and what retention removes. It emits I/O operations ([`Op`])
//! tagged with an [`IoId`]; the driver performs each and reports its completion or error
//! with [`LogEngine::handle_completion`]. The gateway executes them on its shard's io_uring, the
//! sim on `turmoil::fs`, core's tests on [`mem_disk`]: all three run the same decisions.
//!
//! # Driving it
//!
//! 1. [`LogEngine::new`], then feed completions until [`LogEvent::Recovered`] hands over
//!    the records to rebuild the shard from ([`Shard::recover`](crate::shard::Shard)).
//! 2. Feed the shard's effects: [`LogEngine::append`], [`LogEngine::fetch`],
//!    [`LogEngine::load`]; the shard's checkpoint when asked ([`LogEvent::CheckpointDue`]).
//! 3. Drain [`LogEngine::poll_io`] and perform each operation (several may be in flight at
//!    once; complete them in any order), reporting each with `handle_completion`.
//! 4. Drain [`LogEngine::poll_event`] into the shard **after every call into the engine,
//!    before the next one**: a [`LogEvent::Failed`] must reach the shard before any append
//!    it makes afterwards reaches the engine, or a failed seq could be written twice.
//!
//! What each operation means, exactly (the driver contract):
//! - `List`: the names and lengths of the files in the log directory (creating the
//!   directory, durably, if it is missing).
//! - `Create(f)`: create `f` empty (truncating it if it exists), and make its directory
//!   entry durable (fsync the directory).
//! - `Write { file, at, bytes }`: write all of `bytes` at `at`; a short write is an error.
//!   Segment writes are aligned to [`LogConfig::align`] in position and length.
//! - `Sync(f)`: fdatasync `f`. Several may be in flight on one file; each makes durable
//!   everything whose write completed before it started.
//! - `Truncate { file, len }`: cut `file` to `len` and fdatasync it.
//! - `Read { file, at, len }`: up to `len` bytes at `at`, fewer only where the file ends.
//! - `Remove(f)`: unlink `f` and fsync the directory.
//!
//! # Invariants
//! - Appends are written in order, one write in flight at a time, each starting where the
//!   previous ended (rewriting the partial block before it when writes are aligned).
//! - `durable <= completed <= written` in the open segment. `durable` moves only when a
//!   sync returns, to what had completed when that sync started (pipelined syncs: at most
//!   [`SYNCS_INFLIGHT_MAX`] at once; their returns are taken in the order they were
//!   issued). [`LogEvent::Durable`] names only appends wholly below `durable` (I1).
//! - After a failed write or sync, no later sync counts; once nothing is in flight the
//!   open segment is cut back to `durable` and only then is [`LogEvent::Failed`] emitted:
//!   every append not reported durable is gone from the disk before the shard hands its
//!   seqs out again (I5).
//! - Only the open segment has bytes that are not durable. A segment is sealed only when
//!   everything in it is durable; its index and summary files are durable before the next
//!   segment exists.
//! - Reads are served only from durable records; a read that fails is retried
//!   ([`LogConfig::read_attempts`]); history is reported gone only where retention removed
//!   whole sealed segments.
//! - Recovery starts from the last whole checkpoint (or the start of the log), cuts a torn
//!   or zeroed tail of the open segment, and refuses damage anywhere else it reads.
//! - Retention never removes the segment holding the checkpoint recovery would start
//!   from, or any after it; it removes one segment at a time, oldest first, so that the
//!   segments left are consecutive whatever the order operations are performed in.

mod files;
pub mod mem_disk;
mod read;
mod recovery;

pub use files::{decode_summary, encode_summary, FileId, SealedMeta};

use crate::log::{decode_record, CorruptReason, Decoded, Record, StoredMessage};
use crate::proto::{ConvId, Seq};
use crate::segment_index::{self, IndexEntry, SegmentSummary};
use crate::shard::Lsn;
use crate::time::Instant;
use bytes::Bytes;
use read::Reads;
use recovery::Recovery;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

/// fdatasyncs in flight at once, by default: 2. A second may start while one runs,
/// covering what was written since, so an append waits for about one sync, not up to two;
/// more would only queue in the device. See [`LogConfig::syncs_inflight_max`] for when it
/// must be 1.
pub const SYNCS_INFLIGHT_MAX: usize = 2;

/// Most bytes of appends one write carries: 1 MiB. Group-commit batches are usually far
/// smaller; the bound keeps a single write (and the driver's buffer for it) modest.
const WRITE_BYTES_MAX: usize = 1024 * 1024;

/// Truncates tried before a failed reset stops the log: 3.
const RESET_ATTEMPTS: u32 = 3;

/// The engine's tunables.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// Size at which a segment is sealed and the next started (a segment may end past it
    /// by one batch; see [`LogEngine`] docs).
    pub segment_bytes: u64,
    /// Messages at which a segment is sealed even if not full: bounds the open segment's
    /// index, which is in memory.
    pub segment_messages: usize,
    /// Alignment of segment writes (a power of two): 1 for buffered I/O, the block size
    /// (4096) for O_DIRECT. Aligned writes rewrite the partial block before them.
    pub align: u64,
    /// Durable messages after which the engine asks the shard for a checkpoint: bounds
    /// what start-up replays.
    pub checkpoint_messages: u64,
    /// Keep at most this many bytes of segments (whole sealed segments are removed).
    pub retention_bytes: Option<u64>,
    /// Remove sealed segments sealed longer ago than this.
    pub retention_age: Option<Duration>,
    /// History reads (Fetch and Load) in progress at once; more wait in order.
    pub read_jobs_max: usize,
    /// Attempts of a history read before it is reported failed.
    pub read_attempts: u32,
    /// fdatasyncs in flight at once (at least 1). Pipelining (2) is safe with O_DIRECT
    /// writes, which reach the device before they complete, so a sync only flushes the
    /// device's cache. With buffered writes it must be 1: Linux reports a failed writeback
    /// to one fdatasync per open file only, so of two syncs in flight the one that
    /// started first can return success for pages the kernel dropped when the other
    /// failed, and the engine could not tell.
    pub syncs_inflight_max: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 64 * 1024 * 1024,
            segment_messages: 65_536,
            align: 1,
            checkpoint_messages: 262_144,
            retention_bytes: None,
            retention_age: None,
            read_jobs_max: 32,
            read_attempts: 8,
            syncs_inflight_max: SYNCS_INFLIGHT_MAX,
        }
    }
}

impl LogConfig {
    /// Checks the configuration; the engine refuses one that fails.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.segment_bytes == 0 || self.segment_messages == 0 {
            return Err("segment_bytes and segment_messages must be at least 1");
        }
        if !self.align.is_power_of_two() {
            return Err("align must be a power of two");
        }
        if self.checkpoint_messages == 0 {
            return Err("checkpoint_messages must be at least 1");
        }
        if self.read_jobs_max == 0 || self.read_attempts == 0 || self.syncs_inflight_max == 0 {
            return Err("read_jobs_max, read_attempts and syncs_inflight_max must be at least 1");
        }
        Ok(())
    }
}

/// The tag of one I/O operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IoId(pub u64);

/// An I/O operation for the driver (the module docs say exactly what each means).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// List the log directory.
    List,
    /// Create a file empty, durably.
    Create(FileId),
    /// Write bytes at an offset.
    Write {
        /// The file.
        file: FileId,
        /// Where.
        at: u64,
        /// What.
        bytes: Bytes,
    },
    /// fdatasync.
    Sync(FileId),
    /// Cut a file to a length, durably.
    Truncate {
        /// The file.
        file: FileId,
        /// Its new length.
        len: u64,
    },
    /// Read bytes.
    Read {
        /// The file.
        file: FileId,
        /// Where.
        at: u64,
        /// How many at most.
        len: usize,
    },
    /// Remove a file, durably.
    Remove(FileId),
}

/// One operation with its tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Io {
    /// Report the completion with this.
    pub id: IoId,
    /// What to do.
    pub op: Op,
}

/// A completed operation's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Completion {
    /// Create, Write, Sync, Truncate, Remove succeeded.
    Done,
    /// List: each file's name and length.
    Listed(Vec<(String, u64)>),
    /// Read: the bytes read.
    Read(Bytes),
}

/// Why an operation failed, as far as the engine cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// Any I/O error (EIO, a short write, ...).
    #[error("I/O error")]
    Io,
    /// The disk is full (ENOSPC).
    #[error("no space left on the device")]
    NoSpace,
    /// The file does not exist.
    #[error("no such file")]
    NotFound,
}

/// What recovery found.
#[derive(Debug)]
pub struct Recovered {
    /// The records to rebuild the shard from, oldest first: from the last checkpoint on
    /// (starting with it), or the whole log if it has none.
    pub records: Vec<Record>,
    /// Segment files present.
    pub segments: usize,
    /// Bytes of log present (segments only).
    pub bytes: u64,
    /// Bytes of log read to recover (summaries, rebuilt segments, and the replayed tail).
    pub read_bytes: u64,
    /// Bytes cut from the end of the open segment (a torn append, padding, or a corrupt
    /// tail frame).
    pub truncated_bytes: u64,
    /// Why the scan of the open segment stopped.
    pub tail: crate::log::ScanEnd,
    /// Where the replay started: (segment, offset); offset 0 of segment 1 is the log's
    /// start.
    pub replay_from: (u64, u64),
    /// Sealed segments whose index and summary files were missing or damaged and were
    /// written anew from the segment.
    pub rebuilt: usize,
}

/// Why a segment cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    /// It ends inside a record, and it is not the open segment.
    #[error("it ends inside a record")]
    Torn,
    /// A frame that can never be valid.
    #[error("{0}")]
    Frame(CorruptReason),
    /// An indexed location holds another record than the index says.
    #[error("the record at an indexed location is not message {seq} of {conv}")]
    Misplaced {
        /// The conversation looked up.
        conv: ConvId,
        /// The seq looked up.
        seq: Seq,
    },
}

/// Why the log stopped for good (recovery refused, or a failure could not be undone).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    /// A segment other than the open one is damaged: acknowledged messages would be lost
    /// silently, so the log refuses to open.
    #[error("{} is damaged at offset {offset}: {damage}", file.name())]
    Corrupt {
        /// The segment.
        file: FileId,
        /// Where the damage starts.
        offset: u64,
        /// What it is.
        damage: Damage,
    },
    /// A segment between the first and the last present is missing.
    #[error("segment {missing} is missing")]
    MissingSegment {
        /// Its number.
        missing: u64,
    },
    /// A file named like a log file whose number is malformed.
    #[error("{name} is not a log file name (20 digits from 1, then .seg, .idx or .sum)")]
    BadName {
        /// The name.
        name: String,
    },
    /// A message does not follow its conversation's previous one in the log.
    #[error("message {found} of {conv} follows message {last} in the log")]
    SeqGap {
        /// The conversation.
        conv: ConvId,
        /// The seq before.
        last: Seq,
        /// The seq found.
        found: Seq,
    },
    /// Segments were removed (by retention) but no checkpoint is left to start from.
    #[error("the log's first segments were removed and no checkpoint is left to start from")]
    NoCheckpoint,
    /// The summary file of segment `segment`, whose segment retention removed, is missing
    /// or damaged: the last seqs of its conversations are unknown.
    #[error("the summary of removed segment {segment} is missing or damaged")]
    RemovedSummary {
        /// The segment.
        segment: u64,
    },
    /// An operation failed where the engine cannot go on.
    #[error("{op} of {} failed: {error}", file.map_or("the log directory".to_string(), FileId::name))]
    Io {
        /// What was done.
        op: &'static str,
        /// To which file (`None`: the directory).
        file: Option<FileId>,
        /// How it failed.
        error: IoError,
    },
}

/// What the engine tells its driver (and, through it, the shard).
#[derive(Debug)]
pub enum LogEvent {
    /// Recovery finished: rebuild the shard from these records, then append.
    Recovered(Recovered),
    /// Every append up to this Lsn is durable: `Shard::handle_durable`.
    Durable(Lsn),
    /// Every append not yet reported durable failed and is gone from the disk:
    /// `Shard::handle_log_failed`.
    Failed,
    /// The answer to [`LogEngine::fetch`]: `Shard::handle_fetched`.
    Fetched {
        /// The fetch's id.
        fetch: u64,
        /// The messages, or `Err` if the read failed on every attempt.
        result: Result<Vec<StoredMessage>, ()>,
    },
    /// The answer to [`LogEngine::load`]: `Shard::handle_loaded`.
    Loaded {
        /// The conversation.
        conv: ConvId,
        /// Its last durable seq (0 if none), or `Err` if the read failed on every attempt.
        result: Result<Seq, ()>,
    },
    /// Append a checkpoint now: `Shard::handle_checkpoint_due`.
    CheckpointDue,
    /// The log cannot go on: stop the shard.
    Stopped(LogError),
    /// [`LogEngine::close`] finished: everything appended is durable and the open segment
    /// ends at its last record.
    Closed,
}

/// A bug planted in the engine, for proving that the simulator and the model test catch
/// it. Only a build with the `planted-bugs` feature has [`LogEngine::plant`]; without it
/// no bug can be planted, and the checks for them are constant false.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlantedLogBug {
    /// Appends are reported durable when their write completes, before any sync.
    AckBeforeDurable,
    /// After a failure the open segment is not cut back to its durable end.
    NoTruncateOnFailure,
    /// Recovery keeps a torn tail and appends after it.
    TornTailKept,
    /// A sync makes durable what completed by the time it returned, not by the time it
    /// started.
    SyncCoversLaterWrites,
    /// A failed append's index entries stay in the index (past the durable end) and are
    /// served as durable.
    IndexPastDurable,
    /// A checkpoint is written ahead of the appends queued before it.
    CheckpointAheadOfDurable,
}

/// A sealed segment.
#[derive(Debug)]
struct Sealed {
    index: u64,
    meta: Rc<SealedMeta>,
    /// Its segment file is still there (retention has not removed it).
    present: bool,
}

/// The read index of the open segment, per conversation.
#[derive(Debug)]
struct ConvIndex {
    /// The seq at `offsets[0]` (seqs are consecutive in log order).
    first: Seq,
    /// Where each message's frame starts.
    offsets: Vec<u64>,
    /// How many of `offsets` are durable.
    durable: usize,
}

/// The segment being appended to.
#[derive(Debug)]
struct Open {
    index: u64,
    /// End of everything handed to a write.
    written: u64,
    /// End of the writes that completed.
    completed: u64,
    /// End of what a returned sync covered.
    durable: u64,
    /// The bytes from `align_down(durable)` to `written`: the partial durable block (which
    /// aligned writes rewrite) and everything not yet durable.
    unsynced: Vec<u8>,
    convs: BTreeMap<ConvId, ConvIndex>,
    /// Index entries not yet durable, in log order: (conversation, end of the frame).
    pending: VecDeque<(ConvId, u64)>,
    /// Message records (durable or not).
    messages: u64,
    /// The start of the last whole durable checkpoint in this segment.
    checkpoint_at: Option<u64>,
    /// Whole checkpoints written, not yet durable: (start, end).
    pending_checkpoints: VecDeque<(u64, u64)>,
    /// The start of a checkpoint run whose last record has not been seen yet.
    checkpoint_run: Option<u64>,
    /// Planted (IndexPastDurable) only: a seq below the conversation's next overwrites
    /// the entries from it instead of being refused.
    lenient: bool,
}

impl Open {
    fn new(index: u64) -> Open {
        Open {
            index,
            written: 0,
            completed: 0,
            durable: 0,
            unsynced: Vec::new(),
            convs: BTreeMap::new(),
            pending: VecDeque::new(),
            messages: 0,
            checkpoint_at: None,
            pending_checkpoints: VecDeque::new(),
            checkpoint_run: None,
            lenient: false,
        }
    }

    fn unsynced_base(&self, align: u64) -> u64 {
        align_down(self.durable, align)
    }

    /// Indexes the frames of `bytes`, about to be written at `base`: message entries and
    /// checkpoints, pending until durable. Returns `Err` with the conversation, its last
    /// seq and the seq found if a message does not follow its conversation's last one
    /// here.
    fn index(&mut self, bytes: &[u8], base: u64, durable: bool) -> Result<(), (ConvId, Seq, Seq)> {
        let mut at = 0;
        while let Some(rest) = bytes.get(at..).filter(|rest| !rest.is_empty()) {
            let Decoded::Record { record, len } = decode_record(rest) else {
                panic!("the log was handed bytes that are not whole records at {at}");
            };
            let offset = base + at as u64;
            let end = offset + len as u64;
            match record {
                Record::Message(m) => {
                    self.checkpoint_run = None;
                    self.push(m.conv, m.seq, offset, end, durable)?;
                }
                Record::Checkpoint { part, last, .. }
                | Record::CheckpointInbox { part, last, .. } => {
                    if part == 0 {
                        self.checkpoint_run = Some(offset);
                    }
                    let Some(start) = self.checkpoint_run else {
                        // A part without its start: never written by a shard.
                        at += len;
                        continue;
                    };
                    if last {
                        self.checkpoint_run = None;
                        if durable {
                            self.checkpoint_at = Some(start);
                        } else {
                            self.pending_checkpoints.push_back((start, end));
                        }
                    }
                }
                _ => self.checkpoint_run = None,
            }
            at += len;
        }
        Ok(())
    }

    fn push(
        &mut self,
        conv: ConvId,
        seq: Seq,
        offset: u64,
        end: u64,
        durable: bool,
    ) -> Result<(), (ConvId, Seq, Seq)> {
        let entry = self.convs.entry(conv).or_insert_with(|| ConvIndex {
            first: seq,
            offsets: Vec::new(),
            durable: 0,
        });
        let next = entry.first.0 + entry.offsets.len() as u64;
        if self.lenient && seq.0 < next && seq.0 >= entry.first.0 {
            // Planted (IndexPastDurable): entries a failed append left are overwritten
            // when their seqs are handed out again.
            let keep = (seq.0 - entry.first.0) as usize;
            self.messages -= (entry.offsets.len() - keep) as u64;
            entry.offsets.truncate(keep);
            entry.durable = entry.durable.min(keep);
        } else if seq.0 != next {
            let last = Seq(next - 1);
            if entry.offsets.is_empty() {
                self.convs.remove(&conv);
            }
            return Err((conv, last, seq));
        }
        entry.offsets.push(offset);
        if durable {
            entry.durable += 1;
        } else {
            self.pending.push_back((conv, end));
        }
        self.messages += 1;
        Ok(())
    }

    /// Every entry, for the segment's index file (all durable: the segment is sealed).
    fn entries(&self) -> Vec<IndexEntry> {
        assert!(self.pending.is_empty(), "sealing with pending entries");
        let mut entries = Vec::with_capacity(self.messages as usize);
        for (&conv, index) in &self.convs {
            for (i, &offset) in index.offsets.iter().enumerate() {
                entries.push(IndexEntry {
                    conv,
                    seq: Seq(index.first.0 + i as u64),
                    offset,
                });
            }
        }
        entries
    }
}

/// What an operation in flight is for.
#[derive(Debug)]
enum Purpose {
    Recovery,
    Write {
        end: u64,
    },
    Sync,
    Reset,
    Rotation,
    Read {
        job: u64,
    },
    /// Retention's fdatasync of a segment's index or summary file, before the removal.
    RemoveSync {
        segment: u64,
        file: FileId,
    },
    Remove {
        segment: u64,
    },
    Close,
}

/// Where the engine is in its life.
#[derive(Debug)]
enum Phase {
    Recovering(Box<Recovery>),
    Running,
    Stopped,
    Closed,
}

/// A segment being sealed and the next one created: the operations left, in order.
#[derive(Debug)]
struct Rotation {
    steps: VecDeque<Op>,
    meta: Rc<SealedMeta>,
}

/// The log engine of one shard. See the module docs.
#[derive(Debug)]
pub struct LogEngine {
    config: LogConfig,
    phase: Phase,
    now: Instant,
    next_io: u64,
    ios: VecDeque<Io>,
    inflight: BTreeMap<IoId, Purpose>,
    events: VecDeque<LogEvent>,
    /// Sealed segments, oldest first (removed ones included).
    sealed: Vec<Sealed>,
    open: Open,
    /// Appends not yet handed to a write.
    queue: VecDeque<(Lsn, Vec<u8>)>,
    /// Appends written or being written, not yet durable: (Lsn, end offset).
    unacked: VecDeque<(Lsn, u64)>,
    writing: bool,
    /// Syncs issued and not yet taken (returned or not).
    syncs: usize,
    /// Those syncs in the order they were issued: what each covers, and whether it
    /// succeeded once it returned. Returns are taken in this order.
    sync_returns: VecDeque<(IoId, u64, Option<bool>)>,
    /// End of what the last sync issued covers.
    sync_requested: u64,
    /// A write or sync failed: nothing more is written until the reset.
    failed: bool,
    /// The reset's truncate is in flight; how many were tried.
    resetting: Option<u32>,
    rotation: Option<Rotation>,
    reads: Reads,
    /// Messages made durable since the last checkpoint was asked for.
    since_checkpoint: u64,
    /// A checkpoint was asked for and is not durable yet.
    checkpoint_asked: bool,
    /// After a failure lost a checkpoint: ask again only once `since_checkpoint` reaches
    /// this (see [`LogEngine::checkpoint_lost`]).
    checkpoint_retry_at: u64,
    closing: bool,
    /// A retention removal is in flight (one at a time, oldest first).
    removing: bool,
    #[cfg(feature = "planted-bugs")]
    planted: Option<PlantedLogBug>,
}

/// `v` rounded down to a multiple of `align` (a power of two).
fn align_down(v: u64, align: u64) -> u64 {
    v & !(align - 1)
}

/// `v` rounded up to a multiple of `align` (a power of two).
fn align_up(v: u64, align: u64) -> u64 {
    align_down(v + (align - 1), align)
}

impl LogEngine {
    /// An engine about to recover the log in its directory: its first operation lists it.
    ///
    /// # Panics
    ///
    /// If `config` fails [`LogConfig::validate`] (the driver validates its configuration
    /// when it loads it).
    pub fn new(config: LogConfig, now: Instant) -> LogEngine {
        if let Err(e) = config.validate() {
            panic!("invalid log configuration: {e}");
        }
        let mut engine = LogEngine {
            reads: Reads::new(config.read_jobs_max),
            config,
            phase: Phase::Stopped,
            now,
            next_io: 1,
            ios: VecDeque::new(),
            inflight: BTreeMap::new(),
            events: VecDeque::new(),
            sealed: Vec::new(),
            open: Open::new(1),
            queue: VecDeque::new(),
            unacked: VecDeque::new(),
            writing: false,
            syncs: 0,
            sync_returns: VecDeque::new(),
            sync_requested: 0,
            failed: false,
            resetting: None,
            rotation: None,
            since_checkpoint: 0,
            checkpoint_asked: false,
            checkpoint_retry_at: 0,
            closing: false,
            removing: false,
            #[cfg(feature = "planted-bugs")]
            planted: None,
        };
        engine.phase = Phase::Recovering(Box::new(Recovery::new()));
        engine.issue(Op::List, Purpose::Recovery);
        engine
    }

    /// Plants a bug (see [`PlantedLogBug`]).
    #[cfg(feature = "planted-bugs")]
    pub fn plant(&mut self, bug: PlantedLogBug) {
        self.planted = Some(bug);
        self.open.lenient = bug == PlantedLogBug::IndexPastDurable;
    }

    #[cfg(feature = "planted-bugs")]
    fn planted(&self, bug: PlantedLogBug) -> bool {
        self.planted == Some(bug)
    }

    #[cfg(not(feature = "planted-bugs"))]
    #[allow(clippy::unused_self)]
    fn planted(&self, _bug: PlantedLogBug) -> bool {
        false
    }

    /// The next I/O operation to perform.
    pub fn poll_io(&mut self) -> Option<Io> {
        self.ios.pop_front()
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<LogEvent> {
        self.events.pop_front()
    }

    /// Whether the engine recovered and takes appends.
    pub fn is_running(&self) -> bool {
        matches!(self.phase, Phase::Running)
    }

    /// Whether nothing is queued, written-but-not-durable, or in flight for the log's
    /// writes (reads may still be in flight).
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty()
            && self.unacked.is_empty()
            && !self.writing
            && self.syncs == 0
            && !self.failed
            && self.rotation.is_none()
    }

    /// Bytes of segments present (sealed and open, durable or not).
    pub fn bytes(&self) -> u64 {
        self.sealed
            .iter()
            .filter(|s| s.present)
            .map(|s| s.meta.bytes)
            .sum::<u64>()
            + self.open.written
    }

    /// Segment files present.
    pub fn segments(&self) -> usize {
        self.sealed.iter().filter(|s| s.present).count() + 1
    }

    /// Heap bytes of the read index: the open segment's entries and every sealed
    /// segment's summary.
    pub fn index_heap_bytes(&self) -> usize {
        let open: usize = self
            .open
            .convs
            .values()
            .map(|c| c.offsets.capacity() * 8 + std::mem::size_of::<(ConvId, ConvIndex)>() + 16)
            .sum();
        open + self
            .sealed
            .iter()
            .map(|s| s.meta.summary.heap_bytes())
            .sum::<usize>()
    }

    /// Appends framed records (a shard's `Effect::Append`); reported durable with
    /// [`LogEvent::Durable`] or failed with [`LogEvent::Failed`].
    ///
    /// # Panics
    ///
    /// Before recovery finished, or if `bytes` is not a run of whole valid frames: the
    /// driver's and the shard's promises.
    pub fn append(&mut self, now: Instant, lsn: Lsn, bytes: Vec<u8>) {
        self.now = now;
        assert!(
            self.is_running() && !self.closing,
            "append to a log that is not running"
        );
        if self.planted(PlantedLogBug::CheckpointAheadOfDurable)
            && !self.queue.is_empty()
            && is_checkpoint(&bytes)
        {
            // Planted: the checkpoint goes to the disk ahead of the appends queued before
            // it, though it describes them.
            self.queue.push_front((lsn, bytes));
        } else {
            // An empty append is durable as soon as everything before it is.
            self.queue.push_back((lsn, bytes));
        }
        self.pump();
    }

    /// Reads up to `limit` durable messages of `conv` with seqs in `from..=to`,
    /// consecutive from the first one at or after `from` that the log still holds (a
    /// shard's `Effect::Fetch`); answered with [`LogEvent::Fetched`].
    pub fn fetch(
        &mut self,
        now: Instant,
        fetch: u64,
        conv: ConvId,
        from: Seq,
        to: Seq,
        limit: u32,
    ) {
        self.now = now;
        self.reads.fetch(fetch, conv, from, to, limit);
        self.pump();
    }

    /// Finds the last durable seq of `conv` (a shard's `Effect::Load`); answered with
    /// [`LogEvent::Loaded`].
    pub fn load(&mut self, now: Instant, conv: ConvId) {
        self.now = now;
        self.reads.load(conv);
        self.pump();
    }

    /// Finishes what was appended, makes it durable, and cuts the open segment to its
    /// last record; [`LogEvent::Closed`] when done. Appends are refused from now on.
    pub fn close(&mut self, now: Instant) {
        self.now = now;
        self.closing = true;
        self.pump();
    }

    /// A time step, for retention by age (call it now and then, e.g. once a second).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if self.is_running() {
            self.apply_retention();
        }
    }

    /// The driver performed operation `id`.
    ///
    /// # Panics
    ///
    /// If `id` is not an operation in flight, or the completion's kind does not match the
    /// operation (a `Listed` for a write): the driver's bugs.
    pub fn handle_completion(
        &mut self,
        now: Instant,
        id: IoId,
        result: Result<Completion, IoError>,
    ) {
        self.now = now;
        let purpose = self
            .inflight
            .remove(&id)
            .unwrap_or_else(|| panic!("completion of {id:?}, which is not in flight"));
        match purpose {
            Purpose::Recovery => self.recovery_step(result),
            Purpose::Write { end } => {
                self.writing = false;
                match result {
                    Ok(_) => {
                        self.open.completed = end;
                        if self.planted(PlantedLogBug::AckBeforeDurable) {
                            self.advance_durable(end);
                        }
                    }
                    Err(_) => self.failed = true,
                }
            }
            Purpose::Sync => {
                // Returns are taken in the order the syncs were issued. A sync that failed
                // may have dropped dirty pages that a sync issued after it then found
                // clean and "made durable"; if that one returned first, its success was
                // taken before the failure was known, and appends the disk no longer had
                // were reported durable (found by tests/log_engine_model.rs).
                if let Some(entry) = self.sync_returns.iter_mut().find(|(s, _, _)| *s == id) {
                    entry.2 = Some(result.is_ok());
                }
                while let Some(&(_, covers, Some(ok))) = self.sync_returns.front() {
                    self.sync_returns.pop_front();
                    self.syncs -= 1;
                    match ok {
                        true if !self.failed => {
                            let covers = if self.planted(PlantedLogBug::SyncCoversLaterWrites) {
                                self.open.completed
                            } else {
                                covers
                            };
                            self.advance_durable(covers);
                        }
                        // After a failure no sync counts: the failed one may have dropped
                        // pages that a later one then does not write (fsync semantics).
                        true => {}
                        false => self.failed = true,
                    }
                }
            }
            Purpose::Reset => match result {
                Ok(_) => self.finish_reset(true),
                Err(error) => {
                    let tries = self.resetting.take().unwrap_or(0) + 1;
                    if tries >= RESET_ATTEMPTS {
                        self.stop(LogError::Io {
                            op: "truncate after a failed append",
                            file: Some(FileId::Segment(self.open.index)),
                            error,
                        });
                    } else {
                        self.resetting = Some(tries);
                        self.issue_reset();
                    }
                }
            },
            Purpose::Rotation => self.rotation_step(result),
            Purpose::Read { job } => self.read_step(job, id, result),
            Purpose::RemoveSync { segment, file } => match result {
                Ok(_) if !self.is_running() => self.removing = false,
                Ok(_) if file == FileId::Index(segment) => {
                    let summary = FileId::Summary(segment);
                    self.issue(
                        Op::Sync(summary),
                        Purpose::RemoveSync {
                            segment,
                            file: summary,
                        },
                    );
                }
                Ok(_) => {
                    // Reads skip it from now on.
                    if let Some(s) = self.sealed.iter_mut().find(|s| s.index == segment) {
                        s.present = false;
                    }
                    self.issue(
                        Op::Remove(FileId::Segment(segment)),
                        Purpose::Remove { segment },
                    );
                }
                Err(_) => self.retention_failed(segment),
            },
            Purpose::Remove { segment } => {
                if result.is_err() {
                    self.retention_failed(segment);
                } else {
                    self.removing = false;
                    if self.is_running() {
                        // The next one, if any.
                        self.apply_retention();
                    }
                }
            }
            Purpose::Close => {
                self.phase = Phase::Closed;
                self.events.push_back(LogEvent::Closed);
                return;
            }
        }
        self.pump();
    }

    fn issue(&mut self, op: Op, purpose: Purpose) -> IoId {
        let id = IoId(self.next_io);
        self.next_io += 1;
        self.inflight.insert(id, purpose);
        self.ios.push_back(Io { id, op });
        id
    }

    fn stop(&mut self, error: LogError) {
        self.phase = Phase::Stopped;
        self.events.push_back(LogEvent::Stopped(error));
    }

    /// Moves everything that can move.
    fn pump(&mut self) {
        if !self.is_running() {
            return;
        }
        self.pump_reset();
        self.pump_write();
        self.pump_sync();
        self.pump_reads();
        self.pump_close();
    }

    // -----------------------------------------------------------------------------------
    // Appends: write, sync, durable
    // -----------------------------------------------------------------------------------

    fn is_full(&self, adding: usize) -> bool {
        self.open.written > 0
            && (self.open.written + adding as u64 > self.config.segment_bytes
                || self.open.messages >= self.config.segment_messages as u64)
    }

    fn pump_write(&mut self) {
        if self.failed || self.writing || self.rotation.is_some() || self.queue.is_empty() {
            return;
        }
        let first_len = self.queue.front().map_or(0, |(_, b)| b.len());
        if self.is_full(first_len) {
            // Sealing makes the whole segment durable, so it waits for everything in it
            // to be: a failure must still be able to cut unsynced bytes off.
            if self.open.completed == self.open.durable
                && self.open.written == self.open.durable
                && self.syncs == 0
            {
                self.start_rotation();
            }
            return;
        }
        let mut batch: Vec<u8> = Vec::new();
        let mut ends = Vec::new();
        while let Some((_, bytes)) = self.queue.front() {
            let fits = batch.len() + bytes.len() <= WRITE_BYTES_MAX;
            if !batch.is_empty() && (!fits || self.is_full(batch.len() + bytes.len())) {
                break;
            }
            let (lsn, bytes) = self.queue.pop_front().expect("peeked");
            batch.extend_from_slice(&bytes);
            ends.push((lsn, self.open.written + batch.len() as u64));
        }
        if self.planted(PlantedLogBug::CheckpointAheadOfDurable) && ends.len() > 1 {
            // Planted (see `append`): a checkpoint moved ahead of the appends before it
            // is reported durable with them, in order.
            let end = self.open.written + batch.len() as u64;
            if let Some(first) = ends.first_mut() {
                first.1 = end;
            }
        }
        if batch.is_empty() {
            // Only empty appends: durable with what is before them.
            for (lsn, _) in ends {
                self.unacked.push_back((lsn, self.open.written));
            }
            self.advance_durable(self.open.durable);
            return;
        }
        let base = self.open.written;
        if let Err((conv, last, found)) = self.open.index(&batch, base, false) {
            panic!(
                "message {found} of {conv} appended after message {last}: seqs must be consecutive"
            );
        }
        let align = self.config.align;
        let start = align_down(base, align);
        self.open.unsynced.extend_from_slice(&batch);
        self.open.written += batch.len() as u64;
        let from = (start - self.open.unsynced_base(align)) as usize;
        let mut bytes = self.open.unsynced[from..].to_vec();
        bytes.resize(align_up(bytes.len() as u64, align) as usize, 0);
        let end = self.open.written;
        self.unacked.extend(ends);
        self.writing = true;
        self.issue(
            Op::Write {
                file: FileId::Segment(self.open.index),
                at: start,
                bytes: Bytes::from(bytes),
            },
            Purpose::Write { end },
        );
    }

    fn pump_sync(&mut self) {
        if self.failed
            || self.syncs >= self.config.syncs_inflight_max
            || self.open.completed <= self.sync_requested
        {
            return;
        }
        let covers = self.open.completed;
        self.sync_requested = covers;
        self.syncs += 1;
        let id = self.issue(Op::Sync(FileId::Segment(self.open.index)), Purpose::Sync);
        self.sync_returns.push_back((id, covers, None));
    }

    /// Everything below `to` in the open segment is durable.
    fn advance_durable(&mut self, to: u64) {
        let open = &mut self.open;
        if to > open.durable {
            let align = self.config.align;
            let old_base = open.unsynced_base(align);
            open.durable = to;
            let new_base = open.unsynced_base(align);
            open.unsynced.drain(..(new_base - old_base) as usize);
            // Messages and checkpoints in log order: a message after a checkpoint that
            // becomes durable with it counts towards the next one. (Taking all messages
            // first and then the checkpoints reset the count past them, so a replay could
            // exceed `checkpoint_messages` by a sync's worth of messages; found by
            // tests/log_engine_model.rs.)
            loop {
                let message = open.pending.front().filter(|&&(_, end)| end <= to);
                let checkpoint = open
                    .pending_checkpoints
                    .front()
                    .filter(|&&(_, end)| end <= to);
                match (message, checkpoint) {
                    (Some(&(conv, end)), c) if c.is_none_or(|&(_, c_end)| end <= c_end) => {
                        open.pending.pop_front();
                        // Cannot fail: a pending entry's conversation is indexed until a
                        // reset removes both.
                        open.convs
                            .get_mut(&conv)
                            .expect("pending entry indexed")
                            .durable += 1;
                        self.since_checkpoint += 1;
                    }
                    (_, Some(&(start, _))) => {
                        open.pending_checkpoints.pop_front();
                        open.checkpoint_at = Some(start);
                        self.checkpoint_asked = false;
                        self.checkpoint_retry_at = 0;
                        self.since_checkpoint = 0;
                    }
                    _ => break,
                }
            }
        }
        let mut last: Option<Lsn> = None;
        while let Some(&(lsn, end)) = self.unacked.front() {
            if end > self.open.durable {
                break;
            }
            self.unacked.pop_front();
            last = last.max(Some(lsn));
        }
        if let Some(lsn) = last {
            self.events.push_back(LogEvent::Durable(lsn));
        }
        let due = self
            .config
            .checkpoint_messages
            .max(self.checkpoint_retry_at);
        if !self.checkpoint_asked && self.since_checkpoint >= due {
            self.ask_checkpoint();
        }
    }

    /// A failure lost the checkpoint asked for (or may have): ask again, but only once
    /// an eighth of `checkpoint_messages` more messages are durable. A checkpoint is the
    /// largest thing the log writes (the dedupe window), and a failure fails every append
    /// not yet durable with it: asked again at once, a checkpoint that keeps failing (a
    /// disk too full for it but not for messages) would fail every batch it joins, and
    /// messages would hardly ever be stored (found by the sim, seed 724 of a sweep).
    fn checkpoint_lost(&mut self) {
        if self.checkpoint_asked {
            self.checkpoint_asked = false;
            let gap = (self.config.checkpoint_messages / 8).max(1);
            self.checkpoint_retry_at = self.since_checkpoint + gap;
        }
    }

    fn ask_checkpoint(&mut self) {
        self.checkpoint_asked = true;
        self.events.push_back(LogEvent::CheckpointDue);
    }

    fn pump_reset(&mut self) {
        if !self.failed || self.writing || self.syncs > 0 || self.resetting.is_some() {
            return;
        }
        if self.planted(PlantedLogBug::NoTruncateOnFailure) {
            // Planted: nothing is cut, and appends go on after the failed bytes.
            self.finish_reset(false);
            return;
        }
        self.resetting = Some(0);
        self.issue_reset();
    }

    fn issue_reset(&mut self) {
        self.issue(
            Op::Truncate {
                file: FileId::Segment(self.open.index),
                len: self.open.durable,
            },
            Purpose::Reset,
        );
    }

    /// The open segment ends at its durable end again: forget everything after it, and
    /// tell the shard.
    /// `rewind`: the segment was cut back to its durable end (always, but for a planted
    /// bug).
    fn finish_reset(&mut self, rewind: bool) {
        self.resetting = None;
        let keep_entries = self.planted(PlantedLogBug::IndexPastDurable);
        let open = &mut self.open;
        if rewind {
            let durable = open.durable;
            let base = open.unsynced_base(self.config.align);
            open.unsynced.truncate((durable - base) as usize);
            open.written = durable;
            open.completed = durable;
        } else {
            open.completed = open.written;
        }
        self.sync_requested = open.durable;
        while let Some((conv, _)) = open.pending.pop_back() {
            // Cannot fail: as in `advance_durable`.
            let entry = open.convs.get_mut(&conv).expect("pending entry indexed");
            if keep_entries {
                // Planted: the failed appends' entries stay, served as durable, pointing
                // past the durable end.
                entry.durable = entry.offsets.len();
                continue;
            }
            entry.offsets.pop();
            open.messages -= 1;
            if entry.offsets.is_empty() {
                open.convs.remove(&conv);
            }
        }
        open.pending_checkpoints.clear();
        open.checkpoint_run = None;
        self.unacked.clear();
        self.queue.clear();
        self.failed = false;
        self.events.push_back(LogEvent::Failed);
        // The checkpoint asked for may have failed with the rest.
        self.checkpoint_lost();
    }

    fn pump_close(&mut self) {
        if !self.closing
            || !self.queue.is_empty()
            || self.writing
            || self.syncs > 0
            || self.failed
            || self.rotation.is_some()
            || self.open.durable < self.open.written
            || self.inflight.values().any(|p| matches!(p, Purpose::Close))
        {
            return;
        }
        if self.config.align > 1 && !self.open.written.is_multiple_of(self.config.align) {
            self.issue(
                Op::Truncate {
                    file: FileId::Segment(self.open.index),
                    len: self.open.written,
                },
                Purpose::Close,
            );
        } else {
            self.phase = Phase::Closed;
            self.events.push_back(LogEvent::Closed);
        }
    }

    // -----------------------------------------------------------------------------------
    // Rotation and retention
    // -----------------------------------------------------------------------------------

    fn start_rotation(&mut self) {
        let n = self.open.index;
        let mut entries = self.open.entries();
        let index = segment_index::encode(&mut entries);
        let summary = SegmentSummary::of_sorted(&entries);
        let meta = SealedMeta {
            bytes: self.open.written,
            messages: self.open.messages,
            checkpoint_at: self.open.checkpoint_at,
            sealed_at_ms: self.now.as_millis(),
            index_len: index.len() as u64,
            summary,
        };
        let summary_file = encode_summary(&meta);
        let mut steps = VecDeque::new();
        if self.config.align > 1 {
            // Drop the zero padding of the last block: a sealed segment ends at its data.
            steps.push_back(Op::Truncate {
                file: FileId::Segment(n),
                len: self.open.written,
            });
        }
        for (file, bytes) in [
            (FileId::Index(n), index),
            (FileId::Summary(n), summary_file),
        ] {
            steps.push_back(Op::Create(file));
            steps.push_back(Op::Write {
                file,
                at: 0,
                bytes: Bytes::from(bytes),
            });
            steps.push_back(Op::Sync(file));
        }
        steps.push_back(Op::Create(FileId::Segment(n + 1)));
        let first = steps.pop_front().expect("a rotation has steps");
        self.rotation = Some(Rotation {
            steps,
            meta: Rc::new(meta),
        });
        self.issue(first, Purpose::Rotation);
    }

    fn rotation_step(&mut self, result: Result<Completion, IoError>) {
        let Some(mut rotation) = self.rotation.take() else {
            panic!("a rotation step completed with no rotation");
        };
        if result.is_err() {
            // The segment stays open (and is sealed again at the next try). The appends
            // waiting for the new segment fail, as a failed write would fail them.
            self.queue.clear();
            self.events.push_back(LogEvent::Failed);
            // The checkpoint asked for may have been among them: it is asked for again,
            // as after a failed write. Without this the engine waited forever for a
            // checkpoint the shard had already given (found by
            // tests/log_engine_model.rs): no checkpoint was written again, so replays
            // grew without bound and retention stopped.
            self.checkpoint_lost();
            return;
        }
        if let Some(next) = rotation.steps.pop_front() {
            self.rotation = Some(rotation);
            self.issue(next, Purpose::Rotation);
            return;
        }
        let next = Open::new(self.open.index + 1);
        let mut next = next;
        next.lenient = self.open.lenient;
        let old = std::mem::replace(&mut self.open, next);
        self.sync_requested = 0;
        self.sealed.push(Sealed {
            index: old.index,
            meta: rotation.meta,
            present: true,
        });
        self.apply_retention();
    }

    /// The segment that holds the checkpoint recovery would start from (1 if none: the
    /// log's start).
    fn replay_segment(&self) -> u64 {
        if self.open.checkpoint_at.is_some() {
            return self.open.index;
        }
        self.sealed
            .iter()
            .rev()
            .find(|s| s.present && s.meta.checkpoint_at.is_some())
            .map_or(1, |s| s.index)
    }

    /// Removes the oldest sealed segment if the log is over its size or it is over its
    /// age, never one recovery still needs; the next when that removal returns.
    fn apply_retention(&mut self) {
        if self.config.retention_bytes.is_none() && self.config.retention_age.is_none() {
            return;
        }
        // One removal at a time, oldest first, the next when it returned: operations in
        // flight may be performed in any order, and a crash after a newer segment was
        // removed but not an older one would leave a gap that recovery refuses
        // (`MissingSegment`). (All were issued at once; found by
        // tests/log_engine_model.rs.)
        if self.removing {
            return;
        }
        let keep_from = self.replay_segment();
        let now = self.now.as_millis();
        let total = self.bytes();
        let Some(oldest) = self.sealed.iter().position(|s| s.present) else {
            return;
        };
        let s = &self.sealed[oldest];
        if s.index >= keep_from {
            return;
        }
        let over = self.config.retention_bytes.is_some_and(|max| total > max);
        let old = self
            .config
            .retention_age
            .is_some_and(|age| now.saturating_sub(s.meta.sealed_at_ms) > age.as_millis() as u64);
        if !over && !old {
            return;
        }
        let segment = s.index;
        self.removing = true;
        // Its index and summary files first: once the segment is gone they are all that
        // answers for its conversations, and a previous run may have left them unsynced
        // (a rebuild that a process restart cut short, accepted from the page cache by
        // the next start); a power loss after the removal would then leave a log that
        // refuses to open (`RemovedSummary`; found by tests/log_engine_model.rs).
        let index = FileId::Index(segment);
        self.issue(
            Op::Sync(index),
            Purpose::RemoveSync {
                segment,
                file: index,
            },
        );
    }

    /// A removal (or the syncs before it) failed: the segment is still there; count it
    /// again, retention tries at the next seal.
    fn retention_failed(&mut self, segment: u64) {
        self.removing = false;
        if let Some(s) = self.sealed.iter_mut().find(|s| s.index == segment) {
            s.present = true;
        }
    }
}

/// Whether an append's first record is a checkpoint.
fn is_checkpoint(bytes: &[u8]) -> bool {
    matches!(
        decode_record(bytes),
        Decoded::Record { record, .. } if record.checkpoint_part().is_some()
    )
}
