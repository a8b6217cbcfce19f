//! Writes a realistic gateway data directory of a given size for start-up measurements:
//! shard 0 of a 1-shard gateway, written by core's log engine on the gateway's log executor
//! (`LogFiles` on an io_uring `Ring`), so the segments, their index and summary files, and the checkpoints are
//! exactly what a gateway writes.
//!
//! ```text
//! cargo run --release -p imgate-gateway --example log_fill -- DATA_DIR SIZE [TAIL] [flags]
//! ```
//!
//! - `DATA_DIR` must be missing or empty. It gets `shards` ("1\n", what the runtime checks
//!   the shard count against) and the log in `shard-0/`.
//! - `SIZE` is the log's size in bytes (K, M, G, T suffixes, binary: 10G = 10 GiB). The log
//!   ends at the checkpoint nearest to it plus the tail, so it is within half a checkpoint
//!   interval (about 35 MB) of `SIZE`.
//! - `TAIL` is how many messages follow the last checkpoint. Default:
//!   `checkpoint_messages - 1`, the worst case for start-up: the engine would ask for the
//!   next checkpoint at one more durable message, so recovery replays the most it ever does.
//!
//! Flags: `--convs N` (100,000), `--payload B` (200), `--batch N` (messages per append,
//! 256), `--inflight B` (bytes appended and not yet durable before it waits, 4M),
//! `--seed X`, `--no-verify` (skip reopening the log at the end).
//!
//! The messages: conversation `i` is direct between users `2i+1` and `2i+2`; each message
//! picks one uniformly at random (splitmix64 from the seed), takes its next seq from 1,
//! is sent by one of its two users at random from device 1 with a pseudo-random payload,
//! and its `client_msg_id` is the global message number (u64 LE) then the seed (u64 LE),
//! so every (sender, client_msg_id) is unique. With one shard, shard 0 owns every
//! conversation.
//!
//! The engine's configuration is the gateway's default (`Config::log_config`):
//! `LogConfig::default()` with the executor's alignment, and pipelined syncs only with
//! O_DIRECT. Messages go in appends of `--batch`, as a busy shard's group commit; whenever
//! the engine emits `CheckpointDue` the generator appends a checkpoint the way the shard
//! does (`Shard::handle_checkpoint_due`): `checkpoint_records(no groups, window, no inboxes, clock 0)` in one
//! append, where the window is the last `Limits::default().dedupe_window_entries`
//! messages appended, oldest first. The engine's operations run as the reactor runs them:
//! each started on the ring as soon as the engine issues it, several in flight, completions
//! in any order. At the end the
//! log is closed as a gateway closes it at shutdown, then reopened (unless `--no-verify`)
//! to check that recovery starts at the last checkpoint and replays exactly the tail.

// The gateway has no library target, so the example compiles the modules itself; it uses
// only part of their API.
#[allow(dead_code)]
#[path = "../src/log_files.rs"]
mod log_files;
#[allow(dead_code)]
#[path = "../src/uring.rs"]
mod uring;

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use imgate_core::log::{checkpoint_records, encode_record, DedupeEntry, Record, StoredMessage};
use imgate_core::log_engine::{LogConfig, LogEngine, LogEvent, SYNCS_INFLIGHT_MAX};
use imgate_core::proto::{ClientMsgId, ConvId, DeviceId, Seq, UserId};
use imgate_core::shard::Lsn;
use imgate_core::Limits;
use log_files::{LogFiles, TAG_KIND_MASK, TAG_LOG};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use uring::Ring;

struct Args {
    dir: PathBuf,
    size: u64,
    tail: Option<u64>,
    convs: u64,
    payload: usize,
    batch: usize,
    inflight: u64,
    seed: u64,
    verify: bool,
}

fn usage() -> &'static str {
    "usage: log_fill DATA_DIR SIZE [TAIL] [--convs N] [--payload B] [--batch N] \
     [--inflight B] [--seed X] [--no-verify]"
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim().trim_end_matches(['B', 'b']).trim_end_matches('i');
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1u64 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1u64 << 30),
        Some('T' | 't') => (&t[..t.len() - 1], 1u64 << 40),
        _ => (t, 1),
    };
    let n: f64 = num.parse().with_context(|| format!("size {s:?}"))?;
    ensure!(n >= 0.0, "size {s:?} is negative");
    Ok((n * mult as f64) as u64)
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        dir: PathBuf::new(),
        size: 0,
        tail: None,
        convs: 100_000,
        payload: 200,
        batch: 256,
        inflight: 4 << 20,
        seed: 0x1_6a7e,
        verify: true,
    };
    let mut positional = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--convs" => args.convs = value()?.parse().context("--convs")?,
            "--payload" => args.payload = parse_size(&value()?)? as usize,
            "--batch" => args.batch = value()?.parse().context("--batch")?,
            "--inflight" => args.inflight = parse_size(&value()?)?,
            "--seed" => args.seed = value()?.parse().context("--seed")?,
            "--no-verify" => args.verify = false,
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            _ if a.starts_with("--") => bail!("unknown flag {a}; {}", usage()),
            _ => positional.push(a),
        }
    }
    ensure!((2..=3).contains(&positional.len()), "{}", usage());
    args.dir = PathBuf::from(&positional[0]);
    args.size = parse_size(&positional[1])?;
    if let Some(tail) = positional.get(2) {
        args.tail = Some(tail.parse().context("TAIL")?);
    }
    ensure!(args.convs >= 1, "--convs must be at least 1");
    ensure!(args.batch >= 1, "--batch must be at least 1");
    ensure!(args.inflight >= 1, "--inflight must be at least 1");
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    if args.dir.exists()
        && std::fs::read_dir(&args.dir)
            .with_context(|| format!("reading {}", args.dir.display()))?
            .next()
            .is_some()
    {
        bail!("{} is not empty; remove it first", args.dir.display());
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    // What `runtime::check_shard_count` writes at a gateway's first start.
    std::fs::write(args.dir.join("shards"), "1\n").context("writing the shard count")?;

    let mut ring = Ring::new().context("creating an io_uring")?;
    fill(&mut ring, args)
}

/// The engine's clock: wall time in milliseconds, as the runtime's `Clock`.
fn now() -> imgate_core::Instant {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    imgate_core::Instant::from_millis(ms)
}

/// The gateway's default log configuration for an executor (`Config::log_config`).
fn log_config(align: u64) -> LogConfig {
    LogConfig {
        align,
        syncs_inflight_max: if align > 1 { SYNCS_INFLIGHT_MAX } else { 1 },
        ..LogConfig::default()
    }
}

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The messages, generated in order.
struct Messages {
    rng: SplitMix,
    seed: u64,
    convs: u64,
    last_seq: Vec<u64>,
    payload: Vec<u8>,
    count: u64,
}

impl Messages {
    fn next(&mut self) -> StoredMessage {
        let c = self.rng.next() % self.convs;
        let conv = ConvId::direct(UserId(2 * c + 1), UserId(2 * c + 2));
        let sender = UserId(2 * c + 1 + (self.rng.next() & 1));
        for chunk in self.payload.chunks_mut(8) {
            let r = self.rng.next().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.count.to_le_bytes());
        id[8..].copy_from_slice(&self.seed.to_le_bytes());
        self.count += 1;
        self.last_seq[c as usize] += 1;
        StoredMessage {
            conv,
            seq: Seq(self.last_seq[c as usize]),
            sender,
            sender_device: DeviceId(1),
            client_msg_id: ClientMsgId(id),
            high_priority: false,
            payload: Bytes::copy_from_slice(&self.payload),
            ts_ms: 0,
        }
    }
}

/// Where the generator is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Messages in batches, checkpoints when asked.
    Fill,
    /// The last checkpoint is appended: this many messages are left to append.
    Tail(u64),
    /// Everything is appended; waiting for it to be durable, then closing.
    Done,
}

/// A log engine on its files, every operation started on the ring as soon as it is issued
/// (as the reactor).
struct Driver<'r> {
    engine: LogEngine,
    files: LogFiles,
    ring: &'r mut Ring,
    completions: Vec<uring::Done>,
}

impl Driver<'_> {
    /// Starts each operation the engine issued.
    fn start_ios(&mut self) {
        while let Some(io) = self.engine.poll_io() {
            self.files.start(self.ring, io);
        }
    }

    /// Waits for at least one ring completion and hands every operation it finishes to
    /// the engine.
    fn complete_some(&mut self) -> anyhow::Result<()> {
        ensure!(
            self.files.in_flight() > 0,
            "waiting with no log operation in flight"
        );
        self.ring
            .submit_and_wait(None)
            .context("waiting on the io_uring")?;
        self.ring.complete(&mut self.completions);
        for done in std::mem::take(&mut self.completions) {
            ensure!(
                done.tag & TAG_KIND_MASK == TAG_LOG,
                "a completion that is not the log's"
            );
            if let Some((id, result)) = self.files.complete(self.ring, done) {
                self.engine.handle_completion(now(), id, result);
            }
        }
        Ok(())
    }
}

fn fill(ring: &mut Ring, args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let shard_dir = args.dir.join("shard-0");
    let mut files = LogFiles::open(shard_dir.clone())
        .with_context(|| format!("opening the log in {}", shard_dir.display()))?;
    let config = log_config(files.align());
    let checkpoint_messages = config.checkpoint_messages;
    let tail = args.tail.unwrap_or(checkpoint_messages - 1);
    ensure!(
        tail < checkpoint_messages,
        "TAIL must be below checkpoint_messages ({checkpoint_messages}): at that many the \
         engine asks for the next checkpoint"
    );
    let window_max = Limits::default().dedupe_window_entries;
    eprintln!(
        "log_fill: {} -> {} bytes, tail {tail} messages after the last checkpoint; \
         O_DIRECT {} (align {}), segment_bytes {}, segment_messages {}, \
         checkpoint_messages {checkpoint_messages}, syncs_inflight_max {}, dedupe window {window_max}",
        shard_dir.display(),
        args.size,
        files.is_direct(),
        config.align,
        config.segment_bytes,
        config.segment_messages,
        config.syncs_inflight_max,
    );
    let mut engine = LogEngine::new(config, now());
    let mut recovered = false;
    for event in files.run_to_idle(ring, &mut engine, now) {
        match event {
            LogEvent::Recovered(r) => {
                ensure!(
                    r.records.is_empty() && r.bytes == 0,
                    "the new log is not empty: {} bytes",
                    r.bytes
                );
                recovered = true;
            }
            LogEvent::Stopped(e) => bail!("the log refused to open: {e}"),
            _ => {}
        }
    }
    ensure!(recovered, "recovery of the empty log did not finish");

    let mut driver = Driver {
        engine,
        files,
        ring,
        completions: Vec::new(),
    };
    let mut messages = Messages {
        rng: SplitMix(args.seed),
        seed: args.seed,
        convs: args.convs,
        last_seq: vec![0; args.convs as usize],
        payload: vec![0; args.payload],
        count: 0,
    };
    let mut window: VecDeque<DedupeEntry> = VecDeque::with_capacity(window_max);
    let mut phase = Phase::Fill;
    let mut lsn = 0u64;
    // Appends not yet durable: (lsn, end in bytes appended).
    let mut unacked: VecDeque<(u64, u64)> = VecDeque::new();
    let mut appended_bytes = 0u64;
    let mut durable_bytes = 0u64;
    let mut checkpoint_due = false;
    let mut checkpoints = 0u64;
    let mut checkpoint_bytes = 0u64;
    // Bytes appended when the last checkpoint was, and the interval before it.
    let mut last_checkpoint_end = 0u64;
    let mut last_interval = 0u64;
    let mut since_checkpoint = 0u64;
    let mut tail_frame = 0u64;
    let mut next_report = Instant::now() + Duration::from_secs(5);
    let mut closed = false;
    let mut buf = Vec::new();

    loop {
        driver.start_ios();
        while let Some(event) = driver.engine.poll_event() {
            match event {
                LogEvent::Durable(Lsn(l)) => {
                    while let Some(&(a, end)) = unacked.front() {
                        if a > l {
                            break;
                        }
                        unacked.pop_front();
                        durable_bytes = end;
                    }
                }
                LogEvent::CheckpointDue => {
                    ensure!(
                        phase == Phase::Fill,
                        "the engine asked for a checkpoint after the last one ({phase:?}, \
                         {since_checkpoint} messages after it)"
                    );
                    checkpoint_due = true;
                }
                LogEvent::Failed => bail!("a log append failed"),
                LogEvent::Stopped(e) => bail!("the log stopped: {e}"),
                LogEvent::Closed => closed = true,
                other => bail!("unexpected log event {other:?}"),
            }
        }
        if closed {
            break;
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(5);
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "log_fill: {:.2} GiB appended ({:.2} durable), {} messages, {checkpoints} \
                 checkpoints, {} segments, {secs:.0} s, {:.0} MB/s",
                appended_bytes as f64 / (1u64 << 30) as f64,
                durable_bytes as f64 / (1u64 << 30) as f64,
                messages.count,
                driver.engine.segments(),
                durable_bytes as f64 / 1e6 / secs,
            );
        }
        if checkpoint_due {
            // As `Shard::handle_checkpoint_due`: anything batched went out already (every
            // batch is appended whole), then the checkpoint in an append of its own.
            checkpoint_due = false;
            buf.clear();
            let dedupe: Vec<DedupeEntry> = window.iter().copied().collect();
            for record in checkpoint_records(vec![], dedupe, vec![], 0) {
                encode_record(&record, &mut buf);
            }
            let len = buf.len() as u64;
            lsn += 1;
            driver
                .engine
                .append(now(), Lsn(lsn), std::mem::take(&mut buf));
            appended_bytes += len;
            unacked.push_back((lsn, appended_bytes));
            checkpoints += 1;
            checkpoint_bytes += len;
            last_interval = appended_bytes - last_checkpoint_end;
            last_checkpoint_end = appended_bytes;
            since_checkpoint = 0;
            // The last checkpoint if stopping after it with the tail is nearer the size
            // asked for than going on for another interval.
            let tail_bytes = tail * tail_frame;
            if appended_bytes + tail_bytes + last_interval / 2 >= args.size {
                phase = if tail == 0 {
                    driver.engine.close(now());
                    Phase::Done
                } else {
                    Phase::Tail(tail)
                };
                eprintln!(
                    "log_fill: last checkpoint ({len} bytes, {} entries) at {appended_bytes} \
                     bytes after {} messages; {tail} messages follow",
                    window.len(),
                    messages.count
                );
            }
            continue;
        }
        let take = match phase {
            Phase::Fill => args.batch as u64,
            Phase::Tail(left) => left.min(args.batch as u64),
            Phase::Done => 0,
        };
        if take > 0 && appended_bytes - durable_bytes < args.inflight {
            buf.clear();
            for _ in 0..take {
                let m = messages.next();
                if window.len() == window_max {
                    window.pop_front();
                }
                window.push_back(DedupeEntry {
                    sender: m.sender,
                    client_msg_id: m.client_msg_id,
                    conv: m.conv,
                    seq: m.seq,
                });
                let before = buf.len();
                encode_record(&Record::Message(m), &mut buf);
                tail_frame = (buf.len() - before) as u64;
            }
            let len = buf.len() as u64;
            lsn += 1;
            driver
                .engine
                .append(now(), Lsn(lsn), std::mem::take(&mut buf));
            appended_bytes += len;
            unacked.push_back((lsn, appended_bytes));
            since_checkpoint += take;
            if let Phase::Tail(left) = phase {
                phase = if left == take {
                    Phase::Done
                } else {
                    Phase::Tail(left - take)
                };
                if phase == Phase::Done {
                    driver.engine.close(now());
                }
            } else if checkpoints == 0
                && appended_bytes + tail * tail_frame >= args.size
                && since_checkpoint >= tail
            {
                // Smaller than one checkpoint interval: no checkpoint, the whole log is
                // the replay.
                phase = Phase::Done;
                driver.engine.close(now());
                eprintln!("log_fill: the size is reached before the first checkpoint");
            }
            continue;
        }
        driver.complete_some()?;
    }
    ensure!(
        driver.files.in_flight() == 0,
        "closed with {} operations in flight",
        driver.files.in_flight()
    );
    let secs = started.elapsed().as_secs_f64();
    let engine = &driver.engine;
    let convs_used = messages.last_seq.iter().filter(|&&s| s > 0).count();
    let max_seq = messages.last_seq.iter().max().copied().unwrap_or(0);
    println!(
        "log_fill: dir={} messages={} log_bytes={} segments={} checkpoints={checkpoints} \
         checkpoint_bytes={checkpoint_bytes} last_checkpoint_interval_bytes={last_interval} \
         tail_messages={since_checkpoint} convs_used={convs_used} max_seq={max_seq} \
         payload={} batch={} seed={} direct_io={} secs={secs:.1} MB/s={:.0}",
        args.dir.display(),
        messages.count,
        engine.bytes(),
        engine.segments(),
        args.payload,
        args.batch,
        args.seed,
        driver.files.is_direct(),
        engine.bytes() as f64 / 1e6 / secs,
    );
    sync_dir(&args.dir)?;

    if args.verify {
        verify(driver.ring, &shard_dir, checkpoints, since_checkpoint)?;
    }
    Ok(())
}

/// fsyncs a directory (the `shards` file's entry).
fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Reopens the log as a gateway's start does and checks what recovery replays: the last
/// checkpoint (if any) and the `tail` messages after it.
fn verify(ring: &mut Ring, dir: &Path, checkpoints: u64, tail: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut files = LogFiles::open(dir.to_path_buf())?;
    let mut engine = LogEngine::new(log_config(files.align()), now());
    let mut recovered = None;
    let mut due = false;
    for event in files.run_to_idle(ring, &mut engine, now) {
        match event {
            LogEvent::Recovered(r) => recovered = Some(r),
            LogEvent::Stopped(e) => bail!("the log refused to reopen: {e}"),
            LogEvent::CheckpointDue => due = true,
            _ => {}
        }
    }
    let r = recovered.context("recovery did not finish")?;
    let parts = r
        .records
        .iter()
        .take_while(|r| matches!(r, Record::Checkpoint { .. }))
        .count();
    let replayed = r
        .records
        .iter()
        .filter(|r| matches!(r, Record::Message(_)))
        .count() as u64;
    eprintln!(
        "log_fill: reopened in {:.1} s: segments={} bytes={} read_bytes={} replay_from={:?} \
         rebuilt={} truncated_bytes={} tail={:?}; replays {} checkpoint records and \
         {replayed} messages; checkpoint due at once: {due}",
        started.elapsed().as_secs_f64(),
        r.segments,
        r.bytes,
        r.read_bytes,
        r.replay_from,
        r.rebuilt,
        r.truncated_bytes,
        r.tail,
        parts,
    );
    ensure!(r.rebuilt == 0, "recovery rebuilt {} index files", r.rebuilt);
    ensure!(
        r.truncated_bytes == 0,
        "recovery cut {} bytes",
        r.truncated_bytes
    );
    ensure!(
        replayed == tail && (checkpoints == 0 || parts >= 1),
        "recovery replays {parts} checkpoint records and {replayed} messages; expected the \
         last checkpoint and {tail}"
    );
    ensure!(!due, "the reopened log asks for a checkpoint at once");
    engine.close(now());
    for event in files.run_to_idle(ring, &mut engine, now) {
        if let LogEvent::Stopped(e) = event {
            bail!("closing the reopened log: {e}");
        }
    }
    Ok(())
}
