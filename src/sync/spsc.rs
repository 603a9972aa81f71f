//! Bounded single-producer single-consumer ring: one per ordered pair of shards
//! (and between a shard and the persistence core). Wait-free on both sides.
//!
//! # Invariants
//!
//! * [`channel`] returns one [`Producer`] and one [`Consumer`]. Each is `Send` (for
//!   `T: Send`) but not `Clone`, and `push`/`pop` take `&mut self`, so at any moment
//!   exactly one thread pushes and exactly one thread pops.
//! * `head` and `tail` are free-running counters (they wrap at `usize::MAX`, which
//!   the `wrapping_*` arithmetic tolerates); slot of counter `i` is `i & mask`.
//!   `tail - head` is the number of items inside, always `<= capacity`.
//! * Only the producer writes `tail`; only the consumer writes `head`. Each side also
//!   keeps a private copy of its own counter and a cached, possibly stale, copy of
//!   the other side's counter, and reloads the shared one only when the cache says
//!   full (producer) or empty (consumer). A stale cache is always conservative.
//! * Slots `head..tail` hold initialised values owned by the ring; all other slots
//!   are uninitialised. The producer writes only slot `tail`, when it is outside
//!   `head..tail`; the consumer reads only slot `head`, when it is inside.
//!
//! # Orderings
//!
//! * Producer `tail.store(Release)` (publish) pairs with consumer `tail.load(Acquire)`:
//!   the slot write happens-before the consumer's read of it.
//! * Consumer `head.store(Release)` (free) pairs with producer `head.load(Acquire)`:
//!   the consumer's read of a slot happens-before the producer overwrites it.
//! * `Consumer::is_empty` loads `tail` with `Acquire`; in the park protocol of
//!   [`super::notify`] that load sits after the consumer's SeqCst fence and the
//!   producer's `tail.store` before its SeqCst fence (Dekker pairing).
//!
//! Dropping the last half drops every value still in `head..tail` exactly once.

use super::shim::{Arc, AtomicUsize, CachePadded, Ordering, UnsafeCell};
use core::mem::MaybeUninit;

/// Ordering of the producer's `tail` publish (`Release`); weakened to `Relaxed` only
/// by the loom mutation `spsc_relaxed_publish`, to prove a model catches it.
#[inline(always)]
fn publish() -> Ordering {
    #[cfg(pubsub_mutation)]
    if super::shim::mutated("spsc_relaxed_publish") {
        return Ordering::Relaxed;
    }
    Ordering::Release
}

/// Ordering of the consumer's `head` store that hands a slot back (`Release`);
/// weakened only by the loom mutation `spsc_relaxed_free`.
#[inline(always)]
fn free() -> Ordering {
    #[cfg(pubsub_mutation)]
    if super::shim::mutated("spsc_relaxed_free") {
        return Ordering::Relaxed;
    }
    Ordering::Release
}

/// The shared part of the ring.
struct Ring<T> {
    /// Next counter to pop. Written by the consumer only.
    head: CachePadded<AtomicUsize>,
    /// Next counter to push. Written by the producer only.
    tail: CachePadded<AtomicUsize>,
    /// `capacity - 1`; capacity is a power of two.
    mask: usize,
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
}

// SAFETY: values of `T` move from the producer's thread to the consumer's thread
// (hence `T: Send`); a slot is never accessed by both sides at once (module
// invariants), so sharing `&Ring<T>` needs no `T: Sync`.
unsafe impl<T: Send> Sync for Ring<T> {}
// SAFETY: as above; the ring owns values of `T` and drops them on whichever thread
// drops the last half.
unsafe impl<T: Send> Send for Ring<T> {}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        // `&mut self`: both halves are gone, every store is visible (the last `Arc`
        // drop synchronises with the other half's drop).
        let mut head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::Relaxed);
        while head != tail {
            if let Some(slot) = self.slots.get(head & self.mask) {
                // SAFETY: counters in `head..tail` hold initialised values that were
                // never popped; each is dropped once as `head` advances.
                slot.with_mut(|p| unsafe { (*p).assume_init_drop() });
            }
            head = head.wrapping_add(1);
        }
    }
}

/// Creates a ring holding at least `capacity` items (rounded up to a power of two,
/// at least 1).
pub fn channel<T>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    let cap = capacity
        .max(1)
        .checked_next_power_of_two()
        .unwrap_or(1 << (usize::BITS - 1));
    let slots: Box<[UnsafeCell<MaybeUninit<T>>]> = (0..cap)
        .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
        .collect();
    let ring = Arc::new(Ring {
        head: CachePadded(AtomicUsize::new(0)),
        tail: CachePadded(AtomicUsize::new(0)),
        mask: cap - 1,
        slots,
    });
    (
        Producer {
            ring: ring.clone(),
            tail: 0,
            cached_head: 0,
        },
        Consumer {
            ring,
            head: 0,
            cached_tail: 0,
        },
    )
}

/// The writing end; exactly one thread owns it.
pub struct Producer<T> {
    ring: Arc<Ring<T>>,
    /// Private copy of `ring.tail` (only we write it).
    tail: usize,
    /// Last `ring.head` we loaded; `<=` the real one.
    cached_head: usize,
}

/// The reading end; exactly one thread owns it.
pub struct Consumer<T> {
    ring: Arc<Ring<T>>,
    /// Private copy of `ring.head` (only we write it).
    head: usize,
    /// Last `ring.tail` we loaded; `<=` the real one.
    cached_tail: usize,
}

impl<T> Producer<T> {
    /// Appends `value`, or gives it back when the ring is full.
    pub fn push(&mut self, value: T) -> Result<(), T> {
        let ring = &*self.ring;
        let cap = ring.mask.wrapping_add(1);
        if self.tail.wrapping_sub(self.cached_head) >= cap {
            // Acquire pairs with the consumer's `head.store(free())`: its read of the
            // slot we are about to reuse happens-before our write.
            self.cached_head = ring.head.load(Ordering::Acquire);
            if self.tail.wrapping_sub(self.cached_head) >= cap {
                return Err(value);
            }
        }
        let Some(slot) = ring.slots.get(self.tail & ring.mask) else {
            return Err(value);
        };
        // SAFETY: counter `tail` is outside `head..tail`, so the consumer does not
        // touch this slot until we publish `tail + 1` below; its last read of the
        // slot happens-before this write (Acquire above). The slot is uninitialised
        // (its previous value was moved out by `pop`), so nothing is overwritten.
        slot.with_mut(|p| unsafe { (*p).write(value) });
        self.tail = self.tail.wrapping_add(1);
        // Release (`publish()`) pairs with the consumer's `tail.load(Acquire)`.
        ring.tail.store(self.tail, publish());
        Ok(())
    }

    /// The ring's capacity.
    pub fn capacity(&self) -> usize {
        self.ring.mask.wrapping_add(1)
    }

    /// True when the ring is full as far as the producer can tell right now.
    pub fn is_full(&self) -> bool {
        // Acquire pairs with the consumer's `head.store(free())`.
        let head = self.ring.head.load(Ordering::Acquire);
        self.tail.wrapping_sub(head) > self.ring.mask
    }
}

impl<T> Consumer<T> {
    /// Takes the oldest item.
    pub fn pop(&mut self) -> Option<T> {
        let ring = &*self.ring;
        if self.head == self.cached_tail {
            // Acquire pairs with the producer's `tail.store(publish())`: the slot
            // write happens-before our read.
            self.cached_tail = ring.tail.load(Ordering::Acquire);
            if self.head == self.cached_tail {
                return None;
            }
        }
        let slot = ring.slots.get(self.head & ring.mask)?;
        // SAFETY: counter `head` is inside `head..tail`, so the slot holds an
        // initialised value published by the producer (Acquire above); the producer
        // does not write it again until we publish `head + 1`. Reading moves the
        // value out and leaves the slot logically uninitialised.
        let value = slot.with(|p| unsafe { (*p).assume_init_read() });
        self.head = self.head.wrapping_add(1);
        // Release (`free()`) pairs with the producer's `head.load(Acquire)`.
        ring.head.store(self.head, free());
        Some(value)
    }

    /// True when nothing is waiting (a hint: the producer may push right after).
    pub fn is_empty(&self) -> bool {
        // Acquire pairs with the producer's `tail.store(publish())`. In the park
        // protocol this load follows `Notify::prepare_park`'s SeqCst fence.
        self.ring.tail.load(Ordering::Acquire) == self.head
    }

    /// Number of items waiting (a snapshot; may grow right after).
    pub fn len(&self) -> usize {
        self.ring
            .tail
            .load(Ordering::Acquire)
            .wrapping_sub(self.head)
    }

    /// The ring's capacity.
    pub fn capacity(&self) -> usize {
        self.ring.mask.wrapping_add(1)
    }
}

impl<T> core::fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Producer")
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl<T> core::fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Consumer")
            .field("capacity", &self.capacity())
            .finish()
    }
}
