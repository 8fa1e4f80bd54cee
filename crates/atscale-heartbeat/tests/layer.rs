//! The heartbeat layer and its monitor: pulses, counts, stalls, interval beats.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use atscale_core::{BoxError, Carrier, Clock, Context, Kind, Stalled, find};
use atscale_heartbeat::{
    Heartbeat, HeartbeatLayer, KeepAliveLayer, Monitor, Outcome, Progress, Pulse, Pulses, Steward,
    TrackedBody,
};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::{Instant, advance};
use tokio_stream::wrappers::ReceiverStream;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};

type Req = http::Request<()>;
type Chunks = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

fn req() -> Req {
    http::Request::new(())
}

/// A handler that waits at a gate, then answers `"done"`.
fn gated(
    gate: Arc<Notify>,
) -> impl Service<Req, Response = String, Error = Infallible, Future: Send> + Clone {
    service_fn(move |_req: Req| {
        let gate = gate.clone();
        async move {
            gate.notified().await;
            Ok::<_, Infallible>(String::from("done"))
        }
    })
}

async fn next(pulses: &mut Pulses) -> Pulse {
    bounded(pulses.next()).await.expect("the monitor is alive")
}

/// Every wait on a signal is bounded: a regression fails the test instead
/// of hanging CI (on the paused clock the bound is reached at once when
/// nothing else is pending).
async fn bounded<F: std::future::Future>(signal: F) -> F::Output {
    tokio::time::timeout(std::time::Duration::from_secs(60), signal)
        .await
        .expect("a signal the test waits for never came within 60 s")
}

#[test]
fn layer_service_future_and_monitor_are_send_sync_clone() {
    fn send_sync_clone<T: Send + Sync + Clone>() {}
    fn send<T: Send>() {}
    send_sync_clone::<HeartbeatLayer>();
    send_sync_clone::<Monitor>();
    send_sync_clone::<KeepAliveLayer>();
    send_sync_clone::<Progress>();
    send_sync_clone::<Heartbeat<tower::util::BoxCloneSyncService<Req, String, Infallible>>>();
    send::<atscale_heartbeat::future::ResponseFuture<std::future::Ready<Result<String, Infallible>>>>(
    );
    send::<Pulses>();
    send::<TrackedBody<Full<Bytes>>>();
    send::<atscale_heartbeat::KeepAliveBody<Full<Bytes>>>();
    type Factory = fn() -> tower::util::BoxCloneSyncService<Req, String, Infallible>;
    send_sync_clone::<Steward<tower::util::BoxCloneSyncService<Req, String, Infallible>, Factory>>(
    );
}

#[tokio::test(start_paused = true)]
async fn a_unary_request_starts_and_finishes() {
    let monitor = Monitor::new();
    let mut pulses = monitor.subscribe();
    let gate = Arc::new(Notify::new());
    let svc = ServiceBuilder::new()
        .layer(monitor.layer())
        .service(gated(gate.clone()));
    let call = tokio::spawn(svc.oneshot(req()));

    let Pulse::Started { id } = next(&mut pulses).await else {
        panic!("a request starts first")
    };
    bounded(monitor.wait_in_flight(1)).await;
    advance(Duration::from_millis(300)).await;
    let inflight = monitor.requests();
    assert_eq!(inflight.len(), 1);
    assert_eq!(inflight[0].id(), id);
    assert_eq!(inflight[0].idle(), Duration::from_millis(300));
    assert_eq!(inflight[0].elapsed(), Duration::from_millis(300));

    gate.notify_one();
    assert_eq!(bounded(call).await.unwrap().unwrap(), "done");
    assert_eq!(
        next(&mut pulses).await,
        Pulse::Finished {
            id,
            outcome: Outcome::Ok,
            elapsed: Duration::from_millis(300)
        }
    );
    assert_eq!(monitor.in_flight(), 0);
    let counts = monitor.counts();
    assert_eq!(
        (counts.started(), counts.ok(), counts.finished()),
        (1, 1, 1)
    );
    assert!(monitor.health().is_serving());
}

#[tokio::test(start_paused = true)]
async fn waiting_for_work_needs_no_timeout() {
    let monitor = Monitor::new();
    let gate = Arc::new(Notify::new());
    let svc = ServiceBuilder::new()
        .layer(monitor.layer())
        .service(gated(gate.clone()));
    let calls: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot(req())))
        .collect();
    bounded(monitor.wait_started(3)).await;
    assert_eq!(monitor.in_flight(), 3);
    for _ in 0..3 {
        gate.notify_one();
    }
    bounded(monitor.wait_finished(3)).await;
    bounded(monitor.wait_in_flight(0)).await;
    for call in calls {
        assert_eq!(bounded(call).await.unwrap().unwrap(), "done");
    }
    // clones share one monitor: a second service from the same layer counts too
    let other = monitor.layer().layer(gated(gate.clone()));
    let call = tokio::spawn(other.oneshot(req()));
    bounded(monitor.wait_started(4)).await;
    gate.notify_one();
    bounded(call).await.unwrap().unwrap();
    assert_eq!(monitor.counts().ok(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_streaming_body_reports_each_frame_and_ends_the_request() {
    let monitor = Monitor::new();
    let mut pulses = monitor.subscribe();
    let (tx, rx) = mpsc::channel(4);
    let body = Arc::new(std::sync::Mutex::new(Some(StreamBody::new(
        ReceiverStream::new(rx),
    ))));
    let svc = ServiceBuilder::new()
        .layer(monitor.layer())
        .service(service_fn(move |_req: Req| {
            let body: Chunks = body.lock().unwrap().take().unwrap();
            async move { Ok::<_, Infallible>(http::Response::new(body)) }
        }));
    let response = svc.oneshot(req()).await.unwrap();
    let Pulse::Started { id } = next(&mut pulses).await else {
        panic!()
    };
    // the head arrived, but the request is in flight until the body ends
    assert_eq!(monitor.in_flight(), 1);
    let mut body = std::pin::pin!(response.into_body());

    tx.send(Ok(Frame::data(Bytes::from("a")))).await.unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "a");
    assert_eq!(next(&mut pulses).await, Pulse::Progress { id, units: 1 });

    advance(Duration::from_secs(5)).await;
    assert_eq!(monitor.requests()[0].idle(), Duration::from_secs(5));
    tx.send(Ok(Frame::data(Bytes::from("b")))).await.unwrap();
    body.frame().await.unwrap().unwrap();
    assert_eq!(next(&mut pulses).await, Pulse::Progress { id, units: 2 });
    assert_eq!(monitor.requests()[0].idle(), Duration::ZERO);
    assert_eq!(monitor.requests()[0].units(), 2);

    drop(tx);
    assert!(body.frame().await.is_none());
    assert!(matches!(
        next(&mut pulses).await,
        Pulse::Finished { outcome: Outcome::Ok, elapsed, .. } if elapsed == Duration::from_secs(5)
    ));
    assert_eq!(monitor.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_empty_or_sized_body_finishes_without_being_polled_to_the_end() {
    let monitor = Monitor::new();
    let svc = ServiceBuilder::new()
        .layer(monitor.layer())
        .service(service_fn(|req: http::Request<&'static str>| async move {
            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(*req.body()))))
        }));
    // empty: ends at once
    let empty = svc.clone().oneshot(http::Request::new("")).await.unwrap();
    assert_eq!(monitor.counts().ok(), 1);
    // sized: ends with its only frame, without waiting for a `None`
    let mut full = Box::pin(
        svc.oneshot(http::Request::new("x"))
            .await
            .unwrap()
            .into_body(),
    );
    assert_eq!(monitor.in_flight(), 1);
    full.frame().await.unwrap().unwrap();
    assert_eq!(monitor.counts().ok(), 2);
    drop((empty, full));
    assert_eq!(monitor.counts().cancelled(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_last_frame_of_a_watched_body_is_a_unit_of_progress() {
    let monitor = Monitor::new();
    let mut pulses = monitor.subscribe();
    let svc = ServiceBuilder::new()
        .layer(monitor.layer())
        .service(service_fn(|_req: Req| async {
            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("x"))))
        }));
    let mut body = Box::pin(svc.oneshot(req()).await.unwrap().into_body());
    body.frame().await.unwrap().unwrap();
    let Pulse::Started { id } = next(&mut pulses).await else {
        panic!("first pulse: started")
    };
    // the only frame counts, and the request ends with it
    assert_eq!(next(&mut pulses).await, Pulse::Progress { id, units: 1 });
    assert!(matches!(
        next(&mut pulses).await,
        Pulse::Finished {
            outcome: Outcome::Ok,
            ..
        }
    ));
    assert_eq!(monitor.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_request_is_cut_its_future_dropped_and_its_context_cancelled() {
    let monitor = Monitor::builder().stall(Duration::from_secs(2)).build();
    let (cx_tx, cx_rx) = oneshot::channel::<(Context, Option<Context>)>();
    let cx_tx = Arc::new(std::sync::Mutex::new(Some(cx_tx)));
    let (alive_tx, alive_rx) = oneshot::channel::<()>();
    let alive_tx = Arc::new(std::sync::Mutex::new(Some(alive_tx)));
    let svc = ServiceBuilder::new()
        .layer(monitor.layer())
        .service(service_fn(move |req: Req| {
            let carried = req.context().cloned().unwrap();
            let current = Context::current();
            cx_tx
                .lock()
                .unwrap()
                .take()
                .unwrap()
                .send((carried, current))
                .unwrap();
            let alive = alive_tx.lock().unwrap().take().unwrap();
            async move {
                let _alive = alive; // dropped with the future
                std::future::pending::<()>().await;
                Ok::<String, Infallible>(String::new())
            }
        }));

    let parent = Context::new();
    let mut request = req();
    request.set_context(parent.clone());
    let started = Instant::now();
    let err = svc.oneshot(request).await.unwrap_err();

    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(Kind::of(&*err), Kind::Stalled);
    assert_eq!(
        find::<Stalled>(&*err).unwrap().idle(),
        Duration::from_secs(2)
    );
    assert_eq!(err.to_string(), "stalled: no progress for 2s");
    assert!(
        bounded(alive_rx).await.is_err(),
        "the inner future was dropped"
    );
    let (carried, current) = bounded(cx_rx).await.unwrap();
    assert!(carried.is_cancelled(), "the request's context is cancelled");
    assert!(
        current.unwrap().is_cancelled(),
        "Context::current is the same one"
    );
    assert!(!parent.is_cancelled(), "the caller's context is left alone");
    let counts = monitor.counts();
    assert_eq!((counts.stalled(), counts.in_flight()), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_fast_request_is_not_cut() {
    let monitor = Monitor::builder().stall(Duration::from_secs(2)).build();
    let svc = ServiceBuilder::new()
        .layer(monitor.layer())
        .service(service_fn(|_req: Req| async {
            tokio::time::sleep(Duration::from_millis(1999)).await;
            Ok::<_, Infallible>(String::from("in time"))
        }));
    assert_eq!(svc.oneshot(req()).await.unwrap(), "in time");
    assert_eq!(monitor.counts().ok(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_goes_quiet_is_cut_but_a_slow_steady_one_is_not() {
    let monitor = Monitor::builder().stall(Duration::from_secs(2)).build();
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let body = Arc::new(std::sync::Mutex::new(Some(StreamBody::new(
        ReceiverStream::new(rx),
    ))));
    let (cx_tx, cx_rx) = oneshot::channel::<Context>();
    let cx_tx = Arc::new(std::sync::Mutex::new(Some(cx_tx)));
    let svc = ServiceBuilder::new()
        .layer(monitor.layer())
        .service(service_fn(move |req: Req| {
            let _ = cx_tx
                .lock()
                .unwrap()
                .take()
                .unwrap()
                .send(req.context().cloned().unwrap());
            let body: Chunks = body.lock().unwrap().take().unwrap();
            async move { Ok::<_, Infallible>(http::Response::new(body)) }
        }));
    let started = Instant::now();
    let body = svc.oneshot(req()).await.unwrap().into_body();
    let reader = tokio::spawn(async move {
        let mut body = std::pin::pin!(body);
        let mut frames = Vec::new();
        loop {
            match body.frame().await {
                Some(Ok(frame)) => frames.push(frame.into_data().unwrap()),
                Some(Err(err)) => return (frames, Some(err), Instant::now()),
                None => return (frames, None, Instant::now()),
            }
        }
    });
    // a frame every 1.5 s keeps it alive past the 2 s limit, then silence
    for chunk in ["a", "b", "c"] {
        tx.send(Ok(Frame::data(Bytes::from(chunk)))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let (frames, err, at) = reader.await.unwrap();
    assert_eq!(frames, ["a", "b", "c"]);
    let err = err.expect("cut with an error, not ended cleanly");
    assert_eq!(
        find::<Stalled>(&*err).unwrap().idle(),
        Duration::from_secs(2)
    );
    // the last frame came at 3.0 s
    assert_eq!(at - started, Duration::from_secs(5));
    assert!(tx.is_closed(), "the inner body was dropped");
    assert!(bounded(cx_rx).await.unwrap().is_cancelled());
    assert_eq!(monitor.counts().stalled(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_caller_giving_up_is_cancelled_not_a_failure() {
    let monitor = Monitor::builder().stall(Duration::from_secs(10)).build();
    let mut pulses = monitor.subscribe();
    let (cx_tx, mut cx_rx) = mpsc::unbounded_channel::<Context>();
    let mut svc = ServiceBuilder::new()
        .layer(monitor.layer())
        .service(service_fn(move |req: Req| {
            cx_tx.send(req.context().cloned().unwrap()).unwrap();
            std::future::pending::<Result<String, Infallible>>()
        }));
    let future = svc.ready().await.unwrap().call(req());
    let cx = bounded(cx_rx.recv()).await.unwrap();
    drop(future);
    assert!(cx.is_cancelled());
    next(&mut pulses).await;
    assert!(matches!(
        next(&mut pulses).await,
        Pulse::Finished {
            outcome: Outcome::Cancelled,
            ..
        }
    ));
    let health = monitor.health();
    assert!(health.is_serving());
    assert_eq!(health.failures_in_a_row(), 0);
}

#[tokio::test(start_paused = true)]
async fn failures_in_a_row_make_it_unhealthy_until_a_success() {
    let monitor = Monitor::builder()
        .unhealthy_after(2.try_into().unwrap())
        .build();
    let svc = ServiceBuilder::new()
        .layer(monitor.layer())
        .service(service_fn(|req: http::Request<bool>| async move {
            if *req.body() {
                Ok(String::from("ok"))
            } else {
                Err(BoxError::from("boom"))
            }
        }));
    let err = svc
        .clone()
        .oneshot(http::Request::new(false))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "boom",
        "inner errors pass through as they are"
    );
    assert!(monitor.health().is_serving());
    svc.clone()
        .oneshot(http::Request::new(false))
        .await
        .unwrap_err();
    let health = monitor.health();
    assert!(!health.is_serving());
    assert_eq!(health.to_string(), "not serving: 2 failures in a row");
    svc.oneshot(http::Request::new(true)).await.unwrap();
    assert!(monitor.health().is_serving());
    assert_eq!(monitor.counts().error(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_request_in_flight_past_the_stall_limit_is_reported_not_serving() {
    // The health check sees it before the watchdog has run (the future is not polled).
    let monitor = Monitor::builder().stall(Duration::from_secs(1)).build();
    let mut svc = ServiceBuilder::new()
        .layer(monitor.layer())
        .service(service_fn(|_req: Req| {
            std::future::pending::<Result<String, Infallible>>()
        }));
    let future = svc.ready().await.unwrap().call(req());
    advance(Duration::from_secs(1)).await;
    let health = monitor.health();
    assert_eq!((health.is_serving(), health.stuck()), (false, 1));
    drop(future);
    assert!(monitor.health().is_serving());
}

#[tokio::test(start_paused = true)]
async fn interval_beats_while_busy_and_not_while_idle() {
    let monitor = Monitor::builder().interval(Duration::from_secs(1)).build();
    let mut pulses = monitor.subscribe();
    let gate = Arc::new(Notify::new());
    let svc = ServiceBuilder::new()
        .layer(monitor.layer())
        .service(gated(gate.clone()));
    let call = tokio::spawn(svc.clone().oneshot(req()));
    assert!(matches!(next(&mut pulses).await, Pulse::Started { .. }));
    for n in 1..=2u64 {
        assert_eq!(
            next(&mut pulses).await,
            Pulse::Beat {
                in_flight: 1,
                longest_idle: Some(Duration::from_secs(n))
            }
        );
    }
    gate.notify_one();
    bounded(call).await.unwrap().unwrap();
    assert!(matches!(next(&mut pulses).await, Pulse::Finished { .. }));
    // idle now: ticks pass without beats, so the next pulse is the next request
    advance(Duration::from_secs(5)).await;
    let call = tokio::spawn(svc.oneshot(req()));
    assert!(matches!(next(&mut pulses).await, Pulse::Started { .. }));
    gate.notify_one();
    bounded(call).await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn idle_beats_when_asked() {
    let monitor = Monitor::builder()
        .interval(Duration::from_secs(1))
        .idle_beats(true)
        .build();
    let mut pulses = monitor.subscribe();
    let start = Instant::now();
    assert_eq!(
        next(&mut pulses).await,
        Pulse::Beat {
            in_flight: 0,
            longest_idle: None
        }
    );
    assert_eq!(start.elapsed(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn the_interval_task_stops_with_its_last_subscriber_and_its_last_handle() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let monitor = Monitor::builder()
        .interval(Duration::from_secs(1))
        .idle_beats(true)
        .build();
    assert_eq!(metrics.num_alive_tasks(), 0, "nobody subscribes: no task");
    let mut pulses = monitor.subscribe();
    next(&mut pulses).await;
    assert_eq!(metrics.num_alive_tasks(), 1);
    drop(pulses);
    advance(Duration::from_secs(1)).await;
    tokio::task::yield_now().await;
    assert_eq!(
        metrics.num_alive_tasks(),
        0,
        "stopped with the last subscriber"
    );

    let mut pulses = monitor.subscribe();
    next(&mut pulses).await;
    assert_eq!(
        metrics.num_alive_tasks(),
        1,
        "restarted by a new subscriber"
    );
    drop(monitor);
    tokio::task::yield_now().await;
    assert_eq!(metrics.num_alive_tasks(), 0, "stopped with the last handle");
    assert_eq!(bounded(pulses.next()).await, None, "and the stream ends");
}

#[tokio::test(start_paused = true)]
async fn a_slow_subscriber_misses_pulses_instead_of_holding_up_requests() {
    let monitor = Monitor::builder().capacity(4).build();
    let mut slow = monitor.subscribe();
    let svc = ServiceBuilder::new()
        .layer(monitor.layer())
        .service(service_fn(|_req: Req| async {
            Ok::<_, Infallible>(String::new())
        }));
    for _ in 0..5 {
        svc.clone().oneshot(req()).await.unwrap(); // never waits for the subscriber
    }
    // 10 pulses sent, 4 kept: the last two requests' start and finish
    let kept: Vec<Pulse> = (&mut slow).take(4).collect().await;
    assert_eq!(slow.missed(), 6);
    assert_eq!(
        kept[0],
        Pulse::Started {
            id: kept[0].id().unwrap()
        }
    );
    assert_eq!(kept[0].id().unwrap().get(), 4);
    assert_eq!(kept[3].id().unwrap().get(), 5);
}

#[tokio::test(start_paused = true)]
async fn no_pulses_are_kept_for_nobody() {
    let monitor = Monitor::new();
    let svc = ServiceBuilder::new()
        .layer(monitor.layer())
        .service(service_fn(|_req: Req| async {
            Ok::<_, Infallible>(String::new())
        }));
    svc.clone().oneshot(req()).await.unwrap();
    let mut late = monitor.subscribe();
    svc.oneshot(req()).await.unwrap();
    // the first request's pulses were never built; the subscriber sees only the second
    assert_eq!(next(&mut late).await.id().unwrap().get(), 2);
    assert_eq!(late.missed(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_handler_reporting_progress_is_cut_only_once_it_stops() {
    let monitor = Monitor::builder().stall(Duration::from_secs(1)).build();
    let mut pulses = monitor.subscribe();
    let svc = ServiceBuilder::new()
        .layer(monitor.layer())
        .service(service_fn(|_req: Req| async {
            let progress = Progress::current().expect("in scope under the watchdog");
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(900)).await;
                assert!(progress.report());
            }
            std::future::pending::<()>().await; // then it stops
            Ok::<String, Infallible>(String::new())
        }));
    let start = Instant::now();
    let err = svc.oneshot(req()).await.unwrap_err();
    // last report at 2.7 s, cut 1 s later
    assert_eq!(start.elapsed(), Duration::from_millis(3700));
    assert_eq!(
        find::<Stalled>(&*err).unwrap().idle(),
        Duration::from_secs(1)
    );
    let id = next(&mut pulses).await.id().unwrap();
    for units in 1..=3 {
        assert_eq!(next(&mut pulses).await, Pulse::Progress { id, units });
    }
    assert!(matches!(
        next(&mut pulses).await,
        Pulse::Finished {
            outcome: Outcome::Stalled,
            ..
        }
    ));
}

#[tokio::test(start_paused = true)]
async fn progress_is_only_in_scope_under_the_watchdog_and_late_reports_change_nothing() {
    let plain = Monitor::new();
    let svc = plain.layer().layer(service_fn(|_req: Req| async {
        Ok::<_, Infallible>(format!("{:?}", Progress::current().map(|p| p.id())))
    }));
    assert_eq!(svc.oneshot(req()).await.unwrap(), "None");

    let watched = Monitor::builder().stall(Duration::from_secs(1)).build();
    let (tx, rx) = oneshot::channel::<Progress>();
    let tx = std::sync::Mutex::new(Some(tx));
    let svc = watched.layer().layer(service_fn(move |_req: Req| {
        // visible in `call` too, not only in the future
        let progress = Progress::current().unwrap();
        tx.lock().unwrap().take().unwrap().send(progress).unwrap();
        async { Ok::<_, Infallible>(String::new()) }
    }));
    svc.oneshot(req()).await.unwrap();
    let late = bounded(rx).await.unwrap();
    assert!(!late.report(), "the request has ended");
    assert_eq!(watched.counts().ok(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_producer_reporting_progress_keeps_a_slow_body_alive() {
    // frames every 3 s, over a 2 s stall limit, but the producer reports every second
    let monitor = Monitor::builder().stall(Duration::from_secs(2)).build();
    let svc = ServiceBuilder::new()
        .layer(monitor.layer())
        .service(service_fn(|_req: Req| async {
            let progress = Progress::current().unwrap();
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                for chunk in ["a", "b"] {
                    for _ in 0..3 {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        progress.report();
                    }
                    tx.send(Ok(Frame::data(Bytes::from(chunk)))).await.unwrap();
                }
            });
            let body: Chunks = StreamBody::new(ReceiverStream::new(rx));
            Ok::<_, Infallible>(http::Response::new(body))
        }));
    let body = svc.oneshot(req()).await.unwrap().into_body();
    let collected = body.collect().await.unwrap().to_bytes();
    assert_eq!(collected, "ab");
    let counts = monitor.counts();
    assert_eq!((counts.ok(), counts.stalled()), (1, 0));
}

#[tokio::test]
async fn the_monitor_times_requests_with_the_tsc_by_default() {
    let debug = format!("{:?}", Monitor::new());
    assert!(debug.contains(r#"source: "quanta""#), "{debug}");
}

#[tokio::test(start_paused = true)]
async fn a_monitor_built_on_a_paused_clock_times_with_tokios() {
    let debug = format!("{:?}", Monitor::new());
    assert!(debug.contains(r#"source: "tokio""#), "{debug}");
}

#[test]
fn a_monitor_built_before_the_clock_is_paused_can_be_given_tokios() {
    let monitor = Monitor::builder().clock(Clock::tokio()).build();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async {
        let gate = Arc::new(Notify::new());
        let svc = monitor.layer().layer(gated(gate.clone()));
        let call = tokio::spawn(svc.oneshot(req()));
        bounded(monitor.wait_in_flight(1)).await;
        advance(Duration::from_millis(300)).await;
        assert_eq!(monitor.requests()[0].elapsed(), Duration::from_millis(300));
        gate.notify_one();
        bounded(call).await.unwrap().unwrap();
    });
}

#[tokio::test(start_paused = true)]
async fn a_limit_refusing_is_counted_not_a_failure() {
    let monitor = Monitor::builder()
        .unhealthy_after(2.try_into().unwrap())
        .build();
    let svc = ServiceBuilder::new()
        .layer(monitor.layer())
        .service(service_fn(|req: http::Request<u8>| async move {
            match *req.body() {
                0 => Err::<String, BoxError>(
                    atscale_core::RateLimited::new(Duration::from_secs(1)).into(),
                ),
                1 => Err(atscale_core::Overloaded::new().into()),
                _ => Err("boom".into()),
            }
        }));
    for which in [0, 1, 0, 1] {
        let err = svc
            .clone()
            .oneshot(http::Request::new(which))
            .await
            .unwrap_err();
        assert!(
            matches!(Kind::of(&*err), Kind::RateLimited | Kind::Overloaded),
            "the error passes through as it is"
        );
    }
    let counts = monitor.counts();
    assert_eq!((counts.refused(), counts.error()), (4, 0));
    assert_eq!(counts.of(Outcome::Refused), 4);
    assert_eq!(counts.finished(), 4);
    assert!(monitor.health().is_serving(), "{}", monitor.health());
    for _ in 0..2 {
        svc.clone()
            .oneshot(http::Request::new(2))
            .await
            .unwrap_err();
    }
    assert!(!monitor.health().is_serving(), "its own errors still count");
}

/// A service answering `status` with a one-frame body.
fn answering() -> impl Service<
    http::Request<u16>,
    Response = http::Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send,
> + Clone {
    service_fn(|req: http::Request<u16>| async move {
        let mut res = http::Response::new(Full::new(Bytes::from_static(b"x")));
        *res.status_mut() = http::StatusCode::from_u16(*req.body()).unwrap();
        Ok::<_, Infallible>(res)
    })
}

#[tokio::test(start_paused = true)]
async fn a_server_error_answer_is_a_failure_a_client_error_is_not() {
    let monitor = Monitor::builder()
        .unhealthy_after(2.try_into().unwrap())
        .build();
    let mut pulses = monitor.subscribe();
    let svc = ServiceBuilder::new()
        .layer(monitor.layer())
        .service(answering());
    let mut seen = Vec::new();
    for status in [200, 404, 501, 429, 500, 503] {
        let res = svc
            .clone()
            .oneshot(http::Request::new(status))
            .await
            .unwrap();
        assert_eq!(res.status(), status, "the answer passes through as it is");
        res.into_body().collect().await.unwrap();
        assert!(matches!(next(&mut pulses).await, Pulse::Started { .. }));
        let _progress = next(&mut pulses).await;
        match next(&mut pulses).await {
            Pulse::Finished { outcome, .. } => seen.push(outcome),
            other => panic!("{other:?}"),
        }
    }
    use Outcome::{Error, Ok, Refused};
    assert_eq!(seen, [Ok, Ok, Ok, Refused, Error, Error]);
    let health = monitor.health();
    assert_eq!(health.to_string(), "not serving: 2 failures in a row");
}

/// A gRPC answer: a message then trailers with `code`, or (`trailers_only`)
/// the code in the head and an empty body that says it has ended (as
/// tonic's and hyper's do).
fn grpc_answer(
    code: &'static str,
    trailers_only: bool,
) -> http::Response<http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>> {
    let status = http::HeaderValue::from_static(code);
    let mut res = if trailers_only {
        let mut res = http::Response::new(http_body_util::Empty::new().boxed_unsync());
        res.headers_mut().insert("grpc-status", status);
        res
    } else {
        let (tx, rx) = mpsc::channel(2);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", status);
        tx.try_send(Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))))
            .unwrap();
        tx.try_send(Ok(Frame::trailers(trailers))).unwrap();
        // The sender stays open: the trailers alone end the request.
        std::mem::forget(tx);
        http::Response::new(StreamBody::new(ReceiverStream::new(rx)).boxed_unsync())
    };
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    res
}

#[tokio::test(start_paused = true)]
async fn a_grpc_status_in_the_trailers_or_a_trailers_only_head_says_how_it_ended() {
    for (code, trailers_only, expected) in [
        ("0", false, Outcome::Ok),
        ("5", false, Outcome::Ok),
        ("13", false, Outcome::Error),
        ("8", false, Outcome::Refused),
        ("14", true, Outcome::Error),
        ("3", true, Outcome::Ok),
        ("8", true, Outcome::Refused),
    ] {
        let monitor = Monitor::new();
        let svc = ServiceBuilder::new()
            .layer(monitor.layer())
            .service(service_fn(move |_req: Req| async move {
                Ok::<_, Infallible>(grpc_answer(code, trailers_only))
            }));
        let res = svc.oneshot(req()).await.unwrap();
        let mut body = std::pin::pin!(res.into_body());
        if trailers_only {
            assert!(http_body::Body::is_end_stream(&*body));
        } else {
            assert!(body.frame().await.unwrap().unwrap().is_data());
            let trailers = body.frame().await.unwrap().unwrap();
            assert_eq!(trailers.trailers_ref().unwrap()["grpc-status"], code);
        }
        let counts = monitor.counts();
        assert_eq!(
            (counts.finished(), counts.of(expected)),
            (1, 1),
            "grpc-status {code} (trailers-only: {trailers_only}): {counts:?}"
        );
    }
}
