//! The response future's shape: as small as tower's `ConcurrencyLimit`
//! future, and no slot lost when the inner service panics in `call`.

mod support;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::pin;
use std::task::{Context, Waker};
use std::time::Duration;

use atscale_core::{BoxError, Clock};
use atscale_overload::OverloadLayer;
use support::*;
use tower::{Layer, Service, ServiceExt, service_fn};

fn one_slot_one_place() -> OverloadLayer {
    OverloadLayer::builder()
        .min_limit(1)
        .max_limit(1)
        .initial_limit(1)
        .queue_capacity(1)
        .clock(Clock::tokio())
        .build()
        .unwrap()
}

/// A request admitted at once is its inner future and two words, as tower's
/// (a larger future costs its callers more in moves than the admission).
#[test]
fn the_response_future_is_the_inner_future_and_two_words() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _g = rt.enter();
    let mut inner = service_fn(|r: http::Request<usize>| async move {
        tokio::task::yield_now().await;
        Ok::<_, BoxError>(*r.body())
    });
    let inner_size = std::mem::size_of_val(&inner.call(req(0)));
    let mut svc = OverloadLayer::new().layer(inner);
    let ours = std::mem::size_of_val(&svc.call(req(0)));
    let mut tower = tower::limit::ConcurrencyLimit::new(inner, 10);
    let mut cx = Context::from_waker(Waker::noop());
    assert!(tower.poll_ready(&mut cx).is_ready());
    let theirs = std::mem::size_of_val(&tower.call(req(0)));
    assert_eq!(ours, inner_size + 16, "inner future {inner_size} bytes");
    assert_eq!(ours, theirs);
}

/// A service whose `call` panics for request 1 (before any future exists)
/// and answers the others when `go` fires.
fn panics_on_one(
    go: std::sync::Arc<tokio::sync::Notify>,
) -> impl Service<http::Request<usize>, Response = usize, Error = BoxError, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(move |r: http::Request<usize>| {
        let id = *r.body();
        assert_ne!(id, 1, "request 1 panics in call");
        let go = go.clone();
        async move {
            go.notified().await;
            Ok::<_, BoxError>(id)
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_call_that_panics_when_admitted_at_once_gives_its_slot_back() {
    let go = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut svc = one_slot_one_place().layer(panics_on_one(go.clone()));
    let admission = svc.admission();
    let ready = svc.ready().await.unwrap();
    let panicked = catch_unwind(AssertUnwindSafe(|| drop(ready.call(req(1)))));
    assert!(panicked.is_err(), "the inner call panicked");
    assert_eq!(admission.in_flight(), 0, "the slot went back");
    // The next request is admitted at once, not queued behind a lost slot.
    let next = tokio::spawn(svc.clone().oneshot(req(2)));
    settle().await;
    assert_eq!((admission.in_flight(), admission.queue_depth()), (1, 0));
    go.notify_waiters();
    let out = tokio::time::timeout(Duration::from_secs(1), next).await;
    assert_eq!(out.unwrap().unwrap().unwrap(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_call_that_panics_when_granted_from_the_queue_gives_its_slot_back() {
    let go = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut svc = one_slot_one_place().layer(panics_on_one(go.clone()));
    let admission = svc.admission();
    let first = tokio::spawn(svc.clone().oneshot(req(0)));
    settle().await;
    assert_eq!(admission.in_flight(), 1);
    // Request 1 waits for the slot; its inner `call` runs (and panics) when
    // it is granted, inside `poll`.
    let ready = svc.ready().await.unwrap();
    let mut queued = pin!(ready.call(req(1)));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(queued.as_mut().poll(&mut cx).is_pending());
    assert_eq!(admission.queue_depth(), 1);
    go.notify_waiters();
    let out = tokio::time::timeout(Duration::from_secs(1), first).await;
    assert_eq!(out.unwrap().unwrap().unwrap(), 0);
    let polled = catch_unwind(AssertUnwindSafe(|| queued.as_mut().poll(&mut cx)));
    assert!(polled.is_err(), "the inner call panicked when granted");
    assert_eq!((admission.in_flight(), admission.queue_depth()), (0, 0));
    let next = tokio::spawn(svc.clone().oneshot(req(2)));
    settle().await;
    assert_eq!(admission.in_flight(), 1, "admitted at once");
    go.notify_waiters();
    let out = tokio::time::timeout(Duration::from_secs(1), next).await;
    assert_eq!(out.unwrap().unwrap().unwrap(), 2);
}
