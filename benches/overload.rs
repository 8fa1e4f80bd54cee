//! Overload: goodput of a processor-sharing server at 0.5x..10x its capacity,
//! on tokio's paused clock (`../shared/BENCHMARKS.md`, "Overload scenario"),
//! and the layer's per-request overhead at low load against tower's
//! `ConcurrencyLimit` (benches/support's interleaved harness).
//!
//! - Backend: a "CPU" of 2 work-ms per ms shared equally by the requests in
//!   service (a driver ticks every 1 ms); each request needs 10 ms of work; a
//!   dropped request leaves at once. Capacity 200 requests/s. At t = 5 s of
//!   the step variant, the CPU halves.
//! - Every request carries `x-deadline-ms: 100` through a server stack built
//!   by hand from the facade: ErrorEnrich (server) → Deadline (server, header)
//!   → the protection under test → backend.
//! - Poisson arrivals, 10 s per run, 5 seeds pooled.
//!
//! Then the real-clock check over axum on loopback (see `real`), 2x and 5x.
//!
//! `cargo bench --bench overload` prints the tables in markdown and writes
//! `benches/overload-goodput.svg`. `OVERLOAD_SEEDS` (default 5) and
//! `OVERLOAD_SKIP_OVERHEAD=1` and `OVERLOAD_SKIP_REAL=1` shorten it (`OVERLOAD_ONLY_OVERHEAD=1` runs
//! only the overhead part, `OVERLOAD_ONLY_REAL=1` only the real-clock check); `OVERLOAD_ONLY=atscale` runs the
//! configurations whose name contains the text (the SVG then shows only them).

mod support;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use atscale::core::{BoxError, Clock};
use atscale::deadline::DeadlineLayer;
use atscale::error::ErrorEnrichLayer;
use atscale::overload::limit::{Aimd, Algorithm, Gradient2, Vegas};
use atscale::overload::{Admission, OverloadLayer};
use http::{HeaderName, Request, Response};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};

const CAPACITY: f64 = 200.0; // requests per second
const WORK_MS: f64 = 10.0;
const CPU: f64 = 2.0; // work-ms per ms
const DEADLINE_MS: u64 = 100;
const RUN: Duration = Duration::from_secs(10);
const LOADS: [f64; 5] = [0.5, 1.0, 2.0, 5.0, 10.0];
const STEP_LOAD: f64 = 2.0;

// ---------------------------------------------------------------- the CPU

#[derive(Default)]
struct Job {
    remaining: f64,
    done: bool,
    waker: Option<Waker>,
}

/// The processor-sharing CPU (the runtime is current_thread; the lock is never contended).
struct Cpu {
    speed: f64,
    jobs: BTreeMap<u64, Job>,
    next: u64,
    /// Work spent, per request id (the request's own id, from its header).
    spent: HashMap<u64, f64>,
}

type SharedCpu = Arc<Mutex<Cpu>>;

/// Ticks the CPU every 1 ms until `end`.
async fn drive(cpu: SharedCpu, end: Instant, step_at: Option<Instant>) {
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    tick.tick().await;
    loop {
        let now = tick.tick().await;
        if now > end {
            return;
        }
        let mut c = cpu.lock().unwrap();
        if step_at.is_some_and(|s| now >= s) {
            c.speed = CPU / 2.0;
        }
        let n = c.jobs.len();
        if n == 0 {
            continue;
        }
        let share = c.speed / n as f64;
        for job in c.jobs.values_mut() {
            let used = share.min(job.remaining);
            job.remaining -= used;
            if job.remaining <= 1e-9 {
                job.done = true;
                if let Some(w) = job.waker.take() {
                    w.wake();
                }
            }
        }
    }
}

/// One request's work on the CPU; dropping it leaves the CPU at once.
struct Work {
    cpu: SharedCpu,
    job: u64,
    owner: u64,
}

impl Work {
    fn new(cpu: SharedCpu, owner: u64) -> Self {
        let job = {
            let mut c = cpu.lock().unwrap();
            let id = c.next;
            c.next += 1;
            c.jobs.insert(
                id,
                Job {
                    remaining: WORK_MS,
                    ..Job::default()
                },
            );
            id
        };
        Work { cpu, job, owner }
    }
}

impl Future for Work {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut c = self.cpu.lock().unwrap();
        let job = c
            .jobs
            .get_mut(&self.job)
            .expect("job present until dropped");
        if job.done {
            return Poll::Ready(());
        }
        job.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        let mut c = self.cpu.lock().unwrap();
        if let Some(job) = c.jobs.remove(&self.job) {
            *c.spent.entry(self.owner).or_default() += WORK_MS - job.remaining;
        }
    }
}

// ---------------------------------------------------------------- configurations

type Svc = BoxCloneService<Request<String>, Response<String>, BoxError>;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Config {
    Alone,
    TowerFixed(usize),
    TowerAccVegas,
    TowerAccGradient2,
    ResilienceAimd,
    ResilienceVegas,
    Ours(Algo),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Algo {
    Gradient2,
    Vegas,
    Aimd,
}

impl Config {
    fn name(self) -> String {
        match self {
            Config::Alone => "server stack alone".into(),
            Config::TowerFixed(k) => format!("+ tower `ConcurrencyLimit({k})` + `LoadShed`"),
            Config::TowerAccVegas => "+ tower-acc Vegas + `LoadShed`".into(),
            Config::TowerAccGradient2 => "+ tower-acc Gradient2 + `LoadShed`".into(),
            Config::ResilienceAimd => "+ tower-resilience-adaptive AIMD + `LoadShed`".into(),
            Config::ResilienceVegas => "+ tower-resilience-adaptive Vegas + `LoadShed`".into(),
            Config::Ours(a) => format!("+ atscale `OverloadLayer` ({a:?})"),
        }
    }
}

fn our_layer(a: Algo) -> OverloadLayer {
    let algorithm: Box<dyn Algorithm> = match a {
        Algo::Gradient2 => Box::new(Gradient2::new()),
        Algo::Vegas => Box::new(Vegas::new()),
        Algo::Aimd => Box::new(Aimd::new()),
    };
    let mut builder = OverloadLayer::builder()
        .algorithm(algorithm)
        .clock(Clock::tokio());
    // `OVERLOAD_CODEL=target_ms,interval_ms` tries other CoDel settings.
    if let Ok(v) = std::env::var("OVERLOAD_CODEL") {
        let ms: Vec<u64> = v.split(',').map(|x| x.parse().expect("ms")).collect();
        builder = builder.codel(
            atscale::overload::CoDel::new(
                Duration::from_millis(ms[0]),
                Duration::from_millis(ms[1]),
            )
            .expect("valid CoDel"),
        );
    }
    builder.build().expect("valid settings")
}

/// The backend behind `config`, as a boxed clone service (errors boxed).
fn protected(config: Config, cpu: SharedCpu) -> (Svc, Option<Admission>) {
    let backend = service_fn(move |req: Request<String>| {
        let owner = req.headers()["x-id"].to_str().unwrap().parse().unwrap();
        let work = Work::new(cpu.clone(), owner);
        async move {
            work.await;
            Ok::<_, Infallible>(Response::new(String::new()))
        }
    });
    let shed = tower::load_shed::LoadShedLayer::new();
    match config {
        Config::Alone => (BoxCloneService::new(backend.map_err(BoxError::from)), None),
        Config::TowerFixed(k) => (
            BoxCloneService::new(
                ServiceBuilder::new()
                    .layer(shed)
                    .concurrency_limit(k)
                    .service(backend),
            ),
            None,
        ),
        Config::TowerAccVegas => (
            BoxCloneService::new(
                ServiceBuilder::new()
                    .layer(shed)
                    .layer(tower_acc::ConcurrencyLimitLayer::new(
                        tower_acc::Vegas::default(),
                    ))
                    .service(backend),
            ),
            None,
        ),
        Config::TowerAccGradient2 => (
            BoxCloneService::new(
                ServiceBuilder::new()
                    .layer(shed)
                    .layer(tower_acc::ConcurrencyLimitLayer::new(
                        tower_acc::Gradient2::default(),
                    ))
                    .service(backend),
            ),
            None,
        ),
        Config::ResilienceAimd => (
            BoxCloneService::new(
                ServiceBuilder::new()
                    .layer(shed)
                    .layer(tower_resilience_adaptive::AdaptiveLimiterLayer::new(
                        tower_resilience_adaptive::Aimd::builder().build().unwrap(),
                    ))
                    .service(backend),
            ),
            None,
        ),
        Config::ResilienceVegas => (
            BoxCloneService::new(
                ServiceBuilder::new()
                    .layer(shed)
                    .layer(tower_resilience_adaptive::AdaptiveLimiterLayer::new(
                        tower_resilience_adaptive::Vegas::builder().build().unwrap(),
                    ))
                    .service(backend),
            ),
            None,
        ),
        Config::Ours(a) => {
            let layer = our_layer(a);
            let adm = layer.admission();
            (BoxCloneService::new(layer.layer(backend)), Some(adm))
        }
    }
}

/// ErrorEnrich (server) → Deadline (server, `x-deadline-ms`) → `inner`.
fn stack(inner: Svc) -> BoxCloneService<Request<String>, Response<String>, Infallible> {
    let svc = ServiceBuilder::new()
        .layer(ErrorEnrichLayer::new("overload-bench"))
        .layer(
            DeadlineLayer::server(Duration::from_secs(10))
                .with_header(HeaderName::from_static("x-deadline-ms")),
        )
        .service(inner);
    BoxCloneService::new(svc.map_response(|r| r.map(|_| String::new())))
}

// ---------------------------------------------------------------- one run

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn uniform(state: &mut u64) -> f64 {
    ((splitmix(state) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

#[derive(Default, Clone)]
struct Outcome {
    /// (status, latency ms, end time ms) per request, by id.
    answers: Vec<(u16, f64, f64)>,
    spent: HashMap<u64, f64>,
    limits: BTreeSet<usize>,
}

fn run(config: Config, load: f64, seed: u64, step: bool) -> Outcome {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let cpu: SharedCpu = Arc::new(Mutex::new(Cpu {
            speed: CPU,
            jobs: BTreeMap::new(),
            next: 0,
            spent: HashMap::new(),
        }));
        let start = Instant::now();
        let end = start + RUN;
        let step_at = step.then(|| start + RUN / 2);
        let (inner, adm) = protected(config, cpu.clone());
        let svc = stack(inner);
        let driver =
            tokio::task::spawn_local(drive(cpu.clone(), end + Duration::from_secs(1), step_at));
        let answers = Rc::new(RefCell::new(Vec::new()));
        let limits = Rc::new(RefCell::new(BTreeSet::new()));
        if let Some(adm) = adm.clone() {
            let limits = limits.clone();
            tokio::task::spawn_local(async move {
                while Instant::now() < end {
                    limits.borrow_mut().insert(adm.limit());
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
        }
        let rate = load * CAPACITY; // per second
        let mut rng = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (load * 1000.0) as u64;
        let mut t = 0.0f64; // seconds
        let mut id = 0u64;
        let mut tasks = Vec::new();
        loop {
            t += -uniform(&mut rng).ln() / rate;
            let at = start + Duration::from_secs_f64(t);
            if at >= end {
                break;
            }
            tokio::time::sleep_until(at).await;
            let req = Request::builder()
                .header("x-deadline-ms", DEADLINE_MS.to_string())
                .header("x-id", id.to_string())
                .body(String::new())
                .unwrap();
            let (svc, answers) = (svc.clone(), answers.clone());
            let my_id = id;
            tasks.push(tokio::task::spawn_local(async move {
                let sent = Instant::now();
                let res = svc.oneshot(req).await.unwrap();
                let latency = sent.elapsed().as_secs_f64() * 1000.0;
                let ended = (Instant::now() - start).as_secs_f64() * 1000.0;
                answers
                    .borrow_mut()
                    .push((my_id, res.status().as_u16(), latency, ended));
            }));
            id += 1;
        }
        for task in tasks {
            task.await.unwrap();
        }
        driver.abort();
        let mut answers = answers.borrow().clone();
        answers.sort_by_key(|a| a.0);
        let spent = cpu.lock().unwrap().spent.clone();
        Outcome {
            answers: answers.into_iter().map(|(_, s, l, e)| (s, l, e)).collect(),
            spent,
            limits: limits.borrow().clone(),
        }
    })
}

// ---------------------------------------------------------------- figures

struct Figures {
    goodput: f64,
    shares: BTreeMap<u16, f64>,
    p50: f64,
    p99: f64,
    wasted: f64,
    limits: usize,
    recovery: Option<f64>,
}

fn success(status: u16, latency: f64) -> bool {
    status == 200 && latency <= DEADLINE_MS as f64
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn figures(runs: &[Outcome], step: bool) -> Figures {
    let total: usize = runs.iter().map(|r| r.answers.len()).sum();
    let mut shares = BTreeMap::new();
    let mut good = Vec::new();
    let (mut wasted, mut all_work) = (0.0, 0.0);
    for r in runs {
        for (id, &(status, latency, _)) in r.answers.iter().enumerate() {
            *shares.entry(status).or_insert(0.0) += 1.0 / total as f64;
            let work = r.spent.get(&(id as u64)).copied().unwrap_or(0.0);
            all_work += work;
            if success(status, latency) {
                good.push(latency);
            } else {
                wasted += work;
            }
        }
    }
    good.sort_by(f64::total_cmp);
    let secs = RUN.as_secs_f64() * runs.len() as f64;
    let recovery = step.then(|| recovery(runs)).flatten();
    Figures {
        goodput: good.len() as f64 / secs / CAPACITY * 100.0,
        shares,
        p50: percentile(&good, 0.5),
        p99: percentile(&good, 0.99),
        wasted: if all_work > 0.0 {
            wasted / all_work * 100.0
        } else {
            0.0
        },
        limits: runs.iter().map(|r| r.limits.len()).max().unwrap_or(0),
        recovery,
    }
}

/// Seconds after the step (t = 5 s) until goodput, in 100 ms bins pooled
/// over the seeds and averaged over 500 ms windows, is at least 90% of the new
/// capacity (100/s) in every window to the end of the run. `None` if never.
fn recovery(runs: &[Outcome]) -> Option<f64> {
    let bins = (RUN.as_millis() / 100) as usize;
    let mut per_bin = vec![0.0; bins];
    for r in runs {
        for &(status, latency, ended) in &r.answers {
            let b = (ended / 100.0) as usize;
            if success(status, latency) && b < bins {
                per_bin[b] += 1.0;
            }
        }
    }
    // requests per second, per bin, averaged over seeds
    let rate: Vec<f64> = per_bin
        .iter()
        .map(|n| n / runs.len() as f64 * 10.0)
        .collect();
    let target = 0.9 * CAPACITY / 2.0;
    let window = 5;
    let ok = |b: usize| rate[b..b + window].iter().sum::<f64>() / window as f64 >= target;
    (50..=bins - window)
        .find(|&b| (b..=bins - window).all(ok))
        .map(|b| (b - 50) as f64 / 10.0)
}

// ---------------------------------------------------------------- the SVG

fn svg(rows: &[(String, Vec<f64>)]) -> String {
    let (w, h, left, top, right, bottom) = (800.0, 420.0, 60.0, 24.0, 340.0, 50.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let x = |i: usize| left + pw * i as f64 / (LOADS.len() - 1) as f64;
    let y = |v: f64| top + ph * (1.0 - v / 100.0);
    let colors = [
        "#444444", "#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#9467bd",
        "#c5b0d5", "#d62728", "#e377c2", "#8c564b",
    ];
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    s.push_str(&format!(
        r#"<rect width="{w}" height="{h}" fill="white"/><text x="{}" y="14" font-size="13">Goodput (% of capacity) vs offered load, 100 ms deadlines, processor sharing</text>"#,
        left
    ));
    for v in [0.0, 25.0, 50.0, 75.0, 100.0] {
        s.push_str(&format!(
            r##"<line x1="{left}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{v}</text>"##,
            left + pw,
            left - 6.0,
            y(v) + 4.0,
            y = y(v)
        ));
    }
    for (i, l) in LOADS.iter().enumerate() {
        s.push_str(&format!(
            r#"<text x="{}" y="{}" text-anchor="middle">{l}x</text>"#,
            x(i),
            top + ph + 16.0
        ));
    }
    s.push_str(&format!(
        r#"<text x="{}" y="{}" text-anchor="middle">offered load (x capacity)</text>"#,
        left + pw / 2.0,
        h - 10.0
    ));
    for (k, (name, values)) in rows.iter().enumerate() {
        let color = colors[k % colors.len()];
        let width = if name.contains("atscale") { 3.0 } else { 1.5 };
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
            .collect();
        s.push_str(&format!(
            r#"<polyline fill="none" stroke="{color}" stroke-width="{width}" points="{}"/>"#,
            points.join(" ")
        ));
        let ly = top + 14.0 * k as f64 + 10.0;
        s.push_str(&format!(
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="{width}"/><text x="{}" y="{}">{}</text>"#,
            left + pw + 10.0,
            left + pw + 30.0,
            left + pw + 35.0,
            ly + 4.0,
            name.replace('`', "").replace('&', "&amp;").replace('<', "&lt;")
        ));
    }
    s.push_str("</svg>\n");
    s
}

// ---------------------------------------------------------------- overhead

fn overhead() {
    use support::{Case, case, compare, pending_once, runtimes};
    println!("\n## Per-request overhead at low load (interleaved, 11 repetitions)\n");
    println!("load average at start (1, 5, 15 min): {}", support::load());
    let req = |_: u64| Request::new(());
    for (rt_name, rt) in runtimes() {
        for pending in [false, true] {
            let inner = move || {
                service_fn(move |r: Request<()>| async move {
                    let answer = black_box(r).uri().path().len();
                    if pending {
                        pending_once(Ok::<_, Infallible>(answer)).await
                    } else {
                        Ok::<_, Infallible>(answer)
                    }
                })
            };
            let cases: Vec<Case> = vec![
                case("bare", inner, req),
                case(
                    TOWER,
                    move || tower::limit::ConcurrencyLimit::new(inner(), 1000),
                    req,
                ),
                case(OURS, move || OverloadLayer::new().layer(inner()), req),
                case(
                    "atscale OverloadLayer, none timed after the warm-up",
                    move || {
                        let layer = OverloadLayer::builder().sampling(u32::MAX).build();
                        layer.expect("valid").layer(inner())
                    },
                    req,
                ),
            ];
            let rows = compare(&rt, &cases);
            let title = format!(
                "{rt_name}, inner {}",
                if pending { "pending once" } else { "ready" }
            );
            report(&title, &rows);
        }
    }
    in_flight();
    println!("load average at end: {}", support::load());
}

/// The same comparison with 16 requests in flight (16 loops at once on a
/// current_thread runtime, the inner future pending once), where a server
/// spends its time: the layer's sampling and deadline check at work. With
/// and without a context carrying a 30 s deadline in each request (as the
/// server stack's deadline layer puts there).
fn in_flight() {
    use atscale::core::{Context as RequestContext, Origin};
    use support::{Case, case_in_flight, compare, pending_once};
    const TASKS: u64 = 16;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for deadline in [false, true] {
        let req = move |_: u64| {
            let mut r = Request::new(());
            if deadline {
                r.extensions_mut().insert(
                    RequestContext::new().with_budget(Duration::from_secs(30), Origin::Header),
                );
            }
            r
        };
        let inner = || {
            service_fn(|r: Request<()>| async move {
                let answer = black_box(r).uri().path().len();
                pending_once(Ok::<_, Infallible>(answer)).await
            })
        };
        let cases: Vec<Case> = vec![
            case_in_flight("bare", inner, req, TASKS),
            case_in_flight(
                TOWER,
                move || tower::limit::ConcurrencyLimit::new(inner(), 1000),
                req,
                TASKS,
            ),
            case_in_flight(
                OURS,
                move || OverloadLayer::new().layer(inner()),
                req,
                TASKS,
            ),
        ];
        let rows = compare(&rt, &cases);
        let title = format!(
            "current_thread, {TASKS} in flight, inner pending once, {}",
            if deadline {
                "each request carrying a 30 s deadline"
            } else {
                "no deadline"
            }
        );
        report(&title, &rows);
    }
}

/// The overhead bench's anchor and the layer measured against it.
const TOWER: &str = "tower ConcurrencyLimit(1000)";
const OURS: &str = "atscale OverloadLayer (default: Vegas)";

/// One comparison's table, the ratio of our overhead to tower's, and the
/// quartiles.
fn report(title: &str, rows: &[support::Row]) {
    support::print(title, rows);
    let (m, lo, hi) = support::ratio(rows, OURS, TOWER);
    println!("\noverhead ratio ours / tower: {m:.2}x ({lo:.2}..{hi:.2})");
    quartiles(rows);
}

/// Quartiles of each case's per-repetition overhead over bare, and of the
/// per-repetition ratio of each atscale case's overhead to tower's.
fn quartiles(rows: &[support::Row]) {
    fn q(mut v: Vec<f64>) -> (f64, f64, f64) {
        v.sort_by(f64::total_cmp);
        let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        (at(0.25), at(0.5), at(0.75))
    }
    let bare = &rows[0].samples;
    let tower = &rows[1].samples;
    for r in &rows[1..] {
        let diffs: Vec<f64> = r.samples.iter().zip(bare).map(|(x, b)| x - b).collect();
        let (q1, q2, q3) = q(diffs);
        print!(
            "{}: overhead quartiles {q1:+.1} / {q2:+.1} / {q3:+.1} ns",
            r.name
        );
        if r.name.starts_with("atscale") {
            let ratios: Vec<f64> = (0..bare.len())
                .map(|i| (r.samples[i] - bare[i]) / (tower[i] - bare[i]))
                .collect();
            let (q1, q2, q3) = q(ratios);
            // The ratio of two per-repetition medians, less sensitive to one
            // repetition where tower's overhead came out near zero.
            let m = |v: Vec<f64>| q(v).1;
            let ours = m(r.samples.iter().zip(bare).map(|(x, b)| x - b).collect());
            let theirs = m(tower.iter().zip(bare).map(|(x, b)| x - b).collect());
            print!(
                "; ratio to tower per repetition {q1:.2} / {q2:.2} / {q3:.2}, of the medians {:.2}",
                ours / theirs
            );
        }
        println!();
    }
}

// ---------------------------------------------------------------- real clock

/// The real-clock check: an axum server on loopback, on a thread and a
/// current_thread runtime of its own (one "CPU"), whose handler burns 4 ms
/// of real CPU in 0.5 ms slices with a yield between them (so requests share
/// the thread as they would share cores), behind ErrorEnrich → Deadline
/// (`x-deadline-ms`) → [OverloadLayer::new()]; an open-loop client sends
/// `load` × the measured capacity for 3 s with 100 ms deadlines.
mod real {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use atscale::ServiceBuilderExt;
    use atscale::deadline::DeadlineLayer;
    use atscale::error::ErrorEnrichLayer;
    use atscale::overload::OverloadLayer;
    use axum::Router;
    use axum::routing::get;
    use http::{HeaderName, Request, StatusCode};
    use http_body_util::Empty;
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    const X_DEADLINE: HeaderName = HeaderName::from_static("x-deadline-ms");
    const RUN: Duration = Duration::from_secs(3);
    type HttpClient = Client<HttpConnector, Empty<bytes::Bytes>>;

    async fn burn() -> &'static str {
        for _ in 0..8 {
            let start = Instant::now();
            while start.elapsed() < Duration::from_micros(500) {
                std::hint::spin_loop();
            }
            tokio::task::yield_now().await;
        }
        "done"
    }

    fn server(overload: Option<OverloadLayer>) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let outer = tower::ServiceBuilder::new()
                    .enrich_errors(ErrorEnrichLayer::new("bench"))
                    .deadline(
                        DeadlineLayer::server(Duration::from_secs(5)).with_header(X_DEADLINE),
                    );
                let router = Router::new().route("/", get(burn));
                let router = match overload {
                    Some(o) => router.layer(outer.overload(o)),
                    None => router.layer(outer),
                };
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let _ = axum::serve(listener, router).await;
            });
        });
        addr
    }

    fn request(addr: SocketAddr, deadline: bool) -> Request<Empty<bytes::Bytes>> {
        let mut b = Request::get(format!("http://{addr}/"));
        if deadline {
            b = b.header(X_DEADLINE, "100");
        }
        b.body(Empty::new()).unwrap()
    }

    /// Requests per second answered 200 within 100 ms; 503s; others.
    async fn offer(client: &HttpClient, addr: SocketAddr, rate: f64, run: Duration) -> [u64; 3] {
        let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        let start = Instant::now();
        let mut calls = Vec::new();
        while start.elapsed() < run {
            tick.tick().await;
            let (client, counts) = (client.clone(), counts.clone());
            calls.push(tokio::spawn(async move {
                let sent = Instant::now();
                let i = match client.request(request(addr, true)).await {
                    Ok(r)
                        if r.status() == StatusCode::OK
                            && sent.elapsed() <= Duration::from_millis(100) =>
                    {
                        0
                    }
                    Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => 1,
                    _ => 2,
                };
                counts[i].fetch_add(1, Ordering::Relaxed);
            }));
        }
        for c in calls {
            let _ = tokio::time::timeout(Duration::from_secs(5), c).await;
        }
        [0, 1, 2].map(|i| counts[i].load(Ordering::Relaxed))
    }

    pub(crate) fn check() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
            let bare = server(None);
            // Nominal capacity: 4 ms of CPU per request on one thread. (A
            // measured figure would move with whatever else runs on the 2
            // cores, the client included.)
            let capacity = 250.0;
            println!(
                "\n## Real clock: axum on loopback, 4 ms of CPU per request, 100 ms deadlines, {} s per run\n",
                RUN.as_secs()
            );
            println!(
                "capacity: nominal {capacity:.0} requests/s (4 ms of CPU each, one server thread); the client and any other work share the 2 cores\n"
            );
            println!("| configuration | load | 200 in time /s | % of nominal capacity | 503 | other (504, late) |");
            println!("| --- | ---: | ---: | ---: | ---: | ---: |");
            for load in [2.0, 5.0] {
                for with in [false, true] {
                    let addr = if with {
                        let addr = server(Some(OverloadLayer::new()));
                        // Ordinary traffic first, so the layer knows the service time.
                        offer(&client, addr, capacity / 2.0, Duration::from_millis(300)).await;
                        addr
                    } else {
                        bare
                    };
                    let [ok, refused, other] = offer(&client, addr, load * capacity, RUN).await;
                    let per_sec = ok as f64 / RUN.as_secs_f64();
                    println!(
                        "| {} | {load}x | {per_sec:.0} | {:.1} | {refused} | {other} |",
                        if with { "stack + `OverloadLayer::new()`" } else { "stack alone" },
                        per_sec / capacity * 100.0,
                    );
                }
            }
        });
    }
}

// ---------------------------------------------------------------- main

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // nothing for `cargo test --benches` to list or run
    }
    let seeds: u64 = std::env::var("OVERLOAD_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let configs = [
        Config::Alone,
        Config::TowerFixed(2),
        Config::TowerFixed(8),
        Config::TowerFixed(16),
        Config::TowerFixed(32),
        Config::TowerAccVegas,
        Config::TowerAccGradient2,
        Config::ResilienceAimd,
        Config::ResilienceVegas,
        Config::Ours(Algo::Gradient2),
        Config::Ours(Algo::Vegas),
        Config::Ours(Algo::Aimd),
    ];
    if std::env::var("OVERLOAD_ONLY_OVERHEAD").is_ok() {
        overhead();
        return;
    }
    if std::env::var("OVERLOAD_ONLY_REAL").is_ok() {
        println!("load average at start (1, 5, 15 min): {}", support::load());
        real::check();
        println!("load average at end: {}", support::load());
        return;
    }
    let only = std::env::var("OVERLOAD_ONLY").unwrap_or_default();
    let configs: Vec<Config> = configs
        .into_iter()
        .filter(|c| c.name().contains(&only))
        .collect();
    println!("load average at start (1, 5, 15 min): {}", support::load());
    println!("\n## Goodput, % of capacity (Poisson, {seeds} seeds pooled, 10 s each)\n");
    println!("| configuration | 0.5x | 1x | 2x | 5x | 10x |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let mut detail = Vec::new();
    let mut curves = Vec::new();
    for &config in &configs {
        let mut row = Vec::new();
        for &load in &LOADS {
            let runs: Vec<Outcome> = (0..seeds).map(|s| run(config, load, s, false)).collect();
            let f = figures(&runs, false);
            row.push(f.goodput);
            detail.push((config, load, f));
        }
        println!(
            "| {} | {} |",
            config.name(),
            row.iter()
                .map(|g| format!("{g:.1}"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        curves.push((config.name(), row));
    }
    println!("\n## Detail per load: statuses, latency of successes, wasted work, limits visited\n");
    println!(
        "| configuration | load | goodput % | 200 / 503 / 504 / other % | p50 / p99 ms | wasted % | limits |"
    );
    println!("| --- | ---: | ---: | --- | --- | ---: | ---: |");
    for (config, load, f) in &detail {
        let share = |s: u16| f.shares.get(&s).copied().unwrap_or(0.0) * 100.0;
        let other: f64 = f
            .shares
            .iter()
            .filter(|(s, _)| ![200, 503, 504].contains(*s))
            .map(|(_, v)| v * 100.0)
            .sum();
        let others: Vec<String> = f
            .shares
            .keys()
            .filter(|s| ![200, 503, 504].contains(*s))
            .map(|s| s.to_string())
            .collect();
        println!(
            "| {} | {load}x | {:.1} | {:.1} / {:.1} / {:.1} / {:.1}{} | {:.0} / {:.0} | {:.1} | {} |",
            config.name(),
            f.goodput,
            share(200),
            share(503),
            share(504),
            other,
            if others.is_empty() {
                String::new()
            } else {
                format!(" ({})", others.join(", "))
            },
            f.p50,
            f.p99,
            f.wasted,
            if f.limits == 0 {
                "—".to_string()
            } else {
                f.limits.to_string()
            }
        );
    }
    println!("\n## Step: capacity halves at t = 5 s, load {STEP_LOAD}x of the original capacity\n");
    println!(
        "| configuration | goodput % (of original capacity) | wasted % | recovery to 90% of new capacity |"
    );
    println!("| --- | ---: | ---: | ---: |");
    for &config in &configs {
        let runs: Vec<Outcome> = (0..seeds)
            .map(|s| run(config, STEP_LOAD, s, true))
            .collect();
        let f = figures(&runs, true);
        println!(
            "| {} | {:.1} | {:.1} | {} |",
            config.name(),
            f.goodput,
            f.wasted,
            f.recovery
                .map(|r| format!("{r:.1} s"))
                .unwrap_or_else(|| "never".into())
        );
    }
    if std::env::var("OVERLOAD_SKIP_REAL").is_err() {
        real::check();
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/overload-goodput.svg");
    std::fs::write(path, svg(&curves)).expect("write the SVG");
    println!("\nwrote {path}");
    println!("load average after the simulation: {}", support::load());
    if std::env::var("OVERLOAD_SKIP_OVERHEAD").is_err() {
        overhead();
    }
}
