//! Fault injection for end-to-end tests. Compiled only with the cargo feature
//! `fault-injection`, which is off by default and never part of a shipped build: the admin
//! server (routes `POST /fault/shards/{i}/panic|fail|stall|resume`) asks a shard for a fault,
//! and the shard acts on it in the next tick of its loop ([`on_turn`]).
//!
//! This module owns the pending requests, one bit per shard and fault kind in process-wide
//! atomics (a gateway process runs one runtime, so a global is the simplest shared place,
//! and it keeps the runtime's wiring free of test-only plumbing). It leaves to the tests
//! what to observe: a panic must take the process down (see `exit_on_panic` in
//! `main.rs`), a stall must turn `/healthz` to 503 naming the shard.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Shards a fault can name: one bit each in a `u64`. Tests run two or three.
pub const SHARDS_MAX: usize = 64;
/// How long a stalled shard sleeps between checks for its resume: short, so that a resume
/// takes effect at once, and long enough not to spin.
const STALL_POLL: Duration = Duration::from_millis(10);
/// The longest a stall lasts without a resume, so that a test that forgets to resume (or
/// fails before it) cannot leave a gateway hung for good.
const STALL_MAX: Duration = Duration::from_secs(60);

/// Shards asked to panic on their next turn.
static PANIC: AtomicU64 = AtomicU64::new(0);
/// Shards asked to fail (end with an error) on their next turn.
static FAIL: AtomicU64 = AtomicU64::new(0);
/// Shards asked to stop turning until resumed.
static STALL: AtomicU64 = AtomicU64::new(0);

/// A fault the admin server can ask a shard for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Panic on the next turn.
    Panic,
    /// End with an error on the next turn, as a shard does when its storage fails.
    Fail,
    /// Block the shard's thread from the next turn until [`Fault::Resume`] (or
    /// [`STALL_MAX`]): the shard neither turns nor serves anything.
    Stall,
    /// End a stall.
    Resume,
}

/// Asks shard `shard` (below [`SHARDS_MAX`]; the caller checks the gateway's own count)
/// for `fault`.
pub fn request(shard: usize, fault: Fault) {
    assert!(
        shard < SHARDS_MAX,
        "shard {shard} is beyond fault injection"
    );
    let bit = 1u64 << shard;
    match fault {
        Fault::Panic => PANIC.fetch_or(bit, Ordering::SeqCst),
        Fault::Fail => FAIL.fetch_or(bit, Ordering::SeqCst),
        Fault::Stall => STALL.fetch_or(bit, Ordering::SeqCst),
        Fault::Resume => STALL.fetch_and(!bit, Ordering::SeqCst),
    };
}

/// Called by shard `shard` once per tick: carries out what was asked of it. An error is
/// the shard's to return from its loop.
pub fn on_turn(shard: usize) -> anyhow::Result<()> {
    if shard >= SHARDS_MAX {
        return Ok(());
    }
    let bit = 1u64 << shard;
    if PANIC.fetch_and(!bit, Ordering::SeqCst) & bit != 0 {
        panic!("fault injection: shard {shard} panics, as asked over admin HTTP");
    }
    if FAIL.fetch_and(!bit, Ordering::SeqCst) & bit != 0 {
        anyhow::bail!("fault injection: shard {shard} fails, as asked over admin HTTP");
    }
    let stalled = Instant::now();
    while STALL.load(Ordering::SeqCst) & bit != 0 && stalled.elapsed() < STALL_MAX {
        // Blocking the executor's thread is the fault being injected.
        std::thread::sleep(STALL_POLL);
    }
    Ok(())
}
