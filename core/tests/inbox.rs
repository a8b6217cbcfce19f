//! The inbox (I9), server timestamps and newest-first history, on shards driven by the
//! harness: what a device that was offline learns on its next connection, durably.

mod harness;

use harness::*;
use imgate_core::mesh::Command;
use imgate_core::proto::meta::{self, InboxEntry, Meta};
use imgate_core::proto::{ConvId, ErrorCode, Seq, UserId};
use imgate_core::Limits;

/// Lists `c`'s inbox page after `after`; returns the page.
fn list(w: &mut World, c: usize, req: u32, after: Option<ConvId>) -> meta::InboxPage {
    let list = meta::ListInbox {
        req,
        after,
        limit: 0,
    };
    w.frame(c, Meta::ListInbox(list), &[]);
    let frames = w.take(c);
    let pages: Vec<_> = frames
        .into_iter()
        .filter_map(|(m, _)| match m {
            Meta::InboxPage(p) => Some(p),
            _ => None,
        })
        .collect();
    let [page] = &pages[..] else {
        panic!("one InboxPage answers ListInbox {req}, got {pages:?}");
    };
    assert_eq!(page.req, req);
    page.clone()
}

fn entry(conv: ConvId, latest: u64, ts: u64, read: u64) -> InboxEntry {
    InboxEntry {
        conv,
        latest_seq: Seq(latest),
        latest_ts_ms: ts,
        read_seq: Seq(read),
        unread: latest - read,
    }
}

fn set_wall_clock(w: &mut World, unix_ms: u64) {
    for node in &mut w.nodes {
        node.shard.handle_wall_clock(unix_ms);
    }
}

#[test]
fn an_offline_user_learns_a_new_conversation_from_its_inbox_across_a_restart() {
    // Four shards: alice's home, bob's home and the conversation's owner are spread.
    let mut w = World::new(4, Limits::default());
    set_wall_clock(&mut w, 5_000);
    let alice = w.login(0, 1, 1);
    let ab = ConvId::direct(UserId(1), UserId(2));
    w.send(alice, 1, ab, b"hello bob");
    set_wall_clock(&mut w, 6_000);
    w.send(alice, 2, ab, b"are you there?");
    assert_eq!(acks(&w.take(alice)).len(), 2);
    w.crash_all();
    set_wall_clock(&mut w, 7_000);
    // Bob was never connected: his inbox names the conversation, with its latest message.
    let bob = w.login(3, 2, 1);
    let page = list(&mut w, bob, 1, None);
    assert_eq!(page.entries, vec![entry(ab, 2, 6_000, 0)]);
    assert!(!page.more);
    // Alice's lists it too: her first message made it hers.
    let alice = w.login(1, 1, 2);
    assert_eq!(
        list(&mut w, alice, 1, None).entries,
        vec![entry(ab, 2, 6_000, 0)]
    );
    // And bob gets the messages by syncing from the page's start.
    w.sync_from(bob, 2, ab, Seq::ZERO);
    let got: Vec<u64> = delivers(&w.take(bob)).iter().map(|d| d.1 .0).collect();
    assert_eq!(got, vec![1, 2]);
}

#[test]
fn the_first_message_waits_for_the_inboxes_and_fails_if_they_cannot_be_made_durable() {
    let mut w = World::new(1, Limits::default());
    w.auto_sync = false;
    let alice = w.login(0, 1, 1);
    let ab = ConvId::direct(UserId(1), UserId(2));
    w.send(alice, 1, ab, b"first");
    assert!(
        w.stored().is_empty(),
        "nothing sequenced before the inboxes are durable"
    );
    assert!(
        w.nodes[0].appended.is_some(),
        "the inbox entries were appended"
    );
    // The home's log fails: the entries are not durable, so neither is the message.
    let node = &mut w.nodes[0];
    node.log.crash();
    node.appended = None;
    node.shard.handle_log_failed(w.now);
    w.run();
    let frames = w.take(alice);
    assert!(frames.iter().any(
        |(m, _)| matches!(m, Meta::Nack(n) if n.req == 1 && n.code == ErrorCode::StorageFailed)
    ));
    assert!(w.stored().is_empty());
    assert!(list(&mut w, alice, 2, None).entries.is_empty());
    // The retry joins again and is stored.
    w.auto_sync = true;
    w.send(alice, 3, ab, b"first");
    assert_eq!(acks(&w.take(alice)), vec![(3, Seq(1))]);
    assert_eq!(list(&mut w, alice, 4, None).entries.len(), 1);
}

#[test]
fn a_full_inbox_refuses_a_new_conversation_and_keeps_the_ones_it_has() {
    let limits = Limits {
        inbox_entries_per_user_max: 1,
        ..Limits::default()
    };
    let mut w = World::new(2, limits);
    let alice = w.login(0, 1, 1);
    let carol = w.login(1, 3, 1);
    let ab = ConvId::direct(UserId(1), UserId(2));
    let cb = ConvId::direct(UserId(2), UserId(3));
    w.send(alice, 1, ab, b"to bob");
    assert_eq!(acks(&w.take(alice)), vec![(1, Seq(1))]);
    w.send(carol, 1, cb, b"to bob as well");
    let frames = w.take(carol);
    assert!(frames
        .iter()
        .any(|(m, _)| matches!(m, Meta::Nack(n) if n.req == 1 && n.code == ErrorCode::InboxFull)));
    assert_eq!(w.stored().len(), 1);
    w.send(alice, 2, ab, b"still fine");
    assert_eq!(acks(&w.take(alice)), vec![(2, Seq(2))]);
    let bob = w.login(0, 2, 1);
    assert_eq!(list(&mut w, bob, 1, None).entries.len(), 1);
}

#[test]
fn group_members_find_the_group_and_lose_it_when_removed_across_a_restart() {
    let mut w = World::new(3, Limits::default());
    let group = ConvId::group(9);
    let members = (1..=4).map(UserId).collect();
    w.command(Command::CreateGroup { group, members }).unwrap();
    let alice = w.login(0, 1, 1);
    w.send(alice, 1, group, b"hi all");
    w.command(Command::RemoveMembers {
        group,
        members: vec![UserId(3)],
    })
    .unwrap();
    w.crash_all();
    let dave = w.login(2, 4, 1);
    assert_eq!(list(&mut w, dave, 1, None).entries.len(), 1);
    let carol = w.login(1, 3, 1);
    assert!(
        list(&mut w, carol, 1, None).entries.is_empty(),
        "a removed member's inbox no longer lists the group"
    );
    // Added back, it is listed again, from its latest message on.
    w.command(Command::AddMembers {
        group,
        members: vec![UserId(3)],
    })
    .unwrap();
    let entries = list(&mut w, carol, 2, None).entries;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].latest_seq, Seq(1));
}

#[test]
fn pages_walk_a_large_inbox_and_checkpoints_keep_it() {
    let limits = Limits {
        inbox_page_max: 3,
        ..Limits::default()
    };
    let mut w = World::new(1, limits);
    let bob = w.login(0, 2, 1);
    for other in 3..=9 {
        let conv = ConvId::direct(UserId(2), UserId(other));
        w.send(bob, other as u32, conv, b"x");
    }
    w.checkpoint(0);
    w.send(
        bob,
        10,
        ConvId::direct(UserId(2), UserId(10)),
        b"after the checkpoint",
    );
    // Recovery from the checkpoint: the inbox is the checkpoint's plus what followed.
    let records = w.records(0);
    let at = records
        .iter()
        .position(|r| matches!(r.checkpoint_part(), Some((0, _))))
        .expect("a checkpoint");
    w.restart_from(0, records[at..].to_vec()).unwrap();
    let bob = w.login(0, 2, 1);
    let mut seen = Vec::new();
    let mut after = None;
    for req in 1.. {
        let page = list(&mut w, bob, req, after);
        assert!(page.entries.len() <= 3);
        seen.extend(page.entries.iter().map(|e| e.conv));
        after = page.entries.last().map(|e| e.conv);
        if !page.more {
            break;
        }
    }
    let want: Vec<ConvId> = (3..=10)
        .map(|o| ConvId::direct(UserId(2), UserId(o)))
        .collect();
    assert_eq!(seen, want);
}

#[test]
fn timestamps_never_go_back_within_a_conversation_when_the_clock_does() {
    let mut w = World::new(2, Limits::default());
    let alice = w.login(0, 1, 1);
    let bob = w.login(1, 2, 1);
    let ab = ConvId::direct(UserId(1), UserId(2));
    let mut stamps = Vec::new();
    for (req, wall) in [(1, 10_000), (2, 4_000), (3, 12_000)] {
        set_wall_clock(&mut w, wall);
        w.send(alice, req, ab, b"tick");
        for (m, _) in w.take(bob) {
            if let Meta::Deliver(d) = m {
                stamps.push(d.ts_ms);
            }
        }
    }
    assert_eq!(stamps, vec![10_000, 10_000, 12_000]);
    // After a restart the clock floor comes back from the log.
    w.crash_all();
    set_wall_clock(&mut w, 1_000);
    let alice = w.login(0, 1, 1);
    let bob = w.login(1, 2, 1);
    w.send(alice, 4, ab, b"after the restart");
    let ts: Vec<u64> = w
        .take(bob)
        .into_iter()
        .filter_map(|(m, _)| match m {
            Meta::Deliver(d) => Some(d.ts_ms),
            _ => None,
        })
        .collect();
    // Bob's new connection gets the conversation's latest page: all four.
    assert_eq!(ts.len(), 4);
    assert_eq!(
        &ts[..3],
        &[10_000, 10_000, 12_000],
        "stamps come back from the log"
    );
    assert!(ts[3] >= 12_000, "stamp {} went back", ts[3]);
}

#[test]
fn a_device_new_to_a_long_conversation_gets_its_latest_page_and_pages_back() {
    let limits = Limits {
        newest_page: 20,
        ..Limits::default()
    };
    let mut w = World::new(2, limits);
    let alice = w.login(0, 1, 1);
    let ab = ConvId::direct(UserId(1), UserId(2));
    for req in 1..=300 {
        w.send(alice, req, ab, format!("m{req}").as_bytes());
    }
    w.take(alice);
    // Bob's device connects without a cursor for it; the next message brings the page.
    let bob = w.login(1, 2, 1);
    w.send(alice, 301, ab, b"m301");
    let got: Vec<u64> = delivers(&w.take(bob)).iter().map(|d| d.1 .0).collect();
    assert_eq!(
        got,
        (282..=301).collect::<Vec<_>>(),
        "the newest 20, not the oldest"
    );
    // Older history backwards: the 30 before seq 282, in ascending order.
    let pull = meta::Pull {
        req: 7,
        conv: ab,
        from_seq: Seq(281),
        limit: 30,
        backward: true,
    };
    w.frame(bob, Meta::Pull(pull), &[]);
    let frames = w.take(bob);
    let got: Vec<u64> = delivers(&frames).iter().map(|d| d.1 .0).collect();
    assert_eq!(got, (252..=281).collect::<Vec<_>>());
    assert!(frames.iter().any(|(m, _)| matches!(
        m,
        Meta::PullResult(r) if r.req == 7 && r.from_seq == Seq(252) && r.to_seq == Seq(281)
    )));
    // A backward Pull must end somewhere.
    let pull = meta::Pull {
        req: 8,
        conv: ab,
        from_seq: Seq::ZERO,
        limit: 30,
        backward: true,
    };
    w.frame(bob, Meta::Pull(pull), &[]);
    assert_eq!(error_code(&w.take(bob)), Some(ErrorCode::BadRequest));
}

#[test]
fn members_with_no_device_connected_are_named_for_an_offline_push() {
    let mut w = World::new(3, Limits::default());
    for node in &mut w.nodes {
        node.shard.set_offline_push(true);
    }
    let group = ConvId::group(5);
    let members = (1..=4).map(UserId).collect();
    w.command(Command::CreateGroup { group, members }).unwrap();
    let alice = w.login(0, 1, 1);
    let _bob = w.login(1, 2, 1);
    w.send(alice, 1, group, b"who is around?");
    let mut named: Vec<_> = w.offline.drain(..).collect();
    named.sort();
    assert_eq!(
        named,
        vec![
            (UserId(3), group, Seq(1), UserId(1)),
            (UserId(4), group, Seq(1), UserId(1)),
        ],
        "the offline members only, once each; never the sender"
    );
    // A device of user 3 connects: only user 4 is named for the next message.
    let _carol = w.login(2, 3, 1);
    w.send(alice, 2, group, b"carol is here");
    assert_eq!(w.offline, vec![(UserId(4), group, Seq(2), UserId(1))]);
}
