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
    ($inner:expr, $quiet:expr, $watched:expr, $watchdog:expr) => {{
        let (quiet, watched, watchdog) = ($quiet.clone(), $watched.clone(), $watchdog.clone());
        vec![
            case("bare", || $inner, job),
            case(
                "heartbeat, no subscriber",
                move || quiet.layer().layer($inner),
                job,
            ),
            case(
                "heartbeat, 1 subscriber",
                move || watched.layer().layer($inner),
                job,
            ),
            case(
                "heartbeat + stall watchdog",
                move || watchdog.layer().layer($inner),
                job,
            ),
            case(
                "tower Timeout",
                || TimeoutLayer::new(STALL).layer($inner),
                job,
            ),
        ]
    }};
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list their tests
    }
    println!("# Heartbeat: per-request overhead (stall watchdog {STALL:?})");
    println!("load average at start (1, 5, 15 min): {}", support::load());
    for (rt_name, rt) in support::runtimes() {
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
            ("inner ready", cases!(ready(), quiet, watched, watchdog)),
            (
                "inner pending once",
                cases!(pending(), quiet, watched, watchdog),
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
            let (m, lo, hi) = support::ratio(&rows, "heartbeat + stall watchdog", "tower Timeout");
            println!(
                "- ratio of overheads, heartbeat + stall watchdog / tower Timeout: {m:.2} ({lo:.2}..{hi:.2})"
            );
        }
        drop((quiet, watched, watchdog));
        let (received, missed) = rt.block_on(drained).unwrap();
        println!(
            "\n{rt_name}: the subscriber received {received} pulses and missed {missed} (never waited for)"
        );
    }
    println!("\nload average at the end: {}", support::load());
}
