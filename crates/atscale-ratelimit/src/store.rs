//! Where buckets keep their state: the [`Store`] trait and the in-memory store.

use std::fmt;
use std::future::{Future, Ready, ready};
use std::time::Duration;

use atscale_core::{BoxError, Context, RateLimited};

use crate::MAX_LIMITS;
use crate::error::{InsufficientCapacity, InvalidLimit, Reason};
use crate::gcra::{self, Refused, Taken};
use crate::limiter::{Limiter, check_set};

/// The buckets one request is charged to, with the cost in each.
///
/// At most [`MAX_LIMITS`] claims, held inline: building them allocates nothing.
pub struct Claims<'a, B> {
    items: [Option<(&'a B, u32)>; MAX_LIMITS],
    len: usize,
}

impl<'a, B> Claims<'a, B> {
    /// No claims.
    pub const fn new() -> Self {
        Claims {
            items: [None; MAX_LIMITS],
            len: 0,
        }
    }

    /// Adds `cost` in `bucket`; `false` (and nothing added) when full.
    #[inline]
    pub fn push(&mut self, bucket: &'a B, cost: u32) -> bool {
        if self.len == MAX_LIMITS {
            return false;
        }
        self.items[self.len] = Some((bucket, cost));
        self.len += 1;
        true
    }

    /// The claims, in the order they were pushed.
    pub fn iter(&self) -> impl Iterator<Item = (&'a B, u32)> + '_ {
        self.items[..self.len].iter().flatten().copied()
    }

    /// How many claims.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn get(&self, i: usize) -> (&'a B, u32) {
        self.items[i].expect("index below len")
    }
}

impl<B> Default for Claims<'_, B> {
    fn default() -> Self {
        Claims::new()
    }
}

impl<B> fmt::Debug for Claims<'_, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claims").field("len", &self.len).finish()
    }
}

#[inline]
fn nanos(d: Duration) -> u64 {
    if d.as_secs() < 1 << 33 {
        d.as_secs() * 1_000_000_000 + u64::from(d.subsec_nanos())
    } else {
        u64::MAX
    }
}

/// A store's yes: admitted now (`wait` zero) or at `wait` from now, reserved.
#[derive(Debug)]
pub struct Grant<R> {
    wait: Duration,
    receipt: Option<R>,
}

impl<R> Grant<R> {
    /// Admitted after `wait`; `receipt` gives the reservation back if the
    /// waiter leaves before then (`None` when there is nothing to give back).
    pub const fn new(wait: Duration, receipt: Option<R>) -> Self {
        Grant { wait, receipt }
    }

    /// How long until the request is admitted.
    pub const fn wait(&self) -> Duration {
        self.wait
    }

    /// The receipt, for a store (or its future) that must give the
    /// reservation back itself.
    pub fn into_receipt(self) -> Option<R> {
        self.receipt
    }
}

/// A store's no: nothing was reserved.
#[derive(Debug)]
#[non_exhaustive]
pub enum Refusal {
    /// Admission lies beyond the allowed wait; it would be admitted this far from now.
    RetryAfter(Duration),
    /// The cost exceeds a burst: never admissible.
    InsufficientCapacity(InsufficientCapacity),
    /// The store itself failed (a remote store's connection, say).
    Store(BoxError),
}

impl Refusal {
    pub(crate) fn into_error(self) -> BoxError {
        match self {
            Refusal::RetryAfter(d) => Box::new(RateLimited::new(d)),
            Refusal::InsufficientCapacity(e) => Box::new(e),
            Refusal::Store(e) => e,
        }
    }
}

impl From<Refused> for Refusal {
    fn from(r: Refused) -> Self {
        match r {
            Refused::RetryAfter(n) => Refusal::RetryAfter(Duration::from_nanos(n)),
            Refused::Insufficient(e) => Refusal::InsufficientCapacity(e),
        }
    }
}

/// Where the state of buckets lives, and how several are reserved at once.
///
/// One call reserves a request's cost in *all* of its buckets at one common
/// admission time no more than `max_wait` away, or in none of them: a remote
/// store does it in one round trip (a script), the in-memory store with
/// atomics. Times are relative (`max_wait`, [`Grant::wait`],
/// [`Refusal::RetryAfter`]), so each store keeps its own clock.
///
/// [`Store::acquire`] is async-capable; a store that can answer without
/// waiting also answers [`Store::try_acquire_now`], which lets the layer skip
/// the extra future state (the in-memory store always does). An
/// [`Store::Acquire`] future dropped after the store reserved (its caller
/// went away mid-round-trip) must give the reservation back itself.
pub trait Store: Clone + Send + Sync + 'static {
    /// A handle to one bucket in this store.
    type Bucket: Clone + Send + Sync + 'static;
    /// What a granted reservation gives back when its waiter leaves early.
    type Receipt: Send + Sync + 'static;
    /// The future of [`Store::acquire`].
    type Acquire: Future<Output = Result<Grant<Self::Receipt>, Refusal>> + Send + 'static;

    /// Reserves every claim, all or none (see the trait docs).
    fn acquire(&self, claims: &Claims<'_, Self::Bucket>, max_wait: Duration) -> Self::Acquire;

    /// Like [`Store::acquire`], for a request whose [`Context`] is `cx`: a
    /// remote store bounds its round trip by the context's deadline and
    /// cancellation. The layer calls this one (with the request's context,
    /// or [`Context::current`]); the default ignores `cx` and calls
    /// [`Store::acquire`].
    fn acquire_within(
        &self,
        claims: &Claims<'_, Self::Bucket>,
        max_wait: Duration,
        cx: Option<&Context>,
    ) -> Self::Acquire {
        let _ = cx;
        self.acquire(claims, max_wait)
    }

    /// Like [`Store::acquire`] when the store can answer at once; `None` when
    /// it must go asynchronous (the default).
    fn try_acquire_now(
        &self,
        claims: &Claims<'_, Self::Bucket>,
        max_wait: Duration,
    ) -> Option<Result<Grant<Self::Receipt>, Refusal>> {
        let _ = (claims, max_wait);
        None
    }

    /// Admits `cost` in the one `bucket` a request is charged to if that
    /// needs no wait: `Some(true)` admitted (charged), `Some(false)` not
    /// admitted now and nothing charged (the layer then asks
    /// [`Store::try_acquire_now`] or [`Store::acquire`] with the request's
    /// allowed wait), `None` when the store cannot tell without going
    /// asynchronous (the default). The layer's fast path: a request admitted
    /// at once needs neither its deadline nor the wait queue.
    fn try_admit_now(&self, bucket: &Self::Bucket, cost: u32) -> Option<bool> {
        let _ = (bucket, cost);
        None
    }

    /// Gives back a reservation whose waiter left before its admission time,
    /// as far as that cannot delay anyone who reserved after it.
    fn refund(&self, receipt: Self::Receipt);

    /// Checks, when a layer is built, that `buckets` can be reserved
    /// together and that a `fixed_cost` (if the cost is fixed) fits in every
    /// one of them.
    ///
    /// # Errors
    ///
    /// [`InvalidLimit`] describing what does not fit.
    fn validate(
        &self,
        buckets: &[Self::Bucket],
        fixed_cost: Option<u32>,
    ) -> Result<(), InvalidLimit> {
        let _ = (buckets, fixed_cost);
        Ok(())
    }
}

/// The in-memory store (the default): bucket state in atomics, shared by
/// every clone of a [`Limiter`].
///
/// One bucket is reserved by a compare-and-swap on its state word; several
/// by locking each (an atomic exchange that also reads its state, in a
/// global order, so overlapping sets cannot deadlock), computing their
/// common admission time, and writing them all back. Nothing is allocated
/// for a request admitted at once; a waiting request keeps a
/// [`MemoryReceipt`] of what it reserved.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryStore;

/// What an in-memory reservation recorded in each bucket (made only for a
/// request that waits).
#[derive(Debug)]
pub struct MemoryReceipt {
    parts: Box<[(Limiter, Taken)]>,
}

impl MemoryStore {
    #[inline]
    pub(crate) fn reserve(
        claims: &Claims<'_, Limiter>,
        max_wait: Duration,
    ) -> Result<Grant<MemoryReceipt>, Refusal> {
        let n = claims.len();
        let Some((first, first_cost)) = claims.items[0] else {
            return Ok(Grant::new(Duration::ZERO, None));
        };
        let max_wait = nanos(max_wait);
        let now = first.clock().now_nanos();
        if n == 1 {
            let (wait, taken) = first.bucket().acquire(now, first_cost, max_wait)?;
            if wait == 0 {
                return Ok(Grant::new(Duration::ZERO, None));
            }
            return Ok(Self::grant(wait, claims, &[taken]));
        }
        let mut buckets = [first.bucket(); MAX_LIMITS];
        let mut costs = [0u32; MAX_LIMITS];
        let mut order = [0usize; MAX_LIMITS];
        for i in 0..n {
            let (b, c) = claims.get(i);
            buckets[i] = b.bucket();
            costs[i] = c;
            // insertion sort by address: the global locking order
            let key = b.order_key();
            let mut j = i;
            while j > 0 && claims.get(order[j - 1]).0.order_key() > key {
                order[j] = order[j - 1];
                j -= 1;
            }
            order[j] = i;
        }
        let mut taken = [Taken { old: 0, new: 0 }; MAX_LIMITS];
        let wait = gcra::acquire_all(
            &buckets[..n],
            &costs[..n],
            &order[..n],
            now,
            max_wait,
            &mut taken[..n],
        )?;
        Ok(Self::grant(wait, claims, &taken[..n]))
    }

    #[inline]
    fn grant(wait: u64, claims: &Claims<'_, Limiter>, taken: &[Taken]) -> Grant<MemoryReceipt> {
        if wait == 0 {
            // Admitted now: nothing will ever be given back.
            return Grant::new(Duration::ZERO, None);
        }
        let parts = taken
            .iter()
            .enumerate()
            .map(|(i, t)| (claims.get(i).0.clone(), *t))
            .collect();
        Grant::new(Duration::from_nanos(wait), Some(MemoryReceipt { parts }))
    }
}

impl Store for MemoryStore {
    type Bucket = Limiter;
    type Receipt = MemoryReceipt;
    type Acquire = Ready<Result<Grant<MemoryReceipt>, Refusal>>;

    fn acquire(&self, claims: &Claims<'_, Limiter>, max_wait: Duration) -> Self::Acquire {
        ready(MemoryStore::reserve(claims, max_wait))
    }

    #[inline]
    fn try_acquire_now(
        &self,
        claims: &Claims<'_, Limiter>,
        max_wait: Duration,
    ) -> Option<Result<Grant<MemoryReceipt>, Refusal>> {
        Some(MemoryStore::reserve(claims, max_wait))
    }

    #[inline]
    fn try_admit_now(&self, bucket: &Limiter, cost: u32) -> Option<bool> {
        let now = bucket.clock().now_nanos();
        // With no wait allowed, nothing is charged unless admitted now.
        Some(bucket.bucket().acquire(now, cost, 0).is_ok())
    }

    fn validate(&self, buckets: &[Limiter], fixed_cost: Option<u32>) -> Result<(), InvalidLimit> {
        if buckets.is_empty() {
            return Ok(());
        }
        check_set(buckets)?;
        let burst = buckets.iter().map(|l| l.limit().max_burst()).min();
        match (fixed_cost, burst) {
            (Some(cost), Some(burst)) if cost > burst => {
                Err(InvalidLimit::new(Reason::CostExceedsBurst { cost, burst }))
            }
            _ => Ok(()),
        }
    }

    fn refund(&self, receipt: MemoryReceipt) {
        for (limiter, taken) in receipt.parts {
            let now = limiter.clock().now_nanos();
            limiter.bucket().refund(taken, now);
        }
    }
}
