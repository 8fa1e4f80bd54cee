//! The clock latencies and budget spans are measured with.

use std::fmt;
use std::sync::OnceLock;

static QUANTA: OnceLock<(quanta::Clock, u64)> = OnceLock::new();

/// The time source a hedge measures latencies (for the adaptive delay) and
/// budget spans (for the per-second floor) with. Timers — when a hedge is
/// sent, the request's deadline — always run on tokio's clock.
///
/// - [`Clock::quanta`] (the default): the TSC through the `quanta` crate, a
///   few nanoseconds per read, against about 20 ns for
///   `std::time::Instant::now()`; an adaptive hedge reads it twice per
///   request. It is not driven by `tokio::time::pause`.
/// - [`Clock::tokio`]: `tokio::time::Instant::now()`, which follows
///   `tokio::time::pause()` / `advance()` and
///   `#[tokio::test(start_paused = true)]`. Use it in tests of adaptive
///   delays: on a paused clock, the default clock sees every latency as
///   about zero.
///
/// ```
/// use std::time::Duration;
/// use atscale_hedge::{Clock, Delay, HedgeLayer};
///
/// let for_tests = HedgeLayer::builder()
///     .delay(Delay::adaptive())
///     .clock(Clock::tokio())
///     .build()?;
/// # Ok::<(), atscale_hedge::InvalidConfig>(())
/// ```
#[derive(Clone)]
pub struct Clock {
    source: Source,
}

#[derive(Clone)]
enum Source {
    Quanta { clock: quanta::Clock, base: u64 },
    Tokio { epoch: tokio::time::Instant },
}

impl Clock {
    /// The process-wide TSC clock (the default).
    pub fn quanta() -> Clock {
        let (clock, base) = QUANTA.get_or_init(|| {
            let clock = quanta::Clock::new();
            let base = clock.raw();
            (clock, base)
        });
        Clock {
            source: Source::Quanta {
                clock: clock.clone(),
                base: *base,
            },
        }
    }

    /// A clock reading `tokio::time::Instant::now()`, with its epoch now.
    pub fn tokio() -> Clock {
        Clock {
            source: Source::Tokio {
                epoch: tokio::time::Instant::now(),
            },
        }
    }

    /// Nanoseconds since the clock's epoch.
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        match &self.source {
            Source::Quanta { clock, base } => clock.delta_as_nanos(*base, clock.raw()),
            Source::Tokio { epoch } => {
                let d = tokio::time::Instant::now().saturating_duration_since(*epoch);
                u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
            }
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::quanta()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self.source {
            Source::Quanta { .. } => "Clock::quanta",
            Source::Tokio { .. } => "Clock::tokio",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_follows_the_paused_clock() {
        let clock = Clock::tokio();
        assert_eq!(clock.now(), 0);
        tokio::time::advance(Duration::from_millis(3)).await;
        assert_eq!(clock.now(), 3_000_000);
    }

    #[test]
    fn the_quanta_clock_keeps_pace_with_the_system_clock() {
        // The thing under test is a real clock, so it is read against the
        // system's monotonic clock (no sleeping: the loop ends on its own).
        let clock = Clock::quanta();
        let (a, start) = (clock.now(), std::time::Instant::now());
        while start.elapsed() < Duration::from_millis(2) {
            std::hint::spin_loop();
        }
        let (moved, system) = (clock.now() - a, start.elapsed());
        assert!(
            moved >= 1_800_000,
            "quanta moved {moved} ns while the system clock moved {system:?}"
        );
    }
}
