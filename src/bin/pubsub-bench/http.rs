//! Plain HTTP/1.1 for the load generator: one-shot setup requests (`POST /exchanges`,
//! `/queues`, `/bindings`, `GET /queues/{name}`) and an incremental response parser that
//! the pipelined `POST /publish` publisher uses to read answers in order.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use std::sync::LazyLock;

use memchr::memmem::Finder;

/// Largest response head or body the load generator accepts.
const MAX_RESPONSE: usize = 8 * 1024 * 1024;

/// One complete response at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    pub status: u16,
    /// Bytes the whole response occupies.
    pub len: usize,
    /// Where its body starts.
    pub body_start: usize,
}

/// Parses the response at the front of `buf`, if it is complete.
pub fn parse_response(buf: &[u8]) -> io::Result<Option<Parsed>> {
    // Built once: the pipelined publisher parses one response per message.
    static HEAD_END: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\r\n\r\n"));
    let Some(h) = HEAD_END.find(buf) else {
        if buf.len() > MAX_RESPONSE {
            return Err(io::Error::other("response head too large"));
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(buf.get(..h).unwrap_or(&[]))
        .map_err(|_| io::Error::other("non-UTF-8 response head"))?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other("bad status line"))?;
    let mut clen = 0usize;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                clen = v
                    .trim()
                    .parse()
                    .map_err(|_| io::Error::other("bad content-length"))?;
            } else if k.trim().eq_ignore_ascii_case("transfer-encoding") {
                return Err(io::Error::other("chunked responses are not supported"));
            }
        }
    }
    if clen > MAX_RESPONSE {
        return Err(io::Error::other("response body too large"));
    }
    let body_start = h + 4;
    if buf.len() < body_start + clen {
        return Ok(None);
    }
    Ok(Some(Parsed {
        status,
        len: body_start + clen,
        body_start,
    }))
}

/// Appends one request to `out`.
pub fn write_request(out: &mut Vec<u8>, addr: &str, method: &str, path: &str, body: &[u8]) {
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(addr.as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: application/json\r\nContent-Length: ");
    super::payload::push_u64(out, body.len() as u64);
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
}

/// Sends one request on a fresh connection and returns status and body.
pub fn request(addr: &str, method: &str, path: &str, body: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut out = Vec::new();
    write_request(&mut out, addr, method, path, body.as_bytes());
    s.write_all(&out)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(p) = parse_response(&buf)? {
            let b = buf.get(p.body_start..p.len).unwrap_or(&[]);
            return Ok((p.status, String::from_utf8_lossy(b).into_owned()));
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before answer",
            ));
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
    }
}

/// Sends a request and fails unless the status is 2xx.
pub fn must(addr: &str, method: &str, path: &str, body: &str) -> io::Result<String> {
    let (st, b) = request(addr, method, path, body)?;
    if !(200..300).contains(&st) {
        return Err(io::Error::other(format!("{method} {path} -> {st}: {b}")));
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pipelined_answers() {
        let two = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 503 X\r\ncontent-length: 0\r\n\r\n";
        let a = parse_response(two).unwrap().unwrap();
        assert_eq!((a.status, a.len), (200, 40));
        let b = parse_response(&two[a.len..]).unwrap().unwrap();
        assert_eq!(b.status, 503);
        assert_eq!(parse_response(&two[..20]).unwrap(), None);
    }
}
