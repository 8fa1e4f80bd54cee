//! The retrying service.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};

use atscale_core::{BoxError, Context, RetryThrottle};
use tower_service::Service;

use crate::future::{Plan, ResponseFuture};
use crate::metrics;
use crate::outcome::{RetryRequest, RetryResponse};
use crate::policy::RetryPolicy;

/// Where attempts go: one service, or distinct replicas.
pub(crate) enum Backends<S> {
    One(S),
    Many {
        list: Arc<Vec<S>>,
        next: Arc<AtomicUsize>,
    },
}

impl<S: Clone> Clone for Backends<S> {
    fn clone(&self) -> Self {
        match self {
            Backends::One(s) => Backends::One(s.clone()),
            Backends::Many { list, next } => Backends::Many {
                list: Arc::clone(list),
                next: Arc::clone(next),
            },
        }
    }
}

impl<S> std::fmt::Debug for Backends<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backends::One(_) => f.write_str("One"),
            Backends::Many { list, .. } => write!(f, "Many({})", list.len()),
        }
    }
}

impl<S: Clone> Backends<S> {
    /// A fresh clone of the service for attempt `k` (from 0) of a call whose
    /// first attempt went to replica `first`.
    pub(crate) fn for_attempt(&self, first: usize, k: usize) -> (S, usize) {
        match self {
            Backends::One(s) => (s.clone(), 0),
            Backends::Many { list, .. } => {
                let i = (first + k) % list.len();
                (list[i].clone(), i)
            }
        }
    }
}

/// Retries failed calls by a [`RetryPolicy`] (gRFC A6); see the
/// [crate docs](crate).
///
/// Built by [`RetryLayer`](crate::RetryLayer) around one service, or by
/// [`RetryLayer::replicas`](crate::RetryLayer::replicas) around several
/// replicas. Clones share the policy (and its jitter stream) and the
/// throttle.
///
/// # Backpressure
///
/// Around one service, `poll_ready` delegates to it and the first attempt is
/// sent on that readiness; each retry clones the service and drives the
/// clone's own `ready()` (nothing is reserved ahead of time). Around
/// replicas, `poll_ready` is always ready and every attempt drives its
/// replica clone's `ready()`.
pub struct Retry<S> {
    pub(crate) backends: Backends<S>,
    pub(crate) policy: RetryPolicy,
    pub(crate) throttle: Option<RetryThrottle>,
}

impl<S: Clone> Clone for Retry<S> {
    fn clone(&self) -> Self {
        Retry {
            backends: self.backends.clone(),
            policy: self.policy.clone(),
            throttle: self.throttle.clone(),
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for Retry<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Retry");
        match &self.backends {
            Backends::One(s) => d.field("inner", s),
            Backends::Many { list, .. } => d.field("replicas", &list.len()),
        };
        d.field("policy", &self.policy)
            .field("throttle", &self.throttle)
            .finish()
    }
}

impl<S> Retry<S> {
    /// The policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// The replicas attempts go to (one, around a single service).
    pub fn replicas(&self) -> &[S] {
        match &self.backends {
            Backends::One(s) => std::slice::from_ref(s),
            Backends::Many { list, .. } => list,
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
            Backends::Many { list, .. } => &mut Arc::make_mut(list)[0],
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
            Backends::Many { list, .. } => list[0].clone(),
        }
    }

    pub(crate) fn list_mut(&mut self) -> &mut Vec<S>
    where
        S: Clone,
    {
        match &mut self.backends {
            Backends::Many { list, .. } => Arc::make_mut(list),
            Backends::One(_) => unreachable!("built around a list"),
        }
    }
}

impl<S, Req> Service<Req> for Retry<S>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    S::Response: RetryResponse,
    Req: RetryRequest,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        match &mut self.backends {
            Backends::One(s) => s.poll_ready(cx).map_err(Into::into),
            Backends::Many { .. } => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        metrics::first();
        let parent = match req.context() {
            Some(cx) => Some(cx.clone()),
            None => Context::current(),
        };
        let template = if self.policy.non_idempotent() || req.is_idempotent() {
            req.replay()
        } else {
            None
        };
        let guard = parent.as_ref().map(|p| {
            let child = p.child();
            let guard = child.cancel_on_drop();
            req.set_context(child);
            guard
        });
        let judged = template.is_some() || self.throttle.is_some();
        let policy = judged.then(|| self.policy.clone());
        let throttle = self.throttle.clone();
        match &mut self.backends {
            Backends::One(s) => {
                let plan = template.map(|template| Plan {
                    template: Some(template),
                    backends: Backends::One(s.clone()),
                    first: 0,
                    parent,
                });
                ResponseFuture::first(s.call(req), guard, policy, throttle, plan)
            }
            Backends::Many { list, next } => {
                let first = next.fetch_add(1, Ordering::Relaxed) % list.len();
                let svc = list[first].clone();
                let plan = template.map(|template| Plan {
                    template: Some(template),
                    backends: Backends::Many {
                        list: Arc::clone(list),
                        next: Arc::clone(next),
                    },
                    first,
                    parent,
                });
                ResponseFuture::oneshot(svc, req, guard, policy, throttle, plan)
            }
        }
    }
}
