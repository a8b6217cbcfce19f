//! `gateway`: the imgate server. `gateway run` (the default) serves clients; `gateway
//! token` mints a token for the configured secret. See `runtime.rs` for the driver.

mod admin;
mod config;
#[cfg(feature = "fault-injection")]
mod fault;
mod log_files;
mod metrics;
mod reactor;
mod runtime;
mod uring;

use anyhow::Result;
use clap::{Parser, Subcommand};
use config::{Config, Overrides};
use imgate_core::auth::TokenSigner;
use imgate_core::proto::{DeviceId, UserId};
use imgate_core::Instant;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

/// The exit status after a panic in any thread: 101, what Rust gives a panicking main
/// thread, so that every panic looks the same to a supervisor.
const PANIC_EXIT_CODE: i32 = 101;

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
    /// File holding the admin API's bearer token [default: admin-token in the data dir,
    /// generated on first start].
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
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
    /// Key id: signs with the HS256 key of this id from the config's `[[keys]]` (required
    /// when keys have ids) and names it in the token's `kid` header. With a single key, it
    /// is only written into the header.
    #[arg(long)]
    kid: Option<String>,
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
            admin_token_file: run.admin_token_file,
            data_dir: run.data_dir,
            shards: run.shards,
            connections_max: run.max_connections,
            heartbeat_secs: run.heartbeat_secs,
        },
    )?;
    match token {
        Some(t) => mint(&config, &t),
        None => {
            exit_on_panic();
            runtime::run(config)
        }
    }
}

/// Flags given after `run` win over the same flags given before it.
fn merge(outer: RunArgs, inner: RunArgs) -> RunArgs {
    RunArgs {
        config: inner.config.or(outer.config),
        listen: inner.listen.or(outer.listen),
        admin: inner.admin.or(outer.admin),
        admin_token_file: inner.admin_token_file.or(outer.admin_token_file),
        data_dir: inner.data_dir.or(outer.data_dir),
        shards: inner.shards.or(outer.shards),
        max_connections: inner.max_connections.or(outer.max_connections),
        heartbeat_secs: inner.heartbeat_secs.or(outer.heartbeat_secs),
    }
}

/// Makes a panic in any thread end the whole process at once, with an error log line
/// naming the thread and exit status [`PANIC_EXIT_CODE`].
///
/// Without it a panicking shard thread dies alone: the other shards, the admin server and
/// the dead shard's listener stay up, so its users hang while `/healthz` says all is well
/// (a zombie shard). The shard's state cannot be rebuilt in place, while a fresh process
/// recovers every shard from its log, so the only safe answer is to stop everything and let
/// the supervisor (systemd's `Restart=on-failure`) start again. Exiting from the hook, before
/// any unwinding, also means no executor can catch the panic and carry on.
fn exit_on_panic() {
    let print_default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let current = std::thread::current();
        let thread = current.name().unwrap_or("<unnamed>");
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(a non-text panic payload)");
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        tracing::error!(
            thread,
            %location,
            message,
            "a gateway thread panicked; exiting so that the supervisor restarts the process"
        );
        // The standard message (and a backtrace when RUST_BACKTRACE asks for one).
        print_default(info);
        std::process::exit(PANIC_EXIT_CODE);
    }));
}

fn mint(config: &Config, t: &TokenArgs) -> Result<()> {
    if t.user == 0 {
        anyhow::bail!("user 0 is not a user");
    }
    let mut signer = TokenSigner::new(&config.signing_key(t.kid.as_deref())?)
        .map_err(|e| anyhow::anyhow!("signing key: {e}"))?;
    if let Some(kid) = &t.kid {
        signer = signer.with_kid(kid.as_str());
    }
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
