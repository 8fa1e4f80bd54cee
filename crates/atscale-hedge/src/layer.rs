//! The layer and its builder.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tower::discover::Discover;
use tower_layer::Layer;

use crate::budget::HedgeBudget;
use crate::discover::HedgeDiscover;
use crate::error::InvalidConfig;
use crate::policy::{
    Budget, BudgetKind, Delay, DelayKind, ErrorsAreFatal, RoundRobin, tail_reserve,
};
use crate::service::{Backends, Hedge};
use crate::shared::{Counters, DelaySource, Shared};
use crate::stats::HedgeStats;
use crate::window::LatencyWindow;
use atscale_core::{Clock, RetryThrottle};

/// The most attempts a request may make, as in gRPC's hedging policy.
pub const MAX_ATTEMPTS: u8 = 5;

/// Applies [`Hedge`] to a service: backup attempts when the first is slow,
/// inside a budget of extra load.
///
/// Every service built from one layer (and every clone of them) shares one
/// latency window, one budget and one set of [counters](HedgeStats): build
/// one layer per backend.
///
/// ```
/// use std::time::Duration;
/// use atscale_hedge::{Budget, Delay, HedgeLayer};
///
/// // Presets: a fixed 20 ms delay, or the adaptive defaults (the percentile
/// // follows the budget: the 97.5th for 5%).
/// let fixed = HedgeLayer::fixed(Duration::from_millis(20));
/// let adaptive = HedgeLayer::adaptive();
///
/// // Everything else through the builder.
/// let layer = HedgeLayer::builder()
///     .delay(Delay::adaptive().percentile(0.9).min_samples(200))
///     .max_attempts(3)
///     .budget(Budget::ratio(0.02).min_per_second(5))
///     .build()?;
/// # Ok::<(), atscale_hedge::InvalidConfig>(())
/// ```
#[derive(Clone)]
pub struct HedgeLayer<C = ErrorsAreFatal> {
    shared: Arc<Shared>,
    classify: C,
}

impl<C: std::fmt::Debug> std::fmt::Debug for HedgeLayer<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HedgeLayer")
            .field("delay", &self.shared.delay)
            .field("max_attempts", &self.shared.max_attempts)
            .field("budget", &self.shared.budget)
            .field("non_idempotent", &self.shared.non_idempotent)
            .field("clock", &self.shared.clock)
            .field("classify", &self.classify)
            .finish()
    }
}

impl HedgeLayer {
    /// A builder, starting from the defaults: adaptive delay
    /// ([`Delay::adaptive`]), 2 attempts, a 5% budget ([`Budget::ratio`]),
    /// idempotent requests only, errors fatal ([`ErrorsAreFatal`]).
    pub fn builder() -> HedgeBuilder {
        HedgeBuilder {
            delay: Delay::default(),
            max_attempts: 2,
            budget: Budget::default(),
            non_idempotent: false,
            clock: Clock::default(),
            classify: ErrorsAreFatal,
            throttle: None,
        }
    }

    /// One hedge after `delay` without an answer, within the default 5%
    /// budget; [`Duration::ZERO`] sends both attempts at once.
    pub fn fixed(delay: Duration) -> Self {
        HedgeLayer::builder().delay(Delay::fixed(delay)).assemble()
    }

    /// One hedge at the 97.5th percentile of recent latencies (once 100 were
    /// seen: the percentile that follows the default 5% budget), within it.
    pub fn adaptive() -> Self {
        HedgeLayer::builder().assemble()
    }
}

impl<C> HedgeLayer<C> {
    /// The counters of every service built from this layer.
    pub fn stats(&self) -> HedgeStats {
        HedgeStats {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Has the hedges of every service built from this layer (those built
    /// already too) consult `throttle` (gRFC A6), as
    /// [`HedgeBuilder::throttle`] would have, unless the layer has a
    /// throttle already: `true` when it took this one. The client stacks
    /// call it with their [`RetryThrottle`], so a hedge and the retries to
    /// one backend stop together.
    ///
    /// ```
    /// use std::time::Duration;
    /// use atscale_core::RetryThrottle;
    /// use atscale_hedge::HedgeLayer;
    ///
    /// let hedge = HedgeLayer::fixed(Duration::from_millis(20));
    /// let throttle = RetryThrottle::new(10, 0.1)?;
    /// assert!(hedge.adopt_throttle(&throttle));
    /// // The first one stays.
    /// assert!(!hedge.adopt_throttle(&RetryThrottle::new(100, 0.1)?));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn adopt_throttle(&self, throttle: &RetryThrottle) -> bool {
        self.shared.throttle.set(throttle.clone()).is_ok()
    }

    /// Hedges across distinct replicas of one backend: a request's first
    /// attempt goes to one replica ([`RoundRobin`] by default, or see
    /// [`Hedge::pick`]), attempt `k` to the `k`-th next one, so a backup
    /// never waits on the replica that is slow.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] when `replicas` is empty.
    pub fn replicas<S>(&self, replicas: Vec<S>) -> Result<Hedge<S, C, RoundRobin>, InvalidConfig>
    where
        C: Clone,
    {
        if replicas.is_empty() {
            return Err(InvalidConfig::new("replicas", "the list is empty"));
        }
        Ok(Hedge {
            backends: Backends::Many(Arc::new(replicas)),
            classify: self.classify.clone(),
            pick: RoundRobin::default(),
            shared: Arc::clone(&self.shared),
        })
    }
}

impl<C: Clone> HedgeLayer<C> {
    /// Hedges across the replicas a `tower::discover` source yields (for
    /// example a [`ServiceList`](tower::discover::ServiceList), or a stream
    /// of changes from service discovery), as [`replicas`](Self::replicas)
    /// does for a fixed list.
    pub fn discover<D>(&self, discover: D) -> HedgeDiscover<D, C, RoundRobin>
    where
        D: Discover,
    {
        let hedge = Hedge {
            backends: Backends::Many(Arc::new(Vec::new())),
            classify: self.classify.clone(),
            pick: RoundRobin::default(),
            shared: Arc::clone(&self.shared),
        };
        HedgeDiscover::new(discover, hedge)
    }
}

impl<S, C: Clone> Layer<S> for HedgeLayer<C> {
    type Service = Hedge<S, C>;

    fn layer(&self, inner: S) -> Hedge<S, C> {
        Hedge {
            backends: Backends::One(inner),
            classify: self.classify.clone(),
            pick: RoundRobin::default(),
            shared: Arc::clone(&self.shared),
        }
    }
}

/// Builds a [`HedgeLayer`]; see [`HedgeLayer::builder`] for the defaults.
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until built"]
pub struct HedgeBuilder<C = ErrorsAreFatal> {
    delay: Delay,
    max_attempts: u8,
    budget: Budget,
    non_idempotent: bool,
    clock: Clock,
    classify: C,
    throttle: Option<RetryThrottle>,
}

impl<C> HedgeBuilder<C> {
    /// The clock latencies and budget spans are measured with (default
    /// [`Clock::quanta`]); use [`Clock::tokio`] in tests on a paused clock.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// When hedges are sent: [`Delay::fixed`] or [`Delay::adaptive`].
    pub fn delay(mut self, delay: impl Into<Delay>) -> Self {
        self.delay = delay.into();
        self
    }

    /// How many attempts a request may make in all, the first included
    /// (default 2, at most [`MAX_ATTEMPTS`]).
    pub fn max_attempts(mut self, attempts: u8) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// How much extra load hedges may add (default [`Budget::ratio`]`(0.05)`).
    pub fn budget(mut self, budget: Budget) -> Self {
        self.budget = budget;
        self
    }

    /// Whether requests that are not idempotent
    /// ([`Replay::is_idempotent`](crate::Replay::is_idempotent)) are hedged
    /// too (default `false`). gRPC calls are POSTs: a gRPC client whose
    /// methods are safe to repeat must say so here.
    pub fn non_idempotent(mut self, hedge: bool) -> Self {
        self.non_idempotent = hedge;
        self
    }

    /// Also sends hedges only while `throttle` allows (gRFC A6
    /// `retryThrottling`, shared with the retries to the same backend):
    /// every non-fatal outcome takes a token from it, every good one gives
    /// back its token ratio, and no hedge is sent while it holds
    /// `max_tokens / 2` or fewer. The budget still applies.
    pub fn throttle(mut self, throttle: RetryThrottle) -> Self {
        self.throttle = Some(throttle);
        self
    }

    /// How attempt outcomes are judged (default [`ErrorsAreFatal`]); see
    /// [`Classify`](crate::Classify).
    pub fn classify<C2>(self, classify: C2) -> HedgeBuilder<C2> {
        HedgeBuilder {
            delay: self.delay,
            max_attempts: self.max_attempts,
            budget: self.budget,
            non_idempotent: self.non_idempotent,
            clock: self.clock,
            classify,
            throttle: self.throttle,
        }
    }

    /// The layer.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] when a setting is out of range: attempts not in
    /// `1..=5`, a percentile not in `(0, 1]`, a zero adaptive window or
    /// sample count, a budget ratio not in `[0, attempts - 1]`, or a budget
    /// window under 10 requests.
    pub fn build(self) -> Result<HedgeLayer<C>, InvalidConfig> {
        if !(1..=MAX_ATTEMPTS).contains(&self.max_attempts) {
            return Err(InvalidConfig::new("max_attempts", "must be 1 to 5"));
        }
        if let DelayKind::Adaptive(a) = self.delay.kind {
            if a.percentile.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
                return Err(InvalidConfig::new("percentile", "must be in (0, 1]"));
            }
            if a.window.is_zero() {
                return Err(InvalidConfig::new("window", "must not be zero"));
            }
            if a.min_samples == 0 {
                return Err(InvalidConfig::new("min_samples", "must be at least 1"));
            }
        }
        if let BudgetKind::Limited { ratio, window, .. } = self.budget.kind {
            if !(ratio >= 0.0 && ratio <= f64::from(self.max_attempts - 1).max(1.0)) {
                return Err(InvalidConfig::new(
                    "budget ratio",
                    "must be between 0 and the number of hedges per request",
                ));
            }
            if window < 10 {
                return Err(InvalidConfig::new(
                    "budget window",
                    "must be at least 10 requests",
                ));
            }
        }
        Ok(self.assemble())
    }

    fn assemble(self) -> HedgeLayer<C> {
        let delay = match self.delay.kind {
            DelayKind::Fixed(d) => DelaySource::Fixed(d),
            DelayKind::Adaptive(a) => {
                let (percentile, together) = a.resolve(&self.budget);
                let window = LatencyWindow::new(percentile, a.min_samples, a.window);
                DelaySource::Adaptive(window.together(together))
            }
        };
        let budget = match self.budget.kind {
            BudgetKind::Limited {
                ratio,
                min_per_second,
                window,
            } => Some(
                HedgeBudget::new(ratio, min_per_second, window).with_reserve(tail_reserve(&delay)),
            ),
            BudgetKind::Unlimited => None,
        };
        HedgeLayer {
            shared: Arc::new(Shared {
                delay,
                budget,
                max_attempts: self.max_attempts,
                non_idempotent: self.non_idempotent,
                counters: Counters::default(),
                clock: self.clock,
                throttle: self.throttle.map_or_else(OnceLock::new, OnceLock::from),
            }),
            classify: self.classify,
        }
    }
}
