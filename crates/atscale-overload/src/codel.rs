//! CoDel's control law (RFC 8289), applied to the admission queue.
//!
//! The queue is *standing* when the oldest waiter has been older than
//! `target` for at least `interval`; from then on CoDel drops the oldest
//! waiter at intervals of `interval / sqrt(count)`, exactly as RFC 8289's
//! `dequeue` drops packets, and the queue serves newest-first (adaptive LIFO)
//! until the oldest waiter is younger than `target` again or the queue is down
//! to one waiter.

use std::time::Duration;

/// CoDel's two parameters (RFC 8289 §4.2, §4.3): a queue delay that is
/// acceptable to stand (`target`, 5 ms by default) and the window over which
/// it must persist before the queue counts as standing (`interval`, 100 ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoDel {
    target: Duration,
    interval: Duration,
}

impl Default for CoDel {
    fn default() -> Self {
        CoDel {
            target: Duration::from_millis(5),
            interval: Duration::from_millis(100),
        }
    }
}

impl CoDel {
    /// `target` and `interval`; `target` must be positive and shorter than `interval`.
    pub fn new(target: Duration, interval: Duration) -> Result<Self, crate::ConfigError> {
        if target.is_zero() {
            return Err(crate::ConfigError::new("codel.target", "must be positive"));
        }
        if target >= interval {
            return Err(crate::ConfigError::new(
                "codel.target",
                "must be shorter than codel.interval",
            ));
        }
        Ok(CoDel { target, interval })
    }

    /// The acceptable standing queue delay.
    pub const fn target(&self) -> Duration {
        self.target
    }

    /// How long the delay must stay above `target` before CoDel acts.
    pub const fn interval(&self) -> Duration {
        self.interval
    }
}

/// What CoDel sees of a queue: the age of its head and dropping it.
pub(crate) trait Head {
    /// The time the head has waited at `now`, and how many waiters would remain
    /// once it left; `None` when the queue is empty.
    fn head(&self, now: u64) -> Option<(u64, usize)>;
    /// Drops the head (a refusal, here).
    fn drop_head(&mut self, now: u64);
}

/// RFC 8289's state: `first_above_time`, `drop_next`, `count`, `lastcount`,
/// `dropping`; times in nanoseconds of the layer's clock.
#[derive(Clone, Debug)]
pub(crate) struct Codel {
    target: u64,
    interval: u64,
    first_above_time: u64,
    drop_next: u64,
    count: u32,
    lastcount: u32,
    dropping: bool,
}

impl Codel {
    pub(crate) fn new(params: CoDel) -> Self {
        Codel {
            target: nanos(params.target),
            interval: nanos(params.interval),
            first_above_time: 0,
            drop_next: 0,
            count: 0,
            lastcount: 0,
            dropping: false,
        }
    }

    /// Whether CoDel is in its dropping state: the queue is standing.
    pub(crate) fn standing(&self) -> bool {
        self.dropping
    }

    /// RFC 8289 `dodequeue`, on the head without removing it: whether it is
    /// ok to drop. `None` when the queue is empty.
    fn judge(&mut self, now: u64, queue: &impl Head) -> Option<bool> {
        let Some((sojourn, remaining)) = queue.head(now) else {
            self.first_above_time = 0;
            return None;
        };
        // `bytes() <= MAXPACKET`: at most one (unit-size) waiter would remain.
        if sojourn < self.target || remaining <= 1 {
            self.first_above_time = 0;
            return Some(false);
        }
        if self.first_above_time == 0 {
            self.first_above_time = now.saturating_add(self.interval).max(1);
            Some(false)
        } else {
            Some(now >= self.first_above_time)
        }
    }

    /// RFC 8289 `dequeue`: drops heads per the control law; returns whether
    /// something is left to serve. The caller then serves one waiter (the
    /// head, or the newest when [`standing`](Self::standing)).
    pub(crate) fn dequeue(&mut self, now: u64, queue: &mut impl Head) -> bool {
        let Some(mut ok_to_drop) = self.judge(now, queue) else {
            self.dropping = false;
            return false;
        };
        if self.dropping {
            if !ok_to_drop {
                self.dropping = false;
            }
            while self.dropping && now >= self.drop_next {
                queue.drop_head(now);
                self.count += 1;
                match self.judge(now, queue) {
                    None => {
                        self.dropping = false;
                        return false;
                    }
                    Some(ok) => ok_to_drop = ok,
                }
                if !ok_to_drop {
                    self.dropping = false;
                } else {
                    self.drop_next = self.control_law(self.drop_next);
                }
            }
        } else if ok_to_drop {
            queue.drop_head(now);
            let left = self.judge(now, queue);
            self.dropping = true;
            let delta = self.count.wrapping_sub(self.lastcount);
            self.count = 1;
            if delta > 1 && now.wrapping_sub(self.drop_next) < 16 * self.interval {
                self.count = delta;
            }
            self.drop_next = self.control_law(now);
            self.lastcount = self.count;
            if left.is_none() {
                return false;
            }
        }
        true
    }

    /// `t + interval / sqrt(count)`.
    fn control_law(&self, t: u64) -> u64 {
        t + (self.interval as f64 / f64::from(self.count.max(1)).sqrt()) as u64
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    const MS: u64 = 1_000_000;

    /// RFC 8289 §5's pseudocode, transcribed line by line over a FIFO of
    /// unit-size packets (MAXPACKET = 1, so `bytes()` is the packet count).
    struct Rfc {
        queue: VecDeque<u64>,
        target: u64,
        interval: u64,
        first_above_time: u64,
        drop_next: u64,
        count: u32,
        lastcount: u32,
        dropping: bool,
        log: Vec<(u64, &'static str, u64)>,
    }

    struct DodequeueResult {
        p: Option<u64>,
        ok_to_drop: bool,
    }

    impl Rfc {
        fn dodequeue(&mut self, now: u64) -> DodequeueResult {
            let mut r = DodequeueResult {
                p: self.queue.pop_front(),
                ok_to_drop: false,
            };
            let Some(tstamp) = r.p else {
                self.first_above_time = 0;
                return r;
            };
            let sojourn_time = now - tstamp;
            if sojourn_time < self.target || self.queue.len() <= 1 {
                self.first_above_time = 0;
            } else if self.first_above_time == 0 {
                self.first_above_time = now + self.interval;
            } else if now >= self.first_above_time {
                r.ok_to_drop = true;
            }
            r
        }

        fn control_law(&self, t: u64) -> u64 {
            t + (self.interval as f64 / f64::from(self.count).sqrt()) as u64
        }

        fn drop(&mut self, now: u64, p: Option<u64>) {
            if let Some(p) = p {
                self.log.push((now, "drop", p));
            }
        }

        fn dequeue(&mut self, now: u64) -> Option<u64> {
            let mut r = self.dodequeue(now);
            if self.dropping {
                if !r.ok_to_drop {
                    self.dropping = false;
                }
                while now >= self.drop_next && self.dropping {
                    self.drop(now, r.p);
                    self.count += 1;
                    r = self.dodequeue(now);
                    if !r.ok_to_drop {
                        self.dropping = false;
                    } else {
                        self.drop_next = self.control_law(self.drop_next);
                    }
                }
            } else if r.ok_to_drop {
                self.drop(now, r.p);
                r = self.dodequeue(now);
                self.dropping = true;
                let delta = self.count.wrapping_sub(self.lastcount);
                self.count = 1;
                if delta > 1 && now.wrapping_sub(self.drop_next) < 16 * self.interval {
                    self.count = delta;
                }
                self.drop_next = self.control_law(now);
                self.lastcount = self.count;
            }
            if let Some(p) = r.p {
                self.log.push((now, "serve", p));
            }
            r.p
        }
    }

    /// The same FIFO, as the layer's CoDel sees it.
    struct Fifo {
        queue: VecDeque<u64>,
        log: Vec<(u64, &'static str, u64)>,
    }

    impl Head for Fifo {
        fn head(&self, now: u64) -> Option<(u64, usize)> {
            self.queue.front().map(|t| (now - t, self.queue.len() - 1))
        }
        fn drop_head(&mut self, now: u64) {
            let p = self.queue.pop_front().unwrap();
            self.log.push((now, "drop", p));
        }
    }

    fn splitmix(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Runs arrivals and dequeues (1 ms steps, random counts per step) through
    /// both; returns the two logs.
    fn run(
        seed: u64,
        arrivals_per_ms: u64,
        dequeues_per_ms: u64,
        steps: u64,
    ) -> [Vec<(u64, &'static str, u64)>; 2] {
        let params = CoDel::default();
        let mut ours = Codel::new(params);
        let mut fifo = Fifo {
            queue: VecDeque::new(),
            log: Vec::new(),
        };
        let mut rfc = Rfc {
            queue: VecDeque::new(),
            target: 5 * MS,
            interval: 100 * MS,
            first_above_time: 0,
            drop_next: 0,
            count: 0,
            lastcount: 0,
            dropping: false,
            log: Vec::new(),
        };
        let mut rng = seed;
        for step in 1..=steps {
            let now = step * MS;
            for _ in 0..splitmix(&mut rng) % (arrivals_per_ms + 1) {
                fifo.queue.push_back(now);
                rfc.queue.push_back(now);
            }
            for _ in 0..splitmix(&mut rng) % (dequeues_per_ms + 1) {
                rfc.dequeue(now);
                if ours.dequeue(now, &mut fifo) {
                    let p = fifo.queue.pop_front().unwrap();
                    fifo.log.push((now, "serve", p));
                }
                assert_eq!(ours.standing(), rfc.dropping, "dropping state at {now}");
            }
        }
        [rfc.log, fifo.log]
    }

    #[test]
    fn drops_and_serves_exactly_as_rfc_8289_pseudocode() {
        for seed in 0..20 {
            // Overloaded (arrivals outpace dequeues), balanced, light, and
            // short queues that grow old (the one-packet rule).
            for (a, d) in [(4, 2), (3, 3), (2, 4), (1, 1)] {
                let [rfc, ours] = run(seed, a, d, 3_000);
                assert!(rfc.iter().any(|e| e.1 == "serve"));
                assert_eq!(rfc, ours, "seed {seed}, arrivals {a}, dequeues {d}");
                if (a, d) == (4, 2) {
                    assert!(rfc.iter().any(|e| e.1 == "drop"), "overload must drop");
                }
            }
        }
    }

    #[test]
    fn drop_intervals_shrink_as_interval_over_sqrt_count() {
        // A queue that never drains: one dequeue per ms, two arrivals per ms.
        let mut codel = Codel::new(CoDel::default());
        let mut fifo = Fifo {
            queue: VecDeque::new(),
            log: Vec::new(),
        };
        for step in 1..=1_000u64 {
            let now = step * MS;
            fifo.queue.push_back(now);
            fifo.queue.push_back(now);
            if codel.dequeue(now, &mut fifo) {
                fifo.queue.pop_front();
            }
        }
        let drops: Vec<u64> = fifo
            .log
            .iter()
            .filter(|e| e.1 == "drop")
            .map(|e| e.0 / MS)
            .collect();
        // The head (half as old as the clock: two arrivals, one dequeue per
        // ms) is 5 ms old at t = 10 ms; it stays above target, so the first
        // drop comes one interval later, the next ones at drop_next += 100 /
        // sqrt(count) ms, each at the first dequeue (1 ms grid) at or after it.
        assert_eq!(drops[0], 110);
        let mut drop_next: f64 = 210.0;
        for (n, &at) in drops.iter().enumerate().skip(1).take(10) {
            assert_eq!(at, drop_next.ceil() as u64, "drop {n}: {drops:?}");
            drop_next += 100.0 / ((n + 1) as f64).sqrt();
        }
    }
}
