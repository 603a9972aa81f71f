//! One queue's state on its home shard.
//!
//! Only the queue's home shard touches a [`QueueState`], so nothing here is shared or
//! locked. Routers on any shard push messages into the queue's lock-free inbox (see
//! [`crate::routing::QueueHandle`]); the home shard moves them into `ready`, hands them
//! to consumers round robin among those with credit, and tracks what each consumer has
//! not settled yet. Everything the queue wants done elsewhere (a delivery to another
//! shard's connection, a dead-lettered message to route, a record for the persistence
//! core, a confirm to answer) is written into an [`Effects`] buffer that the shard
//! carries out, so this file is plain logic that unit tests drive directly.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::command::{AckMode, Overflow};
use crate::message::Message;
use crate::routing::{QueueHandle, Ticket};

/// Most messages an auto-ack subscription may have in flight between the queue and
/// its socket: the queue, not the socket buffer, holds the rest.
pub const AUTO_ACK_WINDOW: usize = 1024;
/// Cap applied to `prefetch: 0` (no limit requested).
pub const UNLIMITED_PREFETCH: usize = 65_536;

/// A consumer: a subscription on some shard's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConsumerId {
    /// Shard of the connection.
    pub shard: usize,
    /// Connection number on that shard.
    pub conn: u64,
    /// Subscription number on that connection.
    pub sub: u64,
}

/// A message in a queue.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The message, shared with the other queues it went to.
    pub msg: Arc<Message>,
    /// Position in this queue (persistence key).
    pub seq: u64,
    /// Delivered before.
    pub redelivered: bool,
    /// When it expires in this queue.
    pub expires_at: Option<u64>,
}

/// A message handed to a consumer.
#[derive(Debug)]
pub struct Delivery {
    /// Consumer-local delivery sequence (the connection maps it to a delivery tag).
    pub dseq: u64,
    /// The message.
    pub entry: Entry,
}

/// A durable change the persistence core must record.
#[derive(Debug)]
pub enum PersistOp {
    /// A persistent message entered a durable queue.
    Enqueued {
        /// Queue position.
        seq: u64,
        /// The message.
        msg: Arc<Message>,
        /// Confirm to answer after the commit.
        ticket: Option<Ticket>,
    },
    /// Delivered for the first time (restored as redelivered after a crash).
    Delivered {
        /// Queue position.
        seq: u64,
    },
    /// Gone for good: acked, dead-lettered, expired, purged or dropped.
    Removed {
        /// Queue position.
        seq: u64,
    },
}

/// What a queue operation asks the shard to do next.
#[derive(Debug, Default)]
pub struct Effects {
    /// Messages for consumers, in order.
    pub deliveries: Vec<(ConsumerId, Delivery)>,
    /// Messages to route to the queue's dead-letter exchange.
    pub dead: Vec<Arc<Message>>,
    /// Records for the persistence core.
    pub persist: Vec<PersistOp>,
    /// Confirms to answer now (nothing to put on disk).
    pub settle: Vec<Ticket>,
    /// Consumers whose subscription ended because the queue went away.
    pub cancelled: Vec<ConsumerId>,
    /// Bytes released from the memory accounting.
    pub freed: usize,
}

impl Effects {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.deliveries.is_empty()
            && self.dead.is_empty()
            && self.persist.is_empty()
            && self.settle.is_empty()
            && self.cancelled.is_empty()
            && self.freed == 0
    }
}

/// How [`QueueState::finish`] ends the deliveries it takes.
#[derive(Clone, Copy)]
enum Outcome {
    /// Acked or written: gone for good.
    Settle,
    /// Back to the head of the queue; `mark` sets `redelivered`.
    Requeue { mark: bool },
    /// Rejected: dead-lettered or dropped.
    Discard,
}

/// The deliveries an `ACK`/`NACK` names: one, or all up to `dseq`.
fn take_acked(u: &mut Unacked, dseq: u64, through: bool, out: &mut Vec<Entry>) {
    if through {
        u.take_through(dseq, out);
    } else if let Some(e) = u.take(dseq) {
        out.push(e);
    }
}

/// Outstanding deliveries of one consumer, indexed by delivery sequence.
#[derive(Debug, Default)]
struct Unacked {
    base: u64,
    slots: VecDeque<Option<Entry>>,
    live: usize,
    /// Deliveries with a sequence below this have been looked at by
    /// [`Unacked::copy_waiting`].
    looked_below: u64,
}

/// What one pass of [`QueueState::compact`] may still do.
struct CopyBudget {
    looks: usize,
    copies: usize,
}

impl CopyBudget {
    /// Looks at `e`, published before `before_ms`, and copies it out of its frame's
    /// buffer if it still shares one. False when the pass must stop here: `e` is too
    /// young (so are the ones after it) or the budget is spent.
    fn visit(&mut self, e: &mut Entry, before_ms: u64) -> bool {
        if self.looks == 0 || e.msg.published_at >= before_ms {
            return false;
        }
        if e.msg.shares_buffer() {
            if self.copies == 0 {
                return false;
            }
            e.msg = Arc::new(e.msg.compacted());
            self.copies -= 1;
        }
        self.looks -= 1;
        true
    }
}

impl Unacked {
    /// Copies deliveries held since before `before_ms` out of their frames' buffers
    /// (see [`QueueState::compact`]), going on from where the last pass stopped.
    fn copy_waiting(&mut self, before_ms: u64, budget: &mut CopyBudget) {
        let from =
            usize::try_from(self.looked_below.saturating_sub(self.base)).unwrap_or(usize::MAX);
        for (i, slot) in self.slots.iter_mut().enumerate().skip(from) {
            if let Some(e) = slot {
                if !budget.visit(e, before_ms) {
                    return;
                }
            }
            self.looked_below = self.base + i as u64 + 1;
        }
    }

    /// True when some delivery has not been looked at yet.
    fn may_copy(&self) -> bool {
        self.base + (self.slots.len() as u64) > self.looked_below
    }

    fn push(&mut self, dseq: u64, e: Entry) {
        if self.slots.is_empty() {
            self.base = dseq;
        }
        self.slots.push_back(Some(e));
        self.live += 1;
    }
    fn take(&mut self, dseq: u64) -> Option<Entry> {
        let i = usize::try_from(dseq.checked_sub(self.base)?).ok()?;
        let e = self.slots.get_mut(i)?.take()?;
        self.live -= 1;
        self.compact();
        Some(e)
    }
    /// Takes every outstanding entry with a sequence up to `dseq`, in order.
    fn take_through(&mut self, dseq: u64, out: &mut Vec<Entry>) {
        while let Some(front) = self.slots.front() {
            if self.base > dseq {
                break;
            }
            if front.is_some() {
                if let Some(Some(e)) = self.slots.pop_front() {
                    self.live -= 1;
                    out.push(e);
                }
            } else {
                self.slots.pop_front();
            }
            self.base += 1;
        }
        self.compact();
    }
    /// Takes the oldest `n` outstanding entries.
    fn take_oldest(&mut self, mut n: usize, out: &mut Vec<Entry>) {
        while n > 0 {
            match self.slots.pop_front() {
                None => break,
                Some(slot) => {
                    self.base += 1;
                    if let Some(e) = slot {
                        self.live -= 1;
                        n -= 1;
                        out.push(e);
                    }
                }
            }
        }
        self.compact();
    }
    fn drain_all(&mut self, out: &mut Vec<Entry>) {
        for e in self.slots.drain(..).flatten() {
            out.push(e);
        }
        self.live = 0;
    }
    fn compact(&mut self) {
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.base += 1;
        }
    }
}

#[derive(Debug)]
struct Consumer {
    id: ConsumerId,
    window: usize,
    active: bool,
    next_dseq: u64,
    unacked: Unacked,
}

impl Consumer {
    fn has_credit(&self) -> bool {
        self.active && self.unacked.live < self.window
    }
}

/// A queue's ready messages, oldest first, with how many at the head
/// [`QueueState::compact`] has looked at. Every change at the head keeps that count
/// right (a message taken off the head takes one off it; one put back before them
/// starts it again), so a pass goes on where the last one stopped without walking a
/// long queue again. Reading goes through `Deref`; changes only through these methods.
#[derive(Default)]
struct Ready {
    entries: VecDeque<Entry>,
    looked: usize,
}

impl std::ops::Deref for Ready {
    type Target = VecDeque<Entry>;
    fn deref(&self) -> &VecDeque<Entry> {
        &self.entries
    }
}

impl Ready {
    fn push_back(&mut self, e: Entry) {
        self.entries.push_back(e);
    }

    fn pop_front(&mut self) -> Option<Entry> {
        let e = self.entries.pop_front()?;
        self.looked = self.looked.saturating_sub(1);
        Some(e)
    }

    /// Puts `e` back at the head (a requeue): the messages looked at are no longer
    /// the head, so the next pass looks from the start again.
    fn push_front(&mut self, e: Entry) {
        self.entries.push_front(e);
        self.looked = 0;
    }

    fn drain(&mut self) -> std::collections::vec_deque::Drain<'_, Entry> {
        self.looked = 0;
        self.entries.drain(..)
    }

    /// Copies, within `budget`, the messages after the looked-at head that were
    /// published before `before_ms` ([`CopyBudget::visit`]).
    fn copy_waiting(&mut self, before_ms: u64, budget: &mut CopyBudget) {
        for e in self.entries.iter_mut().skip(self.looked) {
            if !budget.visit(e, before_ms) {
                return;
            }
            self.looked += 1;
        }
    }

    /// True when some message has not been looked at yet.
    fn may_copy(&self) -> bool {
        self.looked < self.entries.len()
    }
}

/// A queue's state on its home shard.
pub struct QueueState {
    handle: Arc<QueueHandle>,
    ready: Ready,
    consumers: Vec<Consumer>,
    rr: usize,
    next_seq: u64,
    unacked_total: usize,
    scratch: Vec<Entry>,
}

impl QueueState {
    /// Fresh state for a queue; `next_seq` continues after restored messages.
    pub fn new(handle: Arc<QueueHandle>, next_seq: u64) -> Self {
        Self {
            handle,
            ready: Ready::default(),
            consumers: Vec::new(),
            rr: 0,
            next_seq,
            unacked_total: 0,
            scratch: Vec::new(),
        }
    }

    /// The queue this state belongs to.
    pub fn handle(&self) -> &Arc<QueueHandle> {
        &self.handle
    }

    fn durable_msg(&self, msg: &Message) -> bool {
        self.handle.spec.durable && msg.persistent
    }

    /// Publishes the unacked and consumer counts for routers and `GET /queues`,
    /// writing the shared line only when a value changed.
    fn publish_counts(&self) {
        let counts = &self.handle.counts;
        if counts.unacked.load(Ordering::Relaxed) != self.unacked_total {
            counts.unacked.store(self.unacked_total, Ordering::Relaxed);
        }
        let active = self.consumers.iter().filter(|c| c.active).count();
        if counts.consumers.load(Ordering::Relaxed) != active {
            counts.consumers.store(active, Ordering::Relaxed);
        }
    }

    /// Puts a restored message back (recovery): no persistence record, keeps its seq.
    pub fn restore(&mut self, msg: Arc<Message>, seq: u64, redelivered: bool, now: u64) {
        // The queue's TTL runs from when the message entered it, not from the restart.
        let expires_at = self.expiry_for(&msg, msg.published_at.min(now));
        self.next_seq = self.next_seq.max(seq + 1);
        self.handle.add_ready(1);
        self.ready.push_back(Entry {
            msg,
            seq,
            redelivered,
            expires_at,
        });
    }

    fn expiry_for(&self, msg: &Message, now: u64) -> Option<u64> {
        let queue_ttl = self
            .handle
            .spec
            .message_ttl_ms
            .map(|t| now.saturating_add(t));
        match (queue_ttl, msg.expires_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A message arrives from the inbox. Its depth slot was reserved by the router.
    pub fn enqueue(
        &mut self,
        msg: Arc<Message>,
        ticket: Option<Ticket>,
        now: u64,
        fx: &mut Effects,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let expires_at = self.expiry_for(&msg, now);
        if self.durable_msg(&msg) {
            fx.persist.push(PersistOp::Enqueued {
                seq,
                msg: msg.clone(),
                ticket,
            });
        } else if let Some(t) = ticket {
            fx.settle.push(t);
        }
        self.ready.push_back(Entry {
            msg,
            seq,
            redelivered: false,
            expires_at,
        });
        if let (Some(max), Overflow::DropHead) =
            (self.handle.spec.max_length, self.handle.spec.overflow)
        {
            while self.ready.len() as u64 > max {
                if let Some(e) = self.ready.pop_front() {
                    self.handle.take_ready(1);
                    self.discard(e, true, fx);
                }
            }
        }
    }

    /// A message leaves the queue for good without being acked: dead-letter or drop.
    fn discard(&mut self, e: Entry, dead_letter: bool, fx: &mut Effects) {
        if self.durable_msg(&e.msg) {
            fx.persist.push(PersistOp::Removed { seq: e.seq });
        }
        fx.freed += e.msg.weight();
        if dead_letter && self.handle.spec.dead_letter_exchange.is_some() {
            fx.dead.push(e.msg);
        }
    }

    /// A message was settled by its consumer.
    fn settled(&mut self, e: Entry, fx: &mut Effects) {
        if self.durable_msg(&e.msg) {
            fx.persist.push(PersistOp::Removed { seq: e.seq });
        }
        fx.freed += e.msg.weight();
    }

    /// Copies ready and unacked messages published before `before_ms` out of the read
    /// buffer their frame arrived in; looks at `max_looks` messages at most and copies
    /// `max_copies` at most; returns how many it copied.
    ///
    /// A published message's text is a slice of its connection's read buffer (no copy
    /// on the hot path), and a slice keeps the whole buffer alive, with every other
    /// frame read into it. Messages that move on within moments cost nothing more, but
    /// a queue that keeps one message in a hundred (an unconsumed queue bound to part
    /// of the traffic) would keep a whole buffer for each of them, while the memory
    /// high-water mark counts only the messages' own bytes: measured before this, 2,000
    /// kept messages of 487 KiB held 63 MiB. A message that waits is copied once, here,
    /// on its queue's home shard, and the buffer goes when its other messages are done.
    ///
    /// The ready list counts how many at its head were looked at ([`Ready`]); a
    /// consumer's unacked deliveries are in delivery order and each consumer keeps its
    /// own mark. Unacked messages are bounded by the prefetch, but a prefetch of 0
    /// allows 65,536 per consumer.
    pub fn compact(&mut self, before_ms: u64, max_looks: usize, max_copies: usize) -> usize {
        let mut budget = CopyBudget {
            looks: max_looks,
            copies: max_copies,
        };
        self.ready.copy_waiting(before_ms, &mut budget);
        for c in &mut self.consumers {
            c.unacked.copy_waiting(before_ms, &mut budget);
        }
        max_copies - budget.copies
    }

    /// True when some ready or unacked message has not been looked at yet: the
    /// shard's tick calls [`QueueState::compact`] only for these queues.
    pub fn may_compact(&self) -> bool {
        self.ready.may_copy() || self.consumers.iter().any(|c| c.unacked.may_copy())
    }

    /// Drops expired messages at the head (dead-lettering them).
    pub fn expire(&mut self, now: u64, fx: &mut Effects) {
        while let Some(front) = self.ready.front() {
            match front.expires_at {
                Some(t) if t <= now => {
                    if let Some(e) = self.ready.pop_front() {
                        self.handle.take_ready(1);
                        self.discard(e, true, fx);
                    }
                }
                _ => break,
            }
        }
    }

    /// True when some ready message can expire (the shard's timer looks at these).
    pub fn may_expire(&self) -> bool {
        // Expiry happens at the head only (as in RabbitMQ), so the head decides.
        self.ready.front().is_some_and(|e| e.expires_at.is_some())
    }
    /// Hands ready messages to consumers with credit, round robin.
    pub fn dispatch(&mut self, now: u64, fx: &mut Effects) {
        if self.consumers.is_empty() {
            self.expire(now, fx);
            return;
        }
        let n = self.consumers.len();
        let mut taken = 0usize;
        'outer: while !self.ready.is_empty() {
            // Find the next consumer with credit, starting after the last one served.
            let mut pick = None;
            for i in 0..n {
                let idx = (self.rr + i) % n;
                if self.consumers.get(idx).is_some_and(Consumer::has_credit) {
                    pick = Some(idx);
                    break;
                }
            }
            let Some(idx) = pick else { break 'outer };
            let Some(e) = self.ready.pop_front() else {
                break;
            };
            taken += 1;
            if e.expires_at.is_some_and(|t| t <= now) {
                self.discard(e, true, fx);
                continue;
            }
            let durable = self.durable_msg(&e.msg);
            let Some(c) = self.consumers.get_mut(idx) else {
                break;
            };
            let dseq = c.next_dseq;
            c.next_dseq += 1;
            if durable && !e.redelivered {
                fx.persist.push(PersistOp::Delivered { seq: e.seq });
            }
            c.unacked.push(dseq, e.clone());
            self.unacked_total += 1;
            fx.deliveries.push((c.id, Delivery { dseq, entry: e }));
            self.rr = (idx + 1) % n;
        }
        self.handle.take_ready(taken);
        self.publish_counts();
    }

    /// Adds a consumer (a new subscription).
    pub fn add_consumer(&mut self, id: ConsumerId, mode: AckMode, prefetch: u32) {
        let window = match mode {
            AckMode::Auto => AUTO_ACK_WINDOW,
            AckMode::Manual if prefetch == 0 => UNLIMITED_PREFETCH,
            AckMode::Manual => prefetch as usize,
        };
        self.consumers.push(Consumer {
            id,
            window,
            active: true,
            next_dseq: 1,
            unacked: Unacked::default(),
        });
        self.publish_counts();
    }

    /// Number of consumers still attached (active or holding unacked messages).
    pub fn consumer_count(&self) -> usize {
        self.consumers.len()
    }

    /// Ends a subscription: no more deliveries; its unacked messages stay until settled
    /// or `requeue` is true (its connection closed), when they go back to the queue.
    pub fn remove_consumer(&mut self, id: ConsumerId, requeue: bool, fx: &mut Effects) {
        let _ = fx;
        let Some(pos) = self.consumers.iter().position(|c| c.id == id) else {
            return;
        };
        if requeue {
            let mut back = std::mem::take(&mut self.scratch);
            back.clear();
            if let Some(c) = self.consumers.get_mut(pos) {
                c.unacked.drain_all(&mut back);
            }
            self.requeue_front(&mut back, true);
            self.scratch = back;
            self.consumers.remove(pos);
            if self.rr >= self.consumers.len() {
                self.rr = 0;
            }
        } else if let Some(c) = self.consumers.get_mut(pos) {
            c.active = false;
            if c.unacked.live == 0 {
                self.consumers.remove(pos);
                if self.rr >= self.consumers.len() {
                    self.rr = 0;
                }
            }
        }
        self.publish_counts();
    }

    fn requeue_front(&mut self, entries: &mut Vec<Entry>, mark: bool) {
        let n = entries.len();
        self.unacked_total -= n.min(self.unacked_total);
        for mut e in entries.drain(..).rev() {
            if mark {
                e.redelivered = true;
            }
            self.ready.push_front(e);
        }
        self.handle.add_ready(n);
    }

    fn consumer_mut(&mut self, id: ConsumerId) -> Option<&mut Consumer> {
        self.consumers.iter_mut().find(|c| c.id == id)
    }

    fn reap(&mut self, id: ConsumerId) {
        if let Some(pos) = self
            .consumers
            .iter()
            .position(|c| c.id == id && !c.active && c.unacked.live == 0)
        {
            self.consumers.remove(pos);
            if self.rr >= self.consumers.len() {
                self.rr = 0;
            }
        }
    }

    /// Takes some of a consumer's outstanding deliveries (`take` picks them) and ends
    /// them as `outcome` says; then forgets a cancelled consumer left with nothing
    /// outstanding and publishes the counts. Every settlement goes through here.
    fn finish(
        &mut self,
        id: ConsumerId,
        take: impl FnOnce(&mut Unacked, &mut Vec<Entry>),
        outcome: Outcome,
        fx: &mut Effects,
    ) {
        let mut done = std::mem::take(&mut self.scratch);
        done.clear();
        if let Some(c) = self.consumer_mut(id) {
            take(&mut c.unacked, &mut done);
        }
        match outcome {
            Outcome::Requeue { mark } => self.requeue_front(&mut done, mark),
            Outcome::Settle | Outcome::Discard => {
                self.unacked_total -= done.len().min(self.unacked_total);
                for e in done.drain(..) {
                    if matches!(outcome, Outcome::Settle) {
                        self.settled(e, fx);
                    } else {
                        self.discard(e, true, fx);
                    }
                }
            }
        }
        self.scratch = done;
        self.reap(id);
        self.publish_counts();
    }

    /// Settles deliveries: `ACK` of one (`through == false`) or of all up to `dseq`.
    pub fn ack(&mut self, id: ConsumerId, dseq: u64, through: bool, fx: &mut Effects) {
        self.finish(
            id,
            |u, out| take_acked(u, dseq, through, out),
            Outcome::Settle,
            fx,
        );
    }

    /// Auto-ack settlement: the oldest `n` deliveries were written to the socket.
    pub fn written(&mut self, id: ConsumerId, n: usize, fx: &mut Effects) {
        self.finish(id, |u, out| u.take_oldest(n, out), Outcome::Settle, fx);
    }

    /// `NACK`: back to the queue head (marked redelivered) or dead-lettered / dropped.
    pub fn nack(
        &mut self,
        id: ConsumerId,
        dseq: u64,
        through: bool,
        requeue: bool,
        fx: &mut Effects,
    ) {
        let outcome = if requeue {
            Outcome::Requeue { mark: true }
        } else {
            Outcome::Discard
        };
        self.finish(id, |u, out| take_acked(u, dseq, through, out), outcome, fx);
    }

    /// Deliveries that never reached the socket (the connection was gone): back to the
    /// head, flags unchanged.
    pub fn returned(&mut self, id: ConsumerId, dseqs: &[u64], fx: &mut Effects) {
        let take = |u: &mut Unacked, out: &mut Vec<Entry>| {
            out.extend(dseqs.iter().filter_map(|d| u.take(*d)));
        };
        self.finish(id, take, Outcome::Requeue { mark: false }, fx);
    }

    /// `POST /queues/{name}/purge`: drops ready messages, keeps unacked ones.
    pub fn purge(&mut self, fx: &mut Effects) -> usize {
        let n = self.ready.len();
        let drained: Vec<Entry> = self.ready.drain().collect();
        for e in drained {
            self.discard(e, false, fx);
        }
        self.handle.take_ready(n);
        n
    }

    /// The queue is deleted: every consumer is cancelled, every message dropped.
    pub fn delete(&mut self, fx: &mut Effects) {
        for c in self.consumers.drain(..) {
            if c.active {
                fx.cancelled.push(c.id);
            }
        }
        for e in self.ready.drain() {
            fx.freed += e.msg.weight();
        }
        self.unacked_total = 0;
        self.handle.clear_ready();
        self.publish_counts();
    }

    /// Ready messages held here.
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::QueueSpec;
    use crate::message::{IdGen, MessageId, MessageText};
    use bytes::Bytes;

    fn msg(ids: &mut IdGen, body: &str) -> Arc<Message> {
        Arc::new(Message {
            id: ids.next_id(),
            text: MessageText::new(&Bytes::new(), b"\"x\"", None, b"", body.as_bytes()),
            headers: None,
            published_at: 0,
            expires_at: None,
            persistent: true,
        })
    }

    fn queue(spec: QueueSpec) -> QueueState {
        QueueState::new(Arc::new(QueueHandle::new("q", spec, 0, None)), 1)
    }

    fn cid(sub: u64) -> ConsumerId {
        ConsumerId {
            shard: 0,
            conn: 1,
            sub,
        }
    }

    fn bodies(fx: &Effects) -> Vec<(u64, String)> {
        fx.deliveries
            .iter()
            .map(|(c, d)| {
                (
                    c.sub,
                    String::from_utf8_lossy(d.entry.msg.text.body()).into_owned(),
                )
            })
            .collect()
    }

    fn push(q: &mut QueueState, ids: &mut IdGen, body: &str, fx: &mut Effects) -> MessageId {
        let m = msg(ids, body);
        let id = m.id;
        assert!(q.handle().reserve());
        q.enqueue(m, None, 0, fx);
        id
    }

    /// A message as a publish makes it: its text a slice of a larger frame (the
    /// connection's read buffer), published at `at` ms.
    fn framed(ids: &mut IdGen, body: &str, at: u64) -> Arc<Message> {
        let frame = Bytes::from(format!(r#"{{"exchange":"x","key":"k","body":{body}}}"#));
        let find = |piece: &str| {
            let start = frame
                .windows(piece.len())
                .position(|w| w == piece.as_bytes())
                .unwrap();
            &frame[start..start + piece.len()]
        };
        let key = find(r#""k""#);
        let text = MessageText::new(&frame, find(r#""x""#), Some(key), &key[1..2], find(body));
        let headers = Some(frame.slice(0..5));
        let m = Message {
            id: ids.next_id(),
            text,
            headers,
            published_at: at,
            expires_at: None,
            persistent: false,
        };
        assert!(m.shares_buffer());
        Arc::new(m)
    }

    fn push_framed(q: &mut QueueState, m: Arc<Message>, fx: &mut Effects) {
        assert!(q.handle().reserve());
        q.enqueue(m, None, 0, fx);
    }

    /// A queue with one manual-ack consumer (`prefetch`) that `n` framed messages,
    /// published at 10 ms, were pushed to and dispatched from.
    fn dispatched_framed(prefetch: u32, n: usize) -> (IdGen, QueueState, Effects) {
        let mut ids = IdGen::new(0);
        let mut q = queue(QueueSpec::default());
        let mut fx = Effects::default();
        q.add_consumer(cid(1), AckMode::Manual, prefetch);
        for i in 0..n {
            push_framed(&mut q, framed(&mut ids, &format!("{i}"), 10), &mut fx);
        }
        q.dispatch(0, &mut fx);
        (ids, q, fx)
    }

    fn ready_shared(q: &QueueState) -> Vec<bool> {
        q.ready.iter().map(|e| e.msg.shares_buffer()).collect()
    }

    #[test]
    fn compact_copies_only_messages_that_waited_and_keeps_what_clients_see() {
        let mut ids = IdGen::new(0);
        let mut q = queue(QueueSpec::default());
        let mut fx = Effects::default();
        for (i, at) in [10, 20, 30, 40].into_iter().enumerate() {
            push_framed(&mut q, framed(&mut ids, &format!("[{i}]"), at), &mut fx);
        }
        let before: Vec<(MessageId, Vec<u8>)> = q
            .ready
            .iter()
            .map(|e| (e.msg.id, e.msg.text.body().to_vec()))
            .collect();
        // Published before 30: the first two.
        assert!(q.may_compact());
        assert_eq!(q.compact(30, 100, 100), 2);
        assert_eq!(ready_shared(&q), [false, false, true, true]);
        // Already looked at: nothing again; the younger ones wait their turn.
        assert_eq!(q.compact(30, 100, 100), 0);
        // The copy budget stops a pass; the next one goes on where it stopped.
        assert_eq!(q.compact(1_000, 100, 1), 1);
        assert_eq!(ready_shared(&q), [false, false, false, true]);
        assert_eq!(q.compact(1_000, 100, 100), 1);
        assert!(!q.may_compact());
        let after: Vec<(MessageId, Vec<u8>)> = q
            .ready
            .iter()
            .map(|e| (e.msg.id, e.msg.text.body().to_vec()))
            .collect();
        assert_eq!(before, after);
        let m = &q.ready[0].msg;
        assert_eq!(m.text.exchange_json(), br#""x""#);
        assert_eq!(m.text.routing_key_json(), br#""k""#);
        assert_eq!(m.text.routing_key(), b"k");
        assert_eq!(m.headers.as_deref(), Some(&br#"{"exc"#[..]));
        assert_eq!(m.published_at, 10);
    }

    #[test]
    fn compact_looks_again_at_requeued_messages() {
        // The first goes out still sharing its frame's buffer; the second waits and
        // is copied (a pass looks at ready messages first; one look is spent here).
        let (mut ids, mut q, mut fx) = dispatched_framed(1, 2);
        assert_eq!(q.compact(100, 1, 100), 1);
        assert_eq!(ready_shared(&q), [false]);
        // The first comes back to the head unlooked-at: the next pass copies it.
        q.remove_consumer(cid(1), true, &mut fx);
        assert_eq!(ready_shared(&q), [true, false]);
        assert!(q.may_compact());
        assert_eq!(q.compact(100, 1, 100), 1);
        assert_eq!(ready_shared(&q), [false, false]);
        // The second is looked at again (the requeue started the count again) and
        // left as is.
        assert_eq!(q.compact(100, 100, 100), 0);
        assert!(!q.may_compact());
        // A look budget of one walks one message per pass.
        let mut q = queue(QueueSpec::default());
        push_framed(&mut q, framed(&mut ids, "3", 10), &mut fx);
        push_framed(&mut q, framed(&mut ids, "4", 10), &mut fx);
        assert_eq!(q.compact(100, 1, 100), 1);
        assert_eq!(ready_shared(&q), [false, true]);
    }

    #[test]
    fn compact_finds_a_requeued_message_ahead_of_an_older_one() {
        let (_, mut q, mut fx) = dispatched_framed(2, 2);
        // The first comes back and is copied; the second is still out, unlooked-at.
        q.nack(cid(1), 1, false, true, &mut fx);
        assert_eq!(q.compact(100, 1, 100), 1);
        // Now the second comes back, ahead of the first (which has the lower seq).
        q.nack(cid(1), 2, false, true, &mut fx);
        assert_eq!(ready_shared(&q), [true, false]);
        assert!(q.may_compact());
        assert_eq!(q.compact(100, 100, 100), 1);
        assert_eq!(ready_shared(&q), [false, false]);
    }

    #[test]
    fn compact_copies_unacked_deliveries_that_wait() {
        // Prefetch 0: as many unacked as the cap allows.
        let (mut ids, mut q, mut fx) = dispatched_framed(0, 3);
        assert_eq!(q.ready_len(), 0);
        let held = |q: &QueueState| -> Vec<bool> {
            q.consumers[0]
                .unacked
                .slots
                .iter()
                .flatten()
                .map(|e| e.msg.shares_buffer())
                .collect()
        };
        assert!(q.may_compact());
        assert_eq!(q.compact(10, 100, 100), 0, "not old enough");
        assert_eq!(q.compact(11, 100, 2), 2);
        assert_eq!(held(&q), [false, false, true]);
        assert_eq!(q.compact(11, 100, 100), 1);
        assert!(!q.may_compact());
        // The copies settle as the deliveries did: an ACK of the first takes it.
        q.ack(cid(1), 1, false, &mut fx);
        assert_eq!(held(&q), [false, false]);
        assert_eq!(q.handle().counts.unacked.load(Ordering::Relaxed), 2);
        // A new delivery is looked at in its turn.
        push_framed(&mut q, framed(&mut ids, "3", 10), &mut fx);
        q.dispatch(0, &mut fx);
        assert!(q.may_compact());
        assert_eq!(q.compact(11, 100, 100), 1);
        assert_eq!(held(&q), [false, false, false]);
    }

    #[test]
    fn round_robin_among_consumers_with_credit() {
        let mut ids = IdGen::new(0);
        let mut q = queue(QueueSpec::default());
        let mut fx = Effects::default();
        q.add_consumer(cid(1), AckMode::Manual, 1);
        q.add_consumer(cid(2), AckMode::Manual, 2);
        for b in ["a", "b", "c", "d", "e"] {
            push(&mut q, &mut ids, b, &mut fx);
        }
        q.dispatch(0, &mut fx);
        assert_eq!(
            bodies(&fx),
            [(1, "a".into()), (2, "b".into()), (2, "c".into())]
        );
        assert_eq!(q.ready_len(), 2);
        assert_eq!(q.handle().depth(), 2);
        assert_eq!(q.handle().counts.unacked.load(Ordering::Relaxed), 3);
        fx.deliveries.clear();
        q.ack(cid(1), 1, false, &mut fx);
        q.dispatch(0, &mut fx);
        assert_eq!(bodies(&fx), [(1, "d".into())]);
    }

    #[test]
    fn nack_requeue_marks_redelivered_and_keeps_order() {
        let mut ids = IdGen::new(0);
        let mut q = queue(QueueSpec::default());
        let mut fx = Effects::default();
        q.add_consumer(cid(1), AckMode::Manual, 10);
        let first = push(&mut q, &mut ids, "a", &mut fx);
        push(&mut q, &mut ids, "b", &mut fx);
        push(&mut q, &mut ids, "c", &mut fx);
        q.dispatch(0, &mut fx);
        fx.deliveries.clear();
        q.nack(cid(1), 2, true, true, &mut fx);
        q.dispatch(0, &mut fx);
        let got: Vec<_> = fx
            .deliveries
            .iter()
            .map(|(_, d)| (d.entry.msg.id, d.entry.redelivered, d.dseq))
            .collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], (first, true, 4));
        assert!(got[1].1);
    }

    #[test]
    fn consumer_gone_requeues_unacked() {
        let mut ids = IdGen::new(0);
        let mut q = queue(QueueSpec::default());
        let mut fx = Effects::default();
        q.add_consumer(cid(1), AckMode::Manual, 10);
        push(&mut q, &mut ids, "a", &mut fx);
        q.dispatch(0, &mut fx);
        q.remove_consumer(cid(1), true, &mut fx);
        assert_eq!(q.ready_len(), 1);
        assert_eq!(q.handle().counts.unacked.load(Ordering::Relaxed), 0);
        fx.deliveries.clear();
        q.add_consumer(cid(2), AckMode::Auto, 0);
        q.dispatch(0, &mut fx);
        assert!(fx.deliveries[0].1.entry.redelivered);
    }

    #[test]
    fn max_length_drop_head_and_reject() {
        let mut ids = IdGen::new(0);
        let spec = QueueSpec {
            max_length: Some(2),
            dead_letter_exchange: Some("dlx".into()),
            ..Default::default()
        };
        let mut q = queue(spec);
        let mut fx = Effects::default();
        for b in ["a", "b", "c"] {
            push(&mut q, &mut ids, b, &mut fx);
        }
        assert_eq!(q.ready_len(), 2);
        assert_eq!(fx.dead.len(), 1);
        assert_eq!(fx.dead[0].text.body(), b"a");
        let reject = queue(QueueSpec {
            max_length: Some(1),
            overflow: Overflow::RejectPublish,
            ..Default::default()
        });
        assert!(reject.handle().reserve());
        assert!(!reject.handle().reserve());
    }

    #[test]
    fn ttl_expires_at_head() {
        let mut ids = IdGen::new(0);
        let mut q = queue(QueueSpec {
            message_ttl_ms: Some(100),
            ..Default::default()
        });
        let mut fx = Effects::default();
        let m = msg(&mut ids, "a");
        q.handle().reserve();
        q.enqueue(m, None, 1_000, &mut fx);
        q.expire(1_050, &mut fx);
        assert_eq!(q.ready_len(), 1);
        q.expire(1_100, &mut fx);
        assert_eq!(q.ready_len(), 0);
        assert_eq!(q.handle().depth(), 0);
    }

    #[test]
    fn durable_queue_emits_records_and_purge_keeps_unacked() {
        let mut ids = IdGen::new(0);
        let mut q = queue(QueueSpec {
            durable: true,
            ..Default::default()
        });
        let mut fx = Effects::default();
        q.add_consumer(cid(1), AckMode::Manual, 1);
        push(&mut q, &mut ids, "a", &mut fx);
        push(&mut q, &mut ids, "b", &mut fx);
        q.dispatch(0, &mut fx);
        assert!(matches!(fx.persist[0], PersistOp::Enqueued { seq: 1, .. }));
        assert!(matches!(fx.persist[2], PersistOp::Delivered { seq: 1 }));
        assert_eq!(q.purge(&mut fx), 1);
        assert!(matches!(
            fx.persist.last(),
            Some(PersistOp::Removed { seq: 2 })
        ));
        assert_eq!(q.handle().counts.unacked.load(Ordering::Relaxed), 1);
        q.ack(cid(1), 1, false, &mut fx);
        assert!(matches!(
            fx.persist.last(),
            Some(PersistOp::Removed { seq: 1 })
        ));
    }

    #[test]
    fn auto_ack_written_settles_oldest() {
        let mut ids = IdGen::new(0);
        let mut q = queue(QueueSpec::default());
        let mut fx = Effects::default();
        q.add_consumer(cid(1), AckMode::Auto, 0);
        for b in ["a", "b", "c"] {
            push(&mut q, &mut ids, b, &mut fx);
        }
        q.dispatch(0, &mut fx);
        assert_eq!(q.handle().counts.unacked.load(Ordering::Relaxed), 3);
        q.written(cid(1), 2, &mut fx);
        assert_eq!(q.handle().counts.unacked.load(Ordering::Relaxed), 1);
        q.returned(cid(1), &[3], &mut fx);
        assert_eq!(q.ready_len(), 1);
    }
}
