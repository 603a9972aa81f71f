//! Contract tests for routing (`shared/protocol.md`, "Model"): direct, fanout and
//! topic exchanges, the AMQP 0-9-1 topic wildcards, at-most-once routing per queue,
//! case sensitivity, and delivery across shards with `--shards 2`.
//!
//! Each test starts its own server (see `tests/common/mod.rs`).

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

#[test]
fn direct_exchange_routes_by_exact_key() {
    let s = Server::start();
    s.exchange("ex", "direct");
    s.queue("qa");
    s.queue("qb");
    s.queue("qa2");
    s.bind("ex", "qa", "a");
    s.bind("ex", "qb", "b");
    s.bind("ex", "qa2", "a");
    let mut a = s.ws();
    a.subscribe("qa");
    let mut b = s.ws();
    b.subscribe("qb");
    let mut a2 = s.ws();
    a2.subscribe("qa2");

    assert_eq!(s.publish("ex", "a", &json!("to-a"))["routed"], 2);
    assert_eq!(s.publish("ex", "b", &json!("to-b"))["routed"], 1);
    assert_eq!(s.publish("ex", "c", &json!("to-c"))["routed"], 0);
    assert_eq!(
        s.publish("ex", "A", &json!("to-A"))["routed"],
        0,
        "keys are case-sensitive"
    );
    assert_eq!(s.publish("ex", "a.b", &json!(0))["routed"], 0);
    assert_eq!(s.publish("ex", "", &json!(0))["routed"], 0);

    assert_eq!(a.expect_message()["body"], "to-a");
    assert_eq!(a2.expect_message()["body"], "to-a");
    assert_eq!(b.expect_message()["body"], "to-b");
    a.expect_silence(QUIET);
    b.expect_silence(Duration::from_millis(10));
    a2.expect_silence(Duration::from_millis(10));
}

#[test]
fn direct_exchange_empty_key() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "");
    assert_eq!(s.publish("ex", "", &json!(1))["routed"], 1);
    assert_eq!(s.publish("ex", "x", &json!(1))["routed"], 0);
    // Omitted key means "".
    let r = s.post_raw("/publish", r#"{"exchange_name":"ex","payload":2}"#);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["routed"], 1);
}

#[test]
fn fanout_exchange_ignores_keys() {
    let s = Server::start();
    s.exchange("fan", "fanout");
    let mut subs = Vec::new();
    for (i, key) in ["", "x", "whatever.key"].iter().enumerate() {
        let q = format!("q{i}");
        s.queue(&q);
        s.bind("fan", &q, key);
        let mut ws = s.ws();
        ws.subscribe(&q);
        subs.push(ws);
    }
    let id = s.publish("fan", "some.key", &json!({"f": true}))["id"].clone();
    let r = s.publish("fan", "", &json!(2));
    assert_eq!(r["routed"], 3);
    for ws in &mut subs {
        let m = ws.expect_message();
        assert_eq!(m["unique_id"], id);
        assert_eq!(m["exchange"], "fan");
        assert_eq!(m["routing_key"], "some.key");
        assert_eq!(ws.expect_message()["body"], 2);
    }
}

#[test]
fn same_queue_bound_twice_gets_one_copy() {
    let s = Server::start();
    s.exchange("fan", "fanout");
    s.queue("q");
    s.bind("fan", "q", "a");
    s.bind("fan", "q", "b");
    s.exchange("top", "topic");
    s.bind("top", "q", "#");
    s.bind("top", "q", "a.*");
    s.bind("top", "q", "a.b");
    s.bind("top", "q", "*.b");
    s.exchange("dir", "direct");
    s.bind("dir", "q", "k");
    let again = s.post(
        "/bindings",
        &json!({"exchange_name": "dir", "queue_name": "q", "key": "k"}),
    );
    assert_eq!(again.status, 200, "identical bind is a no-op: {again:?}");
    let mut ws = s.ws();
    ws.subscribe("q");
    assert_eq!(s.publish("fan", "", &json!("fan"))["routed"], 1);
    assert_eq!(s.publish("top", "a.b", &json!("top"))["routed"], 1);
    assert_eq!(s.publish("dir", "k", &json!("dir"))["routed"], 1);
    assert_eq!(ws.expect_message()["body"], "fan");
    assert_eq!(ws.expect_message()["body"], "top");
    assert_eq!(ws.expect_message()["body"], "dir");
    ws.expect_silence(QUIET);
}

/// (binding pattern, routing key, matches?)
const TOPIC_CASES: &[(&str, &str, bool)] = &[
    ("*.orange.*", "quick.orange.rabbit", true),
    ("*.orange.*", "lazy.orange.elephant", true),
    ("*.orange.*", "quick.orange.male.rabbit", false),
    ("*.orange.*", "orange", false),
    ("*.orange.*", "quick.Orange.rabbit", false),
    ("*.*.rabbit", "quick.orange.rabbit", true),
    ("*.*.rabbit", "a.rabbit", false),
    ("*.*.rabbit", "a.b.c.rabbit", false),
    ("lazy.#", "lazy", true),
    ("lazy.#", "lazy.orange", true),
    ("lazy.#", "lazy.orange.male.rabbit", true),
    ("lazy.#", "lazyx.orange", false),
    ("lazy.#", "quick.lazy", false),
    ("#", "", true),
    ("#", "a", true),
    ("#", "a.b.c", true),
    ("#.end", "end", true),
    ("#.end", "a.b.end", true),
    ("#.end", "a.endx", false),
    ("#.end", "end.a", false),
    ("a.#.z", "a.z", true),
    ("a.#.z", "a.b.c.z", true),
    ("a.#.z", "a.b", false),
    ("a.#.z", "b.z", false),
    ("a.*.#", "a.b", true),
    ("a.*.#", "a.b.c.d", true),
    ("a.*.#", "a", false),
    ("*", "a", true),
    ("*", "a.b", false),
    ("a.b", "a.b", true),
    ("a.b", "a.b.c", false),
    ("a.b", "a", false),
    ("Stock.*", "stock.nyse", false),
    ("stock.*", "stock.nyse", true),
    ("#.#", "a.b", true),
    ("*.#", "a", true),
];

#[test]
fn topic_wildcards() {
    let s = Server::start();
    let mut patterns: Vec<&str> = TOPIC_CASES.iter().map(|c| c.0).collect();
    patterns.dedup();
    for (i, p) in patterns.iter().enumerate() {
        s.exchange(&format!("t{i}"), "topic");
        s.queue(&format!("q{i}"));
        s.bind(&format!("t{i}"), &format!("q{i}"), p);
    }
    let mut failures = Vec::new();
    for (pattern, key, want) in TOPIC_CASES {
        let i = patterns.iter().position(|p| p == pattern).unwrap();
        let routed = s.publish(&format!("t{i}"), key, &json!(key))["routed"]
            .as_u64()
            .unwrap();
        if routed != u64::from(*want) {
            failures.push(format!(
                "pattern {pattern:?} key {key:?}: routed {routed}, want {want}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "topic matching wrong:\n{}",
        failures.join("\n")
    );
}

#[test]
fn topic_exchange_delivers_to_each_matching_queue() {
    let s = Server::start();
    s.exchange("logs", "topic");
    for (q, key) in [
        ("all", "#"),
        ("errors", "*.error"),
        ("kern", "kern.*"),
        ("kern_err", "kern.error"),
    ] {
        s.queue(q);
        s.bind("logs", q, key);
    }
    let mut subs: Vec<(&str, Ws)> = ["all", "errors", "kern", "kern_err"]
        .iter()
        .map(|q| {
            let mut ws = s.ws();
            ws.subscribe(q);
            (*q, ws)
        })
        .collect();
    assert_eq!(s.publish("logs", "kern.error", &json!("ke"))["routed"], 4);
    assert_eq!(s.publish("logs", "app.error", &json!("ae"))["routed"], 2);
    assert_eq!(s.publish("logs", "kern.info", &json!("ki"))["routed"], 2);
    assert_eq!(s.publish("logs", "", &json!("empty"))["routed"], 1);
    let want: &[(&str, &[&str])] = &[
        ("all", &["ke", "ae", "ki", "empty"]),
        ("errors", &["ke", "ae"]),
        ("kern", &["ke", "ki"]),
        ("kern_err", &["ke"]),
    ];
    for ((q, ws), (wq, bodies)) in subs.iter_mut().zip(want) {
        assert_eq!(q, wq);
        for b in *bodies {
            let m = ws.expect_message();
            assert_eq!(m["body"], *b, "queue {q}");
            assert_eq!(m["queue"], *q);
        }
        ws.expect_silence(Duration::from_millis(50));
    }
}

#[test]
fn names_are_case_sensitive() {
    let s = Server::start();
    s.exchange("ex", "direct");
    s.exchange("Ex", "fanout");
    s.queue("q");
    s.queue("Q");
    assert_eq!(s.get("/exchanges/Ex").json()["type"], "fanout");
    assert_eq!(s.get("/exchanges/ex").json()["type"], "direct");
    s.get("/exchanges/EX").assert_error(404);
    s.bind("Ex", "Q", "");
    assert_eq!(s.publish("ex", "", &json!(1))["routed"], 0);
    assert_eq!(s.publish("Ex", "", &json!(1))["routed"], 1);
    s.wait_queue_counts("Q", 1, 0);
    s.wait_queue_counts("q", 0, 0);
}

/// Subscriber on one shard, publisher on the other; several exchanges so that the
/// exchanges' home shards vary too.
#[test]
fn cross_shard_delivery_in_order() {
    // Keep subscribers where they connected, so deliveries really cross shards.
    let s = Server::with_args(&["--shards", "2", "--migrate-subscribers", "false"]);
    let mut sub = s.ws_on_shard(0);
    let mut publ = s.ws_on_shard(1);
    assert_ne!(sub.shard, publ.shard);
    let names: Vec<String> = (0..4).map(|i| format!("x{i}")).collect();
    for n in &names {
        s.topology(n, "direct", &format!("q-{n}"), "k");
        sub.subscribe(&format!("q-{n}"));
    }
    // 10,000 messages from shard 1 through x0 to a subscriber on shard 0.
    const N: u64 = 10_000;
    for i in 0..N {
        publ.publish_raw("x0", "k", &i.to_string(), "");
    }
    publ.publish_raw("x0", "k", "\"end\"", r#","confirm":true,"ref":"end""#);
    let c = publ.expect_type("CONFIRM");
    assert_eq!(c["routed"], 1);
    for i in 0..N {
        let m = sub.expect_message();
        assert_eq!(m["body"], i, "out of order or lost at {i}: {m}");
        assert_eq!(m["queue"], "q-x0");
    }
    assert_eq!(sub.expect_message()["body"], "end");

    // Every exchange, both directions, and over HTTP from the other shard.
    let mut http_other = s.raw_on_shard(1);
    for n in &names {
        let r = http_other.request("POST", "/publish", Some(&publish_body(n, "k", "\"h\"", "")));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["routed"], 1);
        assert_eq!(r.shard(), 1);
        let m = sub.expect_message();
        assert_eq!(m["body"], "h");
        assert_eq!(m["exchange"], n.as_str());
    }
    let mut sub1 = s.ws_on_shard(1);
    let mut pub0 = s.ws_on_shard(0);
    s.queue("back");
    for n in &names {
        s.bind(n, "back", "b");
    }
    sub1.subscribe("back");
    for (i, n) in names.iter().enumerate() {
        pub0.publish_raw(n, "b", &i.to_string(), r#","confirm":true,"ref":"r""#);
        assert_eq!(pub0.expect_type("CONFIRM")["routed"], 1);
    }
    for i in 0..names.len() {
        assert_eq!(sub1.expect_message()["body"], i as u64);
    }
    sub1.expect_silence(QUIET);
}

/// Manual ack and redelivery when consumer and queue traffic cross shards.
#[test]
fn cross_shard_manual_ack_and_redelivery() {
    // Keep subscribers where they connected, so deliveries really cross shards.
    let s = Server::with_args(&["--shards", "2", "--migrate-subscribers", "false"]);
    s.topology("ex", "direct", "q", "k");
    let mut a = s.ws_on_shard(0);
    a.subscribe_manual("q", 2);
    let mut http = s.raw_on_shard(1);
    for i in 0..4 {
        let r = http.request(
            "POST",
            "/publish",
            Some(&publish_body("ex", "k", &i.to_string(), "")),
        );
        assert_eq!(r.status, 200);
    }
    let m0 = a.expect_message();
    let m1 = a.expect_message();
    a.expect_silence(QUIET);
    a.ack(m0["delivery_tag"].as_u64().unwrap(), false);
    let m2 = a.expect_message();
    assert_eq!(m2["body"], 2);
    drop(a);
    let mut b = s.ws_on_shard(1);
    b.subscribe_manual("q", 10);
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let m = b.expect_message();
        bodies.push((
            m["body"].as_u64().unwrap(),
            m["redelivered"].as_bool().unwrap(),
        ));
    }
    bodies.sort_unstable();
    assert_eq!(bodies, vec![(1, true), (2, true), (3, false)], "m1={m1}");
}

/// Competing consumers on different shards share one queue.
#[test]
fn cross_shard_competing_consumers() {
    // Keep subscribers where they connected, so deliveries really cross shards.
    let s = Server::with_args(&["--shards", "2", "--migrate-subscribers", "false"]);
    s.topology("ex", "direct", "q", "k");
    let mut a = s.ws_on_shard(0);
    a.subscribe("q");
    let mut b = s.ws_on_shard(1);
    b.subscribe("q");
    wait_until("two consumers", RECV_TIMEOUT, || {
        s.queue_info("q")["consumers"] == 2
    });
    for i in 0..100 {
        s.publish("ex", "k", &json!(i));
    }
    let mut got = Vec::new();
    let (mut na, mut nb) = (0, 0);
    while got.len() < 100 {
        let before = got.len();
        while let Some(m) = a.recv_json_timeout(Duration::from_millis(50)) {
            got.push(m["body"].as_u64().unwrap());
            na += 1;
        }
        while let Some(m) = b.recv_json_timeout(Duration::from_millis(50)) {
            got.push(m["body"].as_u64().unwrap());
            nb += 1;
        }
        assert!(got.len() > before, "stalled after {} messages", got.len());
    }
    got.sort_unstable();
    assert_eq!(got, (0..100).collect::<Vec<_>>());
    assert_eq!((na, nb), (50, 50), "round robin across shards");
}

/// An exchange subscription made on one shard receives what is published on the other.
#[test]
fn cross_shard_exchange_subscription() {
    let s = Server::with_args(&["--shards", "2"]);
    for i in 0..4 {
        s.exchange(&format!("t{i}"), "topic");
    }
    let mut sub = s.ws_on_shard(0);
    let mut queues = Vec::new();
    for i in 0..4 {
        let v = sub.subscribe_with(json!({"exchange_name": format!("t{i}"), "key": "#"}));
        queues.push(v["queue_name"].as_str().unwrap().to_string());
    }
    let mut publ = s.ws_on_shard(1);
    for (i, q) in queues.iter().enumerate() {
        publ.publish_raw(
            &format!("t{i}"),
            "a.b",
            &i.to_string(),
            r#","confirm":true,"ref":"x""#,
        );
        assert_eq!(publ.expect_type("CONFIRM")["routed"], 1);
        let m = sub.expect_message();
        assert_eq!(m["body"], i);
        assert_eq!(m["queue"], q.as_str());
    }
    drop(sub);
    for q in &queues {
        let path = format!("/queues/{}", encode_segment(q));
        wait_until("exclusive queue gone", RECV_TIMEOUT, || {
            s.get(&path).status == 404
        });
    }
}
