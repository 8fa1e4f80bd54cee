//! The rate limit's metrics and span fields (the `metrics` feature); without
//! the feature every function is an empty inline no-op and [`QueueSlot`] is
//! a zero-sized value.
//!
//! Names: [`atscale_core::metrics`].

use std::time::Duration;

/// Why a request was refused.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Refused {
    /// Admission lies beyond the allowed wait (`RateLimited`).
    RateLimited,
    /// The wait queue was full (`Overloaded`).
    QueueFull,
    /// A keyed limiter's table was full of busy keys (`Overloaded`).
    KeyTableFull,
    /// The cost exceeds a burst.
    InsufficientCapacity,
    /// The store failed.
    Store,
    /// Cancelled while waiting.
    Cancelled,
}

#[cfg(feature = "metrics")]
mod imp {
    use std::time::Duration;

    use atscale_core::metrics::{
        RATELIMIT_ADMITTED, RATELIMIT_KEYS, RATELIMIT_QUEUE_DEPTH, RATELIMIT_REFUSED,
        RATELIMIT_WAIT_DURATION, RATELIMIT_WAITED, field,
    };

    use std::sync::OnceLock;

    use ::metrics::Counter;
    use atscale_core::metrics::enabled;

    use super::Refused;

    use atscale_core::metrics::span_wanted;

    #[inline]
    pub(crate) fn admitted() {
        if enabled() {
            // Registered once: a recorder's lookup is ~100 ns, an emission one add.
            static ADMITTED: OnceLock<Counter> = OnceLock::new();
            ADMITTED
                .get_or_init(|| ::metrics::counter!(RATELIMIT_ADMITTED))
                .increment(1);
        }
        if span_wanted() {
            tracing::Span::current().record(field::RATELIMIT_OUTCOME, "admitted");
        }
    }

    #[inline]
    pub(crate) fn waited(wait: Duration) -> QueueSlot {
        if span_wanted() {
            let span = tracing::Span::current();
            span.record(field::RATELIMIT_OUTCOME, "waited");
            span.record(
                field::RATELIMIT_WAIT_MS,
                wait.as_millis().min(u64::MAX as u128) as u64,
            );
        }
        if !enabled() {
            return QueueSlot(false);
        }
        ::metrics::counter!(RATELIMIT_WAITED).increment(1);
        ::metrics::histogram!(RATELIMIT_WAIT_DURATION).record(wait.as_secs_f64());
        ::metrics::gauge!(RATELIMIT_QUEUE_DEPTH).increment(1.0);
        QueueSlot(true)
    }

    #[inline]
    pub(crate) fn refused(reason: Refused) {
        if !enabled() && !span_wanted() {
            return;
        }
        let (counter, reason) = match reason {
            Refused::RateLimited => (
                ::metrics::counter!(RATELIMIT_REFUSED, "reason" => "rate_limited"),
                "rate_limited",
            ),
            Refused::QueueFull => (
                ::metrics::counter!(RATELIMIT_REFUSED, "reason" => "queue_full"),
                "queue_full",
            ),
            Refused::KeyTableFull => (
                ::metrics::counter!(RATELIMIT_REFUSED, "reason" => "key_table_full"),
                "key_table_full",
            ),
            Refused::InsufficientCapacity => (
                ::metrics::counter!(RATELIMIT_REFUSED, "reason" => "insufficient_capacity"),
                "insufficient_capacity",
            ),
            Refused::Store => (
                ::metrics::counter!(RATELIMIT_REFUSED, "reason" => "store"),
                "store",
            ),
            Refused::Cancelled => (
                ::metrics::counter!(RATELIMIT_REFUSED, "reason" => "cancelled"),
                "cancelled",
            ),
        };
        if enabled() {
            counter.increment(1);
        }
        if span_wanted() {
            tracing::Span::current().record(field::RATELIMIT_OUTCOME, reason);
        }
    }

    #[inline]
    pub(crate) fn keys_added(n: usize) {
        if !enabled() {
            return;
        }
        ::metrics::gauge!(RATELIMIT_KEYS).increment(n as f64);
    }

    #[inline]
    pub(crate) fn keys_removed(n: usize) {
        if n > 0 && enabled() {
            ::metrics::gauge!(RATELIMIT_KEYS).decrement(n as f64);
        }
    }

    /// One request in the wait queue: leaves the queue depth when dropped
    /// (if it was counted in).
    #[derive(Debug)]
    pub(crate) struct QueueSlot(bool);

    impl Drop for QueueSlot {
        fn drop(&mut self) {
            if self.0 {
                ::metrics::gauge!(RATELIMIT_QUEUE_DEPTH).decrement(1.0);
            }
        }
    }
}

#[cfg(not(feature = "metrics"))]
mod imp {
    use std::time::Duration;

    use super::Refused;

    #[inline(always)]
    pub(crate) fn admitted() {}

    #[inline(always)]
    pub(crate) fn waited(_: Duration) -> QueueSlot {
        QueueSlot
    }

    #[inline(always)]
    pub(crate) fn refused(_: Refused) {}

    #[inline(always)]
    pub(crate) fn keys_added(_: usize) {}

    #[inline(always)]
    pub(crate) fn keys_removed(_: usize) {}

    /// Zero-sized without the `metrics` feature.
    #[derive(Debug)]
    pub(crate) struct QueueSlot;
}

pub(crate) use imp::QueueSlot;

/// A request was admitted at once.
#[inline(always)]
pub(crate) fn admitted() {
    imp::admitted();
}

/// A request was made to wait `wait`; it is in the queue until the slot drops.
#[inline(always)]
pub(crate) fn waited(wait: Duration) -> QueueSlot {
    imp::waited(wait)
}

/// A request was refused.
#[inline(always)]
pub(crate) fn refused(reason: Refused) {
    imp::refused(reason);
}

/// `n` keys were added to a keyed limiter's table.
#[inline(always)]
pub(crate) fn keys_added(n: usize) {
    imp::keys_added(n);
}

/// `n` keys were dropped from a keyed limiter's table.
#[inline(always)]
pub(crate) fn keys_removed(n: usize) {
    imp::keys_removed(n);
}
