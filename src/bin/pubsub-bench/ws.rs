//! The load generator's own WebSocket client side: the upgrade handshake (its accept key
//! checked with tungstenite's `derive_accept_key`), masked text-frame encoding straight
//! into a batch buffer, and an incremental frame reader over bytes read in big chunks.
//!
//! Hand-rolled rather than `tungstenite::WebSocket` so a publisher can put hundreds of
//! pipelined `PUBLISH` frames into one `write(2)` and a subscriber can parse many
//! `MESSAGE` frames out of one `read(2)` without a copy: the client shares the machine's
//! two cores with the server, and a heavy client would understate the server.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::LazyLock;
use std::time::Duration;

use memchr::memmem::Finder;

use super::fanin::Proto;
use super::payload::{find, stamp_of};
use super::readbuf::ReadBuf;

/// Largest HTTP response head accepted during the upgrade.
const MAX_HANDSHAKE: usize = 16 * 1024;
/// Largest frame the reader accepts (the server's payload limit is 1 MiB).
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;

/// Opens a TCP connection to `addr` and upgrades it on `/ws`. Returns the stream and
/// any bytes the server sent after its 101 head.
pub fn connect(addr: &str) -> io::Result<(TcpStream, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let key = tungstenite::handshake::client::generate_key();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes())?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed during upgrade",
            ));
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > MAX_HANDSHAKE {
            return Err(io::Error::other("upgrade answer head too large"));
        }
    };
    let head = String::from_utf8_lossy(buf.get(..head_end).unwrap_or(&[])).to_string();
    let status_ok = head
        .lines()
        .next()
        .is_some_and(|l| l.split_whitespace().nth(1) == Some("101"));
    if !status_ok {
        return Err(io::Error::other(format!(
            "upgrade refused: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    let want = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let accepted = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == want
        })
    });
    if !accepted {
        return Err(io::Error::other("bad Sec-WebSocket-Accept"));
    }
    let rest = buf.split_off(head_end);
    Ok((s, rest))
}

/// Builds masked client frames. The mask key changes per frame (xorshift).
#[derive(Debug)]
pub struct Encoder {
    state: u64,
}

impl Encoder {
    pub fn new(seed: u64) -> Self {
        Encoder { state: seed | 1 }
    }

    fn next_mask(&mut self) -> [u8; 4] {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        (x as u32).to_le_bytes()
    }

    /// Appends one masked frame with opcode `op` and the given payload to `out`.
    pub fn frame(&mut self, out: &mut Vec<u8>, op: u8, payload: &[u8]) {
        out.push(0x80 | op);
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= usize::from(u16::MAX) {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let mask = self.next_mask();
        out.extend_from_slice(&mask);
        let start = out.len();
        out.extend_from_slice(payload);
        if let Some(body) = out.get_mut(start..) {
            mask_in_place(body, mask);
        }
    }

    /// Appends a masked text frame.
    pub fn text(&mut self, out: &mut Vec<u8>, payload: &[u8]) {
        self.frame(out, OP_TEXT, payload);
    }
}

/// XORs `buf` with the repeating 4-byte `mask`, eight bytes at a time.
fn mask_in_place(buf: &mut [u8], mask: [u8; 4]) {
    let m = u32::from_ne_bytes(mask);
    let wide = (u64::from(m) << 32) | u64::from(m);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let v = u64::from_ne_bytes(w) ^ wide;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask.get(i % 4).copied().unwrap_or(0);
    }
}

/// What the reader found in the bytes so far.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadState {
    Open,
    /// The server sent a close frame.
    Closed,
}

/// Incremental reader of unmasked server frames, parsing them where the socket read
/// put them ([`ReadBuf`]).
#[derive(Debug, Default)]
pub struct Reader {
    rb: ReadBuf,
    frag: Vec<u8>,
    pongs: Vec<Vec<u8>>,
}

impl Reader {
    /// Starts with bytes left over from the handshake.
    pub fn with(leftover: Vec<u8>) -> Self {
        let mut r = Reader::default();
        r.extend(&leftover);
        r
    }

    /// Appends bytes received elsewhere.
    pub fn extend(&mut self, data: &[u8]) {
        self.rb.extend(data);
    }

    /// One `read` from `s` straight into the buffer; what `read` returned.
    pub fn read_from(&mut self, s: &mut impl Read) -> io::Result<usize> {
        self.rb.read_from(s)
    }

    /// Ping payloads that are owed a pong (taken by the caller).
    pub fn take_pongs(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.pongs)
    }

    /// Hands every complete text message to `on_text`, stopping early (with the rest
    /// kept for the next call) when it returns `false`.
    pub fn drain(&mut self, mut on_text: impl FnMut(&[u8]) -> bool) -> io::Result<ReadState> {
        loop {
            let avail = self.rb.data();
            let (Some(&b0), Some(&b1)) = (avail.first(), avail.get(1)) else {
                break;
            };
            let fin = b0 & 0x80 != 0;
            let op = b0 & 0x0f;
            let masked = b1 & 0x80 != 0;
            let (len, mut hdr) = match b1 & 0x7f {
                126 => match avail.get(2..4) {
                    Some(b) => (usize::from(u16::from_be_bytes([b[0], b[1]])), 4),
                    None => break,
                },
                127 => match avail.get(2..10) {
                    Some(b) => {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(b);
                        (
                            usize::try_from(u64::from_be_bytes(a)).unwrap_or(usize::MAX),
                            10,
                        )
                    }
                    None => break,
                },
                n => (usize::from(n), 2),
            };
            if len > MAX_FRAME {
                return Err(io::Error::other("frame too large"));
            }
            let mut mask = None;
            if masked {
                match avail.get(hdr..hdr + 4) {
                    Some(m) => mask = Some([m[0], m[1], m[2], m[3]]),
                    None => break,
                }
                hdr += 4;
            }
            if avail.len() < hdr + len {
                break;
            }
            if let (Some(m), Some(body)) = (mask, self.rb.data_mut().get_mut(hdr..hdr + len)) {
                mask_in_place(body, m);
            }
            let body = self.rb.data().get(hdr..hdr + len).unwrap_or(&[]);
            let mut go_on = true;
            let mut closed = false;
            match op {
                OP_TEXT if fin => go_on = on_text(body),
                OP_TEXT => {
                    self.frag.clear();
                    self.frag.extend_from_slice(body);
                }
                OP_CONT => {
                    self.frag.extend_from_slice(body);
                    if fin {
                        let whole = std::mem::take(&mut self.frag);
                        go_on = on_text(&whole);
                    }
                }
                OP_PING => self.pongs.push(body.to_vec()),
                OP_CLOSE => closed = true,
                _ => {}
            }
            self.rb.consume(hdr + len);
            if closed {
                return Ok(ReadState::Closed);
            }
            if !go_on {
                break;
            }
        }
        Ok(ReadState::Open)
    }
}

/// Is this server frame a `MESSAGE`?
pub fn is_message(frame: &[u8]) -> bool {
    // The server writes this exact opening; anything else is looked at properly.
    frame.starts_with(br#"{"type":"MESSAGE","#) || frame_type(frame) == Some(b"MESSAGE".as_slice())
}

/// The value of the frame's `"type"` key.
pub fn frame_type(frame: &[u8]) -> Option<&[u8]> {
    static TYPE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"type\""));
    let p = TYPE_KEY.find(frame)?;
    let rest = frame.get(p + 6..)?;
    let q = rest.iter().position(|&b| b == b'"')?;
    let rest = rest.get(q + 1..)?;
    let e = rest.iter().position(|&b| b == b'"')?;
    rest.get(..e)
}

/// A pubsub exchange subscriber for the `connections` scenario.
#[derive(Debug)]
pub struct WsSub {
    pub reader: Reader,
    pub enc: Encoder,
}

impl Proto for WsSub {
    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>, on_msg: &mut dyn FnMut(u64, u64)) {
        self.reader.extend(data);
        let _ = self.reader.drain(|f| {
            if is_message(f) {
                if let Some((t, s)) = stamp_of(f) {
                    on_msg(t, s);
                }
            }
            true
        });
        for p in self.reader.take_pongs() {
            self.enc.frame(out, 0xA, &p);
        }
    }
}

/// Sends one text frame on a blocking stream.
pub fn send_text(s: &mut TcpStream, enc: &mut Encoder, text: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(text.len() + 14);
    enc.text(&mut out, text);
    s.write_all(&out)
}

/// Reads until one text frame arrives and returns it (for request/answer steps).
pub fn recv_text(s: &mut TcpStream, r: &mut Reader) -> io::Result<Vec<u8>> {
    loop {
        let mut got = None;
        if r.drain(|f| {
            got = Some(f.to_vec());
            false
        })? == ReadState::Closed
        {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "server closed",
            ));
        }
        if let Some(f) = got {
            return Ok(f);
        }
        // A small read, handed in: the connections scenario's thousands of idle
        // subscribers come through here, and a `read_from` would leave each with a
        // bulk reader's 256 KiB of room.
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed",
            ));
        }
        r.extend(chunk.get(..n).unwrap_or(&[]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_frame_decodes_back() {
        let mut enc = Encoder::new(7);
        let mut out = Vec::new();
        let body = vec![b'a'; 300];
        enc.text(&mut out, &body);
        enc.text(&mut out, b"{\"type\":\"MESSAGE\"}");
        let mut r = Reader::default();
        r.extend(&out);
        let mut got = Vec::new();
        let st = r
            .drain(|f| {
                got.push(f.to_vec());
                true
            })
            .unwrap();
        assert_eq!(st, ReadState::Open);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], body);
        assert!(is_message(&got[1]));
    }
}
