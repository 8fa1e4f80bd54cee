//! Future types

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use atscale_core::{BoxError, DeadlineExceeded, Kind};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::queue::{Left, Outcome, Permit, Ticket};

pin_project! {
    /// Response future of [`Overload`](crate::Overload): waits in the admission
    /// queue if it must, then runs the inner service's future holding a slot.
    /// Dropping it at any point gives back its place or its slot.
    pub struct ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req, S::Future>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req, F> {
        // Boxed: the slow path only, and it keeps the request, which would
        // otherwise make every response future as large as a request.
        Queued {
            queued: Pin<Box<Queued<S, Req>>>,
        },
        Running {
            #[pin]
            fut: F,
            permit: Option<Permit>,
        },
        Refused {
            err: Option<BoxError>,
        },
    }
}

pin_project! {
    struct Queued<S, Req> {
        svc: Option<S>,
        req: Option<Req>,
        ticket: Option<Ticket>,
        #[pin]
        timer: Timer,
    }
}

pin_project! {
    #[project = TimerProj]
    enum Timer {
        Armed { #[pin] sleep: Sleep },
        Unarmed,
    }
}

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    #[inline]
    pub(crate) fn running(fut: S::Future, permit: Permit) -> Self {
        ResponseFuture {
            state: State::Running {
                fut,
                permit: Some(permit),
            },
        }
    }

    pub(crate) fn queued(svc: S, req: Req, ticket: Ticket) -> Self {
        let timer = match ticket.deadline() {
            Some(d) => Timer::Armed {
                sleep: tokio::time::sleep_until(d.instant()),
            },
            None => Timer::Unarmed,
        };
        ResponseFuture {
            state: State::Queued {
                queued: Box::pin(Queued {
                    svc: Some(svc),
                    req: Some(req),
                    ticket: Some(ticket),
                    timer,
                }),
            },
        }
    }

    pub(crate) fn refused(err: BoxError) -> Self {
        ResponseFuture {
            state: State::Refused { err: Some(err) },
        }
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Queued { queued } => {
                    let q = queued.as_mut().project();
                    let (svc, req, ticket, timer) = (q.svc, q.req, q.ticket, q.timer);
                    let t = ticket.as_mut().expect("polled after completion");
                    let left = match t.poll(cx) {
                        Poll::Ready(Ok(permit)) => {
                            ticket.take();
                            let mut svc = svc.take().expect("queued with its service");
                            let fut = svc.call(req.take().expect("queued with its request"));
                            state.set(State::Running {
                                fut,
                                permit: Some(permit),
                            });
                            continue;
                        }
                        Poll::Ready(Err(left)) => left,
                        Poll::Pending => match timer.project() {
                            TimerProj::Armed { sleep } => {
                                ready!(sleep.poll(cx));
                                t.expire()
                            }
                            TimerProj::Unarmed => return Poll::Pending,
                        },
                    };
                    ticket.take();
                    let err: BoxError = match left {
                        Left::Shed(overloaded) => overloaded.into(),
                        Left::Expired(deadline) => {
                            DeadlineExceeded::at(deadline, Instant::now()).into()
                        }
                    };
                    state.set(State::Refused { err: None });
                    return Poll::Ready(Err(err));
                }
                StateProj::Running { fut, permit } => {
                    let out = ready!(fut.poll(cx)).map_err(Into::into);
                    let outcome = match &out {
                        Ok(_) => Outcome::Success,
                        Err(e) => match Kind::find(&**e) {
                            Some(Kind::Overloaded | Kind::RateLimited | Kind::DeadlineExceeded) => {
                                Outcome::Dropped
                            }
                            _ => Outcome::Ignored,
                        },
                    };
                    if let Some(permit) = permit.take() {
                        permit.finish(outcome);
                    }
                    return Poll::Ready(out);
                }
                StateProj::Refused { err } => {
                    return Poll::Ready(Err(err.take().expect("polled after completion")));
                }
            }
        }
    }
}

impl<S: Service<Req>, Req> fmt::Debug for ResponseFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
