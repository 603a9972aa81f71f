//! The `pubsub` server binary: parses flags, sets up logging, opens the durable store,
//! restores what it holds, and runs the shards until SIGTERM or SIGINT, when the
//! persistence core writes a final checkpoint before the process exits.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;

use pubsub::config::Config;
use pubsub::persist::{self, Backend};
use pubsub::shard::{self, Shared};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long a stop waits for the final checkpoint.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

fn main() {
    match serve() {
        Ok(()) => {}
        Err(e) => {
            eprintln!("pubsub: {e:#}");
            std::process::exit(1);
        }
    }
}

fn serve() -> anyhow::Result<()> {
    let config = Config::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .or_else(|_| tracing_subscriber::EnvFilter::try_new("info"))
        .context("log filter")?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();

    // Before anything else: another server on this port would take us into its
    // SO_REUSEPORT group and split connections with us.
    ensure_port_free(config.listen)?;

    // Block the stop signals in every thread; one thread below waits for them.
    let signals = block_stop_signals();

    let started = Instant::now();
    let backend = Backend::from_config(&config.data_dir, config.database.as_deref())
        .context("choosing the durable store")?;
    let mut store = persist::open(&backend)
        .with_context(|| format!("opening the durable store ({backend})"))?;
    let recovered = store.load().context("reading back durable state")?;
    let shards = config.shard_count();
    let counts = (
        recovered.exchanges.len(),
        recovered.queues.len(),
        recovered.bindings.len(),
        recovered.message_count(),
    );
    let (topology, restored) = shard::rebuild(recovered, shards);
    tracing::info!(
        store = %store.describe(),
        exchanges = counts.0,
        queues = counts.1,
        bindings = counts.2,
        messages = counts.3,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "durable state restored"
    );

    let shared = Arc::new(Shared::new(config, shards, topology));
    {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || wait_for_stop(signals, &shared))
            .context("starting the signal thread")?;
    }
    tracing::info!(shards, listen = %shared.config.listen, "pubsub starting");
    shard::run(shared, store, restored).context("server stopped")?;
    Ok(())
}

/// Refuses to start when something already listens on `addr`. The shards bind with
/// `SO_REUSEPORT`, which a second pubsub run by the same user would share: the kernel
/// would then hand each process part of the connections (a queue declared on one,
/// its binding sent to the other). The check is a connection attempt, not a bind: a
/// bind would also trip over the previous run's connections still closing after a
/// crash or restart. A listener of a process just killed can still answer for a few
/// milliseconds (its io_uring is torn down after the process is gone), so a listener
/// must still be there after [`PORT_PROBE_GRACE`] to count. Port 0 (each shard its
/// own ephemeral port) is left be.
fn ensure_port_free(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let mut target = addr;
    if target.ip().is_unspecified() {
        let local: std::net::IpAddr = if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        };
        target.set_ip(local);
    }
    let deadline = Instant::now() + PORT_PROBE_GRACE;
    while std::net::TcpStream::connect_timeout(&target, PORT_PROBE_TIMEOUT).is_ok() {
        if Instant::now() >= deadline {
            anyhow::bail!("cannot listen on {addr}: another server is already listening there");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// How long the start-up check waits for one connection to `--listen` (loopback or a
/// local address: an answer comes at once if anyone listens).
const PORT_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a listener found on `--listen` may take to go away before the server
/// refuses to start.
const PORT_PROBE_GRACE: Duration = Duration::from_secs(2);

fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame; the signal numbers are
    // valid; pthread_sigmask only reads `set` (the old mask pointer is null).
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

fn wait_for_stop(set: libc::sigset_t, shared: &Shared) {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` holds the signals blocked in every thread; sigwait writes the one
    // received into `sig`, a valid c_int.
    let rc = unsafe { libc::sigwait(&set, &mut sig) };
    if rc != 0 {
        tracing::error!(rc, "sigwait failed; stop signals are ignored");
        return;
    }
    tracing::info!(signal = sig, "stopping: writing a final checkpoint");
    shared.stopping.store(true, Ordering::Release);
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while !shared.flushed.load(Ordering::Acquire) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if !shared.flushed.load(Ordering::Acquire) {
        tracing::error!("final checkpoint did not finish in time");
        std::process::exit(1);
    }
    std::process::exit(0);
}
