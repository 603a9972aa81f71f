//! An epoch-swapped immutable value: the routing topology that every shard reads
//! on every publish without a lock, and that declare/bind/delete commands replace
//! whole (copy-on-write).
//!
//! # Invariants
//!
//! * `current` always points at a fully built, heap-allocated `T` (never null).
//! * Any thread may [`Snapshot::load`] at any time while pinned ([`pin`]); the
//!   returned `&'g T` stays valid until that guard is dropped, because a replaced
//!   value is only handed to `Guard::defer_destroy`, which frees it after every
//!   thread pinned at that moment has unpinned.
//! * Any number of threads may [`Snapshot::update`] at once: each builds a new value
//!   from the one it loaded and installs it with a CAS; when another writer swapped
//!   first, the CAS fails and the closure runs again on the newer value, so no
//!   update is lost.
//! * `T: Send + Sync + 'static`: readers share `&T` across threads and the epoch
//!   collector may drop a replaced value later on any thread.
//!
//! # Orderings
//!
//! * The successful CAS is `Release` (via `AcqRel`, `publish()`): it pairs with
//!   `load(Acquire)` in readers and writers, so everything written while building the
//!   new value happens-before any read through the pointer.
//! * A failed CAS and the writer's initial load are `Acquire` for the same reason
//!   (the closure reads the value another writer built).
//! * Reclamation safety comes from crossbeam-epoch's own fences in `pin` and
//!   `defer_destroy`, not from these orderings.

use super::shim::epoch::{self, Atomic, Owned};
use super::shim::Ordering;

/// Keeps a loaded snapshot alive while it is read.
pub type Guard = epoch::Guard;

/// Pins the current thread's epoch: values loaded under the guard stay alive until
/// it is dropped. Keep guards short-lived; a pinned thread delays reclamation.
pub fn pin() -> Guard {
    epoch::pin()
}

/// Success ordering of the installing CAS (`AcqRel`); weakened to `Relaxed` only by
/// the loom mutation `snapshot_relaxed_publish`.
#[inline(always)]
fn publish() -> Ordering {
    #[cfg(pubsub_mutation)]
    if super::shim::mutated("snapshot_relaxed_publish") {
        return Ordering::Relaxed;
    }
    Ordering::AcqRel
}

/// Readers' load ordering (`Acquire`); weakened only by `snapshot_relaxed_publish`.
#[inline(always)]
fn load_ordering() -> Ordering {
    #[cfg(pubsub_mutation)]
    if super::shim::mutated("snapshot_relaxed_publish") {
        return Ordering::Relaxed;
    }
    Ordering::Acquire
}

/// A value readers load without blocking and writers replace whole.
pub struct Snapshot<T: Send + Sync + 'static> {
    current: Atomic<T>,
}

impl<T: Send + Sync + 'static> Snapshot<T> {
    /// A cell holding `value`.
    pub fn new(value: T) -> Self {
        Self {
            current: Atomic::new(value),
        }
    }

    /// The current value, valid while `guard` lives.
    pub fn load<'g>(&self, guard: &'g Guard) -> &'g T {
        // Acquire (`load_ordering()`) pairs with the installing CAS's Release (`publish()`).
        let shared = self.current.load(load_ordering(), guard);
        // SAFETY: `current` is never null (set in `new`, replaced only by non-null
        // values) and points at a fully built `T` (Acquire above). A replaced value is
        // only `defer_destroy`ed, and this thread is pinned by `guard`, so the value
        // outlives `'g`. `Drop` also defers (see there), so dropping `self` while the
        // reference lives is sound too.
        unsafe { shared.deref() }
    }

    /// Replaces the value with what `f(current)` returns in `Ok`, retrying with the
    /// newer value if another writer swapped first (so `f` may run several times and
    /// should be pure). When `f` returns `Err`, nothing changes and the error is
    /// returned.
    pub fn update<R>(&self, mut f: impl FnMut(&T) -> Result<T, R>) -> Result<(), R> {
        let guard = epoch::pin();
        // Acquire pairs with the `publish()` CAS of whoever installed the current value.
        let mut current = self.current.load(Ordering::Acquire, &guard);
        loop {
            // SAFETY: non-null and alive while `guard` is pinned (same argument as
            // in `load`).
            let next = Owned::new(f(unsafe { current.deref() })?);
            #[cfg(pubsub_mutation)]
            if super::shim::mutated("snapshot_store_not_cas") {
                // Mutation: blind swap, so a concurrent update is lost.
                let old = self.current.swap(next, publish(), &guard);
                // SAFETY: `old` is unlinked by the swap, deferred once (mutation only).
                unsafe { guard.defer_destroy(old) };
                return Ok(());
            }
            match self
                .current
                .compare_exchange(current, next, publish(), Ordering::Acquire, &guard)
            {
                Ok(_) => {
                    // SAFETY: `current` is unlinked by the successful CAS, so no new
                    // reader can load it; readers pinned earlier keep it alive until
                    // they unpin, which is what `defer_destroy` waits for. It is
                    // deferred exactly once: only the winning CAS owns it.
                    unsafe { guard.defer_destroy(current) };
                    return Ok(());
                }
                Err(e) => {
                    // Another writer won: rebuild from its value (dropping ours).
                    current = e.current;
                }
            }
        }
    }

    /// Replaces the value unconditionally.
    pub fn store(&self, value: T) {
        let guard = epoch::pin();
        let old = self.current.swap(Owned::new(value), publish(), &guard);
        // SAFETY: `old` is unlinked by the swap and deferred exactly once (only this
        // swap returned it); pinned readers keep it alive.
        unsafe { guard.defer_destroy(old) };
    }
}

impl<T: Send + Sync + 'static> Drop for Snapshot<T> {
    fn drop(&mut self) {
        let guard = epoch::pin();
        let current = self.current.load(Ordering::Acquire, &guard);
        // SAFETY: `&mut self`: no thread can load from this cell any more, but a
        // reference returned by `load` may still be alive under another guard
        // (its lifetime is the guard's, not the cell's), so the value is deferred
        // rather than freed now; it was never deferred before (it is current).
        unsafe { guard.defer_destroy(current) };
    }
}

impl<T: Send + Sync + 'static + core::fmt::Debug> core::fmt::Debug for Snapshot<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let guard = pin();
        f.debug_tuple("Snapshot").field(self.load(&guard)).finish()
    }
}
