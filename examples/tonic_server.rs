//! The recommended server stack on a tonic server:
//! `Server::builder().layer(stack::server(..))`, serving tonic-health's
//! generated service (no protoc needed).
//!
//! Starts the server on 127.0.0.1 (an ephemeral port), calls it a few times
//! with a plain tonic client, prints what came back, and stops:
//!
//! ```sh
//! cargo run --example tonic_server
//! ```
//!
//! - a health check answers `SERVING`;
//! - a check of an unknown service is tonic-health's own `NOT_FOUND`,
//!   passed through untouched;
//! - a malformed `grpc-timeout` is refused with `INVALID_ARGUMENT` and rich
//!   details (`ErrorInfo`, the error id in `RequestInfo`), never ignored;
//! - the rate limit (3 calls, then 3 a second) answers `RESOURCE_EXHAUSTED`
//!   with a `RetryInfo` delay.

use std::time::Duration;

use atscale::core::BoxError;
use atscale::ratelimit::{Limit, Limiter, RateLimitLayer};
use atscale::stack;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter("atscale_error=info")
        .with_target(false)
        .with_ansi(false)
        .init();

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("shop.Orders", ServingStatus::Serving)
        .await;

    // One line: ErrorEnrich → Deadline → Heartbeat → RateLimit → tonic's routes.
    let server = stack::server("orders", Duration::from_secs(1)).with_rate_limit(
        RateLimitLayer::reject(Limiter::new(Limit::per_second(3)?.burst(3)?)),
    );
    let monitor = server.monitor().clone();

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(
        Server::builder()
            .layer(server)
            .add_service(health)
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = stopped.await;
            }),
    );
    println!("listening on http://{addr}\n");

    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut client = HealthClient::new(channel);
    let calls: [(&str, Option<&str>); 5] = [
        ("shop.Orders", None),
        ("shop.Unknown", None),
        ("shop.Orders", Some("1 second")),
        ("shop.Orders", None),
        ("shop.Orders", None),
    ];
    for (service, timeout) in calls {
        let mut req = tonic::Request::new(HealthCheckRequest {
            service: service.into(),
        });
        if let Some(value) = timeout {
            req.metadata_mut().insert("grpc-timeout", value.parse()?);
        }
        let shown = timeout
            .map(|t| format!(" [grpc-timeout: {t}]"))
            .unwrap_or_default();
        println!("Check({service}){shown}");
        match client.check(req).await {
            Ok(res) => println!("  -> OK {:?}\n", res.into_inner().status()),
            Err(status) => {
                println!("  -> {:?}: {}", status.code(), status.message());
                let details = status.get_error_details();
                if let Some(info) = details.error_info() {
                    println!("     reason {}, from {}", info.reason, info.domain);
                }
                if let Some(request) = details.request_info() {
                    println!("     error id {}", request.request_id);
                }
                if let Some(retry) = details.retry_info() {
                    println!("     retry after {:?}", retry.retry_delay);
                }
                println!();
            }
        }
    }

    // The call with a malformed deadline never reached the heartbeat (the
    // deadline layer, outside it, refused it): four calls did.
    monitor.wait_finished(4).await;
    let counts = monitor.counts();
    println!(
        "heartbeat: {} started, {} finished ({} ok, {} failed)",
        counts.started(),
        counts.finished(),
        counts.ok(),
        counts.error()
    );

    let _ = stop.send(());
    serving.await??;
    Ok(())
}
