//! `loadgen`: capacity and latency tests against a real imgate gateway.
//!
//! The parent process plans the load (users, conversations, rates), starts worker processes
//! (this same binary, `loadgen worker`), spreads connections over them and over source
//! addresses 127.0.0.1..N (one process may hold only so many open files), then drives the
//! phases: connect everything, `go`, hold or load for the duration, `stop`, settle, and
//! report. See `worker.rs` for what a worker does and `ledger.rs` for the correctness check.
#![forbid(unsafe_code)]

mod admin;
mod conn;
mod convs;
mod ledger;
mod spec;
mod summary;
mod sys;
mod timers;
mod worker;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use imgate_core::proto::{ConvId, UserId};
use spec::{ConvsSpec, Counters, Report, Scenario, Unit, WorkerLine, WorkerSpec};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use summary::{GatewayUse, Summary};

/// Connections one worker takes by default: under the 20,000 open files a process may have
/// on the build machines, with room for the worker's own (epoll, waker, pipes).
const CONNECTIONS_PER_WORKER: usize = 15_000;

/// imgate loadgen: idle, chat, fan-out, reconnect and many-conversation load against a
/// gateway, with latency histograms (corrected for coordinated omission) and correctness
/// counts.
///
/// Exit status: 0 when the run was clean; 1 when a message was lost, duplicated or
/// reordered; 3 when there were errors, unresolved sends, fewer connections held than
/// asked for, or (convs) fewer conversations written than asked for; 4 (convs) when the
/// gateway's RSS went over --rss-max-mib; 2 for bad usage.
#[derive(Parser, Debug)]
#[command(name = "loadgen", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    scenario: ScenarioCmd,
    /// Gateway client address.
    #[arg(long, global = true, default_value = "127.0.0.1:7400")]
    gateway: SocketAddr,
    /// Gateway admin address (fanout creates its groups there; convs reads /metrics).
    #[arg(long, global = true, default_value = "127.0.0.1:7401")]
    admin: SocketAddr,
    /// File holding the gateway's admin bearer token (surrounding whitespace trimmed),
    /// read only when groups are created or (convs) metrics read. Default: the token a
    /// zero-config gateway generates.
    #[arg(long, global = true, default_value = "imgate-data/admin-token")]
    admin_token_file: PathBuf,
    /// File holding the gateway's HS256 secret (surrounding whitespace trimmed), as the
    /// gateway reads it. Default: the dev secret of a zero-config gateway.
    #[arg(long, global = true, default_value = "imgate-data/dev-secret.hex")]
    secret_file: PathBuf,
    /// The HS256 secret itself, instead of --secret-file (visible to `ps`: tests only).
    #[arg(long, global = true)]
    secret: Option<String>,
    /// Connections (one user, one device each).
    #[arg(short = 'c', long, global = true, default_value_t = 1000)]
    connections: usize,
    /// Connections opened per second, all workers together.
    #[arg(long, global = true, default_value_t = 2000.0)]
    connect_rate: f64,
    /// Seconds of load (or of holding, for idle) once every connection is up.
    #[arg(short = 'd', long, global = true, default_value_t = 30)]
    duration: u64,
    /// Seconds to wait for every connection to come up before starting anyway.
    /// Default: connections / connect-rate + 30.
    #[arg(long, global = true)]
    connect_timeout: Option<u64>,
    /// Seconds after the load for acks and deliveries to settle before counting loss.
    #[arg(long, global = true, default_value_t = 15)]
    drain: u64,
    /// Worker processes. Default: one per 15,000 connections.
    #[arg(short = 'w', long, global = true)]
    workers: Option<usize>,
    /// Spread connections over source addresses 127.0.0.1 .. 127.0.0.N.
    #[arg(long, global = true, default_value_t = 4)]
    source_addrs: u8,
    /// Payload bytes per message (at least 16: loadgen's header). Default: 100; 32 for
    /// convs.
    #[arg(long, global = true)]
    payload_bytes: Option<usize>,
    /// Client heartbeat interval, seconds (the gateway's AuthOk may shorten it).
    #[arg(long, global = true, default_value_t = 30)]
    heartbeat_secs: u64,
    /// User id of the first connection; connection i is user (base + i). Default: derived
    /// from the clock, so runs against one gateway never share users or conversations.
    #[arg(long, global = true)]
    user_base: Option<u64>,
    /// Gateway process id: sample its RSS and CPU and report RSS per connection.
    #[arg(long, global = true)]
    gateway_pid: Option<u32>,
    /// Print the summary as JSON on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Also write the summary as JSON to this file (whatever --json says).
    #[arg(long, global = true, value_name = "FILE")]
    json_out: Option<PathBuf>,
    /// Write the latency histograms to PREFIX.ack.hgrm and PREFIX.deliver.hgrm
    /// (HdrHistogram percentile-distribution format, milliseconds).
    #[arg(long, global = true, value_name = "PREFIX")]
    hdr_out: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum ScenarioCmd {
    /// Open the connections at --connect-rate and hold them with heartbeats.
    Idle,
    /// Users in direct pairs, both sides sending, at an aggregate open-loop rate.
    Chat {
        /// Messages per second, all connections together.
        #[arg(short = 'r', long, default_value_t = 10_000.0)]
        rate: f64,
    },
    /// Groups of --group-size members; a few members of each send.
    Fanout {
        /// Members per group (the gateway pushes to groups up to its read-diffusion
        /// threshold, 500 by default, and sends Notify above it).
        #[arg(short = 'g', long, default_value_t = 100)]
        group_size: usize,
        /// Sending members per group.
        #[arg(long, default_value_t = 1)]
        senders: usize,
        /// Messages sent per second, all groups together.
        #[arg(short = 'r', long, default_value_t = 100.0)]
        rate: f64,
    },
    /// Direct pairs chatting while connections are dropped and reconnected with Sync.
    Reconnect {
        /// Messages per second, all connections together.
        #[arg(short = 'r', long, default_value_t = 1000.0)]
        rate: f64,
        /// Connections dropped (abruptly, RST) and reconnected per second.
        #[arg(long, default_value_t = 1000.0)]
        reconnects_per_sec: f64,
    },
    /// Each connection writes one message to one brand-new direct conversation after
    /// another (with a peer user never connected and never reused), at an aggregate
    /// open-loop rate, until --count conversations are written; then reads a sample back.
    /// Reports the gateway's RSS against the number written (with --gateway-pid, or from
    /// /metrics), and its conversation gauges when the admin token is at hand.
    Convs {
        /// Conversations to write, all connections together. The load ends when all are
        /// acked, or after --duration.
        #[arg(short = 'n', long, default_value_t = 100_000)]
        count: u64,
        /// Messages (so new conversations) per second, all connections together. The
        /// gateway limits each connection to 1,000 frames/s by default: spread the rate
        /// over enough connections. A Send refused `RateLimited` is written again later.
        #[arg(short = 'r', long, default_value_t = 10_000.0)]
        rate: f64,
        /// A table row every this many conversations. Default: a tenth of --count.
        #[arg(long)]
        report_every: Option<u64>,
        /// Conversations read back (Pull) after the load, all connections together, spread
        /// evenly over those written: each must hold its message.
        #[arg(long, default_value_t = 1000)]
        verify: u64,
        /// Bound on the gateway's RSS, MiB: a peak above it fails the run (exit 4).
        #[arg(long)]
        rss_max_mib: Option<f64>,
        /// User id of peer 0; conversation k is with user (peer-base + k). Default:
        /// 2^62 + 64 x the user base, so runs a second or more apart never share a peer
        /// (up to 2^26 conversations each) and peers never meet loadgen's own users.
        #[arg(long)]
        peer_base: Option<u64>,
    },
    /// Internal: a worker process (spec on stdin).
    #[command(hide = true)]
    Worker,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.scenario {
        ScenarioCmd::Worker => worker::run().map(|()| ExitCode::SUCCESS),
        _ => orchestrate(&cli),
    };
    result.unwrap_or_else(|e| {
        eprintln!("loadgen: {e:#}");
        ExitCode::from(2)
    })
}

/// The plan: conversations, who sends, and the per-connection rates.
struct Plan {
    scenario: Scenario,
    units: Vec<Unit>,
    send_rate_per_sender: f64,
    drop_rate_per_conn: f64,
    groups: Vec<(u64, Vec<UserId>)>,
    convs: Option<ConvsSpec>,
}

fn plan(cli: &Cli, user_base: u64) -> Result<Plan> {
    let n = cli.connections;
    if n == 0 {
        bail!("--connections must be at least 1");
    }
    let user = |i: usize| UserId(user_base + i as u64);
    let pairs = || -> Result<Vec<Unit>> {
        if !n.is_multiple_of(2) {
            bail!("this scenario pairs users: --connections must be even");
        }
        Ok((0..n / 2)
            .map(|p| {
                let (a, b) = (2 * p, 2 * p + 1);
                Unit {
                    conv: Some(ConvId::direct(user(a), user(b))),
                    members: vec![a as u32, b as u32],
                    senders: vec![a as u32, b as u32],
                }
            })
            .collect())
    };
    let per = |rate: f64, senders: usize| {
        if rate < 0.0 || !rate.is_finite() {
            bail!("rates must be finite and not negative");
        }
        Ok(rate / senders as f64)
    };
    Ok(match &cli.scenario {
        ScenarioCmd::Idle => Plan {
            scenario: Scenario::Idle,
            units: (0..n)
                .map(|i| Unit {
                    conv: None,
                    members: vec![i as u32],
                    senders: vec![],
                })
                .collect(),
            send_rate_per_sender: 0.0,
            drop_rate_per_conn: 0.0,
            groups: vec![],
            convs: None,
        },
        ScenarioCmd::Chat { rate } => Plan {
            scenario: Scenario::Chat,
            units: pairs()?,
            send_rate_per_sender: per(*rate, n)?,
            drop_rate_per_conn: 0.0,
            groups: vec![],
            convs: None,
        },
        ScenarioCmd::Reconnect {
            rate,
            reconnects_per_sec,
        } => Plan {
            scenario: Scenario::Reconnect,
            units: pairs()?,
            send_rate_per_sender: per(*rate, n)?,
            drop_rate_per_conn: per(*reconnects_per_sec, n)?,
            groups: vec![],
            convs: None,
        },
        ScenarioCmd::Fanout {
            group_size,
            senders,
            rate,
        } => {
            let (g, s) = (*group_size, *senders);
            if g < 2 || !n.is_multiple_of(g) {
                bail!("--group-size must be at least 2 and divide --connections ({n})");
            }
            if s == 0 || s > g {
                bail!("--senders must be between 1 and --group-size");
            }
            let mut units = Vec::new();
            let mut groups = Vec::new();
            for k in 0..n / g {
                // Group ids share the run's base, so reruns never meet an existing group.
                let gid = user_base + k as u64;
                let members: Vec<u32> = (k * g..(k + 1) * g).map(|i| i as u32).collect();
                groups.push((gid, (k * g..(k + 1) * g).map(user).collect()));
                units.push(Unit {
                    conv: Some(ConvId::group(gid)),
                    senders: members[..s].to_vec(),
                    members,
                });
            }
            Plan {
                scenario: Scenario::Fanout,
                send_rate_per_sender: per(*rate, n / g * s)?,
                units,
                drop_rate_per_conn: 0.0,
                groups,
                convs: None,
            }
        }
        ScenarioCmd::Convs {
            count,
            rate,
            verify,
            peer_base,
            ..
        } => {
            if *count == 0 {
                bail!("--count must be at least 1");
            }
            let peer_base = match peer_base {
                Some(b) => *b,
                None => user_base
                    .checked_mul(64)
                    .and_then(|b| b.checked_add(1 << 62))
                    .context("the user base is too large to derive peers from: set --peer-base")?,
            };
            let peers = peer_base
                ..peer_base
                    .checked_add(*count)
                    .context("--peer-base + --count overflows")?;
            let users = user_base..user_base + n as u64;
            if peer_base == 0 || (peers.start < users.end && users.start < peers.end) {
                bail!("peers {peers:?} must be non-zero and not meet the users {users:?}");
            }
            let per_connection = per(*rate, n)?;
            if per_connection > 900.0 {
                eprintln!(
                    "loadgen: {per_connection:.0} messages/s per connection is close to the gateway's \
                     default limit of 1,000 frames/s: expect RateLimited Nacks; use more connections"
                );
            }
            Plan {
                scenario: Scenario::Convs,
                units: (0..n)
                    .map(|i| Unit {
                        conv: None,
                        members: vec![i as u32],
                        senders: vec![i as u32],
                    })
                    .collect(),
                send_rate_per_sender: per_connection,
                drop_rate_per_conn: 0.0,
                groups: vec![],
                convs: Some(ConvsSpec {
                    count: *count,
                    connections: n as u64,
                    peer_base,
                    verify_per_connection: verify.div_ceil(n as u64),
                }),
            }
        }
        ScenarioCmd::Worker => unreachable!("handled in main"),
    })
}

fn secret(cli: &Cli) -> Result<Vec<u8>> {
    let s = match &cli.secret {
        Some(s) => s.clone(),
        None => std::fs::read_to_string(&cli.secret_file).with_context(|| {
            format!(
                "reading the gateway's secret from {} (set --secret-file)",
                cli.secret_file.display()
            )
        })?,
    };
    Ok(s.trim().as_bytes().to_vec())
}

/// A running worker process.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    connections: usize,
    latest: Counters,
    report: Option<Report>,
    gone: bool,
}

enum FromWorker {
    Line(WorkerLine),
    /// Its stdout ended, with what went wrong if anything.
    Gone(Option<String>),
}

fn spawn_worker(
    index: usize,
    spec: &WorkerSpec,
    tx: mpsc::Sender<(usize, FromWorker)>,
) -> Result<Worker> {
    let exe = std::env::current_exe().context("finding loadgen's own binary")?;
    let mut child = Command::new(exe)
        .arg("worker")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting a worker process")?;
    let mut stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    writeln!(stdin, "{}", serde_json::to_string(spec)?)?;
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let msg = match line
                .map_err(|e| e.to_string())
                .and_then(|l| serde_json::from_str::<WorkerLine>(&l).map_err(|e| e.to_string()))
            {
                Ok(l) => FromWorker::Line(l),
                Err(e) => FromWorker::Gone(Some(e)),
            };
            let stop = matches!(msg, FromWorker::Gone(_));
            if tx.send((index, msg)).is_err() || stop {
                return;
            }
        }
        let _ = tx.send((index, FromWorker::Gone(None)));
    });
    Ok(Worker {
        child,
        stdin,
        connections: spec.connections(),
        latest: Counters::default(),
        report: None,
        gone: false,
    })
}

/// The parent's side of a run.
struct Run {
    workers: Vec<Worker>,
    rx: mpsc::Receiver<(usize, FromWorker)>,
    started: Instant,
    last_print: Instant,
    last_printed: Counters,
    quiet: bool,
    /// Convs: the conversations to write, for the progress line.
    convs_target: Option<u64>,
}

impl Run {
    /// Takes worker lines for up to `wait`.
    fn pump(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok((i, FromWorker::Line(WorkerLine::Progress(c)))) => self.workers[i].latest = c,
                Ok((i, FromWorker::Line(WorkerLine::Report(r)))) => {
                    self.workers[i].latest = r.totals;
                    self.workers[i].report = Some(*r);
                }
                Ok((i, FromWorker::Gone(why))) => {
                    if let Some(why) = why {
                        eprintln!("loadgen: worker {i}: {why}");
                    }
                    self.workers[i].gone = true;
                }
                Err(_) => return,
            }
        }
    }

    fn totals(&self) -> Counters {
        let mut t = Counters::default();
        for w in &self.workers {
            t.add(&w.latest);
        }
        t
    }

    fn progress(&mut self, phase: &str, connections: usize) {
        if self.last_print.elapsed() < Duration::from_secs(1) {
            return;
        }
        let now = self.totals();
        let secs = self.last_print.elapsed().as_secs_f64();
        let rate = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / secs;
        let convs = self.convs_target.map_or_else(String::new, |c| {
            format!(
                " | convs {}/{c}, rate-limited {}",
                now.acked, now.rate_limited
            )
        });
        if !self.quiet {
            eprintln!(
                "[{:>4}s] {phase:<10} conns {}/{} (+{:.0}/s) | sent {:.0}/s acked {:.0}/s delivered {:.0}/s | drops {:.0}/s | errors {}{convs}",
                self.started.elapsed().as_secs(),
                now.authenticated,
                connections,
                rate(now.logins, self.last_printed.logins),
                rate(now.sent, self.last_printed.sent),
                rate(now.acked, self.last_printed.acked),
                rate(now.delivered, self.last_printed.delivered),
                rate(now.drops, self.last_printed.drops),
                now.errors,
            );
        }
        self.last_print = Instant::now();
        self.last_printed = now;
    }

    fn all_gone(&self) -> bool {
        self.workers.iter().all(|w| w.gone)
    }

    fn tell(&mut self, cmd: &str) {
        for w in &mut self.workers {
            // A worker that died is noticed through its stdout.
            let _ = writeln!(w.stdin, "{cmd}");
        }
    }
}

fn orchestrate(cli: &Cli) -> Result<ExitCode> {
    let secret = secret(cli)?;
    let is_convs = matches!(cli.scenario, ScenarioCmd::Convs { .. });
    let payload_bytes = cli.payload_bytes.unwrap_or(if is_convs { 32 } else { 100 });
    if payload_bytes < worker::PAYLOAD_HEADER {
        bail!(
            "--payload-bytes must be at least {}",
            worker::PAYLOAD_HEADER
        );
    }
    if cli.source_addrs == 0 || cli.connect_rate <= 0.0 {
        bail!("--source-addrs and --connect-rate must be positive");
    }
    let user_base = cli.user_base.unwrap_or_else(|| {
        // Seconds since the epoch times 2^20: a fresh block of a million users per second.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
            << 20
    });
    let plan = plan(cli, user_base)?;
    if !plan.groups.is_empty() {
        let token = std::fs::read_to_string(&cli.admin_token_file).with_context(|| {
            format!(
                "reading the gateway's admin token from {} (set --admin-token-file)",
                cli.admin_token_file.display()
            )
        })?;
        for (gid, members) in &plan.groups {
            admin::create_group(cli.admin, token.trim(), *gid, members)
                .with_context(|| format!("creating group {gid} at {}", cli.admin))?;
        }
    }
    let n = cli.connections;
    let workers = cli
        .workers
        .unwrap_or(n.div_ceil(CONNECTIONS_PER_WORKER))
        .max(1);
    let parts = spec::split(plan.units, workers);
    let sources: Vec<Ipv4Addr> = (1..=cli.source_addrs)
        .map(|i| Ipv4Addr::new(127, 0, 0, i))
        .collect();
    let sampler = cli.gateway_pid.map(sys::ProcSampler::new).transpose()?;
    let before = sampler.as_ref().map(|s| s.sample()).transpose()?;
    let mut probe = match &cli.scenario {
        ScenarioCmd::Convs {
            count,
            report_every,
            ..
        } => {
            // Metrics are a bonus: without the token the table still has RSS (with a pid).
            let token = match std::fs::read_to_string(&cli.admin_token_file) {
                Ok(t) => Some(t.trim().to_string()),
                Err(e) => {
                    eprintln!(
                        "loadgen: no admin token in {} ({e}): the table leaves out the gateway's metrics",
                        cli.admin_token_file.display()
                    );
                    None
                }
            };
            let process = cli.gateway_pid.map(sys::ProcSampler::new).transpose()?;
            let step = report_every.unwrap_or((count / 10).max(1));
            Some(convs::Probe::new(process, cli.admin, token, step))
        }
        _ => None,
    };
    let convs_target = plan.convs.map(|c| c.count);

    let (tx, rx) = mpsc::channel();
    let mut run = Run {
        workers: Vec::new(),
        rx,
        started: Instant::now(),
        last_print: Instant::now(),
        last_printed: Counters::default(),
        quiet: cli.json,
        convs_target,
    };
    let connect_timeout = Duration::from_secs(
        cli.connect_timeout
            .unwrap_or((n as f64 / cli.connect_rate) as u64 + 30),
    );
    // Tokens outlive the whole run (reconnects log in again late in it), plus an hour.
    let token_ttl_secs = connect_timeout.as_secs() + cli.duration + cli.drain + 3600;
    for (i, units) in parts.into_iter().enumerate() {
        let share: usize = units.iter().map(|u| u.members.len()).sum();
        let spec = WorkerSpec {
            worker: i as u32,
            scenario: plan.scenario,
            gateway: cli.gateway,
            secret: secret.clone(),
            user_base,
            sources: sources.clone(),
            units,
            connect_rate: cli.connect_rate * share as f64 / n as f64,
            send_rate_per_sender: plan.send_rate_per_sender,
            drop_rate_per_conn: plan.drop_rate_per_conn,
            payload_bytes,
            heartbeat_secs: cli.heartbeat_secs,
            token_ttl_secs,
            drain_secs: cli.drain,
            convs: plan.convs,
        };
        run.workers.push(spawn_worker(i, &spec, tx.clone())?);
    }
    drop(tx);
    let worker_count = run.workers.len();
    debug_assert_eq!(run.workers.iter().map(|w| w.connections).sum::<usize>(), n);

    // Connect.
    while run.totals().authenticated < n as u64
        && run.started.elapsed() < connect_timeout
        && !run.all_gone()
    {
        run.pump(Duration::from_millis(100));
        run.progress("connecting", n);
    }
    let connect_secs = run.started.elapsed().as_secs_f64();
    let connected = run.totals().authenticated;

    // Load.
    if let Some(p) = &mut probe {
        p.start();
        p.row("start", 0);
    }
    run.tell("go");
    let go_sample = sampler.as_ref().map(|s| s.sample()).transpose()?;
    let window_end = Instant::now() + Duration::from_secs(cli.duration);
    while Instant::now() < window_end && !run.all_gone() {
        run.pump(Duration::from_millis(100));
        run.progress("running", n);
        if let Some(p) = &mut probe {
            // Convs: the load ends once every conversation is written.
            let written = run.totals().acked;
            p.tick(written);
            if convs_target.is_some_and(|c| written >= c) {
                break;
            }
        }
    }
    let stop_sample = sampler.as_ref().map(|s| s.sample()).transpose()?;
    run.tell("stop");

    // Settle and report.
    let report_deadline = Instant::now() + Duration::from_secs(cli.drain + 30);
    while run.workers.iter().any(|w| w.report.is_none() && !w.gone)
        && Instant::now() < report_deadline
    {
        run.pump(Duration::from_millis(100));
        run.progress("settling", n);
    }
    if let Some(p) = &mut probe {
        p.row("settled", run.totals().acked);
    }
    for w in &mut run.workers {
        if w.report.is_none() {
            let _ = w.child.kill();
        }
        let _ = w.child.wait();
    }
    if let Some(p) = &mut probe {
        // The workers are gone, and their connections with them: what stays is what the
        // gateway keeps for conversations nobody is connected to.
        std::thread::sleep(Duration::from_secs(1));
        p.row("disconnected", run.totals().acked);
    }
    let reports: Vec<Report> = run
        .workers
        .iter_mut()
        .filter_map(|w| w.report.take())
        .collect();
    if reports.len() < worker_count {
        eprintln!(
            "loadgen: {} of {worker_count} workers did not report; the summary covers the rest",
            worker_count - reports.len()
        );
    }
    let merged = summary::merge(&reports)?;
    let mut s: Summary = merged.summary;
    s.scenario = format!("{:?}", plan.scenario).to_lowercase();
    s.connections = n as u64;
    s.workers = worker_count;
    s.connect_secs = connect_secs;
    s.connect_rate = connected as f64 / connect_secs.max(1e-9);
    if let (Some(pid), Some(before), Some(go), Some(stop)) =
        (cli.gateway_pid, before, go_sample, stop_sample)
    {
        let held = s.held.max(1);
        s.gateway = Some(GatewayUse {
            pid,
            rss_before_bytes: before.rss_bytes,
            rss_held_bytes: stop.rss_bytes,
            rss_per_connection_bytes: stop.rss_bytes.saturating_sub(before.rss_bytes) / held,
            cpu_cores: (stop.cpu_secs - go.cpu_secs)
                / stop.at.duration_since(go.at).as_secs_f64().max(1e-9),
        });
    }
    if let (Some(p), Some(c), ScenarioCmd::Convs { rss_max_mib, .. }) =
        (probe, plan.convs, &cli.scenario)
    {
        let mut cs = p.finish(
            s.totals.acked,
            rss_max_mib.map(|m| (m * 1024.0 * 1024.0) as u64),
        );
        cs.target = c.count;
        cs.rate_limited = s.totals.rate_limited;
        cs.verified = s.totals.verified;
        cs.verify_missing = s.totals.verify_missing;
        cs.peer_base = c.peer_base;
        s.convs = Some(cs);
    }
    if let Some(prefix) = &cli.hdr_out {
        let with = |ext: &str| {
            let mut p = prefix.clone().into_os_string();
            p.push(ext);
            PathBuf::from(p)
        };
        summary::write_hgrm(&merged.ack, &with(".ack.hgrm"))?;
        summary::write_hgrm(&merged.deliver, &with(".deliver.hgrm"))?;
    }
    let json = serde_json::to_string_pretty(&s)?;
    if let Some(path) = &cli.json_out {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if cli.json {
        println!("{json}");
    } else {
        print!("{}", s.text());
    }
    let v = &s.verdict;
    let convs_missing = s.convs.as_ref().map_or(0, |c| c.verify_missing);
    let convs_short = s.convs.as_ref().is_some_and(|c| c.written < c.target);
    let over_bound = s.convs.as_ref().is_some_and(|c| c.over_bound);
    Ok(if v.lost + v.duplicated + v.reordered + convs_missing > 0 {
        ExitCode::from(1)
    } else if !s.errors.is_empty()
        || convs_short
        || v.unresolved > 0
        // Every connection up once the run settled; and throughout the window, except
        // for reconnect, which drops connections on purpose.
        || s.totals.authenticated < n as u64
        || (plan.scenario != Scenario::Reconnect && s.held_min < n as u64)
        || reports.len() < worker_count
    {
        ExitCode::from(3)
    } else if over_bound {
        ExitCode::from(4)
    } else {
        ExitCode::SUCCESS
    })
}
