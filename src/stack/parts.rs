//! What both client stacks hold, the builder steps they share, and their
//! hedge and retry slots:
//! [`ClientStack`](super::ClientStack) and
//! [`HttpClientStack`](super::HttpClientStack) differ in their errors
//! layer (`E`), their slots' body buffers and their docs, not in how their
//! layers are kept or put together.

use atscale_core::RetryThrottle;
use atscale_deadline::{Deadline, DeadlineLayer};
use atscale_error::mode::Client;
use atscale_error::{ErrorEnrich, ErrorEnrichLayer};
use atscale_heartbeat::{Heartbeat, Monitor};
use atscale_hedge::{BufferBodyLayer, Hedge, HedgeLayer};
use atscale_retry::{Retry, RetryLayer};
use tower_layer::{Identity, Layer};

use super::{Buffered, HedgeSlot, HedgedRetrySlot, RetrySlot, buffered};

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

    /// The same parts with `hedge` in its slot, on the stack's retry
    /// throttle if one is set and the hedge has none.
    pub(super) fn hedge<H2: HedgeSlot>(self, hedge: H2) -> ClientParts<E, R, H2, Y, T> {
        if let Some(throttle) = &self.retry_throttle {
            hedge.adopt_throttle(throttle);
        }
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

    /// The same parts on `throttle`: the retry's, and the hedge's unless
    /// the hedge has one.
    pub(super) fn retry_throttle(mut self, throttle: RetryThrottle) -> Self
    where
        H: HedgeSlot,
    {
        self.hedge.adopt_throttle(&throttle);
        self.retry_throttle = Some(throttle);
        self
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

/// The hedge slot of a client stack ([`GrpcHedgeLayer`](super::GrpcHedgeLayer),
/// [`HttpHedgeLayer`](super::HttpHedgeLayer)): a [`BufferBodyLayer`] (so
/// request bodies can be replayed) over a [`HedgeLayer`].
#[derive(Clone, Debug)]
pub struct ClientHedgeLayer<C> {
    pub(super) buffer: BufferBodyLayer,
    pub(super) hedge: HedgeLayer<C>,
}

impl<C> ClientHedgeLayer<C> {
    /// The hedge's counters (hedges sent, won, …).
    pub fn stats(&self) -> atscale_hedge::HedgeStats {
        self.hedge.stats()
    }
}

impl<C> super::sealed::Sealed for ClientHedgeLayer<C> {}

impl<C> HedgeSlot for ClientHedgeLayer<C> {
    fn adopt_throttle(&self, throttle: &RetryThrottle) {
        self.hedge.adopt_throttle(throttle);
    }
}

impl<S, C: Clone> Layer<S> for ClientHedgeLayer<C> {
    type Service = Buffered<Hedge<S, C>>;

    fn layer(&self, inner: S) -> Self::Service {
        buffered(&self.buffer, self.hedge.layer(inner))
    }
}

/// The retry slot of a client stack ([`GrpcRetryLayer`](super::GrpcRetryLayer),
/// [`HttpRetryLayer`](super::HttpRetryLayer)): a [`BufferBodyLayer`] (so
/// request bodies can be replayed) over a [`RetryLayer`], or (gRPC) over
/// the per-method layer of a service config.
#[derive(Clone, Debug)]
pub struct ClientRetryLayer<P = RetryLayer> {
    pub(super) buffer: BufferBodyLayer,
    pub(super) retry: P,
}

impl<P> ClientRetryLayer<P> {
    /// The retry layer (or the service config's per-method layer).
    pub fn get_ref(&self) -> &P {
        &self.retry
    }
}

impl<P> super::sealed::Sealed for ClientRetryLayer<P> {}

impl<S> RetrySlot<Identity, S> for ClientRetryLayer<RetryLayer> {
    type Service = Buffered<Retry<S>>;

    fn layer_with(
        &self,
        _hedge: &Identity,
        inner: S,
        throttle: Option<&RetryThrottle>,
    ) -> Self::Service {
        buffered(&self.buffer, super::retry(&self.retry, inner, throttle))
    }
}

impl<S, C: Clone> RetrySlot<ClientHedgeLayer<C>, S> for ClientRetryLayer<RetryLayer> {
    type Service = Buffered<Retry<Hedge<S, C>>>;

    /// The retry's buffer serves the hedge too.
    fn layer_with(
        &self,
        hedge: &ClientHedgeLayer<C>,
        inner: S,
        throttle: Option<&RetryThrottle>,
    ) -> Self::Service {
        let hedged = hedge.hedge.layer(inner);
        buffered(&self.buffer, super::retry(&self.retry, hedged, throttle))
    }
}

impl<X> HedgedRetrySlot<X> for ClientRetryLayer<RetryLayer> {
    type Service = Buffered<Retry<X>>;

    fn around_hedged(
        &self,
        _hedge_buffer: &BufferBodyLayer,
        hedged: X,
        throttle: Option<&RetryThrottle>,
    ) -> Self::Service {
        buffered(&self.buffer, super::retry(&self.retry, hedged, throttle))
    }
}
