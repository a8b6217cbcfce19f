//! Hostile clients against the shard engine (issue 10): each finding reproduced through the
//! harness, and each defence shown to hold. A test here fails on the engine before its fix.

mod harness;

use harness::*;
use imgate_core::mesh::Command;
use imgate_core::proto::meta::{self, Meta};
use imgate_core::proto::{ClientMsgId, ConvId, ErrorCode, Seq, UserId};
use imgate_core::Limits;
use std::time::Duration;

fn seqs(frames: &[(Meta, bytes::Bytes)]) -> Vec<u64> {
    delivers(frames).iter().map(|(_, s, _)| s.0).collect()
}

fn sync_done(frames: &[(Meta, bytes::Bytes)]) -> meta::SyncDone {
    match frames.iter().find(|(m, _)| matches!(m, Meta::SyncDone(_))) {
        Some((Meta::SyncDone(d), _)) => d.clone(),
        _ => panic!("no SyncDone in {frames:?}"),
    }
}

fn pull(req: u32, conv: ConvId, from_seq: Seq, limit: u32) -> Meta {
    Meta::Pull(meta::Pull {
        req,
        conv,
        from_seq,
        limit,
        backward: false,
    })
}

fn error(frames: &[(Meta, bytes::Bytes)]) -> Option<(ErrorCode, u32)> {
    frames.iter().find_map(|(m, _)| match m {
        Meta::Error(e) => Some((e.code, e.req)),
        _ => None,
    })
}

// ---- finding 1: a seq from the wire never reaches arithmetic that overflows ---------

#[test]
fn a_sync_cursor_at_the_top_of_the_seq_space_is_refused_and_the_shard_serves_on() {
    for shard in 0..2 {
        let mut w = World::new(2, Limits::default());
        let alice = w.login(shard, 1, 1);
        // Not even the user's own conversation: any conversation id will do.
        let conv = ConvId::direct(UserId(7), UserId(8));
        w.sync_from(alice, 5, conv, Seq(u64::MAX));
        assert_eq!(error(&w.take(alice)), Some((ErrorCode::BadRequest, 5)));
        assert!(!w.conns[alice].closed);
        let own = ConvId::direct(UserId(1), UserId(2));
        w.send(alice, 6, own, b"still here");
        assert_eq!(acks(&w.take(alice)), vec![(6, Seq(1))]);
    }
}

#[test]
fn a_pull_from_the_top_of_the_seq_space_is_refused() {
    let mut w = World::new(2, Limits::default());
    let alice = w.login(0, 1, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    w.send(alice, 1, conv, b"x");
    w.take(alice);
    for from in [Seq(u64::MAX), Seq(u64::MAX - 10), Seq(Seq::MAX.0 + 1)] {
        w.frame(alice, pull(3, conv, from, 200), &[]);
        assert_eq!(error(&w.take(alice)), Some((ErrorCode::BadRequest, 3)));
    }
    // The highest valid seq is served (nothing is there).
    w.frame(alice, pull(4, conv, Seq::MAX, 200), &[]);
    let frames = w.take(alice);
    assert!(
        matches!(frames.last(), Some((Meta::PullResult(r), _)) if r.req == 4 && r.to_seq == Seq::ZERO)
    );
}

// ---- finding 8: a cursor ahead of a conversation does not mute it -------------------

#[test]
fn a_sync_cursor_ahead_of_the_conversation_is_moved_back_said_and_live_messages_flow() {
    let mut w = World::new(2, Limits::default());
    let alice = w.login(0, 1, 1);
    let bob = w.login(1, 2, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    for req in 1..=3 {
        w.send(alice, req, conv, b"x");
    }
    w.take(bob);
    w.hang_up(bob);
    let bob = w.login(1, 2, 1);
    w.sync_from(bob, 9, conv, Seq(1_000));
    let done = sync_done(&w.take(bob));
    assert_eq!(
        done.refused,
        vec![meta::CursorRefusal {
            conv,
            latest_seq: Seq(3),
            code: ErrorCode::CursorAhead
        }]
    );
    w.send(alice, 4, conv, b"after");
    assert_eq!(seqs(&w.take(bob)), vec![4], "the conversation is not muted");
}

#[test]
fn a_sync_cursor_of_a_conversation_the_user_is_not_in_is_refused_not_member() {
    let mut w = World::new(2, Limits::default());
    let group = ConvId::group(7);
    w.command(Command::CreateGroup {
        group,
        members: vec![UserId(1), UserId(2)],
    })
    .unwrap();
    let mallory = w.login(0, 9, 1);
    let bad = ConvId { hi: 5, lo: 1 };
    w.frame(
        mallory,
        Meta::Sync(meta::Sync {
            req: 3,
            cursors: vec![
                meta::Cursor {
                    conv: group,
                    seq: Seq::ZERO,
                },
                meta::Cursor {
                    conv: bad,
                    seq: Seq::ZERO,
                },
            ],
        }),
        &[],
    );
    let mut refused = sync_done(&w.take(mallory)).refused;
    refused.sort_by_key(|r| r.code.as_u16());
    assert_eq!(
        refused,
        vec![
            meta::CursorRefusal {
                conv: group,
                latest_seq: Seq::ZERO,
                code: ErrorCode::NotMember
            },
            meta::CursorRefusal {
                conv: bad,
                latest_seq: Seq::ZERO,
                code: ErrorCode::BadRequest
            },
        ]
    );
}

// ---- finding 3: catching up is paced by the reader ----------------------------------

const LARGE: usize = 60_000;

/// Alice writes `n` messages of 60 KB to Bob while Bob is away; Bob comes back.
fn large_backlog(n: u32) -> (World, usize, ConvId) {
    let mut w = World::new(2, Limits::default());
    let alice = w.login(0, 1, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    for req in 1..=n {
        w.send(alice, req, conv, &vec![req as u8; LARGE]);
    }
    assert_eq!(acks(&w.take(alice)).len(), n as usize);
    let bob = w.login(1, 2, 1);
    (w, bob, conv)
}

#[test]
fn a_device_that_missed_many_large_messages_catches_up_all_of_them() {
    let (mut w, bob, conv) = large_backlog(60);
    w.sync_from(bob, 1, conv, Seq::ZERO);
    let frames = w.take(bob);
    assert!(!w.conns[bob].closed, "{:?}", error(&frames));
    assert_eq!(seqs(&frames), (1..=60).collect::<Vec<_>>());
    let done = sync_done(&frames);
    assert!(done.gaps.is_empty() && done.more.is_empty() && done.refused.is_empty());
}

#[test]
fn a_reply_waits_for_the_reader_and_never_outgrows_one_page() {
    let (mut w, bob, conv) = large_backlog(60);
    let limits = Limits::default();
    w.conns[bob].reading = false;
    w.sync_from(bob, 1, conv, Seq::ZERO);
    // Nothing is read: the gateway holds one page (and one message past it) at most.
    let held = w.held_bytes(bob);
    assert!(
        held > 0 && held < limits.replay_page_bytes + 2 * LARGE,
        "{held}"
    );
    w.advance(Duration::from_secs(1));
    assert_eq!(
        w.held_bytes(bob),
        held,
        "no page goes out while the reader is stuck"
    );
    // Reading resumes: everything follows, in order, and the connection stays.
    w.resume_reading(bob);
    let frames = w.take(bob);
    assert_eq!(seqs(&frames), (1..=60).collect::<Vec<_>>());
    sync_done(&frames);
    assert!(!w.conns[bob].closed);
}

/// Found end to end: a reader that stops with one page of history in flight holds less
/// than the soft budget, so the budget never closed it; with pings it held its socket and
/// the kernel's buffers behind it for good.
#[test]
fn a_reader_that_stops_under_the_budget_is_closed_after_the_grace_period() {
    let (mut w, bob, conv) = large_backlog(60);
    let limits = Limits::default();
    w.conns[bob].reading = false;
    w.sync_from(bob, 1, conv, Seq::ZERO);
    let held = w.held_bytes(bob);
    assert!(held > 0 && held < limits.outbound_soft_bytes, "{held}");
    // It keeps pinging, so only the stalled writes can end it.
    let step = Duration::from_secs(1);
    let mut waited = Duration::ZERO;
    while waited < limits.slow_consumer_grace {
        w.frame(bob, Meta::Ping(meta::Ping { nonce: 1 }), &[]);
        w.advance(step);
        waited += step;
        assert!(!w.conns[bob].closed || waited >= limits.slow_consumer_grace);
    }
    w.advance(step);
    assert!(
        w.conns[bob].closed,
        "a stalled reader outlived the grace period"
    );
    w.resume_reading(bob);
    assert_eq!(
        error(&w.take(bob)).map(|(code, _)| code),
        Some(ErrorCode::SlowConsumer)
    );
}

/// The other side of the rule above: a reader that is slow but keeps reading is never
/// closed for it, however long its catch-up takes.
#[test]
fn a_slow_reader_that_makes_progress_is_never_closed() {
    let (mut w, bob, conv) = large_backlog(60);
    let limits = Limits::default();
    w.conns[bob].reading = false;
    w.sync_from(bob, 1, conv, Seq::ZERO);
    let mut got = Vec::new();
    // One page per nine seconds: just inside the grace period each time.
    let pause = limits.slow_consumer_grace - Duration::from_secs(1);
    for _ in 0..30 {
        w.frame(bob, Meta::Ping(meta::Ping { nonce: 1 }), &[]);
        w.advance(pause);
        assert!(!w.conns[bob].closed);
        w.resume_reading(bob);
        got.extend(seqs(&w.take(bob)));
        w.conns[bob].reading = false;
        if got.len() == 60 {
            break;
        }
    }
    assert_eq!(got, (1..=60).collect::<Vec<_>>());
}

#[test]
fn a_pull_at_the_documented_maximum_of_large_messages_is_answered_in_full() {
    let limits = Limits::default();
    let (mut w, bob, conv) = large_backlog(limits.pull_limit_max);
    w.frame(bob, pull(4, conv, Seq(1), limits.pull_limit_max), &[]);
    let frames = w.take(bob);
    assert!(!w.conns[bob].closed, "{:?}", error(&frames));
    assert_eq!(
        seqs(&frames),
        (1..=u64::from(limits.pull_limit_max)).collect::<Vec<_>>()
    );
    match frames.last() {
        Some((Meta::PullResult(r), _)) => assert_eq!(
            (r.req, r.from_seq, r.to_seq, r.latest_seq),
            (4, Seq(1), Seq(200), Seq(200))
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn pulls_beyond_the_queue_bound_are_refused_rate_limited() {
    let limits = Limits::default();
    let (mut w, bob, conv) = large_backlog(10);
    w.conns[bob].reading = false;
    for req in 0..=limits.pulls_queued_max as u32 {
        w.frame(bob, pull(req, conv, Seq(1), 10), &[]);
    }
    w.resume_reading(bob);
    let frames = w.take(bob);
    assert_eq!(
        error(&frames),
        Some((ErrorCode::RateLimited, limits.pulls_queued_max as u32))
    );
    let results = frames
        .iter()
        .filter(|(m, _)| matches!(m, Meta::PullResult(_)))
        .count();
    assert_eq!(results, limits.pulls_queued_max);
}

// ---- finding 7: before Auth, only a small Auth frame -------------------------------

#[test]
fn an_unauthenticated_frame_over_the_auth_cap_is_refused_from_its_header() {
    let mut w = World::new(1, Limits::default());
    let c = w.open(0);
    // A header declaring a 250 KB Send, and no body yet.
    let mut header = vec![b'I', b'G', 1, 3, 0, 0, 0, 0];
    header.extend_from_slice(&64u32.to_le_bytes());
    header.extend_from_slice(&(250_000u32).to_le_bytes());
    w.write(c, &header);
    assert!(w.conns[c].closed);
    assert_eq!(error_code(&w.take(c)), Some(ErrorCode::FrameTooLarge));
}

// ---- finding 5: one answer for a client_msg_id reused elsewhere ---------------------

#[test]
fn a_client_msg_id_reused_for_another_conversation_is_nacked() {
    let mut w = World::new(1, Limits::default());
    let alice = w.login(0, 1, 1);
    let id = ClientMsgId([7; 16]);
    let first = ConvId::direct(UserId(1), UserId(2));
    let second = ConvId::direct(UserId(1), UserId(3));
    w.send_with_id(alice, 1, first, id, b"a");
    w.send_with_id(alice, 2, second, id, b"b");
    let frames = w.take(alice);
    assert_eq!(acks(&frames), vec![(1, Seq(1))]);
    let nack = frames.iter().find_map(|(m, _)| match m {
        Meta::Nack(n) => Some((n.req, n.code, n.conv)),
        _ => None,
    });
    assert_eq!(nack, Some((2, ErrorCode::ClientMsgIdReused, second)));
    assert_eq!(w.stored().len(), 1, "nothing new is stored");
}

#[test]
fn a_client_msg_id_reused_for_a_conversation_of_another_shard_is_nacked_too_after_a_restart() {
    let mut w = World::new(2, Limits::default());
    // Two conversations of user 1 with different owners.
    let (first, _) = w.direct_owned_by(0, 1, 2);
    let (second, _) = w.direct_owned_by(1, 1, 2);
    for round in 0..2 {
        let alice = w.login(round as u16, 1, 1);
        let id = ClientMsgId([round + 1; 16]);
        w.send_with_id(alice, 1, first, id, b"a");
        w.sync();
        w.send_with_id(alice, 2, second, id, b"b");
        w.sync();
        let frames = w.take(alice);
        let nack = frames.iter().find_map(|(m, _)| match m {
            Meta::Nack(n) => Some((n.req, n.code)),
            _ => None,
        });
        assert_eq!(
            nack,
            Some((2, ErrorCode::ClientMsgIdReused)),
            "round {round}"
        );
        // After a restart the homes learn the bindings back from the owners' logs.
        w.crash_all();
        let alice = w.login(1 - round as u16, 1, 1);
        w.send_with_id(alice, 3, second, id, b"b again");
        w.sync();
        let nack = w.take(alice).into_iter().find_map(|(m, _)| match m {
            Meta::Nack(n) => Some((n.req, n.code)),
            _ => None,
        });
        assert_eq!(
            nack,
            Some((3, ErrorCode::ClientMsgIdReused)),
            "round {round}"
        );
        w.hang_up(alice);
    }
    let stored = w.stored();
    assert_eq!(stored.iter().filter(|(c, _, _)| *c == second).count(), 0);
}

// ---- rates, devices, token lifetime --------------------------------------------------

#[test]
fn frames_over_the_rate_are_nacked_rate_limited_and_the_connection_stays() {
    let limits = Limits {
        frames_per_sec: 10,
        frames_burst: 5,
        ..Limits::default()
    };
    let mut w = World::new(1, limits);
    let alice = w.login(0, 1, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    for req in 1..=8 {
        w.send(alice, req, conv, b"x");
    }
    let frames = w.take(alice);
    assert_eq!(acks(&frames).len(), 5);
    let limited = frames
        .iter()
        .filter(|(m, _)| matches!(m, Meta::Nack(n) if n.code == ErrorCode::RateLimited))
        .count();
    assert_eq!(limited, 3);
    assert!(!w.conns[alice].closed);
    // A second later the rate allows more.
    w.advance(Duration::from_secs(1));
    w.send(alice, 9, conv, b"y");
    assert_eq!(acks(&w.take(alice)), vec![(9, Seq(6))]);
}

#[test]
fn a_login_beyond_the_devices_per_user_cap_is_refused() {
    let limits = Limits {
        devices_per_user_max: 2,
        ..Limits::default()
    };
    let mut w = World::new(2, limits);
    let a = w.login(0, 1, 1);
    let b = w.login(1, 1, 2);
    let c = w.open(0);
    let token = w.token(1, 3);
    w.frame(c, Meta::Auth(meta::Auth { token }), &[]);
    assert!(w.conns[c].closed);
    assert_eq!(error_code(&w.take(c)), Some(ErrorCode::TooManyDevices));
    assert!(!w.conns[a].closed && !w.conns[b].closed);
    // A device that leaves makes room; a device logging in again is a takeover, not a
    // new device.
    w.hang_up(b);
    let d = w.login(1, 1, 3);
    assert!(!w.conns[d].closed);
    let e = w.login(0, 1, 1);
    assert!(!w.conns[e].closed);
    assert_eq!(error_code(&w.take(a)), Some(ErrorCode::SessionTakenOver));
}

#[test]
fn a_session_is_told_to_renew_before_its_token_expires_and_closed_at_expiry() {
    let limits = Limits::default();
    let mut w = World::new(1, limits.clone());
    let c = w.open(0);
    let expires = w.now + Duration::from_secs(600);
    let token = w.token_expiring(1, 1, expires);
    w.frame(c, Meta::Auth(meta::Auth { token }), &[]);
    w.take(c);
    let ends = expires + limits.token_leeway;
    // Keep the connection alive with pings until just before the renewal point.
    let renew = ends.as_millis() - limits.token_renew_margin.as_millis() as u64;
    while w.now.as_millis() + 10_000 < renew {
        w.frame(c, Meta::Ping(meta::Ping { nonce: 1 }), &[]);
        w.advance(Duration::from_secs(10));
    }
    assert!(!w.take(c).iter().any(|(m, _)| matches!(m, Meta::GoAway(_))));
    w.frame(c, Meta::Ping(meta::Ping { nonce: 1 }), &[]);
    w.advance(Duration::from_secs(11));
    let goaway = w.take(c).into_iter().find_map(|(m, _)| match m {
        Meta::GoAway(g) => Some(g.code),
        _ => None,
    });
    assert_eq!(goaway, Some(ErrorCode::TokenExpired));
    assert!(!w.conns[c].closed, "told first, closed only at expiry");
    while !w.conns[c].closed && w.now < ends + Duration::from_secs(1) {
        w.frame(c, Meta::Ping(meta::Ping { nonce: 1 }), &[]);
        w.advance(Duration::from_secs(5));
    }
    assert!(w.conns[c].closed);
    assert!(w.now >= ends);
    assert_eq!(error_code(&w.take(c)), Some(ErrorCode::TokenExpired));
}

// ---- finding 4: conversation state is bounded ---------------------------------------

#[test]
fn conversations_beyond_the_bound_leave_memory_and_come_back_from_the_log() {
    let limits = Limits {
        conversations_max: 4,
        ..Limits::default()
    };
    let mut w = World::new(1, limits);
    let alice = w.login(0, 1, 1);
    let mut req = 0;
    for peer in 2..=51 {
        for _ in 0..2 {
            req += 1;
            w.send(alice, req, ConvId::direct(UserId(1), UserId(peer)), b"x");
        }
        let stats = w.nodes[0].shard.stats();
        assert!(
            stats.conversations <= 4,
            "{} in memory",
            stats.conversations
        );
    }
    assert_eq!(acks(&w.take(alice)).len(), 100);
    assert!(w.nodes[0].shard.stats().conversations_evicted >= 46);
    // An evicted conversation continues its seqs (I3) and serves its history.
    let first = ConvId::direct(UserId(1), UserId(2));
    w.send(alice, 1_000, first, b"third");
    assert_eq!(acks(&w.take(alice)), vec![(1_000, Seq(3))]);
    let bob = w.login(0, 2, 1);
    w.sync_from(bob, 7, first, Seq::ZERO);
    let frames = w.take(bob);
    assert_eq!(seqs(&frames), vec![1, 2, 3]);
    assert!(sync_done(&frames).gaps.is_empty());
    let loaded = w.nodes[0].shard.stats().conversations_loaded;
    assert!(loaded >= 1, "it came back from the log");
    // And after a restart too.
    w.crash_all();
    let alice = w.login(0, 1, 1);
    assert!(w.nodes[0].shard.stats().conversations <= 4);
    w.send(
        alice,
        2_000,
        ConvId::direct(UserId(1), UserId(30)),
        b"again",
    );
    assert_eq!(acks(&w.take(alice)), vec![(2_000, Seq(3))]);
}

#[test]
fn a_send_to_a_conversation_the_sender_is_not_in_creates_no_state() {
    let mut w = World::new(1, Limits::default());
    let mallory = w.login(0, 9, 1);
    for peer in 10..=50 {
        w.send(
            mallory,
            peer as u32,
            ConvId::direct(UserId(1), UserId(peer)),
            b"x",
        );
    }
    assert_eq!(w.nodes[0].shard.stats().conversations, 0);
}

// ---- a connection's push cursors are bounded too -------------------------------------

/// Found measuring finding 4 again: a connection keeps a push cursor for every
/// conversation pushed to it, its own Sends' echoes included, so one client writing to new
/// conversations grew its connection by ~64 bytes a conversation without end.
#[test]
fn a_connection_keeps_a_bounded_number_of_push_cursors() {
    let limits = Limits {
        cursors_per_conn_max: 8,
        sync_cursors_max: 8,
        ..Limits::default()
    };
    let mut w = World::new(1, limits);
    let alice = w.login(0, 1, 1);
    for peer in 2..=101u64 {
        let conv = ConvId::direct(UserId(1), UserId(peer));
        w.send(alice, peer as u32, conv, b"hi");
    }
    assert_eq!(acks(&w.take(alice)).len(), 100);
    let id = w.conns[alice].id;
    assert_eq!(w.nodes[0].shard.connection_cursors(id), Some(8));
    // A conversation whose cursor was dropped is caught up from seq 1 at its next push:
    // a repeat, which the device shows once, and nothing missed.
    let conv = ConvId::direct(UserId(1), UserId(2));
    w.send(alice, 500, conv, b"again");
    let frames = w.take(alice);
    assert_eq!(acks(&frames), vec![(500, Seq(2))]);
    let pushed: Vec<u64> = delivers(&frames)
        .iter()
        .filter(|(c, _, _)| *c == conv)
        .map(|(_, s, _)| s.0)
        .collect();
    assert_eq!(pushed, vec![1, 2]);
    assert!(w.nodes[0].shard.connection_cursors(id) <= Some(8));
}
