//! `gateway`: the imgate server. `gateway run` (the default) serves clients; `gateway
//! token` mints a token for the configured secret. See `runtime.rs` for the driver.

mod admin;
mod config;
mod metrics;
mod runtime;
mod storage;

use anyhow::Result;
use clap::{Parser, Subcommand};
use config::{Config, Overrides};
use imgate_core::auth::TokenSigner;
use imgate_core::proto::{DeviceId, UserId};
use imgate_core::Instant;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

/// imgate gateway: the long-connection server IM clients keep a socket open to.
#[derive(Parser, Debug)]
#[command(name = "gateway", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (the default). With no flags: clients on 127.0.0.1:7400, admin on
    /// 127.0.0.1:7401, data in ./imgate-data, one shard per core.
    Run(RunArgs),
    /// Mint a client token signed with the configured secret (the dev secret by default).
    Token(TokenArgs),
}

#[derive(clap::Args, Debug, Default)]
struct RunArgs {
    /// TOML configuration file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address clients connect to [default: 127.0.0.1:7400].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address of the admin HTTP server (/metrics, /healthz, /groups, /drain)
    /// [default: 127.0.0.1:7401].
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Directory for the logs and the dev signing secret [default: imgate-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Number of shards (pinned executors) [default: one per core].
    #[arg(long)]
    shards: Option<usize>,
    /// Connections per shard at most (also bounded by the open-file limit).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Heartbeat interval in seconds; a peer silent for two intervals is dropped.
    #[arg(long)]
    heartbeat_secs: Option<u64>,
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
    /// TOML configuration file naming the secret, if not the dev secret.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory holding the dev secret [default: imgate-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = real_main() {
        eprintln!("gateway: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let (run, token) = match cli.command {
        None => (cli.run, None),
        Some(Command::Run(args)) => (merge(cli.run, args), None),
        Some(Command::Token(t)) => {
            let outer = cli.run;
            let run = RunArgs {
                config: t.config.clone().or(outer.config),
                data_dir: t.data_dir.clone().or(outer.data_dir),
                ..RunArgs::default()
            };
            (run, Some(t))
        }
    };
    let config = Config::load(
        run.config.as_deref(),
        Overrides {
            listen: run.listen,
            admin: run.admin,
            data_dir: run.data_dir,
            shards: run.shards,
            connections_max: run.max_connections,
            heartbeat_secs: run.heartbeat_secs,
        },
    )?;
    match token {
        Some(t) => mint(&config, &t),
        None => runtime::run(config),
    }
}

/// Flags given after `run` win over the same flags given before it.
fn merge(outer: RunArgs, inner: RunArgs) -> RunArgs {
    RunArgs {
        config: inner.config.or(outer.config),
        listen: inner.listen.or(outer.listen),
        admin: inner.admin.or(outer.admin),
        data_dir: inner.data_dir.or(outer.data_dir),
        shards: inner.shards.or(outer.shards),
        max_connections: inner.max_connections.or(outer.max_connections),
        heartbeat_secs: inner.heartbeat_secs.or(outer.heartbeat_secs),
    }
}

fn mint(config: &Config, t: &TokenArgs) -> Result<()> {
    if t.user == 0 {
        anyhow::bail!("user 0 is not a user");
    }
    let signer = TokenSigner::new(&config.signing_key()?)
        .map_err(|e| anyhow::anyhow!("signing key: {e}"))?;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let expires = Instant::from_millis(now_ms + t.ttl.saturating_mul(1000));
    println!(
        "{}",
        signer.mint(UserId(t.user), DeviceId(t.device), expires)
    );
    Ok(())
}
