//! Property tests: in flight never exceeds the limit, and every request is
//! accounted for, whatever arrives, whenever callers give up.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use atscale_core::{Clock, Context, Kind, Origin};
use atscale_overload::limit::{Gradient2, Vegas};
use atscale_overload::{Criticality, OverloadLayer};
use proptest::prelude::*;
use tower::{Layer, ServiceExt, service_fn};

#[derive(Clone, Debug)]
struct Req {
    at_ms: u64,
    work_ms: u64,
    budget_ms: Option<u64>,
    criticality: Criticality,
    give_up_ms: Option<u64>,
}

fn request() -> impl Strategy<Value = Req> {
    (
        0..50u64,
        1..30u64,
        prop::option::of(1..120u64),
        prop_oneof![
            Just(Criticality::Sheddable),
            Just(Criticality::Default),
            Just(Criticality::Critical)
        ],
        prop::option::of(0..60u64),
    )
        .prop_map(|(at_ms, work_ms, budget_ms, criticality, give_up_ms)| Req {
            at_ms,
            work_ms,
            budget_ms,
            criticality,
            give_up_ms,
        })
}

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    overloaded: AtomicUsize,
    expired: AtomicUsize,
    gave_up: AtomicUsize,
    entered: AtomicUsize,
    completed: AtomicUsize,
    now: AtomicUsize,
    peak: AtomicUsize,
}

/// Runs `reqs` through the layer; returns the tally and the peak in flight.
fn run(layer: OverloadLayer, reqs: Vec<Req>) -> Arc<Tally> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let tally = Arc::new(Tally::default());
    let adm = layer.admission();
    rt.block_on(async {
        let t = tally.clone();
        let backend = service_fn(move |req: http::Request<u64>| {
            let t = t.clone();
            async move {
                t.entered.fetch_add(1, Ordering::SeqCst);
                let n = t.now.fetch_add(1, Ordering::SeqCst) + 1;
                t.peak.fetch_max(n, Ordering::SeqCst);
                struct Leave(Arc<Tally>);
                impl Drop for Leave {
                    fn drop(&mut self) {
                        self.0.now.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let _leave = Leave(t.clone());
                tokio::time::sleep(Duration::from_millis(*req.body())).await;
                t.completed.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(())
            }
        });
        let svc = layer.layer(backend);
        let mut tasks = Vec::new();
        for r in reqs {
            let (svc, t) = (svc.clone(), tally.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(r.at_ms)).await;
                let mut req = http::Request::new(r.work_ms);
                req.extensions_mut().insert(r.criticality);
                if let Some(b) = r.budget_ms {
                    req.extensions_mut().insert(
                        Context::new().with_budget(Duration::from_millis(b), Origin::Header),
                    );
                }
                let call = svc.oneshot(req);
                let out = match r.give_up_ms {
                    Some(g) => tokio::time::timeout(Duration::from_millis(g), call).await,
                    None => Ok(call.await),
                };
                let counter = match out {
                    Ok(Ok(())) => &t.ok,
                    Ok(Err(e)) => match Kind::of(&*e) {
                        Kind::Overloaded => &t.overloaded,
                        Kind::DeadlineExceeded => &t.expired,
                        other => panic!("unexpected {other}: {e}"),
                    },
                    Err(_) => &t.gave_up,
                };
                counter.fetch_add(1, Ordering::SeqCst);
            }));
        }
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .expect("every request ends")
                .unwrap();
        }
        assert_eq!(adm.in_flight(), 0, "a slot leaked");
        assert_eq!(adm.queue_depth(), 0, "a place leaked");
    });
    tally
}

fn check_accounting(t: &Tally, n: usize) {
    let ended = t.ok.load(Ordering::SeqCst)
        + t.overloaded.load(Ordering::SeqCst)
        + t.expired.load(Ordering::SeqCst)
        + t.gave_up.load(Ordering::SeqCst);
    assert_eq!(ended, n, "every request ends exactly once");
    // Every success did its work; no one ran without being admitted.
    assert_eq!(
        t.ok.load(Ordering::SeqCst),
        t.completed.load(Ordering::SeqCst)
    );
    assert!(t.entered.load(Ordering::SeqCst) >= t.completed.load(Ordering::SeqCst));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn a_fixed_limit_is_never_exceeded(
        limit in 1..5usize,
        capacity in 0..6usize,
        reqs in prop::collection::vec(request(), 1..40),
    ) {
        let n = reqs.len();
        let layer = OverloadLayer::builder()
            .algorithm(Vegas::new())
            .min_limit(limit)
            .max_limit(limit)
            .initial_limit(limit)
            .queue_capacity(capacity)
            .clock(Clock::tokio())
            .build()
            .unwrap();
        let t = run(layer, reqs);
        prop_assert!(t.peak.load(Ordering::SeqCst) <= limit);
        check_accounting(&t, n);
    }

    #[test]
    fn an_adaptive_limit_stays_within_its_bounds(
        max in 1..8usize,
        capacity in 0..10usize,
        reqs in prop::collection::vec(request(), 1..60),
    ) {
        let n = reqs.len();
        let layer = OverloadLayer::builder()
            .algorithm(Gradient2::new())
            .min_limit(1)
            .max_limit(max)
            .initial_limit(max)
            .queue_capacity(capacity)
            .clock(Clock::tokio())
            .build()
            .unwrap();
        let adm = layer.admission();
        let t = run(layer, reqs);
        prop_assert!(t.peak.load(Ordering::SeqCst) <= max);
        prop_assert!((1..=max).contains(&adm.limit()));
        check_accounting(&t, n);
    }
}
