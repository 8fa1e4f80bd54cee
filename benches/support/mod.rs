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
    for _ in 0..repetitions {
        for (i, (_, run)) in cases.iter_mut().enumerate() {
            let took = run(iters[i]);
            samples[i].push(took.as_nanos() as f64 / iters[i] as f64);
        }
    }
    samples
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
