//! Behaviour of the shard engine, driven through the one-thread harness: every invariant
//! I1-I8 and every numbered item of the engine issue, each test named for what it proves.

mod harness;

use harness::*;
use imgate_core::mesh::{Command, CommandError};
use imgate_core::proto::meta::{self, Meta, Priority, SignalKind};
use imgate_core::proto::{ClientMsgId, ConvId, ErrorCode, Seq, UserId};
use imgate_core::Limits;
use std::time::Duration;

fn seqs(frames: &[(Meta, bytes::Bytes)]) -> Vec<u64> {
    delivers(frames).iter().map(|(_, s, _)| s.0).collect()
}

// ---- sessions -----------------------------------------------------------------------

#[test]
fn a_valid_token_authenticates_the_connection() {
    let mut w = World::new(1, Limits::default());
    let c = w.open(0);
    let token = w.token(7, 3);
    w.frame(c, Meta::Auth(meta::Auth { token }), &[]);
    let frames = w.take(c);
    match &frames[..] {
        [(Meta::AuthOk(ok), _)] => {
            assert_eq!((ok.user, ok.device.0), (UserId(7), 3));
            assert_eq!(ok.heartbeat_ms, 30_000);
        }
        other => panic!("{other:?}"),
    }
    assert!(!w.conns[c].closed);
}

#[test]
fn a_frame_before_auth_gets_not_authenticated_and_a_close() {
    let mut w = World::new(1, Limits::default());
    let c = w.open(0);
    w.frame(c, Meta::Ping(meta::Ping { nonce: 1 }), &[]);
    assert_eq!(error_code(&w.take(c)), Some(ErrorCode::NotAuthenticated));
    assert!(w.conns[c].closed);
}

#[test]
fn bad_and_expired_tokens_get_their_codes_and_a_close() {
    let mut w = World::new(1, Limits::default());
    let c = w.open(0);
    let token = "not a token".to_string();
    w.frame(c, Meta::Auth(meta::Auth { token }), &[]);
    assert_eq!(error_code(&w.take(c)), Some(ErrorCode::BadToken));
    assert!(w.conns[c].closed);

    // Expired 120 s ago: beyond the 30 s leeway.
    let expired = w.token_expiring(1, 1, harness::EPOCH);
    w.now = w.now + Duration::from_secs(120);
    let c = w.open(0);
    w.frame(c, Meta::Auth(meta::Auth { token: expired }), &[]);
    assert_eq!(error_code(&w.take(c)), Some(ErrorCode::TokenExpired));
    assert!(w.conns[c].closed);
}

#[test]
fn a_connection_that_never_authenticates_is_closed_at_the_deadline() {
    let limits = Limits::default();
    let deadline = limits.auth_timeout;
    let mut w = World::new(1, limits);
    let c = w.open(0);
    w.write(c, b"IG\x01"); // a truncated frame, then silence
    w.advance(deadline - Duration::from_millis(200));
    assert!(!w.conns[c].closed, "closed before the deadline");
    w.advance(Duration::from_millis(200));
    assert_eq!(error_code(&w.take(c)), Some(ErrorCode::AuthTimeout));
    assert!(w.conns[c].closed);
}

#[test]
fn a_silent_peer_is_closed_within_two_heartbeat_intervals_and_a_pinging_one_is_not() {
    let limits = Limits::default();
    let hb = limits.heartbeat_interval;
    let mut w = World::new(1, limits);
    let silent = w.login(0, 1, 1);
    let pinging = w.login(0, 2, 1);
    for _ in 0..8 {
        w.advance(hb / 2);
        w.frame(pinging, Meta::Ping(meta::Ping { nonce: 5 }), &[]);
    }
    // Four intervals passed: the silent one was closed within two, the other lives.
    assert!(w.conns[silent].closed);
    assert_eq!(
        error_code(&w.take(silent)),
        Some(ErrorCode::HeartbeatTimeout)
    );
    assert!(!w.conns[pinging].closed);
    assert!(w
        .take(pinging)
        .iter()
        .all(|(m, _)| matches!(m, Meta::Pong(meta::Pong { nonce: 5 }))));

    let mut w = World::new(1, Limits::default());
    let c = w.login(0, 1, 1);
    w.advance(hb * 2 - Duration::from_millis(1));
    assert!(
        w.conns[c].closed,
        "dead peer not detected within two intervals"
    );
    let mut w = World::new(1, Limits::default());
    let c = w.login(0, 1, 1);
    w.advance(hb * 2 - Duration::from_millis(200));
    assert!(!w.conns[c].closed, "closed more than a tick early");
}

#[test]
fn a_second_login_of_the_same_device_takes_over_on_any_shard() {
    for (first, second) in [(0, 0), (0, 1), (1, 0)] {
        let mut w = World::new(2, Limits::default());
        let old = w.login(first, 5, 9);
        let other_device = w.login(first, 5, 10);
        let new = w.login(second, 5, 9);
        assert!(
            w.conns[old].closed,
            "old connection still open ({first}->{second})"
        );
        assert_eq!(error_code(&w.take(old)), Some(ErrorCode::SessionTakenOver));
        assert!(!w.conns[new].closed);
        assert!(!w.conns[other_device].closed, "another device was kicked");
    }
}

// ---- I1, I5: durability before ack and delivery ------------------------------------

#[test]
fn ack_and_delivery_wait_for_durability() {
    let mut w = World::new(2, Limits::default());
    w.auto_sync = false;
    let alice = w.login(0, 1, 1);
    let bob = w.login(1, 2, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    w.send(alice, 1, conv, b"hi");
    assert!(acks(&w.take(alice)).is_empty(), "acked before durable (I1)");
    assert!(
        delivers(&w.take(bob)).is_empty(),
        "delivered before durable (I5)"
    );
    assert_eq!(w.stored().len(), 1, "the record was appended");
    w.sync();
    assert_eq!(acks(&w.take(alice)), vec![(1, Seq(1))]);
    assert_eq!(seqs(&w.take(bob)), vec![1]);
}

#[test]
fn an_acked_message_survives_a_crash_and_an_unsynced_one_is_never_acked() {
    let mut w = World::new(1, Limits::default());
    w.auto_sync = false;
    let alice = w.login(0, 1, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    w.send(alice, 1, conv, b"kept");
    w.sync();
    assert_eq!(acks(&w.take(alice)).len(), 1);
    w.send(alice, 2, conv, b"lost");
    assert!(acks(&w.take(alice)).is_empty());
    w.crash_all();
    assert_eq!(w.stored().len(), 1);
    w.auto_sync = true;
    let bob = w.login(0, 2, 1);
    w.sync_from(bob, 1, conv, Seq::ZERO);
    let got = delivers(&w.take(bob));
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].2[..], b"kept");
}

#[test]
fn a_failed_append_is_nacked_and_its_seq_is_handed_out_again() {
    let mut w = World::new(1, Limits::default());
    w.auto_sync = false;
    let alice = w.login(0, 1, 1);
    let bob = w.login(0, 2, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    w.send(alice, 1, conv, b"one");
    w.sync();
    w.send(alice, 2, conv, b"two");
    // The driver could not sync: it truncates to the durable length and reports.
    let node = &mut w.nodes[0];
    node.log.crash();
    node.appended = None;
    node.shard.handle_log_failed(w.now);
    w.run();
    let frames = w.take(alice);
    assert!(frames.iter().any(
        |(m, _)| matches!(m, Meta::Nack(n) if n.code == ErrorCode::StorageFailed && n.req == 2)
    ));
    assert!(!w.conns[alice].closed, "the connection keeps serving");
    w.send(alice, 3, conv, b"three");
    w.sync();
    assert_eq!(
        acks(&w.take(alice)),
        vec![(3, Seq(2))],
        "seq 2 reused, no gap"
    );
    assert_eq!(seqs(&w.take(bob)), vec![1, 2]);
}

// ---- I2: dedupe ---------------------------------------------------------------------

#[test]
fn duplicate_send_is_acked_with_the_same_seq_and_stored_once() {
    let mut w = World::new(2, Limits::default());
    let alice = w.login(0, 1, 1);
    let (conv, _) = w.direct_owned_by(1, 1, 2);
    let id = w.send(alice, 1, conv, b"once");
    w.send_with_id(alice, 2, conv, id, b"once");
    assert_eq!(acks(&w.take(alice)), vec![(1, Seq(1)), (2, Seq(1))]);
    assert_eq!(w.stored().len(), 1);
}

#[test]
fn a_retry_while_the_first_is_not_durable_waits_for_the_same_seq() {
    let mut w = World::new(1, Limits::default());
    w.auto_sync = false;
    let alice = w.login(0, 1, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    let id = w.send(alice, 1, conv, b"x");
    w.send_with_id(alice, 2, conv, id, b"x");
    assert!(acks(&w.take(alice)).is_empty());
    w.sync();
    assert_eq!(acks(&w.take(alice)), vec![(1, Seq(1)), (2, Seq(1))]);
    assert_eq!(w.stored().len(), 1);
}

#[test]
fn dedupe_survives_a_restart() {
    let mut w = World::new(2, Limits::default());
    let alice = w.login(0, 1, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    let id = w.send(alice, 1, conv, b"x");
    w.send(alice, 2, conv, b"y");
    w.crash_all();
    let alice = w.login(1, 1, 1);
    w.send_with_id(alice, 9, conv, id, b"x");
    assert_eq!(acks(&w.take(alice)), vec![(9, Seq(1))]);
    assert_eq!(w.stored().len(), 2);
}

// ---- I3: order ----------------------------------------------------------------------

#[test]
fn seqs_are_gap_free_and_continue_after_a_restart() {
    let mut w = World::new(3, Limits::default());
    let alice = w.login(2, 1, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    for req in 1..=5 {
        w.send(alice, req, conv, b"m");
    }
    assert_eq!(
        acks(&w.take(alice))
            .iter()
            .map(|a| a.1 .0)
            .collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    w.crash_all();
    let alice = w.login(0, 1, 1);
    w.send(alice, 6, conv, b"m");
    assert_eq!(acks(&w.take(alice)), vec![(6, Seq(6))]);
}

// ---- I4: delivery -------------------------------------------------------------------

#[test]
fn every_device_of_every_member_gets_each_message_in_order_including_the_senders_other_devices() {
    let mut w = World::new(3, Limits::default());
    let alice = w.login(0, 1, 1);
    let alice_tablet = w.login(1, 1, 2);
    let bob_phone = w.login(2, 2, 1);
    let bob_laptop = w.login(0, 2, 2);
    let carol = w.login(1, 3, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    for req in 1..=4 {
        w.send(alice, req, conv, format!("m{req}").as_bytes());
    }
    for c in [alice, alice_tablet, bob_phone, bob_laptop] {
        assert_eq!(seqs(&w.take(c)), vec![1, 2, 3, 4], "connection {c}");
    }
    assert!(
        delivers(&w.take(carol)).is_empty(),
        "a non-member got a message"
    );
}

#[test]
fn sync_after_reconnect_replays_exactly_what_is_missing() {
    let mut w = World::new(2, Limits::default());
    let alice = w.login(0, 1, 1);
    let bob = w.login(1, 2, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    w.send(alice, 1, conv, b"1");
    w.send(alice, 2, conv, b"2");
    assert_eq!(seqs(&w.take(bob)), vec![1, 2]);
    w.hang_up(bob);
    for req in 3..=6 {
        w.send(alice, req, conv, b"x");
    }
    let bob = w.login(0, 2, 1);
    w.sync_from(bob, 7, conv, Seq(2));
    let frames = w.take(bob);
    assert_eq!(seqs(&frames), vec![3, 4, 5, 6]);
    match frames.last() {
        Some((Meta::SyncDone(d), _)) => {
            assert_eq!(d.req, 7);
            assert!(d.gaps.is_empty() && d.more.is_empty());
        }
        other => panic!("{other:?}"),
    }
    // Live messages continue in order after the replay.
    w.send(alice, 8, conv, b"7");
    assert_eq!(seqs(&w.take(bob)), vec![7]);
}

#[test]
fn sync_reads_history_older_than_the_hot_tier_from_the_log_and_says_which_have_more() {
    let limits = Limits {
        hot_messages_per_conv: 4,
        sync_batch_per_conv: 2,
        ..Limits::default()
    };
    let mut w = World::new(1, limits);
    let alice = w.login(0, 1, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    for req in 1..=10 {
        w.send(alice, req, conv, b"x");
    }
    let bob = w.login(0, 2, 1);
    w.sync_from(bob, 1, conv, Seq(1));
    let frames = w.take(bob);
    // Seqs 7..=10 are hot, 2..=6 come from the log; a batch is 2.
    assert_eq!(seqs(&frames), vec![2, 3]);
    match frames.last() {
        Some((Meta::SyncDone(d), _)) => {
            assert!(d.gaps.is_empty(), "{:?}", d.gaps);
            assert_eq!(d.more, vec![meta::Cursor { conv, seq: Seq(3) }]);
        }
        other => panic!("{other:?}"),
    }
    // The rest, by Pull: across the log and the hot tier in one answer.
    w.frame(
        bob,
        Meta::Pull(meta::Pull {
            req: 2,
            conv,
            from_seq: Seq(4),
            limit: 100,
        }),
        &[],
    );
    assert_eq!(seqs(&w.take(bob)), vec![4, 5, 6, 7, 8, 9, 10]);
}

#[test]
fn history_the_log_cannot_serve_is_reported_as_a_gap() {
    let limits = Limits {
        hot_messages_per_conv: 4,
        fetches_inflight_max: 0,
        ..Limits::default()
    };
    let mut w = World::new(1, limits);
    let alice = w.login(0, 1, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    for req in 1..=10 {
        w.send(alice, req, conv, b"x");
    }
    let bob = w.login(0, 2, 1);
    w.sync_from(bob, 1, conv, Seq(1));
    let frames = w.take(bob);
    assert_eq!(seqs(&frames), vec![7, 8, 9, 10]);
    match frames.last() {
        Some((Meta::SyncDone(d), _)) => assert_eq!(
            d.gaps,
            vec![meta::Gap {
                conv,
                from_seq: Seq(2),
                to_seq: Seq(6)
            }]
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_live_stream_that_outruns_a_new_connection_is_caught_up_in_order() {
    // Bob connects without syncing while messages 1..3 already exist; the first live
    // message (4) reveals the gap, which the connection fills before sending 4.
    let mut w = World::new(2, Limits::default());
    let alice = w.login(0, 1, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    for req in 1..=3 {
        w.send(alice, req, conv, b"x");
    }
    let bob = w.login(1, 2, 1);
    w.send(alice, 4, conv, b"x");
    w.send(alice, 5, conv, b"x");
    assert_eq!(seqs(&w.take(bob)), vec![1, 2, 3, 4, 5]);
}

#[test]
fn pull_returns_history_and_a_pull_result() {
    let mut w = World::new(2, Limits::default());
    let alice = w.login(0, 1, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    for req in 1..=5 {
        w.send(alice, req, conv, &[req as u8]);
    }
    w.take(alice);
    w.frame(
        alice,
        Meta::Pull(meta::Pull {
            req: 9,
            conv,
            from_seq: Seq(2),
            limit: 3,
        }),
        &[],
    );
    let frames = w.take(alice);
    let got = delivers(&frames);
    assert_eq!(
        got.iter().map(|(_, s, p)| (s.0, p[0])).collect::<Vec<_>>(),
        vec![(2, 2), (3, 3), (4, 4)]
    );
    match frames.last() {
        Some((Meta::PullResult(r), _)) => {
            assert_eq!(
                (r.req, r.from_seq, r.to_seq, r.latest_seq),
                (9, Seq(2), Seq(4), Seq(5))
            );
        }
        other => panic!("{other:?}"),
    }
}

// ---- Nacks --------------------------------------------------------------------------

#[test]
fn a_send_to_a_conversation_the_user_is_not_in_is_nacked_not_member() {
    let mut w = World::new(2, Limits::default());
    let mallory = w.login(0, 9, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    w.send(mallory, 1, conv, b"x");
    let w_frames = w.take(mallory);
    assert!(w_frames
        .iter()
        .any(|(m, _)| matches!(m, Meta::Nack(n) if n.code == ErrorCode::NotMember && n.req == 1)));
    assert!(w.stored().is_empty());
    assert!(!w.conns[mallory].closed);
}

#[test]
fn a_payload_over_the_limit_is_nacked_and_the_connection_stays() {
    let limits = Limits::default();
    let max = limits.payload_bytes_max as usize;
    let mut w = World::new(1, limits);
    let alice = w.login(0, 1, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    w.send(alice, 1, conv, &vec![0; max + 1]);
    assert!(w
        .take(alice)
        .iter()
        .any(|(m, _)| matches!(m, Meta::Nack(n) if n.code == ErrorCode::PayloadTooLarge)));
    w.send(alice, 2, conv, &vec![0; max]);
    assert_eq!(acks(&w.take(alice)), vec![(2, Seq(1))]);
}

// ---- groups -------------------------------------------------------------------------

#[test]
fn group_commands_change_membership_durably() {
    let mut w = World::new(2, Limits::default());
    let g = ConvId::group(42);
    assert_eq!(
        w.command(Command::CreateGroup {
            group: g,
            members: vec![UserId(1), UserId(2)]
        }),
        Ok(())
    );
    assert_eq!(
        w.command(Command::CreateGroup {
            group: g,
            members: vec![]
        }),
        Err(CommandError::AlreadyExists(g))
    );
    assert_eq!(
        w.command(Command::AddMembers {
            group: ConvId::group(43),
            members: vec![UserId(3)]
        }),
        Err(CommandError::NoSuchGroup(ConvId::group(43)))
    );
    w.command(Command::AddMembers {
        group: g,
        members: vec![UserId(3)],
    })
    .unwrap();
    w.command(Command::RemoveMembers {
        group: g,
        members: vec![UserId(2)],
    })
    .unwrap();
    w.crash_all();
    let one = w.login(0, 1, 1);
    let two = w.login(1, 2, 1);
    let three = w.login(1, 3, 1);
    w.send(one, 1, g, b"hello group");
    assert_eq!(seqs(&w.take(three)), vec![1]);
    assert!(
        delivers(&w.take(two)).is_empty(),
        "a removed member got a message"
    );
    w.send(two, 1, g, b"let me in");
    assert!(w
        .take(two)
        .iter()
        .any(|(m, _)| matches!(m, Meta::Nack(n) if n.code == ErrorCode::NotMember)));
}

#[test]
fn a_group_above_the_threshold_gets_coalesced_notifies_and_high_priority_pushes() {
    let limits = Limits {
        read_diffusion_threshold: 2,
        ..Limits::default()
    };
    let mut w = World::new(2, limits);
    w.auto_sync = false;
    let g = ConvId::group(7);
    w.auto_sync = true;
    w.command(Command::CreateGroup {
        group: g,
        members: vec![UserId(1), UserId(2), UserId(3)],
    })
    .unwrap();
    w.auto_sync = false;
    let one = w.login(0, 1, 1);
    let two = w.login(1, 2, 1);
    for req in 1..=3 {
        w.send(one, req, g, b"x");
    }
    w.sync();
    let frames = w.take(two);
    assert!(
        delivers(&frames).is_empty(),
        "read diffusion pushed a normal message"
    );
    let notifies: Vec<_> = frames
        .iter()
        .filter_map(|(m, _)| match m {
            Meta::Notify(n) => Some((n.conv, n.latest_seq)),
            _ => None,
        })
        .collect();
    assert_eq!(notifies, vec![(g, Seq(3))], "one coalesced Notify");
    w.frame(
        one,
        Meta::Send(meta::Send {
            req: 4,
            client_msg_id: ClientMsgId([4; 16]),
            conv: g,
            priority: Priority::High,
        }),
        b"urgent",
    );
    w.sync();
    assert_eq!(seqs(&w.take(two)), vec![4], "high priority is pushed");
}

// ---- I6: flow control ---------------------------------------------------------------

#[test]
fn a_slow_consumer_is_degraded_to_notifies_then_closed_after_the_grace() {
    let limits = Limits {
        outbound_soft_bytes: 2_000,
        outbound_hard_bytes: 1_000_000,
        ..Limits::default()
    };
    let grace = limits.slow_consumer_grace;
    let mut w = World::new(1, limits);
    let alice = w.login(0, 1, 1);
    let bob = w.login(0, 2, 1);
    let carol = w.login(0, 3, 1);
    w.conns[bob].reading = false;
    let conv = ConvId::direct(UserId(1), UserId(2));
    let typing = ConvId::direct(UserId(2), UserId(3));
    for req in 1..=40 {
        w.send(alice, req, conv, &[0; 100]);
    }
    // Everything was acked: the slow reader never slows the sender.
    assert_eq!(acks(&w.take(alice)).len(), 40);
    let stats = w.nodes[0].shard.stats().clone();
    assert!(
        stats.deliveries < 2 * 40,
        "pushes to bob must stop once degraded ({} deliveries)",
        stats.deliveries
    );
    // Signals to a degraded connection are dropped.
    w.frame(
        carol,
        Meta::Signal(meta::Signal {
            conv: typing,
            kind: SignalKind::Typing,
            sender: UserId(0),
            sender_device: imgate_core::proto::DeviceId(0),
        }),
        &[],
    );
    w.advance(grace);
    assert!(w.conns[bob].closed);
    let frames = w.take(bob);
    assert_eq!(error_code(&frames), Some(ErrorCode::SlowConsumer));
    assert!(frames.iter().all(|(m, _)| !matches!(m, Meta::Signal(_))));
    assert!(frames
        .iter()
        .any(|(m, _)| matches!(m, Meta::Notify(n) if n.latest_seq == Seq(40))));
    assert!(!w.conns[alice].closed);
}

#[test]
fn a_consumer_over_the_hard_budget_is_closed_at_once() {
    let limits = Limits {
        outbound_soft_bytes: 1_000,
        outbound_hard_bytes: 4_000,
        payload_bytes_max: 1_000,
        replay_page_bytes: 1_000,
        replay_resume_bytes: 500,
        ..Limits::default()
    };
    let mut w = World::new(1, limits);
    let bob = w.login(0, 2, 1);
    w.conns[bob].reading = false;
    // Answers to its own requests are not degraded: a client that keeps asking and never
    // reads hits the cap. (Sync and Pull replies wait for the reader instead.)
    for nonce in 0..1_000 {
        if w.conns[bob].closed {
            break;
        }
        w.frame(bob, Meta::Ping(meta::Ping { nonce }), &[]);
    }
    assert!(w.conns[bob].closed);
    assert_eq!(error_code(&w.take(bob)), Some(ErrorCode::SlowConsumer));
}

// ---- I8: sender FIFO ----------------------------------------------------------------

#[test]
fn pipelined_sends_get_seqs_in_send_order_across_shards() {
    let mut w = World::new(4, Limits::default());
    w.auto_sync = false;
    let alice = w.login(0, 1, 1);
    let (conv, _) = w.direct_owned_by(3, 1, 2);
    for req in 1..=20 {
        w.send(alice, req, conv, &[req as u8]);
    }
    w.sync();
    let acked = acks(&w.take(alice));
    assert_eq!(acked.len(), 20);
    for (req, seq) in acked {
        assert_eq!(u64::from(req), seq.0, "req {req} got seq {seq}");
    }
}

// ---- signals ------------------------------------------------------------------------

#[test]
fn signals_reach_other_members_latest_wins_and_are_not_stored() {
    let mut w = World::new(2, Limits::default());
    let alice = w.login(0, 1, 1);
    let bob = w.login(1, 2, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    let signal = |kind| {
        Meta::Signal(meta::Signal {
            conv,
            kind,
            sender: UserId(99), // the gateway overwrites it
            sender_device: imgate_core::proto::DeviceId(99),
        })
    };
    // Two signals before bob's shard transmits: the later wins.
    let bytes_typing =
        imgate_core::proto::Encoder::new().encode_to_bytes(&signal(SignalKind::Typing), &[]);
    let bytes_stop =
        imgate_core::proto::Encoder::new().encode_to_bytes(&signal(SignalKind::StoppedTyping), &[]);
    let mut both = bytes_typing.to_vec();
    both.extend_from_slice(&bytes_stop);
    w.write(alice, &both);
    let got: Vec<_> = w
        .take(bob)
        .into_iter()
        .filter_map(|(m, _)| match m {
            Meta::Signal(s) => Some((s.kind, s.sender)),
            _ => None,
        })
        .collect();
    assert_eq!(got, vec![(SignalKind::StoppedTyping, UserId(1))]);
    assert!(
        w.take(alice).is_empty(),
        "the sender's own connection got its signal"
    );
    assert!(w.stored().is_empty());
}

// ---- hostile input ------------------------------------------------------------------

#[test]
fn garbage_bytes_get_an_error_and_a_close_without_touching_other_connections() {
    let mut w = World::new(1, Limits::default());
    let good = w.login(0, 1, 1);
    let bad = w.open(0);
    w.write(bad, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(error_code(&w.take(bad)), Some(ErrorCode::BadMagic));
    assert!(w.conns[bad].closed);
    let huge = w.login(0, 2, 1);
    let mut header = b"IG\x01\x03\0\0\0\0".to_vec();
    header.extend_from_slice(&64u32.to_le_bytes());
    header.extend_from_slice(&(1u32 << 30).to_le_bytes());
    w.write(huge, &header);
    assert_eq!(error_code(&w.take(huge)), Some(ErrorCode::FrameTooLarge));
    w.send(
        good,
        1,
        ConvId::direct(UserId(1), UserId(1)),
        b"note to self",
    );
    assert_eq!(acks(&w.take(good)), vec![(1, Seq(1))]);
}

#[test]
fn a_gateway_only_frame_from_a_client_is_unexpected() {
    let mut w = World::new(1, Limits::default());
    let c = w.login(0, 1, 1);
    w.frame(
        c,
        Meta::Notify(meta::Notify {
            conv: ConvId::group(1),
            latest_seq: Seq(1),
        }),
        &[],
    );
    assert_eq!(error_code(&w.take(c)), Some(ErrorCode::UnexpectedFrame));
    assert!(w.conns[c].closed);
}

#[test]
fn conversation_ownership_is_stable_and_spread() {
    use imgate_core::shard::Shard;
    let mut counts = [0u32; 4];
    for u in 1..=400u64 {
        let owner = Shard::owner_of(ConvId::direct(UserId(u), UserId(u + 1)), 4);
        assert_eq!(
            owner,
            Shard::owner_of(ConvId::direct(UserId(u + 1), UserId(u)), 4)
        );
        counts[owner.0 as usize] += 1;
    }
    assert!(counts.iter().all(|&n| n > 60), "skewed: {counts:?}");
}
