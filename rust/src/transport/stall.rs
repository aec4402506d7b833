//! Callers that must keep moving: a request body that brings nothing for its idle time (a
//! stalled or frozen caller, or a slow-loris one holding its call slot) fails with
//! DEADLINE_EXCEEDED, so the call ends and its slot is freed: through [`IdleLimited`] for the
//! generated services, through [`next_data`] for those served by hand.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tonic::Status;
use tonic::body::Body;

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

/// The next data of `body`, `None` at its end, or DEADLINE_EXCEEDED if it brings nothing for
/// `idle`. Trailers and other frames are passed over.
pub async fn next_data(
    body: &mut Body,
    idle: Duration,
) -> crate::base::errors::Result<Option<Bytes>> {
    use crate::base::errors::Error;
    use http_body_util::BodyExt;
    loop {
        let Ok(next) = tokio::time::timeout(idle, body.frame()).await else {
            return Err(Error::deadline_exceeded(format!(
                "the stream sent nothing for {idle:.1?}"
            )));
        };
        let Some(frame) = next else {
            return Ok(None);
        };
        let frame = frame.map_err(|e| Error::cancelled(format!("the sender went away: {e}")))?;
        if let Ok(data) = frame.into_data() {
            return Ok(Some(data));
        }
    }
}
