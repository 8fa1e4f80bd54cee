//! The retry throttle of gRFC A6 (`retryThrottling`), shared by retries and hedges.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// One backend's retry throttle, as gRFC A6's `retryThrottling` defines it:
/// a token count that starts at `max_tokens`; every failed attempt with a
/// retryable outcome takes one token (never below zero), every success gives
/// back `token_ratio` (never above `max_tokens`); retries and hedges are
/// allowed only while the count is above `max_tokens / 2`.
///
/// While a backend fails more than about one call in `1 / token_ratio`, the
/// count sinks to the threshold and stays there: only first attempts are
/// sent, so retries cannot multiply the load on a backend that is down.
///
/// Clones share one count (an `Arc`): build one throttle per backend and hand
/// it to every retry layer and hedge that calls it. Lock-free: the count is
/// one atomic, in thousandths of a token (`token_ratio` has three decimals,
/// as in A6).
///
/// # Example
///
/// ```
/// use atscale_core::RetryThrottle;
///
/// let throttle = RetryThrottle::new(10, 0.1)?;
/// for _ in 0..4 {
///     assert!(throttle.failure(), "9, 8, 7, 6 tokens: above 5, retries allowed");
/// }
/// assert!(!throttle.failure(), "5 tokens: not above max_tokens / 2");
/// throttle.success(); // 5.1
/// assert!(throttle.allows());
/// # Ok::<(), atscale_core::InvalidThrottle>(())
/// ```
#[derive(Clone)]
pub struct RetryThrottle {
    inner: Arc<Inner>,
}

struct Inner {
    /// Tokens, in thousandths.
    milli: AtomicU32,
    max_milli: u32,
    ratio_milli: u32,
}

/// The most tokens a throttle may hold (gRFC A6: `maxTokens` in `(0, 1000]`).
pub const MAX_TOKENS: u32 = 1000;

/// A [`RetryThrottle`] setting out of A6's range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidThrottle {
    field: &'static str,
    rule: &'static str,
}

impl InvalidThrottle {
    /// The setting that is out of range (`max_tokens` or `token_ratio`).
    pub const fn field(&self) -> &'static str {
        self.field
    }

    /// The rule it broke.
    pub const fn rule(&self) -> &'static str {
        self.rule
    }
}

impl fmt::Display for InvalidThrottle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!(
            "invalid retry throttle: {} {}",
            self.field, self.rule
        ))
    }
}

impl std::error::Error for InvalidThrottle {}

impl RetryThrottle {
    /// A throttle holding `max_tokens` tokens (1 to 1000) that gives back
    /// `token_ratio` per success (greater than 0; decimal places beyond
    /// three are ignored, as A6 says: 0.5466 is 0.546).
    ///
    /// # Errors
    ///
    /// [`InvalidThrottle`] when `max_tokens` is not in `1..=1000`, or
    /// `token_ratio` is not a number of at least 0.001.
    pub fn new(max_tokens: u32, token_ratio: f64) -> Result<Self, InvalidThrottle> {
        if !(1..=MAX_TOKENS).contains(&max_tokens) {
            return Err(InvalidThrottle {
                field: "max_tokens",
                rule: "must be in 1..=1000",
            });
        }
        let ratio_milli = milli(token_ratio).ok_or(InvalidThrottle {
            field: "token_ratio",
            rule: "must be a number of at least 0.001 (three decimals)",
        })?;
        let max_milli = max_tokens * 1000;
        Ok(RetryThrottle {
            inner: Arc::new(Inner {
                milli: AtomicU32::new(max_milli),
                max_milli,
                ratio_milli,
            }),
        })
    }

    /// Records a failed attempt with a retryable outcome (or a server
    /// pushback saying not to retry): takes one token. Returns whether a
    /// retry is still allowed, that is [`allows`](Self::allows) after the
    /// token was taken (gRPC Go's and Java's order).
    pub fn failure(&self) -> bool {
        let before = self
            .inner
            .milli
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_sub(1000))
            })
            .expect("the closure always returns Some");
        self.above(before.saturating_sub(1000))
    }

    /// Records a successful call: gives back `token_ratio` tokens, up to
    /// `max_tokens`.
    pub fn success(&self) {
        let (max, ratio) = (self.inner.max_milli, self.inner.ratio_milli);
        let _ = self
            .inner
            .milli
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t < max).then(|| (t + ratio).min(max))
            });
    }

    /// Whether retries and hedges are allowed now: more than
    /// `max_tokens / 2` tokens left.
    pub fn allows(&self) -> bool {
        self.above(self.inner.milli.load(Ordering::Acquire))
    }

    fn above(&self, milli: u32) -> bool {
        milli > self.inner.max_milli / 2
    }

    /// The tokens left now.
    pub fn tokens(&self) -> f64 {
        f64::from(self.inner.milli.load(Ordering::Acquire)) / 1000.0
    }

    /// The tokens left now, in thousandths (exact).
    pub fn milli_tokens(&self) -> u32 {
        self.inner.milli.load(Ordering::Acquire)
    }

    /// The most tokens the throttle holds (and starts with).
    pub fn max_tokens(&self) -> u32 {
        self.inner.max_milli / 1000
    }

    /// The tokens a success gives back (three decimals).
    pub fn token_ratio(&self) -> f64 {
        f64::from(self.inner.ratio_milli) / 1000.0
    }

    /// Whether `self` and `other` are clones of one throttle (share one count).
    pub fn same_as(&self, other: &RetryThrottle) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

/// `ratio` in thousandths, truncated to three decimals; `None` when that is
/// zero, negative, not a number, or too large to count.
fn milli(ratio: f64) -> Option<u32> {
    if !ratio.is_finite() || ratio <= 0.0 || ratio > f64::from(MAX_TOKENS) {
        return None;
    }
    // 0.29 * 1000 is 289.99999999999997 in binary floating point: nudge by
    // far less than a thousandth before truncating.
    let m = (ratio * 1000.0 + 1e-6).floor();
    (m >= 1.0).then_some(m as u32)
}

impl fmt::Debug for RetryThrottle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryThrottle")
            .field("tokens", &self.tokens())
            .field("max_tokens", &self.max_tokens())
            .field("token_ratio", &self.token_ratio())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a6_arithmetic_on_an_exact_sequence() {
        // maxTokens 10, tokenRatio 0.1: the A6 example.
        let t = RetryThrottle::new(10, 0.1).unwrap();
        assert_eq!(t.milli_tokens(), 10_000);
        let allowed: Vec<bool> = (0..7).map(|_| t.failure()).collect();
        // 9 8 7 6 5 4 3: allowed while > 5.
        assert_eq!(allowed, [true, true, true, true, false, false, false]);
        assert_eq!(t.milli_tokens(), 3_000);
        for _ in 0..5 {
            t.failure();
        }
        assert_eq!(t.milli_tokens(), 0, "never below zero");
        assert!(!t.allows());
        // 51 successes: 5.1 tokens, above the threshold again.
        for i in 1..=51 {
            t.success();
            assert_eq!(t.allows(), i == 51, "after {i} successes");
        }
        assert_eq!(t.milli_tokens(), 5_100);
        for _ in 0..100 {
            t.success();
        }
        assert_eq!(t.milli_tokens(), 10_000, "never above max_tokens");
    }

    #[test]
    fn ratio_keeps_three_decimals() {
        assert_eq!(RetryThrottle::new(3, 0.5466).unwrap().token_ratio(), 0.546);
        assert_eq!(RetryThrottle::new(3, 0.29).unwrap().token_ratio(), 0.29);
        assert_eq!(RetryThrottle::new(1000, 1.0).unwrap().token_ratio(), 1.0);
        let odd = RetryThrottle::new(3, 0.001).unwrap();
        odd.failure();
        odd.success();
        assert_eq!(odd.milli_tokens(), 2_001);
    }

    #[test]
    fn out_of_range_settings_are_errors() {
        assert_eq!(
            RetryThrottle::new(0, 0.1).unwrap_err().field(),
            "max_tokens"
        );
        assert_eq!(
            RetryThrottle::new(1001, 0.1).unwrap_err().field(),
            "max_tokens"
        );
        for bad in [0.0, -0.1, 0.0004, f64::NAN, f64::INFINITY] {
            assert_eq!(
                RetryThrottle::new(10, bad).unwrap_err().field(),
                "token_ratio",
                "{bad}"
            );
        }
        assert_eq!(
            RetryThrottle::new(0, 0.1).unwrap_err().to_string(),
            "invalid retry throttle: max_tokens must be in 1..=1000"
        );
    }

    #[test]
    fn an_odd_max_has_a_half_token_threshold() {
        // max 3: threshold 1.5; 2 tokens allow, 1 does not.
        let t = RetryThrottle::new(3, 1.0).unwrap();
        assert!(t.failure()); // 2
        assert!(!t.failure()); // 1
        t.success(); // 2
        assert!(t.allows());
    }

    #[test]
    fn clones_share_one_count_across_threads() {
        let t = RetryThrottle::new(1000, 0.5).unwrap();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        t.failure();
                        t.success();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        // Each pair is -1 then +0.5, never clamped (the count stays far from
        // both ends): 1000 - 400 * 0.5.
        assert_eq!(t.milli_tokens(), 800_000);
        assert!(t.same_as(&t.clone()));
    }
}
