//! A per-method client stack from a service config: each gRPC method gets
//! its own deadline and its retry or hedging policy.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Duration;

use atscale_core::{BoxError, Carrier, Context, Kind, Origin, Preemptable, RetryThrottle};
use atscale_hedge::{Budget, Classify, Delay, HedgeLayer, ReplayBody, Verdict};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::code::CodeSet;
use crate::config::{MethodPolicy, ServiceConfig};
use crate::layer::RetryLayer;
use crate::outcome::{Failure, RetryResponse};

/// The hedge's verdict for a gRPC method's `nonFatalStatusCodes` (A6): a
/// success (or a committed response) is good; a failure with one of the
/// codes, or one that never reached the server, is non-fatal (the other
/// copies may still succeed); any other failure is fatal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NonFatalCodes(pub CodeSet);

impl<B> Classify<http::Response<B>, BoxError> for NonFatalCodes {
    fn classify(&self, outcome: Result<&http::Response<B>, &BoxError>) -> Verdict {
        let failure = match outcome {
            Ok(res) => res.failure(),
            Err(e) => Some(Failure::of_error(&**e)),
        };
        match failure {
            None => Verdict::Good,
            Some(f) if f.kind() == Some(Kind::Unreachable) => Verdict::NonFatal,
            Some(f) if f.code().is_some_and(|c| self.0.contains(c)) => Verdict::NonFatal,
            Some(_) => Verdict::Fatal,
        }
    }
}

/// What one `methodConfig` entry turns into.
#[derive(Clone, Debug)]
enum Route {
    Plain,
    Retry(RetryLayer),
    Hedge(HedgeLayer<NonFatalCodes>),
}

#[derive(Debug)]
struct Routes {
    config: ServiceConfig,
    /// One per `methodConfig` entry, in the config's order.
    routes: Vec<(Option<Duration>, Route)>,
}

/// Gives each call the deadline and the retry or hedging policy of its
/// method, from a gRPC [`ServiceConfig`]: a call to `/pkg.Service/Method`
/// gets the `timeout` and the `retryPolicy` or `hedgingPolicy` of the most
/// specific `methodConfig` entry naming it, and every retry and hedge of the
/// channel consults one [`RetryThrottle`] built from `retryThrottling`.
///
/// Build one layer per channel (per backend): it holds the throttle, and
/// each hedging entry's [counters](atscale_hedge::HedgeStats).
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use atscale_core::BoxError;
/// use atscale_retry::{MethodConfigLayer, ServiceConfig};
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), BoxError> {
/// let config: ServiceConfig = r#"{"methodConfig": [{
///     "name": [{"service": "pkg.Orders", "method": "Get"}],
///     "timeout": "0.2s"
/// }]}"#
/// .parse()?;
/// let slow = service_fn(|_req: http::Request<String>| async {
///     tokio::time::sleep(Duration::from_secs(1)).await;
///     Ok::<_, BoxError>(http::Response::new(String::new()))
/// });
/// let client = ServiceBuilder::new()
///     .layer(MethodConfigLayer::new(config))
///     .service(slow);
///
/// let req = http::Request::post("http://orders/pkg.Orders/Get").body(String::new())?;
/// let err = client.oneshot(req).await.unwrap_err();
/// assert_eq!(err.to_string(), "deadline exceeded after 200ms (budget 200ms, local)");
/// # Ok(())
/// # }
/// ```
///
/// For a tonic client, read streaming bodies into memory first (a retry or
/// a hedge replays them) and give the channel its body type back:
/// `BufferBodyLayer` → `MethodConfigLayer` → `map_request(|r| r.map(Body::new))`
/// → `Channel` (the top-level `tests/retry_tonic.rs` does exactly this).
#[derive(Clone, Debug)]
pub struct MethodConfigLayer {
    routes: Arc<Routes>,
    throttle: Option<RetryThrottle>,
}

impl MethodConfigLayer {
    /// The layer for `config`, with a new throttle if it has `retryThrottling`.
    pub fn new(config: ServiceConfig) -> Self {
        let throttle = config.throttling().map(|t| t.throttle());
        let routes = config
            .configs()
            .iter()
            .map(|mc| {
                let route = match mc.policy() {
                    None => Route::Plain,
                    Some(MethodPolicy::Retry(policy)) => {
                        let layer = RetryLayer::new(policy.clone());
                        Route::Retry(match &throttle {
                            Some(t) => layer.throttle(t.clone()),
                            None => layer,
                        })
                    }
                    Some(MethodPolicy::Hedge(h)) => {
                        let builder = HedgeLayer::builder()
                            .delay(Delay::fixed(h.delay()))
                            .max_attempts(h.max_attempts())
                            .budget(Budget::unlimited()) // A6 hedges are bounded by the throttle
                            .non_idempotent(true) // the service owner chose to hedge these methods
                            .classify(NonFatalCodes(h.non_fatal_codes()));
                        let builder = match &throttle {
                            Some(t) => builder.throttle(t.clone()),
                            None => builder,
                        };
                        Route::Hedge(builder.build().expect("validated when parsed"))
                    }
                };
                (mc.timeout(), route)
            })
            .collect();
        MethodConfigLayer {
            routes: Arc::new(Routes { config, routes }),
            throttle,
        }
    }

    /// The throttle every retry and hedge of this layer consults, if the
    /// config has `retryThrottling`.
    pub fn throttle(&self) -> Option<&RetryThrottle> {
        self.throttle.as_ref()
    }

    /// The service config.
    pub fn config(&self) -> &ServiceConfig {
        &self.routes.config
    }
}

impl<S> Layer<S> for MethodConfigLayer {
    type Service = PerMethod<S>;

    fn layer(&self, inner: S) -> PerMethod<S> {
        PerMethod {
            inner: IntoBox { inner },
            routes: Arc::clone(&self.routes),
        }
    }
}

/// The per-method client stack [`MethodConfigLayer`] builds.
///
/// # Backpressure
///
/// `poll_ready` delegates to the inner service; the first attempt of each
/// call is sent on that readiness, retries and hedges drive clones.
///
/// # Errors
///
/// A call past its method's `timeout` fails with
/// [`DeadlineExceeded`](atscale_core::DeadlineExceeded) (local origin); a
/// cancelled one with [`Cancelled`](atscale_core::Cancelled); otherwise the
/// errors of [`Retry`](crate::Retry) or [`Hedge`](atscale_hedge::Hedge), or
/// the inner service's, boxed.
#[derive(Clone, Debug)]
pub struct PerMethod<S> {
    inner: IntoBox<S>,
    routes: Arc<Routes>,
}

impl<S> PerMethod<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner.inner
    }

    /// Consumes this service, returning the inner one.
    pub fn into_inner(self) -> S {
        self.inner.inner
    }
}

impl<S, B, ResB> Service<http::Request<B>> for PerMethod<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    B: ReplayBody,
{
    type Response = http::Response<ResB>;
    type Error = BoxError;
    type Future = PerMethodFuture<S, http::Request<B>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The service that was driven ready takes this call; a clone waits
        // for the next.
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        let index = self.routes.config.index(req.uri().path());
        let (timeout, route) = match index {
            Some(i) => {
                let (t, r) = &self.routes.routes[i];
                (*t, r)
            }
            None => (None, &Route::Plain),
        };
        let deadline = timeout.map(|t| {
            let parent = match req.context() {
                Some(cx) => cx.clone(),
                None => Context::current().unwrap_or_default(),
            };
            let cx = parent.with_budget(t, Origin::Local);
            req.set_context(cx.clone());
            cx
        });
        let fut = match route {
            Route::Plain => RouteFuture::Plain {
                fut: ready.oneshot_ready(req),
            },
            Route::Retry(layer) => RouteFuture::Retry {
                fut: layer.layer(ready).call(req),
            },
            Route::Hedge(layer) => RouteFuture::Hedge {
                fut: layer.layer(ready).call(req),
            },
        };
        PerMethodFuture {
            inner: match deadline {
                Some(cx) => Timed::Deadline { fut: cx.run(fut) },
                None => Timed::Bare { fut },
            },
        }
    }
}

/// The inner service with its error boxed (the hedge's verdict reads a
/// `BoxError`).
#[derive(Clone, Debug)]
struct IntoBox<S> {
    inner: S,
}

impl<S> IntoBox<S> {
    /// Calls the service, already driven ready.
    fn oneshot_ready<R>(mut self, req: R) -> IntoBoxFuture<S::Future>
    where
        S: Service<R>,
    {
        IntoBoxFuture {
            fut: self.inner.call(req),
        }
    }
}

impl<S, R> Service<R> for IntoBox<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = IntoBoxFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: R) -> Self::Future {
        IntoBoxFuture {
            fut: self.inner.call(req),
        }
    }
}

pin_project! {
    struct IntoBoxFuture<F> {
        #[pin]
        fut: F,
    }
}

impl<F, T, E> Future for IntoBoxFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        self.project().fut.poll(cx).map_err(Into::into)
    }
}

pin_project! {
    #[project = RouteProj]
    enum RouteFuture<S, R>
    where
        S: Service<R>,
        S::Error: Into<BoxError>,
    {
        Plain { #[pin] fut: IntoBoxFuture<S::Future> },
        Retry { #[pin] fut: crate::future::ResponseFuture<IntoBox<S>, R> },
        Hedge { #[pin] fut: atscale_hedge::future::ResponseFuture<IntoBox<S>, R, NonFatalCodes> },
    }
}

impl<S, B, ResB> Future for RouteFuture<S, http::Request<B>>
where
    S: Service<http::Request<B>, Response = http::Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    B: ReplayBody,
{
    type Output = Result<http::Response<ResB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        match self.project() {
            RouteProj::Plain { fut } => fut.poll(cx),
            RouteProj::Retry { fut } => fut.poll(cx),
            RouteProj::Hedge { fut } => fut.poll(cx),
        }
    }
}

pin_project! {
    #[project = TimedProj]
    enum Timed<S, R>
    where
        S: Service<R>,
        S::Error: Into<BoxError>,
    {
        Bare { #[pin] fut: RouteFuture<S, R> },
        Deadline { #[pin] fut: Preemptable<RouteFuture<S, R>> },
    }
}

pin_project! {
    /// Response future of [`PerMethod`].
    #[must_use = "futures do nothing unless polled"]
    pub struct PerMethodFuture<S, R>
    where
        S: Service<R>,
        S::Error: Into<BoxError>,
    {
        #[pin]
        inner: Timed<S, R>,
    }
}

impl<S, R> std::fmt::Debug for PerMethodFuture<S, R>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerMethodFuture").finish_non_exhaustive()
    }
}

impl<S, B, ResB> Future for PerMethodFuture<S, http::Request<B>>
where
    S: Service<http::Request<B>, Response = http::Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    B: ReplayBody,
{
    type Output = Result<http::Response<ResB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        match self.project().inner.project() {
            TimedProj::Bare { fut } => fut.poll(cx),
            TimedProj::Deadline { fut } => match ready!(fut.poll(cx)) {
                Ok(out) => Poll::Ready(out),
                Err(interrupted) => Poll::Ready(Err(interrupted.into())),
            },
        }
    }
}
