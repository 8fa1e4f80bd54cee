//! Admission through the rate-limit layer on Redis against the same layer
//! on the in-process store, in one run: round trips per admission (counted
//! by Redis itself, `INFO commandstats`), p50 / p99 latency of one
//! admission, and admissions per second with 2 client tasks.
//!
//! Starts its own `redis-server` on a free loopback port (see
//! `tests/support/mod.rs`). Run:
//!
//! ```text
//! cargo bench -p atscale-ratelimit-redis --bench redis
//! ```
//!
//! Rates are high enough that nothing is ever limited (as in the other
//! rate-limit benchmarks): what is measured is the cost of asking.

#[path = "../tests/support/mod.rs"]
mod support;

use std::hint::black_box;
use std::time::Duration;

use atscale_core::BoxError;
use atscale_ratelimit::{Limit, Limiter, RateLimitBuilder, RateLimitLayer};
use atscale_ratelimit_redis::RedisStore;
use support::RedisServer;
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Service, ServiceExt, service_fn};

type Svc = BoxCloneService<http::Request<u64>, u64, BoxError>;

const REPETITIONS: usize = 5;
const LATENCY_CALLS: usize = 5_000;
const THROUGHPUT_SPAN: Duration = Duration::from_millis(500);

fn backend()
-> impl Service<http::Request<u64>, Response = u64, Error = BoxError, Future: Send> + Clone + Send {
    service_fn(|req: http::Request<u64>| async move { Ok::<_, BoxError>(black_box(*req.body())) })
}

/// On Redis: the finest limit it keeps (one microsecond per request).
fn never_limited() -> Limit {
    Limit::per_second(1_000_000)
        .unwrap()
        .burst(1_000_000)
        .unwrap()
}

/// In process: admissions run at millions per second, so the finest limit.
fn never_limited_here() -> Limit {
    Limit::per_second(1_000_000_000)
        .unwrap()
        .burst(1_000_000_000)
        .unwrap()
}

fn memory(limits: usize) -> Svc {
    let mut b = RateLimitLayer::builder();
    for _ in 0..limits {
        b = b.limiter(Limiter::new(never_limited_here()));
    }
    let layer = b.reject().build().unwrap();
    BoxCloneService::new(tower::ServiceBuilder::new().layer(layer).service(backend()))
}

fn redis(store: &RedisStore, limits: usize, tag: &str) -> Svc {
    let mut b = RateLimitBuilder::with_store(store.clone());
    for i in 0..limits {
        b = b.limiter(
            store
                .limiter(&format!("{tag}:{i}"), never_limited())
                .unwrap(),
        );
    }
    let layer = b.reject().build().unwrap();
    BoxCloneService::new(tower::ServiceBuilder::new().layer(layer).service(backend()))
}

async fn one(svc: &mut Svc, i: u64) {
    let out = svc
        .ready()
        .await
        .unwrap()
        .call(http::Request::new(black_box(i)))
        .await;
    black_box(out.expect("never limited"));
}

/// Latencies of `n` admissions in a row, in a spawned task.
async fn latencies(svc: &Svc, n: usize) -> Vec<Duration> {
    let mut svc = svc.clone();
    tokio::spawn(async move {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            one(&mut svc, i as u64).await;
            out.push(t.elapsed());
        }
        out
    })
    .await
    .unwrap()
}

/// Admissions per second with 2 client tasks, each admitting in a loop.
async fn throughput(svc: &Svc) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..2)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while start.elapsed() < THROUGHPUT_SPAN {
                    one(&mut svc, n).await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[derive(Default)]
struct Case {
    p50: Vec<f64>,
    p99: Vec<f64>,
    rate: Vec<f64>,
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let server = RedisServer::start().await;
    let store = RedisStore::builder(server.url())
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let names = [
        "in-process, 1 limit (anchor)",
        "in-process, 3 limits",
        "redis, 1 limit",
        "redis, 3 limits",
        "bare PING round trip, no limiter",
    ];
    let svcs = [
        memory(1),
        memory(3),
        redis(&store, 1, "one"),
        redis(&store, 3, "three"),
        ping(&server).await,
    ];

    // Round trips per admission, counted by Redis over 1 000 admissions
    // (the script loaded beforehand).
    for svc in &svcs[2..4] {
        one(&mut svc.clone(), 0).await;
    }
    let mut per_admission = Vec::new();
    for svc in &svcs[2..4] {
        let sent = server.calls(&CLIENT_COMMANDS).await;
        let evals = server.calls(&["evalsha", "eval"]).await;
        let inside = server.calls(&SCRIPT_COMMANDS).await;
        let mut svc = svc.clone();
        for i in 0..1_000 {
            one(&mut svc, i).await;
        }
        // minus the three INFOs that read the counters before
        let sent = server.calls(&CLIENT_COMMANDS).await - sent - 3;
        let evals = server.calls(&["evalsha", "eval"]).await - evals;
        let inside = server.calls(&SCRIPT_COMMANDS).await - inside;
        per_admission.push([sent, evals, inside].map(|n| n as f64 / 1_000.0));
    }
    let trips = store.stats().round_trips;

    // Interleaved repetitions: A B C D E A B C D E …
    let mut cases: Vec<Case> = names.iter().map(|_| Case::default()).collect();
    for svc in &svcs {
        latencies(svc, 500).await; // warm-up, discarded
    }
    for _ in 0..REPETITIONS {
        for (svc, case) in svcs.iter().zip(&mut cases) {
            let mut l = latencies(svc, LATENCY_CALLS).await;
            l.sort();
            case.p50.push(us(pct(&l, 0.50)));
            case.p99.push(us(pct(&l, 0.99)));
            case.rate.push(throughput(svc).await);
        }
    }

    println!(
        "redis-server {} on loopback, multi_thread runtime (2 workers), {REPETITIONS} repetitions \
         of {LATENCY_CALLS} admissions in a row (latency) and {THROUGHPUT_SPAN:?} of 2 client \
         tasks (throughput); median [min..max] over repetitions",
        server_version(&server).await
    );
    println!("| case | p50 µs | p99 µs | admissions/s, 2 tasks | vs anchor |");
    println!("| --- | --- | --- | --- | --- |");
    let anchor = median(cases[0].rate.clone()).0;
    for (name, case) in names.iter().zip(&cases) {
        let (p50, p50lo, p50hi) = median(case.p50.clone());
        let (p99, p99lo, p99hi) = median(case.p99.clone());
        let (rate, lo, hi) = median(case.rate.clone());
        println!(
            "| {name} | {p50:.2} [{p50lo:.2}..{p50hi:.2}] | {p99:.2} [{p99lo:.2}..{p99hi:.2}] | \
             {rate:.0} [{lo:.0}..{hi:.0}] | 1/{:.0} |",
            anchor / rate
        );
    }
    for ([sent, evals, inside], name) in per_admission.iter().zip(&names[2..]) {
        println!(
            "{name}, per admission (INFO commandstats, 1000 admissions): {sent:.3} commands \
             sent to Redis, of which {evals:.3} scripts; {inside:.3} commands run inside the script"
        );
    }
    let stats = store.stats();
    println!(
        "store: {} round trips in all ({} before the timed runs), {} faults",
        stats.round_trips,
        trips,
        stats.failed_closed + stats.failed_open
    );
}

/// Commands a client sends (besides any this benchmark never uses).
const CLIENT_COMMANDS: [&str; 7] = [
    "evalsha",
    "eval",
    "script|load",
    "ping",
    "hello",
    "client|setinfo",
    "info",
];

/// Commands the scripts run.
const SCRIPT_COMMANDS: [&str; 6] = ["time", "get", "set", "hget", "hset", "del"];

/// The anchor of a round trip: a PING on a multiplexed connection, wrapped
/// as a service like the others.
async fn ping(server: &RedisServer) -> Svc {
    let conn = server.connection().await;
    BoxCloneService::new(service_fn(move |req: http::Request<u64>| {
        let mut conn = conn.clone();
        async move {
            let pong: String = redis::cmd("PING").query_async(&mut conn).await?;
            black_box(pong);
            Ok::<_, BoxError>(*req.body())
        }
    }))
}

async fn server_version(server: &RedisServer) -> String {
    let mut conn = server.connection().await;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .to_owned()
}
