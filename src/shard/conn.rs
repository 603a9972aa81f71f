//! One client connection: buffers plus an explicit protocol state.
//!
//! A connection starts as HTTP/1.1 ([`crate::http`] parses request heads out of the
//! read buffer, pipelined requests are answered in order) and may upgrade to
//! WebSocket on `GET /ws` ([`crate::ws`] decodes frames from the same buffer). Both
//! turn what they read into [`Command`]s for the shard. One task drives the socket:
//! it reads many frames per read and writes many frames per write, and wakes for
//! three reasons only: bytes to read, room to write, or events from the shard
//! (deliveries, confirms, cancellations) in the connection's mailbox.
//!
//! A subscriber's messages wait in its queue, not here: the queue hands a
//! subscription at most its window (prefetch, or [`crate::queue::AUTO_ACK_WINDOW`])
//! and the window only reopens as frames leave the write buffer for the socket.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

use crate::command::{self, AckMode, Command, CommandError, SubscribeTarget, Unsubscribe};
use crate::http::{self, Request};
use crate::message::now_ms;
use crate::queue::ConsumerId;
use crate::routing::QueueHandle;
use crate::ws;

use super::flow::{FlowGate, FLOW_POLL};
use super::{BrokerError, ConnEvent, ConnInbox, Homes, Shard, ShardMsg};

/// Bytes asked of the socket per read at first; doubled while reads fill it.
const MIN_READ_CHUNK: usize = 4 * 1024;
/// Largest read.
const MAX_READ_CHUNK: usize = 64 * 1024;
/// An empty write buffer up to this size is kept for the next write; a larger one is
/// given back, so a quiet subscriber costs what its usual batch needs, not the
/// high-water mark of its busiest moment. (Kept this large so a subscriber writing
/// batches of a few KiB does not reallocate and regrow its buffer for every batch.)
const IDLE_WRITE_KEEP: usize = 16 * 1024;
/// An empty read buffer up to this size is kept: typically the tail of the last read's
/// allocation, which the frames split from it share anyway. Reads into an empty
/// buffer go through the shard's scratch buffer and allocate only what arrived.
const IDLE_READ_KEEP: usize = 16 * 1024;
/// Past this much unwritten output, stop reading requests (the client must read).
const WRITE_HIGH_WATER: usize = 1024 * 1024;
/// Most subscriptions one WebSocket connection may hold (each may own a queue).
const MAX_SUBSCRIPTIONS: usize = 1024;
/// Room for the JSON around a payload in a request body or frame.
const ENVELOPE_ALLOWANCE: usize = 64 * 1024;

/// A round of reads that decoded at least this many `PUBLISH` frames found a backlog:
/// the client writes faster than this shard takes its frames.
const BUSY_ROUND_PUBLISHES: u32 = 64;
/// After this many such rounds in a row, a publisher is worth moving to a less
/// loaded shard ([`Conn::publisher_movable`]). A burst does not move anybody.
const BUSY_ROUNDS: u8 = 8;

/// How long a connection waits before looking again at a backed-up shard.
const CONGESTION_PAUSE: Duration = Duration::from_micros(200);
const CONSOLE_HTML: &str = include_str!("console.html");

enum Proto {
    Http,
    Ws(Box<WsState>),
}

struct Sub {
    n: u64,
    id_json: Bytes,
    queue: Arc<QueueHandle>,
    mode: AckMode,
    /// The constant middle of this subscription's `MESSAGE` frames:
    /// `,"subscription":<id>,"queue":<name>,"exchange":`, built once.
    frame_mid: Bytes,
}

#[derive(Clone, Copy)]
struct TagSlot {
    sub: u64,
    queue: u64,
    home: usize,
    dseq: u64,
}

struct WsState {
    decoder: ws::Decoder,
    subs: Vec<Sub>,
    next_sub: u64,
    next_tag: u64,
    /// Outstanding manual-ack deliveries by tag (`tag_base` is the front's tag).
    tags: VecDeque<Option<TagSlot>>,
    tag_base: u64,
    /// Auto-ack deliveries in the write buffer: (end offset in bytes ever buffered, sub, queue, home).
    marks: VecDeque<(u64, u64, u64, usize)>,
    closing: bool,
    /// When the server pinged an idle client (ms since the epoch), if it did.
    pinged_at: Option<u64>,
    /// `PUBLISH` frames taken in the current round of reads.
    round_publishes: u32,
    /// Consecutive rounds that found a backlog of publishes.
    busy_rounds: u8,
    /// Where the current round's publishes went.
    round_homes: Homes,
    /// The first round of publishes has been looked at ([`Conn::note_round`]).
    placed: bool,
}

/// Serves one accepted connection until it closes (or moves to another shard).
pub async fn serve(shard: Rc<Shard>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (id, inbox) = shard.register_conn();
    let over_limit =
        shard.shared.metrics.connections() > shard.shared.config.max_connections as i64;
    let mut c = Conn::new(shard.clone(), stream, id, inbox);
    if over_limit {
        c.http_error(
            503,
            "too_many_connections",
            "connection limit reached",
            false,
        );
        let _ = c.flush_all().await;
        c.finish();
        shard.unregister_conn(id);
        return;
    }
    drive(c).await;
}

/// A WebSocket connection moving to another shard: its socket (a duplicate of the
/// descriptor, so closing the old executor's handle does not close the connection),
/// its buffers and protocol state, and the `SUBSCRIBE` that made it move, if one did,
/// which the new shard carries out first (a busy publisher moved to balance the
/// shards brings none). glommio reads by readiness (a `recv` into our buffer,
/// else a poll), so no bytes are in flight in the old executor when it lets go.
pub struct Handoff {
    fd: OwnedFd,
    rbuf: BytesMut,
    wbuf: BytesMut,
    ws: Box<WsState>,
    subscribe: Option<command::Subscribe>,
    read_chunk: usize,
    written_total: u64,
    last_rx: u64,
}

/// The outcome of a glommio read into `tmp` (the shard's scratch, or a one-byte
/// probe), its bytes appended to `rbuf`; `None` while nothing has arrived.
fn appended(
    r: Poll<io::Result<usize>>,
    tmp: &[u8],
    rbuf: &mut BytesMut,
) -> Option<io::Result<usize>> {
    match r {
        Poll::Pending => None,
        Poll::Ready(Ok(n)) => {
            rbuf.extend_from_slice(tmp.get(..n).unwrap_or(&[]));
            Some(Ok(n))
        }
        Poll::Ready(Err(e)) => Some(Err(e)),
    }
}

/// Reads what `fd` holds, up to `max` (> 0) bytes, into `buf`'s spare capacity
/// (made room for here) without initialising it first: a non-blocking `recv` whose
/// bytes extend `buf`. `Ok(0)` is the end of the stream; `WouldBlock` when nothing is
/// there yet.
fn recv_into_spare(fd: std::os::fd::RawFd, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
    debug_assert!(
        max > 0,
        "a zero-byte read would read as the end of the stream"
    );
    buf.reserve(max);
    let spare = buf.spare_capacity_mut();
    let want = spare.len().min(max);
    // SAFETY: `spare` is memory `buf` owns past its length, at least `want` bytes long;
    // `recv` writes at most `want` bytes there through the raw pointer and nothing
    // reads that memory before `set_len` below covers exactly what was written.
    let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), want, libc::MSG_DONTWAIT) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    let n = n.min(want);
    // SAFETY: `recv` initialised the first `n` (≤ `want` ≤ spare capacity) bytes
    // after `buf`'s length.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Takes over a connection handed off by another shard.
pub async fn adopt(shard: Rc<Shard>, h: Handoff) {
    // SAFETY: `into_raw_fd` hands us sole ownership of an open socket descriptor (the
    // duplicate made for this hand-off); the stream takes it over and closes it once.
    let stream = unsafe { TcpStream::from_raw_fd(h.fd.into_raw_fd()) };
    let (id, inbox) = shard.register_conn();
    inbox.last_rx.set(h.last_rx);
    let mut c = Conn::new(shard, stream, id, inbox);
    c.buffered_total = h.written_total + h.wbuf.len() as u64;
    c.written_total = h.written_total;
    c.rbuf = h.rbuf;
    c.wbuf = h.wbuf;
    c.read_chunk = h.read_chunk;
    c.proto = Proto::Ws(h.ws);
    c.count_websocket(1);
    if let Some(s) = h.subscribe {
        c.ws_subscribe(s);
    }
    drive(c).await;
}

/// Runs a connection to its end: it closes, fails, or moves to another shard.
async fn drive(mut c: Conn) {
    let shard = c.shard.clone();
    let id = c.id;
    loop {
        if let Err(e) = c.run().await {
            tracing::debug!(conn = id, error = %e, "connection ended");
            break;
        }
        let Some((target, subscribe)) = c.handoff.take() else {
            break;
        };
        match c.hand_off(subscribe) {
            Ok(h) => {
                shard.unregister_conn(id);
                shard.send(target, ShardMsg::Adopt(Box::new(h)));
                return;
            }
            Err((e, subscribe)) => {
                // Could not duplicate the socket: stay, and subscribe here instead.
                tracing::debug!(conn = id, error = %e, "connection stays on its shard");
                if let Some(s) = subscribe {
                    c.ws_subscribe(s);
                }
            }
        }
    }
    c.finish();
    shard.unregister_conn(id);
}

struct Conn {
    shard: Rc<Shard>,
    stream: TcpStream,
    id: u64,
    inbox: Rc<ConnInbox>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Bytes asked of the next read.
    read_chunk: usize,
    /// The last read filled all it asked for: the client is ahead of us.
    read_full: bool,
    /// Whether the last wait wrote to the socket: a busy connection keeps its write
    /// buffer between batches (see [`Conn::trim_buffers`]).
    wrote_last: bool,
    proto: Proto,
    buffered_total: u64,
    written_total: u64,
    close_after_flush: bool,
    /// `100 Continue` already sent for the request being read.
    continue_sent: bool,
    shard_header: String,
    /// Publisher flow control ([`super::flow`]).
    flow: FlowGate,
    /// A move to another shard, decided by a `SUBSCRIBE` (shard, that subscribe) or
    /// by [`Conn::note_round`] for a publisher (shard, none).
    handoff: Option<(usize, Option<command::Subscribe>)>,
}

enum Wake {
    Read,
    Eof,
    Wrote,
    Event,
    /// Time to look at the queue that paused this publisher.
    Flow,
}

impl Conn {
    /// A fresh HTTP connection registered as `id` on `shard`.
    fn new(shard: Rc<Shard>, stream: TcpStream, id: u64, inbox: Rc<ConnInbox>) -> Self {
        let shard_header = shard.id.to_string();
        Conn {
            shard,
            stream,
            id,
            inbox,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            read_chunk: MIN_READ_CHUNK,
            read_full: false,
            wrote_last: false,
            proto: Proto::Http,
            buffered_total: 0,
            written_total: 0,
            close_after_flush: false,
            continue_sent: false,
            shard_header,
            flow: FlowGate::Open,
            handoff: None,
        }
    }

    fn max_payload(&self) -> usize {
        self.shard.shared.config.max_payload
    }

    async fn run(&mut self) -> io::Result<()> {
        loop {
            // A socket that always has more bytes makes `wait` ready at once, so this
            // loop would never hand the executor back: the shard's other connections,
            // its accept loop and its timers would stop (`tests/shard_fairness.rs`).
            // Flow control paces publishers only into consumed queues. The shard's
            // preemption timer ([`super::PREEMPT_SLICE`]) bounds how long one
            // connection keeps the shard.
            glommio::yield_if_needed().await;
            match self.proto {
                // Boxed: request handling awaits topology commits and confirms, and
                // those futures would otherwise sit inline in every connection's task,
                // WebSocket subscribers included (2 KiB each instead of a few hundred
                // bytes). One allocation per batch of requests read.
                Proto::Http => Box::pin(self.process_http()).await,
                Proto::Ws(_) => self.process_ws(),
            }
            if self.handoff.is_some() {
                return Ok(());
            }
            self.process_events();
            if self.flow.engaged() {
                self.flow.check(Instant::now());
            }
            self.check_idle();
            self.trim_buffers();
            if self.close_after_flush && self.wbuf.is_empty() {
                return Ok(());
            }
            // Durable or cross-shard work backed up: stop taking more until it drains.
            while self.shard.congested() {
                glommio::timer::sleep(CONGESTION_PAUSE).await;
            }
            match self.wait().await? {
                Wake::Eof => return Ok(()),
                Wake::Read | Wake::Wrote | Wake::Event | Wake::Flow => {}
            }
        }
    }

    /// Waits for bytes to read, progress writing, or mailbox events.
    async fn wait(&mut self) -> io::Result<Wake> {
        let chunk = self.read_chunk;
        let mut read_n = 0usize;
        let Conn {
            shard,
            stream,
            rbuf,
            wbuf,
            inbox,
            ..
        } = self;
        let paused = self.flow.paused();
        let reading = wbuf.len() < WRITE_HIGH_WATER && !self.close_after_flush && !paused;
        let mut flow_timer = paused.then(|| glommio::timer::Timer::new(FLOW_POLL));
        let mut wrote = 0usize;
        let wake = poll_fn(|cx| {
            while !wbuf.is_empty() {
                match Pin::new(&mut *stream).poll_write(cx, wbuf) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        wbuf.advance(n);
                        wrote += n;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            if wrote > 0 {
                return Poll::Ready(Ok(Wake::Wrote));
            }
            if inbox.signal.poll_take(cx) {
                return Poll::Ready(Ok(Wake::Event));
            }
            if let Some(t) = flow_timer.as_mut() {
                if Pin::new(t).poll(cx).is_ready() {
                    return Poll::Ready(Ok(Wake::Flow));
                }
            }
            let got = if reading && rbuf.is_empty() {
                // Nothing buffered: read into the shard's scratch and keep only the bytes
                // that arrived (no buffer held while idle, no zero-filling per poll).
                let mut scratch = shard.read_scratch(chunk);
                let r = match scratch.get_mut(..chunk) {
                    Some(spare) => Pin::new(&mut *stream).poll_read(cx, spare),
                    None => Poll::Ready(Ok(0)),
                };
                appended(r, &scratch, rbuf)
            } else if reading {
                // A partial frame or request is buffered: read on after it, into the
                // buffer's spare room as it is (no zero-filling a chunk per read).
                match recv_into_spare(stream.as_raw_fd(), rbuf, chunk) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Nothing yet: glommio's read arms the readiness poll that wakes
                        // us. Its one-byte buffer also takes a byte that arrived since.
                        let mut probe = [0u8; 1];
                        let r = Pin::new(&mut *stream).poll_read(cx, &mut probe);
                        appended(r, &probe, rbuf)
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                        cx.waker().wake_by_ref();
                        None
                    }
                    done => Some(done),
                }
            } else {
                None
            };
            if let Some(done) = got {
                return Poll::Ready(done.map(|n| {
                    read_n = n;
                    if n == 0 {
                        Wake::Eof
                    } else {
                        Wake::Read
                    }
                }));
            }
            Poll::Pending
        })
        .await?;
        self.wrote_last = wrote > 0;
        if wrote > 0 {
            self.written_total += wrote as u64;
            self.after_write();
        }
        if matches!(wake, Wake::Read) {
            self.inbox.last_rx.set(now_ms());
            self.read_full = read_n >= chunk;
            // A full read asks for more next time; a small one goes back to small.
            if read_n >= chunk && chunk < MAX_READ_CHUNK {
                self.read_chunk = chunk * 2;
            } else if read_n < chunk / 4 {
                self.read_chunk = MIN_READ_CHUNK;
            }
        }
        Ok(wake)
    }

    /// A publish went to `queue`, which asks its publishers to pause.
    fn flow_hint(&mut self, queue: Option<Arc<QueueHandle>>) {
        if let Some(q) = queue {
            if self.flow.hint(q, Instant::now()) {
                crate::metrics::bump(&self.shard.counters().flow_pauses, 1);
            }
        }
    }

    /// Gives back large buffers once they are empty. A write buffer that just drained
    /// is kept for one more round: a subscriber under load drains its buffer with every
    /// write and fills it again from the next batch of deliveries, and giving it back
    /// each time regrew it by doubling, with a fresh (page-faulted, zeroed) allocation
    /// for every large batch. It goes once a round finds it empty without having
    /// written, i.e. when deliveries pause.
    fn trim_buffers(&mut self) {
        if self.rbuf.is_empty() && self.rbuf.capacity() > IDLE_READ_KEEP {
            self.rbuf = BytesMut::new();
        }
        if self.wbuf.is_empty() && self.wbuf.capacity() > IDLE_WRITE_KEEP && !self.wrote_last {
            self.wbuf = BytesMut::new();
        }
    }

    async fn flush_all(&mut self) -> io::Result<()> {
        while !self.wbuf.is_empty() {
            let n = futures_lite::AsyncWriteExt::write(&mut self.stream, &self.wbuf).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.wbuf.advance(n);
            self.written_total += n as u64;
        }
        self.after_write();
        Ok(())
    }

    fn note_buffered(&mut self) {
        self.buffered_total = self.written_total + self.wbuf.len() as u64;
    }

    /// Auto-ack deliveries whose frames reached the socket settle now.
    fn after_write(&mut self) {
        let Proto::Ws(ws) = &mut self.proto else {
            return;
        };
        let mut batch: Option<(u64, u64, usize, usize)> = None;
        let mut delivered = 0u64;
        while let Some(&(end, sub, queue, home)) = ws.marks.front() {
            if end > self.written_total {
                break;
            }
            ws.marks.pop_front();
            delivered += 1;
            match &mut batch {
                Some((s, q, _, n)) if *s == sub && *q == queue => *n += 1,
                _ => {
                    if let Some((s, q, h, n)) = batch.take() {
                        self.shard.settle(
                            h,
                            ShardMsg::Written {
                                queue: q,
                                id: cid(&self.shard, self.id, s),
                                n,
                            },
                        );
                    }
                    batch = Some((sub, queue, home, 1));
                }
            }
        }
        if let Some((s, q, h, n)) = batch {
            self.shard.settle(
                h,
                ShardMsg::Written {
                    queue: q,
                    id: cid(&self.shard, self.id, s),
                    n,
                },
            );
        }
        if delivered > 0 {
            crate::metrics::bump(&self.shard.counters().delivered, delivered);
        }
    }

    // ---------------------------------------------------------------- HTTP

    fn http_limits(&self) -> http::Limits {
        http::Limits {
            max_head: self.shard.shared.config.max_head,
            max_body: self.max_payload() + ENVELOPE_ALLOWANCE,
        }
    }

    async fn process_http(&mut self) {
        let limits = self.http_limits();
        while matches!(self.proto, Proto::Http) && !self.close_after_flush {
            match http::parse_request(&mut self.rbuf, &limits) {
                Ok(None) => {
                    if !self.continue_sent && http::needs_continue(&self.rbuf, &limits) {
                        http::write_continue(&mut self.wbuf);
                        self.continue_sent = true;
                    }
                    break;
                }
                Ok(Some(req)) => {
                    self.continue_sent = false;
                    self.handle_request(req).await
                }
                Err(e) => {
                    let msg = e.to_string();
                    self.http_error(e.status(), e.code(), &msg, false);
                    self.close_after_flush = true;
                }
            }
        }
        self.note_buffered();
    }

    fn http_response(
        &mut self,
        status: u16,
        content_type: Option<&str>,
        body: &[u8],
        keep_alive: bool,
    ) {
        let shard = self.shard_header.clone();
        http::write_response(
            &mut self.wbuf,
            status,
            content_type,
            &[("x-pubsub-shard", &shard)],
            body,
            keep_alive,
        );
        if !keep_alive {
            self.close_after_flush = true;
        }
    }

    fn http_json(&mut self, status: u16, body: &[u8], keep_alive: bool) {
        self.http_response(status, Some("application/json"), body, keep_alive);
    }

    fn http_error(&mut self, status: u16, code: &str, message: &str, keep_alive: bool) {
        let body = error_body(code, message);
        self.http_json(status, &body, keep_alive);
    }

    async fn handle_request(&mut self, req: Request) {
        let keep = req.keep_alive;
        let segments: Result<Vec<String>, _> = req
            .path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(http::percent_decode)
            .collect();
        let segments = match segments {
            Ok(s) => s,
            Err(e) => return self.http_error(e.status(), e.code(), &e.to_string(), keep),
        };
        let method = req.method.as_str();
        if segments.len() == 1 && segments.first().is_some_and(|s| s == "ws") && method == "GET" {
            return self.upgrade(&req);
        }
        let cmd = match command::decode_http(method, &segments, &req.body, self.max_payload()) {
            Ok(c) => c,
            Err(e) => return self.command_error(&e, keep),
        };
        self.execute_http(cmd, keep).await;
    }

    fn command_error(&mut self, e: &CommandError, keep: bool) {
        self.http_error(e.status(), e.code(), &e.to_string(), keep);
    }

    fn broker_error(&mut self, e: &BrokerError, keep: bool) {
        self.http_error(e.status(), e.code(), &e.to_string(), keep);
    }

    fn created(&mut self, created: bool, body: &[u8], keep: bool) {
        self.http_json(if created { 201 } else { 200 }, body, keep);
    }

    async fn execute_http(&mut self, cmd: Command, keep: bool) {
        let shard = self.shard.clone();
        match cmd {
            Command::Console => self.http_response(
                200,
                Some("text/html; charset=utf-8"),
                CONSOLE_HTML.as_bytes(),
                keep,
            ),
            Command::Health => self.http_json(200, br#"{"status":"ok"}"#, keep),
            Command::Metrics => {
                let text = shard.render_metrics();
                self.http_response(
                    200,
                    Some("text/plain; version=0.0.4"),
                    text.as_bytes(),
                    keep,
                );
            }
            Command::DeclareExchange(d) => match shard.declare_exchange(&d).await {
                Ok(created) => {
                    let body = serde_json::json!({"name": d.name, "type": d.kind.as_str(), "durable": d.durable});
                    self.created(created, body.to_string().as_bytes(), keep);
                }
                Err(e) => self.broker_error(&e, keep),
            },
            Command::ListExchanges => {
                let body = shard.list_exchanges();
                self.http_json(200, body.as_bytes(), keep);
            }
            Command::GetExchange(name) => match shard.exchange_json(&name) {
                Some(body) => self.http_json(200, body.as_bytes(), keep),
                None => self.http_error(
                    404,
                    "not_found",
                    &format!("exchange {name:?} not found"),
                    keep,
                ),
            },
            Command::DeleteExchange(name) => match shard.delete_exchange(&name).await {
                Ok(()) => self.http_response(204, None, b"", keep),
                Err(e) => self.broker_error(&e, keep),
            },
            Command::DeclareQueue(d) => match shard.declare_queue(&d).await {
                Ok(created) => {
                    let body = shard.queue_json(&d.name).unwrap_or_default();
                    self.created(created, body.as_bytes(), keep);
                }
                Err(e) => self.broker_error(&e, keep),
            },
            Command::ListQueues => {
                let body = shard.list_queues();
                self.http_json(200, body.as_bytes(), keep);
            }
            Command::GetQueue(name) => match shard.queue_json(&name) {
                Some(body) => self.http_json(200, body.as_bytes(), keep),
                None => {
                    self.http_error(404, "not_found", &format!("queue {name:?} not found"), keep)
                }
            },
            Command::DeleteQueue(name) => match shard.delete_queue(&name).await {
                Ok(()) => self.http_response(204, None, b"", keep),
                Err(e) => self.broker_error(&e, keep),
            },
            Command::PurgeQueue(name) => match shard.purge(&name).await {
                Ok(n) => self.http_json(200, format!(r#"{{"purged":{n}}}"#).as_bytes(), keep),
                Err(e) => self.broker_error(&e, keep),
            },
            Command::Bind(d) => match shard.bind(&d).await {
                Ok(created) => {
                    let body = serde_json::json!({"exchange_name": d.exchange, "queue_name": d.queue, "key": d.key});
                    self.created(created, body.to_string().as_bytes(), keep);
                }
                Err(e) => self.broker_error(&e, keep),
            },
            Command::ListBindings => {
                let body = shard.list_bindings();
                self.http_json(200, body.as_bytes(), keep);
            }
            Command::Unbind(d) => match shard.unbind(&d).await {
                Ok(()) => self.http_response(204, None, b"", keep),
                Err(e) => self.broker_error(&e, keep),
            },
            Command::Publish(p) => {
                let confirm = p.confirm;
                match shard.publish(p, now_ms(), None) {
                    Ok(published) => {
                        self.flow_hint(published.flow);
                        let mut ok = true;
                        if confirm {
                            if let Some(rx) = published.confirm {
                                ok = rx.await.unwrap_or(false);
                            }
                        }
                        if ok {
                            let body = format!(
                                r#"{{"id":"{}","routed":{}}}"#,
                                published.id.as_str(),
                                published.routed
                            );
                            self.http_json(200, body.as_bytes(), keep);
                        } else {
                            self.http_error(503, "store_unavailable", "the durable store could not write the message; it was not confirmed", keep);
                        }
                    }
                    Err(e) => self.broker_error(&e, keep),
                }
            }
            Command::Subscribe(_)
            | Command::Unsubscribe(_)
            | Command::Ack { .. }
            | Command::Nack { .. } => {
                self.http_error(400, "bad_request", "only over WebSocket", keep)
            }
        }
    }

    fn upgrade(&mut self, req: &Request) {
        match ws::accept(req) {
            Ok(key) => {
                let shard = self.shard_header.clone();
                ws::write_101(&mut self.wbuf, &key, &[("x-pubsub-shard", &shard)]);
                self.count_websocket(1);
                self.note_buffered();
                self.proto = Proto::Ws(Box::new(WsState {
                    decoder: ws::Decoder::new(self.max_payload() + ENVELOPE_ALLOWANCE),
                    subs: Vec::new(),
                    next_sub: 1,
                    next_tag: 1,
                    tags: VecDeque::new(),
                    tag_base: 1,
                    marks: VecDeque::new(),
                    closing: false,
                    pinged_at: None,
                    round_publishes: 0,
                    busy_rounds: 0,
                    round_homes: Homes::None,
                    placed: false,
                }));
            }
            Err(e) => {
                let msg = e.to_string();
                self.http_error(
                    400,
                    "bad_request",
                    &format!("not a WebSocket upgrade: {msg}"),
                    req.keep_alive,
                );
            }
        }
    }

    // ---------------------------------------------------------------- WebSocket

    fn process_ws(&mut self) {
        let _batch = self.shard.batch();
        let now = now_ms();
        loop {
            let Proto::Ws(ws) = &mut self.proto else {
                return;
            };
            if ws.closing {
                self.rbuf.clear();
                break;
            }
            if self.handoff.is_some() {
                // The rest of the buffer is the new shard's to decode.
                break;
            }
            match ws.decoder.decode(&mut self.rbuf) {
                Ok(None) => break,
                Ok(Some(ws::Event::Text(frame))) => self.ws_text(frame, now),
                Ok(Some(ws::Event::Binary(_))) => self.ws_error(
                    None,
                    "bad_request",
                    "binary frames are not supported: send JSON text frames",
                    &[],
                ),
                Ok(Some(ws::Event::Ping(p))) => ws::write_pong(&mut self.wbuf, &p),
                Ok(Some(ws::Event::Pong(_))) => {}
                Ok(Some(ws::Event::Close(_))) => {
                    ws::write_close(&mut self.wbuf, 1000, "");
                    self.ws_closing();
                }
                Err(e) => {
                    ws::write_close(&mut self.wbuf, e.close_code(), &e.to_string());
                    self.ws_closing();
                }
            }
        }
        self.note_buffered();
        self.note_round();
    }

    /// Ends a round of reads: counts a round that found a backlog of publishes, and
    /// after [`BUSY_ROUNDS`] of them asks whether the connection should move.
    fn note_round(&mut self) {
        let Proto::Ws(ws) = &mut self.proto else {
            return;
        };
        let busy = ws.round_publishes >= BUSY_ROUND_PUBLISHES;
        // A read that filled all it asked for means the client is ahead of us: not a
        // light publisher, whatever this round held.
        let first_light = !ws.placed && ws.round_publishes > 0 && !busy && !self.read_full;
        ws.placed |= ws.round_publishes > 0;
        let homes = std::mem::take(&mut ws.round_homes);
        ws.round_publishes = 0;
        ws.busy_rounds = if busy {
            ws.busy_rounds.saturating_add(1)
        } else {
            0
        };
        let overdue = ws.busy_rounds >= BUSY_ROUNDS;
        if overdue {
            ws.busy_rounds = 0;
        }
        if self.handoff.is_some() || !(first_light || overdue) || !self.publisher_movable() {
            return;
        }
        let target = match homes {
            // Join the one shard its queues live on.
            Homes::One(home) if first_light => (home != self.shard.id).then_some(home),
            _ if overdue => self.shard.shared.metrics.emptier_shard(self.shard.id),
            _ => None,
        };
        if let Some(t) = target {
            tracing::debug!(
                conn = self.id,
                from = self.shard.id,
                to = t,
                busy = overdue,
                "publisher moves"
            );
        }
        self.handoff = target.map(|t| (t, None));
    }

    /// Whether a connection that only publishes may be placed now: placement is on,
    /// no flow-control pause holds it, and nothing of this shard's is in flight for it.
    ///
    /// Two moves use it. After its first round of publishes, a light publisher whose
    /// queues all live on one other shard moves there: its messages then go from its
    /// socket to its consumers' sockets on one executor, with no hop (and no wake-up
    /// of a parked executor) in between, which at light load is most of the latency a
    /// shard adds. After [`BUSY_ROUNDS`] rounds in a row that found a backlog, a
    /// publisher moves to a shard serving at least two WebSocket connections fewer
    /// ([`crate::metrics::Metrics::emptier_shard`]: the move evens the load rather
    /// than swapping it, so nothing moves back and forth), and publishing and
    /// delivering run on two cores instead of one.
    ///
    /// A publisher's messages go straight into their queues' inboxes, which keep
    /// order whichever thread pushes, so a move never reorders what it published.
    fn publisher_movable(&self) -> bool {
        self.shard.shared.config.place_publishers && !self.flow.engaged() && self.movable()
    }

    /// True for a WebSocket connection with nothing of this shard's in flight for it
    /// (no subscriptions, unacked tags, pending events or confirms) that is not closing:
    /// one that can move to another shard.
    fn movable(&self) -> bool {
        let Proto::Ws(ws) = &self.proto else {
            return false;
        };
        let idle = ws.subs.is_empty() && ws.tags.is_empty() && ws.marks.is_empty();
        idle && !ws.closing
            && !self.close_after_flush
            && self.inbox.events.borrow().is_empty()
            && !self.shard.confirms_pending_for(self.id)
    }

    /// Pings a WebSocket client that has been silent for the idle interval, and closes
    /// one that stayed silent for another interval after the ping.
    fn check_idle(&mut self) {
        let idle_ms = self
            .shard
            .shared
            .config
            .ws_idle_secs
            .saturating_mul(1000)
            .max(1000);
        let last = self.inbox.last_rx.get();
        let now = now_ms();
        let Proto::Ws(ws) = &mut self.proto else {
            return;
        };
        if ws.closing {
            return;
        }
        match ws.pinged_at {
            Some(_) if last > now.saturating_sub(idle_ms) => ws.pinged_at = None,
            Some(at) if now.saturating_sub(at) >= idle_ms => {
                ws::write_close(&mut self.wbuf, 1001, "idle timeout");
                self.ws_closing();
                self.note_buffered();
            }
            Some(_) => {}
            None if now.saturating_sub(last) >= idle_ms => {
                ws.pinged_at = Some(now);
                ws::write_ping(&mut self.wbuf, b"pubsub");
                self.note_buffered();
            }
            None => {}
        }
    }

    fn ws_closing(&mut self) {
        if let Proto::Ws(ws) = &mut self.proto {
            ws.closing = true;
        }
        self.close_after_flush = true;
    }

    fn ws_error(
        &mut self,
        reference: Option<&[u8]>,
        code: &str,
        message: &str,
        extra: &[(&str, &[u8])],
    ) {
        let mut out = Vec::with_capacity(96 + message.len());
        out.extend_from_slice(br#"{"type":"ERROR","code":"#);
        http::json::write_escaped_str(&mut out, code);
        out.extend_from_slice(br#","message":"#);
        http::json::write_escaped_str(&mut out, message);
        if let Some(r) = reference {
            out.extend_from_slice(br#","ref":"#);
            out.extend_from_slice(r);
        }
        for (k, v) in extra {
            out.push(b',');
            http::json::write_escaped_str(&mut out, k);
            out.push(b':');
            out.extend_from_slice(v);
        }
        out.push(b'}');
        ws::write_text(&mut self.wbuf, &out);
    }

    fn ws_text(&mut self, frame: ws::Utf8Bytes, now: u64) {
        let cmd = match command::decode_frame(frame, self.max_payload()) {
            Ok(c) => c,
            Err((e, frame)) => {
                let reference = command::salvage_ref(frame.as_bytes());
                return self.ws_error(reference.as_deref(), e.code(), &e.to_string(), &[]);
            }
        };
        let shard = self.shard.clone();
        match cmd {
            Command::Publish(p) => {
                let reference = p.reference.clone();
                if let Proto::Ws(ws) = &mut self.proto {
                    ws.round_publishes += 1;
                }
                match shard.publish(p, now, Some(self.id)) {
                    Ok(published) => {
                        if let Proto::Ws(ws) = &mut self.proto {
                            ws.round_homes.merge(published.homes);
                        }
                        self.flow_hint(published.flow)
                    }
                    Err(e) => self.ws_error(reference.as_deref(), e.code(), &e.to_string(), &[]),
                }
            }
            Command::Subscribe(s) => match self.handoff_target(&s) {
                Some(target) => {
                    tracing::debug!(
                        conn = self.id,
                        from = self.shard.id,
                        to = target,
                        "subscriber moves to its queue"
                    );
                    self.handoff = Some((target, Some(s)))
                }
                None => self.ws_subscribe(s),
            },
            Command::Unsubscribe(u) => self.ws_unsubscribe(u),
            Command::Ack { tag, multiple } => self.ws_settle(tag, multiple, None),
            Command::Nack {
                tag,
                multiple,
                requeue,
            } => self.ws_settle(tag, multiple, Some(requeue)),
            _ => self.ws_error(None, "bad_request", "this command is HTTP only", &[]),
        }
    }

    /// The shard this connection should move to before carrying out `s`: its first
    /// subscription, to a queue homed on another shard, with nothing of this shard's
    /// in flight for it (no subscriptions, unacked tags, pending events or confirms).
    fn handoff_target(&self, s: &command::Subscribe) -> Option<usize> {
        if !self.shard.shared.config.migrate_subscribers || !self.movable() {
            return None;
        }
        let SubscribeTarget::Queue(name) = &s.target else {
            return None;
        };
        let guard = crate::sync::snapshot::pin();
        let home = self.shard.shared.topology.load(&guard).queue(name)?.home;
        (home != self.shard.id).then_some(home)
    }

    /// Packs this connection up for another shard; gives the subscribe back if the
    /// socket could not be duplicated.
    fn hand_off(
        &mut self,
        subscribe: Option<command::Subscribe>,
    ) -> Result<Handoff, (io::Error, Option<command::Subscribe>)> {
        // SAFETY: the descriptor belongs to `self.stream`, which stays open for the
        // whole borrow; the borrow only lives long enough to duplicate it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(self.stream.as_raw_fd()) };
        let fd = match borrowed.try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => return Err((e, subscribe)),
        };
        let ws = match std::mem::replace(&mut self.proto, Proto::Http) {
            Proto::Ws(ws) => ws,
            Proto::Http => {
                let e = io::Error::other("not a WebSocket connection");
                return Err((e, subscribe));
            }
        };
        self.count_websocket(-1);
        Ok(Handoff {
            fd,
            rbuf: std::mem::take(&mut self.rbuf),
            wbuf: std::mem::take(&mut self.wbuf),
            ws,
            subscribe,
            read_chunk: self.read_chunk,
            written_total: self.written_total,
            last_rx: self.inbox.last_rx.get(),
        })
    }

    fn ws_subscribe(&mut self, s: command::Subscribe) {
        let shard = self.shard.clone();
        let Proto::Ws(ws) = &mut self.proto else {
            return;
        };
        if ws.subs.len() >= MAX_SUBSCRIPTIONS {
            let msg = format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection");
            return self.ws_error(None, "resource_limit", &msg, &[]);
        }
        let n = ws.next_sub;
        ws.next_sub += 1;
        let id = cid(&shard, self.id, n);
        let result = match &s.target {
            SubscribeTarget::Queue(name) => shard.subscribe_queue(id, name, s.ack, s.prefetch),
            SubscribeTarget::Exchange { exchange, key } => {
                shard.subscribe_exchange(id, exchange, key, s.ack, s.prefetch)
            }
        };
        match result {
            Ok(queue) => {
                let sub_id = format!("sub-{}-{}-{}", shard.id, self.id, n);
                let id_json = crate::routing::json_string(&sub_id);
                let mut out = Vec::with_capacity(64 + queue.name.len());
                out.extend_from_slice(br#"{"type":"SUBSCRIBED","subscription":"#);
                out.extend_from_slice(&id_json);
                out.extend_from_slice(br#","queue_name":"#);
                out.extend_from_slice(&queue.name_json);
                out.push(b'}');
                // Exact size: `Bytes::from(Vec)` keeps the whole allocation.
                let mut mid = Vec::with_capacity(37 + id_json.len() + queue.name_json.len());
                mid.extend_from_slice(br#","subscription":"#);
                mid.extend_from_slice(&id_json);
                mid.extend_from_slice(br#","queue":"#);
                mid.extend_from_slice(&queue.name_json);
                mid.extend_from_slice(br#","exchange":"#);
                ws.subs.push(Sub {
                    n,
                    id_json,
                    queue,
                    mode: s.ack,
                    frame_mid: Bytes::from(mid),
                });
                ws::write_text(&mut self.wbuf, &out);
            }
            Err(e) => {
                let msg = e.to_string();
                self.ws_error(None, e.code(), &msg, &[]);
            }
        }
    }

    fn ws_unsubscribe(&mut self, u: Unsubscribe) {
        let shard = self.shard.clone();
        let Proto::Ws(ws) = &mut self.proto else {
            return;
        };
        let matches: Vec<usize> = ws
            .subs
            .iter()
            .enumerate()
            .filter(|(_, s)| match &u {
                Unsubscribe::Subscription(id) => s.id_json == crate::routing::json_string(id),
                Unsubscribe::Queue(q) => &*s.queue.name == q.as_str(),
            })
            .map(|(i, _)| i)
            .collect();
        if matches.is_empty() {
            return self.ws_error(
                None,
                "not_found",
                "no such subscription on this connection",
                &[],
            );
        }
        let mut frames = Vec::new();
        for i in matches.into_iter().rev() {
            let s = ws.subs.remove(i);
            shard.end_subscription(cid(&shard, self.id, s.n), &s.queue, false);
            let mut out = Vec::with_capacity(64);
            out.extend_from_slice(br#"{"type":"UNSUBSCRIBED","subscription":"#);
            out.extend_from_slice(&s.id_json);
            out.push(b'}');
            frames.push(out);
        }
        for f in frames.iter().rev() {
            ws::write_text(&mut self.wbuf, f);
        }
    }

    fn ws_settle(&mut self, tag: u64, multiple: bool, nack: Option<bool>) {
        let shard = self.shard.clone();
        let conn = self.id;
        let Proto::Ws(ws) = &mut self.proto else {
            return;
        };
        let idx = tag
            .checked_sub(ws.tag_base)
            .and_then(|i| usize::try_from(i).ok());
        let known = idx
            .and_then(|i| ws.tags.get(i))
            .is_some_and(Option::is_some);
        if !known {
            let msg = format!("delivery tag {tag} is not outstanding on this connection");
            return self.ws_error(None, "unknown_delivery_tag", &msg, &[]);
        }
        let Some(idx) = idx else { return };
        let mut taken: Vec<TagSlot> = Vec::new();
        if multiple {
            for slot in ws.tags.iter_mut().take(idx + 1) {
                if let Some(s) = slot.take() {
                    taken.push(s);
                }
            }
        } else if let Some(s) = ws.tags.get_mut(idx).and_then(Option::take) {
            taken.push(s);
        }
        while let Some(None) = ws.tags.front() {
            ws.tags.pop_front();
            ws.tag_base += 1;
        }
        // One message per (queue, subscription): the highest sequence, settled "through".
        let mut groups: Vec<TagSlot> = Vec::new();
        for s in &taken {
            match groups
                .iter_mut()
                .find(|g| g.sub == s.sub && g.queue == s.queue)
            {
                Some(g) => g.dseq = g.dseq.max(s.dseq),
                None => groups.push(*s),
            }
        }
        for g in groups {
            let id = cid(&shard, conn, g.sub);
            let msg = match nack {
                None => ShardMsg::Ack {
                    queue: g.queue,
                    id,
                    dseq: g.dseq,
                    through: multiple,
                },
                Some(requeue) => ShardMsg::Nack {
                    queue: g.queue,
                    id,
                    dseq: g.dseq,
                    through: multiple,
                    requeue,
                },
            };
            shard.settle(g.home, msg);
        }
    }

    fn process_events(&mut self) {
        loop {
            let ev = self.inbox.events.borrow_mut().pop_front();
            let Some(ev) = ev else { break };
            self.event(ev);
        }
        self.note_buffered();
    }

    fn event(&mut self, ev: ConnEvent) {
        let shard = self.shard.clone();
        let conn = self.id;
        let Proto::Ws(ws) = &mut self.proto else {
            // Only WebSocket connections subscribe; anything else is a late leftover.
            if let ConnEvent::Deliver {
                sub,
                queue,
                home,
                delivery,
            } = ev
            {
                return_delivery(&shard, conn, sub, queue, home, delivery.dseq);
            }
            return;
        };
        match ev {
            ConnEvent::Deliver {
                sub,
                queue,
                home,
                delivery,
            } => {
                let Some(s) = ws.subs.iter().find(|s| s.n == sub && s.queue.id == queue) else {
                    return return_delivery(&shard, conn, sub, queue, home, delivery.dseq);
                };
                let tag = ws.next_tag;
                ws.next_tag += 1;
                let e = &delivery.entry;
                crate::message::write_frame(
                    &mut self.wbuf,
                    &e.msg,
                    &s.frame_mid,
                    tag,
                    e.redelivered,
                );
                match s.mode {
                    AckMode::Manual => {
                        if ws.tags.is_empty() {
                            ws.tag_base = tag;
                        }
                        // Tags are consecutive; pad for auto-ack tags handed out in between.
                        while ws.tag_base + (ws.tags.len() as u64) < tag {
                            ws.tags.push_back(None);
                        }
                        ws.tags.push_back(Some(TagSlot {
                            sub,
                            queue,
                            home,
                            dseq: delivery.dseq,
                        }));
                        crate::metrics::bump(&shard.counters().delivered, 1);
                    }
                    AckMode::Auto => {
                        let end = self.written_total + self.wbuf.len() as u64;
                        ws.marks.push_back((end, sub, queue, home));
                    }
                }
            }
            ConnEvent::Cancelled { sub } => {
                if let Some(pos) = ws.subs.iter().position(|s| s.n == sub) {
                    let s = ws.subs.remove(pos);
                    let msg = format!("queue {} was deleted", s.queue.name);
                    self.ws_error(
                        None,
                        "queue_deleted",
                        &msg,
                        &[
                            ("subscription", &s.id_json),
                            ("queue_name", &s.queue.name_json),
                        ],
                    );
                }
            }
            ConnEvent::Confirm {
                reference,
                id,
                routed,
                ok,
            } => {
                if ok {
                    // Written straight into the write buffer, as `MESSAGE` frames are:
                    // no allocation per confirm.
                    const OPEN: &[u8] = br#"{"type":"CONFIRM""#;
                    const REF: &[u8] = br#","ref":"#;
                    const ID: &[u8] = br#","id":""#;
                    const ROUTED: &[u8] = br#"","routed":"#;
                    let mut routed_buf = itoa::Buffer::new();
                    let routed = routed_buf.format(routed).as_bytes();
                    let id = id.as_bytes();
                    let len = OPEN.len()
                        + reference.as_ref().map_or(0, |r| REF.len() + r.len())
                        + ID.len()
                        + id.len()
                        + ROUTED.len()
                        + routed.len()
                        + 1;
                    self.wbuf.reserve(10 + len);
                    ws::write_text_header(&mut self.wbuf, len);
                    self.wbuf.extend_from_slice(OPEN);
                    if let Some(r) = &reference {
                        self.wbuf.extend_from_slice(REF);
                        self.wbuf.extend_from_slice(r);
                    }
                    self.wbuf.extend_from_slice(ID);
                    self.wbuf.extend_from_slice(id);
                    self.wbuf.extend_from_slice(ROUTED);
                    self.wbuf.extend_from_slice(routed);
                    self.wbuf.extend_from_slice(b"}");
                } else {
                    self.ws_error(
                        reference.as_deref(),
                        "store_unavailable",
                        "the durable store could not write the message; it was not confirmed",
                        &[],
                    );
                }
            }
        }
    }

    /// Counts this connection in (or out of) its shard's open WebSockets.
    fn count_websocket(&self, delta: i64) {
        crate::metrics::bump_i64(&self.shard.counters().websockets, delta);
    }

    /// The connection is gone: its subscriptions end, unacked messages go back.
    fn finish(&mut self) {
        let shard = self.shard.clone();
        if matches!(self.proto, Proto::Ws(_)) {
            self.count_websocket(-1);
        }
        if let Proto::Ws(ws) = &mut self.proto {
            let active: Vec<u64> = ws.subs.iter().map(|s| s.n).collect();
            for s in ws.subs.drain(..) {
                shard.end_subscription(cid(&shard, self.id, s.n), &s.queue, true);
            }
            // Unacked deliveries of subscriptions ended earlier go back to their queues
            // (those of active ones went back with the subscription).
            for t in ws
                .tags
                .drain(..)
                .flatten()
                .filter(|t| !active.contains(&t.sub))
            {
                let id = cid(&shard, self.id, t.sub);
                shard.settle(
                    t.home,
                    ShardMsg::Nack {
                        queue: t.queue,
                        id,
                        dseq: t.dseq,
                        through: false,
                        requeue: true,
                    },
                );
            }
        }
        loop {
            let ev = self.inbox.events.borrow_mut().pop_front();
            match ev {
                Some(ConnEvent::Deliver {
                    sub,
                    queue,
                    home,
                    delivery,
                }) => return_delivery(&shard, self.id, sub, queue, home, delivery.dseq),
                Some(_) => {}
                None => break,
            }
        }
    }
}

fn cid(shard: &Shard, conn: u64, sub: u64) -> ConsumerId {
    ConsumerId {
        shard: shard.id,
        conn,
        sub,
    }
}

fn return_delivery(shard: &Rc<Shard>, conn: u64, sub: u64, queue: u64, home: usize, dseq: u64) {
    shard.settle(
        home,
        ShardMsg::Returned {
            queue,
            id: cid(shard, conn, sub),
            dseqs: vec![dseq],
        },
    );
}

fn error_body(code: &str, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + message.len());
    out.extend_from_slice(br#"{"error":{"code":"#);
    http::json::write_escaped_str(&mut out, code);
    out.extend_from_slice(br#","message":"#);
    http::json::write_escaped_str(&mut out, message);
    out.extend_from_slice(b"}}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn recv_into_spare_appends_what_arrived_and_says_when_nothing_did() {
        let (mut tx, rx) = UnixStream::pair().unwrap();
        let fd = rx.as_raw_fd();
        let mut buf = BytesMut::from(&b"head:"[..]);
        let e = recv_into_spare(fd, &mut buf, 64).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(&buf[..], b"head:");

        tx.write_all(b"0123456789").unwrap();
        // At most `max` bytes, appended after what the buffer held.
        assert_eq!(recv_into_spare(fd, &mut buf, 4).unwrap(), 4);
        assert_eq!(&buf[..], b"head:0123");
        assert_eq!(recv_into_spare(fd, &mut buf, 64).unwrap(), 6);
        assert_eq!(&buf[..], b"head:0123456789");

        // An empty buffer gets room made for it.
        let mut fresh = BytesMut::new();
        tx.write_all(b"x").unwrap();
        assert_eq!(recv_into_spare(fd, &mut fresh, 64).unwrap(), 1);
        assert_eq!(&fresh[..], b"x");

        drop(tx);
        assert_eq!(
            recv_into_spare(fd, &mut buf, 64).unwrap(),
            0,
            "end of stream"
        );
    }
}
