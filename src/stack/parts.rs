//! What both client stacks hold, and the builder steps they share:
//! [`ClientStack`](super::ClientStack) and
//! [`HttpClientStack`](super::HttpClientStack) differ in their errors
//! layer (`E`), their slots' body buffers and their docs, not in how their
//! layers are kept or put together.

use atscale_core::RetryThrottle;
use atscale_deadline::{Deadline, DeadlineLayer};
use atscale_error::mode::Client;
use atscale_error::{ErrorEnrich, ErrorEnrichLayer};
use atscale_heartbeat::{Heartbeat, Monitor};
use tower_layer::{Identity, Layer};

/// A client stack's layers, outermost first: ErrorEnrich, Deadline, the
/// rate limit `R`, the retry slot `Y` around the hedge slot `H`, the
/// heartbeat (on `monitor`), the throttle `T`, the errors layer `E`.
#[derive(Clone, Debug)]
pub(super) struct ClientParts<E, R = Identity, H = Identity, Y = Identity, T = Identity> {
    pub(super) enrich: ErrorEnrichLayer<Client>,
    pub(super) deadline: DeadlineLayer,
    pub(super) errors: E,
    pub(super) rate_limit: R,
    pub(super) hedge: H,
    pub(super) retry: Y,
    pub(super) throttle: T,
    pub(super) retry_throttle: Option<RetryThrottle>,
    pub(super) monitor: Monitor,
}

impl<E> ClientParts<E> {
    /// `enrich` and `deadline` over `errors`, a new [`Monitor`], nothing else.
    pub(super) fn new(
        enrich: ErrorEnrichLayer<Client>,
        deadline: DeadlineLayer,
        errors: E,
    ) -> Self {
        ClientParts {
            enrich,
            deadline,
            errors,
            rate_limit: Identity::new(),
            hedge: Identity::new(),
            retry: Identity::new(),
            throttle: Identity::new(),
            retry_throttle: None,
            monitor: Monitor::new(),
        }
    }
}

impl<E, R, H, Y, T> ClientParts<E, R, H, Y, T> {
    /// The same parts with `rate_limit` in its slot.
    pub(super) fn rate_limit<R2>(self, rate_limit: R2) -> ClientParts<E, R2, H, Y, T> {
        ClientParts {
            enrich: self.enrich,
            deadline: self.deadline,
            errors: self.errors,
            rate_limit,
            hedge: self.hedge,
            retry: self.retry,
            throttle: self.throttle,
            retry_throttle: self.retry_throttle,
            monitor: self.monitor,
        }
    }

    /// The same parts with `hedge` in its slot.
    pub(super) fn hedge<H2>(self, hedge: H2) -> ClientParts<E, R, H2, Y, T> {
        ClientParts {
            enrich: self.enrich,
            deadline: self.deadline,
            errors: self.errors,
            rate_limit: self.rate_limit,
            hedge,
            retry: self.retry,
            throttle: self.throttle,
            retry_throttle: self.retry_throttle,
            monitor: self.monitor,
        }
    }

    /// The same parts with `retry` in its slot.
    pub(super) fn retry<Y2>(self, retry: Y2) -> ClientParts<E, R, H, Y2, T> {
        ClientParts {
            enrich: self.enrich,
            deadline: self.deadline,
            errors: self.errors,
            rate_limit: self.rate_limit,
            hedge: self.hedge,
            retry,
            throttle: self.throttle,
            retry_throttle: self.retry_throttle,
            monitor: self.monitor,
        }
    }

    /// The same parts with `throttle` in its slot.
    pub(super) fn throttle<T2>(self, throttle: T2) -> ClientParts<E, R, H, Y, T2> {
        ClientParts {
            enrich: self.enrich,
            deadline: self.deadline,
            errors: self.errors,
            rate_limit: self.rate_limit,
            hedge: self.hedge,
            retry: self.retry,
            throttle,
            retry_throttle: self.retry_throttle,
            monitor: self.monitor,
        }
    }

    /// What goes right over one transport `client`: the errors layer, the
    /// throttle and the heartbeat.
    pub(super) fn transport<S>(&self, client: S) -> Heartbeat<T::Service>
    where
        E: Layer<S>,
        T: Layer<E::Service>,
    {
        Heartbeat::new(
            self.throttle.layer(self.errors.layer(client)),
            self.monitor.clone(),
        )
    }

    /// What goes around the retry slot: the rate limit, the deadline and
    /// ErrorEnrich.
    pub(super) fn outer<X>(&self, inner: X) -> ErrorEnrich<Deadline<R::Service>, Client>
    where
        R: Layer<X>,
    {
        self.enrich
            .layer(self.deadline.layer(self.rate_limit.layer(inner)))
    }
}
