//! History reads: the shard's `Fetch` (messages of a conversation by seq) and `Load` (a
//! conversation's last seq), answered from the read index and the segments.
//!
//! A read is a job. At most [`LogConfig::read_jobs_max`](super::LogConfig) run at once;
//! the rest wait in order (never refused). A job takes a snapshot of the index when it
//! starts (the sealed summaries that may hold its conversation and the open segment's
//! durable entries), then:
//! - Fetch: walks the candidate segments oldest first. A segment retention removed only
//!   moves the start past its last seq (one index block); a present one is searched with
//!   [`Find`] for the entries from the next seq wanted. Then it reads the frames, runs of
//!   frames within [`READ_SPAN_BYTES_MAX`] of each other in one read, at most
//!   [`JOB_READS_INFLIGHT_MAX`] reads at once, and checks that each is the message the
//!   index names.
//! - Load: the open segment's last durable entry, else one index block of each candidate
//!   sealed segment, newest first.
//!
//! Any failed read, short block or misplaced record restarts the job from a new snapshot
//! (a segment removed meanwhile is then skipped as removed), up to
//! [`LogConfig::read_attempts`](super::LogConfig) attempts; only then is it reported
//! failed, never as history gone. A failed read of a segment that retention removed since
//! the snapshot restarts the job without counting an attempt.

use super::{Completion, FileId, IoError, IoId, LogEngine, LogEvent, Op, Purpose};
use crate::log::{decode_record, Decoded, Record, StoredMessage};
use crate::proto::{ConvId, Seq};
use crate::segment_index::{self, BlockRef, Find, Step};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

/// Most bytes one coalesced read of frames covers: 128 KiB (see the gateway's former
/// reader: frames of one conversation this close are cheaper read together).
const READ_SPAN_BYTES_MAX: u64 = 128 * 1024;

/// Bytes a coalesced read takes past the start of its last frame: 4 KiB, which holds a
/// typical frame whole; a longer one is read again alone.
const READ_TAIL_BYTES: u64 = 4096;

/// Reads one job has in flight at once: 16.
const JOB_READS_INFLIGHT_MAX: usize = 16;

/// What a job reads for.
#[derive(Clone, Copy, Debug)]
enum Want {
    Fetch {
        fetch: u64,
        conv: ConvId,
        from: Seq,
        to: Seq,
        limit: u32,
    },
    Load {
        conv: ConvId,
    },
}

/// A sealed segment that may hold the job's conversation.
#[derive(Clone, Debug)]
struct Candidate {
    segment: u64,
    summary: Rc<super::SealedMeta>,
    present: bool,
}

/// What a read in flight is for.
#[derive(Clone, Copy, Debug)]
enum Tag {
    /// The block of a removed segment's index holding the conversation's last entry.
    RemovedLast(BlockRef),
    /// A block [`Find`] asked for.
    FindBlock(BlockRef),
    /// Run `i` of the frames.
    Run(usize),
    /// Frame `j` alone, whole.
    Frame(usize),
    /// A block for a Load.
    LoadBlock(BlockRef),
}

/// A frame to read: where, and which seq it must be.
#[derive(Clone, Copy, Debug)]
struct Location {
    segment: u64,
    offset: u64,
    seq: Seq,
}

/// Frames of one segment read in one request.
#[derive(Clone, Debug)]
struct Run {
    segment: u64,
    offset: u64,
    span: u64,
    entries: std::ops::Range<usize>,
}

#[derive(Debug)]
struct Job {
    want: Want,
    attempts: u32,
    candidates: Vec<Candidate>,
    /// The next candidate to look at.
    at: usize,
    /// Fetch: the open segment's entries of the conversation, from its first.
    open: Vec<(Seq, u64)>,
    open_segment: u64,
    /// Fetch: the next seq wanted.
    next: Seq,
    found: Vec<Location>,
    find: Option<Find>,
    runs: Vec<Run>,
    next_run: usize,
    messages: Vec<Option<StoredMessage>>,
    /// Reads in flight, for this attempt only (a restart forgets them).
    waiting: BTreeMap<IoId, Tag>,
}

/// The read jobs.
#[derive(Debug)]
pub(super) struct Reads {
    jobs_max: usize,
    queue: VecDeque<Want>,
    active: BTreeMap<u64, Job>,
    next_job: u64,
}

impl Reads {
    pub(super) fn new(jobs_max: usize) -> Reads {
        Reads {
            jobs_max,
            queue: VecDeque::new(),
            active: BTreeMap::new(),
            next_job: 1,
        }
    }

    pub(super) fn fetch(&mut self, fetch: u64, conv: ConvId, from: Seq, to: Seq, limit: u32) {
        self.queue.push_back(Want::Fetch {
            fetch,
            conv,
            from,
            to,
            limit,
        });
    }

    pub(super) fn load(&mut self, conv: ConvId) {
        self.queue.push_back(Want::Load { conv });
    }
}

/// Groups locations (in seq order, so in log order) into runs: consecutive entries in one
/// segment within [`READ_SPAN_BYTES_MAX`] of the run's first.
fn plan_runs(locations: &[Location]) -> Vec<Run> {
    let mut runs = Vec::new();
    let mut start = 0;
    while let Some(head) = locations.get(start) {
        let mut end = start + 1;
        while let Some(next) = locations.get(end) {
            let fits = next.segment == head.segment
                && next.offset >= head.offset
                && next.offset - head.offset + READ_TAIL_BYTES <= READ_SPAN_BYTES_MAX;
            if !fits {
                break;
            }
            end += 1;
        }
        let last = locations[end - 1];
        runs.push(Run {
            segment: head.segment,
            offset: head.offset,
            span: last.offset - head.offset + READ_TAIL_BYTES,
            entries: start..end,
        });
        start = end;
    }
    runs
}

/// What the frame at the start of `bytes` is, for a read that wanted message `seq` of
/// `conv`: the message, `Err(Some(len))` if only part of it was read (the whole frame is
/// `len` bytes), `Err(None)` if it is not that message.
fn expect_message(bytes: &[u8], conv: ConvId, seq: Seq) -> Result<StoredMessage, Option<usize>> {
    match decode_record(bytes) {
        Decoded::Record {
            record: Record::Message(m),
            ..
        } if m.conv == conv && m.seq == seq => Ok(m),
        Decoded::Incomplete { len } if len > bytes.len() => Err(Some(len)),
        _ => Err(None),
    }
}

impl LogEngine {
    /// Starts waiting jobs while there is room.
    pub(super) fn pump_reads(&mut self) {
        while self.reads.active.len() < self.reads.jobs_max {
            let Some(want) = self.reads.queue.pop_front() else {
                return;
            };
            let id = self.reads.next_job;
            self.reads.next_job += 1;
            self.reads.active.insert(
                id,
                Job {
                    want,
                    attempts: 0,
                    candidates: Vec::new(),
                    at: 0,
                    open: Vec::new(),
                    open_segment: 0,
                    next: Seq::ZERO,
                    found: Vec::new(),
                    find: None,
                    runs: Vec::new(),
                    next_run: 0,
                    messages: Vec::new(),
                    waiting: BTreeMap::new(),
                },
            );
            self.start_job(id);
        }
    }

    /// The open segment's entries of `conv` that reads may serve, from its first.
    fn open_entries(&self, conv: ConvId) -> Vec<(Seq, u64)> {
        let Some(index) = self.open.convs.get(&conv) else {
            return Vec::new();
        };
        index.offsets[..index.durable]
            .iter()
            .enumerate()
            .map(|(i, &offset)| (Seq(index.first.0 + i as u64), offset))
            .collect()
    }

    /// (Re)starts job `id` from a fresh snapshot of the index.
    fn start_job(&mut self, id: u64) {
        let conv = match self.reads.active[&id].want {
            Want::Fetch { conv, .. } | Want::Load { conv } => conv,
        };
        let candidates: Vec<Candidate> = self
            .sealed
            .iter()
            .filter(|s| s.meta.summary.may_contain(conv))
            .map(|s| Candidate {
                segment: s.index,
                summary: s.meta.clone(),
                present: s.present,
            })
            .collect();
        let open = self.open_entries(conv);
        let open_segment = self.open.index;
        let job = self.reads.active.get_mut(&id).expect("job is active");
        job.candidates = candidates;
        job.at = 0;
        job.open = open;
        job.open_segment = open_segment;
        job.found.clear();
        job.find = None;
        job.runs.clear();
        job.next_run = 0;
        job.messages.clear();
        job.waiting.clear();
        match job.want {
            Want::Fetch { from, .. } => {
                job.next = from.max(Seq(1));
                self.locate(id);
            }
            Want::Load { .. } => {
                if let Some(&(seq, _)) = job.open.last() {
                    return self.finish_job(id, Ok(Answer::Loaded(seq)));
                }
                job.candidates.reverse();
                self.load_next(id);
            }
        }
    }

    fn read_block(&mut self, id: u64, segment: u64, block: BlockRef, tag: Tag) {
        let io = self.issue(
            Op::Read {
                file: FileId::Index(segment),
                at: block.pos,
                len: block.len,
            },
            Purpose::Read { job: id },
        );
        let job = self.reads.active.get_mut(&id).expect("job is active");
        job.waiting.insert(io, tag);
    }

    /// Fetch: looks at candidates until one needs a read, then reads the frames.
    fn locate(&mut self, id: u64) {
        loop {
            let job = self.reads.active.get_mut(&id).expect("job is active");
            let Want::Fetch {
                conv, to, limit, ..
            } = job.want
            else {
                unreachable!("locate is for fetches")
            };
            let wanted = (limit as usize).saturating_sub(job.found.len());
            if wanted == 0 || job.next > to {
                return self.read_frames(id);
            }
            let Some(candidate) = job.candidates.get(job.at).cloned() else {
                // The open segment's entries follow the sealed ones.
                let next = job.next;
                let open_segment = job.open_segment;
                let start = job.open.partition_point(|&(seq, _)| seq < next);
                let mut expect = next;
                let mut gap = false;
                for &(seq, offset) in job.open[start..].iter().take(wanted) {
                    if seq > to {
                        break;
                    }
                    if seq != expect {
                        gap = true;
                        break;
                    }
                    job.found.push(Location {
                        segment: open_segment,
                        offset,
                        seq,
                    });
                    expect = expect.next();
                }
                if gap {
                    return self.job_failed(id);
                }
                job.next = expect;
                return self.read_frames(id);
            };
            let summary = &candidate.summary.summary;
            if !candidate.present {
                match segment_index::last_block(summary, conv) {
                    Some(block) => {
                        return self.read_block(
                            id,
                            candidate.segment,
                            block,
                            Tag::RemovedLast(block),
                        )
                    }
                    None => {
                        job.at += 1;
                        continue;
                    }
                }
            }
            let (find, step) = Find::start(summary, conv, job.next, to, wanted);
            match step {
                Step::Done(_) => job.at += 1,
                Step::Read(block) => {
                    job.find = Some(find);
                    return self.read_block(id, candidate.segment, block, Tag::FindBlock(block));
                }
            }
        }
    }

    /// Fetch: the entries of a present candidate were found.
    fn found_entries(&mut self, id: u64, entries: Vec<segment_index::IndexEntry>) {
        let job = self.reads.active.get_mut(&id).expect("job is active");
        let segment = job.candidates[job.at].segment;
        for entry in entries {
            if entry.seq != job.next {
                // Seqs are consecutive in log order: a damaged index file.
                return self.job_failed(id);
            }
            job.found.push(Location {
                segment,
                offset: entry.offset,
                seq: entry.seq,
            });
            job.next = job.next.next();
        }
        job.at += 1;
        self.locate(id);
    }

    /// Fetch: issues reads of the frames found, a window at a time.
    fn read_frames(&mut self, id: u64) {
        let job = self.reads.active.get_mut(&id).expect("job is active");
        if job.runs.is_empty() && !job.found.is_empty() && job.messages.is_empty() {
            job.runs = plan_runs(&job.found);
            job.messages = vec![None; job.found.len()];
        }
        if job.found.is_empty() {
            return self.finish_job(id, Ok(Answer::Fetched(Vec::new())));
        }
        let mut issue = Vec::new();
        while job.waiting.len() + issue.len() < JOB_READS_INFLIGHT_MAX {
            let Some(run) = job.runs.get(job.next_run) else {
                break;
            };
            issue.push((job.next_run, run.segment, run.offset, run.span));
            job.next_run += 1;
        }
        let done = job.waiting.is_empty() && issue.is_empty() && job.next_run == job.runs.len();
        if done {
            let messages: Vec<StoredMessage> = std::mem::take(&mut job.messages)
                .into_iter()
                .flatten()
                .collect();
            return self.finish_job(id, Ok(Answer::Fetched(messages)));
        }
        for (i, segment, offset, span) in issue {
            let io = self.issue(
                Op::Read {
                    file: FileId::Segment(segment),
                    at: offset,
                    len: span as usize,
                },
                Purpose::Read { job: id },
            );
            let job = self.reads.active.get_mut(&id).expect("job is active");
            job.waiting.insert(io, Tag::Run(i));
        }
    }

    /// Load: looks at candidates newest first.
    fn load_next(&mut self, id: u64) {
        let job = self.reads.active.get_mut(&id).expect("job is active");
        let Want::Load { conv } = job.want else {
            unreachable!("load_next is for loads")
        };
        while let Some(candidate) = job.candidates.get(job.at).cloned() {
            if let Some(block) = segment_index::last_block(&candidate.summary.summary, conv) {
                return self.read_block(id, candidate.segment, block, Tag::LoadBlock(block));
            }
            job.at += 1;
        }
        self.finish_job(id, Ok(Answer::Loaded(Seq::ZERO)));
    }

    /// A read of job `job` completed.
    pub(super) fn read_step(&mut self, job_id: u64, io: IoId, result: Result<Completion, IoError>) {
        let Some(job) = self.reads.active.get_mut(&job_id) else {
            return;
        };
        let Some(tag) = job.waiting.remove(&io) else {
            // A read of an attempt that was restarted since.
            return;
        };
        let bytes = match result {
            Ok(Completion::Read(bytes)) => bytes,
            Ok(other) => panic!("a read completed with {other:?}"),
            Err(_) => {
                // A segment retention removed since the job's snapshot: not a failed read
                // but a stale snapshot. Restart without counting an attempt (the new
                // snapshot skips the segment; each segment is removed once, so this
                // ends). Counting it answered `Err` with few attempts, though no read
                // failed (found by tests/log_engine_model.rs).
                let segment = match tag {
                    Tag::Run(i) => Some(job.runs[i].segment),
                    Tag::Frame(j) => Some(job.found[j].segment),
                    _ => None,
                };
                let removed =
                    segment.is_some_and(|n| self.sealed.iter().any(|s| s.index == n && !s.present));
                if removed {
                    return self.start_job(job_id);
                }
                return self.job_failed(job_id);
            }
        };
        match tag {
            Tag::RemovedLast(block) | Tag::FindBlock(block) | Tag::LoadBlock(block)
                if !job.candidates[job.at]
                    .summary
                    .summary
                    .check_block(block, &bytes) =>
            {
                // Short, or not the block the index file was written with: damaged.
                self.job_failed(job_id)
            }
            Tag::RemovedLast(_) => {
                let Want::Fetch { conv, .. } = job.want else {
                    unreachable!("only fetches skip removed segments")
                };
                if let Some(last) = segment_index::last_seq_in(&bytes, conv) {
                    job.next = job.next.max(last.next());
                }
                job.at += 1;
                self.locate(job_id);
            }
            Tag::FindBlock(_) => {
                let summary = job.candidates[job.at].summary.clone();
                let mut find = job.find.take().expect("a find is reading");
                match find.feed(&summary.summary, &bytes) {
                    Step::Read(block) => {
                        job.find = Some(find);
                        let segment = job.candidates[job.at].segment;
                        self.read_block(job_id, segment, block, Tag::FindBlock(block));
                    }
                    Step::Done(entries) => self.found_entries(job_id, entries),
                }
            }
            Tag::LoadBlock(_) => {
                let Want::Load { conv } = job.want else {
                    unreachable!("load blocks are for loads")
                };
                match segment_index::last_seq_in(&bytes, conv) {
                    Some(seq) => self.finish_job(job_id, Ok(Answer::Loaded(seq))),
                    None => {
                        job.at += 1;
                        self.load_next(job_id);
                    }
                }
            }
            Tag::Run(i) => self.run_read(job_id, i, &bytes),
            Tag::Frame(j) => {
                let Want::Fetch { conv, .. } = job.want else {
                    unreachable!("frames are for fetches")
                };
                match expect_message(&bytes, conv, job.found[j].seq) {
                    Ok(m) => {
                        job.messages[j] = Some(m);
                        self.read_frames(job_id);
                    }
                    Err(_) => self.job_failed(job_id),
                }
            }
        }
    }

    /// Run `i` of a fetch was read: decode its frames; a frame longer than what was read
    /// is read again alone.
    fn run_read(&mut self, id: u64, i: usize, bytes: &Bytes) {
        let job = self.reads.active.get_mut(&id).expect("job is active");
        let Want::Fetch { conv, .. } = job.want else {
            unreachable!("runs are for fetches")
        };
        let run = job.runs[i].clone();
        let mut again = Vec::new();
        for j in run.entries.clone() {
            let location = job.found[j];
            // Lossless: within a run's span, at most READ_SPAN_BYTES_MAX.
            let at = (location.offset - run.offset) as usize;
            let rest = bytes.get(at..).unwrap_or_default();
            match expect_message(rest, conv, location.seq) {
                Ok(m) => job.messages[j] = Some(m),
                Err(Some(len)) => again.push((j, location, len)),
                Err(None) => return self.job_failed(id),
            }
        }
        for (j, location, len) in again {
            let io = self.issue(
                Op::Read {
                    file: FileId::Segment(location.segment),
                    at: location.offset,
                    len,
                },
                Purpose::Read { job: id },
            );
            let job = self.reads.active.get_mut(&id).expect("job is active");
            job.waiting.insert(io, Tag::Frame(j));
        }
        self.read_frames(id);
    }

    /// An attempt of job `id` failed: restart it, or report it failed.
    fn job_failed(&mut self, id: u64) {
        let job = self.reads.active.get_mut(&id).expect("job is active");
        job.attempts += 1;
        if job.attempts >= self.config.read_attempts {
            return self.finish_job(id, Err(()));
        }
        self.start_job(id);
    }

    fn finish_job(&mut self, id: u64, answer: Result<Answer, ()>) {
        let job = self.reads.active.remove(&id).expect("job is active");
        let event = match (job.want, answer) {
            (Want::Fetch { fetch, .. }, Ok(Answer::Fetched(msgs))) => LogEvent::Fetched {
                fetch,
                result: Ok(msgs),
            },
            (Want::Fetch { fetch, .. }, Err(())) => LogEvent::Fetched {
                fetch,
                result: Err(()),
            },
            (Want::Load { conv }, Ok(Answer::Loaded(seq))) => LogEvent::Loaded {
                conv,
                result: Ok(seq),
            },
            (Want::Load { conv }, Err(())) => LogEvent::Loaded {
                conv,
                result: Err(()),
            },
            (want, answer) => panic!("job {want:?} answered with {answer:?}"),
        };
        self.events.push_back(event);
        self.pump_reads();
    }
}

/// A job's answer.
#[derive(Debug)]
enum Answer {
    Fetched(Vec<StoredMessage>),
    Loaded(Seq),
}
