//! Keep-alive for long-lived streams: a body that speaks up when it has been quiet.
//!
//! Proxies and load balancers cut connections that carry nothing for a while
//! (often 60 s). A [`KeepAliveBody`] injects a caller-supplied frame — an SSE
//! comment line `":\n\n"`, or an application keep-alive message — each time
//! the wrapped body has produced nothing for an interval. [`KeepAliveLayer`]
//! wraps every response body of an HTTP service this way.
//!
//! # Ordering
//!
//! Put the keep-alive layer *outside* a [`HeartbeatLayer`](crate::HeartbeatLayer)
//! (listed before it in a `ServiceBuilder`): then the injected frames are not
//! progress, and a stream whose producer went quiet is still cut by the
//! stall watchdog. Inside it, keep-alive frames would keep a stalled stream
//! alive forever.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_layer::Layer;
use tower_service::Service;

pin_project! {
    /// A body that yields `frame` whenever the inner body has been quiet for
    /// `interval`; see the [module docs](self).
    ///
    /// The quiet time counts from the body's creation and from each frame the
    /// inner body (or the keep-alive itself) produces. The body ends, or
    /// fails, when the inner body does.
    #[derive(Debug)]
    pub struct KeepAliveBody<B> {
        #[pin]
        inner: B,
        #[pin]
        timer: Sleep,
        interval: Duration,
        frame: Bytes,
    }
}

impl<B> KeepAliveBody<B> {
    /// Wraps `inner`, sending `frame` after each `interval` of quiet.
    ///
    /// # Panics
    ///
    /// If `interval` is zero: the body would never yield to its inner body.
    pub fn new(inner: B, interval: Duration, frame: Bytes) -> Self {
        assert!(
            !interval.is_zero(),
            "a keep-alive interval must not be zero"
        );
        KeepAliveBody {
            inner,
            timer: tokio::time::sleep(interval),
            interval,
            frame,
        }
    }

    /// The inner body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// The inner body, mutably.
    pub fn get_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    /// The inner body, dropping the keep-alive.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B> Body for KeepAliveBody<B>
where
    B: Body,
    B::Data: From<Bytes>,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.timer.as_mut().reset(Instant::now() + *this.interval);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => Poll::Ready(other),
            Poll::Pending => {
                ready!(this.timer.as_mut().poll(cx));
                this.timer.as_mut().reset(Instant::now() + *this.interval);
                Poll::Ready(Some(Ok(Frame::data(this.frame.clone().into()))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // Injected frames make the length unknowable.
        let mut hint = SizeHint::new();
        hint.set_lower(self.inner.size_hint().lower());
        hint
    }
}

/// Wraps every response body of an HTTP service in a [`KeepAliveBody`].
#[derive(Clone, Debug)]
pub struct KeepAliveLayer {
    interval: Duration,
    frame: Bytes,
}

impl KeepAliveLayer {
    /// Sends `frame` after each `interval` of quiet on every response body.
    ///
    /// # Panics
    ///
    /// If `interval` is zero.
    pub fn new(interval: Duration, frame: impl Into<Bytes>) -> Self {
        assert!(
            !interval.is_zero(),
            "a keep-alive interval must not be zero"
        );
        KeepAliveLayer {
            interval,
            frame: frame.into(),
        }
    }

    /// The preset for server-sent events: an SSE comment line (`":\n\n"`),
    /// which every SSE client ignores, after each `interval` of quiet.
    ///
    /// # Panics
    ///
    /// If `interval` is zero.
    pub fn sse(interval: Duration) -> Self {
        KeepAliveLayer::new(interval, Bytes::from_static(b":\n\n"))
    }
}

impl<S> Layer<S> for KeepAliveLayer {
    type Service = KeepAlive<S>;

    fn layer(&self, inner: S) -> KeepAlive<S> {
        KeepAlive {
            inner,
            interval: self.interval,
            frame: self.frame.clone(),
        }
    }
}

/// An HTTP service whose response bodies send a keep-alive frame when quiet;
/// from [`KeepAliveLayer`].
///
/// # Backpressure
///
/// `poll_ready` delegates to the inner service.
///
/// # Errors
///
/// None of its own: the inner service's errors pass through unchanged.
#[derive(Clone, Debug)]
pub struct KeepAlive<S> {
    inner: S,
    interval: Duration,
    frame: Bytes,
}

impl<S> KeepAlive<S> {
    atscale_core::inner_accessors!();
}

impl<S, Req, B> Service<Req> for KeepAlive<S>
where
    S: Service<Req, Response = http::Response<B>>,
    B: Body,
    B::Data: From<Bytes>,
{
    type Response = http::Response<KeepAliveBody<B>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(req),
            interval: self.interval,
            frame: Some(self.frame.clone()),
        }
    }
}

pin_project! {
    /// Response future of [`KeepAlive`].
    #[derive(Debug)]
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        interval: Duration,
        frame: Option<Bytes>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<KeepAliveBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let frame = this
            .frame
            .take()
            .expect("keep-alive response future polled after completion");
        let interval = *this.interval;
        Poll::Ready(Ok(
            response.map(|body| KeepAliveBody::new(body, interval, frame))
        ))
    }
}
