//! The deadline's metrics and span fields (the `metrics` feature); without
//! the feature every function is an empty inline no-op.
//!
//! Names: [`atscale_core::metrics`].

use std::time::Duration;

use atscale_core::Origin;

/// Where a deadline was found passed.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Stage {
    /// Already passed when the request arrived.
    Arrival,
    /// Passed while the inner service was working.
    Running,
}

#[cfg(feature = "metrics")]
mod imp {
    use std::sync::OnceLock;
    use std::time::Duration;

    use ::metrics::Histogram;
    use atscale_core::Origin;
    use atscale_core::metrics::{DEADLINE_EXCEEDED, DEADLINE_MALFORMED, DEADLINE_REMAINING, field};

    use super::Stage;

    macro_rules! by_origin {
        ($origin:expr, $mac:ident, $name:expr $(, $k:literal => $v:literal)*) => {
            match $origin {
                Origin::Local => ::metrics::$mac!($name, "origin" => "local" $(, $k => $v)*),
                Origin::Parent => ::metrics::$mac!($name, "origin" => "parent" $(, $k => $v)*),
                Origin::GrpcTimeout => ::metrics::$mac!($name, "origin" => "grpc-timeout" $(, $k => $v)*),
                Origin::Header => ::metrics::$mac!($name, "origin" => "header" $(, $k => $v)*),
                // an origin added later: labelled by its name (allocates)
                other => ::metrics::$mac!($name, "origin" => other.as_str() $(, $k => $v)*),
            }
        };
    }

    use atscale_core::metrics::enabled;
    pub(super) use atscale_core::metrics::span_wanted;

    #[inline]
    pub(crate) fn malformed() {
        if !enabled() {
            return;
        }
        ::metrics::counter!(DEADLINE_MALFORMED).increment(1);
    }

    #[inline]
    pub(crate) fn exceeded(origin: Origin, stage: Stage) {
        if !enabled() {
            return;
        }
        match stage {
            Stage::Arrival => {
                by_origin!(origin, counter, DEADLINE_EXCEEDED, "stage" => "arrival").increment(1)
            }
            Stage::Running => {
                by_origin!(origin, counter, DEADLINE_EXCEEDED, "stage" => "running").increment(1)
            }
        }
    }

    #[inline]
    pub(crate) fn arrived(origin: Origin, remaining: Duration) {
        if enabled() {
            // One handle per origin, registered at its first use: a
            // recorder's lookup is ~100 ns, an emission through it one add.
            static REMAINING: [OnceLock<Histogram>; 4] = [const { OnceLock::new() }; 4];
            let (i, register): (usize, fn() -> Histogram) = match origin {
                Origin::Local => (
                    0,
                    || ::metrics::histogram!(DEADLINE_REMAINING, "origin" => "local"),
                ),
                Origin::Parent => (
                    1,
                    || ::metrics::histogram!(DEADLINE_REMAINING, "origin" => "parent"),
                ),
                Origin::GrpcTimeout => (
                    2,
                    || ::metrics::histogram!(DEADLINE_REMAINING, "origin" => "grpc-timeout"),
                ),
                Origin::Header => (
                    3,
                    || ::metrics::histogram!(DEADLINE_REMAINING, "origin" => "header"),
                ),
                other => {
                    by_origin!(other, histogram, DEADLINE_REMAINING)
                        .record(remaining.as_secs_f64());
                    return;
                }
            };
            REMAINING[i]
                .get_or_init(register)
                .record(remaining.as_secs_f64());
        }
        if !span_wanted() {
            return;
        }
        let span = tracing::Span::current();
        span.record(field::DEADLINE_ORIGIN, origin.as_str());
        span.record(
            field::DEADLINE_REMAINING_MS,
            remaining.as_millis().min(u64::MAX as u128) as u64,
        );
    }
}

#[cfg(not(feature = "metrics"))]
mod imp {
    use std::time::Duration;

    use atscale_core::Origin;

    use super::Stage;

    #[inline(always)]
    pub(crate) fn malformed() {}

    #[inline(always)]
    pub(crate) fn exceeded(_: Origin, _: Stage) {}

    #[inline(always)]
    pub(crate) fn arrived(_: Origin, _: Duration) {}
}

/// A request was refused for a malformed deadline header.
#[inline(always)]
pub(crate) fn malformed() {
    imp::malformed();
}

/// A deadline from `origin` passed, at `stage`.
#[inline(always)]
pub(crate) fn exceeded(origin: Origin, stage: Stage) {
    imp::exceeded(origin, stage);
}

/// A request arrived with a deadline from `origin`, `remaining` ahead.
#[inline(always)]
pub(crate) fn arrived(origin: Origin, remaining: Duration) {
    imp::arrived(origin, remaining);
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use tracing::level_filters::LevelFilter;

    #[test]
    fn no_span_work_unless_a_subscriber_was_set() {
        // Making a dispatch without setting it raises tracing's maximum level
        // to TRACE (a subscriber without a level hint); nothing in this test
        // binary ever sets one.
        drop(tracing::Dispatch::new(
            tracing::subscriber::NoSubscriber::default(),
        ));
        assert_eq!(
            LevelFilter::current(),
            LevelFilter::TRACE,
            "the trap this guards against"
        );
        assert!(!super::imp::span_wanted());
        // With one set, the span is recorded (tests/request_span.rs checks the fields).
        let _guard = tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::default());
        assert!(super::imp::span_wanted());
    }
}
