//! What the classification hook (`atscale::core::classify::map`) costs: on
//! the success path of the whole server stack, and per classified failure.
//!
//! `cargo bench --bench classify`
//!
//! Mappings are process-wide and cannot be removed, so "with" and "without"
//! cannot share a process. The bench runs itself as child processes,
//! alternating (plain, mapped, mapped, plain, …): each child measures, on
//! the shared interleaved harness, the server stack's success-path overhead
//! over a bare axum `Router` (both under `Router::layer`), and the time to
//! classify an error no mapping knows (the worst case: every mapping is
//! asked). The mapped child registers eight mappings first; a control child
//! makes the same allocations without registering them (registering moves
//! every later heap allocation, which alone can shift a per-request figure
//! by a few percent). The figures are medians over rounds of the ratios,
//! with min..max; mapped / control is the hook's own cost.

mod support;

use std::convert::Infallible;
use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, Instant};

use atscale::core::classify::{self, Classification};
use atscale::core::{BoxError, Kind};
use axum::Router;
use axum::body::Body;
use http::{Request, Response};
use support::case;
use tower::layer::util::Identity;
use tower::service_fn;

const ROUNDS: usize = 10;
const MAPPINGS: usize = 8;

/// An application's error type, one per mapping.
#[derive(Debug)]
struct AppError<const N: usize>;

impl<const N: usize> std::fmt::Display for AppError<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "application error {N}")
    }
}

impl<const N: usize> std::error::Error for AppError<N> {}

/// An error nobody maps, wrapped once: classification walks two errors
/// and asks every mapping about each.
#[derive(Debug)]
struct Unmapped(std::io::Error);

impl std::fmt::Display for Unmapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("calling the database")
    }
}

impl std::error::Error for Unmapped {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

fn register_mappings() {
    classify::map(|_: &AppError<0>| Classification::new(Kind::DeadlineExceeded));
    classify::map(|_: &AppError<1>| Classification::new(Kind::Overloaded));
    classify::map(|_: &AppError<2>| Classification::new(Kind::Unreachable));
    classify::map(|_: &AppError<3>| {
        Classification::new(Kind::RateLimited).with_retry_after(Duration::from_secs(1))
    });
    classify::map(|_: &AppError<4>| Classification::new(Kind::Upstream));
    classify::map(|_: &AppError<5>| Classification::new(Kind::BadRequest));
    classify::map(|_: &AppError<6>| Classification::new(Kind::Cancelled));
    classify::map(|_: &AppError<7>| Classification::new(Kind::Stalled));
}

type Hook = Box<dyn Fn(&(dyn std::error::Error + 'static)) -> Option<Classification> + Send + Sync>;

/// The same allocations as [`register_mappings`] (eight boxed closures in a
/// growing `Vec`), kept but never registered: a control for the heap layout
/// the mappings leave behind, which moves every later allocation.
fn allocate_like_mappings() {
    let mut hooks: Vec<Hook> = Vec::new();
    for n in 0..MAPPINGS {
        hooks.push(Box::new(move |_err| {
            (n == usize::MAX).then(|| Classification::new(Kind::Internal))
        }));
    }
    std::mem::forget(black_box(hooks));
}

fn routes() -> Router {
    Router::new().route_service(
        "/orders/{id}",
        service_fn(|_req: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(Body::empty()))
        }),
    )
}

fn request(_: u64) -> Request<Body> {
    Request::builder()
        .uri("/orders/42")
        .body(Body::empty())
        .expect("valid request")
}

/// One child: prints `stack_overhead_ns <median>` and `classify_ns <ns>`.
fn child(mode: &str) {
    match mode {
        "mapped" => register_mappings(),
        "control" => allocate_like_mappings(),
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cases = vec![
        case(
            "bare router (identity layer)",
            || routes().layer(Identity::new()),
            request,
        ),
        case(
            "server stack",
            || routes().layer(atscale::stack::server("bench", Duration::from_secs(2))),
            request,
        ),
    ];
    let rows = support::compare(&rt, &cases);
    println!("stack_overhead_ns {:.2}", rows[1].overhead.0);

    let err: BoxError = Unmapped(std::io::Error::other("no rows")).into();
    let iters = 2_000_000u32;
    let start = Instant::now();
    for _ in 0..iters {
        black_box(Kind::find(black_box(&*err)));
    }
    let per = start.elapsed().as_secs_f64() * 1e9 / f64::from(iters);
    assert_eq!(Kind::find(&*err), None, "nobody maps it");
    println!("classify_ns {per:.2}");
}

fn run_child(mode: &str) -> (f64, f64) {
    let exe = std::env::current_exe().expect("own path");
    let out = Command::new(exe)
        .args(["--child", mode])
        .output()
        .expect("run child");
    assert!(out.status.success(), "child {mode} failed: {out:?}");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let value = |key: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("child {mode} printed no {key}: {text}"))
    };
    (value("stack_overhead_ns"), value("classify_ns"))
}

const MODES: [&str; 3] = ["plain", "control", "mapped"];

/// Picks one figure of a child's (stack overhead, classification) pair.
type Pick = fn(&(f64, f64)) -> f64;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list their tests
    }
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(args.get(i + 1).map_or("plain", String::as_str));
        return;
    }
    println!("# The classification hook: {MAPPINGS} mappings registered, a control, none");
    println!("load average at start (1, 5, 15 min): {}", support::load());
    println!(
        "\n| round | stack overhead: plain | control | mapped | classify (unknown error): plain | control | mapped |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut results: Vec<Vec<(f64, f64)>> = vec![Vec::new(); MODES.len()];
    for round in 0..ROUNDS {
        // Rotate which goes first, so a drift in the machine's load
        // favours none of them.
        let mut this = [(0.0, 0.0); 3];
        for k in 0..MODES.len() {
            let m = (round + k) % MODES.len();
            this[m] = run_child(MODES[m]);
        }
        println!(
            "| {} | {:+.1} ns | {:+.1} ns | {:+.1} ns | {:.1} ns | {:.1} ns | {:.1} ns |",
            round + 1,
            this[0].0,
            this[1].0,
            this[2].0,
            this[0].1,
            this[1].1,
            this[2].1
        );
        for (m, r) in this.into_iter().enumerate() {
            results[m].push(r);
        }
    }
    let pickers: [(&str, Pick); 2] = [
        ("server stack success-path overhead", |r| r.0),
        ("classifying an unknown error", |r| r.1),
    ];
    println!();
    for (what, pick) in pickers {
        for (a, b) in [(2, 1), (2, 0), (1, 0)] {
            let ratios: Vec<f64> = results[a]
                .iter()
                .zip(&results[b])
                .map(|(x, y)| pick(x) / pick(y))
                .collect();
            let (lo, hi) = support::range(&ratios);
            println!(
                "{what}, {} / {}: {:.3} ({lo:.3}..{hi:.3})",
                MODES[a],
                MODES[b],
                support::median(ratios.clone())
            );
        }
    }
    println!("load average at end (1, 5, 15 min): {}", support::load());
}
