//! The deadline a request must finish by, and where it came from.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

/// Where a [`Deadline`] came from.
///
/// The distinction matters when a deadline fires: a local budget that is too
/// tight is this service's bug; an inherited one is the caller's choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Origin {
    /// This hop's own budget (`DeadlineLayer::new(budget)` or [`Deadline::after`]).
    Local,
    /// Inherited in-process from the enclosing request's context.
    Parent,
    /// Inherited from the caller's `grpc-timeout` header.
    GrpcTimeout,
    /// Inherited from the caller's HTTP deadline header (a budget in milliseconds).
    Header,
}

impl Origin {
    /// Whether the deadline was chosen by a caller rather than by this hop.
    pub const fn is_inherited(self) -> bool {
        !matches!(self, Origin::Local)
    }

    /// A short lower-case name: `local`, `parent`, `grpc-timeout` or `header`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Origin::Local => "local",
            Origin::Parent => "parent",
            Origin::GrpcTimeout => "grpc-timeout",
            Origin::Header => "header",
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// An instant a request must finish by, the budget it was set with, and its [`Origin`].
///
/// Instants are [`tokio::time::Instant`]s, so a paused test clock drives them.
/// A budget too large to add to the current instant (for example
/// [`Duration::MAX`]) means "no deadline": see [`Deadline::after`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    at: Instant,
    budget: Duration,
    origin: Origin,
}

impl Deadline {
    /// A deadline `budget` from `now`, or `None` when the sum overflows the clock
    /// (a budget so large it is no deadline at all).
    pub fn after(now: Instant, budget: Duration, origin: Origin) -> Option<Self> {
        now.checked_add(budget)
            .map(|at| Deadline { at, budget, origin })
    }

    /// A deadline at an absolute instant; `budget` records how much time it allowed.
    pub const fn at(at: Instant, budget: Duration, origin: Origin) -> Self {
        Deadline { at, budget, origin }
    }

    /// The instant the request must finish by.
    pub const fn instant(&self) -> Instant {
        self.at
    }

    /// The budget the deadline was set with, at the hop that set it.
    pub const fn budget(&self) -> Duration {
        self.budget
    }

    /// Where the deadline came from.
    pub const fn origin(&self) -> Origin {
        self.origin
    }

    /// Time left at `now`, zero once passed.
    pub fn remaining_at(&self, now: Instant) -> Duration {
        self.at.saturating_duration_since(now)
    }

    /// Time left now, zero once passed.
    pub fn remaining(&self) -> Duration {
        self.remaining_at(Instant::now())
    }

    /// Whether the deadline has passed at `now` (a deadline at `now` has passed).
    pub fn is_expired_at(&self, now: Instant) -> bool {
        self.at <= now
    }

    /// The earlier of two optional deadlines; ties keep `self`.
    pub fn earliest(a: Option<Deadline>, b: Option<Deadline>) -> Option<Deadline> {
        match (a, b) {
            (Some(a), Some(b)) if b.at < a.at => Some(b),
            (Some(a), _) => Some(a),
            (None, b) => b,
        }
    }

    /// The same instant seen from a child hop: the budget becomes what is left
    /// at `now` and the origin becomes `origin`.
    pub fn inherited(self, now: Instant, origin: Origin) -> Deadline {
        Deadline {
            at: self.at,
            budget: self.remaining_at(now),
            origin,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn duration_max_is_no_deadline() {
        assert!(Deadline::after(Instant::now(), Duration::MAX, Origin::Local).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn earliest_prefers_the_earlier_instant() {
        let now = Instant::now();
        let a = Deadline::after(now, Duration::from_secs(2), Origin::Local);
        let b = Deadline::after(now, Duration::from_secs(1), Origin::Header);
        assert_eq!(Deadline::earliest(a, b), b);
        assert_eq!(Deadline::earliest(b, a), b);
        assert_eq!(Deadline::earliest(None, a), a);
        assert_eq!(Deadline::earliest(a, None), a);
        // ties keep the first
        let c = Deadline::after(now, Duration::from_secs(2), Origin::Parent);
        assert_eq!(Deadline::earliest(a, c).unwrap().origin(), Origin::Local);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_at_now_has_passed() {
        let now = Instant::now();
        let d = Deadline::after(now, Duration::ZERO, Origin::Local).unwrap();
        assert!(d.is_expired_at(now));
        assert_eq!(d.remaining_at(now + Duration::from_secs(1)), Duration::ZERO);
        let d = Deadline::after(now, Duration::from_millis(5), Origin::Local).unwrap();
        assert!(!d.is_expired_at(now));
        assert_eq!(d.remaining_at(now), Duration::from_millis(5));
    }
}
