//! loadgen against real gateway processes: each scenario, small and short, must apply its
//! load, account for every message (nothing lost, duplicated or reordered) and exit 0; bad
//! credentials must show up as counted errors and a non-zero exit.

mod common;

use common::{loadgen_bin, Gateway};
use serde_json::Value;
use std::process::{Command, Stdio};

/// Runs loadgen against `g` with `args` (JSON output); returns its exit code and summary.
fn loadgen(g: &Gateway, args: &[&str]) -> (i32, Value) {
    let out = Command::new(loadgen_bin())
        .arg("--gateway")
        .arg(g.listen.to_string())
        .arg("--admin")
        .arg(g.admin.to_string())
        .arg("--admin-token-file")
        .arg(g.data_dir.join("admin-token"))
        .arg("--secret-file")
        .arg(g.data_dir.join("dev-secret.hex"))
        .arg("--json")
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("loadgen runs");
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "loadgen printed no JSON summary ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out.status.code().expect("loadgen exited"), summary)
}

fn n(v: &Value, path: &str) -> u64 {
    v.pointer(path)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{path} missing in {v:#}"))
}

/// Nothing lost, duplicated, reordered or left unacked, and no errors.
fn assert_clean(s: &Value) {
    for k in ["lost", "duplicated", "reordered", "unresolved"] {
        assert_eq!(n(s, &format!("/verdict/{k}")), 0, "{k} in {s:#}");
    }
    assert_eq!(s["errors"], serde_json::json!({}), "{s:#}");
}

#[test]
fn chat_is_acked_and_delivered_once_to_the_peer() {
    let g = Gateway::start(2, &[]);
    let (code, s) = loadgen(&g, &["-c", "40", "-d", "2", "chat", "--rate", "400"]);
    assert_eq!(code, 0, "{s:#}");
    assert_clean(&s);
    assert_eq!(n(&s, "/held"), 40);
    let sent = n(&s, "/totals/sent");
    assert!(sent >= 400, "two seconds at 400/s sent only {sent}: {s:#}");
    assert_eq!(n(&s, "/totals/acked"), sent, "every message acked");
    // A direct pair: each message has exactly one other member.
    assert_eq!(
        n(&s, "/totals/delivered"),
        sent,
        "each shown once to the peer"
    );
    assert_eq!(n(&s, "/ack_latency/count"), n(&s, "/window/sent"));
}

#[test]
fn fanout_reaches_every_member_on_both_sides_of_the_read_diffusion_threshold() {
    // Groups of 8: pushed at the default threshold, notified above a threshold of 4.
    let config = std::env::temp_dir().join(format!("imgate-loadgen-{}.toml", std::process::id()));
    std::fs::write(&config, "read_diffusion_threshold = 4\n").unwrap();
    for extra in [vec![], vec!["--config", config.to_str().unwrap()]] {
        let g = Gateway::start(2, &extra);
        let (code, s) = loadgen(
            &g,
            &["-c", "16", "-d", "2", "fanout", "-g", "8", "--rate", "20"],
        );
        assert_eq!(code, 0, "{extra:?}: {s:#}");
        assert_clean(&s);
        let acked = n(&s, "/totals/acked");
        assert!(acked >= 20, "{s:#}");
        assert_eq!(n(&s, "/totals/delivered"), acked * 7, "{extra:?}: {s:#}");
    }
    std::fs::remove_file(config).unwrap();
}

#[test]
fn a_reconnect_storm_resyncs_without_loss() {
    let g = Gateway::start(2, &[]);
    let (code, s) = loadgen(
        &g,
        &[
            "-c",
            "40",
            "-d",
            "3",
            "reconnect",
            "--rate",
            "200",
            "--reconnects-per-sec",
            "40",
        ],
    );
    assert_eq!(code, 0, "{s:#}");
    assert_clean(&s);
    let drops = n(&s, "/window/drops");
    assert!(drops >= 60, "3 s at 40/s dropped only {drops}: {s:#}");
    assert!(n(&s, "/totals/logins") >= 40 + drops, "{s:#}");
    assert_eq!(n(&s, "/totals/delivered"), n(&s, "/totals/acked"));
}

#[test]
fn idle_connections_are_held_and_the_gateway_is_measured() {
    let g = Gateway::start(2, &[]);
    let pid = g.child.as_ref().unwrap().id().to_string();
    let (code, s) = loadgen(
        &g,
        &[
            "-c",
            "50",
            "-d",
            "1",
            "--workers",
            "2",
            "--gateway-pid",
            &pid,
            "idle",
        ],
    );
    assert_eq!(code, 0, "{s:#}");
    assert_clean(&s);
    assert_eq!(n(&s, "/held_min"), 50);
    assert_eq!(n(&s, "/workers"), 2);
    assert!(n(&s, "/gateway/rss_held_bytes") > 0, "{s:#}");
}

#[test]
fn convs_writes_each_new_conversation_once_and_reads_them_back() {
    // No config knob sets `conversations_max` yet, so this runs on the default bound: it
    // checks the scenario's accounting, not eviction (benches/convs.sh measures that).
    let g = Gateway::start(2, &[]);
    let pid = g.child.as_ref().unwrap().id().to_string();
    let (code, s) = loadgen(
        &g,
        &[
            "-c",
            "4",
            "-d",
            "60",
            "--gateway-pid",
            &pid,
            "convs",
            "--count",
            "2000",
            "--rate",
            "2000",
            "--report-every",
            "500",
            "--verify",
            "200",
        ],
    );
    assert_eq!(code, 0, "{s:#}");
    assert_clean(&s);
    assert_eq!(s["scenario"], "convs", "{s:#}");
    assert_eq!(n(&s, "/convs/target"), 2000);
    assert_eq!(
        n(&s, "/convs/written"),
        2000,
        "every conversation acked: {s:#}"
    );
    assert_eq!(n(&s, "/totals/acked"), 2000, "one message each: {s:#}");
    assert_eq!(n(&s, "/totals/sent"), 2000 + n(&s, "/convs/rate_limited"));
    assert_eq!(n(&s, "/totals/delivered"), 0, "peers are never connected");
    assert_eq!(n(&s, "/convs/verified"), 200, "{s:#}");
    assert_eq!(n(&s, "/convs/verify_missing"), 0, "{s:#}");
    let rows = s["convs"]["rows"].as_array().expect("rows");
    let phases: Vec<&str> = rows.iter().filter_map(|r| r["phase"].as_str()).collect();
    assert_eq!(phases.first(), Some(&"start"), "{phases:?}");
    assert!(phases.ends_with(&["settled", "disconnected"]), "{phases:?}");
    assert!(
        phases.iter().filter(|p| **p == "load").count() >= 2,
        "{phases:?}"
    );
    let last = rows.last().unwrap();
    assert_eq!(n(last, "/n"), 2000);
    assert!(n(last, "/rss_bytes") > 0, "{last:#}");
    // The admin token is at hand, so the gauges are read: every conversation written is
    // still in memory, far below the default bound.
    assert_eq!(n(last, "/conversations"), 2000, "{last:#}");
    assert!(n(last, "/open_fds") > 0, "{last:#}");
}

#[test]
fn tokens_from_the_wrong_secret_are_counted_as_errors() {
    let g = Gateway::start(1, &[]);
    let out = Command::new(loadgen_bin())
        .args(["--gateway", &g.listen.to_string(), "--json"])
        .args(["--secret", "not-the-gateways-secret-but-32-bytes-long"])
        .args([
            "-c",
            "4",
            "-d",
            "1",
            "--connect-timeout",
            "2",
            "--drain",
            "1",
            "idle",
        ])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(3), "{s:#}");
    assert_eq!(n(&s, "/held"), 0);
    let errors = s["errors"].as_object().unwrap();
    assert!(
        errors.keys().any(|k| k.contains("BadToken")),
        "the refusal's code is named: {s:#}"
    );
}
