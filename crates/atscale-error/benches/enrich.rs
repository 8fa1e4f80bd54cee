//! ErrorEnrich's per-request cost, against a bare service and against axum's
//! `HandleError` (the layer it replaces), on the success path and on the
//! error path.
//!
//! `cargo bench -p atscale-error --bench enrich`. Each iteration is
//! `ready().await` + `call(req).await` inside a task spawned on a
//! current-thread runtime, as `shared/BENCHMARKS.md` asks.
//!
//! One run on the project's shared 2-core machine (criterion medians,
//! `--warm-up-time 1 --measurement-time 3`; noisy, compare the ratios):
//!
//! | case | bare | axum `HandleError` | ErrorEnrich |
//! | --- | --- | --- | --- |
//! | success | 50 ns | 123 ns (+73) | 114 ns (+64) |
//! | error (rate limited) | 50 ns | 92 ns (+42) | 1.61 µs (+1.56 µs) |
//!
//! The error path buys a random id from the OS, a wall-clock timestamp, a
//! problem+json document and the log event (no subscriber here).

use std::hint::black_box;
use std::time::{Duration, Instant};

use atscale_core::{BoxError, RateLimited};
use atscale_error::ErrorEnrichLayer;
use axum::error_handling::HandleErrorLayer;
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::Empty;
use tower::{Layer, Service, ServiceExt, service_fn};

type Req = Request<()>;
type Res = Response<Empty<Bytes>>;

fn request() -> Req {
    let mut req = Request::new(());
    *req.uri_mut() = Uri::from_static("/orders/42");
    req
}

fn ok_service()
-> impl Service<Req, Response = Res, Error = BoxError, Future: Send> + Clone + Send + 'static {
    service_fn(|_req: Req| async { Ok::<_, BoxError>(Response::new(Empty::new())) })
}

fn failing_service()
-> impl Service<Req, Response = Res, Error = BoxError, Future: Send> + Clone + Send + 'static {
    service_fn(|_req: Req| async {
        Err::<Res, BoxError>(Box::new(RateLimited::new(Duration::from_millis(1500))))
    })
}

/// Times `iters` calls of `svc` in a spawned task.
fn run<S>(rt: &tokio::runtime::Runtime, mut svc: S, iters: u64) -> Duration
where
    S: Service<Req> + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: std::fmt::Debug + Send,
{
    rt.block_on(async move {
        tokio::spawn(async move {
            let start = Instant::now();
            for _ in 0..iters {
                let svc = svc.ready().await.unwrap();
                let res = svc.call(black_box(request())).await;
                black_box(res.ok());
            }
            start.elapsed()
        })
        .await
        .unwrap()
    })
}

fn handle_error<S>(
    inner: S,
) -> impl Service<Req, Error = std::convert::Infallible, Future: Send, Response: Send> + Send + 'static
where
    S: Service<Req, Response = Res, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    HandleErrorLayer::new(|_err: BoxError| async { StatusCode::TOO_MANY_REQUESTS }).layer(inner)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let enrich = ErrorEnrichLayer::builder("bench")
        .help_link("https://docs.example.com/errors/{code}")
        .build()
        .unwrap();

    let mut ok = c.benchmark_group("success path");
    ok.bench_function("bare", |b| b.iter_custom(|n| run(&rt, ok_service(), n)));
    ok.bench_function("axum HandleError", |b| {
        b.iter_custom(|n| run(&rt, handle_error(ok_service()), n))
    });
    ok.bench_function("ErrorEnrich", |b| {
        b.iter_custom(|n| run(&rt, enrich.layer(ok_service()), n))
    });
    ok.finish();

    // No tracing subscriber is installed: the log event costs its level check.
    let mut err = c.benchmark_group("error path (rate limited)");
    err.bench_function("bare", |b| {
        b.iter_custom(|n| run(&rt, failing_service(), n))
    });
    err.bench_function("axum HandleError", |b| {
        b.iter_custom(|n| run(&rt, handle_error(failing_service()), n))
    });
    err.bench_function("ErrorEnrich", |b| {
        b.iter_custom(|n| run(&rt, enrich.layer(failing_service()), n))
    });
    err.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
