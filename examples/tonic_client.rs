//! The recommended client stack on tonic `Channel`s, under tonic-health's
//! generated `HealthClient`.
//!
//! Starts two replicas of a tonic-health server on 127.0.0.1 (ephemeral
//! ports; the first one answers after 300 ms, the second at once), calls
//! them through the stack, prints what happened, and stops:
//!
//! ```sh
//! cargo run --example tonic_client
//! ```
//!
//! - calls alternate between the replicas; a call that starts on the slow
//!   one is hedged to the fast one after 40 ms, and answered from there;
//! - a call to the slow replica made while serving a request whose caller
//!   allowed 100 ms carries what is left in `grpc-timeout`, and fails with
//!   `DEADLINE_EXCEEDED` when it passes (whichever timer fires first: the
//!   stack's, or tonic's own on the `Channel` or the server), never hangs;
//! - the heartbeat monitor counts every attempt.

use std::time::{Duration, Instant};

use atscale::core::{BoxError, Context, Kind, Origin};
use atscale::hedge::{Budget, Delay, HedgeLayer};
use atscale::ratelimit::{Limit, Limiter, RateLimitLayer};
use atscale::stack::{self, ClientStack};
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::layer::layer_fn;
use tower::{Layer, ServiceExt, service_fn};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let slow = replica("slow", Duration::from_millis(300)).await?;
    let fast = replica("fast", Duration::ZERO).await?;

    // One line for the stack; the hedge and the rate limit are opt-in.
    let client = ClientStack::new("storefront", Duration::from_secs(2))
        .with_rate_limit(RateLimitLayer::new(Limiter::new(Limit::per_second(100)?)))
        .with_hedge(
            HedgeLayer::builder()
                .delay(Delay::fixed(Duration::from_millis(40)))
                // Up to one hedge per call: a demo's worth (the default is
                // 5% of the last 1,000 calls, plus a per-second floor).
                .budget(Budget::ratio(1.0))
                .non_idempotent(true) // Health/Check is safe to repeat
                .build()?,
        );
    let stats = client.hedge_stats();
    let monitor = client.monitor().clone();
    let mut health = HealthClient::new(client.replicas(vec![slow.clone(), fast])?);

    for n in 1..=4 {
        let started = Instant::now();
        let res = health.check(HealthCheckRequest::default()).await?;
        println!(
            "call {n}: {:?} in {:>6.1?}",
            res.into_inner().status(),
            started.elapsed()
        );
    }
    println!(
        "hedges: {} sent, {} won\n",
        stats.hedges_sent(),
        stats.hedges_won()
    );

    // Inside a handler whose caller allowed 100 ms (set up by hand here; a
    // server stack does it for every request), a call to the slow replica
    // alone inherits what is left, and cannot make it.
    let mut slow_only =
        HealthClient::new(stack::client("storefront", Duration::from_secs(2)).layer(slow));
    let served = Context::new().with_budget(Duration::from_millis(100), Origin::GrpcTimeout);
    let started = Instant::now();
    let outcome = served
        .scope(slow_only.check(HealthCheckRequest::default()))
        .await;
    match outcome {
        Ok(_) => println!("within 100 ms: answered in {:.1?}", started.elapsed()),
        Err(status) => {
            // The status is the server's when it answered one, else the
            // stack's own; the chain behind it keeps the kind.
            let kind = std::error::Error::source(&status).map(Kind::of);
            println!(
                "within 100 ms: {:?} \"{}\" after {:.1?} (kind: {})",
                status.code(),
                status.message(),
                started.elapsed(),
                kind.map_or("-", Kind::as_str)
            );
        }
    }

    monitor.wait_for(|c| c.finished() == c.started()).await;
    let counts = monitor.counts();
    println!(
        "heartbeat: {} attempts ({} ok, {} failed, {} cancelled: the hedges' losers)",
        counts.started(),
        counts.ok(),
        counts.error(),
        counts.cancelled()
    );
    Ok(())
}

/// A tonic-health replica behind the recommended server stack, answering
/// after `delay`; a connected channel to it.
async fn replica(name: &'static str, delay: Duration) -> Result<Channel, BoxError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let slow_down = layer_fn(move |inner: Routes| {
        service_fn(move |req: http::Request<Body>| {
            let inner = inner.clone();
            async move {
                tokio::time::sleep(delay).await;
                inner.oneshot(req).await
            }
        })
    });
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = Server::builder()
        .layer(
            tower::ServiceBuilder::new()
                .layer(stack::server(name, Duration::from_secs(5)))
                .layer(slow_down),
        )
        .add_service(health)
        .serve_with_incoming(TcpIncoming::from(listener));
    tokio::spawn(async move {
        let _reporter = reporter;
        server.await
    });
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?)
}
