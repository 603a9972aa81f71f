//! Publisher pacing shared by `pubsub-bench` and the peer harness (`benches/peers`
//! includes this file with `#[path]`): as fast as possible in batches, at a fixed rate,
//! or one message every interval, each bounded in count and in time.

use std::thread;
use std::time::Duration;

use super::payload::now_ns;

/// Upper bound on any publishing loop, whatever the knobs say.
pub const HARD_RUN_LIMIT: Duration = Duration::from_secs(600);

/// How a publisher paces itself.
#[derive(Debug, Clone, Copy)]
pub enum Plan {
    /// `n` messages, as fast as the server takes them.
    Count(u64),
    /// A fixed rate for a duration.
    Rate { rate: u64, dur: Duration },
    /// `n` messages, one every `every`.
    Every { n: u64, every: Duration },
}

impl Plan {
    pub fn total(self) -> u64 {
        match self {
            Plan::Count(n) | Plan::Every { n, .. } => n,
            Plan::Rate { rate, dur } => (rate as f64 * dur.as_secs_f64()).round() as u64,
        }
    }
}

/// Lowers this thread's timer slack so short sleeps in rate mode are precise.
pub fn precise_timers() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer argument and affects only this thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// Sleeps until `deadline_ns` on the process clock.
pub fn sleep_until(deadline_ns: u64) {
    let now = now_ns();
    if deadline_ns > now {
        thread::sleep(Duration::from_nanos(deadline_ns - now));
    }
}

/// Paces a publisher: calls `emit(first_seq, count)` whenever `count` messages are due,
/// until the plan is done or [`HARD_RUN_LIMIT`] passes. `emit` may block (a full window).
pub fn pace<E>(
    plan: Plan,
    batch: usize,
    mut emit: impl FnMut(u64, u64) -> Result<(), E>,
) -> Result<(), E> {
    let total = plan.total();
    let mut seq = 0u64;
    let start = now_ns();
    let hard_end = start + HARD_RUN_LIMIT.as_nanos() as u64;
    match plan {
        Plan::Count(_) => {
            while seq < total && now_ns() < hard_end {
                let n = (total - seq).min(batch as u64);
                emit(seq, n)?;
                seq += n;
            }
        }
        Plan::Rate { rate, .. } => {
            precise_timers();
            let gap = 1_000_000_000 / rate.max(1);
            while seq < total && now_ns() < hard_end {
                let due = start + seq * gap;
                sleep_until(due);
                let now = now_ns();
                let behind = now.saturating_sub(start) / gap.max(1) + 1;
                let n = behind.saturating_sub(seq).clamp(1, total - seq);
                emit(seq, n)?;
                seq += n;
            }
        }
        Plan::Every { every, .. } => {
            precise_timers();
            let gap = every.as_nanos() as u64;
            while seq < total && now_ns() < hard_end {
                sleep_until(start + seq * gap);
                emit(seq, 1)?;
                seq += 1;
            }
        }
    }
    Ok(())
}
