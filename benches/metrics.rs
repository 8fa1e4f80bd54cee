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

/// The cases, in order (the first is the bare service).
const NAMES: [&str; 7] = [
    "bare",
    "Deadline",
    "RateLimit",
    "Hedge (unarmed: fixed 1 s)",
    "Heartbeat",
    "ErrorEnrich",
    "Overload",
];

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
        case(NAMES[0], inner, request),
        case(
            NAMES[1],
            || DeadlineLayer::server(Duration::from_secs(30)).layer(inner()),
            request,
        ),
        case(
            NAMES[2],
            move || RateLimitLayer::new(limiter.clone()).layer(inner()),
            request,
        ),
        case(
            NAMES[3],
            || HedgeLayer::fixed(Duration::from_secs(1)).layer(inner()),
            request,
        ),
        case(NAMES[4], move || monitor.layer().layer(inner()), request),
        case(
            NAMES[5],
            || ErrorEnrichLayer::new("bench").layer(inner()),
            request,
        ),
        case(NAMES[6], || OverloadLayer::new().layer(inner()), request),
    ];
    // `ATSCALE_BENCH_CASES=ErrorEnrich,Deadline` measures only the cases
    // whose names start with one of these (and the bare service), e.g. under
    // a profiler; the emission costs then run only if `emissions` is named.
    let only_cases = std::env::var("ATSCALE_BENCH_CASES").ok();
    let wanted = |name: &str| {
        only_cases
            .as_deref()
            .is_none_or(|o| o.split(',').any(|w| name.starts_with(w.trim())))
    };
    let cases: Vec<_> = cases
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i == 0 || wanted(NAMES[*i]))
        .map(|(_, c)| c)
        .collect();
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
    if wanted("emissions") {
        emissions(metrics);
    }
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
            "histogram handle kept (as the layers keep theirs): `record` alone",
            {
                let h = ::metrics::histogram!(DEADLINE_REMAINING, "origin" => "kept");
                timed(move |i| h.record(black_box(i) as f64))
            },
        ),
        (
            "a reading of the core clock (TSC through quanta), as ErrorEnrich's durations take two",
            {
                let clock = atscale::core::Clock::quanta();
                timed(move |i| {
                    black_box(clock.now_nanos() ^ i);
                })
            },
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

/// Installs the exporter as a server does, with its upkeep: a thread
/// drains the histograms' sample buckets into their summaries every
/// `ATSCALE_BENCH_UPKEEP_MS` (default 100). A server's exporter does it
/// every 5 s (`upkeep_timeout`) and at each scrape, at a few 10k requests
/// per second per core; this bench records about 4M samples per second on
/// one thread, so it drains 50 times as often to keep about as many samples
/// (a few 100k) between drains. Without upkeep a summary's bucket grows
/// without bound, every sample in fresh memory (100s of MB in a run): a cost
/// no server pays. `ATSCALE_BENCH_UPKEEP_MS=0` runs none (the bench before
/// upkeep was added).
#[cfg(feature = "metrics")]
fn install_prometheus() {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_recommended_naming(true)
        .install_recorder()
        .expect("the only recorder");
    let every: u64 = std::env::var("ATSCALE_BENCH_UPKEEP_MS")
        .ok()
        .map(|v| v.parse().expect("ATSCALE_BENCH_UPKEEP_MS: milliseconds"))
        .unwrap_or(100);
    if every > 0 {
        // The exporter's upkeep on a period, as a server runs it (not a
        // wait for something to happen).
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(every));
                handle.run_upkeep();
            }
        });
    }
    println!(
        "exporter upkeep: {}",
        if every > 0 {
            format!("every {every} ms")
        } else {
            "none".to_owned()
        }
    );
    atscale::metrics::enable();
}

#[cfg(not(feature = "metrics"))]
fn install_prometheus() {
    unreachable!("checked in main");
}
