//! A message that waits in a queue must not keep alive the read buffer its frame
//! arrived in (`QueueState::compact`, `docs/architecture.md` "Memory").
//!
//! A published message's text is a slice of its connection's read buffer, shared with
//! every frame read with it. A queue that keeps one message in a hundred (here: bound to
//! one routing key of the traffic, with nobody consuming it; the rest is unroutable and
//! dropped at once) used to keep a whole read buffer per kept message, while the memory
//! high-water mark, which the contract says bounds the server's memory, counted only
//! the messages' own bytes: 2,000 kept messages (487 KiB counted) held 63 MiB. The
//! server now copies a message that has waited out of its buffer, once, whether it
//! waits ready in the queue or delivered to a consumer that has not acked it.
//!
//! Measured where it matters, in the real server's resident memory (`VmRSS`), with a
//! bound far from both sides: without the copy the growth is tens of MiB here, with it
//! about 1.5 KiB per kept message.

mod common;

use common::*;
use std::time::Duration;

/// Messages published; one in [`KEEP_EVERY`] is routed to the kept queue.
const MESSAGES: u64 = 200_000;
const KEEP_EVERY: u64 = 100;
/// Growth of the server's RSS allowed per kept message: a message and its copy are
/// a few hundred bytes (measured: 0.5–2.5 KiB each, allocator slack included); the
/// read buffers it kept before were 24 KiB a message here.
const ALLOWED_PER_KEPT: u64 = 12 * 1024;
/// How long the server may take to copy the kept messages (they wait 100 ms, the
/// shard's tick is 20 ms) and to hand the freed buffers back to the system.
const SETTLE: Duration = Duration::from_secs(10);

fn rss_bytes(s: &Server) -> u64 {
    let pid = s.pid().expect("server pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    kib * 1024
}

/// Publishes `n` pipelined frames of about 180 bytes on `p`, one in [`KEEP_EVERY`]
/// with routing key `keep`, the rest with a key nothing is bound to.
fn publish_mix(p: &mut Ws, first: u64, n: u64) {
    let pad = "x".repeat(100);
    for i in first..first + n {
        let key = if i % KEEP_EVERY == 0 {
            "keep"
        } else {
            "nowhere"
        };
        let frame = format!(
            r#"{{"type":"PUBLISH","payload":{{"exchange_name":"x","key":"{key}","payload":{{"i":{i},"p":"{pad}"}}}}}}"#
        );
        p.ws.write(tungstenite::Message::text(frame)).unwrap();
        if i % 1000 == 999 {
            p.ws.flush().unwrap();
        }
    }
    p.ws.flush().unwrap();
}

/// Waits until the kept queue holds `n` messages, ready or (with `unacked`) delivered
/// and not acked.
fn wait_held(s: &Server, n: u64, unacked: bool) {
    let field = if unacked {
        "messages_unacked"
    } else {
        "messages_ready"
    };
    wait_until(
        "the kept queue to hold its messages",
        RECV_TIMEOUT * 6,
        || s.queue_info("keep")[field].as_u64() == Some(n),
    );
}

/// Publishes a warm-up round and then [`MESSAGES`], one in [`KEEP_EVERY`] kept in
/// queue `keep` (ready, or with `unacked` delivered to a manual-ack subscriber with no
/// prefetch limit that never acks), and holds the server's RSS growth over the
/// measured round to [`ALLOWED_PER_KEPT`] per kept message. Returns the server and the
/// subscriber, if any.
fn publish_and_measure(unacked: bool) -> (Server, Option<Ws>) {
    let s = Server::start();
    s.exchange("x", "direct");
    s.queue_with("keep", serde_json::json!({"durable": false}));
    s.bind("x", "keep", "keep");
    let mut sub = unacked.then(|| {
        let mut w = s.ws();
        w.subscribe_manual("keep", 0);
        w
    });
    let mut p = s.ws();
    // A first round brings the allocator and the connections' buffers to their
    // working size, so the measured growth is what the kept messages hold.
    publish_mix(&mut p, 0, MESSAGES / 10);
    let warm = MESSAGES / 10 / KEEP_EVERY;
    wait_held(&s, warm, unacked);
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_bytes(&s);

    publish_mix(&mut p, MESSAGES / 10, MESSAGES);
    let kept = MESSAGES / KEEP_EVERY;
    wait_held(&s, warm + kept, unacked);
    if let Some(w) = sub.as_mut() {
        // Read what was delivered, so nothing waits in the server's write buffer.
        for _ in 0..warm + kept {
            w.expect_message();
        }
    }
    // Messages are copied once they have waited, and freed buffers go back to the
    // system a little after: wait for the growth to come under the bound, or fail.
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let grown = rss_bytes(&s).saturating_sub(before);
        if grown <= kept * ALLOWED_PER_KEPT {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "RSS still {} KiB over its level before, for {kept} kept messages ({} KiB \
             each; at most {} allowed) after {SETTLE:?}",
            grown / 1024,
            grown / 1024 / kept,
            ALLOWED_PER_KEPT / 1024
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (s, sub)
}

/// Drains queue `keep` and checks that nothing a client sees changed: every kept
/// message comes out whole, in publish order. Returns the `MESSAGE` frames.
fn drain_kept(s: &Server) -> Vec<serde_json::Value> {
    let got = s.drain("keep", RECV_TIMEOUT * 6);
    let ids: Vec<u64> = got
        .iter()
        .map(|m| m["body"]["i"].as_u64().expect("body.i"))
        .collect();
    let want: Vec<u64> = (0..MESSAGES / 10 + MESSAGES)
        .filter(|i| i % KEEP_EVERY == 0)
        .collect();
    assert_eq!(ids, want);
    for m in &got {
        assert_eq!(m["body"]["p"].as_str().map(str::len), Some(100), "{m}");
        assert_eq!(m["routing_key"], "keep", "{m}");
        assert_eq!(m["exchange"], "x", "{m}");
    }
    got
}

#[test]
fn a_queue_that_keeps_one_message_in_a_hundred_does_not_keep_their_read_buffers() {
    let (s, _) = publish_and_measure(false);
    drain_kept(&s);
}

#[test]
fn unacked_deliveries_held_by_a_consumer_do_not_keep_their_read_buffers() {
    let (s, sub) = publish_and_measure(true);
    // The consumer goes away without acking: every held message comes back, marked
    // redelivered.
    drop(sub);
    wait_held(&s, 0, true);
    let got = drain_kept(&s);
    assert!(got.iter().all(|m| m["redelivered"] == true));
}
