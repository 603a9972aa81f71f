//! Where the shards' executors may run: pinned one CPU each by default (`--shards N`
//! takes the CPUs the process may use in order), or free to run on any of them with
//! `--pin-shards false`, or pinned only while busy with `--pin-shards adaptive`. Read off
//! the running server's threads in `/proc`.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::Server;

/// Parses a `Cpus_allowed_list` value such as `0-3,6,8-9`.
fn cpu_list(s: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
                out.extend(a..=b);
            }
            None => out.push(part.parse().unwrap()),
        }
    }
    out
}

fn allowed_of(status: &str) -> Vec<usize> {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list in /proc status");
    cpu_list(line)
}

/// (shard index, CPUs its threads may run on) for every thread named `shard-<i>-…`.
fn shard_threads(pid: u32) -> Vec<(usize, Vec<usize>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = entry.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let Some(rest) = comm.trim().strip_prefix("shard-") else {
            continue;
        };
        let index: usize = rest.split('-').next().unwrap().parse().unwrap();
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        out.push((index, allowed_of(&status)));
    }
    out.sort();
    out
}

fn our_cpus() -> Vec<usize> {
    allowed_of(&std::fs::read_to_string("/proc/self/status").unwrap())
}

#[test]
fn shards_are_pinned_one_cpu_each_by_default() {
    let server = Server::with_args(&["--shards", "2"]);
    let cpus = our_cpus();
    let threads = shard_threads(server.pid().unwrap());
    assert!(
        threads.iter().any(|(i, _)| *i == 0) && threads.iter().any(|(i, _)| *i == 1),
        "both shards' threads: {threads:?}"
    );
    for (i, allowed) in &threads {
        assert_eq!(
            allowed,
            &vec![cpus[i % cpus.len()]],
            "shard {i} pinned to the {i}th CPU the process may use ({cpus:?})"
        );
    }
}

#[test]
fn unpinned_shards_may_run_on_every_allowed_cpu() {
    let server = Server::with_args(&["--shards", "2", "--pin-shards", "false"]);
    let cpus = our_cpus();
    let threads = shard_threads(server.pid().unwrap());
    assert!(threads.len() >= 2, "both shards' threads: {threads:?}");
    for (i, allowed) in &threads {
        assert_eq!(allowed, &cpus, "shard {i} free to run on any CPU");
    }
    // And it serves: a publish reaches its queue.
    server.topology("e", "direct", "q", "k");
    server.publish("e", "k", &serde_json::json!("hello"));
    server.wait_queue_counts("q", 1, 0);
}

#[test]
fn adaptive_shards_pin_themselves_while_busy_and_let_go_when_idle() {
    let cpus = our_cpus();
    assert!(
        cpus.len() >= 2,
        "this test tells a pinned shard from a free one, which needs 2 CPUs; has {cpus:?}"
    );
    let server = Server::with_args(&["--shards", "2", "--pin-shards", "adaptive"]);
    let pid = server.pid().unwrap();
    let free = |threads: &[(usize, Vec<usize>)]| threads.iter().all(|(_, a)| *a == cpus);
    let threads = shard_threads(pid);
    assert!(
        threads.len() >= 2 && free(&threads),
        "idle shards start free: {threads:?}"
    );

    // Load: two connections publish pipelined batches to a key nothing is bound to, so
    // each publish is decoded and routed (CPU) and nothing piles up (no memory).
    server.exchange("e", "direct");
    let stop = Arc::new(AtomicBool::new(false));
    let batches = Arc::new(AtomicU64::new(0));
    let publishers: Vec<_> = (0..2)
        .map(|_| common::flood_unroutable(server.ws(), "e", stop.clone(), batches.clone()))
        .collect();
    let mut seen = None;
    common::wait_until(
        "a busy shard pinned to its CPU",
        Duration::from_secs(30),
        || {
            seen = shard_threads(pid)
                .into_iter()
                .find(|(i, a)| *a == vec![cpus[i % cpus.len()]]);
            if seen.is_none() {
                thread::sleep(Duration::from_millis(5));
            }
            seen.is_some()
        },
    );
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        p.join().unwrap();
    }
    // Idle again: every shard lets go.
    common::wait_until("idle shards free again", Duration::from_secs(10), || {
        free(&shard_threads(pid))
    });
    server.topology("e2", "direct", "q", "k");
    server.publish("e2", "k", &serde_json::json!("still serving"));
    server.wait_queue_counts("q", 1, 0);
}

#[test]
fn cpu_lists_parse_ranges_and_singles() {
    assert_eq!(cpu_list("0-1"), vec![0, 1]);
    assert_eq!(cpu_list("0-2,5,7-8\n"), vec![0, 1, 2, 5, 7, 8]);
    assert_eq!(cpu_list("3"), vec![3]);
}
