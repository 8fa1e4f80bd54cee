//! Reporting progress from inside a handler: pulses at each unit of work.

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use pin_project_lite::pin_project;

use crate::monitor::Shared;
use crate::pulse::RequestId;
use crate::registry::Key;

thread_local! {
    /// The handle of the request whose code runs on this thread, set while
    /// an [`InProgress`] future is polled (or its inner service called).
    static CURRENT: RefCell<Option<Progress>> = const { RefCell::new(None) };
}

/// Runs `f` with `slot` swapped into [`CURRENT`], and swaps it back after,
/// even if `f` panics: no reference counting per poll.
fn with_current<R>(slot: &mut Option<Progress>, f: impl FnOnce() -> R) -> R {
    struct Restore<'a>(&'a mut Option<Progress>);
    impl Drop for Restore<'_> {
        fn drop(&mut self) {
            let _ = CURRENT.try_with(|current| std::mem::swap(&mut *current.borrow_mut(), self.0));
        }
    }
    let swapped = CURRENT.try_with(|current| std::mem::swap(&mut *current.borrow_mut(), slot));
    if swapped.is_err() {
        return f(); // thread teardown: nothing to scope into
    }
    let _restore = Restore(slot);
    f()
}

/// A handle through which a handler reports that its request is making
/// progress, for work that produces no body frames while it runs (a long
/// computation, a batch processed item by item).
///
/// Each [`report`](Progress::report) resets the request's idle time, so the
/// stall watchdog cuts only work that really stopped, and sends
/// [`Pulse::Progress`](crate::Pulse::Progress) to subscribers.
///
/// While the stall watchdog is on, [`Heartbeat`](crate::Heartbeat) runs the
/// inner service with the request's handle in a task-local scope:
/// [`Progress::current`] returns it there. The handle is cheap to clone and
/// can be moved into tasks the handler spawns (a stream's producer, say).
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use atscale_heartbeat::{Monitor, Progress};
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let monitor = Monitor::builder().stall(Duration::from_secs(1)).build();
/// let svc = ServiceBuilder::new()
///     .layer(monitor.layer())
///     .service(service_fn(|_req: http::Request<()>| async {
///         let progress = Progress::current().expect("set by the heartbeat layer");
///         for _item in 0..5 {
///             tokio::time::sleep(Duration::from_millis(800)).await; // one unit of work
///             progress.report();
///         }
///         Ok::<_, std::convert::Infallible>(String::from("5 items in 4 s"))
///     }));
/// // 4 s in all, but never 1 s without progress: not cut.
/// assert_eq!(svc.oneshot(http::Request::new(())).await.unwrap(), "5 items in 4 s");
/// # }
/// ```
#[derive(Clone)]
pub struct Progress {
    shared: Arc<Shared>,
    key: Key,
    id: RequestId,
}

impl Progress {
    pub(crate) const fn new(shared: Arc<Shared>, key: Key, id: RequestId) -> Self {
        Progress { shared, key, id }
    }

    /// The handle of the request this task is serving, if the heartbeat
    /// layer (with the stall watchdog on) is running it.
    pub fn current() -> Option<Progress> {
        CURRENT
            .try_with(|current| current.borrow().clone())
            .ok()
            .flatten()
    }

    /// The request.
    pub const fn id(&self) -> RequestId {
        self.id
    }

    /// Reports one unit of work. Returns `false` once the request has ended:
    /// a late report changes nothing.
    pub fn report(&self) -> bool {
        self.shared
            .progress(self.key, self.id, self.shared.now(), true, false)
    }

    /// Calls `make` (the inner service's `call`) with this handle current,
    /// and scopes the future it returns with it.
    pub(crate) fn scope_with<F: Future>(self, make: impl FnOnce() -> F) -> InProgress<F> {
        let mut progress = Some(self);
        let future = with_current(&mut progress, make);
        InProgress { future, progress }
    }
}

pin_project! {
    /// A future polled with a [`Progress`] handle current.
    pub(crate) struct InProgress<F> {
        #[pin]
        future: F,
        progress: Option<Progress>,
    }
}

impl<F: Future> Future for InProgress<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        let this = self.project();
        let future = this.future;
        with_current(this.progress, || future.poll(cx))
    }
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Progress")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}
