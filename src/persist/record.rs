//! The vocabulary between the shards and the persistence thread.
//!
//! A shard describes every change to durable state as a [`Record`]; the
//! [`super::Checkpointer`] coalesces them into a batch and a [`super::Store`] writes the batch in
//! one transaction. On start, [`super::Store::load`] returns a [`Recovered`] snapshot that the
//! broker turns back into exchanges, queues, bindings and queued messages.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

/// One change to durable state, in the order the shard made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A durable exchange was declared (`kind` is "direct", "fanout" or "topic").
    ExchangeDeclared {
        /// Exchange name.
        name: String,
        /// Exchange type.
        kind: String,
    },
    /// A durable exchange was deleted; its bindings go with it.
    ExchangeDeleted {
        /// Exchange name.
        name: String,
    },
    /// A durable queue was declared (or re-declared with the same arguments).
    QueueDeclared {
        /// Queue name.
        name: String,
        /// Its arguments.
        args: QueueArgs,
    },
    /// A durable queue was deleted; its bindings and messages go with it.
    QueueDeleted {
        /// Queue name.
        name: String,
    },
    /// A binding between a durable exchange and a durable queue was added.
    Bound {
        /// Source exchange.
        exchange: String,
        /// Destination queue.
        queue: String,
        /// Binding key.
        key: String,
    },
    /// A binding was removed.
    Unbound {
        /// Source exchange.
        exchange: String,
        /// Destination queue.
        queue: String,
        /// Binding key.
        key: String,
    },
    /// A message was enqueued on a durable queue at position `seq`.
    Enqueued {
        /// Queue name.
        queue: Arc<str>,
        /// Per-queue sequence number, strictly increasing, assigned by the home shard.
        seq: u64,
        /// The message.
        msg: StoredMessage,
        /// Already delivered at least once. Shards push `false`; the checkpointer sets it when
        /// it folds a [`Record::Delivered`] of the same batch into the insert.
        delivered: bool,
    },
    /// The message was handed to a consumer at least once: after a restart it comes back with
    /// `redelivered: true`.
    Delivered {
        /// Queue name.
        queue: Arc<str>,
        /// The message's sequence number.
        seq: u64,
    },
    /// The message left the queue: acked, dead-lettered, expired, purged or dropped.
    Removed {
        /// Queue name.
        queue: Arc<str>,
        /// The message's sequence number.
        seq: u64,
    },
}

impl Record {
    /// A fresh [`Record::Enqueued`] (not yet delivered), the form shards push.
    pub fn enqueued(queue: Arc<str>, seq: u64, msg: StoredMessage) -> Record {
        Record::Enqueued {
            queue,
            seq,
            msg,
            delivered: false,
        }
    }

    /// Approximate memory held by this record, for backpressure accounting.
    pub fn approx_bytes(&self) -> usize {
        const OVERHEAD: usize = 64;
        OVERHEAD
            + match self {
                Record::ExchangeDeclared { name, kind } => name.len() + kind.len(),
                Record::ExchangeDeleted { name } | Record::QueueDeleted { name } => name.len(),
                Record::QueueDeclared { name, args } => {
                    name.len()
                        + args.overflow.as_ref().map_or(0, String::len)
                        + args.dead_letter_exchange.as_ref().map_or(0, String::len)
                }
                Record::Bound {
                    exchange,
                    queue,
                    key,
                }
                | Record::Unbound {
                    exchange,
                    queue,
                    key,
                } => exchange.len() + queue.len() + key.len(),
                Record::Enqueued { msg, .. } => msg.approx_bytes(),
                Record::Delivered { .. } | Record::Removed { .. } => 0,
            }
    }
}

/// The arguments of a durable queue, as declared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueArgs {
    /// `max_length`.
    pub max_length: Option<u64>,
    /// `message_ttl_ms`.
    pub message_ttl_ms: Option<u64>,
    /// `overflow`: "reject_publish" or "drop_head".
    pub overflow: Option<String>,
    /// `dead_letter_exchange`.
    pub dead_letter_exchange: Option<String>,
}

/// A message as stored: everything needed to deliver it again after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// The unique id returned to the publisher.
    pub id: String,
    /// The exchange it was published to.
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// The payload: raw JSON, stored and returned byte for byte.
    pub body: Bytes,
    /// The headers: a raw JSON object, byte for byte, if any.
    pub headers: Option<Bytes>,
    /// Publish time, milliseconds since the Unix epoch.
    pub published_at_ms: u64,
    /// Expiry time, milliseconds since the Unix epoch, if it has a TTL.
    pub expires_at_ms: Option<u64>,
}

impl StoredMessage {
    /// Approximate memory held by this message.
    pub fn approx_bytes(&self) -> usize {
        self.id.len()
            + self.exchange.len()
            + self.routing_key.len()
            + self.body.len()
            + self.headers.as_ref().map_or(0, Bytes::len)
            + 32
    }
}

/// Everything durable, as read back on start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// `(name, kind)`, sorted by name.
    pub exchanges: Vec<(String, String)>,
    /// `(name, args)`, sorted by name.
    pub queues: Vec<(String, QueueArgs)>,
    /// `(exchange, queue, key)`, sorted.
    pub bindings: Vec<(String, String, String)>,
    /// Per queue (sorted by name, only queues present in `queues` and only those with
    /// messages), its messages in `seq` order.
    pub messages: Vec<(String, Vec<RecoveredMessage>)>,
}

impl Recovered {
    /// Total number of recovered messages.
    pub fn message_count(&self) -> usize {
        self.messages.iter().map(|(_, m)| m.len()).sum()
    }
}

/// One message read back on start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredMessage {
    /// Its sequence number in its queue; new messages must get larger ones.
    pub seq: u64,
    /// The message.
    pub msg: StoredMessage,
    /// It had been delivered at least once: restore it with `redelivered: true`.
    pub delivered: bool,
}

/// What one [`super::Store::commit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommitStats {
    /// Records in the batch.
    pub records: usize,
    /// Rows inserted, updated or deleted.
    pub written: usize,
    /// Wall time of the whole transaction, commit included.
    pub elapsed: Duration,
}
