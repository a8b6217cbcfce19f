//! Behaviour of the shard engine, driven through the one-thread harness: every invariant
//! I1-I8 and every numbered item of the engine issue, each test named for what it proves.

mod harness;

use harness::*;
use imgate_core::log::{scan, GroupHead, Record};
use imgate_core::mesh::{Command, CommandError};
use imgate_core::proto::meta::{self, Meta, Priority, SignalKind};
use imgate_core::proto::{ClientMsgId, ConvId, ErrorCode, Seq, UserId};
use imgate_core::shard::{Effect, Lsn, RecoveryError};
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
    // The members' homes make their inbox entries durable (I9); then the message is
    // appended.
    w.sync();
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
    // The members' homes make their inbox entries durable (I9); then the message is
    // appended.
    w.sync();
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
    // The members' homes make their inbox entries durable (I9); then the message is
    // appended.
    w.sync();
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

#[test]
fn an_append_the_driver_has_not_taken_when_the_log_fails_never_reaches_the_log() {
    let mut w = World::new(1, Limits::default());
    w.auto_sync = false;
    let alice = w.login(0, 1, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    w.send(alice, 1, conv, b"one");
    // The members' homes make their inbox entries durable (I9); then the message is
    // appended.
    w.sync();
    w.sync();
    // "two" is sequenced and its append handed out, but the log fails (a write or sync
    // of appends before it) before the driver takes it.
    let send = Meta::Send(meta::Send {
        req: 2,
        client_msg_id: ClientMsgId([9; 16]),
        conv,
        priority: Priority::Normal,
    });
    let frame = imgate_core::proto::Encoder::new().encode_to_bytes(&send, b"two");
    let id = w.conns[alice].id;
    let mut buf = bytes::BytesMut::from(&frame[..]);
    w.nodes[0].shard.handle_bytes(w.now, id, &mut buf);
    w.nodes[0].shard.handle_log_failed(w.now);
    w.run();
    assert_eq!(
        error_code_of_nack(&w.take(alice), 2),
        Some(ErrorCode::StorageFailed)
    );
    // Its seq is handed out again, and only the new message is stored under it.
    w.send(alice, 3, conv, b"three");
    w.sync();
    assert_eq!(acks(&w.take(alice)), vec![(3, Seq(2))]);
    let stored: Vec<(u64, Vec<u8>)> = scan(w.nodes[0].log.bytes())
        .records
        .into_iter()
        .filter_map(|(_, r)| match r {
            Record::Message(m) => Some((m.seq.0, m.payload.to_vec())),
            _ => None,
        })
        .collect();
    assert_eq!(
        stored,
        vec![(1, b"one".to_vec()), (2, b"three".to_vec())],
        "the withdrawn append reached the log"
    );
}

/// The code of the Nack for request `req` among `frames`.
fn error_code_of_nack(frames: &[(Meta, bytes::Bytes)], req: u32) -> Option<ErrorCode> {
    frames.iter().find_map(|(m, _)| match m {
        Meta::Nack(n) if n.req == req => Some(n.code),
        _ => None,
    })
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
    // The members' homes make their inbox entries durable (I9); then the message is
    // appended.
    w.sync();
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
            backward: false,
        }),
        &[],
    );
    assert_eq!(seqs(&w.take(bob)), vec![4, 5, 6, 7, 8, 9, 10]);
}

/// A shard whose hot tier holds 4 messages per conversation, with `sends` messages in the
/// direct conversation of users 1 and 2 (sent by user 1 on connection 0).
fn with_history(limits: Limits, sends: u32) -> (World, ConvId) {
    let mut w = World::new(1, limits);
    let alice = w.login(0, 1, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    for req in 1..=sends {
        w.send(alice, req, conv, format!("m{req}").as_bytes());
    }
    w.take(alice);
    (w, conv)
}

fn hot_4() -> Limits {
    Limits {
        hot_messages_per_conv: 4,
        ..Limits::default()
    }
}

fn pull(w: &mut World, c: usize, req: u32, conv: ConvId, from: u64) {
    let pull = meta::Pull {
        req,
        conv,
        from_seq: Seq(from),
        limit: 100,
        backward: false,
    };
    w.frame(c, Meta::Pull(pull), &[]);
}

fn pull_result(frames: &[(Meta, bytes::Bytes)]) -> meta::PullResult {
    match frames.last() {
        Some((Meta::PullResult(r), _)) => r.clone(),
        other => panic!("expected a PullResult, got {other:?}"),
    }
}

fn sync_done(frames: &[(Meta, bytes::Bytes)]) -> meta::SyncDone {
    match frames
        .iter()
        .rev()
        .find(|(m, _)| matches!(m, Meta::SyncDone(_)))
    {
        Some((Meta::SyncDone(d), _)) => d.clone(),
        _ => panic!("expected a SyncDone in {frames:?}"),
    }
}

#[test]
fn history_removed_by_retention_is_reported_from_the_first_seq_the_log_returns() {
    let (mut w, conv) = with_history(hot_4(), 10);
    w.hold_fetches = true;
    let bob = w.login(0, 2, 1);
    // Sync: seqs 7..=10 are hot; the log is asked for 2..=6 and has lost 2 and 3.
    w.sync_from(bob, 1, conv, Seq(1));
    let held = w.held_fetches[0];
    assert_eq!((held.from, held.to, held.limit), (Seq(2), Seq(6), 100));
    let kept: Vec<_> = w
        .read_log(&held)
        .into_iter()
        .filter(|m| m.seq >= Seq(4))
        .collect();
    w.answer_fetch(Ok(kept));
    let frames = w.take(bob);
    assert_eq!(seqs(&frames), vec![4, 5, 6, 7, 8, 9, 10]);
    let gap = meta::Gap {
        conv,
        from_seq: Seq(2),
        to_seq: Seq(3),
    };
    assert_eq!(sync_done(&frames).gaps, vec![gap]);
    // Pull: a run that starts after `from` says where history starts.
    pull(&mut w, bob, 2, conv, 1);
    let held = w.held_fetches[0];
    assert_eq!((held.from, held.to), (Seq(1), Seq(6)));
    let kept: Vec<_> = w
        .read_log(&held)
        .into_iter()
        .filter(|m| m.seq >= Seq(3))
        .collect();
    w.answer_fetch(Ok(kept));
    let frames = w.take(bob);
    assert_eq!(seqs(&frames), (3..=10).collect::<Vec<_>>());
    assert_eq!(pull_result(&frames).available_from, Seq(3));
    // Nothing left before the hot tier: history starts at the hot tier.
    pull(&mut w, bob, 3, conv, 1);
    w.answer_fetch(Ok(Vec::new()));
    let frames = w.take(bob);
    assert_eq!(seqs(&frames), vec![7, 8, 9, 10]);
    let r = pull_result(&frames);
    assert_eq!(
        (r.available_from, r.from_seq, r.to_seq),
        (Seq(7), Seq(7), Seq(10))
    );
}

#[test]
fn a_read_that_finds_nothing_while_the_hot_tier_moved_on_reads_on_from_there() {
    let (mut w, conv) = with_history(hot_4(), 10);
    w.hold_fetches = true;
    let bob = w.login(0, 2, 1);
    w.sync_from(bob, 1, conv, Seq::ZERO);
    assert_eq!(
        (w.held_fetches[0].from, w.held_fetches[0].to),
        (Seq(1), Seq(6))
    );
    // While the read is out, four more messages push 7..=10 out of the hot tier.
    for req in 11..=14 {
        w.send(0, req, conv, b"x");
    }
    // Retention removed 1..=6; 7..=10 are in the log, not in memory.
    w.answer_fetch(Ok(Vec::new()));
    let held = w.held_fetches[0];
    assert_eq!((held.from, held.to), (Seq(7), Seq(10)));
    w.answer_fetches(true);
    let frames = w.take(bob);
    assert_eq!(seqs(&frames), (7..=14).collect::<Vec<_>>());
    let gap = meta::Gap {
        conv,
        from_seq: Seq(1),
        to_seq: Seq(6),
    };
    assert_eq!(sync_done(&frames).gaps, vec![gap]);
}

#[test]
fn replays_beyond_the_read_slots_wait_and_all_get_their_full_history() {
    let limits = Limits {
        hot_messages_per_conv: 4,
        fetches_inflight_max: 2,
        ..Limits::default()
    };
    let mut w = World::new(1, limits);
    let group = ConvId::group(1);
    let members = (1..=8).map(UserId).collect();
    w.command(Command::CreateGroup { group, members }).unwrap();
    let alice = w.login(0, 1, 1);
    for req in 1..=10 {
        w.send(alice, req, group, b"x");
    }
    w.hold_fetches = true;
    let syncing: Vec<_> = (2..=5).map(|u| w.login(0, u, 1)).collect();
    let pulling: Vec<_> = (6..=8).map(|u| w.login(0, u, 1)).collect();
    for &c in &syncing {
        w.sync_from(c, 1, group, Seq::ZERO);
    }
    for &c in &pulling {
        pull(&mut w, c, 1, group, 1);
    }
    assert_eq!(
        w.held_fetches.len(),
        2,
        "two reads in flight, the others wait"
    );
    for &c in syncing.iter().chain(&pulling) {
        assert!(
            w.take(c).is_empty(),
            "connection {c} was answered before its read"
        );
    }
    assert_eq!(
        w.answer_fetches(true),
        7,
        "every waiting replay got its read"
    );
    let all: Vec<u64> = (1..=10).collect();
    for &c in &syncing {
        let frames = w.take(c);
        assert_eq!(seqs(&frames), all, "connection {c}");
        let done = sync_done(&frames);
        assert!(done.gaps.is_empty() && done.more.is_empty() && done.refused.is_empty());
    }
    for &c in &pulling {
        let frames = w.take(c);
        assert_eq!(seqs(&frames), all, "connection {c}");
        assert_eq!(pull_result(&frames).available_from, Seq::ZERO);
    }
}

#[test]
fn a_failed_read_fails_a_pull_and_skips_nothing() {
    let (mut w, conv) = with_history(hot_4(), 10);
    w.hold_fetches = true;
    let bob = w.login(0, 2, 1);
    pull(&mut w, bob, 5, conv, 1);
    w.answer_fetch(Err(()));
    let frames = w.take(bob);
    assert!(delivers(&frames).is_empty(), "{frames:?}");
    assert!(
        matches!(&frames[..], [(Meta::Error(e), _)] if e.code == ErrorCode::StorageFailed && e.req == 5),
        "{frames:?}"
    );
    assert!(!w.conns[bob].closed, "the connection keeps serving");
    pull(&mut w, bob, 6, conv, 1);
    w.answer_fetches(true);
    let frames = w.take(bob);
    assert_eq!(seqs(&frames), (1..=10).collect::<Vec<_>>());
    assert_eq!(pull_result(&frames).available_from, Seq::ZERO);
}

#[test]
fn a_failed_read_refuses_a_sync_cursor_which_the_connection_then_catches_up() {
    let (mut w, conv) = with_history(hot_4(), 10);
    w.hold_fetches = true;
    let bob = w.login(0, 2, 1);
    w.sync_from(bob, 3, conv, Seq::ZERO);
    w.answer_fetch(Err(()));
    let frames = w.take(bob);
    assert!(delivers(&frames).is_empty(), "{frames:?}");
    let done = sync_done(&frames);
    assert!(done.gaps.is_empty(), "a failed read is not a gap: {done:?}");
    assert_eq!(
        done.refused,
        vec![meta::CursorRefusal {
            conv,
            latest_seq: Seq::ZERO,
            code: ErrorCode::StorageFailed
        }]
    );
    // The connection asks again by itself; a second failure waits for the retry time.
    assert_eq!(w.held_fetches.len(), 1);
    w.answer_fetch(Err(()));
    assert!(w.held_fetches.is_empty() && w.take(bob).is_empty());
    w.advance(Duration::from_secs(1));
    assert_eq!(w.answer_fetches(true), 1);
    assert_eq!(seqs(&w.take(bob)), (1..=10).collect::<Vec<_>>());
}

#[test]
fn a_failed_catch_up_read_keeps_the_cursor_and_is_asked_again_later() {
    let (mut w, conv) = with_history(hot_4(), 10);
    w.hold_fetches = true;
    // Bob connects without a Sync: the next live message shows him a gap from seq 1.
    let bob = w.login(0, 2, 1);
    let alice = 0;
    w.send(alice, 11, conv, b"m11");
    assert_eq!(w.held_fetches.len(), 1, "the gap is read from the log");
    w.answer_fetch(Err(()));
    w.send(alice, 12, conv, b"m12");
    assert!(delivers(&w.take(bob)).is_empty(), "nothing past the gap");
    assert!(
        w.held_fetches.is_empty(),
        "asked again only at the retry time"
    );
    // Meanwhile the connection's other requests are served, failures and all.
    pull(&mut w, bob, 7, conv, 1);
    w.answer_fetch(Err(()));
    let frames = w.take(bob);
    let failed = |e: &meta::Error| e.code == ErrorCode::StorageFailed && e.req == 7;
    assert!(
        matches!(&frames[..], [(Meta::Error(e), _)] if failed(e)),
        "{frames:?}"
    );
    assert!(
        w.held_fetches.is_empty(),
        "asked again only at the retry time"
    );
    w.advance(Duration::from_millis(500));
    assert!(
        w.held_fetches.is_empty(),
        "asked again before the retry time"
    );
    w.advance(Duration::from_millis(500));
    assert_eq!(w.answer_fetches(true), 1);
    let got = delivers(&w.take(bob));
    assert_eq!(
        got.iter().map(|(_, s, _)| s.0).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
    assert!(got
        .iter()
        .all(|(_, s, p)| &p[..] == format!("m{}", s.0).as_bytes()));
    w.send(alice, 13, conv, b"m13");
    assert_eq!(seqs(&w.take(bob)), vec![13]);
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
            backward: false,
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

// ---- checkpoints --------------------------------------------------------------------

/// The bytes of the checkpoint a shard recovered from `records` writes first.
fn checkpoint_after(w: &World, records: Vec<Record>) -> Vec<u8> {
    let mut shard = w.fresh_shard(0);
    shard.recover(records).expect("recovery");
    shard.handle_checkpoint_due(w.now);
    let mut appends = Vec::new();
    while let Some(effect) = shard.poll_effect() {
        if let Effect::Append { bytes, .. } = effect {
            appends.push(bytes);
        }
    }
    assert_eq!(appends.len(), 1, "one append for the checkpoint");
    appends.remove(0)
}

fn first_checkpoint(records: &[Record]) -> usize {
    checkpoint_starts(records)[0]
}

/// Where each checkpoint in `records` starts (its part 0).
fn checkpoint_starts(records: &[Record]) -> Vec<usize> {
    let starts: Vec<usize> = records
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r.checkpoint_part(), Some((0, _))))
        .map(|(i, _)| i)
        .collect();
    assert!(!starts.is_empty(), "a checkpoint in the log");
    starts
}

/// The index after the last part of the checkpoint that starts at `at`.
fn checkpoint_end(records: &[Record], at: usize) -> usize {
    at + 1
        + records[at..]
            .iter()
            .position(|r| r.checkpoint_part().is_some_and(|(_, last)| last))
            .expect("the checkpoint ends")
}

fn nacked(frames: &[(Meta, bytes::Bytes)], req: u32, code: ErrorCode) -> bool {
    frames
        .iter()
        .any(|(m, _)| matches!(m, Meta::Nack(n) if n.req == req && n.code == code))
}

#[test]
fn a_shard_recovered_from_a_checkpoint_on_continues_every_conversation() {
    let mut w = World::new(1, Limits::default());
    let group = ConvId::group(7);
    let (ab, ac) = (
        ConvId::direct(UserId(1), UserId(2)),
        ConvId::direct(UserId(1), UserId(3)),
    );
    let members = vec![UserId(1), UserId(2), UserId(3)];
    w.command(Command::CreateGroup { group, members }).unwrap();
    let add = vec![UserId(4)];
    w.command(Command::AddMembers {
        group,
        members: add,
    })
    .unwrap();
    let alice = w.login(0, 1, 1);
    for (req, conv) in [
        (1, group),
        (2, group),
        (3, group),
        (4, ab),
        (5, ab),
        (6, ac),
    ] {
        w.send(alice, req, conv, b"before");
    }
    w.checkpoint(0);
    let remove = vec![UserId(3)];
    w.command(Command::RemoveMembers {
        group,
        members: remove,
    })
    .unwrap();
    w.send(alice, 7, group, b"after");
    w.send(alice, 8, group, b"after");
    let retried = w.send(alice, 9, ab, b"after");
    assert_eq!(acks(&w.take(alice)).last(), Some(&(9, Seq(3))));
    let records = w.records(0);
    let at = first_checkpoint(&records);
    // The groups come out the same as from the whole log.
    assert_eq!(
        checkpoint_after(&w, records[at..].to_vec()),
        checkpoint_after(&w, records.clone())
    );
    let stored = w.stored().len();
    w.restart_from(0, records[at..].to_vec()).unwrap();
    let alice = w.login(0, 1, 1);
    w.send(alice, 10, group, b"next");
    w.send(alice, 11, ab, b"next");
    // Nothing of this one after the checkpoint: it is loaded from the log.
    w.send(alice, 12, ac, b"next");
    w.send_with_id(alice, 13, ab, retried, b"after");
    assert_eq!(
        acks(&w.take(alice)),
        vec![(10, Seq(6)), (11, Seq(4)), (12, Seq(2)), (13, Seq(3))]
    );
    assert_eq!(
        w.stored().len(),
        stored + 3,
        "the retry was not stored again"
    );
    // Members: added before the checkpoint, removed after it.
    let dave = w.login(0, 4, 1);
    w.send(dave, 1, group, b"dave");
    assert_eq!(acks(&w.take(dave)), vec![(1, Seq(7))]);
    let carol = w.login(0, 3, 1);
    w.send(carol, 1, group, b"carol");
    assert!(nacked(&w.take(carol), 1, ErrorCode::NotMember));
    // History from before the checkpoint is still served, from the log.
    let bob = w.login(0, 2, 1);
    w.sync_from(bob, 1, group, Seq::ZERO);
    assert_eq!(seqs(&w.take(bob)), (1..=7).collect::<Vec<_>>());
}

#[test]
fn the_dedupe_window_after_a_checkpoint_start_is_the_one_a_whole_replay_builds() {
    // A window of 4: the checkpoint holds the ids of messages 3..=6; the two sent after
    // it push out 3 and 4, wherever recovery starts.
    let limits = Limits {
        dedupe_window_entries: 4,
        ..Limits::default()
    };
    let mut w = World::new(1, limits);
    let alice = w.login(0, 1, 1);
    let ab = ConvId::direct(UserId(1), UserId(2));
    let ids: Vec<ClientMsgId> = (1..=6).map(|req| w.send(alice, req, ab, b"x")).collect();
    w.checkpoint(0);
    w.send(alice, 7, ab, b"x");
    w.send(alice, 8, ab, b"x");
    w.take(alice);
    let records = w.records(0);
    let at = first_checkpoint(&records);
    for (start, from) in [(0, "the log's start"), (at, "the checkpoint")] {
        w.restart_from(0, records[start..].to_vec()).unwrap();
        let alice = w.login(0, 1, 1);
        // Message 5 is still in the window: its retry gets seq 5 again. Message 4 was
        // pushed out: its retry is a new message, seq 9.
        w.send_with_id(alice, 20, ab, ids[4], b"x");
        w.send_with_id(alice, 21, ab, ids[3], b"x");
        assert_eq!(
            acks(&w.take(alice)),
            vec![(20, Seq(5)), (21, Seq(9))],
            "recovered from {from}"
        );
    }
}

/// A shard of one world with groups 1 and 2 and messages around two checkpoints.
fn checkpointed_log() -> (World, Vec<Record>) {
    let mut w = World::new(1, Limits::default());
    for g in 1..=2 {
        let members = vec![UserId(1), UserId(g + 1)];
        let group = ConvId::group(g);
        w.command(Command::CreateGroup { group, members }).unwrap();
    }
    let alice = w.login(0, 1, 1);
    let ab = ConvId::direct(UserId(1), UserId(2));
    for (req, conv) in [(1, ConvId::group(1)), (2, ab), (3, ConvId::group(2))] {
        w.send(alice, req, conv, b"x");
    }
    w.checkpoint(0);
    for (req, conv) in [(4, ConvId::group(1)), (5, ab), (6, ConvId::group(1))] {
        w.send(alice, req, conv, b"x");
    }
    w.checkpoint(0);
    w.send(alice, 7, ConvId::group(2), b"x");
    let records = w.records(0);
    (w, records)
}

/// `records` with the heads of the checkpoint at `at` changed by `change`.
fn tampered(records: &[Record], at: usize, change: impl Fn(&mut Vec<GroupHead>)) -> Vec<Record> {
    let mut records = records.to_vec();
    let Record::Checkpoint { groups, .. } = &mut records[at] else {
        panic!("not a checkpoint");
    };
    change(groups);
    records
}

#[test]
fn checkpoints_in_the_middle_of_the_log_are_checked_against_the_records_before_them() {
    let (mut w, records) = checkpointed_log();
    let second = checkpoint_starts(&records)[1];
    assert!(matches!(
        records[second],
        Record::Checkpoint { part: 0, .. }
    ));
    assert!(matches!(
        records[checkpoint_end(&records, second) - 1],
        Record::CheckpointInbox { last: true, .. }
    ));
    // The whole log, with its checkpoints, recovers; every conversation goes on.
    w.crash_all();
    let alice = w.login(0, 1, 1);
    w.send(alice, 8, ConvId::group(1), b"y");
    w.send(alice, 9, ConvId::group(2), b"y");
    assert_eq!(acks(&w.take(alice)), vec![(8, Seq(4)), (9, Seq(3))]);
    let recover = |records: Vec<Record>| w.fresh_shard(0).recover(records);
    let mismatch = |g| {
        Err(RecoveryError::CheckpointMismatch {
            group: ConvId::group(g),
        })
    };
    let at = first_checkpoint(&records);
    let wrong_seq = tampered(&records, at, |g| g[0].last_seq = Seq(2));
    assert_eq!(recover(wrong_seq), mismatch(1));
    let wrong_members = tampered(&records, second, |g| g[1].members.push(UserId(9)));
    assert_eq!(recover(wrong_members), mismatch(2));
    let missing = tampered(&records, at, |g| {
        g.remove(0);
    });
    assert_eq!(recover(missing), mismatch(1));
    let unknown = tampered(&records, second, |g| {
        g.push(GroupHead {
            group: ConvId::group(3),
            members: vec![UserId(1)],
            last_seq: Seq::ZERO,
        })
    });
    assert_eq!(recover(unknown), mismatch(3));
    // A tampered checkpoint that recovery starts at is taken as it is: nothing before it
    // to check it against.
    let start = tampered(&records, second, |g| g[0].last_seq = Seq(9));
    assert_eq!(recover(start[second..].to_vec()), Ok(()));
    // The inboxes are checked too: an entry dropped from a checkpoint in the middle.
    let mut no_inbox = records.clone();
    let end = checkpoint_end(&records, at);
    let Record::CheckpointInbox { entries, .. } = &mut no_inbox[end - 1] else {
        panic!("a checkpoint ends with its inbox part");
    };
    assert!(
        !entries.is_empty(),
        "users 1..=3 are homed here with their groups"
    );
    entries.pop();
    assert_eq!(recover(no_inbox), Err(RecoveryError::InboxMismatch));
}

#[test]
fn a_checkpoint_cut_by_a_crash_is_ignored_but_recovery_cannot_start_at_one() {
    let (w, records) = checkpointed_log();
    let recover = |records: Vec<Record>| w.fresh_shard(0).recover(records);
    let at = first_checkpoint(&records);
    // The first part of a checkpoint whose other parts never reached the disk: its
    // content does not matter.
    let cut = Record::Checkpoint {
        part: 0,
        groups: vec![GroupHead {
            group: ConvId::group(1),
            members: vec![UserId(5)],
            last_seq: Seq(77),
        }],
        dedupe: Vec::new(),
        last: false,
    };
    let with_cut = |i: usize| {
        let mut r = records.clone();
        r.insert(i, cut.clone());
        r
    };
    // Followed by other records, by a whole checkpoint, or by nothing.
    assert_eq!(recover(with_cut(at - 1)), Ok(()));
    assert_eq!(recover(with_cut(at)), Ok(()));
    assert_eq!(recover(with_cut(records.len())), Ok(()));
    // A start at a whole checkpoint after a cut one is still a start at a checkpoint.
    assert_eq!(recover(with_cut(at)[at..].to_vec()), Ok(()));
    // But a start at a cut checkpoint has nothing to start from.
    let mut cut_start = vec![cut.clone()];
    cut_start.extend(records[checkpoint_end(&records, at)..].iter().cloned());
    assert_eq!(recover(cut_start), Err(RecoveryError::IncompleteCheckpoint));
    assert_eq!(recover(vec![cut]), Err(RecoveryError::IncompleteCheckpoint));
}

#[test]
fn a_checkpoint_is_its_own_append_and_fails_or_becomes_durable_like_any_other() {
    let mut w = World::new(1, Limits::default());
    let group = ConvId::group(7);
    let members = vec![UserId(1), UserId(2)];
    w.command(Command::CreateGroup { group, members }).unwrap();
    w.auto_sync = false;
    let alice = w.login(0, 1, 1);
    w.send(alice, 1, group, b"lost");
    let (Lsn(message), end) = w.nodes[0].appended.expect("appended");
    w.checkpoint(0);
    let (Lsn(checkpoint), _) = w.nodes[0].appended.expect("appended");
    assert_eq!(checkpoint, message + 1, "the checkpoint has its own Lsn");
    let own: Vec<_> = scan(&w.nodes[0].log.bytes()[end as usize..]).records;
    assert!(!own.is_empty());
    assert!(own.iter().all(|(_, r)| r.checkpoint_part().is_some()));
    // The sync fails: the message is Nacked, and the checkpoint is gone with it.
    let node = &mut w.nodes[0];
    node.log.crash();
    node.appended = None;
    node.shard.handle_log_failed(w.now);
    w.run();
    assert!(nacked(&w.take(alice), 1, ErrorCode::StorageFailed));
    assert!(!w.records(0).iter().any(|r| r.checkpoint_part().is_some()));
    // A command and a message on their way to disk, then a checkpoint: when it is
    // durable, so is everything before it, and it holds both.
    let created = ConvId::group(8);
    let create = Command::CreateGroup {
        group: created,
        members: vec![UserId(1)],
    };
    w.nodes[0].shard.handle_command(w.now, create, 77);
    w.run();
    // The member's inbox entry becomes durable (I9); then the command is appended.
    w.sync();
    assert_eq!(w.commands.get(&77), None, "not durable yet");
    w.send(alice, 2, group, b"kept");
    w.checkpoint(0);
    w.sync();
    assert_eq!(
        acks(&w.take(alice)),
        vec![(2, Seq(1))],
        "seq 1 handed out again"
    );
    assert_eq!(w.commands.remove(&77), Some(Ok(())));
    w.crash_all();
    w.auto_sync = true;
    let alice = w.login(0, 1, 1);
    w.send(alice, 3, created, b"new group");
    w.send(alice, 4, group, b"next");
    assert_eq!(acks(&w.take(alice)), vec![(3, Seq(1)), (4, Seq(2))]);
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
    // The first syncs make the inbox entries durable (the Sends wait for them, in order),
    // the second the messages.
    w.sync();
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
