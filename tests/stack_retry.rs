//! Retries in the recommended client stacks, over loopback: a tonic client
//! recovers from a flapping backend (with a retry policy, and with a
//! service config), the HTTP client retries a GET on a plain 503 but not a
//! POST, and both stacks' retries and hedges stop when their A6 throttle is
//! drained.

mod loopback;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atscale::hedge::BufferedBody;
use atscale::prelude::*;
use atscale::stack;
use axum::Router;
use axum::routing::any;
use bytes::Bytes;
use http_body_util::Empty;
use loopback::{bounded, channel, http_client, serve_health, serve_router};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as Wire;
use tonic_health::pb::health_client::HealthClient;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

/// What a test backend does, shared with the test: it fails the next
/// `fail_next` requests (503 / `UNAVAILABLE`), takes its time per request when
/// `slow` (300 ms), and records every request it sees.
#[derive(Default)]
struct Backend {
    fail_next: AtomicUsize,
    slow: AtomicBool,
    hits: AtomicUsize,
    /// `grpc-previous-rpc-attempts` of each request, in order.
    previous: Mutex<Vec<Option<String>>>,
}

impl Backend {
    /// Records a request; whether to fail it.
    async fn arrive(&self, headers: &http::HeaderMap) -> bool {
        self.hits.fetch_add(1, Ordering::SeqCst);
        let previous = headers
            .get("grpc-previous-rpc-attempts")
            .map(|v| v.to_str().unwrap().to_owned());
        self.previous.lock().unwrap().push(previous);
        if self.slow.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        self.fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// tonic-health behind the server stack, answering `UNAVAILABLE`
/// (trailers-only, as a restarting server behind a proxy would) when the
/// backend says to fail.
async fn grpc_backend(backend: Arc<Backend>) -> std::net::SocketAddr {
    let flapping = tower::layer::layer_fn(move |routes: tonic::service::Routes| {
        let backend = backend.clone();
        tower::service_fn(move |req: http::Request<tonic::body::Body>| {
            let backend = backend.clone();
            let mut routes = routes.clone();
            async move {
                if backend.arrive(req.headers()).await {
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
    });
    serve_health(
        ServiceBuilder::new()
            .layer(stack::server("flapping", Duration::from_secs(5)))
            .layer(flapping),
    )
    .await
}

/// An axum backend answering a plain 503 (no problem document, no
/// `Retry-After`) when it says to fail, else 200 "ok".
async fn http_backend(backend: Arc<Backend>) -> std::net::SocketAddr {
    let handler = move |headers: http::HeaderMap| {
        let backend = backend.clone();
        async move {
            if backend.arrive(&headers).await {
                (http::StatusCode::SERVICE_UNAVAILABLE, "")
            } else {
                (http::StatusCode::OK, "ok")
            }
        }
    };
    serve_router(Router::new().route("/", any(handler))).await
}

fn grpc_policy() -> RetryPolicy {
    RetryPolicy::builder()
        .max_attempts(3)
        .initial_backoff(Duration::from_millis(10))
        .max_backoff(Duration::from_millis(20))
        .non_idempotent(true) // every gRPC call is a POST; a health check is safe to repeat
        .build()
        .unwrap()
}

async fn check<T>(client: &mut HealthClient<T>) -> Result<Wire, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<BoxError>,
    T::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<BoxError> + Send,
{
    let req = HealthCheckRequest {
        service: String::new(),
    };
    let res = bounded("a health check", client.check(req)).await?;
    Ok(res.into_inner().status())
}

#[tokio::test]
async fn a_grpc_client_stack_with_a_retry_policy_recovers_from_a_flapping_backend() {
    let backend = Arc::new(Backend::default());
    let addr = grpc_backend(backend.clone()).await;

    // Without a retry, the first refusal is the caller's.
    let plain = stack::client("caller", Duration::from_secs(2));
    let mut health = HealthClient::new(plain.layer(channel(addr).await));
    backend.fail_next.store(2, Ordering::SeqCst);
    let status = check(&mut health).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);

    // With one, every call succeeds on its third attempt.
    let retrying =
        stack::client("caller", Duration::from_secs(2)).with_retry(RetryLayer::new(grpc_policy()));
    let monitor = retrying.monitor().clone();
    let mut health = HealthClient::new(retrying.layer(channel(addr).await));
    backend.previous.lock().unwrap().clear();
    let before = backend.hits();
    for _ in 0..4 {
        backend.fail_next.store(2, Ordering::SeqCst);
        assert_eq!(check(&mut health).await.unwrap(), Wire::Serving);
    }
    assert_eq!(backend.hits() - before, 12);
    // Each retry said which attempt it was (gRFC A6).
    let previous = backend.previous.lock().unwrap().clone();
    let one_call = [None, Some("1".to_owned()), Some("2".to_owned())];
    let expected: Vec<_> = (0..4).flat_map(|_| one_call.clone()).collect();
    assert_eq!(previous, expected);
    // The heartbeat saw each attempt (it sits inside the retry).
    bounded("the monitor", monitor.wait_finished(12)).await;
    assert_eq!((monitor.counts().ok(), monitor.counts().error()), (4, 8));
}

#[tokio::test]
async fn a_grpc_client_stack_with_a_service_config_recovers_from_a_flapping_backend() {
    let backend = Arc::new(Backend::default());
    let addr = grpc_backend(backend.clone()).await;
    let config: ServiceConfig = r#"{
        "methodConfig": [{
            "name": [{"service": "grpc.health.v1.Health", "method": "Check"}],
            "timeout": "1s",
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.01s",
                "maxBackoff": "0.02s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"]
            }
        }],
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.5}
    }"#
    .parse()
    .unwrap();
    let configured = stack::client("caller", Duration::from_secs(2)).with_service_config(config);
    let throttle = configured.method_config().throttle().unwrap().clone();
    let mut health = HealthClient::new(configured.layer(channel(addr).await));
    backend.fail_next.store(2, Ordering::SeqCst);
    assert_eq!(check(&mut health).await.unwrap(), Wire::Serving);
    assert_eq!(backend.hits(), 3);
    // Two failures took a token each, the success gave half of one back.
    assert_eq!(throttle.tokens(), 8.5);
}

#[tokio::test]
async fn the_http_client_stack_retries_a_get_on_a_plain_503_and_not_a_post() {
    let backend = Arc::new(Backend::default());
    let addr = http_backend(backend.clone()).await;
    let policy = RetryPolicy::builder()
        .max_attempts(3)
        .initial_backoff(Duration::from_millis(10))
        .max_backoff(Duration::from_millis(20))
        .build()
        .unwrap();
    let client = stack::http_client("caller", Duration::from_secs(2))
        .with_retry(RetryLayer::new(policy.clone()))
        .layer(http_client::<BufferedBody<Empty<Bytes>>>());
    let call = |method: http::Method| {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("http://{addr}/"))
            .body(Empty::new())
            .unwrap();
        bounded("a call", client.clone().oneshot(req))
    };

    backend.fail_next.store(1, Ordering::SeqCst);
    let res = call(http::Method::GET).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(backend.hits(), 2);

    backend.fail_next.store(1, Ordering::SeqCst);
    let err = call(http::Method::POST).await.unwrap_err();
    // The backend's plain 503, read as overloaded, sent once.
    assert_eq!(err.kind(), Kind::Overloaded);
    assert_eq!(err.status(), 503);
    assert_eq!(backend.hits(), 3);

    // A POST is retried when both the policy and the buffer opt in.
    let opted_in = stack::http_client("caller", Duration::from_secs(2))
        .with_retry_and_buffer(
            RetryLayer::new(
                RetryPolicy::builder()
                    .initial_backoff(Duration::from_millis(10))
                    .non_idempotent(true)
                    .build()
                    .unwrap(),
            ),
            BufferBodyLayer::new(1024).non_idempotent(true),
        )
        .layer(http_client::<BufferedBody<Empty<Bytes>>>());
    backend.fail_next.store(1, Ordering::SeqCst);
    let req = http::Request::post(format!("http://{addr}/"))
        .body(Empty::new())
        .unwrap();
    let res = bounded("a call", opted_in.oneshot(req)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(backend.hits(), 5);
}

/// A hedge that sends its backup after 50 ms, within no budget; built
/// without a throttle: it takes the stack's.
fn hedge() -> HedgeLayer {
    HedgeLayer::builder()
        .delay(Delay::fixed(Duration::from_millis(50)))
        .budget(Budget::unlimited())
        .non_idempotent(true)
        .build()
        .unwrap()
}

fn drain(throttle: &RetryThrottle) {
    while throttle.allows() {
        throttle.failure();
    }
}

#[tokio::test]
async fn the_grpc_stacks_retries_and_hedges_stop_when_the_a6_throttle_is_drained() {
    let backend = Arc::new(Backend::default());
    let addr = grpc_backend(backend.clone()).await;
    let throttle = RetryThrottle::new(10, 0.1).unwrap();
    let stack = stack::client("caller", Duration::from_secs(2))
        .with_retry(RetryLayer::new(grpc_policy()))
        // The throttle set after the hedge: the hedge takes it then.
        .with_hedge(hedge())
        .with_retry_throttle(throttle.clone());
    let mut health = HealthClient::new(stack.layer(channel(addr).await));

    // While the throttle has tokens: a slow call is hedged, a failing one
    // retried.
    backend.slow.store(true, Ordering::SeqCst);
    assert_eq!(check(&mut health).await.unwrap(), Wire::Serving);
    assert_eq!(stack.hedge_stats().hedges_sent(), 1);
    assert_eq!(backend.hits(), 2);
    backend.slow.store(false, Ordering::SeqCst);
    backend.fail_next.store(usize::MAX, Ordering::SeqCst);
    check(&mut health).await.unwrap_err();
    assert_eq!(backend.hits(), 5);

    // Drained: one attempt per call, no hedge, no retry.
    drain(&throttle);
    let status = check(&mut health).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(backend.hits(), 6);
    backend.fail_next.store(0, Ordering::SeqCst);
    backend.slow.store(true, Ordering::SeqCst);
    assert_eq!(check(&mut health).await.unwrap(), Wire::Serving);
    assert_eq!(backend.hits(), 7);
    assert_eq!(stack.hedge_stats().hedges_sent(), 1);
}

#[tokio::test]
async fn the_http_stacks_retries_and_hedges_stop_when_the_a6_throttle_is_drained() {
    let backend = Arc::new(Backend::default());
    let addr = http_backend(backend.clone()).await;
    let throttle = RetryThrottle::new(10, 0.1).unwrap();
    let policy = RetryPolicy::builder()
        .max_attempts(3)
        .initial_backoff(Duration::from_millis(10))
        .max_backoff(Duration::from_millis(20))
        .build()
        .unwrap();
    let stack = stack::http_client("caller", Duration::from_secs(2))
        .with_retry(RetryLayer::new(policy))
        // The throttle set before the hedge: the hedge takes it when set.
        .with_retry_throttle(throttle.clone())
        .with_hedge(hedge());
    // One buffer, the retry's, serves the hedge too.
    let client = stack.layer(http_client::<BufferedBody<Empty<Bytes>>>());
    let get = || {
        let req = http::Request::get(format!("http://{addr}/"))
            .body(Empty::new())
            .unwrap();
        bounded("a call", client.clone().oneshot(req))
    };

    backend.slow.store(true, Ordering::SeqCst);
    assert_eq!(get().await.unwrap().status(), 200);
    assert_eq!(stack.hedge_stats().hedges_sent(), 1);
    assert_eq!(backend.hits(), 2);
    backend.slow.store(false, Ordering::SeqCst);
    backend.fail_next.store(usize::MAX, Ordering::SeqCst);
    assert_eq!(get().await.unwrap_err().status(), 503);
    assert_eq!(backend.hits(), 5);

    drain(&throttle);
    assert_eq!(get().await.unwrap_err().status(), 503);
    assert_eq!(backend.hits(), 6);
    backend.fail_next.store(0, Ordering::SeqCst);
    backend.slow.store(true, Ordering::SeqCst);
    assert_eq!(get().await.unwrap().status(), 200);
    assert_eq!(backend.hits(), 7);
    assert_eq!(stack.hedge_stats().hedges_sent(), 1);
}
