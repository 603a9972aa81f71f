//! Unbounded multi-producer queue: a queue's inbox. Exchange routers on any shard
//! push; the queue's home shard pops. Items live in linked blocks of
//! [`BLOCK_CAP`] slots, so a push allocates only once per block, not per item.
//!
//! # Invariants
//!
//! * Counters: `tail.index` counts claimed positions, `head.index` consumed ones.
//!   Position `i` lies in lap `i / LAP` at offset `i % LAP`; offsets
//!   `0..BLOCK_CAP` are slots, offset `BLOCK_CAP` is a marker meaning "the next
//!   block is being installed" (producers wait on it, it never holds an item).
//!   `LAP` divides `2^usize::BITS`, so `wrapping_add` keeps offsets consistent.
//!   (Under loom `BLOCK_CAP` is 2 so models cross blocks with three items.)
//! * Each lap has exactly one block. `tail.block` is the block of `tail.index`'s lap;
//!   `head.block` the block of `head.index`'s lap.
//! * [`MsgQueue::push`] may run on any number of threads at once: a producer claims
//!   a position with a CAS on `tail.index`, then writes its slot and sets the slot's
//!   `ready`. The producer that claims the last slot of a block (the *installer*)
//!   links the next block (`block.next`), points `tail.block` at it and moves
//!   `tail.index` past the marker, all before writing its own slot.
//! * [`MsgQueue::pop`] is meant for one thread (the home shard) but is sound from
//!   several: the consumer side is serialised by `head.popping`, a try-acquire flag
//!   (uncontended in correct use, so it costs one CAS on a line only the consumer
//!   touches). Only the flag holder writes `head.index` / `head.block` and retires
//!   blocks. Pop never waits on a producer: a claimed but not yet `ready` slot reads
//!   as empty, and that producer's `Notify::should_wake` will ring after it finishes.
//! * A block is retired (handed to `Guard::defer_destroy`) by the consumer when it
//!   consumes the block's last slot. By then every slot of it has been claimed and
//!   made `ready`, so every producer that will ever write it has finished. A producer
//!   dereferences a block only after its CAS succeeded on a position of that block's
//!   lap, i.e. while its own slot is not yet `ready` and the block cannot be retired;
//!   a producer whose CAS fails never dereferences the block it loaded. Producers
//!   therefore need no epoch pin. [`MsgQueue::is_empty`] may run on any thread and
//!   reads `head.block` without the flag, so it pins: that is what the epoch
//!   deferral protects.
//! * FIFO per producer: a producer's later push claims a larger position; the
//!   consumer takes positions in order. Across producers, claim order.
//!
//! # Orderings
//!
//! * `slot.ready.store(Release)` (`ready()`) pairs with the consumer's
//!   `ready.load(Acquire)`: the slot write (and, for the installer, `block.next`)
//!   happens-before the consumer's read. It is also the "publish" store that the
//!   consumer's `is_empty` reads after `Notify::prepare_park`'s SeqCst fence.
//! * The installer's `tail.index.store(Release)` pairs with producers'
//!   `tail.index.load(Acquire)`: the `tail.block` store before it is visible, so a
//!   producer that reads an index of the new lap also reads the new block.
//!   Producers' claim CAS is `AcqRel`, keeping that release sequence unbroken and
//!   ordering each claimant's `tail.block` load before the next installer's store.
//! * `head.popping` CAS `Acquire` / release store `Release`: the previous holder's
//!   `head` writes are visible to the next holder.
//! * `head.index` then `head.block` stores `Release` pair with `is_empty`'s
//!   `Acquire` loads of `head.block` then `head.index` (another thread that sees a
//!   new block also sees its index).

use super::shim::epoch::{self, Shared};
use super::shim::UnsafeCell;
use super::shim::{spin_loop, AtomicBool, AtomicPtr, AtomicUsize, CachePadded, Ordering};
use core::marker::PhantomData;
use core::mem::MaybeUninit;
use core::ptr;

/// Slots per block. 31 + the marker makes a lap of 32 positions. Under loom the
/// block is tiny so a handful of pushes crosses a block boundary.
#[cfg(not(pubsub_loom))]
pub const BLOCK_CAP: usize = 31;
/// Slots per block (loom build: tiny, so models cross block boundaries).
#[cfg(pubsub_loom)]
pub const BLOCK_CAP: usize = 2;
/// Positions per lap: the slots plus the install marker.
const LAP: usize = BLOCK_CAP + 1;
// Counters wrap at 2^usize::BITS; a power-of-two lap keeps offsets consistent across
// the wrap. (The loom build never gets near a wrap, so its lap of 3 is fine.)
#[cfg(not(pubsub_loom))]
const _: () = assert!(LAP.is_power_of_two(), "LAP must divide 2^usize::BITS");

/// Ordering of the producer's `ready` store (`Release`); weakened only by the loom
/// mutation `mpsc_relaxed_ready`.
#[inline(always)]
fn ready() -> Ordering {
    #[cfg(pubsub_mutation)]
    if super::shim::mutated("mpsc_relaxed_ready") {
        return Ordering::Relaxed;
    }
    Ordering::Release
}

struct Slot<T> {
    value: UnsafeCell<MaybeUninit<T>>,
    /// Set once, by the producer that claimed this slot, after writing `value`.
    ready: AtomicBool,
}

struct Block<T> {
    /// The next lap's block; set once by this block's installer.
    next: AtomicPtr<Block<T>>,
    slots: [Slot<T>; BLOCK_CAP],
}

impl<T> Block<T> {
    fn new_boxed() -> Box<Self> {
        Box::new(Block {
            next: AtomicPtr::new(ptr::null_mut()),
            slots: core::array::from_fn(|_| Slot {
                value: UnsafeCell::new(MaybeUninit::uninit()),
                ready: AtomicBool::new(false),
            }),
        })
    }
}

struct Head<T> {
    /// Next position to pop; never a marker. Written only by the `popping` holder.
    index: AtomicUsize,
    /// Block of `index`'s lap. Written only by the `popping` holder.
    block: AtomicPtr<Block<T>>,
    /// Consumer-side try-acquire flag.
    popping: AtomicBool,
}

struct Tail<T> {
    /// Next position to claim (may sit on a marker while a block is installed).
    index: AtomicUsize,
    /// Block of `index`'s lap.
    block: AtomicPtr<Block<T>>,
}

/// An unbounded FIFO inbox: any thread may push; pops are meant for one thread
/// (sound, but serialised, from several).
pub struct MsgQueue<T> {
    head: CachePadded<Head<T>>,
    tail: CachePadded<Tail<T>>,
    _owns: PhantomData<T>,
}

// SAFETY: values of `T` move from pushing threads to the popping thread, so
// `T: Send` suffices; slots are never accessed concurrently (module invariants) and
// no `&T` is ever shared, so no `T: Sync` is needed.
unsafe impl<T: Send> Send for MsgQueue<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for MsgQueue<T> {}

impl<T> Default for MsgQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Releases `head.popping` on drop (also on unwind).
struct PopGuard<'a>(&'a AtomicBool);

impl Drop for PopGuard<'_> {
    fn drop(&mut self) {
        // Release pairs with the next holder's Acquire CAS.
        self.0.store(false, Ordering::Release);
    }
}

impl<T> MsgQueue<T> {
    /// An empty queue (allocates its first block).
    pub fn new() -> Self {
        let first = Box::into_raw(Block::<T>::new_boxed());
        Self {
            head: CachePadded(Head {
                index: AtomicUsize::new(0),
                block: AtomicPtr::new(first),
                popping: AtomicBool::new(false),
            }),
            tail: CachePadded(Tail {
                index: AtomicUsize::new(0),
                block: AtomicPtr::new(first),
            }),
            _owns: PhantomData,
        }
    }

    /// Appends at the tail. Lock-free except while another producer installs the
    /// next block (a few stores), when it spins.
    pub fn push(&self, value: T) {
        let mut spare: Option<Box<Block<T>>> = None;
        loop {
            // Acquire pairs with the installer's `tail.index.store(Release)` (through
            // the claim CASes' release sequence): `tail.block` below is this lap's.
            let tail = self.tail.index.load(Ordering::Acquire);
            let offset = tail % LAP;
            if offset == BLOCK_CAP {
                // Another producer is installing the next block.
                spin_loop();
                continue;
            }
            let block = self.tail.block.load(Ordering::Acquire);
            let installs = offset + 1 == BLOCK_CAP;
            if installs && spare.is_none() {
                // Allocate before claiming so the window where others wait is short.
                spare = Some(Block::new_boxed());
            }
            // AcqRel: see the module's Orderings. Relaxed on failure: we reload.
            if self
                .tail
                .index
                .compare_exchange_weak(
                    tail,
                    tail.wrapping_add(1),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_err()
            {
                spin_loop();
                continue;
            }
            // SAFETY: our CAS succeeded on a position of `block`'s lap (a claimant's
            // `tail.block` load is ordered before the next installer's store, see
            // Orderings), so `block` is that lap's live block; it cannot be retired
            // before our slot is `ready`, which we set last.
            let block = unsafe { &*block };
            if installs {
                let next = Box::into_raw(spare.take().unwrap_or_else(Block::new_boxed));
                // Release: pairs with the consumer's `next.load(Acquire)` (it also
                // reaches the consumer through our `ready()` store below).
                block.next.store(next, Ordering::Release);
                self.tail.block.store(next, Ordering::Release);
                // Skip the marker: first position of the next lap. Release pairs with
                // producers' `tail.index.load(Acquire)`.
                self.tail
                    .index
                    .store(tail.wrapping_add(2), Ordering::Release);
            }
            if let Some(slot) = block.slots.get(offset) {
                // SAFETY: we own position `tail` (successful CAS); no other producer
                // writes this slot and the consumer reads it only after `ready`.
                slot.value.with_mut(|p| unsafe { (*p).write(value) });
                // `ready()` (Release) pairs with the consumer's `ready.load(Acquire)` and
                // precedes the producer's SeqCst fence in `Notify::should_wake`.
                slot.ready.store(true, ready());
            }
            return;
        }
    }

    /// Takes the oldest ready item. `None` when empty, or when the oldest claimed
    /// slot is still being written by its producer (who will wake the consumer).
    pub fn pop(&self) -> Option<T> {
        if self.nothing_claimed() {
            return None;
        }
        let _held = self.lock_consumer();
        self.pop_held()
    }

    /// The fast path of `pop` and `drain`, loads only: when no position past `head`
    /// is claimed the queue is empty, and an idle consumer polling it pays no
    /// read-modify-write. For the single consumer `head.index` is its own exact
    /// value; `tail.index` only grows, so equality means nothing was claimed when it
    /// was read. (With several poppers this may miss an item pushed meanwhile, like
    /// any racing pop.) Acquire pairs with the claim CAS / installer store. The park
    /// protocol relies on `is_empty`, not on this check.
    fn nothing_claimed(&self) -> bool {
        let head = self.head.index.load(Ordering::Acquire);
        self.tail.index.load(Ordering::Acquire) == head
    }

    /// Takes every item that is ready, oldest first, handing each to `f`; returns
    /// how many. One consumer-flag acquisition and no `tail.index` read per item, so
    /// a consumer draining a busy inbox does not pull the producers' tail line into
    /// its cache once per message (which also spares the producers' next claim a
    /// cache miss). Stops at the first slot not yet `ready` (its producer wakes the
    /// consumer after finishing it, as for `pop`). `head` is stored before each item
    /// is handed over, so a panicking `f` cannot make an item be taken twice. `f`
    /// must not pop this queue (the flag is held while it runs).
    pub fn drain(&self, mut f: impl FnMut(T)) -> usize {
        if self.nothing_claimed() {
            return 0;
        }
        let _held = self.lock_consumer();
        let mut n = 0;
        while let Some(value) = self.pop_held() {
            n += 1;
            f(value);
        }
        n
    }

    /// The body of `pop`; only called with the consumer flag held.
    fn pop_held(&self) -> Option<T> {
        // Relaxed: only the flag holder writes these; the flag's Acquire made the
        // previous holder's writes visible.
        let head = self.head.index.load(Ordering::Relaxed);
        let block_ptr = self.head.block.load(Ordering::Relaxed);
        // SAFETY: `head.block` is never null and is retired only by a flag holder
        // after it stops being `head.block`; we hold the flag.
        let block = unsafe { &*block_ptr };
        let offset = head % LAP;
        let slot = block.slots.get(offset)?;
        // Acquire pairs with the producer's `ready()` store.
        if !slot.ready.load(Ordering::Acquire) {
            return None;
        }
        // SAFETY: `ready` means the producer finished writing (Acquire above) and
        // will not touch the slot again; position `head` is consumed once (only the
        // flag holder advances `head`), so the value is moved out exactly once.
        let value = slot.value.with(|p| unsafe { (*p).assume_init_read() });
        if offset + 1 == BLOCK_CAP {
            // Last slot: its producer was the installer, which linked `next` before
            // its `ready()` store, so `next` is non-null here.
            let mut next = block.next.load(Ordering::Acquire);
            while next.is_null() {
                // Unreachable by the invariant; waiting is the safe fallback.
                spin_loop();
                next = block.next.load(Ordering::Acquire);
            }
            // Index first, then block, both Release: `is_empty` loads the block
            // (Acquire) before the index, so seeing the new block implies seeing
            // the new index; a torn read can only pair a new index with the old
            // block, whose slots are all `ready`, i.e. err towards "not empty".
            self.head
                .index
                .store(head.wrapping_add(2), Ordering::Release);
            self.head.block.store(next, Ordering::Release);
            let guard = epoch::pin();
            // SAFETY: the block is unlinked from `head.block` (stored above) and
            // `tail.block` (the installer moved it on); all its slots are consumed
            // and every producer is done with it (module invariants). Only readers
            // pinned in `is_empty` may still hold it, and `defer_destroy` waits for
            // them. Retired once: only the holder that consumed its last slot.
            // `Block` has no drop glue for `T` (slots are `MaybeUninit`).
            unsafe { guard.defer_destroy(Shared::from(block_ptr as *const Block<T>)) };
        } else {
            self.head
                .index
                .store(head.wrapping_add(1), Ordering::Release);
        }
        Some(value)
    }

    /// True when the next item is not ready yet. Exact on the consumer's thread
    /// (this is the check `Notify`'s park protocol needs); on other threads a
    /// hint, possibly stale, always memory-safe.
    pub fn is_empty(&self) -> bool {
        let _guard = epoch::pin();
        // Acquire pairs with the holder's Release stores in `pop`.
        let block_ptr = self.head.block.load(Ordering::Acquire);
        let head = self.head.index.load(Ordering::Acquire);
        // SAFETY: non-null; loaded while pinned, and blocks are retired through
        // `defer_destroy` only after being unlinked, so it stays allocated until
        // `_guard` drops. A torn pair (index newer than block, see `pop`) still
        // indexes a live block in bounds; it only errs towards "not empty".
        let block = unsafe { &*block_ptr };
        match block.slots.get(head % LAP) {
            // Acquire pairs with `ready()`; in the park protocol this load follows the
            // consumer's SeqCst fence.
            Some(slot) => !slot.ready.load(Ordering::Acquire),
            None => true,
        }
    }

    /// Acquires the consumer side, waiting while another thread pops.
    fn lock_consumer(&self) -> PopGuard<'_> {
        #[cfg(pubsub_mutation)]
        if super::shim::mutated("mpsc_no_consumer_lock") {
            return PopGuard(&self.head.popping);
        }
        // Acquire pairs with the previous holder's Release in `PopGuard::drop`.
        while self
            .head
            .popping
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spin_loop();
        }
        PopGuard(&self.head.popping)
    }
}

impl<T> Drop for MsgQueue<T> {
    fn drop(&mut self) {
        // `&mut self`: every push and pop has returned and their effects are
        // visible (whatever gave us `&mut` synchronised with them).
        let mut index = self.head.index.load(Ordering::Relaxed);
        let tail = self.tail.index.load(Ordering::Relaxed);
        let mut block = self.head.block.load(Ordering::Relaxed);
        while index != tail && !block.is_null() {
            let offset = index % LAP;
            if offset == BLOCK_CAP {
                // SAFETY: `block` is live and owned by the queue (not yet retired:
                // it is at or after `head.block`); nothing else references it.
                let next = unsafe { &*block }.next.load(Ordering::Relaxed);
                // SAFETY: as above; freed once, we move on to `next`.
                drop(unsafe { Box::from_raw(block) });
                block = next;
            } else {
                // SAFETY: live block, see above.
                let b = unsafe { &*block };
                if let Some(slot) = b.slots.get(offset) {
                    if slot.ready.load(Ordering::Relaxed) {
                        // SAFETY: position in `head..tail`, ready and not consumed:
                        // initialised and owned by the queue; dropped once.
                        slot.value.with_mut(|p| unsafe { (*p).assume_init_drop() });
                    }
                }
            }
            index = index.wrapping_add(1);
        }
        if !block.is_null() {
            // SAFETY: the tail block (its `next` is null: no position of the next
            // lap was claimed); live, owned, freed once.
            drop(unsafe { Box::from_raw(block) });
        }
    }
}

impl<T> core::fmt::Debug for MsgQueue<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MsgQueue")
            .field("is_empty", &self.is_empty())
            .finish()
    }
}
