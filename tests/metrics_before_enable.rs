//! With the `metrics` feature compiled in and a recorder installed, nothing
//! reaches the recorder until `atscale::metrics::enable()`: no registration,
//! no emission, on the success path and on every error path the stacks
//! have (a deadline passed, a malformed deadline, a rate limit refusal, a
//! dependency that is down). Then `enable()`, the same traffic, and the
//! recorder sees it (so the counting recorder cannot be blind).
//!
//! `enable()` is process-wide: this binary holds one test only.

mod loopback;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use atscale::ratelimit::{Limit, Limiter, RateLimitLayer};
use atscale::stack;
use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::Empty;
use loopback::{bounded, closed_port, http_client, serve_router};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use tower::{Layer, ServiceExt};

/// Counts every registration and every update it is given.
#[derive(Debug, Default)]
struct Counting {
    registered: AtomicU64,
    updates: Arc<AtomicU64>,
}

#[derive(Debug)]
struct Update(Arc<AtomicU64>);

impl Update {
    fn count(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

impl CounterFn for Update {
    fn increment(&self, _: u64) {
        self.count();
    }
    fn absolute(&self, _: u64) {
        self.count();
    }
}

impl GaugeFn for Update {
    fn increment(&self, _: f64) {
        self.count();
    }
    fn decrement(&self, _: f64) {
        self.count();
    }
    fn set(&self, _: f64) {
        self.count();
    }
}

impl HistogramFn for Update {
    fn record(&self, _: f64) {
        self.count();
    }
}

impl Recorder for &'static Counting {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {
        self.registered.fetch_add(1, Ordering::Relaxed);
    }
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {
        self.registered.fetch_add(1, Ordering::Relaxed);
    }
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {
        self.registered.fetch_add(1, Ordering::Relaxed);
    }
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        self.registered.fetch_add(1, Ordering::Relaxed);
        Counter::from_arc(Arc::new(Update(self.updates.clone())))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        self.registered.fetch_add(1, Ordering::Relaxed);
        Gauge::from_arc(Arc::new(Update(self.updates.clone())))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        self.registered.fetch_add(1, Ordering::Relaxed);
        Histogram::from_arc(Arc::new(Update(self.updates.clone())))
    }
}

/// A backend behind the server stack: one fast route, one slower than any
/// deadline this test sends, a rate limit of 3 requests.
async fn backend() -> SocketAddr {
    let limiter = Limiter::new(Limit::per_hour(1).unwrap().burst(3).unwrap());
    let server = stack::server("backend", Duration::from_secs(10))
        .with_rate_limit(RateLimitLayer::reject(limiter));
    let app = Router::new()
        .route("/work", get(|| async { "done" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "too late"
            }),
        )
        .layer(server);
    serve_router(app).await
}

/// Sends the traffic: through the client stack to `addr` (successes and a
/// passed deadline), one malformed deadline straight to it, enough calls to
/// be rate limited, and one call to a dependency that is down. Returns the
/// statuses and client error kinds seen, to check the traffic itself.
async fn traffic(addr: SocketAddr, down: SocketAddr) -> Vec<String> {
    let client = stack::http_client("caller", Duration::from_secs(5))
        .with_dependency("backend")
        .layer(http_client::<Empty<Bytes>>());
    let mut seen = Vec::new();
    let call = |path: String, deadline: &'static str| {
        let client = client.clone();
        async move {
            let req = http::Request::get(path)
                .header("x-deadline-ms", deadline)
                .body(Empty::<Bytes>::new())
                .unwrap();
            match bounded("a call", client.oneshot(req)).await {
                Ok(res) => res.status().as_u16().to_string(),
                Err(err) => format!("{:?}", err.kind()),
            }
        }
    };
    seen.push(call(format!("http://{addr}/work"), "5000").await);
    seen.push(call(format!("http://{addr}/slow"), "50").await);
    let malformed = http::Request::get(format!("http://{addr}/work"))
        .header("x-deadline-ms", "soon")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = bounded("the malformed call", http_client().request(malformed))
        .await
        .unwrap();
    seen.push(res.status().as_u16().to_string());
    seen.push(call(format!("http://{addr}/work"), "5000").await);
    seen.push(call(format!("http://{addr}/work"), "5000").await);
    seen.push(call(format!("http://{down}/work"), "5000").await);
    seen
}

#[tokio::test]
async fn nothing_reaches_a_recorder_before_enable() {
    let counting: &'static Counting = Box::leak(Box::default());
    metrics::set_global_recorder(counting).expect("the only recorder of this binary");

    let addr = backend().await;
    let down = closed_port().await;
    let seen = traffic(addr, down).await;
    // The rate limit's burst of 3 holds /work, /slow and the second /work;
    // the third /work is refused (the malformed one never reaches it).
    assert_eq!(
        seen,
        [
            "200",
            "DeadlineExceeded",
            "400",
            "200",
            "RateLimited",
            "Unreachable"
        ],
        "the traffic itself"
    );
    assert_eq!(
        counting.registered.load(Ordering::Relaxed),
        0,
        "metrics registered before enable()"
    );
    assert_eq!(
        counting.updates.load(Ordering::Relaxed),
        0,
        "metrics emitted before enable()"
    );

    atscale::metrics::enable();
    let again = backend().await;
    traffic(again, down).await;
    assert!(
        counting.registered.load(Ordering::Relaxed) > 0,
        "enable() must let registrations through"
    );
    assert!(
        counting.updates.load(Ordering::Relaxed) >= seen.len() as u64,
        "enable() must let every request's emissions through"
    );
}
