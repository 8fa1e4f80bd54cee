//! The steward: heals an unhealthy inner service by rebuilding it.
//!
//! In *Concurrency in Go*'s terms, the steward watches a ward (the inner
//! service) through its heartbeat, and when the ward stops beating, it
//! starts a new one. Here:
//!
//! - every instance the factory builds runs behind a [`Heartbeat`] with the
//!   stall watchdog on, so no request on any instance can hang;
//! - the instance is *unhealthy* when [`failures`](StewardBuilder::failures)
//!   requests in a row failed or stalled on it (judged when each request
//!   ends: for an `http::Response`, when its body ends, a 5xx or a
//!   server-fault `grpc-status` being a failure; a caller giving up, or a
//!   limit refusing the request, counts for nothing — see [`Outcome`]), or
//!   when it has not become ready for the stall limit;
//! - an unhealthy instance is replaced by a fresh one from the factory, at
//!   once the first time, then no sooner than a [`backoff`](StewardBuilder::backoff)
//!   that doubles with each rebuild (up to [`max_backoff`](StewardBuilder::max_backoff))
//!   and resets when a request succeeds;
//! - requests already in flight on the old instance keep running on it and
//!   end as they would (or are cut by the watchdog); new requests go to the
//!   new instance. Every clone of the steward switches at its next
//!   `poll_ready`, and a new or cloned handle holds no instance until then,
//!   so handles kept as templates (an axum router's) never keep a replaced
//!   instance alive.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::time::Duration;
//! use atscale_heartbeat::Steward;
//! use tower::{Service, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // The first instance never answers; the ones after it do.
//! let built = Arc::new(AtomicU64::new(0));
//! let counter = built.clone();
//! let mut steward = Steward::builder(move || {
//!     let generation = counter.fetch_add(1, Ordering::SeqCst);
//!     service_fn(move |_req: http::Request<()>| async move {
//!         if generation == 0 {
//!             std::future::pending::<()>().await;
//!         }
//!         Ok::<_, std::convert::Infallible>(String::from("hello"))
//!     })
//! })
//! .stall(Duration::from_secs(1))
//! .failures(1.try_into().unwrap())
//! .build();
//!
//! let err = steward.ready().await.unwrap().call(http::Request::new(())).await.unwrap_err();
//! assert!(err.is::<atscale_core::Stalled>());
//! let ok = steward.ready().await.unwrap().call(http::Request::new(())).await.unwrap();
//! assert_eq!(ok, "hello");
//! assert_eq!(steward.restarts(), 1);
//! # }
//! ```

use std::fmt;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Duration;

use atscale_core::{BoxError, Carrier};
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::future::ResponseFuture;
use crate::monitor::{Monitor, MonitorBuilder};
use crate::pulse::Outcome;
use crate::service::Heartbeat;
use crate::track::{Finished, Track};

/// Builds a [`Steward`]; from [`Steward::builder`].
#[must_use]
pub struct StewardBuilder<F> {
    factory: F,
    stall: Duration,
    failures: NonZeroU32,
    backoff: Duration,
    max_backoff: Duration,
    monitor: MonitorBuilder,
}

impl<F> StewardBuilder<F> {
    /// The stall limit (default 30 s): a request whose response or body frame
    /// takes longer is cut with [`Stalled`](atscale_core::Stalled) and counts
    /// as a failure; an instance not ready for this long is rebuilt.
    ///
    /// A zero duration is replaced by the default: the steward needs a watchdog.
    pub fn stall(mut self, stall: Duration) -> Self {
        if !stall.is_zero() {
            self.stall = stall;
        }
        self
    }

    /// How many failed or stalled requests in a row make an instance
    /// unhealthy (default 3).
    pub fn failures(mut self, failures: NonZeroU32) -> Self {
        self.failures = failures;
        self
    }

    /// The wait after a rebuild before the next one may happen (default
    /// 100 ms); it doubles with each rebuild and resets when a request succeeds.
    pub fn backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// The longest the backoff grows to (default 10 s; never below [`backoff`](Self::backoff)).
    pub fn max_backoff(mut self, max_backoff: Duration) -> Self {
        self.max_backoff = max_backoff;
        self
    }

    /// The monitor's other settings (interval pulses, health); its stall
    /// limit is set from [`stall`](Self::stall).
    pub fn monitor(mut self, monitor: MonitorBuilder) -> Self {
        self.monitor = monitor;
        self
    }

    /// The steward, with a first instance built by the factory now.
    pub fn build<S>(self) -> Steward<S, F>
    where
        F: Fn() -> S + Send + Sync + 'static,
        S: Send + 'static,
    {
        let monitor = self.monitor.stall(self.stall).build();
        let service = (self.factory)();
        let shared = Arc::new(Shared {
            monitor,
            failures: self.failures.get(),
            min_backoff: self.backoff,
            max_backoff: self.max_backoff.max(self.backoff),
            generation: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            wanted: AtomicBool::new(false),
            state: Mutex::new(State {
                service,
                generation: 0,
                failures_in_a_row: 0,
                backoff: self.backoff,
                not_before: Instant::now(),
            }),
            factory: self.factory,
            stall: self.stall,
        });
        Steward {
            service: None,
            generation: 0,
            timer: None,
            armed: false,
            shared,
        }
    }
}

impl<F> fmt::Debug for StewardBuilder<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StewardBuilder")
            .field("stall", &self.stall)
            .field("failures", &self.failures)
            .field("backoff", &self.backoff)
            .field("max_backoff", &self.max_backoff)
            .field("monitor", &self.monitor)
            .finish_non_exhaustive()
    }
}

/// A service rebuilt by its factory when it stops beating; see the [module docs](self).
///
/// # Backpressure
///
/// `poll_ready` delegates to the current instance. When it has not become
/// ready for the stall limit, the instance is rebuilt (after the backoff, if
/// one is running) and the new one is polled instead: the caller waits for
/// readiness, but never on a dead instance for ever.
///
/// # Errors
///
/// The instance's errors, boxed, and [`Stalled`](atscale_core::Stalled) for
/// requests the watchdog cut, as with [`Heartbeat`].
///
/// # Panics
///
/// `call` panics if `poll_ready` has not returned `Ready(Ok(()))` on this
/// handle before, as the `Service` contract requires.
pub struct Steward<S, F> {
    shared: Arc<Shared<S, F>>,
    /// The instance this handle uses, taken from the shared slot at
    /// `poll_ready`; a new or cloned handle holds none, so idle handles never
    /// keep a replaced instance alive.
    service: Option<Heartbeat<S>>,
    generation: u64,
    /// The readiness watchdog: boxed once per steward clone, then reset.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

struct Shared<S, F> {
    factory: F,
    monitor: Monitor,
    stall: Duration,
    failures: u32,
    min_backoff: Duration,
    max_backoff: Duration,
    /// Mirrors `state.generation`, so clones notice a rebuild without locking.
    generation: AtomicU64,
    restarts: AtomicU64,
    /// A rebuild is due but was held back by the backoff.
    wanted: AtomicBool,
    state: Mutex<State<S>>,
}

struct State<S> {
    service: S,
    generation: u64,
    failures_in_a_row: u32,
    backoff: Duration,
    not_before: Instant,
}

/// What a report of trouble led to.
enum Verdict {
    /// A new instance is in place (or the reporter's instance was already replaced).
    Replaced,
    /// Still the same instance: the backoff holds the rebuild back until this instant.
    HeldUntil(Instant),
}

impl<S, F> Shared<S, F>
where
    F: Fn() -> S + Send + Sync + 'static,
    S: Clone + Send + 'static,
{
    /// Instance `generation`, behind a heartbeat that reports to the steward.
    fn watch(this: &Arc<Self>, service: S, generation: u64) -> Heartbeat<S> {
        let listener = Listener {
            shared: Arc::downgrade(this),
            generation,
        };
        Heartbeat::with_hook(service, this.monitor.clone(), Arc::new(listener))
    }

    fn state(&self) -> MutexGuard<'_, State<S>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn current(&self) -> (u64, S) {
        let state = self.state();
        (state.generation, state.service.clone())
    }

    /// Rebuilds now if the backoff allows it.
    fn rebuild(&self, state: &mut State<S>) -> Verdict {
        let now = Instant::now();
        if now < state.not_before {
            self.wanted.store(true, Ordering::SeqCst);
            return Verdict::HeldUntil(state.not_before);
        }
        state.service = (self.factory)();
        state.generation += 1;
        state.failures_in_a_row = 0;
        state.not_before = now + state.backoff;
        state.backoff = state.backoff.saturating_mul(2).min(self.max_backoff);
        self.wanted.store(false, Ordering::SeqCst);
        self.restarts.fetch_add(1, Ordering::SeqCst);
        self.generation.store(state.generation, Ordering::SeqCst);
        Verdict::Replaced
    }

    /// A request on instance `generation` ended, well or not.
    fn report(&self, generation: u64, ok: bool) {
        let mut state = self.state();
        if state.generation != generation {
            return; // news about an instance already replaced
        }
        if ok {
            state.failures_in_a_row = 0;
            state.backoff = self.min_backoff;
        } else {
            state.failures_in_a_row += 1;
            if state.failures_in_a_row >= self.failures {
                self.rebuild(&mut state);
            }
        }
    }

    /// Instance `generation` has not become ready for the stall limit.
    fn stuck(&self, generation: u64) -> Verdict {
        let mut state = self.state();
        if state.generation != generation {
            return Verdict::Replaced;
        }
        self.rebuild(&mut state)
    }

    /// A rebuild held back by the backoff, now allowed.
    fn due(&self) {
        if self.wanted.load(Ordering::SeqCst) {
            let mut state = self.state();
            if self.wanted.load(Ordering::SeqCst) && Instant::now() >= state.not_before {
                self.rebuild(&mut state);
            }
        }
    }
}

impl<F> Steward<(), F> {
    /// A builder for a steward over the services `factory` builds.
    pub fn builder(factory: F) -> StewardBuilder<F> {
        StewardBuilder {
            factory,
            stall: Duration::from_secs(30),
            failures: NonZeroU32::new(3).expect("3 is not zero"),
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            monitor: MonitorBuilder::default(),
        }
    }
}

impl<S, F> Steward<S, F> {
    /// How many times the instance was rebuilt.
    pub fn restarts(&self) -> u64 {
        self.shared.restarts.load(Ordering::SeqCst)
    }

    /// The monitor every instance reports to.
    pub fn monitor(&self) -> &Monitor {
        &self.shared.monitor
    }

    /// The instance this handle holds: the one it last polled ready, if any.
    pub fn get_ref(&self) -> Option<&S> {
        self.service.as_ref().map(Heartbeat::get_ref)
    }
}

impl<S, F> Steward<S, F>
where
    F: Fn() -> S + Send + Sync + 'static,
    S: Clone + Send + 'static,
{
    /// Takes the shared current instance if this handle holds none or an
    /// older one.
    fn refresh(&mut self) -> &mut Heartbeat<S> {
        self.shared.due();
        let stale = self.service.is_none()
            || self.shared.generation.load(Ordering::SeqCst) != self.generation;
        if stale {
            let (generation, service) = self.shared.current();
            self.generation = generation;
            self.armed = false;
            self.service = Some(Shared::watch(&self.shared, service, generation));
        }
        self.service.as_mut().expect("just refreshed")
    }
}

/// Tells the steward how each request on one instance ended (response and
/// body alike), through the request's ticket.
struct Listener<S, F> {
    shared: Weak<Shared<S, F>>,
    generation: u64,
}

impl<S, F> Finished for Listener<S, F>
where
    F: Fn() -> S + Send + Sync + 'static,
    S: Clone + Send + 'static,
{
    fn finished(&self, outcome: Outcome) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        match outcome {
            Outcome::Ok => shared.report(self.generation, true),
            Outcome::Error | Outcome::Stalled => shared.report(self.generation, false),
            // a caller giving up, or a limit refusing, says nothing about
            // the instance
            Outcome::Cancelled | Outcome::Refused => {}
        }
    }
}

impl<S, F, Req> Service<Req> for Steward<S, F>
where
    F: Fn() -> S + Send + Sync + 'static,
    S: Service<Req> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Response: Track,
    Req: Carrier,
{
    type Response = <S::Response as Track>::Tracked;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            match self.refresh().poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    self.armed = false;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Err(err)) => {
                    let generation = self.generation;
                    self.shared.report(generation, false);
                    if self.shared.generation.load(Ordering::SeqCst) != generation {
                        continue; // replaced: try the new instance
                    }
                    return Poll::Ready(Err(err));
                }
                Poll::Pending => {}
            }
            let stall = self.shared.stall;
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
            if !self.armed {
                timer.as_mut().reset(Instant::now() + stall);
                self.armed = true;
            }
            ready!(timer.as_mut().poll(cx));
            match self.shared.stuck(self.generation) {
                Verdict::Replaced => continue,
                Verdict::HeldUntil(until) => timer.as_mut().reset(until),
            }
            ready!(timer.as_mut().poll(cx));
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.armed = false;
        self.service
            .as_mut()
            .expect("Steward::call before poll_ready returned Ready")
            .call(req)
    }
}

impl<S, F> Clone for Steward<S, F> {
    fn clone(&self) -> Self {
        Steward {
            shared: self.shared.clone(),
            service: None,
            generation: self.generation,
            timer: None,
            armed: false,
        }
    }
}

impl<S, F> fmt::Debug for Steward<S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Steward")
            .field("generation", &self.generation)
            .field("restarts", &self.restarts())
            .field("monitor", &self.shared.monitor)
            .finish_non_exhaustive()
    }
}
