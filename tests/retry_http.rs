//! Retries of plain HTTP calls (hyper-util's client) against an axum server
//! on loopback that answers from a script: 503 with and without
//! `Retry-After`, 429, 200.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atscale::core::{Context, Kind, Origin};
use atscale::retry::{Attempts, RetryFailed, RetryLayer, RetryPolicy, Stop};
use axum::http::HeaderMap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};

/// An answer: a status, and a `Retry-After` value.
type Answer = (u16, Option<&'static str>);
/// An arrival: when, and its `grpc-previous-rpc-attempts`.
type Arrival = (Instant, Option<String>);

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

    fn calls(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

async fn serve(script: Script) -> SocketAddr {
    let handler = move |headers: HeaderMap| {
        let script = script.clone();
        async move {
            script.seen.lock().unwrap().push((
                Instant::now(),
                headers
                    .get("grpc-previous-rpc-attempts")
                    .map(|v| v.to_str().unwrap().to_owned()),
            ));
            let (status, after) = script
                .answers
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or((200, None));
            let mut res = http::Response::builder().status(status);
            if let Some(after) = after {
                res = res.header("retry-after", after);
            }
            res.body(axum::body::Body::from("answer")).unwrap()
        }
    };
    let router = axum::Router::new().route("/item", axum::routing::any(handler));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn policy() -> atscale::retry::RetryPolicyBuilder {
    RetryPolicy::builder()
        .max_attempts(3)
        .initial_backoff(Duration::from_millis(10))
        .max_backoff(Duration::from_millis(50))
}

fn request(method: http::Method, addr: SocketAddr) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}/item"))
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap()
}

const BOUND: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_503_is_retried_and_retry_after_is_waited_for() {
    let script = Script::new([(503, None), (503, Some("1")), (200, None)]);
    let addr = serve(script.clone()).await;
    let svc = RetryLayer::new(policy().build().unwrap()).layer(client());
    let res = tokio::time::timeout(BOUND, svc.oneshot(request(http::Method::GET, addr)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.extensions().get::<Attempts>(), Some(&Attempts(3)));
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "answer"
    );
    let seen = script.seen.lock().unwrap();
    let previous: Vec<Option<&str>> = seen.iter().map(|s| s.1.as_deref()).collect();
    assert_eq!(previous, [None, Some("1"), Some("2")]);
    assert!(
        seen[2].0 - seen[1].0 >= Duration::from_secs(1),
        "Retry-After: 1"
    );
}

#[tokio::test]
async fn a_post_is_sent_once_unless_the_policy_opts_in() {
    let script = Script::new([(503, None), (200, None)]);
    let addr = serve(script.clone()).await;
    let svc = RetryLayer::new(policy().build().unwrap()).layer(client());
    let res = tokio::time::timeout(BOUND, svc.oneshot(request(http::Method::POST, addr)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((res.status().as_u16(), script.calls()), (503, 1));

    let script = Script::new([(503, None), (200, None)]);
    let addr = serve(script.clone()).await;
    let svc = RetryLayer::new(policy().non_idempotent(true).build().unwrap()).layer(client());
    let res = tokio::time::timeout(BOUND, svc.oneshot(request(http::Method::POST, addr)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((res.status().as_u16(), script.calls()), (200, 2));
}

#[tokio::test]
async fn a_429_whose_retry_after_passes_the_deadline_comes_back_at_once() {
    let script = Script::new([(429, Some("30")), (200, None)]);
    let addr = serve(script.clone()).await;
    let p = policy()
        .retryable_kinds([Kind::Unreachable, Kind::Overloaded, Kind::RateLimited])
        .build()
        .unwrap();
    let svc = RetryLayer::new(p).layer(client());
    let mut req = request(http::Method::GET, addr);
    req.extensions_mut()
        .insert(Context::new().with_budget(Duration::from_secs(5), Origin::Local));
    let started = Instant::now();
    let res = tokio::time::timeout(BOUND, svc.oneshot(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((res.status().as_u16(), script.calls()), (429, 1));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no wait for 30 s"
    );
}

#[tokio::test]
async fn a_refused_connection_is_unreachable_and_retried() {
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let svc = RetryLayer::new(policy().build().unwrap()).layer(client());
    let err = tokio::time::timeout(BOUND, svc.oneshot(request(http::Method::GET, dead)))
        .await
        .unwrap()
        .unwrap_err();
    let failed = err.downcast_ref::<RetryFailed>().expect("retried");
    assert_eq!((failed.attempts(), failed.stop()), (3, Stop::MaxAttempts));
    assert_eq!(Kind::of(&*err), Kind::Unreachable);
}
