//! Latency of one durable append to the warm-tier log on this machine's disk: `write` of
//! one ~4 KiB record, then `sync` (an O_DIRECT write and an fdatasync), in a loop; then the
//! same with buffered I/O. Prints p50/p99/max, and checks that a reopen recovers every
//! record.
//!
//! ```text
//! cargo run --release -p imgate-gateway --example log_bench [-- DIR [COUNT]]
//! ```
//!
//! DIR defaults to a fresh directory under the system temp dir (removed afterwards), COUNT
//! to 1000. Numbers, not pass/fail; it fails only if recovery does not give back what was
//! written.

// The gateway has no library target, so the example compiles the module itself; it uses
// only part of its API.
#[allow(dead_code)]
#[path = "../src/storage.rs"]
mod storage;

use anyhow::{ensure, Context};
use bytes::Bytes;
use imgate_core::log::{encode_record, Record, StoredMessage};
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
