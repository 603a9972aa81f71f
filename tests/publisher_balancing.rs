//! A WebSocket publisher that keeps its shard's reads backed up, on the shard that also
//! delivers its messages, moves to the emptier shard (`src/shard/conn.rs`,
//! `Conn::balance_target`): publishing and delivering then run on two cores. It loses
//! and reorders nothing on the way, keeps answering, and a light publisher stays put.
//!
//! Each test starts its own server with 2 shards (see `tests/common/mod.rs`); which
//! shard a connection lands on is chosen with the `x-pubsub-shard` header, which shard
//! a queue lives on with the library's own placement function, and where a message was
//! published is read from `pubsub_messages_published_total{shard=…}`.

mod common;

use common::*;
use serde_json::json;
use std::thread;
use std::time::Duration;

/// Enough pipelined publishes to keep a shard's reads full for many rounds.
const BURST: u64 = 20_000;

fn published_on(s: &Server, shard: u32) -> u64 {
    let text = s.get("/metrics").body;
    let name = format!("pubsub_messages_published_total{{shard=\"{shard}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(name.as_str()))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Starts a subscriber on `q` (served by `shard`) that collects `n` bodies in a thread.
fn collect(s: &Server, shard: u32, q: &str, n: u64) -> thread::JoinHandle<Vec<u64>> {
    let mut sub = s.ws_on_shard(shard);
    sub.subscribe(q);
    thread::spawn(move || {
        (0..n)
            .map(|_| sub.expect_message()["body"].as_u64().unwrap())
            .collect()
    })
}

/// Writes `BURST` publishes as fast as the socket takes them (tungstenite buffers the
/// frames and writes them in large chunks), then one with a confirm.
fn burst(p: &mut Ws) {
    for i in 0..BURST {
        let frame = format!(
            r#"{{"type":"PUBLISH","payload":{{"exchange_name":"ex","key":"k","payload":{i}}}}}"#
        );
        p.ws.write(tungstenite::Message::text(frame)).unwrap();
    }
    p.ws.flush().unwrap();
    p.publish_raw(
        "ex",
        "k",
        &BURST.to_string(),
        r#","confirm":true,"ref":"end""#,
    );
}

#[test]
fn busy_publisher_moves_off_its_subscribers_shard() {
    let s = Server::with_args(&["--shards", "2"]);
    let q = queue_on(1, "busy");
    s.topology("ex", "direct", &q, "k");
    let got = collect(&s, 1, &q, BURST + 1);
    let mut p = s.ws_on_shard(1);
    burst(&mut p);
    let confirm = p.expect_type("CONFIRM");
    assert_eq!(confirm["ref"], "end");
    assert_eq!(confirm["routed"], 1);
    let bodies = got.join().unwrap();
    assert_eq!(
        bodies,
        (0..=BURST).collect::<Vec<_>>(),
        "every message, in publish order"
    );
    let moved = published_on(&s, 0);
    assert!(
        moved > 0,
        "the publisher should have moved to shard 0 and published there \
         (shard 0: {moved}, shard 1: {})",
        published_on(&s, 1)
    );
    assert_eq!(published_on(&s, 0) + published_on(&s, 1), BURST + 1);
    // The moved connection still does everything a connection does.
    p.publish_raw("ex", "k", "7", r#","confirm":true,"ref":"after""#);
    assert_eq!(p.expect_type("CONFIRM")["ref"], "after");
    p.send_json("SUBSCRIBE", json!({"queue_name": q}));
    assert_eq!(p.expect_type("SUBSCRIBED")["queue_name"], q.as_str());
    assert_eq!(p.expect_message()["body"], 7);
}

#[test]
fn light_publisher_stays_beside_its_subscriber() {
    let s = Server::with_args(&["--shards", "2"]);
    let q = queue_on(1, "light");
    s.topology("ex", "direct", &q, "k");
    let mut sub = s.ws_on_shard(1);
    sub.subscribe(&q);
    let mut p = s.ws_on_shard(1);
    for i in 0..300u64 {
        p.publish_raw("ex", "k", &i.to_string(), "");
        assert_eq!(sub.expect_message()["body"], i);
        if i % 100 == 0 {
            thread::sleep(Duration::from_millis(5));
        }
    }
    assert_eq!(published_on(&s, 1), 300);
    assert_eq!(published_on(&s, 0), 0, "nothing was backed up: no move");
}

#[test]
fn light_publisher_joins_its_queues_shard() {
    let s = Server::with_args(&["--shards", "2"]);
    let q = queue_on(1, "join");
    s.topology("ex", "direct", &q, "k");
    let mut sub = s.ws_on_shard(1);
    sub.subscribe(&q);
    let mut p = s.ws_on_shard(0);
    for i in 0..50u64 {
        p.publish_raw("ex", "k", &i.to_string(), "");
        assert_eq!(sub.expect_message()["body"], i);
    }
    // The first publish was taken where the connection landed; then it moved.
    assert_eq!(published_on(&s, 0), 1);
    assert_eq!(published_on(&s, 1), 49);
    p.publish_raw("ex", "k", "50", r#","confirm":true,"ref":"moved""#);
    assert_eq!(p.expect_type("CONFIRM")["ref"], "moved");
    assert_eq!(sub.expect_message()["body"], 50);
}

#[test]
fn a_publisher_to_queues_on_both_shards_stays() {
    let s = Server::with_args(&["--shards", "2"]);
    let (q0, q1) = (queue_on(0, "fan"), queue_on(1, "fan"));
    s.exchange("fx", "fanout");
    s.queue(&q0);
    s.queue(&q1);
    s.bind("fx", &q0, "");
    s.bind("fx", &q1, "");
    let mut p = s.ws_on_shard(0);
    for i in 0..20u64 {
        p.publish_raw("fx", "", &i.to_string(), "");
    }
    p.publish_raw("fx", "", "20", r#","confirm":true,"ref":"end""#);
    assert_eq!(p.expect_type("CONFIRM")["routed"], 2);
    assert_eq!(published_on(&s, 0), 21);
    assert_eq!(published_on(&s, 1), 0);
}

#[test]
fn a_publisher_that_also_subscribes_stays() {
    let s = Server::with_args(&["--shards", "2"]);
    let q = queue_on(1, "both");
    s.topology("ex", "direct", &q, "k");
    let got = collect(&s, 1, &q, BURST + 1);
    let mut p = s.ws_on_shard(1);
    let other = queue_on(1, "mine");
    s.queue(&other);
    p.subscribe(&other);
    burst(&mut p);
    assert_eq!(p.expect_type("CONFIRM")["ref"], "end");
    assert_eq!(got.join().unwrap().len() as u64, BURST + 1);
    assert_eq!(published_on(&s, 0), 0, "a subscriber's connection stays");
}

#[test]
fn balancing_can_be_turned_off() {
    let s = Server::with_args(&["--shards", "2", "--place-publishers", "false"]);
    let q = queue_on(1, "off");
    s.topology("ex", "direct", &q, "k");
    let got = collect(&s, 1, &q, BURST + 1);
    let mut p = s.ws_on_shard(1);
    burst(&mut p);
    assert_eq!(p.expect_type("CONFIRM")["ref"], "end");
    assert_eq!(got.join().unwrap().len() as u64, BURST + 1);
    assert_eq!(published_on(&s, 0), 0);
}
