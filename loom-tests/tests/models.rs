//! loom models of `src/sync/*`, compiled from the very same source files as the
//! broker (the `#[path]` module below) with `--cfg pubsub_loom` (loom's atomics,
//! cells and threads via `sync::shim`) and `--cfg crossbeam_loom` (loom-aware
//! crossbeam-epoch). Run through `scripts/loom`; `README.md` lists the models and
//! the mutations each one catches.
#![cfg(pubsub_loom)]

#[path = "../../src/sync/mod.rs"]
#[allow(dead_code, unused_imports)]
mod sync;

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;
use std::sync::Mutex;
use sync::mpsc::MsgQueue;
use sync::notify::Notify;
use sync::snapshot::{pin, Snapshot};
use sync::spsc;

/// Per-value drop counters: `counts[v]` is how many times value `v` was dropped.
/// Plain std types: only read after every thread is joined, never used to
/// synchronise, so they add no interleavings.
#[derive(Clone)]
struct DropLog(std::sync::Arc<Mutex<Vec<usize>>>);

impl DropLog {
    fn new(n: usize) -> Self {
        Self(std::sync::Arc::new(Mutex::new(vec![0; n])))
    }
    fn item(&self, v: usize) -> Item {
        Item {
            v,
            log: self.clone(),
        }
    }
    fn assert_each_dropped_once(&self) {
        let counts = self.0.lock().unwrap();
        for (v, &c) in counts.iter().enumerate() {
            assert_eq!(
                c, 1,
                "value {v} dropped {c} times (0 = leak, 2+ = double drop)"
            );
        }
    }
}

/// A value that records its drop.
struct Item {
    v: usize,
    log: DropLog,
}

impl Drop for Item {
    fn drop(&mut self) {
        self.log.0.lock().unwrap()[self.v] += 1;
    }
}

/// Runs a model with no preemption bound (every interleaving, whatever
/// `LOOM_MAX_PREEMPTIONS` says): used for the models small enough to finish in
/// seconds that way. The others take the bound from the environment.
fn exhaustive<F>(f: F)
where
    F: Fn() + Sync + Send + 'static,
{
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = None;
    builder.check(f);
}

fn push_spin<T>(tx: &mut spsc::Producer<T>, mut v: T) {
    loop {
        match tx.push(v) {
            Ok(()) => return,
            Err(back) => {
                v = back;
                thread::yield_now();
            }
        }
    }
}

// ------------------------------------------------------------------ SPSC ring

/// Three items through a two-slot ring: FIFO, no loss, no duplicate, the full edge
/// (third push waits), the empty edge (pops wait), wrap-around (item 2 reuses slot
/// 0), and every item dropped exactly once.
#[test]
fn spsc_fifo_wraparound() {
    exhaustive(|| {
        let log = DropLog::new(3);
        let (mut tx, mut rx) = spsc::channel::<Item>(2);
        assert_eq!(tx.capacity(), 2);
        let l2 = log.clone();
        let producer = thread::spawn(move || {
            for v in 0..3 {
                push_spin(&mut tx, l2.item(v));
            }
        });
        let mut next = 0;
        while next < 3 {
            match rx.pop() {
                Some(item) => {
                    assert_eq!(item.v, next, "ring out of order");
                    next += 1;
                }
                None => thread::yield_now(),
            }
        }
        producer.join().unwrap();
        assert!(rx.pop().is_none(), "ring duplicated an item");
        drop(rx);
        log.assert_each_dropped_once();
    });
}

/// Items still inside when both halves drop (in either order, on different
/// threads) are dropped exactly once; a push refused when full hands the item back.
#[test]
fn spsc_drop_leftovers() {
    exhaustive(|| {
        let log = DropLog::new(3);
        let (mut tx, mut rx) = spsc::channel::<Item>(2);
        let l2 = log.clone();
        let producer = thread::spawn(move || {
            for v in 0..3 {
                // A refused item is returned and dropped here.
                let _ = tx.push(l2.item(v));
            }
            drop(tx);
        });
        if let Some(item) = rx.pop() {
            assert_eq!(item.v, 0);
        }
        drop(rx);
        producer.join().unwrap();
        log.assert_each_dropped_once();
    });
}

// ------------------------------------------------------------------ MsgQueue

/// Two producers (A pushes 0 then 1, crossing a block boundary: loom blocks hold 2
/// slots; B pushes 2) against a consumer that calls `take` `tries` times while they
/// run, then until it finds nothing: every item once, A's in order, the retired block
/// reclaimed without use-after-free, each item dropped exactly once. `take` moves
/// what it took into `seen` and says whether it took anything.
fn two_producers_against(take: fn(&MsgQueue<Item>, &mut Vec<usize>) -> bool, tries: usize) {
    loom::model(move || {
        let log = DropLog::new(3);
        let q = Arc::new(MsgQueue::<Item>::new());
        let (qa, la) = (q.clone(), log.clone());
        let a = thread::spawn(move || {
            qa.push(la.item(0));
            qa.push(la.item(1));
        });
        let (qb, lb) = (q.clone(), log.clone());
        let b = thread::spawn(move || qb.push(lb.item(2)));
        let mut seen = Vec::new();
        for _ in 0..tries {
            if !take(&q, &mut seen) {
                thread::yield_now();
            }
        }
        a.join().unwrap();
        b.join().unwrap();
        while take(&q, &mut seen) {}
        assert!(q.is_empty());
        assert!(q.pop().is_none());
        let pos = |v| seen.iter().position(|&x| x == v);
        assert!(pos(0) < pos(1), "producer A's items out of order: {seen:?}");
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 1, 2], "lost or duplicated: {seen:?}");
        drop(q);
        log.assert_each_dropped_once();
    });
}

/// `pop` against two producers (see [`two_producers_against`]).
#[test]
fn mpsc_two_producers_one_consumer() {
    two_producers_against(
        |q, seen| match q.pop() {
            Some(item) => {
                seen.push(item.v);
                true
            }
            None => false,
        },
        3,
    );
}

/// `drain` (one consumer-flag acquisition for many items, stopping at a claimed but
/// unwritten slot) against the same two producers.
#[test]
fn mpsc_drain_two_producers() {
    two_producers_against(|q, seen| q.drain(|item| seen.push(item.v)) > 0, 2);
}

/// A producer racing a consumer across a block boundary, then the queue dropped
/// with items inside: no leak, no double drop.
#[test]
fn mpsc_drop_leftovers() {
    exhaustive(|| {
        let log = DropLog::new(3);
        let q = Arc::new(MsgQueue::<Item>::new());
        let (qp, lp) = (q.clone(), log.clone());
        let p = thread::spawn(move || {
            for v in 0..3 {
                qp.push(lp.item(v));
            }
        });
        // Up to two pops: the second may consume the block's last slot and retire
        // the block while the producer installs the next one.
        let mut next = 0;
        for _ in 0..2 {
            if let Some(item) = q.pop() {
                assert_eq!(item.v, next, "out of order");
                next += 1;
            }
        }
        p.join().unwrap();
        drop(q);
        log.assert_each_dropped_once();
    });
}

/// Two threads popping at once (misuse, but must stay sound): the one item is
/// taken exactly once. (Plain `usize` items: a duplicated `Item` would be a double
/// free that crashes instead of failing the assertion.)
#[test]
fn mpsc_concurrent_poppers() {
    exhaustive(|| {
        let q = Arc::new(MsgQueue::<usize>::new());
        q.push(7);
        let q2 = q.clone();
        let other = thread::spawn(move || q2.pop());
        let mine = q.pop();
        let theirs = other.join().unwrap();
        assert_eq!(
            usize::from(mine.is_some()) + usize::from(theirs.is_some()),
            1,
            "one item popped as {mine:?} / {theirs:?}"
        );
        assert!(q.pop().is_none());
    });
}

// ------------------------------------------------------------------ Snapshot

/// A snapshot whose contents are written after allocation through a loom cell, so
/// a reader that reaches it without happens-before (half-built) is a detected race.
struct Payload {
    v: UnsafeCell<usize>,
    drops: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

// SAFETY: `v` is written only while the payload is private to its builder, before
// it is published; afterwards it is only read (loom checks exactly this).
unsafe impl Sync for Payload {}

impl Payload {
    fn new(v: usize, drops: &std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Self {
        BUILT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = Payload {
            v: UnsafeCell::new(0),
            drops: drops.clone(),
        };
        // SAFETY: `p` is not shared yet.
        p.v.with_mut(|x| unsafe { *x = v });
        p
    }
    fn get(&self) -> usize {
        // SAFETY: published payloads are never written again.
        self.v.with(|x| unsafe { *x })
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        // A write: racing with any reader still holding it is a detected race.
        // SAFETY: `&mut self`.
        self.v.with_mut(|x| unsafe { *x = usize::MAX });
        self.drops
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        DROPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Every `Payload` built and dropped, summed over all executions of a model.
/// Replaced snapshots are freed by crossbeam-epoch's collector, which under loom is
/// per execution and runs what is still deferred when the execution ends, so the
/// totals are compared after `loom::model` returns.
static BUILT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static DROPPED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A reader loading while a writer swaps: it sees the old or the new value, fully
/// built and not yet freed (a reader racing a free or a half-built value is a
/// loom-detected race on `Payload::v`); each value is dropped exactly once.
#[test]
fn snapshot_reader_vs_writer() {
    use std::sync::atomic::Ordering::Relaxed;
    let (built0, dropped0) = (BUILT.load(Relaxed), DROPPED.load(Relaxed));
    loom::model(|| {
        let drops = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let snap = Arc::new(Snapshot::new(Payload::new(1, &drops)));
        let (s2, d2) = (snap.clone(), drops.clone());
        let writer = thread::spawn(move || {
            s2.update(|cur| Ok::<_, ()>(Payload::new(cur.get() + 1, &d2)))
                .unwrap();
        });
        {
            let guard = pin();
            let v = snap.load(&guard).get();
            assert!(v == 1 || v == 2, "reader saw {v}");
        }
        writer.join().unwrap();
        {
            let guard = pin();
            assert_eq!(snap.load(&guard).get(), 2);
        }
        drop(snap);
        assert!(drops.load(Relaxed) <= 2, "a snapshot was dropped twice");
    });
    let built = BUILT.load(Relaxed) - built0;
    let dropped = DROPPED.load(Relaxed) - dropped0;
    assert!(built > 0);
    assert_eq!(
        built, dropped,
        "snapshots leaked or double-freed: built {built}, dropped {dropped}"
    );
}

/// Two writers updating at once: the CAS loop retries, so neither update is lost.
#[test]
fn snapshot_two_writers() {
    loom::model(|| {
        let drops = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let snap = Arc::new(Snapshot::new(Payload::new(0, &drops)));
        let (s2, d2) = (snap.clone(), drops.clone());
        let other = thread::spawn(move || {
            s2.update(|cur| Ok::<_, ()>(Payload::new(cur.get() + 1, &d2)))
                .unwrap();
        });
        snap.update(|cur| Ok::<_, ()>(Payload::new(cur.get() + 1, &drops)))
            .unwrap();
        other.join().unwrap();
        let guard = pin();
        assert_eq!(snap.load(&guard).get(), 2, "an update was lost");
    });
}

// ------------------------------------------------------------------ Notify

/// A consumer parks on a doorbell just as a producer pushes into the ring: with the
/// documented protocol it is always woken (a lost wake-up leaves the consumer
/// waiting forever, which loom reports as a deadlock).
#[test]
fn notify_no_lost_wakeup_ring() {
    exhaustive(|| {
        let (mut tx, mut rx) = spsc::channel::<usize>(2);
        let notify = Arc::new(Notify::new());
        let bell = Arc::new(loom::sync::Notify::new());
        let (n2, b2) = (notify.clone(), bell.clone());
        let producer = thread::spawn(move || {
            push_spin(&mut tx, 7);
            if n2.should_wake() {
                b2.notify();
            }
        });
        loop {
            if let Some(v) = rx.pop() {
                assert_eq!(v, 7);
                break;
            }
            notify.prepare_park();
            if !rx.is_empty() {
                notify.cancel_park();
                continue;
            }
            bell.wait();
            notify.cancel_park();
        }
        producer.join().unwrap();
    });
}

/// The same protocol over the message queue, two producers.
#[test]
fn notify_no_lost_wakeup_queue() {
    const NPROD: usize = 2;
    loom::model(|| {
        let q = Arc::new(MsgQueue::<usize>::new());
        let notify = Arc::new(Notify::new());
        let bell = Arc::new(loom::sync::Notify::new());
        let producers: Vec<_> = (0..NPROD)
            .map(|v| {
                let (q, n, b) = (q.clone(), notify.clone(), bell.clone());
                thread::spawn(move || {
                    q.push(v);
                    if n.should_wake() {
                        b.notify();
                    }
                })
            })
            .collect();
        let mut got = 0;
        while got < NPROD {
            if q.pop().is_some() {
                got += 1;
                continue;
            }
            notify.prepare_park();
            if !q.is_empty() {
                notify.cancel_park();
                continue;
            }
            bell.wait();
            notify.cancel_park();
        }
        for p in producers {
            p.join().unwrap();
        }
    });
}
