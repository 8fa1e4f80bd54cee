use super::{Algorithm, ExpAvg, Sample, nanos};

/// Netflix concurrency-limits' `Gradient2Limit`: compares a short-term
/// latency (the last sample) with a long-term average, and shrinks the limit
/// in proportion when the short one grows (queueing), or grows it by a small
/// queue allowance when they agree.
///
/// `new_limit = limit × gradient + queue`, with
/// `gradient = clamp(tolerance × long / short, 0.5, 1)`, smoothed:
/// `limit × (1 − smoothing) + new_limit × smoothing`. The long average decays
/// faster when it is more than twice the short one, so the limit recovers
/// soon after a period of overload. The limit does not grow while fewer
/// than half of it are in use (the service is not the bottleneck then), but
/// unlike Netflix's it still shrinks then: a limit far above the demand
/// would otherwise stay there while the service slows down, and be wrong
/// the moment demand rises.
///
/// A dropped request (cut by its deadline, or refused downstream as
/// overloaded) counts as the largest gradient, 0.5: its latency was cut short
/// and says nothing of the queue. Netflix's ignores drops, which lets the
/// limit grow without bound behind a deadline that caps every latency.
///
/// Defaults as Netflix's: tolerance 1.5, smoothing 0.2, queue 4, long
/// window 600 samples.
#[derive(Clone, Debug)]
pub struct Gradient2 {
    tolerance: f64,
    smoothing: f64,
    queue: f64,
    long: ExpAvg,
}

impl Default for Gradient2 {
    fn default() -> Self {
        Gradient2 {
            tolerance: 1.5,
            smoothing: 0.2,
            queue: 4.0,
            long: ExpAvg::new(600, 10),
        }
    }
}

impl Gradient2 {
    /// Netflix's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// How much slower than the long-term average a request may be before the
    /// limit shrinks (default 1.5, at least 1).
    #[must_use]
    pub fn tolerance(mut self, tolerance: f64) -> Self {
        self.tolerance = tolerance.max(1.0);
        self
    }

    /// The weight of each new estimate (default 0.2, in (0, 1]).
    #[must_use]
    pub fn smoothing(mut self, smoothing: f64) -> Self {
        self.smoothing = smoothing.clamp(f64::MIN_POSITIVE, 1.0);
        self
    }

    /// The queue allowance added to each estimate (default 4).
    #[must_use]
    pub fn queue(mut self, queue: f64) -> Self {
        self.queue = queue.max(0.0);
        self
    }
}

impl Algorithm for Gradient2 {
    fn update(&mut self, limit: f64, sample: &Sample) -> f64 {
        let short = nanos(sample.latency()).max(1.0);
        let long = self.long.add(short);
        if long / short > 2.0 {
            self.long.set(long * 0.95);
        }
        // A request cut by its deadline measured at most its deadline, not
        // how long it would have taken: count it as the worst queueing.
        let gradient = if sample.dropped() {
            0.5
        } else {
            (self.tolerance * long / short).clamp(0.5, 1.0)
        };
        let estimate = limit * gradient + self.queue;
        let next = limit * (1.0 - self.smoothing) + estimate * self.smoothing;
        if (sample.in_flight() as f64) < limit / 2.0 {
            // App-limited: the limit is not what holds requests back, so it
            // must not grow; it still shrinks when latency says so.
            return next.min(limit);
        }
        next
    }
}
