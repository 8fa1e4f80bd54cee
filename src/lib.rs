//! Tower middleware for concurrency at scale: the patterns of *Concurrency in
//! Go*, ch. 5, as `tower::Layer`s for any tower, axum or tonic stack.
//!
//! | module | layer | what it does |
//! | --- | --- | --- |
//! | [`core`] | — | the request [`Context`](core::Context) (deadline + cancellation) and the failure vocabulary |
//! | [`deadline`] | `DeadlineLayer` | one deadline per request, inherited from callers, propagated downstream, enforced at each hop |
//! | [`ratelimit`] | `RateLimitLayer` | several limits at once, shared, reserved atomically, deadline-aware |
//! | [`hedge`] | `HedgeLayer` | backup attempts when the first is slow, inside a budget |
//! | [`heartbeat`] | `HeartbeatLayer` | pulses, stall detection, self-healing |
//! | [`error`] | `ErrorEnrichLayer` | every failure as one well-formed error |
//! | [`overload`] | `OverloadLayer`, `ThrottleLayer` | an adaptive concurrency limit with a CoDel / adaptive-LIFO queue, deadline-aware admission, criticality; client-side adaptive throttling |
//! | [`retry`] | `RetryLayer`, `MethodConfigLayer` | gRFC A6 retries: capped, jittered, deadline-aware, pushback-aware, throttled with the hedge; per-method policies from the gRPC service config |
//!
//! Each module is the crate of the same name (`atscale-deadline`, …),
//! behind a feature of the same name. The `axum` and `tonic` features turn
//! on each crate's integration with them; `full` (on by default) brings
//! everything.
//!
//! # Stacks
//!
//! The layers are meant to be used together, in one order:
//!
//! - [`stack::server()`] (a [`ServerStack`](stack::ServerStack)): ErrorEnrich
//!   → Deadline → Heartbeat → RateLimit, for every axum `Router` and tonic
//!   server, in one line;
//! - [`stack::client`] (a [`ClientStack`](stack::ClientStack)): ErrorEnrich
//!   → Deadline → RateLimit → Hedge → Heartbeat, for every tonic `Channel`,
//!   in one line;
//! - [`stack::http_client()`] (an [`HttpClientStack`](stack::HttpClientStack)):
//!   the same for any tower HTTP client (hyper-util's `Client`), writing
//!   `x-deadline-ms`, hedging idempotent methods only;
//! - [`ServiceBuilderExt`] for stacks of your own
//!   (`.enrich_errors(..).deadline(..).multi_rate_limit(..).hedge(..).heartbeat(..)`);
//!   the [`stack`] module says which orders the compiler refuses and which
//!   ones silently misbehave;
//! - [`remote`]: failures a downstream gRPC or HTTP service answered, back
//!   in the shared vocabulary, so a gateway answers a downstream deadline
//!   with a 504, a downstream rate limit with a 429 and the same
//!   `Retry-After`, and a dependency it cannot reach with a 503 naming it.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use atscale::prelude::*;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let svc = ServiceBuilder::new()
//!     .layer(DeadlineLayer::server(Duration::from_secs(2)))
//!     .service(service_fn(|_req: http::Request<()>| async {
//!         // The handler sees the request's context without any plumbing.
//!         let left = Context::current().and_then(|cx| cx.remaining());
//!         Ok::<_, BoxError>(left)
//!     }));
//!
//! let req = http::Request::builder().header("grpc-timeout", "300m").body(())?;
//! let left = svc.oneshot(req).await?;
//! assert_eq!(left, Some(Duration::from_millis(300)));
//! # Ok(())
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use atscale_core as core;

#[cfg(feature = "deadline")]
#[cfg_attr(docsrs, doc(cfg(feature = "deadline")))]
pub use atscale_deadline as deadline;

#[cfg(feature = "ratelimit")]
#[cfg_attr(docsrs, doc(cfg(feature = "ratelimit")))]
pub use atscale_ratelimit as ratelimit;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use atscale_ratelimit_redis as ratelimit_redis;

#[cfg(feature = "hedge")]
#[cfg_attr(docsrs, doc(cfg(feature = "hedge")))]
pub use atscale_hedge as hedge;

#[cfg(feature = "heartbeat")]
#[cfg_attr(docsrs, doc(cfg(feature = "heartbeat")))]
pub use atscale_heartbeat as heartbeat;

#[cfg(feature = "error")]
#[cfg_attr(docsrs, doc(cfg(feature = "error")))]
pub use atscale_error as error;

#[cfg(feature = "overload")]
#[cfg_attr(docsrs, doc(cfg(feature = "overload")))]
pub use atscale_overload as overload;

#[cfg(feature = "retry")]
#[cfg_attr(docsrs, doc(cfg(feature = "retry")))]
pub use atscale_retry as retry;

#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;

mod builder;
pub use builder::ServiceBuilderExt;

#[cfg(all(
    feature = "deadline",
    feature = "error",
    feature = "heartbeat",
    feature = "ratelimit",
    feature = "hedge",
    feature = "overload",
    feature = "retry"
))]
#[cfg_attr(
    docsrs,
    doc(cfg(all(
        feature = "deadline",
        feature = "error",
        feature = "heartbeat",
        feature = "ratelimit",
        feature = "hedge",
        feature = "overload",
        feature = "retry"
    )))
)]
pub mod stack;

pub mod remote;

/// The types most stacks need, in one import.
pub mod prelude {
    pub use atscale_core::{BoxError, Carrier, Context, Deadline, Kind, Origin, find};

    #[cfg(feature = "deadline")]
    pub use atscale_deadline::DeadlineLayer;

    #[cfg(feature = "ratelimit")]
    pub use atscale_ratelimit::{
        KeyedLimiter, Limit, Limiter, MultiLimiter, PeerIp, RateLimitLayer,
    };

    #[cfg(feature = "hedge")]
    pub use atscale_hedge::{Budget, BufferBodyLayer, Delay, HedgeLayer, HedgeStats, Verdict};

    #[cfg(feature = "heartbeat")]
    pub use atscale_heartbeat::{HeartbeatLayer, KeepAliveLayer, Monitor, Progress, Steward};

    #[cfg(feature = "error")]
    pub use atscale_error::{Enriched, ErrorEnrichLayer};

    #[cfg(feature = "overload")]
    pub use atscale_overload::throttle::ThrottleLayer;
    #[cfg(feature = "overload")]
    pub use atscale_overload::{Admission, CoDel, Criticality, OverloadLayer};

    #[cfg(feature = "retry")]
    pub use atscale_retry::{
        MethodConfigLayer, RetryLayer, RetryPolicy, RetryThrottle, ServiceConfig,
    };

    pub use crate::ServiceBuilderExt;
}

/// The README's examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
