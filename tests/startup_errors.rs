//! The server refuses to start, with a clear message and exit code 1, when its durable
//! store cannot be used: an unwritable data directory, an unreachable database, a
//! schema newer than it knows.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> String {
    std::env::var("PUBSUB_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_pubsub").to_string())
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pubsub-start-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs the server with `args` and returns (exit code, stderr); fails if it is still
/// running after `limit`.
fn run_expecting_exit(args: &[&str], limit: Duration) -> (i32, String) {
    let mut child = Command::new(bin())
        .args(args)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
            return (status.code().unwrap_or(-1), text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("server still running after {limit:?} with {args:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn unwritable_data_dir_is_a_clear_error() {
    let d = temp_dir("file");
    let file = d.join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let data_dir = file.join("data");
    let (code, text) = run_expecting_exit(
        &["--data-dir", data_dir.to_str().unwrap()],
        Duration::from_secs(20),
    );
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("pubsub:"), "no one-line error: {text}");
    assert!(!text.contains("panicked"), "it panicked: {text}");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn unreachable_database_is_a_clear_error() {
    let d = temp_dir("pg");
    // Nothing listens on port 1.
    let (code, text) = run_expecting_exit(
        &[
            "--data-dir",
            d.to_str().unwrap(),
            "--database",
            "postgres://postgres@127.0.0.1:1/test",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("pubsub:"), "no one-line error: {text}");
    assert!(!text.contains("panicked"), "it panicked: {text}");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn newer_schema_version_is_refused() {
    let d = temp_dir("schema");
    let db = d.join("pubsub.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(
            "CREATE TABLE schema_version (version BIGINT PRIMARY KEY, applied_at_ms BIGINT NOT NULL);
             INSERT INTO schema_version VALUES (999, 0);",
        )
        .unwrap();
    }
    let (code, text) = run_expecting_exit(
        &["--data-dir", d.to_str().unwrap()],
        Duration::from_secs(20),
    );
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("999") || text.to_lowercase().contains("schema"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "it panicked: {text}");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn a_max_payload_past_the_limit_is_refused_at_start() {
    for bad in ["0", "1073741825", "99999999999", "lots"] {
        let (code, text) = run_expecting_exit(&["--max-payload", bad], Duration::from_secs(10));
        assert_eq!(code, 2, "--max-payload {bad}: {text}");
        assert!(
            text.contains("--max-payload"),
            "--max-payload {bad}: {text}"
        );
    }
}

/// Whether something accepts connections on `port`.
fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn a_second_server_on_a_taken_port_refuses_to_start() {
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let (d1, d2) = (temp_dir("port-a"), temp_dir("port-b"));
    // Each on its own data directory, so only the port is shared.
    let serve = |dir: &std::path::Path| {
        Command::new(bin())
            .args([
                "--listen",
                &addr,
                "--log",
                "warn",
                "--data-dir",
                dir.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut first = serve(&d1);
    common::wait_until(
        "the first server to listen",
        Duration::from_secs(20),
        || listening(port),
    );
    // Without the check the second one would join the first one's SO_REUSEPORT group.
    let mut second = serve(&d2);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = first.kill();
            panic!("a second server started on a port the first one serves");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = second.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains(&addr) && text.contains("already listening"),
        "{text}"
    );
    // The first one still serves.
    assert!(listening(port));
    assert!(first.try_wait().unwrap().is_none(), "the first server died");
    let _ = first.kill();
    let _ = first.wait();
    let _ = std::fs::remove_dir_all(d1);
    let _ = std::fs::remove_dir_all(d2);
}
