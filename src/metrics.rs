//! Counters exported at `GET /metrics` in Prometheus text format.
//!
//! Each shard bumps its own cache-padded counters (no sharing on the message path);
//! a scrape sums them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

/// One shard's counters.
#[derive(Default)]
pub struct ShardCounters {
    /// Messages accepted by publish.
    pub published: AtomicU64,
    /// Copies enqueued (one per target queue).
    pub routed: AtomicU64,
    /// Publishes that matched no queue.
    pub unroutable: AtomicU64,
    /// Messages written to subscribers.
    pub delivered: AtomicU64,
    /// Manual acks.
    pub acked: AtomicU64,
    /// Requeued messages (nack or lost consumer).
    pub redelivered: AtomicU64,
    /// Times a publishing connection paused for a queue whose consumers were behind.
    pub flow_pauses: AtomicU64,
    /// Open connections.
    pub connections: AtomicI64,
    /// Open WebSocket connections (placement reads these to balance shards).
    pub websockets: AtomicI64,
    /// Bytes of message bodies held in queues (may go negative per shard; the sum is right).
    pub memory: AtomicI64,
}

/// Adds `n` to one of a shard's own counters. Only the shard's executor writes its
/// counters (scrapes and other shards only read them), so a plain load and store
/// does what `fetch_add` would, without a locked read-modify-write on the message
/// path.
#[inline]
pub fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

/// [`bump`] for a signed counter (the memory gauge).
#[inline]
pub fn bump_i64(counter: &AtomicI64, n: i64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

/// Persistence core counters.
#[derive(Default)]
pub struct PersistCounters {
    /// Checkpoints committed.
    pub checkpoints: AtomicU64,
    /// Records written.
    pub records: AtomicU64,
    /// Size of the last batch.
    pub last_batch: AtomicU64,
    /// Largest batch so far.
    pub max_batch: AtomicU64,
    /// Total commit time, microseconds.
    pub commit_us_total: AtomicU64,
    /// Last commit time, microseconds.
    pub last_commit_us: AtomicU64,
    /// Failed commits.
    pub errors: AtomicU64,
}

/// All counters of the process.
pub struct Metrics {
    /// Per shard.
    pub shards: Vec<CachePadded<ShardCounters>>,
    /// The persistence core.
    pub persist: PersistCounters,
}

impl Metrics {
    /// Counters for `n` shards.
    pub fn new(n: usize) -> Self {
        Self {
            shards: (0..n)
                .map(|_| CachePadded::new(ShardCounters::default()))
                .collect(),
            persist: PersistCounters::default(),
        }
    }

    /// Counters of shard `i` (shard 0's if out of range).
    pub fn shard(&self, i: usize) -> &ShardCounters {
        self.shards
            .get(i)
            .or_else(|| self.shards.first())
            .map(|c| &**c)
            .unwrap_or_else(|| {
                static EMPTY: std::sync::OnceLock<ShardCounters> = std::sync::OnceLock::new();
                EMPTY.get_or_init(ShardCounters::default)
            })
    }

    /// Bytes held in queues, summed over shards.
    pub fn memory(&self) -> i64 {
        self.shards
            .iter()
            .map(|s| s.memory.load(Ordering::Relaxed))
            .sum()
    }

    /// Open connections, summed over shards.
    pub fn connections(&self) -> i64 {
        self.shards
            .iter()
            .map(|s| s.connections.load(Ordering::Relaxed))
            .sum()
    }

    /// A shard serving at least two WebSocket connections fewer than shard `me` (the
    /// one serving the fewest), if there is one: moving one connection there evens
    /// the counts instead of swapping them.
    pub fn emptier_shard(&self, me: usize) -> Option<usize> {
        let mine = self.shard(me).websockets.load(Ordering::Relaxed);
        let (fewest, i) = self
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| (s.websockets.load(Ordering::Relaxed), i))
            .min()?;
        (i != me && mine >= fewest + 2).then_some(i)
    }

    /// Renders the Prometheus text exposition, with `extra` gauges appended.
    pub fn render(&self, extra: &[(&str, &str, f64)]) -> String {
        let mut out = String::with_capacity(2048);
        type Getter = fn(&ShardCounters) -> i64;
        let counters: [(&str, &str, Getter); 9] = [
            (
                "pubsub_messages_published_total",
                "Messages accepted by publish.",
                |c| c.published.load(Ordering::Relaxed) as i64,
            ),
            (
                "pubsub_messages_routed_total",
                "Message copies enqueued, one per target queue.",
                |c| c.routed.load(Ordering::Relaxed) as i64,
            ),
            (
                "pubsub_messages_unroutable_total",
                "Publishes that matched no queue.",
                |c| c.unroutable.load(Ordering::Relaxed) as i64,
            ),
            (
                "pubsub_messages_delivered_total",
                "Messages written to subscribers.",
                |c| c.delivered.load(Ordering::Relaxed) as i64,
            ),
            (
                "pubsub_messages_acked_total",
                "Deliveries settled by ACK.",
                |c| c.acked.load(Ordering::Relaxed) as i64,
            ),
            (
                "pubsub_messages_redelivered_total",
                "Messages requeued for redelivery.",
                |c| c.redelivered.load(Ordering::Relaxed) as i64,
            ),
            (
                "pubsub_publisher_flow_pauses_total",
                "Times a publishing connection stopped reading because a queue it feeds was far behind its consumers.",
                |c| c.flow_pauses.load(Ordering::Relaxed) as i64,
            ),
            ("pubsub_connections", "Open client connections.", |c| {
                c.connections.load(Ordering::Relaxed)
            }),
            (
                "pubsub_websocket_connections",
                "Open WebSocket connections.",
                |c| c.websockets.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, get) in counters {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (i, s) in self.shards.iter().enumerate() {
                let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", get(s));
            }
        }
        let p = &self.persist;
        let persist: [(&str, &str, &str, u64); 7] = [
            (
                "pubsub_checkpoints_total",
                "counter",
                "Checkpoints committed to the SQL store.",
                p.checkpoints.load(Ordering::Relaxed),
            ),
            (
                "pubsub_checkpoint_records_total",
                "counter",
                "Records written by checkpoints.",
                p.records.load(Ordering::Relaxed),
            ),
            (
                "pubsub_checkpoint_batch_size",
                "gauge",
                "Records in the last checkpoint.",
                p.last_batch.load(Ordering::Relaxed),
            ),
            (
                "pubsub_checkpoint_batch_size_max",
                "gauge",
                "Largest checkpoint so far.",
                p.max_batch.load(Ordering::Relaxed),
            ),
            (
                "pubsub_checkpoint_commit_seconds_total",
                "counter",
                "Time spent committing checkpoints.",
                0,
            ),
            (
                "pubsub_checkpoint_commit_seconds_last",
                "gauge",
                "Duration of the last commit.",
                0,
            ),
            (
                "pubsub_checkpoint_errors_total",
                "counter",
                "Checkpoints that failed.",
                p.errors.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, v) in persist {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            let value = match name {
                "pubsub_checkpoint_commit_seconds_total" => {
                    p.commit_us_total.load(Ordering::Relaxed) as f64 / 1e6
                }
                "pubsub_checkpoint_commit_seconds_last" => {
                    p.last_commit_us.load(Ordering::Relaxed) as f64 / 1e6
                }
                _ => v as f64,
            };
            let _ = writeln!(out, "{name} {value}");
        }
        // Queue memory is one figure for the whole broker: the shard that publishes a
        // message adds its bytes and the queue's home shard takes them off, so a
        // shard's own gauge means nothing alone (and goes negative on a delivering
        // shard). It is written like the caller's unlabeled gauges.
        let memory = (
            "pubsub_queue_memory_bytes",
            "Bytes of messages held in queues.",
            self.memory().max(0) as f64,
        );
        for (name, help, v) in std::iter::once(&memory).chain(extra) {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_websockets(counts: &[i64]) -> Metrics {
        let m = Metrics::new(counts.len());
        for (s, &n) in m.shards.iter().zip(counts) {
            s.websockets.store(n, Ordering::Relaxed);
        }
        m
    }

    #[test]
    fn queue_memory_is_one_total_never_a_negative_shard() {
        let m = Metrics::new(2);
        // Published (added) on shard 0, delivered and freed on shard 1.
        m.shard(0).memory.store(1000, Ordering::Relaxed);
        m.shard(1).memory.store(-400, Ordering::Relaxed);
        let text = m.render(&[]);
        assert!(text.contains("\npubsub_queue_memory_bytes 600\n"), "{text}");
        assert!(!text.contains("pubsub_queue_memory_bytes{"), "{text}");
        m.shard(1).memory.store(-1000, Ordering::Relaxed);
        assert!(m.render(&[]).contains("\npubsub_queue_memory_bytes 0\n"));
    }

    #[test]
    fn emptier_shard_needs_a_gap_of_two() {
        // A publisher beside its subscriber, the other core idle: move.
        assert_eq!(with_websockets(&[2, 0]).emptier_shard(0), Some(1));
        // One each: a move would only swap the imbalance.
        assert_eq!(with_websockets(&[1, 0]).emptier_shard(0), None);
        assert_eq!(with_websockets(&[3, 2]).emptier_shard(0), None);
        // Already on the emptiest shard.
        assert_eq!(with_websockets(&[0, 5]).emptier_shard(0), None);
        // The emptiest of several.
        assert_eq!(with_websockets(&[9, 4, 1, 3]).emptier_shard(0), Some(2));
        assert_eq!(with_websockets(&[9, 4, 1, 3]).emptier_shard(3), Some(2));
        assert_eq!(with_websockets(&[9, 4, 2, 3]).emptier_shard(3), None);
    }
}
