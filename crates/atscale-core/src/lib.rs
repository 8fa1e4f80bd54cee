//! The request context and failure vocabulary shared by every atscale layer.
//!
//! - [`Context`]: one request's optional [`Deadline`] (with its [`Origin`])
//!   and cancellation signal, cheap to clone. It travels in the request
//!   ([`Carrier`], implemented for `http::Request`) and in a task-local scope
//!   ([`Context::current`]) while an atscale layer's inner service runs, so
//!   outgoing calls made in a handler inherit it without plumbing;
//!   [`spawn`] carries it into new tasks, and [`Context::run`] makes work
//!   preemptable.
//! - The failure vocabulary ([`error`]): one error type per way a request can
//!   fail in atscale, classified by [`Kind::of`] from anywhere in a `source()`
//!   chain, each kind with one HTTP status and one gRPC code.
//!
//! # Example
//!
//! A handler that spawns work which must stop when the request's deadline passes:
//!
//! ```
//! use std::time::Duration;
//! use atscale_core::{Context, Kind, Origin};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let request_cx = Context::new().with_budget(Duration::from_millis(50), Origin::Header);
//!
//! let outcome = request_cx
//!     .clone()
//!     .scope(async {
//!         // Deep inside the handler: no context parameter needed.
//!         let cx = Context::current().expect("set by the layer");
//!         let lookup = atscale_core::spawn_preemptable(async {
//!             tokio::time::sleep(Duration::from_secs(10)).await; // a slow dependency
//!         });
//!         let answer = cx.run(lookup).await;
//!         answer.map_err(|interrupted| Kind::of(&interrupted))
//!     })
//!     .await;
//!
//! assert_eq!(outcome.unwrap_err(), Kind::DeadlineExceeded);
//! # }
//! ```
//!
//! # Errors
//!
//! This crate has no layer; it defines the errors the layers return, and
//! what each maps to ([`Kind::of`] finds the first of them anywhere in a
//! `source()` chain; [`Kind::http_status`], [`Kind::grpc_code`]):
//!
//! | error | [`Kind`] | HTTP | gRPC | returned by |
//! | --- | --- | --- | --- | --- |
//! | [`DeadlineExceeded`], [`Interrupted::DeadlineExceeded`] | `DeadlineExceeded` | 504 | `DEADLINE_EXCEEDED` | the deadline layer, [`Context::run`] |
//! | [`MalformedDeadline`] | `BadRequest` | 400 | `INVALID_ARGUMENT` | the deadline layer |
//! | [`RateLimited`] | `RateLimited` | 429 + `Retry-After` | `RESOURCE_EXHAUSTED` | the rate limit |
//! | [`Overloaded`] | `Overloaded` | 503 (+ `Retry-After` when it says) | `UNAVAILABLE` | the overload layer, the rate limit (queue or key table full) |
//! | [`Stalled`] | `Stalled` | 503 | `UNAVAILABLE` | the heartbeat's watchdog |
//! | [`HedgeExhausted`] | `HedgeExhausted` | 502 | `UNAVAILABLE` | the hedge |
//! | [`Unreachable`] | `Unreachable` | 503 | `UNAVAILABLE` | client stacks (the request never reached the server: safe to retry) |
//! | [`Cancelled`], [`Interrupted::Cancelled`] | `Cancelled` | 499 | `CANCELLED` | the rate limit, [`Context::run`] |
//! | none of them, on a client | `Upstream` | 502 | `UNAVAILABLE` | (classified by ErrorEnrich) |
//! | none of them, on a server | `Internal` | 500 | `INTERNAL` | (classified by ErrorEnrich) |
//!
//! [`find`] reaches any of them, with its details (`retry_after`, the
//! deadline's [`Origin`]), through wrapping errors. The vocabulary is open:
//! [`classify`] also knows the errors of tower, hyper, h2, tonic and
//! `std::io` (behind features named after those crates), and the
//! application's own types, mapped once with [`classify::map`].
#![cfg_attr(docsrs, feature(doc_cfg))]

mod carrier;
pub mod classify;
mod clock;
mod context;
mod deadline;
pub mod error;
pub mod grpc;
mod macros;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
mod preempt;
mod throttle;

pub use carrier::Carrier;
pub use classify::retry_after;
pub use clock::Clock;
pub use context::{CancelOnDrop, Context, Scoped, spawn, spawn_preemptable};
pub use deadline::{Deadline, Origin};
pub use error::{
    BoxError, Cancelled, DeadlineExceeded, GrpcCode, HedgeExhausted, Interrupted, Kind,
    MalformedDeadline, Overloaded, RateLimited, Stalled, Unreachable, chain, find,
};
pub use preempt::Preemptable;
pub use throttle::{InvalidThrottle, MAX_TOKENS, RetryThrottle};
