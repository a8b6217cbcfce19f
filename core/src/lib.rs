//! imgate-core: the sans-I/O engine of imgate. It does no I/O and reads no clock: events go
//! in, effects come out, and the gateway (glommio) and the sim (turmoil) drive it.
#![forbid(unsafe_code)]

pub use imgate_proto as proto;
