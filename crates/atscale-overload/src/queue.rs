//! The shared admission state: the limit, the requests in flight, and the
//! bounded admission queue (CoDel, adaptive LIFO, criticality, deadlines).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use atscale_core::{Clock, Deadline, Overloaded};
use http::HeaderName;
use tokio::time::Instant;

use crate::codel::{Codel, Head};
use crate::criticality::Criticality;
use crate::limit::{Algorithm, Sample};
use crate::metrics::{self, Reason};

/// The settings the builder validated.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) min: usize,
    pub(crate) max: usize,
    pub(crate) initial: usize,
    pub(crate) capacity: usize,
    pub(crate) deadline_aware: bool,
    /// Below half the limit, one request in `sampling` is timed.
    pub(crate) sampling: u32,
}

/// Every request is timed from half the limit in flight up (unless alone
/// in flight), where the algorithm grows and cuts the limit on every
/// answer; from an eighth of the limit to half, where it only cuts (the
/// limit is not the bottleneck), one in `sampling / SAMPLE_UNDER`; under an
/// eighth one in `sampling`. (A fast service's latency jitters by more than
/// its minimum, which brings Vegas' limit down to a few: a request alone in
/// flight is then still sampled.)
const SAMPLE_UNDER: usize = 8;

/// Whether `in_flight` (the request at hand included) is at least an eighth
/// of `limit`: from there up a request's deadline is checked at admission
/// and one in `sampling / SAMPLE_UNDER` requests is timed.
fn from_an_eighth(in_flight: usize, limit: usize) -> bool {
    in_flight * SAMPLE_UNDER >= limit
}

/// The first requests, all timed: they set the algorithm's minimum latency
/// and the service-time estimate.
const WARM_UP: u32 = 1000;

/// Shared by every clone of the layer and its services.
#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<State>,
    clock: Clock,
    settings: Settings,
    counters: Counters,
    /// The epoch of `Counters::seen`, on tokio's clock (a deadline's).
    origin: Instant,
    /// The header holding a request's criticality. Here rather than in each
    /// service: tonic and hyper clone the service per request.
    pub(crate) header: HeaderName,
}

/// What the admission fast path reads without the lock. `in_flight` is the
/// truth (taken by CAS, under the lock or not); the others mirror the state.
#[derive(Debug)]
struct Counters {
    limit: AtomicUsize,
    in_flight: AtomicUsize,
    queued: AtomicUsize,
    /// SRTT + 2 RTTVAR in nanoseconds; `u64::MAX` until the first sample.
    service_high: AtomicU64,
    /// Admissions since the last timed one below half the limit. Read and
    /// written without a read-modify-write: a lost increment only moves the
    /// next sample by one.
    tick: AtomicU32,
    /// Admissions under `limit / SAMPLE_UNDER` still to time: the warm-up,
    /// or after a drop was missed.
    force: AtomicU32,
    /// The in-flight count the gauge last showed (the `metrics` feature).
    shown: AtomicUsize,
    /// The latest time the layer read from tokio's clock, in nanoseconds
    /// since `Shared::origin`: the fast path's "now" for a deadline, never
    /// later than the real now.
    seen: AtomicU64,
}

impl Counters {
    /// Takes a slot if one is free under the limit; the new in-flight count
    /// and the limit it was taken under.
    ///
    /// `SeqCst`: a waiter publishes `queued` then tries here, a request
    /// released without the lock gives its slot back then reads `queued`
    /// ([`Shared::release_untimed`]): one of them sees the other.
    fn try_acquire(&self) -> Option<(usize, usize)> {
        let limit = self.limit.load(Ordering::Acquire);
        let mut cur = self.in_flight.load(Ordering::SeqCst);
        loop {
            if cur >= limit {
                return None;
            }
            match self.in_flight.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return Some((cur + 1, limit)),
                Err(now) => cur = now,
            }
        }
    }

    /// Gives a slot back; the in-flight count left.
    fn release(&self) -> usize {
        self.in_flight.fetch_sub(1, Ordering::SeqCst) - 1
    }

    /// Whether to time a request admitted as the `in_flight`-th under
    /// `limit`: every one from half the limit up unless alone in flight
    /// (where the limit moves and requests may wait), during the warm-up,
    /// and for the next `sampling` after a drop that was not timed; else one
    /// in `sampling / SAMPLE_UNDER` from an eighth of the limit up, one in
    /// `sampling` under it.
    #[inline]
    fn timed(&self, in_flight: usize, limit: usize, sampling: u32) -> bool {
        let mut every = sampling;
        if in_flight > 1 && from_an_eighth(in_flight, limit) {
            if in_flight * 2 >= limit {
                return true;
            }
            every = (sampling / SAMPLE_UNDER as u32).max(1);
        }
        let force = self.force.load(Ordering::Relaxed);
        if force > 0 {
            self.force.store(force - 1, Ordering::Relaxed);
            return true;
        }
        let tick = self.tick.load(Ordering::Relaxed) + 1;
        if tick >= every {
            self.tick.store(0, Ordering::Relaxed);
            true
        } else {
            self.tick.store(tick, Ordering::Relaxed);
            false
        }
    }

    /// Sets the in-flight gauge (the `metrics` feature): at every timed
    /// release, at every change of the queue, and when the layer goes idle.
    fn show_in_flight(&self, in_flight: usize) {
        if cfg!(feature = "metrics") {
            self.shown.store(in_flight, Ordering::Relaxed);
            metrics::in_flight(in_flight);
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

#[derive(Debug)]
struct State {
    algorithm: Box<dyn Algorithm>,
    /// The algorithm's estimate, clamped to [min, max].
    estimate: f64,
    queues: Queues,
    decided: HashMap<u64, Decision>,
    next_id: u64,
    codel: Codel,
    /// Smoothed service time of successful requests (RFC 6298's SRTT), in
    /// nanoseconds.
    service: Option<f64>,
    /// Its mean deviation (RFC 6298's RTTVAR).
    service_var: f64,
    deadline_aware: bool,
}

#[derive(Debug)]
struct Waiter {
    enqueued: u64,
    deadline: Option<Instant>,
    waker: Option<Waker>,
}

#[derive(Debug)]
enum Decision {
    Granted {
        in_flight: usize,
        limit: usize,
        at: u64,
    },
    Shed {
        retry_after: Duration,
    },
}

/// One queue per criticality (index 0 critical, 2 sheddable), keyed by arrival order.
#[derive(Debug, Default)]
struct Queues {
    by_class: [BTreeMap<u64, Waiter>; 3],
    len: usize,
}

impl Queues {
    fn insert(&mut self, class: usize, id: u64, waiter: Waiter) {
        self.by_class[class].insert(id, waiter);
        self.len += 1;
    }

    fn remove(&mut self, class: usize, id: u64) -> Option<Waiter> {
        let w = self.by_class[class].remove(&id)?;
        self.len -= 1;
        Some(w)
    }

    /// The oldest waiter of all classes.
    fn oldest(&self) -> Option<&Waiter> {
        self.by_class
            .iter()
            .filter_map(|q| q.first_key_value())
            .min_by_key(|(id, _)| **id)
            .map(|(_, w)| w)
    }

    /// Removes the oldest waiter of the lowest non-empty class.
    fn pop_victim(&mut self) -> Option<(u64, Waiter)> {
        let q = self.by_class.iter_mut().rev().find(|q| !q.is_empty())?;
        let victim = q.pop_first()?;
        self.len -= 1;
        Some(victim)
    }

    /// The waiter that would be served last: of the lowest non-empty class,
    /// the oldest (LIFO) or the newest (FIFO).
    fn last(&self, lifo: bool) -> Option<(usize, u64, Option<Instant>)> {
        let (class, q) = self
            .by_class
            .iter()
            .enumerate()
            .rev()
            .find(|(_, q)| !q.is_empty())?;
        let (id, w) = if lifo {
            q.first_key_value()
        } else {
            q.last_key_value()
        }?;
        Some((class, *id, w.deadline))
    }

    /// Removes the next waiter to serve: from the highest non-empty class, its
    /// oldest (FIFO) or newest (LIFO).
    fn pop_next(&mut self, lifo: bool) -> Option<(u64, Waiter)> {
        let q = self.by_class.iter_mut().find(|q| !q.is_empty())?;
        let next = if lifo { q.pop_last() } else { q.pop_first() }?;
        self.len -= 1;
        Some(next)
    }

    /// How many would be served before a new arrival of class `class`.
    fn ahead(&self, class: usize, lifo: bool) -> usize {
        let end = if lifo { class } else { class + 1 };
        self.by_class[..end].iter().map(BTreeMap::len).sum()
    }
}

/// The result of [`Shared::arrive`].
#[derive(Debug)]
pub(crate) enum Arrival {
    Admitted(Permit),
    Queued(Ticket),
    Refused(Overloaded),
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn overloaded(retry_after: Duration) -> Overloaded {
    Overloaded::with_retry_after(retry_after)
}

impl Shared {
    pub(crate) fn new(
        algorithm: Box<dyn Algorithm>,
        settings: Settings,
        codel: crate::CoDel,
        clock: Clock,
        header: HeaderName,
    ) -> Self {
        let initial = settings.initial;
        metrics::limit(initial);
        Shared {
            state: Mutex::new(State {
                algorithm,
                estimate: initial as f64,
                queues: Queues::default(),
                decided: HashMap::new(),
                next_id: 0,
                codel: Codel::new(codel),
                service: None,
                service_var: 0.0,
                deadline_aware: settings.deadline_aware,
            }),
            clock,
            settings,
            counters: Counters {
                limit: AtomicUsize::new(initial),
                in_flight: AtomicUsize::new(0),
                queued: AtomicUsize::new(0),
                service_high: AtomicU64::new(u64::MAX),
                tick: AtomicU32::new(0),
                force: AtomicU32::new(WARM_UP),
                shown: AtomicUsize::new(0),
                seen: AtomicU64::new(0),
            },
            origin: Instant::now(),
            header,
        }
    }

    pub(crate) fn limit(&self) -> usize {
        self.counters.limit.load(Ordering::Relaxed)
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.counters.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn queued(&self) -> usize {
        self.counters.queued.load(Ordering::Relaxed)
    }

    pub(crate) fn service_time(&self) -> Option<Duration> {
        lock(&self.state)
            .service
            .map(|ns| Duration::from_nanos(ns as u64))
    }

    pub(crate) fn standing(&self) -> bool {
        lock(&self.state).codel.standing()
    }

    fn publish(&self, st: &State) {
        self.counters.queued.store(st.queues.len, Ordering::SeqCst);
        metrics::queued(st.queues.len);
        self.counters.show_in_flight(self.counters.in_flight());
    }

    /// The fast path, without the lock: a permit when nobody waits, a slot
    /// is free and the request's deadline (read only when it can matter,
    /// through `deadline`) is not in doubt; `None` when the request must take
    /// the slow path ([`arrive`](Self::arrive)), which refuses or queues it.
    ///
    /// From an eighth of the limit in flight up, the deadline is checked
    /// against the service-time estimate on the last time the layer read (at
    /// a timed admission or on the slow path), not on a clock read of its
    /// own: that time is never later than now, so the check never refuses a
    /// request it should admit, and there (where every request, or one in
    /// eight, is timed) it is a few requests old; at low load it may be older
    /// and admit a request that will miss its deadline (the deadline layer
    /// cuts it). Under an eighth, a free slot is taken unchecked: nothing is
    /// near queueing. With nothing else in flight the estimate may be stale:
    /// the request is admitted, and teaches it.
    ///
    /// An untimed request costs a few loads, a CAS and the sampling counter:
    /// no clock read, and its deadline looked up only from an eighth of the
    /// limit up.
    #[inline(always)]
    pub(crate) fn try_admit(
        self: &Arc<Self>,
        deadline: impl Fn() -> Option<Deadline>,
    ) -> Option<Permit> {
        let c = &self.counters;
        if c.queued.load(Ordering::Acquire) != 0 {
            return None;
        }
        let mut read = None;
        if self.settings.deadline_aware {
            let high = c.service_high.load(Ordering::Relaxed);
            let others = c.in_flight();
            let busy = from_an_eighth(others + 1, c.limit.load(Ordering::Relaxed));
            if high != u64::MAX && others > 0 && busy {
                let d = deadline();
                if d.is_some_and(|d| self.left_as_last_seen(d) < high) {
                    return None; // refused by `arrive`
                }
                read = Some(d);
            }
        }
        let (in_flight, limit) = c.try_acquire()?;
        if c.timed(in_flight, limit, self.settings.sampling) {
            let deadline = read.unwrap_or_else(&deadline);
            Some(self.timed_permit(in_flight, limit, deadline))
        } else {
            Some(Permit::Untimed(self.clone()))
        }
    }

    /// A permit for a timed request, out of line: the clock read and the
    /// box stay out of the caller's code.
    #[inline(never)]
    fn timed_permit(
        self: &Arc<Self>,
        in_flight: usize,
        limit: usize,
        deadline: Option<Deadline>,
    ) -> Permit {
        let start = self.clock.now_nanos();
        self.see(Instant::now());
        Permit::new(self.clone(), start, in_flight, limit, deadline)
    }

    /// `at` (tokio's clock) in nanoseconds since the layer's `origin`.
    fn since_origin(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX)
    }

    /// Records `now` (tokio's clock) as the latest time seen.
    fn see(&self, now: Instant) {
        let at = self.since_origin(now);
        self.counters.seen.fetch_max(at, Ordering::Relaxed);
    }

    /// What is left of deadline `d` at the latest time seen: at least what
    /// is left of it now.
    fn left_as_last_seen(&self, d: Deadline) -> u64 {
        let seen = self.counters.seen.load(Ordering::Relaxed);
        self.since_origin(d.instant()).saturating_sub(seen)
    }

    /// A request arrives: admitted now, queued, or refused.
    pub(crate) fn arrive(
        self: &Arc<Self>,
        criticality: Criticality,
        deadline: Option<Deadline>,
    ) -> Arrival {
        let now = self.clock.now_nanos();
        let mut wakers = Vec::new();
        let mut st = lock(&self.state);
        // Remaining deadline, read only when it can matter.
        let remaining = match (self.settings.deadline_aware, deadline, st.service) {
            (true, Some(d), Some(_)) => {
                let now = Instant::now();
                self.see(now);
                Some(d.remaining_at(now))
            }
            _ => None,
        };
        if st.queues.len == 0 {
            let c = &self.counters;
            if let (Some(left), Some(service)) = (remaining, st.service_high()) {
                // With nothing in flight the estimate is stale: admit, and learn.
                if c.in_flight() > 0 && nanos(left) < service {
                    // Even unqueued it would not finish in time.
                    metrics::shed(Reason::Deadline, criticality);
                    return Arrival::Refused(overloaded(Duration::from_nanos(service as u64)));
                }
            }
            if let Some((in_flight, limit)) = c.try_acquire() {
                drop(st);
                return Arrival::Admitted(Permit::new(
                    self.clone(),
                    now,
                    in_flight,
                    limit,
                    deadline,
                ));
            }
        }
        let arrival = self.enqueue(&mut st, now, criticality, deadline, remaining, &mut wakers);
        self.publish(&st);
        drop(st);
        wakers.into_iter().for_each(Waker::wake);
        arrival
    }

    /// The slow path of [`arrive`](Self::arrive): queue, or refuse.
    fn enqueue(
        self: &Arc<Self>,
        st: &mut State,
        now: u64,
        criticality: Criticality,
        deadline: Option<Deadline>,
        remaining: Option<Duration>,
        wakers: &mut Vec<Waker>,
    ) -> Arrival {
        let c = &self.counters;
        if self.settings.deadline_aware {
            st.shed_doomed(c, wakers);
        }
        let limit = st.limit();
        let class = criticality.index();
        let lifo = st.codel.standing();
        let ahead = st.queues.ahead(class, lifo);
        let per_slot = st.service.map(|s| s / limit as f64);
        let wait = per_slot.map(|p| (ahead + 1) as f64 * p);
        let retry_after = retry_after(st.service, per_slot, st.queues.len);
        if lifo && criticality == Criticality::Sheddable {
            metrics::shed(Reason::StandingQueue, criticality);
            return Arrival::Refused(overloaded(retry_after));
        }
        if let (Some(left), Some(wait), Some(service)) = (remaining, wait, st.service_high())
            && nanos(left) < wait + service
        {
            metrics::shed(Reason::Deadline, criticality);
            return Arrival::Refused(overloaded(retry_after));
        }
        if st.queues.len >= self.settings.capacity {
            // Full: a waiter of lower criticality makes room, else refuse.
            let lowest = st.queues.by_class.iter().rposition(|q| !q.is_empty());
            match lowest {
                Some(low) if low > class => {
                    let (id, waiter) = st.queues.pop_victim().expect("a waiter");
                    st.shed(id, waiter, retry_after, wakers);
                }
                _ => {
                    metrics::shed(Reason::QueueFull, criticality);
                    return Arrival::Refused(overloaded(retry_after));
                }
            }
        }
        let id = st.next_id;
        st.next_id += 1;
        st.queues.insert(
            class,
            id,
            Waiter {
                enqueued: now,
                deadline: deadline.map(|d| d.instant()),
                waker: None,
            },
        );
        // Before trying for a slot: a request released without the lock
        // then sees someone waits.
        c.queued.store(st.queues.len, Ordering::SeqCst);
        st.dispatch(now, c, wakers);
        match st.decided.remove(&id) {
            Some(Decision::Granted {
                in_flight,
                limit,
                at,
            }) => Arrival::Admitted(Permit::new(self.clone(), at, in_flight, limit, deadline)),
            Some(Decision::Shed { retry_after }) => {
                metrics::shed(Reason::Queued, criticality);
                Arrival::Refused(overloaded(retry_after))
            }
            None => Arrival::Queued(Ticket {
                shared: Some(self.clone()),
                id,
                class,
                deadline,
            }),
        }
    }

    /// A request in service finished: `sample` is what the algorithm should
    /// learn, and whether its latency is a service time (it was answered).
    fn release(&self, now: u64, sample: Option<(Sample, bool)>) {
        let mut wakers = Vec::new();
        let c = &self.counters;
        let mut st = lock(&self.state);
        c.show_in_flight(c.release());
        if let Some((sample, timed)) = sample {
            let before = st.limit();
            let estimate = st.estimate;
            let next = st.algorithm.update(estimate, &sample);
            st.estimate = if next.is_finite() {
                next.clamp(self.settings.min as f64, self.settings.max as f64)
            } else {
                st.estimate
            };
            if timed {
                let latency = nanos(sample.latency());
                match st.service {
                    Some(srtt) => {
                        st.service_var = 0.75 * st.service_var + 0.25 * (srtt - latency).abs();
                        st.service = Some(0.875 * srtt + 0.125 * latency);
                    }
                    None => {
                        st.service = Some(latency);
                        st.service_var = latency / 2.0;
                    }
                }
                let high = st.service_high().unwrap_or(f64::MAX);
                c.service_high
                    .store(high.min(u64::MAX as f64 - 1.0) as u64, Ordering::Relaxed);
            }
            let limit = st.limit();
            if limit != before {
                c.limit.store(limit, Ordering::Release);
                // The gauge changes with the limit, not with every request.
                metrics::limit(limit);
            }
        }
        if st.queues.len > 0 {
            st.dispatch(now, c, &mut wakers);
            self.publish(&st);
        }
        drop(st);
        wakers.into_iter().for_each(Waker::wake);
    }

    /// A request that was not timed finished: its slot goes back without
    /// the lock, which is taken only if someone waits for the slot. A drop
    /// (overloaded, deadline) makes the next requests timed, so the
    /// algorithm learns of the next one.
    #[inline(always)]
    fn release_untimed(&self, dropped: bool) {
        let c = &self.counters;
        if dropped {
            c.force.store(self.settings.sampling, Ordering::Relaxed);
        }
        let left = c.release();
        if left == 0 && c.shown.load(Ordering::Relaxed) != 0 {
            c.show_in_flight(0);
        }
        if c.queued.load(Ordering::SeqCst) != 0 {
            self.dispatch_freed();
        }
    }

    /// A slot was given back without the lock while someone waits.
    #[cold]
    #[inline(never)]
    fn dispatch_freed(&self) {
        let c = &self.counters;
        let now = self.clock.now_nanos();
        let mut wakers = Vec::new();
        let mut st = lock(&self.state);
        if st.queues.len > 0 {
            st.dispatch(now, c, &mut wakers);
            self.publish(&st);
        }
        drop(st);
        wakers.into_iter().for_each(Waker::wake);
    }
}

fn retry_after(service: Option<f64>, per_slot: Option<f64>, queued: usize) -> Duration {
    // The time for the queue ahead to drain, at least one service time.
    match (service, per_slot) {
        (Some(s), Some(p)) => Duration::from_nanos(((queued + 1) as f64 * p).max(s) as u64),
        _ => Duration::from_millis(100),
    }
    .max(Duration::from_millis(1))
}

fn nanos(d: Duration) -> f64 {
    // Not `as_nanos() as f64`: a u128 to f64 conversion is a libcall.
    d.as_secs() as f64 * 1e9 + f64::from(d.subsec_nanos())
}

impl State {
    /// Refuses, last in the order of service first, the waiters that could not
    /// finish before their deadline even if served in that order with no
    /// newer arrivals: a slot for each waiter beyond the free ones, then a service time. (In
    /// LIFO the newest arrivals are served first, so a standing queue's oldest
    /// waiters would otherwise sit until their deadline and leave as 504s,
    /// having held a place for nothing.)
    fn shed_doomed(&mut self, c: &Counters, wakers: &mut Vec<Waker>) {
        let (Some(typical), Some(service)) = (self.service, self.service_high()) else {
            return;
        };
        let per_slot = typical / self.limit() as f64;
        let lifo = self.codel.standing();
        let mut tokio_now = None;
        let free = self.limit().saturating_sub(c.in_flight());
        while let Some((class, id, Some(deadline))) = self.queues.last(lifo) {
            let len = self.queues.len;
            let now = *tokio_now.get_or_insert_with(Instant::now);
            let left = nanos(deadline.saturating_duration_since(now));
            // Slots free now serve the first waiters at once; each further
            // place waits for one slot to free.
            let ahead = len.saturating_sub(free);
            if left >= ahead as f64 * per_slot + service {
                break;
            }
            let waiter = self.queues.remove(class, id).expect("present");
            let retry = retry_after(Some(typical), Some(per_slot), len - 1);
            self.shed(id, waiter, retry, wakers);
        }
    }

    /// A service time few requests exceed: SRTT + 2 × RTTVAR.
    fn service_high(&self) -> Option<f64> {
        self.service.map(|s| s + 2.0 * self.service_var)
    }

    fn limit(&self) -> usize {
        // Whole requests; the clamp keeps it within [min, max].
        (self.estimate as usize).max(1)
    }

    fn shed(&mut self, id: u64, waiter: Waiter, retry_after: Duration, wakers: &mut Vec<Waker>) {
        self.decided.insert(id, Decision::Shed { retry_after });
        wakers.extend(waiter.waker);
    }

    /// Grants free slots to waiters: CoDel first drops what it must, then the
    /// highest criticality is served, oldest first, newest first while the
    /// queue is standing. A waiter that could no longer finish before its
    /// deadline is refused instead of served.
    fn dispatch(&mut self, now: u64, c: &Counters, wakers: &mut Vec<Waker>) {
        if self.deadline_aware {
            self.shed_doomed(c, wakers);
        }
        let mut tokio_now = None;
        while self.queues.len > 0 {
            let Some((in_flight, limit)) = c.try_acquire() else {
                break;
            };
            let service = self.service;
            let per_slot = service.map(|s| s / self.limit() as f64);
            let retry = retry_after(service, per_slot, self.queues.len);
            let mut view = CodelView {
                queues: &mut self.queues,
                decided: &mut self.decided,
                wakers,
                retry_after: retry,
            };
            if !self.codel.dequeue(now, &mut view) {
                c.release();
                break;
            }
            let lifo = self.codel.standing();
            let Some((id, waiter)) = self.queues.pop_next(lifo) else {
                c.release();
                break;
            };
            if let (Some(deadline), Some(service)) = (waiter.deadline, self.service_high()) {
                let t = *tokio_now.get_or_insert_with(Instant::now);
                if nanos(deadline.saturating_duration_since(t)) < service {
                    c.release();
                    self.shed(id, waiter, retry, wakers);
                    continue;
                }
            }
            self.decided.insert(
                id,
                Decision::Granted {
                    in_flight,
                    limit,
                    at: now,
                },
            );
            wakers.extend(waiter.waker);
        }
    }
}

/// The queue as CoDel sees it: the head is the oldest waiter; a drop sheds
/// the oldest waiter of the lowest criticality.
struct CodelView<'a> {
    queues: &'a mut Queues,
    decided: &'a mut HashMap<u64, Decision>,
    wakers: &'a mut Vec<Waker>,
    retry_after: Duration,
}

impl Head for CodelView<'_> {
    fn head(&self, now: u64) -> Option<(u64, usize)> {
        let w = self.queues.oldest()?;
        Some((now.saturating_sub(w.enqueued), self.queues.len - 1))
    }

    fn drop_head(&mut self, _now: u64) {
        if let Some((id, waiter)) = self.queues.pop_victim() {
            self.decided.insert(
                id,
                Decision::Shed {
                    retry_after: self.retry_after,
                },
            );
            self.wakers.extend(waiter.waker);
        }
    }
}

/// A place in the admission queue; dropping it gives the place (or the slot
/// it was granted) back.
#[derive(Debug)]
pub(crate) struct Ticket {
    shared: Option<Arc<Shared>>,
    id: u64,
    class: usize,
    deadline: Option<Deadline>,
}

/// Why a queued request left without being served.
#[derive(Debug)]
pub(crate) enum Left {
    Shed(Overloaded),
    Expired(Deadline),
}

impl Ticket {
    pub(crate) fn deadline(&self) -> Option<Deadline> {
        self.deadline
    }

    /// Ready with a permit once granted, or with why the request left.
    pub(crate) fn poll(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<Permit, Left>> {
        let shared = self.shared.as_ref().expect("polled after completion");
        let mut st = lock(&shared.state);
        match st.decided.remove(&self.id) {
            Some(Decision::Granted {
                in_flight,
                limit,
                at,
            }) => {
                drop(st);
                let shared = self.shared.take().expect("checked");
                Poll::Ready(Ok(Permit::new(shared, at, in_flight, limit, self.deadline)))
            }
            Some(Decision::Shed { retry_after }) => {
                drop(st);
                self.shared = None;
                metrics::shed(Reason::Queued, metrics::of_class(self.class));
                Poll::Ready(Err(Left::Shed(overloaded(retry_after))))
            }
            None => match st.queues.by_class[self.class].get_mut(&self.id) {
                Some(waiter) => {
                    match &waiter.waker {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        _ => waiter.waker = Some(cx.waker().clone()),
                    }
                    Poll::Pending
                }
                None => {
                    drop(st);
                    self.shared = None;
                    metrics::shed(Reason::Queued, metrics::of_class(self.class));
                    Poll::Ready(Err(Left::Shed(overloaded(Duration::from_millis(1)))))
                }
            },
        }
    }

    /// The deadline passed while queued: leave (a slot granted meanwhile is
    /// given back).
    pub(crate) fn expire(&mut self) -> Left {
        let deadline = self.deadline.expect("only requests with a deadline expire");
        match self.leave() {
            Some(Decision::Shed { retry_after }) => {
                metrics::shed(Reason::Queued, metrics::of_class(self.class));
                Left::Shed(overloaded(retry_after))
            }
            _ => Left::Expired(deadline),
        }
    }

    /// Leaves the queue; returns the decision that was waiting, if any (a
    /// granted slot is released).
    fn leave(&mut self) -> Option<Decision> {
        let shared = self.shared.take()?;
        let now = shared.clock.now_nanos();
        let mut wakers = Vec::new();
        let mut st = lock(&shared.state);
        let decision = st.decided.remove(&self.id);
        match decision {
            Some(Decision::Granted { .. }) => {
                shared.counters.release();
                st.dispatch(now, &shared.counters, &mut wakers);
            }
            Some(Decision::Shed { .. }) => {}
            None => {
                st.queues.remove(self.class, self.id);
            }
        }
        shared.publish(&st);
        drop(st);
        wakers.into_iter().for_each(Waker::wake);
        decision
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.leave();
    }
}

/// A slot in service. It is not given back on drop: the response future
/// holding it does that ([`finish`](Permit::finish) when answered,
/// [`dropped_in_service`](Permit::dropped_in_service) when dropped before),
/// so that the future, which cannot move its pinned inner future out, can
/// still give its slot back in place.
///
/// Two words, as tower's semaphore permit, with a tag whose spare values the
/// response future uses for its other states: it sits in every response
/// future, and callers pay for a future's size in every move. What a timed
/// request needs (one in `sampling` at low load) is boxed.
#[derive(Debug)]
pub(crate) enum Permit {
    /// In service, not timed.
    Untimed(Arc<Shared>),
    /// In service and timed.
    Timed(Box<Timing>),
    /// Given back.
    Released,
}

/// A timed request in service: what its release teaches the algorithm.
#[derive(Debug)]
pub(crate) struct Timing {
    shared: Arc<Shared>,
    start: u64,
    /// The deadline's instant only (a whole `Deadline` is 24 bytes larger).
    deadline: Option<Instant>,
    in_flight: u32,
    /// The limit it was admitted under.
    limit: u32,
}

/// How a request in service ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Answered.
    Success,
    /// Failed with a sign of overload (overloaded, rate limited, deadline).
    Dropped,
    /// Failed otherwise: nothing to learn about load.
    Ignored,
}

fn narrow(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Permit {
    #[inline]
    fn new(
        shared: Arc<Shared>,
        start: u64,
        in_flight: usize,
        limit: usize,
        deadline: Option<Deadline>,
    ) -> Self {
        Permit::Timed(Box::new(Timing {
            shared,
            start,
            deadline: deadline.map(|d| d.instant()),
            in_flight: narrow(in_flight),
            limit: narrow(limit),
        }))
    }

    /// The request answered (or failed) in service: its slot goes back.
    /// Nothing happens the second time.
    #[inline(always)]
    pub(crate) fn finish(&mut self, outcome: Outcome) {
        match std::mem::replace(self, Permit::Released) {
            Permit::Untimed(shared) => shared.release_untimed(outcome == Outcome::Dropped),
            Permit::Timed(timing) => timing.finish(outcome),
            Permit::Released => {}
        }
    }

    /// Dropped in service, not finished (by its deadline, or by a caller
    /// that went away): its slot goes back. Nothing happens once released.
    #[inline]
    pub(crate) fn dropped_in_service(&mut self) {
        if !matches!(self, Permit::Released) {
            self.dropped_cold();
        }
    }

    #[cold]
    #[inline(never)]
    fn dropped_cold(&mut self) {
        match std::mem::replace(self, Permit::Released) {
            // Its deadline was not read (that costs a look-up): either way
            // the next requests are timed.
            Permit::Untimed(shared) => shared.release_untimed(true),
            Permit::Timed(timing) => timing.dropped(),
            Permit::Released => {}
        }
    }
}

impl Timing {
    fn sample(&self, latency: u64, dropped: bool) -> Sample {
        Sample::new(
            Duration::from_nanos(latency),
            self.in_flight as usize,
            dropped,
        )
        .with_limit(self.limit as usize)
    }

    #[inline(never)]
    fn finish(&self, outcome: Outcome) {
        let now = self.shared.clock.now_nanos();
        let sample = match outcome {
            Outcome::Ignored => None,
            _ => {
                let dropped = outcome == Outcome::Dropped;
                let latency = now.saturating_sub(self.start);
                Some((self.sample(latency, dropped), !dropped))
            }
        };
        self.shared.release(now, sample);
    }

    /// By its deadline (a drop to learn from), or by a caller that went
    /// away (nothing to learn).
    fn dropped(&self) {
        let expired = self.deadline.is_some_and(|d| d <= Instant::now());
        let now = self.shared.clock.now_nanos();
        let sample = expired.then(|| {
            let latency = now.saturating_sub(self.start);
            (self.sample(latency, true), false)
        });
        self.shared.release(now, sample);
    }
}
