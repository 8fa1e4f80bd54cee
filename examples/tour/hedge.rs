//! Hedge: a tonic health server on loopback with a slow tail (one call in 40
//! stalls for 250 ms). The same calls unhedged, then hedged at the 95th
//! percentile of recent latencies; then the server slows down for everyone
//! and the 5% budget keeps the hedges from doubling its load.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use atscale::core::BoxError;
use atscale::hedge::{Budget, BufferBodyLayer, BufferedBody, Delay, HedgeLayer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::body::Body;
use tonic::transport::{Endpoint, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::layer::layer_fn;
use tower::{ServiceBuilder, ServiceExt};

use crate::table::Section;

const CONCURRENCY: usize = 16;

/// The server: every 40th call stalls 250 ms; when `overloaded`, every call
/// takes 60 ms. Counts the calls it gets.
async fn server(
    overloaded: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
) -> Result<SocketAddr, BoxError> {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let slow_tail = layer_fn(move |inner: tonic::service::Routes| {
        let (overloaded, calls) = (overloaded.clone(), calls.clone());
        tower::service_fn(move |req: http::Request<Body>| {
            let n = calls.fetch_add(1, Ordering::Relaxed);
            let pause = if overloaded.load(Ordering::Relaxed) {
                Duration::from_millis(60)
            } else if n % 40 == 7 {
                Duration::from_millis(250)
            } else {
                Duration::ZERO
            };
            let inner = inner.clone();
            async move {
                tokio::time::sleep(pause).await;
                inner.oneshot(req).await
            }
        })
    });
    tokio::spawn(
        Server::builder()
            .layer(slow_tail)
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Ok(addr)
}

/// `total` health checks at concurrency 16; the latencies, sorted.
async fn load<T>(client: HealthClient<T>, total: u64) -> Result<Vec<Duration>, BoxError>
where
    T: tonic::client::GrpcService<Body> + Clone + Send + 'static,
    T::Future: Send,
    T::Error: Into<BoxError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<BoxError> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (mut client, next) = (client.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let started = Instant::now();
                client
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await?;
                latencies.push(started.elapsed());
            }
            Ok::<_, tonic::Status>(latencies)
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await??);
    }
    all.sort();
    Ok(all)
}

fn summary(latencies: &[Duration]) -> String {
    let at = |q: f64| {
        latencies[((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    format!(
        "p50 {:.1?}, p99 {:.0?}, max {:.0?}",
        at(0.5),
        at(0.99),
        latencies[latencies.len() - 1]
    )
}

pub(crate) async fn run() -> Result<Section, BoxError> {
    let mut section = Section::new(
        "Hedge",
        "a tonic server with a slow tail (1 call in 40 stalls 250 ms); backups at the p95 of recent latencies, within 5% extra load",
    );
    let overloaded = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let addr = server(overloaded.clone(), calls.clone()).await?;
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;

    // Unhedged.
    let plain = load(HealthClient::new(channel.clone()), 300).await?;
    section.row("300 health checks, no hedge", summary(&plain));

    // Hedged: tonic's request body is a stream, so buffer it (a health check
    // is a few bytes) and give the channel a tonic body back.
    let hedge = HedgeLayer::builder()
        .delay(Delay::adaptive().percentile(0.95).min_samples(50))
        .budget(Budget::ratio(0.05).window(200))
        .non_idempotent(true) // gRPC calls are POSTs; a health check is safe to repeat
        .build()?;
    let stats = hedge.stats();
    let stack = ServiceBuilder::new()
        .layer(BufferBodyLayer::new(64 * 1024).non_idempotent(true))
        .layer(hedge)
        .map_request(|req: http::Request<BufferedBody<Body>>| req.map(Body::new))
        .service(channel);
    let client = HealthClient::new(stack);
    load(client.clone(), 100).await?; // the window fills up
    let (sent, won) = (stats.hedges_sent(), stats.hedges_won());
    let hedged = load(client.clone(), 300).await?;
    section.row("300 health checks, hedged", summary(&hedged));
    section.row(
        "hedges sent / won",
        format!(
            "{} / {} (delay now {:.1?}; {:.1}% extra over all {} requests so far)",
            stats.hedges_sent() - sent,
            stats.hedges_won() - won,
            stats.current_delay().unwrap_or_default(),
            stats.extra_load() * 100.0,
            stats.requests(),
        ),
    );

    // Everyone slow: every call now outlasts the delay, and the budget holds.
    overloaded.store(true, Ordering::Relaxed);
    let (sent, refused, before) = (
        stats.hedges_sent(),
        stats.budget_denials(),
        calls.load(Ordering::Relaxed),
    );
    let slow = load(client, 300).await?;
    let server_calls = calls.load(Ordering::Relaxed) - before;
    section.row(
        "300 checks, server slowed to 60 ms for everyone",
        summary(&slow),
    );
    section.row(
        "extra load while slow (budget: 5% of any 200 calls)",
        format!(
            "{} hedges = {:.1}% ({} calls at the server), {} refused by the budget",
            stats.hedges_sent() - sent,
            (server_calls as f64 / 300.0 - 1.0) * 100.0,
            server_calls,
            stats.budget_denials() - refused
        ),
    );
    Ok(section)
}
