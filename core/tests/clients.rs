//! Client engines against shard engines, on fake time in one thread: the two halves of
//! the protocol as loadgen and the gateway will run them, with no socket in between.

mod harness;

use bytes::Bytes;
use harness::*;
use imgate_core::client::{Client, ClientConfig, ClientEvent, Priority};
use imgate_core::proto::{ConvId, Seq, UserId};
use imgate_core::Limits;
use std::collections::BTreeMap;
use std::time::Duration;

/// A client engine and the world connection it rides, if any.
struct Device {
    client: Client,
    conn: Option<usize>,
    events: Vec<ClientEvent>,
}

struct Fleet {
    world: World,
    devices: Vec<Device>,
}

impl Fleet {
    fn new(shards: u16) -> Fleet {
        Fleet {
            world: World::new(shards, Limits::default()),
            devices: Vec::new(),
        }
    }

    fn add(&mut self, user: u64, device: u32) -> usize {
        let config = ClientConfig {
            token: self.world.token(user, device),
            device: imgate_core::proto::DeviceId(device),
            seed: user * 1000 + u64::from(device),
            ..ClientConfig::default()
        };
        self.devices.push(Device {
            client: Client::new(config, BTreeMap::new()),
            conn: None,
            events: Vec::new(),
        });
        self.devices.len() - 1
    }

    fn connect(&mut self, d: usize, shard: u16) {
        let c = self.world.open(shard);
        self.world.conns[c].raw = true;
        self.devices[d].conn = Some(c);
        self.devices[d].client.handle_connected(self.world.now);
        self.pump();
    }

    fn disconnect(&mut self, d: usize) {
        if let Some(c) = self.devices[d].conn.take() {
            self.world.hang_up(c);
        }
        self.devices[d].client.handle_disconnected(self.world.now);
        self.pump();
    }

    fn send(&mut self, d: usize, conv: ConvId, text: &str) {
        let now = self.world.now;
        self.devices[d]
            .client
            .send(now, conv, Bytes::from(text.to_owned()), Priority::Normal)
            .expect("send accepted");
        self.pump();
    }

    /// Moves bytes both ways until nothing moves.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            for d in 0..self.devices.len() {
                let now = self.world.now;
                let dev = &mut self.devices[d];
                while let Some(bytes) = dev.client.poll_transmit() {
                    if let Some(c) = dev.conn.filter(|&c| !self.world.conns[c].closed) {
                        self.world.write(c, &bytes);
                        moved = true;
                    }
                }
                if let Some(c) = dev.conn {
                    let conn = &mut self.world.conns[c];
                    if !conn.rx.is_empty() {
                        dev.client.handle_bytes(now, &mut conn.rx);
                        moved = true;
                    }
                    if conn.closed && conn.rx.is_empty() {
                        dev.conn = None;
                        dev.client.handle_disconnected(now);
                        moved = true;
                    }
                }
                while let Some(e) = dev.client.poll_event() {
                    dev.events.push(e);
                }
            }
            if !moved {
                break;
            }
        }
    }

    /// The messages shown to device `d`: (conv, seq, text).
    fn shown(&self, d: usize) -> Vec<(ConvId, u64, String)> {
        self.devices[d]
            .events
            .iter()
            .filter_map(|e| match e {
                ClientEvent::Message {
                    conv, seq, payload, ..
                } => Some((*conv, seq.0, String::from_utf8_lossy(payload).into_owned())),
                _ => None,
            })
            .collect()
    }

    fn acked(&self, d: usize) -> Vec<u64> {
        self.devices[d]
            .events
            .iter()
            .filter_map(|e| match e {
                ClientEvent::Acked { seq, .. } => Some(seq.0),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn two_clients_on_different_shards_chat_through_the_engines() {
    let mut f = Fleet::new(2);
    let alice = f.add(1, 1);
    let bob = f.add(2, 1);
    f.connect(alice, 0);
    f.connect(bob, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    f.send(alice, conv, "hi bob");
    f.send(bob, conv, "hi alice");
    f.send(alice, conv, "how are you");
    assert_eq!(f.acked(alice), vec![1, 3]);
    assert_eq!(f.acked(bob), vec![2]);
    assert_eq!(
        f.shown(bob),
        vec![(conv, 1, "hi bob".into()), (conv, 3, "how are you".into())]
    );
    assert_eq!(f.shown(alice), vec![(conv, 2, "hi alice".into())]);
    assert_eq!(f.devices[bob].client.cursors()[&conv], Seq(3));
    assert_eq!(f.devices[alice].client.cursors()[&conv], Seq(3));
    // The echo of alice's own messages was deduped by her engine, not shown twice.
    assert_eq!(f.devices[alice].client.stats().duplicates_dropped, 2);
}

#[test]
fn a_client_that_reconnects_gets_what_it_missed_once_and_its_unacked_send_goes_through() {
    let mut f = Fleet::new(3);
    let alice = f.add(1, 1);
    let bob = f.add(2, 1);
    f.connect(alice, 0);
    f.connect(bob, 1);
    let conv = ConvId::direct(UserId(1), UserId(2));
    f.send(alice, conv, "one");
    f.disconnect(bob);
    f.send(alice, conv, "two");
    f.send(alice, conv, "three");
    // Bob writes while offline: the engine keeps it in its outbox.
    f.send(bob, conv, "written offline");
    f.world.advance(Duration::from_secs(1));
    f.connect(bob, 2);
    assert_eq!(
        f.shown(bob)
            .iter()
            .map(|(_, s, t)| (*s, t.as_str()))
            .collect::<Vec<_>>(),
        vec![(1, "one"), (2, "two"), (3, "three")]
    );
    assert_eq!(f.acked(bob), vec![4]);
    assert_eq!(f.shown(alice), vec![(conv, 4, "written offline".into())]);
}

#[test]
fn a_retry_after_a_crash_gets_the_original_seq() {
    let mut f = Fleet::new(2);
    let alice = f.add(1, 1);
    f.connect(alice, 0);
    let conv = ConvId::direct(UserId(1), UserId(2));
    f.world.auto_sync = false;
    f.send(alice, conv, "durable but unacked");
    // The record reaches disk, but the gateway dies before the Ack leaves.
    for node in &mut f.world.nodes {
        node.log.sync();
        node.appended = None;
    }
    f.world.crash_all();
    f.world.auto_sync = true;
    f.pump();
    assert!(f.acked(alice).is_empty());
    f.world.advance(Duration::from_secs(1));
    f.connect(alice, 1);
    assert_eq!(f.acked(alice), vec![1], "the resend was deduped to seq 1");
    assert_eq!(f.world.stored().len(), 1);
}
