//! The layer: modes, deadlines, the wait queue, cancellation, sharing, errors.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use atscale_core::{
    BoxError, Cancelled, Carrier, Context, Kind, Origin, Overloaded, RateLimited, find,
};
use atscale_ratelimit::{
    Claims, Clock, Grant, InsufficientCapacity, KeyedLimiter, Limit, Limiter, MemoryStore,
    MissingKey, PeerIp, RateLimit, RateLimitBuilder, RateLimitLayer, Reason, Refusal, Store,
    future::ResponseFuture,
};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

type Req = http::Request<()>;

fn req() -> Req {
    http::Request::new(())
}

fn req_within(budget: Duration) -> Req {
    let mut r = req();
    r.set_context(Context::new().with_budget(budget, Origin::Header));
    r
}

/// A service answering with the time it was called, and counting calls.
fn clock_service(
    calls: Arc<AtomicUsize>,
) -> impl Service<Req, Response = Duration, Error = BoxError, Future: Send> + Clone + Send {
    let start = Instant::now();
    service_fn(move |_: Req| {
        calls.fetch_add(1, Ordering::SeqCst);
        let called_at = start.elapsed();
        async move { Ok::<_, BoxError>(called_at) }
    })
}

fn limiter(clock: &Clock, limit: Result<Limit, atscale_ratelimit::InvalidLimit>) -> Limiter {
    Limiter::with_clock(limit.unwrap(), clock.clone())
}

#[test]
fn layer_service_and_future_are_send_sync_and_clone() {
    fn send_sync_clone<T: Send + Sync + Clone>() {}
    fn send_sync<T: Send + Sync>() {}
    type Svc = tower::util::ServiceFn<fn(Req) -> std::future::Ready<Result<(), BoxError>>>;
    send_sync_clone::<RateLimitLayer>();
    send_sync_clone::<RateLimit<Svc>>();
    send_sync_clone::<Limiter>();
    send_sync_clone::<KeyedLimiter<std::net::IpAddr>>();
    send_sync_clone::<atscale_ratelimit::MultiLimiter>();
    send_sync::<ResponseFuture<Svc, Req, MemoryStore>>();
}

#[tokio::test(start_paused = true)]
async fn reject_mode_fails_at_once_with_retry_after() -> Result<(), BoxError> {
    let clock = Clock::tokio();
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = RateLimitLayer::reject(limiter(
        &clock,
        Limit::per_second(2).and_then(|l| l.burst(1)),
    ));
    let mut svc = layer.layer(clock_service(calls.clone()));

    assert_eq!(svc.ready().await?.call(req()).await?, Duration::ZERO);
    let err = svc.ready().await?.call(req()).await.unwrap_err();
    assert_eq!(Kind::of(&*err), Kind::RateLimited);
    assert_eq!(
        err.downcast_ref::<RateLimited>().unwrap().retry_after(),
        Duration::from_millis(500)
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the inner service never saw the refused request"
    );

    tokio::time::advance(Duration::from_millis(500)).await;
    assert!(svc.ready().await?.call(req()).await.is_ok());
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn clones_share_the_limit() -> Result<(), BoxError> {
    let clock = Clock::tokio();
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = RateLimitLayer::reject(limiter(&clock, Limit::per_minute(3)));
    let svc = layer.layer(clock_service(calls.clone()));
    let other_from_layer = layer.layer(clock_service(calls.clone()));
    let mut admitted = 0;
    for i in 0..12 {
        let mut s = if i % 2 == 0 {
            svc.clone()
        } else {
            other_from_layer.clone()
        };
        if s.ready().await?.call(req()).await.is_ok() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 3);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn waits_fail_at_once_when_admission_lies_beyond_the_deadline() -> Result<(), BoxError> {
    let clock = Clock::tokio();
    let calls = Arc::new(AtomicUsize::new(0));
    let l = limiter(&clock, Limit::per_second(1));
    let mut svc = RateLimitLayer::new(l.clone()).layer(clock_service(calls.clone()));

    svc.ready().await?.call(req()).await?; // spends the burst
    let start = Instant::now();
    let err = svc
        .ready()
        .await?
        .call(req_within(Duration::from_millis(400)))
        .await
        .unwrap_err();
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "failed at once, did not wait"
    );
    assert_eq!(
        find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_secs(1)
    );
    // Admission exactly at the deadline is too late too (the deadline has passed then).
    assert!(
        svc.ready()
            .await?
            .call(req_within(Duration::from_secs(1)))
            .await
            .is_err()
    );
    // Nothing was reserved by the refused requests: a request with time to
    // spare is admitted at 1 s, not later.
    let at = svc
        .ready()
        .await?
        .call(req_within(Duration::from_millis(1001)))
        .await?;
    assert_eq!(at, Duration::from_secs(1));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn the_deadline_is_also_read_from_the_task_local_context() -> Result<(), BoxError> {
    let clock = Clock::tokio();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = RateLimitLayer::new(limiter(&clock, Limit::per_second(1)))
        .layer(clock_service(calls.clone()));
    svc.ready().await?.call(req()).await?;
    let cx = Context::new().with_budget(Duration::from_millis(10), Origin::Local);
    let err = cx
        .scope(async { svc.ready().await?.call(req()).await })
        .await
        .unwrap_err();
    assert_eq!(Kind::of(&*err), Kind::RateLimited);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_is_overloaded() -> Result<(), BoxError> {
    let clock = Clock::tokio();
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = RateLimitLayer::builder()
        .limiter(limiter(&clock, Limit::per_second(1)))
        .max_waiters(2)
        .build()?;
    let mut svc = layer.layer(clock_service(calls.clone()));
    svc.ready().await?.call(req()).await?; // admitted at 0 s
    let w1 = svc.ready().await?.call(req()); // waits for 1 s
    let w2 = svc.ready().await?.call(req()); // waits for 2 s
    let err = svc.ready().await?.call(req()).await.unwrap_err();
    assert!(err.is::<Overloaded>(), "{err}");
    assert_eq!(Kind::of(&*err), Kind::Overloaded);
    assert_eq!(
        (w1.await?, w2.await?),
        (Duration::from_secs(1), Duration::from_secs(2))
    );
    // The refused request reserved nothing, and the queue is free again.
    let w3 = svc.ready().await?.call(req());
    assert_eq!(w3.await?, Duration::from_secs(3));
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_wait_beyond_max_wait_is_rate_limited() -> Result<(), BoxError> {
    let clock = Clock::tokio();
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = RateLimitLayer::builder()
        .limiter(limiter(&clock, Limit::per_second(1)))
        .max_wait(Duration::from_secs(2))
        .build()?;
    let mut svc = layer.layer(clock_service(calls.clone()));
    let waiting: Vec<_> = (0..3).map(|_| svc.call(req())).collect(); // at 0, 1, 2 s
    let err = svc.call(req()).await.unwrap_err();
    assert_eq!(
        find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_secs(3)
    );
    let mut at = Vec::new();
    for w in waiting {
        at.push(w.await?.as_secs());
    }
    assert_eq!(at, [0, 1, 2]);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn dropped_waiters_give_their_slots_back() -> Result<(), BoxError> {
    let clock = Clock::tokio();
    let calls = Arc::new(AtomicUsize::new(0));
    let per_second = limiter(&clock, Limit::per_second(1));
    let per_minute = limiter(&clock, Limit::per_minute(30));
    let layer = RateLimitLayer::builder()
        .limiter(per_second.clone())
        .limiter(per_minute.clone())
        .build()?;
    let mut svc = layer.layer(clock_service(calls.clone()));
    let first = svc.call(req()); // 0 s
    let kept = svc.call(req()); // 1 s
    // Five waiters at 2..6 s, dropped in arrival order: none is the tail
    // when dropped but the last, which then gives back all five.
    let gone: Vec<_> = (0..5).map(|_| svc.call(req())).collect();
    tokio::time::advance(Duration::from_millis(300)).await;
    drop(gone);
    assert_eq!(first.await?, Duration::ZERO);
    assert_eq!(kept.await?, Duration::from_secs(1));
    assert_eq!(svc.call(req()).await?, Duration::from_secs(2));
    // and the per-minute limit was given back as well: of 30, three were
    // taken and one has refilled in the 2 s since (one per 2 s): 28 remain
    for _ in 0..28 {
        per_minute.try_acquire(1)?;
    }
    assert!(per_minute.try_acquire(1).is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn cancelling_the_context_ends_the_wait_and_gives_the_slot_back() -> Result<(), BoxError> {
    let clock = Clock::tokio();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = RateLimitLayer::new(limiter(&clock, Limit::per_second(1)))
        .layer(clock_service(calls.clone()));
    svc.call(req()).await?;
    let cx = Context::new();
    let mut r = req();
    r.set_context(cx.clone());
    let start = Instant::now();
    let waiting = tokio::spawn(svc.call(r));
    tokio::time::advance(Duration::from_millis(100)).await;
    cx.cancel();
    let err = waiting.await?.unwrap_err();
    assert!(err.is::<Cancelled>(), "{err}");
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(100),
        "the wait ended when the context was cancelled, not at the slot (1 s)"
    );
    assert_eq!(
        svc.call(req()).await?,
        Duration::from_secs(1),
        "the slot at 1 s was given back"
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_limiter_shared_by_two_services_the_api_client() -> Result<(), BoxError> {
    let clock = Clock::tokio();
    let calls = Arc::new(AtomicUsize::new(0));
    let api = limiter(&clock, Limit::per_second(2));
    let disk = limiter(&clock, Limit::per_second(1));
    let network = limiter(&clock, Limit::per_second(3));
    let mut read_file = RateLimitLayer::builder()
        .limiter(api.clone())
        .limiter(disk)
        .reject()
        .build()?
        .layer(clock_service(calls.clone()));
    let mut resolve = RateLimitLayer::builder()
        .limiter(api)
        .limiter(network)
        .reject()
        .build()?
        .layer(clock_service(calls.clone()));
    assert!(read_file.call(req()).await.is_ok());
    assert!(read_file.call(req()).await.is_err(), "disk: 1/s");
    assert!(resolve.call(req()).await.is_ok());
    let err = resolve.call(req()).await.unwrap_err();
    assert_eq!(
        find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_millis(500)
    );
    // the refused resolve took nothing from the network limit (3/s, 2 left)
    tokio::time::advance(Duration::from_millis(500)).await;
    assert!(resolve.call(req()).await.is_ok());
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn costs_are_charged_and_checked() -> Result<(), BoxError> {
    let clock = Clock::tokio();
    let calls = Arc::new(AtomicUsize::new(0));
    let bytes = limiter(&clock, Limit::new(1000, Duration::from_secs(1)));
    let err = RateLimitLayer::builder()
        .limiter(bytes.clone())
        .cost(1001)
        .build()
        .unwrap_err();
    assert_eq!(
        err.reason(),
        Reason::CostExceedsBurst {
            cost: 1001,
            burst: 1000
        }
    );

    let mut svc = RateLimitLayer::builder()
        .limiter(bytes.clone())
        .cost_fn(|r: &Req| {
            r.headers()
                .get("len")
                .map_or(0, |v| v.to_str().unwrap().parse().unwrap())
        })
        .reject()
        .build()?
        .layer(clock_service(calls.clone()));
    let sized = |n: u32| http::Request::builder().header("len", n).body(()).unwrap();
    svc.call(sized(600)).await?;
    let err = svc.call(sized(600)).await.unwrap_err();
    assert_eq!(
        find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_millis(200)
    );
    let err = svc.call(sized(1001)).await.unwrap_err();
    let too_big = find::<InsufficientCapacity>(&*err).unwrap();
    assert_eq!((too_big.cost(), too_big.burst()), (1001, 1000));
    assert_eq!(Kind::of(&*err), Kind::Internal);
    svc.call(sized(400)).await?;

    // The same checks without a layer.
    let bytes = limiter(&clock, Limit::new(1000, Duration::from_secs(1)));
    let packets = limiter(&clock, Limit::per_second(10));
    let set = atscale_ratelimit::MultiLimiter::new([bytes, packets])?;
    let err = set.try_acquire(11).unwrap_err();
    assert_eq!(find::<InsufficientCapacity>(&*err).unwrap().burst(), 10);
    let err = set.acquire(11).await.unwrap_err();
    assert!(err.is::<InsufficientCapacity>(), "{err}");
    set.try_acquire(10)?;
    let err = set.try_acquire(1).unwrap_err();
    assert_eq!(
        find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_millis(100)
    );
    Ok(())
}

#[test]
fn nonsense_configurations_are_rejected() {
    let a = Limiter::new(Limit::per_second(1).unwrap());
    let other_clock = Limiter::with_clock(Limit::per_second(1).unwrap(), Clock::tokio());
    let reason = |b: RateLimitBuilder| b.build().unwrap_err().reason();
    assert_eq!(reason(RateLimitLayer::builder()), Reason::NoLimiters);
    assert_eq!(
        reason(
            RateLimitLayer::builder()
                .limiter(a.clone())
                .limiter(a.clone())
        ),
        Reason::DuplicateLimiter
    );
    assert_eq!(
        reason(
            RateLimitLayer::builder()
                .limiter(a.clone())
                .limiter(other_clock)
        ),
        Reason::MixedClocks
    );
    let mut many = RateLimitLayer::builder();
    for _ in 0..9 {
        many = many.limiter(Limiter::new(Limit::per_second(1).unwrap()));
    }
    assert_eq!(reason(many), Reason::TooManyLimiters);
    let keyed = KeyedLimiter::<u8>::builder(Limit::per_second(1).unwrap())
        .clock(Clock::tokio())
        .build()
        .unwrap();
    let err = RateLimitLayer::builder()
        .limiter(a)
        .keyed(atscale_ratelimit::key_fn(|_: &Req| Some(0u8)), keyed)
        .build()
        .unwrap_err();
    assert_eq!(err.reason(), Reason::MixedClocks);
}

#[tokio::test(start_paused = true)]
async fn keyed_by_peer_address_and_by_trusted_header() -> Result<(), BoxError> {
    let clock = Clock::tokio();
    let calls = Arc::new(AtomicUsize::new(0));
    let per_ip = KeyedLimiter::builder(Limit::per_minute(1)?)
        .clock(clock.clone())
        .build()?;
    let mut svc = RateLimitLayer::builder()
        .keyed(PeerIp::new(), per_ip.clone())
        .reject()
        .build()?
        .layer(clock_service(calls.clone()));
    let from = |addr: &str, forwarded: Option<&str>| {
        let mut r = req();
        r.extensions_mut()
            .insert(addr.parse::<SocketAddr>().unwrap());
        if let Some(f) = forwarded {
            r.headers_mut()
                .insert("x-forwarded-for", f.parse().unwrap());
        }
        r
    };
    svc.call(from("10.0.0.1:1000", None)).await?;
    // another port, same client: limited; a forged header changes nothing
    assert!(
        svc.call(from("10.0.0.1:2000", Some("1.2.3.4")))
            .await
            .is_err()
    );
    svc.call(from("10.0.0.2:1000", None)).await?;
    let err = svc.call(req()).await.unwrap_err();
    assert!(err.is::<MissingKey>(), "{err}");
    assert_eq!(per_ip.len(), 2);

    // Behind a trusted proxy: the rightmost forwarded address counts.
    let per_client = KeyedLimiter::builder(Limit::per_minute(1)?)
        .clock(clock.clone())
        .build()?;
    let mut behind_proxy = RateLimitLayer::builder()
        .keyed(
            PeerIp::trusting_header(http::HeaderName::from_static("x-forwarded-for")),
            per_client,
        )
        .reject()
        .build()?
        .layer(clock_service(calls.clone()));
    behind_proxy
        .call(from("10.9.9.9:1", Some("6.6.6.6, 1.1.1.1")))
        .await?;
    assert!(
        behind_proxy
            .call(from("10.9.9.9:2", Some("7.7.7.7, 1.1.1.1")))
            .await
            .is_err()
    );
    behind_proxy
        .call(from("10.9.9.9:3", Some("1.1.1.2")))
        .await?;
    behind_proxy.call(from("10.9.9.9:4", None)).await?; // falls back to the peer
    Ok(())
}

/// A store that answers asynchronously (like a remote one), backed by memory.
#[derive(Clone, Default)]
struct SlowStore {
    round_trips: Arc<AtomicUsize>,
}

type Answer = Result<Grant<<MemoryStore as Store>::Receipt>, Refusal>;

/// Answers on the second poll; if dropped before, gives back what it reserved.
struct YieldOnce(Option<Answer>, bool);

impl Future for YieldOnce {
    type Output = Answer;
    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Answer> {
        if !self.1 {
            self.1 = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(self.0.take().unwrap())
    }
}

impl Drop for YieldOnce {
    fn drop(&mut self) {
        if let Some(Ok(grant)) = self.0.take()
            && let Some(receipt) = grant.into_receipt()
        {
            MemoryStore.refund(receipt);
        }
    }
}

impl Store for SlowStore {
    type Bucket = Limiter;
    type Receipt = <MemoryStore as Store>::Receipt;
    type Acquire = YieldOnce;

    fn acquire(&self, claims: &Claims<'_, Limiter>, max_wait: Duration) -> Self::Acquire {
        self.round_trips.fetch_add(1, Ordering::SeqCst);
        let answer = MemoryStore.try_acquire_now(claims, max_wait).unwrap();
        YieldOnce(Some(answer), false)
    }

    fn refund(&self, receipt: Self::Receipt) {
        MemoryStore.refund(receipt);
    }
}

#[tokio::test(start_paused = true)]
async fn an_asynchronous_store_goes_through_the_same_steps() -> Result<(), BoxError> {
    let clock = Clock::tokio();
    let calls = Arc::new(AtomicUsize::new(0));
    let store = SlowStore::default();
    let mut svc = RateLimitBuilder::with_store(store.clone())
        .limiter(limiter(&clock, Limit::per_second(1)))
        .max_wait(Duration::from_secs(1))
        .build()?
        .layer(clock_service(calls.clone()));
    assert_eq!(svc.call(req()).await?, Duration::ZERO);
    let mut gone = Box::pin(svc.call(req()));
    // polled once: the store was asked, the answer is pending; then dropped
    std::future::poll_fn(|cx| {
        assert!(gone.as_mut().poll(cx).is_pending());
        Poll::Ready(())
    })
    .await;
    drop(gone);
    assert_eq!(
        svc.call(req()).await?,
        Duration::from_secs(1),
        "the dropped one gave its slot back"
    );
    let next = svc.call(req());
    let err = svc.call(req()).await.unwrap_err();
    assert_eq!(
        find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_secs(2)
    );
    assert_eq!(next.await?, Duration::from_secs(2));
    assert_eq!(store.round_trips.load(Ordering::SeqCst), 5);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn poll_ready_delegates_to_the_inner_service() {
    let (mock, mut handle) = tower_test::mock::pair::<Req, ()>();
    let layer = RateLimitLayer::new(Limiter::with_clock(
        Limit::per_second(1).unwrap(),
        Clock::tokio(),
    ));
    let mut svc = tower_test::mock::Spawn::new(layer.layer(mock));
    handle.allow(0);
    assert!(svc.poll_ready().is_pending());
    handle.allow(1);
    assert!(svc.poll_ready().is_ready());
    let fut = svc.call(req());
    let (_, respond) = handle.next_request().await.unwrap();
    respond.send_response(());
    fut.await.unwrap();
}
