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
//! | Retry inside [`HttpErrors`] | the retry judges raw answers by their status alone: every 503 is "overloaded" to it, so a backend's 503 that names a stall, or a dependency of its own that is down, is retried, and a refused connection is not named as the dependency |
//! | Retry outside Deadline | each attempt gets a fresh deadline: the call outlives its budget by every attempt and backoff |
//! | RateLimit inside Retry | every retry spends a token: a failing backend drains the limit |
//! | Retry and Hedge on different [`RetryThrottle`]s | in an outage each spends its own tokens: the load multiplies instead of staying near 1x |
//! | Throttle outside Retry or Hedge | only calls are counted, not attempts: the backend refuses three attempts and the throttle sees one refusal |
//! | one [`ThrottleLayer`] for several backends | a backend that refuses work stops calls to the healthy ones too |
//!
//! # Retries, and the throttles
//!
//! ErrorEnrich → Deadline → RateLimit → BufferBody → **Retry** → Hedge →
//! Heartbeat → **Throttle** → [`HttpErrors`] → client. The retry
//! ([`with_retry`](HttpClientStack::with_retry)) retries idempotent methods
//! only (GET, PUT, DELETE, …: its body buffer and its policy must both opt
//! in for a POST, [`with_retry_and_buffer`](HttpClientStack::with_retry_and_buffer)).
//! It sits outside [`HttpErrors`], so it decides on the vocabulary: a plain
//! 503 (no problem document) is [`Overloaded`](crate::core::Overloaded),
//! retried after its `Retry-After`; a 503 whose problem names a stall or an
//! unreachable dependency of the backend is not retried. The A6
//! [`RetryThrottle`] ([`with_retry_throttle`](HttpClientStack::with_retry_throttle))
//! is one per backend, shared with the hedge; the SRE adaptive throttle
//! ([`with_throttle`](HttpClientStack::with_throttle)) is closest to the
//! transport, counts every attempt, and its local refusal is never retried.

use std::sync::Arc;
use std::time::Duration;

use atscale_core::RetryThrottle;
use atscale_deadline::{Deadline, DeadlineLayer};
use atscale_error::mode::Client;
use atscale_error::{ErrorEnrich, ErrorEnrichLayer};
use atscale_heartbeat::{Heartbeat, Monitor};
use atscale_hedge::{BufferBodyLayer, Hedge, HedgeLayer, InvalidConfig};
use atscale_overload::throttle::ThrottleLayer;
use atscale_ratelimit::{RateLimitLayer, Store};
use atscale_retry::RetryLayer;
use tower_layer::{Identity, Layer};

use super::parts::{ClientHedgeLayer, ClientParts, ClientRetryLayer};
use super::{DEADLINE_HEADER, HedgeSlot, HedgedRetrySlot, RetrySlot};
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
/// heartbeat, the adaptive throttle (`T`: a [`ThrottleLayer`], when set)
/// and [`HttpErrors`].
pub type HttpTransport<S, T = Identity> = Heartbeat<<T as Layer<HttpErrors<S>>>::Service>;

/// The recommended HTTP client stack: ErrorEnrich (client mode) → Deadline
/// (client, writes `x-deadline-ms`) → RateLimit (when set) → BufferBody
/// (with a retry or a hedge) → Retry (when set) → Hedge (when set) →
/// Heartbeat → Throttle
/// (when set) → [`HttpErrors`] → any tower HTTP client
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
///   hedge or retry);
/// - is retried, if a retry is set, on the failures its policy names (by
///   default a backend that could not be reached, or answered 503
///   overloaded), after its `Retry-After` or a backoff, never past the
///   deadline, while the [`RetryThrottle`] allows; only idempotent methods
///   unless told otherwise;
/// - is hedged, if a hedge is set, within the hedge's budget, the losing
///   attempts cancelled; only idempotent methods (GET, PUT, DELETE, …)
///   unless told otherwise;
/// - reports to the stack's [`Monitor`], once per attempt;
/// - is refused locally (503, never retried) by the adaptive throttle, if
///   one is set, when the backend has been refusing work;
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
///     .with_retry(RetryLayer::new(RetryPolicy::builder().max_attempts(3).build()?))
///     .with_retry_throttle(RetryThrottle::new(10, 0.1)?)
///     .with_throttle(ThrottleLayer::new())
///     .layer(client);
/// # let _ = inventory;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct HttpClientStack<R = Identity, H = Identity, Y = Identity, T = Identity> {
    parts: ClientParts<HttpErrorsLayer, R, H, Y, T>,
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
            parts: ClientParts::new(enrich, deadline, HttpErrorsLayer::new()),
        }
    }
}

impl<R, H, Y, T> HttpClientStack<R, H, Y, T> {
    /// Reports every attempt to `monitor`.
    #[must_use]
    pub fn with_monitor(mut self, monitor: Monitor) -> Self {
        self.parts.monitor = monitor;
        self
    }

    /// Also writes the remaining deadline to `grpc-timeout` (for a backend
    /// that reads only that header), keeping the stack's budget.
    #[must_use]
    pub fn with_grpc_timeout(mut self) -> Self {
        self.parts.deadline =
            DeadlineLayer::client(self.parts.deadline.budget()).with_header(DEADLINE_HEADER);
        self
    }

    /// Replaces the deadline layer (a client layer: `DeadlineLayer::client`,
    /// or nothing is written for the backend to inherit).
    #[must_use]
    pub fn with_deadline(mut self, deadline: DeadlineLayer) -> Self {
        self.parts.deadline = deadline;
        self
    }

    /// Names the dependency `name` when it cannot be reached (rather than
    /// by its address).
    #[must_use]
    pub fn with_dependency(mut self, name: impl Into<Arc<str>>) -> Self {
        self.parts.errors = self.parts.errors.dependency(name);
        self
    }

    /// Charges every call (once, whatever the hedge does) to `rate_limit`.
    pub fn with_rate_limit<K, W, St: Store>(
        self,
        rate_limit: RateLimitLayer<K, W, St>,
    ) -> HttpClientStack<RateLimitLayer<K, W, St>, H, Y, T> {
        HttpClientStack {
            parts: self.parts.rate_limit(rate_limit),
        }
    }

    /// Hedges calls with `hedge`, buffering request bodies of idempotent
    /// methods up to 64 KiB so they can be replayed: a POST is sent once.
    /// For methods that are safe to repeat although not idempotent, see
    /// [`with_hedge_and_buffer`](Self::with_hedge_and_buffer).
    ///
    /// With a retry too, the hedge sits inside it, and the retry's body
    /// buffer serves both (this one is not used). A hedge built without a
    /// [`throttle`](crate::hedge::HedgeBuilder::throttle) consults the
    /// stack's [`RetryThrottle`], if one is set (before or after), so that
    /// both stop together.
    pub fn with_hedge<C>(
        self,
        hedge: HedgeLayer<C>,
    ) -> HttpClientStack<R, HttpHedgeLayer<C>, Y, T> {
        self.with_hedge_and_buffer(hedge, BufferBodyLayer::new(64 * 1024))
    }

    /// Hedges calls with `hedge`, request bodies buffered by `buffer`: to
    /// hedge POSTs that are safe to repeat, build both with
    /// `non_idempotent(true)`.
    pub fn with_hedge_and_buffer<C>(
        self,
        hedge: HedgeLayer<C>,
        buffer: BufferBodyLayer,
    ) -> HttpClientStack<R, HttpHedgeLayer<C>, Y, T> {
        HttpClientStack {
            parts: self.parts.hedge(HttpHedgeLayer { buffer, hedge }),
        }
    }

    /// Retries calls with `retry` (gRFC A6 backoff, `Retry-After`, never
    /// past the deadline), buffering request bodies of idempotent methods
    /// up to 64 KiB so they can be replayed: a POST is sent once. For
    /// methods that are safe to repeat although not idempotent, see
    /// [`with_retry_and_buffer`](Self::with_retry_and_buffer).
    pub fn with_retry(self, retry: RetryLayer) -> HttpClientStack<R, H, HttpRetryLayer, T> {
        self.with_retry_and_buffer(retry, BufferBodyLayer::new(64 * 1024))
    }

    /// Retries calls with `retry`, request bodies buffered by `buffer`: to
    /// retry POSTs that are safe to repeat, build both with
    /// `non_idempotent(true)` (the policy's
    /// [`non_idempotent`](crate::retry::RetryPolicyBuilder::non_idempotent),
    /// the buffer's [`non_idempotent`](BufferBodyLayer::non_idempotent)).
    pub fn with_retry_and_buffer(
        self,
        retry: RetryLayer,
        buffer: BufferBodyLayer,
    ) -> HttpClientStack<R, H, HttpRetryLayer, T> {
        HttpClientStack {
            parts: self.parts.retry(HttpRetryLayer { buffer, retry }),
        }
    }

    /// The A6 retry throttle (`retryThrottling`) of this backend: the
    /// stack's retry consults it in place of its own, and so does the hedge
    /// unless it was built with a throttle of its own
    /// ([`HedgeLayer::adopt_throttle`](crate::hedge::HedgeLayer::adopt_throttle)),
    /// so that in an outage retries and hedges stop together once it holds
    /// half its tokens or fewer.
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
    /// the backend accepted (not 429 or 503) over its window, and refuses new
    /// ones locally ([`Throttled`](crate::overload::error::Throttled): 503,
    /// never retried) with probability
    /// `max(0, (requests − K·accepts) / (requests + 1))`. Closest to the
    /// transport, so every attempt is counted. One layer per backend.
    pub fn with_throttle(self, throttle: ThrottleLayer) -> HttpClientStack<R, H, Y, ThrottleLayer> {
        HttpClientStack {
            parts: self.parts.throttle(throttle),
        }
    }

    /// The monitor every attempt reports to.
    pub fn monitor(&self) -> &Monitor {
        &self.parts.monitor
    }

    /// The deadline layer.
    pub fn deadline(&self) -> &DeadlineLayer {
        &self.parts.deadline
    }
}

impl<R, C, Y, T> HttpClientStack<R, HttpHedgeLayer<C>, Y, T> {
    /// The hedge's counters (hedges sent, won, …).
    pub fn hedge_stats(&self) -> atscale_hedge::HedgeStats {
        self.parts.hedge.hedge.stats()
    }
}

impl<R, C: Clone, Y, T> HttpClientStack<R, HttpHedgeLayer<C>, Y, T> {
    /// The stack over several replicas of one backend (one HTTP client
    /// each, e.g. each with its own base address): each call's first
    /// attempt goes to the next replica in turn, and a hedge to another
    /// replica than the first, so a backup never waits on the replica that
    /// is slow. One monitor sees every attempt; a [`ThrottleLayer`], when
    /// set, is shared by the replicas, as one backend service.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] when `replicas` is empty.
    #[allow(clippy::type_complexity)]
    pub fn replicas<S>(
        &self,
        replicas: Vec<S>,
    ) -> Result<ErrorEnrich<Deadline<R::Service>, Client>, InvalidConfig>
    where
        T: Layer<HttpErrors<S>>,
        Y: HedgedRetrySlot<Hedge<HttpTransport<S, T>, C>>,
        R: Layer<Y::Service>,
    {
        let parts = &self.parts;
        let replicas = replicas
            .into_iter()
            .map(|client| parts.transport(client))
            .collect();
        let hedged = parts.hedge.hedge.replicas(replicas)?;
        Ok(parts.outer(parts.retry.around_hedged(
            &parts.hedge.buffer,
            hedged,
            parts.retry_throttle.as_ref(),
        )))
    }
}

impl<S, R, H, Y, T> Layer<S> for HttpClientStack<R, H, Y, T>
where
    T: Layer<HttpErrors<S>>,
    Y: RetrySlot<H, HttpTransport<S, T>>,
    R: Layer<Y::Service>,
{
    type Service = ErrorEnrich<Deadline<R::Service>, Client>;

    fn layer(&self, client: S) -> Self::Service {
        let parts = &self.parts;
        let inner = parts.transport(client);
        parts.outer(
            parts
                .retry
                .layer_with(&parts.hedge, inner, parts.retry_throttle.as_ref()),
        )
    }
}

/// The retry of an [`HttpClientStack`]: a [`BufferBodyLayer`] (so request
/// bodies can be replayed) over a [`RetryLayer`].
pub type HttpRetryLayer = ClientRetryLayer<RetryLayer>;

/// The hedge of an [`HttpClientStack`]: a [`BufferBodyLayer`] (so request
/// bodies can be replayed) over a [`HedgeLayer`].
pub type HttpHedgeLayer<C> = ClientHedgeLayer<C>;

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
