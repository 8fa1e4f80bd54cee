//! The monitor: shared state behind every heartbeat layer, and the handle to watch it.

use std::fmt;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use atscale_core::Clock;

use futures_core::Stream;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::health::Health;
use crate::layer::HeartbeatLayer;
use crate::metrics;
use crate::pulse::{Outcome, Pulse, RequestId};
use crate::registry::{Key, Registry};

/// The handle to a heartbeat: subscribe to pulses, count and inspect requests
/// in flight, wait for work to start or finish, ask for health.
///
/// Cheap to clone; every clone, every [`HeartbeatLayer`] made from it and
/// every service those layers build share one state.
///
/// # Background task
///
/// With an [`interval`](MonitorBuilder::interval), the first
/// [`subscribe`](Monitor::subscribe) inside a tokio runtime spawns one task
/// that sends [`Pulse::Beat`] at that interval. It runs only while someone
/// subscribes, and stops when the last subscription is dropped or when the
/// last handle to the monitor (this type, the layers and services holding
/// it) is dropped.
///
/// # Metrics
///
/// With the `metrics` feature, after `atscale_core::metrics::enable()`,
/// `atscale.heartbeat.in_flight` is the sum over monitors of their requests
/// in flight. A monitor does not move it per request: it sets its share
/// from its counters when it goes idle (so the gauge is exact whenever no
/// request is in flight), whenever it is read ([`counts`](Monitor::counts),
/// [`in_flight`](Monitor::in_flight), [`health`](Monitor::health), the
/// `wait_*` calls, interval beats), and once a second from a task it spawns
/// once, at its first request inside a tokio runtime after `enable()` (it
/// holds no strong handle and stops with the monitor). Otherwise the gauge
/// is at most a second old.
///
/// # Example
///
/// Deterministic tests: wait for work to begin, then assert, with no timeout.
///
/// ```
/// use atscale_heartbeat::Monitor;
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let monitor = Monitor::new();
/// let gate = std::sync::Arc::new(tokio::sync::Notify::new());
/// let open = gate.clone();
/// let svc = ServiceBuilder::new()
///     .layer(monitor.layer())
///     .service(service_fn(move |_req: http::Request<()>| {
///         let open = open.clone();
///         async move {
///             open.notified().await;
///             Ok::<_, std::convert::Infallible>(String::from("done"))
///         }
///     }));
/// let call = tokio::spawn(svc.oneshot(http::Request::new(())));
///
/// monitor.wait_in_flight(1).await; // the request is inside the handler
/// assert_eq!(monitor.requests()[0].units(), 0);
/// gate.notify_one();
/// assert_eq!(call.await.unwrap().unwrap(), "done");
/// monitor.wait_finished(1).await;
/// assert_eq!(monitor.counts().ok(), 1);
/// # }
/// ```
#[derive(Clone)]
pub struct Monitor {
    pub(crate) shared: Arc<Shared>,
}

/// Builds a [`Monitor`]; every setting has a default.
#[derive(Clone, Debug)]
#[must_use]
pub struct MonitorBuilder {
    config: Config,
}

#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) stall: Option<Duration>,
    pub(crate) interval: Option<Duration>,
    pub(crate) idle_beats: bool,
    pub(crate) capacity: usize,
    pub(crate) unhealthy_after: NonZeroU32,
    pub(crate) clock: Option<Clock>,
}

impl Default for MonitorBuilder {
    fn default() -> Self {
        MonitorBuilder {
            config: Config {
                stall: None,
                interval: None,
                idle_beats: false,
                capacity: 1024,
                unhealthy_after: NonZeroU32::new(3).expect("3 is not zero"),
                clock: None,
            },
        }
    }
}

impl MonitorBuilder {
    /// The stall watchdog: a request whose response does not arrive within
    /// `stall`, or whose streaming body produces no frame for `stall`, is cut
    /// with [`Stalled`](atscale_core::Stalled). Off by default.
    ///
    /// Progress at exactly the limit is in time: the work is polled before
    /// the watchdog, and work that is ready wins. A zero duration turns the
    /// watchdog off, since nothing could ever pass it.
    pub fn stall(mut self, stall: Duration) -> Self {
        self.config.stall = (!stall.is_zero()).then_some(stall);
        self
    }

    /// The interval of [`Pulse::Beat`] while requests are in flight. Off by
    /// default; a zero duration turns it off.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.config.interval = (!interval.is_zero()).then_some(interval);
        self
    }

    /// Whether [`Pulse::Beat`] is also sent while no request is in flight
    /// (off by default), so a watcher can tell "idle" from "dead".
    pub fn idle_beats(mut self, idle_beats: bool) -> Self {
        self.config.idle_beats = idle_beats;
        self
    }

    /// How many pulses a slow subscriber may fall behind before it misses the
    /// oldest ones (default 1024). Pulses are never queued beyond this; see
    /// [`Pulses::missed`]. Clamped to at least 1.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.config.capacity = capacity.max(1);
        self
    }

    /// How many failures in a row (errors or stalls, see
    /// [`Outcome::is_failure`]) make the monitor report "not serving" (default 3).
    pub fn unhealthy_after(mut self, failures: NonZeroU32) -> Self {
        self.config.unhealthy_after = failures;
        self
    }

    /// The clock that times requests (their age, idle time and stalls).
    ///
    /// By default [`Clock::quanta`] (the TSC: a read costs a third of
    /// `Instant::now()`'s), unless the monitor is built while tokio's clock
    /// is paused (`#[tokio::test(start_paused = true)]`, `tokio::time::pause()`),
    /// then [`Clock::tokio`], so that tests drive it with
    /// `tokio::time::advance`. Pass `Clock::tokio()` here for a monitor built
    /// before its test pauses the clock. The stall watchdog's timers are
    /// always tokio's, for the durations this clock measures.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.config.clock = Some(clock);
        self
    }

    /// The monitor.
    pub fn build(self) -> Monitor {
        let (tx, _) = broadcast::channel(self.config.capacity);
        let clock = self.config.clock.clone().unwrap_or_else(default_clock);
        Monitor {
            shared: Arc::new(Shared {
                config: self.config,
                tx,
                subscribers: AtomicUsize::new(0),
                waiters: AtomicUsize::new(0),
                changed: Notify::new(),
                registry: Registry::new(),
                clock,
                ticker_running: AtomicBool::new(false),
                stop: Arc::new(Notify::new()),
                shown: AtomicI64::new(0),
                refresher_running: AtomicBool::new(false),
                refresher_stop: Arc::new(Notify::new()),
            }),
        }
    }
}

pub(crate) struct Shared {
    pub(crate) config: Config,
    tx: broadcast::Sender<Pulse>,
    /// Live [`Pulses`] streams: checked before a pulse is even built.
    subscribers: AtomicUsize,
    /// Tasks inside a `wait_*` call: checked before notifying.
    waiters: AtomicUsize,
    changed: Notify,
    registry: Registry,
    /// Times requests; the registry keeps its readings.
    clock: Clock,
    ticker_running: AtomicBool,
    /// Stops the interval task when the last handle goes.
    stop: Arc<Notify>,
    /// What this monitor has added to the in-flight gauge (the `metrics` feature).
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) shown: AtomicI64,
    /// Whether the task that refreshes the in-flight gauge was spawned.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) refresher_running: AtomicBool,
    /// Stops that task when the last handle goes.
    pub(crate) refresher_stop: Arc<Notify>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.notify_one();
        self.refresher_stop.notify_one();
        metrics::dropped(self);
    }
}

/// [`Clock::tokio`] if tokio's clock is paused here, else [`Clock::quanta`].
///
/// tokio's `Instant::now()` is the system's monotonic clock unless paused,
/// so it falls between two readings of that clock; a paused clock stands
/// where it was paused (or where `advance` left it).
fn default_clock() -> Clock {
    let before = std::time::Instant::now();
    let tokio = Instant::now().into_std();
    let after = std::time::Instant::now();
    if tokio < before || tokio > after {
        Clock::tokio()
    } else {
        Clock::quanta()
    }
}

/// Request counters of a [`Monitor`] since it was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    started: u64,
    ok: u64,
    error: u64,
    cancelled: u64,
    stalled: u64,
    refused: u64,
}

impl Counts {
    /// `finished`: the counts of ok, error, cancelled, stalled and refused.
    pub(crate) const fn new(started: u64, finished: [u64; 5]) -> Self {
        let [ok, error, cancelled, stalled, refused] = finished;
        Counts {
            started,
            ok,
            error,
            cancelled,
            stalled,
            refused,
        }
    }

    /// Requests started.
    pub const fn started(&self) -> u64 {
        self.started
    }

    /// Requests finished, whatever the outcome.
    pub const fn finished(&self) -> u64 {
        self.ok + self.error + self.cancelled + self.stalled + self.refused
    }

    /// Requests in flight: started and not finished.
    pub const fn in_flight(&self) -> u64 {
        self.started - self.finished()
    }

    /// Requests that ended with [`Outcome::Ok`].
    pub const fn ok(&self) -> u64 {
        self.ok
    }

    /// Requests that ended with [`Outcome::Error`].
    pub const fn error(&self) -> u64 {
        self.error
    }

    /// Requests that ended with [`Outcome::Cancelled`].
    pub const fn cancelled(&self) -> u64 {
        self.cancelled
    }

    /// Requests that ended with [`Outcome::Stalled`].
    pub const fn stalled(&self) -> u64 {
        self.stalled
    }

    /// Requests that ended with [`Outcome::Refused`].
    pub const fn refused(&self) -> u64 {
        self.refused
    }

    /// Requests that ended with `outcome`.
    pub const fn of(&self, outcome: Outcome) -> u64 {
        match outcome {
            Outcome::Ok => self.ok,
            Outcome::Error => self.error,
            Outcome::Cancelled => self.cancelled,
            Outcome::Stalled => self.stalled,
            Outcome::Refused => self.refused,
        }
    }
}

/// A request in flight, as seen by [`Monitor::requests`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InFlight {
    id: RequestId,
    elapsed: Duration,
    idle: Duration,
    units: u64,
}

impl InFlight {
    /// The request.
    pub const fn id(&self) -> RequestId {
        self.id
    }

    /// Time since it started.
    pub const fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// Time since its last progress: its start, its response head, its latest
    /// body frame, or the latest unit of work its handler reported.
    pub const fn idle(&self) -> Duration {
        self.idle
    }

    /// Units of progress so far: body frames, and units of work the handler reported.
    pub const fn units(&self) -> u64 {
        self.units
    }
}

impl Shared {
    #[inline]
    pub(crate) fn watched(&self) -> bool {
        self.subscribers.load(Ordering::Relaxed) > 0
    }

    #[inline]
    fn emit(&self, pulse: impl FnOnce() -> Pulse) {
        if self.watched() {
            // Never blocks: a full channel overwrites the oldest pulse, and a
            // subscriber that falls behind learns how many it missed.
            let _ = self.tx.send(pulse());
        }
    }

    #[inline]
    fn changed(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    /// The monitor's clock, in nanoseconds.
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        self.clock.now_nanos()
    }

    /// Whether progress handles may write to a request's entry (they are
    /// given out only with the stall watchdog on).
    #[inline]
    const fn guarded(&self) -> bool {
        self.config.stall.is_some()
    }

    #[inline]
    pub(crate) fn start(self: &Arc<Self>) -> (Key, RequestId, u64) {
        let now = self.now();
        let (key, id) = self.registry.start(now);
        let id = RequestId::new(id);
        metrics::started(self);
        self.emit(|| Pulse::Started { id });
        self.changed();
        (key, id, now)
    }

    /// Records progress of request `id` at `now`; a `unit` of work also
    /// counts and sends a pulse. `owner`: the caller holds the request's
    /// ticket. Returns false if the request has ended.
    pub(crate) fn progress(
        &self,
        key: Key,
        id: RequestId,
        now: u64,
        unit: bool,
        owner: bool,
    ) -> bool {
        let Some(units) = self.registry.progress(key, id.get(), now, unit, owner) else {
            return false;
        };
        if unit {
            self.emit(|| Pulse::Progress { id, units });
        }
        true
    }

    /// The last progress of request `id`, if it is still in flight.
    pub(crate) fn last_progress(&self, key: Key, id: RequestId) -> Option<u64> {
        self.registry.last(key, id.get())
    }

    #[inline]
    pub(crate) fn finish(&self, key: Key, id: RequestId, started: u64, outcome: Outcome) {
        self.registry.finish(key, id.get(), outcome, self.guarded());
        metrics::finished(self, outcome);
        self.emit(|| Pulse::Finished {
            id,
            outcome,
            elapsed: Duration::from_nanos(self.now().saturating_sub(started)),
        });
        self.changed();
    }

    /// The request counters at one instant.
    pub(crate) fn counts(&self) -> Counts {
        self.registry.counts()
    }

    /// Requests in flight, from one read of the counters.
    #[inline]
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn in_flight_now(&self) -> u64 {
        self.registry.in_flight_now()
    }

    fn beat(&self) -> Option<Pulse> {
        let now = self.now();
        let in_flight = self.counts().in_flight() as usize;
        metrics::refresh(self);
        if in_flight == 0 && !self.config.idle_beats {
            return None;
        }
        let mut longest_idle = None;
        self.registry.each(false, |e| {
            let idle = Duration::from_nanos(now.saturating_sub(e.last));
            longest_idle = longest_idle.max(Some(idle));
        });
        Some(Pulse::Beat {
            in_flight,
            longest_idle,
        })
    }
}

impl Default for Monitor {
    fn default() -> Self {
        Monitor::new()
    }
}

impl Monitor {
    /// A monitor with the defaults: no stall watchdog, no interval pulses.
    pub fn new() -> Self {
        MonitorBuilder::default().build()
    }

    /// A builder for the watchdog, interval pulses and health settings.
    pub fn builder() -> MonitorBuilder {
        MonitorBuilder::default()
    }

    /// A layer that reports to this monitor.
    pub fn layer(&self) -> HeartbeatLayer {
        HeartbeatLayer::new(self.clone())
    }

    /// The stall watchdog's limit, if it is on.
    pub fn stall(&self) -> Option<Duration> {
        self.shared.config.stall
    }

    /// Subscribes to the pulses sent from now on.
    ///
    /// Pulses are only built while someone subscribes. A subscriber that
    /// falls more than [`capacity`](MonitorBuilder::capacity) pulses behind
    /// misses the oldest; the request path never waits for it.
    pub fn subscribe(&self) -> Pulses {
        let rx = self.shared.tx.subscribe();
        self.shared.subscribers.fetch_add(1, Ordering::SeqCst);
        let pulses = Pulses {
            inner: BroadcastStream::new(rx),
            missed: 0,
            monitor: Arc::downgrade(&self.shared),
        };
        self.start_ticker();
        pulses
    }

    fn start_ticker(&self) {
        let Some(interval) = self.shared.config.interval else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self
            .shared
            .ticker_running
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return;
        }
        let weak = Arc::downgrade(&self.shared);
        let stop = self.shared.stop.clone();
        runtime.spawn(ticker(weak, stop, interval));
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.counts().in_flight() as usize
    }

    /// The request counters, all as they were at one instant.
    pub fn counts(&self) -> Counts {
        let counts = self.shared.counts();
        metrics::refresh(&self.shared);
        counts
    }

    /// Each request in flight, oldest first, with its time since last progress.
    ///
    /// Every request counted as started and not finished before the call
    /// is listed, unless it finishes during the call.
    pub fn requests(&self) -> Vec<InFlight> {
        let shared = &*self.shared;
        let now = shared.now();
        let mut list = Vec::new();
        shared.registry.each(true, |e| {
            list.push(InFlight {
                id: RequestId::new(e.id),
                elapsed: Duration::from_nanos(now.saturating_sub(e.started)),
                idle: Duration::from_nanos(now.saturating_sub(e.last)),
                units: e.units,
            });
        });
        list.sort_by_key(|r| r.id);
        list
    }

    /// Whether the monitored service is serving: fewer than
    /// [`unhealthy_after`](MonitorBuilder::unhealthy_after) failures in a row,
    /// and no request in flight idle for the stall limit or longer.
    pub fn health(&self) -> Health {
        let shared = &*self.shared;
        let counts = self.counts();
        let mut stuck = 0;
        if let Some(stall) = shared.config.stall {
            let now = shared.now();
            let stall = u64::try_from(stall.as_nanos()).unwrap_or(u64::MAX);
            shared.registry.each(false, |e| {
                if now.saturating_sub(e.last) >= stall {
                    stuck += 1;
                }
            });
        }
        Health::new(
            counts.in_flight() as usize,
            stuck,
            shared.registry.failures_in_a_row(),
            shared.config.unhealthy_after.get(),
        )
    }

    /// Completes once the counters satisfy `condition`, checked now and then
    /// each time a request starts or finishes.
    ///
    /// This is the deterministic-test pattern: wait for a signal from the
    /// work itself instead of sleeping and hoping.
    pub async fn wait_for(&self, mut condition: impl FnMut(&Counts) -> bool) {
        let shared = &*self.shared;
        shared.waiters.fetch_add(1, Ordering::SeqCst);
        let _guard = WaiterGuard(&shared.waiters);
        loop {
            let notified = shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if condition(&shared.counts()) {
                metrics::refresh(shared);
                return;
            }
            notified.await;
        }
    }

    /// Completes once at least `n` requests have started in total.
    pub async fn wait_started(&self, n: u64) {
        self.wait_for(|c| c.started() >= n).await;
    }

    /// Completes once at least `n` requests have finished in total.
    pub async fn wait_finished(&self, n: u64) {
        self.wait_for(|c| c.finished() >= n).await;
    }

    /// Completes once exactly `n` requests are in flight.
    pub async fn wait_in_flight(&self, n: usize) {
        self.wait_for(|c| c.in_flight() == n as u64).await;
    }

    #[cfg(feature = "tonic")]
    pub(crate) fn downgrade(&self) -> Weak<Shared> {
        Arc::downgrade(&self.shared)
    }

    #[cfg(feature = "tonic")]
    pub(crate) fn upgrade(weak: &Weak<Shared>) -> Option<Monitor> {
        weak.upgrade().map(|shared| Monitor { shared })
    }
}

impl fmt::Debug for Monitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Monitor")
            .field("config", &self.shared.config)
            .field("clock", &self.shared.clock)
            .field("counts", &self.counts())
            .field(
                "subscribers",
                &self.shared.subscribers.load(Ordering::Relaxed),
            )
            .finish()
    }
}

struct WaiterGuard<'a>(&'a AtomicUsize);

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn ticker(weak: Weak<Shared>, stop: Arc<Notify>, every: Duration) {
    periodic(weak, stop, Instant::now() + every, every, |shared| {
        if shared.subscribers.load(Ordering::SeqCst) == 0 {
            shared.ticker_running.store(false, Ordering::SeqCst);
            // A subscriber that came in between saw the task running and did
            // not start another: take over for it.
            if shared.subscribers.load(Ordering::SeqCst) == 0
                || shared
                    .ticker_running
                    .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                    .is_err()
            {
                return false;
            }
        }
        if let Some(pulse) = shared.beat() {
            let _ = shared.tx.send(pulse);
        }
        true
    })
    .await;
}

/// A monitor's periodic task: calls `tick` at `first`, then every `every`
/// (late ticks delayed, not bunched), until `stop` is notified, the monitor
/// is gone, or `tick` says to stop. Holds no strong handle between ticks.
pub(crate) async fn periodic(
    weak: Weak<Shared>,
    stop: Arc<Notify>,
    first: Instant,
    every: Duration,
    mut tick: impl FnMut(&Shared) -> bool,
) {
    let mut interval = tokio::time::interval_at(first, every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = stop.notified() => return,
        }
        let Some(shared) = weak.upgrade() else { return };
        if !tick(&shared) {
            return;
        }
    }
}

/// The pulses of a [`Monitor`], as a [`Stream`]; from [`Monitor::subscribe`].
///
/// Ends when the monitor and everything holding it are dropped.
pub struct Pulses {
    inner: BroadcastStream<Pulse>,
    missed: u64,
    /// To count this subscriber out when it goes.
    monitor: Weak<Shared>,
}

impl Pulses {
    /// How many pulses this subscriber missed by falling behind.
    pub const fn missed(&self) -> u64 {
        self.missed
    }
}

impl Stream for Pulses {
    type Item = Pulse;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Pulse>> {
        let this = self.get_mut();
        loop {
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(pulse))) => return Poll::Ready(Some(pulse)),
                Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(n)))) => {
                    this.missed += n;
                    metrics::pulses_dropped(n);
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for Pulses {
    fn drop(&mut self) {
        if let Some(shared) = self.monitor.upgrade() {
            shared.subscribers.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl fmt::Debug for Pulses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pulses")
            .field("missed", &self.missed)
            .finish_non_exhaustive()
    }
}
