//! The recommended server stack, Deadline outside the rate limit: the
//! deadline a caller sends decides whether a request waits for its turn or
//! is refused at once with the retry-after.

use std::time::Duration;

use atscale::core::{BoxError, Kind, RateLimited, find};
use atscale::deadline::DeadlineLayer;
use atscale::ratelimit::{Clock, Limit, Limiter, RateLimitLayer};
use http::HeaderName;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

const X_DEADLINE: HeaderName = HeaderName::from_static("x-deadline-ms");

fn within(ms: &str) -> http::Request<()> {
    http::Request::builder()
        .header(X_DEADLINE, ms)
        .body(())
        .expect("valid request")
}

#[tokio::test(start_paused = true)]
async fn the_callers_deadline_decides_between_waiting_and_refusing() -> Result<(), BoxError> {
    let start = Instant::now();
    let limiter = Limiter::with_clock(Limit::new(1, Duration::from_secs(2))?, Clock::tokio());
    let mut svc = ServiceBuilder::new()
        .layer(DeadlineLayer::server(Duration::from_secs(30)).with_header(X_DEADLINE))
        .layer(RateLimitLayer::new(limiter))
        .service(service_fn(move |_: http::Request<()>| async move {
            Ok::<_, BoxError>(start.elapsed())
        }));

    assert_eq!(
        svc.ready().await?.call(within("100")).await?,
        Duration::ZERO
    );

    // The next slot is 2 s away: beyond a 300 ms deadline, refused at once.
    let err = svc.ready().await?.call(within("300")).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO, "no time spent waiting");
    assert_eq!(Kind::of(&*err), Kind::RateLimited);
    assert_eq!(
        find::<RateLimited>(&*err).map(RateLimited::retry_after),
        Some(Duration::from_secs(2))
    );

    // Within a 2.5 s deadline it waits for its turn.
    assert_eq!(
        svc.ready().await?.call(within("2500")).await?,
        Duration::from_secs(2)
    );
    Ok(())
}
