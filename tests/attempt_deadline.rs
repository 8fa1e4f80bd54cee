//! Every attempt after the first carries the deadline left when it is sent:
//! a retry after its backoff and a hedge after its delay rewrite the
//! `grpc-timeout` and `x-deadline-ms` the client deadline layer wrote at the
//! start of the call (never adding one it did not write). On a paused clock
//! with exact values, then over loopback through the HTTP and tonic client
//! stacks.

mod loopback;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use atscale::deadline::codec::{encode_grpc_timeout, encode_millis, parse_grpc_timeout};
use atscale::prelude::*;
use atscale::stack;
use axum::Router;
use axum::routing::any;
use bytes::Bytes;
use http::HeaderName;
use http_body_util::Empty;
use loopback::{bounded, channel, http_client, serve_health, serve_router};
use tokio::time::Instant;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};

const X_DEADLINE_MS: HeaderName = HeaderName::from_static("x-deadline-ms");

/// What one attempt carried: when it arrived (tokio's clock), its
/// `grpc-timeout` and `x-deadline-ms`.
#[derive(Clone, Debug)]
struct Sent {
    at: Instant,
    grpc_timeout: Option<String>,
    millis: Option<String>,
}

type Log = Arc<Mutex<Vec<Sent>>>;

fn record(log: &Log, headers: &http::HeaderMap) -> usize {
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    let mut log = log.lock().unwrap();
    log.push(Sent {
        at: Instant::now(),
        grpc_timeout: header("grpc-timeout"),
        millis: header("x-deadline-ms"),
    });
    log.len()
}

fn attempts(log: &Log) -> Vec<Sent> {
    log.lock().unwrap().clone()
}

/// A trailers-only gRPC answer: `UNAVAILABLE`, with `grpc-retry-pushback-ms`
/// when `pushback` (the retry then waits exactly that).
fn unavailable(pushback: Option<&'static str>) -> http::Response<()> {
    let mut res = http::Response::builder().header("grpc-status", "14");
    if let Some(ms) = pushback {
        res = res.header("grpc-retry-pushback-ms", ms);
    }
    res.body(()).unwrap()
}

fn ok() -> http::Response<()> {
    http::Response::builder()
        .header("grpc-status", "0")
        .body(())
        .unwrap()
}

/// A backend on the paused clock: the first attempt is answered
/// `UNAVAILABLE` with a 100 ms pushback, the second `UNAVAILABLE` (so the
/// third waits a jittered 100 ms backoff), the third OK.
fn flapping(
    log: &Log,
) -> impl tower::Service<http::Request<()>, Response = http::Response<()>, Error = BoxError> + Clone
{
    let log = log.clone();
    service_fn(move |req: http::Request<()>| {
        let n = record(&log, req.headers());
        async move {
            Ok::<_, BoxError>(match n {
                1 => unavailable(Some("100")),
                2 => unavailable(None),
                _ => ok(),
            })
        }
    })
}

fn retry() -> RetryLayer {
    RetryLayer::new(
        RetryPolicy::builder()
            .max_attempts(3)
            .initial_backoff(Duration::from_millis(100))
            .jitter_seed(7)
            .build()
            .unwrap(),
    )
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_its_backoff_carries_what_is_left_of_the_deadline() {
    let log = Log::default();
    let client = ServiceBuilder::new()
        .layer(DeadlineLayer::client(Duration::from_secs(1)).with_header(X_DEADLINE_MS))
        .layer(retry())
        .service(flapping(&log));
    let deadline = Instant::now() + Duration::from_secs(1);

    let res = bounded("a retried call", client.oneshot(http::Request::new(())))
        .await
        .unwrap();
    assert_eq!(res.headers()["grpc-status"], "0");
    let sent = attempts(&log);
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert_eq!(sent[0].grpc_timeout.as_deref(), Some("1000000u"));
    assert_eq!(sent[0].millis.as_deref(), Some("1000"));
    // After the 100 ms pushback: 900 ms left, not the 1 s of the first send.
    assert_eq!(sent[1].at - sent[0].at, Duration::from_millis(100));
    assert_eq!(sent[1].grpc_timeout.as_deref(), Some("900000u"));
    assert_eq!(sent[1].millis.as_deref(), Some("900"));
    // After a jittered backoff: exactly what is left then, rounded up.
    let left = deadline - sent[2].at;
    assert!(left < Duration::from_millis(900), "{left:?}");
    assert_eq!(
        sent[2].grpc_timeout.as_deref(),
        Some(encode_grpc_timeout(left).to_str().unwrap())
    );
    assert_eq!(
        sent[2].millis.as_deref(),
        Some(encode_millis(left).to_str().unwrap())
    );
}

#[tokio::test(start_paused = true)]
async fn a_hedge_after_its_delay_carries_what_is_left_of_the_deadline() {
    let log = Log::default();
    let backend = {
        let log = log.clone();
        service_fn(move |req: http::Request<()>| {
            let n = record(&log, req.headers());
            async move {
                if n == 1 {
                    // the slow first attempt, which the hedge beats
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Ok::<_, BoxError>(ok())
            }
        })
    };
    let hedge = HedgeLayer::builder()
        .delay(Delay::fixed(Duration::from_millis(50)))
        .budget(Budget::unlimited())
        .build()
        .unwrap();
    let client = ServiceBuilder::new()
        .layer(DeadlineLayer::client(Duration::from_secs(1)).with_header(X_DEADLINE_MS))
        .layer(hedge)
        .service(backend);

    bounded("a hedged call", client.oneshot(http::Request::new(())))
        .await
        .unwrap();
    let sent = attempts(&log);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0].grpc_timeout.as_deref(), Some("1000000u"));
    assert_eq!(sent[0].millis.as_deref(), Some("1000"));
    assert_eq!(sent[1].at - sent[0].at, Duration::from_millis(50));
    assert_eq!(sent[1].grpc_timeout.as_deref(), Some("950000u"));
    assert_eq!(sent[1].millis.as_deref(), Some("950"));
}

#[tokio::test(start_paused = true)]
async fn a_header_the_deadline_layer_did_not_write_is_never_added() {
    // Only x-deadline-ms is written: retries rewrite it and add no grpc-timeout.
    let log = Log::default();
    let client = ServiceBuilder::new()
        .layer(
            DeadlineLayer::client(Duration::from_secs(1))
                .without_grpc_timeout()
                .with_header(X_DEADLINE_MS),
        )
        .layer(retry())
        .service(flapping(&log));
    bounded("a retried call", client.oneshot(http::Request::new(())))
        .await
        .unwrap();
    let sent = attempts(&log);
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[1].millis.as_deref(), Some("900"));
    assert!(sent.iter().all(|s| s.grpc_timeout.is_none()), "{sent:?}");

    // An in-process deadline writes nothing: neither the retries nor the
    // hedge add a header, although every attempt's context has a deadline.
    let log = Log::default();
    let hedge = HedgeLayer::builder()
        .delay(Delay::fixed(Duration::ZERO))
        .budget(Budget::unlimited())
        .build()
        .unwrap();
    let client = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(1)))
        .layer(retry())
        .layer(hedge)
        .service(flapping(&log));
    bounded(
        "a retried, hedged call",
        client.oneshot(http::Request::new(())),
    )
    .await
    .unwrap();
    let sent = attempts(&log);
    assert!(sent.len() >= 3, "{sent:?}");
    assert!(
        sent.iter()
            .all(|s| s.grpc_timeout.is_none() && s.millis.is_none()),
        "{sent:?}"
    );
}

/// An axum backend that records each request's deadline headers; the first
/// answers a plain 503 when `fail_first`, or waits for the second (the
/// hedge) to arrive before answering.
async fn loopback_backend(log: Log, fail_first: bool) -> std::net::SocketAddr {
    let hedge_arrived = Arc::new(tokio::sync::Notify::new());
    let handler = move |headers: http::HeaderMap| {
        let (log, hedge_arrived) = (log.clone(), hedge_arrived.clone());
        async move {
            let n = record(&log, &headers);
            match (n, fail_first) {
                (1, true) => return (http::StatusCode::SERVICE_UNAVAILABLE, ""),
                (1, false) => {
                    // Bounded: a hedge that never comes fails the test on its count.
                    let _ = tokio::time::timeout(Duration::from_secs(5), hedge_arrived.notified())
                        .await;
                }
                (_, false) => hedge_arrived.notify_one(),
                _ => {}
            }
            (http::StatusCode::OK, "ok")
        }
    };
    serve_router(Router::new().route("/", any(handler))).await
}

fn millis(value: &Option<String>) -> u64 {
    value.as_deref().unwrap().parse().unwrap()
}

fn grpc(value: &Option<String>) -> Duration {
    parse_grpc_timeout(value.as_deref().unwrap().as_bytes()).unwrap()
}

#[tokio::test]
async fn over_loopback_the_http_stacks_retry_and_hedge_send_the_deadline_left() {
    // A retry after a backoff of at least 80 ms (100 ms, jittered by 0.8..1.2).
    let log = Log::default();
    let addr = loopback_backend(log.clone(), true).await;
    let policy = RetryPolicy::builder()
        .max_attempts(2)
        .initial_backoff(Duration::from_millis(100))
        .build()
        .unwrap();
    let client = stack::http_client("caller", Duration::from_secs(5))
        .with_grpc_timeout()
        .with_retry(RetryLayer::new(policy))
        .layer(http_client::<atscale::hedge::BufferedBody<Empty<Bytes>>>());
    let req = http::Request::get(format!("http://{addr}/"))
        .body(Empty::new())
        .unwrap();
    let res = bounded("a retried call", client.oneshot(req))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let sent = attempts(&log);
    assert_eq!(sent.len(), 2, "{sent:?}");
    // Rounded up to whole ms, sent at least 80 ms later.
    assert!(
        millis(&sent[1].millis) + 79 <= millis(&sent[0].millis),
        "{sent:?}"
    );
    assert!(
        grpc(&sent[1].grpc_timeout) + Duration::from_millis(79) <= grpc(&sent[0].grpc_timeout),
        "{sent:?}"
    );

    // A hedge sent at least 50 ms after the first attempt.
    let log = Log::default();
    let addr = loopback_backend(log.clone(), false).await;
    let hedge = HedgeLayer::builder()
        .delay(Delay::fixed(Duration::from_millis(50)))
        .budget(Budget::unlimited())
        .build()
        .unwrap();
    let client = stack::http_client("caller", Duration::from_secs(5))
        .with_hedge(hedge)
        .layer(http_client::<atscale::hedge::BufferedBody<Empty<Bytes>>>());
    let req = http::Request::get(format!("http://{addr}/"))
        .body(Empty::new())
        .unwrap();
    let res = bounded("a hedged call", client.oneshot(req)).await.unwrap();
    assert_eq!(res.status(), 200);
    let sent = attempts(&log);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert!(
        millis(&sent[1].millis) + 49 <= millis(&sent[0].millis),
        "{sent:?}"
    );
    assert!(sent.iter().all(|s| s.grpc_timeout.is_none()), "{sent:?}");
}

#[tokio::test]
async fn over_loopback_the_tonic_stacks_retry_sends_the_grpc_timeout_left() {
    // tonic-health whose first call is refused (trailers-only UNAVAILABLE),
    // recording every call's grpc-timeout as it reaches the server.
    let log = Log::default();
    let recording = {
        let log = log.clone();
        tower::layer::layer_fn(move |routes: tonic::service::Routes| {
            let log = log.clone();
            service_fn(move |req: http::Request<tonic::body::Body>| {
                let n = record(&log, req.headers());
                let mut routes = routes.clone();
                async move {
                    if n == 1 {
                        let status = tonic::Status::unavailable("restarting");
                        return Ok(status.into_http::<tonic::body::Body>());
                    }
                    let res = ServiceExt::<http::Request<tonic::body::Body>>::ready(&mut routes)
                        .await?
                        .call(req)
                        .await?;
                    Ok::<_, BoxError>(res)
                }
            })
        })
    };
    let addr = serve_health(recording).await;
    let policy = RetryPolicy::builder()
        .max_attempts(2)
        .initial_backoff(Duration::from_millis(100))
        .non_idempotent(true) // every gRPC call is a POST; a health check is safe to repeat
        .build()
        .unwrap();
    let client =
        stack::client("caller", Duration::from_secs(5)).with_retry(RetryLayer::new(policy));
    let mut health = HealthClient::new(client.layer(channel(addr).await));
    let req = HealthCheckRequest {
        service: String::new(),
    };
    bounded("a retried call", health.check(req)).await.unwrap();
    let sent = attempts(&log);
    assert_eq!(sent.len(), 2, "{sent:?}");
    // Sent after a backoff of at least 80 ms (100 ms jittered by 0.8..1.2).
    assert!(
        grpc(&sent[1].grpc_timeout) + Duration::from_millis(79) <= grpc(&sent[0].grpc_timeout),
        "{sent:?}"
    );
    assert!(sent.iter().all(|s| s.millis.is_none()), "{sent:?}");
}
