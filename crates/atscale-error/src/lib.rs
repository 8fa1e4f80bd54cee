//! ErrorEnrich: every failure leaves the stack as one well-formed error
//! that says what happened, when, where, what to tell the user, and how to
//! learn more.
//!
//! [`ErrorEnrichLayer::new("service-name")`](ErrorEnrichLayer::new) turns any
//! inner error into an [`Enriched`] error: its [`Kind`](atscale_core::Kind)
//! from the shared failure vocabulary (found anywhere in the `source()`
//! chain), a wall-clock timestamp, the service, method and route, the layer
//! that failed, a user-safe message, a random 128-bit [`ErrorId`] and an
//! optional help link. The full chain is logged once, with the id, so the id
//! a user quotes finds the log line; clients see only the safe part.
//!
//! # Example
//!
//! An axum router whose stack can fail (here a filter that rate-limits)
//! takes the stack with `Router::layer` directly, with no
//! `HandleErrorLayer`: in server mode the error type is
//! [`Infallible`](std::convert::Infallible).
//!
//! ```
//! use std::time::Duration;
//! use atscale_core::{BoxError, RateLimited};
//! use atscale_error::ErrorEnrichLayer;
//! use axum::{Router, body::Body, routing::get};
//! use http::{Request, StatusCode};
//! use http_body_util::BodyExt;
//! use tower::{ServiceBuilder, ServiceExt, filter::FilterLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let enrich = ErrorEnrichLayer::builder("checkout")
//!     .help_link("https://docs.example.com/errors/{code}")
//!     .build()?;
//! let app = Router::new().route("/orders", get(|| async { "orders" })).layer(
//!     ServiceBuilder::new()
//!         .layer(enrich)
//!         // Any fallible layer: this one refuses requests without a key.
//!         .layer(FilterLayer::new(|req: Request<Body>| {
//!             if req.headers().contains_key("x-key") {
//!                 Ok(req)
//!             } else {
//!                 Err(BoxError::from(RateLimited::new(Duration::from_secs(2))))
//!             }
//!         })),
//! );
//!
//! let res = app.oneshot(Request::get("/orders").body(Body::empty())?).await?;
//! assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(res.headers()["retry-after"], "2");
//! assert_eq!(res.headers()["content-type"], "application/problem+json");
//! let body = res.into_body().collect().await?.to_bytes();
//! let problem: serde_json::Value = serde_json::from_slice(&body)?;
//! assert_eq!(problem["type"], "https://docs.example.com/errors/rate_limited");
//! assert_eq!(problem["status"], 429);
//! assert_eq!(problem["retry_after"], 2);
//! assert_eq!(problem["error_id"].as_str().map(str::len), Some(32));
//! # Ok(())
//! # }
//! ```
//!
//! # Modes
//!
//! - **Server** ([`ErrorEnrichLayer::new`]): every error, and every panic of
//!   the inner service, becomes a response. The protocol is picked per
//!   request, so one layer serves both:
//!   - a request whose `content-type` is `application/grpc` (with any
//!     `+suffix`, and `application/grpc-web…`) gets a trailers-only gRPC
//!     response: HTTP 200 with the request's content type, `grpc-status`
//!     and `grpc-message` (the
//!     user-safe message) and, with the `tonic` feature, rich details in
//!     `grpc-status-details-bin` (`ErrorInfo`, `RequestInfo` with the error
//!     id, `RetryInfo`, `Help`, `LocalizedMessage`), readable by any
//!     standard gRPC client (in Rust: `tonic_types::StatusExt`);
//!   - any other request gets an RFC 9457 `application/problem+json`
//!     response: `type` (the help link, or `about:blank`), `title`,
//!     `status`, `detail` (the user-safe message), `instance` (the request
//!     path), and the extension members `error_id`, `code`, `timestamp`
//!     (RFC 3339), `service`, plus `retry_after` (seconds, also sent as the
//!     `Retry-After` header) when rate limited, `attempts` when a hedge
//!     was exhausted, and `deadline_origin` (`local`, `parent`,
//!     `grpc-timeout`, `header`) when a deadline fired, so a caller knows
//!     whether its own deadline was too tight. Responses carry
//!     `Cache-Control: no-store`.
//!
//!   Only errors before the response head are enriched: an error of the
//!   inner response's body, once streaming, passes through untouched.
//!
//!   The response's extensions hold the error's [`Kind`](atscale_core::Kind)
//!   and [`ErrorId`], for outer layers (metrics, access logs).
//! - **Client** ([`ErrorEnrichLayer::client`]): responses pass through; an
//!   error of an outgoing call becomes an [`Enriched`] error naming the
//!   target (the URI authority), the method and path, and whether the
//!   deadline was inherited. Errors are classified by
//!   [`atscale_core::classify`]: a refused connection is
//!   [`Kind::Unreachable`](atscale_core::Kind::Unreachable) (503: the request
//!   never reached the server), and errors it does not know are
//!   [`Kind::Upstream`](atscale_core::Kind::Upstream). When such an error
//!   travels up into a server-mode layer, its kind is kept: the caller sees
//!   503 or 502, not 500.
//!
//! # Backpressure
//!
//! `poll_ready` delegates to the inner service. An error (or panic) while
//! the inner service gets ready is kept, and answered by the next `call`
//! without calling the inner service, since server mode cannot fail.
//!
//! # Errors
//!
//! The kind is the first error in the `source()` chain, outermost first,
//! that [`atscale_core::classify`] knows (the vocabulary, the application's
//! mappings, tower / hyper / h2 / tonic / io errors); an [`Enriched`] error from a client-mode layer further
//! in keeps its kind.
//!
//! | error in the chain | kind | HTTP | gRPC | failing layer |
//! | --- | --- | --- | --- | --- |
//! | `DeadlineExceeded`, `Interrupted::DeadlineExceeded` | `deadline_exceeded` | 504 | `DEADLINE_EXCEEDED` | `deadline` |
//! | `MalformedDeadline` | `bad_request` | 400 | `INVALID_ARGUMENT` | `deadline` |
//! | `RateLimited` | `rate_limited` | 429 + `Retry-After` | `RESOURCE_EXHAUSTED` + `RetryInfo` + `grpc-retry-pushback-ms` | `ratelimit` |
//! | `Overloaded` | `overloaded` | 503 (+ `Retry-After` when it says) | `UNAVAILABLE` (+ `RetryInfo`, `grpc-retry-pushback-ms`) | — |
//! | `Unreachable`, a refused connection | `unreachable` | 503 | `UNAVAILABLE` | `upstream` |
//! | `Stalled` | `stalled` | 503 | `UNAVAILABLE` | `heartbeat` |
//! | `HedgeExhausted` | `hedge_exhausted` | 502 | `UNAVAILABLE` | `hedge` (with `attempts`) |
//! | `Cancelled`, `Interrupted::Cancelled` | `cancelled` | 499 | `CANCELLED` | — |
//! | anything else, client mode | `upstream` | 502 | `UNAVAILABLE` | `upstream` |
//! | a type mapped with [`atscale_core::classify::map`] | as mapped | | | |
//! | anything else (and panics), server mode | `internal` | 500 | `INTERNAL` | `service` |
//!
//! Client mode fails with [`Enriched`]; server mode never fails.
//! Building a layer fails with [`ConfigError`](error::ConfigError) for a bad
//! service name or help link template.
//!
//! # Logging
//!
//! Each error is logged once, where it is enriched, as a `tracing` event
//! with target `atscale_error` and the fields `id`, `kind`, `service`,
//! `method`, `route` (the matched route template with the `axum` feature,
//! otherwise the path), `path`, `status`, `timestamp`, `chain` (the whole `source()`
//! chain, [`Enriched::report`]) and, when known, `layer`, `attempts`,
//! `retry_after_ms`, `deadline_origin` and `target_authority`. Server side,
//! internal and upstream failures are `ERROR`, deadlines, overload and
//! stalls `WARN`, rate limiting, bad requests and cancellations `INFO`;
//! client side, all are `DEBUG` (the caller decides what they mean).
//!
//! # Panics
//!
//! A panic in the inner service's `poll_ready`, `call` or future is caught
//! (`catch_unwind`) and answered as an internal error with an id: the
//! process and the connection live on. The panic hook still runs (and
//! prints, by default). Client mode does not catch panics.
//!
//! # Ordering
//!
//! Outermost: in server mode it must see every error of the stack, and in
//! client mode it names the call as the caller made it. The recommended
//! server stack is ErrorEnrich → Deadline → Heartbeat → MultiRateLimit →
//! handler; the client stack ErrorEnrich → Deadline → MultiRateLimit →
//! Hedge → Heartbeat → transport.
//!
//! # Features
//!
//! - `tonic`: rich gRPC details through `tonic-types`, and
//!   `Enriched::to_status` (`impl From<Enriched> for tonic::Status`).
//! - `axum`: errors name the route template axum matched (`/orders/{id}`,
//!   from `MatchedPath`) in [`Enriched::route`] and the log line, so they
//!   group by route; the layer must be added with `Router::layer` (inside
//!   the router) for axum to have matched a route. There,
//!   `ErrorEnrichLayer::new(..).for_axum()` answers with axum's own `Body`,
//!   so the router does not box every response's body (the layer's
//!   `ResponseBody` would be; benches/README.md, "ErrorEnrich").
//!
//! # Differences from axum's `HandleErrorLayer`
//!
//! `HandleErrorLayer` calls a function you write for each error; this layer
//! classifies errors by the shared vocabulary, gives every error an id and a
//! log line, answers gRPC as well as HTTP, and catches panics (like
//! tower-http's `CatchPanic`, which it makes unnecessary).
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod body;
mod config;
pub mod error;
pub mod future;
mod grpc;
mod id;
mod layer;
mod log;
mod metrics;
pub mod mode;
mod problem;
mod service;
mod time;
mod trace;

pub use error::{Enriched, ErrorId};
pub use layer::{ErrorEnrichBuilder, ErrorEnrichLayer};
pub use service::ErrorEnrich;
