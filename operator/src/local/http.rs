//! A minimal HTTP/1.1 client for loopback: readiness probes of local workers (and the tests'
//! requests). One request per connection (`Connection: close`), bounded by a timeout, so a
//! stalled worker can never hang the supervisor.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// An HTTP response: status code and body as text.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Body (de-chunked), lossily decoded as UTF-8.
    pub body: String,
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Connecting, sending or receiving failed or timed out.
    #[error("{addr}: {source}")]
    Io {
        /// Server address.
        addr: SocketAddr,
        /// What the socket said.
        #[source]
        source: std::io::Error,
    },
    /// The server's answer is not HTTP/1.x.
    #[error("{addr}: malformed HTTP response")]
    Malformed {
        /// Server address.
        addr: SocketAddr,
    },
}

/// Sends `method path` to `addr` with an optional JSON `body` and reads the whole response;
/// connecting, and each read and write, are bounded by `timeout`.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let io = |source| HttpError::Io { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    stream.write_all(req.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(io)?;
    parse(&raw).ok_or(HttpError::Malformed { addr })
}

/// `GET path` with no body.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response, HttpError> {
    request(addr, "GET", path, None, timeout)
}

fn parse(raw: &[u8]) -> Option<Response> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let mut parts = status_line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status: u16 = parts.next()?.parse().ok()?;
    let mut chunked = false;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k.eq_ignore_ascii_case("content-length")
                && let Ok(n) = v.parse::<usize>()
            {
                body = &body[..n.min(body.len())];
            }
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Some(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_bodies() {
        let r = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nready").expect("parse");
        assert_eq!((r.status, r.body.as_str()), (200, "ready"));
        let r = parse(b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n4\r\nload\r\n3;x=y\r\ning\r\n0\r\n\r\n")
            .expect("parse");
        assert_eq!((r.status, r.body.as_str()), (503, "loading"));
        assert!(parse(b"SSH-2.0-OpenSSH\r\n\r\n").is_none());
        assert!(parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n").is_none());
    }

    #[test]
    fn a_closed_port_is_an_io_error_naming_the_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let err = get(addr, "/readyz", Duration::from_millis(500)).expect_err("refused");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
