//! What the Deadline layer's metrics cost with a real Prometheus recorder,
//! against what one histogram sample costs the exporter itself.
//!
//! `cargo bench --bench deadline_metrics` (needs the `metrics` feature, on
//! in the facade's default). The Prometheus exporter is installed (drained
//! every 100 ms, as in benches/metrics.rs); `atscale::metrics::enable()` is
//! called unless `ATSCALE_BENCH_ENABLE=0`. Interleaved in one process on the
//! current_thread runtime: the bare service, the bare service plus one
//! sample into the histogram the layer records into (through a kept handle:
//! the exporter's own cost for a sample), and `DeadlineLayer::new`. Run it
//! with and without `enable()`, alternately: the Deadline row's difference
//! is what its emission costs, to compare with the sample row.
//!
//! This is its own binary: in benches/deadline.rs, the exporter's code in
//! the same binary made the layer's own figures move (the compiler inlined
//! differently), so the per-layer comparison stays free of it.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use atscale::deadline::DeadlineLayer;
use support::{Job, case, job};
use tower::{Layer, service_fn};

const BUDGET: Duration = Duration::from_secs(30);

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list their tests
    }
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_recommended_naming(true)
        .install_recorder()
        .expect("the only recorder");
    // The exporter's upkeep (draining its summaries) every 100 ms, as a
    // server runs it: a period, not a wait for something to happen.
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(100));
            handle.run_upkeep();
        }
    });
    let enable = std::env::var("ATSCALE_BENCH_ENABLE").as_deref() != Ok("0");
    if enable {
        atscale::metrics::enable();
    }
    // The histogram `DeadlineLayer::new` records into (origin local).
    let sample = metrics::histogram!(atscale::metrics::DEADLINE_REMAINING, "origin" => "local");
    println!(
        "# Deadline with a Prometheus recorder (upkeep every 100 ms), enable() {}",
        if enable { "called" } else { "not called" }
    );
    println!("load average at start (1, 5, 15 min): {}", support::load());
    let (_, rt) = support::runtimes().remove(0);
    let cases = vec![
        case(
            "bare",
            || service_fn(|j: Job| std::future::ready(Ok::<_, Infallible>(j.id))),
            job,
        ),
        case(
            "bare + one histogram sample (kept handle)",
            move || {
                let sample = sample.clone();
                service_fn(move |j: Job| {
                    sample.record(BUDGET.as_secs_f64());
                    std::future::ready(Ok::<_, Infallible>(j.id))
                })
            },
            job,
        ),
        case(
            "atscale Deadline",
            || {
                DeadlineLayer::new(BUDGET).layer(service_fn(|j: Job| {
                    std::future::ready(Ok::<_, Infallible>(j.id))
                }))
            },
            job,
        ),
    ];
    let rows = support::compare(&rt, &cases);
    support::print(
        "current_thread: request carrying a field, inner ready, Prometheus recorder",
        &rows,
    );
    println!("\nload average at the end: {}", support::load());
}
