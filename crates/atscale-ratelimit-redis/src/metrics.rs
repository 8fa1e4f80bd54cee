//! The Redis store's metrics (the `metrics` feature); without the feature
//! every function is an empty inline no-op and [`RoundTrip`] is zero-sized.
//!
//! Names: [`atscale_core::metrics`].

#[cfg(feature = "metrics")]
mod imp {
    use std::time::Instant;

    use atscale_core::metrics::{REDIS_DURATION, REDIS_FAILURES, REDIS_FALLBACK};

    use atscale_core::metrics::enabled;

    /// One call to Redis: its duration is recorded when it drops (answered,
    /// failed, or abandoned).
    #[derive(Debug)]
    pub(crate) struct RoundTrip(Option<Instant>);

    impl RoundTrip {
        pub(crate) fn start() -> Self {
            RoundTrip(enabled().then(Instant::now))
        }
    }

    impl Drop for RoundTrip {
        fn drop(&mut self) {
            if let Some(start) = self.0 {
                ::metrics::histogram!(REDIS_DURATION).record(start.elapsed().as_secs_f64());
            }
        }
    }

    pub(crate) fn failed(open: bool) {
        if !enabled() {
            return;
        }
        ::metrics::counter!(REDIS_FAILURES).increment(1);
        if open {
            ::metrics::counter!(REDIS_FALLBACK, "decision" => "open").increment(1);
        } else {
            ::metrics::counter!(REDIS_FALLBACK, "decision" => "closed").increment(1);
        }
    }
}

#[cfg(not(feature = "metrics"))]
mod imp {
    /// Zero-sized without the `metrics` feature.
    #[derive(Debug)]
    pub(crate) struct RoundTrip;

    impl RoundTrip {
        #[inline(always)]
        pub(crate) fn start() -> Self {
            RoundTrip
        }
    }

    #[inline(always)]
    pub(crate) fn failed(_: bool) {}
}

pub(crate) use imp::RoundTrip;

/// Redis could not be asked; the failure policy admitted (`open`) or refused.
#[inline(always)]
pub(crate) fn failed(open: bool) {
    imp::failed(open);
}
