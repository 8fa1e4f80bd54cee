//! Deadlines over bodies: the request's deadline enforced over reading the
//! request body and producing the response body, past the response head.
//!
//! [`Deadline`](crate::Deadline) covers a request until its response head.
//! A streaming answer (gRPC server streaming, server-sent events, a chunked
//! download) or a slow upload read after the head escapes it.
//! [`BodyDeadlineLayer`], inside a [`DeadlineLayer`](crate::DeadlineLayer)
//! ([`DeadlineLayer::with_bodies`](crate::DeadlineLayer::with_bodies)),
//! wraps both bodies in a [`DeadlineBody`] that ends them when the
//! request's deadline passes:
//!
//! | body | cut by the deadline |
//! | --- | --- |
//! | gRPC response (`content-type: application/grpc…`) | ends with trailers `grpc-status: 4` (`DEADLINE_EXCEEDED`) and a `grpc-message`, so the client sees a proper status |
//! | any other response (SSE, chunked) | fails with [`DeadlineExceeded`]: the server aborts the stream (HTTP/2 `RST_STREAM`, HTTP/1 closes the connection without the last chunk), so the client cannot take it for complete |
//! | request | fails with [`DeadlineExceeded`]; a handler that answers anyway is answered by the deadline instead |
//!
//! Either way the request's [`Context`] is cancelled (work spawned under it
//! stops) and the inner body is dropped, so a heartbeat inside sees the
//! request end (as it does for a deadline before the head:
//! `Outcome::Cancelled`).
//!
//! The timer is only registered once a body waits for its next frame (a
//! body that is ready at once, like a unary answer, never touches the timer
//! wheel); a request without a deadline, or whose bodies are not covered,
//! gets pass-through bodies.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, ready};

use atscale_core::{BoxError, Context, Deadline as RequestDeadline, DeadlineExceeded, Kind};
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_layer::Layer;
use tower_service::Service;

/// Which requests' bodies a [`BodyDeadlineLayer`] covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bodies {
    /// None: bodies pass through.
    Off,
    /// gRPC requests (`content-type: application/grpc…`) and their responses.
    Grpc,
    /// Every request and response.
    All,
}

/// Enforces the request's deadline over its request and response bodies;
/// see the [module docs](self).
///
/// Goes right inside a [`DeadlineLayer`](crate::DeadlineLayer), whose
/// [`Context`] it reads from the request's extensions:
/// [`DeadlineLayer::with_bodies`](crate::DeadlineLayer::with_bodies) puts it
/// there.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use atscale_core::BoxError;
/// use atscale_deadline::{BodyDeadlineLayer, DeadlineLayer, body::DeadlineBody};
/// use http_body_util::{BodyExt, StreamBody};
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), BoxError> {
/// let svc = ServiceBuilder::new()
///     .layer(DeadlineLayer::server(Duration::from_secs(1)).with_bodies(BodyDeadlineLayer::all()))
///     // The handler reads the request body through a DeadlineBody too.
///     .service(service_fn(|_req: http::Request<DeadlineBody<String>>| async {
///         // A stream that never ends.
///         let events = futures_util::stream::pending::<Result<http_body::Frame<bytes::Bytes>, BoxError>>();
///         Ok::<_, BoxError>(http::Response::new(StreamBody::new(events)))
///     }));
///
/// let res = svc.oneshot(http::Request::new(String::new())).await?;
/// // The head came at once; the body is cut after the request's second.
/// let err = res.into_body().collect().await.unwrap_err();
/// assert_eq!(err.to_string(), "deadline exceeded after 1s (budget 1s, local)");
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug)]
pub struct BodyDeadlineLayer {
    bodies: Bodies,
}

impl BodyDeadlineLayer {
    /// Covers the bodies of every request: streaming HTTP answers (SSE,
    /// downloads) end at the request's deadline too.
    pub const fn all() -> Self {
        BodyDeadlineLayer {
            bodies: Bodies::All,
        }
    }

    /// Covers gRPC requests only (`content-type: application/grpc…`), whose
    /// streams should end with their call's deadline; plain HTTP bodies pass
    /// through.
    pub const fn grpc() -> Self {
        BodyDeadlineLayer {
            bodies: Bodies::Grpc,
        }
    }

    /// Covers nothing: every body passes through.
    pub const fn off() -> Self {
        BodyDeadlineLayer {
            bodies: Bodies::Off,
        }
    }
}

impl<S> Layer<S> for BodyDeadlineLayer {
    type Service = BodyDeadline<S>;

    fn layer(&self, inner: S) -> BodyDeadline<S> {
        BodyDeadline {
            inner,
            bodies: self.bodies,
        }
    }
}

impl BodyDeadlineLayer {
    /// Covers the response bodies only, leaving the request's type as it
    /// is (for stacks whose inner services expect a given request body,
    /// like tonic's `Routes` under typed middleware): see
    /// [`ResponseDeadlineLayer`].
    pub const fn responses_only(self) -> ResponseDeadlineLayer {
        ResponseDeadlineLayer {
            bodies: self.bodies,
        }
    }
}

/// Enforces the request's deadline over its response body only: the
/// response side of [`BodyDeadlineLayer`], made by
/// [`BodyDeadlineLayer::responses_only`].
///
/// The request body keeps its type. Reading it is still bounded: before
/// the response head by the [`Deadline`](crate::Deadline) itself, after it
/// by the response body it feeds (cut at the deadline) and the request's
/// context (cancelled then), which work reading it in the background
/// should run under.
#[derive(Clone, Copy, Debug)]
pub struct ResponseDeadlineLayer {
    bodies: Bodies,
}

impl<S> Layer<S> for ResponseDeadlineLayer {
    type Service = ResponseDeadline<S>;

    fn layer(&self, inner: S) -> ResponseDeadline<S> {
        ResponseDeadline {
            inner,
            bodies: self.bodies,
        }
    }
}

/// Wraps a response body in [`DeadlineBody`]; made by
/// [`ResponseDeadlineLayer`].
///
/// # Backpressure
///
/// `poll_ready` delegates to the inner service.
#[derive(Clone, Debug)]
pub struct ResponseDeadline<S> {
    inner: S,
    bodies: Bodies,
}

impl<S> ResponseDeadline<S> {
    atscale_core::inner_accessors!();
}

impl<S, ReqB, ResB> Service<http::Request<ReqB>> for ResponseDeadline<S>
where
    S: Service<http::Request<ReqB>, Response = http::Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<DeadlineBody<ResB>>;
    type Error = BoxError;
    type Future = BodyDeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        BodyDeadlineFuture {
            cut: Cut::of(self.bodies, &req),
            inner: self.inner.call(req),
        }
    }
}

/// Wraps a request's bodies in [`DeadlineBody`]; made by
/// [`BodyDeadlineLayer`].
///
/// # Backpressure
///
/// `poll_ready` delegates to the inner service.
#[derive(Clone, Debug)]
pub struct BodyDeadline<S> {
    inner: S,
    bodies: Bodies,
}

impl<S> BodyDeadline<S> {
    atscale_core::inner_accessors!();
}

/// The deadline a covered request's bodies are cut at, and the context to
/// cancel then.
#[derive(Clone, Debug)]
struct Cut {
    cx: Context,
    deadline: RequestDeadline,
}

impl Cut {
    /// The cut of `req`'s bodies, if `bodies` covers it and it has a deadline.
    fn of<B>(bodies: Bodies, req: &http::Request<B>) -> Option<Cut> {
        let covered = match bodies {
            Bodies::Off => false,
            Bodies::Grpc => atscale_core::grpc::is_grpc(req.headers()),
            Bodies::All => true,
        };
        if !covered {
            return None;
        }
        let cx = req.extensions().get::<Context>()?;
        Some(Cut {
            deadline: cx.deadline()?,
            cx: cx.clone(),
        })
    }
}

impl<S, ReqB, ResB> Service<http::Request<ReqB>> for BodyDeadline<S>
where
    S: Service<http::Request<DeadlineBody<ReqB>>, Response = http::Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<DeadlineBody<ResB>>;
    type Error = BoxError;
    type Future = BodyDeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        let cut = Cut::of(self.bodies, &req);
        let req = req.map(|body| DeadlineBody::new(body, cut.clone(), false));
        BodyDeadlineFuture {
            inner: self.inner.call(req),
            cut,
        }
    }
}

pin_project! {
    /// The response future of [`BodyDeadline`] and [`ResponseDeadline`].
    #[derive(Debug)]
    pub struct BodyDeadlineFuture<F> {
        #[pin]
        inner: F,
        cut: Option<Cut>,
    }
}

impl<F, ResB, E> Future for BodyDeadlineFuture<F>
where
    F: Future<Output = Result<http::Response<ResB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<http::Response<DeadlineBody<ResB>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = ready!(this.inner.poll(cx)).map_err(Into::into)?;
        let cut = this.cut.take();
        if let Some(c) = &cut
            && c.cx.is_cancelled()
        {
            // The request body was cut by the deadline (which cancelled the
            // context): whatever the handler made of that, the answer is
            // the deadline. The clock is read only then: a context nobody
            // cancelled is not past its cut.
            let now = Instant::now();
            if c.deadline.is_expired_at(now) {
                return Poll::Ready(Err(DeadlineExceeded::at(c.deadline, now).into()));
            }
        }
        let grpc = cut.is_some() && atscale_core::grpc::is_grpc(res.headers());
        Poll::Ready(Ok(res.map(|body| DeadlineBody::new(body, cut, grpc))))
    }
}

pin_project! {
    /// A body cut when its request's deadline passes; see the
    /// [module docs](self). Made by [`BodyDeadline`], for the request body
    /// the inner service reads and the response body it answers.
    ///
    /// A body that is not covered (no deadline, or a request the layer does
    /// not cover) passes every frame through untouched.
    #[derive(Debug)]
    pub struct DeadlineBody<B> {
        #[pin]
        inner: Option<B>,
        // Armed (boxed once) only when the inner body is pending: a body
        // that is ready at once never touches the timer wheel.
        timer: Option<Pin<Box<Sleep>>>,
        cut: Option<Cut>,
        grpc: bool,
    }
}

impl<B> DeadlineBody<B> {
    fn new(inner: B, cut: Option<Cut>, grpc: bool) -> Self {
        DeadlineBody {
            inner: Some(inner),
            timer: None,
            cut,
            grpc,
        }
    }

    /// The inner body, unless the deadline already dropped it.
    pub fn get_ref(&self) -> Option<&B> {
        self.inner.as_ref()
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let mut this = self.project();
        let Some(mut inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        let Some(cut) = this.cut.as_ref() else {
            return inner.poll_frame(cx).map_err(Into::into);
        };
        // An armed timer first: a body that stays ready is cut all the same.
        let expired = this
            .timer
            .as_mut()
            .is_some_and(|timer| timer.as_mut().poll(cx).is_ready());
        if !expired {
            match inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // Not armed (the body never waited): a frame that is not
                    // the last is checked against the clock, so a body that
                    // is always ready is cut too.
                    let unchecked = this.timer.is_some() || inner.is_end_stream();
                    if unchecked || !cut.deadline.is_expired_at(Instant::now()) {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                }
                Poll::Ready(other) => return Poll::Ready(other.map(|r| r.map_err(Into::into))),
                Poll::Pending if this.timer.is_some() => return Poll::Pending,
                Poll::Pending => {
                    let mut timer = Box::pin(tokio::time::sleep_until(cut.deadline.instant()));
                    let fired = timer.as_mut().poll(cx).is_ready();
                    *this.timer = Some(timer);
                    if !fired {
                        return Poll::Pending;
                    }
                }
            }
        }
        // Expired: drop the inner body, cancel the request's context.
        this.inner.set(None);
        *this.timer = None;
        cut.cx.cancel();
        let exceeded = DeadlineExceeded::at(cut.deadline, Instant::now());
        if *this.grpc {
            return Poll::Ready(Some(Ok(Frame::trailers(grpc_trailers(&exceeded)))));
        }
        Poll::Ready(Some(Err(Box::new(exceeded))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// The trailers that end a gRPC stream cut by its deadline:
/// `DEADLINE_EXCEEDED` and a user-safe message (no budget figures).
fn grpc_trailers(exceeded: &DeadlineExceeded) -> HeaderMap {
    let mut trailers = HeaderMap::with_capacity(2);
    let code = Kind::DeadlineExceeded.grpc_code() as i32;
    trailers.insert("grpc-status", HeaderValue::from(code));
    let message = if exceeded.origin().is_inherited() {
        "The stream did not finish within the deadline its caller set."
    } else {
        "The stream did not finish within the service's time budget."
    };
    trailers.insert("grpc-message", HeaderValue::from_static(message));
    trailers
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use atscale_core::Origin;
    use bytes::Bytes;
    use futures_util::stream;
    use http_body_util::{BodyExt, Full, StreamBody};
    use tower::{Layer, ServiceExt, service_fn};

    use super::*;
    use crate::DeadlineLayer;

    /// Awaits `fut` for at most a minute of (paused) time.
    async fn bounded<F: Future>(fut: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(60), fut)
            .await
            .expect("no answer within a minute")
    }

    type Frames = stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>;

    /// A body that sends one byte per `every`, forever.
    fn trickle(every: Duration) -> StreamBody<Frames> {
        let frames = stream::unfold((), move |()| async move {
            tokio::time::sleep(every).await;
            Some((Ok(Frame::data(Bytes::from_static(b"x"))), ()))
        });
        StreamBody::new(Box::pin(frames) as Frames)
    }

    /// A server with a 1 s budget over its bodies (`bodies`), answering
    /// `answer(request)` and reporting its request's context.
    fn server<B, F>(
        bodies: BodyDeadlineLayer,
        answer: F,
        contexts: tokio::sync::mpsc::UnboundedSender<Context>,
    ) -> impl Service<
        http::Request<B>,
        Response = http::Response<DeadlineBody<StreamBody<Frames>>>,
        Error = BoxError,
    > + Clone
    where
        B: Body + Send + 'static,
        F: Fn(http::Request<DeadlineBody<B>>) -> http::Response<StreamBody<Frames>>
            + Clone
            + Send
            + 'static,
    {
        DeadlineLayer::server(Duration::from_secs(1))
            .with_bodies(bodies)
            .layer(service_fn(move |req: http::Request<DeadlineBody<B>>| {
                let _ = contexts.send(Context::current().unwrap());
                let answer = answer.clone();
                async move { Ok::<_, BoxError>(answer(req)) }
            }))
    }

    fn endless(
        grpc: bool,
    ) -> impl Fn(http::Request<DeadlineBody<Full<Bytes>>>) -> http::Response<StreamBody<Frames>> + Clone
    {
        move |_req| {
            let mut res = http::Response::new(trickle(Duration::from_millis(100)));
            if grpc {
                res.headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/grpc"));
            }
            res
        }
    }

    fn request(grpc: bool) -> http::Request<Full<Bytes>> {
        let mut req = http::Request::new(Full::new(Bytes::new()));
        if grpc {
            req.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
        }
        req
    }

    #[tokio::test(start_paused = true)]
    async fn an_http_stream_that_outlives_the_deadline_fails_and_cancels_the_context() {
        let (tx, mut contexts) = tokio::sync::mpsc::unbounded_channel();
        let svc = server(BodyDeadlineLayer::all(), endless(false), tx);
        let started = Instant::now();
        let res = bounded(svc.oneshot(request(false))).await.unwrap();
        let cx = bounded(contexts.recv()).await.unwrap();
        let mut body = Box::pin(res.into_body());
        let mut frames = 0;
        let err = loop {
            match bounded(body.frame()).await {
                Some(Ok(_)) => frames += 1,
                Some(Err(err)) => break err,
                None => panic!("the stream ended by itself"),
            }
        };
        // Ten frames in the second, then the cut, at the deadline.
        assert!((9..=10).contains(&frames), "{frames}");
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert_eq!(Kind::of(&*err), Kind::DeadlineExceeded);
        assert!(cx.is_cancelled());
        assert!(body.is_end_stream());
        assert!(bounded(body.frame()).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_grpc_stream_that_outlives_the_deadline_ends_with_deadline_exceeded_trailers() {
        let (tx, mut contexts) = tokio::sync::mpsc::unbounded_channel();
        let svc = server(BodyDeadlineLayer::grpc(), endless(true), tx);
        let res = bounded(svc.oneshot(request(true))).await.unwrap();
        let cx = bounded(contexts.recv()).await.unwrap();
        let collected = bounded(res.into_body().collect()).await.unwrap();
        let trailers = collected.trailers().expect("trailers").clone();
        assert_eq!(trailers["grpc-status"], "4");
        assert_eq!(
            trailers["grpc-message"],
            "The stream did not finish within the service's time budget."
        );
        assert!(cx.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn an_always_ready_stream_is_cut_too() {
        let (tx, _contexts) = tokio::sync::mpsc::unbounded_channel();
        let svc = server(
            BodyDeadlineLayer::all(),
            |_req| {
                // Every frame is ready at once; only the clock moves on.
                let frames = stream::repeat_with(|| Ok(Frame::data(Bytes::from_static(b"x"))));
                http::Response::new(StreamBody::new(Box::pin(frames) as Frames))
            },
            tx,
        );
        let mut body = Box::pin(
            bounded(svc.oneshot(request(false)))
                .await
                .unwrap()
                .into_body(),
        );
        for _ in 0..3 {
            bounded(body.frame()).await.unwrap().unwrap();
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        let err = bounded(body.frame()).await.unwrap().unwrap_err();
        assert_eq!(Kind::of(&*err), Kind::DeadlineExceeded);
    }

    #[tokio::test(start_paused = true)]
    async fn uncovered_bodies_and_bodies_that_end_in_time_pass_through() {
        // gRPC only: an HTTP stream is not cut.
        let (tx, mut contexts) = tokio::sync::mpsc::unbounded_channel();
        let svc = server(BodyDeadlineLayer::grpc(), endless(false), tx);
        let mut body = Box::pin(
            bounded(svc.oneshot(request(false)))
                .await
                .unwrap()
                .into_body(),
        );
        let cx = bounded(contexts.recv()).await.unwrap();
        for _ in 0..30 {
            bounded(body.frame()).await.unwrap().unwrap();
        }
        assert!(!cx.is_cancelled());

        // A body that ends before the deadline is whole, the context left alone.
        let (tx, mut contexts) = tokio::sync::mpsc::unbounded_channel();
        let svc = server(
            BodyDeadlineLayer::all(),
            |_req| {
                let frames = stream::iter([Ok(Frame::data(Bytes::from_static(b"done")))]);
                http::Response::new(StreamBody::new(Box::pin(frames) as Frames))
            },
            tx,
        );
        let res = bounded(svc.oneshot(request(false))).await.unwrap();
        let cx = bounded(contexts.recv()).await.unwrap();
        let bytes = bounded(res.into_body().collect()).await.unwrap().to_bytes();
        assert_eq!(bytes, "done");
        assert!(!cx.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_upload_fails_and_the_answer_is_the_deadline() {
        // The handler reads the whole upload, and answers whatever happened:
        // here a 400 for a body that failed.
        let svc = DeadlineLayer::server(Duration::from_millis(2500))
            .with_bodies(BodyDeadlineLayer::all())
            .layer(service_fn(
                |req: http::Request<DeadlineBody<StreamBody<Frames>>>| async move {
                    let read = bounded(req.into_body().collect()).await;
                    let err = read.map(|_| ()).unwrap_err();
                    assert_eq!(Kind::of(&*err), Kind::DeadlineExceeded);
                    let mut res = http::Response::new(Full::new(Bytes::new()));
                    *res.status_mut() = http::StatusCode::BAD_REQUEST;
                    Ok::<_, BoxError>(res)
                },
            ));
        let started = Instant::now();
        let upload = http::Request::new(trickle(Duration::from_secs(1)));
        let err = bounded(svc.oneshot(upload)).await.unwrap_err();
        assert_eq!(Kind::of(&*err), Kind::DeadlineExceeded);
        assert_eq!(started.elapsed(), Duration::from_millis(2500));
    }

    #[test]
    fn layers_services_and_bodies_are_send_sync_and_clone_as_promised() {
        fn send_sync<T: Send + Sync>() {}
        fn clone<T: Clone>() {}
        send_sync::<BodyDeadlineLayer>();
        send_sync::<ResponseDeadlineLayer>();
        send_sync::<BodyDeadline<()>>();
        send_sync::<ResponseDeadline<()>>();
        send_sync::<DeadlineBody<Full<Bytes>>>();
        send_sync::<BodyDeadlineFuture<std::future::Ready<()>>>();
        clone::<BodyDeadlineLayer>();
        clone::<ResponseDeadlineLayer>();
        clone::<BodyDeadline<()>>();
        clone::<ResponseDeadline<()>>();
        clone::<DeadlineLayer<BodyDeadlineLayer>>();
    }

    #[test]
    fn grpc_trailers_say_deadline_exceeded_and_whose_deadline() {
        let deadline =
            RequestDeadline::after(Instant::now(), Duration::ZERO, Origin::GrpcTimeout).unwrap();
        let trailers = grpc_trailers(&DeadlineExceeded::at(deadline, Instant::now()));
        assert_eq!(trailers["grpc-status"], "4");
        assert_eq!(
            trailers["grpc-message"],
            "The stream did not finish within the deadline its caller set."
        );
    }
}
