//! Shared harness for the contract integration tests (`tests/contract_*.rs`).
//!
//! Every test starts its own `pubsub` process through [`Server`] on a free port with a
//! private data directory, and talks to it with real clients: `ureq` for ordinary HTTP
//! ([`Server::req`] and friends), a minimal keep-alive client over `std::net::TcpStream`
//! for byte-level checks ([`RawHttp`]: pipelining, oversized heads, chunked bodies, raw
//! error bodies), and tungstenite's WebSocket client ([`Ws`]). Every read has a timeout
//! so that a broken server fails a test instead of hanging it; waiting for asynchronous
//! effects is done by polling against a deadline ([`wait_until`]), never by long sleeps.
//!
//! Every JSON body read through `json()` or `assert_error*()` must also carry
//! `Content-Type: application/json`, as the contract says.
//!
//! The wire contract these helpers speak is `shared/protocol.md`. Set `PUBSUB_TEST_BIN`
//! to run the suite against another build of the server (default: this crate's `pubsub`).
#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::protocol::WebSocket;
use tungstenite::Message;

/// How long the server may take to answer `GET /healthz` after it was spawned.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Default wait for a frame or response that is expected to arrive.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to listen for a frame that must NOT arrive.
pub const QUIET: Duration = Duration::from_millis(300);
/// How long the server may take to exit after SIGTERM (final checkpoint included).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Name of the header that names the shard serving a connection.
pub const SHARD_HEADER: &str = "x-pubsub-shard";

static COUNTER: AtomicU64 = AtomicU64::new(0);
static PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A free port on 127.0.0.1 that this test process has not handed out before.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut ports = PORTS.lock().unwrap_or_else(|e| e.into_inner());
        if ports.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

/// Polls `f` until it returns true or `timeout` passes; panics with `what` on timeout.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// True when `s` is a non-empty snake_case identifier (`[a-z][a-z0-9]*(_[a-z0-9]+)*`).
pub fn is_snake_case(s: &str) -> bool {
    !s.is_empty()
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('_')
        && !s.contains("__")
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Percent-encodes one path segment (everything but unreserved characters).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Server process guard
// ---------------------------------------------------------------------------

/// A running `pubsub` process on its own port and data directory; killed on drop.
pub struct Server {
    pub addr: SocketAddr,
    child: Option<Child>,
    root: PathBuf,
    data_dir: PathBuf,
    args: Vec<String>,
    starts: u32,
    agent: ureq::Agent,
}

impl Server {
    /// Starts the server with the default flags.
    pub fn start() -> Server {
        Server::with_args(&[])
    }

    /// Starts the server with `--listen`, `--data-dir` and the extra `args`.
    pub fn with_args(args: &[&str]) -> Server {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let root =
            std::env::temp_dir().join(format!("pubsub-it-{}-{}-{}", std::process::id(), n, nanos));
        let data_dir = root.join("data");
        std::fs::create_dir_all(&data_dir).unwrap();
        let port = free_port();
        let mut server = Server {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: None,
            root,
            data_dir,
            args: args.iter().map(|s| s.to_string()).collect(),
            starts: 0,
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(20))
                .build(),
        };
        server.spawn();
        server
    }

    fn log_path(&self) -> PathBuf {
        self.root.join(format!("stderr-{}.log", self.starts))
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).unwrap();
        let out = log.try_clone().unwrap();
        // PUBSUB_TEST_BIN runs the suite against another build of the server.
        let bin = std::env::var_os("PUBSUB_TEST_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_pubsub").into());
        let child = Command::new(bin)
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_healthy();
    }

    /// The tail of the server's stderr/stdout of the current run.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read(self.log_path()).unwrap_or_default();
        let start = text.len().saturating_sub(8192);
        String::from_utf8_lossy(&text[start..]).into_owned()
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "pubsub exited during start-up ({status}); its output:\n{}",
                        self.log_tail()
                    );
                }
            }
            if self.probe_health() {
                return;
            }
            if Instant::now() >= deadline {
                let tail = self.log_tail();
                self.kill9();
                panic!("pubsub did not answer GET /healthz within {STARTUP_TIMEOUT:?}; its output:\n{tail}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn probe_health(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let req = format!(
            "GET /healthz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        );
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        while got.len() < 12 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got.starts_with(b"HTTP/1.1 200")
    }

    /// Kills the process with SIGKILL (no shutdown hook runs) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the process (if running) and starts it again on the same port, data
    /// directory and flags.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Stops the process gracefully with SIGTERM (the server writes a final checkpoint)
    /// and waits for it to exit; panics with its output if it does not exit within
    /// [`STOP_TIMEOUT`]. Returns the exit status. [`Server::restart`] starts it again.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let Some(mut child) = self.child.take() else {
            panic!("terminate: the server is not running");
        };
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        // SAFETY: `pid` is our own child, not yet reaped (we hold its `Child`), so the
        // number cannot have been reused by another process.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(
            rc,
            0,
            "kill(SIGTERM) failed: {}",
            std::io::Error::last_os_error()
        );
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "pubsub did not exit within {STOP_TIMEOUT:?} of SIGTERM; its output:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The whole stderr/stdout of start number `n` (1 = the first run).
    pub fn log_of_start(&self, n: u32) -> String {
        let text = std::fs::read(self.root.join(format!("stderr-{n}.log"))).unwrap_or_default();
        String::from_utf8_lossy(&text).into_owned()
    }

    /// How many times the process was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    // --- HTTP through ureq -------------------------------------------------

    /// Sends `method path` with an optional raw JSON body; never panics on a status.
    pub fn req(&self, method: &str, path: &str, body: Option<&str>) -> Resp {
        let r = self.agent.request(method, &self.url(path));
        let result = match body {
            Some(b) => r.set("Content-Type", "application/json").send_string(b),
            None => r.call(),
        };
        let resp = match result {
            Ok(resp) => resp,
            Err(ureq::Error::Status(_, resp)) => resp,
            Err(e) => panic!(
                "{method} {path}: transport error: {e}\nserver output:\n{}",
                self.log_tail()
            ),
        };
        let status = resp.status();
        let headers = resp
            .headers_names()
            .into_iter()
            .filter_map(|n| {
                resp.header(&n)
                    .map(|v| (n.to_ascii_lowercase(), v.to_string()))
            })
            .collect();
        let body = resp.into_string().unwrap();
        Resp {
            status,
            headers,
            body,
        }
    }

    pub fn get(&self, path: &str) -> Resp {
        self.req("GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Resp {
        self.req("POST", path, Some(&body.to_string()))
    }

    pub fn post_raw(&self, path: &str, body: &str) -> Resp {
        self.req("POST", path, Some(body))
    }

    pub fn delete(&self, path: &str) -> Resp {
        self.req("DELETE", path, None)
    }

    pub fn delete_json(&self, path: &str, body: &Value) -> Resp {
        self.req("DELETE", path, Some(&body.to_string()))
    }

    /// `POST /exchanges`, asserting 201.
    pub fn exchange(&self, name: &str, kind: &str) {
        let r = self.post("/exchanges", &json!({"name": name, "type": kind}));
        assert_eq!(r.status, 201, "declare exchange {name}: {r:?}");
    }

    /// `POST /queues` with `{"name"}` merged with `extra`, asserting 201.
    pub fn queue_with(&self, name: &str, extra: Value) {
        let mut body = json!({"name": name});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let r = self.post("/queues", &body);
        assert_eq!(r.status, 201, "declare queue {body}: {r:?}");
    }

    pub fn queue(&self, name: &str) {
        self.queue_with(name, json!({}));
    }

    /// `POST /bindings`, asserting 201.
    pub fn bind(&self, exchange: &str, queue: &str, key: &str) {
        let r = self.post(
            "/bindings",
            &json!({"exchange_name": exchange, "queue_name": queue, "key": key}),
        );
        assert_eq!(r.status, 201, "bind {exchange} -> {queue} ({key:?}): {r:?}");
    }

    /// Declares `exchange` of `kind`, queue `queue`, and binds them with `key`.
    pub fn topology(&self, exchange: &str, kind: &str, queue: &str, key: &str) {
        self.exchange(exchange, kind);
        self.queue(queue);
        self.bind(exchange, queue, key);
    }

    /// `POST /publish` with `payload` spliced in verbatim; asserts 200 and returns the reply.
    pub fn publish_raw(&self, exchange: &str, key: &str, payload: &str) -> Value {
        let body = publish_body(exchange, key, payload, "");
        let r = self.post_raw("/publish", &body);
        assert_eq!(r.status, 200, "publish {body}: {r:?}");
        let v = r.json();
        assert!(v["id"].is_string(), "publish reply without string id: {v}");
        assert!(
            v["routed"].is_u64(),
            "publish reply without routed count: {v}"
        );
        v
    }

    /// `POST /publish` of a JSON `payload`; returns the reply.
    pub fn publish(&self, exchange: &str, key: &str, payload: &Value) -> Value {
        self.publish_raw(exchange, key, &payload.to_string())
    }

    /// `GET /queues/{name}`, asserting 200.
    pub fn queue_info(&self, name: &str) -> Value {
        let r = self.get(&format!("/queues/{}", encode_segment(name)));
        assert_eq!(r.status, 200, "GET /queues/{name}: {r:?}");
        r.json()
    }

    /// Waits until the queue reports `ready` ready and `unacked` unacked messages.
    pub fn wait_queue_counts(&self, name: &str, ready: u64, unacked: u64) {
        let deadline = Instant::now() + RECV_TIMEOUT;
        loop {
            let last = self.queue_info(name);
            if last["messages_ready"].as_u64() == Some(ready)
                && last["messages_unacked"].as_u64() == Some(unacked)
            {
                return;
            }
            if Instant::now() >= deadline {
                panic!("queue {name}: wanted ready={ready} unacked={unacked}, last seen {last}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    // --- other clients -------------------------------------------------------

    pub fn raw(&self) -> RawHttp {
        RawHttp::connect(self.addr)
    }

    pub fn ws(&self) -> Ws {
        Ws::connect(self.addr)
    }

    /// Opens WebSocket connections until one lands on `shard` (by the 101's header).
    pub fn ws_on_shard(&self, shard: u32) -> Ws {
        for _ in 0..500 {
            let ws = self.ws();
            if ws.shard == shard {
                return ws;
            }
        }
        panic!("no WebSocket connection landed on shard {shard} in 500 attempts");
    }

    /// Drains `queue` with an auto-ack subscription until the queue reports nothing
    /// ready or unacked and no frame came for a moment; returns the `MESSAGE` frames.
    /// Panics after `timeout`.
    pub fn drain(&self, queue: &str, timeout: Duration) -> Vec<Value> {
        let mut ws = self.ws();
        ws.subscribe_with(json!({"queue_name": queue, "prefetch": 1000}));
        let mut got = Vec::new();
        let deadline = Instant::now() + timeout;
        loop {
            assert!(
                Instant::now() < deadline,
                "queue {queue} not drained within {timeout:?}: got {}, now {}",
                got.len(),
                self.queue_info(queue)
            );
            match ws.recv_json_timeout(Duration::from_millis(300)) {
                Some(v) => {
                    assert_eq!(v["type"], "MESSAGE", "unexpected frame while draining: {v}");
                    got.push(v);
                }
                None => {
                    let info = self.queue_info(queue);
                    if info["messages_ready"] == 0 && info["messages_unacked"] == 0 {
                        return got;
                    }
                }
            }
        }
    }

    /// Opens raw HTTP connections until one is served by `shard`.
    pub fn raw_on_shard(&self, shard: u32) -> RawHttp {
        for _ in 0..500 {
            let mut c = self.raw();
            let r = c.request("GET", "/healthz", None);
            assert_eq!(r.status, 200);
            if r.shard() == shard {
                return c;
            }
        }
        panic!("no HTTP connection landed on shard {shard} in 500 attempts");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let tail = if std::thread::panicking() {
            Some(self.log_tail())
        } else {
            None
        };
        self.kill9();
        if let Some(tail) = tail {
            eprintln!(
                "---- pubsub output ({}) ----\n{tail}\n---- end ----",
                self.addr
            );
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The raw body of a `POST /publish` or WS `PUBLISH`; `extra` is spliced in as
/// further members (e.g. `,"confirm":true`).
pub fn publish_body(exchange: &str, key: &str, payload: &str, extra: &str) -> String {
    format!(
        "{{\"exchange_name\":{},\"key\":{},\"payload\":{payload}{extra}}}",
        Value::from(exchange),
        Value::from(key)
    )
}

/// One HTTP response as ureq saw it.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    /// Lower-cased names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    /// The body parsed as JSON; also asserts `Content-Type: application/json`.
    pub fn json(&self) -> Value {
        assert_json_content_type(self.header("content-type"), &self.body);
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Asserts `status` and the contract's error body; returns `error.code`.
    pub fn assert_error(&self, status: u16) -> String {
        assert_eq!(self.status, status, "unexpected status: {self:?}");
        assert_json_content_type(self.header("content-type"), &self.body);
        assert_error_body(&self.body)
    }

    /// Asserts some 4xx status and the contract's error body; returns `error.code`.
    pub fn assert_4xx(&self) -> String {
        assert!(
            (400..500).contains(&self.status),
            "expected a 4xx answer: {self:?}"
        );
        assert_json_content_type(self.header("content-type"), &self.body);
        assert_error_body(&self.body)
    }
}

/// Asserts that a JSON body was labelled `Content-Type: application/json`.
pub fn assert_json_content_type(content_type: Option<&str>, body: &str) {
    let ct = content_type.unwrap_or("").to_ascii_lowercase();
    assert!(
        ct.starts_with("application/json"),
        "JSON body without Content-Type: application/json (got {content_type:?}): {body}"
    );
}

/// Asserts `{"error":{"code":"<snake_case>","message":"<string>"}}`; returns the code.
pub fn assert_error_body(body: &str) -> String {
    let v: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {body:?}"));
    let code = v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("error body without string error.code: {body}"));
    assert!(is_snake_case(code), "error.code not snake_case: {body}");
    assert!(
        v["error"]["message"].is_string(),
        "error body without string error.message: {body}"
    );
    code.to_string()
}

// ---------------------------------------------------------------------------
// Raw HTTP/1.1 keep-alive client
// ---------------------------------------------------------------------------

/// A minimal HTTP/1.1 client on one kept-alive TCP connection, for byte-level checks.
pub struct RawHttp {
    pub stream: TcpStream,
    buf: Vec<u8>,
    host: String,
}

/// One HTTP response as read off the wire.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Lower-cased names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; also asserts `Content-Type: application/json`.
    pub fn json(&self) -> Value {
        assert_json_content_type(self.header("content-type"), &self.text());
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }

    /// The shard named by the `x-pubsub-shard` header (panics if absent).
    pub fn shard(&self) -> u32 {
        self.header(SHARD_HEADER)
            .unwrap_or_else(|| panic!("response without {SHARD_HEADER}: {self:?}"))
            .trim()
            .parse()
            .unwrap()
    }

    pub fn assert_error(&self, status: u16) -> String {
        assert_eq!(
            self.status,
            status,
            "unexpected status: {self:?} {}",
            self.text()
        );
        assert_json_content_type(self.header("content-type"), &self.text());
        assert_error_body(&self.text())
    }
}

/// Serialises one request with `Host`, and for a body `Content-Type`/`Content-Length`.
pub fn build_request(method: &str, path: &str, body: Option<&str>) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    req.into_bytes()
}

impl RawHttp {
    pub fn connect(addr: SocketAddr) -> RawHttp {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(RECV_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        RawHttp {
            stream,
            buf: Vec::new(),
            host: addr.to_string(),
        }
    }

    /// Writes raw bytes in one `write_all`.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn request(&mut self, method: &str, path: &str, body: Option<&str>) -> RawResponse {
        let req = build_request(method, path, body);
        self.send(&req);
        self.read_response()
    }

    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 65536];
        match self.stream.read(&mut chunk) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                panic!(
                    "timed out reading an HTTP response; have {:?}",
                    String::from_utf8_lossy(&self.buf)
                )
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => false,
            Err(e) => panic!("read error: {e}"),
        }
    }

    /// True if the server closed the connection (reads EOF within `RECV_TIMEOUT`) with
    /// nothing unread.
    pub fn is_closed(&mut self) -> bool {
        self.buf.is_empty() && !self.fill()
    }

    /// Reads one response (Content-Length, chunked, or to EOF).
    pub fn read_response(&mut self) -> RawResponse {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if !self.fill() {
                panic!(
                    "connection closed before a full response head; have {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
        };
        let head = String::from_utf8(self.buf[..head_end].to_vec()).unwrap();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        assert!(
            status_line.starts_with("HTTP/1.1 "),
            "bad status line {status_line:?}"
        );
        let status: u16 = status_line[9..12].parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l
                    .split_once(':')
                    .unwrap_or_else(|| panic!("bad header line {l:?}"));
                (n.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let body = if status == 204 || status == 304 || (100..200).contains(&status) {
            Vec::new()
        } else if get("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            self.read_chunked()
        } else if let Some(len) = get("content-length") {
            let len: usize = len.parse().unwrap();
            while self.buf.len() < len {
                if !self.fill() {
                    panic!("connection closed inside a body");
                }
            }
            self.buf.drain(..len).collect()
        } else {
            while self.fill() {}
            std::mem::take(&mut self.buf)
        };
        RawResponse {
            status,
            headers,
            body,
        }
    }

    fn read_chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                assert!(self.fill(), "closed inside chunked body");
            };
            let line = String::from_utf8(self.buf[..line_end].to_vec()).unwrap();
            self.buf.drain(..line_end + 2);
            let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap();
            while self.buf.len() < size + 2 {
                assert!(self.fill(), "closed inside chunk");
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
            if size == 0 {
                return body;
            }
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }
}

/// Asserts that the raw `MESSAGE` frame text carries `payload` verbatim as its `body`.
pub fn assert_body_bytes(frame: &str, payload: &str) {
    let at = frame
        .find("\"body\":")
        .unwrap_or_else(|| panic!("no \"body\" member in {frame}"));
    let rest = frame[at + 7..].trim_start();
    assert!(
        rest.starts_with(payload),
        "payload not delivered byte for byte:\n sent {payload}\n got  {frame}"
    );
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------
// WebSocket client
// ---------------------------------------------------------------------------

/// A WebSocket client on `/ws` over a plain blocking TcpStream with read timeouts.
pub struct Ws {
    pub ws: WebSocket<TcpStream>,
    /// The shard named by the 101's `x-pubsub-shard` header.
    pub shard: u32,
}

/// What one timed read produced.
pub enum Got {
    Text(String),
    Other(Message),
    Timeout,
    Closed(Option<tungstenite::protocol::CloseFrame>),
}

impl Ws {
    pub fn connect(addr: SocketAddr) -> Ws {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(RECV_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let (ws, resp) = match tungstenite::client(format!("ws://{addr}/ws"), stream) {
            Ok(x) => x,
            Err(e) => panic!("WebSocket handshake failed: {e}"),
        };
        assert_eq!(resp.status().as_u16(), 101);
        let shard = resp
            .headers()
            .get(SHARD_HEADER)
            .unwrap_or_else(|| panic!("101 without {SHARD_HEADER}"))
            .to_str()
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Ws { ws, shard }
    }

    pub fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).unwrap();
    }

    /// Sends `{"type": ty, "payload": payload}`.
    pub fn send_json(&mut self, ty: &str, payload: Value) {
        self.send_text(&json!({"type": ty, "payload": payload}).to_string());
    }

    /// One read with a deadline; pings/pongs are passed up as `Other`.
    pub fn read_timeout(&mut self, dur: Duration) -> Got {
        let dur = dur.max(Duration::from_millis(1));
        self.ws.get_mut().set_read_timeout(Some(dur)).unwrap();
        match self.ws.read() {
            Ok(Message::Text(t)) => Got::Text(t.as_str().to_string()),
            Ok(Message::Close(f)) => Got::Closed(f),
            Ok(m) => Got::Other(m),
            Err(tungstenite::Error::Io(e))
                if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut =>
            {
                Got::Timeout
            }
            Err(tungstenite::Error::ConnectionClosed) | Err(tungstenite::Error::AlreadyClosed) => {
                Got::Closed(None)
            }
            Err(e) => panic!("WebSocket read error: {e}"),
        }
    }

    /// The next text frame within `dur`, skipping control frames; None on timeout.
    pub fn recv_text_timeout(&mut self, dur: Duration) -> Option<String> {
        let deadline = Instant::now() + dur;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.read_timeout(left) {
                Got::Text(t) => return Some(t),
                Got::Other(_) => continue,
                Got::Timeout => return None,
                Got::Closed(f) => panic!("WebSocket closed by the server: {f:?}"),
            }
        }
    }

    /// The next text frame parsed as JSON within `dur`; None on timeout.
    pub fn recv_json_timeout(&mut self, dur: Duration) -> Option<Value> {
        self.recv_text_timeout(dur).map(|t| {
            serde_json::from_str(&t)
                .unwrap_or_else(|e| panic!("server frame is not JSON ({e}): {t}"))
        })
    }

    /// The next frame (within `RECV_TIMEOUT`); panics unless it is of type `ty`.
    pub fn expect_type(&mut self, ty: &str) -> Value {
        match self.recv_json_timeout(RECV_TIMEOUT) {
            Some(v) if v["type"] == ty => v,
            Some(v) => panic!("expected a {ty} frame, got {v}"),
            None => panic!("expected a {ty} frame, got nothing within {RECV_TIMEOUT:?}"),
        }
    }

    /// Like [`Ws::expect_type`] but returns the raw text too.
    pub fn expect_type_text(&mut self, ty: &str) -> (String, Value) {
        let t = self
            .recv_text_timeout(RECV_TIMEOUT)
            .unwrap_or_else(|| panic!("expected a {ty} frame, got nothing"));
        let v: Value = serde_json::from_str(&t).unwrap();
        assert_eq!(v["type"], ty, "expected a {ty} frame, got {t}");
        (t, v)
    }

    /// Expects an `ERROR` frame; checks its shape and returns it.
    pub fn expect_error(&mut self) -> Value {
        let v = self.expect_type("ERROR");
        let code = v["code"]
            .as_str()
            .unwrap_or_else(|| panic!("ERROR without string code: {v}"));
        assert!(is_snake_case(code), "ERROR code not snake_case: {v}");
        assert!(v["message"].is_string(), "ERROR without message: {v}");
        v
    }

    /// Expects an `ERROR` frame with `code`.
    pub fn expect_error_code(&mut self, code: &str) -> Value {
        let v = self.expect_error();
        assert_eq!(v["code"], code, "wrong ERROR code: {v}");
        v
    }

    /// Asserts that no text frame arrives within `dur`.
    pub fn expect_silence(&mut self, dur: Duration) {
        if let Some(t) = self.recv_text_timeout(dur) {
            panic!("expected no frame, got {t}");
        }
    }

    /// `SUBSCRIBE` with `payload`; returns the `SUBSCRIBED` frame.
    pub fn subscribe_with(&mut self, payload: Value) -> Value {
        self.send_json("SUBSCRIBE", payload.clone());
        let v = self.expect_type("SUBSCRIBED");
        assert!(
            v["subscription"].is_string(),
            "SUBSCRIBED without subscription: {v}"
        );
        assert!(
            v["queue_name"].is_string(),
            "SUBSCRIBED without queue_name: {v}"
        );
        v
    }

    /// `SUBSCRIBE {"queue_name"}` (auto ack); returns the subscription id.
    pub fn subscribe(&mut self, queue: &str) -> String {
        let v = self.subscribe_with(json!({"queue_name": queue}));
        assert_eq!(v["queue_name"], queue);
        v["subscription"].as_str().unwrap().to_string()
    }

    /// `SUBSCRIBE` with manual ack and `prefetch`; returns the subscription id.
    pub fn subscribe_manual(&mut self, queue: &str, prefetch: u64) -> String {
        let v = self
            .subscribe_with(json!({"queue_name": queue, "ack": "manual", "prefetch": prefetch}));
        assert_eq!(v["queue_name"], queue);
        v["subscription"].as_str().unwrap().to_string()
    }

    /// Expects a `MESSAGE` and returns it.
    pub fn expect_message(&mut self) -> Value {
        let v = self.expect_type("MESSAGE");
        assert!(v["unique_id"].is_string(), "MESSAGE without unique_id: {v}");
        assert!(
            v["delivery_tag"].is_u64(),
            "MESSAGE without delivery_tag: {v}"
        );
        v
    }

    /// Sends `PUBLISH` with the raw publish body built by [`publish_body`].
    pub fn publish_raw(&mut self, exchange: &str, key: &str, payload: &str, extra: &str) {
        let body = publish_body(exchange, key, payload, extra);
        self.send_text(&format!("{{\"type\":\"PUBLISH\",\"payload\":{body}}}"));
    }

    pub fn ack(&mut self, tag: u64, multiple: bool) {
        self.send_json("ACK", json!({"delivery_tag": tag, "multiple": multiple}));
    }

    pub fn nack(&mut self, tag: u64, requeue: bool) {
        self.send_json(
            "NACK",
            json!({"delivery_tag": tag, "multiple": false, "requeue": requeue}),
        );
    }

    /// Sends a close frame and drops the socket.
    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
    }
}

// ---------------------------------------------------------------------------
// PostgreSQL: a schema of its own per test
// ---------------------------------------------------------------------------

/// Where the tests expect PostgreSQL (database `test`, trust auth).
pub const PG_ADDR: &str = "127.0.0.1:5432";

/// A schema of its own for one test on the PostgreSQL at [`PG_ADDR`], dropped on drop.
pub struct PgSchema {
    /// `postgres://role@127.0.0.1:5432/test` (or `PUBSUB_TEST_PG_URL`).
    pub admin_url: String,
    /// The schema's name (`pubsub_it_<tag>_<pid>_<n>_<nanos>`).
    pub schema: String,
}

/// The URL of database `test` on [`PG_ADDR`] (`PUBSUB_TEST_PG_URL` overrides it), or
/// `None` after printing `SKIP: no PostgreSQL on 127.0.0.1:5432` when nothing listens
/// there. Panics instead when `PUBSUB_TEST_REQUIRE_PG` is set (`.ci/run` sets it: on
/// CI's machine a missing database is a failure, not a skip), and when something
/// listens but no role (`postgres`, then `root`) can connect.
pub fn pg_admin_url() -> Option<String> {
    let addr: SocketAddr = PG_ADDR.parse().unwrap();
    if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err() {
        if std::env::var_os("PUBSUB_TEST_REQUIRE_PG").is_some() {
            panic!("PUBSUB_TEST_REQUIRE_PG is set but nothing listens on {PG_ADDR}");
        }
        eprintln!("SKIP: no PostgreSQL on {PG_ADDR}");
        return None;
    }
    if let Ok(url) = std::env::var("PUBSUB_TEST_PG_URL") {
        return Some(url);
    }
    let mut errors = Vec::new();
    for user in ["postgres", "root"] {
        let url = format!("postgres://{user}@{PG_ADDR}/test");
        match postgres::Client::connect(&url, postgres::NoTls) {
            Ok(_) => return Some(url),
            Err(e) => errors.push(format!("{user}: {e:?}")),
        }
    }
    panic!("PostgreSQL listens on {PG_ADDR} but no role can connect to database test: {errors:?}");
}

impl PgSchema {
    /// A fresh schema name for `tag`, or `None` when [`pg_admin_url`] skips.
    pub fn new(tag: &str) -> Option<PgSchema> {
        let admin_url = pg_admin_url()?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        Some(PgSchema {
            admin_url,
            schema: format!("pubsub_it_{tag}_{}_{n}_{nanos}", std::process::id()),
        })
    }

    /// The `--database` URL that puts the server in this schema.
    pub fn url(&self) -> String {
        format!("{}?schema={}", self.admin_url, self.schema)
    }

    /// A client with this schema on its search path, for looking at the tables.
    pub fn client(&self) -> postgres::Client {
        let mut c = postgres::Client::connect(&self.admin_url, postgres::NoTls).unwrap();
        c.batch_execute(&format!("SET search_path TO \"{}\"", self.schema))
            .unwrap();
        c
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        match postgres::Client::connect(&self.admin_url, postgres::NoTls) {
            Ok(mut c) => {
                if let Err(e) = c.batch_execute(&format!(
                    "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                    self.schema
                )) {
                    eprintln!("could not drop schema {}: {e}", self.schema);
                }
            }
            Err(e) => eprintln!("could not connect to drop schema {}: {e}", self.schema),
        }
    }
}

/// The backend a durability test runs against.
pub enum Backend {
    /// The embedded default: SQLite under `--data-dir`.
    Sqlite,
    /// PostgreSQL in a schema of the test's own.
    Postgres(PgSchema),
}

impl Backend {
    /// The server flags that select this backend.
    pub fn args(&self) -> Vec<String> {
        match self {
            Backend::Sqlite => Vec::new(),
            Backend::Postgres(s) => vec!["--database".to_string(), s.url()],
        }
    }

    /// Starts a server on this backend with `extra` flags.
    pub fn start(&self, extra: &[&str]) -> Server {
        let mut args = self.args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::with_args(&refs)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }
}

/// A queue name that `pubsub::routing::placement` homes on `shard` of 2.
pub fn queue_on(shard: usize, prefix: &str) -> String {
    (0..1000)
        .map(|i| format!("{prefix}{i}"))
        .find(|n| pubsub::routing::placement(n, 2) == shard)
        .expect("some name lands on each shard")
}

/// Starts a thread that publishes pipelined batches of 1,000 frames on `p` to
/// `exchange` with a key nothing is bound to (each publish is decoded and routed,
/// nothing piles up) until `stop`; counts the batches written in `batches`.
pub fn flood_unroutable(
    mut p: Ws,
    exchange: &str,
    stop: Arc<AtomicBool>,
    batches: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    let frame = format!(
        r#"{{"type":"PUBLISH","payload":{{"exchange_name":{},"key":"nowhere","payload":{{"n":1}}}}}}"#,
        Value::from(exchange)
    );
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..1000 {
                p.ws.write(Message::text(frame.as_str())).unwrap();
            }
            p.ws.flush().unwrap();
            batches.fetch_add(1, Ordering::Relaxed);
        }
    })
}
