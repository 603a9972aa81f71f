//! Contract tests for the WebSocket side of `shared/protocol.md`: subscribe and
//! unsubscribe, competing consumers, manual ack with prefetch, NACK with and without
//! requeue, dead-lettering, redelivery after a disconnect, queue limits and TTLs,
//! exchange subscriptions, queue deletion, PUBLISH with confirm, ping/pong, ordering.
//!
//! Each test starts its own server (see `tests/common/mod.rs`).

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn tag(m: &Value) -> u64 {
    m["delivery_tag"].as_u64().unwrap()
}

#[test]
fn unsubscribe_by_subscription_and_by_queue_name() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut ws = s.ws();
    let sub = ws.subscribe("q");
    ws.send_json("UNSUBSCRIBE", json!({"subscription": sub}));
    let v = ws.expect_type("UNSUBSCRIBED");
    assert_eq!(v["subscription"], sub.as_str());
    wait_until("no consumers", RECV_TIMEOUT, || {
        s.queue_info("q")["consumers"] == 0
    });
    s.publish("ex", "k", &json!(1));
    ws.expect_silence(QUIET);
    s.wait_queue_counts("q", 1, 0);

    let sub2 = ws.subscribe("q");
    assert_ne!(sub2, sub, "a new subscription gets a new id");
    assert_eq!(ws.expect_message()["body"], 1);
    ws.send_json("UNSUBSCRIBE", json!({"queue_name": "q"}));
    let v = ws.expect_type("UNSUBSCRIBED");
    assert_eq!(v["subscription"], sub2.as_str());
    s.publish("ex", "k", &json!(2));
    ws.expect_silence(QUIET);
    s.wait_queue_counts("q", 1, 0);
}

#[test]
fn delivery_tags_count_up_per_connection() {
    let s = Server::start();
    s.topology("ex", "fanout", "q1", "");
    s.queue("q2");
    s.bind("ex", "q2", "");
    let mut ws = s.ws();
    ws.subscribe("q1");
    ws.subscribe("q2");
    for i in 0..3 {
        s.publish("ex", "", &json!(i));
    }
    let mut tags: Vec<u64> = (0..6).map(|_| tag(&ws.expect_message())).collect();
    tags.sort_unstable();
    assert_eq!(tags, vec![1, 2, 3, 4, 5, 6]);
    // Another connection starts again from 1.
    let mut other = s.ws();
    s.queue("q3");
    s.bind("ex", "q3", "");
    other.subscribe("q3");
    s.publish("ex", "", &json!("x"));
    assert_eq!(tag(&other.expect_message()), 1);
}

#[test]
fn competing_consumers_round_robin() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut a = s.ws();
    a.subscribe("q");
    let mut b = s.ws();
    b.subscribe("q");
    wait_until("two consumers", RECV_TIMEOUT, || {
        s.queue_info("q")["consumers"] == 2
    });
    for i in 0..10 {
        s.publish("ex", "k", &json!(i));
    }
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    while got_a.len() + got_b.len() < 10 {
        let before = got_a.len() + got_b.len();
        if let Some(m) = a.recv_json_timeout(Duration::from_millis(100)) {
            assert_eq!(m["type"], "MESSAGE");
            got_a.push(m["body"].as_u64().unwrap());
        }
        if let Some(m) = b.recv_json_timeout(Duration::from_millis(100)) {
            assert_eq!(m["type"], "MESSAGE");
            got_b.push(m["body"].as_u64().unwrap());
        }
        if got_a.len() + got_b.len() == before {
            a.expect_silence(Duration::from_millis(500));
            b.expect_silence(Duration::from_millis(500));
            panic!("stalled: a={got_a:?} b={got_b:?}");
        }
    }
    assert_eq!(got_a.len(), 5, "round robin: a={got_a:?} b={got_b:?}");
    assert_eq!(got_b.len(), 5, "round robin: a={got_a:?} b={got_b:?}");
    assert!(got_a.windows(2).all(|w| w[0] < w[1]), "order a={got_a:?}");
    assert!(got_b.windows(2).all(|w| w[0] < w[1]), "order b={got_b:?}");
    let mut all: Vec<u64> = got_a.iter().chain(&got_b).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..10).collect::<Vec<_>>());
    a.expect_silence(QUIET);
    b.expect_silence(Duration::from_millis(10));
}

#[test]
fn manual_ack_respects_prefetch() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut ws = s.ws();
    ws.subscribe_manual("q", 3);
    for i in 0..10 {
        s.publish("ex", "k", &json!(i));
    }
    let mut got: Vec<Value> = (0..3).map(|_| ws.expect_message()).collect();
    ws.expect_silence(QUIET);
    s.wait_queue_counts("q", 7, 3);
    // Acking one lets exactly one more through.
    ws.ack(tag(&got[0]), false);
    got.push(ws.expect_message());
    ws.expect_silence(QUIET);
    s.wait_queue_counts("q", 6, 3);
    // multiple:true settles everything up to the tag: three more.
    ws.ack(tag(&got[3]), true);
    for _ in 0..3 {
        got.push(ws.expect_message());
    }
    ws.expect_silence(QUIET);
    s.wait_queue_counts("q", 3, 3);
    ws.ack(tag(&got[6]), true);
    for _ in 0..3 {
        got.push(ws.expect_message());
    }
    ws.ack(tag(&got[9]), true);
    let bodies: Vec<u64> = got.iter().map(|m| m["body"].as_u64().unwrap()).collect();
    assert_eq!(bodies, (0..10).collect::<Vec<_>>());
    assert!(got.iter().all(|m| m["redelivered"] == false));
    s.wait_queue_counts("q", 0, 0);
    ws.expect_silence(QUIET);
}

#[test]
fn prefetch_defaults_to_100() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut ws = s.ws();
    ws.subscribe_with(json!({"queue_name":"q","ack":"manual"}));
    for i in 0..120 {
        s.publish("ex", "k", &json!(i));
    }
    for i in 0..100 {
        assert_eq!(ws.expect_message()["body"], i);
    }
    ws.expect_silence(QUIET);
    s.wait_queue_counts("q", 20, 100);
}

#[test]
fn nack_requeue_redelivers() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut ws = s.ws();
    ws.subscribe_manual("q", 10);
    let id = s.publish("ex", "k", &json!({"v": 1}))["id"].clone();
    let m = ws.expect_message();
    assert_eq!(m["unique_id"], id);
    assert_eq!(m["redelivered"], false);
    ws.send_json("NACK", json!({"delivery_tag": tag(&m)})); // requeue defaults to true
    let again = ws.expect_message();
    assert_eq!(again["unique_id"], id);
    assert_eq!(again["body"], json!({"v": 1}));
    assert_eq!(again["redelivered"], true);
    assert!(tag(&again) > tag(&m), "new delivery tag: {again} after {m}");
    ws.ack(tag(&again), false);
    s.wait_queue_counts("q", 0, 0);
    ws.expect_silence(QUIET);
}

#[test]
fn nack_without_requeue_dead_letters() {
    let s = Server::start();
    s.exchange("dlx", "fanout");
    s.queue("dlq");
    s.bind("dlx", "dlq", "");
    s.exchange("ex", "direct");
    s.queue_with("q", json!({"dead_letter_exchange": "dlx"}));
    s.bind("ex", "q", "k");
    let mut ws = s.ws();
    ws.subscribe_manual("q", 10);
    let mut dl = s.ws();
    dl.subscribe("dlq");
    s.publish_raw("ex", "k", r#"{"dead":  "letter"}"#);
    let m = ws.expect_message();
    ws.nack(tag(&m), false);
    let (text, d) = dl.expect_type_text("MESSAGE");
    assert_eq!(d["queue"], "dlq");
    assert_body_bytes(&text, r#"{"dead":  "letter"}"#);
    ws.expect_silence(QUIET);
    s.wait_queue_counts("q", 0, 0);
}

#[test]
fn nack_without_requeue_and_no_dlx_drops() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut ws = s.ws();
    ws.subscribe_manual("q", 10);
    s.publish("ex", "k", &json!(1));
    let m = ws.expect_message();
    ws.nack(tag(&m), false);
    ws.expect_silence(QUIET);
    s.wait_queue_counts("q", 0, 0);
}

#[test]
fn unacked_messages_redelivered_after_disconnect() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut first = s.ws();
    first.subscribe_manual("q", 10);
    let ids: Vec<Value> = (0..3)
        .map(|i| s.publish("ex", "k", &json!(i))["id"].clone())
        .collect();
    let got: Vec<Value> = (0..3).map(|_| first.expect_message()).collect();
    first.ack(tag(&got[0]), false);
    s.wait_queue_counts("q", 0, 2);
    drop(first); // no close frame: the TCP connection just goes away
    s.wait_queue_counts("q", 2, 0);
    let mut second = s.ws();
    second.subscribe_manual("q", 10);
    for (i, id) in ids.iter().enumerate().skip(1) {
        let m = second.expect_message();
        assert_eq!(m["unique_id"], *id);
        assert_eq!(m["body"], i as u64);
        assert_eq!(m["redelivered"], true);
    }
    second.expect_silence(QUIET);
}

#[test]
fn unacked_messages_redelivered_after_clean_close() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut first = s.ws();
    first.subscribe_manual("q", 10);
    let id = s.publish("ex", "k", &json!("x"))["id"].clone();
    first.expect_message();
    let mut second = s.ws();
    second.subscribe_manual("q", 10);
    first.close();
    let m = second.expect_message();
    assert_eq!(m["unique_id"], id);
    assert_eq!(m["redelivered"], true);
}

#[test]
fn max_length_reject_publish() {
    let s = Server::start();
    s.exchange("ex", "direct");
    s.queue_with("q", json!({"max_length": 2, "overflow": "reject_publish"}));
    s.bind("ex", "q", "k");
    for i in 0..2 {
        assert_eq!(s.publish("ex", "k", &json!(i))["routed"], 1);
    }
    let r = s.post_raw("/publish", &publish_body("ex", "k", "2", ""));
    if r.status == 200 {
        assert_eq!(
            r.json()["routed"],
            0,
            "rejected message counted as routed: {r:?}"
        );
    } else {
        assert_error_body(&r.body);
    }
    s.wait_queue_counts("q", 2, 0);
    let mut ws = s.ws();
    ws.subscribe("q");
    assert_eq!(ws.expect_message()["body"], 0);
    assert_eq!(ws.expect_message()["body"], 1);
    ws.expect_silence(QUIET);
    // Room again: accepted.
    assert_eq!(s.publish("ex", "k", &json!(3))["routed"], 1);
    assert_eq!(ws.expect_message()["body"], 3);
}

#[test]
fn max_length_drop_head() {
    let s = Server::start();
    s.exchange("ex", "direct");
    s.queue_with("q", json!({"max_length": 2, "overflow": "drop_head"}));
    s.bind("ex", "q", "k");
    for i in 0..5 {
        assert_eq!(s.publish("ex", "k", &json!(i))["routed"], 1);
    }
    s.wait_queue_counts("q", 2, 0);
    let mut ws = s.ws();
    ws.subscribe("q");
    assert_eq!(ws.expect_message()["body"], 3);
    assert_eq!(ws.expect_message()["body"], 4);
    ws.expect_silence(QUIET);
}

#[test]
fn max_length_defaults_to_drop_head() {
    // RabbitMQ's default overflow is drop-head.
    let s = Server::start();
    s.exchange("ex", "direct");
    s.queue_with("q", json!({"max_length": 1}));
    s.bind("ex", "q", "k");
    s.publish("ex", "k", &json!(0));
    s.publish("ex", "k", &json!(1));
    let mut ws = s.ws();
    ws.subscribe("q");
    assert_eq!(ws.expect_message()["body"], 1);
    ws.expect_silence(QUIET);
}

#[test]
fn queue_message_ttl_expires() {
    let s = Server::start();
    s.exchange("ex", "fanout");
    s.queue_with("short", json!({"message_ttl_ms": 100}));
    s.queue("long");
    s.bind("ex", "short", "");
    s.bind("ex", "long", "");
    assert_eq!(s.publish("ex", "", &json!("old"))["routed"], 2);
    std::thread::sleep(Duration::from_millis(400));
    let mut ws = s.ws();
    ws.subscribe("short");
    ws.expect_silence(QUIET);
    // A fresh message still gets through to a waiting consumer.
    s.publish("ex", "", &json!("fresh"));
    assert_eq!(ws.expect_message()["body"], "fresh");
    s.wait_queue_counts("short", 0, 0);
    let mut ws2 = s.ws();
    ws2.subscribe("long");
    assert_eq!(ws2.expect_message()["body"], "old");
    assert_eq!(ws2.expect_message()["body"], "fresh");
}

#[test]
fn per_message_ttl_expires() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    s.publish_raw("ex", "k", r#""a""#);
    let r = s.post_raw(
        "/publish",
        &publish_body("ex", "k", r#""b""#, r#","ttl_ms":100"#),
    );
    assert_eq!(r.status, 200, "{r:?}");
    s.publish_raw("ex", "k", r#""c""#);
    std::thread::sleep(Duration::from_millis(400));
    let mut ws = s.ws();
    ws.subscribe("q");
    assert_eq!(ws.expect_message()["body"], "a");
    assert_eq!(ws.expect_message()["body"], "c");
    ws.expect_silence(QUIET);
}

#[test]
fn exchange_subscription_is_exclusive_and_temporary() {
    let s = Server::start();
    s.exchange("ex", "topic");
    let mut ws = s.ws();
    let v = ws.subscribe_with(json!({"exchange_name": "ex", "key": "a.*"}));
    let sub = v["subscription"].as_str().unwrap().to_string();
    let qname = v["queue_name"].as_str().unwrap().to_string();
    assert!(!qname.is_empty());
    let info = s.queue_info(&qname);
    assert_eq!(info["durable"], false);

    let r = s.publish_raw("ex", "a.b", r#"{"via" : "exchange"}"#);
    assert_eq!(r["routed"], 1);
    assert_eq!(s.publish("ex", "x.y", &json!(0))["routed"], 0);
    let (text, m) = ws.expect_type_text("MESSAGE");
    assert_body_bytes(&text, r#"{"via" : "exchange"}"#);
    assert_eq!(m["exchange"], "ex");
    assert_eq!(m["routing_key"], "a.b");
    assert_eq!(m["queue"], qname.as_str());
    assert_eq!(m["subscription"], sub.as_str());

    // Another connection may not subscribe to the exclusive queue.
    let mut other = s.ws();
    other.send_json("SUBSCRIBE", json!({"queue_name": qname}));
    other.expect_error_code("resource_locked");
    // ...and its connection stays usable.
    s.queue("plain");
    other.subscribe("plain");

    ws.send_json("UNSUBSCRIBE", json!({"subscription": sub}));
    assert_eq!(ws.expect_type("UNSUBSCRIBED")["subscription"], sub.as_str());
    let path = format!("/queues/{}", encode_segment(&qname));
    wait_until("exclusive queue gone", RECV_TIMEOUT, || {
        s.get(&path).status == 404
    });
    s.get(&path).assert_error(404);
    assert_eq!(s.publish("ex", "a.b", &json!(1))["routed"], 0);
}

#[test]
fn exchange_subscription_default_key_and_disconnect() {
    let s = Server::start();
    s.exchange("ex", "direct");
    let mut ws = s.ws();
    let v = ws.subscribe_with(json!({"exchange_name": "ex"}));
    let qname = v["queue_name"].as_str().unwrap().to_string();
    assert_eq!(s.publish("ex", "", &json!(1))["routed"], 1);
    assert_eq!(s.publish("ex", "k", &json!(2))["routed"], 0);
    assert_eq!(ws.expect_message()["body"], 1);
    drop(ws);
    let path = format!("/queues/{}", encode_segment(&qname));
    wait_until(
        "exclusive queue gone after disconnect",
        RECV_TIMEOUT,
        || s.get(&path).status == 404,
    );
}

#[test]
fn subscribe_to_unknown_exchange_or_queue_is_an_error() {
    let s = Server::start();
    let mut ws = s.ws();
    ws.send_json("SUBSCRIBE", json!({"queue_name": "nope"}));
    ws.expect_error();
    ws.send_json("SUBSCRIBE", json!({"exchange_name": "nope"}));
    ws.expect_error();
    s.queue("q");
    ws.subscribe("q");
}

#[test]
fn deleting_a_queue_tells_its_subscribers() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut a = s.ws();
    a.subscribe("q");
    let mut b = s.ws();
    b.subscribe_manual("q", 5);
    assert_eq!(s.delete("/queues/q").status, 204);
    a.expect_error_code("queue_deleted");
    b.expect_error_code("queue_deleted");
    // The connection stays usable.
    s.queue("q2");
    a.subscribe("q2");
}

#[test]
fn ws_publish_confirm_and_fire_and_forget() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut sub = s.ws();
    sub.subscribe("q");
    let mut p = s.ws();
    p.send_json(
        "PUBLISH",
        json!({"exchange_name":"ex","key":"k","payload":{"n":1},"confirm":true,"ref":"abc-1"}),
    );
    let c = p.expect_type("CONFIRM");
    assert_eq!(c["ref"], "abc-1");
    assert_eq!(c["routed"], 1);
    let id = c["id"].as_str().unwrap().to_string();
    let m = sub.expect_message();
    assert_eq!(m["unique_id"], id.as_str());
    assert_eq!(m["body"], json!({"n":1}));

    // Without confirm: nothing comes back, the message is delivered.
    p.send_json(
        "PUBLISH",
        json!({"exchange_name":"ex","key":"k","payload":2,"ref":"r2"}),
    );
    assert_eq!(sub.expect_message()["body"], 2);
    p.expect_silence(QUIET);

    // Routed nowhere: routed 0.
    p.send_json(
        "PUBLISH",
        json!({"exchange_name":"ex","key":"other","payload":3,"confirm":true,"ref":"r3"}),
    );
    let c = p.expect_type("CONFIRM");
    assert_eq!(c["ref"], "r3");
    assert_eq!(c["routed"], 0);
    sub.expect_silence(QUIET);

    // Without a ref, the CONFIRM has none; with one, it echoes it as sent. The whole
    // frame, byte for byte.
    p.send_json(
        "PUBLISH",
        json!({"exchange_name":"ex","key":"k","payload":5,"confirm":true}),
    );
    let (text, c) = p.expect_type_text("CONFIRM");
    let id = c["id"].as_str().unwrap();
    assert_eq!(
        text,
        format!(r#"{{"type":"CONFIRM","id":"{id}","routed":1}}"#)
    );
    assert_eq!(sub.expect_message()["body"], 5);
    p.send_text(r#"{"type":"PUBLISH","payload":{"exchange_name":"ex","key":"k","payload":6,"confirm":true,"ref":"r-\"6\""}}"#);
    let (text, c) = p.expect_type_text("CONFIRM");
    let id = c["id"].as_str().unwrap();
    assert_eq!(
        text,
        format!(r#"{{"type":"CONFIRM","ref":"r-\"6\"","id":"{id}","routed":1}}"#)
    );
    assert_eq!(sub.expect_message()["body"], 6);

    // A failing publish answers ERROR with the ref, even without confirm.
    p.send_json(
        "PUBLISH",
        json!({"exchange_name":"missing","payload":4,"ref":"r4"}),
    );
    let e = p.expect_error();
    assert_eq!(e["ref"], "r4");
}

/// The publish fields clients add (`ttl_ms`, `headers`, the seed's `Key`), sent over
/// WebSocket the way client libraries write them: headers come back in the `MESSAGE`
/// as sent, a per-message TTL expires, `Key` routes when `key` is absent.
#[test]
fn ws_publish_with_ttl_headers_and_seed_key() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut p = s.ws();
    p.send_text(r#"{"type":"PUBLISH","payload":{"exchange_name":"ex","key":"k","payload":1,"ttl_ms":60000,"headers":{"trace":"a1","n":"\n"}}}"#);
    p.send_text(
        r#"{"type":"PUBLISH","payload":{"exchange_name":"ex","key":"k","payload":2,"ttl_ms":100}}"#,
    );
    p.send_text(
        r#"{"type":"PUBLISH","payload":{"exchange_name":"ex","Key":"k","payload":3,"headers":{}}}"#,
    );
    p.send_text(r#"{"type":"PUBLISH","payload":{"exchange_name":"ex","payload":4,"headers":{"a":1},"ref":"h"}}"#);
    let e = p.expect_error();
    assert_eq!(e["ref"], "h");
    std::thread::sleep(Duration::from_millis(400));
    let mut sub = s.ws();
    sub.subscribe("q");
    let (text, m) = sub.expect_type_text("MESSAGE");
    assert_eq!(m["body"], 1);
    assert!(
        text.contains(r#","headers":{"trace":"a1","n":"\n"}"#),
        "headers not as sent: {text}"
    );
    let (text, m) = sub.expect_type_text("MESSAGE");
    assert_eq!(m["body"], 3, "the 100 ms message should have expired");
    assert!(text.contains(r#","headers":{}"#), "{text}");
    sub.expect_silence(QUIET);
}

#[test]
fn http_publish_routed_zero() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let r = s.publish("ex", "nomatch", &json!(1));
    assert_eq!(r["routed"], 0);
    s.exchange("empty", "fanout");
    assert_eq!(s.publish("empty", "", &json!(1))["routed"], 0);
    s.wait_queue_counts("q", 0, 0);
}

#[test]
fn ping_gets_pong() {
    let s = Server::start();
    let mut ws = s.ws();
    ws.ws
        .send(tungstenite::Message::Ping(b"are you there".to_vec().into()))
        .unwrap();
    let deadline = std::time::Instant::now() + RECV_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(!left.is_zero(), "no pong");
        match ws.read_timeout(left) {
            Got::Other(tungstenite::Message::Pong(p)) => {
                assert_eq!(&p[..], b"are you there");
                break;
            }
            Got::Other(_) => continue,
            Got::Text(t) => panic!("unexpected frame {t}"),
            Got::Timeout => panic!("no pong within {RECV_TIMEOUT:?}"),
            Got::Closed(f) => panic!("closed: {f:?}"),
        }
    }
    // Still usable.
    s.queue("q");
    ws.subscribe("q");
}

#[test]
fn fragmented_text_frame_is_reassembled() {
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    use tungstenite::protocol::frame::Frame;
    let s = Server::start();
    s.queue("q");
    let mut ws = s.ws();
    let text = br#"{"type":"SUBSCRIBE","payload":{"queue_name":"q"}}"#;
    let (a, b) = text.split_at(20);
    let f1 = Frame::message(a.to_vec(), OpCode::Data(Data::Text), false);
    let f2 = Frame::message(b.to_vec(), OpCode::Data(Data::Continue), true);
    ws.ws.write(tungstenite::Message::Frame(f1)).unwrap();
    ws.ws.write(tungstenite::Message::Frame(f2)).unwrap();
    ws.ws.flush().unwrap();
    let v = ws.expect_type("SUBSCRIBED");
    assert_eq!(v["queue_name"], "q");
}

#[test]
fn single_consumer_sees_publish_order_http() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut ws = s.ws();
    ws.subscribe("q");
    let mut c = s.raw();
    // 1,000 publishes, pipelined in batches of 100 on one connection.
    for batch in 0..10 {
        let mut bytes = Vec::new();
        for i in 0..100 {
            let n = batch * 100 + i;
            bytes.extend(build_request(
                "POST",
                "/publish",
                Some(&publish_body("ex", "k", &format!("{{\"n\":{n}}}"), "")),
            ));
        }
        c.send(&bytes);
        for _ in 0..100 {
            assert_eq!(c.read_response().status, 200);
        }
    }
    for n in 0..1000u64 {
        let m = ws.expect_message();
        assert_eq!(m["body"]["n"], n, "out of order: {m}");
    }
    ws.expect_silence(QUIET);
}

#[test]
fn single_consumer_sees_publish_order_ws() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut sub = s.ws();
    sub.subscribe_manual("q", 50);
    let mut p = s.ws();
    for n in 0..1000 {
        p.publish_raw("ex", "k", &n.to_string(), "");
    }
    p.publish_raw("ex", "k", "1000", r#","confirm":true,"ref":"last""#);
    assert_eq!(p.expect_type("CONFIRM")["ref"], "last");
    for n in 0..=1000u64 {
        let m = sub.expect_message();
        assert_eq!(m["body"], n, "out of order: {m}");
        sub.ack(tag(&m), false);
    }
    s.wait_queue_counts("q", 0, 0);
}

#[test]
fn nack_multiple_requeues_in_order() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut ws = s.ws();
    ws.subscribe_manual("q", 3);
    for i in 0..3 {
        s.publish("ex", "k", &json!(i));
    }
    let got: Vec<Value> = (0..3).map(|_| ws.expect_message()).collect();
    ws.send_json(
        "NACK",
        json!({"delivery_tag": tag(&got[2]), "multiple": true, "requeue": true}),
    );
    for (i, old) in got.iter().enumerate() {
        let m = ws.expect_message();
        assert_eq!(m["body"], i as u64, "requeued in original order");
        assert_eq!(m["unique_id"], old["unique_id"]);
        assert_eq!(m["redelivered"], true);
        assert!(tag(&m) > tag(&got[2]));
    }
    ws.expect_silence(QUIET);
    s.wait_queue_counts("q", 0, 3);
}

/// A consumer that does not read: its messages wait in the queue (counted as ready),
/// not in an unbounded socket buffer, and all arrive in order once it reads again.
#[test]
fn slow_consumer_backs_up_in_its_queue() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut slow = s.ws();
    slow.subscribe("q");
    const N: usize = 2000;
    let filler = "x".repeat(16 * 1024);
    let mut c = s.raw();
    for batch in 0..(N / 100) {
        let mut bytes = Vec::new();
        for i in 0..100 {
            let n = batch * 100 + i;
            let payload = format!("{{\"n\":{n},\"f\":\"{filler}\"}}");
            bytes.extend(build_request(
                "POST",
                "/publish",
                Some(&publish_body("ex", "k", &payload, "")),
            ));
        }
        c.send(&bytes);
        for _ in 0..100 {
            assert_eq!(c.read_response().status, 200);
        }
    }
    // 32 MiB published; far more than socket buffers hold.
    wait_until("messages wait in the queue", RECV_TIMEOUT, || {
        s.queue_info("q")["messages_ready"].as_u64().unwrap_or(0) > 0
    });
    for n in 0..N as u64 {
        let m = slow.expect_message();
        assert_eq!(m["body"]["n"], n);
    }
    s.wait_queue_counts("q", 0, 0);
}

#[test]
fn frames_arriving_a_few_bytes_at_a_time_are_read_whole() {
    use std::io::Write;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    use tungstenite::protocol::frame::Frame;
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut sub = s.ws();
    sub.subscribe("q");
    let mut publisher = s.ws();
    // Two publishes back to back, the second one's first bytes in the same write as
    // the end of the first: the server holds a partial frame between reads each time.
    let mut wire = Vec::new();
    for i in 0..2 {
        let frame = json!({"type": "PUBLISH", "payload": {
            "exchange_name": "ex", "key": "k", "payload": {"n": i, "pad": "p".repeat(150)}
        }})
        .to_string();
        // A client frame, masked as clients must, encoded by tungstenite.
        let mut f = Frame::message(frame, OpCode::Data(Data::Text), true);
        f.header_mut().mask = Some([0x37, 0xfa, 0x21, 0x3d]);
        f.format(&mut wire).unwrap();
    }
    let stream = publisher.ws.get_mut();
    for piece in wire.chunks(7) {
        stream.write_all(piece).unwrap();
        stream.flush().unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    for i in 0..2 {
        let m = sub.expect_message();
        assert_eq!(m["body"]["n"], i);
        assert_eq!(m["body"]["pad"], "p".repeat(150));
    }
}
