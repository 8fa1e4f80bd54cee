//! The recommended tonic client stack, [`ClientStack`], and what goes wrong
//! when its layers are put together by hand in another order.
//!
//! # Order, and what goes wrong otherwise
//!
//! This mistake **is caught by the compiler**:
//!
//! - **A hedge over a streaming body without BufferBody.** A tonic request's
//!   body cannot be replayed (`tonic::body::Body` is not
//!   [`ReplayBody`](crate::hedge::ReplayBody)), so a hedge right over a
//!   `Channel` does not compile; put `buffer_body` outside it:
//!
//!   ```compile_fail
//!   # use atscale::prelude::*;
//!   # use atscale::ServiceBuilderExt;
//!   # use tower::ServiceBuilder;
//!   # async fn f(channel: tonic::transport::Channel) {
//!   let svc = ServiceBuilder::new()
//!       .hedge(HedgeLayer::fixed(std::time::Duration::from_millis(20)))
//!       .service(channel);
//!   let client = tonic_health::pb::health_client::HealthClient::new(svc);
//!   # }
//!   ```
//!
//! These compile, and **silently misbehave**:
//!
//! | mistake | what happens |
//! | --- | --- |
//! | Hedge outside Deadline | each attempt gets its own deadline, counted from when it was sent: the call can outlive its budget by the hedge delays, and each hedge sends a fresh `grpc-timeout` downstream (unless the request being served caps it) |
//! | RateLimit inside Hedge | every hedge spends a token: the extra load the hedge budget allows is charged to the limit and can make the hedge itself rate-limited |
//! | RateLimit outside Deadline | the rate limit does not see this hop's own budget, only a served request's deadline |
//! | Heartbeat outside Hedge | the monitor sees one request per call, not one per attempt: a slow replica's stalls are hidden behind the hedge that beat it |
//! | Deadline as `DeadlineLayer::new` / `::server` | the deadline is enforced but never written to `grpc-timeout`: the next hop does not inherit it |
//! | `ErrorEnrichLayer::new` (server mode) | a failed call becomes an `Ok` problem+json or gRPC *response*: the caller's code sees success |
//! | BufferBody or Hedge without `non_idempotent(true)` | every gRPC call is a POST, so nothing is ever hedged |
//! | a retry policy without `non_idempotent(true)` | every gRPC call is a POST, so nothing is ever retried |
//! | Retry outside Deadline | each attempt gets a fresh deadline: the call outlives its budget by every attempt and backoff, and no backoff knows when to give up |
//! | RateLimit inside Retry | every retry spends a token: a failing backend drains the limit and the retries are refused as rate limited |
//! | Retry inside [`GrpcErrors`] | the retry judges raw answers by their code alone, not by the vocabulary: the reason a server gave (`OVERLOADED`, `STALLED`) and what the errors layer makes of a transport failure (a refused connection: `Unreachable` naming the dependency) are not what it decides on |
//! | Retry and Hedge on different [`RetryThrottle`]s | in an outage each spends its own tokens: the load multiplies instead of staying near 1x |
//! | Throttle outside Retry or Hedge | only calls are counted, not attempts: the backend refuses three attempts and the throttle sees one refusal; and a throttled call is refused before the hedge could try another replica |
//! | one [`ThrottleLayer`] for several backends | a backend that refuses work stops calls to the healthy ones too |
//!
//! # Retries, and the throttles
//!
//! ErrorEnrich → Deadline → RateLimit → BufferBody → **Retry** → Hedge →
//! Heartbeat → **Throttle** → [`GrpcErrors`] → `Channel`:
//!
//! - the [`RetryLayer`] ([`with_retry`](ClientStack::with_retry), or one per
//!   method from a gRPC [`ServiceConfig`],
//!   [`with_service_config`](ClientStack::with_service_config)) sits inside
//!   the deadline (one deadline covers every attempt and backoff) and the
//!   rate limit (a call is charged once), outside the hedge (a retry
//!   repeats a whole hedged call whose copies all failed) and everything
//!   per attempt; outside [`GrpcErrors`], so it sees the vocabulary: an
//!   `UNAVAILABLE` with reason `OVERLOADED` is
//!   [`Overloaded`](crate::core::Overloaded), a refused connection
//!   [`Unreachable`](crate::core::Unreachable);
//! - the A6 [`RetryThrottle`]
//!   ([`with_retry_throttle`](ClientStack::with_retry_throttle)) is one per
//!   backend, shared by the retry and the hedge (a hedge built without a
//!   throttle of its own takes the stack's): in an outage both stop once it
//!   is half drained;
//! - the SRE adaptive throttle ([`ThrottleLayer`],
//!   [`with_throttle`](ClientStack::with_throttle)) is closest to the
//!   transport, so it counts every attempt and a refused attempt never
//!   reaches the wire. Its local refusal
//!   ([`Throttled`](crate::overload::error::Throttled)) is never retried:
//!   it is the backend's own refusals, replayed
//!   ([`RetryPolicy::is_retryable`](crate::retry::RetryPolicy::is_retryable)).

use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use atscale_core::RetryThrottle;
use atscale_deadline::{Deadline, DeadlineLayer};
use atscale_error::mode::Client;
use atscale_error::{Enriched, ErrorEnrich, ErrorEnrichLayer};
use atscale_heartbeat::{Heartbeat, Monitor};
use atscale_hedge::{BufferBodyLayer, Hedge, HedgeLayer, InvalidConfig};
use atscale_overload::throttle::ThrottleLayer;
use atscale_ratelimit::{RateLimitLayer, Store};
use atscale_retry::{MethodConfigLayer, PerMethod, RetryLayer, ServiceConfig};
use tower_layer::{Identity, Layer};
use tower_service::Service;

use super::parts::{ClientHedgeLayer, ClientParts, ClientRetryLayer};
use super::{Buffered, HedgeSlot, HedgedRetrySlot, RetrySlot, buffered};
use crate::remote::{GrpcErrors, GrpcErrorsLayer};

/// The recommended tonic client stack for outgoing calls of the service
/// named `service`, each call within `budget` or what is left of the
/// request being served; see [`ClientStack`].
///
/// # Panics
///
/// As [`server`](super::server()).
pub fn client(service: impl Into<Arc<str>>, budget: Duration) -> ClientStack {
    ClientStack::new(service, budget)
}

/// [`client`] by the name that says which client it is for.
///
/// # Panics
///
/// As [`server`](super::server()).
pub fn grpc_client(service: impl Into<Arc<str>>, budget: Duration) -> ClientStack {
    ClientStack::new(service, budget)
}

/// What a [`ClientStack`] puts right over each transport: the heartbeat,
/// the adaptive throttle (`T`: a [`ThrottleLayer`], when set),
/// [`GrpcErrors`] and the body conversion to `tonic::body::Body`.
pub type Transport<S, T = Identity> = Heartbeat<<T as Layer<GrpcErrors<TonicBody<S>>>>::Service>;

/// The recommended tonic client stack: ErrorEnrich (client mode) → Deadline
/// (client) → RateLimit (when set) → BufferBody (when a retry or a hedge
/// is set) → Retry (when set) → Hedge (when set) → Heartbeat → Throttle
/// (when set) →
/// [`GrpcErrors`] → the `Channel`, failing with `tonic::Status`
/// ([`StatusErrors`]).
///
/// Use it for every tonic generated client a service holds
/// (`HealthClient::new(stack.layer(channel))`), and for calls to several
/// replicas of one backend ([`ClientStack::replicas`]): each call
///
/// - carries the deadline of the request being served (or the stack's
///   budget, whichever is sooner) in `grpc-timeout`, and fails with
///   `DEADLINE_EXCEEDED` when it passes, even if the server never answers;
/// - is charged to the rate limit, if one is set, once per call (not per
///   hedge or retry);
/// - is retried, if a retry policy is set (or a [`ServiceConfig`] gives its
///   method one), on the failures the policy names, with backoff, never
///   past the deadline, while the [`RetryThrottle`] allows;
/// - is hedged, if a hedge is set, within the hedge's budget, the losing
///   attempts cancelled;
/// - reports to the stack's [`Monitor`], once per attempt;
/// - is refused locally (503 / `UNAVAILABLE`, never retried) by the
///   adaptive throttle, if one is set, with the probability the SRE book
///   gives when the backend has been refusing work;
/// - and fails, when the server answers an error status, with a
///   [`RemoteFailure`](crate::remote::RemoteFailure) that keeps the
///   downstream kind, service and error id; every failure is logged (at
///   `DEBUG`) with an id.
///
/// The stack fails with a `tonic::Status` ([`StatusErrors`]): the server's
/// own status (code, message, details) when the server answered one, else
/// the status of the local failure (`DEADLINE_EXCEEDED` for a deadline that
/// passed here, `RESOURCE_EXHAUSTED` for the rate limit, `UNAVAILABLE` for
/// a refused connection), so a generated client returns the right code
/// rather than tonic's `UNKNOWN`. Its `source()` is the whole chain (the
/// [`Enriched`] error and what it wraps).
///
/// ```
/// use std::time::Duration;
/// use atscale::prelude::*;
/// use atscale::stack::ClientStack;
///
/// # fn main() -> Result<(), BoxError> {
/// let throttle = RetryThrottle::new(10, 0.1)?; // one per backend
/// let stack = ClientStack::new("gateway", Duration::from_secs(1))
///     .with_rate_limit(RateLimitLayer::new(Limiter::new(Limit::per_second(50)?)))
///     .with_retry(RetryLayer::new(RetryPolicy::builder()
///         .max_attempts(3)
///         .non_idempotent(true) // the methods called are safe to repeat
///         .build()?))
///     .with_hedge(HedgeLayer::builder()
///         .delay(atscale::hedge::Delay::fixed(Duration::from_millis(30)))
///         .non_idempotent(true)
///         .build()?)
///     .with_retry_throttle(throttle)
///     .with_throttle(ThrottleLayer::new());
/// # let _ = stack;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct ClientStack<R = Identity, H = Identity, Y = Identity, T = Identity> {
    parts: ClientParts<GrpcErrorsLayer, R, H, Y, T>,
}

impl ClientStack {
    /// The stack for calls made by the service named `service`, each within
    /// `budget` or the deadline of the request being served, written to
    /// `grpc-timeout`; a new [`Monitor`]; no rate limit, no hedge.
    ///
    /// # Panics
    ///
    /// When `service` is not a valid service name; see
    /// [`ErrorEnrichLayer::client`] (and [`ClientStack::from_layers`]).
    pub fn new(service: impl Into<Arc<str>>, budget: Duration) -> Self {
        ClientStack::from_layers(
            ErrorEnrichLayer::client(service),
            DeadlineLayer::client(budget),
        )
    }

    /// The stack around the given ErrorEnrich (client mode) and deadline
    /// layers, with a new [`Monitor`], no rate limit and no hedge.
    pub fn from_layers(enrich: ErrorEnrichLayer<Client>, deadline: DeadlineLayer) -> Self {
        ClientStack {
            parts: ClientParts::new(enrich, deadline, GrpcErrorsLayer::new()),
        }
    }
}

impl<R, H, Y, T> ClientStack<R, H, Y, T> {
    /// Reports every attempt to `monitor`.
    #[must_use]
    pub fn with_monitor(mut self, monitor: Monitor) -> Self {
        self.parts.monitor = monitor;
        self
    }

    /// Names the dependency `name` when it cannot be reached (a refused
    /// connection answers 503 / `UNAVAILABLE` naming it; without a name the
    /// answer only says a dependency could not be reached).
    #[must_use]
    pub fn with_dependency(mut self, name: impl Into<Arc<str>>) -> Self {
        self.parts.errors = self.parts.errors.dependency(name);
        self
    }

    /// Charges every call (once, whatever the hedge does) to `rate_limit`.
    pub fn with_rate_limit<K, W, St: Store>(
        self,
        rate_limit: RateLimitLayer<K, W, St>,
    ) -> ClientStack<RateLimitLayer<K, W, St>, H, Y, T> {
        ClientStack {
            parts: self.parts.rate_limit(rate_limit),
        }
    }

    /// Hedges calls with `hedge`, buffering request bodies up to 64 KiB so
    /// they can be replayed (larger ones are sent once). gRPC calls are
    /// POSTs: build `hedge` with
    /// [`non_idempotent(true)`](crate::hedge::HedgeBuilder::non_idempotent)
    /// for methods that are safe to repeat, or nothing is hedged.
    ///
    /// With a retry too, the hedge sits inside it (a retry repeats a hedged
    /// call whose copies all failed) and one body buffer serves both. A
    /// hedge built without a [`throttle`](crate::hedge::HedgeBuilder::throttle)
    /// consults the stack's [`RetryThrottle`], if one is set (before or
    /// after), so that both stop together.
    pub fn with_hedge<C>(self, hedge: HedgeLayer<C>) -> ClientStack<R, GrpcHedgeLayer<C>, Y, T> {
        ClientStack {
            parts: self.parts.hedge(GrpcHedgeLayer {
                buffer: BufferBodyLayer::new(64 * 1024).non_idempotent(true),
                hedge,
            }),
        }
    }

    /// Retries calls with `retry` (gRFC A6: backoff, pushback, never past
    /// the deadline), buffering request bodies up to 64 KiB so they can be
    /// replayed (larger ones are sent once). gRPC calls are POSTs: build the
    /// policy with
    /// [`non_idempotent(true)`](crate::retry::RetryPolicyBuilder::non_idempotent)
    /// for methods that are safe to repeat, or nothing is retried. Replaces
    /// a [service config](Self::with_service_config).
    pub fn with_retry(self, retry: RetryLayer) -> ClientStack<R, H, GrpcRetryLayer, T> {
        self.with_retry_slot(retry)
    }

    /// Gives each call the deadline and the retry or hedging policy of its
    /// method from a gRPC service config (A6: `methodConfig`, its `timeout`,
    /// `retryPolicy` or `hedgingPolicy`), every retry and hedge of the
    /// config on the throttle of its `retryThrottling`, request bodies
    /// buffered up to 64 KiB. Replaces a [retry](Self::with_retry).
    ///
    /// The method's `timeout` is enforced here, below the stack's deadline:
    /// the `grpc-timeout` sent is the stack's (the budget, or what is left
    /// of the request being served).
    pub fn with_service_config(
        self,
        config: ServiceConfig,
    ) -> ClientStack<R, H, GrpcRetryLayer<MethodConfigLayer>, T> {
        self.with_retry_slot(MethodConfigLayer::new(config))
    }

    fn with_retry_slot<P>(self, retry: P) -> ClientStack<R, H, GrpcRetryLayer<P>, T> {
        ClientStack {
            parts: self.parts.retry(GrpcRetryLayer {
                buffer: BufferBodyLayer::new(64 * 1024).non_idempotent(true),
                retry,
            }),
        }
    }

    /// The A6 retry throttle (`retryThrottling`) of this backend: the
    /// stack's retry consults it in place of its own, and so does the hedge
    /// unless it was built with a throttle of its own
    /// ([`HedgeLayer::adopt_throttle`](crate::hedge::HedgeLayer::adopt_throttle)),
    /// so that in an outage retries and hedges stop together once it holds
    /// half its tokens or fewer. A [service config](Self::with_service_config)
    /// keeps the throttle of its `retryThrottling`.
    #[must_use]
    pub fn with_retry_throttle(self, throttle: RetryThrottle) -> Self
    where
        H: HedgeSlot,
    {
        Self {
            parts: self.parts.retry_throttle(throttle),
        }
    }

    /// The A6 retry throttle set with
    /// [`with_retry_throttle`](Self::with_retry_throttle).
    pub fn retry_throttle(&self) -> Option<&RetryThrottle> {
        self.parts.retry_throttle.as_ref()
    }

    /// Throttles attempts to this backend on the client (Google SRE book,
    /// "Handling Overload"): `throttle` counts every attempt and every one
    /// the backend accepted over its window, and refuses new ones locally
    /// ([`Throttled`](crate::overload::error::Throttled): 503 /
    /// `UNAVAILABLE`, never retried) with probability
    /// `max(0, (requests − K·accepts) / (requests + 1))`. Closest to the
    /// transport, so every attempt is counted. One layer per backend: over
    /// [`replicas`](Self::replicas) they share it, as one backend service.
    pub fn with_throttle(self, throttle: ThrottleLayer) -> ClientStack<R, H, Y, ThrottleLayer> {
        ClientStack {
            parts: self.parts.throttle(throttle),
        }
    }

    /// The monitor every attempt reports to.
    pub fn monitor(&self) -> &Monitor {
        &self.parts.monitor
    }
}

impl<R, C: Clone, Y, T> ClientStack<R, GrpcHedgeLayer<C>, Y, T> {
    /// The stack over several replicas of one backend: each call's first
    /// attempt goes to the next replica in turn, and a hedge to another
    /// replica than the first, so a backup never waits on the replica that
    /// is slow.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] when `replicas` is empty.
    #[allow(clippy::type_complexity)]
    pub fn replicas<S>(
        &self,
        replicas: Vec<S>,
    ) -> Result<StatusErrors<ErrorEnrich<Deadline<R::Service>, Client>>, InvalidConfig>
    where
        T: Layer<GrpcErrors<TonicBody<S>>>,
        Y: HedgedRetrySlot<Hedge<Transport<S, T>, C>>,
        R: Layer<Y::Service>,
    {
        let parts = &self.parts;
        let replicas = replicas
            .into_iter()
            .map(|channel| parts.transport(TonicBody { inner: channel }))
            .collect();
        let hedged = parts.hedge.hedge.replicas(replicas)?;
        Ok(StatusErrors {
            inner: parts.outer(parts.retry.around_hedged(
                &parts.hedge.buffer,
                hedged,
                parts.retry_throttle.as_ref(),
            )),
        })
    }
}

impl<S, R, H, Y, T> Layer<S> for ClientStack<R, H, Y, T>
where
    T: Layer<GrpcErrors<TonicBody<S>>>,
    Y: RetrySlot<H, Transport<S, T>>,
    R: Layer<Y::Service>,
{
    type Service = StatusErrors<ErrorEnrich<Deadline<R::Service>, Client>>;

    fn layer(&self, channel: S) -> Self::Service {
        let parts = &self.parts;
        let inner = parts.transport(TonicBody { inner: channel });
        StatusErrors {
            inner: parts.outer(parts.retry.layer_with(
                &parts.hedge,
                inner,
                parts.retry_throttle.as_ref(),
            )),
        }
    }
}

/// The hedge of a [`ClientStack`]: a [`BufferBodyLayer`] (so tonic request
/// bodies can be replayed) over a [`HedgeLayer`].
pub type GrpcHedgeLayer<C> = ClientHedgeLayer<C>;

impl<R, C, Y, T> ClientStack<R, GrpcHedgeLayer<C>, Y, T> {
    /// The hedge's counters (hedges sent, won, …).
    pub fn hedge_stats(&self) -> atscale_hedge::HedgeStats {
        self.parts.hedge.stats()
    }
}

impl<R, H, Y> ClientStack<R, H, Y, ThrottleLayer> {
    /// The adaptive throttle: its counts and the probability it refuses
    /// with now.
    pub fn throttle(&self) -> &ThrottleLayer {
        &self.parts.throttle
    }
}

impl<R, H, T> ClientStack<R, H, GrpcRetryLayer<MethodConfigLayer>, T> {
    /// The per-method layer of the service config (its throttle, its
    /// config).
    pub fn method_config(&self) -> &MethodConfigLayer {
        &self.parts.retry.retry
    }
}

/// The retry of a [`ClientStack`]: a [`BufferBodyLayer`] (so tonic request
/// bodies can be replayed) over a [`RetryLayer`], or over the
/// [`MethodConfigLayer`] of a service config.
pub type GrpcRetryLayer<P = RetryLayer> = ClientRetryLayer<P>;

// A service config's `retryThrottling` is its throttle: the stack's is not
// used.
impl<S> RetrySlot<Identity, S> for GrpcRetryLayer<MethodConfigLayer> {
    type Service = Buffered<PerMethod<S>>;

    fn layer_with(
        &self,
        _hedge: &Identity,
        inner: S,
        _throttle: Option<&RetryThrottle>,
    ) -> Self::Service {
        buffered(&self.buffer, self.retry.layer(inner))
    }
}

impl<S, C: Clone> RetrySlot<GrpcHedgeLayer<C>, S> for GrpcRetryLayer<MethodConfigLayer> {
    type Service = Buffered<PerMethod<Hedge<S, C>>>;

    fn layer_with(
        &self,
        hedge: &GrpcHedgeLayer<C>,
        inner: S,
        _throttle: Option<&RetryThrottle>,
    ) -> Self::Service {
        buffered(&self.buffer, self.retry.layer(hedge.hedge.layer(inner)))
    }
}

impl<X> HedgedRetrySlot<X> for GrpcRetryLayer<MethodConfigLayer> {
    type Service = Buffered<PerMethod<X>>;

    fn around_hedged(
        &self,
        _hedge_buffer: &BufferBodyLayer,
        hedged: X,
        _throttle: Option<&RetryThrottle>,
    ) -> Self::Service {
        buffered(&self.buffer, self.retry.layer(hedged))
    }
}

/// Turns any request body into a `tonic::body::Body` for the `Channel`
/// (after [`BufferBody`](atscale_hedge::BufferBody) wrapped it); the innermost layer of a
/// [`ClientStack`].
///
/// # Backpressure
///
/// `poll_ready` delegates to the inner service.
#[derive(Clone, Debug)]
pub struct TonicBody<S> {
    inner: S,
}

impl<S> TonicBody<S> {
    atscale_core::inner_accessors!();
}

impl<S, B> Service<http::Request<B>> for TonicBody<S>
where
    S: Service<http::Request<tonic::body::Body>>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<crate::core::BoxError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> S::Future {
        self.inner.call(req.map(tonic::body::Body::new))
    }
}

/// The outermost layer of a [`ClientStack`]: fails with a `tonic::Status`
/// rather than the [`Enriched`] error the client-mode ErrorEnrich gives.
///
/// The status is the one a server answered, when the chain holds one
/// (from [`GrpcErrors`]), otherwise [`Enriched::to_status`]: the kind's
/// code, the user-safe message, rich details. Either way its `source()` is
/// the [`Enriched`] error. tonic's generated clients take a `Status` error
/// as it is; any other error type they turn into `UNKNOWN`.
///
/// # Backpressure
///
/// `poll_ready` delegates to the inner service.
#[derive(Clone, Debug)]
pub struct StatusErrors<S> {
    inner: S,
}

impl<S> StatusErrors<S> {
    atscale_core::inner_accessors!();
}

impl<S, Req> Service<Req> for StatusErrors<S>
where
    S: Service<Req, Error = Enriched>,
{
    type Response = S::Response;
    type Error = tonic::Status;
    type Future = StatusFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), tonic::Status>> {
        self.inner.poll_ready(cx).map_err(to_status)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        StatusFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`StatusErrors`].
    #[derive(Debug)]
    pub struct StatusFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, T> std::future::Future for StatusFuture<F>
where
    F: std::future::Future<Output = Result<T, Enriched>>,
{
    type Output = Result<T, tonic::Status>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx).map_err(to_status)
    }
}

fn to_status(err: Enriched) -> tonic::Status {
    let mut status = match crate::core::find::<tonic::Status>(&err) {
        Some(remote) => tonic::Status::with_details_and_metadata(
            remote.code(),
            remote.message(),
            bytes::Bytes::copy_from_slice(remote.details()),
            remote.metadata().clone(),
        ),
        None => err.to_status(),
    };
    status.set_source(Arc::new(err));
    status
}
