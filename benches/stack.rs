//! End to end: what a server pays for a middleware stack, per request, over
//! real connections on loopback.
//!
//! Four server configurations by default: **bare**; **atscale**, the
//! recommended server stack (`atscale::stack::server`: ErrorEnrich →
//! Deadline → ResponseDeadline → Overload → Heartbeat → RateLimit at a rate
//! never reached; the overload layer on with its defaults); the same
//! **without overload** (`.without_overload()`); and **peer**, the stack a
//! user would assemble from tower-http and tower_governor (SetRequestId →
//! Timeout → CatchPanic → Governor, global key, a rate never reached). Opt-in, a
//! fifth: **floor**, six pass-through layers of the same shape as atscale's
//! (one response future per layer, three response-body wrappers, the error
//! made `Infallible` at the outermost) doing nothing else: the price of the
//! layering itself (see the `floor` module). Opt-in too, **essentials**:
//! what atscale's stack does per request, each thing done once, in one
//! layer with one response future and one body wrapper (see the
//! `essentials` module): a lower bound on what a stack with its features
//! costs. And atscale's stack
//! one layer at a time in its order, to price each layer's step:
//! `upto-enrich`, `upto-deadline`, `upto-bodies`, `upto-overload`,
//! `upto-heartbeat` (+ RateLimit is `atscale`). `E2E_CONFIGS` picks the
//! configurations (names, comma-separated; bare is always measured;
//! default `bare,atscale,atscale-no-overload,peer`). Each serves an
//! axum "hello" route over HTTP/1.1 keep-alive (32 connections) and over
//! HTTP/2 (one connection), and tonic-health's `Check` over gRPC (one HTTP/2
//! connection).
//!
//! Every server runs in a process of its own (this binary re-executed with
//! `serve CONFIG PROTO`), on a tokio runtime with one worker, pinned to CPU
//! 1; the load generator runs on CPU 0. What is measured is
//! the server process's CPU time (`CLOCK_PROCESS_CPUTIME_ID`, all of its
//! threads) per request, at a fixed open-loop rate of half the bare
//! server's closed-loop capacity (measured first, per protocol; requests
//! are sent on schedule whether or not earlier ones have been answered, the
//! schedule paced by tokio's 1 ms timer), and the latency from each
//! request's scheduled time to its full response (p50, p99).
//!
//! Rounds interleave the configurations (their order rotates each round),
//! each a window of `E2E_SECS` (default 2) seconds per configuration and
//! protocol; the first round is a discarded warm-up. Rounds repeat until
//! the 95% confidence interval of every ratio to bare (mean of per-round
//! ratios, Student's t) is narrower than ±2% (`E2E_CI`, in percent), or
//! `E2E_MAX_ROUNDS` (default 40).
//!
//! Every round runs in fresh processes, the load generator's as well as the
//! servers': a process keeps one memory layout (its ASLR draw, its
//! allocator's state) for as long as it lives. A server's layout alone
//! moved its CPU per request by 1–4%, the same for all its windows; the
//! generator's is suspected to move the figures too, since runs with fresh
//! servers but one generator differed by more than their CIs (atscale /
//! peer on gRPC 1.064 ± 0.028 and 1.016 ± 0.020, 12 minutes apart). Drawn
//! once a run, that spread is between runs, where no confidence interval
//! sees it; drawn every round, it is in the rounds. This process measures
//! the capacities and the offered rates, then runs each round, the warm-up
//! too, as this binary re-executed with `round N PROTO=RATE…` (see
//! [`round_process`]), which starts and warms its own servers, runs the
//! round's windows and prints them on stdout for this process to gather.
//! `E2E_FRESH_GENERATOR=0` keeps the generator in this process for the
//! whole run instead (as before, to compare), its servers started again
//! every `E2E_RESPAWN_EVERY` rounds (default 1; 0: never), a setting that
//! means nothing with a fresh generator, whose servers are new every round.
//!
//! While answers are awaited, the load generator does not sleep (a task
//! yields in a loop; `E2E_SPIN=0` lets it sleep): on loopback a server's
//! write wakes a sleeping generator in the server's own context, a cost that
//! grew with the server's time per request (0.25 wake-ups per request bare,
//! 0.40 with a stack, 0 for either with the generator awake) and that a
//! server with remote clients does not pay. A window in which the server or
//! the generator waited for its CPU (another process held it) for more than
//! `E2E_MAX_DELAY_MS` (default 5) in all is measured again, at most 5 times,
//! and so is a window whose answers have not all come `E2E_DRAIN_SECS`
//! (default 60) after its last request was sent (its server is killed and
//! started again, so the requests still out cost the next window nothing);
//! a window still disturbed after 5 tries is left out of its round. The
//! report counts those windows (`E2E_VERBOSE=1` prints every window).
//!
//! ```text
//! cargo bench --bench stack                        # http1, h2, grpc
//! cargo bench --bench stack -- http1 grpc          # some protocols
//! E2E_SECS=1 E2E_MAX_ROUNDS=10 cargo bench --bench stack
//! # the floor too (floor / bare, atscale / floor in the report):
//! E2E_CONFIGS=bare,atscale,atscale-no-overload,peer,floor cargo bench --bench stack
//! # a profile of one server process under the same load (perf installed):
//! E2E_PERF_OUT=/tmp/atscale.data cargo bench --bench stack -- profile atscale http1 10
//! # any perf command instead of `record -g`:
//! E2E_PERF_OUT=/tmp/s.txt E2E_PERF_ARGS="stat -e sched:sched_wakeup" … -- profile bare grpc 5
//! # the size of each layer's future around axum's Route and tonic's Routes:
//! cargo bench --bench stack -- sizes
//! ```
//!
//! Answers that are not a success (the overload layer's refusals) are
//! counted per configuration and reported; CPU per request is over every
//! request sent.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use atscale::ratelimit::{Limit, Limiter, RateLimitLayer};
use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tower::{ServiceBuilder, ServiceExt};

use tower_governor::GovernorLayer;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::GlobalKeyExtractor;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestId, RequestId, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;

/// The CPU the servers are pinned to; the load generator takes the other.
const SERVER_CPU: usize = 1;
const CLIENT_CPU: usize = 0;
/// HTTP/1.1 keep-alive connections of the load generator.
const H1_CONNECTIONS: usize = 32;
/// A budget no request reaches.
const BUDGET: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Config {
    Bare,
    Atscale,
    AtscaleNoOverload,
    Peer,
    /// Six pass-through layers of atscale's shape and nothing else: the
    /// price of the layering itself (see [`floor`]). Opt-in (`E2E_CONFIGS`).
    Floor,
    /// atscale's stack reduced to its essentials, each done once, in one
    /// layer (see [`essentials`]): a lower bound on what a stack with its
    /// features costs. Opt-in.
    Essentials,
    /// atscale's stack built up one layer at a time, in its order (opt-in):
    /// ErrorEnrich alone, then with Deadline, the response-body deadline,
    /// Overload and Heartbeat added in turn; with RateLimit too it is
    /// `atscale`. The report gives each layer's step as the ratio of one to
    /// the one before, per round.
    UptoEnrich,
    UptoDeadline,
    UptoBodies,
    UptoOverload,
    UptoHeartbeat,
    /// A configuration served by another build of this bench (opt-in):
    /// `E2E_OTHER` names its executable, `E2E_OTHER_CONFIG` the
    /// configuration it serves (default `atscale`). Two builds of a layer
    /// compared in the same run, interleaved, as the configurations are:
    /// separate runs of the same code differ by more than a change of 1–3%
    /// (atscale / peer on gRPC 1.028 ± 0.021 and 1.070 ± 0.021, 18 minutes
    /// apart).
    Other,
}

/// Every configuration; `E2E_CONFIGS` picks among them.
const ALL_CONFIGS: [Config; 12] = [
    Config::Bare,
    Config::Atscale,
    Config::AtscaleNoOverload,
    Config::Peer,
    Config::Floor,
    Config::Essentials,
    Config::UptoEnrich,
    Config::UptoDeadline,
    Config::UptoBodies,
    Config::UptoOverload,
    Config::UptoHeartbeat,
    Config::Other,
];

/// The steps of atscale's stack, one layer more each, ending with the stack
/// itself: the pairs the report divides to price each layer.
const STEPS: [(Config, Config); 6] = [
    (Config::UptoEnrich, Config::Bare),
    (Config::UptoDeadline, Config::UptoEnrich),
    (Config::UptoBodies, Config::UptoDeadline),
    (Config::UptoOverload, Config::UptoBodies),
    (Config::UptoHeartbeat, Config::UptoOverload),
    (Config::Atscale, Config::UptoHeartbeat),
];

/// What a run measures unless `E2E_CONFIGS` says otherwise.
const DEFAULT_CONFIGS: [Config; 4] = [
    Config::Bare,
    Config::Atscale,
    Config::AtscaleNoOverload,
    Config::Peer,
];

impl Config {
    fn name(self) -> &'static str {
        match self {
            Config::Bare => "bare",
            Config::Atscale => "atscale",
            Config::AtscaleNoOverload => "atscale-no-overload",
            Config::Peer => "peer",
            Config::Floor => "floor",
            Config::Essentials => "essentials",
            Config::UptoEnrich => "upto-enrich",
            Config::UptoDeadline => "upto-deadline",
            Config::UptoBodies => "upto-bodies",
            Config::UptoOverload => "upto-overload",
            Config::UptoHeartbeat => "upto-heartbeat",
            Config::Other => "other",
        }
    }
    fn parse(s: &str) -> Config {
        *ALL_CONFIGS
            .iter()
            .find(|c| c.name() == s)
            .unwrap_or_else(|| {
                panic!(
                    "unknown configuration {s} (bare, atscale, atscale-no-overload, peer, floor, essentials, upto-enrich, upto-deadline, upto-bodies, upto-overload, upto-heartbeat, other)"
                )
            })
    }
    /// What [`Config::Other`] serves: `E2E_OTHER_CONFIG`, default atscale.
    fn other_serves() -> Config {
        let name = std::env::var("E2E_OTHER_CONFIG").unwrap_or_else(|_| "atscale".into());
        match Config::parse(&name) {
            Config::Other => panic!("E2E_OTHER_CONFIG cannot be `other`"),
            served => served,
        }
    }
    /// `E2E_CONFIGS` (comma-separated names; bare, the anchor, is always
    /// measured and comes first), or the four of [`DEFAULT_CONFIGS`].
    fn from_env() -> Vec<Config> {
        let Ok(names) = std::env::var("E2E_CONFIGS") else {
            return DEFAULT_CONFIGS.to_vec();
        };
        let mut configs = vec![Config::Bare];
        for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let config = Config::parse(name);
            if !configs.contains(&config) {
                configs.push(config);
            }
        }
        configs
    }
    fn label(self) -> &'static str {
        match self {
            Config::Bare => "bare",
            Config::Atscale => "atscale `stack::server` (+ RateLimit; Overload on, its default)",
            Config::AtscaleNoOverload => {
                "atscale `stack::server` (+ RateLimit) `.without_overload()`"
            }
            Config::Peer => "peer: SetRequestId + Timeout + CatchPanic + Governor",
            Config::Floor => "floor: 6 pass-through layers of atscale's shape",
            Config::Essentials => "essentials: atscale's work done once, in one layer",
            Config::UptoEnrich => "atscale's ErrorEnrich alone",
            Config::UptoDeadline => "... + Deadline",
            Config::UptoBodies => "... + response-body deadline",
            Config::UptoOverload => "... + Overload",
            Config::UptoHeartbeat => "... + Heartbeat (atscale but its RateLimit)",
            Config::Other => "other: `E2E_OTHER_CONFIG` served by the `E2E_OTHER` build",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Http1,
    Http2,
    Grpc,
}

const PROTOS: [Proto; 3] = [Proto::Http1, Proto::Http2, Proto::Grpc];

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Http1 => "http1",
            Proto::Http2 => "h2",
            Proto::Grpc => "grpc",
        }
    }
    fn parse(s: &str) -> Option<Proto> {
        PROTOS.iter().copied().find(|p| p.name() == s)
    }
    fn label(self) -> &'static str {
        match self {
            Proto::Http1 => "axum hello, HTTP/1.1 keep-alive (32 connections)",
            Proto::Http2 => "axum hello, HTTP/2 (1 connection)",
            Proto::Grpc => "tonic-health Check, gRPC (1 HTTP/2 connection)",
        }
    }
}

// ---------------------------------------------------------------- server side

/// atscale's recommended server stack with a rate limit never reached. The
/// overload layer is on by default (`OverloadLayer::new()`'s adaptive
/// limit); `atscale_stack!(without_overload)` measures the stack without it.
macro_rules! atscale_stack {
    () => {{
        let limiter = Limiter::new(Limit::per_second(1_000_000_000).expect("limit"));
        atscale::stack::server("e2e", BUDGET).with_rate_limit(RateLimitLayer::reject(limiter))
    }};
    (without_overload) => {{ atscale_stack!().without_overload() }};
}

/// Request ids from a counter, as in tower-http's own `MakeRequestId`
/// example (`MakeRequestUuid` would read the OS random source per request).
#[derive(Clone, Default)]
struct CounterId(Arc<AtomicU64>);

impl MakeRequestId for CounterId {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let id = self.0.fetch_add(1, Ordering::Relaxed);
        Some(RequestId::new(HeaderValue::from(id)))
    }
}

/// The peer stack: tower-http's request id, timeout and panic catcher,
/// tower_governor with one global limit never reached.
macro_rules! peer_stack {
    () => {{
        let governor = GovernorConfigBuilder::default()
            .key_extractor(GlobalKeyExtractor)
            .per_nanosecond(1)
            .burst_size(1 << 30)
            .finish()
            .expect("governor config");
        ServiceBuilder::new()
            .layer(SetRequestIdLayer::x_request_id(CounterId::default()))
            .layer(TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                BUDGET,
            ))
            .layer(CatchPanicLayer::new())
            .layer(GovernorLayer::new(Arc::new(governor)))
    }};
}

/// The floor stack, outermost first, one stand-in per layer of
/// `atscale_stack!()`: ErrorEnrich ([`floor::Outer`]), Deadline
/// ([`floor::Pass`]), ResponseDeadline ([`floor::Wrap`]), Overload (`Pass`),
/// Heartbeat (`Wrap`), RateLimit (`Pass`).
/// atscale's server stack up to (and with) one of its layers, built from
/// the layers as `stack::server` builds them (its order, its settings).
macro_rules! upto_stack {
    (enrich) => {{ ServiceBuilder::new().layer(atscale::error::ErrorEnrichLayer::new("e2e")) }};
    (deadline) => {{
        upto_stack!(enrich).layer(
            atscale::deadline::DeadlineLayer::server(BUDGET)
                .with_header(atscale::stack::DEADLINE_HEADER),
        )
    }};
    (bodies) => {{ upto_stack!(deadline).layer(atscale::deadline::BodyDeadlineLayer::grpc().responses_only()) }};
    (overload) => {{ upto_stack!(bodies).layer(atscale::overload::OverloadLayer::new()) }};
    (heartbeat) => {{ upto_stack!(overload).layer(atscale::heartbeat::Monitor::new().layer()) }};
}

macro_rules! floor_stack {
    () => {{
        ServiceBuilder::new()
            .layer_fn(floor::Outer::new)
            .layer_fn(floor::Pass::new)
            .layer_fn(floor::Wrap::new)
            .layer_fn(floor::Pass::new)
            .layer_fn(floor::Wrap::new)
            .layer_fn(floor::Pass::new)
    }};
}

/// Pass-through layers with the shape of atscale's and none of their work:
/// what any stack of that many tower layers pays to be one (each layer's
/// response future holds the inner one and is moved as it is returned; each
/// body wrapper is polled on the way through). No clock, no context, no
/// extensions, no allocation, no `catch_unwind`; the compiler inlines as it
/// likes, as it may for the real layers.
///
/// - [`Pass`]: a response future (a pin-projected struct around the inner
///   one), the error made a `BoxError` (as Deadline, Overload, RateLimit).
/// - [`Wrap`]: the same, and the response body wrapped in a pin-projected
///   struct that forwards `poll_frame`, `is_end_stream` and `size_hint`,
///   its error made a `BoxError` (as ResponseDeadline and Heartbeat).
/// - [`Outer`]: the error type `Infallible` (as ErrorEnrich in server mode):
///   an error of the inner service, or of its readiness (kept until the
///   next call, as ErrorEnrich does), is answered as an empty 500, so its
///   future and its body are two-state enums. Never taken in this bench.
mod floor {
    use std::convert::Infallible;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, ready};

    use http::{Request, Response, StatusCode};
    use http_body::{Body, Frame, SizeHint};
    use pin_project_lite::pin_project;
    use tower::{BoxError, Service};

    #[derive(Clone)]
    pub(crate) struct Pass<S> {
        inner: S,
    }

    impl<S> Pass<S> {
        pub(crate) fn new(inner: S) -> Self {
            Pass { inner }
        }
    }

    impl<S, R> Service<R> for Pass<S>
    where
        S: Service<R>,
        S::Error: Into<BoxError>,
    {
        type Response = S::Response;
        type Error = BoxError;
        type Future = PassFuture<S::Future>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            self.inner.poll_ready(cx).map_err(Into::into)
        }

        fn call(&mut self, req: R) -> Self::Future {
            PassFuture {
                inner: self.inner.call(req),
            }
        }
    }

    pin_project! {
        pub(crate) struct PassFuture<F> {
            #[pin]
            inner: F,
        }
    }

    impl<F, T, E> Future for PassFuture<F>
    where
        F: Future<Output = Result<T, E>>,
        E: Into<BoxError>,
    {
        type Output = Result<T, BoxError>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            self.project().inner.poll(cx).map_err(Into::into)
        }
    }

    #[derive(Clone)]
    pub(crate) struct Wrap<S> {
        inner: S,
    }

    impl<S> Wrap<S> {
        pub(crate) fn new(inner: S) -> Self {
            Wrap { inner }
        }
    }

    impl<S, ReqB, ResB> Service<Request<ReqB>> for Wrap<S>
    where
        S: Service<Request<ReqB>, Response = Response<ResB>>,
        S::Error: Into<BoxError>,
    {
        type Response = Response<WrapBody<ResB>>;
        type Error = BoxError;
        type Future = WrapFuture<S::Future>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            self.inner.poll_ready(cx).map_err(Into::into)
        }

        fn call(&mut self, req: Request<ReqB>) -> Self::Future {
            WrapFuture {
                inner: self.inner.call(req),
            }
        }
    }

    pin_project! {
        pub(crate) struct WrapFuture<F> {
            #[pin]
            inner: F,
        }
    }

    impl<F, B, E> Future for WrapFuture<F>
    where
        F: Future<Output = Result<Response<B>, E>>,
        E: Into<BoxError>,
    {
        type Output = Result<Response<WrapBody<B>>, BoxError>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let res = ready!(self.project().inner.poll(cx)).map_err(Into::into)?;
            Poll::Ready(Ok(res.map(|inner| WrapBody { inner })))
        }
    }

    pin_project! {
        pub(crate) struct WrapBody<B> {
            #[pin]
            inner: B,
        }
    }

    impl<B> Body for WrapBody<B>
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        type Data = B::Data;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
            self.project().inner.poll_frame(cx).map_err(Into::into)
        }

        fn is_end_stream(&self) -> bool {
            self.inner.is_end_stream()
        }

        fn size_hint(&self) -> SizeHint {
            self.inner.size_hint()
        }
    }

    pub(crate) struct Outer<S> {
        inner: S,
        not_ready: Option<BoxError>,
    }

    impl<S: Clone> Clone for Outer<S> {
        fn clone(&self) -> Self {
            Outer::new(self.inner.clone())
        }
    }

    impl<S> Outer<S> {
        pub(crate) fn new(inner: S) -> Self {
            Outer {
                inner,
                not_ready: None,
            }
        }
    }

    impl<S, ReqB, ResB> Service<Request<ReqB>> for Outer<S>
    where
        S: Service<Request<ReqB>, Response = Response<ResB>>,
        S::Error: Into<BoxError>,
    {
        type Response = Response<OuterBody<ResB>>;
        type Error = Infallible;
        type Future = OuterFuture<S::Future>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            if self.not_ready.is_some() {
                return Poll::Ready(Ok(()));
            }
            if let Err(e) = ready!(self.inner.poll_ready(cx)) {
                self.not_ready = Some(e.into());
            }
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<ReqB>) -> Self::Future {
            if self.not_ready.take().is_some() {
                return OuterFuture::Failed;
            }
            OuterFuture::Running {
                inner: self.inner.call(req),
            }
        }
    }

    pin_project! {
        #[project = OuterFutureProj]
        pub(crate) enum OuterFuture<F> {
            Running { #[pin] inner: F },
            Failed,
        }
    }

    impl<F, B, E> Future for OuterFuture<F>
    where
        F: Future<Output = Result<Response<B>, E>>,
    {
        type Output = Result<Response<OuterBody<B>>, Infallible>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let res = match self.project() {
                OuterFutureProj::Running { inner } => ready!(inner.poll(cx)).ok(),
                OuterFutureProj::Failed => None,
            };
            Poll::Ready(Ok(match res {
                Some(res) => res.map(|body| OuterBody::Inner { body }),
                None => {
                    let mut res = Response::new(OuterBody::Empty);
                    *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    res
                }
            }))
        }
    }

    pin_project! {
        #[project = OuterBodyProj]
        pub(crate) enum OuterBody<B> {
            Inner { #[pin] body: B },
            Empty,
        }
    }

    impl<B: Body> Body for OuterBody<B> {
        type Data = B::Data;
        type Error = B::Error;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
            match self.project() {
                OuterBodyProj::Inner { body } => body.poll_frame(cx),
                OuterBodyProj::Empty => Poll::Ready(None),
            }
        }

        fn is_end_stream(&self) -> bool {
            match self {
                OuterBody::Inner { body } => body.is_end_stream(),
                OuterBody::Empty => true,
            }
        }

        fn size_hint(&self) -> SizeHint {
            match self {
                OuterBody::Inner { body } => body.size_hint(),
                OuterBody::Empty => SizeHint::with_exact(0),
            }
        }
    }
}

/// atscale's server stack reduced to its essentials, each done once, in one
/// tower layer with one response future and one body wrapper: a lower
/// bound on what a stack with these features can cost (opt-in,
/// `essentials`). Per request, what `stack::server` does and cannot do
/// without:
///
/// - **ErrorEnrich**: `catch_unwind` around the inner `call` and every poll;
///   the request's method, path and gRPC-ness kept for the answer; an error
///   or a panic answered (500 / gRPC `INTERNAL`, `UNKNOWN` here), never
///   failed.
/// - **Deadline**: one clock reading; `grpc-timeout` and `x-deadline-ms`
///   looked up (and parsed when present, a malformed one answered 400 /
///   `INVALID_ARGUMENT`), the earliest with the budget; a [`Context`] with
///   that deadline in the request's extensions and current (task-local)
///   while the inner service is called and polled; a timer armed only when
///   the inner future is pending (answered 504 / `DEADLINE_EXCEEDED` when it
///   fires).
/// - **Response-body deadline** (gRPC): the body cut with
///   `DEADLINE_EXCEEDED` trailers and the context cancelled if the deadline
///   passes while it is pending (its timer armed only then).
/// - **Overload**: a count of requests in service against a fixed limit
///   (503 / `UNAVAILABLE` past it), given back at the response head.
/// - **Heartbeat**: started and finished counts (finished when the body is
///   dropped, its end or not).
/// - **RateLimit**: GCRA on one atomic (at a rate never reached), from the
///   same clock reading.
///
/// Left out, so that this is a lower bound: the adaptive limit and its
/// queue, the monitor's per-request slot (which request is idle), pulses,
/// metrics, spans, logs, error ids and problem+json bodies.
mod essentials {
    use std::convert::Infallible;
    use std::future::Future;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::task::{Context as TaskContext, Poll};
    use std::time::Duration;

    use atscale::core::{Carrier, Context, Deadline, MalformedDeadline, Origin, Scoped};
    use atscale::deadline::codec::{self, GRPC_TIMEOUT};
    use bytes::Bytes;
    use http::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
    use http::uri::PathAndQuery;
    use http::{Method, Request, Response, StatusCode};
    use http_body::{Body, Frame, SizeHint};
    use pin_project_lite::pin_project;
    use tokio::time::{Instant, Sleep};
    use tower::{BoxError, Service};

    /// Requests in service at once past which one is refused.
    const LIMIT: u64 = 1_000;
    /// The rate limit's emission interval and burst, in nanoseconds: 10⁹/s.
    const EMISSION_NS: u64 = 1;
    const BURST_NS: u64 = 1 << 30;
    const DEADLINE_MS: HeaderName = HeaderName::from_static("x-deadline-ms");
    const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

    /// What the requests share: the overload count, the monitor's counts,
    /// the rate limit's state.
    struct Shared {
        in_service: AtomicU64,
        started: AtomicU64,
        finished: AtomicU64,
        /// GCRA's theoretical arrival time, nanoseconds since `epoch`.
        tat: AtomicU64,
        epoch: Instant,
    }

    impl Shared {
        fn admit_rate(&self, now: Instant) -> bool {
            let now = u64::try_from(now.duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
            let mut tat = self.tat.load(Ordering::Relaxed);
            loop {
                let next = tat.max(now) + EMISSION_NS;
                if next - now > BURST_NS {
                    return false;
                }
                match self.tat.compare_exchange_weak(
                    tat,
                    next,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return true,
                    Err(seen) => tat = seen,
                }
            }
        }
    }

    /// The one layer; `layer()` makes it for a server.
    #[derive(Clone)]
    pub(crate) struct Essentials<S> {
        inner: S,
        shared: Arc<Shared>,
        budget: Duration,
        /// The inner service failed to get ready: the next call answers 500.
        not_ready: bool,
    }

    /// A layer of [`Essentials`] sharing one state, with `budget` per request.
    pub(crate) fn layer<S>(
        budget: Duration,
    ) -> impl tower::Layer<S, Service = Essentials<S>> + Clone {
        let shared = Arc::new(Shared {
            in_service: AtomicU64::new(0),
            started: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            tat: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        tower::layer::layer_fn(move |inner| Essentials {
            inner,
            shared: shared.clone(),
            budget,
            not_ready: false,
        })
    }

    /// What an answer of this layer's own says about the request.
    struct Meta {
        method: Method,
        path: Option<PathAndQuery>,
        grpc: bool,
    }

    fn is_grpc(headers: &HeaderMap) -> bool {
        headers
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
    }

    /// The budget the caller gives on the wire, `Err` when malformed.
    fn wire_budget(headers: &HeaderMap) -> Result<Option<Duration>, MalformedDeadline> {
        let mut budget = None::<Duration>;
        if let Some(v) = headers.get(GRPC_TIMEOUT) {
            budget = Some(codec::parse_grpc_timeout(v.as_bytes())?);
        }
        if let Some(v) = headers.get(DEADLINE_MS) {
            let d = codec::parse_millis(&DEADLINE_MS, v.as_bytes())?;
            budget = Some(budget.map_or(d, |b| b.min(d)));
        }
        Ok(budget)
    }

    /// This layer's own answer: `status` for HTTP, `grpc` as a trailers-only
    /// gRPC response.
    fn answer<B>(meta: &Meta, status: StatusCode, grpc: u8) -> Response<EssentialsBody<B>> {
        let mut res = Response::new(EssentialsBody::Empty);
        if meta.grpc {
            res.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            res.headers_mut()
                .insert(GRPC_STATUS, HeaderValue::from(u16::from(grpc)));
        } else {
            *res.status_mut() = status;
        }
        // What an error answer would name (and log): here, only kept.
        std::hint::black_box((&meta.method, &meta.path));
        res
    }

    impl<S, ReqB, ResB> Service<Request<ReqB>> for Essentials<S>
    where
        S: Service<Request<ReqB>, Response = Response<ResB>>,
        S::Error: Into<BoxError>,
    {
        type Response = Response<EssentialsBody<ResB>>;
        type Error = Infallible;
        type Future = EssentialsFuture<S::Future>;

        fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
            // As ErrorEnrich: a readiness error is answered by the next call.
            if let Poll::Ready(Err(_)) = self.inner.poll_ready(cx) {
                self.not_ready = true;
            }
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
            let now = Instant::now();
            let meta = Meta {
                method: req.method().clone(),
                path: req.uri().path_and_query().cloned(),
                grpc: is_grpc(req.headers()),
            };
            let shared = self.shared.clone();
            if std::mem::take(&mut self.not_ready) {
                return EssentialsFuture::answered(
                    meta,
                    shared,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    13,
                );
            }
            let budget = match wire_budget(req.headers()) {
                Ok(wire) => wire.map_or(self.budget, |w| w.min(self.budget)),
                Err(_malformed) => {
                    return EssentialsFuture::answered(meta, shared, StatusCode::BAD_REQUEST, 3);
                }
            };
            let deadline = Deadline::after(now, budget, Origin::Local);
            if shared.in_service.fetch_add(1, Ordering::Relaxed) >= LIMIT {
                shared.in_service.fetch_sub(1, Ordering::Relaxed);
                return EssentialsFuture::answered(
                    meta,
                    shared,
                    StatusCode::SERVICE_UNAVAILABLE,
                    14,
                );
            }
            if !shared.admit_rate(now) {
                shared.in_service.fetch_sub(1, Ordering::Relaxed);
                return EssentialsFuture::answered(meta, shared, StatusCode::TOO_MANY_REQUESTS, 8);
            }
            shared.started.fetch_add(1, Ordering::Relaxed);
            let cx = deadline.map_or_else(Context::new, Context::until);
            req.set_context(cx.clone());
            let inner = &mut self.inner;
            match catch_unwind(AssertUnwindSafe(|| cx.scope_with(|| inner.call(req)))) {
                Ok(future) => EssentialsFuture {
                    state: State::Running { future },
                    meta,
                    shared,
                    deadline,
                    timer: None,
                },
                Err(_panic) => {
                    shared.in_service.fetch_sub(1, Ordering::Relaxed);
                    shared.finished.fetch_add(1, Ordering::Relaxed);
                    EssentialsFuture::answered(meta, shared, StatusCode::INTERNAL_SERVER_ERROR, 2)
                }
            }
        }
    }

    pin_project! {
        #[project = StateProj]
        enum State<F> {
            Running { #[pin] future: Scoped<F> },
            Answered { status: StatusCode, grpc: u8 },
            Done,
        }
    }

    pin_project! {
        /// The one response future.
        pub(crate) struct EssentialsFuture<F> {
            #[pin]
            state: State<F>,
            meta: Meta,
            shared: Arc<Shared>,
            deadline: Option<Deadline>,
            // Made only when the inner future is pending.
            timer: Option<Pin<Box<Sleep>>>,
        }
    }

    impl<F> EssentialsFuture<F> {
        fn answered(meta: Meta, shared: Arc<Shared>, status: StatusCode, grpc: u8) -> Self {
            EssentialsFuture {
                state: State::Answered { status, grpc },
                meta,
                shared,
                deadline: None,
                timer: None,
            }
        }
    }

    impl<F, B, E> Future for EssentialsFuture<F>
    where
        F: Future<Output = Result<Response<B>, E>>,
        E: Into<BoxError>,
    {
        type Output = Result<Response<EssentialsBody<B>>, Infallible>;

        fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
            let mut this = self.project();
            let (status, grpc) = match this.state.as_mut().project() {
                StateProj::Running { mut future } => {
                    match catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
                        Ok(Poll::Ready(Ok(res))) => {
                            let cut = match *this.deadline {
                                Some(deadline) if this.meta.grpc => {
                                    Some((future.context().clone(), deadline))
                                }
                                _ => None,
                            };
                            this.state.set(State::Done);
                            this.shared.in_service.fetch_sub(1, Ordering::Relaxed);
                            let finished = Finished(this.shared.clone());
                            return Poll::Ready(Ok(res.map(|body| EssentialsBody::Inner {
                                body,
                                cut,
                                timer: None,
                                ended: false,
                                finished,
                            })));
                        }
                        Ok(Poll::Ready(Err(_))) | Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, 2),
                        Ok(Poll::Pending) => {
                            let Some(deadline) = *this.deadline else {
                                return Poll::Pending;
                            };
                            let timer = this.timer.get_or_insert_with(|| {
                                Box::pin(tokio::time::sleep_until(deadline.instant()))
                            });
                            if timer.as_mut().poll(cx).is_pending() {
                                return Poll::Pending;
                            }
                            future.context().cancel();
                            (StatusCode::GATEWAY_TIMEOUT, 4)
                        }
                    }
                }
                StateProj::Answered { status, grpc } => {
                    let answered = (*status, *grpc);
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(answer(this.meta, answered.0, answered.1)));
                }
                StateProj::Done => panic!("polled after completion"),
            };
            // The inner future failed, panicked or ran out of time: dropped
            // before answering.
            this.state.set(State::Done);
            this.shared.in_service.fetch_sub(1, Ordering::Relaxed);
            this.shared.finished.fetch_add(1, Ordering::Relaxed);
            Poll::Ready(Ok(answer(this.meta, status, grpc)))
        }
    }

    /// Counts a request finished when its body is dropped.
    struct Finished(Arc<Shared>);

    impl Drop for Finished {
        fn drop(&mut self) {
            self.0.finished.fetch_add(1, Ordering::Relaxed);
        }
    }

    pin_project! {
        /// The one body wrapper.
        #[project = BodyProj]
        pub(crate) enum EssentialsBody<B> {
            Inner {
                #[pin]
                body: B,
                // A gRPC body's context and deadline: cut when it passes.
                cut: Option<(Context, Deadline)>,
                timer: Option<Pin<Box<Sleep>>>,
                // Cut: nothing more comes.
                ended: bool,
                finished: Finished,
            },
            Empty,
        }
    }

    impl<B> Body for EssentialsBody<B>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut TaskContext<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            match self.project() {
                BodyProj::Inner {
                    body,
                    cut,
                    timer,
                    ended,
                    ..
                } => {
                    if *ended {
                        return Poll::Ready(None);
                    }
                    let polled = body.poll_frame(cx).map_err(Into::into);
                    let (Poll::Pending, Some((context, deadline))) = (&polled, &*cut) else {
                        return polled;
                    };
                    let timer = timer.get_or_insert_with(|| {
                        Box::pin(tokio::time::sleep_until(deadline.instant()))
                    });
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    context.cancel();
                    let mut trailers = HeaderMap::new();
                    trailers.insert(GRPC_STATUS, HeaderValue::from_static("4"));
                    *ended = true;
                    Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                }
                BodyProj::Empty => Poll::Ready(None),
            }
        }

        fn is_end_stream(&self) -> bool {
            match self {
                EssentialsBody::Inner { body, ended, .. } => *ended || body.is_end_stream(),
                EssentialsBody::Empty => true,
            }
        }

        fn size_hint(&self) -> SizeHint {
            match self {
                EssentialsBody::Inner { body, .. } => body.size_hint(),
                EssentialsBody::Empty => SizeHint::with_exact(0),
            }
        }
    }
}

fn pin_to(cpu: usize) {
    if std::env::var("E2E_PIN").as_deref() == Ok("0") {
        return;
    }
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    // Threads created afterwards (the runtime's) inherit the mask.
    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
        eprintln!("could not pin to CPU {cpu}: {e}");
    }
}

fn process_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// How long this process's threads have waited, runnable, for a CPU (ns;
/// `run_delay` in `/proc/self/task/*/schedstat`): time another process
/// held the CPU they are pinned to.
fn process_run_delay_ns() -> u64 {
    run_delay_ns("/proc/self/task")
}

/// The same for the threads listed in `tasks` (`/proc/PID/task`).
fn run_delay_ns(tasks: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(tasks) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// The child: serves `config` over `proto` on 127.0.0.1, prints its port,
/// then answers each `cpu` line on stdin with its CPU time in ns; exits when
/// stdin closes.
fn serve(config: Config, proto: Proto) {
    pin_to(SERVER_CPU);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("server runtime");
    rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        println!("{}", listener.local_addr().expect("addr").port());
        std::io::stdout().flush().expect("stdout");
        std::thread::spawn(|| {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                match line.as_deref() {
                    Ok("cpu") => {
                        println!("{} {}", process_cpu_ns(), process_run_delay_ns());
                        std::io::stdout().flush().expect("stdout");
                    }
                    _ => break,
                }
            }
            std::process::exit(0);
        });
        match proto {
            Proto::Http1 | Proto::Http2 => {
                serve_axum(listener, config, proto == Proto::Http2).await
            }
            Proto::Grpc => serve_grpc(listener, config).await,
        }
    });
}

async fn serve_axum(listener: TcpListener, config: Config, h2: bool) {
    let hello = Router::new().route("/", get(|| async { "hello" }));
    let router = match config {
        Config::Bare => hello,
        Config::Atscale => hello.layer(atscale_stack!()),
        Config::AtscaleNoOverload => hello.layer(atscale_stack!(without_overload)),
        Config::Peer => hello.layer(peer_stack!()),
        Config::Floor => hello.layer(floor_stack!()),
        Config::Essentials => hello.layer(essentials::layer(BUDGET)),
        Config::UptoEnrich => hello.layer(upto_stack!(enrich)),
        Config::UptoDeadline => hello.layer(upto_stack!(deadline)),
        Config::UptoBodies => hello.layer(upto_stack!(bodies)),
        Config::UptoOverload => hello.layer(upto_stack!(overload)),
        Config::UptoHeartbeat => hello.layer(upto_stack!(heartbeat)),
        Config::Other => unreachable!("spawned as the configuration it serves"),
    };
    // What `axum::serve` does: the routes (and the layers around them) are
    // built once, not per request.
    let router: Router = router.with_state(());
    loop {
        let (stream, _) = listener.accept().await.expect("accept");
        stream.set_nodelay(true).expect("nodelay");
        let router = router.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| router.clone().oneshot(req));
            let io = TokioIo::new(stream);
            // Connections end when the load generator closes them.
            let _ = if h2 {
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, svc)
                    .await
            } else {
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await
            };
        });
    }
}

async fn serve_grpc(listener: TcpListener, config: Config) {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    macro_rules! grpc_with {
        ($layer:expr) => {
            Server::builder()
                .layer($layer)
                .add_service(health)
                .serve_with_incoming(incoming)
                .await
        };
    }
    match config {
        Config::Bare => {
            Server::builder()
                .add_service(health)
                .serve_with_incoming(incoming)
                .await
        }
        Config::Atscale => grpc_with!(atscale_stack!()),
        Config::AtscaleNoOverload => grpc_with!(atscale_stack!(without_overload)),
        Config::Peer => grpc_with!(peer_stack!()),
        Config::Floor => grpc_with!(floor_stack!()),
        Config::Essentials => grpc_with!(essentials::layer(BUDGET)),
        Config::UptoEnrich => grpc_with!(upto_stack!(enrich)),
        Config::UptoDeadline => grpc_with!(upto_stack!(deadline)),
        Config::UptoBodies => grpc_with!(upto_stack!(bodies)),
        Config::UptoOverload => grpc_with!(upto_stack!(overload)),
        Config::UptoHeartbeat => grpc_with!(upto_stack!(heartbeat)),
        Config::Other => unreachable!("spawned as the configuration it serves"),
    }
    .expect("grpc server");
}

// ----------------------------------------------------------------- client side

/// A server process and the load generator's connections to it.
struct Target {
    config: Config,
    proto: Proto,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    addr: SocketAddr,
    client: Client,
}

enum Client {
    /// HTTP/1.1 keep-alive connections, each driven by one task at a time.
    H1(Vec<H1Sender>),
    /// One HTTP/2 connection, shared by every request.
    H2(H2Sender),
}

type H1Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
type H2Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

impl Target {
    async fn spawn(config: Config, proto: Proto) -> Target {
        let (exe, served) = match config {
            Config::Other => (
                std::env::var_os("E2E_OTHER")
                    .expect("E2E_OTHER: the other build's executable")
                    .into(),
                Config::other_serves().name(),
            ),
            _ => (std::env::current_exe().expect("current_exe"), config.name()),
        };
        let mut child = Command::new(exe)
            .args(["serve", served, proto.name()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn server");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("port");
        let port: u16 = line.trim().parse().expect("port number");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let client = match proto {
            Proto::Http1 => {
                let mut conns = Vec::with_capacity(H1_CONNECTIONS);
                for _ in 0..H1_CONNECTIONS {
                    let stream = TcpStream::connect(addr).await.expect("connect");
                    stream.set_nodelay(true).expect("nodelay");
                    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .expect("handshake");
                    tokio::spawn(conn);
                    conns.push(send);
                }
                Client::H1(conns)
            }
            Proto::Http2 | Proto::Grpc => {
                let stream = TcpStream::connect(addr).await.expect("connect");
                stream.set_nodelay(true).expect("nodelay");
                let (send, conn) = hyper::client::conn::http2::handshake(
                    TokioExecutor::new(),
                    TokioIo::new(stream),
                )
                .await
                .expect("handshake");
                tokio::spawn(conn);
                Client::H2(send)
            }
        };
        Target {
            config,
            proto,
            child,
            stdin,
            stdout,
            addr,
            client,
        }
    }

    /// A new server process and new connections in place of this one,
    /// warmed up as at the start (see [`Sample::unanswered`]). The old
    /// process is killed first: whatever it still had to do (requests it
    /// read and did not answer, or has not read yet) dies with it, and it
    /// takes no CPU from the new one.
    async fn respawn(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let fresh = Target::spawn(self.config, self.proto).await;
        // The old connections close with it (their tasks end on the reset).
        drop(std::mem::replace(self, fresh));
        capacity(self, 0.3).await;
    }

    /// The server process's CPU time so far and how long its threads
    /// waited for a CPU, in ns.
    fn cpu_ns(&mut self) -> (u64, u64) {
        writeln!(self.stdin, "cpu").expect("ask cpu");
        self.stdin.flush().expect("ask cpu");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("cpu");
        let mut words = line.split_whitespace().map(|w| w.parse().expect("ns"));
        (
            words.next().expect("cpu ns"),
            words.next().expect("delay ns"),
        )
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        // Any line but `cpu` ends the server; wait so no process outlives the bench.
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

fn request(proto: Proto, addr: SocketAddr) -> Request<Full<Bytes>> {
    match proto {
        Proto::Http1 => Request::get("/")
            .header(http::header::HOST, addr.to_string())
            .body(Full::new(Bytes::new())),
        Proto::Http2 => Request::get(format!("http://{addr}/")).body(Full::new(Bytes::new())),
        // An empty HealthCheckRequest (service ""): a 5-byte gRPC frame.
        Proto::Grpc => Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0]))),
    }
    .expect("request")
}

/// Reads a response to its end and checks it: 200 and "hello", or gRPC status 0.
async fn check(
    proto: Proto,
    res: Result<http::Response<hyper::body::Incoming>, hyper::Error>,
) -> Result<(), String> {
    let (parts, body) = res.map_err(|e| e.to_string())?.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?;
    if parts.status != StatusCode::OK {
        return Err(format!("status {}", parts.status));
    }
    if proto == Proto::Grpc {
        let status = body
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| parts.headers.get("grpc-status"));
        if status.map(|s| s.as_bytes()) != Some(b"0") {
            return Err(format!("grpc-status {status:?}"));
        }
    } else if body.to_bytes() != "hello" {
        return Err("unexpected body".into());
    }
    Ok(())
}

/// One request on an HTTP/1.1 connection: `false` when the answer was not
/// a success (an overload refusal, say); a broken connection panics.
async fn one_h1(conn: &mut H1Sender, proto: Proto, addr: SocketAddr) -> bool {
    conn.ready().await.expect("connection");
    let res = conn.send_request(request(proto, addr)).await;
    answered(check(proto, res).await)
}

async fn one_h2(mut send: H2Sender, proto: Proto, addr: SocketAddr) -> bool {
    let res = send.send_request(request(proto, addr)).await;
    answered(check(proto, res).await)
}

fn answered(result: Result<(), String>) -> bool {
    match result {
        Ok(()) => true,
        Err(e) if e.starts_with("status") || e.starts_with("grpc-status") => false,
        Err(e) => panic!("request: {e}"),
    }
}

/// Closed loop for `secs` (HTTP/1.1: one request in flight per connection;
/// HTTP/2: 64 in flight): requests per second.
async fn capacity(target: &mut Target, secs: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let (proto, addr) = (target.proto, target.addr);
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    match &mut target.client {
        Client::H1(conns) => {
            for mut conn in std::mem::take(conns) {
                workers.spawn(async move {
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        one_h1(&mut conn, proto, addr).await;
                        n += 1;
                    }
                    (n, Some(conn))
                });
            }
        }
        Client::H2(send) => {
            for _ in 0..64 {
                let send = send.clone();
                workers.spawn(async move {
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        one_h2(send.clone(), proto, addr).await;
                        n += 1;
                    }
                    (n, None)
                });
            }
        }
    }
    // Bounded: a server that stops answering here (the capacity run, or the
    // warm-up of a respawned server) would otherwise hang the whole bench.
    // Nothing is measured yet, so it is a failure, not a window to redo.
    let bound = Duration::from_secs_f64(secs) + drain_bound().max(Duration::from_secs(10));
    let mut done = 0;
    let joined = tokio::time::timeout(bound, async {
        while let Some(worker) = workers.join_next().await {
            let (n, conn) = worker.expect("worker");
            done += n;
            if let (Some(conn), Client::H1(conns)) = (conn, &mut target.client) {
                conns.push(conn);
            }
        }
    })
    .await;
    assert!(
        joined.is_ok(),
        "the {} server ({}) left requests of its capacity run unanswered for {bound:?}",
        target.config.name(),
        proto.name()
    );
    done as f64 / start.elapsed().as_secs_f64()
}

/// Keeps the load generator's thread awake while an answer is awaited: a
/// task yields in a loop (the runtime then polls its sockets with a zero
/// timeout) while requests are in flight, and sleeps when none is. On
/// loopback a server's write runs the receiver's TCP path and, when the
/// generator sleeps, wakes it (a cross-CPU wake-up, several µs in a VM) in
/// the server's own context; how often the generator was found asleep grew
/// with the server's time per request, which amplified every difference. A
/// remote client costs a server no such wake-up. It does not spin while
/// nothing is in flight, which keeps it under the kernel's real-time
/// throttling (95% of a CPU) under `chrt -f`. `E2E_SPIN=0` turns it off.
struct Awake {
    on: std::sync::atomic::AtomicBool,
    in_flight: AtomicU64,
    sent: tokio::sync::Notify,
}

impl Awake {
    fn start() -> Option<Arc<Awake>> {
        if std::env::var("E2E_SPIN").as_deref() == Ok("0") {
            return None;
        }
        let awake = Arc::new(Awake {
            on: std::sync::atomic::AtomicBool::new(true),
            in_flight: AtomicU64::new(0),
            sent: tokio::sync::Notify::new(),
        });
        let spin = awake.clone();
        tokio::spawn(async move {
            while spin.on.load(Ordering::Relaxed) {
                if spin.in_flight.load(Ordering::Relaxed) == 0 {
                    // `notify_one` keeps a permit: a request sent between the
                    // check and this wait is not missed.
                    spin.sent.notified().await;
                } else {
                    tokio::task::yield_now().await;
                }
            }
        });
        Some(awake)
    }

    fn sent(this: &Option<Arc<Awake>>) {
        if let Some(a) = this {
            a.in_flight.fetch_add(1, Ordering::Relaxed);
            a.sent.notify_one();
        }
    }

    fn answered(this: &Option<Arc<Awake>>) {
        if let Some(a) = this {
            a.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn stop(this: Option<Arc<Awake>>) {
        if let Some(a) = this {
            a.on.store(false, Ordering::Relaxed);
            a.sent.notify_one();
        }
    }
}

/// One measurement window: `rate` requests per second for `secs`, open loop.
struct Sample {
    cpu_per_request_ns: f64,
    latencies_us: Vec<u32>,
    achieved_rate: f64,
    /// Answers that were not a success (overload refusals).
    refused: u64,
    /// How long the server's and the generator's threads waited for their
    /// CPU during the window (another process held it).
    delayed_ns: u64,
    /// `Some(n)`: `n` requests were still unanswered [`drain_bound`] after
    /// the last was sent (seen once while another SCHED_FIFO process held
    /// the CPUs). The window is not measured (no CPU figure) and counts as
    /// disturbed: measured again like a window delayed past
    /// `E2E_MAX_DELAY_MS`, at most as often, then left out of its round.
    /// The requests still out are not awaited: their tasks are aborted and
    /// the server process is killed and started again (with new
    /// connections, warmed up), because a server still working on them, or
    /// an HTTP/1.1 connection still queued behind one, would charge them
    /// to the next window.
    timed_out: Option<u64>,
}

impl Sample {
    fn disturbed(&self, max_delay_ns: u64) -> bool {
        self.timed_out.is_some() || self.delayed_ns > max_delay_ns
    }
}

/// How long a window waits for its last answers once every request is
/// sent: `E2E_DRAIN_SECS` (default 60 s; a tiny value exercises the
/// unanswered-window path, see [`Sample::timed_out`]).
fn drain_bound() -> Duration {
    static BOUND: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *BOUND.get_or_init(|| Duration::from_secs_f64(env_f64("E2E_DRAIN_SECS", 60.0)))
}

/// Joins `tasks` (a window's requests, or its HTTP/1.1 connections'
/// workers), handing each result to `each`: `true` when all are joined,
/// `false` when [`drain_bound`] passed with some still running (those are
/// aborted). Finished tasks are always joined first, so the bound only
/// ends a wait for one still running. A task that panicked (a wrong
/// answer, a broken connection) panics here.
async fn drain<T: 'static>(tasks: &mut tokio::task::JoinSet<T>, mut each: impl FnMut(T)) -> bool {
    let bound = tokio::time::sleep(drain_bound());
    tokio::pin!(bound);
    loop {
        tokio::select! {
            biased;
            done = tasks.join_next() => match done {
                Some(done) => each(done.expect("request task")),
                None => return true,
            },
            () = &mut bound => {
                tasks.abort_all();
                return false;
            }
        }
    }
}

/// Sends `rate` requests per second for `secs` on schedule, whatever the
/// answers (HTTP/1.1: request `i` queues on connection `i % 32`); latency
/// is counted from each request's scheduled time.
async fn open_loop(target: &mut Target, rate: f64, secs: f64) -> Sample {
    let total = (rate * secs) as u64;
    let (proto, addr) = (target.proto, target.addr);
    let awake = Awake::start();
    let delay_before = process_run_delay_ns();
    let (cpu_before, server_delay_before) = target.cpu_ns();
    let start = Instant::now();
    let schedule = move |i: u64| start + Duration::from_secs_f64(i as f64 / rate);
    let mut latencies_us = Vec::with_capacity(total as usize);
    let mut refused = 0u64;
    let answered = Arc::new(AtomicU64::new(0));
    let drained = match &mut target.client {
        Client::H1(conns) => {
            let mut queues = Vec::new();
            let mut workers = tokio::task::JoinSet::new();
            for mut conn in std::mem::take(conns) {
                let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
                queues.push(tx);
                let awake = awake.clone();
                let answered = answered.clone();
                workers.spawn(async move {
                    let (mut lat, mut refused) = (Vec::new(), 0u64);
                    while let Some(at) = rx.recv().await {
                        refused += u64::from(!one_h1(&mut conn, proto, addr).await);
                        answered.fetch_add(1, Ordering::Relaxed);
                        Awake::answered(&awake);
                        lat.push(at.elapsed().as_micros() as u32);
                    }
                    (conn, lat, refused)
                });
            }
            for i in 0..total {
                let at = schedule(i);
                if at > Instant::now() {
                    tokio::time::sleep_until(at.into()).await;
                }
                Awake::sent(&awake);
                queues[i as usize % queues.len()].send(at).expect("worker");
            }
            drop(queues);
            drain(&mut workers, |(conn, lat, no)| {
                conns.push(conn);
                latencies_us.extend(lat);
                refused += no;
            })
            .await
        }
        Client::H2(send) => {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..total {
                let at = schedule(i);
                if at > Instant::now() {
                    tokio::time::sleep_until(at.into()).await;
                }
                let send = send.clone();
                Awake::sent(&awake);
                let awake = awake.clone();
                let answered = answered.clone();
                tasks.spawn(async move {
                    let ok = one_h2(send, proto, addr).await;
                    answered.fetch_add(1, Ordering::Relaxed);
                    Awake::answered(&awake);
                    (at.elapsed().as_micros() as u32, ok)
                });
            }
            drain(&mut tasks, |(lat, ok)| {
                latencies_us.push(lat);
                refused += u64::from(!ok);
            })
            .await
        }
    };
    if !drained {
        Awake::stop(awake);
        let unanswered = total - answered.load(Ordering::Relaxed);
        // The server's wait read from here: it may be the one that cannot run.
        let server_delay = run_delay_ns(&format!("/proc/{}/task", target.child.id()));
        let delayed_ns = server_delay.saturating_sub(server_delay_before)
            + (process_run_delay_ns() - delay_before);
        eprintln!(
            "{} {}: {unanswered} of {total} requests unanswered {:.3} s after the last was sent \
             (server and generator waited {:.1} ms for their CPU): window not measured, \
             server process started again",
            target.config.name(),
            target.proto.name(),
            drain_bound().as_secs_f64(),
            delayed_ns as f64 / 1e6
        );
        target.respawn().await;
        return Sample {
            cpu_per_request_ns: f64::NAN,
            latencies_us: Vec::new(),
            achieved_rate: f64::NAN,
            refused,
            delayed_ns,
            timed_out: Some(unanswered),
        };
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (cpu, server_delay) = target.cpu_ns();
    let delayed_ns = (server_delay - server_delay_before) + (process_run_delay_ns() - delay_before);
    Awake::stop(awake);
    Sample {
        cpu_per_request_ns: (cpu - cpu_before) as f64 / total as f64,
        latencies_us,
        achieved_rate: total as f64 / elapsed,
        refused,
        delayed_ns,
        timed_out: None,
    }
}

// ------------------------------------------------------------------ statistics

/// Two-sided 95% Student t for `df` degrees of freedom.
fn t95(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    if df == 0 {
        f64::INFINITY
    } else {
        T.get(df - 1).copied().unwrap_or(1.96)
    }
}

/// Mean and 95% confidence half-width.
fn mean_ci(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, f64::INFINITY);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, t95(xs.len() - 1) * (var / n).sqrt())
}

/// Per-round ratios `a / b`, over the rounds where both were measured.
fn paired(a: &[Option<f64>], b: &[Option<f64>]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .filter_map(|(a, b)| Some((*a)? / (*b)?))
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    let i = ((sorted.len().max(1) as f64 - 1.0) * p).round() as usize;
    sorted.get(i).map_or(f64::NAN, |&x| f64::from(x))
}

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}: not a number: {v}"))
        })
        .unwrap_or(default)
}

/// Per protocol and configuration: the rounds' samples.
struct Series {
    /// Per round: CPU per request (ns), `None` for a window left out.
    cpu: Vec<Option<f64>>,
    latencies: Vec<u32>,
    rates: Vec<f64>,
    refused: u64,
    /// Windows measured again: the server or the generator waited for its
    /// CPU for longer than `E2E_MAX_DELAY_MS`, or answers were missing
    /// after `E2E_DRAIN_SECS`.
    redone: u64,
    /// Windows left out after 5 tries.
    dropped: u64,
    /// Of the windows redone or left out, those with answers missing.
    unanswered: u64,
    /// Per kept window: how long they waited, ms.
    delayed_ms: Vec<f64>,
}

impl Series {
    fn new() -> Series {
        Series {
            cpu: Vec::new(),
            latencies: Vec::new(),
            rates: Vec::new(),
            refused: 0,
            redone: 0,
            dropped: 0,
            unanswered: 0,
            delayed_ms: Vec::new(),
        }
    }

    /// Adds a round's window (its configuration's and protocol's).
    fn add(&mut self, window: Window) {
        self.redone += window.redone;
        self.unanswered += window.unanswered;
        match window.sample {
            None => {
                self.cpu.push(None);
                self.dropped += 1;
            }
            Some(sample) => {
                self.delayed_ms.push(sample.delayed_ns as f64 / 1e6);
                self.cpu.push(Some(sample.cpu_per_request_ns));
                self.latencies.extend(sample.latencies_us);
                self.rates.push(sample.achieved_rate);
                self.refused += sample.refused;
            }
        }
    }
}

/// How every window is run and judged, from the environment: a round's
/// process inherits it, so it runs its windows as this one would.
struct WindowRules {
    /// `E2E_SECS`: the length of a window.
    secs: f64,
    /// `E2E_MAX_DELAY_MS`: the CPU wait past which a window is disturbed.
    max_delay_ns: u64,
    /// `E2E_VERBOSE`: a line on stderr per window.
    verbose: bool,
}

impl WindowRules {
    fn from_env() -> WindowRules {
        WindowRules {
            secs: env_f64("E2E_SECS", 2.0),
            max_delay_ns: (env_f64("E2E_MAX_DELAY_MS", 5.0) * 1e6) as u64,
            verbose: std::env::var("E2E_VERBOSE").is_ok_and(|v| v != "0"),
        }
    }
}

/// How many times a disturbed window is measured in all before it is left
/// out of its round.
const TRIES: u64 = 5;

/// What a round made of one configuration's window on one protocol (indices
/// into the run's protocols and configurations).
struct Window {
    proto: usize,
    config: usize,
    /// The sample kept, or `None`: still disturbed after [`TRIES`], left out
    /// (the round has no ratio for it).
    sample: Option<Sample>,
    /// Tries measured again.
    redone: u64,
    /// Of the tries redone or left out, those with answers missing.
    unanswered: u64,
}

impl Window {
    /// The line a round's process prints for this window, read back by
    /// [`Window::parse`]: `window P C REDONE UNANSWERED` then, kept, `CPU_NS
    /// DELAYED_NS RATE REFUSED` and every latency in µs, or `-` for a window
    /// left out. Floats print in Rust's shortest form that parses back to
    /// the same value, so both modes accumulate the same numbers.
    fn line(&self) -> String {
        use std::fmt::Write as _;
        let mut line = format!(
            "window {} {} {} {}",
            self.proto, self.config, self.redone, self.unanswered
        );
        match &self.sample {
            None => line.push_str(" -"),
            Some(s) => {
                let _ = write!(
                    line,
                    " {} {} {} {}",
                    s.cpu_per_request_ns, s.delayed_ns, s.achieved_rate, s.refused
                );
                for latency in &s.latencies_us {
                    let _ = write!(line, " {latency}");
                }
            }
        }
        line
    }

    /// A [`Window::line`] read back; `None` if it is not one.
    fn parse(line: &str) -> Option<Window> {
        let mut words = line.split_whitespace();
        if words.next()? != "window" {
            return None;
        }
        let mut next = || words.next();
        let (proto, config) = (next()?.parse().ok()?, next()?.parse().ok()?);
        let (redone, unanswered) = (next()?.parse().ok()?, next()?.parse().ok()?);
        let sample = match next()? {
            "-" => None,
            cpu => Some(Sample {
                cpu_per_request_ns: cpu.parse().ok()?,
                delayed_ns: next()?.parse().ok()?,
                achieved_rate: next()?.parse().ok()?,
                refused: next()?.parse().ok()?,
                latencies_us: Vec::new(),
                timed_out: None,
            }),
        };
        let rest: Vec<&str> = words.collect();
        let sample = match sample {
            Some(mut s) => {
                s.latencies_us = rest.iter().map(|l| l.parse().ok()).collect::<Option<_>>()?;
                Some(s)
            }
            None if rest.is_empty() => None,
            None => return None,
        };
        Some(Window {
            proto,
            config,
            sample,
            redone,
            unanswered,
        })
    }
}

/// A server process per configuration for `proto`, each warmed up by a
/// short closed-loop run (which also checks that it answers).
async fn spawn_row(proto: Proto, configs: &[Config]) -> Vec<Target> {
    let mut row = Vec::with_capacity(configs.len());
    for &config in configs {
        let mut target = Target::spawn(config, proto).await;
        capacity(&mut target, 0.3).await;
        row.push(target);
    }
    row
}

/// Round `round`: per protocol (a row of `targets`, offered `rates[p]`
/// requests per second), a window per configuration, in an order rotated
/// by the round so that none always follows the same one. A window in
/// which another process kept the server or the generator off its CPU for
/// longer than `E2E_MAX_DELAY_MS`, or whose answers did not all come
/// within `E2E_DRAIN_SECS` ([`Sample::timed_out`]), is measured again, at
/// most [`TRIES`] times in all, then left out. The one round body, in this
/// process (`E2E_FRESH_GENERATOR=0`) or in a round's own
/// ([`round_process`]).
async fn play_round(
    targets: &mut [Vec<Target>],
    rates: &[f64],
    round: usize,
    rules: &WindowRules,
) -> Vec<Window> {
    let mut windows = Vec::new();
    for (p, row) in targets.iter_mut().enumerate() {
        for k in 0..row.len() {
            let c = (k + round) % row.len();
            let target = &mut row[c];
            let mut sample = open_loop(target, rates[p], rules.secs).await;
            let (mut redone, mut unanswered) = (0, 0);
            while sample.disturbed(rules.max_delay_ns) && redone + 1 < TRIES {
                redone += 1;
                unanswered += u64::from(sample.timed_out.is_some());
                sample = open_loop(target, rates[p], rules.secs).await;
            }
            if rules.verbose {
                eprintln!(
                    "  {} {}: {:.3} µs/request, waited for CPU {:.2} ms{}",
                    target.proto.name(),
                    target.config.name(),
                    sample.cpu_per_request_ns / 1000.0,
                    sample.delayed_ns as f64 / 1e6,
                    match sample.timed_out {
                        Some(n) => format!(", {n} unanswered"),
                        None => String::new(),
                    }
                );
            }
            let kept = !sample.disturbed(rules.max_delay_ns);
            if !kept {
                unanswered += u64::from(sample.timed_out.is_some());
            }
            windows.push(Window {
                proto: p,
                config: c,
                sample: kept.then_some(sample),
                redone,
                unanswered,
            });
        }
    }
    windows
}

/// `round N PROTO=RATE…`: round `N` of a run in a process of its own, the
/// load generator with a memory layout of its own (see the module docs):
/// pinned to [`CLIENT_CPU`], it starts and warms a server per configuration
/// (`E2E_CONFIGS`, inherited) and protocol, offers each protocol the rate
/// given, runs the round ([`play_round`]) and prints a [`Window::line`] per
/// window on stdout. Its servers quit before it exits.
fn round_process(round: usize, offered: &[(Proto, f64)]) {
    pin_to(CLIENT_CPU);
    let rules = WindowRules::from_env();
    let configs = Config::from_env();
    let windows = client_runtime().block_on(async {
        let mut targets = Vec::with_capacity(offered.len());
        for &(proto, _) in offered {
            targets.push(spawn_row(proto, &configs).await);
        }
        let rates: Vec<f64> = offered.iter().map(|&(_, rate)| rate).collect();
        play_round(&mut targets, &rates, round, &rules).await
        // `targets` dropped here: every server quits and is waited for.
    });
    let mut out = std::io::stdout().lock();
    for window in &windows {
        writeln!(out, "{}", window.line()).expect("stdout");
    }
    out.flush().expect("stdout");
}

/// Runs round `round` in a fresh process ([`round_process`]) and reads its
/// windows back: one for each protocol and configuration, or a panic. A
/// round is never dropped quietly, which would shift the per-round
/// pairing of the series.
fn round_in_child(
    round: usize,
    protos: &[Proto],
    configs: &[Config],
    rates: &[f64],
) -> Vec<Window> {
    let output = Command::new(std::env::current_exe().expect("current_exe"))
        .args(["round", &round.to_string()])
        .args(
            protos
                .iter()
                .zip(rates)
                .map(|(p, r)| format!("{}={r}", p.name())),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // its verbose lines, and its panic if any, go where this process's go
        .stderr(Stdio::inherit())
        .output()
        .expect("spawn the round's load generator");
    assert!(
        output.status.success(),
        "round {round}: its load generator process failed ({}); its stderr is above",
        output.status
    );
    let stdout = String::from_utf8(output.stdout)
        .unwrap_or_else(|e| panic!("round {round}: its load generator printed non-UTF-8: {e}"));
    let mut seen = vec![vec![false; configs.len()]; protos.len()];
    let mut windows = Vec::with_capacity(protos.len() * configs.len());
    for line in stdout.lines() {
        let window = Window::parse(line)
            .filter(|w| w.proto < protos.len() && w.config < configs.len())
            .unwrap_or_else(|| {
                panic!("round {round}: malformed line from its load generator: {line:.200}")
            });
        assert!(
            !std::mem::replace(&mut seen[window.proto][window.config], true),
            "round {round}: its load generator printed two windows for {} {}",
            protos[window.proto].name(),
            configs[window.config].name()
        );
        windows.push(window);
    }
    assert!(
        windows.len() == protos.len() * configs.len(),
        "round {round}: its load generator printed {} windows of {}",
        windows.len(),
        protos.len() * configs.len()
    );
    windows
}

fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime")
}

fn run(protos: Vec<Proto>) {
    pin_to(CLIENT_CPU);
    let rules = WindowRules::from_env();
    let ci_goal = env_f64("E2E_CI", 2.0) / 100.0;
    let max_rounds = env_f64("E2E_MAX_ROUNDS", 40.0) as usize;
    // Enough rounds that several processes (generators, or servers: see
    // `respawn_every`) are in every ratio before its interval may stop the
    // run.
    let min_rounds = 10.min(max_rounds);
    // Each round in a process of its own (see the module docs), unless
    // `E2E_FRESH_GENERATOR=0`.
    let fresh_generator = std::env::var("E2E_FRESH_GENERATOR").as_deref() != Ok("0");
    // In-process only: every `E2E_RESPAWN_EVERY` rounds (default 1; 0:
    // never) every server process is started again, between rounds.
    let respawn_every = env_f64("E2E_RESPAWN_EVERY", 1.0) as usize;
    if fresh_generator && std::env::var_os("E2E_RESPAWN_EVERY").is_some() {
        eprintln!(
            "E2E_RESPAWN_EVERY ignored: every round starts its own servers (E2E_FRESH_GENERATOR=0 keeps one generator)"
        );
    }
    let configs = Config::from_env();
    let rt = client_runtime();
    // The capacities and offered rates, measured in this process.
    let (mut targets, rates) = rt.block_on(async {
        let mut targets: Vec<Vec<Target>> = Vec::new();
        let mut rates = Vec::new();
        for &proto in &protos {
            let mut row = spawn_row(proto, &configs).await;
            let cap = capacity(&mut row[0], 1.5).await;
            let rate = env_f64(
                &format!("E2E_RATE_{}", proto.name().to_uppercase()),
                cap / 2.0,
            );
            eprintln!(
                "{}: bare closed-loop capacity {cap:.0} req/s, offered {rate:.0} req/s",
                proto.name()
            );
            rates.push((cap, rate));
            targets.push(row);
        }
        (targets, rates)
    });
    if fresh_generator {
        // Their servers quit: every round starts its own.
        targets.clear();
    }
    let offered: Vec<f64> = rates.iter().map(|&(_, rate)| rate).collect();
    let mut series: Vec<Vec<Series>> = protos
        .iter()
        .map(|_| configs.iter().map(|_| Series::new()).collect())
        .collect();
    let started = Instant::now();
    let mut widest = f64::INFINITY;
    let mut rounds = 0;
    // Round 0 is the warm-up.
    for round in 0..=max_rounds {
        let windows = if fresh_generator {
            round_in_child(round, &protos, &configs, &offered)
        } else {
            rt.block_on(async {
                // Every server process is started anew every
                // `respawn_every` rounds: a process keeps its own memory
                // layout for all its windows (see the module docs).
                if round > 1 && respawn_every > 0 && (round - 1) % respawn_every == 0 {
                    for row in targets.iter_mut() {
                        for target in row.iter_mut() {
                            target.respawn().await;
                        }
                    }
                }
                play_round(&mut targets, &offered, round, &rules).await
            })
        };
        if round == 0 {
            continue;
        }
        for window in windows {
            series[window.proto][window.config].add(window);
        }
        rounds = round;
        widest = 0.0f64;
        for per_proto in &series {
            for s in &per_proto[1..] {
                let (mean, half) = mean_ci(&paired(&s.cpu, &per_proto[0].cpu));
                // No paired round yet (every bare window left out) is
                // no interval at all: NaN, which `max` would skip, and a
                // run could stop on it.
                let width = half / mean;
                widest = if width.is_nan() {
                    f64::INFINITY
                } else {
                    widest.max(width)
                };
            }
        }
        eprintln!(
            "round {round}: widest 95% CI of a ratio to bare ±{:.2}% ({:.0} s)",
            widest * 100.0,
            started.elapsed().as_secs_f64()
        );
        if round >= min_rounds && widest < ci_goal {
            break;
        }
    }
    drop(targets);
    report(
        &protos,
        &configs,
        &rates,
        &mut series,
        rounds,
        widest,
        rules.secs,
    );
}

fn report(
    protos: &[Proto],
    configs: &[Config],
    rates: &[(f64, f64)],
    series: &mut [Vec<Series>],
    rounds: usize,
    widest: f64,
    secs: f64,
) {
    println!(
        "\n{rounds} rounds of {secs} s per configuration and protocol (after a warm-up round); widest 95% CI of a ratio: ±{:.2}%\n",
        widest * 100.0
    );
    for (p, proto) in protos.iter().enumerate() {
        let (cap, rate) = rates[p];
        println!(
            "### {}: offered {rate:.0} req/s (bare closed-loop capacity {cap:.0} req/s)\n",
            proto.label()
        );
        println!(
            "| configuration | server CPU / request (median) | ratio to bare, mean ± 95% CI | p50 | p99 | achieved req/s | refused | windows redone / left out | CPU wait per kept window (median, max) |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        let bare = series[p][0].cpu.clone();
        for (c, s) in series[p].iter_mut().enumerate() {
            let (mean, half) = mean_ci(&paired(&s.cpu, &bare));
            s.latencies.sort_unstable();
            println!(
                "| {} | {:.2} µs | {} | {:.0} µs | {:.0} µs | {:.0} | {} | {} / {}{} | {:.2} ms, {:.2} ms |",
                configs[c].label(),
                median(s.cpu.iter().flatten().copied().collect()) / 1000.0,
                if c == 0 {
                    "1 (anchor)".to_string()
                } else {
                    format!("**{mean:.4}** ± {half:.4}")
                },
                percentile(&s.latencies, 0.5),
                percentile(&s.latencies, 0.99),
                median(s.rates.clone()),
                s.refused,
                s.redone,
                s.dropped,
                if s.unanswered > 0 {
                    format!(" ({} unanswered)", s.unanswered)
                } else {
                    String::new()
                },
                median(s.delayed_ms.clone()),
                s.delayed_ms.iter().copied().fold(0.0, f64::max),
            );
        }
        // The other ratios, per round, of the configurations measured.
        let at = |config: Config| configs.iter().position(|&c| c == config);
        println!();
        for (a, b) in [
            (Config::Atscale, Config::Peer),
            (Config::AtscaleNoOverload, Config::Peer),
            (Config::Atscale, Config::Floor),
            (Config::AtscaleNoOverload, Config::Floor),
            (Config::Peer, Config::Floor),
            (Config::Atscale, Config::Essentials),
            (Config::Essentials, Config::Peer),
        ]
        .into_iter()
        .chain(STEPS)
        .chain([(Config::Other, Config::other_serves())])
        {
            if let (Some(a), Some(b)) = (at(a), at(b)) {
                let (mean, half) = mean_ci(&paired(&series[p][a].cpu, &series[p][b].cpu));
                println!(
                    "{} / {}: **{mean:.4}** ± {half:.4}",
                    configs[a].name(),
                    configs[b].name()
                );
            }
        }
        println!();
    }
}

/// `profile CONFIG PROTO SECS`: one server under the open-loop load for
/// `SECS`, with `perf record -g` (or `perf $E2E_PERF_ARGS`) attached to it
/// when `E2E_PERF_OUT` names the output file.
fn profile(config: Config, proto: Proto, secs: f64) {
    pin_to(CLIENT_CPU);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    rt.block_on(async move {
        let mut target = Target::spawn(config, proto).await;
        let cap = capacity(&mut target, 1.0).await;
        let rate = env_f64(
            &format!("E2E_RATE_{}", proto.name().to_uppercase()),
            cap / 2.0,
        );
        let perf = std::env::var("E2E_PERF_OUT").ok().map(|out| {
            // `E2E_PERF_ARGS`: the perf command and its options, e.g.
            // `record --call-graph dwarf` or `stat -e sched:sched_wakeup`.
            let args = std::env::var("E2E_PERF_ARGS").unwrap_or_else(|_| "record -g".into());
            // perf at normal priority on either CPU: inheriting this
            // process's CPU and SCHED_FIFO, the spinning generator would
            // starve it.
            Command::new("chrt")
                .args(["-o", "0", "taskset", "-c", "0,1", "perf"])
                .args(args.split_whitespace())
                .args(["-o", &out, "-p"])
                .arg(target.child.id().to_string())
                .args(["--", "sleep"])
                .arg(format!("{secs}"))
                .spawn()
                .expect("perf")
        });
        let sample = open_loop(&mut target, rate, secs).await;
        if let Some(mut perf) = perf {
            perf.wait().expect("perf");
        }
        eprintln!(
            "{} {}: {rate:.0} req/s offered, {} sent, {:.2} µs CPU per request, {} refused",
            config.name(),
            proto.name(),
            sample.latencies_us.len(),
            sample.cpu_per_request_ns / 1000.0,
            sample.refused
        );
    });
}

/// The size of `svc` (what hyper and tonic clone and move per request) and
/// of the future it returns for `req` (made once, dropped unpolled).
async fn future_size<S: tower::Service<R>, R>(svc: &mut S, req: R) -> (usize, usize) {
    let service = std::mem::size_of_val(svc);
    let svc = ServiceExt::<R>::ready(svc).await.ok().expect("ready");
    let future = svc.call(req);
    (service, std::mem::size_of_val(&future))
}

/// `sizes`: the size in bytes of the future each layer of the server stack
/// returns around axum's `Router` and tonic's `Routes`, innermost first
/// (each layer's future holds its inner one and is moved at least once,
/// when its `call` returns it), and the peer and floor stacks' for
/// comparison; then the client stacks' around a stand-in for a `Channel`.
fn sizes() {
    use atscale::deadline::{BodyDeadlineLayer, DeadlineLayer};
    use atscale::error::ErrorEnrichLayer;
    use atscale::heartbeat::{Heartbeat, Monitor};
    use atscale::overload::OverloadLayer;
    use tower::Layer;

    macro_rules! layers {
        ($inner:expr, $req:expr) => {{
            let inner = $inner;
            let limiter = Limiter::new(Limit::per_second(1_000_000_000).expect("limit"));
            let mut out = Vec::new();
            let mut svc = inner.clone();
            out.push(("inner (router)", future_size(&mut svc, $req).await));
            let svc = RateLimitLayer::reject(limiter).layer(inner.clone());
            out.push(("+ RateLimit", future_size(&mut svc.clone(), $req).await));
            let svc = Heartbeat::new(svc, Monitor::new());
            out.push(("+ Heartbeat", future_size(&mut svc.clone(), $req).await));
            let svc = OverloadLayer::new().layer(svc);
            out.push(("+ Overload", future_size(&mut svc.clone(), $req).await));
            let svc = BodyDeadlineLayer::grpc().responses_only().layer(svc);
            out.push((
                "+ ResponseDeadline",
                future_size(&mut svc.clone(), $req).await,
            ));
            let svc = DeadlineLayer::server(BUDGET)
                .with_header(atscale::stack::DEADLINE_HEADER)
                .layer(svc);
            out.push(("+ Deadline", future_size(&mut svc.clone(), $req).await));
            let svc = ErrorEnrichLayer::new("e2e").layer(svc);
            out.push(("+ ErrorEnrich", future_size(&mut svc.clone(), $req).await));
            let mut svc = atscale_stack!().layer(inner.clone());
            out.push((
                "stack::server (+ RateLimit)",
                future_size(&mut svc, $req).await,
            ));
            let mut svc = atscale_stack!(without_overload).layer(inner.clone());
            out.push(("... .without_overload()", future_size(&mut svc, $req).await));
            let mut svc = peer_stack!().service(inner.clone());
            out.push(("peer stack", future_size(&mut svc, $req).await));
            let mut svc = floor_stack!().service(inner.clone());
            out.push(("floor stack", future_size(&mut svc, $req).await));
            let mut svc = essentials::layer(BUDGET).layer(inner);
            out.push(("essentials", future_size(&mut svc, $req).await));
            out
        }};
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let router: Router = Router::new().route("/", get(|| async { "hello" }));
        let http = layers!(router, Request::new(axum::body::Body::empty()));
        let (_, health) = tonic_health::server::health_reporter();
        let routes = tonic::service::Routes::new(health);
        let grpc = layers!(routes, Request::new(tonic::body::Body::empty()));
        println!("| service (future) | axum `Router` | tonic `Routes` |");
        println!("| --- | ---: | ---: |");
        for ((name, (hs, hf)), (_, (gs, gf))) in http.iter().zip(&grpc) {
            println!("| {name} | {hs} B ({hf} B) | {gs} B ({gf} B) |");
        }
        // The client stacks, around a stand-in for tonic's `Channel` that
        // answers at once (its future is an `async` block's).
        let channel = tower::service_fn(|_req: Request<tonic::body::Body>| async {
            Ok::<_, atscale::core::BoxError>(http::Response::new(tonic::body::Body::empty()))
        });
        let call = || Request::new(tonic::body::Body::empty());
        let (retry, hedge, client) = (client_retry, client_hedge, client_stack);
        println!();
        println!("| client stack around a `Channel` stand-in | service (future) |");
        println!("| --- | ---: |");
        let mut svc = channel;
        let (s, f) = future_size(&mut svc, call()).await;
        println!("| the stand-in | {s} B ({f} B) |");
        let (s, f) = future_size(&mut client().layer(channel), call()).await;
        println!("| stack::client | {s} B ({f} B) |");
        let (s, f) = future_size(&mut client().with_retry(retry()).layer(channel), call()).await;
        println!("| stack::client + retry | {s} B ({f} B) |");
        let (s, f) = future_size(&mut client().with_hedge(hedge()).layer(channel), call()).await;
        println!("| stack::client + hedge | {s} B ({f} B) |");
        let stack = client().with_retry(retry()).with_hedge(hedge());
        let (s, f) = future_size(&mut stack.layer(channel), call()).await;
        println!("| stack::client + retry + hedge | {s} B ({f} B) |");
    });
}

/// The client stack the client measurements (`sizes`, `micro client`) wrap.
fn client_stack() -> atscale::stack::ClientStack {
    atscale::stack::client("e2e", BUDGET)
}

/// The retry they add: up to three attempts.
fn client_retry() -> atscale::retry::RetryLayer {
    let policy = atscale::retry::RetryPolicy::builder()
        .max_attempts(3)
        .build()
        .expect("policy");
    atscale::retry::RetryLayer::new(policy)
}

/// The hedge they add: one after 10 ms (never sent to a stand-in that
/// answers at once).
fn client_hedge() -> atscale::hedge::HedgeLayer {
    atscale::hedge::HedgeLayer::fixed(Duration::from_millis(10))
}

/// One call of a clone of `svc` that answers at once (as the `micro
/// client` stand-in does), its body read to its end; polled by hand with a
/// no-op waker, so it is the whole of one call for `valgrind
/// --toggle-collect='stack::call_at_once*'`.
#[inline(never)]
fn call_at_once<S, Q, B>(svc: &S, req: Request<Q>)
where
    S: tower::Service<Request<Q>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let call = std::pin::pin!(svc.clone().oneshot(req));
    let std::task::Poll::Ready(res) = std::future::Future::poll(call, &mut cx) else {
        panic!("the stand-in answers at once");
    };
    let mut body = std::pin::pin!(res.expect("answer").into_body());
    while let std::task::Poll::Ready(Some(frame)) = body.as_mut().poll_frame(&mut cx) {
        std::hint::black_box(frame.expect("frame"));
    }
}

/// `micro [grpc] [N]`: in one process, axum's `Router` (or, with `grpc`,
/// tonic-health's `Routes` answering `Check`) bare, under the server stack,
/// under the stack `.without_overload()`, under the peer stack and under
/// the floor stack (six pass-through layers, [`floor`]) and the
/// essentials (atscale's work done once, in one layer, [`essentials`]), each
/// request a clone of the service called once (as hyper does), its body
/// read to its end (trailers included); interleaved, 11 repetitions of
/// 50 000 requests, ns per request (median, min..max of the difference to
/// bare in the same repetition). `micro [grpc] N` runs configuration N
/// alone (0 bare, 1 stack, 2 without overload, 3 peer, 4 floor, 5
/// essentials), for perf or
/// valgrind (`E2E_MICRO_N` thousand requests, default 2 000);
/// `valgrind --tool=callgrind --toggle-collect='stack::micro::per_request::*'`
/// counts the requests only, not the start-up (the clock's calibration
/// varies from run to run), so its instructions per request are exact.
/// `micro client N` calls a client stack around a stand-in for a `Channel`
/// instead (see the `client` branch; count with
/// `--toggle-collect='stack::call_at_once*'`).
fn micro(grpc: bool, client: bool, only: Option<usize>) {
    use tower::Layer;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    async fn per_request<S, Q, B>(svc: &S, make: fn() -> Request<Q>, n: u32) -> f64
    where
        S: tower::Service<Request<Q>, Response = http::Response<B>> + Clone,
        S::Error: std::fmt::Debug,
        B: http_body::Body,
        B::Error: std::fmt::Debug,
    {
        let start = Instant::now();
        for _ in 0..n {
            let res = svc.clone().oneshot(make()).await.expect("answer");
            let body = res.into_body().collect().await.expect("body");
            std::hint::black_box(body);
        }
        start.elapsed().as_nanos() as f64 / f64::from(n)
    }
    if client {
        // `micro client N`, for valgrind: the client stacks around a
        // stand-in for tonic's `Channel` answering at once (a gRPC head
        // and an empty body): 0 the stand-in, 1 `stack::client`, 2 + a
        // retry, 3 + a hedge (10 ms: never fires), 4 + both.
        let channel = tower::service_fn(|_req: Request<tonic::body::Body>| async {
            let mut res = http::Response::new(tonic::body::Body::empty());
            res.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            res.headers_mut()
                .insert("grpc-status", HeaderValue::from_static("0"));
            Ok::<_, atscale::core::BoxError>(res)
        });
        let (retry, hedge, client) = (client_retry, client_hedge, client_stack);
        let make = || {
            Request::post("http://svc/grpc.health.v1.Health/Check")
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header(http::header::TE, "trailers")
                .body(tonic::body::Body::new(Full::new(Bytes::from_static(
                    &[0; 5],
                ))))
                .expect("request")
        };
        // Every call is ready at once: polled by hand, in a function of
        // its own (`call_at_once`, for `--toggle-collect`), in the runtime.
        let n = 1000 * env_f64("E2E_MICRO_N", 2_000.0) as u32;
        macro_rules! calls {
            ($svc:expr) => {{
                let svc = $svc;
                for _ in 0..n {
                    call_at_once(&svc, make());
                }
            }};
        }
        rt.block_on(async {
            match only.expect("micro client N: 0..=4") {
                0 => calls!(channel),
                1 => calls!(client().layer(channel)),
                2 => calls!(client().with_retry(retry()).layer(channel)),
                3 => calls!(client().with_hedge(hedge()).layer(channel)),
                _ => calls!(
                    client()
                        .with_retry(retry())
                        .with_hedge(hedge())
                        .layer(channel)
                ),
            }
        });
        return;
    }
    macro_rules! compare {
        ($inner:expr, $make:expr) => {{
            let inner = $inner;
            let make = $make;
            let bare = inner.clone();
            let stack = atscale_stack!().layer(inner.clone());
            let no_overload = atscale_stack!(without_overload).layer(inner.clone());
            let peer = peer_stack!().service(inner.clone());
            let floor = floor_stack!().service(inner.clone());
            let essentials = essentials::layer(BUDGET).layer(inner);
            macro_rules! each {
                ($n:expr) => {{
                    [
                        per_request(&bare, make, $n).await,
                        per_request(&stack, make, $n).await,
                        per_request(&no_overload, make, $n).await,
                        per_request(&peer, make, $n).await,
                        per_request(&floor, make, $n).await,
                        per_request(&essentials, make, $n).await,
                    ]
                }};
            }
            if let Some(only) = only {
                // For a profile: one configuration only, `E2E_MICRO_N`
                // thousand requests (default 2 000: 2 000 000).
                for _ in 0..env_f64("E2E_MICRO_N", 2_000.0) as u32 {
                    match only {
                        0 => per_request(&bare, make, 1000).await,
                        1 => per_request(&stack, make, 1000).await,
                        2 => per_request(&no_overload, make, 1000).await,
                        3 => per_request(&peer, make, 1000).await,
                        4 => per_request(&floor, make, 1000).await,
                        _ => per_request(&essentials, make, 1000).await,
                    };
                }
                return Vec::new();
            }
            each!(20_000);
            let mut reps = Vec::new();
            for _ in 0..11 {
                reps.push(each!(50_000));
            }
            reps
        }};
    }
    let reps = rt.block_on(async {
        if grpc {
            let (reporter, health) = tonic_health::server::health_reporter();
            reporter
                .set_service_status("", ServingStatus::Serving)
                .await;
            let routes = tonic::service::Routes::new(health);
            // An empty HealthCheckRequest (service ""): a 5-byte gRPC frame.
            compare!(routes, || Request::post("/grpc.health.v1.Health/Check")
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header(http::header::TE, "trailers")
                .body(tonic::body::Body::new(Full::new(Bytes::from_static(
                    &[0; 5]
                ))))
                .expect("request"))
        } else {
            let router: Router = Router::new().route("/", get(|| async { "hello" }));
            compare!(router, || Request::new(axum::body::Body::empty()))
        }
    });
    if reps.is_empty() {
        return;
    }
    let what = if grpc { "tonic Routes" } else { "axum Router" };
    for (i, name) in [
        "bare",
        "stack::server",
        "stack::server without overload",
        "peer",
        "floor",
        "essentials",
    ]
    .iter()
    .enumerate()
    {
        let mut d: Vec<f64> = reps.iter().map(|r| r[i] - r[0]).collect();
        d.sort_by(f64::total_cmp);
        let mut abs: Vec<f64> = reps.iter().map(|r| r[i]).collect();
        abs.sort_by(f64::total_cmp);
        println!(
            "{what}, {name}: {:.0} ns per request, over bare {:+.0} ns ({:+.0}..{:+.0})",
            abs[5], d[5], d[0], d[10]
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; the rest are words.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(
            Config::parse(&args[1]),
            Proto::parse(&args[2]).expect("protocol"),
        ),
        Some("round") => round_process(
            args[1].parse().expect("round number"),
            &args[2..]
                .iter()
                .map(|a| {
                    let (proto, rate) = a.split_once('=').expect("PROTO=RATE");
                    let proto = Proto::parse(proto).expect("protocol");
                    (proto, rate.parse().expect("rate"))
                })
                .collect::<Vec<_>>(),
        ),
        Some("sizes") => sizes(),
        Some("micro") => {
            let grpc = args.get(1).is_some_and(|a| a == "grpc");
            let client = args.get(1).is_some_and(|a| a == "client");
            let only = args.get(1 + usize::from(grpc || client));
            micro(grpc, client, only.map(|n| n.parse().expect("0..=5")))
        }
        Some("profile") => profile(
            Config::parse(&args[1]),
            Proto::parse(&args[2]).expect("protocol: http1, h2, grpc"),
            args.get(3).map_or(10.0, |s| s.parse().expect("seconds")),
        ),
        _ => {
            let mut protos: Vec<Proto> = args.iter().filter_map(|a| Proto::parse(a)).collect();
            if protos.is_empty() {
                protos = PROTOS.to_vec();
            }
            run(protos);
        }
    }
}
