use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::MAX_LIMITS;
use crate::error::{InvalidLimit, Reason};
use crate::keyed::{ByKey, KeyCheck, KeyedLimiter, NoKey};
use crate::limiter::Limiter;
use crate::service::RateLimit;
use crate::store::{MemoryStore, Store};
use crate::wait::Queue;

/// The cost of a request: how much of each limit it takes.
///
/// A `u32` is a fixed cost (checked against the bursts when the layer is
/// built); [`CostFn`] computes it per request (a request whose cost exceeds a
/// burst then fails with [`InsufficientCapacity`](crate::InsufficientCapacity)).
pub trait Cost<Req>: FixedCost {
    /// The cost of `req`.
    fn cost(&self, req: &Req) -> u32;
}

/// The request-independent part of a [`Cost`], checked when a layer is built.
pub trait FixedCost: Clone + Send + Sync + 'static {
    /// The cost of every request, when it does not depend on the request.
    fn fixed(&self) -> Option<u32>;
}

impl<Req> Cost<Req> for u32 {
    #[inline]
    fn cost(&self, _: &Req) -> u32 {
        *self
    }
}

impl FixedCost for u32 {
    fn fixed(&self) -> Option<u32> {
        Some(*self)
    }
}

impl<F: Clone + Send + Sync + 'static> FixedCost for CostFn<F> {
    fn fixed(&self) -> Option<u32> {
        None
    }
}

/// A [`Cost`] computed by a closure (see [`RateLimitBuilder::cost_fn`]).
#[derive(Clone)]
pub struct CostFn<F>(F);

impl<F> fmt::Debug for CostFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CostFn").finish_non_exhaustive()
    }
}

impl<F, Req> Cost<Req> for CostFn<F>
where
    F: Fn(&Req) -> u32 + Clone + Send + Sync + 'static,
{
    #[inline]
    fn cost(&self, req: &Req) -> u32 {
        (self.0)(req)
    }
}

/// What the layer does with a request its limits cannot admit at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// Reserve, wait for the admission time in the response future (callers
    /// are admitted in arrival order), then call the inner service.
    Wait,
    /// Fail at once with `RateLimited` and the retry-after.
    Reject,
}

/// What the layer and every service it makes share.
pub(crate) struct Shared<K, W, St: Store> {
    pub(crate) store: St,
    pub(crate) limiters: Box<[St::Bucket]>,
    pub(crate) key: K,
    pub(crate) cost: W,
    pub(crate) mode: Mode,
    pub(crate) queue: Queue,
}

/// Applies rate limits to every request of the wrapped service.
///
/// Layers built from the same [`Limiter`]s share them: the book's API client,
/// where `read_file` and `resolve_address` share the `api` limits, is two
/// layers that both hold the `api` limiters. See the [crate docs](crate) for
/// the example, backpressure, errors and ordering.
pub struct RateLimitLayer<K = NoKey, W = u32, St: Store = MemoryStore> {
    shared: Arc<Shared<K, W, St>>,
}

impl<K, W, St: Store> Clone for RateLimitLayer<K, W, St> {
    fn clone(&self) -> Self {
        RateLimitLayer {
            shared: self.shared.clone(),
        }
    }
}

impl RateLimitLayer {
    /// Waits (in arrival order) for `limiter` to admit each request, within
    /// the request's deadline.
    pub fn new(limiter: Limiter) -> Self {
        RateLimitLayer::builder()
            .limiter(limiter)
            .build()
            .expect("one limiter and a cost of 1 are always valid")
    }

    /// Fails each request that `limiter` does not admit at once with
    /// `RateLimited` and its retry-after.
    pub fn reject(limiter: Limiter) -> Self {
        RateLimitLayer::builder()
            .limiter(limiter)
            .reject()
            .build()
            .expect("one limiter and a cost of 1 are always valid")
    }

    /// A builder over the in-memory store.
    pub fn builder() -> RateLimitBuilder {
        RateLimitBuilder::with_store(MemoryStore)
    }
}

impl<K, W, St: Store> RateLimitLayer<K, W, St> {
    /// Whether requests wait or are rejected.
    pub fn mode(&self) -> Mode {
        self.shared.mode
    }
}

impl<S, K, W, St: Store> Layer<S> for RateLimitLayer<K, W, St> {
    type Service = RateLimit<S, K, W, St>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::from_shared(inner, self.shared.clone())
    }
}

impl<K, W, St: Store> fmt::Debug for RateLimitLayer<K, W, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("limiters", &self.shared.limiters.len())
            .field("mode", &self.shared.mode)
            .field("max_wait", &self.shared.queue.max_wait)
            .field("max_waiters", &self.shared.queue.max_waiters)
            .finish_non_exhaustive()
    }
}

/// Builds a [`RateLimitLayer`].
///
/// ```
/// use std::net::IpAddr;
/// use std::time::Duration;
/// use atscale_ratelimit::{KeyedLimiter, Limit, Limiter, PeerIp, RateLimitLayer};
///
/// # fn main() -> Result<(), atscale_ratelimit::InvalidLimit> {
/// let global = Limiter::new(Limit::per_second(1000)?);
/// let per_client = KeyedLimiter::<IpAddr>::new(Limit::per_second(10)?.burst(20)?);
/// let layer = RateLimitLayer::builder()
///     .limiter(global)
///     .keyed(PeerIp::new(), per_client)
///     .cost_fn(|req: &http::Request<()>| if req.method() == "POST" { 5 } else { 1 })
///     .max_wait(Duration::from_secs(2))
///     .max_waiters(256)
///     .build()?;
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[must_use]
pub struct RateLimitBuilder<K = NoKey, W = u32, St: Store = MemoryStore> {
    store: St,
    limiters: Vec<St::Bucket>,
    key: K,
    cost: W,
    mode: Mode,
    max_wait: Duration,
    max_waiters: usize,
}

impl<St: Store> RateLimitBuilder<NoKey, u32, St> {
    /// A builder over `store` (a distributed store, say), with no limiter yet.
    pub fn with_store(store: St) -> Self {
        RateLimitBuilder {
            store,
            limiters: Vec::new(),
            key: NoKey,
            cost: 1,
            mode: Mode::Wait,
            max_wait: Duration::MAX,
            max_waiters: 1024,
        }
    }
}

impl<K, W, St: Store> RateLimitBuilder<K, W, St> {
    /// Adds a limiter (a bucket of the store): every request must pass it too.
    pub fn limiter(mut self, limiter: St::Bucket) -> Self {
        self.limiters.push(limiter);
        self
    }

    /// Adds a keyed limit: each request is also charged to the bucket of its
    /// key (found by `key`, such as [`PeerIp`](crate::PeerIp), whose key is
    /// an `IpAddr`) in `limiter`.
    pub fn keyed<R, Key>(
        self,
        key: R,
        limiter: KeyedLimiter<Key>,
    ) -> RateLimitBuilder<ByKey<R, Key>, W, St> {
        RateLimitBuilder {
            store: self.store,
            limiters: self.limiters,
            key: ByKey::new(key, limiter),
            cost: self.cost,
            mode: self.mode,
            max_wait: self.max_wait,
            max_waiters: self.max_waiters,
        }
    }

    /// Adds a keyed limit given as a [`KeyPart`](crate::KeyPart): the keyed
    /// limit of another store (a distributed store's table of buckets).
    /// [`RateLimitBuilder::keyed`] is the in-memory one.
    pub fn key_part<K2>(self, part: K2) -> RateLimitBuilder<K2, W, St> {
        RateLimitBuilder {
            store: self.store,
            limiters: self.limiters,
            key: part,
            cost: self.cost,
            mode: self.mode,
            max_wait: self.max_wait,
            max_waiters: self.max_waiters,
        }
    }

    /// A fixed cost per request (1 by default), checked against the bursts.
    pub fn cost(self, cost: u32) -> RateLimitBuilder<K, u32, St> {
        self.with_cost(cost)
    }

    /// A cost computed per request (a weight: bytes, tokens).
    pub fn cost_fn<F>(self, cost: F) -> RateLimitBuilder<K, CostFn<F>, St> {
        self.with_cost(CostFn(cost))
    }

    fn with_cost<W2>(self, cost: W2) -> RateLimitBuilder<K, W2, St> {
        RateLimitBuilder {
            store: self.store,
            limiters: self.limiters,
            key: self.key,
            cost,
            mode: self.mode,
            max_wait: self.max_wait,
            max_waiters: self.max_waiters,
        }
    }

    /// Reject mode: fail at once (`RateLimited` + retry-after) instead of waiting.
    pub fn reject(mut self) -> Self {
        self.mode = Mode::Reject;
        self
    }

    /// Wait mode (the default): wait for admission, in arrival order.
    pub fn wait(mut self) -> Self {
        self.mode = Mode::Wait;
        self
    }

    /// In wait mode, the longest wait accepted; a request whose admission
    /// lies further away fails at once with `RateLimited` (unbounded by
    /// default, but always within the request's deadline).
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// In wait mode, how many requests may wait at once (1024 by default);
    /// a request that would wait beyond that fails with `Overloaded`.
    pub fn max_waiters(mut self, max_waiters: usize) -> Self {
        self.max_waiters = max_waiters;
        self
    }

    /// The layer.
    ///
    /// # Errors
    ///
    /// [`InvalidLimit`] for no limiter (and no keyed limit), more than
    /// [`MAX_LIMITS`] in all, the same limiter twice, limiters on different
    /// clocks, or a fixed cost above a burst.
    pub fn build(self) -> Result<RateLimitLayer<K, W, St>, InvalidLimit>
    where
        K: KeyCheck<St::Bucket>,
        W: FixedCost,
    {
        let keyed = usize::from(self.key.is_keyed());
        if self.limiters.len() + keyed == 0 {
            return Err(InvalidLimit::new(Reason::NoLimiters));
        }
        if self.limiters.len() + keyed > MAX_LIMITS {
            return Err(InvalidLimit::new(Reason::TooManyLimiters));
        }
        let fixed = self.cost.fixed();
        self.store.validate(&self.limiters, fixed)?;
        self.key.check(&self.limiters, fixed)?;
        let max_wait = match self.mode {
            Mode::Wait => self.max_wait,
            Mode::Reject => Duration::ZERO,
        };
        Ok(RateLimitLayer {
            shared: Arc::new(Shared {
                store: self.store,
                limiters: self.limiters.into_boxed_slice(),
                key: self.key,
                cost: self.cost,
                mode: self.mode,
                queue: Queue::new(max_wait, self.max_waiters),
            }),
        })
    }
}

impl<K, W, St: Store> fmt::Debug for RateLimitBuilder<K, W, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitBuilder")
            .field("limiters", &self.limiters.len())
            .field("mode", &self.mode)
            .field("max_wait", &self.max_wait)
            .field("max_waiters", &self.max_waiters)
            .finish_non_exhaustive()
    }
}
