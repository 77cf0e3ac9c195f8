//! Writes gathered into as few system calls as a batch allows, with no buffer kept between
//! batches.
//!
//! tungstenite writes its buffer out whenever it passes `write_buffer_size` (small, since that
//! buffer keeps its capacity for the connection's life), so a batch of large frames (a presence
//! state's 8 KiB parts) would cost a system call per frame. On loopback a `sendto` costs far more
//! per call than per byte: [`Coalesce`] gathers a batch's writes up to [`Coalesce::new`]'s limit
//! and sends them at the flush, then gives its memory back. A write smaller than tungstenite's
//! buffer, with nothing gathered, is what a flush of a batch of small frames writes: it goes
//! straight through, with no copy.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// An I/O whose writes are gathered until a flush, or until `limit` bytes wait.
pub(crate) struct Coalesce<S> {
    io: S,
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    sent: usize,
    limit: usize,
    /// A write this small, with nothing gathered, goes straight to `io`.
    direct_below: usize,
}

impl<S> Coalesce<S> {
    /// Gathers up to `limit` bytes per system call; a write of more goes on its own, and so does
    /// one of less than `direct_below` when nothing is gathered (tungstenite's write buffer size:
    /// it writes less only when flushed).
    pub(crate) fn new(io: S, limit: usize, direct_below: usize) -> Coalesce<S> {
        Coalesce { io, buf: Vec::new(), sent: 0, limit, direct_below }
    }
}

impl<S: AsyncWrite + Unpin> Coalesce<S> {
    /// Writes what is gathered; the buffer is freed once it is all written.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if !this.buf.is_empty() && this.buf.len() + data.len() > this.limit {
            ready!(this.poll_drain(cx))?;
        }
        if this.buf.is_empty() && (data.len() >= this.limit || data.len() < this.direct_below) {
            return Pin::new(&mut this.io).poll_write(cx, data);
        }
        if this.buf.capacity() == 0 {
            this.buf.reserve(data.len().max(4096).min(this.limit));
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// An I/O that records the size of each write, and takes none while its flag is set.
    #[derive(Clone, Default)]
    struct Calls(Arc<Mutex<(Vec<usize>, bool)>>);

    impl AsyncWrite for Calls {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            let mut calls = self.0.lock().expect("lock");
            if calls.1 {
                return Poll::Pending;
            }
            calls.0.push(data.len());
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_go_out_together_at_the_flush_or_at_the_limit_and_the_buffer_is_freed() {
        use tokio::io::AsyncWriteExt as _;
        let calls = Calls::default();
        let mut io = Coalesce::new(calls.clone(), 64 * 1024, 4096);
        // A small write with nothing gathered (a flush of small frames) goes straight through.
        io.write_all(&[b'x'; 300]).await.expect("written");
        assert_eq!(calls.0.lock().expect("lock").0, [300]);
        calls.0.lock().expect("lock").0.clear();
        for _ in 0..4 {
            io.write_all(&[b'x'; 8192]).await.expect("written");
        }
        assert!(calls.0.lock().expect("lock").0.is_empty(), "nothing before the flush");
        io.flush().await.expect("flushed");
        assert_eq!(calls.0.lock().expect("lock").0, [32 * 1024], "one write for four frames");
        assert_eq!(io.buf.capacity(), 0, "the buffer is freed once written");
        // Past the limit, what is gathered goes out first; a write as large as the limit goes alone.
        for _ in 0..9 {
            io.write_all(&[b'x'; 8192]).await.expect("written");
        }
        io.write_all(&vec![b'x'; 64 * 1024]).await.expect("written");
        // The end of a batch: a small write joins what is gathered.
        io.write_all(&[b'x'; 8192]).await.expect("written");
        io.write_all(&[b'x'; 100]).await.expect("written");
        io.flush().await.expect("flushed");
        assert_eq!(calls.0.lock().expect("lock").0, [32 * 1024, 64 * 1024, 8192, 64 * 1024, 8292]);
    }

    #[tokio::test]
    async fn a_peer_that_does_not_read_holds_back_the_writer_at_the_limit() {
        let calls = Calls::default();
        let mut io = Coalesce::new(calls.clone(), 16 * 1024, 4096);
        calls.0.lock().expect("lock").1 = true;
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let frame = [b'x'; 8192];
        for _ in 0..2 {
            assert!(matches!(Pin::new(&mut io).poll_write(&mut cx, &frame), Poll::Ready(Ok(8192))));
        }
        assert!(Pin::new(&mut io).poll_write(&mut cx, &frame).is_pending(), "16 KiB wait: the third waits");
        assert_eq!(io.buf.len(), 16 * 1024);
        calls.0.lock().expect("lock").1 = false;
        assert!(matches!(Pin::new(&mut io).poll_write(&mut cx, &frame), Poll::Ready(Ok(8192))));
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        assert_eq!(calls.0.lock().expect("lock").0, [16 * 1024, 8192]);
    }
}
