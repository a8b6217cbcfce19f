//! `loadgen`: capacity and latency tests against a real imgate gateway.
//!
//! The scenarios arrive with the loadgen issue; today this binary parses its command line
//! and says what is not built yet.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;

/// imgate loadgen: idle, chat, fan-out and reconnect load against a gateway, with latency
/// histograms and correctness counts (lost, duplicated, reordered).
#[derive(Parser, Debug)]
#[command(name = "loadgen", version, about, long_about = None)]
struct Cli {
    /// Gateway client address.
    #[arg(long, global = true, default_value = "127.0.0.1:7400")]
    gateway: SocketAddr,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Hold N authenticated idle connections.
    Idle,
    /// Direct chats at an aggregate open-loop rate.
    Chat,
    /// Group fan-out.
    Fanout,
    /// Reconnect storms with Sync, checking nothing is lost or duplicated.
    Reconnect,
}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("the load scenarios are not built yet (see the open loadgen issue)")
}
