//! `bench-report`: the Markdown reports of `scripts/bench-peers` and `scripts/bench-ab`,
//! built from the JSON lines `pubsub-bench` and the peer harness print (one per run,
//! written by `pubsub-bench/report.rs`).
//!
//! - `bench-report peers FILE.jsonl --runs N`: one table per scenario (median of the
//!   runs, min–max of the headline rate, the latency percentiles' medians, messages
//!   lost, and the server's and the client's CPU per delivered message where the runs
//!   measured them), the ratios of pubsub to each peer, and "Goals of issue 5": each
//!   goal the issue sets, the ratio of the medians, the same ratio run by run (run k of
//!   pubsub against run k of the peer, which `bench-peers` runs back to back and
//!   numbers in the `"run"` field of each line) and a verdict that says by how much a
//!   missed goal falls short (for a rate, with what each side spent per message).
//! - `bench-report ab FILE.jsonl`: the medians of the runs labelled `--variant old` and
//!   `--variant new`, and new/old (msgs/s, or p50 and p99 for `latency`; and the
//!   server's CPU per message where measured).
//!
//! It is a Rust binary rather than a script so that a fresh machine needs nothing
//! beyond the toolchain to run the benchmarks, and so that its arithmetic is tested.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{Map, Value};

/// Builds the benchmark scripts' Markdown reports from their JSON lines.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    report: Report,
}

#[derive(Debug, Subcommand)]
enum Report {
    /// The comparison of `scripts/bench-peers`: tables, ratios and the goals of issue 5.
    Peers {
        /// JSON lines, one per run.
        file: String,
        /// Runs per cell the script asked for.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Load average at the start, as the script read it.
        #[arg(long, default_value = "n/a")]
        load_start: String,
        /// Load average at the end.
        #[arg(long, default_value = "n/a")]
        load_end: String,
    },
    /// The comparison of `scripts/bench-ab`: variants `old` and `new`.
    Ab {
        /// JSON lines, one per run.
        file: String,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let file = match &args.report {
        Report::Peers { file, .. } | Report::Ab { file } => file,
    };
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("bench-report: cannot read {file}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runs = match parse_runs(&text) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench-report: {file}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = match &args.report {
        Report::Peers {
            runs: n,
            load_start,
            load_end,
            ..
        } => peers_report(&runs, *n, load_start, load_end),
        Report::Ab { .. } => ab_report(&runs),
    };
    print!("{out}");
    ExitCode::SUCCESS
}

/// One JSON line: a measured run, or a run that failed.
#[derive(Debug, Clone)]
struct Run {
    system: String,
    scenario: String,
    variant: String,
    fields: Map<String, Value>,
}

impl Run {
    fn num(&self, key: &str) -> Option<f64> {
        self.fields.get(key).and_then(Value::as_f64)
    }

    fn error(&self) -> Option<&str> {
        self.fields.get("error").and_then(Value::as_str)
    }
}

fn parse_runs(text: &str) -> Result<Vec<Run>, String> {
    let mut runs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| format!("line {}: {e}", i + 1))?;
        let Value::Object(fields) = v else {
            return Err(format!("line {}: not a JSON object", i + 1));
        };
        let text_of = |k: &str| {
            fields
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        runs.push(Run {
            system: text_of("system"),
            scenario: text_of("scenario"),
            variant: text_of("variant"),
            fields,
        });
    }
    Ok(runs)
}

/// The median as `statistics.median` takes it: the middle value, or the mean of the
/// two middle ones; `None` for no values.
fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => v.get(n / 2).copied(),
        _ => Some((v.get(n / 2 - 1)? + v.get(n / 2)?) / 2.0),
    }
}

/// `a / b` when both are known and `b` is positive.
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// `1234567.8` with 0 decimals → `1,234,568`; `None` → `n/a`.
fn thousands(v: Option<f64>, decimals: usize) -> String {
    let Some(v) = v.filter(|x| x.is_finite()) else {
        return "n/a".into();
    };
    let s = format!("{:.*}", decimals, v.abs());
    let (int, frac) = s
        .split_once('.')
        .map_or((s.as_str(), None), |(i, f)| (i, Some(f)));
    let mut out = String::new();
    if v < 0.0 && s.bytes().any(|b| b.is_ascii_digit() && b != b'0') {
        out.push('-');
    }
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if let Some(f) = frac {
        out.push('.');
        out.push_str(f);
    }
    out
}

const SYSTEMS: [&str; 3] = ["pubsub", "nats", "rabbitmq"];
const ORDER: [&str; 6] = [
    "throughput",
    "manual_ack",
    "fanout",
    "latency",
    "connections",
    "durable",
];

/// The runs of each scenario, per (system, variant), in the order they ran.
type Cells<'a> = BTreeMap<&'a str, Vec<((&'a str, &'a str), Vec<&'a Run>)>>;

fn cells(runs: &[Run]) -> Cells<'_> {
    let mut out: Cells<'_> = BTreeMap::new();
    for r in runs.iter().filter(|r| r.error().is_none()) {
        let cells = out.entry(r.scenario.as_str()).or_default();
        let key = (r.system.as_str(), r.variant.as_str());
        match cells.iter_mut().find(|(k, _)| *k == key) {
            Some((_, rs)) => rs.push(r),
            None => cells.push((key, vec![r])),
        }
    }
    for cells in out.values_mut() {
        cells.sort_by_key(|((system, _), _)| {
            SYSTEMS
                .iter()
                .position(|s| s == system)
                .unwrap_or(SYSTEMS.len())
        });
    }
    out
}

fn metric(rs: &[&Run], key: &str) -> Vec<f64> {
    rs.iter().filter_map(|r| r.num(key)).collect()
}

/// Ratio of pubsub's run k to the peer's run k of `key`. `bench-peers` writes each run's
/// number into its line (`"run"`), so a run that failed on one side leaves its pair out
/// instead of shifting every later pair; lines without numbers (older files) pair by
/// position.
fn run_by_run(mine: &[&Run], theirs: &[&Run], key: &str) -> Vec<f64> {
    let numbered = mine.iter().chain(theirs).all(|r| r.num("run").is_some());
    if !numbered {
        return mine
            .iter()
            .zip(theirs)
            .filter_map(|(a, b)| ratio(a.num(key), b.num(key)))
            .collect();
    }
    mine.iter()
        .filter_map(|a| {
            let k = a.num("run");
            let b = theirs.iter().find(|b| b.num("run") == k)?;
            ratio(a.num(key), b.num(key))
        })
        .collect()
}

fn peers_report(runs: &[Run], n: usize, load_start: &str, load_end: &str) -> String {
    let mut o = String::new();
    let cells = cells(runs);
    let _ = writeln!(
        o,
        "Results of scripts/bench-peers, {n} run(s) per cell; medians, with min–max of the headline rate."
    );
    let _ = writeln!(
        o,
        "Load average (1/5/15 min) at start: {load_start}; at end: {load_end} (2 cores).\n"
    );
    let mut scenarios: Vec<&str> = ORDER
        .iter()
        .copied()
        .filter(|s| cells.contains_key(s))
        .collect();
    scenarios.extend(cells.keys().copied().filter(|s| !ORDER.contains(s)));
    for sc in scenarios {
        if let Some(c) = cells.get(sc) {
            scenario_table(&mut o, sc, c);
        }
    }
    goals_table(&mut o, &cells);
    let failed: Vec<&Run> = runs.iter().filter(|r| r.error().is_some()).collect();
    if !failed.is_empty() {
        let _ = writeln!(o, "### failed runs\n");
        for r in failed {
            let _ = writeln!(
                o,
                "- {} {}: {}",
                r.system,
                r.scenario,
                r.error().unwrap_or("")
            );
        }
        let _ = writeln!(o);
    }
    o
}

/// Medians of one cell.
struct Summary {
    rate: Option<f64>,
    p99: Option<f64>,
    p999: Option<f64>,
}

type CellList<'a> = [((&'a str, &'a str), Vec<&'a Run>)];

fn scenario_table(o: &mut String, sc: &str, cells: &CellList<'_>) {
    let conn = sc == "connections";
    // The CPU the server and the load generator spent per delivered message, where
    // the runs measured it (the rate scenarios, `pubsub-bench/report.rs`'s `CpuMeter`).
    let cpu = !conn
        && cells
            .iter()
            .any(|(_, rs)| !metric(rs, "server_cpu_ns_per_msg").is_empty());
    let _ = writeln!(o, "### {sc}\n");
    let mut head = String::from(
        "| system | variant | runs | msgs/s median (min–max) | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | lost (sum) |",
    );
    if conn {
        head.push_str(" subscribers | RSS KiB/conn |");
    }
    if cpu {
        head.push_str(" server CPU ns/msg | client CPU ns/msg |");
    }
    let columns = head.matches('|').count() - 1;
    let _ = writeln!(o, "{head}\n|{}", " --- |".repeat(columns));
    let mut summaries: Vec<(&str, &str, Summary)> = Vec::new();
    for ((system, variant), rs) in cells {
        let rate = metric(rs, "msgs_per_sec");
        let min = rate.iter().copied().reduce(f64::min);
        let max = rate.iter().copied().reduce(f64::max);
        let m = |k: &str| median(&metric(rs, k));
        let lost: f64 = metric(rs, "lost").iter().sum();
        let _ = write!(
            o,
            "| {system} | {variant} | {} | {} ({}–{}) | {} | {} | {} | {} | {} | {} |",
            rs.len(),
            thousands(median(&rate), 0),
            thousands(min, 0),
            thousands(max, 0),
            thousands(m("p50_us"), 1),
            thousands(m("p90_us"), 1),
            thousands(m("p99_us"), 1),
            thousands(m("p999_us"), 1),
            thousands(m("max_us"), 1),
            thousands(Some(lost), 0),
        );
        if conn {
            let _ = write!(
                o,
                " {} | {} |",
                thousands(m("subscribers"), 0),
                thousands(m("rss_per_conn_kib"), 1)
            );
        }
        if cpu {
            let _ = write!(
                o,
                " {} | {} |",
                thousands(m("server_cpu_ns_per_msg"), 0),
                thousands(m("client_cpu_ns_per_msg"), 0)
            );
        }
        let _ = writeln!(o);
        summaries.push((
            system,
            variant,
            Summary {
                rate: median(&rate),
                p99: m("p99_us"),
                p999: m("p999_us"),
            },
        ));
    }
    let _ = writeln!(o);
    for (system, variant, p) in &summaries {
        if *system != "pubsub" {
            continue;
        }
        let mut parts = Vec::new();
        for peer in ["nats", "rabbitmq"] {
            let Some((_, _, q)) = summaries.iter().find(|(s, _, _)| *s == peer) else {
                continue;
            };
            let p999 = if sc == "latency" {
                ratio(p.p999, q.p999)
            } else {
                None
            };
            for (label, r) in [
                ("msgs/s", ratio(p.rate, q.rate)),
                ("p99", ratio(p.p99, q.p99)),
                ("p99.9", p999),
            ] {
                if let Some(r) = r {
                    parts.push(format!("{label} pubsub/{peer} = {r:.2}"));
                }
            }
        }
        if !parts.is_empty() {
            let _ = writeln!(o, "Ratios (pubsub {variant}): {}\n", parts.join("; "));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Relation {
    /// pubsub's value at least `factor` times the peer's.
    AtLeast,
    /// pubsub's value at most `factor` times the peer's.
    AtMost,
}

impl Relation {
    fn holds(self, value: f64, bound: f64) -> bool {
        match self {
            Relation::AtLeast => value >= bound,
            Relation::AtMost => value <= bound,
        }
    }

    fn sign(self) -> &'static str {
        match self {
            Relation::AtLeast => "≥",
            Relation::AtMost => "≤",
        }
    }
}

/// One goal of issue 5: pubsub's `metric` in `scenario`/`variant` against the peer's
/// (or, with no peer, against `factor` itself, in `unit`).
struct Goal {
    name: &'static str,
    scenario: &'static str,
    variant: &'static str,
    peer: Option<&'static str>,
    metric: &'static str,
    relation: Relation,
    factor: f64,
    unit: &'static str,
}

const fn goal(
    name: &'static str,
    scenario: &'static str,
    variant: &'static str,
    peer: &'static str,
    metric: &'static str,
    relation: Relation,
    factor: f64,
) -> Goal {
    Goal {
        name,
        scenario,
        variant,
        peer: Some(peer),
        metric,
        relation,
        factor,
        unit: "×",
    }
}

#[rustfmt::skip]
const GOALS: [Goal; 11] = [
    goal("throughput: msgs/s at least NATS's", "throughput", "ws", "nats", "msgs_per_sec", Relation::AtLeast, 1.0),
    goal("throughput: msgs/s at least 10× RabbitMQ's", "throughput", "ws", "rabbitmq", "msgs_per_sec", Relation::AtLeast, 10.0),
    goal("fanout: deliveries/s at least NATS's", "fanout", "ws", "nats", "msgs_per_sec", Relation::AtLeast, 1.0),
    goal("fanout: deliveries/s at least 10× RabbitMQ's", "fanout", "ws", "rabbitmq", "msgs_per_sec", Relation::AtLeast, 10.0),
    goal("latency: p99 no higher than NATS's", "latency", "ws", "nats", "p99_us", Relation::AtMost, 1.0),
    goal("latency: p99.9 no higher than RabbitMQ's", "latency", "ws", "rabbitmq", "p999_us", Relation::AtMost, 1.0),
    goal("manual ack: msgs/s at least 5× RabbitMQ's", "manual_ack", "ws", "rabbitmq", "msgs_per_sec", Relation::AtLeast, 5.0),
    goal("durable (SQLite): confirms/s at least 2× RabbitMQ's", "durable", "ws-sqlite", "rabbitmq", "msgs_per_sec", Relation::AtLeast, 2.0),
    goal("durable (PostgreSQL): confirms/s at least 2× RabbitMQ's", "durable", "ws-postgres", "rabbitmq", "msgs_per_sec", Relation::AtLeast, 2.0),
    goal("connections: p99 to the last subscriber no higher than NATS's", "connections", "ws", "nats", "p99_us", Relation::AtMost, 1.0),
    Goal {
        name: "connections: server memory per idle subscriber at most 16 KiB",
        scenario: "connections",
        variant: "ws",
        peer: None,
        metric: "rss_per_conn_kib",
        relation: Relation::AtMost,
        factor: 16.0,
        unit: " KiB",
    },
];

/// The runs of one cell; a peer has one variant per scenario, so `variant` is only
/// matched for pubsub.
fn cell_runs<'a>(
    cells: &Cells<'a>,
    scenario: &str,
    system: &str,
    variant: Option<&str>,
) -> Vec<&'a Run> {
    cells
        .get(scenario)
        .and_then(|c| {
            c.iter()
                .find(|((s, v), _)| *s == system && variant.is_none_or(|want| want == *v))
        })
        .map(|(_, rs)| rs.clone())
        .unwrap_or_default()
}

/// The medians of the server's and the client's CPU per delivered message, summed:
/// what one message costs the two shared cores.
fn cpu_per_msg(runs: &[&Run]) -> Option<f64> {
    Some(
        median(&metric(runs, "server_cpu_ns_per_msg"))?
            + median(&metric(runs, "client_cpu_ns_per_msg"))?,
    )
}

fn goals_table(o: &mut String, cells: &Cells<'_>) {
    let _ = writeln!(o, "### Goals of issue 5\n");
    let _ = writeln!(
        o,
        "Ratio of pubsub's median to the peer's (pubsub's own median for an absolute goal); \
         \"run by run\" pairs run k of pubsub with run k of the peer. Where a goal is missed, \
         docs/benchmarks.md (\"What stands in the way\") names the cause.\n"
    );
    let _ = writeln!(
        o,
        "| goal | asks | median | run by run | verdict |\n| --- | --- | --- | --- | --- |"
    );
    for g in &GOALS {
        let asks = format!("{} {}{}", g.relation.sign(), g.factor, g.unit);
        let my_runs = cell_runs(cells, g.scenario, "pubsub", Some(g.variant));
        let mine = metric(&my_runs, g.metric);
        let their_runs = g
            .peer
            .map(|p| cell_runs(cells, g.scenario, p, None))
            .unwrap_or_default();
        let (value, per_run) = match g.peer {
            Some(_) => {
                let theirs = metric(&their_runs, g.metric);
                (
                    ratio(median(&mine), median(&theirs)),
                    run_by_run(&my_runs, &their_runs, g.metric),
                )
            }
            None => (median(&mine), mine.clone()),
        };
        let Some(value) = value else {
            let _ = writeln!(
                o,
                "| {} | {asks} | not measured | | not measured in this run |",
                g.name
            );
            continue;
        };
        let decimals = if g.peer.is_some() { 2 } else { 1 };
        let shown: Vec<String> = per_run.iter().map(|x| format!("{x:.decimals$}")).collect();
        let held = per_run
            .iter()
            .filter(|x| g.relation.holds(**x, g.factor))
            .count();
        let verdict = if g.relation.holds(value, g.factor) {
            format!("met (held in {held} of {} runs)", per_run.len())
        } else {
            let short = match g.relation {
                Relation::AtLeast => 1.0 - value / g.factor,
                Relation::AtMost => value / g.factor - 1.0,
            };
            let mut v = format!(
                "**missed** by {:.0} % (held in {held} of {} runs)",
                short * 100.0,
                per_run.len()
            );
            // A rate goal missed on the shared cores: what each side spent per message.
            if let (Some(p), "msgs_per_sec") = (g.peer, g.metric) {
                if let (Some(a), Some(b)) = (cpu_per_msg(&my_runs), cpu_per_msg(&their_runs)) {
                    let _ = write!(
                        v,
                        "; CPU per message, server + client: pubsub {}, {p} {} ns",
                        thousands(Some(a), 0),
                        thousands(Some(b), 0)
                    );
                }
            }
            v
        };
        let _ = writeln!(
            o,
            "| {} | {asks} | {value:.decimals$}{} | {} | {verdict} |",
            g.name,
            g.unit,
            shown.join(" ")
        );
    }
    let lost: f64 = cells
        .values()
        .flatten()
        .filter(|((s, _), _)| *s == "pubsub")
        .map(|(_, rs)| metric(rs, "lost").iter().sum::<f64>())
        .sum();
    let verdict = if lost == 0.0 { "met" } else { "**missed**" };
    let _ = writeln!(
        o,
        "| no message lost by pubsub | 0 | {} lost | | {verdict} |\n",
        thousands(Some(lost), 0)
    );
}

fn ab_report(runs: &[Run]) -> String {
    let mut o = String::new();
    let pick = |variant: &str| -> Vec<&Run> {
        runs.iter()
            .filter(|r| r.variant == variant && r.error().is_none())
            .collect()
    };
    let (old, new) = (pick("old"), pick("new"));
    let scenario = old
        .first()
        .or(new.first())
        .map_or("?", |r| r.scenario.as_str());
    let mut columns: Vec<(&str, &str, usize)> = if scenario == "latency" {
        vec![("p50_us", "p50 µs", 1), ("p99_us", "p99 µs", 1)]
    } else {
        vec![("msgs_per_sec", "msgs/s", 0)]
    };
    // The server's CPU per delivered message, where the runs carry it: a change too
    // small to move the rate on two shared cores can still show here.
    const CPU: &str = "server_cpu_ns_per_msg";
    if !metric(&old, CPU).is_empty() || !metric(&new, CPU).is_empty() {
        columns.push((CPU, "server CPU ns/msg", 0));
    }
    for (key, label, decimals) in columns {
        let (a, b) = (metric(&old, key), metric(&new, key));
        let list = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v.iter()
                .map(|x| thousands(Some(*x), decimals))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (ma, mb) = (median(&a), median(&b));
        let _ = writeln!(
            o,
            "{scenario} {label}: old median {} ({})",
            thousands(ma, decimals),
            list(&a)
        );
        let _ = writeln!(
            o,
            "{scenario} {label}: new median {} ({})",
            thousands(mb, decimals),
            list(&b)
        );
        match (ma, mb) {
            (Some(x), Some(y)) if x > 0.0 => {
                let _ = writeln!(o, "{scenario} {label}: new/old = {:.2}", y / x);
            }
            _ => {
                let _ = writeln!(o, "{scenario} {label}: no result to compare");
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(
        system: &str,
        scenario: &str,
        variant: &str,
        rate: f64,
        p99: f64,
        extra: &str,
    ) -> String {
        format!(
            r#"{{"system":"{system}","scenario":"{scenario}","variant":"{variant}","msgs_per_sec":{rate},"lost":0,"p50_us":1,"p90_us":2,"p99_us":{p99},"p999_us":{p99},"max_us":{p99}{extra}}}"#
        )
    }

    #[test]
    fn median_is_the_middle_or_the_mean_of_the_two_middles() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(Some(1_234_567.8), 0), "1,234,568");
        assert_eq!(thousands(Some(999.0), 0), "999");
        assert_eq!(thousands(Some(1234.56), 1), "1,234.6");
        assert_eq!(thousands(Some(-1000.0), 0), "-1,000");
        assert_eq!(thousands(None, 0), "n/a");
    }

    #[test]
    fn a_goal_is_met_missed_or_not_measured_from_the_medians() {
        let text = [
            line("pubsub", "throughput", "ws", 900.0, 10.0, ""),
            line("nats", "throughput", "core-raw", 1000.0, 10.0, ""),
            line("pubsub", "throughput", "ws", 1300.0, 10.0, ""),
            line("nats", "throughput", "core-raw", 1000.0, 10.0, ""),
            line("pubsub", "throughput", "ws", 1100.0, 10.0, ""),
            line("nats", "throughput", "core-raw", 1000.0, 10.0, ""),
            line("pubsub", "latency", "ws", 5000.0, 120.0, ""),
            line("nats", "latency", "core-raw", 5000.0, 100.0, ""),
            line(
                "pubsub",
                "connections",
                "ws",
                1.0,
                1.0,
                r#","rss_per_conn_kib":6.5"#,
            ),
        ]
        .join("\n");
        let runs = parse_runs(&text).unwrap();
        let out = peers_report(&runs, 3, "a", "b");
        assert!(
            out.contains("| throughput: msgs/s at least NATS's | ≥ 1× | 1.10× | 0.90 1.30 1.10 | met (held in 2 of 3 runs) |"),
            "{out}"
        );
        assert!(
            out.contains("| latency: p99 no higher than NATS's | ≤ 1× | 1.20× | 1.20 | **missed** by 20 % (held in 0 of 1 runs) |"),
            "{out}"
        );
        assert!(
            out.contains("| throughput: msgs/s at least 10× RabbitMQ's | ≥ 10× | not measured |"),
            "{out}"
        );
        assert!(
            out.contains("| connections: server memory per idle subscriber at most 16 KiB | ≤ 16 KiB | 6.5 KiB | 6.5 | met (held in 1 of 1 runs) |"),
            "{out}"
        );
        assert!(
            out.contains("| no message lost by pubsub | 0 | 0 lost | | met |"),
            "{out}"
        );
        assert!(
            out.contains("Ratios (pubsub ws): msgs/s pubsub/nats = 1.10; p99 pubsub/nats = 1.00"),
            "{out}"
        );
    }

    #[test]
    fn pubsub_variants_are_goals_of_their_own_and_losses_are_summed() {
        let text = [
            line("pubsub", "durable", "ws-sqlite", 300.0, 1.0, ""),
            line("rabbitmq", "durable", "amqp-persistent", 100.0, 1.0, ""),
            line("pubsub", "durable", "ws-postgres", 150.0, 1.0, "")
                .replace(r#""lost":0"#, r#""lost":7"#),
            r#"{"system":"nats","scenario":"fanout","error":"exit 1: refused"}"#.to_owned(),
        ]
        .join("\n");
        let out = peers_report(&parse_runs(&text).unwrap(), 1, "a", "b");
        assert!(
            out.contains("| durable (SQLite): confirms/s at least 2× RabbitMQ's | ≥ 2× | 3.00× |"),
            "{out}"
        );
        assert!(
            out.contains("| durable (PostgreSQL): confirms/s at least 2× RabbitMQ's | ≥ 2× | 1.50× | 1.50 | **missed** by 25 %"),
            "{out}"
        );
        assert!(
            out.contains("| no message lost by pubsub | 0 | 7 lost | | **missed** |"),
            "{out}"
        );
        assert!(out.contains("- nats fanout: exit 1: refused"), "{out}");
    }

    #[test]
    fn cpu_per_message_gets_columns_only_where_measured() {
        let cpu = |server: u32, client: u32| {
            format!(r#","server_cpu_ns_per_msg":{server},"client_cpu_ns_per_msg":{client}"#)
        };
        let text = [
            line("pubsub", "throughput", "ws", 900.0, 10.0, &cpu(700, 300)),
            line("pubsub", "throughput", "ws", 1100.0, 10.0, &cpu(900, 200)),
            line(
                "nats",
                "throughput",
                "core-raw",
                1000.0,
                10.0,
                &cpu(1200, 250),
            ),
            // A run that could not read the server's CPU leaves its cell "n/a".
            line("rabbitmq", "throughput", "amqp", 50.0, 10.0, ""),
            line("pubsub", "latency", "ws", 5000.0, 120.0, ""),
        ]
        .join("\n");
        let out = peers_report(&parse_runs(&text).unwrap(), 2, "a", "b");
        assert!(
            out.contains("| max µs | lost (sum) | server CPU ns/msg | client CPU ns/msg |"),
            "{out}"
        );
        assert!(out.contains("| 0 | 800 | 250 |"), "{out}");
        assert!(out.contains("| 0 | 1,200 | 250 |"), "{out}");
        assert!(out.contains("| 0 | n/a | n/a |"), "{out}");
        let latency = out
            .split("### latency")
            .nth(1)
            .and_then(|t| t.lines().find(|l| l.starts_with("| system")))
            .unwrap_or("");
        assert!(!latency.contains("CPU"), "{out}");
        // pubsub's rate is 1.00× NATS's, met: no CPU note.
        assert!(
            out.contains("| throughput: msgs/s at least NATS's | ≥ 1× | 1.00× | 0.90 | met"),
            "{out}"
        );
        let slower = text.replace(r#""msgs_per_sec":1100"#, r#""msgs_per_sec":500"#);
        let out = peers_report(&parse_runs(&slower).unwrap(), 2, "a", "b");
        assert!(
            out.contains("**missed** by 30 % (held in 0 of 1 runs); CPU per message, server + client: pubsub 1,050, nats 1,450 ns |"),
            "{out}"
        );
    }

    #[test]
    fn ab_compares_server_cpu_per_message_where_measured() {
        let run = |variant: &str, rate: f64, ns: u32| {
            line(
                "pubsub",
                "throughput",
                variant,
                rate,
                10.0,
                &format!(r#","server_cpu_ns_per_msg":{ns}"#),
            )
        };
        let text = [run("old", 1000.0, 1000), run("new", 1000.0, 900)].join("\n");
        let out = ab_report(&parse_runs(&text).unwrap());
        assert!(
            out.contains("throughput server CPU ns/msg: new/old = 0.90"),
            "{out}"
        );
        let bare = line("pubsub", "throughput", "old", 1.0, 1.0, "");
        assert!(!ab_report(&parse_runs(&bare).unwrap()).contains("CPU"));
    }

    #[test]
    fn ab_compares_the_medians_of_old_and_new() {
        let text = [
            line("pubsub", "latency", "old", 5000.0, 200.0, ""),
            line("pubsub", "latency", "new", 5000.0, 150.0, ""),
            line("pubsub", "latency", "old", 5000.0, 100.0, ""),
            line("pubsub", "latency", "new", 5000.0, 50.0, ""),
        ]
        .join("\n");
        let out = ab_report(&parse_runs(&text).unwrap());
        assert!(
            out.contains("latency p99 µs: old median 150.0 (100.0 200.0)"),
            "{out}"
        );
        assert!(out.contains("latency p99 µs: new/old = 0.67"), "{out}");
        assert!(out.contains("latency p50 µs: new/old = 1.00"), "{out}");
    }

    #[test]
    fn run_by_run_pairs_by_run_number_when_a_run_failed() {
        let run = |system: &str, variant: &str, rate: f64, k: u32| {
            line(
                system,
                "throughput",
                variant,
                rate,
                10.0,
                &format!(r#","run":{k}"#),
            )
        };
        let text = [
            run("pubsub", "ws", 900.0, 1),
            run("nats", "core-raw", 1000.0, 1),
            r#"{"run":2,"system":"pubsub","scenario":"throughput","error":"exit 1: refused"}"#
                .to_owned(),
            run("nats", "core-raw", 2000.0, 2),
            run("pubsub", "ws", 1300.0, 3),
            run("nats", "core-raw", 1000.0, 3),
        ]
        .join("\n");
        let out = peers_report(&parse_runs(&text).unwrap(), 3, "a", "b");
        // Pubsub's runs 1 and 3 against NATS's 1 and 3, not its 1 and 2.
        assert!(
            out.contains("| throughput: msgs/s at least NATS's | ≥ 1× | 1.10× | 0.90 1.30 | met (held in 1 of 2 runs) |"),
            "{out}"
        );
    }
    #[test]
    fn a_line_that_is_not_an_object_is_an_error_with_its_number() {
        assert_eq!(
            parse_runs("{}\n[1]").unwrap_err(),
            "line 2: not a JSON object"
        );
        assert!(parse_runs("{").unwrap_err().starts_with("line 1:"));
    }
}
