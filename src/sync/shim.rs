//! std or loom, chosen at compile time, so the same `src/sync/*` files run in the
//! broker and under the loom model checker in `loom-tests/`.
//!
//! Every file in `src/sync/` takes its atomics, fences, `UnsafeCell`, `Arc`, threads,
//! spin hint and epoch collector from here and from nowhere else (the pattern
//! crossbeam uses). Under `--cfg pubsub_loom` (set only by `scripts/loom` for the
//! `loom-tests` crate) they come from `loom`; otherwise from `std`. A namespaced cfg
//! is used instead of plain `cfg(loom)` so dependencies that test `cfg(loom)` do not
//! flip by accident. crossbeam-epoch is re-exported unchanged: under loom it is built
//! with its own `loom` feature and `--cfg crossbeam_loom`, which makes its internals
//! loom-aware.
//!
//! [`UnsafeCell`] follows loom's API (`with` / `with_mut` taking a closure over a raw
//! pointer) so loom can check every access for data races; the std version is a
//! zero-cost wrapper over `core::cell::UnsafeCell`.

#[cfg(pubsub_loom)]
pub use loom::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU8, AtomicUsize, Ordering};
#[cfg(not(pubsub_loom))]
pub use std::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU8, AtomicUsize, Ordering};

#[cfg(pubsub_loom)]
pub use loom::sync::Arc;
#[cfg(not(pubsub_loom))]
pub use std::sync::Arc;

#[cfg(pubsub_loom)]
pub use loom::thread;
#[cfg(not(pubsub_loom))]
pub use std::thread;

#[cfg(pubsub_loom)]
pub use loom::cell::UnsafeCell;

/// The epoch-based reclamation crate (loom-aware under `crossbeam_loom`).
pub use crossbeam_epoch as epoch;

/// Mutation testing (loom-tests only, `--cfg pubsub_mutation`): true when the
/// environment variable `PUBSUB_MUTATION` names `name`, so one build of the models
/// can run every deliberate weakening in turn. Without the cfg this function does
/// not exist and no mutation can reach shipped code.
#[cfg(pubsub_mutation)]
pub fn mutated(name: &str) -> bool {
    std::env::var("PUBSUB_MUTATION").is_ok_and(|m| m == name)
}

/// Called inside every busy-wait loop. Under loom it yields, so the model checker
/// schedules the thread being waited on instead of spinning forever.
#[inline]
pub fn spin_loop() {
    #[cfg(pubsub_loom)]
    loom::thread::yield_now();
    #[cfg(not(pubsub_loom))]
    std::hint::spin_loop();
}

/// Pads and aligns a value to 128 bytes so two hot indices written by different
/// threads never share a cache line (128 covers the adjacent-line prefetcher on
/// x86_64 and the 128-byte lines of Apple's aarch64 cores).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct CachePadded<T>(pub T);

impl<T> core::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// `core::cell::UnsafeCell` with loom's closure-based access API.
#[cfg(not(pubsub_loom))]
#[derive(Debug, Default)]
pub struct UnsafeCell<T>(core::cell::UnsafeCell<T>);

#[cfg(not(pubsub_loom))]
impl<T> UnsafeCell<T> {
    /// Wraps `value`.
    #[inline]
    pub const fn new(value: T) -> Self {
        Self(core::cell::UnsafeCell::new(value))
    }

    /// Runs `f` with a shared raw pointer to the contents. The caller of any
    /// dereference guarantees no concurrent `with_mut` access.
    #[inline]
    pub fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    /// Runs `f` with an exclusive raw pointer to the contents. The caller of any
    /// dereference guarantees no concurrent access of any kind.
    #[inline]
    pub fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}
