//! The hedge budget: a sliding window counted in requests, so the allowance
//! follows the traffic and cannot be borrowed from before a latency shift.

// Under `--cfg loom`, the loom model (`atscale-ratelimit/tests/loom_hedge_budget.rs`:
// this crate's dev-dependencies do not build under loom) compiles this very
// file into itself (where `test` is set too) with loom's atomics and mutex;
// the library itself always uses std's.
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

/// Request start times are noted once per slot (`window / SLOTS` requests,
/// rounded up to a power of two), to measure how long the window took (for
/// the per-second floor).
const SLOTS: u64 = 10;

/// Shared by every clone of a hedged service.
///
/// The hot path (once per request) is [`HedgeBudget::arrive`]: one atomic
/// add, and one store per slot. The ledger of hedges sent sits behind a
/// short lock taken only when a hedge is about to be sent.
///
/// Each request has a position (its arrival count), and each hedge is
/// charged to the position of the request it copies. A hedge is granted only
/// if, with it, every run of `window` consecutive positions that contains
/// its request holds at most one allowance of hedges — so every run of
/// `window` consecutive requests, aligned or not, and whenever its hedges were
/// sent (a request refused at first asks again later), stays within the
/// budget. The share is also checked against the requests actually seen so
/// far, so a service that just started cannot borrow from requests to come.
#[derive(Debug)]
pub(crate) struct HedgeBudget {
    ratio_ppm: u64,
    min_per_second: u64,
    window: u64,
    /// Slots are a power of two long, so the hot path masks instead of dividing.
    slot_shift: u32,
    arrivals: AtomicU64,
    slot_started: [AtomicU64; SLOTS as usize],
    /// The share of the allowance (in millionths) kept for stragglers.
    reserve_ppm: u64,
    /// With a reserve: `position + 1` of finished requests, at
    /// `position % len` (a slot taken by a later position reads as not
    /// finished).
    finished: Box<[AtomicU64]>,
    /// Positions charged with a hedge, sorted (a few windows' worth).
    ledger: Mutex<Vec<u64>>,
}

/// A request is a straggler when at least `DONE_BEFORE` of the (up to)
/// `NEIGHBOURS` requests that arrived just before it have finished, and
/// `DONE_AFTER` of those that arrived just after it.
const NEIGHBOURS: u64 = 32;
const DONE_BEFORE: f64 = 0.9;
const DONE_AFTER: f64 = 0.35;

impl HedgeBudget {
    pub(crate) fn new(ratio: f64, min_per_second: u32, window: u32) -> Self {
        let window = u64::from(window).max(SLOTS);
        HedgeBudget {
            ratio_ppm: (ratio * 1_000_000.0).round() as u64,
            min_per_second: u64::from(min_per_second),
            window,
            slot_shift: (window / SLOTS).next_power_of_two().trailing_zeros(),
            arrivals: AtomicU64::new(0),
            slot_started: Default::default(),
            reserve_ppm: 0,
            finished: Box::default(),
            ledger: Mutex::new(Vec::new()),
        }
    }

    /// Keeps `reserve` (a fraction in `[0, 1]`) of the allowance for
    /// stragglers: requests still waiting when nearly all of those that
    /// arrived just before them have [finished](Self::finish). Without a
    /// reserve the first to ask are served first.
    pub(crate) fn with_reserve(mut self, reserve: f64) -> Self {
        self.reserve_ppm = (reserve.clamp(0.0, 1.0) * 1_000_000.0).round() as u64;
        if self.reserve_ppm > 0 {
            // Room for the positions a request may still be hedged over.
            let len = (4 * self.window).clamp(64, 1 << 14);
            self.finished = (0..len).map(|_| AtomicU64::new(0)).collect();
        }
        self
    }

    /// Notes that the request at `position` has its answer (only needed with
    /// a reserve: one store).
    pub(crate) fn finish(&self, position: u64) {
        let len = self.finished.len() as u64;
        if len > 0 {
            self.finished[(position % len) as usize].store(position + 1, Ordering::Relaxed);
        }
    }

    /// Whether nearly all the requests that arrived just before `position`
    /// have finished, and some of those that arrived just after it: then it
    /// is slower than they were, whatever the latency window (perhaps still
    /// tuned to before a slowdown) says. (Just after a slowdown, the first
    /// slow requests are older than the fast ones before them: the ones
    /// after them, as slow, tell them apart.)
    fn is_straggler(&self, position: u64, latest: u64) -> bool {
        let len = self.finished.len() as u64;
        if len == 0 {
            return true;
        }
        let share_done = |from: u64, to: u64| {
            let done = (from..to)
                .filter(|&p| self.finished[(p % len) as usize].load(Ordering::Relaxed) == p + 1)
                .count();
            done as f64 / (to - from).max(1) as f64
        };
        let before = position.saturating_sub(NEIGHBOURS);
        let after = latest.min(position + NEIGHBOURS) + 1;
        (before == position || share_done(before, position) >= DONE_BEFORE)
            && (after <= position + 1 || share_done(position + 1, after) >= DONE_AFTER)
    }

    /// Counts one request; returns its position. Reads the clock (`now`, in
    /// the clock's nanoseconds) only when the request starts a slot.
    pub(crate) fn arrive(&self, now: impl FnOnce() -> u64) -> u64 {
        let n = self.arrivals.fetch_add(1, Ordering::Relaxed);
        if n & ((1 << self.slot_shift) - 1) == 0 {
            let slot = n >> self.slot_shift;
            self.slot_started[(slot % SLOTS) as usize].store(now(), Ordering::Relaxed);
        }
        n
    }

    /// Requests counted so far.
    pub(crate) fn arrivals(&self) -> u64 {
        self.arrivals.load(Ordering::Relaxed)
    }

    /// Takes one hedge from the budget for the request at `position`, if the
    /// budget has one.
    #[cfg(test)]
    pub(crate) fn try_acquire(&self, position: u64, now: u64) -> bool {
        self.acquire(position, now, false)
    }

    /// Takes one hedge from the budget for the request at `position`, if the
    /// budget has one. A straggler, or a request that `needs` it (its
    /// attempts failed), claims the whole allowance; any other request all
    /// but the reserve.
    pub(crate) fn acquire(&self, position: u64, now: u64, needs: bool) -> bool {
        let mut sent = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        let w = self.window;
        let latest = self.arrivals.load(Ordering::Relaxed).max(1) - 1;
        let position = position.min(latest);
        // Requests older than this are not hedged any more, and positions
        // older than that are forgotten: they share no window with a request
        // that may still be hedged.
        if position + 3 * w < latest {
            return false;
        }
        let forget = sent.partition_point(|&p| p + 4 * w < latest);
        sent.drain(..forget);
        let share = if self.reserve_ppm == 0 || needs || self.is_straggler(position, latest) {
            1_000_000
        } else {
            1_000_000 - self.reserve_ppm
        };
        // `requests` × the ratio × the share, rounded down.
        let allowance = |requests: u64| {
            u64::try_from(
                u128::from(requests) * u128::from(self.ratio_ppm) * u128::from(share)
                    / 1_000_000_000_000,
            )
            .unwrap_or(u64::MAX)
        };

        let lowest = (latest + 1).saturating_sub(w);
        let by_ratio = allowance(latest + 1 - lowest);
        let started = self.slot_started[((lowest >> self.slot_shift) % SLOTS) as usize]
            .load(Ordering::Relaxed);
        let span = now.saturating_sub(started).max(1_000_000_000);
        let by_time =
            u64::try_from(u128::from(self.min_per_second) * u128::from(span) / 1_000_000_000)
                .unwrap_or(u64::MAX);

        // The requests seen so far: the last `window` of them carry less than
        // their share (or the per-second floor).
        let recent = (sent.len() - sent.partition_point(|&p| p < lowest)) as u64;
        recent < by_ratio.max(by_time).min(w) && {
            // Every run of `window` positions around this request, with it.
            let cap = allowance(w).max(by_time).min(w);
            let at = sent.partition_point(|&p| p <= position);
            let first = sent.partition_point(|&p| p + w <= position); // p >= position - w + 1
            let count_from = |start: u64| {
                // hedges in [start, start + w), counting the new one
                let lo = sent.partition_point(|&p| p < start);
                let hi = sent.partition_point(|&p| p < start + w);
                (hi - lo) as u64 + 1
            };
            let crowded =
                (first..at).any(|i| count_from(sent[i]) > cap) || count_from(position) > cap;
            if !crowded {
                sent.insert(at, position);
            }
            !crowded
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    /// Nanoseconds on tokio's (paused) clock since this thread first asked.
    fn now() -> u64 {
        thread_local! {
            static BASE: std::cell::Cell<Option<tokio::time::Instant>> = const { std::cell::Cell::new(None) };
        }
        let base = BASE.with(|b| {
            let base = b.get().unwrap_or_else(tokio::time::Instant::now);
            b.set(Some(base));
            base
        });
        tokio::time::Instant::now()
            .saturating_duration_since(base)
            .as_nanos() as u64
    }

    fn arrive(b: &HedgeBudget, n: u64) {
        for _ in 0..n {
            b.arrive(now);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_never_holds_more_than_its_share() {
        let b = HedgeBudget::new(0.05, 0, 1000);
        arrive(&b, 1000);
        let granted = (0..200).filter(|_| b.try_acquire(u64::MAX, now())).count();
        assert_eq!(granted, 50);
        // the next 999 requests bring no new allowance: the window still holds the 50
        arrive(&b, 999);
        assert!(!b.try_acquire(u64::MAX, now()));
        // once the request they were charged to leaves the window, hedges resume
        arrive(&b, 1);
        assert_eq!(
            (0..200).filter(|_| b.try_acquire(u64::MAX, now())).count(),
            50
        );
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_services_get_the_per_second_floor() {
        let b = HedgeBudget::new(0.05, 2, 1000);
        arrive(&b, 3);
        assert!(b.try_acquire(u64::MAX, now()));
        assert!(b.try_acquire(u64::MAX, now()));
        assert!(!b.try_acquire(u64::MAX, now()), "2 per second");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(b.try_acquire(u64::MAX, now()), "the window now spans 2 s");
    }

    /// A budget of 5% over 1,000 requests with half kept for stragglers, and
    /// `n` requests arrived.
    fn reserved(n: u64) -> HedgeBudget {
        let b = HedgeBudget::new(0.05, 0, 1000).with_reserve(0.5);
        arrive(&b, n);
        b
    }

    #[tokio::test(start_paused = true)]
    async fn the_reserve_is_kept_for_stragglers() {
        let b = reserved(1000);
        // Nothing has finished: nobody is a straggler, and the first to ask
        // get half of the window's 50 hedges, whoever they are.
        let granted = (100..200).filter(|&p| b.try_acquire(p, now())).count();
        assert_eq!(granted, 25);
        assert!(!b.acquire(300, now(), false));
        // A request whose attempts failed may take the reserve too.
        assert!(b.acquire(299, now(), true));
        // Request 300 is still waiting when the 32 before it have finished
        // (and the 32 after it too): a straggler, it takes the reserve.
        for p in (268..300).chain(301..333) {
            b.finish(p);
        }
        assert!(b.acquire(300, now(), false));
        // as do up to 23 more stragglers, and no more
        for p in 500..800 {
            b.finish(p);
        }
        let stragglers = (600..700).filter(|&p| b.acquire(p, now(), false)).count();
        assert_eq!(stragglers, 23);
    }

    #[tokio::test(start_paused = true)]
    async fn a_straggler_is_slower_than_the_requests_on_both_sides() {
        let b = reserved(200);
        let done = |r: std::ops::Range<u64>| r.for_each(|p| b.finish(p));
        // Just after a slowdown: the fast requests before 100 have finished,
        // the slow ones after it (as slow as it is) have not.
        done(68..100);
        assert!(!b.is_straggler(100, 199));
        // Once more than a third of those after it have finished too, it is one.
        done(101..112);
        assert!(!b.is_straggler(100, 199), "11 of 32");
        done(112..113);
        assert!(b.is_straggler(100, 199));
        // 90% of the 32 before it must have finished: 28 of 32 is not enough.
        let b = reserved(200);
        (68..100).filter(|p| p % 8 != 0).for_each(|p| b.finish(p));
        (101..133).for_each(|p| b.finish(p));
        assert!(!b.is_straggler(100, 199));
        b.finish(72);
        assert!(b.is_straggler(100, 199), "29 of 32");
        // The latest request has no one after it; the first no one before.
        let b = reserved(40);
        (0..39).for_each(|p| b.finish(p));
        assert!(b.is_straggler(39, 39));
        assert!(b.is_straggler(0, 39));
        // A slot taken by a later position reads as not finished.
        let b = reserved(20_000);
        let len = b.finished.len() as u64;
        (68..100).for_each(|p| b.finish(p + len));
        (101..133).for_each(|p| b.finish(p));
        assert!(!b.is_straggler(100, 19_999));
        // Without a reserve nobody needs telling apart.
        assert!(HedgeBudget::new(0.05, 0, 1000).is_straggler(100, 199));
    }

    proptest! {
        /// With a reserve and any pattern of finished requests, any 1,000
        /// consecutive requests still carry at most 50 hedges, and requests
        /// asking while their neighbours are still running never take more
        /// than half of them.
        #[test]
        fn the_reserve_never_lifts_the_cap(
            demand in proptest::collection::vec((0u8..4, any::<bool>()), 3000..5000),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            rt.block_on(async {
                let b = HedgeBudget::new(0.05, 0, 1000).with_reserve(0.5);
                let mut charged = vec![0u32; demand.len()];
                let mut young = vec![0u32; demand.len()];
                for (i, &(wants, finishes)) in demand.iter().enumerate() {
                    let position = b.arrive(now);
                    // Every request finishes in some stretches, about half in
                    // others: both kinds of claim occur.
                    if finishes || (i / 300) % 2 == 0 {
                        b.finish(position);
                    }
                    let asking = position.saturating_sub(40);
                    for _ in 0..wants {
                        let straggler = b.is_straggler(asking, position);
                        if b.try_acquire(asking, now()) {
                            charged[asking as usize] += 1;
                            young[asking as usize] += u32::from(!straggler);
                        }
                    }
                }
                let mut most = 0;
                for start in 0..charged.len().saturating_sub(1000) {
                    let all: u32 = charged[start..start + 1000].iter().sum();
                    let first: u32 = young[start..start + 1000].iter().sum();
                    assert!(all <= 50, "window at {start}: {all}");
                    assert!(first <= 25, "window at {start}: {first} to non-stragglers");
                    most = most.max(all);
                }
                // the stragglers do get the reserve
                assert!(most > 25, "at most {most} in a window");
            });
        }

        /// Whatever the demand pattern, any 1,000 consecutive requests carry
        /// at most 50 hedges.
        #[test]
        fn every_window_of_requests_holds(demand in proptest::collection::vec(0u8..4, 3000..6000)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            rt.block_on(async {
                let b = HedgeBudget::new(0.05, 0, 1000);
                // Each request wants `wants` hedges, asked for now or (every
                // third one) late, 300 requests later; each is charged to the
                // position of its request.
                let mut late: Vec<(usize, u64)> = Vec::new();
                let mut charged = vec![0u32; demand.len()];
                for (i, wants) in demand.iter().enumerate() {
                    let position = b.arrive(now);
                    for _ in 0..*wants {
                        if i % 3 == 0 {
                            late.push((i + 300, position));
                        } else if b.try_acquire(position, now()) {
                            charged[position as usize] += 1;
                        }
                    }
                    late.retain(|&(due, p)| {
                        if due != i {
                            return true;
                        }
                        if b.try_acquire(p, now()) {
                            charged[p as usize] += 1;
                        }
                        false
                    });
                }
                let mut total = 0;
                for start in 0..charged.len().saturating_sub(1000) {
                    let sum: u32 = charged[start..start + 1000].iter().sum();
                    assert!(sum <= 50, "window at {start}: {sum}");
                    total = total.max(sum);
                }
                // and the budget is used, not just respected
                assert!(demand.len() < 2000 || total >= 45, "max window {total}");
            });
        }
    }
}
