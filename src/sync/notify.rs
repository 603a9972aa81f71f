//! Park/wake flag (API placeholder until the sync work lands).
use std::sync::atomic::{AtomicBool, Ordering};

/// A consumer announces it is about to sleep; a producer learns whether to wake it.
#[derive(Default)]
pub struct Notify {
    parked: AtomicBool,
}
impl Notify {
    /// A flag with the consumer awake.
    pub fn new() -> Self {
        Self::default()
    }
    /// Consumer: about to sleep. It must re-check its source after this and call
    /// [`Notify::cancel_park`] if work arrived.
    pub fn prepare_park(&self) {
        self.parked.store(true, Ordering::SeqCst);
    }
    /// Consumer: not sleeping after all (or woken).
    pub fn cancel_park(&self) {
        self.parked.store(false, Ordering::SeqCst);
    }
    /// Producer, after publishing work: true when the consumer was parked and the
    /// caller must ring its doorbell. At most one producer gets `true` per park.
    pub fn should_wake(&self) -> bool {
        self.parked.swap(false, Ordering::SeqCst)
    }
}
