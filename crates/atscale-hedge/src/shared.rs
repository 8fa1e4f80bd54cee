//! State shared by a layer and every service and clone built from it.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::budget::HedgeBudget;
use crate::metrics;
use crate::window::LatencyWindow;
use atscale_core::{Clock, RetryThrottle};

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
    pub(crate) clock: Clock,
    /// The retry throttle hedges also consult (gRFC A6), if one is set:
    /// when built, or later by a stack ([`HedgeLayer::adopt_throttle`](crate::HedgeLayer::adopt_throttle)).
    pub(crate) throttle: OnceLock<RetryThrottle>,
}

impl Shared {
    /// Counts a request arriving now (the clock is read here only for an
    /// adaptive delay: a fixed one needs none for a request answered on its
    /// first poll); returns when it arrived (adaptive, in the clock's
    /// nanoseconds), the delay before its first hedge (`None`: not hedged on
    /// time) and its position for the budget.
    pub(crate) fn arrive(&self) -> (Option<u64>, Option<Duration>, u64) {
        let (now, delay) = match &self.delay {
            DelaySource::Fixed(d) => (None, Some(*d)),
            DelaySource::Adaptive(w) => {
                let now = self.clock.now_nanos();
                (Some(now), w.delay_at(now))
            }
        };
        let position = match &self.budget {
            Some(b) => b.arrive(|| now.unwrap_or_else(|| self.clock.now_nanos())),
            None => self.counters.requests.fetch_add(1, Ordering::Relaxed),
        };
        metrics::arrived(delay);
        (now, delay, position)
    }

    pub(crate) fn requests(&self) -> u64 {
        match &self.budget {
            Some(b) => b.arrivals(),
            None => self.counters.requests.load(Ordering::Relaxed),
        }
    }

    /// Records a latency, if the delay is adaptive (`now` in the clock's
    /// nanoseconds).
    pub(crate) fn record(&self, latency: Duration, now: u64) {
        if let DelaySource::Adaptive(w) = &self.delay {
            w.record(latency, now);
        }
    }

    /// Notes that the request at `position` has its answer (for the
    /// budget's stragglers).
    pub(crate) fn finish(&self, position: u64) {
        if let Some(b) = &self.budget {
            b.finish(position);
        }
    }

    /// Whether a request that reaches its delay sends all its hedges at once.
    pub(crate) fn sends_together(&self) -> bool {
        matches!(&self.delay, DelaySource::Adaptive(w) if w.sends_together())
    }

    pub(crate) fn is_adaptive(&self) -> bool {
        matches!(self.delay, DelaySource::Adaptive(_))
    }

    /// When a request the budget refused asks again: one delay later, or a
    /// quarter of one when the delay follows the budget (a straggler among
    /// requests asking too early is told apart once its neighbours finish).
    pub(crate) fn ask_again(&self, delay: Duration) -> Duration {
        if self.sends_together() {
            delay / 4
        } else {
            delay
        }
    }

    /// Takes one hedge for the request at `position` from the budget (always
    /// granted without a budget); `needed`: its attempts failed
    /// (non-fatally), so it may take the budget's reserve as a straggler
    /// would.
    pub(crate) fn try_hedge(&self, position: u64, needed: bool) -> bool {
        let throttled = self.throttle.get().is_some_and(|t| !t.allows());
        let granted = !throttled
            && self
                .budget
                .as_ref()
                .is_none_or(|b| b.acquire(position, self.clock.now_nanos(), needed));
        if granted {
            self.counters.sent.fetch_add(1, Ordering::Relaxed);
            metrics::sent();
        } else {
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
            metrics::denied(throttled);
        }
        granted
    }
}
