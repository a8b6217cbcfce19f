//! End-to-end: the admin port and process health of the real `gateway` binary. Slow or
//! silent clients cannot starve `/healthz` and `/metrics`; every admin route but
//! `/healthz` needs the bearer token; `/healthz` names a shard that stops turning; a panic
//! in a shard takes the whole process down; the metrics show the engine's gauges and the
//! process.

mod common;

use common::*;
use imgate_core::proto::meta::Meta;
use imgate_core::proto::{ConvId, UserId};
use std::io::{Read, Write};
use std::net::TcpStream;

/// The gateway's admin connection slots (`admin::CONNECTIONS_MAX`).
const ADMIN_CONNECTIONS_MAX: usize = 64;

/// The sum over shards of a per-shard sample `name{shard="i"} v`, or of the one sample
/// `name v`; `None` if absent.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

#[test]
fn healthz_and_metrics_are_answered_while_half_heads_hold_every_admin_slot() {
    let g = Gateway::start(1, &[]);
    // Connections that send half a request head and then nothing, more than there are
    // slots: before the fix they held every slot for 10 s.
    let extra = 16;
    let mut held: Vec<TcpStream> = (0..ADMIN_CONNECTIONS_MAX + extra)
        .map(|_| {
            let mut s = TcpStream::connect(g.admin).expect("connect");
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .expect("half a head");
            s
        })
        .collect();
    // `http` waits at most WAIT for its answer.
    let health = g.http("GET", "/healthz", "").expect("healthz answered");
    assert_eq!(health, (200, "ok\n".to_owned()));
    let (status, metrics) = g.http("GET", "/metrics", "").expect("metrics answered");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("\nimgate_connections{shard=\"0\"} "),
        "{metrics}"
    );
    // Room was made by closing the oldest half-heads without an answer (eviction), not by
    // their head deadline (which answers 408).
    let oldest = &mut held[0];
    oldest.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut got = Vec::new();
    match oldest.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the oldest half-head was not closed: {e}"),
    }
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
}

#[test]
fn admin_routes_refuse_a_missing_or_wrong_token_and_take_the_right_one() {
    use std::os::unix::fs::PermissionsExt;
    let g = Gateway::start(1, &[]);
    // Generated on first start, next to the dev secret, readable by the gateway's user only.
    let token = g.admin_token();
    assert_eq!(token.len(), 64, "{token}");
    let mode = std::fs::metadata(g.data_dir.join("admin-token"))
        .expect("token file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let wrong = format!("{}0", &token[..token.len() - 1]);
    let group = r#"{"id": 9, "members": [1, 2]}"#;
    for bad in [None, Some(""), Some(wrong.as_str())] {
        for (method, path, body) in [
            ("GET", "/metrics", ""),
            ("POST", "/groups", group),
            ("POST", "/drain", ""),
        ] {
            let reply = g.http_as(bad, method, path, body).expect("answered");
            assert_eq!(reply.0, 401, "{bad:?} {method} {path}: {}", reply.1);
        }
    }
    // Nothing the refused requests asked for happened: the group is new, no drain began.
    let created = g.http_as(Some(&token), "POST", "/groups", group);
    assert_eq!(created, Some((200, r#"{"ok":true}"#.to_owned())));
    let again = g
        .http_as(Some(&token), "POST", "/groups", group)
        .expect("answered");
    assert_eq!(again.0, 409, "{}", again.1);
    let (status, metrics) = g
        .http_as(Some(&token), "GET", "/metrics", "")
        .expect("answered");
    assert_eq!(status, 200);
    assert!(metrics.contains("imgate_acks_total"));
    // /healthz stays open for load-balancer probes.
    assert_eq!(
        g.http_as(None, "GET", "/healthz", ""),
        Some((200, "ok\n".to_owned()))
    );
}

#[test]
fn a_configured_admin_token_file_replaces_the_generated_token() {
    let dir = std::env::temp_dir().join(format!("imgate-e2e-token-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("admin.token");
    std::fs::write(&file, "an-operator-chosen-admin-token\n").expect("token file");
    let g = Gateway::start(
        1,
        &["--admin-token-file", file.to_str().expect("UTF-8 path")],
    );
    let own = "an-operator-chosen-admin-token";
    assert_eq!(
        g.http_as(Some(own), "GET", "/metrics", "").map(|r| r.0),
        Some(200)
    );
    assert_eq!(
        g.http_as(None, "GET", "/metrics", "").map(|r| r.0),
        Some(401)
    );
    assert!(
        !g.data_dir.join("admin-token").exists(),
        "no token is generated when one is configured"
    );
    drop(g);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_panicking_shard_takes_the_whole_process_down_with_a_non_zero_exit() {
    let mut g = Gateway::start_bin(fault_gateway_bin(), 2, &[]);
    assert_eq!(
        g.http("GET", "/healthz", ""),
        Some((200, "ok\n".to_owned()))
    );
    // The answer races the exit it causes (the shard panics on its next turn, within a
    // tick), so it may be cut off; the exit is what this test is about.
    let asked = g.http("POST", "/fault/shards/1/panic", "");
    assert!(matches!(&asked, None | Some((202, _))), "{asked:?}");
    // The child stays in `g` until it is reaped, so that a failure still kills it.
    let status = eventually("the gateway exits after a shard panicked", || {
        g.child.as_mut().expect("running").try_wait().expect("wait")
    });
    g.child = None;
    assert!(!status.success(), "{status}");
    assert_eq!(status.code(), Some(101), "an exit, not a signal: {status}");
}

#[test]
fn a_failing_shard_stops_every_shard_and_the_process_exits_non_zero() {
    // Shard 1 ends with an error while shard 0 is healthy: shard 0 must not run on alone
    // (before, the process waited for shard 0 forever, serving half its users).
    let mut g = Gateway::start_bin(fault_gateway_bin(), 2, &[]);
    // The kernel spreads connections over the shards' listeners; sixteen put at least
    // one on the healthy shard but for a 1 in 65,536 chance.
    let mut clients: Vec<Client> = (1..=16).map(|u| Client::login(&g, u, 1)).collect();
    let on_healthy = eventually("the metrics count every client", || {
        let counts = per_shard(&g, "imgate_connections");
        (counts.iter().sum::<u64>() == 16).then_some(counts[0])
    });
    assert!(on_healthy > 0);
    let asked = g.http("POST", "/fault/shards/1/fail", "");
    assert!(matches!(&asked, None | Some((202, _))), "{asked:?}");
    let status = eventually("the gateway exits after a shard failed", || {
        g.child.as_mut().expect("running").try_wait().expect("wait")
    });
    g.child = None;
    assert_eq!(status.code(), Some(1), "{status}");
    // The healthy shard stopped the way SIGTERM stops it: its clients were told.
    let told = clients
        .iter_mut()
        .map(|c| c.drain_until_closed())
        .filter(|frames| frames.iter().any(|(m, _)| matches!(m, Meta::GoAway(_))))
        .count();
    assert_eq!(told as u64, on_healthy);
}

#[test]
fn healthz_names_a_shard_that_stops_turning_until_it_turns_again() {
    let g = Gateway::start_bin(fault_gateway_bin(), 2, &[]);
    assert_eq!(
        g.http("GET", "/healthz", ""),
        Some((200, "ok\n".to_owned()))
    );
    let asked = g.http("POST", "/fault/shards/1/stall", "");
    assert_eq!(asked.map(|r| r.0), Some(202));
    let body = eventually("/healthz turns 503", || {
        match g.http("GET", "/healthz", "") {
            Some((503, body)) => Some(body),
            _ => None,
        }
    });
    assert!(body.contains("shard 1 has not turned for"), "{body}");
    assert!(!body.contains("shard 0"), "{body}");
    let resumed = g.http("POST", "/fault/shards/1/resume", "");
    assert_eq!(resumed.map(|r| r.0), Some(202));
    eventually("/healthz is 200 again", || {
        (g.http("GET", "/healthz", "")? == (200, "ok\n".to_owned())).then_some(())
    });
}

#[test]
fn metrics_show_the_engine_gauges_and_the_process() {
    let g = Gateway::start(1, &[]);
    let mut a = Client::login(&g, 1, 1);
    a.send_msg(1, ConvId::direct(UserId(1), UserId(2)), msg_id(1, 1), b"hi");
    let got = a.recv_until(|m| matches!(m, Meta::Ack(_) | Meta::Nack(_)));
    assert!(matches!(got.last(), Some((Meta::Ack(_), _))), "{got:?}");
    // Shards publish every tick (100 ms): wait for the message to show.
    let metrics = eventually("the stored message shows in the gauges", || {
        let (_, body) = g.http("GET", "/metrics", "")?;
        (sample(&body, "imgate_hot_messages")? >= 1.0).then_some(body)
    });
    for gauge in [
        "imgate_conversations",
        "imgate_hot_bytes",
        "imgate_dedupe_entries",
    ] {
        let v = sample(&metrics, gauge).unwrap_or_else(|| panic!("{gauge} in {metrics}"));
        assert!(v >= 1.0, "{gauge} {v}");
    }
    let open = sample(&metrics, "process_open_fds").expect("process_open_fds");
    assert!(open >= 3.0, "{open}");
    assert!(sample(&metrics, "process_max_fds").expect("process_max_fds") >= open);
    assert!(sample(&metrics, "process_resident_memory_bytes").expect("rss") > 0.0);
    assert!(sample(&metrics, "process_virtual_memory_bytes").expect("vsize") > 0.0);
    assert!(sample(&metrics, "process_cpu_seconds_total").expect("cpu") >= 0.0);
    let now = now().as_millis() as f64 / 1000.0;
    let started = sample(&metrics, "process_start_time_seconds").expect("start time");
    assert!(
        started > now - 3600.0 && started <= now + 60.0,
        "{started} vs {now}"
    );
}
