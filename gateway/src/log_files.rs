//! The log's I/O on the shard's io_uring: one shard's log directory on local disk,
//! performing the operations of core's log engine ([`imgate_core::log_engine`]) through
//! the shard's [`Ring`], with no async runtime and no thread of its own.
//!
//! Every durability decision is the engine's: what to write where, when to sync, when a
//! segment is sealed, how a failed write is undone, what recovery keeps and cuts, where a
//! read looks, what retention removes. This module decides none of it. [`LogFiles`]
//! performs each [`Op`] on the files of the log directory exactly as the engine's driver
//! contract says, and reports a [`Completion`] or an [`IoError`]:
//!
//! - `List`: the names and lengths of the regular files in the directory, which is created
//!   first if missing (`create_dir_all`, then an fsync of its parent).
//! - `Create(f)`: opens `f` with create and truncate, then fsyncs the directory. A segment
//!   is opened with O_DIRECT when the filesystem takes it (see below); index and summary
//!   files always without. Write handles stay cached; creating a segment drops those of
//!   every other file (the engine is done writing them), and an index or summary file's
//!   handle is dropped once it is synced (the engine writes each once, then syncs it).
//! - `Write { file, at, bytes }`: all of `bytes` at `at`, in one ring write from an
//!   [`AlignedBuf`] the bytes are copied into. A segment write with O_DIRECT is aligned to
//!   [`LogFiles::align`] in position and length (the engine pads it; the executor refuses
//!   one that is not). A short write is an error.
//! - `Sync(f)`: fdatasync through `f`'s write handle (opened if none is cached). Several
//!   may be in flight on one file at once: that is the engine's pipelined group commit,
//!   and each covers every write that completed before it started.
//! - `Truncate { file, len }`: ftruncate, then fdatasync, one ring operation after the
//!   other.
//! - `Read { file, at, len }`: through read-only handles (at most
//!   [`READER_OPEN_SEGMENTS_MAX`] open, the least recently used dropped first), in ring
//!   reads of at most [`READ_STEP_BYTES`] (recovery reads whole segments), one after the
//!   other; fewer bytes than asked only where the file ends (a step that comes back
//!   short: a regular file's read is short only at its end). With O_DIRECT each step
//!   reads the aligned cover of its range and hands out the part asked for; a read done
//!   in one step hands out its buffer itself, without a copy.
//! - `Remove(f)`: drops `f`'s cached handles, unlinks it, fsyncs the directory.
//!
//! # What runs where
//!
//! Writes, fdatasyncs, reads, ftruncates and directory fsyncs go through the ring: they
//! are what waits on the disk, and several run at once, completing in any order. Opening
//! and closing files, unlinking, creating and listing the directory, and the O_DIRECT
//! probe are plain synchronous syscalls on the shard's thread: they are rare (recovery,
//! rotation, retention, a handle reopened after eviction) and touch only metadata the
//! kernel has cached, while everything durable about them (the directory fsyncs) is on the
//! ring. An operation that finishes without any disk I/O (a `List`, an empty write or
//! read, or one refused up front: a missing file, a misaligned write) still reports
//! through the ring, by a no-op ([`Ring::nop`]), so that every result reaches
//! the caller the same way: [`LogFiles::complete`].
//!
//! # Operations and their ids
//!
//! Each operation in flight holds a slot of a small slab; the tag of its ring operation
//! is [`TAG_LOG`] (top byte, for the reactor's routing), the slot's generation (bits 32 to
//! 55) and its index (low 32 bits). A slot is reused with a new generation, and an
//! operation has at most one ring operation in flight at a time (its steps run one after
//! the other), so a completion names exactly one step of one operation; a completion of a
//! finished operation is a bug and panics. The engine bounds how many operations are in
//! flight (one write, `syncs_inflight_max` syncs, a few reads per read job), so the slab
//! stays small.
//!
//! # Handles and descriptors
//!
//! A handle is an `Rc<File>`, shared by the caches and by every operation using it until
//! its last ring operation completes; the descriptor closes when the last of them drops.
//! So a handle dropped from a cache while an operation on it is in flight stays open
//! until that operation is done, and its descriptor number cannot be reused by another
//! file under a ring operation. A close's error is not reported (std drops it): every
//! byte the engine relies on went through an fdatasync on that descriptor that returned
//! success, and the engine's reads do not depend on a close.
//!
//! Errors map from the operating system's error number: ENOSPC is [`IoError::NoSpace`],
//! ENOENT [`IoError::NotFound`], anything else (EIO, a short write, ...) [`IoError::Io`].
//! Each failure is logged with the operation, the file and the error; what to do about it
//! is the engine's call (it resets after a failed write or sync, retries reads, and stops
//! the log when it cannot go on).
//!
//! [`LogFiles::run_to_idle`] runs an engine on the ring until it has nothing left to do,
//! every operation it issues in flight at once (recovery, tests, tools); a running
//! shard's reactor instead calls [`LogFiles::start`] for each operation and hands each
//! completion tagged [`TAG_LOG`] to [`LogFiles::complete`].
//!
//! # Direct I/O
//!
//! Whether the log writes with O_DIRECT is decided once, when the executor opens the
//! directory ([`LogFiles::open`]): it opens a probe file there with O_DIRECT and writes
//! one aligned block to it. If the filesystem refuses O_DIRECT (EINVAL), the log falls
//! back to buffered writes and fdatasync and logs a warning; durability is the same, only
//! the page cache is in the way. Writes are then aligned to 1 ([`LogFiles::align`]), else
//! to [`DIRECT_ALIGN_MIN`] (4 KiB) or the smallest larger power of two the device takes,
//! which the engine takes as its `LogConfig::align`.
//!
//! With O_DIRECT a write that ends inside a block writes that block padded with zeros,
//! and the engine's next write rewrites it with the old bytes, the new ones and fresh
//! padding. So after a crash a segment may end in zeros, which the engine's recovery cuts
//! off. Rewriting a block that holds durable bytes is safe even if the rewrite is torn:
//! every sector of the block carries the same durable bytes in its old and new version.
//! For the same reason a read of that block while it is rewritten sees the durable bytes
//! intact. The engine hands over the padding zeroed, and the executor copies every byte
//! of it into a buffer that is zeroed when made.
//!
//! Readers open every file with O_DIRECT when the log writes with it, so that reads never
//! race the writer's direct writes of the same block through the page cache (the kernel's
//! invalidation of cached pages after a direct write is best effort). Index and summary
//! files, written buffered, are read the same way: an O_DIRECT read writes back dirty
//! cached pages of its range first.
//!
//! Architecture invariant: the executor keeps no state about the log's contents. Its only
//! state is open handles (write handles by file, at most [`WRITER_OPEN_FILES_MAX`] cached;
//! read handles, at most [`READER_OPEN_SEGMENTS_MAX`]; the directory's) and the
//! operations in flight, and dropping a cached handle changes nothing but the cost of the
//! next operation.

use crate::uring::{AlignedBuf, Done, Owned, Ring};
use bytes::Bytes;
use imgate_core::log_engine::{
    Completion, FileId, Io as LogIo, IoError, IoId, LogEngine, LogEvent, Op,
};
use imgate_core::Instant;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Tags of this executor's ring operations carry this in their top byte; the reactor routes
/// completions whose `tag & TAG_KIND_MASK == TAG_LOG` to [`LogFiles::complete`].
pub const TAG_KIND_MASK: u64 = 0xff << 56;
/// The top byte of the tags of this executor's ring operations.
pub const TAG_LOG: u64 = 3 << 56;
/// Bits of a tag holding the slot's generation, above its index's 32.
const TAG_GENERATION_BITS: u32 = 24;
/// The generation's values, wrapping: a slot would have to be reused 2^24 times while a
/// completion of its first use is still on its way to be confused, and each use waits for
/// its completion.
const TAG_GENERATION_MASK: u32 = (1 << TAG_GENERATION_BITS) - 1;

/// Smallest alignment of O_DIRECT writes: 4 KiB. Devices report a logical block of 512
/// bytes or 4 KiB, but most current disks have a physical block of 4 KiB, and a write of
/// less than a physical block makes the device read, modify and write it. 4 KiB is a
/// multiple of every logical block size in use.
pub const DIRECT_ALIGN_MIN: u64 = 4096;

/// Largest alignment the O_DIRECT probe tries: 64 KiB. No common device has a larger
/// logical block; one that refuses even that gets buffered writes.
const DIRECT_ALIGN_MAX: u64 = 64 * 1024;

/// Most bytes one ring read asks for: 1 MiB. Recovery reads whole segments (the engine
/// scans a segment at once); reading them in steps keeps any one io_uring request, and
/// its buffer, small.
pub const READ_STEP_BYTES: usize = 1024 * 1024;

/// Most files the executor keeps open for reading (segments and index files): 16.
/// Reopening a file costs an `open` on the shard's thread; history reads mostly hit the
/// few newest segments, so a small cache serves most reads, and the bound keeps a shard's
/// file descriptors few.
pub const READER_OPEN_SEGMENTS_MAX: usize = 16;

/// Most write handles kept open: 4. The engine writes one segment at a time, and a
/// sealed segment's index and summary files only while it seals it; a handle dropped
/// from the cache is reopened if the engine writes the file again.
pub const WRITER_OPEN_FILES_MAX: usize = 4;

/// The file the executor opens with O_DIRECT to learn whether the filesystem takes it. Its
/// suffix is none of the log's, so the engine ignores it if a crash leaves it behind.
const PROBE_FILE: &str = "o-direct.probe";

/// How segment files are written, decided once at [`LogFiles::open`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IoMode {
    /// O_DIRECT.
    Direct,
    /// Through the page cache: the filesystem refused O_DIRECT, or the caller asked for it
    /// ([`LogFiles::open_with_mode`]: tests of this path, and comparisons).
    Buffered,
}

/// Why the executor could not open its directory.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A file or directory operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done ("create directory", "open", ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

/// `v` rounded down to a multiple of `align` (a power of two).
fn align_down(v: u64, align: u64) -> u64 {
    v & !(align - 1)
}

/// `v` rounded up to a multiple of `align` (a power of two).
fn align_up(v: u64, align: u64) -> u64 {
    align_down(v + (align - 1), align)
}

/// What the engine is told about a failed operation.
fn io_error_of(err: &io::Error) -> IoError {
    match err.raw_os_error() {
        Some(libc::ENOSPC) => IoError::NoSpace,
        Some(libc::ENOENT) => IoError::NotFound,
        Some(_) => IoError::Io,
        None => match err.kind() {
            io::ErrorKind::StorageFull => IoError::NoSpace,
            io::ErrorKind::NotFound => IoError::NotFound,
            _ => IoError::Io,
        },
    }
}

/// An operation's name, for logs.
fn op_name(op: &Op) -> &'static str {
    match op {
        Op::List => "list",
        Op::Create(_) => "create",
        Op::Write { .. } => "write",
        Op::Sync(_) => "fdatasync",
        Op::Truncate { .. } => "truncate",
        Op::Read { .. } => "read",
        Op::Remove(_) => "remove",
    }
}

/// The file an operation is on (`None`: the directory).
fn op_file(op: &Op) -> Option<FileId> {
    match op {
        Op::List => None,
        Op::Create(f) | Op::Sync(f) | Op::Remove(f) => Some(*f),
        Op::Write { file, .. } | Op::Truncate { file, .. } | Op::Read { file, .. } => Some(*file),
    }
}

/// An operation in flight.
struct Pending {
    id: IoId,
    /// Its name and file, for the log line of a failure.
    op: &'static str,
    file: Option<FileId>,
    /// The ring operation in flight for it, and what follows.
    step: Step,
}

/// The ring operation an operation waits for. Each holds the handle its ring operation
/// uses, so that the descriptor stays open until the completion.
enum Step {
    /// Finished without disk I/O: this is its result, reported when its no-op
    /// completes.
    Ready(io::Result<Completion>),
    /// The directory's fsync after a create or an unlink.
    SyncDir { _dir: Rc<File> },
    /// A write of `len` bytes.
    Write { _handle: Rc<File>, len: usize },
    /// An fdatasync of `file`.
    Sync { handle: Rc<File>, file: FileId },
    /// A truncate's ftruncate; its fdatasync follows.
    Truncate { handle: Rc<File> },
    /// A truncate's fdatasync.
    TruncateSync { _handle: Rc<File> },
    /// One step of a read.
    Read(Reading),
}

/// A read under way.
struct Reading {
    handle: Rc<File>,
    /// Alignment of every step's position and length (1 without O_DIRECT).
    align: u64,
    at: u64,
    len: usize,
    /// What the steps before read, when the read takes more than one.
    got: Vec<u8>,
    /// The step in flight: bytes of its buffer before the range asked for, and how many
    /// it asks for.
    skip: usize,
    want: usize,
}

impl Reading {
    /// Issues the next step: up to [`READ_STEP_BYTES`] from where the last one ended, as
    /// its aligned cover.
    fn issue(&mut self, ring: &mut Ring, tag: u64) {
        let pos = self.at + self.got.len() as u64;
        self.want = (self.len - self.got.len()).min(READ_STEP_BYTES);
        let aligned = align_down(pos, self.align);
        // Lossless: below `align`, itself at most DIRECT_ALIGN_MAX.
        self.skip = (pos - aligned) as usize;
        let cover = align_up((self.skip + self.want) as u64, self.align) as usize;
        let buf = AlignedBuf::zeroed(cover, self.align as usize);
        ring.read_at(self.handle.as_raw_fd(), buf, aligned, tag);
    }

    /// Takes a step's completion: the read's bytes if it is finished (all asked for, or
    /// the file ended), else `None` and the next step is to be issued.
    fn take(&mut self, buf: AlignedBuf, count: usize) -> Option<Bytes> {
        let taken = count.saturating_sub(self.skip).min(self.want);
        let ended = taken < self.want;
        if self.got.is_empty() && (ended || taken == self.len) {
            // Done in one step: its buffer is the answer, without a copy.
            return Some(buf.into_bytes(self.skip + taken).slice(self.skip..));
        }
        self.got
            .extend_from_slice(&buf.as_slice()[self.skip..self.skip + taken]);
        (ended || self.got.len() == self.len).then(|| Bytes::from(std::mem::take(&mut self.got)))
    }
}

/// What starting an operation came to.
enum Begun {
    /// A ring operation is in flight; this is the step it performs.
    Issued(Step),
    /// Finished at once, without disk I/O.
    Ready(io::Result<Completion>),
}

/// What a completion came to.
enum Advanced {
    /// The next ring operation is in flight.
    Next(Step),
    /// The operation is finished.
    Finished(io::Result<Completion>),
}

/// A slot of the slab of operations in flight.
struct Slot {
    generation: u32,
    pending: Option<Pending>,
}

/// Performs the log engine's operations on one shard's log directory, through the
/// shard's ring. See the module docs.
///
/// Not `Send`: it lives on its shard's thread, with its ring.
pub struct LogFiles {
    dir: PathBuf,
    mode: IoMode,
    align: u64,
    /// The directory's handle, for fsyncs, opened on first use.
    directory: Option<Rc<File>>,
    /// Write handles, the most recently used last; at most [`WRITER_OPEN_FILES_MAX`].
    writers: Vec<(FileId, Rc<File>)>,
    /// Read handles, the most recently used last; at most [`READER_OPEN_SEGMENTS_MAX`].
    readers: Vec<(FileId, Rc<File>)>,
    /// Operations in flight, by their tags' index.
    slots: Vec<Slot>,
    free: Vec<u32>,
    in_flight: usize,
}

impl LogFiles {
    /// Opens the log directory `dir` (created, durably, if missing) and learns whether its
    /// filesystem takes O_DIRECT: segments are written with it if so, buffered if not (a
    /// warning says so). Synchronous: it runs before the shard serves.
    pub fn open(dir: PathBuf) -> Result<LogFiles, StorageError> {
        LogFiles::open_with_mode(dir, IoMode::Direct)
    }

    /// [`LogFiles::open`], trying `wanted` first: [`IoMode::Buffered`] skips O_DIRECT
    /// altogether.
    pub(crate) fn open_with_mode(dir: PathBuf, wanted: IoMode) -> Result<LogFiles, StorageError> {
        // Absolute, so that the parent fsynced when the directory is created is the real
        // one (a relative name's parent may be empty).
        let dir = std::path::absolute(&dir).map_err(|source| StorageError::Io {
            op: "resolve",
            path: dir.clone(),
            source,
        })?;
        ensure_dir(&dir).map_err(|source| StorageError::Io {
            op: "create directory",
            path: dir.clone(),
            source,
        })?;
        let (mode, align) = match wanted {
            IoMode::Direct => match probe_direct_io(&dir)? {
                Some(align) => (IoMode::Direct, align),
                None => (IoMode::Buffered, 1),
            },
            IoMode::Buffered => (IoMode::Buffered, 1),
        };
        Ok(LogFiles {
            dir,
            mode,
            align,
            directory: None,
            writers: Vec::new(),
            readers: Vec::new(),
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
        })
    }

    /// The alignment of segment writes: the engine's `LogConfig::align`. 4 KiB (or the
    /// device's larger block) with O_DIRECT, 1 without.
    pub fn align(&self) -> u64 {
        self.align
    }

    /// Whether segments are written with O_DIRECT (`false`: buffered fallback).
    pub fn is_direct(&self) -> bool {
        self.mode == IoMode::Direct
    }

    /// Operations started and not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Starts performing `io` (see the module docs for what each operation does): submits
    /// its first ring operation to `ring` (queued for the ring's next submit); nothing
    /// waits on the disk. Opening a file or unlinking one is a synchronous syscall here.
    /// Its result comes out of [`LogFiles::complete`].
    pub fn start(&mut self, ring: &mut Ring, io: LogIo) {
        let (index, tag) = self.take_slot();
        let op = op_name(&io.op);
        let file = op_file(&io.op);
        let step = match self.begin(ring, tag, io.op) {
            Ok(Begun::Issued(step)) => step,
            Ok(Begun::Ready(result)) => self.ready(ring, tag, result),
            Err(err) => self.ready(ring, tag, Err(err)),
        };
        self.slots[index].pending = Some(Pending {
            id: io.id,
            op,
            file,
            step,
        });
    }

    /// One completion of this executor's (its tag has [`TAG_LOG`] in its top byte):
    /// issues the operation's next step, or returns the operation's result once it is
    /// finished. A failure is logged here and reported as the engine's [`IoError`].
    ///
    /// # Panics
    ///
    /// If `done` is not the completion of a step in flight of this executor's (the
    /// reactor's routing bug).
    pub fn complete(
        &mut self,
        ring: &mut Ring,
        done: Done,
    ) -> Option<(IoId, Result<Completion, IoError>)> {
        assert_eq!(
            done.tag & TAG_KIND_MASK,
            TAG_LOG,
            "a completion of another kind reached the log's executor"
        );
        let tag = done.tag;
        // Lossless: masked to 32 and 24 bits.
        let index = (tag & 0xffff_ffff) as usize;
        let generation = ((tag >> 32) as u32) & TAG_GENERATION_MASK;
        let pending = self
            .slots
            .get_mut(index)
            .filter(|slot| slot.generation == generation)
            .and_then(|slot| slot.pending.take());
        let Some(mut pending) = pending else {
            panic!("a log completion (tag {tag:#x}) names no operation in flight");
        };
        let step = std::mem::replace(&mut pending.step, Step::Ready(Ok(Completion::Done)));
        match self.advance(ring, tag, step, done) {
            Advanced::Next(step) => {
                pending.step = step;
                self.slots[index].pending = Some(pending);
                None
            }
            Advanced::Finished(result) => {
                // Lossless: slot indexes are below 2^32 (take_slot).
                self.free.push(index as u32);
                self.in_flight -= 1;
                Some((pending.id, self.report(&pending, result)))
            }
        }
    }

    /// Performs `engine`'s operations on `ring` until it has none left, all it issues in
    /// flight at once, handing each finished one to `engine.handle_completion` and
    /// draining its events after each, and returns those events in order. Recovery runs
    /// this before the shard serves.
    ///
    /// # Panics
    ///
    /// If `ring` has operations in flight other than this executor's: their completions
    /// would have nowhere to go. Or if the ring itself fails (`io_uring_enter` with an
    /// error other than a timeout or an interruption): the shard cannot do any I/O.
    pub fn run_to_idle(
        &mut self,
        ring: &mut Ring,
        engine: &mut LogEngine,
        now: impl Fn() -> Instant,
    ) -> Vec<LogEvent> {
        assert_eq!(
            ring.in_flight(),
            self.in_flight,
            "run_to_idle needs the ring to itself"
        );
        let mut events = Vec::new();
        let mut done = Vec::new();
        loop {
            events.extend(std::iter::from_fn(|| engine.poll_event()));
            while let Some(io) = engine.poll_io() {
                self.start(ring, io);
            }
            if self.in_flight == 0 {
                return events;
            }
            if let Err(err) = ring.submit_and_wait(None) {
                panic!("the shard's io_uring failed while the log ran: {err}");
            }
            ring.complete(&mut done);
            for d in done.drain(..) {
                if let Some((id, result)) = self.complete(ring, d) {
                    engine.handle_completion(now(), id, result);
                    events.extend(std::iter::from_fn(|| engine.poll_event()));
                    while let Some(io) = engine.poll_io() {
                        self.start(ring, io);
                    }
                }
            }
        }
    }

    /// A free slot for a new operation: its index and its ring operations' tag.
    fn take_slot(&mut self) -> (usize, u64) {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    pending: None,
                });
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 log operations")
            }
        };
        let slot = &mut self.slots[index as usize];
        assert!(slot.pending.is_none(), "a free slot holds no operation");
        slot.generation = (slot.generation + 1) & TAG_GENERATION_MASK;
        self.in_flight += 1;
        let tag = TAG_LOG | u64::from(slot.generation) << 32 | u64::from(index);
        (index as usize, tag)
    }

    /// Reports `result` through the ring: a no-op completes at once.
    fn ready(&self, ring: &mut Ring, tag: u64, result: io::Result<Completion>) -> Step {
        ring.nop(tag);
        Step::Ready(result)
    }

    /// Does what `op` needs before its first ring operation, and issues it.
    fn begin(&mut self, ring: &mut Ring, tag: u64, op: Op) -> io::Result<Begun> {
        Ok(match op {
            Op::List => Begun::Ready(self.list().map(Completion::Listed)),
            Op::Create(file) => {
                self.forget(file);
                let handle = Rc::new(self.open_writer(file, true)?);
                if let FileId::Segment(_) = file {
                    // The engine writes one segment at a time: whatever else it wrote is
                    // done.
                    self.writers.clear();
                }
                self.cache_writer(file, handle);
                let dir = self.directory()?;
                ring.fsync(dir.as_raw_fd(), false, tag);
                Begun::Issued(Step::SyncDir { _dir: dir })
            }
            Op::Write { file, at, bytes } => {
                if bytes.is_empty() {
                    return Ok(Begun::Ready(Ok(Completion::Done)));
                }
                let handle = self.writer(file)?;
                let len = bytes.len();
                let buf_align = if self.is_direct_file(file) {
                    if !at.is_multiple_of(self.align) || !(len as u64).is_multiple_of(self.align) {
                        // The engine pads and aligns every segment write: this is a bug.
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!(
                                "an O_DIRECT write of {len} bytes at {at} is not aligned to {}",
                                self.align
                            ),
                        ));
                    }
                    self.align as usize
                } else {
                    1
                };
                let mut buf = AlignedBuf::zeroed(len, buf_align);
                buf.as_mut_slice().copy_from_slice(&bytes);
                ring.write_at(handle.as_raw_fd(), buf, at, tag);
                Begun::Issued(Step::Write {
                    _handle: handle,
                    len,
                })
            }
            Op::Sync(file) => {
                let handle = self.writer(file)?;
                ring.fsync(handle.as_raw_fd(), true, tag);
                Begun::Issued(Step::Sync { handle, file })
            }
            Op::Truncate { file, len } => {
                let handle = self.writer(file)?;
                ring.truncate(handle.as_raw_fd(), len, tag);
                Begun::Issued(Step::Truncate { handle })
            }
            Op::Read { file, at, len } => {
                if len == 0 {
                    return Ok(Begun::Ready(Ok(Completion::Read(Bytes::new()))));
                }
                let mut reading = Reading {
                    handle: self.reader(file)?,
                    align: if self.mode == IoMode::Direct {
                        self.align
                    } else {
                        1
                    },
                    at,
                    len,
                    got: Vec::new(),
                    skip: 0,
                    want: 0,
                };
                reading.issue(ring, tag);
                Begun::Issued(Step::Read(reading))
            }
            Op::Remove(file) => {
                self.forget(file);
                std::fs::remove_file(self.path(file))?;
                let dir = self.directory()?;
                ring.fsync(dir.as_raw_fd(), false, tag);
                Begun::Issued(Step::SyncDir { _dir: dir })
            }
        })
    }

    /// Takes the completion of `step`: issues the next step, or finishes.
    fn advance(&mut self, ring: &mut Ring, tag: u64, step: Step, done: Done) -> Advanced {
        let count = match (&step, done.io_result()) {
            // A ready operation's no-op carries nothing of its own.
            (Step::Ready(_), _) => 0,
            (_, Ok(count)) => count,
            (_, Err(err)) => return Advanced::Finished(Err(err)),
        };
        match step {
            Step::Ready(result) => Advanced::Finished(result),
            Step::SyncDir { .. } | Step::TruncateSync { .. } => {
                Advanced::Finished(Ok(Completion::Done))
            }
            Step::Write { len, .. } => Advanced::Finished(if count == len {
                Ok(Completion::Done)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("short write: {count} of {len} bytes"),
                ))
            }),
            Step::Sync { handle, file } => {
                if !matches!(file, FileId::Segment(_)) {
                    // An index or summary file is written once and synced last: done
                    // with it (unless it was created anew meanwhile).
                    self.writers
                        .retain(|(id, cached)| *id != file || !Rc::ptr_eq(cached, &handle));
                }
                Advanced::Finished(Ok(Completion::Done))
            }
            Step::Truncate { handle } => {
                ring.fsync(handle.as_raw_fd(), true, tag);
                Advanced::Next(Step::TruncateSync { _handle: handle })
            }
            Step::Read(mut reading) => {
                let Owned::Buf(buf) = done.owned else {
                    unreachable!("a ring read gives back its buffer with its completion");
                };
                match reading.take(buf, count) {
                    Some(bytes) => Advanced::Finished(Ok(Completion::Read(bytes))),
                    None => {
                        reading.issue(ring, tag);
                        Advanced::Next(Step::Read(reading))
                    }
                }
            }
        }
    }

    /// The engine's view of `result`; a failure is logged with the operation and the file.
    fn report(
        &self,
        pending: &Pending,
        result: io::Result<Completion>,
    ) -> Result<Completion, IoError> {
        result.map_err(|err| {
            let error = io_error_of(&err);
            let path = pending
                .file
                .map_or_else(|| self.dir.clone(), |f| self.path(f));
            let op = pending.op;
            if error == IoError::NotFound {
                // A read racing retention's removal, say: the engine retries it.
                tracing::warn!(op, path = %path.display(), error = %err, "log operation failed");
            } else {
                tracing::error!(op, path = %path.display(), error = %err, "log operation failed");
            }
            error
        })
    }

    fn path(&self, file: FileId) -> PathBuf {
        self.dir.join(file.name())
    }

    /// Whether `file` is written with O_DIRECT: segments, when the log is.
    fn is_direct_file(&self, file: FileId) -> bool {
        self.mode == IoMode::Direct && matches!(file, FileId::Segment(_))
    }

    fn list(&self) -> io::Result<Vec<(String, u64)>> {
        ensure_dir(&self.dir)?;
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            // A name that is not UTF-8 is none of the log's.
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let meta = std::fs::metadata(entry.path())?;
            if meta.is_file() {
                files.push((name, meta.len()));
            }
        }
        files.sort();
        Ok(files)
    }

    /// The directory's handle, opened on first use.
    fn directory(&mut self) -> io::Result<Rc<File>> {
        if let Some(directory) = &self.directory {
            return Ok(directory.clone());
        }
        let directory = Rc::new(File::open(&self.dir)?);
        self.directory = Some(directory.clone());
        Ok(directory)
    }

    /// Opens `file` for reading and writing (O_DIRECT for a segment of a direct log);
    /// `create`: creates it, or truncates it.
    fn open_writer(&self, file: FileId, create: bool) -> io::Result<File> {
        let mut options = OpenOptions::new();
        options
            .read(true)
            .write(true)
            .create(create)
            .truncate(create);
        if self.is_direct_file(file) {
            options.custom_flags(libc::O_DIRECT);
        }
        options.open(self.path(file))
    }

    /// Drops every cached handle of `file` (it is about to be created anew or removed);
    /// operations in flight on them keep theirs open until they finish.
    fn forget(&mut self, file: FileId) {
        self.writers.retain(|(id, _)| *id != file);
        self.readers.retain(|(id, _)| *id != file);
    }

    /// The write handle of `file`: cached, or the existing file opened (not created).
    fn writer(&mut self, file: FileId) -> io::Result<Rc<File>> {
        if let Some(handle) = touch(&mut self.writers, file) {
            return Ok(handle);
        }
        let handle = Rc::new(self.open_writer(file, false)?);
        self.cache_writer(file, handle.clone());
        Ok(handle)
    }

    /// Caches `handle` as `file`'s (replacing any other), dropping the least recently used
    /// handle if the cache is full.
    fn cache_writer(&mut self, file: FileId, handle: Rc<File>) {
        self.writers.retain(|(id, _)| *id != file);
        self.writers.push((file, handle));
        if self.writers.len() > WRITER_OPEN_FILES_MAX {
            self.writers.remove(0);
        }
    }

    /// A read handle on `file`, from the cache or newly opened read-only (with O_DIRECT
    /// when the log writes with it), then cached, the least recently used one dropped if
    /// the cache is full.
    fn reader(&mut self, file: FileId) -> io::Result<Rc<File>> {
        if let Some(handle) = touch(&mut self.readers, file) {
            return Ok(handle);
        }
        let mut options = OpenOptions::new();
        options.read(true);
        if self.mode == IoMode::Direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let handle = Rc::new(options.open(self.path(file))?);
        self.readers.push((file, handle.clone()));
        if self.readers.len() > READER_OPEN_SEGMENTS_MAX {
            self.readers.remove(0);
        }
        Ok(handle)
    }
}

/// `file`'s handle in `cache`, marked the most recently used.
fn touch(cache: &mut Vec<(FileId, Rc<File>)>, file: FileId) -> Option<Rc<File>> {
    let at = cache.iter().position(|(id, _)| *id == file)?;
    let entry = cache.remove(at);
    let handle = entry.1.clone();
    cache.push(entry);
    Some(handle)
}

/// Creates `dir` if it is missing, and makes its entry durable (an fsync of its parent).
fn ensure_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Writes a block to a probe file in `dir` with O_DIRECT: `Some(alignment of segment
/// writes)` if the filesystem takes it (the smallest power of two from
/// [`DIRECT_ALIGN_MIN`] to [`DIRECT_ALIGN_MAX`] it accepts), `None` (and a warning) if it
/// refuses (EINVAL).
fn probe_direct_io(dir: &Path) -> Result<Option<u64>, StorageError> {
    let path = dir.join(PROBE_FILE);
    let failed = |op: &'static str, source: io::Error| StorageError::Io {
        op,
        path: path.clone(),
        source,
    };
    let refused = |error: &io::Error| {
        tracing::warn!(
            path = %dir.display(),
            %error,
            "the filesystem refuses O_DIRECT; the log falls back to buffered writes and fdatasync"
        );
    };
    let opened = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path);
    let result = match opened {
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
            refused(&err);
            Ok(None)
        }
        Err(err) => Err(failed("open", err)),
        Ok(file) => {
            let mut align = DIRECT_ALIGN_MIN;
            loop {
                // Lossless: at most DIRECT_ALIGN_MAX.
                let block = AlignedBuf::zeroed(align as usize, align as usize);
                match file.write_at(block.as_slice(), 0) {
                    Ok(n) if n == block.len() => break Ok(Some(align)),
                    Ok(n) => {
                        break Err(failed(
                            "write",
                            io::Error::other(format!("short write: {n} of {align} bytes")),
                        ))
                    }
                    Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                        if align >= DIRECT_ALIGN_MAX {
                            refused(&err);
                            break Ok(None);
                        }
                        align *= 2;
                    }
                    Err(err) => break Err(failed("write", err)),
                }
            }
        }
    };
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(failed("remove", err)),
    }
    result
}

#[cfg(test)]
mod tests {
    //! The executor under core's log engine, on real files in a temporary directory, on a
    //! real io_uring: the engine's decisions are tested in core on an in-memory disk; these
    //! check that the gateway's files carry them out (O_DIRECT, padding, truncation,
    //! rotation, recovery from what a crash or an operator leaves, reads while writes run,
    //! damage found on disk).
    //!
    //! [`Rig`] drives an engine the way the reactor does: recovery with
    //! [`LogFiles::run_to_idle`], then every operation started as soon as the engine issues
    //! it (all in flight at once), the ring waited on, each completion handed back, and the
    //! engine's events drained after every call into it. No sleeps: a test waits on the
    //! ring, for the completions of what it started.

    use super::*;
    use imgate_core::log::{
        encode_record, scan, CorruptReason, Record, ScanEnd, StoredMessage, RECORD_HEADER_LEN,
    };
    use imgate_core::log_engine::{Damage, LogConfig, LogError, Recovered};
    use imgate_core::proto::{ClientMsgId, ConvId, DeviceId, Seq, UserId};
    use imgate_core::segment_index::{self, IndexEntry};
    use imgate_core::shard::Lsn;
    use std::collections::{BTreeMap, VecDeque};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Both ways of writing segments; O_DIRECT is what /tmp (ext4 here) gets by default.
    const MODES: [IoMode; 2] = [IoMode::Direct, IoMode::Buffered];

    /// Offset of the body in a frame: after the length and the CRC.
    const RECORD_BODY_OFFSET: usize = RECORD_HEADER_LEN;

    /// How long a test waits for an event before it fails.
    const WAIT_MAX: Duration = Duration::from_secs(60);

    /// How long one wait on the ring lasts at most, so that `WAIT_MAX` is checked.
    const WAIT_STEP: Duration = Duration::from_millis(500);

    /// A directory under the system temp dir (or `root`), removed when dropped (also on
    /// panic).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            TempDir::under(&std::env::temp_dir(), name)
        }

        fn under(root: &Path, name: &str) -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let unique = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = root.join(format!(
                "imgate-log-files-{name}-{}-{unique}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&path);
            TempDir(path)
        }

        fn file(&self, file: FileId) -> PathBuf {
            self.0.join(file.name())
        }

        fn segment(&self, n: u64) -> PathBuf {
            self.file(FileId::Segment(n))
        }

        fn len(&self, file: FileId) -> u64 {
            std::fs::metadata(self.file(file)).expect("stat").len()
        }

        fn read(&self, file: FileId) -> Vec<u8> {
            std::fs::read(self.file(file)).expect("read")
        }

        /// The segment numbers present, sorted.
        fn segments(&self) -> Vec<u64> {
            let mut segments: Vec<u64> = std::fs::read_dir(&self.0)
                .expect("read dir")
                .filter_map(
                    |e| match FileId::parse(e.expect("entry").file_name().to_str()?) {
                        Some(Ok(FileId::Segment(n))) => Some(n),
                        _ => None,
                    },
                )
                .collect();
            segments.sort_unstable();
            segments
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The tests' clock: fixed, so that what the engine writes (a summary's seal time) is
    /// the same when it is written again.
    fn now() -> Instant {
        Instant::from_millis(1_700_000_000_000)
    }

    fn config(segment_bytes: u64) -> LogConfig {
        LogConfig {
            segment_bytes,
            ..LogConfig::default()
        }
    }

    fn ring() -> Ring {
        Ring::new().expect("an io_uring")
    }

    /// Decides the fate of an operation before it is performed: `Some(error)` reports it
    /// failed without performing it.
    type Fault = Box<dyn Fn(&Op) -> Option<IoError>>;

    /// What kind of operation one in flight is, for the concurrency counts.
    #[derive(Clone, Copy)]
    struct Kind {
        read: bool,
        sync: bool,
    }

    /// The engine and what came out of it.
    struct Live {
        engine: LogEngine,
        events: Vec<LogEvent>,
        /// The last Lsn reported durable.
        durable: Option<Lsn>,
        /// Failed events seen.
        failed: usize,
        /// Checkpoints asked for and not yet appended.
        checkpoint_due: bool,
        fault: Option<Fault>,
        /// Operations started (on the files, or failed by the fault) and not yet handed
        /// back to the engine.
        started: BTreeMap<IoId, Kind>,
        /// Operations the fault failed, to hand back in order before the ring's.
        faulted: VecDeque<(IoId, IoError)>,
        reads_in_flight: usize,
        reads_in_flight_max: usize,
        syncs_in_flight: usize,
        syncs_in_flight_max: usize,
    }

    impl Live {
        fn take_events(&mut self) {
            while let Some(event) = self.engine.poll_event() {
                match event {
                    LogEvent::Durable(lsn) => self.durable = Some(lsn),
                    LogEvent::Failed => self.failed += 1,
                    LogEvent::CheckpointDue => self.checkpoint_due = true,
                    LogEvent::Stopped(e) => panic!("the log stopped: {e}"),
                    other => self.events.push(other),
                }
            }
        }

        /// Takes the answer of fetch `id`, if it came.
        fn take_fetched(&mut self, id: u64) -> Option<Result<Vec<StoredMessage>, ()>> {
            let at = self
                .events
                .iter()
                .position(|e| matches!(e, LogEvent::Fetched { fetch, .. } if *fetch == id))?;
            match self.events.remove(at) {
                LogEvent::Fetched { result, .. } => Some(result),
                _ => unreachable!(),
            }
        }
    }

    /// An engine on the executor and a ring, driven as the reactor drives it.
    struct Rig {
        live: Live,
        files: LogFiles,
        ring: Ring,
        next_lsn: u64,
        next_fetch: u64,
    }

    impl Rig {
        /// Opens the log in `dir` and recovers it; `Err` if the engine refuses it.
        fn open(
            dir: &TempDir,
            mode: IoMode,
            config: LogConfig,
        ) -> Result<(Rig, Recovered), LogError> {
            let mut ring = ring();
            let mut files =
                LogFiles::open_with_mode(dir.0.clone(), mode).expect("open the directory");
            // As the runtime configures it (`Config::log_config`): pipelined syncs only
            // with O_DIRECT.
            let config = LogConfig {
                align: files.align(),
                syncs_inflight_max: if files.align() > 1 {
                    imgate_core::log_engine::SYNCS_INFLIGHT_MAX
                } else {
                    1
                },
                ..config
            };
            let mut engine = LogEngine::new(config, now());
            let mut recovered = None;
            let mut later = Vec::new();
            for event in files.run_to_idle(&mut ring, &mut engine, now) {
                match event {
                    LogEvent::Recovered(r) => recovered = Some(r),
                    LogEvent::Stopped(e) => return Err(e),
                    other => later.push(other),
                }
            }
            assert_eq!(files.in_flight(), 0, "recovery ran to idle");
            assert_eq!(ring.in_flight(), 0, "and left nothing on the ring");
            let recovered = recovered.expect("recovery finished");
            let live = Live {
                engine,
                events: later,
                durable: None,
                failed: 0,
                checkpoint_due: false,
                fault: None,
                started: BTreeMap::new(),
                faulted: VecDeque::new(),
                reads_in_flight: 0,
                reads_in_flight_max: 0,
                syncs_in_flight: 0,
                syncs_in_flight_max: 0,
            };
            let rig = Rig {
                live,
                files,
                ring,
                next_lsn: 1,
                next_fetch: 1,
            };
            Ok((rig, recovered))
        }

        fn open_ok(dir: &TempDir, mode: IoMode, config: LogConfig) -> (Rig, Recovered) {
            Rig::open(dir, mode, config).expect("recovered")
        }

        /// Calls into the engine, drains its events, and starts its new operations.
        fn call<T>(&mut self, f: impl FnOnce(&mut Live) -> T) -> T {
            let out = f(&mut self.live);
            self.live.take_events();
            self.start_ios();
            out
        }

        /// Starts every operation the engine has issued, as the reactor does: on the
        /// files, unless the fault fails it.
        fn start_ios(&mut self) {
            while let Some(io) = self.live.engine.poll_io() {
                let kind = Kind {
                    read: matches!(io.op, Op::Read { .. }),
                    sync: matches!(io.op, Op::Sync(FileId::Segment(_))),
                };
                let live = &mut self.live;
                live.started.insert(io.id, kind);
                if kind.read {
                    live.reads_in_flight += 1;
                    live.reads_in_flight_max = live.reads_in_flight_max.max(live.reads_in_flight);
                }
                if kind.sync {
                    live.syncs_in_flight += 1;
                    live.syncs_in_flight_max = live.syncs_in_flight_max.max(live.syncs_in_flight);
                }
                match live.fault.as_ref().and_then(|f| f(&io.op)) {
                    Some(error) => live.faulted.push_back((io.id, error)),
                    None => self.files.start(&mut self.ring, io),
                }
            }
        }

        /// Hands operation `id`'s result to the engine, drains its events, and starts
        /// what it issues next.
        fn finished(&mut self, id: IoId, result: Result<Completion, IoError>) {
            let kind = self
                .live
                .started
                .remove(&id)
                .expect("a completion of an operation started");
            self.live.reads_in_flight -= usize::from(kind.read);
            self.live.syncs_in_flight -= usize::from(kind.sync);
            self.live.engine.handle_completion(now(), id, result);
            self.live.take_events();
            self.start_ios();
        }

        /// One turn of the loop: a failed (faulted) operation if there is one, else
        /// whatever the ring completes (waiting for at least one completion).
        fn turn(&mut self) {
            if let Some((id, error)) = self.live.faulted.pop_front() {
                self.finished(id, Err(error));
                return;
            }
            assert_eq!(
                self.files.in_flight(),
                self.live.started.len(),
                "every operation started is on the files"
            );
            assert!(self.files.in_flight() > 0, "waiting with nothing in flight");
            self.ring
                .submit_and_wait(Some(WAIT_STEP))
                .expect("io_uring_enter");
            let mut done = Vec::new();
            self.ring.complete(&mut done);
            for d in done {
                assert_eq!(d.tag & TAG_KIND_MASK, TAG_LOG, "every tag is the log's");
                if let Some((id, result)) = self.files.complete(&mut self.ring, d) {
                    self.finished(id, result);
                }
            }
        }

        /// Runs the loop until `find` finds what it looks for in the engine's state.
        fn wait_for<T>(&mut self, what: &str, mut find: impl FnMut(&mut Live) -> Option<T>) -> T {
            let started = std::time::Instant::now();
            loop {
                if let Some(found) = find(&mut self.live) {
                    return found;
                }
                assert!(
                    !self.live.started.is_empty(),
                    "nothing is in flight, and no {what}"
                );
                assert!(started.elapsed() < WAIT_MAX, "waited too long for {what}");
                self.turn();
            }
        }

        /// Appends `records` as one append; does not wait.
        fn append_nowait(&mut self, records: &[Record]) -> Lsn {
            let lsn = Lsn(self.next_lsn);
            self.next_lsn += 1;
            let bytes = frames(records);
            self.call(|live| live.engine.append(now(), lsn, bytes));
            lsn
        }

        /// Appends `records` as one append and waits until it is durable.
        fn append(&mut self, records: &[Record]) -> Lsn {
            let lsn = self.append_nowait(records);
            self.wait_for(&format!("{lsn:?} durable"), |live| {
                live.durable.filter(|&d| d >= lsn).map(|_| ())
            });
            lsn
        }

        /// Appends every batch, waiting for each to be durable.
        fn append_all(&mut self, records: &[Record], per_append: usize) {
            for batch in records.chunks(per_append) {
                self.append(batch);
            }
        }

        fn start_fetch(&mut self, conv: ConvId, from: u64, to: u64, limit: u32) -> u64 {
            let id = self.next_fetch;
            self.next_fetch += 1;
            self.call(|live| {
                live.engine
                    .fetch(now(), id, conv, Seq(from), Seq(to), limit);
            });
            id
        }

        fn fetched(&mut self, id: u64) -> Result<Vec<StoredMessage>, ()> {
            self.wait_for("a fetch", |live| live.take_fetched(id))
        }

        fn fetch(
            &mut self,
            conv: ConvId,
            from: u64,
            to: u64,
            limit: u32,
        ) -> Result<Vec<StoredMessage>, ()> {
            let id = self.start_fetch(conv, from, to, limit);
            self.fetched(id)
        }

        /// A fetch that must succeed.
        fn read(&mut self, conv: ConvId, from: u64, to: u64, limit: u32) -> Vec<StoredMessage> {
            self.fetch(conv, from, to, limit).expect("fetch")
        }

        fn loaded(&mut self, conv: ConvId) -> Result<Seq, ()> {
            self.wait_for("a load", |live| {
                let at = live
                    .events
                    .iter()
                    .position(|e| matches!(e, LogEvent::Loaded { conv: c, .. } if *c == conv))?;
                match live.events.remove(at) {
                    LogEvent::Loaded { result, .. } => Some(result),
                    _ => unreachable!(),
                }
            })
        }

        fn load(&mut self, conv: ConvId) -> Seq {
            self.call(|live| live.engine.load(now(), conv));
            self.loaded(conv).expect("load")
        }

        /// Appends a checkpoint if the engine asked for one.
        fn checkpoint_if_due(&mut self) {
            if std::mem::take(&mut self.live.checkpoint_due) {
                self.append(&[Record::Checkpoint {
                    part: 0,
                    groups: Vec::new(),
                    dedupe: Vec::new(),
                    last: true,
                }]);
            }
        }

        /// Runs the loop until no operation is in flight.
        fn settle(&mut self) {
            while !self.live.started.is_empty() {
                self.turn();
            }
        }

        /// Closes the log and waits for it: everything durable, the open segment cut to
        /// its data.
        fn close(mut self) {
            self.call(|live| live.engine.close(now()));
            self.wait_for("the log to close", |live| {
                let at = live
                    .events
                    .iter()
                    .position(|e| matches!(e, LogEvent::Closed))?;
                live.events.remove(at);
                Some(())
            });
            self.settle();
        }

        /// What a kill -9 leaves: nothing more reaches the files (once the operations
        /// already handed to the kernel are done).
        fn crash(mut self) {
            self.settle();
        }

        fn engine<T>(&self, f: impl FnOnce(&LogEngine) -> T) -> T {
            f(&self.live.engine)
        }

        fn set_fault(&mut self, fault: Option<Fault>) {
            self.live.fault = fault;
        }
    }

    /// Performs one operation on `files` and waits for its result.
    fn perform(ring: &mut Ring, files: &mut LogFiles, op: Op) -> Result<Completion, IoError> {
        files.start(ring, LogIo { id: IoId(1), op });
        let started = std::time::Instant::now();
        let mut done = Vec::new();
        loop {
            assert!(started.elapsed() < WAIT_MAX, "the operation never finished");
            ring.submit_and_wait(Some(WAIT_STEP))
                .expect("io_uring_enter");
            ring.complete(&mut done);
            for d in done.drain(..) {
                if let Some((id, result)) = files.complete(ring, d) {
                    assert_eq!(id, IoId(1));
                    assert_eq!(files.in_flight(), 0);
                    return result;
                }
            }
        }
    }

    // ---- Records ----

    fn conv_a() -> ConvId {
        ConvId::direct(UserId(3), UserId(9))
    }

    fn conv_b() -> ConvId {
        ConvId::group(7)
    }

    fn message(seq: u64, payload_len: usize) -> Record {
        Record::Message(StoredMessage {
            conv: conv_a(),
            seq: Seq(seq),
            sender: UserId(3),
            sender_device: DeviceId(2),
            client_msg_id: ClientMsgId([seq as u8; 16]),
            high_priority: false,
            payload: Bytes::from(vec![seq as u8; payload_len]),
            ts_ms: 0,
        })
    }

    /// Messages of A with seqs `seqs`, payloads of varied lengths so frames straddle
    /// blocks.
    fn messages(seqs: std::ops::Range<u64>) -> Vec<Record> {
        seqs.map(|seq| message(seq, 50 + (seq as usize * 37) % 700))
            .collect()
    }

    /// The messages of `records`.
    fn as_stored(records: &[Record]) -> Vec<StoredMessage> {
        records
            .iter()
            .filter_map(|r| match r {
                Record::Message(m) => Some(m.clone()),
                _ => None,
            })
            .collect()
    }

    fn frames(records: &[Record]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for record in records {
            encode_record(record, &mut bytes);
        }
        bytes
    }

    /// Message `seq` of `conv`, the same for the same arguments. Payload lengths vary so
    /// frames straddle blocks; every 17th of conversation A is larger than a tail read,
    /// and B's message 50 larger than a whole coalesced read, so both rereads run.
    fn stored(conv: ConvId, seq: u64) -> StoredMessage {
        let salt = conv.lo % 5;
        let payload_len = if conv == conv_b() && seq == 50 {
            200_000
        } else if conv == conv_a() && seq.is_multiple_of(17) {
            9_000
        } else {
            50 + ((seq + salt) as usize * 37) % 700
        };
        StoredMessage {
            conv,
            seq: Seq(seq),
            sender: UserId(3),
            sender_device: DeviceId(2),
            client_msg_id: ClientMsgId([(seq + salt) as u8; 16]),
            high_priority: seq.is_multiple_of(3),
            payload: Bytes::from(vec![(seq * 7 + salt) as u8; payload_len]),
            ts_ms: 0,
        }
    }

    fn stored_range(conv: ConvId, seqs: std::ops::RangeInclusive<u64>) -> Vec<StoredMessage> {
        seqs.map(|seq| stored(conv, seq)).collect()
    }

    /// A1, B1, A2, B2, ... for `seqs`, with a group record after every fifth pair (the
    /// index must skip records that are not messages).
    fn interleaved(seqs: std::ops::Range<u64>) -> Vec<Record> {
        let mut records = Vec::new();
        for seq in seqs {
            records.push(Record::Message(stored(conv_a(), seq)));
            records.push(Record::Message(stored(conv_b(), seq)));
            if seq % 5 == 0 {
                records.push(Record::MembersAdded {
                    group: conv_b(),
                    members: vec![UserId(seq)],
                });
            }
        }
        records
    }

    /// Where each message of `bytes` (a segment) starts: (conv, seq) -> offset.
    fn offsets(bytes: &[u8]) -> Vec<IndexEntry> {
        scan(bytes)
            .records
            .into_iter()
            .filter_map(|(offset, record)| match record {
                Record::Message(m) => Some(IndexEntry {
                    conv: m.conv,
                    seq: m.seq,
                    offset,
                }),
                _ => None,
            })
            .collect()
    }

    fn offset_of(bytes: &[u8], conv: ConvId, seq: u64) -> u64 {
        offsets(bytes)
            .into_iter()
            .find(|e| e.conv == conv && e.seq == Seq(seq))
            .expect("message in the segment")
            .offset
    }

    // ---- Descriptors ----

    /// Whether descriptor `fd` of this process has O_DIRECT set, from /proc.
    fn fd_has_o_direct(fd: std::os::fd::RawFd) -> bool {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).expect("fdinfo");
        let flags = info
            .lines()
            .find_map(|line| line.strip_prefix("flags:"))
            .and_then(|flags| u32::from_str_radix(flags.trim(), 8).ok())
            .expect("flags in fdinfo");
        flags & libc::O_DIRECT as u32 != 0
    }

    /// Whether `path` is on tmpfs, which takes O_DIRECT only on newer kernels (6.6).
    fn is_on_tmpfs(path: &Path) -> bool {
        let path = path.canonicalize().expect("canonicalize");
        let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
        mounts
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace().skip(1);
                Some((fields.next()?, fields.next()?))
            })
            .filter(|(mount_point, _)| path.starts_with(mount_point))
            .max_by_key(|(mount_point, _)| mount_point.len())
            .is_some_and(|(_, fs_type)| fs_type == "tmpfs")
    }

    fn writer_fd(files: &LogFiles, file: FileId) -> Option<std::os::fd::RawFd> {
        files
            .writers
            .iter()
            .find(|(id, _)| *id == file)
            .map(|(_, handle)| handle.as_raw_fd())
    }

    // ---- The tests ----

    #[test]
    fn direct_mode_writes_and_reads_segments_with_o_direct() {
        let shm = Path::new("/dev/shm");
        let mut cases: Vec<(TempDir, IoMode)> = MODES
            .iter()
            .map(|&mode| (TempDir::new("odirect"), mode))
            .collect();
        if shm.is_dir() && is_on_tmpfs(shm) {
            // tmpfs: O_DIRECT where the kernel takes it, else the buffered fallback.
            cases.push((TempDir::under(shm, "odirect-tmpfs"), IoMode::Direct));
        }
        for (dir, mode) in cases {
            let (mut rig, _) = Rig::open_ok(&dir, mode, config(1 << 20));
            let tmpfs = is_on_tmpfs(&dir.0);
            let direct = rig.files.is_direct();
            if !tmpfs {
                assert_eq!(direct, mode == IoMode::Direct, "{}", dir.0.display());
            }
            if mode == IoMode::Buffered {
                assert!(!direct, "buffered when asked");
            }
            assert_eq!(rig.files.align(), if direct { DIRECT_ALIGN_MIN } else { 1 });
            rig.append(&messages(1..5));
            let fd = writer_fd(&rig.files, FileId::Segment(1)).expect("segment 1 is open");
            assert_eq!(
                fd_has_o_direct(fd),
                direct,
                "{mode:?} in {}",
                dir.0.display()
            );
            // Readers stay out of the page cache when the log does.
            assert_eq!(rig.read(conv_a(), 1, 4, 10).len(), 4);
            assert!(!rig.files.readers.is_empty());
            for (_, file) in &rig.files.readers {
                assert_eq!(fd_has_o_direct(file.as_raw_fd()), direct);
            }
            // Written in whole blocks: the tail of the last one is zeros.
            let data = frames(&messages(1..5)).len() as u64;
            let on_disk = dir.len(FileId::Segment(1));
            assert_eq!(on_disk, align_up(data, rig.files.align()));
            rig.close();
            assert_eq!(dir.len(FileId::Segment(1)), data);
            // The probe file is gone.
            assert!(!dir.0.join(PROBE_FILE).exists());
        }
    }

    #[test]
    fn synced_records_come_back_in_order_after_reopen() {
        for mode in MODES {
            let dir = TempDir::new("roundtrip");
            let records = messages(1..200);
            let len = frames(&records).len() as u64;
            let (mut rig, recovered) = Rig::open_ok(&dir, mode, LogConfig::default());
            assert!(recovered.records.is_empty());
            assert_eq!(recovered.segments, 1);
            rig.append_all(&records, 7);
            assert_eq!(rig.engine(LogEngine::bytes), len);
            rig.close();
            assert_eq!(dir.len(FileId::Segment(1)), len);

            let (rig, recovered) = Rig::open_ok(&dir, mode, LogConfig::default());
            assert_eq!(recovered.records, records);
            assert_eq!(recovered.bytes, len);
            assert_eq!(recovered.truncated_bytes, 0);
            assert_eq!(recovered.tail, ScanEnd::Clean);
            assert_eq!(rig.engine(LogEngine::bytes), len);
            rig.close();
        }
    }

    /// A crash after a sync that ended inside a block: with O_DIRECT the file ends in the
    /// zero padding of its last block; either way a crash may leave more zeros (blocks
    /// allocated, never written) or garbage past the data. Recovery cuts it all.
    #[test]
    fn crash_after_sync_leaves_a_zero_tail_that_recovery_cuts() {
        for mode in MODES {
            for garbage in [false, true] {
                let dir = TempDir::new("padding");
                let records = messages(1..40);
                let len = frames(&records).len() as u64;
                {
                    let (mut rig, _) = Rig::open_ok(&dir, mode, LogConfig::default());
                    rig.append(&records);
                    rig.crash();
                }
                let mut on_disk = dir.read(FileId::Segment(1));
                if mode == IoMode::Direct {
                    assert_eq!(on_disk.len() as u64, align_up(len, DIRECT_ALIGN_MIN));
                    assert!(on_disk[len as usize..].iter().all(|&b| b == 0));
                } else {
                    assert_eq!(on_disk.len() as u64, len);
                }
                // What else a crash may leave past the data.
                let tail: Vec<u8> = if garbage {
                    (0..3000u32).map(|i| (i * 7 + 1) as u8).collect()
                } else {
                    vec![0; 4096]
                };
                on_disk.extend_from_slice(&tail);
                std::fs::write(dir.segment(1), &on_disk).expect("write");
                {
                    let (mut rig, recovered) = Rig::open_ok(&dir, mode, LogConfig::default());
                    assert_eq!(recovered.records, records);
                    assert_eq!(recovered.truncated_bytes, on_disk.len() as u64 - len);
                    if garbage {
                        assert!(
                            !matches!(recovered.tail, ScanEnd::Clean | ScanEnd::ZeroTail { .. }),
                            "{:?}",
                            recovered.tail
                        );
                    } else {
                        assert_eq!(recovered.tail, ScanEnd::ZeroTail { offset: len });
                    }
                    assert_eq!(dir.len(FileId::Segment(1)), len);
                    // Appends go on right after the data.
                    rig.append(&messages(40..42));
                    rig.crash();
                }
                let (rig, recovered) = Rig::open_ok(&dir, mode, LogConfig::default());
                assert_eq!(recovered.records, messages(1..42));
                rig.close();
            }
        }
    }

    #[test]
    fn rotation_spreads_records_over_segments_and_keeps_their_order() {
        for mode in MODES {
            let dir = TempDir::new("rotation");
            let records = messages(1..300);
            let segment_bytes = 8 * 1024;
            {
                let (mut rig, _) = Rig::open_ok(&dir, mode, config(segment_bytes));
                rig.append_all(&records, 5);
                // An append larger than a whole segment goes alone into a fresh one.
                let big = messages(300..340);
                assert!(frames(&big).len() as u64 > segment_bytes);
                let before = rig.engine(LogEngine::segments);
                rig.append(&big);
                assert_eq!(rig.engine(LogEngine::segments), before + 1);
                rig.append(&messages(340..341));
                assert_eq!(rig.engine(LogEngine::segments), before + 2);
                // Rotation dropped the write handles of the sealed segments and their
                // index and summary files.
                assert!(rig.files.writers.len() <= WRITER_OPEN_FILES_MAX);
                assert!(rig
                    .files
                    .writers
                    .iter()
                    .all(|(id, _)| *id == FileId::Segment(before as u64 + 2)));
                rig.close();
            }
            let segments = dir.segments();
            assert!(segments.len() > 10, "only {} segments", segments.len());
            assert_eq!(segments, (1..=segments.len() as u64).collect::<Vec<_>>());
            let sizes: Vec<u64> = segments
                .iter()
                .map(|&n| dir.len(FileId::Segment(n)))
                .collect();
            let oversized = sizes.iter().filter(|&&len| len > segment_bytes).count();
            assert_eq!(oversized, 1, "segment sizes {sizes:?}");
            // Every sealed segment has its index and summary files.
            for &n in &segments[..segments.len() - 1] {
                assert!(
                    dir.file(FileId::Index(n)).is_file(),
                    "no index file for {n}"
                );
                assert!(dir.file(FileId::Summary(n)).is_file(), "no summary for {n}");
            }
            let (rig, recovered) = Rig::open_ok(&dir, mode, config(segment_bytes));
            assert_eq!(recovered.records, messages(1..341));
            assert_eq!(recovered.segments, segments.len());
            assert_eq!(recovered.bytes, sizes.iter().sum::<u64>());
            assert_eq!(recovered.rebuilt, 0);
            rig.close();
        }
    }

    #[test]
    fn torn_tail_is_cut_and_appends_continue_right_after_it() {
        for mode in MODES {
            let dir = TempDir::new("torn");
            std::fs::create_dir_all(&dir.0).expect("mkdir");
            let kept = messages(1..4);
            let torn = frames(&messages(4..5));
            let mut bytes = frames(&kept);
            bytes.extend_from_slice(&torn[..torn.len() / 2]);
            std::fs::write(dir.segment(1), &bytes).expect("write");
            {
                let (mut rig, recovered) = Rig::open_ok(&dir, mode, LogConfig::default());
                assert_eq!(recovered.records, kept);
                assert_eq!(recovered.truncated_bytes, (torn.len() / 2) as u64);
                assert!(matches!(recovered.tail, ScanEnd::Torn { .. }));
                assert_eq!(rig.engine(LogEngine::bytes), frames(&kept).len() as u64);
                assert_eq!(dir.len(FileId::Segment(1)), frames(&kept).len() as u64);
                // Seq 4 again: the torn append was never acknowledged.
                rig.append(&messages(4..6));
                rig.crash();
            }
            let (rig, recovered) = Rig::open_ok(&dir, mode, LogConfig::default());
            assert_eq!(recovered.records, messages(1..6));
            rig.close();
        }
    }

    #[test]
    fn zero_padded_tail_is_cut_and_appends_continue_right_after_it() {
        for mode in MODES {
            let dir = TempDir::new("zeros");
            std::fs::create_dir_all(&dir.0).expect("mkdir");
            let kept = messages(1..6);
            let mut bytes = frames(&kept);
            let valid = bytes.len();
            bytes.resize(align_up(valid as u64, 4096) as usize + 4096, 0);
            std::fs::write(dir.segment(1), &bytes).expect("write");
            {
                let (mut rig, recovered) = Rig::open_ok(&dir, mode, LogConfig::default());
                assert_eq!(recovered.records, kept);
                assert_eq!(
                    recovered.tail,
                    ScanEnd::ZeroTail {
                        offset: valid as u64
                    }
                );
                assert_eq!(recovered.truncated_bytes, (bytes.len() - valid) as u64);
                assert_eq!(dir.len(FileId::Segment(1)), valid as u64);
                rig.append(&messages(6..8));
                rig.close();
            }
            let (rig, recovered) = Rig::open_ok(&dir, mode, LogConfig::default());
            assert_eq!(recovered.records, messages(1..8));
            rig.close();
        }
    }

    #[test]
    fn damage_in_a_sealed_segment_refuses_to_open() {
        let dir = TempDir::new("corrupt");
        std::fs::create_dir_all(&dir.0).expect("mkdir");
        let first = frames(&messages(1..5));
        let second = frames(&messages(5..9));
        std::fs::write(dir.segment(2), &second).expect("write");

        // A flipped bit in the body of the second record.
        let second_at = frames(&messages(1..2)).len();
        let mut flipped = first.clone();
        flipped[second_at + RECORD_BODY_OFFSET + 3] ^= 0x10;
        std::fs::write(dir.segment(1), &flipped).expect("write");
        for mode in MODES {
            let err = Rig::open(&dir, mode, LogConfig::default())
                .err()
                .expect("opened");
            match err {
                LogError::Corrupt {
                    file,
                    offset,
                    damage: Damage::Frame(CorruptReason::CrcMismatch { .. }),
                } => {
                    assert_eq!(file, FileId::Segment(1));
                    assert_eq!(offset, second_at as u64);
                }
                other => panic!("unexpected {other:?}"),
            }
        }

        // A sealed segment that ends inside a record.
        std::fs::write(dir.segment(1), &first[..first.len() - 1]).expect("write");
        let err = Rig::open(&dir, IoMode::Direct, LogConfig::default())
            .err()
            .expect("opened");
        assert!(
            matches!(
                err,
                LogError::Corrupt {
                    file: FileId::Segment(1),
                    damage: Damage::Torn,
                    ..
                }
            ),
            "{err:?}"
        );
        // Nothing was cut from either file.
        assert_eq!(dir.len(FileId::Segment(1)), first.len() as u64 - 1);
        assert_eq!(dir.read(FileId::Segment(2)), second);

        // Whole again, it opens.
        std::fs::write(dir.segment(1), &first).expect("write");
        let (rig, recovered) = Rig::open_ok(&dir, IoMode::Direct, LogConfig::default());
        assert_eq!(recovered.records, messages(1..9));
        assert_eq!(recovered.rebuilt, 1);
        rig.close();
    }

    #[test]
    fn a_missing_or_misnamed_segment_refuses_to_open() {
        let dir = TempDir::new("gap");
        std::fs::create_dir_all(&dir.0).expect("mkdir");
        std::fs::write(dir.segment(1), frames(&messages(1..2))).expect("write");
        std::fs::write(dir.segment(3), frames(&messages(2..3))).expect("write");
        let err = Rig::open(&dir, IoMode::Direct, LogConfig::default())
            .err()
            .expect("opened");
        assert_eq!(err, LogError::MissingSegment { missing: 2 });
        std::fs::remove_file(dir.segment(3)).expect("rm");
        std::fs::write(dir.0.join("7.seg"), b"").expect("write");
        let err = Rig::open(&dir, IoMode::Direct, LogConfig::default())
            .err()
            .expect("opened");
        assert_eq!(
            err,
            LogError::BadName {
                name: "7.seg".to_owned()
            }
        );
        // Other files are none of the log's business.
        std::fs::remove_file(dir.0.join("7.seg")).expect("rm");
        std::fs::write(dir.0.join("notes.txt"), b"hello").expect("write");
        let (rig, recovered) = Rig::open_ok(&dir, IoMode::Direct, LogConfig::default());
        assert_eq!(recovered.records, messages(1..2));
        rig.close();
    }

    #[test]
    fn a_seq_gap_in_the_log_refuses_to_open() {
        let dir = TempDir::new("seq-gap");
        std::fs::create_dir_all(&dir.0).expect("mkdir");
        let mut records = messages(1..3);
        records.extend(messages(4..5));
        std::fs::write(dir.segment(1), frames(&records)).expect("write");
        let err = Rig::open(&dir, IoMode::Direct, LogConfig::default())
            .err()
            .expect("opened");
        assert_eq!(
            err,
            LogError::SeqGap {
                conv: conv_a(),
                last: Seq(2),
                found: Seq(4)
            }
        );
    }

    /// A sync that fails (an I/O error cannot be provoked on a healthy disk from inside a
    /// test, so the test reports it failed instead of performing it): the engine cuts the
    /// open segment back to its durable end, and the executor does it on the real file.
    /// The failed messages are never served, and their seqs go to other messages.
    #[test]
    fn a_failed_sync_is_cut_back_on_disk_to_exactly_the_synced_records() {
        for mode in MODES {
            let dir = TempDir::new("reset");
            let synced = messages(1..20);
            let durable = frames(&synced).len() as u64;
            let replaced = |seq: u64| StoredMessage {
                payload: Bytes::from_static(b"sent again after the failure"),
                ..stored(conv_a(), seq)
            };
            let mut expected = synced.clone();
            expected.extend((20..23).map(|seq| Record::Message(replaced(seq))));
            {
                let (mut rig, _) = Rig::open_ok(&dir, mode, LogConfig::default());
                rig.append(&synced);
                // Large, so that the write reaches well past the durable end.
                let big: Vec<Record> = (20..30).map(|seq| message(seq, 20_000)).collect();
                rig.set_fault(Some(Box::new(|op| {
                    matches!(op, Op::Sync(FileId::Segment(_))).then_some(IoError::Io)
                })));
                rig.append_nowait(&big);
                rig.wait_for("the failure", |live| (live.failed == 1).then_some(()));
                rig.set_fault(None);
                rig.settle();
                assert_eq!(dir.len(FileId::Segment(1)), durable);
                assert_eq!(rig.engine(LogEngine::bytes), durable);
                assert_eq!(rig.read(conv_a(), 1, 100, 100), as_stored(&synced));
                // The engine hands seqs 20.. out again, for other messages.
                rig.append(&expected[19..]);
                let got = rig.read(conv_a(), 20, 100, 100);
                assert_eq!(got, (20..23).map(replaced).collect::<Vec<_>>());
                rig.crash();
            }
            let (rig, recovered) = Rig::open_ok(&dir, mode, LogConfig::default());
            assert_eq!(recovered.records, expected);
            rig.close();
        }
    }

    /// The reads both tests of a full log make, before and after a reopen.
    fn assert_reads_of_the_interleaved_log(rig: &mut Rig, count: u64) {
        assert_eq!(
            rig.read(conv_a(), 1, count, 10_000),
            stored_range(conv_a(), 1..=count)
        );
        assert_eq!(
            rig.read(conv_b(), 1, count, 10_000),
            stored_range(conv_b(), 1..=count)
        );
        assert_eq!(
            rig.read(conv_a(), 30, 60, 100),
            stored_range(conv_a(), 30..=60)
        );
        // Beyond what exists: what there is, then nothing.
        assert_eq!(
            rig.read(conv_a(), count - 3, count + 50, 100),
            stored_range(conv_a(), count - 3..=count)
        );
        assert!(rig.read(conv_a(), count + 1, count + 9, 100).is_empty());
        assert!(rig.read(ConvId::group(99), 1, 10, 100).is_empty());
        // A limit smaller than the range: the first `limit` of it.
        assert_eq!(
            rig.read(conv_b(), 10, 100, 5),
            stored_range(conv_b(), 10..=14)
        );
        // The large frame of B, alone and amid others.
        assert_eq!(
            rig.read(conv_b(), 50, 50, 1),
            stored_range(conv_b(), 50..=50)
        );
        assert_eq!(
            rig.read(conv_b(), 48, 52, 10),
            stored_range(conv_b(), 48..=52)
        );
        // Seq 0 is before the first message; an empty range or limit reads nothing.
        assert_eq!(rig.read(conv_a(), 0, 2, 10), stored_range(conv_a(), 1..=2));
        assert!(rig.read(conv_a(), 5, 4, 10).is_empty());
        assert!(rig.read(conv_a(), 1, 10, 0).is_empty());
        assert_eq!(rig.load(conv_a()), Seq(count));
        assert_eq!(rig.load(conv_b()), Seq(count));
    }

    #[test]
    fn reads_return_a_conversations_durable_messages_across_segments_and_after_reopen() {
        for mode in MODES {
            let dir = TempDir::new("read");
            let count = 150;
            let segment_bytes = 8 * 1024;
            let records = interleaved(1..count + 1);
            {
                let (mut rig, _) = Rig::open_ok(&dir, mode, config(segment_bytes));
                rig.append_all(&records, 7);
                let segments = rig.engine(LogEngine::segments);
                assert!(
                    segments > READER_OPEN_SEGMENTS_MAX,
                    "only {segments} segments"
                );
                assert_reads_of_the_interleaved_log(&mut rig, count);
                // Reading every segment kept only the newest handles open.
                assert_eq!(rig.files.readers.len(), READER_OPEN_SEGMENTS_MAX);
                assert!(rig.files.writers.len() <= WRITER_OPEN_FILES_MAX);
                rig.close();
            }
            let (mut rig, recovered) = Rig::open_ok(&dir, mode, config(segment_bytes));
            assert_eq!(recovered.records, records);
            assert_reads_of_the_interleaved_log(&mut rig, count);
            // Every sealed segment has its index and summary files.
            for n in 1..rig.engine(LogEngine::segments) as u64 {
                assert!(
                    dir.file(FileId::Index(n)).is_file(),
                    "no index file for {n}"
                );
                assert!(dir.file(FileId::Summary(n)).is_file(), "no summary for {n}");
            }
            rig.close();
        }
    }

    /// A conversation whose messages lie far apart (a large message of another between
    /// each two): one read per message, many in flight at once on one file, through the
    /// executor's shared read handle.
    #[test]
    fn a_read_of_scattered_messages_runs_many_reads_at_once() {
        for mode in MODES {
            let dir = TempDir::new("read-scattered");
            let count = 38;
            let other = ConvId::group(5);
            let (mut rig, _) = Rig::open_ok(&dir, mode, LogConfig::default());
            for seq in 1..=count {
                let filler = StoredMessage {
                    payload: Bytes::from(vec![1; 128 * 1024]),
                    ..stored(other, seq)
                };
                rig.append(&[
                    Record::Message(stored(conv_a(), seq)),
                    Record::Message(filler),
                ]);
            }
            assert_eq!(
                rig.read(conv_a(), 1, count, u32::MAX),
                stored_range(conv_a(), 1..=count)
            );
            let most = rig.live.reads_in_flight_max;
            assert!(most > 4, "at most {most} reads in flight");
            assert_eq!(
                rig.read(conv_a(), 30, 40, 5),
                stored_range(conv_a(), 30..=34)
            );
            rig.close();
        }
    }

    #[test]
    fn a_read_concurrent_with_writes_sees_exactly_the_durable_messages() {
        for mode in MODES {
            let dir = TempDir::new("read-concurrent");
            let batches = 60u64;
            let per_batch = 4u64;
            let (mut rig, _) = Rig::open_ok(&dir, mode, config(16 * 1024));
            let mut appended = 0u64;
            let mut reads = 0u64;
            let mut partial_reads = 0u64;
            let mut from = 1;
            // The fetch in flight, and how many of A's messages were durable when it
            // started.
            let mut reading: Option<(u64, u64)> = None;
            let started = std::time::Instant::now();
            loop {
                assert!(started.elapsed() < WAIT_MAX, "waited too long");
                let durable = rig.live.durable.map_or(0, |l| l.0);
                // The writer: one append per turn of the loop, so that reads and the
                // engine's I/O run while appends pile up, but after every fourth it waits
                // until the appends are at most two ahead of the durable ones (a fresh
                // segment takes a whole write, however large).
                if appended < batches && (!appended.is_multiple_of(4) || durable + 2 >= appended) {
                    // Lsn `batch + 1` holds A's seqs up to `(batch + 1) * per_batch`.
                    let batch = appended;
                    let lsn = rig.append_nowait(&interleaved(
                        batch * per_batch + 1..(batch + 1) * per_batch + 1,
                    ));
                    assert_eq!(lsn, Lsn(batch + 1));
                    appended += 1;
                }
                // The reader: what the engine reported durable when the read starts is
                // exactly what it serves: A's messages of every Lsn up to it.
                if let Some((id, known)) = reading {
                    if let Some(got) = rig.live.take_fetched(id) {
                        let got = got.expect("fetch");
                        assert_eq!(
                            got,
                            stored_range(conv_a(), from..=known),
                            "from {from}, durable {known}"
                        );
                        reads += 1;
                        if known > 0 && known < batches * per_batch {
                            partial_reads += 1;
                        }
                        from = (from + 13) % known.max(1) + 1;
                        reading = None;
                    }
                }
                if reading.is_none() {
                    if rig.live.durable == Some(Lsn(batches)) {
                        break;
                    }
                    let known = rig.live.durable.map_or(0, |l| l.0 * per_batch);
                    let id = rig.start_fetch(conv_a(), from, Seq::MAX.0, 1_000);
                    reading = Some((id, known));
                }
                if !rig.live.started.is_empty() {
                    rig.turn();
                }
            }
            assert!(
                partial_reads >= 10,
                "{partial_reads} of {reads} reads ran amid writes"
            );
            let total = batches * per_batch;
            assert_eq!(
                rig.read(conv_a(), 1, total, 10_000),
                stored_range(conv_a(), 1..=total)
            );
            assert!(rig.engine(LogEngine::segments) > 2);
            // Group commit pipelined its syncs on the segment file with O_DIRECT, and
            // synced one at a time with buffered writes.
            let syncs = rig.live.syncs_in_flight_max;
            let expected = if rig.files.align() > 1 {
                imgate_core::log_engine::SYNCS_INFLIGHT_MAX
            } else {
                1
            };
            assert_eq!(syncs, expected);
            rig.close();
        }
    }

    /// The segment (of `1..=last`) holding message `seq` of `conv`, from the files.
    fn segment_of(dir: &TempDir, last: u64, conv: ConvId, seq: u64) -> Option<u64> {
        (1..=last).find(|&n| {
            offsets(&dir.read(FileId::Segment(n)))
                .iter()
                .any(|e| e.conv == conv && e.seq == Seq(seq))
        })
    }

    #[test]
    fn a_damaged_frame_or_index_fails_the_read_without_a_panic() {
        for mode in MODES {
            let dir = TempDir::new("read-damage");
            let (mut rig, _) = Rig::open_ok(&dir, mode, config(8 * 1024));
            rig.append_all(&interleaved(1..60), 3);
            let open = rig.engine(LogEngine::segments) as u64;
            assert!(open >= 6, "{open} segments");

            // A flipped bit in the body of A's message 5, behind the log's back: the read
            // fails after its retries; its neighbours still read.
            let flipped = segment_of(&dir, open, conv_a(), 5).expect("A5");
            let mut bytes = dir.read(FileId::Segment(flipped));
            let at = offset_of(&bytes, conv_a(), 5) as usize + RECORD_BODY_OFFSET + 5;
            bytes[at] ^= 0x04;
            std::fs::write(dir.segment(flipped), &bytes).expect("write");
            assert_eq!(rig.fetch(conv_a(), 5, 5, 10), Err(()));
            assert_eq!(rig.fetch(conv_a(), 1, 10, 10), Err(()));
            assert_eq!(rig.read(conv_a(), 6, 8, 10), stored_range(conv_a(), 6..=8));

            // An index file whose entries for A point at B's messages of the same seqs (a
            // well-formed file: only the records read tell).
            let (misplaced, seq) = (1..open)
                .filter(|&n| n != flipped)
                .find_map(|n| {
                    let entries = offsets(&dir.read(FileId::Segment(n)));
                    let seq = entries
                        .iter()
                        .filter(|e| e.conv == conv_a())
                        .map(|e| e.seq)
                        .find(|&s| entries.iter().any(|e| e.conv == conv_b() && e.seq == s))?;
                    Some((n, seq.0))
                })
                .expect("a sealed segment with A and B");
            let mut entries = offsets(&dir.read(FileId::Segment(misplaced)));
            let b: Vec<IndexEntry> = entries
                .iter()
                .copied()
                .filter(|e| e.conv == conv_b())
                .collect();
            for entry in entries.iter_mut().filter(|e| e.conv == conv_a()) {
                if let Some(other) = b.iter().find(|o| o.seq == entry.seq) {
                    entry.offset = other.offset;
                }
            }
            let index = segment_index::encode(&mut entries);
            assert_eq!(index.len() as u64, dir.len(FileId::Index(misplaced)));
            let original = dir.read(FileId::Index(misplaced));
            std::fs::write(dir.file(FileId::Index(misplaced)), &index).expect("write");
            assert_eq!(rig.fetch(conv_a(), seq, seq, 1), Err(()));
            // Its blocks no longer match the crcs the summary keeps, so no lookup that
            // reads them is answered, B's neither (an index block is believed whole or not
            // at all). Put back, it serves again.
            assert_eq!(rig.fetch(conv_b(), seq, seq, 1), Err(()));
            std::fs::write(dir.file(FileId::Index(misplaced)), &original).expect("write");
            assert_eq!(
                rig.read(conv_b(), seq, seq, 1),
                stored_range(conv_b(), seq..=seq)
            );

            // A sealed segment gone behind the log's back (and out of the executor's
            // handle cache, where an open handle would still read it).
            let (gone, gone_seq) = (1..open)
                .filter(|&n| n != flipped && n != misplaced)
                .find_map(|n| {
                    let entries = offsets(&dir.read(FileId::Segment(n)));
                    let a = entries.iter().find(|e| e.conv == conv_a())?;
                    Some((n, a.seq.0))
                })
                .expect("a third sealed segment with A");
            std::fs::remove_file(dir.segment(gone)).expect("rm");
            rig.files.forget(FileId::Segment(gone));
            assert_eq!(rig.fetch(conv_a(), gone_seq, gone_seq, 1), Err(()));

            // What is intact still reads, and the log still appends.
            assert_eq!(
                rig.read(conv_b(), 59, 59, 1),
                stored_range(conv_b(), 59..=59)
            );
            rig.append(&interleaved(60..61));
            assert_eq!(rig.load(conv_a()), Seq(60));
            assert_eq!(
                rig.read(conv_a(), 59, 60, 10),
                stored_range(conv_a(), 59..=60)
            );
            rig.close();
        }
    }

    /// What issue 10 found: the read index grew by ~120 bytes for every conversation ever
    /// written. Now only the open segment's conversations cost that; a sealed segment's
    /// cost a bloom filter's ~10 bits and its index file's block keys.
    #[test]
    fn the_index_in_memory_stays_small_however_many_conversations_were_written() {
        let dir = TempDir::new("index-memory");
        let count = 20_000u64;
        let (mut rig, _) = Rig::open_ok(&dir, IoMode::Buffered, config(64 * 1024));
        let records: Vec<Record> = (1..=count)
            .map(|g| Record::Message(stored(ConvId::group(g), 1)))
            .collect();
        rig.append_all(&records, 100);
        assert!(rig.engine(LogEngine::segments) > 20);
        let per_conversation = rig.engine(LogEngine::index_heap_bytes) as f64 / count as f64;
        assert!(per_conversation < 12.0, "{per_conversation} bytes each");
        // Every conversation is still found: its head and its message.
        for g in [1, 777, count / 2, count - 1, count] {
            let conv = ConvId::group(g);
            assert_eq!(rig.load(conv), Seq(1));
            assert_eq!(rig.read(conv, 1, 1, 1), vec![stored(conv, 1)]);
        }
        for g in [count + 1, count + 2, u64::MAX] {
            let conv = ConvId::group(g);
            assert_eq!(rig.load(conv), Seq::ZERO);
            assert!(rig.read(conv, 1, 10, 10).is_empty());
        }
        rig.close();
    }

    #[test]
    fn the_last_durable_seq_is_found_in_the_open_segment_or_the_newest_sealed_one() {
        for mode in MODES {
            let dir = TempDir::new("last-durable");
            let count = 150;
            {
                let (mut rig, _) = Rig::open_ok(&dir, mode, config(8 * 1024));
                rig.append_all(&interleaved(1..count + 1), 7);
                // A conversation the log never saw.
                assert_eq!(rig.load(ConvId::group(77)), Seq::ZERO);
                // Appended, not yet durable: not reported.
                let next = [Record::Message(stored(conv_a(), count + 1))];
                let bytes = frames(&next);
                rig.call(|live| {
                    live.engine.append(now(), Lsn(10_000), bytes);
                    live.engine.load(now(), conv_a());
                });
                assert_eq!(rig.loaded(conv_a()), Ok(Seq(count)));
                rig.wait_for("the append durable", |live| {
                    (live.durable == Some(Lsn(10_000))).then_some(())
                });
                assert_eq!(rig.load(conv_a()), Seq(count + 1));
                assert_eq!(rig.load(conv_b()), Seq(count));
                rig.close();
            }
            let (mut rig, _) = Rig::open_ok(&dir, mode, config(8 * 1024));
            assert_eq!(rig.load(conv_a()), Seq(count + 1));
            assert_eq!(rig.load(conv_b()), Seq(count));
            rig.close();
        }
    }

    #[test]
    fn a_missing_or_damaged_index_file_is_rebuilt_at_recovery() {
        for mode in MODES {
            let dir = TempDir::new("index-rebuilt");
            let count = 150;
            let segment_bytes = 8 * 1024;
            let sealed = {
                let (mut rig, _) = Rig::open_ok(&dir, mode, config(segment_bytes));
                rig.append_all(&interleaved(1..count + 1), 7);
                let sealed = rig.engine(LogEngine::segments) as u64 - 1;
                assert!(sealed >= 4);
                rig.close();
                sealed
            };
            let copy = |file: FileId| dir.read(file);
            let index: Vec<Vec<u8>> = (1..=sealed).map(|n| copy(FileId::Index(n))).collect();
            let summary: Vec<Vec<u8>> = (1..=sealed).map(|n| copy(FileId::Summary(n))).collect();
            // A crash between sealing and indexing; an index file cut short; a flipped bit
            // in a summary; a summary missing.
            std::fs::remove_file(dir.file(FileId::Index(1))).expect("rm");
            std::fs::write(dir.file(FileId::Index(3)), &index[2][..index[2].len() / 2])
                .expect("write");
            let mut flipped = summary[1].clone();
            let last = flipped.len() - 1;
            flipped[last] ^= 0x10;
            std::fs::write(dir.file(FileId::Summary(2)), &flipped).expect("write");
            std::fs::remove_file(dir.file(FileId::Summary(4))).expect("rm");
            {
                let (mut rig, recovered) = Rig::open_ok(&dir, mode, config(segment_bytes));
                assert_eq!(recovered.rebuilt, 4);
                assert_reads_of_the_interleaved_log(&mut rig, count);
                rig.close();
            }
            for n in 1..=sealed {
                let i = n as usize - 1;
                assert_eq!(copy(FileId::Index(n)), index[i], "index file {n}");
                assert_eq!(copy(FileId::Summary(n)), summary[i], "summary {n}");
            }
        }
    }

    /// Retention removes old segment files through the executor (unlink and a directory
    /// fsync); their index and summary files stay, and the log reopens from its
    /// checkpoint.
    #[test]
    fn retention_removes_old_segment_files_and_the_log_reopens() {
        let dir = TempDir::new("retention");
        let retention = LogConfig {
            checkpoint_messages: 10,
            retention_bytes: Some(16 * 1024),
            ..config(4 * 1024)
        };
        let count = 300;
        let first = {
            let (mut rig, _) = Rig::open_ok(&dir, IoMode::Direct, retention.clone());
            rig.append(&[Record::Message(stored(conv_b(), 1))]);
            for seq in 1..=count {
                rig.append(&[Record::Message(stored(conv_a(), seq))]);
                rig.checkpoint_if_due();
            }
            rig.settle();
            let segments = dir.segments();
            assert!(segments[0] > 1, "nothing removed: {segments:?}");
            for n in 1..segments[0] {
                assert!(!dir.segment(n).exists());
                assert!(dir.file(FileId::Index(n)).is_file());
                assert!(dir.file(FileId::Summary(n)).is_file());
            }
            let got = rig.read(conv_a(), 1, count, 1_000);
            let first = got[0].seq.0;
            assert!(first > 1);
            assert_eq!(got, stored_range(conv_a(), first..=count));
            // B's only message went with its segment; its last seq did not.
            assert!(rig.read(conv_b(), 1, 1, 1).is_empty());
            assert_eq!(rig.load(conv_b()), Seq(1));
            rig.close();
            first
        };
        let (mut rig, recovered) = Rig::open_ok(&dir, IoMode::Direct, retention);
        assert!(matches!(recovered.records[0], Record::Checkpoint { .. }));
        // Recovery applies retention again: it may remove one more segment.
        let got = rig.read(conv_a(), 1, count, 1_000);
        let now_first = got[0].seq.0;
        assert!(now_first >= first, "{now_first} < {first}");
        assert_eq!(got, stored_range(conv_a(), now_first..=count));
        assert_eq!(rig.load(conv_b()), Seq(1));
        rig.close();
    }

    #[test]
    fn operations_on_missing_files_report_not_found_and_errors_map_by_errno() {
        let dir = TempDir::new("not-found");
        let mut ring = ring();
        let mut files = LogFiles::open(dir.0.clone()).expect("open");
        // The directory was created; the probe left nothing behind.
        assert_eq!(
            perform(&mut ring, &mut files, Op::List),
            Ok(Completion::Listed(vec![]))
        );
        let missing = FileId::Segment(9);
        for op in [
            Op::Sync(missing),
            Op::Truncate {
                file: missing,
                len: 0,
            },
            Op::Read {
                file: missing,
                at: 0,
                len: 10,
            },
            Op::Remove(missing),
            Op::Write {
                file: missing,
                at: 0,
                bytes: Bytes::from(vec![0; 4096]),
            },
        ] {
            assert_eq!(
                perform(&mut ring, &mut files, op.clone()),
                Err(IoError::NotFound),
                "{op:?}"
            );
        }
        // A misaligned O_DIRECT write is refused, not attempted.
        let file = FileId::Segment(1);
        assert_eq!(
            perform(&mut ring, &mut files, Op::Create(file)),
            Ok(Completion::Done)
        );
        let misaligned = Op::Write {
            file,
            at: 10,
            bytes: Bytes::from(vec![1; 4096]),
        };
        if files.is_direct() {
            assert_eq!(perform(&mut ring, &mut files, misaligned), Err(IoError::Io));
        }
        // A read past the end gives what there is.
        let write = Op::Write {
            file,
            at: 0,
            bytes: Bytes::from(vec![7; 4096]),
        };
        assert_eq!(perform(&mut ring, &mut files, write), Ok(Completion::Done));
        let read = Op::Read {
            file,
            at: 4000,
            len: 5 * READ_STEP_BYTES,
        };
        assert_eq!(
            perform(&mut ring, &mut files, read),
            Ok(Completion::Read(Bytes::from(vec![7; 96])))
        );
        // Empty reads and writes finish at once, through the ring like any other.
        let empty_read = Op::Read {
            file,
            at: 0,
            len: 0,
        };
        assert_eq!(
            perform(&mut ring, &mut files, empty_read),
            Ok(Completion::Read(Bytes::new()))
        );
        let empty_write = Op::Write {
            file,
            at: 0,
            bytes: Bytes::new(),
        };
        assert_eq!(
            perform(&mut ring, &mut files, empty_write),
            Ok(Completion::Done)
        );
        assert_eq!(
            perform(&mut ring, &mut files, Op::List),
            Ok(Completion::Listed(vec![(file.name(), 4096)]))
        );
        // A truncate cuts the file, and a removal takes it away.
        assert_eq!(
            perform(&mut ring, &mut files, Op::Truncate { file, len: 100 }),
            Ok(Completion::Done)
        );
        assert_eq!(dir.len(file), 100);
        assert_eq!(
            perform(&mut ring, &mut files, Op::Remove(file)),
            Ok(Completion::Done)
        );
        assert_eq!(
            perform(&mut ring, &mut files, Op::List),
            Ok(Completion::Listed(vec![]))
        );
        let errno = |n| io_error_of(&io::Error::from_raw_os_error(n));
        assert_eq!(errno(libc::ENOSPC), IoError::NoSpace);
        assert_eq!(errno(libc::ENOENT), IoError::NotFound);
        assert_eq!(errno(libc::EIO), IoError::Io);
        assert_eq!(errno(libc::EROFS), IoError::Io);
    }

    /// Recovery reads a segment larger than a read step whole.
    #[test]
    fn a_segment_larger_than_a_read_step_is_recovered_whole() {
        let dir = TempDir::new("big-segment");
        let records: Vec<Record> = (1..=40).map(|seq| message(seq, 60_000)).collect();
        assert!(frames(&records).len() > 2 * READ_STEP_BYTES);
        {
            let (mut rig, _) = Rig::open_ok(&dir, IoMode::Direct, LogConfig::default());
            rig.append_all(&records, 10);
            rig.crash();
        }
        let (rig, recovered) = Rig::open_ok(&dir, IoMode::Direct, LogConfig::default());
        assert_eq!(recovered.records, records);
        rig.close();
    }

    /// Reads at any offset and of any length, in one step or several, give exactly the
    /// file's bytes, with O_DIRECT (aligned covers) and without, several in flight at
    /// once and completing in any order.
    #[test]
    fn reads_at_unaligned_offsets_and_across_steps_give_exactly_the_files_bytes() {
        for mode in MODES {
            let dir = TempDir::new("read-steps");
            let mut ring = ring();
            let mut files = LogFiles::open_with_mode(dir.0.clone(), mode).expect("open");
            let file = FileId::Segment(1);
            let content: Vec<u8> = (0..3 * READ_STEP_BYTES + 5000)
                .map(|i| (i % 251) as u8)
                .collect();
            std::fs::write(dir.file(file), &content).expect("write");
            let cases = [
                (0, 1),
                (1, 4095),
                (4095, 2),
                (4096, 4096),
                (12_345, READ_STEP_BYTES),
                (1, 2 * READ_STEP_BYTES + 17),
                (0, content.len()),
                (content.len() as u64 - 10, 100),
                (content.len() as u64, 10),
                (content.len() as u64 + 5000, 10),
            ];
            for (n, &(at, len)) in cases.iter().enumerate() {
                files.start(
                    &mut ring,
                    LogIo {
                        id: IoId(n as u64),
                        op: Op::Read { file, at, len },
                    },
                );
            }
            assert_eq!(files.in_flight(), cases.len());
            let mut results = BTreeMap::new();
            let mut done = Vec::new();
            let started = std::time::Instant::now();
            while results.len() < cases.len() {
                assert!(started.elapsed() < WAIT_MAX, "reads never finished");
                ring.submit_and_wait(Some(WAIT_STEP))
                    .expect("io_uring_enter");
                ring.complete(&mut done);
                for d in done.drain(..) {
                    if let Some((id, result)) = files.complete(&mut ring, d) {
                        assert!(results.insert(id.0, result).is_none());
                    }
                }
            }
            assert_eq!(files.in_flight(), 0);
            for (n, &(at, len)) in cases.iter().enumerate() {
                let start = (at as usize).min(content.len());
                let end = (start + len).min(content.len());
                let expected = Bytes::copy_from_slice(&content[start..end]);
                assert_eq!(
                    results[&(n as u64)],
                    Ok(Completion::Read(expected)),
                    "{mode:?}: {len} bytes at {at}"
                );
            }
        }
    }

    /// A handle dropped from the cache while a ring operation on it is in flight stays
    /// open until that operation completes: its descriptor number cannot go to another
    /// file under it.
    #[test]
    fn a_handle_is_not_closed_while_an_operation_on_it_is_in_flight() {
        for mode in MODES {
            let dir = TempDir::new("handle-in-flight");
            let mut ring = ring();
            let mut files = LogFiles::open_with_mode(dir.0.clone(), mode).expect("open");
            let old = FileId::Segment(1);
            std::fs::write(dir.file(old), vec![1u8; 8192]).expect("write");
            let read = |id| LogIo {
                id: IoId(id),
                op: Op::Read {
                    file: old,
                    at: 0,
                    len: 8192,
                },
            };
            // Queued, not yet submitted: the kernel has not even seen the descriptor.
            files.start(&mut ring, read(1));
            let fd = files.readers[0].1.as_raw_fd();
            // Out of the cache, and a new file opened: a closed descriptor's number would
            // be the new file's now.
            files.forget(old);
            assert!(files.readers.is_empty());
            let new = FileId::Segment(2);
            files.start(
                &mut ring,
                LogIo {
                    id: IoId(2),
                    op: Op::Create(new),
                },
            );
            assert_ne!(writer_fd(&files, new), Some(fd));
            assert!(
                fd_has_o_direct(fd) == files.is_direct(),
                "fd {fd} is still open"
            );
            let mut results = BTreeMap::new();
            let mut done = Vec::new();
            while results.len() < 2 {
                ring.submit_and_wait(Some(WAIT_STEP))
                    .expect("io_uring_enter");
                ring.complete(&mut done);
                for d in done.drain(..) {
                    if let Some((id, result)) = files.complete(&mut ring, d) {
                        results.insert(id.0, result);
                    }
                }
            }
            assert_eq!(
                results[&1],
                Ok(Completion::Read(Bytes::from(vec![1u8; 8192])))
            );
            assert_eq!(results[&2], Ok(Completion::Done));
            // Now the last user of the old handle is done: it is closed (its number may
            // already be another test's file: tests run on several threads).
            let target = std::fs::read_link(format!("/proc/self/fd/{fd}"));
            assert!(target.is_err() || target.is_ok_and(|t| t != dir.file(old)));
        }
    }

    /// A completion that names an operation already finished is refused, not taken for
    /// the operation that now holds its slot.
    #[test]
    #[should_panic(expected = "names no operation in flight")]
    fn a_completion_of_a_finished_operation_is_refused() {
        let dir = TempDir::new("stale");
        let mut ring = ring();
        let mut files = LogFiles::open(dir.0.clone()).expect("open");
        files.start(
            &mut ring,
            LogIo {
                id: IoId(1),
                op: Op::List,
            },
        );
        let mut done = Vec::new();
        while done.is_empty() {
            ring.submit_and_wait(Some(WAIT_STEP))
                .expect("io_uring_enter");
            ring.complete(&mut done);
        }
        let first = done.pop().expect("a completion");
        let (op, tag, result, flags) = (first.op, first.tag, first.result, first.flags);
        assert!(files.complete(&mut ring, first).is_some());
        // The slot is reused by the next operation, under another generation.
        files.start(
            &mut ring,
            LogIo {
                id: IoId(2),
                op: Op::List,
            },
        );
        assert_eq!(files.in_flight(), 1);
        files.complete(
            &mut ring,
            Done {
                op,
                tag,
                result,
                flags,
                owned: Owned::Nothing,
            },
        );
    }
}
