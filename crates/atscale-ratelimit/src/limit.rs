//! Limits: a rate over a period, and a burst.

use std::fmt;
use std::time::Duration;

use crate::error::{InvalidLimit, Reason};

/// The largest capacity (burst × interval) a limit may have, in nanoseconds:
/// about 73 years, leaving room in the 63 bits of bucket state for the clock.
const MAX_CAPACITY: u128 = 1 << 61;

/// A rate limit: `rate` requests (or units of cost) per `period`, with bursts
/// of up to `burst`.
///
/// Checked at construction: a zero rate, period or burst, a rate finer than
/// one nanosecond, or a burst whose refill time overflows the clock is an
/// [`InvalidLimit`], never a panic or a limit that admits nothing forever.
///
/// The interval between requests is `period / rate`, rounded *up* to whole
/// nanoseconds, so a limit never admits more than it says. The burst defaults
/// to the rate (`Limit::per_minute(10)` lets ten requests through at once,
/// then one every six seconds).
///
/// ```
/// use std::time::Duration;
/// use atscale_ratelimit::Limit;
///
/// # fn main() -> Result<(), atscale_ratelimit::InvalidLimit> {
/// let api = Limit::per_second(2)?.burst(1)?;
/// assert_eq!(api.interval(), Duration::from_millis(500));
/// assert_eq!(api.max_burst(), 1);
///
/// let disk = Limit::new(64 * 1024, Duration::from_millis(100))?; // bytes
/// assert_eq!(disk.max_burst(), 64 * 1024);
/// assert!(Limit::per_minute(10)?.burst(0).is_err());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    rate: u32,
    period: Duration,
    burst: u32,
    /// Nanoseconds between two units of cost.
    interval: u64,
}

impl Limit {
    /// `rate` per `period`, with a burst of `rate`.
    ///
    /// # Errors
    ///
    /// [`InvalidLimit`] for a zero rate or period, a rate finer than 1 ns, or
    /// a period too large for the clock.
    pub fn new(rate: u32, period: Duration) -> Result<Limit, InvalidLimit> {
        if rate == 0 {
            return Err(InvalidLimit::new(Reason::ZeroRate));
        }
        if period.is_zero() {
            return Err(InvalidLimit::new(Reason::ZeroPeriod));
        }
        let nanos = period.as_nanos();
        let interval = nanos.div_ceil(u128::from(rate));
        if nanos < u128::from(rate) {
            return Err(InvalidLimit::new(Reason::RateTooHigh));
        }
        if interval > MAX_CAPACITY {
            return Err(InvalidLimit::new(Reason::TooLarge));
        }
        Limit {
            rate,
            period,
            burst: rate,
            interval: interval as u64,
        }
        .burst(rate)
    }

    /// `n` per second, with a burst of `n`.
    ///
    /// # Errors
    ///
    /// [`InvalidLimit`] when `n` is zero or above 10⁹ (finer than 1 ns).
    pub fn per_second(n: u32) -> Result<Limit, InvalidLimit> {
        Limit::new(n, Duration::from_secs(1))
    }

    /// `n` per minute, with a burst of `n`.
    ///
    /// # Errors
    ///
    /// [`InvalidLimit`] when `n` is zero.
    pub fn per_minute(n: u32) -> Result<Limit, InvalidLimit> {
        Limit::new(n, Duration::from_secs(60))
    }

    /// `n` per hour, with a burst of `n`.
    ///
    /// # Errors
    ///
    /// [`InvalidLimit`] when `n` is zero.
    pub fn per_hour(n: u32) -> Result<Limit, InvalidLimit> {
        Limit::new(n, Duration::from_secs(3600))
    }

    /// The same rate with a burst of `burst`: how much cost may pass at once
    /// after the limit has been idle.
    ///
    /// # Errors
    ///
    /// [`InvalidLimit`] for a zero burst, or one whose refill time
    /// (burst × interval) exceeds about 73 years.
    pub fn burst(self, burst: u32) -> Result<Limit, InvalidLimit> {
        if burst == 0 {
            return Err(InvalidLimit::new(Reason::ZeroBurst));
        }
        if u128::from(burst) * u128::from(self.interval) > MAX_CAPACITY {
            return Err(InvalidLimit::new(Reason::TooLarge));
        }
        Ok(Limit { burst, ..self })
    }

    /// The rate: how much cost per [`Limit::period`].
    pub const fn rate(&self) -> u32 {
        self.rate
    }

    /// The period the rate is counted over.
    pub const fn period(&self) -> Duration {
        self.period
    }

    /// The burst: the most cost admitted at once.
    pub const fn max_burst(&self) -> u32 {
        self.burst
    }

    /// The time between two units of cost at the sustained rate.
    pub const fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval)
    }

    pub(crate) const fn interval_nanos(&self) -> u64 {
        self.interval
    }

    /// Burst × interval: how long an idle bucket takes to refill, in nanoseconds.
    pub(crate) const fn capacity_nanos(&self) -> u64 {
        self.interval * self.burst as u64
    }
}

impl fmt::Debug for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limit")
            .field("rate", &self.rate)
            .field("period", &self.period)
            .field("burst", &self.burst)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonsense_is_rejected_with_a_reason() {
        let reason = |r: Result<Limit, InvalidLimit>| r.unwrap_err().reason();
        assert_eq!(reason(Limit::per_second(0)), Reason::ZeroRate);
        assert_eq!(reason(Limit::new(1, Duration::ZERO)), Reason::ZeroPeriod);
        assert_eq!(
            reason(Limit::per_second(1).unwrap().burst(0)),
            Reason::ZeroBurst
        );
        assert_eq!(
            reason(Limit::new(2, Duration::from_nanos(1))),
            Reason::RateTooHigh
        );
        assert_eq!(reason(Limit::new(1, Duration::MAX)), Reason::TooLarge);
        assert_eq!(
            reason(Limit::per_hour(1).unwrap().burst(u32::MAX)),
            Reason::TooLarge
        );
        assert!(Limit::per_second(1_000_000_000).is_ok());
        assert!(Limit::per_second(1_000_000_001).is_err());
    }

    #[test]
    fn interval_rounds_up_so_the_rate_is_never_exceeded() {
        let l = Limit::per_second(3).unwrap();
        assert_eq!(l.interval(), Duration::from_nanos(333_333_334));
        assert_eq!(l.max_burst(), 3);
        assert_eq!(l.capacity_nanos(), 1_000_000_002);
    }
}
