//! ErrorEnrich: an axum server on loopback whose stack fails in three ways
//! (a database error holding a secret, a rate limit, a panic). The client
//! sees problem+json with an error id; the log line, captured here, carries
//! the same id and the whole chain.

use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::panic;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atscale::core::{BoxError, RateLimited};
use atscale::error::ErrorEnrichLayer;
use axum::Router;
use axum::body::Body;
use axum::extract::Path;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceBuilder;
use tower::filter::FilterLayer;
use tracing::Dispatch;
use tracing::instrument::{WithDispatch, WithSubscriber};

use crate::table::Section;

const SECRET: &str = "password=hunter2";
const PANIC: &str = "tour: a deliberate panic in the handler";

/// An error from the database driver, the kind that must never reach a client.
#[derive(Debug)]
struct LoadOrder;

impl fmt::Display for LoadOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "loading the order: postgres://app:{SECRET}@db refused the connection"
        )
    }
}

impl std::error::Error for LoadOrder {}

/// Where the log lines go: the tour shows them instead of printing them.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("not poisoned").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    /// The captured line holding `id`.
    fn line_with(&self, id: &str) -> Option<String> {
        let text = String::from_utf8_lossy(&self.0.lock().expect("not poisoned")).into_owned();
        text.lines()
            .find(|l| l.contains(&format!("id={id}")))
            .map(str::to_owned)
    }
}

/// The app: `/orders/{id}` behind ErrorEnrich and a filter that fails as the
/// `x-tour` header asks. Every request's events go to `logs`.
async fn serve(logs: LogBuffer) -> Result<SocketAddr, BoxError> {
    let dispatch = Dispatch::new(
        tracing_subscriber::fmt()
            .with_writer(move || logs.clone())
            .with_ansi(false)
            .without_time()
            .finish(),
    );
    let enrich = ErrorEnrichLayer::builder("orders")
        .help_link("https://docs.example.com/errors/{code}")
        .build()?;
    let fail = FilterLayer::new(|req: Request<Body>| {
        match req.headers().get("x-tour").map(|v| v.as_bytes()) {
            Some(b"db") => Err(BoxError::from(LoadOrder)),
            Some(b"rate") => Err(RateLimited::new(Duration::from_millis(1500)).into()),
            Some(b"panic") => panic!("{PANIC}"),
            _ => Ok(req),
        }
    });
    let app = Router::new()
        .route(
            "/orders/{id}",
            get(|Path(id): Path<u32>| async move { format!("order {id}") }),
        )
        // No HandleErrorLayer: with ErrorEnrich outermost the stack cannot fail.
        .layer(
            ServiceBuilder::new()
                .map_future(logs_to(dispatch))
                .layer(enrich)
                .layer(fail),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// Runs each request's future with `dispatch` as its subscriber.
fn logs_to<F>(dispatch: Dispatch) -> impl Fn(F) -> WithDispatch<F> + Clone {
    move |future| future.with_subscriber(dispatch.clone())
}

struct Answer {
    status: StatusCode,
    retry_after: Option<String>,
    content_type: String,
    body: Bytes,
}

/// Sends one request on the connection `sender`.
async fn get_order(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
    fail: &str,
) -> Result<Answer, BoxError> {
    sender.ready().await?;
    let req = Request::get("/orders/42")
        .header("host", addr.to_string())
        .header("x-tour", fail)
        .body(Empty::new())?;
    let res = sender.send_request(req).await?;
    let header = |name: &str| {
        res.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let retry_after = header("retry-after");
    let content_type = header("content-type").unwrap_or_default();
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    Ok(Answer {
        status,
        retry_after,
        content_type,
        body,
    })
}

fn text(doc: &Value, member: &str) -> String {
    match &doc[member] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Keeps the deliberate panic's message off the terminal; other panics
/// still reach the hook that was installed before.
fn quiet_deliberate_panic() {
    let previous = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let deliberate = payload.downcast_ref::<String>().is_some_and(|s| s == PANIC)
            || payload.downcast_ref::<&str>().is_some_and(|s| *s == PANIC);
        if !deliberate {
            previous(info);
        }
    }));
}

pub(crate) async fn run() -> Result<Section, BoxError> {
    let mut section = Section::new(
        "ErrorEnrich",
        "every failure leaves as problem+json with an error id; the log line has the same id and the whole chain",
    );
    quiet_deliberate_panic();
    let logs = LogBuffer::default();
    let addr = serve(logs.clone()).await?;
    // One HTTP/1.1 connection for every request, to show it survives a panic.
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(TcpStream::connect(addr).await?))
            .await?;
    let conn = tokio::spawn(conn);

    // 1. A database error with a secret in its message.
    let db = get_order(&mut sender, addr, "db").await?;
    let doc: Value = serde_json::from_slice(&db.body)?;
    let id = text(&doc, "error_id");
    section.row(
        "GET /orders/42, database fails",
        format!("{} {}", db.status, db.content_type),
    );
    for member in [
        "type",
        "title",
        "status",
        "detail",
        "instance",
        "error_id",
        "timestamp",
    ] {
        section.row(format!("  client sees {member}"), text(&doc, member));
    }
    let line = logs
        .line_with(&id)
        .ok_or("no log line with the response's error id")?;
    let (head, chain) = line.split_once(" chain=").unwrap_or((&line, ""));
    let (message, fields) = head.split_once(" id=").unwrap_or((head, ""));
    section.row("  log line (same id)", message.to_owned());
    let fields: Vec<&str> = fields
        .split(' ')
        .filter(|f| {
            ["kind=", "route=", "layer=", "status="]
                .iter()
                .any(|k| f.starts_with(k))
        })
        .collect();
    section.row("  log fields", fields.join(" "));
    section.row("  log chain (never sent)", chain.to_owned());
    let leaked = String::from_utf8_lossy(&db.body).contains(SECRET);
    section.row(
        "  secret in response / in log",
        format!("{} / {}", yes_no(leaked), yes_no(chain.contains(SECRET))),
    );

    // 2. A rate limit.
    let rate = get_order(&mut sender, addr, "rate").await?;
    let doc: Value = serde_json::from_slice(&rate.body)?;
    section.row(
        "GET /orders/42, rate limited 1.5 s",
        format!(
            "{}, Retry-After: {}, detail: {}",
            rate.status,
            rate.retry_after.as_deref().unwrap_or("none"),
            text(&doc, "detail")
        ),
    );

    // 3. A panic, then a normal request on the same connection.
    let panicked = get_order(&mut sender, addr, "panic").await?;
    let doc: Value = serde_json::from_slice(&panicked.body)?;
    let logged = logs
        .line_with(&text(&doc, "error_id"))
        .is_some_and(|l| l.contains(PANIC));
    section.row(
        "GET /orders/42, handler panics",
        format!(
            "{} {}, panic logged with its id: {}",
            panicked.status,
            text(&doc, "title"),
            yes_no(logged)
        ),
    );
    let after = get_order(&mut sender, addr, "").await?;
    section.row(
        "  then GET /orders/42, same connection",
        format!(
            "{} {:?}, connection open: {}",
            after.status,
            String::from_utf8_lossy(&after.body),
            yes_no(!conn.is_finished())
        ),
    );
    Ok(section)
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}
