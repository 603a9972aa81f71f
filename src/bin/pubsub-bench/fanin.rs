//! Many idle subscriber sockets served by a few threads, shared by `pubsub-bench` and the
//! peer harness (`benches/peers` includes this file with `#[path]`).
//!
//! The `connections` scenario holds thousands of subscribers open; one thread per socket
//! would measure the client's scheduler, not the server. Instead each thread owns a slice
//! of nonblocking sockets, waits on them with `poll(2)`, and hands the bytes to a
//! per-connection [`Proto`] parser (WebSocket frames for pubsub, text lines for NATS).
//! Each delivery is recorded by broadcast sequence number: how many subscribers got it
//! and the latest arrival, so the caller can report the time until the last one had it.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::payload::now_ns;

/// Bytes read from one socket per `read` call.
const READ_CHUNK: usize = 64 * 1024;
/// How long one `poll` waits before the stop flag is checked again.
const POLL_TIMEOUT_MS: i32 = 20;

/// A per-connection protocol parser.
pub trait Proto: Send {
    /// Consumes bytes read from the socket. Replies owed to the server (pongs) go to
    /// `out`; each delivered payload's `(t, s)` stamp goes to `on_msg`.
    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>, on_msg: &mut dyn FnMut(u64, u64));
}

/// What one thread saw, indexed by broadcast sequence number.
#[derive(Debug, Default, Clone)]
pub struct Arrivals {
    /// Largest publish→delivery latency per sequence number, in ns.
    pub last_ns: Vec<u64>,
    /// Deliveries per sequence number.
    pub count: Vec<u64>,
    /// Deliveries in all.
    pub total: u64,
    /// Sockets the server closed during the run.
    pub closed: u64,
}

impl Arrivals {
    /// Empty arrivals for sequence numbers below `max_seq`.
    pub fn with_len(max_seq: usize) -> Self {
        Arrivals {
            last_ns: vec![0; max_seq],
            count: vec![0; max_seq],
            ..Arrivals::default()
        }
    }

    /// Records one delivery of broadcast `s` stamped `t`, seen at `now`.
    pub fn record(&mut self, t: u64, s: u64, now: u64) {
        let Ok(i) = usize::try_from(s) else { return };
        if i >= self.count.len() {
            return;
        }
        let lat = now.saturating_sub(t);
        if let (Some(c), Some(l)) = (self.count.get_mut(i), self.last_ns.get_mut(i)) {
            *c += 1;
            *l = (*l).max(lat);
        }
        self.total += 1;
    }

    /// Folds another thread's arrivals into this one.
    pub fn merge(&mut self, other: &Arrivals) {
        if self.count.len() < other.count.len() {
            self.count.resize(other.count.len(), 0);
            self.last_ns.resize(other.count.len(), 0);
        }
        for (i, (c, l)) in other.count.iter().zip(&other.last_ns).enumerate() {
            if let (Some(mc), Some(ml)) = (self.count.get_mut(i), self.last_ns.get_mut(i)) {
                *mc += c;
                *ml = (*ml).max(*l);
            }
        }
        self.total += other.total;
        self.closed += other.closed;
    }
}

/// Serves `conns` (already handshaken and subscribed) until `stop` is set or `deadline`
/// passes, recording deliveries of sequence numbers below `max_seq`.
pub fn poll_loop<P: Proto>(
    conns: &mut [(TcpStream, P)],
    stop: &AtomicBool,
    deadline: Instant,
    max_seq: usize,
) -> Arrivals {
    let mut arr = Arrivals::with_len(max_seq);
    let mut fds: Vec<libc::pollfd> = conns
        .iter()
        .map(|(s, _)| {
            let _ = s.set_nonblocking(true);
            libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }
        })
        .collect();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        // SAFETY: `fds` is a live, exclusively borrowed array of `fds.len()` pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_TIMEOUT_MS) };
        if n <= 0 {
            continue;
        }
        for (pfd, (sock, proto)) in fds.iter_mut().zip(conns.iter_mut()) {
            if pfd.revents == 0 || pfd.fd < 0 {
                continue;
            }
            pfd.revents = 0;
            loop {
                match sock.read(&mut buf) {
                    Ok(0) => {
                        pfd.fd = -1;
                        arr.closed += 1;
                        break;
                    }
                    Ok(k) => {
                        let now = now_ns();
                        let data = buf.get(..k).unwrap_or(&[]);
                        proto.feed(data, &mut out, &mut |t, s| arr.record(t, s, now));
                        if !out.is_empty() {
                            let _ = sock.set_nonblocking(false);
                            let _ = sock.write_all(&out);
                            let _ = sock.set_nonblocking(true);
                            out.clear();
                        }
                        if k < buf.len() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        pfd.fd = -1;
                        arr.closed += 1;
                        break;
                    }
                }
            }
        }
    }
    arr
}
