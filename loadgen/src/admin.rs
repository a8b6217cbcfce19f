//! The admin calls loadgen makes on the gateway's admin port, with the admin bearer token,
//! over a plain blocking socket: create a group (`POST /groups`) and read the metrics
//! (`GET /metrics`, for the `convs` scenario's table).

use anyhow::{anyhow, bail, Result};
use imgate_core::proto::UserId;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The longest a group creation may take: the gateway's own command timeout is 30 s.
const TIMEOUT: Duration = Duration::from_secs(35);

/// Largest response read; the gateway answers with a short JSON body.
const RESPONSE_BYTES_MAX: u64 = 64 * 1024;

/// The longest a metrics scrape may take: it is answered at once, even when the admin
/// server is busy, so a slow one is reported rather than waited for.
const METRICS_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest metrics page read: the Prometheus text of a few shards is tens of KiB.
const METRICS_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Creates group `id` with `members`, authorised by the admin `token`; fails unless the
/// gateway answers 200.
pub fn create_group(admin: SocketAddr, token: &str, id: u64, members: &[UserId]) -> Result<()> {
    let request = group_request(admin, token, id, members);
    let mut s = TcpStream::connect_timeout(&admin, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    s.write_all(request.as_bytes())?;
    let mut response = String::new();
    s.take(RESPONSE_BYTES_MAX).read_to_string(&mut response)?;
    let status = parse_status(&response)
        .ok_or_else(|| anyhow!("not an HTTP response: {:?}", first_line(&response)))?;
    if status != 200 {
        let body = response.split("\r\n\r\n").nth(1).unwrap_or("").trim();
        bail!("the gateway answered {status}: {body}");
    }
    Ok(())
}

/// The gateway's metrics (`GET /metrics`, Prometheus text), authorised by the admin `token`.
pub fn metrics(admin: SocketAddr, token: &str) -> Result<String> {
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n"
    );
    let mut s = TcpStream::connect_timeout(&admin, METRICS_TIMEOUT)?;
    s.set_read_timeout(Some(METRICS_TIMEOUT))?;
    s.set_write_timeout(Some(METRICS_TIMEOUT))?;
    s.write_all(request.as_bytes())?;
    let mut response = String::new();
    s.take(METRICS_BYTES_MAX).read_to_string(&mut response)?;
    let status = parse_status(&response)
        .ok_or_else(|| anyhow!("not an HTTP response: {:?}", first_line(&response)))?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    if status != 200 {
        bail!("the gateway answered {status}: {}", body.trim());
    }
    Ok(body.to_string())
}

/// The `POST /groups` request for group `id`.
fn group_request(admin: SocketAddr, token: &str, id: u64, members: &[UserId]) -> String {
    let ids: Vec<u64> = members.iter().map(|u| u.0).collect();
    let body = serde_json::json!({ "id": id, "members": ids }).to_string();
    format!(
        "POST /groups HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// The status code of an HTTP/1.x response.
fn parse_status(response: &str) -> Option<u16> {
    let mut parts = first_line(response).split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse_and_garbage_does_not() {
        assert_eq!(parse_status("HTTP/1.1 200 OK\r\n\r\n{}"), Some(200));
        assert_eq!(parse_status("HTTP/1.1 409 Conflict\r\n"), Some(409));
        assert_eq!(parse_status("SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status(""), None);
    }

    #[test]
    fn the_group_request_carries_the_token_and_the_members() {
        let admin: SocketAddr = "127.0.0.1:7401".parse().expect("address");
        let req = group_request(admin, "t0k3n", 7, &[UserId(1), UserId(2)]);
        let (head, body) = req.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("POST /groups HTTP/1.1\r\n"), "{head}");
        assert!(
            head.contains("\r\nAuthorization: Bearer t0k3n\r\n"),
            "{head}"
        );
        assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
        assert_eq!(body, r#"{"id":7,"members":[1,2]}"#);
    }
}
