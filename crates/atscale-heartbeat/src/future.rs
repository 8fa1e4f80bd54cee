//! Future types

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
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
        Watched { #[pin] future: Scoped<InProgress<F>> },
        Done,
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
        #[pin]
        timer: Option<Sleep>,
        ticket: Option<Ticket>,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn plain(future: F, ticket: Ticket) -> Self {
        ResponseFuture {
            inner: Inner::Plain { future },
            timer: None,
            ticket: Some(ticket),
        }
    }

    pub(crate) fn watched(future: Scoped<InProgress<F>>, ticket: Ticket, stall: Duration) -> Self {
        ResponseFuture {
            inner: Inner::Watched { future },
            timer: ticket
                .started()
                .checked_add(stall)
                .map(tokio::time::sleep_until),
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
        match ticket.check(Instant::now()) {
            Watchdog::Rearm(Some(due)) => timer.as_mut().reset(due),
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

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let output = match this.inner.as_mut().project() {
            InnerProj::Plain { future } => future.poll(cx),
            InnerProj::Watched { future } => future.poll(cx),
            InnerProj::Done => panic!("heartbeat response future polled after completion"),
        };
        if let Poll::Ready(result) = output {
            this.inner.set(Inner::Done);
            this.timer.set(None);
            let ticket = this
                .ticket
                .take()
                .expect("a pending future holds its ticket");
            return Poll::Ready(match result {
                Ok(response) => Ok(response.track(ticket)),
                Err(err) => {
                    ticket.finish(Outcome::Error);
                    Err(err.into())
                }
            });
        }
        let (Some(timer), Some(ticket)) = (this.timer.as_mut().as_pin_mut(), this.ticket.as_ref())
        else {
            return Poll::Pending;
        };
        let Some(idle) = watchdog(timer, ticket, cx) else {
            return Poll::Pending;
        };
        // Stalled: drop the inner future now and cancel its context.
        this.inner.set(Inner::Done);
        this.timer.set(None);
        if let Some(ticket) = this.ticket.take() {
            ticket.finish(Outcome::Stalled);
        }
        Poll::Ready(Err(Box::new(Stalled::new(idle))))
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("ticket", &self.ticket)
            .finish_non_exhaustive()
    }
}
