//! A minimal JSON string writer: quotes and escapes a `&str` straight into any `BufMut`
//! (`BytesMut`, `Vec<u8>`) without an intermediate `String`.
//!
//! Used for the `{"error":{...}}` bodies of [`crate::http::response`] and by the WebSocket
//! frame builders, which splice the escaped strings around a message's raw JSON body.

use bytes::BufMut;

/// The escape sequence for a byte that must be escaped in a JSON string, or `None`.
///
/// Control characters without a short form use `\u00XX`, written by [`write_escaped_str`].
#[inline]
fn short_escape(b: u8) -> Option<&'static [u8]> {
    match b {
        b'"' => Some(b"\\\""),
        b'\\' => Some(b"\\\\"),
        b'\n' => Some(b"\\n"),
        b'\r' => Some(b"\\r"),
        b'\t' => Some(b"\\t"),
        0x08 => Some(b"\\b"),
        0x0c => Some(b"\\f"),
        _ => None,
    }
}

#[inline]
fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// The number of bytes [`write_escaped_str`] writes for `s`, quotes included.
///
/// Lets a writer emit `Content-Length` (or a frame length) before the body without buffering.
pub fn escaped_len(s: &str) -> usize {
    let mut n = 2;
    for &b in s.as_bytes() {
        n += if !needs_escape(b) {
            1
        } else if let Some(esc) = short_escape(b) {
            esc.len()
        } else {
            6
        };
    }
    n
}

/// Writes `s` as a JSON string: a quote, `s` with `"`, `\` and control characters escaped,
/// and a closing quote. Non-ASCII UTF-8 is copied as is (valid JSON).
pub fn write_escaped_str<B: BufMut + ?Sized>(out: &mut B, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.put_u8(b'"');
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !needs_escape(b) {
            continue;
        }
        if let Some(run) = bytes.get(start..i) {
            out.put_slice(run);
        }
        match short_escape(b) {
            Some(esc) => out.put_slice(esc),
            None => out.put_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0x0f)],
            ]),
        }
        start = i + 1;
    }
    if let Some(run) = bytes.get(start..) {
        out.put_slice(run);
    }
    out.put_u8(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esc(s: &str) -> String {
        let mut v = Vec::new();
        write_escaped_str(&mut v, s);
        assert_eq!(v.len(), escaped_len(s), "escaped_len disagrees for {s:?}");
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn escapes_specials_and_controls() {
        assert_eq!(esc(""), r#""""#);
        assert_eq!(esc("plain"), r#""plain""#);
        assert_eq!(esc("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(esc("l1\nl2\r\t"), r#""l1\nl2\r\t""#);
        assert_eq!(esc("\u{0}\u{1f}\u{8}\u{c}"), r#""\u0000\u001f\b\f""#);
        assert_eq!(esc("é ✓ 🎉"), "\"é ✓ 🎉\"");
    }

    #[test]
    fn output_parses_back_with_serde_json() {
        let samples = [
            "x",
            "quote\" back\\slash",
            "\u{7f}\u{0}\u{1}\u{2}",
            "mixed\tüñí\u{2028}",
        ];
        for s in samples {
            let json = esc(s);
            let back: String = serde_json::from_str(&json).unwrap();
            assert_eq!(back, s);
        }
    }
}
