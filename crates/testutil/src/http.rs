//! A small blocking HTTP/1.1 client over `std::net::TcpStream` for the server tests: one
//! request per connection (`Connection: close`), the whole answer read back (Content-Length
//! or chunked), and raw request bytes for what a well-behaved client would never send.
//! (Drives `demovlp serve` and chromedriver's WebDriver API in the tests.)

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The body as JSON; panics with the status and body when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("status {}: body is not JSON ({e}): {}", self.status, self.text()))
    }
}

/// Percent-encodes everything but the unreserved characters (RFC 3986).
pub fn encode(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            o.push(b as char);
        } else {
            o += &format!("%{b:02X}");
        }
    }
    o
}

fn parse(raw: &[u8]) -> std::io::Result<Response> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| bad(status_line))?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    let rest = &raw[end + 4..];
    let mut r = Response { status, headers, body: vec![] };
    if r.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut i = 0;
        loop {
            let nl = rest[i..].windows(2).position(|w| w == b"\r\n").ok_or_else(|| bad("bad chunk"))?;
            let size_text = String::from_utf8_lossy(&rest[i..i + nl]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16).map_err(|_| bad("bad chunk size"))?;
            i += nl + 2;
            if size == 0 {
                break;
            }
            r.body.extend_from_slice(rest.get(i..i + size).ok_or_else(|| bad("short chunk"))?);
            i += size + 2;
        }
    } else if let Some(n) = r.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        r.body = rest.get(..n).ok_or_else(|| bad("short body"))?.to_vec();
    } else {
        r.body = rest.to_vec();
    }
    Ok(r)
}

/// Is `buf` a complete answer (headers, then Content-Length bytes or the last chunk)?
fn complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let body = &buf[end + 4..];
    let value = |name: &str| head.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()));
    if value("transfer-encoding:").is_some_and(|v| v == "chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    match value("content-length:").and_then(|v| v.parse::<usize>().ok()) {
        Some(n) => body.len() >= n,
        None => false,
    }
}

/// Sends `request` (complete, raw bytes) and reads the answer: up to its Content-Length or
/// last chunk (some servers keep the connection open despite `Connection: close`), else
/// until the server closes.
pub fn raw(addr: &str, request: &[u8]) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    s.write_all(request)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if complete(&buf) {
            break;
        }
    }
    parse(&buf)
}

/// One request; `body` with its content type.
pub fn request(addr: &str, method: &str, target: &str, body: Option<(&str, &[u8])>) -> std::io::Result<Response> {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n").into_bytes();
    match body {
        Some((ctype, b)) => {
            req.extend_from_slice(format!("Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n", b.len()).as_bytes());
            req.extend_from_slice(b);
        }
        None => req.extend_from_slice(b"\r\n"),
    }
    raw(addr, &req)
}

/// `GET target`; panics (naming the target) when the connection fails.
pub fn get(addr: &str, target: &str) -> Response {
    request(addr, "GET", target, None).unwrap_or_else(|e| panic!("GET {target}: {e}"))
}

/// `POST` / `DELETE` with a JSON body (WebDriver).
pub fn json(addr: &str, method: &str, target: &str, body: &serde_json::Value) -> Response {
    let b = serde_json::to_vec(body).unwrap();
    request(addr, method, target, Some(("application/json", &b))).unwrap_or_else(|e| panic!("{method} {target}: {e}"))
}
