//! A deadline inherited from an HTTP header, propagated into the handler's
//! outgoing call, and enforced at both hops: real axum servers and a real
//! hyper client on loopback.

use std::net::SocketAddr;
use std::time::Duration;

use atscale::core::{BoxError, Context, Kind, Origin};
use atscale::deadline::DeadlineLayer;
use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::State;
use axum::http::{HeaderName, Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tower::{ServiceBuilder, ServiceExt};

const X_DEADLINE: HeaderName = HeaderName::from_static("x-deadline-ms");

/// What service B saw of each request: the header it was sent and its context.
type Seen = mpsc::UnboundedSender<(Option<String>, Context)>;

/// Maps the layer's errors to a status, as ErrorEnrich will in production.
async fn to_status(err: BoxError) -> (StatusCode, String) {
    (Kind::of(&*err).http_status(), err.to_string())
}

async fn serve(router: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

/// Service B: reports what it saw; `/slow` never answers on its own.
async fn service_b(seen: Seen) -> SocketAddr {
    async fn fast(State(seen): State<Seen>, req: Request<axum::body::Body>) -> String {
        let header = req
            .headers()
            .get(X_DEADLINE)
            .map(|v| v.to_str().unwrap().to_owned());
        let cx = Context::current().unwrap();
        seen.send((header.clone(), cx)).unwrap();
        header.unwrap_or_default()
    }
    async fn slow(State(seen): State<Seen>, req: Request<axum::body::Body>) -> &'static str {
        let header = req
            .headers()
            .get(X_DEADLINE)
            .map(|v| v.to_str().unwrap().to_owned());
        seen.send((header, Context::current().unwrap())).unwrap();
        std::future::pending::<()>().await;
        "unreachable"
    }
    let router = Router::new()
        .route("/fast", get(fast))
        .route("/slow", get(slow))
        .with_state(seen)
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(to_status))
                .layer(DeadlineLayer::server(Duration::from_secs(10)).with_header(X_DEADLINE)),
        );
    serve(router).await
}

/// Service A: calls B through a client stack that propagates the deadline.
async fn service_a(b: SocketAddr) -> SocketAddr {
    let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let outgoing = ServiceBuilder::new()
        .layer(
            DeadlineLayer::client(Duration::MAX)
                .with_header(X_DEADLINE)
                .without_grpc_timeout(),
        )
        .service(client);
    let call_b = move |path: &'static str| {
        let outgoing = outgoing.clone();
        async move {
            let req = Request::get(format!("http://{b}{path}"))
                .body(Empty::<bytes::Bytes>::new())
                .unwrap();
            match outgoing.oneshot(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    (status, String::from_utf8_lossy(&body).into_owned()).into_response()
                }
                Err(err) => {
                    (Kind::of(&*err).http_status(), format!("calling B: {err}")).into_response()
                }
            }
        }
    };
    let fast = call_b.clone();
    let router = Router::new()
        .route("/fast", get(move || fast("/fast")))
        .route("/slow", get(move || call_b("/slow")))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(to_status))
                .layer(DeadlineLayer::server(Duration::from_secs(5)).with_header(X_DEADLINE)),
        );
    serve(router).await
}

async fn get_with_deadline(addr: SocketAddr, path: &str, millis: &str) -> (StatusCode, String) {
    let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let req = Request::get(format!("http://{addr}{path}"))
        .header(X_DEADLINE, millis)
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn header_deadline_is_inherited_and_propagated_with_the_remaining_budget() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let a = service_a(service_b(seen_tx).await).await;

    let (status, body) = get_with_deadline(a, "/fast", "3000").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (header, cx) = seen.recv().await.unwrap();
    let sent: u64 = header.unwrap().parse().unwrap();
    assert!(
        sent > 0 && sent <= 3000,
        "B was sent {sent} ms: the remaining part of A's 3000"
    );
    assert_eq!(body, sent.to_string());
    let at_b = cx.deadline().unwrap();
    assert_eq!(
        at_b.origin(),
        Origin::Header,
        "B's deadline is the inherited one"
    );
    assert!(at_b.budget() <= Duration::from_millis(3000));

    // Without a header A's own 5 s budget is what B inherits.
    let client: Client<_, Empty<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let resp = client
        .get(format!("http://{a}/fast").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (header, _) = seen.recv().await.unwrap();
    let sent: u64 = header.unwrap().parse().unwrap();
    assert!(
        sent > 3000 && sent <= 5000,
        "B was sent {sent} ms of A's 5000"
    );
}

#[tokio::test]
async fn expiry_is_enforced_at_the_gateway_and_the_downstream_work_is_cancelled() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let a = service_a(service_b(seen_tx).await).await;

    let (status, body) = get_with_deadline(a, "/slow", "300").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(body.contains("deadline exceeded"), "{body}");

    // B received the call with at most 300 ms, and its work was cancelled
    // (by its own deadline or by A hanging up), not left running.
    let (header, cx_at_b) = seen.recv().await.unwrap();
    assert!(header.unwrap().parse::<u64>().unwrap() <= 300);
    cx_at_b.cancelled().await;
}

#[tokio::test]
async fn the_downstream_hop_enforces_its_inherited_deadline_on_its_own() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let b = service_b(seen_tx).await;
    let (status, body) = get_with_deadline(b, "/slow", "100").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(body.starts_with("deadline exceeded after "), "{body}");
    assert!(body.ends_with("(budget 100ms, header)"), "{body}");
    let (_, cx) = seen.recv().await.unwrap();
    assert!(cx.is_cancelled());

    let (status, body) = get_with_deadline(b, "/fast", "soon").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        "malformed x-deadline-ms header: expected only ASCII digits"
    );
}
