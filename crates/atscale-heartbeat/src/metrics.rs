//! The heartbeat's metrics (the `metrics` feature); without the feature
//! every function is an empty inline no-op.
//!
//! Names: [`atscale_core::metrics`].

use crate::pulse::Outcome;

#[cfg(feature = "metrics")]
mod imp {
    use atscale_core::metrics::{HEARTBEAT_IN_FLIGHT, HEARTBEAT_PULSES_DROPPED, HEARTBEAT_STALLS};

    use crate::pulse::Outcome;

    use std::sync::OnceLock;

    use ::metrics::Gauge;
    use atscale_core::metrics::enabled;

    /// Registered once: a recorder's lookup is ~100 ns, an emission one add.
    fn in_flight() -> &'static Gauge {
        static IN_FLIGHT: OnceLock<Gauge> = OnceLock::new();
        IN_FLIGHT.get_or_init(|| ::metrics::gauge!(HEARTBEAT_IN_FLIGHT))
    }

    #[inline]
    pub(crate) fn started() {
        if !enabled() {
            return;
        }
        in_flight().increment(1.0);
    }

    #[inline]
    pub(crate) fn finished(outcome: Outcome) {
        if !enabled() {
            return;
        }
        in_flight().decrement(1.0);
        if outcome == Outcome::Stalled {
            ::metrics::counter!(HEARTBEAT_STALLS).increment(1);
        }
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
    use crate::pulse::Outcome;

    #[inline(always)]
    pub(crate) fn started() {}

    #[inline(always)]
    pub(crate) fn finished(_: Outcome) {}

    #[inline(always)]
    pub(crate) fn pulses_dropped(_: u64) {}
}

/// A request entered the heartbeat.
#[inline(always)]
pub(crate) fn started() {
    imp::started();
}

/// A request left the heartbeat with `outcome`.
#[inline(always)]
pub(crate) fn finished(outcome: Outcome) {
    imp::finished(outcome);
}

/// A subscriber fell behind and missed `n` pulses.
#[inline(always)]
pub(crate) fn pulses_dropped(n: u64) {
    imp::pulses_dropped(n);
}
