//! The shard logs on turmoil's simulated disk (`turmoil::fs`, feature `unstable-fs`).
//!
//! One file per shard, `/data/shard-N.log`, holding core's record format. What the disk
//! does to it comes from turmoil, configured per seed in `run.rs`:
//! - a write not covered by a returned `sync_data` is lost by a crash, or torn at the
//!   simulated block size (`block_size`), or made durable early (`sync_probability`);
//! - reads and writes fail with EIO at a seeded rate (`io_error_probability`);
//! - a write past the disk's capacity fails with ENOSPC (`capacity`).
//!
//! The driver contract is the gateway's: appends in order, one `sync_data` per group commit,
//! and on a failed write the file is cut back to its durable length before the engine
//! hears of it. A failed read is retried (the gateway would retry or restart; the engine
//! never sees it). Every call must run inside the gateway host (turmoil finds the disk
//! through the running host).
//!
//! Disk-full seeds keep reserve files on the disk: the gateway deletes one when the disk
//! stays full, as an operator freeing space would, so that ENOSPC heals.

use imgate_core::log::{MemLog, StoredMessage};
use imgate_core::proto::{ConvId, Seq};
use std::io;
use std::os::unix::fs::FileExt;
use turmoil::fs::shim::std::fs::{self as fs, File, OpenOptions};

/// The folder of the logs and reserve files.
const DIR: &str = "/data";
/// Failed reads retried before the run is declared broken (at a read EIO rate of a few
/// percent, never reached).
const READ_TRIES: usize = 1000;

/// What a failed write was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteError {
    /// EIO.
    Io,
    /// ENOSPC.
    Full,
}

impl From<io::Error> for WriteError {
    fn from(e: io::Error) -> WriteError {
        // turmoil's ENOSPC is an `Other` error with this message.
        if e.to_string().contains("No space left") {
            WriteError::Full
        } else {
            WriteError::Io
        }
    }
}

/// One shard's log file, with what the driver knows of it.
pub struct FsLog {
    file: File,
    /// Bytes written (the file's length).
    len: u64,
    /// Bytes covered by a returned `sync_data`, or found on the disk at open.
    durable: u64,
    /// Failed reads retried so far.
    pub read_retries: u64,
}

fn log_path(shard: usize) -> String {
    format!("{DIR}/shard-{shard}.log")
}

fn reserve_path(n: usize) -> String {
    format!("{DIR}/reserve-{n}")
}

/// Bytes of reserve file `n` of `reserves`: small ones, so that the disk fills again after
/// one is freed, and a last one large enough for any run.
pub fn reserve_bytes(n: usize, reserves: usize) -> u64 {
    if n + 1 == reserves {
        4 << 20
    } else {
        16 << 10
    }
}

/// Makes `/data` (durably) and, for a disk-full seed, `reserves` reserve files. First boot
/// only.
pub fn prepare(reserves: usize) {
    if !fs::exists(DIR) {
        fs::create_dir(DIR).expect("the sim's disk takes a folder");
        fs::sync_dir("/").expect("/ exists");
    }
    for n in 0..reserves {
        let file = File::create(reserve_path(n)).expect("the reserve is created");
        let zeros = vec![0u8; reserve_bytes(n, reserves) as usize];
        // A write may fail with EIO: try again (nothing else writes yet).
        while file.write_at(&zeros, 0).is_err() {}
        file.sync_data().expect("the reserve exists");
    }
    fs::sync_dir(DIR).expect("/data exists");
}

/// Deletes one reserve file, if one is left; returns whether it did.
pub fn free_reserve(reserves: usize) -> bool {
    let Some(path) = (0..reserves).map(reserve_path).find(|p| fs::exists(p)) else {
        return false;
    };
    fs::remove_file(&path).expect("the reserve exists");
    fs::sync_dir(DIR).expect("/data exists");
    true
}

/// Runs `read` until it succeeds, counting the retries.
fn retrying<T>(retries: &mut u64, mut read: impl FnMut() -> io::Result<T>) -> T {
    for _ in 0..READ_TRIES {
        match read() {
            Ok(v) => return v,
            Err(_) => *retries += 1,
        }
    }
    panic!("{READ_TRIES} reads in a row failed: the disk model is broken");
}

impl FsLog {
    /// Opens (creating, durably, if new) shard `shard`'s log and reads all of it.
    pub fn open(shard: usize) -> (FsLog, Vec<u8>) {
        let path = log_path(shard);
        let existed = fs::exists(&path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .open(&path)
            .expect("the log opens");
        if !existed {
            fs::sync_dir(DIR).expect("/data exists");
        }
        let mut log = FsLog {
            file,
            len: 0,
            durable: 0,
            read_retries: 0,
        };
        let len = log.file.metadata().expect("the log exists").len();
        log.len = len;
        log.durable = len;
        let bytes = log.read(0, len);
        (log, bytes)
    }

    /// Bytes written, durable or not.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the log holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes that survive a crash.
    pub fn durable_len(&self) -> u64 {
        self.durable
    }

    /// Writes `bytes` at the end. On an error nothing was written.
    pub fn append(&mut self, bytes: &[u8]) -> Result<(), WriteError> {
        self.file.write_at(bytes, self.len)?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// fdatasync, returned: everything written is on the disk, and the driver takes the
    /// first `len` bytes (what was written when the sync started) as durable.
    pub fn sync_to(&mut self, len: u64) {
        self.file.sync_data().expect("the log exists");
        self.durable = self.durable.max(len.min(self.len));
    }

    /// Cuts the file to `len` bytes, durably (recovery's truncation of a torn tail, or the
    /// reset to the durable length after a failed write).
    pub fn truncate(&mut self, len: u64) {
        self.file.set_len(len).expect("the log is writable");
        self.file.sync_data().expect("the log exists");
        self.len = len;
        self.durable = self.durable.min(len);
    }

    /// Bytes `from..to` as the file holds them (`to` at most the length).
    pub fn read(&mut self, from: u64, to: u64) -> Vec<u8> {
        let mut buf = vec![0u8; to.saturating_sub(from) as usize];
        let mut at = 0;
        while at < buf.len() {
            let file = &self.file;
            let off = from + at as u64;
            let n = retrying(&mut self.read_retries, || file.read_at(&mut buf[at..], off));
            assert!(n > 0, "the log ends before {to}");
            at += n;
        }
        buf
    }

    /// The last durable seq of `conv`: the answer to a `Load`, read from the file.
    pub fn last_durable_seq(&mut self, conv: ConvId) -> Seq {
        let mut durable = MemLog::new();
        durable.append(&self.read(0, self.durable));
        durable.sync();
        durable.last_durable_seq(conv)
    }

    /// The durable messages of `conv` with seq in `from..=to`: the answer to a `Fetch`,
    /// read from the file.
    pub fn durable_messages(&mut self, conv: ConvId, from: Seq, to: Seq) -> Vec<StoredMessage> {
        let mut durable = MemLog::new();
        durable.append(&self.read(0, self.durable));
        durable.sync();
        durable.durable_messages(conv, from, to)
    }
}
