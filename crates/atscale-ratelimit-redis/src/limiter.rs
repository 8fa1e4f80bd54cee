//! Buckets on Redis: named limiters, and keyed tables of them.

use std::fmt;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use atscale_core::BoxError;
use atscale_ratelimit::{InvalidLimit, KeyCheck, KeyPart, Limit, MissingKey, Reason, RequestKey};

use crate::error::InvalidConfig;

/// A handle to one rate-limit bucket kept in Redis, under one key.
///
/// Made by [`RedisStore::limiter`](crate::RedisStore::limiter); every
/// limiter of every process that names the same key with the same limit
/// shares the bucket. Clones share it too. Add it to a layer with
/// [`RateLimitBuilder::with_store`](atscale_ratelimit::RateLimitBuilder::with_store)
/// and [`.limiter(..)`](atscale_ratelimit::RateLimitBuilder::limiter).
///
/// Redis keeps time in microseconds: the limit's interval is rounded *up*
/// to whole microseconds (so the limit never admits more than it says), and
/// limits finer than one microsecond between requests are refused.
#[derive(Clone)]
pub struct RedisLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    key: String,
    slot: u16,
    limit: Limit,
    interval_us: u64,
    /// What this process last learnt of the bucket (the local pre-check).
    mirror: Option<Mirror>,
}

impl RedisLimiter {
    pub(crate) fn new(key: String, limit: Limit, local_check: bool) -> Result<Self, InvalidConfig> {
        if key.is_empty() {
            return Err(InvalidConfig::new("a bucket needs a non-empty key"));
        }
        let interval_us = interval_us(&limit)?;
        Ok(RedisLimiter {
            inner: Arc::new(Inner {
                slot: crate::cluster::slot(&key),
                key,
                limit,
                interval_us,
                mirror: local_check.then(Mirror::default),
            }),
        })
    }

    /// The Redis key of the bucket.
    pub fn key(&self) -> &str {
        &self.inner.key
    }

    /// The Redis Cluster hash slot of the bucket's key (`CLUSTER KEYSLOT`).
    ///
    /// One admission is one atomic script when all its buckets share a
    /// slot; see the [crate docs](crate#redis-cluster) for how keys are
    /// tagged to make them.
    pub fn slot(&self) -> u16 {
        self.inner.slot
    }

    /// The limit the bucket enforces.
    pub fn limit(&self) -> Limit {
        self.inner.limit
    }

    /// The interval between two units of cost, as Redis applies it (the
    /// limit's interval rounded up to whole microseconds).
    pub fn interval(&self) -> Duration {
        Duration::from_micros(self.inner.interval_us)
    }

    /// Whether requests to this bucket are pre-checked locally.
    pub fn has_local_check(&self) -> bool {
        self.inner.mirror.is_some()
    }

    pub(crate) fn interval_micros(&self) -> u64 {
        self.inner.interval_us
    }

    pub(crate) fn burst(&self) -> u32 {
        self.inner.limit.max_burst()
    }

    pub(crate) fn mirror(&self) -> Option<&Mirror> {
        self.inner.mirror.as_ref()
    }
}

impl fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("key", &self.inner.key)
            .field("slot", &self.inner.slot)
            .field("limit", &self.inner.limit)
            .field("local_check", &self.inner.mirror.is_some())
            .finish()
    }
}

fn interval_us(limit: &Limit) -> Result<u64, InvalidConfig> {
    let nanos = limit.interval().as_nanos();
    if nanos < 1_000 {
        return Err(InvalidConfig::new(format!(
            "{limit:?} leaves {nanos}ns between requests; Redis keeps time in \
             microseconds, so at most 1 000 000 per second"
        )));
    }
    let us = nanos.div_ceil(1_000);
    // capacity below 2^51 µs keeps every TAT exact in Lua's doubles
    if us * u128::from(limit.max_burst()) > 1 << 51 {
        return Err(InvalidConfig::new(format!(
            "{limit:?}: burst × interval is too large for Redis time"
        )));
    }
    Ok(us as u64)
}

/// The local pre-check of one bucket: the latest TAT this process learnt
/// from Redis, translated to the local monotonic clock (nanoseconds since
/// [`local_now`]'s epoch). A lower bound of the bucket's true TAT, short of
/// refunds by other processes and of state Redis lost.
#[derive(Debug, Default)]
pub(crate) struct Mirror {
    tat: AtomicU64,
}

impl Mirror {
    /// Learns that the bucket's TAT was `ahead` after the local instant `at`.
    pub(crate) fn learn(&self, at: u64, ahead: Duration) {
        let tat = at.saturating_add(u64::try_from(ahead.as_nanos()).unwrap_or(u64::MAX));
        self.tat.fetch_max(tat, Ordering::Relaxed);
    }

    /// Replaces what was known (after a refund moved the TAT back).
    pub(crate) fn reset(&self, at: u64, ahead: Duration) {
        let tat = at.saturating_add(u64::try_from(ahead.as_nanos()).unwrap_or(u64::MAX));
        self.tat.store(tat, Ordering::Relaxed);
    }

    /// How long, as far as this process knows, until `increment` fits in a
    /// bucket of `capacity` (nanoseconds), at the local instant `now`.
    pub(crate) fn wait(&self, now: u64, increment: u64, capacity: u64) -> u64 {
        let tat = self.tat.load(Ordering::Relaxed);
        (tat.max(now) + increment)
            .saturating_sub(capacity)
            .saturating_sub(now)
    }
}

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds on the local monotonic clock (for the pre-check).
pub(crate) fn local_now() -> u64 {
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

type Quota<K> = Arc<dyn Fn(&K) -> Limit + Send + Sync>;

/// How a keyed table names its buckets.
#[derive(Clone, Debug)]
pub(crate) enum Layout {
    /// One server: `<prefix><name>:<key>`.
    Plain { base: Arc<str> },
    /// A cluster, each key in a slot of its own: `<prefix>{k:<hash of
    /// key>}:<name>:<key>`. Every table keyed by the same key puts it in
    /// the same slot.
    PerKey { prefix: Arc<str>, name: Arc<str> },
    /// A cluster, every key under one tag: `<prefix>{<tag>}:<name>:<key>`.
    Tagged {
        prefix: Arc<str>,
        tag: Arc<str>,
        name: Arc<str>,
    },
}

impl Layout {
    fn key(&self, key: &dyn fmt::Display) -> String {
        match self {
            Layout::Plain { base } => format!("{base}:{key}"),
            Layout::PerKey { prefix, name } => {
                let key = key.to_string();
                format!("{prefix}{{k:{:016x}}}:{name}:{key}", fnv1a(key.as_bytes()))
            }
            Layout::Tagged { prefix, tag, name } => format!("{prefix}{{{tag}}}:{name}:{key}"),
        }
    }

    fn name(&self) -> &str {
        match self {
            Layout::Plain { base } => base,
            Layout::PerKey { name, .. } | Layout::Tagged { name, .. } => name,
        }
    }
}

/// FNV-1a, 64 bits: a key's hash tag (placement only: the key itself is
/// in the bucket's name, so two keys with one hash are still two buckets).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Checks a hash tag: not empty, no braces.
pub(crate) fn check_tag(tag: &str) -> Result<(), InvalidConfig> {
    if tag.is_empty() || tag.contains(['{', '}']) {
        return Err(InvalidConfig::new(format!(
            "hash_tag: {tag:?} cannot be a Redis Cluster hash tag (it must be non-empty, \
             without '{{' or '}}')"
        )));
    }
    Ok(())
}

/// A bucket per key (client address, tenant, API key), kept in Redis under
/// `<name>:<key>`; made by [`RedisStore::keyed`](crate::RedisStore::keyed).
///
/// Nothing is held in process memory per key: a key's bucket is a Redis key
/// that expires when the bucket is full again, so idle keys cost nothing
/// anywhere (the in-memory [`KeyedLimiter`](atscale_ratelimit::KeyedLimiter)
/// needs a bounded table for that). Keys are written with their
/// [`Display`](fmt::Display) form. Keyed buckets are not pre-checked
/// locally.
pub struct RedisKeyedLimiter<K> {
    layout: Layout,
    default: Limit,
    quota: Option<Quota<K>>,
}

impl<K> Clone for RedisKeyedLimiter<K> {
    fn clone(&self) -> Self {
        RedisKeyedLimiter {
            layout: self.layout.clone(),
            default: self.default,
            quota: self.quota.clone(),
        }
    }
}

impl<K: fmt::Display> RedisKeyedLimiter<K> {
    pub(crate) fn new(layout: Layout, default: Limit) -> Result<Self, InvalidConfig> {
        if layout.name().is_empty() {
            return Err(InvalidConfig::new("a keyed limit needs a non-empty name"));
        }
        interval_us(&default)?;
        Ok(RedisKeyedLimiter {
            layout,
            default,
            quota: None,
        })
    }

    /// On Redis Cluster, keeps every key's bucket under the hash tag `tag`
    /// (`<prefix>{<tag>}:<name>:<key>`), in the slot of the named buckets
    /// made with that tag ([`RedisStore::hash_tag`](crate::RedisStore::hash_tag)
    /// for [`RedisStore::limiter`](crate::RedisStore::limiter)): admissions
    /// that also take those named limits stay one atomic script, at the
    /// price of every key of the table living on one node. Without it, each
    /// key has a slot of its own (spread over the cluster), and a request
    /// that also takes named limits is admitted in two steps (see the
    /// [crate docs](crate#redis-cluster)). On one server, tags change
    /// nothing and this is a no-op.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] for an empty tag, or one with a brace.
    pub fn with_tag(mut self, tag: &str) -> Result<Self, InvalidConfig> {
        check_tag(tag)?;
        self.layout = match self.layout {
            Layout::PerKey { prefix, name } | Layout::Tagged { prefix, name, .. } => {
                Layout::Tagged {
                    prefix,
                    tag: tag.into(),
                    name,
                }
            }
            plain @ Layout::Plain { .. } => plain,
        };
        Ok(self)
    }

    /// The same table, giving each key the limit `quota` computes for it
    /// (a paying tenant gets more) instead of the default limit.
    ///
    /// The quota is computed on every request (there is no local table to
    /// remember it in): keep it cheap. All processes must compute the same
    /// limit for a key, or they enforce different limits on one bucket.
    #[must_use]
    pub fn quota(mut self, quota: impl Fn(&K) -> Limit + Send + Sync + 'static) -> Self {
        self.quota = Some(Arc::new(quota));
        self
    }

    /// The bucket of `key`.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] when the quota gives `key` a limit finer than one
    /// microsecond between requests.
    pub fn get(&self, key: &K) -> Result<RedisLimiter, InvalidConfig> {
        let limit = self.quota.as_ref().map_or(self.default, |q| q(key));
        RedisLimiter::new(self.layout.key(key), limit, false)
    }

    /// Applies the table to requests whose key `key` finds: the keyed part
    /// of a layer ([`RateLimitBuilder::key_part`](atscale_ratelimit::RateLimitBuilder::key_part)).
    pub fn by<R>(&self, key: R) -> ByRedisKey<R, K> {
        ByRedisKey {
            key,
            table: self.clone(),
        }
    }

    /// The default limit of a key.
    pub fn default_limit(&self) -> Limit {
        self.default
    }
}

impl<K> fmt::Debug for RedisKeyedLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisKeyedLimiter")
            .field("layout", &self.layout)
            .field("default", &self.default)
            .field("quota", &self.quota.is_some())
            .finish()
    }
}

/// The keyed part of a layer over Redis: the request's key, found by `R`
/// (such as [`PeerIp`](atscale_ratelimit::PeerIp) or
/// [`key_fn`](atscale_ratelimit::key_fn)), picks its bucket in a
/// [`RedisKeyedLimiter`]. Made by [`RedisKeyedLimiter::by`].
pub struct ByRedisKey<R, K> {
    key: R,
    table: RedisKeyedLimiter<K>,
}

impl<R: Clone, K> Clone for ByRedisKey<R, K> {
    fn clone(&self) -> Self {
        ByRedisKey {
            key: self.key.clone(),
            table: self.table.clone(),
        }
    }
}

impl<R: fmt::Debug, K> fmt::Debug for ByRedisKey<R, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ByRedisKey")
            .field("key", &self.key)
            .field("table", &self.table)
            .finish()
    }
}

impl<Req, R, K> KeyPart<Req, RedisLimiter> for ByRedisKey<R, K>
where
    R: RequestKey<Req, Key = K>,
    K: fmt::Display + Send + Sync + 'static,
{
    fn bucket(&self, req: &Req) -> Result<Option<RedisLimiter>, BoxError> {
        let key = self.key.key(req).ok_or_else(MissingKey::default)?;
        Ok(Some(self.table.get(&key)?))
    }
}

impl<R, K> KeyCheck<RedisLimiter> for ByRedisKey<R, K>
where
    R: Clone + Send + Sync + 'static,
    K: Send + Sync + 'static,
{
    fn check(&self, others: &[RedisLimiter], fixed_cost: Option<u32>) -> Result<(), InvalidLimit> {
        let apart = match &self.table.layout {
            Layout::Plain { .. } => false,
            Layout::PerKey { .. } => !others.is_empty(),
            Layout::Tagged { prefix, tag, .. } => {
                let slot = crate::cluster::slot(&format!("{prefix}{{{tag}}}"));
                others.iter().any(|o| o.slot() != slot)
            }
        };
        if apart {
            tracing::warn!(
                table = self.table.layout.name(),
                "rate limit on Redis Cluster: the keyed buckets of this table and the named \
                 limits of the layer live in different hash slots, so each request is admitted \
                 in two steps (not atomic: a refusal by the second gives the first back); give \
                 the table the named limits' tag (RedisKeyedLimiter::with_tag) to keep one \
                 atomic script"
            );
        }
        let burst = self.table.default.max_burst();
        match fixed_cost {
            Some(cost) if cost > burst => Err(Reason::CostExceedsBurst { cost, burst }.into()),
            _ => Ok(()),
        }
    }

    fn is_keyed(&self) -> bool {
        true
    }
}
