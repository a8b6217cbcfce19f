//! Gateway metrics: counters and latency histograms that each shard updates and the admin
//! server renders in the Prometheus text exposition format (version 0.0.4).
//!
//! This module owns the shared [`Metrics`] block (one [`ShardMetrics`] per shard) and its
//! rendering. It leaves to others when to update it: a shard copies its core
//! [`ShardStats`] in with [`ShardMetrics::publish`] (say once per loop turn), records one
//! fsync and one ack latency per group-commit batch, and counts log failures; the admin
//! server calls [`Metrics::render`] per scrape.
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

/// All metrics of one gateway process: one [`ShardMetrics`] per shard and the start time.
#[derive(Debug)]
pub struct Metrics {
    shards: Vec<ShardMetrics>,
    started: Instant,
}

/// The metrics one shard updates. Aligned to 128 bytes so that two shards' counters never
/// share a cache line (adjacent-line prefetch pairs 64-byte lines on x86).
#[derive(Debug)]
#[repr(align(128))]
pub struct ShardMetrics {
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
    messages_stored: AtomicU64,
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

/// A copy of one histogram taken under its lock, so that rendering happens outside it.
struct LatencySnapshot {
    /// Cumulative count per entry of [`BUCKETS`].
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum_us: u64,
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
        }
    }
}

impl ShardMetrics {
    fn new() -> ShardMetrics {
        ShardMetrics {
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
            messages_stored: AtomicU64::new(0),
            log_failures: AtomicU64::new(0),
            fsync: Mutex::new(Latency::new()),
            ack: Mutex::new(Latency::new()),
        }
    }

    /// Copies the core shard's counters in. Cheap (a dozen relaxed stores, no lock): call it
    /// as often as once per loop turn. Only the owning shard may call it.
    pub fn publish(&self, stats: &ShardStats) {
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
            messages_stored,
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
        self.messages_stored
            .store(messages_stored, Ordering::Relaxed);
    }

    /// Records how long one fsync (fdatasync) of the log took. Once per group-commit batch.
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

const FAMILIES: [Family; 13] = [
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
];

impl Metrics {
    /// Metrics for `shards` shards, all zero, with the uptime clock starting now.
    pub fn new(shards: usize) -> Arc<Metrics> {
        assert!(shards > 0, "a gateway has at least one shard");
        Arc::new(Metrics {
            shards: (0..shards).map(|_| ShardMetrics::new()).collect(),
            started: Instant::now(),
        })
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
            "Duration of one log fsync (fdatasync), one sample per group-commit batch.",
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
        out
    }

    fn render_histogram(
        &self,
        out: &mut String,
        name: &str,
        help: &str,
        which: fn(&ShardMetrics) -> &Mutex<Latency>,
    ) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (i, shard) in self.shards.iter().enumerate() {
            // Copy under the lock, format outside it, so the shard waits as little as
            // possible if it records during a scrape.
            let snap = lock(which(shard)).snapshot();
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
    }
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
            messages_stored: base + 11,
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
            ("imgate_messages_stored_total", 11.0),
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
        let text = metrics.render();
        let names = FAMILIES.iter().map(|f| (f.name, f.kind)).chain([
            ("imgate_fsync_seconds", "histogram"),
            ("imgate_ack_seconds", "histogram"),
            ("imgate_uptime_seconds", "gauge"),
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
                .position(|l| !l.starts_with('#') && l.starts_with(name))
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
}
