//! The Redis store: connection, fault policy, counters, and the
//! [`Store`] implementation.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use atscale_core::{Cancelled, Context, DeadlineExceeded};
use atscale_ratelimit::{
    Claims, Grant, InsufficientCapacity, InvalidLimit, Limit, MAX_LIMITS, Reason, Refusal, Store,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{ErrorKind, FromRedisValue, IntoConnectionInfo, RedisError, RedisResult};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::{InvalidConfig, StoreUnavailable};
use crate::limiter::{Layout, RedisKeyedLimiter, RedisLimiter, check_tag, local_now};
use crate::metrics;
use crate::script::{ACQUIRE, Lua, REFUND, cancelled_key};

/// What a request gets when Redis cannot be asked (down, slower than the
/// timeout, or answering with an error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FaultPolicy {
    /// Admit the request as if no limit applied; count it
    /// ([`Stats::failed_open`]) and log it. For limits that protect
    /// nothing critical: an outage of Redis does not become an outage of
    /// the service.
    FailOpen,
    /// Refuse the request with [`StoreUnavailable`] (an
    /// [`Overloaded`](atscale_core::Overloaded): 503 / `UNAVAILABLE`); count
    /// it ([`Stats::failed_closed`]) and log it. For limits that protect
    /// something that must not be overrun (the default).
    FailClosed,
}

/// A snapshot of what a [`RedisStore`] did, from [`RedisStore::stats`].
///
/// Counters are shared by every clone of the store, and only ever grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Scripts sent to Redis to reserve: one per admission asked of
    /// Redis (one per slot for a [split](Stats::split) admission on a
    /// cluster), resends not counted.
    pub round_trips: u64,
    /// Requests Redis admitted (at once or after a wait).
    pub admitted: u64,
    /// Requests Redis refused (admission beyond the allowed wait).
    pub refused: u64,
    /// Requests the local pre-check refused without asking Redis.
    pub refused_locally: u64,
    /// Requests admitted because Redis could not be asked ([`FaultPolicy::FailOpen`]).
    pub failed_open: u64,
    /// Requests refused because Redis could not be asked ([`FaultPolicy::FailClosed`]).
    pub failed_closed: u64,
    /// Calls that ran out of the configured timeout (counted in the faults too).
    pub timeouts: u64,
    /// Requests that ran out of their own deadline during the round trip
    /// (they fail with `DeadlineExceeded`, whatever the policy).
    pub deadline_exceeded: u64,
    /// Reservations given back to Redis (waiters that left early, and
    /// answers that arrived after their caller had gone).
    pub refunds: u64,
    /// Scripts sent again because the cluster answered that they did not
    /// run (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`, `NOSCRIPT`, no
    /// connection to the slot's node). Always 0 on one server.
    pub resent: u64,
    /// Admissions whose buckets lie in two or more cluster slots, admitted
    /// in one step per slot (see the [crate docs](crate#redis-cluster)).
    pub split: u64,
}

#[derive(Default)]
struct Counters {
    round_trips: AtomicU64,
    admitted: AtomicU64,
    refused: AtomicU64,
    refused_locally: AtomicU64,
    failed_open: AtomicU64,
    failed_closed: AtomicU64,
    timeouts: AtomicU64,
    deadline_exceeded: AtomicU64,
    refunds: AtomicU64,
    resent: AtomicU64,
    split: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Rate-limit buckets kept in Redis: a [`Store`] for atscale-ratelimit's
/// layer, so that every process sharing one Redis shares the limits.
///
/// Cheap to clone: clones share the connection, the configuration and the
/// counters. See the [crate docs](crate) for the example, the faults, and
/// what one admission costs.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Conn,
    timeout: Duration,
    policy: FaultPolicy,
    prefix: String,
    hash_tag: String,
    local_check: bool,
    counters: Counters,
    healthy: AtomicBool,
}

/// The connection: one server, or a cluster.
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Where the builder connects.
enum Target {
    Single(RedisResult<redis::ConnectionInfo>),
    Cluster(RedisResult<Vec<redis::ConnectionInfo>>),
}

/// Builds a [`RedisStore`] (see [`RedisStore::builder`] and
/// [`RedisStore::cluster`]).
#[must_use]
pub struct RedisStoreBuilder {
    target: Target,
    timeout: Duration,
    policy: FaultPolicy,
    prefix: String,
    hash_tag: String,
    local_check: bool,
}

impl RedisStore {
    /// A builder for a store on the Redis server at `url`
    /// (`redis://127.0.0.1:6379/0`, or anything else
    /// [`IntoConnectionInfo`] takes).
    pub fn builder(url: impl IntoConnectionInfo) -> RedisStoreBuilder {
        RedisStoreBuilder::new(Target::Single(url.into_connection_info()))
    }

    /// A builder for a store on the Redis Cluster that `nodes` belong to
    /// (one or more of its nodes, `redis://127.0.0.1:7000/`, …: the others
    /// are found from them). See the [crate docs](crate#redis-cluster) for
    /// how buckets are placed in slots, and what a failover does.
    ///
    /// ```
    /// use atscale_ratelimit_redis::RedisStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = RedisStore::cluster(["redis://10.0.0.1:6379/", "redis://10.0.0.2:6379/"])
    ///     .hash_tag("api")
    ///     .build()?;
    /// let limiter = store.limiter("per-second", atscale_ratelimit::Limit::per_second(2)?)?;
    /// assert_eq!(limiter.key(), "atscale:rl:{api}:per-second");
    /// # Ok(())
    /// # }
    /// ```
    pub fn cluster<T: IntoConnectionInfo>(nodes: impl IntoIterator<Item = T>) -> RedisStoreBuilder {
        let nodes = nodes
            .into_iter()
            .map(IntoConnectionInfo::into_connection_info)
            .collect();
        RedisStoreBuilder::new(Target::Cluster(nodes))
    }

    /// A bucket named `name` with `limit`, kept under the key
    /// `<prefix><name>` on one server, and `<prefix>{<hash tag>}:<name>` on
    /// a cluster (the store's [`hash_tag`](RedisStoreBuilder::hash_tag):
    /// every named bucket of the store in one slot, so that the limits of
    /// one request are one atomic script). Every process that names the
    /// same bucket shares it, and must give it the same limit.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] for an empty name, or a limit finer than one
    /// microsecond between requests.
    pub fn limiter(&self, name: &str, limit: Limit) -> Result<RedisLimiter, InvalidConfig> {
        self.limiter_in(&self.inner.hash_tag, name, limit)
    }

    /// Like [`limiter`](Self::limiter), under the hash tag `tag` instead of
    /// the store's (`<prefix>{<tag>}:<name>`) on a cluster: for groups of
    /// limits never taken by one request, which then need not share a
    /// node. On one server it is [`limiter`](Self::limiter).
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] for an empty name or tag, a tag with a brace, or a
    /// limit finer than one microsecond between requests.
    pub fn limiter_in(
        &self,
        tag: &str,
        name: &str,
        limit: Limit,
    ) -> Result<RedisLimiter, InvalidConfig> {
        if name.is_empty() {
            return Err(InvalidConfig::new("a bucket needs a non-empty name"));
        }
        check_tag(tag)?;
        let prefix = &self.inner.prefix;
        let key = match self.inner.conn {
            Conn::Single(_) => format!("{prefix}{name}"),
            Conn::Cluster(_) => format!("{prefix}{{{tag}}}:{name}"),
        };
        RedisLimiter::new(key, limit, self.inner.local_check)
    }

    /// A table of buckets, one per key, each with `limit` unless
    /// [`RedisKeyedLimiter::quota`] says otherwise.
    ///
    /// On one server a key's bucket is `<prefix><name>:<key>`. On a cluster
    /// it is `<prefix>{k:<hash of key>}:<name>:<key>`: keys spread over the
    /// cluster, and every table keyed by the same key (a tenant's 2 per
    /// second *and* 10 per minute) puts it in the same slot, one atomic
    /// script; [`RedisKeyedLimiter::with_tag`] moves the whole table into
    /// the slot of the named limits instead.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] for an empty name, or a limit finer than one
    /// microsecond between requests.
    pub fn keyed<K: fmt::Display>(
        &self,
        name: &str,
        limit: Limit,
    ) -> Result<RedisKeyedLimiter<K>, InvalidConfig> {
        if name.is_empty() {
            return Err(InvalidConfig::new("a keyed limit needs a non-empty name"));
        }
        let prefix = self.inner.prefix.as_str();
        let layout = match self.inner.conn {
            Conn::Single(_) => Layout::Plain {
                base: format!("{prefix}{name}").into(),
            },
            Conn::Cluster(_) => Layout::PerKey {
                prefix: prefix.into(),
                name: name.into(),
            },
        };
        RedisKeyedLimiter::new(layout, limit)
    }

    /// Whether the store runs on a Redis Cluster ([`RedisStore::cluster`]).
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner.conn, Conn::Cluster(_))
    }

    /// The hash tag of the named buckets on a cluster (see
    /// [`RedisStoreBuilder::hash_tag`]).
    pub fn hash_tag(&self) -> &str {
        &self.inner.hash_tag
    }

    /// What the store did so far (shared by all clones).
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            round_trips: get(&c.round_trips),
            admitted: get(&c.admitted),
            refused: get(&c.refused),
            refused_locally: get(&c.refused_locally),
            failed_open: get(&c.failed_open),
            failed_closed: get(&c.failed_closed),
            timeouts: get(&c.timeouts),
            deadline_exceeded: get(&c.deadline_exceeded),
            refunds: get(&c.refunds),
            resent: get(&c.resent),
            split: get(&c.split),
        }
    }

    /// The policy when Redis cannot be asked.
    pub fn fault_policy(&self) -> FaultPolicy {
        self.inner.policy
    }

    /// The longest a call to Redis may take.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The reservation of `claims`, checked locally first: a cost above a
    /// burst, or (with the local pre-check) a wait that this process already
    /// knows to exceed `max_wait`, is answered without a round trip.
    fn check_locally(
        &self,
        claims: &Claims<'_, RedisLimiter>,
        max_wait: Duration,
    ) -> Option<Result<Grant<RedisReceipt>, Refusal>> {
        if claims.is_empty() {
            return Some(Ok(Grant::new(Duration::ZERO, None)));
        }
        for (b, cost) in claims.iter() {
            if cost > b.burst() {
                return Some(Err(Refusal::InsufficientCapacity(
                    InsufficientCapacity::new(cost, b.burst()),
                )));
            }
        }
        if !self.inner.local_check {
            return None;
        }
        let now = local_now();
        let mut wait = 0;
        for (b, cost) in claims.iter() {
            if let Some(m) = b.mirror() {
                let t = b.interval_micros() * 1_000;
                let w = m.wait(now, u64::from(cost) * t, u64::from(b.burst()) * t);
                wait = wait.max(w);
            }
        }
        let wait = Duration::from_nanos(wait);
        if wait > max_wait {
            bump(&self.inner.counters.refused_locally);
            return Some(Err(Refusal::RetryAfter(wait)));
        }
        None
    }

    fn fault(&self, cause: String, timed_out: bool) -> Result<Grant<RedisReceipt>, Refusal> {
        let c = &self.inner.counters;
        if timed_out {
            bump(&c.timeouts);
        }
        if self.inner.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                policy = ?self.inner.policy,
                "rate-limit store unavailable: {cause}"
            );
        } else {
            tracing::debug!(policy = ?self.inner.policy, "rate-limit store unavailable: {cause}");
        }
        match self.inner.policy {
            FaultPolicy::FailOpen => {
                bump(&c.failed_open);
                metrics::failed(true);
                Ok(Grant::new(Duration::ZERO, None))
            }
            FaultPolicy::FailClosed => {
                bump(&c.failed_closed);
                metrics::failed(false);
                Err(Refusal::Store(Box::new(StoreUnavailable::new(cause))))
            }
        }
    }

    fn answered(&self) {
        if !self.inner.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!("rate-limit store reachable again");
        }
    }

    /// Turns the scripts' reply into an answer; `sent` is the local instant
    /// the (first) script was sent at.
    fn reply(
        &self,
        claims: &[(RedisLimiter, u32)],
        reply: &Reply,
        sent: u64,
    ) -> Result<Grant<RedisReceipt>, Refusal> {
        let c = &self.inner.counters;
        self.answered();
        let micros = |us: i64| Duration::from_micros(u64::try_from(us).unwrap_or(0));
        for ((b, _), seen) in claims.iter().zip(reply.buckets.iter()) {
            if let (Some(m), Some(ahead)) = (b.mirror(), seen.ahead_us) {
                m.learn(sent, micros(ahead));
            }
        }
        if !reply.admitted {
            bump(&c.refused);
            return Err(Refusal::RetryAfter(micros(reply.wait_us)));
        }
        bump(&c.admitted);
        if reply.wait_us == 0 {
            // Admitted now: nothing will ever be given back.
            return Ok(Grant::new(Duration::ZERO, None));
        }
        Ok(Grant::new(micros(reply.wait_us), receipt_of(claims, reply)))
    }

    /// Runs `lua` on the node that holds `keys` (all in one slot).
    async fn eval(
        &self,
        lua: &Lua,
        keys: &[&str],
        args: &[i64],
        alive: &(dyn Fn() -> bool + Send + Sync),
    ) -> RedisResult<Vec<i64>> {
        let _round_trip = metrics::RoundTrip::start();
        match &self.inner.conn {
            Conn::Single(conn) => {
                let mut inv = lua.script.prepare_invoke();
                for key in keys {
                    inv.key(*key);
                }
                for arg in args {
                    inv.arg(*arg);
                }
                inv.invoke_async(&mut conn.clone()).await
            }
            Conn::Cluster(conn) => {
                let value = crate::cluster::eval(conn, lua, keys, args, alive, || {
                    bump(&self.inner.counters.resent);
                })
                .await?;
                Ok(Vec::<i64>::from_redis_value(value)?)
            }
        }
    }

    /// The claims grouped by hash slot, in order of first appearance: one
    /// group on one server.
    fn groups(&self, claims: &[(RedisLimiter, u32)]) -> Vec<Vec<usize>> {
        if let Conn::Single(_) = self.inner.conn {
            return vec![(0..claims.len()).collect()];
        }
        let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
        for (i, (b, _)) in claims.iter().enumerate() {
            match groups.iter_mut().find(|(slot, _)| *slot == b.slot()) {
                Some((_, group)) => group.push(i),
                None => groups.push((b.slot(), vec![i])),
            }
        }
        groups.into_iter().map(|(_, group)| group).collect()
    }

    /// Reserves `claims` in Redis: one script when they share a slot (or
    /// on one server), else one per slot in turn, giving back what the
    /// first steps reserved when a later one refuses or fails.
    async fn admit(
        &self,
        claims: &[(RedisLimiter, u32)],
        max_wait_us: i64,
        alive: &(dyn Fn() -> bool + Send + Sync),
    ) -> RedisResult<Reply> {
        let groups = self.groups(claims);
        if groups.len() > 1 {
            bump(&self.inner.counters.split);
        }
        let mut reply = Reply {
            admitted: true,
            wait_us: 0,
            buckets: vec![Seen::default(); claims.len()],
        };
        let mut taken: Vec<usize> = Vec::new();
        for group in &groups {
            if !taken.is_empty() && !alive() {
                // The caller left between two steps: nothing more to ask.
                self.give_back_now(claims, &reply, &taken).await;
                return Err(RedisError::from((
                    ErrorKind::Client,
                    "the caller left during a split admission",
                )));
            }
            let keys: Vec<&str> = group.iter().map(|&i| claims[i].0.key()).collect();
            let mut args = Vec::with_capacity(1 + 2 * group.len());
            args.push(max_wait_us);
            for &i in group {
                let (b, cost) = &claims[i];
                let t = i64::try_from(b.interval_micros()).unwrap_or(i64::MAX);
                args.push(i64::from(*cost) * t);
                args.push(i64::from(b.burst()) * t);
            }
            bump(&self.inner.counters.round_trips);
            let step = self
                .eval(&ACQUIRE, &keys, &args, alive)
                .await
                .and_then(|raw| {
                    parse(&raw, group.len()).ok_or_else(|| {
                        RedisError::from((
                            ErrorKind::UnexpectedReturnType,
                            "unexpected script reply",
                            format!("{raw:?}"),
                        ))
                    })
                });
            let (admitted, wait, seen) = match step {
                Ok(step) => step,
                Err(e) => {
                    self.give_back_now(claims, &reply, &taken).await;
                    return Err(e);
                }
            };
            for (&i, seen) in group.iter().zip(seen) {
                reply.buckets[i] = seen;
            }
            if !admitted {
                self.give_back_now(claims, &reply, &taken).await;
                for &i in &taken {
                    reply.buckets[i].ahead_us = None;
                }
                reply.admitted = false;
                reply.wait_us = wait;
                return Ok(reply);
            }
            // Each step is admitted at its own earliest time; the request
            // at the latest of them.
            reply.wait_us = reply.wait_us.max(wait);
            taken.extend_from_slice(group);
        }
        Ok(reply)
    }

    /// Gives back at once (awaited) what the first steps of a split
    /// admission reserved: the claims `taken`.
    async fn give_back_now(&self, claims: &[(RedisLimiter, u32)], reply: &Reply, taken: &[usize]) {
        if taken.is_empty() {
            return;
        }
        let parts: Vec<_> = taken
            .iter()
            .map(|&i| {
                let seen = reply.buckets[i];
                (claims[i].0.clone(), seen.old, seen.new)
            })
            .collect();
        self.refund_parts(&parts).await;
    }

    /// Sends the refund script for `receipt`, in a task of its own.
    fn send_refund(&self, receipt: RedisReceipt) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::debug!("no tokio runtime to give a rate-limit reservation back on");
            return;
        };
        let store = self.clone();
        runtime.spawn(async move { store.refund_parts(&receipt.parts).await });
    }

    /// Runs the refund script for `parts`, one per slot on a cluster.
    async fn refund_parts(&self, parts: &[(RedisLimiter, i64, i64)]) {
        let claims: Vec<(RedisLimiter, u32)> =
            parts.iter().map(|(b, _, _)| (b.clone(), 0)).collect();
        for group in self.groups(&claims) {
            let lists: Vec<String> = group
                .iter()
                .map(|&i| cancelled_key(parts[i].0.key()))
                .collect();
            let mut keys = Vec::with_capacity(2 * group.len());
            let mut args = Vec::with_capacity(2 * group.len());
            for (k, &i) in group.iter().enumerate() {
                let (b, old, new) = &parts[i];
                keys.push(b.key());
                keys.push(lists[k].as_str());
                args.push(*old);
                args.push(*new);
            }
            let sent = local_now();
            match self.eval(&REFUND, &keys, &args, &|| true).await {
                Ok(reply) if reply.len() == 1 + group.len() => {
                    bump(&self.inner.counters.refunds);
                    for (k, &i) in group.iter().enumerate() {
                        if let Some(m) = parts[i].0.mirror() {
                            let ahead = u64::try_from(reply[1 + k] - reply[0]).unwrap_or(0);
                            m.reset(sent, Duration::from_micros(ahead));
                        }
                    }
                }
                Ok(reply) => tracing::debug!("unexpected refund reply {reply:?}"),
                Err(e) => tracing::debug!("rate-limit refund failed: {e}"),
            }
        }
    }
}

/// What the scripts answered for one admission.
struct Reply {
    admitted: bool,
    /// The wait until admission (admitted), or the retry-after (refused).
    wait_us: i64,
    /// Per claim, in the order of the claims.
    buckets: Vec<Seen>,
}

/// What a script said of one bucket.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    /// The TAT before the reservation (server time of the bucket's node).
    old: i64,
    /// The TAT after it (the TAT, when nothing was reserved).
    new: i64,
    /// How far the TAT is ahead of the node's clock, for the local
    /// pre-check (`None`: nothing to learn).
    ahead_us: Option<i64>,
}

/// Reads one acquire script's reply for `n` buckets: admitted, the wait,
/// and each bucket.
fn parse(raw: &[i64], n: usize) -> Option<(bool, i64, Vec<Seen>)> {
    let [status, wait, now, rest @ ..] = raw else {
        return None;
    };
    match (*status, rest.len()) {
        (1, len) if len == 2 * n => {
            let seen = rest
                .chunks_exact(2)
                .map(|p| Seen {
                    old: p[0],
                    new: p[1],
                    ahead_us: Some(p[1] - now),
                })
                .collect();
            Some((true, *wait, seen))
        }
        (0, len) if len == n => {
            let seen = rest
                .iter()
                .map(|&tat| Seen {
                    old: tat,
                    new: tat,
                    ahead_us: Some(tat - now),
                })
                .collect();
            Some((false, *wait, seen))
        }
        _ => None,
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &self.is_cluster())
            .field("timeout", &self.inner.timeout)
            .field("policy", &self.inner.policy)
            .field("prefix", &self.inner.prefix)
            .field("local_check", &self.inner.local_check)
            .finish_non_exhaustive()
    }
}

impl RedisStoreBuilder {
    fn new(target: Target) -> Self {
        RedisStoreBuilder {
            target,
            timeout: Duration::from_millis(50),
            policy: FaultPolicy::FailClosed,
            prefix: "atscale:rl:".to_owned(),
            hash_tag: "global".to_owned(),
            local_check: false,
        }
    }

    /// The longest any call to Redis may take (50 ms by default), within
    /// each request's own deadline; past it the [`FaultPolicy`] decides.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What a request gets when Redis cannot be asked
    /// ([`FaultPolicy::FailClosed`] by default).
    pub fn fault_policy(mut self, policy: FaultPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The prefix of every key the store writes (`atscale:rl:` by default).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Whether the buckets this store makes (with [`RedisStore::limiter`])
    /// are pre-checked in process before asking Redis (off by default).
    ///
    /// Each such bucket remembers the latest state Redis reported for it; a
    /// request that this process already knows cannot be admitted within
    /// its allowed wait is refused at once, with a retry-after, without a
    /// round trip. What is remembered is a lower bound of the bucket's
    /// state (taken at the instant the script was sent), so the pre-check
    /// only refuses what Redis would refuse, with two exceptions where it is
    /// more strict than Redis until the remembered state runs out (at most
    /// burst × interval plus the longest wait granted): reservations given
    /// back by *other* processes, and bucket state that Redis lost (a
    /// restart without persistence, an eviction, a flush). Its retry-after
    /// is a lower bound of Redis's. Keyed buckets are not pre-checked.
    pub fn local_check(mut self, enabled: bool) -> Self {
        self.local_check = enabled;
        self
    }

    /// The hash tag of the buckets made by [`RedisStore::limiter`] on a
    /// cluster (`global` by default): their keys are
    /// `<prefix>{<tag>}:<name>`, all in the slot of the tag, so that the
    /// named limits of one request are reserved by one atomic script. Give
    /// each group of limits that is never taken together a tag of its own
    /// ([`RedisStore::limiter_in`]) to spread them over the nodes. Ignored
    /// on one server.
    pub fn hash_tag(mut self, tag: impl Into<String>) -> Self {
        self.hash_tag = tag.into();
        self
    }

    /// The store. It connects on first use, and reconnects on its own
    /// after Redis went away: on one server through redis's
    /// `ConnectionManager` (every request multiplexed on one connection),
    /// on a cluster through redis's cluster client (one multiplexed
    /// connection per node, the slot map refreshed on `MOVED` and when a
    /// node cannot be reached). Call it inside a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] for a URL redis cannot parse, no cluster node, a
    /// zero timeout, a hash tag or (on a cluster) a prefix with a brace,
    /// or no tokio runtime to run the connection on.
    pub fn build(self) -> Result<RedisStore, InvalidConfig> {
        if self.timeout.is_zero() {
            return Err(InvalidConfig::new("the timeout must not be zero"));
        }
        check_tag(&self.hash_tag)?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(InvalidConfig::new(
                "build the store inside a tokio runtime: its connection runs on it",
            ));
        }
        // Each call is bounded by `timeout` here; the connection's own
        // response timeout is longer, so that an answer arriving after its
        // caller gave up is still read, and its reservation given back.
        let connect = self.timeout.max(Duration::from_millis(100));
        let respond = (self.timeout * 10).max(Duration::from_secs(1));
        let conn = match self.target {
            Target::Single(info) => {
                let info = info
                    .map_err(|e| InvalidConfig::with_source("the redis URL cannot be parsed", e))?;
                let client = redis::Client::open(info).map_err(|e| {
                    InvalidConfig::with_source("the redis client cannot be made", e)
                })?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(connect))
                    .set_response_timeout(Some(respond))
                    .set_number_of_retries(2)
                    .set_min_delay(Duration::from_millis(10))
                    .set_max_delay(Duration::from_millis(200));
                let conn =
                    ConnectionManager::new_lazy_with_config(client, config).map_err(|e| {
                        InvalidConfig::with_source("the redis connection cannot be made", e)
                    })?;
                Conn::Single(conn)
            }
            Target::Cluster(nodes) => {
                let nodes = nodes.map_err(|e| {
                    InvalidConfig::with_source("a redis cluster node URL cannot be parsed", e)
                })?;
                if nodes.is_empty() {
                    return Err(InvalidConfig::new(
                        "a redis cluster store needs at least one node URL",
                    ));
                }
                if self.prefix.contains(['{', '}']) {
                    return Err(InvalidConfig::new(format!(
                        "prefix: {:?} has a brace, which would be taken for the hash tag \
                         of every key on a cluster",
                        self.prefix
                    )));
                }
                // No retries inside the client: it would resend a script
                // after a dropped connection or a response timeout, when
                // it may have run. The store resends only what provably
                // did not run (see cluster.rs).
                let client = ClusterClientBuilder::new(nodes)
                    .retries(0)
                    .connection_timeout(connect)
                    .response_timeout(respond)
                    .build()
                    .map_err(|e| {
                        InvalidConfig::with_source("the redis cluster client cannot be made", e)
                    })?;
                let config = ClusterConfig::new()
                    .set_connection_timeout(connect)
                    .set_response_timeout(respond);
                Conn::Cluster(client.get_pending_async_connection_with_config(config))
            }
        };
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn,
                timeout: self.timeout,
                policy: self.policy,
                prefix: self.prefix,
                hash_tag: self.hash_tag,
                local_check: self.local_check,
                counters: Counters::default(),
                healthy: AtomicBool::new(true),
            }),
        })
    }
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("cluster", &matches!(self.target, Target::Cluster(_)))
            .field("timeout", &self.timeout)
            .field("policy", &self.policy)
            .field("prefix", &self.prefix)
            .field("hash_tag", &self.hash_tag)
            .field("local_check", &self.local_check)
            .finish_non_exhaustive()
    }
}

/// What a Redis reservation recorded in each bucket: given back by the
/// refund script when its waiter leaves before admission.
pub struct RedisReceipt {
    parts: Box<[(RedisLimiter, i64, i64)]>,
}

impl fmt::Debug for RedisReceipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisReceipt")
            .field("buckets", &self.parts.len())
            .finish()
    }
}

type Answer = Result<Grant<RedisReceipt>, Refusal>;

/// The future of [`RedisStore`]'s [`Store::acquire`]: one round trip,
/// bounded by the store's timeout and the request's deadline.
///
/// The script runs in a task of its own, so that an answer arriving after
/// this future was dropped (or gave up at the timeout) is still read, and a
/// reservation it made given back. That is one allocation and one task per
/// round trip: a few microseconds against the round trip itself (see
/// `benches/README.md`, "Rate limit on Redis").
///
/// # Panics
///
/// When polled outside a tokio runtime (the task needs one).
pub struct Acquire {
    inner: Pin<Box<dyn Future<Output = Answer> + Send>>,
}

impl Future for Acquire {
    type Output = Answer;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Answer> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for Acquire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acquire").finish_non_exhaustive()
    }
}

/// The receiving end of a round trip: if it is dropped (or gives up)
/// while a reservation is on its way, the reservation is given back.
struct Pending {
    rx: oneshot::Receiver<RedisResult<Reply>>,
    store: RedisStore,
    claims: Arc<[(RedisLimiter, u32)]>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.rx.close();
        if let Ok(Ok(reply)) = self.rx.try_recv() {
            give_back(&self.store, &self.claims, &reply);
        }
    }
}

/// Gives back the reservation in `reply` (an answer its caller never
/// read), if it made one.
fn give_back(store: &RedisStore, claims: &[(RedisLimiter, u32)], reply: &Reply) {
    if let Some(receipt) = receipt_of(claims, reply) {
        store.send_refund(receipt);
    }
}

/// The reservation an admitting reply made.
fn receipt_of(claims: &[(RedisLimiter, u32)], reply: &Reply) -> Option<RedisReceipt> {
    if !reply.admitted || reply.buckets.len() != claims.len() {
        return None;
    }
    let parts = claims
        .iter()
        .zip(reply.buckets.iter())
        .map(|((b, _), seen)| (b.clone(), seen.old, seen.new))
        .collect();
    Some(RedisReceipt { parts })
}

impl RedisStore {
    fn round_trip(
        &self,
        claims: &Claims<'_, RedisLimiter>,
        max_wait: Duration,
        cx: Option<&Context>,
    ) -> Acquire {
        let store = self.clone();
        let owned: Arc<[(RedisLimiter, u32)]> =
            claims.iter().map(|(b, c)| (b.clone(), c)).collect();
        let deadline = cx.and_then(Context::deadline);
        let cancelled = cx.map(|cx| cx.token().clone());
        let max_wait_us = if max_wait == Duration::MAX {
            -1
        } else {
            i64::try_from(max_wait.as_micros()).unwrap_or(i64::MAX)
        };
        Acquire {
            inner: Box::pin(async move {
                let start = Instant::now();
                let mut bound = start + store.inner.timeout;
                let by_deadline = deadline.is_some_and(|d| d.instant() < bound);
                if let Some(d) = deadline.filter(|_| by_deadline) {
                    bound = d.instant();
                    if d.is_expired_at(start) {
                        // Nothing to ask Redis for: the request is over.
                        bump(&store.inner.counters.deadline_exceeded);
                        let err = DeadlineExceeded::at(d, start);
                        return Err(Refusal::Store(Box::new(err)));
                    }
                }
                let (tx, rx) = oneshot::channel();
                let sent = local_now();
                let mut pending = Pending {
                    rx,
                    store: store.clone(),
                    claims: owned.clone(),
                };
                let task_store = store.clone();
                let task_claims = owned;
                tokio::spawn(async move {
                    let tx = tx;
                    let reply = {
                        let alive = || !tx.is_closed();
                        task_store.admit(&task_claims, max_wait_us, &alive).await
                    };
                    if let Err(Ok(reply)) = tx.send(reply) {
                        // The caller is gone: give its reservation back.
                        give_back(&task_store, &task_claims, &reply);
                    }
                });
                let cancel = async {
                    match &cancelled {
                        Some(token) => token.cancelled().await,
                        None => std::future::pending().await,
                    }
                };
                let outcome = tokio::select! {
                    biased;
                    reply = &mut pending.rx => Some(reply),
                    () = tokio::time::sleep_until(bound) => None,
                    () = cancel => {
                        return Err(Refusal::Store(Box::new(Cancelled::new())));
                    }
                };
                match outcome {
                    Some(Ok(Ok(reply))) => store.reply(&pending.claims, &reply, sent),
                    Some(Ok(Err(e))) => store.fault(format!("redis: {e}"), false),
                    Some(Err(_)) => store.fault("the redis call was lost".to_owned(), false),
                    None if by_deadline => {
                        bump(&store.inner.counters.deadline_exceeded);
                        let d = deadline.expect("bound by the deadline");
                        let err = DeadlineExceeded::at(d, Instant::now());
                        Err(Refusal::Store(Box::new(err)))
                    }
                    None => store.fault(
                        format!("redis did not answer within {:?}", store.inner.timeout),
                        true,
                    ),
                }
            }),
        }
    }
}

impl Store for RedisStore {
    type Bucket = RedisLimiter;
    type Receipt = RedisReceipt;
    type Acquire = Acquire;

    fn acquire(&self, claims: &Claims<'_, RedisLimiter>, max_wait: Duration) -> Acquire {
        self.acquire_within(claims, max_wait, Context::current().as_ref())
    }

    fn acquire_within(
        &self,
        claims: &Claims<'_, RedisLimiter>,
        max_wait: Duration,
        cx: Option<&Context>,
    ) -> Acquire {
        if let Some(answer) = self.check_locally(claims, max_wait) {
            return Acquire {
                inner: Box::pin(std::future::ready(answer)),
            };
        }
        self.round_trip(claims, max_wait, cx)
    }

    fn try_acquire_now(
        &self,
        claims: &Claims<'_, RedisLimiter>,
        max_wait: Duration,
    ) -> Option<Answer> {
        self.check_locally(claims, max_wait)
    }

    fn refund(&self, receipt: RedisReceipt) {
        self.send_refund(receipt);
    }

    fn validate(
        &self,
        buckets: &[RedisLimiter],
        fixed_cost: Option<u32>,
    ) -> Result<(), InvalidLimit> {
        if buckets.len() > MAX_LIMITS {
            return Err(Reason::TooManyLimiters.into());
        }
        for (i, a) in buckets.iter().enumerate() {
            if buckets[..i].iter().any(|b| b.key() == a.key()) {
                return Err(Reason::DuplicateLimiter.into());
            }
        }
        if self.is_cluster() && buckets.iter().any(|b| b.slot() != buckets[0].slot()) {
            let keys: Vec<&str> = buckets.iter().map(RedisLimiter::key).collect();
            tracing::warn!(
                ?keys,
                "rate limit on Redis Cluster: these buckets live in different hash slots, so \
                 each request is admitted in one step per slot (not atomic: a refusal by a \
                 later step gives the earlier ones back); make them with one hash tag \
                 (RedisStore::limiter, or limiter_in with one tag) to keep one atomic script"
            );
        }
        let burst = buckets.iter().map(RedisLimiter::burst).min();
        match (fixed_cost, burst) {
            (Some(cost), Some(burst)) if cost > burst => {
                Err(Reason::CostExceedsBurst { cost, burst }.into())
            }
            _ => Ok(()),
        }
    }
}
