//! The cluster token on the wire, both ends: every channel to a peer carries it
//! ([`PeerChannel`]), and every service a task serves checks it before anything else
//! ([`TokenCheckLayer`]): a call without it is answered UNAUTHENTICATED, its body never read.

use std::task::{Context, Poll};

use futures::future::{Either, Ready};
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tower::{Layer, Service};

use crate::base::security::{AUTHORIZATION, Security};

/// Health checks, which may be left open.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// A channel to a peer that presents this task's credentials on every call.
pub type PeerChannel = InterceptedService<Channel, Credentials>;

/// Adds the cluster token (if any) to every call's metadata.
#[derive(Clone)]
pub struct Credentials(Option<AsciiMetadataValue>);

impl Credentials {
    pub fn new(security: &Security) -> Self {
        let value = security.authorization().map(|value| {
            let mut value = AsciiMetadataValue::try_from(value.as_bytes())
                .expect("a checked token is visible ASCII");
            value.set_sensitive(true);
            value
        });
        Self(value)
    }

    /// `channel`, presenting these credentials.
    pub fn on(&self, channel: Channel) -> PeerChannel {
        InterceptedService::new(channel, self.clone())
    }
}

impl Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert(AUTHORIZATION, value.clone());
        }
        Ok(request)
    }
}

/// Checks the token on every call to the services it wraps.
#[derive(Clone)]
pub struct TokenCheckLayer(pub Security);

impl<S> Layer<S> for TokenCheckLayer {
    type Service = TokenCheck<S>;

    fn layer(&self, inner: S) -> TokenCheck<S> {
        TokenCheck {
            inner,
            security: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct TokenCheck<S> {
    inner: S,
    security: Security,
}

impl<S, B, ResBody> Service<http::Request<B>> for TokenCheck<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let open = self.security.open_health && request.uri().path().starts_with(HEALTH_PREFIX);
        if open || self.security.admits(request.headers().get(AUTHORIZATION)) {
            return Either::Right(self.inner.call(request));
        }
        let refused = tonic::Status::unauthenticated(
            "this task requires the cluster's token (authorization: Bearer <token>)",
        );
        Either::Left(futures::future::ready(Ok(refused.into_http())))
    }
}
