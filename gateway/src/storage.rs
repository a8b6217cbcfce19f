//! The log's I/O: one shard's log directory on local disk, on glommio's files, performing
//! the operations of core's log engine ([`imgate_core::log_engine`]).
//!
//! Every durability decision is the engine's: what to write where, when to sync, when a
//! segment is sealed, how a failed write is undone, what recovery keeps and cuts, where a
//! read looks, what retention removes. This module decides none of it. [`LogExecutor`]
//! performs each [`Op`] on the files of the log directory exactly as the engine's driver
//! contract says (several may run at once), and reports a [`Completion`] or an
//! [`IoError`]:
//!
//! - `List`: the names and lengths of the regular files in the directory, which is created
//!   first if missing (`create_dir_all`, then an fsync of its parent).
//! - `Create(f)`: opens `f` with create and truncate, then fsyncs the directory. A segment
//!   is opened for writing as a [`DmaFile`] (O_DIRECT) when the filesystem takes O_DIRECT,
//!   else as a [`BufferedFile`]; index and summary files always as a [`BufferedFile`].
//!   Write handles stay cached; creating a segment closes those of every other file (the
//!   engine is done writing them), and an index or summary file's handle is closed once
//!   it is synced (the engine writes each once, then syncs it).
//! - `Write { file, at, bytes }`: all of `bytes` at `at`. A segment write with O_DIRECT is
//!   aligned to [`LogExecutor::align`] in position and length (the engine pads it; the
//!   executor refuses one that is not); its bytes are copied into a DMA buffer. A short
//!   write is an error.
//! - `Sync(f)`: fdatasync through `f`'s write handle (opened if none is cached). Several
//!   may be in flight on one file at once: that is the engine's pipelined group commit,
//!   and each covers every write that completed before it started.
//! - `Truncate { file, len }`: truncate, then fdatasync.
//! - `Read { file, at, len }`: through read-only handles ([`ReadFile`], at most
//!   [`READER_OPEN_SEGMENTS_MAX`] open, the least recently used closed first), in steps of
//!   at most [`READ_STEP_BYTES`] (recovery reads whole segments); fewer bytes than asked
//!   only where the file ends (a step that comes back short).
//! - `Remove(f)`: drops `f`'s cached handles, unlinks it, fsyncs the directory.
//!
//! Errors map from the operating system's error number: ENOSPC is [`IoError::NoSpace`],
//! ENOENT [`IoError::NotFound`], anything else (EIO, a short write, ...) [`IoError::Io`].
//! Each failure is logged with the operation, the file and the error; what to do about it
//! is the engine's call (it resets after a failed write or sync, retries reads, and stops
//! the log when it cannot go on).
//!
//! [`LogExecutor::run_to_idle`] runs an engine on an executor one operation at a time,
//! which is what recovery does anyway; the runtime performs each operation of a running
//! log in a task of its own, so that writes, syncs and reads overlap.
//!
//! # Direct I/O
//!
//! Whether the log writes with O_DIRECT is decided once, when the executor opens the
//! directory ([`LogExecutor::open`]): it opens a probe file there as a [`DmaFile`]. If the
//! filesystem refuses O_DIRECT (EINVAL), the log falls back to buffered writes
//! ([`BufferedFile`] and fdatasync) and logs a warning; durability is the same, only the
//! page cache is in the way. Writes are then aligned to 1 ([`LogExecutor::align`]), else
//! to [`DIRECT_ALIGN_MIN`] (4 KiB), which the engine takes as its `LogConfig::align`. On
//! tmpfs glommio itself opens DMA files without O_DIRECT; writes stay aligned there.
//!
//! With O_DIRECT a write that ends inside a block writes that block padded with zeros,
//! and the engine's next write rewrites it with the old bytes, the new ones and fresh
//! padding. So after a crash a segment may end in zeros, which the engine's recovery cuts
//! off. Rewriting a block that holds durable bytes is safe even if the rewrite is torn:
//! every sector of the block carries the same durable bytes in its old and new version.
//! For the same reason a read of that block while it is rewritten sees the durable bytes
//! intact. DMA buffers are not zeroed by glommio; the engine hands over the padding
//! zeroed, and the executor copies every byte of it.
//!
//! # glommio caveats (0.9.0)
//!
//! - glommio's `DmaStreamWriter` is not used: its `sync` writes its whole staging buffer,
//!   with uninitialised memory (not zeros) past the data, and it always starts at offset 0,
//!   so it could neither continue a segment after a restart nor keep stale bytes out of
//!   the tail. Writes here are plain positioned [`DmaFile::write_at`]s.
//! - glommio decides once per device and thread whether DMA files go to its polled ring,
//!   by reading the first block of the first DMA file opened on that thread. A freshly
//!   created, empty file answers that read without reaching the device, the device is
//!   then taken to support polling, and every later O_DIRECT read on it fails with
//!   EOPNOTSUPP (seen on this machine's virtio disk). The probe file is therefore given a
//!   block of zeros before it is opened, so that the probe's read reaches the device and
//!   gets the true answer; and readers never use [`DmaFile`] anyway (see [`ReadFile`]).
//! - `DmaFile::read_at` may return, near the end of a file, up to `pos % alignment` bytes
//!   past what the kernel read; [`ReadFile`] aligns its reads itself instead.
//! - glommio opens directories by absolute path only; the executor makes its directory
//!   absolute.
//!
//! Architecture invariant: the executor keeps no state about the log's contents. Its only
//! state is open handles (write handles by file, at most [`WRITER_OPEN_FILES_MAX`]; read
//! handles, at most [`READER_OPEN_SEGMENTS_MAX`]; the directory's), and dropping any of
//! them changes nothing but the cost of the next operation.

use bytes::Bytes;
use glommio::io::{BufferedFile, Directory, DmaFile, OpenOptions, ReadResult};
use glommio::GlommioError;
use imgate_core::log_engine::{Completion, FileId, IoError, LogEngine, LogEvent, Op};
use imgate_core::Instant;
use std::cell::RefCell;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Smallest alignment of O_DIRECT writes: 4 KiB. glommio reports the device's logical
/// block (512 bytes on this machine's virtio disk), but its physical block is 4 KiB, as on
/// most current disks, and a write of less than a physical block makes the device
/// read, modify and write it. 4 KiB is a multiple of every logical block size in use.
pub const DIRECT_ALIGN_MIN: u64 = 4096;

/// Most bytes one read request asks for: 1 MiB. Recovery reads whole segments (the
/// engine scans a segment at once); reading them in steps keeps any one io_uring request,
/// and its temporary buffer, small.
pub const READ_STEP_BYTES: usize = 1024 * 1024;

/// Most files the executor keeps open for reading (segments and index files): 16.
/// Reopening a file costs an openat through io_uring; history reads mostly hit the few
/// newest segments, so a small cache serves most reads, and the bound keeps a shard's file
/// descriptors few.
pub const READER_OPEN_SEGMENTS_MAX: usize = 16;

/// Most write handles kept open: 4. The engine writes one segment at a time, and a
/// sealed segment's index and summary files only while it seals it; a handle dropped
/// from the cache is reopened if the engine writes the file again.
pub const WRITER_OPEN_FILES_MAX: usize = 4;

/// The file the executor opens with O_DIRECT to learn whether the filesystem takes it. Its
/// suffix is none of the log's, so the engine ignores it if a crash leaves it behind.
const PROBE_FILE: &str = "o-direct.probe";

/// How segment files are written, decided once at [`LogExecutor::open`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IoMode {
    /// O_DIRECT through [`DmaFile`].
    Direct,
    /// The page cache through [`BufferedFile`]: the filesystem refused O_DIRECT, or the
    /// caller asked for it ([`LogExecutor::open_with_mode`]: tests of this path, and
    /// comparisons).
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

/// Unwraps glommio's error into the operating system's, keeping its raw error number.
fn os_error(err: GlommioError<()>) -> io::Error {
    match err {
        GlommioError::IoError(source) | GlommioError::EnhancedIoError { source, .. } => source,
        other => io::Error::from(other),
    }
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

/// A file opened for writing.
#[derive(Debug)]
enum WriteFile {
    Direct(DmaFile),
    Buffered(BufferedFile),
}

impl WriteFile {
    /// Opens `path` for reading and writing; `create`: creates it, or truncates it.
    async fn open(path: &Path, direct: bool, create: bool) -> Result<Self, GlommioError<()>> {
        let mut options = OpenOptions::new();
        options
            .read(true)
            .write(true)
            .create(create)
            .truncate(create);
        Ok(if direct {
            WriteFile::Direct(options.dma_open(path).await?)
        } else {
            WriteFile::Buffered(options.buffered_open(path).await?)
        })
    }

    /// Writes all of `data` at `pos`. With O_DIRECT both must be aligned to `align`.
    async fn write(&self, data: &[u8], pos: u64, align: u64) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let written = match self {
            WriteFile::Direct(file) => {
                if !pos.is_multiple_of(align) || !(data.len() as u64).is_multiple_of(align) {
                    // The engine pads and aligns every segment write: this is a bug.
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "an O_DIRECT write of {} bytes at {pos} is not aligned to {align}",
                            data.len()
                        ),
                    ));
                }
                let mut buffer = file.alloc_dma_buffer(data.len());
                buffer.as_bytes_mut().copy_from_slice(data);
                file.write_at(buffer, pos).await.map_err(os_error)?
            }
            WriteFile::Buffered(file) => {
                file.write_at(data.to_vec(), pos).await.map_err(os_error)?
            }
        };
        if written != data.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {written} of {} bytes at {pos}", data.len()),
            ));
        }
        Ok(())
    }

    async fn fdatasync(&self) -> io::Result<()> {
        match self {
            WriteFile::Direct(file) => file.fdatasync().await,
            WriteFile::Buffered(file) => file.fdatasync().await,
        }
        .map_err(os_error)
    }

    async fn truncate(&self, len: u64) -> io::Result<()> {
        match self {
            WriteFile::Direct(file) => file.truncate(len).await,
            WriteFile::Buffered(file) => file.truncate(len).await,
        }
        .map_err(os_error)
    }

    async fn close(self) -> Result<(), GlommioError<()>> {
        match self {
            WriteFile::Direct(file) => file.close().await,
            WriteFile::Buffered(file) => file.close().await,
        }
    }

    #[cfg(test)]
    fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            WriteFile::Direct(file) => file.as_raw_fd(),
            WriteFile::Buffered(file) => file.as_raw_fd(),
        }
    }
}

/// A file opened for reading.
///
/// Always a [`BufferedFile`] handle, which glommio reads through its main io_uring ring,
/// opened with O_DIRECT when the log writes with it. Not a [`DmaFile`], for the polled-ring
/// caveat in the module docs. O_DIRECT here keeps reads out of the page cache, so that
/// buffered reads never race the writer's direct writes of the same block (the kernel's
/// invalidation of cached pages after a direct write is best effort). glommio hands
/// `read_at` a buffer aligned to 4 KiB (its buffer allocations are), and the reads are
/// aligned to [`DIRECT_ALIGN_MIN`] here. Index and summary files, written buffered, are
/// read the same way: an O_DIRECT read writes back dirty cached pages of its range first.
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

    /// Reads `len` bytes at `pos` in one request, fewer only where the file ends first (a
    /// regular file's read comes back short only at its end).
    async fn read(&self, pos: u64, len: usize) -> Result<FileBytes, GlommioError<()>> {
        let aligned_pos = align_down(pos, self.align);
        // The casts are lossless: both are below `align` plus `len`, at most a read step.
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

/// Bytes read from a file: `len` bytes of `buffer` from `start`, all of them read from the
/// file.
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

/// Closes `file` if the cache held its last handle; otherwise glommio closes it when the
/// operation still using it drops it.
async fn close_write_handle(dir: &Path, id: FileId, file: Rc<WriteFile>) {
    if let Ok(file) = Rc::try_unwrap(file) {
        if let Err(err) = file.close().await {
            tracing::warn!(path = %dir.join(id.name()).display(), error = %os_error(err), "closing a log file failed");
        }
    }
}

/// Performs the log engine's operations on one shard's log directory. See the module docs.
///
/// Not `Send`: it lives on its shard's executor. Every method takes `&self`, so operations
/// run concurrently from tasks sharing it through an `Rc`; no borrow of its caches is held
/// across an await.
#[derive(Debug)]
pub struct LogExecutor {
    dir: PathBuf,
    mode: IoMode,
    align: u64,
    /// The directory's handle, for fsyncs, opened on first use.
    directory: RefCell<Option<Rc<Directory>>>,
    /// Write handles, the most recently used last; at most [`WRITER_OPEN_FILES_MAX`].
    writers: RefCell<Vec<(FileId, Rc<WriteFile>)>>,
    /// Read handles, the most recently used last; at most [`READER_OPEN_SEGMENTS_MAX`].
    readers: RefCell<Vec<(FileId, Rc<ReadFile>)>>,
}

impl LogExecutor {
    /// Opens the log directory `dir` (created, durably, if missing) and learns whether its
    /// filesystem takes O_DIRECT: segments are written with it if so, buffered if not (a
    /// warning says so).
    pub async fn open(dir: PathBuf) -> Result<LogExecutor, StorageError> {
        LogExecutor::open_with_mode(dir, IoMode::Direct).await
    }

    /// [`LogExecutor::open`], trying `wanted` first: [`IoMode::Buffered`] skips O_DIRECT
    /// altogether.
    pub(crate) async fn open_with_mode(
        dir: PathBuf,
        wanted: IoMode,
    ) -> Result<LogExecutor, StorageError> {
        let dir = std::path::absolute(&dir).map_err(|source| StorageError::Io {
            op: "resolve",
            path: dir.clone(),
            source,
        })?;
        ensure_dir(&dir).await.map_err(|source| StorageError::Io {
            op: "create directory",
            path: dir.clone(),
            source,
        })?;
        let (mode, align) = match wanted {
            IoMode::Direct => match probe_direct_io(&dir).await? {
                Some(align) => (IoMode::Direct, align),
                None => (IoMode::Buffered, 1),
            },
            IoMode::Buffered => (IoMode::Buffered, 1),
        };
        Ok(LogExecutor {
            dir,
            mode,
            align,
            directory: RefCell::new(None),
            writers: RefCell::new(Vec::new()),
            readers: RefCell::new(Vec::new()),
        })
    }

    /// The alignment of segment writes: the engine's `LogConfig::align`. 4 KiB with
    /// O_DIRECT, 1 without.
    pub fn align(&self) -> u64 {
        self.align
    }

    /// Whether segments are written with O_DIRECT (`false`: buffered fallback).
    pub fn is_direct(&self) -> bool {
        self.mode == IoMode::Direct
    }

    /// Performs `op` (see the module docs for what each does). A failure is logged here and
    /// reported as the engine's [`IoError`].
    pub async fn perform(&self, op: &Op) -> Result<Completion, IoError> {
        let result = match op {
            Op::List => self.list().await.map(Completion::Listed),
            Op::Create(file) => self.create(*file).await.map(|()| Completion::Done),
            Op::Write { file, at, bytes } => self
                .write(*file, *at, bytes)
                .await
                .map(|()| Completion::Done),
            Op::Sync(file) => self.sync(*file).await.map(|()| Completion::Done),
            Op::Truncate { file, len } => {
                self.truncate(*file, *len).await.map(|()| Completion::Done)
            }
            Op::Read { file, at, len } => self.read(*file, *at, *len).await.map(Completion::Read),
            Op::Remove(file) => self.remove(*file).await.map(|()| Completion::Done),
        };
        result.map_err(|err| {
            let error = io_error_of(&err);
            let path = op_file(op).map_or_else(|| self.dir.clone(), |f| self.dir.join(f.name()));
            let op = op_name(op);
            if error == IoError::NotFound {
                // A read racing retention's removal, say: the engine retries it.
                tracing::warn!(op, path = %path.display(), error = %err, "log operation failed");
            } else {
                tracing::error!(op, path = %path.display(), error = %err, "log operation failed");
            }
            error
        })
    }

    /// Performs `engine`'s operations one at a time, in the order it issues them, until it
    /// has none left, and returns the events it emitted meanwhile, in order. Recovery's
    /// operations come one at a time anyway; once a shard runs, the runtime performs each
    /// operation in a task of its own instead, and hands each event to the shard at once.
    pub async fn run_to_idle(
        &self,
        engine: &mut LogEngine,
        now: impl Fn() -> Instant,
    ) -> Vec<LogEvent> {
        let mut events = Vec::new();
        loop {
            events.extend(std::iter::from_fn(|| engine.poll_event()));
            let Some(io) = engine.poll_io() else {
                return events;
            };
            let result = self.perform(&io.op).await;
            engine.handle_completion(now(), io.id, result);
        }
    }

    fn path(&self, file: FileId) -> PathBuf {
        self.dir.join(file.name())
    }

    /// Whether `file` is written with O_DIRECT: segments, when the log is.
    fn is_direct_file(&self, file: FileId) -> bool {
        self.mode == IoMode::Direct && matches!(file, FileId::Segment(_))
    }

    async fn list(&self) -> io::Result<Vec<(String, u64)>> {
        ensure_dir(&self.dir).await?;
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

    async fn create(&self, file: FileId) -> io::Result<()> {
        self.forget(file).await;
        let handle = WriteFile::open(&self.path(file), self.is_direct_file(file), true)
            .await
            .map_err(os_error)?;
        self.sync_dir().await?;
        if let FileId::Segment(_) = file {
            // The engine writes one segment at a time: whatever else it wrote is done.
            let others: Vec<_> = std::mem::take(&mut *self.writers.borrow_mut());
            for (id, other) in others {
                close_write_handle(&self.dir, id, other).await;
            }
        }
        self.cache_writer(file, Rc::new(handle)).await;
        Ok(())
    }

    async fn write(&self, file: FileId, at: u64, bytes: &[u8]) -> io::Result<()> {
        let handle = self.writer(file).await?;
        handle.write(bytes, at, self.align).await
    }

    async fn sync(&self, file: FileId) -> io::Result<()> {
        let handle = self.writer(file).await?;
        handle.fdatasync().await?;
        drop(handle);
        if !matches!(file, FileId::Segment(_)) {
            // An index or summary file is written once and synced last: done with it.
            let cached = {
                let mut writers = self.writers.borrow_mut();
                let at = writers.iter().position(|(id, _)| *id == file);
                at.map(|at| writers.remove(at))
            };
            if let Some((id, handle)) = cached {
                close_write_handle(&self.dir, id, handle).await;
            }
        }
        Ok(())
    }

    async fn truncate(&self, file: FileId, len: u64) -> io::Result<()> {
        let handle = self.writer(file).await?;
        handle.truncate(len).await?;
        handle.fdatasync().await
    }

    async fn read(&self, file: FileId, at: u64, len: usize) -> io::Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let handle = self.reader(file).await?;
        let mut bytes = Vec::with_capacity(len.min(READ_STEP_BYTES));
        while bytes.len() < len {
            let want = (len - bytes.len()).min(READ_STEP_BYTES);
            let got = handle
                .read(at + bytes.len() as u64, want)
                .await
                .map_err(os_error)?;
            let got = got.as_slice();
            bytes.extend_from_slice(got);
            if got.len() < want {
                // The file ends here.
                break;
            }
        }
        Ok(Bytes::from(bytes))
    }

    async fn remove(&self, file: FileId) -> io::Result<()> {
        self.forget(file).await;
        glommio::io::remove(self.path(file))
            .await
            .map_err(os_error)?;
        self.sync_dir().await
    }

    /// fsyncs the directory, so that the entries created or removed in it are durable.
    async fn sync_dir(&self) -> io::Result<()> {
        let cached = self.directory.borrow().clone();
        let directory = match cached {
            Some(directory) => directory,
            None => {
                let opened = Rc::new(Directory::open(&self.dir).await.map_err(os_error)?);
                self.directory.borrow_mut().get_or_insert(opened).clone()
            }
        };
        directory.sync().await.map_err(os_error)
    }

    /// Drops every cached handle of `file` (it is about to be created anew or removed).
    async fn forget(&self, file: FileId) {
        let writer = {
            let mut writers = self.writers.borrow_mut();
            let at = writers.iter().position(|(id, _)| *id == file);
            at.map(|at| writers.remove(at))
        };
        if let Some((id, handle)) = writer {
            close_write_handle(&self.dir, id, handle).await;
        }
        let reader = {
            let mut readers = self.readers.borrow_mut();
            let at = readers.iter().position(|(id, _)| *id == file);
            at.map(|at| readers.remove(at))
        };
        if let Some((id, handle)) = reader {
            self.close_reader(id, handle).await;
        }
    }

    /// The write handle of `file`: cached, or the existing file opened (not created).
    async fn writer(&self, file: FileId) -> io::Result<Rc<WriteFile>> {
        if let Some(handle) = self.cached_writer(file) {
            return Ok(handle);
        }
        let opened = WriteFile::open(&self.path(file), self.is_direct_file(file), false)
            .await
            .map_err(os_error)?;
        // Another operation may have opened it meanwhile: keep one handle.
        if let Some(handle) = self.cached_writer(file) {
            if let Err(err) = opened.close().await {
                tracing::warn!(path = %self.path(file).display(), error = %os_error(err), "closing a log file failed");
            }
            return Ok(handle);
        }
        let handle = Rc::new(opened);
        self.cache_writer(file, handle.clone()).await;
        Ok(handle)
    }

    fn cached_writer(&self, file: FileId) -> Option<Rc<WriteFile>> {
        let mut writers = self.writers.borrow_mut();
        let at = writers.iter().position(|(id, _)| *id == file)?;
        let entry = writers.remove(at);
        let handle = entry.1.clone();
        writers.push(entry);
        Some(handle)
    }

    /// Caches `handle` as `file`'s (replacing any other), closing the least recently used
    /// handle if the cache is full.
    async fn cache_writer(&self, file: FileId, handle: Rc<WriteFile>) {
        let evicted = {
            let mut writers = self.writers.borrow_mut();
            let replaced = writers
                .iter()
                .position(|(id, _)| *id == file)
                .map(|at| writers.remove(at));
            writers.push((file, handle));
            let oldest = (writers.len() > WRITER_OPEN_FILES_MAX).then(|| writers.remove(0));
            [replaced, oldest]
        };
        for (id, old) in evicted.into_iter().flatten() {
            close_write_handle(&self.dir, id, old).await;
        }
    }

    /// A read handle on `file`, from the cache or newly opened (then cached, the least
    /// recently used one closed if the cache is full).
    async fn reader(&self, file: FileId) -> io::Result<Rc<ReadFile>> {
        if let Some(handle) = self.cached_reader(file) {
            return Ok(handle);
        }
        let opened = ReadFile::open(&self.path(file), self.mode)
            .await
            .map_err(os_error)?;
        // Another read may have opened the same file meanwhile: keep one handle.
        let (handle, spare) = match self.cached_reader(file) {
            Some(handle) => (handle, Some((file, Rc::new(opened)))),
            None => {
                let handle = Rc::new(opened);
                let mut readers = self.readers.borrow_mut();
                readers.push((file, handle.clone()));
                let evicted = (readers.len() > READER_OPEN_SEGMENTS_MAX).then(|| readers.remove(0));
                (handle, evicted)
            }
        };
        if let Some((id, spare)) = spare {
            self.close_reader(id, spare).await;
        }
        Ok(handle)
    }

    fn cached_reader(&self, file: FileId) -> Option<Rc<ReadFile>> {
        let mut readers = self.readers.borrow_mut();
        let at = readers.iter().position(|(id, _)| *id == file)?;
        let entry = readers.remove(at);
        let handle = entry.1.clone();
        readers.push(entry);
        Some(handle)
    }

    /// Closes a read handle if nothing else holds it; a handle still used by a read in
    /// flight is closed by glommio when that read drops it.
    async fn close_reader(&self, file: FileId, handle: Rc<ReadFile>) {
        if let Ok(handle) = Rc::try_unwrap(handle) {
            if let Err(err) = handle.close().await {
                tracing::warn!(path = %self.path(file).display(), error = %os_error(err), "closing a file opened for reading failed");
            }
        }
    }
}

/// Creates `dir` if it is missing, and makes its entry durable (an fsync of its parent).
async fn ensure_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        let handle = Directory::open(parent).await.map_err(os_error)?;
        handle.sync().await.map_err(os_error)?;
        handle.close().await.map_err(os_error)?;
    }
    Ok(())
}

/// Opens a probe file in `dir` with O_DIRECT: `Some(alignment of segment writes)` if the
/// filesystem takes it, `None` (and a warning) if it refuses (EINVAL).
async fn probe_direct_io(dir: &Path) -> Result<Option<u64>, StorageError> {
    let path = dir.join(PROBE_FILE);
    let failed = |op: &'static str, source: io::Error| StorageError::Io {
        op,
        path: path.clone(),
        source,
    };
    // A block of data, so that glommio's polled-ring probe reads from the device (module
    // docs).
    std::fs::write(&path, [0u8; DIRECT_ALIGN_MIN as usize]).map_err(|e| failed("write", e))?;
    let opened = OpenOptions::new()
        .read(true)
        .write(true)
        .dma_open(&path)
        .await;
    let result = match opened {
        Ok(file) => {
            let align = file.alignment().max(DIRECT_ALIGN_MIN);
            assert!(align.is_power_of_two(), "O_DIRECT alignment {align}");
            if let Err(err) = file.close().await {
                tracing::warn!(path = %path.display(), error = %os_error(err), "closing the O_DIRECT probe failed");
            }
            Ok(Some(align))
        }
        Err(err) if is_direct_io_refused(&err) => {
            tracing::warn!(
                path = %dir.display(),
                error = %os_error(err),
                "the filesystem refuses O_DIRECT; the log falls back to buffered writes and fdatasync"
            );
            Ok(None)
        }
        Err(err) => Err(failed("open", os_error(err))),
    };
    std::fs::remove_file(&path).map_err(|e| failed("remove", e))?;
    result
}

#[cfg(test)]
mod tests {
    //! The executor under core's log engine, on real files in a temporary directory,
    //! inside a glommio executor: the engine's decisions are tested in core on an in-memory
    //! disk; these check that the gateway's files carry them out (O_DIRECT, padding,
    //! truncation, rotation, recovery from what a crash or an operator leaves, reads while
    //! writes run, damage found on disk).
    //!
    //! [`Rig`] drives an engine the way the runtime does: recovery with
    //! [`LogExecutor::run_to_idle`], then every operation in a task of its own, and the
    //! engine's events drained after every call into it.

    use super::*;
    use imgate_core::log::{
        encode_record, scan, CorruptReason, Record, ScanEnd, StoredMessage, RECORD_HEADER_LEN,
    };
    use imgate_core::log_engine::{Damage, Io, LogConfig, LogError, Recovered};
    use imgate_core::proto::{ClientMsgId, ConvId, DeviceId, Seq, UserId};
    use imgate_core::segment_index::{self, IndexEntry};
    use imgate_core::shard::Lsn;
    use std::cell::Cell;
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Both ways of writing segments; O_DIRECT is what /tmp (ext4 here) gets by default.
    const MODES: [IoMode; 2] = [IoMode::Direct, IoMode::Buffered];

    /// Offset of the body in a frame: after the length and the CRC.
    const RECORD_BODY_OFFSET: usize = RECORD_HEADER_LEN;

    /// How long a test waits for an event before it fails.
    const WAIT_MAX: Duration = Duration::from_secs(60);

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
                "imgate-storage-{name}-{}-{unique}",
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

    fn run<T>(test: impl Future<Output = T>) -> T {
        glommio::LocalExecutorBuilder::default()
            .make()
            .expect("executor")
            .run(test)
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

    /// Decides the fate of an operation before it is performed: `Some(error)` reports it
    /// failed without performing it.
    type Fault = Box<dyn Fn(&Op) -> Option<IoError>>;

    /// The engine and what came out of it, shared by the tasks performing its operations.
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
        in_flight: usize,
        reads_in_flight: usize,
        reads_in_flight_max: usize,
        syncs_in_flight: usize,
        syncs_in_flight_max: usize,
        /// Raised after every completion: what `wait_for` waits on.
        changed: Rc<Changed>,
    }

    /// A wake-up for every task waiting on the engine's state (several wait at once in the
    /// concurrency tests), raised each time an operation completes.
    #[derive(Default)]
    struct Changed {
        generation: Cell<u64>,
        wakers: RefCell<Vec<std::task::Waker>>,
    }

    impl Changed {
        fn raise(&self) {
            self.generation.set(self.generation.get() + 1);
            for waker in self.wakers.borrow_mut().drain(..) {
                waker.wake();
            }
        }

        /// Resolves at the first `raise` after this call (not after the first poll).
        fn next(&self) -> impl Future<Output = ()> + '_ {
            let seen = self.generation.get();
            std::future::poll_fn(move |cx| {
                if self.generation.get() != seen {
                    std::task::Poll::Ready(())
                } else {
                    self.wakers.borrow_mut().push(cx.waker().clone());
                    std::task::Poll::Pending
                }
            })
        }
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
    }

    /// An engine on an executor, driven as the runtime drives it.
    struct Rig {
        live: Rc<RefCell<Live>>,
        exec: Rc<LogExecutor>,
        next_lsn: Cell<u64>,
        next_fetch: Cell<u64>,
    }

    impl Rig {
        /// Opens the log in `dir` and recovers it; `Err` if the engine refuses it.
        async fn open(
            dir: &TempDir,
            mode: IoMode,
            config: LogConfig,
        ) -> Result<(Rig, Recovered), LogError> {
            let exec = LogExecutor::open_with_mode(dir.0.clone(), mode)
                .await
                .expect("open the directory");
            // As the runtime configures it (`Config::log_config`): pipelined syncs only
            // with O_DIRECT.
            let config = LogConfig {
                align: exec.align(),
                syncs_inflight_max: if exec.align() > 1 {
                    imgate_core::log_engine::SYNCS_INFLIGHT_MAX
                } else {
                    1
                },
                ..config
            };
            let mut engine = LogEngine::new(config, now());
            let mut recovered = None;
            let mut later = Vec::new();
            for event in exec.run_to_idle(&mut engine, now).await {
                match event {
                    LogEvent::Recovered(r) => recovered = Some(r),
                    LogEvent::Stopped(e) => return Err(e),
                    other => later.push(other),
                }
            }
            let recovered = recovered.expect("recovery finished");
            let live = Live {
                engine,
                events: later,
                durable: None,
                failed: 0,
                checkpoint_due: false,
                fault: None,
                in_flight: 0,
                reads_in_flight: 0,
                reads_in_flight_max: 0,
                syncs_in_flight: 0,
                syncs_in_flight_max: 0,
                changed: Rc::new(Changed::default()),
            };
            let rig = Rig {
                live: Rc::new(RefCell::new(live)),
                exec: Rc::new(exec),
                next_lsn: Cell::new(1),
                next_fetch: Cell::new(1),
            };
            Ok((rig, recovered))
        }

        async fn open_ok(dir: &TempDir, mode: IoMode, config: LogConfig) -> (Rig, Recovered) {
            Rig::open(dir, mode, config).await.expect("recovered")
        }

        /// Calls into the engine, drains its events, and starts its new operations.
        fn call<T>(&self, f: impl FnOnce(&mut Live) -> T) -> T {
            let out = {
                let mut live = self.live.borrow_mut();
                let out = f(&mut live);
                live.take_events();
                out
            };
            spawn_ios(&self.live, &self.exec);
            out
        }

        /// Waits until `find` finds what it looks for in the engine's state.
        async fn wait_for<T>(&self, what: &str, mut find: impl FnMut(&mut Live) -> Option<T>) -> T {
            let started = std::time::Instant::now();
            let changed = self.live.borrow().changed.clone();
            loop {
                // Armed before looking, so that a completion in between is not missed.
                let next = changed.next();
                if let Some(found) = find(&mut self.live.borrow_mut()) {
                    return found;
                }
                let left = WAIT_MAX.saturating_sub(started.elapsed());
                let woke = glommio::timer::timeout(left, async {
                    next.await;
                    Ok(())
                })
                .await;
                assert!(woke.is_ok(), "waited too long for {what}");
            }
        }

        /// Appends `records` as one append; does not wait.
        fn append_nowait(&self, records: &[Record]) -> Lsn {
            let lsn = Lsn(self.next_lsn.get());
            self.next_lsn.set(lsn.0 + 1);
            let bytes = frames(records);
            self.call(|live| live.engine.append(now(), lsn, bytes));
            lsn
        }

        /// Appends `records` as one append and waits until it is durable.
        async fn append(&self, records: &[Record]) -> Lsn {
            let lsn = self.append_nowait(records);
            self.wait_for(&format!("{lsn:?} durable"), |live| {
                live.durable.filter(|&d| d >= lsn).map(|_| ())
            })
            .await;
            lsn
        }

        /// Appends every batch, waiting for each to be durable.
        async fn append_all(&self, records: &[Record], per_append: usize) {
            for batch in records.chunks(per_append) {
                self.append(batch).await;
            }
        }

        fn start_fetch(&self, conv: ConvId, from: u64, to: u64, limit: u32) -> u64 {
            let id = self.next_fetch.get();
            self.next_fetch.set(id + 1);
            self.call(|live| {
                live.engine
                    .fetch(now(), id, conv, Seq(from), Seq(to), limit);
            });
            id
        }

        async fn fetched(&self, id: u64) -> Result<Vec<StoredMessage>, ()> {
            self.wait_for("a fetch", |live| {
                let at = live
                    .events
                    .iter()
                    .position(|e| matches!(e, LogEvent::Fetched { fetch, .. } if *fetch == id))?;
                match live.events.remove(at) {
                    LogEvent::Fetched { result, .. } => Some(result),
                    _ => unreachable!(),
                }
            })
            .await
        }

        async fn fetch(
            &self,
            conv: ConvId,
            from: u64,
            to: u64,
            limit: u32,
        ) -> Result<Vec<StoredMessage>, ()> {
            let id = self.start_fetch(conv, from, to, limit);
            self.fetched(id).await
        }

        /// A fetch that must succeed.
        async fn read(&self, conv: ConvId, from: u64, to: u64, limit: u32) -> Vec<StoredMessage> {
            self.fetch(conv, from, to, limit).await.expect("fetch")
        }

        async fn loaded(&self, conv: ConvId) -> Result<Seq, ()> {
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
            .await
        }

        async fn load(&self, conv: ConvId) -> Seq {
            self.call(|live| live.engine.load(now(), conv));
            self.loaded(conv).await.expect("load")
        }

        /// Appends a checkpoint if the engine asked for one.
        async fn checkpoint_if_due(&self) {
            let due = std::mem::take(&mut self.live.borrow_mut().checkpoint_due);
            if due {
                self.append(&[Record::Checkpoint {
                    part: 0,
                    groups: Vec::new(),
                    dedupe: Vec::new(),
                    last: true,
                }])
                .await;
            }
        }

        /// Waits until no operation is in flight.
        async fn settle(&self) {
            self.wait_for("operations to finish", |live| {
                (live.in_flight == 0).then_some(())
            })
            .await;
        }

        /// Closes the log and waits for it: everything durable, the open segment cut to
        /// its data.
        async fn close(self) {
            self.call(|live| live.engine.close(now()));
            self.wait_for("the log to close", |live| {
                let at = live
                    .events
                    .iter()
                    .position(|e| matches!(e, LogEvent::Closed))?;
                live.events.remove(at);
                Some(())
            })
            .await;
            self.settle().await;
        }

        /// What a kill -9 leaves: nothing more reaches the files (once the operations
        /// already handed to the kernel are done).
        async fn crash(self) {
            self.settle().await;
        }

        fn engine<T>(&self, f: impl FnOnce(&LogEngine) -> T) -> T {
            f(&self.live.borrow().engine)
        }

        fn set_fault(&self, fault: Option<Fault>) {
            self.live.borrow_mut().fault = fault;
        }
    }

    /// Starts every operation the engine has issued, each in a task of its own, as the
    /// runtime does.
    fn spawn_ios(live: &Rc<RefCell<Live>>, exec: &Rc<LogExecutor>) {
        loop {
            let io: Option<Io> = live.borrow_mut().engine.poll_io();
            let Some(io) = io else {
                return;
            };
            let live = live.clone();
            let exec = exec.clone();
            glommio::spawn_local(async move {
                let (fault, is_read, is_sync) = {
                    let mut l = live.borrow_mut();
                    l.in_flight += 1;
                    let is_read = matches!(io.op, Op::Read { .. });
                    let is_sync = matches!(io.op, Op::Sync(FileId::Segment(_)));
                    if is_read {
                        l.reads_in_flight += 1;
                        l.reads_in_flight_max = l.reads_in_flight_max.max(l.reads_in_flight);
                    }
                    if is_sync {
                        l.syncs_in_flight += 1;
                        l.syncs_in_flight_max = l.syncs_in_flight_max.max(l.syncs_in_flight);
                    }
                    (l.fault.as_ref().and_then(|f| f(&io.op)), is_read, is_sync)
                };
                let result = match fault {
                    Some(error) => Err(error),
                    None => exec.perform(&io.op).await,
                };
                {
                    let mut l = live.borrow_mut();
                    l.in_flight -= 1;
                    l.reads_in_flight -= usize::from(is_read);
                    l.syncs_in_flight -= usize::from(is_sync);
                    l.engine.handle_completion(now(), io.id, result);
                    l.take_events();
                    l.changed.raise();
                }
                spawn_ios(&live, &exec);
            })
            .detach();
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

    fn writer_fd(exec: &LogExecutor, file: FileId) -> Option<std::os::fd::RawFd> {
        exec.writers
            .borrow()
            .iter()
            .find(|(id, _)| *id == file)
            .map(|(_, handle)| handle.raw_fd())
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
            // tmpfs: glommio opens DMA files without O_DIRECT; writes stay aligned.
            cases.push((TempDir::under(shm, "odirect-tmpfs"), IoMode::Direct));
        }
        for (dir, mode) in cases {
            run(async {
                let (rig, _) = Rig::open_ok(&dir, mode, config(1 << 20)).await;
                let tmpfs = is_on_tmpfs(&dir.0);
                assert_eq!(rig.exec.is_direct(), mode == IoMode::Direct);
                assert_eq!(
                    rig.exec.align(),
                    if mode == IoMode::Direct {
                        DIRECT_ALIGN_MIN
                    } else {
                        1
                    }
                );
                rig.append(&messages(1..5)).await;
                let expected = mode == IoMode::Direct && !tmpfs;
                let fd = writer_fd(&rig.exec, FileId::Segment(1)).expect("segment 1 is open");
                assert_eq!(
                    fd_has_o_direct(fd),
                    expected,
                    "{mode:?} in {}",
                    dir.0.display()
                );
                // Readers stay out of the page cache when the log does.
                assert_eq!(rig.read(conv_a(), 1, 4, 10).await.len(), 4);
                // (On tmpfs the kernel may take O_DIRECT for reads though glommio
                // writes without it: only reads' alignment is checked there.)
                for (_, file) in rig.exec.readers.borrow().iter() {
                    use std::os::fd::AsRawFd;
                    let direct = fd_has_o_direct(file.file.as_raw_fd());
                    assert_eq!(file.align > 1, direct);
                    if !tmpfs {
                        assert_eq!(direct, expected);
                    }
                }
                // Written in whole blocks: the tail of the last one is zeros.
                let data = frames(&messages(1..5)).len() as u64;
                let on_disk = dir.len(FileId::Segment(1));
                assert_eq!(on_disk, align_up(data, rig.exec.align()));
                rig.close().await;
                assert_eq!(dir.len(FileId::Segment(1)), data);
                // The probe file is gone.
                assert!(!dir.0.join(PROBE_FILE).exists());
            });
        }
    }

    #[test]
    fn synced_records_come_back_in_order_after_reopen() {
        for mode in MODES {
            let dir = TempDir::new("roundtrip");
            let records = messages(1..200);
            let len = frames(&records).len() as u64;
            run(async {
                let (rig, recovered) = Rig::open_ok(&dir, mode, LogConfig::default()).await;
                assert!(recovered.records.is_empty());
                assert_eq!(recovered.segments, 1);
                rig.append_all(&records, 7).await;
                assert_eq!(rig.engine(LogEngine::bytes), len);
                rig.close().await;
                assert_eq!(dir.len(FileId::Segment(1)), len);

                let (rig, recovered) = Rig::open_ok(&dir, mode, LogConfig::default()).await;
                assert_eq!(recovered.records, records);
                assert_eq!(recovered.bytes, len);
                assert_eq!(recovered.truncated_bytes, 0);
                assert_eq!(recovered.tail, ScanEnd::Clean);
                assert_eq!(rig.engine(LogEngine::bytes), len);
                rig.close().await;
            });
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
                run(async {
                    let (rig, _) = Rig::open_ok(&dir, mode, LogConfig::default()).await;
                    rig.append(&records).await;
                    rig.crash().await;
                });
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
                run(async {
                    let (rig, recovered) = Rig::open_ok(&dir, mode, LogConfig::default()).await;
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
                    rig.append(&messages(40..42)).await;
                    rig.crash().await;
                });
                run(async {
                    let (rig, recovered) = Rig::open_ok(&dir, mode, LogConfig::default()).await;
                    assert_eq!(recovered.records, messages(1..42));
                    rig.close().await;
                });
            }
        }
    }

    #[test]
    fn rotation_spreads_records_over_segments_and_keeps_their_order() {
        for mode in MODES {
            let dir = TempDir::new("rotation");
            let records = messages(1..300);
            let segment_bytes = 8 * 1024;
            run(async {
                let (rig, _) = Rig::open_ok(&dir, mode, config(segment_bytes)).await;
                rig.append_all(&records, 5).await;
                // An append larger than a whole segment goes alone into a fresh one.
                let big = messages(300..340);
                assert!(frames(&big).len() as u64 > segment_bytes);
                let before = rig.engine(LogEngine::segments);
                rig.append(&big).await;
                assert_eq!(rig.engine(LogEngine::segments), before + 1);
                rig.append(&messages(340..341)).await;
                assert_eq!(rig.engine(LogEngine::segments), before + 2);
                rig.close().await;
            });
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
            run(async {
                let (rig, recovered) = Rig::open_ok(&dir, mode, config(segment_bytes)).await;
                assert_eq!(recovered.records, messages(1..341));
                assert_eq!(recovered.segments, segments.len());
                assert_eq!(recovered.bytes, sizes.iter().sum::<u64>());
                assert_eq!(recovered.rebuilt, 0);
                rig.close().await;
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
                let (rig, recovered) = Rig::open_ok(&dir, mode, LogConfig::default()).await;
                assert_eq!(recovered.records, kept);
                assert_eq!(recovered.truncated_bytes, (torn.len() / 2) as u64);
                assert!(matches!(recovered.tail, ScanEnd::Torn { .. }));
                assert_eq!(rig.engine(LogEngine::bytes), frames(&kept).len() as u64);
                assert_eq!(dir.len(FileId::Segment(1)), frames(&kept).len() as u64);
                // Seq 4 again: the torn append was never acknowledged.
                rig.append(&messages(4..6)).await;
                rig.crash().await;
            });
            run(async {
                let (rig, recovered) = Rig::open_ok(&dir, mode, LogConfig::default()).await;
                assert_eq!(recovered.records, messages(1..6));
                rig.close().await;
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
                let (rig, recovered) = Rig::open_ok(&dir, mode, LogConfig::default()).await;
                assert_eq!(recovered.records, kept);
                assert_eq!(
                    recovered.tail,
                    ScanEnd::ZeroTail {
                        offset: valid as u64
                    }
                );
                assert_eq!(recovered.truncated_bytes, (bytes.len() - valid) as u64);
                assert_eq!(dir.len(FileId::Segment(1)), valid as u64);
                rig.append(&messages(6..8)).await;
                rig.close().await;
            });
            run(async {
                let (rig, recovered) = Rig::open_ok(&dir, mode, LogConfig::default()).await;
                assert_eq!(recovered.records, messages(1..8));
                rig.close().await;
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
        for mode in MODES {
            let err = run(Rig::open(&dir, mode, LogConfig::default()))
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
        let err = run(Rig::open(&dir, IoMode::Direct, LogConfig::default()))
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
        run(async {
            let (rig, recovered) = Rig::open_ok(&dir, IoMode::Direct, LogConfig::default()).await;
            assert_eq!(recovered.records, messages(1..9));
            assert_eq!(recovered.rebuilt, 1);
            rig.close().await;
        });
    }

    #[test]
    fn a_missing_or_misnamed_segment_refuses_to_open() {
        let dir = TempDir::new("gap");
        std::fs::create_dir_all(&dir.0).expect("mkdir");
        std::fs::write(dir.segment(1), frames(&messages(1..2))).expect("write");
        std::fs::write(dir.segment(3), frames(&messages(2..3))).expect("write");
        let err = run(Rig::open(&dir, IoMode::Direct, LogConfig::default()))
            .err()
            .expect("opened");
        assert_eq!(err, LogError::MissingSegment { missing: 2 });
        std::fs::remove_file(dir.segment(3)).expect("rm");
        std::fs::write(dir.0.join("7.seg"), b"").expect("write");
        let err = run(Rig::open(&dir, IoMode::Direct, LogConfig::default()))
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
        run(async {
            let (rig, recovered) = Rig::open_ok(&dir, IoMode::Direct, LogConfig::default()).await;
            assert_eq!(recovered.records, messages(1..2));
            rig.close().await;
        });
    }

    #[test]
    fn a_seq_gap_in_the_log_refuses_to_open() {
        let dir = TempDir::new("seq-gap");
        std::fs::create_dir_all(&dir.0).expect("mkdir");
        let mut records = messages(1..3);
        records.extend(messages(4..5));
        std::fs::write(dir.segment(1), frames(&records)).expect("write");
        let err = run(Rig::open(&dir, IoMode::Direct, LogConfig::default()))
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
            run(async {
                let (rig, _) = Rig::open_ok(&dir, mode, LogConfig::default()).await;
                rig.append(&synced).await;
                // Large, so that the write reaches well past the durable end.
                let big: Vec<Record> = (20..30).map(|seq| message(seq, 20_000)).collect();
                rig.set_fault(Some(Box::new(|op| {
                    matches!(op, Op::Sync(FileId::Segment(_))).then_some(IoError::Io)
                })));
                rig.append_nowait(&big);
                rig.wait_for("the failure", |live| (live.failed == 1).then_some(()))
                    .await;
                rig.set_fault(None);
                rig.settle().await;
                assert_eq!(dir.len(FileId::Segment(1)), durable);
                assert_eq!(rig.engine(LogEngine::bytes), durable);
                assert_eq!(rig.read(conv_a(), 1, 100, 100).await, as_stored(&synced));
                // The engine hands seqs 20.. out again, for other messages.
                rig.append(&expected[19..]).await;
                let got = rig.read(conv_a(), 20, 100, 100).await;
                assert_eq!(got, (20..23).map(replaced).collect::<Vec<_>>());
                rig.crash().await;
            });
            run(async {
                let (rig, recovered) = Rig::open_ok(&dir, mode, LogConfig::default()).await;
                assert_eq!(recovered.records, expected);
                rig.close().await;
            });
        }
    }

    /// The reads both tests of a full log make, before and after a reopen.
    async fn assert_reads_of_the_interleaved_log(rig: &Rig, count: u64) {
        assert_eq!(
            rig.read(conv_a(), 1, count, 10_000).await,
            stored_range(conv_a(), 1..=count)
        );
        assert_eq!(
            rig.read(conv_b(), 1, count, 10_000).await,
            stored_range(conv_b(), 1..=count)
        );
        assert_eq!(
            rig.read(conv_a(), 30, 60, 100).await,
            stored_range(conv_a(), 30..=60)
        );
        // Beyond what exists: what there is, then nothing.
        assert_eq!(
            rig.read(conv_a(), count - 3, count + 50, 100).await,
            stored_range(conv_a(), count - 3..=count)
        );
        assert!(rig
            .read(conv_a(), count + 1, count + 9, 100)
            .await
            .is_empty());
        assert!(rig.read(ConvId::group(99), 1, 10, 100).await.is_empty());
        // A limit smaller than the range: the first `limit` of it.
        assert_eq!(
            rig.read(conv_b(), 10, 100, 5).await,
            stored_range(conv_b(), 10..=14)
        );
        // The large frame of B, alone and amid others.
        assert_eq!(
            rig.read(conv_b(), 50, 50, 1).await,
            stored_range(conv_b(), 50..=50)
        );
        assert_eq!(
            rig.read(conv_b(), 48, 52, 10).await,
            stored_range(conv_b(), 48..=52)
        );
        // Seq 0 is before the first message; an empty range or limit reads nothing.
        assert_eq!(
            rig.read(conv_a(), 0, 2, 10).await,
            stored_range(conv_a(), 1..=2)
        );
        assert!(rig.read(conv_a(), 5, 4, 10).await.is_empty());
        assert!(rig.read(conv_a(), 1, 10, 0).await.is_empty());
        assert_eq!(rig.load(conv_a()).await, Seq(count));
        assert_eq!(rig.load(conv_b()).await, Seq(count));
    }

    #[test]
    fn reads_return_a_conversations_durable_messages_across_segments_and_after_reopen() {
        for mode in MODES {
            let dir = TempDir::new("read");
            let count = 150;
            let segment_bytes = 8 * 1024;
            let records = interleaved(1..count + 1);
            run(async {
                let (rig, _) = Rig::open_ok(&dir, mode, config(segment_bytes)).await;
                rig.append_all(&records, 7).await;
                let segments = rig.engine(LogEngine::segments);
                assert!(
                    segments > READER_OPEN_SEGMENTS_MAX,
                    "only {segments} segments"
                );
                assert_reads_of_the_interleaved_log(&rig, count).await;
                // Reading every segment kept only the newest handles open.
                assert_eq!(rig.exec.readers.borrow().len(), READER_OPEN_SEGMENTS_MAX);
                assert!(rig.exec.writers.borrow().len() <= WRITER_OPEN_FILES_MAX);
                rig.close().await;
            });
            run(async {
                let (rig, recovered) = Rig::open_ok(&dir, mode, config(segment_bytes)).await;
                assert_eq!(recovered.records, records);
                assert_reads_of_the_interleaved_log(&rig, count).await;
                // Every sealed segment has its index and summary files.
                for n in 1..rig.engine(LogEngine::segments) as u64 {
                    assert!(
                        dir.file(FileId::Index(n)).is_file(),
                        "no index file for {n}"
                    );
                    assert!(dir.file(FileId::Summary(n)).is_file(), "no summary for {n}");
                }
                rig.close().await;
            });
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
            run(async {
                let (rig, _) = Rig::open_ok(&dir, mode, LogConfig::default()).await;
                for seq in 1..=count {
                    let filler = StoredMessage {
                        payload: Bytes::from(vec![1; 128 * 1024]),
                        ..stored(other, seq)
                    };
                    rig.append(&[
                        Record::Message(stored(conv_a(), seq)),
                        Record::Message(filler),
                    ])
                    .await;
                }
                assert_eq!(
                    rig.read(conv_a(), 1, count, u32::MAX).await,
                    stored_range(conv_a(), 1..=count)
                );
                let most = rig.live.borrow().reads_in_flight_max;
                assert!(most > 4, "at most {most} reads in flight");
                assert_eq!(
                    rig.read(conv_a(), 30, 40, 5).await,
                    stored_range(conv_a(), 30..=34)
                );
                rig.close().await;
            });
        }
    }

    #[test]
    fn a_read_concurrent_with_writes_sees_exactly_the_durable_messages() {
        for mode in MODES {
            let dir = TempDir::new("read-concurrent");
            let batches = 60u64;
            let per_batch = 4u64;
            run(async {
                let (rig, _) = Rig::open_ok(&dir, mode, config(16 * 1024)).await;
                let rig = Rc::new(rig);
                let done = Rc::new(Cell::new(false));
                let writer = glommio::spawn_local({
                    let rig = rig.clone();
                    let done = done.clone();
                    async move {
                        for batch in 0..batches {
                            let seqs = batch * per_batch + 1..(batch + 1) * per_batch + 1;
                            // Lsn `batch + 1` holds A's seqs up to `(batch + 1) * per_batch`.
                            let lsn = rig.append_nowait(&interleaved(seqs));
                            // Let reads and the engine's I/O run while appends pile up,
                            // but not so many that one write takes them all (a fresh
                            // segment takes a whole write, however large).
                            futures_lite::future::yield_now().await;
                            if batch % 4 == 3 {
                                rig.wait_for("appends durable", |live| {
                                    live.durable.filter(|&d| d.0 + 2 >= lsn.0).map(|_| ())
                                })
                                .await;
                            }
                        }
                        rig.wait_for("every append durable", |live| {
                            (live.durable == Some(Lsn(batches))).then_some(())
                        })
                        .await;
                        done.set(true);
                    }
                });
                let mut reads = 0u64;
                let mut partial_reads = 0u64;
                let mut from = 1;
                while !done.get() {
                    // What the engine reported durable when the read starts is exactly
                    // what it serves: A's messages of every Lsn up to it.
                    let (id, known) = {
                        let known = rig.live.borrow().durable.map_or(0, |l| l.0 * per_batch);
                        (rig.start_fetch(conv_a(), from, Seq::MAX.0, 1_000), known)
                    };
                    let got = rig.fetched(id).await.expect("fetch");
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
                    futures_lite::future::yield_now().await;
                }
                writer.await;
                assert!(
                    partial_reads >= 10,
                    "{partial_reads} of {reads} reads ran amid writes"
                );
                let total = batches * per_batch;
                assert_eq!(
                    rig.read(conv_a(), 1, total, 10_000).await,
                    stored_range(conv_a(), 1..=total)
                );
                assert!(rig.engine(LogEngine::segments) > 2);
                // Group commit pipelined its syncs on the segment file with O_DIRECT,
                // and synced one at a time with buffered writes.
                let syncs = rig.live.borrow().syncs_in_flight_max;
                let pipelined = rig.exec.align() > 1;
                let expected = if pipelined {
                    imgate_core::log_engine::SYNCS_INFLIGHT_MAX
                } else {
                    1
                };
                assert_eq!(syncs, expected);
                let rig = Rc::try_unwrap(rig).ok().expect("the writer is done");
                rig.close().await;
            });
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
            run(async {
                let (rig, _) = Rig::open_ok(&dir, mode, config(8 * 1024)).await;
                rig.append_all(&interleaved(1..60), 3).await;
                let open = rig.engine(LogEngine::segments) as u64;
                assert!(open >= 6, "{open} segments");

                // A flipped bit in the body of A's message 5, behind the log's back: the
                // read fails after its retries; its neighbours still read.
                let flipped = segment_of(&dir, open, conv_a(), 5).expect("A5");
                let mut bytes = dir.read(FileId::Segment(flipped));
                let at = offset_of(&bytes, conv_a(), 5) as usize + RECORD_BODY_OFFSET + 5;
                bytes[at] ^= 0x04;
                std::fs::write(dir.segment(flipped), &bytes).expect("write");
                assert_eq!(rig.fetch(conv_a(), 5, 5, 10).await, Err(()));
                assert_eq!(rig.fetch(conv_a(), 1, 10, 10).await, Err(()));
                assert_eq!(
                    rig.read(conv_a(), 6, 8, 10).await,
                    stored_range(conv_a(), 6..=8)
                );

                // An index file whose entries for A point at B's messages of the same seqs
                // (a well-formed file: only the records read tell).
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
                assert_eq!(rig.fetch(conv_a(), seq, seq, 1).await, Err(()));
                // Its blocks no longer match the crcs the summary keeps, so no lookup that
                // reads them is answered, B's neither (an index block is believed whole or
                // not at all). Put back, it serves again.
                assert_eq!(rig.fetch(conv_b(), seq, seq, 1).await, Err(()));
                std::fs::write(dir.file(FileId::Index(misplaced)), &original).expect("write");
                assert_eq!(
                    rig.read(conv_b(), seq, seq, 1).await,
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
                rig.exec.forget(FileId::Segment(gone)).await;
                assert_eq!(rig.fetch(conv_a(), gone_seq, gone_seq, 1).await, Err(()));

                // What is intact still reads, and the log still appends.
                assert_eq!(
                    rig.read(conv_b(), 59, 59, 1).await,
                    stored_range(conv_b(), 59..=59)
                );
                rig.append(&interleaved(60..61)).await;
                assert_eq!(rig.load(conv_a()).await, Seq(60));
                assert_eq!(
                    rig.read(conv_a(), 59, 60, 10).await,
                    stored_range(conv_a(), 59..=60)
                );
                rig.close().await;
            });
        }
    }

    /// What issue 10 found: the read index grew by ~120 bytes for every conversation ever
    /// written. Now only the open segment's conversations cost that; a sealed segment's
    /// cost a bloom filter's ~10 bits and its index file's block keys.
    #[test]
    fn the_index_in_memory_stays_small_however_many_conversations_were_written() {
        let dir = TempDir::new("index-memory");
        let count = 20_000u64;
        run(async {
            let (rig, _) = Rig::open_ok(&dir, IoMode::Buffered, config(64 * 1024)).await;
            let records: Vec<Record> = (1..=count)
                .map(|g| Record::Message(stored(ConvId::group(g), 1)))
                .collect();
            rig.append_all(&records, 100).await;
            assert!(rig.engine(LogEngine::segments) > 20);
            let per_conversation = rig.engine(LogEngine::index_heap_bytes) as f64 / count as f64;
            assert!(per_conversation < 12.0, "{per_conversation} bytes each");
            // Every conversation is still found: its head and its message.
            for g in [1, 777, count / 2, count - 1, count] {
                let conv = ConvId::group(g);
                assert_eq!(rig.load(conv).await, Seq(1));
                assert_eq!(rig.read(conv, 1, 1, 1).await, vec![stored(conv, 1)]);
            }
            for g in [count + 1, count + 2, u64::MAX] {
                let conv = ConvId::group(g);
                assert_eq!(rig.load(conv).await, Seq::ZERO);
                assert!(rig.read(conv, 1, 10, 10).await.is_empty());
            }
            rig.close().await;
        });
    }

    #[test]
    fn the_last_durable_seq_is_found_in_the_open_segment_or_the_newest_sealed_one() {
        for mode in MODES {
            let dir = TempDir::new("last-durable");
            let count = 150;
            run(async {
                let (rig, _) = Rig::open_ok(&dir, mode, config(8 * 1024)).await;
                rig.append_all(&interleaved(1..count + 1), 7).await;
                // A conversation the log never saw.
                assert_eq!(rig.load(ConvId::group(77)).await, Seq::ZERO);
                // Appended, not yet durable: not reported.
                let next = [Record::Message(stored(conv_a(), count + 1))];
                let bytes = frames(&next);
                rig.call(|live| {
                    live.engine.append(now(), Lsn(10_000), bytes);
                    live.engine.load(now(), conv_a());
                });
                assert_eq!(rig.loaded(conv_a()).await, Ok(Seq(count)));
                rig.wait_for("the append durable", |live| {
                    (live.durable == Some(Lsn(10_000))).then_some(())
                })
                .await;
                assert_eq!(rig.load(conv_a()).await, Seq(count + 1));
                assert_eq!(rig.load(conv_b()).await, Seq(count));
                rig.close().await;
            });
            run(async {
                let (rig, _) = Rig::open_ok(&dir, mode, config(8 * 1024)).await;
                assert_eq!(rig.load(conv_a()).await, Seq(count + 1));
                assert_eq!(rig.load(conv_b()).await, Seq(count));
                rig.close().await;
            });
        }
    }

    #[test]
    fn a_missing_or_damaged_index_file_is_rebuilt_at_recovery() {
        for mode in MODES {
            let dir = TempDir::new("index-rebuilt");
            let count = 150;
            let segment_bytes = 8 * 1024;
            let sealed = run(async {
                let (rig, _) = Rig::open_ok(&dir, mode, config(segment_bytes)).await;
                rig.append_all(&interleaved(1..count + 1), 7).await;
                let sealed = rig.engine(LogEngine::segments) as u64 - 1;
                assert!(sealed >= 4);
                rig.close().await;
                sealed
            });
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
            run(async {
                let (rig, recovered) = Rig::open_ok(&dir, mode, config(segment_bytes)).await;
                assert_eq!(recovered.rebuilt, 4);
                assert_reads_of_the_interleaved_log(&rig, count).await;
                rig.close().await;
            });
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
        let first = run(async {
            let (rig, _) = Rig::open_ok(&dir, IoMode::Direct, retention.clone()).await;
            rig.append(&[Record::Message(stored(conv_b(), 1))]).await;
            for seq in 1..=count {
                rig.append(&[Record::Message(stored(conv_a(), seq))]).await;
                rig.checkpoint_if_due().await;
            }
            rig.settle().await;
            let segments = dir.segments();
            assert!(segments[0] > 1, "nothing removed: {segments:?}");
            for n in 1..segments[0] {
                assert!(!dir.segment(n).exists());
                assert!(dir.file(FileId::Index(n)).is_file());
                assert!(dir.file(FileId::Summary(n)).is_file());
            }
            let got = rig.read(conv_a(), 1, count, 1_000).await;
            let first = got[0].seq.0;
            assert!(first > 1);
            assert_eq!(got, stored_range(conv_a(), first..=count));
            // B's only message went with its segment; its last seq did not.
            assert!(rig.read(conv_b(), 1, 1, 1).await.is_empty());
            assert_eq!(rig.load(conv_b()).await, Seq(1));
            rig.close().await;
            first
        });
        run(async {
            let (rig, recovered) = Rig::open_ok(&dir, IoMode::Direct, retention).await;
            assert!(matches!(recovered.records[0], Record::Checkpoint { .. }));
            // Recovery applies retention again: it may remove one more segment.
            let got = rig.read(conv_a(), 1, count, 1_000).await;
            let now_first = got[0].seq.0;
            assert!(now_first >= first, "{now_first} < {first}");
            assert_eq!(got, stored_range(conv_a(), now_first..=count));
            assert_eq!(rig.load(conv_b()).await, Seq(1));
            rig.close().await;
        });
    }

    #[test]
    fn operations_on_missing_files_report_not_found_and_errors_map_by_errno() {
        let dir = TempDir::new("not-found");
        run(async {
            let exec = LogExecutor::open(dir.0.clone()).await.expect("open");
            // The directory was created; the probe left nothing behind.
            assert_eq!(
                exec.perform(&Op::List).await,
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
                assert_eq!(exec.perform(&op).await, Err(IoError::NotFound), "{op:?}");
            }
            // A misaligned O_DIRECT write is refused, not attempted.
            let file = FileId::Segment(1);
            assert_eq!(exec.perform(&Op::Create(file)).await, Ok(Completion::Done));
            let misaligned = Op::Write {
                file,
                at: 10,
                bytes: Bytes::from(vec![1; 4096]),
            };
            if exec.is_direct() {
                assert_eq!(exec.perform(&misaligned).await, Err(IoError::Io));
            }
            // A read past the end gives what there is.
            let write = Op::Write {
                file,
                at: 0,
                bytes: Bytes::from(vec![7; 4096]),
            };
            assert_eq!(exec.perform(&write).await, Ok(Completion::Done));
            let read = Op::Read {
                file,
                at: 4000,
                len: 5 * READ_STEP_BYTES,
            };
            assert_eq!(
                exec.perform(&read).await,
                Ok(Completion::Read(Bytes::from(vec![7; 96])))
            );
            assert_eq!(
                exec.perform(&Op::List).await,
                Ok(Completion::Listed(vec![(file.name(), 4096)]))
            );
        });
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
        run(async {
            let (rig, _) = Rig::open_ok(&dir, IoMode::Direct, LogConfig::default()).await;
            rig.append_all(&records, 10).await;
            rig.crash().await;
        });
        run(async {
            let (rig, recovered) = Rig::open_ok(&dir, IoMode::Direct, LogConfig::default()).await;
            assert_eq!(recovered.records, records);
            rig.close().await;
        });
    }
}
