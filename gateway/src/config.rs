//! Gateway configuration: embedded defaults, an optional TOML file, then command-line
//! flags, in that order of precedence. With no file and no flags the gateway runs on one
//! machine: clients on 127.0.0.1:7400, admin on 127.0.0.1:7401, data in ./imgate-data,
//! one shard per core, and a dev signing secret generated into the data dir.

use anyhow::{bail, Context, Result};
use imgate_core::auth::{KeyConfig, SigningKey};
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

/// The gateway's settings after merging defaults, file and flags.
#[derive(Clone, Debug)]
pub struct Config {
    /// Client listener (every shard binds it with SO_REUSEPORT).
    pub listen: SocketAddr,
    /// Admin HTTP listener.
    pub admin: SocketAddr,
    /// Data directory: one log directory per shard, the dev secret, the shard count.
    pub data_dir: PathBuf,
    /// Shards; 0 means one per online CPU.
    pub shards: usize,
    /// Segment file size before rotation.
    pub segment_bytes: u64,
    /// How tokens are verified.
    pub auth: AuthConfig,
    /// Engine bounds.
    pub limits: Limits,
    /// Time SIGTERM may take: GoAway, in-flight appends, sync.
    pub shutdown_timeout: Duration,
}

/// Where the verification key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthConfig {
    /// The dev secret in the data dir, generated on first start (HS256).
    DevSecret,
    /// An HS256 secret in this file (raw bytes; surrounding whitespace trimmed).
    Hs256File(PathBuf),
    /// An Ed25519 public key (PEM) in this file.
    EdDsaPublicKeyFile(PathBuf),
}

/// The TOML file's shape; every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    shards: Option<usize>,
    segment_bytes: Option<u64>,
    shutdown_timeout_secs: Option<u64>,
    hs256_secret_file: Option<PathBuf>,
    ed25519_public_key_file: Option<PathBuf>,
    connections_max: Option<usize>,
    heartbeat_secs: Option<u64>,
    auth_timeout_secs: Option<u64>,
    frame_bytes_max: Option<u32>,
    payload_bytes_max: Option<u32>,
    outbound_soft_bytes: Option<usize>,
    outbound_hard_bytes: Option<usize>,
    read_diffusion_threshold: Option<usize>,
}

/// Command-line overrides (None: not given).
#[derive(Debug, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
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
            shards: 0,
            segment_bytes: crate::storage::SEGMENT_BYTES_DEFAULT,
            auth: AuthConfig::DevSecret,
            limits: Limits::default(),
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// Defaults, then `file` (if any), then `flags`.
    pub fn load(file: Option<&Path>, flags: Overrides) -> Result<Config> {
        let mut config = Config::default();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            let f: FileConfig = toml::from_str(&text)
                .with_context(|| format!("parsing config file {}", path.display()))?;
            config.apply_file(f)?;
        }
        let l = &mut config.limits;
        config.listen = flags.listen.unwrap_or(config.listen);
        config.admin = flags.admin.unwrap_or(config.admin);
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
        Ok(config)
    }

    fn apply_file(&mut self, f: FileConfig) -> Result<()> {
        if f.hs256_secret_file.is_some() && f.ed25519_public_key_file.is_some() {
            bail!("set one of hs256_secret_file and ed25519_public_key_file, not both");
        }
        self.listen = f.listen.unwrap_or(self.listen);
        self.admin = f.admin.unwrap_or(self.admin);
        self.data_dir = f.data_dir.unwrap_or(self.data_dir.clone());
        self.shards = f.shards.unwrap_or(self.shards);
        self.segment_bytes = f.segment_bytes.unwrap_or(self.segment_bytes);
        if let Some(s) = f.shutdown_timeout_secs {
            self.shutdown_timeout = Duration::from_secs(s);
        }
        if let Some(p) = f.hs256_secret_file {
            self.auth = AuthConfig::Hs256File(p);
        }
        if let Some(p) = f.ed25519_public_key_file {
            self.auth = AuthConfig::EdDsaPublicKeyFile(p);
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
        Ok(())
    }

    /// The verification key. For the dev secret, creates it on first use and says so.
    pub fn verification_key(&self) -> Result<KeyConfig> {
        Ok(match &self.auth {
            AuthConfig::DevSecret => KeyConfig::Hs256 {
                secret: dev_secret(&self.data_dir, true)?,
            },
            AuthConfig::Hs256File(p) => KeyConfig::Hs256 {
                secret: read_trimmed(p)?,
            },
            AuthConfig::EdDsaPublicKeyFile(p) => KeyConfig::EdDsa {
                public_key_pem: std::fs::read(p)
                    .with_context(|| format!("reading public key {}", p.display()))?,
            },
        })
    }

    /// The signing key for `gateway token`: the dev secret or the HS256 secret file. An
    /// EdDSA deployment mints tokens with its private key elsewhere.
    pub fn signing_key(&self) -> Result<SigningKey> {
        Ok(match &self.auth {
            AuthConfig::DevSecret => SigningKey::Hs256 {
                secret: dev_secret(&self.data_dir, false)?,
            },
            AuthConfig::Hs256File(p) => SigningKey::Hs256 {
                secret: read_trimmed(p)?,
            },
            AuthConfig::EdDsaPublicKeyFile(_) => {
                bail!("tokens for an EdDSA key are minted with the private key, not by the gateway")
            }
        })
    }
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
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let mut raw = [0u8; DEV_SECRET_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .context("reading /dev/urandom")?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&path, hex.as_bytes())?;
    tracing::warn!(
        path = %path.display(),
        "generated a dev signing secret (HS256); mint tokens with `gateway token`. \
         Configure hs256_secret_file or ed25519_public_key_file in production"
    );
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
}
