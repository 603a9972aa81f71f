//! Crash test of the durable store: `kill -9` under confirmed load loses nothing.
//!
//! Four connections publish to a fanout exchange bound to two durable queues: two over
//! HTTP (`POST /publish` with `confirm: true`, one at a time on a kept-alive connection)
//! and two over WebSocket (`PUBLISH` with `confirm: true` and a `ref`, up to
//! [`WS_WINDOW`] unconfirmed at once). Every confirmed message is recorded with the id
//! the server returned. After [`LOAD`] the server gets SIGKILL mid-stream (no shutdown
//! hook runs), is started again on the same data directory and database, and both queues
//! are drained. Every confirmed message must be delivered from each queue with its id
//! and body; a `unique_id` delivered twice is allowed only with `redelivered: true`;
//! nothing is delivered that no publisher sent; each publisher's messages keep their
//! order. Runs on SQLite and on PostgreSQL (a schema of its own, dropped afterwards;
//! `SKIP: no PostgreSQL on 127.0.0.1:5432` only when nothing listens there).
//! The counts are printed (`--nocapture` shows them).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::{Backend, PgSchema};
use serde_json::{json, Value};
use tungstenite::Message;

/// How long the publishers run before the kill.
const LOAD: Duration = Duration::from_millis(1500);
/// Unconfirmed `PUBLISH`es a WebSocket publisher keeps in flight.
const WS_WINDOW: usize = 32;
/// Publishers over HTTP and over WebSocket.
const HTTP_PUBLISHERS: usize = 2;
const WS_PUBLISHERS: usize = 2;
/// Fewer confirmed messages than this and the test proves nothing: it fails.
const MIN_CONFIRMED: usize = 100;
/// Longest a drain may take.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// The queues the fanout exchange feeds.
const QUEUES: [&str; 2] = ["crash-q1", "crash-q2"];
const EXCHANGE: &str = "crash-x";

/// What one publisher did.
#[derive(Default, Debug)]
struct Tally {
    /// Sequence numbers it sent (whether or not answered).
    sent: usize,
    /// (sequence number, id) of every confirmed message.
    confirmed: Vec<(u64, String)>,
    /// Answers that were errors (503 / `ERROR`): not confirmed, may or may not be stored.
    refused: usize,
    /// True if the publisher stopped because the connection broke (the kill).
    cut: bool,
}

fn payload(publisher: usize, i: u64) -> String {
    json!({"p": publisher, "i": i, "pad": "crash-test-payload"}).to_string()
}

fn http_publisher(addr: SocketAddr, p: usize) -> Tally {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(5))
        .build();
    let url = format!("http://{addr}/publish");
    let mut t = Tally::default();
    let mut i = 0u64;
    loop {
        let body = common::publish_body(EXCHANGE, "", &payload(p, i), ",\"confirm\":true");
        t.sent += 1;
        match agent
            .post(&url)
            .set("Content-Type", "application/json")
            .send_string(&body)
        {
            Ok(r) => {
                let v: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
                assert_eq!(v["routed"], 2, "publish reply: {v}");
                t.confirmed.push((i, v["id"].as_str().unwrap().to_string()));
            }
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                assert_eq!(code, 503, "unexpected publish answer {code}: {text}");
                t.refused += 1;
            }
            Err(ureq::Error::Transport(_)) => {
                t.cut = true;
                break;
            }
        }
        i += 1;
    }
    t
}

fn ws_publisher(addr: SocketAddr, p: usize) -> Tally {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let (mut ws, _) = tungstenite::client(format!("ws://{addr}/ws"), stream).unwrap();
    let mut t = Tally::default();
    let mut in_flight: HashSet<u64> = HashSet::new();
    let mut next = 0u64;
    let mut last_progress = Instant::now();
    'run: loop {
        while in_flight.len() < WS_WINDOW {
            let body = common::publish_body(
                EXCHANGE,
                "",
                &payload(p, next),
                &format!(",\"confirm\":true,\"ref\":\"{next}\""),
            );
            let frame = format!("{{\"type\":\"PUBLISH\",\"payload\":{body}}}");
            if ws.send(Message::text(frame)).is_err() {
                t.cut = true;
                break 'run;
            }
            t.sent += 1;
            in_flight.insert(next);
            next += 1;
        }
        ws.get_mut()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        match ws.read() {
            Ok(Message::Text(text)) => {
                let v: Value = serde_json::from_str(text.as_str()).unwrap();
                let r: u64 = v["ref"]
                    .as_str()
                    .unwrap_or_else(|| panic!("answer without ref: {v}"))
                    .parse()
                    .unwrap();
                assert!(in_flight.remove(&r), "answer for a ref not in flight: {v}");
                match v["type"].as_str() {
                    Some("CONFIRM") => {
                        assert_eq!(v["routed"], 2, "{v}");
                        t.confirmed.push((r, v["id"].as_str().unwrap().to_string()));
                    }
                    Some("ERROR") => t.refused += 1,
                    _ => panic!("unexpected frame {v}"),
                }
                last_progress = Instant::now();
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut =>
            {
                assert!(
                    last_progress.elapsed() < Duration::from_secs(5),
                    "no confirm for 5 s with {} in flight",
                    in_flight.len()
                );
            }
            Err(_) => {
                t.cut = true;
                break;
            }
        }
    }
    t
}

fn crash_scenario(b: &Backend) {
    let mut s = b.start(&[]);
    let r = s.post(
        "/exchanges",
        &json!({"name": EXCHANGE, "type": "fanout", "durable": true}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    for q in QUEUES {
        s.queue_with(q, json!({"durable": true}));
        s.bind(EXCHANGE, q, "");
    }

    let mut handles = Vec::new();
    for p in 0..HTTP_PUBLISHERS + WS_PUBLISHERS {
        let addr = s.addr;
        handles.push(thread::spawn(move || {
            if p < HTTP_PUBLISHERS {
                http_publisher(addr, p)
            } else {
                ws_publisher(addr, p)
            }
        }));
    }
    thread::sleep(LOAD);
    s.kill9();
    // Publishers end on their broken connections (every read and write has a timeout).
    let tallies: Vec<Tally> = handles
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
        .collect();
    let confirmed: usize = tallies.iter().map(|t| t.confirmed.len()).sum();
    let sent: usize = tallies.iter().map(|t| t.sent).sum();
    let refused: usize = tallies.iter().map(|t| t.refused).sum();
    assert!(
        tallies.iter().all(|t| t.cut),
        "a publisher was not cut off by the kill (not killed mid-stream?): {tallies:?}"
    );
    assert!(
        confirmed >= MIN_CONFIRMED,
        "only {confirmed} confirmed before the kill; the test needs at least {MIN_CONFIRMED}"
    );

    s.restart();

    // Which (publisher, i) must be there, with which id.
    let mut must: HashMap<(u64, u64), String> = HashMap::new();
    for (p, t) in tallies.iter().enumerate() {
        for (i, id) in &t.confirmed {
            must.insert((p as u64, *i), id.clone());
        }
    }
    let mut report = format!(
        "[{}] sent {sent}, confirmed {confirmed}, refused {refused}",
        b.name()
    );
    for q in QUEUES {
        let restored = s.queue_info(q)["messages_ready"].as_u64().unwrap();
        let got = s.drain(q, DRAIN_TIMEOUT);
        let mut seen: HashMap<String, (u64, u64)> = HashMap::new();
        let mut last_i: BTreeMap<u64, u64> = BTreeMap::new();
        let mut duplicates = 0;
        for m in &got {
            let id = m["unique_id"].as_str().unwrap().to_string();
            let p = m["body"]["p"].as_u64().unwrap();
            let i = m["body"]["i"].as_u64().unwrap();
            let t = tallies
                .get(p as usize)
                .unwrap_or_else(|| panic!("{q}: delivered a message of no publisher: {m}"));
            assert!(
                (i as usize) < t.sent,
                "{q}: delivered a message never sent: {m}"
            );
            assert_eq!(
                m["body"]["pad"], "crash-test-payload",
                "{q}: body changed: {m}"
            );
            if let Some(prev) = seen.get(&id) {
                assert_eq!(*prev, (p, i), "{q}: one unique_id, two bodies: {m}");
                assert_eq!(
                    m["redelivered"], true,
                    "{q}: duplicate delivery without redelivered: {m}"
                );
                duplicates += 1;
                continue;
            }
            assert_eq!(
                m["redelivered"], false,
                "{q}: never delivered before the crash: {m}"
            );
            seen.insert(id.clone(), (p, i));
            if let Some(want) = must.get(&(p, i)) {
                assert_eq!(
                    *want, id,
                    "{q}: confirmed message delivered with another id: {m}"
                );
            }
            if let Some(prev) = last_i.insert(p, i) {
                assert!(
                    prev < i,
                    "{q}: publisher {p}'s order broken: {i} after {prev}"
                );
            }
        }
        let missing: Vec<_> = must
            .iter()
            .filter(|(_, id)| !seen.contains_key(*id))
            .map(|(k, id)| (*k, id.clone()))
            .collect();
        assert!(
            missing.is_empty(),
            "{q}: {} of {confirmed} confirmed messages lost after kill -9 (first: {:?}); server output:\n{}",
            missing.len(),
            missing.iter().take(5).collect::<Vec<_>>(),
            s.log_tail()
        );
        assert_eq!(
            got.len() as u64 - duplicates,
            restored,
            "{q}: restored count and drained count differ"
        );
        report.push_str(&format!(
            "; {q}: restored {restored}, delivered {} ({} unconfirmed extras, {duplicates} duplicates)",
            got.len(),
            seen.len() - confirmed,
        ));
    }
    println!("{report}");
}

#[test]
fn sqlite_kill9_under_confirmed_load_loses_nothing() {
    crash_scenario(&Backend::Sqlite);
}

#[test]
fn postgres_kill9_under_confirmed_load_loses_nothing() {
    let Some(schema) = PgSchema::new("crash") else {
        return;
    };
    crash_scenario(&Backend::Postgres(schema));
}
