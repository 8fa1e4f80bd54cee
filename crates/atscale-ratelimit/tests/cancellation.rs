//! Cancellation safety: many waiters dropped mid-wait leave the limiters
//! exactly as if they had never come.

use std::time::Duration;

use atscale_core::{BoxError, Carrier, Context, Origin};
use atscale_ratelimit::{Clock, Limit, Limiter, RateLimitLayer};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

type Req = http::Request<()>;

fn limiters(clock: &Clock) -> Result<[Limiter; 2], BoxError> {
    Ok([
        Limiter::with_clock(Limit::per_second(5)?.burst(2)?, clock.clone()),
        Limiter::with_clock(Limit::per_minute(40)?.burst(12)?, clock.clone()),
    ])
}

fn service(
    [a, b]: [Limiter; 2],
) -> Result<
    impl Service<Req, Response = Duration, Error = BoxError, Future: Send + 'static> + Clone,
    BoxError,
> {
    let start = Instant::now();
    Ok(RateLimitLayer::builder()
        .limiter(a)
        .limiter(b)
        .max_waiters(10_000)
        .build()?
        .layer(service_fn(move |_: Req| {
            let at = start.elapsed();
            async move { Ok::<_, BoxError>(at) }
        })))
}

/// SplitMix64, for a fixed shuffled drop order.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[tokio::test(start_paused = true)]
async fn many_dropped_waiters_leave_no_trace() -> Result<(), BoxError> {
    let clock = Clock::tokio();
    let mut real = service(limiters(&clock)?)?;
    let mut twin = service(limiters(&clock)?)?; // sees only the kept requests

    // Ten requests both limiters serve: they wait up to ~1.6 s.
    let mut kept = Vec::new();
    for _ in 0..10 {
        kept.push(tokio::spawn(
            real.ready().await?.call(http::Request::new(())),
        ));
        kept.push(tokio::spawn(
            twin.ready().await?.call(http::Request::new(())),
        ));
    }

    // 300 more on the real one only, all queued behind the kept ones. Half
    // are tasks that get aborted, half carry a context that gets cancelled.
    let mut tasks = Vec::new();
    let mut contexts = Vec::new();
    for i in 0..300 {
        let mut req = http::Request::new(());
        if i % 2 == 0 {
            let cx = Context::new();
            req.set_context(cx.clone());
            contexts.push(cx);
        }
        tasks.push(tokio::spawn(real.ready().await?.call(req)));
    }
    // A few with a deadline too short to wait fail at once, reserving nothing.
    for _ in 0..20 {
        let mut req = http::Request::new(());
        req.set_context(Context::new().with_budget(Duration::from_millis(50), Origin::Header));
        assert!(real.ready().await?.call(req).await.is_err());
    }

    // Drop them all, in a shuffled order, over 150 ms (long before any of
    // them would be admitted), while the kept ones are being admitted.
    let mut order: Vec<usize> = (0..300).collect();
    order.sort_by_key(|&i| mix(i as u64));
    for (n, i) in order.into_iter().enumerate() {
        if i % 2 == 0 {
            contexts[i / 2].cancel();
        } else {
            tasks[i].abort();
        }
        if n % 30 == 29 {
            tokio::time::advance(Duration::from_millis(15)).await;
        }
    }
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await {
            Ok(result) => assert!(result.is_err(), "request {i} was admitted"),
            Err(e) => assert!(e.is_cancelled()),
        }
    }

    let mut real_kept = Vec::new();
    let mut twin_kept = Vec::new();
    for (i, k) in kept.into_iter().enumerate() {
        let at = k.await??;
        if i % 2 == 0 {
            real_kept.push(at)
        } else {
            twin_kept.push(at)
        }
    }
    assert_eq!(real_kept, twin_kept);

    // From now on both admit exactly alike.
    for step in 0..40u64 {
        let a = real.ready().await?.call(http::Request::new(()));
        let b = twin.ready().await?.call(http::Request::new(()));
        let (a, b) = tokio::join!(a, b);
        assert_eq!(a?, b?, "probe {step}");
        tokio::time::advance(Duration::from_millis(37 * (step % 5))).await;
    }
    Ok(())
}
