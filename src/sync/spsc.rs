//! Bounded SPSC ring (API placeholder until the sync work lands).
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Creates a ring holding at least `capacity` items (rounded up to a power of two).
pub fn channel<T>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    let q = Arc::new(Mutex::new(VecDeque::with_capacity(capacity)));
    (
        Producer {
            q: q.clone(),
            cap: capacity.next_power_of_two(),
        },
        Consumer { q },
    )
}

/// The writing end; exactly one thread owns it.
pub struct Producer<T> {
    q: Arc<Mutex<VecDeque<T>>>,
    cap: usize,
}
/// The reading end; exactly one thread owns it.
pub struct Consumer<T> {
    q: Arc<Mutex<VecDeque<T>>>,
}

impl<T> Producer<T> {
    /// Appends `value`, or gives it back when the ring is full.
    pub fn push(&mut self, value: T) -> Result<(), T> {
        let mut q = self.q.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= self.cap {
            return Err(value);
        }
        q.push_back(value);
        Ok(())
    }
    /// The ring's capacity.
    pub fn capacity(&self) -> usize {
        self.cap
    }
}
impl<T> Consumer<T> {
    /// Takes the oldest item.
    pub fn pop(&mut self) -> Option<T> {
        self.q.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
    }
    /// True when nothing is waiting (a hint: the producer may push right after).
    pub fn is_empty(&self) -> bool {
        self.q.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }
}
