//! The shard logs on turmoil's simulated disk (`turmoil::fs`, feature `unstable-fs`): an
//! executor of core's log engine operations, and an independent reader of what is on the
//! disk for the oracle.
//!
//! Shard `i`'s log is the directory `/data/shard-i`, laid out by the engine (segments,
//! index and summary files). [`perform`] carries out one operation exactly as the driver
//! contract in `core/src/log_engine/mod.rs` says; the gateway host decides when its
//! completion is reported (later, in any order), and may fail a sync. What the disk does
//! comes from turmoil, configured per seed in `run.rs`:
//! - a write not covered by a returned `sync_data` is lost by a crash, or torn at the
//!   simulated block size (`block_size`), or made durable early (`sync_probability`);
//! - reads and writes fail with EIO at a seeded rate (`io_error_probability`);
//! - a write past the disk's capacity fails with ENOSPC (`capacity`).
//!
//! Every call must run inside the gateway host (turmoil finds the disk through the running
//! host). Disk-full seeds keep reserve files on the disk: the gateway deletes one when the
//! disk stays full, as an operator freeing space would, so that ENOSPC heals.

use imgate_core::log::{scan, Record};
use imgate_core::log_engine::{Completion, FileId, IoError, Op};
use std::io;
use std::os::unix::fs::FileExt;
use turmoil::fs::shim::std::fs::{self as fs, File, OpenOptions};

/// The folder of the logs and reserve files.
const DIR: &str = "/data";
/// Failed reads the oracle's own reader retries before the run is declared broken (at a
/// read EIO rate of a few percent, never reached).
const READ_TRIES: usize = 1000;

/// Shard `shard`'s log directory.
fn log_dir(shard: usize) -> String {
    format!("{DIR}/shard-{shard}")
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

/// The engine's view of an I/O error.
fn io_error(e: &io::Error) -> IoError {
    // turmoil's ENOSPC is an `Other` error with this message.
    if e.kind() == io::ErrorKind::NotFound {
        IoError::NotFound
    } else if e.to_string().contains("No space left") {
        IoError::NoSpace
    } else {
        IoError::Io
    }
}

fn open(path: &str, write: bool) -> io::Result<File> {
    OpenOptions::new().read(true).write(write).open(path)
}

/// Performs `op` on shard `shard`'s log directory, now.
pub fn perform(shard: usize, op: &Op) -> Result<Completion, IoError> {
    let dir = log_dir(shard);
    let path = |file: FileId| format!("{dir}/{}", file.name());
    let result = match op {
        Op::List => list(&dir).map(Completion::Listed),
        Op::Create(file) => OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path(*file))
            .and_then(|_| fs::sync_dir(&dir))
            .map(|()| Completion::Done),
        Op::Write { file, at, bytes } => open(&path(*file), true)
            .and_then(|f| f.write_all_at(bytes, *at))
            .map(|()| Completion::Done),
        Op::Sync(file) => open(&path(*file), true)
            .and_then(|f| f.sync_data())
            .map(|()| Completion::Done),
        Op::Truncate { file, len } => open(&path(*file), true)
            .and_then(|f| f.set_len(*len).and_then(|()| f.sync_data()))
            .map(|()| Completion::Done),
        Op::Read { file, at, len } => open(&path(*file), false)
            .and_then(|f| read_at(&f, *at, *len))
            .map(|bytes| Completion::Read(bytes.into())),
        Op::Remove(file) => fs::remove_file(path(*file))
            .and_then(|()| fs::sync_dir(&dir))
            .map(|()| Completion::Done),
    };
    result.map_err(|e| io_error(&e))
}

/// The log directory's files and lengths, sorted by name (created, durably, if missing).
fn list(dir: &str) -> io::Result<Vec<(String, u64)>> {
    if !fs::exists(dir) {
        fs::create_dir(dir)?;
        fs::sync_dir(DIR)?;
    }
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        names.push((name, entry.metadata()?.len()));
    }
    names.sort();
    Ok(names)
}

/// Up to `len` bytes at `at`, fewer only where the file ends.
fn read_at(file: &File, at: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = file.read_at(&mut buf[got..], at + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(got);
    Ok(buf)
}

/// What is on shard `shard`'s disk, read independently of the engine for the oracle:
/// every segment present, in order, each scanned up to its first invalid frame. Reads
/// that fail are retried (counted in `retries`).
pub fn records_on_disk(shard: usize, retries: &mut u64) -> Vec<Record> {
    let dir = log_dir(shard);
    let names = retrying(retries, || list(&dir));
    let mut segments: Vec<u64> = names
        .iter()
        .filter_map(|(name, _)| match FileId::parse(name) {
            Some(Ok(FileId::Segment(n))) => Some(n),
            _ => None,
        })
        .collect();
    segments.sort_unstable();
    let mut records = Vec::new();
    for n in segments {
        let path = format!("{dir}/{}", FileId::Segment(n).name());
        let bytes = retrying(retries, || {
            let f = open(&path, false)?;
            let len = f.metadata()?.len();
            read_at(&f, 0, len as usize)
        });
        records.extend(scan(&bytes).records.into_iter().map(|(_, r)| r));
    }
    records
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
