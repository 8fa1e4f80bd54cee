//! What to hedge, when, and how much: the delay, the budget, the outcome
//! classifier and the replica picker.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::shared::DelaySource;

/// When the next attempt is sent.
///
/// - [`Delay::fixed`]: after a fixed time without a good answer (gRPC's
///   `hedgingDelay`). [`Duration::ZERO`] sends every attempt at once
///   (replicated requests).
/// - [`Delay::adaptive`]: after a percentile of the recent latencies (a
///   rolling window recorded at microsecond resolution), and not at all until
///   the window holds enough samples. Unless set, the percentile follows the
///   budget (see [`Adaptive::percentile`]).
///
/// Attempt `k` (counting from 0) is sent `k` delays after the first unless a
/// non-fatal failure ([`Verdict::NonFatal`]) fires it earlier; with an
/// adaptive delay whose percentile follows the budget, a request that
/// reaches the delay sends all its hedges at once instead. The delay counts
/// from the first poll of the response future that finds the first attempt
/// pending (no timer is set for a request answered on its first poll).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Delay {
    pub(crate) kind: DelayKind,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum DelayKind {
    Fixed(Duration),
    Adaptive(Adaptive),
}

/// The settings of an adaptive delay; see [`Delay::adaptive`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adaptive {
    /// `None`: derived from the budget.
    pub(crate) percentile: Option<f64>,
    pub(crate) min_samples: u32,
    pub(crate) window: Duration,
}

impl Delay {
    /// Sends the next attempt after `delay` without a good answer;
    /// [`Duration::ZERO`] sends every attempt at once.
    pub const fn fixed(delay: Duration) -> Self {
        Delay {
            kind: DelayKind::Fixed(delay),
        }
    }

    /// An adaptive delay: a percentile of the latencies seen over the last 2
    /// seconds, once at least 100 of them were seen; the percentile follows
    /// the budget unless [set](Adaptive::percentile) (97.5th with the default
    /// 5% budget and 2 attempts). Tune it with [`Adaptive::percentile`],
    /// [`Adaptive::min_samples`] and [`Adaptive::window`], then pass it to
    /// [`HedgeBuilder::delay`](crate::HedgeBuilder::delay).
    pub const fn adaptive() -> Adaptive {
        Adaptive {
            percentile: None,
            min_samples: 100,
            window: Duration::from_secs(2),
        }
    }
}

impl Default for Delay {
    fn default() -> Self {
        Delay::adaptive().into()
    }
}

impl Adaptive {
    /// The latency percentile to hedge at, in `(0, 1]`: `0.9` sends a backup
    /// for the slowest 10% of requests, then one more every delay while the
    /// request waits, as far as the budget allows. The first requests to
    /// ask get the budget: when more ask than it allows (after a slowdown
    /// that hits everyone, say), the slowest may be left with none.
    ///
    /// Unset (the default), the percentile follows the budget, and the budget
    /// goes to the requests that need it most:
    ///
    /// - with a [`Budget::ratio`] `r`, the delay is the `1 - r / 2`
    ///   percentile (0.975 for the default 5%): in a steady state, `r / 2`
    ///   of the requests wait that long;
    /// - a request that reaches the delay sends all its hedges at once (with
    ///   [`max_attempts`](crate::HedgeBuilder::max_attempts) above 2): the
    ///   requests that wait that long are the stragglers, and two copies cut
    ///   their tail far more than one (where one would do, the second
    ///   doubles the extra load: 2% instead of 1% in the benchmark's heavy
    ///   tail, for a 99.9th percentile 1-2 ms lower);
    /// - half of the budget is kept for stragglers — requests still waiting
    ///   when nearly all of those that arrived just before them, and some of
    ///   those just after, have their answer — and for requests whose
    ///   attempts failed. Right after a slowdown the window still holds the
    ///   old latencies and every request asks: the first to ask can only take
    ///   the other half, and the stragglers among them are told apart once
    ///   their neighbours finish;
    /// - a request the budget refuses asks again a quarter of a delay later
    ///   (one delay with a percentile set by hand).
    ///
    /// In the benchmark's 10x slowdown (3 attempts), this keeps the 99.9th
    /// percentile at 268-274 ms within a 5% budget in every block of 2,000
    /// requests, where a hand-set 0.9 leaves it at 5 s and tower's hedge
    /// (no budget, 28% extra in the first block) gives 276-278 ms
    /// (`benches/README.md`). With [`Budget::unlimited`], the unset
    /// percentile is 0.95, one hedge per delay.
    #[must_use]
    pub const fn percentile(mut self, percentile: f64) -> Self {
        self.percentile = Some(percentile);
        self
    }

    /// How many latencies the window must hold before any hedge is sent
    /// (default 100). Below it, requests are sent once.
    #[must_use]
    pub const fn min_samples(mut self, min_samples: u32) -> Self {
        self.min_samples = min_samples;
        self
    }

    /// How far back latencies count (default 2 s). The window is kept as two
    /// halves: the percentile covers the current half and the previous one,
    /// so between `window / 2` and `window` of history.
    #[must_use]
    pub const fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }
}

impl Adaptive {
    /// The percentile hedges fire at, and whether a request sends all its
    /// hedges at once when it gets there (the percentile follows the budget).
    pub(crate) fn resolve(&self, budget: &Budget) -> (f64, bool) {
        match (self.percentile, budget.kind) {
            (Some(p), _) => (p, false),
            (None, BudgetKind::Limited { ratio, .. }) => (budget_percentile(ratio), true),
            (None, BudgetKind::Unlimited) => (0.95, false),
        }
    }
}

/// The percentile that follows a budget of `ratio` extra load:
/// `1 - ratio / 2`, kept within `[0.5, 1]`.
pub(crate) fn budget_percentile(ratio: f64) -> f64 {
    (1.0 - ratio / 2.0).clamp(0.5, 1.0)
}

/// The share of the budget kept for stragglers and for requests whose
/// attempts failed, when the percentile follows the budget.
pub(crate) const TAIL_RESERVE: f64 = 0.5;

/// The budget's reserve for a delay (see [`TAIL_RESERVE`]).
pub(crate) fn tail_reserve(delay: &DelaySource) -> f64 {
    match delay {
        DelaySource::Adaptive(w) if w.sends_together() => TAIL_RESERVE,
        _ => 0.0,
    }
}

impl From<Adaptive> for Delay {
    fn from(adaptive: Adaptive) -> Self {
        Delay {
            kind: DelayKind::Adaptive(adaptive),
        }
    }
}

/// How much extra load hedges may add.
///
/// Every hedge is charged to the request it copies, and is sent only if
/// every run of `window` consecutive requests around that request then
/// carries at most `ratio × window` hedges — or `min_per_second` per second
/// over the time those requests took, whichever allows more, so a quiet
/// service can still hedge. The share is also checked against the requests
/// actually seen, so a service that just started cannot borrow from requests
/// to come.
///
/// Counting in requests rather than seconds is what makes the budget hold
/// right after a latency shift: a window measured in time would still hold
/// the fast requests from before the shift and lend their allowance to the
/// slow requests after it (tower's hedge sends 28% extra in the first 2,000
/// requests after a 10x slowdown; this budget 5.0%).
///
/// Concretely, with the default `ratio(0.05)` and `window(1000)`: any 1,000
/// consecutive requests carry at most 50 hedges, so any 2,000 at most 100.
/// A request the budget refuses asks again later, while it still waits. With
/// a percentile set by hand the first requests to ask get the budget; left
/// unset, the percentile follows the budget and half of it is kept for the
/// stragglers (see [`Adaptive::percentile`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    pub(crate) kind: BudgetKind,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum BudgetKind {
    Limited {
        ratio: f64,
        min_per_second: u32,
        window: u32,
    },
    Unlimited,
}

impl Budget {
    /// Hedges may add `ratio` extra load (`0.05` = 5%), at least one per
    /// second, counted over the last 1,000 requests.
    pub const fn ratio(ratio: f64) -> Self {
        Budget {
            kind: BudgetKind::Limited {
                ratio,
                min_per_second: 1,
                window: 1000,
            },
        }
    }

    /// No limit: every attempt the delay asks for is sent. Meant for
    /// replicated requests ([`Delay::fixed`] with [`Duration::ZERO`]) and
    /// tests; anywhere else a latency shift doubles the load.
    pub const fn unlimited() -> Self {
        Budget {
            kind: BudgetKind::Unlimited,
        }
    }

    /// The per-second floor (default 1): this many hedges per second are
    /// allowed even when the ratio allows fewer. Without effect on an
    /// unlimited budget.
    #[must_use]
    pub const fn min_per_second(mut self, min_per_second: u32) -> Self {
        if let BudgetKind::Limited {
            min_per_second: m, ..
        } = &mut self.kind
        {
            *m = min_per_second;
        }
        self
    }

    /// How many of the most recent requests the ratio is counted over
    /// (default 1,000; at least 10). Without effect on an unlimited budget.
    #[must_use]
    pub const fn window(mut self, requests: u32) -> Self {
        if let BudgetKind::Limited { window, .. } = &mut self.kind {
            *window = requests;
        }
        self
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget::ratio(0.05)
    }
}

/// What an attempt's outcome means for the hedged request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// A good answer: it wins, the other attempts are cancelled, and its
    /// latency feeds the adaptive delay.
    Good,
    /// A failure another attempt may fix (unavailable, connection refused):
    /// keep waiting for the attempts in flight and send the next hedge now.
    /// Not recorded as a latency.
    NonFatal,
    /// A final answer (success or failure): return it at once and cancel the
    /// others. Not recorded as a latency.
    Fatal,
}

/// Sorts attempt outcomes into [`Verdict`]s.
///
/// Implemented for closures `Fn(Result<&Res, &E>) -> Verdict`, and by
/// [`ErrorsAreFatal`], the default.
///
/// # Example
///
/// ```
/// use atscale_hedge::Verdict;
///
/// // An HTTP client: 503 and connection errors may be fixed by another replica.
/// let classify = |outcome: Result<&http::Response<()>, &std::io::Error>| match outcome {
///     Ok(res) if res.status() == http::StatusCode::SERVICE_UNAVAILABLE => Verdict::NonFatal,
///     Ok(_) => Verdict::Good,
///     Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Verdict::NonFatal,
///     Err(_) => Verdict::Fatal,
/// };
/// # let _ = classify;
/// ```
pub trait Classify<Res, E> {
    /// Judges one attempt's outcome.
    fn classify(&self, outcome: Result<&Res, &E>) -> Verdict;
}

impl<F, Res, E> Classify<Res, E> for F
where
    F: Fn(Result<&Res, &E>) -> Verdict,
{
    fn classify(&self, outcome: Result<&Res, &E>) -> Verdict {
        self(outcome)
    }
}

/// The default [`Classify`]: every response is [`Verdict::Good`], every
/// error [`Verdict::Fatal`] (as gRPC's hedging policy with no non-fatal
/// status codes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorsAreFatal;

impl<Res, E> Classify<Res, E> for ErrorsAreFatal {
    fn classify(&self, outcome: Result<&Res, &E>) -> Verdict {
        match outcome {
            Ok(_) => Verdict::Good,
            Err(_) => Verdict::Fatal,
        }
    }
}

/// Chooses the replica a request's first attempt goes to (see
/// [`HedgeLayer::replicas`](crate::HedgeLayer::replicas)). Attempt `k` then
/// goes to replica `(first + k) % replicas`, so a backup never lands on the
/// replica that is being slow.
///
/// Implemented for closures `Fn(&Req, usize) -> usize` (the request and the
/// number of replicas; the result is taken modulo the number of replicas) and
/// by [`RoundRobin`], the default.
pub trait Pick<Req> {
    /// The replica (an index below `replicas`) for `req`'s first attempt.
    fn pick(&self, req: &Req, replicas: usize) -> usize;
}

impl<F, Req> Pick<Req> for F
where
    F: Fn(&Req, usize) -> usize,
{
    fn pick(&self, req: &Req, replicas: usize) -> usize {
        self(req, replicas)
    }
}

/// The default [`Pick`]: first attempts go to the replicas in turn. Clones
/// share the turn.
#[derive(Clone, Debug, Default)]
pub struct RoundRobin {
    next: Arc<AtomicUsize>,
}

impl<Req> Pick<Req> for RoundRobin {
    fn pick(&self, _req: &Req, replicas: usize) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % replicas.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_percentile_follows_the_budget_unless_set() {
        let adaptive = Delay::adaptive();
        assert_eq!(adaptive.resolve(&Budget::ratio(0.05)), (0.975, true));
        assert_eq!(adaptive.resolve(&Budget::ratio(0.2)), (0.9, true));
        assert_eq!(adaptive.resolve(&Budget::unlimited()), (0.95, false));
        let set = adaptive.percentile(0.9);
        assert_eq!(set.resolve(&Budget::ratio(0.05)), (0.9, false));
        assert_eq!(set.resolve(&Budget::unlimited()), (0.9, false));
    }

    proptest! {
        /// The stragglers past the derived percentile are at most half the
        /// budget's share of requests, and the percentile stays in `[0.5, 1]`.
        #[test]
        fn the_derived_percentile_leaves_half_the_budget(ratio in 0.0f64..4.0) {
            let p = budget_percentile(ratio);
            prop_assert!((0.5..=1.0).contains(&p));
            prop_assert!(1.0 - p <= ratio / 2.0 + 1e-12);
            if ratio <= 1.0 {
                prop_assert!((1.0 - p - ratio / 2.0).abs() < 1e-12);
            }
        }
    }
}
