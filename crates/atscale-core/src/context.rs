//! The request context: one deadline and one cancellation signal.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::task::futures::TaskLocalFuture;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::deadline::{Deadline, Origin};
use crate::preempt::Preemptable;

tokio::task_local! {
    static CURRENT: Context;
}

/// One request's deadline and cancellation signal, cheap to clone.
///
/// A `Context` travels with a request in `http::Extensions` (see
/// [`Carrier`](crate::Carrier)) and, while a service's future runs, in a
/// task-local scope, so that [`Context::current`] inside a handler returns it
/// and outgoing calls inherit it without plumbing.
///
/// Cancellation is a tree: [`Context::child`] gives a context that is
/// cancelled with its parent, but whose own cancellation (for example when
/// its tighter deadline fires) leaves the parent untouched.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use atscale_core::{Context, Origin};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let cx = Context::new().with_budget(Duration::from_millis(100), Origin::Local);
/// let slow = tokio::time::sleep(Duration::from_secs(5));
/// let err = cx.run(slow).await.unwrap_err();
/// assert_eq!(err.to_string(), "deadline exceeded after 100ms (budget 100ms, local)");
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct Context {
    deadline: Option<Deadline>,
    token: CancellationToken,
}

impl Context {
    /// A root context: no deadline, not cancelled.
    pub fn new() -> Self {
        Context::default()
    }

    /// A child of this context: same deadline, cancelled when this one is,
    /// cancellable on its own without touching this one.
    pub fn child(&self) -> Self {
        Context {
            deadline: self.deadline,
            token: self.token.child_token(),
        }
    }

    /// A child of this context whose deadline is `deadline`, unless this
    /// context's own deadline is earlier (then the child keeps that one).
    ///
    /// Unlike [`Context::with_deadline`], a tie goes to `deadline`, so a hop
    /// can relabel an inherited deadline with the budget and origin it sees.
    pub fn child_until(&self, deadline: Deadline) -> Self {
        let deadline = match self.deadline {
            Some(own) if own.instant() < deadline.instant() => own,
            _ => deadline,
        };
        Context {
            deadline: Some(deadline),
            token: self.token.child_token(),
        }
    }

    /// Replaces the deadline by the earlier of the current one and `deadline`.
    ///
    /// A context can only get tighter: a child never outlives its parent.
    #[must_use]
    pub fn with_deadline(mut self, deadline: Deadline) -> Self {
        self.deadline = Deadline::earliest(self.deadline, Some(deadline));
        self
    }

    /// Tightens the deadline to `budget` from now (see [`Context::with_deadline`]).
    /// A budget too large for the clock (such as [`Duration::MAX`]) changes nothing.
    #[must_use]
    pub fn with_budget(self, budget: Duration, origin: Origin) -> Self {
        match Deadline::after(Instant::now(), budget, origin) {
            Some(deadline) => self.with_deadline(deadline),
            None => self,
        }
    }

    /// The deadline, if any.
    pub const fn deadline(&self) -> Option<Deadline> {
        self.deadline
    }

    /// Time left before the deadline (zero once passed), `None` without a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline.map(|d| d.remaining())
    }

    /// Whether the deadline has passed.
    pub fn is_expired(&self) -> bool {
        self.deadline
            .is_some_and(|d| d.is_expired_at(Instant::now()))
    }

    /// Cancels this context and every child of it.
    pub fn cancel(&self) {
        self.token.cancel();
    }

    /// Whether this context (or an ancestor) was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when this context (or an ancestor) is cancelled.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// The cancellation token behind this context, for APIs that take one.
    pub const fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Runs `future` until it finishes, this context is cancelled, or the
    /// deadline passes, whichever comes first (preemptable work).
    ///
    /// On interruption `future` is dropped, which is the only way async work
    /// can be stopped: code that blocks a thread cannot be preempted.
    pub fn run<F: Future>(&self, future: F) -> Preemptable<F> {
        Preemptable::new(self.clone(), future)
    }

    /// The context of the request being served by this task, if any.
    ///
    /// Set by atscale layers while the inner service runs, and by
    /// [`Context::scope`] and [`spawn`].
    pub fn current() -> Option<Context> {
        CURRENT.try_with(Context::clone).ok()
    }

    /// Runs `f` with `Context::current` returning this context.
    pub fn sync_scope<R>(self, f: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(self, f)
    }

    /// Wraps `future` so that, whenever it is polled, [`Context::current`]
    /// returns this context.
    pub fn scope<F: Future>(self, future: F) -> Scoped<F> {
        CURRENT.scope(self, future)
    }
}

/// A future that runs inside a [`Context::scope`].
pub type Scoped<F> = TaskLocalFuture<Context, F>;

/// Spawns `future` on the tokio runtime carrying the current context, so that
/// [`Context::current`] works in the new task too.
///
/// The task is not stopped by the context's cancellation by itself: wrap the
/// work in [`Context::run`] for that, or use [`spawn_preemptable`].
///
/// # Panics
///
/// Like [`tokio::spawn`], when called outside a tokio runtime.
pub fn spawn<F>(future: F) -> JoinHandle<Option<F::Output>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match Context::current() {
        Some(cx) => tokio::spawn(cx.scope(async move { Some(future.await) })),
        None => tokio::spawn(async move { Some(future.await) }),
    }
}

/// Spawns `future` carrying the current context, and stops it (drops it) when
/// that context is cancelled or its deadline passes. The handle yields
/// `None` when the work was stopped.
///
/// # Panics
///
/// Like [`tokio::spawn`], when called outside a tokio runtime.
pub fn spawn_preemptable<F>(future: F) -> JoinHandle<Option<F::Output>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match Context::current() {
        Some(cx) => {
            let work = cx.run(future);
            tokio::spawn(cx.scope(async move { work.await.ok() }))
        }
        None => tokio::spawn(async move { Some(future.await) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn child_is_cancelled_with_parent_but_not_the_reverse() {
        let parent = Context::new();
        let child = parent.child();
        child.cancel();
        assert!(!parent.is_cancelled());
        let child = parent.child();
        parent.cancel();
        assert!(child.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn child_until_relabels_ties_but_never_loosens() {
        let now = Instant::now();
        let parent = Context::new().with_budget(Duration::from_secs(1), Origin::Local);
        let same = parent.deadline().unwrap().inherited(now, Origin::Parent);
        assert_eq!(
            parent.child_until(same).deadline().unwrap().origin(),
            Origin::Parent
        );
        let later = Deadline::after(now, Duration::from_secs(2), Origin::Header).unwrap();
        assert_eq!(parent.child_until(later).deadline(), parent.deadline());
        let sooner = Deadline::after(now, Duration::from_millis(5), Origin::Header).unwrap();
        let child = parent.child_until(sooner);
        assert_eq!(child.deadline(), Some(sooner));
        child.cancel();
        assert!(!parent.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_context_only_gets_tighter() {
        let cx = Context::new().with_budget(Duration::from_secs(1), Origin::Header);
        let cx = cx.with_budget(Duration::from_secs(5), Origin::Local);
        assert_eq!(cx.deadline().unwrap().origin(), Origin::Header);
        assert_eq!(cx.remaining(), Some(Duration::from_secs(1)));
        let cx = cx.with_budget(Duration::MAX, Origin::Local);
        assert_eq!(cx.remaining(), Some(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(cx.is_expired());
    }

    #[tokio::test(start_paused = true)]
    async fn current_is_visible_in_scope_and_in_spawned_tasks() {
        assert!(Context::current().is_none());
        let cx = Context::new().with_budget(Duration::from_secs(3), Origin::Local);
        let seen = cx
            .clone()
            .scope(async {
                tokio::task::yield_now().await;
                let here = Context::current().unwrap().deadline();
                let there = spawn(async { Context::current().unwrap().deadline() })
                    .await
                    .unwrap()
                    .unwrap();
                (here, there)
            })
            .await;
        assert_eq!(seen, (cx.deadline(), cx.deadline()));
        assert_eq!(
            cx.sync_scope(|| Context::current().unwrap().remaining()),
            Some(Duration::from_secs(3))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn spawned_preemptable_work_stops_on_cancel() {
        let cx = Context::new();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let handle = cx.clone().sync_scope(|| {
            spawn_preemptable(async move {
                started_tx.send(()).unwrap();
                std::future::pending::<()>().await
            })
        });
        started_rx.await.unwrap();
        cx.cancel();
        assert_eq!(handle.await.unwrap(), None);
    }
}
