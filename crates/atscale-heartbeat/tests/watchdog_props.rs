//! Properties of the stall watchdog over arbitrary schedules of progress.

use std::convert::Infallible;
use std::time::Duration;

use atscale_core::{Stalled, find};
use atscale_heartbeat::{Monitor, Progress};
use proptest::prelude::*;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt, service_fn};

const STALL_MS: u64 = 1000;

/// When the watchdog must cut a handler that waits `gaps[i]` ms before its
/// i-th progress report and then stops: at the first gap longer than the
/// limit, or one limit after the last report. Returns (cut at, idle).
///
/// A report at exactly the limit is in time: the work is polled before the
/// watchdog, and work that is ready wins.
fn expected(gaps: &[u64]) -> (u64, u64) {
    let mut last = 0;
    for gap in gaps {
        if *gap > STALL_MS {
            return (last + STALL_MS, STALL_MS);
        }
        last += gap;
    }
    (last + STALL_MS, STALL_MS)
}

fn run(gaps: Vec<u64>) -> (u64, u64, u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let monitor = Monitor::builder()
            .stall(Duration::from_millis(STALL_MS))
            .build();
        let svc = ServiceBuilder::new()
            .layer(monitor.layer())
            .service(service_fn(move |_req: http::Request<()>| {
                let gaps = gaps.clone();
                async move {
                    let progress = Progress::current().unwrap();
                    for gap in gaps {
                        tokio::time::sleep(Duration::from_millis(gap)).await;
                        progress.report();
                    }
                    std::future::pending::<()>().await;
                    Ok::<String, Infallible>(String::new())
                }
            }));
        let start = Instant::now();
        let err = svc.oneshot(http::Request::new(())).await.unwrap_err();
        let idle = find::<Stalled>(&*err).expect("stalled").idle();
        (
            start.elapsed().as_millis() as u64,
            idle.as_millis() as u64,
            monitor.counts().stalled(),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn cut_exactly_one_limit_after_the_last_progress(
        // gaps around the limit, exactly at it included
        gaps in prop::collection::vec(prop_oneof![1u64..1500, Just(STALL_MS)], 0..12)
    ) {
        let (at, idle) = expected(&gaps);
        let (cut_at, cut_idle, stalled) = run(gaps);
        prop_assert_eq!(cut_at, at);
        prop_assert_eq!(cut_idle, idle);
        prop_assert_eq!(stalled, 1);
    }
}
