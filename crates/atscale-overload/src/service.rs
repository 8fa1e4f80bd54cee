use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use atscale_core::{BoxError, Carrier, Context, Deadline};
use tower_service::Service;

use crate::criticality::Prioritized;
use crate::future::{Cold, ResponseFuture};
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
}

impl<S> Overload<S> {
    pub(crate) const fn new(inner: S, shared: Arc<Shared>) -> Self {
        Overload { inner, shared }
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

    // Always inlined, and every response future is built here, in one
    // place, so the caller's compiler builds it where it will live: a copy
    // of a response future (the inner future is most of it) costs more
    // than the admission itself.
    #[inline(always)]
    fn call(&mut self, req: Req) -> Self::Future {
        let permit = match self.shared.try_admit(|| deadline_of(&req)) {
            Some(permit) => permit,
            None => match self.arrive(&req) {
                Arrival::Admitted(permit) => permit,
                not_now => return ResponseFuture::cold(self.wait_or_refuse(req, not_now)),
            },
        };
        ResponseFuture::running(&mut self.inner, req, permit)
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
    fn arrive<Req: Carrier + Prioritized>(&self, req: &Req) -> Arrival {
        let criticality = req.criticality(&self.shared.header);
        self.shared.arrive(criticality, deadline_of(req))
    }

    /// A request not admitted at once: it waits in the queue (with the ready
    /// service; this one gets a clone), or it was refused.
    #[cold]
    #[inline(never)]
    fn wait_or_refuse<Req>(&mut self, req: Req, arrival: Arrival) -> Box<Cold<S, Req>>
    where
        S: Service<Req> + Clone,
    {
        match arrival {
            Arrival::Queued(ticket) => {
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                Cold::queued(ready, req, ticket)
            }
            Arrival::Refused(overloaded) => Cold::refused(overloaded.into()),
            Arrival::Admitted(_) => unreachable!("an admitted request is served at once"),
        }
    }
}
