//! Retries: the four scenarios of issue 15 on tokio's paused clock, and the
//! per-call overhead around a ready service when nothing fails.
//!
//! Scenarios (open loop, 200 calls/s for 10 s, every backend call's fate a
//! pure function of (seed, call id, attempt) by SplitMix64, so every peer
//! sees the same backend):
//! 1. `flaky`: 10% of backend calls fail at once with `UNAVAILABLE`, the rest
//!    answer in 5–15 ms;
//! 2. `outage`: every backend call fails at once from 2 s to 7 s, then the
//!    backend recovers;
//! 3. `pushback`: from 2 s to 7 s, 20% of backend calls are refused at once
//!    with `UNAVAILABLE` and `grpc-retry-pushback-ms: 200`;
//! 4. `deadline`: every call has a 100 ms deadline; 30% of backend calls fail
//!    after 20 ms.
//!
//! Peers, all at most 3 attempts: no retry; a naive loop of 3 immediate
//! attempts; tower `Retry` with `TpsBudget::default()` (10 s, 10/s, 20%) and
//! a doubling backoff; tower-resilience's retry (exponential backoff);
//! atscale `Retry` (doubling to 1 s, jittered) with an A6 throttle of 10
//! tokens and ratio 0.1 (A6's example), and of 100 tokens and ratio 0.5.
//! Every backoff starts at 100 ms, 25 ms under 100 ms deadlines.
//!
//! `cargo bench --bench retry` (`-- scenarios` or `-- overhead` for one part).

mod support;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atscale::core::{BoxError, Carrier, Context, Origin, RetryThrottle};
use atscale::hedge::Replay;
use atscale::retry::{RetryLayer, RetryPolicy, RetryRequest};
use support::{case, pending_once};
use tokio::time::Instant;
use tower::retry::budget::{Budget as _, TpsBudget};
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceExt, service_fn};

/// The request: an id that survives retries, and the context.
#[derive(Clone, Debug)]
struct Call {
    id: u64,
    cx: Option<Context>,
}

impl Carrier for Call {
    fn context(&self) -> Option<&Context> {
        self.cx.as_ref()
    }
    fn set_context(&mut self, cx: Context) {
        self.cx = Some(cx);
    }
}

impl Replay for Call {
    fn replay(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl RetryRequest for Call {}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform draw in [0, 1) for attempt `k` of call `id`.
fn draw(id: u64, k: u32, salt: u64) -> f64 {
    let z = splitmix(
        splitmix(0x5eed ^ salt) ^ splitmix(id.wrapping_mul(31).wrapping_add(u64::from(k))),
    );
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Flaky,
    Outage,
    Pushback,
    Deadline,
}

const RATE: u64 = 200; // calls per second
const SECONDS: u64 = 10;
const OUTAGE: (Duration, Duration) = (Duration::from_secs(2), Duration::from_secs(7));
const PUSHBACK: Duration = Duration::from_millis(200);
const DEADLINE: Duration = Duration::from_millis(100);

/// What the backend saw.
#[derive(Default)]
struct Log {
    /// Start time of every backend call.
    calls: Vec<Duration>,
    /// Attempts so far per call id.
    attempts: HashMap<u64, u32>,
    /// When call id was last refused with pushback.
    refused_at: HashMap<u64, Duration>,
    /// Attempts that arrived before the pushback said.
    early: u64,
    /// Backend calls started after their call's deadline.
    past_deadline: u64,
}

#[derive(Clone)]
struct Backend {
    scenario: Scenario,
    start: Instant,
    log: Arc<Mutex<Log>>,
}

fn unavailable() -> BoxError {
    Box::new(tonic::Status::unavailable("backend unavailable"))
}

impl Service<Call> for Backend {
    type Response = ();
    type Error = BoxError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let now = self.start.elapsed();
        let k = {
            let mut log = self.log.lock().unwrap();
            log.calls.push(now);
            let k = *log
                .attempts
                .entry(call.id)
                .and_modify(|k| *k += 1)
                .or_insert(0);
            if let Some(at) = log.refused_at.remove(&call.id)
                && now < at + PUSHBACK
            {
                log.early += 1;
            }
            if self.scenario == Scenario::Deadline
                && now > Duration::from_millis(call.id * 1000 / RATE) + DEADLINE
            {
                log.past_deadline += 1;
            }
            k
        };
        let latency = Duration::from_micros(5_000 + (draw(call.id, k, 1) * 10_000.0) as u64);
        let u = draw(call.id, k, 2);
        let in_outage = now >= OUTAGE.0 && now < OUTAGE.1;
        let log = self.log.clone();
        let scenario = self.scenario;
        Box::pin(async move {
            match scenario {
                Scenario::Flaky if u < 0.10 => return Err(unavailable()),
                Scenario::Outage if in_outage => return Err(unavailable()),
                Scenario::Pushback if in_outage && u < 0.20 => {
                    log.lock().unwrap().refused_at.insert(call.id, now);
                    let mut status = tonic::Status::unavailable("overloaded");
                    status
                        .metadata_mut()
                        .insert("grpc-retry-pushback-ms", "200".parse().unwrap());
                    return Err(Box::new(status));
                }
                Scenario::Deadline if u < 0.30 => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    return Err(unavailable());
                }
                _ => {}
            }
            tokio::time::sleep(latency).await;
            Ok(())
        })
    }
}

const PEERS: [&str; 6] = [
    "no retry",
    "naive loop, 3 attempts",
    "tower Retry + TpsBudget",
    "tower-resilience retry",
    "atscale Retry, throttle 10 / 0.1 (A6's example)",
    "atscale Retry, throttle 100 / 0.5",
];

/// The first backoff of every peer that has one: 100 ms, but 25 ms under
/// 100 ms deadlines (so that a retry can fit at all).
fn first_backoff(scenario: Scenario) -> Duration {
    match scenario {
        Scenario::Deadline => Duration::from_millis(25),
        _ => Duration::from_millis(100),
    }
}

#[derive(Clone)]
struct TowerPolicy {
    attempts: u32,
    budget: Arc<TpsBudget>,
    backoff: Duration,
}

impl tower::retry::Policy<Call, (), BoxError> for TowerPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _req: &mut Call,
        result: &mut Result<(), BoxError>,
    ) -> Option<Self::Future> {
        if result.is_ok() || self.attempts + 1 >= 3 || !self.budget.withdraw() {
            return None;
        }
        let backoff = self.backoff * 2u32.pow(self.attempts);
        self.attempts += 1;
        Some(tokio::time::sleep(backoff))
    }

    fn clone_request(&mut self, req: &Call) -> Option<Call> {
        if self.attempts == 0 {
            self.budget.deposit();
        }
        Some(req.clone())
    }
}

type Client = BoxCloneService<Call, (), BoxError>;

fn client(peer: usize, backend: Backend) -> Client {
    let backoff = first_backoff(backend.scenario);
    match peer {
        0 => BoxCloneService::new(backend),
        1 => BoxCloneService::new(service_fn(move |call: Call| {
            let backend = backend.clone();
            async move {
                let mut last = None;
                for _ in 0..3 {
                    match backend.clone().oneshot(call.clone()).await {
                        Ok(()) => return Ok(()),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.expect("three attempts"))
            }
        })),
        2 => BoxCloneService::new(tower::retry::Retry::new(
            TowerPolicy {
                attempts: 0,
                budget: Arc::new(TpsBudget::default()),
                backoff,
            },
            backend,
        )),
        3 => BoxCloneService::new(
            tower_resilience_retry::RetryLayer::<Call, (), BoxError>::builder()
                .max_attempts(3)
                .exponential_backoff(backoff)
                .build()
                .layer(backend),
        ),
        _ => {
            let policy = RetryPolicy::builder()
                .max_attempts(3)
                .initial_backoff(backoff)
                .max_backoff(Duration::from_secs(1))
                .multiplier(2.0)
                .jitter_seed(7)
                .build()
                .expect("valid");
            let throttle = if peer == 4 {
                RetryThrottle::new(10, 0.1)
            } else {
                RetryThrottle::new(100, 0.5)
            }
            .expect("valid");
            BoxCloneService::new(RetryLayer::new(policy).throttle(throttle).layer(backend))
        }
    }
}

struct Outcome {
    arrival: Duration,
    latency: Duration,
    ok: bool,
}

struct Run {
    outcomes: Vec<Outcome>,
    backend_calls: Vec<Duration>,
    early: u64,
    past_deadline: u64,
}

fn run(scenario: Scenario, peer: usize) -> Run {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let start = Instant::now();
        let log = Arc::new(Mutex::new(Log::default()));
        let svc = client(
            peer,
            Backend {
                scenario,
                start,
                log: log.clone(),
            },
        );
        let mut calls = Vec::new();
        for id in 0..RATE * SECONDS {
            let arrival = Duration::from_millis(id * 1000 / RATE);
            let svc = svc.clone();
            calls.push(tokio::spawn(async move {
                tokio::time::sleep_until(start + arrival).await;
                let cx = (scenario == Scenario::Deadline)
                    .then(|| Context::new().with_budget(DEADLINE, Origin::Local));
                let sent = Instant::now();
                let ok = svc.oneshot(Call { id, cx }).await.is_ok();
                Outcome {
                    arrival,
                    latency: sent.elapsed(),
                    ok,
                }
            }));
        }
        let mut outcomes = Vec::new();
        for c in calls {
            outcomes.push(c.await.expect("task"));
        }
        let log = log.lock().unwrap();
        Run {
            outcomes,
            backend_calls: log.calls.clone(),
            early: log.early,
            past_deadline: log.past_deadline,
        }
    })
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn scenarios(out: &mut String) {
    for (scenario, title) in [
        (
            Scenario::Flaky,
            "1. 10% of calls fail fast with UNAVAILABLE",
        ),
        (
            Scenario::Outage,
            "2. full outage from 2 s to 7 s, then recovery",
        ),
        (
            Scenario::Pushback,
            "3. overloaded (2 s to 7 s): 20% refused with grpc-retry-pushback-ms: 200",
        ),
        (
            Scenario::Deadline,
            "4. 100 ms deadlines; 30% of backend calls fail after 20 ms",
        ),
    ] {
        let _ = writeln!(
            out,
            "\n#### {title} (first backoff {} ms)\n",
            first_backoff(scenario).as_millis()
        );
        let _ = writeln!(
            out,
            "| peer | success | p99 (ms) | amplification | outage amplification | full success after recovery | early attempts | calls past deadline (max over) | backend calls past deadline |"
        );
        let _ = writeln!(
            out,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        let mut per_second = Vec::new();
        for (peer, name) in PEERS.iter().enumerate() {
            let r = run(scenario, peer);
            let n = r.outcomes.len() as f64;
            let success = r.outcomes.iter().filter(|o| o.ok).count() as f64 / n;
            let latency = p99(r.outcomes.iter().map(|o| o.latency).collect());
            let amplification = r.backend_calls.len() as f64 / n;
            let in_outage = |t: Duration| t >= OUTAGE.0 && t < OUTAGE.1;
            let outage_calls = r.outcomes.iter().filter(|o| in_outage(o.arrival)).count() as f64;
            let outage_backend = r.backend_calls.iter().filter(|t| in_outage(**t)).count() as f64;
            // From the recovery to the arrival of the last call that failed
            // (every later call succeeded).
            let last_failed = r
                .outcomes
                .iter()
                .filter(|o| !o.ok && o.arrival >= OUTAGE.1 - Duration::from_secs(1))
                .map(|o| o.arrival)
                .max();
            let full = match last_failed {
                Some(t) if t >= OUTAGE.1 => format!("{} ms", ms(t - OUTAGE.1)),
                _ => "at once".to_owned(),
            };
            let late: Vec<Duration> = r
                .outcomes
                .iter()
                .filter(|o| o.latency > DEADLINE)
                .map(|o| o.latency - DEADLINE)
                .collect();
            let past = if scenario == Scenario::Deadline {
                format!(
                    "{} ({} ms)",
                    late.len(),
                    ms(late.iter().max().copied().unwrap_or_default())
                )
            } else {
                "—".to_owned()
            };
            let _ = writeln!(
                out,
                "| {name} | {success:.4} | {} | {amplification:.3}x | {} | {} | {} | {past} | {} |",
                ms(latency),
                if scenario == Scenario::Flaky || scenario == Scenario::Deadline {
                    "—".to_owned()
                } else {
                    format!("{:.3}x", outage_backend / outage_calls)
                },
                if scenario == Scenario::Outage {
                    full
                } else {
                    "—".to_owned()
                },
                if scenario == Scenario::Pushback {
                    r.early.to_string()
                } else {
                    "—".to_owned()
                },
                if scenario == Scenario::Deadline {
                    r.past_deadline.to_string()
                } else {
                    "—".to_owned()
                },
            );
            if scenario == Scenario::Outage {
                let row: Vec<String> = (0..SECONDS)
                    .map(|s| {
                        let second = |t: &Duration| t.as_secs() == s;
                        let backend = r.backend_calls.iter().filter(|t| second(t)).count() as f64;
                        let calls = r.outcomes.iter().filter(|o| second(&o.arrival)).count() as f64;
                        format!("{:.2}", backend / calls)
                    })
                    .collect();
                per_second.push(format!("| {name} | {} |", row.join(" | ")));
            }
        }
        if !per_second.is_empty() {
            let _ = writeln!(
                out,
                "\nAmplification (backend calls / client calls) per second of the run:\n"
            );
            let header: Vec<String> = (0..SECONDS).map(|s| format!("{s}–{} s", s + 1)).collect();
            let _ = writeln!(out, "| peer | {} |", header.join(" | "));
            let _ = writeln!(out, "| --- |{}", " ---: |".repeat(SECONDS as usize));
            for row in per_second {
                let _ = writeln!(out, "{row}");
            }
        }
    }
}

fn ready_inner() -> impl Service<Call, Response = (), Error = BoxError, Future: Send> + Clone + Send
{
    service_fn(|_c: Call| std::future::ready(Ok::<(), BoxError>(())))
}

fn pending_inner()
-> impl Service<Call, Response = (), Error = BoxError, Future: Send> + Clone + Send {
    service_fn(|_c: Call| pending_once(Ok::<(), BoxError>(())))
}

fn call(id: u64) -> Call {
    Call { id, cx: None }
}

macro_rules! overhead_cases {
    ($inner:expr) => {
        vec![
            case("bare", || $inner, call),
            case(
                "tower Retry + TpsBudget",
                || {
                    tower::retry::Retry::new(
                        TowerPolicy {
                            attempts: 0,
                            budget: Arc::new(TpsBudget::default()),
                            backoff: Duration::from_millis(100),
                        },
                        $inner,
                    )
                },
                call,
            ),
            case(
                "tower-resilience retry",
                || {
                    tower_resilience_retry::RetryLayer::<Call, (), BoxError>::builder()
                        .max_attempts(3)
                        .exponential_backoff(Duration::from_millis(100))
                        .build()
                        .layer($inner)
                },
                call,
            ),
            case(
                "atscale Retry",
                || {
                    RetryLayer::new(RetryPolicy::default())
                        .throttle(RetryThrottle::new(10, 0.1).expect("valid"))
                        .layer($inner)
                },
                call,
            ),
        ]
    };
}

fn overhead() {
    println!(
        "\n### Per-call overhead when nothing fails (load {})",
        support::load()
    );
    for (rt_name, rt) in support::runtimes() {
        for (what, cases) in [
            ("inner ready", overhead_cases!(ready_inner())),
            ("inner pending once", overhead_cases!(pending_inner())),
        ] {
            let rows = support::compare(&rt, &cases);
            support::print(&format!("{rt_name}: {what}"), &rows);
            let (m, lo, hi) = support::ratio(&rows, "atscale Retry", "tower Retry + TpsBudget");
            println!(
                "\nratio of overheads, atscale Retry / tower Retry: {m:.2} ({lo:.2}..{hi:.2})"
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list their tests
    }
    let only = |part: &str| {
        !args.iter().any(|a| a == "scenarios" || a == "overhead") || args.iter().any(|a| a == part)
    };
    if only("scenarios") {
        let mut out = String::new();
        scenarios(&mut out);
        println!(
            "### Scenarios (paused clock, {RATE} calls/s for {SECONDS} s, at most 3 attempts){out}"
        );
    }
    if only("overhead") {
        overhead();
    }
}
