//! The `convs` scenario's measurement: the gateway's memory against the number of
//! conversations written (N). The parent takes a row at the start, each time N crosses a
//! step, when the load has settled and once the connections are gone; each row holds the
//! gateway's RSS (from /proc with `--gateway-pid`, else from its /metrics) and, when the
//! admin token is at hand, the gauges that explain it (conversations in memory, hot tier,
//! dedupe entries, open descriptors). Between rows RSS is sampled for its peak.

use crate::admin;
use crate::sys::ProcSampler;
use serde::Serialize;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How often RSS is sampled for its peak between rows (with `--gateway-pid`).
const PEAK_EVERY: Duration = Duration::from_millis(250);

const MIB: f64 = 1024.0 * 1024.0;

/// One measurement.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Row {
    /// When it was taken: `start`, `load`, `settled` or `disconnected`.
    pub phase: String,
    /// Conversations written (acked) so far.
    pub n: u64,
    /// Seconds since the load started.
    pub secs: f64,
    /// The gateway's resident set size.
    pub rss_bytes: Option<u64>,
    /// `imgate_conversations`, all shards: conversations held in memory.
    pub conversations: Option<u64>,
    /// `imgate_conversations_evicted_total`: conversations that left memory.
    pub evicted: Option<u64>,
    /// `imgate_conversations_loaded_total`: conversations loaded back from the log.
    pub loaded: Option<u64>,
    /// `imgate_hot_messages`: messages in the hot tier.
    pub hot_messages: Option<u64>,
    /// `imgate_hot_bytes`: payload bytes in the hot tier.
    pub hot_bytes: Option<u64>,
    /// `imgate_dedupe_entries`.
    pub dedupe_entries: Option<u64>,
    /// `process_open_fds`.
    pub open_fds: Option<u64>,
}

/// What the `convs` scenario reports, besides the common summary.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ConvsSummary {
    /// Conversations asked for.
    pub target: u64,
    /// Conversations written: one message each, acked (durable).
    pub written: u64,
    /// Sends Nacked `RateLimited` and written again later (not lost, not errors).
    pub rate_limited: u64,
    /// Conversations read back (Pull) after the load and found holding their message.
    pub verified: u64,
    /// Conversations read back and found empty: acked, then lost.
    pub verify_missing: u64,
    /// User id of peer 0 (conversation k is with user `peer_base + k`).
    pub peer_base: u64,
    /// Highest RSS seen over the run.
    pub rss_peak_bytes: Option<u64>,
    /// RSS growth from the start to the settled row, per conversation written.
    pub rss_per_conversation_bytes: Option<u64>,
    /// The bound asked for with `--rss-max-mib`.
    pub rss_max_bytes: Option<u64>,
    /// Whether the peak went over that bound.
    pub over_bound: bool,
    /// The measurements, in time order.
    pub rows: Vec<Row>,
}

/// Takes the rows during a run.
pub struct Probe {
    sampler: Option<ProcSampler>,
    admin: SocketAddr,
    token: Option<String>,
    started: Instant,
    step: u64,
    next_n: u64,
    last_peak: Instant,
    rss_peak: Option<u64>,
    warned: bool,
    rows: Vec<Row>,
}

impl Probe {
    /// A probe taking a `load` row every `step` conversations. Without a `sampler`, RSS
    /// comes from /metrics; without a `token`, there is no /metrics.
    pub fn new(
        sampler: Option<ProcSampler>,
        admin: SocketAddr,
        token: Option<String>,
        step: u64,
    ) -> Probe {
        Probe {
            sampler,
            admin,
            token,
            started: Instant::now(),
            step: step.max(1),
            next_n: step.max(1),
            last_peak: Instant::now(),
            rss_peak: None,
            warned: false,
            rows: Vec::new(),
        }
    }

    /// Restarts the clock (at `go`).
    pub fn start(&mut self) {
        self.started = Instant::now();
    }

    /// During the load, with `n` conversations written: a row at each step crossed, and
    /// RSS sampled for the peak in between.
    pub fn tick(&mut self, n: u64) {
        if n >= self.next_n {
            self.row("load", n);
            // One row however many steps the last progress line jumped.
            self.next_n = (n / self.step + 1) * self.step;
        } else if self.last_peak.elapsed() >= PEAK_EVERY {
            self.last_peak = Instant::now();
            if let Some(rss) = self.sampler.as_ref().and_then(|s| s.sample().ok()) {
                self.peak(rss.rss_bytes);
            }
        }
    }

    fn peak(&mut self, rss: u64) {
        self.rss_peak = Some(self.rss_peak.map_or(rss, |p| p.max(rss)));
    }

    /// Takes a row now.
    pub fn row(&mut self, phase: &str, n: u64) {
        let metrics = self.token.as_deref().and_then(|token| {
            admin::metrics(self.admin, token)
                .map_err(|e| {
                    if !self.warned {
                        self.warned = true;
                        eprintln!("loadgen: scraping {}/metrics: {e:#}", self.admin);
                    }
                })
                .ok()
        });
        let gauge = |name: &str| {
            metrics
                .as_deref()
                .and_then(|m| family_sum(m, name))
                .map(|v| v as u64)
        };
        let rss_bytes = match &self.sampler {
            Some(s) => s.sample().ok().map(|s| s.rss_bytes),
            None => gauge("process_resident_memory_bytes"),
        };
        if let Some(rss) = rss_bytes {
            self.peak(rss);
        }
        self.last_peak = Instant::now();
        self.rows.push(Row {
            phase: phase.into(),
            n,
            secs: self.started.elapsed().as_secs_f64(),
            rss_bytes,
            conversations: gauge("imgate_conversations"),
            evicted: gauge("imgate_conversations_evicted_total"),
            loaded: gauge("imgate_conversations_loaded_total"),
            hot_messages: gauge("imgate_hot_messages"),
            hot_bytes: gauge("imgate_hot_bytes"),
            dedupe_entries: gauge("imgate_dedupe_entries"),
            open_fds: gauge("process_open_fds"),
        });
    }

    /// The rows and the peak, for the summary, given the conversations `written` (the
    /// caller fills in the other counts).
    pub fn finish(self, written: u64, rss_max_bytes: Option<u64>) -> ConvsSummary {
        let rss_at = |phase: &str| {
            self.rows
                .iter()
                .find(|r| r.phase == phase)
                .and_then(|r| r.rss_bytes)
        };
        let rss_per_conversation_bytes = match (rss_at("start"), rss_at("settled")) {
            (Some(a), Some(b)) if written > 0 => Some(b.saturating_sub(a) / written),
            _ => None,
        };
        ConvsSummary {
            written,
            rss_per_conversation_bytes,
            rss_peak_bytes: self.rss_peak,
            rss_max_bytes,
            over_bound: matches!((self.rss_peak, rss_max_bytes), (Some(p), Some(m)) if p > m),
            rows: self.rows,
            ..ConvsSummary::default()
        }
    }
}

/// The sum of every sample of metric family `name` (each shard's, say) in Prometheus text,
/// or `None` if it has none. The name must match whole: `imgate_conversations` is not
/// `imgate_conversations_loaded_total`.
pub fn family_sum(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !rest.starts_with(['{', ' ']) {
            continue;
        }
        let Some(v) = line
            .rsplit_once(' ')
            .and_then(|(_, v)| v.parse::<f64>().ok())
        else {
            continue;
        };
        sum = Some(sum.unwrap_or(0.0) + v);
    }
    sum
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn mib(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.1}", v as f64 / MIB))
}

impl ConvsSummary {
    /// The table of RSS against N, and the counts.
    pub fn text(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "convs        written {} of {} (one message each, acked); rate-limited and written again {}; read back {} of {} ({} missing)",
            self.written,
            self.target,
            self.rate_limited,
            self.verified,
            self.verified + self.verify_missing,
            self.verify_missing
        );
        let head = [
            "phase",
            "N",
            "secs",
            "RSS MiB",
            "convs in mem",
            "evicted",
            "loaded",
            "hot msgs",
            "hot MiB",
            "dedupe",
            "fds",
        ];
        let mut rows: Vec<Vec<String>> = vec![head.iter().map(|h| h.to_string()).collect()];
        for r in &self.rows {
            rows.push(vec![
                r.phase.clone(),
                r.n.to_string(),
                format!("{:.1}", r.secs),
                mib(r.rss_bytes),
                opt(r.conversations),
                opt(r.evicted),
                opt(r.loaded),
                opt(r.hot_messages),
                mib(r.hot_bytes),
                opt(r.dedupe_entries),
                opt(r.open_fds),
            ]);
        }
        let widths: Vec<usize> = (0..head.len())
            .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
            .collect();
        for r in &rows {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (c, w))| {
                    if i == 0 {
                        format!("{c:<w$}")
                    } else {
                        format!("{c:>w$}")
                    }
                })
                .collect();
            let _ = writeln!(t, "  {}", cells.join("  "));
        }
        let bound = match self.rss_max_bytes {
            Some(m) => format!(
                "; bound {:.1} MiB: {}",
                m as f64 / MIB,
                if self.over_bound { "OVER" } else { "within" }
            ),
            None => String::new(),
        };
        let per = self
            .rss_per_conversation_bytes
            .map_or_else(String::new, |b| {
                format!("; growth start->settled {b} B per conversation")
            });
        let _ = writeln!(
            t,
            "rss peak     {} MiB{bound}{per}",
            mib(self.rss_peak_bytes)
        );
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_sums_over_shards_and_matches_its_name_whole() {
        let text = "# HELP imgate_conversations Conversations.\n\
                    # TYPE imgate_conversations gauge\n\
                    imgate_conversations{shard=\"0\"} 100000\n\
                    imgate_conversations{shard=\"1\"} 99999\n\
                    imgate_conversations_loaded_total{shard=\"0\"} 7\n\
                    process_open_fds 31\n";
        assert_eq!(family_sum(text, "imgate_conversations"), Some(199_999.0));
        assert_eq!(
            family_sum(text, "imgate_conversations_loaded_total"),
            Some(7.0)
        );
        assert_eq!(family_sum(text, "process_open_fds"), Some(31.0));
        assert_eq!(family_sum(text, "imgate_hot_bytes"), None);
    }

    #[test]
    fn the_table_has_a_line_per_row_and_names_the_bound() {
        let s = ConvsSummary {
            target: 10,
            written: 10,
            rss_peak_bytes: Some(3 << 20),
            rss_max_bytes: Some(2 << 20),
            over_bound: true,
            rows: vec![
                Row {
                    phase: "start".into(),
                    rss_bytes: Some(1 << 20),
                    ..Row::default()
                },
                Row {
                    phase: "load".into(),
                    n: 10,
                    rss_bytes: Some(3 << 20),
                    conversations: Some(10),
                    ..Row::default()
                },
            ],
            ..ConvsSummary::default()
        };
        let t = s.text();
        assert!(t.contains("written 10 of 10"), "{t}");
        let load = t
            .lines()
            .find(|l| l.trim_start().starts_with("load"))
            .unwrap();
        assert!(load.contains("3.0") && load.contains(" 10 "), "{load}");
        assert!(t.contains("bound 2.0 MiB: OVER"), "{t}");
    }
}
