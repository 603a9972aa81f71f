//! Tiny single-threaded wake-up helpers for tasks on one shard.
//!
//! A [`Signal`] lets a shard's handlers tell a task (a connection, the local inbox)
//! that it has work; a [`oneshot`] pair carries one answer back to a task that waits for
//! it (a purge count, a confirm). Both live on one executor thread, so `Cell` is
//! enough: no atomics, no locks.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// A level-triggered "you have work" flag with one waiting task.
#[derive(Default)]
pub struct Signal {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Signal {
    /// Marks work and wakes the waiting task, if any.
    pub fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Inside a `poll`: true (and cleared) if work was signalled, else registers `cx`.
    pub fn poll_take(&self, cx: &Context<'_>) -> bool {
        if self.set.replace(false) {
            return true;
        }
        *self.waker.borrow_mut() = Some(cx.waker().clone());
        false
    }

    /// Waits until work is signalled.
    pub fn wait(&self) -> SignalWait<'_> {
        SignalWait { s: self }
    }
}

/// Future returned by [`Signal::wait`].
pub struct SignalWait<'a> {
    s: &'a Signal,
}

impl Future for SignalWait<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.s.poll_take(cx) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

struct OneshotInner<T> {
    value: Option<T>,
    waker: Option<Waker>,
    closed: bool,
}

/// Sending half of a one-value channel between tasks of one shard.
pub struct OneshotTx<T> {
    inner: Rc<RefCell<OneshotInner<T>>>,
}

/// Receiving half: a future that resolves to the value, or `None` if the sender
/// was dropped without sending.
pub struct OneshotRx<T> {
    inner: Rc<RefCell<OneshotInner<T>>>,
}

/// A new one-value channel.
pub fn oneshot<T>() -> (OneshotTx<T>, OneshotRx<T>) {
    let inner = Rc::new(RefCell::new(OneshotInner {
        value: None,
        waker: None,
        closed: false,
    }));
    (
        OneshotTx {
            inner: inner.clone(),
        },
        OneshotRx { inner },
    )
}

impl<T> OneshotTx<T> {
    /// Delivers the value and wakes the receiver.
    pub fn send(self, v: T) {
        let waker = {
            let mut i = self.inner.borrow_mut();
            i.value = Some(v);
            i.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Drop for OneshotTx<T> {
    fn drop(&mut self) {
        let waker = {
            let mut i = self.inner.borrow_mut();
            i.closed = true;
            i.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Future for OneshotRx<T> {
    type Output = Option<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut i = self.inner.borrow_mut();
        if let Some(v) = i.value.take() {
            return Poll::Ready(Some(v));
        }
        if i.closed {
            return Poll::Ready(None);
        }
        i.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}
