//! Gateway metrics: counters, gauges and latency histograms that each shard updates and the
//! admin server renders in the Prometheus text exposition format (version 0.0.4), plus the
//! usual `process_*` metrics read from `/proc/self` at scrape time.
//!
//! This module owns the shared [`Metrics`] block (one [`ShardMetrics`] per shard) and its
//! rendering. It leaves to others when to update it: a shard copies its core
//! [`ShardStats`] in with [`ShardMetrics::publish`] and marks that it is alive with
//! [`ShardMetrics::record_turn`] (both once per tick of its loop), records one fsync and
//! one ack latency per group-commit batch, and counts log failures; the admin server calls
//! [`Metrics::render`] per scrape and [`Metrics::silent_shards`] per health check.
//!
//! Invariants:
//! - Each shard writes only its own [`ShardMetrics`]; the admin thread only reads. Counters
//!   are atomics written with `Relaxed` stores: a scrape may see one counter a little ahead
//!   of another, which metrics tolerate, and the hot path never takes a lock.
//! - The histograms sit behind a `std::sync::Mutex` because they are touched once per
//!   group-commit batch (not per frame) by their shard and once per scrape by the admin
//!   server, so the lock is uncontended in practice.
//! - Rendered histogram buckets are cumulative and monotone, and the `+Inf` bucket equals
//!   `_count`, as Prometheus requires.

use hdrhistogram::Histogram;
use imgate_core::shard::ShardStats;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The largest latency a histogram resolves, in microseconds (60 s). Larger values are
/// clamped to it (they land in the `+Inf` bucket either way); `_sum` keeps their true size.
const LATENCY_US_MAX: u64 = 60_000_000;

/// Significant decimal digits the histograms keep: 0.1% relative error, about 50 KiB of
/// counts per histogram at this range, four histograms per shard.
const LATENCY_SIGFIG: u8 = 3;

/// The fixed Prometheus buckets: upper bound in microseconds and its `le` label in seconds.
/// From 100 µs (below any real fsync) to 1 s (a disk in trouble), 1-2.5-5 steps. The label
/// is written out rather than formatted from a float so that it never changes shape.
const BUCKETS: [(u64, &str); 13] = [
    (100, "0.0001"),
    (250, "0.00025"),
    (500, "0.0005"),
    (1_000, "0.001"),
    (2_500, "0.0025"),
    (5_000, "0.005"),
    (10_000, "0.01"),
    (25_000, "0.025"),
    (50_000, "0.05"),
    (100_000, "0.1"),
    (250_000, "0.25"),
    (500_000, "0.5"),
    (1_000_000, "1"),
];

/// The value of a shard's last-turn clock before its first turn.
const TURN_NEVER: u64 = u64::MAX;

/// All metrics of one gateway process: one [`ShardMetrics`] per shard and the start time.
#[derive(Debug)]
pub struct Metrics {
    shards: Vec<ShardMetrics>,
    started: Instant,
}

/// A shard that has not turned its loop recently, as [`Metrics::silent_shards`] sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SilentShard {
    /// The shard's index.
    pub shard: usize,
    /// Time since its last turn, or `None` if it has not turned once since the start.
    pub silent_for: Option<Duration>,
}

/// The metrics one shard updates. Aligned to 128 bytes so that two shards' counters never
/// share a cache line (adjacent-line prefetch pairs 64-byte lines on x86).
#[derive(Debug)]
#[repr(align(128))]
pub struct ShardMetrics {
    /// The process's metrics epoch ([`Metrics`]'s start), which `last_turn_ms` counts from.
    epoch: Instant,
    /// Milliseconds from `epoch` to the shard's last loop turn; [`TURN_NEVER`] before the
    /// first.
    last_turn_ms: AtomicU64,
    connections: AtomicU64,
    refused: AtomicU64,
    frames_in: AtomicU64,
    frames_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    acks: AtomicU64,
    nacks: AtomicU64,
    deliveries: AtomicU64,
    slow_consumer_closes: AtomicU64,
    auth_failures: AtomicU64,
    rate_limited: AtomicU64,
    messages_stored: AtomicU64,
    conversations_evicted: AtomicU64,
    conversations_loaded: AtomicU64,
    conversations: AtomicU64,
    hot_messages: AtomicU64,
    hot_bytes: AtomicU64,
    dedupe_entries: AtomicU64,
    log_failures: AtomicU64,
    fsync: Mutex<Latency>,
    ack: Mutex<Latency>,
}

/// A latency histogram in microseconds plus the exact sum of what was recorded.
#[derive(Debug)]
struct Latency {
    hist: Histogram<u64>,
    /// Sum of the recorded latencies in microseconds, unclamped (saturating at `u64::MAX`,
    /// half a million years).
    sum_us: u64,
}

/// The quantiles rendered beside each histogram (`<name>_quantile`), with their labels:
/// the buckets are too coarse to compare, say, an ack's p99 with an fsync's to within a
/// millisecond; these come from the full histogram (0.1% relative error).
const QUANTILES: [(f64, &str); 4] = [(0.5, "0.5"), (0.9, "0.9"), (0.99, "0.99"), (0.999, "0.999")];

/// A copy of one histogram taken under its lock, so that rendering happens outside it.
struct LatencySnapshot {
    /// Cumulative count per entry of [`BUCKETS`].
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum_us: u64,
    /// Microseconds at each of [`QUANTILES`] (0 while empty).
    quantiles_us: [u64; QUANTILES.len()],
}

impl Latency {
    fn new() -> Latency {
        Latency {
            // Cannot fail: the bounds are constants with 1 <= low, high >= 2 * low and a
            // sigfig within 0..=5, which is all `new_with_bounds` checks.
            hist: Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGFIG)
                .expect("constant histogram bounds are valid"),
            sum_us: 0,
        }
    }

    fn record(&mut self, d: Duration, count: u64) {
        if count == 0 {
            return;
        }
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.hist.saturating_record_n(us, count);
        self.sum_us = self.sum_us.saturating_add(us.saturating_mul(count));
    }

    fn snapshot(&self) -> LatencySnapshot {
        let mut per_bucket = [0u64; BUCKETS.len()];
        for v in self.hist.iter_recorded() {
            // A recorded value stands for a small range of equal values (0.1% wide);
            // classify it by the range's low end, as `count_between` does, so that a value
            // recorded exactly on a bound lands in that bound's bucket.
            let low = self.hist.lowest_equivalent(v.value_iterated_to());
            if let Some(i) = BUCKETS.iter().position(|&(le_us, _)| low <= le_us) {
                per_bucket[i] += v.count_at_value();
            }
        }
        let mut buckets = [0u64; BUCKETS.len()];
        let mut running = 0u64;
        for (cumulative, n) in buckets.iter_mut().zip(per_bucket) {
            running += n;
            *cumulative = running;
        }
        LatencySnapshot {
            buckets,
            count: self.hist.len(),
            sum_us: self.sum_us,
            quantiles_us: QUANTILES.map(|(q, _)| self.hist.value_at_quantile(q)),
        }
    }
}

impl ShardMetrics {
    fn new(epoch: Instant) -> ShardMetrics {
        ShardMetrics {
            epoch,
            last_turn_ms: AtomicU64::new(TURN_NEVER),
            connections: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            frames_in: AtomicU64::new(0),
            frames_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            nacks: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            slow_consumer_closes: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            messages_stored: AtomicU64::new(0),
            conversations_evicted: AtomicU64::new(0),
            conversations_loaded: AtomicU64::new(0),
            conversations: AtomicU64::new(0),
            hot_messages: AtomicU64::new(0),
            hot_bytes: AtomicU64::new(0),
            dedupe_entries: AtomicU64::new(0),
            log_failures: AtomicU64::new(0),
            fsync: Mutex::new(Latency::new()),
            ack: Mutex::new(Latency::new()),
        }
    }

    /// Copies the core shard's counters and gauges in. Cheap (a few relaxed stores, no
    /// lock): call it as often as once per loop turn. Only the owning shard may call it.
    pub fn publish(&self, stats: &ShardStats) {
        // `..` so that a field added to `ShardStats` does not break the gateway's build
        // while core changes; render it here once it settles.
        let ShardStats {
            connections,
            refused,
            frames_in,
            bytes_in,
            frames_out,
            bytes_out,
            acks,
            nacks,
            deliveries,
            slow_consumer_closes,
            auth_failures,
            rate_limited,
            messages_stored,
            conversations_evicted,
            conversations_loaded,
            conversations,
            hot_messages,
            hot_bytes,
            dedupe_entries,
            ..
        } = *stats;
        self.connections.store(connections, Ordering::Relaxed);
        self.refused.store(refused, Ordering::Relaxed);
        self.frames_in.store(frames_in, Ordering::Relaxed);
        self.frames_out.store(frames_out, Ordering::Relaxed);
        self.bytes_in.store(bytes_in, Ordering::Relaxed);
        self.bytes_out.store(bytes_out, Ordering::Relaxed);
        self.acks.store(acks, Ordering::Relaxed);
        self.nacks.store(nacks, Ordering::Relaxed);
        self.deliveries.store(deliveries, Ordering::Relaxed);
        self.slow_consumer_closes
            .store(slow_consumer_closes, Ordering::Relaxed);
        self.auth_failures.store(auth_failures, Ordering::Relaxed);
        self.rate_limited.store(rate_limited, Ordering::Relaxed);
        self.messages_stored
            .store(messages_stored, Ordering::Relaxed);
        self.conversations_evicted
            .store(conversations_evicted, Ordering::Relaxed);
        self.conversations_loaded
            .store(conversations_loaded, Ordering::Relaxed);
        self.conversations.store(conversations, Ordering::Relaxed);
        self.hot_messages.store(hot_messages, Ordering::Relaxed);
        self.hot_bytes.store(hot_bytes, Ordering::Relaxed);
        self.dedupe_entries.store(dedupe_entries, Ordering::Relaxed);
    }

    /// Marks that the shard's loop turned just now: the proof of life `/healthz` checks
    /// (see [`Metrics::silent_shards`]). One relaxed store; call it once per tick. Only the
    /// owning shard may call it.
    pub fn record_turn(&self) {
        self.record_turn_at(Instant::now());
    }

    /// [`ShardMetrics::record_turn`] as if it happened at `at` (tests show a shard that
    /// turned long ago this way).
    pub(crate) fn record_turn_at(&self, at: Instant) {
        let ms = u64::try_from(at.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(TURN_NEVER - 1);
        self.last_turn_ms
            .store(ms.min(TURN_NEVER - 1), Ordering::Relaxed);
    }

    /// Time from the shard's last turn to `now`, or `None` if it never turned.
    fn silent_for(&self, now: Instant) -> Option<Duration> {
        match self.last_turn_ms.load(Ordering::Relaxed) {
            TURN_NEVER => None,
            ms => Some(
                now.saturating_duration_since(self.epoch)
                    .saturating_sub(Duration::from_millis(ms)),
            ),
        }
    }

    /// Records how long one fdatasync of the log took, from its start to its return. Syncs
    /// may overlap (the log engine pipelines up to two), so this is per sync, not per batch.
    pub fn record_fsync(&self, d: Duration) {
        lock(&self.fsync).record(d, 1);
    }

    /// Records that `count` messages became durable `d` after their append, for a whole
    /// group-commit batch at once (`d` measured from, say, the batch's oldest append).
    pub fn record_ack_latency(&self, d: Duration, count: u64) {
        lock(&self.ack).record(d, count);
    }

    /// Counts one failed log append or sync.
    pub fn log_failed(&self) {
        self.log_failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// Locks a histogram even if a thread panicked while holding it: recording cannot leave a
/// histogram half-updated in a way that matters for metrics, and losing metrics after an
/// unrelated panic would hide what happened.
fn lock(m: &Mutex<Latency>) -> std::sync::MutexGuard<'_, Latency> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One counter or gauge family: name, type, help, and how to read it from a shard.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    read: fn(&ShardMetrics) -> &AtomicU64,
}

const FAMILIES: [Family; 20] = [
    Family {
        name: "imgate_connections",
        kind: "gauge",
        help: "Client connections held now.",
        read: |s| &s.connections,
    },
    Family {
        name: "imgate_refused_connections_total",
        kind: "counter",
        help: "Connections refused at the connection limit or while draining.",
        read: |s| &s.refused,
    },
    Family {
        name: "imgate_frames_in_total",
        kind: "counter",
        help: "Frames received from clients.",
        read: |s| &s.frames_in,
    },
    Family {
        name: "imgate_frames_out_total",
        kind: "counter",
        help: "Frames queued to clients.",
        read: |s| &s.frames_out,
    },
    Family {
        name: "imgate_bytes_in_total",
        kind: "counter",
        help: "Bytes received from clients.",
        read: |s| &s.bytes_in,
    },
    Family {
        name: "imgate_bytes_out_total",
        kind: "counter",
        help: "Bytes queued to clients.",
        read: |s| &s.bytes_out,
    },
    Family {
        name: "imgate_acks_total",
        kind: "counter",
        help: "Acks sent to senders (each after its message was durable).",
        read: |s| &s.acks,
    },
    Family {
        name: "imgate_nacks_total",
        kind: "counter",
        help: "Nacks sent to senders.",
        read: |s| &s.nacks,
    },
    Family {
        name: "imgate_deliveries_total",
        kind: "counter",
        help: "Deliver frames queued to recipient connections.",
        read: |s| &s.deliveries,
    },
    Family {
        name: "imgate_slow_consumer_closes_total",
        kind: "counter",
        help: "Connections closed for staying over their outbound queue budget.",
        read: |s| &s.slow_consumer_closes,
    },
    Family {
        name: "imgate_auth_failures_total",
        kind: "counter",
        help: "Failed authentications.",
        read: |s| &s.auth_failures,
    },
    Family {
        name: "imgate_rate_limited_total",
        kind: "counter",
        help: "Frames refused because their connection was over its rate.",
        read: |s| &s.rate_limited,
    },
    Family {
        name: "imgate_messages_stored_total",
        kind: "counter",
        help: "Messages made durable by their owner shard.",
        read: |s| &s.messages_stored,
    },
    Family {
        name: "imgate_log_failures_total",
        kind: "counter",
        help: "Failed log appends or syncs.",
        read: |s| &s.log_failures,
    },
    Family {
        name: "imgate_conversations_evicted_total",
        kind: "counter",
        help: "Conversations that left memory (least recently used, idle).",
        read: |s| &s.conversations_evicted,
    },
    Family {
        name: "imgate_conversations_loaded_total",
        kind: "counter",
        help: "Conversations brought back into memory from the log.",
        read: |s| &s.conversations_loaded,
    },
    Family {
        name: "imgate_conversations",
        kind: "gauge",
        help: "Conversations held in memory by their owner shard now.",
        read: |s| &s.conversations,
    },
    Family {
        name: "imgate_hot_messages",
        kind: "gauge",
        help: "Messages in the in-memory hot tier now.",
        read: |s| &s.hot_messages,
    },
    Family {
        name: "imgate_hot_bytes",
        kind: "gauge",
        help: "Payload bytes of the in-memory hot tier now.",
        read: |s| &s.hot_bytes,
    },
    Family {
        name: "imgate_dedupe_entries",
        kind: "gauge",
        help: "Keys in the dedupe window now.",
        read: |s| &s.dedupe_entries,
    },
];

impl Metrics {
    /// Metrics for `shards` shards, all zero, with the uptime clock starting now.
    pub fn new(shards: usize) -> Arc<Metrics> {
        Metrics::started_at(shards, Instant::now())
    }

    /// Metrics whose epoch (uptime start, and what shard turns are timed from) is
    /// `started`. Tests use an epoch in the past to show a shard that has been silent.
    pub(crate) fn started_at(shards: usize, started: Instant) -> Arc<Metrics> {
        assert!(shards > 0, "a gateway has at least one shard");
        Arc::new(Metrics {
            shards: (0..shards).map(|_| ShardMetrics::new(started)).collect(),
            started,
        })
    }

    /// The shards whose loop has not turned within `bound` before `now` (or not at all
    /// yet), in index order; empty when every shard is alive.
    pub fn silent_shards(&self, now: Instant, bound: Duration) -> Vec<SilentShard> {
        self.shards
            .iter()
            .enumerate()
            .filter_map(|(shard, m)| {
                let silent_for = m.silent_for(now);
                match silent_for {
                    Some(d) if d <= bound => None,
                    _ => Some(SilentShard { shard, silent_for }),
                }
            })
            .collect()
    }

    /// The number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Shard `i`'s metrics. Panics if `i` is not below [`Metrics::shard_count`]: shard
    /// indexes come from the runtime, never from input.
    pub fn shard(&self, i: usize) -> &ShardMetrics {
        assert!(
            i < self.shard_count(),
            "shard {i} of {}",
            self.shard_count()
        );
        &self.shards[i]
    }

    /// Everything in the Prometheus text exposition format 0.0.4: each family's `# HELP` and
    /// `# TYPE` once, then one sample per shard labelled `shard="i"`.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096 + self.shards.len() * 4096);
        // `write!` to a String cannot fail; the results are ignored for that reason.
        for family in &FAMILIES {
            let _ = writeln!(out, "# HELP {} {}", family.name, family.help);
            let _ = writeln!(out, "# TYPE {} {}", family.name, family.kind);
            for (i, shard) in self.shards.iter().enumerate() {
                let value = (family.read)(shard).load(Ordering::Relaxed);
                let _ = writeln!(out, "{}{{shard=\"{i}\"}} {value}", family.name);
            }
        }
        self.render_histogram(
            &mut out,
            "imgate_fsync_seconds",
            "Duration of one log fdatasync, from its start to its return (up to two in flight).",
            |s| &s.fsync,
        );
        self.render_histogram(
            &mut out,
            "imgate_ack_seconds",
            "Time from a message's append to its durability (when its Ack may go out).",
            |s| &s.ack,
        );
        let _ = writeln!(
            out,
            "# HELP imgate_uptime_seconds Seconds since the gateway started."
        );
        let _ = writeln!(out, "# TYPE imgate_uptime_seconds gauge");
        let _ = writeln!(
            out,
            "imgate_uptime_seconds {:.3}",
            self.started.elapsed().as_secs_f64()
        );
        let now = Instant::now();
        let _ = writeln!(
            out,
            "# HELP imgate_shard_turn_age_seconds Seconds since the shard's loop last turned \
             (absent before its first turn); /healthz fails past its bound."
        );
        let _ = writeln!(out, "# TYPE imgate_shard_turn_age_seconds gauge");
        for (i, shard) in self.shards.iter().enumerate() {
            if let Some(d) = shard.silent_for(now) {
                let _ = writeln!(
                    out,
                    "imgate_shard_turn_age_seconds{{shard=\"{i}\"}} {:.3}",
                    d.as_secs_f64()
                );
            }
        }
        render_process(&mut out, &ProcessStats::read(Path::new("/proc")));
        out
    }

    fn render_histogram(
        &self,
        out: &mut String,
        name: &str,
        help: &str,
        which: fn(&ShardMetrics) -> &Mutex<Latency>,
    ) {
        // Copy under the lock, format outside it, so the shard waits as little as
        // possible if it records during a scrape.
        let snaps: Vec<LatencySnapshot> = self
            .shards
            .iter()
            .map(|shard| lock(which(shard)).snapshot())
            .collect();
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (i, snap) in snaps.iter().enumerate() {
            for ((_, le), cumulative) in BUCKETS.iter().zip(snap.buckets) {
                let _ = writeln!(
                    out,
                    "{name}_bucket{{shard=\"{i}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{shard=\"{i}\",le=\"+Inf\"}} {}",
                snap.count
            );
            // Microseconds to seconds exactly in decimal, without float rounding noise.
            let _ = writeln!(
                out,
                "{name}_sum{{shard=\"{i}\"}} {}.{:06}",
                snap.sum_us / 1_000_000,
                snap.sum_us % 1_000_000
            );
            let _ = writeln!(out, "{name}_count{{shard=\"{i}\"}} {}", snap.count);
        }
        let _ = writeln!(
            out,
            "# HELP {name}_quantile Quantiles of {name}, from the full histogram (0.1% error)."
        );
        let _ = writeln!(out, "# TYPE {name}_quantile gauge");
        for (i, snap) in snaps.iter().enumerate() {
            for ((_, label), us) in QUANTILES.iter().zip(snap.quantiles_us) {
                let _ = writeln!(
                    out,
                    "{name}_quantile{{shard=\"{i}\",quantile=\"{label}\"}} {}.{:06}",
                    us / 1_000_000,
                    us % 1_000_000
                );
            }
        }
    }
}

/// Clock ticks per second of the times in procfs (USER_HZ). The kernel fixes it at 100 in
/// every architecture's user ABI whatever its internal HZ, which is why Prometheus's own
/// procfs reader uses the same constant instead of asking `sysconf`.
const USER_HZ: f64 = 100.0;

/// The process metrics every Prometheus client library exports, read from procfs at scrape
/// time. A value the system does not provide stays `None`, and its family is left out.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    start_time_seconds: Option<f64>,
    virtual_memory_bytes: Option<u64>,
    resident_memory_bytes: Option<u64>,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
}

/// The fields of `/proc/self/stat` the process metrics need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stat {
    /// User and system CPU time, in clock ticks.
    utime_ticks: u64,
    stime_ticks: u64,
    /// When the process started, in clock ticks after boot.
    start_ticks: u64,
    /// Virtual memory size in bytes.
    vsize_bytes: u64,
}

impl ProcessStats {
    /// Reads the calling process's numbers under `proc` (the procfs mount, `/proc`).
    /// A scrape costs five small reads and one directory listing (one entry per open
    /// descriptor, so about a millisecond per hundred thousand connections).
    fn read(proc: &Path) -> ProcessStats {
        let text = |name: &str| std::fs::read_to_string(proc.join(name)).ok();
        let stat = text("self/stat").as_deref().and_then(parse_stat);
        let boot_seconds = text("stat").as_deref().and_then(parse_boot_time);
        ProcessStats {
            cpu_seconds: stat.map(|s| (s.utime_ticks + s.stime_ticks) as f64 / USER_HZ),
            start_time_seconds: stat
                .zip(boot_seconds)
                .map(|(s, boot)| boot as f64 + s.start_ticks as f64 / USER_HZ),
            virtual_memory_bytes: stat.map(|s| s.vsize_bytes),
            resident_memory_bytes: text("self/status").as_deref().and_then(parse_rss),
            // The listing's own descriptor is counted too, as Prometheus's clients do.
            open_fds: std::fs::read_dir(proc.join("self/fd"))
                .ok()
                .map(|entries| entries.count() as u64),
            max_fds: text("self/limits")
                .as_deref()
                .and_then(parse_max_open_files),
        }
    }
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may hold
/// spaces and parentheses itself, so the fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    // `rest` starts at field 3 (state); field n of proc(5) is at index n - 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime_ticks: field(14)?,
        stime_ticks: field(15)?,
        start_ticks: field(22)?,
        vsize_bytes: field(23)?,
    })
}

/// The boot time in seconds since the epoch, from the `btime` line of `/proc/stat`.
fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// Resident memory in bytes, from the `VmRSS:` line (in kB) of `/proc/<pid>/status`.
fn parse_rss(text: &str) -> Option<u64> {
    let value = text.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = value.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// The soft limit on open files, from `/proc/<pid>/limits`; `None` if unlimited.
fn parse_max_open_files(text: &str) -> Option<u64> {
    let values = text
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    values.split_whitespace().next()?.parse().ok()
}

/// Writes the process families that have a value, each with its `# HELP` and `# TYPE`.
fn render_process(out: &mut String, p: &ProcessStats) {
    let mut family = |name: &str, kind: &str, help: &str, value: Option<String>| {
        if let Some(value) = value {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        }
    };
    family(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        p.cpu_seconds.map(|v| format!("{v:.2}")),
    );
    family(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        p.start_time_seconds.map(|v| format!("{v:.2}")),
    );
    family(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        p.virtual_memory_bytes.map(|v| v.to_string()),
    );
    family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        p.resident_memory_bytes.map(|v| v.to_string()),
    );
    family(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        p.open_fds.map(|v| v.to_string()),
    );
    family(
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        p.max_fds.map(|v| v.to_string()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the one sample line that starts with `series ` (name plus labels).
    fn sample(text: &str, series: &str) -> f64 {
        let prefix = format!("{series} ");
        let mut found = text.lines().filter_map(|l| l.strip_prefix(&prefix));
        let value = found
            .next()
            .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"));
        assert!(found.next().is_none(), "{series} appears twice");
        value
            .parse()
            .unwrap_or_else(|e| panic!("{series}: {value:?}: {e}"))
    }

    // The update names every field today; it stays so that a field core adds to
    // `ShardStats` does not break these tests before it is rendered.
    #[allow(clippy::needless_update)]
    fn stats(base: u64) -> ShardStats {
        ShardStats {
            connections: base + 1,
            refused: base + 2,
            frames_in: base + 3,
            bytes_in: base + 4,
            frames_out: base + 12,
            bytes_out: base + 5,
            acks: base + 6,
            nacks: base + 7,
            deliveries: base + 8,
            slow_consumer_closes: base + 9,
            auth_failures: base + 10,
            rate_limited: base + 17,
            messages_stored: base + 11,
            conversations_evicted: base + 18,
            conversations_loaded: base + 19,
            conversations: base + 13,
            hot_messages: base + 14,
            hot_bytes: base + 15,
            dedupe_entries: base + 16,
            ..ShardStats::default()
        }
    }

    #[test]
    fn published_counters_are_rendered_per_shard() {
        let metrics = Metrics::new(2);
        metrics.shard(0).publish(&stats(0));
        metrics.shard(1).publish(&stats(100));
        metrics.shard(1).log_failed();
        metrics.shard(1).log_failed();
        // A later publish replaces the core counters but leaves the gateway's own alone.
        metrics.shard(1).publish(&stats(200));
        let text = metrics.render();

        let expect = [
            ("imgate_connections", 1.0),
            ("imgate_refused_connections_total", 2.0),
            ("imgate_frames_in_total", 3.0),
            ("imgate_bytes_in_total", 4.0),
            ("imgate_frames_out_total", 12.0),
            ("imgate_bytes_out_total", 5.0),
            ("imgate_acks_total", 6.0),
            ("imgate_nacks_total", 7.0),
            ("imgate_deliveries_total", 8.0),
            ("imgate_slow_consumer_closes_total", 9.0),
            ("imgate_auth_failures_total", 10.0),
            ("imgate_rate_limited_total", 17.0),
            ("imgate_conversations_evicted_total", 18.0),
            ("imgate_conversations_loaded_total", 19.0),
            ("imgate_messages_stored_total", 11.0),
            ("imgate_conversations", 13.0),
            ("imgate_hot_messages", 14.0),
            ("imgate_hot_bytes", 15.0),
            ("imgate_dedupe_entries", 16.0),
        ];
        for (name, value) in expect {
            assert_eq!(sample(&text, &format!("{name}{{shard=\"0\"}}")), value);
            assert_eq!(
                sample(&text, &format!("{name}{{shard=\"1\"}}")),
                value + 200.0
            );
        }
        assert_eq!(sample(&text, "imgate_log_failures_total{shard=\"0\"}"), 0.0);
        assert_eq!(sample(&text, "imgate_log_failures_total{shard=\"1\"}"), 2.0);
        assert!(sample(&text, "imgate_uptime_seconds") >= 0.0);
    }

    #[test]
    fn every_family_has_help_and_type_once_before_its_samples() {
        let metrics = Metrics::new(3);
        for i in 0..3 {
            metrics.shard(i).record_turn();
        }
        let text = metrics.render();
        let names = FAMILIES.iter().map(|f| (f.name, f.kind)).chain([
            ("imgate_fsync_seconds", "histogram"),
            ("imgate_ack_seconds", "histogram"),
            ("imgate_fsync_seconds_quantile", "gauge"),
            ("imgate_ack_seconds_quantile", "gauge"),
            ("imgate_uptime_seconds", "gauge"),
            ("imgate_shard_turn_age_seconds", "gauge"),
            ("process_cpu_seconds_total", "counter"),
            ("process_start_time_seconds", "gauge"),
            ("process_virtual_memory_bytes", "gauge"),
            ("process_resident_memory_bytes", "gauge"),
            ("process_open_fds", "gauge"),
            ("process_max_fds", "gauge"),
        ]);
        for (name, kind) in names {
            let type_line = format!("# TYPE {name} {kind}");
            let help_prefix = format!("# HELP {name} ");
            assert_eq!(text.lines().filter(|l| **l == *type_line).count(), 1);
            assert_eq!(
                text.lines().filter(|l| l.starts_with(&help_prefix)).count(),
                1
            );
            let type_at = text.find(&type_line).expect("type line");
            // The family's samples are contiguous and follow its TYPE line.
            let first_sample = text
                .lines()
                .position(|l| {
                    // The name whole: `imgate_conversations` is a prefix of another family.
                    let rest = l.strip_prefix(name).unwrap_or("#");
                    let rest = match kind {
                        "histogram" => rest.strip_prefix("_bucket").unwrap_or("#"),
                        _ => rest,
                    };
                    rest.starts_with(['{', ' '])
                })
                .expect("a sample");
            let type_index = text[..type_at].lines().count();
            assert_eq!(first_sample, type_index + 1, "{name}");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect("name and value");
            value
                .parse::<f64>()
                .unwrap_or_else(|e| panic!("{line}: {e}"));
        }
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn latencies_fill_cumulative_monotone_buckets() {
        let metrics = Metrics::new(2);
        let shard = metrics.shard(1);
        // fsync: 50 µs, 100 µs (exactly on a bound), 1.5 ms, 3 ms, 2 s (beyond every bound).
        for us in [50, 100, 1_500, 3_000, 2_000_000] {
            shard.record_fsync(Duration::from_micros(us));
        }
        // ack: 10 messages at 2 ms, 5 at 30 ms, 0 messages (ignored).
        shard.record_ack_latency(Duration::from_millis(2), 10);
        shard.record_ack_latency(Duration::from_millis(30), 5);
        shard.record_ack_latency(Duration::from_millis(500), 0);
        let text = metrics.render();

        let fsync = |le: &str| {
            sample(
                &text,
                &format!("imgate_fsync_seconds_bucket{{shard=\"1\",le=\"{le}\"}}"),
            )
        };
        assert_eq!(fsync("0.0001"), 2.0);
        assert_eq!(fsync("0.00025"), 2.0);
        assert_eq!(fsync("0.001"), 2.0);
        assert_eq!(fsync("0.0025"), 3.0);
        assert_eq!(fsync("0.005"), 4.0);
        assert_eq!(fsync("1"), 4.0);
        assert_eq!(fsync("+Inf"), 5.0);
        assert_eq!(
            sample(&text, "imgate_fsync_seconds_count{shard=\"1\"}"),
            5.0
        );
        let sum = sample(&text, "imgate_fsync_seconds_sum{shard=\"1\"}");
        assert!((sum - 2.00465).abs() < 1e-9, "{sum}");

        let ack = |le: &str| {
            sample(
                &text,
                &format!("imgate_ack_seconds_bucket{{shard=\"1\",le=\"{le}\"}}"),
            )
        };
        assert_eq!(ack("0.001"), 0.0);
        assert_eq!(ack("0.0025"), 10.0);
        assert_eq!(ack("0.025"), 10.0);
        assert_eq!(ack("0.05"), 15.0);
        assert_eq!(ack("+Inf"), 15.0);
        assert_eq!(sample(&text, "imgate_ack_seconds_count{shard=\"1\"}"), 15.0);
        // Quantiles from the full histogram, within its 0.1% error.
        let quantile = |q: &str| {
            sample(
                &text,
                &format!("imgate_ack_seconds_quantile{{shard=\"1\",quantile=\"{q}\"}}"),
            )
        };
        assert!(
            (quantile("0.5") - 0.002).abs() < 0.002 * 0.001,
            "{}",
            quantile("0.5")
        );
        assert!(
            (quantile("0.9") - 0.030).abs() < 0.030 * 0.001,
            "{}",
            quantile("0.9")
        );
        assert_eq!(
            sample(
                &text,
                "imgate_ack_seconds_quantile{shard=\"0\",quantile=\"0.99\"}"
            ),
            0.0,
            "an empty histogram's quantiles are 0"
        );
        let sum = sample(&text, "imgate_ack_seconds_sum{shard=\"1\"}");
        assert!((sum - 0.17).abs() < 1e-9, "{sum}");

        // Shard 0 recorded nothing: all zero, sum 0.
        assert_eq!(
            sample(&text, "imgate_ack_seconds_bucket{shard=\"0\",le=\"+Inf\"}"),
            0.0
        );
        assert_eq!(sample(&text, "imgate_ack_seconds_sum{shard=\"0\"}"), 0.0);

        // Every shard's buckets, in order, are cumulative: never decreasing, ending at count.
        for name in ["imgate_fsync_seconds", "imgate_ack_seconds"] {
            for shard in 0..2 {
                let prefix = format!("{name}_bucket{{shard=\"{shard}\",le=");
                let counts: Vec<f64> = text
                    .lines()
                    .filter(|l| l.starts_with(&prefix))
                    .map(|l| l.rsplit_once(' ').expect("value").1.parse().expect("f64"))
                    .collect();
                assert_eq!(counts.len(), BUCKETS.len() + 1);
                assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
                let count = sample(&text, &format!("{name}_count{{shard=\"{shard}\"}}"));
                assert_eq!(counts.last().copied(), Some(count));
            }
        }
    }

    #[test]
    fn bucket_labels_match_their_bounds() {
        for (le_us, le) in BUCKETS {
            let seconds: f64 = le.parse().expect("le parses");
            assert!((seconds * 1e6 - le_us as f64).abs() < 1e-6, "{le}");
        }
        assert!(BUCKETS.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(BUCKETS[BUCKETS.len() - 1].0 <= LATENCY_US_MAX);
    }

    #[test]
    fn a_shard_is_silent_until_its_first_turn_and_again_past_the_bound() {
        let start = Instant::now();
        let metrics = Metrics::started_at(2, start);
        let bound = Duration::from_secs(2);
        let silent = |now| metrics.silent_shards(now, bound);
        assert_eq!(
            silent(start),
            vec![
                SilentShard {
                    shard: 0,
                    silent_for: None
                },
                SilentShard {
                    shard: 1,
                    silent_for: None
                },
            ]
        );
        metrics.shard(0).record_turn();
        metrics.shard(1).record_turn();
        // Both turned at about `start` (the millisecond clock may have moved on a little).
        let turned_ms = metrics.shard(1).last_turn_ms.load(Ordering::Relaxed);
        let turned = start + Duration::from_millis(turned_ms);
        assert!(silent(turned).is_empty());
        assert!(
            silent(turned + bound).is_empty(),
            "the bound itself is alive"
        );
        let later = turned + bound + Duration::from_millis(1);
        metrics.shard(0).record_turn_at(later);
        assert_eq!(
            silent(later),
            vec![SilentShard {
                shard: 1,
                silent_for: Some(bound + Duration::from_millis(1)),
            }]
        );
        // The age is rendered for shards that turned, and left out for one that never did.
        let fresh = Metrics::new(2);
        fresh.shard(1).record_turn();
        let text = fresh.render();
        assert!(sample(&text, "imgate_shard_turn_age_seconds{shard=\"1\"}") < 60.0);
        assert!(!text.contains("imgate_shard_turn_age_seconds{shard=\"0\"}"));
    }

    #[test]
    fn process_metrics_are_read_from_procfs() {
        // A real stat line (fields 3 to 52), with a command name holding ") (" and spaces.
        let stat = "4242 (gate) (way x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    250 75 0 0 20 0 3 0 987654 123456789 5000 18446744073709551615 \
                    1 1 0 0 0 0 0 4096 17663 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";
        assert_eq!(
            parse_stat(stat),
            Some(Stat {
                utime_ticks: 250,
                stime_ticks: 75,
                start_ticks: 987_654,
                vsize_bytes: 123_456_789,
            })
        );
        assert_eq!(parse_stat("4242 (cut short) S 1 2 3"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 9\n"),
            Some(1_700_000_000)
        );
        assert_eq!(
            parse_rss("Name:\tgateway\nVmSize:\t  9000 kB\nVmRSS:\t    1536 kB\n"),
            Some(1536 * 1024)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max processes             63523                63523                processes\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_max_open_files(limits), Some(1024));
        assert_eq!(
            parse_max_open_files(
                "Max open files            unlimited            unlimited            files\n"
            ),
            None
        );

        // This test process, read live: the values exist and make sense.
        let live = ProcessStats::read(Path::new("/proc"));
        let open = live.open_fds.expect("open fds");
        assert!(open >= 3, "stdin, stdout, stderr at least: {open}");
        assert!(live.max_fds.expect("max fds") >= open);
        let rss = live.resident_memory_bytes.expect("rss");
        assert!(rss > 0 && rss <= live.virtual_memory_bytes.expect("vsize"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs_f64();
        let started = live.start_time_seconds.expect("start time");
        assert!(started > 1e9 && started <= now + 1.0, "{started} vs {now}");
        assert!(live.cpu_seconds.expect("cpu") >= 0.0);

        // Rendered with the usual names, and nothing for a value the system lacks.
        let mut text = String::new();
        render_process(&mut text, &live);
        assert_eq!(sample(&text, "process_open_fds"), open as f64);
        assert_eq!(sample(&text, "process_resident_memory_bytes"), rss as f64);
        let mut partial = String::new();
        render_process(
            &mut partial,
            &ProcessStats {
                open_fds: Some(7),
                ..ProcessStats::default()
            },
        );
        assert_eq!(
            partial,
            "# HELP process_open_fds Number of open file descriptors.\n\
             # TYPE process_open_fds gauge\n\
             process_open_fds 7\n"
        );
    }
}
