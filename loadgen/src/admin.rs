//! The one admin call loadgen makes: create a group (`POST /groups` on the gateway's admin
//! port), over a plain blocking socket.

use anyhow::{anyhow, bail, Result};
use imgate_core::proto::UserId;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The longest a group creation may take: the gateway's own command timeout is 30 s.
const TIMEOUT: Duration = Duration::from_secs(35);

/// Largest response read; the gateway answers with a short JSON body.
const RESPONSE_BYTES_MAX: u64 = 64 * 1024;

/// Creates group `id` with `members`; fails unless the gateway answers 200.
pub fn create_group(admin: SocketAddr, id: u64, members: &[UserId]) -> Result<()> {
    let ids: Vec<u64> = members.iter().map(|u| u.0).collect();
    let body = serde_json::json!({ "id": id, "members": ids }).to_string();
    let request = format!(
        "POST /groups HTTP/1.1\r\nHost: {admin}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
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
}
