//! Restart tests of the durable store, against the real binary and real databases.
//!
//! Each scenario runs twice: on SQLite (the default, under the test's private
//! `--data-dir`) and on PostgreSQL at `127.0.0.1:5432` (database `test`, a schema of the
//! test's own, dropped afterwards; `SKIP: no PostgreSQL on 127.0.0.1:5432` only when
//! nothing listens there). The server is stopped gracefully with SIGTERM (or killed with
//! `kill -9` where the scenario says so) and started again on the same data directory,
//! port and database, and what comes back is checked over the wire contract
//! (`shared/protocol.md`): durable topology and the backlog in order, delivered but
//! unacked messages with `redelivered: true` and their `unique_id`, nothing acked, nothing
//! non-durable or non-persistent, no deleted queue.

mod common;

use std::collections::HashSet;

use common::{Backend, PgSchema, Server, Ws};
use serde_json::{json, Value};

/// Messages published in the restart scenario.
const N: usize = 60;
/// Of those, how many the consumer acks before the second restart.
const ACKED: usize = 25;

fn pg(tag: &str) -> Option<Backend> {
    PgSchema::new(tag).map(Backend::Postgres)
}

/// SIGTERM, check a clean exit, start again on the same data dir and database.
fn graceful_restart(s: &mut Server) {
    let status = s.terminate();
    assert!(
        status.success(),
        "pubsub did not exit cleanly after SIGTERM ({status}); its output:\n{}",
        s.log_tail()
    );
    s.restart();
}

/// `POST /publish` with `confirm: true`; asserts 200 and `routed`, returns the id.
fn publish_confirmed(
    s: &Server,
    exchange: &str,
    key: &str,
    payload: &Value,
    extra: &str,
    routed: u64,
) -> String {
    let body = common::publish_body(
        exchange,
        key,
        &payload.to_string(),
        &format!(",\"confirm\":true{extra}"),
    );
    let r = s.post_raw("/publish", &body);
    assert_eq!(r.status, 200, "publish {body}: {r:?}");
    let v = r.json();
    assert_eq!(v["routed"], routed, "publish {body}: {v}");
    v["id"].as_str().unwrap().to_string()
}

fn get_status(s: &Server, path: &str) -> u16 {
    s.get(path).status
}

fn bindings(s: &Server) -> Vec<Value> {
    let r = s.get("/bindings");
    assert_eq!(r.status, 200, "{r:?}");
    r.json().as_array().unwrap().clone()
}

fn has_binding(s: &Server, exchange: &str, queue: &str, key: &str) -> bool {
    bindings(s)
        .iter()
        .any(|b| b["exchange_name"] == exchange && b["queue_name"] == queue && b["key"] == key)
}

/// Receives `n` MESSAGE frames (skipping nothing else: any other frame fails).
fn recv_messages(ws: &mut Ws, n: usize) -> Vec<Value> {
    (0..n).map(|_| ws.expect_message()).collect()
}

fn restart_scenario(b: &Backend) {
    let mut s = b.start(&[]);
    let tag = b.name();
    let x = format!("dx-{tag}");
    let q = format!("dq-{tag}");
    let tq = format!("tq-{tag}");
    let tx = format!("tx-{tag}");

    // Durable exchange and queue, their binding; a non-durable queue on the same
    // exchange, a non-durable exchange bound to the durable queue.
    let r = s.post(
        "/exchanges",
        &json!({"name": x, "type": "direct", "durable": true}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    s.queue_with(&q, json!({"durable": true, "max_length": 10_000}));
    s.bind(&x, &q, "k");
    s.queue_with(&tq, json!({"durable": false}));
    s.bind(&x, &tq, "k");
    let r = s.post(
        "/exchanges",
        &json!({"name": tx, "type": "fanout", "durable": false}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    s.bind(&tx, &q, "");

    let mut ids = Vec::new();
    for i in 0..N {
        ids.push(publish_confirmed(
            &s,
            &x,
            "k",
            &json!({"n": i, "pad": "x".repeat(i)}),
            "",
            2,
        ));
    }
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        N,
        "publish ids not unique"
    );
    s.wait_queue_counts(&q, N as u64, 0);

    // --- first restart: topology and backlog ------------------------------------
    graceful_restart(&mut s);

    let r = s.get(&format!("/exchanges/{x}"));
    assert_eq!(r.status, 200, "durable exchange gone after restart: {r:?}");
    let v = r.json();
    assert_eq!(v["type"], "direct", "{v}");
    assert_eq!(v["durable"], true, "{v}");
    let v = s.queue_info(&q);
    assert_eq!(v["durable"], true, "{v}");
    assert_eq!(v["messages_ready"], N as u64, "backlog not restored: {v}");
    assert_eq!(v["messages_unacked"], 0, "{v}");
    assert_eq!(
        get_status(&s, &format!("/queues/{tq}")),
        404,
        "non-durable queue survived"
    );
    assert_eq!(
        get_status(&s, &format!("/exchanges/{tx}")),
        404,
        "non-durable exchange survived"
    );
    assert!(
        has_binding(&s, &x, &q, "k"),
        "durable binding gone: {:?}",
        bindings(&s)
    );
    assert!(
        !has_binding(&s, &x, &tq, "k"),
        "binding to a non-durable queue survived"
    );
    assert!(
        bindings(&s)
            .iter()
            .all(|b| b["queue_name"] != tq && b["exchange_name"] != tx),
        "bindings of non-durable objects survived: {:?}",
        bindings(&s)
    );
    if let Backend::Postgres(schema) = b {
        // The server really wrote to this schema (not to some default store).
        let mut c = schema.client();
        let row = c
            .query_one("SELECT count(*) FROM exchanges WHERE name = $1", &[&x])
            .unwrap();
        assert_eq!(
            row.get::<_, i64>(0),
            1,
            "exchange {x} not in schema {}",
            schema.schema
        );
        let row = c
            .query_one("SELECT count(*) FROM messages WHERE queue = $1", &[&q])
            .unwrap();
        assert_eq!(
            row.get::<_, i64>(0),
            N as i64,
            "messages of {q} not in schema {}",
            schema.schema
        );
    }
    // The restored queue settings are the declared ones: redeclaring them is a no-op.
    let r = s.post(
        "/queues",
        &json!({"name": q, "durable": true, "max_length": 10_000}),
    );
    assert_eq!(r.status, 200, "identical redeclare after restart: {r:?}");
    // The restored binding routes: one more message goes to the durable queue only.
    let extra_id = publish_confirmed(&s, &x, "k", &json!({"n": N}), "", 1);
    assert!(
        !ids.contains(&extra_id),
        "a new id repeats a restored one: {extra_id}"
    );
    ids.push(extra_id);
    let total = N + 1;

    let mut ws = s.ws();
    ws.subscribe_manual(&q, total as u64);
    let got = recv_messages(&mut ws, total);
    let mut published_at = Vec::new();
    for (i, m) in got.iter().enumerate() {
        assert_eq!(
            m["body"]["n"], i as u64,
            "order after restart broken at {i}: {m}"
        );
        assert_eq!(m["unique_id"], ids[i].as_str(), "unique_id changed: {m}");
        assert_eq!(m["redelivered"], false, "never delivered before: {m}");
        assert_eq!(m["exchange"], x.as_str(), "{m}");
        assert_eq!(m["routing_key"], "k", "{m}");
        assert!(m["published_at"].is_u64(), "{m}");
        published_at.push(m["published_at"].clone());
        if i < N {
            assert_eq!(
                m["body"]["pad"].as_str().unwrap().len(),
                i,
                "body changed: {m}"
            );
        }
    }
    ws.expect_silence(common::QUIET);
    // Ack the first ACKED: some one by one, the rest with `multiple`.
    let tag_of = |m: &Value| m["delivery_tag"].as_u64().unwrap();
    for m in &got[..10] {
        ws.ack(tag_of(m), false);
    }
    ws.ack(tag_of(&got[ACKED - 1]), true);
    s.wait_queue_counts(&q, 0, (total - ACKED) as u64);

    // --- second restart: acked gone, unacked back as redelivered ---------------
    // The consumer's connection is still open: its unacked messages were delivered and
    // not acked when the server stopped.
    graceful_restart(&mut s);
    drop(ws);
    s.wait_queue_counts(&q, (total - ACKED) as u64, 0);
    let mut ws = s.ws();
    ws.subscribe_manual(&q, total as u64);
    let again = recv_messages(&mut ws, total - ACKED);
    ws.expect_silence(common::QUIET);
    for (j, m) in again.iter().enumerate() {
        let i = ACKED + j;
        assert_eq!(
            m["body"]["n"], i as u64,
            "acked message back, or order broken: {m}"
        );
        assert_eq!(m["unique_id"], ids[i].as_str(), "unique_id changed: {m}");
        assert_eq!(
            m["redelivered"], true,
            "delivered-unacked must come back redelivered: {m}"
        );
        assert_eq!(
            m["published_at"], published_at[i],
            "published_at changed: {m}"
        );
    }
    ws.ack(tag_of(again.last().unwrap()), true);
    s.wait_queue_counts(&q, 0, 0);

    // --- third restart, this time kill -9: everything was acked, nothing returns --
    // (acks have no confirm; wait for a checkpoint interval's worth of commits first)
    std::thread::sleep(std::time::Duration::from_millis(200));
    s.kill9();
    s.restart();
    let v = s.queue_info(&q);
    assert_eq!(
        v["messages_ready"], 0,
        "acked messages came back after kill -9: {v}"
    );
    assert_eq!(v["messages_unacked"], 0, "{v}");
    let mut ws = s.ws();
    ws.subscribe_manual(&q, 10);
    ws.expect_silence(common::QUIET);
}

#[test]
fn sqlite_restart_restores_topology_backlog_and_unacked() {
    restart_scenario(&Backend::Sqlite);
}

#[test]
fn postgres_restart_restores_topology_backlog_and_unacked() {
    let Some(b) = pg("rst") else { return };
    restart_scenario(&b);
}

fn not_restored_scenario(b: &Backend) {
    let mut s = b.start(&[]);
    let x = "nx";
    let r = s.post(
        "/exchanges",
        &json!({"name": x, "type": "direct", "durable": true}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    s.queue_with("keep", json!({"durable": true}));
    s.queue_with("gone", json!({"durable": true}));
    s.bind(x, "keep", "k");
    s.bind(x, "gone", "g");

    // Interleave persistent and non-persistent messages to the kept queue.
    let mut persistent_ids = Vec::new();
    for i in 0..20u64 {
        let persistent = i % 2 == 0;
        let id = publish_confirmed(
            &s,
            x,
            "k",
            &json!({"n": i}),
            &format!(",\"persistent\":{persistent}"),
            1,
        );
        if persistent {
            persistent_ids.push((i, id));
        }
    }
    // The deleted queue had committed messages before it went.
    for i in 0..5u64 {
        publish_confirmed(&s, x, "g", &json!({"g": i}), "", 1);
    }
    let r = s.delete("/queues/gone");
    assert_eq!(r.status, 204, "{r:?}");
    s.wait_queue_counts("keep", 20, 0);

    graceful_restart(&mut s);

    assert_eq!(
        get_status(&s, "/queues/gone"),
        404,
        "deleted durable queue came back"
    );
    assert!(
        bindings(&s).iter().all(|b| b["queue_name"] != "gone"),
        "binding of the deleted queue came back: {:?}",
        bindings(&s)
    );
    let v = s.queue_info("keep");
    assert_eq!(
        v["messages_ready"],
        persistent_ids.len() as u64,
        "only the persistent messages may come back: {v}"
    );
    let mut ws = s.ws();
    ws.subscribe_manual("keep", 100);
    let got = recv_messages(&mut ws, persistent_ids.len());
    ws.expect_silence(common::QUIET);
    for (m, (n, id)) in got.iter().zip(&persistent_ids) {
        assert_eq!(
            m["body"]["n"], *n,
            "a non-persistent message came back, or order broke: {m}"
        );
        assert_eq!(m["unique_id"], id.as_str(), "{m}");
        assert_eq!(m["redelivered"], false, "{m}");
    }
    // A re-declared queue of the deleted name starts empty (its old messages were
    // deleted with it).
    s.queue_with("gone", json!({"durable": true}));
    assert_eq!(s.queue_info("gone")["messages_ready"], 0);
    drop(ws);

    // A durable queue deleted just before a kill -9 stays deleted too: the 204 of a
    // durable delete is answered after its commit.
    s.queue_with("brief", json!({"durable": true}));
    s.bind(x, "brief", "b");
    publish_confirmed(&s, x, "b", &json!({"b": 1}), "", 1);
    let r = s.delete("/queues/brief");
    assert_eq!(r.status, 204, "{r:?}");
    let r = s.delete("/queues/gone");
    assert_eq!(r.status, 204, "{r:?}");
    s.kill9();
    s.restart();
    assert_eq!(
        get_status(&s, "/queues/brief"),
        404,
        "queue deleted before kill -9 came back"
    );
    assert_eq!(
        get_status(&s, "/queues/gone"),
        404,
        "queue deleted before kill -9 came back"
    );
    assert!(
        !has_binding(&s, x, "brief", "b"),
        "binding of the deleted queue came back: {:?}",
        bindings(&s)
    );
    // And the rest is still there.
    assert_eq!(s.queue_info("keep")["durable"], true);
}

#[test]
fn sqlite_non_persistent_and_deleted_are_not_restored() {
    not_restored_scenario(&Backend::Sqlite);
}

#[test]
fn postgres_non_persistent_and_deleted_are_not_restored() {
    let Some(b) = pg("nrs") else { return };
    not_restored_scenario(&b);
}
