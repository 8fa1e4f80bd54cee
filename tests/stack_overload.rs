//! Overload protection in the recommended stacks, over loopback: the server
//! stack refuses a burst beyond its limit with 503 + `Retry-After`, and the
//! client stacks' adaptive throttle refuses locally once a backend has been
//! refusing work — never replayed by the retry.

mod loopback;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use atscale::hedge::BufferedBody;
use atscale::overload::error::Throttled;
use atscale::prelude::*;
use atscale::stack;
use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use loopback::{bounded, channel, http_client, serve_health, serve_router};
use tokio::sync::{Semaphore, mpsc};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::{Layer, ServiceBuilder, ServiceExt};

/// The server stack with a limit of 2 and room for 1 in its queue, over a
/// handler that reports each request it starts and holds it until the gate
/// gives it a permit.
#[tokio::test]
async fn the_server_stack_refuses_a_burst_beyond_its_limit_with_503_and_retry_after() {
    let gate = Arc::new(Semaphore::new(0));
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let handler = {
        let gate = gate.clone();
        move || {
            let gate = gate.clone();
            let entered_tx = entered_tx.clone();
            async move {
                let _ = entered_tx.send(());
                gate.acquire().await.unwrap().forget();
                "done"
            }
        }
    };
    let overload = OverloadLayer::builder()
        .min_limit(2)
        .initial_limit(2)
        .max_limit(2)
        .queue_capacity(1)
        .build()
        .unwrap();
    let stack = stack::server("burst", Duration::from_secs(10)).with_overload(overload);
    let admission = stack.admission();
    let monitor = stack.monitor().clone();
    let app = Router::new().route("/", get(handler)).layer(stack);
    let addr = serve_router(app).await;

    let http = http_client::<Empty<Bytes>>();
    let get = || {
        let http = http.clone();
        let uri: http::Uri = format!("http://{addr}/").parse().unwrap();
        tokio::spawn(async move { http.get(uri).await.unwrap() })
    };
    // Two are admitted and reach the handler...
    let first = [get(), get()];
    for _ in 0..2 {
        bounded("a request in the handler", entered.recv())
            .await
            .unwrap();
    }
    // ... the third waits in the queue ...
    let queued = get();
    bounded("the third request queued", async {
        while admission.queue_depth() < 1 {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert_eq!((admission.in_flight(), admission.queue_depth()), (2, 1));
    // ... and the fourth is refused at once, never reaching the handler.
    let refused = bounded("the refusal", get()).await.unwrap();
    assert_eq!(refused.status(), 503);
    let after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(after >= 1, "{after}");
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    let body = refused.into_body().collect().await.unwrap().to_bytes();
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["code"], "overloaded");
    assert!(
        entered.try_recv().is_err(),
        "the refused request was served"
    );

    // Released, the admitted and the queued requests are all served.
    gate.add_permits(3);
    for res in first.into_iter().chain([queued]) {
        let res = bounded("an answer", res).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    // Only admitted work reached the heartbeat (it sits inside Overload).
    bounded("the monitor", monitor.wait_finished(3)).await;
    assert_eq!(monitor.counts().started(), 3);
    assert_eq!((admission.in_flight(), admission.queue_depth()), (0, 0));
}

/// An axum backend answering every request with a plain 503 (no problem
/// document, as a proxy or a foreign server would), counting them.
async fn refusing_backend(hits: Arc<AtomicUsize>) -> std::net::SocketAddr {
    let refuse = move || {
        let hits = hits.clone();
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            http::StatusCode::SERVICE_UNAVAILABLE
        }
    };
    serve_router(Router::new().route("/", get(refuse.clone()).post(refuse))).await
}

#[tokio::test]
async fn the_http_client_stack_throttles_locally_once_the_backend_refuses() {
    let hits = Arc::new(AtomicUsize::new(0));
    let backend = refusing_backend(hits.clone()).await;
    let throttle = ThrottleLayer::builder().k(1.0).seed(7).build().unwrap();
    let client = stack::http_client("caller", Duration::from_secs(5))
        .with_dependency("backend")
        .with_throttle(throttle.clone())
        .layer(http_client::<Empty<Bytes>>());
    let mut throttled = 0;
    let calls = 40;
    for _ in 0..calls {
        let req = http::Request::get(format!("http://{backend}/"))
            .body(Empty::new())
            .unwrap();
        let err = bounded("a call", client.clone().oneshot(req))
            .await
            .unwrap_err();
        // Refused by the backend or here: 503 overloaded either way.
        assert_eq!(err.kind(), Kind::Overloaded, "{err}");
        if atscale::core::find::<Throttled>(&err).is_some() {
            throttled += 1;
        }
    }
    // Every attempt was counted, none accepted; the throttled ones never
    // reached the backend.
    assert_eq!(throttle.counts(), (calls, 0));
    assert!(throttled > calls / 2, "{throttled} of {calls} throttled");
    assert_eq!(hits.load(Ordering::SeqCst) as u64, calls - throttled);
}

#[tokio::test]
async fn the_retry_never_replays_a_local_throttle_refusal() {
    let hits = Arc::new(AtomicUsize::new(0));
    let backend = refusing_backend(hits.clone()).await;
    let throttle = ThrottleLayer::builder().k(1.0).seed(11).build().unwrap();
    let policy = RetryPolicy::builder()
        .max_attempts(5)
        .initial_backoff(Duration::from_millis(1))
        .max_backoff(Duration::from_millis(2))
        .build()
        .unwrap();
    let stack = stack::http_client("caller", Duration::from_secs(5))
        .with_retry(RetryLayer::new(policy))
        .with_throttle(throttle.clone());
    let monitor = stack.monitor().clone();
    // Under a retry the client sends the buffered body.
    let client = stack.layer(http_client::<BufferedBody<Empty<Bytes>>>());
    let calls = 30;
    let mut ended_throttled = 0;
    for _ in 0..calls {
        let req = http::Request::get(format!("http://{backend}/"))
            .body(Empty::new())
            .unwrap();
        let err = bounded("a call", client.clone().oneshot(req))
            .await
            .unwrap_err();
        if atscale::core::find::<Throttled>(&err).is_some() {
            ended_throttled += 1;
        }
    }
    let (attempts, _) = throttle.counts();
    let throttled_attempts = attempts - hits.load(Ordering::SeqCst) as u64;
    // The backend's refusals were retried (more attempts than calls)...
    assert!(attempts > calls, "{attempts} attempts for {calls} calls");
    assert!(ended_throttled > 0);
    // ... but a throttled attempt always ended its call: none was retried.
    assert_eq!(throttled_attempts, ended_throttled);
    assert_eq!(monitor.counts().started(), attempts);
}

#[tokio::test]
async fn the_grpc_client_stack_throttles_a_server_answering_unavailable_overloaded() {
    // A tonic server whose stack refuses everything as overloaded: the
    // client sees UNAVAILABLE with reason OVERLOADED.
    let served = Arc::new(AtomicUsize::new(0));
    let refuse = {
        let served = served.clone();
        tower::layer::layer_fn(move |_inner: tonic::service::Routes| {
            let served = served.clone();
            tower::service_fn(move |_req: http::Request<tonic::body::Body>| {
                served.fetch_add(1, Ordering::SeqCst);
                async {
                    Err::<http::Response<tonic::body::Body>, BoxError>(
                        atscale::core::Overloaded::new().into(),
                    )
                }
            })
        })
    };
    let addr = serve_health(
        ServiceBuilder::new()
            .layer(stack::server("refusing", Duration::from_secs(2)))
            .layer(refuse),
    )
    .await;
    let throttle = ThrottleLayer::builder().k(1.0).seed(3).build().unwrap();
    let client = stack::client("caller", Duration::from_secs(2)).with_throttle(throttle.clone());
    let mut health = HealthClient::new(client.layer(channel(addr).await));
    let calls = 30;
    let mut throttled = 0;
    for _ in 0..calls {
        let status = bounded(
            "a call",
            health.check(HealthCheckRequest {
                service: String::new(),
            }),
        )
        .await
        .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        let chain = std::error::Error::source(&status).unwrap();
        assert_eq!(Kind::of(chain), Kind::Overloaded);
        if atscale::core::find::<Throttled>(chain).is_some() {
            throttled += 1;
        }
    }
    assert_eq!(throttle.counts(), (calls, 0));
    assert!(throttled > calls / 2, "{throttled} of {calls} throttled");
    assert_eq!(served.load(Ordering::SeqCst) as u64, calls - throttled);
}
