//! Future types.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, ready};

use atscale_core::{BoxError, Carrier, Context};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::store::Store;
use crate::wait::{Admission, Decision, Queue, decide};

pin_project! {
    /// The response future of [`RateLimit`](crate::RateLimit): waits for the
    /// admission time if the request must wait, then runs the inner
    /// service's future. Dropping it before admission gives the reservation back.
    ///
    /// A request admitted at once runs the inner future in place; the state
    /// of a request that waits (its timer, request and reservation) is
    /// allocated once, on the heap, so the common case stays small.
    pub struct ResponseFuture<S, Req, St>
    where
        S: Service<Req>,
        St: Store,
    {
        #[pin]
        state: State<S, Req, St>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req, St>
    where
        S: Service<Req>,
        St: Store,
    {
        Called {
            #[pin]
            fut: S::Future,
        },
        Waiting {
            waiting: Pin<Box<Waiting<S, Req, St>>>,
        },
        Acquiring {
            acquiring: Pin<Box<Acquiring<S, Req, St>>>,
        },
        Failed {
            error: Option<BoxError>,
        },
    }
}

pin_project! {
    struct Waiting<S, Req, St>
    where
        St: Store,
    {
        #[pin]
        admission: Admission<St>,
        inner: Option<S>,
        req: Option<Req>,
    }
}

pin_project! {
    struct Acquiring<S, Req, St>
    where
        St: Store,
    {
        #[pin]
        acquire: St::Acquire,
        inner: Option<S>,
        req: Option<Req>,
        store: St,
        queue: Queue,
        full: bool,
    }
}

impl<S: Service<Req>, Req, St: Store> ResponseFuture<S, Req, St> {
    pub(crate) fn called(fut: S::Future) -> Self {
        ResponseFuture {
            state: State::Called { fut },
        }
    }

    pub(crate) fn waiting(admission: Admission<St>, inner: S, req: Req) -> Self {
        ResponseFuture {
            state: State::Waiting {
                waiting: Box::pin(Waiting {
                    admission,
                    inner: Some(inner),
                    req: Some(req),
                }),
            },
        }
    }

    pub(crate) fn acquiring(
        acquire: St::Acquire,
        inner: S,
        req: Req,
        store: St,
        queue: Queue,
        full: bool,
    ) -> Self {
        ResponseFuture {
            state: State::Acquiring {
                acquiring: Box::pin(Acquiring {
                    acquire,
                    inner: Some(inner),
                    req: Some(req),
                    store,
                    queue,
                    full,
                }),
            },
        }
    }

    pub(crate) fn failed(error: BoxError) -> Self {
        ResponseFuture {
            state: State::Failed { error: Some(error) },
        }
    }
}

impl<S, Req, St> Future for ResponseFuture<S, Req, St>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    Req: Carrier,
    St: Store,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        // Admitted at once (the common case): only the inner future, inlined.
        if let StateProj::Called { fut } = state.as_mut().project() {
            return fut.poll(cx).map_err(Into::into);
        }
        poll_admission(state, cx)
    }
}

/// The states before the inner service is called (waiting, acquiring,
/// failed), out of line so the common case stays small.
#[inline(never)]
fn poll_admission<S, Req, St>(
    mut state: Pin<&mut State<S, Req, St>>,
    cx: &mut TaskContext<'_>,
) -> Poll<Result<S::Response, BoxError>>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    Req: Carrier,
    St: Store,
{
    loop {
        match state.as_mut().project() {
            StateProj::Called { fut } => return fut.poll(cx).map_err(Into::into),
            StateProj::Waiting { waiting } => {
                let w = waiting.as_mut().project();
                if let Err(e) = ready!(w.admission.poll(cx)) {
                    // Drops the reservation now: it is given back.
                    state.set(State::Failed { error: None });
                    return Poll::Ready(Err(e));
                }
                let mut inner = w.inner.take().expect("polled after completion");
                let req = w.req.take().expect("polled after completion");
                state.set(State::Called {
                    fut: inner.call(req),
                });
            }
            StateProj::Acquiring { acquiring } => {
                let a = acquiring.as_mut().project();
                let answer = ready!(a.acquire.poll(cx));
                let r = a.req.as_ref().expect("polled after completion");
                let current;
                let rcx = match r.context() {
                    Some(c) => Some(c),
                    None => {
                        current = Context::current();
                        current.as_ref()
                    }
                };
                match decide(a.store, answer, a.queue, *a.full, rcx) {
                    Decision::Go => {
                        let mut inner = a.inner.take().expect("polled after completion");
                        let req = a.req.take().expect("polled after completion");
                        state.set(State::Called {
                            fut: inner.call(req),
                        });
                    }
                    Decision::Wait(admission) => {
                        let waiting = Box::pin(Waiting {
                            admission,
                            inner: a.inner.take(),
                            req: a.req.take(),
                        });
                        state.set(State::Waiting { waiting });
                    }
                    Decision::Fail(e) => {
                        state.set(State::Failed { error: None });
                        return Poll::Ready(Err(e));
                    }
                }
            }
            StateProj::Failed { error } => {
                return Poll::Ready(Err(error.take().expect("polled after completion")));
            }
        }
    }
}

impl<S: Service<Req>, Req, St: Store> fmt::Debug for ResponseFuture<S, Req, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Called { .. } => "called",
            State::Waiting { .. } => "waiting",
            State::Acquiring { .. } => "acquiring",
            State::Failed { .. } => "failed",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
