//! Future types

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use atscale_core::{BoxError, Context, DeadlineExceeded, Scoped};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::metrics::{self, Stage};

pin_project! {
    /// Response future of [`Deadline`](crate::Deadline).
    ///
    /// Dropping it before it completes cancels the request's context, so
    /// work spawned under it stops too.
    #[derive(Debug)]
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before completing: the caller gave up on the request.
            if let StateProj::Running { inner, .. } = this.project().state.project() {
                inner.context().cancel();
            }
        }
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F> {
        Running {
            // The inner future, polled inside the request's context (which
            // it holds, so cancelling needs no second handle, and whose
            // deadline is the request's).
            #[pin]
            inner: Scoped<F>,
            // Armed (and boxed) only once the inner future is pending: a
            // request that answers at once never touches the timer wheel,
            // and every request moves a small future through the stack.
            timer: Option<Pin<Box<Sleep>>>,
        },
        Failed {
            error: Option<BoxError>,
        },
        Done,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn running(inner: Scoped<F>) -> Self {
        ResponseFuture {
            state: State::Running { inner, timer: None },
        }
    }

    pub(crate) fn failed(error: BoxError) -> Self {
        ResponseFuture {
            state: State::Failed { error: Some(error) },
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    // Always inlined, with the error and timer paths out of line (and not
    // generic over the inner future): the answer-at-once path is then a few
    // instructions in the caller's poll (10 ns less per `http::Request` in
    // benches/deadline.rs).
    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        let outcome = match state.as_mut().project() {
            StateProj::Failed { error } => {
                return Poll::Ready(Err(error.take().expect("polled after completion")));
            }
            StateProj::Done => panic!("polled after completion"),
            StateProj::Running { mut inner, timer } => match inner.as_mut().poll(cx) {
                // Success leaves the context alone: a streaming body may
                // still be produced under it.
                Poll::Ready(Ok(response)) => Ok(response),
                Poll::Ready(Err(error)) => Err(inner_failed(inner.context(), error.into())),
                Poll::Pending => match poll_timer(inner.context(), timer, cx) {
                    Poll::Ready(elapsed) => Err(elapsed),
                    Poll::Pending => return Poll::Pending,
                },
            },
        };
        state.set(State::Done);
        Poll::Ready(outcome)
    }
}

/// The inner service failed: that ends the request, so whatever it started
/// is stopped.
#[cold]
#[inline(never)]
fn inner_failed(context: &Context, error: BoxError) -> BoxError {
    context.cancel();
    // An inner layer that enforces the same deadline (tonic's `Channel`
    // enforces the `grpc-timeout` we wrote) can fail first when both timers
    // fire together: its error is the deadline passing, and is reported as
    // that.
    let now = Instant::now();
    match context.deadline() {
        Some(deadline) if deadline.is_expired_at(now) => {
            metrics::exceeded(deadline.origin(), Stage::Running);
            DeadlineExceeded::at(deadline, now).into()
        }
        _ => error,
    }
}

/// The inner future is pending: arms the timer (boxed, on the first time)
/// and polls it. Ready with the error once the deadline has passed, after
/// cancelling the context (the inner future is dropped by the caller).
#[inline(never)]
fn poll_timer(
    context: &Context,
    timer: &mut Option<Pin<Box<Sleep>>>,
    cx: &mut TaskContext<'_>,
) -> Poll<BoxError> {
    let Some(deadline) = context.deadline() else {
        return Poll::Pending;
    };
    let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.instant())));
    match timer.as_mut().poll(cx) {
        Poll::Ready(()) => {
            context.cancel();
            metrics::exceeded(deadline.origin(), Stage::Running);
            Poll::Ready(DeadlineExceeded::at(deadline, Instant::now()).into())
        }
        Poll::Pending => Poll::Pending,
    }
}
