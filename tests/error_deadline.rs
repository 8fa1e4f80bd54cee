//! ErrorEnrich over the Deadline layer, the recommended server stack's top:
//! real axum and tonic servers on loopback, real clients, and what a caller
//! sees when a deadline fires or a deadline header is malformed.

#[path = "../crates/atscale-error/tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use atscale::deadline::DeadlineLayer;
use atscale::error::ErrorEnrichLayer;
use axum::Router;
use axum::http::{HeaderName, Request, StatusCode};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use support::{FAIL, Logs, capture_logs};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;
use tower::ServiceBuilder;

const X_DEADLINE: HeaderName = HeaderName::from_static("x-deadline-ms");

/// `/fast` answers, `/slow` never does: only a deadline ends it.
async fn http_server(deadline: DeadlineLayer) -> SocketAddr {
    let app = Router::new()
        .route("/fast", get(|| async { "fast" }))
        .route(
            "/slow",
            get(|| async {
                std::future::pending::<()>().await;
                "never"
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(ErrorEnrichLayer::new("gateway"))
                .layer(deadline),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn get_problem(addr: SocketAddr, path: &str, deadline: Option<&str>) -> (StatusCode, Value) {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::get(format!("http://{addr}{path}"));
    if let Some(ms) = deadline {
        req = req.header(X_DEADLINE, ms);
    }
    let res = client
        .request(req.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let status = res.status();
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

fn line_for(logs: &Logs, doc: &Value) -> support::Line {
    logs.by_id(doc["error_id"].as_str().unwrap())
}

#[tokio::test]
async fn an_inherited_http_deadline_is_a_504_that_blames_the_caller() {
    let (logs, _guard) = capture_logs();
    let addr =
        http_server(DeadlineLayer::server(Duration::from_secs(30)).with_header(X_DEADLINE)).await;
    let (status, doc) = get_problem(addr, "/slow", Some("40")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(doc["code"], "deadline_exceeded");
    assert_eq!(
        doc["detail"],
        "The request did not finish within the deadline its caller set."
    );
    let line = line_for(&logs, &doc);
    assert_eq!(line.field("deadline_origin"), Some("header"));
    assert_eq!(line.field("layer"), Some("deadline"));
    assert!(
        line.field("chain")
            .unwrap()
            .contains("(budget 40ms, header)")
    );
}

#[tokio::test]
async fn a_local_budget_is_a_504_that_blames_the_service() {
    let (logs, _guard) = capture_logs();
    let addr = http_server(DeadlineLayer::server(Duration::from_millis(40))).await;
    let (status, doc) = get_problem(addr, "/slow", None).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        doc["detail"],
        "The request did not finish within the service's time budget."
    );
    assert_eq!(
        line_for(&logs, &doc).field("deadline_origin"),
        Some("local")
    );
}

#[tokio::test]
async fn a_malformed_deadline_header_is_a_400_naming_the_header() {
    let (logs, _guard) = capture_logs();
    let addr =
        http_server(DeadlineLayer::server(Duration::from_secs(30)).with_header(X_DEADLINE)).await;
    let (status, doc) = get_problem(addr, "/fast", Some("1.5s")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(doc["code"], "bad_request");
    let detail = doc["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("The x-deadline-ms header is malformed: "),
        "{detail}"
    );
    assert_eq!(line_for(&logs, &doc).field("kind"), Some("bad_request"));
}

/// A tonic health server behind ErrorEnrich → Deadline(`budget`) → a layer
/// that hangs requests carrying `x-fail: hang`.
async fn grpc_server(budget: Duration) -> HealthClient<Channel> {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::builder()
        .layer(
            ServiceBuilder::new()
                .layer(ErrorEnrichLayer::new("health"))
                .layer(DeadlineLayer::server(budget))
                .layer(support::FailingLayer),
        )
        .add_service(health)
        .serve_with_incoming(TcpIncoming::from(listener));
    tokio::spawn(async move { server.await.unwrap() });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

async fn check(
    client: &mut HealthClient<Channel>,
    metadata: &[(&'static str, &'static str)],
) -> tonic::Status {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    for (name, value) in metadata {
        req.metadata_mut().insert(*name, value.parse().unwrap());
    }
    client.check(req).await.unwrap_err()
}

#[tokio::test]
async fn over_grpc_a_deadline_and_a_malformed_grpc_timeout_become_rich_statuses() {
    let (logs, _guard) = capture_logs();
    let mut client = grpc_server(Duration::from_millis(40)).await;

    let status = check(&mut client, &[(FAIL, "hang"), ("grpc-timeout", "10S")]).await;
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    let details = status.get_error_details();
    let info = details.error_info().unwrap();
    assert_eq!(info.reason, "DEADLINE_EXCEEDED");
    assert_eq!(info.domain, "health");
    assert_eq!(info.metadata["deadline_origin"], "local");
    assert_eq!(info.metadata["layer"], "deadline");
    let line = logs.by_id(&details.request_info().unwrap().request_id);
    assert_eq!(line.field("route"), Some("/grpc.health.v1.Health/Check"));

    let status = check(&mut client, &[("grpc-timeout", "1x")]).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let details = status.get_error_details();
    assert_eq!(details.error_info().unwrap().reason, "BAD_REQUEST");
    let message = &details.localized_message().unwrap().message;
    assert!(
        message.starts_with("The grpc-timeout header is malformed: "),
        "{message}"
    );
}
