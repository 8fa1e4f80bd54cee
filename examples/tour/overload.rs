//! Overload: a CPU-bound axum server on loopback, offered about three times
//! what it can serve, with 100 ms deadlines: without overload protection
//! every request slows down together and almost none answers in time; with
//! `OverloadLayer` the server keeps answering at its capacity and refuses
//! the rest at once with 503 + `Retry-After`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use atscale::ServiceBuilderExt;
use atscale::core::BoxError;
use atscale::deadline::DeadlineLayer;
use atscale::error::ErrorEnrichLayer;
use atscale::overload::{Admission, OverloadLayer};
use axum::Router;
use axum::http::{HeaderName, Request, StatusCode};
use axum::routing::get;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tower::ServiceBuilder;

use crate::table::Section;

const X_DEADLINE: HeaderName = HeaderName::from_static("x-deadline-ms");
/// CPU per request, burnt in slices with a yield between them, so that the
/// requests in service share the server's thread as they would share cores.
const SLICES: u32 = 8;
const SLICE: Duration = Duration::from_micros(500);
const OFFERED: Duration = Duration::from_millis(1500);

type HttpClient = Client<HttpConnector, Empty<bytes::Bytes>>;

async fn burn() -> &'static str {
    for _ in 0..SLICES {
        let start = Instant::now();
        while start.elapsed() < SLICE {
            std::hint::spin_loop();
        }
        tokio::task::yield_now().await;
    }
    "done"
}

/// The server, on a thread and a single-threaded runtime of its own (one
/// "CPU"), behind ErrorEnrich → Deadline (`x-deadline-ms`) → [Overload].
fn server(overload: Option<OverloadLayer>) -> Result<SocketAddr, BoxError> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let outer = ServiceBuilder::new()
                .enrich_errors(ErrorEnrichLayer::new("tour"))
                .deadline(DeadlineLayer::server(Duration::from_secs(5)).with_header(X_DEADLINE));
            let router = Router::new().route("/", get(burn));
            let router = match overload {
                Some(overload) => router.layer(outer.overload(overload)),
                None => router.layer(outer),
            };
            let listener = TcpListener::from_std(std_listener).expect("listener");
            // Ends with the process (the tour's last line).
            let _ = axum::serve(listener, router).await;
        });
    });
    Ok(addr)
}

struct Tally {
    in_time: AtomicU64,
    late: AtomicU64,
    refused: AtomicU64,
    retry_after: AtomicU64,
}

/// Open-loop load: `rate` requests per second for `OFFERED`, each with a
/// 100 ms deadline; waits for every answer (bounded by the deadlines).
async fn offer(client: &HttpClient, addr: SocketAddr, rate: f64) -> Arc<Tally> {
    let tally = Arc::new(Tally {
        in_time: AtomicU64::new(0),
        late: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        retry_after: AtomicU64::new(0),
    });
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let start = Instant::now();
    let mut calls = Vec::new();
    while start.elapsed() < OFFERED {
        tick.tick().await;
        let (client, tally) = (client.clone(), tally.clone());
        calls.push(tokio::spawn(async move {
            let req = Request::get(format!("http://{addr}/"))
                .header(X_DEADLINE, "100")
                .body(Empty::new())
                .expect("valid request");
            let sent = Instant::now();
            let Ok(res) = client.request(req).await else {
                tally.late.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let took = sent.elapsed();
            let counter = match res.status() {
                StatusCode::OK if took <= Duration::from_millis(100) => &tally.in_time,
                StatusCode::SERVICE_UNAVAILABLE => {
                    if let Some(secs) = res.headers().get("retry-after") {
                        let secs = secs.to_str().unwrap_or("0").parse().unwrap_or(0);
                        tally.retry_after.store(secs, Ordering::Relaxed);
                    }
                    &tally.refused
                }
                _ => &tally.late,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }));
    }
    for call in calls {
        let _ = tokio::time::timeout(Duration::from_secs(5), call).await;
    }
    tally
}

fn describe(t: &Tally, capacity: f64) -> String {
    let secs = OFFERED.as_secs_f64();
    let in_time = t.in_time.load(Ordering::Relaxed) as f64;
    format!(
        "{:.0}/s in time ({:.0}% of capacity); {} late or 504; {} refused (503)",
        in_time / secs,
        in_time / secs / capacity * 100.0,
        t.late.load(Ordering::Relaxed),
        t.refused.load(Ordering::Relaxed),
    )
}

pub(crate) async fn run() -> Result<Section, BoxError> {
    let mut section = Section::new(
        "Overload",
        "An adaptive concurrency limit and a deadline-aware queue keep goodput at capacity when offered 3x of it.",
    );
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    // Capacity: one request at a time, on the bare server.
    let bare = server(None)?;
    let n = 40;
    let start = Instant::now();
    for _ in 0..n {
        let req = Request::get(format!("http://{bare}/"))
            .body(Empty::new())
            .expect("valid request");
        client.request(req).await?;
    }
    let capacity = n as f64 / start.elapsed().as_secs_f64();
    section.row(
        "capacity: one request at a time (4 ms of CPU each)",
        format!("{capacity:.0} requests/s"),
    );
    let rate = 3.0 * capacity;

    let without = offer(&client, bare, rate).await;
    section.row(
        format!("{rate:.0} req/s for 1.5 s, 100 ms deadlines, no overload layer"),
        describe(&without, capacity),
    );

    let overload = OverloadLayer::new();
    let admission: Admission = overload.admission();
    let protected = server(Some(overload))?;
    // A moment of ordinary traffic first, so the layer knows the service time.
    let _warm = offer_briefly(&client, protected, capacity / 2.0).await;
    let with = offer(&client, protected, rate).await;
    section.row(
        format!("{rate:.0} req/s for 1.5 s, 100 ms deadlines, + OverloadLayer::new()"),
        describe(&with, capacity),
    );
    section.row(
        "the layer afterwards",
        format!(
            "limit {}, {} in flight, {} queued; refusals said Retry-After: {} s",
            admission.limit(),
            admission.in_flight(),
            admission.queue_depth(),
            with.retry_after.load(Ordering::Relaxed)
        ),
    );
    Ok(section)
}

/// 300 ms of light traffic.
async fn offer_briefly(client: &HttpClient, addr: SocketAddr, rate: f64) -> u64 {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let start = Instant::now();
    let mut ok = 0;
    while start.elapsed() < Duration::from_millis(300) {
        tick.tick().await;
        let req = Request::get(format!("http://{addr}/"))
            .header(X_DEADLINE, "100")
            .body(Empty::new())
            .expect("valid request");
        if client.request(req).await.is_ok() {
            ok += 1;
        }
    }
    ok
}
