//! The topology (exchanges, queues, bindings) and routing.
//!
//! Every shard routes against one immutable [`Topology`] held in a
//! [`Snapshot`](crate::sync::snapshot::Snapshot): a lookup pins the epoch, reads, and
//! takes no lock. A change (declare, delete, bind) builds a new `Topology` from the old
//! one (copy-on-write: maps of `Arc`s, and a rebuilt index for the one exchange that
//! changed) and swaps it in with a compare-and-swap; the old one is reclaimed once no
//! reader can still see it. Changes are rare, publishes are not.
//!
//! A queue appears here as a [`QueueHandle`]: its settings, its home shard, its inbox
//! (the lock-free [`MsgQueue`](crate::sync::mpsc::MsgQueue) every router pushes into),
//! and the counters `GET /queues` reads. The queue's mutable state (ready list,
//! consumers, unacked messages) lives only on its home shard, in [`crate::queue`].

use foldhash::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::command::{BindingDecl, ExchangeDecl, ExchangeKind, QueueSpec};
use crate::message::Message;
use crate::sync::mpsc::MsgQueue;

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
    Bytes::from(serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\"")))
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
    pub scheduled: AtomicBool,
    /// Ready messages, counting those still in the inbox: routers reserve a slot here
    /// first (`reject_publish` refuses when full), the home shard releases it.
    pub depth: AtomicUsize,
    /// Delivered, not yet settled.
    pub unacked: AtomicUsize,
    /// Active consumers.
    pub consumers: AtomicUsize,
    /// Ready messages ever taken off the queue (delivered, expired, dropped, purged):
    /// publishers paused by flow control watch it move (see [`QueueHandle::wants_flow`]).
    pub drained: AtomicU64,
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
            scheduled: AtomicBool::new(false),
            depth: AtomicUsize::new(0),
            unacked: AtomicUsize::new(0),
            consumers: AtomicUsize::new(0),
            drained: AtomicU64::new(0),
            deleted: AtomicBool::new(false),
        }
    }

    /// Publisher flow control: true when this queue has consumers and more than
    /// [`FLOW_HIGH`] ready messages, i.e. its consumers are behind the publishers and
    /// a publisher feeding it should stop reading until they catch up.
    pub fn wants_flow(&self) -> bool {
        self.depth.load(Ordering::Relaxed) > FLOW_HIGH && self.consumers.load(Ordering::Relaxed) > 0
    }

    /// A paused publisher may go on: the backlog is down to [`FLOW_LOW`], or nobody
    /// consumes the queue any more.
    pub fn flow_clear(&self) -> bool {
        self.depth.load(Ordering::Relaxed) <= FLOW_LOW
            || self.consumers.load(Ordering::Relaxed) == 0
    }

    /// Reserves a ready slot for one more message; false when `reject_publish` refuses.
    pub fn reserve(&self) -> bool {
        use crate::command::Overflow;
        match (self.spec.max_length, self.spec.overflow) {
            (Some(max), Overflow::RejectPublish) => self
                .depth
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                    ((d as u64) < max).then_some(d + 1)
                })
                .is_ok(),
            _ => {
                self.depth.fetch_add(1, Ordering::AcqRel);
                true
            }
        }
    }
}

/// Where a routed message goes: a slice of the index, or a list built for a topic.
pub enum Targets<'a> {
    /// Direct and fanout: the index entry itself, already free of duplicates.
    Slice(&'a [Arc<QueueHandle>]),
    /// Topic: the matched queues, each once.
    List(Vec<&'a Arc<QueueHandle>>),
}

impl<'a> Targets<'a> {
    /// Calls `f` for each target queue.
    pub fn for_each(&self, mut f: impl FnMut(&'a Arc<QueueHandle>)) {
        match self {
            Targets::Slice(s) => s.iter().for_each(f),
            Targets::List(v) => v.iter().for_each(|q| f(q)),
        }
    }
    /// Number of target queues.
    pub fn len(&self) -> usize {
        match self {
            Targets::Slice(s) => s.len(),
            Targets::List(v) => v.len(),
        }
    }
    /// True when the message goes nowhere.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

/// The routing index of one exchange, built from its binding list.
#[derive(Debug)]
enum Index {
    Direct(HashMap<Arc<str>, Vec<Arc<QueueHandle>>>),
    Fanout(Vec<Arc<QueueHandle>>),
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
    /// Bindings in the order they were made.
    pub bindings: Vec<Binding>,
    index: Index,
}

impl Exchange {
    fn build(
        name: Arc<str>,
        name_json: Bytes,
        kind: ExchangeKind,
        durable: bool,
        bindings: Vec<Binding>,
    ) -> Self {
        // Each queue once per key (direct), once overall (fanout) or once per pattern
        // (topic): a set of what is in already keeps a rebuild linear in the bindings.
        let index = match kind {
            ExchangeKind::Direct => {
                let mut m: HashMap<Arc<str>, Vec<Arc<QueueHandle>>> = HashMap::default();
                let mut seen: HashSet<(&str, u64)> =
                    HashSet::with_capacity_and_hasher(bindings.len(), Default::default());
                for b in &bindings {
                    if seen.insert((&b.key, b.queue.id)) {
                        m.entry(b.key.clone()).or_default().push(b.queue.clone());
                    }
                }
                Index::Direct(m)
            }
            ExchangeKind::Fanout => {
                let mut v: Vec<Arc<QueueHandle>> = Vec::with_capacity(bindings.len());
                let mut seen: HashSet<u64> =
                    HashSet::with_capacity_and_hasher(bindings.len(), Default::default());
                for b in &bindings {
                    if seen.insert(b.queue.id) {
                        v.push(b.queue.clone());
                    }
                }
                Index::Fanout(v)
            }
            ExchangeKind::Topic => {
                let mut t = TopicNode::default();
                let mut seen: HashSet<(&str, u64)> =
                    HashSet::with_capacity_and_hasher(bindings.len(), Default::default());
                for b in &bindings {
                    if seen.insert((&b.key, b.queue.id)) {
                        t.insert(&b.key, &b.queue);
                    }
                }
                Index::Topic(t)
            }
        };
        Self {
            name,
            name_json,
            kind,
            durable,
            bindings,
            index,
        }
    }

    fn with_bindings(&self, bindings: Vec<Binding>) -> Self {
        Self::build(
            self.name.clone(),
            self.name_json.clone(),
            self.kind,
            self.durable,
            bindings,
        )
    }

    /// The queues a message with routing key `key` goes to, each once.
    pub fn route(&self, key: &str) -> Targets<'_> {
        match &self.index {
            Index::Direct(m) => Targets::Slice(m.get(key).map(Vec::as_slice).unwrap_or(&[])),
            Index::Fanout(v) => Targets::Slice(v),
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
    /// Queues by name.
    pub queues: HashMap<Arc<str>, Arc<QueueHandle>>,
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
                Vec::new(),
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
            if x.bindings.iter().any(|b| b.queue.id == old.id) {
                let kept = x
                    .bindings
                    .iter()
                    .filter(|b| b.queue.id != old.id)
                    .cloned()
                    .collect();
                *x = Arc::new(x.with_bindings(kept));
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
        let mut bindings = x.bindings.clone();
        bindings.push(Binding {
            key: Arc::from(d.key.as_str()),
            queue: q.clone(),
        });
        let mut next = self.clone();
        next.exchanges
            .insert(x.name.clone(), Arc::new(x.with_bindings(bindings)));
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
        let before = x.bindings.len();
        let kept: Vec<Binding> = x
            .bindings
            .iter()
            .filter(|b| !(b.queue.id == q.id && *b.key == *d.key))
            .cloned()
            .collect();
        if kept.len() == before {
            return Err(TopologyError::NoBinding);
        }
        let mut next = self.clone();
        next.exchanges
            .insert(x.name.clone(), Arc::new(x.with_bindings(kept)));
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

    #[test]
    fn placement_is_stable_and_in_range() {
        for n in 1..5 {
            let p = placement("orders", n);
            assert!(p < n);
            assert_eq!(p, placement("orders", n));
        }
    }
}
