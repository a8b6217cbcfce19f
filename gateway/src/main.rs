//! `gateway`: the imgate server.
//!
//! The glommio shard-per-core runtime, the durable log and admin HTTP arrive with the
//! gateway issue; today this binary parses its command line and says what is not built yet.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

/// imgate gateway: the long-connection server IM clients keep a socket open to.
#[derive(Parser, Debug)]
#[command(name = "gateway", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (the default). With no flags: clients on 127.0.0.1:7400, admin on
    /// 127.0.0.1:7401, data in ./imgate-data, one shard per core.
    Run(RunArgs),
    /// Mint a client token signed with the configured secret.
    Token(TokenArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// TOML configuration file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address clients connect to.
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// Address of the admin HTTP server (/metrics, /healthz, groups, /drain).
    #[arg(long, default_value = "127.0.0.1:7401")]
    admin: SocketAddr,
    /// Directory for the log and the dev signing secret.
    #[arg(long, default_value = "imgate-data")]
    data_dir: PathBuf,
    /// Number of shards (pinned executors); 0 means one per core.
    #[arg(long, default_value_t = 0)]
    shards: usize,
}

#[derive(clap::Args, Debug)]
struct TokenArgs {
    /// User id (decimal, not 0).
    #[arg(long)]
    user: u64,
    /// Device id.
    #[arg(long)]
    device: u32,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 86_400)]
    ttl: u64,
    /// Directory holding the signing secret.
    #[arg(long, default_value = "imgate-data")]
    data_dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("the gateway runtime is not built yet (see the open gateway issue)")
}
