//! Multi-limit rate limiting for tower: shared limiters, atomic reservation
//! across several limits, deadline-aware waits in arrival order, keyed limits
//! in bounded memory.
//!
//! - A [`Limit`] is a rate over a period with a burst (`Limit::per_second(2)?.burst(1)?`),
//!   checked at construction ([`InvalidLimit`]).
//! - A [`Limiter`] is a shared handle to one bucket (GCRA, one atomic word).
//!   Clone it into as many layers or [`MultiLimiter`]s as share that limit.
//! - [`RateLimitLayer`] charges every request to its limiters, *all or none*:
//!   the request's cost is reserved in every bucket at one common admission
//!   time, in one step. It waits for that time (wait mode, the default) or
//!   fails with the retry-after (reject mode).
//! - [`KeyedLimiter`] gives each key (client IP via [`PeerIp`], tenant, API
//!   key via [`key_fn`]) its own bucket, in bounded memory.
//! - Bucket state lives in a [`Store`]: [`MemoryStore`] by default; the trait
//!   is async and multi-key so a distributed store can take its place.
//!
//! # Example
//!
//! The API client of *Concurrency in Go*: the API allows 2 calls per second
//! and 10 per minute, shared by `read_file` and `resolve_address`;
//! `read_file` also obeys a disk limit (1/s) and `resolve_address` a network
//! limit (3/s). Each call is admitted against all of its limits at once.
//!
//! ```
//! use std::time::Duration;
//! use atscale_core::BoxError;
//! use atscale_ratelimit::{Clock, Limit, Limiter, RateLimitLayer};
//! use tokio::time::Instant;
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! // Production code uses the default clock (`Limiter::new`); this example
//! // runs on tokio's paused clock so that it finishes at once.
//! let clock = Clock::tokio();
//! let limiter = |limit| Limiter::with_clock(limit, clock.clone());
//! let api_per_second = limiter(Limit::per_second(2)?.burst(2)?);
//! let api_per_minute = limiter(Limit::per_minute(10)?);
//! let disk = limiter(Limit::per_second(1)?);
//! let network = limiter(Limit::per_second(3)?);
//!
//! let start = Instant::now();
//! let backend = service_fn(move |req: http::Request<&'static str>| async move {
//!     Ok::<_, BoxError>(format!("{} at {:?}", req.body(), start.elapsed()))
//! });
//! let read_file = ServiceBuilder::new()
//!     .layer(
//!         RateLimitLayer::builder()
//!             .limiter(api_per_second.clone())
//!             .limiter(api_per_minute.clone())
//!             .limiter(disk)
//!             .build()?,
//!     )
//!     .service(backend.clone());
//! let resolve_address = ServiceBuilder::new()
//!     .layer(
//!         RateLimitLayer::builder()
//!             .limiter(api_per_second)
//!             .limiter(api_per_minute)
//!             .limiter(network)
//!             .build()?,
//!     )
//!     .service(backend);
//!
//! // Ten calls of each at once, alternating.
//! let mut calls = Vec::new();
//! for _ in 0..10 {
//!     let req = http::Request::new("read_file");
//!     calls.push(tokio::spawn(read_file.clone().oneshot(req)));
//!     let req = http::Request::new("resolve_address");
//!     calls.push(tokio::spawn(resolve_address.clone().oneshot(req)));
//! }
//! let mut log = Vec::new();
//! for call in calls {
//!     log.push(call.await??);
//! }
//! // The disk limit paces `read_file` to one per second and, admitted in
//! // arrival order, each `resolve_address` goes right after it; once ten
//! // calls have used up the minute's burst, one call every six seconds.
//! assert_eq!(log[..4], ["read_file at 0ns", "resolve_address at 0ns", "read_file at 1s", "resolve_address at 1s"]);
//! assert_eq!(log[9..12], ["resolve_address at 4s", "read_file at 6s", "resolve_address at 12s"]);
//! assert_eq!(log[19], "resolve_address at 60s");
//! # Ok(())
//! # }
//! ```
//!
//! The same set without a layer is a [`MultiLimiter`]:
//! `MultiLimiter::new([api_per_second, api_per_minute, disk])?.acquire(1).await?`.
//!
//! # Backpressure
//!
//! `poll_ready` delegates to the inner service; the limit is applied in
//! `call`, where the request's key, cost and deadline are visible. A request
//! that must wait reserves its admission time in `call` and waits in its
//! response future (holding the inner service that `poll_ready` readied), so
//! waiting requests queue in arrival order without blocking `poll_ready`.
//! The number of waiters is bounded ([`RateLimitBuilder::max_waiters`],
//! 1024 by default).
//!
//! # Errors
//!
//! The service's error is a [`BoxError`](atscale_core::BoxError) holding:
//!
//! | error | when | [`Kind`](atscale_core::Kind) | HTTP / gRPC |
//! | --- | --- | --- | --- |
//! | [`RateLimited`](atscale_core::RateLimited) | reject mode; in wait mode when admission lies at or after the request's deadline or beyond `max_wait` (fails at once, with the retry-after) | `RateLimited` | 429 + `Retry-After` / `RESOURCE_EXHAUSTED` |
//! | [`Overloaded`](atscale_core::Overloaded) | the wait queue is full, or a new key finds the key table full of busy keys | `Overloaded` | 503 / `UNAVAILABLE` |
//! | [`Cancelled`](atscale_core::Cancelled) | the request's context was cancelled during the wait | `Cancelled` | 499 / `CANCELLED` |
//! | [`InsufficientCapacity`] | the request's cost exceeds a burst (never admissible) | `Internal` | 500 / `INTERNAL` |
//! | [`MissingKey`] | a keyed limit found no key in the request | `Internal` | 500 / `INTERNAL` |
//! | the inner service's error | | | |
//!
//! The deadline and cancellation come from the request's
//! [`Context`](atscale_core::Context) ([`Carrier`](atscale_core::Carrier)),
//! or from `Context::current()` when the request carries none.
//!
//! # Cancellation
//!
//! A waiter that is dropped, or whose context is cancelled, before its
//! admission time gives its reservation back to every bucket in which no one
//! has reserved after it. Where someone has, its slot stays spent (their
//! admission time was computed behind it and is kept: they are not moved
//! ahead of their turn), until they too leave, at which point the whole run
//! of abandoned reservations is given back. A request admitted is never
//! refunded.
//!
//! # Ordering
//!
//! On a server, inside the deadline layer (so the deadline is known) and
//! outside anything expensive: ErrorEnrich → Deadline → Heartbeat →
//! **RateLimit** → handler. On a client, inside the deadline and outside
//! hedging: ErrorEnrich → Deadline → **RateLimit** → Hedge → transport. A
//! request is then charged once, however many attempts the hedge sends
//! (the hedge's own budget bounds the copies); put the rate limit inside the
//! hedge instead to charge every attempt. Put it outside concurrency limits: a
//! waiting request holds the inner service it readied.
//!
//! # Timing
//!
//! Waits are slept on tokio's timer, whose resolution is one millisecond: a
//! waiting request is called up to about a millisecond after its admission
//! time, never before it. Admission times themselves are exact to the
//! nanosecond, so the rate holds over any span (see the accuracy figures in
//! `benches/README.md`).
//!
//! # Testing
//!
//! Limiters run on a fast TSC clock by default ([`Clock::quanta`]), which
//! tokio's paused clock does not drive. In tests, create one
//! [`Clock::tokio`] and build every limiter with it
//! ([`Limiter::with_clock`], [`KeyedLimiterBuilder::clock`]); then
//! `#[tokio::test(start_paused = true)]` and `tokio::time::advance` drive
//! the limits exactly.
//!
//! # Differences from `tower::limit::RateLimit`
//!
//! - Several limits at once, atomically; limiters shared between services,
//!   and between clones of a service (tower's clones each get a fresh limit).
//! - `poll_ready` does not sleep: one slow request does not stall the
//!   service for everyone; waits happen per request, in arrival order,
//!   within each request's deadline.
//! - Bursts, costs per request, keyed limits, reject mode with retry-after.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod error;
pub mod future;
mod gcra;
mod keyed;
mod layer;
mod limit;
mod limiter;
mod metrics;
mod service;
mod store;
mod wait;

pub use atscale_core::Clock;
pub use error::{InsufficientCapacity, InvalidLimit, MissingKey, Reason};
pub use keyed::{
    ByKey, KeyCheck, KeyFn, KeyPart, KeyedLimiter, KeyedLimiterBuilder, NoKey, PeerIp, RequestKey,
    key_fn,
};
pub use layer::{Cost, CostFn, FixedCost, Mode, RateLimitBuilder, RateLimitLayer};
pub use limit::Limit;
pub use limiter::{Limiter, MultiLimiter};
pub use service::RateLimit;
pub use store::{Claims, Grant, MemoryReceipt, MemoryStore, Refusal, Store};

/// The most limiters one request can be charged to (the layer's limiters
/// plus its keyed limit).
pub const MAX_LIMITS: usize = 8;
