//! The per-call overhead harness of `../shared/BENCHMARKS.md`: cases of one
//! comparison run interleaved in one process (A B C A B C …), each repetition
//! ~100 ms after one discarded warm-up, 11 repetitions; every iteration is
//! `svc.ready().await` + `svc.call(x).await` inside a task spawned on the
//! runtime, and the figure is the median of the per-repetition differences
//! against the bare service, with min..max.

#![allow(dead_code, missing_docs)] // each bench binary uses part of it

use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use atscale::core::{Carrier, Context as RequestContext};
use tokio::runtime::Runtime;
use tower::{Service, ServiceExt};

type Measure = Arc<dyn Fn(u64) -> Pin<Box<dyn Future<Output = Duration> + Send>> + Send + Sync>;

/// One service configuration to measure.
pub(crate) struct Case {
    name: String,
    measure: Measure,
}

/// A case: `make_service` builds the stack once per measurement, `make_request`
/// builds each request (its cost is in every case alike).
pub(crate) fn case<S, R>(
    name: impl Into<String>,
    make_service: impl Fn() -> S + Send + Sync + 'static,
    make_request: impl Fn(u64) -> R + Send + Sync + Clone + 'static,
) -> Case
where
    S: Service<R> + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: std::fmt::Debug,
    R: Send + 'static,
{
    let make_service = Arc::new(make_service);
    Case {
        name: name.into(),
        measure: Arc::new(move |iters| {
            let mut svc = make_service();
            let make_request = make_request.clone();
            Box::pin(async move {
                let start = Instant::now();
                for i in 0..iters {
                    let ready = svc.ready().await.expect("ready");
                    let out = ready.call(black_box(make_request(i))).await.expect("call");
                    black_box(out);
                }
                start.elapsed()
            })
        }),
    }
}

/// [`case`] with `tasks` loops at once (each a clone of the service): with
/// an inner future that waits, `tasks` requests in flight. `iters` calls in
/// all.
pub(crate) fn case_in_flight<S, R>(
    name: impl Into<String>,
    make_service: impl Fn() -> S + Send + Sync + 'static,
    make_request: impl Fn(u64) -> R + Send + Sync + Clone + 'static,
    tasks: u64,
) -> Case
where
    S: Service<R> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: std::fmt::Debug,
    R: Send + 'static,
{
    let make_service = Arc::new(make_service);
    Case {
        name: name.into(),
        measure: Arc::new(move |iters| {
            let svc = make_service();
            let loops: Vec<_> = (0..tasks)
                .map(|_| {
                    let mut svc = svc.clone();
                    let make_request = make_request.clone();
                    async move {
                        for i in 0..iters / tasks {
                            let ready = svc.ready().await.expect("ready");
                            let out = ready.call(black_box(make_request(i))).await.expect("call");
                            black_box(out);
                        }
                    }
                })
                .collect();
            Box::pin(async move {
                let start = Instant::now();
                let handles: Vec<_> = loops.into_iter().map(tokio::spawn).collect();
                for h in handles {
                    h.await.expect("bench loop");
                }
                start.elapsed()
            })
        }),
    }
}

/// An inner future that is pending once (waking itself) before answering,
/// so timers and wakers in the layers under test really get registered.
pub(crate) struct PendingOnce<T> {
    value: Option<T>,
    polled: bool,
}

impl<T: Unpin> Future for PendingOnce<T> {
    type Output = T;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        if !self.polled {
            self.polled = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(self.value.take().expect("polled after completion"))
    }
}

/// `value`, after being pending once.
pub(crate) fn pending_once<T>(value: T) -> PendingOnce<T> {
    PendingOnce {
        value: Some(value),
        polled: false,
    }
}

/// A non-HTTP request type for the layers that need a [`Carrier`]: the
/// context rides in a field.
pub(crate) struct Job {
    pub(crate) id: u64,
    cx: Option<RequestContext>,
}

impl Carrier for Job {
    fn context(&self) -> Option<&RequestContext> {
        self.cx.as_ref()
    }
    fn set_context(&mut self, cx: RequestContext) {
        self.cx = Some(cx);
    }
}

/// Request `id`, carrying no context yet.
pub(crate) fn job(id: u64) -> Job {
    Job { id, cx: None }
}

/// Median and range of one case, in nanoseconds per call.
pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) per_call: f64,
    /// Overhead over the first (bare) case: median, min, max of per-repetition differences.
    pub(crate) overhead: (f64, f64, f64),
    pub(crate) samples: Vec<f64>,
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) fn range(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// One case of a comparison: runs `iters` iterations, returns the time taken.
pub(crate) type Run<'a> = Box<dyn FnMut(u64) -> Duration + 'a>;

/// Runs `cases` interleaved (A B C A B C …) after one calibrating run each
/// (the discarded warm-up); returns each case's samples in ns per iteration.
/// `BENCH_REPETITIONS` (default 11) and `BENCH_REPETITION_MS` (default 100)
/// change the schedule.
pub(crate) fn interleave(cases: &mut [(&str, Run<'_>)]) -> Vec<Vec<f64>> {
    interleave_checked(cases, |_| Ok(()))
}

/// [`interleave`], asking `valid(case index)` after every timed repetition
/// (not after the calibrating runs) whether it measured what it claims; a
/// repetition it refuses is printed and ends the process with exit code 2:
/// a figure is never made from it.
pub(crate) fn interleave_checked(
    cases: &mut [(&str, Run<'_>)],
    mut valid: impl FnMut(usize) -> Result<(), String>,
) -> Vec<Vec<f64>> {
    let repetitions = std::env::var("BENCH_REPETITIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(11);
    let target = Duration::from_millis(
        std::env::var("BENCH_REPETITION_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100),
    );
    let iters: Vec<u64> = cases
        .iter_mut()
        .map(|(_, run)| {
            let mut n = 1_000u64;
            loop {
                let took = run(n);
                if took >= target / 4 || n > 1 << 32 {
                    let per = took.as_secs_f64() / n as f64;
                    break ((target.as_secs_f64() / per) as u64).max(1_000);
                }
                n *= 4;
            }
        })
        .collect();
    let mut samples = vec![Vec::with_capacity(repetitions); cases.len()];
    for repetition in 0..repetitions {
        for (i, (name, run)) in cases.iter_mut().enumerate() {
            let took = run(iters[i]);
            if let Err(why) = valid(i) {
                eprintln!(
                    "refused: repetition {} of {repetitions} of {name:?}: {why}; no figure is made from this run",
                    repetition + 1
                );
                std::process::exit(2);
            }
            samples[i].push(took.as_nanos() as f64 / iters[i] as f64);
        }
    }
    samples
}

/// The machine's load averages (1, 5, 15 min) from `/proc/loadavg`, for
/// the record of every run.
pub(crate) fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| String::from("unknown"))
}

/// Nanoseconds the calling thread has spent on a CPU (Linux
/// `/proc/thread-self/schedstat`), if the kernel tells.
pub(crate) fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// One thread's timed window in a [`concurrently`] run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Window {
    pub(crate) start: Instant,
    pub(crate) end: Instant,
    /// Operations done in the window.
    pub(crate) ops: u64,
    /// Time on a CPU during the window, if known.
    pub(crate) on_cpu: Option<Duration>,
}

/// What a [`concurrently`] run measured, and how far its threads really
/// ran at the same time.
#[derive(Clone, Debug)]
pub(crate) struct Concurrent {
    pub(crate) windows: Vec<Window>,
}

impl Concurrent {
    /// The mean over threads of the time per operation in each thread's
    /// own window, in seconds: what one operation costs a thread while the
    /// others run.
    pub(crate) fn per_op_secs(&self) -> f64 {
        let sum: f64 = self
            .windows
            .iter()
            .map(|w| (w.end - w.start).as_secs_f64() / w.ops.max(1) as f64)
            .sum();
        sum / self.windows.len() as f64
    }

    /// From the first start to the last end.
    pub(crate) fn span(&self) -> Duration {
        let start = self.windows.iter().map(|w| w.start).min().expect("threads");
        let end = self.windows.iter().map(|w| w.end).max().expect("threads");
        end - start
    }

    /// The time every window was open at once, over [`span`](Self::span):
    /// 1.0 when the windows coincide, 0 when they took turns.
    pub(crate) fn overlap(&self) -> f64 {
        let start = self.windows.iter().map(|w| w.start).max().expect("threads");
        let end = self.windows.iter().map(|w| w.end).min().expect("threads");
        let common = end.saturating_duration_since(start);
        common.as_secs_f64() / self.span().as_secs_f64()
    }

    /// The smallest share of its own window any thread spent on a CPU
    /// (1.0 when no thread was ever descheduled), if the kernel tells.
    pub(crate) fn on_cpu(&self) -> Option<f64> {
        self.windows
            .iter()
            .map(|w| {
                w.on_cpu
                    .map(|c| c.as_secs_f64() / (w.end - w.start).as_secs_f64())
            })
            .try_fold(f64::MAX, |lo, share| Some(lo.min(share?)))
    }

    /// `Err` unless the windows overlap by at least `share` and every thread
    /// was on a CPU for at least `share` of its window: only then did the
    /// threads contend instead of taking turns.
    pub(crate) fn check(&self, share: f64) -> Result<(), String> {
        let overlap = self.overlap();
        if overlap < share {
            return Err(format!(
                "the threads' timed windows overlap {:.1}% < {:.0}%",
                overlap * 100.0,
                share * 100.0
            ));
        }
        match self.on_cpu() {
            Some(on_cpu) if on_cpu < share => Err(format!(
                "a thread was on a CPU for {:.1}% < {:.0}% of its window (descheduled: the machine is loaded)",
                on_cpu * 100.0,
                share * 100.0
            )),
            _ => Ok(()),
        }
    }
}

/// Runs `op` on each of `threads` threads released together from a
/// barrier, each recording its own timed window, operations and CPU time.
/// A thread stops after `iters` operations, or as soon as another thread
/// has done its `iters` (checked every 64 operations): the windows end
/// together, so no thread's figure includes time it ran alone.
pub(crate) fn concurrently(threads: usize, iters: u64, op: &(dyn Fn() + Sync)) -> Concurrent {
    let barrier = std::sync::Barrier::new(threads);
    let done = std::sync::atomic::AtomicBool::new(false);
    let windows = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let cpu = thread_cpu_ns();
                    let start = Instant::now();
                    let mut ops = 0;
                    while ops < iters {
                        for _ in 0..64 {
                            op();
                        }
                        ops += 64;
                        if done.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                    }
                    done.store(true, std::sync::atomic::Ordering::Relaxed);
                    let end = Instant::now();
                    let on_cpu = cpu
                        .zip(thread_cpu_ns())
                        .map(|(a, b)| Duration::from_nanos(b.saturating_sub(a)));
                    Window {
                        start,
                        end,
                        ops,
                        on_cpu,
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .collect()
    });
    Concurrent { windows }
}

/// Runs service `case`s interleaved on `rt`, each measurement in a task
/// spawned on it; the first case is the bare service.
pub(crate) fn compare(rt: &Runtime, cases: &[Case]) -> Vec<Row> {
    let mut runs: Vec<(&str, Run<'_>)> = cases
        .iter()
        .map(|case| {
            let run: Run<'_> = Box::new(move |iters| {
                // Some layers (tower's RateLimit) make a timer when built.
                let fut = {
                    let _runtime = rt.enter();
                    (case.measure)(iters)
                };
                rt.block_on(async move { tokio::spawn(fut).await.expect("bench task") })
            });
            (case.name.as_str(), run)
        })
        .collect();
    let samples = interleave(&mut runs);
    let bare = samples[0].clone();
    cases
        .iter()
        .zip(samples)
        .map(|(case, s)| {
            let diffs: Vec<f64> = s.iter().zip(&bare).map(|(x, b)| x - b).collect();
            let (lo, hi) = range(&diffs);
            Row {
                name: case.name.clone(),
                per_call: median(s.clone()),
                overhead: (median(diffs), lo, hi),
                samples: s,
            }
        })
        .collect()
}

/// The median over repetitions of `row`'s overhead divided by `anchor`'s.
pub(crate) fn ratio(rows: &[Row], row: &str, anchor: &str) -> (f64, f64, f64) {
    let find = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no case {name}"))
    };
    let (bare, r, a) = (&rows[0].samples, &find(row).samples, &find(anchor).samples);
    let ratios: Vec<f64> = (0..bare.len())
        .map(|i| (r[i] - bare[i]) / (a[i] - bare[i]))
        .collect();
    let (lo, hi) = range(&ratios);
    (median(ratios), lo, hi)
}

/// Prints `rows` as a markdown table.
pub(crate) fn print(title: &str, rows: &[Row]) {
    println!("\n### {title}\n");
    println!("| case | ns/call | overhead vs bare (median, min..max) |");
    println!("| --- | ---: | --- |");
    for r in rows {
        let (m, lo, hi) = r.overhead;
        println!(
            "| {} | {:.1} | {:+.1} ns ({:+.1}..{:+.1}) |",
            r.name, r.per_call, m, lo, hi
        );
    }
}

/// A current_thread runtime and a multi_thread one with 2 workers, with names.
pub(crate) fn runtimes() -> Vec<(&'static str, Runtime)> {
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    vec![
        ("current_thread", current),
        ("multi_thread (2 workers)", multi),
    ]
}
