//! Fuzz target for the shard engines (issue 10), over the same driver as the proptest
//! engine fuzz (`core/tests/engine_fuzz.rs`): `fuzz_driver::run` plays a sequence of ops
//! on a world of shards and checks I1-I5 and the bounds (I6) after every op.
//!
//! Input layout: the bytes are read with `arbitrary::Unstructured` into at most
//! [`OPS_MAX`] ops, until they run out. [`op`] maps them onto the value space of the
//! proptest strategies, with the same weights: extreme seqs, limits and cursors, valid,
//! foreign and invalid conversation ids, priorities, signal kinds, repeated Auth, frames
//! after close, payloads around the limits, several connections and users, stalled
//! readers, time jumps, syncs and crashes, checkpoints, and log reads held, answered late
//! or failed.
//!
//! A panic anywhere, or a failed check (re-raised as a panic with its message), is a
//! finding. `cargo fuzz fmt engine <input>` prints an input as its `Op` sequence.

#![no_main]

#[path = "../../core/tests/fuzz_driver/mod.rs"]
mod fuzz_driver;
#[path = "../../core/tests/harness/mod.rs"]
mod harness;

use arbitrary::{Arbitrary, Unstructured};
use fuzz_driver::{run, Op, SHARDS, USERS};
use imgate_core::proto::meta::{self, Meta, Priority, SignalKind};
use imgate_core::proto::{ClientMsgId, ConvId, DeviceId, Seq, UserId};
use libfuzzer_sys::fuzz_target;
use std::fmt;

/// A bound on ops per input, so that one input runs for milliseconds, not seconds.
const OPS_MAX: usize = 200;

/// Picks one expression by weight, like proptest's `prop_oneof![w => strategy, ..]`, so
/// that each choice below reads side by side with its strategy in engine_fuzz.rs.
macro_rules! one_of {
    ($u:expr, $($weight:literal => $value:expr),+ $(,)?) => {{
        let total: u32 = 0 $(+ $weight)+;
        let pick = $u.int_in_range(0..=total - 1)?;
        let mut end = 0u32;
        'one_of: {
            $(
                end += $weight;
                if pick < end {
                    break 'one_of ($value);
                }
            )+
            unreachable!("{pick} is below the total weight {total}")
        }
    }};
}

fn seq(u: &mut Unstructured) -> arbitrary::Result<Seq> {
    Ok(one_of![u,
        4 => Seq(u.int_in_range(0..=11)?),
        1 => Seq::MAX,
        1 => Seq(Seq::MAX.0 + 1),
        1 => Seq(u64::MAX),
        1 => Seq(u64::MAX - 1),
        1 => Seq(u.arbitrary()?),
    ])
}

fn conv(u: &mut Unstructured) -> arbitrary::Result<ConvId> {
    Ok(one_of![u,
        6 => ConvId::direct(
            UserId(u.int_in_range(1..=USERS)?),
            UserId(u.int_in_range(1..=USERS)?),
        ),
        2 => ConvId::group(u.int_in_range(1..=2)?),
        1 => ConvId::group(99),
        1 => ConvId { hi: 0, lo: 0 },
        1 => ConvId { hi: 5, lo: 1 },
        1 => ConvId { hi: u.arbitrary()?, lo: u.arbitrary()? },
    ])
}

fn msg_id(u: &mut Unstructured) -> arbitrary::Result<ClientMsgId> {
    Ok(ClientMsgId([u.int_in_range(0..=5)?; 16]))
}

fn payload_len(u: &mut Unstructured) -> arbitrary::Result<usize> {
    Ok(one_of![u,
        4 => u.int_in_range(0..=63)?,
        1 => 1_999,
        1 => 2_000,
        1 => 2_001,
    ])
}

fn cursors(u: &mut Unstructured) -> arbitrary::Result<Vec<meta::Cursor>> {
    let n = u.int_in_range(0..=8)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(meta::Cursor {
            conv: conv(u)?,
            seq: seq(u)?,
        });
    }
    Ok(out)
}

/// A client frame and the length of its payload.
fn frame(u: &mut Unstructured) -> arbitrary::Result<(Meta, usize)> {
    Ok(one_of![u,
        8 => {
            let send = meta::Send {
                req: u.arbitrary()?,
                client_msg_id: msg_id(u)?,
                conv: conv(u)?,
                priority: if u.arbitrary()? { Priority::High } else { Priority::Normal },
            };
            (Meta::Send(send), payload_len(u)?)
        },
        3 => {
            let sync = meta::Sync { req: u.arbitrary()?, cursors: cursors(u)? };
            (Meta::Sync(sync), 0)
        },
        3 => {
            let pull = meta::Pull {
                req: u.arbitrary()?,
                conv: conv(u)?,
                from_seq: seq(u)?,
                limit: one_of![u, 1 => 0, 1 => u.int_in_range(1..=9)?, 1 => u32::MAX],
            };
            (Meta::Pull(pull), 0)
        },
        2 => (Meta::DeliveryAck(meta::DeliveryAck { conv: conv(u)?, seq: seq(u)? }), 0),
        2 => {
            let signal = meta::Signal {
                conv: conv(u)?,
                kind: one_of![u,
                    1 => SignalKind::Typing,
                    1 => SignalKind::StoppedTyping,
                    1 => SignalKind::Presence,
                ],
                sender: UserId(0),
                sender_device: DeviceId(0),
            };
            (Meta::Signal(signal), u.int_in_range(0..=1_999)?)
        },
        1 => (Meta::Ping(meta::Ping { nonce: u.arbitrary()? }), 0),
        1 => (Meta::Auth(meta::Auth { token: "x".into() }), 0),
        1 => (Meta::Notify(meta::Notify { conv: conv(u)?, latest_seq: seq(u)? }), 0),
    ])
}

fn op(u: &mut Unstructured) -> arbitrary::Result<Op> {
    Ok(one_of![u,
        3 => Op::Login {
            shard: u.int_in_range(0..=SHARDS - 1)?,
            user: u.int_in_range(1..=USERS)?,
            device: u.int_in_range(1..=3)?,
        },
        12 => {
            let conn = u.int_in_range(0..=7)?;
            let (frame, len) = frame(u)?;
            Op::Frame { conn, frame, len }
        },
        1 => Op::HangUp { conn: u.int_in_range(0..=7)? },
        2 => Op::Reading { conn: u.int_in_range(0..=7)?, on: u.arbitrary()? },
        5 => Op::Sync,
        2 => Op::Advance {
            ms: one_of![u, 1 => u.int_in_range(0..=499)?, 1 => 11_000, 1 => 3_600_000],
        },
        1 => Op::Crash,
        1 => Op::Checkpoint { shard: u.int_in_range(0..=SHARDS - 1)? },
        1 => Op::HoldReads { on: u.arbitrary()? },
        2 => Op::AnswerReads { ok: u.arbitrary()? },
    ])
}

/// One fuzz case: the ops read from the input, at most [`OPS_MAX`].
struct Ops(Vec<Op>);

impl<'a> Arbitrary<'a> for Ops {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Ops> {
        let mut ops = Vec::new();
        while ops.len() < OPS_MAX && !u.is_empty() {
            ops.push(op(u)?);
        }
        Ok(Ops(ops))
    }
}

/// Prints as the op list, the same form as proptest's failure reports.
impl fmt::Debug for Ops {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.fmt(f)
    }
}

fuzz_target!(|ops: Ops| {
    if let Err(failed) = run(ops.0) {
        panic!("check failed: {failed}");
    }
});
