//! ErrorEnrich in client mode: an outgoing call's error names the target,
//! the method and where the deadline came from; foreign errors are upstream
//! failures, and stay so when they travel up into a server-mode layer.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use atscale_core::{BoxError, DeadlineExceeded, Kind, Origin};
use atscale_error::{Enriched, ErrorEnrichLayer};
use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::{Logs, capture_logs};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

/// An address nothing listens on: bound, then closed.
async fn closed_port() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

#[tokio::test]
async fn a_refused_call_names_its_target_and_never_reached_the_server() {
    let (logs, _guard) = capture_logs();
    let target = closed_port().await;
    let client = ServiceBuilder::new()
        .layer(ErrorEnrichLayer::client("checkout"))
        .service(http_client());
    let req = Request::post(format!("http://{target}/charge?card=4111"))
        .body(Empty::new())
        .unwrap();
    let err: Enriched = client.oneshot(req).await.unwrap_err();

    // Connection refused: the request never reached the server (safe to retry).
    assert_eq!(err.kind(), Kind::Unreachable);
    assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(err.target(), Some(target.to_string().as_str()));
    assert_eq!(err.method(), http::Method::POST);
    assert_eq!(err.route(), "/charge");
    assert!(err.is_outgoing());
    assert_eq!(err.deadline_inherited(), None);
    assert_eq!(
        err.to_string(),
        format!(
            "dependency unreachable calling {target} (POST /charge), error id {}",
            err.id()
        )
    );
    // The transport's own error is the source, for the caller to inspect.
    assert!(std::error::Error::source(&err).is_some());

    let line = logs.by_id(&err.id().to_string());
    assert_eq!(line.level, tracing::Level::DEBUG);
    assert_eq!(
        line.field("target_authority"),
        Some(target.to_string().as_str())
    );
    assert_eq!(line.field("kind"), Some("unreachable"));
    assert!(!line.field("chain").unwrap().is_empty());
    assert!(!format!("{line:?}").contains("4111"), "no query in logs");
}

#[tokio::test]
async fn a_deadline_says_whether_it_was_inherited() {
    let (_logs, _guard) = capture_logs();
    for (origin, inherited, words) in [
        (Origin::Parent, true, "deadline inherited"),
        (Origin::Local, false, "local deadline"),
    ] {
        let transport = service_fn(move |_req: Request<Empty<Bytes>>| async move {
            Err::<Response<Empty<Bytes>>, BoxError>(Box::new(DeadlineExceeded::new(
                Duration::from_millis(80),
                Duration::from_millis(80),
                origin,
            )))
        });
        let client = ServiceBuilder::new()
            .layer(ErrorEnrichLayer::client("checkout"))
            .service(transport);
        let req = Request::get("http://inventory.internal:8080/stock/7")
            .body(Empty::new())
            .unwrap();
        let err = client.oneshot(req).await.unwrap_err();
        assert_eq!(err.kind(), Kind::DeadlineExceeded);
        assert_eq!(err.target(), Some("inventory.internal:8080"));
        assert_eq!(err.deadline_origin(), Some(origin));
        assert_eq!(err.deadline_inherited(), Some(inherited));
        assert!(err.to_string().contains(words), "{err}");
    }
}

/// A server whose handler makes an outgoing call that fails: the server
/// answers 502 (upstream), not 500, and both hops log the error.
#[tokio::test]
async fn a_refused_dependency_travels_up_to_the_server_as_503() {
    let (logs, _guard) = capture_logs();
    let target = closed_port().await;
    let outgoing = ServiceBuilder::new()
        .layer(ErrorEnrichLayer::client("checkout"))
        .service(http_client());
    let handler = service_fn(move |_req: Request<Body>| {
        let outgoing = outgoing.clone();
        async move {
            let call = Request::get(format!("http://{target}/price"))
                .body(Empty::new())
                .unwrap();
            let res = outgoing.oneshot(call).await?;
            Ok::<_, Enriched>(Response::new(Body::new(res.into_body())))
        }
    });
    let app = Router::new().route_service(
        "/pay",
        ServiceBuilder::new()
            .layer(ErrorEnrichLayer::new("checkout"))
            .service(handler),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let res = http_client()
        .request(
            Request::get(format!("http://{addr}/pay"))
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    // The refused connection keeps its meaning through both layers.
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["code"], "unreachable");
    assert_eq!(
        doc["detail"],
        "A service this one depends on could not be reached: retry later."
    );
    assert!(!String::from_utf8_lossy(&body).contains(&target.to_string()));

    let server_line = logs.by_id(doc["error_id"].as_str().unwrap());
    assert_eq!(server_line.level, tracing::Level::ERROR);
    assert_eq!(server_line.field("route"), Some("/pay"));
    let client_line = only_debug_line(&logs);
    let client_id = client_line.field("id").unwrap();
    assert_ne!(Some(client_id), doc["error_id"].as_str());
    // The server's chain names the call and its id, so one line leads to the other.
    let chain = server_line.field("chain").unwrap();
    assert!(
        chain.starts_with(&format!(
            "dependency unreachable calling {target} (GET /price), error id {client_id}"
        )),
        "{chain}"
    );
}

fn only_debug_line(logs: &Logs) -> support::Line {
    let lines: Vec<_> = logs
        .enrich_lines()
        .into_iter()
        .filter(|l| l.level == tracing::Level::DEBUG)
        .collect();
    assert_eq!(lines.len(), 1);
    lines.into_iter().next().unwrap()
}

/// A readiness failure cannot be an error in server mode: it is kept, and
/// the next call answers with it without calling the inner service.
#[tokio::test]
async fn a_readiness_error_is_answered_by_the_next_call() {
    let (logs, _guard) = capture_logs();
    let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let mut svc = ServiceBuilder::new()
        .layer(ErrorEnrichLayer::new("checkout"))
        .service(mock);
    handle.send_error(atscale_core::Overloaded::new());
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(Body::empty()))
        .await;
    let res: Response<_> = match res {
        Ok(res) => res,
        Err(never) => match never {},
    };
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.extensions().get::<Kind>(), Some(&Kind::Overloaded));
    let id = res
        .extensions()
        .get::<atscale_error::ErrorId>()
        .copied()
        .unwrap();
    assert_eq!(
        logs.by_id(&id.to_string()).field("kind"),
        Some("overloaded")
    );
    // The inner service was never called.
    assert!(handle.poll_request().is_pending());
}
