//! Per-call overhead of `DeadlineLayer` against `tower::timeout::Timeout`
//! around the same trivial service, interleaved in one run.
//!
//! `cargo bench --bench deadline`

mod support;

use std::convert::Infallible;
use std::time::Duration;

use atscale::deadline::DeadlineLayer;
use support::{Job, case, job, pending_once};
use tower::timeout::TimeoutLayer;
use tower::{Layer, Service, service_fn};

const BUDGET: Duration = Duration::from_secs(30);

fn http_request(id: u64) -> http::Request<u64> {
    http::Request::new(id)
}

/// A request whose extensions already hold something, as every request
/// does by the time a router's layers see it (axum's `MatchedPath`): the
/// context goes into an existing map instead of creating one.
fn http_request_with_extensions(id: u64) -> http::Request<u64> {
    let mut req = http::Request::new(id);
    req.extensions_mut().insert(MatchedRoute("/orders/{id}"));
    req
}

#[derive(Clone)]
struct MatchedRoute(#[expect(dead_code, reason = "only carried")] &'static str);

fn job_ready() -> impl Service<Job, Response = u64, Error = Infallible, Future: Send> + Send {
    service_fn(|j: Job| std::future::ready(Ok::<_, Infallible>(j.id)))
}

fn job_pending() -> impl Service<Job, Response = u64, Error = Infallible, Future: Send> + Send {
    service_fn(|j: Job| pending_once(Ok::<_, Infallible>(j.id)))
}

fn http_ready()
-> impl Service<http::Request<u64>, Response = u64, Error = Infallible, Future: Send> + Send {
    service_fn(|r: http::Request<u64>| std::future::ready(Ok::<_, Infallible>(*r.body())))
}

fn http_pending()
-> impl Service<http::Request<u64>, Response = u64, Error = Infallible, Future: Send> + Send {
    service_fn(|r: http::Request<u64>| pending_once(Ok::<_, Infallible>(*r.body())))
}

macro_rules! cases {
    ($inner:expr, $req:expr) => {
        vec![
            case("bare", || $inner, $req),
            case(
                "tower Timeout",
                || TimeoutLayer::new(BUDGET).layer($inner),
                $req,
            ),
            case(
                "atscale Deadline",
                || DeadlineLayer::new(BUDGET).layer($inner),
                $req,
            ),
        ]
    };
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list their tests
    }
    println!("# Deadline: per-call overhead (budget {BUDGET:?})");
    println!("load average at start (1, 5, 15 min): {}", support::load());
    for (rt_name, rt) in support::runtimes() {
        let comparisons = [
            (
                "request carrying a field, inner ready",
                cases!(job_ready(), job),
            ),
            (
                "request carrying a field, inner pending once",
                cases!(job_pending(), job),
            ),
            (
                "http::Request (context in extensions), inner ready",
                cases!(http_ready(), http_request),
            ),
            (
                "http::Request (context in extensions), inner pending once",
                cases!(http_pending(), http_request),
            ),
            (
                "http::Request with an extension already (as after a router), inner ready",
                cases!(http_ready(), http_request_with_extensions),
            ),
        ];
        for (what, cases) in comparisons {
            let rows = support::compare(&rt, &cases);
            support::print(&format!("{rt_name}: {what}"), &rows);
            let (m, lo, hi) = support::ratio(&rows, "atscale Deadline", "tower Timeout");
            println!(
                "\nratio of overheads, atscale Deadline / tower Timeout: {m:.2} ({lo:.2}..{hi:.2})"
            );
        }
    }
    println!("\nload average at the end: {}", support::load());
}
