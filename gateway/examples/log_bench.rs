//! Latency of one durable append to a shard's log on this machine's disk, through core's
//! log engine and the gateway's log executor (`LogFiles` on an io_uring `Ring`): one append of one ~4 KiB record at a
//! time, waiting for it to be durable (an O_DIRECT write and an fdatasync), in a loop;
//! then the same with buffered I/O. Prints p50/p99/max, and checks that a reopen recovers
//! every record.
//!
//! Then the read path, in both modes: a log of 200 messages (~300 B) in each of 1,011
//! conversations (one written in a burst, 10 interleaved with each other, 1,000
//! interleaved with each other), closed and reopened. Prints the recovery time, the read
//! index's memory, the cost of indexing on the write path, and the latency of fetching
//! 200 messages of one conversation (and 1) from disk.
//!
//! The engine's operations run the way the reactor runs them: each started on the ring as
//! soon as the engine issues it, all in flight at once, completions in any order.
//!
//! ```text
//! cargo run --release -p imgate-gateway --example log_bench [-- DIR [COUNT]]
//! ```
//!
//! DIR defaults to a fresh directory under the system temp dir (removed afterwards), COUNT
//! to 1000. Numbers, not pass/fail; it fails only if recovery or a read does not give back
//! what was written.

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
use imgate_core::log::{decode_record, encode_record, Decoded, Record, StoredMessage};
use imgate_core::log_engine::{LogConfig, LogEngine, LogEvent, Recovered};
use imgate_core::proto::{ClientMsgId, ConvId, DeviceId, Seq, UserId};
use imgate_core::shard::Lsn;
use log_files::{IoMode, LogFiles};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use uring::Ring;

/// Payload bytes per record: with its header and fields the frame is just under 4 KiB.
const PAYLOAD_BYTES: usize = 4096 - 80;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (root, remove) = match args.next() {
        Some(dir) => (PathBuf::from(dir), false),
        None => (
            std::env::temp_dir().join(format!("imgate-log-bench-{}", std::process::id())),
            true,
        ),
    };
    let count: u64 = match args.next() {
        Some(count) => count.parse().context("COUNT")?,
        None => 1000,
    };
    ensure!(count > 0, "COUNT must be at least 1");

    let mut ring = Ring::new().context("creating an io_uring")?;
    let result = (|| {
        for mode in [IoMode::Direct, IoMode::Buffered] {
            bench(&mut ring, root.join(name(mode)), mode, count)?;
        }
        index_cost();
        for mode in [IoMode::Direct, IoMode::Buffered] {
            read_bench(&mut ring, root.join(format!("{}-read", name(mode))), mode)?;
        }
        anyhow::Ok(())
    })();
    if remove {
        let _ = std::fs::remove_dir_all(&root);
    }
    result
}

/// The engine's clock: wall time.
fn now() -> imgate_core::Instant {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    imgate_core::Instant::from_millis(ms)
}

/// A log engine on its files and the ring.
struct Log<'r> {
    engine: LogEngine,
    files: LogFiles,
    ring: &'r mut Ring,
    events: Vec<LogEvent>,
}

impl<'r> Log<'r> {
    /// Opens and recovers the log in `dir`.
    fn open(
        ring: &'r mut Ring,
        dir: PathBuf,
        mode: IoMode,
    ) -> anyhow::Result<(Log<'r>, Recovered)> {
        let mut files = LogFiles::open_with_mode(dir, mode)?;
        let config = LogConfig {
            align: files.align(),
            ..LogConfig::default()
        };
        let mut engine = LogEngine::new(config, now());
        let mut recovered = None;
        for event in files.run_to_idle(ring, &mut engine, now) {
            match event {
                LogEvent::Recovered(r) => recovered = Some(r),
                LogEvent::Stopped(e) => bail!("the log refused to open: {e}"),
                _ => {}
            }
        }
        let log = Log {
            engine,
            files,
            ring,
            events: Vec::new(),
        };
        Ok((log, recovered.context("recovery did not finish")?))
    }

    /// Performs the engine's operations until it has none left, all it issues in flight
    /// at once.
    fn drive(&mut self) {
        let events = self.files.run_to_idle(self.ring, &mut self.engine, now);
        self.events.extend(events);
    }

    /// Appends `bytes` and waits until it is durable.
    fn append(&mut self, lsn: Lsn, bytes: Vec<u8>) -> anyhow::Result<()> {
        self.engine.append(now(), lsn, bytes);
        self.drive();
        let durable = self
            .events
            .iter()
            .any(|e| matches!(e, LogEvent::Durable(l) if *l >= lsn));
        ensure!(
            durable,
            "append {lsn:?} did not become durable: {:?}",
            self.events
        );
        self.events.clear();
        Ok(())
    }

    fn fetch(
        &mut self,
        conv: ConvId,
        from: Seq,
        to: Seq,
        limit: u32,
    ) -> anyhow::Result<Vec<StoredMessage>> {
        self.engine.fetch(now(), 1, conv, from, to, limit);
        self.drive();
        let at = self
            .events
            .iter()
            .position(|e| matches!(e, LogEvent::Fetched { .. }))
            .context("the fetch was not answered")?;
        match self.events.remove(at) {
            LogEvent::Fetched { result, .. } => {
                result.map_err(|()| anyhow::anyhow!("the fetch of {conv} failed"))
            }
            _ => unreachable!(),
        }
    }

    fn close(mut self) -> anyhow::Result<()> {
        self.engine.close(now());
        self.drive();
        ensure!(
            self.events.iter().any(|e| matches!(e, LogEvent::Closed)),
            "the log did not close: {:?}",
            self.events
        );
        Ok(())
    }
}

fn bench(ring: &mut Ring, dir: PathBuf, mode: IoMode, count: u64) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(&dir);
    let (mut log, _) = Log::open(ring, dir.clone(), mode)?;
    let direct = log.files.is_direct();
    let records: Vec<Record> = (1..=count).map(message).collect();
    let mut latencies = Vec::with_capacity(records.len());
    let mut frame_bytes = 0;
    for (lsn, record) in (1..).zip(&records) {
        let mut frame = Vec::new();
        encode_record(record, &mut frame);
        frame_bytes = frame.len();
        let started = Instant::now();
        log.append(Lsn(lsn), frame)?;
        latencies.push(started.elapsed());
    }
    log.close()?;

    let (log, recovered) = Log::open(ring, dir, mode)?;
    ensure!(
        recovered.records == records,
        "recovered {} records, wrote {}",
        recovered.records.len(),
        records.len()
    );
    log.close()?;
    report(
        &format!(
            "{:>8} (O_DIRECT {direct}): {count} x append({frame_bytes} B) until durable",
            name(mode)
        ),
        &mut latencies,
    );
    println!("{:>8} all {count} records recovered", "");
    Ok(())
}

fn message(seq: u64) -> Record {
    Record::Message(StoredMessage {
        conv: ConvId::direct(UserId(3), UserId(9)),
        seq: Seq(seq),
        sender: UserId(3),
        sender_device: DeviceId(2),
        client_msg_id: ClientMsgId([seq as u8; 16]),
        high_priority: false,
        payload: Bytes::from(vec![seq as u8; PAYLOAD_BYTES]),
        ts_ms: 0,
    })
}

/// Messages per conversation in the read bench: what one Sync page asks for.
const READ_MESSAGES: u64 = 200;

/// Payload bytes of a read-bench message: a short chat message.
const READ_PAYLOAD_BYTES: usize = 240;

/// Reads timed per case.
const READ_ROUNDS: usize = 200;

/// Conversation `i` of the read bench (1-based user ids).
fn read_conv(i: u64) -> ConvId {
    ConvId::direct(UserId(1), UserId(i + 2))
}

fn read_message(conv: ConvId, seq: u64) -> StoredMessage {
    StoredMessage {
        conv,
        seq: Seq(seq),
        sender: UserId(1),
        sender_device: DeviceId(1),
        client_msg_id: ClientMsgId([seq as u8; 16]),
        high_priority: false,
        payload: Bytes::from(vec![(conv.lo ^ seq) as u8; READ_PAYLOAD_BYTES]),
        ts_ms: 0,
    }
}

/// What indexing adds to the write path: walking an append's frames with core's
/// `decode_record` (CRC and decode of every record), which the log engine does for every
/// append it writes.
fn index_cost() {
    let mut frames = Vec::new();
    let count = 100_000u64;
    for seq in 1..=count {
        encode_record(
            &Record::Message(read_message(read_conv(0), seq)),
            &mut frames,
        );
    }
    let started = Instant::now();
    let mut at = 0;
    let mut messages = 0u64;
    while at < frames.len() {
        match decode_record(&frames[at..]) {
            Decoded::Record { record, len } => {
                messages += u64::from(matches!(record, Record::Message(_)));
                at += len;
            }
            other => panic!("{other:?}"),
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(messages, count);
    println!(
        "index on write: decode_record of {count} frames of {} B: {:.0} ns per message",
        frames.len() as u64 / count,
        elapsed.as_nanos() as f64 / count as f64
    );
}

fn read_bench(ring: &mut Ring, dir: PathBuf, mode: IoMode) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(&dir);
    // Conversation 0 in a burst, 1..=10 interleaved, 11..=1010 interleaved.
    let groups: [(&str, std::ops::Range<u64>); 3] = [
        ("burst", 0..1),
        ("10 interleaved", 1..11),
        ("1000 interleaved", 11..1011),
    ];
    let (mut log, _) = Log::open(ring, dir.clone(), mode)?;
    let mut batch = Vec::new();
    let mut written = 0u64;
    let mut lsn = 0;
    for (_, convs) in &groups {
        for seq in 1..=READ_MESSAGES {
            for i in convs.clone() {
                encode_record(
                    &Record::Message(read_message(read_conv(i), seq)),
                    &mut batch,
                );
                written += 1;
                // A group commit of a few hundred messages.
                if written.is_multiple_of(500) {
                    lsn += 1;
                    log.append(Lsn(lsn), std::mem::take(&mut batch))?;
                }
            }
        }
    }
    lsn += 1;
    log.append(Lsn(lsn), batch)?;
    log.close()?;

    let started = Instant::now();
    let (mut log, recovered) = Log::open(ring, dir, mode)?;
    let recovered_in = started.elapsed();
    let conversations = groups.iter().map(|(_, c)| c.end - c.start).sum::<u64>();
    let heap = log.engine.index_heap_bytes();
    println!(
        "{:>8} read: {written} messages in {conversations} conversations, {} B in {} \
         segments, recovered in {recovered_in:?} (read {} B); index {heap} B = {:.2} B per \
         message",
        name(mode),
        log.engine.bytes(),
        recovered.segments,
        recovered.read_bytes,
        heap as f64 / written as f64,
    );
    drop(recovered);

    for (group, convs) in &groups {
        for (what, from, to) in [("200", 1, READ_MESSAGES), ("1", 100, 100)] {
            let mut latencies = Vec::with_capacity(READ_ROUNDS);
            for round in 0..READ_ROUNDS {
                let i = convs.start + round as u64 % (convs.end - convs.start);
                let conv = read_conv(i);
                let started = Instant::now();
                let got = log.fetch(conv, Seq(from), Seq(to), 1000)?;
                latencies.push(started.elapsed());
                ensure!(
                    got.len() as u64 == to - from + 1
                        && got
                            .iter()
                            .zip(from..)
                            .all(|(m, seq)| *m == read_message(conv, seq)),
                    "read of {conv} {from}..={to} gave back other messages"
                );
            }
            report(&format!("  read {what} of {group}"), &mut latencies);
        }
    }
    let past_end = log.fetch(read_conv(0), Seq(READ_MESSAGES + 1), Seq::MAX, 10)?;
    ensure!(
        past_end.is_empty(),
        "a read past the end gave {} messages",
        past_end.len()
    );
    log.close()?;
    Ok(())
}

fn report(what: &str, latencies: &mut [Duration]) {
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    let mean = latencies.iter().sum::<Duration>() / latencies.len() as u32;
    println!(
        "{what:<32} p50 {:?}  p90 {:?}  p99 {:?}  max {:?}  mean {mean:?}",
        at(0.50),
        at(0.90),
        at(0.99),
        at(1.0)
    );
}

fn name(mode: IoMode) -> &'static str {
    if mode == IoMode::Direct {
        "direct"
    } else {
        "buffered"
    }
}
