//! Per-request overhead of `HeartbeatLayer` against the bare service, with
//! no subscriber, with one (draining) subscriber, and with the stall
//! watchdog on (next to `tower::timeout::Timeout`, the nearest tower layer
//! with a per-request timer), interleaved in one run.
//!
//! `cargo bench --bench heartbeat`

mod support;

use std::convert::Infallible;
use std::time::Duration;

use atscale::heartbeat::{Monitor, Outcome, Ticket, Track};
use support::{Job, case, job, pending_once};
use tokio_stream::StreamExt;
use tower::timeout::TimeoutLayer;
use tower::{Layer, Service, service_fn};

const STALL: Duration = Duration::from_secs(30);

/// The cases `HEARTBEAT_QUICK` keeps.
const QUICK: [&str; 3] = ["bare", "heartbeat, no subscriber", "tower Timeout"];

/// A unary reply: the request ends when it arrives.
struct Reply(#[expect(dead_code, reason = "only black-boxed")] u64);

impl Track for Reply {
    type Tracked = Reply;
    fn track(self, ticket: Ticket) -> Reply {
        ticket.finish(Outcome::Ok);
        self
    }
}

fn ready() -> impl Service<Job, Response = Reply, Error = Infallible, Future: Send> + Send {
    service_fn(|j: Job| std::future::ready(Ok::<_, Infallible>(Reply(j.id))))
}

fn pending() -> impl Service<Job, Response = Reply, Error = Infallible, Future: Send> + Send {
    service_fn(|j: Job| pending_once(Ok::<_, Infallible>(Reply(j.id))))
}

macro_rules! cases {
    ($quick:expr, $inner:expr, $quiet:expr, $watched:expr, $watchdog:expr) => {{
        let (quiet, watched, watchdog) = ($quiet.clone(), $watched.clone(), $watchdog.clone());
        let keep = |name: &str| !$quick || QUICK.contains(&name);
        let mut cases = vec![case("bare", || $inner, job)];
        if keep("heartbeat, no subscriber") {
            cases.push(case(
                "heartbeat, no subscriber",
                move || quiet.layer().layer($inner),
                job,
            ));
        }
        if keep("heartbeat, 1 subscriber") {
            cases.push(case(
                "heartbeat, 1 subscriber",
                move || watched.layer().layer($inner),
                job,
            ));
        }
        if keep("heartbeat + stall watchdog") {
            cases.push(case(
                "heartbeat + stall watchdog",
                move || watchdog.layer().layer($inner),
                job,
            ));
        }
        cases.push(case(
            "tower Timeout",
            || TimeoutLayer::new(STALL).layer($inner),
            job,
        ));
        cases
    }};
}

/// The per-repetition ratios of `row`'s overhead to `anchor`'s (both over
/// the bare service of the same repetition): median, quartiles, min, max.
fn ratio_quartiles(rows: &[support::Row], row: &str, anchor: &str) -> (f64, f64, f64, f64, f64) {
    let find = |name: &str| {
        &rows
            .iter()
            .find(|r| r.name == name)
            .expect("a case")
            .samples
    };
    let (bare, r, a) = (&rows[0].samples, find(row), find(anchor));
    let mut ratios: Vec<f64> = (0..bare.len())
        .map(|i| (r[i] - bare[i]) / (a[i] - bare[i]))
        .collect();
    ratios.sort_by(f64::total_cmp);
    let at = |q: f64| ratios[((ratios.len() - 1) as f64 * q).round() as usize];
    (
        at(0.5),
        at(0.25),
        at(0.75),
        ratios[0],
        ratios[ratios.len() - 1],
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list their tests
    }
    println!("# Heartbeat: per-request overhead (stall watchdog {STALL:?})");
    println!("load average at start (1, 5, 15 min): {}", support::load());
    // `HEARTBEAT_QUICK=1`: only the goal's cases (for profiles);
    // `HEARTBEAT_RUNTIME=current_thread` (or `multi_thread`): one runtime.
    let quick = std::env::var_os("HEARTBEAT_QUICK").is_some();
    let only = std::env::var("HEARTBEAT_RUNTIME").unwrap_or_default();
    for (rt_name, rt) in support::runtimes() {
        if !rt_name.starts_with(only.as_str()) {
            continue;
        }
        let quiet = Monitor::new();
        let watched = Monitor::new();
        let watchdog = Monitor::builder().stall(STALL).build();
        // The subscriber drains its pulses on the same runtime, as a watcher would.
        let mut pulses = watched.subscribe();
        let drained = rt.spawn(async move {
            let mut n = 0u64;
            while pulses.next().await.is_some() {
                n += 1;
            }
            (n, pulses.missed())
        });
        let comparisons = [
            (
                "inner ready",
                cases!(quick, ready(), quiet, watched, watchdog),
            ),
            (
                "inner pending once",
                cases!(quick, pending(), quiet, watched, watchdog),
            ),
        ];
        for (what, cases) in comparisons {
            let rows = support::compare(&rt, &cases);
            support::print(&format!("{rt_name}: {what}"), &rows);
            let bare = rows[0].per_call;
            for row in &rows[1..] {
                println!(
                    "- {}: {:.2}x the bare service's time per request",
                    row.name,
                    row.per_call / bare
                );
            }
            for case in ["heartbeat, no subscriber", "heartbeat + stall watchdog"] {
                if quick && !QUICK.contains(&case) {
                    continue;
                }
                let (m, q1, q3, lo, hi) = ratio_quartiles(&rows, case, "tower Timeout");
                println!(
                    "- ratio of overheads, {case} / tower Timeout: {m:.2} (quartiles {q1:.2}..{q3:.2}, range {lo:.2}..{hi:.2})"
                );
            }
        }
        drop((quiet, watched, watchdog));
        let (received, missed) = rt.block_on(drained).unwrap();
        println!(
            "\n{rt_name}: the subscriber received {received} pulses and missed {missed} (never waited for)"
        );
    }
    println!("\nload average at the end: {}", support::load());
}
