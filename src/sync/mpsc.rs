//! Unbounded multi-producer queue (API placeholder until the sync work lands).
use std::collections::VecDeque;
use std::sync::Mutex;

/// Any thread may push; pops are safe from any thread too.
pub struct MsgQueue<T> {
    q: Mutex<VecDeque<T>>,
}
impl<T> Default for MsgQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}
impl<T> MsgQueue<T> {
    /// An empty queue.
    pub fn new() -> Self {
        Self {
            q: Mutex::new(VecDeque::new()),
        }
    }
    /// Appends at the tail.
    pub fn push(&self, value: T) {
        self.q
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(value)
    }
    /// Takes from the head.
    pub fn pop(&self) -> Option<T> {
        self.q.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
    }
    /// True when empty (a hint under concurrency).
    pub fn is_empty(&self) -> bool {
        self.q.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }
}
