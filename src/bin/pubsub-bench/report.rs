//! Result records and their two outputs, shared by `pubsub-bench` and the peer harness
//! (`benches/peers` includes this file with `#[path]`): one JSON line per run and one
//! Markdown table row, with the same keys and columns whatever the system measured.
//!
//! `scripts/bench-peers` collects the JSON lines and builds the comparison tables.

use serde_json::{json, Map, Value};

/// Latency percentiles in microseconds over a set of nanosecond samples.
#[derive(Debug, Clone, Copy, Default)]
pub struct Percentiles {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub samples: usize,
}

impl Percentiles {
    /// Sorts `ns` in place and reads the nearest-rank percentiles off it.
    pub fn from_ns(ns: &mut [u64]) -> Self {
        ns.sort_unstable();
        let at = |q: f64| -> f64 {
            if ns.is_empty() {
                return 0.0;
            }
            let rank = ((q * ns.len() as f64).ceil() as usize).clamp(1, ns.len());
            ns.get(rank - 1).copied().unwrap_or(0) as f64 / 1000.0
        };
        Percentiles {
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: ns.last().copied().unwrap_or(0) as f64 / 1000.0,
            samples: ns.len(),
        }
    }
}

/// One run of one scenario against one system.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// `pubsub`, `nats` or `rabbitmq`.
    pub system: String,
    /// `throughput`, `fanout`, `latency`, `manual_ack`, `connections` or `durable`.
    pub scenario: String,
    /// Transport or store variant (`ws`, `http`, `sqlite`, `postgres`, …).
    pub variant: String,
    /// The headline rate: deliveries/s (summed over subscribers) or confirms/s.
    pub msgs_per_sec: f64,
    /// Messages the publisher(s) got accepted.
    pub sent: u64,
    /// Deliveries counted by the subscribers (or confirms for `durable`).
    pub received: u64,
    /// Expected deliveries minus received ones after the drain timeout.
    pub lost: u64,
    /// Latency summary (publish→delivery, or publish→confirm for `durable`).
    pub lat: Percentiles,
    /// Scenario-specific numbers (RSS per connection, publish rate, …).
    pub extra: Map<String, Value>,
}

impl Record {
    pub fn new(system: &str, scenario: &str, variant: &str) -> Self {
        Record {
            system: system.to_owned(),
            scenario: scenario.to_owned(),
            variant: variant.to_owned(),
            ..Record::default()
        }
    }

    /// Adds a scenario-specific number or string.
    pub fn put(&mut self, key: &str, v: impl Into<Value>) {
        self.extra.insert(key.to_owned(), v.into());
    }

    /// The one-line JSON form.
    pub fn json(&self) -> String {
        let mut m = Map::new();
        m.insert("system".into(), json!(self.system));
        m.insert("scenario".into(), json!(self.scenario));
        m.insert("variant".into(), json!(self.variant));
        m.insert("msgs_per_sec".into(), json!(round1(self.msgs_per_sec)));
        m.insert("sent".into(), json!(self.sent));
        m.insert("received".into(), json!(self.received));
        m.insert("lost".into(), json!(self.lost));
        m.insert("p50_us".into(), json!(round1(self.lat.p50_us)));
        m.insert("p90_us".into(), json!(round1(self.lat.p90_us)));
        m.insert("p99_us".into(), json!(round1(self.lat.p99_us)));
        m.insert("p999_us".into(), json!(round1(self.lat.p999_us)));
        m.insert("max_us".into(), json!(round1(self.lat.max_us)));
        m.insert("samples".into(), json!(self.lat.samples));
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m).to_string()
    }

    /// The Markdown header matching [`Record::markdown_row`].
    pub fn markdown_header() -> &'static str {
        "| system | scenario | variant | msgs/s | p50 µs | p99 µs | p99.9 µs | max µs | lost | notes |\n\
         | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    }

    /// One Markdown table row.
    pub fn markdown_row(&self) -> String {
        let notes: Vec<String> = self.extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(
            "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |",
            self.system,
            self.scenario,
            self.variant,
            self.msgs_per_sec,
            self.lat.p50_us,
            self.lat.p99_us,
            self.lat.p999_us,
            self.lat.max_us,
            self.lost,
            notes.join(" ")
        )
    }

    /// Prints both forms to stdout (the JSON line first, so scripts can `grep '^{'`).
    pub fn print(&self) {
        println!("{}", self.json());
        println!("{}", Self::markdown_header());
        println!("{}", self.markdown_row());
    }
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if got != 0 {
        return 0;
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: `lim` is a valid rlimit; raising the soft limit up to the hard one is allowed.
    let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    if set != 0 {
        return 0;
    }
    lim.rlim_cur
}

/// Resident set size of `pid` in KiB, from `/proc/<pid>/status` (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `own(pid)` summed over the process tree rooted at `pid` (RabbitMQ's beam has
/// children); `None` when `own` has nothing for `pid` itself.
fn tree_sum(pid: u32, own: fn(u32) -> Option<u64>) -> Option<u64> {
    let mut total = own(pid)?;
    if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        for c in children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
            total = total.saturating_add(tree_sum(c, own).unwrap_or(0));
        }
    }
    Some(total)
}

/// Resident set size of a process tree rooted at `pid`, in KiB.
pub fn tree_rss_kib(pid: u32) -> Option<u64> {
    tree_sum(pid, rss_kib)
}

/// CPU time in nanoseconds that the live threads of `pid` have run
/// (`/proc/<pid>/task/*/schedstat`, first field); `None` without schedstat.
fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(task) = task else { continue };
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
        total = total.saturating_add(ns);
    }
    Some(total)
}

/// [`cpu_ns`] of the process tree rooted at `pid`. A server's threads live as long as
/// it does, so the difference of two readings is what the server spent in between.
pub fn tree_cpu_ns(pid: u32) -> Option<u64> {
    tree_sum(pid, cpu_ns)
}

/// CPU time in nanoseconds this process has used, threads that ended included
/// (`getrusage(RUSAGE_SELF)`, user plus system).
pub fn self_cpu_ns() -> Option<u64> {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `getrusage` writes one `rusage` through the pointer, which points at a
    // properly aligned `rusage` owned by this frame.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: `rusage` is plain integers, so the zeroed value is valid, and the call
    // above succeeded in filling it.
    let ru = unsafe { ru.assume_init() };
    let ns = |t: libc::timeval| {
        u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_usec).unwrap_or(0) * 1_000
    };
    Some(ns(ru.ru_utime) + ns(ru.ru_stime))
}

/// The CPU the server and this load generator spend over a measured transfer, per
/// delivered message: where a rate scenario is CPU-bound on shared cores (two here),
/// these two numbers are what decides the rate.
pub struct CpuMeter {
    pid: Option<u32>,
    server: Option<u64>,
    client: Option<u64>,
}

impl CpuMeter {
    /// Takes the first readings; `pid` is the server's (or `None`: client only).
    pub fn start(pid: Option<u32>) -> Self {
        CpuMeter {
            pid,
            server: pid.and_then(tree_cpu_ns),
            client: self_cpu_ns(),
        }
    }

    /// `server_cpu_ns_per_msg` and `client_cpu_ns_per_msg`: nanoseconds per delivered
    /// message since [`CpuMeter::start`], rounded, for what could be read. Read it as
    /// the transfer ends, before any teardown, and [`Record::put`] the pairs.
    pub fn per_msg(&self, delivered: u64) -> Vec<(&'static str, u64)> {
        let per = |before: Option<u64>, after: Option<u64>| {
            let spent = after?.checked_sub(before?)?;
            (delivered > 0).then(|| (spent as f64 / delivered as f64).round() as u64)
        };
        let mut out = Vec::new();
        if let Some(v) = per(self.server, self.pid.and_then(tree_cpu_ns)) {
            out.push(("server_cpu_ns_per_msg", v));
        }
        if let Some(v) = per(self.client, self_cpu_ns()) {
            out.push(("client_cpu_ns_per_msg", v));
        }
        out
    }
}

/// Finds the pid of the process listening on TCP `port` on this machine through
/// `/proc/net/tcp` (the socket inode) and `/proc/*/fd` (who holds it).
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (cols.get(1), cols.get(3), cols.get(9))
            else {
                continue;
            };
            // State 0A is LISTEN.
            let p = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if *state == "0A" && p == Some(port) {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let mut v: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let p = Percentiles::from_ns(&mut v);
        assert_eq!(p.p50_us, 500.0);
        assert_eq!(p.p99_us, 990.0);
        assert_eq!(p.p999_us, 999.0);
        assert_eq!(p.max_us, 1000.0);
    }
}
