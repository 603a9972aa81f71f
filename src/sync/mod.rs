//! The lock-free structures every message crosses.
//!
//! | file | structure | who uses it |
//! | --- | --- | --- |
//! | [`spsc`] | bounded single-producer single-consumer ring | one per ordered pair of shards, and shard ↔ persistence core |
//! | [`mpsc`] | unbounded multi-producer queue, epoch-reclaimed | a queue's inbox: any shard enqueues, the queue's home shard dequeues |
//! | [`snapshot`] | an epoch-swapped immutable value | the routing topology every shard reads without a lock |
//! | [`notify`] | the park/wake flag | lets a consumer park without losing a wake-up from another thread |
//!
//! [`shim`] swaps std's atomics for loom's under `--cfg pubsub_loom`, so the same
//! files are model-checked in `loom-tests/`.

pub mod mpsc;
pub mod notify;
pub mod shim;
pub mod snapshot;
pub mod spsc;
