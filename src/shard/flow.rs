//! Publisher flow control: when a connection may read more requests.
//!
//! A publish that lands in a queue whose consumers are far behind (more than
//! [`FLOW_HIGH`](crate::routing::FLOW_HIGH) ready messages while it has consumers) asks
//! the publishing connection to pause. The connection then stops reading, so TCP
//! pushes back on the client, while it goes on writing and taking deliveries. It
//! resumes when the queue is down to [`FLOW_LOW`](crate::routing::FLOW_LOW), loses its
//! consumers, its consumers take nothing for [`FLOW_STALL`], or the pause reaches
//! [`FLOW_MAX_PAUSE`]: flow control paces a publisher to consumers that keep up (the
//! backlog stays a few MiB and the CPU goes to delivery instead of to growing it),
//! slows it for slow ones, and never parks it behind a consumer that stopped. After a
//! stall or a maximal pause that queue may not pause the connection again for
//! [`FLOW_EXEMPT`]. This is RabbitMQ's credit flow in spirit, driven by queue depth.
//!
//! The gate is plain state with the clock passed in, so its rules are unit-tested
//! without a runtime; [`super::conn`] owns one per connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::routing::QueueHandle;

/// A paused publisher looks at its queue this often.
pub const FLOW_POLL: Duration = Duration::from_micros(200);
/// A paused publisher resumes when its queue's consumers took nothing for this long.
/// Longer than the scheduler can starve a busy client on a shared machine.
pub const FLOW_STALL: Duration = Duration::from_millis(50);
/// Longest single pause, however steadily the consumers drain: a publisher feeding
/// a slow consumer is slowed, not stopped (and keeps answering pings).
pub const FLOW_MAX_PAUSE: Duration = Duration::from_millis(500);
/// After a stall or a maximal pause, that queue does not pause this publisher again
/// for this long.
pub const FLOW_EXEMPT: Duration = Duration::from_secs(1);

/// Whether a connection may read.
#[derive(Default)]
pub enum FlowGate {
    /// Reading.
    #[default]
    Open,
    /// Waiting for `queue` to drain.
    Paused {
        /// The queue that asked.
        queue: Arc<QueueHandle>,
        /// Its `drained` counter when last seen moving.
        drained: u64,
        /// When it last moved.
        progress_at: Instant,
        /// When the pause began.
        since: Instant,
    },
    /// `queue` stalled; it may not pause this connection before `until`.
    Exempt {
        /// The stalled queue.
        queue: Arc<QueueHandle>,
        /// End of the exemption.
        until: Instant,
    },
}

impl FlowGate {
    /// True while the connection must not read.
    pub fn paused(&self) -> bool {
        matches!(self, FlowGate::Paused { .. })
    }

    /// True unless the gate is plainly open, i.e. when [`FlowGate::check`] has
    /// something to look at (so an open connection does not read the clock per wake).
    pub fn engaged(&self) -> bool {
        !matches!(self, FlowGate::Open)
    }

    /// A publish went to `queue`, which asks its publishers to pause. True when this
    /// paused the connection (it was reading).
    pub fn hint(&mut self, queue: Arc<QueueHandle>, now: Instant) -> bool {
        match self {
            FlowGate::Paused { .. } => false,
            FlowGate::Exempt { queue: q, until } if Arc::ptr_eq(q, &queue) && now < *until => false,
            _ => {
                *self = FlowGate::Paused {
                    drained: queue.counts.drained.load(Ordering::Relaxed),
                    queue,
                    progress_at: now,
                    since: now,
                };
                true
            }
        }
    }

    /// Opens the gate once the queue drained, lost its consumers, or stalled.
    pub fn check(&mut self, now: Instant) {
        match self {
            FlowGate::Open => {}
            FlowGate::Exempt { queue, until } => {
                if now >= *until || queue.flow_clear() {
                    *self = FlowGate::Open;
                }
            }
            FlowGate::Paused {
                queue,
                drained,
                progress_at,
                since,
            } => {
                if queue.flow_clear() {
                    *self = FlowGate::Open;
                    return;
                }
                let d = queue.counts.drained.load(Ordering::Relaxed);
                if d != *drained {
                    *drained = d;
                    *progress_at = now;
                }
                let stalled = now.saturating_duration_since(*progress_at) >= FLOW_STALL;
                let too_long = now.saturating_duration_since(*since) >= FLOW_MAX_PAUSE;
                if stalled || too_long {
                    *self = FlowGate::Exempt {
                        queue: queue.clone(),
                        until: now + FLOW_EXEMPT,
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::QueueSpec;
    use crate::routing::{FLOW_HIGH, FLOW_LOW};

    fn queue(depth: usize, consumers: usize) -> Arc<QueueHandle> {
        let q = Arc::new(QueueHandle::new("q", QueueSpec::default(), 0, None));
        q.add_ready(depth);
        q.counts.consumers.store(consumers, Ordering::Relaxed);
        q
    }

    #[test]
    fn only_a_consumed_deep_queue_asks_for_flow() {
        assert!(queue(FLOW_HIGH + 1, 1).wants_flow());
        assert!(!queue(FLOW_HIGH, 1).wants_flow());
        // Nobody consumes it: the queue is a buffer, publishers go on.
        assert!(!queue(FLOW_HIGH * 10, 0).wants_flow());
    }

    #[test]
    fn paused_until_drained_to_low_mark() {
        let t0 = Instant::now();
        let q = queue(FLOW_HIGH + 1, 1);
        let mut g = FlowGate::default();
        assert!(g.hint(q.clone(), t0));
        assert!(g.paused());
        assert!(!g.hint(q.clone(), t0), "already paused");
        // Draining but still above the low mark: stays paused, however long it takes.
        for i in 1..=10u64 {
            q.take_ready(100);
            assert!(q.depth() > FLOW_LOW);
            g.check(t0 + FLOW_STALL * (i as u32) / 2);
            assert!(g.paused(), "step {i}");
        }
        q.take_ready(q.depth() - FLOW_LOW);
        g.check(t0 + FLOW_STALL * 6);
        assert!(!g.paused());
    }

    #[test]
    fn losing_consumers_opens_the_gate() {
        let t0 = Instant::now();
        let q = queue(FLOW_HIGH + 1, 1);
        let mut g = FlowGate::default();
        g.hint(q.clone(), t0);
        q.counts.consumers.store(0, Ordering::Relaxed);
        g.check(t0);
        assert!(!g.paused());
    }

    #[test]
    fn a_stalled_consumer_releases_and_exempts_the_publisher() {
        let t0 = Instant::now();
        let q = queue(FLOW_HIGH + 1, 1);
        let mut g = FlowGate::default();
        g.hint(q.clone(), t0);
        g.check(t0 + FLOW_STALL - Duration::from_millis(1));
        assert!(g.paused(), "not stalled yet");
        g.check(t0 + FLOW_STALL);
        assert!(!g.paused(), "no progress for FLOW_STALL");
        // The same queue cannot pause it again during the exemption...
        let t1 = t0 + FLOW_STALL + Duration::from_millis(1);
        assert!(!g.hint(q.clone(), t1));
        assert!(!g.paused());
        // ...but another deep queue can.
        let other = queue(FLOW_HIGH + 1, 1);
        g.hint(other, t1);
        assert!(g.paused());
    }

    #[test]
    fn a_pause_is_bounded_even_while_consumers_drain() {
        let t0 = Instant::now();
        let q = queue(FLOW_HIGH + 1, 1);
        let mut g = FlowGate::default();
        g.hint(q.clone(), t0);
        let step = FLOW_STALL / 2;
        let mut t = t0;
        while t + step < t0 + FLOW_MAX_PAUSE {
            t += step;
            q.take_ready(1);
            g.check(t);
            assert!(g.paused(), "draining steadily, still under the limit");
        }
        q.take_ready(1);
        g.check(t0 + FLOW_MAX_PAUSE);
        assert!(!g.paused(), "a single pause ends at FLOW_MAX_PAUSE");
        assert!(
            !g.hint(q, t0 + FLOW_MAX_PAUSE),
            "and that queue is exempt for a while"
        );
    }

    #[test]
    fn exemption_ends() {
        let t0 = Instant::now();
        let q = queue(FLOW_HIGH + 1, 1);
        let mut g = FlowGate::Exempt {
            queue: q.clone(),
            until: t0 + FLOW_EXEMPT,
        };
        g.check(t0);
        g.hint(q.clone(), t0);
        assert!(!g.paused());
        g.check(t0 + FLOW_EXEMPT);
        g.hint(q, t0 + FLOW_EXEMPT);
        assert!(g.paused());
    }
}
