//! pubsub: a thread-per-core message broker.
//!
//! Clients declare exchanges, queues and bindings over HTTP, publish over HTTP or
//! WebSocket, and receive messages over WebSocket. The wire contract lives in
//! `shared/protocol.md`; `docs/architecture.md` draws the data path.
//!
//! # Map of the modules
//!
//! | module | what it is for |
//! | --- | --- |
//! | [`config`] | command-line flags and environment fallbacks |
//! | [`http`] | I/O-free HTTP/1.1 request parser and response writer |
//! | [`ws`] | I/O-free WebSocket handshake and frame codec (tungstenite's frame header) |
//! | [`command`] | the one `Command` type that HTTP routes and WebSocket frames both decode into |
//! | [`message`] | a published message: raw JSON body as `bytes::Bytes`, shared by reference |
//! | [`routing`] | the topology (exchanges, queues, bindings) as an epoch-swapped snapshot, and topic matching |
//! | [`queue`] | one queue's state on its home shard: ready messages, consumers, unacked, limits |
//! | [`shard`] | the per-core executor: accept loop, connections, rings to the other shards, publisher flow control |
//! | [`sync`] | the lock-free structures: SPSC ring, epoch-reclaimed message queue, snapshot cell, wake-up flag |
//! | [`persist`] | the persistence core: durable state checkpointed to SQLite or PostgreSQL |
//! | [`metrics`] | counters exported in Prometheus text format |
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod command;
pub mod config;
pub mod http;
pub mod message;
pub mod metrics;
pub mod persist;
pub mod queue;
pub mod routing;
pub mod shard;
pub mod sync;
pub mod ws;
