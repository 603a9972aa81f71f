//! A WebSocket connection whose first subscription is to a queue homed on another shard
//! moves to that shard (`src/shard/conn.rs`, `Handoff`): it keeps working as if nothing
//! happened, frames pipelined behind the `SUBSCRIBE` included, and nothing is lost.
//!
//! Each test starts its own server with 2 shards (see `tests/common/mod.rs`); which
//! shard a connection lands on is chosen with the `x-pubsub-shard` header, which shard
//! a queue lives on with the library's own placement function.

mod common;

use common::*;
use serde_json::json;

fn shard_of_subscription(id: &str) -> u64 {
    // "sub-<shard>-<connection>-<n>"
    id.split('-').nth(1).unwrap().parse().unwrap()
}

#[test]
fn subscriber_moves_to_its_queue_and_receives_everything() {
    let s = Server::with_args(&["--shards", "2"]);
    let q = queue_on(1, "far");
    s.topology("ex", "direct", &q, "k");
    let mut sub = s.ws_on_shard(0);
    let id = sub.subscribe(&q);
    assert_eq!(
        shard_of_subscription(&id),
        1,
        "served by the queue's shard now: {id}"
    );
    // Publishers on both shards, WebSocket and HTTP.
    let mut p0 = s.ws_on_shard(0);
    let mut p1 = s.ws_on_shard(1);
    for i in 0..1000u64 {
        let p = if i % 2 == 0 { &mut p0 } else { &mut p1 };
        p.publish_raw("ex", "k", &i.to_string(), "");
    }
    // Per-publisher order holds; nothing is lost.
    let (mut even, mut odd) = (0u64, 1u64);
    for _ in 0..1000 {
        let m = sub.expect_message();
        let b = m["body"].as_u64().unwrap();
        if b % 2 == 0 {
            assert_eq!(b, even);
            even += 2;
        } else {
            assert_eq!(b, odd);
            odd += 2;
        }
        assert_eq!(m["queue"], q.as_str());
    }
    assert_eq!(s.publish("ex", "k", &json!("http"))["routed"], 1);
    assert_eq!(sub.expect_message()["body"], "http");
    // The moved connection still subscribes, unsubscribes and answers pings.
    let q2 = queue_on(0, "near");
    s.queue(&q2);
    let id2 = sub.subscribe(&q2);
    assert_eq!(
        shard_of_subscription(&id2),
        1,
        "only the first subscription moves"
    );
    sub.send_json("UNSUBSCRIBE", json!({"subscription": id}));
    assert_eq!(sub.expect_type("UNSUBSCRIBED")["subscription"], id.as_str());
}

#[test]
fn frames_pipelined_behind_the_subscribe_follow_the_connection() {
    let s = Server::with_args(&["--shards", "2"]);
    let q = queue_on(1, "pipe");
    s.topology("ex", "direct", &q, "k");
    let mut c = s.ws_on_shard(0);
    // SUBSCRIBE, then a PUBLISH with confirm and another, in one burst.
    c.send_json("SUBSCRIBE", json!({"queue_name": q}));
    c.publish_raw("ex", "k", "1", r#","confirm":true,"ref":"a""#);
    c.publish_raw("ex", "k", "2", "");
    let mut confirmed = false;
    let mut bodies = Vec::new();
    let first = c.expect_type("SUBSCRIBED");
    assert_eq!(
        shard_of_subscription(first["subscription"].as_str().unwrap()),
        1
    );
    while !(confirmed && bodies.len() == 2) {
        let v = c
            .recv_json_timeout(RECV_TIMEOUT)
            .expect("CONFIRM and both messages");
        match v["type"].as_str().unwrap() {
            "CONFIRM" => {
                assert_eq!(v["ref"], "a");
                assert_eq!(v["routed"], 1);
                confirmed = true;
            }
            "MESSAGE" => bodies.push(v["body"].as_u64().unwrap()),
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert_eq!(bodies, vec![1, 2]);
}

#[test]
fn moved_manual_ack_subscriber_redelivers_on_disconnect() {
    let s = Server::with_args(&["--shards", "2"]);
    let q = queue_on(1, "acks");
    s.topology("ex", "direct", &q, "k");
    let mut a = s.ws_on_shard(0);
    a.subscribe_manual(&q, 10);
    for i in 0..3 {
        s.publish("ex", "k", &json!(i));
    }
    let m0 = a.expect_message();
    let _m1 = a.expect_message();
    let _m2 = a.expect_message();
    a.ack(m0["delivery_tag"].as_u64().unwrap(), false);
    s.wait_queue_counts(&q, 0, 2);
    drop(a);
    let mut b = s.ws_on_shard(0);
    b.subscribe_manual(&q, 10);
    let mut got: Vec<(u64, bool)> = (0..2)
        .map(|_| {
            let m = b.expect_message();
            (
                m["body"].as_u64().unwrap(),
                m["redelivered"].as_bool().unwrap(),
            )
        })
        .collect();
    got.sort_unstable();
    assert_eq!(got, vec![(1, true), (2, true)]);
}

#[test]
fn migration_can_be_turned_off() {
    let s = Server::with_args(&["--shards", "2", "--migrate-subscribers", "false"]);
    let q = queue_on(1, "stay");
    s.topology("ex", "direct", &q, "k");
    let mut sub = s.ws_on_shard(0);
    let id = sub.subscribe(&q);
    assert_eq!(shard_of_subscription(&id), 0, "{id}");
    s.publish("ex", "k", &json!(7));
    assert_eq!(sub.expect_message()["body"], 7);
}
