use std::time::Duration;

use super::{Algorithm, Sample, nanos};

/// TCP Vegas applied to concurrency (Netflix concurrency-limits'
/// `VegasLimit`): estimates the queue as `limit × (1 − rtt_min / rtt)` and
/// keeps it between `alpha = 3·log10(limit)` and `beta = 6·log10(limit)`:
/// grows by `beta` when the queue is under `log10(limit)`, by `log10(limit)`
/// under `alpha`, shrinks by `log10(limit)` over `beta` or on a drop.
///
/// Unlike Netflix's, the limit still shrinks while fewer than half of it are
/// in use, if the queue estimate says so (it only stops growing then); it
/// grows only on a request admitted under the current limit, as TCP Vegas
/// grows once per round trip (the answers of requests admitted before the
/// last increase all say the same thing: the older, lower limit was fine);
/// and a latency under `tolerance` (5 ms by default, CoDel's target) is not
/// counted as queueing: `rtt_min` is taken as at least `tolerance`. A fast
/// service's latency jitters by several times its minimum (a scheduler, a
/// request body arriving in a later read); without the tolerance that jitter
/// reads as a queue of nearly the whole limit and drives the limit to its
/// minimum, where requests wait in the layer for nothing. Last, a limit far
/// above the use decays (RFC 7661's congestion window validation): while
/// fewer than half of it are in flight and the queue estimate is low, each
/// answer brings it down by `log10(limit)`, to no less than twice the most
/// requests in flight over the last round or two (a round: a limit's worth
/// of answers) plus `beta`. A limit learnt against a wrong minimum latency
/// (the first answers of a cold start already queued) otherwise stays there
/// while a deadline keeps traffic away, and lets a whole limit of requests
/// in at once when it returns, every one of them too late. For the same
/// reason a new minimum latency under half the old one forgets the rounds
/// before it: those answers were queued, what they had in flight validated
/// nothing.
///
/// The answers of one round of admissions cut the limit by half at most
/// (no cut takes it under half the limit its request was admitted under),
/// as TCP halves its window once per round trip: a stall of the whole
/// process (a CPU quota throttled, a starved machine) delays every answer
/// in flight at once, and cut by each of them the limit would fall to its
/// minimum for a round in which nothing queued in the service.
///
/// The minimum latency is re-learnt every `probe` samples × limit (default
/// 30), so a lasting change of the service's speed is learnt. Unlike
/// Netflix's, which then takes the current latency (queueing included) as
/// the new minimum and so lets the limit creep up at every probe while the
/// service is saturated, this one probes as BBR does: it halves the limit
/// until a limit's worth of requests admitted at that concurrency have
/// answered, takes their minimum, and restores the limit.
#[derive(Clone, Debug)]
pub struct Vegas {
    rtt_min: f64,
    /// In nanoseconds.
    tolerance: f64,
    probe: u64,
    seen: u64,
    smoothing: f64,
    probing: Option<Probe>,
    /// The most in flight at admission this round, and the last round.
    peak: f64,
    last_peak: f64,
    round: u64,
}

/// A probe of the minimum latency in progress.
#[derive(Clone, Copy, Debug)]
struct Probe {
    /// The limit to restore.
    before: f64,
    /// The halved limit probed at.
    at: f64,
    /// Samples admitted at or under `at` so far.
    samples: u64,
}

impl Default for Vegas {
    fn default() -> Self {
        Vegas {
            rtt_min: f64::INFINITY,
            tolerance: 5e6,
            probe: 30,
            seen: 0,
            smoothing: 1.0,
            probing: None,
            peak: 0.0,
            last_peak: 0.0,
            round: 0,
        }
    }
}

impl Vegas {
    /// Netflix's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Re-learn the minimum latency after this many samples per unit of limit (default 30).
    #[must_use]
    pub fn probe(mut self, probe: u64) -> Self {
        self.probe = probe.max(1);
        self
    }

    /// Latency up to this is never counted as queueing (default 5 ms,
    /// CoDel's default target; zero: Netflix's behaviour).
    #[must_use]
    pub fn tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = nanos(tolerance);
        self
    }

    /// The weight of each new estimate (default 1, in (0, 1]).
    #[must_use]
    pub fn smoothing(mut self, smoothing: f64) -> Self {
        self.smoothing = smoothing.clamp(f64::MIN_POSITIVE, 1.0);
        self
    }
}

fn log10(limit: f64) -> f64 {
    limit.max(1.0).log10().max(1.0)
}

impl Algorithm for Vegas {
    fn update(&mut self, limit: f64, sample: &Sample) -> f64 {
        let rtt = nanos(sample.latency()).max(1.0);
        if let Some(mut probe) = self.probing {
            // Only requests admitted under the halved limit measure it.
            if sample.in_flight() as f64 <= probe.at {
                self.rtt_min = self.rtt_min.min(rtt);
                probe.samples += 1;
            }
            if probe.samples as f64 >= probe.at {
                self.probing = None;
                return probe.before;
            }
            self.probing = Some(probe);
            return probe.at;
        }
        self.seen += 1;
        if self.seen as f64 > self.probe as f64 * limit && !sample.dropped() {
            self.seen = 0;
            self.rtt_min = f64::INFINITY;
            let at = (limit / 2.0).floor().max(1.0);
            self.probing = Some(Probe {
                before: limit,
                at,
                samples: 0,
            });
            return at;
        }
        if rtt < self.rtt_min {
            if rtt < self.rtt_min / 2.0 {
                // The answers before were queued: what they had in flight
                // validated nothing.
                (self.peak, self.last_peak, self.round) = (0.0, 0.0, 0);
            }
            self.rtt_min = rtt;
            return limit;
        }
        let queue = (limit * (1.0 - self.rtt_min.max(self.tolerance) / rtt)).ceil();
        let step = log10(limit);
        let (alpha, beta) = (3.0 * step, 6.0 * step);
        let app_limited = (sample.in_flight() as f64) * 2.0 < limit;
        // Admitted before the limit last grew: it tells nothing of this one.
        let stale = sample.limit().is_some_and(|l| (l as f64) < limit.floor());
        // The most requests in flight at once over the last round or two
        // (a round: a limit's worth of samples).
        let n = sample.in_flight() as f64;
        self.peak = self.peak.max(n);
        self.round += 1;
        let used = self.peak.max(self.last_peak);
        if self.round as f64 >= limit {
            (self.last_peak, self.peak, self.round) = (self.peak, 0.0, 0);
        }
        let floor = 2.0 * used + beta;
        // A cut never takes the limit under half the limit the request was
        // admitted under: the answers of one round of admissions halve it at
        // most, as TCP halves its window once per round trip. A stall of the
        // whole process (a CPU quota throttled, the machine starved) delays
        // every answer in flight at once; cut by each of them, the limit
        // would fall to its minimum for a round in which nothing queued.
        // Answers admitted after the cut may cut again.
        let cut = |limit: f64| match sample.limit() {
            Some(admitted) => (limit - step).max((admitted as f64 / 2.0).min(limit)),
            None => limit - step,
        };
        let estimate = if sample.dropped() {
            cut(limit)
        } else if app_limited && queue < alpha && limit > floor {
            // A limit far above the use was never validated: it decays
            // toward twice the use (RFC 7661's congestion window validation).
            (limit - step).max(floor)
        } else if (app_limited || stale) && queue < alpha {
            // Not the bottleneck, or not yet known: do not grow (but do
            // shrink, below).
            return limit;
        } else if queue <= step {
            limit + beta
        } else if queue < alpha {
            limit + step
        } else if queue > beta {
            cut(limit)
        } else {
            return limit;
        };
        limit * (1.0 - self.smoothing) + estimate * self.smoothing
    }
}
