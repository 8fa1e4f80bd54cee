//! Rate limiting: the admission hot path against governor (default quanta
//! clock), three combined limits against one, two threads on one limiter,
//! the layer's per-call overhead against `tower::limit::RateLimit`, and a
//! 10 s accuracy run on the real clock.
//!
//! `cargo bench --bench ratelimit` runs everything (about 2 minutes);
//! `cargo bench --bench ratelimit -- hot layer threads accuracy` picks parts.
//!
//! Method (`../shared/BENCHMARKS.md`): the cases of one comparison run
//! interleaved in one process (A B C A B C …), ~100 ms per repetition after
//! a discarded calibration run, 11 repetitions; figures are medians with
//! min..max over repetitions, ratios are per repetition against the anchor.
//! Rates are so high that nothing is ever limited.
//!
//! The two-thread comparison counts a repetition only if both threads ran
//! at once: their timed windows overlap by at least 90% and each was on a
//! CPU for at least 90% of its window (`/proc/thread-self/schedstat`).
//! Otherwise it prints why and exits with status 2. On a machine loaded by
//! other work, run that part at real-time priority so that the threads are
//! not descheduled: `chrt -f 10 target/release/deps/ratelimit-<hash> threads`
//! (the binary `cargo bench --bench ratelimit --no-run` names).

use std::cell::RefCell;
use std::convert::Infallible;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod support;

use atscale::ratelimit::{Limit, Limiter, MultiLimiter, RateLimitLayer};
use governor::{Quota, RateLimiter};
use support::{
    Concurrent, Run, concurrently, interleave, interleave_checked, median, pending_once, range,
};
use tower::{Layer, Service, ServiceExt, service_fn};

const HUGE: u32 = 1_000_000_000;

fn huge_limit() -> Limit {
    Limit::per_second(HUGE).expect("valid")
}

fn governor_limiter() -> governor::DefaultDirectRateLimiter {
    RateLimiter::direct(Quota::per_second(NonZeroU32::new(HUGE).expect("non-zero")))
}

// ---------------------------------------------------------------- harness

fn print_ratios(title: &str, names: &[&str], samples: &[Vec<f64>], anchor: usize) {
    println!("\n{title}");
    println!(
        "  {:<44} {:>22} {:>24}",
        "case", "ns/op median (min..max)", "ratio to anchor (min..max)"
    );
    for (i, s) in samples.iter().enumerate() {
        let (lo, hi) = range(s);
        let ratios: Vec<f64> = s.iter().zip(&samples[anchor]).map(|(x, a)| x / a).collect();
        let (rlo, rhi) = range(&ratios);
        let mark = if i == anchor { " (anchor)" } else { "" };
        println!(
            "  {:<44} {:>7.2} ({:>6.2}..{:>6.2}) {:>8.2}x ({:.2}..{:.2}){mark}",
            names[i],
            median(s.clone()),
            lo,
            hi,
            median(ratios.clone()),
            rlo,
            rhi
        );
    }
}

fn print_overheads(title: &str, names: &[&str], samples: &[Vec<f64>], anchor: usize) {
    println!("\n{title}");
    println!(
        "  {:<34} {:>24} {:>28} {:>30}",
        "case",
        "ns/call median (min..max)",
        "overhead over bare (min..max)",
        "overhead ratio to anchor (min..max)"
    );
    let overhead = |i: usize| -> Vec<f64> {
        samples[i]
            .iter()
            .zip(&samples[0])
            .map(|(x, b)| x - b)
            .collect()
    };
    let anchor_overhead = overhead(anchor);
    for (i, s) in samples.iter().enumerate() {
        let (lo, hi) = range(s);
        let o = overhead(i);
        let (olo, ohi) = range(&o);
        // Per repetition, this case's overhead over the anchor's.
        let ratios: Vec<f64> = o.iter().zip(&anchor_overhead).map(|(x, a)| x / a).collect();
        let (rlo, rhi) = range(&ratios);
        let ratio = if i == 0 {
            String::from("-")
        } else {
            format!("{:.2}x ({rlo:.2}..{rhi:.2})", median(ratios))
        };
        let mark = if i == anchor { " (anchor)" } else { "" };
        println!(
            "  {:<34} {:>7.1} ({:>6.1}..{:>6.1}) {:>+9.1} ({:+.1}..{:+.1}) {:>24}{mark}",
            names[i],
            median(s.clone()),
            lo,
            hi,
            median(o),
            olo,
            ohi,
            ratio
        );
    }
}

// ---------------------------------------------------------------- hot path

fn hot_path() {
    let ours = Limiter::new(huge_limit());
    let gov = governor_limiter();
    let shared_gov = Arc::new(governor_limiter());
    let a = Limiter::new(huge_limit());
    let b = Limiter::new(huge_limit());
    let c = Limiter::new(huge_limit());
    let three = MultiLimiter::new([a, b, c]).expect("valid set");
    let (g1, g2, g3) = (governor_limiter(), governor_limiter(), governor_limiter());

    let mut cases: Vec<(&str, Run<'_>)> = vec![
        (
            "governor check() (quanta clock)",
            Box::new(|n| {
                let t = Instant::now();
                for _ in 0..n {
                    black_box(gov.check().is_ok());
                }
                t.elapsed()
            }),
        ),
        (
            "ours Limiter::try_acquire(1)",
            Box::new(|n| {
                let t = Instant::now();
                for _ in 0..n {
                    black_box(ours.try_acquire(black_box(1)).is_ok());
                }
                t.elapsed()
            }),
        ),
        (
            "ours MultiLimiter of 3, try_acquire(1)",
            Box::new(|n| {
                let t = Instant::now();
                for _ in 0..n {
                    black_box(three.try_acquire(black_box(1)).is_ok());
                }
                t.elapsed()
            }),
        ),
        (
            "governor check(), limiter in an Arc",
            Box::new(|n| {
                let t = Instant::now();
                for _ in 0..n {
                    black_box(black_box(&shared_gov).check().is_ok());
                }
                t.elapsed()
            }),
        ),
        (
            "governor, 3 limiters checked in turn",
            Box::new(|n| {
                let t = Instant::now();
                for _ in 0..n {
                    black_box(g1.check().is_ok() && g2.check().is_ok() && g3.check().is_ok());
                }
                t.elapsed()
            }),
        ),
    ];
    let names: Vec<&str> = cases.iter().map(|(n, _)| *n).collect();
    let samples = interleave(&mut cases);
    print_ratios(
        "Uncontended admission (anchor: governor check())",
        &names,
        &samples,
        0,
    );
    print_ratios(
        "Three combined limits against one (anchor: ours, one limit)",
        &names[1..],
        &samples[1..],
        0,
    );
}

// ---------------------------------------------------------------- threads

/// The share of its window every thread must overlap the other's and spend
/// on a CPU, or the repetition is refused: below it the threads took turns
/// instead of contending.
const CONTENDED: f64 = 0.9;

/// Two threads hammering one shared limiter, released together from a
/// barrier and stopped together; the time per op per thread (mean of the
/// two), scaled to `n` ops for the harness. Every run's windows are kept in
/// `record` for the check.
fn two_threads<'a>(
    op: impl Fn() + Sync + 'a,
    record: &'a RefCell<Vec<Concurrent>>,
) -> impl FnMut(u64) -> Duration + 'a {
    move |n| {
        // A pause before every run, outside the timed windows: under
        // `chrt -f` (see the README) it keeps the two spinning threads
        // within the kernel's real-time budget (95% of each second), which
        // would otherwise throttle them mid-window.
        std::thread::sleep(Duration::from_millis(100));
        let run = concurrently(2, n, &op);
        let per_op = run.per_op_secs();
        record.borrow_mut().push(run);
        Duration::from_secs_f64(per_op * n as f64)
    }
}

fn threads() {
    let ours = Limiter::new(huge_limit());
    let gov = governor_limiter();
    let a = Limiter::new(huge_limit());
    let b = Limiter::new(huge_limit());
    let c = Limiter::new(huge_limit());
    let three = MultiLimiter::new([a, b, c]).expect("valid set");
    let records: [RefCell<Vec<Concurrent>>; 3] = Default::default();
    let mut cases: Vec<(&str, Run<'_>)> = vec![
        (
            "governor check(), 2 threads",
            Box::new(two_threads(
                || {
                    black_box(gov.check().is_ok());
                },
                &records[0],
            )),
        ),
        (
            "ours try_acquire(1), 2 threads",
            Box::new(two_threads(
                || {
                    black_box(ours.try_acquire(1).is_ok());
                },
                &records[1],
            )),
        ),
        (
            "ours MultiLimiter of 3, 2 threads",
            Box::new(two_threads(
                || {
                    black_box(three.try_acquire(1).is_ok());
                },
                &records[2],
            )),
        ),
    ];
    let names: Vec<&str> = cases.iter().map(|(n, _)| *n).collect();
    let mut checked: [Vec<Concurrent>; 3] = Default::default();
    let samples = interleave_checked(&mut cases, |i| {
        let last = records[i].borrow().last().cloned().expect("a run");
        last.check(CONTENDED)?;
        checked[i].push(last);
        Ok(())
    });
    print_ratios(
        "Two threads on one shared limiter, per op per thread (anchor: governor)",
        &names,
        &samples,
        0,
    );
    println!(
        "  every repetition: both threads released from a barrier, windows overlapping >= {:.0}% and each thread on a CPU >= {:.0}% of its window",
        CONTENDED * 100.0,
        CONTENDED * 100.0
    );
    for (name, runs) in names.iter().zip(&checked) {
        let overlap = runs
            .iter()
            .map(Concurrent::overlap)
            .fold(f64::MAX, f64::min);
        let on_cpu = runs
            .iter()
            .filter_map(Concurrent::on_cpu)
            .fold(f64::MAX, f64::min);
        println!(
            "  {name:<44} least overlap {:.1}%, least time on a CPU {:.1}%",
            overlap * 100.0,
            on_cpu * 100.0
        );
    }
}

// ---------------------------------------------------------------- layer

type Req = http::Request<u64>;

fn svc_loop<S>(rt: &tokio::runtime::Runtime, make: impl Fn() -> S + 'static) -> Run<'_>
where
    S: Service<Req> + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: std::fmt::Debug,
{
    Box::new(move |n| {
        let mut svc = {
            let _runtime = rt.enter(); // tower's RateLimit makes a timer
            make()
        };
        rt.block_on(async move {
            tokio::spawn(async move {
                let t = Instant::now();
                for i in 0..n {
                    let ready = svc.ready().await.expect("ready");
                    let out = ready.call(black_box(http::Request::new(i))).await;
                    black_box(out.expect("call"));
                }
                t.elapsed()
            })
            .await
            .expect("bench task")
        })
    })
}

fn layer_overhead() {
    for (flavor, rt) in [
        (
            "current_thread",
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
        ),
        (
            "multi_thread (2 workers)",
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime"),
        ),
    ] {
        for pending in [false, true] {
            let ready_inner =
                || service_fn(|r: Req| std::future::ready(Ok::<_, Infallible>(*r.body())));
            let pending_inner =
                || service_fn(|r: Req| pending_once(Ok::<_, Infallible>(*r.body())));
            let wait_layer = RateLimitLayer::new(Limiter::new(huge_limit()));
            let reject_layer = RateLimitLayer::reject(Limiter::new(huge_limit()));
            let tower_layer =
                tower::limit::RateLimitLayer::new(u64::MAX / 4, Duration::from_secs(1));
            macro_rules! cases {
                ($inner:expr) => {{
                    let (w, r, t) = (
                        wait_layer.clone(),
                        reject_layer.clone(),
                        tower_layer.clone(),
                    );
                    let v: Vec<(&str, Run<'_>)> = vec![
                        ("bare service", svc_loop(&rt, move || $inner())),
                        (
                            "tower::limit::RateLimit",
                            svc_loop(&rt, move || t.layer($inner())),
                        ),
                        (
                            "ours RateLimitLayer (wait mode)",
                            svc_loop(&rt, move || w.layer($inner())),
                        ),
                        (
                            "ours RateLimitLayer (reject mode)",
                            svc_loop(&rt, move || r.layer($inner())),
                        ),
                    ];
                    v
                }};
            }
            let mut cases = if pending {
                cases!(pending_inner)
            } else {
                cases!(ready_inner)
            };
            let names: Vec<&str> = cases.iter().map(|(n, _)| *n).collect();
            let samples = interleave(&mut cases);
            let inner = if pending { "pending once" } else { "ready" };
            print_overheads(
                &format!("Layer overhead, {flavor}, inner {inner} (anchor: tower RateLimit)"),
                &names,
                &samples,
                1,
            );
        }
    }
}

// ---------------------------------------------------------------- accuracy

fn accuracy() {
    const RATE: u32 = 10_000;
    const BURST: u32 = 500;
    let run = Duration::from_secs(10);

    // Reject mode, one thread spinning on try_acquire for 10 s.
    let limiter = Limiter::new(Limit::per_second(RATE).unwrap().burst(BURST).unwrap());
    let start = Instant::now();
    let mut admitted = 0u64;
    let mut tries = 0u64;
    loop {
        tries += 1;
        if limiter.try_acquire(1).is_ok() {
            admitted += 1;
        }
        if tries.is_multiple_of(64) && start.elapsed() >= run {
            break;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let expected = f64::from(BURST) + f64::from(RATE) * elapsed;
    println!(
        "\nAccuracy, real clock, reject mode: {RATE}/s burst {BURST}, {elapsed:.3} s, {tries} tries: \
         admitted {admitted}, expected burst + rate x time = {expected:.0}, error {:+.4}%",
        (admitted as f64 - expected) / expected * 100.0
    );

    // Wait mode through the layer: 16 concurrent clients on a 2-worker
    // runtime, each calling in a loop for 10 s.
    const WAIT_RATE: u32 = 2_000;
    const WAIT_BURST: u32 = 100;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let layer = RateLimitLayer::builder()
        .limiter(Limiter::new(
            Limit::per_second(WAIT_RATE)
                .unwrap()
                .burst(WAIT_BURST)
                .unwrap(),
        ))
        .max_waiters(64)
        .build()
        .expect("valid");
    let svc = layer.layer(service_fn(|r: Req| async move {
        Ok::<_, Infallible>(*r.body())
    }));
    let admitted = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..16 {
            let mut svc = svc.clone();
            let admitted = admitted.clone();
            clients.push(tokio::spawn(async move {
                while start.elapsed() < run {
                    let ready = svc.ready().await.expect("ready");
                    if ready.call(http::Request::new(0)).await.is_ok() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for c in clients {
            c.await.expect("client");
        }
    });
    // Count only what was admitted within the run: requests admitted after
    // `run` (the last waiters) are in `admitted` too, so compare against the
    // time the last one was admitted.
    let elapsed = start.elapsed().as_secs_f64();
    let admitted = admitted.load(Ordering::Relaxed);
    let expected = f64::from(WAIT_BURST) + f64::from(WAIT_RATE) * elapsed;
    println!(
        "Accuracy, real clock, wait mode via the layer: {WAIT_RATE}/s burst {WAIT_BURST}, 16 clients, \
         {elapsed:.3} s: admitted {admitted}, expected burst + rate x time = {expected:.0}, error {:+.4}%",
        (admitted as f64 - expected) / expected * 100.0
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |part: &str| args.is_empty() || args.iter().any(|a| a == part);
    let start = Instant::now();
    println!("load average at start (1, 5, 15 min): {}", support::load());
    if wants("hot") {
        hot_path();
    }
    if wants("threads") {
        threads();
    }
    if wants("layer") {
        layer_overhead();
    }
    if wants("accuracy") {
        accuracy();
    }
    println!(
        "\n(total {:.0} s; load average at the end: {})",
        start.elapsed().as_secs_f64(),
        support::load()
    );
}
