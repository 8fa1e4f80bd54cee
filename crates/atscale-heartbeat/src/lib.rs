//! Heartbeats for tower: liveness and progress pulses, stall detection, and
//! self-healing services.
//!
//! A heartbeat is how concurrent work tells an outside observer it is alive
//! (*Concurrency in Go*, ch. 5). [`HeartbeatLayer`] makes every request a
//! unit of work that reports to a [`Monitor`]:
//!
//! - **pulses per unit of work**: a request [started](Pulse::Started), made
//!   [progress](Pulse::Progress) (each frame of a streaming response body,
//!   and each unit of work a handler reports through [`Progress`]),
//!   [finished](Pulse::Finished) with an [`Outcome`] (ok, error, cancelled,
//!   stalled, refused): a failure is the service's own (an error, a 5xx, a
//!   gRPC status a server gives when it cannot serve), never a rate limit or
//!   an overload guard refusing (429, `RESOURCE_EXHAUSTED`) nor a caller's
//!   mistake (a 4xx), so [`Monitor::health`] and a [`Steward`] act on the
//!   service failing and on nothing else;
//! - **pulses at an interval** ([`Pulse::Beat`]) while work is in flight, and
//!   if asked while idle, from a task the monitor owns;
//! - **a stall watchdog**: a request, or its streaming body, that shows no
//!   progress for the configured time is cut — the inner future or body is
//!   dropped, the request's [`Context`](atscale_core::Context) is cancelled,
//!   and the caller gets [`Stalled`](atscale_core::Stalled);
//! - **deterministic tests**: [`Monitor::wait_started`],
//!   [`Monitor::wait_in_flight`], [`Monitor::wait_finished`] let a test wait
//!   for the work itself instead of sleeping;
//! - **health** ([`health`]) as serving / not serving, for axum and tonic-health.
//!
//! Around it: [`Steward`] rebuilds an inner service that stops beating, and
//! [`KeepAliveLayer`] keeps quiet streams (SSE) alive through proxies.
//!
//! # Example
//!
//! A streaming response watched frame by frame, and a request that stalls:
//!
//! ```
//! use std::time::Duration;
//! use atscale_core::{BoxError, Kind};
//! use atscale_heartbeat::{Monitor, Outcome, Pulse};
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tokio_stream::StreamExt;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let monitor = Monitor::builder().stall(Duration::from_secs(2)).build();
//! let mut pulses = monitor.subscribe();
//!
//! let svc = ServiceBuilder::new()
//!     .layer(monitor.layer())
//!     .service(service_fn(|req: http::Request<&'static str>| async move {
//!         if req.uri() == "/hang" {
//!             std::future::pending::<()>().await;
//!         }
//!         Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from("hello"))))
//!     }));
//!
//! let response = svc.clone().oneshot(http::Request::new("hi")).await?;
//! let body = response.into_body().collect().await?.to_bytes();
//! assert_eq!(body, "hello");
//!
//! let hang = http::Request::builder().uri("/hang").body("hi")?;
//! let err = svc.oneshot(hang).await.unwrap_err();
//! assert_eq!(Kind::of(&*err), Kind::Stalled);
//! assert_eq!(err.to_string(), "stalled: no progress for 2s");
//!
//! let seen: Vec<Pulse> = (&mut pulses).take(5).collect().await;
//! assert!(matches!(seen[1], Pulse::Progress { units: 1, .. }));
//! assert!(matches!(seen[2], Pulse::Finished { outcome: Outcome::Ok, .. }));
//! assert!(matches!(seen[4], Pulse::Finished { outcome: Outcome::Stalled, .. }));
//! assert_eq!(monitor.counts().stalled(), 1);
//! # Ok(())
//! # }
//! ```
//!
//! # Backpressure
//!
//! [`Heartbeat`] delegates `poll_ready` to its inner service and reserves
//! nothing. Emitting a pulse never waits: with no subscriber no pulse is even
//! built (one relaxed atomic load), and a subscriber that falls more than
//! [`capacity`](MonitorBuilder::capacity) pulses behind misses the oldest
//! ([`Pulses::missed`]) instead of holding up requests or growing a queue.
//!
//! # Errors
//!
//! [`Heartbeat`] returns [`BoxError`](atscale_core::BoxError): the inner
//! service's errors, and [`Stalled`](atscale_core::Stalled) (classified by
//! [`Kind::of`](atscale_core::Kind::of) as `Kind::Stalled`: HTTP 503, gRPC
//! `UNAVAILABLE`) for a request cut by the watchdog. A [`TrackedBody`] fails
//! with the same `Stalled` when the stream stalls; a gRPC response body ends
//! instead with trailers `grpc-status: 14` and the stall as `grpc-message`,
//! so a tonic client gets `Code::Unavailable` rather than a broken stream.
//!
//! # Ordering
//!
//! On a server, put the heartbeat inside the deadline layer and outside rate
//! limiting (ErrorEnrich → Deadline → **Heartbeat** → MultiRateLimit →
//! handler), so it sees the request context the deadline layer set and
//! measures the handler's own progress; on a client, closest to the
//! transport. Put a [`KeepAliveLayer`] outside the heartbeat so that
//! keep-alive frames are not mistaken for progress.
//!
//! # Differences from tower
//!
//! tower has no heartbeat. `tower::timeout::Timeout` bounds a whole request;
//! the stall watchdog bounds the time *between* signs of progress, so a long
//! stream that keeps producing frames is never cut, while one that goes
//! silent is.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod layer;
mod metrics;
mod monitor;
mod progress;
mod pulse;
mod registry;
mod service;
mod track;
mod verdict;

pub mod body;
pub mod error;
pub mod future;
pub mod health;
pub mod keepalive;
pub mod steward;

pub use body::{KeepAliveBody, TrackedBody};
pub use health::Health;
pub use keepalive::KeepAliveLayer;
pub use layer::HeartbeatLayer;
pub use monitor::{Counts, InFlight, Monitor, MonitorBuilder, Pulses};
pub use progress::Progress;
pub use pulse::{Outcome, Pulse, RequestId};
pub use service::Heartbeat;
pub use steward::{Steward, StewardBuilder};
pub use track::{Ticket, Track};
