//! The Redis store against a real `redis-server` (started by the tests:
//! see `support/mod.rs`).
//!
//! Time here is real (the script reads Redis's clock), so assertions are on
//! counts with a stated tolerance, never on exact instants; a bound on
//! elapsed time either uses the time the test measured itself (how long
//! its own reservations took) or leaves room for a machine at least three
//! times slower than this one.

mod support;

use std::process::Stdio;
use std::time::Duration;

use atscale_core::{BoxError, Context, Kind};
use atscale_ratelimit::{Claims, Limit, RateLimitBuilder, Refusal, Store, key_fn};
use atscale_ratelimit_redis::{FaultPolicy, RedisLimiter, RedisStore, StoreUnavailable};
use redis::AsyncCommands;
use support::RedisServer;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{ServiceExt, service_fn};

type Svc = BoxCloneService<http::Request<()>, (), BoxError>;

fn store(server: &RedisServer, policy: FaultPolicy) -> RedisStore {
    RedisStore::builder(server.url())
        .timeout(Duration::from_millis(100))
        .fault_policy(policy)
        .build()
        .expect("a valid store")
}

fn layered(store: &RedisStore, limiters: &[RedisLimiter], reject: bool) -> Svc {
    let mut builder = RateLimitBuilder::with_store(store.clone());
    for l in limiters {
        builder = builder.limiter(l.clone());
    }
    if reject {
        builder = builder.reject();
    }
    let layer = builder.build().expect("a valid layer");
    BoxCloneService::new(
        tower::ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(|_req: http::Request<()>| async {
                Ok::<_, BoxError>(())
            })),
    )
}

async fn call(svc: &Svc) -> Result<(), BoxError> {
    svc.clone().oneshot(http::Request::new(())).await
}

/// Reject mode, one request every `pace` for `span`: the instants (from
/// `start`) of the admitted ones.
async fn hammer(svc: Svc, start: Instant, span: Duration, pace: Duration) -> Vec<Duration> {
    let mut admitted = Vec::new();
    let mut tick = tokio::time::interval(pace);
    while start.elapsed() < span {
        tick.tick().await;
        match call(&svc).await {
            Ok(()) => admitted.push(start.elapsed()),
            Err(e) => assert_eq!(Kind::of(&*e), Kind::RateLimited, "{e}"),
        }
    }
    admitted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_in_one_process_admit_what_one_limit_allows() {
    let server = RedisServer::start().await;
    // Two stores: two connections, as two processes would have.
    let (a, b) = (
        store(&server, FaultPolicy::FailClosed),
        store(&server, FaultPolicy::FailClosed),
    );
    let limit = Limit::per_second(100).unwrap().burst(10).unwrap();
    let svc_a = layered(&a, &[a.limiter("shared", limit).unwrap()], true);
    let svc_b = layered(&b, &[b.limiter("shared", limit).unwrap()], true);

    let start = Instant::now();
    let span = Duration::from_secs(1);
    let pace = Duration::from_millis(1);
    let (got_a, got_b) = tokio::join!(
        hammer(svc_a, start, span, pace),
        hammer(svc_b, start, span, pace)
    );
    let total = got_a.len() + got_b.len();
    let last = got_a.iter().chain(&got_b).max().copied().unwrap();
    // GCRA: at most burst + one per interval over the span of admissions,
    // plus one for the rounding at either end. Once the burst is spent, a
    // request that comes late to its slot loses nothing (the next slot is
    // counted from the theoretical time, not from the late arrival) unless
    // neither instance asked for longer than the burst's 100 ms; the lower
    // bound (80%) allows a stall that long on a loaded machine.
    let allowed = 10 + (last.as_secs_f64() * 100.0) as usize + 1;
    assert!(total <= allowed, "{total} admitted > {allowed} allowed");
    assert!(
        total * 100 >= allowed * 80,
        "{total} admitted, {allowed} allowed"
    );
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "both instances were served"
    );
    let stats = a.stats();
    assert_eq!(stats.admitted as usize, got_a.len());
    assert_eq!(stats.failed_closed + stats.failed_open, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_of_two_instances_sleep_locally_one_round_trip_each() {
    let server = RedisServer::start().await;
    let (a, b) = (
        store(&server, FaultPolicy::FailClosed),
        store(&server, FaultPolicy::FailClosed),
    );
    let limit = Limit::per_second(50).unwrap().burst(5).unwrap();
    let svc_a = layered(&a, &[a.limiter("wait", limit).unwrap()], false);
    let svc_b = layered(&b, &[b.limiter("wait", limit).unwrap()], false);
    // Load the script first: a cold start costs one NOSCRIPT answer (and a
    // second EVALSHA) to every request sent before the load.
    let warm = a
        .limiter("warm-up", Limit::per_second(1000).unwrap())
        .unwrap();
    call(&layered(&a, &[warm], true)).await.unwrap();
    let evals_before = server.calls(&["evalsha", "eval"]).await;

    let start = Instant::now();
    let mut calls = Vec::new();
    for _ in 0..20 {
        calls.push(tokio::spawn(svc_a.clone().oneshot(http::Request::new(()))));
        calls.push(tokio::spawn(svc_b.clone().oneshot(http::Request::new(()))));
    }
    // Every request has reserved (one round trip each) by the time the
    // script has run 40 times.
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while a.stats().round_trips + b.stats().round_trips < 41 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the reservations were never sent"
        );
        tick.tick().await;
    }
    let sent = start.elapsed();
    let mut done = Vec::new();
    for c in calls {
        c.await.unwrap().unwrap();
        done.push(start.elapsed());
    }
    done.sort();
    // 40 requests, 5 at once, then one every 20 ms: the last at 700 ms
    // after the first reservation. It is never earlier (the limit holds);
    // later only by the time the 40 reservations took to send, measured
    // here as `sent`, plus 100 ms to wake and answer on a loaded machine.
    let last = done[39];
    assert!(
        last >= Duration::from_millis(690),
        "last admitted at {last:?}"
    );
    assert!(
        last <= Duration::from_millis(800) + sent,
        "last admitted at {last:?}, the reservations sent within {sent:?}"
    );
    // The k-th admission never comes before the limit allows it.
    for (k, t) in done.iter().enumerate() {
        let earliest = Duration::from_millis(20 * (k.saturating_sub(4)) as u64);
        assert!(
            *t + Duration::from_millis(5) >= earliest,
            "#{k} at {t:?} < {earliest:?}"
        );
    }
    // No polling: one script per request, whatever its wait.
    let round_trips = a.stats().round_trips + b.stats().round_trips;
    assert_eq!(round_trips, 41);
    let evals = server.calls(&["evalsha", "eval"]).await - evals_before;
    assert_eq!(evals, 40, "Redis ran one script per request");
}

/// The child of `two_processes_admit_what_one_limit_allows`: run only there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of two_processes_admit_what_one_limit_allows"]
async fn child_process_worker() {
    let url = std::env::var("ATSCALE_REDIS_CHILD_URL")
        .expect("run only by two_processes_admit_what_one_limit_allows");
    let store = RedisStore::builder(url.as_str())
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let limit = Limit::per_second(200).unwrap().burst(20).unwrap();
    let svc = layered(&store, &[store.limiter("processes", limit).unwrap()], true);
    // connect before the start signal
    let probe = store
        .limiter("probe", Limit::per_second(1000).unwrap())
        .unwrap();
    call(&layered(&store, &[probe], true)).await.unwrap();
    println!("ready");
    let mut line = String::new();
    BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await
        .unwrap();
    assert_eq!(line.trim(), "go");
    let (start, wall) = (Instant::now(), std::time::SystemTime::now());
    let got = hammer(svc, start, Duration::from_secs(1), Duration::from_millis(1)).await;
    // The span of its admissions on the wall clock, which the parent shares.
    let (first, last) = (
        unix_nanos(wall, got[0]),
        unix_nanos(wall, got[got.len() - 1]),
    );
    println!("admitted {} from {first} to {last}", got.len());
}

/// `at` after `wall`, in nanoseconds since the Unix epoch.
fn unix_nanos(wall: std::time::SystemTime, at: Duration) -> u128 {
    (wall + at)
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_admit_what_one_limit_allows() {
    let server = RedisServer::start().await;
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_process_worker",
            "--nocapture",
        ])
        .env("ATSCALE_REDIS_CHILD_URL", server.url())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn this test binary as the second process");
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stdin = child.stdin.take().unwrap();

    let store = store(&server, FaultPolicy::FailClosed);
    let limit = Limit::per_second(200).unwrap().burst(20).unwrap();
    let svc = layered(&store, &[store.limiter("processes", limit).unwrap()], true);
    call(&svc).await.unwrap(); // connected (and one admission spent)
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = out.next_line().await.unwrap() {
            if line == "ready" {
                return;
            }
        }
        panic!("the child exited before it was ready");
    });
    ready.await.expect("the child got ready");
    stdin.write_all(b"go\n").await.unwrap();
    let (start, wall) = (Instant::now(), std::time::SystemTime::now());
    let mine = hammer(svc, start, Duration::from_secs(1), Duration::from_millis(1)).await;
    let mut theirs = None;
    while let Some(line) = out.next_line().await.unwrap() {
        if let Some(report) = line.strip_prefix("admitted ") {
            let words: Vec<&str> = report.split(' ').collect();
            let [n, "from", first, "to", last] = words[..] else {
                panic!("the child's report: {line}");
            };
            let nanos = |w: &str| w.parse::<u128>().unwrap();
            theirs = Some((n.parse::<usize>().unwrap(), nanos(first), nanos(last)));
        }
    }
    assert!(child.wait().await.unwrap().success(), "the child failed");
    let (theirs, their_first, their_last) = theirs.expect("the child reported its count");
    let total = 1 + mine.len() + theirs;
    // GCRA: at most burst + rate × the span of all admissions (both
    // processes', on the wall clock they share: the child may start late on
    // a loaded machine), plus one for the rounding and one for the
    // admission spent before the start. The lower bound: the limit was used.
    let first = unix_nanos(wall, mine[0]).min(their_first);
    let last = unix_nanos(wall, mine[mine.len() - 1]).max(their_last);
    let span_s = (last - first) as f64 / 1e9;
    let allowed = 20 + (200.0 * span_s) as usize + 2;
    assert!(
        total <= allowed,
        "{total} admitted > {allowed} in {span_s:.3} s"
    );
    assert!(total >= 200, "{total} admitted: the limit was not used");
    assert!(
        mine.len() >= 20 && theirs >= 20,
        "both processes were served: {} / {theirs}",
        mine.len()
    );
}

/// Kills Redis mid-run, then restarts it: the policy decides meanwhile,
/// and the limit holds again afterwards.
async fn redis_killed_mid_run(policy: FaultPolicy) {
    let mut server = RedisServer::start().await;
    let store = store(&server, policy);
    // per minute: nothing refills while the test runs, however slow the machine
    let limit = Limit::per_minute(5).unwrap();
    let svc = layered(&store, &[store.limiter("faults", limit).unwrap()], true);
    let admitted = |results: &[Result<(), BoxError>]| results.iter().filter(|r| r.is_ok()).count();

    let mut before = Vec::new();
    for _ in 0..10 {
        before.push(call(&svc).await);
    }
    assert_eq!(admitted(&before), 5, "{before:?}");

    server.kill();
    let mut down = Vec::new();
    let started = Instant::now();
    for _ in 0..10 {
        down.push(call(&svc).await);
    }
    // Each call is bounded by the store's 100 ms timeout: 1 s for the ten
    // at most here; an unbounded call would wait for Redis to come back,
    // which it does not until the restart below.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "each call bounded by the timeout: {:?}",
        started.elapsed()
    );
    let stats = store.stats();
    match policy {
        FaultPolicy::FailOpen => {
            assert_eq!(admitted(&down), 10, "{down:?}");
            assert_eq!(stats.failed_open, 10);
        }
        _ => {
            assert_eq!(admitted(&down), 0);
            for r in &down {
                let e = r.as_ref().unwrap_err();
                assert_eq!(Kind::of(&**e), Kind::Overloaded, "{e}");
                assert!(e.is::<StoreUnavailable>(), "{e}");
                assert!(e.to_string().contains("failing closed"), "{e}");
            }
            assert_eq!(stats.failed_closed, 10);
        }
    }

    server.restart().await;
    // Reconnection is automatic: wait until a request is decided by Redis
    // again (a bounded number of attempts, 20 ms apart).
    let probe = store
        .limiter("probe", Limit::per_second(1000).unwrap())
        .unwrap();
    let probe = layered(&store, &[probe], true);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let answered = store.stats().admitted;
    for _ in 0..250 {
        tick.tick().await;
        let _ = call(&probe).await;
        if store.stats().admitted > answered {
            break;
        }
    }
    assert!(store.stats().admitted > answered, "the store reconnected");
    let mut after = Vec::new();
    for _ in 0..10 {
        after.push(call(&svc).await);
    }
    assert!(admitted(&after) == 5, "the limit holds again: {after:?}");
    for r in after.iter().filter(|r| r.is_err()) {
        let e = r.as_ref().unwrap_err();
        assert_eq!(Kind::of(&**e), Kind::RateLimited, "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_fail_open_admits_then_limits_again() {
    redis_killed_mid_run(FaultPolicy::FailOpen).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_fail_closed_refuses_then_limits_again() {
    redis_killed_mid_run(FaultPolicy::FailClosed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_redis_is_bounded_by_the_timeout_and_by_the_deadline() {
    let server = RedisServer::start().await;
    let store = RedisStore::builder(server.url())
        .timeout(Duration::from_millis(200))
        .fault_policy(FaultPolicy::FailClosed)
        .build()
        .unwrap();
    let limit = Limit::per_second(100).unwrap();
    let svc = layered(&store, &[store.limiter("stuck", limit).unwrap()], false);
    call(&svc).await.unwrap();

    server.pause();
    // The store's timeout.
    let t = Instant::now();
    let e = call(&svc).await.unwrap_err();
    let took = t.elapsed();
    assert_eq!(Kind::of(&*e), Kind::Overloaded, "{e}");
    assert!(e.to_string().contains("did not answer within 200ms"), "{e}");
    // Ended by the 200 ms timeout: never before it, and long before the
    // stuck Redis would answer (never, until resumed).
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(store.stats().timeouts, 1);

    // The request's deadline, when it comes first.
    let cx = Context::new().with_budget(Duration::from_millis(30), atscale_core::Origin::Local);
    let mut req = http::Request::new(());
    atscale_core::Carrier::set_context(&mut req, cx);
    let t = Instant::now();
    let e = svc.clone().oneshot(req).await.unwrap_err();
    let took = t.elapsed();
    // The deadline, not the store's 200 ms timeout, ended it: the kind says
    // so, and the store counted a deadline and no second timeout.
    assert_eq!(Kind::of(&*e), Kind::DeadlineExceeded, "{e}");
    assert!(took >= Duration::from_millis(30), "{took:?}");
    assert_eq!(store.stats().deadline_exceeded, 1);
    assert_eq!(
        store.stats().timeouts,
        1,
        "a deadline is not a fault of the store"
    );
    server.resume();

    // A deadline already past: no round trip at all.
    let trips = store.stats().round_trips;
    let cx = Context::new().with_budget(Duration::ZERO, atscale_core::Origin::Local);
    let mut req = http::Request::new(());
    atscale_core::Carrier::set_context(&mut req, cx);
    let e = svc.clone().oneshot(req).await.unwrap_err();
    assert_eq!(Kind::of(&*e), Kind::DeadlineExceeded, "{e}");
    assert_eq!(store.stats().round_trips, trips);
    assert_eq!(store.stats().deadline_exceeded, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_answered_after_the_timeout_is_given_back() {
    let server = RedisServer::start().await;
    let store = RedisStore::builder(server.url())
        .timeout(Duration::from_millis(100))
        .fault_policy(FaultPolicy::FailClosed)
        .build()
        .unwrap();
    let l = store
        .limiter("late", Limit::per_second(1).unwrap())
        .unwrap();
    let probe = layered(
        &store,
        &[store
            .limiter("late-probe", Limit::per_second(1000).unwrap())
            .unwrap()],
        true,
    );
    call(&probe).await.unwrap(); // connected, script loaded
    let svc = layered(&store, std::slice::from_ref(&l), true);

    server.pause();
    let e = call(&svc).await.unwrap_err();
    assert!(e.is::<StoreUnavailable>(), "{e}");
    // Redis runs the script when it resumes and reserves the only slot;
    // the answer finds its caller gone, and the slot is given back.
    server.resume();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for _ in 0..300 {
        tick.tick().await;
        if store.stats().refunds == 1 {
            break;
        }
    }
    assert_eq!(store.stats().refunds, 1, "{:?}", store.stats());
    call(&svc).await.expect("the slot was given back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_books_two_limits_hold_across_two_instances() {
    // The book's API limits (2/s and 10/min), scaled so that both bind
    // within 3 s: 50/s with a burst of 10, and 100 per 10 s (10/s
    // sustained). Over 3 s the per-second limit alone would admit 160.
    let server = RedisServer::start().await;
    let (a, b) = (
        store(&server, FaultPolicy::FailClosed),
        store(&server, FaultPolicy::FailClosed),
    );
    let per_second = Limit::per_second(50).unwrap().burst(10).unwrap();
    let per_ten = Limit::new(100, Duration::from_secs(10)).unwrap();
    let limits = |s: &RedisStore| {
        [
            s.limiter("api:per-second", per_second).unwrap(),
            s.limiter("api:per-10s", per_ten).unwrap(),
        ]
    };
    let svc_a = layered(&a, &limits(&a), true);
    let svc_b = layered(&b, &limits(&b), true);
    let start = Instant::now();
    let span = Duration::from_secs(3);
    let pace = Duration::from_millis(1);
    let (got_a, got_b) = tokio::join!(
        hammer(svc_a, start, span, pace),
        hammer(svc_b, start, span, pace)
    );
    let mut all: Vec<Duration> = got_a.iter().chain(&got_b).copied().collect();
    all.sort();
    // Counted from the first admission, not from `start`: how long the
    // first round trips took does not move the figures.
    let (first, last) = (all[0], all[all.len() - 1]);
    let within = |t: Duration| all.iter().filter(|&&x| x < first + t).count();
    // First second: the per-second limit binds (10 + 50 × 1 s, one more
    // for the rounding). A late request loses no slot unless neither
    // instance asked for longer than the burst's 200 ms: the lower bound
    // allows a 200 ms stall.
    let first_second = within(Duration::from_secs(1));
    assert!(
        (50..=61).contains(&first_second),
        "{first_second} admitted in the first second"
    );
    // The whole run: the per-10s limit binds (100 + 10/s over the span of
    // admissions), well below the 160 the per-second limit alone would
    // allow over 3 s. Once it binds its slots run 9.8 s ahead of the clock,
    // so lateness loses nothing: the count is exact but for the rounding.
    let span_s = (last - first).as_secs_f64();
    assert!(span_s > 2.5, "the run lasted {span_s:.3} s of admissions");
    let per_ten = 100 + (span_s * 10.0) as usize;
    let total = all.len();
    assert!(
        total + 2 >= per_ten && total <= per_ten + 1,
        "{total} admitted in {span_s:.3} s, the per-10s limit allows {per_ten}"
    );
    assert!(!got_a.is_empty() && !got_b.is_empty());
}

fn claims_of(l: &RedisLimiter) -> Claims<'_, RedisLimiter> {
    let mut c = Claims::new();
    c.push(l, 1);
    c
}

fn retry_after(
    r: Result<atscale_ratelimit::Grant<atscale_ratelimit_redis::RedisReceipt>, Refusal>,
) -> Duration {
    match r {
        Err(Refusal::RetryAfter(d)) => d,
        other => panic!("expected a retry-after, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_give_back_the_tail_and_then_the_run_before_it() {
    let server = RedisServer::start().await;
    let store = store(&server, FaultPolicy::FailClosed);
    let l = store
        .limiter("refunds", Limit::per_second(1).unwrap().burst(2).unwrap())
        .unwrap();
    let c = claims_of(&l);
    let unbounded = Duration::MAX;
    // Every wait below is counted from the first reservation (at Redis's
    // clock, no earlier than `t0`): a wait plus the time elapsed since `t0`
    // is at least what is left of the slot, however slow the machine. The
    // 5 ms allow for Redis's clock and ours.
    let t0 = Instant::now();
    let slack = Duration::from_millis(5);
    let at_least = |wait: Duration, slot: Duration, what: &str| {
        let elapsed = t0.elapsed();
        assert!(
            wait + elapsed + slack >= slot && wait <= slot,
            "{what}: wait {wait:?}, {elapsed:?} after the first reservation, slot at {slot:?}"
        );
    };
    for _ in 0..2 {
        let g = store.acquire_within(&c, unbounded, None).await.unwrap();
        assert_eq!(g.wait(), Duration::ZERO);
    }
    let third = store.acquire_within(&c, unbounded, None).await.unwrap();
    let fourth = store.acquire_within(&c, unbounded, None).await.unwrap();
    at_least(third.wait(), Duration::from_secs(1), "the third");
    at_least(fourth.wait(), Duration::from_secs(2), "the fourth");

    let wait_refunds = async |n: u64| {
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        for _ in 0..600 {
            tick.tick().await;
            if store.stats().refunds >= n {
                return;
            }
        }
        panic!("refund {n} never arrived");
    };
    // The third leaves first: the fourth is behind it, so it stays spent
    // (the next slot is still at 3 s).
    store.refund(third.into_receipt().unwrap());
    wait_refunds(1).await;
    let r = retry_after(store.acquire_within(&c, Duration::ZERO, None).await);
    at_least(r, Duration::from_secs(3), "still held");
    // The fourth leaves: it is the tail, and the third goes back with it
    // (the next slot is at 1 s again).
    store.refund(fourth.into_receipt().unwrap());
    wait_refunds(2).await;
    let r = retry_after(store.acquire_within(&c, Duration::ZERO, None).await);
    at_least(r, Duration::from_secs(1), "both given back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_dropped_in_the_layer_gives_its_reservation_back() {
    let server = RedisServer::start().await;
    let store = store(&server, FaultPolicy::FailClosed);
    let l = store
        .limiter("dropped", Limit::per_second(1).unwrap())
        .unwrap();
    let svc = layered(&store, std::slice::from_ref(&l), false);
    call(&svc).await.unwrap();
    let waiter = tokio::spawn(svc.clone().oneshot(http::Request::new(())));
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    for _ in 0..200 {
        tick.tick().await;
        if store.stats().admitted == 2 {
            break;
        }
    }
    assert_eq!(store.stats().admitted, 2, "the waiter reserved");
    waiter.abort();
    for _ in 0..200 {
        tick.tick().await;
        if store.stats().refunds == 1 {
            break;
        }
    }
    assert_eq!(store.stats().refunds, 1);
    let c = claims_of(&l);
    let r = retry_after(store.acquire_within(&c, Duration::ZERO, None).await);
    assert!(
        r <= Duration::from_secs(1),
        "the second slot is free again: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_check_refuses_obvious_excess_without_a_round_trip() {
    let server = RedisServer::start().await;
    let store = RedisStore::builder(server.url())
        .local_check(true)
        .build()
        .unwrap();
    let l = store
        .limiter("local", Limit::per_minute(5).unwrap())
        .unwrap();
    assert!(l.has_local_check());
    let svc = layered(&store, &[l], true);
    let mut results = Vec::new();
    for _ in 0..20 {
        results.push(call(&svc).await);
    }
    let admitted = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(admitted, 5, "{results:?}");
    let stats = store.stats();
    // Five admissions asked Redis; after the fifth this process knows the
    // bucket is empty for 12 s, so the rest were refused locally.
    assert_eq!(stats.round_trips, 5, "{stats:?}");
    assert_eq!(stats.refused_locally, 15, "{stats:?}");
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        let limited = e
            .downcast_ref::<atscale_core::RateLimited>()
            .expect("RateLimited");
        assert!(limited.retry_after() > Duration::ZERO);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_buckets_per_key_with_quotas_expire_when_idle() {
    let server = RedisServer::start().await;
    let store = store(&server, FaultPolicy::FailClosed);
    let per_tenant = store
        .keyed::<String>("tenant", Limit::per_minute(2).unwrap())
        .unwrap()
        .quota(|t: &String| {
            if t.starts_with("brief-") {
                // refills in 100 ms: its key expires while the test watches
                Limit::per_second(10).unwrap().burst(1).unwrap()
            } else if t.starts_with("paid-") {
                Limit::per_minute(4).unwrap()
            } else {
                Limit::per_minute(2).unwrap()
            }
        });
    let layer = RateLimitBuilder::with_store(store.clone())
        .key_part(per_tenant.by(key_fn(|req: &http::Request<()>| {
            req.headers()
                .get("x-tenant")?
                .to_str()
                .ok()
                .map(str::to_owned)
        })))
        .reject()
        .build()
        .unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|_req: http::Request<()>| async {
            Ok::<_, BoxError>(())
        }));
    let mut count = std::collections::HashMap::new();
    for tenant in ["free", "paid-acme", "brief-visit"] {
        for _ in 0..6 {
            let req = http::Request::builder()
                .header("x-tenant", tenant)
                .body(())
                .unwrap();
            if svc.clone().oneshot(req).await.is_ok() {
                *count.entry(tenant).or_insert(0) += 1;
            }
        }
    }
    assert_eq!(count["free"], 2);
    assert_eq!(count["paid-acme"], 4);
    assert!(count["brief-visit"] >= 1);
    let e = svc
        .clone()
        .oneshot(http::Request::new(()))
        .await
        .unwrap_err();
    assert!(e.is::<atscale_ratelimit::MissingKey>(), "{e}");

    // Each key expires on its own once its bucket is full again: the free
    // tenant's in a minute, the brief visit's within 100 ms.
    let mut conn = server.connection().await;
    let ttl: i64 = conn.pttl("atscale:rl:tenant:free").await.unwrap();
    assert!(ttl > 55_000 && ttl <= 60_001, "PTTL {ttl}");
    let key = "atscale:rl:tenant:brief-visit";
    let ttl: i64 = conn.pttl(key).await.unwrap();
    assert!(ttl <= 101, "PTTL {ttl}");
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for _ in 0..60 {
        tick.tick().await;
        let exists: bool = conn.exists(key).await.unwrap();
        if !exists {
            return;
        }
    }
    panic!("{key} never expired");
}

#[tokio::test]
async fn the_script_is_loaded_again_after_a_script_flush() {
    let server = RedisServer::start().await;
    let store = store(&server, FaultPolicy::FailClosed);
    let svc = layered(
        &store,
        &[store
            .limiter("flush", Limit::per_second(1000).unwrap())
            .unwrap()],
        true,
    );
    call(&svc).await.unwrap();
    let mut conn = server.connection().await;
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    call(&svc).await.unwrap();
    assert_eq!(store.stats().failed_closed, 0);
}

#[tokio::test]
async fn bad_configuration_is_refused_with_a_reason() {
    let err = RedisStore::builder("definitely not a url")
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("URL"), "{err}");
    let err = RedisStore::builder("redis://127.0.0.1:1/")
        .timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("timeout"), "{err}");
    let store = RedisStore::builder("redis://127.0.0.1:1/").build().unwrap();
    let err = store
        .limiter("", Limit::per_second(1).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("name"), "{err}");
    let err = store
        .limiter("fast", Limit::per_second(2_000_000).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("microseconds"), "{err}");
    let l = store.limiter("a", Limit::per_second(3).unwrap()).unwrap();
    assert_eq!(l.interval(), Duration::from_micros(333_334), "rounded up");
    assert_eq!(l.key(), "atscale:rl:a");
    // a fixed cost above a burst, the same bucket twice
    let err = RateLimitBuilder::with_store(store.clone())
        .limiter(l.clone())
        .cost(4)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("exceeds the burst"), "{err}");
    let err = RateLimitBuilder::with_store(store.clone())
        .limiter(l.clone())
        .limiter(store.limiter("a", Limit::per_second(3).unwrap()).unwrap())
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
}

#[test]
fn no_tokio_runtime_is_a_clear_error() {
    let err = RedisStore::builder("redis://127.0.0.1:1/")
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("tokio runtime"), "{err}");
}

#[test]
fn public_types_are_send_sync_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    fn send<T: Send + 'static>() {}
    check::<RedisStore>();
    check::<RedisLimiter>();
    check::<atscale_ratelimit_redis::RedisKeyedLimiter<String>>();
    check::<atscale_ratelimit_redis::ByRedisKey<atscale_ratelimit::PeerIp, std::net::IpAddr>>();
    check::<atscale_ratelimit::RateLimitLayer<atscale_ratelimit::NoKey, u32, RedisStore>>();
    check::<StoreUnavailable>();
    send::<atscale_ratelimit_redis::Acquire>();
    send::<atscale_ratelimit_redis::RedisReceipt>();
}
