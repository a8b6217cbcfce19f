//! An in-memory disk with crash semantics, executing the log engine's operations: for
//! core's tests and anyone who wants to run the engine without files.
//!
//! Each file has the bytes a reader sees now and the bytes that survive a crash (what the
//! last returned sync covered). An operation is *started* ([`MemDisk::start`]: its effect
//! is applied, a sync takes its snapshot) and later *finished* ([`MemDisk::finish`]: a
//! sync makes its snapshot durable), so that a driver can keep several in flight and
//! finish them in any order, as the kernel does. Faults are chosen by the caller per
//! operation:
//! - a failed write applies a prefix of its blocks (possibly none) and reports an error;
//! - a failed sync makes nothing durable, and the unsynced bytes of that file may be
//!   dropped (after a failed fsync the kernel may discard dirty pages);
//! - a read fails, or a write finds the disk full ([`MemDisk::capacity`]);
//! - [`MemDisk::crash`] keeps each file's durable bytes plus, from the first byte that
//!   differs, a chosen number of whole blocks of what was written since (a torn write at
//!   block granularity).
//!
//! Directory operations (create, remove) are durable when they apply, as the driver
//! contract has them sync the directory.

use super::{Completion, FileId, IoError, Op};
use bytes::Bytes;
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct MemFile {
    data: Vec<u8>,
    durable: Vec<u8>,
    /// When `durable` was taken (the disk's operation counter): a sync that started
    /// earlier and finishes later does not take durability back.
    durable_at: u64,
}

/// An operation started on a [`MemDisk`], to be finished later.
#[derive(Debug)]
pub struct Started {
    result: Result<Completion, IoError>,
    /// A sync's snapshot: the file, its bytes when the sync started, and when that was.
    sync: Option<(String, Vec<u8>, u64)>,
}

/// The disk. See the module docs.
#[derive(Clone, Debug)]
pub struct MemDisk {
    files: BTreeMap<String, MemFile>,
    /// Granularity of torn writes.
    pub block: usize,
    /// Bytes the disk holds at most over all files (`None`: unbounded).
    pub capacity: Option<u64>,
    /// Operations started so far.
    clock: u64,
}

impl MemDisk {
    /// An empty disk tearing writes at `block` bytes.
    pub fn new(block: usize) -> MemDisk {
        assert!(block > 0, "a block has bytes");
        MemDisk {
            files: BTreeMap::new(),
            block,
            capacity: None,
            clock: 0,
        }
    }

    fn used(&self) -> u64 {
        self.files.values().map(|f| f.data.len() as u64).sum()
    }

    /// The bytes of file `name` as a reader sees them now.
    pub fn file(&self, name: &str) -> Option<&[u8]> {
        self.files.get(name).map(|f| f.data.as_slice())
    }

    /// The bytes of file `name` that survive a crash now (what the last returned sync
    /// covered): for tests that check a durability claim at the moment it is made.
    pub fn durable(&self, name: &str) -> Option<&[u8]> {
        self.files.get(name).map(|f| f.durable.as_slice())
    }

    /// The names of the files, sorted.
    pub fn names(&self) -> Vec<String> {
        self.files.keys().cloned().collect()
    }

    /// Overwrites file `name` (creating it) with `bytes`, durable: for tests that plant
    /// damage or old files.
    pub fn put(&mut self, name: &str, bytes: Vec<u8>) {
        self.files.insert(
            name.to_string(),
            MemFile {
                data: bytes.clone(),
                durable: bytes,
                durable_at: self.clock,
            },
        );
    }

    /// Removes file `name`, durably (an operator deleting a file).
    pub fn delete(&mut self, name: &str) {
        self.files.remove(name);
    }

    /// Applies `op`, failing it with `fault` if given; `keep_blocks` is how many blocks a
    /// failed write applies. Finish it with [`MemDisk::finish`].
    pub fn start(&mut self, op: &Op, fault: Option<IoError>, keep_blocks: usize) -> Started {
        self.clock += 1;
        let now = self.clock;
        let mut sync = None;
        let result = match op {
            Op::List => Ok(Completion::Listed(
                self.files
                    .iter()
                    .map(|(name, f)| (name.clone(), f.data.len() as u64))
                    .collect(),
            )),
            Op::Create(file) => match fault {
                Some(e) => Err(e),
                None => {
                    self.files.insert(
                        file.name(),
                        MemFile {
                            durable_at: now,
                            ..MemFile::default()
                        },
                    );
                    Ok(Completion::Done)
                }
            },
            Op::Write { file, at, bytes } => self.write(*file, *at, bytes, fault, keep_blocks),
            Op::Sync(file) => match (fault, self.files.get_mut(&file.name())) {
                (_, None) => Err(IoError::NotFound),
                (Some(e), Some(f)) => {
                    if keep_blocks == 0 {
                        // The kernel dropped the dirty pages with the error.
                        f.data = f.durable.clone();
                    }
                    Err(e)
                }
                (None, Some(f)) => {
                    sync = Some((file.name(), f.data.clone(), now));
                    Ok(Completion::Done)
                }
            },
            Op::Truncate { file, len } => match (fault, self.files.get_mut(&file.name())) {
                (_, None) => Err(IoError::NotFound),
                (Some(e), _) => Err(e),
                (None, Some(f)) => {
                    let len = usize::try_from(*len).expect("a length in memory");
                    f.data.resize(len, 0);
                    f.durable = f.data.clone();
                    f.durable_at = now;
                    Ok(Completion::Done)
                }
            },
            Op::Read { file, at, len } => match (fault, self.files.get(&file.name())) {
                (_, None) => Err(IoError::NotFound),
                (Some(e), _) => Err(e),
                (None, Some(f)) => {
                    let start = usize::try_from(*at).unwrap_or(usize::MAX).min(f.data.len());
                    let end = start.saturating_add(*len).min(f.data.len());
                    Ok(Completion::Read(Bytes::copy_from_slice(
                        &f.data[start..end],
                    )))
                }
            },
            Op::Remove(file) => match fault {
                Some(e) => Err(e),
                None => match self.files.remove(&file.name()) {
                    Some(_) => Ok(Completion::Done),
                    None => Err(IoError::NotFound),
                },
            },
        };
        Started { result, sync }
    }

    fn write(
        &mut self,
        file: FileId,
        at: u64,
        bytes: &[u8],
        fault: Option<IoError>,
        keep_blocks: usize,
    ) -> Result<Completion, IoError> {
        let grows = {
            let Some(f) = self.files.get(&file.name()) else {
                return Err(IoError::NotFound);
            };
            (at + bytes.len() as u64).saturating_sub(f.data.len() as u64)
        };
        let full = self.capacity.is_some_and(|cap| self.used() + grows > cap);
        let fault = fault.or(full.then_some(IoError::NoSpace));
        let apply = match fault {
            None => bytes.len(),
            Some(_) => (keep_blocks * self.block).min(bytes.len()),
        };
        let f = self.files.get_mut(&file.name()).expect("checked above");
        let at = usize::try_from(at).expect("an offset in memory");
        if apply > 0 {
            if f.data.len() < at + apply {
                f.data.resize(at + apply, 0);
            }
            f.data[at..at + apply].copy_from_slice(&bytes[..apply]);
        }
        match fault {
            Some(e) => Err(e),
            None => Ok(Completion::Done),
        }
    }

    /// Finishes a started operation: a sync's snapshot becomes durable (unless a later
    /// sync already made more durable: durability never goes back).
    pub fn finish(&mut self, started: Started) -> Result<Completion, IoError> {
        if let Some((name, snapshot, at)) = started.sync {
            if let Some(f) = self.files.get_mut(&name).filter(|f| f.durable_at < at) {
                f.durable = snapshot;
                f.durable_at = at;
            }
        }
        started.result
    }

    /// Starts and finishes `op` at once, without a fault.
    pub fn execute(&mut self, op: &Op) -> Result<Completion, IoError> {
        let started = self.start(op, None, 0);
        self.finish(started)
    }

    /// A power loss: each file keeps its durable bytes, and from the first byte where
    /// what was written differs, `keep_blocks` whole blocks of it (a torn write).
    pub fn crash(&mut self, keep_blocks: usize) {
        let block = self.block;
        for f in self.files.values_mut() {
            let diff = f
                .data
                .iter()
                .zip(&f.durable)
                .position(|(a, b)| a != b)
                .unwrap_or(f.data.len().min(f.durable.len()));
            let keep_to = (diff / block * block + keep_blocks * block).min(f.data.len());
            let mut out = f.data[..keep_to.max(diff.min(f.data.len()))].to_vec();
            if f.durable.len() > out.len() {
                out.extend_from_slice(&f.durable[out.len()..]);
            }
            f.data = out.clone();
            f.durable = out;
        }
    }
}
