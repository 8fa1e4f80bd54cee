//! Retry: a flapping tonic health server on loopback (one call in four
//! refused with `UNAVAILABLE`), called without and with a retry policy; then
//! the server goes down for everyone and the A6 throttle stops the retries;
//! then it asks for a pause with `grpc-retry-pushback-ms`; then a deadline
//! leaves no room for a retry.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use atscale::core::{BoxError, Context, Origin, RetryThrottle};
use atscale::hedge::{BufferBodyLayer, BufferedBody};
use atscale::retry::{RetryLayer, RetryPolicy};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::layer::layer_fn;
use tower::{ServiceBuilder, ServiceExt};

use crate::table::Section;

const FLAPPING: u8 = 0;
const DOWN: u8 = 1;
const PUSHBACK: u8 = 2;

/// The server: flapping (every 4th call refused), down (every call
/// refused), or pushing back (every other call refused with a 150 ms
/// pushback). Counts the calls it gets.
async fn server(mode: Arc<AtomicU8>, calls: Arc<AtomicU64>) -> Result<SocketAddr, BoxError> {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let flapping = layer_fn(move |inner: tonic::service::Routes| {
        let (mode, calls) = (mode.clone(), calls.clone());
        tower::service_fn(move |req: http::Request<Body>| {
            let n = calls.fetch_add(1, Ordering::Relaxed);
            let refuse = match mode.load(Ordering::Relaxed) {
                FLAPPING => (n % 4 == 3).then_some(None),
                DOWN => Some(None),
                _ => (n % 2 == 0).then_some(Some("150")),
            };
            let inner = inner.clone();
            async move {
                match refuse {
                    None => inner.oneshot(req).await,
                    Some(pushback) => {
                        let mut status = tonic::Status::unavailable("restarting");
                        if let Some(ms) = pushback {
                            status
                                .metadata_mut()
                                .insert("grpc-retry-pushback-ms", ms.parse().expect("ascii"));
                        }
                        Ok(status.into_http())
                    }
                }
            }
        })
    });
    tokio::spawn(
        Server::builder()
            .layer(flapping)
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Ok(addr)
}

type Buffered = http::Request<BufferedBody<Body>>;

/// The channel behind a retry layer: buffered requests in, tonic bodies out.
type Retried = atscale::hedge::BufferBody<
    atscale::retry::Retry<tower::util::MapRequest<Channel, fn(Buffered) -> http::Request<Body>>>,
>;

/// A health client retrying by `layer` (tonic's request body is a stream:
/// buffered so that a retry can replay it, then given back to the channel).
fn client(channel: Channel, layer: RetryLayer) -> HealthClient<Retried> {
    let stack = ServiceBuilder::new()
        .layer(BufferBodyLayer::new(64 * 1024).non_idempotent(true))
        .layer(layer)
        .map_request((|req: Buffered| req.map(Body::new)) as fn(Buffered) -> http::Request<Body>)
        .service(channel);
    HealthClient::new(stack)
}

fn check() -> HealthCheckRequest {
    HealthCheckRequest {
        service: String::new(),
    }
}

pub(crate) async fn run() -> Result<Section, BoxError> {
    let mut section = Section::new(
        "Retry",
        "a tonic server that refuses 1 call in 4 with UNAVAILABLE, then goes down, then pushes back; gRFC A6 retries with backoff, pushback and one throttle",
    );
    let mode = Arc::new(AtomicU8::new(FLAPPING));
    let calls = Arc::new(AtomicU64::new(0));
    let addr = server(mode.clone(), calls.clone()).await?;
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;

    // Without a policy: every refusal reaches the caller.
    let mut plain = HealthClient::new(channel.clone());
    let mut failed = 0;
    for _ in 0..100 {
        failed += usize::from(plain.check(check()).await.is_err());
    }
    section.row(
        "100 health checks, flapping server, no retry",
        format!("{} ok, {failed} UNAVAILABLE", 100 - failed),
    );

    // With a policy: 3 attempts, 20 ms backoff doubling (x 0.8..1.2), a
    // throttle of 10 tokens and ratio 0.5 (retries stop past ~33% failures).
    let policy = RetryPolicy::builder()
        .max_attempts(3)
        .initial_backoff(Duration::from_millis(20))
        .max_backoff(Duration::from_millis(200))
        .non_idempotent(true) // gRPC calls are POSTs; a health check is safe to repeat
        .build()?;
    let throttle = RetryThrottle::new(10, 0.5)?;
    let mut retried = client(
        channel.clone(),
        RetryLayer::new(policy.clone()).throttle(throttle.clone()),
    );
    let before = calls.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut failed = 0;
    for _ in 0..100 {
        failed += usize::from(retried.check(check()).await.is_err());
    }
    section.row(
        "the same, RetryLayer (3 attempts, 20 ms backoff)",
        format!(
            "{} ok, {failed} failed; {} calls at the server, {:.0?} in all",
            100 - failed,
            calls.load(Ordering::Relaxed) - before,
            started.elapsed()
        ),
    );

    // Down for everyone: the throttle drains to half and retries stop.
    mode.store(DOWN, Ordering::Relaxed);
    let before = calls.load(Ordering::Relaxed);
    for _ in 0..100 {
        let _ = retried.check(check()).await;
    }
    section.row(
        "100 checks, server down, the same client",
        format!(
            "{} calls at the server ({:.2}x): throttle at {} of {} tokens, retries off",
            calls.load(Ordering::Relaxed) - before,
            (calls.load(Ordering::Relaxed) - before) as f64 / 100.0,
            throttle.tokens(),
            throttle.max_tokens()
        ),
    );

    // Pushback: the server asks for 150 ms; the retry waits exactly that.
    mode.store(PUSHBACK, Ordering::Relaxed);
    calls.store(0, Ordering::Relaxed); // the next call is refused with a pushback
    let mut fresh = client(channel.clone(), RetryLayer::new(policy.clone()));
    let started = Instant::now();
    let answer = fresh.check(check()).await;
    section.row(
        "check refused with grpc-retry-pushback-ms: 150",
        format!(
            "{} after {:.0?} (2 attempts; the backoff would have been ~20 ms)",
            if answer.is_ok() { "SERVING" } else { "failed" },
            started.elapsed()
        ),
    );

    // A deadline that leaves no room for the backoff: the error comes back
    // at once, saying how many attempts were made.
    mode.store(DOWN, Ordering::Relaxed);
    let slow_backoff = RetryPolicy::builder()
        .initial_backoff(Duration::from_millis(200))
        .non_idempotent(true)
        .build()?;
    let svc = ServiceBuilder::new()
        .layer(BufferBodyLayer::new(64 * 1024).non_idempotent(true))
        .layer(RetryLayer::new(slow_backoff))
        .map_request((|req: Buffered| req.map(Body::new)) as fn(Buffered) -> http::Request<Body>)
        .service(channel);
    let mut req = http::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .body(Body::empty())?;
    req.extensions_mut()
        .insert(Context::new().with_budget(Duration::from_millis(100), Origin::Local));
    let started = Instant::now();
    let res = svc.oneshot(req).await?;
    section.row(
        "100 ms deadline, 200 ms backoff, server down",
        format!(
            "grpc-status {} after {:.0?}, {} attempt(s): no retry that cannot finish in time",
            res.headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?"),
            started.elapsed(),
            res.extensions()
                .get::<atscale::retry::Attempts>()
                .map_or(1, |a| a.0)
        ),
    );
    Ok(section)
}
