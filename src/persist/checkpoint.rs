//! Group commit: the pure batching logic between the shards and [`super::Store::commit`].
//!
//! The persistence thread [`Checkpointer::push`]es every record the shards send, with the
//! [`Ticket`] of a confirm that waits on it, and once per checkpoint takes a [`Batch`]: the
//! records to write in one transaction and the tickets to answer once it committed. While
//! records wait, the checkpointer coalesces them so that short-lived state never reaches disk:
//!
//! * an `Enqueued` followed by a `Removed` of the same (queue, seq) writes neither (a message
//!   acked before its checkpoint is never written);
//! * a `Delivered` of a message enqueued in the same batch folds into the insert
//!   (`delivered = true`), and a repeated `Delivered` is written once;
//! * a `Removed` drops a pending `Delivered` of the same message;
//! * `QueueDeleted` drops every pending record of that queue (messages, bindings, its
//!   declaration); `ExchangeDeleted` drops pending bindings and declarations of that exchange.
//!   The delete itself is always written, since the object may already be on disk.
//!
//! Tickets are never dropped: a ticket whose record was coalesced away is answered after the
//! batch's commit like any other (if the batch has no records, right away). It does no I/O and
//! has no clock: the caller decides when a checkpoint is due and uses [`Checkpointer::pending`]
//! and [`Checkpointer::is_over_limit`] for backpressure.

use std::collections::HashMap;
use std::sync::Arc;

use super::record::Record;

/// Default bound on the bytes of records waiting for a checkpoint. Above it, the broker stops
/// accepting durable publishes (503) until a commit drains the backlog.
pub const MAX_PENDING_BYTES: usize = 64 * 1024 * 1024;

/// An opaque token the shard attaches to a record whose commit someone waits for (a publish
/// `confirm`, a durable declare). The checkpointer only hands it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// What is waiting for the next checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pending {
    /// Records that will be written.
    pub records: usize,
    /// Their approximate size in memory.
    pub bytes: usize,
    /// Tickets waiting.
    pub tickets: usize,
}

/// One checkpoint's work.
#[derive(Debug, Default)]
pub struct Batch {
    /// What to write, in order, in one transaction.
    pub records: Vec<Record>,
    /// Whom to answer once the transaction committed (or failed).
    pub tickets: Vec<Ticket>,
    /// Records pushed since the last batch that coalescing removed.
    pub coalesced: usize,
}

impl Batch {
    /// Nothing to write and nobody to answer.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.tickets.is_empty()
    }
}

/// Where the pending records of one message are.
#[derive(Debug, Default, Clone, Copy)]
struct MsgSlots {
    enqueued: Option<usize>,
    delivered: Option<usize>,
}

/// Accumulates records between checkpoints and coalesces them. See the module docs.
#[derive(Debug)]
pub struct Checkpointer {
    slots: Vec<Option<Record>>,
    live: usize,
    bytes: usize,
    index: HashMap<(Arc<str>, u64), MsgSlots>,
    tickets: Vec<Ticket>,
    coalesced: usize,
    limit: usize,
}

impl Default for Checkpointer {
    fn default() -> Self {
        Checkpointer::new()
    }
}

impl Checkpointer {
    /// An empty checkpointer with the [`MAX_PENDING_BYTES`] limit.
    pub fn new() -> Checkpointer {
        Checkpointer::with_limit(MAX_PENDING_BYTES)
    }

    /// An empty checkpointer whose [`Checkpointer::is_over_limit`] trips at `limit` bytes.
    pub fn with_limit(limit: usize) -> Checkpointer {
        Checkpointer {
            slots: Vec::new(),
            live: 0,
            bytes: 0,
            index: HashMap::new(),
            tickets: Vec::new(),
            coalesced: 0,
            limit,
        }
    }

    /// Adds a record (and the ticket waiting on it) to the next batch, coalescing.
    pub fn push(&mut self, rec: Record, ticket: Option<Ticket>) {
        if let Some(t) = ticket {
            self.tickets.push(t);
        }
        self.push_record(rec);
    }

    /// Adds a ticket with no record (e.g. a confirm for a message that reached only
    /// non-durable queues but must be ordered after earlier durable work).
    pub fn push_ticket(&mut self, ticket: Ticket) {
        self.tickets.push(ticket);
    }

    /// What waits for the next checkpoint.
    pub fn pending(&self) -> Pending {
        Pending {
            records: self.live,
            bytes: self.bytes,
            tickets: self.tickets.len(),
        }
    }

    /// True when the pending bytes reached the limit: durable publishes should wait.
    pub fn is_over_limit(&self) -> bool {
        self.bytes >= self.limit
    }

    /// True when there is nothing to write and nobody to answer.
    pub fn is_empty(&self) -> bool {
        self.live == 0 && self.tickets.is_empty()
    }

    /// Takes everything pending as one batch and starts a new one.
    pub fn take_batch(&mut self) -> Batch {
        let records: Vec<Record> = self.slots.drain(..).flatten().collect();
        self.index.clear();
        self.live = 0;
        self.bytes = 0;
        Batch {
            records,
            tickets: std::mem::take(&mut self.tickets),
            coalesced: std::mem::take(&mut self.coalesced),
        }
    }

    /// Gives back the records of a batch whose commit failed, ahead of everything pushed
    /// since, so the next batch retries them in their original order. The caller has
    /// answered (with an error) the failed batch's tickets; they are not restored.
    ///
    /// Restored message records are not coalesced with later ones: a failed commit may in
    /// fact have committed (PostgreSQL acknowledgement lost), so a later `Removed` of a
    /// restored `Enqueued` is written rather than cancelled; the replayed insert is ignored
    /// by the store if the row already exists.
    pub fn restore(&mut self, failed: Vec<Record>) {
        let offset = failed.len();
        if offset == 0 {
            return;
        }
        for r in &failed {
            self.live += 1;
            self.bytes += r.approx_bytes();
        }
        let later = std::mem::take(&mut self.slots);
        self.slots = failed.into_iter().map(Some).collect();
        self.slots.extend(later);
        for slots in self.index.values_mut() {
            slots.enqueued = slots.enqueued.map(|i| i + offset);
            slots.delivered = slots.delivered.map(|i| i + offset);
        }
    }

    fn append(&mut self, rec: Record) -> usize {
        self.live += 1;
        self.bytes += rec.approx_bytes();
        self.slots.push(Some(rec));
        self.slots.len() - 1
    }

    fn tombstone(&mut self, i: usize) {
        if let Some(rec) = self.slots.get_mut(i).and_then(Option::take) {
            self.live -= 1;
            self.bytes = self.bytes.saturating_sub(rec.approx_bytes());
            self.coalesced += 1;
        }
    }

    /// Tombstones every pending record for which `pred` holds.
    fn drop_where(&mut self, pred: impl Fn(&Record) -> bool) {
        for i in 0..self.slots.len() {
            if self
                .slots
                .get(i)
                .and_then(Option::as_ref)
                .is_some_and(&pred)
            {
                self.tombstone(i);
            }
        }
    }

    fn push_record(&mut self, rec: Record) {
        match rec {
            Record::Enqueued { ref queue, seq, .. } => {
                let key = (Arc::clone(queue), seq);
                let i = self.append(rec);
                self.index.entry(key).or_default().enqueued = Some(i);
            }
            Record::Delivered { ref queue, seq } => {
                let key = (Arc::clone(queue), seq);
                let slots = self.index.get(&key).copied().unwrap_or_default();
                if let Some(i) = slots.enqueued {
                    if let Some(Some(Record::Enqueued { delivered, .. })) = self.slots.get_mut(i) {
                        *delivered = true;
                    }
                    self.coalesced += 1;
                } else if slots.delivered.is_some() {
                    self.coalesced += 1;
                } else {
                    let i = self.append(rec);
                    self.index.entry(key).or_default().delivered = Some(i);
                }
            }
            Record::Removed { ref queue, seq } => {
                let key = (Arc::clone(queue), seq);
                let slots = self.index.remove(&key).unwrap_or_default();
                if let Some(d) = slots.delivered {
                    self.tombstone(d);
                }
                if let Some(e) = slots.enqueued {
                    self.tombstone(e);
                    self.coalesced += 1; // the removal itself
                } else {
                    self.append(rec);
                }
            }
            Record::QueueDeleted { ref name } => {
                let q: &str = name;
                self.drop_where(|r| match r {
                    Record::Enqueued { queue, .. }
                    | Record::Delivered { queue, .. }
                    | Record::Removed { queue, .. } => &**queue == q,
                    Record::Bound { queue, .. } | Record::Unbound { queue, .. } => queue == q,
                    Record::QueueDeclared { name, .. } | Record::QueueDeleted { name } => name == q,
                    _ => false,
                });
                self.index.retain(|(queue, _), _| &**queue != q);
                self.append(rec);
            }
            Record::ExchangeDeleted { ref name } => {
                let x: &str = name;
                self.drop_where(|r| match r {
                    Record::Bound { exchange, .. } | Record::Unbound { exchange, .. } => {
                        exchange == x
                    }
                    Record::ExchangeDeclared { name, .. } | Record::ExchangeDeleted { name } => {
                        name == x
                    }
                    _ => false,
                });
                self.append(rec);
            }
            other => {
                self.append(other);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::record::{QueueArgs, StoredMessage};
    use bytes::Bytes;

    fn msg(id: &str) -> StoredMessage {
        StoredMessage {
            id: id.into(),
            exchange: "x".into(),
            routing_key: "k".into(),
            body: Bytes::from(format!("{{\"id\":\"{id}\"}}")),
            headers: None,
            published_at_ms: 1,
            expires_at_ms: None,
        }
    }

    fn enq(q: &str, seq: u64) -> Record {
        Record::enqueued(q.into(), seq, msg(&format!("{q}-{seq}")))
    }

    fn removed(q: &str, seq: u64) -> Record {
        Record::Removed {
            queue: q.into(),
            seq,
        }
    }

    fn delivered(q: &str, seq: u64) -> Record {
        Record::Delivered {
            queue: q.into(),
            seq,
        }
    }

    fn is_enq(r: &Record, q: &str, s: u64, d: bool) -> bool {
        matches!(r, Record::Enqueued { queue, seq, delivered, .. }
            if &**queue == q && *seq == s && *delivered == d)
    }

    #[test]
    fn enqueue_then_remove_writes_neither_but_keeps_tickets() {
        let mut c = Checkpointer::new();
        c.push(enq("q", 1), Some(Ticket(7)));
        c.push(enq("q", 2), None);
        c.push(removed("q", 1), Some(Ticket(8)));
        let b = c.take_batch();
        assert_eq!(b.records.len(), 1);
        assert!(is_enq(&b.records[0], "q", 2, false));
        assert_eq!(b.tickets, vec![Ticket(7), Ticket(8)]);
        assert_eq!(b.coalesced, 2);
    }

    #[test]
    fn removal_of_message_from_an_earlier_batch_is_written() {
        let mut c = Checkpointer::new();
        c.push(enq("q", 1), None);
        let _ = c.take_batch();
        c.push(removed("q", 1), None);
        let b = c.take_batch();
        assert_eq!(b.records, vec![removed("q", 1)]);
        assert_eq!(b.coalesced, 0);
    }

    #[test]
    fn delivered_folds_into_pending_insert() {
        let mut c = Checkpointer::new();
        c.push(enq("q", 1), None);
        c.push(delivered("q", 1), None);
        c.push(delivered("q", 1), None);
        let b = c.take_batch();
        assert_eq!(b.records.len(), 1);
        assert!(is_enq(&b.records[0], "q", 1, true));
        assert_eq!(b.coalesced, 2);
    }

    #[test]
    fn delivered_of_older_message_is_written_once_and_dropped_by_removal() {
        let mut c = Checkpointer::new();
        c.push(delivered("q", 1), None);
        c.push(delivered("q", 1), None);
        c.push(delivered("q", 2), None);
        let b = c.take_batch();
        assert_eq!(b.records, vec![delivered("q", 1), delivered("q", 2)]);

        c.push(delivered("q", 3), None);
        c.push(removed("q", 3), None);
        let b = c.take_batch();
        assert_eq!(b.records, vec![removed("q", 3)]);
    }

    #[test]
    fn same_seq_on_other_queue_is_not_coalesced() {
        let mut c = Checkpointer::new();
        c.push(enq("a", 1), None);
        c.push(removed("b", 1), None);
        c.push(delivered("b", 1), None);
        let b = c.take_batch();
        assert_eq!(b.records.len(), 3);
        assert!(is_enq(&b.records[0], "a", 1, false));
    }

    #[test]
    fn queue_deleted_drops_that_queues_pending_records() {
        let mut c = Checkpointer::new();
        let decl = |n: &str| Record::QueueDeclared {
            name: n.into(),
            args: QueueArgs::default(),
        };
        let bind = |q: &str| Record::Bound {
            exchange: "x".into(),
            queue: q.into(),
            key: "k".into(),
        };
        c.push(decl("q"), None);
        c.push(bind("q"), None);
        c.push(bind("other"), None);
        c.push(enq("q", 1), None);
        c.push(enq("other", 1), None);
        c.push(delivered("q", 0), None);
        c.push(removed("q", 0), None);
        c.push(Record::QueueDeleted { name: "q".into() }, Some(Ticket(1)));
        // Re-declared after the delete: kept, and its messages coalesce afresh.
        c.push(decl("q"), None);
        c.push(enq("q", 1), None);
        c.push(delivered("q", 1), None);
        let b = c.take_batch();
        assert_eq!(b.records.len(), 5, "{:#?}", b.records);
        assert_eq!(b.records[0], bind("other"));
        assert!(is_enq(&b.records[1], "other", 1, false));
        assert_eq!(b.records[2], Record::QueueDeleted { name: "q".into() });
        assert_eq!(b.records[3], decl("q"));
        assert!(is_enq(&b.records[4], "q", 1, true));
        assert_eq!(b.tickets, vec![Ticket(1)]);
        assert_eq!(b.records.len() + b.coalesced, 11);
    }

    #[test]
    fn exchange_deleted_drops_its_pending_bindings() {
        let mut c = Checkpointer::new();
        c.push(
            Record::ExchangeDeclared {
                name: "x".into(),
                kind: "topic".into(),
            },
            None,
        );
        c.push(
            Record::Bound {
                exchange: "x".into(),
                queue: "q".into(),
                key: "#".into(),
            },
            None,
        );
        c.push(
            Record::Bound {
                exchange: "y".into(),
                queue: "q".into(),
                key: "".into(),
            },
            None,
        );
        c.push(Record::ExchangeDeleted { name: "x".into() }, None);
        let b = c.take_batch();
        assert_eq!(
            b.records,
            vec![
                Record::Bound {
                    exchange: "y".into(),
                    queue: "q".into(),
                    key: "".into(),
                },
                Record::ExchangeDeleted { name: "x".into() },
            ]
        );
    }

    #[test]
    fn pending_counts_bytes_and_limit() {
        let mut c = Checkpointer::with_limit(300);
        assert!(c.is_empty());
        assert_eq!(c.pending(), Pending::default());
        c.push(enq("q", 1), Some(Ticket(1)));
        let one = c.pending();
        assert_eq!(one.records, 1);
        assert_eq!(one.tickets, 1);
        assert!(one.bytes > 0);
        assert!(!c.is_over_limit());
        for s in 2..=5 {
            c.push(enq("q", s), None);
        }
        assert!(c.is_over_limit(), "{:?}", c.pending());
        // Acks shrink the backlog again.
        for s in 1..=5 {
            c.push(removed("q", s), None);
        }
        assert_eq!(c.pending().records, 0);
        assert_eq!(c.pending().bytes, 0);
        assert!(!c.is_over_limit());
        assert!(!c.is_empty(), "the ticket still waits");
        let b = c.take_batch();
        assert!(b.records.is_empty());
        assert_eq!(b.tickets, vec![Ticket(1)]);
        assert!(c.is_empty());
        assert!(c.take_batch().is_empty());
    }

    #[test]
    fn restore_puts_failed_records_first_and_does_not_cancel_them() {
        let mut c = Checkpointer::new();
        c.push(enq("q", 1), Some(Ticket(1)));
        c.push(enq("q", 2), None);
        let failed = c.take_batch();
        c.push(enq("q", 3), Some(Ticket(2)));
        c.push(removed("q", 1), None);
        c.push(delivered("q", 3), None);
        c.restore(failed.records);
        assert_eq!(c.pending().records, 4);
        c.push(removed("q", 3), None);
        let b = c.take_batch();
        assert_eq!(b.records.len(), 3, "{:#?}", b.records);
        assert!(is_enq(&b.records[0], "q", 1, false));
        assert!(is_enq(&b.records[1], "q", 2, false));
        assert_eq!(b.records[2], removed("q", 1));
        assert_eq!(b.tickets, vec![Ticket(2)]);
    }

    #[test]
    fn unrelated_records_keep_their_order() {
        let mut c = Checkpointer::new();
        let recs = vec![
            Record::ExchangeDeclared {
                name: "x".into(),
                kind: "direct".into(),
            },
            Record::QueueDeclared {
                name: "q".into(),
                args: QueueArgs::default(),
            },
            Record::Bound {
                exchange: "x".into(),
                queue: "q".into(),
                key: "k".into(),
            },
            enq("q", 1),
            Record::Unbound {
                exchange: "x".into(),
                queue: "q".into(),
                key: "k".into(),
            },
            enq("q", 2),
        ];
        for r in recs.clone() {
            c.push(r, None);
        }
        assert_eq!(c.take_batch().records, recs);
    }
}
