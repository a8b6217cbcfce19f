//! `sim`: deterministic fault simulation of imgate-core on turmoil.

use clap::{Parser, Subcommand};
use imgate_sim::run::{FaultCounts, FaultKind};
use imgate_sim::{run_seed, FaultSet, Outcome, RunConfig};
use std::time::Instant as WallInstant;

/// imgate sim: run the real engine under seeded network and disk faults and check the
/// invariants I1-I5 with an oracle. Every run is a seed; a seed replays exactly.
#[derive(Parser, Debug)]
#[command(name = "sim", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one seed.
    Run {
        /// The seed to run.
        #[arg(long)]
        seed: u64,
        /// Simulated seconds (the last 3/8, at least 8, are the heal period).
        #[arg(long, default_value_t = 40)]
        duration: u64,
        /// Faults: none, all, one kind by name (only it, always on), or list (print the
        /// kinds and exit).
        #[arg(long, default_value = "all")]
        faults: String,
    },
    /// Run a range of seeds, e.g. `--seeds 1..1000`, and print a summary.
    Sweep {
        /// Seed range, `A..B` (B excluded).
        #[arg(long)]
        seeds: String,
        /// Simulated seconds per seed.
        #[arg(long, default_value_t = 40)]
        duration: u64,
        /// Faults: none, all, or one kind by name (see `run --faults list`).
        #[arg(long, default_value = "all")]
        faults: String,
    },
    /// Replay one seed and print its event trace.
    Replay {
        /// The seed to replay.
        #[arg(long)]
        seed: u64,
        /// Print every event.
        #[arg(long)]
        trace: bool,
        /// Simulated seconds.
        #[arg(long, default_value_t = 40)]
        duration: u64,
        /// Faults: none, all, or one kind by name, as the run had.
        #[arg(long, default_value = "all")]
        faults: String,
    },
}

fn report(o: &Outcome) {
    println!(
        "seed {} trace {:016x} events {} simulated {}ms durable {} checked {} faults {:?}",
        o.seed, o.trace_hash, o.events, o.simulated_ms, o.durable, o.checked, o.counts
    );
    if let Some(v) = o.violations.first() {
        println!("VIOLATION seed {}: {v}", o.seed);
        println!("replay: sim replay --seed {} --trace", o.seed);
    }
}

/// The fault set named on the command line: none, all, or one kind.
fn fault_set(name: &str) -> anyhow::Result<FaultSet> {
    Ok(match name {
        "none" => FaultSet::None,
        "all" => FaultSet::All,
        name => FaultSet::Only(FaultKind::from_name(name).ok_or_else(|| {
            anyhow::anyhow!("unknown fault kind {name:?} (see `sim run --faults list`)")
        })?),
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            seed,
            duration,
            faults,
        } => {
            if faults == "list" {
                let names: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                println!("{}", names.join(" "));
                return Ok(());
            }
            let faults = fault_set(&faults)?;
            let mut cfg = RunConfig::new(seed);
            cfg.duration_secs = duration;
            cfg.faults = faults;
            let o = run_seed(&cfg);
            report(&o);
            if !o.violations.is_empty() {
                std::process::exit(1);
            }
        }
        Command::Replay {
            seed,
            trace,
            duration,
            faults,
        } => {
            let mut cfg = RunConfig::new(seed);
            cfg.duration_secs = duration;
            cfg.faults = fault_set(&faults)?;
            cfg.keep_trace = trace;
            let o = run_seed(&cfg);
            for line in &o.trace {
                println!("{line}");
            }
            report(&o);
            if !o.violations.is_empty() {
                std::process::exit(1);
            }
        }
        Command::Sweep {
            seeds,
            duration,
            faults,
        } => {
            let faults = fault_set(&faults)?;
            let (a, b) = seeds
                .split_once("..")
                .ok_or_else(|| anyhow::anyhow!("--seeds wants A..B"))?;
            let (a, b): (u64, u64) = (a.parse()?, b.parse()?);
            let wall = WallInstant::now();
            let mut failed = Vec::new();
            let mut sim_ms = 0;
            let mut checked = 0;
            let mut counts = FaultCounts::default();
            for seed in a..b {
                let mut cfg = RunConfig::new(seed);
                cfg.duration_secs = duration;
                cfg.faults = faults;
                let o = run_seed(&cfg);
                sim_ms += o.simulated_ms;
                checked += o.checked;
                counts.add(&o.counts);
                if !o.violations.is_empty() {
                    report(&o);
                    failed.push(seed);
                }
            }
            println!(
                "seeds {a}..{b}: simulated {}s, faults {:?}, messages checked {checked}, violations {} {:?}, wall {:.1}s",
                sim_ms / 1000,
                counts,
                failed.len(),
                failed,
                wall.elapsed().as_secs_f64()
            );
            if !failed.is_empty() {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
