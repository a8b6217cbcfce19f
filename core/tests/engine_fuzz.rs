//! Engine fuzzing (issue 10): shards driven through the harness by arbitrary sequences of
//! well-formed frames carrying adversarial values: extreme seqs, limits and cursors, valid,
//! foreign and invalid conversation ids, priorities, signal kinds, repeated Auth, frames
//! after close, gateway-only frames, payloads around the limits, several connections and
//! users, stalled readers, time jumps, syncs and crashes, checkpoints, and log reads held,
//! answered late or failed. After every step: no panic, and the invariants listed in
//! `fuzz_driver` (I1-I5 and the bounds, I6) hold.
//!
//! This file holds the proptest strategies. The ops, the limits and the checks are the
//! driver in `fuzz_driver/`, shared with the cargo-fuzz target in `fuzz/`, which reads the
//! same value space from libFuzzer's bytes instead.
//!
//! CI runs `PROPTEST_CASES` (default 64) cases; the closing note of issue 10 has a local run
//! of a million. Failing cases are saved in `engine_fuzz.proptest-regressions`.

mod fuzz_driver;
mod harness;

use fuzz_driver::{run, Op, SHARDS, USERS};
use imgate_core::proto::meta::{self, Meta, Priority, SignalKind};
use imgate_core::proto::{ClientMsgId, ConvId, DeviceId, Seq, UserId};
use proptest::prelude::*;
use std::collections::BTreeSet;

fn seq() -> impl Strategy<Value = Seq> {
    prop_oneof![
        4 => (0..12u64).prop_map(Seq),
        1 => Just(Seq::MAX),
        1 => Just(Seq(Seq::MAX.0 + 1)),
        1 => Just(Seq(u64::MAX)),
        1 => Just(Seq(u64::MAX - 1)),
        1 => any::<u64>().prop_map(Seq),
    ]
}

fn conv() -> impl Strategy<Value = ConvId> {
    prop_oneof![
        6 => (1..=USERS, 1..=USERS).prop_map(|(a, b)| ConvId::direct(UserId(a), UserId(b))),
        2 => (1..=2u64).prop_map(ConvId::group),
        1 => Just(ConvId::group(99)),
        1 => Just(ConvId { hi: 0, lo: 0 }),
        1 => Just(ConvId { hi: 5, lo: 1 }),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(hi, lo)| ConvId { hi, lo }),
    ]
}

fn msg_id() -> impl Strategy<Value = ClientMsgId> {
    (0..6u8).prop_map(|n| ClientMsgId([n; 16]))
}

fn payload_len() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 0..64usize, 1 => Just(1_999usize), 1 => Just(2_000usize), 1 => Just(2_001usize)]
}

fn frame() -> impl Strategy<Value = (Meta, usize)> {
    prop_oneof![
        8 => (any::<u32>(), msg_id(), conv(), any::<bool>(), payload_len()).prop_map(
            |(req, client_msg_id, conv, high, len)| {
                let priority = if high { Priority::High } else { Priority::Normal };
                (Meta::Send(meta::Send { req, client_msg_id, conv, priority }), len)
            }
        ),
        3 => (any::<u32>(), proptest::collection::vec((conv(), seq()), 0..9)).prop_map(
            |(req, cursors)| {
                let cursors =
                    cursors.into_iter().map(|(conv, seq)| meta::Cursor { conv, seq }).collect();
                (Meta::Sync(meta::Sync { req, cursors }), 0)
            }
        ),
        3 => (any::<u32>(), conv(), seq(), prop_oneof![Just(0u32), 1..10u32, Just(u32::MAX)])
            .prop_map(|(req, conv, from_seq, limit)| {
                (Meta::Pull(meta::Pull { req, conv, from_seq, limit, backward: false }), 0)
            }),
        2 => (conv(), seq())
            .prop_map(|(conv, seq)| (Meta::DeliveryAck(meta::DeliveryAck { conv, seq }), 0)),
        2 => (conv(), 0..3u8, 0..2_000usize).prop_map(|(conv, kind, len)| {
            let kind = match kind {
                0 => SignalKind::Typing,
                1 => SignalKind::StoppedTyping,
                _ => SignalKind::Presence,
            };
            let signal = meta::Signal {
                conv,
                kind,
                sender: UserId(0),
                sender_device: DeviceId(0),
            };
            (Meta::Signal(signal), len)
        }),
        1 => any::<u64>().prop_map(|nonce| (Meta::Ping(meta::Ping { nonce }), 0)),
        1 => Just((Meta::Auth(meta::Auth { token: "x".into() }), 0)),
        1 => (conv(), seq()).prop_map(|(conv, latest_seq)| {
            (Meta::Notify(meta::Notify { conv, latest_seq }), 0)
        }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..SHARDS, 1..=USERS, 1..=3u32)
            .prop_map(|(shard, user, device)| Op::Login { shard, user, device }),
        12 => (0..8usize, frame()).prop_map(|(conn, (frame, len))| Op::Frame { conn, frame, len }),
        1 => (0..8usize).prop_map(|conn| Op::HangUp { conn }),
        2 => (0..8usize, any::<bool>()).prop_map(|(conn, on)| Op::Reading { conn, on }),
        5 => Just(Op::Sync),
        2 => prop_oneof![0..500u64, Just(11_000u64), Just(3_600_000u64)]
            .prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Crash),
        1 => (0..SHARDS).prop_map(|shard| Op::Checkpoint { shard }),
        1 => any::<bool>().prop_map(|on| Op::HoldReads { on }),
        2 => any::<bool>().prop_map(|ok| Op::AnswerReads { ok }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(64),
        ..ProptestConfig::default()
    })]

    #[test]
    fn hostile_frames_never_panic_break_an_invariant_or_a_bound(
        ops in proptest::collection::vec(op(), 1..80)
    ) {
        run(ops).map_err(TestCaseError::fail)?;
    }
}

/// The set of ops must reach every kind of frame: a sanity check that the strategy is not
/// degenerate (a fuzz that never sends a Sync proves nothing about Sync).
#[test]
fn the_frame_strategy_reaches_every_client_frame_kind() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut kinds = BTreeSet::new();
    for _ in 0..2_000 {
        let (m, _) = frame().new_tree(&mut runner).unwrap().current();
        kinds.insert(format!("{:?}", m.kind()));
    }
    for k in [
        "Send",
        "Sync",
        "Pull",
        "DeliveryAck",
        "Signal",
        "Ping",
        "Auth",
        "Notify",
    ] {
        assert!(kinds.contains(k), "{k} never generated: {kinds:?}");
    }
}
