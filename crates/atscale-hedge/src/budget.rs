//! The hedge budget: a sliding window counted in requests, so the allowance
//! follows the traffic and cannot be borrowed from before a latency shift.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use tokio::time::Instant;

/// Request start times are noted once per `window / SLOTS` requests, to
/// measure how long the window took (for the per-second floor).
const SLOTS: u64 = 10;

/// Shared by every clone of a hedged service.
///
/// The hot path (once per request) is [`HedgeBudget::arrive`]: one atomic
/// add, and one store every `window / 10` requests. The ledger of hedges sent
/// sits behind a short lock taken only when a hedge is about to be sent.
///
/// Invariant: each hedge is charged to the position of the latest request
/// (its arrival count), and is granted only while fewer than the allowance
/// were charged to the last `window` positions. So *every* run of `window`
/// consecutive requests — aligned or not — carries at most one allowance of
/// hedges: when the last of them was granted, the check saw all the others.
#[derive(Debug)]
pub(crate) struct HedgeBudget {
    ratio_ppm: u64,
    min_per_second: u64,
    window: u64,
    slot_len: u64,
    origin: Instant,
    arrivals: AtomicU64,
    slot_started: [AtomicU64; SLOTS as usize],
    /// Positions of the hedges granted within the window, oldest first.
    ledger: Mutex<VecDeque<u64>>,
}

impl HedgeBudget {
    pub(crate) fn new(ratio: f64, min_per_second: u32, window: u32) -> Self {
        let window = u64::from(window).max(SLOTS);
        HedgeBudget {
            ratio_ppm: (ratio * 1_000_000.0).round() as u64,
            min_per_second: u64::from(min_per_second),
            window,
            slot_len: window / SLOTS,
            origin: Instant::now(),
            arrivals: AtomicU64::new(0),
            slot_started: Default::default(),
            ledger: Mutex::new(VecDeque::new()),
        }
    }

    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Counts one request.
    pub(crate) fn arrive(&self, now: Instant) {
        let n = self.arrivals.fetch_add(1, Ordering::Relaxed);
        if n % self.slot_len == 0 {
            let slot = n / self.slot_len;
            self.slot_started[(slot % SLOTS) as usize].store(self.nanos(now), Ordering::Relaxed);
        }
    }

    /// Requests counted so far.
    pub(crate) fn arrivals(&self) -> u64 {
        self.arrivals.load(Ordering::Relaxed)
    }

    /// Takes one hedge from the budget, if the budget has one.
    pub(crate) fn try_acquire(&self, now: Instant) -> bool {
        let mut ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        // Read under the lock, so positions enter the ledger in order.
        let latest = self.arrivals.load(Ordering::Relaxed).max(1) - 1;
        let lowest = (latest + 1).saturating_sub(self.window);
        let by_ratio = (latest + 1 - lowest) * self.ratio_ppm / 1_000_000;
        let started =
            self.slot_started[((lowest / self.slot_len) % SLOTS) as usize].load(Ordering::Relaxed);
        let span = self.nanos(now).saturating_sub(started).max(1_000_000_000);
        let by_time =
            u64::try_from(u128::from(self.min_per_second) * u128::from(span) / 1_000_000_000)
                .unwrap_or(u64::MAX);
        // At most one hedge per request on average, whatever the floor says.
        let allowance = by_ratio.max(by_time).min(self.window);

        while ledger.front().is_some_and(|&p| p < lowest) {
            ledger.pop_front();
        }
        if (ledger.len() as u64) < allowance {
            ledger.push_back(latest);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn arrive(b: &HedgeBudget, n: u64) {
        for _ in 0..n {
            b.arrive(Instant::now());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_never_holds_more_than_its_share() {
        let b = HedgeBudget::new(0.05, 0, 1000);
        arrive(&b, 1000);
        let granted = (0..200).filter(|_| b.try_acquire(Instant::now())).count();
        assert_eq!(granted, 50);
        // the next 999 requests bring no new allowance: the window still holds the 50
        arrive(&b, 999);
        assert!(!b.try_acquire(Instant::now()));
        // once the request they were charged to leaves the window, hedges resume
        arrive(&b, 1);
        assert_eq!(
            (0..200).filter(|_| b.try_acquire(Instant::now())).count(),
            50
        );
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_services_get_the_per_second_floor() {
        let b = HedgeBudget::new(0.05, 2, 1000);
        arrive(&b, 3);
        assert!(b.try_acquire(Instant::now()));
        assert!(b.try_acquire(Instant::now()));
        assert!(!b.try_acquire(Instant::now()), "2 per second");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(b.try_acquire(Instant::now()), "the window now spans 2 s");
    }

    proptest! {
        /// Whatever the demand pattern, any 1,000 consecutive requests carry
        /// at most 50 hedges.
        #[test]
        fn every_window_of_requests_holds(demand in proptest::collection::vec(0u8..4, 3000..6000)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            rt.block_on(async {
                let b = HedgeBudget::new(0.05, 0, 1000);
                let mut charged = Vec::with_capacity(demand.len());
                for wants in &demand {
                    b.arrive(Instant::now());
                    let mut got = 0u32;
                    for _ in 0..*wants {
                        if b.try_acquire(Instant::now()) { got += 1; }
                    }
                    charged.push(got);
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
