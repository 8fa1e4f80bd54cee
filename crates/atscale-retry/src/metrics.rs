//! The retry layer's metrics (the `metrics` feature); without the feature
//! every function is an empty inline no-op.
//!
//! Names: [`atscale_core::metrics`].

use atscale_core::RetryThrottle;

#[cfg(feature = "metrics")]
mod imp {
    use atscale_core::RetryThrottle;
    use atscale_core::metrics::{RETRY_ATTEMPTS, RETRY_THROTTLE_TOKENS};

    use std::sync::OnceLock;

    use ::metrics::Counter;
    use atscale_core::metrics::enabled;

    #[inline]
    pub(crate) fn first() {
        if !enabled() {
            return;
        }
        // Registered once: a recorder's lookup is ~100 ns, an emission one add.
        static FIRST: OnceLock<Counter> = OnceLock::new();
        FIRST
            .get_or_init(|| ::metrics::counter!(RETRY_ATTEMPTS, "attempt" => "first"))
            .increment(1);
    }

    #[inline]
    pub(crate) fn retried() {
        if !enabled() {
            return;
        }
        ::metrics::counter!(RETRY_ATTEMPTS, "attempt" => "retry").increment(1);
    }

    #[inline]
    pub(crate) fn throttle(throttle: Option<&RetryThrottle>) {
        if let (true, Some(t)) = (enabled(), throttle) {
            ::metrics::gauge!(RETRY_THROTTLE_TOKENS).set(t.tokens());
        }
    }
}

#[cfg(not(feature = "metrics"))]
mod imp {
    use atscale_core::RetryThrottle;

    #[inline(always)]
    pub(crate) fn first() {}

    #[inline(always)]
    pub(crate) fn retried() {}

    #[inline(always)]
    pub(crate) fn throttle(_: Option<&RetryThrottle>) {}
}

/// A request's first attempt was sent.
#[inline(always)]
pub(crate) fn first() {
    imp::first();
}

/// A retry was sent.
#[inline(always)]
pub(crate) fn retried() {
    imp::retried();
}

/// The throttle's token count changed.
#[inline(always)]
pub(crate) fn throttle(throttle: Option<&RetryThrottle>) {
    imp::throttle(throttle);
}
