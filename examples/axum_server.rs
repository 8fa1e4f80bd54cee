//! The recommended server stack on an axum `Router`.
//!
//! Starts the server on 127.0.0.1 (an ephemeral port), sends it a few
//! requests, prints what came back, and stops:
//!
//! ```sh
//! cargo run --example axum_server
//! ```
//!
//! - `GET /` answers at once;
//! - `GET /slow` takes 2 s: a caller allowing 150 ms (`x-deadline-ms: 150`)
//!   gets a 504 problem+json when its deadline passes;
//! - `GET /orders/{id}` fails with an internal error whose text must not
//!   reach the caller: a 500 problem+json with an error id, the text in the log;
//! - the rate limit (5 requests, then 5 a second) answers 429 with `Retry-After`;
//! - `GET /healthz` answers with the heartbeat monitor's health.

use std::time::Duration;

use atscale::core::BoxError;
use atscale::heartbeat::health;
use atscale::ratelimit::{Limit, Limiter, RateLimitLayer};
use atscale::stack::{self, DEADLINE_HEADER};
use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tower::{Layer, service_fn};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Logs: every error the stack answers is logged once, with its id.
    tracing_subscriber::fmt()
        .with_env_filter("atscale_error=info")
        .with_target(false)
        .with_ansi(false)
        .init();

    // One line: ErrorEnrich → Deadline → Heartbeat → RateLimit → the router.
    let server = stack::server("shop", Duration::from_secs(1)).with_rate_limit(
        RateLimitLayer::reject(Limiter::new(Limit::per_second(5)?.burst(5)?)),
    );
    let monitor = server.monitor().clone();

    let app = Router::new()
        .route("/", get(|| async { "hello" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                "slow"
            }),
        )
        .layer(server.clone())
        // A fallible service behind its own copy of the stack (clones share
        // the monitor and the limiter).
        .route_service("/orders/{id}", server.layer(service_fn(order)))
        // Outside the stack: health is not rate limited or counted.
        .route("/healthz", health::route(monitor.clone()));

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    println!("listening on http://{addr}\n");

    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let send = |path: &str, deadline_ms: Option<u64>| {
        let mut req = http::Request::get(format!("http://{addr}{path}"));
        if let Some(ms) = deadline_ms {
            req = req.header(DEADLINE_HEADER, ms);
        }
        let req = req.body(Empty::new()).expect("a valid request");
        let client = client.clone();
        async move {
            let res = client.request(req).await?;
            let status = res.status();
            let retry = res
                .headers()
                .get("retry-after")
                .map(|v| format!(" (retry-after: {})", v.to_str().unwrap_or("?")))
                .unwrap_or_default();
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>((status, retry, String::from_utf8_lossy(&body).into_owned()))
        }
    };

    for (path, deadline) in [
        ("/", None),
        ("/slow", Some(150)),
        ("/orders/42", None),
        ("/", None),
        ("/", None),
        ("/", None),
        ("/healthz", None),
    ] {
        let (status, retry, body) = send(path, deadline).await?;
        let budget = deadline
            .map(|ms| format!(" [x-deadline-ms: {ms}]"))
            .unwrap_or_default();
        println!("GET {path}{budget}\n  -> {status}{retry}\n     {body}\n");
    }

    let counts = monitor.counts();
    println!(
        "heartbeat: {} started, {} finished ({} ok, {} failed, {} cancelled), {} in flight",
        counts.started(),
        counts.finished(),
        counts.ok(),
        counts.error(),
        counts.cancelled(),
        monitor.in_flight()
    );
    assert_eq!(send("/healthz", None).await?.0, StatusCode::OK);

    let _ = stop.send(());
    serving.await??;
    Ok(())
}

/// A fallible `tower::Service` (axum handlers cannot fail): the order
/// lookup fails with an error whose text holds a secret. Behind the stack it
/// becomes a 500 problem+json with an error id; the text stays in the log.
async fn order(req: Request<Body>) -> Result<Response<Body>, BoxError> {
    let id = req.uri().path().trim_start_matches("/orders/");
    if id == "42" {
        return Err("connecting to postgres://shop:hunter2@db:5432 refused".into());
    }
    Ok(Response::new(Body::from(format!("order {id}"))))
}
