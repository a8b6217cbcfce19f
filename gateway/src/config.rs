//! Gateway configuration: embedded defaults, an optional TOML file, then command-line
//! flags, in that order of precedence. With no file and no flags the gateway runs on one
//! machine: clients on 127.0.0.1:7400, admin on 127.0.0.1:7401, data in ./imgate-data,
//! one shard per core, and a dev signing secret and an admin token generated into the data
//! dir on first start.
//!
//! Token verification keys are one of: the dev secret (the default), a single key
//! (`hs256_secret_file` or `ed25519_public_key_file`; tokens need no `kid`), or a key set
//! (`[[keys]]` tables, each with a `kid` and one key file; tokens must name their key).
//! The key setting and the key files are read again on SIGHUP ([`Config::reload_verifier`]),
//! so keys rotate without a restart; every other setting takes effect at the next start.
//!
//! The log settings are those of core's log engine ([`LogConfig`]): `segment_bytes` and
//! `segment_messages` (when a segment is sealed), `checkpoint_messages` (how many durable
//! messages the engine lets pass before it asks the shard for a checkpoint, which bounds
//! what a start replays), and, both off by default, `retention_bytes` (keep at most this
//! many bytes of segments per shard) and `retention_age_secs` (remove sealed segments older
//! than this). Retention removes whole sealed segments only, and never one that recovery
//! still needs (the one holding the last checkpoint, and every later one). All of them are
//! checked when the configuration is loaded ([`Config::load`]).

use anyhow::{bail, Context, Result};
use imgate_core::auth::{KeyConfig, SigningKey, TokenVerifier, VerificationKey};
use imgate_core::log_engine::LogConfig;
use imgate_core::Limits;
use serde::Deserialize;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Bytes of a generated dev secret (HS256 wants at least 32).
const DEV_SECRET_BYTES: usize = 32;
/// File name of the dev secret inside the data dir.
pub const DEV_SECRET_FILE: &str = "dev-secret.hex";
/// Bytes of a generated admin token: 256 bits, beyond guessing at any request rate.
const ADMIN_TOKEN_BYTES: usize = 32;
/// File name of the generated admin token inside the data dir.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// Shortest admin token accepted from a configured file: 16 characters. Shorter is a
/// placeholder or a typo (an empty file would open the admin API to anyone who sends an
/// empty token), not a secret.
pub const ADMIN_TOKEN_CHARS_MIN: usize = 16;

/// The gateway's settings after merging defaults, file and flags.
#[derive(Clone, Debug)]
pub struct Config {
    /// Client listener (every shard binds it with SO_REUSEPORT).
    pub listen: SocketAddr,
    /// Admin HTTP listener.
    pub admin: SocketAddr,
    /// Data directory: one log directory per shard, the dev secret, the admin token, the
    /// shard count.
    pub data_dir: PathBuf,
    /// File holding the admin API's bearer token; `None`: [`ADMIN_TOKEN_FILE`] in the
    /// data dir, generated on first start.
    pub admin_token_file: Option<PathBuf>,
    /// Shards; 0 means one per online CPU.
    pub shards: usize,
    /// Segment file size before rotation.
    pub segment_bytes: u64,
    /// Messages in a segment before rotation (bounds the open segment's index).
    pub segment_messages: usize,
    /// Durable messages after which the log asks for a checkpoint (bounds start-up).
    pub checkpoint_messages: u64,
    /// Bytes of segments kept per shard at most (`None`: no bound).
    pub retention_bytes: Option<u64>,
    /// Age after which a sealed segment is removed (`None`: no bound).
    pub retention_age: Option<Duration>,
    /// How tokens are verified.
    pub auth: AuthConfig,
    /// Engine bounds.
    pub limits: Limits,
    /// Time SIGTERM may take: GoAway, in-flight appends, sync.
    pub shutdown_timeout: Duration,
    /// The TOML file the settings came from, read again for the keys on SIGHUP.
    pub file: Option<PathBuf>,
}

/// Where the verification key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthConfig {
    /// The dev secret in the data dir, generated on first start (HS256).
    DevSecret,
    /// A single key without an id (`hs256_secret_file` or `ed25519_public_key_file`).
    Single(KeySource),
    /// A key set (`[[keys]]`): tokens name their key by `kid`.
    KeySet(Vec<KeyFile>),
}

/// The file a verification key is read from, and its kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// An HS256 secret in this file (raw bytes; surrounding whitespace trimmed).
    Hs256File(PathBuf),
    /// An Ed25519 public key (PEM) in this file.
    EdDsaPublicKeyFile(PathBuf),
}

/// One key of a key set: its id and the file it is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyFile {
    /// The id tokens name in their header's `kid`.
    pub kid: String,
    /// Where the key is read from.
    pub source: KeySource,
}

/// A `[[keys]]` table of the TOML file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    kid: String,
    hs256_secret_file: Option<PathBuf>,
    ed25519_public_key_file: Option<PathBuf>,
}

/// The TOML file's shape; every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    admin_token_file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    shards: Option<usize>,
    segment_bytes: Option<u64>,
    segment_messages: Option<usize>,
    checkpoint_messages: Option<u64>,
    retention_bytes: Option<u64>,
    retention_age_secs: Option<u64>,
    shutdown_timeout_secs: Option<u64>,
    hs256_secret_file: Option<PathBuf>,
    ed25519_public_key_file: Option<PathBuf>,
    keys: Option<Vec<FileKey>>,
    connections_max: Option<usize>,
    heartbeat_secs: Option<u64>,
    auth_timeout_secs: Option<u64>,
    frame_bytes_max: Option<u32>,
    payload_bytes_max: Option<u32>,
    outbound_soft_bytes: Option<usize>,
    outbound_hard_bytes: Option<usize>,
    read_diffusion_threshold: Option<usize>,
    frames_per_sec: Option<u32>,
    frames_burst: Option<u32>,
    bytes_per_sec: Option<u32>,
    bytes_burst: Option<u32>,
    devices_per_user_max: Option<usize>,
    conversations_max: Option<usize>,
    hot_bytes_per_shard: Option<usize>,
    hot_messages_per_shard: Option<usize>,
    dedupe_window_entries: Option<usize>,
    cursors_per_conn_max: Option<usize>,
}

/// Command-line overrides (None: not given).
#[derive(Debug, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub admin_token_file: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub shards: Option<usize>,
    pub connections_max: Option<usize>,
    pub heartbeat_secs: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            admin: SocketAddr::from(([127, 0, 0, 1], 7401)),
            data_dir: PathBuf::from("imgate-data"),
            admin_token_file: None,
            shards: 0,
            segment_bytes: LogConfig::default().segment_bytes,
            segment_messages: LogConfig::default().segment_messages,
            checkpoint_messages: LogConfig::default().checkpoint_messages,
            retention_bytes: None,
            retention_age: None,
            auth: AuthConfig::DevSecret,
            limits: Limits::default(),
            shutdown_timeout: Duration::from_secs(10),
            file: None,
        }
    }
}

impl Config {
    /// Defaults, then `file` (if any), then `flags`.
    pub fn load(file: Option<&Path>, flags: Overrides) -> Result<Config> {
        let mut config = Config::default();
        if let Some(path) = file {
            config.apply_file(read_file(path)?)?;
            config.file = Some(path.to_path_buf());
        }
        let l = &mut config.limits;
        config.listen = flags.listen.unwrap_or(config.listen);
        config.admin = flags.admin.unwrap_or(config.admin);
        config.admin_token_file = flags.admin_token_file.or(config.admin_token_file);
        config.data_dir = flags.data_dir.unwrap_or(config.data_dir);
        config.shards = flags.shards.unwrap_or(config.shards);
        if let Some(n) = flags.connections_max {
            l.connections_max = n;
        }
        if let Some(s) = flags.heartbeat_secs {
            l.heartbeat_interval = Duration::from_secs(s);
        }
        config
            .limits
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid limits: {e}"))?;
        // The log engine checks these too, but only once a shard opens it (by panicking);
        // say what is wrong before anything starts.
        config.validate_log()?;
        Ok(config)
    }

    /// Checks the log settings, naming the setting that is wrong.
    fn validate_log(&self) -> Result<()> {
        if self.segment_bytes == 0 {
            bail!("invalid log settings: segment_bytes must be at least 1");
        }
        if self.segment_messages == 0 {
            bail!("invalid log settings: segment_messages must be at least 1");
        }
        if self.checkpoint_messages == 0 {
            bail!("invalid log settings: checkpoint_messages must be at least 1");
        }
        if let Some(bytes) = self.retention_bytes {
            if bytes < self.segment_bytes {
                bail!(
                    "invalid log settings: retention_bytes ({bytes}) must be at least \
                     segment_bytes ({}): retention removes whole sealed segments; leave it \
                     out to keep every segment",
                    self.segment_bytes
                );
            }
        }
        if self.retention_age == Some(Duration::ZERO) {
            bail!(
                "invalid log settings: retention_age_secs must be at least 1; leave it out \
                 to keep segments however old"
            );
        }
        self.log_config(1)
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid log settings: {e}"))
    }

    /// The log engine's configuration, with segment writes aligned to `align` (what the
    /// storage executor found the filesystem to take: 4096 with O_DIRECT, else 1).
    pub fn log_config(&self, align: u64) -> LogConfig {
        LogConfig {
            segment_bytes: self.segment_bytes,
            segment_messages: self.segment_messages,
            align,
            checkpoint_messages: self.checkpoint_messages,
            retention_bytes: self.retention_bytes,
            retention_age: self.retention_age,
            // Pipelined syncs only with O_DIRECT: with buffered writes a failed writeback
            // is reported to one of two syncs in flight only (see the field's docs).
            syncs_inflight_max: if align > 1 {
                imgate_core::log_engine::SYNCS_INFLIGHT_MAX
            } else {
                1
            },
            ..LogConfig::default()
        }
    }

    fn apply_file(&mut self, f: FileConfig) -> Result<()> {
        if let Some(auth) = auth_of(&f)? {
            self.auth = auth;
        }
        self.listen = f.listen.unwrap_or(self.listen);
        self.admin = f.admin.unwrap_or(self.admin);
        self.admin_token_file = f.admin_token_file.or(self.admin_token_file.take());
        self.data_dir = f.data_dir.unwrap_or(self.data_dir.clone());
        self.shards = f.shards.unwrap_or(self.shards);
        self.segment_bytes = f.segment_bytes.unwrap_or(self.segment_bytes);
        self.segment_messages = f.segment_messages.unwrap_or(self.segment_messages);
        self.checkpoint_messages = f.checkpoint_messages.unwrap_or(self.checkpoint_messages);
        self.retention_bytes = f.retention_bytes.or(self.retention_bytes);
        if let Some(s) = f.retention_age_secs {
            self.retention_age = Some(Duration::from_secs(s));
        }
        if let Some(s) = f.shutdown_timeout_secs {
            self.shutdown_timeout = Duration::from_secs(s);
        }
        let l = &mut self.limits;
        l.connections_max = f.connections_max.unwrap_or(l.connections_max);
        if let Some(s) = f.heartbeat_secs {
            l.heartbeat_interval = Duration::from_secs(s);
        }
        if let Some(s) = f.auth_timeout_secs {
            l.auth_timeout = Duration::from_secs(s);
        }
        l.frame_bytes_max = f.frame_bytes_max.unwrap_or(l.frame_bytes_max);
        l.payload_bytes_max = f.payload_bytes_max.unwrap_or(l.payload_bytes_max);
        l.outbound_soft_bytes = f.outbound_soft_bytes.unwrap_or(l.outbound_soft_bytes);
        l.outbound_hard_bytes = f.outbound_hard_bytes.unwrap_or(l.outbound_hard_bytes);
        l.read_diffusion_threshold = f
            .read_diffusion_threshold
            .unwrap_or(l.read_diffusion_threshold);
        l.frames_per_sec = f.frames_per_sec.unwrap_or(l.frames_per_sec);
        l.frames_burst = f.frames_burst.unwrap_or(l.frames_burst);
        l.bytes_per_sec = f.bytes_per_sec.unwrap_or(l.bytes_per_sec);
        l.bytes_burst = f.bytes_burst.unwrap_or(l.bytes_burst);
        l.devices_per_user_max = f.devices_per_user_max.unwrap_or(l.devices_per_user_max);
        l.conversations_max = f.conversations_max.unwrap_or(l.conversations_max);
        l.hot_bytes_per_shard = f.hot_bytes_per_shard.unwrap_or(l.hot_bytes_per_shard);
        l.hot_messages_per_shard = f.hot_messages_per_shard.unwrap_or(l.hot_messages_per_shard);
        l.dedupe_window_entries = f.dedupe_window_entries.unwrap_or(l.dedupe_window_entries);
        l.cursors_per_conn_max = f.cursors_per_conn_max.unwrap_or(l.cursors_per_conn_max);
        Ok(())
    }

    /// The token verifier for the configured keys, read from their files now. For the
    /// dev secret, creates it on first use and says so.
    pub fn verifier(&self) -> Result<TokenVerifier> {
        let keys = self.verification_keys()?;
        TokenVerifier::with_key_set(&keys, self.limits.token_leeway, self.limits.token_bytes_max)
            .map_err(|e| anyhow::anyhow!("verification keys: {e}"))
    }

    /// The verifier for the keys configured now (SIGHUP): the key setting of the config
    /// file read again, if the gateway was started with one, and every key file read
    /// again. Only the keys are taken from the file; the rest of it applies at the next
    /// start. An error leaves nothing changed; the caller keeps its verifier.
    pub fn reload_verifier(&self) -> Result<TokenVerifier> {
        let mut fresh = self.clone();
        if let Some(path) = &self.file {
            fresh.auth = auth_of(&read_file(path)?)?.unwrap_or(AuthConfig::DevSecret);
        }
        fresh.verifier()
    }

    /// The verification keys, read from their files.
    fn verification_keys(&self) -> Result<Vec<VerificationKey>> {
        let unnamed = |key| vec![VerificationKey { kid: None, key }];
        Ok(match &self.auth {
            AuthConfig::DevSecret => unnamed(KeyConfig::Hs256 {
                secret: dev_secret(&self.data_dir, true)?,
            }),
            AuthConfig::Single(source) => unnamed(read_key(source)?),
            AuthConfig::KeySet(keys) => keys
                .iter()
                .map(|k| {
                    Ok(VerificationKey {
                        kid: Some(k.kid.clone()),
                        key: read_key(&k.source).with_context(|| format!("key `{}`", k.kid))?,
                    })
                })
                .collect::<Result<_>>()?,
        })
    }

    /// The admin API's bearer token: the configured file's content (surrounding whitespace
    /// trimmed, at least [`ADMIN_TOKEN_CHARS_MIN`] characters), or the generated token in
    /// the data dir, created on first use like the dev secret.
    pub fn admin_token(&self) -> Result<Vec<u8>> {
        match &self.admin_token_file {
            Some(path) => {
                let token = read_trimmed(path)?;
                if token.len() < ADMIN_TOKEN_CHARS_MIN {
                    bail!(
                        "the admin token in {} is shorter than {ADMIN_TOKEN_CHARS_MIN} characters",
                        path.display()
                    );
                }
                Ok(token)
            }
            None => admin_token(&self.data_dir),
        }
    }

    /// The signing key for `gateway token`: the dev secret, the HS256 secret file, or the
    /// HS256 key of a key set named by `kid` (required with a key set; with a single key
    /// it only goes into the token's header). An EdDSA deployment mints tokens with its
    /// private key elsewhere.
    pub fn signing_key(&self, kid: Option<&str>) -> Result<SigningKey> {
        let eddsa = "tokens for an EdDSA key are minted with the private key, not by the gateway";
        Ok(match &self.auth {
            AuthConfig::DevSecret => SigningKey::Hs256 {
                secret: dev_secret(&self.data_dir, false)?,
            },
            AuthConfig::Single(KeySource::Hs256File(p)) => SigningKey::Hs256 {
                secret: read_trimmed(p)?,
            },
            AuthConfig::Single(KeySource::EdDsaPublicKeyFile(_)) => bail!("{eddsa}"),
            AuthConfig::KeySet(keys) => {
                let ids = || {
                    keys.iter()
                        .map(|k| k.kid.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let Some(kid) = kid else {
                    bail!(
                        "the configured keys have ids: name one with --kid ({})",
                        ids()
                    );
                };
                let Some(key) = keys.iter().find(|k| k.kid == kid) else {
                    bail!("no key `{kid}` is configured ({})", ids());
                };
                match &key.source {
                    KeySource::Hs256File(p) => SigningKey::Hs256 {
                        secret: read_trimmed(p)?,
                    },
                    KeySource::EdDsaPublicKeyFile(_) => bail!("key `{kid}`: {eddsa}"),
                }
            }
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

/// The key setting of a config file, if it has one: a single key file or `[[keys]]`.
fn auth_of(f: &FileConfig) -> Result<Option<AuthConfig>> {
    let single = match (&f.hs256_secret_file, &f.ed25519_public_key_file) {
        (Some(_), Some(_)) => {
            bail!("set one of hs256_secret_file and ed25519_public_key_file, not both")
        }
        (Some(p), None) => Some(AuthConfig::Single(KeySource::Hs256File(p.clone()))),
        (None, Some(p)) => Some(AuthConfig::Single(KeySource::EdDsaPublicKeyFile(p.clone()))),
        (None, None) => None,
    };
    let Some(keys) = &f.keys else {
        return Ok(single);
    };
    if single.is_some() {
        bail!(
            "set either [[keys]] or a single hs256_secret_file or ed25519_public_key_file, \
             not both"
        );
    }
    if keys.is_empty() {
        bail!("`keys` lists no key");
    }
    let keys = keys
        .iter()
        .map(|k| {
            let source = match (&k.hs256_secret_file, &k.ed25519_public_key_file) {
                (Some(p), None) => KeySource::Hs256File(p.clone()),
                (None, Some(p)) => KeySource::EdDsaPublicKeyFile(p.clone()),
                _ => bail!(
                    "key `{}`: set one of hs256_secret_file and ed25519_public_key_file",
                    k.kid
                ),
            };
            Ok(KeyFile {
                kid: k.kid.clone(),
                source,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Some(AuthConfig::KeySet(keys)))
}

/// A single key read from its file.
fn read_key(source: &KeySource) -> Result<KeyConfig> {
    Ok(match source {
        KeySource::Hs256File(p) => KeyConfig::Hs256 {
            secret: read_trimmed(p)?,
        },
        KeySource::EdDsaPublicKeyFile(p) => KeyConfig::EdDsa {
            public_key_pem: std::fs::read(p)
                .with_context(|| format!("reading public key {}", p.display()))?,
        },
    })
}

fn read_trimmed(path: &Path) -> Result<Vec<u8>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading secret {}", path.display()))?;
    Ok(String::from_utf8_lossy(&bytes).trim().as_bytes().to_vec())
}

/// The dev secret in `data_dir`, created if `create` and missing. The file holds hex, and
/// the secret is the hex text itself (64 bytes), so it can be pasted into other tools.
pub fn dev_secret(data_dir: &Path, create: bool) -> Result<Vec<u8>> {
    let path = data_dir.join(DEV_SECRET_FILE);
    if path.exists() {
        return read_trimmed(&path);
    }
    if !create {
        bail!(
            "no dev secret at {}: start the gateway once with this data dir first",
            path.display()
        );
    }
    let hex = generate_hex(data_dir, &path, DEV_SECRET_BYTES)?;
    tracing::warn!(
        path = %path.display(),
        "generated a dev signing secret (HS256); mint tokens with `gateway token`. \
         Configure hs256_secret_file or ed25519_public_key_file in production"
    );
    Ok(hex)
}

/// The admin token in `data_dir` ([`ADMIN_TOKEN_FILE`]), created if missing, the same way
/// as the dev secret: hex of [`ADMIN_TOKEN_BYTES`] random bytes, the hex text being the
/// token, in a file only the gateway's user may read.
pub fn admin_token(data_dir: &Path) -> Result<Vec<u8>> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    if path.exists() {
        return read_trimmed(&path);
    }
    let hex = generate_hex(data_dir, &path, ADMIN_TOKEN_BYTES)?;
    tracing::warn!(
        path = %path.display(),
        "generated an admin token; admin requests (all but /healthz) must send \
         `Authorization: Bearer <the file's content>`"
    );
    Ok(hex)
}

/// Writes `bytes` random bytes from the OS, as hex, to a new private file at `path` in
/// `dir` (created if missing); returns the hex.
fn generate_hex(dir: &Path, path: &Path, bytes: usize) -> Result<Vec<u8>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating data dir {}", dir.display()))?;
    let mut raw = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .context("reading /dev/urandom")?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    write_private(path, hex.as_bytes())?;
    Ok(hex.into_bytes())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("imgate-config-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn file_values_apply_and_flags_win_over_them() {
        let dir = temp_dir("merge");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("gw.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\nshards = 3\nheartbeat_secs = 5\nconnections_max = 10\n",
        )
        .unwrap();
        let flags = Overrides {
            shards: Some(2),
            ..Overrides::default()
        };
        let c = Config::load(Some(&file), flags).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.shards, 2);
        assert_eq!(c.limits.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(c.limits.connections_max, 10);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn zero_segment_bounds_and_limits_are_refused_at_load() {
        let dir = temp_dir("zero-bounds");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("gw.toml");
        for (line, named) in [
            ("segment_bytes = 0", "segment_bytes"),
            ("segment_messages = 0", "segment_messages"),
            ("checkpoint_messages = 0", "checkpoint_messages"),
            ("retention_bytes = 1000", "retention_bytes"),
            ("retention_age_secs = 0", "retention_age_secs"),
            ("cursors_per_conn_max = 0", "cursors_per_conn_max"),
        ] {
            std::fs::write(&file, format!("{line}\n")).unwrap();
            match Config::load(Some(&file), Overrides::default()) {
                Ok(_) => panic!("{line} was taken"),
                Err(e) => assert!(format!("{e:#}").contains(named), "{line}: {e:#}"),
            }
        }
        std::fs::write(&file, "segment_messages = 1\ncursors_per_conn_max = 1\n").unwrap();
        let c = Config::load(Some(&file), Overrides::default()).unwrap();
        assert_eq!((c.segment_messages, c.limits.cursors_per_conn_max), (1, 1));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn log_settings_reach_the_log_engine() {
        let dir = temp_dir("log-settings");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("gw.toml");
        let defaults = Config::load(None, Overrides::default())
            .unwrap()
            .log_config(4096);
        let engine = LogConfig::default();
        assert_eq!(
            (defaults.segment_bytes, defaults.segment_messages),
            (engine.segment_bytes, engine.segment_messages)
        );
        assert_eq!(defaults.checkpoint_messages, engine.checkpoint_messages);
        assert_eq!(
            (defaults.retention_bytes, defaults.retention_age),
            (None, None)
        );
        assert_eq!(defaults.align, 4096);
        std::fs::write(
            &file,
            "segment_bytes = 1048576\nsegment_messages = 1000\ncheckpoint_messages = 5000\n\
             retention_bytes = 10485760\nretention_age_secs = 86400\n",
        )
        .unwrap();
        let c = Config::load(Some(&file), Overrides::default())
            .unwrap()
            .log_config(1);
        assert_eq!((c.segment_bytes, c.segment_messages), (1 << 20, 1000));
        assert_eq!(c.checkpoint_messages, 5000);
        assert_eq!(c.retention_bytes, Some(10 << 20));
        assert_eq!(c.retention_age, Some(Duration::from_secs(86_400)));
        assert!(c.validate().is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unknown_key_in_the_file_is_an_error() {
        let dir = temp_dir("unknown");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("gw.toml");
        std::fs::write(&file, "lisen = \"127.0.0.1:9000\"\n").unwrap();
        let err = Config::load(Some(&file), Overrides::default()).unwrap_err();
        assert!(format!("{err:#}").contains("lisen"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_example_config_in_deploy_parses() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/gateway.toml");
        let c = Config::load(Some(&file), Overrides::default()).unwrap();
        assert_eq!(c.listen, "0.0.0.0:7400".parse().unwrap());
        assert_eq!(c.segment_bytes, 64 * 1024 * 1024);
    }

    /// An Ed25519 public key (the one of core's auth tests), for key files.
    const ED_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAQpEfO7dtFFlfdyVV4xUEvdLaDqaXppJtBKJ08+cZ3ug=
-----END PUBLIC KEY-----
";

    /// Writes key files `a` (HS256) and `b` (Ed25519) into `dir`, and a config file whose
    /// `[[keys]]` lists the given ids; returns the config file's path.
    fn key_set_config(dir: &Path, kids: &[&str]) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("a.secret"),
            "a-secret-of-at-least-32-bytes-long!!\n",
        )
        .unwrap();
        std::fs::write(dir.join("b.pem"), ED_PUBLIC_PEM).unwrap();
        let mut text = String::from("heartbeat_secs = 30\n");
        for kid in kids {
            let file = if *kid == "b" {
                format!("ed25519_public_key_file = {:?}", dir.join("b.pem"))
            } else {
                format!("hs256_secret_file = {:?}", dir.join("a.secret"))
            };
            text.push_str(&format!("\n[[keys]]\nkid = {kid:?}\n{file}\n"));
        }
        let path = dir.join("gw.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_key_set_is_read_from_keys_tables() {
        let dir = temp_dir("keyset");
        let file = key_set_config(&dir, &["a", "b"]);
        let c = Config::load(Some(&file), Overrides::default()).unwrap();
        assert_eq!(
            c.auth,
            AuthConfig::KeySet(vec![
                KeyFile {
                    kid: "a".to_owned(),
                    source: KeySource::Hs256File(dir.join("a.secret")),
                },
                KeyFile {
                    kid: "b".to_owned(),
                    source: KeySource::EdDsaPublicKeyFile(dir.join("b.pem")),
                },
            ])
        );
        let verifier = c.verifier().unwrap();
        assert_eq!(verifier.key_ids().collect::<Vec<_>>(), ["a", "b"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_example_key_set_in_deploy_parses_once_uncommented() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/gateway.toml");
        let text = std::fs::read_to_string(file).unwrap();
        let start = text.find("# [[keys]]").expect("the example has a key set");
        let mut uncommented = text[..start].to_owned();
        for line in text[start..].lines() {
            uncommented.push_str(line.trim_start_matches('#').trim_start());
            uncommented.push('\n');
        }
        let f: FileConfig = toml::from_str(&uncommented).unwrap();
        match auth_of(&f).unwrap() {
            Some(AuthConfig::KeySet(keys)) => {
                let kinds: Vec<_> = keys
                    .iter()
                    .map(|k| (k.kid.as_str(), matches!(k.source, KeySource::Hs256File(_))))
                    .collect();
                assert_eq!(kinds, [("2025-06", true), ("2025-07", false)]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn contradictory_or_incomplete_key_settings_are_errors() {
        let dir = temp_dir("keyset-bad");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("gw.toml");
        for (text, expected) in [
            (
                "hs256_secret_file = \"x\"\n[[keys]]\nkid = \"a\"\nhs256_secret_file = \"y\"\n",
                "not both",
            ),
            (
                "[[keys]]\nkid = \"a\"\nhs256_secret_file = \"x\"\ned25519_public_key_file = \"y\"\n",
                "key `a`",
            ),
            ("[[keys]]\nkid = \"a\"\n", "key `a`"),
            ("keys = []\n", "no key"),
            ("[[keys]]\nhs256_secret_file = \"x\"\n", "kid"),
            ("[[keys]]\nkid = \"a\"\nhs256_secret = \"x\"\n", "hs256_secret"),
        ] {
            std::fs::write(&file, text).unwrap();
            let err = Config::load(Some(&file), Overrides::default()).unwrap_err();
            assert!(format!("{err:#}").contains(expected), "{text}: {err:#}");
        }
        // Two keys with one id parse, but make no verifier.
        std::fs::write(dir.join("a.secret"), "a-secret-of-at-least-32-bytes-long!!").unwrap();
        let secret = format!("hs256_secret_file = {:?}\n", dir.join("a.secret"));
        std::fs::write(
            &file,
            format!("[[keys]]\nkid = \"a\"\n{secret}[[keys]]\nkid = \"a\"\n{secret}"),
        )
        .unwrap();
        let c = Config::load(Some(&file), Overrides::default()).unwrap();
        let err = c.verifier().unwrap_err();
        assert!(format!("{err:#}").contains("twice"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reload_reads_the_key_setting_and_the_key_files_again() {
        let dir = temp_dir("reload");
        let file = key_set_config(&dir, &["a"]);
        let c = Config::load(Some(&file), Overrides::default()).unwrap();
        let ids = |v: TokenVerifier| v.key_ids().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(ids(c.verifier().unwrap()), ["a"]);
        key_set_config(&dir, &["a", "b"]);
        assert_eq!(ids(c.reload_verifier().unwrap()), ["a", "b"]);
        // A key file that is gone, or a file that no longer parses, is an error.
        std::fs::remove_file(dir.join("b.pem")).unwrap();
        let err = c.reload_verifier().unwrap_err();
        assert!(format!("{err:#}").contains("key `b`"), "{err:#}");
        std::fs::write(&file, "[[keys]\n").unwrap();
        assert!(c.reload_verifier().is_err());
        // Back to a single key without an id.
        std::fs::write(
            &file,
            format!("hs256_secret_file = {:?}\n", dir.join("a.secret")),
        )
        .unwrap();
        assert_eq!(ids(c.reload_verifier().unwrap()), Vec::<String>::new());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tokens_are_minted_with_the_hs256_key_their_kid_names() {
        let dir = temp_dir("mint-kid");
        let file = key_set_config(&dir, &["a", "b"]);
        let c = Config::load(Some(&file), Overrides::default()).unwrap();
        assert_eq!(
            c.signing_key(Some("a")).unwrap(),
            SigningKey::Hs256 {
                secret: b"a-secret-of-at-least-32-bytes-long!!".to_vec()
            }
        );
        for (kid, expected) in [
            (None, "--kid"),
            (Some("b"), "private key"),
            (Some("c"), "no key `c`"),
        ] {
            let err = c.signing_key(kid).unwrap_err();
            assert!(format!("{err:#}").contains(expected), "{kid:?}: {err:#}");
        }
        // With a single key, the kid only goes into the header.
        std::fs::write(
            &file,
            format!("hs256_secret_file = {:?}\n", dir.join("a.secret")),
        )
        .unwrap();
        let single = Config::load(Some(&file), Overrides::default()).unwrap();
        assert_eq!(
            single.signing_key(Some("anything")).unwrap(),
            single.signing_key(None).unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_dev_secret_is_created_once_and_then_reused() {
        let dir = temp_dir("secret");
        assert!(dev_secret(&dir, false).is_err());
        let first = dev_secret(&dir, true).unwrap();
        assert_eq!(first.len(), 2 * DEV_SECRET_BYTES);
        assert_eq!(dev_secret(&dir, true).unwrap(), first);
        assert_eq!(dev_secret(&dir, false).unwrap(), first);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_admin_token_is_generated_private_once_and_a_configured_one_wins() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("admin-token");
        let config = Config {
            data_dir: dir.clone(),
            ..Config::default()
        };
        let first = config.admin_token().unwrap();
        assert_eq!(first.len(), 2 * ADMIN_TOKEN_BYTES);
        assert!(first.iter().all(u8::is_ascii_hexdigit));
        let path = dir.join(ADMIN_TOKEN_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(config.admin_token().unwrap(), first);
        assert_ne!(
            first,
            dev_secret(&dir, true).unwrap(),
            "two secrets, two values"
        );

        // A configured file (flag or key) is read, trimmed, and never generated.
        let own = dir.join("own-token");
        std::fs::write(&own, "  an-operator-chosen-token\n").unwrap();
        let file = dir.join("gw.toml");
        std::fs::write(
            &file,
            format!("admin_token_file = {:?}\n", own.display().to_string()),
        )
        .unwrap();
        let from_file = Config::load(Some(&file), Overrides::default()).unwrap();
        assert_eq!(
            from_file.admin_token().unwrap(),
            b"an-operator-chosen-token"
        );
        let short = dir.join("short-token");
        std::fs::write(&short, "abc\n").unwrap();
        let flags = Overrides {
            admin_token_file: Some(short),
            ..Overrides::default()
        };
        let from_flag = Config::load(Some(&file), flags).unwrap();
        assert!(
            from_flag.admin_token().is_err(),
            "too short a token is refused"
        );
        let missing = Config {
            admin_token_file: Some(dir.join("nowhere")),
            ..Config::default()
        };
        assert!(missing.admin_token().is_err());
        assert!(!dir.join("nowhere").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
