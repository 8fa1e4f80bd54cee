//! ErrorEnrich's per-request cost inside a real axum `Router`, against
//! axum's `HandleError` (the layer it replaces), on the success path and on
//! the error path, interleaved in one run.
//!
//! `cargo bench --bench enrich`
//!
//! Both stacks sit under `Router::layer`, around the same route and the same
//! inner layer (one that passes the request on, or one that fails it as rate
//! limited), so both pay the same routing and the same conversion of the
//! response body into axum's `Body`. The bare case is the same router with
//! a layer that does no error handling under `Router::layer` (which boxes
//! the layered route again, a cost every case pays): on the success path
//! an identity layer, on the error path a layer that answers 429 itself
//! (what the error layers produce, without an error). Each call builds an
//! `http::Request` for `/orders/42`, a cost every case pays alike.

mod support;

use std::convert::Infallible;
use std::sync::LazyLock;
use std::time::Duration;

use atscale::core::{BoxError, RateLimited};
use atscale::error::ErrorEnrichLayer;
use axum::Router;
use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::response::IntoResponse;
use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use support::case;
use tower::layer::layer_fn;
use tower::layer::util::Identity;
use tower::util::MapErrLayer;
use tower::{ServiceBuilder, service_fn};

/// The request path as hyper hands it over: a slice of the connection's
/// read buffer, so cloning the `Uri` (as ErrorEnrich does) is a reference
/// count, not a copy. (Built from a `&str`, the path would be a private
/// `Vec`, and its first clone would allocate to share it: a cost no
/// request from a real connection pays.)
static PATH: LazyLock<Bytes> = LazyLock::new(|| {
    let path = Bytes::from(b"/orders/42".to_vec());
    let _ = path.clone(); // now shared, as hyper's read buffer is
    path
});

fn request(_: u64) -> Request<Body> {
    Request::builder()
        .uri(Uri::from_maybe_shared(PATH.clone()).expect("valid path"))
        .body(Body::empty())
        .expect("valid request")
}

/// The route every case serves: answers an empty 200.
fn routes() -> Router {
    Router::new().route_service(
        "/orders/{id}",
        service_fn(|_req: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(Body::empty()))
        }),
    )
}

/// What both error layers wrap on the success path: the route, its
/// (impossible) error typed as a `BoxError`.
fn pass() -> MapErrLayer<fn(Infallible) -> BoxError> {
    MapErrLayer::new(|e: Infallible| -> BoxError { match e {} })
}

/// What both error layers wrap on the error path: a layer that fails every
/// request as rate limited, without calling the route.
fn fail<S: Clone>() -> impl tower::Layer<
    S,
    Service: tower::Service<
        Request<Body>,
        Response = Response<Body>,
        Error = BoxError,
        Future: Send + 'static,
    > + Clone
                 + Send
                 + Sync
                 + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    layer_fn(|_inner: S| {
        service_fn(|_req: Request<Body>| async {
            Err::<Response<Body>, BoxError>(Box::new(RateLimited::new(Duration::from_millis(1500))))
        })
    })
}

/// The bare error-path router: a layer answering 429 itself, no error.
fn answer_429<S: Clone>() -> impl tower::Layer<
    S,
    Service: tower::Service<
        Request<Body>,
        Response = Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
                 + Send
                 + Sync
                 + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    layer_fn(|_inner: S| {
        service_fn(|_req: Request<Body>| async {
            Ok::<_, Infallible>(StatusCode::TOO_MANY_REQUESTS.into_response())
        })
    })
}

pin_project_lite::pin_project! {
    /// A body passed through untouched, as ErrorEnrich's `ResponseBody` does
    /// on the success path, but not axum's `Body`.
    struct Wrapped {
        #[pin]
        body: Body,
    }
}

#[allow(non_snake_case)]
fn Wrapped(body: Body) -> Wrapped {
    Wrapped { body }
}

impl http_body::Body for Wrapped {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

fn handle_error() -> HandleErrorLayer<fn(BoxError) -> std::future::Ready<StatusCode>, ()> {
    HandleErrorLayer::new(|_err: BoxError| std::future::ready(StatusCode::TOO_MANY_REQUESTS))
}

fn enrich() -> ErrorEnrichLayer {
    ErrorEnrichLayer::builder("bench")
        .help_link("https://docs.example.com/errors/{code}")
        .build()
        .expect("valid configuration")
}

/// Median and quartiles of `v`, as `+m (q1..q3)`.
fn quartiles(v: &[f64]) -> String {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = q * (v.len() - 1) as f64;
        let (lo, hi) = (i.floor() as usize, i.ceil() as usize);
        v[lo] + (v[hi] - v[lo]) * (i - lo as f64)
    };
    format!("{:+.2} ({:+.2}..{:+.2})", at(0.5), at(0.25), at(0.75))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list their tests
    }
    println!("# ErrorEnrich inside an axum Router: per-request overhead");
    println!("load average at start (1, 5, 15 min): {}", support::load());
    // `ATSCALE_BENCH_RUNTIME=current_thread` (or `multi_thread`) and
    // `ATSCALE_BENCH_PATH=success` (or `error`) measure a part only.
    let only_rt = std::env::var("ATSCALE_BENCH_RUNTIME").ok();
    let only_path = std::env::var("ATSCALE_BENCH_PATH").ok();
    for (rt_name, rt) in support::runtimes() {
        if only_rt.as_deref().is_some_and(|o| !rt_name.starts_with(o)) {
            continue;
        }
        let success = vec![
            case(
                "bare router (identity layer)",
                || routes().layer(Identity::new()),
                request,
            ),
            case(
                "axum HandleError",
                || routes().layer(ServiceBuilder::new().layer(handle_error()).layer(pass())),
                request,
            ),
            case(
                "ErrorEnrich",
                || routes().layer(ServiceBuilder::new().layer(enrich()).layer(pass())),
                request,
            ),
            case(
                "ErrorEnrich, axum mode",
                || {
                    routes().layer(
                        ServiceBuilder::new()
                            .layer(enrich().for_axum())
                            .layer(pass()),
                    )
                },
                request,
            ),
            // What a body that is not axum's `Body` costs under
            // `Router::layer`: it boxes it (`Body::new`), as it boxes
            // ErrorEnrich's `ResponseBody`; `HandleError` answers axum's
            // `Body`, which it does not box.
            case(
                "axum HandleError, body wrapped (diagnostic)",
                || {
                    routes().layer(
                        ServiceBuilder::new()
                            .map_response(|res: Response<Body>| res.map(Wrapped))
                            .layer(handle_error())
                            .layer(pass()),
                    )
                },
                request,
            ),
        ];
        // No tracing subscriber is installed: ErrorEnrich's log event costs
        // its level check.
        let failure = vec![
            case(
                "bare router (answers 429 itself)",
                || routes().layer(answer_429()),
                request,
            ),
            case(
                "axum HandleError",
                || routes().layer(ServiceBuilder::new().layer(handle_error()).layer(fail())),
                request,
            ),
            case(
                "ErrorEnrich",
                || routes().layer(ServiceBuilder::new().layer(enrich()).layer(fail())),
                request,
            ),
            case(
                "ErrorEnrich, axum mode",
                || {
                    routes().layer(
                        ServiceBuilder::new()
                            .layer(enrich().for_axum())
                            .layer(fail()),
                    )
                },
                request,
            ),
        ];
        for (what, cases) in [
            ("success path", success),
            ("error path (rate limited)", failure),
        ] {
            if only_path.as_deref().is_some_and(|o| !what.starts_with(o)) {
                continue;
            }
            let rows = support::compare(&rt, &cases);
            support::print(&format!("{rt_name}: {what}"), &rows);
            let (m, lo, hi) = support::ratio(&rows, "ErrorEnrich", "axum HandleError");
            println!(
                "\nratio of overheads, ErrorEnrich / axum HandleError: {m:.2} ({lo:.2}..{hi:.2})"
            );
            {
                let bare = &rows[0].samples;
                let of = |name: &str| {
                    &rows
                        .iter()
                        .find(|r| r.name == name)
                        .expect("a case")
                        .samples
                };
                let (a, h) = (of("ErrorEnrich, axum mode"), of("axum HandleError"));
                let ratios: Vec<f64> = (0..bare.len())
                    .map(|i| (a[i] - bare[i]) / (h[i] - bare[i]))
                    .collect();
                let diffs: Vec<f64> = (0..bare.len()).map(|i| a[i] - h[i]).collect();
                println!(
                    "axum mode / axum HandleError: ratio {}; difference {} ns",
                    quartiles(&ratios),
                    quartiles(&diffs)
                );
            }
            // On the error path the anchor's overhead is a few tens of ns, so
            // the difference says more than the ratio.
            let samples = |name: &str| {
                &rows
                    .iter()
                    .find(|r| r.name == name)
                    .expect("a case")
                    .samples
            };
            let diffs: Vec<f64> = samples("ErrorEnrich")
                .iter()
                .zip(samples("axum HandleError"))
                .map(|(e, h)| e - h)
                .collect();
            let (dlo, dhi) = support::range(&diffs);
            println!(
                "ErrorEnrich - axum HandleError, per repetition: {:+.1} ns ({dlo:+.1}..{dhi:+.1}); quartiles {}",
                support::median(diffs.clone()),
                quartiles(&diffs)
            );
            let bare = &rows[0].samples;
            let ratios: Vec<f64> = samples("ErrorEnrich")
                .iter()
                .zip(samples("axum HandleError"))
                .zip(bare)
                .map(|((e, h), b)| (e - b) / (h - b))
                .collect();
            println!("ratio of overheads, quartiles: {}", quartiles(&ratios));
            if let Some(wrapped) = rows
                .iter()
                .find(|r| r.name.starts_with("axum HandleError, body wrapped"))
            {
                let boxed: Vec<f64> = wrapped
                    .samples
                    .iter()
                    .zip(samples("axum HandleError"))
                    .map(|(w, h)| w - h)
                    .collect();
                let rest: Vec<f64> = samples("ErrorEnrich")
                    .iter()
                    .zip(&wrapped.samples)
                    .map(|(e, w)| e - w)
                    .collect();
                println!(
                    "axum's box of a body not its own (wrapped - HandleError): {}; ErrorEnrich - wrapped: {}",
                    quartiles(&boxed),
                    quartiles(&rest)
                );
            }
        }
    }
    println!("\nload average at the end: {}", support::load());
}
