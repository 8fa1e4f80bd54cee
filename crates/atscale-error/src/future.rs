//! Future types

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use atscale_core::BoxError;
use http::Response;
use pin_project_lite::pin_project;

use crate::body::ResponseBody;
use crate::config::Config;
use crate::error::{Enriched, Panicked, RequestMeta, Side};
use crate::{grpc, log, metrics, problem};

pin_project! {
    /// Response future of a server-mode [`ErrorEnrich`](crate::ErrorEnrich):
    /// the inner response, or the error (or panic) answered as a response.
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
        // Inline: boxing it cost a `malloc` and a `free` per request to save
        // the moves of ~200 bytes (benches/README.md, ErrorEnrich).
        meta: Option<RequestMeta>,
        config: Arc<Config>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F> {
        Running { #[pin] future: F },
        Failed { error: Option<BoxError> },
        Done,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn failed(error: BoxError, meta: RequestMeta, config: Arc<Config>) -> Self {
        ResponseFuture {
            state: State::Failed { error: Some(error) },
            meta: Some(meta),
            config,
        }
    }

    /// A future for `meta` still without its inner future: [`start`] or
    /// [`fail`] gives it one before it is returned (`Done` until then).
    ///
    /// [`start`]: Self::start
    /// [`fail`]: Self::fail
    #[inline(always)]
    pub(crate) fn unstarted(meta: RequestMeta, config: Arc<Config>) -> Self {
        ResponseFuture {
            state: State::Done,
            meta: Some(meta),
            config,
        }
    }

    /// Runs `future` (not yet pinned: the future is still being built).
    #[inline(always)]
    pub(crate) fn start(&mut self, future: F) {
        self.state = State::Running { future };
    }

    /// Answers `error` instead.
    pub(crate) fn fail(&mut self, error: BoxError) {
        self.state = State::Failed { error: Some(error) };
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<B>>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = metrics::enter(this.meta.as_ref());
        let error: BoxError = match this.state.as_mut().project() {
            StateProj::Running { future } => {
                match catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(Ok(res))) => {
                        this.state.set(State::Done);
                        let tail = metrics::answered_ok(this.meta.as_ref(), &res);
                        return Poll::Ready(Ok(res.map(|b| ResponseBody::observed(b, tail))));
                    }
                    Ok(Poll::Ready(Err(err))) => err.into(),
                    Err(payload) => Box::new(Panicked::from_payload(payload)),
                }
            }
            StateProj::Failed { error } => error.take().expect("polled after completion"),
            StateProj::Done => panic!("`ResponseFuture` polled after completion"),
        };
        // Drops the inner future (even one that panicked) before answering.
        this.state.set(State::Done);
        let meta = this.meta.take().expect("taken only once, here");
        let enriched = Enriched::new(this.config, Side::Server, meta, error);
        log::record(&enriched);
        let mut res = if enriched.is_grpc() {
            grpc::response(&enriched, this.config.internal_details)
        } else {
            problem::response(&enriched, this.config.internal_details)
        };
        res.extensions_mut().insert(enriched.kind());
        res.extensions_mut().insert(enriched.id());
        metrics::answered_err(&enriched, &res);
        Poll::Ready(Ok(res))
    }
}

pin_project! {
    /// Response future of a client-mode [`ErrorEnrich`](crate::ErrorEnrich):
    /// the inner response, or the inner error as [`Enriched`].
    #[must_use = "futures do nothing unless polled"]
    pub struct ClientResponseFuture<F> {
        #[pin]
        state: ClientState<F>,
        meta: Option<RequestMeta>,
        config: Arc<Config>,
    }
}

pin_project! {
    #[project = ClientStateProj]
    #[derive(Debug)]
    enum ClientState<F> {
        Running { #[pin] future: F },
        Failed { error: Option<BoxError> },
    }
}

impl<F> ClientResponseFuture<F> {
    pub(crate) fn running(future: F, meta: RequestMeta, config: Arc<Config>) -> Self {
        ClientResponseFuture {
            state: ClientState::Running { future },
            meta: Some(meta),
            config,
        }
    }

    pub(crate) fn failed(error: BoxError, meta: RequestMeta, config: Arc<Config>) -> Self {
        ClientResponseFuture {
            state: ClientState::Failed { error: Some(error) },
            meta: Some(meta),
            config,
        }
    }
}

impl<F> std::fmt::Debug for ClientResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientResponseFuture")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

impl<F, T, E> Future for ClientResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, Enriched>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = metrics::enter(this.meta.as_ref());
        let error: BoxError = match this.state.project() {
            ClientStateProj::Running { future } => match ready!(future.poll(cx)) {
                Ok(res) => return Poll::Ready(Ok(res)),
                Err(err) => err.into(),
            },
            ClientStateProj::Failed { error } => error
                .take()
                .expect("`ClientResponseFuture` polled after completion"),
        };
        let meta = this
            .meta
            .take()
            .expect("`ClientResponseFuture` polled after completion");
        let enriched = Enriched::new(this.config, Side::Client, meta, error);
        log::record(&enriched);
        metrics::errored(&enriched);
        Poll::Ready(Err(enriched))
    }
}

#[cfg(feature = "axum")]
pub use axum_mode::AxumResponseFuture;

#[cfg(feature = "axum")]
mod axum_mode {
    use std::convert::Infallible;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, ready};

    use atscale_core::BoxError;
    use bytes::Bytes;
    use http::Response;
    use pin_project_lite::pin_project;

    use super::ResponseFuture;

    pin_project! {
        /// Response future of an [`Axum`](crate::mode::Axum)-mode
        /// [`ErrorEnrich`](crate::ErrorEnrich): as [`ResponseFuture`], with
        /// axum's `Body`.
        #[must_use = "futures do nothing unless polled"]
        #[derive(Debug)]
        pub struct AxumResponseFuture<F> {
            #[pin]
            inner: ResponseFuture<F>,
        }
    }

    impl<F> AxumResponseFuture<F> {
        pub(crate) fn new(inner: ResponseFuture<F>) -> Self {
            AxumResponseFuture { inner }
        }
    }

    impl<F, B, E> Future for AxumResponseFuture<F>
    where
        F: Future<Output = Result<Response<B>, E>>,
        E: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        type Output = Result<Response<axum::body::Body>, Infallible>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let res = ready!(self.project().inner.poll(cx));
            Poll::Ready(res.map(|res| res.map(crate::body::ResponseBody::into_axum)))
        }
    }
}
