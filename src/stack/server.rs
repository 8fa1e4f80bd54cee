//! The recommended server stack, [`ServerStack`], and what goes wrong when
//! its layers are put together by hand in another order.
//!
//! # Order, and what goes wrong otherwise
//!
//! These mistakes **are caught by the compiler**:
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
//! - **ErrorEnrich in client mode where a server needs an answer**: the
//!   client mode fails with [`Enriched`](crate::error::Enriched), so
//!   `Router::layer` refuses it like any failing layer.
//!
//! These compile, and **silently misbehave**:
//!
//! | mistake | what happens |
//! | --- | --- |
//! | ErrorEnrich not outermost on a **tonic** server (tonic accepts failing layers) | an error of an outer layer resets the HTTP/2 stream: the client sees `UNKNOWN`/`INTERNAL` with no id, nothing is logged |
//! | RateLimit outside Deadline | the rate limit does not see this hop's deadline: a request may wait for a token past its deadline instead of failing at once with 429 and `Retry-After`, and the wait is not charged to it |
//! | RateLimit outside Heartbeat | requests that wait for a token or are rejected are invisible to the monitor: `in_flight` and health look fine while callers queue |
//! | Heartbeat's stall limit shorter than the rate limit's `max_wait` | a request waiting for its token shows no progress and is cut as stalled (503) instead of served or answered 429 |
//! | `ErrorEnrichLayer::client` on a server | an error leaves the stack as an error: axum refuses it (see above), tonic resets the stream |
//! | Overload outside Deadline | admission cannot read the request's deadline (it refuses nothing for being too late, and serves requests that can no longer make it), and a request cut by its deadline is not dropped inside the limit: its slot stays taken until the handler gives up, and the limit never learns the latency was too long |
//! | Overload outside ErrorEnrich | a refusal leaves the stack as an error: axum refuses the layer, tonic resets the stream, and the caller gets no 503 / `UNAVAILABLE` and no retry-after to back off by |
//! | Overload inside Heartbeat | queued requests count as in flight and may be cut as stalled (503) while they wait for a slot; the monitor's health sees the queue, not the work |
//! | Overload inside RateLimit (a per-client limit) | every request of a flood first costs a rate-limit check (a Redis round trip, with a shared store), and a request that then waits in the admission queue, or is refused there, has already spent its client's token |
//!
//! # Where the overload layer sits, and why it is on
//!
//! ErrorEnrich → Deadline → (ResponseDeadline) → **Overload** → Heartbeat →
//! RateLimit → handler:
//!
//! - **inside Deadline**, so admission reads the request's deadline (a
//!   request that cannot be served in time is refused at arrival, before it
//!   costs anything), and a request the deadline cuts is dropped inside the
//!   limit: its slot is freed at once, and its latency teaches the limit;
//! - **inside ErrorEnrich**, so a refusal leaves as 503 + `Retry-After` or
//!   `UNAVAILABLE` + `RetryInfo` (reason `OVERLOADED`, which a client's
//!   adaptive throttle and retry read);
//! - **outside Heartbeat**, so only admitted work is watched: a request
//!   waiting for a slot is not work in progress and cannot stall;
//! - **outside the per-client RateLimit**, so the cheap global check runs
//!   first, and a request queued (or refused) here has not spent a token.
//!
//! [`ServerStack::new`] turns it on with [`OverloadLayer::new`]'s defaults
//! (an adaptive Vegas limit from 20, between 1 and 1000; a CoDel queue of
//! 1024; deadline-aware admission): the limit is learnt from the service's
//! own latency, so there is no number to guess, and below capacity nothing
//! waits or is refused (the limit grows while latency does not). A server
//! without it has no defence against everyone at once: past capacity every
//! request slows down together until each misses its deadline. Turn it off
//! with [`without_overload`](ServerStack::without_overload) (a service that
//! is protected elsewhere, or that must never answer 503 on its own), or
//! tune it with [`with_overload`](ServerStack::with_overload).
//!
//! A request holds its slot until its response head is ready: the body of
//! a stream (SSE, a server-streaming gRPC call) is not counted against the
//! limit, nor does its length teach it. The layer needs the service below
//! it to be `Clone` (a queued request holds a clone): axum's `Router` and
//! tonic's `Routes` are.

use std::sync::Arc;
use std::time::Duration;

use atscale_deadline::body::{ResponseDeadline, ResponseDeadlineLayer};
use atscale_deadline::{BodyDeadlineLayer, Deadline, DeadlineLayer};
use atscale_error::ErrorEnrich;
use atscale_error::ErrorEnrichLayer;
use atscale_error::mode::Server;
use atscale_heartbeat::{Heartbeat, Monitor};
use atscale_overload::{Admission, OverloadLayer};
use atscale_ratelimit::{RateLimitLayer, Store};
use tower_layer::{Identity, Layer};

use super::{BoxedInner, DEADLINE_HEADER};

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

/// The recommended server stack: ErrorEnrich → Deadline → Overload (on
/// unless [turned off](Self::without_overload)) → Heartbeat → RateLimit
/// (when set) → your service.
///
/// Use it around every axum `Router` (`.layer(stack)`) and tonic server
/// (`Server::builder().layer(stack)`) you run: each request
///
/// - inherits the caller's deadline from `grpc-timeout` or
///   [`x-deadline-ms`](DEADLINE_HEADER), capped by the stack's own budget,
///   and runs with it in its [`Context`](crate::core::Context), so the
///   handler's outgoing calls (through a [`ClientStack`](super::ClientStack)) pass on what is
///   left of it;
/// - is held to that deadline past its response head when it is a gRPC
///   call: a stream that outlives it ends with `DEADLINE_EXCEEDED`
///   trailers and its context is cancelled (HTTP streams too, with
///   [`with_body_deadline`](Self::with_body_deadline));
/// - reports to the stack's [`Monitor`] (started, finished, outcome, in
///   flight; no stall watchdog unless the monitor has one), once admitted;
/// - is admitted by the [`OverloadLayer`] (an adaptive concurrency limit
///   and a CoDel admission queue), or refused with 503 + `Retry-After` /
///   `UNAVAILABLE` when the service is past its capacity or the request
///   could not be served before its deadline (see the [module
///   docs](self#where-the-overload-layer-sits-and-why-it-is-on));
/// - is charged to the rate limit, if one is set, within its deadline;
/// - and every failure (a deadline, a 429, a downstream failure, a panic)
///   is answered as problem+json or a gRPC status with an error id, and
///   logged once with that id.
///
/// The stack's error type is `Infallible`. Use the layers one by one
/// instead when you need another order (see the [module docs](self) for what
/// goes wrong), or a key, a cost or a store for the rate limit that a
/// [`RateLimitLayer`] cannot hold. Under the heartbeat, the future of the
/// rate limit and your service is boxed once per request ([`BoxedInner`]),
/// so the layers above it move a pointer, not your handler's future.
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
pub struct ServerStack<R = Identity, O = OverloadLayer> {
    enrich: ErrorEnrichLayer<Server>,
    deadline: DeadlineLayer,
    bodies: ResponseDeadlineLayer,
    monitor: Monitor,
    rate_limit: R,
    overload: O,
}

impl ServerStack {
    /// The stack for the service named `service` with a budget of `budget`
    /// per request, inheriting shorter deadlines from `grpc-timeout` and
    /// [`x-deadline-ms`](DEADLINE_HEADER); overload protection with
    /// [`OverloadLayer::new`]'s defaults; a new [`Monitor`] without a stall
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
    /// link, internal details, another deadline header), with overload
    /// protection ([`OverloadLayer::new`]), a new [`Monitor`] and no rate
    /// limit.
    pub fn from_layers(enrich: ErrorEnrichLayer<Server>, deadline: DeadlineLayer) -> Self {
        ServerStack {
            enrich,
            deadline,
            bodies: BodyDeadlineLayer::grpc().responses_only(),
            monitor: Monitor::new(),
            rate_limit: Identity::new(),
            overload: OverloadLayer::new(),
        }
    }
}

impl<R, O> ServerStack<R, O> {
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

    /// Enforces the deadline over response bodies as `bodies` says:
    /// `BodyDeadlineLayer::all().responses_only()` cuts HTTP streams (SSE,
    /// downloads) at the request's deadline too, `::off()` none. The
    /// default covers gRPC streams only (`BodyDeadlineLayer::grpc()`).
    #[must_use]
    pub fn with_body_deadline(mut self, bodies: ResponseDeadlineLayer) -> Self {
        self.bodies = bodies;
        self
    }

    /// Charges every request to `rate_limit`, inside the deadline and the
    /// heartbeat.
    pub fn with_rate_limit<K, W, St: Store>(
        self,
        rate_limit: RateLimitLayer<K, W, St>,
    ) -> ServerStack<RateLimitLayer<K, W, St>, O> {
        ServerStack {
            enrich: self.enrich,
            deadline: self.deadline,
            bodies: self.bodies,
            monitor: self.monitor,
            rate_limit,
            overload: self.overload,
        }
    }

    /// Admits requests through `overload` (its algorithm, limits, queue,
    /// criticality header), inside the deadline and outside the heartbeat
    /// and the rate limit. One layer is one limit: every clone of the
    /// stack's service shares it.
    pub fn with_overload(self, overload: OverloadLayer) -> ServerStack<R, OverloadLayer> {
        ServerStack {
            enrich: self.enrich,
            deadline: self.deadline,
            bodies: self.bodies,
            monitor: self.monitor,
            rate_limit: self.rate_limit,
            overload,
        }
    }

    /// Turns overload protection off: every request is served at once,
    /// however many there are (see the [module
    /// docs](self#where-the-overload-layer-sits-and-why-it-is-on) for what
    /// that costs past capacity).
    pub fn without_overload(self) -> ServerStack<R, Identity> {
        ServerStack {
            enrich: self.enrich,
            deadline: self.deadline,
            bodies: self.bodies,
            monitor: self.monitor,
            rate_limit: self.rate_limit,
            overload: Identity::new(),
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

impl<R> ServerStack<R, OverloadLayer> {
    /// The overload layer's state: its current limit, requests in flight
    /// and queue depth.
    pub fn admission(&self) -> Admission {
        self.overload.admission()
    }
}

impl<S, R, O> Layer<S> for ServerStack<R, O>
where
    R: Layer<S>,
    O: Layer<Heartbeat<BoxedInner<R::Service>>>,
{
    type Service = ErrorEnrich<Deadline<ResponseDeadline<O::Service>>, Server>;

    fn layer(&self, inner: S) -> Self::Service {
        let inner = BoxedInner::new(self.rate_limit.layer(inner));
        let inner = Heartbeat::new(inner, self.monitor.clone());
        let inner = self.overload.layer(inner);
        let inner = self.bodies.layer(inner);
        let inner = self.deadline.layer(inner);
        self.enrich.layer(inner)
    }
}
