//! The server side of the WebSocket opening handshake (RFC 6455 §4.2).
//!
//! The connection loop parses the upgrade with [`crate::http::parse_request`], calls
//! [`accept`] to validate it and compute `Sec-WebSocket-Accept`, then [`write_101`]s the
//! answer and switches the connection to the frame codec. A plain `GET /ws` (no upgrade) is
//! answered 400 by the caller.

use bytes::{BufMut, BytesMut};

use super::error::WsError;
use crate::http::{Method, Request};

/// Length of a valid `Sec-WebSocket-Key`: base64 of 16 bytes.
const WS_KEY_LEN: usize = 24;

/// Validates an upgrade request (GET, `Upgrade: websocket` + `Connection: upgrade`,
/// `Sec-WebSocket-Version: 13`, a well-formed `Sec-WebSocket-Key`) and returns the
/// `Sec-WebSocket-Accept` value.
pub fn accept(req: &Request) -> Result<String, WsError> {
    if req.method != Method::Get {
        return Err(WsError::NotGet);
    }
    if !req.upgrade_websocket {
        return Err(WsError::NotUpgrade);
    }
    if req.ws_version.as_deref() != Some("13") {
        return Err(WsError::UnsupportedVersion);
    }
    let key = req.ws_key.as_deref().ok_or(WsError::BadKey)?;
    if !valid_key(key.as_bytes()) {
        return Err(WsError::BadKey);
    }
    Ok(tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

/// Base64 of exactly 16 bytes: 22 alphabet characters then `==`.
fn valid_key(key: &[u8]) -> bool {
    key.len() == WS_KEY_LEN
        && key.ends_with(b"==")
        && key
            .iter()
            .take(WS_KEY_LEN - 2)
            .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
}

/// Appends the `101 Switching Protocols` answer with `Sec-WebSocket-Accept: accept_key` and
/// `extra_headers` (server-chosen; no CR or LF).
pub fn write_101(out: &mut BytesMut, accept_key: &str, extra_headers: &[(&str, &str)]) {
    out.put_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
    out.put_slice(accept_key.as_bytes());
    out.put_slice(b"\r\n");
    for (name, value) in extra_headers {
        debug_assert!(!name.contains(['\r', '\n']) && !value.contains(['\r', '\n']));
        out.put_slice(name.as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{parse_request, Limits};

    fn req(head: &str) -> Request {
        let mut buf = BytesMut::from(head.as_bytes());
        parse_request(&mut buf, &Limits::default())
            .unwrap()
            .unwrap()
    }

    const GOOD: &str = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn rfc_example_key() {
        // RFC 6455 §1.3.
        assert_eq!(accept(&req(GOOD)).unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn refusals() {
        let post = GOOD.replacen("GET", "POST", 1);
        assert_eq!(accept(&req(&post)).unwrap_err(), WsError::NotGet);
        let plain = req("GET /ws HTTP/1.1\r\nHost: x\r\n\r\n");
        let err = accept(&plain).unwrap_err();
        assert_eq!(
            (err, 400),
            (WsError::NotUpgrade, WsError::NotUpgrade.status())
        );
        let v8 = GOOD.replace("Version: 13", "Version: 8");
        let err = accept(&req(&v8)).unwrap_err();
        assert_eq!(err, WsError::UnsupportedVersion);
        assert_eq!(err.status(), 426);
        let no_key = GOOD.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "");
        assert_eq!(accept(&req(&no_key)).unwrap_err(), WsError::BadKey);
        let short = GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "abc");
        assert_eq!(accept(&req(&short)).unwrap_err(), WsError::BadKey);
        let bad_char = GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZ!==");
        assert_eq!(accept(&req(&bad_char)).unwrap_err(), WsError::BadKey);
    }

    #[test]
    fn writes_101() {
        let mut out = BytesMut::new();
        write_101(&mut out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", &[("X-A", "b")]);
        assert_eq!(
            &out[..],
            &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nX-A: b\r\n\r\n"[..]
        );
    }
}
