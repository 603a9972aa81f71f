//! Epoch-swapped immutable value (API placeholder until the sync work lands).
use std::sync::{Arc, RwLock};

/// A value readers load without blocking and writers replace whole.
pub struct Snapshot<T> {
    cell: RwLock<Arc<T>>,
}
/// Keeps a loaded snapshot alive while it is read.
pub type Guard = crossbeam_epoch::Guard;
/// Pins the current thread's epoch.
pub fn pin() -> Guard {
    crossbeam_epoch::pin()
}

impl<T: Send + Sync + 'static> Snapshot<T> {
    /// A cell holding `value`.
    pub fn new(value: T) -> Self {
        Self {
            cell: RwLock::new(Arc::new(value)),
        }
    }
    /// The current value, valid while `guard` lives.
    pub fn load<'g>(&self, _guard: &'g Guard) -> &'g T {
        let a = self.cell.read().unwrap_or_else(|e| e.into_inner()).clone();
        // placeholder only: leaks, replaced by the epoch version
        Box::leak(Box::new(a))
    }
    /// Replaces the value with `f(current)` when `f` returns `Some`, retrying if another
    /// writer got in first. Returns what `f` returned last as the result.
    pub fn update<R>(&self, mut f: impl FnMut(&T) -> Result<T, R>) -> Result<(), R> {
        let mut w = self.cell.write().unwrap_or_else(|e| e.into_inner());
        let next = f(&w)?;
        *w = Arc::new(next);
        Ok(())
    }
}
