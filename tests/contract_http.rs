//! Contract tests for the HTTP side of `shared/protocol.md`: the seed client's flow,
//! byte-for-byte payloads, declare/get/delete of exchanges, queues and bindings, purge,
//! health, metrics, the console, keep-alive and pipelining, and the shard header.
//!
//! Each test starts its own server (see `tests/common/mod.rs`).

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A client written for the seed: `"Key"` in the binding, SUBSCRIBE by queue name,
/// MESSAGE carrying `unique_id` and `body`.
#[test]
fn seed_client_flow() {
    let s = Server::start();
    let r = s.post_raw("/exchanges", r#"{"name":"seed-ex","type":"direct"}"#);
    assert_eq!(r.status, 201, "{r:?}");
    let r = s.post_raw("/queues", r#"{"name":"seed-q"}"#);
    assert_eq!(r.status, 201, "{r:?}");
    let r = s.post_raw(
        "/bindings",
        r#"{"exchange_name":"seed-ex","queue_name":"seed-q","Key":"seed-key"}"#,
    );
    assert_eq!(r.status, 201, "{r:?}");

    let mut ws = s.ws();
    ws.send_text(r#"{"type":"SUBSCRIBE","payload":{"queue_name":"seed-q"}}"#);
    let sub = ws.expect_type("SUBSCRIBED");
    assert_eq!(sub["queue_name"], "seed-q");
    let sub_id = sub["subscription"].as_str().unwrap().to_string();
    assert!(!sub_id.is_empty());

    let before = now_ms();
    let r = s.post_raw(
        "/publish",
        r#"{"exchange_name":"seed-ex","key":"seed-key","payload":{"hello":"world","n":1}}"#,
    );
    assert_eq!(r.status, 200, "{r:?}");
    let reply = r.json();
    assert_eq!(reply["routed"], 1, "{reply}");
    let id = reply["id"].as_str().unwrap().to_string();
    assert!(!id.is_empty());

    let m = ws.expect_message();
    assert_eq!(m["unique_id"], id.as_str());
    assert_eq!(m["body"], json!({"hello":"world","n":1}));
    assert_eq!(m["subscription"], sub_id.as_str());
    assert_eq!(m["queue"], "seed-q");
    assert_eq!(m["exchange"], "seed-ex");
    assert_eq!(m["routing_key"], "seed-key");
    assert_eq!(m["delivery_tag"], 1);
    assert_eq!(m["redelivered"], false);
    let at = m["published_at"]
        .as_u64()
        .expect("published_at is an integer");
    assert!(
        at + 5_000 >= before && at <= now_ms() + 5_000,
        "published_at {at} not near now {before}"
    );
    ws.expect_silence(QUIET);
}

/// The binding key may be spelt `"key"` or `"Key"`; both name the same binding.
#[test]
fn binding_key_spellings_are_equivalent() {
    let s = Server::start();
    s.exchange("ex", "direct");
    s.queue("q");
    let r = s.post_raw(
        "/bindings",
        r#"{"exchange_name":"ex","queue_name":"q","Key":"k"}"#,
    );
    assert_eq!(r.status, 201, "{r:?}");
    let r = s.post_raw(
        "/bindings",
        r#"{"exchange_name":"ex","queue_name":"q","key":"k"}"#,
    );
    assert_eq!(r.status, 200, "same binding spelt with key: {r:?}");
    let all = s.get("/bindings").json();
    let n = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["exchange_name"] == "ex" && b["queue_name"] == "q")
        .count();
    assert_eq!(n, 1, "one binding expected: {all}");
    assert_eq!(s.publish("ex", "k", &json!(1))["routed"], 1);
    // DELETE takes the same body as POST, so "Key" there too.
    let r = s.req(
        "DELETE",
        "/bindings",
        Some(r#"{"exchange_name":"ex","queue_name":"q","Key":"k"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(s.publish("ex", "k", &json!(1))["routed"], 0);
}

fn payload_round_trip(payloads: &[&str]) {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut ws = s.ws();
    ws.subscribe("q");
    for p in payloads {
        let reply = s.publish_raw("ex", "k", p);
        assert_eq!(reply["routed"], 1);
        let (text, v) = ws.expect_type_text("MESSAGE");
        assert_body_bytes(&text, p);
        let want: Value = serde_json::from_str(p).unwrap();
        assert_eq!(v["body"], want, "body differs from payload in {text}");
        assert_eq!(v["unique_id"], reply["id"]);
    }
}

#[test]
fn payload_delivered_byte_for_byte() {
    payload_round_trip(&[
        r#"{"b": 1,  "a":[1,2 ,3],"s":"\u00e9"}"#,
        r#"{ "z" : { "y" : [ true , false , null ] } , "x" : "\"quoted\" \/ \t" }"#,
        r#"12.50"#,
        r#"1e+2"#,
        r#""a string with \ud83d\ude00 and é""#,
        r#"[ ]"#,
        "{\n  \"multi\":\n    \"line\"\n}",
    ]);
}

/// Byte for byte over WebSocket PUBLISH too.
#[test]
fn ws_publish_payload_byte_for_byte() {
    let s = Server::start();
    s.topology("ex", "fanout", "q", "");
    let mut sub = s.ws();
    sub.subscribe("q");
    let mut publ = s.ws();
    let p = r#"{"k" :  [0.10, -0 , "\u0041"] ,"é":{}}"#;
    publ.publish_raw("ex", "", p, r#","confirm":true,"ref":"r1""#);
    let c = publ.expect_type("CONFIRM");
    assert_eq!(c["ref"], "r1");
    assert_eq!(c["routed"], 1);
    let (text, v) = sub.expect_type_text("MESSAGE");
    assert_body_bytes(&text, p);
    assert_eq!(v["unique_id"], c["id"]);
}

#[test]
fn publish_ids_are_unique() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut ids = std::collections::HashSet::new();
    for i in 0..50 {
        let r = s.publish("ex", "k", &json!(i));
        assert!(
            ids.insert(r["id"].as_str().unwrap().to_string()),
            "dup id {r}"
        );
    }
}

#[test]
fn exchange_declare_get_delete() {
    let s = Server::start();
    let r = s.post("/exchanges", &json!({"name":"ex","type":"topic"}));
    assert_eq!(r.status, 201, "{r:?}");
    // Identical re-declare: 200. `durable` defaults to true for exchanges.
    let r = s.post("/exchanges", &json!({"name":"ex","type":"topic"}));
    assert_eq!(r.status, 200, "{r:?}");
    let r = s.post(
        "/exchanges",
        &json!({"name":"ex","type":"topic","durable":true}),
    );
    assert_eq!(
        r.status, 200,
        "explicit durable:true is identical to default: {r:?}"
    );
    // Different settings: 409.
    let r = s.post("/exchanges", &json!({"name":"ex","type":"fanout"}));
    r.assert_error(409);
    let r = s.post(
        "/exchanges",
        &json!({"name":"ex","type":"topic","durable":false}),
    );
    r.assert_error(409);

    let r = s.post(
        "/exchanges",
        &json!({"name":"transient","type":"direct","durable":false}),
    );
    assert_eq!(r.status, 201, "{r:?}");

    let r = s.get("/exchanges/ex");
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["name"], "ex");
    assert_eq!(v["type"], "topic");
    assert_eq!(v["durable"], true);
    let v = s.get("/exchanges/transient").json();
    assert_eq!(v["type"], "direct");
    assert_eq!(v["durable"], false);

    let r = s.get("/exchanges");
    assert_eq!(r.status, 200);
    let all = r.json();
    let arr = all.as_array().expect("GET /exchanges is an array");
    let ex = arr.iter().find(|e| e["name"] == "ex").expect("ex listed");
    assert_eq!(ex["type"], "topic");
    assert_eq!(ex["durable"], true);
    assert!(arr.iter().any(|e| e["name"] == "transient"));

    s.get("/exchanges/nope").assert_error(404);
    let r = s.delete("/exchanges/ex");
    assert_eq!(r.status, 204, "{r:?}");
    assert!(r.body.is_empty());
    s.get("/exchanges/ex").assert_error(404);
    s.delete("/exchanges/ex").assert_error(404);
    let all = s.get("/exchanges").json();
    assert!(!all.as_array().unwrap().iter().any(|e| e["name"] == "ex"));
    // It can be declared again, now with other settings.
    let r = s.post("/exchanges", &json!({"name":"ex","type":"fanout"}));
    assert_eq!(r.status, 201, "{r:?}");
}

#[test]
fn deleting_an_exchange_deletes_its_bindings() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    s.exchange("other", "direct");
    s.bind("other", "q", "k");
    assert_eq!(s.delete("/exchanges/ex").status, 204);
    let all = s.get("/bindings").json();
    let arr = all.as_array().unwrap();
    assert!(!arr.iter().any(|b| b["exchange_name"] == "ex"), "{all}");
    assert!(arr.iter().any(|b| b["exchange_name"] == "other"), "{all}");
    // Re-creating it does not resurrect the binding.
    s.exchange("ex", "direct");
    assert_eq!(s.publish("ex", "k", &json!(1))["routed"], 0);
}

#[test]
fn queue_declare_get_delete() {
    let s = Server::start();
    let r = s.post("/queues", &json!({"name":"q"}));
    assert_eq!(r.status, 201, "{r:?}");
    let r = s.post("/queues", &json!({"name":"q"}));
    assert_eq!(r.status, 200, "{r:?}");
    // durable defaults to false for queues.
    let r = s.post("/queues", &json!({"name":"q","durable":false}));
    assert_eq!(r.status, 200, "{r:?}");
    s.post("/queues", &json!({"name":"q","durable":true}))
        .assert_error(409);
    s.post("/queues", &json!({"name":"q","max_length":10}))
        .assert_error(409);

    let full = json!({"name":"q2","durable":true,"max_length":5,"message_ttl_ms":60000,
                      "overflow":"drop_head","dead_letter_exchange":"dlx"});
    assert_eq!(s.post("/queues", &full).status, 201);
    assert_eq!(s.post("/queues", &full).status, 200);
    let mut other = full.clone();
    other["overflow"] = json!("reject_publish");
    s.post("/queues", &other).assert_error(409);

    let v = s.queue_info("q");
    assert_eq!(v["name"], "q");
    assert_eq!(v["durable"], false);
    assert_eq!(v["messages_ready"], 0);
    assert_eq!(v["messages_unacked"], 0);
    assert_eq!(v["consumers"], 0);
    assert_eq!(s.queue_info("q2")["durable"], true);

    let all = s.get("/queues");
    assert_eq!(all.status, 200);
    let all = all.json();
    let arr = all.as_array().expect("GET /queues is an array");
    assert!(arr.iter().any(|q| q["name"] == "q"));
    assert!(arr.iter().any(|q| q["name"] == "q2"));

    s.get("/queues/nope").assert_error(404);
    let r = s.delete("/queues/q");
    assert_eq!(r.status, 204, "{r:?}");
    s.get("/queues/q").assert_error(404);
    s.delete("/queues/q").assert_error(404);
}

#[test]
fn queue_counts_consumers() {
    let s = Server::start();
    s.queue("q");
    let mut a = s.ws();
    a.subscribe("q");
    let mut b = s.ws();
    b.subscribe("q");
    wait_until("consumers == 2", RECV_TIMEOUT, || {
        s.queue_info("q")["consumers"] == 2
    });
    b.close();
    wait_until("consumers == 1", RECV_TIMEOUT, || {
        s.queue_info("q")["consumers"] == 1
    });
}

#[test]
fn names_in_paths_are_percent_decoded() {
    let s = Server::start();
    let name = "orders v2/é";
    let r = s.post("/queues", &json!({"name": name}));
    assert_eq!(r.status, 201, "{r:?}");
    let v = s.queue_info(name);
    assert_eq!(v["name"], name);
    let r = s.post("/exchanges", &json!({"name": name, "type": "direct"}));
    assert_eq!(r.status, 201, "{r:?}");
    let r = s.get(&format!("/exchanges/{}", encode_segment(name)));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["name"], name);
}

#[test]
fn binding_declare_list_delete() {
    let s = Server::start();
    s.exchange("ex", "topic");
    s.queue("q");
    let b = json!({"exchange_name":"ex","queue_name":"q","key":"a.*"});
    assert_eq!(s.post("/bindings", &b).status, 201);
    assert_eq!(s.post("/bindings", &b).status, 200);
    // Default key is "".
    let r = s.post("/bindings", &json!({"exchange_name":"ex","queue_name":"q"}));
    assert_eq!(r.status, 201, "{r:?}");
    let r = s.post(
        "/bindings",
        &json!({"exchange_name":"ex","queue_name":"q","key":""}),
    );
    assert_eq!(r.status, 200, "{r:?}");

    let all = s.get("/bindings");
    assert_eq!(all.status, 200);
    let all = all.json();
    let arr = all.as_array().expect("array");
    let ours: Vec<&Value> = arr
        .iter()
        .filter(|b| b["exchange_name"] == "ex" && b["queue_name"] == "q")
        .collect();
    assert_eq!(ours.len(), 2, "{all}");
    assert!(ours.iter().any(|b| b["key"] == "a.*"));
    assert!(ours.iter().any(|b| b["key"] == ""));

    s.post(
        "/bindings",
        &json!({"exchange_name":"nope","queue_name":"q","key":"k"}),
    )
    .assert_error(404);
    s.post(
        "/bindings",
        &json!({"exchange_name":"ex","queue_name":"nope","key":"k"}),
    )
    .assert_error(404);

    assert_eq!(s.publish("ex", "a.b", &json!(1))["routed"], 1);
    let r = s.delete_json("/bindings", &b);
    assert_eq!(r.status, 204, "{r:?}");
    s.delete_json("/bindings", &b).assert_error(404);
    assert_eq!(s.publish("ex", "a.b", &json!(1))["routed"], 0);
    let all = s.get("/bindings").json();
    assert!(
        !all.as_array().unwrap().iter().any(|x| x["key"] == "a.*"),
        "{all}"
    );
}

#[test]
fn deleting_a_queue_deletes_its_bindings() {
    let s = Server::start();
    s.topology("ex", "fanout", "q", "");
    assert_eq!(s.delete("/queues/q").status, 204);
    let all = s.get("/bindings").json();
    assert!(
        !all.as_array()
            .unwrap()
            .iter()
            .any(|b| b["queue_name"] == "q"),
        "{all}"
    );
    assert_eq!(s.publish("ex", "", &json!(1))["routed"], 0);
}

#[test]
fn purge_removes_ready_only() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    for i in 0..3 {
        s.publish("ex", "k", &json!(i));
    }
    s.wait_queue_counts("q", 3, 0);
    let r = s.post_raw("/queues/q/purge", "");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["purged"], 3);
    s.wait_queue_counts("q", 0, 0);

    // With one unacked message outstanding.
    let mut ws = s.ws();
    ws.subscribe_manual("q", 1);
    for i in 0..3 {
        s.publish("ex", "k", &json!(i));
    }
    let m = ws.expect_message();
    assert_eq!(m["body"], 0);
    s.wait_queue_counts("q", 2, 1);
    let r = s.req("POST", "/queues/q/purge", None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["purged"], 2);
    s.wait_queue_counts("q", 0, 1);
    ws.ack(m["delivery_tag"].as_u64().unwrap(), false);
    s.wait_queue_counts("q", 0, 0);
    ws.expect_silence(QUIET);

    s.req("POST", "/queues/nope/purge", None).assert_error(404);
}

#[test]
fn healthz() {
    let s = Server::start();
    let r = s.get("/healthz");
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"status":"ok"}));
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("application/json"),
        "{r:?}"
    );
}

#[test]
fn metrics_is_prometheus_text() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    s.publish("ex", "k", &json!(1));
    let r = s.get("/metrics");
    assert_eq!(r.status, 200);
    let ct = r.header("content-type").unwrap_or("");
    assert!(ct.starts_with("text/plain"), "content-type {ct:?}");
    let mut samples = 0;
    for line in r.body.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let kind = rest.split_whitespace().nth(1).unwrap_or("");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "bad TYPE line {line:?}"
                );
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("bad sample {line:?}"));
        let name = &line[..name_end];
        assert!(
            !name.is_empty()
                && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_' || c == ':')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        let rest = if line[name_end..].starts_with('{') {
            let close = line
                .rfind('}')
                .unwrap_or_else(|| panic!("unclosed labels {line:?}"));
            &line[close + 1..]
        } else {
            &line[name_end..]
        };
        let value = rest.split_whitespace().next().unwrap_or("");
        assert!(
            value.parse::<f64>().is_ok() || ["NaN", "+Inf", "-Inf"].contains(&value),
            "bad sample value in {line:?}"
        );
        samples += 1;
    }
    assert!(samples > 0, "no samples in /metrics:\n{}", r.body);
}

#[test]
fn console_is_html() {
    let s = Server::start();
    let r = s.get("/");
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("text/html"),
        "{:?}",
        r.headers
    );
    assert!(r.body.to_ascii_lowercase().contains("<html"), "not HTML");
}

#[test]
fn keep_alive_and_pipelining() {
    let s = Server::start();
    let mut c = s.raw();
    // Sequential requests on one connection.
    for _ in 0..3 {
        let r = c.request("GET", "/healthz", None);
        assert_eq!(r.status, 200);
    }
    // Five requests in one write; answers come back in order.
    let mut batch = Vec::new();
    batch.extend(build_request(
        "POST",
        "/exchanges",
        Some(r#"{"name":"p","type":"fanout"}"#),
    ));
    batch.extend(build_request(
        "POST",
        "/exchanges",
        Some(r#"{"name":"p","type":"fanout"}"#),
    ));
    batch.extend(build_request("GET", "/exchanges/p", None));
    batch.extend(build_request("GET", "/exchanges/missing", None));
    batch.extend(build_request("POST", "/queues", Some(r#"{"name":"pq"}"#)));
    batch.extend(build_request("GET", "/healthz", None));
    c.send(&batch);
    let r = c.read_response();
    assert_eq!(r.status, 201, "{}", r.text());
    let r = c.read_response();
    assert_eq!(r.status, 200, "{}", r.text());
    let r = c.read_response();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["name"], "p");
    let r = c.read_response();
    r.assert_error(404);
    let r = c.read_response();
    assert_eq!(r.status, 201, "{}", r.text());
    let r = c.read_response();
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"status":"ok"}));
    // A request split across writes.
    let req = build_request("GET", "/queues/pq", None);
    let (a, b) = req.split_at(7);
    c.send(a);
    std::thread::sleep(Duration::from_millis(50));
    c.send(b);
    let r = c.read_response();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["name"], "pq");
}

#[test]
fn pipelined_publishes_keep_order() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut ws = s.ws();
    ws.subscribe("q");
    let mut c = s.raw();
    let mut batch = Vec::new();
    for i in 0..100 {
        batch.extend(build_request(
            "POST",
            "/publish",
            Some(&publish_body("ex", "k", &i.to_string(), "")),
        ));
    }
    c.send(&batch);
    for _ in 0..100 {
        let r = c.read_response();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["routed"], 1);
    }
    for i in 0..100 {
        assert_eq!(ws.expect_message()["body"], i);
    }
}

#[test]
fn connection_close_is_honoured() {
    let s = Server::start();
    let mut c = s.raw();
    c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 200);
    assert!(
        c.is_closed(),
        "server kept a Connection: close connection open"
    );
}

#[test]
fn every_response_names_its_shard() {
    let s = Server::start();
    let mut c = s.raw();
    let rs = [
        c.request("GET", "/healthz", None),
        c.request(
            "POST",
            "/exchanges",
            Some(r#"{"name":"e","type":"direct"}"#),
        ),
        c.request("GET", "/exchanges/none", None),
        c.request("POST", "/exchanges", Some("not json")),
        c.request("GET", "/metrics", None),
        c.request("GET", "/", None),
    ];
    let first = rs[0].shard();
    for r in &rs {
        assert_eq!(r.shard(), first, "one connection, one shard: {r:?}");
    }
    let ws = s.ws();
    let _ = ws.shard; // the 101 carries it (checked in Ws::connect)
    let s2 = Server::with_args(&["--shards", "2"]);
    let a = s2.raw_on_shard(0);
    let b = s2.raw_on_shard(1);
    drop((a, b));
}

#[test]
fn publish_accepts_optional_fields() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut ws = s.ws();
    ws.subscribe("q");
    let body = publish_body(
        "ex",
        "k",
        r#"{"x":1}"#,
        r#","confirm":true,"persistent":false,"ttl_ms":60000,"headers":{"h1":"v1","h2":""}"#,
    );
    let r = s.post_raw("/publish", &body);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["routed"], 1);
    assert_eq!(ws.expect_message()["body"], json!({"x":1}));
}

/// The harness can kill -9 and restart on the same port and data directory; a
/// non-durable queue does not come back.
#[test]
fn restart_on_same_data_dir() {
    let mut s = Server::start();
    let r = s.post("/queues", &json!({"name":"transient","durable":false}));
    assert_eq!(r.status, 201);
    s.kill9();
    s.restart();
    assert_eq!(s.get("/healthz").status, 200);
    s.get("/queues/transient").assert_error(404);
}
