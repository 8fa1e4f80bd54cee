use std::time::Duration;

use super::{Algorithm, Sample};

/// Additive increase, multiplicative decrease: the limit grows by one per
/// request while at least half of it is in use, and is multiplied by
/// `backoff` (default 0.9) when a request is dropped or takes longer than
/// `latency` (default 1 s).
#[derive(Clone, Debug)]
pub struct Aimd {
    backoff: f64,
    latency: Duration,
}

impl Default for Aimd {
    fn default() -> Self {
        Aimd {
            backoff: 0.9,
            latency: Duration::from_secs(1),
        }
    }
}

impl Aimd {
    /// Backoff 0.9, latency threshold 1 s.
    pub fn new() -> Self {
        Self::default()
    }

    /// The factor applied on a drop (default 0.9, in [0.5, 1)).
    #[must_use]
    pub fn backoff(mut self, backoff: f64) -> Self {
        self.backoff = backoff.clamp(0.5, 0.999);
        self
    }

    /// A request slower than this counts as a drop (default 1 s).
    #[must_use]
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }
}

impl Algorithm for Aimd {
    fn update(&mut self, limit: f64, sample: &Sample) -> f64 {
        if sample.dropped() || sample.latency() > self.latency {
            limit * self.backoff
        } else if (sample.in_flight() as f64) * 2.0 >= limit {
            limit + 1.0
        } else {
            limit
        }
    }
}
