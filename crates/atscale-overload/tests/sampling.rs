//! Sampling at low load (`Builder::sampling`): which requests teach the
//! algorithm, and that a slot given back without the lock still reaches a
//! waiter. On tokio's paused clock.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use atscale_core::{BoxError, Clock, Overloaded};
use atscale_overload::OverloadLayer;
use atscale_overload::limit::{Algorithm, Sample};
use support::*;
use tokio::sync::oneshot;
use tokio::time::timeout;
use tower::{Layer, Service, ServiceExt, service_fn};

/// The layer's warm-up: its first 1,000 requests are all timed.
const WARM_UP: usize = 1000;

/// Counts its updates, and answers the limit it is told to (0: keep).
#[derive(Debug, Clone, Default)]
struct Counting {
    updates: Arc<AtomicUsize>,
    drops: Arc<AtomicUsize>,
    next: Arc<AtomicUsize>,
}

impl Algorithm for Counting {
    fn update(&mut self, limit: f64, sample: &Sample) -> f64 {
        self.updates.fetch_add(1, Ordering::SeqCst);
        if sample.dropped() {
            self.drops.fetch_add(1, Ordering::SeqCst);
        }
        match self.next.load(Ordering::SeqCst) {
            0 => limit,
            n => n as f64,
        }
    }
}

fn layer(algorithm: Counting, limit: usize, sampling: u32) -> OverloadLayer {
    OverloadLayer::builder()
        .algorithm(algorithm)
        .initial_limit(limit)
        .max_limit(limit)
        .sampling(sampling)
        .clock(Clock::tokio())
        .build()
        .unwrap()
}

/// Answers at once; fails with `Overloaded` when the request's id is odd.
fn instant() -> impl Service<
    http::Request<usize>,
    Response = usize,
    Error = BoxError,
    Future = impl Future<Output = Result<usize, BoxError>> + Send,
> + Clone
+ Send
+ 'static {
    service_fn(|r: http::Request<usize>| async move {
        let id = *r.body();
        if id % 2 == 1 {
            Err(Overloaded::new().into())
        } else {
            Ok(id)
        }
    })
}

/// `n` requests one after another (one in flight), ids `2 × i` (all answered).
async fn one_by_one<S>(svc: &mut S, n: usize)
where
    S: Service<http::Request<usize>, Response = usize, Error = BoxError>,
{
    for i in 0..n {
        svc.ready().await.unwrap().call(req(2 * i)).await.unwrap();
    }
}

/// A request whose body is the signal its answer waits for.
type Gated = http::Request<oneshot::Receiver<()>>;

/// Answers a [`Gated`] request when its signal fires (or is dropped).
fn gated() -> impl Service<
    Gated,
    Response = usize,
    Error = BoxError,
    Future = impl Future<Output = Result<usize, BoxError>> + Send,
> + Clone
+ Send
+ 'static {
    service_fn(|r: Gated| async move {
        r.into_body().await.ok();
        Ok::<_, BoxError>(0usize)
    })
}

/// `n` gated requests one after another, each let go at once.
async fn gated_one_by_one<S>(svc: &mut S, n: usize)
where
    S: Service<Gated, Response = usize, Error = BoxError>,
{
    for _ in 0..n {
        let (tx, rx) = oneshot::channel();
        let call = svc.ready().await.unwrap().call(http::Request::new(rx));
        tx.send(()).unwrap();
        call.await.unwrap();
    }
}

/// `n` gated requests held in flight at once, then all let go and answered.
async fn hold_then_answer<S>(svc: &mut S, n: usize)
where
    S: Service<Gated, Response = usize, Error = BoxError>,
    S::Future: Send + 'static,
{
    let mut held = Vec::new();
    for _ in 0..n {
        let (tx, rx) = oneshot::channel();
        let call = tokio::spawn(svc.ready().await.unwrap().call(http::Request::new(rx)));
        held.push((tx, call));
    }
    settle().await;
    for (tx, call) in held {
        tx.send(()).unwrap();
        timeout(Duration::from_secs(1), call)
            .await
            .expect("answered")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn at_low_load_one_request_in_n_teaches_the_algorithm_after_the_warm_up() {
    let algo = Counting::default();
    let mut svc = layer(algo.clone(), 100, 4).layer(instant());
    one_by_one(&mut svc, WARM_UP).await;
    assert_eq!(
        algo.updates.load(Ordering::SeqCst),
        WARM_UP,
        "the warm-up times every request"
    );
    one_by_one(&mut svc, 400).await;
    assert_eq!(algo.updates.load(Ordering::SeqCst), WARM_UP + 100);

    // A request alone in flight is sampled even when that is an eighth of
    // the limit or more (a fast service's jitter brings Vegas' limit down to
    // a few).
    let algo = Counting::default();
    let mut svc = layer(algo.clone(), 4, 4).layer(instant());
    one_by_one(&mut svc, WARM_UP + 400).await;
    assert_eq!(algo.updates.load(Ordering::SeqCst), WARM_UP + 100);

    // Sampling 1: every request.
    let algo = Counting::default();
    let mut svc = layer(algo.clone(), 100, 1).layer(instant());
    one_by_one(&mut svc, WARM_UP + 400).await;
    assert_eq!(algo.updates.load(Ordering::SeqCst), WARM_UP + 400);
}

#[tokio::test(start_paused = true)]
async fn every_request_is_timed_from_half_the_limit_up() {
    let algo = Counting::default();
    let mut svc = layer(algo.clone(), 80, 1_000_000).layer(gated());
    // Past the warm-up, one at a time: untimed.
    gated_one_by_one(&mut svc, WARM_UP + 100).await;
    let base = algo.updates.load(Ordering::SeqCst);
    assert_eq!(base, WARM_UP, "one at a time, far under the limit: untimed");
    // 50 held: the 40th to the 50th are admitted with at least 80 / 2 in
    // flight (themselves included), and timed; from 80 / 8 to 80 / 2 one in
    // `sampling / 8` would be (none here).
    hold_then_answer(&mut svc, 50).await;
    assert_eq!(algo.updates.load(Ordering::SeqCst) - base, 11);
}

#[tokio::test(start_paused = true)]
async fn from_an_eighth_to_half_the_limit_one_in_sampling_over_8_is_timed() {
    let algo = Counting::default();
    let mut svc = layer(algo.clone(), 80, 64).layer(gated());
    // The warm-up: its requests are all timed, one at a time.
    gated_one_by_one(&mut svc, WARM_UP).await;
    assert_eq!(algo.updates.load(Ordering::SeqCst), WARM_UP);
    // 39 held: the 1st to the 9th under 80 / 8 in flight count toward one
    // in 64 (none reached); from the 10th, one in 64 / 8 = 8 is timed (the
    // counter is then at 10): the 10th, 18th, 26th and 34th.
    hold_then_answer(&mut svc, 39).await;
    assert_eq!(algo.updates.load(Ordering::SeqCst) - WARM_UP, 4);
}

#[tokio::test(start_paused = true)]
async fn an_untimed_drop_makes_the_next_requests_timed() {
    let algo = Counting::default();
    let mut svc = layer(algo.clone(), 100, 1_000_000).layer(instant());
    one_by_one(&mut svc, WARM_UP + 10).await;
    assert_eq!(algo.updates.load(Ordering::SeqCst), WARM_UP);
    // An untimed request is refused downstream: nothing to learn from it...
    let err = svc.ready().await.unwrap().call(req(1)).await.unwrap_err();
    assert!(err.is::<Overloaded>());
    assert_eq!(algo.updates.load(Ordering::SeqCst), WARM_UP);
    // ...but the next one that is dropped teaches the algorithm.
    let err = svc.ready().await.unwrap().call(req(3)).await.unwrap_err();
    assert!(err.is::<Overloaded>());
    assert_eq!(algo.updates.load(Ordering::SeqCst), WARM_UP + 1);
    assert_eq!(algo.drops.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_slot_given_back_without_the_lock_reaches_a_waiter() {
    let algo = Counting::default();
    let layer = layer(algo.clone(), 20, 1_000_000);
    let admission = layer.admission();
    let mut svc = layer.layer(gated());
    gated_one_by_one(&mut svc, WARM_UP + 10).await;
    // Two untimed requests in flight...
    let mut untimed = Vec::new();
    for _ in 0..2 {
        let (tx, rx) = oneshot::channel();
        untimed.push((
            tx,
            tokio::spawn(svc.ready().await.unwrap().call(http::Request::new(rx))),
        ));
    }
    // ...then the limit falls to 1 under them (a timed request teaches it:
    // 10 to 13 in flight of 20).
    let mut timed = Vec::new();
    for _ in 0..11 {
        let (tx, rx) = oneshot::channel();
        timed.push((
            tx,
            tokio::spawn(svc.ready().await.unwrap().call(http::Request::new(rx))),
        ));
    }
    settle().await;
    algo.next.store(1, Ordering::SeqCst);
    for (tx, call) in timed {
        tx.send(()).unwrap();
        call.await.unwrap().unwrap();
    }
    assert_eq!((admission.limit(), admission.in_flight()), (1, 2));
    // A request arrives: it must wait.
    let (tx, rx) = oneshot::channel();
    let waiter = tokio::spawn(svc.ready().await.unwrap().call(http::Request::new(rx)));
    settle().await;
    assert_eq!(admission.queue_depth(), 1);
    // The untimed requests finish: the last slot freed goes to the waiter.
    for (tx, call) in untimed {
        tx.send(()).unwrap();
        call.await.unwrap().unwrap();
    }
    settle().await;
    assert_eq!((admission.in_flight(), admission.queue_depth()), (1, 0));
    tx.send(()).unwrap();
    timeout(Duration::from_secs(1), waiter)
        .await
        .expect("the waiter was served")
        .unwrap()
        .unwrap();
}

#[test]
fn sampling_zero_is_refused_naming_the_field() {
    let err = OverloadLayer::builder().sampling(0).build().unwrap_err();
    assert_eq!(err.field(), "sampling");
}
