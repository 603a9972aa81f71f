//! Timestamped payloads shared by `pubsub-bench` and the peer harness (`benches/peers`
//! includes this file with `#[path]`), so every system carries byte-identical messages.
//!
//! A payload is the JSON object `{"t":<ns since the process epoch>,"s":<seq>,"p":"xx…"}`
//! padded with `x` to exactly the requested size. The receiver finds `t` and `s` with a
//! byte scan (no JSON parse) and computes publish→delivery latency against the same epoch,
//! since publisher and subscriber live in one process.

use std::sync::{LazyLock, OnceLock};
use std::time::Instant;

use memchr::memmem::Finder;

/// Smallest payload that still holds the two numbers and the padding key.
pub const MIN_PAYLOAD: usize = 48;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the process-wide epoch (first call fixes the epoch).
pub fn now_ns() -> u64 {
    let epoch = EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Appends one payload of exactly `size` bytes (at least [`MIN_PAYLOAD`]) to `out`.
pub fn write_payload(out: &mut Vec<u8>, t_ns: u64, seq: u64, size: usize) {
    let start = out.len();
    out.extend_from_slice(b"{\"t\":");
    push_u64(out, t_ns);
    out.extend_from_slice(b",\"s\":");
    push_u64(out, seq);
    out.extend_from_slice(b",\"p\":\"");
    let used = out.len() - start + 2;
    let pad = size.max(MIN_PAYLOAD).saturating_sub(used);
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
}

/// Appends the decimal form of `v`.
pub fn push_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// Parses the unsigned integer after optional `:`/spaces at `at`; returns it and the
/// offset just past it (pubsub-bench's manual-ack subscriber reads tags with it).
pub fn num_at(hay: &[u8], at: usize) -> Option<(u64, usize)> {
    let rest = hay.get(at..)?;
    let mut i = 0;
    while let Some(&b) = rest.get(i) {
        if b == b':' || b == b' ' {
            i += 1;
        } else {
            break;
        }
    }
    let mut v: u64 = 0;
    let mut any = false;
    while let Some(&b) = rest.get(i) {
        if !b.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        any = true;
        i += 1;
    }
    any.then_some((v, at + i))
}

/// Extracts `(t, s)` from a payload (or from any frame embedding one). The payload
/// starts `{"t":<t>,"s":<s>` (see [`write_payload`]) and every system delivers it byte
/// for byte, so one search for its opening finds both numbers.
pub fn stamp_of(hay: &[u8]) -> Option<(u64, u64)> {
    const S_KEY: &[u8] = b",\"s\":";
    static OPEN: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"{\"t\":"));
    let (t, end) = num_at(hay, OPEN.find(hay)? + OPEN.needle().len())?;
    let rest = hay.get(end..)?.strip_prefix(S_KEY)?;
    let (s, _) = num_at(rest, 0)?;
    Some((t, s))
}

/// Position of the first occurrence of `needle` in `hay` (SIMD substring search), for
/// one-off searches. Per-message searches use prebuilt [`Finder`]s or [`find_crlf`]
/// instead: building a searcher costs more than searching a frame, and the clients
/// share the cores with the servers they measure.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

/// Position of the first `\r\n` in `hay` (the peers harness parses NATS lines with it).
#[allow(dead_code)]
pub fn find_crlf(hay: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\r', hay).find(|&i| hay.get(i + 1) == Some(&b'\n'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_has_exact_size_and_round_trips() {
        let mut out = Vec::new();
        write_payload(&mut out, 123_456_789, 42, 128);
        assert_eq!(out.len(), 128);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["t"], 123_456_789);
        assert_eq!(stamp_of(&out), Some((123_456_789, 42)));
    }

    #[test]
    fn searches_find_what_they_look_for() {
        assert_eq!(find_crlf(b"MSG a 1 5\r\nhello\r\n"), Some(9));
        assert_eq!(find_crlf(b"a\rb\r\n"), Some(3));
        assert_eq!(find_crlf(b"no end\r"), None);
        assert_eq!(num_at(br#"{"delivery_tag":17,"x":1}"#, 15), Some((17, 18)));
        assert_eq!(num_at(br#"{"delivery_tag": 9}"#, 15), Some((9, 18)));
        assert_eq!(num_at(br#"{"x":1}"#, 1), None);
    }
}
