//! The log engine on the in-memory disk: appends, durability, rotation, recovery, reads,
//! failures, checkpoints and retention, each checked against what was appended.

use bytes::Bytes;
use imgate_core::log::{encode_record, Record, StoredMessage};
use imgate_core::log_engine::mem_disk::MemDisk;
use imgate_core::log_engine::{IoError, LogConfig, LogEngine, LogEvent, Op};
use imgate_core::proto::{ClientMsgId, ConvId, DeviceId, Seq, UserId};
use imgate_core::shard::Lsn;
use imgate_core::Instant;

/// An engine and its disk, operations executed in order as they come.
struct Rig {
    engine: LogEngine,
    disk: MemDisk,
    config: LogConfig,
    events: Vec<LogEvent>,
    now: Instant,
}

fn msg(conv: ConvId, seq: u64, payload: usize) -> Record {
    Record::Message(StoredMessage {
        conv,
        seq: Seq(seq),
        sender: UserId(conv.hi.max(1)),
        sender_device: DeviceId(1),
        client_msg_id: ClientMsgId([seq as u8; 16]),
        high_priority: false,
        payload: Bytes::from(vec![seq as u8; payload]),
        ts_ms: 0,
    })
}

fn frames(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        encode_record(r, &mut out);
    }
    out
}

fn conv(n: u64) -> ConvId {
    ConvId::direct(UserId(n), UserId(n + 1000))
}

impl Rig {
    fn new(config: LogConfig) -> Rig {
        Rig::on(MemDisk::new(512), config)
    }

    fn on(disk: MemDisk, config: LogConfig) -> Rig {
        let now = Instant::from_millis(1_700_000_000_000);
        let mut rig = Rig {
            engine: LogEngine::new(config.clone(), now),
            disk,
            config,
            events: Vec::new(),
            now,
        };
        rig.run();
        rig
    }

    /// Executes operations until none is left; collects events.
    fn run(&mut self) {
        loop {
            while let Some(e) = self.engine.poll_event() {
                self.events.push(e);
            }
            let Some(io) = self.engine.poll_io() else {
                return;
            };
            let result = self.disk.execute(&io.op);
            self.engine.handle_completion(self.now, io.id, result);
        }
    }

    fn recovered(&mut self) -> Vec<Record> {
        let at = self
            .events
            .iter()
            .position(|e| matches!(e, LogEvent::Recovered(_)))
            .expect("recovered");
        match self.events.remove(at) {
            LogEvent::Recovered(r) => r.records,
            _ => unreachable!(),
        }
    }

    fn durable(&self) -> Option<Lsn> {
        self.events
            .iter()
            .filter_map(|e| match e {
                LogEvent::Durable(l) => Some(*l),
                _ => None,
            })
            .max()
    }

    fn append(&mut self, lsn: u64, records: &[Record]) {
        self.engine.append(self.now, Lsn(lsn), frames(records));
        self.run();
    }

    fn fetch(&mut self, conv: ConvId, from: u64, to: u64, limit: u32) -> Result<Vec<u64>, ()> {
        self.engine
            .fetch(self.now, 77, conv, Seq(from), Seq(to), limit);
        self.run();
        let at = self
            .events
            .iter()
            .rposition(|e| matches!(e, LogEvent::Fetched { fetch: 77, .. }))
            .expect("fetched");
        match self.events.remove(at) {
            LogEvent::Fetched { result, .. } => {
                result.map(|msgs| msgs.iter().map(|m| m.seq.0).collect())
            }
            _ => unreachable!(),
        }
    }

    fn load(&mut self, conv: ConvId) -> Result<u64, ()> {
        self.engine.load(self.now, conv);
        self.run();
        let at = self
            .events
            .iter()
            .rposition(|e| matches!(e, LogEvent::Loaded { .. }))
            .expect("loaded");
        match self.events.remove(at) {
            LogEvent::Loaded { result, .. } => result.map(|s| s.0),
            _ => unreachable!(),
        }
    }

    /// Appends a checkpoint (as Lsn `lsn + 1`) if the engine asked for one; returns
    /// whether it did.
    fn checkpoint_if_due(&mut self, lsn: &mut u64) -> bool {
        let due = self
            .events
            .iter()
            .any(|e| matches!(e, LogEvent::CheckpointDue));
        if due {
            self.events
                .retain(|e| !matches!(e, LogEvent::CheckpointDue));
            *lsn += 1;
            self.append(
                *lsn,
                &[Record::Checkpoint {
                    part: 0,
                    groups: Vec::new(),
                    dedupe: Vec::new(),
                    last: true,
                }],
            );
        }
        due
    }

    fn restart(self) -> Rig {
        Rig::on(self.disk, self.config)
    }
}

fn small() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        segment_messages: 20,
        ..LogConfig::default()
    }
}

#[test]
fn appends_become_durable_and_come_back_after_a_restart() {
    let mut rig = Rig::new(small());
    assert!(rig.recovered().is_empty());
    let c = conv(1);
    for seq in 1..=100 {
        rig.append(seq, &[msg(c, seq, 50)]);
    }
    assert_eq!(rig.durable(), Some(Lsn(100)));
    assert!(
        rig.engine.segments() > 3,
        "rotated: {}",
        rig.engine.segments()
    );
    assert_eq!(rig.fetch(c, 1, 100, 100), Ok((1..=100).collect()));
    assert_eq!(rig.fetch(c, 37, 50, 5), Ok((37..=41).collect()));
    assert_eq!(rig.load(c), Ok(100));
    assert_eq!(rig.load(conv(2)), Ok(0));
    let mut rig = rig.restart();
    let records = rig.recovered();
    assert_eq!(records.len(), 100, "no checkpoint yet: the whole log");
    assert_eq!(rig.fetch(c, 1, 100, 100), Ok((1..=100).collect()));
    assert_eq!(rig.load(c), Ok(100));
    rig.append(1, &[msg(c, 101, 50)]);
    assert_eq!(rig.load(c), Ok(101));
}

#[test]
fn aligned_writes_rewrite_the_partial_block_and_recovery_cuts_the_padding() {
    let config = LogConfig {
        align: 4096,
        ..small()
    };
    let mut rig = Rig::new(config);
    rig.recovered();
    let c = conv(1);
    for seq in 1..=30 {
        rig.append(seq, &[msg(c, seq, 30)]);
    }
    let mut rig = rig.restart();
    assert_eq!(rig.recovered().len(), 30);
    assert_eq!(rig.fetch(c, 1, 30, 100), Ok((1..=30).collect()));
}

#[test]
fn a_failed_write_is_cut_back_and_reported_failed() {
    let mut rig = Rig::new(small());
    rig.recovered();
    let c = conv(1);
    rig.append(1, &[msg(c, 1, 10)]);
    // The next write fails halfway.
    rig.engine
        .append(rig.now, Lsn(2), frames(&[msg(c, 2, 600)]));
    let io = rig.engine.poll_io().expect("a write");
    assert!(matches!(io.op, Op::Write { .. }));
    let started = rig.disk.start(&io.op, Some(IoError::Io), 1);
    let result = rig.disk.finish(started);
    rig.engine.handle_completion(rig.now, io.id, result);
    rig.run();
    assert!(rig.events.iter().any(|e| matches!(e, LogEvent::Failed)));
    assert_eq!(rig.durable(), Some(Lsn(1)));
    rig.append(3, &[msg(c, 2, 10)]);
    assert_eq!(rig.durable(), Some(Lsn(3)));
    let mut rig = rig.restart();
    let records = rig.recovered();
    assert_eq!(records, vec![msg(c, 1, 10), msg(c, 2, 10)]);
}

#[test]
fn pipelined_syncs_cover_only_what_was_written_before_them() {
    let mut rig = Rig::new(small());
    rig.recovered();
    let c = conv(1);
    rig.engine.append(rig.now, Lsn(1), frames(&[msg(c, 1, 10)]));
    let write1 = rig.engine.poll_io().unwrap();
    let r = rig.disk.execute(&write1.op);
    rig.engine.handle_completion(rig.now, write1.id, r);
    let sync1 = rig.engine.poll_io().unwrap();
    assert!(matches!(sync1.op, Op::Sync(_)));
    let s1 = rig.disk.start(&sync1.op, None, 0);
    // A second append is written while the first sync runs, and a second sync starts.
    rig.engine.append(rig.now, Lsn(2), frames(&[msg(c, 2, 10)]));
    let write2 = rig.engine.poll_io().unwrap();
    let r = rig.disk.execute(&write2.op);
    rig.engine.handle_completion(rig.now, write2.id, r);
    let sync2 = rig
        .engine
        .poll_io()
        .expect("a second sync while the first runs");
    assert!(matches!(sync2.op, Op::Sync(_)));
    let s2 = rig.disk.start(&sync2.op, None, 0);
    // The first sync returns: only the first append is durable.
    let r = rig.disk.finish(s1);
    rig.engine.handle_completion(rig.now, sync1.id, r);
    rig.run();
    assert_eq!(rig.durable(), Some(Lsn(1)));
    let r = rig.disk.finish(s2);
    rig.engine.handle_completion(rig.now, sync2.id, r);
    rig.run();
    assert_eq!(rig.durable(), Some(Lsn(2)));
}

#[test]
fn recovery_starts_at_the_last_checkpoint() {
    let mut rig = Rig::new(LogConfig {
        checkpoint_messages: 10,
        ..small()
    });
    rig.recovered();
    let c = conv(1);
    let mut lsn = 0;
    let mut asked = 0;
    for seq in 1..=50 {
        lsn += 1;
        rig.append(lsn, &[msg(c, seq, 20)]);
        if rig.checkpoint_if_due(&mut lsn) {
            asked += 1;
        }
    }
    assert!(asked >= 4, "asked {asked} times");
    let mut rig = rig.restart();
    let records = rig.recovered();
    assert!(
        matches!(records[0], Record::Checkpoint { .. }),
        "{:?}",
        records[0]
    );
    assert!(records.len() < 20, "replayed {} records", records.len());
    assert_eq!(rig.fetch(c, 1, 50, 100), Ok((1..=50).collect()));
}

#[test]
fn retention_removes_old_segments_and_reads_report_where_history_starts() {
    let mut rig = Rig::new(LogConfig {
        checkpoint_messages: 10,
        retention_bytes: Some(8192),
        ..small()
    });
    rig.recovered();
    let (a, b) = (conv(1), conv(2));
    let mut lsn = 0;
    for seq in 1..=200 {
        lsn += 1;
        rig.append(lsn, &[msg(a, seq, 20)]);
        if seq == 1 {
            lsn += 1;
            rig.append(lsn, &[msg(b, 1, 20)]);
        }
        rig.checkpoint_if_due(&mut lsn);
    }
    assert!(
        rig.engine.bytes() <= 8192 + 4096,
        "{} bytes",
        rig.engine.bytes()
    );
    let got = rig.fetch(a, 1, 200, 500).unwrap();
    let first = got[0];
    assert!(first > 1, "old history removed");
    assert_eq!(got, (first..=200).collect::<Vec<_>>());
    // A conversation whose every message was removed still knows its last seq.
    assert_eq!(rig.fetch(b, 1, 1, 10), Ok(vec![]));
    assert_eq!(rig.load(b), Ok(1));
    let mut rig = rig.restart();
    rig.recovered();
    assert_eq!(rig.load(b), Ok(1));
    assert_eq!(rig.fetch(a, 1, 200, 500).unwrap()[0], first);
}

#[test]
fn a_damaged_index_block_is_never_believed() {
    let mut rig = Rig::new(small());
    rig.recovered();
    let (a, b) = (conv(1), conv(2));
    rig.append(1, &[msg(a, 1, 20), msg(a, 2, 20)]);
    for seq in 1..=40 {
        rig.append(seq + 1, &[msg(b, seq, 20)]);
    }
    assert!(rig.engine.segments() > 2);
    assert_eq!(rig.load(a), Ok(2));
    // One bit of a's last entry in segment 1's index file (its seq field): the block no
    // longer matches its crc in the summary.
    let name = imgate_core::log_engine::FileId::Index(1).name();
    let mut idx = rig.disk.file(&name).expect("segment 1 is sealed").to_vec();
    let entry = 32 + 32; // the header, then a's second entry (a sorts before b)
    idx[entry + 16] ^= 0x04;
    rig.disk.put(&name, idx);
    assert_eq!(rig.load(a), Err(()), "a damaged block answered a Load");
    assert_eq!(
        rig.fetch(a, 1, 2, 10),
        Err(()),
        "a damaged block answered a Fetch"
    );
    assert_eq!(rig.load(b), Ok(40), "other blocks and segments still serve");
}
