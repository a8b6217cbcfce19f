//! The admin HTTP server: `/metrics`, `/healthz`, group membership and drain, on its own
//! glommio executor and its own port.
//!
//! This module owns the HTTP/1.1 handling, written by hand because the surface is five
//! routes: one request per connection, answered with `Connection: close`. It leaves to the
//! runtime how a command reaches its owner shard and what a drain does: both sit behind
//! the [`Control`] trait, which the runtime implements over its shard channels.
//!
//! Routes:
//! - `GET /metrics`: 200, [`Metrics::render`] as `text/plain; version=0.0.4`.
//! - `GET /healthz`: 200 `ok`, or 503 `draining` once a drain started.
//! - `POST /groups` `{"id": 42, "members": [1, 2]}`: creates group 42.
//! - `POST /groups/42/members` `{"members": [4]}`: adds members.
//! - `DELETE /groups/42/members` `{"members": [4]}`: removes members.
//!   The group routes answer 200 `{"ok":true}` or `{"error":"..."}` with 400 (bad JSON,
//!   group id 0, [`CommandError::NotAGroup`], [`CommandError::BadMembers`]), 404
//!   ([`CommandError::NoSuchGroup`]), 409 ([`CommandError::AlreadyExists`]), 503
//!   ([`CommandError::StorageFailed`]) or 504 (no answer within [`COMMAND_TIMEOUT`]).
//! - `POST /drain`: 202; asks the runtime to drain (stop accepting, GoAway, exit).
//!
//! Invariants: every connection is bounded in bytes ([`HEAD_BYTES_MAX`],
//! [`BODY_BYTES_MAX`], [`LINGER_BYTES_MAX`]), in time ([`READ_TIMEOUT`],
//! [`WRITE_TIMEOUT`], [`COMMAND_TIMEOUT`], [`LINGER_TIMEOUT`]) and in number
//! ([`CONNECTIONS_MAX`]); bad input gets a 4xx/5xx status with a short body (text, or JSON
//! on the group routes) and a close, never a panic.

use crate::metrics::Metrics;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::Semaphore;
use glommio::timer::Timer;
use imgate_core::mesh::{Command, CommandError};
use imgate_core::proto::{ConvId, UserId};
use serde::Deserialize;
use std::future::Future;
use std::net::Shutdown;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// Largest request head (request line and headers) accepted: 8 KiB, the common default of
/// HTTP servers, far above what an admin client sends.
pub const HEAD_BYTES_MAX: usize = 8 * 1024;
/// Largest request body accepted: 1 MiB holds a member list of over 100,000 ids, the
/// core's `group_members_max`, written as JSON.
pub const BODY_BYTES_MAX: usize = 1024 * 1024;
/// Time a client has to send its whole request (head and body) once connected. One
/// deadline for the whole request, not per read, so a client trickling a byte at a time
/// cannot hold a connection slot for longer.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to take the whole response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a group command has to be answered by its owner shard (a durable log append
/// there, milliseconds normally). Past it the client gets 504; the command may still
/// take effect.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once. More wait in the listen backlog: the admin port is for
/// operators and scrapers, and each connection holds up to two buffers of the sizes above.
pub const CONNECTIONS_MAX: usize = 64;
/// After answering, the server shuts its side down and reads (and drops) what the client
/// still sends, so that closing with unread data does not reset the connection before the
/// client has read the answer (for example an oversized request that was cut short).
/// This bounds that read in bytes ...
pub const LINGER_BYTES_MAX: usize = 64 * 1024;
/// ... and in time.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause after a failed accept (such as EMFILE) so that a persistent error does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Size of one read while lingering.
const LINGER_CHUNK_BYTES: usize = 4096;

/// What the admin server needs from the runtime. The futures are local (not `Send`): the
/// admin server runs on one glommio executor.
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
}

/// Everything the admin server serves from.
#[derive(Clone)]
pub struct AdminContext {
    /// The metrics every shard updates.
    pub metrics: Arc<Metrics>,
    /// The way to the shards.
    pub control: Rc<dyn Control>,
}

/// Serves admin HTTP on `listener` forever, one task per connection, at most
/// [`CONNECTIONS_MAX`] at once. Must run on a glommio executor (it uses its timers and
/// tasks). It returns only if its connection-slot semaphore is closed, which nothing does;
/// a runtime that wants to stop it drops its executor or races it against a shutdown
/// future.
pub async fn serve(listener: TcpListener, ctx: AdminContext) {
    serve_with(listener, ctx, Timeouts::DEFAULT).await;
}

/// The time bounds of one connection. Always [`Timeouts::DEFAULT`] outside tests; tests
/// shorten them to prove each one fires without waiting seconds.
#[derive(Clone, Copy, Debug)]
struct Timeouts {
    read: Duration,
    write: Duration,
    command: Duration,
    linger: Duration,
}

impl Timeouts {
    const DEFAULT: Timeouts = Timeouts {
        read: READ_TIMEOUT,
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

async fn serve_with(listener: TcpListener, ctx: AdminContext, timeouts: Timeouts) {
    let server = Rc::new(Server { ctx, timeouts });
    let slots = Rc::new(Semaphore::new(CONNECTIONS_MAX as u64));
    loop {
        // Take a slot before accepting, so that extra connections wait in the kernel's
        // backlog instead of in memory here.
        let permit = match slots.acquire_static_permit(1).await {
            Ok(permit) => permit,
            Err(e) => {
                tracing::error!(error = %e, "admin connection semaphore closed; admin server stops");
                return;
            }
        };
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                drop(permit);
                Timer::new(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let server = server.clone();
        glommio::spawn_local(async move {
            handle_connection(stream, &server).await;
            drop(permit);
        })
        .detach();
    }
}

/// Serves one request on `stream`, then closes it.
async fn handle_connection(mut stream: TcpStream, server: &Server) {
    let read = with_deadline(
        server.timeouts.read,
        read_request(&mut stream),
        Err(ReadError::Reject(Response::text(408, "request timeout\n"))),
    )
    .await;
    let response = match read {
        Ok(request) => {
            let response = route(&request, server).await;
            tracing::debug!(
                method = %request.head.method,
                path = %request.head.path,
                status = response.status,
                "admin request"
            );
            response
        }
        Err(ReadError::Reject(response)) => {
            tracing::debug!(status = response.status, "admin request rejected");
            response
        }
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
    linger(&mut stream, server.timeouts.linger).await;
}

/// Shuts down the sending side and reads until the client closes, bounded by
/// [`LINGER_BYTES_MAX`] and [`LINGER_TIMEOUT`]; see [`LINGER_BYTES_MAX`] for why.
async fn linger(stream: &mut TcpStream, limit: Duration) {
    if stream.shutdown(Shutdown::Write).await.is_err() {
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

/// Runs `fut`, or gives `on_timeout` if it has not finished after `limit`. Uses a glommio
/// timer, so it must run on a glommio executor.
async fn with_deadline<T>(limit: Duration, fut: impl Future<Output = T>, on_timeout: T) -> T {
    futures_lite::future::or(fut, async {
        Timer::new(limit).await;
        on_timeout
    })
    .await
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
}

/// A whole request.
#[derive(Debug)]
struct Request {
    head: Head,
    body: Vec<u8>,
}

/// Reads one request: the head up to [`HEAD_BYTES_MAX`], then a body of its
/// `Content-Length` up to [`BODY_BYTES_MAX`]. Bytes after the body are ignored.
async fn read_request(stream: &mut TcpStream) -> Result<Request, ReadError> {
    let mut buf = vec![0u8; HEAD_BYTES_MAX];
    let mut filled = 0usize;
    // Where the search for the blank line resumes: a blank line completed by new bytes
    // starts at most 3 bytes before them, so a client sending a byte at a time costs
    // linear work, not quadratic.
    let mut scan_from = 0usize;
    let (head_len, body_start) = loop {
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
    let head = parse_head(&buf[..head_len]).map_err(ReadError::Reject)?;

    let mut body = Vec::with_capacity(head.content_length);
    let already = (filled - body_start).min(head.content_length);
    body.extend_from_slice(&buf[body_start..body_start + already]);
    drop(buf);
    if head.expect_continue && body.len() < head.content_length {
        stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }
    // `body` has capacity `content_length`, which `parse_head` bounded by BODY_BYTES_MAX.
    body.resize(head.content_length, 0);
    let mut got = already;
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
    Ok(Request { head, body })
}

/// Where the head ends in `buf`: `(head length without the blank line, body start)`,
/// looking at line ends from `from` on. The blank line is CRLF CRLF, or LF LF from lenient
/// clients.
fn find_head_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from.min(buf.len());
    while let Some(pos) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + pos;
        let rest = &buf[nl + 1..];
        if rest.starts_with(b"\r\n") {
            return Some((nl + 1, nl + 3));
        }
        if rest.starts_with(b"\n") {
            return Some((nl + 1, nl + 2));
        }
        i = nl + 1;
    }
    None
}

/// Parses a request head (request line and header lines, without the blank line).
fn parse_head(head: &[u8]) -> Result<Head, Response> {
    let bad = |why: &str| Response::text(400, &format!("bad request: {why}\n"));
    let text = std::str::from_utf8(head).map_err(|_| bad("head is not UTF-8"))?;
    let mut lines = text
        .split('\n')
        .map(|line| line.strip_suffix('\r').unwrap_or(line));
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(bad("malformed method"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(bad("unsupported HTTP version"));
    }
    if !target.starts_with('/') {
        return Err(bad("target must be a path"));
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);

    let mut content_length: Option<usize> = None;
    let mut expect_continue = false;
    for line in lines.filter(|line| !line.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad("header line without a colon"));
        };
        if name.is_empty() || name.bytes().any(|b| !b.is_ascii_graphic()) {
            // This also rejects obsolete line folding (a line starting with whitespace).
            return Err(bad("malformed header name"));
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("malformed Content-Length"));
            }
            // All digits, so the only parse failure is overflow: too large either way.
            let n = value.parse::<usize>().unwrap_or(usize::MAX);
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
                allow: None,
            },
            _ => Response::method_not_allowed("GET"),
        },
        "/healthz" => match method {
            "GET" if ctx.control.is_draining() => Response::text(503, "draining\n"),
            "GET" => Response::text(200, "ok\n"),
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
                CommandError::StorageFailed => 503,
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
    /// The `Allow` header of a 405.
    allow: Option<&'static str>,
}

impl Response {
    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
            allow: None,
        }
    }

    fn json(status: u16, body: String) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: body.into_bytes(),
            allow: None,
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
            allow: Some(allow),
            ..Response::text(405, "method not allowed\n")
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
        if let Some(allow) = self.allow {
            head.push_str("Allow: ");
            head.push_str(allow);
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
    use glommio::{LocalExecutorBuilder, Placement};
    use imgate_core::shard::ShardStats;
    use std::cell::{Cell, RefCell};
    use std::collections::VecDeque;
    use std::net::SocketAddr;

    /// A [`Control`] that records what it is asked and answers from a script.
    #[derive(Default)]
    struct FakeControl {
        commands: RefCell<Vec<Command>>,
        results: RefCell<VecDeque<Result<(), CommandError>>>,
        /// Commands never complete, as if the owner shard never answered.
        hang: Cell<bool>,
        drains: Cell<u32>,
    }

    impl Control for FakeControl {
        fn command(&self, cmd: Command) -> Pin<Box<dyn Future<Output = Result<(), CommandError>>>> {
            self.commands.borrow_mut().push(cmd);
            if self.hang.get() {
                return Box::pin(futures_lite::future::pending());
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
    }

    /// A parsed response.
    #[derive(Debug)]
    struct Reply {
        status: u16,
        head: String,
        body: String,
    }

    /// Runs `test` on a fresh executor with an admin server on 127.0.0.1:0 whose fake
    /// control answers commands from `script` (then `Ok`), passing the server's address.
    fn with_server<F, Fut>(metrics: Arc<Metrics>, script: Vec<Result<(), CommandError>>, test: F)
    where
        F: FnOnce(SocketAddr, Rc<FakeControl>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        run_server(metrics, script, None, test);
    }

    /// [`with_server`] with these timeouts instead of the defaults of [`serve`].
    fn with_timeouts<F, Fut>(timeouts: Timeouts, test: F)
    where
        F: FnOnce(SocketAddr, Rc<FakeControl>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        run_server(Metrics::new(1), Vec::new(), Some(timeouts), test);
    }

    fn run_server<F, Fut>(
        metrics: Arc<Metrics>,
        script: Vec<Result<(), CommandError>>,
        timeouts: Option<Timeouts>,
        test: F,
    ) where
        F: FnOnce(SocketAddr, Rc<FakeControl>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(64 * 1024)
            .spawn(move || async move {
                let control = Rc::new(FakeControl::default());
                control.results.borrow_mut().extend(script);
                let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
                let addr = listener.local_addr().expect("local addr");
                let ctx = AdminContext {
                    metrics,
                    control: control.clone(),
                };
                match timeouts {
                    None => glommio::spawn_local(serve(listener, ctx)).detach(),
                    Some(t) => glommio::spawn_local(serve_with(listener, ctx, t)).detach(),
                };
                test(addr, control).await;
            })
            .expect("executor")
            .join()
            .expect("test panicked");
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

    fn request(method: &str, path: &str, body: &str) -> Vec<u8> {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[test]
    fn metrics_are_served_as_prometheus_text() {
        let metrics = Metrics::new(2);
        metrics.shard(1).publish(&ShardStats {
            acks: 7,
            ..ShardStats::default()
        });
        metrics.shard(0).record_fsync(Duration::from_micros(1500));
        let expected = metrics.clone();
        with_server(metrics, Vec::new(), move |addr, _| async move {
            let reply = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
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
            // The same text as rendering directly, but for the uptime line.
            let strip = |text: &str| {
                text.lines()
                    .filter(|l| !l.starts_with("imgate_uptime_seconds "))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            assert_eq!(strip(&reply.body), strip(&expected.render()));
        });
    }

    #[test]
    fn create_group_reaches_control_as_a_command() {
        with_server(Metrics::new(1), Vec::new(), |addr, control| async move {
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
        with_server(Metrics::new(1), Vec::new(), |addr, control| async move {
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
        with_server(Metrics::new(1), script, move |addr, control| async move {
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
        with_server(Metrics::new(1), Vec::new(), |addr, control| async move {
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
        with_server(Metrics::new(1), Vec::new(), |addr, _| async move {
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
        with_server(Metrics::new(1), Vec::new(), |addr, _| async move {
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
        with_server(Metrics::new(1), Vec::new(), |addr, control| async move {
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
        with_server(Metrics::new(1), Vec::new(), |addr, _| async move {
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
        with_server(Metrics::new(1), Vec::new(), |addr, control| async move {
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
    fn a_request_not_finished_in_time_gets_408() {
        let timeouts = Timeouts {
            read: Duration::from_millis(50),
            ..Timeouts::DEFAULT
        };
        with_timeouts(timeouts, |addr, _| async move {
            // A head that never ends, and a body that never comes.
            for partial in [
                &b"GET /metrics HTTP/1.1\r\nHost: x\r\n"[..],
                b"POST /groups HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"id\"",
            ] {
                let reply = exchange(addr, partial).await;
                assert_eq!(reply.status, 408, "{}", String::from_utf8_lossy(partial));
            }
        });
    }

    #[test]
    fn a_command_without_an_answer_gets_504() {
        let timeouts = Timeouts {
            command: Duration::from_millis(50),
            read: LONG,
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
        with_server(Metrics::new(1), Vec::new(), |addr, control| async move {
            let body = r#"{"id": 9, "members": [1]}"#;
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let head = format!(
                "POST /groups HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
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
        let head = b"POST /groups/1/members?x=1 HTTP/1.1\nContent-Length:  12 \ncontent-length: 12";
        let parsed = parse_head(head).expect("valid head");
        assert_eq!(
            parsed,
            Head {
                method: "POST".into(),
                path: "/groups/1/members".into(),
                content_length: 12,
                expect_continue: false,
            }
        );
        assert_eq!(
            find_head_end(b"GET / HTTP/1.1\r\n\r\nbody", 0),
            Some((16, 18))
        );
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\nbody", 0), Some((15, 16)));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n", 0), None);
        // Resuming 3 bytes before new data still finds a blank line they complete.
        let head = b"GET / HTTP/1.1\r\nA: b\r\n\r\n";
        for split in 1..head.len() {
            let resume = split.saturating_sub(3);
            assert_eq!(find_head_end(&head[..split], 0), None, "split {split}");
            assert_eq!(find_head_end(head, resume), Some((22, 24)), "split {split}");
        }
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999")
                .map_err(|r| r.status),
            Err(413)
        );
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked").map_err(|r| r.status),
            Err(501)
        );
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n folded").map_err(|r| r.status),
            Err(400)
        );
    }
}
