//! Integration tests of the durable store against real databases.
//!
//! SQLite runs in a fresh directory under `std::env::temp_dir()`. PostgreSQL runs against
//! `127.0.0.1:5432`, database `test`, trust auth (role `postgres`, else `root`; override with
//! `PUBSUB_TEST_PG_URL`), each test in a schema of its own that is dropped afterwards. Only
//! when nothing listens on 5432 do the PostgreSQL tests print `SKIP: ...` and return (and
//! never on CI, which sets `PUBSUB_TEST_REQUIRE_PG`: see `common::pg_admin_url`).
//! The same scenarios run on both backends: restart round trip, cascading deletes, atomic
//! batches, idempotent replay, schema version refusal, and a printed throughput figure.

mod common;

use common::PgSchema;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pubsub::persist::{
    commit_isolating, open, Backend, Checkpointer, PersistError, QueueArgs, Record, Recovered,
    RecoveredMessage, StoredMessage, Ticket, SCHEMA_VERSION,
};

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{tag}_{}_{nanos}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("pubsub-persist-{}", unique(tag)));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn backend(&self) -> Backend {
        Backend::from_config(&self.0.join("data"), None).unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------- PostgreSQL plumbing

/// The store a test opens in its own schema (`common::PgSchema`: created by the
/// server's migrations, dropped when the test ends).
trait SchemaBackend {
    fn backend(&self) -> Backend;
}

impl SchemaBackend for PgSchema {
    fn backend(&self) -> Backend {
        Backend::from_config(Path::new("/nonexistent"), Some(&self.url())).unwrap()
    }
}

// ---------------------------------------------------------------- fixtures

fn msg(id: &str, body: &[u8], headers: Option<&[u8]>) -> StoredMessage {
    StoredMessage {
        id: id.into(),
        exchange: "orders.x".into(),
        routing_key: "order.created".into(),
        body: Bytes::copy_from_slice(body),
        headers: headers.map(Bytes::copy_from_slice),
        published_at_ms: 1_764_000_000_123,
        expires_at_ms: Some(1_764_000_060_123),
    }
}

const BODY1: &[u8] = br#"{"text":"h\u00e9llo \"w\"","n":[1,2.5e3,-0.0]}"#;
const BODY2: &[u8] = "{\"raw\":\"é€😀\"}".as_bytes();
/// Not JSON at all: proves the column keeps arbitrary bytes (NUL, 0xff, CR).
const BODY3: &[u8] = b"\x00\xff\r\n{\"z\":null}\x00";
const HEADERS3: &[u8] = br#"{"trace":"abc","x-empty":""}"#;

fn queue_args() -> QueueArgs {
    QueueArgs {
        max_length: Some(1000),
        message_ttl_ms: Some(60_000),
        overflow: Some("drop_head".into()),
        dead_letter_exchange: Some("dlx".into()),
    }
}

fn topology() -> Vec<Record> {
    vec![
        Record::ExchangeDeclared {
            name: "orders.x".into(),
            kind: "topic".into(),
        },
        Record::QueueDeclared {
            name: "orders".into(),
            args: queue_args(),
        },
        Record::QueueDeclared {
            name: "plain".into(),
            args: QueueArgs::default(),
        },
        Record::Bound {
            exchange: "orders.x".into(),
            queue: "orders".into(),
            key: "order.*".into(),
        },
    ]
}

// ---------------------------------------------------------------- scenarios (both backends)

fn restart_round_trip(backend: &Backend) {
    let q: Arc<str> = Arc::from("orders");
    let mut batch = topology();
    batch.extend([
        Record::enqueued(q.clone(), 1, msg("m1", BODY1, None)),
        Record::enqueued(q.clone(), 2, msg("m2", BODY2, None)),
        Record::enqueued(q.clone(), 3, msg("m3", BODY3, Some(HEADERS3))),
        Record::Removed {
            queue: q.clone(),
            seq: 2,
        },
        Record::Delivered {
            queue: q.clone(),
            seq: 3,
        },
        // As the checkpointer emits it when a delivery folded into the insert.
        Record::Enqueued {
            queue: q.clone(),
            seq: 4,
            msg: msg("m4", BODY2, Some(HEADERS3)),
            delivered: true,
        },
    ]);
    {
        let mut store = open(backend).unwrap();
        assert_eq!(store.load().unwrap(), Recovered::default(), "fresh store");
        let stats = store.commit(&batch).unwrap();
        assert_eq!(stats.records, batch.len());
        // 1 exchange + 2 queues + 1 binding + 4 inserts + 1 delete + 1 update.
        assert_eq!(stats.written, 10, "{stats:?}");
        store.ping().unwrap();
    }
    let mut store = open(backend).unwrap();
    let rec = store.load().unwrap();
    let expected = Recovered {
        exchanges: vec![("orders.x".into(), "topic".into())],
        queues: vec![
            ("orders".into(), queue_args()),
            ("plain".into(), QueueArgs::default()),
        ],
        bindings: vec![("orders.x".into(), "orders".into(), "order.*".into())],
        messages: vec![(
            "orders".into(),
            vec![
                RecoveredMessage {
                    seq: 1,
                    msg: msg("m1", BODY1, None),
                    delivered: false,
                },
                RecoveredMessage {
                    seq: 3,
                    msg: msg("m3", BODY3, Some(HEADERS3)),
                    delivered: true,
                },
                RecoveredMessage {
                    seq: 4,
                    msg: msg("m4", BODY2, Some(HEADERS3)),
                    delivered: true,
                },
            ],
        )],
    };
    assert_eq!(rec, expected);
    assert_eq!(&rec.messages[0].1[0].msg.body[..], BODY1);
    assert_eq!(&rec.messages[0].1[1].msg.body[..], BODY3);
    assert_eq!(rec.message_count(), 3);

    // A later checkpoint acks the first message: it must not come back.
    store
        .commit(&[Record::Removed {
            queue: q.clone(),
            seq: 1,
        }])
        .unwrap();
    drop(store);
    let rec = open(backend).unwrap().load().unwrap();
    assert_eq!(rec.messages.len(), 1);
    assert_eq!(
        rec.messages[0].1.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![3, 4]
    );
}

/// The checkpointer's coalesced batch, written and read back.
fn checkpointer_into_store(backend: &Backend) {
    let mut store = open(backend).unwrap();
    let q: Arc<str> = "orders".into();
    let mut cp = Checkpointer::new();
    for rec in topology() {
        cp.push(rec, Some(Ticket(0)));
    }
    for seq in 1..=4 {
        cp.push(
            Record::enqueued(q.clone(), seq, msg(&format!("m{seq}"), BODY1, None)),
            Some(Ticket(seq)),
        );
    }
    cp.push(
        Record::Removed {
            queue: q.clone(),
            seq: 2,
        },
        None,
    );
    cp.push(
        Record::Delivered {
            queue: q.clone(),
            seq: 3,
        },
        None,
    );
    let batch = cp.take_batch();
    assert_eq!(batch.tickets.len(), 8);
    let stats = store.commit(&batch.records).unwrap();
    assert_eq!(stats.records, 4 + 3, "coalesced: {batch:?}");
    drop(store);
    let rec = open(backend).unwrap().load().unwrap();
    let got: Vec<(u64, bool)> = rec.messages[0]
        .1
        .iter()
        .map(|m| (m.seq, m.delivered))
        .collect();
    assert_eq!(got, [(1, false), (3, true), (4, false)]);
}

/// Keys may hold any character, NUL included (PostgreSQL TEXT could not).
fn odd_keys_round_trip(backend: &Backend) {
    let key = "a\u{0}b.\u{e9}.#";
    let routing_key = "\u{0}x\u{1}";
    let q: Arc<str> = "orders".into();
    let mut m = msg("m1", BODY1, None);
    m.routing_key = routing_key.into();
    let mut batch = topology();
    batch.push(Record::Bound {
        exchange: "orders.x".into(),
        queue: "orders".into(),
        key: key.into(),
    });
    batch.push(Record::enqueued(q.clone(), 1, m.clone()));
    open(backend).unwrap().commit(&batch).unwrap();
    let rec = open(backend).unwrap().load().unwrap();
    assert!(
        rec.bindings.iter().any(|b| b.2 == key),
        "{:?}",
        rec.bindings
    );
    assert_eq!(rec.messages[0].1[0].msg, m);
    // And unbinding by that key finds it.
    let mut store = open(backend).unwrap();
    store
        .commit(&[Record::Unbound {
            exchange: "orders.x".into(),
            queue: "orders".into(),
            key: key.into(),
        }])
        .unwrap();
    assert_eq!(store.load().unwrap().bindings.len(), 1);
}

/// A record the database refuses is isolated and skipped; the rest is written in order.
fn poison_record_is_isolated(backend: &Backend) {
    let mut store = open(backend).unwrap();
    let q: Arc<str> = "orders".into();
    let mut batch = topology();
    let first = batch.len();
    for seq in [1, u64::MAX, 2, 3] {
        batch.push(Record::enqueued(
            q.clone(),
            seq,
            msg(&format!("m{seq}"), b"{}", None),
        ));
    }
    batch.push(Record::Removed {
        queue: q.clone(),
        seq: 3,
    });
    let err = store.commit(&batch).unwrap_err();
    assert!(!err.is_connection_lost(), "{err:?}");
    assert_eq!(
        store.load().unwrap(),
        Recovered::default(),
        "the failed batch left nothing"
    );
    let skipped = commit_isolating(store.as_mut(), &batch).unwrap();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0].0, first + 1);
    assert!(matches!(skipped[0].1, PersistError::OutOfRange(_)));
    let rec = store.load().unwrap();
    assert_eq!(rec.queues.len(), 2);
    let seqs: Vec<u64> = rec.messages[0].1.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [1, 2]);
}

fn order_across_batches_and_queues(backend: &Backend) {
    let mut store = open(backend).unwrap();
    let mut batch = vec![
        Record::QueueDeclared {
            name: "b".into(),
            args: QueueArgs::default(),
        },
        Record::QueueDeclared {
            name: "a".into(),
            args: QueueArgs::default(),
        },
    ];
    let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
    // Interleaved, with seqs that sort differently as text than as numbers.
    for seq in [9u64, 10, 100, 1 << 40] {
        batch.push(Record::enqueued(
            b.clone(),
            seq,
            msg(&format!("b{seq}"), b"{}", None),
        ));
        batch.push(Record::enqueued(
            a.clone(),
            seq,
            msg(&format!("a{seq}"), b"[]", None),
        ));
    }
    // A message for a queue that was never declared durable is not recovered.
    batch.push(Record::enqueued("ghost".into(), 1, msg("g", b"{}", None)));
    store.commit(&batch[..5]).unwrap();
    store.commit(&batch[5..]).unwrap();
    drop(store);
    let rec = open(backend).unwrap().load().unwrap();
    let names: Vec<&str> = rec.messages.iter().map(|(q, _)| q.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    for (q, list) in &rec.messages {
        let seqs: Vec<u64> = list.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [9, 10, 100, 1 << 40], "queue {q}");
        assert!(list.iter().all(|m| m.msg.id.starts_with(q.as_str())));
    }
}

fn deletes_cascade(backend: &Backend) {
    let mut store = open(backend).unwrap();
    let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
    let bind = |x: &str, q: &str, k: &str| Record::Bound {
        exchange: x.into(),
        queue: q.into(),
        key: k.into(),
    };
    let mut batch = Vec::new();
    for x in ["x", "y"] {
        batch.push(Record::ExchangeDeclared {
            name: x.into(),
            kind: "direct".into(),
        });
    }
    for q in ["a", "b"] {
        batch.push(Record::QueueDeclared {
            name: q.into(),
            args: QueueArgs::default(),
        });
    }
    batch.extend([
        bind("x", "a", "k"),
        bind("x", "b", "k"),
        bind("y", "a", "k"),
        bind("y", "b", "k1"),
        bind("y", "b", "k2"),
        bind("y", "b", "k2"), // duplicate binding: a no-op
        Record::enqueued(a.clone(), 1, msg("a1", b"1", None)),
        Record::enqueued(b.clone(), 1, msg("b1", b"2", None)),
    ]);
    store.commit(&batch).unwrap();
    assert_eq!(store.load().unwrap().bindings.len(), 5);

    store
        .commit(&[
            Record::ExchangeDeleted { name: "x".into() },
            Record::QueueDeleted { name: "a".into() },
            Record::Unbound {
                exchange: "y".into(),
                queue: "b".into(),
                key: "k1".into(),
            },
        ])
        .unwrap();
    drop(store);
    let rec = open(backend).unwrap().load().unwrap();
    assert_eq!(rec.exchanges, vec![("y".to_string(), "direct".to_string())]);
    assert_eq!(rec.queues, vec![("b".to_string(), QueueArgs::default())]);
    assert_eq!(
        rec.bindings,
        vec![("y".to_string(), "b".to_string(), "k2".to_string())]
    );
    assert_eq!(rec.messages.len(), 1);
    assert_eq!(rec.messages[0].0, "b");

    // Re-declaring a deleted queue starts empty: its old messages are really gone.
    let mut store = open(backend).unwrap();
    store
        .commit(&[Record::QueueDeclared {
            name: "a".into(),
            args: queue_args(),
        }])
        .unwrap();
    let rec = store.load().unwrap();
    assert_eq!(rec.queues.len(), 2);
    assert!(rec.messages.iter().all(|(q, _)| q != "a"), "{rec:?}");
}

fn batch_is_atomic_and_replay_is_idempotent(backend: &Backend) {
    let mut store = open(backend).unwrap();
    let q: Arc<str> = "orders".into();
    let mut good = topology();
    good.push(Record::enqueued(q.clone(), 1, msg("m1", BODY1, None)));
    store.commit(&good).unwrap();
    let before = store.load().unwrap();

    // A batch that fails half way leaves nothing behind.
    let bad = vec![
        Record::ExchangeDeclared {
            name: "half".into(),
            kind: "fanout".into(),
        },
        Record::Removed {
            queue: q.clone(),
            seq: 1,
        },
        Record::enqueued(q.clone(), u64::MAX, msg("big", b"{}", None)),
    ];
    let err = store.commit(&bad).unwrap_err();
    assert!(matches!(err, PersistError::OutOfRange(_)), "{err:?}");
    assert!(!err.is_connection_lost());
    assert_eq!(store.load().unwrap(), before);

    // Replaying a batch that did commit (acknowledgement lost) changes nothing.
    store.commit(&good).unwrap();
    assert_eq!(store.load().unwrap(), before);
}

fn throughput(backend: &Backend, label: &str) {
    const TOTAL: u64 = 10_000;
    const BATCH: u64 = 500;
    let mut store = open(backend).unwrap();
    store
        .commit(&[Record::QueueDeclared {
            name: "bench".into(),
            args: QueueArgs::default(),
        }])
        .unwrap();
    let q: Arc<str> = "bench".into();
    let body = Bytes::from(format!("{{\"payload\":\"{}\"}}", "x".repeat(180)));
    let mut commit_times = Vec::new();
    let start = Instant::now();
    for chunk in 0..TOTAL / BATCH {
        let batch: Vec<Record> = (chunk * BATCH..(chunk + 1) * BATCH)
            .map(|seq| {
                Record::enqueued(
                    q.clone(),
                    seq,
                    StoredMessage {
                        id: format!("id-{seq}"),
                        exchange: "ex".into(),
                        routing_key: "rk".into(),
                        body: body.clone(),
                        headers: None,
                        published_at_ms: seq,
                        expires_at_ms: None,
                    },
                )
            })
            .collect();
        let stats = store.commit(&batch).unwrap();
        assert_eq!(stats.written, BATCH as usize);
        commit_times.push(stats.elapsed);
    }
    let elapsed = start.elapsed();
    commit_times.sort();
    println!(
        "THROUGHPUT {label}: {TOTAL} enqueues in batches of {BATCH}: {:.0} msgs/s \
         ({:.1} ms total, commit p50 {:.2} ms, max {:.2} ms)",
        TOTAL as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e3,
        commit_times[commit_times.len() / 2].as_secs_f64() * 1e3,
        commit_times[commit_times.len() - 1].as_secs_f64() * 1e3,
    );
    assert_eq!(store.load().unwrap().message_count(), TOTAL as usize);

    // The floor under every checkpoint: one tiny transaction (fsync on SQLite, a round trip
    // plus the server's WAL flush on PostgreSQL).
    const SMALL: u64 = 20;
    let mut small = Vec::new();
    for seq in TOTAL..TOTAL + SMALL {
        let rec = Record::enqueued(q.clone(), seq, msg("one", b"{}", None));
        small.push(store.commit(&[rec]).unwrap().elapsed);
    }
    small.sort();
    println!(
        "THROUGHPUT {label}: single-record commit p50 {:.2} ms, max {:.2} ms",
        small[small.len() / 2].as_secs_f64() * 1e3,
        small[small.len() - 1].as_secs_f64() * 1e3,
    );
}

// ---------------------------------------------------------------- SQLite

#[test]
fn sqlite_restart_round_trip() {
    let dir = TempDir::new("rt");
    let backend = dir.backend();
    assert_eq!(
        backend,
        Backend::Sqlite {
            path: dir.0.join("data").join("pubsub.db")
        }
    );
    restart_round_trip(&backend);
    assert!(dir.0.join("data").join("pubsub.db").is_file());
}

#[test]
fn sqlite_checkpointer_into_store() {
    let dir = TempDir::new("cp");
    checkpointer_into_store(&dir.backend());
}

#[test]
fn sqlite_odd_keys_round_trip() {
    let dir = TempDir::new("keys");
    odd_keys_round_trip(&dir.backend());
}

#[test]
fn sqlite_poison_record_is_isolated() {
    let dir = TempDir::new("poison");
    poison_record_is_isolated(&dir.backend());
}

#[test]
fn sqlite_order_across_batches_and_queues() {
    let dir = TempDir::new("order");
    order_across_batches_and_queues(&dir.backend());
}

#[test]
fn sqlite_deletes_cascade() {
    let dir = TempDir::new("cascade");
    deletes_cascade(&dir.backend());
}

#[test]
fn sqlite_batch_is_atomic_and_replay_is_idempotent() {
    let dir = TempDir::new("atomic");
    batch_is_atomic_and_replay_is_idempotent(&dir.backend());
}

#[test]
fn sqlite_uses_wal_and_full_sync() {
    let dir = TempDir::new("wal");
    let backend = dir.backend();
    drop(open(&backend).unwrap());
    let Backend::Sqlite { path } = &backend else {
        unreachable!()
    };
    let conn = rusqlite::Connection::open(path).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let version: i64 = conn
        .query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
}

#[test]
fn sqlite_second_store_on_same_dir_is_locked_out() {
    let dir = TempDir::new("lock");
    let backend = dir.backend();
    let first = open(&backend).unwrap();
    let err = open(&backend).err().expect("second open must fail");
    assert!(matches!(err, PersistError::Locked { .. }), "{err:?}");
    assert!(err.to_string().contains("another pubsub"), "{err}");
    drop(first);
    open(&backend).unwrap().ping().unwrap();
}

#[test]
fn sqlite_newer_schema_version_is_refused() {
    let dir = TempDir::new("version");
    let backend = dir.backend();
    drop(open(&backend).unwrap());
    let Backend::Sqlite { path } = &backend else {
        unreachable!()
    };
    rusqlite::Connection::open(path)
        .unwrap()
        .execute(
            "INSERT INTO schema_version (version, applied_at_ms) VALUES (?1, 0)",
            [SCHEMA_VERSION + 998],
        )
        .unwrap();
    let err = open(&backend).err().expect("must refuse a newer schema");
    match &err {
        PersistError::SchemaVersion { found, supported } => {
            assert_eq!(*found, SCHEMA_VERSION + 998);
            assert_eq!(*supported, SCHEMA_VERSION);
        }
        other => panic!("expected SchemaVersion, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains(&(SCHEMA_VERSION + 998).to_string()), "{text}");
    assert!(text.contains("newer"), "{text}");
}

#[test]
fn sqlite_unwritable_data_dir() {
    let dir = TempDir::new("unwritable");
    let file = dir.0.join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let data_dir = file.join("data");
    let err = Backend::from_config(&data_dir, None).unwrap_err();
    match &err {
        PersistError::Unwritable { path, .. } => assert_eq!(path, &data_dir),
        other => panic!("expected Unwritable, got {other:?}"),
    }
    assert!(err.to_string().contains("not writable"), "{err}");
    // open() checks too, for a backend built by hand.
    let err = open(&Backend::Sqlite {
        path: data_dir.join("pubsub.db"),
    })
    .err()
    .expect("must fail");
    assert!(
        matches!(err, PersistError::Unwritable { .. }),
        "expected Unwritable, got {err:?}"
    );
}

#[test]
fn sqlite_throughput() {
    let dir = TempDir::new("tput");
    throughput(&dir.backend(), "sqlite");
}

// ---------------------------------------------------------------- PostgreSQL

#[test]
fn pg_restart_round_trip() {
    let Some(s) = PgSchema::new("rt") else { return };
    restart_round_trip(&s.backend());
}

#[test]
fn pg_checkpointer_into_store() {
    let Some(s) = PgSchema::new("cp") else { return };
    checkpointer_into_store(&s.backend());
}

#[test]
fn pg_odd_keys_round_trip() {
    let Some(s) = PgSchema::new("keys") else {
        return;
    };
    odd_keys_round_trip(&s.backend());
}

#[test]
fn pg_poison_record_is_isolated() {
    let Some(s) = PgSchema::new("poison") else {
        return;
    };
    poison_record_is_isolated(&s.backend());
}

#[test]
fn pg_order_across_batches_and_queues() {
    let Some(s) = PgSchema::new("order") else {
        return;
    };
    order_across_batches_and_queues(&s.backend());
}

#[test]
fn pg_deletes_cascade() {
    let Some(s) = PgSchema::new("cascade") else {
        return;
    };
    deletes_cascade(&s.backend());
}

#[test]
fn pg_batch_is_atomic_and_replay_is_idempotent() {
    let Some(s) = PgSchema::new("atomic") else {
        return;
    };
    batch_is_atomic_and_replay_is_idempotent(&s.backend());
}

#[test]
fn pg_schemas_isolate() {
    let Some(one) = PgSchema::new("iso1") else {
        return;
    };
    let Some(two) = PgSchema::new("iso2") else {
        return;
    };
    open(&one.backend()).unwrap().commit(&topology()).unwrap();
    assert_eq!(
        open(&two.backend()).unwrap().load().unwrap(),
        Recovered::default()
    );
    assert_eq!(
        open(&one.backend()).unwrap().load().unwrap().queues.len(),
        2
    );
    // The tables really live in the test's schema.
    let n: i64 = one
        .client()
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1",
            &[&one.schema],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        n, 5,
        "schema_version, exchanges, queues, bindings, messages"
    );
}

#[test]
fn pg_newer_schema_version_is_refused() {
    let Some(s) = PgSchema::new("version") else {
        return;
    };
    drop(open(&s.backend()).unwrap());
    s.client()
        .execute(
            "INSERT INTO schema_version (version, applied_at_ms) VALUES ($1, 0)",
            &[&(SCHEMA_VERSION + 41)],
        )
        .unwrap();
    match open(&s.backend()).err() {
        Some(PersistError::SchemaVersion { found, supported }) => {
            assert_eq!(found, SCHEMA_VERSION + 41);
            assert_eq!(supported, SCHEMA_VERSION);
        }
        other => panic!("expected SchemaVersion, got {other:?}"),
    }
}

#[test]
fn pg_unreachable_is_a_connect_error() {
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let backend = Backend::from_config(
        Path::new("/x"),
        Some("postgres://u:secret@127.0.0.1:1/test"),
    )
    .unwrap();
    let err = open(&backend).err().expect("must fail");
    assert!(matches!(err, PersistError::Connect { .. }), "{err:?}");
    assert!(err.is_connection_lost());
    let text = err.to_string();
    assert!(!text.contains("secret"), "password leaked: {text}");
    assert!(text.contains("127.0.0.1:1"), "{text}");
}

#[test]
fn pg_reconnects_after_connection_loss() {
    let Some(s) = PgSchema::new("reconnect") else {
        return;
    };
    let app = format!("pubsub_{}", unique("app"));
    let url = format!("{}?schema={}&application_name={app}", s.admin_url, s.schema);
    let backend = Backend::from_config(Path::new("/x"), Some(&url)).unwrap();
    let mut store = open(&backend).unwrap();
    store.commit(&topology()).unwrap();

    let killed: i64 = s
        .client()
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = $1",
            &[&app],
        )
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);

    let q: Arc<str> = "orders".into();
    let batch = vec![Record::enqueued(q.clone(), 1, msg("m1", BODY1, None))];
    let mut lost = None;
    // The termination is asynchronous; the first statement after it fails.
    for _ in 0..50 {
        match store.commit(&batch) {
            Err(e) => {
                lost = Some(e);
                break;
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let err = lost.expect("commit on a terminated connection must fail");
    assert!(err.is_connection_lost(), "{err:?}");
    store.ping().unwrap();
    store.commit(&batch).unwrap();
    assert_eq!(store.load().unwrap().message_count(), 1);
}

#[test]
fn pg_throughput() {
    let Some(s) = PgSchema::new("tput") else {
        return;
    };
    throughput(&s.backend(), "postgres");
}

// ---------------------------------------------------------------- kill -9 (both backends)

/// Environment variable that turns `crash_child_helper` into the child of a crash test: it
/// holds the `--database` value ("" for SQLite) and `CRASH_DATA_DIR` the data dir.
const CRASH_DB_ENV: &str = "PUBSUB_PERSIST_CRASH_DB";
const CRASH_DIR_ENV: &str = "PUBSUB_PERSIST_CRASH_DIR";
const CRASH_BATCH: u64 = 50;

fn crash_seqs(batch_no: u64) -> std::ops::RangeInclusive<u64> {
    (batch_no - 1) * CRASH_BATCH + 1..=batch_no * CRASH_BATCH
}

/// Not a test on its own: the child process of the kill -9 tests (run with `--ignored`). It
/// commits batch after batch and prints `ok N` after each commit returned.
#[test]
#[ignore = "child process of the kill -9 tests"]
fn crash_child_helper() {
    use std::io::Write;
    let db = std::env::var(CRASH_DB_ENV).expect("run by the kill -9 tests only");
    let dir = PathBuf::from(std::env::var(CRASH_DIR_ENV).unwrap());
    let backend = Backend::from_config(&dir, Some(db.as_str()).filter(|d| !d.is_empty())).unwrap();
    let mut store = open(&backend).unwrap();
    store
        .commit(&[Record::QueueDeclared {
            name: "crash".into(),
            args: QueueArgs::default(),
        }])
        .unwrap();
    let q: Arc<str> = "crash".into();
    let mut out = std::io::stdout().lock();
    for batch_no in 1.. {
        let batch: Vec<Record> = crash_seqs(batch_no)
            .map(|seq| Record::enqueued(q.clone(), seq, msg(&format!("c{seq}"), BODY2, None)))
            .collect();
        store.commit(&batch).unwrap();
        writeln!(out, "ok {batch_no}").unwrap();
        out.flush().unwrap();
    }
}

/// Runs the child, SIGKILLs it after some commits, reopens and checks that every batch whose
/// commit returned is there, and that batches are all or nothing.
fn kill_9_loses_no_committed_batch(backend: &Backend, dir: &Path, db: &str) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "crash_child_helper",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CRASH_DB_ENV, db)
        .env(CRASH_DIR_ENV, dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut last_ok = 0u64;
    while last_ok < 30 {
        let line = lines.next().expect("child ended early").unwrap();
        if let Some(n) = line.strip_prefix("ok ") {
            last_ok = n.parse().unwrap();
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for line in lines {
        if let Some(n) = line.unwrap().strip_prefix("ok ") {
            last_ok = n.parse().unwrap();
        }
    }
    let rec = open(backend).unwrap().load().unwrap();
    let seqs: Vec<u64> = rec
        .messages
        .iter()
        .find(|(q, _)| q == "crash")
        .map(|(_, m)| m.iter().map(|m| m.seq).collect())
        .unwrap_or_default();
    let batches = seqs.len() as u64 / CRASH_BATCH;
    assert_eq!(
        seqs.len() as u64 % CRASH_BATCH,
        0,
        "a batch was half written"
    );
    assert!(
        batches == last_ok || batches == last_ok + 1,
        "{last_ok} commits returned, {batches} batches on disk"
    );
    assert!(
        seqs.iter().copied().eq(1..=batches * CRASH_BATCH),
        "gaps or disorder"
    );
    println!("kill -9 after {last_ok} confirmed commits: {batches} batches recovered");
}

#[test]
fn sqlite_kill_9_loses_no_committed_batch() {
    let dir = TempDir::new("kill9");
    let data = dir.0.join("data");
    kill_9_loses_no_committed_batch(&dir.backend(), &data, "");
}

#[test]
fn pg_kill_9_loses_no_committed_batch() {
    let Some(s) = PgSchema::new("kill9") else {
        return;
    };
    kill_9_loses_no_committed_batch(&s.backend(), Path::new("/nonexistent"), &s.url());
}
