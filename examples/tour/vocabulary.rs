//! One vocabulary: a gateway and a backend on loopback, both behind the
//! server stack, the gateway calling the backend through the HTTP client
//! stack. Foreign errors (tower's timeout, an application's own type mapped
//! once) and the backend's answers keep their meaning at the gateway; the
//! backend's own text never leaves it.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use atscale::core::classify::{self, Classification};
use atscale::core::{BoxError, Context, DeadlineExceeded, Kind, RateLimited};
use atscale::stack::{self, DEADLINE_HEADER};
use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt, service_fn};

use crate::table::Section;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// An application's own error: the database gave up on a query.
#[derive(Debug)]
struct DbTimeout;

impl fmt::Display for DbTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad("query on orders_pkey timed out")
    }
}

impl std::error::Error for DbTimeout {}

async fn serve(router: Router) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(addr)
}

/// The backend: fails as its path says, or reports the deadline it inherited.
async fn backend() -> Result<SocketAddr, BoxError> {
    let handler = service_fn(|req: http::Request<Body>| async move {
        let cx = Context::current().expect("set by the server stack");
        let deadline = cx.deadline().expect("a deadline");
        match req.uri().path() {
            "/limited" => Err(BoxError::from(RateLimited::new(Duration::from_secs(2)))),
            // Work that cannot finish in what is left fails at once.
            "/too-slow" => Err(DeadlineExceeded::at(deadline, tokio::time::Instant::now()).into()),
            "/broken" => Ok(http::Response::builder()
                .status(500)
                .header("content-type", "application/problem+json")
                .body(Body::from(
                    r#"{"status":500,"detail":"replica db-3 lost its disk","service":"backend"}"#,
                ))?),
            _ => {
                let sent = req
                    .headers()
                    .get(DEADLINE_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_owned();
                Ok(http::Response::new(Body::from(format!(
                    "{DEADLINE_HEADER}: {sent} ({})",
                    deadline.origin()
                ))))
            }
        }
    });
    serve(
        Router::new()
            .fallback_service(stack::server("backend", Duration::from_secs(10)).layer(handler)),
    )
    .await
}

/// tower's `Elapsed`: a 50 ms `Timeout` around work that takes a second.
fn tower_timeout() -> futures_util::future::BoxFuture<'static, BoxError> {
    async fn slow((): ()) -> Result<(), BoxError> {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(())
    }
    let timeout = tower::timeout::Timeout::new(service_fn(slow), Duration::from_millis(50));
    Box::pin(async move { timeout.oneshot(()).await.unwrap_err() })
}

/// The gateway: `/tower-timeout` and `/db-timeout` fail with foreign errors
/// of their own; `/down` calls a dependency whose port is closed; any other
/// path is forwarded to the backend through the HTTP client stack.
async fn gateway(backend: SocketAddr, client: HttpClient) -> Result<SocketAddr, BoxError> {
    let down = {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        listener.local_addr()?
    };
    let to_backend = stack::http_client("gateway", Duration::from_secs(5))
        .with_dependency("backend")
        .layer(client.clone());
    let to_inventory = stack::http_client("gateway", Duration::from_secs(5))
        .with_dependency("inventory")
        .layer(client);
    let handler = service_fn(move |req: http::Request<Body>| {
        let to_backend = to_backend.clone();
        let to_inventory = to_inventory.clone();
        async move {
            let path = req.uri().path().to_owned();
            let res = match path.as_str() {
                "/tower-timeout" => {
                    return Err(tower_timeout().await);
                }
                "/db-timeout" => return Err(BoxError::from(DbTimeout)),
                "/down" => {
                    let call =
                        http::Request::get(format!("http://{down}/stock")).body(Empty::new())?;
                    to_inventory.oneshot(call).await?
                }
                _ => {
                    let call =
                        http::Request::get(format!("http://{backend}{path}")).body(Empty::new())?;
                    to_backend.oneshot(call).await?
                }
            };
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>(http::Response::new(Body::from(body)))
        }
    });
    serve(
        Router::new()
            .fallback_service(stack::server("gateway", Duration::from_secs(10)).layer(handler)),
    )
    .await
}

struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: String,
}

impl Answer {
    /// `504 deadline_exceeded`, and the user-safe detail.
    fn problem(&self) -> String {
        let doc: Value = serde_json::from_str(&self.body).unwrap_or(Value::Null);
        let mut s = format!("{} {}", self.status, doc["code"].as_str().unwrap_or("?"));
        if let Some(after) = &self.retry_after {
            s.push_str(&format!(", Retry-After: {after}"));
        }
        if let Some(origin) = doc["deadline_origin"].as_str() {
            s.push_str(&format!(", deadline_origin: {origin}"));
        }
        s
    }

    fn detail(&self) -> String {
        let doc: Value = serde_json::from_str(&self.body).unwrap_or(Value::Null);
        doc["detail"].as_str().unwrap_or("").to_owned()
    }
}

async fn get(client: &HttpClient, gateway: SocketAddr, path: &str) -> Result<Answer, BoxError> {
    let req = http::Request::get(format!("http://{gateway}{path}"))
        .header(DEADLINE_HEADER, "800")
        .body(Empty::new())?;
    let res = client.request(req).await?;
    let status = res.status().as_u16();
    let retry_after = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = res.into_body().collect().await?.to_bytes();
    Ok(Answer {
        status,
        retry_after,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

pub(crate) async fn run() -> Result<Section, BoxError> {
    let mut section = Section::new(
        "One vocabulary",
        "foreign errors and a backend's answers keep their meaning at the gateway (caller's x-deadline-ms: 800); the backend's text never leaves it",
    );
    // Once, at start-up: the application's own error type is a deadline.
    classify::map(|_: &DbTimeout| Classification::new(Kind::DeadlineExceeded));

    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let backend = backend().await?;
    let gateway = gateway(backend, client.clone()).await?;

    let answer = get(&client, gateway, "/tower-timeout").await?;
    section.row(
        "tower's Timeout (50 ms) fires in the gateway",
        answer.problem(),
    );
    let answer = get(&client, gateway, "/db-timeout").await?;
    section.row("the gateway's DbTimeout (classify::map)", answer.problem());

    let answer = get(&client, gateway, "/deadline").await?;
    section.row("backend sees the deadline", answer.body.clone());
    let answer = get(&client, gateway, "/limited").await?;
    section.row("backend answers 429, Retry-After: 2", answer.problem());
    let answer = get(&client, gateway, "/too-slow").await?;
    section.row(
        "backend answers 504 (its inherited deadline)",
        answer.problem(),
    );
    section.row("  gateway's detail", answer.detail());
    let answer = get(&client, gateway, "/broken").await?;
    section.row("backend answers 500 with its own text", answer.problem());
    section.row(
        "  backend's text in the gateway's answer",
        if answer.body.contains("db-3") {
            "yes"
        } else {
            "no"
        },
    );
    let answer = get(&client, gateway, "/down").await?;
    section.row("dependency's port closed", answer.problem());
    section.row("  gateway's detail", answer.detail());
    Ok(section)
}
