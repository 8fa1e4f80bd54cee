//! Three hops on loopback, every hop with the recommended stack: a gateway
//! (axum) calls service A (tonic, tonic-health behind a layer that first
//! calls B) which calls service B (tonic, tonic-health, two replicas, one of
//! them slow: it never answers).
//!
//! ```text
//! test client ──HTTP, x-deadline-ms──▶ gateway ──gRPC──▶ A ──gRPC, hedged──▶ B-slow
//!                                       (axum)          (tonic)          └──▶ B-fast
//! ```
//!
//! Real clock, deadlines with room for a machine three times slower than
//! this one, and awaited signals (monitors, channels) instead of sleeps,
//! each awaited with a bound ([`bounded`]) so a regression fails the test
//! instead of hanging CI. The test runtime is current-thread, so the log
//! capture sees the log lines of every hop.

#[path = "../crates/atscale-error/tests/support/mod.rs"]
mod support;

mod loopback;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use atscale::core::{BoxError, Context, Origin};
use atscale::heartbeat::Monitor;
use atscale::hedge::{Budget, Delay, HedgeLayer, HedgeStats};
use atscale::ratelimit::{Limit, Limiter, RateLimitLayer};
use atscale::stack::{self, ClientStack, DEADLINE_HEADER};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use loopback::{channel, serve_health};
use serde_json::Value;
use support::{DbError, Logs, SECRET, capture_logs};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::body::Body as GrpcBody;
use tonic::service::Routes;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::layer::layer_fn;
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};

/// The header (gRPC metadata on the inner hops) that tells B how to behave:
/// `hang` never answers (only a deadline ends it), `fail` fails with an
/// internal error holding a secret.
const MODE: &str = "x-mode";

/// B's own budget: shorter than the long budget the gateway's caller sets
/// here, so a hanging B is ended by B's deadline, not by an outer one.
const B_BUDGET: Duration = Duration::from_millis(1_000);

/// The budgets the test client gives the gateway in `x-deadline-ms`: one
/// shorter than B's own, one longer. The short one must cover three hops
/// and a 50 ms hedge (about 60 ms here): 800 ms keeps that on a machine
/// many times slower.
const SHORT_MS: u64 = 800;
const LONG_MS: u64 = 5_000;

/// The longest any awaited signal may take before the test fails: far
/// above any budget here, far below CI's own timeout.
const BOUND: Duration = Duration::from_secs(30);

/// Awaits `fut`, failing the test with `what` if it takes longer than
/// [`BOUND`].
async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(BOUND, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: not within {BOUND:?}"),
    }
}

/// What each hop saw: its name and the deadline left when its handler ran.
type Seen = mpsc::UnboundedSender<(&'static str, Duration, Origin)>;

/// The deadline left for the request being served, and where it came from.
fn remaining() -> (Duration, Origin) {
    let deadline = Context::current()
        .and_then(|cx| cx.deadline())
        .expect("every hop runs its handler under a deadline");
    (deadline.remaining(), deadline.origin())
}

/// A B replica: tonic-health behind the recommended stack, and inside it a
/// layer that reports the deadline it sees and hangs or fails on demand
/// (and always hangs when `slow`).
async fn service_b(name: &'static str, slow: bool, seen: Seen) -> (SocketAddr, Monitor) {
    let stack = stack::server("b", B_BUDGET);
    let monitor = stack.monitor().clone();
    let behave = layer_fn(move |inner: Routes| {
        let seen = seen.clone();
        service_fn(move |req: http::Request<GrpcBody>| {
            let inner = inner.clone();
            let (left, origin) = remaining();
            let _ = seen.send((name, left, origin));
            let mode = req.headers().get(MODE).cloned();
            async move {
                if slow || mode.as_ref().is_some_and(|m| m == "hang") {
                    std::future::pending::<()>().await;
                }
                if mode.as_ref().is_some_and(|m| m == "fail") {
                    return Err(BoxError::from(DbError));
                }
                inner
                    .oneshot(req)
                    .await
                    .map_err(|e: Infallible| -> BoxError { match e {} })
            }
        })
    });
    let addr = serve_health(ServiceBuilder::new().layer(stack).layer(behave)).await;
    (addr, monitor)
}

/// Every hop's monitors and counters, for the assertions.
struct Hops {
    gateway: SocketAddr,
    gateway_server: Monitor,
    gateway_client: Monitor,
    a_server: Monitor,
    a_client: Monitor,
    b_fast: Monitor,
    b_slow: Monitor,
    hedges: HedgeStats,
    seen: mpsc::UnboundedReceiver<(&'static str, Duration, Origin)>,
}

/// Starts B (two replicas, the first one slow), A (allowing `a_limit` calls
/// a minute) and the gateway.
async fn start(a_limit: u32) -> Hops {
    let (seen, seen_rx) = mpsc::unbounded_channel();

    let (b_slow_addr, b_slow) = service_b("b-slow", true, seen.clone()).await;
    let (b_fast_addr, b_fast) = service_b("b-fast", false, seen.clone()).await;

    // A: its client stack hedges across B's replicas after 50 ms.
    let to_b = ClientStack::new("a", Duration::from_secs(5)).with_hedge(
        HedgeLayer::builder()
            .delay(Delay::fixed(Duration::from_millis(50)))
            .budget(Budget::unlimited())
            .non_idempotent(true) // Health/Check is safe to repeat
            .build()
            .unwrap(),
    );
    let a_client = to_b.monitor().clone();
    let hedges = to_b.hedge_stats();
    let b = HealthClient::new(
        to_b.replicas(vec![channel(b_slow_addr).await, channel(b_fast_addr).await])
            .unwrap(),
    );
    let a_stack = stack::server("a", Duration::from_secs(10)).with_rate_limit(
        RateLimitLayer::reject(Limiter::new(Limit::per_minute(a_limit).unwrap())),
    );
    let a_server = a_stack.monitor().clone();
    let a_seen = seen.clone();
    let call_b = layer_fn(move |inner: Routes| {
        let b = b.clone();
        let seen = a_seen.clone();
        service_fn(move |req: http::Request<GrpcBody>| {
            let inner = inner.clone();
            let mut b = b.clone();
            let (left, origin) = remaining();
            let _ = seen.send(("a", left, origin));
            let mut call = tonic::Request::new(HealthCheckRequest::default());
            if let Some(mode) = req.headers().get(MODE) {
                let mode = mode.to_str().unwrap().parse().unwrap();
                call.metadata_mut().insert(MODE, mode);
            }
            async move {
                // No deadline plumbing: the client stack inherits A's.
                b.check(call).await.map_err(BoxError::from)?;
                inner
                    .oneshot(req)
                    .await
                    .map_err(|e: Infallible| -> BoxError { match e {} })
            }
        })
    });
    let a_addr = serve_health(ServiceBuilder::new().layer(a_stack).layer(call_b)).await;

    // The gateway: an axum route whose handler calls A and may fail; the
    // stack around it answers failures as problem+json.
    let to_a = stack::client("gateway", Duration::from_secs(5));
    let gateway_client = to_a.monitor().clone();
    let a = HealthClient::new(to_a.layer(channel(a_addr).await));
    let gateway_stack = stack::server("gateway", Duration::from_secs(10));
    let gateway_server = gateway_stack.monitor().clone();
    let handler = service_fn(move |req: http::Request<axum::body::Body>| {
        let mut a = a.clone();
        let seen = seen.clone();
        async move {
            let (left, origin) = remaining();
            let _ = seen.send(("gateway", left, origin));
            let mut call = tonic::Request::new(HealthCheckRequest::default());
            if let Some(mode) = req.headers().get(MODE) {
                call.metadata_mut()
                    .insert(MODE, mode.to_str().unwrap().parse().unwrap());
            }
            let status = a.check(call).await?.into_inner().status;
            Ok::<_, BoxError>(http::Response::new(axum::body::Body::from(format!(
                "status {status}"
            ))))
        }
    });
    let app = Router::new().route_service("/check", gateway_stack.layer(handler));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    Hops {
        gateway,
        gateway_server,
        gateway_client,
        a_server,
        a_client,
        b_fast,
        b_slow,
        hedges,
        seen: seen_rx,
    }
}

struct Answer {
    status: http::StatusCode,
    headers: http::HeaderMap,
    body: String,
}

impl Answer {
    fn problem(&self) -> Value {
        assert_eq!(
            self.headers["content-type"], "application/problem+json",
            "{}",
            self.body
        );
        serde_json::from_str(&self.body).unwrap()
    }
}

/// GET /check on the gateway with the caller's budget and B's mode.
async fn get(hops: &Hops, budget_ms: u64, mode: Option<&str>) -> Answer {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::get(format!("http://{}/check", hops.gateway))
        .header(DEADLINE_HEADER, budget_ms.to_string());
    if let Some(mode) = mode {
        req = req.header(MODE, mode);
    }
    let res = bounded(
        "the gateway's answer",
        client.request(req.body(Empty::new()).unwrap()),
    )
    .await
    .unwrap();
    let (parts, body) = res.into_parts();
    let body = bounded("the gateway's body", body.collect())
        .await
        .unwrap()
        .to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

/// What the hops saw, in order, until `n` reports.
async fn seen(hops: &mut Hops, n: usize) -> Vec<(&'static str, Duration, Origin)> {
    let mut out = Vec::new();
    while out.len() < n {
        let report = bounded("a hop's report", hops.seen.recv()).await;
        out.push(report.expect("the hops hold the sender"));
    }
    out
}

/// The one log line of error `id` (from any hop), and the field `name`.
fn logged(logs: &Logs, id: &str, name: &str) -> String {
    logs.by_id(id).field(name).unwrap_or_default().to_owned()
}

/// The first 32-hex-digit error id in `text` after `after`.
fn id_after(text: &str, after: &str) -> String {
    let start = text
        .find(after)
        .unwrap_or_else(|| panic!("{after:?} in {text}"))
        + after.len();
    text[start..]
        .split(|c: char| !c.is_ascii_hexdigit())
        .find(|w| w.len() == 32)
        .unwrap_or_else(|| panic!("an error id after {after:?} in {text}"))
        .to_owned()
}

/// What must never reach the gateway's caller: inner error text, other
/// services' names and ids, addresses, secrets.
fn assert_nothing_internal(answer: &Answer, inner_ids: &[&str]) {
    for leak in [
        SECRET,
        "postgres",
        "127.0.0.1",
        "answered",
        "b-fast",
        "b-slow",
        "grpc",
        "Status",
        "(budget",
    ] {
        assert!(
            !answer.body.contains(leak),
            "{leak:?} leaked: {}",
            answer.body
        );
    }
    for id in inner_ids {
        assert!(!answer.body.contains(id), "an inner error id leaked");
    }
}

#[tokio::test]
async fn the_deadline_is_inherited_hop_by_hop_and_an_expiry_at_b_is_a_504_at_the_gateway() {
    let (logs, _guard) = capture_logs();
    let mut hops = bounded("starting the hops", start(10)).await;

    // A call that succeeds: every hop inherits the caller's deadline (250 ms,
    // shorter than B's own budget), with less and less of it left.
    let ok = get(&hops, SHORT_MS, None).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.body, "status 1"); // SERVING
    // The first B replica to see the call reports third.
    let order = seen(&mut hops, 3).await;
    let [
        ("gateway", at_gateway, gateway_origin),
        ("a", at_a, a_origin),
        (_b, at_b, b_origin),
    ] = order[..]
    else {
        panic!("{order:?}")
    };
    assert_eq!(gateway_origin, Origin::Header);
    assert_eq!(
        (a_origin, b_origin),
        (Origin::GrpcTimeout, Origin::GrpcTimeout)
    );
    let caller = Duration::from_millis(SHORT_MS);
    assert!(
        at_gateway <= caller && at_gateway > caller / 2,
        "{at_gateway:?}"
    );
    assert!(at_a < at_gateway, "{at_a:?} !< {at_gateway:?}");
    assert!(at_b < at_a, "{at_b:?} !< {at_a:?}");

    // B never answers: B's deadline fires, and the gateway answers 504.
    let started = tokio::time::Instant::now();
    let expired = get(&hops, LONG_MS, Some("hang")).await;
    assert!(started.elapsed() >= B_BUDGET);
    assert!(
        started.elapsed() < Duration::from_millis(LONG_MS),
        "B's deadline ended it, not the caller's"
    );
    assert_eq!(expired.status, 504, "{}", expired.body);
    let problem = expired.problem();
    assert_eq!(problem["code"], "deadline_exceeded");
    assert_eq!(problem["service"], "gateway");
    // The deadline that fired was a service's own budget, not the caller's.
    assert_eq!(problem["deadline_origin"], "local");
    assert_eq!(
        problem["detail"],
        "The request did not finish within the service's time budget."
    );

    // Where it fired, by following the error ids through the logs: the
    // gateway's line names A's error, A's line names B's, and B's line says
    // its deadline layer fired.
    let gateway_id = problem["error_id"].as_str().unwrap().to_owned();
    let gateway_chain = logged(&logs, &gateway_id, "chain");
    assert!(
        gateway_chain.contains("a answered DeadlineExceeded"),
        "{gateway_chain}"
    );
    let a_id = id_after(&gateway_chain, "a answered DeadlineExceeded");
    let a_chain = logged(&logs, &a_id, "chain");
    assert_eq!(logged(&logs, &a_id, "service"), "a");
    assert!(
        a_chain.contains("b answered DeadlineExceeded from its deadline layer"),
        "{a_chain}"
    );
    let b_id = id_after(
        &a_chain,
        "b answered DeadlineExceeded from its deadline layer",
    );
    assert_eq!(logged(&logs, &b_id, "service"), "b");
    assert_eq!(logged(&logs, &b_id, "layer"), "deadline");
    assert_eq!(logged(&logs, &b_id, "deadline_origin"), "local");
    assert!(logged(&logs, &b_id, "chain").contains(&format!("(budget {B_BUDGET:?}, local)")));
    assert_nothing_internal(&expired, &[&a_id, &b_id]);
}

#[tokio::test]
async fn the_rate_limit_at_a_is_a_429_with_retry_after_at_the_gateway() {
    let (logs, _guard) = capture_logs();
    let hops = bounded("starting the hops", start(2)).await;
    for _ in 0..2 {
        let ok = get(&hops, LONG_MS, None).await;
        assert_eq!(ok.status, 200, "{}", ok.body);
    }
    let limited = get(&hops, LONG_MS, None).await;
    assert_eq!(limited.status, 429, "{}", limited.body);
    // Two a minute: the next one is 30 s away.
    let retry_after: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    let problem = limited.problem();
    assert_eq!(problem["code"], "rate_limited");
    assert_eq!(problem["retry_after"], retry_after);

    let gateway_chain = logged(&logs, problem["error_id"].as_str().unwrap(), "chain");
    let a_id = id_after(
        &gateway_chain,
        "a answered ResourceExhausted from its ratelimit layer",
    );
    assert_eq!(logged(&logs, &a_id, "layer"), "ratelimit");
    // A refused before calling B: B saw only the two calls that passed.
    bounded("A finishing 3 calls", hops.a_server.wait_finished(3)).await;
    let counts = hops.a_server.counts();
    assert_eq!((counts.refused(), counts.error()), (1, 0));
    assert_eq!(hops.b_fast.counts().ok(), 2);
    assert_nothing_internal(&limited, &[&a_id]);
}

#[tokio::test]
async fn hedging_at_a_answers_from_the_fast_replica_while_the_slow_one_is_pending() {
    let _logs = capture_logs();
    let hops = bounded("starting the hops", start(10)).await;
    // Replicas take first attempts in turn, so of two calls one starts on
    // the slow replica (which never answers) and is answered by the hedge.
    for _ in 0..2 {
        let started = tokio::time::Instant::now();
        let ok = get(&hops, LONG_MS, None).await;
        assert_eq!(ok.status, 200, "{}", ok.body);
        assert!(started.elapsed() < B_BUDGET, "no deadline was waited for");
    }
    // One hedge, and it won (a loaded machine may hedge the other call too,
    // to the slow replica, and that one loses).
    assert!(hops.hedges.hedges_won() == 1, "{:?}", hops.hedges);
    // The answers came while the slow replica still had its call: it
    // started one and answered none; the fast one answered both.
    assert!(hops.b_slow.counts().started() >= 1);
    assert_eq!(hops.b_slow.counts().ok(), 0);
    assert_eq!(hops.b_fast.counts().ok(), 2);
    // The losing attempts are then cancelled, and the slow replica sees it.
    bounded(
        "the slow replica seeing its calls cancelled",
        hops.b_slow
            .wait_for(|c| c.cancelled() >= 1 && c.cancelled() == c.started()),
    )
    .await;
}

#[tokio::test]
async fn the_heartbeat_monitors_see_every_hops_work() {
    let _logs = capture_logs();
    let hops = bounded("starting the hops", start(10)).await;
    // The slow replica's call is started before the gateway answers (the
    // hedge fires only after it), and it never answers.
    let first = get(&hops, LONG_MS, None).await;
    assert_eq!(first.status, 200);
    let second = get(&hops, LONG_MS, None).await;
    assert_eq!(second.status, 200);

    // Every hop, server side and client side, reports both calls.
    bounded(
        "the gateway server finishing 2",
        hops.gateway_server.wait_finished(2),
    )
    .await;
    bounded(
        "the gateway client finishing 2",
        hops.gateway_client.wait_finished(2),
    )
    .await;
    bounded("A's server finishing 2", hops.a_server.wait_finished(2)).await;
    // A's client reports each attempt: two calls plus one hedge, the
    // hedge's loser cancelled.
    bounded(
        "A's client: 2 ok and the hedge's loser cancelled",
        hops.a_client
            .wait_for(|c| c.ok() == 2 && c.cancelled() >= 1 && c.finished() == c.started()),
    )
    .await;
    bounded("the fast replica finishing 2", hops.b_fast.wait_finished(2)).await;
    bounded(
        "the slow replica seeing its calls cancelled",
        hops.b_slow
            .wait_for(|c| c.cancelled() >= 1 && c.cancelled() == c.started()),
    )
    .await;
    for monitor in [
        &hops.gateway_server,
        &hops.gateway_client,
        &hops.a_server,
        &hops.b_fast,
    ] {
        assert_eq!(monitor.counts().ok(), 2, "{:?}", monitor.counts());
        assert_eq!(monitor.in_flight(), 0);
    }
}

#[tokio::test]
async fn an_internal_failure_at_b_leaks_nothing_and_every_error_id_is_logged() {
    let (logs, _guard) = capture_logs();
    let hops = bounded("starting the hops", start(10)).await;
    let failed = get(&hops, LONG_MS, Some("fail")).await;
    // B's bug is an upstream failure for everyone above it.
    assert_eq!(failed.status, 502, "{}", failed.body);
    let problem = failed.problem();
    assert_eq!(problem["code"], "upstream");

    let gateway_id = problem["error_id"].as_str().unwrap();
    let gateway_chain = logged(&logs, gateway_id, "chain");
    let a_id = id_after(&gateway_chain, "a answered Unavailable");
    let a_chain = logged(&logs, &a_id, "chain");
    let b_id = id_after(&a_chain, "b answered Internal");
    // The secret is in B's log line, and nowhere else.
    assert!(logged(&logs, &b_id, "chain").contains(SECRET));
    assert!(!gateway_chain.contains(SECRET) && !a_chain.contains(SECRET));
    assert_eq!(logged(&logs, &b_id, "kind"), "internal");
    assert_nothing_internal(&failed, &[&a_id, &b_id]);

    // Every error the hops enriched is logged once with its id, B's and
    // A's and the gateway's among them (client-side enrichments too).
    let ids: Vec<String> = logs
        .enrich_lines()
        .iter()
        .filter_map(|l| l.field("id").map(str::to_owned))
        .collect();
    for id in [gateway_id, &a_id, &b_id] {
        assert_eq!(ids.iter().filter(|i| *i == id).count(), 1, "{id}");
    }
    bounded(
        "the gateway server finishing 1",
        hops.gateway_server.wait_finished(1),
    )
    .await;
    assert_eq!(hops.gateway_server.counts().error(), 1);
}
