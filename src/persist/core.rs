//! The persistence core: a dedicated executor that owns the SQL connection.
//!
//! No connection is served here. Each shard hands this core [`PersistMsg`]s over its
//! own SPSC ring (doorbell rung only when this core has parked); the core pushes them
//! into a [`Checkpointer`] and commits what has gathered in one transaction per
//! checkpoint: at once when someone waits for a confirm (group commit: whatever
//! arrives during a commit rides the next one), else after `--checkpoint-ms`. After a
//! commit it answers every waiting ticket with [`ShardMsg::Confirmed`] over the ring
//! back to the ticket's shard. A failed commit answers its tickets with an error,
//! keeps the records, waits for the database to come back and retries.
//!
//! The store's calls block this executor's thread, which is the point: the shards
//! never block. When the core falls behind, its rings fill and the shards' publishers
//! slow down ([`crate::shard::Shard::congested`]).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::channels::shared_channel::{
    ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender,
};
use glommio::{LocalExecutorBuilder, Placement};

use super::{Checkpointer, Record, Store, Ticket};
use crate::routing;
use crate::shard::signal::Signal;
use crate::shard::{ShardMsg, Shared};
use crate::sync::notify::Notify;
use crate::sync::spsc;

/// Bits of a [`Ticket`] that hold the waiter's token; the shard number sits above.
const TOKEN_BITS: u32 = 48;
/// How long to wait between reconnect attempts after a lost database.
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);
/// How often an idle core looks at the stop flag.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// One durable change on its way to the store.
pub struct PersistMsg {
    /// The change.
    pub rec: Record,
    /// Who waits for its commit.
    pub ticket: Option<routing::Ticket>,
}

/// Encodes a shard's ticket for the checkpointer.
pub fn encode(t: routing::Ticket) -> Ticket {
    Ticket(((t.shard as u64) << TOKEN_BITS) | (t.token & ((1 << TOKEN_BITS) - 1)))
}

/// Decodes a checkpointer ticket.
pub fn decode(t: Ticket) -> routing::Ticket {
    routing::Ticket {
        shard: (t.0 >> TOKEN_BITS) as usize,
        token: t.0 & ((1 << TOKEN_BITS) - 1),
    }
}

/// The core's ends of its links with one shard.
pub struct CoreEnds {
    /// Records from the shard.
    pub from_shard: (spsc::Consumer<PersistMsg>, Arc<Notify>, SharedReceiver<u8>),
    /// Answers to the shard.
    pub to_shard: (spsc::Producer<ShardMsg>, Arc<Notify>, SharedSender<u8>),
}

struct Out {
    ring: RefCell<spsc::Producer<ShardMsg>>,
    notify: Arc<Notify>,
    bell: ConnectedSender<u8>,
}

struct Core {
    shared: Arc<Shared>,
    cp: RefCell<Checkpointer>,
    store: RefCell<Box<dyn Store>>,
    signal: Signal,
    out: RefCell<Vec<Option<Out>>>,
    first_pending: Cell<Option<Instant>>,
}

/// Starts the persistence core on its own thread. It runs until the process exits;
/// after `shared.stopping` is set it commits a final checkpoint and sets
/// `shared.flushed`.
pub fn spawn(
    shared: Arc<Shared>,
    store: Box<dyn Store>,
    ends: Vec<CoreEnds>,
) -> std::io::Result<()> {
    LocalExecutorBuilder::new(Placement::Unbound)
        .name("persist")
        .io_memory(crate::shard::IO_MEMORY)
        .spawn(move || async move { core_main(shared, store, ends).await })
        .map(|_| ())
        .map_err(|e| std::io::Error::other(format!("cannot start the persistence core: {e}")))
}

async fn core_main(shared: Arc<Shared>, store: Box<dyn Store>, ends: Vec<CoreEnds>) {
    let n = ends.len();
    let core = Rc::new(Core {
        shared: shared.clone(),
        cp: RefCell::new(Checkpointer::new()),
        store: RefCell::new(store),
        signal: Signal::default(),
        out: RefCell::new((0..n).map(|_| None).collect()),
        first_pending: Cell::new(None),
    });
    let mut pending = Vec::new();
    for (i, e) in ends.into_iter().enumerate() {
        let (ring, notify, bell) = e.from_shard;
        let c = core.clone();
        glommio::spawn_local(async move {
            let bell = bell.connect().await;
            intake(c, ring, notify, bell).await;
        })
        .detach();
        let (ring, notify, bell) = e.to_shard;
        pending.push(glommio::spawn_local(async move {
            (i, ring, notify, bell.connect().await)
        }));
    }
    for p in pending {
        let (i, ring, notify, bell) = p.await;
        if let Some(slot) = core.out.borrow_mut().get_mut(i) {
            *slot = Some(Out {
                ring: RefCell::new(ring),
                notify,
                bell,
            });
        }
    }
    committer(core).await;
}

/// Drains one shard's ring into the checkpointer.
async fn intake(
    core: Rc<Core>,
    mut ring: spsc::Consumer<PersistMsg>,
    notify: Arc<Notify>,
    bell: ConnectedReceiver<u8>,
) {
    loop {
        let mut got = false;
        while let Some(m) = ring.pop() {
            got = true;
            core.cp.borrow_mut().push(m.rec, m.ticket.map(encode));
        }
        if got {
            if core.first_pending.get().is_none() {
                core.first_pending.set(Some(Instant::now()));
            }
            core.signal.notify();
        }
        notify.prepare_park();
        if !ring.is_empty() {
            notify.cancel_park();
            continue;
        }
        if bell.recv().await.is_none() {
            return;
        }
        notify.cancel_park();
    }
}

impl Core {
    fn answer(&self, t: Ticket, ok: bool) {
        let t = decode(t);
        let out = self.out.borrow();
        let Some(Some(o)) = out.get(t.shard) else {
            return;
        };
        let mut msg = ShardMsg::Confirmed { token: t.token, ok };
        loop {
            match o.ring.borrow_mut().push(msg) {
                Ok(()) => break,
                Err(back) => {
                    // The shard is far behind on answers: wait for it (this core may block).
                    msg = back;
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
        if o.notify.should_wake() {
            let _ = o.bell.try_send(1);
        }
    }

    /// Commits what is pending; returns false if the store failed.
    fn checkpoint(&self) -> bool {
        let batch = self.cp.borrow_mut().take_batch();
        self.first_pending.set(None);
        if batch.is_empty() {
            return true;
        }
        let m = &self.shared.metrics.persist;
        let started = Instant::now();
        let result = self.store.borrow_mut().commit(&batch.records);
        match result {
            Ok(stats) => {
                let us = started.elapsed().as_micros() as u64;
                m.checkpoints.fetch_add(1, Ordering::Relaxed);
                m.records.fetch_add(stats.records as u64, Ordering::Relaxed);
                m.last_batch.store(stats.records as u64, Ordering::Relaxed);
                m.max_batch
                    .fetch_max(stats.records as u64, Ordering::Relaxed);
                m.commit_us_total.fetch_add(us, Ordering::Relaxed);
                m.last_commit_us.store(us, Ordering::Relaxed);
                for t in batch.tickets {
                    self.answer(t, true);
                }
                true
            }
            Err(e) => {
                m.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, records = batch.records.len(), "checkpoint failed; its confirms are answered with an error");
                for t in batch.tickets {
                    self.answer(t, false);
                }
                if e.is_connection_lost() {
                    // Keep the records; they are written once the database is back.
                    self.cp.borrow_mut().restore(batch.records);
                    if self.first_pending.get().is_none() {
                        self.first_pending.set(Some(Instant::now()));
                    }
                    return false;
                }
                // Some record can never be written: write the others, skip the bad ones.
                let isolated =
                    super::commit_isolating(&mut **self.store.borrow_mut(), &batch.records);
                match isolated {
                    Ok(skipped) => {
                        for (i, err) in skipped {
                            tracing::error!(record = i, error = %err, "record skipped: it cannot be written");
                        }
                        true
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "checkpoint retry failed; records kept");
                        self.cp.borrow_mut().restore(batch.records);
                        false
                    }
                }
            }
        }
    }
}

async fn committer(core: Rc<Core>) {
    let interval = Duration::from_millis(core.shared.config.checkpoint_ms());
    loop {
        if core.shared.stopping.load(Ordering::Acquire) {
            // Final checkpoint: what the shards handed over before the stop.
            glommio::yield_if_needed().await;
            let ok = core.checkpoint();
            core.shared.flushed.store(true, Ordering::Release);
            tracing::info!(ok, "final checkpoint written");
            return;
        }
        let (empty, tickets) = {
            let cp = core.cp.borrow();
            (cp.is_empty(), cp.pending().tickets)
        };
        if empty {
            // Idle: wait for records, waking now and then to see the stop flag.
            let wait = core.signal.wait();
            let _ = futures_lite::future::or(wait, async {
                glommio::timer::sleep(IDLE_POLL).await;
            })
            .await;
            continue;
        }
        if tickets == 0 {
            // Nobody waits: gather for up to the checkpoint interval.
            let since = core
                .first_pending
                .get()
                .map(|t| t.elapsed())
                .unwrap_or_default();
            if since < interval && !core.cp.borrow().is_over_limit() {
                glommio::timer::sleep(interval - since).await;
                continue;
            }
        }
        if !core.checkpoint() {
            // Wait for the database to come back before trying again.
            loop {
                glommio::timer::sleep(RECONNECT_PAUSE).await;
                if core.shared.stopping.load(Ordering::Acquire) {
                    break;
                }
                let ping = core.store.borrow_mut().ping();
                match ping {
                    Ok(()) => {
                        tracing::info!("durable store reachable again");
                        break;
                    }
                    Err(e) => tracing::warn!(error = %e, "durable store still unreachable"),
                }
            }
        }
        glommio::yield_if_needed().await;
    }
}
