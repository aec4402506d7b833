//! Callers that must keep moving. A request body that brings nothing for its idle time (a
//! stalled or frozen caller, or a slow-loris one holding its call slot) fails with
//! DEADLINE_EXCEEDED, so the call ends and its slot is freed ([`IdleLimited`]); a connection
//! that sends nothing after connecting is closed ([`GreetWithin`]).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tonic::Status;
use tonic::body::Body;
use tonic::transport::server::Connected;

pub struct IdleLimited {
    inner: Body,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
}

impl IdleLimited {
    fn new(inner: Body, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }

    /// `request` with its body held to `idle`.
    pub fn request(request: http::Request<Body>, idle: Duration) -> http::Request<Body> {
        request.map(|body| Body::new(Self::new(body, idle)))
    }
}

impl HttpBody for IdleLimited {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            let next = Instant::now() + this.idle;
            this.timer.as_mut().reset(next);
            return Poll::Ready(frame);
        }
        match this.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                "the request sent nothing for {:.1?}",
                this.idle
            ))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Bytes every caller sends first: HTTP/2's connection preface (in plaintext), or at least
/// that much of a TLS ClientHello.
const FIRST_BYTES: usize = 24;

/// An accepted connection whose peer must send its first bytes within a deadline; one that
/// stays silent (a slow-loris holding descriptors) is closed. Past them, the connection is
/// HTTP/2's to keep alive (its keepalive pings) or TLS's (its handshake timeout).
pub struct GreetWithin<S> {
    inner: S,
    /// Until the first bytes are in.
    deadline: Option<Pin<Box<Sleep>>>,
    awaited: usize,
}

impl<S> GreetWithin<S> {
    pub fn new(inner: S, within: Duration) -> Self {
        Self {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
            awaited: FIRST_BYTES,
        }
    }
}

impl<S: Connected> Connected for GreetWithin<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for GreetWithin<S> {
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

impl<S: AsyncWrite + Unpin> AsyncWrite for GreetWithin<S> {
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
