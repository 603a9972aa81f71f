//! Micro-benchmarks of routing, the per-publish work on the shard that received it:
//! matching a topic key against 1,000 bindings, and the whole lookup a publish does
//! (pin the epoch, load the topology snapshot, find the exchange, route a direct key).
//! Run with `cargo bench --bench routing`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pubsub::command::{BindingDecl, ExchangeDecl, ExchangeKind, QueueSpec};
use pubsub::routing::{QueueHandle, Topology};
use pubsub::sync::snapshot::{pin, Snapshot};

/// A topology with exchange `x` of `kind` and one queue per binding key.
fn topology(kind: ExchangeKind, keys: &[String]) -> Topology {
    let mut t = Topology::default()
        .declare_exchange(&ExchangeDecl {
            name: "x".into(),
            kind,
            durable: false,
        })
        .expect("declare exchange");
    for (i, key) in keys.iter().enumerate() {
        let q = format!("q{i}");
        t = t
            .declare_queue(Arc::new(QueueHandle::new(
                &q,
                QueueSpec::default(),
                0,
                None,
            )))
            .expect("declare queue");
        t = t
            .bind(&BindingDecl {
                exchange: "x".into(),
                queue: q,
                key: key.clone(),
            })
            .expect("bind");
    }
    t
}

/// 1,000 topic patterns over `region.service.event` keys, with `*` and `#` mixed in.
fn topic_patterns() -> Vec<String> {
    let regions = ["eu", "us", "ap", "sa", "af"];
    (0..1000)
        .map(|i| {
            let r = regions[i % regions.len()];
            match i % 4 {
                0 => format!("{r}.svc{}.created", i % 50),
                1 => format!("{r}.*.event{}", i % 40),
                2 => format!("{r}.svc{}.#", i % 50),
                _ => format!("*.svc{}.deleted", i % 50),
            }
        })
        .collect()
}

fn topic_match(c: &mut Criterion) {
    let t = topology(ExchangeKind::Topic, &topic_patterns());
    let x = t.exchange("x").expect("exchange").clone();
    let mut g = c.benchmark_group("routing");
    g.throughput(Throughput::Elements(1));
    g.bench_function("topic_match_1000_bindings", |b| {
        b.iter(|| {
            let targets = x.route(black_box("eu.svc10.created"));
            assert!(!targets.is_empty());
            black_box(targets.len())
        })
    });
    g.bench_function("topic_match_1000_bindings_miss", |b| {
        b.iter(|| black_box(x.route(black_box("zz.nothing.here")).len()))
    });
    g.finish();
}

fn snapshot_lookup(c: &mut Criterion) {
    let keys: Vec<String> = (0..100).map(|i| format!("key{i}")).collect();
    let snap = Snapshot::new(topology(ExchangeKind::Direct, &keys));
    let mut g = c.benchmark_group("routing");
    g.throughput(Throughput::Elements(1));
    g.bench_function("snapshot_lookup_direct_route", |b| {
        b.iter(|| {
            let guard = pin();
            let topo = snap.load(&guard);
            let x = topo.exchange(black_box("x")).expect("exchange");
            let n = x.route(black_box("key42")).len();
            assert_eq!(n, 1);
            black_box(n)
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(30);
    targets = topic_match, snapshot_lookup
}
criterion_main!(benches);
