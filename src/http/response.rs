//! HTTP/1.1 response writers: status line, headers and body appended straight to the
//! connection's output `BytesMut`, with no intermediate `String` or `Vec`.
//!
//! Every answer carries `Content-Length` (except 1xx, 204 and 304, which have no body) and
//! `Connection: close` when the connection will be closed after it. Error answers use the
//! contract's body `{"error":{"code":"…","message":"…"}}` with the message JSON-escaped.

use bytes::{BufMut, BytesMut};

use super::json::{escaped_len, write_escaped_str};

/// The standard reason phrase for `status` (`"Unknown"` for codes without one here).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        423 => "Locked",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Whether a response with this status must not carry a body nor `Content-Length`.
fn bodiless(status: u16) -> bool {
    (100..200).contains(&status) || status == 204 || status == 304
}

/// Appends the decimal digits of `n` without allocating.
fn put_decimal(out: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        if let Some(d) = digits.get_mut(i) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put_slice(digits.get(i..).unwrap_or(&[]));
}

/// Writes the status line and the fixed headers, up to (not including) the blank line.
fn write_head(
    out: &mut BytesMut,
    status: u16,
    content_type: Option<&str>,
    extra_headers: &[(&str, &str)],
    body_len: usize,
    keep_alive: bool,
) {
    let reason = reason_phrase(status);
    let mut estimate = 64 + reason.len() + content_type.map_or(0, |c| c.len() + 16);
    for (name, value) in extra_headers {
        estimate += name.len() + value.len() + 4;
    }
    out.reserve(estimate + body_len);
    out.put_slice(b"HTTP/1.1 ");
    put_decimal(out, u64::from(status));
    out.put_u8(b' ');
    out.put_slice(reason.as_bytes());
    out.put_slice(b"\r\n");
    if let Some(ct) = content_type {
        out.put_slice(b"Content-Type: ");
        out.put_slice(ct.as_bytes());
        out.put_slice(b"\r\n");
    }
    for (name, value) in extra_headers {
        debug_assert!(!name.contains(['\r', '\n']) && !value.contains(['\r', '\n']));
        out.put_slice(name.as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    if !bodiless(status) {
        out.put_slice(b"Content-Length: ");
        put_decimal(out, body_len as u64);
        out.put_slice(b"\r\n");
    }
    if !keep_alive {
        out.put_slice(b"Connection: close\r\n");
    }
}

/// Appends a complete response: status line with its reason phrase, `Content-Type` when
/// given, `extra_headers` in order, `Content-Length`, `Connection: close` when `keep_alive`
/// is false, the blank line and `body`.
///
/// For 1xx, 204 and 304 no `Content-Length` is written and `body` must be empty.
/// The header names and values are the server's own: they must not contain CR or LF.
pub fn write_response(
    out: &mut BytesMut,
    status: u16,
    content_type: Option<&str>,
    extra_headers: &[(&str, &str)],
    body: &[u8],
    keep_alive: bool,
) {
    debug_assert!(!bodiless(status) || body.is_empty());
    write_head(
        out,
        status,
        content_type,
        extra_headers,
        body.len(),
        keep_alive,
    );
    out.put_slice(b"\r\n");
    if !bodiless(status) {
        out.put_slice(body);
    }
}

/// Appends an error answer with the contract's JSON body
/// `{"error":{"code":"<code>","message":"<message>"}}` (both strings JSON-escaped).
pub fn write_json_error(
    out: &mut BytesMut,
    status: u16,
    code: &str,
    message: &str,
    keep_alive: bool,
) {
    const OPEN: &[u8] = b"{\"error\":{\"code\":";
    const MIDDLE: &[u8] = b",\"message\":";
    const CLOSE: &[u8] = b"}}";
    let body_len =
        OPEN.len() + escaped_len(code) + MIDDLE.len() + escaped_len(message) + CLOSE.len();
    write_head(
        out,
        status,
        Some("application/json"),
        &[],
        body_len,
        keep_alive,
    );
    out.put_slice(b"\r\n");
    out.put_slice(OPEN);
    write_escaped_str(out, code);
    out.put_slice(MIDDLE);
    write_escaped_str(out, message);
    out.put_slice(CLOSE);
}

/// Appends the interim `100 Continue` answer to a request with `Expect: 100-continue`
/// (see [`crate::http::needs_continue`]).
pub fn write_continue(out: &mut BytesMut) {
    out.put_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
}

/// Appends a `204 No Content` answer.
pub fn write_no_content(out: &mut BytesMut, keep_alive: bool) {
    write_response(out, 204, None, &[], &[], keep_alive);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(out: &BytesMut) -> &str {
        std::str::from_utf8(out).unwrap()
    }

    #[test]
    fn writes_status_headers_and_body() {
        let mut out = BytesMut::new();
        write_response(
            &mut out,
            201,
            Some("application/json"),
            &[("X-Id", "7")],
            b"{\"ok\":true}",
            true,
        );
        assert_eq!(
            text(&out),
            "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nX-Id: 7\r\n\
Content-Length: 11\r\n\r\n{\"ok\":true}"
        );
    }

    #[test]
    fn close_header_when_not_keep_alive() {
        let mut out = BytesMut::new();
        write_response(&mut out, 200, None, &[], b"", false);
        assert_eq!(
            text(&out),
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn continue_is_bare() {
        let mut out = BytesMut::new();
        write_continue(&mut out);
        assert_eq!(text(&out), "HTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn no_content_has_no_length() {
        let mut out = BytesMut::new();
        write_no_content(&mut out, true);
        assert_eq!(text(&out), "HTTP/1.1 204 No Content\r\n\r\n");
        let mut out = BytesMut::new();
        write_no_content(&mut out, false);
        assert_eq!(
            text(&out),
            "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn json_error_body_is_exact_and_length_matches() {
        let mut out = BytesMut::new();
        write_json_error(&mut out, 404, "not_found", "no queue \"a\\b\"\n", true);
        let s = text(&out);
        let (head, body) = s.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(head.contains("Content-Type: application/json\r\n"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(!head.contains("Connection: close"));
        assert_eq!(
            body,
            r#"{"error":{"code":"not_found","message":"no queue \"a\\b\"\n"}}"#
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["message"], "no queue \"a\\b\"\n");
    }

    #[test]
    fn big_content_length_and_unknown_reason() {
        let mut out = BytesMut::new();
        let body = vec![b'x'; 1_234_567];
        write_response(&mut out, 299, None, &[], &body, true);
        let s = std::str::from_utf8(&out[..64]).unwrap();
        assert!(s.starts_with("HTTP/1.1 299 Unknown\r\nContent-Length: 1234567\r\n\r\n"));
        assert_eq!(out.len(), 49 + body.len());
    }

    #[test]
    fn output_parses_as_a_response() {
        let mut out = BytesMut::new();
        write_json_error(&mut out, 431, "header_too_large", "too big", false);
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut resp = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(n) = resp.parse(&out).unwrap() else {
            panic!("incomplete")
        };
        assert_eq!(resp.code, Some(431));
        assert_eq!(resp.reason, Some("Request Header Fields Too Large"));
        let cl = resp
            .headers
            .iter()
            .find(|h| h.name == "Content-Length")
            .unwrap();
        let cl: usize = std::str::from_utf8(cl.value).unwrap().parse().unwrap();
        assert_eq!(out.len() - n, cl);
    }
}
