//! imgate-sim: deterministic fault simulation of the real core engines on turmoil.
//!
//! One gateway host runs `SHARDS` core [`Shard`](imgate_core::shard::Shard)s in one task
//! loop (`gateway.rs`), with an explicit FIFO queue per ordered pair of shards and each
//! shard's log a file on turmoil's simulated disk (`disk.rs`: a crash drops or tears what
//! was not synced; EIO and ENOSPC come from the disk). Device hosts run core's client engine (`device.rs`) over
//! turmoil TCP. Faults are drawn from the seed, each kind with its own rate (swarm testing),
//! and stop for a final heal period. The [`oracle`] checks I1-I5 and liveness.
//!
//! Determinism: one thread, turmoil's seeded network, our own seeded [`rng::Rng`], only
//! `BTreeMap`s, and time from the simulation only. A run's trace hash is a function of the
//! seed and the build.

pub mod device;
pub mod disk;
pub mod gateway;
pub mod oracle;
pub mod rng;
pub mod run;

pub use run::{run_seed, FaultSet, Outcome, Planted, RunConfig};

#[cfg(test)]
mod tests;
