//! Future types

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use atscale_core::{BoxError, Scoped, Stalled};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::pulse::Outcome;
use crate::track::{Ticket, Track};

pin_project! {
    #[project = InnerProj]
    enum Inner<F> {
        Plain { #[pin] future: F },
        Scoped { #[pin] future: Scoped<F> },
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

    pub(crate) fn scoped(future: Scoped<F>, ticket: Ticket, stall: Duration) -> Self {
        ResponseFuture {
            inner: Inner::Scoped { future },
            timer: Some(tokio::time::sleep_until(ticket.started() + stall)),
            ticket: Some(ticket),
        }
    }
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
            InnerProj::Scoped { future } => future.poll(cx),
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
        if let Some(timer) = this.timer.as_mut().as_pin_mut() {
            if timer.poll(cx).is_ready() {
                // Stalled: drop the inner future now and cancel its context.
                this.inner.set(Inner::Done);
                this.timer.set(None);
                let ticket = this
                    .ticket
                    .take()
                    .expect("a pending future holds its ticket");
                let idle = Instant::now().saturating_duration_since(ticket.started());
                ticket.finish(Outcome::Stalled);
                return Poll::Ready(Err(Box::new(Stalled::new(idle))));
            }
        }
        Poll::Pending
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("ticket", &self.ticket)
            .finish_non_exhaustive()
    }
}
