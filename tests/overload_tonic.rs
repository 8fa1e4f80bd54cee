//! The overload layer in a real tonic server on loopback (ErrorEnrich →
//! Deadline → Overload → tonic-health): a refusal is `UNAVAILABLE` with
//! reason `OVERLOADED` and a `RetryInfo`, and a client's adaptive throttle
//! (`ThrottleLayer` around its `Channel`) counts it as the backend refusing
//! work, while an answered call counts as accepted.

mod loopback;

use std::sync::Arc;
use std::time::Duration;

use atscale::core::{BoxError, Clock};
use atscale::deadline::DeadlineLayer;
use atscale::error::ErrorEnrichLayer;
use atscale::overload::OverloadLayer;
use atscale::overload::limit::Vegas;
use atscale::overload::throttle::ThrottleLayer;
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};

const BOUND: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_refusal_is_unavailable_overloaded_with_retry_info_and_the_client_throttle_counts_it()
-> Result<(), BoxError> {
    let overload = OverloadLayer::builder()
        .algorithm(Vegas::new())
        .min_limit(1)
        .max_limit(1)
        .initial_limit(1)
        .queue_capacity(0)
        .clock(Clock::tokio())
        .build()?;
    let admission = overload.admission();
    let addr = loopback::serve_health(
        ServiceBuilder::new()
            .layer(ErrorEnrichLayer::new("health"))
            .layer(DeadlineLayer::server(Duration::from_secs(30)))
            .layer(overload.clone()),
    )
    .await;

    let throttle = ThrottleLayer::builder().clock(Clock::tokio()).build()?;
    let channel = loopback::channel(addr).await;
    let mut client = HealthClient::new(throttle.layer(channel));
    let check = || {
        tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        })
    };
    // One call answered first: after it, one refusal leaves the throttle's
    // rejection probability at max(0, (2 - 2·1) / 3) = 0, so the calls
    // below reach the server every time (with no accept yet, a refusal
    // alone would make the next call a coin toss: 1/2).
    let served = timeout(BOUND, client.check(check())).await??;
    assert_eq!(served.into_inner().status, 1); // SERVING
    assert_eq!(throttle.counts(), (1, 1));

    // Another service of the same layer holds the only slot.
    let gate = Arc::new(Semaphore::new(0));
    let holder = overload.layer(service_fn({
        let gate = gate.clone();
        move |_req: http::Request<()>| {
            let gate = gate.clone();
            async move {
                gate.acquire().await.unwrap().forget();
                Ok::<_, BoxError>(())
            }
        }
    }));
    let held = tokio::spawn(holder.oneshot(http::Request::new(())));
    timeout(BOUND, async {
        while admission.in_flight() != 1 {
            tokio::task::yield_now().await;
        }
    })
    .await?;

    let status = timeout(BOUND, client.check(check())).await?.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let details = status.get_error_details();
    assert_eq!(details.error_info().unwrap().reason, "OVERLOADED");
    assert!(
        details.retry_info().and_then(|r| r.retry_delay).is_some(),
        "{details:?}"
    );
    assert_eq!(throttle.counts(), (2, 1), "a refusal is not an accept");

    // The slot frees: the next call is served and counted as accepted.
    gate.add_permits(1);
    timeout(BOUND, held).await???;
    let served = timeout(BOUND, client.check(check())).await??;
    assert_eq!(served.into_inner().status, 1); // SERVING
    assert_eq!(throttle.counts(), (3, 2));
    assert_eq!((admission.in_flight(), admission.queue_depth()), (0, 0));
    Ok(())
}
