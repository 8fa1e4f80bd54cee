//! Keyed limits: one bucket per client, tenant or API key, in bounded memory.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use atscale_core::{BoxError, Overloaded};
use http::HeaderName;

use crate::error::{InvalidLimit, MissingKey, Reason};
use crate::limit::Limit;
use crate::limiter::Limiter;
use crate::metrics;
use atscale_core::Clock;

const SHARDS: usize = 16;

type Quota<K> = Arc<dyn Fn(&K) -> Limit + Send + Sync>;

/// A limiter per key (client address, API key, tenant), created on first
/// use, in bounded memory.
///
/// Each key gets its own bucket with the default [`Limit`], or the limit the
/// [`KeyedLimiterBuilder::quota`] function gives it (a paying tenant gets
/// more). Clones share the table.
///
/// # Memory bound
///
/// The table holds at most [`KeyedLimiterBuilder::max_keys`] keys (100 000 by
/// default), in 16 shards of an equal share each (one shard below 1024
/// keys). A key's structures take about 350 bytes besides the key itself
/// (its bucket keeps its state word on a cache line of its own); resident,
/// with the system allocator's cost of those aligned allocations, about
/// 490 bytes with an IP address as the key (measured by
/// `tests/reliability_flood.rs`), so the default cap is about 50 MB. A key is only ever dropped when its bucket is in the state of a
/// fresh one (full, no reservation pending, and no request holding it), so
/// eviction can never hand a busy key a fresh, full bucket: a client cannot
/// reset its own limit by making the table forget it.
///
/// When a new key arrives at a full shard, the shard is swept for such keys.
/// If none can be dropped, the request fails at once with
/// [`Overloaded`](atscale_core::Overloaded) (503), and no new key is admitted
/// to that shard until the time at which an eighth of its keys will have
/// refilled (so a flood of busy keys costs one sweep per eighth of a shard,
/// not one per request). Known keys are served as usual throughout. A
/// bucket refills within its burst × interval (plus any wait it granted), so
/// a flood has to keep every key busy to keep new keys out.
/// [`KeyedLimiter::evict_idle`] sweeps on demand (say, from a timer).
///
/// ```
/// use atscale_ratelimit::{KeyedLimiter, Limit};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let per_tenant = KeyedLimiter::builder(Limit::per_second(10)?)
///     .quota(|tenant: &String| {
///         let paying = tenant.starts_with("paid-");
///         Limit::per_second(if paying { 100 } else { 10 }).expect("valid")
///     })
///     .max_keys(10_000)
///     .build()?;
/// let bucket = per_tenant.get("paid-acme".to_owned())?;
/// assert_eq!(bucket.limit().rate(), 100);
/// assert_eq!(per_tenant.len(), 1);
/// # Ok(())
/// # }
/// ```
pub struct KeyedLimiter<K> {
    inner: Arc<KeyedInner<K>>,
}

struct KeyedInner<K> {
    shards: Box<[Mutex<Shard<K>>]>,
    hasher: RandomState,
    default: Limit,
    quota: Option<Quota<K>>,
    clock: Clock,
    max_keys: usize,
}

struct Shard<K> {
    map: HashMap<K, Limiter>,
    cap: usize,
    /// No sweep before this instant (nanoseconds on the clock).
    next_sweep: u64,
}

impl<K> Drop for Shard<K> {
    fn drop(&mut self) {
        metrics::keys_removed(self.map.len());
    }
}

impl<K> Clone for KeyedLimiter<K> {
    fn clone(&self) -> Self {
        KeyedLimiter {
            inner: self.inner.clone(),
        }
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> KeyedLimiter<K> {
    /// A table giving each key `limit`, on the default clock, for up to 100 000 keys.
    pub fn new(limit: Limit) -> KeyedLimiter<K> {
        KeyedLimiter::builder(limit)
            .build()
            .expect("the default configuration is valid")
    }

    /// A builder for a table whose keys get `limit` unless a quota says otherwise.
    pub fn builder(limit: Limit) -> KeyedLimiterBuilder<K> {
        KeyedLimiterBuilder {
            default: limit,
            quota: None,
            clock: None,
            max_keys: 100_000,
        }
    }

    /// The bucket of `key`, created if new.
    ///
    /// # Errors
    ///
    /// [`Overloaded`](atscale_core::Overloaded) when `key` is new and its
    /// shard of the table is full of busy keys (see the type docs).
    pub fn get(&self, key: K) -> Result<Limiter, Overloaded> {
        let inner = &*self.inner;
        let shard = &inner.shards[inner.hasher.hash_one(&key) as usize % inner.shards.len()];
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(limiter) = shard.map.get(&key) {
            return Ok(limiter.clone());
        }
        if shard.map.len() >= shard.cap {
            let now = inner.clock.now_nanos();
            if now >= shard.next_sweep {
                shard.sweep(now);
            }
            if shard.map.len() >= shard.cap {
                metrics::refused(metrics::Refused::KeyTableFull);
                return Err(Overloaded::new());
            }
        }
        let limit = inner.quota.as_ref().map_or(inner.default, |q| q(&key));
        let limiter = Limiter::with_clock(limit, inner.clock.clone());
        shard.map.insert(key, limiter.clone());
        metrics::keys_added(1);
        Ok(limiter)
    }

    /// Drops every key whose bucket is as good as fresh; returns how many.
    pub fn evict_idle(&self) -> usize {
        let now = self.inner.clock.now_nanos();
        self.inner
            .shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).sweep(now))
            .sum()
    }

    /// How many keys the table holds now.
    pub fn len(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).map.len())
            .sum()
    }

    /// Whether the table holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most keys the table will hold.
    pub fn max_keys(&self) -> usize {
        self.inner.max_keys
    }

    /// The clock the table's buckets run on.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }
}

impl<K: Hash + Eq> Shard<K> {
    /// Drops the keys whose buckets are fresh and unshared; if that frees
    /// less than an eighth of the shard, holds off new keys until an eighth
    /// of them will have refilled.
    fn sweep(&mut self, now: u64) -> usize {
        let before = self.map.len();
        self.map
            .retain(|_, l| !(l.is_unshared() && l.bucket().is_fresh(now)));
        let freed = before - self.map.len();
        metrics::keys_removed(freed);
        self.next_sweep = if freed >= self.cap.div_ceil(8) || self.map.is_empty() {
            0
        } else {
            let mut times: Vec<u64> = self
                .map
                .values()
                .map(|l| l.bucket().fresh_at(now))
                .collect();
            let nth = (self.cap.div_ceil(8) - freed).min(times.len()) - 1;
            let (_, t, _) = times.select_nth_unstable(nth);
            (*t).max(now + 1)
        };
        freed
    }
}

impl<K> fmt::Debug for KeyedLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedLimiter")
            .field("default", &self.inner.default)
            .field("max_keys", &self.inner.max_keys)
            .field("clock", &self.inner.clock)
            .finish_non_exhaustive()
    }
}

/// Builds a [`KeyedLimiter`].
#[must_use]
pub struct KeyedLimiterBuilder<K> {
    default: Limit,
    quota: Option<Quota<K>>,
    clock: Option<Clock>,
    max_keys: usize,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> KeyedLimiterBuilder<K> {
    /// The limit of each key, computed once when the key is first seen
    /// (instead of the default limit).
    pub fn quota(mut self, quota: impl Fn(&K) -> Limit + Send + Sync + 'static) -> Self {
        self.quota = Some(Arc::new(quota));
        self
    }

    /// The most keys the table holds (100 000 by default); see the memory
    /// bound on [`KeyedLimiter`].
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// The clock of the table's buckets (the default clock otherwise).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The table.
    ///
    /// # Errors
    ///
    /// [`InvalidLimit`] for a capacity of zero keys.
    pub fn build(self) -> Result<KeyedLimiter<K>, InvalidLimit> {
        if self.max_keys == 0 {
            return Err(InvalidLimit::new(Reason::ZeroKeys));
        }
        let n = if self.max_keys >= 1024 { SHARDS } else { 1 };
        let shards = (0..n)
            .map(|i| {
                let cap = self.max_keys / n + usize::from(i < self.max_keys % n);
                Mutex::new(Shard {
                    map: HashMap::new(),
                    cap,
                    next_sweep: 0,
                })
            })
            .collect();
        Ok(KeyedLimiter {
            inner: Arc::new(KeyedInner {
                shards,
                hasher: RandomState::new(),
                default: self.default,
                quota: self.quota,
                clock: self.clock.unwrap_or_default(),
                max_keys: self.max_keys,
            }),
        })
    }
}

impl<K> fmt::Debug for KeyedLimiterBuilder<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedLimiterBuilder")
            .field("default", &self.default)
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

/// How to find a request's key.
pub trait RequestKey<Req>: Clone + Send + Sync + 'static {
    /// The key type.
    type Key: Hash + Eq + Clone + Send + Sync + 'static;

    /// The request's key, or `None` when it has none (the request then fails
    /// with [`MissingKey`]).
    fn key(&self, req: &Req) -> Option<Self::Key>;
}

/// A [`RequestKey`] from a closure (see [`key_fn`]).
pub struct KeyFn<F, K> {
    f: F,
    _key: PhantomData<fn() -> K>,
}

/// A [`RequestKey`] computed by `f`.
///
/// ```
/// use atscale_ratelimit::key_fn;
///
/// let by_tenant = key_fn(|req: &http::Request<()>| {
///     req.headers().get("x-tenant")?.to_str().ok().map(str::to_owned)
/// });
/// # let _ = by_tenant;
/// ```
pub fn key_fn<F, Req, K>(f: F) -> KeyFn<F, K>
where
    F: Fn(&Req) -> Option<K>,
{
    KeyFn {
        f,
        _key: PhantomData,
    }
}

impl<F: Clone, K> Clone for KeyFn<F, K> {
    fn clone(&self) -> Self {
        KeyFn {
            f: self.f.clone(),
            _key: PhantomData,
        }
    }
}

impl<F, K> fmt::Debug for KeyFn<F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFn").finish_non_exhaustive()
    }
}

impl<F, Req, K> RequestKey<Req> for KeyFn<F, K>
where
    F: Fn(&Req) -> Option<K> + Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Key = K;

    fn key(&self, req: &Req) -> Option<K> {
        (self.f)(req)
    }
}

/// The client's IP address as the key of an HTTP request: the peer address
/// of the connection, never a header unless you trust one.
///
/// The peer address is read from the request's extensions: axum's
/// `ConnectInfo<SocketAddr>` (with the `axum` feature; serve with
/// `into_make_service_with_connect_info::<SocketAddr>()`), or a plain
/// `SocketAddr`. The port is dropped: a client opens many connections.
///
/// Behind a reverse proxy every request comes from the proxy; then, and only
/// then, use [`PeerIp::trusting_header`]: the rightmost address in that
/// header is the one your proxy saw (earlier entries are whatever the client
/// wrote, and forgeable).
#[derive(Clone, Debug, Default)]
pub struct PeerIp {
    header: Option<HeaderName>,
}

impl PeerIp {
    /// The peer address of the connection.
    pub const fn new() -> Self {
        PeerIp { header: None }
    }

    /// The rightmost IP address in `header` (such as `x-forwarded-for`, as set
    /// by *your* proxy), falling back to the peer address when the header is
    /// missing or unparsable.
    pub fn trusting_header(header: HeaderName) -> Self {
        PeerIp {
            header: Some(header),
        }
    }

    fn peer<B>(req: &http::Request<B>) -> Option<IpAddr> {
        #[cfg(feature = "axum")]
        if let Some(info) = req
            .extensions()
            .get::<axum::extract::ConnectInfo<SocketAddr>>()
        {
            return Some(info.0.ip());
        }
        req.extensions().get::<SocketAddr>().map(SocketAddr::ip)
    }
}

impl<B> RequestKey<http::Request<B>> for PeerIp {
    type Key = IpAddr;

    fn key(&self, req: &http::Request<B>) -> Option<IpAddr> {
        if let Some(name) = &self.header {
            // Only the last entry of the last line: when that one is not
            // readable, an entry further left (written by the client) must
            // not take its place.
            let forwarded = req
                .headers()
                .get_all(name)
                .iter()
                .next_back()
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit(',').next())
                .and_then(|ip| ip.trim().parse().ok());
            if forwarded.is_some() {
                return forwarded;
            }
        }
        PeerIp::peer(req)
    }
}

/// The per-request bucket of a layer, if it has keyed limits: implemented by
/// [`NoKey`] and [`ByKey`].
pub trait KeyPart<Req, B>: KeyCheck<B> {
    /// The request's bucket (`None` when the layer has no keyed limit).
    ///
    /// # Errors
    ///
    /// [`MissingKey`] or [`Overloaded`](atscale_core::Overloaded).
    fn bucket(&self, req: &Req) -> Result<Option<B>, BoxError>;
}

/// The request-independent part of a [`KeyPart`], checked when a layer is built.
pub trait KeyCheck<B>: Clone + Send + Sync + 'static {
    /// Checks the keyed part against the layer's other buckets and its fixed
    /// cost, if any.
    ///
    /// # Errors
    ///
    /// [`InvalidLimit`] for a clock other than the other buckets', or a fixed
    /// cost above the default burst.
    fn check(&self, others: &[B], fixed_cost: Option<u32>) -> Result<(), InvalidLimit>;

    /// Whether there is a keyed limit.
    fn is_keyed(&self) -> bool;
}

/// No keyed limit.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoKey;

impl<Req, B> KeyPart<Req, B> for NoKey {
    #[inline]
    fn bucket(&self, _: &Req) -> Result<Option<B>, BoxError> {
        Ok(None)
    }
}

impl<B> KeyCheck<B> for NoKey {
    fn check(&self, _: &[B], _: Option<u32>) -> Result<(), InvalidLimit> {
        Ok(())
    }

    fn is_keyed(&self) -> bool {
        false
    }
}

/// A keyed limit: the key extractor `R` and the table of buckets.
#[derive(Clone, Debug)]
pub struct ByKey<R, K> {
    key: R,
    limiter: KeyedLimiter<K>,
}

impl<R, K> ByKey<R, K> {
    pub(crate) fn new(key: R, limiter: KeyedLimiter<K>) -> Self {
        ByKey { key, limiter }
    }
}

impl<Req, R, K> KeyPart<Req, Limiter> for ByKey<R, K>
where
    R: RequestKey<Req, Key = K>,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    fn bucket(&self, req: &Req) -> Result<Option<Limiter>, BoxError> {
        let key = self.key.key(req).ok_or_else(MissingKey::new)?;
        Ok(Some(self.limiter.get(key)?))
    }
}

impl<R, K> KeyCheck<Limiter> for ByKey<R, K>
where
    R: Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    fn check(&self, others: &[Limiter], fixed_cost: Option<u32>) -> Result<(), InvalidLimit> {
        if others
            .first()
            .is_some_and(|o| o.clock().id() != self.limiter.clock().id())
        {
            return Err(InvalidLimit::new(Reason::MixedClocks));
        }
        let burst = self.limiter.inner.default.max_burst();
        match fixed_cost {
            Some(cost) if cost > burst => {
                Err(InvalidLimit::new(Reason::CostExceedsBurst { cost, burst }))
            }
            _ => Ok(()),
        }
    }

    fn is_keyed(&self) -> bool {
        true
    }
}
