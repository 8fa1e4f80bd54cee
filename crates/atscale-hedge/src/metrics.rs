//! The hedge's metrics and span field (the `metrics` feature); without the
//! feature every function is an empty inline no-op.
//!
//! Names: [`atscale_core::metrics`].

use std::time::Duration;

#[cfg(feature = "metrics")]
mod imp {
    use std::time::Duration;

    use atscale_core::metrics::{
        HEDGE_DELAY, HEDGE_DENIED, HEDGE_REQUESTS, HEDGE_SENT, HEDGE_WON, field,
    };

    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    use ::metrics::{Counter, Gauge};
    use atscale_core::metrics::enabled;

    use atscale_core::metrics::span_wanted;

    #[inline]
    pub(crate) fn arrived(delay: Option<Duration>) {
        if !enabled() {
            return;
        }
        // Registered once: a recorder's lookup is ~100 ns, an emission one add.
        static REQUESTS: OnceLock<Counter> = OnceLock::new();
        static DELAY: OnceLock<Gauge> = OnceLock::new();
        REQUESTS
            .get_or_init(|| ::metrics::counter!(HEDGE_REQUESTS))
            .increment(1);
        // The delay moves once a block (adaptive) or never (fixed): the
        // gauge is set when it changes, not per request.
        static LAST_NANOS: AtomicU64 = AtomicU64::new(u64::MAX);
        if let Some(delay) = delay {
            let nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX - 1);
            if LAST_NANOS.load(Ordering::Relaxed) != nanos {
                LAST_NANOS.store(nanos, Ordering::Relaxed);
                DELAY
                    .get_or_init(|| ::metrics::gauge!(HEDGE_DELAY))
                    .set(delay.as_secs_f64());
            }
        }
    }

    #[inline]
    pub(crate) fn sent() {
        if enabled() {
            ::metrics::counter!(HEDGE_SENT).increment(1);
        }
        if span_wanted() {
            tracing::Span::current().record(field::HEDGE_SENT, true);
        }
    }

    #[inline]
    pub(crate) fn won() {
        if !enabled() {
            return;
        }
        ::metrics::counter!(HEDGE_WON).increment(1);
    }

    #[inline]
    pub(crate) fn denied(throttled: bool) {
        if !enabled() {
            return;
        }
        if throttled {
            ::metrics::counter!(HEDGE_DENIED, "reason" => "throttle").increment(1);
        } else {
            ::metrics::counter!(HEDGE_DENIED, "reason" => "budget").increment(1);
        }
    }
}

#[cfg(not(feature = "metrics"))]
mod imp {
    use std::time::Duration;

    #[inline(always)]
    pub(crate) fn arrived(_: Option<Duration>) {}

    #[inline(always)]
    pub(crate) fn sent() {}

    #[inline(always)]
    pub(crate) fn won() {}

    #[inline(always)]
    pub(crate) fn denied(_: bool) {}
}

/// A request arrived; `delay`: the delay before its first hedge, if known.
#[inline(always)]
pub(crate) fn arrived(delay: Option<Duration>) {
    imp::arrived(delay);
}

/// A hedge was sent.
#[inline(always)]
pub(crate) fn sent() {
    imp::sent();
}

/// A hedge's answer was taken.
#[inline(always)]
pub(crate) fn won() {
    imp::won();
}

/// A hedge was not sent: the throttle said no (`throttled`), or the budget.
#[inline(always)]
pub(crate) fn denied(throttled: bool) {
    imp::denied(throttled);
}
