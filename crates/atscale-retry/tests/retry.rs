//! gRFC A6 semantics of the retry layer, on tokio's paused clock.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atscale_core::{BoxError, Context, Kind, Origin, RetryThrottle, Unreachable};
use atscale_retry::{
    Attempts, Code, RetryFailed, RetryLayer, RetryPolicy, RetryPolicyBuilder, Stop,
};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

/// What the backend does with one call.
#[derive(Clone, Debug)]
enum Act {
    Ok,
    /// A trailers-only gRPC answer with this code and pushback header.
    Grpc(u8, Option<&'static str>),
    /// An HTTP status, with a Retry-After.
    Http(u16, Option<&'static str>),
    /// An error: the server could not be reached.
    Unreachable,
    /// An error the vocabulary does not know.
    Other,
    /// gRPC response headers (the call is committed), then a failure in the trailers.
    Committed,
    /// Never answers.
    Hang,
}

#[derive(Debug)]
struct Seen {
    at: Duration,
    previous: Option<String>,
    replica: usize,
    cx: Option<Context>,
}

#[derive(Clone)]
struct Backend {
    script: Arc<Mutex<VecDeque<Act>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    start: Instant,
    replica: usize,
    dropped: Arc<Mutex<usize>>,
}

impl Backend {
    fn new(script: impl IntoIterator<Item = Act>) -> Self {
        Backend {
            script: Arc::new(Mutex::new(script.into_iter().collect())),
            seen: Arc::default(),
            start: Instant::now(),
            replica: 0,
            dropped: Arc::default(),
        }
    }

    fn replica(&self, replica: usize) -> Self {
        Backend {
            replica,
            ..self.clone()
        }
    }

    fn times(&self) -> Vec<u64> {
        let seen = self.seen.lock().unwrap();
        seen.iter().map(|s| s.at.as_millis() as u64).collect()
    }

    fn calls(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

struct DropFlag(Arc<Mutex<usize>>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        *self.0.lock().unwrap() += 1;
    }
}

type Req = http::Request<String>;
type Res = http::Response<String>;

impl Service<Req> for Backend {
    type Response = Res;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Res, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let act = self.script.lock().unwrap().pop_front().unwrap_or(Act::Ok);
        self.seen.lock().unwrap().push(Seen {
            at: self.start.elapsed(),
            previous: req
                .headers()
                .get("grpc-previous-rpc-attempts")
                .map(|v| v.to_str().unwrap().to_owned()),
            replica: self.replica,
            cx: req.extensions().get::<Context>().cloned(),
        });
        let flag = DropFlag(self.dropped.clone());
        Box::pin(async move {
            let _flag = flag;
            let grpc = |code: u8| {
                http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", code.to_string())
            };
            match act {
                Act::Ok => Ok(http::Response::new("ok".to_owned())),
                Act::Grpc(code, pushback) => {
                    let mut b = grpc(code);
                    if let Some(p) = pushback {
                        b = b.header("grpc-retry-pushback-ms", p);
                    }
                    Ok(b.body(String::new()).unwrap())
                }
                Act::Http(status, after) => {
                    let mut b = http::Response::builder().status(status);
                    if let Some(a) = after {
                        b = b.header("retry-after", a);
                    }
                    Ok(b.body(String::new()).unwrap())
                }
                Act::Unreachable => Err(Unreachable::new("backend").into()),
                Act::Other => Err("something odd".into()),
                Act::Committed => Ok(http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body("streaming".to_owned())
                    .unwrap()),
                Act::Hang => std::future::pending().await,
            }
        })
    }
}

fn policy() -> RetryPolicyBuilder {
    RetryPolicy::builder()
        .max_attempts(5)
        .initial_backoff(Duration::from_millis(100))
        .max_backoff(Duration::from_secs(1))
        .multiplier(2.0)
        .jitter_seed(1)
}

fn get() -> Req {
    http::Request::get("http://backend/x")
        .body(String::new())
        .unwrap()
}

fn post() -> Req {
    http::Request::post("http://backend/pkg.S/M")
        .body("msg".to_owned())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn retries_until_success_with_jittered_exponential_backoff() {
    let backend = Backend::new([
        Act::Unreachable,
        Act::Unreachable,
        Act::Unreachable,
        Act::Ok,
    ]);
    let svc = RetryLayer::new(policy().build().unwrap()).layer(backend.clone());
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(res.body(), "ok");
    assert_eq!(res.extensions().get::<Attempts>(), Some(&Attempts(4)));
    let t = backend.times();
    let gaps: Vec<u64> = t.windows(2).map(|w| w[1] - w[0]).collect();
    // 100, 200, 400 ms × random(0.8, 1.2), to the millisecond of the paused clock.
    for (gap, base) in gaps.iter().zip([100, 200, 400]) {
        assert!(
            (base * 8 / 10..=base * 12 / 10 + 1).contains(gap),
            "gap {gap} for base {base}: {gaps:?}"
        );
    }
    assert_eq!(t[0], 0);
}

#[tokio::test(start_paused = true)]
async fn at_most_five_attempts_even_when_more_are_configured() {
    let backend = Backend::new(std::iter::repeat_n(Act::Unreachable, 10));
    let svc = RetryLayer::new(policy().max_attempts(10).build().unwrap()).layer(backend.clone());
    let err = svc.oneshot(get()).await.unwrap_err();
    let failed = err.downcast_ref::<RetryFailed>().expect("wrapped");
    assert_eq!((failed.attempts(), failed.stop()), (5, Stop::MaxAttempts));
    assert_eq!(backend.calls(), 5);
    assert_eq!(
        Kind::of(&*err),
        Kind::Unreachable,
        "the last error decides the kind"
    );
}

#[tokio::test(start_paused = true)]
async fn previous_attempts_are_counted_in_a_header() {
    let backend = Backend::new([Act::Grpc(14, None), Act::Grpc(14, None), Act::Ok]);
    let svc = RetryLayer::new(policy().build().unwrap()).layer(backend.clone());
    svc.oneshot(get()).await.unwrap();
    let seen = backend.seen.lock().unwrap();
    let previous: Vec<Option<&str>> = seen.iter().map(|s| s.previous.as_deref()).collect();
    assert_eq!(previous, [None, Some("1"), Some("2")]);
}

#[tokio::test(start_paused = true)]
async fn non_retryable_outcomes_are_returned_at_once() {
    for (act, code) in [
        (Act::Grpc(4, None), Some(4)),   // DEADLINE_EXCEEDED
        (Act::Grpc(3, None), Some(3)),   // INVALID_ARGUMENT
        (Act::Grpc(1, None), Some(1)),   // CANCELLED
        (Act::Grpc(13, None), Some(13)), // INTERNAL: not in the policy
        (Act::Http(504, None), None),
        (Act::Http(400, None), None),
        (Act::Http(500, None), None),
    ] {
        let backend = Backend::new([act.clone(), Act::Ok]);
        let svc = RetryLayer::new(policy().build().unwrap()).layer(backend.clone());
        let res = svc.oneshot(get()).await.unwrap();
        assert_eq!(backend.calls(), 1, "{act:?}");
        assert!(res.extensions().get::<Attempts>().is_none());
        if let Some(code) = code {
            assert_eq!(res.headers()["grpc-status"], code.to_string().as_str());
        }
    }
    // An unknown error passes through unwrapped.
    let backend = Backend::new([Act::Other, Act::Ok]);
    let svc = RetryLayer::new(policy().build().unwrap()).layer(backend.clone());
    let err = svc.oneshot(get()).await.unwrap_err();
    assert_eq!(err.to_string(), "something odd");
    assert_eq!(backend.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn retryable_codes_are_the_policys() {
    let backend = Backend::new([Act::Grpc(10, None), Act::Grpc(13, None), Act::Ok]);
    let p = policy().retryable_codes([Code::Aborted]).build().unwrap();
    let res = RetryLayer::new(p)
        .layer(backend.clone())
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(backend.calls(), 2, "ABORTED retried, INTERNAL not");
    assert_eq!(res.headers()["grpc-status"], "13");
    assert_eq!(res.extensions().get::<Attempts>(), Some(&Attempts(2)));
}

#[tokio::test(start_paused = true)]
async fn a_response_with_headers_commits_the_call() {
    let backend = Backend::new([Act::Committed, Act::Ok]);
    let svc = RetryLayer::new(policy().build().unwrap()).layer(backend.clone());
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(res.body(), "streaming");
    assert_eq!(backend.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn pushback_waits_exactly_then_the_backoff_starts_over() {
    let backend = Backend::new([
        Act::Grpc(14, None),
        Act::Grpc(14, Some("700")),
        Act::Grpc(14, None),
        Act::Ok,
    ]);
    let svc = RetryLayer::new(policy().build().unwrap()).layer(backend.clone());
    svc.oneshot(get()).await.unwrap();
    let t = backend.times();
    assert_eq!(t[2] - t[1], 700, "exactly the pushback: {t:?}");
    assert!(
        (80..=121).contains(&(t[3] - t[2])),
        "initial backoff again: {t:?}"
    );
    assert!((80..=121).contains(&(t[1] - t[0])), "{t:?}");
}

#[tokio::test(start_paused = true)]
async fn negative_or_malformed_pushback_stops_and_costs_a_token() {
    for value in ["-1", "soon", "01"] {
        let throttle = RetryThrottle::new(10, 0.5).unwrap();
        let backend = Backend::new([Act::Grpc(14, Some(value)), Act::Ok]);
        let svc = RetryLayer::new(policy().build().unwrap())
            .throttle(throttle.clone())
            .layer(backend.clone());
        let res = svc.oneshot(get()).await.unwrap();
        assert_eq!(res.headers()["grpc-status"], "14", "{value}");
        assert_eq!(backend.calls(), 1, "{value}");
        assert_eq!(throttle.milli_tokens(), 9_000, "{value}");
    }
    // Even with a code the policy would not retry, a stop costs a token.
    let throttle = RetryThrottle::new(10, 0.5).unwrap();
    let backend = Backend::new([Act::Grpc(13, Some("-1"))]);
    let svc = RetryLayer::new(policy().build().unwrap())
        .throttle(throttle.clone())
        .layer(backend);
    svc.oneshot(get()).await.unwrap();
    assert_eq!(throttle.milli_tokens(), 9_000);
}

#[tokio::test(start_paused = true)]
async fn http_retry_after_is_honoured() {
    let backend = Backend::new([Act::Http(503, Some("2")), Act::Ok]);
    let svc = RetryLayer::new(policy().build().unwrap()).layer(backend.clone());
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(res.body(), "ok");
    assert_eq!(backend.times(), [0, 2000]);
}

#[tokio::test(start_paused = true)]
async fn rate_limited_is_retried_only_when_its_retry_after_fits_the_deadline() {
    let p = || {
        policy()
            .retryable_kinds([Kind::Unreachable, Kind::Overloaded, Kind::RateLimited])
            .build()
            .unwrap()
    };
    for (after, budget, calls) in [("1", 1_500, 2), ("1", 900, 1)] {
        let backend = Backend::new([Act::Http(429, Some(after)), Act::Ok]);
        let svc = RetryLayer::new(p()).layer(backend.clone());
        let mut req = get();
        req.extensions_mut()
            .insert(Context::new().with_budget(Duration::from_millis(budget), Origin::Local));
        let started = Instant::now();
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(backend.calls(), calls, "budget {budget}");
        if calls == 1 {
            assert_eq!(res.status(), 429);
            assert_eq!(started.elapsed(), Duration::ZERO, "returned at once");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn no_retry_when_the_backoff_would_pass_the_deadline() {
    // 100 ms backoff (±20%), then 200 ms (±20%): with 250 ms, the second
    // attempt fits, the third does not; the layer says so at once.
    let backend = Backend::new(std::iter::repeat_n(Act::Unreachable, 5));
    let svc = RetryLayer::new(policy().build().unwrap()).layer(backend.clone());
    let mut req = get();
    req.extensions_mut()
        .insert(Context::new().with_budget(Duration::from_millis(250), Origin::Local));
    let started = Instant::now();
    let err = svc.oneshot(req).await.unwrap_err();
    let failed = err.downcast_ref::<RetryFailed>().unwrap();
    assert_eq!((failed.attempts(), failed.stop()), (2, Stop::Deadline));
    assert_eq!(
        started.elapsed().as_millis() as u64,
        backend.times()[1],
        "no sleep after the last attempt"
    );
    assert!(started.elapsed() < Duration::from_millis(250));
}

#[tokio::test(start_paused = true)]
async fn every_attempt_runs_in_a_child_of_the_requests_context() {
    let backend = Backend::new([Act::Unreachable, Act::Ok]);
    let svc = RetryLayer::new(policy().build().unwrap()).layer(backend.clone());
    let parent = Context::new().with_budget(Duration::from_secs(5), Origin::Local);
    let mut req = get();
    req.extensions_mut().insert(parent.clone());
    svc.oneshot(req).await.unwrap();
    let seen = backend.seen.lock().unwrap();
    let (first, second) = (seen[0].cx.clone().unwrap(), seen[1].cx.clone().unwrap());
    assert_eq!(first.deadline(), parent.deadline());
    assert!(
        first.is_cancelled(),
        "the failed attempt's context is cancelled"
    );
    assert!(
        !second.is_cancelled(),
        "the winner's is left alone (its body may stream)"
    );
    assert!(!parent.is_cancelled());
    second.cancel();
    assert!(
        !parent.is_cancelled(),
        "a child, not the request's own context"
    );
    parent.cancel();
    assert!(
        seen[1].cx.as_ref().unwrap().is_cancelled(),
        "a child of the request's context"
    );
}

#[tokio::test(start_paused = true)]
async fn the_throttle_takes_a_token_per_retryable_failure_and_gives_back_per_success() {
    // max 4, ratio 0.5: threshold 2 tokens.
    let throttle = RetryThrottle::new(4, 0.5).unwrap();
    let backend = Backend::new([
        // call 1: fail (3), retry, fail (2: not above 2, stop)
        Act::Unreachable,
        Act::Unreachable,
        // call 2: fail (1): throttled at once
        Act::Unreachable,
        // call 3: success (1.5); call 4: success (2); call 5: success (2.5)
        Act::Ok,
        Act::Ok,
        Act::Ok,
        // call 6: fail (1.5): throttled; an unknown error costs nothing
        Act::Unreachable,
        Act::Other,
    ]);
    let svc = RetryLayer::new(policy().build().unwrap())
        .throttle(throttle.clone())
        .layer(backend.clone());
    let stop = |r: Result<Res, BoxError>| {
        let e = r.unwrap_err();
        let f = e.downcast_ref::<RetryFailed>().unwrap();
        (f.attempts(), f.stop())
    };
    assert_eq!(stop(svc.clone().oneshot(get()).await), (2, Stop::Throttled));
    assert_eq!(throttle.milli_tokens(), 2_000);
    assert_eq!(stop(svc.clone().oneshot(get()).await), (1, Stop::Throttled));
    assert_eq!(throttle.milli_tokens(), 1_000);
    for want in [1_500, 2_000, 2_500] {
        svc.clone().oneshot(get()).await.unwrap();
        assert_eq!(throttle.milli_tokens(), want);
    }
    assert_eq!(stop(svc.clone().oneshot(get()).await), (1, Stop::Throttled));
    assert_eq!(throttle.milli_tokens(), 1_500);
    svc.clone().oneshot(get()).await.unwrap_err();
    assert_eq!(throttle.milli_tokens(), 1_500);
    assert_eq!(backend.calls(), 8);
}

#[tokio::test(start_paused = true)]
async fn a_retry_goes_to_another_replica() {
    let backend = Backend::new([Act::Unreachable, Act::Unreachable, Act::Ok, Act::Ok]);
    let replicas = (0..3).map(|i| backend.replica(i)).collect();
    let svc = RetryLayer::new(policy().build().unwrap())
        .replicas(replicas)
        .unwrap();
    svc.clone().oneshot(get()).await.unwrap();
    svc.oneshot(get()).await.unwrap();
    let seen = backend.seen.lock().unwrap();
    let replicas: Vec<usize> = seen.iter().map(|s| s.replica).collect();
    assert_eq!(
        replicas,
        [0, 1, 2, 1],
        "retries move on; the next call starts at the next replica"
    );
    assert!(
        RetryLayer::new(policy().build().unwrap())
            .replicas(Vec::<Backend>::new())
            .is_err()
    );
}

#[tokio::test(start_paused = true)]
async fn non_idempotent_requests_need_an_opt_in() {
    let backend = Backend::new([Act::Unreachable, Act::Ok]);
    let svc = RetryLayer::new(policy().build().unwrap()).layer(backend.clone());
    let err = svc.oneshot(post()).await.unwrap_err();
    assert!(err.is::<Unreachable>(), "sent once, the error as it is");
    assert_eq!(backend.calls(), 1);

    let backend = Backend::new([Act::Unreachable, Act::Ok]);
    let svc =
        RetryLayer::new(policy().non_idempotent(true).build().unwrap()).layer(backend.clone());
    assert_eq!(svc.oneshot(post()).await.unwrap().body(), "ok");
    assert_eq!(backend.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn cancelling_the_request_ends_the_backoff_at_once() {
    let backend = Backend::new([Act::Unreachable, Act::Ok]);
    let svc = RetryLayer::new(
        policy()
            .initial_backoff(Duration::from_secs(10))
            .build()
            .unwrap(),
    )
    .layer(backend.clone());
    let parent = Context::new();
    let mut req = get();
    req.extensions_mut().insert(parent.clone());
    let call = tokio::spawn(svc.oneshot(req));
    tokio::time::sleep(Duration::from_millis(5)).await;
    parent.cancel();
    let err = tokio::time::timeout(Duration::from_millis(1), call)
        .await
        .expect("woken by the cancellation")
        .unwrap()
        .unwrap_err();
    let failed = err.downcast_ref::<RetryFailed>().unwrap();
    assert_eq!((failed.attempts(), failed.stop()), (1, Stop::Cancelled));
    assert_eq!(backend.calls(), 1);
}

/// Drops the call at each of its awaits (first attempt, backoff, second
/// attempt): nothing keeps running, the attempt's context is cancelled, and
/// the throttle holds exactly what the finished attempts took.
#[tokio::test(start_paused = true)]
async fn dropped_at_every_await_nothing_runs_on_and_tokens_add_up() {
    for (drop_at, tokens_after) in [(5u64, 10_000u32), (50, 9_000), (150, 9_000)] {
        let throttle = RetryThrottle::new(10, 0.1).unwrap();
        // The first attempt hangs (drop during it); or it fails at once, a
        // backoff of 80..120 ms follows (drop during it), and the second
        // attempt hangs (drop during it).
        let backend = if drop_at == 5 {
            Backend::new([Act::Hang])
        } else {
            Backend::new([Act::Unreachable, Act::Hang])
        };
        let svc = RetryLayer::new(policy().build().unwrap())
            .throttle(throttle.clone())
            .layer(backend.clone());
        let parent = Context::new();
        let mut req = get();
        req.extensions_mut().insert(parent.clone());
        let mut call = Box::pin(svc.oneshot(req));
        let polled = tokio::time::timeout(Duration::from_millis(drop_at), &mut call).await;
        assert!(polled.is_err(), "still running at {drop_at} ms");
        let attempts = backend.calls();
        drop(call);
        assert_eq!(
            *backend.dropped.lock().unwrap(),
            attempts,
            "every attempt future dropped (drop at {drop_at} ms)"
        );
        let all_cancelled = {
            let seen = backend.seen.lock().unwrap();
            seen.iter().all(|s| s.cx.as_ref().unwrap().is_cancelled())
        };
        assert!(all_cancelled, "every attempt's context is cancelled");
        assert!(!parent.is_cancelled());
        assert_eq!(
            throttle.milli_tokens(),
            tokens_after,
            "drop at {drop_at} ms"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            backend.calls(),
            attempts,
            "no attempt started after the drop"
        );
    }
}

#[test]
fn services_and_futures_are_send_sync_and_clone() {
    fn send_sync_clone<T: Send + Sync + Clone>() {}
    fn send<T: Send>() {}
    send_sync_clone::<RetryLayer>();
    send_sync_clone::<atscale_retry::Retry<Backend>>();
    send_sync_clone::<RetryPolicy>();
    send::<atscale_retry::future::ResponseFuture<Backend, Req>>();
    let _ = Kind::Unreachable;
}

#[tokio::test(start_paused = true)]
async fn a_retry_goes_to_another_discovered_replica() {
    let backend = Backend::new([Act::Unreachable, Act::Ok]);
    let list = tower::discover::ServiceList::new((0..2).map(|i| backend.replica(i)));
    let mut svc = RetryLayer::new(policy().build().unwrap()).discover(list);
    let res = svc.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(res.body(), "ok");
    assert_eq!(svc.replicas().len(), 2);
    let seen = backend.seen.lock().unwrap();
    let replicas: Vec<usize> = seen.iter().map(|s| s.replica).collect();
    assert_eq!(replicas, [0, 1]);
}

/// A request that copies once, then refuses.
struct CopiesOnce {
    copies: Arc<Mutex<u32>>,
    cx: Option<Context>,
}

impl atscale_core::Carrier for CopiesOnce {
    fn context(&self) -> Option<&Context> {
        self.cx.as_ref()
    }
    fn set_context(&mut self, cx: Context) {
        self.cx = Some(cx);
    }
}

impl atscale_hedge::Replay for CopiesOnce {
    fn replay(&self) -> Option<Self> {
        let mut copies = self.copies.lock().unwrap();
        *copies += 1;
        (*copies == 1).then(|| CopiesOnce {
            copies: self.copies.clone(),
            cx: None,
        })
    }
}

impl atscale_retry::RetryRequest for CopiesOnce {}

#[tokio::test(start_paused = true)]
async fn a_request_that_stops_copying_ends_the_call_instead_of_panicking() {
    let calls = Arc::new(Mutex::new(0));
    let backend = {
        let calls = calls.clone();
        tower::service_fn(move |_req: CopiesOnce| {
            *calls.lock().unwrap() += 1;
            async { Err::<(), BoxError>(Unreachable::new("backend").into()) }
        })
    };
    let svc = RetryLayer::new(policy().max_attempts(3).build().unwrap()).layer(backend);
    let req = CopiesOnce {
        copies: Arc::default(),
        cx: None,
    };
    let err = svc.oneshot(req).await.unwrap_err();
    assert!(err.is::<Unreachable>(), "{err}");
    assert_eq!(*calls.lock().unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_call_sent_once_keeps_its_error_but_still_counts_for_the_throttle() {
    let throttle = RetryThrottle::new(2, 0.5).unwrap();
    throttle.failure(); // 1 token: at the threshold, retries are off
    let backend = Backend::new([Act::Unreachable]);
    let svc = RetryLayer::new(policy().build().unwrap())
        .throttle(throttle.clone())
        .layer(backend.clone());
    let err = svc.oneshot(post()).await.unwrap_err();
    assert!(err.is::<Unreachable>(), "not a RetryFailed: {err}");
    assert_eq!(throttle.milli_tokens(), 0, "the failure took its token");
    assert_eq!(backend.calls(), 1);
}
