//! Doorbells: how one executor wakes another that has parked.
//!
//! A doorbell is a connected pair of non-blocking Unix stream sockets. The ringing
//! side writes one byte (a `write` that finds the buffer full is fine: the bell is
//! already ringing); the parked side awaits readability through the executor's
//! io_uring, like any socket, and drains what is there. The rings themselves carry the
//! data; [`crate::sync::notify::Notify`] makes sure the bell is rung only when the
//! other side has announced it is going to sleep, so a busy link costs no syscall.
//!
//! Both ends are created before the executors start, so there is nothing to connect
//! at start-up: the receiving end only has to be registered with its executor
//! ([`BellRxStd::register`]).

use std::io::{self, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;

use futures_lite::AsyncReadExt;

/// Bytes drained per wake-up.
const DRAIN: usize = 64;

/// The ringing end (any thread; `Send`).
pub struct BellTx {
    sock: UnixStream,
}

/// The parked end before it is registered with its executor (`Send`).
pub struct BellRxStd {
    sock: UnixStream,
}

/// The parked end, registered with the executor it wakes.
pub struct BellRx {
    sock: glommio::net::UnixStream,
    buf: [u8; DRAIN],
}

/// A new doorbell.
pub fn bell() -> io::Result<(BellTx, BellRxStd)> {
    let (tx, rx) = UnixStream::pair()?;
    tx.set_nonblocking(true)?;
    rx.set_nonblocking(true)?;
    Ok((BellTx { sock: tx }, BellRxStd { sock: rx }))
}

impl BellTx {
    /// Wakes the other side (never blocks).
    pub fn ring(&self) {
        match (&self.sock).write(&[1]) {
            Ok(_) => {}
            // Full buffer: plenty of unread rings already.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::error!(error = %e, "doorbell write failed"),
        }
    }
}

impl BellRxStd {
    /// Hands the socket to the executor this runs on.
    pub fn register(self) -> BellRx {
        let fd = self.sock.into_raw_fd();
        // SAFETY: `fd` is an open, non-blocking, connected Unix stream socket that we
        // own (just released by `into_raw_fd`); ownership passes to the glommio stream,
        // which closes it on drop. No other handle to it exists.
        let sock = unsafe { <glommio::net::UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        BellRx {
            sock,
            buf: [0; DRAIN],
        }
    }
}

impl BellRx {
    /// Waits until the bell was rung at least once since the last wait, and drains it.
    /// An error means the other end is gone.
    pub async fn wait(&mut self) -> io::Result<()> {
        let n = self.sock.read(&mut self.buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
}
