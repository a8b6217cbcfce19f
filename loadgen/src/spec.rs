//! What the parent tells a worker (one JSON line on its stdin), what a worker tells the
//! parent (JSON lines on its stdout), and how connections are split among workers.
//!
//! Connections are grouped in units: a unit is one conversation and every connection of
//! its members (a direct pair, a group), or one idle connection. A unit never straddles two
//! workers, so send->Deliver latency is measured on one process's monotonic clock and the
//! correctness ledger of a conversation lives in one place.

use crate::ledger::Verdict;
use imgate_core::proto::ConvId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

/// The load a worker applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scenario {
    /// Hold connections with heartbeats.
    Idle,
    /// Direct pairs, both sides sending.
    Chat,
    /// Groups; a few members send.
    Fanout,
    /// Direct pairs sending, with connections dropped and reconnected.
    Reconnect,
    /// Each connection writes one message to one brand-new direct conversation after
    /// another (peers never connected, never reused).
    Convs,
}

/// The `Convs` plan, the same for every worker: connection `i` (global index) writes to
/// conversations `k = i, i + connections, i + 2 * connections, ... < count`, conversation
/// `k` being the direct one of user `user_base + i` and user `peer_base + k`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvsSpec {
    /// Conversations to write, all connections together.
    pub count: u64,
    /// Connections of the whole run (the stride of `k`).
    pub connections: u64,
    /// User id of peer 0; peer `k` is `peer_base + k`.
    pub peer_base: u64,
    /// Conversations each connection reads back (Pull) after the load, spread over its
    /// share, to check they were kept (most of them left memory long before).
    pub verify_per_connection: u64,
}

impl ConvsSpec {
    /// How many conversations connection `index` writes.
    pub fn share(&self, index: u32) -> u64 {
        let i = u64::from(index);
        if i >= self.count || self.connections == 0 {
            0
        } else {
            (self.count - i).div_ceil(self.connections)
        }
    }

    /// Number `k` of the `j`-th conversation of connection `index`.
    pub fn k(&self, index: u32, j: u64) -> u64 {
        u64::from(index) + j * self.connections
    }
}

/// One conversation and its members' connections (global connection indexes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unit {
    /// The conversation, or `None` for an idle connection.
    pub conv: Option<ConvId>,
    /// Every member's connection.
    pub members: Vec<u32>,
    /// The members that send.
    pub senders: Vec<u32>,
}

/// Everything a worker needs, sent as the first line of its stdin. The secret travels
/// here rather than on the command line, where `ps` would show it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// This worker's number, for error messages.
    pub worker: u32,
    /// The load.
    pub scenario: Scenario,
    /// The gateway's client address.
    pub gateway: SocketAddr,
    /// The HS256 secret tokens are minted with.
    pub secret: Vec<u8>,
    /// User id of connection 0; connection `i` is user `user_base + i`, device 1.
    pub user_base: u64,
    /// Source addresses to spread connections over: connection `i` binds
    /// `sources[i % sources.len()]`.
    pub sources: Vec<Ipv4Addr>,
    /// This worker's conversations.
    pub units: Vec<Unit>,
    /// Connections opened per second by this worker.
    pub connect_rate: f64,
    /// Messages per second of each sending connection.
    pub send_rate_per_sender: f64,
    /// Drops (and reconnects) per second of each connection (`Reconnect` only).
    pub drop_rate_per_conn: f64,
    /// Payload bytes per message (at least [`crate::worker::PAYLOAD_HEADER`]).
    pub payload_bytes: usize,
    /// Client heartbeat interval in seconds (the gateway's AuthOk may shorten it).
    pub heartbeat_secs: u64,
    /// Seconds the token stays valid.
    pub token_ttl_secs: u64,
    /// How long after `stop` the worker waits for acks and deliveries to settle.
    pub drain_secs: u64,
    /// The plan of the `Convs` scenario.
    pub convs: Option<ConvsSpec>,
}

impl WorkerSpec {
    /// Connections this worker opens.
    pub fn connections(&self) -> usize {
        self.units.iter().map(|u| u.members.len()).sum()
    }
}

/// Counters a worker keeps; progress lines carry them cumulatively.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Connections authenticated right now.
    pub authenticated: u64,
    /// AuthOks received in all (first connects and reconnects).
    pub logins: u64,
    /// Planned drops made (`Reconnect`).
    pub drops: u64,
    /// Messages handed to the client engines.
    pub sent: u64,
    /// Acks received.
    pub acked: u64,
    /// Messages shown to receivers (each receiver counts).
    pub delivered: u64,
    /// Errors of every kind.
    pub errors: u64,
    /// Sends Nacked `RateLimited` and sent again later (`Convs`; not errors).
    pub rate_limited: u64,
    /// Conversations read back and found to hold the message (`Convs`).
    pub verified: u64,
    /// Conversations read back and found empty (`Convs`): written, acked, and gone.
    pub verify_missing: u64,
}

impl Counters {
    /// Field-wise sum.
    pub fn add(&mut self, o: &Counters) {
        self.authenticated += o.authenticated;
        self.logins += o.logins;
        self.drops += o.drops;
        self.sent += o.sent;
        self.acked += o.acked;
        self.delivered += o.delivered;
        self.errors += o.errors;
        self.rate_limited += o.rate_limited;
        self.verified += o.verified;
        self.verify_missing += o.verify_missing;
    }
}

/// A worker's final report.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// Counters when the report was made.
    pub totals: Counters,
    /// Counters at `go` and at `stop`: the measurement window.
    pub at_go: Counters,
    /// See `at_go`.
    pub at_stop: Counters,
    /// Seconds between `go` and `stop` on this worker's clock.
    pub window_secs: f64,
    /// The fewest connections authenticated at any sample during the window.
    pub held_min: u64,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Loss, duplication, order.
    pub verdict: Verdict,
    /// send->Ack latency in microseconds, hdrhistogram V2 serialized.
    pub ack_hist: Vec<u8>,
    /// send->Deliver latency in microseconds, same encoding.
    pub deliver_hist: Vec<u8>,
}

/// A line from a worker.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum WorkerLine {
    /// Once a second.
    Progress(Counters),
    /// Once, at the end.
    Report(Box<Report>),
}

/// Splits `units` over `workers` by connection count, keeping each unit whole: each worker
/// takes units until it holds its share.
pub fn split(units: Vec<Unit>, workers: usize) -> Vec<Vec<Unit>> {
    let total: usize = units.iter().map(|u| u.members.len()).sum();
    let workers = workers.max(1);
    let mut out: Vec<Vec<Unit>> = vec![Vec::new(); workers];
    let mut w = 0;
    let mut taken = 0usize;
    for u in units {
        // Worker w's share ends at connection (w + 1) * total / workers.
        while w + 1 < workers && taken >= (w + 1) * total / workers {
            w += 1;
        }
        taken += u.members.len();
        out[w].push(u);
    }
    out.retain(|units| !units.is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(n: u32) -> Vec<Unit> {
        (0..n)
            .map(|p| Unit {
                conv: None,
                members: vec![2 * p, 2 * p + 1],
                senders: vec![],
            })
            .collect()
    }

    #[test]
    fn split_keeps_units_whole_and_balances_connections() {
        let parts = split(pairs(10), 3);
        assert_eq!(parts.len(), 3);
        let sizes: Vec<usize> = parts
            .iter()
            .map(|p| p.iter().map(|u| u.members.len()).sum())
            .collect();
        assert_eq!(sizes.iter().sum::<usize>(), 20);
        assert!(sizes.iter().all(|&s| (6..=8).contains(&s)), "{sizes:?}");
        let mut all: Vec<u32> = parts
            .iter()
            .flatten()
            .flat_map(|u| u.members.clone())
            .collect();
        all.sort();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn convs_shares_cover_every_conversation_once() {
        for (count, connections) in [(10u64, 3u64), (2, 5), (1_000_000, 20), (7, 7)] {
            let spec = ConvsSpec {
                count,
                connections,
                peer_base: 1 << 62,
                verify_per_connection: 0,
            };
            let mut ks: Vec<u64> = (0..connections as u32)
                .flat_map(|i| (0..spec.share(i)).map(move |j| spec.k(i, j)))
                .collect();
            ks.sort_unstable();
            assert_eq!(
                ks,
                (0..count).collect::<Vec<_>>(),
                "{count} over {connections}"
            );
        }
    }

    #[test]
    fn split_never_makes_empty_workers() {
        assert_eq!(split(pairs(2), 8).len(), 2);
        assert_eq!(split(Vec::new(), 4).len(), 0);
    }
}
