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
