//! The heartbeat's metrics (the `metrics` feature); without the feature
//! every function is an empty inline no-op.
//!
//! Names: [`atscale_core::metrics`].
//!
//! `atscale.heartbeat.in_flight` is not moved per request (a gauge update
//! is a compare-and-swap loop in most recorders). Each monitor adds its
//! count of requests in flight, read from the counters it keeps anyway,
//! at moments that cost nothing per request:
//!
//! - when a request finishes and leaves the monitor idle while the gauge
//!   still holds some of its requests (so the gauge is exact whenever the
//!   monitor is idle);
//! - once a second, from a task the monitor spawns at its first request
//!   after [`enable`](atscale_core::metrics::enable) (it holds no strong
//!   handle and stops with the monitor);
//! - whenever the monitor's counts are read: [`Monitor::counts`],
//!   [`Monitor::in_flight`], [`Monitor::health`] (so a health probe
//!   refreshes it), the `wait_*` calls, and each interval beat;
//! - when the monitor is dropped (its share goes back to zero).
//!
//! So the gauge is the sum over monitors, exact when a monitor is idle or
//! has just been read, and at most a second old otherwise.
//!
//! [`Monitor::counts`]: crate::Monitor::counts
//! [`Monitor::in_flight`]: crate::Monitor::in_flight
//! [`Monitor::health`]: crate::Monitor::health

use std::sync::Arc;

use crate::monitor::Shared;
use crate::pulse::Outcome;

#[cfg(feature = "metrics")]
mod imp {
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, OnceLock, Weak};
    use std::time::Duration;

    use ::metrics::Gauge;
    use atscale_core::metrics::{
        HEARTBEAT_IN_FLIGHT, HEARTBEAT_PULSES_DROPPED, HEARTBEAT_STALLS, enabled,
    };
    use tokio::sync::Notify;

    use crate::monitor::Shared;
    use crate::pulse::Outcome;

    /// How often the refresher task sets the gauge.
    const REFRESH: Duration = Duration::from_secs(1);

    /// Registered once: a recorder's lookup is ~100 ns, an emission one add.
    fn in_flight() -> &'static Gauge {
        static IN_FLIGHT: OnceLock<Gauge> = OnceLock::new();
        IN_FLIGHT.get_or_init(|| ::metrics::gauge!(HEARTBEAT_IN_FLIGHT))
    }

    #[inline]
    pub(crate) fn started(shared: &Arc<Shared>) {
        if enabled() && !shared.refresher_running.load(Ordering::Relaxed) {
            spawn_refresher(shared);
        }
    }

    #[inline]
    pub(crate) fn finished(shared: &Shared, outcome: Outcome) {
        if !enabled() {
            return;
        }
        if outcome == Outcome::Stalled {
            ::metrics::counter!(HEARTBEAT_STALLS).increment(1);
        }
        if shared.shown.load(Ordering::Relaxed) != 0 && shared.in_flight_now() == 0 {
            refresh(shared);
        }
    }

    /// Sets this monitor's share of the gauge to its requests in flight.
    ///
    /// Whoever writes last reads the count again after its write and
    /// writes again if it changed meanwhile, so once requests stop coming
    /// the gauge is exact whatever order the writers ran in.
    pub(crate) fn refresh(shared: &Shared) {
        if !enabled() {
            return;
        }
        for _ in 0..8 {
            let now = shared.in_flight_now() as i64;
            let shown = shared.shown.swap(now, Ordering::SeqCst);
            if now != shown {
                in_flight().increment((now - shown) as f64);
            }
            if shared.in_flight_now() as i64 == now {
                return;
            }
        }
    }

    pub(crate) fn dropped(shared: &Shared) {
        let shown = shared.shown.swap(0, Ordering::SeqCst);
        if shown != 0 {
            in_flight().decrement(shown as f64);
        }
    }

    /// At a monitor's first request after `enable()`: registers the gauge
    /// (so a scrape shows it, at 0, before it first moves) and spawns the
    /// refresher.
    #[cold]
    fn spawn_refresher(shared: &Arc<Shared>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if shared
            .refresher_running
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return;
        }
        in_flight();
        runtime.spawn(refresher(
            Arc::downgrade(shared),
            shared.refresher_stop.clone(),
        ));
    }

    /// Spawned once per monitor (never again, even if its runtime goes
    /// away or has no timers: no task per request in any case).
    async fn refresher(weak: Weak<Shared>, stop: Arc<Notify>) {
        let first = tokio::time::Instant::now();
        crate::monitor::periodic(weak, stop, first, REFRESH, |shared| {
            refresh(shared);
            true
        })
        .await;
    }

    #[inline]
    pub(crate) fn pulses_dropped(n: u64) {
        if !enabled() {
            return;
        }
        ::metrics::counter!(HEARTBEAT_PULSES_DROPPED).increment(n);
    }
}

#[cfg(not(feature = "metrics"))]
mod imp {
    use std::sync::Arc;

    use crate::monitor::Shared;
    use crate::pulse::Outcome;

    #[inline(always)]
    pub(crate) fn started(_: &Arc<Shared>) {}

    #[inline(always)]
    pub(crate) fn finished(_: &Shared, _: Outcome) {}

    #[inline(always)]
    pub(crate) fn refresh(_: &Shared) {}

    #[inline(always)]
    pub(crate) fn dropped(_: &Shared) {}

    #[inline(always)]
    pub(crate) fn pulses_dropped(_: u64) {}
}

/// A request entered the heartbeat.
#[inline(always)]
pub(crate) fn started(shared: &Arc<Shared>) {
    imp::started(shared);
}

/// A request left the heartbeat with `outcome`.
#[inline(always)]
pub(crate) fn finished(shared: &Shared, outcome: Outcome) {
    imp::finished(shared, outcome);
}

/// Sets the monitor's share of the in-flight gauge from its counters.
#[inline(always)]
pub(crate) fn refresh(shared: &Shared) {
    imp::refresh(shared);
}

/// The monitor is gone: its share of the in-flight gauge too.
#[inline(always)]
pub(crate) fn dropped(shared: &Shared) {
    imp::dropped(shared);
}

/// A subscriber fell behind and missed `n` pulses.
#[inline(always)]
pub(crate) fn pulses_dropped(n: u64) {
    imp::pulses_dropped(n);
}
