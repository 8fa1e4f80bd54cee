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
    ///
    /// A request admitted at once is its inner future and a permit of two
    /// words, no more, as tower's `ConcurrencyLimit` future (the other
    /// states take their tag from the permit's): every caller moves it, and
    /// a larger future costs more in moves than the admission itself.
    #[project = Proj]
    pub struct ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        // The states are a private enum.
        #[pin]
        state: State<S, Req>,
    }

    impl<S, Req> PinnedDrop for ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        fn drop(this: Pin<&mut Self>) {
            // Dropped in service before it answered: the slot goes back (the
            // inner future is dropped right after).
            if let StateProj::Running { permit, .. } = this.project().state.project() {
                permit.dropped_in_service();
            }
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        Running {
            #[pin]
            fut: S::Future,
            permit: Permit,
        },
        /// Queued or refused: boxed, the slow path only (it keeps the
        /// request, which would otherwise make every response future as
        /// large as a request).
        Cold { cold: Box<Cold<S, Req>> },
    }
}

/// A request not (yet) in service.
pub(crate) enum Cold<S, Req> {
    Queued(Pin<Box<Queued<S, Req>>>),
    Refused(Option<BoxError>),
}

pin_project! {
    pub(crate) struct Queued<S, Req> {
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

impl<S: Service<Req>, Req> State<S, Req> {
    #[inline(always)]
    fn running(svc: &mut S, req: Req, mut permit: Permit) -> Self {
        let guard = ReleaseOnUnwind(&mut permit);
        let fut = svc.call(req);
        std::mem::forget(guard);
        State::Running { fut, permit }
    }
}

/// Gives `permit` back if the inner service's `call` panics (the permit
/// itself does not on drop).
struct ReleaseOnUnwind<'a>(&'a mut Permit);

impl Drop for ReleaseOnUnwind<'_> {
    fn drop(&mut self) {
        self.0.dropped_in_service();
    }
}

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    /// Calls `svc` with an admitted request.
    #[inline(always)]
    pub(crate) fn running(svc: &mut S, req: Req, permit: Permit) -> Self {
        ResponseFuture {
            state: State::running(svc, req, permit),
        }
    }

    /// A request not in service (yet).
    #[inline(always)]
    pub(crate) fn cold(cold: Box<Cold<S, Req>>) -> Self {
        ResponseFuture {
            state: State::Cold { cold },
        }
    }
}

impl<S: Service<Req>, Req> Cold<S, Req> {
    /// Waiting in the queue with a ready service.
    pub(crate) fn queued(svc: S, req: Req, ticket: Ticket) -> Box<Self> {
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
        Box::new(Cold::Queued(queued))
    }

    /// Refused with `err`.
    pub(crate) fn refused(err: BoxError) -> Box<Self> {
        Box::new(Cold::Refused(Some(err)))
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
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                // In service: the path every admitted request takes.
                StateProj::Running { fut, permit } => {
                    let out = ready!(fut.poll(cx)).map_err(Into::into);
                    let outcome = match &out {
                        Ok(_) => Outcome::Success,
                        Err(e) => outcome_of(e),
                    };
                    permit.finish(outcome);
                    return Poll::Ready(out);
                }
                StateProj::Cold { cold } => {
                    let (mut svc, req, permit) = ready!(poll_cold(cold, cx))?;
                    // The cold state is dropped (the ticket has left the queue).
                    state.set(State::running(&mut svc, req, permit));
                }
            }
        }
    }
}

/// Waiting in the queue, or refused: ready with the service, the request
/// and its permit once granted a slot, or with its refusal.
#[cold]
#[inline(never)]
fn poll_cold<S, Req>(
    cold: &mut Cold<S, Req>,
    cx: &mut Context<'_>,
) -> Poll<Result<(S, Req, Permit), BoxError>>
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
                    let svc = svc.take().expect("queued with its service");
                    let req = req.take().expect("queued with its request");
                    return Poll::Ready(Ok((svc, req, granted)));
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
