//! Following a request past its response: tickets, and response types that end later.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use atscale_core::Context;
use tokio::time::Instant;

use crate::body::TrackedBody;
use crate::monitor::Shared;
use crate::progress::Progress;
use crate::pulse::{Outcome, RequestId};
use crate::registry::Key;

/// One request's place in a [`Monitor`](crate::Monitor): reports progress,
/// and finishes the request exactly once.
///
/// Dropping a ticket that was not [finished](Ticket::finish) finishes the
/// request as [`Outcome::Cancelled`] (the caller gave up) and cancels the
/// request's [`Context`] if the layer attached one.
pub struct Ticket {
    shared: Arc<Shared>,
    hook: Option<Hook>,
    key: Key,
    id: RequestId,
    started: u64,
    cx: Option<Context>,
    done: bool,
}

impl Ticket {
    #[inline]
    pub(crate) fn new(shared: Arc<Shared>, cx: Option<Context>, hook: Option<Hook>) -> Self {
        let (key, id, started) = shared.start();
        Ticket {
            shared,
            hook,
            key,
            id,
            started,
            cx,
            done: false,
        }
    }

    /// The request.
    pub const fn id(&self) -> RequestId {
        self.id
    }

    /// A handle for the handler to report progress of this request.
    pub(crate) fn progress_handle(&self) -> Progress {
        Progress::new(self.shared.clone(), self.key, self.id)
    }

    /// What the watchdog should do when its timer fires.
    pub(crate) fn check(&self) -> Watchdog {
        let Some(stall) = self.stall().and_then(|s| u64::try_from(s.as_nanos()).ok()) else {
            return Watchdog::Rearm(None);
        };
        let now = self.shared.now();
        let last = self
            .shared
            .last_progress(self.key, self.id)
            .unwrap_or(self.started);
        let idle = now.saturating_sub(last);
        if idle < stall {
            Watchdog::Rearm(Some(Duration::from_nanos(stall - idle)))
        } else {
            Watchdog::Cut(Duration::from_nanos(idle))
        }
    }

    /// The stall watchdog's limit, if it is on: a streaming response should
    /// be cut (and finished as [`Outcome::Stalled`]) when it shows no
    /// progress for this long.
    pub fn stall(&self) -> Option<Duration> {
        self.shared.config.stall
    }

    /// The context the layer attached to the request (a child of the one it
    /// carried), when the stall watchdog is on.
    pub const fn context(&self) -> Option<&Context> {
        self.cx.as_ref()
    }

    /// Records one unit of progress (a body frame) at `now`: resets the
    /// request's idle time and sends [`Pulse::Progress`](crate::Pulse::Progress).
    pub fn progress(&mut self, now: Instant) {
        // On the monitor's clock: as long ago as `now` is on tokio's.
        let at = self.shared.now().saturating_sub(nanos(now.elapsed()));
        self.shared.progress(self.key, self.id, at, true, true);
    }

    /// One unit of progress (a body frame), now.
    pub(crate) fn frame(&mut self) {
        let now = self.shared.now();
        self.shared.progress(self.key, self.id, now, true, true);
    }

    /// The body's last frame: a unit of progress, and the end of the
    /// request. Unwatched, the progress is not recorded: the entry goes at
    /// once (one registry update and no clock read instead of two and one).
    pub(crate) fn last_frame(mut self, outcome: Outcome) {
        if self.shared.watched() {
            self.frame();
        }
        self.finish(outcome);
    }

    /// Resets the request's idle time without counting a frame (the response head arrived).
    pub(crate) fn touch(&mut self) {
        let now = self.shared.now();
        self.shared.progress(self.key, self.id, now, false, true);
    }

    /// Finishes the request with `outcome`.
    ///
    /// [`Outcome::Stalled`] and [`Outcome::Cancelled`] also cancel the
    /// request's context, so work it spawned with
    /// `atscale_core::spawn_preemptable` stops too.
    #[inline]
    pub fn finish(mut self, outcome: Outcome) {
        self.end(outcome);
    }

    #[inline]
    fn end(&mut self, outcome: Outcome) {
        if self.done {
            return;
        }
        self.done = true;
        if matches!(outcome, Outcome::Stalled | Outcome::Cancelled)
            && let Some(cx) = &self.cx
        {
            cx.cancel();
        }
        self.shared.finish(self.key, self.id, self.started, outcome);
        if let Some(hook) = &self.hook {
            hook.finished(outcome);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.end(Outcome::Cancelled);
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("id", &self.id)
            .field("started", &self.started)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// `d` in nanoseconds, saturating.
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Told how each request ended, after the monitor (the steward listens this way).
pub(crate) trait Finished: Send + Sync {
    fn finished(&self, outcome: Outcome);
}

pub(crate) type Hook = Arc<dyn Finished>;

/// The watchdog's verdict when its timer fires.
pub(crate) enum Watchdog {
    /// There was progress since the timer was set: wait this much longer
    /// (`None`: never, the limit is too large for the clock).
    Rearm(Option<Duration>),
    /// No progress for this long: cut.
    Cut(Duration),
}

/// A response type the heartbeat layer can follow to its end.
///
/// When the inner service answers, the layer hands the request's [`Ticket`]
/// to the response: a unary response finishes it at once, an
/// [`http::Response`] keeps it in its body ([`TrackedBody`]) and finishes it
/// when the body ends, fails, stalls or is dropped.
///
/// Implement it for your own response type, like [`Carrier`](atscale_core::Carrier)
/// for requests:
///
/// ```
/// use atscale_heartbeat::{Outcome, Ticket, Track};
///
/// struct Reply(u64);
///
/// impl Track for Reply {
///     type Tracked = Reply;
///     fn track(self, ticket: Ticket) -> Reply {
///         ticket.finish(Outcome::Ok);
///         self
///     }
/// }
/// ```
pub trait Track: Sized {
    /// The response the layer returns in place of `Self`.
    type Tracked;

    /// Takes over `ticket`; called once, when the inner service answered.
    fn track(self, ticket: Ticket) -> Self::Tracked;
}

impl<B> Track for http::Response<B>
where
    B: http_body::Body,
{
    type Tracked = http::Response<TrackedBody<B>>;

    fn track(self, ticket: Ticket) -> Self::Tracked {
        // Only a stalled body reads it: no header lookup without the watchdog.
        let grpc = ticket.stall().is_some() && atscale_core::grpc::is_grpc(self.headers());
        let mut outcome = crate::verdict::of_status(self.status());
        // A gRPC answer with nothing to follow (trailers-only) has its
        // status in the head; any other has it in trailers the body yields.
        if self.body().is_end_stream()
            && let Some(said) = crate::verdict::of_grpc(self.headers())
        {
            outcome = said;
        }
        self.map(|body| TrackedBody::new(body, ticket, grpc, outcome))
    }
}

macro_rules! unary {
    ($($t:ty),*) => {$(
        /// A unary response: the request ends when it arrives.
        impl Track for $t {
            type Tracked = $t;
            fn track(self, ticket: Ticket) -> $t {
                ticket.finish(Outcome::Ok);
                self
            }
        }
    )*};
}

unary!((), String, Vec<u8>, bytes::Bytes);
