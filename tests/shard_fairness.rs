//! One connection that never stops sending must not starve the rest of its shard.
//!
//! A shard is one executor running every connection it accepted as a task; a task runs
//! until it waits for something. A connection whose socket always has more bytes never
//! waits, so unless it yields the shard's other connections, its accept loop and its
//! timers stop. Publishes to a consumed queue are paced by flow control, which pauses
//! the reader; publishes that nothing consumes (unroutable ones, or into queues without
//! consumers) are not. Here a client floods one shard with unroutable publishes while
//! new HTTP and WebSocket clients are served on that same shard.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::Server;

#[test]
fn a_flooding_publisher_does_not_starve_its_shard() {
    // Publishers stay where they were accepted, so the flood stays on one shard.
    let server = Server::with_args(&["--shards", "2", "--place-publishers", "false"]);
    server.exchange("e", "direct");
    server.topology("other", "direct", "q", "k");
    let flooder = server.ws_on_shard(0);
    let shard = flooder.shard;
    let stop = Arc::new(AtomicBool::new(false));
    let batches = Arc::new(AtomicU64::new(0));
    let flood = common::flood_unroutable(flooder, "e", stop.clone(), batches.clone());
    common::wait_until("the flood under way", Duration::from_secs(10), || {
        batches.load(Ordering::Relaxed) >= 20
    });

    // The flooded shard still accepts and answers HTTP (each read has the suite's
    // receive timeout; a starved shard never answers)...
    for _ in 0..5 {
        let mut c = server.raw_on_shard(shard);
        assert_eq!(c.request("GET", "/healthz", None).status, 200);
    }
    // ...upgrades a WebSocket, subscribes it and delivers to it.
    let mut sub = server.ws_on_shard(shard);
    sub.subscribe("q");
    server.publish("other", "k", &serde_json::json!("through the flood"));
    assert_eq!(sub.expect_message()["body"], "through the flood");
    assert!(
        batches.load(Ordering::Relaxed) >= 20,
        "the flood kept going meanwhile"
    );

    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
}
