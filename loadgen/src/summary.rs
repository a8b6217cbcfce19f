//! The run's summary: worker reports merged, as text for people and JSON for machines, and
//! the latency histograms as HdrHistogram percentile-distribution files.

use crate::convs::ConvsSummary;
use crate::ledger::Verdict;
use crate::spec::{Counters, Report};
use anyhow::{anyhow, Result};
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Percentiles.
    pub p50_us: u64,
    /// See `p50_us`.
    pub p90_us: u64,
    /// See `p50_us`.
    pub p99_us: u64,
    /// See `p50_us`.
    pub p999_us: u64,
    /// The largest sample.
    pub max_us: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        Latency {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// The gateway's resources over the run (with `--gateway-pid`).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct GatewayUse {
    /// The gateway's process id.
    pub pid: u32,
    /// RSS before loadgen connected.
    pub rss_before_bytes: u64,
    /// RSS at the end of the load window, with the connections held.
    pub rss_held_bytes: u64,
    /// Growth per connection held: (held - before) / connections held.
    pub rss_per_connection_bytes: u64,
    /// CPU used during the load window, in cores (1.0 = one core busy).
    pub cpu_cores: f64,
}

/// Everything a run reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Scenario name.
    pub scenario: String,
    /// Connections asked for.
    pub connections: u64,
    /// Worker processes.
    pub workers: usize,
    /// Connections authenticated at the end of the window.
    pub held: u64,
    /// Fewest authenticated during the window.
    pub held_min: u64,
    /// Seconds from the first connect until all were authenticated (or the connect phase
    /// timed out).
    pub connect_secs: f64,
    /// Authentications per second in the connect phase.
    pub connect_rate: f64,
    /// Length of the load window, seconds.
    pub window_secs: f64,
    /// Counters over the window (end minus start).
    pub window: Counters,
    /// Messages per second over the window.
    pub sent_per_sec: f64,
    /// See `sent_per_sec`.
    pub acked_per_sec: f64,
    /// See `sent_per_sec`.
    pub delivered_per_sec: f64,
    /// Reconnects per second over the window.
    pub drops_per_sec: f64,
    /// Counters at the end of the run, the drain included.
    pub totals: Counters,
    /// send->Ack latency, from the intended send time (coordinated-omission corrected).
    pub ack_latency: Latency,
    /// send->Deliver latency at every receiver, the same way.
    pub deliver_latency: Latency,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Loss, duplication, order.
    pub verdict: Verdict,
    /// The gateway's memory and CPU, with `--gateway-pid`.
    pub gateway: Option<GatewayUse>,
    /// The `convs` scenario: conversations written and RSS against their number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub convs: Option<ConvsSummary>,
}

/// Worker reports merged: counters summed, histograms added.
pub struct Merged {
    /// The summary (connect and gateway fields left for the caller).
    pub summary: Summary,
    /// send->Ack latency.
    pub ack: Histogram<u64>,
    /// send->Deliver latency.
    pub deliver: Histogram<u64>,
}

/// Merges worker reports.
pub fn merge(reports: &[Report]) -> Result<Merged> {
    let mut ack = Histogram::<u64>::new(3)?;
    let mut deliver = Histogram::<u64>::new(3)?;
    let mut s = Summary::default();
    let mut de = Deserializer::new();
    let mut window_secs: f64 = 0.0;
    for r in reports {
        let a: Histogram<u64> = de
            .deserialize(&mut &r.ack_hist[..])
            .map_err(|e| anyhow!("a worker's ack histogram is unreadable: {e:?}"))?;
        let d: Histogram<u64> = de
            .deserialize(&mut &r.deliver_hist[..])
            .map_err(|e| anyhow!("a worker's deliver histogram is unreadable: {e:?}"))?;
        ack.add(&a)?;
        deliver.add(&d)?;
        s.totals.add(&r.totals);
        let mut w = r.at_stop;
        w.sent -= r.at_go.sent;
        w.acked -= r.at_go.acked;
        w.delivered -= r.at_go.delivered;
        w.logins -= r.at_go.logins;
        w.drops -= r.at_go.drops;
        w.errors -= r.at_go.errors;
        w.rate_limited -= r.at_go.rate_limited;
        s.window.add(&w);
        s.held_min += r.held_min;
        for (k, v) in &r.errors {
            *s.errors.entry(k.clone()).or_default() += v;
        }
        s.verdict.lost += r.verdict.lost;
        s.verdict.duplicated += r.verdict.duplicated;
        s.verdict.reordered += r.verdict.reordered;
        s.verdict.unresolved += r.verdict.unresolved;
        window_secs = window_secs.max(r.window_secs);
    }
    s.held = s.window.authenticated;
    s.window_secs = window_secs;
    if window_secs > 0.0 {
        s.sent_per_sec = s.window.sent as f64 / window_secs;
        s.acked_per_sec = s.window.acked as f64 / window_secs;
        s.delivered_per_sec = s.window.delivered as f64 / window_secs;
        s.drops_per_sec = s.window.drops as f64 / window_secs;
    }
    s.ack_latency = Latency::of(&ack);
    s.deliver_latency = Latency::of(&deliver);
    Ok(Merged {
        summary: s,
        ack,
        deliver,
    })
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn latency_line(l: &Latency) -> String {
    if l.count == 0 {
        return "no samples".into();
    }
    format!(
        "p50 {} ms  p90 {} ms  p99 {} ms  p99.9 {} ms  max {} ms  ({} samples)",
        ms(l.p50_us),
        ms(l.p90_us),
        ms(l.p99_us),
        ms(l.p999_us),
        ms(l.max_us),
        l.count
    )
}

impl Summary {
    /// The human-readable summary.
    pub fn text(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "loadgen {}: {} connections over {} worker(s), {:.1} s window",
            self.scenario, self.connections, self.workers, self.window_secs
        );
        let _ = writeln!(
            t,
            "connections  held {} of {} at the end, at least {} throughout; all up in {:.1} s ({:.0}/s); logins {}, drops {} ({:.0}/s)",
            self.held,
            self.connections,
            self.held_min,
            self.connect_secs,
            self.connect_rate,
            self.totals.logins,
            self.window.drops,
            self.drops_per_sec
        );
        let _ = writeln!(
            t,
            "messages     sent {} ({:.0}/s), acked {} ({:.0}/s), delivered {} ({:.0}/s)",
            self.window.sent,
            self.sent_per_sec,
            self.window.acked,
            self.acked_per_sec,
            self.window.delivered,
            self.delivered_per_sec
        );
        let _ = writeln!(t, "send->ack    {}", latency_line(&self.ack_latency));
        let _ = writeln!(t, "send->deliver {}", latency_line(&self.deliver_latency));
        let v = &self.verdict;
        let _ = writeln!(
            t,
            "correctness  lost {}, duplicated {}, reordered {}, unresolved {}",
            v.lost, v.duplicated, v.reordered, v.unresolved
        );
        if self.errors.is_empty() {
            let _ = writeln!(t, "errors       none");
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            let _ = writeln!(t, "errors       {}", list.join("; "));
        }
        if let Some(g) = &self.gateway {
            // Convs grows memory by conversation, not by connection: its table says how.
            let per = if self.convs.is_some() {
                String::new()
            } else {
                format!(": {} B per connection", g.rss_per_connection_bytes)
            };
            let _ = writeln!(
                t,
                "gateway      pid {}: RSS {:.1} MiB before, {:.1} MiB held{per}; CPU {:.2} cores over the window",
                g.pid,
                g.rss_before_bytes as f64 / 1048576.0,
                g.rss_held_bytes as f64 / 1048576.0,
                g.cpu_cores
            );
        }
        if let Some(c) = &self.convs {
            t.push_str(&c.text());
        }
        t
    }
}

/// Writes `h` in HdrHistogram's percentile-distribution text format (values in ms), which
/// HdrHistogram's plotter and most tools that read wrk2 output accept.
pub fn write_hgrm(h: &Histogram<u64>, path: &Path) -> Result<()> {
    let mut t = String::from("       Value     Percentile TotalCount 1/(1-Percentile)\n\n");
    let mut total = 0u64;
    for v in h.iter_quantiles(1) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 {
            format!("{:.2}", 1.0 / (1.0 - q))
        } else {
            String::new()
        };
        let _ = writeln!(
            t,
            "{:12.3} {:14.12} {:10} {:>14}",
            v.value_iterated_to() as f64 / 1000.0,
            q,
            total,
            inv
        );
    }
    let _ = writeln!(
        t,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    );
    let _ = writeln!(
        t,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        h.max() as f64 / 1000.0,
        h.len()
    );
    std::fs::write(path, t).map_err(|e| anyhow!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::{Serializer, V2Serializer};

    fn report(samples: &[u64], sent: u64) -> Report {
        let mut h = Histogram::<u64>::new(3).unwrap();
        for &s in samples {
            h.record(s).unwrap();
        }
        let mut buf = Vec::new();
        V2Serializer::new().serialize(&h, &mut buf).unwrap();
        Report {
            at_stop: Counters {
                sent,
                acked: sent,
                authenticated: 2,
                ..Counters::default()
            },
            at_go: Counters {
                sent: 1,
                acked: 1,
                ..Counters::default()
            },
            window_secs: 2.0,
            held_min: 2,
            ack_hist: buf.clone(),
            deliver_hist: buf,
            verdict: Verdict {
                lost: 1,
                ..Verdict::default()
            },
            ..Report::default()
        }
    }

    #[test]
    fn merging_adds_histograms_counters_and_verdicts() {
        let m = merge(&[report(&[100, 200], 11), report(&[300, 10_000], 21)]).unwrap();
        assert_eq!(m.ack.len(), 4);
        assert_eq!(m.summary.ack_latency.max_us, m.ack.max());
        assert!(m.summary.ack_latency.max_us >= 10_000);
        assert_eq!(m.summary.window.sent, 30);
        assert_eq!(m.summary.acked_per_sec, 15.0);
        assert_eq!(m.summary.held, 4);
        assert_eq!(m.summary.verdict.lost, 2);
    }

    #[test]
    fn a_percentile_file_ends_at_the_total_count() {
        let m = merge(&[report(&[1000, 2000, 3000], 4)]).unwrap();
        let path = std::env::temp_dir().join(format!("loadgen-test-{}.hgrm", std::process::id()));
        write_hgrm(&m.ack, &path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(text.contains("Total count    =            3"), "{text}");
        let last_row = text.lines().rfind(|l| !l.starts_with('#')).unwrap();
        assert!(last_row.contains(" 3 "), "{last_row}");
    }
}
