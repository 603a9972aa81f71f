//! The durable store going away under a running broker, end to end.
//!
//! The server talks to the real PostgreSQL at `127.0.0.1:5432` (a schema of the test's own)
//! through a TCP forwarder in this test ([`Proxy`]), so the test can take the database away
//! from the broker (every forwarded connection shut down, new ones accepted and closed at
//! once) and give it back, without touching the PostgreSQL other tests share.
//!
//! What `docs/persistence.md` ("Failure behaviour") promises, checked over the wire contract:
//! while the store is unreachable, no persistent publish to a durable queue is confirmed
//! (HTTP `503` and WebSocket `ERROR`, code `store_unavailable`), non-durable traffic is
//! served as usual, and once the database is back confirms resume by themselves; every
//! message confirmed before, during or after the outage survives a `kill -9`, in order,
//! and what comes back beyond them is only what the outage refused (at least once,
//! never a false confirm).

mod common;

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{PgSchema, Server};
use serde_json::json;

/// Confirmed messages published before the outage, and again after it.
const BEFORE: usize = 30;
const AFTER: usize = 30;
/// Persistent publishes attempted while the database is away.
const DURING: usize = 20;
/// How long the broker may take to confirm again once the database is back (its
/// reconnect pause is 250 ms; this leaves room for a slow machine).
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long draining the queue after the restart may take.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// A TCP forwarder to `upstream` that the test can cut and restore.
struct Proxy {
    addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
    stop: Arc<AtomicBool>,
}

struct ProxyState {
    /// Forwarding (true) or refusing (false).
    up: bool,
    /// One handle on each end of every forwarded connection, to shut them down on a cut.
    live: Vec<TcpStream>,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ProxyState {
            up: true,
            live: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::Acquire) {
                    return;
                }
                let Ok(client) = conn else { continue };
                // The lock is held from the check to the registration, so a cut can
                // never miss a connection that was let through.
                let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                if !s.up {
                    // Accepted and closed at once: the broker's connect attempt fails.
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let handles = (
                    client.try_clone(),
                    server.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                );
                let (Ok(c1), Ok(s1), Ok(c2), Ok(s2)) = handles else {
                    continue;
                };
                s.live.push(c1);
                s.live.push(s1);
                thread::spawn(move || pump(client, server));
                thread::spawn(move || pump(s2, c2));
            }
        });
        Proxy { addr, state, stop }
    }

    /// Takes the database away: shuts every forwarded connection down and refuses new ones.
    fn cut(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.up = false;
        for c in s.live.drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Gives the database back.
    fn restore(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).up = true;
    }

    /// How many connections were let through since the last cut (closed ones included).
    fn forwarded(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .live
            .len()
            / 2
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.stop.store(true, Ordering::Release);
        // Wakes the accept loop so it sees the stop flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copies `from` to `to` until either side closes, then closes both.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// The byte range of `url`'s host and port (after any `user@`).
fn host_span(url: &str) -> std::ops::Range<usize> {
    let start = url.find("://").expect("database URL has a scheme") + 3;
    let end = url[start..]
        .find(['/', '?'])
        .map_or(url.len(), |i| start + i);
    let host_start = url[start..end]
        .rfind('@')
        .map_or(start, |at| start + at + 1);
    host_start..end
}

/// The address the database URL names (port 5432 when it names none).
fn upstream_of(url: &str) -> SocketAddr {
    let host = &url[host_span(url)];
    let host = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:5432")
    };
    host.to_socket_addrs()
        .unwrap_or_else(|e| panic!("cannot resolve {host}: {e}"))
        .next()
        .unwrap()
}

/// `url` with its host and port replaced by `proxy`.
fn via(url: &str, proxy: SocketAddr) -> String {
    let span = host_span(url);
    format!("{}{proxy}{}", &url[..span.start], &url[span.end..])
}

/// One persistent `POST /publish` with `confirm: true`: `Ok(id)` on 200, else the
/// status and the error code.
fn publish_confirm(s: &Server, payload: &str) -> Result<String, (u16, String)> {
    let body = common::publish_body("ox", "d", &json!(payload).to_string(), ",\"confirm\":true");
    let r = s.post_raw("/publish", &body);
    if r.status == 200 {
        let v = r.json();
        assert_eq!(v["routed"], 1, "publish {body}: {v}");
        return Ok(v["id"].as_str().unwrap().to_string());
    }
    let code = r.assert_error(r.status);
    Err((r.status, code))
}

#[test]
fn postgres_outage_confirms_nothing_it_cannot_store_and_loses_nothing_confirmed() {
    let Some(schema) = PgSchema::new("outage") else {
        return;
    };
    let proxy = Proxy::start(upstream_of(&schema.url()));
    let url = via(&schema.url(), proxy.addr);
    let mut s = Server::with_args(&["--database", &url]);
    s.exchange("ox", "direct");
    s.queue_with("dq", json!({"durable": true}));
    s.bind("ox", "dq", "d");
    s.queue("tq");
    s.bind("ox", "tq", "t");
    assert!(
        proxy.forwarded() >= 1,
        "the broker does not reach PostgreSQL through the proxy"
    );

    let mut confirmed = Vec::new();
    for i in 0..BEFORE {
        let p = format!("before-{i}");
        publish_confirm(&s, &p).unwrap_or_else(|e| panic!("{p} not confirmed: {e:?}"));
        confirmed.push(p);
    }

    // The database goes away.
    proxy.cut();
    let mut refused = HashSet::new();
    for i in 0..DURING {
        let p = format!("during-{i}");
        match publish_confirm(&s, &p) {
            Ok(id) => panic!("{p} was confirmed ({id}) while the database was unreachable"),
            Err((status, code)) => {
                assert_eq!(
                    (status, code.as_str()),
                    (503, "store_unavailable"),
                    "{p} during the outage"
                );
            }
        }
        refused.insert(p);
    }
    // Over WebSocket, the same refusal arrives as an ERROR frame carrying the ref.
    let mut ws = s.ws();
    ws.publish_raw(
        "ox",
        "d",
        &json!("during-ws").to_string(),
        ",\"confirm\":true,\"ref\":\"w1\"",
    );
    let e = ws.expect_error_code("store_unavailable");
    assert_eq!(e["ref"], "w1", "{e}");
    refused.insert("during-ws".to_string());
    // Non-durable traffic does not need the store.
    let r = s.publish("ox", "t", &json!("transient"));
    assert_eq!(r["routed"], 1, "{r}");
    let mut sub = s.ws();
    sub.subscribe("tq");
    let m = sub.expect_message();
    assert_eq!(m["body"], "transient", "{m}");
    assert!(
        s.get("/healthz").status == 200,
        "the broker stopped answering during the outage"
    );

    // The database comes back: confirms resume without a restart.
    proxy.restore();
    let deadline = Instant::now() + RECOVERY_TIMEOUT;
    let mut n = 0;
    loop {
        let p = format!("recovering-{n}");
        n += 1;
        match publish_confirm(&s, &p) {
            Ok(_) => {
                confirmed.push(p);
                break;
            }
            Err((503, code)) if code == "store_unavailable" => {
                refused.insert(p);
            }
            Err(e) => panic!("{p} after the database came back: {e:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "no confirm within {RECOVERY_TIMEOUT:?} of the database coming back; log:\n{}",
            s.log_tail()
        );
        thread::sleep(Duration::from_millis(50));
    }
    for i in 0..AFTER {
        let p = format!("after-{i}");
        publish_confirm(&s, &p).unwrap_or_else(|e| panic!("{p} not confirmed: {e:?}"));
        confirmed.push(p);
    }

    // A crash right after: what was confirmed must be in PostgreSQL.
    s.kill9();
    s.restart();
    let got: Vec<String> = s
        .drain("dq", DRAIN_TIMEOUT)
        .iter()
        .map(|m| m["body"].as_str().unwrap_or_default().to_string())
        .collect();
    let mut seen = HashSet::new();
    for p in &got {
        assert!(seen.insert(p.clone()), "{p} came back twice: {got:?}");
        assert!(
            confirmed.contains(p) || refused.contains(p),
            "{p} came back but was never published: {got:?}"
        );
    }
    let confirmed_back: Vec<&String> = got.iter().filter(|p| confirmed.contains(p)).collect();
    assert_eq!(
        confirmed_back,
        confirmed.iter().collect::<Vec<_>>(),
        "confirmed messages missing or out of order after the outage and a kill -9"
    );
}
