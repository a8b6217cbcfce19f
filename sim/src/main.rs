//! `sim`: deterministic fault simulation of imgate-core on turmoil.
//!
//! The simulation and its oracle arrive with the sim issue; today this binary parses its
//! command line and says what is not built yet.

use clap::{Parser, Subcommand};

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
    },
    /// Run a range of seeds, e.g. `--seeds 1..1000`, and print a summary.
    Sweep {
        /// Seed range, `A..B` (B excluded).
        #[arg(long)]
        seeds: String,
    },
    /// Replay one seed and print its event trace.
    Replay {
        /// The seed to replay.
        #[arg(long)]
        seed: u64,
        /// Print every event.
        #[arg(long)]
        trace: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("the simulation is not built yet (see the open sim issue)")
}
