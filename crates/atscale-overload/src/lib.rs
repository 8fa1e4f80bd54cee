//! Overload protection for tower: an adaptive concurrency limit, an
//! admission queue that never serves the dead, deadline-aware admission,
//! criticality, and client-side adaptive throttling.
//!
//! Offered more than it can serve, a server that runs every request at once
//! slows them all down together until every one misses its deadline:
//! goodput falls toward zero exactly when demand peaks. [`OverloadLayer`]
//! keeps it at capacity:
//!
//! - **an adaptive concurrency limit** ([`limit::Vegas`] by default,
//!   [`limit::Gradient2`], [`limit::Aimd`], or your own [`limit::Algorithm`]),
//!   shared by every clone of the service; the current limit, the requests in
//!   flight and the queue depth are readable at any time ([`Admission`]);
//! - **a bounded admission queue** for requests over the limit, watched by
//!   CoDel's control law (RFC 8289, [`CoDel`]: 5 ms / 100 ms by default):
//!   while the queue is standing it drops its oldest waiters on CoDel's
//!   schedule and serves the newest first (adaptive LIFO), so fresh requests
//!   succeed instead of every request arriving late. A queued request whose
//!   deadline passes leaves at once; a dropped one frees its place;
//! - **deadline-aware admission**: a request whose remaining deadline (from
//!   its atscale [`Context`](atscale_core::Context)) cannot cover its
//!   expected wait (its place in the queue × the smoothed service time per
//!   slot) plus a service time few requests exceed (RFC 6298's SRTT + 2 ×
//!   RTTVAR, over successful requests) is refused at arrival, before it costs
//!   anything, with a retry-after estimate. Waiters that could no longer make
//!   it even if nobody else arrived are refused (503) as soon as that is
//!   known, and at its turn a waiter that could no longer finish in time is
//!   refused rather than served. With nothing in flight a request is never
//!   refused on these grounds (the estimate may be stale: it is admitted,
//!   and teaches it);
//! - **criticality** ([`Criticality`]): critical / default / sheddable, from
//!   the `x-criticality` header or gRPC metadata entry (the name is
//!   configurable), or set in-process in the request's extensions; critical
//!   waiters are served first, sheddable ones shed first;
//! - **client-side adaptive throttling** ([`throttle::ThrottleLayer`], Google
//!   SRE book): a client stops sending work to a backend that keeps refusing it.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use atscale_core::{BoxError, Clock, Kind};
//! use atscale_overload::OverloadLayer;
//! use atscale_overload::limit::Vegas;
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let overload = OverloadLayer::builder()
//!     .algorithm(Vegas::new())
//!     .initial_limit(2)
//!     .max_limit(2)
//!     .queue_capacity(1)
//!     .clock(Clock::tokio())
//!     .build()?;
//! let admission = overload.admission();
//! let mut svc = ServiceBuilder::new()
//!     .layer(overload)
//!     .service(service_fn(|_req: http::Request<()>| async {
//!         tokio::time::sleep(Duration::from_millis(10)).await; // the work
//!         Ok::<_, BoxError>("done")
//!     }));
//!
//! // Two run, one waits, the fourth is refused at once.
//! let mut calls: Vec<_> = (0..4)
//!     .map(|_| svc.call(http::Request::new(())))
//!     .collect();
//! let refused = calls.pop().unwrap().await.unwrap_err();
//! assert_eq!(Kind::of(&*refused), Kind::Overloaded); // 503 / UNAVAILABLE
//! assert_eq!((admission.in_flight(), admission.queue_depth()), (2, 1));
//! for call in calls {
//!     assert_eq!(call.await?, "done");
//! }
//! assert_eq!((admission.in_flight(), admission.queue_depth()), (0, 0));
//! # let _ = svc.ready().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Backpressure
//!
//! `poll_ready` delegates to the inner service and never waits for a slot:
//! admission needs the request (its deadline and criticality), so it happens
//! in `call`. A queued request waits inside its response future holding a
//! clone of the ready inner service (hence `S: Clone`); dropping the future
//! gives its place, or its slot, back at once. The layer spawns no task.
//!
//! # Errors
//!
//! The service's error is a [`BoxError`](atscale_core::BoxError) holding the
//! inner service's error, or one of the shared vocabulary:
//!
//! | error | when | HTTP | gRPC |
//! | --- | --- | --- | --- |
//! | [`Overloaded`](error::Overloaded) with a retry-after | refused at arrival (queue full, deadline cannot be met, sheddable while the queue stands), or dropped from the queue (CoDel, a more critical arrival, too late to serve) | 503 + `Retry-After` | `UNAVAILABLE` + `RetryInfo` |
//! | [`DeadlineExceeded`](error::DeadlineExceeded) | the request's deadline passed while it waited | 504 | `DEADLINE_EXCEEDED` |
//! | [`Throttled`](error::Throttled) (its source is an `Overloaded`) | the client-side throttle refused locally | 503 | `UNAVAILABLE` |
//!
//! `Overloaded::retry_after` is the expected time for the queue ahead to
//! drain at the recent service time (at least one service time).
//!
//! # Ordering
//!
//! On a server: ErrorEnrich → Deadline → Overload → (Heartbeat →
//! RateLimit →) handler.
//!
//! - Inside Deadline, because admission reads the request's deadline from
//!   its context, and because the deadline layer then drops a request that
//!   runs out of time, which frees its slot and teaches the limit.
//! - Inside ErrorEnrich, so refusals leave as 503 / `UNAVAILABLE` with a
//!   retry-after.
//! - Outside Heartbeat, so only admitted work is watched for stalls and
//!   queued requests are not reported as work in progress.
//! - Outside a per-client RateLimit: the rate limit is a quota per client,
//!   the overload layer protects the server from all of them; checking the
//!   cheap global limit first keeps a flood from costing rate-limit work,
//!   and a request queued here has not yet spent a token.
//!
//! On a client, put [`throttle::ThrottleLayer`] closest to one backend's
//! transport (inside Deadline, RateLimit, Retry and Hedge), one layer per
//! backend: every attempt is counted, and a throttled attempt never reaches
//! the wire. A retry policy should not retry a [`Throttled`](error::Throttled)
//! refusal on the same backend (it is the backend's own refusal, replayed
//! locally).
//!
//! # Differences from tower's `ConcurrencyLimit` and `LoadShed`
//!
//! - The limit adapts to the service's latency; tower's is a number someone
//!   must guess, and the right one depends on the machine and the load.
//! - Requests over the limit wait in a bounded queue that knows deadlines and
//!   criticality, instead of waiting unboundedly in `poll_ready`
//!   (`ConcurrencyLimit`) or failing at once (`LoadShed`).
//! - Refusals are `Overloaded` with a retry-after: 503 / `UNAVAILABLE`, not
//!   an unknown error (a 500).
//! - Clones share one limit (tower's `ConcurrencyLimit` shares its semaphore
//!   too; this one also shares the queue and the algorithm's state).

#![cfg_attr(docsrs, feature(doc_cfg))]

mod codel;
pub mod criticality;
pub mod error;
pub mod future;
mod layer;
pub mod limit;
mod metrics;
mod queue;
mod service;
pub mod throttle;

pub use codel::CoDel;
pub use criticality::{CRITICALITY_HEADER, Criticality, Prioritized};
pub use error::ConfigError;
pub use layer::{Admission, Builder, OverloadLayer};
pub use service::Overload;
