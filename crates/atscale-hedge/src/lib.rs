//! Hedged requests: send a backup attempt when the first is slow (or several
//! at once), answer with the first good response, cancel the rest — inside a
//! budget of extra load.
//!
//! "The Tail at Scale" (Dean & Barroso, 2013): in Google's BigTable a hedge
//! after 10 ms cut the 99.9th-percentile latency from 1,800 ms to 74 ms for
//! 2% more requests. [`HedgeLayer`] does that for any tower service:
//!
//! - **when**: a [fixed](Delay::fixed) delay, or an [adaptive](Delay::adaptive)
//!   one (a latency percentile over a rolling window, recorded at microsecond
//!   resolution, silent until the window holds enough samples); a zero delay
//!   sends every attempt at once;
//! - **how many**: up to [`max_attempts`](HedgeBuilder::max_attempts) (2 by
//!   default, at most 5 as in gRPC);
//! - **how much**: a [`Budget`] of extra load counted in requests (at most
//!   5% of any 1,000 consecutive requests by default), with a per-second
//!   floor so quiet services can hedge; when latency shifts for everyone, the budget stops
//!   a hedge storm from doubling the load on a struggling backend;
//! - **which outcomes count**: a [`Classify`] predicate sorts outcomes into
//!   good (wins), non-fatal (keep waiting, send the next hedge now) and fatal
//!   (return at once). Only good answers and the attempts they beat feed the
//!   latency window, so fast failures do not drag the delay down;
//! - **where**: around one service, or across replicas — a
//!   [list](HedgeLayer::replicas) or a `tower::discover`
//!   [source](HedgeLayer::discover) — so that a backup never lands on the
//!   replica that is slow;
//! - **what**: requests that can be [replayed](Replay) — `http::Request` with
//!   a [replayable body](ReplayBody), or any body read into memory by
//!   [`BufferBodyLayer`] up to a byte limit (tonic unary calls). Requests
//!   that are not idempotent are sent once unless the layer opts in.
//!
//! Every attempt carries a child of the request's
//! [`Context`](atscale_core::Context) (from the request, or the task-local
//! one): no hedge starts after the deadline or once the request is
//! cancelled, and the attempts that lose are dropped at once and see their
//! context cancelled. The winner's context is left alone, so its response
//! body can still stream.
//!
//! # Example
//!
//! A client stack for `http::Request`s — the shape a tonic `Channel` takes
//! (see below for a real one); the backend here answers the first call
//! slowly, the copies fast:
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::time::Duration;
//! use atscale_hedge::{BufferBodyLayer, BufferedBody, Budget, Delay, HedgeLayer};
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower::{BoxError, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let calls = Arc::new(AtomicUsize::new(0));
//! let backend = service_fn(move |req: http::Request<BufferedBody<Full<Bytes>>>| {
//!     let slow = calls.fetch_add(1, Ordering::Relaxed) == 0;
//!     async move {
//!         tokio::time::sleep(Duration::from_millis(if slow { 500 } else { 8 })).await;
//!         let echo = req.into_body().collect().await?.to_bytes();
//!         Ok::<_, BoxError>(http::Response::new(echo))
//!     }
//! });
//!
//! let hedge = HedgeLayer::builder()
//!     .delay(Delay::fixed(Duration::from_millis(20)))
//!     .budget(Budget::ratio(0.05))
//!     .non_idempotent(true) // gRPC calls are POSTs: opt in for safe methods
//!     .build()?;
//! let stats = hedge.stats();
//! let client = ServiceBuilder::new()
//!     .layer(BufferBodyLayer::new(64 * 1024).non_idempotent(true))
//!     .layer(hedge)
//!     .service(backend);
//!
//! let req = http::Request::post("http://replica/echo").body(Full::new(Bytes::from("ping")))?;
//! let started = tokio::time::Instant::now();
//! let res = client.oneshot(req).await?;
//! assert_eq!(res.body(), "ping");
//! assert_eq!(started.elapsed(), Duration::from_millis(28), "hedge at 20 ms, answer 8 ms later");
//! assert_eq!((stats.hedges_sent(), stats.hedges_won()), (1, 1));
//! # Ok(())
//! # }
//! ```
//!
//! With tonic, hedge the `Channel` and hand the stack to the generated
//! client (`tonic::body::Body` is a stream, so buffer it; map it back for
//! the channel):
//!
//! ```no_run
//! use atscale_hedge::{BufferBodyLayer, BufferedBody, Delay, HedgeLayer};
//! use tonic::body::Body;
//! use tonic_health::pb::HealthCheckRequest;
//! use tonic_health::pb::health_client::HealthClient;
//! use tower::ServiceBuilder;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let channel = tonic::transport::Channel::from_static("http://[::1]:50051")
//!     .connect()
//!     .await?;
//! let hedge = HedgeLayer::builder()
//!     .delay(Delay::adaptive().percentile(0.95))
//!     .non_idempotent(true) // every gRPC call is a POST: opt in for safe methods
//!     .build()?;
//! let svc = ServiceBuilder::new()
//!     .layer(BufferBodyLayer::new(64 * 1024).non_idempotent(true))
//!     .layer(hedge)
//!     .map_request(|req: http::Request<BufferedBody<Body>>| req.map(Body::new))
//!     .service(channel);
//! let mut client = HealthClient::new(svc);
//! let answer = client.check(HealthCheckRequest { service: String::new() }).await?;
//! # let _ = answer;
//! # Ok(())
//! # }
//! ```
//!
//! The top-level `tests/hedge_tonic.rs` runs exactly this against two tonic
//! servers on loopback, across replicas.
//!
//! # Backpressure
//!
//! Around one service, `poll_ready` delegates to it and the first attempt is
//! sent on that readiness; every hedge clones the service and drives the
//! clone's own `ready()`, so nothing is reserved ahead of time. Around
//! replicas, `poll_ready` is always ready and each attempt drives its
//! replica's `ready()`. [`BufferBody`] delegates `poll_ready`.
//!
//! # Errors
//!
//! [`Hedge`]'s error type is [`BoxError`](atscale_core::BoxError):
//!
//! - a request that made one attempt fails with that attempt's error (or
//!   answers with its response), as if there were no hedge;
//! - a request whose attempts all failed with [`Verdict::NonFatal`] errors
//!   fails with [`HedgeExhausted`](atscale_core::HedgeExhausted), which lists
//!   every attempt's error in the order they were sent
//!   (`Kind::HedgeExhausted`: 502 / `UNAVAILABLE`); if one of them was a
//!   non-fatal *response* (a 503), the last such response is returned instead;
//! - a [`Verdict::Fatal`] outcome is returned as it is, at once.
//!
//! The layer adds no deadline of its own: put a deadline layer above it, and
//! its [`DeadlineExceeded`](atscale_core::DeadlineExceeded) covers every
//! attempt. A hedge carries what is left of that deadline when it is sent,
//! not when the call started: the `grpc-timeout` (and `x-deadline-ms`, or
//! the deadline layer's own header) that a client deadline layer wrote is
//! rewritten on each copy ([`atscale_deadline::attempt::refresh`]), so the
//! backend stops when the caller does; a header the request does not carry
//! is never added. Building a layer with settings out of range gives
//! [`InvalidConfig`].
//!
//! # Ordering
//!
//! In a client stack, below the deadline and the rate limit (a hedge must
//! spend neither a second deadline nor a second token) and above anything
//! per-attempt (heartbeat, the transport): ErrorEnrich → Deadline →
//! MultiRateLimit → BufferBody → **Hedge** → Heartbeat → transport. Below
//! the deadline, a hedge sent after its delay carries in its headers the
//! deadline left when it is sent, not the one written when the call started
//! (see [Errors](#errors)).
//!
//! # Testing
//!
//! Hedges are sent on tokio's timer, so `#[tokio::test(start_paused = true)]`
//! and `tokio::time::advance` drive fixed delays exactly. Latencies (for the
//! adaptive delay) are measured on a fast TSC clock by default
//! ([`Clock::quanta`]), which the paused clock does not drive: tests of
//! adaptive delays build the layer with
//! [`.clock(Clock::tokio())`](HedgeBuilder::clock).
//!
//! # Differences from `tower::hedge`
//!
//! - A budget: tower hedges every request over its percentile, so a latency
//!   shift for everyone means up to twice the load (28% in the first 2,000
//!   requests after a 10x slowdown, in our benchmark); here the extra load
//!   stays within the budget in every window of requests.
//! - Errors that another attempt may fix do not win the race; tower returns
//!   the first result, error or not.
//! - Replicas: backups go to another replica than the first attempt.
//! - Latencies recorded in microseconds (tower: milliseconds), including the
//!   attempts a hedge beat; a fixed delay, N attempts, zero delay.
//! - Contexts: every attempt gets a child context; losers are cancelled.
//! - A [`HedgeLayer`], a builder and [counters](HedgeStats); clones share
//!   state; nothing boxed per request (only each hedge sent is boxed), no
//!   `Mutex` per request.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod budget;
mod discover;
pub mod error;
pub mod future;
mod layer;
mod metrics;
mod policy;
mod replay;
mod service;
mod shared;
mod stats;
mod window;

pub use atscale_core::Clock;
pub use body::{BufferBody, BufferBodyLayer, BufferedBody};
pub use discover::HedgeDiscover;
pub use error::InvalidConfig;
pub use layer::{HedgeBuilder, HedgeLayer, MAX_ATTEMPTS};
pub use policy::{Adaptive, Budget, Classify, Delay, ErrorsAreFatal, Pick, RoundRobin, Verdict};
pub use replay::{Replay, ReplayBody};
pub use service::Hedge;
pub use stats::HedgeStats;
