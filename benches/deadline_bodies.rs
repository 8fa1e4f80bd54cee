//! What holding a request's bodies to its deadline costs per call, against
//! the deadline on the head alone, around the same trivial service,
//! interleaved in one run. Every call reads its response body to the end
//! (one frame), so the body wrapper's work is in the figure.
//!
//! `cargo bench --bench deadline_bodies`

mod support;

use std::convert::Infallible;
use std::time::Duration;

use atscale::deadline::body::ResponseDeadlineLayer;
use atscale::deadline::{BodyDeadlineLayer, DeadlineLayer};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::{case, pending_once};
use tower::{Layer, Service, ServiceExt, service_fn};

const BUDGET: Duration = Duration::from_secs(30);

fn request(grpc: bool) -> impl Fn(u64) -> http::Request<Full<Bytes>> + Clone {
    move |_id| {
        let mut req = http::Request::new(Full::new(Bytes::new()));
        if grpc {
            req.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
        }
        req
    }
}

/// A service answering one frame, pending once first (so timers and wakers
/// are really registered).
fn inner<B: Send + 'static>() -> impl Service<
    http::Request<B>,
    Response = http::Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send {
    service_fn(|_req: http::Request<B>| {
        pending_once(Ok::<_, Infallible>(http::Response::new(Full::new(
            Bytes::from_static(b"hello"),
        ))))
    })
}

type Req = http::Request<Full<Bytes>>;

/// `svc`, then its response body read to the end.
fn read_body<S, B>(
    svc: S,
) -> impl Service<Req, Response = usize, Error = String, Future: Send> + Send
where
    S: Service<Req, Response = http::Response<B>> + Send,
    S::Future: Send,
    S::Error: std::fmt::Debug,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    svc.map_err(|e| format!("{e:?}"))
        .and_then(|res: http::Response<B>| async move {
            match res.into_body().collect().await {
                Ok(c) => Ok(bytes::Buf::remaining(&c.to_bytes())),
                Err(_) => Err(String::from("the body failed")),
            }
        })
}

fn cases(grpc: bool) -> Vec<support::Case> {
    let head = || DeadlineLayer::server(BUDGET);
    vec![
        case("bare", || read_body(inner::<Full<Bytes>>()), request(grpc)),
        case(
            "Deadline (head)",
            move || read_body(head().layer(inner::<Full<Bytes>>())),
            request(grpc),
        ),
        case(
            "Deadline + ResponseDeadline (gRPC)",
            move || {
                let bodies: ResponseDeadlineLayer = BodyDeadlineLayer::grpc().responses_only();
                read_body(head().layer(bodies.layer(inner::<Full<Bytes>>())))
            },
            request(grpc),
        ),
        case(
            "Deadline + BodyDeadline (all, both bodies)",
            move || read_body(head().with_bodies(BodyDeadlineLayer::all()).layer(inner())),
            request(grpc),
        ),
    ]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list their tests
    }
    println!(
        "# Deadline over bodies: per-call overhead (budget {BUDGET:?}, one-frame body read to the end)"
    );
    println!("load average at start (1, 5, 15 min): {}", support::load());
    for (rt_name, rt) in support::runtimes() {
        for (what, grpc) in [("gRPC request", true), ("plain HTTP request", false)] {
            let rows = support::compare(&rt, &cases(grpc));
            support::print(&format!("{rt_name}: {what}"), &rows);
            for row in [
                "Deadline + ResponseDeadline (gRPC)",
                "Deadline + BodyDeadline (all, both bodies)",
            ] {
                let (m, lo, hi) = support::ratio(&rows, row, "Deadline (head)");
                println!(
                    "\nratio of overheads, {row} / Deadline (head): {m:.2} ({lo:.2}..{hi:.2})"
                );
            }
        }
    }
    println!("\nload average at the end: {}", support::load());
}
