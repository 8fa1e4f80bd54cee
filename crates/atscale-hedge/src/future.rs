//! Future types

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Duration;

use atscale_core::{BoxError, CancelOnDrop, Carrier, Context, HedgeExhausted};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::util::Oneshot;
use tower_service::Service;

use crate::body::{BufferedBody, Reader, Step};
use crate::metrics;
use crate::policy::{Classify, Verdict};
use crate::replay::Replay;
use crate::service::Backends;
use crate::shared::Shared;

pin_project! {
    /// One attempt's call.
    #[project = AttemptProj]
    pub(crate) enum Attempt<S: Service<Req>, Req> {
        // The first attempt around a single service: called on the readiness
        // the caller drove through `poll_ready`.
        Direct { #[pin] fut: S::Future },
        // Any attempt on a clone: `ready()` then `call`.
        Oneshot { #[pin] fut: Oneshot<S, Req> },
        Done,
    }
}

impl<S: Service<Req>, Req> Attempt<S, Req> {
    pub(crate) fn direct(fut: S::Future) -> Self {
        Attempt::Direct { fut }
    }

    pub(crate) fn oneshot(fut: Oneshot<S, Req>) -> Self {
        Attempt::Oneshot { fut }
    }

    fn is_done(&self) -> bool {
        matches!(self, Attempt::Done)
    }
}

impl<S: Service<Req>, Req> Future for Attempt<S, Req> {
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        match self.project() {
            AttemptProj::Direct { fut } => fut.poll(cx),
            AttemptProj::Oneshot { fut } => fut.poll(cx),
            AttemptProj::Done => Poll::Pending,
        }
    }
}

/// A hedge in flight. Boxed: hedges are the rare case, and boxing keeps the
/// common future small.
struct Backup<S: Service<Req>, Req> {
    fut: Pin<Box<Oneshot<S, Req>>>,
    /// When it was sent, in the latency clock's nanoseconds.
    started: u64,
    guard: Option<CancelOnDrop>,
    index: u8,
}

/// What a request that may be hedged carries besides its first attempt.
pub(crate) struct Armed<S: Service<Req>, Req> {
    /// The copy hedges are replayed from; taken by the last one.
    template: Option<Req>,
    backends: Backends<S>,
    first: usize,
    /// The request's position, which the budget charges hedges to.
    position: u64,
    delay: Duration,
    /// When the next hedge is due; set when first needed (a fixed delay reads
    /// no clock for a request answered on its first poll).
    next_at: Option<Instant>,
    launched: u8,
    max: u8,
    fire_now: bool,
    /// No more hedges: the deadline passed, the request would not replay, or
    /// the budget said no while nothing was in flight.
    stopped: bool,
    parent: Option<Context>,
    backups: Vec<Backup<S, Req>>,
}

impl<S: Service<Req>, Req> Armed<S, Req> {
    pub(crate) fn new(
        template: Req,
        backends: Backends<S>,
        first: usize,
        position: u64,
        delay: Duration,
        max: u8,
        parent: Option<Context>,
    ) -> Self {
        Armed {
            template: Some(template),
            backends,
            first,
            position,
            delay,
            next_at: None,
            launched: 1,
            max,
            fire_now: false,
            stopped: false,
            parent,
            backups: Vec::new(),
        }
    }

    fn can_launch(&self) -> bool {
        !self.stopped && self.launched < self.max && self.template.is_some()
    }
}

/// The failures seen so far, in case no attempt succeeds.
struct Failures<Res> {
    errors: Vec<(u8, BoxError)>,
    /// The last response judged [`Verdict::NonFatal`] (a 503, say).
    fallback: Option<Res>,
    count: u8,
}

pin_project! {
    /// Response future of [`Hedge`](crate::Hedge).
    #[project = ResponseFutureProj]
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<S: Service<Req>, Req, C> {
        #[pin]
        primary: Attempt<S, Req>,
        primary_guard: Option<CancelOnDrop>,
        // When the first attempt was sent (the latency clock's nanoseconds):
        // read only for an adaptive delay.
        started: Option<u64>,
        #[pin]
        timer: Option<Sleep>,
        armed: Option<Armed<S, Req>>,
        shared: Option<Arc<Shared>>,
        classify: C,
        failures: Failures<S::Response>,
    }
}

impl<S: Service<Req>, Req, C> std::fmt::Debug for ResponseFuture<S, Req, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("primary_done", &self.primary.is_done())
            .field(
                "hedges_in_flight",
                &self.armed.as_ref().map_or(0, |a| a.backups.len()),
            )
            .finish_non_exhaustive()
    }
}

impl<S: Service<Req>, Req, C> ResponseFuture<S, Req, C> {
    pub(crate) fn new(
        primary: Attempt<S, Req>,
        primary_guard: Option<CancelOnDrop>,
        started: Option<u64>,
        armed: Option<Armed<S, Req>>,
        shared: Option<Arc<Shared>>,
        classify: C,
    ) -> Self {
        ResponseFuture {
            primary,
            primary_guard,
            started,
            timer: None,
            armed,
            shared,
            classify,
            failures: Failures {
                errors: Vec::new(),
                fallback: None,
                count: 0,
            },
        }
    }
}

macro_rules! event {
    ($($arg:tt)*) => {
        #[cfg(feature = "tracing")]
        tracing::debug!(target: "atscale_hedge", $($arg)*);
    };
}

impl<S, Req, C> Future for ResponseFuture<S, Req, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    Req: Replay + Carrier,
    C: Classify<S::Response, S::Error>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            // 1. Attempts that finished.
            if let Poll::Ready(out) = this.primary.as_mut().poll(cx) {
                this.primary.set(Attempt::Done);
                let guard = this.primary_guard.take();
                let started = *this.started;
                if let Some(done) = judge(&mut this, 0, started, guard, out) {
                    return Poll::Ready(done);
                }
            }
            let mut i = 0;
            while let Some(backup) = this.armed.as_mut().and_then(|a| a.backups.get_mut(i)) {
                match backup.fut.as_mut().poll(cx) {
                    Poll::Pending => i += 1,
                    Poll::Ready(out) => {
                        let armed = this.armed.as_mut().expect("backups imply armed");
                        let Backup {
                            started,
                            guard,
                            index,
                            ..
                        } = armed.backups.swap_remove(i);
                        if let Some(done) = judge(&mut this, index, Some(started), guard, out) {
                            return Poll::Ready(done);
                        }
                    }
                }
            }

            // 2. Nothing in flight and nothing more to send: every attempt failed.
            let running = !this.primary.is_done()
                || this.armed.as_ref().is_some_and(|a| !a.backups.is_empty());
            let can_launch = this.armed.as_ref().is_some_and(Armed::can_launch);
            if !running && !can_launch {
                return Poll::Ready(exhausted(this.failures));
            }

            // 3. Send the next hedge if it is due.
            let Some(armed) = this.armed.as_mut() else {
                return Poll::Pending; // unhedged: only the first attempt
            };
            if !can_launch {
                return Poll::Pending;
            }
            let now = Instant::now();
            let next_at = *armed.next_at.get_or_insert(now + armed.delay);
            if armed.fire_now || !running || now >= next_at {
                let shared = this.shared.as_deref().expect("armed implies shared");
                launch(armed, shared, now, running);
                continue;
            }

            // 4. Otherwise wait for the timer.
            match this.timer.as_mut().as_pin_mut() {
                Some(timer) => {
                    if timer.deadline() != next_at {
                        timer.reset(next_at);
                    }
                }
                None => this.timer.set(Some(tokio::time::sleep_until(next_at))),
            }
            let timer = this.timer.as_mut().as_pin_mut().expect("just set");
            ready!(timer.poll(cx));
        }
    }
}

/// Sends one hedge, unless the deadline, the budget or the request says no.
///
/// When the budget says no while attempts are still in flight, the request
/// asks again later (see `Shared::ask_again`).
fn launch<S, Req>(armed: &mut Armed<S, Req>, shared: &Shared, now: Instant, running: bool)
where
    S: Service<Req> + Clone,
    Req: Replay + Carrier,
{
    let early = std::mem::take(&mut armed.fire_now);
    let index = armed.launched;
    if let Some(parent) = &armed.parent
        && (parent.is_expired() || parent.is_cancelled())
    {
        event!(
            attempt = index,
            "no hedge: the request's deadline passed or it was cancelled"
        );
        armed.stopped = true;
        return;
    }
    // A request whose attempts failed needs this hedge to succeed at all.
    let needed = early || !running;
    if !shared.try_hedge(armed.position, needed) {
        event!(attempt = index, "no hedge: budget exhausted");
        if running && !armed.delay.is_zero() {
            armed.next_at = Some(now + shared.ask_again(armed.delay));
        } else {
            armed.stopped = true;
        }
        return;
    }
    let last = index + 1 == armed.max;
    let req = if last {
        armed.template.take()
    } else {
        armed.template.as_ref().and_then(Replay::replay)
    };
    let Some(mut req) = req else {
        armed.stopped = true;
        return;
    };
    let guard = armed.parent.as_ref().map(|p| {
        let child = p.child();
        let guard = child.cancel_on_drop();
        req.set_context(child);
        guard
    });
    // The copy's deadline headers say what is left now, not at the first send.
    atscale_deadline::attempt::refresh(&mut req);
    let (svc, replica) = armed.backends.for_attempt(armed.first, usize::from(index));
    event!(
        attempt = index,
        replica,
        delay_us = armed.delay.as_micros() as u64,
        "hedge sent"
    );
    #[cfg(not(feature = "tracing"))]
    let _ = replica;
    armed.backups.push(Backup {
        fut: Box::pin(Oneshot::new(svc, req)),
        started: shared.clock.now_nanos(),
        guard,
        index,
    });
    armed.launched += 1;
    // A request that reached a delay following the budget sends its next
    // hedge now too (if the budget agrees); otherwise one delay later.
    let together = !early && shared.sends_together();
    armed.next_at = Some(if together { now } else { now + armed.delay });
}

type Projection<'a, S, Req, C> = ResponseFutureProj<'a, S, Req, C>;

/// Handles attempt `index`'s outcome; `Some` ends the request.
fn judge<S, Req, C>(
    this: &mut Projection<'_, S, Req, C>,
    index: u8,
    started: Option<u64>,
    guard: Option<CancelOnDrop>,
    out: Result<S::Response, S::Error>,
) -> Option<Result<S::Response, BoxError>>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error>,
{
    let verdict = this.classify.classify(out.as_ref());
    if let Some(throttle) = this.shared.as_deref().and_then(|s| s.throttle.get()) {
        match verdict {
            Verdict::NonFatal => {
                throttle.failure();
            }
            Verdict::Good => throttle.success(),
            Verdict::Fatal => {}
        }
    }
    if verdict == Verdict::NonFatal {
        this.failures.count += 1;
        match out {
            Ok(res) => this.failures.fallback = Some(res),
            Err(e) => this.failures.errors.push((index, e.into())),
        }
        if let Some(armed) = this.armed.as_mut() {
            armed.fire_now = true;
        }
        return None; // `guard` drops: a finished attempt's context is cancelled
    }
    // The winner keeps its context alive (its response body may still stream).
    if let Some(guard) = guard {
        guard.disarm();
    }
    if verdict == Verdict::Good
        && let Some(shared) = this.shared.as_deref()
    {
        if let Some(started) = started.filter(|_| shared.is_adaptive()) {
            let now = shared.clock.now_nanos();
            let since = |t: u64| Duration::from_nanos(now.saturating_sub(t));
            shared.record(since(started), now);
            // The attempts still in flight were at least this slow: recording
            // them keeps a won race from hiding the tail from the window.
            if let Some(primary) = this.started.filter(|_| !this.primary.is_done()) {
                shared.record(since(primary), now);
            }
            if let Some(armed) = this.armed.as_ref() {
                for b in &armed.backups {
                    shared.record(since(b.started), now);
                }
            }
        }
        if index > 0 {
            shared.counters.won.fetch_add(1, Ordering::Relaxed);
            metrics::won();
            event!(attempt = index, "hedge won");
        }
    }
    // Losers are dropped now; their guards cancel their contexts.
    this.primary.set(Attempt::Done);
    this.primary_guard.take();
    // For the budget's stragglers (adaptive delays only: `started` is set).
    if let (Some(shared), Some(armed), Some(_)) =
        (this.shared.as_deref(), this.armed.as_ref(), *this.started)
    {
        shared.finish(armed.position);
    }
    if let Some(armed) = this.armed.as_mut() {
        armed.backups.clear();
        armed.stopped = true;
    }
    Some(out.map_err(Into::into))
}

fn exhausted<Res>(failures: &mut Failures<Res>) -> Result<Res, BoxError> {
    let mut errors = std::mem::take(&mut failures.errors);
    if let Some(res) = failures.fallback.take() {
        return Ok(res);
    }
    if failures.count <= 1
        && let Some((_, e)) = errors.pop()
    {
        return Err(e);
    }
    errors.sort_by_key(|(i, _)| *i);
    Err(Box::new(HedgeExhausted::new(
        errors.into_iter().map(|(_, e)| e).collect(),
    )))
}

pin_project! {
    /// Response future of [`BufferBody`](crate::BufferBody): reads the body,
    /// then calls the inner service.
    #[must_use = "futures do nothing unless polled"]
    pub struct BufferFuture<S: Service<http::Request<BufferedBody<B>>>, B: Body> {
        #[pin]
        state: BufferState<S, B>,
    }
}

pin_project! {
    #[project = BufferProj]
    enum BufferState<S: Service<http::Request<BufferedBody<B>>>, B: Body> {
        Buffering {
            svc: Option<S>,
            parts: Option<http::request::Parts>,
            body: Option<B>,
            reader: Reader,
        },
        Calling { #[pin] fut: S::Future },
    }
}

impl<S, B> BufferFuture<S, B>
where
    S: Service<http::Request<BufferedBody<B>>>,
    B: Body,
{
    pub(crate) fn calling(fut: S::Future) -> Self {
        BufferFuture {
            state: BufferState::Calling { fut },
        }
    }

    pub(crate) fn buffering(
        svc: S,
        parts: http::request::Parts,
        body: B,
        limit: usize,
        declared: Option<u64>,
    ) -> Self {
        BufferFuture {
            state: BufferState::Buffering {
                svc: Some(svc),
                parts: Some(parts),
                body: Some(body),
                reader: Reader {
                    frames: Default::default(),
                    len: 0,
                    limit,
                    declared,
                },
            },
        }
    }
}

impl<S, B> std::fmt::Debug for BufferFuture<S, B>
where
    S: Service<http::Request<BufferedBody<B>>>,
    B: Body,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.state {
            BufferState::Buffering { reader, .. } => f
                .debug_struct("BufferFuture::Buffering")
                .field("read", &reader.len)
                .finish_non_exhaustive(),
            BufferState::Calling { .. } => f.write_str("BufferFuture::Calling"),
        }
    }
}

impl<S, B> Future for BufferFuture<S, B>
where
    S: Service<http::Request<BufferedBody<B>>>,
    B: Body + Unpin,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let call = match state.as_mut().project() {
                BufferProj::Calling { fut } => return fut.poll(cx),
                BufferProj::Buffering {
                    svc,
                    parts,
                    body,
                    reader,
                } => match ready!(reader.step(body, cx)) {
                    Step::More => continue,
                    Step::Done(buffered) => {
                        let parts = parts.take().expect("taken once");
                        let mut svc = svc.take().expect("taken once");
                        svc.call(http::Request::from_parts(parts, buffered))
                    }
                },
            };
            state.set(BufferState::Calling { fut: call });
        }
    }
}
