//! Timeout with context for tower: one deadline and one cancellation signal
//! per request, inherited from the caller, propagated to every downstream
//! call, enforced at each hop.
//!
//! [`DeadlineLayer`] gives each request an atscale [`Context`]: its deadline
//! is the earliest of
//!
//! - this hop's own budget (`DeadlineLayer::server(budget)`),
//! - the deadline of the request being served, when this call is made from
//!   inside a handler (the request's extensions, or the task-local
//!   [`Context::current`]),
//! - on a server, the caller's `grpc-timeout` header and, if configured, an
//!   HTTP header holding a budget in milliseconds.
//!
//! The context goes into the request's extensions and, while the inner
//! service runs, into a task-local scope, so a handler's own outgoing calls
//! inherit it with no plumbing. A client-side layer writes what is left of
//! the deadline into the outgoing `grpc-timeout` (and header), so the next
//! hop inherits it in turn.
//!
//! # Example
//!
//! A server that answers within 2 s or the caller's deadline, whichever is
//! sooner, and reads `x-deadline-ms` from plain HTTP callers:
//!
//! ```
//! use std::time::Duration;
//! use atscale_core::{BoxError, Context, Kind};
//! use atscale_deadline::DeadlineLayer;
//! use http::{HeaderName, Request};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let svc = ServiceBuilder::new()
//!     .layer(DeadlineLayer::server(Duration::from_secs(2))
//!         .with_header(HeaderName::from_static("x-deadline-ms")))
//!     .service(service_fn(|_req: Request<()>| async {
//!         let cx = Context::current().expect("the layer sets it");
//!         tokio::time::sleep(Duration::from_millis(300)).await; // slow work
//!         Ok::<_, BoxError>(cx.deadline().map(|d| d.origin().to_string()))
//!     }));
//!
//! // The caller allows 100 ms: the request fails after 100 ms, not 2 s.
//! let req = Request::builder().header("x-deadline-ms", "100").body(())?;
//! let err = svc.clone().oneshot(req).await.unwrap_err();
//! assert_eq!(Kind::of(&*err), Kind::DeadlineExceeded);
//! assert_eq!(err.to_string(), "deadline exceeded after 100ms (budget 100ms, header)");
//!
//! // A malformed deadline is a bad request, never "no deadline".
//! let req = Request::builder().header("grpc-timeout", "1 second").body(())?;
//! let err = svc.oneshot(req).await.unwrap_err();
//! assert_eq!(Kind::of(&*err), Kind::BadRequest);
//! # Ok(())
//! # }
//! ```
//!
//! On a client, `DeadlineLayer::client(budget)` around a hyper client or a
//! tonic `Channel` propagates the deadline of the request being served:
//!
//! ```
//! use std::time::Duration;
//! use atscale_core::{BoxError, Context, Origin};
//! use atscale_deadline::DeadlineLayer;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! // Stands in for a tonic Channel: returns the grpc-timeout it was sent.
//! let channel = service_fn(|req: http::Request<()>| async move {
//!     Ok::<_, BoxError>(req.headers()["grpc-timeout"].clone())
//! });
//! let client = ServiceBuilder::new()
//!     .layer(DeadlineLayer::client(Duration::from_secs(5)))
//!     .service(channel);
//!
//! // Inside a handler whose caller allowed 750 ms:
//! let served = Context::new().with_budget(Duration::from_millis(750), Origin::GrpcTimeout);
//! let sent = served.scope(client.oneshot(http::Request::new(()))).await?;
//! assert_eq!(sent, "750000u");
//! # Ok(())
//! # }
//! ```
//!
//! # Backpressure
//!
//! `poll_ready` delegates to the inner service; the deadline starts in
//! `call`.
//!
//! # Errors
//!
//! The service's error is a [`BoxError`](atscale_core::BoxError) holding the
//! inner service's error, or one of the shared vocabulary:
//!
//! | error | when | HTTP | gRPC |
//! | --- | --- | --- | --- |
//! | [`DeadlineExceeded`](error::DeadlineExceeded) | the deadline passed, or had passed at `call` (the inner service is then not called) | 504 | `DEADLINE_EXCEEDED` |
//! | [`MalformedDeadline`](error::MalformedDeadline) | a `grpc-timeout` or deadline header was malformed or repeated | 400 | `INVALID_ARGUMENT` |
//!
//! `DeadlineExceeded` states the budget, the time elapsed and the deadline's
//! [`Origin`](atscale_core::Origin): `local` (this hop's budget), `parent`
//! (the request being served), `grpc-timeout` or `header` (the caller).
//!
//! On expiry the inner future is dropped and the request's context is
//! cancelled, so work spawned with
//! [`atscale_core::spawn_preemptable`] or run under
//! [`Context::run`] stops. The context is also cancelled when the response
//! future is dropped early or the inner service fails; after a successful
//! response it is left alone, because a streaming body may still be
//! produced under it.
//!
//! # Header formats
//!
//! `grpc-timeout` is parsed exactly as the gRPC over HTTP/2 spec defines it:
//! 1 to 8 ASCII digits, then one unit of `H M S m u n`. The HTTP header holds
//! whole milliseconds (1 to 20 ASCII digits). Anything else, a value that
//! overflows, or the header given twice, fails the request with
//! `MalformedDeadline`. The parsers are public in [`codec`].
//!
//! # On a tonic server
//!
//! tonic's server enforces `grpc-timeout` by itself too (answering
//! `CANCELLED` "Timeout expired"), but it ignores a malformed value and
//! gives handlers no context. With `DeadlineLayer::server` in
//! `Server::builder().layer(..)`, a malformed value is rejected, the handler
//! and its outgoing calls see the deadline, and on expiry the server
//! answers `DEADLINE_EXCEEDED` from this layer (tonic starts its own timer
//! just after calling the layers, so ours is due first) and cancels the
//! request's context. tonic's server resets the stream when a layer returns
//! an error: put ErrorEnrich outside to answer with a proper `Status`. A
//! plain tonic client never sees that answer: its `Channel` runs its own
//! `grpc-timeout` timer and reports the expiry first, as `CANCELLED`
//! "Timeout expired"; the client stack (`DeadlineLayer::client` around the
//! `Channel`) reports it as `DEADLINE_EXCEEDED`.
//!
//! # Bodies
//!
//! The deadline covers a request until its response head. With
//! [`DeadlineLayer::with_bodies`] it also covers reading the request body
//! and producing the response body ([`body`]): a gRPC stream that outlives
//! it ends with `DEADLINE_EXCEEDED` trailers, an SSE or chunked answer is
//! aborted, a slow upload fails, and the request's context is cancelled.
//!
//! # Ordering
//!
//! Outermost after ErrorEnrich, so every inner layer (rate limit, hedge,
//! heartbeat) and the handler see the context. On a client, put it outside
//! the retry and the hedge, so one deadline covers all attempts; they
//! rewrite the `grpc-timeout` (and header) this layer wrote on each copy
//! they send later, to what is left by then ([`attempt::refresh`]).
//!
//! # Differences from `tower::timeout::Timeout`
//!
//! - The deadline is inherited from callers and propagated to callees,
//!   instead of being a fixed duration per hop.
//! - Expiry cancels the request's context, not just the one future.
//! - An expired deadline fails fast, before the inner service is called.
//! - The timer is only registered when the inner future is pending.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod attempt;
pub mod body;
pub mod codec;
pub mod error;
pub mod future;
mod layer;
mod metrics;
mod service;

pub use atscale_core::Context;
pub use body::BodyDeadlineLayer;
pub use layer::DeadlineLayer;
pub use service::Deadline;
