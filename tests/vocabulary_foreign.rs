//! Foreign errors keep their meaning through a real server stack on
//! loopback: tower's `Elapsed` and `Overloaded`, a hyper-util client's
//! refused connection, `std::io::Error` kinds, a `tonic::Status` answered
//! by another server, an h2 refused stream, and an application's own error
//! types mapped once with `classify::map`. Each leaves an axum server as
//! the right status, problem `code` and headers, and a tonic server as the
//! right gRPC code.

mod loopback;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use atscale::core::BoxError;
use atscale::core::Kind;
use atscale::core::classify::{self, Classification};
use atscale::stack;
use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use loopback::{bounded, channel, closed_port, http_client, serve_health, serve_router};
use serde_json::Value;
use tonic::body::Body as GrpcBody;
use tonic::service::Routes;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::layer::layer_fn;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};

/// An application's own error types, mapped once.
#[derive(Debug)]
struct DbTimeout;

impl std::fmt::Display for DbTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad("database timed out on orders_pkey")
    }
}

impl std::error::Error for DbTimeout {}

#[derive(Debug)]
struct QuotaExceeded {
    reset_in: Duration,
}

impl std::fmt::Display for QuotaExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad("tenant 42 quota exceeded")
    }
}

impl std::error::Error for QuotaExceeded {}

/// Maps the application's errors, once for the whole test binary.
fn map_application_errors() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        classify::map(|_: &DbTimeout| Classification::new(Kind::DeadlineExceeded));
        classify::map(|q: &QuotaExceeded| {
            Classification::new(Kind::RateLimited).with_retry_after(q.reset_in)
        });
    });
}

/// The error a handler fails with for `path`, made for real where it can be.
fn fail(path: String, deps: Deps) -> futures_util::future::BoxFuture<'static, BoxError> {
    Box::pin(async move {
        match path.as_str() {
            // tower's timeout around a handler that is too slow.
            "/tower-timeout" => tower_timeout().await,
            // tower's load shedding in front of a service with no room.
            "/tower-load-shed" => tower_load_shed().await,
            // hyper-util's client, connecting to a closed port.
            "/hyper-refused" => {
                let req = http::Request::get(format!("http://{}/", deps.closed))
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                BoxError::from(http_client().request(req).await.unwrap_err())
            }
            "/io-timed-out" => std::io::Error::from(std::io::ErrorKind::TimedOut).into(),
            "/io-reset" => std::io::Error::from(std::io::ErrorKind::ConnectionReset).into(),
            // Another gRPC server's answer, through a plain tonic client.
            "/tonic-status" => {
                let mut health = HealthClient::new(channel(deps.limited).await);
                let _ = health.check(HealthCheckRequest::default()).await;
                let status = health
                    .check(HealthCheckRequest::default())
                    .await
                    .unwrap_err();
                status.into()
            }
            // An HTTP/2 server that refuses every stream.
            "/h2-refused" => {
                let mut health = HealthClient::new(channel(deps.refusing).await);
                health
                    .check(HealthCheckRequest::default())
                    .await
                    .unwrap_err()
                    .into()
            }
            "/db-timeout" => DbTimeout.into(),
            "/quota" => QuotaExceeded {
                reset_in: Duration::from_secs(7),
            }
            .into(),
            other => panic!("no failure for {other}"),
        }
    })
}

/// tower's `Elapsed`: a timeout around a service that is too slow.
fn tower_timeout() -> futures_util::future::BoxFuture<'static, BoxError> {
    async fn slow((): ()) -> Result<(), BoxError> {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok(())
    }
    let timeout = tower::timeout::Timeout::new(service_fn(slow), Duration::from_millis(20));
    Box::pin(async move { timeout.oneshot(()).await.unwrap_err() })
}

/// tower's `Overloaded`: load shedding in front of a service with no room.
fn tower_load_shed() -> futures_util::future::BoxFuture<'static, BoxError> {
    async fn never((): ()) -> Result<(), BoxError> {
        std::future::pending().await
    }
    let full = ServiceBuilder::new()
        .load_shed()
        .concurrency_limit(1)
        .service(service_fn(never));
    Box::pin(async move {
        let mut busy = full.clone();
        let first = busy.ready().await.unwrap().call(());
        let err = full.oneshot(()).await.unwrap_err();
        drop(first);
        err
    })
}

/// The servers the failures come from.
#[derive(Clone, Copy)]
struct Deps {
    closed: SocketAddr,
    /// A tonic-health server that allows one check a minute.
    limited: SocketAddr,
    /// A tonic-health server that refuses every HTTP/2 stream.
    refusing: SocketAddr,
}

async fn deps() -> Deps {
    use atscale::ratelimit::{Limit, Limiter, RateLimitLayer};
    let limited = serve_health(
        stack::server("quota-service", Duration::from_secs(5)).with_rate_limit(
            RateLimitLayer::reject(Limiter::new(Limit::per_minute(1).unwrap())),
        ),
    )
    .await;
    Deps {
        closed: closed_port().await,
        limited,
        refusing: refusing_server().await,
    }
}

/// A tonic-health server whose HTTP/2 connections allow no stream at all:
/// every call is refused (`REFUSED_STREAM`) before the server sees it.
async fn refusing_server() -> SocketAddr {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(0))
        .add_service(health)
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);
    addr
}

/// The axum app: the server stack around a handler that fails as its path says.
async fn http_app(deps: Deps) -> SocketAddr {
    map_application_errors();
    let handler = service_fn(move |req: http::Request<Body>| async move {
        Err::<http::Response<Body>, _>(fail(req.uri().path().to_owned(), deps).await)
    });
    serve_router(
        Router::new()
            .fallback_service(stack::server("orders", Duration::from_secs(10)).layer(handler)),
    )
    .await
}

struct Answer {
    status: u16,
    retry_after: Option<String>,
    problem: Value,
}

async fn get(addr: SocketAddr, path: &str) -> Answer {
    let req = http::Request::get(format!("http://{addr}{path}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = bounded(path, http_client().request(req)).await.unwrap();
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let status = res.status().as_u16();
    let retry_after = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = bounded(path, res.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    Answer {
        status,
        retry_after,
        problem: serde_json::from_slice(&body).unwrap(),
    }
}

/// (path, HTTP status, problem code, Retry-After, gRPC code)
const CASES: &[(&str, u16, &str, Option<&str>, tonic::Code)] = &[
    (
        "/tower-timeout",
        504,
        "deadline_exceeded",
        None,
        tonic::Code::DeadlineExceeded,
    ),
    (
        "/tower-load-shed",
        503,
        "overloaded",
        None,
        tonic::Code::Unavailable,
    ),
    (
        "/hyper-refused",
        503,
        "unreachable",
        None,
        tonic::Code::Unavailable,
    ),
    (
        "/io-timed-out",
        504,
        "deadline_exceeded",
        None,
        tonic::Code::DeadlineExceeded,
    ),
    ("/io-reset", 502, "upstream", None, tonic::Code::Unavailable),
    (
        "/tonic-status",
        429,
        "rate_limited",
        None,
        tonic::Code::ResourceExhausted,
    ),
    (
        "/h2-refused",
        503,
        "unreachable",
        None,
        tonic::Code::Unavailable,
    ),
    (
        "/db-timeout",
        504,
        "deadline_exceeded",
        None,
        tonic::Code::DeadlineExceeded,
    ),
    (
        "/quota",
        429,
        "rate_limited",
        Some("7"),
        tonic::Code::ResourceExhausted,
    ),
];

#[tokio::test]
async fn foreign_errors_leave_an_axum_server_with_their_meaning() {
    let addr = http_app(deps().await).await;
    for &(path, status, code, retry_after, _) in CASES {
        let answer = get(addr, path).await;
        assert_eq!(answer.status, status, "{path}: {}", answer.problem);
        assert_eq!(answer.problem["code"], code, "{path}");
        assert_eq!(answer.problem["status"], status, "{path}");
        if let Some(after) = retry_after {
            assert_eq!(answer.retry_after.as_deref(), Some(after), "{path}");
            assert_eq!(answer.problem["retry_after"], after.parse::<u64>().unwrap());
        }
        // The foreign error's own text stays in the log.
        let text = answer.problem.to_string();
        for leak in [
            "orders_pkey",
            "tenant 42",
            "127.0.0.1",
            "tcp connect",
            "timed out",
        ] {
            assert!(!text.contains(leak), "{path}: {leak} leaked: {text}");
        }
    }
}

#[tokio::test]
async fn the_rate_limit_answer_of_another_server_keeps_its_retry_after() {
    let addr = http_app(deps().await).await;
    let answer = get(addr, "/tonic-status").await;
    assert_eq!(answer.status, 429);
    // The other server's limit frees a token within the minute.
    let after: u64 = answer.retry_after.unwrap().parse().unwrap();
    assert!((1..=60).contains(&after), "{after}");
}

#[tokio::test]
async fn foreign_errors_leave_a_tonic_server_with_their_code() {
    let deps = deps().await;
    map_application_errors();
    let fail_as = layer_fn(move |inner: Routes| {
        service_fn(move |req: http::Request<GrpcBody>| {
            let inner = inner.clone();
            async move {
                if let Some(path) = req.headers().get("x-fail") {
                    return Err(fail(path.to_str().unwrap().to_owned(), deps).await);
                }
                inner
                    .oneshot(req)
                    .await
                    .map_err(|e: Infallible| -> BoxError { match e {} })
            }
        })
    });
    let addr = serve_health(
        ServiceBuilder::new()
            .layer(stack::server("orders", Duration::from_secs(10)))
            .layer(fail_as),
    )
    .await;
    let mut health = HealthClient::new(channel(addr).await);
    for &(path, _, _, retry_after, code) in CASES {
        let mut req = tonic::Request::new(HealthCheckRequest::default());
        req.metadata_mut().insert("x-fail", path.parse().unwrap());
        let status = bounded(path, health.check(req)).await.unwrap_err();
        assert_eq!(status.code(), code, "{path}: {status:?}");
        if let Some(after) = retry_after {
            let pushback = status.metadata().get("grpc-retry-pushback-ms");
            let ms = after.parse::<u64>().unwrap() * 1000;
            assert_eq!(
                pushback.map(|v| v.to_str().unwrap()),
                Some(ms.to_string().as_str())
            );
        }
    }
}

#[tokio::test]
async fn a_grpc_dependency_that_cannot_be_reached_is_a_503_naming_it() {
    // The gRPC client stack over a channel to a closed port, inside an axum
    // handler behind the server stack.
    let closed = closed_port().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{closed}"))
        .unwrap()
        .connect_lazy();
    let health = HealthClient::new(
        stack::grpc_client("orders", Duration::from_secs(5))
            .with_dependency("inventory")
            .layer(channel),
    );
    let handler = service_fn(move |_req: http::Request<Body>| {
        let mut health = health.clone();
        async move {
            let status = health
                .check(HealthCheckRequest::default())
                .await
                .unwrap_err();
            // The generated client's status says UNAVAILABLE ...
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            Err::<http::Response<Body>, _>(BoxError::from(status))
        }
    });
    let addr = serve_router(
        Router::new()
            .fallback_service(stack::server("orders", Duration::from_secs(10)).layer(handler)),
    )
    .await;
    // ... and the server answers 503 naming the dependency, not its address.
    let answer = get(addr, "/").await;
    assert_eq!(answer.status, 503, "{}", answer.problem);
    assert_eq!(answer.problem["code"], "unreachable");
    let detail = answer.problem["detail"].as_str().unwrap();
    assert!(detail.contains("(inventory)"), "{detail}");
    assert!(!answer.problem.to_string().contains("127.0.0.1"));
}
