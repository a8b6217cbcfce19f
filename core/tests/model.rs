//! The engine against a reference model: random sends, retries, lost acks (a connection
//! dropped before its ack), disconnects, reconnects with Sync, takeovers, crashes that
//! drop every record not yet durable, checkpoints (checked by every later recovery), and
//! history read from the log (a hot tier of one message, one read at a time) with reads
//! held, answered late or failed. After every step and at the end, I1-I5 must hold: in
//! particular no device ever skips a seq, whatever the reads did.
//!
//! A device syncs only the conversations it knows and those its inbox lists (I9): every
//! conversation with an acked message must be listed, or the device would never learn it.
//!
//! The model is deliberately simple: what each device has seen, what each sender was
//! told, and what the logs hold. Failing cases are saved in `proptest-regressions/`.

mod harness;

use bytes::Bytes;
use harness::*;
use imgate_core::log::{scan, Record};
use imgate_core::mesh::Command;
use imgate_core::proto::meta::{self, Meta};
use imgate_core::proto::{ClientMsgId, ConvId, Seq, UserId};
use imgate_core::Limits;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Devices: (user, device). Users 1..=3; user 1 and 2 have two devices.
const DEVICES: [(u64, u32); 5] = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1)];

fn convs() -> [ConvId; 3] {
    [
        ConvId::direct(UserId(1), UserId(2)),
        ConvId::direct(UserId(2), UserId(3)),
        ConvId::group(77),
    ]
}

fn is_member(conv: ConvId, user: u64) -> bool {
    match conv.kind() {
        Some(imgate_core::proto::ConvKind::Direct(a, b)) => a.0 == user || b.0 == user,
        _ => true, // the group has every user
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// A device sends a new message (if connected and a member).
    Send { dev: usize, conv: usize },
    /// A device resends one of its earlier messages with the same client_msg_id.
    Retry { dev: usize, pick: usize },
    /// Every shard's log becomes durable.
    Sync,
    /// A device's connection drops (any unacked reply is lost with it).
    Disconnect { dev: usize },
    /// A device (re)connects to a shard and syncs from its cursors.
    Connect { dev: usize, shard: u16 },
    /// Power loss on every shard.
    Crash,
    /// A shard writes a checkpoint.
    Checkpoint { shard: u16 },
    /// Log reads are held from now on (`true`), or answered at once again.
    HoldReads { on: bool },
    /// Every held log read is answered, from the log or with a failure.
    AnswerReads { ok: bool },
    /// A second passes (failed catch-ups ask again).
    Tick,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..DEVICES.len(), 0..3usize).prop_map(|(dev, conv)| Op::Send { dev, conv }),
        2 => (0..DEVICES.len(), any::<usize>()).prop_map(|(dev, pick)| Op::Retry { dev, pick }),
        4 => Just(Op::Sync),
        2 => (0..DEVICES.len()).prop_map(|dev| Op::Disconnect { dev }),
        3 => (0..DEVICES.len(), 0..3u16).prop_map(|(dev, shard)| Op::Connect { dev, shard }),
        1 => Just(Op::Crash),
        1 => (0..3u16).prop_map(|shard| Op::Checkpoint { shard }),
        1 => any::<bool>().prop_map(|on| Op::HoldReads { on }),
        3 => any::<bool>().prop_map(|ok| Op::AnswerReads { ok }),
        1 => Just(Op::Tick),
    ]
}

/// One hot message per conversation and one log read at a time, so that Syncs and
/// catch-ups read the log and wait for each other; heartbeats long enough for the ticks.
fn limits() -> Limits {
    Limits {
        hot_messages_per_conv: 1,
        fetches_inflight_max: 1,
        heartbeat_interval: Duration::from_secs(600),
        // A conversation new to a device comes from seq 1, so that the model can hold
        // every device to every seq (newest-first starts are the sim's to check).
        newest_page: 1_000_000,
        ..Limits::default()
    }
}

#[derive(Default)]
struct Device {
    conn: Option<usize>,
    /// Highest seq per conversation such that the device holds every seq up to it.
    cursor: BTreeMap<ConvId, Seq>,
    /// The last seq pushed per conversation on the current connection.
    on_conn: BTreeMap<ConvId, Seq>,
    /// Messages it sent: id, conv, payload.
    sent: Vec<(ClientMsgId, ConvId, Bytes)>,
    /// The inbox page that answered its last ListInbox.
    inbox: Option<meta::InboxPage>,
}

struct Model {
    world: World,
    devices: Vec<Device>,
    /// What senders were told: id -> (conv, seq).
    acked: BTreeMap<ClientMsgId, (ConvId, Seq)>,
    /// What devices were shown: (conv, seq) -> payload.
    shown: BTreeMap<(ConvId, Seq), Bytes>,
    next_id: u32,
    next_req: u32,
}

impl Model {
    fn new(shards: u16) -> Model {
        let mut world = World::new(shards, limits());
        world
            .command(Command::CreateGroup {
                group: ConvId::group(77),
                members: vec![UserId(1), UserId(2), UserId(3)],
            })
            .expect("group");
        world.auto_sync = false;
        world.hold_fetches = true;
        Model {
            world,
            devices: DEVICES.iter().map(|_| Device::default()).collect(),
            acked: BTreeMap::new(),
            shown: BTreeMap::new(),
            next_id: 1,
            next_req: 1,
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Send { dev, conv } => {
                let conv = convs()[conv];
                let (user, _) = DEVICES[dev];
                let Some(c) = self.devices[dev].conn else {
                    return Ok(());
                };
                if !is_member(conv, user) {
                    return Ok(());
                }
                let mut id = [0u8; 16];
                id[..4].copy_from_slice(&self.next_id.to_le_bytes());
                id[4] = dev as u8;
                self.next_id += 1;
                let id = ClientMsgId(id);
                let payload = Bytes::copy_from_slice(&id.0);
                self.devices[dev].sent.push((id, conv, payload.clone()));
                let req = self.next_req;
                self.next_req += 1;
                self.world.send_with_id(c, req, conv, id, &payload);
            }
            Op::Retry { dev, pick } => {
                let Some(c) = self.devices[dev].conn else {
                    return Ok(());
                };
                let sent = &self.devices[dev].sent;
                if sent.is_empty() {
                    return Ok(());
                }
                let (id, conv, payload) = sent[pick % sent.len()].clone();
                let req = self.next_req;
                self.next_req += 1;
                self.world.send_with_id(c, req, conv, id, &payload);
            }
            Op::Sync => self.world.sync(),
            Op::Disconnect { dev } => {
                if let Some(c) = self.devices[dev].conn.take() {
                    self.world.hang_up(c);
                }
            }
            Op::Connect { dev, shard } => {
                let shard = shard % self.world.nodes.len() as u16;
                let (user, device) = DEVICES[dev];
                // A connect while connected is a takeover: the old connection is kicked.
                let c = self.world.login(shard, user, device);
                if let Some(old) = self.devices[dev].conn.replace(c) {
                    self.collect()?;
                    prop_assert!(
                        self.world.conns[old].closed,
                        "takeover left the old connection open"
                    );
                }
                self.devices[dev].on_conn.clear();
                // The inbox first: it names what the device does not know yet.
                let req = self.next_req;
                self.next_req += 1;
                let list = meta::ListInbox {
                    req,
                    after: None,
                    limit: 0,
                };
                self.world.frame(c, Meta::ListInbox(list), &[]);
                self.collect()?;
                if self.devices[dev].conn != Some(c) {
                    return Ok(());
                }
                let Some(page) = self.devices[dev].inbox.take() else {
                    return Err(TestCaseError::fail("ListInbox got no InboxPage"));
                };
                prop_assert_eq!(page.req, req);
                prop_assert!(!page.more, "three conversations fit one page");
                let listed: BTreeSet<ConvId> = page.entries.iter().map(|e| e.conv).collect();
                for (id, (conv, _)) in &self.acked {
                    prop_assert!(
                        !is_member(*conv, user) || listed.contains(conv),
                        "I9: {:?} is acked in {} but user {}'s inbox does not list it",
                        id,
                        conv,
                        user
                    );
                }
                prop_assert!(
                    listed.iter().all(|c| is_member(*c, user)),
                    "I9: an inbox lists a conversation of another user"
                );
                let known = &self.devices[dev].cursor;
                let cursors = convs()
                    .iter()
                    .filter(|c| is_member(**c, user))
                    .filter(|c| listed.contains(c) || known.contains_key(c))
                    .map(|&conv| meta::Cursor {
                        conv,
                        seq: known.get(&conv).copied().unwrap_or_default(),
                    })
                    .collect();
                let req = self.next_req;
                self.next_req += 1;
                self.world
                    .frame(c, Meta::Sync(meta::Sync { req, cursors }), &[]);
            }
            Op::Crash => {
                self.collect()?;
                self.world.crash_all();
                for d in &mut self.devices {
                    d.conn = None;
                }
                self.check_logs()?;
            }
            Op::Checkpoint { shard } => {
                let shard = shard % self.world.nodes.len() as u16;
                self.world.checkpoint(usize::from(shard));
            }
            Op::HoldReads { on } => {
                self.world.hold_fetches = on;
                if !on {
                    self.world.answer_fetches(true);
                }
            }
            Op::AnswerReads { ok } => {
                self.world.answer_fetches(ok);
            }
            Op::Tick => self.world.advance(Duration::from_secs(1)),
        }
        self.collect()
    }

    /// Reads every device's frames and checks them against the model.
    fn collect(&mut self) -> Result<(), TestCaseError> {
        for dev in 0..self.devices.len() {
            let Some(c) = self.devices[dev].conn else {
                continue;
            };
            let frames = self.world.take(c);
            if self.world.conns[c].closed {
                self.devices[dev].conn = None;
            }
            for (meta, payload) in frames {
                match meta {
                    Meta::Ack(a) => {
                        let before = self.acked.insert(a.client_msg_id, (a.conv, a.seq));
                        // I2: one (conv, seq) per client_msg_id, across restarts too.
                        prop_assert!(
                            before.is_none_or(|b| b == (a.conv, a.seq)),
                            "I2: {:?} acked as {:?} and {:?}",
                            a.client_msg_id,
                            before,
                            (a.conv, a.seq)
                        );
                    }
                    Meta::Deliver(d) => {
                        // I5: a seq names one message, forever.
                        let shown = self.shown.entry((d.conv, d.seq)).or_insert(payload.clone());
                        prop_assert_eq!(
                            &shown[..],
                            &payload[..],
                            "I5: {} seq {} named two messages",
                            d.conv,
                            d.seq
                        );
                        let device = &mut self.devices[dev];
                        // I4: on a connection, a conversation's seqs come in order, no gaps.
                        if let Some(last) = device.on_conn.get(&d.conv) {
                            prop_assert_eq!(d.seq, last.next(), "I4: out of order on a connection");
                        } else {
                            let cursor = device.cursor.get(&d.conv).copied().unwrap_or_default();
                            prop_assert!(
                                d.seq <= cursor.next(),
                                "I4: {} skipped from {} to {}",
                                d.conv,
                                cursor,
                                d.seq
                            );
                        }
                        device.on_conn.insert(d.conv, d.seq);
                        let cursor = device.cursor.entry(d.conv).or_default();
                        if d.seq == cursor.next() {
                            *cursor = d.seq;
                        }
                    }
                    Meta::Error(e) => {
                        prop_assert_eq!(
                            e.code,
                            imgate_core::proto::ErrorCode::SessionTakenOver,
                            "unexpected error {:?}",
                            e
                        );
                    }
                    Meta::Nack(n) => prop_assert!(false, "unexpected nack {:?}", n),
                    Meta::InboxPage(p) => self.devices[dev].inbox = Some(p),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// I1 and I3 on what the logs hold.
    fn check_logs(&self) -> Result<(), TestCaseError> {
        let mut by_conv: BTreeMap<ConvId, Vec<Seq>> = BTreeMap::new();
        let mut stored: BTreeMap<(ConvId, Seq), ClientMsgId> = BTreeMap::new();
        let mut ids = BTreeSet::new();
        for node in &self.world.nodes {
            for (_, r) in scan(node.log.bytes()).records {
                if let Record::Message(m) = r {
                    by_conv.entry(m.conv).or_default().push(m.seq);
                    stored.insert((m.conv, m.seq), m.client_msg_id);
                    prop_assert!(
                        ids.insert(m.client_msg_id),
                        "I2: {:?} stored twice",
                        m.client_msg_id
                    );
                }
            }
        }
        for (conv, seqs) in &by_conv {
            let expected: Vec<Seq> = (1..=seqs.len() as u64).map(Seq).collect();
            prop_assert_eq!(seqs, &expected, "I3: {} has gaps or repeats", conv);
        }
        for (id, (conv, seq)) in &self.acked {
            prop_assert_eq!(
                stored.get(&(*conv, *seq)),
                Some(id),
                "I1: acked {:?} lost",
                id
            );
        }
        for (conv, seq) in self.shown.keys() {
            prop_assert!(
                stored.contains_key(&(*conv, *seq)),
                "I5: shown {} {} not durable",
                conv,
                seq
            );
        }
        Ok(())
    }

    /// Heal: everything durable, every device connected and synced; then every device
    /// holds every seq of its conversations.
    fn heal(&mut self) -> Result<(), TestCaseError> {
        self.apply(&Op::HoldReads { on: false })?;
        // Inbox entries first, then the messages that waited for them.
        self.world.sync();
        self.world.sync();
        for dev in 0..self.devices.len() {
            self.apply(&Op::Connect {
                dev,
                shard: dev as u16,
            })?;
        }
        self.world.sync();
        self.collect()?;
        self.check_logs()?;
        let mut latest: BTreeMap<ConvId, Seq> = BTreeMap::new();
        for (conv, seq) in self.shown.keys() {
            let e = latest.entry(*conv).or_default();
            *e = (*e).max(*seq);
        }
        for node in &self.world.nodes {
            for (_, r) in scan(node.log.bytes()).records {
                if let Record::Message(m) = r {
                    let e = latest.entry(m.conv).or_default();
                    *e = (*e).max(m.seq);
                }
            }
        }
        for (dev, device) in self.devices.iter().enumerate() {
            for (conv, last) in &latest {
                if is_member(*conv, DEVICES[dev].0) {
                    let has = device.cursor.get(conv).copied().unwrap_or_default();
                    prop_assert_eq!(
                        has,
                        *last,
                        "I4: device {} misses {} up to {}",
                        dev,
                        conv,
                        last
                    );
                }
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_under_random_sends_retries_disconnects_takeovers_and_crashes(
        shards in 1u16..=3,
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let mut model = Model::new(shards);
        for op in &ops {
            model.apply(op)?;
        }
        model.heal()?;
    }
}
