//! Adaptive concurrency limit algorithms: [`Gradient2`], [`Vegas`], [`Aimd`],
//! behind the [`Algorithm`] trait.
//!
//! Each finished request the layer times is one [`Sample`] (its latency,
//! how many requests were in flight when it started, whether it was
//! dropped); the algorithm folds it into its estimate and returns the new
//! limit. The layer clamps the result to its minimum and maximum and
//! exposes it as a whole number. The layer times every request except at
//! low load, where it samples them ([`Builder::sampling`](crate::Builder::sampling)).

use std::fmt;
use std::time::Duration;

mod aimd;
mod gradient2;
mod vegas;

pub use aimd::Aimd;
pub use gradient2::Gradient2;
pub use vegas::Vegas;

/// One finished request, as an [`Algorithm`] sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    latency: Duration,
    in_flight: usize,
    dropped: bool,
    /// The limit the request was admitted under; 0 if unknown.
    limit: usize,
}

impl Sample {
    /// A request that took `latency` from admission to answer, started with
    /// `in_flight` requests in service (itself included), and was `dropped`
    /// (overloaded or past its deadline downstream, or cut by its deadline).
    pub const fn new(latency: Duration, in_flight: usize, dropped: bool) -> Self {
        Sample {
            latency,
            in_flight,
            dropped,
            limit: 0,
        }
    }

    /// The same sample, admitted under `limit` (the layer sets it): a
    /// request admitted before the limit last grew says nothing about the
    /// new one.
    #[must_use]
    pub const fn with_limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// From admission to answer.
    pub const fn latency(&self) -> Duration {
        self.latency
    }

    /// Requests in service when this one was admitted, itself included.
    pub const fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether the request was dropped: a sign of overload, not of success.
    pub const fn dropped(&self) -> bool {
        self.dropped
    }

    /// The limit the request was admitted under, if known
    /// ([`with_limit`](Self::with_limit)).
    pub const fn limit(&self) -> Option<usize> {
        if self.limit == 0 {
            None
        } else {
            Some(self.limit)
        }
    }
}

/// A concurrency limit algorithm: pluggable into
/// [`OverloadLayer`](crate::OverloadLayer) through
/// [`Builder::algorithm`](crate::Builder::algorithm).
///
/// The layer calls [`update`](Algorithm::update) once per finished timed
/// request (every request, except one in
/// [`sampling`](crate::Builder::sampling) while a request is alone in flight
/// or fewer than an eighth of the limit are), under its lock (keep it short), with the current
/// limit; the result is clamped to the layer's minimum and maximum.
///
/// ```
/// use std::time::Duration;
/// use atscale_overload::limit::{Algorithm, Sample};
///
/// /// Halves on a drop, else grows by one.
/// #[derive(Debug)]
/// struct Halving;
///
/// impl Algorithm for Halving {
///     fn update(&mut self, limit: f64, sample: &Sample) -> f64 {
///         if sample.dropped() { limit / 2.0 } else { limit + 1.0 }
///     }
/// }
///
/// let mut a = Halving;
/// assert_eq!(a.update(10.0, &Sample::new(Duration::from_millis(5), 10, true)), 5.0);
/// ```
pub trait Algorithm: fmt::Debug + Send + 'static {
    /// Folds one finished request into the estimate and returns the new limit.
    fn update(&mut self, limit: f64, sample: &Sample) -> f64;
}

impl<A: Algorithm + ?Sized> Algorithm for Box<A> {
    fn update(&mut self, limit: f64, sample: &Sample) -> f64 {
        (**self).update(limit, sample)
    }
}

/// An exponentially weighted moving average that starts as a plain mean for
/// its first `warmup` samples (as Netflix's `ExpAvgMeasurement`).
#[derive(Clone, Debug)]
pub(crate) struct ExpAvg {
    value: f64,
    window: f64,
    warmup: u32,
    count: u32,
}

impl ExpAvg {
    pub(crate) const fn new(window: u32, warmup: u32) -> Self {
        ExpAvg {
            value: 0.0,
            window: window as f64,
            warmup,
            count: 0,
        }
    }

    pub(crate) fn add(&mut self, sample: f64) -> f64 {
        if self.count < self.warmup {
            self.count += 1;
            self.value += (sample - self.value) / f64::from(self.count);
        } else {
            let factor = 2.0 / (self.window + 1.0);
            self.value = self.value * (1.0 - factor) + sample * factor;
        }
        self.value
    }

    pub(crate) fn set(&mut self, value: f64) {
        self.value = value;
    }
}

pub(crate) fn nanos(d: Duration) -> f64 {
    // Not `as_nanos() as f64`: a u128 to f64 conversion is a libcall.
    d.as_secs() as f64 * 1e9 + f64::from(d.subsec_nanos())
}
