//! The per-core executors and what they share.
//!
//! [`run`] starts one glommio `LocalExecutor` per shard, each on its own CPU ([`pinning`])
//! and running the same accept loop on the same port (SO_REUSEPORT). A connection stays
//! on the shard that accepted it; a queue lives on its home shard
//! ([`crate::routing::placement`] of its name). Shards talk over one SPSC ring per
//! ordered pair ([`crate::sync::spsc`]) with a doorbell ([`bell`], a socket pair) rung
//! only when the receiving side has parked ([`crate::sync::notify`]).
//!
//! The data path of one publish (see `docs/architecture.md`):
//! connection shard decodes `PUBLISH` → routes against the epoch-protected topology
//! snapshot → for each target queue reserves a slot, pushes into the queue's lock-free
//! inbox and, on the inbox's empty→scheduled transition, sends `QueueWork` to the
//! queue's home shard → the home shard drains the inbox into its ready list and
//! dispatches round robin → each delivery goes to the subscriber's shard (a ring
//! message, or a direct hand-off when local) → the connection writes `MESSAGE` frames.

pub mod bell;
pub mod conn;
pub mod flow;
pub mod pinning;
pub mod signal;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use foldhash::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use self::bell::{BellRx, BellRxStd, BellTx};
use bytes::Bytes;
use glommio::{LocalExecutorBuilder, Placement};

use crate::command::{AckMode, BindingDecl, ExchangeDecl, Publish, QueueDecl, QueueSpec};
use crate::config::Config;
use crate::message::{now_ms, IdGen, Message, MessageId, MessageText};
use crate::metrics::{bump, bump_i64, Metrics};
use crate::persist::core::{CoreEnds, PersistMsg};
use crate::persist::{QueueArgs, Record, Store, StoredMessage};
use crate::queue::{ConsumerId, Delivery, Effects, QueueState};
use crate::routing::{ConnKey, Pending, QueueHandle, Targets, Ticket, Topology, TopologyError};
use crate::sync::notify::Notify;
use crate::sync::snapshot::{pin, Snapshot};
use crate::sync::spsc;

use self::pinning::PinMode;
use self::signal::{oneshot, OneshotTx, Signal};

/// Slots in each shard-to-shard ring.
pub const RING_CAPACITY: usize = 1 << 16;
/// Locked memory glommio may register per executor; small, because the process's
/// `ulimit -l` is small and sockets do not use registered buffers.
pub const IO_MEMORY: usize = 512 * 1024;
/// How often a shard looks for expired messages.
pub const EXPIRY_TICK: Duration = Duration::from_millis(20);

/// A ready message that has waited this long is copied out of the read buffer its
/// frame arrived in ([`QueueState::compact`]). Messages of a queue that keeps up are
/// delivered well within it (`throughput`'s p99 is under 40 ms at full rate), so the
/// copy is paid only by messages that stay.
pub const COMPACT_AFTER_MS: u64 = 100;
/// Messages a shard copies per tick at most (200,000 a second at a 20 ms tick), so a
/// tick never holds the shard long.
pub const COMPACT_COPIES_PER_TICK: usize = 4096;
/// Messages one queue's pass looks at per tick at most (after a requeue it may walk
/// messages it already copied).
pub const COMPACT_LOOKS_PER_QUEUE: usize = 16_384;
/// Longest a task keeps its shard while others wait (glommio's preemption timer; its
/// default is 100 ms): a connection that always has bytes to read yields after this
/// long, so the rest of the shard waits at most about this much behind it. 1 ms cost
/// `throughput` 7–15 % in three interleaved sittings of `scripts/bench-ab`; 10 ms
/// measured 1.05× of the 100 ms default.
pub const PREEMPT_SLICE: Duration = Duration::from_millis(10);
/// Messages a ring task handles before yielding to the shard's other tasks.
const RING_BATCH: usize = 512;

/// Errors of broker operations, mapped to the contract's codes at the edge.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A topology rule said no.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// The memory high-water mark is reached.
    #[error("memory limit reached: publishes are refused until consumers drain queues")]
    ResourceLimit,
    /// The store could not write.
    #[error("the durable store failed: {0}")]
    Store(String),
    /// The broker is shutting down.
    #[error("shutting down")]
    ShuttingDown,
}

impl BrokerError {
    /// HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            BrokerError::Topology(t) => t.status(),
            BrokerError::ResourceLimit | BrokerError::Store(_) | BrokerError::ShuttingDown => 503,
        }
    }
    /// Contract error code.
    pub fn code(&self) -> &'static str {
        match self {
            BrokerError::Topology(t) => t.code(),
            BrokerError::ResourceLimit => "resource_limit",
            BrokerError::Store(_) => "store_unavailable",
            BrokerError::ShuttingDown => "shutting_down",
        }
    }
}

/// Work one shard hands another.
pub enum ShardMsg {
    /// A queue homed on the receiver has messages in its inbox.
    QueueWork(Arc<QueueHandle>),
    /// A subscription starts.
    AddConsumer {
        /// The queue (homed on the receiver).
        queue: Arc<QueueHandle>,
        /// The consumer.
        id: ConsumerId,
        /// Settlement mode.
        mode: AckMode,
        /// Manual-ack window.
        prefetch: u32,
    },
    /// A subscription ends; `requeue` when its connection closed.
    RemoveConsumer {
        /// Queue id.
        queue: u64,
        /// The consumer.
        id: ConsumerId,
        /// Give its unacked messages back to the queue.
        requeue: bool,
    },
    /// `ACK` of one delivery or of all up to one.
    Ack {
        /// Queue id.
        queue: u64,
        /// The consumer.
        id: ConsumerId,
        /// Delivery sequence.
        dseq: u64,
        /// Everything up to `dseq`.
        through: bool,
    },
    /// `NACK`.
    Nack {
        /// Queue id.
        queue: u64,
        /// The consumer.
        id: ConsumerId,
        /// Delivery sequence.
        dseq: u64,
        /// Everything up to `dseq`.
        through: bool,
        /// Back to the queue.
        requeue: bool,
    },
    /// Auto-ack: the oldest `n` deliveries were written to the socket.
    Written {
        /// Queue id.
        queue: u64,
        /// The consumer.
        id: ConsumerId,
        /// How many.
        n: usize,
    },
    /// Deliveries that found no subscription on arrival.
    Returned {
        /// Queue id.
        queue: u64,
        /// The consumer.
        id: ConsumerId,
        /// Their delivery sequences.
        dseqs: Vec<u64>,
    },
    /// Messages of one queue for subscribers on the receiver: one ring slot (and at
    /// most one wake-up) per dispatch, not per message.
    Deliver {
        /// Queue id.
        queue: u64,
        /// The queue's home (where settlements go).
        home: usize,
        /// The consumers and their messages, in dispatch order.
        deliveries: Vec<(ConsumerId, Delivery)>,
    },
    /// A subscription on the receiver ended because its queue was deleted.
    Cancelled {
        /// The consumer.
        id: ConsumerId,
    },
    /// The queue (homed on the receiver) was deleted.
    DeleteQueue(Arc<QueueHandle>),
    /// A WebSocket connection moves to the receiver (its first subscription is to a
    /// queue homed there); see [`conn::Handoff`].
    Adopt(Box<conn::Handoff>),
    /// Purge the queue and answer `PurgeDone` to `reply`.
    Purge {
        /// The queue.
        queue: Arc<QueueHandle>,
        /// Who waits.
        reply: Ticket,
    },
    /// Answer to `Purge`.
    PurgeDone {
        /// Waiter token.
        token: u64,
        /// Messages removed.
        count: usize,
    },
    /// A confirm waiter's durable write is done (or failed).
    Confirmed {
        /// Waiter token.
        token: u64,
        /// Stored.
        ok: bool,
    },
}

/// State every shard can read.
pub struct Shared {
    /// The configuration.
    pub config: Config,
    /// Number of shards.
    pub shards: usize,
    /// Exchanges, queues and bindings.
    pub topology: Snapshot<Topology>,
    /// Counters.
    pub metrics: Metrics,
    /// Set when the process is stopping.
    pub stopping: std::sync::atomic::AtomicBool,
    /// Set by the persistence core while the database is unreachable.
    pub store_down: std::sync::atomic::AtomicBool,
    /// Set by the persistence core while its unwritten backlog is over its limit.
    pub store_backlogged: std::sync::atomic::AtomicBool,
    /// Set by the persistence core once its final checkpoint is written.
    pub flushed: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Shared state for `shards` shards.
    pub fn new(config: Config, shards: usize, topology: Topology) -> Self {
        Self {
            config,
            shards,
            topology: Snapshot::new(topology),
            metrics: Metrics::new(shards),
            stopping: std::sync::atomic::AtomicBool::new(false),
            flushed: std::sync::atomic::AtomicBool::new(false),
            store_down: std::sync::atomic::AtomicBool::new(false),
            store_backlogged: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// The sending side of a link to another executor (a shard or the persistence core).
struct Link<T: 'static> {
    ring: RefCell<spsc::Producer<T>>,
    /// Messages that found the ring full, in order; moved in by a flusher task.
    overflow: RefCell<VecDeque<T>>,
    flushing: Cell<bool>,
    notify: Arc<Notify>,
    bell: BellTx,
}

impl<T: 'static> Link<T> {
    fn new(ring: spsc::Producer<T>, notify: Arc<Notify>, bell: BellTx) -> Rc<Self> {
        Rc::new(Self {
            ring: RefCell::new(ring),
            overflow: RefCell::new(VecDeque::new()),
            flushing: Cell::new(false),
            notify,
            bell,
        })
    }

    /// Pushes `msg`, ringing the doorbell if the other side parked.
    fn push(self: &Rc<Self>, msg: T) {
        if self.push_owing(msg) {
            self.bell.ring();
        }
    }

    /// Pushes `msg`; true when the other side parked and is owed a ring, which the
    /// caller must give ([`Link::ring`]) before this executor can next park. A full
    /// ring spills into the overflow list, which a task moves over as room appears.
    fn push_owing(self: &Rc<Self>, msg: T) -> bool {
        let pushed = if self.overflow.borrow().is_empty() {
            self.ring.borrow_mut().push(msg)
        } else {
            Err(msg)
        };
        match pushed {
            Ok(()) => self.notify.should_wake(),
            Err(msg) => {
                self.overflow.borrow_mut().push_back(msg);
                if !self.flushing.replace(true) {
                    let link = self.clone();
                    glommio::spawn_local(async move { link.flush_overflow().await }).detach();
                }
                false
            }
        }
    }

    /// Rings the other side's doorbell.
    fn ring(&self) {
        self.bell.ring();
    }

    fn backed_up(&self) -> bool {
        !self.overflow.borrow().is_empty()
    }

    async fn flush_overflow(self: Rc<Self>) {
        loop {
            {
                let mut over = self.overflow.borrow_mut();
                let mut ring = self.ring.borrow_mut();
                while let Some(m) = over.pop_front() {
                    if let Err(m) = ring.push(m) {
                        over.push_front(m);
                        break;
                    }
                }
            }
            if self.notify.should_wake() {
                self.bell.ring();
            }
            if self.overflow.borrow().is_empty() {
                self.flushing.set(false);
                return;
            }
            glommio::timer::sleep(Duration::from_micros(100)).await;
        }
    }
}

/// What a connection learns from its shard.
pub enum ConnEvent {
    /// A message for one of its subscriptions.
    Deliver {
        /// Subscription number.
        sub: u64,
        /// Queue id.
        queue: u64,
        /// The queue's home (where settlements go).
        home: usize,
        /// The message.
        delivery: Delivery,
    },
    /// A subscription was cancelled by the server (queue deleted).
    Cancelled {
        /// Subscription number.
        sub: u64,
    },
    /// A `PUBLISH` with `confirm` is settled.
    Confirm {
        /// The client's ref (JSON token).
        reference: Option<Bytes>,
        /// Message id.
        id: MessageId,
        /// Queues it went to.
        routed: usize,
        /// Stored (else the store failed).
        ok: bool,
    },
}

/// A connection's mailbox on its shard.
pub struct ConnInbox {
    /// Events, in order.
    pub events: RefCell<VecDeque<ConnEvent>>,
    /// Wakes the connection task.
    pub signal: Signal,
    /// When the client last sent anything (ms since the epoch).
    pub last_rx: Cell<u64>,
}

enum Waiter {
    Confirm {
        remaining: usize,
        ok: bool,
        target: ConfirmTarget,
    },
    Purge(OneshotTx<usize>),
}

enum ConfirmTarget {
    Http(OneshotTx<bool>),
    Conn {
        conn: u64,
        reference: Option<Bytes>,
        id: MessageId,
        routed: usize,
    },
}

/// What a publish did.
pub struct Published {
    /// The message id.
    pub id: MessageId,
    /// Number of queues it went to.
    pub routed: usize,
    /// For `confirm`: resolves once durable queues have it on disk.
    pub confirm: Option<signal::OneshotRx<bool>>,
    /// A queue it went to whose consumers are behind: the publishing connection should
    /// stop reading until that queue drains (publisher flow control).
    pub flow: Option<Arc<QueueHandle>>,
    /// The shards whose queues took it.
    pub homes: Homes,
}

/// The home shards of the queues some messages went to, as far as placing their
/// publisher needs to know: none, exactly one, or several.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Homes {
    /// No queue took them.
    #[default]
    None,
    /// Every queue that took them lives on this shard.
    One(usize),
    /// Queues on more than one shard.
    Many,
}

impl Homes {
    /// Adds shard `home`.
    pub fn add(&mut self, home: usize) {
        *self = match *self {
            Homes::None => Homes::One(home),
            Homes::One(h) if h == home => Homes::One(h),
            _ => Homes::Many,
        };
    }

    /// Adds every shard of `other`.
    pub fn merge(&mut self, other: Homes) {
        match other {
            Homes::None => {}
            Homes::One(h) => self.add(h),
            Homes::Many => *self = Homes::Many,
        }
    }
}

/// What routing one message did.
#[derive(Default)]
struct Routed {
    /// Queues that took it.
    queues: usize,
    /// Of those, the ones that carry the confirm ticket.
    ticketed: usize,
    /// A queue over its flow-control mark.
    flow: Option<Arc<QueueHandle>>,
    /// Where those queues live.
    homes: Homes,
}

/// Publishes between two reads of the other shards' memory gauges, at most.
const MEMORY_REFRESH: u32 = 64;

/// The other shards' memory gauges as last read ([`Shard::over_memory_high_water`]).
#[derive(Clone, Copy, Default)]
struct MemoryCache {
    others: i64,
    at_ms: u64,
    publishes: u32,
}

/// A batch of sends whose doorbells ring when it ends ([`Shard::batch`]).
pub struct Batch {
    shard: Rc<Shard>,
    /// Held for the whole batch, so the epoch pin of each publish's topology lookup
    /// nests inside it (a counter increment) instead of paying the outermost pin's
    /// SeqCst fence once per message.
    _pin: crate::sync::shim::epoch::Guard,
}

impl Drop for Batch {
    fn drop(&mut self) {
        let depth = self.shard.batch_depth.get().saturating_sub(1);
        self.shard.batch_depth.set(depth);
        if depth > 0 {
            return;
        }
        // Drained, not taken: the list keeps its capacity for the next batch.
        let mut owed = self.shard.owed_rings.borrow_mut();
        let links = self.shard.links.borrow();
        for to in owed.drain(..) {
            if let Some(Some(link)) = links.get(to) {
                link.ring();
            }
        }
    }
}

/// One shard: its links, its queues, its connections.
pub struct Shard {
    /// This shard's number.
    pub id: usize,
    /// What all shards share.
    pub shared: Arc<Shared>,
    links: RefCell<Vec<Option<Rc<Link<ShardMsg>>>>>,
    /// The other shards' memory gauges, summed ([`Shard::over_memory_high_water`]).
    memory_others: Cell<MemoryCache>,
    /// Open [`Batch`]es (nesting depth).
    batch_depth: Cell<u32>,
    /// Shards owed a doorbell ring when the outermost batch ends.
    owed_rings: RefCell<Vec<usize>>,
    persist: RefCell<Option<Rc<Link<PersistMsg>>>>,
    local: RefCell<VecDeque<ShardMsg>>,
    local_signal: Signal,
    queues: RefCell<HashMap<u64, QueueState>>,
    conns: RefCell<HashMap<u64, Rc<ConnInbox>>>,
    fx: RefCell<Effects>,
    ids: RefCell<IdGen>,
    waiters: RefCell<HashMap<u64, Waiter>>,
    next_token: Cell<u64>,
    next_conn: Cell<u64>,
    /// Where a connection with an empty read buffer reads into (see
    /// [`Shard::read_scratch`]).
    read_scratch: RefCell<Box<[u8]>>,
}

/// Messages of one durable queue read back at start.
pub struct RestoredQueue {
    /// The queue.
    pub handle: Arc<QueueHandle>,
    /// Its messages in order: (message, seq, delivered before).
    pub messages: Vec<(Arc<Message>, u64, bool)>,
}

impl Shard {
    fn new(id: usize, shared: Arc<Shared>) -> Self {
        Self {
            id,
            shared,
            links: RefCell::new(Vec::new()),
            memory_others: Cell::new(MemoryCache::default()),
            batch_depth: Cell::new(0),
            owed_rings: RefCell::new(Vec::new()),
            persist: RefCell::new(None),
            local: RefCell::new(VecDeque::new()),
            local_signal: Signal::default(),
            queues: RefCell::new(HashMap::default()),
            conns: RefCell::new(HashMap::default()),
            fx: RefCell::new(Effects::default()),
            ids: RefCell::new(IdGen::new(id)),
            waiters: RefCell::new(HashMap::default()),
            next_token: Cell::new(1),
            next_conn: Cell::new(1),
            read_scratch: RefCell::new(Box::default()),
        }
    }

    /// The shard's read scratch buffer, at least `len` bytes. A connection whose read
    /// buffer is empty reads here and keeps only the bytes that arrived, so an idle
    /// connection holds no read buffer at all. Borrowed only inside a synchronous
    /// poll, never across an `await` (connections on one shard never poll at once).
    pub(crate) fn read_scratch(&self, len: usize) -> std::cell::RefMut<'_, Box<[u8]>> {
        let mut s = self.read_scratch.borrow_mut();
        if s.len() < len {
            *s = vec![0u8; len].into_boxed_slice();
        }
        s
    }

    pub(crate) fn counters(&self) -> &crate::metrics::ShardCounters {
        self.shared.metrics.shard(self.id)
    }

    /// Sends `msg` to shard `to` (to itself through the local mailbox).
    pub fn send(self: &Rc<Self>, to: usize, msg: ShardMsg) {
        if to == self.id {
            self.local.borrow_mut().push_back(msg);
            self.local_signal.notify();
            return;
        }
        let link = self.links.borrow().get(to).and_then(|l| l.clone());
        match link {
            Some(link) if self.batch_depth.get() > 0 => {
                if link.push_owing(msg) {
                    let mut owed = self.owed_rings.borrow_mut();
                    if !owed.contains(&to) {
                        owed.push(to);
                    }
                }
            }
            Some(link) => link.push(msg),
            None => tracing::error!(from = self.id, to, "no link to shard; message dropped"),
        }
    }

    /// Opens a batch: until the returned guard drops, a shard this one wakes is rung
    /// once, at the end, instead of at the first message it is sent. A publisher's
    /// round of reads (hundreds of frames under load) then wakes a parked shard with
    /// all of them at once rather than with the first few, then again and again; at
    /// light load a round is one frame and the ring comes as soon as it is handled.
    /// Batches nest; the outermost one rings. Nothing awaits inside a batch (the guard
    /// is not held across an `.await`), so no owed ring waits on this shard parking,
    /// and the epoch pin it holds delays reclamation by one round at most.
    pub fn batch(self: &Rc<Self>) -> Batch {
        self.batch_depth.set(self.batch_depth.get() + 1);
        Batch {
            shard: self.clone(),
            _pin: pin(),
        }
    }

    /// Hands a durable change to the persistence core.
    fn send_persist(&self, msg: PersistMsg) {
        let link = self.persist.borrow().clone();
        match link {
            Some(link) => link.push(msg),
            None => {
                if let Some(t) = msg.ticket {
                    tracing::error!(
                        token = t.token,
                        "no persistence core; confirm cannot be answered"
                    );
                }
            }
        }
    }

    /// True while some link is backed up (publishers should slow down).
    pub fn congested(&self) -> bool {
        self.links.borrow().iter().flatten().any(|l| l.backed_up())
            || self
                .persist
                .borrow()
                .as_ref()
                .is_some_and(|l| l.backed_up())
    }

    /// Registers a connection and returns its number and mailbox.
    pub fn register_conn(&self) -> (u64, Rc<ConnInbox>) {
        let n = self.next_conn.get();
        self.next_conn.set(n + 1);
        let inbox = Rc::new(ConnInbox {
            events: RefCell::new(VecDeque::new()),
            signal: Signal::default(),
            last_rx: Cell::new(now_ms()),
        });
        self.conns.borrow_mut().insert(n, inbox.clone());
        self.counters().connections.fetch_add(1, Ordering::Relaxed);
        (n, inbox)
    }

    /// True while a `PUBLISH` with `confirm` from WebSocket connection `conn` waits
    /// for its answer (such a connection must stay where the answer will come).
    pub fn confirms_pending_for(&self, conn: u64) -> bool {
        self.waiters.borrow().values().any(|w| {
            matches!(
                w,
                Waiter::Confirm {
                    target: ConfirmTarget::Conn { conn: c, .. },
                    ..
                } if *c == conn
            )
        })
    }

    /// Forgets a connection.
    pub fn unregister_conn(&self, n: u64) {
        if self.conns.borrow_mut().remove(&n).is_some() {
            self.counters().connections.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Puts deliveries of queue `queue` (homed on `home`) into the mailboxes of their
    /// connections on this shard. A run of deliveries to one connection (the usual
    /// case: one consumer takes a whole dispatch) looks it up and wakes it once; a
    /// connection that is gone hands its deliveries back ([`Shard::to_conn`]).
    fn deliver_local(
        self: &Rc<Self>,
        queue: u64,
        home: usize,
        deliveries: impl IntoIterator<Item = (ConsumerId, Delivery)>,
    ) {
        let mut last: Option<(u64, Rc<ConnInbox>)> = None;
        for (id, delivery) in deliveries {
            let ev = ConnEvent::Deliver {
                sub: id.sub,
                queue,
                home,
                delivery,
            };
            match &last {
                Some((conn, inbox)) if *conn == id.conn => {
                    inbox.events.borrow_mut().push_back(ev);
                    continue;
                }
                _ => {}
            }
            if let Some((_, inbox)) = last.take() {
                inbox.signal.notify();
            }
            let inbox = self.conns.borrow().get(&id.conn).cloned();
            match inbox {
                Some(inbox) => {
                    inbox.events.borrow_mut().push_back(ev);
                    last = Some((id.conn, inbox));
                }
                None => self.to_conn(id.conn, ev),
            }
        }
        if let Some((_, inbox)) = last {
            inbox.signal.notify();
        }
    }

    fn to_conn(self: &Rc<Self>, conn: u64, ev: ConnEvent) {
        let inbox = self.conns.borrow().get(&conn).cloned();
        match inbox {
            Some(inbox) => {
                inbox.events.borrow_mut().push_back(ev);
                inbox.signal.notify();
            }
            None => {
                if let ConnEvent::Deliver {
                    sub,
                    queue,
                    home,
                    delivery,
                } = ev
                {
                    let id = ConsumerId {
                        shard: self.id,
                        conn,
                        sub,
                    };
                    self.send(
                        home,
                        ShardMsg::Returned {
                            queue,
                            id,
                            dseqs: vec![delivery.dseq],
                        },
                    );
                }
            }
        }
    }

    fn token(&self) -> u64 {
        let t = self.next_token.get();
        self.next_token.set(t + 1);
        t
    }

    /// Handles one message from a ring or the local mailbox.
    pub fn handle(self: &Rc<Self>, msg: ShardMsg) {
        let now = now_ms();
        match msg {
            ShardMsg::QueueWork(h) => self.queue_work(&h, now),
            ShardMsg::AddConsumer {
                queue,
                id,
                mode,
                prefetch,
            } => {
                if queue.counts.deleted.load(Ordering::Acquire) {
                    self.send(id.shard, ShardMsg::Cancelled { id });
                    return;
                }
                self.with_queue_create(&queue, |q, fx| {
                    q.add_consumer(id, mode, prefetch);
                    q.dispatch(now, fx);
                });
            }
            ShardMsg::RemoveConsumer { queue, id, requeue } => {
                self.with_queue(queue, |q, fx| {
                    q.remove_consumer(id, requeue, fx);
                    q.dispatch(now, fx);
                });
            }
            ShardMsg::Ack {
                queue,
                id,
                dseq,
                through,
            } => {
                self.counters().acked.fetch_add(1, Ordering::Relaxed);
                self.with_queue(queue, |q, fx| {
                    q.ack(id, dseq, through, fx);
                    q.dispatch(now, fx);
                });
            }
            ShardMsg::Nack {
                queue,
                id,
                dseq,
                through,
                requeue,
            } => {
                if requeue {
                    self.counters().redelivered.fetch_add(1, Ordering::Relaxed);
                }
                self.with_queue(queue, |q, fx| {
                    q.nack(id, dseq, through, requeue, fx);
                    q.dispatch(now, fx);
                });
            }
            ShardMsg::Written { queue, id, n } => {
                self.with_queue(queue, |q, fx| {
                    q.written(id, n, fx);
                    q.dispatch(now, fx);
                });
            }
            ShardMsg::Returned { queue, id, dseqs } => {
                self.with_queue(queue, |q, fx| {
                    q.returned(id, &dseqs, fx);
                    q.dispatch(now, fx);
                });
            }
            ShardMsg::Deliver {
                queue,
                home,
                deliveries,
            } => {
                self.deliver_local(queue, home, deliveries);
            }
            ShardMsg::Adopt(h) => {
                let shard = self.clone();
                glommio::spawn_local(async move { conn::adopt(shard, *h).await }).detach();
            }
            ShardMsg::Cancelled { id } => {
                self.to_conn(id.conn, ConnEvent::Cancelled { sub: id.sub })
            }
            ShardMsg::DeleteQueue(h) => {
                let state = self.queues.borrow_mut().remove(&h.id);
                let mut fx = std::mem::take(&mut *self.fx.borrow_mut());
                if let Some(mut q) = state {
                    q.delete(&mut fx);
                }
                while let Some(p) = h.inbox.pop() {
                    fx.freed += p.msg.weight();
                    if let Some(t) = p.ticket {
                        fx.settle.push(t);
                    }
                }
                self.apply(&mut fx, &h);
                *self.fx.borrow_mut() = fx;
            }
            ShardMsg::Purge { queue, reply } => {
                let mut count = 0;
                self.queue_work(&queue, now);
                self.with_queue(queue.id, |q, fx| count = q.purge(fx));
                self.send(
                    reply.shard,
                    ShardMsg::PurgeDone {
                        token: reply.token,
                        count,
                    },
                );
            }
            ShardMsg::PurgeDone { token, count } => {
                if let Some(Waiter::Purge(tx)) = self.waiters.borrow_mut().remove(&token) {
                    tx.send(count);
                }
            }
            ShardMsg::Confirmed { token, ok } => self.confirmed(token, ok),
        }
    }

    fn with_queue_create(
        self: &Rc<Self>,
        h: &Arc<QueueHandle>,
        f: impl FnOnce(&mut QueueState, &mut Effects),
    ) {
        let mut fx = std::mem::take(&mut *self.fx.borrow_mut());
        {
            let mut queues = self.queues.borrow_mut();
            let q = queues
                .entry(h.id)
                .or_insert_with(|| QueueState::new(h.clone(), 1));
            f(q, &mut fx);
        }
        self.apply(&mut fx, h);
        *self.fx.borrow_mut() = fx;
    }

    fn with_queue(self: &Rc<Self>, id: u64, f: impl FnOnce(&mut QueueState, &mut Effects)) {
        let mut fx = std::mem::take(&mut *self.fx.borrow_mut());
        let handle = {
            let mut queues = self.queues.borrow_mut();
            queues.get_mut(&id).map(|q| {
                f(q, &mut fx);
                q.handle().clone()
            })
        };
        if let Some(h) = handle {
            self.apply(&mut fx, &h);
        }
        *self.fx.borrow_mut() = fx;
    }

    fn queue_work(self: &Rc<Self>, h: &Arc<QueueHandle>, now: u64) {
        // Clear first: a router that pushes after this sees `false` and schedules again.
        h.scheduled.swap(false, Ordering::AcqRel);
        if h.counts.deleted.load(Ordering::Acquire) {
            let mut freed = 0;
            while let Some(p) = h.inbox.pop() {
                freed += p.msg.weight();
                if let Some(t) = p.ticket {
                    self.send(
                        t.shard,
                        ShardMsg::Confirmed {
                            token: t.token,
                            ok: true,
                        },
                    );
                }
            }
            bump_i64(&self.counters().memory, -(freed as i64));
            return;
        }
        self.with_queue_create(h, |q, fx| {
            h.inbox.drain(|p| q.enqueue(p.msg, p.ticket, now, fx));
            q.dispatch(now, fx);
        });
    }

    /// Carries out what an operation on queue `src` asked for.
    fn apply(self: &Rc<Self>, fx: &mut Effects, src: &Arc<QueueHandle>) {
        if fx.freed > 0 {
            bump_i64(&self.counters().memory, -(fx.freed as i64));
            fx.freed = 0;
        }
        // Local deliveries go straight into their connections' mailboxes; remote ones
        // as one batch per shard.
        let me = self.id;
        let mut remote: Vec<(usize, Vec<(ConsumerId, Delivery)>)> = Vec::new();
        let local = fx.deliveries.drain(..).filter_map(|(id, delivery)| {
            if id.shard == me {
                return Some((id, delivery));
            }
            match remote.iter_mut().find(|(shard, _)| *shard == id.shard) {
                Some((_, batch)) => batch.push((id, delivery)),
                None => remote.push((id.shard, vec![(id, delivery)])),
            }
            None
        });
        self.deliver_local(src.id, me, local);
        for (shard, deliveries) in remote {
            self.send(
                shard,
                ShardMsg::Deliver {
                    queue: src.id,
                    home: self.id,
                    deliveries,
                },
            );
        }
        for op in fx.persist.drain(..) {
            self.persist_op(src, op);
        }
        for t in fx.settle.drain(..) {
            self.send(
                t.shard,
                ShardMsg::Confirmed {
                    token: t.token,
                    ok: true,
                },
            );
        }
        for id in fx.cancelled.drain(..) {
            self.send(id.shard, ShardMsg::Cancelled { id });
        }
        if !fx.dead.is_empty() {
            let dead: Vec<Arc<Message>> = fx.dead.drain(..).collect();
            if let Some(dlx) = &src.spec.dead_letter_exchange {
                let guard = pin();
                let topo = self.shared.topology.load(&guard);
                for m in dead {
                    self.route(topo, dlx, m.for_dead_letter(), None);
                }
            }
        }
    }

    /// Hands a queue's durable change to the persistence core.
    fn persist_op(self: &Rc<Self>, src: &Arc<QueueHandle>, op: crate::queue::PersistOp) {
        use crate::queue::PersistOp;
        let queue = src.name.clone();
        let (rec, ticket) = match op {
            PersistOp::Enqueued { seq, msg, ticket } => {
                (Record::enqueued(queue, seq, stored(&msg)), ticket)
            }
            PersistOp::Delivered { seq } => (Record::Delivered { queue, seq }, None),
            PersistOp::Removed { seq } => (Record::Removed { queue, seq }, None),
        };
        self.send_persist(PersistMsg { rec, ticket });
    }

    /// Writes a durable topology change and waits for its commit.
    async fn commit(self: &Rc<Self>, rec: Record) -> Result<(), BrokerError> {
        let token = self.token();
        let (tx, rx) = oneshot();
        self.waiters.borrow_mut().insert(
            token,
            Waiter::Confirm {
                remaining: 1,
                ok: true,
                target: ConfirmTarget::Http(tx),
            },
        );
        self.send_persist(PersistMsg {
            rec,
            ticket: Some(Ticket {
                shard: self.id,
                token,
            }),
        });
        match rx.await {
            Some(true) => Ok(()),
            Some(false) => Err(BrokerError::Store(
                "the change is in effect but could not be written to the store".into(),
            )),
            None => Err(BrokerError::ShuttingDown),
        }
    }

    /// Routes `msg` through `exchange`: how many queues took it, how many of those carry
    /// `ticket` (durable queues, persistent message), and a queue that asks its
    /// publishers to pause (flow control), if one does.
    fn route(
        self: &Rc<Self>,
        topo: &Topology,
        exchange: &str,
        msg: Arc<Message>,
        ticket: Option<Ticket>,
    ) -> Routed {
        match topo.exchange(exchange) {
            Some(x) => {
                let weight = msg.weight();
                self.route_to(x.route(msg.text.routing_key_str()), weight, msg, ticket)
            }
            None => Routed::default(),
        }
    }

    /// Pushes `msg` (of `weight` bytes, see [`Message::weight`]) into every queue of
    /// `targets` that has room.
    ///
    /// The last queue gets `msg` itself and the others clones: the message's count is
    /// then written once per queue on this shard and not again when routing ends (by
    /// which time the delivering shard may already hold that cache line). The targets
    /// and weight come from the caller so that a message just built is not read back
    /// here: its memory was usually last written by the shard that freed it, and the
    /// first load from it waits for that cache line to come over.
    fn route_to(
        self: &Rc<Self>,
        targets: Targets<'_>,
        weight: usize,
        msg: Arc<Message>,
        ticket: Option<Ticket>,
    ) -> Routed {
        let mut out = Routed::default();
        let mut last: Option<&Arc<QueueHandle>> = None;
        targets.for_each(|q| {
            if q.reserve() {
                if let Some(prev) = last.replace(q) {
                    self.push_routed(prev, msg.clone(), ticket, &mut out);
                }
            }
        });
        if let Some(q) = last {
            self.push_routed(q, msg, ticket, &mut out);
        }
        let c = self.counters();
        bump_i64(&c.memory, (weight * out.queues) as i64);
        bump(&c.routed, out.queues as u64);
        out
    }

    /// Puts a routed message (its slot already reserved) into `q`'s inbox and makes
    /// sure `q`'s home shard will drain it.
    fn push_routed(
        self: &Rc<Self>,
        q: &Arc<QueueHandle>,
        msg: Arc<Message>,
        ticket: Option<Ticket>,
        out: &mut Routed,
    ) {
        out.queues += 1;
        out.homes.add(q.home);
        let t = if q.spec.durable && msg.persistent {
            ticket
        } else {
            None
        };
        if t.is_some() {
            out.ticketed += 1;
        }
        q.inbox.push(Pending { msg, ticket: t });
        if !q.scheduled.swap(true, Ordering::AcqRel) {
            self.send(q.home, ShardMsg::QueueWork(q.clone()));
        }
        if out.flow.is_none() && q.wants_flow() {
            out.flow = Some(q.clone());
        }
    }

    /// True when the bytes held in queues are past `--memory-high-water`. Every shard
    /// adds what it publishes to its own gauge; the other shards' gauges are lines
    /// their executors write all the time, so reading them on every publish would
    /// cost a cache miss per message. Their sum is cached and read again each
    /// millisecond or [`MEMORY_REFRESH`] publishes, and on every publish once the
    /// estimate is within an eighth of the limit: far from it a stale sum cannot
    /// matter, near it the check is exact.
    fn over_memory_high_water(&self, now_ms: u64) -> bool {
        let limit = self.shared.config.memory_high_water as i64;
        let mine = self.counters().memory.load(Ordering::Relaxed);
        let mut cache = self.memory_others.get();
        cache.publishes += 1;
        if cache.publishes >= MEMORY_REFRESH
            || cache.at_ms != now_ms
            || mine.saturating_add(cache.others) > limit - limit / 8
        {
            cache = MemoryCache {
                // Only this executor writes its own gauge, so `mine` is still exact.
                others: self.shared.metrics.memory().saturating_sub(mine),
                at_ms: now_ms,
                publishes: 0,
            };
        }
        self.memory_others.set(cache);
        mine.saturating_add(cache.others) > limit
    }

    /// Publishes: routes the message and, for `confirm`, arranges the answer.
    /// `conn` is the WebSocket connection to answer with `CONFIRM` (else HTTP waits).
    pub fn publish(
        self: &Rc<Self>,
        p: Publish,
        now: u64,
        conn: Option<u64>,
    ) -> Result<Published, BrokerError> {
        if self.over_memory_high_water(now) {
            return Err(BrokerError::ResourceLimit);
        }
        let guard = pin();
        let topo = self.shared.topology.load(&guard);
        let exchange = p.text.exchange();
        let Some(x) = topo.exchange(&exchange) else {
            return Err(TopologyError::NoExchange(exchange.into_owned()).into());
        };
        if p.persistent {
            let down = self.shared.store_down.load(Ordering::Acquire);
            let backlogged = self.shared.store_backlogged.load(Ordering::Acquire);
            if down || backlogged {
                let key = p.text.routing_key_str();
                // Refuse before anything is stored if a durable queue would take it.
                let mut durable = false;
                x.route(key).for_each(|q| durable |= q.spec.durable);
                if durable && down {
                    return Err(BrokerError::Store(
                        "the durable store is unreachable; nothing was stored".into(),
                    ));
                }
                if durable {
                    return Err(BrokerError::ResourceLimit);
                }
            }
        }
        let id = self.ids.borrow_mut().next_id();
        let targets = x.route(p.text.routing_key_str());
        let weight = Message::weight_of(p.text.body(), p.headers.as_ref());
        let msg = Arc::new(Message {
            id,
            text: p.text,
            headers: p.headers,
            published_at: now,
            expires_at: p.ttl_ms.map(|t| now.saturating_add(t)),
            persistent: p.persistent,
        });
        let ticket = p.confirm.then(|| Ticket {
            shard: self.id,
            token: self.token(),
        });
        let Routed {
            queues: routed,
            ticketed,
            flow,
            homes,
        } = self.route_to(targets, weight, msg, ticket);
        let c = self.counters();
        bump(&c.published, 1);
        if routed == 0 {
            bump(&c.unroutable, 1);
        }
        let mut confirm = None;
        if let Some(t) = ticket {
            let target = match conn {
                Some(conn) => ConfirmTarget::Conn {
                    conn,
                    reference: p.reference,
                    id,
                    routed,
                },
                None => {
                    let (tx, rx) = oneshot();
                    confirm = Some(rx);
                    ConfirmTarget::Http(tx)
                }
            };
            if ticketed == 0 {
                self.answer(target, true);
            } else {
                self.waiters.borrow_mut().insert(
                    t.token,
                    Waiter::Confirm {
                        remaining: ticketed,
                        ok: true,
                        target,
                    },
                );
            }
        }
        Ok(Published {
            id,
            routed,
            confirm,
            flow,
            homes,
        })
    }

    /// `POST /exchanges`: true when created, false when an identical one existed.
    /// A durable exchange is answered once it is committed.
    pub async fn declare_exchange(self: &Rc<Self>, d: &ExchangeDecl) -> Result<bool, BrokerError> {
        match self.shared.topology.update(|t| t.declare_exchange(d)) {
            Ok(()) => {
                if d.durable {
                    self.commit(Record::ExchangeDeclared {
                        name: d.name.clone(),
                        kind: d.kind.as_str().to_owned(),
                    })
                    .await?;
                }
                Ok(true)
            }
            Err(TopologyError::Unchanged) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// `DELETE /exchanges/{name}`.
    pub async fn delete_exchange(self: &Rc<Self>, name: &str) -> Result<(), BrokerError> {
        let mut durable = false;
        self.shared.topology.update(|t| {
            let (next, old) = t.delete_exchange(name)?;
            durable = old.durable;
            Ok::<_, TopologyError>(next)
        })?;
        if durable {
            self.commit(Record::ExchangeDeleted {
                name: name.to_owned(),
            })
            .await?;
        }
        Ok(())
    }

    /// `POST /queues`: true when created. A durable queue is answered once committed.
    pub async fn declare_queue(self: &Rc<Self>, d: &QueueDecl) -> Result<bool, BrokerError> {
        let home = crate::routing::placement(&d.name, self.shared.shards);
        let handle = Arc::new(QueueHandle::new(&d.name, d.spec.clone(), home, None));
        match self
            .shared
            .topology
            .update(|t| t.declare_queue(handle.clone()))
        {
            Ok(()) => {
                if d.spec.durable {
                    self.commit(Record::QueueDeclared {
                        name: d.name.clone(),
                        args: queue_args(&d.spec),
                    })
                    .await?;
                }
                Ok(true)
            }
            Err(TopologyError::Unchanged) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// `DELETE /queues/{name}`: its subscribers are told `queue_deleted`.
    pub async fn delete_queue(self: &Rc<Self>, name: &str) -> Result<(), BrokerError> {
        if let Some(old) = self.remove_queue(name)? {
            if old.spec.durable {
                self.commit(Record::QueueDeleted {
                    name: name.to_owned(),
                })
                .await?;
            }
        }
        Ok(())
    }

    fn remove_queue(self: &Rc<Self>, name: &str) -> Result<Option<Arc<QueueHandle>>, BrokerError> {
        let mut removed = None;
        self.shared.topology.update(|t| {
            let (next, old) = t.delete_queue(name)?;
            removed = Some(old);
            Ok::<_, TopologyError>(next)
        })?;
        if let Some(old) = &removed {
            old.counts.deleted.store(true, Ordering::Release);
            self.send(old.home, ShardMsg::DeleteQueue(old.clone()));
        }
        Ok(removed)
    }

    fn binding_is_durable(&self, d: &BindingDecl) -> bool {
        let guard = pin();
        let topo = self.shared.topology.load(&guard);
        topo.exchange(&d.exchange).is_some_and(|x| x.durable)
            && topo.queue(&d.queue).is_some_and(|q| q.spec.durable)
    }

    /// `POST /bindings`: true when created.
    pub async fn bind(self: &Rc<Self>, d: &BindingDecl) -> Result<bool, BrokerError> {
        match self.shared.topology.update(|t| t.bind(d)) {
            Ok(()) => {
                if self.binding_is_durable(d) {
                    self.commit(Record::Bound {
                        exchange: d.exchange.clone(),
                        queue: d.queue.clone(),
                        key: d.key.clone(),
                    })
                    .await?;
                }
                Ok(true)
            }
            Err(TopologyError::Unchanged) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// `DELETE /bindings`.
    pub async fn unbind(self: &Rc<Self>, d: &BindingDecl) -> Result<(), BrokerError> {
        let durable = self.binding_is_durable(d);
        self.shared.topology.update(|t| t.unbind(d))?;
        if durable {
            self.commit(Record::Unbound {
                exchange: d.exchange.clone(),
                queue: d.queue.clone(),
                key: d.key.clone(),
            })
            .await?;
        }
        Ok(())
    }

    /// `POST /queues/{name}/purge`: the number of ready messages removed.
    pub async fn purge(self: &Rc<Self>, name: &str) -> Result<usize, BrokerError> {
        let queue = {
            let guard = pin();
            let topo = self.shared.topology.load(&guard);
            topo.queue(name)
                .cloned()
                .ok_or_else(|| TopologyError::NoQueue(name.to_owned()))?
        };
        let token = self.token();
        let (tx, rx) = oneshot();
        self.waiters.borrow_mut().insert(token, Waiter::Purge(tx));
        self.send(
            queue.home,
            ShardMsg::Purge {
                queue,
                reply: Ticket {
                    shard: self.id,
                    token,
                },
            },
        );
        rx.await.ok_or(BrokerError::ShuttingDown)
    }

    /// Starts a subscription on an existing queue.
    pub fn subscribe_queue(
        self: &Rc<Self>,
        id: ConsumerId,
        name: &str,
        mode: AckMode,
        prefetch: u32,
    ) -> Result<Arc<QueueHandle>, BrokerError> {
        let queue = {
            let guard = pin();
            let topo = self.shared.topology.load(&guard);
            topo.queue(name)
                .cloned()
                .ok_or_else(|| TopologyError::NoQueue(name.to_owned()))?
        };
        if let Some(owner) = queue.exclusive {
            if owner
                != (ConnKey {
                    shard: id.shard,
                    conn: id.conn,
                })
            {
                return Err(TopologyError::Locked(name.to_owned()).into());
            }
        }
        self.send(
            queue.home,
            ShardMsg::AddConsumer {
                queue: queue.clone(),
                id,
                mode,
                prefetch,
            },
        );
        Ok(queue)
    }

    /// Starts a subscription on an exchange: a server-named exclusive queue, homed on
    /// this shard, bound with `key`.
    pub fn subscribe_exchange(
        self: &Rc<Self>,
        id: ConsumerId,
        exchange: &str,
        key: &str,
        mode: AckMode,
        prefetch: u32,
    ) -> Result<Arc<QueueHandle>, BrokerError> {
        // Unique per (shard, connection, subscription); the last number only steers
        // placement so the queue is homed here and deliveries never cross shards.
        let mut k = 0u64;
        let name = loop {
            let candidate = format!("pubsub.sub.{}.{}.{}.{}", self.id, id.conn, id.sub, k);
            if crate::routing::placement(&candidate, self.shared.shards) == self.id {
                break candidate;
            }
            k += 1;
        };
        let owner = ConnKey {
            shard: id.shard,
            conn: id.conn,
        };
        let handle = Arc::new(QueueHandle::new(
            &name,
            QueueSpec::default(),
            self.id,
            Some(owner),
        ));
        let binding = BindingDecl {
            exchange: exchange.to_owned(),
            queue: name.clone(),
            key: key.to_owned(),
        };
        self.shared
            .topology
            .update(|t| t.declare_queue(handle.clone())?.bind(&binding))?;
        self.send(
            self.id,
            ShardMsg::AddConsumer {
                queue: handle.clone(),
                id,
                mode,
                prefetch,
            },
        );
        Ok(handle)
    }

    /// Ends a subscription. `closed`: the connection is gone, so its unacked messages
    /// go back to the queue. An exclusive queue is deleted with its subscription.
    pub fn end_subscription(
        self: &Rc<Self>,
        id: ConsumerId,
        queue: &Arc<QueueHandle>,
        closed: bool,
    ) {
        if queue.exclusive.is_some() {
            if let Err(e) = self.remove_queue(&queue.name) {
                tracing::debug!(queue = %queue.name, error = %e, "exclusive queue already gone");
            }
            return;
        }
        self.send(
            queue.home,
            ShardMsg::RemoveConsumer {
                queue: queue.id,
                id,
                requeue: closed,
            },
        );
    }

    /// Sends a consumer's settlement to the queue's home.
    pub fn settle(self: &Rc<Self>, home: usize, msg: ShardMsg) {
        self.send(home, msg);
    }

    /// Looks for expired messages in the queues homed here.
    /// Copies messages that have waited [`COMPACT_AFTER_MS`] in this shard's queues out
    /// of their read buffers, [`COMPACT_COPIES_PER_TICK`] at most.
    fn compact_tick(&self) {
        let before = now_ms().saturating_sub(COMPACT_AFTER_MS);
        let mut budget = COMPACT_COPIES_PER_TICK;
        for q in self.queues.borrow_mut().values_mut() {
            if budget == 0 {
                break;
            }
            if q.may_compact() {
                // `compact` copies `budget` messages at most.
                budget -= q.compact(before, COMPACT_LOOKS_PER_QUEUE, budget);
            }
        }
    }

    fn expire_tick(self: &Rc<Self>) {
        let now = now_ms();
        let ids: Vec<u64> = self
            .queues
            .borrow()
            .iter()
            .filter(|(_, q)| q.may_expire())
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.with_queue(id, |q, fx| q.expire(now, fx));
        }
    }

    /// Answers a confirm waiter: the HTTP request, or a `CONFIRM`/`ERROR` frame.
    fn answer(self: &Rc<Self>, target: ConfirmTarget, ok: bool) {
        match target {
            ConfirmTarget::Http(tx) => tx.send(ok),
            ConfirmTarget::Conn {
                conn,
                reference,
                id,
                routed,
            } => self.to_conn(
                conn,
                ConnEvent::Confirm {
                    reference,
                    id,
                    routed,
                    ok,
                },
            ),
        }
    }

    fn confirmed(self: &Rc<Self>, token: u64, ok: bool) {
        let done = {
            let mut waiters = self.waiters.borrow_mut();
            match waiters.get_mut(&token) {
                Some(Waiter::Confirm {
                    remaining,
                    ok: all_ok,
                    ..
                }) => {
                    *remaining = remaining.saturating_sub(1);
                    *all_ok &= ok;
                    if *remaining == 0 {
                        waiters.remove(&token)
                    } else {
                        None
                    }
                }
                _ => None,
            }
        };
        if let Some(Waiter::Confirm { ok, target, .. }) = done {
            self.answer(target, ok);
        }
    }
}

impl Shard {
    /// `GET /exchanges`.
    pub fn list_exchanges(&self) -> String {
        let guard = pin();
        let topo = self.shared.topology.load(&guard);
        let mut v: Vec<_> = topo.exchanges.values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        let items: Vec<serde_json::Value> = v.iter().map(|x| exchange_value(x)).collect();
        serde_json::Value::Array(items).to_string()
    }

    /// `GET /exchanges/{name}`.
    pub fn exchange_json(&self, name: &str) -> Option<String> {
        let guard = pin();
        let topo = self.shared.topology.load(&guard);
        topo.exchange(name).map(|x| exchange_value(x).to_string())
    }

    /// `GET /queues`.
    pub fn list_queues(&self) -> String {
        let guard = pin();
        let topo = self.shared.topology.load(&guard);
        let mut v: Vec<_> = topo.queues.values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        let items: Vec<serde_json::Value> = v.iter().map(|q| queue_value(q)).collect();
        serde_json::Value::Array(items).to_string()
    }

    /// `GET /queues/{name}`.
    pub fn queue_json(&self, name: &str) -> Option<String> {
        let guard = pin();
        let topo = self.shared.topology.load(&guard);
        topo.queue(name).map(|q| queue_value(q).to_string())
    }

    /// `GET /bindings`.
    pub fn list_bindings(&self) -> String {
        let guard = pin();
        let topo = self.shared.topology.load(&guard);
        let mut xs: Vec<_> = topo.exchanges.values().collect();
        xs.sort_by(|a, b| a.name.cmp(&b.name));
        let mut items = Vec::new();
        for x in xs {
            for b in &x.bindings {
                items.push(serde_json::json!({
                    "exchange_name": &*x.name,
                    "queue_name": &*b.queue.name,
                    "key": &*b.key,
                }));
            }
        }
        serde_json::Value::Array(items).to_string()
    }

    /// `GET /metrics`.
    pub fn render_metrics(&self) -> String {
        let guard = pin();
        let topo = self.shared.topology.load(&guard);
        let ready: usize = topo.queues.values().map(|q| q.depth()).sum();
        let unacked: usize = topo
            .queues
            .values()
            .map(|q| q.counts.unacked.load(Ordering::Relaxed))
            .sum();
        self.shared.metrics.render(&[
            (
                "pubsub_exchanges",
                "Declared exchanges.",
                topo.exchanges.len() as f64,
            ),
            (
                "pubsub_queues",
                "Declared queues.",
                topo.queues.len() as f64,
            ),
            (
                "pubsub_messages_ready",
                "Messages ready in all queues.",
                ready as f64,
            ),
            (
                "pubsub_messages_unacked",
                "Messages delivered and not yet settled.",
                unacked as f64,
            ),
        ])
    }
}

/// The stored form of a queue's settings.
pub fn queue_args(spec: &QueueSpec) -> QueueArgs {
    QueueArgs {
        max_length: spec.max_length,
        message_ttl_ms: spec.message_ttl_ms,
        overflow: Some(spec.overflow.as_str().to_owned()),
        dead_letter_exchange: spec.dead_letter_exchange.clone(),
    }
}

fn json_to_string(token: &[u8]) -> String {
    serde_json::from_slice::<String>(token).unwrap_or_default()
}

/// The stored form of a message.
fn stored(m: &Message) -> StoredMessage {
    StoredMessage {
        id: m.id.as_str().to_owned(),
        exchange: json_to_string(m.text.exchange_json()),
        routing_key: m.text.routing_key_str().to_owned(),
        body: m.text.body_bytes(),
        headers: m.headers.clone(),
        published_at_ms: m.published_at,
        expires_at_ms: m.expires_at,
    }
}

fn exchange_value(x: &crate::routing::Exchange) -> serde_json::Value {
    serde_json::json!({"name": &*x.name, "type": x.kind.as_str(), "durable": x.durable})
}

fn queue_value(q: &QueueHandle) -> serde_json::Value {
    serde_json::json!({
        "name": &*q.name,
        "durable": q.spec.durable,
        "messages_ready": q.depth(),
        "messages_unacked": q.counts.unacked.load(Ordering::Relaxed),
        "consumers": q.counts.consumers.load(Ordering::Relaxed),
        "max_length": q.spec.max_length,
        "message_ttl_ms": q.spec.message_ttl_ms,
        "overflow": q.spec.overflow.as_str(),
        "dead_letter_exchange": q.spec.dead_letter_exchange,
        "exclusive": q.exclusive.is_some(),
    })
}

/// A ring's sending end with its wake-up flag and doorbell.
pub type SendEnd<T> = (spsc::Producer<T>, Arc<Notify>, BellTx);
/// A ring's receiving end with its wake-up flag and doorbell.
pub type RecvEnd<T> = (spsc::Consumer<T>, Arc<Notify>, BellRxStd);

/// The ends of the links one shard owns, handed to its executor at start.
struct Wiring {
    out: Vec<Option<SendEnd<ShardMsg>>>,
    inc: Vec<RecvEnd<ShardMsg>>,
    persist: Option<SendEnd<PersistMsg>>,
}

/// Starts the persistence core and every shard, and blocks until the shards stop.
/// `restored` holds the durable queues' messages read back at start; they are put
/// back into their queues here, before any executor runs, so that no listener opens
/// on a partly restored broker.
pub fn run(
    shared: Arc<Shared>,
    store: Box<dyn Store>,
    restored: Vec<RestoredQueue>,
) -> std::io::Result<()> {
    let n = shared.shards;
    let mut wiring: Vec<Wiring> = (0..n)
        .map(|_| Wiring {
            out: (0..n).map(|_| None).collect(),
            inc: Vec::new(),
            persist: None,
        })
        .collect();
    let mut core_ends = Vec::new();
    for w in wiring.iter_mut() {
        let (to_core, from_shard) = spsc::channel(RING_CAPACITY);
        let up_notify = Arc::new(Notify::new());
        let (up_tx, up_rx) = bell::bell()?;
        let (to_shard, from_core) = spsc::channel(RING_CAPACITY);
        let down_notify = Arc::new(Notify::new());
        let (down_tx, down_rx) = bell::bell()?;
        w.persist = Some((to_core, up_notify.clone(), up_tx));
        w.inc.push((from_core, down_notify.clone(), down_rx));
        core_ends.push(CoreEnds {
            from_shard: (from_shard, up_notify, up_rx),
            to_shard: (to_shard, down_notify, down_tx),
        });
    }
    crate::persist::core::spawn(shared.clone(), store, core_ends)?;
    for from in 0..n {
        for to in 0..n {
            if from == to {
                continue;
            }
            let (p, c) = spsc::channel(RING_CAPACITY);
            let notify = Arc::new(Notify::new());
            let (tx, rx) = bell::bell()?;
            if let Some(slot) = wiring.get_mut(from).and_then(|w| w.out.get_mut(to)) {
                *slot = Some((p, notify.clone(), tx));
            }
            if let Some(w) = wiring.get_mut(to) {
                w.inc.push((c, notify, rx));
            }
        }
    }
    let mut per_shard: Vec<Vec<QueueState>> = (0..n).map(|_| Vec::new()).collect();
    let now = now_ms();
    for r in restored {
        let home = r.handle.home;
        let next = r
            .messages
            .iter()
            .map(|(_, seq, _)| *seq + 1)
            .max()
            .unwrap_or(1);
        let mut state = QueueState::new(r.handle.clone(), next);
        let mut weight = 0;
        for (m, seq, delivered) in r.messages {
            weight += m.weight();
            state.restore(m, seq, delivered, now);
        }
        shared
            .metrics
            .shard(home)
            .memory
            .fetch_add(weight as i64, Ordering::Relaxed);
        if let Some(v) = per_shard.get_mut(home) {
            v.push(state);
        }
    }
    let cpus = pinning::allowed_cpus();
    let mut handles = Vec::new();
    for (i, (w, queues)) in wiring.into_iter().zip(per_shard).enumerate() {
        let shared = shared.clone();
        // `adaptive` starts free; `tick_task` pins the shard while it is busy.
        let placement = match pinning::cpu_for(i, &cpus) {
            Some(cpu) if shared.config.pin_shards == PinMode::Always => Placement::Fixed(cpu),
            _ => Placement::Unbound,
        };
        let mut builder = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{i}"))
            .io_memory(IO_MEMORY)
            .preempt_timer(PREEMPT_SLICE);
        if shared.config.spin_us > 0 {
            builder = builder.spin_before_park(Duration::from_micros(shared.config.spin_us));
        }
        let h = builder
            .spawn(move || async move { shard_main(i, shared, w, queues).await })
            .map_err(|e| std::io::Error::other(format!("cannot start shard {i}: {e}")))?;
        handles.push(h);
    }
    let mut result = Ok(());
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(e) => result = Err(std::io::Error::other(format!("shard failed: {e}"))),
        }
    }
    result
}

async fn shard_main(
    i: usize,
    shared: Arc<Shared>,
    w: Wiring,
    queues: Vec<QueueState>,
) -> std::io::Result<()> {
    let shard = Rc::new(Shard::new(i, shared.clone()));
    {
        let mut map = shard.queues.borrow_mut();
        for q in queues {
            map.insert(q.handle().id, q);
        }
    }
    // Outgoing links first: glommio runs a spawned task right away, so a ring task
    // may handle (and send) before the next line of this function.
    let links: Vec<Option<Rc<Link<ShardMsg>>>> = w
        .out
        .into_iter()
        .map(|slot| slot.map(|(ring, notify, bell)| Link::new(ring, notify, bell)))
        .collect();
    *shard.links.borrow_mut() = links;
    if let Some((ring, notify, bell)) = w.persist {
        *shard.persist.borrow_mut() = Some(Link::new(ring, notify, bell));
    }
    for (consumer, notify, bell) in w.inc {
        let shard = shard.clone();
        let bell = bell.register();
        glommio::spawn_local(async move { ring_task(shard, consumer, notify, bell).await })
            .detach();
    }
    {
        let shard = shard.clone();
        glommio::spawn_local(async move { local_task(shard).await }).detach();
    }
    {
        let shard = shard.clone();
        glommio::spawn_local(async move { tick_task(shard).await }).detach();
    }
    let listener = glommio::net::TcpListener::bind(shared.config.listen).map_err(|e| {
        std::io::Error::other(format!("cannot listen on {}: {e}", shared.config.listen))
    })?;
    tracing::info!(shard = i, addr = %shared.config.listen, "listening");
    loop {
        match listener.accept().await {
            Ok(stream) => {
                let shard = shard.clone();
                glommio::spawn_local(async move { conn::serve(shard, stream).await }).detach();
            }
            Err(e) => {
                tracing::warn!(shard = i, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Drains one incoming ring; parks on its doorbell when empty.
async fn ring_task(
    shard: Rc<Shard>,
    mut ring: spsc::Consumer<ShardMsg>,
    notify: Arc<Notify>,
    mut bell: BellRx,
) {
    loop {
        let mut n = 0;
        let mut batch = Some(shard.batch());
        while let Some(m) = ring.pop() {
            shard.handle(m);
            n += 1;
            if n == RING_BATCH {
                n = 0;
                // Ring what is owed before letting other tasks (or the parker) run.
                drop(batch.take());
                glommio::yield_if_needed().await;
                batch = Some(shard.batch());
            }
        }
        drop(batch);
        notify.prepare_park();
        if !ring.is_empty() {
            notify.cancel_park();
            continue;
        }
        if let Err(e) = bell.wait().await {
            tracing::error!(shard = shard.id, error = %e, "doorbell closed; ring task ends");
            return;
        }
        notify.cancel_park();
    }
}

/// Handles messages a shard sent itself.
async fn local_task(shard: Rc<Shard>) {
    loop {
        loop {
            let m = shard.local.borrow_mut().pop_front();
            match m {
                Some(m) => shard.handle(m),
                None => break,
            }
        }
        shard.local_signal.wait().await;
    }
}

/// Expires messages and wakes idle WebSocket connections so they ping or close.
async fn tick_task(shard: Rc<Shard>) {
    let idle_ms = shard
        .shared
        .config
        .ws_idle_secs
        .saturating_mul(1000)
        .max(1000);
    let mut last_idle_check = now_ms();
    let mut placement = AdaptivePlacement::new(&shard);
    loop {
        glommio::timer::sleep(EXPIRY_TICK).await;
        shard.expire_tick();
        shard.compact_tick();
        if let Some(p) = placement.as_mut() {
            p.tick();
        }
        let now = now_ms();
        if now.saturating_sub(last_idle_check) >= 1000 {
            last_idle_check = now;
            // Hand this thread's deferred frees (replaced topologies, retired inbox
            // blocks) to the collector and collect: a shard that stops changing the
            // topology or popping would otherwise keep its last bag of garbage.
            pin().flush();
            let idle: Vec<Rc<ConnInbox>> = shard
                .conns
                .borrow()
                .values()
                .filter(|c| now.saturating_sub(c.last_rx.get()) >= idle_ms)
                .cloned()
                .collect();
            for c in idle {
                c.signal.notify();
            }
        }
    }
}

/// Rebuilds the topology and the queues' backlogs from what the store returned.
pub fn rebuild(rec: crate::persist::Recovered, shards: usize) -> (Topology, Vec<RestoredQueue>) {
    use crate::command::{ExchangeKind, Overflow};
    let mut topo = Topology::default();
    for (name, kind) in &rec.exchanges {
        let Some(kind) = ExchangeKind::parse(kind) else {
            tracing::warn!(exchange = %name, kind = %kind, "stored exchange has an unknown type; skipped");
            continue;
        };
        if let Ok(next) = topo.declare_exchange(&ExchangeDecl {
            name: name.clone(),
            kind,
            durable: true,
        }) {
            topo = next;
        }
    }
    for (name, args) in &rec.queues {
        let spec = QueueSpec {
            durable: true,
            max_length: args.max_length,
            message_ttl_ms: args.message_ttl_ms,
            overflow: args
                .overflow
                .as_deref()
                .and_then(Overflow::parse)
                .unwrap_or_default(),
            dead_letter_exchange: args.dead_letter_exchange.clone(),
        };
        let home = crate::routing::placement(name, shards);
        if let Ok(next) = topo.declare_queue(Arc::new(QueueHandle::new(name, spec, home, None))) {
            topo = next;
        }
    }
    for (exchange, queue, key) in &rec.bindings {
        let d = BindingDecl {
            exchange: exchange.clone(),
            queue: queue.clone(),
            key: key.clone(),
        };
        if let Ok(next) = topo.bind(&d) {
            topo = next;
        }
    }
    let mut restored = Vec::new();
    let mut ids = IdGen::new(usize::MAX >> 8);
    for (queue, messages) in rec.messages {
        let Some(handle) = topo.queue(&queue).cloned() else {
            continue;
        };
        let messages = messages
            .into_iter()
            .map(|m| {
                let s = m.msg;
                let msg = Message {
                    id: MessageId::parse(&s.id).unwrap_or_else(|| ids.next_id()),
                    text: MessageText::new(
                        &s.body,
                        &crate::routing::json_string(&s.exchange),
                        Some(&crate::routing::json_string(&s.routing_key)),
                        s.routing_key.as_bytes(),
                        &s.body,
                    ),
                    headers: s.headers,
                    published_at: s.published_at_ms,
                    expires_at: s.expires_at_ms,
                    persistent: true,
                };
                (Arc::new(msg), m.seq, m.delivered)
            })
            .collect();
        restored.push(RestoredQueue { handle, messages });
    }
    (topo, restored)
}

/// `--pin-shards adaptive` on one shard: samples how busy its executor was since the
/// last tick and pins it to its CPU, or frees it, as [`pinning::Adaptive`] says.
struct AdaptivePlacement {
    shard: usize,
    rule: pinning::Adaptive,
    /// This shard's CPU.
    own: Vec<usize>,
    /// Every CPU the process may use (where a free shard may run).
    all: Vec<usize>,
    since: Instant,
}

impl AdaptivePlacement {
    /// `None` unless the shard's placement is adaptive. Call on the shard's thread
    /// before it was ever pinned (it reads the CPUs this thread may use).
    fn new(shard: &Shard) -> Option<Self> {
        if shard.shared.config.pin_shards != PinMode::Adaptive {
            return None;
        }
        let all = pinning::allowed_cpus();
        let own = pinning::cpu_for(shard.id, &all)?;
        // Start a fresh window: the executor's counters hold its start-up.
        let _ = glommio::executor().executor_stats();
        Some(AdaptivePlacement {
            shard: shard.id,
            rule: pinning::Adaptive::default(),
            own: vec![own],
            all,
            since: Instant::now(),
        })
    }

    fn tick(&mut self) {
        let shard = self.shard;
        let window = self.since.elapsed();
        self.since = Instant::now();
        // Taking the stats resets them: each call covers one window.
        let busy = glommio::executor().executor_stats().total_runtime();
        let busy = busy.as_secs_f64() / window.as_secs_f64().max(1e-6);
        let Some(pin) = self.rule.sample(busy) else {
            return;
        };
        let cpus = if pin { &self.own } else { &self.all };
        match pinning::set_affinity(cpus) {
            Ok(()) => tracing::debug!(shard, pinned = pin, busy, "shard placement"),
            Err(e) => tracing::warn!(shard, error = %e, "cannot change the shard's CPUs"),
        }
    }
}
