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
use redis::{IntoConnectionInfo, RedisResult};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::{InvalidConfig, StoreUnavailable};
use crate::limiter::{RedisKeyedLimiter, RedisLimiter, local_now};
use crate::script::{ACQUIRE, REFUND, cancelled_key};

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
    /// Scripts sent to Redis to reserve (one per admission asked of Redis).
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
    conn: ConnectionManager,
    timeout: Duration,
    policy: FaultPolicy,
    prefix: String,
    local_check: bool,
    counters: Counters,
    healthy: AtomicBool,
}

/// Builds a [`RedisStore`] (see [`RedisStore::builder`]).
#[must_use]
pub struct RedisStoreBuilder {
    url: Result<redis::ConnectionInfo, redis::RedisError>,
    timeout: Duration,
    policy: FaultPolicy,
    prefix: String,
    local_check: bool,
}

impl RedisStore {
    /// A builder for a store on the Redis server at `url`
    /// (`redis://127.0.0.1:6379/0`, or anything else
    /// [`IntoConnectionInfo`] takes).
    pub fn builder(url: impl IntoConnectionInfo) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into_connection_info(),
            timeout: Duration::from_millis(50),
            policy: FaultPolicy::FailClosed,
            prefix: "atscale:rl:".to_owned(),
            local_check: false,
        }
    }

    /// A bucket named `name` (kept under the key `<prefix><name>`) with
    /// `limit`. Every process that names the same bucket shares it, and
    /// must give it the same limit.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] for an empty name, or a limit finer than one
    /// microsecond between requests.
    pub fn limiter(&self, name: &str, limit: Limit) -> Result<RedisLimiter, InvalidConfig> {
        if name.is_empty() {
            return Err(InvalidConfig::new("a bucket needs a non-empty name"));
        }
        RedisLimiter::new(
            format!("{}{name}", self.inner.prefix),
            limit,
            self.inner.local_check,
        )
    }

    /// A table of buckets, one per key, named `<prefix><name>:<key>`, each
    /// with `limit` unless [`RedisKeyedLimiter::quota`] says otherwise.
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
        RedisKeyedLimiter::new(format!("{}{name}", self.inner.prefix), limit)
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
                Ok(Grant::new(Duration::ZERO, None))
            }
            FaultPolicy::FailClosed => {
                bump(&c.failed_closed);
                Err(Refusal::Store(Box::new(StoreUnavailable::new(cause))))
            }
        }
    }

    fn answered(&self) {
        if !self.inner.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!("rate-limit store reachable again");
        }
    }

    /// Turns the script's reply into an answer; `sent` is the local instant
    /// the script was sent at.
    fn reply(
        &self,
        claims: &[(RedisLimiter, u32)],
        reply: &[i64],
        sent: u64,
    ) -> Result<Grant<RedisReceipt>, Refusal> {
        let c = &self.inner.counters;
        let n = claims.len();
        let (status, wait, now) = match reply {
            [s, w, now, ..] if reply.len() == 3 + n * if *s == 1 { 2 } else { 1 } => (*s, *w, *now),
            _ => return self.fault(format!("unexpected script reply {reply:?}"), false),
        };
        self.answered();
        let micros = |us: i64| Duration::from_micros(u64::try_from(us).unwrap_or(0));
        if status == 0 {
            bump(&c.refused);
            for (i, (b, _)) in claims.iter().enumerate() {
                if let Some(m) = b.mirror() {
                    m.learn(sent, micros(reply[3 + i] - now));
                }
            }
            return Err(Refusal::RetryAfter(micros(wait)));
        }
        bump(&c.admitted);
        for (i, (b, _)) in claims.iter().enumerate() {
            if let Some(m) = b.mirror() {
                m.learn(sent, micros(reply[4 + 2 * i] - now));
            }
        }
        if wait == 0 {
            // Admitted now: nothing will ever be given back.
            return Ok(Grant::new(Duration::ZERO, None));
        }
        Ok(Grant::new(micros(wait), receipt_of(claims, reply)))
    }

    /// Sends the refund script for `receipt`, in a task of its own.
    fn send_refund(&self, receipt: RedisReceipt) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::debug!("no tokio runtime to give a rate-limit reservation back on");
            return;
        };
        let store = self.clone();
        runtime.spawn(async move {
            let mut inv = REFUND.prepare_invoke();
            for (b, old, new) in receipt.parts.iter() {
                inv.key(b.key()).key(cancelled_key(b.key()));
                inv.arg(*old).arg(*new);
            }
            let mut conn = store.inner.conn.clone();
            let sent = local_now();
            let reply: RedisResult<Vec<i64>> = inv.invoke_async(&mut conn).await;
            match reply {
                Ok(reply) if reply.len() == 1 + receipt.parts.len() => {
                    bump(&store.inner.counters.refunds);
                    for (i, (b, _, _)) in receipt.parts.iter().enumerate() {
                        if let Some(m) = b.mirror() {
                            let ahead = u64::try_from(reply[1 + i] - reply[0]).unwrap_or(0);
                            m.reset(sent, Duration::from_micros(ahead));
                        }
                    }
                }
                Ok(reply) => tracing::debug!("unexpected refund reply {reply:?}"),
                Err(e) => tracing::debug!("rate-limit refund failed: {e}"),
            }
        });
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("timeout", &self.inner.timeout)
            .field("policy", &self.inner.policy)
            .field("prefix", &self.inner.prefix)
            .field("local_check", &self.inner.local_check)
            .finish_non_exhaustive()
    }
}

impl RedisStoreBuilder {
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

    /// The store. It connects on first use, and reconnects on its own
    /// after Redis went away (through redis's `ConnectionManager`, which
    /// multiplexes every request on one connection). Call it inside a
    /// tokio runtime.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] for a URL redis cannot parse, a zero timeout, or
    /// no tokio runtime to run the connection on.
    pub fn build(self) -> Result<RedisStore, InvalidConfig> {
        let info = self
            .url
            .map_err(|e| InvalidConfig::with_source("the redis URL cannot be parsed", e))?;
        if self.timeout.is_zero() {
            return Err(InvalidConfig::new("the timeout must not be zero"));
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(InvalidConfig::new(
                "build the store inside a tokio runtime: its connection runs on it",
            ));
        }
        let client = redis::Client::open(info)
            .map_err(|e| InvalidConfig::with_source("the redis client cannot be made", e))?;
        // Each call is bounded by `timeout` here; the connection's own
        // response timeout is longer, so that an answer arriving after its
        // caller gave up is still read, and its reservation given back.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout.max(Duration::from_millis(100))))
            .set_response_timeout(Some((self.timeout * 10).max(Duration::from_secs(1))))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| InvalidConfig::with_source("the redis connection cannot be made", e))?;
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn,
                timeout: self.timeout,
                policy: self.policy,
                prefix: self.prefix,
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
            .field("timeout", &self.timeout)
            .field("policy", &self.policy)
            .field("prefix", &self.prefix)
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
    rx: oneshot::Receiver<RedisResult<Vec<i64>>>,
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
fn give_back(store: &RedisStore, claims: &[(RedisLimiter, u32)], reply: &[i64]) {
    if let Some(receipt) = receipt_of(claims, reply) {
        store.send_refund(receipt);
    }
}

/// The reservation an admitting reply made.
fn receipt_of(claims: &[(RedisLimiter, u32)], reply: &[i64]) -> Option<RedisReceipt> {
    if reply.first() != Some(&1) || reply.len() != 3 + 2 * claims.len() {
        return None;
    }
    let parts = claims
        .iter()
        .enumerate()
        .map(|(i, (b, _))| (b.clone(), reply[3 + 2 * i], reply[4 + 2 * i]))
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
                bump(&store.inner.counters.round_trips);
                let task_store = store.clone();
                let task_claims = owned;
                tokio::spawn(async move {
                    let mut inv = ACQUIRE.prepare_invoke();
                    inv.arg(max_wait_us);
                    for (b, cost) in task_claims.iter() {
                        let t = b.interval_micros();
                        inv.key(b.key())
                            .arg(u64::from(*cost) * t)
                            .arg(u64::from(b.burst()) * t);
                    }
                    let mut conn = task_store.inner.conn.clone();
                    let reply = inv.invoke_async(&mut conn).await;
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
        let burst = buckets.iter().map(RedisLimiter::burst).min();
        match (fixed_cost, burst) {
            (Some(cost), Some(burst)) if cost > burst => {
                Err(Reason::CostExceedsBurst { cost, burst }.into())
            }
            _ => Ok(()),
        }
    }
}
