//! std or loom, chosen by `--cfg pubsub_loom` (placeholder: filled by the sync work).
pub use std::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU8, AtomicUsize, Ordering};
pub use std::sync::Arc;
