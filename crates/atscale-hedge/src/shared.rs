//! State shared by a layer and every service and clone built from it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::budget::HedgeBudget;
use crate::window::LatencyWindow;

#[derive(Debug)]
pub(crate) enum DelaySource {
    Fixed(Duration),
    Adaptive(LatencyWindow),
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Requests, counted here only when there is no budget (which counts them).
    pub(crate) requests: AtomicU64,
    pub(crate) sent: AtomicU64,
    pub(crate) won: AtomicU64,
    pub(crate) denied: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) delay: DelaySource,
    pub(crate) budget: Option<HedgeBudget>,
    pub(crate) max_attempts: u8,
    pub(crate) non_idempotent: bool,
    pub(crate) counters: Counters,
}

impl Shared {
    /// Counts a request arriving at `now`, and returns the delay before its
    /// first hedge (`None`: this request is not hedged on time).
    pub(crate) fn arrive(&self, now: Instant) -> Option<Duration> {
        match &self.budget {
            Some(b) => b.arrive(now),
            None => {
                self.counters.requests.fetch_add(1, Ordering::Relaxed);
            }
        }
        match &self.delay {
            DelaySource::Fixed(d) => Some(*d),
            DelaySource::Adaptive(w) => w.delay_at(now),
        }
    }

    pub(crate) fn requests(&self) -> u64 {
        match &self.budget {
            Some(b) => b.arrivals(),
            None => self.counters.requests.load(Ordering::Relaxed),
        }
    }

    /// Records a latency, if the delay is adaptive.
    pub(crate) fn record(&self, latency: Duration, now: Instant) {
        if let DelaySource::Adaptive(w) = &self.delay {
            w.record(latency, now);
        }
    }

    pub(crate) fn is_adaptive(&self) -> bool {
        matches!(self.delay, DelaySource::Adaptive(_))
    }

    /// Takes one hedge from the budget (always granted without a budget).
    pub(crate) fn try_hedge(&self, now: Instant) -> bool {
        let granted = self.budget.as_ref().is_none_or(|b| b.try_acquire(now));
        if granted {
            self.counters.sent.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
        }
        granted
    }
}
