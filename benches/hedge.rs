//! Hedge benchmark, measured as `../shared/BENCHMARKS.md` describes.
//!
//! 1. Four simulated-backend scenarios (heavy tail, sudden slowdown, one slow
//!    replica, fast non-fatal errors): 20,000 requests at concurrency 32 on a
//!    2-worker runtime per configuration, latencies drawn by SplitMix64 from
//!    (seed, request id, call number), compared side by side: no hedge,
//!    `tower::hedge::Hedge`, `tower-resilience-hedge`, a plain fixed 20 ms
//!    hedge, and ours (fixed 20 ms, adaptive at p90 and p97.5, and adaptive
//!    with the percentile left to the budget). Writes an SVG latency CDF
//!    to `benches/hedge-cdf.svg`.
//! 2. Per-request overhead when no hedge fires, against tower's `Hedge`
//!    (unarmed and armed) around the same ready service, interleaved.
//!
//! ```text
//! cargo bench --bench hedge                         # everything (~5 minutes)
//! HEDGE_BENCH=overhead cargo bench --bench hedge    # or: scenarios
//! HEDGE_SCENARIO=heavy cargo bench --bench hedge    # one scenario: heavy, slowdown, replica, nonfatal
//! HEDGE_SEQUENTIAL=1 cargo bench --bench hedge      # configurations one after the other
//! ```

use std::fmt::Write as _;
use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use atscale::core::{BoxError, Carrier, Context};
use atscale::hedge::{Budget, Delay, HedgeLayer, HedgeStats, Replay, Verdict};
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceExt, service_fn};

// ------------------------------------------------------------------ model

const REQUESTS: u64 = 20_000;
const CONCURRENCY: usize = 32;
const SEED: u64 = 0x07A1_1A75_CA1E;
/// Warm-up requests use ids from here on, so they never touch the measured ids.
const WARM_BASE: u64 = REQUESTS;
const IDS: u64 = 80_000;
const WARM_UP: Duration = Duration::from_millis(1200);
const BLOCK: u64 = 2_000;

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform draw in [0, 1) from (seed, request id, call number, stream).
fn unit(id: u64, call: u32, stream: u64) -> f64 {
    let h = splitmix64(SEED ^ splitmix64(id ^ splitmix64(u64::from(call) ^ (stream << 40))));
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Heavy,
    Slowdown,
    Replica,
    Nonfatal,
}

impl Scenario {
    const ALL: [Scenario; 4] = [
        Scenario::Heavy,
        Scenario::Slowdown,
        Scenario::Replica,
        Scenario::Nonfatal,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::Heavy => "heavy",
            Scenario::Slowdown => "slowdown",
            Scenario::Replica => "replica",
            Scenario::Nonfatal => "nonfatal",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Scenario::Heavy => "1. heavy tail: 99% 5-15 ms, 1% 500 ms",
            Scenario::Slowdown => "2. sudden slowdown: 10x from request 10,000 on",
            Scenario::Replica => "3. one of two replicas 10x slower",
            Scenario::Nonfatal => "4. heavy, plus 1% of calls failing fast (non-fatal)",
        }
    }

    /// The k-th backend call for request `id`, on `replica`: latency and failure.
    fn draw(self, id: u64, call: u32, replica: usize) -> (Duration, bool) {
        let fast = Duration::from_micros(5_000 + (unit(id, call, 1) * 10_000.0) as u64);
        match self {
            Scenario::Replica => (if replica == 1 { fast * 10 } else { fast }, false),
            _ => {
                let mut latency = if unit(id, call, 0) < 0.01 {
                    Duration::from_millis(500)
                } else {
                    fast
                };
                if self == Scenario::Slowdown && (REQUESTS / 2..REQUESTS).contains(&id) {
                    latency *= 10;
                }
                if self == Scenario::Nonfatal && unit(id, call, 2) < 0.01 {
                    return (Duration::from_micros(200), true);
                }
                (latency, false)
            }
        }
    }
}

/// A request: an id and the context every atscale layer carries.
#[derive(Clone, Debug)]
struct Req {
    id: u64,
    cx: Option<Context>,
}

impl Req {
    fn new(id: u64) -> Self {
        Req { id, cx: None }
    }
}

impl Carrier for Req {
    fn context(&self) -> Option<&Context> {
        self.cx.as_ref()
    }
    fn set_context(&mut self, cx: Context) {
        self.cx = Some(cx);
    }
}

impl Replay for Req {
    fn replay(&self) -> Option<Self> {
        Some(self.clone())
    }
}

/// The non-fatal failure (think UNAVAILABLE).
#[derive(Clone, Debug)]
struct Unavailable;

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad("unavailable")
    }
}
impl std::error::Error for Unavailable {}

/// What one configuration's backend saw.
struct Sim {
    scenario: Scenario,
    calls: Vec<AtomicU32>,
    copies: AtomicU64,
    copies_to_other: AtomicU64,
}

impl Sim {
    fn new(scenario: Scenario) -> Arc<Self> {
        Arc::new(Sim {
            scenario,
            calls: (0..IDS).map(|_| AtomicU32::new(0)).collect(),
            copies: AtomicU64::new(0),
            copies_to_other: AtomicU64::new(0),
        })
    }
}

/// The simulated backend: a `tokio::time::sleep` per call. `replica: None`
/// is an untargeted router (first call of id `i` to replica `i % 2`, copies
/// to a seeded random replica, as a balancer would); `Some(r)` is replica `r`.
#[derive(Clone)]
struct Backend {
    sim: Arc<Sim>,
    replica: Option<usize>,
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl Service<Req> for Backend {
    type Response = u64;
    type Error = Unavailable;
    type Future = BoxFut<Result<u64, Unavailable>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Unavailable>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let id = req.id;
        let call = self.sim.calls[id as usize].fetch_add(1, Ordering::Relaxed);
        let home = (id % 2) as usize;
        let replica = match self.replica {
            Some(r) => r,
            None if call == 0 => home,
            None => usize::from(unit(id, call, 3) < 0.5),
        };
        if self.sim.scenario == Scenario::Replica && call > 0 && id < REQUESTS {
            self.sim.copies.fetch_add(1, Ordering::Relaxed);
            if replica != home {
                self.sim.copies_to_other.fetch_add(1, Ordering::Relaxed);
            }
        }
        let (latency, fails) = self.sim.scenario.draw(id, call, replica);
        Box::pin(async move {
            tokio::time::sleep(latency).await;
            if fails { Err(Unavailable) } else { Ok(id) }
        })
    }
}

// ------------------------------------------------------------------ configurations

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cfg {
    NoHedge,
    Tower,
    Resilience,
    Plain,
    OursFixed,
    OursAdaptive,
    OursAdaptive975,
    OursAdaptiveBudget,
}

impl Cfg {
    const ALL: [Cfg; 8] = [
        Cfg::NoHedge,
        Cfg::Tower,
        Cfg::Resilience,
        Cfg::Plain,
        Cfg::OursFixed,
        Cfg::OursAdaptive,
        Cfg::OursAdaptive975,
        Cfg::OursAdaptiveBudget,
    ];

    fn name(self) -> &'static str {
        match self {
            Cfg::NoHedge => "no hedge",
            Cfg::Tower => "tower Hedge p90",
            Cfg::Resilience => "tower-resilience 20 ms",
            Cfg::Plain => "plain fixed 20 ms",
            Cfg::OursFixed => "ours fixed 20 ms",
            Cfg::OursAdaptive => "ours adaptive p90",
            Cfg::OursAdaptive975 => "ours adaptive p97.5",
            Cfg::OursAdaptiveBudget => "ours adaptive, from the budget",
        }
    }

    fn colour(self) -> &'static str {
        match self {
            Cfg::NoHedge => "#777777",
            Cfg::Tower => "#1f77b4",
            Cfg::Resilience => "#ff7f0e",
            Cfg::Plain => "#9467bd",
            Cfg::OursFixed => "#2ca02c",
            Cfg::OursAdaptive => "#d62728",
            Cfg::OursAdaptive975 => "#8c564b",
            Cfg::OursAdaptiveBudget => "#e377c2",
        }
    }

    fn warms_up(self) -> bool {
        matches!(
            self,
            Cfg::Tower | Cfg::OursAdaptive | Cfg::OursAdaptive975 | Cfg::OursAdaptiveBudget
        )
    }
}

#[derive(Clone)]
struct TowerPolicy;

impl tower::hedge::Policy<Req> for TowerPolicy {
    fn clone_request(&self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
    fn can_retry(&self, _: &Req) -> bool {
        true
    }
}

/// The simplest hedge there is: a copy after 20 ms, the first result wins.
#[derive(Clone)]
struct Plain<S> {
    inner: S,
}

impl<S> Service<Req> for Plain<S>
where
    S: Service<Req, Response = u64, Error = Unavailable> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = u64;
    type Error = BoxError;
    type Future = BoxFut<Result<u64, BoxError>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let copy = self.inner.clone();
        let primary = self.inner.call(req.clone());
        Box::pin(async move {
            let backup = async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                copy.oneshot(req).await
            };
            let out = tokio::select! {
                out = primary => out,
                out = backup => out,
            };
            out.map_err(Into::into)
        })
    }
}

fn classify(out: Result<&u64, &Unavailable>) -> Verdict {
    match out {
        Ok(_) => Verdict::Good,
        Err(Unavailable) => Verdict::NonFatal,
    }
}

type Svc = BoxCloneService<Req, u64, BoxError>;

fn build(cfg: Cfg, sim: &Arc<Sim>) -> (Svc, Option<HedgeStats>) {
    let router = Backend {
        sim: sim.clone(),
        replica: None,
    };
    let replicas = || {
        vec![
            Backend {
                sim: sim.clone(),
                replica: Some(0),
            },
            Backend {
                sim: sim.clone(),
                replica: Some(1),
            },
        ]
    };
    let ours = |delay: Delay| -> (Svc, Option<HedgeStats>) {
        // The replica scenario needs half of all requests hedged (every one
        // that starts on the slow replica): its budget says so.
        let budget = if sim.scenario == Scenario::Replica {
            Budget::ratio(0.6)
        } else {
            Budget::ratio(0.05)
        };
        // Up to 3 attempts: a third when the first two are both slow or both
        // fail (0.01% of requests here), within the same budget.
        let layer = HedgeLayer::builder()
            .delay(delay)
            .max_attempts(3)
            .budget(budget)
            .classify(classify as fn(Result<&u64, &Unavailable>) -> Verdict)
            .build()
            .expect("valid settings");
        let stats = layer.stats();
        let svc = if sim.scenario == Scenario::Replica {
            let hedge = layer
                .replicas(replicas())
                .expect("two replicas")
                .pick(|req: &Req, n: usize| req.id as usize % n);
            BoxCloneService::new(hedge)
        } else {
            BoxCloneService::new(layer.layer(router.clone()))
        };
        (svc, Some(stats))
    };
    match cfg {
        Cfg::NoHedge => (BoxCloneService::new(router.map_err(BoxError::from)), None),
        Cfg::Tower => {
            // tower's Hedge is not Clone: share it the tower way, through a Buffer.
            let hedge =
                tower::hedge::Hedge::new(router, TowerPolicy, 100, 0.9, Duration::from_secs(1));
            (
                BoxCloneService::new(tower::buffer::Buffer::new(hedge, 1024)),
                None,
            )
        }
        Cfg::Resilience => {
            let layer = tower_resilience_hedge::HedgeLayer::builder()
                .delay(Duration::from_millis(20))
                .max_hedged_attempts(2)
                .build();
            let svc = layer
                .layer(router)
                .map_err(|e| -> BoxError { e.to_string().into() });
            (BoxCloneService::new(svc), None)
        }
        Cfg::Plain => (BoxCloneService::new(Plain { inner: router }), None),
        Cfg::OursFixed => ours(Delay::fixed(Duration::from_millis(20))),
        Cfg::OursAdaptive => ours(
            Delay::adaptive()
                .percentile(0.9)
                .min_samples(100)
                .window(Duration::from_secs(2))
                .into(),
        ),
        // At 1 - budget/2: fewer requests ask than the budget allows, so when
        // everyone slows down the slowest still get their hedge.
        Cfg::OursAdaptive975 => ours(
            Delay::adaptive()
                .percentile(0.975)
                .min_samples(100)
                .window(Duration::from_secs(2))
                .into(),
        ),
        // No percentile: it follows the budget (1 - budget / 2, 0.975 here),
        // a request that reaches it sends both hedges at once, and half the
        // budget is kept for stragglers.
        Cfg::OursAdaptiveBudget => ours(
            Delay::adaptive()
                .min_samples(100)
                .window(Duration::from_secs(2))
                .into(),
        ),
    }
}

// ------------------------------------------------------------------ driver

#[derive(Clone, Copy)]
struct Sample {
    id: u64,
    micros: u64,
    ok: bool,
}

/// Closed loop: `CONCURRENCY` workers take the next id until `ids` run out
/// (or `until` passes); latency from `call()` to the response.
async fn drive(svc: &Svc, first: u64, last: u64, until: Option<Instant>) -> Vec<Sample> {
    let next = Arc::new(AtomicU64::new(first));
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let mut svc = svc.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut out = Vec::with_capacity((REQUESTS as usize / CONCURRENCY) * 2);
                loop {
                    let id = next.fetch_add(1, Ordering::Relaxed);
                    if id >= last || until.is_some_and(|u| Instant::now() >= u) {
                        break out;
                    }
                    let ready = svc.ready().await.expect("never fails to be ready");
                    let start = Instant::now();
                    let ok = ready.call(Req::new(id)).await.is_ok();
                    out.push(Sample {
                        id,
                        micros: start.elapsed().as_micros() as u64,
                        ok,
                    });
                }
            })
        })
        .collect();
    let mut all = Vec::with_capacity(REQUESTS as usize);
    for w in workers {
        all.extend(w.await.expect("worker"));
    }
    all
}

struct Run {
    cfg: Cfg,
    samples: Vec<Sample>,
    calls: Vec<u32>,
    copies: u64,
    copies_to_other: u64,
    stats: Option<(u64, u64, u64)>,
}

fn run_one(scenario: Scenario, cfg: Cfg) -> Run {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let sim = Sim::new(scenario);
        let (svc, stats) = build(cfg, &sim);
        if cfg.warms_up() {
            drive(&svc, WARM_BASE, IDS, Some(Instant::now() + WARM_UP)).await;
        }
        let before = stats
            .as_ref()
            .map(|s| (s.hedges_sent(), s.hedges_won(), s.budget_denials()));
        let samples = drive(&svc, 0, REQUESTS, None).await;
        let stats = stats.zip(before).map(|(s, b)| {
            (
                s.hedges_sent() - b.0,
                s.hedges_won() - b.1,
                s.budget_denials() - b.2,
            )
        });
        Run {
            cfg,
            samples,
            calls: sim.calls[..REQUESTS as usize]
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            copies: sim.copies.load(Ordering::Relaxed),
            copies_to_other: sim.copies_to_other.load(Ordering::Relaxed),
            stats,
        }
    })
}

fn run_scenario(scenario: Scenario, sequential: bool) -> Vec<Run> {
    if sequential {
        return Cfg::ALL.iter().map(|&c| run_one(scenario, c)).collect();
    }
    // Each configuration on its own 2-worker runtime, all at once: the load is
    // sleeps (a few µs of CPU per request), so they do not compete for the cores.
    let handles: Vec<_> = Cfg::ALL
        .iter()
        .map(|&c| std::thread::spawn(move || run_one(scenario, c)))
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("run"))
        .collect()
}

// ------------------------------------------------------------------ statistics

fn pct(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

fn sorted(samples: &[Sample], filter: impl Fn(&Sample) -> bool) -> Vec<u64> {
    let mut v: Vec<u64> = samples
        .iter()
        .filter(|s| filter(s))
        .map(|s| s.micros)
        .collect();
    v.sort_unstable();
    v
}

fn extra(calls: &[u32], ids: std::ops::Range<u64>) -> f64 {
    let n = ids.end - ids.start;
    let total: u64 = calls[ids.start as usize..ids.end as usize]
        .iter()
        .map(|&c| u64::from(c))
        .sum();
    total as f64 / n as f64 - 1.0
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn report(scenario: Scenario, runs: &[Run], out: &mut String) {
    let _ = writeln!(out, "\n### {}\n", scenario.title());
    let _ = writeln!(
        out,
        "| configuration | p50 | p90 | p99 | p99.9 | max | mean | extra load | success | p99 / p99.9 of successes | hedges sent / won / denied |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in runs {
        let all = sorted(&r.samples, |_| true);
        let ok = sorted(&r.samples, |s| s.ok);
        let mean = all.iter().sum::<u64>() as f64 / all.len() as f64 / 1000.0;
        let success = ok.len() as f64 / all.len() as f64;
        let stats = r
            .stats
            .map(|(s, w, d)| format!("{s} / {w} / {d}"))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {:.1}% | {:.5} | {} / {} | {} |",
            r.cfg.name(),
            ms(pct(&all, 0.5)),
            ms(pct(&all, 0.9)),
            ms(pct(&all, 0.99)),
            ms(pct(&all, 0.999)),
            ms(pct(&all, 1.0)),
            ms(mean),
            extra(&r.calls, 0..REQUESTS) * 100.0,
            success,
            ms(pct(&ok, 0.99)),
            ms(pct(&ok, 0.999)),
            stats,
        );
    }
    let _ = writeln!(
        out,
        "\nLatencies in ms at the client; extra load = backend calls / requests - 1."
    );
    match scenario {
        Scenario::Heavy | Scenario::Nonfatal => {
            let slow = (0..REQUESTS).filter(|&id| unit(id, 0, 0) < 0.01).count();
            let _ = writeln!(
                out,
                "Slow first draws: {slow} of {REQUESTS} ({:.2}%): p99 sits on that edge, p99.9 is the figure.",
                slow as f64 / REQUESTS as f64 * 100.0
            );
            if scenario == Scenario::Nonfatal {
                let failing = (0..REQUESTS).filter(|&id| unit(id, 0, 2) < 0.01).count();
                let _ = writeln!(out, "First calls failing fast: {failing}.");
            }
        }
        Scenario::Slowdown => {
            let half = REQUESTS / 2;
            let _ = writeln!(
                out,
                "\n| configuration | first half p50 / p99 / p99.9 | extra | second half p50 / p99 / p99.9 | extra | extra per block of 2,000 ids (shift after block 5) |"
            );
            let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | --- |");
            for r in runs {
                let a = sorted(&r.samples, |s| s.id < half);
                let b = sorted(&r.samples, |s| s.id >= half);
                let blocks: Vec<String> = (0..REQUESTS / BLOCK)
                    .map(|k| format!("{:.1}", extra(&r.calls, k * BLOCK..(k + 1) * BLOCK) * 100.0))
                    .collect();
                let _ = writeln!(
                    out,
                    "| {} | {} / {} / {} | {:.1}% | {} / {} / {} | {:.1}% | {} |",
                    r.cfg.name(),
                    ms(pct(&a, 0.5)),
                    ms(pct(&a, 0.99)),
                    ms(pct(&a, 0.999)),
                    extra(&r.calls, 0..half) * 100.0,
                    ms(pct(&b, 0.5)),
                    ms(pct(&b, 0.99)),
                    ms(pct(&b, 0.999)),
                    extra(&r.calls, half..REQUESTS) * 100.0,
                    blocks.join(" "),
                );
            }
        }
        Scenario::Replica => {
            let _ = writeln!(
                out,
                "\n| configuration | copies sent | copies on the other replica |"
            );
            let _ = writeln!(out, "| --- | ---: | ---: |");
            for r in runs {
                let share = if r.copies == 0 {
                    0.0
                } else {
                    r.copies_to_other as f64 / r.copies as f64 * 100.0
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {} ({share:.0}%) |",
                    r.cfg.name(),
                    r.copies,
                    r.copies_to_other
                );
            }
            let _ = writeln!(
                out,
                "\nFirst calls go to replica `id % 2` (replica 1 is the slow one); untargeted copies go to a seeded random replica, as through a balancer; ours are sent to the other replica by `HedgeLayer::replicas`."
            );
        }
    }
}

// ------------------------------------------------------------------ SVG

/// A latency CDF per scenario, the y axis in "nines" (0.9, 0.99, 0.999, ...)
/// so that the tail is visible; x in ms, log scale.
fn svg(results: &[(Scenario, Vec<Run>)]) -> String {
    let (pw, ph, ml, mt, gap) = (460.0, 300.0, 60.0, 60.0, 70.0);
    let cols = 2usize;
    let rows = results.len().div_ceil(cols);
    let width = ml + cols as f64 * (pw + gap);
    let height = mt + rows as f64 * (ph + gap) + 50.0;
    let (xmin, xmax) = (1.0f64.log10(), 10_000.0f64.log10());
    let ymax = 4.0; // 0.9999
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{ml}" y="22" font-size="15">Hedge benchmark: latency CDF (20,000 requests, concurrency 32), y in nines</text>"#
    );
    for (n, (scenario, runs)) in results.iter().enumerate() {
        let ox = ml + (n % cols) as f64 * (pw + gap);
        let oy = mt + (n / cols) as f64 * (ph + gap);
        let x = |msv: f64| ox + (msv.max(1.0).log10() - xmin) / (xmax - xmin) * pw;
        let y = |nines: f64| oy + ph - nines.min(ymax) / ymax * ph;
        let _ = writeln!(
            s,
            r#"<text x="{ox}" y="{}" font-size="13">{}</text>"#,
            oy - 8.0,
            scenario.title()
        );
        let _ = writeln!(
            s,
            r##"<rect x="{ox}" y="{oy}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##
        );
        for decade in [1.0, 10.0, 100.0, 1000.0, 10000.0] {
            let xv = x(decade);
            let _ = writeln!(
                s,
                r##"<line x1="{xv}" y1="{oy}" x2="{xv}" y2="{}" stroke="#ddd"/>"##,
                oy + ph
            );
            let _ = writeln!(
                s,
                r#"<text x="{xv}" y="{}" text-anchor="middle">{decade} ms</text>"#,
                oy + ph + 16.0
            );
        }
        for (nines, label) in [(1.0, "0.9"), (2.0, "0.99"), (3.0, "0.999"), (4.0, "0.9999")] {
            let yv = y(nines);
            let _ = writeln!(
                s,
                r##"<line x1="{ox}" y1="{yv}" x2="{}" y2="{yv}" stroke="#ddd"/>"##,
                ox + pw
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{label}</text>"#,
                ox - 4.0,
                yv + 4.0
            );
        }
        for r in runs {
            let lat = sorted(&r.samples, |_| true);
            let mut points = String::new();
            for step in 0..=400 {
                let nines = step as f64 / 400.0 * ymax;
                let q = 1.0 - 10f64.powf(-nines);
                let _ = write!(points, "{:.1},{:.1} ", x(pct(&lat, q)), y(nines));
            }
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.6" points="{points}"/>"#,
                r.cfg.colour()
            );
        }
    }
    for (i, cfg) in Cfg::ALL.iter().enumerate() {
        let ly = height - 40.0 + (i / 4) as f64 * 18.0;
        let lx = ml + (i % 4) as f64 * 230.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="3"/>"#,
            lx + 20.0,
            cfg.colour()
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">{}</text>"#,
            lx + 25.0,
            ly + 4.0,
            cfg.name()
        );
    }
    s.push_str("</svg>\n");
    s
}

// ------------------------------------------------------------------ overhead

/// Pending once, waking itself: so a timer really gets registered.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

async fn iterate<S>(mut svc: S, iters: u64) -> Duration
where
    S: Service<Req, Response = u64>,
    S::Error: std::fmt::Debug,
{
    let start = Instant::now();
    for i in 0..iters {
        let ready = svc.ready().await.expect("ready");
        black_box(ready.call(black_box(Req::new(i))).await.expect("answer"));
    }
    start.elapsed()
}

const CASES: [&str; 6] = [
    "bare",
    "tower Hedge unarmed",
    "tower Hedge armed",
    "tower-resilience hedge",
    "ours unarmed (adaptive, too few samples)",
    "ours armed (fixed 1 s)",
];

fn overhead_with<S>(rt: &tokio::runtime::Runtime, inner: S) -> Vec<Vec<f64>>
where
    S: Service<Req, Response = u64, Error = Unavailable> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    // tower's Hedge is not Clone: a fresh one per repetition.
    let tower_unarmed = || {
        tower::hedge::Hedge::new(
            inner.clone(),
            TowerPolicy,
            u64::MAX,
            0.9,
            Duration::from_secs(1),
        )
    };
    // A histogram already holding 20 ms latencies (as in the scenarios), and a
    // period that never rotates it away: armed, with a delay that never fires.
    let tower_armed = || {
        tower::hedge::Hedge::new_with_mock_latencies(
            inner.clone(),
            TowerPolicy,
            1,
            0.9,
            Duration::from_secs(100_000),
            &[20; 100],
        )
    };
    let resilience = tower_resilience_hedge::HedgeLayer::builder()
        .delay(Duration::from_secs(1))
        .max_hedged_attempts(2)
        .build()
        .layer(inner.clone());
    let ours_unarmed = HedgeLayer::builder()
        .delay(Delay::adaptive().min_samples(u32::MAX))
        .build()
        .expect("valid")
        .layer(inner.clone());
    let ours_armed = HedgeLayer::fixed(Duration::from_secs(1)).layer(inner.clone());

    let run = |case: usize, iters: u64| -> f64 {
        let elapsed = match case {
            0 => rt.block_on(rt.spawn(iterate(inner.clone(), iters))),
            1 => rt.block_on(rt.spawn(iterate(tower_unarmed(), iters))),
            2 => rt.block_on(rt.spawn(iterate(tower_armed(), iters))),
            3 => rt.block_on(rt.spawn(iterate(resilience.clone(), iters))),
            4 => rt.block_on(rt.spawn(iterate(ours_unarmed.clone(), iters))),
            _ => rt.block_on(rt.spawn(iterate(ours_armed.clone(), iters))),
        }
        .expect("task");
        elapsed.as_nanos() as f64 / iters as f64
    };
    // Calibrate: ~100 ms for the bare service.
    let mut iters = 10_000u64;
    let per = run(0, iters);
    iters = ((100e6 / per) as u64).clamp(10_000, 5_000_000);
    let mut reps = vec![Vec::new(); CASES.len()];
    for rep in 0..12 {
        for (case, out) in reps.iter_mut().enumerate() {
            let ns = run(case, iters);
            if rep > 0 {
                out.push(ns);
            }
        }
    }
    reps
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn overhead(out: &mut String) {
    let _ = writeln!(out, "\n### Per-request overhead when no hedge fires\n");
    let _ = writeln!(
        out,
        "Added ns per `ready().await` + `call().await` over the bare service: median of 11 interleaved repetitions (min..max).\n"
    );
    let _ = writeln!(
        out,
        "| runtime | inner future | {} |",
        CASES[1..].join(" | ")
    );
    let _ = writeln!(out, "| --- | --- |{}", " ---: |".repeat(CASES.len() - 1));
    let mut ratios = Vec::new();
    for threaded in [false, true] {
        let rt = if threaded {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        }
        .expect("runtime");
        for pending in [false, true] {
            let reps = if pending {
                overhead_with(
                    &rt,
                    service_fn(|r: Req| async move {
                        YieldOnce(false).await;
                        Ok::<u64, Unavailable>(r.id)
                    }),
                )
            } else {
                overhead_with(
                    &rt,
                    service_fn(|r: Req| std::future::ready(Ok::<u64, Unavailable>(r.id))),
                )
            };
            let bare = &reps[0];
            let mut cells = Vec::new();
            let mut medians = Vec::new();
            for case in &reps[1..] {
                let mut diffs: Vec<f64> = case.iter().zip(bare).map(|(c, b)| c - b).collect();
                let (lo, hi) = diffs
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(lo, hi), &d| (lo.min(d), hi.max(d)));
                let m = median(&mut diffs);
                medians.push(m);
                cells.push(format!("+{m:.0} ({lo:.0}..{hi:.0})"));
            }
            let runtime = if threaded {
                "multi_thread (2)"
            } else {
                "current_thread"
            };
            let inner = if pending { "pending once" } else { "ready" };
            let _ = writeln!(out, "| {runtime} | {inner} | {} |", cells.join(" | "));
            // ours unarmed / tower unarmed, ours armed / tower armed
            ratios.push((
                runtime,
                inner,
                medians[3] / medians[0],
                medians[4] / medians[1],
            ));
        }
    }
    let _ = writeln!(
        out,
        "\n| runtime | inner future | ours / tower, unarmed | ours / tower, armed |"
    );
    let _ = writeln!(out, "| --- | --- | ---: | ---: |");
    for (runtime, inner, unarmed, armed) in ratios {
        let _ = writeln!(out, "| {runtime} | {inner} | {unarmed:.2} | {armed:.2} |");
    }
}

// ------------------------------------------------------------------ main

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let what = std::env::var("HEDGE_BENCH").unwrap_or_else(|_| "all".into());
    let only = std::env::var("HEDGE_SCENARIO").ok();
    let sequential = std::env::var_os("HEDGE_SEQUENTIAL").is_some();
    if what == "all" || what == "scenarios" || only.is_some() {
        let mut results = Vec::new();
        for scenario in Scenario::ALL {
            if only.as_deref().is_some_and(|o| o != scenario.name()) {
                continue;
            }
            let started = Instant::now();
            let runs = run_scenario(scenario, sequential);
            eprintln!(
                "{} done in {:.1} s",
                scenario.name(),
                started.elapsed().as_secs_f64()
            );
            let mut section = String::new();
            report(scenario, &runs, &mut section);
            println!("{section}");
            results.push((scenario, runs));
        }
        if only.is_none() {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/hedge-cdf.svg");
            std::fs::write(path, svg(&results)).expect("write the SVG");
            eprintln!("wrote {path}");
        }
    }
    if (what == "all" && only.is_none()) || what == "overhead" {
        let mut section = String::new();
        overhead(&mut section);
        println!("{section}");
    }
}
