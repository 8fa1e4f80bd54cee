//! The recommended stacks where users put them: `axum::Router::layer`,
//! `tonic::transport::Server::builder().layer`, and a tonic generated
//! client (tonic-health's `HealthClient`) over a layered `Channel`, alone
//! and across replicas. Each is also served and called once on loopback,
//! so the types are not only accepted but work.

mod loopback;

use std::net::SocketAddr;
use std::time::Duration;

use atscale::ServiceBuilderExt;
use atscale::prelude::*;
use atscale::stack::{self, ClientStack, ServerStack};
use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use loopback::{channel, serve_health};
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as Wire;
use tonic_health::pb::health_client::HealthClient;
use tower::{Layer, ServiceBuilder};

fn assert_layer<T: Clone + std::fmt::Debug + Send + Sync + 'static>(_: &T) {}

#[test]
fn the_stacks_are_clone_debug_send_sync() {
    let server = stack::server("svc", Duration::from_secs(1));
    assert_layer(&server);
    let limited = server.with_rate_limit(RateLimitLayer::new(Limiter::new(
        Limit::per_second(1).unwrap(),
    )));
    assert_layer(&limited);
    let client = stack::client("svc", Duration::from_secs(1));
    assert_layer(&client);
    let hedged = client.with_hedge(HedgeLayer::fixed(Duration::from_millis(5)));
    assert_layer(&hedged);
    // The overload, retry and throttle slots.
    assert_layer(&stack::server("svc", Duration::from_secs(1)).without_overload());
    let policy = RetryPolicy::builder().non_idempotent(true).build().unwrap();
    let throttle = RetryThrottle::new(10, 0.1).unwrap();
    let full = hedged
        .with_retry(RetryLayer::new(policy.clone()))
        .with_retry_throttle(throttle.clone())
        .with_throttle(ThrottleLayer::new());
    assert_layer(&full);
    let config: ServiceConfig =
        r#"{"methodConfig": [{"name": [{"service": "grpc.health.v1.Health"}],
        "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.1s",
        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}],
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}}"#
            .parse()
            .unwrap();
    assert_layer(&stack::client("svc", Duration::from_secs(1)).with_service_config(config));
    let http = stack::http_client("svc", Duration::from_secs(1))
        .with_hedge(HedgeLayer::fixed(Duration::from_millis(5)))
        .with_retry(RetryLayer::new(policy))
        .with_retry_throttle(throttle)
        .with_throttle(ThrottleLayer::new());
    assert_layer(&http);
}

/// The size of the futures `svc` returns for `R`.
fn future_size<S: tower::Service<R>, R>(_: &S) -> usize {
    std::mem::size_of::<S::Future>()
}

#[test]
fn the_server_stack_boxes_the_handlers_future_once_instead_of_carrying_it() {
    let small = tower::service_fn(|_req: http::Request<String>| async {
        Ok::<_, BoxError>(http::Response::new(String::new()))
    });
    let large = tower::service_fn(|_req: http::Request<String>| async {
        // Held across an await: part of the future.
        let scratch = [0u8; 4096];
        tokio::task::yield_now().await;
        std::hint::black_box(&scratch);
        Ok::<_, BoxError>(http::Response::new(String::new()))
    });
    assert!(future_size::<_, http::Request<String>>(&large) >= 4096);
    let stack = stack::server("svc", Duration::from_secs(1)).with_rate_limit(RateLimitLayer::new(
        Limiter::new(Limit::per_second(1).unwrap()),
    ));
    // The stack's layers move a pointer to the handler's future, whatever its size.
    assert_eq!(
        future_size::<_, http::Request<String>>(&stack.layer(large)),
        future_size::<_, http::Request<String>>(&stack.layer(small)),
    );
}

#[test]
fn the_client_stack_boxes_its_retry_once_instead_of_carrying_its_attempts() {
    type Call = http::Request<tonic::body::Body>;
    let small = tower::service_fn(|_req: Call| async {
        Ok::<_, BoxError>(http::Response::new(tonic::body::Body::empty()))
    });
    let large = tower::service_fn(|_req: Call| async {
        // Held across an await: part of the future.
        let scratch = [0u8; 4096];
        tokio::task::yield_now().await;
        std::hint::black_box(&scratch);
        Ok::<_, BoxError>(http::Response::new(tonic::body::Body::empty()))
    });
    let policy = RetryPolicy::builder().max_attempts(3).build().unwrap();
    let stack = stack::client("svc", Duration::from_secs(1)).with_retry(RetryLayer::new(policy));
    // The retry's future holds its attempt's: boxed, the layers around it
    // move a pointer, whatever the transport's future.
    assert_eq!(
        future_size::<_, Call>(&stack.layer(large)),
        future_size::<_, Call>(&stack.layer(small)),
    );
}

#[tokio::test]
async fn axum_router_layer_takes_the_server_stack() {
    let one_per_minute = Limiter::new(Limit::per_minute(1).unwrap());
    let server = ServerStack::new("axum-compile", Duration::from_secs(2))
        .with_rate_limit(RateLimitLayer::reject(one_per_minute));
    let monitor = server.monitor().clone();
    // No HandleErrorLayer: the stack's error type is Infallible.
    let app: Router = Router::new()
        .route("/", get(|| async { "hello" }))
        .layer(server);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let http = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let get = || http.get(format!("http://{addr}/").parse().unwrap());
    let ok = get().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.into_body().collect().await.unwrap().to_bytes(), "hello");
    let limited = get().await.unwrap();
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));
    assert_eq!(
        limited.headers()["content-type"],
        "application/problem+json"
    );
    // The heartbeat sits outside the rate limit: it saw both requests, the
    // second refused (not a failure of the service).
    monitor.wait_finished(2).await;
    let counts = monitor.counts();
    assert_eq!((counts.ok(), counts.refused(), counts.error()), (1, 1, 0));
}

#[tokio::test]
async fn axum_router_layer_takes_a_hand_built_stack_in_the_recommended_order() {
    let monitor = Monitor::new();
    let app: Router = Router::new().route("/", get(|| async { "hi" })).layer(
        ServiceBuilder::new()
            .enrich_errors(ErrorEnrichLayer::new("hand-built"))
            .deadline(DeadlineLayer::server(Duration::from_secs(1)))
            .heartbeat(&monitor)
            .multi_rate_limit(RateLimitLayer::new(Limiter::new(
                Limit::per_second(10).unwrap(),
            ))),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let http = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let res = http
        .get(format!("http://{addr}/").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    monitor.wait_finished(1).await;
}

/// A tonic-health server behind the recommended server stack.
async fn health_server(stack: ServerStack) -> SocketAddr {
    serve_health(stack).await
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
    Ok(client.check(req).await?.into_inner().status())
}

#[tokio::test]
async fn tonic_server_and_generated_client_take_the_stacks() {
    let server = stack::server("health", Duration::from_secs(2));
    let served = server.monitor().clone();
    let addr = health_server(server).await;

    let client = stack::client("caller", Duration::from_secs(1));
    let calls = client.monitor().clone();
    let mut health = HealthClient::new(client.layer(channel(addr).await));
    assert_eq!(check(&mut health).await.unwrap(), Wire::Serving);
    served.wait_finished(1).await;
    calls.wait_finished(1).await;
    assert_eq!(served.counts().ok(), 1);
}

#[tokio::test]
async fn a_generated_client_takes_the_hedged_stack_alone_and_across_replicas() {
    let a = health_server(stack::server("a", Duration::from_secs(2))).await;
    let b = health_server(stack::server("b", Duration::from_secs(2))).await;
    let client = ClientStack::new("caller", Duration::from_secs(1))
        .with_rate_limit(RateLimitLayer::new(Limiter::new(
            Limit::per_second(100).unwrap(),
        )))
        .with_hedge(
            HedgeLayer::builder()
                .delay(atscale::hedge::Delay::fixed(Duration::from_millis(200)))
                .non_idempotent(true)
                .build()
                .unwrap(),
        );

    let mut one = HealthClient::new(client.layer(channel(a).await));
    assert_eq!(check(&mut one).await.unwrap(), Wire::Serving);

    let replicas = client
        .replicas(vec![channel(a).await, channel(b).await])
        .unwrap();
    let mut both = HealthClient::new(replicas);
    for _ in 0..2 {
        assert_eq!(check(&mut both).await.unwrap(), Wire::Serving);
    }
    client.monitor().wait_finished(3).await;
}

#[tokio::test]
async fn a_generated_client_takes_the_retrying_stacks_alone_and_across_replicas() {
    let server = stack::server("a", Duration::from_secs(2))
        .with_overload(OverloadLayer::builder().initial_limit(4).build().unwrap());
    let a = serve_health(server).await;
    let b = serve_health(stack::server("b", Duration::from_secs(2)).without_overload()).await;
    let throttle = RetryThrottle::new(10, 0.1).unwrap();
    let policy = RetryPolicy::builder().non_idempotent(true).build().unwrap();
    let client = ClientStack::new("caller", Duration::from_secs(1))
        .with_rate_limit(RateLimitLayer::new(Limiter::new(
            Limit::per_second(100).unwrap(),
        )))
        .with_retry(RetryLayer::new(policy))
        .with_hedge(
            HedgeLayer::builder()
                .delay(atscale::hedge::Delay::fixed(Duration::from_millis(200)))
                .non_idempotent(true)
                .throttle(throttle.clone())
                .build()
                .unwrap(),
        )
        .with_retry_throttle(throttle)
        .with_throttle(ThrottleLayer::new());
    let mut one = HealthClient::new(client.layer(channel(a).await));
    assert_eq!(check(&mut one).await.unwrap(), Wire::Serving);
    let mut both = HealthClient::new(
        client
            .replicas(vec![channel(a).await, channel(b).await])
            .unwrap(),
    );
    for _ in 0..2 {
        assert_eq!(check(&mut both).await.unwrap(), Wire::Serving);
    }
    client.monitor().wait_finished(3).await;
    assert_eq!(client.throttle().counts(), (3, 3));

    let config: ServiceConfig =
        r#"{"methodConfig": [{"name": [{"service": "grpc.health.v1.Health"}],
        "timeout": "0.5s"}]}"#
            .parse()
            .unwrap();
    let configured = stack::client("caller", Duration::from_secs(1)).with_service_config(config);
    let mut health = HealthClient::new(configured.layer(channel(b).await));
    assert_eq!(check(&mut health).await.unwrap(), Wire::Serving);
}

#[tokio::test]
async fn a_downstream_failure_comes_back_as_its_status_and_its_kind() {
    // A server whose rate limit refuses the second call.
    let server = stack::server("limited", Duration::from_secs(2)).with_rate_limit(
        RateLimitLayer::reject(Limiter::new(Limit::per_minute(1).unwrap())),
    );
    let addr = serve_health(server).await;

    let client = stack::client("caller", Duration::from_secs(1));
    let mut health = HealthClient::new(client.layer(channel(addr).await));
    check(&mut health).await.unwrap();
    let status = check(&mut health).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    // tonic found the downstream status in the chain; the chain keeps the kind.
    let chain = std::error::Error::source(&status).expect("the client stack's error");
    assert_eq!(Kind::of(chain), Kind::RateLimited);
    let remote = atscale::core::find::<atscale::remote::RemoteFailure>(chain).unwrap();
    assert_eq!(remote.service(), Some("limited"));
    assert_eq!(remote.layer(), Some("ratelimit"));
    assert_eq!(remote.error_id().map(str::len), Some(32));
    let limited = atscale::core::find::<atscale::core::RateLimited>(chain).unwrap();
    assert!(limited.retry_after() > Duration::from_secs(1));
    // The backend refused the call: a refusal, not a failure.
    let counts = client.monitor().counts();
    assert_eq!((counts.refused(), counts.error()), (1, 0));
}

#[tokio::test]
async fn a_deadline_that_passes_is_deadline_exceeded_for_the_generated_client() {
    // A server that never answers.
    let hang = tower::layer::layer_fn(|_inner: tonic::service::Routes| {
        tower::service_fn(|_req: http::Request<tonic::body::Body>| async {
            std::future::pending::<()>().await;
            Ok::<http::Response<tonic::body::Body>, BoxError>(http::Response::default())
        })
    });
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = Server::builder()
        .layer(
            ServiceBuilder::new()
                .layer(stack::server("hangs", Duration::from_secs(10)))
                .layer(hang),
        )
        .add_service(health)
        .serve_with_incoming(TcpIncoming::from(listener));
    tokio::spawn(serve);

    let client = stack::client("caller", Duration::from_millis(60));
    let mut health = HealthClient::new(client.layer(channel(addr).await));
    for _ in 0..3 {
        // Whichever timer fires first (the stack's, tonic's on the channel,
        // or the server's), the caller sees a deadline, not UNKNOWN.
        let status = check(&mut health).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        let chain = std::error::Error::source(&status).unwrap();
        assert_eq!(Kind::of(chain), Kind::DeadlineExceeded);
    }
}

#[tokio::test]
async fn a_generated_client_takes_a_hand_built_client_stack_in_the_recommended_order() {
    use atscale::hedge::{BufferBodyLayer, BufferedBody, Delay};

    let addr = health_server(stack::server("health", Duration::from_secs(2))).await;
    let monitor = Monitor::new();
    let hedge = HedgeLayer::builder()
        .delay(Delay::fixed(Duration::from_millis(200)))
        .non_idempotent(true)
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .enrich_errors(ErrorEnrichLayer::client("caller"))
        .deadline(DeadlineLayer::client(Duration::from_secs(1)))
        .multi_rate_limit(RateLimitLayer::new(Limiter::new(
            Limit::per_second(100).unwrap(),
        )))
        .buffer_body(BufferBodyLayer::new(64 * 1024).non_idempotent(true))
        .hedge(hedge)
        .heartbeat(&monitor)
        .map_request(|req: http::Request<BufferedBody<tonic::body::Body>>| {
            req.map(tonic::body::Body::new)
        })
        .service(channel(addr).await);
    let mut health = HealthClient::new(svc);
    assert_eq!(check(&mut health).await.unwrap(), Wire::Serving);
    monitor.wait_finished(1).await;
    assert_eq!(monitor.counts().ok(), 1);
}
