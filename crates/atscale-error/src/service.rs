use std::convert::Infallible;
use std::fmt;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::task::{Context, Poll};

use atscale_core::BoxError;
use http::{Request, Response};
use tower_service::Service;

use crate::body::ResponseBody;
use crate::config::Config;
use crate::error::{Enriched, Panicked, RequestMeta, Side};
use crate::future::{ClientResponseFuture, ResponseFuture};
use crate::metrics;
use crate::mode::{Client, Server};

/// Enriches every error of the inner service; made by [`ErrorEnrichLayer`](crate::ErrorEnrichLayer).
///
/// In [`Server`] mode it answers each error (and each panic) with a
/// problem+json or gRPC response and never fails; in [`Client`] mode it
/// fails with [`Enriched`].
///
/// # Backpressure
///
/// `poll_ready` delegates to the inner service. Should the inner service
/// fail (or panic) while getting ready, the error is kept and `poll_ready`
/// returns `Ready(Ok(()))`: the next `call` answers with that error, enriched,
/// without calling the inner service.
pub struct ErrorEnrich<S, M = Server> {
    inner: S,
    config: Arc<Config>,
    not_ready: Option<BoxError>,
    _mode: PhantomData<fn() -> M>,
}

impl<S, M> ErrorEnrich<S, M> {
    pub(crate) fn from_config(inner: S, config: Arc<Config>) -> Self {
        ErrorEnrich {
            inner,
            config,
            not_ready: None,
            _mode: PhantomData,
        }
    }

    atscale_core::inner_accessors!();
}

impl<S: Clone, M> Clone for ErrorEnrich<S, M> {
    /// A clone shares the configuration; a readiness error kept by `self`
    /// stays with `self`.
    fn clone(&self) -> Self {
        ErrorEnrich::from_config(self.inner.clone(), self.config.clone())
    }
}

impl<S: fmt::Debug, M> fmt::Debug for ErrorEnrich<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ErrorEnrich")
            .field("inner", &self.inner)
            .field("mode", &std::any::type_name::<M>())
            .field("service", &self.config.service)
            .finish()
    }
}

impl<S, M> ErrorEnrich<S, M> {
    /// `poll_ready` of the serving modes ([`Server`], `Axum`).
    fn poll_ready_serving<R>(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>>
    where
        S: Service<R>,
        S::Error: Into<BoxError>,
    {
        if self.not_ready.is_some() {
            return Poll::Ready(Ok(()));
        }
        match catch_unwind(AssertUnwindSafe(|| self.inner.poll_ready(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
            Ok(Poll::Ready(Err(err))) => {
                self.not_ready = Some(err.into());
                Poll::Ready(Ok(()))
            }
            Err(payload) => {
                self.not_ready = Some(Box::new(Panicked::from_payload(payload)));
                Poll::Ready(Ok(()))
            }
        }
    }

    /// `call` of the serving modes.
    fn serve<ReqB>(&mut self, req: Request<ReqB>) -> ResponseFuture<S::Future>
    where
        S: Service<Request<ReqB>>,
    {
        let meta = RequestMeta::of(&req, Side::Server);
        let config = self.config.clone();
        if let Some(err) = self.not_ready.take() {
            return ResponseFuture::failed(err, meta, config);
        }
        let _entered = metrics::enter(Some(&meta));
        // The inner future is written into the response future's place
        // from inside the closure, not returned through `catch_unwind`,
        // whose result is copied out of it and then into the response
        // future (per gRPC request in benches/stack.rs `micro grpc`, 11
        // copies of futures on the way in instead of 15).
        let mut future = ResponseFuture::unstarted(meta, config);
        let inner = &mut self.inner;
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| future.start(inner.call(req)))) {
            future.fail(Box::new(Panicked::from_payload(payload)));
        }
        future
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for ErrorEnrich<S, Server>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.poll_ready_serving::<Request<ReqB>>(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        self.serve(req)
    }
}

/// As in [`Server`] mode, with axum's `Body`: an inner response whose body
/// is already one passes as it is.
#[cfg(feature = "axum")]
impl<S, ReqB, ResB> Service<Request<ReqB>> for ErrorEnrich<S, crate::mode::Axum>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<axum::body::Body>;
    type Error = Infallible;
    type Future = crate::future::AxumResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.poll_ready_serving::<Request<ReqB>>(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        crate::future::AxumResponseFuture::new(self.serve(req))
    }
}

impl<S, ReqB> Service<Request<ReqB>> for ErrorEnrich<S, Client>
where
    S: Service<Request<ReqB>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = Enriched;
    type Future = ClientResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Enriched>> {
        if self.not_ready.is_some() {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Ready(Err(err)) => {
                self.not_ready = Some(err.into());
                Poll::Ready(Ok(()))
            }
            other => other.map(|_| Ok(())),
        }
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let meta = RequestMeta::of(&req, Side::Client);
        let config = self.config.clone();
        let _entered = metrics::enter(Some(&meta));
        match self.not_ready.take() {
            Some(err) => ClientResponseFuture::failed(err, meta, config),
            None => ClientResponseFuture::running(self.inner.call(req), meta, config),
        }
    }
}
