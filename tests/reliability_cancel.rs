//! Reliability: every layer's response future (and the response body) dropped
//! at every await point leaves nothing behind.
//!
//! Each test builds a fresh stack per cut point on tokio's paused clock,
//! drives the request step by step (poll, advance the clock, open a gate the
//! handler waits on, poll a body frame), drops whatever it holds after step
//! `k`, and checks: no reservation leaked (the limiter admits exactly as a
//! twin that only saw the admitted requests), no task leaked (the alive-task
//! count returns to its baseline and the handler's spawned work ends), the
//! request's context cancelled, the heartbeat's in-flight count back to zero.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use atscale::core::{BoxError, Carrier, Context, Kind};
use atscale::deadline::DeadlineLayer;
use atscale::error::ErrorEnrichLayer;
use atscale::heartbeat::Monitor;
use atscale::ratelimit::{
    Claims, Clock, Grant, Limit, Limiter, MemoryReceipt, MemoryStore, RateLimitBuilder,
    RateLimitLayer, Refusal, Store,
};
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::StreamBody;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};

// ---------------------------------------------------------------- helpers

/// A gate a handler waits on until the test opens it (one permit per open).
#[derive(Clone)]
struct Gate(Arc<Semaphore>);

impl Gate {
    fn new() -> Self {
        Gate(Arc::new(Semaphore::new(0)))
    }
    fn open(&self) {
        self.0.add_permits(1);
    }
    async fn wait(&self) {
        self.0.acquire().await.expect("never closed").forget();
    }
}

/// Set when the value holding it is dropped.
#[derive(Clone, Default)]
struct Dropped(Arc<AtomicBool>);

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Dropped {
    fn guard(&self) -> SetOnDrop {
        SetOnDrop(self.0.clone())
    }
    fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What the handler saw and left running.
#[derive(Clone, Default)]
struct Probe {
    /// The context the handler ran under (`Context::current()`).
    cx: Arc<Mutex<Option<Context>>>,
    /// Work the handler spawned with `spawn_preemptable`: must end when the
    /// request is given up.
    child: Arc<Mutex<Option<JoinHandle<Option<()>>>>>,
    /// How many times the handler was called.
    calls: Arc<AtomicUsize>,
    /// Set when the handler's future is dropped.
    dropped: Dropped,
}

impl Probe {
    fn cx(&self) -> Option<Context> {
        self.cx.lock().unwrap().clone()
    }

    /// Waits (on the paused clock: an hour passes at once if it must) for
    /// the handler's spawned work to end; it must have been stopped.
    async fn child_stopped(&self) {
        let child = self.child.lock().unwrap().take();
        if let Some(child) = child {
            let out = tokio::time::timeout(Duration::from_secs(3600), child)
                .await
                .expect("the handler's spawned work outlived the request")
                .expect("the spawned task did not panic");
            assert_eq!(out, None, "the spawned work was preempted, not finished");
        }
    }
}

type Frames = Pin<Box<dyn futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send>>;

/// A handler that records its context, spawns preemptable work that never
/// ends by itself, waits for `head`, then answers with a body whose first
/// frame comes at once and whose second waits for `tail`.
fn handler(
    probe: Probe,
    head: Gate,
    tail: Gate,
) -> impl Service<
    Request<()>,
    Response = Response<StreamBody<Frames>>,
    Error = BoxError,
    Future: Send + 'static,
> + Clone {
    service_fn(move |_req: Request<()>| {
        let probe = probe.clone();
        let head = head.clone();
        let tail = tail.clone();
        async move {
            let _dropped = probe.dropped.guard();
            probe.calls.fetch_add(1, Ordering::SeqCst);
            // Without a context (a bare heartbeat), spawned work could not
            // be stopped, so there is none.
            if let Some(cx) = Context::current() {
                *probe.cx.lock().unwrap() = Some(cx);
                let child = atscale::core::spawn_preemptable(std::future::pending::<()>());
                *probe.child.lock().unwrap() = Some(child);
            }
            head.wait().await;
            let frames: Frames = Box::pin(futures_util::stream::unfold(0u8, move |n| {
                let tail = tail.clone();
                async move {
                    match n {
                        0 => Some((Ok(Frame::data(Bytes::from_static(b"one"))), 1)),
                        1 => {
                            tail.wait().await;
                            Some((Ok(Frame::data(Bytes::from_static(b"two"))), 2))
                        }
                        _ => None,
                    }
                }
            }));
            Ok::<_, BoxError>(Response::new(StreamBody::new(frames)))
        }
    })
}

/// Polls `f` once.
async fn poll_once<F: Future + ?Sized>(f: Pin<&mut F>) -> Poll<F::Output> {
    let mut f = Some(f);
    std::future::poll_fn(|cx| Poll::Ready(f.take().expect("once").poll(cx))).await
}

/// Polls `body` for one frame, once.
async fn poll_frame<B: Body + ?Sized>(
    body: Pin<&mut B>,
) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
    let mut body = Some(body);
    std::future::poll_fn(|cx| Poll::Ready(body.take().expect("once").poll_frame(cx))).await
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Lets every woken task run (on the current-thread runtime, a few yields
/// run all that is ready).
async fn settle() {
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
}

/// The limiter admits exactly as `twin` does: 40 probes, 23 ms apart, each
/// tried on both. Consumes both.
async fn same_admissions(real: &Limiter, twin: &Limiter) {
    let mut log = Vec::new();
    for i in 0..40 {
        let a = real.try_acquire(1).is_ok();
        let b = twin.try_acquire(1).is_ok();
        log.push((a, b));
        assert_eq!(a, b, "probe {i}: limiter {a}, fresh twin {b} ({log:?})");
        tokio::time::advance(Duration::from_millis(23)).await;
    }
    assert!(log.iter().any(|&(a, _)| a) && log.iter().any(|&(a, _)| !a));
}

// ------------------------------------------------------- the whole stack

/// One step of a request's life.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Step {
    /// Poll the response future once.
    Call,
    /// Move the paused clock.
    Advance(u64),
    /// Open the handler's head gate.
    OpenHead,
    /// Open the body's tail gate.
    OpenTail,
    /// Poll the response body once.
    Frame,
}

#[tokio::test(start_paused = true)]
async fn whole_server_stack_dropped_at_every_step() -> Result<(), BoxError> {
    use Step::*;
    // The rate limit's one token is spent first, so the request waits 100 ms
    // in the limiter, then waits in the handler, then streams two frames.
    let script = [
        Call,
        Advance(40),
        Call,
        Advance(60),
        Call,
        OpenHead,
        Call,
        Frame,
        Frame,
        OpenTail,
        Frame,
        Frame,
    ];
    let baseline = alive_tasks();
    for watched in [true, false] {
        for cut in 0..=script.len() {
            let clock = Clock::tokio();
            let limit = Limit::per_second(10)?.burst(1)?;
            let limiter = Limiter::with_clock(limit, clock.clone());
            let twin = Limiter::with_clock(limit, clock.clone());
            limiter.try_acquire(1)?;
            twin.try_acquire(1)?;
            let monitor = if watched {
                Monitor::builder().stall(Duration::from_secs(30)).build()
            } else {
                Monitor::new()
            };
            let (probe, head, tail) = (Probe::default(), Gate::new(), Gate::new());
            // Spy on the context the deadline layer hands inward.
            let outer_cx: Arc<Mutex<Option<Context>>> = Arc::default();
            let spy = outer_cx.clone();
            let mut svc = ServiceBuilder::new()
                .layer(ErrorEnrichLayer::new("reliability"))
                .layer(DeadlineLayer::server(Duration::from_secs(10)))
                .map_request(move |req: Request<()>| {
                    *spy.lock().unwrap() = req.context().cloned();
                    req
                })
                .layer(monitor.layer())
                .layer(RateLimitLayer::builder().limiter(limiter.clone()).build()?)
                .service(handler(probe.clone(), head.clone(), tail.clone()));

            let mut fut = Box::pin(svc.ready().await?.call(Request::new(())));
            let mut res = None;
            let mut ended = false;
            let mut admitted_at = None;
            for (i, &step) in script.iter().enumerate().take(cut) {
                match step {
                    Call => {
                        if let Poll::Ready(r) = poll_once(fut.as_mut()).await {
                            let r: Response<_> = r.expect("infallible");
                            assert!(r.status().is_success(), "step {i}: {}", r.status());
                            res = Some(r.map(Box::pin));
                        }
                    }
                    Advance(ms) => tokio::time::advance(Duration::from_millis(ms)).await,
                    OpenHead => head.open(),
                    OpenTail => tail.open(),
                    Frame => {
                        let body = res.as_mut().expect("the head came").body_mut();
                        if let Poll::Ready(None) = poll_frame(body.as_mut()).await {
                            ended = true;
                        }
                    }
                }
                if admitted_at.is_none() && probe.calls.load(Ordering::SeqCst) == 1 {
                    admitted_at = Some(i);
                }
            }
            let complete = cut == script.len();
            assert_eq!(complete, ended, "cut {cut}: the script ends with the body");
            drop(fut);
            drop(res);
            settle().await;

            let at = format!("watched {watched}, dropped after {cut} steps");
            // Heartbeat: nothing in flight, the request ended as cancelled.
            assert_eq!(monitor.in_flight(), 0, "{at}");
            let counts = monitor.counts();
            assert_eq!(counts.started(), 1, "{at}");
            assert_eq!(counts.finished(), 1, "{at}");
            assert_eq!(
                (counts.cancelled(), counts.ok()),
                if complete { (0, 1) } else { (1, 0) },
                "{at}"
            );
            // Context: the deadline layer's context is cancelled unless the
            // head was answered (a streaming body may still run under it).
            let outer = outer_cx.lock().unwrap().clone().expect("set in call");
            let answered = cut > script.iter().position(|&s| s == OpenHead).unwrap() + 1;
            assert_eq!(outer.is_cancelled(), !answered, "{at}");
            // The handler ran under a context cancelled when the request was
            // given up (the watched heartbeat's child, or the deadline's).
            if let Some(cx) = probe.cx() {
                let given_up = !complete && (watched || !answered);
                assert_eq!(cx.is_cancelled(), given_up, "{at}");
                if given_up {
                    probe.child_stopped().await;
                } else {
                    cx.cancel(); // the test's own cleanup of the endless work
                    probe.child_stopped().await;
                }
                assert!(
                    probe.dropped.get(),
                    "{at}: the handler's future was dropped"
                );
            }
            // The limiter: refunded unless admitted.
            if admitted_at.is_some() {
                twin.try_acquire(1)?;
            }
            assert_eq!(
                admitted_at.is_some(),
                cut > 4,
                "{at}: admitted after 100 ms"
            );
            same_admissions(&limiter, &twin).await;
            settle().await;
            assert_eq!(alive_tasks(), baseline, "{at}: a task leaked");
        }
    }
    Ok(())
}

// ------------------------------------------------------- layer by layer

#[tokio::test(start_paused = true)]
async fn deadline_future_dropped_before_and_after_its_timer_is_armed() -> Result<(), BoxError> {
    let baseline = alive_tasks();
    // 0: dropped unpolled; 1: after one poll (timer armed); 2: after time passed.
    for cut in 0..3 {
        let (probe, head) = (Probe::default(), Gate::new());
        let inner = handler(probe.clone(), head.clone(), Gate::new());
        let mut svc = DeadlineLayer::server(Duration::from_secs(1)).layer(inner);
        let mut fut = Box::pin(svc.ready().await?.call(Request::new(())));
        if cut >= 1 {
            assert!(poll_once(fut.as_mut()).await.is_pending());
        }
        if cut >= 2 {
            tokio::time::advance(Duration::from_millis(999)).await;
            assert!(poll_once(fut.as_mut()).await.is_pending());
        }
        drop(fut);
        settle().await;
        if cut >= 1 {
            let cx = probe.cx().expect("the handler ran");
            assert!(cx.is_cancelled(), "cut {cut}");
            probe.child_stopped().await;
            assert!(probe.dropped.get());
        }
        assert_eq!(alive_tasks(), baseline, "cut {cut}");
    }
    // Expiry drops the inner future and cancels its context too.
    let (probe, head) = (Probe::default(), Gate::new());
    let svc = DeadlineLayer::server(Duration::from_secs(1)).layer(handler(
        probe.clone(),
        head,
        Gate::new(),
    ));
    let Err(err) = svc.oneshot(Request::new(())).await else {
        panic!("the handler never answers")
    };
    assert_eq!(Kind::of(&*err), Kind::DeadlineExceeded);
    assert!(probe.cx().unwrap().is_cancelled());
    assert!(probe.dropped.get());
    probe.child_stopped().await;
    assert_eq!(alive_tasks(), baseline);
    Ok(())
}

/// Requests through a two-limit rate limit: each dropped while waiting,
/// with someone waiting behind it or not, or after admission.
#[tokio::test(start_paused = true)]
async fn rate_limit_future_dropped_waiting_or_admitted() -> Result<(), BoxError> {
    let clock = Clock::tokio();
    let limits = [
        Limit::per_second(10)?.burst(2)?,
        Limit::per_minute(60)?.burst(4)?,
    ];
    for cut in 0..4 {
        let real: Vec<Limiter> = limits
            .iter()
            .map(|&l| Limiter::with_clock(l, clock.clone()))
            .collect();
        let twin: Vec<Limiter> = limits
            .iter()
            .map(|&l| Limiter::with_clock(l, clock.clone()))
            .collect();
        let (probe, head) = (Probe::default(), Gate::new());
        let layer = RateLimitLayer::builder()
            .limiter(real[0].clone())
            .limiter(real[1].clone())
            .max_waiters(2)
            .build()?;
        let mut svc = layer.layer(handler(probe.clone(), head.clone(), Gate::new()));
        let twin_layer = RateLimitLayer::builder()
            .limiter(twin[0].clone())
            .limiter(twin[1].clone())
            .build()?;
        let mut twin_svc = twin_layer.layer(service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(())
        }));
        // Two admitted at once on both.
        // (the handler's futures are dropped unpolled: admitted is spent)
        for _ in 0..2 {
            drop(svc.ready().await?.call(Request::new(())));
            twin_svc.ready().await?.call(Request::new(())).await?;
        }
        // The request under test waits 100 ms (the per-second bucket).
        let mut fut = Box::pin(svc.ready().await?.call(Request::new(())));
        assert!(poll_once(fut.as_mut()).await.is_pending());
        let calls = probe.calls.load(Ordering::SeqCst);
        // cut 1: someone waits behind it when it leaves.
        let mut behind = None;
        if cut == 1 {
            let mut b = Box::pin(svc.ready().await?.call(Request::new(())));
            assert!(poll_once(b.as_mut()).await.is_pending());
            behind = Some(b);
        }
        if cut == 2 {
            tokio::time::advance(Duration::from_millis(50)).await;
            assert!(poll_once(fut.as_mut()).await.is_pending());
        }
        let admitted = cut == 3;
        if admitted {
            tokio::time::advance(Duration::from_millis(100)).await;
            assert!(
                poll_once(fut.as_mut()).await.is_pending(),
                "waits in the handler"
            );
            assert_eq!(probe.calls.load(Ordering::SeqCst), calls + 1);
            twin_svc.ready().await?.call(Request::new(())).await?;
        }
        drop(fut);
        settle().await;
        if let Some(b) = behind {
            // Its admission time was computed behind the one that left: it
            // keeps it, and so does the twin's equivalent.
            let mut tb = Box::pin(twin_svc.ready().await?.call(Request::new(())));
            // both wait the same; drop both together: everything is given back
            drop(b);
            assert!(poll_once(tb.as_mut()).await.is_pending());
            drop(tb);
        }
        // The queue has its places back: two can wait again.
        let mut w1 = Box::pin(svc.ready().await?.call(Request::new(())));
        let mut w2 = Box::pin(svc.ready().await?.call(Request::new(())));
        assert!(poll_once(w1.as_mut()).await.is_pending(), "cut {cut}");
        assert!(poll_once(w2.as_mut()).await.is_pending(), "cut {cut}");
        drop((w1, w2));
        same_admissions(&real[0], &twin[0]).await;
        same_admissions(&real[1], &twin[1]).await;
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn heartbeat_future_and_body_dropped() -> Result<(), BoxError> {
    for watched in [false, true] {
        // 0: unpolled; 1: pending in the handler; 2: body mid-stream
        for cut in 0..3 {
            let monitor = if watched {
                Monitor::builder().stall(Duration::from_secs(5)).build()
            } else {
                Monitor::new()
            };
            let (probe, head, tail) = (Probe::default(), Gate::new(), Gate::new());
            let mut svc = monitor
                .layer()
                .layer(handler(probe.clone(), head.clone(), tail));
            let mut fut = Box::pin(svc.ready().await?.call(Request::new(())));
            assert_eq!(monitor.in_flight(), 1);
            let mut res = None;
            if cut >= 1 {
                assert!(poll_once(fut.as_mut()).await.is_pending());
            }
            if cut >= 2 {
                head.open();
                let Poll::Ready(r) = poll_once(fut.as_mut()).await else {
                    panic!("answered")
                };
                let mut r = r?.map(Box::pin);
                let frame = poll_frame(r.body_mut().as_mut()).await;
                assert!(matches!(frame, Poll::Ready(Some(Ok(_)))));
                assert!(poll_frame(r.body_mut().as_mut()).await.is_pending());
                assert_eq!(monitor.in_flight(), 1, "the body is still in flight");
                res = Some(r);
            }
            drop(fut);
            drop(res);
            assert_eq!(monitor.in_flight(), 0, "watched {watched} cut {cut}");
            assert_eq!(monitor.counts().cancelled(), 1);
            monitor.wait_in_flight(0).await;
            if watched && cut >= 1 {
                assert!(probe.cx().unwrap().is_cancelled());
                probe.child_stopped().await;
            } else {
                // Without the watchdog the heartbeat adds no context.
                assert!(probe.cx().is_none());
            }
        }
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn error_enrich_future_dropped_drops_the_inner_future() -> Result<(), BoxError> {
    let dropped = Dropped::default();
    let flag = dropped.clone();
    let gate = Gate::new();
    let g = gate.clone();
    let mut svc = ErrorEnrichLayer::new("reliability").layer(service_fn(move |_: Request<()>| {
        let guard = flag.guard();
        let g = g.clone();
        async move {
            let _guard = guard;
            g.wait().await;
            Ok::<_, BoxError>(Response::new(http_body_util::Empty::<Bytes>::new()))
        }
    }));
    let mut fut = Box::pin(svc.ready().await?.call(Request::new(())));
    assert!(poll_once(fut.as_mut()).await.is_pending());
    assert!(!dropped.get());
    drop(fut);
    assert!(dropped.get());
    Ok(())
}

/// A store that answers after a round trip (like a remote one): it reserves
/// in memory at once, then waits for `gate` before answering. Its future,
/// dropped mid-round-trip, gives the reservation back itself, as the
/// `Store` contract asks.
#[derive(Clone)]
struct RoundTripStore {
    gate: Gate,
    dropped: Dropped,
}

/// A reservation made but not yet answered.
struct InTransit(Option<Result<Grant<MemoryReceipt>, Refusal>>);

impl Drop for InTransit {
    fn drop(&mut self) {
        if let Some(Ok(grant)) = self.0.take()
            && let Some(receipt) = grant.into_receipt()
        {
            MemoryStore.refund(receipt);
        }
    }
}

type Answer = Result<Grant<MemoryReceipt>, Refusal>;

impl Store for RoundTripStore {
    type Bucket = Limiter;
    type Receipt = MemoryReceipt;
    type Acquire = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn acquire(&self, claims: &Claims<'_, Limiter>, max_wait: Duration) -> Self::Acquire {
        let mut answer = InTransit(Some(MemoryStore.acquire(claims, max_wait).into_inner()));
        let gate = self.gate.clone();
        let dropped = self.dropped.guard();
        Box::pin(async move {
            let _dropped = dropped;
            gate.wait().await;
            answer.0.take().expect("answered once")
        })
    }

    fn refund(&self, receipt: MemoryReceipt) {
        MemoryStore.refund(receipt);
    }
}

/// The rate limit over an asynchronous store: dropped while the store's
/// round trip is in flight, while waiting after it, and after admission.
#[tokio::test(start_paused = true)]
async fn rate_limit_over_an_async_store_dropped_at_every_await_point() -> Result<(), BoxError> {
    let clock = Clock::tokio();
    let limit = Limit::per_second(10)?.burst(1)?;
    for cut in 0..4 {
        let (real, twin) = (
            Limiter::with_clock(limit, clock.clone()),
            Limiter::with_clock(limit, clock.clone()),
        );
        real.try_acquire(1)?;
        twin.try_acquire(1)?;
        let store = RoundTripStore {
            gate: Gate::new(),
            dropped: Dropped::default(),
        };
        let (probe, head) = (Probe::default(), Gate::new());
        let layer = RateLimitBuilder::with_store(store.clone())
            .limiter(real.clone())
            .max_waiters(1)
            .build()?;
        let mut svc = layer.layer(handler(probe.clone(), head.clone(), Gate::new()));
        // 0: called, never polled
        let mut fut = Box::pin(svc.ready().await?.call(Request::new(())));
        if cut >= 1 {
            // 1: the store's round trip is in flight (reserved, not answered)
            assert!(poll_once(fut.as_mut()).await.is_pending());
            assert!(!store.dropped.get());
        }
        if cut >= 2 {
            // 2: answered "in 100 ms": waiting
            store.gate.open();
            assert!(poll_once(fut.as_mut()).await.is_pending());
            assert!(store.dropped.get(), "the round trip's future is done with");
        }
        if cut >= 3 {
            // 3: admitted, in the handler
            tokio::time::advance(Duration::from_millis(100)).await;
            assert!(poll_once(fut.as_mut()).await.is_pending());
            assert_eq!(probe.calls.load(Ordering::SeqCst), 1);
            twin.try_acquire(1)?;
        }
        drop(fut);
        assert!(
            store.dropped.get(),
            "cut {cut}: the store's future was dropped"
        );
        assert_eq!(probe.calls.load(Ordering::SeqCst), usize::from(cut >= 3));
        // The waiting place is free again (max_waiters 1), and the limiter
        // is as if only the admitted had come.
        let mut again = Box::pin(svc.ready().await?.call(Request::new(())));
        store.gate.open();
        assert!(poll_once(again.as_mut()).await.is_pending(), "cut {cut}");
        drop(again);
        same_admissions(&real, &twin).await;
    }
    Ok(())
}

/// The recommended client stack (ErrorEnrich → Deadline → RateLimit → Hedge
/// → Heartbeat → transport), dropped at every step: while the rate limit
/// holds it, with the first attempt in flight, with the hedge in flight
/// too; and run to the end (one attempt wins, the other is cancelled).
#[tokio::test(start_paused = true)]
async fn client_stack_with_a_hedge_dropped_at_every_step() -> Result<(), BoxError> {
    use atscale::hedge::HedgeLayer;
    use http_body_util::Empty;

    let baseline = alive_tasks();
    let steps = 4;
    for cut in 0..=steps {
        let clock = Clock::tokio();
        let limit = Limit::per_second(10)?.burst(1)?;
        let (limiter, twin) = (
            Limiter::with_clock(limit, clock.clone()),
            Limiter::with_clock(limit, clock.clone()),
        );
        limiter.try_acquire(1)?;
        twin.try_acquire(1)?;
        let monitor = Monitor::builder().stall(Duration::from_secs(30)).build();
        // What each attempt ran under, and whether its future was dropped.
        let attempts: Arc<Mutex<Vec<(Context, Dropped)>>> = Arc::default();
        let gate = Gate::new();
        let (seen, g) = (attempts.clone(), gate.clone());
        let transport = service_fn(move |_req: Request<Empty<Bytes>>| {
            let dropped = Dropped::default();
            let cx = Context::current().expect("every attempt has a context");
            seen.lock().unwrap().push((cx, dropped.clone()));
            let g = g.clone();
            async move {
                let _dropped = dropped.guard();
                g.wait().await;
                Ok::<_, BoxError>(Response::new(Empty::<Bytes>::new()))
            }
        });
        let outer_cx: Arc<Mutex<Option<Context>>> = Arc::default();
        let spy = outer_cx.clone();
        let mut client = ServiceBuilder::new()
            .layer(ErrorEnrichLayer::client("downstream"))
            .layer(DeadlineLayer::client(Duration::from_secs(10)))
            .map_request(move |req: Request<Empty<Bytes>>| {
                *spy.lock().unwrap() = req.context().cloned();
                req
            })
            .layer(RateLimitLayer::builder().limiter(limiter.clone()).build()?)
            .layer(HedgeLayer::fixed(Duration::from_millis(50)))
            .layer(monitor.layer())
            .service(transport);

        let mut fut = Box::pin(
            client
                .ready()
                .await?
                .call(Request::get("http://replica/").body(Empty::new())?),
        );
        let mut answered = false;
        for step in 1..=cut {
            match step {
                1 => assert!(poll_once(fut.as_mut()).await.is_pending()),
                2 => {
                    tokio::time::advance(Duration::from_millis(100)).await;
                    assert!(poll_once(fut.as_mut()).await.is_pending());
                    assert_eq!(attempts.lock().unwrap().len(), 1, "admitted: one attempt");
                    twin.try_acquire(1)?; // admitted now: spent, hedge or not
                }
                3 => {
                    tokio::time::advance(Duration::from_millis(50)).await;
                    assert!(poll_once(fut.as_mut()).await.is_pending());
                    assert_eq!(attempts.lock().unwrap().len(), 2, "the hedge went out");
                    assert_eq!(monitor.in_flight(), 2);
                }
                _ => {
                    gate.open();
                    let Poll::Ready(res) = poll_once(fut.as_mut()).await else {
                        panic!("one attempt answered")
                    };
                    assert!(res.is_ok());
                    answered = true;
                }
            }
        }
        drop(fut);
        settle().await;

        let at = format!("dropped after {cut} steps");
        let attempts = attempts.lock().unwrap().clone();
        assert_eq!(attempts.len(), [0, 0, 1, 2, 2][cut], "{at}");
        for (cx, dropped) in &attempts {
            assert!(
                dropped.get(),
                "{at}: an attempt's future outlived the request"
            );
            if !answered {
                assert!(cx.is_cancelled(), "{at}: an attempt's context is live");
            }
        }
        if answered {
            // The winner's context is left alone; the loser's is cancelled.
            let cancelled = attempts.iter().filter(|(cx, _)| cx.is_cancelled()).count();
            assert_eq!(cancelled, 1, "{at}");
        }
        let outer = outer_cx.lock().unwrap().clone().expect("set in call");
        assert_eq!(outer.is_cancelled(), !answered, "{at}");
        assert_eq!(monitor.in_flight(), 0, "{at}");
        let counts = monitor.counts();
        assert_eq!(counts.started(), attempts.len() as u64, "{at}");
        assert_eq!(counts.ok(), u64::from(answered), "{at}");
        same_admissions(&limiter, &twin).await;
        settle().await;
        assert_eq!(alive_tasks(), baseline, "{at}: a task leaked");
    }
    Ok(())
}
