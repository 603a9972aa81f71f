//! Real-thread stress tests for `pubsub::sync`: the SPSC ring, the message queue,
//! the snapshot cell and the park/wake protocol, under several producer/consumer
//! layouts, checking counts, order and drops.
//!
//! Sized to take a few seconds in a debug build. `PUBSUB_SOAK=1` multiplies every
//! operation count by [`SOAK_FACTOR`] for a long manual soak:
//! `PUBSUB_SOAK=1 cargo test --release --test sync_stress`.

use pubsub::sync::mpsc::MsgQueue;
use pubsub::sync::notify::Notify;
use pubsub::sync::snapshot::{pin, Snapshot};
use pubsub::sync::spsc;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Multiplier applied to every count when `PUBSUB_SOAK=1`.
const SOAK_FACTOR: usize = 50;
/// A parked consumer that waits this long while work is pending has lost a wake-up.
const LOST_WAKEUP_TIMEOUT: Duration = Duration::from_secs(5);

fn scale(n: usize) -> usize {
    if std::env::var("PUBSUB_SOAK").is_ok_and(|v| v == "1") {
        n * SOAK_FACTOR
    } else {
        n
    }
}

/// Counts drops so tests can check "exactly once".
struct Counted {
    value: usize,
    drops: Arc<AtomicUsize>,
}
impl Drop for Counted {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------- SPSC ring

fn ring_transfer(capacity: usize, n: usize) {
    let (mut tx, mut rx) = spsc::channel::<usize>(capacity);
    assert!(tx.capacity() >= capacity && tx.capacity().is_power_of_two());
    let producer = thread::spawn(move || {
        for i in 0..n {
            let mut v = i;
            while let Err(back) = tx.push(v) {
                v = back;
                thread::yield_now();
            }
        }
    });
    let mut expected = 0;
    while expected < n {
        match rx.pop() {
            Some(v) => {
                assert_eq!(v, expected, "ring out of order or lost/duplicated an item");
                expected += 1;
            }
            None => thread::yield_now(),
        }
    }
    producer.join().unwrap();
    assert!(rx.is_empty());
    assert_eq!(rx.pop(), None, "ring produced more than was pushed");
}

#[test]
fn ring_fifo_across_capacities() {
    for (cap, n) in [
        (1, 20_000),
        (2, 20_000),
        (8, 200_000),
        (64, 1_000_000),
        (1024, 2_000_000),
    ] {
        ring_transfer(cap, scale(n));
    }
}

#[test]
fn ring_full_and_empty_edges_single_thread() {
    let (mut tx, mut rx) = spsc::channel::<u32>(3);
    assert_eq!(tx.capacity(), 4);
    assert_eq!(rx.pop(), None);
    for round in 0..scale(10_000) as u32 {
        for k in 0..4 {
            assert_eq!(tx.push(round * 4 + k), Ok(()));
        }
        assert_eq!(
            tx.push(u32::MAX),
            Err(u32::MAX),
            "push into a full ring must fail"
        );
        assert!(tx.is_full());
        for k in 0..4 {
            assert_eq!(rx.pop(), Some(round * 4 + k));
        }
        assert_eq!(rx.pop(), None);
        assert!(rx.is_empty());
    }
}

#[test]
fn ring_drops_leftovers_exactly_once() {
    let drops = Arc::new(AtomicUsize::new(0));
    let (mut tx, mut rx) = spsc::channel::<Counted>(8);
    // Wrap the counters a few times, then leave 5 inside.
    for i in 0..29 {
        assert!(tx
            .push(Counted {
                value: i,
                drops: drops.clone()
            })
            .is_ok());
        if i < 24 {
            assert_eq!(rx.pop().map(|c| c.value), Some(i));
        }
    }
    assert_eq!(drops.load(Ordering::Relaxed), 24);
    let t = thread::spawn(move || drop(tx));
    t.join().unwrap();
    assert_eq!(
        drops.load(Ordering::Relaxed),
        24,
        "dropping one half must not drop items"
    );
    drop(rx);
    assert_eq!(drops.load(Ordering::Relaxed), 29);
}

// ---------------------------------------------------------------- MsgQueue

fn queue_layout(producers: usize, per_producer: usize) {
    let q = Arc::new(MsgQueue::<(usize, usize)>::new());
    let handles: Vec<_> = (0..producers)
        .map(|p| {
            let q = q.clone();
            thread::spawn(move || {
                for i in 0..per_producer {
                    q.push((p, i));
                }
            })
        })
        .collect();
    let mut next = vec![0usize; producers];
    let total = producers * per_producer;
    let mut got = 0;
    while got < total {
        match q.pop() {
            Some((p, i)) => {
                assert_eq!(
                    i, next[p],
                    "producer {p}: FIFO violated, lost or duplicated"
                );
                next[p] += 1;
                got += 1;
            }
            None => thread::yield_now(),
        }
    }
    for h in handles {
        h.join().unwrap();
    }
    assert!(q.is_empty());
    assert_eq!(q.pop(), None, "queue produced more than was pushed");
    assert!(next.iter().all(|&n| n == per_producer));
}

#[test]
fn queue_one_producer() {
    queue_layout(1, scale(1_000_000));
}

#[test]
fn queue_two_producers() {
    queue_layout(2, scale(500_000));
}

#[test]
fn queue_eight_producers() {
    queue_layout(8, scale(125_000));
}

#[test]
fn queue_concurrent_poppers_no_loss_no_dup() {
    // Misuse (two consumers) must stay sound: every item exactly once.
    let producers = 3;
    let per = scale(100_000);
    let q = Arc::new(MsgQueue::<usize>::new());
    let done = Arc::new(AtomicBool::new(false));
    let prod: Vec<_> = (0..producers)
        .map(|p| {
            let q = q.clone();
            thread::spawn(move || {
                for i in 0..per {
                    q.push(p * per + i);
                }
            })
        })
        .collect();
    let cons: Vec<_> = (0..2)
        .map(|_| {
            let q = q.clone();
            let done = done.clone();
            thread::spawn(move || {
                let mut seen = Vec::new();
                loop {
                    match q.pop() {
                        Some(v) => seen.push(v),
                        None if done.load(Ordering::Acquire) && q.is_empty() => break,
                        None => thread::yield_now(),
                    }
                }
                seen
            })
        })
        .collect();
    for h in prod {
        h.join().unwrap();
    }
    done.store(true, Ordering::Release);
    let mut all = HashSet::new();
    let mut count = 0;
    for h in cons {
        for v in h.join().unwrap() {
            assert!(all.insert(v), "item {v} popped twice");
            count += 1;
        }
    }
    assert_eq!(count, producers * per, "items lost");
}

#[test]
fn queue_drops_leftovers_exactly_once() {
    let drops = Arc::new(AtomicUsize::new(0));
    let q = MsgQueue::new();
    let n = 1000; // spans many blocks
    for i in 0..n {
        q.push(Counted {
            value: i,
            drops: drops.clone(),
        });
    }
    for i in 0..437 {
        assert_eq!(q.pop().map(|c| c.value), Some(i));
    }
    assert_eq!(drops.load(Ordering::Relaxed), 437);
    drop(q);
    assert_eq!(drops.load(Ordering::Relaxed), n);
}

// ---------------------------------------------------------------- Notify

/// A doorbell: a permit behind a mutex and condvar (what an eventfd does).
#[derive(Default)]
struct Doorbell {
    rung: Mutex<bool>,
    cv: Condvar,
}
impl Doorbell {
    fn ring(&self) {
        *self.rung.lock().unwrap() = true;
        self.cv.notify_one();
    }
    /// Waits for a ring; false on timeout.
    fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut rung = self.rung.lock().unwrap();
        while !*rung {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            rung = self.cv.wait_timeout(rung, left).unwrap().0;
        }
        *rung = false;
        true
    }
}

#[test]
fn ring_park_protocol_never_loses_a_wakeup() {
    let n = scale(200_000);
    let (mut tx, mut rx) = spsc::channel::<usize>(16);
    let notify = Arc::new(Notify::new());
    let bell = Arc::new(Doorbell::default());
    let parks = Arc::new(AtomicUsize::new(0));
    let (notify2, bell2) = (notify.clone(), bell.clone());
    let producer = thread::spawn(move || {
        for i in 0..n {
            let mut v = i;
            while let Err(back) = tx.push(v) {
                v = back;
                thread::yield_now();
            }
            if notify2.should_wake() {
                bell2.ring();
            }
            if i % 1024 == 0 {
                // Let the consumer drain and park.
                thread::sleep(Duration::from_micros(50));
            }
        }
    });
    let mut expected = 0;
    while expected < n {
        while let Some(v) = rx.pop() {
            assert_eq!(v, expected);
            expected += 1;
        }
        if expected == n {
            break;
        }
        notify.prepare_park();
        if !rx.is_empty() {
            notify.cancel_park();
            continue;
        }
        parks.fetch_add(1, Ordering::Relaxed);
        let woke = bell.wait(LOST_WAKEUP_TIMEOUT);
        notify.cancel_park();
        assert!(
            woke || rx.is_empty(),
            "lost wake-up: parked while the ring had items"
        );
    }
    producer.join().unwrap();
    assert!(
        parks.load(Ordering::Relaxed) > 0,
        "the consumer never parked: test did not test"
    );
}

#[test]
fn queue_park_protocol_never_loses_a_wakeup() {
    let producers = 4;
    let per = scale(50_000);
    let q = Arc::new(MsgQueue::<(usize, usize)>::new());
    let notify = Arc::new(Notify::new());
    let bell = Arc::new(Doorbell::default());
    let handles: Vec<_> = (0..producers)
        .map(|p| {
            let (q, notify, bell) = (q.clone(), notify.clone(), bell.clone());
            thread::spawn(move || {
                for i in 0..per {
                    q.push((p, i));
                    if notify.should_wake() {
                        bell.ring();
                    }
                    if i % 512 == 0 {
                        thread::sleep(Duration::from_micros(20));
                    }
                }
            })
        })
        .collect();
    let mut next = vec![0usize; producers];
    let mut got = 0;
    let mut parks = 0;
    while got < producers * per {
        while let Some((p, i)) = q.pop() {
            assert_eq!(i, next[p]);
            next[p] += 1;
            got += 1;
        }
        if got == producers * per {
            break;
        }
        notify.prepare_park();
        if !q.is_empty() {
            notify.cancel_park();
            continue;
        }
        parks += 1;
        let woke = bell.wait(LOST_WAKEUP_TIMEOUT);
        notify.cancel_park();
        assert!(
            woke || q.is_empty(),
            "lost wake-up: parked while the queue had items"
        );
    }
    for h in handles {
        h.join().unwrap();
    }
    assert!(parks > 0, "the consumer never parked: test did not test");
}

// ---------------------------------------------------------------- Snapshot

/// A value whose parts must agree; a torn or freed read breaks the check.
struct Topo {
    version: usize,
    items: Vec<usize>,
    drops: Arc<AtomicUsize>,
}
/// Counts `Topo` values built (an `update` that loses its CAS builds one more).
static TOPOS_BUILT: AtomicUsize = AtomicUsize::new(0);
impl Topo {
    fn new(version: usize, drops: Arc<AtomicUsize>) -> Self {
        TOPOS_BUILT.fetch_add(1, Ordering::Relaxed);
        Self {
            version,
            items: (0..version % 64).map(|k| version * 1000 + k).collect(),
            drops,
        }
    }
    fn check(&self) {
        assert_eq!(self.items.len(), self.version % 64);
        for (k, &x) in self.items.iter().enumerate() {
            assert_eq!(x, self.version * 1000 + k, "torn or freed snapshot");
        }
    }
}
impl Drop for Topo {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn snapshot_concurrent_writers_and_readers() {
    let writers = 3;
    let per = scale(5_000);
    let drops = Arc::new(AtomicUsize::new(0));
    let snap = Arc::new(Snapshot::new(Topo::new(0, drops.clone())));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (snap, stop) = (snap.clone(), stop.clone());
            thread::spawn(move || {
                let mut last = 0;
                let mut reads = 0usize;
                while !stop.load(Ordering::Acquire) {
                    let g = pin();
                    let t = snap.load(&g);
                    t.check();
                    assert!(t.version >= last, "snapshot went backwards");
                    last = t.version;
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let ws: Vec<_> = (0..writers)
        .map(|_| {
            let (snap, drops) = (snap.clone(), drops.clone());
            thread::spawn(move || {
                for _ in 0..per {
                    snap.update(|cur| Ok::<_, ()>(Topo::new(cur.version + 1, drops.clone())))
                        .unwrap();
                }
                // A refusing update changes nothing.
                assert_eq!(snap.update(|_| Err::<Topo, _>("no")), Err("no"));
            })
        })
        .collect();
    for w in ws {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Release);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    {
        let g = pin();
        assert_eq!(snap.load(&g).version, writers * per, "an update was lost");
    }
    let created = TOPOS_BUILT.load(Ordering::Relaxed);
    assert!(
        created > writers * per,
        "fewer values built than updates applied"
    );
    drop(snap);
    // Replaced values are reclaimed by the epoch collector; push it along.
    let deadline = Instant::now() + Duration::from_secs(10);
    while drops.load(Ordering::Relaxed) < created && Instant::now() < deadline {
        pin().flush();
        thread::yield_now();
    }
    let d = drops.load(Ordering::Relaxed);
    assert!(
        d <= created,
        "a snapshot was dropped twice ({d} > {created})"
    );
    // Everything but a few values still in other threads' local bags is freed.
    assert!(
        d + 64 * 4 >= created,
        "old snapshots not reclaimed: {d} of {created}"
    );
}
