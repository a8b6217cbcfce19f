//! Latency of one durable append to the warm-tier log on this machine's disk: `write` of
//! one ~4 KiB record, then `sync` (an O_DIRECT write and an fdatasync), in a loop; then the
//! same with buffered I/O. Prints p50/p99/max, and checks that a reopen recovers every
//! record.
//!
//! Then the read path, in both modes: a log of 200 messages (~300 B) in each of 1,011
//! conversations (one written in a burst, 10 interleaved with each other, 1,000
//! interleaved with each other), reopened so that the read index is rebuilt. Prints the
//! recovery time, the index's memory, the cost of indexing on the write path, and the
//! latency of reading 200 messages of one conversation (and 1) from disk.
//!
//! ```text
//! cargo run --release -p imgate-gateway --example log_bench [-- DIR [COUNT]]
//! ```
//!
//! DIR defaults to a fresh directory under the system temp dir (removed afterwards), COUNT
//! to 1000. Numbers, not pass/fail; it fails only if recovery or a read does not give back
//! what was written.

// The gateway has no library target, so the example compiles the module itself; it uses
// only part of its API.
#[allow(dead_code)]
#[path = "../src/storage.rs"]
mod storage;

use anyhow::{ensure, Context};
use bytes::Bytes;
use imgate_core::log::{decode_record, encode_record, Decoded, Record, StoredMessage};
use imgate_core::proto::{ClientMsgId, ConvId, DeviceId, Seq, UserId};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use storage::{IoMode, LogConfig};

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

    let executor = glommio::LocalExecutorBuilder::default()
        .io_memory(2 * 1024 * 1024)
        .make()
        .map_err(|err| anyhow::anyhow!("glommio executor: {err}"))?;
    let result = executor.run(async {
        for (mode, name) in [(IoMode::Direct, "direct"), (IoMode::Buffered, "buffered")] {
            bench(root.join(name), mode, count).await?;
        }
        index_cost();
        for (mode, name) in [(IoMode::Direct, "direct"), (IoMode::Buffered, "buffered")] {
            read_bench(root.join(format!("{name}-read")), mode).await?;
        }
        anyhow::Ok(())
    });
    if remove {
        let _ = std::fs::remove_dir_all(&root);
    }
    result
}

async fn bench(dir: PathBuf, mode: IoMode, count: u64) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(&dir);
    let config = LogConfig {
        dir: dir.clone(),
        segment_bytes: storage::SEGMENT_BYTES_DEFAULT,
        segment_messages: storage::SEGMENT_MESSAGES_DEFAULT,
    };
    let (mut log, _) = storage::open_with_mode(config.clone(), mode).await?;
    let records: Vec<Record> = (1..=count).map(message).collect();
    let mut latencies = Vec::with_capacity(records.len());
    let mut frame = Vec::new();
    for record in &records {
        frame.clear();
        encode_record(record, &mut frame);
        let started = Instant::now();
        log.write(&frame).await?;
        log.sync().await?;
        latencies.push(started.elapsed());
    }
    let frame_bytes = frame.len();
    let direct = log.is_direct();
    log.close().await?;

    let (_, recovery) = storage::open_with_mode(config, mode).await?;
    ensure!(
        recovery.records == records,
        "recovered {} records, wrote {}",
        recovery.records.len(),
        records.len()
    );

    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    let mean = latencies.iter().sum::<Duration>() / latencies.len() as u32;
    println!(
        "{:>8} (O_DIRECT {direct}): {count} x write({frame_bytes} B)+sync  p50 {:?}  p90 {:?}  \
         p99 {:?}  max {:?}  mean {mean:?}; all {count} records recovered",
        if mode == IoMode::Direct {
            "direct"
        } else {
            "buffered"
        },
        at(0.50),
        at(0.90),
        at(0.99),
        at(1.0),
    );
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
    }
}

/// What indexing adds to the write path: walking a batch's frames with core's
/// `decode_record` (CRC and decode of every record).
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

async fn read_bench(dir: PathBuf, mode: IoMode) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(&dir);
    let config = LogConfig {
        dir: dir.clone(),
        segment_bytes: storage::SEGMENT_BYTES_DEFAULT,
        segment_messages: storage::SEGMENT_MESSAGES_DEFAULT,
    };
    // Conversation 0 in a burst, 1..=10 interleaved, 11..=1010 interleaved.
    let groups: [(&str, std::ops::Range<u64>); 3] = [
        ("burst", 0..1),
        ("10 interleaved", 1..11),
        ("1000 interleaved", 11..1011),
    ];
    let (mut log, _) = storage::open_with_mode(config.clone(), mode).await?;
    let mut batch = Vec::new();
    let mut written = 0u64;
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
                    log.write(&batch).await?;
                    log.sync().await?;
                    batch.clear();
                }
            }
        }
    }
    log.write(&batch).await?;
    log.close().await?;

    let started = Instant::now();
    let (log, recovery) = storage::open_with_mode(config, mode).await?;
    let recovered_in = started.elapsed();
    let reader = log.reader();
    let stats = reader.index_stats();
    ensure!(
        stats.messages == written,
        "indexed {stats:?}, wrote {written}"
    );
    let per_conv =
        (stats.heap_bytes as f64 - 8.0 * stats.messages as f64) / stats.conversations as f64;
    println!(
        "{:>8} read: {written} messages in {} conversations, {} B in {} segments, recovered in \
         {recovered_in:?}; index {} B = {:.2} B per message, {:.0} B per conversation beyond \
         8 B per message",
        name(mode),
        stats.conversations,
        recovery.bytes,
        recovery.segments,
        stats.heap_bytes,
        stats.heap_bytes as f64 / stats.messages as f64,
        per_conv,
    );
    drop(recovery);

    for (group, convs) in &groups {
        for (what, from, to) in [("200", 1, READ_MESSAGES), ("1", 100, 100)] {
            let mut latencies = Vec::with_capacity(READ_ROUNDS);
            for round in 0..READ_ROUNDS {
                let i = convs.start + round as u64 % (convs.end - convs.start);
                let conv = read_conv(i);
                let started = Instant::now();
                let got = reader.read(conv, Seq(from), Seq(to), 1000).await?;
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
    let past_end = reader
        .read(read_conv(0), Seq(READ_MESSAGES + 1), Seq(u64::MAX), 10)
        .await?;
    ensure!(
        past_end.is_empty(),
        "a read past the end gave {} messages",
        past_end.len()
    );
    Ok(())
}

fn report(what: &str, latencies: &mut [Duration]) {
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    println!(
        "{what:<32} p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
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
