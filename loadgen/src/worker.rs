//! A worker process: one thread, one epoll loop (mio) driving its share of the connections,
//! each running core's client engine over a nonblocking socket (see `conn.rs`).
//!
//! The parent writes the [`WorkerSpec`] as the first line of stdin, then `go` (start the
//! load) and `stop` (stop it, settle, report). The worker writes a [`WorkerLine::Progress`]
//! line a second and one [`WorkerLine::Report`] at the end, on stdout.
//!
//! Sends are open loop, as in wrk2: each sending connection has a schedule of intended send
//! times at its rate, and a message's latency is measured from its intended time, not from
//! when the (possibly late) loop got to it. So a stalled gateway shows as latency instead of
//! as fewer samples (coordinated omission).
//!
//! Every payload starts with [`PAYLOAD_HEADER`] bytes: the intended send time (ns since
//! this worker's epoch), the sender's connection index and the sender's message number.
//! A conversation's members all live in one worker, so the receiver reads the send time
//! on the same clock, and the [`Ledger`] sees both ends.
//!
//! In the `Convs` scenario a connection has no one conversation: each slot of its schedule
//! writes to the next brand-new direct conversation of its share (see [`ConvsSpec`]), a
//! Send Nacked `RateLimited` is written again later, and after the load each connection
//! reads a sample of its conversations back with Pull (phase `Verifying`). Its client
//! engine is rebuilt, unacked messages restored, after each disconnect, so a reconnect
//! never Syncs the cursors of thousands of conversations.
//!
//! # The tick
//!
//! The loop wakes at most once per [`TICK`] (1 ms), on the tick's boundary, and does the
//! tick's work in that one wake-up: every socket event since the last, then every timer
//! due by the boundary. Timers fire on boundaries, and a send's intended time is its
//! schedule time rounded up to the boundary it goes out on, so rounding is never counted
//! as the gateway's latency (only the loop's lateness past the boundary is, as it must
//! be). Receptions are timed by the kernel (`SO_TIMESTAMPNS`: when the bytes reached the
//! socket), not by when the loop got to them, so waiting for the boundary adds nothing
//! to a measured latency either. When nothing is due the loop blocks in epoll after the
//! boundary, so an idle worker still answers at once.
//!
//! Why: on the shared build machines a wake-up of a sleeping process costs tens of
//! microseconds (a virtual CPU leaves and re-enters idle), more than the frames it
//! handles. Waking on every arrival, a worker at 10,000 messages/s took over 3,000 wake-ups
//! a second; on the tick it takes 1,000, whatever the rate. 1 ms is also the resolution
//! of the tokio timers the loadgen used before (and the peer load generator still uses),
//! so the gateway sees the same shape of load: each millisecond's sends together.
//!
//! Why a hand-written loop and not an async runtime: loadgen must cost the machine less than
//! the gateway it measures, on the same cores. One loop over nonblocking sockets, one timer
//! heap, a read per frame received and a write per frame sent (no task per connection, no
//! waker, no timer registration per message) is what keeps it there. It shares no code with
//! the gateway's Reactor (io_uring), so a bug in one cannot hide in the other.
//!
//! [`ConvsSpec`]: crate::spec::ConvsSpec

use crate::conn::{untoken, Conn};
use crate::ledger::Ledger;
use crate::spec::{Counters, Report, WorkerLine, WorkerSpec};
use crate::timers::Timers;
use anyhow::{Context, Result};
use hdrhistogram::serialization::{Serializer, V2Serializer};
use hdrhistogram::Histogram;
use imgate_core::auth::{SigningKey, TokenSigner};
use mio::{Events, Poll, Registry, Token, Waker};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Bytes at the front of every payload: intended send time (u64 ns), sender (u32), number
/// (u32), little-endian.
pub const PAYLOAD_HEADER: usize = 16;

/// Bytes read from a socket at once, into the worker's one scratch buffer: far above a
/// frame of the default 100-byte payload, so a read almost always empties the socket.
const READ_CHUNK: usize = 64 * 1024;

/// Socket events taken from one `epoll_wait`: enough that a busy second (tens of thousands
/// of frames) takes a few calls a millisecond, not one per frame.
const EVENTS_PER_POLL: usize = 1024;

/// The loop's period: it wakes at most once per tick, on the tick's boundary (see the
/// module doc). 1 ms: the timer resolution of the tokio loadgen this loop replaced, so the
/// load keeps its shape (each millisecond's sends leave together) and latencies their
/// resolution; a longer tick would send in larger bursts, which the gateway handles more
/// cheaply than the spread-out arrivals of real clients.
pub const TICK: Duration = Duration::from_millis(1);

/// How late the kernel may wake the loop past a boundary, ns (`PR_SET_TIMERSLACK`; the
/// default is 50 µs): any lateness adds to the latencies measured, and a worker's few
/// timers gain nothing from being grouped with others'.
const TIMER_SLACK_NS: std::os::raw::c_ulong = 1_000;

/// Progress lines a second in the `Convs` scenario, so the parent reads the number of
/// conversations written (and samples the gateway) at a finer step than once a second.
const CONVS_PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Progress lines otherwise.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Least time the read-back of the `Convs` scenario may take before what is left of it
/// is counted unfinished.
const VERIFY_MIN: Duration = Duration::from_secs(10);

/// Pause between the settle and the read-back (`Convs`): the last writes again may have
/// spent the connection's frame budget at the gateway, and a Pull over it would be refused
/// with a close.
const VERIFY_PAUSE: Duration = Duration::from_secs(1);

/// The longest the loop sleeps with nothing due, so a wedged clock or a lost wake-up costs
/// a second at most.
const POLL_IDLE_MAX: Duration = Duration::from_secs(1);

/// The token of the waker the stdin thread pulls; connection tokens never reach it (their
/// generation half would have to be all ones as well as the slot).
const STDIN_TOKEN: Token = Token(usize::MAX);

/// Where the run is, as the connections see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Connections opening; no load yet.
    Connecting,
    /// Between `go` and `stop`: the load.
    Running,
    /// After `stop`: acks and deliveries settle.
    Draining,
    /// `Convs` only: read a sample of the conversations back.
    Verifying,
    /// Over: the report is being made.
    Done,
}

/// The worker's clocks: a monotonic epoch for latencies and ticks, the client engines' ms
/// clock, and the wall clock the kernel stamps receptions with.
pub struct Clock {
    epoch: Instant,
    /// Unix ms at `epoch`: the client engines' clock.
    epoch_unix_ms: u64,
    /// A monotonic instant and the wall-clock time read with it, taken after each
    /// `epoll_wait`: converts the kernel's receive stamps (wall clock) to instants. Taken
    /// afresh each time, so a step of the wall clock moves only the stamps around it.
    synced: (Instant, SystemTime),
}

impl Clock {
    /// A clock whose epoch is now.
    fn new() -> Result<Clock> {
        let (now, wall) = (Instant::now(), SystemTime::now());
        Ok(Clock {
            epoch: now,
            epoch_unix_ms: wall.duration_since(UNIX_EPOCH)?.as_millis() as u64,
            synced: (now, wall),
        })
    }

    /// The engines' time at `t`.
    pub fn core_at(&self, t: Instant) -> imgate_core::Instant {
        imgate_core::Instant::from_millis(
            self.epoch_unix_ms + t.saturating_duration_since(self.epoch).as_millis() as u64,
        )
    }

    /// The monotonic instant of engine time `t`.
    pub fn instant_of(&self, t: imgate_core::Instant) -> Instant {
        self.epoch + Duration::from_millis(t.as_millis().saturating_sub(self.epoch_unix_ms))
    }

    /// `t` in ns since the epoch: the clock payloads carry.
    pub fn nanos_since_epoch(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// The first tick boundary at or after `t`.
    pub fn tick_ceil(&self, t: Instant) -> Instant {
        let ns = self.nanos_since_epoch(t);
        let tick = TICK.as_nanos() as u64;
        self.epoch + Duration::from_nanos(ns.div_ceil(tick) * tick)
    }

    /// The last tick boundary at or before `t`.
    pub fn tick_floor(&self, t: Instant) -> Instant {
        let ns = self.nanos_since_epoch(t);
        let tick = TICK.as_nanos() as u64;
        self.epoch + Duration::from_nanos(ns / tick * tick)
    }

    /// Reads both clocks together, for [`Clock::instant_of_stamp`].
    fn sync(&mut self) {
        self.synced = (Instant::now(), SystemTime::now());
    }

    /// The instant of a kernel receive stamp (wall clock), as of the last sync; a stamp
    /// after the sync (it cannot be, but wall clocks step) is taken as the sync itself.
    pub fn instant_of_stamp(&self, stamp: SystemTime) -> Instant {
        let (mono, wall) = self.synced;
        let age = wall.duration_since(stamp).unwrap_or(Duration::ZERO);
        mono.checked_sub(age).unwrap_or(mono)
    }
}

/// Counters, the ledger and the histograms: what every connection adds to.
pub struct State {
    /// The counters progress lines carry.
    pub counters: Counters,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Acks and receptions, for the verdict.
    pub ledger: Ledger,
    /// Send-to-ack latency of the messages sent in the load window (`in_window`), so
    /// that its count is the window's `sent` once all are acked.
    pub ack_hist: Histogram<u64>,
    /// Send-to-deliver latency of every message shown to a receiver.
    pub deliver_hist: Histogram<u64>,
    /// Between `go` and `stop`, as the window's counters see it: set in the step that
    /// takes `at_go`, cleared in the one that takes `at_stop`.
    pub in_window: bool,
    /// Sum of every client's outbox: messages not yet acked or finally refused (with, in
    /// `Convs`, conversations waiting to be written again).
    pub outboxes: usize,
    /// `Convs` read-back: connections that planned theirs...
    pub verify_planned: u64,
    /// ...and reads not yet concluded.
    pub verify_open: u64,
    /// Receptions owed for acked messages (an acked message owes one per other member)...
    pub owed: u64,
    /// ...and receptions made (first showings only).
    pub made: u64,
}

impl State {
    /// Counts `n` errors of `kind`.
    pub fn error(&mut self, kind: impl Into<String>, n: u64) {
        *self.errors.entry(kind.into()).or_default() += n;
        self.counters.errors += n;
    }
}

/// What the connections' handlers share: one thread owns it and lends it to each in turn.
pub struct Ctx {
    /// The worker's spec.
    pub spec: WorkerSpec,
    /// The clocks.
    pub clock: Clock,
    /// Mints each connection's token.
    pub signer: TokenSigner,
    /// Counters, ledger, histograms.
    pub state: State,
    /// The run's phase.
    pub phase: Phase,
    /// Where sockets are registered.
    pub registry: Registry,
    /// Each connection's next wake-up.
    pub timers: Timers,
    /// Every read goes through it (see `conn::read_available`).
    pub scratch: Vec<u8>,
    /// Room for a read's control message: its receive stamp.
    pub cmsg: Vec<u8>,
}

/// Runs a worker: reads its spec from stdin, applies the load, prints its report.
pub fn run() -> Result<()> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the worker spec from stdin")?;
    let spec: WorkerSpec = serde_json::from_str(&line).context("parsing the worker spec")?;
    crate::sys::raise_nofile_limit();
    // Tick boundaries to the microsecond rather than the default 50 µs late: lateness
    // past a boundary is counted in the latencies. Best effort.
    let _ = nix::sys::prctl::set_timerslack(TIMER_SLACK_NS);
    let report = Worker::new(spec)?.run()?;
    emit(&WorkerLine::Report(Box::new(report)));
    Ok(())
}

fn emit(line: &WorkerLine) {
    let mut out = std::io::stdout().lock();
    // A parent that went away is not an error to report anywhere else.
    let _ = serde_json::to_writer(&mut out, line);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// A line from the parent, or the end of its stdin (read as `stop`).
type Command = std::io::Result<Option<String>>;

/// Reads the parent's commands on a thread of its own (stdin is a pipe epoll would have
/// to share with the sockets) and wakes the loop for each.
fn spawn_stdin_reader(waker: Waker) -> mpsc::Receiver<Command> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::stdin().lock().lines();
        loop {
            let cmd = lines.next().transpose();
            let last = !matches!(cmd, Ok(Some(_)));
            if tx.send(cmd).is_err() {
                return;
            }
            // A loop that is gone no longer needs waking.
            let _ = waker.wake();
            if last {
                return;
            }
        }
    });
    rx
}

/// Where the worker is in its run, besides the connections' phase.
#[derive(Clone, Copy, Debug)]
enum Stage {
    /// Connecting, then loading, until `stop`.
    Loading,
    /// After `stop`: waiting until everything is acked and received, up to `until`.
    Settling { until: Instant },
    /// `Convs`: the pause before the read-back.
    Pausing { until: Instant },
    /// `Convs`: the read-back, up to `until`.
    Verifying { until: Instant },
}

/// The worker: the loop, the connections and the run's bookkeeping.
struct Worker {
    poll: Poll,
    ctx: Ctx,
    conns: Vec<Conn>,
    commands: mpsc::Receiver<Command>,
    /// The next connection to open: unit and member, and when.
    open_unit: usize,
    open_member: usize,
    next_open: Instant,
    open_gap: Duration,
    connections: u64,
    stage: Stage,
    next_progress: Instant,
    progress_every: Duration,
    told_ready: bool,
    at_go: Counters,
    go_time: Option<Instant>,
    at_stop: Counters,
    stop_time: Option<Instant>,
    held_min: u64,
}

impl Worker {
    fn new(spec: WorkerSpec) -> Result<Worker> {
        let signer = TokenSigner::new(&SigningKey::Hs256 {
            secret: spec.secret.clone(),
        })
        .map_err(|e| anyhow::anyhow!("the signing secret is unusable: {e}"))?;
        let hist = || {
            Histogram::<u64>::new_with_bounds(1, crate::conn::LATENCY_MAX_US, 3)
                .expect("valid bounds")
        };
        let clock = Clock::new()?;
        let now = clock.epoch;
        let poll = Poll::new().context("creating the epoll instance")?;
        let registry = poll.registry().try_clone()?;
        let commands = spawn_stdin_reader(Waker::new(poll.registry(), STDIN_TOKEN)?);
        let connections = spec.connections() as u64;
        let open_gap = Duration::from_secs_f64(1.0 / spec.connect_rate.max(1.0));
        let progress_every = if spec.convs.is_some() {
            CONVS_PROGRESS_EVERY
        } else {
            PROGRESS_EVERY
        };
        Ok(Worker {
            poll,
            ctx: Ctx {
                clock,
                signer,
                state: State {
                    counters: Counters::default(),
                    errors: BTreeMap::new(),
                    ledger: Ledger::default(),
                    ack_hist: hist(),
                    deliver_hist: hist(),
                    in_window: false,
                    outboxes: 0,
                    verify_planned: 0,
                    verify_open: 0,
                    owed: 0,
                    made: 0,
                },
                phase: Phase::Connecting,
                registry,
                timers: Timers::new(now),
                scratch: vec![0; READ_CHUNK],
                cmsg: nix::cmsg_space!(nix::sys::time::TimeSpec),
                spec,
            },
            conns: Vec::with_capacity(connections as usize),
            commands,
            open_unit: 0,
            open_member: 0,
            next_open: now,
            open_gap,
            connections,
            stage: Stage::Loading,
            // The first line goes out at once, as the parent expects one early.
            next_progress: now,
            progress_every,
            told_ready: false,
            at_go: Counters::default(),
            go_time: None,
            at_stop: Counters::default(),
            stop_time: None,
            held_min: u64::MAX,
        })
    }

    /// The loop: socket events, connection timers, the parent's commands, the opener and
    /// the progress lines, one tick at a time (see the module doc), until the run is over;
    /// then the report.
    fn run(mut self) -> Result<Report> {
        let mut events = Events::with_capacity(EVENTS_PER_POLL);
        let mut due = Vec::new();
        loop {
            let now = Instant::now();
            self.open_due(now);
            if !self.advance(now)? {
                break;
            }
            let wanted = [
                self.ctx.timers.next_deadline(),
                self.driver_deadline(),
                Some(now + POLL_IDLE_MAX),
            ]
            .into_iter()
            .flatten()
            .min()
            .expect("the idle bound is always there");
            // Sleep to the next boundary: this tick's work is done, and what arrives
            // meanwhile is the next tick's. Then block in epoll until something arrives or
            // the first wanted boundary (at once, when either has come already).
            let boundary = self.ctx.clock.tick_floor(now) + TICK;
            std::thread::sleep(boundary.saturating_duration_since(Instant::now()));
            let until = self.ctx.clock.tick_ceil(wanted).max(boundary);
            let timeout = until.saturating_duration_since(Instant::now());
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("waiting for socket events"),
            }
            self.ctx.clock.sync();
            for ev in events.iter() {
                if ev.token() == STDIN_TOKEN {
                    self.commands()?;
                    continue;
                }
                let (slot, generation) = untoken(ev.token());
                if let Some(conn) = self.conns.get_mut(slot as usize) {
                    conn.handle_event(&mut self.ctx, ev, generation);
                }
            }
            // Timers due by the boundary just passed, not by `now`: a send fired between
            // boundaries would be stamped with the next one, still to come.
            let now = Instant::now();
            let due_by = self.ctx.clock.tick_floor(now);
            due.clear();
            self.ctx.timers.take_due(due_by, &mut due);
            for &slot in &due {
                self.conns[slot as usize].handle_timer(&mut self.ctx, now, due_by);
            }
        }
        self.set_phase(Phase::Done, Instant::now());
        self.report()
    }

    /// Opens the connections whose time has come (while loading).
    fn open_due(&mut self, now: Instant) {
        while matches!(self.stage, Stage::Loading) && self.next_open <= now {
            let Some(unit) = self.ctx.spec.units.get(self.open_unit) else {
                return;
            };
            let Some(&index) = unit.members.get(self.open_member) else {
                self.open_unit += 1;
                self.open_member = 0;
                continue;
            };
            self.open_member += 1;
            self.next_open += self.open_gap;
            let slot = self.conns.len() as u32;
            let mut conn = Conn::new(&self.ctx, unit, index, slot, now);
            conn.open(&mut self.ctx, now);
            self.conns.push(conn);
        }
    }

    /// The next time the worker itself must act: a connection to open, a progress line,
    /// the end of a stage.
    fn driver_deadline(&self) -> Option<Instant> {
        let opening = self.open_unit < self.ctx.spec.units.len();
        match self.stage {
            Stage::Loading => Some(if opening {
                self.next_open.min(self.next_progress)
            } else {
                self.next_progress
            }),
            Stage::Settling { until } | Stage::Pausing { until } | Stage::Verifying { until } => {
                Some(until)
            }
        }
    }

    /// The parent's commands that arrived.
    fn commands(&mut self) -> Result<()> {
        while let Ok(cmd) = self.commands.try_recv() {
            if !matches!(self.stage, Stage::Loading) {
                continue; // After `stop`, nothing more is asked.
            }
            let cmd = cmd?.unwrap_or_else(|| "stop".into());
            let now = Instant::now();
            let counters = self.ctx.state.counters;
            match cmd.trim() {
                "go" if self.go_time.is_none() => {
                    self.at_go = counters;
                    self.ctx.state.in_window = true;
                    self.go_time = Some(now);
                    self.set_phase(Phase::Running, now);
                }
                "stop" => {
                    self.ctx.state.in_window = false;
                    self.at_stop = counters;
                    self.stop_time = Some(now);
                    self.stage = Stage::Settling {
                        until: now + Duration::from_secs(self.ctx.spec.drain_secs),
                    };
                    self.set_phase(Phase::Draining, now);
                }
                other => anyhow::bail!("unknown command from the parent: {other:?}"),
            }
        }
        Ok(())
    }

    /// Moves the run on when its time or condition has come; `false` when it is over.
    fn advance(&mut self, now: Instant) -> Result<bool> {
        let st = &self.ctx.state;
        match self.stage {
            Stage::Loading => {
                // While connecting, a progress line also goes out the moment the last
                // connection is up, so the parent times the connect phase to the
                // millisecond, not the second.
                if !self.told_ready && st.counters.authenticated == self.connections {
                    self.told_ready = true;
                    emit(&WorkerLine::Progress(st.counters));
                }
                if now >= self.next_progress {
                    if self.go_time.is_some() {
                        self.held_min = self.held_min.min(st.counters.authenticated);
                    }
                    emit(&WorkerLine::Progress(st.counters));
                    self.next_progress += self.progress_every;
                    if self.next_progress <= now {
                        self.next_progress = now + self.progress_every;
                    }
                }
            }
            Stage::Settling { until } => {
                // Settled: every connection back up, every message acked (or finally
                // refused) and every owed reception made.
                let settled = st.counters.authenticated == self.connections
                    && st.outboxes == 0
                    && st.made >= st.owed;
                if settled || now >= until {
                    let verify = self
                        .ctx
                        .spec
                        .convs
                        .is_some_and(|c| c.verify_per_connection > 0);
                    if !verify {
                        return Ok(false);
                    }
                    self.stage = Stage::Pausing {
                        until: now + VERIFY_PAUSE,
                    };
                }
            }
            Stage::Pausing { until } => {
                if now >= until {
                    let wait = Duration::from_secs(self.ctx.spec.drain_secs).max(VERIFY_MIN);
                    self.stage = Stage::Verifying { until: now + wait };
                    self.set_phase(Phase::Verifying, now);
                }
            }
            Stage::Verifying { until } => {
                let done = st.verify_planned == self.connections && st.verify_open == 0;
                if done || now >= until {
                    let st = &mut self.ctx.state;
                    let (open, unplanned) = (st.verify_open, self.connections - st.verify_planned);
                    if open > 0 || unplanned > 0 {
                        st.error(
                            format!(
                                "read-back unfinished: {open} reads open, {unplanned} connections never read"
                            ),
                            open.max(1),
                        );
                    }
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Tells every connection the run moved to `phase`.
    fn set_phase(&mut self, phase: Phase, now: Instant) {
        self.ctx.phase = phase;
        if phase == Phase::Done {
            return; // The report is made now; nothing the connections do would count.
        }
        for conn in &mut self.conns {
            conn.handle_phase(&mut self.ctx, now);
        }
    }

    fn report(self) -> Result<Report> {
        let st = &self.ctx.state;
        let expectations: Vec<(u32, &[u32])> = self
            .ctx
            .spec
            .units
            .iter()
            .flat_map(|u| u.senders.iter().map(move |&s| (s, &u.members[..])))
            .collect();
        let verdict = st.ledger.verdict(expectations, st.outboxes as u64);
        let serialize = |h: &Histogram<u64>| -> Result<Vec<u8>> {
            let mut buf = Vec::new();
            V2Serializer::new()
                .serialize(h, &mut buf)
                .map_err(|e| anyhow::anyhow!("serializing a histogram: {e:?}"))?;
            Ok(buf)
        };
        let window_secs = match (self.go_time, self.stop_time) {
            (Some(g), Some(s)) => (s - g).as_secs_f64(),
            _ => 0.0,
        };
        Ok(Report {
            totals: st.counters,
            at_go: self.at_go,
            at_stop: self.at_stop,
            window_secs,
            held_min: if self.held_min == u64::MAX {
                st.counters.authenticated
            } else {
                self.held_min
            },
            errors: st.errors.clone(),
            verdict,
            ack_hist: serialize(&st.ack_hist)?,
            deliver_hist: serialize(&st.deliver_hist)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_round_to_the_boundaries_of_the_epoch() {
        let clock = Clock::new().unwrap();
        let at = |us: u64| clock.epoch + Duration::from_micros(us);
        assert_eq!(clock.tick_ceil(at(0)), at(0));
        assert_eq!(clock.tick_ceil(at(1)), at(1000));
        assert_eq!(clock.tick_ceil(at(1000)), at(1000));
        assert_eq!(clock.tick_floor(at(1999)), at(1000));
        assert_eq!(clock.tick_floor(at(2000)), at(2000));
    }

    #[test]
    fn a_receive_stamp_becomes_the_instant_that_far_back() {
        let mut clock = Clock::new().unwrap();
        clock.sync();
        let (mono, wall) = clock.synced;
        let stamp = wall - Duration::from_micros(300);
        assert_eq!(
            clock.instant_of_stamp(stamp),
            mono - Duration::from_micros(300)
        );
        // A stamp from after the sync (a wall clock stepped back) is the sync itself.
        let later = wall + Duration::from_secs(5);
        assert_eq!(clock.instant_of_stamp(later), mono);
    }
}
