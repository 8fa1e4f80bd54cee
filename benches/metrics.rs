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
//! On a loaded machine, run the builds alternately many times and pair
//! adjacent runs (benches/README.md). Every request is the happy path (nothing refused, nothing late), which
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
    // `ATSCALE_BENCH_RUNTIME=current_thread` (or `multi_thread`) measures one runtime only.
    let only = std::env::var("ATSCALE_BENCH_RUNTIME").ok();
    for (rt_name, rt) in support::runtimes() {
        if only.as_deref().is_some_and(|o| !rt_name.starts_with(o)) {
            continue;
        }
        let rows = support::compare(&rt, &cases);
        support::print(&format!("{rt_name}, metrics {metrics}"), &rows);
    }
    #[cfg(feature = "metrics")]
    emissions(metrics);
    println!("\nload average at the end: {}", support::load());
}

/// One emission of each kind the layers make per request, on this thread,
/// against an empty loop, interleaved: what an emission costs with the
/// recorder of this run (none, or Prometheus), independent of the layers.
#[cfg(feature = "metrics")]
fn emissions(metrics: &str) {
    use std::hint::black_box;
    use std::time::Instant;

    use atscale::metrics::{DEADLINE_REMAINING, RATELIMIT_ADMITTED, field};

    fn timed(mut f: impl FnMut(u64) + 'static) -> support::Run<'static> {
        Box::new(move |iters| {
            let start = Instant::now();
            for i in 0..iters {
                f(black_box(i));
            }
            start.elapsed()
        })
    }
    let mut cases: Vec<(&str, support::Run<'_>)> = vec![
        (
            "empty loop",
            timed(|i| {
                black_box(i);
            }),
        ),
        (
            "counter, no labels (rate limit: admitted), straight to the facade",
            timed(|i| ::metrics::counter!(RATELIMIT_ADMITTED).increment(black_box(i) & 1)),
        ),
        (
            "the same counter as the layers emit it (behind `enabled()`)",
            timed(|i| {
                if atscale::metrics::enabled() {
                    ::metrics::counter!(RATELIMIT_ADMITTED).increment(black_box(i) & 1);
                }
            }),
        ),
        (
            "histogram, static label (deadline: remaining)",
            timed(|i| {
                ::metrics::histogram!(DEADLINE_REMAINING, "origin" => "header")
                    .record(black_box(i) as f64)
            }),
        ),
        (
            "span field on the current span (no request span open)",
            timed(|i| {
                tracing::Span::current().record(field::RATELIMIT_OUTCOME, black_box(i));
            }),
        ),
    ];
    let samples = support::interleave(&mut cases);
    println!("\n### Cost of one emission, metrics {metrics} (current thread)\n");
    println!("| emission | ns (median, min..max), minus the empty loop |");
    println!("| --- | --- |");
    for (i, (name, _)) in cases.iter().enumerate().skip(1) {
        let d: Vec<f64> = (0..samples[0].len())
            .map(|r| samples[i][r] - samples[0][r])
            .collect();
        let (lo, hi) = support::range(&d);
        println!(
            "| {name} | {:+.1} ({lo:+.1}..{hi:+.1}) |",
            support::median(d.clone())
        );
    }
}

#[cfg(feature = "metrics")]
fn install_prometheus() {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_recommended_naming(true)
        .install_recorder()
        .expect("the only recorder");
    atscale::metrics::enable();
}

#[cfg(not(feature = "metrics"))]
fn install_prometheus() {
    unreachable!("checked in main");
}
