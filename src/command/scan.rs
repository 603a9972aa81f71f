//! The fast path for the one frame that carries the load: a plain `PUBLISH`.
//!
//! `serde_json` decodes every frame correctly, but on a publish-heavy connection its
//! generic walk (key strings, field visitors, a second pass over the payload as a raw
//! value) is over half of what the publishing shard spends per message. This scanner
//! recognises the shape clients actually send, in one pass over the bytes:
//!
//! ```text
//! {"type":"PUBLISH","payload":{"exchange_name":"x","key":"k","payload":<any JSON>, …}}
//! ```
//!
//! with `type` first, fields in any order, whitespace anywhere JSON allows it, and only
//! the contract's fields: `exchange_name`, `key` (or the seed's `Key`), `payload`,
//! `confirm`, `persistent`, `ttl_ms`, `headers` and `ref`.
//!
//! It answers `None` whenever it is not sure: an escape in a name, key or field name,
//! a `\u` escape anywhere, another field, a repeated field, a `null`, a wrong type
//! (`ttl_ms` other than a plain integer that fits in 64 bits, `headers` other than an
//! object of strings), nesting deeper than [`MAX_DEPTH`], a name the contract refuses
//! or a payload over the limit. The caller then runs `serde_json`,
//! which either accepts the frame (and builds the same [`Publish`]) or produces the
//! contract's error with its usual wording. So the scanner only has to be right about
//! what it accepts: valid JSON that `serde_json` would decode to the same command. The
//! tests hold it to exactly that, against `serde_json`, on generated, truncated and
//! mutated frames.
//!
//! Like the other codecs it does no I/O and allocates nothing; the [`Publish`] it
//! returns holds slices of the frame.

use std::ops::Range;

use bytes::Bytes;
use tungstenite::protocol::frame::Utf8Bytes;

use super::{validate_ref_name, Publish};
use crate::message::MessageText;

/// Deepest nesting of arrays and objects inside a payload the scanner follows; deeper
/// payloads go to `serde_json` (whose own limit is 128).
pub const MAX_DEPTH: usize = 64;

/// Decodes a whole WebSocket text frame `{"type":"PUBLISH","payload":{…}}`, taking
/// it: the frame's buffer becomes the message's text without another reference to
/// it. Gives the frame back when `serde_json` must decide.
pub fn publish_frame(frame: Utf8Bytes, max_payload: usize) -> Result<Publish, Utf8Bytes> {
    match frame_fields(frame.as_bytes(), max_payload) {
        Some(fields) => Ok(fields.into_publish(Bytes::from(frame))),
        None => Err(frame),
    }
}

/// The opening of a publish frame written without whitespace.
const COMPACT_OPENING: &[u8] = br#"{"type":"PUBLISH","payload":"#;

/// The fields of a publish frame, checked; `None` when `serde_json` must decide.
fn frame_fields(frame: &[u8], max_payload: usize) -> Option<Checked> {
    const OPENING: [&[u8]; 7] = [
        b"{",
        b"\"type\"",
        b":",
        b"\"PUBLISH\"",
        b",",
        b"\"payload\"",
        b":",
    ];
    let mut c = Cursor::new(frame);
    // What every client library sends: the compact opening, compared at once.
    if c.expect(COMPACT_OPENING).is_none() {
        for token in OPENING {
            c.ws();
            c.expect(token)?;
        }
    }
    c.ws();
    let fields = c.body()?;
    c.ws();
    c.eat(b'}')?;
    c.ws();
    c.at_end()?;
    fields.check(frame, max_payload)
}

/// Decodes the body of `POST /publish` (the object inside a frame's `payload`), or
/// `None` when `serde_json` must decide. The body is checked to be UTF-8 first, as the
/// WebSocket codec checks a frame; one that is not goes to `serde_json`, which refuses
/// it in its own words.
pub fn publish_body(body: &Bytes, max_payload: usize) -> Option<Publish> {
    std::str::from_utf8(body).ok()?;
    let mut c = Cursor::new(body);
    c.ws();
    let fields = c.body()?;
    c.ws();
    c.at_end()?;
    Some(fields.check(body, max_payload)?.into_publish(body.clone()))
}

/// Where a publish's fields sit in the input (string ranges include their quotes).
#[derive(Default)]
struct Fields {
    exchange: Option<Range<usize>>,
    key: Option<Range<usize>>,
    /// The seed's spelling, `Key`: used when `key` is absent.
    key_seed: Option<Range<usize>>,
    payload: Option<Range<usize>>,
    confirm: Option<bool>,
    persistent: Option<bool>,
    ttl_ms: Option<u64>,
    /// The `headers` object, braces included.
    headers: Option<Range<usize>>,
    reference: Option<Range<usize>>,
}

impl Fields {
    /// Checks what the grammar alone cannot (a payload, an exchange name, sizes and
    /// names that `serde_json`'s path would refuse) and pins down every range.
    fn check(self, input: &[u8], max_payload: usize) -> Option<Checked> {
        let exchange = self.exchange?;
        let payload = self.payload?;
        if payload.len() > max_payload {
            return None;
        }
        let exchange_json = input.get(exchange.clone())?;
        let name = exchange_json.get(1..exchange_json.len() - 1)?;
        // Printable ASCII, the usual name, is valid as it stands; others get the full
        // check (the frame is UTF-8 and the quotes are ASCII, so `name` is too).
        let printable = name.iter().all(|b| (0x20..0x7f).contains(b));
        if !printable || name.is_empty() || name.len() > super::MAX_NAME_BYTES {
            validate_ref_name(std::str::from_utf8(name).ok()?, "exchange").ok()?;
        }
        // A string token includes both quotes, so it is at least 2 bytes long. An
        // empty key is `0..0`, as `MessageText::new` places every empty piece.
        let (key_json, key) = match self.key.or(self.key_seed) {
            Some(token) if token.len() > 2 => (token.clone(), token.start + 1..token.end - 1),
            Some(token) => (token, 0..0),
            None => (0..0, 0..0),
        };
        input.get(key_json.clone())?;
        input.get(payload.clone())?;
        if let Some(r) = &self.reference {
            input.get(r.clone())?;
        }
        if let Some(h) = &self.headers {
            input.get(h.clone())?;
        }
        Some(Checked {
            exchange,
            key_json,
            key,
            payload,
            confirm: self.confirm.unwrap_or(false),
            persistent: self.persistent.unwrap_or(true),
            ttl_ms: self.ttl_ms,
            headers: self.headers,
            reference: self.reference,
        })
    }
}

/// A publish's fields once [`Fields::check`] passed: ranges inside the input.
struct Checked {
    exchange: Range<usize>,
    key_json: Range<usize>,
    key: Range<usize>,
    payload: Range<usize>,
    confirm: bool,
    persistent: bool,
    ttl_ms: Option<u64>,
    headers: Option<Range<usize>>,
    reference: Option<Range<usize>>,
}

impl Checked {
    /// The publish, owning `input` (the bytes the ranges were found in).
    fn into_publish(self, input: Bytes) -> Publish {
        Publish {
            reference: self.reference.map(|r| input.slice(r)),
            headers: self.headers.map(|r| input.slice(r)),
            text: MessageText::from_ranges(
                input,
                self.exchange,
                self.key_json,
                self.key,
                self.payload,
            ),
            confirm: self.confirm,
            persistent: self.persistent,
            ttl_ms: self.ttl_ms,
        }
    }
}

/// A position in the input; every method either consumes what it names and answers
/// `Some`, or answers `None` (and the whole scan gives up).
struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn new(b: &'a [u8]) -> Self {
        Cursor { b, i: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    /// Skips JSON whitespace.
    fn ws(&mut self) {
        // Whitespace is all at or under b' ', so one compare passes the usual token.
        while let Some(&b) = self.b.get(self.i) {
            if b > b' ' || !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
                break;
            }
            self.i += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.i += 1)
    }

    fn expect(&mut self, lit: &[u8]) -> Option<()> {
        let end = self.i.checked_add(lit.len())?;
        (self.b.get(self.i..end)? == lit).then(|| self.i = end)
    }

    fn at_end(&self) -> Option<()> {
        (self.i == self.b.len()).then_some(())
    }

    /// The publish object: `{` fields `}`.
    fn body(&mut self) -> Option<Fields> {
        let mut f = Fields::default();
        self.eat(b'{')?;
        self.ws();
        if self.eat(b'}').is_some() {
            return Some(f);
        }
        loop {
            let name = self.plain_string()?;
            self.ws();
            self.eat(b':')?;
            self.ws();
            let at = self.i;
            match self.b.get(name.start + 1..name.end - 1)? {
                b"exchange_name" if f.exchange.is_none() => f.exchange = Some(self.plain_string()?),
                b"key" if f.key.is_none() => f.key = Some(self.plain_string()?),
                b"Key" if f.key_seed.is_none() => f.key_seed = Some(self.plain_string()?),
                // `null` reads as an absent payload (an error), so serde_json words it.
                b"payload" if f.payload.is_none() && self.peek()? != b'n' => {
                    self.value(0)?;
                    f.payload = Some(at..self.i);
                }
                b"confirm" if f.confirm.is_none() => f.confirm = Some(self.boolean()?),
                b"persistent" if f.persistent.is_none() => f.persistent = Some(self.boolean()?),
                b"ttl_ms" if f.ttl_ms.is_none() => f.ttl_ms = Some(self.unsigned()?),
                b"headers" if f.headers.is_none() && self.peek()? == b'{' => {
                    // An object of strings; its keys may repeat, as serde_json's
                    // map keeps the last.
                    self.object(Self::string)?;
                    f.headers = Some(at..self.i);
                }
                b"ref" if f.reference.is_none() => f.reference = Some(self.plain_string()?),
                _ => return None,
            }
            if !self.more(b'}')? {
                return Some(f);
            }
        }
    }

    /// After a member of an object or array: `,` (true: another member follows) or
    /// `close` (false: the container ended), with the whitespace around them.
    fn more(&mut self, close: u8) -> Option<bool> {
        self.ws();
        match self.peek()? {
            b',' => {
                self.i += 1;
                self.ws();
                Some(true)
            }
            b if b == close => {
                self.i += 1;
                Some(false)
            }
            _ => None,
        }
    }

    fn boolean(&mut self) -> Option<bool> {
        match self.peek()? {
            b't' => self.expect(b"true").map(|()| true),
            b'f' => self.expect(b"false").map(|()| false),
            _ => None,
        }
    }

    /// A number that `serde_json` reads as a `u64`: digits only (no sign, fraction or
    /// exponent), at most `u64::MAX`.
    fn unsigned(&mut self) -> Option<u64> {
        let start = self.i;
        self.number()?;
        // The token is a JSON number (ASCII); `u64`'s own parser refuses a sign, a
        // fraction, an exponent and overflow, as serde_json's `u64` does.
        std::str::from_utf8(self.b.get(start..self.i)?)
            .ok()?
            .parse()
            .ok()
    }

    /// An object, `{` then `"key": value` members `}`, checked and skipped; `value`
    /// reads each member's value.
    fn object(&mut self, mut value: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        self.ws();
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            self.string()?;
            self.ws();
            self.eat(b':')?;
            self.ws();
            value(self)?;
            if !self.more(b'}')? {
                return Some(());
            }
        }
    }

    /// A string token with no escapes; its range, quotes included.
    fn plain_string(&mut self) -> Option<Range<usize>> {
        let start = self.i;
        self.eat(b'"')?;
        let rest = self.b.get(self.i..)?;
        let len = run_end(rest)?;
        if rest.get(len) != Some(&b'"') {
            return None;
        }
        self.i += len + 1;
        Some(start..self.i)
    }

    /// A string token whose escapes are the one-character kind (`\"`, `\\`, `\/`,
    /// `\b`, `\f`, `\n`, `\r`, `\t`); `\u` escapes are left to `serde_json`.
    fn string(&mut self) -> Option<()> {
        self.eat(b'"')?;
        loop {
            let rest = self.b.get(self.i..)?;
            let len = run_end(rest)?;
            match rest.get(len)? {
                b'"' => {
                    self.i += len + 1;
                    return Some(());
                }
                b'\\' => self.i += len + 1,
                _ => return None,
            }
            match self.peek()? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 1,
                _ => return None,
            }
        }
    }

    /// Any JSON value, checked against the grammar and skipped.
    fn value(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'"' => self.string(),
            b'{' => {
                let depth = deeper(depth)?;
                self.object(|c| c.value(depth))
            }
            b'[' => {
                let depth = deeper(depth)?;
                self.i += 1;
                self.ws();
                if self.eat(b']').is_some() {
                    return Some(());
                }
                loop {
                    self.value(depth)?;
                    if !self.more(b']')? {
                        return Some(());
                    }
                }
            }
            b't' => self.expect(b"true"),
            b'f' => self.expect(b"false"),
            b'n' => self.expect(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        // `01`, `1.5.2` and the like: a number may not run into more of one.
        match self.peek() {
            Some(b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') => None,
            _ => Some(()),
        }
    }

    /// Skips ASCII digits; how many.
    fn digits(&mut self) -> usize {
        let n = digit_run(self.b.get(self.i..).unwrap_or_default());
        self.i += n;
        n
    }
}

fn deeper(depth: usize) -> Option<usize> {
    (depth < MAX_DEPTH).then_some(depth + 1)
}

/// Where the plain run of a string's bytes ends: the first `"`, `\` or control
/// character (which JSON strings may not hold raw) in `s`.
///
/// Sixteen bytes at a time with SSE2 (every x86_64 has it) while sixteen are left,
/// then eight at a time in a `u64` ([`special`]), then byte by byte. One 16-byte
/// compare settles most strings of a publish (field names, keys, the payload's own
/// keys) and walks long ones at a few instructions per 16 bytes, with no call to set
/// up a vector search.
fn run_end(s: &[u8]) -> Option<usize> {
    let mut at = 0;
    #[cfg(target_arch = "x86_64")]
    while let Some(chunk) = s.get(at..).and_then(<[u8]>::first_chunk::<16>) {
        let found = special16(chunk);
        if found != 0 {
            return Some(at + found.trailing_zeros() as usize);
        }
        at += 16;
    }
    while let Some(word) = s.get(at..).and_then(<[u8]>::first_chunk::<8>) {
        let found = special(u64::from_le_bytes(*word));
        if found != 0 {
            return Some(at + (found.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    let rest = s.get(at..)?;
    rest.iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|p| at + p)
}

/// For sixteen bytes: bit *k* is set exactly when byte *k* is `"`, `\` or under 0x20.
#[cfg(target_arch = "x86_64")]
fn special16(chunk: &[u8; 16]) -> u32 {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
        _mm_setzero_si128, _mm_subs_epu8,
    };
    // SAFETY: SSE2 is part of the x86_64 baseline (every x86_64 CPU has it and rustc's
    // x86_64 targets enable it), so its intrinsics may run here; `chunk` is 16 readable
    // bytes, exactly what the unaligned load `_mm_loadu_si128` reads.
    let mask = unsafe {
        let v = _mm_loadu_si128(chunk.as_ptr().cast());
        let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
        let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
        // Unsigned saturating `b - 0x1f` is zero exactly for the bytes 0x00..=0x1f.
        let control = _mm_cmpeq_epi8(_mm_subs_epu8(v, _mm_set1_epi8(0x1f)), _mm_setzero_si128());
        _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, backslash), control))
    };
    // Only the low 16 bits can be set: one per byte.
    mask as u32
}

/// For eight bytes read little-endian: the high bit of each byte that is `"`, `\` or
/// under 0x20 is set, exactly so for the lowest such byte (bytes above it may be
/// flagged falsely by a borrow, which `trailing_zeros` never looks at). Each term is
/// the "has a zero byte" test: a borrow out of byte *k* starts only at a byte that
/// matches, and `!w` keeps bytes of 0x80 and up out of the "under 0x20" term.
fn special(w: u64) -> u64 {
    let quote = w ^ (ONES * b'"' as u64);
    let backslash = w ^ (ONES * b'\\' as u64);
    let zero_in = |x: u64| x.wrapping_sub(ONES) & !x;
    let control = w.wrapping_sub(ONES * 0x20) & !w;
    (zero_in(quote) | zero_in(backslash) | control) & HIGH
}

/// How many ASCII digits `s` starts with: eight bytes at a time ([`non_digits`]),
/// then byte by byte.
fn digit_run(s: &[u8]) -> usize {
    let mut at = 0;
    while let Some(word) = s.get(at..).and_then(<[u8]>::first_chunk::<8>) {
        let found = non_digits(u64::from_le_bytes(*word));
        if found != 0 {
            return at + (found.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    at + s
        .get(at..)
        .unwrap_or_default()
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count()
}

/// For eight bytes read little-endian: the high bit of each byte that is not an
/// ASCII digit is set, exactly (no carries cross bytes). With `x = b ^ b'0'`, digits
/// are `x <= 9`; `(x & 0x7f) + 0x76` reaches 0x80 exactly when `x & 0x7f > 9` and
/// never passes 0xff, and `| x` flags the bytes of 0x80 and up.
fn non_digits(w: u64) -> u64 {
    let x = w ^ (ONES * b'0' as u64);
    (((x & !HIGH) + ONES * 0x76) | x) & HIGH
}

/// `0x01` in every byte of a `u64`.
const ONES: u64 = 0x0101_0101_0101_0101;
/// `0x80` in every byte of a `u64`.
const HIGH: u64 = 0x8080_8080_8080_8080;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{decode_frame_json, decode_publish_json, Command};
    use tungstenite::protocol::frame::Utf8Bytes;

    const LIMIT: usize = 1 << 20;

    /// The scanner must never accept what `serde_json` refuses, and what it accepts
    /// must decode to the very same `Publish`. Returns whether it accepted.
    fn check_frame(text: &str) -> bool {
        let frame = Utf8Bytes::from(text.to_owned());
        let Ok(fast) = publish_frame(frame.clone(), LIMIT) else {
            return false;
        };
        match decode_frame_json(&frame, LIMIT) {
            Ok(Command::Publish(slow)) => assert_eq!(fast, slow, "frame {text:?}"),
            other => panic!("scanner accepted {text:?}, serde_json gave {other:?}"),
        }
        true
    }

    fn check_body(body: &[u8]) -> bool {
        let body = Bytes::copy_from_slice(body);
        let Some(fast) = publish_body(&body, LIMIT) else {
            return false;
        };
        match decode_publish_json(&body, LIMIT) {
            Ok(slow) => assert_eq!(fast, slow, "body {body:?}"),
            Err(e) => panic!("scanner accepted {body:?}, serde_json gave {e:?}"),
        }
        true
    }

    #[test]
    fn accepts_what_clients_send() {
        let cases = [
            r#"{"type":"PUBLISH","payload":{"exchange_name":"bench.x","key":"k","payload":{"t":123456789012,"s":4242,"p":"xxxx"}}}"#,
            " {\n\t\"type\" : \"PUBLISH\" ,\r\n \"payload\" : { \"payload\" : [ 1 , -0.5e+10 , true , false , null , \"a\\\"b\\\\c\\/d\\n\" , { } , [ ] ] , \"exchange_name\" : \"x\" } } ",
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":"hi","confirm":true,"persistent":false,"ref":"r-1"}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","key":"","payload":0}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"ünï","key":"ключ","payload":"日本"}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","key":"a.b","payload":-0}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":1E5}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","key":"k","payload":1,"ttl_ms":60000,"headers":{"trace":"a1","n":"\n"}}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","Key":"k","payload":1,"headers":{ },"ttl_ms":0}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","Key":"a","key":"b","payload":1,"ttl_ms":18446744073709551615}}"#,
        ];
        for c in cases {
            assert!(check_frame(c), "not taken by the fast path: {c}");
        }
        let p = publish_frame(Utf8Bytes::from(cases[2]), LIMIT).unwrap();
        assert!(p.confirm && !p.persistent);
        assert_eq!(p.reference.as_deref(), Some(&b"\"r-1\""[..]));
        assert_eq!(p.text.exchange(), "x");
        assert_eq!(p.text.routing_key_json(), b"\"\"");
        let p = publish_frame(Utf8Bytes::from(cases[7]), LIMIT).unwrap();
        assert_eq!(p.ttl_ms, Some(60_000));
        assert_eq!(
            p.headers.as_deref(),
            Some(&br#"{"trace":"a1","n":"\n"}"#[..])
        );
        // The seed's `Key` is the key when `key` is absent, and yields to it otherwise.
        let key = |i: usize| {
            let p = publish_frame(Utf8Bytes::from(cases[i]), LIMIT).unwrap();
            p.text.routing_key_str().to_owned()
        };
        assert_eq!((key(8), key(9)), ("k".to_owned(), "b".to_owned()));
    }

    #[test]
    fn a_publish_without_a_key_shares_its_frame() {
        // Both paths: the fast one, and serde_json's (an unknown field sends it there).
        for text in [
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":[1]}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":[1],"extra":{}}}"#,
        ] {
            let frame = Utf8Bytes::from(text.to_owned());
            let base = frame.as_bytes().as_ptr() as usize;
            let len = frame.len();
            let Ok(Command::Publish(p)) = crate::command::decode_frame(frame, LIMIT) else {
                panic!("{text} did not decode");
            };
            assert_eq!(p.text.routing_key_json(), b"\"\"");
            let at = p.text.body().as_ptr() as usize;
            assert!(at > base && at < base + len, "body copied for {text}");
        }
    }

    #[test]
    fn leaves_the_rest_to_serde_json() {
        let cases = [
            // Valid frames the scanner does not take.
            r#"{"payload":{"exchange_name":"x","payload":1},"type":"PUBLISH"}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":1,"headers":null}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":1,"ttl_ms":null}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":1,"ttl_ms":-0}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":1,"headers":{"\u0041":"b"}}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","Key":null,"payload":1}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","key":"a\u002eb","payload":1}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x\n","payload":1}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":"\u00e9"}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","key":null,"payload":1}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":1,"extra":2}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":1},"id":7}"#,
            // Frames serde_json refuses, each with its own error.
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":1,"payload":2}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x"}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"","payload":1}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"amq.x","payload":1,}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":01}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":1.}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":"a	b"}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":1}} x"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":1}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":1,"confirm":"yes"}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":1,"ttl_ms":5.0}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":1,"ttl_ms":-1}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":1,"ttl_ms":1e3}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":1,"ttl_ms":18446744073709551616}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":1,"ttl_ms":"5"}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":1,"headers":{"a":1}}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":1,"headers":["a"]}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":1,"headers":{"a":"b",}}}"#,
            r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":1,"ttl_ms":1,"ttl_ms":2}}"#,
        ];
        for c in cases {
            assert!(!check_frame(c), "taken by the fast path: {c}");
        }
        let deep = format!(
            r#"{{"type":"PUBLISH","payload":{{"exchange_name":"x","payload":{}1{}}}}}"#,
            "[".repeat(MAX_DEPTH + 1),
            "]".repeat(MAX_DEPTH + 1)
        );
        assert!(!check_frame(&deep));
        let big = r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":"0123456789"}}"#;
        assert!(publish_frame(Utf8Bytes::from(big), 5).is_err());
    }

    #[test]
    fn http_bodies() {
        assert!(check_body(
            br#"{"exchange_name":"x","key":"k","payload":{"a":[1,2]}}"#
        ));
        assert!(check_body(
            b" {\"payload\":\"p\",\"exchange_name\":\"x\",\"confirm\":false} "
        ));
        // UTF-8 beyond ASCII, as frames carry it.
        assert!(check_body(
            "{\"exchange_name\":\"ünï\",\"key\":\"ключ\",\"payload\":\"日本\"}".as_bytes()
        ));
        // Not UTF-8: serde_json decides (and refuses it).
        assert!(!check_body(
            b"{\"exchange_name\":\"x\",\"payload\":\"\xff\"}"
        ));
        assert!(decode_publish_json(
            &Bytes::from_static(b"{\"exchange_name\":\"x\",\"payload\":\"\xff\"}"),
            LIMIT
        )
        .is_err());
    }

    /// xorshift64*: a fixed-seed generator, so a failure replays.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[self.below(items.len())]
        }
    }

    fn ws(r: &mut Rng) -> &'static str {
        ["", "", "", " ", "\n", "\t ", "\r\n"][r.below(7)]
    }

    fn value(r: &mut Rng, depth: usize, out: &mut String) {
        let leaf = depth > 3 || r.below(3) == 0;
        if leaf {
            let good = [
                "0",
                "-0",
                "1",
                "-12",
                "3.25",
                "1e9",
                "1E+2",
                "-4.5e-3",
                "true",
                "false",
                "null",
                "\"\"",
                "\"plain\"",
                "\"a\\\"b\"",
                "\"t\\\\\\/\\b\\f\\n\\r\\t\"",
                "\"é\"",
            ];
            let odd = [
                "\"\\u0041\"",
                "01",
                "1.",
                "-",
                ".5",
                "1e",
                "tru",
                "nul",
                "\"\x01\"",
                "\"a",
            ];
            let atom = if r.below(12) == 0 {
                r.pick(&odd)
            } else {
                r.pick(&good)
            };
            out.push_str(atom);
            return;
        }
        let (open, close) = if r.below(2) == 0 {
            ('[', ']')
        } else {
            ('{', '}')
        };
        out.push(open);
        out.push_str(ws(r));
        let n = r.below(4);
        for i in 0..n {
            if i > 0 {
                out.push_str(ws(r));
                out.push(',');
                out.push_str(ws(r));
            }
            if open == '{' {
                out.push_str(r.pick(&["\"k\"", "\"t\"", "\"\"", "\"k\\n\""]));
                out.push_str(ws(r));
                out.push(':');
                out.push_str(ws(r));
            }
            value(r, depth + 1, out);
        }
        out.push_str(ws(r));
        out.push(close);
    }

    fn body(r: &mut Rng) -> String {
        let mut fields: Vec<String> = Vec::new();
        let mut field = |r: &mut Rng, name: &str, v: &str| {
            fields.push(format!("{}\"{name}\"{}:{}{v}", ws(r), ws(r), ws(r)))
        };
        let mut payload = String::new();
        value(r, 0, &mut payload);
        if r.below(8) != 0 {
            field(r, "payload", &payload);
        }
        if r.below(8) != 0 {
            let name = r.pick(&["\"x\"", "\"a.b\"", "\"ü\"", "\"amq.x\"", "\"\"", "1"]);
            field(r, "exchange_name", name);
        }
        // The optional fields: each present once in `odds`, with a value picked from
        // good ones and ones serde_json refuses or the scanner leaves to it.
        let booleans: &[&str] = &["true", "false", "true", "false", "1", "null"];
        let optional: [(&str, usize, &[&str]); 7] = [
            (
                "key",
                2,
                &["\"k\"", "\"a.b.c\"", "\"\"", "null", "\"\\u0041\"", "7"],
            ),
            ("confirm", 3, booleans),
            ("persistent", 3, booleans),
            ("ref", 3, &["\"r1\"", "\"\"", "1", "null"]),
            (
                "ttl_ms",
                4,
                &[
                    "5",
                    "0",
                    "60000",
                    "18446744073709551615",
                    "18446744073709551616",
                    "99999999999999999999",
                    "-1",
                    "-0",
                    "5.0",
                    "1e3",
                    "null",
                    "\"5\"",
                ],
            ),
            (
                "headers",
                4,
                &[
                    "{}",
                    "{ }",
                    "{\"a\":\"b\"}",
                    "{ \"a\" : \"b\" , \"c\":\"\\n\\/\" }",
                    "{\"a\":\"b\",\"a\":\"c\"}",
                    "{\"\":\"\"}",
                    "{\"a\":1}",
                    "{\"a\":null}",
                    "{\"a\":\"\\u0041\"}",
                    "{\"a\":\"b\",}",
                    "[]",
                    "null",
                    "\"h\"",
                ],
            ),
            ("Key", 5, &["\"k\"", "\"\"", "null", "7"]),
        ];
        for (name, odds, values) in optional {
            if r.below(odds) == 0 {
                let v = r.pick(values);
                field(r, name, v);
            }
        }
        // Now and then a field the scanner leaves to serde_json, or a repeat.
        if r.below(6) == 0 {
            let (name, v) = [
                ("ttl_ms", "5"),
                ("headers", "{}"),
                ("other", "[1,{}]"),
                ("payload", "2"),
                ("exchange_name", "\"y\""),
            ][r.below(5)];
            field(r, name, v);
        }
        let n = fields.len();
        if n > 1 {
            fields.swap(r.below(n), n - 1);
        }
        format!("{{{}}}", fields.join(","))
    }

    fn mutate(r: &mut Rng, s: &mut Vec<u8>) {
        const ALPHABET: &[u8] = b"{}[]\":,\\ \t\n-+.eE019tfnulx/\x01\x7f";
        if s.is_empty() {
            return;
        }
        let at = r.below(s.len());
        match r.below(4) {
            0 => s.truncate(at),
            1 => s[at] = ALPHABET[r.below(ALPHABET.len())],
            2 => s.insert(at, ALPHABET[r.below(ALPHABET.len())]),
            _ => {
                s.remove(at);
            }
        }
    }

    #[test]
    fn agrees_with_serde_json_on_generated_and_mutated_frames() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut taken, mut total, mut mutants_taken) = (0, 0, 0);
        for round in 0..20_000 {
            let body = body(&mut r);
            let frame = format!(
                "{}{{{}\"type\"{}:{}\"PUBLISH\"{},{}\"payload\"{}:{}{body}{}}}{}",
                ws(&mut r),
                ws(&mut r),
                ws(&mut r),
                ws(&mut r),
                ws(&mut r),
                ws(&mut r),
                ws(&mut r),
                ws(&mut r),
                ws(&mut r),
                ws(&mut r)
            );
            total += 2;
            taken += usize::from(check_frame(&frame));
            taken += usize::from(check_body(body.as_bytes()));
            // Mutations stay ASCII (the alphabet is), so frames stay UTF-8.
            let mut bytes = frame.into_bytes();
            let mut raw = body.into_bytes();
            for _ in 0..1 + round % 3 {
                mutate(&mut r, &mut bytes);
                mutate(&mut r, &mut raw);
            }
            if let Ok(text) = String::from_utf8(bytes) {
                mutants_taken += usize::from(check_frame(&text));
            }
            mutants_taken += usize::from(check_body(&raw));
        }
        // The comparison is only worth something if the scanner took a fair share.
        assert!(taken * 10 > total, "fast path took {taken} of {total}");
        assert!(
            mutants_taken > 100,
            "fast path took {mutants_taken} mutants"
        );
    }

    #[test]
    fn run_end_finds_the_first_special_byte_like_a_byte_loop() {
        // What callers act on: where the run ends at a quote or backslash. A control
        // character first, or no end at all, makes them give up alike.
        let ends = |s: &[u8], r: Option<usize>| r.filter(|&p| matches!(s[p], b'"' | b'\\'));
        let naive = |s: &[u8]| {
            let r = s.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20);
            ends(s, r)
        };
        // Every length to 40, one or two special bytes anywhere, over plain ASCII and
        // over bytes of 0x80 and up (never special themselves), with every byte value
        // as the first special candidate.
        for len in 0..40 {
            for fill in [b'a', 0x80, 0xff, b'!', b'#', b'[', b']', 0x20, 0x7f] {
                let plain = vec![fill; len];
                assert_eq!(
                    ends(&plain, run_end(&plain)),
                    naive(&plain),
                    "{len} x {fill:#x}"
                );
                for at in 0..len {
                    for b in 0..=255u8 {
                        let mut s = plain.clone();
                        s[at] = b;
                        let got = ends(&s, run_end(&s));
                        assert_eq!(got, naive(&s), "{len} x {fill:#x}, {b:#x} at {at}");
                        if at + 1 < len {
                            s[at + 1] = b'"';
                            assert_eq!(ends(&s, run_end(&s)), naive(&s), "then a quote");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn digit_run_counts_leading_digits_like_a_byte_loop() {
        let naive = |s: &[u8]| s.iter().take_while(|b| b.is_ascii_digit()).count();
        // Every length to 20 (two words and a tail), every byte value at every place
        // after a run of digits, and a digit or not after it.
        for len in 0..20 {
            let digits: Vec<u8> = (0..len).map(|i| b'0' + (i % 10) as u8).collect();
            assert_eq!(digit_run(&digits), len, "{len} digits");
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut s = digits.clone();
                    s[at] = b;
                    assert_eq!(digit_run(&s), naive(&s), "{len} digits, {b:#x} at {at}");
                }
            }
        }
    }

    #[test]
    fn every_truncation_and_byte_flip_of_a_frame() {
        let frame = r#"{"type":"PUBLISH","payload":{"exchange_name":"x.y","key":"k","payload":{"t":1,"s":[2.5e3,-0,true,null],"p":"a\"\\b"},"confirm":false,"ref":"r"}}"#;
        assert!(check_frame(frame));
        for cut in 0..frame.len() {
            if let Some(prefix) = frame.get(..cut) {
                assert!(!check_frame(prefix), "prefix of {cut} bytes taken");
            }
        }
        for at in 0..frame.len() {
            for b in b"{}[]\":,\\ -+.eE09tx\x01".iter() {
                let mut bytes = frame.as_bytes().to_vec();
                bytes[at] = *b;
                if let Ok(text) = String::from_utf8(bytes) {
                    check_frame(&text);
                }
            }
        }
    }
}
