//! The hedging service.

use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use atscale_core::{BoxError, Carrier, Context};
use tower::ServiceExt;
use tower_service::Service;

use crate::future::{Armed, Attempt, ResponseFuture};
use crate::policy::{Classify, ErrorsAreFatal, Pick, RoundRobin};
use crate::replay::Replay;
use crate::shared::Shared;
use crate::stats::HedgeStats;

/// Where attempts go: one service, or distinct replicas.
#[derive(Debug)]
pub(crate) enum Backends<S> {
    One(S),
    Many(Arc<Vec<S>>),
}

impl<S: Clone> Clone for Backends<S> {
    fn clone(&self) -> Self {
        match self {
            Backends::One(s) => Backends::One(s.clone()),
            Backends::Many(list) => Backends::Many(Arc::clone(list)),
        }
    }
}

impl<S: Clone> Backends<S> {
    /// A fresh clone of the service for attempt `k` of a request whose first
    /// attempt went to replica `first`.
    pub(crate) fn for_attempt(&self, first: usize, k: usize) -> (S, usize) {
        match self {
            Backends::One(s) => (s.clone(), 0),
            Backends::Many(list) => {
                let i = (first + k) % list.len();
                (list[i].clone(), i)
            }
        }
    }
}

/// Sends backup attempts of a request when the first is slow, and answers
/// with the first good response; see the [crate docs](crate).
///
/// Built by [`HedgeLayer`](crate::HedgeLayer) around one service, or by
/// [`HedgeLayer::replicas`](crate::HedgeLayer::replicas) around several
/// replicas of a backend. Clones share the latency window, the budget and the
/// counters of the layer they came from (and, around replicas, the list of
/// replicas: for the service to be `Send`, the replicas must be `Sync`).
///
/// # Backpressure
///
/// Around one service, `poll_ready` delegates to it and the first attempt is
/// sent on that readiness; each hedge clones the service and drives the
/// clone's own `ready()` (nothing is reserved ahead of time). Around
/// replicas, `poll_ready` is always ready and every attempt drives its
/// replica clone's `ready()`.
pub struct Hedge<S, C = ErrorsAreFatal, P = RoundRobin> {
    pub(crate) backends: Backends<S>,
    pub(crate) classify: C,
    pub(crate) pick: P,
    pub(crate) shared: Arc<Shared>,
}

impl<S: Clone, C: Clone, P: Clone> Clone for Hedge<S, C, P> {
    fn clone(&self) -> Self {
        Hedge {
            backends: self.backends.clone(),
            classify: self.classify.clone(),
            pick: self.pick.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: std::fmt::Debug, C: std::fmt::Debug, P: std::fmt::Debug> std::fmt::Debug
    for Hedge<S, C, P>
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hedge")
            .field("backends", &self.backends)
            .field("classify", &self.classify)
            .field("pick", &self.pick)
            .field("stats", &self.stats())
            .finish()
    }
}

impl<S, C, P> Hedge<S, C, P> {
    /// The counters shared with the layer and every clone.
    pub fn stats(&self) -> HedgeStats {
        HedgeStats {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Sends first attempts to the replica `pick` chooses (for example by a
    /// hash of the request's key) instead of in turn. Without effect around
    /// a single service.
    pub fn pick<P2>(self, pick: P2) -> Hedge<S, C, P2> {
        Hedge {
            backends: self.backends,
            classify: self.classify,
            pick,
            shared: self.shared,
        }
    }

    /// The replicas attempts go to (one, around a single service).
    pub fn replicas(&self) -> &[S] {
        match &self.backends {
            Backends::One(s) => std::slice::from_ref(s),
            Backends::Many(list) => list,
        }
    }

    /// The inner service (the first replica, around replicas).
    pub fn get_ref(&self) -> &S {
        &self.replicas()[0]
    }

    /// The inner service, mutably (the first replica, around replicas: the
    /// list is copied first if other clones share it).
    pub fn get_mut(&mut self) -> &mut S
    where
        S: Clone,
    {
        match &mut self.backends {
            Backends::One(s) => s,
            Backends::Many(list) => &mut Arc::make_mut(list)[0],
        }
    }

    /// Consumes `self`, returning the inner service (the first replica,
    /// around replicas).
    pub fn into_inner(self) -> S
    where
        S: Clone,
    {
        match self.backends {
            Backends::One(s) => s,
            Backends::Many(list) => list[0].clone(),
        }
    }
}

impl<S, Req, C, P> Service<Req> for Hedge<S, C, P>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    Req: Replay + Carrier,
    C: Classify<S::Response, S::Error> + Clone,
    P: Pick<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, C>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        match &mut self.backends {
            Backends::One(s) => s.poll_ready(cx).map_err(Into::into),
            Backends::Many(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let shared = &self.shared;
        let (now, delay, position) = shared.arrive();
        let parent = match req.context() {
            Some(cx) => Some(cx.clone()),
            None => Context::current(),
        };
        let may_hedge = shared.max_attempts > 1
            && delay.is_some()
            && (shared.non_idempotent || req.is_idempotent());
        let template = if may_hedge { req.replay() } else { None };
        let guard = parent.as_ref().map(|p| {
            let child = p.child();
            let guard = child.cancel_on_drop();
            req.set_context(child);
            guard
        });
        let (primary, first, backends) = match &mut self.backends {
            Backends::One(s) => {
                let backends = template.as_ref().map(|_| Backends::One(s.clone()));
                (Attempt::direct(s.call(req)), 0, backends)
            }
            Backends::Many(list) => {
                let first = self.pick.pick(&req, list.len()) % list.len();
                let backends = template.as_ref().map(|_| Backends::Many(Arc::clone(list)));
                (
                    Attempt::oneshot(list[first].clone().oneshot(req)),
                    first,
                    backends,
                )
            }
        };
        let armed = match (template, backends, delay) {
            (Some(template), Some(backends), Some(delay)) => Some(Armed::new(
                template,
                backends,
                first,
                position,
                delay,
                shared.max_attempts,
                parent,
            )),
            _ => None,
        };
        let counted = armed.is_some() || shared.is_adaptive() || shared.throttle.get().is_some();
        let shared = counted.then(|| Arc::clone(shared));
        ResponseFuture::new(primary, guard, now, armed, shared, self.classify.clone())
    }
}
