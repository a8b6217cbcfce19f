//! The admin HTTP server: `/metrics`, `/healthz`, group membership and drain, on its own
//! thread and its own port.
//!
//! The server runs on a tokio current-thread runtime with a `LocalSet` on a thread of its
//! own ([`spawn`]), apart from the shards: a stalled shard cannot stop `/healthz` from
//! saying so, and the admin server's work (rendering metrics, parsing JSON) never takes a
//! shard's turn. Everything here is single-threaded, so the context holds `Rc`s.
//!
//! This module owns the HTTP/1.1 handling: one request per connection, answered with
//! `Connection: close`; the request head's checks (the head itself is tokenised by
//! `httparse`; what it leaves open, such as `Content-Length`, `Transfer-Encoding` and
//! `Expect`, is checked here); the bearer-token check; and the connection slots. It
//! leaves to the runtime how a command reaches its owner shard and what a drain does:
//! both sit behind the [`Control`] trait, which the runtime implements over its shard
//! channels.
//!
//! Every route but `/healthz` requires `Authorization: Bearer <token>`, the token from the
//! config ([`AdminToken`]); a missing or wrong one gets 401 before any body is read.
//! `/healthz` stays open: load-balancer and orchestrator probes seldom carry credentials,
//! and it only tells what any client can find out by connecting (whether the gateway
//! serves), while `/metrics` tells traffic and internals and the other routes change state.
//!
//! Routes:
//! - `GET /healthz` (no token): 200 `ok` while every shard's loop has turned within
//!   [`SHARD_SILENCE_MAX`]; otherwise 503 with a line per silent shard naming it; 503
//!   `draining` once a drain started.
//! - `GET /metrics`: 200, [`Metrics::render`] as `text/plain; version=0.0.4`.
//! - `POST /groups` `{"id": 42, "members": [1, 2]}`: creates group 42.
//! - `POST /groups/42/members` `{"members": [4]}`: adds members.
//! - `DELETE /groups/42/members` `{"members": [4]}`: removes members.
//!   The group routes answer 200 `{"ok":true}` or `{"error":"..."}` with 400 (bad JSON,
//!   group id 0, [`CommandError::NotAGroup`], [`CommandError::BadMembers`]), 404
//!   ([`CommandError::NoSuchGroup`]), 409 ([`CommandError::AlreadyExists`]), 503
//!   ([`CommandError::StorageFailed`], [`CommandError::Busy`]) or 504 (no answer within [`COMMAND_TIMEOUT`]).
//! - `POST /drain`: 202; asks the runtime to drain (stop accepting, GoAway, exit).
//! - With the cargo feature `fault-injection` only (tests; never shipped):
//!   `POST /fault/shards/{i}/panic`, `.../stall`, `.../resume`: 202; see `fault.rs`.
//!
//! Invariants: every connection is bounded in bytes ([`HEAD_BYTES_MAX`],
//! [`HEADERS_MAX`], [`BODY_BYTES_MAX`], [`LINGER_BYTES_MAX`]), in time ([`HEAD_TIMEOUT`],
//! [`BODY_TIMEOUT`], [`WRITE_TIMEOUT`], [`COMMAND_TIMEOUT`], [`LINGER_TIMEOUT`]) and in
//! number ([`CONNECTIONS_MAX`]); a connection without a valid token can always be evicted
//! to make room for a new one (see [`Slots`]), so no number of slow or silent clients keeps
//! `/healthz` or `/metrics` waiting; bad input gets a 4xx/5xx status with a short body
//! (text, or JSON on the group routes) and a close, never a panic.

use crate::metrics::Metrics;
use imgate_core::mesh::{Command, CommandError};
use imgate_core::proto::{ConvId, UserId};
use serde::Deserialize;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// Largest request head (request line and headers) accepted: 8 KiB, the common default of
/// HTTP servers, far above what an admin client sends.
pub const HEAD_BYTES_MAX: usize = 8 * 1024;
/// Most header fields in a request head: `httparse` fills a fixed array of this many.
/// An admin client sends a handful (curl four, a scraper or probe fewer than ten, a proxy
/// on the way adds a few), so 64 leaves room many times over while the array stays 2 KiB
/// on the stack. More gets 431, like a head over [`HEAD_BYTES_MAX`].
pub const HEADERS_MAX: usize = 64;
/// Largest request body accepted: 1 MiB holds a member list of over 100,000 ids, the
/// core's `group_members_max`, written as JSON.
pub const BODY_BYTES_MAX: usize = 1024 * 1024;
/// Time a client has to send its whole request head once connected. One deadline for the
/// whole head, not per read, so a client trickling a byte at a time gains nothing. Every
/// admin client (curl, a scraper, a load-balancer probe) sends its head in one segment
/// right after connecting, so 2 s is hundreds of round trips even across regions, while a
/// silent connection gives its slot back five times sooner than under the 10 s that one
/// deadline for head and body used to allow.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a client with a valid token has to send its body once its head is in: a body of
/// [`BODY_BYTES_MAX`] at 1 Mbit/s takes 8 s. Only token holders get this far (the token
/// is checked on the head), so this bounds a slow operator, not an attacker.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to take the whole response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a group command has to be answered by its owner shard (a durable log append
/// there, milliseconds normally). Past it the client gets 504; the command may still
/// take effect.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once: the admin port is for operators, scrapers and probes, a
/// handful at a time, and each connection holds up to two buffers of the sizes above. When
/// all are taken, a new connection evicts the longest-waiting one without a valid token
/// (see [`Slots`]); only if every slot serves a token holder does it wait in the backlog.
pub const CONNECTIONS_MAX: usize = 64;
/// After answering, the server shuts its side down and reads (and drops) what the client
/// still sends, so that closing with unread data does not reset the connection before the
/// client has read the answer (for example an oversized request that was cut short).
/// This bounds that read in bytes ...
pub const LINGER_BYTES_MAX: usize = 64 * 1024;
/// ... and in time.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
/// `/healthz` answers 200 only while every shard's loop has turned within this. A shard
/// turns every 100 ms (its tick), so 2 s is 20 missed ticks: a shard stuck in a loop, a
/// blocking call or a dead thread, not one that is merely busy; and it is well inside the
/// 5-10 s interval at which load balancers probe, so one probe sees it.
pub const SHARD_SILENCE_MAX: Duration = Duration::from_secs(2);
/// Pause after a failed accept (such as EMFILE) so that a persistent error does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Size of one read while lingering.
const LINGER_CHUNK_BYTES: usize = 4096;
/// The name of the admin server's thread, as `top -H` and panic messages show it.
const THREAD_NAME: &str = "imgate-admin";

/// What the admin server needs from the runtime. The futures are local (not `Send`): the
/// admin server runs on one thread, inside a tokio `LocalSet`, and polls them there (an
/// implementation may wait on anything that wakes a `Waker` from another thread, such as
/// a `tokio::sync` channel fed by a shard).
pub trait Control {
    /// Runs a group command on the group's owner shard; resolves once the command is
    /// durable and applied there, or failed. The future may borrow `self`.
    fn command(&self, cmd: Command)
        -> Pin<Box<dyn Future<Output = Result<(), CommandError>> + '_>>;
    /// Starts a drain: stop accepting, send GoAway to clients, flush, sync, exit. Called
    /// again while draining, it must do nothing more.
    fn drain(&self);
    /// Whether a drain has started.
    fn is_draining(&self) -> bool;
    /// Asks shard `shard` (an index below the metrics' shard count and
    /// `fault::SHARDS_MAX`) for `fault` on its next turn. Test builds only.
    #[cfg(feature = "fault-injection")]
    fn inject(&self, shard: usize, fault: crate::fault::Fault);
}

/// The admin API's bearer token. Its `Debug` does not show it.
#[derive(Clone)]
pub struct AdminToken(Rc<[u8]>);

impl AdminToken {
    /// The token `token` (the config's, see `Config::admin_token`). Must not be empty:
    /// an empty token would admit an empty `Bearer` credential.
    pub fn new(token: &[u8]) -> AdminToken {
        assert!(!token.is_empty(), "an empty admin token admits anyone");
        AdminToken(token.into())
    }

    /// Whether an `Authorization` header value carries this token: the `Bearer` scheme
    /// (any case) and the token, compared in constant time.
    fn admits(&self, authorization: Option<&str>) -> bool {
        let Some((scheme, credentials)) = authorization.and_then(|a| a.split_once(' ')) else {
            return false;
        };
        scheme.eq_ignore_ascii_case("bearer")
            && constant_time_eq(&self.0, credentials.trim_matches(' ').as_bytes())
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// Whether `presented` equals `expected`, in a time that depends on `expected`'s length
/// only: every byte is compared and the differences are OR-ed together, with no early exit
/// a client could time to guess the token byte by byte. (Whether the lengths differ is
/// folded in too; the length of the token is no secret: a generated one is 64 hex digits.)
fn constant_time_eq(expected: &[u8], presented: &[u8]) -> bool {
    let mut diff = u8::from(expected.len() != presented.len());
    for (i, e) in expected.iter().enumerate() {
        diff |= e ^ presented.get(i).copied().unwrap_or(0);
    }
    // Keeps the optimiser from turning the fold back into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// Everything the admin server serves from. Built on the admin thread (see [`spawn`]),
/// since it holds `Rc`s.
#[derive(Clone)]
pub struct AdminContext {
    /// The metrics every shard updates.
    pub metrics: Arc<Metrics>,
    /// The way to the shards.
    pub control: Rc<dyn Control>,
    /// The token every route but `/healthz` requires.
    pub token: AdminToken,
}

/// Serves admin HTTP on `listener` forever, one task per connection, at most
/// [`CONNECTIONS_MAX`] at once. Must be polled inside a tokio `LocalSet` on a runtime with
/// I/O and time enabled (it spawns local tasks and uses tokio's timers); [`spawn`] sets
/// that up. It never returns; a runtime that wants to stop it drops its runtime or races
/// it against a shutdown future.
pub async fn serve(listener: TcpListener, ctx: AdminContext) {
    serve_with(listener, ctx, Timeouts::DEFAULT).await;
}

/// Starts the admin server on a thread of its own, named `imgate-admin`, serving on
/// `listener` (already bound, so that a bad address fails before anything starts) until
/// the process exits.
///
/// The thread builds a tokio current-thread runtime (I/O and time) and a `LocalSet`,
/// registers `listener` with it, then calls `make_ctx` and runs [`serve`]. `make_ctx` runs
/// on the admin thread inside the `LocalSet`: the context it builds may hold `Rc`s, and it
/// may `tokio::task::spawn_local` helper tasks (such as one that hands the shards'
/// answers to waiting commands).
///
/// Returns once the server is ready; an error if the thread, the runtime or the
/// listener's registration could not be set up, or if `make_ctx` panicked (unless a panic
/// hook ends the process first, as the gateway's does). The handle is only for a caller
/// that wants to know the thread; joining it waits forever.
pub fn spawn(
    listener: std::net::TcpListener,
    make_ctx: impl FnOnce() -> AdminContext + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    // tokio takes over a listener in non-blocking mode only.
    listener.set_nonblocking(true)?;
    // The thread reports once whether it is ready, so that a failed set-up is this call's
    // error and not a log line from a thread that quietly ended. One message, so a
    // capacity of 1 never blocks the thread.
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<std::io::Result<()>>(1);
    let thread = std::thread::Builder::new()
        .name(THREAD_NAME.to_owned())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    // `spawn` waits on the receiver for this one message, so the send
                    // cannot fail; there is nothing else to do with an error if it did.
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, async move {
                // `from_std` registers the socket with this runtime's I/O driver, so it
                // must run inside it.
                let listener = match TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let ctx = make_ctx();
                let _ = ready_tx.send(Ok(()));
                serve(listener, ctx).await;
            });
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => {
            // The thread returns right after reporting its error.
            let _ = thread.join();
            Err(e)
        }
        // The sender was dropped without a message: `make_ctx` panicked.
        Err(_) => {
            let _ = thread.join();
            Err(std::io::Error::other(
                "the admin thread ended before serving: building its context panicked",
            ))
        }
    }
}

/// The time bounds of one connection. Always [`Timeouts::DEFAULT`] outside tests; tests
/// shorten them to prove each one fires without waiting seconds.
#[derive(Clone, Copy, Debug)]
struct Timeouts {
    head: Duration,
    body: Duration,
    write: Duration,
    command: Duration,
    linger: Duration,
}

impl Timeouts {
    const DEFAULT: Timeouts = Timeouts {
        head: HEAD_TIMEOUT,
        body: BODY_TIMEOUT,
        write: WRITE_TIMEOUT,
        command: COMMAND_TIMEOUT,
        linger: LINGER_TIMEOUT,
    };
}

/// What each connection task serves from.
struct Server {
    ctx: AdminContext,
    timeouts: Timeouts,
}

/// The connection slots, and the policy that keeps `/healthz` and `/metrics` answerable
/// when every slot is taken: a new connection evicts the connection that has waited longest
/// on a client without a valid token (reading its head, or lingering after its answer).
///
/// Why eviction and not a reserve of slots for `/healthz` and `/metrics`: the server cannot
/// know what a connection asks for before it has read the head, and a client that never
/// finishes its head fills a reserved slot as easily as any other, so a reserve only raises
/// the number of silent connections an attacker needs. With eviction, a slot is held for
/// good only by a request that showed the token; every other slot is taken back, oldest
/// first, whenever someone new connects. A probe sends its head at once, so it is answered
/// unless [`CONNECTIONS_MAX`] newer connections arrive within its round trip (a connection
/// flood, bounded by what the kernel and this thread accept, not a slot held by a slow
/// client); a half-sent head cannot keep it waiting at all, not even for [`HEAD_TIMEOUT`].
#[derive(Default)]
struct Slots {
    held: RefCell<BTreeMap<u64, Held>>,
    next_id: Cell<u64>,
    /// Raised when a slot is freed or becomes evictable; the accept loop waits on it. A
    /// raise with nobody waiting is kept (`notify_one` stores a permit) for the next wait.
    changed: Notify,
}

/// One taken slot.
struct Held {
    /// Since when the connection has been waiting on a client that showed no valid token
    /// (its connect, or the start of its linger); `None` while it serves a request that
    /// did, which is never evicted.
    evictable_since: Option<Instant>,
    /// Raised to evict the connection.
    evict: Rc<Notify>,
    /// Eviction was asked; the slot is freed when the connection's task ends.
    evicted: bool,
}

impl Slots {
    /// Waits until a slot is free, evicting the connection that has been evictable the
    /// longest when none is. Evicts one connection at a time: the next only once that one
    /// has gone, so the slots held never exceed [`CONNECTIONS_MAX`].
    async fn make_room(&self) {
        loop {
            {
                let mut held = self.held.borrow_mut();
                if held.len() < CONNECTIONS_MAX {
                    return;
                }
                if !held.values().any(|h| h.evicted) {
                    // `min_by_key` keeps the first of equals: the lowest id, the oldest.
                    let victim = held
                        .values_mut()
                        .filter(|h| h.evictable_since.is_some())
                        .min_by_key(|h| h.evictable_since);
                    if let Some(victim) = victim {
                        victim.evicted = true;
                        victim.evict.notify_one();
                    }
                }
            }
            self.changed.notified().await;
        }
    }

    /// Takes a slot for a connection just accepted (evictable from now). The caller made
    /// room first.
    fn take(self: &Rc<Slots>) -> Slot {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let evict = Rc::new(Notify::new());
        let mut held = self.held.borrow_mut();
        assert!(held.len() < CONNECTIONS_MAX, "a slot taken without room");
        held.insert(
            id,
            Held {
                evictable_since: Some(Instant::now()),
                evict: evict.clone(),
                evicted: false,
            },
        );
        Slot {
            slots: self.clone(),
            id,
            evict,
        }
    }
}

/// A connection's slot; dropping it frees the slot.
struct Slot {
    slots: Rc<Slots>,
    id: u64,
    evict: Rc<Notify>,
}

impl Slot {
    /// The connection now serves a request with a valid token: it is not evicted.
    fn serving(&self) {
        self.set_evictable(false);
    }

    /// The connection waits on its client again (it lingers): it may be evicted.
    fn waiting(&self) {
        self.set_evictable(true);
    }

    fn set_evictable(&self, evictable: bool) {
        if let Some(held) = self.slots.held.borrow_mut().get_mut(&self.id) {
            held.evictable_since = evictable.then(Instant::now);
        }
        if evictable {
            self.slots.changed.notify_one();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.held.borrow_mut().remove(&self.id);
        self.slots.changed.notify_one();
    }
}

async fn serve_with(listener: TcpListener, ctx: AdminContext, timeouts: Timeouts) {
    let server = Rc::new(Server { ctx, timeouts });
    let slots = Rc::new(Slots::default());
    loop {
        // Accept first, then make room: the accept loop must see a new connection to evict
        // for it. At most this one connection waits here for room; others wait in the
        // kernel's backlog.
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        slots.make_room().await;
        let slot = slots.take();
        let server = server.clone();
        // Detached: the task ends with its connection, and its slot goes with it.
        drop(tokio::task::spawn_local(async move {
            let evict = slot.evict.clone();
            // Biased: the connection is polled first, as it always was; an eviction
            // raised meanwhile still wins on the next wake-up.
            let served = tokio::select! {
                biased;
                () = handle_connection(stream, &server, &slot) => true,
                () = evict.notified() => false,
            };
            if !served {
                // The connection (and its stream) was dropped without an answer.
                tracing::debug!("admin connection evicted to make room for a new one");
            }
            drop(slot);
        }));
    }
}

/// Serves one request on `stream`, then closes it.
async fn handle_connection(mut stream: TcpStream, server: &Server, slot: &Slot) {
    let response = match answer(&mut stream, server, slot).await {
        Ok(response) | Err(ReadError::Reject(response)) => response,
        Err(ReadError::Gone) => return,
    };
    let bytes = response.encode();
    let written = with_deadline(
        server.timeouts.write,
        async {
            stream.write_all(&bytes).await?;
            stream.flush().await
        },
        Err(std::io::ErrorKind::TimedOut.into()),
    )
    .await;
    if let Err(e) = written {
        tracing::debug!(error = %e, "admin response not written");
        return;
    }
    slot.waiting();
    linger(&mut stream, server.timeouts.linger).await;
}

/// Reads a request and answers it: the head within [`HEAD_TIMEOUT`]; then, for a route
/// that requires the token, the token, and only with a valid one the body (within
/// [`BODY_TIMEOUT`]) and the route.
async fn answer(
    stream: &mut TcpStream,
    server: &Server,
    slot: &Slot,
) -> Result<Response, ReadError> {
    let (head, early) = with_deadline(
        server.timeouts.head,
        read_head(stream),
        Err(ReadError::Reject(Response::text(
            408,
            "request head timeout\n",
        ))),
    )
    .await?;
    let body = if head.path == "/healthz" {
        // The open route takes no body; it is not read (the linger drains it), so that a
        // client without the token cannot hold a slot that is not evictable.
        Vec::new()
    } else {
        if !server.ctx.token.admits(head.authorization.as_deref()) {
            tracing::debug!(path = %head.path, "admin request without a valid token");
            return Ok(Response::unauthorized());
        }
        slot.serving();
        with_deadline(
            server.timeouts.body,
            read_body(stream, &head, early),
            Err(ReadError::Reject(Response::text(
                408,
                "request body timeout\n",
            ))),
        )
        .await?
    };
    let request = Request { head, body };
    let response = route(&request, server).await;
    tracing::debug!(
        method = %request.head.method,
        path = %request.head.path,
        status = response.status,
        "admin request"
    );
    Ok(response)
}

/// Shuts down the sending side and reads until the client closes, bounded by
/// [`LINGER_BYTES_MAX`] and [`LINGER_TIMEOUT`]; see [`LINGER_BYTES_MAX`] for why.
async fn linger(stream: &mut TcpStream, limit: Duration) {
    // tokio's `shutdown` on a TCP stream shuts down the sending side only.
    if stream.shutdown().await.is_err() {
        return;
    }
    with_deadline(
        limit,
        async {
            let mut chunk = [0u8; LINGER_CHUNK_BYTES];
            let mut drained = 0usize;
            while drained < LINGER_BYTES_MAX {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => drained += n,
                }
            }
        },
        (),
    )
    .await;
}

/// Runs `fut`, or gives `on_timeout` if it has not finished after `limit`. Uses tokio's
/// timer, so it must run on a runtime with time enabled.
async fn with_deadline<T>(limit: Duration, fut: impl Future<Output = T>, on_timeout: T) -> T {
    tokio::time::timeout(limit, fut).await.unwrap_or(on_timeout)
}

/// Why no request came out of a connection.
#[derive(Debug)]
enum ReadError {
    /// The client closed before sending anything, or the connection failed: nothing to
    /// answer.
    Gone,
    /// The request is bad; answer this and close.
    Reject(Response),
}

impl From<std::io::Error> for ReadError {
    fn from(_: std::io::Error) -> ReadError {
        ReadError::Gone
    }
}

/// A parsed request head: what routing needs and nothing more.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    method: String,
    /// The path of the target, without its query.
    path: String,
    content_length: usize,
    /// The client sent `Expect: 100-continue` and waits for a go-ahead before its body.
    expect_continue: bool,
    /// The `Authorization` header's value, if one was sent.
    authorization: Option<String>,
}

/// A whole request.
#[derive(Debug)]
struct Request {
    head: Head,
    body: Vec<u8>,
}

/// Reads one request head, up to [`HEAD_BYTES_MAX`]; returns it with the bytes read past
/// it (the start of the body).
async fn read_head(stream: &mut TcpStream) -> Result<(Head, Vec<u8>), ReadError> {
    let mut buf = vec![0u8; HEAD_BYTES_MAX];
    let mut filled = 0usize;
    // Where the search for the blank line resumes: a blank line completed by new bytes
    // starts at most 3 bytes before them, so a client sending a byte at a time costs
    // linear work, not quadratic. `httparse` runs once, on the whole head, for the same
    // reason: run on every partial read it would parse the head again from the start.
    let mut scan_from = 0usize;
    let head_end = loop {
        if let Some(end) = find_head_end(&buf[..filled], scan_from) {
            break end;
        }
        scan_from = filled.saturating_sub(3);
        if filled == buf.len() {
            return Err(ReadError::Reject(Response::text(
                431,
                "request head too large\n",
            )));
        }
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(if filled == 0 {
                ReadError::Gone
            } else {
                ReadError::Reject(Response::text(400, "incomplete request head\n"))
            });
        }
        filled += n;
    };
    let head = parse_head(&buf[..head_end]).map_err(ReadError::Reject)?;
    buf.truncate(filled);
    let early = buf.split_off(head_end);
    Ok((head, early))
}

/// Reads the body of `head`: its `Content-Length` bytes (bounded by [`BODY_BYTES_MAX`]
/// in [`parse_head`]), starting with `early`, the bytes already read past the head. Bytes
/// after the body are ignored.
async fn read_body(
    stream: &mut TcpStream,
    head: &Head,
    early: Vec<u8>,
) -> Result<Vec<u8>, ReadError> {
    let mut body = early;
    body.truncate(head.content_length);
    if head.expect_continue && body.len() < head.content_length {
        stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }
    let mut got = body.len();
    body.resize(head.content_length, 0);
    while got < head.content_length {
        let n = stream.read(&mut body[got..]).await?;
        if n == 0 {
            return Err(ReadError::Reject(Response::text(
                400,
                "body shorter than Content-Length\n",
            )));
        }
        got += n;
    }
    Ok(body)
}

/// Where the head ends in `buf`, blank line included (so where the body starts), looking
/// at line ends from `from` on. The blank line is CRLF CRLF, or LF LF (and the mixes of
/// the two) from lenient clients; `httparse` takes the same line ends.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from.min(buf.len());
    while let Some(pos) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + pos;
        let rest = &buf[nl + 1..];
        if rest.starts_with(b"\r\n") {
            return Some(nl + 3);
        }
        if rest.starts_with(b"\n") {
            return Some(nl + 2);
        }
        i = nl + 1;
    }
    None
}

/// Parses a request head, `head` being everything up to and including the blank line
/// that ends it ([`find_head_end`]). `httparse` checks the request line and the header
/// fields' syntax (token method, one space between the parts, `HTTP/1.0` or `HTTP/1.1`,
/// header names as tokens with the colon right after, no obsolete line folding, no
/// control bytes in values); this checks what it leaves open, the meaning: the method's
/// case, the target's form, and the headers this server acts on.
fn parse_head(head: &[u8]) -> Result<Head, Response> {
    let bad = |why: &str| Response::text(400, &format!("bad request: {why}\n"));
    // `httparse` takes bytes 0x80-0xff in header values (obs-text) as opaque; this server
    // has no use for them and refuses a head that is not UTF-8 as a whole, as it always did.
    if std::str::from_utf8(head).is_err() {
        return Err(bad("head is not UTF-8"));
    }
    let mut fields = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut request = httparse::Request::new(&mut fields);
    match request.parse(head) {
        // The head ends at the first blank line, where `find_head_end` found it too; any
        // other end (such as `httparse` skipping blank lines before the request line)
        // means the two read the head differently: refuse it rather than guess.
        Ok(httparse::Status::Complete(end)) if end == head.len() => {}
        Ok(_) => return Err(bad("malformed request head")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Response::text(431, "too many header fields\n"));
        }
        Err(e) => return Err(bad(&e.to_string())),
    }
    // A complete parse has all three; their absence is a malformed head all the same.
    let (Some(method), Some(target), Some(_version)) =
        (request.method, request.path, request.version)
    else {
        return Err(bad("malformed request line"));
    };
    // `httparse` takes any token as a method; every method this server knows is upper
    // case, and a lower-case one is more likely a confused client than a new method.
    if !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(bad("malformed method"));
    }
    // `httparse` takes any target; only the origin form (`/path?query`) names a route.
    if !target.starts_with('/') {
        return Err(bad("target must be a path"));
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);

    let mut content_length: Option<usize> = None;
    let mut expect_continue = false;
    let mut authorization: Option<String> = None;
    for field in request.headers.iter() {
        let name = field.name;
        // The head is UTF-8 and a value is cut at ASCII bytes, so this never fails; a
        // 400 is the answer if it ever did.
        let value = std::str::from_utf8(field.value)
            .map_err(|_| bad("header value is not UTF-8"))?
            .trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("malformed Content-Length"));
            }
            // All digits, so the only parse failure is overflow: too large either way.
            let n = value.parse::<usize>().unwrap_or(usize::MAX);
            // The same length twice is harmless (RFC 9110 §8.6 lets a recipient take it);
            // two different ones leave the body's end in doubt, the root of request
            // smuggling.
            if content_length.is_some_and(|seen| seen != n) {
                return Err(bad("conflicting Content-Length"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Response::text(
                501,
                "Transfer-Encoding is not supported; send Content-Length\n",
            ));
        } else if name.eq_ignore_ascii_case("expect") {
            if !value.eq_ignore_ascii_case("100-continue") {
                return Err(Response::text(
                    417,
                    "only Expect: 100-continue is supported\n",
                ));
            }
            expect_continue = true;
        } else if name.eq_ignore_ascii_case("authorization") {
            if authorization.is_some() {
                return Err(bad("more than one Authorization header"));
            }
            authorization = Some(value.to_owned());
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > BODY_BYTES_MAX {
        return Err(Response::text(413, "request body too large\n"));
    }
    Ok(Head {
        method: method.to_owned(),
        path: path.to_owned(),
        content_length,
        expect_continue,
        authorization,
    })
}

/// Body of `POST /groups`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateGroupBody {
    id: u64,
    members: Vec<u64>,
}

/// Body of `POST` and `DELETE /groups/{id}/members`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MembersBody {
    members: Vec<u64>,
}

/// Answers a request.
async fn route(request: &Request, server: &Server) -> Response {
    let ctx = &server.ctx;
    let method = request.head.method.as_str();
    let path = request.head.path.as_str();
    match path {
        "/metrics" => match method {
            "GET" => Response {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: ctx.metrics.render().into_bytes(),
                header: None,
            },
            _ => Response::method_not_allowed("GET"),
        },
        "/healthz" => match method {
            "GET" => healthz(ctx),
            _ => Response::method_not_allowed("GET"),
        },
        "/drain" => match method {
            "POST" => {
                tracing::info!("drain requested over admin HTTP");
                ctx.control.drain();
                Response::text(202, "draining\n")
            }
            _ => Response::method_not_allowed("POST"),
        },
        "/groups" => match method {
            "POST" => create_group(&request.body, server).await,
            _ => Response::method_not_allowed("POST"),
        },
        _ => {
            #[cfg(feature = "fault-injection")]
            if let Some(rest) = path.strip_prefix("/fault/shards/") {
                return inject_fault(method, rest, ctx);
            }
            let Some(id) = path
                .strip_prefix("/groups/")
                .and_then(|rest| rest.strip_suffix("/members"))
                .filter(|id| !id.contains('/'))
            else {
                return Response::text(404, "not found\n");
            };
            if method != "POST" && method != "DELETE" {
                return Response::method_not_allowed("POST, DELETE");
            }
            change_members(method == "POST", id, &request.body, server).await
        }
    }
}

/// `GET /healthz`: 503 while draining or while a shard is silent (naming each), else 200.
fn healthz(ctx: &AdminContext) -> Response {
    if ctx.control.is_draining() {
        return Response::text(503, "draining\n");
    }
    let silent = ctx.metrics.silent_shards(Instant::now(), SHARD_SILENCE_MAX);
    if silent.is_empty() {
        return Response::text(200, "ok\n");
    }
    let mut body = String::new();
    for s in silent {
        body.push_str(&match s.silent_for {
            None => format!("shard {} has not started\n", s.shard),
            Some(d) => format!(
                "shard {} has not turned for {:.1} s\n",
                s.shard,
                d.as_secs_f64()
            ),
        });
    }
    Response::text(503, &body)
}

/// `POST /fault/shards/{i}/{panic|stall|resume}` (test builds only).
#[cfg(feature = "fault-injection")]
fn inject_fault(method: &str, rest: &str, ctx: &AdminContext) -> Response {
    use crate::fault::{Fault, SHARDS_MAX};
    let Some((shard, kind)) = rest.split_once('/') else {
        return Response::text(404, "not found\n");
    };
    let fault = match kind {
        "panic" => Fault::Panic,
        "fail" => Fault::Fail,
        "stall" => Fault::Stall,
        "resume" => Fault::Resume,
        _ => return Response::text(404, "not found\n"),
    };
    let shard = match shard.bytes().all(|b| b.is_ascii_digit()) {
        true => shard.parse::<usize>().ok(),
        false => None,
    };
    let Some(shard) = shard.filter(|&s| s < ctx.metrics.shard_count() && s < SHARDS_MAX) else {
        return Response::text(404, "no such shard\n");
    };
    if method != "POST" {
        return Response::method_not_allowed("POST");
    }
    tracing::warn!(shard, ?fault, "fault injected over admin HTTP");
    ctx.control.inject(shard, fault);
    Response::text(202, "fault injected\n")
}

async fn create_group(body: &[u8], server: &Server) -> Response {
    let body: CreateGroupBody = match serde_json::from_slice(body) {
        Ok(body) => body,
        Err(e) => return Response::json_error(400, &format!("bad JSON: {e}")),
    };
    let Some(group) = group_id(body.id) else {
        return Response::json_error(400, "group id 0 is not a group");
    };
    run_command(
        Command::CreateGroup {
            group,
            members: users(body.members),
        },
        server,
    )
    .await
}

async fn change_members(add: bool, id: &str, body: &[u8], server: &Server) -> Response {
    // Digits only: `u64::from_str` would also take a leading `+`.
    let id = match id.bytes().all(|b| b.is_ascii_digit()) {
        true => id.parse::<u64>().ok(),
        false => None,
    };
    let Some(group) = id.and_then(group_id) else {
        return Response::json_error(400, "the group id must be a decimal number from 1");
    };
    let body: MembersBody = match serde_json::from_slice(body) {
        Ok(body) => body,
        Err(e) => return Response::json_error(400, &format!("bad JSON: {e}")),
    };
    let members = users(body.members);
    let cmd = if add {
        Command::AddMembers { group, members }
    } else {
        Command::RemoveMembers { group, members }
    };
    run_command(cmd, server).await
}

/// The group with this id, or `None` for 0 (which [`ConvId::group`] refuses).
fn group_id(id: u64) -> Option<ConvId> {
    (id != 0).then(|| ConvId::group(id))
}

/// Member ids as users. Their validity (not 0, not too many) is checked by the core where
/// the command is applied.
fn users(ids: Vec<u64>) -> Vec<UserId> {
    ids.into_iter().map(UserId).collect()
}

async fn run_command(cmd: Command, server: &Server) -> Response {
    let result = with_deadline(
        server.timeouts.command,
        async { Some(server.ctx.control.command(cmd).await) },
        None,
    )
    .await;
    match result {
        Some(Ok(())) => Response::json(200, "{\"ok\":true}".to_owned()),
        Some(Err(e)) => {
            let status = match e {
                CommandError::AlreadyExists(_) => 409,
                CommandError::NoSuchGroup(_) => 404,
                CommandError::NotAGroup(_) | CommandError::BadMembers(_) => 400,
                CommandError::StorageFailed | CommandError::Busy => 503,
            };
            Response::json_error(status, &e.to_string())
        }
        None => Response::json_error(
            504,
            "the owner shard did not answer in time; the command may still take effect",
        ),
    }
}

/// A response, written with `Content-Length` and `Connection: close`.
#[derive(Debug)]
struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    /// One more header: `Allow` on a 405, `WWW-Authenticate` on a 401.
    header: Option<(&'static str, &'static str)>,
}

impl Response {
    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
            header: None,
        }
    }

    fn json(status: u16, body: String) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: body.into_bytes(),
            header: None,
        }
    }

    fn json_error(status: u16, message: &str) -> Response {
        // Serialising a map of one string cannot fail; fall back to a fixed body anyway
        // rather than unwrap.
        let body = serde_json::to_string(&serde_json::json!({ "error": message }))
            .unwrap_or_else(|_| "{\"error\":\"internal error\"}".to_owned());
        Response::json(status, body)
    }

    fn method_not_allowed(allow: &'static str) -> Response {
        Response {
            header: Some(("Allow", allow)),
            ..Response::text(405, "method not allowed\n")
        }
    }

    fn unauthorized() -> Response {
        Response {
            header: Some(("WWW-Authenticate", "Bearer")),
            ..Response::text(401, "a valid Authorization: Bearer token is required\n")
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        if let Some((name, value)) = self.header {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

/// The reason phrase of each status this server sends.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgate_core::shard::ShardStats;
    use std::cell::{Cell, RefCell};
    use std::collections::VecDeque;
    use std::net::SocketAddr;

    /// The admin token of every test server.
    const TOKEN: &str = "0123456789abcdef-test-token";

    /// A [`Control`] that records what it is asked and answers from a script.
    #[derive(Default)]
    struct FakeControl {
        commands: RefCell<Vec<Command>>,
        results: RefCell<VecDeque<Result<(), CommandError>>>,
        /// Commands never complete, as if the owner shard never answered.
        hang: Cell<bool>,
        drains: Cell<u32>,
        #[cfg(feature = "fault-injection")]
        faults: RefCell<Vec<(usize, crate::fault::Fault)>>,
    }

    impl Control for FakeControl {
        fn command(&self, cmd: Command) -> Pin<Box<dyn Future<Output = Result<(), CommandError>>>> {
            self.commands.borrow_mut().push(cmd);
            if self.hang.get() {
                return Box::pin(std::future::pending());
            }
            let result = self.results.borrow_mut().pop_front().unwrap_or(Ok(()));
            Box::pin(async move { result })
        }

        fn drain(&self) {
            self.drains.set(self.drains.get() + 1);
        }

        fn is_draining(&self) -> bool {
            self.drains.get() > 0
        }

        #[cfg(feature = "fault-injection")]
        fn inject(&self, shard: usize, fault: crate::fault::Fault) {
            self.faults.borrow_mut().push((shard, fault));
        }
    }

    /// Metrics of `shards` shards that have all just turned: a healthy gateway.
    fn alive(shards: usize) -> Arc<Metrics> {
        let metrics = Metrics::new(shards);
        for i in 0..shards {
            metrics.shard(i).record_turn();
        }
        metrics
    }

    /// A parsed response.
    #[derive(Debug)]
    struct Reply {
        status: u16,
        head: String,
        body: String,
    }

    /// Runs `test` on a fresh runtime with an admin server on 127.0.0.1:0 whose fake
    /// control answers commands from `script` (then `Ok`), passing the server's address.
    fn with_server<F, Fut>(metrics: Arc<Metrics>, script: Vec<Result<(), CommandError>>, test: F)
    where
        F: FnOnce(SocketAddr, Rc<FakeControl>) -> Fut,
        Fut: Future<Output = ()>,
    {
        run_server(metrics, script, None, test);
    }

    /// [`with_server`] with these timeouts instead of the defaults of [`serve`].
    fn with_timeouts<F, Fut>(timeouts: Timeouts, test: F)
    where
        F: FnOnce(SocketAddr, Rc<FakeControl>) -> Fut,
        Fut: Future<Output = ()>,
    {
        run_server(alive(1), Vec::new(), Some(timeouts), test);
    }

    thread_local! {
        /// Whether a panic happened on this thread since the flag was last cleared. The
        /// server's tasks run on the test's thread, and tokio catches a panic in a task
        /// (the connection just closes), so this is how a test learns of one.
        static PANICKED: Cell<bool> = const { Cell::new(false) };
    }

    /// Makes every panic raise [`PANICKED`] on its thread, then report as usual.
    fn record_panics() {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let report = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                PANICKED.with(|p| p.set(true));
                report(info);
            }));
        });
    }

    /// The harness of [`with_server`] and [`with_timeouts`]: the server and the test's
    /// client share one current-thread runtime and its `LocalSet`, as on the admin thread.
    /// The test fails if the server's accept loop ends (it only ends by a panic) or if a
    /// panic happened in any of the server's tasks.
    fn run_server<F, Fut>(
        metrics: Arc<Metrics>,
        script: Vec<Result<(), CommandError>>,
        timeouts: Option<Timeouts>,
        test: F,
    ) where
        F: FnOnce(SocketAddr, Rc<FakeControl>) -> Fut,
        Fut: Future<Output = ()>,
    {
        record_panics();
        PANICKED.with(|p| p.set(false));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .expect("runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            let control = Rc::new(FakeControl::default());
            control.results.borrow_mut().extend(script);
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("local addr");
            let ctx = AdminContext {
                metrics,
                control: control.clone(),
                token: AdminToken::new(TOKEN.as_bytes()),
            };
            let server = tokio::task::spawn_local(serve_with(
                listener,
                ctx,
                timeouts.unwrap_or(Timeouts::DEFAULT),
            ));
            tokio::select! {
                ended = server => panic!("the admin server ended: {ended:?}"),
                () = test(addr, control) => {}
            }
        });
        assert!(
            !PANICKED.with(Cell::get),
            "a task of the admin server panicked"
        );
    }

    /// Sends `request` raw and reads the reply until the server closes.
    async fn exchange(addr: SocketAddr, request: &[u8]) -> Reply {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request).await.expect("write");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read");
        let raw = String::from_utf8(raw).expect("UTF-8 reply");
        let (head, body) = raw.split_once("\r\n\r\n").expect("a head");
        let status = head
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line in {head:?}"));
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .expect("Content-Length")
            .parse()
            .expect("length");
        assert_eq!(body.len(), length, "body length");
        assert!(head.contains("\r\nConnection: close"), "{head}");
        Reply {
            status,
            head: head.to_owned(),
            body: body.to_owned(),
        }
    }

    fn post(path: &str, json: &str) -> Vec<u8> {
        request("POST", path, json)
    }

    /// A request with the right token.
    fn request(method: &str, path: &str, body: &str) -> Vec<u8> {
        request_as(Some(&format!("Bearer {TOKEN}")), method, path, body)
    }

    /// A request with this `Authorization` header (none if `None`).
    fn request_as(authorization: Option<&str>, method: &str, path: &str, body: &str) -> Vec<u8> {
        let authorization = authorization
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{authorization}\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    /// A wait no test should reach; past it the test fails instead of hanging.
    const WAIT: Duration = Duration::from_secs(10);

    /// `fut`'s output, or a panic naming `what` if it takes longer than [`WAIT`].
    async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
        with_deadline(WAIT, async { Some(fut.await) }, None)
            .await
            .unwrap_or_else(|| panic!("{what}: no answer within {WAIT:?}"))
    }

    #[test]
    fn metrics_are_served_as_prometheus_text() {
        let metrics = alive(2);
        metrics.shard(1).publish(&ShardStats {
            acks: 7,
            ..ShardStats::default()
        });
        metrics.shard(0).record_fsync(Duration::from_micros(1500));
        let expected = metrics.clone();
        with_server(metrics, Vec::new(), move |addr, _| async move {
            let reply = exchange(addr, &request("GET", "/metrics", "")).await;
            assert_eq!(reply.status, 200);
            assert!(
                reply
                    .head
                    .contains("Content-Type: text/plain; version=0.0.4"),
                "{}",
                reply.head
            );
            assert!(reply.body.contains("\nimgate_acks_total{shard=\"1\"} 7\n"));
            assert!(reply
                .body
                .contains("\nimgate_fsync_seconds_bucket{shard=\"0\",le=\"0.0025\"} 1\n"));
            assert!(reply.body.contains("\nprocess_open_fds "));
            // The same text as rendering directly, but for the samples that change with
            // time (uptime, turn ages, the process's own numbers).
            let strip = |text: &str| {
                text.lines()
                    .filter(|l| {
                        !l.starts_with("imgate_uptime_seconds ")
                            && !l.starts_with("imgate_shard_turn_age_seconds{")
                            && !l.starts_with("process_")
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            assert_eq!(strip(&reply.body), strip(&expected.render()));
        });
    }

    #[test]
    fn create_group_reaches_control_as_a_command() {
        with_server(alive(1), Vec::new(), |addr, control| async move {
            let reply = exchange(addr, &post("/groups", r#"{"id": 42, "members": [1,2,3]}"#)).await;
            assert_eq!(reply.status, 200, "{}", reply.body);
            assert_eq!(reply.body, r#"{"ok":true}"#);
            assert!(reply.head.contains("Content-Type: application/json"));
            assert_eq!(
                *control.commands.borrow(),
                vec![Command::CreateGroup {
                    group: ConvId::group(42),
                    members: vec![UserId(1), UserId(2), UserId(3)],
                }]
            );
        });
    }

    #[test]
    fn member_changes_reach_control_as_add_and_remove() {
        with_server(alive(1), Vec::new(), |addr, control| async move {
            let add = exchange(addr, &post("/groups/42/members", r#"{"members":[4]}"#)).await;
            assert_eq!(add.status, 200, "{}", add.body);
            let remove = exchange(
                addr,
                &request("DELETE", "/groups/42/members", r#"{"members":[4, 5]}"#),
            )
            .await;
            assert_eq!(remove.status, 200, "{}", remove.body);
            assert_eq!(
                *control.commands.borrow(),
                vec![
                    Command::AddMembers {
                        group: ConvId::group(42),
                        members: vec![UserId(4)],
                    },
                    Command::RemoveMembers {
                        group: ConvId::group(42),
                        members: vec![UserId(4), UserId(5)],
                    },
                ]
            );
        });
    }

    #[test]
    fn command_errors_map_to_statuses_with_their_message() {
        let g = ConvId::group(42);
        let script = vec![
            Err(CommandError::AlreadyExists(g)),
            Err(CommandError::NoSuchGroup(g)),
            Err(CommandError::BadMembers("user 0".into())),
            Err(CommandError::NotAGroup(g)),
            Err(CommandError::StorageFailed),
        ];
        with_server(alive(1), script, move |addr, control| async move {
            let create = post("/groups", r#"{"id": 42, "members": [1]}"#);
            let add = post("/groups/42/members", r#"{"members": [0]}"#);
            let expected = [
                (&create, 409, CommandError::AlreadyExists(g)),
                (&add, 404, CommandError::NoSuchGroup(g)),
                (&add, 400, CommandError::BadMembers("user 0".into())),
                (&add, 400, CommandError::NotAGroup(g)),
                (&add, 503, CommandError::StorageFailed),
            ];
            for (req, status, error) in expected {
                let reply = exchange(addr, req).await;
                assert_eq!(reply.status, status, "{error:?}: {}", reply.body);
                let body: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON body");
                assert_eq!(body["error"], error.to_string());
            }
            assert_eq!(control.commands.borrow().len(), 5);
        });
    }

    #[test]
    fn bad_json_and_group_zero_are_rejected_before_control() {
        with_server(alive(1), Vec::new(), |addr, control| async move {
            let requests = [
                post("/groups", r#"{"id": 0, "members": [1]}"#),
                post("/groups", r#"{"id": 42, "members": [1"#),
                post("/groups", r#"{"id": -1, "members": [1]}"#),
                post("/groups", r#"{"id": 42, "members": [1], "extra": 1}"#),
                post("/groups", ""),
                post("/groups/0/members", r#"{"members":[4]}"#),
                post("/groups/+7/members", r#"{"members":[4]}"#),
                post("/groups/x/members", r#"{"members":[4]}"#),
                post("/groups/7/members", r#"{"members":"4"}"#),
                post("/groups/99999999999999999999/members", r#"{"members":[4]}"#),
            ];
            for req in &requests {
                let reply = exchange(addr, req).await;
                assert_eq!(reply.status, 400, "{}", String::from_utf8_lossy(req));
                let body: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON body");
                assert!(body["error"].is_string());
            }
            assert!(control.commands.borrow().is_empty());
        });
    }

    #[test]
    fn garbage_request_line_is_a_400() {
        with_server(alive(1), Vec::new(), |addr, _| async move {
            for garbage in [
                &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"[..],
                b"hello\r\n\r\n",
                b"GET /metrics\r\n\r\n",
                b"GET  /metrics HTTP/1.1\r\n\r\n",
                b"GET /metrics HTTP/2.0\r\n\r\n",
                b"GET metrics HTTP/1.1\r\n\r\n",
                b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
                b"POST /groups HTTP/1.1\r\nContent-Length: 1x\r\n\r\n",
                b"POST /groups HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            ] {
                let reply = exchange(addr, garbage).await;
                assert_eq!(reply.status, 400, "{}", String::from_utf8_lossy(garbage));
            }
        });
    }

    #[test]
    fn oversize_head_is_refused_and_closed() {
        with_server(alive(1), Vec::new(), |addr, _| async move {
            let mut req = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
            req.extend(std::iter::repeat_n(b'a', 3 * HEAD_BYTES_MAX));
            req.extend_from_slice(b"\r\n\r\n");
            // `exchange` reads until the server closes: the refusal ends the connection.
            let reply = exchange(addr, &req).await;
            assert_eq!(reply.status, 431);
        });
    }

    #[test]
    fn oversize_body_is_refused_without_reading_it() {
        with_server(alive(1), Vec::new(), |addr, control| async move {
            let req = format!(
                "POST /groups HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                BODY_BYTES_MAX + 1
            );
            let reply = exchange(addr, req.as_bytes()).await;
            assert_eq!(reply.status, 413);
            assert!(control.commands.borrow().is_empty());
        });
    }

    #[test]
    fn unknown_paths_and_methods_are_refused() {
        with_server(alive(1), Vec::new(), |addr, _| async move {
            for path in [
                "/",
                "/nope",
                "/groups/42",
                "/groups/42/members/7",
                "/metricsx",
            ] {
                let reply = exchange(addr, &request("GET", path, "")).await;
                assert_eq!(reply.status, 404, "{path}");
            }
            for (method, path, allow) in [
                ("POST", "/metrics", "GET"),
                ("DELETE", "/healthz", "GET"),
                ("GET", "/drain", "POST"),
                ("GET", "/groups", "POST"),
                ("PUT", "/groups/42/members", "POST, DELETE"),
            ] {
                let reply = exchange(addr, &request(method, path, "")).await;
                assert_eq!(reply.status, 405, "{method} {path}");
                assert!(reply.head.contains(&format!("\r\nAllow: {allow}")));
            }
        });
    }

    #[test]
    fn drain_flips_healthz_to_503() {
        with_server(alive(1), Vec::new(), |addr, control| async move {
            let healthy = exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
            assert_eq!((healthy.status, healthy.body.as_str()), (200, "ok\n"));
            let drain = exchange(addr, &post("/drain", "")).await;
            assert_eq!(drain.status, 202);
            assert_eq!(control.drains.get(), 1);
            let draining = exchange(addr, b"GET /healthz?verbose=1 HTTP/1.0\r\n\r\n").await;
            assert_eq!(
                (draining.status, draining.body.as_str()),
                (503, "draining\n")
            );
        });
    }

    /// A timeout no test reaches, so that only the one under test fires.
    const LONG: Duration = Duration::from_secs(60);

    #[test]
    fn a_head_not_finished_in_time_gets_408() {
        let timeouts = Timeouts {
            head: Duration::from_millis(50),
            body: LONG,
            ..Timeouts::DEFAULT
        };
        with_timeouts(timeouts, |addr, _| async move {
            let partial = format!("GET /metrics HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n");
            let reply = within("head timeout", exchange(addr, partial.as_bytes())).await;
            assert_eq!(
                (reply.status, reply.body.as_str()),
                (408, "request head timeout\n")
            );
        });
    }

    #[test]
    fn a_body_not_finished_in_time_gets_408() {
        let timeouts = Timeouts {
            head: LONG,
            body: Duration::from_millis(50),
            ..Timeouts::DEFAULT
        };
        with_timeouts(timeouts, |addr, control| async move {
            let mut partial = request("POST", "/groups", r#"{"id": 5, "members": [1]}"#);
            partial.truncate(partial.len() - 3);
            let reply = within("body timeout", exchange(addr, &partial)).await;
            assert_eq!(
                (reply.status, reply.body.as_str()),
                (408, "request body timeout\n")
            );
            assert!(control.commands.borrow().is_empty());
        });
    }

    #[test]
    fn the_head_deadline_does_not_cover_the_body() {
        // A body that comes after the head deadline but within the body deadline is read.
        let timeouts = Timeouts {
            head: Duration::from_millis(50),
            body: LONG,
            ..Timeouts::DEFAULT
        };
        with_timeouts(timeouts, |addr, control| async move {
            let body = r#"{"id": 5, "members": [1]}"#;
            let head = request("POST", "/groups", "");
            let head = String::from_utf8(head).expect("ASCII").replace(
                "Content-Length: 0",
                &format!("Content-Length: {}", body.len()),
            );
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream.write_all(head.as_bytes()).await.expect("head");
            // The slow client this test is about: its body comes after the head deadline.
            tokio::time::sleep(Duration::from_millis(200)).await;
            stream.write_all(body.as_bytes()).await.expect("body");
            let mut reply = String::new();
            within("reply", stream.read_to_string(&mut reply))
                .await
                .expect("reply");
            assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
            assert_eq!(control.commands.borrow().len(), 1);
        });
    }

    /// Opens a connection and sends half a request head (no blank line), as a slowloris
    /// client does.
    async fn half_head(addr: SocketAddr) -> TcpStream {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write half a head");
        stream
    }

    #[test]
    fn half_heads_in_every_slot_cannot_keep_healthz_or_metrics_waiting() {
        // No deadline fires in this test: only eviction can make room.
        let timeouts = Timeouts {
            head: LONG,
            body: LONG,
            write: LONG,
            command: LONG,
            linger: LONG,
        };
        with_timeouts(timeouts, |addr, _| async move {
            let extra = 8;
            let mut held = Vec::new();
            for _ in 0..CONNECTIONS_MAX + extra {
                held.push(half_head(addr).await);
            }
            let health = within("healthz", exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n")).await;
            assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
            let metrics = within("metrics", exchange(addr, &request("GET", "/metrics", ""))).await;
            assert_eq!(metrics.status, 200);
            assert!(metrics.body.contains("imgate_connections{shard=\"0\"}"));
            // The oldest half-heads were closed without an answer (evicted, not timed
            // out: that would have sent a 408).
            for (i, stream) in held.iter_mut().take(extra).enumerate() {
                let mut got = Vec::new();
                let _ = within("evicted", stream.read_to_end(&mut got)).await;
                assert!(
                    got.is_empty(),
                    "connection {i}: {}",
                    String::from_utf8_lossy(&got)
                );
            }
        });
    }

    #[test]
    fn a_request_with_the_token_keeps_its_slot_while_half_heads_are_evicted() {
        let timeouts = Timeouts {
            head: LONG,
            body: LONG,
            write: LONG,
            command: LONG,
            linger: LONG,
        };
        with_timeouts(timeouts, |addr, control| async move {
            // The oldest connection: an operator whose body is slow to come.
            let body = r#"{"id": 11, "members": [1]}"#;
            let mut operator = TcpStream::connect(addr).await.expect("connect");
            let head = format!(
                "POST /groups HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            operator.write_all(head.as_bytes()).await.expect("head");
            // The go-ahead proves the server has read the head and checked the token.
            let mut go_ahead = [0u8; 25];
            within("100 Continue", operator.read_exact(&mut go_ahead))
                .await
                .expect("100 Continue");
            let mut held = Vec::new();
            for _ in 0..CONNECTIONS_MAX + 4 {
                held.push(half_head(addr).await);
            }
            let health = within("healthz", exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n")).await;
            assert_eq!(health.status, 200);
            operator.write_all(body.as_bytes()).await.expect("body");
            let mut reply = String::new();
            within("reply", operator.read_to_string(&mut reply))
                .await
                .expect("reply");
            assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
            assert_eq!(control.commands.borrow().len(), 1);
        });
    }

    #[test]
    fn healthz_answers_without_waiting_for_a_body() {
        // The open route never reads a body, so a client without the token cannot hold a
        // slot that eviction may not take back by promising one.
        let timeouts = Timeouts {
            head: LONG,
            body: LONG,
            ..Timeouts::DEFAULT
        };
        with_timeouts(timeouts, |addr, _| async move {
            let req = b"GET /healthz HTTP/1.1\r\nContent-Length: 100000\r\n\r\n";
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream.write_all(req).await.expect("write");
            let mut reply = vec![0u8; 12];
            within("healthz", stream.read_exact(&mut reply))
                .await
                .expect("reply");
            assert_eq!(&reply, b"HTTP/1.1 200");
        });
    }

    #[test]
    fn every_route_but_healthz_requires_the_bearer_token() {
        with_server(alive(1), Vec::new(), |addr, control| async move {
            let wrong = format!("Bearer {TOKEN}x");
            let short = format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]);
            let basic = format!("Basic {TOKEN}");
            let refused: [Option<&str>; 6] = [
                None,
                Some("Bearer"),
                Some("Bearer "),
                Some(&wrong),
                Some(&short),
                Some(&basic),
            ];
            for authorization in refused {
                for (method, path, body) in [
                    ("GET", "/metrics", ""),
                    ("POST", "/groups", r#"{"id": 42, "members": [1]}"#),
                    ("POST", "/groups/42/members", r#"{"members": [4]}"#),
                    ("POST", "/drain", ""),
                    ("GET", "/nope", ""),
                ] {
                    let reply =
                        exchange(addr, &request_as(authorization, method, path, body)).await;
                    assert_eq!(reply.status, 401, "{authorization:?} {method} {path}");
                    assert!(reply.head.contains("\r\nWWW-Authenticate: Bearer"));
                }
            }
            assert!(control.commands.borrow().is_empty());
            assert_eq!(control.drains.get(), 0);
            // Without a token no body is asked for: no 100 Continue, just the 401.
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream
                .write_all(
                    b"POST /groups HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n",
                )
                .await
                .expect("write");
            let mut reply = String::new();
            within("401", stream.read_to_string(&mut reply))
                .await
                .expect("reply");
            assert!(
                reply.starts_with("HTTP/1.1 401 Unauthorized\r\n"),
                "{reply}"
            );
            // Two Authorization headers are a bad request, whichever holds the token.
            let twice = format!(
                "GET /metrics HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nAuthorization: Bearer x\r\n\r\n"
            );
            assert_eq!(exchange(addr, twice.as_bytes()).await.status, 400);

            // The right token, in any case of the scheme, is admitted.
            for scheme in ["Bearer", "bearer", "BEARER"] {
                let auth = format!("{scheme} {TOKEN}");
                let reply = exchange(addr, &request_as(Some(&auth), "GET", "/metrics", "")).await;
                assert_eq!(reply.status, 200, "{scheme}");
            }
            let created = exchange(addr, &post("/groups", r#"{"id": 42, "members": [1]}"#)).await;
            assert_eq!(created.status, 200, "{}", created.body);
            assert_eq!(control.commands.borrow().len(), 1);
            // /healthz is open: load-balancer probes carry no credentials.
            let health = exchange(addr, &request_as(None, "GET", "/healthz", "")).await;
            assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
        });
    }

    #[test]
    fn tokens_compare_whole_and_exact() {
        let token = AdminToken::new(b"secret-token-123");
        assert!(token.admits(Some("Bearer secret-token-123")));
        assert!(token.admits(Some("bearer  secret-token-123 ")));
        for bad in [
            None,
            Some(""),
            Some("secret-token-123"),
            Some("Bearer secret-token-12"),
            Some("Bearer secret-token-1234"),
            Some("Bearer secret-token-124"),
            Some("Bearer Secret-token-123"),
            Some("Token secret-token-123"),
        ] {
            assert!(!token.admits(bad), "{bad:?}");
        }
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"abc", b"abc\0"));
        assert!(!constant_time_eq(b"abc", b""));
        assert_eq!(format!("{token:?}"), "AdminToken(..)");
    }

    #[test]
    fn healthz_names_every_shard_that_has_not_turned_in_time() {
        let epoch = Instant::now()
            .checked_sub(Duration::from_secs(10))
            .expect("the machine has been up for 10 s");
        let metrics = Metrics::started_at(3, epoch);
        metrics.shard(0).record_turn();
        metrics
            .shard(1)
            .record_turn_at(epoch + Duration::from_secs(1));
        let turned = metrics.clone();
        with_server(metrics, Vec::new(), move |addr, _| async move {
            let reply = exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
            assert_eq!(reply.status, 503, "{}", reply.body);
            let lines: Vec<&str> = reply.body.lines().collect();
            assert_eq!(lines.len(), 2, "{}", reply.body);
            assert!(
                lines[0].starts_with("shard 1 has not turned for 9."),
                "{}",
                lines[0]
            );
            assert_eq!(lines[1], "shard 2 has not started");
            // Once both turn again, all is well.
            turned.shard(1).record_turn();
            turned.shard(2).record_turn();
            let reply = exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
            assert_eq!((reply.status, reply.body.as_str()), (200, "ok\n"));
        });
    }

    #[cfg(feature = "fault-injection")]
    #[test]
    fn fault_routes_reach_control_for_existing_shards_only() {
        use crate::fault::Fault;
        with_server(alive(2), Vec::new(), |addr, control| async move {
            for (path, shard, fault) in [
                ("/fault/shards/1/panic", 1, Fault::Panic),
                ("/fault/shards/0/stall", 0, Fault::Stall),
                ("/fault/shards/0/resume", 0, Fault::Resume),
            ] {
                let reply = exchange(addr, &post(path, "")).await;
                assert_eq!(reply.status, 202, "{path}");
                assert_eq!(control.faults.borrow().last(), Some(&(shard, fault)));
            }
            for path in [
                "/fault/shards/2/panic",
                "/fault/shards/x/panic",
                "/fault/shards/1/explode",
                "/fault/shards/1",
            ] {
                assert_eq!(exchange(addr, &post(path, "")).await.status, 404, "{path}");
            }
            assert_eq!(
                exchange(addr, &request("GET", "/fault/shards/1/panic", ""))
                    .await
                    .status,
                405
            );
            let anonymous = request_as(None, "POST", "/fault/shards/1/panic", "");
            assert_eq!(exchange(addr, &anonymous).await.status, 401);
            assert_eq!(control.faults.borrow().len(), 3);
        });
    }

    #[test]
    fn a_command_without_an_answer_gets_504() {
        let timeouts = Timeouts {
            command: Duration::from_millis(50),
            head: LONG,
            body: LONG,
            ..Timeouts::DEFAULT
        };
        with_timeouts(timeouts, |addr, control| async move {
            control.hang.set(true);
            let reply = exchange(addr, &post("/groups", r#"{"id": 5, "members": [1]}"#)).await;
            assert_eq!(reply.status, 504, "{}", reply.body);
            assert_eq!(control.commands.borrow().len(), 1);
        });
    }

    #[test]
    fn expect_continue_gets_a_go_ahead_before_the_body() {
        with_server(alive(1), Vec::new(), |addr, control| async move {
            let body = r#"{"id": 9, "members": [1]}"#;
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let head = format!(
                "POST /groups HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).await.expect("write head");
            let go_ahead = b"HTTP/1.1 100 Continue\r\n\r\n";
            let mut got = vec![0u8; go_ahead.len()];
            stream.read_exact(&mut got).await.expect("100 Continue");
            assert_eq!(got, go_ahead);
            stream.write_all(body.as_bytes()).await.expect("write body");
            let mut rest = String::new();
            stream.read_to_string(&mut rest).await.expect("reply");
            assert!(rest.starts_with("HTTP/1.1 200 OK\r\n"), "{rest}");
            assert_eq!(control.commands.borrow().len(), 1);
        });
    }

    #[test]
    fn head_parsing_accepts_lenient_line_ends_and_keeps_the_path() {
        let head =
            b"POST /groups/1/members?x=1 HTTP/1.1\nContent-Length:  12 \ncontent-length: 12\n\
                     authorization:\tBearer abc \n\n";
        let parsed = parse_head(head).expect("valid head");
        assert_eq!(
            parsed,
            Head {
                method: "POST".into(),
                path: "/groups/1/members".into(),
                content_length: 12,
                expect_continue: false,
                authorization: Some("Bearer abc".into()),
            }
        );
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nbody", 0), Some(18));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\nbody", 0), Some(16));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\r\nbody", 0), Some(17));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n", 0), None);
        // Resuming 3 bytes before new data still finds a blank line they complete.
        let head = b"GET / HTTP/1.1\r\nA: b\r\n\r\n";
        for split in 1..head.len() {
            let resume = split.saturating_sub(3);
            assert_eq!(find_head_end(&head[..split], 0), None, "split {split}");
            assert_eq!(find_head_end(head, resume), Some(24), "split {split}");
        }
        // Every head `find_head_end` finds, `httparse` reads to the same end.
        for head in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/1.0\n\n",
            b"GET / HTTP/1.1\r\nA: b\n\r\n",
            b"GET / HTTP/1.1\nA: b\r\n\n",
        ] {
            assert_eq!(find_head_end(head, 0), Some(head.len()));
            assert!(
                parse_head(head).is_ok(),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n")
                .map_err(|r| r.status),
            Err(413)
        );
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
                .map_err(|r| r.status),
            Err(501)
        );
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n").map_err(|r| r.status),
            Err(400)
        );
    }

    /// The status `parse_head` refuses `head` with, or `None` if it takes it.
    fn refusal(head: &[u8]) -> Option<u16> {
        parse_head(head).err().map(|r| r.status)
    }

    /// A `GET /healthz` head with `count` header fields.
    fn head_with_fields(count: usize) -> Vec<u8> {
        let mut head = b"GET /healthz HTTP/1.1\r\n".to_vec();
        for i in 0..count {
            head.extend_from_slice(format!("X-F{i}: v\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        head
    }

    #[test]
    fn malformed_request_lines_are_refused_with_400() {
        for head in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"[..],
            b"hello\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/1.1 x\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics  HTTP/1.1\r\n\r\n",
            b" GET /metrics HTTP/1.1\r\n\r\n",
            b"GET\t/metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/2.0\r\n\r\n",
            b"GET /metrics HTTP/1.2\r\n\r\n",
            b"GET /metrics http/1.1\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET * HTTP/1.1\r\n\r\n",
            b"GET http://x/metrics HTTP/1.1\r\n\r\n",
            b"get /metrics HTTP/1.1\r\n\r\n",
            b"G(T /metrics HTTP/1.1\r\n\r\n",
            b"GET /me\x01trics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1\rX: y\r\n\r\n",
            // Blank lines before the request line: `httparse` would skip them; the head
            // ends at the first blank line here, so it is refused.
            b"\r\n\r\n",
            b"\n\n",
        ] {
            assert_eq!(
                refusal(head),
                Some(400),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn malformed_header_fields_are_refused_with_400() {
        for fields in [
            &b"no colon here\r\n"[..],
            b": empty name\r\n",
            b"Host : x\r\n",
            b"Ho st: x\r\n",
            b"Host: x\r\n folded\r\n",
            b"Host: x\r\n\tfolded\r\n",
            b"X: a\x01b\r\n",
            b"X: a\rb\r\n",
            b"X: \xc3\x28\r\n",
            b"Authorization: Bearer a\r\nauthorization: Bearer a\r\n",
        ] {
            let mut head = b"GET /metrics HTTP/1.1\r\n".to_vec();
            head.extend_from_slice(fields);
            head.extend_from_slice(b"\r\n");
            assert_eq!(
                refusal(&head),
                Some(400),
                "{}",
                String::from_utf8_lossy(fields)
            );
        }
    }

    #[test]
    fn too_many_header_fields_are_refused_with_431() {
        let over = head_with_fields(HEADERS_MAX + 1);
        assert!(
            over.len() < HEAD_BYTES_MAX,
            "the bound under test is the count"
        );
        assert_eq!(refusal(&over), Some(431));
        assert_eq!(refusal(&head_with_fields(HEADERS_MAX)), None);
    }

    #[test]
    fn content_length_is_one_bounded_decimal_number() {
        let head = |fields: &str| format!("POST /groups HTTP/1.1\r\n{fields}\r\n").into_bytes();
        let length = |fields: &str| {
            parse_head(&head(fields))
                .map(|h| h.content_length)
                .map_err(|r| r.status)
        };
        assert_eq!(length(""), Ok(0));
        assert_eq!(length("Content-Length: 0\r\n"), Ok(0));
        assert_eq!(
            length(&format!("Content-Length: {BODY_BYTES_MAX}\r\n")),
            Ok(BODY_BYTES_MAX)
        );
        // The same length twice is one length.
        assert_eq!(
            length("Content-Length: 7\r\nCONTENT-LENGTH: 007\r\n"),
            Ok(7)
        );
        for (fields, status) in [
            (format!("Content-Length: {}\r\n", BODY_BYTES_MAX + 1), 413),
            (format!("Content-Length: {}\r\n", u64::MAX), 413),
            (
                "Content-Length: 99999999999999999999999\r\n".to_owned(),
                413,
            ),
            ("Content-Length: 2\r\nContent-Length: 3\r\n".to_owned(), 400),
            ("Content-Length: 3\r\ncontent-length: 2\r\n".to_owned(), 400),
            ("Content-Length: 2, 2\r\n".to_owned(), 400),
            ("Content-Length: +2\r\n".to_owned(), 400),
            ("Content-Length: -1\r\n".to_owned(), 400),
            ("Content-Length: 1x\r\n".to_owned(), 400),
            ("Content-Length: 0x10\r\n".to_owned(), 400),
            ("Content-Length:\r\n".to_owned(), 400),
            ("Content-Length: 1 2\r\n".to_owned(), 400),
        ] {
            assert_eq!(refusal(&head(&fields)), Some(status), "{fields}");
        }
    }

    #[test]
    fn transfer_encoding_and_unknown_expectations_are_refused() {
        let head = |fields: &str| format!("POST /groups HTTP/1.1\r\n{fields}\r\n").into_bytes();
        for fields in [
            "Transfer-Encoding: chunked\r\n",
            "transfer-encoding: identity\r\n",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        ] {
            assert_eq!(refusal(&head(fields)), Some(501), "{fields}");
        }
        assert_eq!(refusal(&head("Expect: 200-ok\r\n")), Some(417));
        let expecting = parse_head(&head("expect: 100-CONTINUE\r\nContent-Length: 1\r\n"));
        assert_eq!(
            expecting.map(|h| h.expect_continue).map_err(|r| r.status),
            Ok(true)
        );
    }

    #[test]
    fn refusals_of_the_head_reach_the_client_with_their_status() {
        with_server(alive(1), Vec::new(), |addr, control| async move {
            let chunked = format!(
                "POST /groups HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            );
            for (request, status) in [
                (head_with_fields(HEADERS_MAX + 1), 431),
                (chunked.into_bytes(), 501),
                (b"GET /metrics HTTP/1.1 extra\r\n\r\n".to_vec(), 400),
                (
                    b"POST /groups HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
                        .to_vec(),
                    400,
                ),
            ] {
                let reply = within("refusal", exchange(addr, &request)).await;
                assert_eq!(
                    reply.status,
                    status,
                    "{}",
                    String::from_utf8_lossy(&request)
                );
            }
            // One field fewer is served.
            let reply = exchange(addr, &head_with_fields(HEADERS_MAX)).await;
            assert_eq!((reply.status, reply.body.as_str()), (200, "ok\n"));
            assert!(control.commands.borrow().is_empty());
        });
    }
}
