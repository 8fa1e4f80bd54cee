//! What the metrics cost per request, per layer: each layer's overhead over
//! the bare service, interleaved with it in one run (benches/support).
//!
//! The `metrics` feature is chosen at compile time, so "off" and "on" are two
//! builds of this bench; run them alternately and compare each layer's
//! overhead (benches/README.md, "Metrics", has the commands):
//!
//! - off: `cargo bench --bench metrics --no-default-features --features deadline,ratelimit,hedge,heartbeat,error,overload`
//! - on, no recorder installed: `cargo bench --bench metrics`
//! - on, with a Prometheus recorder: `ATSCALE_BENCH_RECORDER=prometheus cargo bench --bench metrics`
//!
//! Every request is the happy path (nothing refused, nothing late), which
//! is where the per-request cost is paid.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use atscale::deadline::DeadlineLayer;
use atscale::error::ErrorEnrichLayer;
use atscale::heartbeat::Monitor;
use atscale::hedge::HedgeLayer;
use atscale::overload::OverloadLayer;
use atscale::ratelimit::{Limit, Limiter, RateLimitLayer};
use bytes::Bytes;
use http_body_util::Empty;
use support::case;
use tower::{Layer, Service, service_fn};

type Req = http::Request<Empty<Bytes>>;

fn request(_: u64) -> Req {
    http::Request::new(Empty::new())
}

fn inner()
-> impl Service<Req, Response = http::Response<Empty<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ Sync {
    service_fn(|_: Req| std::future::ready(Ok::<_, Infallible>(http::Response::new(Empty::new()))))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list their tests
    }
    let recorder = std::env::var("ATSCALE_BENCH_RECORDER").ok();
    let metrics = if cfg!(feature = "metrics") {
        match recorder.as_deref() {
            Some("prometheus") => {
                install_prometheus();
                "on, Prometheus recorder installed"
            }
            Some(other) => panic!("ATSCALE_BENCH_RECORDER={other}: only `prometheus` is known"),
            None => "on, no recorder installed",
        }
    } else {
        assert!(recorder.is_none(), "a recorder needs the metrics feature");
        "off (not compiled in)"
    };
    println!("# Metrics: per-layer overhead, metrics {metrics}");
    println!("load average at start (1, 5, 15 min): {}", support::load());

    let limiter = Limiter::new(Limit::per_second(1_000_000_000).unwrap());
    let monitor = Monitor::new();
    let cases = vec![
        case("bare", inner, request),
        case(
            "Deadline",
            || DeadlineLayer::server(Duration::from_secs(30)).layer(inner()),
            request,
        ),
        case(
            "RateLimit",
            move || RateLimitLayer::new(limiter.clone()).layer(inner()),
            request,
        ),
        case(
            "Hedge (unarmed: fixed 1 s)",
            || HedgeLayer::fixed(Duration::from_secs(1)).layer(inner()),
            request,
        ),
        case("Heartbeat", move || monitor.layer().layer(inner()), request),
        case(
            "ErrorEnrich",
            || ErrorEnrichLayer::new("bench").layer(inner()),
            request,
        ),
        case("Overload", || OverloadLayer::new().layer(inner()), request),
    ];
    for (rt_name, rt) in support::runtimes() {
        let rows = support::compare(&rt, &cases);
        support::print(&format!("{rt_name}, metrics {metrics}"), &rows);
    }
    println!("\nload average at the end: {}", support::load());
}

#[cfg(feature = "metrics")]
fn install_prometheus() {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_recommended_naming(true)
        .install_recorder()
        .expect("the only recorder");
    atscale::metrics::describe();
}

#[cfg(not(feature = "metrics"))]
fn install_prometheus() {
    unreachable!("checked in main");
}
