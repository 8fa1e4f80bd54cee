//! Future types

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Duration;

use atscale_core::{BoxError, Scoped, Stalled};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::progress::InProgress;
use crate::pulse::Outcome;
use crate::track::{Ticket, Track, Watchdog};

pin_project! {
    #[project = InnerProj]
    enum Inner<F> {
        Plain { #[pin] future: F },
        // Boxed: the timer is large, and only the watchdog needs it, so
        // the common future stays small.
        Watched { watched: Pin<Box<Watched<F>>> },
        Done,
    }
}

pin_project! {
    struct Watched<F> {
        #[pin]
        future: Scoped<InProgress<F>>,
        #[pin]
        timer: Option<Sleep>,
    }
}

pin_project! {
    /// Response future of [`Heartbeat`](crate::Heartbeat).
    ///
    /// Dropping it before it completes finishes the request as
    /// [`Outcome::Cancelled`](crate::Outcome::Cancelled).
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Inner<F>,
        ticket: Option<Ticket>,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn plain(future: F, ticket: Ticket) -> Self {
        ResponseFuture {
            inner: Inner::Plain { future },
            ticket: Some(ticket),
        }
    }

    pub(crate) fn watched(future: Scoped<InProgress<F>>, ticket: Ticket, stall: Duration) -> Self {
        let timer = Instant::now()
            .checked_add(stall)
            .map(tokio::time::sleep_until);
        ResponseFuture {
            inner: Inner::Watched {
                watched: Box::pin(Watched { future, timer }),
            },
            ticket: Some(ticket),
        }
    }
}

/// Polls the watchdog `timer`: `None` while the work may go on (the timer is
/// re-armed past any progress since it was set), or how long the work has
/// shown no progress when it must be cut.
pub(crate) fn watchdog(
    mut timer: Pin<&mut Sleep>,
    ticket: &Ticket,
    cx: &mut TaskContext<'_>,
) -> Option<Duration> {
    while timer.as_mut().poll(cx).is_ready() {
        match ticket.check() {
            Watchdog::Rearm(Some(wait)) => match Instant::now().checked_add(wait) {
                Some(due) => timer.as_mut().reset(due),
                None => return None,
            },
            Watchdog::Rearm(None) => return None,
            Watchdog::Cut(idle) => return Some(idle),
        }
    }
    None
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    T: Track,
{
    type Output = Result<T::Tracked, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let output = match this.inner.as_mut().project() {
            InnerProj::Plain { future } => ready!(future.poll(cx)),
            InnerProj::Watched { watched } => match poll_watched(watched.as_mut(), this.ticket, cx)
            {
                Poll::Ready(Ok(output)) => output,
                Poll::Ready(Err(idle)) => {
                    // Stalled: drop the inner future now and cancel its context.
                    this.inner.set(Inner::Done);
                    if let Some(ticket) = this.ticket.take() {
                        ticket.finish(Outcome::Stalled);
                    }
                    return Poll::Ready(Err(Box::new(Stalled::new(idle))));
                }
                Poll::Pending => return Poll::Pending,
            },
            InnerProj::Done => panic!("heartbeat response future polled after completion"),
        };
        this.inner.set(Inner::Done);
        let ticket = this
            .ticket
            .take()
            .expect("a pending future holds its ticket");
        Poll::Ready(match output {
            Ok(response) => Ok(response.track(ticket)),
            Err(err) => {
                let err: BoxError = err.into();
                ticket.finish(crate::verdict::of_error(&*err));
                Err(err)
            }
        })
    }
}

/// Polls a watched request: its output, or how long it showed no progress
/// when the watchdog cuts it.
fn poll_watched<F: Future>(
    watched: Pin<&mut Watched<F>>,
    ticket: &Option<Ticket>,
    cx: &mut TaskContext<'_>,
) -> Poll<Result<F::Output, Duration>> {
    let w = watched.project();
    if let Poll::Ready(output) = w.future.poll(cx) {
        return Poll::Ready(Ok(output));
    }
    let (Some(timer), Some(ticket)) = (w.timer.as_pin_mut(), ticket.as_ref()) else {
        return Poll::Pending;
    };
    match watchdog(timer, ticket, cx) {
        Some(idle) => Poll::Ready(Err(idle)),
        None => Poll::Pending,
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("ticket", &self.ticket)
            .finish_non_exhaustive()
    }
}
