//! A loop over the admission fast path without a runtime, for profilers
//! (`valgrind --tool=callgrind`, `perf`): `fast_path <ours|tower|bare> <n>`
//! calls a ready inner service `n` times through the layer, polling each
//! response future once with a no-op waker.
//!
//! ```text
//! cargo build --release -p atscale-overload --example fast_path
//! valgrind --tool=callgrind target/release/examples/fast_path ours 100000
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use atscale_overload::OverloadLayer;
use tower::{Layer, Service, service_fn};

fn drive<S>(mut svc: S, n: u64) -> u64
where
    S: Service<http::Request<()>, Response = usize>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
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

fn main() {
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_else(|| "ours".into());
    let n: u64 = args.next().map_or(1_000_000, |v| v.parse().expect("n"));
    let inner = service_fn(|r: http::Request<()>| async move {
        Ok::<_, Infallible>(black_box(r).uri().path().len())
    });
    let sum = match which.as_str() {
        "ours" => drive(OverloadLayer::new().layer(inner), n),
        "tower" => drive(tower::limit::ConcurrencyLimit::new(inner, 1000), n),
        "bare" => drive(inner, n),
        other => panic!("unknown case {other} (ours, tower, bare)"),
    };
    println!("{which}: {n} calls ({sum})");
}
