use std::task::{Context as TaskContext, Poll};

use atscale_core::{BoxError, Carrier, Context};
use tower_service::Service;

use crate::future::ResponseFuture;
use crate::monitor::Monitor;
use crate::track::{Hook, Ticket, Track};

/// Reports each request to a [`Monitor`] and, with the stall watchdog on,
/// cuts requests that show no progress; from [`HeartbeatLayer`](crate::HeartbeatLayer).
///
/// A request is in flight from `call` until its response has arrived and —
/// for `http::Response`s — its body has ended ([`Track`]).
///
/// With the watchdog on, `call` attaches a child of the request's
/// [`Context`] (or a new one) to the request via [`Carrier`], and runs the
/// inner service inside that context's scope ([`Context::current`]) and
/// with the request's [`Progress`](crate::Progress) handle in scope. The
/// child is cancelled when the request stalls or its caller gives up, so
/// work the handler spawned under it stops too.
///
/// # Backpressure
///
/// `poll_ready` delegates to the inner service; the heartbeat reserves nothing.
///
/// # Errors
///
/// The inner service's errors, boxed, and [`Stalled`](atscale_core::Stalled)
/// when the watchdog cut the request ([`Kind::Stalled`](atscale_core::Kind::Stalled)).
#[derive(Clone)]
pub struct Heartbeat<S> {
    inner: S,
    monitor: Monitor,
    hook: Option<Hook>,
}

impl<S> Heartbeat<S> {
    atscale_core::inner_accessors!();
}

impl<S: std::fmt::Debug> std::fmt::Debug for Heartbeat<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeat")
            .field("inner", &self.inner)
            .field("monitor", &self.monitor)
            .finish_non_exhaustive()
    }
}

impl<S> Heartbeat<S> {
    /// Wraps `inner`, reporting to `monitor`.
    pub const fn new(inner: S, monitor: Monitor) -> Self {
        Heartbeat {
            inner,
            monitor,
            hook: None,
        }
    }

    /// Like [`Heartbeat::new`], also telling `hook` how each request ended.
    pub(crate) const fn with_hook(inner: S, monitor: Monitor, hook: Hook) -> Self {
        Heartbeat {
            inner,
            monitor,
            hook: Some(hook),
        }
    }

    /// The monitor this service reports to.
    pub const fn monitor(&self) -> &Monitor {
        &self.monitor
    }
}

impl<S, Req> Service<Req> for Heartbeat<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    S::Response: Track,
    Req: Carrier,
{
    type Response = <S::Response as Track>::Tracked;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, mut req: Req) -> Self::Future {
        let shared = &self.monitor.shared;
        match shared.config.stall {
            None => {
                let ticket = Ticket::new(shared.clone(), None, self.hook.clone());
                ResponseFuture::plain(self.inner.call(req), ticket)
            }
            Some(stall) => {
                let cx = req.context().map_or_else(Context::new, Context::child);
                req.set_context(cx.clone());
                let ticket = Ticket::new(shared.clone(), Some(cx.clone()), self.hook.clone());
                let progress = ticket.progress_handle();
                let inner = &mut self.inner;
                let future = cx.scope_with(|| progress.scope_with(|| inner.call(req)));
                ResponseFuture::watched(future, ticket, stall)
            }
        }
    }
}
