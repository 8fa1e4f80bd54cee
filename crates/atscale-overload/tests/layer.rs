//! The overload layer's behaviour on tokio's paused clock.

mod support;

use std::time::Duration;

use atscale_core::{Clock, DeadlineExceeded, Kind, Overloaded, find};
use atscale_overload::limit::Vegas;
use atscale_overload::{CoDel, Criticality, OverloadLayer};
use support::*;
use tokio::time::timeout;
use tower::{Layer, Service, ServiceExt};

const MS: Duration = Duration::from_millis(1);

fn fixed(limit: usize, queue: usize) -> OverloadLayer {
    OverloadLayer::builder()
        .algorithm(Vegas::new())
        .min_limit(limit)
        .max_limit(limit)
        .initial_limit(limit)
        .queue_capacity(queue)
        .clock(Clock::tokio())
        .build()
        .unwrap()
}

#[test]
fn layer_service_and_future_are_send_sync_clone() {
    fn send_sync_clone<T: Send + Sync + Clone>() {}
    fn send<T: Send>(_: &T) {}
    send_sync_clone::<OverloadLayer>();
    send_sync_clone::<atscale_overload::Admission>();
    send_sync_clone::<atscale_overload::Overload<Recorder>>();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _g = rt.enter();
    let mut svc = fixed(1, 1).layer(Recorder::default().service(MS));
    send(&svc.call(req(0)));
}

#[test]
fn bad_settings_name_the_field() {
    let err = OverloadLayer::builder().min_limit(0).build().unwrap_err();
    assert_eq!(err.field(), "min_limit");
    let err = OverloadLayer::builder()
        .min_limit(10)
        .max_limit(5)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "max_limit");
    assert_eq!(
        err.to_string(),
        "invalid overload setting max_limit: must be at least min_limit"
    );
    let err = CoDel::new(Duration::from_millis(100), Duration::from_millis(5)).unwrap_err();
    assert_eq!(err.field(), "codel.target");
}

#[tokio::test(start_paused = true)]
async fn clones_share_one_limit() {
    let layer = fixed(1, 0);
    let rec = Recorder::default();
    let mut a = layer.layer(rec.service(10 * MS));
    let mut b = a.clone();
    let mut c = layer.layer(rec.service(10 * MS)); // another service of the same layer
    let first = tokio::spawn(a.ready().await.unwrap().call(req(0)));
    settle().await;
    for svc in [&mut b, &mut c] {
        let err = svc.ready().await.unwrap().call(req(1)).await.unwrap_err();
        assert_eq!(
            Kind::of(&*err),
            Kind::Overloaded,
            "a clone escaped the limit"
        );
    }
    assert_eq!(first.await.unwrap().unwrap(), 0);
    assert_eq!(rec.served(), vec![0]);
    assert_eq!(layer.admission().in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn over_the_limit_requests_wait_in_order_and_the_queue_is_bounded() {
    let layer = fixed(2, 2);
    let adm = layer.admission();
    let rec = Recorder::default();
    let svc = layer.layer(rec.service(10 * MS));
    let mut calls = Vec::new();
    for id in 0..5 {
        calls.push(tokio::spawn(svc.clone().oneshot(req(id))));
        settle().await;
    }
    assert_eq!((adm.limit(), adm.in_flight(), adm.queue_depth()), (2, 2, 2));
    let mut outcomes = Vec::new();
    for c in calls {
        outcomes.push(c.await.unwrap().map_err(|e| Kind::of(&*e)));
    }
    assert_eq!(
        outcomes,
        vec![Ok(0), Ok(1), Ok(2), Ok(3), Err(Kind::Overloaded)]
    );
    assert_eq!(rec.served(), vec![0, 1, 2, 3]);
    assert_eq!(rec.peak.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!((adm.in_flight(), adm.queue_depth()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_standing_queue_switches_to_lifo_and_codel_drops_the_oldest() {
    let layer = fixed(1, 100);
    let adm = layer.admission();
    let rec = Recorder::default();
    let svc = layer.layer(rec.service(10 * MS));
    let mut calls = Vec::new();
    // 30 requests at once: one runs, 29 wait; 10 ms of work each.
    for id in 0..30 {
        calls.push(tokio::spawn(svc.clone().oneshot(req(id))));
    }
    settle().await;
    // Until the head has been above 5 ms for 100 ms, the queue is FIFO.
    tokio::time::sleep(105 * MS).await;
    settle().await;
    assert!(!adm.is_standing());
    assert_eq!(rec.served(), (0..=10).collect::<Vec<_>>());
    // At t = 110 ms CoDel drops the oldest waiter (11) and the queue serves newest first.
    tokio::time::sleep(5 * MS).await;
    settle().await;
    assert!(adm.is_standing());
    assert_eq!(rec.served()[11], 29, "served {:?}", rec.served());
    let first_drop = calls.remove(11).await.unwrap().unwrap_err();
    let overloaded = find::<Overloaded>(&*first_drop).expect("dropped as overloaded");
    assert!(overloaded.retry_after().is_some());
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await.unwrap().is_ok());
    }
    assert!(
        results.iter().any(|ok| !ok),
        "CoDel keeps dropping the oldest"
    );
    assert_eq!((adm.in_flight(), adm.queue_depth()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn deadline_aware_admission_refuses_at_arrival_with_its_retry_after() {
    let layer = fixed(1, 10);
    let adm = layer.admission();
    let rec = Recorder::default();
    let svc = layer.layer(rec.service(10 * MS));
    // Learn the service time: 10 ms.
    svc.clone().oneshot(req(0)).await.unwrap();
    assert_eq!(adm.service_time(), Some(10 * MS));
    // One runs, one waits.
    let running = tokio::spawn(svc.clone().oneshot(req(1)));
    let waiting = tokio::spawn(svc.clone().oneshot(req(2)));
    settle().await;
    assert_eq!((adm.in_flight(), adm.queue_depth()), (1, 1));
    // A new one would wait (1 ahead + 1) × 10 ms (the typical service time
    // per slot), then need a service time few requests exceed: RFC 6298's
    // SRTT + 2 × RTTVAR, 10 ms + 2 × 5 ms after one sample. 40 ms in all.
    let err = svc
        .clone()
        .oneshot(req_with_budget(3, 39 * MS))
        .await
        .unwrap_err();
    let overloaded = find::<Overloaded>(&*err).expect("refused as overloaded");
    // The queue (1 waiting + the arrival) drains in 2 × 10 ms.
    assert_eq!(overloaded.retry_after(), Some(20 * MS));
    assert_eq!(adm.queue_depth(), 1, "the refused request never queued");
    // With 40 ms it is admitted, and served in time.
    let ok = tokio::spawn(svc.clone().oneshot(req_with_budget(4, 40 * MS)));
    settle().await;
    assert_eq!(adm.queue_depth(), 2);
    assert_eq!(ok.await.unwrap().unwrap(), 4);
    running.await.unwrap().unwrap();
    waiting.await.unwrap().unwrap();
    assert!(!rec.served().contains(&3));
}

#[tokio::test(start_paused = true)]
async fn a_queued_request_leaves_when_its_deadline_passes() {
    let layer = OverloadLayer::builder()
        .min_limit(1)
        .max_limit(1)
        .initial_limit(1)
        .deadline_aware(false)
        .clock(Clock::tokio())
        .build()
        .unwrap();
    let adm = layer.admission();
    let rec = Recorder::default();
    let svc = layer.layer(rec.service(100 * MS));
    let running = tokio::spawn(svc.clone().oneshot(req(0)));
    let start = tokio::time::Instant::now();
    let waiting = tokio::spawn(svc.clone().oneshot(req_with_budget(1, 30 * MS)));
    settle().await;
    assert_eq!(adm.queue_depth(), 1);
    let err = waiting.await.unwrap().unwrap_err();
    assert!(find::<DeadlineExceeded>(&*err).is_some(), "{err}");
    assert_eq!(
        start.elapsed(),
        30 * MS,
        "left at its deadline, not at its turn"
    );
    assert_eq!(adm.queue_depth(), 0);
    running.await.unwrap().unwrap();
    assert_eq!(rec.served(), vec![0]);
}

#[tokio::test(start_paused = true)]
async fn at_its_turn_a_waiter_that_cannot_finish_in_time_is_refused_not_served() {
    let layer = OverloadLayer::builder()
        .algorithm(Vegas::new())
        .min_limit(1)
        .max_limit(1)
        .initial_limit(1)
        .deadline_aware(false) // only the check at its turn
        .clock(Clock::tokio())
        .build()
        .unwrap();
    let rec = Recorder::default();
    let svc = layer.layer(rec.service(20 * MS));
    svc.clone().oneshot(req(0)).await.unwrap(); // service time 20 ms
    let running = tokio::spawn(svc.clone().oneshot(req(1)));
    settle().await;
    // Its turn comes at 20 ms with 15 ms left: less than a service time.
    let late = tokio::spawn(svc.clone().oneshot(req_with_budget(2, 35 * MS)));
    settle().await;
    let err = late.await.unwrap().unwrap_err();
    assert_eq!(Kind::of(&*err), Kind::Overloaded);
    running.await.unwrap().unwrap();
    assert_eq!(rec.served(), vec![0, 1], "the dead request cost nothing");
}

#[tokio::test(start_paused = true)]
async fn criticality_orders_service_and_shedding() {
    let layer = fixed(1, 3);
    let adm = layer.admission();
    let rec = Recorder::default();
    let svc = layer.layer(rec.service(10 * MS));
    let running = tokio::spawn(svc.clone().oneshot(req(0)));
    settle().await;
    let mut calls = Vec::new();
    for (id, c) in [
        (1, Criticality::Sheddable),
        (2, Criticality::Default),
        (3, Criticality::Critical),
    ] {
        calls.push(tokio::spawn(svc.clone().oneshot(req_of(id, c))));
        settle().await;
    }
    assert_eq!(adm.queue_depth(), 3);
    // The queue is full: a critical arrival evicts the sheddable waiter...
    let critical = tokio::spawn(svc.clone().oneshot(req_of(4, Criticality::Critical)));
    settle().await;
    let evicted = calls.remove(0).await.unwrap().unwrap_err();
    assert_eq!(Kind::of(&*evicted), Kind::Overloaded);
    // ...and a sheddable arrival finds no one below it: refused.
    let err = svc
        .clone()
        .oneshot(req_of(5, Criticality::Sheddable))
        .await
        .unwrap_err();
    assert_eq!(Kind::of(&*err), Kind::Overloaded);
    // Also from the header.
    let mut by_header = req(6);
    by_header
        .headers_mut()
        .insert("x-criticality", "sheddable".parse().unwrap());
    let err = svc.clone().oneshot(by_header).await.unwrap_err();
    assert_eq!(Kind::of(&*err), Kind::Overloaded);
    running.await.unwrap().unwrap();
    critical.await.unwrap().unwrap();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    // Critical first (oldest first within a class), then default.
    assert_eq!(rec.served(), vec![0, 3, 4, 2]);
}

#[tokio::test(start_paused = true)]
async fn dropped_while_queued_granted_or_running_leaves_nothing_behind() {
    let layer = fixed(1, 10);
    let adm = layer.admission();
    let rec = Recorder::default();
    let mut svc = layer.layer(rec.service(10 * MS));
    // Dropped while queued.
    let running = svc.ready().await.unwrap().call(req(0));
    let queued = svc.ready().await.unwrap().call(req(1));
    assert_eq!((adm.in_flight(), adm.queue_depth()), (1, 1));
    drop(queued);
    assert_eq!(adm.queue_depth(), 0);
    // Granted but never polled again: the slot goes to the next waiter.
    let granted = tokio::spawn(svc.clone().oneshot(req(2)));
    let next = tokio::spawn(svc.clone().oneshot(req(3)));
    settle().await;
    assert_eq!(adm.queue_depth(), 2);
    running.await.unwrap();
    assert_eq!(adm.in_flight(), 1, "granted to the first waiter");
    granted.abort();
    settle().await;
    assert_eq!(next.await.unwrap().unwrap(), 3);
    // Dropped while running.
    let running = tokio::spawn(svc.clone().oneshot(req(4)));
    settle().await;
    assert_eq!(adm.in_flight(), 1);
    running.abort();
    settle().await;
    assert_eq!((adm.in_flight(), adm.queue_depth()), (0, 0));
    // Cut at its deadline while running (as the deadline layer does).
    let slow = layer.layer(rec.service(50 * MS));
    let cut = timeout(20 * MS, slow.oneshot(req_with_budget(5, 20 * MS))).await;
    assert!(cut.is_err());
    assert_eq!((adm.in_flight(), adm.queue_depth()), (0, 0));
    assert_eq!(rec.served(), vec![0, 3, 4, 5]);
}

#[tokio::test(start_paused = true)]
async fn with_nothing_in_flight_a_request_is_admitted_whatever_the_estimate() {
    let layer = fixed(2, 10);
    let rec = Recorder::default();
    let svc = layer.layer(rec.service(50 * MS));
    svc.clone().oneshot(req(0)).await.unwrap(); // service time 50 ms
    // 30 ms is less than a service time, but nothing runs: the estimate may be
    // stale, so the request goes through (and the deadline decides).
    let alone = svc.clone().oneshot(req_with_budget(1, 30 * MS));
    assert!(
        timeout(30 * MS, alone).await.is_err(),
        "admitted, cut by the caller"
    );
    // With one in flight, the same request is refused at arrival.
    let running = tokio::spawn(svc.clone().oneshot(req(2)));
    settle().await;
    let err = svc
        .clone()
        .oneshot(req_with_budget(3, 30 * MS))
        .await
        .unwrap_err();
    assert_eq!(Kind::of(&*err), Kind::Overloaded);
    running.await.unwrap().unwrap();
    assert_eq!(rec.served(), vec![0, 1, 2]);
}

#[tokio::test(start_paused = true)]
async fn the_fast_path_judges_a_deadline_on_the_last_time_read_which_only_errs_to_admit() {
    // Limit 10; no request timed after the warm-up below half the limit.
    let layer = OverloadLayer::builder()
        .algorithm(Vegas::new())
        .min_limit(10)
        .max_limit(10)
        .initial_limit(10)
        .sampling(u32::MAX)
        .clock(Clock::tokio())
        .build()
        .unwrap();
    let adm = layer.admission();
    let rec = Recorder::default();
    let svc = layer.layer(rec.service(50 * MS));
    // The warm-up (its 1,000 requests are timed): service time 50 ms.
    for id in 0..1000 {
        svc.clone().oneshot(req(id)).await.unwrap();
    }
    // Ten idle seconds: the layer's last reading of the clock is that old.
    tokio::time::advance(Duration::from_secs(10)).await;
    // One running (untimed, far under the limit), then a request with 30 ms
    // left, less than a service time: judged on the old reading it seems
    // to have 10 s left, and takes the free slot (the deadline layer would
    // cut it). An old reading never refuses what a new one would admit.
    let mut running = vec![tokio::spawn(svc.clone().oneshot(req(1001)))];
    settle().await;
    let short = svc.clone().oneshot(req_with_budget(1002, 30 * MS));
    assert!(
        timeout(30 * MS, short).await.is_err(),
        "admitted, cut by the caller"
    );
    // Requests from half the limit in flight up are timed: each reads the
    // clock. The next short one is judged on that reading: refused.
    for id in 1003..1008 {
        running.push(tokio::spawn(svc.clone().oneshot(req(id))));
    }
    settle().await;
    assert_eq!(adm.in_flight(), 6, "1001 and 1003 to 1007");
    let err = svc
        .clone()
        .oneshot(req_with_budget(1008, 30 * MS))
        .await
        .unwrap_err();
    assert_eq!(Kind::of(&*err), Kind::Overloaded);
    for r in running {
        timeout(Duration::from_secs(1), r)
            .await
            .expect("answered")
            .unwrap()
            .unwrap();
    }
    let served = rec.served();
    assert!(served.contains(&1002) && !served.contains(&1008));
}

#[tokio::test(start_paused = true)]
async fn under_an_eighth_of_the_limit_a_free_slot_is_taken_unchecked() {
    let layer = fixed(100, 10);
    let adm = layer.admission();
    let rec = Recorder::default();
    let svc = layer.layer(rec.service(50 * MS));
    svc.clone().oneshot(req(0)).await.unwrap(); // service time 50 ms
    // With this one 2 of 100 in flight: far from queueing, a request with
    // less than a service time left takes a free slot (the deadline layer
    // would cut it) without its deadline being looked up.
    let mut running = vec![tokio::spawn(svc.clone().oneshot(req(1)))];
    settle().await;
    let short = svc.clone().oneshot(req_with_budget(2, 30 * MS));
    assert!(
        timeout(30 * MS, short).await.is_err(),
        "admitted, cut by the caller"
    );
    // With this one an eighth of the limit in flight: checked, refused.
    for id in 3..15 {
        running.push(tokio::spawn(svc.clone().oneshot(req(id))));
    }
    settle().await;
    assert_eq!(adm.in_flight(), 13);
    let err = svc
        .clone()
        .oneshot(req_with_budget(15, 30 * MS))
        .await
        .unwrap_err();
    assert_eq!(Kind::of(&*err), Kind::Overloaded);
    for r in running {
        timeout(Duration::from_secs(1), r)
            .await
            .expect("answered")
            .unwrap()
            .unwrap();
    }
    assert!(rec.served().contains(&2) && !rec.served().contains(&15));
}

#[test]
fn racing_threads_never_exceed_the_limit() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let layer = OverloadLayer::builder()
        .algorithm(Vegas::new())
        .min_limit(3)
        .max_limit(3)
        .initial_limit(3)
        .queue_capacity(10_000)
        .build()
        .unwrap();
    let adm = layer.admission();
    let rec = Recorder::default();
    // No timer: each request yields a few times in service.
    let backend = {
        let rec = rec.clone();
        tower::service_fn(move |r: http::Request<usize>| {
            let rec = rec.clone();
            async move {
                use std::sync::atomic::Ordering::SeqCst;
                let n = rec.now.fetch_add(1, SeqCst) + 1;
                rec.peak.fetch_max(n, SeqCst);
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                }
                rec.now.fetch_sub(1, SeqCst);
                Ok::<_, std::convert::Infallible>(*r.body())
            }
        })
    };
    let svc = layer.layer(backend);
    rt.block_on(async {
        let calls: Vec<_> = (0..4_000)
            .map(|i| tokio::spawn(svc.clone().oneshot(req(i))))
            .collect();
        for c in calls {
            // Served, or dropped by CoDel if the queue stood for 100 ms.
            if let Err(e) = timeout(Duration::from_secs(30), c)
                .await
                .expect("bounded")
                .unwrap()
            {
                assert_eq!(Kind::of(&*e), Kind::Overloaded, "{e}");
            }
        }
    });
    assert!(rec.peak.load(std::sync::atomic::Ordering::SeqCst) <= 3);
    assert_eq!((adm.in_flight(), adm.queue_depth()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_critical_arrival_counts_only_the_critical_waiters_ahead_of_it() {
    let layer = fixed(1, 10);
    let adm = layer.admission();
    let rec = Recorder::default();
    let svc = layer.layer(rec.service(10 * MS));
    svc.clone().oneshot(req(0)).await.unwrap(); // service 10 ms, high 20 ms
    let running = tokio::spawn(svc.clone().oneshot(req(1)));
    let mut waiting = Vec::new();
    for id in 2..5 {
        waiting.push(tokio::spawn(svc.clone().oneshot(req(id))));
    }
    settle().await;
    assert_eq!(adm.queue_depth(), 3);
    // 35 ms: a default request waits behind 3 (4 × 10 ms + 20 ms): refused.
    let mut tight = req_with_budget(5, 35 * MS);
    let err = svc.clone().oneshot(tight).await.unwrap_err();
    assert_eq!(Kind::of(&*err), Kind::Overloaded);
    // A critical one with the same budget is served before them (1 × 10 ms + 20 ms).
    tight = req_with_budget(6, 35 * MS);
    tight.extensions_mut().insert(Criticality::Critical);
    assert_eq!(svc.clone().oneshot(tight).await.unwrap(), 6);
    running.await.unwrap().unwrap();
    for w in waiting {
        w.await.unwrap().unwrap();
    }
    assert_eq!(rec.served(), vec![0, 1, 6, 2, 3, 4]);
}
