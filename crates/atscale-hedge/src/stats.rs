//! Counters readable while the service runs.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::shared::{DelaySource, Shared};

/// A read-only view of a hedged service's counters, shared by the layer and
/// every service and clone built from it.
///
/// Get one from [`HedgeLayer::stats`](crate::HedgeLayer::stats) or
/// [`Hedge::stats`](crate::Hedge::stats). Counters are relaxed atomics: each
/// is exact, but two read one after the other may be a few requests apart.
#[derive(Clone)]
pub struct HedgeStats {
    pub(crate) shared: Arc<Shared>,
}

impl HedgeStats {
    /// Requests seen (each counts once, however many attempts it made).
    pub fn requests(&self) -> u64 {
        self.shared.requests()
    }

    /// Extra attempts sent (hedges), over all requests.
    pub fn hedges_sent(&self) -> u64 {
        self.shared.counters.sent.load(Ordering::Relaxed)
    }

    /// Requests whose answer came from a hedge rather than the first attempt.
    pub fn hedges_won(&self) -> u64 {
        self.shared.counters.won.load(Ordering::Relaxed)
    }

    /// Times the budget refused a hedge the delay asked for (a request still
    /// waiting asks again one delay later — a quarter of one when the delay
    /// follows the budget — so one request may count several times).
    pub fn budget_denials(&self) -> u64 {
        self.shared.counters.denied.load(Ordering::Relaxed)
    }

    /// The delay a request arriving now would wait before its first hedge;
    /// `None` while an adaptive delay has too few samples.
    pub fn current_delay(&self) -> Option<Duration> {
        match &self.shared.delay {
            DelaySource::Fixed(d) => Some(*d),
            DelaySource::Adaptive(w) => w.delay(),
        }
    }

    /// Hedges sent per request so far (`0.05` = 5% extra load).
    pub fn extra_load(&self) -> f64 {
        let requests = self.requests();
        if requests == 0 {
            0.0
        } else {
            self.hedges_sent() as f64 / requests as f64
        }
    }
}

impl std::fmt::Debug for HedgeStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HedgeStats")
            .field("requests", &self.requests())
            .field("hedges_sent", &self.hedges_sent())
            .field("hedges_won", &self.hedges_won())
            .field("budget_denials", &self.budget_denials())
            .field("current_delay", &self.current_delay())
            .finish()
    }
}
