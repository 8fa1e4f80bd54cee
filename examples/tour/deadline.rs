//! Deadline: a gateway and a backend on loopback. The caller's deadline
//! header is inherited at the gateway, propagated to the backend with what is
//! left of it, and enforced at both hops.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use atscale::core::{BoxError, Context, Kind};
use atscale::deadline::DeadlineLayer;
use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::http::{HeaderMap, HeaderName, Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tower::{ServiceBuilder, ServiceExt};

use crate::table::Section;

const X_DEADLINE: HeaderName = HeaderName::from_static("x-deadline-ms");

type HttpClient = Client<HttpConnector, Empty<bytes::Bytes>>;

async fn serve(router: Router) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(addr)
}

/// Until ErrorEnrich is in the stack: the error's kind decides the status.
async fn status_of(err: BoxError) -> (StatusCode, String) {
    (Kind::of(&*err).http_status(), err.to_string())
}

/// The backend: says how much of the deadline it inherited; `/slow` hangs
/// until its context is cancelled, and reports that it was.
async fn backend(cancelled: mpsc::UnboundedSender<Duration>) -> Result<SocketAddr, BoxError> {
    let inherited = |headers: HeaderMap| async move {
        let cx = Context::current().expect("set by DeadlineLayer");
        let deadline = cx.deadline().expect("a deadline");
        let sent = headers
            .get(X_DEADLINE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        format!(
            "header {sent} ms, deadline {:?} ({})",
            deadline.budget(),
            deadline.origin()
        )
    };
    let slow = move || async move {
        let cx = Context::current().expect("set by DeadlineLayer");
        let started = Instant::now();
        // Report when the work is cancelled: by this hop's own deadline or the caller hanging up.
        tokio::spawn({
            let cx = cx.clone();
            async move {
                cx.cancelled().await;
                let _ = cancelled.send(started.elapsed());
            }
        });
        cx.cancelled().await;
        "too late"
    };
    let router = Router::new()
        .route("/inherit", get(inherited))
        .route("/slow", get(slow))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(status_of))
                .layer(DeadlineLayer::server(Duration::from_secs(10)).with_header(X_DEADLINE)),
        );
    serve(router).await
}

/// The gateway: forwards to the backend through a client-side DeadlineLayer.
async fn gateway(backend: SocketAddr, client: HttpClient) -> Result<SocketAddr, BoxError> {
    let outgoing = ServiceBuilder::new()
        .layer(
            DeadlineLayer::client(Duration::MAX)
                .with_header(X_DEADLINE)
                .without_grpc_timeout(),
        )
        .service(client);
    let forward = move |path: String| {
        let outgoing = outgoing.clone();
        async move {
            let req = Request::get(format!("http://{backend}{path}"))
                .body(Empty::new())
                .expect("valid request");
            match outgoing.oneshot(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    (status, String::from_utf8_lossy(&body).into_owned())
                }
                Err(err) => (Kind::of(&*err).http_status(), format!("gateway: {err}")),
            }
            .into_response()
        }
    };
    let router = Router::new()
        .route(
            "/inherit",
            get({
                let forward = forward.clone();
                move || forward("/inherit".to_owned())
            }),
        )
        .route("/slow", get(move || forward("/slow".to_owned())))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(status_of))
                .layer(DeadlineLayer::server(Duration::from_secs(2)).with_header(X_DEADLINE)),
        );
    serve(router).await
}

async fn send(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    deadline: Option<&str>,
) -> Result<(StatusCode, String, Duration), BoxError> {
    let mut req = Request::get(format!("http://{addr}{path}"));
    if let Some(ms) = deadline {
        req = req.header(X_DEADLINE, ms);
    }
    let started = Instant::now();
    let resp = client.request(req.body(Empty::new())?).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((
        status,
        String::from_utf8_lossy(&body).into_owned(),
        started.elapsed(),
    ))
}

pub(crate) async fn run() -> Result<Section, BoxError> {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let (cancelled_tx, mut cancelled) = mpsc::unbounded_channel();
    let backend = backend(cancelled_tx).await?;
    let gateway = gateway(backend, client.clone()).await?;

    let mut section = Section::new(
        "Deadline",
        "client -> gateway (own budget 2 s) -> backend (own budget 10 s); x-deadline-ms carries the budget",
    );
    let (status, body, _) = send(&client, gateway, "/inherit", Some("800")).await?;
    section.row(
        "x-deadline-ms: 800 to the gateway",
        format!("{status}; backend got {body}"),
    );
    let (status, body, _) = send(&client, gateway, "/inherit", None).await?;
    section.row(
        "no deadline from the client",
        format!("{status}; backend got {body}"),
    );
    let (status, body, took) = send(&client, gateway, "/slow", Some("250")).await?;
    section.row(
        "x-deadline-ms: 250, backend hangs",
        format!("{status} after {} ms: {body}", took.as_millis()),
    );
    let work = tokio::time::timeout(Duration::from_secs(2), cancelled.recv()).await?;
    let work = work
        .map(|d| format!("cancelled after {} ms", d.as_millis()))
        .unwrap_or_else(|| "not cancelled".into());
    section.row("the backend's work for that request", work);
    let (status, body, _) = send(&client, backend, "/slow", Some("100")).await?;
    section.row(
        "x-deadline-ms: 100 straight to the backend",
        format!("{status}: {body}"),
    );
    let (status, body, _) = send(&client, gateway, "/inherit", Some("1.5s")).await?;
    section.row(
        "x-deadline-ms: 1.5s (malformed)",
        format!("{status}: {body}"),
    );
    Ok(section)
}
