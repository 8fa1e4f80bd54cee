//! The hedge consults the retry throttle it is given (gRFC A6: one throttle
//! for retries and hedges), on tokio's paused clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use atscale_core::{BoxError, RetryThrottle};
use atscale_hedge::{Budget, Delay, HedgeLayer, Verdict};
use atscale_retry::{RetryLayer, RetryPolicy};
use tower::{Layer, ServiceExt, service_fn};

type Req = http::Request<String>;

#[tokio::test(start_paused = true)]
async fn hedges_stop_while_the_shared_throttle_is_at_its_threshold() {
    // max 4, ratio 1: threshold 2 tokens.
    let throttle = RetryThrottle::new(4, 1.0).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    // Every first attempt takes 50 ms; a hedge answers at once. Calls whose
    // URI says "fail" fail (non-fatal).
    let backend = {
        let calls = calls.clone();
        service_fn(move |req: Req| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let fail = req.uri().path() == "/fail";
            let primary = req.headers().get("x-hedge").is_none() && n.is_multiple_of(2);
            async move {
                if primary {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if fail {
                    Err::<http::Response<String>, BoxError>("unavailable".into())
                } else {
                    Ok(http::Response::new(String::new()))
                }
            }
        })
    };
    let hedge = HedgeLayer::builder()
        .delay(Delay::fixed(Duration::from_millis(10)))
        .budget(Budget::unlimited())
        .throttle(throttle.clone())
        .classify(
            |out: Result<&http::Response<String>, &BoxError>| match out {
                Ok(_) => Verdict::Good,
                Err(_) => Verdict::NonFatal,
            },
        )
        .build()
        .unwrap();
    let stats = hedge.stats();
    let svc = hedge.layer(backend);
    let get = |path: &str| http::Request::get(path).body(String::new()).unwrap();

    // 4 tokens: the hedge goes out at 10 ms and wins (a good outcome: +1, capped).
    svc.clone().oneshot(get("/ok")).await.unwrap();
    assert_eq!(stats.hedges_sent(), 1);
    assert_eq!(throttle.milli_tokens(), 4_000);

    // Both attempts fail non-fatally: two tokens taken (4 → 2).
    calls.store(0, Ordering::SeqCst);
    svc.clone().oneshot(get("/fail")).await.unwrap_err();
    assert_eq!(throttle.milli_tokens(), 2_000);
    assert_eq!(stats.hedges_sent(), 2);

    // 2 tokens: not above the threshold, so no hedge; the first attempt
    // answers after 50 ms (+1 token).
    calls.store(0, Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    svc.clone().oneshot(get("/ok")).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_millis(50));
    assert_eq!(stats.hedges_sent(), 2, "throttled");
    assert_eq!(throttle.milli_tokens(), 3_000);

    // 3 tokens: hedging again.
    calls.store(0, Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    svc.oneshot(get("/ok")).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_millis(10));
    assert_eq!(stats.hedges_sent(), 3);
}

#[tokio::test(start_paused = true)]
async fn retries_and_hedges_drain_one_throttle() {
    let throttle = RetryThrottle::new(10, 0.1).unwrap();
    let failing = service_fn(|_req: Req| async {
        Err::<http::Response<String>, BoxError>(atscale_core::Unreachable::new("b").into())
    });
    let retry = RetryLayer::new(RetryPolicy::builder().max_attempts(5).build().unwrap())
        .throttle(throttle.clone())
        .layer(failing);
    // Five attempts, five failures: 10 → 5 tokens.
    let err = retry
        .oneshot(http::Request::new(String::new()))
        .await
        .unwrap_err();
    assert_eq!(throttle.milli_tokens(), 5_000, "{err}");
    assert!(!throttle.allows());

    // A hedge on the same throttle sends no copy now.
    let slow = service_fn(|_req: Req| async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        Ok::<_, BoxError>(http::Response::new(String::new()))
    });
    let hedge = HedgeLayer::builder()
        .delay(Delay::fixed(Duration::from_millis(10)))
        .budget(Budget::unlimited())
        .throttle(throttle.clone())
        .build()
        .unwrap();
    let stats = hedge.stats();
    hedge
        .layer(slow)
        .oneshot(http::Request::new(String::new()))
        .await
        .unwrap();
    // Asked at 10 ms and again at 20 ms (the hedge asks once per delay while
    // the first attempt runs); denied both times.
    assert_eq!((stats.hedges_sent(), stats.budget_denials()), (0, 2));
    assert_eq!(throttle.milli_tokens(), 5_100, "the success gave back 0.1");
}
