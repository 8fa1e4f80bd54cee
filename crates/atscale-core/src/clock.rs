//! A fast clock for hot paths that tokio's paused test clock can still drive.

use std::fmt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static DEFAULT: OnceLock<Clock> = OnceLock::new();

/// The time source of the layers' hot paths (rate-limit buckets, hedge
/// latencies and budgets): a fast one for production, and one that tokio's
/// paused test clock drives. Timers are always tokio's (`tokio::time::sleep`),
/// for the durations this clock computed.
///
/// - [`Clock::quanta`] (the default): the TSC through the `quanta` crate,
///   a few nanoseconds per read (`std::time::Instant::now()` costs about
///   25 ns, most of a rate-limit check). It is not driven by
///   `tokio::time::pause`.
/// - [`Clock::tokio`]: `tokio::time::Instant::now()`, which follows
///   `tokio::time::pause()` / `advance()` and `#[tokio::test(start_paused = true)]`.
///   Use it in tests.
///
/// Readings are nanoseconds since the clock's epoch; two clocks share an
/// epoch only if they have the same [`id`](Clock::id) (every `quanta()`
/// is the same clock; every `tokio()` call makes a new one).
///
/// ```
/// use std::time::Duration;
/// use atscale_core::Clock;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let clock = Clock::tokio(); // share it between the limiters of a test
/// tokio::time::advance(Duration::from_millis(3)).await;
/// assert_eq!(clock.now_nanos(), 3_000_000);
/// # }
/// ```
#[derive(Clone)]
pub struct Clock {
    id: u64,
    source: Source,
}

#[derive(Clone)]
enum Source {
    Quanta { clock: quanta::Clock, base: u64 },
    Tokio { epoch: tokio::time::Instant },
}

impl Clock {
    /// The process-wide TSC clock (the default): every call returns the same clock.
    pub fn quanta() -> Clock {
        DEFAULT
            .get_or_init(|| {
                let clock = quanta::Clock::new();
                let base = clock.raw();
                Clock::from_source(Source::Quanta { clock, base })
            })
            .clone()
    }

    /// A clock reading `tokio::time::Instant::now()`, with its epoch now.
    ///
    /// Each call makes a new clock: create one and clone it for every limiter
    /// that may be combined with another.
    pub fn tokio() -> Clock {
        Clock::from_source(Source::Tokio {
            epoch: tokio::time::Instant::now(),
        })
    }

    fn from_source(source: Source) -> Clock {
        Clock {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            source,
        }
    }

    /// Nanoseconds since the clock's epoch.
    #[inline(always)]
    pub fn now_nanos(&self) -> u64 {
        match &self.source {
            Source::Quanta { clock, base } => clock.delta_as_nanos(*base, clock.raw()),
            Source::Tokio { epoch } => {
                let d = tokio::time::Instant::now().saturating_duration_since(*epoch);
                u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
            }
        }
    }

    /// Which clock this is: readings of clocks with the same id share an epoch
    /// and can be compared.
    pub const fn id(&self) -> u64 {
        self.id
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::quanta()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.source {
            Source::Quanta { .. } => "quanta",
            Source::Tokio { .. } => "tokio",
        };
        f.debug_struct("Clock")
            .field("id", &self.id)
            .field("source", &kind)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_follows_the_paused_clock() {
        let clock = Clock::tokio();
        assert_eq!(clock.now_nanos(), 0);
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(clock.now_nanos(), 1_500_000_000);
    }

    #[test]
    fn the_quanta_clock_keeps_pace_with_the_system_clock() {
        // The thing under test is a real clock, so it is read against the
        // system's monotonic clock (no sleeping: the loop ends on its own).
        // Each quanta reading is bracketed by two system readings, so being
        // descheduled between reads only widens the bracket; the bounds
        // (half to twice the system's time) leave room for quanta's
        // calibration on a loaded machine and still catch a clock that
        // stands still, runs in the wrong unit or at a wrong rate.
        let clock = Clock::quanta();
        let before = std::time::Instant::now();
        let a = clock.now_nanos();
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(10) {
            std::hint::spin_loop();
        }
        let end = std::time::Instant::now();
        let b = clock.now_nanos();
        let after = std::time::Instant::now();
        let moved = Duration::from_nanos(b - a);
        let (least, most) = (end - start, after - before);
        assert!(
            moved >= least / 2 && moved <= most * 2,
            "quanta moved {moved:?} while the system clock moved {least:?} to {most:?}"
        );
    }

    #[test]
    fn the_quanta_clock_is_shared_and_moves_forward() {
        let a = Clock::quanta();
        assert_eq!(a.id(), Clock::default().id());
        let t0 = a.now_nanos();
        std::hint::black_box((0..10_000).sum::<u64>());
        assert!(a.now_nanos() >= t0);
        assert_ne!(Clock::tokio().id(), Clock::tokio().id());
    }
}
