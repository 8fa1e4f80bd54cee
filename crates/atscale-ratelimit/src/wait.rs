//! Waiting for an admission time: the part of wait mode shared by the
//! service's future and the direct `acquire` methods.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Duration;

use atscale_core::{BoxError, Cancelled, Context, Overloaded};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::metrics::{self, QueueSlot, Refused};
use crate::store::{Claims, Grant, Refusal, Store};

/// How long a request may wait, and how many may wait at once.
#[derive(Clone, Debug)]
pub(crate) struct Queue {
    pub(crate) max_wait: Duration,
    pub(crate) max_waiters: usize,
    /// `None` when the number of waiters is not bounded.
    pub(crate) waiters: Option<Arc<AtomicUsize>>,
}

impl Queue {
    pub(crate) fn new(max_wait: Duration, max_waiters: usize) -> Self {
        Queue {
            max_wait,
            max_waiters,
            waiters: (max_waiters != usize::MAX).then(|| Arc::new(AtomicUsize::new(0))),
        }
    }

    /// The wait allowed for a request with context `cx`, and whether the
    /// queue was full (then only immediate admission is allowed).
    #[inline]
    pub(crate) fn allowed(&self, cx: Option<&Context>) -> (Duration, bool) {
        let mut max_wait = self.max_wait;
        if let Some(deadline) = cx.and_then(Context::deadline) {
            // Admission must come strictly before the deadline.
            let left = deadline.remaining().saturating_sub(Duration::from_nanos(1));
            max_wait = max_wait.min(left);
        }
        if max_wait.is_zero() {
            return (max_wait, false);
        }
        match &self.waiters {
            Some(w) if w.load(Ordering::Relaxed) >= self.max_waiters => (Duration::ZERO, true),
            _ => (max_wait, false),
        }
    }

    fn enter(&self) -> bool {
        self.waiters.as_ref().is_none_or(|w| {
            w.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.max_waiters).then_some(n + 1)
            })
            .is_ok()
        })
    }
}

/// What to do with a request once the store has answered.
pub(crate) enum Decision<St: Store> {
    /// Admitted now.
    Go,
    /// Admitted after a wait.
    Wait(Admission<St>),
    /// Refused.
    Fail(BoxError),
}

/// Turns a store's answer into a decision for a request.
#[inline]
pub(crate) fn decide<St: Store>(
    store: &St,
    answer: Result<Grant<St::Receipt>, Refusal>,
    queue: &Queue,
    queue_was_full: bool,
    cx: Option<&Context>,
) -> Decision<St> {
    match answer {
        Ok(grant) if grant.wait().is_zero() => {
            if let Some(receipt) = grant.into_receipt() {
                // A store may hand a receipt for an immediate admission; it is used.
                drop(receipt);
            }
            metrics::admitted();
            Decision::Go
        }
        Ok(grant) => {
            let wait = grant.wait();
            let mut guard = Guard {
                store: store.clone(),
                receipt: grant.into_receipt(),
                waiters: None,
                slot: None,
            };
            if !queue.enter() {
                // Lost a race for the last places in the queue: the guard
                // gives the reservation back.
                metrics::refused(Refused::QueueFull);
                return Decision::Fail(Box::new(Overloaded::new()));
            }
            guard.waiters = queue.waiters.clone();
            guard.slot = Some(metrics::waited(wait));
            Decision::Wait(Admission::new(wait, guard, cx))
        }
        Err(Refusal::RetryAfter(_)) if queue_was_full => {
            metrics::refused(Refused::QueueFull);
            Decision::Fail(Box::new(Overloaded::new()))
        }
        Err(refusal) => {
            metrics::refused(match refusal {
                Refusal::RetryAfter(_) => Refused::RateLimited,
                Refusal::InsufficientCapacity(_) => Refused::InsufficientCapacity,
                Refusal::Store(_) => Refused::Store,
            });
            Decision::Fail(refusal.into_error())
        }
    }
}

/// Holds a reservation until admission; dropping it earlier gives the
/// reservation back and leaves the queue.
pub(crate) struct Guard<St: Store> {
    store: St,
    receipt: Option<St::Receipt>,
    waiters: Option<Arc<AtomicUsize>>,
    /// In the queue-depth gauge until admitted or dropped.
    slot: Option<QueueSlot>,
}

impl<St: Store> Guard<St> {
    fn admit(&mut self) {
        self.receipt = None;
        self.slot = None;
        if let Some(w) = self.waiters.take() {
            w.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl<St: Store> Drop for Guard<St> {
    fn drop(&mut self) {
        if let Some(receipt) = self.receipt.take() {
            self.store.refund(receipt);
        }
        if let Some(w) = self.waiters.take() {
            w.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

pin_project! {
    /// Sleeps until the admission time; fails with `Cancelled` if the
    /// request's context is cancelled first.
    pub(crate) struct Admission<St: Store> {
        #[pin]
        sleep: Sleep,
        #[pin]
        cancelled: Option<WaitForCancellationFutureOwned>,
        guard: Guard<St>,
    }
}

impl<St: Store> Admission<St> {
    fn new(wait: Duration, guard: Guard<St>, cx: Option<&Context>) -> Self {
        Admission {
            sleep: tokio::time::sleep(wait),
            cancelled: cx.map(|cx| cx.token().clone().cancelled_owned()),
            guard,
        }
    }
}

impl<St: Store> Future for Admission<St> {
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(cancelled) = this.cancelled.as_pin_mut()
            && cancelled.poll(cx).is_ready()
        {
            metrics::refused(Refused::Cancelled);
            return Poll::Ready(Err(Box::new(Cancelled::new())));
        }
        ready!(this.sleep.poll(cx));
        this.guard.admit();
        Poll::Ready(Ok(()))
    }
}

/// The direct (non-layer) acquire: reserve, then wait in the caller's task.
pub(crate) async fn acquire<St: Store>(
    store: &St,
    claims: &Claims<'_, St::Bucket>,
    queue: &Queue,
) -> Result<(), BoxError> {
    let cx = Context::current();
    let (max_wait, full) = queue.allowed(cx.as_ref());
    let answer = match store.try_acquire_now(claims, max_wait) {
        Some(answer) => answer,
        None => store.acquire_within(claims, max_wait, cx.as_ref()).await,
    };
    match decide(store, answer, queue, full, cx.as_ref()) {
        Decision::Go => Ok(()),
        Decision::Wait(admission) => admission.await,
        Decision::Fail(e) => Err(e),
    }
}
