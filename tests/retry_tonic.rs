//! Retries over real tonic servers on loopback (tonic-health's generated
//! service: no protoc needed). Each server answers from a script — a
//! trailers-only status, with or without `grpc-retry-pushback-ms`, or the
//! real health service — and records what each attempt carried.

mod loopback;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atscale::core::Kind;
use atscale::hedge::{BufferBodyLayer, BufferedBody};
use atscale::retry::{Code, MethodConfigLayer, RetryLayer, RetryPolicy, ServiceConfig};
use loopback::{channel, serve_health};
use tonic::body::Body;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as Wire;
use tonic_health::pb::health_client::HealthClient;
use tower::ServiceBuilder;
use tower::layer::layer_fn;
use tower::util::ServiceExt;

/// What the server does with one call.
#[derive(Clone, Debug)]
enum Answer {
    /// The real health service.
    Pass,
    /// A trailers-only status, with this pushback header if any.
    Fail(Code, Option<&'static str>),
    /// Never answers.
    Stall,
}

#[derive(Debug)]
struct Arrival {
    at: Instant,
    previous: Option<String>,
    path: String,
}

#[derive(Clone, Default)]
struct Script {
    answers: Arc<Mutex<VecDeque<Answer>>>,
    seen: Arc<Mutex<Vec<Arrival>>>,
}

impl Script {
    fn new(answers: impl IntoIterator<Item = Answer>) -> Self {
        Script {
            answers: Arc::new(Mutex::new(answers.into_iter().collect())),
            seen: Arc::default(),
        }
    }

    fn previous(&self) -> Vec<Option<String>> {
        let seen = self.seen.lock().unwrap();
        seen.iter().map(|a| a.previous.clone()).collect()
    }

    fn calls(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

async fn serve(script: Script) -> std::net::SocketAddr {
    let layer = layer_fn(move |inner: tonic::service::Routes| {
        let script = script.clone();
        tower::service_fn(move |req: http::Request<Body>| {
            let inner = inner.clone();
            script.seen.lock().unwrap().push(Arrival {
                at: Instant::now(),
                previous: req
                    .headers()
                    .get("grpc-previous-rpc-attempts")
                    .map(|v| v.to_str().unwrap().to_owned()),
                path: req.uri().path().to_owned(),
            });
            let answer = script
                .answers
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Answer::Pass);
            async move {
                match answer {
                    Answer::Pass => inner.oneshot(req).await,
                    Answer::Fail(code, pushback) => {
                        let mut status =
                            tonic::Status::new(tonic::Code::from(code.as_i32()), "scripted");
                        if let Some(p) = pushback {
                            status
                                .metadata_mut()
                                .insert("grpc-retry-pushback-ms", p.parse().unwrap());
                        }
                        Ok(status.into_http())
                    }
                    Answer::Stall => std::future::pending().await,
                }
            }
        })
    });
    serve_health(layer).await
}

type Buffered = http::Request<BufferedBody<Body>>;

/// The channel as a service of buffered requests (retries replay them).
fn replica(
    channel: Channel,
) -> tower::util::MapRequest<Channel, fn(Buffered) -> http::Request<Body>> {
    ServiceBuilder::new()
        .map_request((|req: Buffered| req.map(Body::new)) as fn(Buffered) -> http::Request<Body>)
        .service(channel)
}

fn policy() -> RetryPolicy {
    RetryPolicy::builder()
        .max_attempts(4)
        .initial_backoff(Duration::from_millis(10))
        .max_backoff(Duration::from_millis(50))
        .non_idempotent(true) // every gRPC call is a POST; a health check is safe to repeat
        .build()
        .unwrap()
}

fn check() -> HealthCheckRequest {
    HealthCheckRequest {
        service: String::new(),
    }
}

const BOUND: Duration = Duration::from_secs(10);

#[tokio::test]
async fn unavailable_is_retried_and_each_attempt_says_how_many_came_before() {
    let script = Script::new([
        Answer::Fail(Code::Unavailable, None),
        Answer::Fail(Code::Unavailable, None),
        Answer::Pass,
    ]);
    let ch = channel(serve(script.clone()).await).await;
    let svc = ServiceBuilder::new()
        .layer(BufferBodyLayer::new(64 * 1024).non_idempotent(true))
        .layer(RetryLayer::new(policy()))
        .service(replica(ch));
    let mut client = HealthClient::new(svc);
    let res = tokio::time::timeout(BOUND, client.check(check()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.into_inner().status(), Wire::Serving);
    assert_eq!(
        script.previous(),
        [None, Some("1".to_owned()), Some("2".to_owned())]
    );
}

#[tokio::test]
async fn pushback_is_waited_for_and_minus_one_means_no_retry() {
    let script = Script::new([
        Answer::Fail(Code::Unavailable, Some("300")),
        Answer::Pass,
        Answer::Fail(Code::Unavailable, Some("-1")),
        Answer::Pass,
    ]);
    let ch = channel(serve(script.clone()).await).await;
    let svc = ServiceBuilder::new()
        .layer(BufferBodyLayer::new(64 * 1024).non_idempotent(true))
        .layer(RetryLayer::new(policy()))
        .service(replica(ch));
    let mut client = HealthClient::new(svc);

    tokio::time::timeout(BOUND, client.check(check()))
        .await
        .unwrap()
        .unwrap();
    {
        let seen = script.seen.lock().unwrap();
        let waited = seen[1].at - seen[0].at;
        assert!(
            waited >= Duration::from_millis(300),
            "no attempt before the pushback: {waited:?}"
        );
    }

    let status = tokio::time::timeout(BOUND, client.check(check()))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(script.calls(), 3, "the server said not to retry");
}

#[tokio::test]
async fn a_code_the_policy_does_not_retry_is_answered_at_once() {
    let script = Script::new([Answer::Fail(Code::InvalidArgument, None), Answer::Pass]);
    let ch = channel(serve(script.clone()).await).await;
    let svc = ServiceBuilder::new()
        .layer(BufferBodyLayer::new(64 * 1024).non_idempotent(true))
        .layer(RetryLayer::new(policy()))
        .service(replica(ch));
    let status = tokio::time::timeout(BOUND, HealthClient::new(svc).check(check()))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(script.calls(), 1);
}

#[tokio::test]
async fn a_retry_goes_to_another_replica_when_one_is_down() {
    // A port nobody listens on any more: connecting is refused.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let dead = Channel::from_shared(format!("http://{dead}"))
        .unwrap()
        .connect_lazy();
    let script = Script::new([Answer::Pass]);
    let live = channel(serve(script.clone()).await).await;
    let retry = RetryLayer::new(policy())
        .replicas(vec![replica(dead), replica(live)])
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(BufferBodyLayer::new(64 * 1024).non_idempotent(true))
        .service(retry);
    let res = tokio::time::timeout(BOUND, HealthClient::new(svc).check(check()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.into_inner().status(), Wire::Serving);
    assert_eq!(
        script.previous(),
        [Some("1".to_owned())],
        "the live replica saw the second attempt"
    );
}

#[tokio::test]
async fn the_refused_connection_is_unreachable_and_retried_until_attempts_run_out() {
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let dead = Channel::from_shared(format!("http://{dead}"))
        .unwrap()
        .connect_lazy();
    let svc = ServiceBuilder::new()
        .layer(BufferBodyLayer::new(64 * 1024).non_idempotent(true))
        .layer(RetryLayer::new(policy()))
        .service(replica(dead));
    let req = http::Request::post("http://dead/grpc.health.v1.Health/Check")
        .body(Body::empty())
        .unwrap();
    let err = tokio::time::timeout(BOUND, svc.oneshot(req))
        .await
        .unwrap()
        .unwrap_err();
    let failed = atscale::core::find::<atscale::retry::RetryFailed>(&*err).expect("retried");
    assert_eq!(failed.attempts(), 4);
    assert_eq!(Kind::of(&*err), Kind::Unreachable, "{err:?}");
}

fn config(json: &str) -> MethodConfigLayer {
    MethodConfigLayer::new(json.parse::<ServiceConfig>().unwrap())
}

#[tokio::test]
async fn the_service_config_gives_each_method_its_own_policy() {
    let retry_check = r#"{
      "methodConfig": [{
        "name": [{"service": "grpc.health.v1.Health", "method": "Check"}],
        "timeout": "5s",
        "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.05s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
      }],
      "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.5}
    }"#;
    let script = Script::new([Answer::Fail(Code::Unavailable, None), Answer::Pass]);
    let ch = channel(serve(script.clone()).await).await;
    let layer = config(retry_check);
    let throttle = layer.throttle().unwrap().clone();
    let svc = ServiceBuilder::new()
        .layer(BufferBodyLayer::new(64 * 1024).non_idempotent(true))
        .layer(layer)
        .service(replica(ch));
    let res = tokio::time::timeout(BOUND, HealthClient::new(svc).check(check()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.into_inner().status(), Wire::Serving);
    assert_eq!(script.calls(), 2);
    assert_eq!(
        script.seen.lock().unwrap()[0].path,
        "/grpc.health.v1.Health/Check"
    );
    assert_eq!(throttle.milli_tokens(), 9_500, "one failure, one success");

    // Only Watch is retried: Check is sent once.
    let retry_watch = retry_check.replace("\"Check\"", "\"Watch\"");
    let script = Script::new([Answer::Fail(Code::Unavailable, None), Answer::Pass]);
    let ch = channel(serve(script.clone()).await).await;
    let svc = ServiceBuilder::new()
        .layer(BufferBodyLayer::new(64 * 1024).non_idempotent(true))
        .layer(config(&retry_watch))
        .service(replica(ch));
    let status = tokio::time::timeout(BOUND, HealthClient::new(svc).check(check()))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(script.calls(), 1);
}

#[tokio::test]
async fn a_hedging_policy_and_a_timeout_from_the_service_config() {
    let hedged = r#"{"methodConfig": [{
        "name": [{"service": "grpc.health.v1.Health"}],
        "hedgingPolicy": {"maxAttempts": 2, "hedgingDelay": "0.05s", "nonFatalStatusCodes": ["UNAVAILABLE"]}
    }]}"#;
    let script = Script::new([Answer::Stall, Answer::Pass]);
    let ch = channel(serve(script.clone()).await).await;
    let svc = ServiceBuilder::new()
        .layer(BufferBodyLayer::new(64 * 1024).non_idempotent(true))
        .layer(config(hedged))
        .service(replica(ch));
    let res = tokio::time::timeout(BOUND, HealthClient::new(svc).check(check()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.into_inner().status(), Wire::Serving);
    assert_eq!(script.calls(), 2, "the hedge answered for the stalled call");

    let timed = r#"{"methodConfig": [{"name": [{"service": "grpc.health.v1.Health"}], "timeout": "0.2s"}]}"#;
    let script = Script::new([Answer::Stall]);
    let ch = channel(serve(script.clone()).await).await;
    let svc = ServiceBuilder::new()
        .layer(BufferBodyLayer::new(64 * 1024).non_idempotent(true))
        .layer(config(timed))
        .service(replica(ch));
    let req = http::Request::post("http://h/grpc.health.v1.Health/Check")
        .body(Body::empty())
        .unwrap();
    let started = Instant::now();
    let err = tokio::time::timeout(BOUND, svc.oneshot(req))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(Kind::of(&*err), Kind::DeadlineExceeded, "{err}");
    assert!(started.elapsed() >= Duration::from_millis(200));
}

/// End to end with the server stack: ErrorEnrich answers a rate-limited call
/// with `RESOURCE_EXHAUSTED` and `grpc-retry-pushback-ms`; a client that
/// retries rate-limited calls waits exactly that and gets through.
#[tokio::test]
async fn an_atscale_server_pushes_back_and_the_client_waits_for_it() {
    use atscale::error::ErrorEnrichLayer;
    use atscale::ratelimit::{Limit, Limiter, RateLimitLayer};

    let arrivals = Script::new([]);
    let counted = arrivals.clone();
    let count = move |req: http::Request<Body>| {
        counted.seen.lock().unwrap().push(Arrival {
            at: Instant::now(),
            previous: req
                .headers()
                .get("grpc-previous-rpc-attempts")
                .map(|v| v.to_str().unwrap().to_owned()),
            path: req.uri().path().to_owned(),
        });
        req
    };
    // One call per 300 ms: the second call in a row is refused with the
    // time until the next slot.
    let limiter = Limiter::new(Limit::new(1, Duration::from_millis(300)).unwrap());
    let addr = serve_health(
        ServiceBuilder::new()
            .map_request(count)
            .layer(ErrorEnrichLayer::new("health"))
            .layer(RateLimitLayer::reject(limiter)),
    )
    .await;
    let policy = RetryPolicy::builder()
        .max_attempts(3)
        .initial_backoff(Duration::from_millis(10))
        .retryable_kinds([Kind::Unreachable, Kind::Overloaded, Kind::RateLimited])
        .non_idempotent(true)
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(BufferBodyLayer::new(64 * 1024).non_idempotent(true))
        .layer(RetryLayer::new(policy))
        .service(replica(channel(addr).await));
    let mut client = HealthClient::new(svc);
    tokio::time::timeout(BOUND, client.check(check()))
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(BOUND, client.check(check()))
        .await
        .unwrap()
        .unwrap();
    let seen = arrivals.seen.lock().unwrap();
    let previous: Vec<Option<&str>> = seen.iter().map(|a| a.previous.as_deref()).collect();
    // The retry of the second call; a second retry only if the pushback,
    // whole milliseconds, let the first arrive a fraction of one early.
    assert_eq!(
        previous[..3],
        [None, None, Some("1")],
        "the second call was retried"
    );
    assert!(previous.len() <= 4, "{previous:?}");
    let waited = seen[2].at - seen[1].at;
    assert!(
        waited >= Duration::from_millis(200),
        "waited for the pushback (the backoff is 10 ms): {waited:?}"
    );
}
