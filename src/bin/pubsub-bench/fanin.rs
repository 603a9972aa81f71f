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
/// How long one `epoll_wait` waits before the stop flag is checked again.
const POLL_TIMEOUT_MS: i32 = 20;
/// Ready events taken per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 1024;

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
    // SAFETY: epoll_create1 takes a flags integer and returns a new descriptor or -1.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        arr.closed = conns.len() as u64;
        return arr;
    }
    let mut open = vec![true; conns.len()];
    for (i, (s, _)) in conns.iter().enumerate() {
        let _ = s.set_nonblocking(true);
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: `ep` is our epoll descriptor, the fd is owned by a live TcpStream and
        // `ev` is a valid event struct for the duration of the call.
        let rc = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) };
        if rc != 0 {
            if let Some(o) = open.get_mut(i) {
                *o = false;
            }
            arr.closed += 1;
        }
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
    let mut buf = vec![0u8; READ_CHUNK];
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        // SAFETY: `events` is a live buffer of EVENTS_PER_WAIT entries that the kernel fills.
        let n = unsafe {
            libc::epoll_wait(
                ep,
                events.as_mut_ptr(),
                EVENTS_PER_WAIT as i32,
                POLL_TIMEOUT_MS,
            )
        };
        let ready = usize::try_from(n).unwrap_or(0);
        for ev in events.iter().take(ready) {
            let Ok(i) = usize::try_from(ev.u64) else {
                continue;
            };
            let (Some((sock, proto)), Some(is_open)) = (conns.get_mut(i), open.get_mut(i)) else {
                continue;
            };
            if !*is_open {
                continue;
            }
            loop {
                match sock.read(&mut buf) {
                    Ok(0) => {
                        *is_open = false;
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
                        *is_open = false;
                        break;
                    }
                }
            }
            if !*is_open {
                arr.closed += 1;
                // SAFETY: removing a registered fd from our epoll set; the event pointer
                // may be null for EPOLL_CTL_DEL on Linux ≥ 2.6.9.
                unsafe {
                    libc::epoll_ctl(
                        ep,
                        libc::EPOLL_CTL_DEL,
                        sock.as_raw_fd(),
                        std::ptr::null_mut(),
                    );
                }
            }
        }
    }
    // SAFETY: `ep` is the epoll descriptor created above and closed exactly once here.
    unsafe {
        libc::close(ep);
    }
    arr
}
