//! Contract tests for bad input and limits (`shared/protocol.md`): every error answer
//! has the JSON error body (HTTP) or an `ERROR` frame (WebSocket), exact status codes
//! and codes where the contract names them, reserved names, payload and head limits,
//! the memory high-water mark, and that nothing bad closes a good connection.
//!
//! Each test starts its own server (see `tests/common/mod.rs`).

mod common;

use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const MIB: usize = 1 << 20;

#[test]
fn bad_bodies_get_400_with_json_error() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let cases: &[(&str, &str)] = &[
        ("/exchanges", "not json"),
        ("/exchanges", ""),
        ("/exchanges", "[]"),
        ("/exchanges", r#"{"name":"x"}"#),
        ("/exchanges", r#"{"type":"direct"}"#),
        ("/exchanges", r#"{"name":"x","type":"weird"}"#),
        (
            "/exchanges",
            r#"{"name":"x","type":"direct","durable":"yes"}"#,
        ),
        ("/exchanges", r#"{"name":42,"type":"direct"}"#),
        ("/exchanges", r#"{"name":"x","type":"direct""#),
        ("/queues", "{"),
        ("/queues", r#"{}"#),
        ("/queues", r#"{"name":"x","overflow":"drop_tail"}"#),
        ("/queues", r#"{"name":"x","max_length":"ten"}"#),
        ("/queues", r#"{"name":"x","max_length":-1}"#),
        ("/queues", r#"{"name":"x","message_ttl_ms":-5}"#),
        ("/queues", r#"{"name":"x","durable":1}"#),
        ("/bindings", "nope"),
        ("/bindings", r#"{"exchange_name":"ex"}"#),
        ("/bindings", r#"{"queue_name":"q"}"#),
        (
            "/bindings",
            r#"{"exchange_name":"ex","queue_name":"q","key":7}"#,
        ),
        ("/publish", "garbage"),
        ("/publish", r#"{"key":"k","payload":1}"#),
        ("/publish", r#"{"exchange_name":"ex","key":"k"}"#),
        (
            "/publish",
            r#"{"exchange_name":"ex","key":"k","payload":{bad}}"#,
        ),
        (
            "/publish",
            r#"{"exchange_name":"ex","key":"k","payload":[1,2}"#,
        ),
        (
            "/publish",
            r#"{"exchange_name":"ex","key":"k","payload":01}"#,
        ),
        (
            "/publish",
            r#"{"exchange_name":"ex","key":"k","payload":1,"headers":{"a":1}}"#,
        ),
        (
            "/publish",
            r#"{"exchange_name":"ex","key":"k","payload":1,"ttl_ms":-1}"#,
        ),
        (
            "/publish",
            r#"{"exchange_name":"ex","key":"k","payload":1,"confirm":"yes"}"#,
        ),
    ];
    let mut failures = Vec::new();
    for (path, body) in cases {
        let r = s.post_raw(path, body);
        if r.status != 400 {
            failures.push(format!("POST {path} {body}: {} {}", r.status, r.body));
            continue;
        }
        assert_error_body(&r.body);
    }
    assert!(
        failures.is_empty(),
        "expected 400 for:\n{}",
        failures.join("\n")
    );
    // None of that declared anything.
    let ex = s.get("/exchanges").json();
    assert!(
        !ex.as_array().unwrap().iter().any(|e| e["name"] == "x"),
        "{ex}"
    );
    s.get("/queues/x").assert_error(404);
    s.wait_queue_counts("q", 0, 0);
}

#[test]
fn bad_names_are_refused() {
    let s = Server::start();
    let long = "n".repeat(256);
    let bad = [
        "",
        long.as_str(),
        "tab\there",
        "nl\nx",
        "nul\u{0}x",
        "del\u{7f}x",
    ];
    for name in bad {
        s.post("/exchanges", &json!({"name": name, "type": "direct"}))
            .assert_error(400);
        s.post("/queues", &json!({"name": name})).assert_error(400);
    }
    // 255 bytes of UTF-8 is fine (here 85 three-byte characters).
    let max = "€".repeat(85);
    assert_eq!(max.len(), 255);
    assert_eq!(
        s.post("/exchanges", &json!({"name": max, "type": "direct"}))
            .status,
        201
    );
    assert_eq!(s.post("/queues", &json!({"name": max})).status, 201);
}

#[test]
fn reserved_names_are_refused() {
    let s = Server::start();
    for name in ["amq.direct", "amq.x", "pubsub.q", "pubsub.", "amq."] {
        let r = s.post("/exchanges", &json!({"name": name, "type": "direct"}));
        r.assert_4xx();
        let r = s.post("/queues", &json!({"name": name}));
        r.assert_4xx();
    }
    // Only the prefixes with the dot are reserved.
    assert_eq!(
        s.post("/exchanges", &json!({"name":"amqp","type":"direct"}))
            .status,
        201
    );
    assert_eq!(s.post("/queues", &json!({"name":"pubsubber"})).status, 201);
}

#[test]
fn publish_to_unknown_exchange_is_404() {
    let s = Server::start();
    s.post_raw(
        "/publish",
        r#"{"exchange_name":"nope","key":"","payload":1}"#,
    )
    .assert_error(404);
    // Case matters.
    s.exchange("ex", "fanout");
    s.post_raw("/publish", r#"{"exchange_name":"EX","payload":1}"#)
        .assert_error(404);
}

#[test]
fn unknown_paths_and_methods() {
    let s = Server::start();
    s.get("/nope").assert_error(404);
    s.get("/exchanges/a/b/c").assert_error(404);
    s.req("PUT", "/exchanges", Some("{}")).assert_4xx();
    s.req("PATCH", "/queues/x", Some("{}")).assert_4xx();
    s.req("GET", "/publish", None).assert_4xx();
    assert_eq!(s.get("/healthz").status, 200);
}

#[test]
fn ws_path_without_upgrade_is_400() {
    let s = Server::start();
    s.get("/ws").assert_error(400);
    // Upgrade header but no key: still not a valid upgrade.
    let mut c = s.raw();
    c.send(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n");
    c.read_response().assert_error(400);
}

#[test]
fn payload_limit_is_on_the_payload() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut ws = s.ws();
    ws.subscribe("q");
    // Payload just under 1 MiB: the request around it is over 1 MiB, and it passes.
    let ok = format!("\"{}\"", "a".repeat(MIB - 16 - 2));
    assert_eq!(s.publish_raw("ex", "k", &ok)["routed"], 1);
    let (text, _) = ws.expect_type_text("MESSAGE");
    assert_body_bytes(&text, &ok);
    // Just over: 413.
    let big = format!("\"{}\"", "a".repeat(MIB + 16));
    let r = s.post_raw("/publish", &publish_body("ex", "k", &big, ""));
    let code = r.assert_error(413);
    assert_eq!(code, "payload_too_large");
    // Nothing was routed.
    ws.expect_silence(QUIET);
    s.wait_queue_counts("q", 0, 0);
    assert_eq!(s.get("/healthz").status, 200);
}

#[test]
fn max_payload_flag_http_and_ws() {
    let s = Server::with_args(&["--max-payload", "1000"]);
    s.topology("ex", "direct", "q", "k");
    let small = format!("\"{}\"", "s".repeat(900));
    let big = format!("\"{}\"", "b".repeat(1100));
    assert_eq!(s.publish_raw("ex", "k", &small)["routed"], 1);
    let code = s
        .post_raw("/publish", &publish_body("ex", "k", &big, ""))
        .assert_error(413);
    assert_eq!(code, "payload_too_large");

    let mut ws = s.ws();
    ws.publish_raw("ex", "k", &big, r#","ref":"too-big""#);
    let e = ws.expect_error_code("payload_too_large");
    assert_eq!(e["ref"], "too-big");
    // Connection still usable.
    ws.publish_raw("ex", "k", &small, r#","confirm":true,"ref":"fine""#);
    let c = ws.expect_type("CONFIRM");
    assert_eq!(c["ref"], "fine");
    assert_eq!(c["routed"], 1);
    s.wait_queue_counts("q", 2, 0);
}

#[test]
fn oversized_head_is_431() {
    let s = Server::start();
    // A 15 KiB head is fine.
    let mut c = s.raw();
    let req = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\n\r\n",
        "f".repeat(15 * 1024)
    );
    c.send(req.as_bytes());
    assert_eq!(c.read_response().status, 200);
    // 17 KiB is not.
    let mut c = s.raw();
    let req = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\n\r\n",
        "f".repeat(17 * 1024)
    );
    c.send(req.as_bytes());
    c.read_response().assert_error(431);
    // Many small headers adding up past 16 KiB.
    let mut c = s.raw();
    let mut req = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for i in 0..400 {
        req.push_str(&format!("X-H{i}: {}\r\n", "v".repeat(40)));
    }
    req.push_str("\r\n");
    c.send(req.as_bytes());
    c.read_response().assert_error(431);
    assert_eq!(s.get("/healthz").status, 200);
}

#[test]
fn chunked_upload_is_411_or_supported() {
    let s = Server::start();
    let mut c = s.raw();
    let body = r#"{"name":"chunky","type":"direct"}"#;
    let req = format!(
        "POST /exchanges HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    c.send(req.as_bytes());
    let r = c.read_response();
    if r.status == 411 {
        assert_error_body(&r.text());
    } else {
        assert_eq!(r.status, 201, "chunked upload: {r:?} {}", r.text());
        assert_eq!(s.get("/exchanges/chunky").status, 200);
    }
    assert_eq!(s.get("/healthz").status, 200);
}

#[test]
fn post_without_length_is_400_or_411() {
    let s = Server::start();
    let mut c = s.raw();
    // A body-carrying request with neither Content-Length nor Transfer-Encoding
    // is read as an empty body: 400 (bad body) or 411 both tell the client.
    c.send(b"POST /exchanges HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n");
    let r = c.read_response();
    assert!(r.status == 411 || r.status == 400, "{r:?}");
    assert_error_body(&r.text());
}

#[test]
fn garbage_requests_get_400_and_server_stays_up() {
    let s = Server::start();
    for junk in [
        &b"HELLO\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        b"POST /exchanges HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n",
        b"\x00\x01\x02\x03\r\n\r\n",
    ] {
        let mut c = s.raw();
        c.send(junk);
        let r = c.read_response();
        assert!(
            (400..500).contains(&r.status) || r.status == 505,
            "{:?} -> {r:?}",
            String::from_utf8_lossy(junk)
        );
        assert_error_body(&r.text());
    }
    // A client that vanishes mid-request does not hurt anyone.
    let mut t = TcpStream::connect(s.addr).unwrap();
    t.write_all(b"POST /publish HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"exch")
        .unwrap();
    drop(t);
    assert_eq!(s.get("/healthz").status, 200);
}

#[test]
fn bad_ws_frames_get_error_and_connection_stays_open() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut ws = s.ws();
    let bad = [
        "not json",
        "{",
        "[]",
        "42",
        r#"{"payload":{}}"#,
        r#"{"type":"NOPE","payload":{}}"#,
        r#"{"type":"SUBSCRIBE"}"#,
        r#"{"type":"SUBSCRIBE","payload":{}}"#,
        r#"{"type":"SUBSCRIBE","payload":{"queue_name":"q","ack":"sometimes"}}"#,
        r#"{"type":"SUBSCRIBE","payload":{"queue_name":"q","ack":"manual","prefetch":"x"}}"#,
        r#"{"type":"SUBSCRIBE","payload":{"queue_name":"q","ack":"manual","prefetch":-1}}"#,
        r#"{"type":"ACK","payload":{}}"#,
        r#"{"type":"ACK","payload":{"delivery_tag":"one"}}"#,
        r#"{"type":"PUBLISH","payload":{"exchange_name":"ex"}}"#,
        r#"{"type":"PUBLISH","payload":{"exchange_name":"ex","payload":{bad}}}"#,
    ];
    for text in bad {
        ws.send_text(text);
        match ws.recv_json_timeout(RECV_TIMEOUT) {
            Some(v) if v["type"] == "ERROR" => {
                let code = v["code"].as_str().unwrap_or("");
                assert!(is_snake_case(code), "bad ERROR code for {text}: {v}");
                assert!(
                    v["message"].is_string(),
                    "ERROR without message for {text}: {v}"
                );
            }
            other => panic!("frame {text} -> {other:?}, wanted ERROR"),
        }
    }
    // A binary frame is a bad frame too, not a protocol violation.
    ws.ws
        .send(tungstenite::Message::Binary(
            b"{\"type\":\"SUBSCRIBE\"}".to_vec().into(),
        ))
        .unwrap();
    ws.expect_error();
    // Still fully usable.
    ws.subscribe("q");
    s.publish("ex", "k", &json!("still here"));
    assert_eq!(ws.expect_message()["body"], "still here");
}

#[test]
fn unknown_delivery_tag() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut ws = s.ws();
    ws.ack(999, false);
    ws.expect_error_code("unknown_delivery_tag");
    ws.send_json("NACK", json!({"delivery_tag": 12345, "requeue": true}));
    ws.expect_error_code("unknown_delivery_tag");
    // Acking the same tag twice.
    ws.subscribe_manual("q", 5);
    s.publish("ex", "k", &json!(1));
    let m = ws.expect_message();
    let tag = m["delivery_tag"].as_u64().unwrap();
    ws.ack(tag, false);
    ws.ack(tag, false);
    ws.expect_error_code("unknown_delivery_tag");
    s.wait_queue_counts("q", 0, 0);
    // Still usable.
    s.publish("ex", "k", &json!(2));
    let m = ws.expect_message();
    assert_eq!(m["body"], 2);
    ws.ack(m["delivery_tag"].as_u64().unwrap(), false);
    ws.expect_silence(QUIET);
}

#[test]
fn ws_publish_errors_carry_ref() {
    let s = Server::start();
    let mut ws = s.ws();
    ws.send_json(
        "PUBLISH",
        json!({"exchange_name":"nope","key":"","payload":1,"confirm":true,"ref":"r-404"}),
    );
    let e = ws.expect_error();
    assert_eq!(e["ref"], "r-404");
    ws.send_text(
        r#"{"type":"PUBLISH","payload":{"exchange_name":"nope","payload":1,"ref":"r-x"}}"#,
    );
    assert_eq!(ws.expect_error()["ref"], "r-x");
}

fn read_close_code(ws: &mut Ws) -> Option<u16> {
    let deadline = std::time::Instant::now() + RECV_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        match ws.read_timeout(left) {
            Got::Closed(Some(f)) => return Some(u16::from(f.code)),
            Got::Closed(None) => return None,
            Got::Timeout => return None,
            Got::Text(t) => panic!("wanted a close frame, got {t}"),
            Got::Other(_) => continue,
        }
    }
}

#[test]
fn unmasked_client_frame_closes_with_1002() {
    let s = Server::start();
    let mut ws = s.ws();
    // A text frame "hi" without the mask bit: a WebSocket protocol violation.
    ws.ws
        .get_mut()
        .write_all(&[0x81, 0x02, b'h', b'i'])
        .unwrap();
    assert_eq!(read_close_code(&mut ws), Some(1002));
}

#[test]
fn invalid_utf8_text_closes_with_1007() {
    let s = Server::start();
    let mut ws = s.ws();
    // Masked text frame with payload 0xff 0xfe (not UTF-8); mask key 0.
    ws.ws
        .get_mut()
        .write_all(&[0x81, 0x82, 0, 0, 0, 0, 0xff, 0xfe])
        .unwrap();
    assert_eq!(read_close_code(&mut ws), Some(1007));
}

#[test]
fn memory_high_water_refuses_publishes_until_drained() {
    let s = Server::with_args(&["--memory-high-water", &(4 * MIB).to_string()]);
    s.topology("ex", "direct", "q", "k");
    let payload = format!("\"{}\"", "m".repeat(256 * 1024));
    let mut accepted = 0u64;
    let mut refused = None;
    for _ in 0..100 {
        let r = s.post_raw("/publish", &publish_body("ex", "k", &payload, ""));
        if r.status == 200 {
            accepted += 1;
            continue;
        }
        refused = Some(r);
        break;
    }
    let r =
        refused.unwrap_or_else(|| panic!("100 x 256 KiB accepted under a 4 MiB high-water mark"));
    assert!(accepted > 0, "the very first publish was refused: {r:?}");
    assert_eq!(r.assert_error(503), "resource_limit");
    // Nothing was stored by the refused publish.
    s.wait_queue_counts("q", accepted, 0);
    let mut ws = s.ws();
    ws.publish_raw("ex", "k", &payload, r#","ref":"full""#);
    let e = ws.expect_error_code("resource_limit");
    assert_eq!(e["ref"], "full");
    // Drain: publishes are accepted again.
    ws.subscribe("q");
    for _ in 0..accepted {
        ws.expect_message();
    }
    s.wait_queue_counts("q", 0, 0);
    wait_until("publish accepted after drain", RECV_TIMEOUT, || {
        s.post_raw("/publish", &publish_body("ex", "k", "1", ""))
            .status
            == 200
    });
}

#[test]
fn max_connections_is_enforced() {
    let s = Server::with_args(&["--max-connections", "4"]);
    let held: Vec<Ws> = (0..4).map(|_| s.ws()).collect();
    // The fifth connection is not served (refused, closed, or answered 503).
    let mut t = TcpStream::connect(s.addr).unwrap();
    t.set_read_timeout(Some(RECV_TIMEOUT)).unwrap();
    let _ = t.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match t.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if find(&buf, b"\r\n\r\n").is_some() {
                    break;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&buf);
    assert!(
        buf.is_empty() || text.starts_with("HTTP/1.1 503"),
        "fifth connection was served: {text}"
    );
    drop(held);
    wait_until("a connection is served again", RECV_TIMEOUT, || {
        let Ok(mut t) = TcpStream::connect(s.addr) else {
            return false;
        };
        let _ = t.set_read_timeout(Some(Duration::from_millis(500)));
        if t.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut b = [0u8; 12];
        t.read_exact(&mut b).is_ok() && &b == b"HTTP/1.1 200"
    });
}

/// One connection cannot hold subscriptions without bound: past the limit it gets
/// `ERROR resource_limit` and stays usable.
#[test]
fn subscriptions_per_connection_are_bounded() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut ws = s.ws();
    for _ in 0..1024 {
        ws.send_json("SUBSCRIBE", json!({"queue_name": "q"}));
    }
    for _ in 0..1024 {
        ws.expect_type("SUBSCRIBED");
    }
    ws.send_json("SUBSCRIBE", json!({"queue_name": "q"}));
    ws.expect_error_code("resource_limit");
    s.publish("ex", "k", &json!("still here"));
    assert_eq!(ws.expect_message()["body"], "still here");
}
