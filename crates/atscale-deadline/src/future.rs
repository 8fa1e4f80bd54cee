//! Future types

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use atscale_core::{BoxError, CancelOnDrop, Deadline, DeadlineExceeded, Scoped};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

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
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F> {
        Running {
            // The inner future, polled inside the request's task-local context.
            #[pin]
            inner: Scoped<F>,
            // Armed only once the inner future is pending: a request that
            // answers at once never touches the timer wheel.
            #[pin]
            timer: Option<Sleep>,
            deadline: Option<Deadline>,
            // Cancels the context if the request ends any way but success.
            guard: Option<CancelOnDrop>,
        },
        Failed {
            error: Option<BoxError>,
        },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn running(
        inner: Scoped<F>,
        deadline: Option<Deadline>,
        guard: CancelOnDrop,
    ) -> Self {
        ResponseFuture {
            state: State::Running {
                inner,
                timer: None,
                deadline,
                guard: Some(guard),
            },
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

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        let expired = match state.as_mut().project() {
            StateProj::Failed { error } => {
                return Poll::Ready(Err(error.take().expect("polled after completion")));
            }
            StateProj::Running {
                inner,
                mut timer,
                deadline,
                guard,
            } => {
                if let Poll::Ready(result) = inner.poll(cx) {
                    return Poll::Ready(match result {
                        Ok(response) => {
                            // Success: a streaming body may still be running under the context.
                            if let Some(guard) = guard.take() {
                                guard.disarm();
                            }
                            Ok(response)
                        }
                        Err(error) => {
                            drop(guard.take());
                            Err(error.into())
                        }
                    });
                }
                let Some(deadline) = *deadline else {
                    return Poll::Pending;
                };
                if timer.is_none() {
                    timer.set(Some(tokio::time::sleep_until(deadline.instant())));
                }
                match timer.as_pin_mut().map(|sleep| sleep.poll(cx)) {
                    Some(Poll::Ready(())) => deadline,
                    _ => return Poll::Pending,
                }
            }
        };
        // Expired: drop the inner future and cancel the context (the guard) now.
        let error = DeadlineExceeded::at(expired, Instant::now());
        state.set(State::Failed { error: None });
        Poll::Ready(Err(error.into()))
    }
}
