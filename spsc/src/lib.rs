//! imgate-spsc: the only channel between imgate's shards.
//!
//! Each shard is one pinned thread running its own io_uring event loop, and shards share no
//! memory except these queues: one bounded single-producer single-consumer FIFO per ordered
//! pair of shards ([`channel`]), and one [`Wake`] per consumer shard, shared by all of its
//! inbound queues, that wakes the consumer when it sleeps and costs no syscall when it is busy.
//!
//! Invariants this crate owns:
//! - FIFO per queue: items leave in the order they entered, none lost, none duplicated. The
//!   engine's ordering invariants rest on FIFO per pair of shards.
//! - Bounded: a queue never grows; a push into a full queue hands the item back, and the
//!   caller decides (backpressure).
//! - No lost wake-up, provided both sides follow the protocol in [`wake`].
//!
//! Left to the gateway: what a signal is (an eventfd armed on the consumer's ring), what to do
//! when a queue is full, and calling [`Wake::notify`] after its pushes.
//!
//! Under `RUSTFLAGS="--cfg loom"` the atomics, cells and `Arc` come from loom (see `sync`), and
//! `tests/loom.rs` model-checks the queue and the wake-up protocol.
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(missing_docs)]

pub mod queue;
mod sync;
pub mod wake;

pub use queue::{channel, Consumer, Producer, CAPACITY_MAX};
pub use wake::{Signal, Wake};
