//! The HTTP client stack over real servers on loopback: an axum gateway
//! (the server stack) whose handler calls an axum backend (the server stack
//! too) through `stack::http_client` over hyper-util's `Client`.
//!
//! - backend 429 → gateway 429 with the same `Retry-After`;
//! - backend 504 → gateway 504 naming the deadline the gateway's caller set;
//! - backend port closed → gateway 503 naming the dependency;
//! - the backend sees the shrinking `x-deadline-ms`;
//! - a backend's own text never reaches the gateway's caller;
//! - a hedge covers GETs, not POSTs, and the heartbeat sees each attempt.

#[path = "../crates/atscale-error/tests/support/mod.rs"]
mod support;

mod loopback;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use atscale::core::{BoxError, Context, DeadlineExceeded, Kind, RateLimited};
use atscale::heartbeat::Monitor;
use atscale::hedge::{Budget, BufferedBody, Delay, HedgeLayer};
use atscale::remote::RemoteFailure;
use atscale::stack::{self, DEADLINE_HEADER};
use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use loopback::{bounded, closed_port, http_client, serve_router};
use serde_json::Value;
use tokio::sync::mpsc;
use tower::{Layer, ServiceExt, service_fn};

/// What the backend's handler of `/deadline` saw, and what the gateway's
/// handler saw of its calls' failures.
type Seen = mpsc::UnboundedSender<String>;

/// The backend: the server stack around a handler that fails in each way.
async fn backend(seen: Seen) -> SocketAddr {
    let handler = service_fn(move |req: http::Request<Body>| {
        let seen = seen.clone();
        async move {
            match req.uri().path() {
                "/limited" => Err(BoxError::from(RateLimited::new(Duration::from_secs(3)))),
                // Work that needs more than what is left of the deadline it
                // inherited fails at once, as the deadline layer does.
                "/too-slow" => {
                    let deadline = Context::current().and_then(|cx| cx.deadline()).unwrap();
                    let now = tokio::time::Instant::now();
                    Err(BoxError::from(DeadlineExceeded::at(deadline, now)))
                }
                // A backend that is not atscale's, answering its own text.
                "/broken" => Ok(http::Response::builder()
                    .status(500)
                    .header("content-type", "application/problem+json")
                    .body(Body::from(
                        r#"{"type":"about:blank","status":500,"detail":"db password hunter2 rejected","service":"backend","error_id":"feedfacefeedfacefeedfacefeedface"}"#,
                    ))
                    .unwrap()),
                _ => {
                    let header = req.headers()[DEADLINE_HEADER].to_str().unwrap().to_owned();
                    let origin = Context::current()
                        .and_then(|cx| cx.deadline())
                        .map(|d| d.origin().to_string())
                        .unwrap();
                    let _ = seen.send(format!("{header} {origin}"));
                    Ok(http::Response::new(Body::from(header)))
                }
            }
        }
    });
    let app = Router::new()
        .fallback_service(stack::server("backend", Duration::from_secs(10)).layer(handler));
    serve_router(app).await
}

struct Gateway {
    addr: SocketAddr,
    client_monitor: Monitor,
    failures: mpsc::UnboundedReceiver<String>,
}

/// The gateway: `GET /{route}` calls the backend's `/{route}` (or, for
/// `/down`, a dependency whose port is closed) through the HTTP client
/// stack, and answers what it got; a failed call is the handler's error.
async fn gateway(backend: SocketAddr) -> Gateway {
    let to_backend =
        stack::http_client("gateway", Duration::from_secs(5)).with_dependency("backend");
    let client_monitor = to_backend.monitor().clone();
    let backend_client = to_backend.layer(http_client::<Empty<Bytes>>());
    let down = closed_port().await;
    let inventory_client = stack::http_client("gateway", Duration::from_secs(5))
        .with_dependency("inventory")
        .layer(http_client::<Empty<Bytes>>());
    let (failed, failures) = mpsc::unbounded_channel();

    let handler = service_fn(move |req: http::Request<Body>| {
        let backend_client = backend_client.clone();
        let inventory_client = inventory_client.clone();
        let failed = failed.clone();
        async move {
            let path = req.uri().path().to_owned();
            let mut calls = 1;
            let mut answers = Vec::new();
            if path == "/shrinking" {
                calls = 2;
            }
            for i in 0..calls {
                if i > 0 {
                    // Some work between the two calls.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let (client, uri) = match path.as_str() {
                    "/down" => (inventory_client.clone(), format!("http://{down}/items")),
                    "/shrinking" => (backend_client.clone(), format!("http://{backend}/deadline")),
                    other => (backend_client.clone(), format!("http://{backend}{other}")),
                };
                let call = http::Request::get(uri).body(Empty::new()).unwrap();
                match client.oneshot(call).await {
                    Ok(res) => {
                        let body = res.into_body().collect().await?.to_bytes();
                        answers.push(String::from_utf8(body.to_vec()).unwrap());
                    }
                    Err(err) => {
                        let remote = atscale::core::find::<RemoteFailure>(&err);
                        let _ = failed.send(format!(
                            "{} {:?} {:?}",
                            err.kind(),
                            remote.and_then(RemoteFailure::service),
                            remote.and_then(RemoteFailure::error_id),
                        ));
                        return Err(BoxError::from(err));
                    }
                }
            }
            Ok::<_, BoxError>(http::Response::new(Body::from(answers.join(","))))
        }
    });
    let app = Router::new()
        .fallback_service(stack::server("gateway", Duration::from_secs(10)).layer(handler));
    Gateway {
        addr: serve_router(app).await,
        client_monitor,
        failures,
    }
}

struct Answer {
    status: http::StatusCode,
    headers: http::HeaderMap,
    body: String,
}

impl Answer {
    fn problem(&self) -> Value {
        assert_eq!(
            self.headers["content-type"], "application/problem+json",
            "{}",
            self.body
        );
        serde_json::from_str(&self.body).unwrap()
    }
}

/// `GET path` on the gateway, with the caller's budget in `x-deadline-ms`.
async fn get_gateway(gateway: &Gateway, path: &str, budget_ms: u64) -> Answer {
    let req = http::Request::get(format!("http://{}{path}", gateway.addr))
        .header(DEADLINE_HEADER, budget_ms.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = bounded("the gateway's answer", http_client().request(req))
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    let body = bounded("the gateway's body", body.collect())
        .await
        .unwrap()
        .to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

async fn start() -> (Gateway, mpsc::UnboundedReceiver<String>) {
    let (seen, seen_rx) = mpsc::unbounded_channel();
    let backend = backend(seen).await;
    (gateway(backend).await, seen_rx)
}

#[tokio::test]
async fn a_backend_429_is_a_gateway_429_with_the_same_retry_after() {
    let (mut gateway, _) = start().await;
    let answer = get_gateway(&gateway, "/limited", 2000).await;
    assert_eq!(answer.status, 429, "{}", answer.body);
    assert_eq!(answer.headers["retry-after"], "3");
    let problem = answer.problem();
    assert_eq!(problem["code"], "rate_limited");
    assert_eq!(problem["retry_after"], 3);
    assert_eq!(problem["service"], "gateway");
    // The gateway's handler saw the backend's failure, with its id.
    let failure = bounded("the failure", gateway.failures.recv())
        .await
        .unwrap();
    assert!(
        failure.starts_with("rate_limited Some(\"backend\") Some(\""),
        "{failure}"
    );
    // A backend's 429 is a refusal by the backend, not its failure.
    let counts = gateway.client_monitor.counts();
    assert_eq!((counts.refused(), counts.error()), (1, 0));
}

#[tokio::test]
async fn a_backend_504_is_a_gateway_504_naming_the_inherited_deadline() {
    let (mut gateway, _) = start().await;
    let answer = get_gateway(&gateway, "/too-slow", 2000).await;
    assert_eq!(answer.status, 504, "{}", answer.body);
    let problem = answer.problem();
    assert_eq!(problem["code"], "deadline_exceeded");
    // The backend's deadline was the one the gateway's caller set.
    assert_eq!(problem["deadline_origin"], "parent");
    assert_eq!(
        problem["detail"],
        "The request did not finish within the deadline its caller set."
    );
    let failure = bounded("the failure", gateway.failures.recv())
        .await
        .unwrap();
    assert!(
        failure.starts_with("deadline_exceeded Some(\"backend\")"),
        "{failure}"
    );
}

#[tokio::test]
async fn a_closed_port_is_a_gateway_503_naming_the_dependency() {
    let (mut gateway, _) = start().await;
    let answer = get_gateway(&gateway, "/down", 2000).await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    let problem = answer.problem();
    assert_eq!(problem["code"], "unreachable");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("(inventory)"), "{detail}");
    assert!(!answer.body.contains("127.0.0.1"), "{}", answer.body);
    let failure = bounded("the failure", gateway.failures.recv())
        .await
        .unwrap();
    assert_eq!(failure, "unreachable None None");
}

#[tokio::test]
async fn the_backend_sees_the_shrinking_deadline() {
    let (gateway, mut seen) = start().await;
    let answer = get_gateway(&gateway, "/shrinking", 1000).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let first = bounded("the first call", seen.recv()).await.unwrap();
    let second = bounded("the second call", seen.recv()).await.unwrap();
    let ms = |s: &str| s.split(' ').next().unwrap().parse::<u64>().unwrap();
    // Inherited from the gateway's caller (not the stacks' 5 s and 10 s
    // budgets), and shrinking by the time spent between the calls.
    assert!(ms(&first) <= 1000, "{first}");
    assert!(ms(&second) <= ms(&first) - 50, "{first} then {second}");
    // The backend reads it as a deadline from its caller's header.
    assert!(first.ends_with(" header"), "{first}");
}

#[tokio::test]
async fn a_backends_own_text_never_reaches_the_gateways_caller() {
    let (logs, _guard) = support::capture_logs();
    let (mut gateway, _) = start().await;
    let answer = get_gateway(&gateway, "/broken", 2000).await;
    assert_eq!(answer.status, 502, "{}", answer.body);
    let problem = answer.problem();
    assert_eq!(problem["code"], "upstream");
    for leak in ["hunter2", "feedface", "backend", "127.0.0.1"] {
        assert!(
            !answer.body.contains(leak),
            "{leak} leaked: {}",
            answer.body
        );
    }
    // ... but the gateway's log line for its answer has the backend's
    // service and error id, and still not its text.
    let line = logs.by_id(problem["error_id"].as_str().unwrap());
    let chain = line.field("chain").unwrap_or_default();
    assert!(
        chain.contains(
            "backend answered 500 Internal Server Error (error id feedfacefeedfacefeedfacefeedface)"
        ),
        "{chain}"
    );
    assert!(!chain.contains("hunter2"), "{chain}");
    let failure = bounded("the failure", gateway.failures.recv())
        .await
        .unwrap();
    assert_eq!(
        failure,
        "upstream Some(\"backend\") Some(\"feedfacefeedfacefeedfacefeedface\")"
    );
}

#[tokio::test]
async fn the_client_stack_error_keeps_the_kind_for_a_plain_caller() {
    // Outside any server: the stack's error says the kind, the retry-after
    // and the dependency, for code that handles it itself.
    let (seen, _rx) = mpsc::unbounded_channel();
    let backend = backend(seen).await;
    let client =
        stack::http_client("caller", Duration::from_secs(5)).layer(http_client::<Empty<Bytes>>());
    let req = http::Request::get(format!("http://{backend}/limited"))
        .body(Empty::new())
        .unwrap();
    let err = bounded("the call", client.oneshot(req)).await.unwrap_err();
    assert_eq!(err.kind(), Kind::RateLimited);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(3)));
    assert_eq!(err.status(), 429);
}

/// A backend whose first request on each path hangs (a slow replica) and
/// later ones answer at once; it counts the requests it sees.
async fn slow_first_backend(seen: Arc<AtomicUsize>) -> SocketAddr {
    let handler = service_fn(move |req: http::Request<Body>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                std::future::pending::<()>().await;
            }
            Ok::<_, BoxError>(http::Response::new(Body::from(format!(
                "{} answered",
                req.method()
            ))))
        }
    });
    serve_router(
        Router::new()
            .fallback_service(stack::server("backend", Duration::from_secs(10)).layer(handler)),
    )
    .await
}

#[tokio::test]
async fn only_idempotent_methods_are_hedged_and_each_attempt_is_monitored() {
    let hedge = || {
        HedgeLayer::builder()
            .delay(Delay::fixed(Duration::from_millis(30)))
            .budget(Budget::unlimited())
            .build()
            .unwrap()
    };
    let client = || http_client::<BufferedBody<Full<Bytes>>>();

    // A GET is hedged: the backup answers while the first attempt hangs.
    let seen = Arc::new(AtomicUsize::new(0));
    let backend = slow_first_backend(seen.clone()).await;
    let to_backend = stack::http_client("gateway", Duration::from_secs(5)).with_hedge(hedge());
    let monitor = to_backend.monitor().clone();
    let stats = to_backend.hedge_stats();
    let svc = to_backend.layer(client());
    let get = http::Request::get(format!("http://{backend}/items"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = bounded("the hedged GET", svc.clone().oneshot(get))
        .await
        .unwrap();
    let body = bounded("its body", res.into_body().collect())
        .await
        .unwrap();
    assert_eq!(body.to_bytes(), "GET answered");
    assert_eq!((stats.hedges_sent(), stats.hedges_won()), (1, 1));
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    // The heartbeat saw both attempts: the winner finished, the loser was cancelled.
    bounded("both attempts end", monitor.wait_finished(2)).await;
    assert_eq!(
        (monitor.counts().ok(), monitor.counts().cancelled()),
        (1, 1)
    );

    // A POST is not: it waits on the one attempt, and fails at the deadline.
    let seen = Arc::new(AtomicUsize::new(0));
    let backend = slow_first_backend(seen.clone()).await;
    let to_backend = stack::http_client("gateway", Duration::from_millis(300)).with_hedge(hedge());
    let stats = to_backend.hedge_stats();
    let svc = to_backend.layer(client());
    let post = http::Request::post(format!("http://{backend}/orders"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let err = bounded("the POST", svc.oneshot(post)).await.unwrap_err();
    assert_eq!(err.kind(), Kind::DeadlineExceeded);
    assert_eq!(stats.hedges_sent(), 0);
    assert_eq!(seen.load(Ordering::SeqCst), 1);
}

/// A backend that counts its requests and answers `name`, or never answers
/// when `hangs`.
async fn replica(name: &'static str, hangs: bool, seen: Arc<AtomicUsize>) -> SocketAddr {
    let handler = service_fn(move |_: http::Request<Body>| {
        seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if hangs {
                std::future::pending::<()>().await;
            }
            Ok::<_, BoxError>(http::Response::new(Body::from(name)))
        }
    });
    serve_router(
        Router::new()
            .fallback_service(stack::server("replica", Duration::from_secs(10)).layer(handler)),
    )
    .await
}

#[tokio::test]
async fn over_replicas_a_hedge_goes_to_another_replica_than_the_hanging_one() {
    let (hanging_seen, fast_seen) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let hanging = replica("hanging", true, hanging_seen.clone()).await;
    let fast = replica("fast", false, fast_seen.clone()).await;
    // One client per replica, each sending to its own address.
    let client_to = |addr: SocketAddr| {
        let client = http_client::<BufferedBody<Full<Bytes>>>();
        tower::util::MapRequestLayer::new(move |mut req: http::Request<_>| {
            *req.uri_mut() = format!("http://{addr}{}", req.uri().path())
                .parse()
                .unwrap();
            req
        })
        .layer(client)
    };
    let hedge = HedgeLayer::builder()
        .delay(Delay::fixed(Duration::from_millis(30)))
        .budget(Budget::unlimited())
        .build()
        .unwrap();
    let to_backend = stack::http_client("gateway", Duration::from_secs(5)).with_hedge(hedge);
    let stats = to_backend.hedge_stats();
    let svc = to_backend
        .replicas(vec![client_to(hanging), client_to(fast)])
        .unwrap();

    for call in 0..4 {
        let get = http::Request::get("/items")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let res = bounded("a call over the replicas", svc.clone().oneshot(get))
            .await
            .unwrap();
        let body = bounded("its body", res.into_body().collect())
            .await
            .unwrap();
        assert_eq!(body.to_bytes(), "fast", "call {call}");
    }
    // First attempts alternate: two went to the hanging replica, and each
    // of those was hedged to the fast one.
    assert_eq!(hanging_seen.load(Ordering::SeqCst), 2);
    assert_eq!(fast_seen.load(Ordering::SeqCst), 4);
    assert_eq!((stats.hedges_sent(), stats.hedges_won()), (2, 2));

    // An empty list (of the same client type) is refused.
    let mut none = vec![client_to(fast)];
    none.clear();
    let err = stack::http_client("gateway", Duration::from_secs(5))
        .with_hedge(HedgeLayer::builder().build().unwrap())
        .replicas(none)
        .unwrap_err();
    assert!(err.to_string().contains("replicas"), "{err}");
}
