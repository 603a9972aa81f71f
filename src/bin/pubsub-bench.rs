//! `pubsub-bench`: the end-to-end load generator for pubsub (issue 5).
//!
//! It speaks the wire contract (`shared/protocol.md`) over real sockets, std threads only:
//! setup over HTTP (`POST /exchanges`, `/queues`, `/bindings`), publishers sending
//! pipelined `PUBLISH` frames over WebSocket (or pipelined `POST /publish` over keep-alive
//! HTTP), subscribers on `SUBSCRIBE` with `ack: auto` or `manual`. Every payload carries its
//! send time (see `payload.rs`), so latency is publish→delivery measured in one process.
//!
//! Scenarios: `throughput`, `fanout`, `latency`, `connections`, `durable` (see `--help`).
//! Each run prints one JSON line and a Markdown table row (`report.rs`, shared with the peer
//! harness in `benches/peers`, which runs the same scenarios against NATS and RabbitMQ), and
//! exits with status 2 when messages were lost. `scripts/bench-peers` drives both.

#[path = "pubsub-bench/fanin.rs"]
mod fanin;
#[path = "pubsub-bench/http.rs"]
mod http;
#[path = "pubsub-bench/payload.rs"]
mod payload;
#[path = "pubsub-bench/plan.rs"]
mod plan;
#[path = "pubsub-bench/readbuf.rs"]
mod readbuf;
#[path = "pubsub-bench/report.rs"]
mod report;
#[path = "pubsub-bench/ws.rs"]
mod ws;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier, LazyLock, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use memchr::memmem::{Finder, FinderRev};
use serde_json::json;

use payload::{now_ns, stamp_of, write_payload};
use plan::{pace, Plan, HARD_RUN_LIMIT};
use report::{Percentiles, Record};

/// Largest number of messages one publisher write carries in count mode.
const MAX_BATCH: usize = 4096;
/// Sockets handled by one thread in the `connections` scenario at most.
const MAX_CONNS_PER_THREAD: usize = 4096;
/// Socket read chunk of the HTTP publisher's reader (WebSocket readers read into their
/// [`readbuf::ReadBuf`]).
const READ_CHUNK: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// 1 publisher, direct exchange, 1 queue, 1 subscriber, `--messages` as fast as taken.
    Throughput,
    /// 1 publisher, fanout exchange, `--queues` queues (4), one subscriber each.
    Fanout,
    /// Fixed `--rate` for `--duration`, 1 queue, 1 subscriber: latency percentiles.
    Latency,
    /// `--subscribers` idle exchange subscribers, one broadcast every `--interval-ms`.
    Connections,
    /// Durable queue, `confirm: true` publishes with `--window` unconfirmed.
    Durable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    Ws,
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Ack {
    Auto,
    Manual,
}

/// End-to-end load generator for pubsub.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
struct Args {
    scenario: Scenario,
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:8060")]
    addr: String,
    /// How publishers talk to the server.
    #[arg(long, value_enum, default_value = "ws")]
    transport: Transport,
    /// Subscriber acknowledgement mode.
    #[arg(long, value_enum, default_value = "auto")]
    ack: Ack,
    /// Unacked messages allowed per subscription (manual ack).
    #[arg(long, default_value_t = 100)]
    prefetch: u32,
    /// Send an `ACK multiple:true` every this many deliveries (manual ack).
    #[arg(long, default_value_t = 50)]
    ack_every: u64,
    /// Messages to publish (throughput, fanout, durable).
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Queues and subscribers for `fanout`.
    #[arg(long, default_value_t = 4)]
    queues: usize,
    /// Publish rate for `latency`, msgs/s.
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Duration of `latency` (e.g. `5s`, `500ms`).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Idle subscribers for `connections`.
    #[arg(long, default_value_t = 5000)]
    subscribers: usize,
    /// Client threads serving the `connections` subscribers.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Broadcast interval for `connections`, ms.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// How long `connections` broadcasts (e.g. `10s`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    broadcast_for: Duration,
    /// Unconfirmed publishes in flight (durable; also the HTTP pipelining depth).
    #[arg(long, default_value_t = 1000)]
    window: u64,
    /// Messages per publisher write in count mode.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Once publishing is over, how long a subscriber waits without any delivery before
    /// it counts the missing messages as lost.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Server pid, for its RSS and CPU time (found through the listening port when absent).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Label for the variant column (e.g. `sqlite`, `postgres`); defaults to the transport.
    #[arg(long)]
    variant: Option<String>,
    /// Print only the JSON line.
    #[arg(long)]
    json_only: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?}"))?;
    if !(0.0..=3600.0 * 24.0).contains(&(v * mul)) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(v * mul))
}

fn main() -> ExitCode {
    let args = Args::parse();
    now_ns();
    report::raise_nofile();
    match run(&args) {
        Ok(rec) => {
            if args.json_only {
                println!("{}", rec.json());
            } else {
                rec.print();
            }
            if rec.lost > 0 {
                eprintln!("pubsub-bench: {} messages lost", rec.lost);
                return ExitCode::from(2);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pubsub-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: &Args) -> Result<Record> {
    if a.size < payload::MIN_PAYLOAD {
        bail!("--size must be at least {}", payload::MIN_PAYLOAD);
    }
    let tag = format!(
        "bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    match a.scenario {
        Scenario::Throughput => queue_run(a, &tag, "direct", 1, Plan::Count(a.messages)),
        Scenario::Fanout => queue_run(a, &tag, "fanout", a.queues.max(1), Plan::Count(a.messages)),
        Scenario::Latency => queue_run(
            a,
            &tag,
            "direct",
            1,
            Plan::Rate {
                rate: a.rate.max(1),
                dur: a.duration,
            },
        ),
        Scenario::Connections => connections(a, &tag),
        Scenario::Durable => durable(a, &tag),
    }
}

/// What a publisher achieved.
#[derive(Debug, Default)]
struct PubOut {
    /// Publishes written.
    sent: u64,
    /// Publishes the server refused (`ERROR` frames or non-200 answers).
    errors: u64,
    /// Confirms (or 200 answers in HTTP mode when confirming).
    confirms: u64,
    /// Publish→confirm latencies, ns.
    confirm_ns: Vec<u64>,
    start_ns: u64,
    end_ns: u64,
    /// When the last confirm arrived.
    last_confirm_ns: u64,
}

/// Shared between a publisher's writer and its reader thread.
#[derive(Debug, Default)]
struct PubShared {
    answered: AtomicU64,
    written: AtomicU64,
    done: AtomicBool,
}

/// Publishes `plan` to `exchange` with `key`. `confirm` asks for confirms with a window.
fn publish(a: &Args, exchange: &str, key: &str, plan: Plan, confirm: bool) -> Result<PubOut> {
    match a.transport {
        Transport::Ws => publish_ws(a, exchange, key, plan, confirm),
        Transport::Http => publish_http(a, exchange, key, plan, confirm),
    }
}

/// Builds the JSON body of one publish (the part inside `PUBLISH`'s payload).
fn publish_body(out: &mut Vec<u8>, head: &[u8], t: u64, seq: u64, size: usize, confirm: bool) {
    out.extend_from_slice(head);
    write_payload(out, t, seq, size);
    if confirm {
        out.extend_from_slice(b",\"confirm\":true,\"ref\":\"");
        payload::push_u64(out, t);
        out.push(b'"');
    }
    out.push(b'}');
}

fn publish_ws(a: &Args, exchange: &str, key: &str, plan: Plan, confirm: bool) -> Result<PubOut> {
    let (stream, leftover) = ws::connect(&a.addr).context("publisher connect")?;
    let mut wr = stream.try_clone()?;
    let mut rd = stream;
    rd.set_read_timeout(Some(Duration::from_millis(100)))?;
    let shared = Arc::new(PubShared::default());
    let pongs: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let writer = thread::current();
    let drain = a.drain_timeout;
    let window = a.window.max(1);
    let reader = {
        let shared = shared.clone();
        let pongs = pongs.clone();
        thread::spawn(move || -> Result<PubOut> {
            let mut out = PubOut::default();
            let mut r = ws::Reader::with(leftover);
            let mut done_at: Option<Instant> = None;
            loop {
                let mut answered = 0u64;
                let now = now_ns();
                let st = r.drain(|f| {
                    match ws::frame_type(f) {
                        Some(b"CONFIRM") => {
                            out.confirms += 1;
                            answered += 1;
                            out.last_confirm_ns = now;
                            if let Some(t) = ref_of(f) {
                                out.confirm_ns.push(now.saturating_sub(t));
                            }
                        }
                        Some(b"ERROR") => {
                            out.errors += 1;
                            answered += 1;
                            if out.errors <= 3 {
                                eprintln!("publish error: {}", String::from_utf8_lossy(f));
                            }
                        }
                        _ => {}
                    }
                    true
                })?;
                if answered > 0 {
                    shared.answered.fetch_add(answered, Ordering::Release);
                    writer.unpark();
                }
                let p = r.take_pongs();
                if !p.is_empty() {
                    if let Ok(mut g) = pongs.lock() {
                        g.extend(p);
                    }
                }
                if st == ws::ReadState::Closed {
                    break;
                }
                if shared.done.load(Ordering::Acquire) {
                    let all = shared.answered.load(Ordering::Acquire)
                        >= shared.written.load(Ordering::Acquire);
                    if !confirm || all {
                        // Unconfirmed publishes only answer on error: linger briefly.
                        let since = *done_at.get_or_insert_with(Instant::now);
                        if all || since.elapsed() > Duration::from_millis(200) {
                            break;
                        }
                    }
                    let since = *done_at.get_or_insert_with(Instant::now);
                    if since.elapsed() > drain {
                        break;
                    }
                }
                match r.read_from(&mut rd) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(out)
        })
    };

    let head = format!(
        "{{\"type\":\"PUBLISH\",\"payload\":{{\"exchange_name\":{},\"key\":{},\"payload\":",
        json!(exchange),
        json!(key)
    );
    let mut enc = ws::Encoder::new(now_ns() ^ u64::from(std::process::id()) << 32);
    let mut out = Vec::with_capacity(a.batch * (a.size + 200));
    let mut body = Vec::with_capacity(a.size + 200);
    let start_ns = now_ns();
    let batch = a.batch.clamp(1, MAX_BATCH);
    let res = pace(plan, batch, |seq, n| {
        if confirm {
            // Keep at most `window` unconfirmed.
            while shared.written.load(Ordering::Acquire) + n.min(window)
                > shared.answered.load(Ordering::Acquire) + window
            {
                thread::park_timeout(Duration::from_millis(5));
                if reader.is_finished() {
                    bail!("publisher reader ended early");
                }
            }
        }
        out.clear();
        for i in 0..n {
            body.clear();
            publish_body(
                &mut body,
                head.as_bytes(),
                now_ns(),
                seq + i,
                a.size,
                confirm,
            );
            body.push(b'}');
            enc.text(&mut out, &body);
        }
        if let Ok(mut g) = pongs.lock() {
            for p in g.drain(..) {
                enc.frame(&mut out, 0xA, &p);
            }
        }
        wr.write_all(&out)?;
        shared.written.fetch_add(n, Ordering::Release);
        Ok(())
    });
    let end_ns = now_ns();
    shared.done.store(true, Ordering::Release);
    let mut po = reader
        .join()
        .map_err(|_| anyhow!("publisher reader panicked"))??;
    res?;
    po.sent = shared.written.load(Ordering::Acquire);
    po.start_ns = start_ns;
    po.end_ns = end_ns;
    Ok(po)
}

/// The `ref` of a `CONFIRM` frame (the publisher put its send time there).
fn ref_of(frame: &[u8]) -> Option<u64> {
    static REF_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"ref\""));
    let p = REF_KEY.find(frame)?;
    let rest = frame.get(p + 5..)?;
    let q = rest.iter().position(|&b| b == b'"')?;
    let rest = rest.get(q + 1..)?;
    let e = rest.iter().position(|&b| b == b'"')?;
    std::str::from_utf8(rest.get(..e)?).ok()?.parse().ok()
}

fn publish_http(a: &Args, exchange: &str, key: &str, plan: Plan, confirm: bool) -> Result<PubOut> {
    let stream = TcpStream::connect(&a.addr).context("publisher connect")?;
    stream.set_nodelay(true)?;
    let mut wr = stream.try_clone()?;
    let mut rd = stream;
    rd.set_read_timeout(Some(Duration::from_millis(100)))?;
    let shared = Arc::new(PubShared::default());
    let (tx, rx) = mpsc::channel::<u64>();
    let writer = thread::current();
    let drain = a.drain_timeout;
    let window = a.window.max(1);
    let reader = {
        let shared = shared.clone();
        thread::spawn(move || -> Result<PubOut> {
            let mut out = PubOut::default();
            let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
            let mut pos = 0usize;
            let mut chunk = vec![0u8; READ_CHUNK];
            let mut pending: VecDeque<u64> = VecDeque::new();
            let mut done_at: Option<Instant> = None;
            loop {
                let now = now_ns();
                let mut answered = 0;
                while let Some(p) = http::parse_response(buf.get(pos..).unwrap_or(&[]))? {
                    pos += p.len;
                    answered += 1;
                    pending.extend(rx.try_iter());
                    let sent_at = pending.pop_front().unwrap_or(now);
                    if p.status == 200 {
                        out.confirms += 1;
                        out.last_confirm_ns = now;
                        out.confirm_ns.push(now.saturating_sub(sent_at));
                    } else {
                        out.errors += 1;
                        if out.errors <= 3 {
                            eprintln!("publish answered {}", p.status);
                        }
                    }
                }
                if pos == buf.len() {
                    buf.clear();
                    pos = 0;
                }
                if answered > 0 {
                    shared.answered.fetch_add(answered, Ordering::Release);
                    writer.unpark();
                }
                if shared.done.load(Ordering::Acquire) {
                    if shared.answered.load(Ordering::Acquire)
                        >= shared.written.load(Ordering::Acquire)
                    {
                        break;
                    }
                    if done_at.get_or_insert_with(Instant::now).elapsed() > drain {
                        break;
                    }
                }
                match rd.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or(&[])),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(out)
        })
    };
    let head = format!(
        "{{\"exchange_name\":{},\"key\":{},\"payload\":",
        json!(exchange),
        json!(key)
    );
    let mut out = Vec::with_capacity(a.batch * (a.size + 300));
    let mut body = Vec::with_capacity(a.size + 200);
    let start_ns = now_ns();
    let batch = a.batch.clamp(1, MAX_BATCH);
    let res = pace(plan, batch, |seq, n| {
        // Every request is answered, so HTTP always keeps a bounded pipeline.
        while shared.written.load(Ordering::Acquire) + n.min(window)
            > shared.answered.load(Ordering::Acquire) + window
        {
            thread::park_timeout(Duration::from_millis(5));
            if reader.is_finished() {
                bail!("publisher reader ended early");
            }
        }
        out.clear();
        for i in 0..n {
            body.clear();
            let t = now_ns();
            publish_body(&mut body, head.as_bytes(), t, seq + i, a.size, confirm);
            http::write_request(&mut out, &a.addr, "POST", "/publish", &body);
            let _ = tx.send(t);
        }
        wr.write_all(&out)?;
        shared.written.fetch_add(n, Ordering::Release);
        Ok(())
    });
    let end_ns = now_ns();
    shared.done.store(true, Ordering::Release);
    let mut po = reader
        .join()
        .map_err(|_| anyhow!("publisher reader panicked"))??;
    res?;
    po.sent = shared.written.load(Ordering::Acquire);
    po.start_ns = start_ns;
    po.end_ns = end_ns;
    if !confirm {
        // Plain HTTP publishes are answered too, but only as "routed", not confirms.
        po.confirms = 0;
        po.confirm_ns.clear();
    }
    Ok(po)
}

/// A start barrier each subscriber passes exactly once, even when it fails early.
#[derive(Debug)]
struct Gate<'a> {
    barrier: &'a Barrier,
    passed: std::cell::Cell<bool>,
}

impl<'a> Gate<'a> {
    fn new(barrier: &'a Barrier) -> Self {
        Gate {
            barrier,
            passed: std::cell::Cell::new(false),
        }
    }

    fn pass(&self) {
        if !self.passed.replace(true) {
            self.barrier.wait();
        }
    }
}

/// What one subscriber saw.
#[derive(Debug, Default)]
struct SubOut {
    received: u64,
    lat_ns: Vec<u64>,
    first_ns: u64,
    last_ns: u64,
    /// Deliveries whose sequence number did not follow the previous one.
    out_of_order: u64,
    redelivered: u64,
}

/// What the subscriber looks for in every `MESSAGE` frame, forwards and backwards
/// (built once: a searcher costs more to build than a frame costs to search).
static REDELIVERED: LazyLock<(Finder<'static>, FinderRev<'static>)> = LazyLock::new(|| {
    (
        Finder::new(b"\"redelivered\":"),
        FinderRev::new(b"\"redelivered\":"),
    )
});
static DELIVERY_TAG: LazyLock<(Finder<'static>, FinderRev<'static>)> = LazyLock::new(|| {
    (
        Finder::new(b"\"delivery_tag\""),
        FinderRev::new(b"\"delivery_tag\""),
    )
});

/// The frame's last few bytes where its tag, `redelivered` and `published_at` sit when
/// no headers follow them (`,"delivery_tag":<20 digits>,"redelivered":false,
/// "published_at":<13 digits>}` is 86 bytes).
const TAIL: usize = 96;

/// End of the last occurrence of a key in `frame`: searched forwards (vectorised) in
/// the frame's [`TAIL`], where it is unless headers follow it, else backwards through
/// the whole frame (a reverse search goes byte by byte: about a tenth of the
/// subscriber's time when every frame took it).
fn key_end(frame: &[u8], (fwd, rev): &(Finder<'static>, FinderRev<'static>)) -> Option<usize> {
    let from = frame.len().saturating_sub(TAIL);
    let tail = frame.get(from..)?;
    let at = match fwd.find_iter(tail).last() {
        Some(p) => from + p,
        None => rev.rfind(frame)?,
    };
    Some(at + fwd.needle().len())
}

/// Subscribes to `queue` and counts deliveries until `target` (set by the publisher once
/// it knows how many went out) is reached, or nothing arrived for the drain timeout after
/// the publisher finished.
fn subscriber(
    a: &Args,
    queue: &str,
    ready: &Gate,
    target: Arc<AtomicU64>,
    pub_done_ns: Arc<AtomicU64>,
) -> Result<SubOut> {
    let (mut s, leftover) = ws::connect(&a.addr).context("subscriber connect")?;
    let mut enc = ws::Encoder::new(now_ns() ^ 0x9e37_79b9_7f4a_7c15);
    let mut r = ws::Reader::with(leftover);
    let manual = a.ack == Ack::Manual;
    let sub = json!({"type":"SUBSCRIBE","payload":{
        "queue_name": queue,
        "ack": if manual {"manual"} else {"auto"},
        "prefetch": a.prefetch,
    }});
    ws::send_text(&mut s, &mut enc, sub.to_string().as_bytes())?;
    let first = ws::recv_text(&mut s, &mut r)?;
    if ws::frame_type(&first) != Some(b"SUBSCRIBED".as_slice()) {
        bail!(
            "SUBSCRIBE to {queue} answered {}",
            String::from_utf8_lossy(&first)
        );
    }
    ready.pass();
    s.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut out = SubOut {
        lat_ns: Vec::with_capacity(usize::try_from(a.messages.min(10_000_000)).unwrap_or(0)),
        ..SubOut::default()
    };
    let mut next_seq = 0u64;
    let mut last_tag = 0u64;
    let mut unacked = 0u64;
    let mut wbuf = Vec::new();
    let hard_end = Instant::now() + HARD_RUN_LIMIT;
    let drain_ns = a.drain_timeout.as_nanos() as u64;
    loop {
        let now = now_ns();
        let st = r.drain(|f| {
            if !ws::is_message(f) {
                if ws::frame_type(f) == Some(b"ERROR".as_slice()) {
                    eprintln!("subscriber got {}", String::from_utf8_lossy(f));
                }
                return true;
            }
            if let Some((t, seq)) = stamp_of(f) {
                if out.received == 0 {
                    out.first_ns = now;
                }
                out.received += 1;
                out.last_ns = now;
                out.lat_ns.push(now.saturating_sub(t));
                if seq != next_seq {
                    out.out_of_order += 1;
                }
                next_seq = seq + 1;
            }
            let again = key_end(f, &REDELIVERED)
                .and_then(|at| f.get(at..))
                .is_some_and(|rest| rest.starts_with(b"true"));
            if again {
                out.redelivered += 1;
            }
            if manual {
                let tag = key_end(f, &DELIVERY_TAG).and_then(|at| payload::num_at(f, at));
                if let Some((tag, _)) = tag {
                    last_tag = tag;
                    unacked += 1;
                }
            }
            true
        })?;
        if manual && unacked >= a.ack_every.max(1) {
            wbuf.clear();
            let ack = format!(
                "{{\"type\":\"ACK\",\"payload\":{{\"delivery_tag\":{last_tag},\"multiple\":true}}}}"
            );
            enc.text(&mut wbuf, ack.as_bytes());
            s.write_all(&wbuf)?;
            unacked = 0;
        }
        for p in r.take_pongs() {
            wbuf.clear();
            enc.frame(&mut wbuf, 0xA, &p);
            s.write_all(&wbuf)?;
        }
        if st == ws::ReadState::Closed {
            break;
        }
        if out.received >= target.load(Ordering::Acquire) {
            break;
        }
        // Stragglers: stop once nothing arrived for the drain timeout after publishing.
        let done = pub_done_ns.load(Ordering::Acquire);
        if done > 0 && now_ns() > done.max(out.last_ns) + drain_ns {
            break;
        }
        if Instant::now() > hard_end {
            break;
        }
        match r.read_from(&mut s) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if manual && unacked > 0 {
        wbuf.clear();
        let ack = format!(
            "{{\"type\":\"ACK\",\"payload\":{{\"delivery_tag\":{last_tag},\"multiple\":true}}}}"
        );
        enc.text(&mut wbuf, ack.as_bytes());
        let _ = s.write_all(&wbuf);
    }
    Ok(out)
}

/// Declares an exchange, `n` queues bound to it, and returns the queue names.
fn setup(
    a: &Args,
    tag: &str,
    kind: &str,
    n: usize,
    durable: bool,
) -> Result<(String, Vec<String>)> {
    let ex = format!("{tag}-x");
    http::must(
        &a.addr,
        "POST",
        "/exchanges",
        &json!({"name": ex, "type": kind, "durable": durable}).to_string(),
    )?;
    let mut queues = Vec::new();
    for i in 0..n {
        let q = format!("{tag}-q{i}");
        http::must(
            &a.addr,
            "POST",
            "/queues",
            &json!({"name": q, "durable": durable}).to_string(),
        )?;
        http::must(
            &a.addr,
            "POST",
            "/bindings",
            &json!({"exchange_name": ex, "queue_name": q, "key": "k"}).to_string(),
        )?;
        queues.push(q);
    }
    Ok((ex, queues))
}

/// Deletes what [`setup`] made (best effort: a failed cleanup does not fail the run).
fn teardown(a: &Args, ex: &str, queues: &[String]) {
    for q in queues {
        let _ = http::request(&a.addr, "DELETE", &format!("/queues/{q}"), "");
    }
    let _ = http::request(&a.addr, "DELETE", &format!("/exchanges/{ex}"), "");
}

/// `throughput`, `fanout` and `latency`: publisher → exchange → `n` queues → subscribers.
fn queue_run(a: &Args, tag: &str, kind: &str, n: usize, plan: Plan) -> Result<Record> {
    let (ex, queues) = setup(a, tag, kind, n, false)?;
    let ready = Arc::new(Barrier::new(n + 1));
    let target = Arc::new(AtomicU64::new(u64::MAX));
    let pub_done = Arc::new(AtomicU64::new(0));
    let mut subs = Vec::new();
    for q in &queues {
        let (a2, q2, r2, t2, d2) = (
            a.clone(),
            q.clone(),
            ready.clone(),
            target.clone(),
            pub_done.clone(),
        );
        subs.push(thread::spawn(move || {
            let gate = Gate::new(&r2);
            let res = subscriber(&a2, &q2, &gate, t2, d2);
            // Release the barrier so a failed subscriber fails the run instead of hanging it.
            gate.pass();
            res
        }));
    }
    ready.wait();
    let cpu = report::CpuMeter::start(server_pid(a));
    let po = publish(a, &ex, "k", plan, false);
    let po = match po {
        Ok(p) => p,
        Err(e) => {
            pub_done.store(now_ns().max(1), Ordering::Release);
            target.store(0, Ordering::Release);
            for s in subs {
                let _ = s.join();
            }
            teardown(a, &ex, &queues);
            return Err(e);
        }
    };
    let accepted = po.sent.saturating_sub(po.errors);
    target.store(accepted, Ordering::Release);
    pub_done.store(now_ns().max(1), Ordering::Release);
    let mut all = Vec::new();
    let mut received = 0;
    let mut last = 0;
    let mut ooo = 0;
    let mut redelivered = 0;
    for s in subs {
        let so = s.join().map_err(|_| anyhow!("subscriber panicked"))??;
        received += so.received;
        last = last.max(so.last_ns);
        ooo += so.out_of_order;
        redelivered += so.redelivered;
        all.extend(so.lat_ns);
    }
    let cpu = cpu.per_msg(received);
    teardown(a, &ex, &queues);
    let scenario = match (a.scenario, a.ack) {
        (Scenario::Throughput, Ack::Manual) => "manual_ack",
        (Scenario::Fanout, Ack::Manual) => "fanout_manual_ack",
        (Scenario::Latency, Ack::Manual) => "latency_manual_ack",
        (Scenario::Throughput, Ack::Auto) => "throughput",
        (Scenario::Fanout, Ack::Auto) => "fanout",
        _ => "latency",
    };
    let variant = a.variant.clone().unwrap_or_else(|| transport_name(a));
    let mut rec = Record::new("pubsub", scenario, &variant);
    for (k, v) in cpu {
        rec.put(k, v);
    }
    let expected = accepted * n as u64;
    rec.sent = po.sent;
    rec.received = received;
    rec.lost = expected.saturating_sub(received);
    let span = last.saturating_sub(po.start_ns).max(1) as f64 / 1e9;
    rec.msgs_per_sec = received as f64 / span;
    rec.lat = Percentiles::from_ns(&mut all);
    let pub_span = po.end_ns.saturating_sub(po.start_ns).max(1) as f64 / 1e9;
    rec.put("publish_per_sec", (po.sent as f64 / pub_span).round());
    rec.put("queues", n as u64);
    rec.put("size", a.size as u64);
    rec.put("publish_errors", po.errors);
    if ooo > 0 {
        rec.put("out_of_order", ooo);
    }
    if redelivered > 0 {
        rec.put("redelivered", redelivered);
    }
    if received > expected {
        rec.put("duplicates", received - expected);
    }
    if a.ack == Ack::Manual {
        rec.put("prefetch", a.prefetch);
        rec.put("ack_every", a.ack_every);
    }
    if let Plan::Rate { rate, .. } = plan {
        rec.put("rate", rate);
    }
    Ok(rec)
}

fn transport_name(a: &Args) -> String {
    match a.transport {
        Transport::Ws => "ws".into(),
        Transport::Http => "http".into(),
    }
}

/// `durable`: confirmed publishes to a durable queue, no consumer.
fn durable(a: &Args, tag: &str) -> Result<Record> {
    let (ex, queues) = setup(a, tag, "direct", 1, true)?;
    let po = publish(a, &ex, "k", Plan::Count(a.messages), true);
    let stored = queues
        .first()
        .and_then(|q| http::must(&a.addr, "GET", &format!("/queues/{q}"), "").ok())
        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("messages_ready").and_then(serde_json::Value::as_u64));
    teardown(a, &ex, &queues);
    let mut po = po?;
    let variant = a
        .variant
        .clone()
        .unwrap_or_else(|| format!("{}-sqlite", transport_name(a)));
    let mut rec = Record::new("pubsub", "durable", &variant);
    rec.sent = po.sent;
    rec.received = po.confirms;
    rec.lost = po.sent.saturating_sub(po.confirms);
    let span = po.last_confirm_ns.saturating_sub(po.start_ns).max(1) as f64 / 1e9;
    rec.msgs_per_sec = po.confirms as f64 / span;
    rec.lat = Percentiles::from_ns(&mut po.confirm_ns);
    rec.put("window", a.window);
    rec.put("publish_errors", po.errors);
    if let Some(s) = stored {
        rec.put("queue_messages_ready", s);
    }
    Ok(rec)
}

/// The server's pid: `--server-pid`, or whoever listens on the port of `--addr`.
fn server_pid(a: &Args) -> Option<u32> {
    a.server_pid
        .or_else(|| report::pid_listening_on(a.addr.rsplit(':').next()?.parse().ok()?))
}

/// `connections`: many idle exchange subscribers, periodic broadcasts.
fn connections(a: &Args, tag: &str) -> Result<Record> {
    let ex = format!("{tag}-x");
    http::must(
        &a.addr,
        "POST",
        "/exchanges",
        &json!({"name": ex, "type": "fanout"}).to_string(),
    )?;
    let pid = server_pid(a);
    // Let the server settle before taking the baseline.
    thread::sleep(Duration::from_millis(300));
    let rss_before = pid.and_then(report::tree_rss_kib);
    let n = a.subscribers.max(1);
    let threads = a.threads.clamp(1, 64).max(n.div_ceil(MAX_CONNS_PER_THREAD));
    let broadcasts = (a.broadcast_for.as_millis() as u64 / a.interval_ms.max(1)).max(1);
    let max_seq = usize::try_from(broadcasts).unwrap_or(usize::MAX);
    let stop = Arc::new(AtomicBool::new(false));
    let connected = Arc::new(Barrier::new(threads + 1));
    let deadline = Instant::now() + HARD_RUN_LIMIT;
    let failures = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    let t0 = Instant::now();
    for ti in 0..threads {
        let share = n / threads + usize::from(ti < n % threads);
        let (addr, ex2, stop2, conn2, fail2) = (
            a.addr.clone(),
            ex.clone(),
            stop.clone(),
            connected.clone(),
            failures.clone(),
        );
        handles.push(thread::spawn(move || -> fanin::Arrivals {
            let mut conns = Vec::with_capacity(share);
            let sub = json!({"type":"SUBSCRIBE","payload":{"exchange_name": ex2, "ack": "auto"}})
                .to_string();
            for i in 0..share {
                let one = || -> Result<(TcpStream, ws::WsSub)> {
                    let (mut s, leftover) = ws::connect(&addr)?;
                    let mut enc = ws::Encoder::new(now_ns() ^ ((ti * 100_000 + i) as u64));
                    let mut r = ws::Reader::with(leftover);
                    ws::send_text(&mut s, &mut enc, sub.as_bytes())?;
                    let f = ws::recv_text(&mut s, &mut r)?;
                    if ws::frame_type(&f) != Some(b"SUBSCRIBED".as_slice()) {
                        bail!("SUBSCRIBE answered {}", String::from_utf8_lossy(&f));
                    }
                    Ok((s, ws::WsSub { reader: r, enc }))
                };
                match one() {
                    Ok(c) => conns.push(c),
                    Err(e) => {
                        if fail2.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("subscriber {ti}/{i}: {e:#}");
                        }
                    }
                }
            }
            conn2.wait();
            fanin::poll_loop(&mut conns, &stop2, deadline, max_seq)
        }));
    }
    connected.wait();
    let failed = failures.load(Ordering::Relaxed);
    let subscribed = n as u64 - failed;
    let connect_secs = t0.elapsed().as_secs_f64();
    eprintln!("connections: {subscribed} subscribed ({failed} failed) in {connect_secs:.1} s");
    thread::sleep(Duration::from_millis(1000));
    let rss_after = pid.and_then(report::tree_rss_kib);
    let po = publish(
        a,
        &ex,
        "",
        Plan::Every {
            n: broadcasts,
            every: Duration::from_millis(a.interval_ms.max(1)),
        },
        false,
    );
    // Let the last broadcast reach everyone (bounded by the drain timeout).
    thread::sleep(a.drain_timeout.min(Duration::from_secs(1)));
    stop.store(true, Ordering::Release);
    let mut arr = fanin::Arrivals::default();
    for h in handles {
        let t = h
            .join()
            .map_err(|_| anyhow!("subscriber thread panicked"))?;
        arr.merge(&t);
    }
    let _ = http::request(&a.addr, "DELETE", &format!("/exchanges/{ex}"), "");
    let po = po?;
    let mut rec = Record::new(
        "pubsub",
        "connections",
        &a.variant.clone().unwrap_or_else(|| transport_name(a)),
    );
    let accepted = po.sent.saturating_sub(po.errors);
    rec.sent = accepted;
    rec.received = arr.total;
    rec.lost = (accepted * subscribed).saturating_sub(arr.total) + failed * accepted;
    let span = po.end_ns.saturating_sub(po.start_ns).max(1) as f64 / 1e9;
    rec.msgs_per_sec = arr.total as f64 / span;
    let mut last: Vec<u64> = arr
        .last_ns
        .iter()
        .zip(&arr.count)
        .filter(|(_, c)| **c > 0)
        .map(|(l, _)| *l)
        .collect();
    rec.lat = Percentiles::from_ns(&mut last);
    rec.put("subscribers", subscribed);
    rec.put("connect_secs", (connect_secs * 10.0).round() / 10.0);
    rec.put("failed_subscribers", failed);
    rec.put("broadcasts", accepted);
    rec.put("closed_by_server", arr.closed);
    if let (Some(b), Some(af)) = (rss_before, rss_after) {
        rec.put("rss_before_kib", b);
        rec.put("rss_after_kib", af);
        rec.put(
            "rss_per_conn_kib",
            ((af.saturating_sub(b)) as f64 / subscribed.max(1) as f64 * 10.0).round() / 10.0,
        );
    }
    if let Some(p) = pid {
        rec.put("server_pid", p);
    }
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &str, tail: &str) -> Vec<u8> {
        format!(
            r#"{{"type":"MESSAGE","unique_id":"00","body":{body},"subscription":"s","queue":"q","exchange":"x","routing_key":"k","delivery_tag":42,"redelivered":true,"published_at":1796645890433{tail}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn key_end_finds_the_last_key_in_the_tail_or_anywhere_after_headers() {
        // The usual frame: both keys in the tail.
        let f = frame(r#"{"p":"x"}"#, "");
        let at = key_end(&f, &REDELIVERED).unwrap();
        assert!(f[at..].starts_with(b"true"));
        let at = key_end(&f, &DELIVERY_TAG).unwrap();
        assert_eq!(payload::num_at(&f, at).map(|(t, _)| t), Some(42));
        // A body that mentions the key does not fool it: the last occurrence wins.
        let f = frame(r#"{"redelivered":false}"#, "");
        let at = key_end(&f, &REDELIVERED).unwrap();
        assert!(f[at..].starts_with(b"true"));
        // Headers push the keys out of the tail: found by the backward search.
        let headers = format!(r#","headers":{{"h":"{}"}}"#, "v".repeat(200));
        let f = frame(r#"{"p":"x"}"#, &headers);
        let at = key_end(&f, &REDELIVERED).unwrap();
        assert!(f[at..].starts_with(b"true"));
        assert_eq!(key_end(b"{}", &REDELIVERED), None);
    }
}
