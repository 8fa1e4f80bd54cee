//! GCRA buckets: one word of state per bucket, reserved alone by CAS or
//! several at once by locking each (an atomic exchange) in a global order.
//!
//! A bucket's state is its *theoretical arrival time* (TAT) in nanoseconds
//! since its clock's epoch: the instant at which it would be full again.
//! With `T` the interval per unit of cost and `B·T` its capacity, a request
//! of cost `c` arriving at `now` can be admitted at
//! `a = max(now, max(tat, now) + c·T − B·T)`, which then moves the TAT to
//! `max(tat, a) + c·T`. Several buckets admit a request at the latest of
//! their `a`, and each records the request *at that common instant*
//! (anchoring it at its own earlier `a` would let the bucket admit a second
//! request at the same instant later on).
//!
//! # Refunds
//!
//! A multi-bucket reservation locks each bucket by swapping [`LOCKED`] into
//! it (one atomic exchange, which also reads the TAT), in a global order.
//!
//! A reservation that was never used (its waiter was dropped) moves a
//! bucket's TAT back from `new` to `old`, but only while the TAT is still
//! `new`: no one has reserved after it, so no one's admission time was
//! computed with it. A reservation that is not the tail is remembered; when
//! the reservations after it are refunded in turn and it becomes the tail,
//! it is refunded too. Reservations with later live ones behind them stay
//! spent: the later waiters keep the admission times they were promised.

// Under `--cfg loom`, the loom model (`tests/loom_gcra.rs`) compiles this
// very file into itself (where `test` is set too) with loom's atomics and
// mutex; the library itself always uses std's.
#[cfg(all(loom, test))]
use loom::sync::{
    Mutex,
    atomic::{AtomicU64, Ordering},
};
use std::sync::PoisonError;
#[cfg(not(all(loom, test)))]
use std::sync::{
    Mutex,
    atomic::{AtomicU64, Ordering},
};

use crate::error::InsufficientCapacity;
use crate::limit::Limit;

/// The state of a bucket while a multi-bucket reservation holds it (a TAT
/// never comes near it: 2⁶⁴ ns is 584 years).
const LOCKED: u64 = u64::MAX;

/// What one bucket recorded for one reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Taken {
    pub(crate) old: u64,
    pub(crate) new: u64,
}

/// Why nothing was reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The admission time is this many nanoseconds away, beyond the allowed wait.
    RetryAfter(u64),
    /// The cost exceeds a bucket's burst.
    Insufficient(InsufficientCapacity),
}

/// Keeps the hot word alone on its cache line: threads spinning on it must
/// not also invalidate the read-only parameters next to it.
#[derive(Debug)]
#[repr(align(64))]
struct Line(AtomicU64);

impl std::ops::Deref for Line {
    type Target = AtomicU64;
    #[inline]
    fn deref(&self) -> &AtomicU64 {
        &self.0
    }
}

#[derive(Debug)]
pub(crate) struct Bucket {
    tat: Line,
    interval: u64,
    capacity: u64,
    burst: u32,
    /// Non-tail reservations whose waiters left: `(old, new)`.
    cancelled: Mutex<Vec<(u64, u64)>>,
}

/// Under loom, a spin is a yield to the model's scheduler.
#[cfg(all(loom, test))]
fn spin(_round: &mut u32) {
    loom::thread::yield_now();
}

#[cfg(not(all(loom, test)))]
#[inline]
fn spin(round: &mut u32) {
    *round += 1;
    if *round < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

impl Bucket {
    pub(crate) fn new(limit: &Limit) -> Self {
        Bucket {
            tat: Line(AtomicU64::new(0)),
            interval: limit.interval_nanos(),
            capacity: limit.capacity_nanos(),
            burst: limit.max_burst(),
            cancelled: Mutex::new(Vec::new()),
        }
    }

    #[inline]
    pub(crate) fn check_cost(&self, cost: u32) -> Result<u64, Refused> {
        if cost > self.burst {
            return Err(Refused::Insufficient(InsufficientCapacity::new(
                cost, self.burst,
            )));
        }
        Ok(u64::from(cost) * self.interval)
    }

    /// The earliest admission time for `cost` given `tat`, at `now`.
    #[inline]
    fn earliest(&self, tat: u64, now: u64, increment: u64) -> u64 {
        (tat.max(now) + increment)
            .saturating_sub(self.capacity)
            .max(now)
    }

    /// Reserves `cost` in this bucket alone, if it can be admitted within
    /// `max_wait` nanoseconds; returns the wait.
    #[inline(always)]
    pub(crate) fn acquire(
        &self,
        now: u64,
        cost: u32,
        max_wait: u64,
    ) -> Result<(u64, Taken), Refused> {
        let increment = if cost == 1 {
            self.interval
        } else {
            self.check_cost(cost)?
        };
        let mut current = self.tat.load(Ordering::Relaxed);
        let mut round = 0;
        loop {
            if current == LOCKED {
                spin(&mut round);
                current = self.tat.load(Ordering::Relaxed);
                continue;
            }
            // Alone, the admission time `a` never exceeds `max(tat, now)`
            // (the cost fits in the burst), so the new TAT is simply
            // `max(tat, now) + c·T` and `a = new − B·T`, at the earliest now.
            let new = current.max(now) + increment;
            let wait = new.saturating_sub(self.capacity).saturating_sub(now);
            if wait > max_wait {
                return Err(Refused::RetryAfter(wait));
            }
            match self
                .tat
                .compare_exchange_weak(current, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok((wait, Taken { old: current, new })),
                Err(seen) => current = seen,
            }
        }
    }

    #[inline]
    fn lock(&self) -> u64 {
        let mut round = 0;
        loop {
            let tat = self.tat.swap(LOCKED, Ordering::Acquire);
            if tat != LOCKED {
                return tat;
            }
            // Someone else holds it: wait for the release without writing.
            while self.tat.load(Ordering::Relaxed) == LOCKED {
                spin(&mut round);
            }
        }
    }

    fn unlock(&self, value: u64) {
        self.tat.store(value, Ordering::Release);
    }

    /// Gives a reservation back (see the module docs for what is refunded).
    pub(crate) fn refund(&self, taken: Taken, now: u64) {
        let mut cancelled = self
            .cancelled
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Taken { mut old, mut new } = taken;
        loop {
            if !self.replace(new, old) {
                // Not the tail: someone reserved after it. Keep it for later,
                // unless its slot is already in the past (then refunding it
                // could change nothing).
                if new > now {
                    cancelled.push((old, new));
                }
                break;
            }
            // Refunded. Was the reservation before it also given back?
            match cancelled.iter().position(|&(_, n)| n == old) {
                Some(i) => (old, new) = cancelled.swap_remove(i),
                None => break,
            }
        }
        cancelled.retain(|&(_, n)| n > now);
    }

    /// Sets the TAT from `expected` to `value` if it is `expected`, waiting
    /// out a multi-bucket lock on it.
    fn replace(&self, expected: u64, value: u64) -> bool {
        let mut round = 0;
        loop {
            match self.tat.compare_exchange_weak(
                expected,
                value,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(LOCKED) => spin(&mut round),
                Err(seen) if seen == expected => {}
                Err(_) => return false,
            }
        }
    }

    /// Whether the bucket is in the state of a fresh one at `now` (full, with
    /// no reservation pending): dropping it loses nothing.
    pub(crate) fn is_fresh(&self, now: u64) -> bool {
        let tat = self.tat.load(Ordering::Relaxed);
        tat != LOCKED && tat <= now
    }

    /// When the bucket will be fresh again (nanoseconds since the epoch),
    /// as far as can be told at `now` (a bucket locked by a reservation in
    /// progress: a millisecond from now, to look again).
    pub(crate) fn fresh_at(&self, now: u64) -> u64 {
        match self.tat.load(Ordering::Relaxed) {
            LOCKED => now + 1_000_000,
            tat => tat,
        }
    }

    #[cfg(test)]
    pub(crate) fn tat(&self) -> u64 {
        self.tat.load(Ordering::Relaxed)
    }
}

/// Reserves `costs[i]` in `buckets[i]` for every `i`, all or none, at one
/// common admission time no more than `max_wait` away. `order` lists the
/// indices of `buckets` sorted by a global key, the order in which the
/// buckets are locked (so two overlapping sets can never deadlock).
///
/// Returns the wait, and writes what each bucket recorded to `taken` (in
/// the order of `buckets`).
#[inline]
pub(crate) fn acquire_all(
    buckets: &[&Bucket],
    costs: &[u32],
    order: &[usize],
    now: u64,
    max_wait: u64,
    taken: &mut [Taken],
) -> Result<u64, Refused> {
    debug_assert!(buckets.len() == costs.len() && buckets.len() == order.len());
    // `new` holds the increment until the commit
    for (i, b) in buckets.iter().enumerate() {
        taken[i].new = b.check_cost(costs[i])?;
    }
    for &i in order {
        taken[i].old = buckets[i].lock();
    }
    let mut at = now;
    for (i, b) in buckets.iter().enumerate() {
        at = at.max(b.earliest(taken[i].old, now, taken[i].new));
    }
    let wait = at - now;
    if wait > max_wait {
        for &i in order.iter().rev() {
            buckets[i].unlock(taken[i].old);
        }
        return Err(Refused::RetryAfter(wait));
    }
    for &i in order.iter().rev() {
        let new = taken[i].old.max(at) + taken[i].new;
        taken[i].new = new;
        buckets[i].unlock(new);
    }
    Ok(wait)
}

/// [`acquire_all`] for the common case of one cost, no wait allowed and no
/// receipt wanted, over `items` already in locking order; `cost` must not
/// exceed any of their bursts (checked by the caller).
#[inline]
pub(crate) fn try_acquire_sorted<T>(
    items: &[T],
    bucket: impl Fn(&T) -> &Bucket,
    cost: u32,
    now: u64,
) -> Result<(), Refused> {
    let mut old = [0u64; crate::MAX_LIMITS];
    let mut at = now;
    for (i, item) in items.iter().enumerate() {
        let b = bucket(item);
        old[i] = b.lock();
        at = at.max(b.earliest(old[i], now, u64::from(cost) * b.interval));
    }
    if at > now {
        for (i, item) in items.iter().enumerate().rev() {
            bucket(item).unlock(old[i]);
        }
        return Err(Refused::RetryAfter(at - now));
    }
    for (i, item) in items.iter().enumerate().rev() {
        let b = bucket(item);
        b.unlock(old[i].max(at) + u64::from(cost) * b.interval);
    }
    Ok(())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    const UNIT: u64 = 1_000; // ns per model time unit

    fn bucket(interval_units: u64, burst: u32) -> Bucket {
        let limit = Limit::new(1, Duration::from_nanos(interval_units * UNIT))
            .unwrap()
            .burst(burst)
            .unwrap();
        Bucket::new(&limit)
    }

    /// Reserves in the buckets selected by `mask` through the real code paths.
    fn reserve(
        buckets: &[Bucket],
        mask: u8,
        cost: u32,
        now: u64,
        max_wait: u64,
    ) -> Result<(u64, Vec<(usize, Taken)>), Refused> {
        let chosen: Vec<usize> = (0..buckets.len())
            .filter(|i| mask & (1 << i) != 0)
            .collect();
        if let [i] = chosen[..] {
            let (wait, t) = buckets[i].acquire(now, cost, max_wait)?;
            return Ok((wait, vec![(i, t)]));
        }
        let refs: Vec<&Bucket> = chosen.iter().map(|&i| &buckets[i]).collect();
        if max_wait == 0 {
            // the path of `MultiLimiter::try_acquire`
            for b in &refs {
                b.check_cost(cost)?;
            }
            try_acquire_sorted(&refs, |b| *b, cost, now)?;
            return Ok((0, Vec::new()));
        }
        let costs = vec![cost; chosen.len()];
        // lock in reverse index order: any fixed global order will do
        let order: Vec<usize> = (0..chosen.len()).rev().collect();
        let mut taken = vec![Taken { old: 0, new: 0 }; chosen.len()];
        let wait = acquire_all(&refs, &costs, &order, now, max_wait, &mut taken)?;
        Ok((wait, chosen.iter().copied().zip(taken).collect()))
    }

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Status {
        Waiting,
        Admitted,
        Cancelled,
    }

    /// The reference model: every bucket keeps its list of reservations and
    /// replays it to find its state; a cancelled reservation is forgotten
    /// once every reservation after it in that bucket is cancelled too.
    #[derive(Default)]
    struct Model {
        /// per bucket: (request id, admission time, cost)
        lists: Vec<Vec<(usize, u64, u32)>>,
        status: Vec<Status>,
        admission: Vec<u64>,
    }

    impl Model {
        fn tat(&self, b: usize, interval: u64) -> u64 {
            self.lists[b]
                .iter()
                .fold(0, |tat, &(_, a, c)| tat.max(a) + u64::from(c) * interval)
        }

        fn forget_cancelled_tails(&mut self) {
            for list in &mut self.lists {
                while list
                    .last()
                    .is_some_and(|&(id, _, _)| self.status[id] == Status::Cancelled)
                {
                    list.pop();
                }
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Acquire {
            mask: u8,
            cost: u32,
            max_wait: Option<u64>,
        },
        Admit(usize),
        Drop(usize),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u8..8, 1u32..4, prop::option::of(prop_oneof![Just(0u64), 0u64..40])).prop_map(|(mask, cost, w)| Op::Acquire {
                mask,
                cost,
                max_wait: w.map(|w| w * UNIT),
            }),
            2 => any::<usize>().prop_map(Op::Admit),
            2 => any::<usize>().prop_map(Op::Drop),
            2 => (0u64..12).prop_map(|d| Op::Advance(d * UNIT)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn buckets_agree_with_the_reference_model(
            limits in prop::collection::vec((1u64..6, 1u32..5), 3),
            ops in prop::collection::vec(op(), 1..80),
        ) {
            let buckets: Vec<Bucket> = limits.iter().map(|&(t, b)| bucket(t, b)).collect();
            let intervals: Vec<u64> = limits.iter().map(|&(t, _)| t * UNIT).collect();
            let mut model = Model { lists: vec![Vec::new(); 3], ..Model::default() };
            let mut receipts: Vec<Vec<(usize, Taken)>> = Vec::new();
            let mut now = 1_000 * UNIT;

            for op in ops {
                match op {
                    Op::Acquire { mask, cost, max_wait } => {
                        let max_wait = max_wait.unwrap_or(u64::MAX);
                        let chosen: Vec<usize> = (0..3).filter(|i| mask & (1 << i) != 0).collect();
                        // the model: the earliest instant at which every
                        // chosen bucket holds `cost` tokens
                        let too_big = chosen.iter().any(|&b| cost > limits[b].1);
                        let at = chosen.iter().fold(now, |at, &b| {
                            let spare = u64::from(limits[b].1 - cost.min(limits[b].1)) * intervals[b];
                            at.max(model.tat(b, intervals[b]).saturating_sub(spare))
                        });
                        let got = reserve(&buckets, mask, cost, now, max_wait);
                        if too_big {
                            prop_assert!(matches!(got, Err(Refused::Insufficient(_))), "{got:?}");
                            continue;
                        }
                        if at - now > max_wait {
                            prop_assert_eq!(got, Err(Refused::RetryAfter(at - now)));
                            continue;
                        }
                        let (wait, taken) = got.expect("the model admits it");
                        prop_assert_eq!(wait, at - now);
                        let id = model.status.len();
                        for &b in &chosen {
                            model.lists[b].push((id, at, cost));
                        }
                        model.status.push(if wait == 0 { Status::Admitted } else { Status::Waiting });
                        model.admission.push(at);
                        receipts.push(taken);
                    }
                    Op::Admit(i) | Op::Drop(i) => {
                        let waiting: Vec<usize> = (0..model.status.len())
                            .filter(|&id| model.status[id] == Status::Waiting)
                            .collect();
                        if waiting.is_empty() {
                            continue;
                        }
                        let id = waiting[i % waiting.len()];
                        if matches!(op, Op::Admit(_)) {
                            if model.admission[id] <= now {
                                model.status[id] = Status::Admitted;
                            }
                            continue;
                        }
                        model.status[id] = Status::Cancelled;
                        for &(b, taken) in &receipts[id] {
                            buckets[b].refund(taken, now);
                        }
                        model.forget_cancelled_tails();
                    }
                    Op::Advance(d) => now += d,
                }
                // Every bucket's state, as seen from now on, is the model's.
                for b in 0..3 {
                    prop_assert_eq!(
                        buckets[b].tat().max(now),
                        model.tat(b, intervals[b]).max(now),
                        "bucket {}", b
                    );
                }
            }

            // The guarantee itself, checked on what was admitted or is still
            // waiting: in every window, at most burst + window / interval.
            for b in 0..3 {
                let mut kept: Vec<(u64, u32)> = model.lists[b]
                    .iter()
                    .filter(|&&(id, _, _)| model.status[id] != Status::Cancelled)
                    .map(|&(_, a, c)| (a, c))
                    .collect();
                kept.sort_unstable();
                for j in 0..kept.len() {
                    let mut sum = 0u64;
                    for k in j..kept.len() {
                        sum += u64::from(kept[k].1);
                        let allowed = u64::from(limits[b].1) + (kept[k].0 - kept[j].0) / intervals[b];
                        prop_assert!(sum <= allowed, "bucket {b}: {sum} > {allowed} in {kept:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_middle_reservation_stays_spent_until_the_ones_after_it_leave() {
        let b = bucket(10, 1);
        let now = 100 * UNIT;
        let (_, first) = b.acquire(now, 1, u64::MAX).unwrap();
        let (w2, second) = b.acquire(now, 1, u64::MAX).unwrap();
        let (w3, third) = b.acquire(now, 1, u64::MAX).unwrap();
        assert_eq!((w2, w3), (10 * UNIT, 20 * UNIT));
        b.refund(second, now);
        assert_eq!(b.tat(), third.new, "the third waiter keeps its time");
        b.refund(third, now);
        assert_eq!(
            b.tat(),
            first.new,
            "the third and then the second are given back"
        );
    }

    #[test]
    fn overlapping_sets_on_many_threads_neither_deadlock_nor_overspend() {
        use std::sync::Arc;
        // far apart in time so nothing refills: only the bursts can pass
        let buckets: Arc<Vec<Bucket>> = Arc::new(vec![
            bucket(1_000_000_000, 300),
            bucket(1_000_000_000, 200),
            bucket(1_000_000_000, 250),
        ]);
        let sets: [&[usize]; 4] = [&[0, 1], &[1, 2], &[2, 0], &[0]];
        let admitted: Vec<Vec<usize>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let buckets = buckets.clone();
                    let set = sets[t];
                    s.spawn(move || {
                        let mut order: Vec<usize> = (0..set.len()).collect();
                        order.sort_by_key(|&i| set[i]);
                        let refs: Vec<&Bucket> = set.iter().map(|&i| &buckets[i]).collect();
                        let costs = vec![1; set.len()];
                        let mut n = 0;
                        for _ in 0..2_000 {
                            let ok = if set.len() == 1 {
                                refs[0].acquire(0, 1, 0).is_ok()
                            } else {
                                let mut taken = [Taken { old: 0, new: 0 }; 3];
                                acquire_all(&refs, &costs, &order, 0, 0, &mut taken[..set.len()])
                                    .is_ok()
                            };
                            n += usize::from(ok);
                        }
                        vec![n]
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let n: Vec<usize> = admitted.into_iter().flatten().collect();
        let per_bucket = [n[0] + n[2] + n[3], n[0] + n[1], n[1] + n[2]];
        for (b, used) in per_bucket.iter().enumerate() {
            let burst = [300, 200, 250][b];
            assert!(*used <= burst, "bucket {b}: {used} > {burst}");
            assert_eq!(buckets[b].tat(), *used as u64 * 1_000_000_000 * UNIT);
        }
    }
}
