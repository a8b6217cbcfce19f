//! Black-box helpers: start the real `gateway` binary on loopback with its own data dir,
//! and talk to it with blocking sockets and the proto codec.
#![allow(dead_code)]

use bytes::{Bytes, BytesMut};
use imgate_core::auth::{SigningKey, TokenSigner};
use imgate_core::proto::meta::{self, Meta};
use imgate_core::proto::{ClientMsgId, ConvId, Decoder, DeviceId, Encoder, UserId};
use imgate_core::Instant;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long any single wait in these tests may take before it fails.
pub const WAIT: Duration = Duration::from_secs(10);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The gateway binary, built on first use.
pub fn gateway_bin() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    debug_bin(&BUILT, "imgate-gateway", "gateway")
}

/// The loadgen binary, built on first use.
pub fn loadgen_bin() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    debug_bin(&BUILT, "imgate-loadgen", "loadgen")
}

/// The gateway binary built with the `fault-injection` feature (admin routes that make a
/// shard panic or stall), built on first use into its own target dir (`target/fault`) so
/// that it never replaces the normal binary other tests run.
pub fn fault_gateway_bin() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let target = target_dir().join("fault");
    BUILT.call_once(|| {
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "-p",
                "imgate-gateway",
                "--bin",
                "gateway",
            ])
            .args(["--features", "fault-injection", "--target-dir"])
            .arg(&target)
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
            .status()
            .expect("cargo build runs");
        assert!(
            status.success(),
            "building the fault-injection gateway failed"
        );
    });
    target.join("debug").join("gateway")
}

/// Builds `bin` of `package` (debug) once per test process and returns its path.
fn debug_bin(built: &std::sync::Once, package: &str, bin: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    built.call_once(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", package, "--bin", bin])
            .current_dir(root)
            .status()
            .expect("cargo build runs");
        assert!(status.success(), "building {bin} failed");
    });
    target_dir().join("debug").join(bin)
}

/// The workspace's target dir.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr")
}

/// A running gateway process.
pub struct Gateway {
    pub child: Option<Child>,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub data_dir: PathBuf,
    pub shards: usize,
    extra: Vec<String>,
    /// The binary `spawn` runs.
    bin: PathBuf,
}

impl Gateway {
    /// Starts a gateway with `shards` shards in a fresh data dir.
    pub fn start(shards: usize, extra: &[&str]) -> Gateway {
        Gateway::start_bin(gateway_bin(), shards, extra)
    }

    /// [`Gateway::start`] with another gateway binary (see [`fault_gateway_bin`]).
    pub fn start_bin(bin: PathBuf, shards: usize, extra: &[&str]) -> Gateway {
        let data_dir = std::env::temp_dir().join(format!(
            "imgate-e2e-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&data_dir);
        let mut g = Gateway {
            child: None,
            listen: free_port(),
            admin: free_port(),
            data_dir,
            shards,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            bin,
        };
        g.spawn();
        g
    }

    /// Starts the process again on the same ports and data dir.
    pub fn spawn(&mut self) {
        let child = Command::new(&self.bin)
            .arg("run")
            .arg("--listen")
            .arg(self.listen.to_string())
            .arg("--admin")
            .arg(self.admin.to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--shards")
            .arg(self.shards.to_string())
            .args(&self.extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("gateway starts");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until every shard accepts and the admin server answers.
    fn wait_ready(&mut self) {
        eventually("the gateway ready", || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("gateway exited during start: {status}");
            }
            // The admin server starts first; a client connection proves the shards.
            let up = self
                .http("GET", "/healthz", "")
                .is_some_and(|(code, _)| code == 200)
                && TcpStream::connect(self.listen).is_ok();
            up.then_some(())
        })
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        // The `kill` command sends SIGTERM without unsafe code in the test.
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status()
            .expect("kill runs");
        assert!(ok.success());
        eventually_within(WAIT * 2, "an exit after SIGTERM", || {
            c.try_wait().expect("wait")
        })
    }

    /// One HTTP request to the admin server with the admin token of this data dir (none
    /// before the gateway wrote it): (status, body), or None if it is not up.
    pub fn http(&self, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
        let token = std::fs::read_to_string(self.data_dir.join("admin-token")).ok();
        self.http_as(token.as_deref().map(str::trim), method, path, body)
    }

    /// The admin token the gateway generated in its data dir.
    pub fn admin_token(&self) -> String {
        let token =
            std::fs::read_to_string(self.data_dir.join("admin-token")).expect("admin token exists");
        token.trim().to_owned()
    }

    /// [`Gateway::http`] with this bearer token, or without an `Authorization` header.
    pub fn http_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: &str,
    ) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(self.admin).ok()?;
        s.set_read_timeout(Some(WAIT)).ok()?;
        let authorization = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{authorization}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let code = out.split(' ').nth(1)?.parse().ok()?;
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        Some((code, body))
    }

    /// A token for (user, device) signed with the dev secret of this data dir.
    pub fn token(&self, user: u64, device: u32) -> String {
        let secret = std::fs::read_to_string(self.data_dir.join("dev-secret.hex"))
            .expect("dev secret exists");
        let signer = TokenSigner::new(&SigningKey::Hs256 {
            secret: secret.trim().as_bytes().to_vec(),
        })
        .expect("dev secret is a valid key");
        signer.mint(
            UserId(user),
            DeviceId(device),
            now() + Duration::from_secs(3600),
        )
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

pub fn now() -> Instant {
    Instant::from_millis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as u64,
    )
}

/// A blocking client speaking raw frames.
pub struct Client {
    pub stream: TcpStream,
    rx: BytesMut,
    encoder: Encoder,
    decoder: Decoder,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        Client {
            stream,
            rx: BytesMut::new(),
            encoder: Encoder::new(),
            decoder: Decoder::new(u32::MAX),
        }
    }

    /// Connects and authenticates; panics unless AuthOk comes back.
    pub fn login(g: &Gateway, user: u64, device: u32) -> Client {
        let mut c = Client::connect(g.listen);
        c.send_frame(
            &Meta::Auth(meta::Auth {
                token: g.token(user, device),
            }),
            &[],
        );
        match c.recv() {
            Some((Meta::AuthOk(_), _)) => c,
            other => panic!("expected AuthOk, got {other:?}"),
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub fn send_frame(&mut self, meta: &Meta, payload: &[u8]) {
        let bytes = self.encoder.encode_to_bytes(meta, payload);
        self.stream.write_all(&bytes).expect("write");
    }

    pub fn send_msg(&mut self, req: u32, conv: ConvId, id: ClientMsgId, payload: &[u8]) {
        self.send_frame(
            &Meta::Send(meta::Send {
                req,
                client_msg_id: id,
                conv,
                priority: meta::Priority::Normal,
            }),
            payload,
        );
    }

    /// The next frame, or None on EOF (or a reset). Panics after `WAIT` of silence.
    pub fn recv(&mut self) -> Option<(Meta, Bytes)> {
        loop {
            if let Some(f) = self
                .decoder
                .decode(&mut self.rx)
                .expect("gateway frames decode")
            {
                return Some((f.meta, f.payload));
            }
            let mut buf = [0u8; 16 * 1024];
            match self.stream.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.rx.extend_from_slice(&buf[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    panic!("no frame from the gateway within {WAIT:?}")
                }
                Err(_) => return None,
            }
        }
    }

    /// Frames until one matches `pred` (returned last), or EOF.
    pub fn recv_until(&mut self, pred: impl Fn(&Meta) -> bool) -> Vec<(Meta, Bytes)> {
        let mut out = Vec::new();
        while let Some(f) = self.recv() {
            let done = pred(&f.0);
            out.push(f);
            if done {
                break;
            }
        }
        out
    }

    /// Reads frames until the gateway closes; returns them.
    pub fn drain_until_closed(&mut self) -> Vec<(Meta, Bytes)> {
        let mut out = Vec::new();
        while let Some(f) = self.recv() {
            out.push(f);
        }
        out
    }

    /// The next frame if one comes within `limit`, without panicking on silence. The
    /// stream's read timeout is `WAIT` again afterwards.
    pub fn next_within(&mut self, limit: Duration) -> Next {
        let deadline = std::time::Instant::now() + limit;
        let next = loop {
            if let Some(f) = self
                .decoder
                .decode(&mut self.rx)
                .expect("gateway frames decode")
            {
                break Next::Frame(f.meta, f.payload);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break Next::Silent;
            }
            self.stream.set_read_timeout(Some(left)).expect("timeout");
            let mut buf = [0u8; 16 * 1024];
            match self.stream.read(&mut buf) {
                Ok(0) => break Next::Closed,
                Ok(n) => self.rx.extend_from_slice(&buf[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break Next::Closed,
            }
        };
        self.stream.set_read_timeout(Some(WAIT)).expect("timeout");
        next
    }
}

/// What [`Client::next_within`] saw.
#[derive(Debug)]
pub enum Next {
    /// A frame.
    Frame(Meta, Bytes),
    /// EOF or a reset.
    Closed,
    /// Nothing within the time limit.
    Silent,
}

pub fn msg_id(n: u64, who: u64) -> ClientMsgId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_le_bytes());
    id[8..].copy_from_slice(&who.to_le_bytes());
    ClientMsgId(id)
}

/// The samples of the per-shard metric `name`, in shard order.
pub fn per_shard(g: &Gateway, name: &str) -> Vec<u64> {
    let (code, body) = g.http("GET", "/metrics", "").expect("metrics answer");
    assert_eq!(code, 200, "{body}");
    let prefix = format!("{name}{{shard=\"");
    let mut samples: Vec<(usize, u64)> = body
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (shard, value) = rest.split_once("\"} ")?;
            Some((shard.parse().ok()?, value.parse::<f64>().ok()? as u64))
        })
        .collect();
    samples.sort_unstable();
    samples.into_iter().map(|(_, v)| v).collect()
}

/// How often a poll re-reads what it waits for.
const POLL: Duration = Duration::from_millis(20);

/// Polls `probe` until it returns `Some`, for at most `limit`; panics naming `what` after.
/// For states a test can observe but not be told of (metrics, descriptors, exits).
pub fn eventually_within<T>(
    limit: Duration,
    what: &str,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        std::thread::sleep(POLL);
    }
}

/// [`eventually_within`] [`WAIT`].
pub fn eventually<T>(what: &str, probe: impl FnMut() -> Option<T>) -> T {
    eventually_within(WAIT, what, probe)
}

/// Polls `cond` until it holds, for at most `limit`; panics naming `what` after.
pub fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    eventually_within(limit, what, || cond().then_some(()))
}
