//! Future types

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Duration;

use atscale_core::{BoxError, CancelOnDrop, Context, RetryThrottle};
use atscale_hedge::Replay;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tower::util::Oneshot;
use tower_service::Service;

use crate::error::{RetryFailed, Stop};
use crate::metrics;
use crate::outcome::{Failure, RetryRequest, RetryResponse};
use crate::policy::RetryPolicy;
use crate::pushback::Pushback;
use crate::service::Backends;

macro_rules! event {
    ($($arg:tt)*) => {
        #[cfg(feature = "tracing")]
        tracing::debug!(target: "atscale_retry", $($arg)*);
    };
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<Req>, Req> {
        // The first attempt around a single service, called on the
        // readiness the caller drove through `poll_ready`.
        First { #[pin] fut: S::Future },
        // Any attempt on a clone: `ready()`, then `call`.
        Attempt { #[pin] fut: Oneshot<S, Req> },
        // Waiting before the next attempt; woken early if the request is
        // cancelled.
        Backoff {
            #[pin] sleep: Sleep,
            #[pin] cancelled: Option<WaitForCancellationFutureOwned>,
        },
        Done,
    }
}

/// What a call that may be retried carries besides its first attempt.
pub(crate) struct Plan<S, Req> {
    /// The copy retries are replayed from; the last one takes it.
    pub(crate) template: Option<Req>,
    pub(crate) backends: Backends<S>,
    pub(crate) first: usize,
    pub(crate) parent: Option<Context>,
}

/// The last failed attempt, kept through the backoff.
enum Last<Res> {
    Error(BoxError),
    Response(Res),
}

pin_project! {
    /// Response future of [`Retry`](crate::Retry): attempt, backoff, attempt, …
    /// in one state machine (nothing boxed per call).
    #[project = ResponseFutureProj]
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<S: Service<Req>, Req> {
        #[pin]
        state: State<S, Req>,
        guard: Option<CancelOnDrop>,
        // `None`: no retry is possible and no throttle counts outcomes, so
        // the attempt's outcome passes through unjudged.
        policy: Option<RetryPolicy>,
        throttle: Option<RetryThrottle>,
        plan: Option<Plan<S, Req>>,
        last: Option<Last<S::Response>>,
        attempts: u8,
        since_pushback: u32,
    }
}

impl<S: Service<Req>, Req> std::fmt::Debug for ResponseFuture<S, Req> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::First { .. } | State::Attempt { .. } => "attempt",
            State::Backoff { .. } => "backoff",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    pub(crate) fn first(
        fut: S::Future,
        guard: Option<CancelOnDrop>,
        policy: Option<RetryPolicy>,
        throttle: Option<RetryThrottle>,
        plan: Option<Plan<S, Req>>,
    ) -> Self {
        ResponseFuture {
            state: State::First { fut },
            guard,
            policy,
            throttle,
            plan,
            last: None,
            attempts: 1,
            since_pushback: 0,
        }
    }

    pub(crate) fn oneshot(
        svc: S,
        req: Req,
        guard: Option<CancelOnDrop>,
        policy: Option<RetryPolicy>,
        throttle: Option<RetryThrottle>,
        plan: Option<Plan<S, Req>>,
    ) -> Self {
        ResponseFuture {
            state: State::Attempt {
                fut: Oneshot::new(svc, req),
            },
            guard,
            policy,
            throttle,
            plan,
            last: None,
            attempts: 1,
            since_pushback: 0,
        }
    }
}

/// What to do after an attempt.
enum Next {
    Wait(Duration),
    Stop(Stop),
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    S::Response: RetryResponse,
    Req: RetryRequest,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let out = match this.state.as_mut().project() {
                StateProj::First { fut } => ready!(fut.poll(cx)).map_err(Into::into),
                StateProj::Attempt { fut } => ready!(fut.poll(cx)).map_err(Into::into),
                StateProj::Backoff { sleep, cancelled } => {
                    if let Some(cancelled) = cancelled.as_pin_mut()
                        && cancelled.poll(cx).is_ready()
                    {
                        this.state.set(State::Done);
                        let last = this.last.take().expect("kept through the backoff");
                        return Poll::Ready(give_up(last, *this.attempts, Stop::Cancelled));
                    }
                    ready!(sleep.poll(cx));
                    let last = this.last.take().expect("kept through the backoff");
                    if !launch(&mut this) {
                        // The request would not copy again (a `Replay` that
                        // gave a copy once may refuse the next).
                        this.state.set(State::Done);
                        return Poll::Ready(give_up(last, *this.attempts, Stop::NotRetryable));
                    }
                    continue;
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            };
            let Some(policy) = this.policy.as_ref() else {
                // Unjudged: the attempt's outcome, as it is.
                this.state.set(State::Done);
                return Poll::Ready(out);
            };

            // 1. Judge the outcome; a success (or a committed response) ends the call.
            let (retryable, pushback) = {
                let failure = match &out {
                    Ok(res) => res.failure(),
                    Err(e) => Some(Failure::of_error(&**e)),
                };
                match failure {
                    None => (None, Pushback::None),
                    Some(f) => (Some(policy.is_retryable(&f)), f.pushback()),
                }
            };
            let Some(retryable) = retryable else {
                if let Some(t) = this.throttle.as_ref() {
                    t.success();
                }
                metrics::throttle(this.throttle.as_ref());
                if let Some(guard) = this.guard.take() {
                    guard.disarm(); // the response body may still stream
                }
                this.state.set(State::Done);
                let Ok(mut res) = out else {
                    unreachable!("an error is always a failure");
                };
                if *this.attempts > 1 {
                    res.set_attempts(*this.attempts);
                }
                return Poll::Ready(Ok(res));
            };
            // The failed attempt's context is cancelled.
            this.guard.take();
            let last = match out {
                Ok(res) => Last::Response(res),
                Err(e) => Last::Error(e),
            };

            // 2. Decide whether to retry, and when.
            let attempts = *this.attempts;
            let counts = retryable || pushback == Pushback::Stop;
            let throttled = counts && this.throttle.as_ref().is_some_and(|t| !t.failure());
            metrics::throttle(this.throttle.as_ref());
            let next = if !retryable {
                Next::Stop(Stop::NotRetryable)
            } else if let Some(plan) = this.plan.as_ref() {
                if pushback == Pushback::Stop {
                    Next::Stop(Stop::Pushback)
                } else if attempts >= policy.max_attempts() {
                    Next::Stop(Stop::MaxAttempts)
                } else if throttled {
                    Next::Stop(Stop::Throttled)
                } else {
                    let wait = match pushback.after() {
                        Some(after) => {
                            *this.since_pushback = 0;
                            after
                        }
                        None => {
                            *this.since_pushback += 1;
                            policy.backoff(*this.since_pushback)
                        }
                    };
                    match &plan.parent {
                        Some(p) if p.is_cancelled() => Next::Stop(Stop::Cancelled),
                        Some(p)
                            if p.remaining().is_some_and(|left| {
                                wait.saturating_add(policy.min_attempt()) > left
                            }) =>
                        {
                            Next::Stop(Stop::Deadline)
                        }
                        _ => Next::Wait(wait),
                    }
                }
            } else {
                // Not replayable (or not idempotent): sent once, its outcome
                // as it is.
                this.state.set(State::Done);
                return Poll::Ready(pass(last, attempts));
            };
            match next {
                Next::Stop(stop) => {
                    event!(attempts, ?stop, "no retry");
                    this.state.set(State::Done);
                    return Poll::Ready(give_up(last, attempts, stop));
                }
                Next::Wait(wait) if wait.is_zero() => {
                    if !launch(&mut this) {
                        this.state.set(State::Done);
                        return Poll::Ready(give_up(last, attempts, Stop::NotRetryable));
                    }
                }
                Next::Wait(wait) => {
                    event!(
                        attempts,
                        wait_us = wait.as_micros() as u64,
                        "retry after backoff"
                    );
                    let parent = this.plan.as_ref().and_then(|p| p.parent.as_ref());
                    let cancelled = parent.map(|p| p.token().clone().cancelled_owned());
                    *this.last = Some(last);
                    this.state.set(State::Backoff {
                        sleep: tokio::time::sleep(wait),
                        cancelled,
                    });
                }
            }
        }
    }
}

/// Sends the next attempt; `false` when the request could not be copied.
fn launch<S, Req>(this: &mut ResponseFutureProj<'_, S, Req>) -> bool
where
    S: Service<Req> + Clone,
    Req: RetryRequest,
{
    let plan = this.plan.as_mut().expect("launched with a plan");
    let previous = *this.attempts;
    let last = previous + 1 >= this.policy.as_ref().map_or(0, RetryPolicy::max_attempts);
    let req = if last {
        plan.template.take()
    } else {
        plan.template.as_ref().and_then(Replay::replay)
    };
    let Some(mut req) = req else {
        return false;
    };
    req.set_previous_attempts(previous);
    if let Some(parent) = &plan.parent {
        let child = parent.child();
        *this.guard = Some(child.cancel_on_drop());
        req.set_context(child);
    }
    // The copy's deadline headers say what is left now, not at the first send.
    atscale_deadline::attempt::refresh(&mut req);
    let (svc, replica) = plan.backends.for_attempt(plan.first, usize::from(previous));
    event!(attempt = previous + 1, replica, "retry sent");
    #[cfg(not(feature = "tracing"))]
    let _ = replica;
    *this.attempts = previous + 1;
    metrics::retried();
    this.state.set(State::Attempt {
        fut: Oneshot::new(svc, req),
    });
    true
}

/// The outcome of a call sent once (not replayable): as it is.
fn pass<Res: RetryResponse>(last: Last<Res>, attempts: u8) -> Result<Res, BoxError> {
    give_up(last, attempts, Stop::NotRetryable)
}

/// The last outcome: a failing response as it is (told how many attempts
/// were made), an error wrapped in [`RetryFailed`] unless the first attempt
/// simply failed in a way no retry would fix.
fn give_up<Res: RetryResponse>(last: Last<Res>, attempts: u8, stop: Stop) -> Result<Res, BoxError> {
    match last {
        Last::Response(mut res) => {
            if attempts > 1 {
                res.set_attempts(attempts);
            }
            Ok(res)
        }
        Last::Error(e) if attempts == 1 && stop == Stop::NotRetryable => Err(e),
        Last::Error(e) => Err(Box::new(RetryFailed::new(attempts, stop, e))),
    }
}
