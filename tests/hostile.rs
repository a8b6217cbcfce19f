//! End-to-end: hostile clients against the real `gateway` binary on 127.0.0.1 (issue 10).
//! Each test plays one attack from outside and checks what the gateway answers and what
//! it keeps holding (descriptors, connections, the process itself).

mod common;

use bytes::Bytes;
use common::*;
use imgate_core::proto::meta::{self, Meta};
use imgate_core::proto::{ConvId, Decoder, Encoder, ErrorCode, FrameKind, Seq, UserId};
use std::io::Write;
use std::time::{Duration, Instant};

/// A large message: the payload maximum is 64 KiB, so 60 KB is a large but valid one.
const LARGE: usize = 60 * 1000;
/// The gateway's default hard outbound budget per connection (`Limits`).
const OUTBOUND_HARD_BYTES: usize = 1024 * 1024;
/// Descriptors the gateway may hold beyond what a test accounts for: an admin connection
/// of the test's last /metrics request still being closed, and the like.
const FD_SLACK: usize = 3;

fn is_ack(m: &Meta) -> bool {
    matches!(m, Meta::Ack(_) | Meta::Nack(_))
}

fn error_of(frames: &[(Meta, Bytes)]) -> Option<ErrorCode> {
    frames.iter().rev().find_map(|(m, _)| match m {
        Meta::Error(e) => Some(e.code),
        _ => None,
    })
}

fn deliver_seqs(frames: &[(Meta, Bytes)], conv: ConvId) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|(m, _)| match m {
            Meta::Deliver(d) if d.conv == conv => Some(d.seq.0),
            _ => None,
        })
        .collect()
}

/// Descriptors the gateway process holds now (entries of /proc/<pid>/fd).
fn open_fds(g: &Gateway) -> usize {
    let pid = g.child.as_ref().expect("the gateway runs").id();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("procfs lists the gateway's descriptors")
        .count()
}

/// The gateway's descriptors once the count has stopped moving (the start-up probes of
/// `Gateway::start` are closed asynchronously): the same value three polls in a row.
fn settled_fds(g: &Gateway) -> usize {
    let deadline = Instant::now() + WAIT;
    let (mut last, mut same) = (open_fds(g), 0);
    while same < 3 {
        assert!(
            Instant::now() < deadline,
            "the descriptor count never settled"
        );
        std::thread::sleep(Duration::from_millis(50));
        let now = open_fds(g);
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

/// One sample per shard of a per-shard metric, in shard order.
fn total(g: &Gateway, name: &str) -> u64 {
    per_shard(g, name).iter().sum()
}

/// Sends `count` messages of `bytes` bytes to `conv` from `c` (user `who`), numbered from
/// `first`, pipelined a window at a time, and checks that each is acked.
fn send_acked(c: &mut Client, who: u64, conv: ConvId, first: u64, count: u64, bytes: usize) {
    const WINDOW: u64 = 16;
    let mut n = first;
    let end = first + count;
    while n < end {
        let batch = WINDOW.min(end - n);
        for i in n..n + batch {
            let payload = vec![(i % 251) as u8; bytes];
            c.send_msg(i as u32, conv, msg_id(i, who), &payload);
        }
        for _ in 0..batch {
            let got = c.recv_until(is_ack);
            assert!(
                matches!(got.last(), Some((Meta::Ack(_), _))),
                "message not acked: {:?}",
                got.last().map(|f| &f.0)
            );
        }
        n += batch;
    }
}

/// Finding 2: a connection the engine closes as a slow consumer must give its socket back.
/// Sixty devices that never read, in two waves of thirty on a shard limited to forty
/// connections, get a group's large messages until the gateway closes them. After each
/// wave the gateway's descriptors come back to what it held before, and the closing
/// sockets never let the shard hold more connections than its limit: fresh clients fill
/// it up to the limit exactly and the next one is refused with `TooManyConnections`.
#[test]
fn slow_consumers_give_their_sockets_back_and_stay_within_the_connection_limit() {
    const LIMIT: u64 = 40;
    const WAVE: u64 = 30;
    const WAVES: u64 = 2;
    // 6 MB per device: more than the kernel's socket buffers (a few MB on loopback) plus
    // the soft outbound budget, so that every device ends up degraded, then closed.
    const PUSHES: u64 = 100;
    let g = Gateway::start(1, &["--max-connections", &LIMIT.to_string()]);
    let baseline = settled_fds(&g);
    let mut sender = Client::login(&g, 1, 1);
    let first_sloth = 100;
    let mut next_msg = 1;
    for wave in 0..WAVES {
        // A group of its own per wave, so that its devices get live pushes from seq 1 on
        // (a device joining a conversation with history would first be caught up, at its
        // own reading pace, and would not be pushed to meanwhile).
        let users = first_sloth + wave * WAVE..first_sloth + (wave + 1) * WAVE;
        let members: Vec<String> = std::iter::once(1)
            .chain(users.clone())
            .map(|u| u.to_string())
            .collect();
        let group_id = 7 + wave;
        let (code, body) = g
            .http(
                "POST",
                "/groups",
                &format!(
                    r#"{{"id": {group_id}, "members": [{}]}}"#,
                    members.join(", ")
                ),
            )
            .expect("admin answers");
        assert_eq!(code, 200, "{body}");
        let group = ConvId::group(group_id);
        // They read their AuthOk and nothing after it.
        let sloths: Vec<Client> = users.map(|u| Client::login(&g, u, 1)).collect();
        send_acked(&mut sender, 1, group, next_msg, PUSHES, LARGE);
        next_msg += PUSHES;
        // Closed once over the soft budget for the grace period (10 s), or at once over
        // the hard budget.
        wait_for(
            Duration::from_secs(40),
            "the never-reading devices closed as slow consumers",
            || total(&g, "imgate_slow_consumer_closes_total") >= (wave + 1) * WAVE,
        );
        if wave + 1 < WAVES {
            // Only the sender's connection is left open.
            wait_for(WAIT, "the closed devices' descriptors released", || {
                open_fds(&g) <= baseline + 1 + FD_SLACK
            });
        } else {
            // Fill the shard while this wave's sockets may still be flushing: a socket
            // the engine has closed holds a descriptor until it is released, so it
            // counts against the limit until then.
            let mut fresh = Vec::new();
            let mut fds_max = 0;
            for i in 0..LIMIT - 1 {
                fresh.push(Client::login(&g, 1000 + i, 1));
                fds_max = fds_max.max(open_fds(&g));
            }
            assert!(
                fds_max <= baseline + LIMIT as usize + FD_SLACK,
                "{fds_max} descriptors with {LIMIT} connections allowed (baseline {baseline})"
            );
            let mut extra = Client::connect(g.listen);
            assert_eq!(
                error_of(&extra.drain_until_closed()),
                Some(ErrorCode::TooManyConnections)
            );
            wait_for(WAIT, "descriptors within the connection limit", || {
                open_fds(&g) <= baseline + LIMIT as usize + FD_SLACK
            });
            // The ones admitted are served.
            let conv = ConvId::direct(UserId(1000), UserId(1001));
            send_acked(&mut fresh[0], 1000, conv, 1, 1, 10);
        }
        // Only now may the devices go: a client that hangs up releases its socket by
        // itself, which is not what this test is about.
        drop(sloths);
    }
}

/// Finding 2: once the engine has closed a connection the gateway stops reading it. A
/// client that never reads first gets enough large messages to fill the kernel's socket
/// buffers (so that nothing more can be written to it), then floods Pings; the answers
/// take it over its hard outbound budget and the engine closes it. Its flood must then
/// end in a closed socket after at most the kernel's buffers, instead of being read (and
/// piled up or thrown away) for as long as the client keeps writing.
#[test]
fn a_connection_the_gateway_closed_is_not_read_any_more() {
    // Far above the socket buffers on both sides (tens of MB at most on loopback).
    const FLOOD_BYTES_MAX: u64 = 256 << 20;
    // 6 MB: more than the kernel buffers between the gateway and a client that does not
    // read (a few MB on loopback) plus the soft outbound budget.
    const PUSHES: u64 = 100;
    let g = Gateway::start(1, &[]);
    let baseline = settled_fds(&g);
    let mut c = Client::login(&g, 1, 1);
    let mut peer = Client::login(&g, 2, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    send_acked(&mut peer, 2, conv, 1, PUSHES, LARGE);
    drop(peer);
    let mut encoder = Encoder::new();
    let mut batch = Vec::new();
    let mut nonce = 0;
    while batch.len() < 64 * 1024 {
        nonce += 1;
        batch.extend_from_slice(&encoder.encode_to_bytes(&Meta::Ping(meta::Ping { nonce }), &[]));
    }
    c.stream
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut written, mut at) = (0u64, 0usize);
    let closed = loop {
        if written > FLOOD_BYTES_MAX || Instant::now() > deadline {
            break false;
        }
        // Whole frames only, across partial writes.
        match c.stream.write(&batch[at..]) {
            Ok(0) => break true,
            Ok(n) => {
                written += n as u64;
                at = (at + n) % batch.len();
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break true,
        }
    };
    assert!(
        closed,
        "the gateway kept reading: {written} bytes taken from a client it never answered"
    );
    assert!(
        total(&g, "imgate_slow_consumer_closes_total") >= 1,
        "the flooder was not closed as a slow consumer"
    );
    wait_for(WAIT, "the flooder's descriptor released", || {
        open_fds(&g) <= baseline + FD_SLACK
    });
}

/// Finding 1: a Sync cursor at seq 2^64-1 is refused with BadRequest on whichever shard
/// the connection is, the connection stays usable and the process stays up.
#[test]
fn a_sync_cursor_at_the_top_of_the_seq_space_is_refused_on_every_shard() {
    // The frame of the report, from an independent client: user 1's Sync of conversation
    // (1, 2) at 2^64-1. The test builds the same Sync with our encoder for each user.
    let reported = hex_bytes(
        "49470108000000003800000000000000100000000000000008000c00080004000800000008000000\
         010000000100000001000000000000000200000000000000ffffffffffffffff",
    );
    let mut rx = bytes::BytesMut::from(&reported[..]);
    match Decoder::new(u32::MAX).decode(&mut rx) {
        Ok(Some(f)) => match f.meta {
            Meta::Sync(s) => assert_eq!(
                s.cursors,
                vec![meta::Cursor {
                    conv: ConvId::direct(UserId(1), UserId(2)),
                    seq: Seq(u64::MAX)
                }]
            ),
            other => panic!("the reported frame is a Sync, not {other:?}"),
        },
        other => panic!("the reported frame decodes: {other:?}"),
    }

    let mut g = Gateway::start(2, &[]);
    let mut tested = [false; 2];
    let mut clients: Vec<Client> = Vec::new();
    for user in 1..=40u64 {
        let before = connections_per_shard(&g, clients.len() as u64);
        let mut c = Client::login(&g, user, 1);
        let after = connections_per_shard(&g, clients.len() as u64 + 1);
        let shard = (0..2)
            .find(|&s| after[s] > before[s])
            .expect("the new connection is on some shard");
        if !tested[shard] {
            let conv = ConvId::direct(UserId(user), UserId(user + 10_000));
            let req = 7_000 + user as u32;
            c.send_frame(
                &Meta::Sync(meta::Sync {
                    req,
                    cursors: vec![meta::Cursor {
                        conv,
                        seq: Seq(u64::MAX),
                    }],
                }),
                &[],
            );
            let answer = loop {
                match c.next_within(WAIT) {
                    Next::Frame(m @ (Meta::Error(_) | Meta::SyncDone(_)), _) => break m,
                    Next::Frame(..) => {}
                    other => panic!("shard {shard}: no answer to the Sync: {other:?}"),
                }
            };
            assert!(
                matches!(&answer, Meta::Error(e) if e.code == ErrorCode::BadRequest && e.req == req),
                "shard {shard}: {answer:?}"
            );
            assert!(
                g.child.as_mut().unwrap().try_wait().unwrap().is_none(),
                "the gateway exited"
            );
            assert_eq!(
                g.http("GET", "/healthz", "").map(|(code, _)| code),
                Some(200)
            );
            // The connection is still served.
            send_acked(&mut c, user, conv, 1, 1, 10);
            tested[shard] = true;
        }
        clients.push(c);
        if tested.iter().all(|&t| t) {
            return;
        }
    }
    panic!("connections never landed on both shards: {tested:?}");
}

/// Connections per shard from /metrics, once they add up to `expected` (shards publish
/// every 100 ms).
fn connections_per_shard(g: &Gateway, expected: u64) -> Vec<u64> {
    let mut seen = Vec::new();
    wait_for(WAIT, "metrics to count every connection", || {
        seen = per_shard(g, "imgate_connections");
        seen.iter().sum::<u64>() == expected
    });
    seen
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    let digits: Vec<u8> = hex
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'\\')
        .collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

/// Finding 3: a device that missed many large messages reconnects, Syncs from cursor 0
/// and gets every one of them and SyncDone, without being closed: the reply is paced by
/// its reading, not counted against its outbound budget all at once.
#[test]
fn a_device_that_missed_many_large_messages_catches_up_with_sync() {
    // 3.6 MB, several times the hard outbound budget; under the Sync batch of 100.
    const MISSED: u64 = 60;
    assert!(MISSED as usize * LARGE > 3 * OUTBOUND_HARD_BYTES);
    let g = Gateway::start(2, &[]);
    let conv = ConvId::direct(UserId(1), UserId(2));
    let mut alice = Client::login(&g, 1, 1);
    send_acked(&mut alice, 1, conv, 1, MISSED, LARGE);
    let mut bob = Client::login(&g, 2, 1);
    bob.send_frame(
        &Meta::Sync(meta::Sync {
            req: 5,
            cursors: vec![meta::Cursor {
                conv,
                seq: Seq::ZERO,
            }],
        }),
        &[],
    );
    let frames = bob.recv_until(|m| matches!(m, Meta::SyncDone(d) if d.req == 5));
    assert!(
        matches!(frames.last(), Some((Meta::SyncDone(_), _))),
        "no SyncDone; closed with {:?} after {} Delivers",
        error_of(&frames),
        deliver_seqs(&frames, conv).len()
    );
    assert_eq!(
        deliver_seqs(&frames, conv),
        (1..=MISSED).collect::<Vec<_>>()
    );
    for (m, payload) in &frames {
        if let Meta::Deliver(d) = m {
            assert_eq!(payload.len(), LARGE);
            assert!(payload.iter().all(|&b| b == (d.seq.0 % 251) as u8));
        }
    }
}

/// Finding 3: a Pull at the documented maximum of 200 over 200 large messages gets all
/// 200 and its PullResult.
#[test]
fn a_pull_of_200_large_messages_gets_all_of_them() {
    const COUNT: u64 = 200;
    assert!(COUNT as usize * LARGE > 10 * OUTBOUND_HARD_BYTES);
    let g = Gateway::start(2, &[]);
    let conv = ConvId::direct(UserId(1), UserId(2));
    let mut alice = Client::login(&g, 1, 1);
    send_acked(&mut alice, 1, conv, 1, COUNT, LARGE);
    let mut bob = Client::login(&g, 2, 1);
    bob.send_frame(
        &Meta::Pull(meta::Pull {
            req: 9,
            conv,
            from_seq: Seq(1),
            limit: COUNT as u32,
            backward: false,
        }),
        &[],
    );
    let frames = bob.recv_until(|m| matches!(m, Meta::PullResult(r) if r.req == 9));
    let Some((Meta::PullResult(result), _)) = frames.last() else {
        panic!(
            "no PullResult; closed with {:?} after {} Delivers",
            error_of(&frames),
            deliver_seqs(&frames, conv).len()
        );
    };
    assert_eq!(deliver_seqs(&frames, conv), (1..=COUNT).collect::<Vec<_>>());
    assert_eq!((result.from_seq, result.to_seq), (Seq(1), Seq(COUNT)));
}

/// Finding 7: before AuthOk only a small Auth frame is accepted. A header declaring a
/// ~250 KB frame (under the frame maximum, far over any Auth) is answered at once with
/// FrameTooLarge and a close; the gateway does not wait for the body.
#[test]
fn an_unauthenticated_header_declaring_a_large_frame_is_refused_at_once() {
    let g = Gateway::start(1, &[]);
    let mut c = Client::connect(g.listen);
    let mut header = Vec::new();
    header.extend_from_slice(b"IG");
    header.push(1); // version
    header.push(FrameKind::Auth as u8);
    header.extend_from_slice(&[0, 0, 0, 0]); // flags, reserved
    header.extend_from_slice(&250_000u32.to_le_bytes()); // meta
    header.extend_from_slice(&0u32.to_le_bytes()); // payload
    c.send_raw(&header).unwrap();
    // Well inside the auth deadline (10 s), after which anything would be closed.
    let limit = Duration::from_secs(3);
    match c.next_within(limit) {
        Next::Frame(Meta::Error(e), _) => assert_eq!(e.code, ErrorCode::FrameTooLarge),
        other => panic!("expected Error FrameTooLarge within {limit:?}, got {other:?}"),
    }
    match c.next_within(limit) {
        Next::Closed => {}
        other => panic!("expected the connection closed, got {other:?}"),
    }
}

/// Finding 8: a Sync cursor ahead of the conversation's latest seq does not mute the
/// conversation on that connection: the next live message still arrives.
#[test]
fn a_sync_cursor_ahead_of_the_conversation_does_not_mute_it() {
    let g = Gateway::start(2, &[]);
    let conv = ConvId::direct(UserId(1), UserId(2));
    let mut alice = Client::login(&g, 1, 1);
    send_acked(&mut alice, 1, conv, 1, 3, 10);
    let mut bob = Client::login(&g, 2, 1);
    bob.send_frame(
        &Meta::Sync(meta::Sync {
            req: 3,
            cursors: vec![meta::Cursor {
                conv,
                seq: Seq(1_000),
            }],
        }),
        &[],
    );
    let frames = bob.recv_until(|m| matches!(m, Meta::SyncDone(d) if d.req == 3));
    assert!(
        matches!(frames.last(), Some((Meta::SyncDone(_), _))),
        "no SyncDone: {frames:?}"
    );
    alice.send_msg(4, conv, msg_id(4, 1), b"still there?");
    let got = alice.recv_until(is_ack);
    assert!(
        matches!(got.last(), Some((Meta::Ack(a), _)) if a.seq == Seq(4)),
        "{got:?}"
    );
    loop {
        match bob.next_within(WAIT) {
            Next::Frame(Meta::Deliver(d), payload) if d.conv == conv && d.seq == Seq(4) => {
                assert_eq!(&payload[..], b"still there?");
                break;
            }
            Next::Frame(..) => {}
            other => panic!("the live message never reached the device: {other:?}"),
        }
    }
}
