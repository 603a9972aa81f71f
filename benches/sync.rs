//! Criterion benches for `pubsub::sync`: our SPSC ring against crossbeam's
//! `ArrayQueue` and `std::sync::mpsc::sync_channel`, our `MsgQueue` against
//! crossbeam's `SegQueue` and `std::sync::mpsc::channel`.
//!
//! * `push_pop/*`: one push then one pop on a single thread (uncontended cost).
//! * `cross_thread/*`: [`ITEMS`] items from one producer thread to one consumer
//!   thread (cross-thread throughput; a side that finds the queue full/empty spins
//!   [`SPIN_LIMIT`] times, then yields); the `_2p` rows
//!   move the same total from two producer threads to one consumer.
//!
//! Run: `cargo bench --bench sync`; results and analysis in
//! `docs/benchmarks.md`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use crossbeam_queue::{ArrayQueue, SegQueue};
use pubsub::sync::mpsc::MsgQueue;
use pubsub::sync::spsc;
use std::hint::black_box;
use std::sync::{mpsc as std_mpsc, Arc};
use std::thread;
use std::time::Duration;

/// Busy-wait iterations before a waiting side starts yielding its time slice.
const SPIN_LIMIT: u32 = 128;

/// Spin briefly, then yield: on an oversubscribed machine a pure spin burns the
/// time slice the other side needs to make progress.
#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    fn snooze(&mut self) {
        if self.0 < SPIN_LIMIT {
            self.0 += 1;
            std::hint::spin_loop();
        } else {
            thread::yield_now();
        }
    }
    fn reset(&mut self) {
        self.0 = 0;
    }
}

/// Items moved per cross-thread iteration.
const ITEMS: u64 = 100_000;
/// Capacity of the bounded queues.
const CAP: usize = 1024;

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
}

fn push_pop(c: &mut Criterion) {
    let mut g = c.benchmark_group("push_pop");
    g.throughput(Throughput::Elements(1));

    let (mut tx, mut rx) = spsc::channel::<u64>(CAP);
    g.bench_function("ring", |b| {
        b.iter(|| {
            let _ = tx.push(black_box(1));
            black_box(rx.pop())
        })
    });
    let aq = ArrayQueue::<u64>::new(CAP);
    g.bench_function("ArrayQueue", |b| {
        b.iter(|| {
            let _ = aq.push(black_box(1));
            black_box(aq.pop())
        })
    });
    let (stx, srx) = std_mpsc::sync_channel::<u64>(CAP);
    g.bench_function("std_sync_channel", |b| {
        b.iter(|| {
            let _ = stx.try_send(black_box(1));
            black_box(srx.try_recv().ok())
        })
    });
    let mq = MsgQueue::<u64>::new();
    g.bench_function("MsgQueue", |b| {
        b.iter(|| {
            mq.push(black_box(1));
            black_box(mq.pop())
        })
    });
    let sq = SegQueue::<u64>::new();
    g.bench_function("SegQueue", |b| {
        b.iter(|| {
            sq.push(black_box(1));
            black_box(sq.pop())
        })
    });
    let (utx, urx) = std_mpsc::channel::<u64>();
    g.bench_function("std_channel", |b| {
        b.iter(|| {
            let _ = utx.send(black_box(1));
            black_box(urx.try_recv().ok())
        })
    });
    g.finish();
}

/// Runs `produce(share)` on `producers` threads and `consume(total)` on this one.
fn cross<P, C>(producers: u64, produce: P, consume: C)
where
    P: Fn(u64) + Send + Sync + Clone + 'static,
    C: FnOnce(u64),
{
    let share = ITEMS / producers;
    let handles: Vec<_> = (0..producers)
        .map(|_| {
            let p = produce.clone();
            thread::spawn(move || p(share))
        })
        .collect();
    consume(share * producers);
    for h in handles {
        h.join().unwrap();
    }
}

fn cross_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("cross_thread");
    g.throughput(Throughput::Elements(ITEMS));

    g.bench_function("ring", |b| {
        b.iter(|| {
            let (mut tx, mut rx) = spsc::channel::<u64>(CAP);
            let h = thread::spawn(move || {
                for i in 0..ITEMS {
                    let mut v = i;
                    let mut w = Backoff::default();
                    while let Err(back) = tx.push(v) {
                        v = back;
                        w.snooze();
                    }
                }
            });
            let mut n = 0;
            let mut w = Backoff::default();
            while n < ITEMS {
                match rx.pop() {
                    Some(v) => {
                        black_box(v);
                        n += 1;
                        w.reset();
                    }
                    None => w.snooze(),
                }
            }
            h.join().unwrap();
        })
    });
    g.bench_function("ArrayQueue", |b| {
        b.iter(|| {
            let q = Arc::new(ArrayQueue::<u64>::new(CAP));
            let qp = q.clone();
            cross(
                1,
                move |n| {
                    for i in 0..n {
                        let mut v = i;
                        let mut w = Backoff::default();
                        while let Err(back) = qp.push(v) {
                            v = back;
                            w.snooze();
                        }
                    }
                },
                |total| {
                    let mut n = 0;
                    let mut w = Backoff::default();
                    while n < total {
                        match q.pop() {
                            Some(v) => {
                                black_box(v);
                                n += 1;
                                w.reset();
                            }
                            None => w.snooze(),
                        }
                    }
                },
            )
        })
    });
    g.bench_function("std_sync_channel", |b| {
        b.iter(|| {
            let (tx, rx) = std_mpsc::sync_channel::<u64>(CAP);
            let h = thread::spawn(move || {
                for i in 0..ITEMS {
                    let _ = tx.send(i);
                }
            });
            for _ in 0..ITEMS {
                black_box(rx.recv().ok());
            }
            h.join().unwrap();
        })
    });
    for (name, producers) in [("MsgQueue", 1u64), ("MsgQueue_2p", 2)] {
        g.bench_with_input(BenchmarkId::from_parameter(name), &producers, |b, &p| {
            b.iter(|| {
                let q = Arc::new(MsgQueue::<u64>::new());
                let qp = q.clone();
                cross(
                    p,
                    move |n| {
                        for i in 0..n {
                            qp.push(i);
                        }
                    },
                    |total| drain(total, || q.pop()),
                )
            })
        });
    }
    for (name, producers) in [("SegQueue", 1u64), ("SegQueue_2p", 2)] {
        g.bench_with_input(BenchmarkId::from_parameter(name), &producers, |b, &p| {
            b.iter(|| {
                let q = Arc::new(SegQueue::<u64>::new());
                let qp = q.clone();
                cross(
                    p,
                    move |n| {
                        for i in 0..n {
                            qp.push(i);
                        }
                    },
                    |total| drain(total, || q.pop()),
                )
            })
        });
    }
    for (name, producers) in [("std_channel", 1u64), ("std_channel_2p", 2)] {
        g.bench_with_input(BenchmarkId::from_parameter(name), &producers, |b, &p| {
            b.iter(|| {
                let (tx, rx) = std_mpsc::channel::<u64>();
                let handles: Vec<_> = (0..p)
                    .map(|_| {
                        let tx = tx.clone();
                        thread::spawn(move || {
                            for i in 0..ITEMS / p {
                                let _ = tx.send(i);
                            }
                        })
                    })
                    .collect();
                drop(tx);
                for _ in 0..(ITEMS / p) * p {
                    black_box(rx.recv().ok());
                }
                for h in handles {
                    h.join().unwrap();
                }
            })
        });
    }
    g.finish();
}

fn drain(total: u64, mut pop: impl FnMut() -> Option<u64>) {
    let mut n = 0;
    let mut w = Backoff::default();
    while n < total {
        match pop() {
            Some(v) => {
                black_box(v);
                n += 1;
                w.reset();
            }
            None => w.snooze(),
        }
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = push_pop, cross_thread
}
criterion_main!(benches);
