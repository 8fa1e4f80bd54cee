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
//! connection (one per node on a cluster), each in a small task of its own (so that an answer arriving
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
//! On one server the connection is redis's `ConnectionManager`: one
//! multiplexed connection, reconnected in the background when it drops (on
//! a cluster, see [Redis Cluster](#redis-cluster)). A reservation whose
//! answer arrives after its caller gave up (timeout, deadline,
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
//! # Memory
//!
//! Every bucket is one string key whose expiry is the time until the
//! bucket is full again, at most `burst × interval` plus the longest wait
//! granted (`max_wait`); a bucket with refunds pending has one hash beside
//! it, expiring no later. So the keys alive at any moment are those of the
//! buckets used within that span: a keyed table holds at most one key (plus
//! at most one hash) per distinct key seen in the last
//! `burst × interval + max_wait`, whatever the traffic, and nothing for
//! keys gone idle. On a cluster the same bound holds per table, divided
//! among the masters: per-key buckets spread over the slots (each master
//! holds about `1/masters` of them, and its replicas a copy); a table
//! given a tag ([`RedisKeyedLimiter::with_tag`]) holds the whole bound on
//! the one master of its slot.
//!
//! # Redis deployment
//!
//! One Redis server, a primary with replicas (a failover loses at most the
//! few reservations not yet replicated), or a Redis Cluster.
//!
//! # Redis Cluster
//!
//! [`RedisStore::cluster`] runs the store on a Redis Cluster through the
//! redis crate's cluster client: one multiplexed connection per node,
//! `MOVED` and `ASK` followed, the slot map refreshed when a node answers
//! `MOVED` or cannot be reached. Everything else (scripts, refunds, the
//! local pre-check, the fault policy) is the same as on one server.
//!
//! **Keys.** A script can only touch keys of one hash slot, so the keys
//! carry [hash tags](https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/#hash-tags)
//! (the part in `{..}` alone decides the slot):
//!
//! | bucket | one server | cluster |
//! | --- | --- | --- |
//! | [`RedisStore::limiter`] | `<prefix><name>` | `<prefix>{<hash tag>}:<name>` (the store's [`hash_tag`](RedisStoreBuilder::hash_tag), `global` by default) |
//! | [`RedisStore::limiter_in`] | `<prefix><name>` | `<prefix>{<tag>}:<name>` |
//! | [`RedisStore::keyed`] | `<prefix><name>:<key>` | `<prefix>{k:<hash of key>}:<name>:<key>` |
//! | keyed, [`with_tag`](RedisKeyedLimiter::with_tag) | `<prefix><name>:<key>` | `<prefix>{<tag>}:<name>:<key>` |
//!
//! So the named limits of a store share one slot (the book's 2 per second
//! *and* 10 per minute: one atomic script), every table keyed by the same
//! key puts that key's buckets in one slot (a tenant's per-second and
//! per-minute limits: one atomic script), and tenants spread over the
//! cluster. [`RedisLimiter::slot`] tells where a bucket lives.
//!
//! **Limits in different slots.** A request that takes buckets of several
//! slots (a global named limit *and* a per-tenant one, not tagged alike) is
//! admitted in one step per slot, in turn, and the layer says so when it is
//! built (a `warn` from `tracing` naming the buckets). Such an admission is
//! **not atomic**: each step reserves its own buckets at their earliest
//! time, and the request is admitted at the latest of them; when a later
//! step refuses (or fails), what the earlier steps reserved is given back
//! (awaited, before the refusal is returned) under the rule of
//! [Refunds](#refunds);
//! between the steps other requests see the first step's reservation, so a
//! concurrent request may be refused where one atomic script would have
//! admitted it. It never admits beyond any limit, and with `reject()` (no
//! waiting) each bucket counts exactly the requests admitted (the tests
//! check that a sequence of split admissions loses nothing). In wait mode a
//! bucket of an earlier step may count its request up to the difference
//! between the steps' waits before the request runs. [`Stats::split`]
//! counts these admissions; tag the limits alike to avoid them.
//!
//! **No admission counted twice.** The cluster client is built without
//! retries of its own (it would resend a command after a dropped
//! connection or a response timeout, when the script may already have
//! run). The store resends a script only on answers that prove it did not
//! run: `MOVED` (the node checks the slot before running anything; resent
//! to the named node), `ASK` (a migrating slot whose keys left; resent with
//! `ASKING` to the named node, in one pipeline), `TRYAGAIN`,
//! `CLUSTERDOWN`, `MASTERDOWN`, `LOADING`, `READONLY` (refused before the
//! script's first write, and the scripts write nothing before it),
//! `NOSCRIPT` (resent whole with `EVAL`), and no connection to the slot's
//! node (nothing sent). A dropped connection, an I/O error or a timeout may
//! hide a script that ran: it is never resent, and the [`FaultPolicy`]
//! decides. Resending stops when the caller has gone, and after 16 tries;
//! [`Stats::resent`] counts it.
//!
//! **Failover.** When a master dies, requests whose buckets live in its
//! slots fail by the [`FaultPolicy`] (with the cluster's default
//! `cluster-require-full-coverage yes`, once the node is marked failed the
//! whole cluster answers `CLUSTERDOWN`, and every request does) until a
//! replica is promoted, after the cluster's `cluster-node-timeout` and an
//! election; then the client finds the new master and admissions continue,
//! with no restart and no error of their own. Replication is asynchronous:
//! the promoted replica may lack the last few reservations the dead master
//! made, so limits are briefly more permissive, never stricter.
//!
//! # Testing
//!
//! The tests start their own `redis-server` (`apt-get install -y
//! redis-server`) on a free loopback port; see `tests/support/mod.rs`. The
//! cluster tests start their own cluster of six nodes (3 masters, 3
//! replicas) with `redis-cli --cluster create` (`apt-get install -y
//! redis-tools`); see `tests/support/cluster.rs`. Both fail, never skip,
//! when the binaries are missing.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod cluster;
pub mod error;
mod limiter;
mod metrics;
mod script;
mod store;

pub use error::{InvalidConfig, StoreUnavailable};
pub use limiter::{ByRedisKey, RedisKeyedLimiter, RedisLimiter};
pub use store::{Acquire, FaultPolicy, RedisReceipt, RedisStore, RedisStoreBuilder, Stats};
