//! A device host: core's client engine over turmoil TCP, with a random workload, reconnects
//! with backoff, takeovers (a second login of the same device) and explicit retries.

use crate::gateway::{PORT, SECRET};
use crate::rng::Rng;
use crate::run::{convs_of, core_now, Shared, EPOCH_MS};
use bytes::{Bytes, BytesMut};
use imgate_core::auth::{SigningKey, TokenSigner};
use imgate_core::client::{Client, ClientConfig, ClientEvent, Priority, SendFailure};
use imgate_core::proto::{ClientMsgId, DeviceId, ErrorCode, UserId};
use imgate_core::Instant;
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use turmoil::net::TcpStream;

/// One simulated device: its engine lives here so the oracle can read it after the run.
pub struct Device {
    /// The user.
    pub user: UserId,
    /// The device.
    pub device: DeviceId,
    /// The client engine.
    pub engine: Client,
    rng: Rng,
    sent: u64,
    /// Unacked ids that timed out, for explicit retries.
    timed_out: Vec<ClientMsgId>,
    /// A slow-reader fault in force.
    pub slow: Option<SlowRead>,
}

/// A slow-reader fault: the device reads at most `chunk` bytes every `pause_ms` until
/// `until_ms` (simulated).
#[derive(Clone, Copy, Debug)]
pub struct SlowRead {
    /// Simulated ms at which the device reads normally again.
    pub until_ms: u64,
    /// Bytes per read at most.
    pub chunk: usize,
    /// Pause before each read.
    pub pause_ms: u64,
}

impl Device {
    /// Device `index` of `user`.
    pub fn new(seed: u64, index: usize, user: UserId, device: u32) -> Device {
        let signer = TokenSigner::new(&SigningKey::Hs256 {
            secret: SECRET.to_vec(),
        })
        .expect("the sim's key is valid");
        let token = signer.mint(
            user,
            DeviceId(device),
            Instant::from_millis(EPOCH_MS + 86_400_000),
        );
        let config = ClientConfig {
            token,
            device: DeviceId(device),
            seed: seed.wrapping_mul(31).wrapping_add(index as u64),
            request_timeout: Duration::from_secs(3),
            heartbeat_interval: Duration::from_secs(2),
            ..ClientConfig::default()
        };
        Device {
            user,
            device: DeviceId(device),
            engine: Client::new(config, BTreeMap::new()),
            rng: Rng::new(seed, 100 + index as u64),
            sent: 0,
            timed_out: Vec::new(),
            slow: None,
        }
    }
}

#[derive(Default)]
struct Inbox {
    bytes: BytesMut,
    closed: bool,
}

enum End {
    Close,
    Takeover,
}

/// The device host's software: connect, run a session, back off, again.
pub async fn host(shared: Rc<RefCell<Shared>>, index: usize) -> turmoil::Result {
    // Old connections kept open by takeovers, so the gateway sees two logins.
    let mut zombies: VecDeque<mpsc::UnboundedSender<Bytes>> = VecDeque::new();
    loop {
        let connect = TcpStream::connect(("gateway", PORT));
        let stream = match tokio::time::timeout(Duration::from_secs(2), connect).await {
            Ok(Ok(s)) => s,
            _ => {
                let wait = shared.borrow_mut().devices[index].rng.range(50, 500);
                tokio::time::sleep(Duration::from_millis(wait)).await;
                continue;
            }
        };
        let end = session(&shared, index, stream, &mut zombies).await;
        if zombies.len() > 2 {
            zombies.pop_front();
        }
        if let End::Close = end {
            let wait = shared.borrow_mut().devices[index].rng.range(10, 300);
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }
}

async fn session(
    shared: &Rc<RefCell<Shared>>,
    index: usize,
    stream: TcpStream,
    zombies: &mut VecDeque<mpsc::UnboundedSender<Bytes>>,
) -> End {
    let (mut rd, mut wr) = stream.into_split();
    let inbox = Rc::new(RefCell::new(Inbox::default()));
    let reader = {
        let inbox = inbox.clone();
        let shared = shared.clone();
        tokio::task::spawn_local(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let now_ms = turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as u64);
                let slow = shared.borrow().devices[index].slow;
                let mut want = buf.len();
                if let Some(s) = slow.filter(|s| s.until_ms > now_ms) {
                    // A slow reader: a pause, then a small read.
                    let pause = s.pause_ms.min(s.until_ms - now_ms);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    want = s.chunk;
                }
                match rd.read(&mut buf[..want]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => inbox.borrow_mut().bytes.extend_from_slice(&buf[..n]),
                }
            }
            inbox.borrow_mut().closed = true;
        })
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    {
        let inbox = inbox.clone();
        tokio::task::spawn_local(async move {
            while let Some(b) = rx.recv().await {
                if wr.write_all(&b).await.is_err() {
                    inbox.borrow_mut().closed = true;
                    return;
                }
            }
            let _ = wr.shutdown().await;
        });
    }
    let storm_gen = {
        let mut sh = shared.borrow_mut();
        sh.event(format!("dev{index}: connected"));
        sh.devices[index].engine.handle_connected(core_now());
        sh.storm_gen
    };
    let mut end = None;
    loop {
        let wait = shared.borrow_mut().devices[index].rng.range(1, 6);
        flush(shared, index, &tx, &mut end);
        if let Some(e) = end.take() {
            let mut sh = shared.borrow_mut();
            match e {
                End::Takeover => {
                    sh.counts.takeover += 1;
                    sh.event(format!("fault: dev{index} logs in again (takeover)"));
                    zombies.push_back(tx);
                }
                End::Close => {
                    sh.devices[index].engine.handle_disconnected(core_now());
                    sh.event(format!("dev{index}: disconnected"));
                    drop(sh);
                    reader.abort();
                    // Events of the disconnect (failed requests) go to the oracle; nothing is written.
                    flush(shared, index, &mpsc::unbounded_channel().0, &mut None);
                }
            }
            return e;
        }
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let now = core_now();
        let mut sh = shared.borrow_mut();
        let sh = &mut *sh;
        let faults_on = sh.faults_on;
        let workload_on = sh.workload_on;
        let rates = sh.rates.clone();
        let d = &mut sh.devices[index];
        let closed = {
            let mut ib = inbox.borrow_mut();
            if !ib.bytes.is_empty() {
                d.engine.handle_bytes(now, &mut ib.bytes);
            }
            ib.closed
        };
        if closed {
            end = Some(End::Close);
            continue;
        }
        if d.engine.poll_timeout().is_some_and(|t| t <= now) {
            d.engine.handle_timeout(now);
        }
        if sh.storm_gen != storm_gen {
            end = Some(End::Close);
            continue;
        }
        if workload_on && d.engine.is_authenticated() && d.rng.chance(0.02) {
            let convs = convs_of(d.user.0);
            let conv = convs[d.rng.range(0, convs.len() as u64) as usize];
            d.sent += 1;
            let payload = Bytes::from(format!("u{}d{} #{}", d.user.0, d.device.0, d.sent));
            let _ = d.engine.send(now, conv, payload, Priority::Normal);
        }
        // The app's retry policy: a timed-out or retriably Nacked message is retried after
        // a random pause (the engine leaves that to the app); the retry fault makes it eager.
        let p_retry = if faults_on {
            0.02 + rates.retry * 10.0
        } else {
            0.05
        };
        if !d.timed_out.is_empty() && d.rng.chance(p_retry) {
            let id = d.timed_out.remove(0);
            d.engine.retry(now, id);
            sh.counts.retry += 1;
        }
        if faults_on && d.engine.is_authenticated() && d.rng.chance(rates.takeover) {
            end = Some(End::Takeover);
        }
    }
}

/// Writes what the engine has to send, then hands its events to the oracle.
fn flush(
    shared: &Rc<RefCell<Shared>>,
    index: usize,
    tx: &mpsc::UnboundedSender<Bytes>,
    end: &mut Option<End>,
) {
    let mut sh = shared.borrow_mut();
    while let Some(b) = sh.devices[index].engine.poll_transmit() {
        let _ = tx.send(b);
    }
    while let Some(ev) = sh.devices[index].engine.poll_event() {
        let user = sh.devices[index].user;
        let before = sh.violation_count();
        match ev {
            ClientEvent::Acked {
                client_msg_id,
                conv,
                seq,
            } => {
                sh.event(format!("dev{index}: acked {conv} seq {}", seq.0));
                sh.oracle
                    .handle_acked(index, user, client_msg_id, conv, seq);
            }
            ClientEvent::Message {
                conv,
                seq,
                client_msg_id,
                payload,
                ..
            } => {
                sh.event(format!("dev{index}: message {conv} seq {}", seq.0));
                sh.oracle
                    .handle_message(index, conv, seq, client_msg_id, &payload);
            }
            ClientEvent::SendFailed {
                client_msg_id,
                reason: SendFailure::Timeout,
                ..
            } => {
                sh.devices[index].timed_out.push(client_msg_id);
            }
            ClientEvent::Nacked {
                code,
                client_msg_id,
                retriable,
                ..
            } => {
                sh.event(format!("dev{index}: nacked {code:?}"));
                if retriable {
                    sh.devices[index].timed_out.push(client_msg_id);
                }
            }
            ClientEvent::HistoryGap {
                conv,
                from_seq,
                to_seq,
            } => {
                let v = format!(
                    "I4: dev{index} told {conv} seqs {}..={} are gone",
                    from_seq.0, to_seq.0
                );
                sh.oracle.violations.push(v);
            }
            ClientEvent::Notify { .. } => sh.counts.notify_seen += 1,
            ClientEvent::Closed { .. } | ClientEvent::Dead => {
                if matches!(
                    ev,
                    ClientEvent::Closed {
                        code: ErrorCode::SlowConsumer,
                        ..
                    }
                ) {
                    sh.counts.slow_closed += 1;
                }
                sh.event(format!("dev{index}: {ev:?}"));
                if end.is_none() {
                    *end = Some(End::Close);
                }
            }
            _ => {}
        }
        sh.note_violations(before);
    }
}
