use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use atscale_core::{BoxError, Carrier, Context, Deadline};
use http::HeaderName;
use tower_service::Service;

use crate::criticality::Prioritized;
use crate::future::ResponseFuture;
use crate::layer::Admission;
use crate::queue::{Arrival, Shared};

/// Admits each request under an adaptive concurrency limit, through a CoDel /
/// adaptive-LIFO admission queue: see the [crate documentation](crate).
///
/// Built by [`OverloadLayer`](crate::OverloadLayer); clones share the limit.
///
/// # Backpressure
///
/// `poll_ready` delegates to the inner service and never waits for a slot:
/// admission needs the request (its deadline and criticality), so it
/// happens in `call`. A request admitted at once is passed to the inner
/// service there; a queued one waits inside the response future with a
/// clone of the (ready) inner service, which it calls when granted a slot.
/// A refused request fails at once with [`Overloaded`](atscale_core::Overloaded).
#[derive(Clone, Debug)]
pub struct Overload<S> {
    inner: S,
    shared: Arc<Shared>,
    header: HeaderName,
}

impl<S> Overload<S> {
    pub(crate) const fn new(inner: S, shared: Arc<Shared>, header: HeaderName) -> Self {
        Overload {
            inner,
            shared,
            header,
        }
    }

    /// The shared state: the current limit, in flight, queue depth.
    pub fn admission(&self) -> Admission {
        Admission {
            shared: self.shared.clone(),
        }
    }

    atscale_core::inner_accessors!();
}

impl<S, Req> Service<Req> for Overload<S>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    Req: Carrier + Prioritized,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        // One straight path for a request admitted at once (the inner
        // future is built in place); the others leave through `slow`.
        match self.shared.try_admit(|| deadline_of(&req)) {
            Some(permit) => ResponseFuture::running(self.inner.call(req), permit),
            None => self.slow(req),
        }
    }
}

/// The request's deadline: from its context, else the one in scope.
fn deadline_of<Req: Carrier>(req: &Req) -> Option<Deadline> {
    match req.context() {
        Some(cx) => cx.deadline(),
        None => Context::current().and_then(|cx| cx.deadline()),
    }
}

impl<S> Overload<S> {
    /// Someone waits, no slot is free, or the deadline is in doubt:
    /// admitted, queued or refused under the lock, where criticality matters.
    #[cold]
    #[inline(never)]
    fn slow<Req>(&mut self, req: Req) -> ResponseFuture<S, Req>
    where
        S: Service<Req> + Clone,
        Req: Carrier + Prioritized,
    {
        let criticality = req.criticality(&self.header);
        let deadline = deadline_of(&req);
        match self.shared.arrive(criticality, deadline) {
            Arrival::Admitted(permit) => ResponseFuture::running(self.inner.call(req), permit),
            Arrival::Queued(ticket) => {
                // The ready service waits with the request; this one gets a clone.
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::queued(ready, req, ticket)
            }
            Arrival::Refused(overloaded) => ResponseFuture::refused(overloaded.into()),
        }
    }
}
