//! Distributed rate limits on Redis: the limiters of
//! [atscale-ratelimit](atscale_ratelimit) shared by every process of a
//! fleet, admitted atomically across all the limits of a request by one
//! server-side script.
//!
//! When a service runs on many machines, in-process limits multiply by the
//! number of replicas. A [`RedisStore`] keeps the buckets in Redis instead;
//! atscale-ratelimit's own layer drives it, so the semantics are those of
//! the in-process limiter:
//!
//! - the same [`Limit`](atscale_ratelimit::Limit)s, costs, and keyed limits
//!   ([`RedisStore::keyed`]);
//! - *all or none* across the limits of a request: one Lua script (GCRA over
//!   every bucket of the request, the arithmetic of the in-memory store)
//!   reserves the cost in all of them at one common admission time, in one
//!   round trip (`EVALSHA`; the script is loaded on `NOSCRIPT` and retried);
//! - wait mode without polling: the script returns the admission time, and
//!   the request sleeps locally until then; reject mode and deadline-aware
//!   refusal with the retry-after;
//! - idle buckets vanish on their own (every write sets `PX` to the time
//!   until the bucket is full again, and a missing key reads as full).
//!
//! # Example
//!
//! The book's API client across a fleet: 2 calls per second and 10 per
//! minute, shared by every process, plus a limit per tenant.
//!
//! ```no_run
//! use std::time::Duration;
//! use atscale_core::BoxError;
//! use atscale_ratelimit::{Limit, RateLimitBuilder, key_fn};
//! use atscale_ratelimit_redis::{FaultPolicy, RedisStore};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), BoxError> {
//! let store = RedisStore::builder("redis://127.0.0.1:6379/")
//!     .timeout(Duration::from_millis(20))
//!     .fault_policy(FaultPolicy::FailOpen)
//!     .local_check(true)
//!     .build()?;
//! let per_tenant = store.keyed::<String>("tenant", Limit::per_second(5)?)?;
//! let layer = RateLimitBuilder::with_store(store.clone())
//!     .limiter(store.limiter("api:per-second", Limit::per_second(2)?)?)
//!     .limiter(store.limiter("api:per-minute", Limit::per_minute(10)?)?)
//!     .key_part(per_tenant.by(key_fn(|req: &http::Request<()>| {
//!         req.headers().get("x-tenant")?.to_str().ok().map(str::to_owned)
//!     })))
//!     .max_wait(Duration::from_secs(10))
//!     .build()?;
//! let api = ServiceBuilder::new()
//!     .layer(layer)
//!     .service(service_fn(|_req: http::Request<()>| async { Ok::<_, BoxError>("ok") }));
//!
//! let req = http::Request::builder().header("x-tenant", "acme").body(())?;
//! assert_eq!(api.oneshot(req).await?, "ok");
//! println!("{:?}", store.stats());
//! # Ok(())
//! # }
//! ```
//!
//! # Backpressure
//!
//! The layer's (see [atscale_ratelimit](atscale_ratelimit#backpressure)):
//! `poll_ready` delegates to the inner service; the round trip to Redis and
//! any wait happen in the response future, in arrival order of the
//! reservations Redis made. The number of waiters is bounded by the layer
//! (`max_waiters`); the round trips themselves are multiplexed on one
//! connection, each in a small task of its own (so that an answer arriving
//! after its caller left is read and its reservation given back).
//!
//! # Errors
//!
//! Besides the layer's own errors (`RateLimited` with its retry-after,
//! `Overloaded` for a full wait queue, `Cancelled`, `InsufficientCapacity`,
//! `MissingKey`):
//!
//! | error | when | [`Kind`](atscale_core::Kind) | HTTP / gRPC |
//! | --- | --- | --- | --- |
//! | [`StoreUnavailable`] | Redis could not be asked (down, slower than the timeout, an error) and the policy is [`FaultPolicy::FailClosed`] | `Overloaded` | 503 / `UNAVAILABLE` |
//! | [`DeadlineExceeded`](atscale_core::DeadlineExceeded) | the request's own deadline passed during the round trip | `DeadlineExceeded` | 504 / `DEADLINE_EXCEEDED` |
//! | [`Cancelled`](atscale_core::Cancelled) | the request's context was cancelled during the round trip | `Cancelled` | 499 / `CANCELLED` |
//!
//! Under [`FaultPolicy::FailOpen`] a request that Redis could not decide on
//! is admitted. Either way it is counted ([`RedisStore::stats`]) and logged
//! with `tracing` (a `warn` when Redis becomes unreachable, an `info` when
//! it answers again, a `debug` for every request in between).
//! Configuration errors are [`InvalidConfig`] at construction.
//!
//! # Faults
//!
//! Every call to Redis is bounded by the store's
//! [`timeout`](RedisStoreBuilder::timeout) *and* by the request's deadline
//! (its [`Context`](atscale_core::Context), or `Context::current()`).
//! The connection is redis's `ConnectionManager`: one multiplexed
//! connection, reconnected in the background when it drops. A reservation
//! whose answer arrives after its caller gave up (timeout, deadline,
//! cancellation, or a dropped future) is given back.
//!
//! # Clock
//!
//! The script reads Redis's `TIME`: every process computes with one clock,
//! whatever the skew between machines. Bucket state and waits are in
//! microseconds (the resolution of `TIME`), so a limit's interval is rounded
//! up to a whole microsecond, and limits above 10⁶ per second are refused.
//! The wait the script returns is slept on the local timer from when the
//! answer arrives: a request is admitted up to half a round trip after its
//! admission time, never before it.
//!
//! # Refunds
//!
//! A waiter that leaves before its admission time gives its reservation
//! back with a second script, under the rule of the in-memory store: each
//! bucket moves back only where the reservation is still the latest; one
//! with later reservations behind it is remembered (in a hash next to the
//! bucket, expiring with it) and given back when those leave too.
//!
//! # Local pre-check
//!
//! With [`RedisStoreBuilder::local_check`], each named bucket remembers the
//! state Redis last reported, and a request this process already knows
//! cannot be admitted within its allowed wait is refused at once, without a
//! round trip: under a flood, after one refusal a process stops asking
//! Redis until the bucket may have room. See that method for its accuracy.
//!
//! # Differences from the in-process store
//!
//! - Each admission is a round trip (about 50 µs on loopback, see
//!   `benches/README.md`) instead of a few nanoseconds; a request that must
//!   wait still costs one round trip.
//! - Time has microsecond resolution (intervals rounded up), and admission
//!   comes up to half a round trip after the computed time.
//! - Refunds are sent asynchronously: a waiter that leaves gives its slot
//!   back a round trip later.
//! - Redis being down or slow is a state of its own, decided by the
//!   [`FaultPolicy`].
//! - Keyed buckets live only in Redis (no local table, no eviction: their
//!   keys expire).
//!
//! # Redis deployment
//!
//! One Redis server (or a primary with replicas; a failover loses at most
//! the few reservations not yet replicated). Redis Cluster is not
//! supported: the buckets of one request would have to share a hash slot.
//!
//! # Testing
//!
//! The tests start their own `redis-server` (`apt-get install -y
//! redis-server`) on a free loopback port; see `tests/support/mod.rs`.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod cluster;
pub mod error;
mod limiter;
mod script;
mod store;

pub use error::{InvalidConfig, StoreUnavailable};
pub use limiter::{ByRedisKey, RedisKeyedLimiter, RedisLimiter};
pub use store::{Acquire, FaultPolicy, RedisReceipt, RedisStore, RedisStoreBuilder, Stats};
