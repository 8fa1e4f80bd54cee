//! The hedge layer on a paused clock: every policy path, cancellation of
//! losers, contexts, budgets, replicas, request replay.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use atscale_core::{BoxError, Carrier, Context, HedgeExhausted, Kind, Origin};
use atscale_hedge::{
    Budget, Clock, Delay, Hedge, HedgeLayer, HedgeStats, InvalidConfig, Replay, Verdict,
};
use tokio::time::{Instant, advance};
use tower::{Layer, Service, ServiceExt};

// ---------------------------------------------------------------- fixtures

/// A request the tests can hedge.
#[derive(Clone, Debug)]
struct Req {
    id: u64,
    idempotent: bool,
    replayable: bool,
    cx: Option<Context>,
}

impl Req {
    fn new(id: u64) -> Self {
        Req {
            id,
            idempotent: true,
            replayable: true,
            cx: None,
        }
    }

    fn with_context(mut self, cx: &Context) -> Self {
        self.cx = Some(cx.clone());
        self
    }
}

impl Carrier for Req {
    fn context(&self) -> Option<&Context> {
        self.cx.as_ref()
    }
    fn set_context(&mut self, cx: Context) {
        self.cx = Some(cx);
    }
}

impl Replay for Req {
    fn replay(&self) -> Option<Self> {
        self.replayable.then(|| self.clone())
    }
    fn is_idempotent(&self) -> bool {
        self.idempotent
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Failed(&'static str);

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.0)
    }
}
impl std::error::Error for Failed {}

/// What the backend does on its `n`-th call (counting from 0).
type Script = dyn Fn(usize, &Req) -> (Duration, Result<String, Failed>) + Send + Sync;

/// One call the backend saw.
#[derive(Clone, Debug)]
struct Seen {
    id: u64,
    replica: usize,
    cx: Option<Context>,
    at: Instant,
    /// Set when the call's future ended without answering (it was dropped).
    dropped: Arc<AtomicBool>,
}

#[derive(Clone)]
struct Backend {
    replica: usize,
    calls: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Script>,
}

impl Backend {
    fn new(
        script: impl Fn(usize, &Req) -> (Duration, Result<String, Failed>) + Send + Sync + 'static,
    ) -> Self {
        Backend {
            replica: 0,
            calls: Arc::default(),
            seen: Arc::default(),
            script: Arc::new(script),
        }
    }

    /// Another replica sharing the call counter and the log.
    fn replica(&self, replica: usize) -> Self {
        Backend {
            replica,
            ..self.clone()
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

struct DropFlag(Arc<AtomicBool>, bool);
impl Drop for DropFlag {
    fn drop(&mut self) {
        if !self.1 {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

impl Service<Req> for Backend {
    type Response = String;
    type Error = Failed;
    type Future = Pin<Box<dyn Future<Output = Result<String, Failed>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Failed>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let (latency, out) = (self.script)(n, &req);
        let dropped = Arc::new(AtomicBool::new(false));
        self.seen.lock().unwrap().push(Seen {
            id: req.id,
            replica: self.replica,
            cx: req.cx.clone(),
            at: Instant::now(),
            dropped: dropped.clone(),
        });
        Box::pin(async move {
            let mut flag = DropFlag(dropped, false);
            tokio::time::sleep(latency).await;
            flag.1 = true;
            out
        })
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// First call slow (500 ms), the others fast (8 ms), all succeed.
fn slow_first() -> Backend {
    Backend::new(|n, req| {
        let latency = if n == 0 { ms(500) } else { ms(8) };
        (latency, Ok(format!("{}#{n}", req.id)))
    })
}

fn fixed(delay: Duration) -> HedgeLayer {
    HedgeLayer::builder()
        .delay(Delay::fixed(delay))
        .budget(Budget::unlimited())
        .build()
        .unwrap()
}

async fn timed<F: Future>(f: F) -> (F::Output, Duration) {
    let start = Instant::now();
    let out = f.await;
    (out, start.elapsed())
}

// ---------------------------------------------------------------- types

#[test]
fn layer_service_future_and_stats_are_send_sync_clone() {
    fn send_sync_clone<T: Send + Sync + Clone>() {}
    fn send<T: Send>() {}
    send_sync_clone::<HedgeLayer>();
    send_sync_clone::<Hedge<Backend>>();
    send_sync_clone::<HedgeStats>();
    send_sync_clone::<atscale_hedge::BufferBodyLayer>();
    send::<<Hedge<Backend> as Service<Req>>::Future>();
}

#[test]
fn settings_out_of_range_are_refused() {
    let err = |b: atscale_hedge::HedgeBuilder| b.build().unwrap_err();
    let e: InvalidConfig = err(HedgeLayer::builder().max_attempts(6));
    assert_eq!(e.setting(), "max_attempts");
    assert_eq!(e.to_string(), "invalid hedge max_attempts: must be 1 to 5");
    assert_eq!(
        err(HedgeLayer::builder().max_attempts(0)).setting(),
        "max_attempts"
    );
    for p in [0.0, 1.5, f64::NAN] {
        let e = err(HedgeLayer::builder().delay(Delay::adaptive().percentile(p)));
        assert_eq!(e.setting(), "percentile");
    }
    let e = err(HedgeLayer::builder().delay(Delay::adaptive().window(Duration::ZERO)));
    assert_eq!(e.setting(), "window");
    let e = err(HedgeLayer::builder().delay(Delay::adaptive().min_samples(0)));
    assert_eq!(e.setting(), "min_samples");
    let e = err(HedgeLayer::builder().budget(Budget::ratio(-0.1)));
    assert_eq!(e.setting(), "budget ratio");
    let e = err(HedgeLayer::builder().budget(Budget::ratio(0.05).window(5)));
    assert_eq!(e.setting(), "budget window");
    assert!(HedgeLayer::builder().max_attempts(5).build().is_ok());
    let no_replicas: Vec<Backend> = Vec::new();
    let Err(e) = HedgeLayer::adaptive().replicas(no_replicas) else {
        panic!("an empty replica list was accepted")
    };
    assert_eq!(e.setting(), "replicas");
}

// ---------------------------------------------------------------- fixed delay

#[tokio::test(start_paused = true)]
async fn a_slow_first_attempt_is_hedged_after_the_delay_and_the_hedge_wins() {
    let backend = slow_first();
    let layer = fixed(ms(20));
    let stats = layer.stats();
    let svc = layer.layer(backend.clone());
    let (out, took) = timed(svc.oneshot(Req::new(7))).await;
    assert_eq!(out.unwrap(), "7#1");
    assert_eq!(took, ms(28));
    let seen = backend.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].at - seen[0].at, ms(20));
    assert!(
        seen[0].dropped.load(Ordering::SeqCst),
        "the loser's future was dropped"
    );
    assert!(!seen[1].dropped.load(Ordering::SeqCst));
    assert_eq!(
        (stats.requests(), stats.hedges_sent(), stats.hedges_won()),
        (1, 1, 1)
    );
    assert_eq!(stats.current_delay(), Some(ms(20)));
}

#[tokio::test(start_paused = true)]
async fn a_fast_first_attempt_sends_no_hedge() {
    let backend = Backend::new(|_, _| (ms(19), Ok("fast".into())));
    let layer = fixed(ms(20));
    let svc = layer.layer(backend.clone());
    let (out, took) = timed(svc.oneshot(Req::new(1))).await;
    assert_eq!(out.unwrap(), "fast");
    assert_eq!(took, ms(19));
    assert_eq!(backend.seen().len(), 1);
    assert_eq!(layer.stats().hedges_sent(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_primary_can_still_win_after_a_hedge_is_sent() {
    // primary 25 ms, hedge sent at 20 ms takes 30 ms: the primary answers at 25
    let backend = Backend::new(|n, _| (if n == 0 { ms(25) } else { ms(30) }, Ok(format!("#{n}"))));
    let layer = fixed(ms(20));
    let (out, took) = timed(layer.layer(backend.clone()).oneshot(Req::new(1))).await;
    assert_eq!(out.unwrap(), "#0");
    assert_eq!(took, ms(25));
    assert!(backend.seen()[1].dropped.load(Ordering::SeqCst));
    assert_eq!(
        (layer.stats().hedges_sent(), layer.stats().hedges_won()),
        (1, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn attempts_are_spaced_by_the_delay_up_to_max_attempts() {
    let backend = Backend::new(|n, _| (if n < 2 { ms(500) } else { ms(8) }, Ok(format!("#{n}"))));
    let layer = HedgeLayer::builder()
        .delay(Delay::fixed(ms(10)))
        .max_attempts(3)
        .budget(Budget::unlimited())
        .build()
        .unwrap();
    let (out, took) = timed(layer.layer(backend.clone()).oneshot(Req::new(1))).await;
    assert_eq!(out.unwrap(), "#2");
    assert_eq!(took, ms(28));
    let seen = backend.seen();
    let offsets: Vec<Duration> = seen.iter().map(|s| s.at - seen[0].at).collect();
    assert_eq!(offsets, [ms(0), ms(10), ms(20)]);
    assert!(seen[0].dropped.load(Ordering::SeqCst) && seen[1].dropped.load(Ordering::SeqCst));
}

#[tokio::test(start_paused = true)]
async fn zero_delay_sends_every_attempt_at_once() {
    let backend = Backend::new(|n, _| (ms(50 - 10 * n as u64), Ok(format!("#{n}"))));
    let layer = HedgeLayer::builder()
        .delay(Delay::fixed(Duration::ZERO))
        .max_attempts(3)
        .budget(Budget::unlimited())
        .build()
        .unwrap();
    let (out, took) = timed(layer.layer(backend.clone()).oneshot(Req::new(1))).await;
    assert_eq!(out.unwrap(), "#2");
    assert_eq!(took, ms(30));
    let seen = backend.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|s| s.at == seen[0].at));
}

// ---------------------------------------------------------------- outcomes

fn nonfatal_on_err() -> impl Fn(Result<&String, &Failed>) -> Verdict + Clone {
    |out: Result<&String, &Failed>| match out {
        Ok(_) => Verdict::Good,
        Err(Failed("unavailable")) => Verdict::NonFatal,
        Err(_) => Verdict::Fatal,
    }
}

#[tokio::test(start_paused = true)]
async fn a_non_fatal_failure_fires_the_next_hedge_at_once() {
    let backend = Backend::new(|n, _| match n {
        0 => (ms(1), Err(Failed("unavailable"))),
        _ => (ms(8), Ok(format!("#{n}"))),
    });
    let layer = HedgeLayer::builder()
        .delay(Delay::fixed(ms(20)))
        .budget(Budget::unlimited())
        .classify(nonfatal_on_err())
        .build()
        .unwrap();
    let (out, took) = timed(layer.layer(backend.clone()).oneshot(Req::new(1))).await;
    assert_eq!(out.unwrap(), "#1");
    assert_eq!(took, ms(9), "no waiting for the delay");
}

#[tokio::test(start_paused = true)]
async fn a_fatal_failure_returns_at_once_and_cancels_the_rest() {
    let backend = Backend::new(|n, _| match n {
        0 => (ms(30), Err(Failed("invalid"))),
        _ => (ms(100), Ok(format!("#{n}"))),
    });
    let layer = HedgeLayer::builder()
        .delay(Delay::fixed(ms(20)))
        .budget(Budget::unlimited())
        .classify(nonfatal_on_err())
        .build()
        .unwrap();
    let (out, took) = timed(layer.layer(backend.clone()).oneshot(Req::new(1))).await;
    let err = out.unwrap_err();
    assert_eq!(err.downcast_ref::<Failed>(), Some(&Failed("invalid")));
    assert_eq!(took, ms(30));
    assert!(backend.seen()[1].dropped.load(Ordering::SeqCst));
}

#[tokio::test(start_paused = true)]
async fn when_every_attempt_fails_the_error_lists_each_in_order() {
    let backend = Backend::new(|n, _| match n {
        0 => (ms(40), Err(Failed("unavailable"))),
        _ => (ms(1), Err(Failed("unavailable"))),
    });
    let layer = HedgeLayer::builder()
        .delay(Delay::fixed(ms(20)))
        .max_attempts(3)
        .budget(Budget::unlimited())
        .classify(|out: Result<&String, &Failed>| {
            if out.is_ok() {
                Verdict::Good
            } else {
                Verdict::NonFatal
            }
        })
        .build()
        .unwrap();
    let (out, took) = timed(layer.layer(backend.clone()).oneshot(Req::new(1))).await;
    let err = out.unwrap_err();
    assert_eq!(Kind::of(&*err), Kind::HedgeExhausted);
    let exhausted = err.downcast_ref::<HedgeExhausted>().unwrap();
    assert_eq!(exhausted.attempts().len(), 3);
    assert!(
        exhausted
            .attempts()
            .iter()
            .all(|e| e.to_string() == "unavailable")
    );
    // #1 at 20 ms fails at 21, which fires #2 at once (fails at 22); #0 fails at 40.
    assert_eq!(took, ms(40));
    assert_eq!(backend.seen()[2].at - backend.seen()[0].at, ms(21));
}

#[tokio::test(start_paused = true)]
async fn a_single_attempt_fails_with_its_own_error() {
    let backend = Backend::new(|_, _| (ms(1), Err(Failed("unavailable"))));
    let layer = HedgeLayer::builder()
        .delay(Delay::fixed(ms(20)))
        .max_attempts(1)
        .classify(nonfatal_on_err())
        .build()
        .unwrap();
    let err = layer.layer(backend).oneshot(Req::new(1)).await.unwrap_err();
    assert_eq!(err.downcast_ref::<Failed>(), Some(&Failed("unavailable")));
}

#[tokio::test(start_paused = true)]
async fn a_non_fatal_response_is_returned_when_nothing_better_comes() {
    // 503-like answers: non-fatal responses, the last one is the answer
    let backend = Backend::new(|n, _| (ms(5 + n as u64), Ok(format!("busy#{n}"))));
    let layer = HedgeLayer::builder()
        .delay(Delay::fixed(ms(2)))
        .budget(Budget::unlimited())
        .classify(|out: Result<&String, &Failed>| match out {
            Ok(s) if s.starts_with("busy") => Verdict::NonFatal,
            Ok(_) => Verdict::Good,
            Err(_) => Verdict::Fatal,
        })
        .build()
        .unwrap();
    let out = layer.layer(backend).oneshot(Req::new(1)).await.unwrap();
    assert_eq!(out, "busy#1");
}

// ---------------------------------------------------------------- contexts

#[tokio::test(start_paused = true)]
async fn every_attempt_gets_a_child_context_and_losers_are_cancelled() {
    let backend = slow_first();
    let svc = fixed(ms(20)).layer(backend.clone());
    let parent = Context::new();
    svc.oneshot(Req::new(1).with_context(&parent))
        .await
        .unwrap();
    let seen = backend.seen();
    let (loser, winner) = (seen[0].cx.clone().unwrap(), seen[1].cx.clone().unwrap());
    assert!(loser.is_cancelled(), "the loser sees its context cancelled");
    assert!(!winner.is_cancelled(), "the winner's context stays alive");
    assert!(!parent.is_cancelled(), "the caller's context is untouched");
    // children: cancelling the parent reaches the winner's context
    parent.cancel();
    assert!(winner.is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn dropping_the_request_cancels_every_attempt() {
    let backend = Backend::new(|_, _| (ms(500), Ok("late".into())));
    let mut svc = fixed(ms(20)).layer(backend.clone());
    let parent = Context::new();
    let fut = svc
        .ready()
        .await
        .unwrap()
        .call(Req::new(1).with_context(&parent));
    let fut = tokio::spawn(fut);
    tokio::task::yield_now().await; // first poll at 0 ms: the delay runs from there
    advance(ms(30)).await;
    tokio::task::yield_now().await;
    assert_eq!(backend.seen().len(), 2);
    fut.abort();
    let _ = fut.await;
    for s in backend.seen() {
        assert!(s.cx.unwrap().is_cancelled());
        assert!(s.dropped.load(Ordering::SeqCst));
    }
    assert!(!parent.is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn no_hedge_starts_after_the_deadline() {
    let backend = Backend::new(|_, _| (ms(100), Ok("slow".into())));
    let layer = fixed(ms(20));
    let svc = layer.layer(backend.clone());
    let cx = Context::new().with_budget(ms(15), Origin::Local);
    let out = svc.oneshot(Req::new(1).with_context(&cx)).await;
    assert_eq!(
        out.unwrap(),
        "slow",
        "the layer enforces no deadline itself"
    );
    assert_eq!(backend.seen().len(), 1);
    assert_eq!(layer.stats().hedges_sent(), 0);
    assert_eq!(
        backend.seen()[0].cx.as_ref().unwrap().deadline(),
        cx.deadline()
    );
}

#[tokio::test(start_paused = true)]
async fn no_hedge_starts_once_the_request_is_cancelled() {
    let backend = Backend::new(|_, _| (ms(100), Ok("slow".into())));
    let layer = fixed(ms(20));
    let svc = layer.layer(backend.clone());
    let cx = Context::new();
    let canceller = cx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(ms(10)).await;
        canceller.cancel();
    });
    let _ = svc.oneshot(Req::new(1).with_context(&cx)).await;
    assert_eq!(layer.stats().hedges_sent(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_task_local_context_is_inherited() {
    let backend = slow_first();
    let svc = fixed(ms(20)).layer(backend.clone());
    let cx = Context::new().with_budget(ms(1000), Origin::Parent);
    cx.clone().scope(svc.oneshot(Req::new(1))).await.unwrap();
    for s in backend.seen() {
        assert_eq!(s.cx.unwrap().deadline(), cx.deadline());
    }
}

// ---------------------------------------------------------------- what is hedged

#[tokio::test(start_paused = true)]
async fn non_idempotent_requests_are_sent_once_unless_opted_in() {
    let backend = slow_first();
    let svc = fixed(ms(20)).layer(backend.clone());
    let mut req = Req::new(1);
    req.idempotent = false;
    let (out, took) = timed(svc.oneshot(req.clone())).await;
    assert_eq!((out.unwrap().as_str(), took), ("1#0", ms(500)));

    let backend = slow_first();
    let layer = HedgeLayer::builder()
        .delay(Delay::fixed(ms(20)))
        .budget(Budget::unlimited())
        .non_idempotent(true)
        .build()
        .unwrap();
    let (out, took) = timed(layer.layer(backend).oneshot(req)).await;
    assert_eq!((out.unwrap().as_str(), took), ("1#1", ms(28)));
}

#[tokio::test(start_paused = true)]
async fn requests_that_do_not_replay_are_sent_once() {
    let backend = slow_first();
    let layer = fixed(ms(20));
    let mut req = Req::new(1);
    req.replayable = false;
    let (out, took) = timed(layer.layer(backend.clone()).oneshot(req)).await;
    assert_eq!((out.unwrap().as_str(), took), ("1#0", ms(500)));
    assert_eq!(layer.stats().hedges_sent(), 0);
}

// ---------------------------------------------------------------- adaptive delay

#[tokio::test(start_paused = true)]
async fn adaptive_delay_waits_for_samples_then_hedges_at_the_percentile() {
    // latencies 1..=100 ms by request id; request 1000 is slow
    // (calls 0 and 100 are request 1000's first attempts; call 101 its hedge)
    let backend = Backend::new(|n, req| {
        let latency = if req.id == 1000 && n % 2 == 0 {
            ms(500)
        } else {
            ms(req.id % 100 + 1)
        };
        (latency, Ok(format!("{}", req.id)))
    });
    let layer = HedgeLayer::builder()
        .delay(
            Delay::adaptive()
                .percentile(0.9)
                .min_samples(100)
                .window(Duration::from_secs(60)),
        )
        .clock(Clock::tokio()) // latencies on the paused clock
        .budget(Budget::unlimited())
        .build()
        .unwrap();
    let stats = layer.stats();
    let svc = layer.layer(backend.clone());
    // the slow request before any samples: no hedge
    let (_, took) = timed(svc.clone().oneshot(Req::new(1000))).await;
    assert_eq!(took, ms(500));
    assert_eq!(stats.current_delay(), None);
    // 99 more samples: still not enough (the slow one counted)
    for id in 0..98 {
        svc.clone().oneshot(Req::new(id)).await.unwrap();
    }
    assert_eq!(stats.current_delay(), None);
    svc.clone().oneshot(Req::new(98)).await.unwrap();
    // 100 samples: 1..=99 ms and 500 ms; the 90th is 90 ms (µs resolution, within 3%)
    let d = stats.current_delay().unwrap();
    assert!(d >= ms(90) && d <= ms(93), "{d:?}");
    assert_eq!(stats.hedges_sent(), 0);
    let (out, took) = timed(svc.clone().oneshot(Req::new(1000))).await;
    assert_eq!(out.unwrap(), "1000");
    // the timer fires on the next millisecond tick; the copy takes 1 ms (id 1000 % 100 + 1)
    let fire = Duration::from_millis(d.as_micros().div_ceil(1000) as u64);
    assert_eq!(took, fire + ms(1), "hedged at the percentile");
    assert_eq!((stats.hedges_sent(), stats.hedges_won()), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn the_default_clock_is_not_the_paused_one() {
    // On a paused clock the default (TSC) clock sees 40 ms sleeps as taking
    // almost no time: tests of adaptive delays choose `Clock::tokio()`.
    let backend = Backend::new(|_, _| (ms(40), Ok("ok".into())));
    let layer = HedgeLayer::builder()
        .delay(Delay::adaptive().percentile(0.5).min_samples(10))
        .build()
        .unwrap();
    let svc = layer.layer(backend);
    for id in 0..10 {
        svc.clone().oneshot(Req::new(id)).await.unwrap();
    }
    assert!(layer.stats().current_delay().unwrap() < ms(40));
}

#[tokio::test(start_paused = true)]
async fn fast_failures_do_not_drag_the_delay_down() {
    let backend = Backend::new(|_, req| {
        if req.id % 2 == 0 {
            (Duration::from_micros(100), Err(Failed("unavailable")))
        } else {
            (ms(40), Ok("ok".into()))
        }
    });
    let layer = HedgeLayer::builder()
        .delay(Delay::adaptive().percentile(0.5).min_samples(10))
        .clock(Clock::tokio())
        .max_attempts(1)
        .classify(nonfatal_on_err())
        .build()
        .unwrap();
    let svc = layer.layer(backend);
    for id in 0..40 {
        let _ = svc.clone().oneshot(Req::new(id)).await;
    }
    // only the 40 ms successes count (µs buckets are within 3%)
    let d = layer.stats().current_delay().unwrap();
    assert!(d >= ms(40) && d <= Duration::from_micros(41_300), "{d:?}");
}

// ---------------------------------------------------------------- budget

#[tokio::test(start_paused = true)]
async fn the_budget_caps_hedges_when_everything_is_slow() {
    let backend = Backend::new(|_, _| (ms(100), Ok("slow".into())));
    let layer = HedgeLayer::builder()
        .delay(Delay::fixed(ms(10)))
        .budget(Budget::ratio(0.05).window(100).min_per_second(0))
        .build()
        .unwrap();
    let stats = layer.stats();
    let svc = layer.layer(backend.clone());
    // 400 concurrent requests, every one slow enough to want a hedge
    let all: Vec<_> = (0..400)
        .map(|id| tokio::spawn(svc.clone().oneshot(Req::new(id))))
        .collect();
    for h in all {
        h.await.unwrap().unwrap();
    }
    assert_eq!(stats.requests(), 400);
    // every run of 100 consecutive requests carries at most 5 hedges
    let mut calls = [0u32; 400];
    for s in backend.seen() {
        calls[s.id as usize] += 1;
    }
    let hedges: Vec<u32> = calls.iter().map(|c| c - 1).collect();
    for start in 0..=300 {
        let n: u32 = hedges[start..start + 100].iter().sum();
        assert!(n <= 5, "requests {start}..{}: {n} hedges", start + 100);
    }
    let sent = stats.hedges_sent();
    assert_eq!(u64::from(hedges.iter().sum::<u32>()), sent);
    assert!((5..=20).contains(&sent), "{sent}");
    // everyone else asked at 10, 20, ... 90 ms and was refused each time
    assert!(
        stats.budget_denials() >= (400 - sent) * 9,
        "{}",
        stats.budget_denials()
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_request_asks_again_when_the_budget_has_room() {
    // request 0 is slow; copies and all other requests take 1 ms
    let backend = Backend::new(|n, _| (if n == 0 { ms(500) } else { ms(1) }, Ok(format!("#{n}"))));
    let layer = HedgeLayer::builder()
        .delay(Delay::fixed(ms(10)))
        .budget(Budget::ratio(0.05).window(20).min_per_second(0))
        .build()
        .unwrap();
    let svc = layer.layer(backend.clone());
    let slow = tokio::spawn(timed(svc.clone().oneshot(Req::new(0))));
    tokio::task::yield_now().await;
    // at 10 ms one request has been seen: 5% of 1 is no hedge
    advance(ms(10)).await;
    tokio::task::yield_now().await;
    assert_eq!(layer.stats().budget_denials(), 1);
    // 19 more requests at once: 5% of 20 is one hedge, taken at the next ask (20 ms)
    let others: Vec<_> = (1..20)
        .map(|id| svc.clone().oneshot(Req::new(id)))
        .collect();
    for out in futures_join(others).await {
        out.unwrap();
    }
    let (out, took) = slow.await.unwrap();
    assert_eq!(out.unwrap(), "#20");
    assert_eq!(took, ms(21));
    assert_eq!(layer.stats().hedges_sent(), 1);
}

#[tokio::test(start_paused = true)]
async fn clones_share_one_budget_and_one_set_of_counters() {
    let backend = Backend::new(|_, _| (ms(100), Ok("slow".into())));
    let layer = HedgeLayer::builder()
        .delay(Delay::fixed(ms(10)))
        .budget(Budget::ratio(0.1).window(20).min_per_second(0))
        .build()
        .unwrap();
    let a = layer.layer(backend.clone());
    let b = layer.layer(backend.clone());
    let mut handles = Vec::new();
    for id in 0..10 {
        handles.push(tokio::spawn(a.clone().oneshot(Req::new(id))));
        handles.push(tokio::spawn(b.clone().oneshot(Req::new(id))));
    }
    for h in handles {
        h.await.unwrap().unwrap();
    }
    assert_eq!(layer.stats().requests(), 20);
    assert_eq!(
        a.stats().hedges_sent(),
        2,
        "10% of 20, not 10% of each service's 10 twice"
    );
}

// ---------------------------------------------------------------- replicas

#[tokio::test(start_paused = true)]
async fn hedges_go_to_another_replica() {
    // replica 0 is slow, replica 1 fast
    let base = Backend::new(|_, _| (ms(1), Ok(String::new())));
    let script = |replica: usize| {
        let b = base.replica(replica);
        Backend {
            script: Arc::new(move |_, _| {
                (
                    if replica == 0 { ms(100) } else { ms(10) },
                    Ok(format!("r{replica}")),
                )
            }),
            ..b
        }
    };
    let layer = fixed(ms(20));
    let svc = layer
        .replicas(vec![script(0), script(1)])
        .unwrap()
        .pick(|req: &Req, n: usize| req.id as usize % n);
    // id 0: first attempt on the slow replica, the hedge on the fast one
    let (out, took) = timed(svc.clone().oneshot(Req::new(0))).await;
    assert_eq!((out.unwrap().as_str(), took), ("r1", ms(30)));
    // id 1: first attempt on the fast replica, no hedge
    let (out, took) = timed(svc.clone().oneshot(Req::new(1))).await;
    assert_eq!((out.unwrap().as_str(), took), ("r1", ms(10)));
    let replicas: Vec<usize> = base.seen().iter().map(|s| s.replica).collect();
    assert_eq!(replicas, [0, 1, 1]);
    assert_eq!(svc.replicas().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn replicas_take_turns_by_default_and_attempts_never_repeat_one() {
    let base = Backend::new(|_, _| (ms(100), Ok(String::new())));
    let layer = HedgeLayer::builder()
        .delay(Delay::fixed(Duration::ZERO))
        .max_attempts(3)
        .budget(Budget::unlimited())
        .build()
        .unwrap();
    let svc = layer
        .replicas(vec![base.replica(0), base.replica(1), base.replica(2)])
        .unwrap();
    for id in 0..3 {
        svc.clone().oneshot(Req::new(id)).await.unwrap();
    }
    let seen: Vec<usize> = base.seen().iter().map(|s| s.replica).collect();
    assert_eq!(seen, [0, 1, 2, 1, 2, 0, 2, 0, 1]);
}

#[tokio::test(start_paused = true)]
async fn replicas_from_a_discover_source_come_and_go() {
    use tower::discover::Change;
    // replica 0 slow, replicas 1 and 2 fast
    let base = Backend::new(|_, _| (ms(1), Ok(String::new())));
    let replica = |r: usize| Backend {
        script: Arc::new(move |_, _| (if r == 0 { ms(100) } else { ms(10) }, Ok(format!("r{r}")))),
        ..base.replica(r)
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Change<u32, Backend>, Failed>>();
    let layer = fixed(ms(20));
    let mut svc = layer
        .discover(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .pick(|req: &Req, n: usize| req.id as usize % n);

    // no replica yet: not ready
    assert!(tokio_test_ready(&mut svc).is_pending());
    tx.send(Ok(Change::Insert(0, replica(0)))).unwrap();
    tx.send(Ok(Change::Insert(1, replica(1)))).unwrap();
    let (out, took) = timed(svc.ready().await.unwrap().call(Req::new(0))).await;
    assert_eq!(
        (out.unwrap().as_str(), took),
        ("r1", ms(30)),
        "hedged onto the other replica"
    );
    assert_eq!(svc.replicas().len(), 2);

    // replica 1 goes away, replica 2 comes: the hedge goes to 2
    tx.send(Ok(Change::Remove(1))).unwrap();
    tx.send(Ok(Change::Insert(2, replica(2)))).unwrap();
    let (out, took) = timed(svc.ready().await.unwrap().call(Req::new(0))).await;
    assert_eq!((out.unwrap().as_str(), took), ("r2", ms(30)));

    // a discovery error surfaces from poll_ready
    tx.send(Err(Failed("registry down"))).unwrap();
    let err = svc.ready().await.unwrap_err();
    assert_eq!(err.to_string(), "registry down");

    // a source that ends with replicas keeps them
    drop(tx);
    assert!(svc.ready().await.is_ok());
    assert_eq!(layer.stats().hedges_sent(), 2);
}

// ---------------------------------------------------------------- readiness

#[tokio::test(start_paused = true)]
async fn readiness_is_delegated_and_hedges_drive_their_own() {
    let (mock, mut handle) = tower_test::mock::pair::<Req, String>();
    let mut svc = fixed(ms(20)).layer(mock);
    handle.allow(0);
    let mut task = tokio_test_ready(&mut svc);
    assert!(task.is_pending(), "the inner service is not ready");
    handle.allow(1);
    task = tokio_test_ready(&mut svc);
    assert!(!task.is_pending());
    let fut = tokio::spawn(svc.call(Req::new(1)));
    let (_req, primary) = handle.next_request().await.unwrap();
    // the hedge is due at 20 ms but its clone is not ready until allowed
    advance(ms(25)).await;
    tokio::task::yield_now().await;
    assert!(handle.poll_request().is_pending());
    handle.allow(1);
    let (_req, hedge) = handle.next_request().await.unwrap();
    hedge.send_response("hedge".into());
    assert_eq!(fut.await.unwrap().unwrap(), "hedge");
    drop(primary);
}

enum Readiness {
    Pending,
    Ready,
}
impl Readiness {
    fn is_pending(&self) -> bool {
        matches!(self, Readiness::Pending)
    }
}

fn tokio_test_ready<S: Service<Req>>(svc: &mut S) -> Readiness {
    let waker = futures_noop_waker();
    let mut cx = TaskContext::from_waker(&waker);
    match svc.poll_ready(&mut cx) {
        Poll::Pending => Readiness::Pending,
        Poll::Ready(_) => Readiness::Ready,
    }
}

fn futures_noop_waker() -> std::task::Waker {
    std::task::Waker::noop().clone()
}

/// Awaits all futures concurrently (polled together, in one task).
async fn futures_join<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    let handles: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut outs: Vec<Option<F::Output>> = handles.iter().map(|_| None).collect();
    let mut handles: Vec<Option<Pin<Box<F>>>> = handles.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (h, out) in handles.iter_mut().zip(outs.iter_mut()) {
            if let Some(f) = h {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => {
                        *out = Some(v);
                        *h = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outs.into_iter().map(|o| o.expect("done")).collect()
}

#[allow(dead_code)]
fn _unused(_: BoxError) {}
