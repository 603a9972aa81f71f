//! `peers-bench`: pubsub-bench's scenarios run against NATS (127.0.0.1:4222, `nats` sync
//! client) and RabbitMQ (127.0.0.1:5672, `amiquip` client), so that pubsub's numbers have
//! a side-by-side baseline measured on the same machine in the same session.
//!
//! This is a crate of its own (its own `[workspace]` and target dir): the peer client
//! crates never enter pubsub's build or CI. The payload format, the pacing, the idle-socket
//! poller and the output format are the load generator's own files, included by `#[path]`,
//! so both tools send identical messages and print identical JSON lines and table rows.
//!
//! Scenarios (same names and knobs as `pubsub-bench`):
//! - `throughput` / `fanout` / `latency`: NATS publishes on one subject with 1 (or
//!   `--queues`) subscriber connections; RabbitMQ declares a direct/fanout exchange and one
//!   queue per consumer. `--ack manual` (RabbitMQ only) consumes with prefetch and
//!   `basic.ack multiple` every `--ack-every` deliveries.
//! - `connections`: `--subscribers` idle subscriber connections and one broadcast every
//!   `--interval-ms`. NATS subscribers speak the NATS text protocol directly through the
//!   shared poller (the `nats` crate runs threads per connection); RabbitMQ subscribers are
//!   `amiquip` connections with an exclusive queue bound to a fanout exchange.
//! - `durable` (RabbitMQ only): persistent publishes to a durable queue with publisher
//!   confirms and at most `--window` unconfirmed.

#[path = "../../../src/bin/pubsub-bench/fanin.rs"]
mod fanin;
#[path = "../../../src/bin/pubsub-bench/payload.rs"]
mod payload;
#[path = "../../../src/bin/pubsub-bench/plan.rs"]
mod plan;
#[path = "../../../src/bin/pubsub-bench/readbuf.rs"]
mod readbuf;
#[path = "../../../src/bin/pubsub-bench/report.rs"]
mod report;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use amiquip::{
    AmqpProperties, Confirm, ConfirmSmoother, Connection, ConsumerMessage, ConsumerOptions,
    ExchangeDeclareOptions, ExchangeType, FieldTable, Publish, QueueDeclareOptions,
    QueueDeleteOptions,
};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};

use payload::{find, now_ns, stamp_of, write_payload};
use plan::{pace, Plan, HARD_RUN_LIMIT};
use readbuf::ReadBuf;
use report::{Percentiles, Record};

/// Exit status when a scenario does not apply to a system (NATS has no acks or durability).
const EXIT_NOT_APPLICABLE: u8 = 4;
/// Idle connections one thread opens in `connections` (they are opened in parallel).
const CONNECT_THREADS: usize = 8;
/// RabbitMQ connection handshakes in flight at once in `connections`.
const OPEN_IN_FLIGHT: u64 = 64;
/// How long `connections` waits for all RabbitMQ subscribers to be set up.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// Stack of the per-connection RabbitMQ consumer threads in `connections`.
const SMALL_STACK: usize = 128 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum System {
    Nats,
    Rabbitmq,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Throughput,
    Fanout,
    Latency,
    Connections,
    Durable,
}

/// How the NATS side talks to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum NatsClient {
    /// The NATS text protocol written and parsed directly, batched like pubsub-bench's
    /// own WebSocket client (the lean client both sides get by default).
    Raw,
    /// The `nats` crate's sync client (its flusher coalesces writes for up to 5 ms,
    /// which dominates latency at a fixed rate).
    Crate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Ack {
    Auto,
    Manual,
}

/// pubsub-bench's scenarios against NATS and RabbitMQ.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
struct Args {
    system: System,
    scenario: Scenario,
    #[arg(long, default_value = "127.0.0.1:4222")]
    nats_addr: String,
    /// NATS client implementation.
    #[arg(long, value_enum, default_value = "raw")]
    nats_client: NatsClient,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672")]
    amqp_url: String,
    #[arg(long, value_enum, default_value = "auto")]
    ack: Ack,
    #[arg(long, default_value_t = 100)]
    prefetch: u16,
    #[arg(long, default_value_t = 50)]
    ack_every: u64,
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    #[arg(long, default_value_t = 128)]
    size: usize,
    #[arg(long, default_value_t = 4)]
    queues: usize,
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 5000)]
    subscribers: usize,
    #[arg(long, default_value_t = 4)]
    threads: usize,
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    broadcast_for: Duration,
    #[arg(long, default_value_t = 1000)]
    window: u64,
    /// Messages published between checks of the clock in count mode.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Broker pid, for its RSS and CPU time (found through the listening port when absent).
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long)]
    json_only: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?}"))?;
    if !(0.0..=86_400.0).contains(&(v * mul)) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(v * mul))
}

fn main() -> ExitCode {
    let a = Args::parse();
    now_ns();
    report::raise_nofile();
    let applicable =
        !(a.system == System::Nats && (a.scenario == Scenario::Durable || a.ack == Ack::Manual));
    if !applicable {
        eprintln!("peers-bench: NATS core has no acks or durable queues; scenario not applicable");
        return ExitCode::from(EXIT_NOT_APPLICABLE);
    }
    if a.size < payload::MIN_PAYLOAD {
        eprintln!(
            "peers-bench: --size must be at least {}",
            payload::MIN_PAYLOAD
        );
        return ExitCode::FAILURE;
    }
    let tag = format!(
        "bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    let res = match (a.system, a.scenario) {
        (System::Nats, Scenario::Connections) => nats_connections(&a, &tag),
        (System::Nats, s) => queue_run(&a, &tag, s),
        (System::Rabbitmq, Scenario::Connections) => rabbit_connections(&a, &tag),
        (System::Rabbitmq, Scenario::Durable) => rabbit_durable(&a, &tag),
        (System::Rabbitmq, s) => queue_run(&a, &tag, s),
    };
    match res {
        Ok(rec) => {
            if a.json_only {
                println!("{}", rec.json());
            } else {
                rec.print();
            }
            if rec.lost > 0 {
                eprintln!("peers-bench: {} messages lost", rec.lost);
                return ExitCode::from(2);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("peers-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn system_name(s: System) -> &'static str {
    match s {
        System::Nats => "nats",
        System::Rabbitmq => "rabbitmq",
    }
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
    last_ns: u64,
    out_of_order: u64,
}

impl SubOut {
    fn see(&mut self, body: &[u8], next_seq: &mut u64) {
        let now = now_ns();
        if let Some((t, s)) = stamp_of(body) {
            self.received += 1;
            self.last_ns = now;
            self.lat_ns.push(now.saturating_sub(t));
            if s != *next_seq {
                self.out_of_order += 1;
            }
            *next_seq = s + 1;
        }
    }
}

/// When a subscriber should stop: all expected arrived, or the drain timeout passed.
#[derive(Debug)]
struct Stop {
    target: AtomicU64,
    pub_done_ns: AtomicU64,
    drain_ns: u64,
    hard_end: Instant,
}

impl Stop {
    /// All expected arrived, or publishing is over and nothing arrived for the drain
    /// timeout (since `last_ns`, the latest delivery), or the hard limit passed.
    fn reached(&self, received: u64, last_ns: u64) -> bool {
        if received >= self.target.load(Ordering::Acquire) || Instant::now() > self.hard_end {
            return true;
        }
        let d = self.pub_done_ns.load(Ordering::Acquire);
        d > 0 && now_ns() > d.max(last_ns) + self.drain_ns
    }
}

/// `throughput`, `fanout`, `latency` for either peer.
fn queue_run(a: &Args, tag: &str, scenario: Scenario) -> Result<Record> {
    let (n, plan) = match scenario {
        Scenario::Fanout => (a.queues.max(1), Plan::Count(a.messages)),
        Scenario::Latency => (
            1,
            Plan::Rate {
                rate: a.rate.max(1),
                dur: a.duration,
            },
        ),
        _ => (1, Plan::Count(a.messages)),
    };
    let stop = Arc::new(Stop {
        target: AtomicU64::new(u64::MAX),
        pub_done_ns: AtomicU64::new(0),
        drain_ns: a.drain_timeout.as_nanos() as u64,
        hard_end: Instant::now() + HARD_RUN_LIMIT,
    });
    let ready = Arc::new(Barrier::new(n + 1));
    let ex = format!("{tag}-x");
    let queues: Vec<String> = (0..n).map(|i| format!("{tag}-q{i}")).collect();
    let rabbit_setup = if a.system == System::Rabbitmq {
        let kind = if scenario == Scenario::Fanout {
            ExchangeType::Fanout
        } else {
            ExchangeType::Direct
        };
        Some(rabbit_declare(a, &ex, kind, &queues, false)?)
    } else {
        None
    };
    let mut subs = Vec::new();
    for q in &queues {
        let (a2, q2, r2, s2, ex2) = (
            a.clone(),
            q.clone(),
            ready.clone(),
            stop.clone(),
            ex.clone(),
        );
        subs.push(thread::spawn(move || -> Result<SubOut> {
            let gate = Gate::new(&r2);
            let res = match a2.system {
                System::Nats if a2.nats_client == NatsClient::Raw => {
                    nats_raw_run_sub(&a2, &ex2, &gate, &s2)
                }
                System::Nats => nats_sub(&a2, &ex2, &gate, &s2),
                System::Rabbitmq => rabbit_sub(&a2, &q2, &gate, &s2),
            };
            // Release the barrier so a failed subscriber fails the run instead of hanging it.
            gate.pass();
            res
        }));
    }
    ready.wait();
    let cpu = report::CpuMeter::start(broker_pid(a));
    let start = now_ns();
    let pubres = match a.system {
        System::Nats if a.nats_client == NatsClient::Raw => nats_raw_publish(a, &ex, plan),
        System::Nats => nats_publish(a, &ex, plan),
        System::Rabbitmq => rabbit_publish(a, &ex, plan),
    };
    let end = now_ns();
    let sent = match &pubres {
        Ok(s) => *s,
        Err(_) => 0,
    };
    stop.target.store(sent, Ordering::Release);
    stop.pub_done_ns.store(end.max(1), Ordering::Release);
    let mut all = Vec::new();
    let (mut received, mut last, mut ooo) = (0, 0, 0);
    let mut sub_err = None;
    for s in subs {
        match s.join().map_err(|_| anyhow!("subscriber panicked"))? {
            Ok(so) => {
                received += so.received;
                last = last.max(so.last_ns);
                ooo += so.out_of_order;
                all.extend(so.lat_ns);
            }
            Err(e) => sub_err = Some(e),
        }
    }
    let cpu = cpu.per_msg(received);
    if let Some(setup) = rabbit_setup {
        rabbit_teardown(setup, &ex, &queues);
    }
    pubres?;
    if let Some(e) = sub_err {
        return Err(e);
    }
    let name = match (scenario, a.ack) {
        (Scenario::Throughput, Ack::Manual) => "manual_ack",
        (Scenario::Fanout, Ack::Manual) => "fanout_manual_ack",
        (Scenario::Latency, Ack::Manual) => "latency_manual_ack",
        (Scenario::Fanout, _) => "fanout",
        (Scenario::Latency, _) => "latency",
        _ => "throughput",
    };
    let variant = match a.system {
        System::Nats if a.nats_client == NatsClient::Raw => "core-raw",
        System::Nats => "core-crate",
        System::Rabbitmq => "amqp",
    };
    let mut rec = Record::new(system_name(a.system), name, variant);
    for (k, v) in cpu {
        rec.put(k, v);
    }
    let expected = sent * n as u64;
    rec.sent = sent;
    rec.received = received;
    rec.lost = expected.saturating_sub(received);
    rec.msgs_per_sec = received as f64 / (last.saturating_sub(start).max(1) as f64 / 1e9);
    rec.lat = Percentiles::from_ns(&mut all);
    rec.put(
        "publish_per_sec",
        (sent as f64 / (end.saturating_sub(start).max(1) as f64 / 1e9)).round(),
    );
    rec.put("queues", n as u64);
    rec.put("size", a.size as u64);
    if ooo > 0 {
        rec.put("out_of_order", ooo);
    }
    if received > expected {
        rec.put("duplicates", received - expected);
    }
    if a.ack == Ack::Manual {
        rec.put("prefetch", u64::from(a.prefetch));
        rec.put("ack_every", a.ack_every);
    }
    if let Plan::Rate { rate, .. } = plan {
        rec.put("rate", rate);
    }
    Ok(rec)
}

// ---------------------------------------------------------------- NATS

fn nats_sub(a: &Args, subject: &str, ready: &Gate, stop: &Stop) -> Result<SubOut> {
    let nc = nats::connect(a.nats_addr.as_str()).context("nats connect")?;
    let sub = nc.subscribe(subject)?;
    nc.flush()?;
    ready.pass();
    let mut out = SubOut {
        lat_ns: Vec::with_capacity(usize::try_from(a.messages.min(10_000_000)).unwrap_or(0)),
        ..SubOut::default()
    };
    let mut next = 0;
    while !stop.reached(out.received, out.last_ns) {
        if let Ok(m) = sub.next_timeout(Duration::from_millis(50)) {
            out.see(&m.data, &mut next);
            while let Some(m) = sub.try_next() {
                out.see(&m.data, &mut next);
            }
        }
    }
    let dropped = sub.dropped_messages().unwrap_or(0);
    if dropped > 0 {
        eprintln!("nats subscriber dropped {dropped} messages (slow consumer)");
    }
    Ok(out)
}

fn nats_publish(a: &Args, subject: &str, plan: Plan) -> Result<u64> {
    let nc = nats::connect(a.nats_addr.as_str()).context("nats connect")?;
    let mut body = Vec::with_capacity(a.size);
    let mut sent = 0u64;
    pace(plan, a.batch.max(1), |seq, n| -> Result<()> {
        for i in 0..n {
            body.clear();
            write_payload(&mut body, now_ns(), seq + i, a.size);
            // The client's flusher thread writes it out right away; `flush()` would add a
            // PING/PONG round trip per message.
            nc.publish(subject, &body)?;
        }
        sent += n;
        Ok(())
    })?;
    nc.flush()?;
    Ok(sent)
}

/// Publishes `plan` on `subject` with the NATS text protocol, one `write` per batch, and
/// ends with a `PING`/`PONG` so every message has reached the server.
fn nats_raw_publish(a: &Args, subject: &str, plan: Plan) -> Result<u64> {
    let mut s = nats_raw_conn(&a.nats_addr, "")?;
    let mut out = Vec::with_capacity(a.batch.max(1) * (a.size + 64));
    let mut sent = 0u64;
    let head = format!("PUB {subject} ");
    let mut body = Vec::with_capacity(a.size);
    pace(plan, a.batch.max(1), |seq, n| -> Result<()> {
        out.clear();
        for i in 0..n {
            body.clear();
            write_payload(&mut body, now_ns(), seq + i, a.size);
            out.extend_from_slice(head.as_bytes());
            payload::push_u64(&mut out, body.len() as u64);
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&body);
            out.extend_from_slice(b"\r\n");
        }
        s.write_all(&out)?;
        sent += n;
        Ok(())
    })?;
    s.write_all(b"PING\r\n")?;
    wait_pong(&mut s)?;
    Ok(sent)
}

/// Reads until the server's `PONG` (skipping anything else).
fn wait_pong(s: &mut TcpStream) -> Result<()> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = Instant::now() + Duration::from_secs(30);
    while find(&got, b"PONG\r\n").is_none() {
        if Instant::now() > end {
            bail!("no PONG from nats");
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("nats closed the connection");
        }
        got.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
        if find(&got, b"-ERR").is_some() {
            bail!("nats refused: {}", String::from_utf8_lossy(&got));
        }
    }
    Ok(())
}

/// A raw NATS subscriber reading with the shared parser on its own blocking socket.
fn nats_raw_run_sub(a: &Args, subject: &str, ready: &Gate, stop: &Stop) -> Result<SubOut> {
    let mut s = nats_raw_conn(&a.nats_addr, subject)?;
    ready.pass();
    s.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut out = SubOut {
        lat_ns: Vec::with_capacity(usize::try_from(a.messages.min(10_000_000)).unwrap_or(0)),
        ..SubOut::default()
    };
    let mut parser = NatsSub::default();
    let mut reply = Vec::new();
    let mut next = 0u64;
    while !stop.reached(out.received, out.last_ns) {
        match parser.rb.read_from(&mut s) {
            Ok(0) => break,
            Ok(_) => {
                let now = now_ns();
                parser.parse(&mut reply, &mut |t, seq| {
                    out.received += 1;
                    out.last_ns = now;
                    out.lat_ns.push(now.saturating_sub(t));
                    if seq != next {
                        out.out_of_order += 1;
                    }
                    next = seq + 1;
                });
                if !reply.is_empty() {
                    s.write_all(&reply)?;
                    reply.clear();
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// A NATS subscriber's parser: parses `MSG` and answers `PING`, where the socket read
/// put the bytes (`ReadBuf`, as pubsub-bench's WebSocket reader does).
#[derive(Debug, Default)]
struct NatsSub {
    rb: ReadBuf,
}

impl fanin::Proto for NatsSub {
    /// One idle subscriber in the shared poller, which reads for it.
    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>, on_msg: &mut dyn FnMut(u64, u64)) {
        self.rb.extend(data);
        self.parse(out, on_msg);
    }
}

impl NatsSub {
    /// Parses every complete line and message received so far.
    fn parse(&mut self, out: &mut Vec<u8>, on_msg: &mut dyn FnMut(u64, u64)) {
        let mut pos = 0;
        loop {
            let rest = self.rb.data().get(pos..).unwrap_or(&[]);
            let Some(eol) = payload::find_crlf(rest) else {
                break;
            };
            let line = rest.get(..eol).unwrap_or(&[]);
            if line.starts_with(b"MSG ") {
                let len: Option<usize> = std::str::from_utf8(line)
                    .ok()
                    .and_then(|l| l.split_whitespace().last())
                    .and_then(|n| n.parse().ok());
                let Some(len) = len else {
                    pos += eol + 2;
                    continue;
                };
                if rest.len() < eol + 2 + len + 2 {
                    break;
                }
                if let Some((t, s)) = rest.get(eol + 2..eol + 2 + len).and_then(stamp_of) {
                    on_msg(t, s);
                }
                pos += eol + 2 + len + 2;
            } else {
                if line == b"PING" {
                    out.extend_from_slice(b"PONG\r\n");
                }
                pos += eol + 2;
            }
        }
        self.rb.consume(pos);
    }
}

/// Opens one raw NATS connection (subscribed to `subject` unless it is empty) and waits
/// until the server has processed the `CONNECT` (and `SUB`).
fn nats_raw_conn(addr: &str, subject: &str) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let sub = if subject.is_empty() {
        String::new()
    } else {
        format!("SUB {subject} 1\r\n")
    };
    let req = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"lang\":\"rust\",\"version\":\"bench\"}}\r\n{sub}PING\r\n"
    );
    s.write_all(req.as_bytes())?;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while find(&got, b"PONG\r\n").is_none() {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("nats closed during subscribe");
        }
        got.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
        if find(&got, b"-ERR").is_some() {
            bail!("nats refused: {}", String::from_utf8_lossy(&got));
        }
    }
    Ok(s)
}

/// The broker's pid: `--server-pid`, or whoever listens on the port of `--nats-addr`
/// (NATS) or `--amqp-url` (RabbitMQ, 5672 when the URL names none).
fn broker_pid(a: &Args) -> Option<u32> {
    a.server_pid.or_else(|| {
        let port = match a.system {
            System::Nats => a.nats_addr.rsplit(':').next()?.parse().ok()?,
            System::Rabbitmq => a
                .amqp_url
                .rsplit(':')
                .next()
                .and_then(|p| p.trim_end_matches('/').parse().ok())
                .unwrap_or(5672),
        };
        report::pid_listening_on(port)
    })
}

fn nats_connections(a: &Args, tag: &str) -> Result<Record> {
    let pid = broker_pid(a);
    let rss_before = pid.and_then(report::rss_kib);
    let subject = format!("{tag}-x");
    let n = a.subscribers.max(1);
    let threads = a.threads.clamp(1, 64);
    let broadcasts = (a.broadcast_for.as_millis() as u64 / a.interval_ms.max(1)).max(1);
    let max_seq = usize::try_from(broadcasts).unwrap_or(usize::MAX);
    let stop = Arc::new(AtomicBool::new(false));
    let connected = Arc::new(Barrier::new(threads + 1));
    let failures = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + HARD_RUN_LIMIT;
    let mut handles = Vec::new();
    let t0 = Instant::now();
    for ti in 0..threads {
        let share = n / threads + usize::from(ti < n % threads);
        let (addr, subj, stop2, conn2, fail2) = (
            a.nats_addr.clone(),
            subject.clone(),
            stop.clone(),
            connected.clone(),
            failures.clone(),
        );
        handles.push(thread::spawn(move || {
            let mut conns = Vec::with_capacity(share);
            for _ in 0..share {
                match nats_raw_conn(&addr, &subj) {
                    Ok(s) => conns.push((s, NatsSub::default())),
                    Err(e) => {
                        if fail2.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("nats subscriber: {e:#}");
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
    let connect_secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "connections: {} subscribed ({failed} failed) in {connect_secs:.1} s",
        n as u64 - failed
    );
    thread::sleep(Duration::from_millis(1000));
    let rss_after = pid.and_then(report::rss_kib);
    let plan = Plan::Every {
        n: broadcasts,
        every: Duration::from_millis(a.interval_ms.max(1)),
    };
    let start = now_ns();
    let sent = match a.nats_client {
        NatsClient::Raw => nats_raw_publish(a, &subject, plan),
        NatsClient::Crate => nats_publish(a, &subject, plan),
    };
    let end = now_ns();
    thread::sleep(a.drain_timeout.min(Duration::from_secs(1)));
    stop.store(true, Ordering::Release);
    let mut arr = fanin::Arrivals::with_len(max_seq);
    for h in handles {
        arr.merge(&h.join().map_err(|_| anyhow!("poll thread panicked"))?);
    }
    let sent = sent?;
    connections_record(
        "nats",
        match a.nats_client {
            NatsClient::Raw => "core-raw",
            NatsClient::Crate => "core-crate",
        },
        ConnOutcome {
            n: n as u64,
            failed,
            sent,
            arr,
            start,
            end,
            rss: (rss_before, rss_after),
            pid,
            connect_secs,
        },
    )
}

/// Everything a `connections` run measured.
struct ConnOutcome {
    n: u64,
    failed: u64,
    sent: u64,
    arr: fanin::Arrivals,
    start: u64,
    end: u64,
    rss: (Option<u64>, Option<u64>),
    pid: Option<u32>,
    connect_secs: f64,
}

fn connections_record(system: &str, variant: &str, o: ConnOutcome) -> Result<Record> {
    let subscribed = o.n - o.failed;
    let mut rec = Record::new(system, "connections", variant);
    rec.sent = o.sent;
    rec.received = o.arr.total;
    rec.lost = (o.sent * subscribed).saturating_sub(o.arr.total) + o.failed * o.sent;
    rec.msgs_per_sec = o.arr.total as f64 / (o.end.saturating_sub(o.start).max(1) as f64 / 1e9);
    let mut last: Vec<u64> = o
        .arr
        .last_ns
        .iter()
        .zip(&o.arr.count)
        .filter(|(_, c)| **c > 0)
        .map(|(l, _)| *l)
        .collect();
    rec.lat = Percentiles::from_ns(&mut last);
    rec.put("subscribers", subscribed);
    rec.put("connect_secs", (o.connect_secs * 10.0).round() / 10.0);
    rec.put("failed_subscribers", o.failed);
    rec.put("broadcasts", o.sent);
    rec.put("closed_by_server", o.arr.closed);
    if let (Some(b), Some(af)) = o.rss {
        rec.put("rss_before_kib", b);
        rec.put("rss_after_kib", af);
        rec.put(
            "rss_per_conn_kib",
            (af.saturating_sub(b) as f64 / subscribed.max(1) as f64 * 10.0).round() / 10.0,
        );
    }
    if let Some(p) = o.pid {
        rec.put("server_pid", p);
    }
    Ok(rec)
}

// ---------------------------------------------------------------- RabbitMQ

/// The connection that declared the topology (kept to delete it afterwards).
struct RabbitSetup {
    conn: Connection,
}

fn rabbit_declare(
    a: &Args,
    ex: &str,
    kind: ExchangeType,
    queues: &[String],
    durable: bool,
) -> Result<RabbitSetup> {
    let mut conn = Connection::insecure_open(&a.amqp_url).context("amqp connect")?;
    {
        let ch = conn.open_channel(None)?;
        let exchange = ch.exchange_declare(
            kind,
            ex,
            ExchangeDeclareOptions {
                durable,
                ..ExchangeDeclareOptions::default()
            },
        )?;
        for q in queues {
            let queue = ch.queue_declare(
                q.as_str(),
                QueueDeclareOptions {
                    durable,
                    ..QueueDeclareOptions::default()
                },
            )?;
            queue.bind(&exchange, "k", FieldTable::default())?;
        }
        ch.close()?;
    }
    Ok(RabbitSetup { conn })
}

fn rabbit_teardown(mut setup: RabbitSetup, ex: &str, queues: &[String]) {
    if let Ok(ch) = setup.conn.open_channel(None) {
        for q in queues {
            let _ = ch.queue_delete(q.as_str(), QueueDeleteOptions::default());
        }
        let _ = ch.exchange_delete(ex, false);
        let _ = ch.close();
    }
    let _ = setup.conn.close();
}

fn rabbit_sub(a: &Args, queue: &str, ready: &Gate, stop: &Stop) -> Result<SubOut> {
    let mut conn = Connection::insecure_open(&a.amqp_url).context("amqp connect")?;
    let ch = conn.open_channel(None)?;
    let manual = a.ack == Ack::Manual;
    if manual {
        ch.qos(0, a.prefetch, false)?;
    }
    let consumer = ch.basic_consume(
        queue,
        ConsumerOptions {
            no_ack: !manual,
            ..ConsumerOptions::default()
        },
    )?;
    ready.pass();
    let mut out = SubOut {
        lat_ns: Vec::with_capacity(usize::try_from(a.messages.min(10_000_000)).unwrap_or(0)),
        ..SubOut::default()
    };
    let mut next = 0;
    let mut unacked = 0u64;
    let mut pending_ack = None;
    while !stop.reached(out.received, out.last_ns) {
        match consumer.receiver().recv_timeout(Duration::from_millis(50)) {
            Ok(ConsumerMessage::Delivery(d)) => {
                out.see(&d.body, &mut next);
                if manual {
                    unacked += 1;
                    if unacked >= a.ack_every.max(1) {
                        consumer.ack_multiple(d)?;
                        unacked = 0;
                        pending_ack = None;
                    } else {
                        pending_ack = Some(d);
                    }
                }
            }
            Ok(_) => break,
            Err(_) => {}
        }
    }
    if let Some(d) = pending_ack {
        let _ = consumer.ack_multiple(d);
    }
    let _ = consumer.cancel();
    drop(consumer);
    let _ = ch.close();
    let _ = conn.close();
    Ok(out)
}

fn rabbit_publish(a: &Args, ex: &str, plan: Plan) -> Result<u64> {
    let mut conn = Connection::insecure_open(&a.amqp_url).context("amqp connect")?;
    let ch = conn.open_channel(None)?;
    let mut body = Vec::with_capacity(a.size);
    let mut sent = 0u64;
    pace(plan, a.batch.max(1), |seq, n| -> Result<()> {
        for i in 0..n {
            body.clear();
            write_payload(&mut body, now_ns(), seq + i, a.size);
            ch.basic_publish(ex, Publish::new(&body, "k"))?;
        }
        sent += n;
        Ok(())
    })?;
    let _ = ch.close();
    let _ = conn.close();
    Ok(sent)
}

fn rabbit_durable(a: &Args, tag: &str) -> Result<Record> {
    let ex = format!("{tag}-x");
    let queues = vec![format!("{tag}-q0")];
    let setup = rabbit_declare(a, &ex, ExchangeType::Direct, &queues, true)?;
    let res = (|| -> Result<(u64, u64, u64, Vec<u64>, u64, u64)> {
        let mut conn = Connection::insecure_open(&a.amqp_url).context("amqp connect")?;
        let ch = conn.open_channel(None)?;
        let confirms = ch.listen_for_publisher_confirms()?;
        ch.enable_publisher_confirms()?;
        let mut smoother = ConfirmSmoother::new();
        let mut inflight: VecDeque<u64> = VecDeque::new();
        let mut lat = Vec::with_capacity(usize::try_from(a.messages).unwrap_or(0));
        let (mut acked, mut nacked, mut last_confirm) = (0u64, 0u64, 0u64);
        let mut body = Vec::with_capacity(a.size);
        let props = AmqpProperties::default().with_delivery_mode(2);
        let mut handle = |c: Confirm,
                          inflight: &mut VecDeque<u64>,
                          lat: &mut Vec<u64>,
                          acked: &mut u64,
                          nacked: &mut u64,
                          last: &mut u64| {
            let now = now_ns();
            for one in smoother.process(c) {
                let t = inflight.pop_front().unwrap_or(now);
                match one {
                    Confirm::Ack(_) => {
                        *acked += 1;
                        lat.push(now.saturating_sub(t));
                    }
                    Confirm::Nack(_) => *nacked += 1,
                }
                *last = now;
            }
        };
        let start = now_ns();
        let mut sent = 0u64;
        let window = a.window.max(1) as usize;
        let hard_end = Instant::now() + HARD_RUN_LIMIT;
        while sent < a.messages && Instant::now() < hard_end {
            while inflight.len() >= window {
                match confirms.recv_timeout(a.drain_timeout) {
                    Ok(c) => handle(
                        c,
                        &mut inflight,
                        &mut lat,
                        &mut acked,
                        &mut nacked,
                        &mut last_confirm,
                    ),
                    Err(_) => bail!("no confirm within the drain timeout"),
                }
            }
            while let Ok(c) = confirms.try_recv() {
                handle(
                    c,
                    &mut inflight,
                    &mut lat,
                    &mut acked,
                    &mut nacked,
                    &mut last_confirm,
                );
            }
            body.clear();
            let t = now_ns();
            write_payload(&mut body, t, sent, a.size);
            ch.basic_publish(
                ex.as_str(),
                Publish::with_properties(&body, "k", props.clone()),
            )?;
            inflight.push_back(t);
            sent += 1;
        }
        let drain_end = Instant::now() + a.drain_timeout;
        while !inflight.is_empty() && Instant::now() < drain_end {
            if let Ok(c) = confirms.recv_timeout(Duration::from_millis(50)) {
                handle(
                    c,
                    &mut inflight,
                    &mut lat,
                    &mut acked,
                    &mut nacked,
                    &mut last_confirm,
                );
            }
        }
        let _ = ch.close();
        let _ = conn.close();
        Ok((sent, acked, nacked, lat, start, last_confirm))
    })();
    rabbit_teardown(setup, &ex, &queues);
    let (sent, acked, nacked, mut lat, start, last) = res?;
    let mut rec = Record::new("rabbitmq", "durable", "amqp-persistent");
    rec.sent = sent;
    rec.received = acked;
    rec.lost = sent.saturating_sub(acked);
    rec.msgs_per_sec = acked as f64 / (last.saturating_sub(start).max(1) as f64 / 1e9);
    rec.lat = Percentiles::from_ns(&mut lat);
    rec.put("window", a.window);
    rec.put("nacked", nacked);
    Ok(rec)
}

fn rabbit_connections(a: &Args, tag: &str) -> Result<Record> {
    let ex = format!("{tag}-x");
    let setup = rabbit_declare(a, &ex, ExchangeType::Fanout, &[], false)?;
    let pid = broker_pid(a);
    thread::sleep(Duration::from_millis(300));
    let rss_before = pid.and_then(report::tree_rss_kib);
    let n = a.subscribers.max(1);
    let broadcasts = (a.broadcast_for.as_millis() as u64 / a.interval_ms.max(1)).max(1);
    let max_seq = usize::try_from(broadcasts).unwrap_or(usize::MAX);
    let arr = Arc::new(Mutex::new(fanin::Arrivals::with_len(max_seq)));
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(AtomicU64::new(0));
    // Open the connections from a few threads; each subscriber then gets a small thread
    // blocking on its consumer (amiquip runs one I/O thread per connection anyway).
    let mut openers = Vec::new();
    let t0 = Instant::now();
    let open_deadline = t0 + OPEN_TIMEOUT;
    let subs: Arc<Mutex<Vec<thread::JoinHandle<()>>>> = Arc::default();
    for ti in 0..CONNECT_THREADS {
        let share = n / CONNECT_THREADS + usize::from(ti < n % CONNECT_THREADS);
        let (url, ex2, arr2, stop2, fail2, ready2, subs2) = (
            a.amqp_url.clone(),
            ex.clone(),
            arr.clone(),
            stop.clone(),
            failures.clone(),
            ready.clone(),
            subs.clone(),
        );
        openers.push(thread::spawn(move || {
            for _ in 0..share {
                let (url3, ex3, arr3, stop3, fail3, ready3) = (
                    url.clone(),
                    ex2.clone(),
                    arr2.clone(),
                    stop2.clone(),
                    fail2.clone(),
                    ready2.clone(),
                );
                let h = thread::Builder::new()
                    .stack_size(SMALL_STACK)
                    .spawn(move || {
                        let r = rabbit_idle_sub(&url3, &ex3, &arr3, &stop3, &ready3);
                        if let Err(e) = r {
                            if fail3.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!("rabbitmq subscriber: {e:#}");
                            }
                            ready3.fetch_add(1, Ordering::Release);
                        }
                    });
                match h {
                    Ok(h) => {
                        if let Ok(mut g) = subs2.lock() {
                            g.push(h);
                        }
                    }
                    Err(_) => {
                        fail2.fetch_add(1, Ordering::Relaxed);
                        ready2.fetch_add(1, Ordering::Release);
                    }
                }
                // Pace connection opening so the broker's accept queue is not overrun;
                // a broker out of sockets never answers, so give up at the deadline.
                while ready2.load(Ordering::Acquire) + OPEN_IN_FLIGHT
                    < (subs2.lock().map(|g| g.len()).unwrap_or(0) as u64)
                {
                    if Instant::now() > open_deadline {
                        return;
                    }
                    thread::sleep(Duration::from_millis(1));
                }
            }
        }));
    }
    for o in openers {
        let _ = o.join();
    }
    while ready.load(Ordering::Acquire) < n as u64 && Instant::now() < open_deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let failed =
        failures.load(Ordering::Relaxed) + (n as u64).saturating_sub(ready.load(Ordering::Acquire));
    let connect_secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "connections: {} subscribed ({failed} failed) in {connect_secs:.1} s",
        n as u64 - failed
    );
    thread::sleep(Duration::from_millis(1000));
    let rss_after = pid.and_then(report::tree_rss_kib);
    let plan = Plan::Every {
        n: broadcasts,
        every: Duration::from_millis(a.interval_ms.max(1)),
    };
    let start = now_ns();
    let sent = rabbit_publish(a, &ex, plan);
    let end = now_ns();
    thread::sleep(a.drain_timeout.min(Duration::from_secs(1)));
    stop.store(true, Ordering::Release);
    let handles = subs
        .lock()
        .map(|mut g| std::mem::take(&mut *g))
        .unwrap_or_default();
    // Subscribers stuck in a handshake the broker never answers are left to the process
    // exit; the others see `stop` within their receive timeout.
    let join_end = Instant::now() + Duration::from_secs(10);
    for h in handles {
        while !h.is_finished() && Instant::now() < join_end {
            thread::sleep(Duration::from_millis(10));
        }
        if h.is_finished() {
            let _ = h.join();
        }
    }
    rabbit_teardown(setup, &ex, &[]);
    let sent = sent?;
    let arr = arr
        .lock()
        .map(|g| g.clone())
        .map_err(|_| anyhow!("arrivals poisoned"))?;
    connections_record(
        "rabbitmq",
        "amqp",
        ConnOutcome {
            n: n as u64,
            failed,
            sent,
            arr,
            start,
            end,
            rss: (rss_before, rss_after),
            pid,
            connect_secs,
        },
    )
}

/// One idle RabbitMQ subscriber: its own connection, an exclusive server-named queue bound
/// to the fanout exchange, an auto-ack consumer; records broadcasts until `stop`.
fn rabbit_idle_sub(
    url: &str,
    ex: &str,
    arr: &Mutex<fanin::Arrivals>,
    stop: &AtomicBool,
    ready: &AtomicU64,
) -> Result<()> {
    let mut conn = Connection::insecure_open(url)?;
    let ch = conn.open_channel(None)?;
    let q = ch.queue_declare(
        "",
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        },
    )?;
    ch.queue_bind(q.name(), ex, "", FieldTable::default())?;
    let consumer = q.consume(ConsumerOptions {
        no_ack: true,
        ..ConsumerOptions::default()
    })?;
    ready.fetch_add(1, Ordering::Release);
    while !stop.load(Ordering::Acquire) {
        match consumer.receiver().recv_timeout(Duration::from_millis(100)) {
            Ok(ConsumerMessage::Delivery(d)) => {
                let now = now_ns();
                if let Some((t, s)) = stamp_of(&d.body) {
                    if let Ok(mut g) = arr.lock() {
                        g.record(t, s, now);
                    }
                }
            }
            Ok(_) => break,
            Err(_) => {}
        }
    }
    drop(consumer);
    let _ = ch.close();
    let _ = conn.close();
    Ok(())
}
