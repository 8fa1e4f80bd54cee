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
        // A struct, as tower's `ConcurrencyLimit` future, not an enum of
        // states: a request admitted at once builds its inner future in
        // place (`Some` of a future costs no tag). Fields drop in order:
        // the inner future, then the slot.
        #[pin]
        fut: Option<S::Future>,
        permit: Option<Permit>,
        cold: Option<Box<Cold<S, Req>>>,
    }
}

/// A request not (yet) in service: boxed, the slow path only (it keeps the
/// request, which would otherwise make every response future as large as a
/// request).
enum Cold<S, Req> {
    Queued(Pin<Box<Queued<S, Req>>>),
    Refused(Option<BoxError>),
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
            fut: Some(fut),
            permit: Some(permit),
            cold: None,
        }
    }

    pub(crate) fn queued(svc: S, req: Req, ticket: Ticket) -> Self {
        let timer = match ticket.deadline() {
            Some(d) => Timer::Armed {
                sleep: tokio::time::sleep_until(d.instant()),
            },
            None => Timer::Unarmed,
        };
        let queued = Box::pin(Queued {
            svc: Some(svc),
            req: Some(req),
            ticket: Some(ticket),
            timer,
        });
        ResponseFuture {
            fut: None,
            permit: None,
            cold: Some(Box::new(Cold::Queued(queued))),
        }
    }

    pub(crate) fn refused(err: BoxError) -> Self {
        ResponseFuture {
            fut: None,
            permit: None,
            cold: Some(Box::new(Cold::Refused(Some(err)))),
        }
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            // In service: the path every admitted request takes.
            if let Some(fut) = this.fut.as_mut().as_pin_mut() {
                let out = ready!(fut.poll(cx)).map_err(Into::into);
                if let Some(permit) = this.permit.take() {
                    let outcome = match &out {
                        Ok(_) => Outcome::Success,
                        Err(e) => outcome_of(e),
                    };
                    permit.finish(outcome);
                }
                return Poll::Ready(out);
            }
            let cold = this.cold.as_mut().expect("polled after completion");
            ready!(poll_cold(cold, this.fut.as_mut(), this.permit, cx))?;
            *this.cold = None;
        }
    }
}

/// Waiting in the queue, or refused: ready with `Ok` once the request is
/// in service (its inner future and permit are then set), or with its
/// refusal.
#[cold]
#[inline(never)]
fn poll_cold<S, Req>(
    cold: &mut Cold<S, Req>,
    mut fut: Pin<&mut Option<S::Future>>,
    permit: &mut Option<Permit>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), BoxError>>
where
    S: Service<Req>,
{
    match cold {
        Cold::Queued(queued) => {
            let q = queued.as_mut().project();
            let (svc, req, ticket, timer) = (q.svc, q.req, q.ticket, q.timer);
            let t = ticket.as_mut().expect("polled after completion");
            let left = match t.poll(cx) {
                Poll::Ready(Ok(granted)) => {
                    ticket.take();
                    let mut svc = svc.take().expect("queued with its service");
                    let req = req.take().expect("queued with its request");
                    *permit = Some(granted);
                    fut.set(Some(svc.call(req)));
                    return Poll::Ready(Ok(()));
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
                Left::Expired(deadline) => DeadlineExceeded::at(deadline, Instant::now()).into(),
            };
            *cold = Cold::Refused(None);
            Poll::Ready(Err(err))
        }
        Cold::Refused(err) => Poll::Ready(Err(err.take().expect("polled after completion"))),
    }
}

/// What a failed request in service teaches the algorithm.
#[cold]
fn outcome_of(e: &BoxError) -> Outcome {
    match Kind::find(&**e) {
        Some(Kind::Overloaded | Kind::RateLimited | Kind::DeadlineExceeded) => Outcome::Dropped,
        _ => Outcome::Ignored,
    }
}

impl<S: Service<Req>, Req> fmt::Debug for ResponseFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
