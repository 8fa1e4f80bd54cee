//! Limiters: shared handles to one bucket, and sets of them.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use atscale_core::BoxError;

use crate::MAX_LIMITS;
use crate::error::{InvalidLimit, Reason};
use crate::gcra::{self, Bucket, Refused};
use crate::limit::Limit;
use crate::store::{Claims, MemoryStore, Refusal};
use crate::wait::{self, Queue};
use atscale_core::Clock;

/// A shared handle to one in-memory rate-limit bucket.
///
/// Clones share the bucket: one limiter can guard several services (add it
/// to several [`RateLimitLayer`](crate::RateLimitLayer)s or
/// [`MultiLimiter`]s), and no clone can escape the limit.
///
/// ```
/// use atscale_ratelimit::{Limit, Limiter};
///
/// # fn main() -> Result<(), atscale_ratelimit::InvalidLimit> {
/// let limiter = Limiter::new(Limit::per_second(2)?.burst(2)?);
/// let clone = limiter.clone();
/// assert!(limiter.try_acquire(1).is_ok());
/// assert!(clone.try_acquire(1).is_ok());
/// assert!(limiter.try_acquire(1).is_err(), "the clone spent the same bucket");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

struct Inner {
    bucket: Bucket,
    clock: Clock,
    limit: Limit,
}

impl Limiter {
    /// A limiter for `limit` on the default (fast, TSC) [`Clock`].
    pub fn new(limit: Limit) -> Limiter {
        Limiter::with_clock(limit, Clock::default())
    }

    /// A limiter for `limit` on `clock` (use [`Clock::tokio`] in tests).
    pub fn with_clock(limit: Limit, clock: Clock) -> Limiter {
        Limiter {
            inner: Arc::new(Inner {
                bucket: Bucket::new(&limit),
                clock,
                limit,
            }),
        }
    }

    /// The limit this limiter enforces.
    pub fn limit(&self) -> Limit {
        self.inner.limit
    }

    /// The clock this limiter runs on.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// Takes `cost` now, or fails without taking anything.
    ///
    /// # Errors
    ///
    /// [`RateLimited`](atscale_core::RateLimited) with the time until `cost`
    /// would be admitted, or [`InsufficientCapacity`](crate::InsufficientCapacity)
    /// when `cost` exceeds the burst.
    #[inline(always)]
    pub fn try_acquire(&self, cost: u32) -> Result<(), BoxError> {
        let inner = &*self.inner;
        match inner.bucket.acquire(inner.clock.now_nanos(), cost, 0) {
            Ok(_) => Ok(()),
            Err(refused) => Err(refused_error(refused)),
        }
    }

    /// Takes `cost`, waiting for it if needed (see [`MultiLimiter::acquire`]).
    ///
    /// # Errors
    ///
    /// As [`MultiLimiter::acquire`].
    pub async fn acquire(&self, cost: u32) -> Result<(), BoxError> {
        let mut claims = Claims::new();
        claims.push(self, cost);
        let queue = Queue::new(Duration::MAX, usize::MAX);
        wait::acquire(&MemoryStore, &claims, &queue).await
    }

    pub(crate) fn bucket(&self) -> &Bucket {
        &self.inner.bucket
    }

    /// The global order in which buckets are locked.
    #[inline]
    pub(crate) fn order_key(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    pub(crate) fn same(&self, other: &Limiter) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Whether no one but this handle holds the bucket.
    pub(crate) fn is_unshared(&self) -> bool {
        Arc::strong_count(&self.inner) == 1
    }
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("limit", &self.inner.limit)
            .field("clock", &self.inner.clock)
            .finish_non_exhaustive()
    }
}

#[cold]
fn refused_error(refused: Refused) -> BoxError {
    Refusal::from(refused).into_error()
}

/// Checks a set of limiters: non-empty, at most [`MAX_LIMITS`], no
/// duplicates, one clock.
pub(crate) fn check_set(limiters: &[Limiter]) -> Result<(), InvalidLimit> {
    let Some(first) = limiters.first() else {
        return Err(InvalidLimit::new(Reason::NoLimiters));
    };
    if limiters.len() > MAX_LIMITS {
        return Err(InvalidLimit::new(Reason::TooManyLimiters));
    }
    for (i, a) in limiters.iter().enumerate() {
        if a.clock().id() != first.clock().id() {
            return Err(InvalidLimit::new(Reason::MixedClocks));
        }
        if limiters[..i].iter().any(|b| a.same(b)) {
            return Err(InvalidLimit::new(Reason::DuplicateLimiter));
        }
    }
    Ok(())
}

/// Several limiters applied together: a request is admitted against all of
/// them at once, or against none.
///
/// This is the book's `MultiLimiter`, without its flaw: waiting on each
/// limiter in turn spends the first one's tokens while waiting on the
/// second, and keeps them spent when the caller gives up. Here the request's
/// cost is reserved in every bucket at one common admission time, in one
/// step, and a caller that leaves before that time gives its reservation
/// back (see [`MultiLimiter::acquire`]).
///
/// Cheap to clone; clones share the limiters (and so does every other set
/// or layer holding the same [`Limiter`]s).
///
/// ```
/// use atscale_ratelimit::{Limit, Limiter, MultiLimiter};
///
/// # fn main() -> Result<(), atscale_ratelimit::InvalidLimit> {
/// let per_second = Limiter::new(Limit::per_second(2)?.burst(1)?);
/// let per_minute = Limiter::new(Limit::per_minute(10)?);
/// let api = MultiLimiter::new([per_second, per_minute.clone()])?;
///
/// assert!(api.try_acquire(1).is_ok());
/// // Refused by the per-second limit: nothing was taken from the other one.
/// assert!(api.try_acquire(1).is_err());
/// for _ in 0..9 {
///     assert!(per_minute.try_acquire(1).is_ok());
/// }
/// assert!(per_minute.try_acquire(1).is_err());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct MultiLimiter {
    limiters: Arc<[Limiter]>,
    /// The same limiters, in locking order.
    sorted: Arc<[Limiter]>,
    /// The smallest burst among them.
    min_burst: u32,
    queue: Queue,
}

impl MultiLimiter {
    /// A set of `limiters`, applied together.
    ///
    /// # Errors
    ///
    /// [`InvalidLimit`] for an empty set, more than [`MAX_LIMITS`] limiters,
    /// the same limiter twice, or limiters on different clocks.
    pub fn new(limiters: impl IntoIterator<Item = Limiter>) -> Result<MultiLimiter, InvalidLimit> {
        let limiters: Arc<[Limiter]> = limiters.into_iter().collect();
        check_set(&limiters)?;
        let mut sorted = limiters.to_vec();
        sorted.sort_by_key(Limiter::order_key);
        let min_burst = limiters.iter().map(|l| l.limit().max_burst()).min();
        Ok(MultiLimiter {
            limiters,
            sorted: sorted.into(),
            min_burst: min_burst.unwrap_or(0),
            queue: Queue::new(Duration::MAX, usize::MAX),
        })
    }

    /// The same set, with at most `n` callers waiting in
    /// [`MultiLimiter::acquire`] at once (unbounded by default); beyond that
    /// a caller that would have to wait fails with
    /// [`Overloaded`](atscale_core::Overloaded).
    #[must_use]
    pub fn max_waiters(mut self, n: usize) -> Self {
        self.queue = Queue::new(self.queue.max_wait, n);
        self
    }

    /// The same set, failing at once (with `RateLimited`) any caller that
    /// would wait longer than `max_wait` (unbounded by default).
    #[must_use]
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.queue = Queue::new(max_wait, self.queue.max_waiters);
        self
    }

    /// The limiters of the set.
    pub fn limiters(&self) -> &[Limiter] {
        &self.limiters
    }

    /// Takes `cost` from every limiter now, or fails without taking anything.
    ///
    /// # Errors
    ///
    /// [`RateLimited`](atscale_core::RateLimited) with the time until the set
    /// would admit `cost`, or [`InsufficientCapacity`](crate::InsufficientCapacity).
    pub fn try_acquire(&self, cost: u32) -> Result<(), BoxError> {
        if cost > self.min_burst {
            return Err(self.too_big(cost));
        }
        let now = self.sorted[0].clock().now_nanos();
        match gcra::try_acquire_sorted(&self.sorted, Limiter::bucket, cost, now) {
            Ok(()) => Ok(()),
            Err(refused) => Err(refused_error(refused)),
        }
    }

    #[cold]
    fn too_big(&self, cost: u32) -> BoxError {
        self.sorted
            .iter()
            .find_map(|l| l.bucket().check_cost(cost).err())
            .map_or_else(|| "cost exceeds a burst".into(), refused_error)
    }

    /// Takes `cost` from every limiter, waiting for the common admission time.
    ///
    /// Callers are admitted in the order they called. The wait respects the
    /// deadline of the current [`Context`](atscale_core::Context) (from
    /// `Context::current()`): when admission would come at or after it, this
    /// fails at once with `RateLimited` and the retry-after, instead of
    /// waiting for the deadline to pass. A cancelled context ends the wait
    /// with [`Cancelled`](atscale_core::Cancelled).
    ///
    /// Cancel-safe: dropping the future (or failing on cancellation) before
    /// the admission time gives the reservation back to every bucket where no
    /// one has reserved since; where someone has, the slot stays spent (their
    /// admission time was computed after it and is kept), until they too leave.
    ///
    /// # Errors
    ///
    /// `RateLimited` (beyond the deadline or `max_wait`),
    /// [`Overloaded`](atscale_core::Overloaded) (too many waiters),
    /// `Cancelled`, or [`InsufficientCapacity`](crate::InsufficientCapacity).
    pub async fn acquire(&self, cost: u32) -> Result<(), BoxError> {
        let claims = self.claims(cost);
        wait::acquire(&MemoryStore, &claims, &self.queue).await
    }

    fn claims(&self, cost: u32) -> Claims<'_, Limiter> {
        let mut claims = Claims::new();
        for l in self.limiters.iter() {
            claims.push(l, cost);
        }
        claims
    }
}

impl fmt::Debug for MultiLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultiLimiter")
            .field("limiters", &self.limiters)
            .field("max_wait", &self.queue.max_wait)
            .field("max_waiters", &self.queue.max_waiters)
            .finish()
    }
}
