//! What loadgen reads from and asks of the operating system: the open-file limit, and a
//! gateway process's memory and CPU from /proc.

use std::time::Instant;

/// Raises the soft open-file limit to the hard limit; returns the soft limit in force.
pub fn raise_nofile_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024)
}

/// Samples of another process (the gateway) from /proc.
pub struct ProcSampler {
    pid: u32,
}

/// One sample.
#[derive(Clone, Copy, Debug)]
pub struct ProcSample {
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// User plus system CPU time used so far, seconds.
    pub cpu_secs: f64,
    /// When it was taken.
    pub at: Instant,
}

/// Clock ticks per second in /proc/<pid>/stat: USER_HZ, which Linux fixes at 100 for
/// user space on every architecture it reports to.
const USER_HZ: f64 = 100.0;

impl ProcSampler {
    /// A sampler of `pid`; fails if there is no such process.
    pub fn new(pid: u32) -> anyhow::Result<ProcSampler> {
        let s = ProcSampler { pid };
        s.sample()?;
        Ok(s)
    }

    /// Reads the process's RSS and CPU time now.
    pub fn sample(&self) -> anyhow::Result<ProcSample> {
        let at = Instant::now();
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .map_err(|e| anyhow::anyhow!("reading /proc/{}/status: {e}", self.pid))?;
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{}/status", self.pid))?;
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .map_err(|e| anyhow::anyhow!("reading /proc/{}/stat: {e}", self.pid))?;
        let cpu_secs = parse_stat_cpu_ticks(&stat)
            .ok_or_else(|| anyhow::anyhow!("unreadable /proc/{}/stat", self.pid))?
            as f64
            / USER_HZ;
        Ok(ProcSample {
            rss_bytes: rss_kib * 1024,
            cpu_secs,
            at,
        })
    }
}

/// utime + stime from a /proc/<pid>/stat line. The command name (field 2) is in
/// parentheses and may hold spaces, so fields are counted after its closing parenthesis.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")": state is field 3, so utime (field 14) and stime (15) are the 12th and
    // 13th whitespace-separated fields here.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_ticks_skip_a_command_name_with_spaces() {
        let line =
            "4242 (gate way) S 1 4242 4242 0 -1 4194560 900 0 0 0 123 45 0 0 20 0 3 0 99 1000 200";
        assert_eq!(parse_stat_cpu_ticks(line), Some(168));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn sampling_this_process_reads_memory_and_cpu() {
        let s = ProcSampler::new(std::process::id())
            .unwrap()
            .sample()
            .unwrap();
        assert!(s.rss_bytes > 0);
        assert!(s.cpu_secs >= 0.0);
        assert!(ProcSampler::new(u32::MAX).is_err());
    }
}
