//! The receive buffer of the load generators' subscribers, shared by `pubsub-bench`'s
//! WebSocket reader and the peer harness's NATS parser (`benches/peers` includes this
//! file with `#[path]`), so both sides' clients do the same work per received byte.
//!
//! A socket read lands straight in the unparsed tail of the buffer: no intermediate
//! chunk, no copy per read. The buffer is zeroed once when it grows, never per read,
//! and only the unparsed remainder of a partial frame or line is moved to the front,
//! when the room behind it runs short.

use std::io::{self, Read};

/// Room a read asks for at least (so a buffer that reads starts at this size).
pub const READ_ROOM: usize = 256 * 1024;

/// Bytes received and not yet parsed: `buf[start..end]`.
#[derive(Debug, Default)]
pub struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    /// The unparsed bytes.
    pub fn data(&self) -> &[u8] {
        self.buf.get(self.start..self.end).unwrap_or(&[])
    }

    /// The unparsed bytes, writable (a WebSocket reader unmasks in place; the NATS
    /// parser has no use for it).
    #[allow(dead_code)]
    pub fn data_mut(&mut self) -> &mut [u8] {
        self.buf.get_mut(self.start..self.end).unwrap_or(&mut [])
    }

    /// Marks the first `n` unparsed bytes as parsed.
    pub fn consume(&mut self, n: usize) {
        self.start = self.start.saturating_add(n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Appends bytes that were received elsewhere (a handshake's leftover, a poller's read).
    pub fn extend(&mut self, data: &[u8]) {
        self.make_room(data.len());
        if let Some(dst) = self.buf.get_mut(self.end..self.end + data.len()) {
            dst.copy_from_slice(data);
            self.end += data.len();
        }
    }

    /// One `read` from `r` into the room behind the unparsed bytes; what `read` returned.
    pub fn read_from(&mut self, r: &mut impl Read) -> io::Result<usize> {
        self.make_room(READ_ROOM);
        let room = self.buf.get_mut(self.end..).unwrap_or(&mut []);
        let n = r.read(room)?;
        self.end = (self.end + n).min(self.buf.len());
        Ok(n)
    }

    /// Makes at least `want` bytes of room behind the unparsed ones: moves those to the
    /// front if that is enough, else grows the buffer.
    fn make_room(&mut self, want: usize) {
        if self.buf.len() - self.end >= want {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < want {
            // Only reads ask for READ_ROOM; bytes handed in by a poller serving
            // thousands of idle connections grow the buffer to what they need.
            let len = (self.end + want).max(self.buf.len() * 2);
            self.buf.resize(len, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_land_behind_what_is_unparsed_and_partials_move_to_the_front() {
        let mut b = ReadBuf::default();
        b.extend(b"hello ");
        let mut src: &[u8] = b"world";
        assert_eq!(b.read_from(&mut src).unwrap(), 5);
        assert_eq!(b.data(), b"hello world");
        b.consume(6);
        assert_eq!(b.data(), b"world");
        // Filling the room forces the partial "world" to the front, then a grow.
        let big = vec![b'x'; READ_ROOM * 2];
        b.extend(&big);
        assert_eq!(b.data().len(), 5 + big.len());
        assert!(b.data().starts_with(b"worldxx"));
        b.consume(usize::MAX);
        assert!(b.data().is_empty());
        // Bytes handed in take only the room they need (idle connections in a poller).
        let mut small = ReadBuf::default();
        small.extend(b"MSG x 1 2\r\nab\r\n");
        assert!(small.buf.len() < 64, "grew to {}", small.buf.len());
        let mut empty: &[u8] = b"";
        assert_eq!(b.read_from(&mut empty).unwrap(), 0);
        assert!(b.data().is_empty());
    }
}
