//! A published message and its identity.
//!
//! A [`Message`] is built once, on the shard whose connection received the publish,
//! and shared by `Arc` with every queue it is routed to. Its text (exchange, routing
//! key, body) is a [`MessageText`]: ranges of the very buffer the request was read
//! into, held by one reference. Nothing is copied or re-encoded on the way to the
//! subscribers' sockets.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};

/// Length of a message id: 32 lower-case hex digits.
pub const ID_LEN: usize = 32;

/// A message's `unique_id`: 128 bits as hex, unique per process start and shard.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageId([u8; ID_LEN]);

impl MessageId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written into the array (see `IdGen::next`).
        std::str::from_utf8(&self.0).unwrap_or("")
    }
    /// The id's bytes (ASCII hex).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// Rebuilds an id read back from the store; `None` unless it is 32 hex digits.
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() != ID_LEN || !b.iter().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; ID_LEN];
        out.copy_from_slice(b);
        Some(Self(out))
    }
}

impl std::fmt::Debug for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Makes ids on one shard: a per-process random prefix, the shard, and a counter.
pub struct IdGen {
    /// The prefix's 16 hex digits, written once.
    prefix: [u8; ID_LEN / 2],
    counter: u64,
}

static BOOT_SALT: AtomicU64 = AtomicU64::new(0);

impl IdGen {
    /// A generator for `shard`.
    pub fn new(shard: usize) -> Self {
        let mut salt = BOOT_SALT.load(Ordering::Relaxed);
        if salt == 0 {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            let mixed = splitmix(nanos ^ (u64::from(std::process::id()) << 32));
            salt = match BOOT_SALT.compare_exchange(
                0,
                mixed | 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => mixed | 1,
                Err(existing) => existing,
            };
        }
        let mut prefix = [0u8; ID_LEN / 2];
        write_hex(&mut prefix, salt ^ ((shard as u64) << 56));
        Self { prefix, counter: 0 }
    }

    /// The next id.
    pub fn next_id(&mut self) -> MessageId {
        self.counter += 1;
        let mut out = [0u8; ID_LEN];
        let (prefix, counter) = out.split_at_mut(ID_LEN / 2);
        prefix.copy_from_slice(&self.prefix);
        write_hex(counter, self.counter);
        MessageId(out)
    }
}

fn write_hex(out: &mut [u8], mut v: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = HEX[(v & 0xf) as usize];
        v >>= 4;
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The text of a message (its exchange and routing key as JSON string tokens, the
/// decoded routing key, and the body) as ranges of one buffer.
///
/// A publish arrives as one WebSocket frame or HTTP body, and all four pieces are
/// slices of it, so a message holds one reference to that buffer rather than one per
/// piece. The count is a word both shards write (the publishing shard counts up, the
/// delivering shard counts down when the message is done), so every update can move a
/// cache line between cores: one per message instead of four. Pieces that are not in
/// the buffer (a key whose escapes had to be decoded, a message read back from the
/// store) are copied, all four, into one fresh buffer; that happens off the hot path.
///
/// The ranges are kept as 32-bit offsets: a `Message` then fits mimalloc's 192-byte
/// size class (three cache lines) instead of the 224-byte one (four or five), and
/// every message's lines cross from the publishing core to the delivering one and
/// back. Frames are bounded far below 4 GiB (`config::MAX_PAYLOAD_LIMIT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageText {
    buf: Bytes,
    exchange_json: Span,
    /// Empty when the publish gave no key: the token is then `""`.
    key_json: Span,
    key: Span,
    body: Span,
}

/// A range of a [`MessageText`]'s buffer in 32-bit offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    /// `r` as offsets. Past 4 GiB (which no frame reaches) the span saturates and then
    /// reads as empty, garbling that one message, never memory.
    fn of(r: Range<usize>) -> Self {
        let clamp = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        Span {
            start: clamp(r.start),
            end: clamp(r.end),
        }
    }

    fn range(self) -> Range<usize> {
        self.start as usize..self.end as usize
    }

    fn is_empty(self) -> bool {
        self.start >= self.end
    }
}

impl MessageText {
    /// The text of a message from its pieces: `exchange_json` and `key_json` are JSON
    /// string tokens (quotes included; no `key_json` means no key), `key` the decoded
    /// key, `body` the raw JSON body. Pieces that lie inside `buf` are kept as ranges
    /// of it; if any does not, all are copied into one new buffer.
    pub fn new(
        buf: &Bytes,
        exchange_json: &[u8],
        key_json: Option<&[u8]>,
        key: &[u8],
        body: &[u8],
    ) -> Self {
        let key_json_span = match key_json {
            Some(token) => span_in(buf, token),
            None => Some(0..0),
        };
        if let (Some(exchange_json), Some(key_json), Some(key), Some(body)) = (
            span_in(buf, exchange_json),
            key_json_span,
            span_in(buf, key),
            span_in(buf, body),
        ) {
            return MessageText::from_ranges(buf.clone(), exchange_json, key_json, key, body);
        }
        let key_json = key_json.unwrap_or_default();
        let mut out =
            BytesMut::with_capacity(exchange_json.len() + key_json.len() + key.len() + body.len());
        let mut put = |piece: &[u8]| {
            let start = out.len();
            out.extend_from_slice(piece);
            start..out.len()
        };
        let exchange_json = put(exchange_json);
        let key_json = put(key_json);
        let key = put(key);
        let body = put(body);
        MessageText::from_ranges(out.freeze(), exchange_json, key_json, key, body)
    }

    /// The text of a message whose pieces are already known as ranges of `buf` (a
    /// scanned frame), taking `buf` itself: no new reference to a buffer whose count
    /// the delivering shard also writes. An empty `key_json` means no key. A range
    /// outside `buf` reads as empty (every accessor checks), so a caller's mistake
    /// garbles the text, never memory.
    pub fn from_ranges(
        buf: Bytes,
        exchange_json: Range<usize>,
        key_json: Range<usize>,
        key: Range<usize>,
        body: Range<usize>,
    ) -> Self {
        debug_assert!([&exchange_json, &key_json, &key, &body]
            .iter()
            .all(|r| r.start <= r.end && r.end <= buf.len()));
        MessageText {
            buf,
            exchange_json: Span::of(exchange_json),
            key_json: Span::of(key_json),
            key: Span::of(key),
            body: Span::of(body),
        }
    }

    fn piece(&self, span: &Span) -> &[u8] {
        self.buf.get(span.range()).unwrap_or_default()
    }

    /// The exchange's name as a JSON string token, quotes included.
    pub fn exchange_json(&self) -> &[u8] {
        self.piece(&self.exchange_json)
    }

    /// The exchange's name, decoded.
    pub fn exchange(&self) -> Cow<'_, str> {
        let token = self.exchange_json();
        let inner = token
            .get(1..token.len().saturating_sub(1))
            .unwrap_or_default();
        if memchr::memchr(b'\\', inner).is_none() {
            return Cow::Borrowed(as_text(inner));
        }
        Cow::Owned(serde_json::from_slice::<String>(token).unwrap_or_default())
    }

    /// The routing key as a JSON string token, quotes included, as the client sent it.
    pub fn routing_key_json(&self) -> &[u8] {
        if self.key_json.is_empty() {
            return b"\"\"";
        }
        self.piece(&self.key_json)
    }

    /// The routing key, decoded (UTF-8: it came from a JSON string).
    pub fn routing_key(&self) -> &[u8] {
        self.piece(&self.key)
    }

    /// The routing key as text.
    pub fn routing_key_str(&self) -> &str {
        as_text(self.routing_key())
    }

    /// The body: the client's raw JSON bytes.
    pub fn body(&self) -> &[u8] {
        self.piece(&self.body)
    }

    /// True when the buffer holds these pieces and nothing else, as [`MessageText::new`]
    /// lays them out when it copies: keeping the text then keeps no other bytes alive.
    /// A text sliced from a frame never is (the frame holds more than its pieces).
    pub fn is_compact(&self) -> bool {
        let len = |s: Span| (s.end as usize).saturating_sub(s.start as usize);
        let pieces = len(self.exchange_json) + len(self.key_json) + len(self.key) + len(self.body);
        self.buf.len() == pieces
    }

    /// The same text in a buffer of its own, sized to its pieces.
    pub fn compacted(&self) -> MessageText {
        let key_json = (!self.key_json.is_empty()).then(|| self.piece(&self.key_json));
        // No piece lies in an empty buffer, so `new` copies them all into one.
        MessageText::new(
            &Bytes::new(),
            self.exchange_json(),
            key_json,
            self.routing_key(),
            self.body(),
        )
    }

    /// The body as its own `Bytes` (for the store; one more reference to the buffer).
    pub fn body_bytes(&self) -> Bytes {
        let body = self.body.range();
        if self.buf.get(body.clone()).is_none() {
            return Bytes::new();
        }
        self.buf.slice(body)
    }
}

/// `b` as text, or `""` if it is not UTF-8 (a message's names and key always are).
/// ASCII, the usual case, is recognised a word at a time; the general UTF-8 check
/// goes byte by byte on strings this short and is looked up on every publish.
fn as_text(b: &[u8]) -> &str {
    if b.is_ascii() {
        // SAFETY: every byte is ASCII (checked just above), and ASCII is UTF-8.
        return unsafe { std::str::from_utf8_unchecked(b) };
    }
    std::str::from_utf8(b).unwrap_or_default()
}

/// Where `piece` lies in `buf`, if wholly inside it. An empty piece (no key) is
/// anywhere: it needs no bytes of its own, so it never forces a copy.
pub(crate) fn span_in(buf: &[u8], piece: &[u8]) -> Option<Range<usize>> {
    if piece.is_empty() {
        return Some(0..0);
    }
    let start = (piece.as_ptr() as usize).checked_sub(buf.as_ptr() as usize)?;
    let end = start.checked_add(piece.len())?;
    (end <= buf.len()).then_some(start..end)
}

/// One published message, shared by every queue it was routed to.
#[derive(Debug)]
pub struct Message {
    /// The `unique_id` delivered to subscribers.
    pub id: MessageId,
    /// Exchange, routing key and body.
    pub text: MessageText,
    /// Optional `headers` object, raw JSON.
    pub headers: Option<Bytes>,
    /// Milliseconds since the epoch when it was published.
    pub published_at: u64,
    /// Absolute expiry from the publish's `ttl_ms`.
    pub expires_at: Option<u64>,
    /// Whether a durable queue must keep it on disk.
    pub persistent: bool,
}

impl Message {
    /// Bytes this message accounts for against the memory high-water mark.
    pub fn weight(&self) -> usize {
        Self::weight_of(self.text.body(), self.headers.as_ref())
    }

    /// [`Message::weight`] of a message with this body and headers, before it is built.
    pub fn weight_of(body: &[u8], headers: Option<&Bytes>) -> usize {
        body.len() + headers.map_or(0, Bytes::len) + 128
    }

    /// True while its text still lies in the buffer its frame was read into, which it
    /// then keeps alive whole (with every other frame read with it; see
    /// [`crate::queue::QueueState::compact`]).
    pub fn shares_buffer(&self) -> bool {
        !self.text.is_compact()
    }

    /// The same message with its text and headers copied into buffers of their own:
    /// same id, times and flags, so nothing a client sees changes.
    pub fn compacted(&self) -> Message {
        Message {
            text: self.text.compacted(),
            headers: self.headers.as_deref().map(Bytes::copy_from_slice),
            ..*self
        }
    }

    /// A copy for dead-lettering: same id and body, no per-message expiry.
    pub fn for_dead_letter(self: &Arc<Self>) -> Arc<Self> {
        Arc::new(Message {
            text: self.text.clone(),
            headers: self.headers.clone(),
            expires_at: None,
            ..**self
        })
    }
}

/// Appends the `MESSAGE` frame of one delivery of `m` to `out`, as one WebSocket text
/// frame: `{"type":"MESSAGE","unique_id":…,"body":<the body's bytes>` then `sub_mid`
/// (the subscription's own `,"subscription":…,"queue":…,"exchange":` part, built once
/// when it subscribed), the exchange, the routing key, the tag, `redelivered`,
/// `published_at` and the headers if any.
///
/// Written straight into the buffer: one size computation, one reserve, and a run of
/// appends of which the constant ones compile to plain stores (a slice of parts
/// would cost a `memcpy` call for every comma).
pub fn write_frame(out: &mut BytesMut, m: &Message, sub_mid: &[u8], tag: u64, redelivered: bool) {
    const HEAD: &[u8] = br#"{"type":"MESSAGE","unique_id":""#;
    const BODY: &[u8] = br#"","body":"#;
    const KEY: &[u8] = br#","routing_key":"#;
    const TAG: &[u8] = br#","delivery_tag":"#;
    const AGAIN: &[u8] = br#","redelivered":true,"published_at":"#;
    const FIRST: &[u8] = br#","redelivered":false,"published_at":"#;
    const HEADERS: &[u8] = br#","headers":"#;
    let mut tag_buf = itoa::Buffer::new();
    let tag_s = tag_buf.format(tag).as_bytes();
    let mut ts_buf = itoa::Buffer::new();
    let ts_s = ts_buf.format(m.published_at).as_bytes();
    let when: &[u8] = if redelivered { AGAIN } else { FIRST };
    let headers = m.headers.as_deref();
    let (body, exchange_json, key_json) = (
        m.text.body(),
        m.text.exchange_json(),
        m.text.routing_key_json(),
    );
    let len = HEAD.len()
        + ID_LEN
        + BODY.len()
        + body.len()
        + sub_mid.len()
        + exchange_json.len()
        + KEY.len()
        + key_json.len()
        + TAG.len()
        + tag_s.len()
        + when.len()
        + ts_s.len()
        + headers.map_or(0, |h| HEADERS.len() + h.len())
        + 1;
    out.reserve(10 + len);
    crate::ws::write_text_header(out, len);
    out.extend_from_slice(HEAD);
    out.extend_from_slice(m.id.as_bytes());
    out.extend_from_slice(BODY);
    out.extend_from_slice(body);
    out.extend_from_slice(sub_mid);
    out.extend_from_slice(exchange_json);
    out.extend_from_slice(KEY);
    out.extend_from_slice(key_json);
    out.extend_from_slice(TAG);
    out.extend_from_slice(tag_s);
    out.extend_from_slice(when);
    out.extend_from_slice(ts_s);
    if let Some(h) = headers {
        out.extend_from_slice(HEADERS);
        out.extend_from_slice(h);
    }
    out.extend_from_slice(b"}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_and_its_counts_fit_three_cache_lines() {
        // Arc's two counts come first; mimalloc's class for 161-192 bytes is 192.
        let with_counts = std::mem::size_of::<Message>() + 2 * std::mem::size_of::<usize>();
        assert!(
            with_counts <= 192,
            "Message with its Arc counts is {with_counts} bytes"
        );
    }

    #[test]
    fn a_compacted_text_owns_exactly_its_pieces_and_reads_the_same() {
        let frame = Bytes::from_static(br#"{"e":"ex","k":"a.b","p":{"n":1}}"#);
        let at = |piece: &[u8]| {
            let i = frame.windows(piece.len()).position(|w| w == piece).unwrap();
            &frame[i..i + piece.len()]
        };
        let key_token = at(br#""a.b""#);
        for key_json in [Some(key_token), None] {
            // The decoded key lies inside the token, as the scanner finds it.
            let key = key_json.map_or(&b""[..], |t| &t[1..4]);
            let text = MessageText::new(&frame, at(br#""ex""#), key_json, key, at(br#"{"n":1}"#));
            assert!(!text.is_compact(), "a slice of a frame keeps the frame");
            let c = text.compacted();
            assert!(c.is_compact());
            assert_eq!(c.exchange_json(), text.exchange_json());
            assert_eq!(c.routing_key_json(), text.routing_key_json());
            assert_eq!(c.routing_key(), text.routing_key());
            assert_eq!(c.body(), text.body());
            assert_eq!(c.compacted(), c);
        }
    }

    #[test]
    fn a_span_past_4_gib_reads_as_empty_never_out_of_bounds() {
        let buf = Bytes::from_static(b"0123456789");
        let big = (u32::MAX as usize) + 10;
        let t = MessageText {
            buf,
            exchange_json: Span::of(0..3),
            key_json: Span::of(0..0),
            key: Span::of(0..0),
            body: Span::of(3..big),
        };
        assert_eq!(t.exchange_json(), b"012");
        assert_eq!(t.body(), b"");
        assert!(t.body_bytes().is_empty());
    }

    #[test]
    fn text_in_one_buffer_is_shared_not_copied() {
        let frame = Bytes::from_static(br#"{"exchange_name":"ex","key":"a.b","payload":[1]}"#);
        let at = |needle: &[u8]| {
            let i = memchr::memmem::find(&frame, needle).unwrap();
            &frame[i..i + needle.len()]
        };
        let key_json = at(br#""a.b""#);
        let t = MessageText::new(
            &frame,
            at(br#""ex""#),
            Some(key_json),
            &key_json[1..4],
            at(b"[1]"),
        );
        assert_eq!(t.exchange_json(), br#""ex""#);
        assert_eq!(t.exchange(), "ex");
        assert_eq!(t.routing_key_json(), br#""a.b""#);
        assert_eq!(t.routing_key_str(), "a.b");
        assert_eq!(t.body(), b"[1]");
        // Ranges of the frame itself: the same allocation, no copy.
        assert_eq!(t.body().as_ptr(), at(b"[1]").as_ptr());
        assert_eq!(t.body_bytes().as_ptr(), t.body().as_ptr());
    }

    #[test]
    fn text_with_outside_pieces_is_copied_whole() {
        let frame = Bytes::from_static(br#"{"payload":{"x":1}}"#);
        let body = &frame[11..18];
        // An exchange token from elsewhere, and no key at all.
        let t = MessageText::new(&frame, br#""e\"x""#, None, b"", body);
        assert_eq!(t.body(), br#"{"x":1}"#);
        assert_ne!(t.body().as_ptr(), body.as_ptr());
        assert_eq!(t.exchange(), "e\"x");
        assert_eq!(t.routing_key_json(), b"\"\"");
        assert_eq!(t.routing_key(), b"");
        let escaped = MessageText::new(
            &Bytes::new(),
            br#""x""#,
            Some(br#""a\u002eb""#),
            b"a.b",
            b"1",
        );
        assert_eq!(escaped.routing_key_json(), br#""a\u002eb""#);
        assert_eq!(escaped.routing_key_str(), "a.b");
    }

    #[test]
    fn message_frame_is_the_contract_object() {
        let m = Message {
            id: IdGen::new(0).next_id(),
            text: MessageText::new(
                &Bytes::new(),
                br#""ex""#,
                Some(br#""k""#),
                b"k",
                br#"{"a":[1,2]}"#,
            ),
            headers: Some(Bytes::from_static(br#"{"h":"v"}"#)),
            published_at: 1_700_000_000_123,
            expires_at: None,
            persistent: false,
        };
        let mid = br#","subscription":"sub-0-1-1","queue":"q","exchange":"#;
        for (tag, again) in [(0, false), (18_446_744_073_709_551_615, true)] {
            let mut out = BytesMut::new();
            write_frame(&mut out, &m, mid, tag, again);
            // A 16-bit length header: 0x81, 126, then the length.
            assert_eq!(out[0], 0x81);
            assert_eq!(out[1], 126);
            let len = usize::from(u16::from_be_bytes([out[2], out[3]]));
            assert_eq!(len, out.len() - 4);
            let v: serde_json::Value = serde_json::from_slice(&out[4..]).unwrap();
            assert_eq!(v["type"], "MESSAGE");
            assert_eq!(v["unique_id"], m.id.as_str());
            assert_eq!(v["body"], serde_json::json!({"a":[1,2]}));
            assert_eq!(v["subscription"], "sub-0-1-1");
            assert_eq!(v["queue"], "q");
            assert_eq!(v["exchange"], "ex");
            assert_eq!(v["routing_key"], "k");
            assert_eq!(v["delivery_tag"], tag);
            assert_eq!(v["redelivered"], again);
            assert_eq!(v["published_at"], 1_700_000_000_123u64);
            assert_eq!(v["headers"]["h"], "v");
        }
    }

    #[test]
    fn ids_are_unique_hex() {
        let mut a = IdGen::new(0);
        let mut b = IdGen::new(1);
        let x = a.next_id();
        let y = a.next_id();
        let z = b.next_id();
        assert_ne!(x, y);
        assert_ne!(x, z);
        assert_eq!(x.as_str().len(), ID_LEN);
        assert!(x.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(MessageId::parse(x.as_str()), Some(x));
        assert_eq!(MessageId::parse("xyz"), None);
    }
}
