//! Contract tests for `durable` (`shared/protocol.md`, "Model" and `confirm`): a
//! durable exchange, a durable queue, its bindings and the messages routed to it survive
//! a `kill -9` and restart on the same data directory; `confirm: true` means on disk;
//! without it, on disk within the checkpoint interval. Non-durable things do not survive.
//!
//! Each test starts its own server (see `tests/common/mod.rs`).

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

fn durable_topology(s: &Server) {
    let r = s.post(
        "/exchanges",
        &json!({"name":"dex","type":"topic","durable":true}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let r = s.post(
        "/queues",
        &json!({"name":"dq","durable":true,"max_length":100}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    s.bind("dex", "dq", "a.#");
}

#[test]
fn confirmed_messages_survive_kill9() {
    let mut s = Server::with_args(&["--checkpoint-ms", "5000"]);
    durable_topology(&s);
    s.queue("transient_q");
    s.bind("dex", "transient_q", "#");
    let r = s.post(
        "/exchanges",
        &json!({"name":"tex","type":"direct","durable":false}),
    );
    assert_eq!(r.status, 201);
    let mut ids = Vec::new();
    for i in 0..5 {
        let body = publish_body(
            "dex",
            "a.b",
            &format!("{{\"n\": {i}}}"),
            r#","confirm":true"#,
        );
        let r = s.post_raw("/publish", &body);
        assert_eq!(r.status, 200, "{r:?}");
        let v = r.json();
        assert_eq!(v["routed"], 2);
        ids.push(v["id"].clone());
    }
    s.kill9();
    s.restart();

    // Topology: durable things back with their settings, transient ones gone.
    let ex = s.get("/exchanges/dex").json();
    assert_eq!(ex["type"], "topic");
    assert_eq!(ex["durable"], true);
    s.get("/exchanges/tex").assert_error(404);
    s.get("/queues/transient_q").assert_error(404);
    let r = s.post(
        "/queues",
        &json!({"name":"dq","durable":true,"max_length":100}),
    );
    assert_eq!(r.status, 200, "identical re-declare after restart: {r:?}");
    let all = s.get("/bindings").json();
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .any(|b| b["exchange_name"] == "dex" && b["queue_name"] == "dq" && b["key"] == "a.#"),
        "durable binding lost: {all}"
    );
    s.wait_queue_counts("dq", 5, 0);

    // Messages: same ids, same bytes, same order.
    let mut ws = s.ws();
    ws.subscribe("dq");
    for (i, id) in ids.iter().enumerate() {
        let (text, m) = ws.expect_type_text("MESSAGE");
        assert_eq!(m["unique_id"], *id);
        assert_body_bytes(&text, &format!("{{\"n\": {i}}}"));
    }
    ws.expect_silence(QUIET);
    // And routing still works.
    assert_eq!(s.publish("dex", "a", &json!("after"))["routed"], 1);
    assert_eq!(ws.expect_message()["body"], "after");
}

#[test]
fn unconfirmed_messages_on_disk_within_checkpoint_interval() {
    let mut s = Server::with_args(&["--checkpoint-ms", "50"]);
    durable_topology(&s);
    for i in 0..20 {
        assert_eq!(s.publish("dex", "a.x", &json!(i))["routed"], 1);
    }
    // Well past the 50 ms interval.
    std::thread::sleep(Duration::from_millis(600));
    s.kill9();
    s.restart();
    s.wait_queue_counts("dq", 20, 0);
    let mut ws = s.ws();
    ws.subscribe("dq");
    for i in 0..20 {
        assert_eq!(ws.expect_message()["body"], i);
    }
}

#[test]
fn acked_messages_stay_gone_and_unacked_come_back() {
    let mut s = Server::with_args(&["--checkpoint-ms", "50"]);
    durable_topology(&s);
    for i in 0..4 {
        let body = publish_body("dex", "a", &i.to_string(), r#","confirm":true"#);
        assert_eq!(s.post_raw("/publish", &body).status, 200);
    }
    let mut ws = s.ws();
    ws.subscribe_manual("dq", 10);
    let got: Vec<_> = (0..4).map(|_| ws.expect_message()).collect();
    // Ack the first two; leave 2 and 3 unacked.
    ws.ack(got[1]["delivery_tag"].as_u64().unwrap(), true);
    s.wait_queue_counts("dq", 0, 2);
    std::thread::sleep(Duration::from_millis(600));
    s.kill9();
    s.restart();
    s.wait_queue_counts("dq", 2, 0);
    let mut ws = s.ws();
    ws.subscribe_manual("dq", 10);
    for (i, old) in got.iter().enumerate().skip(2) {
        let m = ws.expect_message();
        assert_eq!(m["body"], i as u64);
        assert_eq!(m["unique_id"], old["unique_id"]);
    }
    ws.expect_silence(QUIET);
}

#[test]
fn deleted_durable_things_stay_deleted() {
    let mut s = Server::with_args(&["--checkpoint-ms", "50"]);
    durable_topology(&s);
    let r = s.post("/queues", &json!({"name":"dq2","durable":true}));
    assert_eq!(r.status, 201);
    s.bind("dex", "dq2", "#");
    assert_eq!(s.delete("/queues/dq").status, 204);
    assert_eq!(
        s.delete_json(
            "/bindings",
            &json!({"exchange_name":"dex","queue_name":"dq2","key":"#"})
        )
        .status,
        204
    );
    std::thread::sleep(Duration::from_millis(600));
    s.kill9();
    s.restart();
    s.get("/queues/dq").assert_error(404);
    assert_eq!(s.queue_info("dq2")["durable"], true);
    assert_eq!(s.publish("dex", "a.b", &json!(1))["routed"], 0);
}

/// A durable declare on a freshly started server is answered (it waits for its commit,
/// and that commit must come). Several servers start at once, as in a busy CI run.
#[test]
fn first_durable_declare_is_answered_on_fresh_servers() {
    for _round in 0..2 {
        let handles: Vec<_> = (0..6)
            .map(|i| {
                std::thread::spawn(move || {
                    let s = Server::start();
                    let mut c = s.raw();
                    let body = format!(r#"{{"name":"fresh{i}","type":"direct","durable":true}}"#);
                    let started = std::time::Instant::now();
                    let r = c.request("POST", "/exchanges", Some(&body));
                    assert_eq!(r.status, 201, "{}", r.text());
                    let r = c.request("POST", "/queues", Some(r#"{"name":"dq","durable":true}"#));
                    assert_eq!(r.status, 201, "{}", r.text());
                    started.elapsed()
                })
            })
            .collect();
        for h in handles {
            let took = h
                .join()
                .expect("a durable declare was not answered (see its panic)");
            assert!(took < RECV_TIMEOUT, "durable declares took {took:?}");
        }
    }
}
