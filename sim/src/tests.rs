//! The sim's own tests: a clean sweep, determinism, and the planted driver bugs that the
//! oracle must catch.

use crate::run::{FaultCounts, FaultKind};
use crate::{run_seed, FaultSet, Planted, RunConfig};

fn config(seed: u64, planted: Option<Planted>) -> RunConfig {
    let mut cfg = RunConfig::new(seed);
    cfg.duration_secs = 20;
    cfg.planted = planted;
    cfg
}

/// The first seed in `seeds` whose run reports a violation, with it.
fn first_violation(seeds: std::ops::Range<u64>, planted: Planted) -> Option<(u64, String)> {
    first_violation_under(seeds, planted, FaultSet::All)
}

/// As [`first_violation`], with only the faults of `faults`.
fn first_violation_under(
    seeds: std::ops::Range<u64>,
    planted: Planted,
    faults: FaultSet,
) -> Option<(u64, String)> {
    seeds.into_iter().find_map(|seed| {
        let mut cfg = config(seed, Some(planted));
        cfg.faults = faults;
        let o = run_seed(&cfg);
        o.violations.first().map(|v| (seed, v.clone()))
    })
}

/// A planted bug that a fault-free run does not reveal is caught by `kind` alone, with a
/// violation starting with `what`: the kind can fail a run. Returns the seed.
fn caught_by(kind: FaultKind, planted: Planted, seeds: std::ops::Range<u64>, what: &str) -> u64 {
    caught_by_one_of(kind, planted, seeds, &[what])
}

/// As [`caught_by`], with a violation starting with one of `whats`.
fn caught_by_one_of(
    kind: FaultKind,
    planted: Planted,
    seeds: std::ops::Range<u64>,
    whats: &[&str],
) -> u64 {
    let (seed, v) = first_violation_under(seeds.clone(), planted, FaultSet::Only(kind))
        .unwrap_or_else(|| panic!("{planted:?} not caught by {} in {seeds:?}", kind.name()));
    assert!(whats.iter().any(|w| v.starts_with(w)), "seed {seed}: {v}");
    let quiet = first_violation_under(seed..seed + 1, planted, FaultSet::None);
    assert!(
        quiet.is_none(),
        "seed {seed} fails without faults too: {quiet:?}"
    );
    seed
}

/// Runs `kind` alone on `seeds`, each without a violation, until `enough` of the summed
/// counts; returns them.
fn clean_until(
    kind: FaultKind,
    seeds: std::ops::Range<u64>,
    enough: impl Fn(&FaultCounts) -> bool,
) -> FaultCounts {
    let mut counts = FaultCounts::default();
    for seed in seeds {
        let mut cfg = config(seed, None);
        cfg.faults = FaultSet::Only(kind);
        let o = run_seed(&cfg);
        assert!(o.violations.is_empty(), "seed {seed}: {:?}", o.violations);
        counts.add(&o.counts);
        if enough(&counts) {
            break;
        }
    }
    counts
}

#[test]
fn a_small_sweep_finds_no_violation() {
    for seed in 1..21 {
        let o = run_seed(&config(seed, None));
        assert!(
            o.violations.is_empty(),
            "seed {seed}: {:?} (replay: sim replay --seed {seed} --trace)",
            o.violations.first()
        );
        assert!(o.checked > 0, "seed {seed} checked nothing");
    }
}

#[test]
fn a_seed_replays_to_the_same_trace_hash() {
    let a = run_seed(&config(7, None));
    let b = run_seed(&config(7, None));
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a.events, b.events);
    let c = run_seed(&config(8, None));
    assert_ne!(a.trace_hash, c.trace_hash);
}

#[test]
fn planted_ack_before_durable_is_caught() {
    let found = first_violation(1..11, Planted::AckBeforeDurable);
    assert!(found.is_some(), "no violation in seeds 1..11");
}

#[test]
fn planted_sync_replay_skip_is_caught() {
    let found = first_violation(1..11, Planted::SyncReplaySkip);
    let (_, v) = found.expect("no violation in seeds 1..11");
    assert!(v.starts_with("I4"), "{v}");
}

#[test]
fn planted_seq_not_recovered_is_caught() {
    let found = first_violation(1..11, Planted::SeqNotRecovered);
    assert!(found.is_some(), "no violation in seeds 1..11");
}

#[test]
fn planted_dedupe_off_is_caught() {
    let found = first_violation(1..11, Planted::DedupeOff);
    let (_, v) = found.expect("no violation in seeds 1..11");
    assert!(v.starts_with("I2"), "{v}");
}

#[test]
fn one_way_partitions_lose_acks_so_dedupe_off_is_caught() {
    let _ = caught_by(FaultKind::OneWay, Planted::DedupeOff, 1..11, "I2");
}

#[test]
fn latency_spikes_time_out_requests_so_dedupe_off_is_caught() {
    let _ = caught_by(FaultKind::Spike, Planted::DedupeOff, 1..11, "I2");
}

#[test]
fn slow_readers_degrade_connections_and_still_converge() {
    let c = clean_until(FaultKind::SlowReader, 1..21, |c| {
        c.notify_seen > 0 && c.slow_closed > 0
    });
    assert!(c.notify_seen > 0, "no push turned into a Notify");
    assert!(c.slow_closed > 0, "no connection closed as a slow consumer");
}

#[test]
fn slow_readers_are_told_to_pull_so_dropping_notify_is_caught() {
    let _ = caught_by(FaultKind::SlowReader, Planted::NotifyDropped, 1..11, "I4");
}

#[test]
fn crashes_between_durable_and_ack_catch_dedupe_off_where_random_crashes_do_not() {
    let seed = caught_by(FaultKind::PointCrash, Planted::DedupeOff, 1..11, "I2");
    let random = FaultSet::Only(FaultKind::Crash);
    let v = first_violation_under(seed..seed + 1, Planted::DedupeOff, random);
    assert!(v.is_none(), "random crashes catch it too: {v:?}");
}

#[test]
fn crashes_at_chosen_points_catch_a_seq_not_recovered() {
    // The shard hands out the last recovered seq again. The log engine refuses the
    // second record of one seq before it reaches the disk (its index asserts that seqs
    // follow on), which the sim reports as the gateway host failing; or, first, an inbox
    // listing shows a latest seq older than what is durable (I9).
    let _ = caught_by_one_of(
        FaultKind::PointCrash,
        Planted::SeqNotRecovered,
        1..11,
        &["a host failed: task", "I9"],
    );
}

#[test]
fn device_crashes_need_the_outbox_restored_with_its_ids() {
    // Re-sent under new ids, a message that became durable before the crash is stored twice.
    let _ = caught_by(FaultKind::DeviceCrash, Planted::OutboxNewIds, 1..11, "I2");
    // Forgotten, a message the app wrote to its outbox before sending is never stored.
    let _ = caught_by(
        FaultKind::DeviceCrash,
        Planted::OutboxDropped,
        1..11,
        "lost",
    );
}

#[test]
fn disk_errors_need_the_log_cut_back_to_durable() {
    let _ = caught_by(FaultKind::Disk, Planted::NoTruncateOnFailure, 1..11, "I3");
}

#[test]
fn torn_writes_on_turmoil_disk_need_recovery_to_cut_the_tail() {
    let _ = caught_by(FaultKind::PointCrash, Planted::TornTailKept, 1..11, "I");
}

#[test]
fn a_full_disk_fails_writes_and_heals() {
    let c = clean_until(FaultKind::DiskFull, 1..6, |c| c.freed > 1);
    assert!(
        c.disk_full > 0 && c.freed > 0,
        "the disk never filled: {c:?}"
    );
}

#[test]
fn a_sync_counting_writes_made_after_it_started_is_caught() {
    // The engine takes a sync to cover what completed by the time it returned. The sim's
    // disk makes a sync cover only what was written before it started, so appends the
    // engine reported durable can be missing after a crash or a failed writeback.
    let (seed, v) = first_violation(1..61, Planted::SyncCoversLaterWrites)
        .expect("no violation in seeds 1..61");
    assert!(v.starts_with('I'), "seed {seed}: {v}");
    let quiet = first_violation_under(
        seed..seed + 1,
        Planted::SyncCoversLaterWrites,
        FaultSet::None,
    );
    assert!(
        quiet.is_none(),
        "seed {seed} fails without faults too: {quiet:?}"
    );
}

#[test]
fn disk_errors_need_a_failed_appends_index_entries_removed() {
    // Entries of failed appends stay in the index: a conversation loaded back from it
    // resumes after seqs that were never stored.
    let _ = caught_by(FaultKind::Disk, Planted::IndexPastDurable, 1..21, "I3");
}

#[test]
fn crashes_catch_a_checkpoint_written_ahead_of_what_it_describes() {
    // Recovery from it replays messages it already counts: the group's seqs go back.
    let _ = caught_by(
        FaultKind::Crash,
        Planted::CheckpointAheadOfDurable,
        1..41,
        "I3",
    );
}

#[test]
fn crashes_catch_an_inbox_entry_not_made_durable() {
    let _ = caught_by(FaultKind::Crash, Planted::InboxNotDurable, 1..11, "I9");
}
