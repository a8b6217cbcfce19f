//! imgate-core: the sans-I/O engine of imgate. It does no I/O and reads no clock: events go
//! in, effects come out, and the gateway (its io_uring Reactor) and the sim (turmoil) drive it.
#![forbid(unsafe_code)]

pub use imgate_proto as proto;

pub mod auth;
pub mod client;
pub mod connection;
pub mod conv;
pub mod dedupe;
pub mod hash;
pub mod inbox;
pub mod limits;
pub mod log;
pub mod log_engine;
pub mod mesh;
pub mod segment_index;
pub mod shard;
pub mod time;
pub mod timer;

pub use limits::Limits;
pub use time::Instant;
