//! The recommended HTTP client stack, [`HttpClientStack`], and what goes
//! wrong when its layers are put together by hand in another order.
//!
//! # Order, and what goes wrong otherwise
//!
//! These compile, and **silently misbehave**:
//!
//! | mistake | what happens |
//! | --- | --- |
//! | ErrorEnrich (client) not outermost | a failure of an outer layer is not logged with an id, and reaches the handler without the target, method and path it failed on |
//! | Hedge outside Deadline | each attempt gets its own deadline, counted from when it was sent: the call can outlive its budget by the hedge delays, and each hedge sends a fresh `x-deadline-ms` downstream |
//! | RateLimit inside Hedge | every hedge spends a token: the extra load the hedge budget allows is charged to the limit |
//! | Heartbeat outside Hedge | the monitor sees one request per call, not one per attempt: a slow backend's stalls are hidden behind the hedge that beat it |
//! | Heartbeat outside [`HttpErrors`] | a 429 or 5xx answer counts as a success: the monitor's health never sees the backend failing |
//! | Hedge outside [`HttpErrors`] | a 503 answer is a "success" for the hedge: it may win the race against a good answer, and is never counted as a failed attempt |
//! | Deadline as `DeadlineLayer::new` / `::server` | the deadline is enforced but never written to `x-deadline-ms`: the backend does not inherit it |
//! | Hedge over a body without BufferBody | a body that is not [`ReplayBody`](crate::hedge::ReplayBody) does not compile; one that is (`Full`) is hedged as it is |
//! | `non_idempotent(true)` on a hedge for methods that are not safe to repeat | a POST that creates something is sent twice, and both may be served |

use std::sync::Arc;
use std::time::Duration;

use atscale_deadline::{Deadline, DeadlineLayer};
use atscale_error::mode::Client;
use atscale_error::{ErrorEnrich, ErrorEnrichLayer};
use atscale_heartbeat::{Heartbeat, Monitor};
use atscale_hedge::{BufferBody, BufferBodyLayer, Hedge, HedgeLayer};
use atscale_ratelimit::{RateLimitLayer, Store};
use tower_layer::{Identity, Layer};

use super::DEADLINE_HEADER;
use crate::remote::{HttpErrors, HttpErrorsLayer};

/// The recommended HTTP client stack for outgoing calls of the service
/// named `service`, each call within `budget` or what is left of the request
/// being served; see [`HttpClientStack`].
///
/// # Panics
///
/// As [`server`](super::server()).
pub fn http_client(service: impl Into<Arc<str>>, budget: Duration) -> HttpClientStack {
    HttpClientStack::new(service, budget)
}

/// What an [`HttpClientStack`] puts right over the HTTP client: the
/// heartbeat and [`HttpErrors`].
pub type HttpTransport<S> = Heartbeat<HttpErrors<S>>;

/// The recommended HTTP client stack: ErrorEnrich (client mode) → Deadline
/// (client, writes `x-deadline-ms`) → RateLimit (when set) → BufferBody +
/// Hedge (when set) → Heartbeat → [`HttpErrors`] → any tower HTTP client
/// (hyper-util's legacy `Client`, …), failing with
/// [`Enriched`](crate::error::Enriched).
///
/// Use it for every HTTP dependency a service calls: each call
///
/// - carries the deadline of the request being served (or the stack's
///   budget, whichever is sooner) in [`x-deadline-ms`](DEADLINE_HEADER)
///   (and `grpc-timeout`, [`with_grpc_timeout`](Self::with_grpc_timeout)),
///   and fails with a deadline exceeded when it passes, even if the backend
///   never answers;
/// - is charged to the rate limit, if one is set, once per call (not per
///   hedge);
/// - is hedged, if a hedge is set, within the hedge's budget, the losing
///   attempts cancelled; only idempotent methods (GET, PUT, DELETE, …)
///   unless told otherwise;
/// - reports to the stack's [`Monitor`], once per attempt;
/// - fails, when the backend answers 429 or a 5xx, with a
///   [`RemoteFailure`](crate::remote::RemoteFailure) that keeps the
///   downstream kind (a 429's `Retry-After`, a 504's deadline, a 503's
///   overload or stall), service and error id, never its text; and when the
///   backend cannot be reached, with
///   [`Unreachable`](crate::core::Unreachable) naming it (503, safe to
///   retry). Every failure is logged (at `DEBUG`) with an id.
///
/// A handler that returns the stack's error (`Err(err.into())`) under a
/// [`ServerStack`](super::ServerStack) answers with the downstream kind:
/// the gateway's caller sees a 429 with the same `Retry-After`, a 504 for a
/// deadline it set, a 503 naming the dependency that is down.
///
/// ```
/// use std::time::Duration;
/// use atscale::prelude::*;
/// use atscale::stack;
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use hyper_util::client::legacy::Client;
/// use hyper_util::rt::TokioExecutor;
/// use tower::Layer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
/// let inventory = stack::http_client("gateway", Duration::from_secs(1))
///     .with_dependency("inventory")
///     .with_rate_limit(RateLimitLayer::new(Limiter::new(Limit::per_second(50)?)))
///     .layer(client);
/// # let _ = inventory;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct HttpClientStack<R = Identity, H = Identity> {
    enrich: ErrorEnrichLayer<Client>,
    deadline: DeadlineLayer,
    errors: HttpErrorsLayer,
    rate_limit: R,
    hedge: H,
    monitor: Monitor,
}

impl HttpClientStack {
    /// The stack for calls made by the service named `service`, each within
    /// `budget` or the deadline of the request being served, written to
    /// `x-deadline-ms`; a new [`Monitor`]; no rate limit, no hedge.
    ///
    /// # Panics
    ///
    /// When `service` is not a valid service name; see
    /// [`ErrorEnrichLayer::client`] (and [`HttpClientStack::from_layers`]).
    pub fn new(service: impl Into<Arc<str>>, budget: Duration) -> Self {
        HttpClientStack::from_layers(
            ErrorEnrichLayer::client(service),
            DeadlineLayer::client(budget)
                .without_grpc_timeout()
                .with_header(DEADLINE_HEADER),
        )
    }

    /// The stack around the given ErrorEnrich (client mode) and deadline
    /// (client) layers, with a new [`Monitor`], no rate limit and no hedge.
    pub fn from_layers(enrich: ErrorEnrichLayer<Client>, deadline: DeadlineLayer) -> Self {
        HttpClientStack {
            enrich,
            deadline,
            errors: HttpErrorsLayer::new(),
            rate_limit: Identity::new(),
            hedge: Identity::new(),
            monitor: Monitor::new(),
        }
    }
}

impl<R, H> HttpClientStack<R, H> {
    /// Reports every attempt to `monitor`.
    #[must_use]
    pub fn with_monitor(mut self, monitor: Monitor) -> Self {
        self.monitor = monitor;
        self
    }

    /// Also writes the remaining deadline to `grpc-timeout` (for a backend
    /// that reads only that header), keeping the stack's budget.
    #[must_use]
    pub fn with_grpc_timeout(mut self) -> Self {
        self.deadline = DeadlineLayer::client(self.deadline.budget()).with_header(DEADLINE_HEADER);
        self
    }

    /// Replaces the deadline layer (a client layer: `DeadlineLayer::client`,
    /// or nothing is written for the backend to inherit).
    #[must_use]
    pub fn with_deadline(mut self, deadline: DeadlineLayer) -> Self {
        self.deadline = deadline;
        self
    }

    /// Names the dependency `name` when it cannot be reached (rather than
    /// by its address).
    #[must_use]
    pub fn with_dependency(mut self, name: impl Into<Arc<str>>) -> Self {
        self.errors = self.errors.dependency(name);
        self
    }

    /// Charges every call (once, whatever the hedge does) to `rate_limit`.
    pub fn with_rate_limit<K, W, St: Store>(
        self,
        rate_limit: RateLimitLayer<K, W, St>,
    ) -> HttpClientStack<RateLimitLayer<K, W, St>, H> {
        HttpClientStack {
            enrich: self.enrich,
            deadline: self.deadline,
            errors: self.errors,
            rate_limit,
            hedge: self.hedge,
            monitor: self.monitor,
        }
    }

    /// Hedges calls with `hedge`, buffering request bodies of idempotent
    /// methods up to 64 KiB so they can be replayed: a POST is sent once.
    /// For methods that are safe to repeat although not idempotent, see
    /// [`with_hedge_and_buffer`](Self::with_hedge_and_buffer).
    pub fn with_hedge<C>(self, hedge: HedgeLayer<C>) -> HttpClientStack<R, HttpHedgeLayer<C>> {
        self.with_hedge_and_buffer(hedge, BufferBodyLayer::new(64 * 1024))
    }

    /// Hedges calls with `hedge`, request bodies buffered by `buffer`: to
    /// hedge POSTs that are safe to repeat, build both with
    /// `non_idempotent(true)`.
    pub fn with_hedge_and_buffer<C>(
        self,
        hedge: HedgeLayer<C>,
        buffer: BufferBodyLayer,
    ) -> HttpClientStack<R, HttpHedgeLayer<C>> {
        HttpClientStack {
            enrich: self.enrich,
            deadline: self.deadline,
            errors: self.errors,
            rate_limit: self.rate_limit,
            hedge: HttpHedgeLayer { buffer, hedge },
            monitor: self.monitor,
        }
    }

    /// The monitor every attempt reports to.
    pub fn monitor(&self) -> &Monitor {
        &self.monitor
    }

    /// The deadline layer.
    pub fn deadline(&self) -> &DeadlineLayer {
        &self.deadline
    }
}

impl<R, C> HttpClientStack<R, HttpHedgeLayer<C>> {
    /// The hedge's counters (hedges sent, won, …).
    pub fn hedge_stats(&self) -> atscale_hedge::HedgeStats {
        self.hedge.hedge.stats()
    }
}

impl<S, R, H> Layer<S> for HttpClientStack<R, H>
where
    H: Layer<HttpTransport<S>>,
    R: Layer<H::Service>,
{
    type Service = ErrorEnrich<Deadline<R::Service>, Client>;

    fn layer(&self, client: S) -> Self::Service {
        let inner = Heartbeat::new(self.errors.layer(client), self.monitor.clone());
        let inner = self.hedge.layer(inner);
        let inner = self.rate_limit.layer(inner);
        let inner = self.deadline.layer(inner);
        self.enrich.layer(inner)
    }
}

/// The hedge of an [`HttpClientStack`]: a [`BufferBodyLayer`] (so request
/// bodies can be replayed) over a [`HedgeLayer`].
#[derive(Clone, Debug)]
pub struct HttpHedgeLayer<C> {
    buffer: BufferBodyLayer,
    hedge: HedgeLayer<C>,
}

impl<S, C: Clone> Layer<S> for HttpHedgeLayer<C> {
    type Service = BufferBody<Hedge<S, C>>;

    fn layer(&self, inner: S) -> Self::Service {
        self.buffer.layer(self.hedge.layer(inner))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use atscale_core::{BoxError, Context, Origin};
    use tower::{ServiceExt, service_fn};

    use super::*;

    /// The deadline headers (`x-deadline-ms`, `grpc-timeout`) a call
    /// carried, made inside a handler whose caller allowed 750 ms.
    async fn sent(stack: HttpClientStack) -> (Option<String>, Option<String>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let client = service_fn(move |req: http::Request<()>| {
            let header = |name: &str| {
                req.headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_owned())
            };
            let _ = tx.send((header("x-deadline-ms"), header("grpc-timeout")));
            async { Ok::<_, BoxError>(http::Response::new(String::new())) }
        });
        let served = Context::new().with_budget(Duration::from_millis(750), Origin::Header);
        served
            .scope(stack.layer(client).oneshot(http::Request::new(())))
            .await
            .unwrap();
        rx.recv().await.unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_goes_out_as_x_deadline_ms_and_grpc_timeout_when_asked() {
        let stack = HttpClientStack::new("gateway", Duration::from_secs(5));
        assert_eq!(sent(stack.clone()).await, (Some("750".into()), None));
        assert_eq!(
            sent(stack.with_grpc_timeout()).await,
            (Some("750".into()), Some("750000u".into()))
        );
    }
}
