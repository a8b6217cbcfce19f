//! One run: the world, its fault schedule, the step loop and the final checks.

use crate::device::{self, Device, SlowRead};
use crate::disk;
use crate::gateway;
use crate::oracle::Oracle;
use crate::rng::Rng;
use imgate_core::log::StoredMessage;
#[cfg(test)]
use imgate_core::log_engine::PlantedLogBug;
use imgate_core::proto::{ConvId, UserId};
use imgate_core::Instant;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

/// Core time 0 of a run: 2026-01-01, so tokens are checked against real Unix time.
pub const EPOCH_MS: u64 = 1_767_225_600_000;
/// Users in the world; each has [`DEVICES_PER_USER`] devices.
pub const USERS: u64 = 3;
/// Devices per user.
pub const DEVICES_PER_USER: u32 = 2;
/// The one group: every user is a member.
pub const GROUP: ConvId = ConvId { hi: 0, lo: 7 };
/// The heal period at the end of a run (no faults, no new sends): 15 s of a 40 s run, and
/// never under 8 s, which covers a dead-link detection (2 heartbeats of 2 s), a reconnect
/// and a few retry rounds.
fn heal_secs(duration_secs: u64) -> u64 {
    (duration_secs * 3 / 8).max(8)
}

/// A kind of fault. Each is on or off per seed, at a rate of its own (swarm testing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// Gateway crash and restart at a random instant.
    Crash,
    /// Both directions of a device's link to the gateway dropped for a while.
    Partition,
    /// A device's link held (nothing delivered), then released.
    Hold,
    /// turmoil breaks links at random (a TCP connection dies).
    LinkFail,
    /// A group commit fails (write or fdatasync error).
    Disk,
    /// A shard pair's queue is held back for a while.
    MeshDelay,
    /// Every device drops its connection at once.
    Storm,
    /// A device logs in again while its session is live.
    Takeover,
    /// Eager explicit retries of timed-out messages.
    Retry,
    /// One direction of a device's link dropped (device to gateway, or back).
    OneWay,
    /// A device's link to the gateway slows to a fixed latency of up to 2.5 s for a while.
    Spike,
    /// A device reads its socket slowly, or not at all, for a while; the gateway of such a
    /// seed has a tight outbound budget, so the connection degrades (pushes become Notify)
    /// and may be closed as a slow consumer.
    SlowReader,
    /// Gateway crash at a chosen point of the durability path: after an append is
    /// written and before it is synced, or after the sync returned and before the engine
    /// hears of it (so before any Ack or Deliver).
    PointCrash,
    /// A device's app crashes and restarts from what it committed to its database.
    DeviceCrash,
    /// The gateway's disk fills up (ENOSPC from turmoil's fs); a reserve file is deleted
    /// after a while, so that it heals.
    DiskFull,
}

/// A point of the gateway's durability path where a crash can be armed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// Appends written to the log, their sync not started.
    AfterAppend,
    /// A sync returned; `handle_durable` not called, so no Ack or Deliver written.
    AfterDurable,
}

impl FaultKind {
    /// Every kind, in the order rates are drawn.
    pub const ALL: [FaultKind; 15] = [
        FaultKind::Crash,
        FaultKind::Partition,
        FaultKind::Hold,
        FaultKind::LinkFail,
        FaultKind::Disk,
        FaultKind::MeshDelay,
        FaultKind::Storm,
        FaultKind::Takeover,
        FaultKind::Retry,
        FaultKind::OneWay,
        FaultKind::Spike,
        FaultKind::SlowReader,
        FaultKind::PointCrash,
        FaultKind::DeviceCrash,
        FaultKind::DiskFull,
    ];

    /// The kind's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Crash => "crash",
            FaultKind::Partition => "partition",
            FaultKind::Hold => "hold",
            FaultKind::LinkFail => "link-fail",
            FaultKind::Disk => "disk",
            FaultKind::MeshDelay => "mesh-delay",
            FaultKind::Storm => "storm",
            FaultKind::Takeover => "takeover",
            FaultKind::Retry => "retry",
            FaultKind::OneWay => "one-way",
            FaultKind::Spike => "spike",
            FaultKind::SlowReader => "slow-reader",
            FaultKind::PointCrash => "point-crash",
            FaultKind::DeviceCrash => "device-crash",
            FaultKind::DiskFull => "disk-full",
        }
    }

    /// The kind named `name`.
    pub fn from_name(name: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// Which fault kinds a run may draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultSet {
    /// No faults: a baseline.
    None,
    /// Every kind, each on or off and at its own rate by the seed.
    All,
    /// One kind only, on at a rate drawn by the seed (to show what that kind can catch).
    Only(FaultKind),
}

/// A bug planted in the driver, the devices' apps, or (the durability bugs, and the
/// dedupe one) core's engines through their `planted-bugs` feature, which only the sim's
/// tests turn on. Never on by default: the oracle must catch each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Planted {
    /// The log engine reports appends durable when their write completes, before a sync.
    #[cfg(test)]
    AckBeforeDurable,
    /// The driver drops the last Deliver frame written before a SyncDone.
    SyncReplaySkip,
    /// The driver recovers a shard from its log less the last message record.
    SeqNotRecovered,
    /// The driver drops every Notify frame (the push a degraded connection gets instead of
    /// its Delivers), so a slow reader is never told to pull.
    NotifyDropped,
    /// A restarted device's app re-sends its persisted outbox as new messages (new ids)
    /// instead of restoring it.
    OutboxNewIds,
    /// A restarted device's app forgets its persisted outbox.
    OutboxDropped,
    /// After a failed log write or sync the log engine tells the shard without cutting
    /// the open segment back to its durable length.
    #[cfg(test)]
    NoTruncateOnFailure,
    /// The log engine's recovery keeps a torn tail and appends after it.
    #[cfg(test)]
    TornTailKept,
    /// A sync makes durable what was written by the time it returned, not by the time it
    /// started.
    #[cfg(test)]
    SyncCoversLaterWrites,
    /// The log engine serves reads from index entries that are not durable yet.
    #[cfg(test)]
    IndexPastDurable,
    /// The log engine writes a checkpoint ahead of the appends queued before it.
    #[cfg(test)]
    CheckpointAheadOfDurable,
    /// The engine skips its dedupe window (core's `planted-bugs` feature, on only in the
    /// sim's tests).
    #[cfg(test)]
    DedupeOff,
    /// A home puts a conversation in an inbox in memory only, without a log record
    /// (core's `planted-bugs` feature, on only in the sim's tests).
    #[cfg(test)]
    InboxNotDurable,
}

#[cfg(test)]
impl Planted {
    /// The log engine bug this is, if it is one.
    pub fn log_bug(self) -> Option<PlantedLogBug> {
        Some(match self {
            Planted::AckBeforeDurable => PlantedLogBug::AckBeforeDurable,
            Planted::NoTruncateOnFailure => PlantedLogBug::NoTruncateOnFailure,
            Planted::TornTailKept => PlantedLogBug::TornTailKept,
            Planted::SyncCoversLaterWrites => PlantedLogBug::SyncCoversLaterWrites,
            Planted::IndexPastDurable => PlantedLogBug::IndexPastDurable,
            Planted::CheckpointAheadOfDurable => PlantedLogBug::CheckpointAheadOfDurable,
            _ => return None,
        })
    }
}

/// What a run does.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The seed: everything follows from it.
    pub seed: u64,
    /// Simulated seconds, heal period included.
    pub duration_secs: u64,
    /// Faults allowed.
    pub faults: FaultSet,
    /// A planted driver bug, for the oracle's acceptance tests.
    pub planted: Option<Planted>,
    /// Keep every trace line (otherwise only the hash).
    pub keep_trace: bool,
}

impl RunConfig {
    /// A run of `seed` with defaults: 40 s, every fault kind.
    pub fn new(seed: u64) -> RunConfig {
        RunConfig {
            seed,
            duration_secs: 40,
            faults: FaultSet::All,
            planted: None,
            keep_trace: false,
        }
    }
}

/// Per-kind rates drawn for a run (0 = off).
#[derive(Clone, Debug, Default)]
pub struct Rates {
    /// Mean seconds between gateway crashes.
    pub crash_every_s: f64,
    /// Mean seconds between client partitions.
    pub partition_every_s: f64,
    /// Mean seconds between holds.
    pub hold_every_s: f64,
    /// turmoil link fail rate per step.
    pub link_fail: f64,
    /// Probability that an fdatasync fails.
    pub disk_fail: f64,
    /// Probability that a read or write of turmoil's disk fails with EIO (the whole run:
    /// turmoil's fs has no switch for the heal).
    pub disk_io: f64,
    /// Disk-full seeds: ms a disk stays full before a reserve file is deleted, and how many
    /// reserve files there are.
    pub disk_full: Option<(u64, usize)>,
    /// Disk-full seeds: free bytes on the disk besides the reserves.
    pub disk_full_headroom: u64,
    /// The disk's torn-write granularity in bytes.
    pub block_size: u64,
    /// Probability that turmoil's disk makes a write durable before any sync.
    pub early_flush: f64,
    /// The log engine's write alignment: 1 (buffered) or 512 (aligned writes that
    /// rewrite the partial block before them, as O_DIRECT does).
    pub log_align: u64,
    /// Messages at which the log engine seals a segment.
    pub segment_messages: usize,
    /// Durable messages after which the log engine asks for a checkpoint.
    pub checkpoint_messages: u64,
    /// fdatasyncs the log engine keeps in flight: 2 (pipelined, as the gateway with
    /// O_DIRECT) or 1 (as with buffered writes).
    pub syncs_inflight_max: usize,
    /// Probability per tick that a shard pair is held back.
    pub mesh_delay: f64,
    /// Mean seconds between reconnect storms.
    pub storm_every_s: f64,
    /// Probability per device tick of a takeover (a second login of the device).
    pub takeover: f64,
    /// Probability per device tick of retrying an unacked message.
    pub retry: f64,
    /// Mean seconds between one-way partitions.
    pub oneway_every_s: f64,
    /// Mean seconds between latency spikes on a device's link.
    pub spike_every_s: f64,
    /// Mean seconds between slow readers.
    pub slow_every_s: f64,
    /// The gateway's outbound budget (soft bytes, hard bytes, grace ms) when not the
    /// default: tight in seeds with slow readers, so that one crosses it within a fault.
    pub outbound: Option<(usize, usize, u64)>,
    /// Mean seconds between crashes armed at a chosen point.
    pub point_crash_every_s: f64,
    /// Mean seconds between device crashes.
    pub device_crash_every_s: f64,
    /// Probability that a device's app commits what it showed after a read (0: apps
    /// persist nothing, as no device crashes).
    pub persist: f64,
}

/// Counters of faults injected, by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Gateway crashes.
    pub crash: u64,
    /// Recoveries that cut a torn or garbage tail off a shard's log file (what turmoil's
    /// disk kept of unsynced writes at a crash: blocks of them, or zeros).
    pub torn: u64,
    /// Partitions.
    pub partition: u64,
    /// Holds.
    pub hold: u64,
    /// Failed log writes (EIO from turmoil's disk) and failed fdatasyncs.
    pub disk: u64,
    /// Shard-pair delays.
    pub mesh: u64,
    /// Reconnect storms.
    pub storm: u64,
    /// Takeovers.
    pub takeover: u64,
    /// Explicit retries.
    pub retry: u64,
    /// One-way partitions.
    pub oneway: u64,
    /// Latency spikes.
    pub spike: u64,
    /// Slow readers.
    pub slow: u64,
    /// Not a fault: Notify frames devices received (pushes the gateway turned into Notify
    /// for a degraded connection), evidence that slow readers reach that path.
    pub notify_seen: u64,
    /// Not a fault: connections the gateway closed as slow consumers, as devices saw it.
    pub slow_closed: u64,
    /// Gateway crashes after an append was written, before its sync.
    pub crash_appended: u64,
    /// Gateway crashes after a sync returned, before the engine was told.
    pub crash_durable: u64,
    /// Device crashes.
    pub device_crash: u64,
    /// Not a fault: unacked messages a restarted device put back into its engine.
    pub restored: u64,
    /// Times the gateway's disk was found full (ENOSPC).
    pub disk_full: u64,
    /// Reserve files deleted to free the disk.
    pub freed: u64,
    /// Log reads that failed (EIO) and were retried.
    pub read_retry: u64,
    /// History reads that failed on every attempt (reported to the shard as failed,
    /// never as history gone).
    pub read_failed: u64,
    /// Not a fault: conversations a shard loaded back from its log after they left its
    /// memory (the sim keeps only a few in memory), evidence that the path runs.
    pub loaded: u64,
}

impl FaultCounts {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &FaultCounts) {
        let FaultCounts {
            crash,
            torn,
            partition,
            hold,
            disk,
            mesh,
            storm,
            takeover,
            retry,
            oneway,
            spike,
            slow,
            notify_seen,
            slow_closed,
            crash_appended,
            crash_durable,
            device_crash,
            restored,
            disk_full,
            freed,
            read_retry,
            read_failed,
            loaded,
        } = other;
        self.crash += crash;
        self.torn += torn;
        self.partition += partition;
        self.hold += hold;
        self.disk += disk;
        self.mesh += mesh;
        self.storm += storm;
        self.takeover += takeover;
        self.retry += retry;
        self.oneway += oneway;
        self.spike += spike;
        self.slow += slow;
        self.notify_seen += notify_seen;
        self.slow_closed += slow_closed;
        self.crash_appended += crash_appended;
        self.crash_durable += crash_durable;
        self.device_crash += device_crash;
        self.restored += restored;
        self.disk_full += disk_full;
        self.freed += freed;
        self.read_retry += read_retry;
        self.read_failed += read_failed;
        self.loaded += loaded;
    }
}

/// The state every host shares (one thread: `Rc<RefCell<_>>`, never held across an await).
pub struct Shared {
    /// The run.
    pub cfg: RunConfig,
    /// The rates of this run.
    pub rates: Rates,
    /// Faults are on (false during the heal).
    pub faults_on: bool,
    /// Devices send new messages (false during the heal).
    pub workload_on: bool,
    /// The groups were created (first boot done).
    pub booted: bool,
    /// The oracle.
    pub oracle: Oracle,
    /// Fault counters.
    pub counts: FaultCounts,
    /// Bumped by a reconnect storm.
    pub storm_gen: u64,
    /// A gateway crash armed at a point, with its down time.
    pub crash_point: Option<(CrashPoint, u64)>,
    /// The gateway stopped at an armed point: the run loop crashes it now.
    pub crash_now: Option<(CrashPoint, u64)>,
    /// Devices stopped right after a send (an armed crash), with their down times. Several
    /// can stop within one step of the run loop; each is crashed.
    pub device_stopped: Vec<(usize, u64)>,
    /// The devices, by index.
    pub devices: Vec<Device>,
    trace_hash: u64,
    /// Trace lines, if kept.
    pub trace: Vec<String>,
    /// Trace events recorded.
    pub events: u64,
    /// Simulated ms of the run loop's current step.
    pub loop_ms: u64,
}

impl Shared {
    /// Adds an event to the trace (and its hash).
    pub fn event(&mut self, line: String) {
        // Outside a host (the run loop injecting faults) the loop's time stands in.
        let now = turmoil::sim_elapsed().map_or(self.loop_ms, |d| d.as_millis() as u64);
        let line = format!("{now:>6}ms {line}");
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            self.trace_hash ^= u64::from(b);
            self.trace_hash = self.trace_hash.wrapping_mul(0x0100_0000_01b3);
        }
        self.events += 1;
        if self.cfg.keep_trace {
            self.trace.push(line);
        }
    }

    /// Violations so far.
    pub fn violation_count(&self) -> usize {
        self.oracle.violations.len()
    }

    /// Messages of shard `shard`'s log that became durable, in log order, for the oracle.
    pub fn observe_durable(&mut self, shard: usize, msgs: &[StoredMessage]) {
        for m in msgs {
            let line = format!(
                "durable s{shard} {} seq {} from u{}",
                m.conv, m.seq.0, m.sender.0
            );
            self.event(line);
        }
        let before = self.violation_count();
        self.oracle.handle_durable(msgs);
        self.note_violations(before);
    }

    /// Adds trace lines for violations found since `before`.
    pub fn note_violations(&mut self, before: usize) {
        let new: Vec<String> = self.oracle.violations[before..].to_vec();
        for v in new {
            self.event(format!("VIOLATION {v}"));
        }
    }
}

/// Core time now.
pub fn core_now() -> Instant {
    let ms = turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as u64);
    Instant::from_millis(EPOCH_MS + ms)
}

/// The conversations of `user`: the group and a direct chat with every other user.
pub fn convs_of(user: u64) -> Vec<ConvId> {
    let mut v = vec![GROUP];
    for other in 1..=USERS {
        if other != user {
            v.push(ConvId::direct(
                UserId(user.min(other)),
                UserId(user.max(other)),
            ));
        }
    }
    v
}

/// The result of one run.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// Hash of the event trace.
    pub trace_hash: u64,
    /// Trace events recorded.
    pub events: u64,
    /// Simulated milliseconds run.
    pub simulated_ms: u64,
    /// Faults injected.
    pub counts: FaultCounts,
    /// Message deliveries checked at the end (seqs times devices).
    pub checked: u64,
    /// Durable messages.
    pub durable: usize,
    /// Violations, first first.
    pub violations: Vec<String>,
    /// Trace lines if kept.
    pub trace: Vec<String>,
}

fn draw_rates(rng: &mut Rng, faults: FaultSet) -> Rates {
    // Swarm testing: each kind is on with probability 1/2 (or only the one asked for), at a
    // rate of its own. Both draws are made for every kind, so that a kind's rate does not
    // depend on which others are on.
    let mut r = Rates::default();
    for kind in FaultKind::ALL {
        let coin = rng.chance(0.5);
        let u = rng.unit();
        let on = match faults {
            FaultSet::None => false,
            FaultSet::All => coin,
            FaultSet::Only(k) => k == kind,
        };
        if !on {
            continue;
        }
        match kind {
            FaultKind::Crash => r.crash_every_s = 3.0 + 10.0 * u,
            FaultKind::Partition => r.partition_every_s = 1.0 + 5.0 * u,
            FaultKind::Hold => r.hold_every_s = 1.0 + 5.0 * u,
            FaultKind::LinkFail => r.link_fail = 0.0005 * u,
            FaultKind::Disk => {
                r.disk_io = 0.02 * u;
                r.disk_fail = 0.05 * u;
            }
            FaultKind::MeshDelay => r.mesh_delay = 0.05 * u,
            FaultKind::Storm => r.storm_every_s = 3.0 + 10.0 * u,
            FaultKind::Takeover => r.takeover = 0.002 * u,
            FaultKind::Retry => r.retry = 0.02 * u,
            FaultKind::OneWay => r.oneway_every_s = 1.0 + 5.0 * u,
            FaultKind::Spike => r.spike_every_s = 1.0 + 5.0 * u,
            FaultKind::SlowReader => {
                r.slow_every_s = 1.0 + 4.0 * u;
                // Soft 1-4 KiB: a few seconds of one device's traffic. Hard 96 KiB: room
                // for a full Sync replay (100 messages in each of 3 conversations).
                let soft = 1024 + (3072.0 * u) as usize;
                r.outbound = Some((soft, 96 * 1024, 500 + (2000.0 * u) as u64));
            }
            FaultKind::PointCrash => r.point_crash_every_s = 2.0 + 8.0 * u,
            FaultKind::DeviceCrash => {
                r.device_crash_every_s = 1.0 + 5.0 * u;
                r.persist = 0.1 + 0.9 * u;
            }
            FaultKind::DiskFull => {
                // The disk fills after 16-80 KiB of log (a 40 s run writes 100-400 KiB:
                // messages, index and summary files, and checkpoints, which carry the
                // dedupe window), and a reserve is freed 0.2-3 s after a write first
                // failed.
                r.disk_full_headroom = 16 * 1024 + (64.0 * 1024.0 * u) as u64;
                r.disk_full = Some((200 + (2800.0 * u) as u64, 3));
            }
        }
    }
    // The disk's own model, in every seed: torn-write granularity (small, as the sim's
    // records are 40-200 bytes; 4096 keeps every record whole) and early flushes.
    r.block_size = [8, 16, 32, 4096][rng.range(0, 4) as usize];
    r.early_flush = 0.1 * rng.unit();
    // The log engine's shape: small segments and frequent checkpoints, so that every seed
    // rotates, checkpoints, and recovers from a checkpoint.
    r.log_align = [1, 512][rng.range(0, 2) as usize];
    r.segment_messages = rng.range(8, 33) as usize;
    r.checkpoint_messages = rng.range(32, 97);
    r.syncs_inflight_max = rng.range(1, 3) as usize;
    r
}

impl Rates {
    /// Reserve files on the disk (disk-full seeds only).
    pub fn reserves(&self) -> usize {
        self.disk_full.map_or(0, |(_, n)| n)
    }
}

#[derive(Debug)]
enum Fault {
    Crash {
        down_ms: u64,
    },
    Partition {
        dev: usize,
        ms: u64,
    },
    Hold {
        dev: usize,
        ms: u64,
    },
    Storm,
    /// Drop what `dev` sends to the gateway (`up`) or what the gateway sends to `dev`.
    OneWay {
        dev: usize,
        up: bool,
        ms: u64,
    },
    /// Every message on `dev`'s link takes `latency_ms`, for `ms`.
    Spike {
        dev: usize,
        latency_ms: u64,
        ms: u64,
    },
    /// Device `dev` crashes, down for `down_ms`: now, or right after its next send.
    DeviceCrash {
        dev: usize,
        down_ms: u64,
        after_send: bool,
    },
    /// The gateway crashes when it next reaches `point`, down for `down_ms`.
    PointCrash {
        point: CrashPoint,
        down_ms: u64,
    },
    /// `dev` reads at most `chunk` bytes every `pause_ms`, for `ms`.
    Slow {
        dev: usize,
        chunk: usize,
        pause_ms: u64,
        ms: u64,
    },
}

fn schedule(rng: &mut Rng, rates: &Rates, until_ms: u64, devices: usize) -> Vec<(u64, Fault)> {
    let mut out = Vec::new();
    let mut add = |every_s: f64, rng: &mut Rng, make: &mut dyn FnMut(&mut Rng) -> Fault| {
        if every_s <= 0.0 {
            return;
        }
        let mut t = 1000.0;
        loop {
            // Exponential gaps: -ln(u) * mean.
            t += -(1.0 - rng.unit()).ln() * every_s * 1000.0;
            if t as u64 >= until_ms {
                break;
            }
            out.push((t as u64, make(rng)));
        }
    };
    add(rates.crash_every_s, rng, &mut |r| Fault::Crash {
        down_ms: r.range(10, 2000),
    });
    add(rates.partition_every_s, rng, &mut |r| Fault::Partition {
        dev: r.range(0, devices as u64) as usize,
        ms: r.range(100, 6000),
    });
    add(rates.hold_every_s, rng, &mut |r| Fault::Hold {
        dev: r.range(0, devices as u64) as usize,
        ms: r.range(100, 3000),
    });
    add(rates.storm_every_s, rng, &mut |_| Fault::Storm);
    add(rates.oneway_every_s, rng, &mut |r| Fault::OneWay {
        dev: r.range(0, devices as u64) as usize,
        up: r.chance(0.5),
        ms: r.range(100, 6000),
    });
    add(rates.spike_every_s, rng, &mut |r| Fault::Spike {
        dev: r.range(0, devices as u64) as usize,
        latency_ms: r.range(50, 2500),
        ms: r.range(200, 5000),
    });
    let slow = |r: &mut Rng, ms: u64| Fault::Slow {
        dev: r.range(0, devices as u64) as usize,
        chunk: r.range(16, 512) as usize,
        // One in four stops reading altogether.
        pause_ms: if r.chance(0.25) { ms } else { r.range(20, 400) },
        ms,
    };
    add(rates.slow_every_s, rng, &mut |r| {
        let ms = r.range(500, 6000);
        slow(r, ms)
    });
    add(rates.point_crash_every_s, rng, &mut |r| Fault::PointCrash {
        point: if r.chance(0.5) {
            CrashPoint::AfterAppend
        } else {
            CrashPoint::AfterDurable
        },
        down_ms: r.range(10, 2000),
    });
    add(rates.device_crash_every_s, rng, &mut |r| {
        Fault::DeviceCrash {
            dev: r.range(0, devices as u64) as usize,
            down_ms: r.range(10, 3000),
            after_send: r.chance(0.5),
        }
    });
    if rates.slow_every_s > 0.0 {
        // The last slow reader is still slow when the faults stop, so that the way from a
        // degraded connection to a healed device is taken in every such seed.
        let at = until_ms.saturating_sub(rng.range(1000, 4000));
        let f = slow(rng, until_ms - at + 1000);
        out.push((at, f));
    }
    out.sort_by_key(|(t, _)| *t);
    out
}

/// The network's usual latency range, min and max, in ms.
const LATENCY_MS: (u64, u64) = (1, 20);

/// Host name of device `i`.
pub fn device_host(i: usize) -> String {
    format!("dev{i}")
}

/// Runs one seed and checks it.
pub fn run_seed(cfg: &RunConfig) -> Outcome {
    let mut rng = Rng::new(cfg.seed, 0);
    let rates = draw_rates(&mut rng, cfg.faults);
    let duration_ms = cfg.duration_secs * 1000;
    let faults_until_ms = duration_ms.saturating_sub(heal_secs(cfg.duration_secs) * 1000);
    let devices: Vec<Device> = (1..=USERS)
        .flat_map(|u| (1..=DEVICES_PER_USER).map(move |d| (u, d)))
        .enumerate()
        .map(|(i, (u, d))| Device::new(cfg.seed, i, UserId(u), d))
        .collect();
    let n_devices = devices.len();
    let shard_count = 2 + (cfg.seed % 2) as u16;
    let shared = Rc::new(RefCell::new(Shared {
        cfg: cfg.clone(),
        rates: rates.clone(),
        faults_on: true,
        workload_on: true,
        booted: false,
        oracle: Oracle::default(),
        counts: FaultCounts::default(),
        storm_gen: 0,
        crash_point: None,
        crash_now: None,
        device_stopped: Vec::new(),
        devices,
        trace_hash: 0xcbf2_9ce4_8422_2325,
        trace: Vec::new(),
        events: 0,
        loop_ms: 0,
    }));
    shared.borrow_mut().event(format!(
        "seed {} shards {shard_count} rates {rates:?}",
        cfg.seed
    ));
    let faults = schedule(&mut rng, &rates, faults_until_ms, n_devices);

    let mut builder = turmoil::Builder::new();
    builder
        .rng_seed(cfg.seed)
        .simulation_duration(Duration::from_millis(duration_ms + 1000))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(LATENCY_MS.0))
        .max_message_latency(Duration::from_millis(LATENCY_MS.1));
    let disk = builder.fs();
    disk.block_size(rates.block_size)
        .sync_probability(rates.early_flush)
        .io_error_probability(rates.disk_io);
    if let Some((_, reserves)) = rates.disk_full {
        let reserved: u64 = (0..reserves)
            .map(|n| disk::reserve_bytes(n, reserves))
            .sum();
        disk.capacity(reserved + rates.disk_full_headroom);
    }
    let mut sim = builder.build();
    {
        let s = shared.clone();
        sim.host("gateway", move || gateway::host(s.clone(), shard_count));
    }
    for i in 0..n_devices {
        let s = shared.clone();
        sim.host(device_host(i), move || device::host(s.clone(), i));
    }
    if rates.link_fail > 0.0 {
        sim.set_fail_rate(rates.link_fail);
    }

    let mut w = World {
        undo: BTreeMap::new(),
        undo_n: 0,
        gateway_down: false,
        spikes: BTreeMap::new(),
        devices_down: BTreeSet::new(),
    };
    let mut next_fault = 0;
    let mut healed = false;
    let mut ms = 0u64;
    let mut error: Option<String> = None;
    while ms < duration_ms {
        ms = sim.elapsed().as_millis() as u64;
        shared.borrow_mut().loop_ms = ms;
        if !healed && ms >= faults_until_ms {
            healed = true;
            let mut sh = shared.borrow_mut();
            sh.faults_on = false;
            sh.workload_on = false;
            for d in &mut sh.devices {
                d.slow = None;
            }
            sh.crash_point = None;
            for d in &mut sh.devices {
                d.crash_after_send = None;
            }
            sh.event("heal: faults and new sends stop".into());
            drop(sh);
            sim.set_fail_rate(0.0);
            for (_, u) in std::mem::take(&mut w.undo) {
                w.apply(&mut sim, &shared, u);
            }
            for i in 0..n_devices {
                sim.repair(device_host(i), "gateway");
            }
        }
        while let Some(((at, _), _)) = w.undo.first_key_value() {
            if *at > ms {
                break;
            }
            let (_, u) = w.undo.pop_first().expect("non-empty");
            w.apply(&mut sim, &shared, u);
        }
        while !healed && next_fault < faults.len() && faults[next_fault].0 <= ms {
            let (_, f) = &faults[next_fault];
            next_fault += 1;
            w.inject(&mut sim, &shared, ms, f);
        }
        if let Err(e) = sim.step() {
            error = Some(format!("a host failed: {e}"));
            break;
        }
        let stopped = shared.borrow_mut().crash_now.take();
        if let Some((point, down_ms)) = stopped {
            let mut sh = shared.borrow_mut();
            match point {
                CrashPoint::AfterAppend => sh.counts.crash_appended += 1,
                CrashPoint::AfterDurable => sh.counts.crash_durable += 1,
            }
            drop(sh);
            w.crash_gateway(&mut sim, &shared, ms, down_ms, format!("at {point:?}"));
        }
        let stopped = std::mem::take(&mut shared.borrow_mut().device_stopped);
        for (dev, down_ms) in stopped {
            w.crash_device(&mut sim, &shared, ms, dev, down_ms);
        }
        if shared.borrow().violation_count() > 0 {
            break;
        }
    }
    let mut checked = 0;
    if error.is_none() && shared.borrow().violation_count() == 0 {
        checked = final_checks(&mut shared.borrow_mut());
        // Last, power loss: the restart checks I1 and I3 on what turmoil's disk kept.
        if !w.gateway_down {
            shared.borrow_mut().event("final power loss".into());
            sim.crash("gateway");
        }
        sim.bounce("gateway");
        if let Err(e) = sim.step() {
            error = Some(format!("the final restart failed: {e}"));
        }
    }
    let simulated_ms = sim.elapsed().as_millis() as u64;
    drop(sim);
    let mut sh = shared.borrow_mut();
    if let Some(e) = error {
        sh.oracle.violations.push(e);
    }
    Outcome {
        seed: cfg.seed,
        trace_hash: sh.trace_hash,
        events: sh.events,
        simulated_ms,
        counts: sh.counts.clone(),
        checked,
        durable: sh.oracle.durable_count(),
        violations: sh.oracle.violations.clone(),
        trace: std::mem::take(&mut sh.trace),
    }
}

/// Something a fault left to be undone at a time.
enum Undo {
    Restart,
    Repair(usize),
    Release(usize),
    RepairOneWay {
        dev: usize,
        up: bool,
    },
    /// The end of spike `n` on `dev`'s link (if no later spike began since).
    EndSpike {
        dev: usize,
        n: u64,
    },
    /// Device `dev`'s app starts again.
    DeviceRestart(usize),
}

/// The run loop's view of the faults in force.
struct World {
    /// Timed undo actions: (at_ms, n) -> action.
    undo: BTreeMap<(u64, u64), Undo>,
    undo_n: u64,
    gateway_down: bool,
    /// Per device, the latest spike on its link.
    spikes: BTreeMap<usize, u64>,
    /// Devices crashed and not restarted yet.
    devices_down: BTreeSet<usize>,
}

impl World {
    fn later(&mut self, at_ms: u64, u: Undo) {
        self.undo_n += 1;
        self.undo.insert((at_ms, self.undo_n), u);
    }

    fn inject(
        &mut self,
        sim: &mut turmoil::Sim<'_>,
        shared: &Rc<RefCell<Shared>>,
        ms: u64,
        f: &Fault,
    ) {
        let mut sh = shared.borrow_mut();
        match *f {
            Fault::Crash { down_ms } if !self.gateway_down => {
                drop(sh);
                self.crash_gateway(sim, shared, ms, down_ms, "at a random instant".into());
            }
            Fault::Crash { .. } => {}
            Fault::DeviceCrash {
                dev,
                down_ms,
                after_send: true,
            } => {
                sh.event(format!(
                    "fault: dev{dev} crash armed for right after a send"
                ));
                sh.devices[dev].crash_after_send = Some(down_ms);
            }
            Fault::DeviceCrash { dev, down_ms, .. } if !self.devices_down.contains(&dev) => {
                drop(sh);
                self.crash_device(sim, shared, ms, dev, down_ms);
            }
            Fault::DeviceCrash { .. } => {}
            Fault::PointCrash { point, down_ms } => {
                sh.event(format!("fault: gateway crash armed at {point:?}"));
                sh.crash_point = Some((point, down_ms));
            }
            Fault::Partition { dev, ms: d } => {
                sh.counts.partition += 1;
                sh.event(format!("fault: partition dev{dev} for {d}ms"));
                drop(sh);
                sim.partition(device_host(dev), "gateway");
                self.later(ms + d, Undo::Repair(dev));
            }
            Fault::Hold { dev, ms: d } => {
                sh.counts.hold += 1;
                sh.event(format!("fault: hold dev{dev} for {d}ms"));
                drop(sh);
                sim.hold(device_host(dev), "gateway");
                self.later(ms + d, Undo::Release(dev));
            }
            Fault::Storm => {
                sh.counts.storm += 1;
                sh.storm_gen += 1;
                sh.event("fault: reconnect storm".into());
            }
            Fault::OneWay { dev, up, ms: d } => {
                sh.counts.oneway += 1;
                let (from, to) = one_way(dev, up);
                sh.event(format!("fault: one-way partition {from} -> {to} for {d}ms"));
                drop(sh);
                sim.partition_oneway(from, to);
                self.later(ms + d, Undo::RepairOneWay { dev, up });
            }
            Fault::Spike {
                dev,
                latency_ms,
                ms: d,
            } => {
                sh.counts.spike += 1;
                let n = sh.counts.spike;
                sh.event(format!(
                    "fault: dev{dev} link latency {latency_ms}ms for {d}ms"
                ));
                drop(sh);
                let latency = Duration::from_millis(latency_ms);
                sim.set_link_latency(device_host(dev), "gateway", latency);
                self.spikes.insert(dev, n);
                self.later(ms + d, Undo::EndSpike { dev, n });
            }
            Fault::Slow {
                dev,
                chunk,
                pause_ms,
                ms: d,
            } => {
                sh.counts.slow += 1;
                sh.event(format!(
                    "fault: dev{dev} reads {chunk} bytes every {pause_ms}ms for {d}ms"
                ));
                sh.devices[dev].slow = Some(SlowRead {
                    until_ms: ms + d,
                    chunk,
                    pause_ms,
                });
            }
        }
    }

    /// Crashes device `dev` now and restarts it after `down_ms`.
    fn crash_device(
        &mut self,
        sim: &mut turmoil::Sim<'_>,
        shared: &Rc<RefCell<Shared>>,
        ms: u64,
        dev: usize,
        down_ms: u64,
    ) {
        let mut sh = shared.borrow_mut();
        sh.counts.device_crash += 1;
        let restored = device::crash(&mut sh, dev) as u64;
        sh.counts.restored += restored;
        sh.event(format!(
            "fault: dev{dev} crashes, down {down_ms}ms, {restored} unacked kept"
        ));
        drop(sh);
        sim.crash(device_host(dev));
        self.devices_down.insert(dev);
        self.later(ms + down_ms, Undo::DeviceRestart(dev));
    }

    /// Crashes the gateway now (power loss) and restarts it after `down_ms`.
    fn crash_gateway(
        &mut self,
        sim: &mut turmoil::Sim<'_>,
        shared: &Rc<RefCell<Shared>>,
        ms: u64,
        down_ms: u64,
        how: String,
    ) {
        let mut sh = shared.borrow_mut();
        sh.counts.crash += 1;
        sh.event(format!("fault: gateway crash {how}, down {down_ms}ms"));
        drop(sh);
        // Power loss: turmoil's disk drops the unsynced writes, or keeps blocks of them.
        sim.crash("gateway");
        self.gateway_down = true;
        self.later(ms + down_ms, Undo::Restart);
    }

    fn apply(&mut self, sim: &mut turmoil::Sim<'_>, shared: &Rc<RefCell<Shared>>, u: Undo) {
        match u {
            Undo::Restart => {
                shared.borrow_mut().event("gateway restart".into());
                sim.bounce("gateway");
                self.gateway_down = false;
            }
            Undo::Repair(dev) => {
                shared.borrow_mut().event(format!("repair dev{dev}"));
                sim.repair(device_host(dev), "gateway");
            }
            Undo::Release(dev) => {
                shared.borrow_mut().event(format!("release dev{dev}"));
                sim.release(device_host(dev), "gateway");
            }
            Undo::RepairOneWay { dev, up } => {
                let (from, to) = one_way(dev, up);
                shared.borrow_mut().event(format!("repair {from} -> {to}"));
                sim.repair_oneway(from, to);
            }
            Undo::DeviceRestart(dev) => {
                shared.borrow_mut().event(format!("dev{dev} restarts"));
                sim.bounce(device_host(dev));
                self.devices_down.remove(&dev);
            }
            Undo::EndSpike { dev, n } => {
                if self.spikes.get(&dev) != Some(&n) {
                    return;
                }
                self.spikes.remove(&dev);
                shared
                    .borrow_mut()
                    .event(format!("dev{dev} link latency back to normal"));
                let (min, max) = LATENCY_MS;
                let (dev, gw) = (device_host(dev), "gateway");
                sim.set_link_latency(dev.as_str(), gw, Duration::from_millis(min));
                sim.set_link_max_message_latency(dev.as_str(), gw, Duration::from_millis(max));
            }
        }
    }
}

/// The hosts of a one-way partition: `dev` to the gateway if `up`, else the other way.
fn one_way(dev: usize, up: bool) -> (String, String) {
    if up {
        (device_host(dev), "gateway".into())
    } else {
        ("gateway".into(), device_host(dev))
    }
}

/// The end of a run, before a last crash and restart of the gateway (whose recovery checks
/// I1 and I3): liveness, I4 for every device, and no message an app made lost.
fn final_checks(sh: &mut Shared) -> u64 {
    let before = sh.violation_count();
    let mut stuck = Vec::new();
    for (i, d) in sh.devices.iter().enumerate() {
        if !d.engine.is_authenticated() || d.engine.outbox_len() > 0 {
            stuck.push(format!(
                "dev{i}: authenticated {}, {} unacked",
                d.engine.is_authenticated(),
                d.engine.outbox_len()
            ));
        }
    }
    if let Some(first) = stuck.first() {
        let v = format!(
            "liveness: {} device(s) not settled after the heal, first: {first}",
            stuck.len()
        );
        sh.oracle.violations.push(v);
    }
    let mut checked = 0;
    for i in 0..sh.devices.len() {
        let convs = convs_of(sh.devices[i].user.0);
        checked += sh.oracle.check_complete(i, &convs);
        // Every message an app made (and wrote to its outbox first) is stored in the end,
        // across its crashes too.
        let lost: Vec<u64> = (1..=sh.devices[i].made())
            .filter(|&n| !sh.oracle.is_stored(&sh.devices[i].payload(n)))
            .collect();
        if let Some(first) = lost.first() {
            let v = format!(
                "lost: dev{i} made {} message(s) that were never stored, first #{first}",
                lost.len()
            );
            sh.oracle.violations.push(v);
        }
    }
    sh.note_violations(before);
    checked
}
