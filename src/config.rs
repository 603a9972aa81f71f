//! Command-line flags with environment fallbacks.
//!
//! Every knob the server has lives here, with its default; `pubsub --help` prints them.
//! The seed's `CHECKPOINT_IN_SECONDS` is honoured when `--checkpoint-ms` is not given.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::shard::pinning::PinMode;

/// Default cap on a message's payload (the contract's 1 MiB).
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;
/// Largest `--max-payload` accepted (1 GiB). A message's text is kept as 32-bit
/// offsets into the frame it came in (see `message::MessageText`), so frames must
/// stay far below 4 GiB; a payload of more than a gigabyte is no message anyway.
pub const MAX_PAYLOAD_LIMIT: usize = 1 << 30;
/// Default cap on concurrent connections per process.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default memory high-water mark for message bodies held in queues (1 GiB).
pub const DEFAULT_MEMORY_HIGH_WATER: usize = 1024 * 1024 * 1024;

/// pubsub: a thread-per-core message broker (HTTP + WebSocket).
#[derive(Debug, Clone, Parser)]
#[command(name = "pubsub", version, about)]
pub struct Config {
    /// Address every shard listens on (SO_REUSEPORT).
    #[arg(long, env = "PUBSUB_LISTEN", default_value = "127.0.0.1:8060")]
    pub listen: SocketAddr,

    /// Number of shards (one pinned executor each); 0 means one per CPU the process may use.
    #[arg(long, env = "PUBSUB_SHARDS", default_value_t = 0)]
    pub shards: usize,

    /// Directory for the embedded SQLite store.
    #[arg(long, env = "PUBSUB_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,

    /// `postgres://…` URL to keep durable state in PostgreSQL instead of SQLite.
    #[arg(long, env = "PUBSUB_DATABASE")]
    pub database: Option<String>,

    /// Longest time a durable change waits before its checkpoint commits (milliseconds).
    #[arg(long, env = "PUBSUB_CHECKPOINT_MS")]
    pub checkpoint_ms: Option<u64>,

    /// Largest accepted message payload, in bytes (at most 1 GiB).
    #[arg(long, env = "PUBSUB_MAX_PAYLOAD", default_value_t = DEFAULT_MAX_PAYLOAD,
          value_parser = parse_max_payload)]
    pub max_payload: usize,

    /// Largest HTTP request head, in bytes (431 past it).
    #[arg(long, env = "PUBSUB_MAX_HEAD", default_value_t = 16 * 1024)]
    pub max_head: usize,

    /// Most connections served at once by the whole process.
    #[arg(long, env = "PUBSUB_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// Bytes of message bodies held in queues past which publishes are refused (503).
    #[arg(long, env = "PUBSUB_MEMORY_HIGH_WATER", default_value_t = DEFAULT_MEMORY_HIGH_WATER)]
    pub memory_high_water: usize,

    /// Seconds of silence after which the server pings a WebSocket; twice that closes it.
    #[arg(long, env = "PUBSUB_WS_IDLE_SECS", default_value_t = 30)]
    pub ws_idle_secs: u64,

    /// Microseconds an idle shard spins before it parks (trades CPU for latency).
    #[arg(long, env = "PUBSUB_SPIN_US", default_value_t = 0)]
    pub spin_us: u64,

    /// Where shards run: `true` pins each shard's executor to one CPU of those the
    /// process may use, `false` lets the kernel run it on any, `adaptive` pins a shard
    /// only while it is busy (see `shard::pinning`).
    #[arg(long, env = "PUBSUB_PIN_SHARDS", default_value_t = PinMode::Always)]
    pub pin_shards: PinMode,

    /// Move a WebSocket connection to its queue's home shard when its first
    /// subscription is to a queue homed elsewhere (deliveries then never cross shards).
    #[arg(long, env = "PUBSUB_MIGRATE_SUBSCRIBERS", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate_subscribers: bool,

    /// Place WebSocket connections that only publish: after its first round of
    /// publishes, a light one moves to the shard of the queues they went to (no hop
    /// between executors on the way to its consumers); one whose reads keep finding
    /// a backlog moves to a shard serving at least two WebSocket connections fewer
    /// (publishing and delivering then run on two cores).
    #[arg(long, env = "PUBSUB_PLACE_PUBLISHERS", default_value_t = true, action = clap::ArgAction::Set)]
    pub place_publishers: bool,

    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, env = "PUBSUB_LOG", default_value = "info")]
    pub log: String,
}

impl Config {
    /// The checkpoint interval: `--checkpoint-ms`, else the seed's `CHECKPOINT_IN_SECONDS`, else 5 ms.
    pub fn checkpoint_ms(&self) -> u64 {
        if let Some(ms) = self.checkpoint_ms {
            return ms;
        }
        std::env::var("CHECKPOINT_IN_SECONDS")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(|s| s.saturating_mul(1000))
            .unwrap_or(5)
    }

    /// The shard count after resolving 0 to the CPUs this process may run on.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            return self.shards;
        }
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }
}

/// `--max-payload`: a byte count from 1 to [`MAX_PAYLOAD_LIMIT`].
fn parse_max_payload(s: &str) -> Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count"))?;
    if n == 0 || n > MAX_PAYLOAD_LIMIT {
        return Err(format!(
            "must be from 1 to {MAX_PAYLOAD_LIMIT} bytes (1 GiB)"
        ));
    }
    Ok(n)
}
