//! Rate limit: a server on loopback limiting each client by its peer
//! address (waiting, in arrival order), a strict route that rejects with
//! `Retry-After`, a deadline that turns a long wait into an immediate 429,
//! and the book's API client whose calls share one API limit and each obey
//! a resource limit of their own, all reserved at once.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use atscale::core::{BoxError, Kind, RateLimited, find};
use atscale::deadline::DeadlineLayer;
use atscale::ratelimit::{KeyedLimiter, Limit, Limiter, PeerIp, RateLimitLayer};
use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::http::{HeaderName, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::table::Section;

const X_DEADLINE: HeaderName = HeaderName::from_static("x-deadline-ms");

type HttpClient = Client<HttpConnector, Empty<bytes::Bytes>>;

/// Until ErrorEnrich is in the stack: 429 with `Retry-After` for a rate
/// limit, the kind's status otherwise.
async fn to_response(err: BoxError) -> Response {
    let status = Kind::of(&*err).http_status();
    let mut resp = (status, err.to_string()).into_response();
    if let Some(limited) = find::<RateLimited>(&*err) {
        let secs = limited.retry_after().as_secs_f64().ceil().max(1.0) as u64;
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

async fn server() -> Result<SocketAddr, BoxError> {
    // Each client (by peer address, never by a header it could forge):
    // 4 per second, bursts of 2; waiting requests are served in arrival order.
    let per_client = KeyedLimiter::<IpAddr>::builder(Limit::per_second(4)?.burst(2)?)
        .max_keys(10_000)
        .build()?;
    let waiting = RateLimitLayer::builder()
        .keyed(PeerIp::new(), per_client)
        .build()?;
    // A strict route: once per second, and no waiting.
    let strict = RateLimitLayer::reject(Limiter::new(Limit::per_second(1)?));
    // A slow route: once every 2 s, waiting, within the caller's deadline.
    let slow = RateLimitLayer::new(Limiter::new(Limit::new(1, Duration::from_secs(2))?));

    let router = Router::new()
        .route(
            "/hello",
            get(|| async { "hello" }).layer(
                ServiceBuilder::new()
                    .layer(HandleErrorLayer::new(to_response))
                    .layer(waiting),
            ),
        )
        .route(
            "/strict",
            get(|| async { "strict" }).layer(
                ServiceBuilder::new()
                    .layer(HandleErrorLayer::new(to_response))
                    .layer(strict),
            ),
        )
        .route(
            "/slow",
            get(|| async { "slow" }).layer(
                ServiceBuilder::new()
                    .layer(HandleErrorLayer::new(to_response))
                    .layer(DeadlineLayer::server(Duration::from_secs(10)).with_header(X_DEADLINE))
                    .layer(slow),
            ),
        )
        // The API the client example calls.
        .route("/file", get(|| async { "file contents" }))
        .route("/resolve", get(|| async { "10.0.0.7" }));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    Ok(addr)
}

fn get_req(url: String) -> Request<Empty<bytes::Bytes>> {
    Request::get(url).body(Empty::new()).expect("valid request")
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

pub(crate) async fn run() -> Result<Section, BoxError> {
    let mut section = Section::new(
        "Rate limit",
        "Limits shared by services and reserved all at once; waits in arrival order within the deadline; 429 + Retry-After.",
    );
    let addr = server().await?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    // 1. Four requests at once from one client: two pass, two wait their turn.
    let start = Instant::now();
    let mut calls = Vec::new();
    for _ in 0..4 {
        let client = client.clone();
        let url = format!("http://{addr}/hello");
        calls.push(tokio::spawn(async move {
            let resp = client.request(get_req(url)).await;
            (resp.map(|r| r.status()), start.elapsed())
        }));
    }
    let mut answers = Vec::new();
    for call in calls {
        let (status, took) = call.await?;
        answers.push((took, status?));
    }
    answers.sort();
    for (i, (took, status)) in answers.into_iter().enumerate() {
        section.row(
            format!(
                "GET /hello x4 at once, answer {} (4/s, burst 2, per peer IP)",
                i + 1
            ),
            format!("{status} after {}", ms(took)),
        );
    }

    // 2. Reject mode: the second request is refused with Retry-After.
    for i in 1..=2 {
        let resp = client
            .request(get_req(format!("http://{addr}/strict")))
            .await?;
        let retry = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(|s| format!(", Retry-After: {s}"))
            .unwrap_or_default();
        section.row(
            format!("GET /strict #{i} (1/s, reject mode)"),
            format!("{}{retry}", resp.status()),
        );
    }

    // 3. The wait would pass the caller's deadline: refused at once.
    client
        .request(get_req(format!("http://{addr}/slow")))
        .await?;
    let mut req = get_req(format!("http://{addr}/slow"));
    req.headers_mut()
        .insert(X_DEADLINE, HeaderValue::from_static("300"));
    let started = Instant::now();
    let resp = client.request(req).await?;
    let retry = resp
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    section.row(
        "GET /slow with a 300 ms deadline, next slot in 2 s",
        format!(
            "{} after {} (not 300), Retry-After: {retry}",
            resp.status(),
            ms(started.elapsed())
        ),
    );
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);

    // 4. The book's API client, four times faster so the tour stays short:
    // the API allows 8/s (burst 2) and 40/min, shared by read_file and
    // resolve_address; read_file also obeys the disk (4/s, burst 1) and
    // resolve_address the network (12/s, burst 3).
    let api_per_second = Limiter::new(Limit::per_second(8)?.burst(2)?);
    let api_per_minute = Limiter::new(Limit::per_minute(40)?);
    let disk = Limiter::new(Limit::per_second(4)?.burst(1)?);
    let network = Limiter::new(Limit::per_second(12)?.burst(3)?);
    let read_file = ServiceBuilder::new()
        .layer(
            RateLimitLayer::builder()
                .limiter(api_per_second.clone())
                .limiter(api_per_minute.clone())
                .limiter(disk)
                .build()?,
        )
        .service(client.clone());
    let resolve_address = ServiceBuilder::new()
        .layer(
            RateLimitLayer::builder()
                .limiter(api_per_second)
                .limiter(api_per_minute)
                .limiter(network)
                .build()?,
        )
        .service(client.clone());
    // Calls are reserved in `call`, in the order made: read, resolve, read, …
    let start = Instant::now();
    let (mut read_file, mut resolve_address) = (read_file, resolve_address);
    let mut calls = Vec::new();
    for i in 1..=3 {
        let read = read_file
            .ready()
            .await?
            .call(get_req(format!("http://{addr}/file")));
        calls.push((
            format!("client read_file #{i} (api + disk)"),
            tokio::spawn(read),
        ));
        let resolve = resolve_address
            .ready()
            .await?
            .call(get_req(format!("http://{addr}/resolve")));
        calls.push((
            format!("client resolve_address #{i} (api + network)"),
            tokio::spawn(resolve),
        ));
    }
    for (what, call) in calls {
        let resp = call.await??;
        section.row(
            what,
            format!("{} after {}", resp.status(), ms(start.elapsed())),
        );
    }
    Ok(section)
}
