//! Publisher flow control (`src/shard/flow.rs`): a publisher that outruns the consumers
//! of a queue is paced to them (the server stops reading its socket for a while), loses
//! nothing, and is never parked behind a consumer that stopped.
//!
//! Each test starts its own server (see `tests/common/mod.rs`) and speaks to it with
//! real WebSocket and HTTP clients.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// Past `routing::FLOW_HIGH` (8,192 ready messages), with room to spare.
const OVER_MARK: u64 = 12_000;

fn flow_pauses(s: &Server) -> u64 {
    let text = s.get("/metrics").body;
    let per_shard: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("pubsub_publisher_flow_pauses_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(
        !per_shard.is_empty(),
        "no pubsub_publisher_flow_pauses_total in:\n{text}"
    );
    per_shard.iter().sum()
}

/// A consumer that holds its one unacked message and never acks makes the queue deep
/// while it "has consumers": the publisher is paused, sees no progress, and goes on.
/// Every publish is taken and the final confirm comes back.
#[test]
fn stalled_consumer_does_not_park_the_publisher() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut stuck = s.ws();
    stuck.subscribe_manual("q", 1);
    let mut publisher = s.ws();
    let started = Instant::now();
    for n in 0..OVER_MARK {
        publisher.publish_raw("ex", "k", &n.to_string(), "");
    }
    publisher.publish_raw("ex", "k", "\"last\"", r#","confirm":true,"ref":"end""#);
    let confirm = match publisher.recv_json_timeout(Duration::from_secs(30)) {
        Some(v) => v,
        None => panic!("no CONFIRM within 30 s: the publisher stayed paused"),
    };
    assert_eq!(confirm["type"], "CONFIRM", "{confirm}");
    assert_eq!(confirm["ref"], "end");
    assert_eq!(confirm["routed"], 1);
    // All of them are in the queue: one unacked with the stuck consumer, the rest ready.
    s.wait_queue_counts("q", OVER_MARK, 1);
    assert!(
        flow_pauses(&s) >= 1,
        "the queue went past its mark with a consumer, so the publisher was paused"
    );
    let first = stuck.expect_message();
    assert_eq!(first["body"], 0);
    eprintln!("published {} in {:?}", OVER_MARK + 1, started.elapsed());
}

/// A consumer that falls behind its publisher by more than the mark: the publisher is
/// paused, and the consumer still gets every message, in order, once it reads.
#[test]
fn consumer_far_behind_pauses_publisher_without_loss() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut consumer = s.ws();
    consumer.subscribe("q");
    let total = OVER_MARK * 3;
    let addr_publisher = {
        let mut publisher = s.ws();
        std::thread::spawn(move || {
            for n in 0..total {
                publisher.publish_raw("ex", "k", &n.to_string(), "");
            }
            publisher.publish_raw("ex", "k", "-1", r#","confirm":true,"ref":"done""#);
            let v = publisher
                .recv_json_timeout(Duration::from_secs(60))
                .expect("CONFIRM of the last publish");
            assert_eq!(v["type"], "CONFIRM", "{v}");
            publisher
        })
    };
    // Fall behind: read nothing until the queue is past its mark.
    wait_until(
        "the queue passes its flow mark",
        Duration::from_secs(30),
        || s.queue_info("q")["messages_ready"].as_u64().unwrap_or(0) > 8192,
    );
    for n in 0..total {
        let m = consumer.expect_message();
        assert_eq!(m["body"], n, "in publish order, none lost");
    }
    assert_eq!(consumer.expect_message()["body"], -1);
    let publisher = addr_publisher.join().expect("publisher thread");
    publisher.close();
    assert!(
        flow_pauses(&s) >= 1,
        "a publisher {total} messages ahead of its consumer was never paused"
    );
    s.wait_queue_counts("q", 0, 0);
}

/// Nobody consumes the queue: it is a buffer, and publishers are not paused however
/// deep it gets.
#[test]
fn unconsumed_queue_never_pauses_publishers() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut publisher = s.ws();
    for n in 0..OVER_MARK {
        publisher.publish_raw("ex", "k", &n.to_string(), "");
    }
    publisher.publish_raw("ex", "k", "0", r#","confirm":true,"ref":"end""#);
    assert_eq!(publisher.expect_type("CONFIRM")["ref"], "end");
    s.wait_queue_counts("q", OVER_MARK + 1, 0);
    assert_eq!(flow_pauses(&s), 0);
}

/// A connection that publishes into a queue it consumes itself keeps taking deliveries
/// while paused (it stops reading, not writing), so it cannot deadlock on itself.
#[test]
fn publisher_that_consumes_its_own_queue_is_not_deadlocked() {
    let s = Server::start();
    s.topology("ex", "direct", "q", "k");
    let mut both = s.ws();
    both.subscribe("q");
    let total = OVER_MARK * 2;
    // Write everything before reading anything: the server must keep writing our
    // deliveries while it holds our publishes back.
    let mut got = 0u64;
    let mut next = 0u64;
    for n in 0..total {
        both.publish_raw("ex", "k", &n.to_string(), "");
        // Read what is already there now and then, without blocking for long.
        if n % 1000 == 999 {
            while let Some(v) = both.recv_json_timeout(Duration::from_millis(1)) {
                assert_eq!(v["type"], "MESSAGE", "{v}");
                assert_eq!(v["body"], next);
                next += 1;
                got += 1;
            }
        }
    }
    while got < total {
        let v = both.expect_message();
        assert_eq!(v["body"], next);
        next += 1;
        got += 1;
    }
    s.wait_queue_counts("q", 0, 0);
}
