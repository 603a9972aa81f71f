//! The topology (exchanges, queues, bindings) and routing.
//!
//! Every shard routes against one immutable [`Topology`] held in a
//! [`Snapshot`](crate::sync::snapshot::Snapshot): a lookup pins the epoch, reads, and
//! takes no lock. A change (declare, delete, bind) builds a new `Topology` from the old
//! one (copy-on-write) and swaps it in with a compare-and-swap; the old one is
//! reclaimed once no reader can still see it. Changes are rare, publishes are not.
//!
//! Copy-on-write is structurally shared where a collection grows with the number of
//! subscribers: the queue map is an [`imbl::HashMap`], an exchange's bindings are an
//! [`imbl::Vector`], and a long direct/fanout routing list is one too (a short one is
//! a plain shared slice, see `QueueList`), so a new `Topology` copies O(log n)
//! nodes, not every entry. Each exchange subscription adds a queue and a binding;
//! with plain maps and vectors 5,000 subscribers cost 5,000 full copies (quadratic
//! work, and hundreds of KiB of garbage per subscribe waiting for epoch
//! reclamation). Routing walks plain slices either way (a long list's leaves are
//! slices of up to 64). Topic exchanges still rebuild their trie on every binding
//! change.
//!
//! A queue appears here as a [`QueueHandle`]: its settings, its home shard, its inbox
//! (the lock-free [`MsgQueue`] every router pushes into),
//! and the counters `GET /queues` reads. The queue's mutable state (ready list,
//! consumers, unacked messages) lives only on its home shard, in [`crate::queue`].

use foldhash::{HashMap, HashSet};
use imbl::Vector;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::command::{BindingDecl, ExchangeDecl, ExchangeKind, QueueSpec};
use crate::message::Message;
use crate::sync::mpsc::MsgQueue;
use crate::sync::shim::CachePadded;

/// Placement: the shard that is home to the object with this name (FNV-1a).
pub fn placement(name: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards.max(1) as u64) as usize
}

/// A JSON string token (quotes included) for `s`.
pub fn json_string(s: &str) -> Bytes {
    // Copied out at its exact size: these tokens live as long as their queue or
    // subscription, and serde_json's writer starts at 128 bytes.
    match serde_json::to_string(s) {
        Ok(j) => Bytes::copy_from_slice(j.as_bytes()),
        Err(_) => Bytes::from_static(b"\"\""),
    }
}

/// Who must be told when a durable change is on disk: a shard and its waiter's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// Shard holding the waiter.
    pub shard: usize,
    /// The waiter's token on that shard.
    pub token: u64,
}

/// An item in a queue's inbox: a message on its way to the queue's home shard.
#[derive(Debug)]
pub struct Pending {
    /// The message.
    pub msg: Arc<Message>,
    /// The confirm waiter to answer once the message is on disk, if any.
    pub ticket: Option<Ticket>,
}

/// Identifies the connection that owns an exclusive queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Shard of the connection.
    pub shard: usize,
    /// Connection number on that shard.
    pub conn: u64,
}

/// A queue as every shard sees it.
pub struct QueueHandle {
    /// Unique for the process's lifetime (a re-declared name gets a new id).
    pub id: u64,
    /// The name.
    pub name: Arc<str>,
    /// The name as a JSON string token.
    pub name_json: Bytes,
    /// Settings.
    pub spec: QueueSpec,
    /// The shard that owns its state.
    pub home: usize,
    /// For a subscription's server-named queue: the connection that owns it.
    pub exclusive: Option<ConnKey>,
    /// Messages routed to it that its home shard has not taken yet.
    pub inbox: MsgQueue<Pending>,
    /// Set by a router that must tell the home shard the inbox has work; cleared by
    /// the home shard before it drains (so a push after the clear schedules again).
    /// Both sides write it, so it has a cache line of its own.
    pub scheduled: CachePadded<AtomicBool>,
    /// Ready slots ever reserved: routers add one per message they push (the home
    /// shard adds requeued and restored messages). Only writers of messages write
    /// this line, so a publisher that feeds the queue keeps it in its own cache
    /// instead of taking it back from the home shard on every message; the ready
    /// count is `routed - drained` ([`QueueHandle::depth`]).
    routed: CachePadded<AtomicU64>,
    /// What the home shard writes and routers and `GET /queues` read ([`HomeCounts`]).
    pub counts: CachePadded<HomeCounts>,
}

/// A queue's counters written by its home shard, on one line apart from what routers
/// write; `deleted` too, which whichever shard deletes the queue sets once.
#[derive(Debug, Default)]
pub struct HomeCounts {
    /// Ready messages ever taken off the queue (delivered, expired, dropped, purged):
    /// publishers paused by flow control watch it move (see [`QueueHandle::wants_flow`]).
    pub drained: AtomicU64,
    /// Delivered, not yet settled.
    pub unacked: AtomicUsize,
    /// Active consumers.
    pub consumers: AtomicUsize,
    /// Set when the queue is deleted; routers that still hold an old snapshot may push,
    /// the home shard drops what arrives.
    pub deleted: AtomicBool,
}

impl std::fmt::Debug for QueueHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueHandle")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("home", &self.home)
            .finish_non_exhaustive()
    }
}

/// Ready messages in a consumed queue past which its publishers pause reading
/// (publisher flow control, like RabbitMQ's credit flow): the backlog stays in a few
/// MiB instead of growing while consumers are behind, and the CPU goes to delivery.
pub const FLOW_HIGH: usize = 8192;
/// Ready messages at or under which paused publishers resume.
pub const FLOW_LOW: usize = 2048;

static NEXT_QUEUE_ID: AtomicU64 = AtomicU64::new(1);

impl QueueHandle {
    /// A new queue homed on `home`.
    pub fn new(name: &str, spec: QueueSpec, home: usize, exclusive: Option<ConnKey>) -> Self {
        Self {
            id: NEXT_QUEUE_ID.fetch_add(1, Ordering::Relaxed),
            name: Arc::from(name),
            name_json: json_string(name),
            spec,
            home,
            exclusive,
            inbox: MsgQueue::new(),
            scheduled: CachePadded(AtomicBool::new(false)),
            routed: CachePadded(AtomicU64::new(0)),
            counts: CachePadded(HomeCounts::default()),
        }
    }

    /// Ready messages, counting those still in the inbox. `drained` is read first:
    /// every message it counts was reserved in `routed` before, so the difference
    /// never goes below zero.
    pub fn depth(&self) -> usize {
        let drained = self.counts.drained.load(Ordering::Acquire);
        let routed = self.routed.load(Ordering::Acquire);
        usize::try_from(routed.saturating_sub(drained)).unwrap_or(usize::MAX)
    }

    /// The home shard puts `n` messages back among the ready ones (requeue, restore).
    pub fn add_ready(&self, n: usize) {
        self.routed.fetch_add(n as u64, Ordering::AcqRel);
    }

    /// The home shard took `n` ready messages off the queue for good or to deliver.
    pub fn take_ready(&self, n: usize) {
        if n > 0 {
            self.counts.drained.fetch_add(n as u64, Ordering::AcqRel);
        }
    }

    /// The queue is gone: nothing it held is ready any more.
    pub fn clear_ready(&self) {
        let routed = self.routed.load(Ordering::Acquire);
        self.counts.drained.fetch_max(routed, Ordering::AcqRel);
    }

    /// Publisher flow control: true when this queue has consumers and more than
    /// [`FLOW_HIGH`] ready messages, i.e. its consumers are behind the publishers and
    /// a publisher feeding it should stop reading until they catch up.
    pub fn wants_flow(&self) -> bool {
        self.depth() > FLOW_HIGH && self.counts.consumers.load(Ordering::Relaxed) > 0
    }

    /// A paused publisher may go on: the backlog is down to [`FLOW_LOW`], or nobody
    /// consumes the queue any more.
    pub fn flow_clear(&self) -> bool {
        self.depth() <= FLOW_LOW || self.counts.consumers.load(Ordering::Relaxed) == 0
    }

    /// Reserves a ready slot for one more message; false when `reject_publish` refuses.
    pub fn reserve(&self) -> bool {
        use crate::command::Overflow;
        match (self.spec.max_length, self.spec.overflow) {
            (Some(max), Overflow::RejectPublish) => {
                // A `drained` read a moment ago can only be lower than now, so a
                // race errs towards refusing, never past `max`.
                let drained = self.counts.drained.load(Ordering::Acquire);
                self.routed
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                        (r.saturating_sub(drained) < max).then_some(r + 1)
                    })
                    .is_ok()
            }
            _ => {
                self.routed.fetch_add(1, Ordering::AcqRel);
                true
            }
        }
    }
}

/// Where a routed message goes: an index entry, or a list built for a topic.
pub enum Targets<'a> {
    /// Direct and fanout: a short index entry itself, already free of duplicates.
    Slice(&'a [Arc<QueueHandle>]),
    /// Direct and fanout: a long index entry, already free of duplicates.
    Tree(&'a Vector<Arc<QueueHandle>>),
    /// Topic: the matched queues, each once.
    List(Vec<&'a Arc<QueueHandle>>),
}

impl<'a> Targets<'a> {
    /// Calls `f` for each target queue.
    pub fn for_each(&self, mut f: impl FnMut(&'a Arc<QueueHandle>)) {
        match self {
            Targets::Slice(s) => s.iter().for_each(f),
            // The tree's leaves are plain slices: the loop over queues stays a slice walk.
            Targets::Tree(v) => v.leaves().for_each(|s| s.iter().for_each(&mut f)),
            Targets::List(v) => v.iter().for_each(|q| f(q)),
        }
    }
    /// Number of target queues.
    pub fn len(&self) -> usize {
        match self {
            Targets::Slice(s) => s.len(),
            Targets::Tree(v) => v.len(),
            Targets::List(v) => v.len(),
        }
    }
    /// True when the message goes nowhere.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Longest routing list kept as a plain slice.
const FLAT_MAX: usize = 64;

/// One routing list of a direct key or a fanout exchange: distinct queues.
///
/// Short lists are a shared slice: routing walks it with no setup (an
/// [`imbl::Vector`]'s leaf iterator costs a few ns to start, which a one-queue
/// publish would pay every time), and a change copies at most [`FLAT_MAX`] pointers.
/// Long lists are a structurally shared vector: a change copies O(log n) nodes, so
/// thousands of subscribers on one exchange do not make each subscribe O(n).
#[derive(Debug, Clone)]
enum QueueList {
    Flat(Arc<[Arc<QueueHandle>]>),
    Tree(Vector<Arc<QueueHandle>>),
}

impl Default for QueueList {
    fn default() -> Self {
        QueueList::Flat(Arc::from(Vec::new()))
    }
}

impl QueueList {
    fn targets(&self) -> Targets<'_> {
        match self {
            QueueList::Flat(s) => Targets::Slice(s),
            QueueList::Tree(v) => Targets::Tree(v),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            QueueList::Flat(s) => s.is_empty(),
            QueueList::Tree(v) => v.is_empty(),
        }
    }

    /// Appends `q` (the caller knows it is not in the list).
    fn push(&mut self, q: Arc<QueueHandle>) {
        match self {
            QueueList::Flat(s) if s.len() < FLAT_MAX => {
                *s = s.iter().cloned().chain(std::iter::once(q)).collect();
            }
            QueueList::Flat(s) => {
                let mut v: Vector<Arc<QueueHandle>> = s.iter().cloned().collect();
                v.push_back(q);
                *self = QueueList::Tree(v);
            }
            QueueList::Tree(v) => v.push_back(q),
        }
    }

    /// Removes the queue with this id, if it is in the list.
    fn remove(&mut self, id: u64) {
        match self {
            QueueList::Flat(s) => {
                if s.iter().any(|q| q.id == id) {
                    *s = s.iter().filter(|q| q.id != id).cloned().collect();
                }
            }
            QueueList::Tree(v) => {
                if let Some(i) = v.iter().position(|q| q.id == id) {
                    v.remove(i);
                }
                // Half the threshold: a list hovering around it does not flip each time.
                if v.len() <= FLAT_MAX / 2 {
                    *self = QueueList::Flat(v.iter().cloned().collect());
                }
            }
        }
    }
}

/// A topic exchange's binding patterns as a trie of words.
#[derive(Default, Debug)]
struct TopicNode {
    words: HashMap<Box<str>, TopicNode>,
    star: Option<Box<TopicNode>>,
    hash: Option<Box<TopicNode>>,
    queues: Vec<Arc<QueueHandle>>,
}

/// A routing list holding `v`.
fn list_of(v: Vec<Arc<QueueHandle>>) -> QueueList {
    if v.len() <= FLAT_MAX {
        QueueList::Flat(Arc::from(v))
    } else {
        QueueList::Tree(v.into_iter().collect())
    }
}

/// Splits a key into words; the empty key has none.
fn words(key: &str) -> impl Iterator<Item = &str> {
    let mut it = key.split('.');
    if key.is_empty() {
        it.next();
    }
    it
}

impl TopicNode {
    fn insert(&mut self, pattern: &str, q: &Arc<QueueHandle>) {
        let mut node = self;
        for w in words(pattern) {
            node = match w {
                "*" => node.star.get_or_insert_with(Box::default),
                "#" => node.hash.get_or_insert_with(Box::default),
                _ => node.words.entry(Box::from(w)).or_default(),
            };
        }
        // The caller passes each (pattern, queue) once.
        node.queues.push(q.clone());
    }

    fn collect<'a>(&'a self, key: &[&str], out: &mut Vec<&'a Arc<QueueHandle>>) {
        match key.split_first() {
            None => {
                for q in &self.queues {
                    if !out.iter().any(|x| x.id == q.id) {
                        out.push(q);
                    }
                }
                if let Some(h) = &self.hash {
                    h.collect(key, out);
                }
            }
            Some((w, rest)) => {
                if let Some(c) = self.words.get(*w) {
                    c.collect(rest, out);
                }
                if let Some(s) = &self.star {
                    s.collect(rest, out);
                }
                if let Some(h) = &self.hash {
                    for i in 0..=key.len() {
                        h.collect(key.get(i..).unwrap_or(&[]), out);
                    }
                }
            }
        }
    }
}

/// The routing index of one exchange, built from its binding list and kept in step
/// with it binding by binding (direct, fanout) or rebuilt (topic).
#[derive(Debug)]
enum Index {
    /// Queues by key, each once per key (bindings are unique per key and queue).
    Direct(HashMap<Arc<str>, QueueList>),
    /// Every bound queue once.
    Fanout(QueueList),
    Topic(TopicNode),
}

/// One binding of an exchange.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The key (pattern for topic exchanges).
    pub key: Arc<str>,
    /// The bound queue.
    pub queue: Arc<QueueHandle>,
}

/// An exchange as every shard sees it.
#[derive(Debug)]
pub struct Exchange {
    /// The name.
    pub name: Arc<str>,
    /// The name as a JSON string token.
    pub name_json: Bytes,
    /// Its type.
    pub kind: ExchangeKind,
    /// Survives restarts.
    pub durable: bool,
    /// Bindings in the order they were made; unique per (key, queue).
    pub bindings: Vector<Binding>,
    index: Index,
}

impl Exchange {
    fn build(
        name: Arc<str>,
        name_json: Bytes,
        kind: ExchangeKind,
        durable: bool,
        bindings: Vector<Binding>,
    ) -> Self {
        let index = Self::index(kind, &bindings);
        Self {
            name,
            name_json,
            kind,
            durable,
            bindings,
            index,
        }
    }

    /// The routing index built from scratch.
    fn index(kind: ExchangeKind, bindings: &Vector<Binding>) -> Index {
        // Each queue once per key (direct), once overall (fanout) or once per pattern
        // (topic): a set of what is in already keeps a rebuild linear in the bindings.
        match kind {
            ExchangeKind::Direct => {
                let mut m: HashMap<Arc<str>, Vec<Arc<QueueHandle>>> = HashMap::default();
                let mut seen: HashSet<(&str, u64)> =
                    HashSet::with_capacity_and_hasher(bindings.len(), Default::default());
                for b in bindings {
                    if seen.insert((&b.key, b.queue.id)) {
                        m.entry(b.key.clone()).or_default().push(b.queue.clone());
                    }
                }
                Index::Direct(m.into_iter().map(|(k, v)| (k, list_of(v))).collect())
            }
            ExchangeKind::Fanout => {
                let mut v: Vec<Arc<QueueHandle>> = Vec::with_capacity(bindings.len());
                let mut seen: HashSet<u64> =
                    HashSet::with_capacity_and_hasher(bindings.len(), Default::default());
                for b in bindings {
                    if seen.insert(b.queue.id) {
                        v.push(b.queue.clone());
                    }
                }
                Index::Fanout(list_of(v))
            }
            ExchangeKind::Topic => Index::Topic(Self::topic_index(bindings)),
        }
    }

    fn topic_index(bindings: &Vector<Binding>) -> TopicNode {
        let mut t = TopicNode::default();
        let mut seen: HashSet<(&str, u64)> =
            HashSet::with_capacity_and_hasher(bindings.len(), Default::default());
        for b in bindings {
            if seen.insert((&b.key, b.queue.id)) {
                t.insert(&b.key, &b.queue);
            }
        }
        t
    }

    /// This exchange with `b` added. The caller checked that (key, queue) is new.
    /// Direct and fanout update their index in O(log n) (plus, for direct, a copy of
    /// the key map's slots); topic rebuilds its trie.
    fn with_binding(&self, b: Binding) -> Self {
        let mut bindings = self.bindings.clone();
        let index = match &self.index {
            Index::Direct(m) => {
                let mut m = m.clone();
                m.entry(b.key.clone()).or_default().push(b.queue.clone());
                bindings.push_back(b);
                Index::Direct(m)
            }
            Index::Fanout(v) => {
                let mut v = v.clone();
                if !self.bindings.iter().any(|x| x.queue.id == b.queue.id) {
                    v.push(b.queue.clone());
                }
                bindings.push_back(b);
                Index::Fanout(v)
            }
            Index::Topic(_) => {
                bindings.push_back(b);
                Index::Topic(Self::topic_index(&bindings))
            }
        };
        self.with(bindings, index)
    }

    /// This exchange without the bindings `drop` selects; `None` when it selects none.
    fn without_bindings(&self, drop: impl Fn(&Binding) -> bool) -> Option<Self> {
        let gone: Vec<usize> = self
            .bindings
            .iter()
            .enumerate()
            .filter(|(_, b)| drop(b))
            .map(|(i, _)| i)
            .collect();
        if gone.is_empty() {
            return None;
        }
        let mut bindings = self.bindings.clone();
        let mut removed = Vec::with_capacity(gone.len());
        // Back to front, so the positions still to remove stay valid.
        for &i in gone.iter().rev() {
            if i < bindings.len() {
                removed.push(bindings.remove(i));
            }
        }
        let index = match &self.index {
            Index::Direct(m) => {
                let mut m = m.clone();
                for b in &removed {
                    if let Some(v) = m.get_mut(&*b.key) {
                        v.remove(b.queue.id);
                        if v.is_empty() {
                            m.remove(&*b.key);
                        }
                    }
                }
                Index::Direct(m)
            }
            Index::Fanout(v) => {
                let mut v = v.clone();
                for b in &removed {
                    let still_bound = bindings.iter().any(|x| x.queue.id == b.queue.id);
                    if !still_bound {
                        v.remove(b.queue.id);
                    }
                }
                Index::Fanout(v)
            }
            Index::Topic(_) => Index::Topic(Self::topic_index(&bindings)),
        };
        Some(self.with(bindings, index))
    }

    fn with(&self, bindings: Vector<Binding>, index: Index) -> Self {
        Self {
            name: self.name.clone(),
            name_json: self.name_json.clone(),
            kind: self.kind,
            durable: self.durable,
            bindings,
            index,
        }
    }

    /// The queues a message with routing key `key` goes to, each once.
    pub fn route(&self, key: &str) -> Targets<'_> {
        match &self.index {
            Index::Direct(m) => m.get(key).map_or(Targets::Slice(&[]), QueueList::targets),
            Index::Fanout(v) => v.targets(),
            Index::Topic(t) => {
                let ws: Vec<&str> = words(key).collect();
                let mut out = Vec::new();
                t.collect(&ws, &mut out);
                Targets::List(out)
            }
        }
    }
}

/// Why a topology change was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopologyError {
    /// No exchange by that name.
    #[error("exchange {0:?} not found")]
    NoExchange(String),
    /// No queue by that name.
    #[error("queue {0:?} not found")]
    NoQueue(String),
    /// No such binding.
    #[error("binding not found")]
    NoBinding,
    /// Exists with other settings.
    #[error("{0}")]
    Conflict(String),
    /// Already there, identical: nothing to change.
    #[error("exists")]
    Unchanged,
    /// An exclusive queue of another connection.
    #[error("queue {0:?} is exclusive to another connection")]
    Locked(String),
}

impl TopologyError {
    /// HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            TopologyError::NoExchange(_) | TopologyError::NoQueue(_) | TopologyError::NoBinding => {
                404
            }
            TopologyError::Conflict(_) => 409,
            TopologyError::Unchanged => 200,
            TopologyError::Locked(_) => 423,
        }
    }
    /// Contract error code.
    pub fn code(&self) -> &'static str {
        match self {
            TopologyError::NoExchange(_) | TopologyError::NoQueue(_) | TopologyError::NoBinding => {
                "not_found"
            }
            TopologyError::Conflict(_) => "conflict",
            TopologyError::Unchanged => "ok",
            TopologyError::Locked(_) => "resource_locked",
        }
    }
}

/// Everything routing needs, immutable once published.
#[derive(Debug, Default, Clone)]
pub struct Topology {
    /// Exchanges by name.
    pub exchanges: HashMap<Arc<str>, Arc<Exchange>>,
    /// Queues by name (structurally shared: a change copies O(log n) nodes).
    pub queues: imbl::HashMap<Arc<str>, Arc<QueueHandle>>,
}

impl Topology {
    /// An exchange by name.
    pub fn exchange(&self, name: &str) -> Option<&Arc<Exchange>> {
        self.exchanges.get(name)
    }

    /// A queue by name.
    pub fn queue(&self, name: &str) -> Option<&Arc<QueueHandle>> {
        self.queues.get(name)
    }

    /// Adds an exchange; `Unchanged` when an identical one exists.
    pub fn declare_exchange(&self, d: &ExchangeDecl) -> Result<Topology, TopologyError> {
        if let Some(x) = self.exchanges.get(d.name.as_str()) {
            if x.kind == d.kind && x.durable == d.durable {
                return Err(TopologyError::Unchanged);
            }
            return Err(TopologyError::Conflict(format!(
                "exchange {:?} exists as {} durable={}",
                d.name,
                x.kind.as_str(),
                x.durable
            )));
        }
        let mut next = self.clone();
        let name: Arc<str> = Arc::from(d.name.as_str());
        next.exchanges.insert(
            name.clone(),
            Arc::new(Exchange::build(
                name,
                json_string(&d.name),
                d.kind,
                d.durable,
                Vector::new(),
            )),
        );
        Ok(next)
    }

    /// Removes an exchange and its bindings.
    pub fn delete_exchange(&self, name: &str) -> Result<(Topology, Arc<Exchange>), TopologyError> {
        let mut next = self.clone();
        let old = next
            .exchanges
            .remove(name)
            .ok_or_else(|| TopologyError::NoExchange(name.to_owned()))?;
        Ok((next, old))
    }

    /// Adds a queue; `Unchanged` when an identical one exists.
    pub fn declare_queue(&self, q: Arc<QueueHandle>) -> Result<Topology, TopologyError> {
        if let Some(x) = self.queues.get(&*q.name) {
            if x.spec == q.spec && x.exclusive.is_none() && q.exclusive.is_none() {
                return Err(TopologyError::Unchanged);
            }
            if x.exclusive.is_some() {
                return Err(TopologyError::Locked(q.name.to_string()));
            }
            return Err(TopologyError::Conflict(format!(
                "queue {:?} exists with other settings",
                &*q.name
            )));
        }
        let mut next = self.clone();
        next.queues.insert(q.name.clone(), q);
        Ok(next)
    }

    /// Removes a queue and every binding to it.
    pub fn delete_queue(&self, name: &str) -> Result<(Topology, Arc<QueueHandle>), TopologyError> {
        let mut next = self.clone();
        let old = next
            .queues
            .remove(name)
            .ok_or_else(|| TopologyError::NoQueue(name.to_owned()))?;
        for x in next.exchanges.values_mut() {
            if let Some(changed) = x.without_bindings(|b| b.queue.id == old.id) {
                *x = Arc::new(changed);
            }
        }
        Ok((next, old))
    }

    /// Adds a binding; `Unchanged` when it exists.
    pub fn bind(&self, d: &BindingDecl) -> Result<Topology, TopologyError> {
        let x = self
            .exchanges
            .get(d.exchange.as_str())
            .ok_or_else(|| TopologyError::NoExchange(d.exchange.clone()))?;
        let q = self
            .queues
            .get(d.queue.as_str())
            .ok_or_else(|| TopologyError::NoQueue(d.queue.clone()))?;
        if x.bindings
            .iter()
            .any(|b| b.queue.id == q.id && *b.key == *d.key)
        {
            return Err(TopologyError::Unchanged);
        }
        let changed = x.with_binding(Binding {
            key: Arc::from(d.key.as_str()),
            queue: q.clone(),
        });
        let mut next = self.clone();
        next.exchanges.insert(x.name.clone(), Arc::new(changed));
        Ok(next)
    }

    /// Removes a binding.
    pub fn unbind(&self, d: &BindingDecl) -> Result<Topology, TopologyError> {
        let x = self
            .exchanges
            .get(d.exchange.as_str())
            .ok_or_else(|| TopologyError::NoExchange(d.exchange.clone()))?;
        let q = self
            .queues
            .get(d.queue.as_str())
            .ok_or_else(|| TopologyError::NoQueue(d.queue.clone()))?;
        let changed = x
            .without_bindings(|b| b.queue.id == q.id && *b.key == *d.key)
            .ok_or(TopologyError::NoBinding)?;
        let mut next = self.clone();
        next.exchanges.insert(x.name.clone(), Arc::new(changed));
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo_with(kind: ExchangeKind, binds: &[(&str, &str)]) -> Topology {
        let mut t = Topology::default()
            .declare_exchange(&ExchangeDecl {
                name: "x".into(),
                kind,
                durable: false,
            })
            .unwrap();
        for (q, _) in binds {
            if t.queue(q).is_none() {
                t = t
                    .declare_queue(Arc::new(QueueHandle::new(q, QueueSpec::default(), 0, None)))
                    .unwrap();
            }
        }
        for (q, k) in binds {
            t = t
                .bind(&BindingDecl {
                    exchange: "x".into(),
                    queue: (*q).into(),
                    key: (*k).into(),
                })
                .unwrap();
        }
        t
    }

    fn routed(t: &Topology, key: &str) -> Vec<String> {
        let mut v = Vec::new();
        t.exchange("x")
            .unwrap()
            .route(key)
            .for_each(|q| v.push(q.name.to_string()));
        v.sort();
        v
    }

    #[test]
    fn topic_matching() {
        let t = topo_with(
            ExchangeKind::Topic,
            &[
                ("star", "a.*.c"),
                ("hash", "a.#"),
                ("all", "#"),
                ("exact", "a.b.c"),
                ("mid", "a.#.c"),
                ("one", "*"),
            ],
        );
        assert_eq!(routed(&t, "a.b.c"), ["all", "exact", "hash", "mid", "star"]);
        assert_eq!(routed(&t, "a"), ["all", "hash", "one"]);
        assert_eq!(routed(&t, ""), ["all"]);
        assert_eq!(routed(&t, "a.c"), ["all", "hash", "mid"]);
        assert_eq!(routed(&t, "a.x.y.c"), ["all", "hash", "mid"]);
        assert_eq!(routed(&t, "A.b.c"), ["all"]);
        assert_eq!(routed(&t, "b"), ["all", "one"]);
    }

    #[test]
    fn topic_dedups_a_queue_bound_twice() {
        let t = topo_with(
            ExchangeKind::Topic,
            &[("q", "a.*"), ("q", "#"), ("q", "a.b")],
        );
        assert_eq!(routed(&t, "a.b"), ["q"]);
    }

    #[test]
    fn direct_and_fanout() {
        let t = topo_with(
            ExchangeKind::Direct,
            &[("q1", "k"), ("q2", "k"), ("q3", "other"), ("q1", "K")],
        );
        assert_eq!(routed(&t, "k"), ["q1", "q2"]);
        assert_eq!(routed(&t, "K"), ["q1"]);
        assert!(routed(&t, "none").is_empty());
        let t = topo_with(
            ExchangeKind::Fanout,
            &[("q1", "a"), ("q2", "b"), ("q1", "c")],
        );
        assert_eq!(routed(&t, "whatever"), ["q1", "q2"]);
    }

    #[test]
    fn declare_rules() {
        let t = topo_with(ExchangeKind::Direct, &[("q", "k")]);
        let same = ExchangeDecl {
            name: "x".into(),
            kind: ExchangeKind::Direct,
            durable: false,
        };
        assert_eq!(
            t.declare_exchange(&same).unwrap_err(),
            TopologyError::Unchanged
        );
        let other = ExchangeDecl {
            name: "x".into(),
            kind: ExchangeKind::Topic,
            durable: false,
        };
        assert_eq!(t.declare_exchange(&other).unwrap_err().status(), 409);
        let b = BindingDecl {
            exchange: "x".into(),
            queue: "q".into(),
            key: "k".into(),
        };
        assert_eq!(t.bind(&b).unwrap_err(), TopologyError::Unchanged);
        let (t2, _) = t.delete_queue("q").unwrap();
        assert!(t2.exchange("x").unwrap().bindings.is_empty());
        assert_eq!(t2.bind(&b).unwrap_err().status(), 404);
        assert_eq!(
            t.unbind(&BindingDecl {
                key: "zz".into(),
                ..b.clone()
            })
            .unwrap_err()
            .status(),
            404
        );
        let t3 = t.unbind(&b).unwrap();
        assert!(routed(&t3, "k").is_empty());
    }

    /// The index kept in step binding by binding routes exactly like one rebuilt from
    /// the final binding list.
    #[test]
    fn incremental_index_matches_a_rebuild() {
        let keys = ["a", "b", "a.b", "#", "*.b", "a.*"];
        // 6 queues keep every list a slice; 150 make fanout and direct lists trees
        // (past `FLAT_MAX`) and shrink some back.
        let cases = [
            ExchangeKind::Direct,
            ExchangeKind::Fanout,
            ExchangeKind::Topic,
        ]
        .into_iter()
        .flat_map(|k| [(k, 6u64, 400), (k, 150, 1500)]);
        for (kind, nq, steps) in cases {
            let mut t = topo_with(kind, &[]);
            let mut longest = 0;
            for i in 0..nq {
                t = t
                    .declare_queue(Arc::new(QueueHandle::new(
                        &format!("q{i}"),
                        QueueSpec::default(),
                        0,
                        None,
                    )))
                    .unwrap();
            }
            if nq > FLAT_MAX as u64 {
                // Start long, so the walk shrinks trees back to slices as well.
                for i in 0..nq {
                    for key in ["a", "a.b"] {
                        t = t
                            .bind(&BindingDecl {
                                exchange: "x".into(),
                                queue: format!("q{i}"),
                                key: key.into(),
                            })
                            .unwrap();
                    }
                }
            }
            // A fixed pseudo-random walk of binds, unbinds and queue deletions.
            let mut seed = 0x2545_f491_4f6c_dd1du64;
            for step in 0..steps {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let q = format!("q{}", seed % nq);
                let key = keys[((seed >> 8) % keys.len() as u64) as usize];
                let d = BindingDecl {
                    exchange: "x".into(),
                    queue: q.clone(),
                    key: key.into(),
                };
                t = match (seed >> 16) % 7 {
                    0..=3 => t.bind(&d).unwrap_or(t),
                    4 | 5 => t.unbind(&d).unwrap_or(t),
                    _ => match t.delete_queue(&q) {
                        Ok((next, _)) => next
                            .declare_queue(Arc::new(QueueHandle::new(
                                &q,
                                QueueSpec::default(),
                                0,
                                None,
                            )))
                            .unwrap(),
                        Err(_) => t,
                    },
                };
                let x = t.exchange("x").unwrap();
                longest = longest.max(x.route("a").len());
                let rebuilt = Exchange::build(
                    x.name.clone(),
                    x.name_json.clone(),
                    x.kind,
                    x.durable,
                    x.bindings.clone(),
                );
                for k in ["a", "b", "a.b", "c", ""] {
                    let mut got = Vec::new();
                    x.route(k).for_each(|q| got.push(q.id));
                    let mut want = Vec::new();
                    rebuilt.route(k).for_each(|q| want.push(q.id));
                    let n = got.len();
                    got.sort_unstable();
                    got.dedup();
                    assert_eq!(n, got.len(), "{kind:?} step {step}: duplicate target");
                    want.sort_unstable();
                    assert_eq!(got, want, "{kind:?} step {step} key {k:?}");
                }
            }
            if nq > FLAT_MAX as u64 && kind != ExchangeKind::Topic {
                assert!(longest > FLAT_MAX, "{kind:?}: lists never grew into trees");
            }
        }
    }

    #[test]
    fn placement_is_stable_and_in_range() {
        for n in 1..5 {
            let p = placement("orders", n);
            assert!(p < n);
            assert_eq!(p, placement("orders", n));
        }
    }
}
