//! Admission through the rate-limit layer on Redis (one server, and a
//! Redis Cluster) against the same layer on the in-process store, in one
//! run: round trips per admission (counted by the servers themselves, `INFO
//! commandstats`), p50 / p99 latency of one admission against a bare `PING`
//! to the same node, and admissions per second with 64 concurrent callers.
//!
//! Starts its own `redis-server` on a free loopback port, and its own
//! cluster of six (3 masters, 3 replicas; see `tests/support/mod.rs` and
//! `tests/support/cluster.rs`). Run:
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
use support::cluster::{RedisCluster, calls_on, connect};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Service, ServiceExt, service_fn};

type Svc = BoxCloneService<http::Request<u64>, u64, BoxError>;

const REPETITIONS: usize = 5;
const LATENCY_CALLS: usize = 5_000;
const THROUGHPUT_SPAN: Duration = Duration::from_millis(500);
const CALLERS: usize = 64;

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

/// Two limits under two hash tags on a cluster: two slots, two scripts.
fn redis_split(store: &RedisStore, tag: &str) -> Svc {
    let mut b = RateLimitBuilder::with_store(store.clone());
    for slot_tag in ["api", "other"] {
        b = b.limiter(
            store
                .limiter_in(slot_tag, &format!("{tag}:{slot_tag}"), never_limited())
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

/// Admissions per second with [`CALLERS`] client tasks, each admitting in
/// a loop.
async fn throughput(svc: &Svc) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..CALLERS)
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
    let cluster = RedisCluster::start().await;
    let store = RedisStore::builder(server.url())
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let cstore = RedisStore::cluster(cluster.urls())
        .timeout(Duration::from_secs(1))
        .hash_tag("api")
        .build()
        .unwrap();
    // the master of the "api" slot: the node the cluster cases talk to
    let api = cstore.limiter("probe", never_limited()).unwrap();
    let node = cluster.master_of(api.slot()).await;
    let names = [
        "in-process, 1 limit (anchor)",
        "one server: 1 limit",
        "one server: 3 limits (one script)",
        "one server: bare PING",
        "cluster: 1 limit",
        "cluster: 3 limits, one tag (one script)",
        "cluster: 2 limits in 2 slots (split, 2 scripts)",
        "cluster: bare PING to the same node, plain connection",
        "cluster: PING through the cluster client to the node",
    ];
    let svcs = [
        memory(1),
        redis(&store, 1, "one"),
        redis(&store, 3, "three"),
        ping(server.connection().await),
        redis(&cstore, 1, "one"),
        redis(&cstore, 3, "three"),
        redis_split(&cstore, "split"),
        ping(connect(node).await),
        cluster_ping(&cluster, node).await,
    ];

    // Round trips per admission, counted by the servers over 1 000
    // admissions (the script loaded beforehand).
    for svc in &svcs[1..7] {
        one(&mut svc.clone(), 0).await;
    }
    // On the cluster, counted on the masters: replicas run the scripts'
    // effects again (replication), which no client sent.
    let masters = cluster.masters().await;
    let mut per_admission = Vec::new();
    for (i, svc) in svcs.iter().enumerate().take(7).skip(1) {
        let on_cluster = i >= 4;
        let count = async |names: &[&str]| {
            if on_cluster {
                let mut n = 0;
                for port in &masters {
                    n += calls_on(*port, names).await;
                }
                n
            } else {
                server.calls(names).await
            }
        };
        let sent = count(&CLIENT_COMMANDS).await;
        let evals = count(&["evalsha", "eval"]).await;
        let inside = count(&SCRIPT_COMMANDS).await;
        let mut svc = svc.clone();
        for i in 0..1_000 {
            one(&mut svc, i).await;
        }
        // minus the INFOs that read the counters before (one per node)
        let infos = if on_cluster { 3 * masters.len() } else { 3 } as u64;
        let sent = count(&CLIENT_COMMANDS).await - sent - infos;
        let evals = count(&["evalsha", "eval"]).await - evals;
        let inside = count(&SCRIPT_COMMANDS).await - inside;
        per_admission.push((names[i], [sent, evals, inside].map(|n| n as f64 / 1_000.0)));
    }
    let evals_on_node = calls_on(node, &["evalsha", "eval"]).await;
    let trips = (store.stats().round_trips, cstore.stats().round_trips);

    // Interleaved repetitions: A B C … A B C …
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
        "redis-server {} on loopback (one server, and a cluster of 3 masters + 3 replicas), \
         multi_thread runtime (2 workers), {REPETITIONS} repetitions of {LATENCY_CALLS} \
         admissions in a row (latency) and {THROUGHPUT_SPAN:?} of {CALLERS} concurrent callers \
         (throughput); median [min..max] over repetitions",
        server_version(&server).await
    );
    println!("| case | p50 µs | p99 µs | admissions/s, {CALLERS} callers | p50 vs its PING |");
    println!("| --- | --- | --- | --- | --- |");
    let ping_of = |i: usize| match i {
        1..=3 => Some(3),
        4..=8 => Some(7),
        _ => None,
    };
    let p50s: Vec<f64> = cases.iter().map(|c| median(c.p50.clone()).0).collect();
    for (i, (name, case)) in names.iter().zip(&cases).enumerate() {
        let (p50, p50lo, p50hi) = median(case.p50.clone());
        let (p99, p99lo, p99hi) = median(case.p99.clone());
        let (rate, lo, hi) = median(case.rate.clone());
        let vs = ping_of(i).map_or("-".to_owned(), |p| format!("{:.2}x", p50 / p50s[p]));
        println!(
            "| {name} | {p50:.2} [{p50lo:.2}..{p50hi:.2}] | {p99:.2} [{p99lo:.2}..{p99hi:.2}] | \
             {rate:.0} [{lo:.0}..{hi:.0}] | {vs} |"
        );
    }
    for (name, [sent, evals, inside]) in &per_admission {
        println!(
            "{name}, per admission (INFO commandstats, 1000 admissions): {sent:.3} commands \
             sent by clients, of which {evals:.3} scripts; {inside:.3} commands run inside the \
             scripts"
        );
    }
    let (s, c) = (store.stats(), cstore.stats());
    println!(
        "one server: {} round trips in all ({} before the timed runs), {} faults; cluster: {} \
         round trips ({} before), {} resent, {} split, {} faults; scripts on the node of the \
         \"api\" slot before the timed runs: {evals_on_node}",
        s.round_trips,
        trips.0,
        s.failed_closed + s.failed_open,
        c.round_trips,
        trips.1,
        c.resent,
        c.split,
        c.failed_closed + c.failed_open
    );
}

/// Commands a client sends (besides any this benchmark never uses),
/// including those of the cluster client (slot map, connection checks).
const CLIENT_COMMANDS: [&str; 11] = [
    "evalsha",
    "eval",
    "script|load",
    "ping",
    "hello",
    "client|setinfo",
    "info",
    "cluster|slots",
    "cluster|shards",
    "asking",
    "readonly",
];

/// Commands the scripts run.
const SCRIPT_COMMANDS: [&str; 6] = ["time", "get", "set", "hget", "hset", "del"];

/// The anchor of a round trip: a PING on a multiplexed connection, wrapped
/// as a service like the others.
fn ping(conn: redis::aio::MultiplexedConnection) -> Svc {
    BoxCloneService::new(service_fn(move |req: http::Request<u64>| {
        let mut conn = conn.clone();
        async move {
            let pong: String = redis::cmd("PING").query_async(&mut conn).await?;
            black_box(pong);
            Ok::<_, BoxError>(*req.body())
        }
    }))
}

/// A PING through the cluster client, routed to the node on `port`.
async fn cluster_ping(cluster: &RedisCluster, port: u16) -> Svc {
    use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
    let conn = redis::cluster::ClusterClient::new(cluster.urls())
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    BoxCloneService::new(service_fn(move |req: http::Request<u64>| {
        let mut conn = conn.clone();
        async move {
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: "127.0.0.1".to_owned(),
                port,
            });
            let pong = conn.route_command(redis::cmd("PING"), routing).await?;
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
