//! End-to-end: the real `gateway` binary on 127.0.0.1, driven by blocking clients.

mod common;

use common::*;
use imgate_core::proto::meta::{self, Meta};
use imgate_core::proto::{ConvId, ErrorCode, Seq, UserId};
use std::collections::BTreeMap;
use std::time::Duration;

fn is_ack(m: &Meta) -> bool {
    matches!(m, Meta::Ack(_) | Meta::Nack(_))
}

fn deliver_seqs(frames: &[(Meta, bytes::Bytes)]) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|(m, _)| match m {
            Meta::Deliver(d) => Some(d.seq.0),
            _ => None,
        })
        .collect()
}

fn error_of(frames: &[(Meta, bytes::Bytes)]) -> Option<ErrorCode> {
    frames.iter().rev().find_map(|(m, _)| match m {
        Meta::Error(e) => Some(e.code),
        _ => None,
    })
}

/// Shards holding at least one connection, read from /metrics once it accounts for
/// exactly `clients` connections (shards publish every 100 ms; bounded by `WAIT`).
fn shards_in_use(g: &Gateway, clients: usize) -> usize {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, body) = g.http("GET", "/metrics", "").expect("metrics");
        let per_shard: Vec<usize> = body
            .lines()
            .filter(|l| l.starts_with("imgate_connections{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        if per_shard.iter().sum::<usize>() == clients {
            return per_shard.iter().filter(|&&n| n > 0).count();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics never showed {clients} connections"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn messages_reach_every_device_across_shards_and_groups() {
    let g = Gateway::start(2, &[]);
    // Enough connections that both shards get some (SO_REUSEPORT spreads them).
    let mut alice = Client::login(&g, 1, 1);
    let mut alice_tablet = Client::login(&g, 1, 2);
    let mut bob = Client::login(&g, 2, 1);
    let mut carol = Client::login(&g, 3, 1);
    // SO_REUSEPORT picks the shard: add devices of bob until both shards hold
    // connections, so that delivery crosses shards.
    let mut bobs = Vec::new();
    for device in 2..40 {
        if shards_in_use(&g, 4 + bobs.len()) == 2 {
            break;
        }
        bobs.push(Client::login(&g, 2, device));
    }
    assert_eq!(
        shards_in_use(&g, 4 + bobs.len()),
        2,
        "connections never spread over both shards"
    );
    let direct = ConvId::direct(UserId(1), UserId(2));
    alice.send_msg(1, direct, msg_id(1, 1), b"hello bob");
    let got = alice.recv_until(is_ack);
    assert!(
        matches!(got.last(), Some((Meta::Ack(a), _)) if a.seq == Seq(1)),
        "{got:?}"
    );
    for b in std::iter::once(&mut bob).chain(bobs.iter_mut()) {
        let got = b.recv_until(|m| matches!(m, Meta::Deliver(_)));
        assert_eq!(&got.last().unwrap().1[..], b"hello bob");
    }
    let got = alice_tablet.recv_until(|m| matches!(m, Meta::Deliver(_)));
    assert_eq!(
        &got.last().unwrap().1[..],
        b"hello bob",
        "the sender's other device"
    );

    let (code, body) = g
        .http("POST", "/groups", r#"{"id": 9, "members": [1, 2, 3]}"#)
        .expect("admin answers");
    assert_eq!(code, 200, "{body}");
    let group = ConvId::group(9);
    bob.send_msg(2, group, msg_id(2, 2), b"hi group");
    let got = bob.recv_until(|m| matches!(m, Meta::Ack(_)));
    assert!(matches!(got.last(), Some((Meta::Ack(a), _)) if a.seq == Seq(1)));
    for c in [&mut alice, &mut alice_tablet, &mut carol] {
        let got = c.recv_until(|m| matches!(m, Meta::Deliver(d) if d.conv == group));
        assert_eq!(&got.last().unwrap().1[..], b"hi group");
    }
    // A non-member is refused.
    let mut dave = Client::login(&g, 4, 1);
    dave.send_msg(1, direct, msg_id(9, 4), b"let me in");
    let got = dave.recv_until(is_ack);
    assert!(matches!(got.last(), Some((Meta::Nack(n), _)) if n.code == ErrorCode::NotMember));
}

#[test]
fn after_kill_9_every_acked_message_comes_back_once_in_order() {
    let mut g = Gateway::start(2, &[]);
    let conv = ConvId::direct(UserId(1), UserId(2));
    let senders = 3u64;
    let acked = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut threads = Vec::new();
    for s in 0..senders {
        let mut c = Client::login(&g, 1, 10 + s as u32);
        let acked = acked.clone();
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            // Send, wait for the ack, repeat, until the gateway dies. Bounded to 300
            // each: more than the hot tier (256) holds, so the replay reads the log.
            let mut next = 0u64;
            for _ in 0..300 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                next += 1;
                let id = msg_id(next, s);
                let ok = c
                    .send_raw(&imgate_core::proto::Encoder::new().encode_to_bytes(
                        &Meta::Send(meta::Send {
                            req: next as u32,
                            client_msg_id: id,
                            conv,
                            priority: meta::Priority::Normal,
                        }),
                        format!("{s}-{next}").as_bytes(),
                    ))
                    .is_ok();
                if !ok {
                    break;
                }
                // Every device of user 1 also receives the conversation's Delivers.
                let got = c.recv_until(|m| matches!(m, Meta::Ack(_) | Meta::Nack(_)));
                match got.last() {
                    Some((Meta::Ack(a), _)) => {
                        acked.lock().unwrap().insert(a.client_msg_id, a.seq);
                    }
                    _ => break,
                }
            }
        }));
    }
    // Let some messages through, then kill -9 while the senders are busy.
    let deadline = std::time::Instant::now() + WAIT;
    while acked.lock().unwrap().len() < 400 {
        assert!(
            std::time::Instant::now() < deadline,
            "sends are not being acked"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    g.kill();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    g.spawn();

    // Sync from zero: every acked message exactly once, seqs 1..n with no gap.
    let mut bob = Client::login(&g, 2, 1);
    let mut seen = Vec::new();
    let mut cursor = Seq::ZERO;
    loop {
        bob.send_frame(
            &Meta::Pull(meta::Pull {
                req: 1,
                conv,
                from_seq: cursor.next(),
                limit: 200,
                backward: false,
            }),
            &[],
        );
        let frames = bob.recv_until(|m| matches!(m, Meta::PullResult(_)));
        let batch = deliver_seqs(&frames);
        let Some((Meta::PullResult(r), _)) = frames.last() else {
            panic!("{frames:?}")
        };
        assert_eq!(r.available_from, Seq::ZERO, "history was lost: {r:?}");
        if batch.is_empty() {
            break;
        }
        for (m, p) in &frames {
            if let Meta::Deliver(d) = m {
                seen.push((d.seq, d.client_msg_id, p.clone()));
            }
        }
        cursor = Seq(*batch.last().unwrap());
    }
    let seqs: Vec<u64> = seen.iter().map(|s| s.0 .0).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "gap or repeat"
    );
    let by_id: BTreeMap<_, _> = seen.iter().map(|(s, id, _)| (*id, *s)).collect();
    assert_eq!(by_id.len(), seen.len(), "a message stored twice");
    for (id, seq) in &acked {
        assert_eq!(by_id.get(id), Some(seq), "acked message lost or moved");
    }
    // A retry of an acked message gets its original seq; a new one continues the order.
    let (retry_id, retry_seq) = acked.iter().next().map(|(i, s)| (*i, *s)).unwrap();
    let mut alice = Client::login(&g, 1, 10);
    alice.send_msg(1, conv, retry_id, b"retry");
    let got = alice.recv_until(is_ack);
    assert!(
        matches!(got.last(), Some((Meta::Ack(a), _)) if a.seq == retry_seq),
        "{got:?}"
    );
    alice.send_msg(2, conv, msg_id(999_999, 7), b"after restart");
    let got = alice.recv_until(is_ack);
    assert!(
        matches!(got.last(), Some((Meta::Ack(a), _)) if a.seq.0 == seqs.len() as u64 + 1),
        "{got:?}"
    );
}

#[test]
fn hostile_input_is_closed_with_the_right_code_while_others_keep_chatting() {
    let g = Gateway::start(2, &[]);
    let conv = ConvId::direct(UserId(1), UserId(2));
    let mut good = Client::login(&g, 1, 1);
    let mut peer = Client::login(&g, 2, 1);
    let mut n = 0u64;
    let mut chat = |good: &mut Client, peer: &mut Client| {
        n += 1;
        good.send_msg(n as u32, conv, msg_id(n, 1), b"still here");
        let got = good.recv_until(is_ack);
        assert!(matches!(got.last(), Some((Meta::Ack(_), _))), "{got:?}");
        peer.recv_until(|m| matches!(m, Meta::Deliver(_)));
    };

    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        (
            "random bytes",
            b"\x17\x03\x03 random junk that is not a frame".to_vec(),
            ErrorCode::BadMagic,
        ),
        (
            "bad magic",
            b"XX\x01\x01\0\0\0\0\0\0\0\0\0\0\0\0".to_vec(),
            ErrorCode::BadMagic,
        ),
        (
            "1 GiB frame",
            {
                let mut h = b"IG\x01\x03\0\0\0\0".to_vec();
                h.extend_from_slice(&64u32.to_le_bytes());
                h.extend_from_slice(&(1u32 << 30).to_le_bytes());
                h
            },
            ErrorCode::FrameTooLarge,
        ),
    ];
    for (what, bytes, code) in cases {
        let mut c = Client::connect(g.listen);
        c.send_raw(&bytes).unwrap();
        let frames = c.drain_until_closed();
        assert_eq!(error_of(&frames), Some(code), "{what}");
        chat(&mut good, &mut peer);
    }

    // Frames before Auth.
    let mut c = Client::connect(g.listen);
    c.send_frame(&Meta::Ping(meta::Ping { nonce: 1 }), &[]);
    assert_eq!(
        error_of(&c.drain_until_closed()),
        Some(ErrorCode::NotAuthenticated)
    );
    // An expired token, and one signed with another key.
    let mut c = Client::connect(g.listen);
    let expired = imgate_core::auth::TokenSigner::new(&imgate_core::auth::SigningKey::Hs256 {
        secret: std::fs::read_to_string(g.data_dir.join("dev-secret.hex"))
            .unwrap()
            .trim()
            .as_bytes()
            .to_vec(),
    })
    .unwrap()
    .mint(
        UserId(1),
        imgate_core::proto::DeviceId(3),
        imgate_core::Instant::from_millis(now().as_millis() - 3_600_000),
    );
    c.send_frame(&Meta::Auth(meta::Auth { token: expired }), &[]);
    assert_eq!(
        error_of(&c.drain_until_closed()),
        Some(ErrorCode::TokenExpired)
    );
    let mut c = Client::connect(g.listen);
    let forged = imgate_core::auth::TokenSigner::new(&imgate_core::auth::SigningKey::Hs256 {
        secret: b"not the gateway's secret, but 32+ bytes long".to_vec(),
    })
    .unwrap()
    .mint(
        UserId(1),
        imgate_core::proto::DeviceId(3),
        imgate_core::Instant::from_millis(now().as_millis() + 3_600_000),
    );
    c.send_frame(&Meta::Auth(meta::Auth { token: forged }), &[]);
    assert_eq!(error_of(&c.drain_until_closed()), Some(ErrorCode::BadToken));
    chat(&mut good, &mut peer);

    // A send to a conversation the user is not in: a Nack, and the connection stays.
    let mut mallory = Client::login(&g, 9, 1);
    mallory.send_msg(1, conv, msg_id(1, 9), b"x");
    let got = mallory.recv_until(is_ack);
    assert!(matches!(got.last(), Some((Meta::Nack(n), _)) if n.code == ErrorCode::NotMember));
    chat(&mut good, &mut peer);
}

#[test]
fn a_truncated_frame_then_silence_is_closed_at_the_auth_deadline() {
    let g = Gateway::start(1, &[]);
    let mut c = Client::connect(g.listen);
    c.send_raw(b"IG\x01\x01\0\0").unwrap();
    // The default auth deadline is 10 s; the client's read timeout is longer.
    c.stream.set_read_timeout(Some(WAIT * 2)).unwrap();
    let frames = c.drain_until_closed();
    assert_eq!(error_of(&frames), Some(ErrorCode::AuthTimeout));
}

#[test]
fn a_client_that_never_reads_is_closed_as_a_slow_consumer() {
    // The sender writes 60 KB messages as fast as they are acked: far above the default
    // per-connection byte rate, which would Nack it RateLimited long before the reader's
    // grace period ends. Here the rates are lifted so that only the reader is slow.
    let config = std::env::temp_dir().join(format!("imgate-slow-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        "bytes_per_sec = 1073741824\nbytes_burst = 1073741824\nframes_per_sec = 100000\n",
    )
    .unwrap();
    let g = Gateway::start(1, &["--config", config.to_str().unwrap()]);
    let conv = ConvId::direct(UserId(1), UserId(2));
    let mut sender = Client::login(&g, 1, 1);
    let mut sloth = Client::login(&g, 2, 1);
    let payload = vec![7u8; 60 * 1024];
    let mut closed = false;
    // Bounded by count and time: the kernel's socket buffers fill first, then the
    // gateway's queue passes its soft budget (degrade) and stays there for the grace
    // period (10 s) before the close.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    for i in 1..=20_000u64 {
        sender.send_msg(i as u32, conv, msg_id(i, 1), &payload);
        let got = sender.recv_until(is_ack);
        assert!(
            matches!(got.last(), Some((Meta::Ack(_), _))),
            "sender stalled: {got:?}"
        );
        if i % 20 == 0 {
            let (_, body) = g.http("GET", "/metrics", "").unwrap();
            if body
                .lines()
                .any(|l| l.starts_with("imgate_slow_consumer_closes_total") && !l.ends_with(" 0"))
            {
                closed = true;
                break;
            }
            if std::time::Instant::now() > deadline {
                break;
            }
        }
    }
    assert!(closed, "the slow consumer was never closed");
    let frames = sloth.drain_until_closed();
    assert_eq!(error_of(&frames), Some(ErrorCode::SlowConsumer));
}

#[test]
fn sigterm_sends_goaway_exits_zero_and_loses_nothing_acked() {
    let mut g = Gateway::start(2, &[]);
    let conv = ConvId::direct(UserId(1), UserId(2));
    let mut alice = Client::login(&g, 1, 1);
    let mut bob = Client::login(&g, 2, 1);
    for i in 1..=20u64 {
        alice.send_msg(i as u32, conv, msg_id(i, 1), b"m");
        let got = alice.recv_until(is_ack);
        assert!(matches!(got.last(), Some((Meta::Ack(_), _))));
    }
    let status = g.terminate();
    assert!(status.success(), "exit status {status}");
    for c in [&mut alice, &mut bob] {
        let frames = c.drain_until_closed();
        assert!(
            frames
                .iter()
                .any(|(m, _)| matches!(m, Meta::GoAway(ga) if ga.code == ErrorCode::ShuttingDown)),
            "{frames:?}"
        );
    }
    g.spawn();
    let mut bob = Client::login(&g, 2, 1);
    bob.send_frame(
        &Meta::Pull(meta::Pull {
            req: 1,
            conv,
            from_seq: Seq(1),
            limit: 100,
            backward: false,
        }),
        &[],
    );
    let frames = bob.recv_until(|m| matches!(m, Meta::PullResult(_)));
    assert_eq!(deliver_seqs(&frames), (1..=20).collect::<Vec<_>>());
}

#[test]
fn a_connection_over_the_limit_gets_too_many_connections_and_is_counted() {
    let g = Gateway::start(1, &["--max-connections", "2"]);
    let _a = Client::login(&g, 1, 1);
    let _b = Client::login(&g, 2, 1);
    let mut c = Client::connect(g.listen);
    assert_eq!(
        error_of(&c.drain_until_closed()),
        Some(ErrorCode::TooManyConnections)
    );
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, body) = g.http("GET", "/metrics", "").expect("metrics");
        if body
            .lines()
            .any(|l| l == "imgate_refused_connections_total{shard=\"0\"} 1")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "refusal not counted:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_gateway_runs_on_its_defaults_in_an_empty_directory() {
    // Only the ports are given (the defaults may be taken on a shared machine): the data
    // dir is the default, relative `imgate-data`, in a fresh working directory.
    let cwd = std::env::temp_dir().join(format!("imgate-e2e-cwd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cwd);
    std::fs::create_dir_all(&cwd).unwrap();
    let mut g = Gateway::start(1, &[]);
    g.kill();
    g.data_dir = cwd.join("imgate-data");
    let child = std::process::Command::new(gateway_bin())
        .args([
            "--listen",
            &g.listen.to_string(),
            "--admin",
            &g.admin.to_string(),
        ])
        .current_dir(&cwd)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("gateway starts");
    g.child = Some(child);
    let deadline = std::time::Instant::now() + WAIT;
    while g.http("GET", "/healthz", "").is_none()
        || !g.data_dir.join("dev-secret.hex").exists()
        || std::net::TcpStream::connect(g.listen).is_err()
    {
        assert!(std::time::Instant::now() < deadline, "gateway not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut a = Client::login(&g, 1, 1);
    a.send_msg(1, ConvId::direct(UserId(1), UserId(2)), msg_id(1, 1), b"hi");
    let got = a.recv_until(is_ack);
    assert!(
        matches!(got.last(), Some((Meta::Ack(x), _)) if x.seq == Seq(1)),
        "{got:?}"
    );
    assert!(g.data_dir.join("shard-0").is_dir());
    g.kill();
    let _ = std::fs::remove_dir_all(&cwd);
}
