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

use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use atscale_deadline::{Deadline, DeadlineLayer};
use atscale_error::mode::Client;
use atscale_error::{Enriched, ErrorEnrich, ErrorEnrichLayer};
use atscale_heartbeat::{Heartbeat, Monitor};
use atscale_hedge::{BufferBody, BufferBodyLayer, Hedge, HedgeLayer, InvalidConfig};
use atscale_ratelimit::{RateLimitLayer, Store};
use tower_layer::{Identity, Layer};
use tower_service::Service;

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
/// [`GrpcErrors`] and the body conversion to `tonic::body::Body`.
pub type Transport<S> = Heartbeat<GrpcErrors<TonicBody<S>>>;

/// The recommended tonic client stack: ErrorEnrich (client mode) → Deadline
/// (client) → RateLimit (when set) → BufferBody + Hedge (when set) →
/// Heartbeat → [`GrpcErrors`] → the `Channel`, failing with
/// `tonic::Status` ([`StatusErrors`]).
///
/// Use it for every tonic generated client a service holds
/// (`HealthClient::new(stack.layer(channel))`), and for calls to several
/// replicas of one backend ([`ClientStack::replicas`]): each call
///
/// - carries the deadline of the request being served (or the stack's
///   budget, whichever is sooner) in `grpc-timeout`, and fails with
///   `DEADLINE_EXCEEDED` when it passes, even if the server never answers;
/// - is charged to the rate limit, if one is set, once per call (not per
///   hedge);
/// - is hedged, if a hedge is set, within the hedge's budget, the losing
///   attempts cancelled;
/// - reports to the stack's [`Monitor`], once per attempt;
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
/// let stack = ClientStack::new("gateway", Duration::from_secs(1))
///     .with_rate_limit(RateLimitLayer::new(Limiter::new(Limit::per_second(50)?)))
///     .with_hedge(HedgeLayer::builder()
///         .delay(atscale::hedge::Delay::fixed(Duration::from_millis(30)))
///         .non_idempotent(true) // the methods called are safe to repeat
///         .build()?);
/// # let _ = stack;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct ClientStack<R = Identity, H = Identity> {
    enrich: ErrorEnrichLayer<Client>,
    deadline: DeadlineLayer,
    errors: GrpcErrorsLayer,
    rate_limit: R,
    hedge: H,
    monitor: Monitor,
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
            enrich,
            deadline,
            errors: GrpcErrorsLayer::new(),
            rate_limit: Identity::new(),
            hedge: Identity::new(),
            monitor: Monitor::new(),
        }
    }
}

impl<R, H> ClientStack<R, H> {
    /// Reports every attempt to `monitor`.
    #[must_use]
    pub fn with_monitor(mut self, monitor: Monitor) -> Self {
        self.monitor = monitor;
        self
    }

    /// Names the dependency `name` when it cannot be reached (a refused
    /// connection answers 503 / `UNAVAILABLE` naming it; without a name the
    /// answer only says a dependency could not be reached).
    #[must_use]
    pub fn with_dependency(mut self, name: impl Into<Arc<str>>) -> Self {
        self.errors = self.errors.dependency(name);
        self
    }

    /// Charges every call (once, whatever the hedge does) to `rate_limit`.
    pub fn with_rate_limit<K, W, St: Store>(
        self,
        rate_limit: RateLimitLayer<K, W, St>,
    ) -> ClientStack<RateLimitLayer<K, W, St>, H> {
        ClientStack {
            enrich: self.enrich,
            deadline: self.deadline,
            errors: self.errors,
            rate_limit,
            hedge: self.hedge,
            monitor: self.monitor,
        }
    }

    /// Hedges calls with `hedge`, buffering request bodies up to 64 KiB so
    /// they can be replayed (larger ones are sent once). gRPC calls are
    /// POSTs: build `hedge` with
    /// [`non_idempotent(true)`](crate::hedge::HedgeBuilder::non_idempotent)
    /// for methods that are safe to repeat, or nothing is hedged.
    pub fn with_hedge<C>(self, hedge: HedgeLayer<C>) -> ClientStack<R, GrpcHedgeLayer<C>> {
        ClientStack {
            enrich: self.enrich,
            deadline: self.deadline,
            errors: self.errors,
            rate_limit: self.rate_limit,
            hedge: GrpcHedgeLayer {
                buffer: BufferBodyLayer::new(64 * 1024).non_idempotent(true),
                hedge,
            },
            monitor: self.monitor,
        }
    }

    /// The monitor every attempt reports to.
    pub fn monitor(&self) -> &Monitor {
        &self.monitor
    }
}

impl<R, C: Clone> ClientStack<R, GrpcHedgeLayer<C>> {
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
        R: Layer<BufferBody<Hedge<Transport<S>, C>>>,
    {
        let replicas = replicas
            .into_iter()
            .map(|s| transport(&self.errors, &self.monitor, s))
            .collect();
        let hedged = self.hedge.hedge.replicas(replicas)?;
        let inner = self.hedge.buffer.layer(hedged);
        let inner = self.rate_limit.layer(inner);
        let inner = self.deadline.layer(inner);
        Ok(StatusErrors {
            inner: self.enrich.layer(inner),
        })
    }
}

fn transport<S>(errors: &GrpcErrorsLayer, monitor: &Monitor, channel: S) -> Transport<S> {
    Heartbeat::new(errors.layer(TonicBody { inner: channel }), monitor.clone())
}

impl<S, R, H> Layer<S> for ClientStack<R, H>
where
    H: Layer<Transport<S>>,
    R: Layer<H::Service>,
{
    type Service = StatusErrors<ErrorEnrich<Deadline<R::Service>, Client>>;

    fn layer(&self, channel: S) -> Self::Service {
        let inner = transport(&self.errors, &self.monitor, channel);
        let inner = self.hedge.layer(inner);
        let inner = self.rate_limit.layer(inner);
        let inner = self.deadline.layer(inner);
        StatusErrors {
            inner: self.enrich.layer(inner),
        }
    }
}

/// The hedge of a [`ClientStack`]: a [`BufferBodyLayer`] (so tonic request
/// bodies can be replayed) over a [`HedgeLayer`].
#[derive(Clone, Debug)]
pub struct GrpcHedgeLayer<C> {
    buffer: BufferBodyLayer,
    hedge: HedgeLayer<C>,
}

impl<C> GrpcHedgeLayer<C> {
    /// The hedge's counters (hedges sent, won, …).
    pub fn stats(&self) -> atscale_hedge::HedgeStats {
        self.hedge.stats()
    }
}

impl<S, C: Clone> Layer<S> for GrpcHedgeLayer<C> {
    type Service = BufferBody<Hedge<S, C>>;

    fn layer(&self, inner: S) -> Self::Service {
        self.buffer.layer(self.hedge.layer(inner))
    }
}

impl<R, C> ClientStack<R, GrpcHedgeLayer<C>> {
    /// The hedge's counters (hedges sent, won, …).
    pub fn hedge_stats(&self) -> atscale_hedge::HedgeStats {
        self.hedge.stats()
    }
}

/// Turns any request body into a `tonic::body::Body` for the `Channel`
/// (after [`BufferBody`] wrapped it); the innermost layer of a
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
