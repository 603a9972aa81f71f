//! The WebSocket frame codec: a [`Decoder`] for client frames and `write_*` functions for
//! server frames, both working on `BytesMut` buffers with no I/O.
//!
//! Decoding: frame headers are parsed by tungstenite's [`FrameHeader::parse`]; the payload is
//! unmasked in place and split off the front of the read buffer, so an unfragmented message
//! reaches the caller as a `Bytes` view of the bytes that were read (no copy). Fragmented
//! messages are reassembled (control frames may be interleaved). Every RFC 6455 rule a
//! server must enforce on client frames is checked; a violation is a [`WsError`] whose
//! [`WsError::close_code`] the caller sends before closing.
//!
//! Encoding: server frames are unmasked and always final; headers are written straight into
//! the output buffer, followed by the payload (or its parts, for `MESSAGE` frames assembled
//! from a prefix, a message body and a suffix).

use std::io::Cursor;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::{FrameHeader, Utf8Bytes};

use super::error::WsError;

/// Default largest message (after reassembly) the decoder accepts, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Largest payload of a control frame (ping, pong, close), RFC 6455 §5.5.
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// Largest payload length a 7-bit length field holds.
const LEN7_MAX: usize = 125;
/// 7-bit length marker for a 16-bit extended length.
const LEN16_MARKER: u8 = 126;
/// 7-bit length marker for a 64-bit extended length.
const LEN64_MARKER: u8 = 127;
/// FIN bit of the first header byte.
const FIN: u8 = 0x80;

/// One complete thing received from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A whole text message (valid UTF-8).
    Text(Utf8Bytes),
    /// A whole binary message.
    Binary(Bytes),
    /// A ping; answer with a pong carrying the same payload.
    Ping(Bytes),
    /// A pong.
    Pong(Bytes),
    /// A close frame: its code and reason, or `None` when it had no payload.
    Close(Option<(u16, String)>),
}

/// A fragmented message being reassembled.
#[derive(Debug)]
struct Partial {
    text: bool,
    data: BytesMut,
}

/// Decodes client frames from a read buffer. Holds the reassembly state of a fragmented
/// message, so use one per connection.
#[derive(Debug)]
pub struct Decoder {
    max_message: usize,
    require_mask: bool,
    partial: Option<Partial>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(MAX_MESSAGE_BYTES)
    }
}

impl Decoder {
    /// A server-side decoder refusing messages over `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Decoder {
            max_message,
            require_mask: true,
            partial: None,
        }
    }

    /// Accept unmasked frames too (server frames, for tests and tools); the server keeps the
    /// default, which refuses them as RFC 6455 §5.1 requires.
    pub fn accept_unmasked(mut self, accept: bool) -> Self {
        self.require_mask = !accept;
        self
    }

    /// The message size limit.
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// Whether a fragmented message has started and not finished.
    pub fn in_fragmented_message(&self) -> bool {
        self.partial.is_some()
    }

    /// Decodes the next event from the front of `buf`.
    ///
    /// Returns `Ok(None)` when more bytes are needed; whole frames already consumed (the
    /// fragments of an unfinished message) are kept by the decoder. A frame's bytes are only
    /// removed from `buf` once the whole frame is there. After an error the connection must be
    /// closed: the decoder state is not meant to be reused.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, WsError> {
        loop {
            let mut cursor = Cursor::new(&buf[..]);
            let (header, length) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => return Ok(None),
                // The only error an in-memory cursor can produce: a reserved opcode.
                Err(_) => return Err(WsError::Protocol("reserved opcode")),
            };
            let header_len = usize::try_from(cursor.position())
                .map_err(|_| WsError::Protocol("frame header length"))?;

            if header.rsv1 || header.rsv2 || header.rsv3 {
                return Err(WsError::Protocol("reserved bits set without an extension"));
            }
            if header.mask.is_none() && self.require_mask {
                return Err(WsError::Protocol("client frame not masked"));
            }
            if length >> 63 != 0 {
                return Err(WsError::Protocol("64-bit length with the high bit set"));
            }
            match header.opcode {
                OpCode::Control(_) => {
                    if !header.is_final {
                        return Err(WsError::Protocol("fragmented control frame"));
                    }
                    if length > MAX_CONTROL_PAYLOAD as u64 {
                        return Err(WsError::Protocol("control frame payload over 125 bytes"));
                    }
                }
                OpCode::Data(Data::Continue) => {
                    if self.partial.is_none() {
                        return Err(WsError::Protocol(
                            "continuation frame without a started message",
                        ));
                    }
                }
                OpCode::Data(_) => {
                    if self.partial.is_some() {
                        return Err(WsError::Protocol(
                            "new data frame inside a fragmented message",
                        ));
                    }
                }
            }
            if let OpCode::Data(_) = header.opcode {
                let already = self.partial.as_ref().map_or(0, |p| p.data.len());
                let room = self.max_message.saturating_sub(already);
                if length > room as u64 {
                    return Err(WsError::MessageTooBig {
                        limit: self.max_message,
                    });
                }
            }
            // Bounded above by max_message or 125, so it fits.
            let length = usize::try_from(length).map_err(|_| WsError::Protocol("frame length"))?;
            let total = header_len + length;
            if buf.len() < total {
                // No `reserve` for the announced length: the caller's read loop grows the
                // buffer as bytes actually arrive.
                return Ok(None);
            }

            buf.advance(header_len);
            let mut payload = buf.split_to(length);
            // Unmasking reads every byte anyway, so it also says whether all are ASCII,
            // which spares a text frame the UTF-8 check (JSON frames nearly always are).
            let ascii = match header.mask {
                Some(mask) => unmask(&mut payload, mask),
                None => false,
            };

            match header.opcode {
                OpCode::Control(Control::Ping) => return Ok(Some(Event::Ping(payload.freeze()))),
                OpCode::Control(Control::Pong) => return Ok(Some(Event::Pong(payload.freeze()))),
                OpCode::Control(Control::Close) => return parse_close(&payload).map(Some),
                OpCode::Data(Data::Text) | OpCode::Data(Data::Binary) => {
                    let text = header.opcode == OpCode::Data(Data::Text);
                    if header.is_final {
                        if text && ascii {
                            // SAFETY: every byte is ASCII (`unmask` returned true), and
                            // ASCII is UTF-8.
                            let text = unsafe { Utf8Bytes::from_bytes_unchecked(payload.freeze()) };
                            return Ok(Some(Event::Text(text)));
                        }
                        return finish(text, payload).map(Some);
                    }
                    self.partial = Some(Partial {
                        text,
                        data: payload,
                    });
                }
                OpCode::Data(Data::Continue) => {
                    let Some(partial) = self.partial.as_mut() else {
                        return Err(WsError::Protocol(
                            "continuation frame without a started message",
                        ));
                    };
                    partial.data.extend_from_slice(&payload);
                    if header.is_final {
                        if let Some(done) = self.partial.take() {
                            return finish(done.text, done.data).map(Some);
                        }
                    }
                }
                OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                    return Err(WsError::Protocol("reserved opcode"))
                }
            }
        }
    }
}

/// Turns a complete message into its event, checking text for UTF-8.
fn finish(text: bool, data: BytesMut) -> Result<Event, WsError> {
    if text {
        let text = Utf8Bytes::try_from(data.freeze()).map_err(|_| WsError::InvalidUtf8)?;
        Ok(Event::Text(text))
    } else {
        Ok(Event::Binary(data.freeze()))
    }
}

/// Parses a close payload: empty, or a valid code and a UTF-8 reason (RFC 6455 §5.5.1, §7.4).
fn parse_close(payload: &[u8]) -> Result<Event, WsError> {
    let Some((code, reason)) = payload.split_first_chunk::<2>() else {
        return if payload.is_empty() {
            Ok(Event::Close(None))
        } else {
            Err(WsError::Protocol("close frame with a 1-byte payload"))
        };
    };
    let code = u16::from_be_bytes(*code);
    if !CloseCode::from(code).is_allowed() {
        return Err(WsError::Protocol("invalid close code"));
    }
    let reason = std::str::from_utf8(reason).map_err(|_| WsError::InvalidUtf8)?;
    Ok(Event::Close(Some((code, reason.to_owned()))))
}

/// XORs `buf` with the repeating 4-byte `mask`; true when every unmasked byte is
/// ASCII (no high bit set).
fn unmask(buf: &mut [u8], mask: [u8; 4]) -> bool {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut high = 0u64;
    let mut words = buf.chunks_exact_mut(8);
    for word in &mut words {
        if let Ok(bytes) = <[u8; 8]>::try_from(&*word) {
            let plain = u64::from_ne_bytes(bytes) ^ wide;
            high |= plain;
            word.copy_from_slice(&plain.to_ne_bytes());
        }
    }
    // The tail (under 8 bytes) starts at a multiple of 8, hence of 4: the mask restarts at
    // its first byte.
    let mut tail = 0u8;
    for (b, m) in words.into_remainder().iter_mut().zip(mask.iter().cycle()) {
        *b ^= m;
        tail |= *b;
    }
    high & 0x8080_8080_8080_8080 == 0 && tail & 0x80 == 0
}

/// Appends the header of a final, unmasked server frame with a payload of `len` bytes.
pub fn write_frame_header(out: &mut BytesMut, opcode: OpCode, len: usize) {
    out.put_u8(FIN | u8::from(opcode));
    if len <= LEN7_MAX {
        // Fits in 7 bits.
        out.put_u8(len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        out.put_u8(LEN16_MARKER);
        out.put_u16(short);
    } else {
        out.put_u8(LEN64_MARKER);
        out.put_u64(len as u64);
    }
}

/// Appends the header of a text frame whose `len` payload bytes the caller appends next.
pub fn write_text_header(out: &mut BytesMut, len: usize) {
    write_frame_header(out, OpCode::Data(Data::Text), len);
}

/// Appends one text frame carrying `payload` (which must be UTF-8).
pub fn write_text(out: &mut BytesMut, payload: &[u8]) {
    write_text_parts(out, &[payload]);
}

/// Appends one text frame whose payload is the concatenation of `parts` (together UTF-8).
pub fn write_text_parts(out: &mut BytesMut, parts: &[&[u8]]) {
    write_data_parts(out, OpCode::Data(Data::Text), parts);
}

/// Appends one binary frame carrying `payload`.
pub fn write_binary(out: &mut BytesMut, payload: &[u8]) {
    write_data_parts(out, OpCode::Data(Data::Binary), &[payload]);
}

fn write_data_parts(out: &mut BytesMut, opcode: OpCode, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.reserve(10 + len);
    write_frame_header(out, opcode, len);
    for part in parts {
        out.put_slice(part);
    }
}

/// Appends a ping. Payloads over 125 bytes are cut to 125.
pub fn write_ping(out: &mut BytesMut, payload: &[u8]) {
    write_control(out, Control::Ping, payload);
}

/// Appends a pong (echo the ping's payload). Payloads over 125 bytes are cut to 125.
pub fn write_pong(out: &mut BytesMut, payload: &[u8]) {
    write_control(out, Control::Pong, payload);
}

fn write_control(out: &mut BytesMut, control: Control, payload: &[u8]) {
    debug_assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
    let payload = payload.get(..MAX_CONTROL_PAYLOAD).unwrap_or(payload);
    out.reserve(2 + payload.len());
    write_frame_header(out, OpCode::Control(control), payload.len());
    out.put_slice(payload);
}

/// Appends a close frame with `code` and `reason`; the reason is cut (at a character
/// boundary) to fit the 125-byte control payload.
pub fn write_close(out: &mut BytesMut, code: u16, reason: &str) {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = reason.get(..end).unwrap_or("");
    out.reserve(4 + reason.len());
    write_frame_header(out, OpCode::Control(Control::Close), 2 + reason.len());
    out.put_u16(code);
    out.put_slice(reason.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::protocol::frame::{Frame, FrameSocket};

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A client frame built by hand (independent of the encoder under test).
    fn frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut v = vec![first];
        let mbit = if mask.is_some() { 0x80 } else { 0 };
        let n = payload.len();
        if n < 126 {
            v.push(mbit | n as u8);
        } else if n <= 0xffff {
            v.push(mbit | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            v.push(mbit | 127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
        match mask {
            Some(m) => {
                v.extend_from_slice(&m);
                v.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
            }
            None => v.extend_from_slice(payload),
        }
        v
    }

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        frame(first, payload, Some(MASK))
    }

    fn decode_all(dec: &mut Decoder, bytes: &[u8]) -> Result<Vec<Event>, WsError> {
        let mut buf = BytesMut::from(bytes);
        let mut events = Vec::new();
        while let Some(ev) = dec.decode(&mut buf)? {
            events.push(ev);
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        Ok(events)
    }

    fn one_err(bytes: &[u8]) -> WsError {
        Decoder::default()
            .decode(&mut BytesMut::from(bytes))
            .unwrap_err()
    }

    #[test]
    fn masked_text_decodes_unmasked_rejected() {
        let ev = decode_all(&mut Decoder::default(), &masked(0x81, b"hello")).unwrap();
        assert_eq!(ev, vec![Event::Text(Utf8Bytes::from("hello"))]);
        let err = one_err(&frame(0x81, b"hello", None));
        assert_eq!(err.close_code(), 1002);
        let mut lenient = Decoder::default().accept_unmasked(true);
        let ev = decode_all(&mut lenient, &frame(0x82, b"\x00\xff", None)).unwrap();
        assert_eq!(ev, vec![Event::Binary(Bytes::from_static(b"\x00\xff"))]);
    }

    #[test]
    fn length_encodings() {
        for n in [0usize, 1, 7, 8, 125, 126, 127, 65_535, 65_536, 70_001] {
            let payload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let bytes = masked(0x82, &payload);
            let ev = decode_all(&mut Decoder::default(), &bytes).unwrap();
            assert_eq!(ev, vec![Event::Binary(Bytes::from(payload))], "n = {n}");
        }
    }

    #[test]
    fn unfragmented_message_is_not_copied() {
        let bytes = masked(0x81, &[b'a'; 300]);
        let mut buf = BytesMut::from(&bytes[..]);
        let start = buf.as_ptr() as usize;
        let Some(Event::Text(t)) = Decoder::default().decode(&mut buf).unwrap() else {
            panic!("expected text")
        };
        assert_eq!(t.as_ptr() as usize, start + 2 + 2 + 4);
        assert_eq!(t.as_bytes(), &[b'a'; 300][..]);
    }

    #[test]
    fn every_split_point() {
        let mut stream = masked(0x81, "héllo wörld".as_bytes());
        stream.extend(masked(0x82, &[7u8; 200]));
        stream.extend(masked(0x89, b"p"));
        for split in 0..stream.len() {
            let mut dec = Decoder::default();
            let mut buf = BytesMut::from(&stream[..split]);
            let mut events = Vec::new();
            while let Some(ev) = dec.decode(&mut buf).unwrap() {
                events.push(ev);
            }
            buf.extend_from_slice(&stream[split..]);
            while let Some(ev) = dec.decode(&mut buf).unwrap() {
                events.push(ev);
            }
            assert_eq!(
                events,
                vec![
                    Event::Text(Utf8Bytes::from("héllo wörld")),
                    Event::Binary(Bytes::from(vec![7u8; 200])),
                    Event::Ping(Bytes::from_static(b"p")),
                ],
                "split {split}"
            );
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn many_frames_in_one_buffer() {
        let mut stream = Vec::new();
        for i in 0..100 {
            stream.extend(masked(0x81, format!("{{\"n\":{i}}}").as_bytes()));
        }
        let ev = decode_all(&mut Decoder::default(), &stream).unwrap();
        assert_eq!(ev.len(), 100);
        for (i, e) in ev.iter().enumerate() {
            assert_eq!(e, &Event::Text(Utf8Bytes::from(format!("{{\"n\":{i}}}"))));
        }
    }

    #[test]
    fn fragmented_with_interleaved_ping() {
        let mut stream = masked(0x01, b"Hel");
        stream.extend(masked(0x89, b"ping!"));
        stream.extend(masked(0x00, "lo wö".as_bytes()));
        stream.extend(masked(0x8a, b""));
        stream.extend(masked(0x80, b"rld"));
        stream.extend(masked(0x02, b"\x01"));
        stream.extend(masked(0x80, b"\x02"));
        let mut dec = Decoder::default();
        let ev = decode_all(&mut dec, &stream).unwrap();
        assert_eq!(
            ev,
            vec![
                Event::Ping(Bytes::from_static(b"ping!")),
                Event::Pong(Bytes::new()),
                Event::Text(Utf8Bytes::from("Hello wörld")),
                Event::Binary(Bytes::from_static(b"\x01\x02")),
            ]
        );
        assert!(!dec.in_fragmented_message());
    }

    #[test]
    fn utf8_split_across_fragments_is_fine() {
        let s = "✓".as_bytes();
        let mut stream = masked(0x01, &s[..1]);
        stream.extend(masked(0x80, &s[1..]));
        let ev = decode_all(&mut Decoder::default(), &stream).unwrap();
        assert_eq!(ev, vec![Event::Text(Utf8Bytes::from("✓"))]);
    }

    #[test]
    fn protocol_errors_close_1002() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("rsv1", masked(0xc1, b"x")),
            ("rsv2", masked(0xa1, b"x")),
            ("rsv3", masked(0x91, b"x")),
            ("reserved data opcode", masked(0x83, b"x")),
            ("reserved control opcode", masked(0x8b, b"x")),
            ("long ping", masked(0x89, &[0u8; 126])),
            ("fragmented ping", masked(0x09, b"x")),
            ("continuation first", masked(0x80, b"x")),
            ("close 1 byte", masked(0x88, b"\x03")),
            ("close code 1005", masked(0x88, &1005u16.to_be_bytes())),
            ("close code 999", masked(0x88, &999u16.to_be_bytes())),
            ("close code 1004", masked(0x88, &1004u16.to_be_bytes())),
            ("close code 5000", masked(0x88, &5000u16.to_be_bytes())),
            (
                "new text inside fragmented",
                [masked(0x01, b"a"), masked(0x81, b"b")].concat(),
            ),
        ];
        for (name, bytes) in cases {
            let mut dec = Decoder::default();
            let err = decode_all(&mut dec, &bytes).unwrap_err();
            assert_eq!(err.close_code(), 1002, "{name}: {err}");
        }
        // 64-bit length with the top bit set.
        let mut bytes = vec![0x82, 0x80 | 127];
        bytes.extend_from_slice(&(1u64 << 63).to_be_bytes());
        bytes.extend_from_slice(&MASK);
        assert_eq!(one_err(&bytes).close_code(), 1002);
    }

    #[test]
    fn a_high_byte_anywhere_gets_the_utf8_check() {
        // Every length up to a few words and every position of one non-ASCII byte: the
        // ASCII shortcut must see it in the words and in the tail alike.
        for len in 1..40 {
            let ascii = vec![b'a'; len];
            let ev = decode_all(&mut Decoder::default(), &masked(0x81, &ascii)).unwrap();
            assert_eq!(ev, vec![Event::Text(Utf8Bytes::try_from(ascii).unwrap())]);
            for at in 0..len {
                let mut bad = vec![b'a'; len];
                bad[at] = 0xff;
                let err = one_err(&masked(0x81, &bad));
                assert_eq!(err, WsError::InvalidUtf8, "len {len}, 0xff at {at}");
                let mut good = vec![b'a'; len + 1];
                good[at] = 0xc3;
                good[at + 1] = 0xa9;
                let ev = decode_all(&mut Decoder::default(), &masked(0x81, &good)).unwrap();
                let want = Utf8Bytes::try_from(good).unwrap();
                assert_eq!(ev, vec![Event::Text(want)], "len {len}, é at {at}");
            }
        }
    }

    #[test]
    fn invalid_utf8_closes_1007() {
        assert_eq!(one_err(&masked(0x81, b"\xff\xfe")).close_code(), 1007);
        let stream = [masked(0x01, b"ok"), masked(0x80, b"\xc3")].concat();
        let err = decode_all(&mut Decoder::default(), &stream).unwrap_err();
        assert_eq!(err, WsError::InvalidUtf8);
        let mut close = 1000u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"\xff");
        assert_eq!(one_err(&masked(0x88, &close)).close_code(), 1007);
    }

    #[test]
    fn too_big_closes_1009_before_payload_arrives() {
        let mut dec = Decoder::new(100);
        let bytes = masked(0x82, &[0u8; 101]);
        // Only the header is there: the length alone is enough to refuse.
        let err = dec.decode(&mut BytesMut::from(&bytes[..8])).unwrap_err();
        assert_eq!(err, WsError::MessageTooBig { limit: 100 });
        assert_eq!(err.close_code(), 1009);
        // Exactly the limit is fine.
        let ev = decode_all(&mut Decoder::new(100), &masked(0x82, &[0u8; 100])).unwrap();
        assert_eq!(ev.len(), 1);
        // Over the limit through fragments.
        let stream = [masked(0x01, &[b'a'; 60]), masked(0x80, &[b'a'; 41])].concat();
        let err = decode_all(&mut Decoder::new(100), &stream).unwrap_err();
        assert_eq!(err.close_code(), 1009);
    }

    #[test]
    fn close_frames() {
        let ev = decode_all(&mut Decoder::default(), &masked(0x88, b"")).unwrap();
        assert_eq!(ev, vec![Event::Close(None)]);
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.extend_from_slice(b"bye");
        let ev = decode_all(&mut Decoder::default(), &masked(0x88, &p)).unwrap();
        assert_eq!(ev, vec![Event::Close(Some((1000, "bye".to_owned())))]);
        for code in [1001u16, 1003, 1007, 1011, 3000, 4999] {
            let ev = decode_all(&mut Decoder::default(), &masked(0x88, &code.to_be_bytes()));
            assert_eq!(ev.unwrap(), vec![Event::Close(Some((code, String::new())))]);
        }
    }

    #[test]
    fn tungstenite_client_frames_decode() {
        // Frames formatted (and masked) by tungstenite itself.
        let mut wire = Vec::new();
        for (i, data) in [&b"{}"[..], &[b'x'; 300][..], &[b'y'; 70_000][..]]
            .into_iter()
            .enumerate()
        {
            let mut f = Frame::message(data.to_vec(), OpCode::Data(Data::Text), true);
            f.header_mut().mask = Some([i as u8, 0x5a, 0xa5, 0xff]);
            f.format(&mut wire).unwrap();
        }
        let ev = decode_all(&mut Decoder::default(), &wire).unwrap();
        assert_eq!(ev.len(), 3);
        assert_eq!(
            ev[2],
            Event::Text(Utf8Bytes::try_from(vec![b'y'; 70_000]).unwrap())
        );
    }

    /// Reads every frame of `wire` with tungstenite's own (client-side) frame reader.
    fn tungstenite_read(wire: &[u8]) -> Vec<Frame> {
        let mut socket = FrameSocket::new(Cursor::new(wire.to_vec()));
        let mut frames = Vec::new();
        while let Some(f) = socket.read(None).unwrap() {
            frames.push(f);
        }
        frames
    }

    #[test]
    fn encoder_round_trips() {
        let big = vec![b'z'; 70_000];
        let mid = vec![b'm'; 200];
        let mut out = BytesMut::new();
        write_text(&mut out, b"hello");
        write_text_parts(&mut out, &[b"{\"type\":\"MESSAGE\",\"body\":", &mid, b"}"]);
        write_binary(&mut out, &big);
        write_ping(&mut out, b"pi");
        write_pong(&mut out, b"po");
        write_close(&mut out, 1000, "bye");

        let frames = tungstenite_read(&out);
        assert_eq!(frames.len(), 6);
        assert!(frames
            .iter()
            .all(|f| f.header().is_final && f.header().mask.is_none()));
        assert_eq!(frames[0].payload(), b"hello");
        assert_eq!(frames[1].payload().len(), 26 + 200);
        assert_eq!(frames[2].header().opcode, OpCode::Data(Data::Binary));
        assert_eq!(frames[2].payload(), &big[..]);
        assert_eq!(frames[3].header().opcode, OpCode::Control(Control::Ping));
        assert_eq!(frames[4].header().opcode, OpCode::Control(Control::Pong));

        let ev = decode_all(&mut Decoder::default().accept_unmasked(true), &out).unwrap();
        let mut msg = b"{\"type\":\"MESSAGE\",\"body\":".to_vec();
        msg.extend_from_slice(&mid);
        msg.push(b'}');
        assert_eq!(
            ev,
            vec![
                Event::Text(Utf8Bytes::from("hello")),
                Event::Text(Utf8Bytes::try_from(msg).unwrap()),
                Event::Binary(Bytes::from(big)),
                Event::Ping(Bytes::from_static(b"pi")),
                Event::Pong(Bytes::from_static(b"po")),
                Event::Close(Some((1000, "bye".to_owned()))),
            ]
        );
    }

    #[test]
    fn header_length_boundaries() {
        for (len, header_len) in [(0, 2), (125, 2), (126, 4), (65_535, 4), (65_536, 10)] {
            let mut out = BytesMut::new();
            write_frame_header(&mut out, OpCode::Data(Data::Binary), len);
            assert_eq!(out.len(), header_len, "len {len}");
            let (h, n) = FrameHeader::parse(&mut Cursor::new(&out[..]))
                .unwrap()
                .unwrap();
            assert_eq!(n, len as u64);
            assert!(h.is_final);
        }
    }

    #[test]
    fn close_reason_is_cut_at_a_char_boundary() {
        let reason = "é".repeat(100); // 200 bytes
        let mut out = BytesMut::new();
        write_close(&mut out, 1011, &reason);
        let ev = decode_all(&mut Decoder::default().accept_unmasked(true), &out).unwrap();
        let [Event::Close(Some((1011, r)))] = &ev[..] else {
            panic!("{ev:?}")
        };
        assert_eq!(r.len(), 122);
        assert!(out.len() <= 2 + 125);
    }

    #[test]
    fn mutated_and_random_input_never_panics() {
        let mut valid = masked(0x01, b"frag");
        valid.extend(masked(0x89, b"p"));
        valid.extend(masked(0x80, b"ment"));
        valid.extend(masked(0x88, &1000u16.to_be_bytes()));
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut events = 0;
        for round in 0..20_000 {
            let mut bytes = valid.clone();
            if round % 4 == 0 {
                let n = (next() % 64) as usize;
                bytes = (0..n).map(|_| next() as u8).collect();
            } else {
                for _ in 0..(next() % 3 + 1) {
                    let at = (next() as usize) % bytes.len();
                    bytes[at] = next() as u8;
                }
            }
            let mut dec = Decoder::new(1024);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = dec.decode(&mut buf) {
                events += 1;
            }
        }
        assert!(events > 1_000, "only {events} events decoded");
    }

    #[test]
    fn unmask_matches_bytewise_xor_at_all_lengths() {
        for n in 0..40 {
            let orig: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
            let mut v = orig.clone();
            unmask(&mut v, MASK);
            let want: Vec<u8> = orig
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ MASK[i % 4])
                .collect();
            assert_eq!(v, want, "n = {n}");
        }
    }
}
