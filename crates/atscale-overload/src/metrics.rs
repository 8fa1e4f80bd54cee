//! The overload layer's metrics (the `metrics` feature); without the
//! feature every function is an empty inline no-op.
//!
//! Names: [`atscale_core::metrics`]. The limit and queue-depth gauges are
//! set to the layer's own values: with several overload layers in one
//! process, the last to change writes them.

use crate::criticality::Criticality;

/// Why a request was shed.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Reason {
    /// At arrival: its deadline cannot cover the wait and a service time.
    Deadline,
    /// At arrival: sheddable while the queue stands.
    StandingQueue,
    /// At arrival: the queue was full of requests at least as critical.
    QueueFull,
    /// While queued: CoDel, a more critical arrival, or its deadline
    /// becoming impossible.
    Queued,
}

/// The criticality of a queue class (`Criticality::index`).
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) fn of_class(class: usize) -> Criticality {
    match class {
        0 => Criticality::Critical,
        1 => Criticality::Default,
        _ => Criticality::Sheddable,
    }
}

#[cfg(feature = "metrics")]
mod imp {
    use atscale_core::metrics::{
        OVERLOAD_IN_FLIGHT, OVERLOAD_LIMIT, OVERLOAD_QUEUE_DEPTH, OVERLOAD_SHED,
    };

    use std::sync::atomic::{AtomicUsize, Ordering};

    use atscale_core::metrics::enabled;

    use super::Reason;
    use crate::criticality::Criticality;

    macro_rules! by_criticality {
        ($criticality:expr, $reason:literal) => {
            match $criticality {
                Criticality::Critical => ::metrics::counter!(
                    OVERLOAD_SHED, "reason" => $reason, "criticality" => "critical"
                ),
                Criticality::Default => ::metrics::counter!(
                    OVERLOAD_SHED, "reason" => $reason, "criticality" => "default"
                ),
                Criticality::Sheddable => ::metrics::counter!(
                    OVERLOAD_SHED, "reason" => $reason, "criticality" => "sheddable"
                ),
            }
        };
    }

    #[inline]
    pub(crate) fn shed(reason: Reason, criticality: Criticality) {
        if !enabled() {
            return;
        }
        let counter = match reason {
            Reason::Deadline => by_criticality!(criticality, "deadline"),
            Reason::StandingQueue => by_criticality!(criticality, "standing_queue"),
            Reason::QueueFull => by_criticality!(criticality, "queue_full"),
            Reason::Queued => by_criticality!(criticality, "queued"),
        };
        counter.increment(1);
    }

    #[inline]
    pub(crate) fn in_flight(n: usize) {
        if !enabled() {
            return;
        }
        ::metrics::gauge!(OVERLOAD_IN_FLIGHT).set(n as f64);
    }

    #[inline]
    pub(crate) fn queued(n: usize) {
        if !enabled() {
            return;
        }
        ::metrics::gauge!(OVERLOAD_QUEUE_DEPTH).set(n as f64);
    }

    /// The last limit written: the gauge is set only when it changes (the
    /// limit is recomputed on every release).
    static LAST_LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

    #[inline]
    pub(crate) fn limit(n: usize) {
        if enabled() && LAST_LIMIT.load(Ordering::Relaxed) != n {
            LAST_LIMIT.store(n, Ordering::Relaxed);
            ::metrics::gauge!(OVERLOAD_LIMIT).set(n as f64);
        }
    }
}

#[cfg(not(feature = "metrics"))]
mod imp {
    use super::Reason;
    use crate::criticality::Criticality;

    #[inline(always)]
    pub(crate) fn shed(_: Reason, _: Criticality) {}

    #[inline(always)]
    pub(crate) fn in_flight(_: usize) {}

    #[inline(always)]
    pub(crate) fn queued(_: usize) {}

    #[inline(always)]
    pub(crate) fn limit(_: usize) {}
}

/// A request of `criticality` was shed for `reason`.
#[inline(always)]
pub(crate) fn shed(reason: Reason, criticality: Criticality) {
    imp::shed(reason, criticality);
}

/// `n` requests are in flight. Set, not counted per request: at every
/// timed release, every change of the queue, and when the layer goes idle
/// (see `Shared::release_untimed`), so between those it may lag by the
/// untimed requests admitted or finished since.
#[inline(always)]
pub(crate) fn in_flight(n: usize) {
    imp::in_flight(n);
}

/// `n` requests wait for a slot.
#[inline(always)]
pub(crate) fn queued(n: usize) {
    imp::queued(n);
}

/// The concurrency limit is now `n`.
#[inline(always)]
pub(crate) fn limit(n: usize) {
    imp::limit(n);
}
