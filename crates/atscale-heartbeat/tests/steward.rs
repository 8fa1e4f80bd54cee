//! The steward: rebuilding a service that stops beating.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use atscale_core::{BoxError, Kind, Stalled, find};
use atscale_heartbeat::{Outcome, Steward};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

type Req = http::Request<()>;

/// How each instance behaves, by its generation (0 = the first one built).
#[derive(Clone, Copy, Debug)]
enum Mode {
    Hang,
    Fail,
    NeverReady,
    Answer,
}

#[derive(Clone)]
struct Backend {
    generation: u64,
    mode: Mode,
}

impl Service<Req> for Backend {
    type Response = String;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<String, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        match self.mode {
            Mode::NeverReady => Poll::Pending,
            _ => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, _req: Req) -> Self::Future {
        let (mode, generation) = (self.mode, self.generation);
        Box::pin(async move {
            match mode {
                Mode::Hang | Mode::NeverReady => std::future::pending().await,
                Mode::Fail => Err(BoxError::from("backend failed")),
                Mode::Answer => Ok(format!("answer from instance {generation}")),
            }
        })
    }
}

/// A factory whose instances behave as `plan` says, the last entry repeating.
fn factory(plan: &'static [Mode]) -> (Arc<AtomicU64>, impl Fn() -> Backend + Send + Sync) {
    let built = Arc::new(AtomicU64::new(0));
    let count = built.clone();
    let make = move || {
        let generation = count.fetch_add(1, Ordering::SeqCst);
        let mode = plan[(generation as usize).min(plan.len() - 1)];
        Backend { generation, mode }
    };
    (built, make)
}

async fn call<S: Service<Req, Error = BoxError>>(svc: &mut S) -> Result<S::Response, BoxError> {
    svc.ready().await?.call(http::Request::new(())).await
}

/// Every wait on a signal is bounded: a regression fails the test instead
/// of hanging CI (on the paused clock the bound is reached at once when
/// nothing else is pending).
async fn bounded<F: std::future::Future>(signal: F) -> F::Output {
    tokio::time::timeout(std::time::Duration::from_secs(60), signal)
        .await
        .expect("a signal the test waits for never came within 60 s")
}

#[tokio::test(start_paused = true)]
async fn a_service_that_stops_responding_is_rebuilt_and_the_next_requests_succeed() {
    let (built, make) = factory(&[Mode::Hang, Mode::Answer]);
    let mut steward = Steward::builder(make)
        .stall(Duration::from_secs(2))
        .failures(2.try_into().unwrap())
        .build();
    let monitor = steward.monitor().clone();
    let start = Instant::now();

    // both requests go to the hung instance; neither hangs for ever
    let first = tokio::spawn({
        let mut s = steward.clone();
        async move { call(&mut s).await }
    });
    let second = tokio::spawn({
        let mut s = steward.clone();
        async move { call(&mut s).await }
    });
    bounded(monitor.wait_started(2)).await;
    for handle in [first, second] {
        let err = bounded(handle).await.unwrap().unwrap_err();
        assert_eq!(Kind::of(&*err), Kind::Stalled);
    }
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert_eq!(steward.restarts(), 1);
    assert_eq!(built.load(Ordering::SeqCst), 2);

    for _ in 0..3 {
        assert_eq!(call(&mut steward).await.unwrap(), "answer from instance 1");
    }
    let counts = monitor.counts();
    assert_eq!((counts.stalled(), counts.ok()), (2, 3));
    assert_eq!(steward.restarts(), 1, "a healthy instance is kept");
}

#[tokio::test(start_paused = true)]
async fn failures_in_a_row_rebuild_but_a_success_in_between_resets_the_count() {
    let (_, make) = factory(&[Mode::Fail, Mode::Answer]);
    let mut steward = Steward::builder(make)
        .failures(3.try_into().unwrap())
        .build();
    for _ in 0..2 {
        let err = call(&mut steward).await.unwrap_err();
        assert_eq!(err.to_string(), "backend failed");
    }
    assert_eq!(steward.restarts(), 0);
    call(&mut steward).await.unwrap_err();
    assert_eq!(steward.restarts(), 1);
    assert_eq!(call(&mut steward).await.unwrap(), "answer from instance 1");
}

#[tokio::test(start_paused = true)]
async fn an_instance_that_never_becomes_ready_is_replaced() {
    let (_, make) = factory(&[Mode::NeverReady, Mode::Answer]);
    let mut steward = Steward::builder(make).stall(Duration::from_secs(3)).build();
    let start = Instant::now();
    assert_eq!(call(&mut steward).await.unwrap(), "answer from instance 1");
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert_eq!(steward.restarts(), 1);
}

#[tokio::test(start_paused = true)]
async fn rebuilds_back_off_and_the_backoff_doubles() {
    // every instance is broken: rebuilds at the stall, then after 1 s, 2 s, 2 s (capped)
    let (built_tx, mut built_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let mut steward = Steward::builder(move || {
        built_tx.send(Instant::now()).unwrap();
        Backend {
            generation: 0,
            mode: Mode::NeverReady,
        }
    })
    .stall(Duration::from_millis(100))
    .backoff(Duration::from_secs(1))
    .max_backoff(Duration::from_secs(2))
    .build();
    let start = bounded(built_rx.recv()).await.unwrap();
    let waiting = tokio::spawn(async move {
        let _ = steward.ready().await;
    });
    let mut rebuilt_at = Vec::new();
    for _ in 0..4 {
        rebuilt_at.push((bounded(built_rx.recv()).await.unwrap() - start).as_millis());
    }
    waiting.abort();
    assert_eq!(rebuilt_at, [100, 1100, 3100, 5100]);
}

#[tokio::test(start_paused = true)]
async fn old_in_flight_requests_end_cleanly_after_a_rebuild() {
    // instance 0 fails fast for some requests and hangs on others
    let (_, make) = factory(&[Mode::Hang, Mode::Answer]);
    let mut steward = Steward::builder(make)
        .stall(Duration::from_secs(5))
        .failures(1.try_into().unwrap())
        .build();
    let monitor = steward.monitor().clone();
    let mut pulses = monitor.subscribe();
    let slow = tokio::spawn({
        let mut s = steward.clone();
        async move { call(&mut s).await }
    });
    bounded(monitor.wait_started(1)).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    // a second request, 1 s later, also on instance 0
    let later = tokio::spawn({
        let mut s = steward.clone();
        async move { call(&mut s).await }
    });
    bounded(monitor.wait_started(2)).await;
    // the first stalls at 5 s: rebuild; the second still ends, at 6 s, stalled too
    let err = slow.await.unwrap().unwrap_err();
    assert!(find::<Stalled>(&*err).is_some());
    assert_eq!(steward.restarts(), 1);
    assert_eq!(call(&mut steward).await.unwrap(), "answer from instance 1");
    let err = later.await.unwrap().unwrap_err();
    assert!(find::<Stalled>(&*err).is_some());
    // the late failure of the old instance does not count against the new one
    assert_eq!(steward.restarts(), 1);
    let outcomes: Vec<Outcome> = {
        let mut v = Vec::new();
        while v.len() < 3 {
            if let Some(atscale_heartbeat::Pulse::Finished { outcome, .. }) =
                tokio_stream::StreamExt::next(&mut pulses).await
            {
                v.push(outcome);
            }
        }
        v
    };
    assert_eq!(outcomes, [Outcome::Stalled, Outcome::Ok, Outcome::Stalled]);
}

#[test]
fn a_steward_is_usable_with_infallible_services_too() {
    let _steward = Steward::builder(|| {
        tower::service_fn(|_req: Req| async { Ok::<_, Infallible>(String::new()) })
    })
    .build();
}

#[tokio::test(start_paused = true)]
async fn a_stalled_response_body_counts_and_a_caller_giving_up_does_not() {
    use http_body_util::{BodyExt, Full, StreamBody};
    type Body = http_body_util::Either<
        Full<bytes::Bytes>,
        StreamBody<
            futures_util::stream::Pending<Result<http_body::Frame<bytes::Bytes>, Infallible>>,
        >,
    >;
    let built = Arc::new(AtomicU64::new(0));
    let count = built.clone();
    let mut steward = Steward::builder(move || {
        let generation = count.fetch_add(1, Ordering::SeqCst);
        tower::service_fn(move |req: Req| async move {
            if req.uri() == "/hang" {
                std::future::pending::<()>().await;
            }
            let body: Body = if generation == 0 {
                // the head arrives, the body never does
                http_body_util::Either::Right(StreamBody::new(futures_util::stream::pending()))
            } else {
                http_body_util::Either::Left(Full::new(format!("instance {generation}").into()))
            };
            Ok::<_, Infallible>(http::Response::new(body))
        })
    })
    .stall(Duration::from_secs(1))
    .failures(1.try_into().unwrap())
    .build();

    // a caller that gives up is not the instance's fault
    let hang = http::Request::builder().uri("/hang").body(()).unwrap();
    let gave_up = steward.ready().await.unwrap().call(hang);
    drop(gave_up);
    assert_eq!(steward.restarts(), 0);

    let response = call(&mut steward).await.unwrap();
    let err = response.into_body().collect().await.unwrap_err();
    assert_eq!(Kind::of(&*err), Kind::Stalled);
    assert_eq!(steward.restarts(), 1, "the body's stall counted");

    let response = call(&mut steward).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "instance 1");
    let counts = steward.monitor().counts();
    assert_eq!(
        (counts.cancelled(), counts.stalled(), counts.ok()),
        (1, 1, 1)
    );
}
