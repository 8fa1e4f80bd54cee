//! The book's example (*Concurrency in Go*, ch. 5): an API client limited to
//! 2 requests per second (burst 1) and 10 per minute (burst 10). Call k
//! (k = 0, 1, …) must be admitted at exactly max(0.5·k, 6·(k − 9)) seconds:
//! ten calls half a second apart, then one every six seconds.

use std::time::Duration;

use atscale_core::BoxError;
use atscale_ratelimit::{Clock, Limit, Limiter, MultiLimiter, RateLimitLayer};
use tokio::time::Instant;
use tower::{Service, ServiceExt, service_fn};

fn expected(k: u64) -> Duration {
    let half_seconds = k.max(12 * k.saturating_sub(9));
    Duration::from_millis(500 * half_seconds)
}

fn api_limiters(clock: &Clock) -> Result<Vec<Limiter>, BoxError> {
    Ok(vec![
        Limiter::with_clock(Limit::per_second(2)?.burst(1)?, clock.clone()),
        Limiter::with_clock(Limit::per_minute(10)?.burst(10)?, clock.clone()),
    ])
}

#[tokio::test(start_paused = true)]
async fn twenty_concurrent_calls_through_the_layer() -> Result<(), BoxError> {
    let clock = Clock::tokio();
    let start = Instant::now();
    let [per_second, per_minute]: [Limiter; 2] = api_limiters(&clock)?.try_into().unwrap();
    let layer = RateLimitLayer::builder()
        .limiter(per_second)
        .limiter(per_minute)
        .build()?;
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |_: http::Request<()>| async move {
            Ok::<_, BoxError>(start.elapsed())
        }));

    // All twenty calls are made at t = 0, in order; each reserves its slot.
    let mut calls = Vec::new();
    for _ in 0..20 {
        svc.ready().await?;
        calls.push(tokio::spawn(svc.call(http::Request::new(()))));
    }
    for (k, call) in calls.into_iter().enumerate() {
        let admitted = call.await??;
        assert_eq!(admitted, expected(k as u64), "call {k}");
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn twenty_calls_one_after_another_with_the_multi_limiter() -> Result<(), BoxError> {
    let clock = Clock::tokio();
    let start = Instant::now();
    let api = MultiLimiter::new(api_limiters(&clock)?)?;
    for k in 0..20 {
        api.acquire(1).await?;
        assert_eq!(start.elapsed(), expected(k), "call {k}");
    }
    Ok(())
}
