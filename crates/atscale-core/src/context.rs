//! The request context: one deadline and one cancellation signal.

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::deadline::{Deadline, Origin};
use crate::preempt::Preemptable;

thread_local! {
    /// The context of the request whose code is running on this thread, set
    /// while a [`Scoped`] future is polled. A `Cell`: entering and leaving a
    /// scope is a swap, with no borrow flag to check and set.
    static CURRENT: Cell<Option<Context>> = const { Cell::new(None) };
}

/// Runs `f` with `slot`'s context current on this thread, by swapping it in
/// and out (no reference counting); restored even if `f` panics.
#[inline(always)]
fn with_current<R>(slot: &mut Option<Context>, f: impl FnOnce() -> R) -> R {
    struct Restore<'a>(&'a mut Option<Context>);
    impl Drop for Restore<'_> {
        fn drop(&mut self) {
            // During thread teardown there is nothing left to restore into.
            let _ = CURRENT.try_with(|current| *self.0 = current.replace(self.0.take()));
        }
    }
    if CURRENT
        .try_with(|current| *slot = current.replace(slot.take()))
        .is_err()
    {
        return f();
    }
    let _restore = Restore(slot);
    f()
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
/// Cloning is one reference-count increment. The waitable signal (a
/// [`CancellationToken`]) is only built the first time something waits on
/// it, so a request whose context nobody awaits pays for one allocation and
/// a flag.
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
#[derive(Clone, Default)]
pub struct Context {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    deadline: Option<Deadline>,
    parent: Option<Context>,
    /// Set by [`Context::cancel`]; parents are checked by walking up.
    cancelled: AtomicBool,
    /// Built on first wait, as a child of the parent's token.
    token: OnceLock<CancellationToken>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("deadline", &self.inner.deadline)
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl Context {
    /// A root context: no deadline, not cancelled.
    pub fn new() -> Self {
        Context::default()
    }

    /// A root context whose deadline is `deadline`: what
    /// `Context::new().with_deadline(deadline)` gives, without the check
    /// whether the new handle is shared.
    pub fn until(deadline: Deadline) -> Self {
        Context {
            inner: Arc::new(Inner {
                deadline: Some(deadline),
                ..Inner::default()
            }),
        }
    }

    fn child_with(&self, deadline: Option<Deadline>) -> Self {
        Context {
            inner: Arc::new(Inner {
                deadline,
                parent: Some(self.clone()),
                cancelled: AtomicBool::new(false),
                token: OnceLock::new(),
            }),
        }
    }

    /// A child of this context: same deadline, cancelled when this one is,
    /// cancellable on its own without touching this one.
    pub fn child(&self) -> Self {
        self.child_with(self.inner.deadline)
    }

    /// A child of this context whose deadline is `deadline`, unless this
    /// context's own deadline is earlier (then the child keeps that one).
    ///
    /// Unlike [`Context::with_deadline`], a tie goes to `deadline`, so a hop
    /// can relabel an inherited deadline with the budget and origin it sees.
    pub fn child_until(&self, deadline: Deadline) -> Self {
        let deadline = match self.inner.deadline {
            Some(own) if own.instant() < deadline.instant() => own,
            _ => deadline,
        };
        self.child_with(Some(deadline))
    }

    /// The earlier of the current deadline and `deadline`.
    ///
    /// A context can only get tighter: a child never outlives its parent.
    /// When this handle is shared, the result is a [child](Context::child)
    /// (as Go's `context.WithDeadline`), so the other handles keep their deadline.
    #[must_use]
    pub fn with_deadline(mut self, deadline: Deadline) -> Self {
        let earliest = Deadline::earliest(self.inner.deadline, Some(deadline));
        if earliest == self.inner.deadline {
            return self;
        }
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => {
                inner.deadline = earliest;
                self
            }
            None => self.child_with(earliest),
        }
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
    pub fn deadline(&self) -> Option<Deadline> {
        self.inner.deadline
    }

    /// Time left before the deadline (zero once passed), `None` without a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.inner.deadline.map(|d| d.remaining())
    }

    /// Whether the deadline has passed.
    pub fn is_expired(&self) -> bool {
        self.inner
            .deadline
            .is_some_and(|d| d.is_expired_at(Instant::now()))
    }

    /// Cancels this context and every child of it.
    pub fn cancel(&self) {
        // Flag first, then the token if one was built: `token()` builds, then
        // reads the flag, so one of the two always sees the other.
        self.inner.cancelled.store(true, Ordering::SeqCst);
        if let Some(token) = self.inner.token.get() {
            token.cancel();
        }
    }

    /// Whether this context (or an ancestor) was cancelled.
    pub fn is_cancelled(&self) -> bool {
        let mut cx = Some(self);
        while let Some(c) = cx {
            if c.inner.cancelled.load(Ordering::SeqCst) {
                return true;
            }
            cx = c.inner.parent.as_ref();
        }
        false
    }

    /// Completes when this context (or an ancestor) is cancelled.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token().cancelled()
    }

    /// The cancellation token behind this context, for APIs that take one.
    /// Built (with its ancestors') on first use.
    pub fn token(&self) -> &CancellationToken {
        let token = self.inner.token.get_or_init(|| match &self.inner.parent {
            Some(parent) => parent.token().child_token(),
            None => CancellationToken::new(),
        });
        if self.inner.cancelled.load(Ordering::SeqCst) {
            token.cancel();
        }
        token
    }

    /// A guard that cancels this context when dropped, unless
    /// [disarmed](CancelOnDrop::disarm) first: for a response future that
    /// must stop the request's work if it is dropped early.
    pub fn cancel_on_drop(&self) -> CancelOnDrop {
        CancelOnDrop {
            cx: Some(self.clone()),
        }
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
        CURRENT
            .try_with(|current| {
                let cx = current.take();
                let copy = cx.clone();
                current.set(cx);
                copy
            })
            .ok()
            .flatten()
    }

    /// Runs `f` with `Context::current` returning this context.
    pub fn sync_scope<R>(self, f: impl FnOnce() -> R) -> R {
        with_current(&mut Some(self), f)
    }

    /// Wraps `future` so that, whenever it is polled, [`Context::current`]
    /// returns this context.
    pub fn scope<F: Future>(self, future: F) -> Scoped<F> {
        Scoped {
            future,
            cx: Some(self),
        }
    }

    /// Calls `make` (typically an inner service's `call`) with this context
    /// current, and scopes the future it returns in the same context: what a
    /// layer does with its inner service, without cloning the context.
    #[inline(always)]
    pub fn scope_with<F: Future>(self, make: impl FnOnce() -> F) -> Scoped<F> {
        let mut cx = Some(self);
        let future = with_current(&mut cx, make);
        Scoped { future, cx }
    }
}

/// Cancels a [`Context`] when dropped, unless disarmed: see [`Context::cancel_on_drop`].
#[derive(Debug)]
#[must_use = "the context is cancelled as soon as the guard is dropped"]
pub struct CancelOnDrop {
    cx: Option<Context>,
}

impl CancelOnDrop {
    /// Leaves the context alone from now on.
    pub fn disarm(mut self) {
        self.cx = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(cx) = self.cx.take() {
            cx.cancel();
        }
    }
}

pin_project! {
    /// A future that runs inside a [`Context::scope`]: while it is polled,
    /// [`Context::current`] returns its context.
    #[derive(Debug)]
    #[must_use = "futures do nothing unless polled"]
    pub struct Scoped<F> {
        #[pin]
        future: F,
        cx: Option<Context>,
    }
}

impl<F> Scoped<F> {
    /// The context the future runs in.
    pub fn context(&self) -> &Context {
        self.cx
            .as_ref()
            .expect("a scope holds its context between polls")
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        let this = self.project();
        let future = this.future;
        with_current(this.cx, || future.poll(cx))
    }
}

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
    async fn waiters_wake_whether_the_token_was_built_before_or_after_cancel() {
        // built before: a waiter on a grandchild wakes when the root is cancelled
        let root = Context::new();
        let grandchild = root.child().child();
        let waiter = tokio::spawn({
            let g = grandchild.clone();
            async move { g.cancelled().await }
        });
        tokio::task::yield_now().await;
        root.cancel();
        waiter.await.unwrap();
        // built after: the token of an already cancelled context is cancelled
        let root = Context::new();
        let child = root.child();
        root.cancel();
        assert!(child.is_cancelled());
        child.cancelled().await;
        assert!(child.token().is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn with_deadline_on_a_shared_handle_leaves_the_others_alone() {
        let a = Context::new().with_budget(Duration::from_secs(5), Origin::Local);
        let b = a.clone().with_budget(Duration::from_secs(1), Origin::Local);
        assert_eq!(a.remaining(), Some(Duration::from_secs(5)));
        assert_eq!(b.remaining(), Some(Duration::from_secs(1)));
        a.cancel();
        assert!(b.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_on_drop_cancels_unless_disarmed() {
        let cx = Context::new();
        cx.cancel_on_drop().disarm();
        assert!(!cx.is_cancelled());
        drop(cx.cancel_on_drop());
        assert!(cx.is_cancelled());
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
    async fn until_is_a_root_context_with_that_deadline() {
        let deadline =
            Deadline::after(Instant::now(), Duration::from_millis(5), Origin::Header).unwrap();
        let cx = Context::until(deadline);
        assert_eq!(cx.deadline(), Some(deadline));
        assert_eq!(
            cx.deadline(),
            Context::new().with_deadline(deadline).deadline()
        );
        assert!(!cx.is_cancelled());
        // a root: its child is cancelled with it, and nothing above it is
        let child = cx.child();
        cx.cancel();
        assert!(child.is_cancelled());
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
    async fn scopes_nest_and_restore_even_after_a_panic() {
        let outer = Context::new().with_budget(Duration::from_secs(9), Origin::Local);
        let inner = Context::new().with_budget(Duration::from_secs(1), Origin::Local);
        outer.clone().sync_scope(|| {
            let seen = inner
                .clone()
                .sync_scope(|| Context::current().unwrap().remaining());
            assert_eq!(seen, Some(Duration::from_secs(1)));
            assert_eq!(
                Context::current().unwrap().remaining(),
                Some(Duration::from_secs(9))
            );
            let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                inner.clone().sync_scope(|| panic!("boom"))
            }));
            assert!(panicked.is_err());
            assert_eq!(
                Context::current().unwrap().remaining(),
                Some(Duration::from_secs(9))
            );
        });
        assert!(Context::current().is_none());
        let scoped = inner.clone().scope_with(|| {
            let at_call = Context::current().unwrap().remaining();
            async move { (at_call, Context::current().unwrap().remaining()) }
        });
        assert_eq!(scoped.context().remaining(), inner.remaining());
        let (at_call, at_poll) = scoped.await;
        assert_eq!((at_call, at_poll), (inner.remaining(), inner.remaining()));
        assert!(Context::current().is_none());
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
