//! The recommended stacks, one line each: [`server`](fn@server) for axum and
//! tonic servers, [`grpc_client`](fn@grpc_client) (also named [`client`]) for
//! tonic `Channel`s, [`http_client`](fn@http_client) for HTTP clients.
//!
//! | stack | layers, outermost first | use it for |
//! | --- | --- | --- |
//! | [`ServerStack`] | ErrorEnrich → Deadline (reads `grpc-timeout` and `x-deadline-ms`; over gRPC response bodies too) → Overload (on by default; [why there, and why on](mod@server#where-the-overload-layer-sits-and-why-it-is-on)) → Heartbeat → RateLimit (optional) → your service | every axum `Router` (`Router::layer`) and tonic server (`Server::builder().layer`) |
//! | [`ClientStack`] | ErrorEnrich (client) → Deadline (writes `grpc-timeout`) → RateLimit (optional) → BufferBody (with a retry or a hedge) → Retry (optional: a policy, or a gRPC service config per method) → Hedge (optional) → Heartbeat → Throttle (optional, adaptive) → [`GrpcErrors`](crate::remote::GrpcErrors) → tonic `Channel` | every tonic generated client (`FooClient::new(stack.layer(channel))`) |
//! | [`HttpClientStack`] | ErrorEnrich (client) → Deadline (writes `x-deadline-ms`) → RateLimit (optional) → BufferBody (with a retry or a hedge) → Retry (optional, idempotent methods) → Hedge (optional, idempotent methods) → Heartbeat → Throttle (optional, adaptive) → [`HttpErrors`](crate::remote::HttpErrors) → any tower HTTP client | every HTTP dependency (hyper-util's `Client`, …) |
//!
//! Each stack lives in a module of its own, with the table of the orders
//! that go wrong beside it: [`mod@server`], [`mod@grpc_client`],
//! [`mod@http_client`].
//!
//! Every stack is a `Clone + Debug` builder that implements `tower::Layer`;
//! each layer's settings can be replaced (`with_*`), optional layers slot in
//! the same way (`with_rate_limit`, `with_overload` / `without_overload`,
//! `with_retry`, `with_service_config`, `with_retry_throttle`, `with_hedge`,
//! `with_throttle`), and the order cannot be changed. Their docs say when to
//! use each and what they answer.
//!
//! On a client the retry and the hedge consult one A6 [`RetryThrottle`]
//! per backend (give the hedge the one you give
//! `with_retry_throttle`), so in an outage both stop together; the SRE
//! adaptive throttle sits closest to the transport, counts every attempt,
//! and its local refusals are never retried. With both a retry and a hedge,
//! one body buffer, the retry's, serves both (the hedge's is not used).
//!
//! # Example
//!
//! An axum server: `ServerStack` makes the router's error type `Infallible`,
//! so `Router::layer` takes it as it is.
//!
//! ```
//! use std::time::Duration;
//! use atscale::prelude::*;
//! use atscale::stack;
//! use axum::{Router, routing::get};
//!
//! # fn main() -> Result<(), BoxError> {
//! let per_second = Limiter::new(Limit::per_second(100)?);
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(stack::server("hello", Duration::from_secs(2))
//!         .with_rate_limit(RateLimitLayer::reject(per_second)));
//! # let _ = app;
//! # Ok(())
//! # }
//! ```
//!
//! A tonic client for the service above it (an ignored example: it needs a
//! server to connect to; `examples/tonic_client.rs` runs it):
//!
//! ```ignore
//! let channel = Channel::from_static("http://[::1]:50051").connect().await?;
//! let mut health = HealthClient::new(stack::client("gateway", Duration::from_secs(1)).layer(channel));
//! ```
//!
//! # Order, and what goes wrong otherwise
//!
//! The stacks fix the order. Building one by hand
//! ([`ServiceBuilderExt`](crate::ServiceBuilderExt) or
//! `ServiceBuilder::layer`), the mistakes each side's module lists are caught
//! by the compiler or silently misbehave. One holds for every stack:
//!
//! - **A layer over a request type that cannot carry a context** does not
//!   compile: every layer needs [`Carrier`](crate::core::Carrier)
//!   (implemented for `http::Request`), the hedge
//!   [`Replay`](crate::hedge::Replay) too; the heartbeat needs a response it
//!   can follow to its end ([`Track`](crate::heartbeat::Track):
//!   `http::Response` and unary types).
//!
//! | mistake | what happens |
//! | --- | --- |
//! | RateLimit outside Deadline | the rate limit does not see this hop's deadline (only a served request's, on a client): a request may wait for a token past its deadline instead of failing at once with 429 and `Retry-After`, and the wait is not charged to it |
//! | Retry, Hedge or Overload outside Deadline | the deadline does not cover their waits: a backoff, a hedge delay or a place in the admission queue outlives the request's budget |
//! | Retry inside the errors mapping ([`GrpcErrors`](crate::remote::GrpcErrors), [`HttpErrors`](crate::remote::HttpErrors)) | it judges raw answers, not the vocabulary: a 503 naming a stall or an unreachable dependency of the backend looks like an overload and is retried |

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use atscale_core::RetryThrottle;
use atscale_hedge::{BufferBody, BufferBodyLayer};
use atscale_retry::{Retry, RetryLayer};
use http::HeaderName;
use tower_layer::{Identity, Layer};
use tower_service::Service;

#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
pub mod grpc_client;
pub mod http_client;
pub mod server;

mod parts;
pub use parts::{ClientHedgeLayer, ClientRetryLayer};

#[cfg(feature = "tonic")]
pub use grpc_client::{
    ClientStack, GrpcHedgeLayer, GrpcRetryLayer, StatusErrors, StatusFuture, TonicBody, Transport,
    client, grpc_client,
};
pub use http_client::{
    HttpClientStack, HttpHedgeLayer, HttpRetryLayer, HttpTransport, http_client,
};
pub use server::{ServerStack, server};

/// The header a plain HTTP caller puts its budget in, in whole milliseconds:
/// `x-deadline-ms`. The stacks read (server) it besides `grpc-timeout`.
pub const DEADLINE_HEADER: HeaderName = HeaderName::from_static("x-deadline-ms");

mod sealed {
    pub trait Sealed {}
    impl Sealed for tower_layer::Identity {}
}

/// The hedge slot of a client stack: [`Identity`] (no hedge),
/// [`GrpcHedgeLayer`] or [`HttpHedgeLayer`]. A hedge without a throttle of
/// its own consults the stack's [`RetryThrottle`]
/// ([`HedgeLayer::adopt_throttle`](crate::hedge::HedgeLayer::adopt_throttle)),
/// so that in an outage the retries and the hedges to one backend stop
/// together.
///
/// This trait is sealed: the stacks' own slots implement it.
pub trait HedgeSlot: sealed::Sealed {
    /// Has the hedge consult `throttle` unless it has a throttle already.
    fn adopt_throttle(&self, throttle: &RetryThrottle);
}

impl HedgeSlot for Identity {
    fn adopt_throttle(&self, _throttle: &RetryThrottle) {}
}

/// The retry slot of a client stack: [`Identity`] (no retry),
/// [`GrpcRetryLayer`] or [`HttpRetryLayer`]. It wraps the stack's hedge
/// slot `H` over `S`: with a retry and a hedge, one body buffer (the
/// retry's) serves both, and the retry consults the stack's
/// [`RetryThrottle`] when one is set
/// ([`ClientStack::with_retry_throttle`],
/// [`HttpClientStack::with_retry_throttle`]).
///
/// This trait is sealed: the stacks' own slots implement it.
pub trait RetrySlot<H, S>: sealed::Sealed {
    /// The service the slot and the hedge make of `S`.
    type Service;

    /// Wraps `inner` in `hedge` and the retry, its retries consulting
    /// `throttle` when one is given (in place of the retry layer's own).
    fn layer_with(&self, hedge: &H, inner: S, throttle: Option<&RetryThrottle>) -> Self::Service;
}

impl<H: Layer<S>, S> RetrySlot<H, S> for Identity {
    type Service = H::Service;

    fn layer_with(&self, hedge: &H, inner: S, _throttle: Option<&RetryThrottle>) -> H::Service {
        hedge.layer(inner)
    }
}

/// The retry slot of a client stack over a service already hedged across
/// replicas ([`ClientStack::replicas`], [`HttpClientStack::replicas`]): the
/// slot's body buffer, or
/// the hedge's when there is no retry, goes outermost.
///
/// This trait is sealed: the stacks' own slots implement it.
pub trait HedgedRetrySlot<X>: sealed::Sealed {
    /// The service the slot makes of the hedged `X`.
    type Service;

    /// Wraps `hedged` in the retry (consulting `throttle` when one is
    /// given) and a body buffer (`hedge_buffer` when there is no retry).
    fn around_hedged(
        &self,
        hedge_buffer: &BufferBodyLayer,
        hedged: X,
        throttle: Option<&RetryThrottle>,
    ) -> Self::Service;
}

impl<X> HedgedRetrySlot<X> for Identity {
    type Service = Buffered<X>;

    fn around_hedged(
        &self,
        hedge_buffer: &BufferBodyLayer,
        hedged: X,
        _throttle: Option<&RetryThrottle>,
    ) -> Self::Service {
        buffered(hedge_buffer, hedged)
    }
}

/// The outside of every retry and hedge slot of a client stack: its body
/// buffer, its future boxed once per call ([`BoxedInner`]).
type Buffered<X> = BoxedInner<BufferBody<X>>;

/// `inner` behind `buffer`, boxed: see [`Buffered`].
fn buffered<X>(buffer: &BufferBodyLayer, inner: X) -> Buffered<X> {
    BoxedInner::new(buffer.layer(inner))
}

/// `retry` around `inner`, on `throttle` when one is given.
fn retry<S>(retry: &RetryLayer, inner: S, throttle: Option<&RetryThrottle>) -> Retry<S> {
    match throttle {
        Some(t) => retry.clone().throttle(t.clone()).layer(inner),
        None => retry.layer(inner),
    }
}

/// A service whose future is boxed, once per request, so that the layers
/// around it move a pointer instead of that future: under a
/// [`ServerStack`]'s heartbeat (the rate limit and your service), and
/// around a client stack's retry or hedge (with its body buffer).
///
/// Every layer's response future holds its inner one, and is built,
/// returned and wrapped on the way out, so a large future deep in a stack
/// is copied again at every layer, and so is every future around it. On a
/// server the handler's future (320 bytes for axum's `Router` and tonic's
/// `Routes`) is boxed under the heartbeat, above the rate limit (whose
/// future holds the request while it waits for a token): the stack's
/// future is 376 bytes, not 680. On a client the retry's and the hedge's
/// futures (1.3 to 2.2 KB: attempts, the request kept for replay, timers)
/// are boxed with their body buffer: the stack's future is 248 bytes. One
/// allocation per request or call, for fewer instructions (see
/// benches/README.md, End to end); a client stack with neither a retry nor
/// a hedge has nothing large to box.
#[derive(Clone, Debug)]
pub struct BoxedInner<S> {
    inner: S,
}

impl<S> BoxedInner<S> {
    pub(crate) const fn new(inner: S) -> Self {
        BoxedInner { inner }
    }
}

impl<S, Req> Service<Req> for BoxedInner<S>
where
    S: Service<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<S::Future>>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        Box::pin(self.inner.call(req))
    }
}
