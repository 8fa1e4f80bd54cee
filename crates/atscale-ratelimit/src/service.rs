use std::fmt;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use atscale_core::{BoxError, Carrier, Context};
use tower_service::Service;

use crate::future::ResponseFuture;
use crate::keyed::{KeyPart, NoKey};
use crate::layer::{Cost, Shared};
use crate::metrics;
use crate::store::{Claims, MemoryStore, Store};
use crate::wait::{Decision, decide};

/// Applies rate limits to every request of the inner service (see
/// [`RateLimitLayer`](crate::RateLimitLayer) and the [crate docs](crate)).
///
/// Clones share the limiters, the key table and the wait queue: a clone can
/// never escape the limit.
///
/// # Backpressure
///
/// `poll_ready` delegates to the inner service and never waits for a limit:
/// the limit is applied in `call`, where the request (its key, cost and
/// deadline) is visible. A request that must wait reserves its admission
/// time in `call` and waits in the response future, holding the inner
/// service that `poll_ready` made ready (a clone takes its place in this
/// service); its admission time is kept while it waits, so later requests
/// queue behind it in arrival order. Dropping the response future before
/// admission gives the reservation back (see
/// [`MultiLimiter::acquire`](crate::MultiLimiter::acquire) for exactly what
/// is refunded).
pub struct RateLimit<S, K = NoKey, W = u32, St: Store = MemoryStore> {
    inner: S,
    shared: Arc<Shared<K, W, St>>,
}

impl<S, K, W, St: Store> RateLimit<S, K, W, St> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<K, W, St>>) -> Self {
        RateLimit { inner, shared }
    }

    atscale_core::inner_accessors!();
}

impl<S: Clone, K, W, St: Store> Clone for RateLimit<S, K, W, St> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, K, W, St: Store> fmt::Debug for RateLimit<S, K, W, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("mode", &self.shared.mode)
            .finish_non_exhaustive()
    }
}

impl<S, K, W, St, Req> Service<Req> for RateLimit<S, K, W, St>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    Req: Carrier,
    K: KeyPart<Req, St::Bucket>,
    W: Cost<Req>,
    St: Store,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, St>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let shared = &*self.shared;
        let keyed = match shared.key.bucket(&req) {
            Ok(keyed) => keyed,
            Err(e) => return ResponseFuture::failed(e),
        };
        let cost = shared.cost.cost(&req);
        // The common case, a request charged to one bucket and admitted at
        // once, needs neither its deadline nor the wait queue.
        let single = match (&keyed, &*shared.limiters) {
            (None, [bucket]) | (Some(bucket), []) => Some(bucket),
            _ => None,
        };
        if let Some(bucket) = single
            && shared.store.try_admit_now(bucket, cost) == Some(true)
        {
            metrics::admitted();
            return ResponseFuture::called(self.inner.call(req));
        }
        self.call_limited(req, keyed, cost)
    }
}

impl<S, K, W, St: Store> RateLimit<S, K, W, St> {
    /// Every other case: several buckets, or a request that may have to wait
    /// or be refused; out of line so the common case stays small.
    #[inline(never)]
    fn call_limited<Req>(
        &mut self,
        req: Req,
        keyed: Option<St::Bucket>,
        cost: u32,
    ) -> ResponseFuture<S, Req, St>
    where
        S: Service<Req> + Clone,
        Req: Carrier,
    {
        let shared = &*self.shared;
        let mut claims = Claims::new();
        for limiter in shared.limiters.iter() {
            claims.push(limiter, cost);
        }
        if let Some(keyed) = &keyed {
            claims.push(keyed, cost);
        }

        let current;
        let cx = if shared.queue.max_wait.is_zero() {
            None // reject mode: the deadline cannot matter
        } else if let Some(cx) = req.context() {
            Some(cx)
        } else {
            current = Context::current();
            current.as_ref()
        };
        let (max_wait, full) = shared.queue.allowed(cx);
        let Some(answer) = shared.store.try_acquire_now(&claims, max_wait) else {
            // A store that goes asynchronous bounds its round trip by the
            // request's context, in reject mode too.
            let current;
            let rcx = match cx {
                Some(cx) => Some(cx),
                None => match req.context() {
                    Some(cx) => Some(cx),
                    None => {
                        current = Context::current();
                        current.as_ref()
                    }
                },
            };
            let acquire = shared.store.acquire_within(&claims, max_wait, rcx);
            let inner = take_ready(&mut self.inner);
            return ResponseFuture::acquiring(
                acquire,
                inner,
                req,
                shared.store.clone(),
                shared.queue.clone(),
                full,
            );
        };
        match decide(&shared.store, answer, &shared.queue, full, cx) {
            Decision::Go => ResponseFuture::called(self.inner.call(req)),
            Decision::Wait(admission) => {
                let inner = take_ready(&mut self.inner);
                ResponseFuture::waiting(admission, inner, req)
            }
            Decision::Fail(e) => ResponseFuture::failed(e),
        }
    }
}

/// Takes the service that `poll_ready` made ready, leaving a clone in its place.
fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}
