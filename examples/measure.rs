//! Quick capacity measurements against a running gateway, until loadgen takes them over:
//!
//! ```sh
//! cargo run --release --example measure -- idle  <gateway-pid> <data-dir> <addr> <count>
//! cargo run --release --example measure -- pair  <data-dir> <addr> <seconds> <window>
//! ```
//! `idle` opens `count` authenticated connections and reports the gateway's RSS growth
//! per connection (from /proc/<pid>/status). `pair` pushes pipelined Sends (at most
//! `window` unacked) from one connection to another for `seconds` and reports messages
//! per second acked and delivered.

use bytes::BytesMut;
use imgate_core::auth::{SigningKey, TokenSigner};
use imgate_core::proto::meta::{self, Meta};
use imgate_core::proto::{ClientMsgId, ConvId, Decoder, DeviceId, Encoder, UserId};
use imgate_core::Instant;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn signer(data_dir: &str) -> TokenSigner {
    let secret = std::fs::read_to_string(format!("{data_dir}/dev-secret.hex")).expect("dev secret");
    TokenSigner::new(&SigningKey::Hs256 {
        secret: secret.trim().as_bytes().to_vec(),
    })
    .expect("key")
}

fn token(s: &TokenSigner, user: u64, device: u32) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    s.mint(
        UserId(user),
        DeviceId(device),
        Instant::from_millis(now + 3_600_000),
    )
}

fn rss_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("gateway pid");
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

fn login(addr: &str, s: &TokenSigner, user: u64, device: u32) -> TcpStream {
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_nodelay(true).unwrap();
    let auth = Encoder::new().encode_to_bytes(
        &Meta::Auth(meta::Auth {
            token: token(s, user, device),
        }),
        &[],
    );
    c.write_all(&auth).unwrap();
    let mut buf = BytesMut::new();
    let d = Decoder::new(1 << 20);
    loop {
        if let Some(f) = d.decode(&mut buf).unwrap() {
            assert!(matches!(f.meta, Meta::AuthOk(_)), "{:?}", f.meta);
            return c;
        }
        let mut b = [0u8; 512];
        let n = c.read(&mut b).unwrap();
        assert!(n > 0, "closed during auth");
        buf.extend_from_slice(&b[..n]);
    }
}

fn idle(pid: &str, data_dir: &str, addr: &str, count: u64) {
    let s = signer(data_dir);
    let before = rss_kib(pid);
    let started = std::time::Instant::now();
    let conns: Vec<TcpStream> = (1..=count).map(|u| login(addr, &s, u, 1)).collect();
    let took = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_kib(pid);
    println!(
        "idle: {} authenticated connections in {:.1}s ({:.0}/s); gateway RSS {} -> {} KiB: {:.0} bytes per connection",
        conns.len(),
        took.as_secs_f64(),
        count as f64 / took.as_secs_f64(),
        before,
        after,
        (after.saturating_sub(before) * 1024) as f64 / count as f64
    );
}

fn pair(data_dir: &str, addr: &str, seconds: u64, window: u64) {
    let s = signer(data_dir);
    let sender = login(addr, &s, 1, 1);
    let receiver = login(addr, &s, 2, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    let acked = Arc::new(AtomicU64::new(0));
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let count_frames = |mut stream: TcpStream,
                        counter: Arc<AtomicU64>,
                        stop: Arc<std::sync::atomic::AtomicBool>,
                        ack: bool| {
        std::thread::spawn(move || {
            stream
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let d = Decoder::new(1 << 20);
            let mut buf = BytesMut::with_capacity(1 << 20);
            let mut b = vec![0u8; 1 << 16];
            while !stop.load(Ordering::Relaxed) {
                match stream.read(&mut b) {
                    Ok(0) => break,
                    Ok(n) => buf.extend_from_slice(&b[..n]),
                    Err(_) => continue,
                }
                while let Some(f) = d.decode(&mut buf).unwrap() {
                    match (&f.meta, ack) {
                        (Meta::Ack(_), true) | (Meta::Deliver(_), false) => {
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
            }
        })
    };
    let a = count_frames(
        sender.try_clone().unwrap(),
        acked.clone(),
        stop.clone(),
        true,
    );
    let r = count_frames(receiver, delivered.clone(), stop.clone(), false);
    let mut out = sender;
    let mut enc = Encoder::new();
    let payload = [0x42u8; 100];
    let start = std::time::Instant::now();
    let mut sent = 0u64;
    let mut batch = Vec::with_capacity(64 * 1024);
    while start.elapsed() < Duration::from_secs(seconds) {
        let room = (acked.load(Ordering::Relaxed) + window).saturating_sub(sent);
        if room == 0 {
            std::thread::yield_now();
            continue;
        }
        batch.clear();
        for _ in 0..room.min(256) {
            sent += 1;
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&sent.to_le_bytes());
            batch.extend_from_slice(&enc.encode_to_bytes(
                &Meta::Send(meta::Send {
                    req: sent as u32,
                    client_msg_id: ClientMsgId(id),
                    conv,
                    priority: meta::Priority::Normal,
                }),
                &payload,
            ));
        }
        out.write_all(&batch).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let (acks, dels) = (
        acked.load(Ordering::Relaxed),
        delivered.load(Ordering::Relaxed),
    );
    stop.store(true, Ordering::Relaxed);
    a.join().unwrap();
    r.join().unwrap();
    println!(
        "pair: {sent} sent, {acks} acked ({:.0}/s), {dels} delivered ({:.0}/s) over {secs:.1}s, window {window}, 100 B payloads",
        acks as f64 / secs,
        dels as f64 / secs
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("idle") if args.len() == 5 => {
            idle(&args[1], &args[2], &args[3], args[4].parse().unwrap())
        }
        Some("pair") if args.len() == 5 => pair(
            &args[1],
            &args[2],
            args[3].parse().unwrap(),
            args[4].parse().unwrap(),
        ),
        _ => {
            eprintln!("usage: measure idle <gateway-pid> <data-dir> <addr> <count> | measure pair <data-dir> <addr> <seconds> <window>");
            std::process::exit(2);
        }
    }
}
