//! A loop over the admission fast path without a runtime, for profilers
//! (`valgrind --tool=callgrind`, `perf`): `fast_path <ours|tower|bare> <n>`
//! calls a ready inner service `n` times through the layer, polling each
//! response future once with a no-op waker; `fast_path <case> <n> tokio`
//! runs the loop of the overhead bench instead (`ready().await` +
//! `call(req).await` in a task on a current_thread runtime). In that mode
//! `FAST_PATH_PENDING=1` makes the inner future wait once (a yield),
//! `FAST_PATH_TASKS=k` runs k loops at once (k requests in flight), and
//! `FAST_PATH_DEADLINE=1` gives every request a 30 s deadline context; the
//! loop without a runtime needs an inner future that is ready at once.
//!
//! ```text
//! cargo build --release -p atscale-overload --example fast_path
//! valgrind --tool=callgrind target/release/examples/fast_path ours 100000
//! perf record -g target/release/examples/fast_path ours 20000000 tokio
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use atscale_core::{Context, Origin};
use atscale_overload::OverloadLayer;
use tower::{Layer, Service, ServiceExt, service_fn};

fn drive<S>(mut svc: S, n: u64) -> u64
where
    S: Service<http::Request<()>, Response = usize>,
    S::Error: std::fmt::Debug,
{
    let mut cx = TaskContext::from_waker(Waker::noop());
    if std::env::var("FAST_PATH_SIZES").is_ok() {
        let _ = svc.poll_ready(&mut cx);
        let fut = svc.call(http::Request::new(()));
        println!("response future: {} bytes", std::mem::size_of_val(&fut));
    }
    let mut sum = 0u64;
    for _ in 0..n {
        assert!(svc.poll_ready(&mut cx).is_ready());
        let fut = pin!(svc.call(black_box(http::Request::new(()))));
        match fut.poll(&mut cx) {
            Poll::Ready(out) => sum += black_box(out.expect("answered")) as u64,
            Poll::Pending => unreachable!("the inner service is ready"),
        }
    }
    sum
}

/// The overhead bench's loop: each call awaited in a task on a runtime.
fn drive_tokio<S>(svc: S, n: u64) -> u64
where
    S: Service<http::Request<()>, Response = usize> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // FAST_PATH_TASKS=k: k such loops at once (with FAST_PATH_PENDING, k
    // requests in flight), n calls in all.
    let tasks: u64 = std::env::var("FAST_PATH_TASKS").map_or(1, |v| v.parse().expect("tasks"));
    // FAST_PATH_DEADLINE=1: each request carries a context with a 30 s
    // budget, as behind the server stack's deadline layer.
    let deadline = std::env::var("FAST_PATH_DEADLINE").is_ok();
    let loops: Vec<_> = (0..tasks)
        .map(|_| {
            let mut svc = svc.clone();
            rt.spawn(async move {
                let mut sum = 0u64;
                for _ in 0..n / tasks {
                    let ready = svc.ready().await.expect("ready");
                    let mut req = http::Request::new(());
                    if deadline {
                        req.extensions_mut().insert(
                            Context::new().with_budget(Duration::from_secs(30), Origin::Header),
                        );
                    }
                    let out = ready.call(black_box(req)).await;
                    sum += black_box(out.expect("answered")) as u64;
                }
                sum
            })
        })
        .collect();
    rt.block_on(async {
        let mut sum = 0;
        for task in loops {
            sum += task.await.expect("the loop finished");
        }
        sum
    })
}

fn main() {
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_else(|| "ours".into());
    let n: u64 = args.next().map_or(1_000_000, |v| v.parse().expect("n"));
    let pending = std::env::var("FAST_PATH_PENDING").is_ok();
    let inner = service_fn(move |r: http::Request<()>| async move {
        let answer = black_box(r).uri().path().len();
        if pending {
            tokio::task::yield_now().await;
        }
        Ok::<_, Infallible>(answer)
    });
    let on_runtime = args.next().is_some_and(|a| a == "tokio");
    let sum = match (which.as_str(), on_runtime) {
        ("ours", false) => drive(OverloadLayer::new().layer(inner), n),
        ("tower", false) => drive(tower::limit::ConcurrencyLimit::new(inner, 1000), n),
        ("bare", false) => drive(inner, n),
        ("ours", true) => drive_tokio(OverloadLayer::new().layer(inner), n),
        ("tower", true) => drive_tokio(tower::limit::ConcurrencyLimit::new(inner, 1000), n),
        ("bare", true) => drive_tokio(inner, n),
        (other, _) => panic!("unknown case {other} (ours, tower, bare)"),
    };
    println!("{which}: {n} calls ({sum})");
}
