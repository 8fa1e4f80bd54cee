//! Client-side adaptive throttling: the SRE book's formula on exact counts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use atscale_core::{Clock, Kind, RateLimited};
use atscale_overload::error::Throttled;
use atscale_overload::throttle::{Answer, ThrottleLayer, probability};
use tower::{Layer, ServiceExt, service_fn};

fn answer(status: u16) -> http::Response<()> {
    http::Response::builder().status(status).body(()).unwrap()
}

#[test]
fn the_formula() {
    assert_eq!(probability(0, 0, 2.0), 0.0);
    assert_eq!(probability(10, 5, 2.0), 0.0);
    assert_eq!(probability(10, 4, 2.0), 2.0 / 11.0);
    assert_eq!(probability(100, 0, 2.0), 100.0 / 101.0);
    assert_eq!(probability(30, 10, 1.5), 15.0 / 31.0);
}

#[test]
fn what_counts_as_a_refusal() {
    assert!(answer(429).is_refusal());
    assert!(answer(503).is_refusal());
    assert!(!answer(500).is_refusal());
    assert!(!answer(200).is_refusal());
    let grpc = |code: &str, details: Option<&str>| {
        let mut b = http::Response::builder().header("grpc-status", code);
        if let Some(d) = details {
            b = b.header("grpc-status-details-bin", d);
        }
        b.body(()).unwrap()
    };
    assert!(grpc("8", None).is_refusal()); // RESOURCE_EXHAUSTED
    assert!(!grpc("14", None).is_refusal()); // UNAVAILABLE, no reason: not a refusal
    // google.rpc.Status { code: 14, details: [ErrorInfo { reason: "OVERLOADED" }] }, as bytes
    let overloaded = "CA4aIwoTdHlwZS5nb29nbGVhcGlzLmNvbRIMCgpPVkVSTE9BREVE";
    assert!(grpc("14", Some(overloaded)).is_refusal());
    let other = "CA4aIAoTdHlwZS5nb29nbGVhcGlzLmNvbRIJCgdTVEFMTEVE";
    assert!(!grpc("14", Some(other)).is_refusal());
    assert!(!grpc("0", None).is_refusal());
}

#[tokio::test(start_paused = true)]
async fn counts_requests_and_accepts_and_throttles_with_the_formula() {
    let throttle = ThrottleLayer::builder()
        .clock(Clock::tokio())
        .seed(7)
        .build()
        .unwrap();
    let refusing = Arc::new(AtomicBool::new(false));
    let backend = {
        let refusing = refusing.clone();
        service_fn(move |_req: ()| {
            let status = if refusing.load(Ordering::Relaxed) {
                503
            } else {
                200
            };
            async move { Ok::<_, std::convert::Infallible>(answer(status)) }
        })
    };
    let svc = throttle.layer(backend);
    // 10 accepted.
    for _ in 0..10 {
        assert_eq!(svc.clone().oneshot(()).await.unwrap().status(), 200);
    }
    assert_eq!(throttle.counts(), (10, 10));
    assert_eq!(throttle.probability(), 0.0);
    // The backend refuses: no local rejection while requests ≤ 2 × accepts.
    refusing.store(true, Ordering::Relaxed);
    for _ in 0..10 {
        assert_eq!(svc.clone().oneshot(()).await.unwrap().status(), 503);
    }
    assert_eq!(throttle.counts(), (20, 10));
    assert_eq!(throttle.probability(), 0.0);
    // Beyond that, requests are refused locally at the formula's rate.
    let (mut local, n) = (0, 2_000);
    for _ in 0..n {
        match svc.clone().oneshot(()).await {
            Ok(res) => assert_eq!(res.status(), 503),
            Err(e) => {
                assert_eq!(Kind::of(&*e), Kind::Overloaded);
                assert!(e.downcast_ref::<Throttled>().is_some());
                local += 1;
            }
        }
    }
    // Every request is counted, locally refused or not; accepts did not move.
    assert_eq!(throttle.counts(), (20 + n, 10));
    assert_eq!(throttle.probability(), probability(20 + n, 10, 2.0));
    // The local rejections follow p = (r − 20) / (r + 1) as r goes 20..2020:
    // the expected count is the sum of p over the requests.
    let expected: f64 = (20..20 + n).map(|r| probability(r, 10, 2.0)).sum();
    let sd = expected.sqrt();
    assert!(
        (local as f64 - expected).abs() < 4.0 * sd,
        "{local} local rejections, expected {expected:.0} ± {sd:.0}"
    );
    // After the window, the history is gone.
    tokio::time::advance(Duration::from_secs(121)).await;
    assert_eq!(throttle.counts(), (0, 0));
    assert_eq!(throttle.probability(), 0.0);
}

#[tokio::test(start_paused = true)]
async fn the_window_slides() {
    let throttle = ThrottleLayer::builder()
        .window(Duration::from_secs(10))
        .buckets(10)
        .clock(Clock::tokio())
        .build()
        .unwrap();
    let svc = throttle.layer(service_fn(|refuse: bool| async move {
        if refuse {
            Err::<http::Response<()>, _>(RateLimited::new(Duration::from_secs(1)))
        } else {
            Ok(answer(200))
        }
    }));
    svc.clone().oneshot(false).await.unwrap();
    tokio::time::advance(Duration::from_secs(5)).await;
    // A refusal as an error (rate limited) counts a request, not an accept.
    svc.clone().oneshot(true).await.unwrap_err();
    assert_eq!(throttle.counts(), (2, 1));
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(
        throttle.counts(),
        (1, 0),
        "the first second left the window"
    );
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(throttle.counts(), (0, 0));
}

#[test]
fn bad_settings_name_the_field() {
    let err = ThrottleLayer::builder().k(0.5).build().unwrap_err();
    assert_eq!(err.field(), "throttle.k");
    let err = ThrottleLayer::builder().buckets(0).build().unwrap_err();
    assert_eq!(err.field(), "throttle.buckets");
    let err = ThrottleLayer::builder()
        .window(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "throttle.window");
}
