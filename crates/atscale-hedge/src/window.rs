//! The rolling latency window behind the adaptive delay: two lock-free
//! log-linear histograms at microsecond resolution, rotated by time.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Linear sub-buckets per power of two: values are kept within 1/32 (~3%).
const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS;
/// Values below this many microseconds get a bucket each.
const LINEAR: u64 = 2 * SUB as u64;
/// Largest recorded value: 2^36 µs, about 19 hours; longer ones are clamped.
const MAX_EXP: u32 = 36;
pub(crate) const BUCKETS: usize = LINEAR as usize + (MAX_EXP - SUB_BITS - 1) as usize * SUB;

/// The bucket of a latency in microseconds.
pub(crate) fn bucket(micros: u64) -> usize {
    let v = micros.min((1 << MAX_EXP) - 1);
    if v < LINEAR {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS + 1
    let shift = exp - SUB_BITS;
    let mantissa = (v >> shift) as usize; // in [SUB, 2 * SUB)
    LINEAR as usize + (exp - SUB_BITS - 1) as usize * SUB + (mantissa - SUB)
}

/// The largest latency (µs) that falls in bucket `i`: percentiles are
/// rounded up, so a hedge never fires before the latency it stands for.
pub(crate) fn upper(i: usize) -> u64 {
    if (i as u64) < LINEAR {
        return i as u64;
    }
    let j = i - LINEAR as usize;
    let shift = (j / SUB) as u32 + 1;
    let mantissa = (j % SUB + SUB) as u64;
    ((mantissa + 1) << shift) - 1
}

struct Half {
    /// The period this half holds, or `u64::MAX` when empty.
    period: AtomicU64,
    count: AtomicU64,
    buckets: Box<[AtomicU32]>,
}

impl Half {
    fn new() -> Self {
        Half {
            period: AtomicU64::new(u64::MAX),
            count: AtomicU64::new(0),
            buckets: (0..BUCKETS).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    fn clear(&self, period: u64) {
        for b in self.buckets.iter() {
            b.store(0, Ordering::Relaxed);
        }
        self.count.store(0, Ordering::Relaxed);
        self.period.store(period, Ordering::Release);
    }
}

/// No delay yet (not enough samples).
const UNARMED: u64 = u64::MAX;
/// Recompute the percentile after this many samples (and at each rotation).
const REFRESH_EVERY: u64 = 128;

/// Latencies over the current and the previous half-window.
///
/// Recording is a few relaxed atomic adds; the percentile is recomputed by
/// whoever records every 128th sample or starts a new half, and read by every
/// request as one atomic load. Samples racing with a rotation may land in the
/// half being cleared and be lost: the window is a statistic, not a ledger.
pub(crate) struct LatencyWindow {
    half_nanos: u64,
    percentile: f64,
    min_samples: u64,
    current: AtomicU64,
    /// When the current half ends, in the clock's nanoseconds: the fast
    /// path compares with it instead of dividing.
    ends: AtomicU64,
    halves: [Half; 2],
    delay_micros: AtomicU64,
    /// A request that reaches the delay sends all its hedges at once.
    together: bool,
}

impl std::fmt::Debug for LatencyWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyWindow")
            .field("percentile", &self.percentile)
            .field("together", &self.together)
            .field("min_samples", &self.min_samples)
            .field("delay", &self.delay())
            .finish_non_exhaustive()
    }
}

impl LatencyWindow {
    pub(crate) fn new(percentile: f64, min_samples: u32, window: Duration) -> Self {
        let half = (window.as_nanos() / 2).clamp(1, u64::MAX as u128) as u64;
        let halves = [Half::new(), Half::new()];
        halves[0].period.store(0, Ordering::Relaxed);
        LatencyWindow {
            half_nanos: half,
            percentile,
            min_samples: u64::from(min_samples),
            current: AtomicU64::new(0),
            ends: AtomicU64::new(half),
            halves,
            delay_micros: AtomicU64::new(UNARMED),
            together: false,
        }
    }

    /// Whether a request that reaches the delay sends all its hedges at once
    /// (the percentile follows the budget) rather than one per delay.
    pub(crate) fn together(mut self, together: bool) -> Self {
        self.together = together;
        self
    }

    pub(crate) fn sends_together(&self) -> bool {
        self.together
    }

    /// Moves the window to `now`'s half if time has passed (`now` in the
    /// clock's nanoseconds); returns the period.
    fn advance(&self, now: u64) -> u64 {
        let nanos = now;
        let seen = self.current.load(Ordering::Acquire);
        if nanos < self.ends.load(Ordering::Acquire) {
            return seen;
        }
        let period = (nanos / self.half_nanos).min(u64::MAX - 2);
        if period > seen
            && self
                .current
                .compare_exchange(seen, period, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // We won the rotation: empty the half that now holds `period`, and
            // the other one too if it is older than the previous period.
            self.ends.store(
                (period + 1).saturating_mul(self.half_nanos),
                Ordering::Release,
            );
            self.halves[(period % 2) as usize].clear(period);
            let other = &self.halves[((period + 1) % 2) as usize];
            if other.period.load(Ordering::Acquire) != period - 1 {
                other.clear(u64::MAX);
            }
            self.refresh(period);
        }
        period.max(seen)
    }

    /// Records one latency observed at `now`.
    pub(crate) fn record(&self, latency: Duration, now: u64) {
        let period = self.advance(now);
        let half = &self.halves[(period % 2) as usize];
        if half.period.load(Ordering::Acquire) != period {
            return; // a rotation is under way
        }
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        half.buckets[bucket(micros)].fetch_add(1, Ordering::Relaxed);
        let n = half.count.fetch_add(1, Ordering::Relaxed) + 1;
        // While unarmed, `refresh` is a sum of two counts until enough samples are in.
        if n.is_multiple_of(REFRESH_EVERY) || self.delay_micros.load(Ordering::Relaxed) == UNARMED {
            self.refresh(period);
        }
    }

    /// The delay to hedge at, or `None` while the window holds too few samples.
    pub(crate) fn delay_at(&self, now: u64) -> Option<Duration> {
        self.advance(now);
        self.delay()
    }

    /// The last computed delay.
    pub(crate) fn delay(&self) -> Option<Duration> {
        match self.delay_micros.load(Ordering::Acquire) {
            UNARMED => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    fn refresh(&self, period: u64) {
        let live = |h: &Half| {
            let p = h.period.load(Ordering::Acquire);
            p == period || (period > 0 && p == period - 1)
        };
        let [a, b] = [live(&self.halves[0]), live(&self.halves[1])];
        let count = |h: &Half, on: bool| {
            if on {
                h.count.load(Ordering::Relaxed)
            } else {
                0
            }
        };
        let total = count(&self.halves[0], a) + count(&self.halves[1], b);
        if total < self.min_samples.max(1) {
            self.delay_micros.store(UNARMED, Ordering::Release);
            return;
        }
        let target = ((self.percentile * total as f64).ceil() as u64).clamp(1, total);
        let bucket = |h: &Half, on: bool, i: usize| {
            if on {
                u64::from(h.buckets[i].load(Ordering::Relaxed))
            } else {
                0
            }
        };
        let mut seen = 0u64;
        for i in 0..BUCKETS {
            seen += bucket(&self.halves[0], a, i) + bucket(&self.halves[1], b, i);
            if seen >= target {
                self.delay_micros.store(upper(i), Ordering::Release);
                return;
            }
        }
        // Counts raced ahead of buckets: keep the previous delay.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn buckets_hold_their_values_within_three_percent(v in 0u64..(1 << 36)) {
            let i = bucket(v);
            prop_assert!(i < BUCKETS);
            prop_assert!(upper(i) >= v);
            prop_assert!(upper(i) - v <= v / 32 + 1, "v {v} upper {}", upper(i));
            if i > 0 {
                prop_assert!(upper(i - 1) < v);
            }
        }
    }

    #[test]
    fn bucket_bounds_are_contiguous() {
        for i in 1..BUCKETS {
            assert_eq!(bucket(upper(i - 1) + 1), i, "bucket {i}");
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn percentile_arms_after_min_samples_and_rolls_off() {
        let w = LatencyWindow::new(0.9, 100, Duration::from_secs(2));
        let now = 0;
        for i in 1..=99u64 {
            w.record(Duration::from_micros(i * 100), now);
        }
        assert_eq!(w.delay_at(now), None, "99 samples are not enough");
        w.record(Duration::from_micros(10_000), now);
        // 90th of 100..=9,900 µs and 10,000 µs: 9,000 µs, within 3%.
        let d = w.delay_at(now).unwrap();
        assert!(
            d >= Duration::from_micros(9_000) && d <= Duration::from_micros(9_300),
            "{d:?}"
        );
        // One half later the samples still count ...
        assert!(w.delay_at(SECOND).is_some());
        // ... two halves later they are gone.
        assert_eq!(w.delay_at(2 * SECOND), None);
    }

    #[test]
    fn sub_millisecond_latencies_are_told_apart() {
        let w = LatencyWindow::new(0.5, 10, Duration::from_secs(2));
        let now = 0;
        for _ in 0..10 {
            w.record(Duration::from_micros(250), now);
        }
        let d = w.delay_at(now).unwrap();
        assert!(
            d >= Duration::from_micros(250) && d <= Duration::from_micros(258),
            "{d:?}"
        );
    }
}
