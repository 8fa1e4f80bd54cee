//! The recommended stacks, one line each: [`server`] for axum and tonic
//! servers, [`client`] for tonic `Channel`s.
//!
//! | stack | layers, outermost first | use it for |
//! | --- | --- | --- |
//! | [`ServerStack`] | ErrorEnrich → Deadline (reads `grpc-timeout` and `x-deadline-ms`) → Heartbeat → RateLimit (optional) → your service | every axum `Router` (`Router::layer`) and tonic server (`Server::builder().layer`) |
//! | [`ClientStack`] | ErrorEnrich (client) → Deadline (writes `grpc-timeout`) → RateLimit (optional) → BufferBody + Hedge (optional) → Heartbeat → [`GrpcErrors`] → tonic `Channel` | every tonic generated client (`FooClient::new(stack.layer(channel))`) |
//!
//! Both are `Clone + Debug` builders that implement `tower::Layer`; each
//! layer's settings can be replaced (`with_*`), and the order cannot be
//! changed. Their docs say when to use each and what they answer.
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
//! The stacks fix the order. Building one by hand ([`ServiceBuilderExt`](crate::ServiceBuilderExt)
//! or `ServiceBuilder::layer`), these mistakes **are caught by the compiler**:
//!
//! - **ErrorEnrich (server mode) not outermost, under axum.** A layer
//!   outside it fails with `BoxError`, and `Router::layer` only takes
//!   services whose error is `Infallible`, so it does not compile:
//!
//!   ```compile_fail
//!   # use std::time::Duration;
//!   # use atscale::prelude::*;
//!   # use atscale::ServiceBuilderExt;
//!   # use axum::{Router, routing::get};
//!   # use tower::ServiceBuilder;
//!   let app: Router = Router::new().route("/", get(|| async { "hello" })).layer(
//!       ServiceBuilder::new()
//!           .deadline(DeadlineLayer::server(Duration::from_secs(2))) // outside ErrorEnrich: wrong
//!           .enrich_errors(ErrorEnrichLayer::new("hello")),
//!   );
//!   ```
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
//! - **A layer over a request type that cannot carry a context**: every
//!   layer needs [`Carrier`](crate::core::Carrier) (implemented for
//!   `http::Request`), the hedge [`Replay`](crate::hedge::Replay) too; the
//!   heartbeat needs a response it can follow to its end
//!   ([`Track`](crate::heartbeat::Track): `http::Response` and unary types).
//! - **ErrorEnrich in client mode where a server needs an answer**: the
//!   client mode fails with [`Enriched`], so `Router::layer` refuses it like
//!   any failing layer.
//!
//! These compile, and **silently misbehave**:
//!
//! | mistake | what happens |
//! | --- | --- |
//! | ErrorEnrich not outermost on a **tonic** server (tonic accepts failing layers) | an error of an outer layer resets the HTTP/2 stream: the client sees `UNKNOWN`/`INTERNAL` with no id, nothing is logged |
//! | Hedge outside Deadline (client) | each attempt gets its own deadline, counted from when it was sent: the call can outlive its budget by the hedge delays, and each hedge sends a fresh `grpc-timeout` downstream (unless the request being served caps it) |
//! | RateLimit inside Hedge (client) | every hedge spends a token: the extra load the hedge budget allows is charged to the limit and can make the hedge itself rate-limited |
//! | RateLimit outside Deadline | the rate limit does not see this hop's deadline (only a served request's, on a client): a request may wait for a token past its deadline instead of failing at once with 429 and `Retry-After`, and the wait is not charged to it |
//! | RateLimit outside Heartbeat (server) | requests that wait for a token or are rejected are invisible to the monitor: `in_flight` and health look fine while callers queue |
//! | Heartbeat outside Hedge (client) | the monitor sees one request per call, not one per attempt: a slow replica's stalls are hidden behind the hedge that beat it |
//! | Heartbeat's stall limit shorter than the rate limit's `max_wait` (server) | a request waiting for its token shows no progress and is cut as stalled (503) instead of served or answered 429 |
//! | Deadline as `DeadlineLayer::new` / `::server` on a client | the deadline is enforced but never written to `grpc-timeout`: the next hop does not inherit it |
//! | `ErrorEnrichLayer::new` (server mode) on a client | a failed call becomes an `Ok` problem+json or gRPC *response*: the caller's code sees success |
//! | BufferBody or Hedge without `non_idempotent(true)` on gRPC | every gRPC call is a POST, so nothing is ever hedged |

use std::sync::Arc;
#[cfg(feature = "tonic")]
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use atscale_deadline::{Deadline, DeadlineLayer};
use atscale_error::ErrorEnrich;
use atscale_error::ErrorEnrichLayer;
#[cfg(feature = "tonic")]
use atscale_error::mode::Client;
use atscale_error::mode::Server;
use atscale_heartbeat::{Heartbeat, Monitor};
use atscale_ratelimit::{RateLimitLayer, Store};
use http::HeaderName;
use tower_layer::{Identity, Layer};

#[cfg(feature = "tonic")]
use crate::remote::{GrpcErrors, GrpcErrorsLayer};
#[cfg(feature = "tonic")]
use atscale_error::Enriched;
#[cfg(feature = "tonic")]
use atscale_hedge::{BufferBody, BufferBodyLayer, Hedge, HedgeLayer, InvalidConfig};
#[cfg(feature = "tonic")]
use tower_service::Service;

/// The header a plain HTTP caller puts its budget in, in whole milliseconds:
/// `x-deadline-ms`. The stacks read (server) it besides `grpc-timeout`.
pub const DEADLINE_HEADER: HeaderName = HeaderName::from_static("x-deadline-ms");

/// The recommended server stack for the service named `service`, answering
/// within `budget` or the caller's deadline, whichever is sooner; see
/// [`ServerStack`].
///
/// # Panics
///
/// When `service` is not a valid service name (empty, longer than 128
/// bytes, whitespace or control characters); see
/// [`ErrorEnrichLayer::new`].
pub fn server(service: impl Into<Arc<str>>, budget: Duration) -> ServerStack {
    ServerStack::new(service, budget)
}

/// The recommended tonic client stack for outgoing calls of the service
/// named `service`, each call within `budget` or what is left of the
/// request being served; see [`ClientStack`].
///
/// # Panics
///
/// As [`server`].
#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
pub fn client(service: impl Into<Arc<str>>, budget: Duration) -> ClientStack {
    ClientStack::new(service, budget)
}

/// The recommended server stack: ErrorEnrich → Deadline → Heartbeat →
/// RateLimit (when set) → your service.
///
/// Use it around every axum `Router` (`.layer(stack)`) and tonic server
/// (`Server::builder().layer(stack)`) you run: each request
///
/// - inherits the caller's deadline from `grpc-timeout` or
///   [`x-deadline-ms`](DEADLINE_HEADER), capped by the stack's own budget,
///   and runs with it in its [`Context`](crate::core::Context), so the
///   handler's outgoing calls (through a [`ClientStack`]) pass on what is
///   left of it;
/// - reports to the stack's [`Monitor`] (started, finished, outcome, in
///   flight; no stall watchdog unless the monitor has one);
/// - is charged to the rate limit, if one is set, within its deadline;
/// - and every failure (a deadline, a 429, a downstream failure, a panic)
///   is answered as problem+json or a gRPC status with an error id, and
///   logged once with that id.
///
/// The stack's error type is `Infallible`. Use the layers one by one
/// instead when you need another order (see the [module docs](self) for what
/// goes wrong), or a key, a cost or a store for the rate limit that a
/// [`RateLimitLayer`] cannot hold.
///
/// ```
/// use std::time::Duration;
/// use atscale::prelude::*;
/// use atscale::stack::ServerStack;
/// use tower::{ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let stack = ServerStack::new("orders", Duration::from_secs(2))
///     .with_rate_limit(RateLimitLayer::reject(Limiter::new(Limit::per_minute(1)?)));
/// let svc = tower::Layer::layer(&stack, service_fn(|_req: http::Request<String>| async {
///     Ok::<_, BoxError>(http::Response::new(String::from("ok")))
/// }));
///
/// let ok = svc.clone().oneshot(http::Request::new(String::new())).await?;
/// assert_eq!(ok.status(), 200);
/// let limited = svc.oneshot(http::Request::new(String::new())).await?;
/// assert_eq!(limited.status(), 429);
/// assert_eq!(limited.headers()["content-type"], "application/problem+json");
/// // A request is in flight until its response body is done with.
/// drop((ok, limited));
/// assert_eq!(stack.monitor().counts().finished(), 2);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct ServerStack<R = Identity> {
    enrich: ErrorEnrichLayer<Server>,
    deadline: DeadlineLayer,
    monitor: Monitor,
    rate_limit: R,
}

impl ServerStack {
    /// The stack for the service named `service` with a budget of `budget`
    /// per request, inheriting shorter deadlines from `grpc-timeout` and
    /// [`x-deadline-ms`](DEADLINE_HEADER); a new [`Monitor`] without a stall
    /// watchdog; no rate limit.
    ///
    /// # Panics
    ///
    /// When `service` is not a valid service name; see
    /// [`ErrorEnrichLayer::new`] (and [`ServerStack::from_layers`] to build
    /// the layer without panicking).
    pub fn new(service: impl Into<Arc<str>>, budget: Duration) -> Self {
        ServerStack::from_layers(
            ErrorEnrichLayer::new(service),
            DeadlineLayer::server(budget).with_header(DEADLINE_HEADER),
        )
    }

    /// The stack around the given ErrorEnrich and deadline layers (a help
    /// link, internal details, another deadline header), with a new
    /// [`Monitor`] and no rate limit.
    pub fn from_layers(enrich: ErrorEnrichLayer<Server>, deadline: DeadlineLayer) -> Self {
        ServerStack {
            enrich,
            deadline,
            monitor: Monitor::new(),
            rate_limit: Identity::new(),
        }
    }
}

impl<R> ServerStack<R> {
    /// Reports to `monitor` (one with a stall watchdog, say; keep its stall
    /// limit above the rate limit's longest wait).
    #[must_use]
    pub fn with_monitor(mut self, monitor: Monitor) -> Self {
        self.monitor = monitor;
        self
    }

    /// Replaces the deadline layer (a server layer: `DeadlineLayer::server`).
    #[must_use]
    pub fn with_deadline(mut self, deadline: DeadlineLayer) -> Self {
        self.deadline = deadline;
        self
    }

    /// Charges every request to `rate_limit`, inside the deadline and the
    /// heartbeat.
    pub fn with_rate_limit<K, W, St: Store>(
        self,
        rate_limit: RateLimitLayer<K, W, St>,
    ) -> ServerStack<RateLimitLayer<K, W, St>> {
        ServerStack {
            enrich: self.enrich,
            deadline: self.deadline,
            monitor: self.monitor,
            rate_limit,
        }
    }

    /// The monitor every request reports to.
    pub fn monitor(&self) -> &Monitor {
        &self.monitor
    }

    /// The ErrorEnrich layer.
    pub fn enrich(&self) -> &ErrorEnrichLayer<Server> {
        &self.enrich
    }

    /// The deadline layer.
    pub fn deadline(&self) -> &DeadlineLayer {
        &self.deadline
    }
}

impl<S, R: Layer<S>> Layer<S> for ServerStack<R> {
    type Service = ErrorEnrich<Deadline<Heartbeat<R::Service>>, Server>;

    fn layer(&self, inner: S) -> Self::Service {
        let inner = self.rate_limit.layer(inner);
        let inner = Heartbeat::new(inner, self.monitor.clone());
        let inner = self.deadline.layer(inner);
        self.enrich.layer(inner)
    }
}

/// What a [`ClientStack`] puts right over each transport: the heartbeat,
/// [`GrpcErrors`] and the body conversion to `tonic::body::Body`.
#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
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
#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
#[derive(Clone, Debug)]
pub struct ClientStack<R = Identity, H = Identity> {
    enrich: ErrorEnrichLayer<Client>,
    deadline: DeadlineLayer,
    rate_limit: R,
    hedge: H,
    monitor: Monitor,
}

#[cfg(feature = "tonic")]
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
            rate_limit: Identity::new(),
            hedge: Identity::new(),
            monitor: Monitor::new(),
        }
    }
}

#[cfg(feature = "tonic")]
impl<R, H> ClientStack<R, H> {
    /// Reports every attempt to `monitor`.
    #[must_use]
    pub fn with_monitor(mut self, monitor: Monitor) -> Self {
        self.monitor = monitor;
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

#[cfg(feature = "tonic")]
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
            .map(|s| transport(&self.monitor, s))
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

#[cfg(feature = "tonic")]
fn transport<S>(monitor: &Monitor, channel: S) -> Transport<S> {
    Heartbeat::new(
        GrpcErrorsLayer::new().layer(TonicBody { inner: channel }),
        monitor.clone(),
    )
}

#[cfg(feature = "tonic")]
impl<S, R, H> Layer<S> for ClientStack<R, H>
where
    H: Layer<Transport<S>>,
    R: Layer<H::Service>,
{
    type Service = StatusErrors<ErrorEnrich<Deadline<R::Service>, Client>>;

    fn layer(&self, channel: S) -> Self::Service {
        let inner = transport(&self.monitor, channel);
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
#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
#[derive(Clone, Debug)]
pub struct GrpcHedgeLayer<C> {
    buffer: BufferBodyLayer,
    hedge: HedgeLayer<C>,
}

#[cfg(feature = "tonic")]
impl<C> GrpcHedgeLayer<C> {
    /// The hedge's counters (hedges sent, won, …).
    pub fn stats(&self) -> atscale_hedge::HedgeStats {
        self.hedge.stats()
    }
}

#[cfg(feature = "tonic")]
impl<S, C: Clone> Layer<S> for GrpcHedgeLayer<C> {
    type Service = BufferBody<Hedge<S, C>>;

    fn layer(&self, inner: S) -> Self::Service {
        self.buffer.layer(self.hedge.layer(inner))
    }
}

#[cfg(feature = "tonic")]
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
#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
#[derive(Clone, Debug)]
pub struct TonicBody<S> {
    inner: S,
}

#[cfg(feature = "tonic")]
impl<S> TonicBody<S> {
    atscale_core::inner_accessors!();
}

#[cfg(feature = "tonic")]
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
#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
#[derive(Clone, Debug)]
pub struct StatusErrors<S> {
    inner: S,
}

#[cfg(feature = "tonic")]
impl<S> StatusErrors<S> {
    atscale_core::inner_accessors!();
}

#[cfg(feature = "tonic")]
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

#[cfg(feature = "tonic")]
pin_project_lite::pin_project! {
    /// The response future of [`StatusErrors`].
    #[derive(Debug)]
    pub struct StatusFuture<F> {
        #[pin]
        inner: F,
    }
}

#[cfg(feature = "tonic")]
impl<F, T> std::future::Future for StatusFuture<F>
where
    F: std::future::Future<Output = Result<T, Enriched>>,
{
    type Output = Result<T, tonic::Status>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx).map_err(to_status)
    }
}

#[cfg(feature = "tonic")]
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
