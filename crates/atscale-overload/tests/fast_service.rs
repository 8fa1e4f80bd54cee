//! A fast service far below its capacity must not be refused: its latency
//! jitters by several times its minimum (a scheduler, a request body that
//! arrives in a later read), and HTTP/2 or gRPC multiplexing brings many
//! requests at once, but nothing queues inside it. On tokio's paused clock.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use atscale_core::{BoxError, Clock, Kind};
use atscale_overload::OverloadLayer;
use support::*;
use tower::{Layer, ServiceExt, service_fn};

/// SplitMix64: a fixed sequence of draws.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Answers in 1 ms, or 2 to 4 ms one time in four (drawn from the id).
fn jittery() -> impl tower::Service<
    http::Request<usize>,
    Response = usize,
    Error = BoxError,
    Future = impl Future<Output = Result<usize, BoxError>> + Send,
> + Clone
+ Send
+ 'static {
    service_fn(|r: http::Request<usize>| {
        let mut draw = *r.body() as u64;
        let x = splitmix(&mut draw);
        let ms = if x.is_multiple_of(4) {
            2 + (x >> 8) % 3
        } else {
            1
        };
        async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, BoxError>(0usize)
        }
    })
}

/// Bursts of 64 requests every 5 ms (12,800/s) for 3 s, to a service that
/// answers in 1 ms, or 2 to 4 ms one time in four, whatever the concurrency
/// (it never queues). Returns (answered, refused, the lowest limit seen after
/// the first second, the slowest call after the first second).
async fn bursts(layer: OverloadLayer, budget: Option<Duration>) -> (usize, usize, usize, Duration) {
    let adm = layer.admission();
    let svc = layer.layer(jittery());
    let (answered, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let slowest = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let mut calls = Vec::new();
    let mut lowest = usize::MAX;
    for burst in 0..600 {
        for i in 0..64 {
            let id = burst * 64 + i;
            let r = match budget {
                Some(b) => req_with_budget(id, b),
                None => req(id),
            };
            let (svc, answered, refused) = (svc.clone(), answered.clone(), refused.clone());
            let slowest = slowest.clone();
            calls.push(tokio::spawn(async move {
                let start = tokio::time::Instant::now();
                let out = svc.oneshot(r).await;
                if burst >= 200 {
                    let took = start.elapsed();
                    let mut s = slowest.lock().unwrap();
                    *s = (*s).max(took);
                }
                match out {
                    Ok(_) => answered.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        assert_eq!(Kind::of(&*e), Kind::Overloaded, "{e}");
                        refused.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        if burst >= 200 {
            lowest = lowest.min(adm.limit());
        }
    }
    for c in calls {
        tokio::time::timeout(Duration::from_secs(10), c)
            .await
            .expect("every call ends")
            .unwrap();
    }
    assert_eq!((adm.in_flight(), adm.queue_depth()), (0, 0));
    (
        answered.load(Ordering::SeqCst),
        refused.load(Ordering::SeqCst),
        lowest,
        *slowest.lock().unwrap(),
    )
}

fn default_layer() -> OverloadLayer {
    OverloadLayer::builder()
        .clock(Clock::tokio())
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_fast_jittery_service_under_bursts_is_never_refused() {
    let (answered, refused, lowest, slowest) = bursts(default_layer(), None).await;
    assert_eq!((answered, refused), (600 * 64, 0), "lowest limit {lowest}");
    // Once the limit has learnt, a burst of 64 never waits for a slot: no
    // call takes longer than the slowest answer (4 ms, and 1 ms of timer).
    assert!(lowest >= 64, "the limit fell to {lowest}");
    assert!(
        slowest <= Duration::from_millis(5),
        "a call took {slowest:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn with_deadlines_far_away_it_is_never_refused_either() {
    let budget = Some(Duration::from_secs(1));
    let (answered, refused, lowest, slowest) = bursts(default_layer(), budget).await;
    assert_eq!((answered, refused), (600 * 64, 0), "lowest limit {lowest}");
    assert!(lowest >= 64, "the limit fell to {lowest}");
    assert!(
        slowest <= Duration::from_millis(5),
        "a call took {slowest:?}"
    );
}
