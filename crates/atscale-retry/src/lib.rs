//! Retries the gRPC way (gRFC A6) for any tower client, tonic and HTTP:
//! capped attempts with jittered backoff that never outlive the deadline,
//! server pushback, another replica per retry, one throttle shared with the
//! hedge, configured in code or by the standard gRPC service config.
//!
//! - **how many, how long**: a [`RetryPolicy`] of at most 5 attempts
//!   ([`MAX_ATTEMPTS`]; more are treated as 5, as A6 says); the `n`-th retry
//!   waits `min(initial · multiplier^(n−1), max) × random(0.8, 1.2)` (A6 as
//!   revised in 2024, followed by gRPC Go and Java);
//! - **what**: failures by [kind](atscale_core::Kind) (by default: never
//!   reached the server, overloaded), by gRPC [`Code`] (by default
//!   `UNAVAILABLE`), or by a predicate; never deadline exceeded, malformed
//!   input or cancelled; rate limited only when asked for, and only when its
//!   retry-after fits before the deadline;
//! - **never past the deadline**: each attempt runs in a child of the
//!   request's [`Context`](atscale_core::Context); when the next wait plus a
//!   [minimal attempt](RetryPolicyBuilder::min_attempt) does not fit in what
//!   is left, the last error comes back at once, in a [`RetryFailed`] that
//!   says how many attempts were made. A backoff ends early when the request
//!   is cancelled; none outlives the call. Each attempt after the first
//!   tells the backend the time left when it is sent: the `grpc-timeout`
//!   (and `x-deadline-ms`, or the deadline layer's own header) that a
//!   client deadline layer wrote at the start is rewritten on the copy
//!   ([`atscale_deadline::attempt::refresh`]), never added;
//! - **the server's wishes**: `grpc-retry-pushback-ms` (a non-negative value:
//!   wait exactly that, then the backoff starts over; negative or malformed:
//!   no retry), HTTP `Retry-After` (delta-seconds and HTTP-date), the
//!   `RetryInfo` detail (with the `tonic` feature) — see [`Pushback`];
//! - **one throttle**: a [`RetryThrottle`] (A6 `retryThrottling`) per
//!   backend, shared with the hedge
//!   ([`HedgeBuilder::throttle`](atscale_hedge::HedgeBuilder::throttle)):
//!   retryable failures take a token, successes give back the ratio, and
//!   there are no retries or hedges while it holds half its tokens or fewer;
//! - **another replica**: around [replicas](RetryLayer::replicas) or a
//!   `tower::discover` [source](RetryLayer::discover), a retry goes to
//!   another replica than the attempt that failed; every attempt after the
//!   first carries `grpc-previous-rpc-attempts`;
//! - **what can be sent again**: requests that [`Replay`](atscale_hedge::Replay)
//!   (the hedge's trait; streaming bodies through
//!   [`BufferBodyLayer`](atscale_hedge::BufferBodyLayer)), idempotent ones
//!   unless the policy [opts in](RetryPolicyBuilder::non_idempotent). Once a
//!   gRPC response's headers arrive (not a trailers-only answer) the call is
//!   committed and never retried;
//! - **service config**: [`ServiceConfig`] parses the gRPC service config
//!   JSON (`methodConfig` with `timeout`, `retryPolicy`, `hedgingPolicy`;
//!   `retryThrottling`) with A6's validation, into the same types the
//!   builders make, and [`MethodConfigLayer`] gives each `/pkg.Service/Method`
//!   its own deadline and retry or hedging policy.
//!
//! # Example
//!
//! A backend that refuses the first two calls (as a restarting server
//! would); the client sees one answer, 100 ms and 200 ms of backoff
//! (± 20%) later:
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::time::Duration;
//! use atscale_core::{BoxError, Context, Origin, RetryThrottle, Unreachable};
//! use atscale_retry::{Attempts, RetryLayer, RetryPolicy};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let calls = Arc::new(AtomicUsize::new(0));
//! let backend = service_fn(move |_req: http::Request<String>| {
//!     let n = calls.fetch_add(1, Ordering::Relaxed);
//!     async move {
//!         if n < 2 {
//!             return Err::<http::Response<String>, BoxError>(Unreachable::new("orders").into());
//!         }
//!         Ok(http::Response::new(String::from("ok")))
//!     }
//! });
//!
//! let policy = RetryPolicy::builder()
//!     .max_attempts(4)
//!     .initial_backoff(Duration::from_millis(100))
//!     .max_backoff(Duration::from_secs(1))
//!     .multiplier(2.0)
//!     .build()?;
//! let throttle = RetryThrottle::new(10, 0.1)?; // one per backend, shared with its hedge
//! let client = ServiceBuilder::new()
//!     .layer(RetryLayer::new(policy).throttle(throttle.clone()))
//!     .service(backend);
//!
//! let mut req = http::Request::get("http://orders/42").body(String::new())?;
//! req.extensions_mut()
//!     .insert(Context::new().with_budget(Duration::from_secs(2), Origin::Local));
//! let started = tokio::time::Instant::now();
//! let res = client.oneshot(req).await?;
//! assert_eq!(res.body(), "ok");
//! assert_eq!(res.extensions().get::<Attempts>(), Some(&Attempts(3)));
//! let waited = started.elapsed();
//! assert!(waited >= Duration::from_millis(240) && waited <= Duration::from_millis(360));
//! assert_eq!(throttle.tokens(), 8.1); // two failures, one success
//! # Ok(())
//! # }
//! ```
//!
//! The top-level `tests/retry_tonic.rs` and `tests/retry_http.rs` run the
//! layer over real tonic and HTTP servers on loopback.
//!
//! # Backpressure
//!
//! Around one service, `poll_ready` delegates to it and the first attempt is
//! sent on that readiness; each retry clones the service and drives the
//! clone's own `ready()`, so nothing is reserved ahead of time. Around
//! replicas, `poll_ready` is always ready and every attempt drives its
//! replica's `ready()`. A backoff holds no capacity of the inner service.
//!
//! # Errors
//!
//! [`Retry`]'s error type is [`BoxError`](atscale_core::BoxError):
//!
//! - a call whose first attempt failed in a way no retry would fix (not
//!   retryable, or not replayable) fails with that error as it is;
//! - a call that was retried, or could have been and was not (no time left
//!   before the deadline, throttled, the server said not to, cancelled
//!   during the backoff), fails with [`RetryFailed`]: the last attempt's
//!   error as its `source()` (so `Kind::of` classifies it as that error: an
//!   unreachable backend stays 503 / `UNAVAILABLE`), the number of attempts
//!   made and the reason it [stopped](Stop);
//! - a failure that came as a *response* (a trailers-only gRPC status, an
//!   HTTP 503) is returned as that response, with [`Attempts`] in its
//!   extensions when more than one attempt was made.
//!
//! Settings out of range give [`InvalidConfig`], naming the setting or the
//! service config field and the rule.
//!
//! # Ordering
//!
//! In a client stack, below the deadline (one deadline covers every attempt
//! and its backoff) and the rate limit (a retry must not spend a second
//! token), above anything per attempt (heartbeat, the transport); in place
//! of a hedge, or beside it on the same throttle: ErrorEnrich → Deadline →
//! MultiRateLimit → BufferBody → **Retry** → Heartbeat → transport. Below
//! the deadline, a retry sent after its backoff carries in its headers the
//! deadline left when it is sent, not the one written when the call started.
//!
//! # Differences from `tower::retry`
//!
//! - The deadline: tower's `Retry` knows nothing of it and sleeps past it;
//!   here no retry starts whose backoff cannot end in time, and the caller
//!   learns at once.
//! - Backoff with jitter, the server's pushback, gRPC codes and the shared
//!   failure vocabulary built in, where tower leaves the whole policy to you.
//! - A6's throttle, shared with the hedge, instead of a `TpsBudget` of its
//!   own: in a full outage the load stays near 1x instead of `max_attempts`x.
//! - Replicas: a retry goes to another replica.
//! - Contexts: every attempt gets a child context; a failed one is cancelled.
//! - One hand-written future, nothing boxed per call.
//!
//! # Where this departs from gRFC A6
//!
//! - No transparent retries: a call that never reached the server
//!   ([`Kind::Unreachable`](atscale_core::Kind::Unreachable)) is retried by
//!   the policy, counts as an attempt and takes a throttle token (A6 retries
//!   it on the side when the transport knows it never left the client).
//! - A gRPC call is committed when its response headers arrive, and the
//!   throttle counts it a success then: a failure in its trailers is not seen.
//! - A service config listing `DEADLINE_EXCEEDED`, `INVALID_ARGUMENT` or
//!   `CANCELLED` in `retryableStatusCodes` is refused (naming the field):
//!   atscale never retries them, and says so rather than ignoring them.
//! - Hedging policies from a service config run on the hedge
//!   ([`MethodConfigLayer`]): a pushback does not pace the next hedge, and
//!   `waitForReady`, message size limits and `perAttemptRecvTimeout` are
//!   ignored.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod code;
mod config;
mod discover;
pub mod error;
pub mod future;
mod layer;
mod method;
mod metrics;
mod outcome;
mod policy;
mod pushback;
mod service;

pub use atscale_core::RetryThrottle;
pub use code::{Code, CodeSet};
pub use config::{HedgingPolicy, MethodConfig, MethodPolicy, ServiceConfig, Throttling};
pub use discover::RetryDiscover;
pub use error::{InvalidConfig, RetryFailed, Stop};
pub use layer::RetryLayer;
pub use method::{MethodConfigLayer, NonFatalCodes, PerMethod};
pub use outcome::{Attempts, Failure, RetryRequest, RetryResponse};
pub use policy::{MAX_ATTEMPTS, RetryPolicy, RetryPolicyBuilder};
#[cfg(feature = "tonic")]
pub use pushback::status_pushback;
pub use pushback::{
    GRPC_PREVIOUS_RPC_ATTEMPTS, GRPC_RETRY_PUSHBACK_MS, Pushback, grpc_pushback,
    parse_grpc_pushback, parse_retry_after, retry_after,
};
pub use service::Retry;
