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
    /// Positions charged with a hedge, sorted (a few windows' worth).
    ledger: Mutex<Vec<u64>>,
}

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
            ledger: Mutex::new(Vec::new()),
        }
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
    pub(crate) fn try_acquire(&self, position: u64, now: u64) -> bool {
        let mut ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        let w = self.window;
        let latest = self.arrivals.load(Ordering::Relaxed).max(1) - 1;
        let position = position.min(latest);
        // Requests older than this are not hedged any more, and positions
        // older than that are forgotten: they share no window with a request
        // that may still be hedged.
        if position + 3 * w < latest {
            return false;
        }
        let forget = ledger.partition_point(|&p| p + 4 * w < latest);
        ledger.drain(..forget);

        let lowest = (latest + 1).saturating_sub(w);
        let by_ratio = (latest + 1 - lowest) * self.ratio_ppm / 1_000_000;
        let started = self.slot_started[((lowest >> self.slot_shift) % SLOTS) as usize]
            .load(Ordering::Relaxed);
        let span = now.saturating_sub(started).max(1_000_000_000);
        let by_time =
            u64::try_from(u128::from(self.min_per_second) * u128::from(span) / 1_000_000_000)
                .unwrap_or(u64::MAX);

        // The requests seen so far: the last `window` of them carry less than
        // their share (or the per-second floor).
        let recent = (ledger.len() - ledger.partition_point(|&p| p < lowest)) as u64;
        if recent >= by_ratio.max(by_time).min(w) {
            return false;
        }
        // Every run of `window` positions around this request, with it.
        let cap = (w * self.ratio_ppm / 1_000_000).max(by_time).min(w);
        let at = ledger.partition_point(|&p| p <= position);
        let first = ledger.partition_point(|&p| p + w <= position); // p >= position - w + 1
        let count_from = |start: u64| {
            // hedges in [start, start + w), counting the new one
            let lo = ledger.partition_point(|&p| p < start);
            let hi = ledger.partition_point(|&p| p < start + w);
            (hi - lo) as u64 + 1
        };
        let crowded =
            (first..at).any(|i| count_from(ledger[i]) > cap) || count_from(position) > cap;
        if crowded {
            return false;
        }
        ledger.insert(at, position);
        true
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

    proptest! {
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
