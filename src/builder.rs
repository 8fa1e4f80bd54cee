//! [`ServiceBuilderExt`]: the atscale layers as `ServiceBuilder` methods.

#[cfg(any(
    feature = "deadline",
    feature = "error",
    feature = "hedge",
    feature = "heartbeat",
    feature = "overload",
    feature = "ratelimit",
    feature = "retry"
))]
use tower_layer::Stack;

use tower::ServiceBuilder;

#[cfg(feature = "deadline")]
use atscale_deadline::DeadlineLayer;
#[cfg(feature = "error")]
use atscale_error::ErrorEnrichLayer;
#[cfg(feature = "heartbeat")]
use atscale_heartbeat::{HeartbeatLayer, Monitor};
#[cfg(feature = "hedge")]
use atscale_hedge::{BufferBodyLayer, HedgeLayer};
#[cfg(feature = "overload")]
use atscale_overload::OverloadLayer;
#[cfg(feature = "overload")]
use atscale_overload::throttle::ThrottleLayer;
#[cfg(feature = "ratelimit")]
use atscale_ratelimit::{RateLimitLayer, Store};
#[cfg(feature = "retry")]
use atscale_retry::RetryLayer;

mod sealed {
    pub trait Sealed<L> {}
    impl<L> Sealed<L> for tower::ServiceBuilder<L> {}
}

/// The atscale layers as methods of [`tower::ServiceBuilder`], in the spirit
/// of tower-http's `ServiceBuilderExt`, each behind the feature of its layer.
///
/// A `ServiceBuilder` lists layers outermost first, so a stack reads in the
/// order a request goes through it:
///
/// ```
/// use std::time::Duration;
/// use atscale::ServiceBuilderExt;
/// use atscale::prelude::*;
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let monitor = Monitor::new();
/// let per_second = Limiter::new(Limit::per_second(100)?);
/// let svc = ServiceBuilder::new()
///     .enrich_errors(ErrorEnrichLayer::new("orders"))
///     .deadline(DeadlineLayer::server(Duration::from_secs(2)))
///     .heartbeat(&monitor)
///     .multi_rate_limit(RateLimitLayer::reject(per_second))
///     .service(service_fn(|_req: http::Request<String>| async {
///         Ok::<_, BoxError>(http::Response::new(String::from("ok")))
///     }));
///
/// let res = svc.oneshot(http::Request::new(String::new())).await?; // never fails: Infallible
/// assert_eq!(res.status(), 200);
/// assert_eq!(monitor.counts().started(), 1);
/// # Ok(())
/// # }
/// ```
///
/// # Order
///
/// The methods add layers in the order they are called, like
/// `ServiceBuilder::layer`; they do not reorder anything. The recommended
/// orders (and what goes wrong otherwise) are in the [`stack`](crate::stack)
/// module, whose [`ServerStack`](crate::stack::ServerStack) and
/// [`ClientStack`](crate::stack::ClientStack) fix them for you. In short:
///
/// - server: `enrich_errors` → `deadline` → `overload` → `heartbeat` →
///   `multi_rate_limit` → handler;
/// - client: `enrich_errors` → `deadline` → `multi_rate_limit` → `buffer_body` →
///   `retries` → `hedge` → `heartbeat` → `adaptive_throttle` → the errors
///   mapping ([`GrpcErrorsLayer`](crate::remote::GrpcErrorsLayer),
///   [`HttpErrorsLayer`](crate::remote::HttpErrorsLayer)) → transport.
///
/// This trait is sealed: it is implemented for `ServiceBuilder` only.
pub trait ServiceBuilderExt<L>: sealed::Sealed<L> + Sized {
    /// Adds [`ErrorEnrichLayer`]: outermost, so that it sees every error.
    /// A server-mode layer ([`ErrorEnrichLayer::new`]) makes the stack's
    /// error type `Infallible`.
    #[cfg(feature = "error")]
    #[cfg_attr(docsrs, doc(cfg(feature = "error")))]
    fn enrich_errors<M>(
        self,
        layer: ErrorEnrichLayer<M>,
    ) -> ServiceBuilder<Stack<ErrorEnrichLayer<M>, L>>;

    /// Adds [`DeadlineLayer`]: inside ErrorEnrich, outside everything else,
    /// so every inner layer and the handler see the request's context.
    #[cfg(feature = "deadline")]
    #[cfg_attr(docsrs, doc(cfg(feature = "deadline")))]
    fn deadline(self, layer: DeadlineLayer) -> ServiceBuilder<Stack<DeadlineLayer, L>>;

    /// Adds [`RateLimitLayer`]: inside the deadline (so a wait that cannot
    /// end before the deadline fails at once with the retry-after) and, on a
    /// client, outside the hedge (so a hedge does not spend a second token).
    ///
    /// Named `multi_rate_limit` because `ServiceBuilder` has an inherent
    /// `rate_limit(num, per)` (tower's single-limit layer, with tower's
    /// `limit` feature), which a trait method of the same name could never
    /// be called over.
    #[cfg(feature = "ratelimit")]
    #[cfg_attr(docsrs, doc(cfg(feature = "ratelimit")))]
    fn multi_rate_limit<K, W, St: Store>(
        self,
        layer: RateLimitLayer<K, W, St>,
    ) -> ServiceBuilder<Stack<RateLimitLayer<K, W, St>, L>>;

    /// Adds [`BufferBodyLayer`], which reads streaming request bodies (a
    /// tonic request's) into memory up to a limit so that a hedge can replay
    /// them; put it right outside [`hedge`](Self::hedge).
    #[cfg(feature = "hedge")]
    #[cfg_attr(docsrs, doc(cfg(feature = "hedge")))]
    fn buffer_body(self, layer: BufferBodyLayer) -> ServiceBuilder<Stack<BufferBodyLayer, L>>;

    /// Adds [`HedgeLayer`]: inside the deadline (one deadline covers every
    /// attempt) and the rate limit, outside the per-attempt layers
    /// (heartbeat, transport).
    #[cfg(feature = "hedge")]
    #[cfg_attr(docsrs, doc(cfg(feature = "hedge")))]
    fn hedge<C>(self, layer: HedgeLayer<C>) -> ServiceBuilder<Stack<HedgeLayer<C>, L>>;

    /// Adds a [`HeartbeatLayer`] reporting to `monitor`: on a server inside
    /// the deadline and outside the rate limit, on a client closest to the
    /// transport.
    #[cfg(feature = "heartbeat")]
    #[cfg_attr(docsrs, doc(cfg(feature = "heartbeat")))]
    fn heartbeat(self, monitor: &Monitor) -> ServiceBuilder<Stack<HeartbeatLayer, L>>;

    /// Adds [`OverloadLayer`] (adaptive concurrency limit, CoDel /
    /// adaptive-LIFO admission queue, deadline-aware admission): on a server
    /// inside the deadline (admission reads the request's deadline, and the
    /// deadline layer frees the slot of a request that runs out of time) and
    /// outside the heartbeat and the rate limit (only admitted work is
    /// watched or charged).
    #[cfg(feature = "overload")]
    #[cfg_attr(docsrs, doc(cfg(feature = "overload")))]
    fn overload(self, layer: OverloadLayer) -> ServiceBuilder<Stack<OverloadLayer, L>>;

    /// Adds [`RetryLayer`] (gRFC A6 retries): on a client inside the
    /// deadline (one deadline covers every attempt and backoff) and the rate
    /// limit (a retry does not spend a second token), right inside
    /// [`buffer_body`](Self::buffer_body) (retries replay the buffered body),
    /// outside the per-attempt layers (heartbeat, transport). In place of a
    /// hedge, or beside one on the same `RetryThrottle`.
    ///
    /// Named `retries` because `ServiceBuilder` has an inherent `retry(policy)`
    /// (tower's `Retry`, with tower's `retry` feature), which a trait method
    /// of the same name could never be called over.
    ///
    /// ```
    /// use std::time::Duration;
    /// use atscale::prelude::*;
    /// use tower::{ServiceBuilder, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), BoxError> {
    /// let policy = RetryPolicy::builder().max_attempts(3).build()?;
    /// let client = ServiceBuilder::new()
    ///     .deadline(DeadlineLayer::client(Duration::from_secs(1)))
    ///     .retries(RetryLayer::new(policy).throttle(RetryThrottle::new(10, 0.1)?))
    ///     .service(service_fn(|_req: http::Request<String>| async {
    ///         Ok::<_, BoxError>(http::Response::new(String::from("ok")))
    ///     }));
    /// let res = client.oneshot(http::Request::new(String::new())).await?;
    /// assert_eq!(res.body(), "ok");
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "retry")]
    #[cfg_attr(docsrs, doc(cfg(feature = "retry")))]
    fn retries(self, layer: RetryLayer) -> ServiceBuilder<Stack<RetryLayer, L>>;

    /// Adds the client-side adaptive throttle ([`ThrottleLayer`], Google SRE
    /// book): on a client closest to one backend's transport (inside
    /// `retries`, `hedge` and `heartbeat`, so every attempt is counted and a
    /// throttled one never reaches the wire), one layer per backend. Its
    /// local refusals are never retried.
    ///
    /// ```
    /// use std::time::Duration;
    /// use atscale::prelude::*;
    /// use tower::{ServiceBuilder, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), BoxError> {
    /// let throttle = ThrottleLayer::new(); // K = 2 over 2 minutes
    /// let client = ServiceBuilder::new()
    ///     .deadline(DeadlineLayer::client(Duration::from_secs(1)))
    ///     .adaptive_throttle(throttle.clone())
    ///     .service(service_fn(|_req: http::Request<String>| async {
    ///         Ok::<_, BoxError>(http::Response::new(String::from("ok")))
    ///     }));
    /// client.oneshot(http::Request::new(String::new())).await?;
    /// assert_eq!(throttle.counts(), (1, 1)); // one request, accepted
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "overload")]
    #[cfg_attr(docsrs, doc(cfg(feature = "overload")))]
    fn adaptive_throttle(self, layer: ThrottleLayer) -> ServiceBuilder<Stack<ThrottleLayer, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    #[cfg(feature = "error")]
    fn enrich_errors<M>(
        self,
        layer: ErrorEnrichLayer<M>,
    ) -> ServiceBuilder<Stack<ErrorEnrichLayer<M>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "deadline")]
    fn deadline(self, layer: DeadlineLayer) -> ServiceBuilder<Stack<DeadlineLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "ratelimit")]
    fn multi_rate_limit<K, W, St: Store>(
        self,
        layer: RateLimitLayer<K, W, St>,
    ) -> ServiceBuilder<Stack<RateLimitLayer<K, W, St>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "hedge")]
    fn buffer_body(self, layer: BufferBodyLayer) -> ServiceBuilder<Stack<BufferBodyLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "hedge")]
    fn hedge<C>(self, layer: HedgeLayer<C>) -> ServiceBuilder<Stack<HedgeLayer<C>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "heartbeat")]
    fn heartbeat(self, monitor: &Monitor) -> ServiceBuilder<Stack<HeartbeatLayer, L>> {
        self.layer(monitor.layer())
    }

    #[cfg(feature = "overload")]
    fn overload(self, layer: OverloadLayer) -> ServiceBuilder<Stack<OverloadLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "retry")]
    fn retries(self, layer: RetryLayer) -> ServiceBuilder<Stack<RetryLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "overload")]
    fn adaptive_throttle(self, layer: ThrottleLayer) -> ServiceBuilder<Stack<ThrottleLayer, L>> {
        self.layer(layer)
    }
}
