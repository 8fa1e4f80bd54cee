//! Error types.
//!
//! Requests refused by a limit fail with [`atscale_core::RateLimited`] (with
//! its retry-after), and requests turned away by a full wait queue or a full
//! key table with [`atscale_core::Overloaded`]; both belong to the shared
//! vocabulary, so [`atscale_core::Kind::of`] maps them to 429 /
//! `RESOURCE_EXHAUSTED` and 503 / `UNAVAILABLE`. The types here cover the
//! rest: configuration rejected at construction, and requests that can
//! never be admitted.

use std::error::Error;
use std::fmt;

/// Why a [`Limit`](crate::Limit) or a limiter configuration was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// The rate is zero: a limit that admits nothing.
    ZeroRate,
    /// The period is zero.
    ZeroPeriod,
    /// The burst is zero: a bucket that can hold no request.
    ZeroBurst,
    /// The rate is finer than the clock: less than 1 ns between requests.
    RateTooHigh,
    /// The period, or burst times the interval between requests, overflows the clock.
    TooLarge,
    /// A fixed cost per request is larger than the burst of a limit it is charged to.
    CostExceedsBurst {
        /// The cost per request.
        cost: u32,
        /// The smallest burst among the limits the cost is charged to.
        burst: u32,
    },
    /// A rate limit with no limiter at all.
    NoLimiters,
    /// The same limiter was added twice to one set.
    DuplicateLimiter,
    /// More limiters than [`MAX_LIMITS`](crate::MAX_LIMITS) in one set.
    TooManyLimiters,
    /// Limiters of one set run on different [`Clock`](crate::Clock)s.
    MixedClocks,
    /// A key table with a capacity of zero keys.
    ZeroKeys,
}

/// A limit or limiter configuration that makes no sense, rejected at construction.
///
/// ```
/// use atscale_ratelimit::{Limit, Reason};
///
/// let err = Limit::per_second(0).unwrap_err();
/// assert_eq!(err.reason(), Reason::ZeroRate);
/// assert_eq!(err.to_string(), "invalid rate limit: the rate must be at least 1 per period");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidLimit {
    reason: Reason,
}

impl InvalidLimit {
    pub(crate) const fn new(reason: Reason) -> Self {
        InvalidLimit { reason }
    }

    /// What was wrong.
    pub const fn reason(&self) -> Reason {
        self.reason
    }
}

impl From<Reason> for InvalidLimit {
    /// The error for `reason` (for a [`Store`](crate::Store) outside this
    /// crate that validates its own buckets).
    fn from(reason: Reason) -> Self {
        InvalidLimit::new(reason)
    }
}

impl fmt::Display for InvalidLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self.reason {
            Reason::ZeroRate => "the rate must be at least 1 per period".to_owned(),
            Reason::ZeroPeriod => "the period must not be zero".to_owned(),
            Reason::ZeroBurst => "the burst must be at least 1".to_owned(),
            Reason::RateTooHigh => "the rate leaves less than 1ns between requests".to_owned(),
            Reason::TooLarge => "the period or the burst is too large for the clock".to_owned(),
            Reason::CostExceedsBurst { cost, burst } => {
                format!("a cost of {cost} per request exceeds the burst of {burst}")
            }
            Reason::NoLimiters => "no limiter to apply".to_owned(),
            Reason::DuplicateLimiter => "the same limiter was added twice".to_owned(),
            Reason::TooManyLimiters => {
                format!("more than {} limiters for one request", crate::MAX_LIMITS)
            }
            Reason::MixedClocks => "the limiters run on different clocks".to_owned(),
            Reason::ZeroKeys => "a key table must hold at least one key".to_owned(),
        };
        f.pad(&format!("invalid rate limit: {why}"))
    }
}

impl Error for InvalidLimit {}

/// A request costs more than the burst of one of its limits: no amount of
/// waiting would ever admit it.
///
/// Classified as [`Kind::Internal`](atscale_core::Kind::Internal) (a cost
/// function that yields more than the limits allow is a configuration bug);
/// it is never a [`RateLimited`](atscale_core::RateLimited), whose retry-after
/// would be a lie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InsufficientCapacity {
    cost: u32,
    burst: u32,
}

impl InsufficientCapacity {
    /// A request of `cost` against a limit whose burst is `burst` (for a
    /// [`Store`](crate::Store) outside this crate).
    pub const fn new(cost: u32, burst: u32) -> Self {
        InsufficientCapacity { cost, burst }
    }

    /// The cost of the request.
    pub const fn cost(&self) -> u32 {
        self.cost
    }

    /// The burst of the limit it exceeds.
    pub const fn burst(&self) -> u32 {
        self.burst
    }
}

impl fmt::Display for InsufficientCapacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!(
            "request cost {} exceeds the burst of {}: it can never be admitted",
            self.cost, self.burst
        ))
    }
}

impl Error for InsufficientCapacity {}

/// A keyed limit found no key in the request (for [`PeerIp`](crate::PeerIp):
/// no peer address in the request's extensions).
///
/// Classified as [`Kind::Internal`](atscale_core::Kind::Internal): with axum,
/// serve with `into_make_service_with_connect_info::<SocketAddr>()`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MissingKey {
    _priv: (),
}

impl MissingKey {
    pub(crate) const fn new() -> Self {
        MissingKey { _priv: () }
    }
}

impl fmt::Display for MissingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad("no rate-limit key in the request")
    }
}

impl Error for MissingKey {}
