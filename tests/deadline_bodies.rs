//! The request's deadline over bodies, through the server stack on
//! loopback: a tonic-health `Watch` stream that outlives its deadline ends
//! with `DEADLINE_EXCEEDED`; an SSE stream is aborted at the caller's
//! deadline; an upload of one byte per second is cut, before and after the
//! response head. Each time the request's context is cancelled and the
//! heartbeat sees the request end.

mod loopback;

use std::convert::Infallible;
use std::time::Duration;

use atscale::core::{BoxError, Context};
use atscale::deadline::BodyDeadlineLayer;
use atscale::stack::{self, DEADLINE_HEADER};
use axum::Router;
use axum::body::Body;
use axum::response::sse::{Event, Sse};
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use loopback::{bounded, channel, http_client, serve_health, serve_router};
use tokio::sync::mpsc;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test]
async fn a_watch_stream_that_outlives_its_deadline_ends_with_deadline_exceeded() {
    // The stack's own budget is long: the caller's grpc-timeout decides.
    let stack = stack::server("health", Duration::from_secs(30));
    let monitor = stack.monitor().clone();
    let addr = serve_health(stack).await;
    let mut health = HealthClient::new(channel(addr).await);

    let mut watch = tonic::Request::new(HealthCheckRequest::default());
    watch.set_timeout(Duration::from_millis(300));
    let mut stream = bounded("the watch head", health.watch(watch))
        .await
        .unwrap()
        .into_inner();
    // The first message says SERVING; the status never changes after it.
    let first = bounded("the first message", stream.message()).await;
    assert_eq!(first.unwrap().unwrap().status, 1);
    // Then the deadline ends the stream with a proper status.
    let status = bounded("the end of the stream", stream.message())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        status.message(),
        "The stream did not finish within the deadline its caller set."
    );
    // The heartbeat saw the request end.
    bounded("the monitor", monitor.wait_finished(1)).await;
    assert_eq!(monitor.in_flight(), 0);
}

#[tokio::test]
async fn a_watch_within_its_deadline_and_plain_checks_are_untouched() {
    let stack = stack::server("health", Duration::from_secs(30));
    let addr = serve_health(stack).await;
    let mut health = HealthClient::new(channel(addr).await);
    let mut watch = tonic::Request::new(HealthCheckRequest::default());
    watch.set_timeout(Duration::from_secs(20));
    let mut stream = bounded("the watch head", health.watch(watch))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        bounded("the first message", stream.message())
            .await
            .unwrap()
            .unwrap()
            .status,
        1
    );
    let check = bounded("a check", health.check(HealthCheckRequest::default())).await;
    assert_eq!(check.unwrap().into_inner().status, 1);
}

/// An SSE route sending an event every 50 ms, forever, reporting its
/// request's context.
fn events(contexts: mpsc::UnboundedSender<Context>) -> Router {
    Router::new().route(
        "/events",
        get(move || {
            let _ = contexts.send(Context::current().unwrap());
            async {
                let ticks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(
                    Duration::from_millis(50),
                ));
                Sse::new(ticks.map(|_| Ok::<_, Infallible>(Event::default().data("tick"))))
            }
        }),
    )
}

#[tokio::test]
async fn an_sse_stream_is_aborted_at_the_callers_deadline() {
    let (tx, mut contexts) = mpsc::unbounded_channel();
    let stack = stack::server("events", Duration::from_secs(30))
        .with_body_deadline(BodyDeadlineLayer::all().responses_only());
    let monitor = stack.monitor().clone();
    let addr = serve_router(events(tx).layer(stack)).await;

    let req = http::Request::get(format!("http://{addr}/events"))
        .header(DEADLINE_HEADER, "300")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = bounded("the head", http_client().request(req))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let cx = bounded("the context", contexts.recv()).await.unwrap();
    let mut body = res.into_body();
    let mut ticks = 0;
    let err = loop {
        match bounded("a frame", body.frame()).await {
            Some(Ok(_)) => ticks += 1,
            Some(Err(err)) => break err,
            None => panic!("the stream ended as if complete after {ticks} events"),
        }
    };
    // Some events came, then the stream was aborted, not ended: the client
    // cannot take it for complete.
    assert!(ticks >= 1, "{ticks}");
    assert!(aborted(&err), "{err:?}");
    bounded("the context cancelled", cx.cancelled()).await;
    bounded("the monitor", monitor.wait_finished(1)).await;
    assert_eq!(monitor.in_flight(), 0);
}

#[tokio::test]
async fn by_default_only_grpc_streams_are_held_to_the_deadline() {
    let (tx, mut contexts) = mpsc::unbounded_channel();
    let stack = stack::server("events", Duration::from_secs(30));
    let addr = serve_router(events(tx).layer(stack)).await;
    let req = http::Request::get(format!("http://{addr}/events"))
        .header(DEADLINE_HEADER, "100")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = bounded("the head", http_client().request(req))
        .await
        .unwrap();
    let cx = bounded("the context", contexts.recv()).await.unwrap();
    let mut body = res.into_body();
    // Events keep coming past the 100 ms deadline: 10 of them take 500 ms.
    for _ in 0..10 {
        bounded("a frame", body.frame()).await.unwrap().unwrap();
    }
    assert!(!cx.is_cancelled());
}

/// Whether a response body failed because the server cut it (HTTP/1: the
/// connection closed before the last chunk).
fn aborted(err: &hyper::Error) -> bool {
    let eof = atscale::core::find::<std::io::Error>(err)
        .is_some_and(|io| io.kind() == std::io::ErrorKind::UnexpectedEof);
    err.is_incomplete_message() || eof
}

/// A body sending one byte per second, forever.
fn one_byte_per_second()
-> StreamBody<futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>> {
    let ticks =
        tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(Duration::from_secs(1)));
    StreamBody::new(
        ticks
            .map(|_| Ok(Frame::data(Bytes::from_static(b"x"))))
            .boxed(),
    )
}

#[tokio::test]
async fn an_upload_of_one_byte_per_second_is_cut_at_the_deadline() {
    let (tx, mut contexts) = mpsc::unbounded_channel::<Context>();
    let echo_tx = tx.clone();
    let app = Router::new()
        // Reads the whole upload before answering.
        .route(
            "/upload",
            post(move |body: Body| {
                let _ = tx.send(Context::current().unwrap());
                async move {
                    let read = body.collect().await.map_err(BoxError::from);
                    read.map(|b| b.to_bytes().len().to_string())
                        .unwrap_or_default()
                }
            }),
        )
        // Answers at once, echoing the upload as it comes.
        .route(
            "/echo",
            post(move |body: Body| {
                let _ = echo_tx.send(Context::current().unwrap());
                async move { Body::new(body) }
            }),
        );
    let stack = stack::server("uploads", Duration::from_secs(30))
        .with_body_deadline(BodyDeadlineLayer::all().responses_only());
    let monitor = stack.monitor().clone();
    let addr = serve_router(app.layer(stack)).await;
    let upload = |path: &str| {
        http::Request::post(format!("http://{addr}{path}"))
            .header(DEADLINE_HEADER, "2500")
            .body(one_byte_per_second())
            .unwrap()
    };

    // Before the head: the answer is a 504.
    let res = bounded("the answer", http_client().request(upload("/upload")))
        .await
        .unwrap();
    assert_eq!(res.status(), 504);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let cx = bounded("the context", contexts.recv()).await.unwrap();
    bounded("the context cancelled", cx.cancelled()).await;

    // After the head: the echo is aborted.
    let res = bounded("the echo head", http_client().request(upload("/echo")))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let cx = bounded("the context", contexts.recv()).await.unwrap();
    let mut body = res.into_body();
    let mut echoed = 0;
    let err = loop {
        match bounded("an echoed byte", body.frame()).await {
            Some(Ok(_)) => echoed += 1,
            Some(Err(err)) => break err,
            None => panic!("the echo ended as if complete"),
        }
    };
    assert!((1..=3).contains(&echoed), "{echoed}");
    assert!(aborted(&err), "{err:?}");
    bounded("the context cancelled", cx.cancelled()).await;
    bounded("the monitor", monitor.wait_finished(2)).await;
    assert_eq!(monitor.in_flight(), 0);
}
