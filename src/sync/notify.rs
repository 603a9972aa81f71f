//! The park/wake flag that lets a consumer sleep on a doorbell (an eventfd, a
//! futex, a loom `Notify`) without losing a wake-up from a producer on another
//! thread. It does not sleep itself; it only tells each side what to do.
//!
//! # Protocol
//!
//! Consumer (one thread, the owner of the source: a ring's [`Consumer`], a
//! [`MsgQueue`]'s home shard):
//!
//! ```text
//! loop {
//!     while let Some(x) = source.pop() { handle(x) }
//!     notify.prepare_park();
//!     if !source.is_empty() { notify.cancel_park(); continue; }
//!     doorbell.wait();
//!     notify.cancel_park();   // woken: harmless if a producer already cleared it
//! }
//! ```
//!
//! Producer (any thread): `source.push(x); if notify.should_wake() { doorbell.ring() }`.
//!
//! # Why no wake-up is lost (Dekker pairing)
//!
//! Consumer: write `parked = true` → **SeqCst fence F1** → load the source's
//! emptiness word. Producer: store the source's emptiness word (the ring's `tail`,
//! the queue slot's `ready`) → **SeqCst fence F2** → load `parked`. All SeqCst
//! fences are totally ordered. If F1 precedes F2, the producer's load of `parked`
//! sees `true` (or a later write: only another producer's `swap`, which then rings)
//! and it rings. If F2 precedes F1, the consumer's emptiness check sees the push and
//! it does not sleep. Either way the item is not stranded.
//!
//! `should_wake` skips the read-modify-write while `parked` is false, so a busy
//! consumer costs producers one fence and one shared load, never a cache-line
//! steal. The `swap` makes at most one producer ring per park.
//!
//! [`Consumer`]: super::spsc::Consumer
//! [`MsgQueue`]: super::mpsc::MsgQueue

use super::shim::{AtomicBool, CachePadded, Ordering};

/// The SeqCst fence at the heart of the protocol; removed only by the loom
/// mutation `notify_no_fence` to prove the model catches the lost wake-up.
#[inline]
fn dekker_fence() {
    #[cfg(pubsub_mutation)]
    if super::shim::mutated("notify_no_fence") {
        return;
    }
    super::shim::fence(Ordering::SeqCst);
}

/// A consumer announces it is about to sleep; a producer learns whether to wake it.
#[derive(Debug)]
pub struct Notify {
    /// True from `prepare_park` until `cancel_park` or a producer's `should_wake`.
    parked: CachePadded<AtomicBool>,
}

impl Default for Notify {
    fn default() -> Self {
        Self::new()
    }
}

impl Notify {
    /// A flag with the consumer awake.
    pub fn new() -> Self {
        Self {
            parked: CachePadded(AtomicBool::new(false)),
        }
    }

    /// Consumer: about to sleep. It must re-check its source after this and call
    /// [`Notify::cancel_park`] if work arrived.
    pub fn prepare_park(&self) {
        // The ordering comes from the fence right after it (F1), which pairs with
        // the producer's fence F2 in `should_wake`. A swap rather than a store:
        // a read-modify-write is placed after every earlier write to `parked` in
        // its modification order (a producer's `swap(false)` included), which a
        // plain store gets only implicitly; loom models the former exactly and
        // reports a false lost wake-up for the latter. This is the park path,
        // so the RMW costs nothing that matters.
        self.parked.swap(true, Ordering::Relaxed);
        dekker_fence();
    }

    /// Consumer: not sleeping after all (or woken).
    pub fn cancel_park(&self) {
        // Relaxed: a producer that still reads the old `true` just rings once more
        // than needed (a spurious wake-up). A swap for the same reason as in
        // `prepare_park`.
        self.parked.swap(false, Ordering::Relaxed);
    }

    /// Producer, after publishing work: true when the consumer was parked and the
    /// caller must ring its doorbell. At most one producer gets `true` per park.
    pub fn should_wake(&self) -> bool {
        // F2: pairs with the consumer's F1 in `prepare_park`; orders our earlier
        // publish (ring `tail` store / queue slot `ready` store) before this load.
        dekker_fence();
        if !self.parked.load(Ordering::Relaxed) {
            return false;
        }
        // AcqRel RMW: exactly one producer takes the `true`.
        self.parked.swap(false, Ordering::AcqRel)
    }

    /// True between `prepare_park` and the matching wake or cancel (diagnostics).
    pub fn is_parked(&self) -> bool {
        self.parked.load(Ordering::Relaxed)
    }
}
