//! A device host: core's client engine over turmoil TCP, with a random workload, reconnects
//! with backoff, takeovers (a second login of the same device) and explicit retries.
//!
//! The app around the engine keeps what a real IM app keeps in its local database: the
//! outbox of unacked messages (written before a message goes out), its own acked messages
//! with their seqs, the cursors of what it has shown, and what it has shown. In seeds with
//! device crashes it commits that state ([`Persisted`]) at every send and, at a seeded
//! probability, after the events of a read; a crash loses what was not committed, and the
//! next run of the app starts from the commit: [`Client::new`] with its cursors, then
//! [`Client::restore_unacked`] for its outbox.

use crate::gateway::{PORT, SECRET};
use crate::oracle::DeviceView;
use crate::rng::Rng;
use crate::run::{convs_of, core_now, Planted, Shared, EPOCH_MS};
use bytes::{Bytes, BytesMut};
use imgate_core::auth::{SigningKey, TokenSigner};
use imgate_core::client::{Client, ClientConfig, ClientEvent, Priority, SendFailure};
use imgate_core::proto::{ClientMsgId, ConvId, DeviceId, ErrorCode, Seq, UserId};
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
    seed: u64,
    index: usize,
    rng: Rng,
    /// Unacked ids that timed out, for explicit retries.
    timed_out: Vec<ClientMsgId>,
    /// A slow-reader fault in force.
    pub slow: Option<SlowRead>,
    /// Runs of the app so far, less one: bumped by every crash.
    pub incarnation: u64,
    /// A crash armed for right after the next send, with its down time.
    pub crash_after_send: Option<u64>,
    /// The app's state, as it is in memory.
    app: AppState,
    /// What the app last committed to its database (device crashes only).
    store: Option<Persisted>,
}

/// What the app keeps about its messages.
#[derive(Clone, Debug, Default)]
struct AppState {
    /// Messages made so far (numbers the payloads, so each payload is unique).
    made: u64,
    /// Unacked messages in send order.
    outbox: Vec<(ClientMsgId, ConvId, Bytes)>,
    /// Own acked messages: their (conv, seq) and the incarnation that saw the Ack.
    own_acked: BTreeMap<ClientMsgId, (ConvId, Seq, u64)>,
    /// The engine's cursors after the last events the app handled.
    cursors: BTreeMap<ConvId, Seq>,
}

/// One commit of the app's database: its state and what it had shown (the oracle's view of
/// the device at that moment).
#[derive(Clone, Debug, Default)]
pub struct Persisted {
    app: AppState,
    shown: DeviceView,
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
        Device {
            user,
            device: DeviceId(device),
            engine: Client::new(client_config(seed, index, user, device, 0), BTreeMap::new()),
            seed,
            index,
            rng: Rng::new(seed, 100 + index as u64),
            timed_out: Vec::new(),
            slow: None,
            incarnation: 0,
            crash_after_send: None,
            app: AppState::default(),
            store: None,
        }
    }
}

impl Device {
    /// Messages the app has made (as far as it remembers).
    pub fn made(&self) -> u64 {
        self.app.made
    }

    /// The payload of the app's message number `n`: unique in the run.
    pub fn payload(&self, n: u64) -> Bytes {
        Bytes::from(format!("u{}d{} #{n}", self.user.0, self.device.0))
    }
}

/// The engine's configuration for run `incarnation` of device `index`.
fn client_config(
    seed: u64,
    index: usize,
    user: UserId,
    device: u32,
    incarnation: u64,
) -> ClientConfig {
    let signer = TokenSigner::new(&SigningKey::Hs256 {
        secret: SECRET.to_vec(),
    })
    .expect("the sim's key is valid");
    let token = signer.mint(
        user,
        DeviceId(device),
        Instant::from_millis(EPOCH_MS + 86_400_000),
    );
    ClientConfig {
        token,
        device: DeviceId(device),
        // Each run of the app draws its own ids (the engine's documented requirement).
        seed: seed
            .wrapping_mul(31)
            .wrapping_add(index as u64)
            .wrapping_add(incarnation.wrapping_mul(0x9E37_79B9)),
        request_timeout: Duration::from_secs(3),
        heartbeat_interval: Duration::from_secs(2),
        ..ClientConfig::default()
    }
}

/// Commits device `index`'s app state, with what it has shown, to its database.
fn commit(sh: &mut Shared, index: usize) {
    let shown = sh.oracle.device_view(index);
    let d = &mut sh.devices[index];
    d.store = Some(Persisted {
        app: d.app.clone(),
        shown,
    });
}

/// Device `index`'s process died: what it did not commit is gone. Its next run starts from
/// the commit: the engine from the persisted cursors, its outbox put back with the original
/// ids, the oracle's view of what it showed rolled back to the commit. Returns how many
/// unacked messages were put back.
pub fn crash(sh: &mut Shared, index: usize) -> usize {
    let now = core_now();
    let planted = sh.cfg.planted;
    let store = sh.devices[index].store.clone().unwrap_or_default();
    sh.oracle.restore_device_view(index, &store.shown);
    let d = &mut sh.devices[index];
    d.incarnation += 1;
    d.crash_after_send = None;
    let config = client_config(d.seed, d.index, d.user, d.device.0, d.incarnation);
    d.engine = Client::new(config, store.app.cursors.clone());
    d.timed_out.clear();
    d.app = store.app;
    let mut outbox = std::mem::take(&mut d.app.outbox);
    if planted == Some(Planted::OutboxDropped) {
        // Planted bug (g): the app forgets its unacked messages.
        outbox.clear();
    }
    for (id, conv, payload) in outbox {
        let id = if planted == Some(Planted::OutboxNewIds) {
            // Planted bug (f): the app re-sends its outbox as new messages.
            d.engine
                .send(now, conv, payload.clone(), Priority::Normal)
                .expect("the outbox fits")
        } else {
            d.engine
                .restore_unacked(id, conv, payload.clone(), Priority::Normal)
                .expect("the outbox fits");
            id
        };
        d.app.outbox.push((id, conv, payload));
    }
    d.app.outbox.len()
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
    let mut stopped = false;
    loop {
        if stopped {
            // Nothing more happens until the crash takes the host.
            std::future::pending::<()>().await;
        }
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
        let mut sent = false;
        if workload_on && d.engine.is_authenticated() && d.rng.chance(0.02) {
            let convs = convs_of(d.user.0);
            let conv = convs[d.rng.range(0, convs.len() as u64) as usize];
            d.app.made += 1;
            let payload = d.payload(d.app.made);
            if let Ok(id) = d.engine.send(now, conv, payload.clone(), Priority::Normal) {
                d.app.outbox.push((id, conv, payload));
                sent = true;
            }
        }
        // The app's retry policy: a timed-out or retriably Nacked message is retried after
        // a random pause (the engine leaves that to the app); the retry fault makes it eager.
        // Once the faults stop the app retries briskly, one message every few ms, so that
        // a backlog piled up while the disk was full (every send Nacked StorageFailed)
        // drains within the heal.
        let p_retry = if faults_on {
            0.02 + rates.retry * 10.0
        } else {
            0.5
        };
        if !d.timed_out.is_empty() && d.rng.chance(p_retry) {
            let id = d.timed_out.remove(0);
            d.engine.retry(now, id);
            sh.counts.retry += 1;
        }
        if faults_on && d.engine.is_authenticated() && d.rng.chance(rates.takeover) {
            end = Some(End::Takeover);
        }
        if sent && rates.persist > 0.0 {
            // The app writes a message to its database before it goes out.
            commit(sh, index);
            if let Some(down_ms) = sh.devices[index].crash_after_send.take() {
                // An armed crash: the app dies with the message committed and not sent.
                sh.event(format!("dev{index} stops right after a send"));
                sh.device_stopped.push((index, down_ms));
                stopped = true;
            }
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
    let mut handled = false;
    while let Some(ev) = sh.devices[index].engine.poll_event() {
        let user = sh.devices[index].user;
        let before = sh.violation_count();
        let d = &mut sh.devices[index];
        match ev {
            ClientEvent::Acked {
                client_msg_id,
                conv,
                seq,
            } => {
                handled = true;
                d.app.outbox.retain(|(id, _, _)| *id != client_msg_id);
                let acked = (conv, seq, d.incarnation);
                d.app.own_acked.insert(client_msg_id, acked);
                sh.event(format!("dev{index}: acked {conv} seq {}", seq.0));
                sh.oracle
                    .handle_acked(index, user, client_msg_id, conv, seq);
            }
            ClientEvent::Message {
                conv,
                seq,
                sender,
                client_msg_id,
                payload,
                ..
            } => {
                handled = true;
                // After a restart, an own message acked (and shown) by an earlier run comes
                // back as a Message if it is above the persisted cursor; the app knows it by
                // its id and does not show it again.
                let earlier = d.app.own_acked.get(&client_msg_id).copied();
                if sender == user
                    && earlier.is_some_and(|a| a == (conv, seq, a.2) && a.2 < d.incarnation)
                {
                    sh.event(format!(
                        "dev{index}: own {conv} seq {} again, shown before",
                        seq.0
                    ));
                    continue;
                }
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
                handled = true;
                if retriable {
                    d.timed_out.push(client_msg_id);
                } else {
                    d.app.outbox.retain(|(id, _, _)| *id != client_msg_id);
                }
                sh.event(format!("dev{index}: nacked {code:?}"));
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
            ClientEvent::Authenticated { .. } => {
                let convs = convs_of(user.0);
                sh.oracle.handle_authenticated(index, &convs);
            }
            ClientEvent::Inbox { entries, more } => {
                let convs = convs_of(user.0);
                let entries: Vec<_> = entries.iter().map(|e| (e.conv, e.latest_seq)).collect();
                sh.oracle.handle_inbox(index, &convs, &entries, more);
            }
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
    let persist = sh.rates.persist;
    if handled && persist > 0.0 {
        let d = &mut sh.devices[index];
        d.app.cursors = d.engine.cursors().clone();
        // The app commits what it showed now and then, not after every read.
        if d.rng.chance(persist) {
            commit(&mut sh, index);
        }
    }
}
