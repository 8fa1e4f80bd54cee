//! Reporting progress from inside a handler: pulses at each unit of work.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use tokio::task::futures::TaskLocalFuture;
use tokio::time::Instant;

use crate::monitor::Shared;
use crate::pulse::RequestId;

tokio::task_local! {
    static CURRENT: Progress;
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
    key: usize,
    id: RequestId,
}

impl Progress {
    pub(crate) const fn new(shared: Arc<Shared>, key: usize, id: RequestId) -> Self {
        Progress { shared, key, id }
    }

    /// The handle of the request this task is serving, if the heartbeat
    /// layer (with the stall watchdog on) is running it.
    pub fn current() -> Option<Progress> {
        CURRENT.try_with(Progress::clone).ok()
    }

    /// The request.
    pub const fn id(&self) -> RequestId {
        self.id
    }

    /// Reports one unit of work. Returns `false` once the request has ended:
    /// a late report changes nothing.
    pub fn report(&self) -> bool {
        self.shared
            .progress(self.key, self.id, Instant::now(), true)
    }

    pub(crate) fn scope<F: Future>(self, future: F) -> InProgress<F> {
        CURRENT.scope(self, future)
    }

    pub(crate) fn sync_scope<R>(self, f: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(self, f)
    }
}

/// A future running with a [`Progress`] handle in scope.
pub(crate) type InProgress<F> = TaskLocalFuture<Progress, F>;

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Progress")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}
