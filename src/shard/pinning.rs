//! Where a shard's executor may run: always on its own CPU, anywhere, or on its own
//! CPU only while it is busy (`--pin-shards true|false|adaptive`).
//!
//! Pinning keeps a busy shard's caches warm and the kernel from moving it. Its price is
//! paid at low load: a parked pinned shard can only be woken on its own CPU, and when
//! that CPU is idle (on a VM, a halted vCPU) the wake-up takes an inter-processor
//! interrupt, 10–25 µs on the benchmark machine, where an unpinned thread is woken on
//! the waker's CPU (`docs/benchmarks.md`, "Latency, leg by leg"). `adaptive` takes both:
//! the shard starts free, pins itself to its CPU once a sampling window finds it busy
//! for at least [`PIN_AT`] of the time, and lets go again after [`UNPIN_AFTER`] windows
//! in a row under [`UNPIN_UNDER`]. The decision is plain state ([`Adaptive`]) fed with
//! the executor's busy fraction, so its rules are unit-tested without a runtime;
//! `super::tick_task` samples it and applies it with [`set_affinity`].

use std::str::FromStr;

/// How shards are placed on CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinMode {
    /// Each shard on one CPU of those the process may use, always (`true`).
    Always,
    /// Shards run wherever the kernel puts them (`false`).
    Never,
    /// Pinned while busy, free while mostly idle (`adaptive`).
    Adaptive,
}

impl FromStr for PinMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "true" => Ok(PinMode::Always),
            "false" => Ok(PinMode::Never),
            "adaptive" => Ok(PinMode::Adaptive),
            other => Err(format!("{other:?}: use true, false or adaptive")),
        }
    }
}

impl std::fmt::Display for PinMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PinMode::Always => "true",
            PinMode::Never => "false",
            PinMode::Adaptive => "adaptive",
        })
    }
}

/// Busy fraction of one window at or above which a free shard pins itself.
pub const PIN_AT: f64 = 0.5;
/// Busy fraction under which a window counts as quiet.
pub const UNPIN_UNDER: f64 = 0.15;
/// Quiet windows in a row after which a pinned shard lets go.
pub const UNPIN_AFTER: u32 = 5;

/// The adaptive rule's state: pinned or not, and how many quiet windows in a row.
#[derive(Debug, Default)]
pub struct Adaptive {
    pinned: bool,
    quiet: u32,
}

impl Adaptive {
    /// Takes one window's busy fraction (time running tasks and polling I/O over the
    /// window's length); answers `Some(true)` to pin, `Some(false)` to let go, `None`
    /// to stay as it is.
    pub fn sample(&mut self, busy: f64) -> Option<bool> {
        if !self.pinned {
            if busy >= PIN_AT {
                self.pinned = true;
                self.quiet = 0;
                return Some(true);
            }
            return None;
        }
        if busy >= UNPIN_UNDER {
            self.quiet = 0;
            return None;
        }
        self.quiet += 1;
        if self.quiet >= UNPIN_AFTER {
            self.pinned = false;
            self.quiet = 0;
            return Some(false);
        }
        None
    }

    /// Whether the last answer left the shard pinned.
    pub fn pinned(&self) -> bool {
        self.pinned
    }
}

/// The CPUs this process may use (all of them, by count, if the kernel will not say).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `cpu_set_t` is plain data for which all-zero bytes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; the pointer and size describe `set` exactly.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return (0..std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1))
            .collect();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `i` is below CPU_SETSIZE, the capacity of `set`.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect()
}

/// The CPU shard `shard` runs on when pinned: the shard's index into the CPUs the
/// process may use, wrapping when there are more shards than CPUs.
pub fn cpu_for(shard: usize, cpus: &[usize]) -> Option<usize> {
    cpus.get(shard % cpus.len().max(1)).copied()
}

/// Lets the calling thread run on `cpus` only.
pub fn set_affinity(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: `cpu_set_t` is plain data for which all-zero bytes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
        // SAFETY: `cpu` is below CPU_SETSIZE, the capacity of `set` (filtered above).
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; the pointer and size describe `set` exactly.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_from_the_flag_values() {
        assert_eq!("true".parse(), Ok(PinMode::Always));
        assert_eq!("false".parse(), Ok(PinMode::Never));
        assert_eq!("adaptive".parse(), Ok(PinMode::Adaptive));
        assert!("yes".parse::<PinMode>().is_err());
        assert_eq!(PinMode::Adaptive.to_string(), "adaptive");
    }

    #[test]
    fn a_busy_window_pins_and_a_run_of_quiet_ones_lets_go() {
        let mut a = Adaptive::default();
        // Light load (the latency scenario: a few % busy) never pins.
        for _ in 0..100 {
            assert_eq!(a.sample(0.05), None);
        }
        assert!(!a.pinned());
        assert_eq!(a.sample(PIN_AT), Some(true));
        assert!(a.pinned());
        // Quiet windows let go only after UNPIN_AFTER in a row; a busy one resets.
        for _ in 0..UNPIN_AFTER - 1 {
            assert_eq!(a.sample(0.0), None);
        }
        assert_eq!(a.sample(0.3), None);
        for _ in 0..UNPIN_AFTER - 1 {
            assert_eq!(a.sample(0.1), None);
        }
        assert_eq!(a.sample(0.1), Some(false));
        assert!(!a.pinned());
        assert_eq!(a.sample(0.9), Some(true));
    }

    #[test]
    fn the_calling_thread_can_be_pinned_and_freed() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        std::thread::spawn(move || {
            set_affinity(&cpus[..1]).unwrap();
            assert_eq!(allowed_cpus(), cpus[..1].to_vec());
            set_affinity(&cpus).unwrap();
            assert_eq!(allowed_cpus(), cpus);
        })
        .join()
        .unwrap();
    }
}
