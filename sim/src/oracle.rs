//! The oracle: what the drivers saw, checked against I1-I5 and liveness as it happens and
//! again at the end of a run.
//!
//! It keeps every message record that ever became durable (`durable`), every Ack a client
//! saw, and per device what was shown. Invariants it checks:
//! - I1: an Ack names a durable record of that sender's message; after every restart and at
//!   the end, every acked message is in the recovered log.
//! - I2: one (conv, seq) per (sender, client_msg_id), in the log and in Acks.
//! - I3: per conversation durable seqs come as 1, 2, 3, ... and never go back across restarts.
//! - I4: per device and conversation, messages shown in increasing seq order, each once, and
//!   after the heal every seq of every conversation of the device's user.
//! - I5: a Message shown only for a durable (conv, seq), with that record's payload; a
//!   (conv, seq) never names two messages.
//! - I2 as the user sees it: every payload the devices make is unique, so one payload in two
//!   durable records is a message stored twice (an app that re-sent it under a new id).
//! - I9: an inbox listing a device gets after logging in names every conversation of its
//!   user that had a durable message when it logged in, each with a latest seq no older
//!   than that and no newer than what is durable; after the heal every device has shown
//!   every conversation of its user that has a message, from where it started (newest
//!   first) to its last seq.
//! - Server timestamps never decrease along a conversation's seqs.
//!
//! A device that crashes shows again what it showed after its last commit: the oracle's view
//! of it is rolled back to that commit ([`Oracle::device_view`], [`Oracle::restore_device_view`]).

use bytes::Bytes;
use imgate_core::log::{Record, StoredMessage};
use imgate_core::proto::{ClientMsgId, ConvId, Seq, UserId};
use std::collections::{BTreeMap, BTreeSet};

/// A durable message as the oracle remembers it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Durable {
    sender: UserId,
    client_msg_id: ClientMsgId,
    payload: Bytes,
    ts_ms: u64,
}

/// What one device has shown: per conversation the seqs, and the last seq of a Message.
#[derive(Clone, Debug, Default)]
pub struct DeviceView {
    shown: Vec<(ConvId, BTreeSet<Seq>)>,
    last_message: Vec<(ConvId, Seq)>,
}

/// What the oracle knows. One per run.
#[derive(Debug, Default)]
pub struct Oracle {
    durable: BTreeMap<(ConvId, Seq), Durable>,
    by_id: BTreeMap<(UserId, ClientMsgId), (ConvId, Seq)>,
    last_seq: BTreeMap<ConvId, Seq>,
    acked: BTreeMap<(UserId, ClientMsgId), (ConvId, Seq)>,
    /// Per device index and conversation, the seqs shown (Message) or acked as its own.
    shown: BTreeMap<(usize, ConvId), BTreeSet<Seq>>,
    /// Per device index and conversation, the last seq of a Message event.
    last_message: BTreeMap<(usize, ConvId), Seq>,
    /// Every durable payload and the (conv, seq) that holds it.
    payloads: BTreeMap<Bytes, (ConvId, Seq)>,
    /// Per device, the inbox listing under way since its last login: what must be in it
    /// (conversation -> durable last seq at login) and what was listed so far.
    listings: BTreeMap<usize, (BTreeMap<ConvId, Seq>, BTreeSet<ConvId>)>,
    /// Inbox listings checked whole.
    pub listings_checked: u64,
    /// Violations, first first.
    pub violations: Vec<String>,
}

impl Oracle {
    fn violate(&mut self, what: String) {
        self.violations.push(what);
    }

    /// Records that became durable on a shard's log, in log order.
    pub fn handle_durable(&mut self, records: &[StoredMessage]) {
        for m in records {
            let d = Durable {
                sender: m.sender,
                client_msg_id: m.client_msg_id,
                payload: m.payload.clone(),
                ts_ms: m.ts_ms,
            };
            match self.durable.get(&(m.conv, m.seq)) {
                Some(old) if *old == d => continue,
                Some(old) => {
                    let v = format!(
                        "I3/I5: {} seq {} names two messages: {:?} then {:?} (seq reused)",
                        m.conv, m.seq.0, old.client_msg_id, d.client_msg_id
                    );
                    self.violate(v);
                    continue;
                }
                None => {}
            }
            let last = self.last_seq.get(&m.conv).copied().unwrap_or(Seq(0));
            if m.seq.0 != last.0 + 1 {
                let v = format!(
                    "I3: {} durable seq {} follows {} (gap or repeat)",
                    m.conv, m.seq.0, last.0
                );
                self.violate(v);
            }
            if let Some(before) = self.durable.get(&(m.conv, Seq(m.seq.0.wrapping_sub(1)))) {
                if before.ts_ms > m.ts_ms {
                    let v = format!(
                        "timestamps: {} seq {} stamped {} after seq {} stamped {}",
                        m.conv,
                        m.seq.0,
                        m.ts_ms,
                        m.seq.0 - 1,
                        before.ts_ms
                    );
                    self.violate(v);
                }
            }
            self.last_seq.insert(m.conv, Seq(last.0.max(m.seq.0)));
            if let Some(&(c, s)) = self.payloads.get(&m.payload) {
                let v = format!(
                    "I2: one message stored twice, as ({c}, {}) and as ({}, {}) under another id",
                    s.0, m.conv, m.seq.0
                );
                self.violate(v);
            }
            self.payloads.insert(m.payload.clone(), (m.conv, m.seq));
            if let Some(&(c, s)) = self.by_id.get(&(m.sender, m.client_msg_id)) {
                let v = format!(
                    "I2: {:?} of user {} stored twice: ({}, {}) and ({}, {})",
                    m.client_msg_id, m.sender.0, c, s.0, m.conv, m.seq.0
                );
                self.violate(v);
            } else {
                self.by_id
                    .insert((m.sender, m.client_msg_id), (m.conv, m.seq));
            }
            self.durable.insert((m.conv, m.seq), d);
        }
    }

    /// A client saw an Ack for its own message.
    pub fn handle_acked(
        &mut self,
        device: usize,
        user: UserId,
        id: ClientMsgId,
        conv: ConvId,
        seq: Seq,
    ) {
        match self.durable.get(&(conv, seq)) {
            Some(d) if d.sender == user && d.client_msg_id == id => {}
            Some(_) => self.violate(format!(
                "I1/I2: ack of {id:?} names ({conv}, {}) which holds another message",
                seq.0
            )),
            None => self.violate(format!(
                "I1: ack of {id:?} as ({conv}, {}) before it was durable",
                seq.0
            )),
        }
        if let Some(&(c, s)) = self.acked.get(&(user, id)) {
            if (c, s) != (conv, seq) {
                self.violate(format!(
                    "I2: {id:?} acked as ({c}, {}) and as ({conv}, {})",
                    s.0, seq.0
                ));
            }
        }
        self.acked.insert((user, id), (conv, seq));
        if !self.shown.entry((device, conv)).or_default().insert(seq) {
            self.violate(format!(
                "I4: device {device} shown ({conv}, {}) twice (ack)",
                seq.0
            ));
        }
    }

    /// A client engine emitted a Message event.
    pub fn handle_message(
        &mut self,
        device: usize,
        conv: ConvId,
        seq: Seq,
        id: ClientMsgId,
        payload: &Bytes,
    ) {
        match self.durable.get(&(conv, seq)) {
            Some(d) if d.client_msg_id == id && d.payload == *payload => {}
            Some(_) => self.violate(format!(
                "I5: device {device} shown ({conv}, {}) with another message than the log's",
                seq.0
            )),
            None => self.violate(format!(
                "I5: device {device} shown ({conv}, {}) before it was durable",
                seq.0
            )),
        }
        let last = self.last_message.insert((device, conv), seq);
        if let Some(last) = last {
            if seq <= last {
                self.violate(format!(
                    "I4: device {device} shown ({conv}, {}) after {}",
                    seq.0, last.0
                ));
            }
        }
        if !self.shown.entry((device, conv)).or_default().insert(seq) {
            self.violate(format!(
                "I4: device {device} shown ({conv}, {}) twice",
                seq.0
            ));
        }
    }

    /// A shard recovered from `records` (after truncation): I1 and I3 across the restart.
    pub fn check_recovered(
        &mut self,
        shard: u16,
        owned: impl Fn(ConvId) -> bool,
        records: &[Record],
    ) {
        let mut present: BTreeSet<(ConvId, Seq)> = BTreeSet::new();
        let mut last: BTreeMap<ConvId, Seq> = BTreeMap::new();
        for r in records {
            if let Record::Message(m) = r {
                present.insert((m.conv, m.seq));
                let l = last.entry(m.conv).or_insert(Seq(0));
                if m.seq.0 != l.0 + 1 {
                    let v = format!(
                        "I3: shard {shard} recovered {} seq {} after {}",
                        m.conv, m.seq.0, l.0
                    );
                    self.violate(v);
                }
                *l = m.seq;
            }
        }
        let lost: Vec<String> = self
            .acked
            .iter()
            .filter(|(_, &(c, s))| owned(c) && !present.contains(&(c, s)))
            .map(|(&(u, id), &(c, s))| format!("user {} {id:?} acked as ({c}, {})", u.0, s.0))
            .collect();
        if let Some(first) = lost.first() {
            let v = format!(
                "I1: shard {shard} restarted without {} acked message(s), first: {first}",
                lost.len()
            );
            self.violate(v);
        }
        let back: Vec<String> = self
            .last_seq
            .iter()
            .filter(|(&c, &s)| owned(c) && last.get(&c).copied().unwrap_or(Seq(0)) < s)
            .map(|(c, s)| format!("{c} was at {} before", s.0))
            .collect();
        if let Some(first) = back.first() {
            let v = format!("I3: shard {shard} went back after restart: {first}");
            self.violate(v);
        }
    }

    /// After the heal: device `device` of a user in `convs` has seen all of each, `1..=n`.
    pub fn check_complete(&mut self, device: usize, convs: &[ConvId]) -> u64 {
        let mut checked = 0;
        for &conv in convs {
            let n = self.last_seq.get(&conv).copied().unwrap_or(Seq(0)).0;
            let shown = self.shown.get(&(device, conv)).cloned().unwrap_or_default();
            let Some(&Seq(start)) = shown.first() else {
                if n > 0 {
                    let v = format!(
                        "I9: after the heal device {device} never learned {conv} (latest seq {n})"
                    );
                    self.violate(v);
                }
                continue;
            };
            // A device new to a conversation starts at its latest page (newest first);
            // from there on it has every seq.
            let missing: Vec<u64> = (start..=n).filter(|s| !shown.contains(&Seq(*s))).collect();
            if let Some(first) = missing.first() {
                let v = format!(
                    "I4: after the heal device {device} misses {} of {conv} ({start}..={n}), first seq {first}",
                    missing.len()
                );
                self.violate(v);
            }
            checked += n + 1 - start;
        }
        checked
    }

    /// Device `device` of a user in `convs` logged in: the inbox it lists next must name
    /// every conversation that has a durable message now.
    pub fn handle_authenticated(&mut self, device: usize, convs: &[ConvId]) {
        let expect = convs
            .iter()
            .filter_map(|c| self.last_seq.get(c).map(|&s| (*c, s)))
            .filter(|(_, s)| s.0 > 0)
            .collect();
        self.listings.insert(device, (expect, BTreeSet::new()));
    }

    /// A page of device `device`'s inbox listing; `convs` are its user's conversations.
    pub fn handle_inbox(
        &mut self,
        device: usize,
        convs: &[ConvId],
        entries: &[(ConvId, Seq)],
        more: bool,
    ) {
        let Some((expect, mut listed)) = self.listings.remove(&device) else {
            return;
        };
        for &(conv, latest) in entries {
            if !convs.contains(&conv) {
                let v = format!("I9: dev{device}'s inbox lists {conv}, not its user's");
                self.violate(v);
                continue;
            }
            let durable = self.last_seq.get(&conv).copied().unwrap_or(Seq(0));
            let at_login = expect.get(&conv).copied().unwrap_or(Seq(0));
            if latest < at_login || latest > durable {
                let v = format!(
                    "I9: dev{device}'s inbox lists {conv} at seq {}, durable was {} at login and is {} now",
                    latest.0, at_login.0, durable.0
                );
                self.violate(v);
            }
            listed.insert(conv);
        }
        if more {
            self.listings.insert(device, (expect, listed));
            return;
        }
        self.listings_checked += 1;
        if let Some((conv, seq)) = expect.iter().find(|(c, _)| !listed.contains(c)) {
            let v = format!(
                "I9: dev{device}'s inbox does not list {conv}, which had seq {} durable when it logged in",
                seq.0
            );
            self.violate(v);
        }
    }

    /// What device `device` has shown so far.
    pub fn device_view(&self, device: usize) -> DeviceView {
        let range = (device, ConvId { hi: 0, lo: 0 })..(device + 1, ConvId { hi: 0, lo: 0 });
        DeviceView {
            shown: self
                .shown
                .range(range.clone())
                .map(|(k, v)| (k.1, v.clone()))
                .collect(),
            last_message: self
                .last_message
                .range(range)
                .map(|(k, v)| (k.1, *v))
                .collect(),
        }
    }

    /// Device `device` restarted from a commit that had shown `view`.
    pub fn restore_device_view(&mut self, device: usize, view: &DeviceView) {
        self.shown.retain(|k, _| k.0 != device);
        self.last_message.retain(|k, _| k.0 != device);
        for (conv, seqs) in &view.shown {
            self.shown.insert((device, *conv), seqs.clone());
        }
        for (conv, seq) in &view.last_message {
            self.last_message.insert((device, *conv), *seq);
        }
    }

    /// Whether a durable message carries `payload`.
    pub fn is_stored(&self, payload: &Bytes) -> bool {
        self.payloads.contains_key(payload)
    }

    /// Durable messages known.
    pub fn durable_count(&self) -> usize {
        self.durable.len()
    }
}
