//! The warm tier: one shard's log as segment files on local disk, written with glommio,
//! and the read index that serves history older than the engine's hot tier from it.
//!
//! A shard's log lives in one directory as numbered segment files,
//! `<dir>/<index:020>.seg` with the index counting from 1. Each segment is a run of records
//! framed by core ([`imgate_core::log::encode_record`]); this module decodes records only
//! through core ([`scan`] at recovery, [`decode_record`] on the write and read paths). It
//! owns:
//!
//! - Appending: [`SegmentLog::write`] stages bytes and writes them out; nothing is durable
//!   until [`SegmentLog::sync`] returns. The driver's group commit sits on top: it collects
//!   appends while a sync runs, then hands them over in one `write` and one `sync`.
//! - Rotation: a batch that would take the current segment past
//!   [`LogConfig::segment_bytes`] first seals it (written out, cut to its exact length,
//!   fdatasync'd) and starts the next, but only if the segment holds nothing unsynced:
//!   sealing makes every byte in it durable, and bytes written since the last sync must
//!   stay removable by `reset_to_durable` (see Failure). So a segment may grow past
//!   `segment_bytes` by what is written between two syncs (one group commit); the first
//!   write after the sync rotates. A batch always ends on a record boundary (the caller's
//!   promise), so records never span segments. A batch larger than a whole segment goes
//!   alone into a fresh one (if the segment before it was synced).
//! - Failure: after a failed write or sync the log refuses appends until
//!   [`SegmentLog::reset_to_durable`] has cut the file back to the durable prefix. Without
//!   that, records the shard Nacked (and whose seqs it hands out again) could still be on
//!   disk and come back at the next recovery, so that one seq would name two messages (I5).
//! - Recovery ([`open`]): every segment is read whole and scanned with core's [`scan`].
//!   The last segment is cut to its valid length (a torn append, O_DIRECT zero padding, or
//!   a corrupt frame at the tail, all the normal residue of a crash). Damage in any earlier
//!   segment is [`StorageError::Corrupt`] and the log refuses to open: those segments were
//!   sealed durable, so the damage would otherwise drop acknowledged messages silently. A
//!   missing segment number is refused the same way.
//! - The read index and [`LogReader`] (below).
//!
//! # The read index
//!
//! Sync and Pull ask for a conversation's messages by seq; those older than the engine's
//! hot tier come from here, and so does the last seq of a conversation the engine loads
//! back after evicting it. Seqs of a conversation are consecutive from 1 in log order (the
//! engine hands them out so, and recovery here and in core reject a gap), which both
//! halves of the index rely on:
//!
//! - The open segment's entries are in memory: per conversation with messages in it, the
//!   first seq and a `Vec<Location>` (seq `first + i` at `i`), where a [`Location`] packs
//!   the segment index (24 bits) and the byte offset of the frame in it (40 bits) into 8
//!   bytes. Built at recovery from the scan of the last segment, and on every
//!   [`SegmentLog::write`] by walking the batch's frames with core's [`decode_record`]
//!   (which also checks each frame's CRC just before it goes to disk).
//! - A sealed segment's entries are in its index file, `<index:020>.idx`, written and
//!   fdatasync'd when the segment is sealed (core's [`segment_index`]: entries sorted by
//!   conversation and seq, in 4 KiB blocks, with a CRC). Memory keeps a summary: a bloom
//!   filter of the segment's conversations (about 10 bits each) and the first key of each
//!   block (24 bytes per 128 entries). A lookup reads one or two blocks of each sealed
//!   segment whose filter may hold the conversation, through the readers' file cache.
//!   Recovery checks each sealed segment's index file against the segment's scan and
//!   writes it anew if it is missing or differs (a crash between sealing and indexing).
//! - An entry is served only once durable: entries of a write are pending until the next
//!   successful `sync`, and `reset_to_durable` removes them again (the seqs they named are
//!   handed out anew by the engine). Durable entries are never removed. A segment is
//!   sealed only with every entry durable.
//! - [`SegmentLog::reader`] hands out a [`LogReader`] that shares the index with the log
//!   (`Rc<RefCell<..>>`, one shard, one thread; no borrow is held across an await), so
//!   reads run on the shard's executor while the log task writes. A read takes the open
//!   segment's locations and the sealed summaries together, then reads the index blocks
//!   and the segment files through its own read-only handles (O_DIRECT if the log writes
//!   with it, so that no page cache stands between it and the writer's direct writes), at
//!   most [`READER_OPEN_SEGMENTS_MAX`] files open.
//!
//! Memory: the open segment's index (8 bytes per message plus ~60-130 bytes per
//! conversation, for at most [`LogConfig::segment_messages`] messages, after which the
//! segment is sealed),
//! plus per sealed segment about 1.25 bytes per conversation in it and 0.2 bytes per
//! message. Before the index files, the whole index stayed in memory and grew by ~120
//! bytes for every conversation ever written. [`LogReader::index_stats`] reports the total.
//!
//! # Direct I/O and the partial last block
//!
//! Segments are written with O_DIRECT ([`DmaFile`]), which moves whole aligned blocks. A
//! sync that ends inside a block writes that block padded with zeros; the next write
//! rewrites the same block with the old bytes, the new ones and fresh zero padding. So
//! after a crash a segment may end in zeros, which core's scan reports as
//! [`ScanEnd::ZeroTail`] and recovery cuts off. Rewriting a block that holds durable bytes
//! is safe even if the rewrite is torn: every sector of the block carries the same durable
//! bytes in its old and its new version. For the same reason a [`LogReader`] that reads the
//! block while it is rewritten sees the durable bytes intact, whichever version of each
//! sector it gets.
//!
//! glommio's own `DmaStreamWriter` is not used, for three reasons found in its source
//! (0.9.0): its `sync` writes the whole staging buffer (128 KiB for a 100-byte batch), and
//! the padding past the data is uninitialised buffer memory, not zeros, so after a crash
//! stale bytes, possibly whole stale records, could sit past the end of the log; and it
//! always starts at offset 0, so it cannot continue a segment after a restart. Readers
//! do not use [`DmaFile`] either, for a glommio bug described at `ReadFile`; they read
//! through an O_DIRECT [`BufferedFile`] handle, aligning each read themselves (glommio's
//! `DmaFile::read_at` would also return, near the end of a file, up to `pos % alignment`
//! bytes past what the kernel read).
//!
//! If the filesystem refuses O_DIRECT (EINVAL), the log falls back to buffered writes
//! ([`BufferedFile`] and fdatasync) and logs a warning; durability is the same, only the
//! page cache is in the way. On tmpfs glommio itself opens the file without O_DIRECT.
//!
//! Invariants (asserted after every change):
//! - All sealed segments are durable in full; only the open segment has a volatile tail.
//! - In the open segment `durable <= flushed <= written`, and the stage holds exactly the
//!   bytes from the start of the block holding `flushed` up to `written`.
//! - Past `written`, the open segment's file holds only zeros or bytes that the next flush
//!   overwrites; after `reset_to_durable` it ends exactly at `durable`.
//! - Every pending (not yet durable) index entry points into the open segment at or past
//!   its durable end; every served entry points at a durable frame of a message whose
//!   conversation and seq the entry names (checked again when it is read).
//!
//! What it leaves to others: the record format and the scan (core), the mapping from
//! appends to [`imgate_core::shard::Lsn`]s and what to read when (the runtime), and the
//! cold tier.
//!
//! Architecture invariant: a segment file is created fresh (`O_TRUNC`) and never reused,
//! because core's scan cannot tell a stale record from a new one.

use glommio::io::{BufferedFile, Directory, DmaFile, OpenOptions, ReadResult};
use glommio::GlommioError;
use imgate_core::log::{
    decode_record, scan, CorruptReason, Decoded, Record, ScanEnd, StoredMessage,
};
use imgate_core::proto::{ConvId, Seq};
use imgate_core::segment_index::{self, IndexEntry, SegmentSummary};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Default size at which a segment is sealed and the next one started: 64 MiB. Large
/// enough that rotation (an fdatasync, a create and a directory fsync) is rare next to
/// group commits; small enough that recovery, which reads a segment whole, and a future
/// cold tier, which ships sealed segments, handle one at a time in modest memory.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;

/// Default number of messages at which a segment is sealed even if it is not full: 65,536.
/// The open segment's index is in memory, at up to ~130 bytes a message when each message
/// is in a conversation of its own (a hash map entry and a vector per conversation), so
/// this bounds it to ~8.5 MB a shard; sealed segments keep theirs in a file. At typical
/// message sizes (100-500 bytes) this seals a segment every 6-32 MB.
pub const SEGMENT_MESSAGES_DEFAULT: usize = 65_536;

/// Most bytes staged in memory before they are written out: 128 KiB. A `write` larger
/// than this goes to the file in steps of this size, each one O_DIRECT write. The bound
/// keeps a shard's log memory at about twice this (the stage, and the aligned copy that
/// glommio hands to the kernel), which matters because the runtime builds its executors
/// with a small `io_memory` (the registered pool; the memlock limit here is 8 MiB):
/// a buffer that does not fit the pool comes from the heap instead, which is correct but
/// loses io_uring's fixed buffers. Group-commit batches are mostly far smaller than this,
/// so a larger stage would only hold more memory; a much smaller one would split
/// ordinary batches into several writes before their sync.
const STAGE_BYTES: usize = 128 * 1024;

/// Smallest alignment of O_DIRECT writes: 4 KiB. glommio reports the device's logical
/// block (512 bytes on this machine's virtio disk), but its physical block is 4 KiB, as on
/// most current disks, and a write of less than a physical block makes the device
/// read, modify and write it. 4 KiB is a multiple of every logical block size in use.
const DIRECT_ALIGN_MIN: u64 = 4096;

/// Size of each read during recovery: 1 MiB. Recovery reads a segment whole into memory
/// (so core's [`scan`] sees it at once); reading it in steps keeps any one io_uring
/// request, and its temporary buffer, small.
const RECOVERY_READ_BYTES: usize = 1024 * 1024;

/// Suffix of segment file names.
const SEGMENT_SUFFIX: &str = ".seg";

/// The suffix of a sealed segment's index file, named like its segment.
const INDEX_SUFFIX: &str = ".idx";

/// Digits of the zero-padded index in a segment file name: every u64 fits in 20.
const SEGMENT_INDEX_DIGITS: usize = 20;

/// Bits of a packed [`Location`] that hold the byte offset of a frame in its segment: 40,
/// so offsets below 1 TiB. The other 24 hold the segment index. Together 8 bytes, the
/// whole per-message cost of the read index.
const LOCATION_OFFSET_BITS: u32 = 40;

/// Largest segment index the read index can name: 2^24 - 1 = 16,777,215. At the default
/// segment size that is 1 PiB of log in one shard, long past the point where the cold tier
/// is to ship old segments away. A log that gets there refuses to rotate
/// ([`StorageError::IndexLimit`]), as a full disk would refuse writes.
const SEGMENT_INDEX_MAX: u64 = (1 << (64 - LOCATION_OFFSET_BITS)) - 1;

/// Largest frame offset in a segment that the read index can name: 2^40 - 1.
const RECORD_OFFSET_MAX: u64 = (1 << LOCATION_OFFSET_BITS) - 1;

/// Largest [`LogConfig::segment_bytes`] accepted: 512 GiB, half of what a [`Location`]
/// can address, which leaves a segment room to grow past its size by a group commit (see
/// Rotation in the module docs). A write that would still place a frame past
/// [`RECORD_OFFSET_MAX`] is refused with [`StorageError::IndexLimit`].
const SEGMENT_BYTES_MAX: u64 = 1 << (LOCATION_OFFSET_BITS - 1);

/// Most bytes one coalesced read of a [`LogReader`] covers: 128 KiB. Frames of one
/// conversation that lie within this span of each other are read in one request, wasting
/// at most the frames of other conversations between them; a larger span would waste more
/// on logs where many conversations interleave, a smaller one would split the common case
/// (a run of a busy conversation's messages) into more requests. A single frame larger
/// than this is read alone, whole (at most `RECORD_HEADER_LEN + RECORD_BODY_MAX`).
const READ_SPAN_BYTES_MAX: u64 = 128 * 1024;

/// Most reads one [`LogReader::read`] has in flight at once: 32. A conversation whose
/// messages lie far apart in the log (many busy conversations interleaved) costs one
/// read per message; issued one after another, 200 of them took 18 ms on this machine's
/// disk (examples/log_bench.rs), 32 at a time 4.5 ms. More would gain little on one
/// device queue and let one read crowd out the writer's I/O.
const READ_REQUESTS_INFLIGHT_MAX: usize = 32;

/// Most bytes the reads in flight of one [`LogReader::read`] cover: 1 MiB, so that a
/// window of coalesced spans holds at most this much (plus one whole frame that is
/// larger) in buffers at once.
const READ_WINDOW_BYTES_MAX: usize = 1024 * 1024;

/// Bytes a coalesced read takes past the start of its last frame: 4 KiB, one physical
/// block, which holds a typical message frame (a few hundred bytes) whole. A frame that
/// does not fit is read again alone, whole.
const READ_TAIL_BYTES: u64 = 4096;

/// Most segment files the readers of one log keep open: 16. Reopening a segment costs an
/// openat through io_uring; history reads mostly hit the few newest segments, so a small
/// cache serves most reads, and the bound keeps a shard's file descriptors few.
const READER_OPEN_SEGMENTS_MAX: usize = 16;

// A coalesced read covers at least its last frame's tail, and a window at least one read.
const _: () = assert!(READ_TAIL_BYTES <= READ_SPAN_BYTES_MAX);
const _: () = assert!(READ_SPAN_BYTES_MAX as usize <= READ_WINDOW_BYTES_MAX);

/// Where a shard's log is kept.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// The shard's log directory; created if missing.
    pub dir: PathBuf,
    /// Size at which a segment is sealed (see [`SEGMENT_BYTES_DEFAULT`]); at least 1.
    pub segment_bytes: u64,
    /// Messages at which a segment is sealed (see [`SEGMENT_MESSAGES_DEFAULT`]); at least 1.
    pub segment_messages: usize,
}

/// What [`open`] found on disk.
#[derive(Debug)]
pub struct Recovery {
    /// Every record in the log, in append order.
    pub records: Vec<Record>,
    /// Segment files in the log (including a new, empty one).
    pub segments: usize,
    /// Bytes of valid records kept, over all segments: [`SegmentLog::durable_bytes`] now.
    pub bytes: u64,
    /// Bytes cut from the end of the last segment (torn append, padding, corrupt tail).
    pub truncated_bytes: u64,
    /// How the scan of the last segment ended ([`ScanEnd::Clean`] if there was none). A
    /// [`ScanEnd::Corrupt`] here was cut off and logged as an error: most likely a torn
    /// write whose sectors landed out of order, but it may be a damaged record that was
    /// acknowledged; the runtime should count it where operators look.
    pub tail: ScanEnd,
}

/// What is wrong with a sealed segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    /// The segment ends inside a frame. A sealed segment was written out in full before
    /// its successor was created, so this is not a crash residue.
    #[error("the segment ends inside a record")]
    Torn,
    /// A frame that can never be valid.
    #[error("{0}")]
    Frame(CorruptReason),
    /// The read index points here for a message, and a valid frame holds something else:
    /// the index or the file is wrong, and the read serves nothing rather than a wrong
    /// message.
    #[error("the record here is not message {seq} of {conv}, which the index points to")]
    Misplaced {
        /// The conversation the index entry is for.
        conv: ConvId,
        /// The seq the index entry is for.
        seq: Seq,
    },
}

/// Errors of the warm-tier log.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A file or directory operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done ("write", "fdatasync", ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A sealed segment is damaged: the log refuses to open rather than drop the records
    /// after the damage.
    #[error("segment {} is damaged at offset {offset}: {reason}", path.display())]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Where the first bad frame starts.
        offset: u64,
        /// What is wrong with it.
        reason: Damage,
    },
    /// A segment between the first and the last is missing: the log refuses to open.
    #[error("segment {missing} is missing from {}", dir.display())]
    MissingSegment {
        /// The log directory.
        dir: PathBuf,
        /// The index of the missing segment.
        missing: u64,
    },
    /// A `.seg` file whose name is not a segment index: the log refuses to guess.
    #[error("{} is not a segment name (expected {SEGMENT_INDEX_DIGITS} digits, from 1)", path.display())]
    BadSegmentName {
        /// The file.
        path: PathBuf,
    },
    /// A write or sync failed earlier; nothing more is accepted until
    /// [`SegmentLog::reset_to_durable`] succeeds.
    #[error("the log has a failed write; reset_to_durable must succeed first")]
    NeedsReset,
    /// A message in the log does not follow the one before it in its conversation: the
    /// log refuses to open (core's recovery refuses the same log), since the read index
    /// and the engine both rely on seqs 1, 2, 3, ... in log order.
    #[error("message {found} of {conv} follows message {last} in the log")]
    SeqGap {
        /// The conversation.
        conv: ConvId,
        /// The seq of its message before (0 if none).
        last: Seq,
        /// The seq found.
        found: Seq,
    },
    /// The log has outgrown what a read index [`Location`] can name (a segment index or
    /// an offset in a segment): the write or the open is refused.
    #[error("{what} {value} is over the read index's maximum {max}")]
    IndexLimit {
        /// What is too large ("segment index", "record offset").
        what: &'static str,
        /// Its value.
        value: u64,
        /// The largest value the index takes.
        max: u64,
    },
    /// The configuration cannot work.
    #[error("invalid log configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: &'static str,
    },
}

/// Unwraps glommio's error into the operating system's, keeping its raw error number.
fn os_error(err: GlommioError<()>) -> io::Error {
    match err {
        GlommioError::IoError(source) | GlommioError::EnhancedIoError { source, .. } => source,
        other => io::Error::from(other),
    }
}

/// Builds a [`StorageError::Io`] from a glommio error.
fn io_error(op: &'static str, path: &Path, err: GlommioError<()>) -> StorageError {
    StorageError::Io {
        op,
        path: path.to_owned(),
        source: os_error(err),
    }
}

/// Builds a [`StorageError::Io`] from a standard library error.
fn std_error(op: &'static str, path: &Path, source: io::Error) -> StorageError {
    StorageError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// `v` rounded down to a multiple of `align` (a power of two).
fn align_down(v: u64, align: u64) -> u64 {
    v & !(align - 1)
}

/// `v` rounded up to a multiple of `align` (a power of two).
fn align_up(v: u64, align: u64) -> u64 {
    align_down(v + (align - 1), align)
}

/// The file name of segment `index`.
fn segment_name(index: u64) -> String {
    format!(
        "{index:0width$}{SEGMENT_SUFFIX}",
        width = SEGMENT_INDEX_DIGITS
    )
}

/// The file name of sealed segment `index`'s index file.
fn index_name(index: u64) -> String {
    format!(
        "{index:0width$}{INDEX_SUFFIX}",
        width = SEGMENT_INDEX_DIGITS
    )
}

/// The index in a segment file name, or `None` if the name is not one.
fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_INDEX_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&index| index >= 1)
}

/// How segment files are written, decided once at [`open`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IoMode {
    /// O_DIRECT through [`DmaFile`].
    Direct,
    /// The page cache through [`BufferedFile`]: the filesystem refused O_DIRECT, or the
    /// caller asked for it ([`open_with_mode`]: tests of this path, and comparisons).
    Buffered,
}

/// An open segment file.
#[derive(Debug)]
enum SegmentFile {
    Direct(DmaFile),
    Buffered(BufferedFile),
}

impl SegmentFile {
    /// Opens (`create`: creates anew, truncated) a segment for reading and writing.
    async fn open(path: &Path, mode: IoMode, create: bool) -> Result<Self, GlommioError<()>> {
        let mut options = OpenOptions::new();
        options
            .read(true)
            .write(true)
            .create(create)
            .truncate(create);
        Ok(match mode {
            IoMode::Direct => SegmentFile::Direct(options.dma_open(path).await?),
            IoMode::Buffered => SegmentFile::Buffered(options.buffered_open(path).await?),
        })
    }

    /// The alignment every write must keep (1 for buffered I/O).
    fn alignment(&self) -> u64 {
        match self {
            SegmentFile::Direct(file) => file.alignment().max(DIRECT_ALIGN_MIN),
            SegmentFile::Buffered(_) => 1,
        }
    }

    /// Writes `data` at `pos`, zero-padded to `data.len()` rounded up to the alignment.
    /// A short write is an error: the caller treats it like any other failed write.
    async fn write_padded(&self, data: &[u8], pos: u64) -> Result<(), GlommioError<()>> {
        let align = self.alignment();
        assert!(!data.is_empty(), "empty write at {pos}");
        assert!(
            pos.is_multiple_of(align),
            "write at {pos} is not aligned to {align}"
        );
        let written = match self {
            SegmentFile::Direct(file) => {
                // The cast is lossless: `data` is at most a stage (asserted by the
                // caller), far below usize::MAX, and so is its padded length.
                let len = align_up(data.len() as u64, align) as usize;
                let mut buffer = file.alloc_dma_buffer(len);
                let bytes = buffer.as_bytes_mut();
                let (head, padding) = bytes.split_at_mut(data.len());
                head.copy_from_slice(data);
                // glommio's buffers are not zeroed; stale bytes here could decode as
                // records after a crash.
                padding.fill(0);
                let written = file.write_at(buffer, pos).await?;
                (written == len).then_some(()).ok_or(written)
            }
            SegmentFile::Buffered(file) => {
                let written = file.write_at(data.to_vec(), pos).await?;
                (written == data.len()).then_some(()).ok_or(written)
            }
        };
        written.map_err(|written| {
            GlommioError::IoError(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {written} of {} bytes at {pos}", data.len()),
            ))
        })
    }

    async fn fdatasync(&self) -> Result<(), GlommioError<()>> {
        match self {
            SegmentFile::Direct(file) => file.fdatasync().await,
            SegmentFile::Buffered(file) => file.fdatasync().await,
        }
    }

    async fn truncate(&self, len: u64) -> Result<(), GlommioError<()>> {
        match self {
            SegmentFile::Direct(file) => file.truncate(len).await,
            SegmentFile::Buffered(file) => file.truncate(len).await,
        }
    }

    async fn close(self) -> Result<(), GlommioError<()>> {
        match self {
            SegmentFile::Direct(file) => file.close().await,
            SegmentFile::Buffered(file) => file.close().await,
        }
    }
}

/// The segment being appended to, and where each byte of it stands.
#[derive(Debug)]
struct OpenSegment {
    index: u64,
    path: PathBuf,
    file: SegmentFile,
    /// Write alignment of `file` (a power of two; 1 for buffered I/O).
    align: u64,
    /// Capacity of `stage`: [`STAGE_BYTES`] rounded up to `align`.
    stage_max: usize,
    /// End of everything handed to `write`.
    written: u64,
    /// End of what has been written to the file.
    flushed: u64,
    /// End of what a successful fdatasync covered.
    durable: u64,
    /// File offset of `stage[0]`: `flushed` rounded down to `align`.
    stage_start: u64,
    /// The bytes from `stage_start` to `written`: the block holding `flushed` (rewritten
    /// by the next flush) and everything not yet flushed.
    stage: Vec<u8>,
    /// The bytes from `durable` rounded down to `align` up to `durable`: what
    /// `reset_to_durable` puts back into the stage.
    durable_tail: Vec<u8>,
}

impl OpenSegment {
    /// A segment whose file holds exactly `tail_block` at its end, all durable, with
    /// `len` bytes in all.
    fn new(index: u64, path: PathBuf, file: SegmentFile, len: u64, tail_block: &[u8]) -> Self {
        let align = file.alignment();
        assert!(
            align.is_power_of_two(),
            "alignment {align} of {}",
            path.display()
        );
        // The cast is lossless: glommio's alignment is a block size, far below usize::MAX.
        let stage_max = align_up(STAGE_BYTES as u64, align) as usize;
        let stage_start = align_down(len, align);
        assert_eq!(stage_start + tail_block.len() as u64, len);
        let segment = OpenSegment {
            index,
            path,
            file,
            align,
            stage_max,
            written: len,
            flushed: len,
            durable: len,
            stage_start,
            stage: tail_block.to_vec(),
            durable_tail: tail_block.to_vec(),
        };
        segment.assert_invariants();
        segment
    }

    fn assert_invariants(&self) {
        assert!(
            self.durable <= self.flushed && self.flushed <= self.written,
            "{}: durable {} flushed {} written {}",
            self.path.display(),
            self.durable,
            self.flushed,
            self.written
        );
        assert_eq!(self.stage_start, align_down(self.flushed, self.align));
        assert_eq!(self.stage_start + self.stage.len() as u64, self.written);
        assert!(self.stage.len() <= self.stage_max);
        assert_eq!(
            self.durable_tail.len() as u64,
            self.durable - align_down(self.durable, self.align),
            "the durable tail is the partial block before the durable end"
        );
    }

    /// Appends `bytes`, writing out every stage that fills up. Nothing is synced.
    async fn write(&mut self, mut bytes: &[u8]) -> Result<(), StorageError> {
        while !bytes.is_empty() {
            if self.stage.len() == self.stage_max {
                self.flush().await?;
            }
            let n = (self.stage_max - self.stage.len()).min(bytes.len());
            let (now, later) = bytes.split_at(n);
            self.stage.extend_from_slice(now);
            self.written += n as u64;
            bytes = later;
        }
        if self.stage.len() == self.stage_max {
            self.flush().await?;
        }
        self.assert_invariants();
        Ok(())
    }

    /// Writes everything staged to the file, the last block padded with zeros, and keeps
    /// that partial block staged for the next flush to rewrite. State changes only after
    /// the write succeeded, so a failed or dropped flush leaves it as it was.
    async fn flush(&mut self) -> Result<(), StorageError> {
        if self.flushed == self.written {
            return Ok(());
        }
        self.file
            .write_padded(&self.stage, self.stage_start)
            .await
            .map_err(|err| io_error("write", &self.path, err))?;
        self.flushed = self.written;
        let keep_from = align_down(self.written, self.align);
        // The cast is lossless: the difference is at most the stage's length.
        self.stage.drain(..(keep_from - self.stage_start) as usize);
        self.stage_start = keep_from;
        self.assert_invariants();
        Ok(())
    }

    /// Flushes and fdatasyncs: everything written so far is durable when this returns.
    async fn sync(&mut self) -> Result<(), StorageError> {
        self.flush().await?;
        if self.durable < self.flushed {
            self.file
                .fdatasync()
                .await
                .map_err(|err| io_error("fdatasync", &self.path, err))?;
            self.durable = self.flushed;
            // After the flush the stage holds exactly the partial block before `durable`.
            self.durable_tail.clone_from(&self.stage);
        }
        self.assert_invariants();
        Ok(())
    }

    /// Cuts the file back to the durable prefix, durably, and the state with it.
    async fn reset_to_durable(&mut self) -> Result<(), StorageError> {
        self.file
            .truncate(self.durable)
            .await
            .map_err(|err| io_error("truncate", &self.path, err))?;
        self.file
            .fdatasync()
            .await
            .map_err(|err| io_error("fdatasync", &self.path, err))?;
        self.written = self.durable;
        self.flushed = self.durable;
        self.stage_start = align_down(self.durable, self.align);
        self.stage.clone_from(&self.durable_tail);
        self.assert_invariants();
        Ok(())
    }

    /// Syncs and cuts the file to its exact length (dropping the zero padding of the last
    /// block), durably: what a sealed segment looks like.
    async fn seal(&mut self) -> Result<(), StorageError> {
        self.flush().await?;
        self.file
            .truncate(self.written)
            .await
            .map_err(|err| io_error("truncate", &self.path, err))?;
        self.file
            .fdatasync()
            .await
            .map_err(|err| io_error("fdatasync", &self.path, err))?;
        self.durable = self.written;
        self.durable_tail.clone_from(&self.stage);
        self.assert_invariants();
        Ok(())
    }
}

/// One shard's warm-tier log: sealed segments and the open one being appended to.
///
/// Not `Send`: it lives on its shard's glommio executor. Every method takes `&mut self`,
/// so a driver cannot write while a sync runs; group commit collects appends meanwhile
/// and hands them over in one [`SegmentLog::write`] (or several, then one sync).
///
/// A dropped future (cancellation) is handled like a failure: a `write` dropped halfway
/// leaves the log needing [`SegmentLog::reset_to_durable`], since part of its batch may be
/// staged; a dropped `sync` leaves the durable point where it was.
#[derive(Debug)]
pub struct SegmentLog {
    dir: PathBuf,
    segment_bytes: u64,
    segment_messages: usize,
    mode: IoMode,
    segment: OpenSegment,
    /// Bytes in the sealed segments before `segment`.
    sealed_bytes: u64,
    /// A write or sync failed and `reset_to_durable` has not succeeded since.
    needs_reset: bool,
    /// The read index and the readers' files, shared with every [`LogReader`].
    read: Rc<ReadState>,
}

impl SegmentLog {
    /// Appends `bytes` (whole framed records) after everything written before. They are
    /// not durable until [`SegmentLog::sync`] returns; a full stage is written out, but
    /// nothing is synced, except that a batch which does not fit the open segment first
    /// seals it if nothing in it is unsynced (one fdatasync, a create and a directory
    /// sync, once per segment; see Rotation in the module docs). Its message records go
    /// into the read index, served once the next sync succeeds.
    ///
    /// Panics if `bytes` is not a run of whole frames, or if a message's seq does not
    /// follow the last one written in its conversation (both are the caller's promises).
    /// After an error, call [`SegmentLog::reset_to_durable`]; until then this returns
    /// [`StorageError::NeedsReset`].
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        if self.needs_reset {
            return Err(StorageError::NeedsReset);
        }
        if bytes.is_empty() {
            return Ok(());
        }
        // Set until the whole batch is staged: if this future is dropped halfway, the log
        // holds part of a batch, and must be reset before anything is appended after it.
        self.needs_reset = true;
        let result = self.write_inner(bytes).await;
        self.needs_reset = result.is_err();
        result
    }

    async fn write_inner(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        let len = bytes.len() as u64;
        // Sealing makes the whole segment durable, so a segment with unsynced bytes is
        // not sealed: `reset_to_durable` must be able to remove them (module docs).
        let is_synced = self.segment.durable == self.segment.written;
        let is_full = self.segment.written.saturating_add(len) > self.segment_bytes
            || self.read.index.borrow().messages >= self.segment_messages;
        if self.segment.written > 0 && is_synced && is_full {
            self.rotate().await?;
        }
        // Indexed before the bytes are staged: if staging fails or is dropped halfway,
        // the entries are pending and `reset_to_durable` (which must come next) removes
        // them.
        self.index_batch(bytes)?;
        self.segment.write(bytes).await
    }

    /// Adds the message records of `bytes`, about to be appended at the end of the open
    /// segment, to the read index, pending until the next sync.
    ///
    /// Panics if `bytes` is not a run of whole, valid frames, or if a message's seq does
    /// not follow its conversation's last one: both are the caller's promises (the engine
    /// frames what it appends, and hands out each conversation's seqs one by one).
    fn index_batch(&self, bytes: &[u8]) -> Result<(), StorageError> {
        let segment = self.segment.index;
        let base = self.segment.written;
        // Every frame starts before the batch's last byte.
        let last_byte = base + (bytes.len() as u64).saturating_sub(1);
        if last_byte > RECORD_OFFSET_MAX {
            return Err(StorageError::IndexLimit {
                what: "record offset",
                value: last_byte,
                max: RECORD_OFFSET_MAX,
            });
        }
        let mut index = self.read.index.borrow_mut();
        let mut at = 0;
        while let Some(rest) = bytes.get(at..).filter(|rest| !rest.is_empty()) {
            match decode_record(rest) {
                Decoded::Record { record, len } => {
                    if let Record::Message(message) = record {
                        let location = Location::new(segment, base + at as u64);
                        if let Err(last) = index.push(message.conv, message.seq, location) {
                            panic!(
                                "message {} of {} written after message {last}: seqs must be consecutive",
                                message.seq, message.conv
                            );
                        }
                    }
                    at += len;
                }
                other => panic!(
                    "write was handed {other:?} at byte {at} of {}, not whole framed records",
                    bytes.len()
                ),
            }
        }
        Ok(())
    }

    /// Makes everything written so far durable (write-out and fdatasync). Returns at once
    /// if there is nothing new. After an error, call [`SegmentLog::reset_to_durable`].
    pub async fn sync(&mut self) -> Result<(), StorageError> {
        if self.needs_reset {
            return Err(StorageError::NeedsReset);
        }
        let result = self.segment.sync().await;
        self.needs_reset = result.is_err();
        if result.is_ok() {
            // Every pending entry points into the open segment below `written`, which is
            // now durable (rotation never seals a segment with pending entries).
            self.read.index.borrow_mut().commit();
        }
        result
    }

    /// Cuts the log back to its durable prefix (truncate and fdatasync the open segment)
    /// and accepts appends again; every byte written since the last successful sync is
    /// gone. Sealed segments are durable in full, so only the open one is touched. If this
    /// fails too, the disk is not taking writes: the runtime should stop the shard rather
    /// than append after bytes it could not remove.
    pub async fn reset_to_durable(&mut self) -> Result<(), StorageError> {
        // The entries go first: whatever becomes of the truncate, their records are not
        // durable and never will be, and no write comes before a reset succeeds.
        self.read.index.borrow_mut().discard();
        self.segment.reset_to_durable().await?;
        self.needs_reset = false;
        Ok(())
    }

    /// Bytes over all segments that a successful fdatasync covered.
    pub fn durable_bytes(&self) -> u64 {
        self.sealed_bytes + self.segment.durable
    }

    /// A reader of this log's durable messages, sharing its index: see [`LogReader`].
    // The runtime's fetch task is to call this; until it does, only tests and the bench do.
    pub fn reader(&self) -> LogReader {
        LogReader {
            state: self.read.clone(),
        }
    }

    /// Whether segments are written with O_DIRECT (`false`: buffered fallback).
    pub fn is_direct(&self) -> bool {
        self.mode == IoMode::Direct
    }

    /// Seals the open segment and closes it: everything written is durable and the file
    /// ends exactly at its data. For the SIGTERM path. After a failed write, the bytes
    /// that were never synced are dropped first, as [`SegmentLog::reset_to_durable`] does:
    /// they were never acknowledged and may have been Nacked.
    pub async fn close(mut self) -> Result<(), StorageError> {
        if self.needs_reset {
            self.reset_to_durable().await?;
        }
        self.segment.seal().await?;
        self.read.index.borrow_mut().commit();
        let path = self.segment.path;
        self.segment
            .file
            .close()
            .await
            .map_err(|err| io_error("close", &path, err))
    }

    /// Seals the open segment and starts the next one. The new segment replaces the old
    /// only once its file and directory entry are durable, so a failure anywhere leaves
    /// the old one open (and sealed: a retry seals it again at no cost).
    async fn rotate(&mut self) -> Result<(), StorageError> {
        // Every record of the segment is durable, so are its index entries.
        assert_eq!(
            self.segment.durable,
            self.segment.written,
            "rotating {} with unsynced bytes",
            self.segment.path.display()
        );
        assert!(self.read.index.borrow().pending.is_empty());
        let index = self.segment.index + 1;
        if index > SEGMENT_INDEX_MAX {
            return Err(StorageError::IndexLimit {
                what: "segment index",
                value: index,
                max: SEGMENT_INDEX_MAX,
            });
        }
        self.segment.seal().await?;
        // The sealed segment's entries go to its index file, made durable before the
        // next segment exists (its creation syncs the directory, with the index file's
        // entry in it). A crash before that leaves a sealed segment without a valid
        // index file, which recovery rebuilds from the segment.
        let mut entries = self.read.index.borrow().entries();
        let file = segment_index::encode(&mut entries);
        write_index_file(&self.dir, self.segment.index, &file).await?;
        let summary = SegmentSummary::of_sorted(&entries);
        drop(entries);
        let next = create_segment(&self.dir, index, self.mode).await?;
        let sealed_len = self.segment.written;
        let old = std::mem::replace(&mut self.segment, next);
        self.sealed_bytes += sealed_len;
        // Readers look at both under one borrow of each, with no await between: the
        // open segment's entries move to the sealed list at once.
        *self.read.index.borrow_mut() = Index::default();
        self.read
            .sealed
            .borrow_mut()
            .push((old.index, Rc::new(summary)));
        // The old segment is sealed and durable; a failed close loses nothing.
        if let Err(err) = old.file.close().await {
            tracing::warn!(path = %old.path.display(), error = %os_error(err), "closing a sealed segment failed");
        }
        tracing::debug!(segment = index, "log segment started");
        Ok(())
    }
}

/// Where one record's frame starts: a segment index (the high 24 bits) and the byte
/// offset of the frame in that segment (the low 40), packed into 8 bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Location(u64);

impl Location {
    /// Packs `segment` and `offset`. Callers check both bounds first and refuse with
    /// [`StorageError::IndexLimit`]; passing a value past them is our bug.
    fn new(segment: u64, offset: u64) -> Location {
        assert!(
            (1..=SEGMENT_INDEX_MAX).contains(&segment),
            "segment {segment} does not fit a location"
        );
        assert!(
            offset <= RECORD_OFFSET_MAX,
            "offset {offset} does not fit a location"
        );
        Location(segment << LOCATION_OFFSET_BITS | offset)
    }

    fn segment(self) -> u64 {
        self.0 >> LOCATION_OFFSET_BITS
    }

    fn offset(self) -> u64 {
        self.0 & RECORD_OFFSET_MAX
    }
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.segment(), self.offset())
    }
}

/// The read index's entry for one conversation in the open segment.
#[derive(Debug)]
struct ConvIndex {
    /// The seq at `locations[0]`: a conversation's seqs are consecutive in log order, so
    /// seq `first + i` is at `i`.
    first: Seq,
    locations: Vec<Location>,
    /// How many of `locations` are durable; only those are served. The rest were written
    /// since the last sync and are removed again by `reset_to_durable`.
    durable: usize,
}

/// The read index of the open segment: for every conversation with messages in it, where
/// each of them is. Sealed segments have theirs in a file ([`segment_index`]), with only
/// a summary in memory ([`ReadState::sealed`]).
#[derive(Default)]
struct Index {
    convs: HashMap<ConvId, ConvIndex>,
    /// The conversations that have entries past their durable count, each once.
    pending: Vec<ConvId>,
    /// Entries, durable or not.
    messages: usize,
}

impl Index {
    /// Adds message `seq` of `conv` at `location`, pending until [`Index::commit`]. If
    /// `seq` does not follow the conversation's last entry in this segment, changes
    /// nothing and returns that last seq. (The first entry of a conversation here may
    /// have any seq: those before it are in sealed segments.)
    fn push(&mut self, conv: ConvId, seq: Seq, location: Location) -> Result<(), Seq> {
        let entry = self.convs.entry(conv).or_insert_with(|| ConvIndex {
            first: seq,
            locations: Vec::new(),
            durable: 0,
        });
        let next = entry.first.0 + entry.locations.len() as u64;
        if seq.0 != next {
            if entry.locations.is_empty() {
                self.convs.remove(&conv);
            }
            return Err(Seq(next - 1));
        }
        if entry.durable == entry.locations.len() {
            self.pending.push(conv);
        }
        entry.locations.push(location);
        self.messages += 1;
        Ok(())
    }

    /// Makes every pending entry durable: the bytes they point to were synced.
    fn commit(&mut self) {
        for conv in self.pending.drain(..) {
            // Cannot fail: a conversation is pending only with an entry, and entries are
            // removed only in `discard`, which empties `pending` as it does.
            let entry = self
                .convs
                .get_mut(&conv)
                .expect("pending conversation indexed");
            entry.durable = entry.locations.len();
        }
    }

    /// Removes every pending entry: the bytes they point to were cut from the log.
    fn discard(&mut self) {
        for conv in self.pending.drain(..) {
            // Cannot fail: as in `commit`.
            let entry = self
                .convs
                .get_mut(&conv)
                .expect("pending conversation indexed");
            self.messages -= entry.locations.len() - entry.durable;
            entry.locations.truncate(entry.durable);
            if entry.locations.is_empty() {
                self.convs.remove(&conv);
            }
        }
    }

    /// The durable locations of `conv` in this segment for seqs `from..=to`, at most
    /// `limit` of them, in seq order, with the seq of the first; empty if `from` is not
    /// here (before this segment's first or past its last durable).
    fn durable_locations(
        &self,
        conv: ConvId,
        from: Seq,
        to: Seq,
        limit: usize,
    ) -> Vec<(Seq, Location)> {
        let Some(entry) = self.convs.get(&conv) else {
            return Vec::new();
        };
        let from = from.max(entry.first);
        let durable = &entry.locations[..entry.durable];
        // The casts saturate, as no index holds usize::MAX entries.
        let start = usize::try_from(from.0 - entry.first.0).unwrap_or(usize::MAX);
        let end = usize::try_from(to.0.saturating_add(1).saturating_sub(entry.first.0))
            .unwrap_or(usize::MAX);
        let end = end.min(durable.len()).min(start.saturating_add(limit));
        durable
            .get(start..end)
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, &location)| (Seq(from.0 + i as u64), location))
            .collect()
    }

    /// The last durable seq of `conv` in this segment, if it has one here.
    fn last_durable(&self, conv: ConvId) -> Option<Seq> {
        let entry = self.convs.get(&conv)?;
        (entry.durable > 0).then(|| Seq(entry.first.0 + entry.durable as u64 - 1))
    }

    /// Every entry, for the segment's index file; the segment is sealed, so all are
    /// durable.
    fn entries(&self) -> Vec<IndexEntry> {
        assert!(
            self.pending.is_empty(),
            "indexing a segment with pending entries"
        );
        let mut entries = Vec::with_capacity(self.convs.values().map(|c| c.durable).sum());
        for (&conv, index) in &self.convs {
            for (i, location) in index.locations.iter().enumerate() {
                entries.push(IndexEntry {
                    conv,
                    seq: Seq(index.first.0 + i as u64),
                    offset: location.offset(),
                });
            }
        }
        entries
    }

    fn stats(&self) -> IndexStats {
        let slot_bytes = std::mem::size_of::<(ConvId, ConvIndex)>() + 1;
        let messages = self.convs.values().map(|c| c.durable as u64).sum();
        let locations_bytes: usize = self
            .convs
            .values()
            .map(|c| c.locations.capacity() * std::mem::size_of::<Location>())
            .sum();
        IndexStats {
            conversations: self.convs.len(),
            messages,
            heap_bytes: self.convs.capacity() * slot_bytes
                + locations_bytes
                + self.pending.capacity() * std::mem::size_of::<ConvId>(),
            sealed_segments: 0,
        }
    }
}

impl fmt::Debug for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Index")
            .field("conversations", &self.convs.len())
            .field("pending", &self.pending.len())
            .finish()
    }
}

/// The size of a log's read index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexStats {
    /// Conversations with at least one message in the open segment (durable or pending).
    pub conversations: usize,
    /// Durable messages indexed, in every segment: what readers can be served.
    pub messages: u64,
    /// Heap bytes the index holds: the open segment's (hash table, location vectors with
    /// their slack, the pending list) and the sealed segments' summaries; allocator
    /// overhead not included.
    pub heap_bytes: usize,
    /// Sealed segments, each indexed by its own file.
    pub sealed_segments: usize,
}

/// A segment file opened for reading by [`LogReader`].
///
/// Always a [`BufferedFile`] handle, which glommio reads through its main io_uring ring,
/// opened with O_DIRECT when the log writes with it. Not a [`DmaFile`]: glommio (0.9.0)
/// decides once per device and thread whether DMA files go to its polled ring, by reading
/// from the first DMA file opened there; when that is a freshly created, empty segment
/// the read succeeds without reaching the device, the device is taken to support polling,
/// and every later O_DIRECT read on it fails with EOPNOTSUPP (seen on this machine's
/// virtio disk; the log's own writes happen to work there). O_DIRECT here keeps the
/// readers out of the page cache, so that buffered reads never race the writer's direct
/// writes of the same block (the kernel's invalidation of cached pages after a direct
/// write is best effort). glommio hands `read_at` a buffer aligned to 4 KiB (its buffer
/// allocations are), and the reads are aligned to [`DIRECT_ALIGN_MIN`] here.
#[derive(Debug)]
struct ReadFile {
    file: BufferedFile,
    /// Alignment of every read's position and length (1 without O_DIRECT).
    align: u64,
}

impl ReadFile {
    /// Opens `path` read-only, with O_DIRECT if `mode` asks for it and the filesystem
    /// allows it (as when the log opened it for writing).
    async fn open(path: &Path, mode: IoMode) -> Result<Self, GlommioError<()>> {
        if mode == IoMode::Direct {
            let direct = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .buffered_open(path)
                .await;
            match direct {
                Ok(file) => {
                    return Ok(ReadFile {
                        file,
                        align: DIRECT_ALIGN_MIN,
                    })
                }
                // tmpfs, where glommio writes without O_DIRECT too.
                Err(err) if is_direct_io_refused(&err) => {}
                Err(err) => return Err(err),
            }
        }
        let file = BufferedFile::open(path).await?;
        Ok(ReadFile { file, align: 1 })
    }

    /// Reads `len` bytes at `pos`, fewer only where the file ends first.
    async fn read(&self, pos: u64, len: usize) -> Result<FileBytes, GlommioError<()>> {
        let aligned_pos = align_down(pos, self.align);
        // The casts are lossless: both are below `align` plus `len`, which is at most a
        // frame or a span, far below usize::MAX.
        let skip = (pos - aligned_pos) as usize;
        let aligned_len = align_up((skip + len) as u64, self.align) as usize;
        let buffer = self.file.read_at(aligned_pos, aligned_len).await?;
        let len = buffer.len().saturating_sub(skip).min(len);
        Ok(FileBytes {
            buffer,
            start: skip,
            len,
        })
    }

    async fn close(self) -> Result<(), GlommioError<()>> {
        self.file.close().await
    }
}

/// Bytes read from a segment: `len` bytes of `buffer` from `start`, all of them read
/// from the file.
struct FileBytes {
    buffer: ReadResult,
    start: usize,
    len: usize,
}

impl FileBytes {
    fn as_slice(&self) -> &[u8] {
        // `start + len <= buffer.len()` by construction in `ReadFile::read`; `get` keeps
        // this panic-free regardless.
        self.buffer
            .get(self.start..self.start + self.len)
            .unwrap_or_default()
    }
}

/// What a log shares with its readers.
#[derive(Debug)]
struct ReadState {
    dir: PathBuf,
    mode: IoMode,
    /// The open segment's index.
    index: RefCell<Index>,
    /// Every sealed segment's index summary, oldest first; their entries are in their
    /// index files.
    sealed: RefCell<Vec<(u64, Rc<SegmentSummary>)>>,
    /// Files the readers hold open (segments and index files), the most recently used
    /// last; at most [`READER_OPEN_SEGMENTS_MAX`].
    files: RefCell<Vec<(FileKey, Rc<ReadFile>)>>,
}

/// A file a [`LogReader`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileKey {
    /// Segment `n`.
    Segment(u64),
    /// The index file of sealed segment `n`.
    Index(u64),
}

/// Reads durable messages of a log by conversation and seq, through the log's read index,
/// while the log writes. Cheap to clone (clones share the index and the open files); it
/// stays usable after the log is closed. Not `Send`: it lives on its shard's executor.
#[derive(Clone, Debug)]
// The runtime's fetch task is to call this; until it does, only tests and the bench do.
pub struct LogReader {
    state: Rc<ReadState>,
}

impl LogReader {
    /// The durable messages of `conv` with seq in `from..=to`, in seq order, at most
    /// `limit` of them: consecutive seqs from `max(from, 1)`, fewer than asked where the
    /// log has no more (seqs not yet written, or not yet durable). Everything read is
    /// held in memory at once, so the caller bounds `limit` (the engine asks for one
    /// Sync or Pull page). Frames that lie within [`READ_SPAN_BYTES_MAX`] of each other
    /// are read in one request, and up to [`READ_REQUESTS_INFLIGHT_MAX`] requests go out
    /// at once.
    ///
    /// Every frame read is checked (CRC, and that it is message `seq` of `conv`); a frame
    /// that fails is [`StorageError::Corrupt`] and the whole read fails.
    pub async fn read(
        &self,
        conv: ConvId,
        from: Seq,
        to: Seq,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        let first = from.max(Seq(1));
        let locations = self.locations(conv, first, to, limit).await?;
        let runs = plan_runs(&locations);
        let mut messages = Vec::with_capacity(locations.len());
        let mut next = 0;
        while next < runs.len() {
            // A window of runs whose reads go to the kernel together.
            let mut end = next + 1;
            let mut window_bytes = runs[next].span;
            while let Some(run) = runs.get(end) {
                if end - next == READ_REQUESTS_INFLIGHT_MAX
                    || window_bytes + run.span > READ_WINDOW_BYTES_MAX
                {
                    break;
                }
                window_bytes += run.span;
                end += 1;
            }
            let window = &runs[next..end];
            let mut files = Vec::with_capacity(window.len());
            for run in window {
                files.push(self.file(FileKey::Segment(run.segment)).await?);
            }
            let reads = join_all(
                window
                    .iter()
                    .zip(&files)
                    .map(|(run, file)| file.read(run.offset, run.span))
                    .collect(),
            )
            .await;
            for ((run, file), bytes) in window.iter().zip(&files).zip(reads) {
                let bytes = bytes.map_err(|err| {
                    io_error("read", &self.path(FileKey::Segment(run.segment)), err)
                })?;
                for i in run.entries.clone() {
                    let location = locations[i];
                    let seq = Seq(first.0 + i as u64);
                    // The cast is lossless: at most READ_SPAN_BYTES_MAX (`plan_runs`).
                    let at = (location.offset() - run.offset) as usize;
                    let rest = bytes.as_slice().get(at..).unwrap_or_default();
                    let decoded = match decode_record(rest) {
                        // Longer than what the run's read took of it: read it alone.
                        Decoded::Incomplete { len } => self.read_frame(file, location, len).await?,
                        decoded => decoded,
                    };
                    messages.push(self.expect_message(decoded, location, conv, seq)?);
                }
            }
            next = end;
        }
        Ok(messages)
    }

    /// The last durable seq of `conv` (0 if it has none): how the runtime answers the
    /// engine's `Load` of a conversation that left its memory. From memory if the
    /// conversation has a message in the open segment; otherwise one block of the index
    /// file of each sealed segment whose summary may hold it, newest first (for a
    /// conversation the log never saw, about one segment in a hundred).
    pub async fn last_durable_seq(&self, conv: ConvId) -> Result<Seq, StorageError> {
        if let Some(seq) = self.state.index.borrow().last_durable(conv) {
            return Ok(seq);
        }
        let candidates = self.candidates(conv);
        for (segment, summary) in candidates.iter().rev() {
            let Some(block) = segment_index::last_block(summary, conv) else {
                continue;
            };
            let bytes = self.read_index_block(*segment, block).await?;
            if let Some(seq) = segment_index::last_seq_in(bytes.as_slice(), conv) {
                return Ok(seq);
            }
        }
        Ok(Seq::ZERO)
    }

    /// The durable locations of `conv`'s messages `first..=to`, at most `limit`: seqs
    /// consecutive from `first` (`first` at least 1), fewer where the log has no more.
    async fn locations(
        &self,
        conv: ConvId,
        first: Seq,
        to: Seq,
        limit: usize,
    ) -> Result<Vec<Location>, StorageError> {
        assert!(first.0 >= 1, "seq 0 is never indexed");
        // Both taken now, together: a rotation while the sealed files are read moves the
        // open segment's entries into a new sealed segment, and they would be missed.
        let candidates = self.candidates(conv);
        let open = self
            .state
            .index
            .borrow()
            .durable_locations(conv, first, to, limit);
        let mut out = Vec::new();
        let mut next = first;
        for (segment, summary) in &candidates {
            if out.len() == limit || next > to {
                return Ok(out);
            }
            let (mut find, mut step) =
                segment_index::Find::start(summary, conv, next, to, limit - out.len());
            let entries = loop {
                match step {
                    segment_index::Step::Done(entries) => break entries,
                    segment_index::Step::Read(block) => {
                        let bytes = self.read_index_block(*segment, block).await?;
                        step = find.feed(summary, bytes.as_slice());
                    }
                }
            };
            for entry in entries {
                if entry.seq != next {
                    // Seqs are consecutive in log order, so this is a damaged index file.
                    return Err(self.damaged_index(*segment, conv, next));
                }
                out.push(Location::new(*segment, entry.offset));
                next = Seq(next.0 + 1);
            }
        }
        for (seq, location) in open {
            if out.len() == limit {
                break;
            }
            if seq != next {
                // `open` starts at `first` or at the open segment's first seq of `conv`,
                // which follows the last one sealed.
                return Err(self.damaged_index(location.segment(), conv, next));
            }
            out.push(location);
            next = Seq(next.0 + 1);
        }
        Ok(out)
    }

    /// The sealed segments whose summaries may hold `conv`, oldest first.
    fn candidates(&self, conv: ConvId) -> Vec<(u64, Rc<SegmentSummary>)> {
        self.state
            .sealed
            .borrow()
            .iter()
            .filter(|(_, summary)| summary.may_contain(conv))
            .cloned()
            .collect()
    }

    /// One block of sealed segment `segment`'s index file.
    async fn read_index_block(
        &self,
        segment: u64,
        block: segment_index::BlockRef,
    ) -> Result<FileBytes, StorageError> {
        let file = self.file(FileKey::Index(segment)).await?;
        let bytes = file
            .read(block.pos, block.len)
            .await
            .map_err(|err| io_error("read", &self.path(FileKey::Index(segment)), err))?;
        if bytes.as_slice().len() != block.len {
            return Err(StorageError::Corrupt {
                path: self.path(FileKey::Index(segment)),
                offset: block.pos,
                reason: Damage::Torn,
            });
        }
        Ok(bytes)
    }

    fn damaged_index(&self, segment: u64, conv: ConvId, seq: Seq) -> StorageError {
        let path = self.path(FileKey::Index(segment));
        tracing::error!(path = %path.display(), %conv, %seq, "an index file skips a seq");
        StorageError::Corrupt {
            path,
            offset: 0,
            reason: Damage::Misplaced { conv, seq },
        }
    }

    /// The size of the index. Walks every conversation of the open segment: for metrics
    /// and benches, not for every request.
    pub fn index_stats(&self) -> IndexStats {
        let mut stats = self.state.index.borrow().stats();
        for (_, summary) in self.state.sealed.borrow().iter() {
            stats.messages += summary.entries();
            stats.heap_bytes += summary.heap_bytes();
            stats.sealed_segments += 1;
        }
        stats
    }

    /// Reads the frame at `location` alone, starting with `len` bytes and growing to its
    /// whole length once its header is known. At most three reads: header, frame, and
    /// one that finds the file ending inside the frame.
    async fn read_frame(
        &self,
        file: &ReadFile,
        location: Location,
        mut len: usize,
    ) -> Result<Decoded, StorageError> {
        loop {
            let bytes = file.read(location.offset(), len).await.map_err(|err| {
                io_error(
                    "read",
                    &self.path(FileKey::Segment(location.segment())),
                    err,
                )
            })?;
            match decode_record(bytes.as_slice()) {
                // The frame is longer than what was asked for: ask for all of it. `len`
                // only grows, and never past a whole frame, so this loop ends.
                Decoded::Incomplete { len: whole } if whole > len => len = whole,
                decoded => return Ok(decoded),
            }
        }
    }

    /// The message in `decoded`, if it is message `seq` of `conv`.
    fn expect_message(
        &self,
        decoded: Decoded,
        location: Location,
        conv: ConvId,
        seq: Seq,
    ) -> Result<StoredMessage, StorageError> {
        let reason = match decoded {
            Decoded::Record {
                record: Record::Message(message),
                ..
            } if message.conv == conv && message.seq == seq => return Ok(message),
            Decoded::Record { .. } | Decoded::ZeroHeader => Damage::Misplaced { conv, seq },
            // The file ends inside the frame: a durable frame was cut short.
            Decoded::Incomplete { .. } => Damage::Torn,
            Decoded::Corrupt(reason) => Damage::Frame(reason),
        };
        let path = self.path(FileKey::Segment(location.segment()));
        tracing::error!(
            path = %path.display(), offset = location.offset(), %conv, %seq, %reason,
            "an indexed message cannot be read from the log"
        );
        Err(StorageError::Corrupt {
            path,
            offset: location.offset(),
            reason,
        })
    }

    /// An open handle on `key`'s file, from the cache or newly opened (then cached, the
    /// least recently used one closed if the cache is full).
    async fn file(&self, key: FileKey) -> Result<Rc<ReadFile>, StorageError> {
        if let Some(file) = self.cached_file(key) {
            return Ok(file);
        }
        let path = self.path(key);
        let opened = ReadFile::open(&path, self.state.mode)
            .await
            .map_err(|err| io_error("open", &path, err))?;
        // Another read may have opened the same file meanwhile: keep one handle.
        let (file, spare) = match self.cached_file(key) {
            Some(file) => (file, Some((key, Rc::new(opened)))),
            None => {
                let file = Rc::new(opened);
                let mut files = self.state.files.borrow_mut();
                files.push((key, file.clone()));
                let evicted = (files.len() > READER_OPEN_SEGMENTS_MAX).then(|| files.remove(0));
                (file, evicted)
            }
        };
        if let Some((spare_key, spare)) = spare {
            // A handle still used by a read in flight is closed by glommio when that read
            // drops it.
            if let Ok(spare) = Rc::try_unwrap(spare) {
                if let Err(err) = spare.close().await {
                    let path = self.path(spare_key);
                    tracing::warn!(path = %path.display(), error = %os_error(err), "closing a file opened for reading failed");
                }
            }
        }
        Ok(file)
    }

    /// The cached handle on `key`'s file, made the most recently used.
    fn cached_file(&self, key: FileKey) -> Option<Rc<ReadFile>> {
        let mut files = self.state.files.borrow_mut();
        let at = files.iter().position(|(k, _)| *k == key)?;
        let entry = files.remove(at);
        let file = entry.1.clone();
        files.push(entry);
        Some(file)
    }

    fn path(&self, key: FileKey) -> PathBuf {
        match key {
            FileKey::Segment(n) => self.state.dir.join(segment_name(n)),
            FileKey::Index(n) => self.state.dir.join(index_name(n)),
        }
    }
}

/// Frames of one segment read in one request by [`LogReader::read`].
#[derive(Debug, PartialEq, Eq)]
struct Run {
    segment: u64,
    /// Where the read starts: the first frame's offset.
    offset: u64,
    /// Bytes read: up to the last frame's offset plus [`READ_TAIL_BYTES`], at most
    /// [`READ_SPAN_BYTES_MAX`].
    span: usize,
    /// The positions in the locations list of the frames it covers.
    entries: std::ops::Range<usize>,
}

/// Groups `locations` (in seq order, so in log order) into runs: consecutive entries in
/// one segment within [`READ_SPAN_BYTES_MAX`] of the run's first.
fn plan_runs(locations: &[Location]) -> Vec<Run> {
    let mut runs = Vec::new();
    let mut start = 0;
    while let Some(&head) = locations.get(start) {
        let mut end = start + 1;
        while let Some(&next) = locations.get(end) {
            let fits = next.segment() == head.segment()
                && next.offset() >= head.offset()
                && next.offset() - head.offset() + READ_TAIL_BYTES <= READ_SPAN_BYTES_MAX;
            if !fits {
                break;
            }
            end += 1;
        }
        let last = locations[end - 1];
        runs.push(Run {
            segment: head.segment(),
            offset: head.offset(),
            // The cast is lossless: at most READ_SPAN_BYTES_MAX, checked above.
            span: (last.offset() - head.offset() + READ_TAIL_BYTES) as usize,
            entries: start..end,
        });
        start = end;
    }
    runs
}

/// Runs `futures` together and returns their outputs in order: each is polled before
/// any is awaited, so that their I/O goes to the kernel at once. Every future is polled
/// again on each wake, which is cheap for the few ([`READ_REQUESTS_INFLIGHT_MAX`]) that
/// the reader joins.
async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut is_done = true;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => is_done = false,
                }
            }
        }
        if is_done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outputs
        .into_iter()
        // Cannot fail: the poll_fn above returns only once every output is set.
        .map(|output| output.expect("every joined future is ready"))
        .collect()
}

/// Creates segment `index` in `dir`, empty, and makes its directory entry durable.
async fn create_segment(dir: &Path, index: u64, mode: IoMode) -> Result<OpenSegment, StorageError> {
    let path = dir.join(segment_name(index));
    let file = SegmentFile::open(&path, mode, true)
        .await
        .map_err(|err| io_error("create", &path, err))?;
    sync_dir(dir).await?;
    Ok(OpenSegment::new(index, path, file, 0, &[]))
}

/// Writes sealed segment `index`'s index file anew and fdatasyncs it. The directory entry
/// is the caller's to sync.
async fn write_index_file(dir: &Path, index: u64, bytes: &[u8]) -> Result<(), StorageError> {
    let path = dir.join(index_name(index));
    let file = SegmentFile::open(&path, IoMode::Buffered, true)
        .await
        .map_err(|err| io_error("create", &path, err))?;
    if !bytes.is_empty() {
        file.write_padded(bytes, 0)
            .await
            .map_err(|err| io_error("write", &path, err))?;
    }
    file.fdatasync()
        .await
        .map_err(|err| io_error("fdatasync", &path, err))?;
    file.close()
        .await
        .map_err(|err| io_error("close", &path, err))
}

/// The summary of sealed segment `index` whose message records are `entries`: from its
/// index file if that holds exactly these entries, else from a new index file written
/// now. Returns whether it wrote one (the caller syncs the directory).
async fn recover_index_file(
    dir: &Path,
    index: u64,
    mut entries: Vec<IndexEntry>,
) -> Result<(SegmentSummary, bool), StorageError> {
    let expected = segment_index::encode(&mut entries);
    let path = dir.join(index_name(index));
    let found = match std::fs::metadata(&path) {
        Ok(meta) if meta.len() == expected.len() as u64 => Some(read_whole(&path).await?),
        Ok(_) => None,
        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
        Err(err) => return Err(std_error("stat", &path, err)),
    };
    let summary = SegmentSummary::of_sorted(&entries);
    if found.as_deref() == Some(&expected[..]) {
        return Ok((summary, false));
    }
    tracing::info!(path = %path.display(), entries = entries.len(), "writing a sealed segment's index file");
    write_index_file(dir, index, &expected).await?;
    Ok((summary, true))
}

/// fsyncs a directory, so that the entries created in it survive a crash.
async fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    let handle = Directory::open(dir)
        .await
        .map_err(|err| io_error("open directory", dir, err))?;
    handle
        .sync()
        .await
        .map_err(|err| io_error("fsync directory", dir, err))?;
    handle
        .close()
        .await
        .map_err(|err| io_error("close directory", dir, err))
}

/// Whether a glommio error is the filesystem refusing O_DIRECT.
fn is_direct_io_refused(err: &GlommioError<()>) -> bool {
    match err {
        GlommioError::IoError(source) | GlommioError::EnhancedIoError { source, .. } => {
            source.raw_os_error() == Some(libc::EINVAL)
        }
        _ => false,
    }
}

/// Opens (`create`: creates) the segment at `path` for appending, with O_DIRECT if `mode`
/// asks for it and the filesystem allows it. Returns the mode that worked.
async fn open_for_append(
    path: &Path,
    mode: IoMode,
    create: bool,
) -> Result<(SegmentFile, IoMode), StorageError> {
    match SegmentFile::open(path, mode, create).await {
        Ok(file) => Ok((file, mode)),
        Err(err) if mode == IoMode::Direct && is_direct_io_refused(&err) => {
            tracing::warn!(
                path = %path.display(),
                error = %os_error(err),
                "the filesystem refuses O_DIRECT; the log falls back to buffered writes and fdatasync"
            );
            let file = SegmentFile::open(path, IoMode::Buffered, create)
                .await
                .map_err(|err| io_error("open", path, err))?;
            Ok((file, IoMode::Buffered))
        }
        Err(err) => Err(io_error("open", path, err)),
    }
}

/// Reads a whole file through io_uring, in steps of [`RECOVERY_READ_BYTES`].
async fn read_whole(path: &Path) -> Result<Vec<u8>, StorageError> {
    let file = BufferedFile::open(path)
        .await
        .map_err(|err| io_error("open", path, err))?;
    let size = file
        .file_size()
        .await
        .map_err(|err| io_error("stat", path, err))?;
    let size = usize::try_from(size).map_err(|_| {
        std_error(
            "read",
            path,
            io::Error::new(io::ErrorKind::InvalidData, "segment larger than memory"),
        )
    })?;
    let mut bytes = Vec::with_capacity(size);
    while bytes.len() < size {
        let want = (size - bytes.len()).min(RECOVERY_READ_BYTES);
        let chunk = file
            .read_at(bytes.len() as u64, want)
            .await
            .map_err(|err| io_error("read", path, err))?;
        if chunk.is_empty() {
            // The file shrank while we read it: nobody else writes our segments.
            return Err(std_error(
                "read",
                path,
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "segment shrank during recovery",
                ),
            ));
        }
        bytes.extend_from_slice(&chunk);
    }
    file.close()
        .await
        .map_err(|err| io_error("close", path, err))?;
    Ok(bytes)
}

/// Lists the segment indexes in `dir`, sorted, and checks that none is missing between
/// the first and the last.
fn list_segments(dir: &Path) -> Result<Vec<u64>, StorageError> {
    let mut indexes = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|err| std_error("read directory", dir, err))?;
    for entry in entries {
        let entry = entry.map_err(|err| std_error("read directory", dir, err))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if !name.ends_with(SEGMENT_SUFFIX) {
            continue;
        }
        match parse_segment_name(name) {
            Some(index) => indexes.push(index),
            None => return Err(StorageError::BadSegmentName { path: entry.path() }),
        }
    }
    indexes.sort_unstable();
    for pair in indexes.windows(2) {
        if pair[1] != pair[0] + 1 {
            return Err(StorageError::MissingSegment {
                dir: dir.to_owned(),
                missing: pair[0] + 1,
            });
        }
    }
    Ok(indexes)
}

/// Checks that `message` follows its conversation's last message in the log so far.
fn check_follows(
    last_seqs: &mut HashMap<ConvId, Seq>,
    message: &StoredMessage,
) -> Result<(), StorageError> {
    let last = last_seqs.entry(message.conv).or_insert(Seq::ZERO);
    if message.seq.0 != last.0 + 1 {
        return Err(StorageError::SeqGap {
            conv: message.conv,
            last: *last,
            found: message.seq,
        });
    }
    *last = message.seq;
    Ok(())
}

/// Adds a recovered message of the open segment, at `offset` in it, to the read index.
fn index_recovered(
    index: &mut Index,
    segment: u64,
    offset: u64,
    message: &StoredMessage,
) -> Result<(), StorageError> {
    if offset > RECORD_OFFSET_MAX {
        return Err(StorageError::IndexLimit {
            what: "record offset",
            value: offset,
            max: RECORD_OFFSET_MAX,
        });
    }
    // `segment` was checked against SEGMENT_INDEX_MAX when the segments were listed.
    let location = Location::new(segment, offset);
    index
        .push(message.conv, message.seq, location)
        .map_err(|last| StorageError::SeqGap {
            conv: message.conv,
            last,
            found: message.seq,
        })
}

/// Opens the log in `config.dir`, creating the directory and a first segment if needed,
/// and recovers it: returns every record in order and a log that appends after them.
///
/// Each segment is read whole into memory (at most about `segment_bytes`, plus its
/// decoded records, at a time) and scanned with core's [`scan`]. The last segment is cut
/// to its valid length, durably, whatever stopped the scan: a torn append, zero padding
/// from O_DIRECT, or a corrupt frame (logged as an error and reported in
/// [`Recovery::tail`]). Any damage in an earlier segment is [`StorageError::Corrupt`]:
/// the log refuses to start, because those records were sealed durable and dropping the
/// rest silently could lose acknowledged messages. Only [`ScanEnd::Clean`] and
/// [`ScanEnd::ZeroTail`] pass there.
///
/// All records of the log are held in memory at once: the runtime rebuilds its state
/// from them and drops them. The read index is built from the same scan; a message whose
/// seq does not follow its conversation's last is [`StorageError::SeqGap`].
pub async fn open(config: LogConfig) -> Result<(SegmentLog, Recovery), StorageError> {
    open_with_mode(config, IoMode::Direct).await
}

/// [`open`], trying `wanted` first: [`IoMode::Buffered`] skips O_DIRECT altogether.
pub(crate) async fn open_with_mode(
    config: LogConfig,
    wanted: IoMode,
) -> Result<(SegmentLog, Recovery), StorageError> {
    if config.segment_bytes == 0 {
        return Err(StorageError::InvalidConfig {
            reason: "segment_bytes must be at least 1",
        });
    }
    if config.segment_messages == 0 {
        return Err(StorageError::InvalidConfig {
            reason: "segment_messages must be at least 1",
        });
    }
    if config.segment_bytes > SEGMENT_BYTES_MAX {
        return Err(StorageError::InvalidConfig {
            reason: "segment_bytes must be at most 512 GiB (the read index's reach)",
        });
    }
    let dir = config.dir;
    if !dir.is_dir() {
        std::fs::create_dir_all(&dir).map_err(|err| std_error("create directory", &dir, err))?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent).await?;
        }
    }
    let indexes = list_segments(&dir)?;
    if let Some(&last) = indexes.last().filter(|&&last| last > SEGMENT_INDEX_MAX) {
        return Err(StorageError::IndexLimit {
            what: "segment index",
            value: last,
            max: SEGMENT_INDEX_MAX,
        });
    }

    let mut records = Vec::new();
    let mut read_index = Index::default();
    let mut sealed = Vec::new();
    let mut wrote_index_files = false;
    // Each conversation's last seq so far: seqs must follow on across segments too.
    let mut last_seqs: HashMap<ConvId, Seq> = HashMap::new();
    let mut sealed_bytes = 0;
    let mut recovered = None;
    // The last segment's bytes, kept until its partial last block is staged again.
    let mut last_bytes = Vec::new();
    for (position, &index) in indexes.iter().enumerate() {
        let path = dir.join(segment_name(index));
        let bytes = read_whole(&path).await?;
        let found = scan(&bytes);
        let is_last = position + 1 == indexes.len();
        if !is_last {
            let damage = match found.end {
                ScanEnd::Clean | ScanEnd::ZeroTail { .. } => None,
                ScanEnd::Torn { offset } => Some((offset, Damage::Torn)),
                ScanEnd::Corrupt { offset, reason } => Some((offset, Damage::Frame(reason))),
            };
            if let Some((offset, reason)) = damage {
                return Err(StorageError::Corrupt {
                    path,
                    offset,
                    reason,
                });
            }
            sealed_bytes += found.valid_len;
        } else {
            recovered = Some((index, path, found.valid_len, found.end));
            last_bytes = bytes;
        }
        records.reserve(found.records.len());
        let mut entries = Vec::new();
        for (offset, record) in found.records {
            if let Record::Message(message) = &record {
                check_follows(&mut last_seqs, message)?;
                if is_last {
                    index_recovered(&mut read_index, index, offset, message)?;
                } else {
                    entries.push(IndexEntry {
                        conv: message.conv,
                        seq: message.seq,
                        offset,
                    });
                }
            }
            records.push(record);
        }
        if !is_last {
            let (summary, wrote) = recover_index_file(&dir, index, entries).await?;
            wrote_index_files |= wrote;
            sealed.push((index, Rc::new(summary)));
        }
    }
    drop(last_seqs);
    if wrote_index_files {
        sync_dir(&dir).await?;
    }
    read_index.commit();
    read_index.pending.shrink_to_fit();
    // Growth by doubling left up to half of each vector unused; recovery is the one
    // moment every conversation is touched anyway.
    for entry in read_index.convs.values_mut() {
        entry.locations.shrink_to_fit();
    }
    read_index.convs.shrink_to_fit();

    let (segment, mode, truncated_bytes, tail) = match recovered {
        None => {
            let path = dir.join(segment_name(1));
            let (file, mode) = open_for_append(&path, wanted, true).await?;
            sync_dir(&dir).await?;
            (
                OpenSegment::new(1, path, file, 0, &[]),
                mode,
                0,
                ScanEnd::Clean,
            )
        }
        Some((index, path, valid_len, end)) => {
            let (file, mode) = open_for_append(&path, wanted, false).await?;
            let truncated = last_bytes.len() as u64 - valid_len;
            if truncated > 0 {
                file.truncate(valid_len)
                    .await
                    .map_err(|err| io_error("truncate", &path, err))?;
                file.fdatasync()
                    .await
                    .map_err(|err| io_error("fdatasync", &path, err))?;
                // Zero padding is what every restart without `close` finds (and nothing
                // is lost with it); a torn record is an append cut by a crash, never
                // acknowledged; a corrupt frame may have been.
                match end {
                    ScanEnd::Clean => {}
                    ScanEnd::ZeroTail { .. } => tracing::info!(
                        path = %path.display(), valid_len, truncated,
                        "zero padding cut from the end of the log"
                    ),
                    ScanEnd::Torn { offset } => tracing::warn!(
                        path = %path.display(), offset, truncated,
                        "torn record cut from the end of the log (an append cut by a crash)"
                    ),
                    ScanEnd::Corrupt { offset, reason } => tracing::error!(
                        path = %path.display(), offset, %reason, truncated,
                        "corrupt record cut from the end of the log; if it was acknowledged, it is lost"
                    ),
                }
            }
            // The casts are lossless: both are at most `last_bytes.len()`.
            let tail_start = align_down(valid_len, file.alignment()) as usize;
            let tail_block = &last_bytes[tail_start..valid_len as usize];
            let segment = OpenSegment::new(index, path, file, valid_len, tail_block);
            (segment, mode, truncated, end)
        }
    };

    let read = Rc::new(ReadState {
        dir: dir.clone(),
        mode,
        index: RefCell::new(read_index),
        sealed: RefCell::new(sealed),
        files: RefCell::new(Vec::new()),
    });
    let log = SegmentLog {
        dir,
        segment_bytes: config.segment_bytes,
        segment_messages: config.segment_messages,
        mode,
        sealed_bytes,
        needs_reset: false,
        segment,
        read,
    };
    let recovery = Recovery {
        records,
        segments: indexes.len().max(1),
        bytes: log.durable_bytes(),
        truncated_bytes,
        tail,
    };
    tracing::info!(
        dir = %log.dir.display(),
        segments = recovery.segments,
        records = recovery.records.len(),
        bytes = recovery.bytes,
        truncated = recovery.truncated_bytes,
        tail = ?recovery.tail,
        direct_io = log.is_direct(),
        "log recovered"
    );
    Ok((log, recovery))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use imgate_core::log::{encode_record, StoredMessage};
    use imgate_core::proto::{ClientMsgId, ConvId, DeviceId, Seq, UserId};
    use std::future::Future;
    use std::rc::Rc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Both ways of writing segments; O_DIRECT is what /tmp (ext4 here) gets by default.
    const MODES: [IoMode; 2] = [IoMode::Direct, IoMode::Buffered];

    /// A directory under the system temp dir, removed when dropped (also on panic).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let unique = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "imgate-storage-{name}-{}-{unique}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&path);
            TempDir(path)
        }

        fn segment(&self, index: u64) -> PathBuf {
            self.0.join(segment_name(index))
        }

        /// Bytes of segment `index` on disk.
        fn segment_len(&self, index: u64) -> u64 {
            std::fs::metadata(self.segment(index)).expect("stat").len()
        }

        fn segment_files(&self) -> Vec<u64> {
            list_segments(&self.0).expect("list segments")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn run<T>(test: impl Future<Output = T>) -> T {
        glommio::LocalExecutorBuilder::default()
            .make()
            .expect("executor")
            .run(test)
    }

    fn config(dir: &TempDir, segment_bytes: u64) -> LogConfig {
        LogConfig {
            dir: dir.0.clone(),
            segment_bytes,
            segment_messages: SEGMENT_MESSAGES_DEFAULT,
        }
    }

    fn message(seq: u64, payload_len: usize) -> Record {
        Record::Message(StoredMessage {
            conv: ConvId::direct(UserId(3), UserId(9)),
            seq: Seq(seq),
            sender: UserId(3),
            sender_device: DeviceId(2),
            client_msg_id: ClientMsgId([seq as u8; 16]),
            high_priority: false,
            payload: Bytes::from(vec![seq as u8; payload_len]),
        })
    }

    fn frames(records: &[Record]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for record in records {
            encode_record(record, &mut bytes);
        }
        bytes
    }

    /// Records with seqs `seqs`, payloads of varied lengths so frames straddle blocks.
    fn messages(seqs: std::ops::Range<u64>) -> Vec<Record> {
        seqs.map(|seq| message(seq, 50 + (seq as usize * 37) % 700))
            .collect()
    }

    async fn open_mode(dir: &TempDir, segment_bytes: u64, mode: IoMode) -> (SegmentLog, Recovery) {
        open_with_mode(config(dir, segment_bytes), mode)
            .await
            .expect("open")
    }

    /// Bytes handed to `write` over all segments, durable or not.
    fn written_bytes(log: &SegmentLog) -> u64 {
        log.sealed_bytes + log.segment.written
    }

    /// Whether the open segment's descriptor has O_DIRECT set, from /proc.
    fn has_o_direct(log: &SegmentLog) -> bool {
        use std::os::fd::AsRawFd;
        let fd = match &log.segment.file {
            SegmentFile::Direct(file) => file.as_raw_fd(),
            SegmentFile::Buffered(file) => file.as_raw_fd(),
        };
        fd_has_o_direct(fd)
    }

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

    /// Whether `path` is on tmpfs, where glommio opens DMA files without O_DIRECT.
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

    #[test]
    fn direct_mode_opens_segments_with_o_direct() {
        for mode in MODES {
            let dir = TempDir::new("odirect");
            run(async {
                let (log, _) = open_mode(&dir, SEGMENT_BYTES_DEFAULT, mode).await;
                let expected = mode == IoMode::Direct && !is_on_tmpfs(&dir.0);
                assert_eq!(
                    has_o_direct(&log),
                    expected,
                    "{mode:?} in {}",
                    dir.0.display()
                );
            });
        }
    }

    #[test]
    fn synced_records_come_back_in_order_after_reopen() {
        for mode in MODES {
            let dir = TempDir::new("roundtrip");
            let records = messages(1..200);
            run(async {
                let (mut log, recovery) = open_mode(&dir, SEGMENT_BYTES_DEFAULT, mode).await;
                assert!(recovery.records.is_empty());
                assert_eq!(recovery.segments, 1);
                assert_eq!(log.is_direct(), mode == IoMode::Direct);
                for batch in records.chunks(7) {
                    log.write(&frames(batch)).await.expect("write");
                    log.sync().await.expect("sync");
                }
                let len = frames(&records).len() as u64;
                assert_eq!(log.durable_bytes(), len);
                log.close().await.expect("close");
                assert_eq!(dir.segment_len(1), len);

                let (log, recovery) = open_mode(&dir, SEGMENT_BYTES_DEFAULT, mode).await;
                assert_eq!(recovery.records, records);
                assert_eq!(recovery.bytes, len);
                assert_eq!(recovery.truncated_bytes, 0);
                assert_eq!(recovery.tail, ScanEnd::Clean);
                assert_eq!(log.durable_bytes(), len);
            });
        }
    }

    /// A crash after a sync that ended inside a block: with O_DIRECT the file ends in the
    /// zero padding glommio wrote, and recovery cuts it off.
    #[test]
    fn crash_after_sync_leaves_a_zero_tail_that_recovery_cuts() {
        for mode in MODES {
            let dir = TempDir::new("padding");
            let records = messages(1..40);
            let len = frames(&records).len() as u64;
            run(async {
                let (mut log, _) = open_mode(&dir, SEGMENT_BYTES_DEFAULT, mode).await;
                log.write(&frames(&records)).await.expect("write");
                log.sync().await.expect("sync");
                // Dropped without close: what a kill -9 leaves.
                drop(log);
            });
            let on_disk = std::fs::read(dir.segment(1)).expect("read");
            if mode == IoMode::Direct {
                assert_eq!(on_disk.len() as u64, align_up(len, DIRECT_ALIGN_MIN));
                assert!(on_disk[len as usize..].iter().all(|&b| b == 0));
            } else {
                assert_eq!(on_disk.len() as u64, len);
            }
            run(async {
                let (_, recovery) = open_mode(&dir, SEGMENT_BYTES_DEFAULT, mode).await;
                assert_eq!(recovery.records, records);
                assert_eq!(recovery.truncated_bytes, on_disk.len() as u64 - len);
            });
            assert_eq!(dir.segment_len(1), len);
        }
    }

    #[test]
    fn rotation_spreads_records_over_segments_and_keeps_their_order() {
        for mode in MODES {
            let dir = TempDir::new("rotation");
            let records = messages(1..300);
            let segment_bytes = 8 * 1024;
            run(async {
                let (mut log, _) = open_mode(&dir, segment_bytes, mode).await;
                for batch in records.chunks(5) {
                    log.write(&frames(batch)).await.expect("write");
                    log.sync().await.expect("sync");
                }
                // A batch larger than a whole segment goes alone into a fresh one.
                let big = messages(300..340);
                assert!(frames(&big).len() as u64 > segment_bytes);
                let before = log.segment.index;
                log.write(&frames(&big)).await.expect("write");
                assert_eq!(log.segment.index, before + 1);
                log.sync().await.expect("sync");
                log.write(&frames(&messages(340..341)))
                    .await
                    .expect("write");
                assert_eq!(log.segment.index, before + 2);
                log.close().await.expect("close");
            });
            let segments = dir.segment_files();
            assert!(segments.len() > 10, "only {} segments", segments.len());
            assert_eq!(segments, (1..=segments.len() as u64).collect::<Vec<_>>());
            let sizes: Vec<u64> = segments.iter().map(|&i| dir.segment_len(i)).collect();
            let oversized = sizes.iter().filter(|&&len| len > segment_bytes).count();
            assert_eq!(oversized, 1, "segment sizes {sizes:?}");
            run(async {
                let (_, recovery) = open_mode(&dir, segment_bytes, mode).await;
                assert_eq!(recovery.records, messages(1..341));
                assert_eq!(recovery.segments, segments.len());
                assert_eq!(recovery.bytes, sizes.iter().sum::<u64>());
            });
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
            run(async {
                let (mut log, recovery) = open_mode(&dir, SEGMENT_BYTES_DEFAULT, mode).await;
                assert_eq!(recovery.records, kept);
                assert_eq!(recovery.truncated_bytes, (torn.len() / 2) as u64);
                assert!(matches!(recovery.tail, ScanEnd::Torn { .. }));
                assert_eq!(log.durable_bytes(), frames(&kept).len() as u64);
                // Seq 4 again: the torn append was never acknowledged.
                log.write(&frames(&messages(4..6))).await.expect("write");
                log.sync().await.expect("sync");
            });
            run(async {
                let (_, recovery) = open_mode(&dir, SEGMENT_BYTES_DEFAULT, mode).await;
                let mut expected = kept.clone();
                expected.extend(messages(4..6));
                assert_eq!(recovery.records, expected);
            });
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
            run(async {
                let (mut log, recovery) = open_mode(&dir, SEGMENT_BYTES_DEFAULT, mode).await;
                assert_eq!(recovery.records, kept);
                assert_eq!(
                    recovery.tail,
                    ScanEnd::ZeroTail {
                        offset: valid as u64
                    }
                );
                assert_eq!(recovery.truncated_bytes, (bytes.len() - valid) as u64);
                assert_eq!(dir.segment_len(1), valid as u64);
                log.write(&frames(&messages(6..8))).await.expect("write");
                log.close().await.expect("close");
            });
            run(async {
                let (_, recovery) = open_mode(&dir, SEGMENT_BYTES_DEFAULT, mode).await;
                assert_eq!(recovery.records, messages(1..8));
            });
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
        let err = run(open(config(&dir, SEGMENT_BYTES_DEFAULT))).expect_err("opened");
        match err {
            StorageError::Corrupt {
                path,
                offset,
                reason: Damage::Frame(CorruptReason::CrcMismatch { .. }),
            } => {
                assert_eq!(path, dir.segment(1));
                assert_eq!(offset, second_at as u64);
            }
            other => panic!("unexpected {other:?}"),
        }

        // A sealed segment that ends inside a record.
        std::fs::write(dir.segment(1), &first[..first.len() - 1]).expect("write");
        let err = run(open(config(&dir, SEGMENT_BYTES_DEFAULT))).expect_err("opened");
        assert!(
            matches!(
                err,
                StorageError::Corrupt {
                    reason: Damage::Torn,
                    ..
                }
            ),
            "{err:?}"
        );
        // Nothing was cut from either file.
        assert_eq!(dir.segment_len(1), first.len() as u64 - 1);
        assert_eq!(std::fs::read(dir.segment(2)).expect("read"), second);

        // Whole again, it opens.
        std::fs::write(dir.segment(1), &first).expect("write");
        let (_, recovery) = run(open(config(&dir, SEGMENT_BYTES_DEFAULT))).expect("open");
        assert_eq!(recovery.records, messages(1..9));
    }

    /// Offset of the body in a frame: after the length and the CRC.
    const RECORD_BODY_OFFSET: usize = imgate_core::log::RECORD_HEADER_LEN;

    #[test]
    fn a_missing_or_misnamed_segment_refuses_to_open() {
        let dir = TempDir::new("gap");
        std::fs::create_dir_all(&dir.0).expect("mkdir");
        std::fs::write(dir.segment(1), frames(&messages(1..2))).expect("write");
        std::fs::write(dir.segment(3), frames(&messages(2..3))).expect("write");
        let err = run(open(config(&dir, SEGMENT_BYTES_DEFAULT))).expect_err("opened");
        assert!(
            matches!(err, StorageError::MissingSegment { missing: 2, .. }),
            "{err:?}"
        );
        std::fs::remove_file(dir.segment(3)).expect("rm");
        std::fs::write(dir.0.join("7.seg"), b"").expect("write");
        let err = run(open(config(&dir, SEGMENT_BYTES_DEFAULT))).expect_err("opened");
        assert!(
            matches!(err, StorageError::BadSegmentName { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn reset_to_durable_leaves_exactly_the_synced_records() {
        for mode in MODES {
            let dir = TempDir::new("reset");
            let synced = messages(1..20);
            run(async {
                let (mut log, _) = open_mode(&dir, SEGMENT_BYTES_DEFAULT, mode).await;
                log.write(&frames(&synced)).await.expect("write");
                log.sync().await.expect("sync");
                let durable = log.durable_bytes();
                // More than a stage, so that unsynced bytes reach the file, then a sync
                // that ends inside a block and is followed by more writes.
                let big: Vec<Record> = (20..30).map(|seq| message(seq, 20_000)).collect();
                log.write(&frames(&big)).await.expect("write");
                assert!(written_bytes(&log) - durable > STAGE_BYTES as u64);
                assert_eq!(log.durable_bytes(), durable);
                log.reset_to_durable().await.expect("reset");
                assert_eq!(written_bytes(&log), durable);
                assert_eq!(dir.segment_len(1), durable);
                log.write(&frames(&messages(20..23))).await.expect("write");
                log.sync().await.expect("sync");
            });
            run(async {
                let (_, recovery) = open_mode(&dir, SEGMENT_BYTES_DEFAULT, mode).await;
                assert_eq!(recovery.records, messages(1..23));
            });
        }
    }

    #[test]
    fn after_a_failure_writes_wait_for_a_reset() {
        let dir = TempDir::new("poisoned");
        run(async {
            let (mut log, _) = open(config(&dir, SEGMENT_BYTES_DEFAULT))
                .await
                .expect("open");
            log.write(&frames(&messages(1..3))).await.expect("write");
            log.sync().await.expect("sync");
            log.write(&frames(&messages(3..4))).await.expect("write");
            // What a failed write or sync leaves behind (an I/O error cannot be provoked
            // on a healthy disk from inside one test process).
            log.needs_reset = true;
            assert!(matches!(
                log.write(&frames(&messages(4..5))).await,
                Err(StorageError::NeedsReset)
            ));
            assert!(matches!(log.sync().await, Err(StorageError::NeedsReset)));
            log.reset_to_durable().await.expect("reset");
            // Seq 3 again, as the engine hands it out after the failure, but another
            // message.
            log.write(&frames(&[message(3, 11)])).await.expect("write");
            log.close().await.expect("close");
        });
        run(async {
            let (_, recovery) = open(config(&dir, SEGMENT_BYTES_DEFAULT))
                .await
                .expect("open");
            let mut expected = messages(1..3);
            expected.push(message(3, 11));
            assert_ne!(expected, messages(1..4));
            assert_eq!(recovery.records, expected);
        });
    }

    #[test]
    fn a_write_dropped_halfway_must_be_reset_before_the_next_append() {
        let dir = TempDir::new("cancel");
        run(async {
            let (mut log, _) = open(config(&dir, SEGMENT_BYTES_DEFAULT))
                .await
                .expect("open");
            log.write(&frames(&messages(1..3))).await.expect("write");
            log.sync().await.expect("sync");
            // Larger than a stage, so the write has to wait for I/O: polled once, it has
            // staged part of its batch when it is dropped.
            let big: Vec<Record> = (3..13).map(|seq| message(seq, 20_000)).collect();
            let bytes = frames(&big);
            {
                let mut write = std::pin::pin!(log.write(&bytes));
                let waker = std::task::Waker::noop();
                let polled = write
                    .as_mut()
                    .poll(&mut std::task::Context::from_waker(waker));
                assert!(polled.is_pending());
            }
            assert!(matches!(
                log.write(&frames(&messages(3..4))).await,
                Err(StorageError::NeedsReset)
            ));
            log.reset_to_durable().await.expect("reset");
            log.write(&frames(&messages(3..4))).await.expect("write");
            log.close().await.expect("close");
        });
        run(async {
            let (_, recovery) = open(config(&dir, SEGMENT_BYTES_DEFAULT))
                .await
                .expect("open");
            assert_eq!(recovery.records, messages(1..4));
        });
    }

    #[test]
    fn segment_names_round_trip_and_reject_strangers() {
        assert_eq!(segment_name(1), "00000000000000000001.seg");
        assert_eq!(parse_segment_name(&segment_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_segment_name(&segment_name(42)), Some(42));
        assert_eq!(parse_segment_name(&segment_name(0)), None);
        assert_eq!(parse_segment_name("1.seg"), None);
        assert_eq!(parse_segment_name("0000000000000000000a.seg"), None);
        assert_eq!(parse_segment_name("00000000000000000001.log"), None);
    }

    // ---- The read index and LogReader ----

    fn conv_a() -> ConvId {
        ConvId::direct(UserId(3), UserId(9))
    }

    fn conv_b() -> ConvId {
        ConvId::group(7)
    }

    /// Message `seq` of `conv`, the same for the same arguments. Payload lengths vary so
    /// frames straddle blocks; every 17th of conversation A is larger than a reader's
    /// tail read, and B's message 50 larger than a whole coalesced read, so both rereads
    /// are exercised.
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

    /// The location the open segment's index holds for `seq` of `conv`, durable or not.
    fn location(log: &SegmentLog, conv: ConvId, seq: u64) -> Location {
        let index = log.read.index.borrow();
        let entry = &index.convs[&conv];
        entry.locations[(seq - entry.first.0) as usize]
    }

    /// Where durable message `seq` of `conv` is, in whichever segment.
    async fn located(reader: &LogReader, conv: ConvId, seq: u64) -> Location {
        let found = reader
            .locations(conv, Seq(seq), Seq(seq), 1)
            .await
            .expect("locations");
        assert_eq!(found.len(), 1, "message {seq} of {conv} is not indexed");
        found[0]
    }

    async fn read(
        reader: &LogReader,
        conv: ConvId,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Vec<StoredMessage> {
        reader
            .read(conv, Seq(from), Seq(to), limit)
            .await
            .expect("read")
    }

    /// The reads both tests of a full log make, before and after a reopen.
    async fn assert_reads_of_the_interleaved_log(reader: &LogReader, count: u64) {
        assert_eq!(
            read(reader, conv_a(), 1, count, 10_000).await,
            stored_range(conv_a(), 1..=count)
        );
        assert_eq!(
            read(reader, conv_b(), 1, count, 10_000).await,
            stored_range(conv_b(), 1..=count)
        );
        assert_eq!(
            read(reader, conv_a(), 30, 60, 100).await,
            stored_range(conv_a(), 30..=60)
        );
        // Beyond what exists: what there is, then nothing.
        assert_eq!(
            read(reader, conv_a(), count - 3, count + 50, 100).await,
            stored_range(conv_a(), count - 3..=count)
        );
        assert!(read(reader, conv_a(), count + 1, count + 9, 100)
            .await
            .is_empty());
        assert!(read(reader, ConvId::group(99), 1, 10, 100).await.is_empty());
        // A limit smaller than the range: the first `limit` of it.
        assert_eq!(
            read(reader, conv_b(), 10, 100, 5).await,
            stored_range(conv_b(), 10..=14)
        );
        // The large frame of B, alone and amid others.
        assert_eq!(
            read(reader, conv_b(), 50, 50, 1).await,
            stored_range(conv_b(), 50..=50)
        );
        assert_eq!(
            read(reader, conv_b(), 48, 52, 10).await,
            stored_range(conv_b(), 48..=52)
        );
        // Seq 0 is before the first message; an empty range or limit reads nothing.
        assert_eq!(
            read(reader, conv_a(), 0, 2, 10).await,
            stored_range(conv_a(), 1..=2)
        );
        assert!(read(reader, conv_a(), 5, 4, 10).await.is_empty());
        assert!(read(reader, conv_a(), 1, 10, 0).await.is_empty());
        assert_eq!(
            reader.index_stats().messages,
            2 * count,
            "{:?}",
            reader.index_stats()
        );
    }

    #[test]
    fn reads_return_a_conversations_durable_messages_across_segments_and_after_reopen() {
        for mode in MODES {
            let dir = TempDir::new("read");
            let count = 150;
            let segment_bytes = 8 * 1024;
            let records = interleaved(1..count + 1);
            run(async {
                let (mut log, _) = open_mode(&dir, segment_bytes, mode).await;
                for batch in records.chunks(7) {
                    log.write(&frames(batch)).await.expect("write");
                    log.sync().await.expect("sync");
                }
                let segments = log.segment.index;
                assert!(
                    segments > READER_OPEN_SEGMENTS_MAX as u64,
                    "only {segments} segments"
                );
                let reader = log.reader();
                // The range 30..=60 of A crosses segments.
                assert!(
                    located(&reader, conv_a(), 30).await.segment() + 1
                        < located(&reader, conv_a(), 60).await.segment()
                );
                assert_reads_of_the_interleaved_log(&reader, count).await;
                // Reading every segment kept only the newest handles open.
                assert_eq!(reader.state.files.borrow().len(), READER_OPEN_SEGMENTS_MAX);
                // Readers stay out of the page cache when the log does.
                for (_, file) in reader.state.files.borrow().iter() {
                    use std::os::fd::AsRawFd;
                    let expected = mode == IoMode::Direct && !is_on_tmpfs(&dir.0);
                    assert_eq!(fd_has_o_direct(file.file.as_raw_fd()), expected);
                    assert_eq!(file.align > 1, expected);
                }
                // A frame read alone, from no more than its header's length, grows the
                // read to the whole frame.
                let big = located(&reader, conv_b(), 50).await;
                let file = reader
                    .file(FileKey::Segment(big.segment()))
                    .await
                    .expect("open");
                let decoded = reader
                    .read_frame(&file, big, RECORD_BODY_OFFSET)
                    .await
                    .expect("read");
                assert_eq!(
                    reader
                        .expect_message(decoded, big, conv_b(), Seq(50))
                        .expect("message"),
                    stored(conv_b(), 50)
                );
                log.close().await.expect("close");
                // A reader outlives its log.
                assert_eq!(
                    read(&reader, conv_a(), 1, 3, 10).await,
                    stored_range(conv_a(), 1..=3)
                );
            });
            run(async {
                let (log, recovery) = open_mode(&dir, segment_bytes, mode).await;
                assert_eq!(recovery.records, records);
                let reader = log.reader();
                assert_reads_of_the_interleaved_log(&reader, count).await;
                let stats = reader.index_stats();
                assert_eq!(stats.conversations, 2);
                assert_eq!(stats.sealed_segments as u64, log.segment.index - 1);
                // Recovery shrinks the vectors to fit: 8 bytes a message.
                let index = log.read.index.borrow();
                let open = &index.convs[&conv_a()].locations;
                assert_eq!(open.capacity(), open.len());
                // Every sealed segment has its index file.
                for n in 1..log.segment.index {
                    assert!(dir.0.join(index_name(n)).is_file(), "no index file for {n}");
                }
            });
        }
    }

    #[test]
    fn a_read_of_scattered_messages_goes_out_in_several_windows_of_reads() {
        for mode in MODES {
            let dir = TempDir::new("read-windows");
            let count = 2 * READ_REQUESTS_INFLIGHT_MAX as u64 + 6;
            let other = ConvId::group(5);
            run(async {
                let (mut log, _) = open_mode(&dir, SEGMENT_BYTES_DEFAULT, mode).await;
                for seq in 1..=count {
                    // A message of B between each two of A, too large to read across.
                    let filler = StoredMessage {
                        payload: Bytes::from(vec![1; READ_SPAN_BYTES_MAX as usize]),
                        ..stored(other, seq)
                    };
                    let records = [
                        Record::Message(stored(conv_a(), seq)),
                        Record::Message(filler),
                    ];
                    log.write(&frames(&records)).await.expect("write");
                }
                log.sync().await.expect("sync");
                let reader = log.reader();
                let locations = reader
                    .locations(conv_a(), Seq(1), Seq(count), usize::MAX)
                    .await
                    .expect("locations");
                assert_eq!(plan_runs(&locations).len() as u64, count);
                assert_eq!(
                    read(&reader, conv_a(), 1, count, usize::MAX).await,
                    stored_range(conv_a(), 1..=count)
                );
                assert_eq!(
                    read(&reader, conv_a(), 30, 40, 5).await,
                    stored_range(conv_a(), 30..=34)
                );
            });
        }
    }

    #[test]
    fn unsynced_messages_are_not_read_and_a_reset_removes_them_from_the_index() {
        for mode in MODES {
            let dir = TempDir::new("read-reset");
            let other = ConvId::group(11);
            let replaced = |seq: u64| StoredMessage {
                payload: Bytes::from_static(b"sent again after the failure"),
                ..stored(conv_a(), seq)
            };
            run(async {
                let (mut log, _) = open_mode(&dir, SEGMENT_BYTES_DEFAULT, mode).await;
                let reader = log.reader();
                log.write(&frames(&interleaved(1..6))).await.expect("write");
                log.sync().await.expect("sync");
                let mut unsynced: Vec<Record> = (6..9)
                    .map(|seq| Record::Message(stored(conv_a(), seq)))
                    .collect();
                unsynced.push(Record::Message(stored(other, 1)));
                log.write(&frames(&unsynced)).await.expect("write");
                // Written, indexed, not served.
                assert_eq!(location(&log, conv_a(), 8).segment(), 1);
                assert_eq!(
                    read(&reader, conv_a(), 1, 100, 100).await,
                    stored_range(conv_a(), 1..=5)
                );
                assert!(read(&reader, other, 1, 1, 1).await.is_empty());
                assert_eq!(reader.index_stats().messages, 10);

                log.reset_to_durable().await.expect("reset");
                {
                    let index = log.read.index.borrow();
                    assert_eq!(index.convs[&conv_a()].locations.len(), 5);
                    assert!(!index.convs.contains_key(&other));
                    assert!(index.pending.is_empty());
                }
                // The engine hands seqs 6 and 7 out again, for other messages.
                let again: Vec<Record> = (6..8).map(|seq| Record::Message(replaced(seq))).collect();
                log.write(&frames(&again)).await.expect("write");
                log.sync().await.expect("sync");
                let mut expected = stored_range(conv_a(), 1..=5);
                expected.extend((6..8).map(replaced));
                assert_eq!(read(&reader, conv_a(), 1, 100, 100).await, expected);
                log.close().await.expect("close");
            });
            run(async {
                let (log, _) = open_mode(&dir, SEGMENT_BYTES_DEFAULT, mode).await;
                let mut expected = stored_range(conv_a(), 1..=5);
                expected.extend((6..8).map(replaced));
                assert_eq!(read(&log.reader(), conv_a(), 1, 100, 100).await, expected);
            });
        }
    }

    /// Rotation seals the segment, making every byte in it durable; if it sealed unsynced
    /// bytes, a reset could no longer remove them, and records the shard Nacked (and
    /// whose seqs it hands out again) would come back at recovery.
    #[test]
    fn a_segment_with_unsynced_bytes_is_not_sealed_so_a_reset_still_removes_them() {
        let dir = TempDir::new("no-seal-unsynced");
        let segment_bytes = 2 * 1024;
        let synced = messages(1..4);
        run(async {
            let (mut log, _) = open(config(&dir, segment_bytes)).await.expect("open");
            log.write(&frames(&synced)).await.expect("write");
            log.sync().await.expect("sync");
            log.write(&frames(&messages(4..5))).await.expect("write");
            // Does not fit the segment, but the segment holds an unsynced record.
            let over = frames(&messages(5..12));
            assert!(written_bytes(&log) + over.len() as u64 > segment_bytes);
            log.write(&over).await.expect("write");
            assert_eq!(log.segment.index, 1);
            // Then the sync fails, say: the shard Nacks 4..12 and resets.
            log.reset_to_durable().await.expect("reset");
            assert_eq!(written_bytes(&log), frames(&synced).len() as u64);
            // Seq 4 again; once synced, the next batch that does not fit rotates.
            log.write(&frames(&[message(4, 1_000)]))
                .await
                .expect("write");
            log.sync().await.expect("sync");
            assert_eq!(log.segment.index, 1);
            let next = frames(&messages(5..7));
            assert!(written_bytes(&log) + next.len() as u64 > segment_bytes);
            log.write(&next).await.expect("write");
            assert_eq!(log.segment.index, 2);
            log.sync().await.expect("sync");
            assert_eq!(location(&log, conv_a(), 5).segment(), 2);
        });
        run(async {
            let (_, recovery) = open(config(&dir, segment_bytes)).await.expect("open");
            let mut expected = synced.clone();
            expected.push(message(4, 1_000));
            expected.extend(messages(5..7));
            assert_eq!(recovery.records, expected);
        });
    }

    #[test]
    fn a_read_concurrent_with_writes_sees_exactly_the_durable_messages() {
        for mode in MODES {
            let dir = TempDir::new("read-concurrent");
            let batches = 60u64;
            let per_batch = 4u64;
            run(async {
                let (log, _) = open_mode(&dir, 16 * 1024, mode).await;
                let reader = log.reader();
                // Messages of A durable so far, as the writer knows it: set right after
                // each sync returns, with no await in between.
                let durable = Rc::new(std::cell::Cell::new(0u64));
                let done = Rc::new(std::cell::Cell::new(false));
                let writer = glommio::spawn_local({
                    let durable = durable.clone();
                    let done = done.clone();
                    async move {
                        let mut log = log;
                        for batch in 0..batches {
                            let seqs = batch * per_batch + 1..(batch + 1) * per_batch + 1;
                            let records = interleaved(seqs.clone());
                            let (first, second) = records.split_at(records.len() / 2);
                            log.write(&frames(first)).await.expect("write");
                            // Let the reader run while entries are pending.
                            futures_lite::future::yield_now().await;
                            log.write(&frames(second)).await.expect("write");
                            futures_lite::future::yield_now().await;
                            log.sync().await.expect("sync");
                            durable.set(seqs.end - 1);
                        }
                        done.set(true);
                        log
                    }
                });
                let mut reads = 0u64;
                let mut partial_reads = 0u64;
                let mut from = 1;
                while !done.get() {
                    // The index is read in the first poll of `read`, with no other task
                    // in between: exactly the messages durable now come back.
                    let known = durable.get();
                    let got = read(&reader, conv_a(), from, u64::MAX, 1_000).await;
                    let expected_len = (known + 1).saturating_sub(from);
                    assert_eq!(
                        got.len() as u64,
                        expected_len,
                        "from {from}, durable {known}"
                    );
                    assert_eq!(got, stored_range(conv_a(), from..=known));
                    reads += 1;
                    if known > 0 && known < batches * per_batch {
                        partial_reads += 1;
                    }
                    from = (from + 13) % known.max(1) + 1;
                    futures_lite::future::yield_now().await;
                }
                let log = writer.await;
                assert!(
                    partial_reads >= 10,
                    "{partial_reads} of {reads} reads ran amid writes"
                );
                let total = batches * per_batch;
                assert_eq!(
                    read(&reader, conv_a(), 1, total, 10_000).await,
                    stored_range(conv_a(), 1..=total)
                );
                assert!(log.segment.index > 2);
                log.close().await.expect("close");
            });
        }
    }

    #[test]
    fn a_damaged_or_misplaced_frame_fails_the_read_without_a_panic() {
        for mode in MODES {
            let dir = TempDir::new("read-damage");
            run(async {
                let (mut log, _) = open_mode(&dir, SEGMENT_BYTES_DEFAULT, mode).await;
                log.write(&frames(&interleaved(1..10)))
                    .await
                    .expect("write");
                log.sync().await.expect("sync");
                let reader = log.reader();
                let path = dir.segment(1);

                // A flipped bit in the body of A's message 2, behind the log's back.
                let at = location(&log, conv_a(), 2).offset() as usize + RECORD_BODY_OFFSET + 5;
                let mut bytes = std::fs::read(&path).expect("read");
                bytes[at] ^= 0x04;
                std::fs::write(&path, &bytes).expect("write");
                match reader.read(conv_a(), Seq(1), Seq(3), 10).await {
                    Err(StorageError::Corrupt {
                        reason: Damage::Frame(CorruptReason::CrcMismatch { .. }),
                        offset,
                        ..
                    }) => assert_eq!(offset, location(&log, conv_a(), 2).offset()),
                    other => panic!("unexpected {other:?}"),
                }
                assert_eq!(
                    read(&reader, conv_a(), 3, 4, 10).await,
                    stored_range(conv_a(), 3..=4)
                );

                // An index entry that points at another message.
                let b3 = location(&log, conv_b(), 3);
                log.read
                    .index
                    .borrow_mut()
                    .convs
                    .get_mut(&conv_a())
                    .expect("a")
                    .locations[3] = b3;
                match reader.read(conv_a(), Seq(4), Seq(4), 1).await {
                    Err(StorageError::Corrupt {
                        reason: Damage::Misplaced { conv, seq },
                        ..
                    }) => assert_eq!((conv, seq), (conv_a(), Seq(4))),
                    other => panic!("unexpected {other:?}"),
                }

                // An index entry past the end of the file.
                let past = Location::new(1, bytes.len() as u64 + 100);
                log.read
                    .index
                    .borrow_mut()
                    .convs
                    .get_mut(&conv_a())
                    .expect("a")
                    .locations[4] = past;
                assert!(matches!(
                    reader.read(conv_a(), Seq(5), Seq(5), 1).await,
                    Err(StorageError::Corrupt {
                        reason: Damage::Torn,
                        ..
                    })
                ));
                // A segment that is not there.
                let missing = Location::new(9, 0);
                log.read
                    .index
                    .borrow_mut()
                    .convs
                    .get_mut(&conv_a())
                    .expect("a")
                    .locations[5] = missing;
                assert!(matches!(
                    reader.read(conv_a(), Seq(6), Seq(6), 1).await,
                    Err(StorageError::Io { op: "open", .. })
                ));
            });
        }
    }

    #[test]
    fn a_seq_gap_in_the_log_refuses_to_open() {
        let dir = TempDir::new("seq-gap");
        std::fs::create_dir_all(&dir.0).expect("mkdir");
        let mut records = messages(1..3);
        records.extend(messages(4..5));
        std::fs::write(dir.segment(1), frames(&records)).expect("write");
        let err = run(open(config(&dir, SEGMENT_BYTES_DEFAULT))).expect_err("opened");
        assert!(
            matches!(
                err,
                StorageError::SeqGap {
                    last: Seq(2),
                    found: Seq(4),
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    #[should_panic(expected = "seqs must be consecutive")]
    fn writing_a_seq_gap_panics() {
        let dir = TempDir::new("write-gap");
        run(async {
            let (mut log, _) = open(config(&dir, SEGMENT_BYTES_DEFAULT))
                .await
                .expect("open");
            log.write(&frames(&messages(1..3))).await.expect("write");
            let _ = log.write(&frames(&messages(4..5))).await;
        });
    }

    #[test]
    fn what_the_index_cannot_name_is_refused() {
        let dir = TempDir::new("index-limit");
        let err = run(open(config(&dir, SEGMENT_BYTES_MAX + 1))).expect_err("opened");
        assert!(matches!(err, StorageError::InvalidConfig { .. }), "{err:?}");
        std::fs::create_dir_all(&dir.0).expect("mkdir");
        std::fs::write(dir.segment(SEGMENT_INDEX_MAX + 1), b"").expect("write");
        let err = run(open(config(&dir, SEGMENT_BYTES_DEFAULT))).expect_err("opened");
        assert!(
            matches!(
                err,
                StorageError::IndexLimit {
                    what: "segment index",
                    ..
                }
            ),
            "{err:?}"
        );
        std::fs::remove_file(dir.segment(SEGMENT_INDEX_MAX + 1)).expect("rm");
        std::fs::write(dir.segment(SEGMENT_INDEX_MAX), b"").expect("write");
        run(async {
            let (mut log, _) = open(config(&dir, 1)).await.expect("open");
            log.write(&frames(&messages(1..2))).await.expect("write");
            log.sync().await.expect("sync");
            // The next write must rotate, to a segment the index cannot name.
            let err = log
                .write(&frames(&messages(2..3)))
                .await
                .expect_err("rotated");
            assert!(
                matches!(
                    err,
                    StorageError::IndexLimit {
                        what: "segment index",
                        ..
                    }
                ),
                "{err:?}"
            );
            log.reset_to_durable().await.expect("reset");
            assert_eq!(
                read(&log.reader(), conv_a(), 1, 5, 5).await,
                vec![match message(1, 50 + 37) {
                    Record::Message(m) => m,
                    _ => unreachable!(),
                }]
            );
        });
    }

    /// One message of each of `count` conversations (groups 1..=count), `per` a batch.
    async fn one_message_each(log: &mut SegmentLog, count: u64, per: usize) {
        let records: Vec<Record> = (1..=count)
            .map(|g| Record::Message(stored(ConvId::group(g), 1)))
            .collect();
        for batch in records.chunks(per) {
            log.write(&frames(batch)).await.expect("write");
            log.sync().await.expect("sync");
        }
    }

    /// What issue 10 found: the index grew by ~120 bytes for every conversation ever
    /// written. Now only the open segment's conversations cost that; a sealed segment's
    /// cost a bloom filter's ~10 bits and its file's block keys.
    #[test]
    fn the_index_in_memory_stays_small_however_many_conversations_were_written() {
        let dir = TempDir::new("index-memory");
        let count = 20_000;
        run(async {
            let (mut log, _) = open_mode(&dir, 64 * 1024, IoMode::Buffered).await;
            one_message_each(&mut log, count, 100).await;
            let reader = log.reader();
            let stats = reader.index_stats();
            assert_eq!(stats.messages, count);
            assert!(stats.sealed_segments > 20, "{stats:?}");
            // The open segment holds at most 64 KiB of records, a few hundred messages.
            assert!(stats.conversations < 1_000, "{stats:?}");
            let per_conversation = stats.heap_bytes as f64 / count as f64;
            assert!(
                per_conversation < 12.0,
                "{per_conversation} bytes each: {stats:?}"
            );
            // Every conversation is still found: its head and its message.
            for g in [1, 777, count / 2, count - 1, count] {
                let conv = ConvId::group(g);
                assert_eq!(reader.last_durable_seq(conv).await.expect("load"), Seq(1));
                assert_eq!(read(&reader, conv, 1, 1, 1).await, vec![stored(conv, 1)]);
            }
            for g in [count + 1, count + 2, u64::MAX] {
                let conv = ConvId::group(g);
                assert_eq!(
                    reader.last_durable_seq(conv).await.expect("load"),
                    Seq::ZERO
                );
                assert!(read(&reader, conv, 1, 10, 10).await.is_empty());
            }
        });
    }

    #[test]
    fn a_segment_is_sealed_at_its_message_bound_too() {
        let dir = TempDir::new("segment-messages");
        run(async {
            let config = LogConfig {
                segment_messages: 10,
                ..config(&dir, SEGMENT_BYTES_DEFAULT)
            };
            let (mut log, _) = open_with_mode(config, IoMode::Buffered)
                .await
                .expect("open");
            for batch in messages(1..36).chunks(1) {
                log.write(&frames(batch)).await.expect("write");
                log.sync().await.expect("sync");
            }
            assert_eq!(log.segment.index, 4);
            let stats = log.reader().index_stats();
            assert_eq!((stats.sealed_segments, stats.messages), (3, 35));
            assert_eq!(log.read.index.borrow().messages, 5);
            assert_eq!(read(&log.reader(), conv_a(), 1, 35, 100).await.len(), 35);
        });
    }

    #[test]
    fn the_last_durable_seq_is_found_in_the_open_segment_or_the_newest_sealed_one() {
        for mode in MODES {
            let dir = TempDir::new("last-durable");
            let count = 150;
            run(async {
                let (mut log, _) = open_mode(&dir, 8 * 1024, mode).await;
                let records = interleaved(1..count + 1);
                for batch in records.chunks(7) {
                    log.write(&frames(batch)).await.expect("write");
                    log.sync().await.expect("sync");
                }
                // A conversation written once, early: only in a sealed segment.
                let early = ConvId::group(77);
                let reader = log.reader();
                assert_eq!(
                    reader.last_durable_seq(early).await.expect("load"),
                    Seq::ZERO
                );
                // Unsynced: not durable, not reported.
                log.write(&frames(&[Record::Message(stored(conv_a(), count + 1))]))
                    .await
                    .expect("write");
                for conv in [conv_a(), conv_b()] {
                    assert_eq!(
                        reader.last_durable_seq(conv).await.expect("load"),
                        Seq(count)
                    );
                }
                log.sync().await.expect("sync");
                assert_eq!(
                    reader.last_durable_seq(conv_a()).await.expect("load"),
                    Seq(count + 1)
                );
                log.close().await.expect("close");
            });
            run(async {
                let (log, _) = open_mode(&dir, 8 * 1024, mode).await;
                let reader = log.reader();
                assert_eq!(
                    reader.last_durable_seq(conv_a()).await.expect("load"),
                    Seq(count + 1)
                );
                assert_eq!(
                    reader.last_durable_seq(conv_b()).await.expect("load"),
                    Seq(count)
                );
            });
        }
    }

    #[test]
    fn a_missing_or_damaged_index_file_is_rebuilt_at_recovery() {
        let dir = TempDir::new("index-rebuilt");
        let count = 150;
        let segment_bytes = 8 * 1024;
        let sealed = run(async {
            let (mut log, _) = open_mode(&dir, segment_bytes, IoMode::Buffered).await;
            for batch in interleaved(1..count + 1).chunks(7) {
                log.write(&frames(batch)).await.expect("write");
                log.sync().await.expect("sync");
            }
            let sealed = log.segment.index - 1;
            assert!(sealed >= 3);
            log.close().await.expect("close");
            sealed
        });
        let files: Vec<Vec<u8>> = (1..=sealed)
            .map(|n| std::fs::read(dir.0.join(index_name(n))).expect("index file"))
            .collect();
        // A crash between sealing and indexing; a flipped bit; a file cut short.
        std::fs::remove_file(dir.0.join(index_name(1))).expect("remove");
        let mut flipped = files[1].clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x10;
        std::fs::write(dir.0.join(index_name(2)), &flipped).expect("write");
        std::fs::write(dir.0.join(index_name(3)), &files[2][..files[2].len() / 2]).expect("write");
        run(async {
            let (log, _) = open_mode(&dir, segment_bytes, IoMode::Buffered).await;
            assert_reads_of_the_interleaved_log(&log.reader(), count).await;
        });
        for n in 1..=sealed {
            let now = std::fs::read(dir.0.join(index_name(n))).expect("index file");
            assert_eq!(now, files[n as usize - 1], "index file {n} was not rebuilt");
        }
    }

    #[test]
    fn locations_pack_segment_and_offset_into_eight_bytes() {
        assert_eq!(std::mem::size_of::<Location>(), 8);
        for (segment, offset) in [(1, 0), (7, 12_345), (SEGMENT_INDEX_MAX, RECORD_OFFSET_MAX)] {
            let location = Location::new(segment, offset);
            assert_eq!((location.segment(), location.offset()), (segment, offset));
        }
    }

    #[test]
    #[should_panic(expected = "does not fit a location")]
    fn a_location_past_the_segment_bound_panics() {
        Location::new(SEGMENT_INDEX_MAX + 1, 0);
    }

    #[test]
    #[should_panic(expected = "does not fit a location")]
    fn a_location_past_the_offset_bound_panics() {
        Location::new(1, RECORD_OFFSET_MAX + 1);
    }
}
