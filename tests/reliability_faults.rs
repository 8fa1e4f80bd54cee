//! Reliability: inner services that fail every way they can, behind the
//! recommended server stack (ErrorEnrich → Deadline → Heartbeat → RateLimit),
//! over real connections on loopback; and the deadline's clock edge cases on
//! tokio's paused clock.
//!
//! Each fault must surface as its kind of the failure vocabulary (HTTP
//! status and problem+json `code`, or gRPC status), the server must go on
//! serving, and the connection must survive wherever HTTP allows it: every
//! fault before the response head on HTTP/1.1, and even a body that fails
//! mid-stream on HTTP/2 (only that stream is reset). Internal error text and
//! panic messages never reach the client.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use atscale::core::{BoxError, Carrier, Context, Kind, Origin};
use atscale::deadline::DeadlineLayer;
use atscale::error::ErrorEnrichLayer;
use atscale::heartbeat::Monitor;
use atscale::ratelimit::{Limit, Limiter, RateLimitLayer};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderName, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

const X_DEADLINE: HeaderName = HeaderName::from_static("x-deadline-ms");
/// The stall watchdog's limit on the server: far above the 50 ms deadlines, so a
/// loaded machine cannot make the watchdog fire first.
const STALL: Duration = Duration::from_secs(1);
const SECRET: &str = "password=hunter2 at db-7.internal";

type Frames = Pin<Box<dyn futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send>>;

/// A body of `items`, each after the body has once been pending, so that
/// what came before an error has been flushed to the client by then.
fn frames(items: Vec<Result<&'static str, &'static str>>) -> StreamBody<Frames> {
    StreamBody::new(frame_stream(items))
}

fn frame_stream(items: Vec<Result<&'static str, &'static str>>) -> Frames {
    let items = futures_util::stream::iter(items).then(|item| async move {
        tokio::task::yield_now().await;
        match item {
            Ok(data) => Ok(Frame::data(Bytes::from_static(data.as_bytes()))),
            Err(e) => Err(BoxError::from(format!("{e}: {SECRET}"))),
        }
    });
    Box::pin(items)
}

/// The faulty application: one route per way to fail.
fn app(
    calls: Arc<AtomicUsize>,
) -> impl Service<
    Request<hyper::body::Incoming>,
    Response = Response<StreamBody<Frames>>,
    Error = BoxError,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    service_fn(move |req: Request<hyper::body::Incoming>| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            match req.uri().path() {
                "/ok" => Ok(Response::new(frames(vec![Ok("ok")]))),
                "/error" => Err(BoxError::from(format!("query failed: {SECRET}"))),
                "/panic" => panic!("handler panicked: {SECRET}"),
                "/hang" => std::future::pending().await,
                "/body-error" => Ok(Response::new(frames(vec![
                    Ok("partial"),
                    Err("disk read failed"),
                ]))),
                "/body-hang" => {
                    let first = frame_stream(vec![Ok("partial")]);
                    let body: Frames = Box::pin(first.chain(futures_util::stream::pending()));
                    Ok(Response::new(StreamBody::new(body)))
                }
                _ => {
                    let mut res = Response::new(frames(vec![]));
                    *res.status_mut() = StatusCode::NOT_FOUND;
                    Ok(res)
                }
            }
        }
    })
}

struct Server {
    addr: SocketAddr,
    monitor: Monitor,
    calls: Arc<AtomicUsize>,
}

/// Serves the faulty application behind the recommended stack with hyper,
/// HTTP/1.1 or HTTP/2 (prior knowledge), one task per connection.
async fn serve(http2: bool) -> Result<Server, BoxError> {
    let monitor = Monitor::builder().stall(STALL).build();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(ErrorEnrichLayer::new("faults"))
        .layer(DeadlineLayer::server(Duration::from_secs(10)).with_header(X_DEADLINE))
        .layer(monitor.layer())
        .layer(
            RateLimitLayer::builder()
                .limiter(Limiter::new(Limit::per_second(10_000)?.burst(1_000)?))
                .build()?,
        )
        .service(app(calls.clone()));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let svc = svc.clone();
            let hyper_svc = hyper::service::service_fn(move |req| svc.clone().oneshot(req));
            tokio::spawn(async move {
                let io = TokioIo::new(stream);
                // A connection ending in error (a broken body) ends only itself.
                if http2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, hyper_svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, hyper_svc)
                        .await;
                }
            });
        }
    });
    Ok(Server {
        addr,
        monitor,
        calls,
    })
}

/// A request, its headers given as pairs.
fn get(path: &str, headers: &[(&str, &str)]) -> Request<Empty<Bytes>> {
    let mut req = Request::get(format!("http://test{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Empty::new()).expect("a valid request")
}

/// What the client saw: status, the problem's `code` (if a problem), the raw body.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    code: Option<String>,
    body: String,
}

async fn answer(res: Response<hyper::body::Incoming>) -> Result<Answer, BoxError> {
    let status = res.status();
    let problem = res
        .headers()
        .get("content-type")
        .is_some_and(|v| v == "application/problem+json");
    let body = String::from_utf8(res.into_body().collect().await?.to_bytes().to_vec())?;
    let code = if problem {
        let doc: serde_json::Value = serde_json::from_str(&body)?;
        Some(doc["code"].as_str().expect("a code").to_owned())
    } else {
        None
    };
    Ok(Answer { status, code, body })
}

/// (path, headers, status, problem code)
type Fault = (
    &'static str,
    &'static [(&'static str, &'static str)],
    u16,
    Option<&'static str>,
);

/// Every fault that happens before the response head, in order, on one
/// connection: (path, headers, status, code).
const FAULTS: [Fault; 8] = [
    ("/ok", &[], 200, None),
    ("/error", &[], 500, Some("internal")),
    ("/panic", &[], 500, Some("internal")),
    (
        "/hang",
        &[("x-deadline-ms", "50")],
        504,
        Some("deadline_exceeded"),
    ),
    ("/hang", &[], 503, Some("stalled")),
    (
        "/ok",
        &[("grpc-timeout", "1 second")],
        400,
        Some("bad_request"),
    ),
    (
        "/ok",
        &[("x-deadline-ms", "0")],
        504,
        Some("deadline_exceeded"),
    ),
    ("/ok", &[], 200, None),
];

fn check(got: &Answer, status: u16, code: Option<&str>, what: &str) {
    assert_eq!(got.status.as_u16(), status, "{what}: {got:?}");
    assert_eq!(got.code.as_deref(), code, "{what}: {got:?}");
    assert!(!got.body.contains("hunter2"), "{what} leaked: {}", got.body);
    assert!(!got.body.contains("db-7"), "{what} leaked: {}", got.body);
    assert!(
        !got.body.contains("panicked"),
        "{what} leaked: {}",
        got.body
    );
}

#[tokio::test]
async fn http1_one_connection_survives_every_fault_before_the_head() -> Result<(), BoxError> {
    let server = serve(false).await?;
    let stream = TcpStream::connect(server.addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    for round in 0..2 {
        for (path, headers, status, code) in FAULTS {
            send.ready().await?;
            let got = answer(send.send_request(get(path, headers)).await?).await?;
            check(
                &got,
                status,
                code,
                &format!("round {round} {path} {headers:?}"),
            );
        }
    }
    // The same connection is still open and serving.
    assert!(!conn.is_finished());

    // A body that fails mid-stream: HTTP/1.1 cannot say so but by closing
    // the connection, which it does; the client sees the body break.
    send.ready().await?;
    let res = send.send_request(get("/body-error", &[])).await?;
    assert_eq!(res.status(), StatusCode::OK);
    let broken = res.into_body().collect().await;
    assert!(broken.is_err(), "the client must see the body break");
    conn.await?.ok();
    assert!(
        send.ready().await.is_err(),
        "HTTP/1.1 closes that connection"
    );

    // The server lives on: a new connection is served.
    let stream = TcpStream::connect(server.addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let got = answer(send.send_request(get("/ok", &[])).await?).await?;
    check(&got, 200, None, "after the broken body");

    // The heartbeat accounted for every request: none left in flight.
    server.monitor.wait_in_flight(0).await;
    let counts = server.monitor.counts();
    assert_eq!(counts.in_flight(), 0);
    // Malformed and already-expired deadlines never reach the heartbeat.
    let reached = 2 * (FAULTS.len() as u64 - 2) + 2;
    assert_eq!(counts.started(), reached, "{counts:?}");
    assert_eq!(counts.stalled(), 2);
    assert_eq!(counts.ok(), 2 * 2 + 1);
    // the error (x2 rounds) and the body that broke
    assert_eq!(counts.error(), 3, "{counts:?}");
    // The deadline fired outside the heartbeat (its future was dropped), and
    // a panic unwinds through it (caught further out, by ErrorEnrich): both
    // end the request as abandoned.
    assert_eq!(counts.cancelled(), 4, "{counts:?}");
    assert_eq!(
        server.calls.load(Ordering::SeqCst) as u64,
        reached,
        "the handler was called for exactly what reached it"
    );
    Ok(())
}

#[tokio::test]
async fn http2_connection_survives_even_a_body_broken_mid_stream() -> Result<(), BoxError> {
    let server = serve(true).await?;
    let stream = TcpStream::connect(server.addr).await?;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    for (path, headers, status, code) in FAULTS {
        send.ready().await?;
        let got = answer(send.send_request(get(path, headers)).await?).await?;
        check(&got, status, code, &format!("h2 {path} {headers:?}"));
    }
    // A broken body resets its own stream only.
    for _ in 0..3 {
        send.ready().await?;
        let res = send.send_request(get("/body-error", &[])).await?;
        assert_eq!(res.status(), StatusCode::OK);
        assert!(res.into_body().collect().await.is_err());
    }
    // So does a body that hangs mid-stream: the stall watchdog cuts it.
    let stalled = server.monitor.counts().stalled();
    send.ready().await?;
    let res = send.send_request(get("/body-hang", &[])).await?;
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let first = body.frame().await.expect("a frame")?;
    assert_eq!(first.into_data().ok().as_deref(), Some(&b"partial"[..]));
    assert!(body.collect().await.is_err(), "cut by the watchdog");
    server.monitor.wait_in_flight(0).await;
    assert_eq!(server.monitor.counts().stalled(), stalled + 1);
    // Concurrent faults on the same connection, all answered.
    let mut calls = Vec::new();
    for (path, headers, status, code) in FAULTS {
        let mut send = send.clone();
        calls.push(tokio::spawn(async move {
            send.ready().await?;
            let got = answer(send.send_request(get(path, headers)).await?).await?;
            check(&got, status, code, &format!("h2 concurrent {path}"));
            Ok::<_, BoxError>(())
        }));
    }
    for call in calls {
        call.await??;
    }
    send.ready().await?;
    let got = answer(send.send_request(get("/ok", &[])).await?).await?;
    check(&got, 200, None, "h2 after everything");
    assert!(!conn.is_finished(), "the HTTP/2 connection survived");
    server.monitor.wait_in_flight(0).await;
    assert_eq!(server.monitor.counts().in_flight(), 0);
    Ok(())
}

// ------------------------------------------------- gRPC, in process

#[tokio::test(start_paused = true)]
async fn grpc_requests_get_the_status_of_each_fault() -> Result<(), BoxError> {
    let monitor = Monitor::builder().stall(STALL).build();
    let svc = ServiceBuilder::new()
        .layer(ErrorEnrichLayer::new("faults"))
        .layer(DeadlineLayer::server(Duration::from_secs(10)))
        .layer(monitor.layer())
        .service(service_fn(|req: Request<()>| async move {
            match req.uri().path() {
                "/error" => Err(BoxError::from(SECRET)),
                "/panic" => panic!("{SECRET}"),
                "/hang" => std::future::pending().await,
                _ => Ok(Response::new(frames(vec![Ok("ok")]))),
            }
        }));
    let cases = [
        ("/error", None, 13), // INTERNAL
        ("/panic", None, 13),
        ("/hang", Some("50m"), 4), // DEADLINE_EXCEEDED
        ("/hang", None, 14),       // UNAVAILABLE: stalled
        ("/ok", Some("bogus"), 3), // INVALID_ARGUMENT
        ("/ok", Some("0n"), 4),
    ];
    for (path, timeout, code) in cases {
        let mut req = Request::post(path).header("content-type", "application/grpc");
        if let Some(t) = timeout {
            req = req.header("grpc-timeout", t);
        }
        let res = svc.clone().oneshot(req.body(())?).await?;
        assert_eq!(res.status(), StatusCode::OK, "trailers-only");
        let status = res.headers()["grpc-status"].to_str()?;
        assert_eq!(status, code.to_string(), "{path} {timeout:?}");
        let status = tonic::Status::from_header_map(res.headers()).expect("a gRPC status");
        assert!(!status.message().contains("hunter2"), "{status:?}");
        // nor in the rich details (a DebugInfo would carry the chain)
        let details = String::from_utf8_lossy(status.details());
        assert!(!details.contains("hunter2"), "{details}");
        assert!(details.contains("INTERNAL") || code != 13, "{details}");
        let body = res.into_body().collect().await?.to_bytes();
        assert!(body.is_empty());
    }
    assert_eq!(monitor.in_flight(), 0);
    Ok(())
}

// ------------------------------------------------- clock edge cases

/// The deadline layer alone (plus ErrorEnrich) over a handler that reports
/// the deadline it ran under, on the paused clock.
fn deadline_stack(
    budget: Duration,
    calls: Arc<AtomicUsize>,
) -> impl Service<Request<()>, Response = Response<String>, Error = BoxError> + Clone {
    ServiceBuilder::new()
        .layer(DeadlineLayer::server(budget).with_header(X_DEADLINE))
        .service(service_fn(move |_req: Request<()>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                let cx = Context::current().expect("set by the layer");
                let left = cx.remaining().map(|d| d.as_millis());
                Ok::<_, BoxError>(Response::new(format!("{left:?}")))
            }
        }))
}

#[tokio::test(start_paused = true)]
async fn deadline_clock_edges_at_now_in_the_past_far_future_and_max() -> Result<(), BoxError> {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = deadline_stack(Duration::from_secs(10), calls.clone());
    let req = |headers: &[(&str, &str)]| -> Result<Request<()>, BoxError> {
        let mut r = Request::get("/");
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        Ok(r.body(())?)
    };

    // At now: a zero budget from either header fails before the handler.
    for h in [
        ("x-deadline-ms", "0"),
        ("grpc-timeout", "0S"),
        ("grpc-timeout", "0n"),
    ] {
        let err = svc.clone().oneshot(req(&[h])?).await.unwrap_err();
        assert_eq!(Kind::of(&*err), Kind::DeadlineExceeded, "{h:?}");
    }
    // A zero local budget too.
    let zero = deadline_stack(Duration::ZERO, calls.clone());
    let err = zero.oneshot(req(&[])?).await.unwrap_err();
    assert_eq!(Kind::of(&*err), Kind::DeadlineExceeded);
    assert_eq!(calls.load(Ordering::SeqCst), 0, "no handler ran");

    // In the past: a parent context whose deadline passed a while ago.
    let parent = Context::new().with_budget(Duration::from_millis(10), Origin::GrpcTimeout);
    tokio::time::advance(Duration::from_secs(3)).await;
    let mut r = req(&[])?;
    r.set_context(parent.clone());
    let err = svc.clone().oneshot(r).await.unwrap_err();
    assert_eq!(Kind::of(&*err), Kind::DeadlineExceeded);
    assert!(err.to_string().contains("grpc-timeout"), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // One nanosecond: expires on the first timer tick, never before the handler's answer.
    let res = svc.clone().oneshot(req(&[("grpc-timeout", "1n")])?).await;
    assert!(
        res.is_ok(),
        "an immediate answer is not late: no time passed on the paused clock"
    );

    // Far future: the largest values both formats allow. The local budget
    // (10 s) wins; nothing overflows.
    for h in [
        ("grpc-timeout", "99999999H"),
        ("x-deadline-ms", "18446744073709551615"),
    ] {
        let res = svc.clone().oneshot(req(&[h])?).await?;
        assert_eq!(res.body(), "Some(10000)", "{h:?}");
    }

    // Duration::MAX budgets everywhere: the layer, the header, the parent.
    let max = deadline_stack(Duration::MAX, calls.clone());
    for h in [
        ("grpc-timeout", "99999999H"),
        ("x-deadline-ms", "18446744073709551615"),
    ] {
        let res = max.clone().oneshot(req(&[h])?).await?;
        let left: Option<u128> = res
            .body()
            .strip_prefix("Some(")
            .and_then(|s| s.strip_suffix(')'))
            .and_then(|s| s.parse().ok());
        // either the header's (huge) budget or none at all: never a short or wrapped one
        assert!(
            left.is_none_or(|ms| ms >= 18_000_000_000_000),
            "{h:?}: {}",
            res.body()
        );
    }
    let mut r = req(&[])?;
    r.set_context(Context::new().with_budget(Duration::MAX, Origin::Header));
    let res = max.clone().oneshot(r).await?;
    assert!(
        res.body() == "None" || res.body().len() > 12,
        "{}",
        res.body()
    );

    // A client writing Duration::MAX onward saturates instead of wrapping.
    let seen = Arc::new(std::sync::Mutex::new(None));
    let s = seen.clone();
    let client = DeadlineLayer::client(Duration::MAX);
    let client = tower::Layer::layer(
        &client,
        service_fn(move |req: Request<()>| {
            *s.lock().unwrap() = req.headers().get("grpc-timeout").cloned();
            async { Ok::<_, BoxError>(()) }
        }),
    );
    client.oneshot(req(&[])?).await?;
    let written = seen.lock().unwrap().clone();
    assert!(
        written.is_none() || written.as_ref().is_some_and(|v| v == "99999999H"),
        "{written:?}"
    );

    // Expiry exactly at the budget, on the paused clock: the handler would
    // answer only 1 ms after the deadline, so the only right answer is
    // DeadlineExceeded, and it must come at 100 ms, not at 101.
    let slow = ServiceBuilder::new()
        .layer(DeadlineLayer::server(Duration::from_millis(100)))
        .service(service_fn(|_: Request<()>| async {
            tokio::time::sleep(Duration::from_millis(101)).await;
            Ok::<_, BoxError>(())
        }));
    let start = tokio::time::Instant::now();
    let out = slow.oneshot(req(&[])?).await;
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    let e = out.expect_err("the deadline expires 1 ms before the handler answers");
    assert_eq!(Kind::of(&*e), Kind::DeadlineExceeded, "{e}");

    // The watchdog and the rate limiter take Duration::MAX as "no limit".
    let monitor = Monitor::builder().stall(Duration::MAX).build();
    let svc = ServiceBuilder::new()
        .layer(monitor.layer())
        .layer(
            RateLimitLayer::builder()
                .limiter(Limiter::with_clock(
                    Limit::per_second(1)?,
                    atscale::ratelimit::Clock::tokio(),
                ))
                .max_wait(Duration::MAX)
                .build()?,
        )
        .service(service_fn(|_: Request<()>| async {
            Ok::<_, BoxError>(Response::new(String::new()))
        }));
    let mut r = req(&[])?;
    r.set_context(Context::new().with_budget(Duration::MAX, Origin::Header));
    svc.clone().oneshot(r).await?;
    let mut r = req(&[])?;
    r.set_context(Context::new().with_budget(Duration::MAX, Origin::Header));
    let start = tokio::time::Instant::now();
    svc.oneshot(r).await?;
    assert_eq!(
        start.elapsed().as_millis(),
        1000,
        "waited its turn, no overflow"
    );
    assert_eq!(monitor.in_flight(), 0);
    Ok(())
}
