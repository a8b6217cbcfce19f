//! Recovery: from a directory listing to a running log and the records to rebuild the
//! shard from. One operation at a time, in this order:
//!
//! 1. List the directory. Segment files must be numbered without a gap; summary files
//!    below the first segment are segments retention removed.
//! 2. Read the summary file of every sealed segment (a few KiB each): its index summary,
//!    message count and last checkpoint. A present segment whose summary is missing,
//!    damaged or does not match it is rebuilt (step 4); a removed segment's must be good.
//! 3. Read the open (last) segment whole and scan it.
//! 4. Rebuild: read each such sealed segment whole, scan it (any damage refuses the log:
//!    its records were durable), and write its index and summary files anew.
//! 5. Start the replay at the last whole checkpoint: the open segment's, else the newest
//!    sealed segment's that has one, else the log's start (only if no segment was
//!    removed). Read from there to the open segment, refusing damage.
//! 6. Cut the open segment's torn or zeroed tail (truncate, fdatasync), else fdatasync it
//!    (a process restart keeps unsynced writes in the page cache: what recovery hands over
//!    must be durable), or create segment 1 in an empty directory.
//!
//! Start-up therefore reads the summaries and the records since the last checkpoint, not
//! the whole log (except once, for a log written before summaries existed).

use super::{
    align_down, decode_summary, encode_summary, Completion, Damage, FileId, IoError, LogEngine,
    LogError, LogEvent, Op, Open, Phase, PlantedLogBug, Purpose, Recovered, Sealed, SealedMeta,
};
use crate::log::{scan, Record, ScanEnd};
use crate::segment_index::{self, IndexEntry, SegmentSummary};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

/// What recovery is waiting for.
#[derive(Clone, Copy, Debug)]
enum Step {
    Listing,
    Summary(u64),
    OpenSegment,
    RebuildRead(u64),
    RebuildWrite,
    Replay { segment: u64, from: u64 },
    Finish,
}

/// Recovery's state, held by the engine while it recovers.
#[derive(Debug)]
pub(super) struct Recovery {
    step: Step,
    /// Present segments, `first..=last` (none: an empty directory).
    present: Option<(u64, u64)>,
    /// Each segment file's length.
    lengths: BTreeMap<u64, u64>,
    /// Each index file's length.
    index_lengths: BTreeMap<u64, u64>,
    /// Summary files still to read, with their lengths.
    summaries: VecDeque<(u64, u64)>,
    metas: BTreeMap<u64, Rc<SealedMeta>>,
    rebuild: VecDeque<u64>,
    rebuilt: usize,
    writes: VecDeque<Op>,
    /// The open segment's bytes and its scan.
    open: Option<(Vec<u8>, crate::log::Scan)>,
    /// Sealed segments still to replay (from their start, but the first).
    replay: VecDeque<(u64, u64)>,
    replay_from: (u64, u64),
    records: Vec<Record>,
    read_bytes: u64,
    truncated: u64,
    /// A removed segment's summary is missing or damaged (its number).
    removed_damaged: Option<u64>,
    created_first: bool,
    planned: bool,
    cut: bool,
    /// The operation in flight and its step, and how many times it failed: a failed
    /// operation is tried again, up to `LogConfig::read_attempts` times.
    last: Option<(Op, Step)>,
    tries: u32,
}

impl Recovery {
    pub(super) fn new() -> Recovery {
        Recovery {
            step: Step::Listing,
            present: None,
            lengths: BTreeMap::new(),
            index_lengths: BTreeMap::new(),
            summaries: VecDeque::new(),
            metas: BTreeMap::new(),
            rebuild: VecDeque::new(),
            rebuilt: 0,
            writes: VecDeque::new(),
            open: None,
            replay: VecDeque::new(),
            replay_from: (1, 0),
            records: Vec::new(),
            read_bytes: 0,
            truncated: 0,
            removed_damaged: None,
            created_first: false,
            planned: false,
            cut: false,
            last: None,
            tries: 0,
        }
    }
}

/// Where the last whole checkpoint in `records` (at their offsets) starts: a run of parts
/// 0, 1, ... up to one marked last, nothing else between them.
fn last_checkpoint(records: &[(u64, Record)]) -> Option<u64> {
    let mut run = None;
    let mut found = None;
    for (offset, record) in records {
        match record.checkpoint_part() {
            Some((0, true)) => found = Some(*offset),
            Some((0, false)) => run = Some((*offset, 0)),
            Some((part, last)) => match run {
                Some((start, before)) if before + 1 == part => {
                    run = (!last).then_some((start, part));
                    if last {
                        found = Some(start);
                    }
                }
                _ => run = None,
            },
            None => run = None,
        }
    }
    found
}

/// A read of `len` bytes of `file` at `at`.
fn read_op(file: FileId, at: u64, len: u64) -> Op {
    Op::Read {
        file,
        at,
        len: usize::try_from(len).unwrap_or(usize::MAX),
    }
}

/// The damage a scan of a sealed segment found, if any: only a clean end or zero padding
/// pass.
fn sealed_damage(end: ScanEnd) -> Option<(u64, Damage)> {
    match end {
        ScanEnd::Clean | ScanEnd::ZeroTail { .. } => None,
        ScanEnd::Torn { offset } => Some((offset, Damage::Torn)),
        ScanEnd::Corrupt { offset, reason } => Some((offset, Damage::Frame(reason))),
    }
}

impl LogEngine {
    fn recovery(&mut self) -> &mut Recovery {
        match &mut self.phase {
            Phase::Recovering(r) => r,
            _ => panic!("a recovery step outside recovery"),
        }
    }

    fn recovery_issue(&mut self, op: Op, step: Step) {
        let r = self.recovery();
        r.step = step;
        r.last = Some((op.clone(), step));
        self.issue(op, Purpose::Recovery);
    }

    fn recovery_fail(&mut self, error: LogError) {
        self.stop(error);
    }

    /// The operation recovery waited for completed.
    pub(super) fn recovery_step(&mut self, result: Result<Completion, IoError>) {
        let step = std::mem::replace(&mut self.recovery().step, Step::Finish);
        let op_name = match &step {
            Step::Listing => "list",
            Step::Summary(_) | Step::OpenSegment | Step::RebuildRead(_) | Step::Replay { .. } => {
                "read"
            }
            Step::RebuildWrite => "write an index file",
            Step::Finish => "truncate, sync or create the open segment",
        };
        let file = match &step {
            Step::Summary(n) => Some(FileId::Summary(*n)),
            Step::OpenSegment => self.recovery().present.map(|(_, l)| FileId::Segment(l)),
            Step::RebuildRead(n) => Some(FileId::Segment(*n)),
            Step::Replay { segment, .. } => Some(FileId::Segment(*segment)),
            _ => None,
        };
        let attempts = self.config.read_attempts;
        let r = self.recovery();
        // Only reads (and the listing) are tried again: a failed fdatasync (or a truncate,
        // which syncs) may have dropped the dirty pages, and trying it again succeeds with
        // nothing left to write, so recovery would hand over records the disk no longer
        // has (found by tests/log_engine_model.rs). The log stops instead; the next start
        // reads what is really there.
        let reads = matches!(
            step,
            Step::Listing
                | Step::Summary(_)
                | Step::OpenSegment
                | Step::RebuildRead(_)
                | Step::Replay { .. }
        );
        if result.is_err() && reads && r.tries + 1 < attempts {
            // A transient error (a read EIO) must not refuse the log: try again.
            r.tries += 1;
            let (op, step) = r.last.clone().expect("an operation was in flight");
            return self.recovery_issue(op, step);
        }
        r.tries = 0;
        let completion = match (step, result) {
            // A summary that cannot be read is rebuilt, like a damaged one; but a removed
            // segment's cannot be, and a failed read of it says nothing about damage: it
            // is an I/O error, which a restart may not meet again. (It was reported as
            // `RemovedSummary`, a missing or damaged file; found by
            // tests/log_engine_model.rs.)
            (Step::Summary(n), Err(error))
                if self.recovery().present.is_some_and(|(first, _)| n < first) =>
            {
                return self.recovery_fail(LogError::Io {
                    op: op_name,
                    file,
                    error,
                })
            }
            (Step::Summary(n), Err(_)) => {
                self.summary_read(n, None);
                return self.recovery_next();
            }
            (_, Err(error)) => {
                return self.recovery_fail(LogError::Io {
                    op: op_name,
                    file,
                    error,
                })
            }
            (step, Ok(c)) => (step, c),
        };
        match completion {
            (Step::Listing, Completion::Listed(names)) => {
                if let Err(e) = self.listed(names) {
                    return self.recovery_fail(e);
                }
            }
            (Step::Summary(n), Completion::Read(bytes)) => self.summary_read(n, Some(bytes)),
            (Step::OpenSegment, Completion::Read(bytes)) => {
                let r = self.recovery();
                r.read_bytes += bytes.len() as u64;
                let bytes = bytes.to_vec();
                let found = scan(&bytes);
                r.open = Some((bytes, found));
            }
            (Step::RebuildRead(n), Completion::Read(bytes)) => {
                if let Err(e) = self.rebuild_segment(n, &bytes) {
                    return self.recovery_fail(e);
                }
            }
            (Step::RebuildWrite, Completion::Done) | (Step::Finish, Completion::Done) => {}
            (Step::Replay { segment, from }, Completion::Read(bytes)) => {
                if let Err(e) = self.replayed(segment, from, &bytes) {
                    return self.recovery_fail(e);
                }
            }
            (step, completion) => {
                panic!("recovery step {step:?} completed with {completion:?}")
            }
        }
        self.recovery_next();
    }

    /// Takes the listing: which segments exist, which were removed, which summaries to
    /// read.
    fn listed(&mut self, names: Vec<(String, u64)>) -> Result<(), LogError> {
        let mut segments = BTreeMap::new();
        let mut indexes = BTreeMap::new();
        let mut summaries = BTreeMap::new();
        for (name, len) in names {
            match FileId::parse(&name) {
                None => {}
                Some(Err(())) => return Err(LogError::BadName { name }),
                Some(Ok(FileId::Segment(n))) => {
                    segments.insert(n, len);
                }
                Some(Ok(FileId::Index(n))) => {
                    indexes.insert(n, len);
                }
                Some(Ok(FileId::Summary(n))) => {
                    summaries.insert(n, len);
                }
            }
        }
        let r = self.recovery();
        let (Some(&first), Some(&last)) = (segments.keys().next(), segments.keys().next_back())
        else {
            // An empty log, unless summaries say segments existed.
            return match summaries.keys().next_back() {
                Some(&n) => Err(LogError::MissingSegment { missing: n + 1 }),
                None => Ok(()),
            };
        };
        if let Some(missing) = (first..=last).find(|n| !segments.contains_key(n)) {
            return Err(LogError::MissingSegment { missing });
        }
        r.present = Some((first, last));
        for n in summaries.keys().copied().filter(|&n| n < first) {
            if !indexes.contains_key(&n) {
                return Err(LogError::RemovedSummary { segment: n });
            }
        }
        if let Some(&oldest) = summaries.keys().next() {
            if let Some(missing) = (oldest..first).find(|n| !summaries.contains_key(n)) {
                return Err(LogError::RemovedSummary { segment: missing });
            }
        }
        for n in summaries.keys().copied().filter(|&n| n < last) {
            r.summaries.push_back((n, summaries[&n]));
        }
        for n in (first..last).filter(|n| !summaries.contains_key(n)) {
            r.rebuild.push_back(n);
        }
        r.lengths = segments;
        r.index_lengths = indexes;
        Ok(())
    }

    /// A summary file was read (`None`: it could not be).
    fn summary_read(&mut self, n: u64, bytes: Option<Bytes>) {
        let r = self.recovery();
        let (first, _) = r
            .present
            .expect("summaries are read only when segments exist");
        r.read_bytes += bytes.as_ref().map_or(0, |b| b.len() as u64);
        let meta = bytes.as_deref().and_then(decode_summary).filter(|m| {
            let index_ok = r.index_lengths.get(&n) == Some(&m.index_len);
            let segment_ok = n < first || r.lengths.get(&n) == Some(&m.bytes);
            index_ok && segment_ok
        });
        match meta {
            Some(meta) => {
                r.metas.insert(n, Rc::new(meta));
            }
            None if n < first => {
                // Its segment is gone, so it cannot be rebuilt: `recovery_next` stops.
                r.removed_damaged.get_or_insert(n);
            }
            None => {
                if !r.rebuild.contains(&n) {
                    r.rebuild.push_back(n);
                }
            }
        }
    }

    /// Scans sealed segment `n` read whole, and queues its index and summary files.
    fn rebuild_segment(&mut self, n: u64, bytes: &[u8]) -> Result<(), LogError> {
        let found = scan(bytes);
        if let Some((offset, damage)) = sealed_damage(found.end) {
            return Err(LogError::Corrupt {
                file: FileId::Segment(n),
                offset,
                damage,
            });
        }
        let mut entries = Vec::new();
        let mut last_seqs: BTreeMap<_, crate::proto::Seq> = BTreeMap::new();
        for (offset, record) in &found.records {
            if let Record::Message(m) = record {
                if let Some(last) = last_seqs.insert(m.conv, m.seq) {
                    if m.seq.0 != last.0 + 1 {
                        return Err(LogError::SeqGap {
                            conv: m.conv,
                            last,
                            found: m.seq,
                        });
                    }
                }
                entries.push(IndexEntry {
                    conv: m.conv,
                    seq: m.seq,
                    offset: *offset,
                });
            }
        }
        let index = segment_index::encode(&mut entries);
        let meta = SealedMeta {
            bytes: found.valid_len,
            messages: entries.len() as u64,
            checkpoint_at: last_checkpoint(&found.records),
            sealed_at_ms: self.now.as_millis(),
            index_len: index.len() as u64,
            summary: SegmentSummary::of_sorted(&entries),
        };
        let summary = encode_summary(&meta);
        let r = self.recovery();
        r.read_bytes += bytes.len() as u64;
        r.rebuilt += 1;
        for (file, bytes) in [(FileId::Index(n), index), (FileId::Summary(n), summary)] {
            r.writes.push_back(Op::Create(file));
            r.writes.push_back(Op::Write {
                file,
                at: 0,
                bytes: Bytes::from(bytes),
            });
            r.writes.push_back(Op::Sync(file));
        }
        r.metas.insert(n, Rc::new(meta));
        Ok(())
    }

    /// Segment `segment` was read for the replay from `from`.
    fn replayed(&mut self, segment: u64, from: u64, bytes: &[u8]) -> Result<(), LogError> {
        let found = scan(bytes);
        if let Some((offset, damage)) = sealed_damage(found.end) {
            return Err(LogError::Corrupt {
                file: FileId::Segment(segment),
                offset: from + offset,
                damage,
            });
        }
        let r = self.recovery();
        r.read_bytes += bytes.len() as u64;
        r.records
            .extend(found.records.into_iter().map(|(_, record)| record));
        Ok(())
    }

    /// Issues recovery's next operation, or finishes.
    fn recovery_next(&mut self) {
        if !matches!(self.phase, Phase::Recovering(_)) {
            return;
        }
        let r = self.recovery();
        if let Some(segment) = r.removed_damaged {
            return self.recovery_fail(LogError::RemovedSummary { segment });
        }
        if let Some((n, len)) = r.summaries.pop_front() {
            return self.recovery_issue(read_op(FileId::Summary(n), 0, len), Step::Summary(n));
        }
        let Some((first, last)) = r.present else {
            // An empty directory: create the first segment, then run.
            if !r.created_first {
                r.created_first = true;
                return self.recovery_issue(Op::Create(FileId::Segment(1)), Step::Finish);
            }
            return self.recovery_done(Open::new(1), 0, ScanEnd::Clean);
        };
        if r.open.is_none() {
            let len = r.lengths[&last];
            if len > 0 {
                return self
                    .recovery_issue(read_op(FileId::Segment(last), 0, len), Step::OpenSegment);
            }
            r.open = Some((Vec::new(), scan(&[])));
        }
        if let Some(op) = r.writes.pop_front() {
            return self.recovery_issue(op, Step::RebuildWrite);
        }
        if let Some(n) = r.rebuild.pop_front() {
            let len = r.lengths[&n];
            return self.recovery_issue(read_op(FileId::Segment(n), 0, len), Step::RebuildRead(n));
        }
        if !r.planned {
            r.planned = true;
            if let Err(e) = self.plan_replay(first, last) {
                return self.recovery_fail(e);
            }
        }
        let r = self.recovery();
        if let Some((segment, from)) = r.replay.pop_front() {
            let len = r.lengths[&segment] - from;
            return self.recovery_issue(
                read_op(FileId::Segment(segment), from, len),
                Step::Replay { segment, from },
            );
        }
        self.recovery_finish(first, last);
    }

    /// Decides where the replay starts and queues the sealed segments it reads.
    fn plan_replay(&mut self, first: u64, last: u64) -> Result<(), LogError> {
        let r = self.recovery();
        let (_, open_scan) = r.open.as_ref().expect("the open segment was read");
        let start = match last_checkpoint(&open_scan.records) {
            Some(at) => (last, at),
            None => {
                let sealed = (first..last)
                    .rev()
                    .find_map(|n| r.metas[&n].checkpoint_at.map(|at| (n, at)));
                match sealed {
                    Some(start) => start,
                    None if first == 1 => (1, 0),
                    None => return Err(LogError::NoCheckpoint),
                }
            }
        };
        r.replay_from = start;
        for n in start.0..last {
            r.replay
                .push_back((n, if n == start.0 { start.1 } else { 0 }));
        }
        Ok(())
    }

    /// Cuts the open segment's tail if it must, then builds it from its scan and hands
    /// over.
    fn recovery_finish(&mut self, first: u64, last: u64) {
        let align = self.config.align;
        let keep_torn = self.planted(PlantedLogBug::TornTailKept);
        let r = self.recovery();
        let (len, valid_len) = {
            let (bytes, found) = r.open.as_ref().expect("the open segment was read");
            (bytes.len() as u64, found.valid_len)
        };
        if len > 0 && !r.cut {
            r.cut = true;
            // The records handed over are served as durable from now on, but a process
            // restart keeps the page cache: what the last run wrote and never synced is in
            // the file, not on the disk, and a power loss would take it back after the
            // shard served it (found by tests/log_engine_model.rs). So the open segment
            // is made durable either way: cut (a truncate syncs) or synced whole.
            let op = if valid_len < len && !keep_torn {
                Op::Truncate {
                    file: FileId::Segment(last),
                    len: valid_len,
                }
            } else {
                Op::Sync(FileId::Segment(last))
            };
            return self.recovery_issue(op, Step::Finish);
        }
        let Some((bytes, found)) = r.open.take() else {
            unreachable!("the open segment was read")
        };
        let (replay_segment, replay_offset) = r.replay_from;
        let mut open = Open::new(last);
        for (offset, record) in &found.records {
            if let Record::Message(m) = record {
                if let Err((conv, before, seq)) = open.push(m.conv, m.seq, *offset, *offset, true) {
                    return self.recovery_fail(LogError::SeqGap {
                        conv,
                        last: before,
                        found: seq,
                    });
                }
            }
            if replay_segment < last || *offset >= replay_offset {
                r.records.push(record.clone());
            }
        }
        open.checkpoint_at = last_checkpoint(&found.records);
        // Planted: the torn tail stays, and appends go on after it.
        let end = if keep_torn { len } else { valid_len };
        open.written = end;
        open.completed = end;
        open.durable = end;
        // Lossless: both are at most the segment's length, which was read into memory.
        open.unsynced = bytes[align_down(end, align) as usize..end as usize].to_vec();
        r.truncated = len - valid_len;
        self.recovery_done(open, first, found.end);
    }

    fn recovery_done(&mut self, mut open: Open, first: u64, tail: ScanEnd) {
        open.lenient = self.planted(PlantedLogBug::IndexPastDurable);
        let Phase::Recovering(r) = std::mem::replace(&mut self.phase, Phase::Running) else {
            unreachable!("recovery_done outside recovery")
        };
        let r = *r;
        self.sealed = r
            .metas
            .into_iter()
            .filter(|(index, _)| *index < open.index)
            .map(|(index, meta)| Sealed {
                index,
                meta,
                present: first > 0 && index >= first,
            })
            .collect();
        self.sync_requested = open.completed;
        self.since_checkpoint = r
            .records
            .iter()
            .filter(|rec| matches!(rec, Record::Message(_)))
            .count() as u64;
        self.open = open;
        let segments = self.segments();
        let bytes = self.bytes();
        self.events.push_back(LogEvent::Recovered(Recovered {
            records: r.records,
            segments,
            bytes,
            read_bytes: r.read_bytes,
            truncated_bytes: r.truncated,
            tail,
            replay_from: r.replay_from,
            rebuilt: r.rebuilt,
        }));
        if self.since_checkpoint >= self.config.checkpoint_messages {
            self.ask_checkpoint();
        }
        self.apply_retention();
    }
}
