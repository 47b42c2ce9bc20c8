//! Connections: the accept loop, and the check of each request's head before hyper sees it.
//!
//! hyper answers a request head it cannot take (a target over 65 534 bytes, a head over its
//! buffer, too many header fields, a malformed request line or header) itself, before any
//! handler or middleware runs, with a bare status and an empty body. So each connection's
//! head is read and checked here first, against limits below hyper's: a refused head gets a
//! JSON answer `{"error": "..."}` naming the limit (414, 431, 400, or 408 when it does not
//! arrive within the time limit), and an accepted one is handed to hyper together with the
//! bytes read so far. Each connection carries one request (`Connection: close`): a second
//! request on a kept-alive connection would reach hyper's parser unchecked.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::{HeaderName, HeaderValue, StatusCode, Uri};
use axum::Router;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Longest request target (path and query string) accepted, in bytes; longer → 414.
pub const MAX_URI_BYTES: usize = 16 * 1024;
/// Longest request head (request line and header fields) accepted, in bytes; longer → 431.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;
/// Most header fields accepted; more → 431.
pub const MAX_HEADERS: usize = 64;

/// The limits on a request head.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub max_uri: usize,
    pub max_head: usize,
    pub max_headers: usize,
    /// Time from the connection's first byte to the end of its head (→ 408).
    pub timeout: Duration,
}

impl Default for HeadLimits {
    fn default() -> HeadLimits {
        HeadLimits { max_uri: MAX_URI_BYTES, max_head: MAX_HEAD_BYTES, max_headers: MAX_HEADERS, timeout: Duration::from_secs(10) }
    }
}

/// A refused request head: the status and the message of its JSON answer, and what was
/// readable of the request line (for the access log).
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    pub message: String,
    pub method: String,
    pub path: String,
}

/// What reading a connection's head gave.
#[derive(Debug)]
pub enum Head {
    /// A head that passed the checks: the bytes read so far (the head, maybe some body).
    Accepted(Vec<u8>),
    /// The client closed (or the server is stopping) before a whole head arrived, or sent nothing.
    Gone,
    Refused(Refused),
}

/// Records one answered request: method, path, status, start (the server's access log and counts).
pub type Record = Arc<dyn Fn(&str, &str, u16, Instant) + Send + Sync>;

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The method and the path (without the query) of a request line, as far as it can be read.
fn line_parts(buf: &[u8]) -> (String, String) {
    let line = &buf[..find(buf, b"\r\n").unwrap_or(buf.len()).min(400)];
    let text = String::from_utf8_lossy(line);
    let mut it = text.split(' ');
    let method = it.next().unwrap_or("").chars().take(20).collect::<String>();
    let path = it.next().unwrap_or("").split('?').next().unwrap_or("").chars().take(200).collect::<String>();
    let dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
    (dash(method), dash(path))
}

/// The checks that need only what has arrived so far: `Some` when the head is already refused.
fn check_partial(buf: &[u8], lim: &HeadLimits) -> Option<(StatusCode, String)> {
    // The request line: METHOD SP TARGET SP VERSION CRLF.
    let line_end = find(buf, b"\r\n");
    let line = &buf[..line_end.unwrap_or(buf.len())];
    let target_len = match line.iter().position(|&b| b == b' ') {
        Some(sp) => {
            let rest = &line[sp + 1..];
            rest.iter().position(|&b| b == b' ').unwrap_or(rest.len())
        }
        None => 0,
    };
    let too_long = || {
        let more = if line_end.is_none() { "at least " } else { "" };
        format!(
            "URI too long: the request target is {more}{target_len} bytes, the limit is {} (send long queries as POST /api/search \
with a JSON body)",
            lim.max_uri
        )
    };
    if target_len > lim.max_uri {
        return Some((StatusCode::URI_TOO_LONG, too_long()));
    }
    if buf.len() > lim.max_head {
        return Some((
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("request headers too large: the request head (request line and header fields) is over {} bytes", lim.max_head),
        ));
    }
    None
}

/// The checks of a whole head (`head` ends with the blank line): what hyper would refuse
/// with a bare answer is refused here with a message.
fn check_head(head: &[u8], lim: &HeadLimits) -> Result<(), (StatusCode, String)> {
    let bad = |m: String| Err((StatusCode::BAD_REQUEST, m));
    let mut headers = vec![httparse::EMPTY_HEADER; lim.max_headers];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return bad("malformed request head (incomplete)".into()),
        Err(httparse::Error::TooManyHeaders) => {
            return Err((
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("request headers too large: more than {} header fields", lim.max_headers),
            ))
        }
        Err(e) => return bad(format!("malformed request head: {e}")),
    }
    let target = req.path.unwrap_or("");
    if let Err(e) = Uri::try_from(target) {
        return bad(format!("malformed request target: {e}"));
    }
    let mut length: Option<&[u8]> = None;
    let mut chunked = false;
    for h in req.headers.iter() {
        if HeaderName::from_bytes(h.name.as_bytes()).is_err() || HeaderValue::from_bytes(h.value).is_err() {
            return bad(format!("malformed header field {:?}", h.name));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let ok = !h.value.is_empty() && h.value.iter().all(u8::is_ascii_digit) && h.value.len() <= 19;
            if !ok || length.is_some_and(|l| l != h.value) {
                return bad("bad Content-Length (not a number, or given twice with different values)".into());
            }
            length = Some(h.value);
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if req.version == Some(0) {
                return bad("Transfer-Encoding in an HTTP/1.0 request".into());
            }
            let last = String::from_utf8_lossy(h.value).rsplit(',').next().unwrap_or("").trim().to_ascii_lowercase();
            chunked = last == "chunked";
            if !chunked {
                return bad("Transfer-Encoding must end with chunked".into());
            }
        }
    }
    if chunked && length.is_some() {
        return bad("both Content-Length and Transfer-Encoding given".into());
    }
    Ok(())
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Reads one request head from `s`, checking it as it arrives. `stop` resolving ends the wait.
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S, lim: &HeadLimits, stop: &mut watch::Receiver<bool>) -> Head {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = vec![0u8; 8192];
    let mut deadline: Option<tokio::time::Instant> = None;
    let refuse = |buf: &[u8], status: StatusCode, message: String| {
        let (method, path) = line_parts(buf);
        Head::Refused(Refused { status, message, method, path })
    };
    loop {
        let read = s.read(&mut chunk);
        let n = tokio::select! {
            r = read => match r {
                Ok(0) | Err(_) => return Head::Gone,
                Ok(n) => n,
            },
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                let message = format!("request head not received within {} ms", lim.timeout.as_millis());
                return refuse(&buf, StatusCode::REQUEST_TIMEOUT, message);
            }
            _ = stopped(stop) => {
                if buf.is_empty() {
                    return Head::Gone;
                }
                return refuse(&buf, StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down".into());
            }
        };
        deadline.get_or_insert_with(|| tokio::time::Instant::now() + lim.timeout);
        // A blank line can end across two reads: look from 3 bytes before the new ones.
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        let end = find(&buf[from..], b"\r\n\r\n").map(|p| from + p + 4);
        let seen = &buf[..end.unwrap_or(buf.len())];
        if let Some((status, message)) = check_partial(seen, lim) {
            return refuse(&buf, status, message);
        }
        if let Some(end) = end {
            return match check_head(&buf[..end], lim) {
                Ok(()) => Head::Accepted(buf),
                Err((status, message)) => refuse(&buf, status, message),
            };
        }
    }
}

/// The bytes of a JSON error answer that closes the connection.
pub fn error_bytes(status: StatusCode, message: &str) -> Vec<u8> {
    let body = serde_json::json!({ "error": message }).to_string();
    let reason = status.canonical_reason().unwrap_or("");
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncache-control: no-store\r\nx-content-type-options: nosniff\r\n\
content-length: {}\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// Writes a refusal, then reads (and drops) what the client still sends for a moment, so that
/// closing with unread bytes does not reset the connection before the client read the answer.
async fn refuse(mut s: TcpStream, r: &Refused) {
    if s.write_all(&error_bytes(r.status, &r.message)).await.is_err() || s.shutdown().await.is_err() {
        return;
    }
    let mut sink = vec![0u8; 16384];
    let mut left = 4usize << 20;
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while left > 0 {
        match tokio::time::timeout_at(until, s.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => break,
        }
    }
}

/// A stream that first gives back the bytes already read from it.
struct Prefixed {
    prefix: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.pos < me.prefix.len() {
            let n = buf.remaining().min(me.prefix.len() - me.pos);
            buf.put_slice(&me.prefix[me.pos..me.pos + n]);
            me.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// One connection: its head checked, then one request served by `router`.
async fn connection(mut s: TcpStream, router: Router, lim: HeadLimits, mut stop: watch::Receiver<bool>, record: Record) {
    let t = Instant::now();
    let prefix = match read_head(&mut s, &lim, &mut stop).await {
        Head::Accepted(b) => b,
        Head::Gone => return,
        Head::Refused(r) => {
            record(&r.method, &r.path, r.status.as_u16(), t);
            refuse(s, &r).await;
            return;
        }
    };
    let io = hyper_util::rt::TokioIo::new(Prefixed { prefix, pos: 0, inner: s });
    let service = hyper_util::service::TowerToHyperService::new(router);
    let conn = hyper::server::conn::http1::Builder::new().keep_alive(false).serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Accepts connections and serves them until `stop` turns true, then waits for the
/// connections still open (each finishes its request; an idle one is closed).
pub async fn serve(listener: TcpListener, router: Router, lim: HeadLimits, mut stop: watch::Receiver<bool>, record: Record) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    tasks.spawn(connection(s, router.clone(), lim, stop.clone(), record.clone()));
                }
                // Out of file descriptors and the like: wait, then go on accepting.
                Err(e) => {
                    eprintln!("warning: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
            _ = stopped(&mut stop) => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    drop(listener);
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(req: &[u8], lim: &HeadLimits) -> Result<(), (u16, String)> {
        let end = find(req, b"\r\n\r\n").map(|p| p + 4);
        if let Some((s, m)) = check_partial(&req[..end.unwrap_or(req.len())], lim) {
            return Err((s.as_u16(), m));
        }
        check_head(&req[..end.expect("a whole head")], lim).map_err(|(s, m)| (s.as_u16(), m))
    }

    #[test]
    fn heads_are_refused_with_the_status_and_the_limit_hyper_would_not_name() {
        let lim = HeadLimits { max_uri: 100, max_head: 400, max_headers: 4, timeout: Duration::from_secs(1) };
        assert_eq!(check(b"GET /api/search?q=dog HTTP/1.1\r\nHost: x\r\n\r\n", &lim), Ok(()));
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(100));
        let e = check(long.as_bytes(), &lim).unwrap_err();
        assert_eq!(e.0, 414);
        assert!(e.1.contains("101 bytes, the limit is 100"), "{}", e.1);
        // Still arriving, already too long.
        let e = check_partial(format!("GET /{}", "a".repeat(150)).as_bytes(), &lim).unwrap();
        assert_eq!(e.0, StatusCode::URI_TOO_LONG);
        assert!(e.1.contains("at least 151 bytes"), "{}", e.1);
        let big = format!("GET / HTTP/1.1\r\nX-A: {}\r\n\r\n", "b".repeat(400));
        assert_eq!(check(big.as_bytes(), &lim).unwrap_err().0, 431);
        let many = "GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\n\r\n";
        let e = check(many.as_bytes(), &lim).unwrap_err();
        assert_eq!((e.0, e.1.contains("more than 4 header fields")), (431, true), "{}", e.1);
        for bad in [
            &b"G@T / HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/2.5\r\n\r\n",
            b"GET /caf\xe9 HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3x\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"\x16\x03\x01 hello\r\n\r\n",
        ] {
            let e = check(bad, &lim).unwrap_err();
            assert_eq!(e.0, 400, "{:?}: {}", String::from_utf8_lossy(bad), e.1);
        }
        assert_eq!(check(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", &lim), Ok(()));
        assert_eq!(check(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", &lim), Ok(()));
    }

    #[test]
    fn the_error_answer_is_http_with_a_json_body_of_its_length() {
        let b = String::from_utf8(error_bytes(StatusCode::URI_TOO_LONG, "too \"long\"")).unwrap();
        let (head, body) = b.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{head}");
        assert!(head.contains("content-type: application/json") && head.contains(&format!("content-length: {}", body.len())));
        assert_eq!(serde_json::from_str::<serde_json::Value>(body).unwrap()["error"], "too \"long\"");
    }

    #[test]
    fn the_request_line_is_read_for_the_log_as_far_as_it_goes() {
        assert_eq!(line_parts(b"GET /api/search?q=x HTTP/1.1\r\n"), ("GET".into(), "/api/search".into()));
        assert_eq!(line_parts(b"GET /aaaa"), ("GET".into(), "/aaaa".into()));
        assert_eq!(line_parts(b""), ("-".into(), "-".into()));
    }
}
