//! Architecture invariant: imgate-core does no I/O of its own, so it must not depend,
//! directly or through any crate, on an async runtime, an event loop or io_uring binding,
//! or a simulator.

use std::collections::{BTreeSet, VecDeque};
use std::process::Command;

const FORBIDDEN: [&str; 6] = [
    "glommio",
    "tokio",
    "turmoil",
    "async-std",
    "io-uring",
    "mio",
];

#[test]
fn core_depends_on_no_runtime_or_simulator() {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let nodes = meta["resolve"]["nodes"].as_array().expect("resolve graph");
    let name_of = |id: &str| {
        meta["packages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["id"] == id)
            .and_then(|p| p["name"].as_str())
            .unwrap_or("?")
            .to_string()
    };
    let root = nodes
        .iter()
        .find(|n| name_of(n["id"].as_str().unwrap_or("")) == "imgate-core")
        .expect("imgate-core in the graph");
    // Walk normal (non-dev, non-build) dependencies only: what ships in the library.
    let mut seen = BTreeSet::new();
    let mut queue = VecDeque::from([root["id"].as_str().unwrap_or("").to_string()]);
    while let Some(id) = queue.pop_front() {
        if !seen.insert(id.clone()) {
            continue;
        }
        let node = nodes.iter().find(|n| n["id"] == id.as_str()).expect("node");
        for dep in node["deps"].as_array().into_iter().flatten() {
            let normal = dep["dep_kinds"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k["kind"].is_null());
            if normal {
                queue.push_back(dep["pkg"].as_str().unwrap_or("").to_string());
            }
        }
    }
    let names: BTreeSet<String> = seen.iter().map(|id| name_of(id)).collect();
    assert!(
        names.contains("jsonwebtoken"),
        "the walk found core's dependencies: {names:?}"
    );
    for forbidden in FORBIDDEN {
        assert!(
            !names.contains(forbidden),
            "imgate-core depends on {forbidden}"
        );
    }
}
