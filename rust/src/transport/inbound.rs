//! Accepted connections: each holds one of its address's places (at most
//! `max_connections_per_address` open; past them, a connection is closed at once), and must
//! greet in time.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tonic::transport::server::Connected;

use crate::base::budget::{Peer, Share};

/// Bytes every caller sends first: HTTP/2's connection preface (in plaintext), or at least
/// that much of a TLS ClientHello.
const FIRST_BYTES: usize = 24;

/// An accepted connection, held to account: its peer must send its first bytes within a
/// deadline, or the connection is closed (a slow-loris holding descriptors); past them, it is
/// HTTP/2's to keep alive (its keepalive pings) or TLS's (its handshake timeout). While open, it
/// holds one of its address's places.
pub struct Inbound<S> {
    inner: S,
    /// Until the first bytes are in.
    deadline: Option<Pin<Box<Sleep>>>,
    awaited: usize,
    _share: Share<Peer>,
}

impl<S> Inbound<S> {
    pub fn new(inner: S, share: Share<Peer>, greet_within: Duration) -> Self {
        Self {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(greet_within))),
            awaited: FIRST_BYTES,
            _share: share,
        }
    }
}

impl<S: Connected> Connected for Inbound<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Inbound<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        let Some(deadline) = this.deadline.as_mut() else {
            return read;
        };
        if read.is_ready() {
            this.awaited = this.awaited.saturating_sub(buf.filled().len() - before);
            if this.awaited == 0 {
                this.deadline = None;
            }
            return read;
        }
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the peer sent nothing after connecting",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Inbound<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
