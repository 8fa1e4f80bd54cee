//! The retry policy: how many attempts, how long between them, which
//! failures are worth another.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use atscale_core::Kind;

use crate::code::{Code, CodeSet};
use crate::error::InvalidConfig;
use crate::outcome::Failure;

/// The most attempts a call may make, as in gRPC: larger settings are
/// treated as 5 (gRFC A6), not refused.
pub const MAX_ATTEMPTS: u8 = 5;

/// Kinds never retried, whatever the policy says.
const NEVER_KINDS: [Kind; 3] = [Kind::DeadlineExceeded, Kind::BadRequest, Kind::Cancelled];
/// gRPC codes never retried, whatever the policy says.
const NEVER_CODES: [Code; 3] = [
    Code::DeadlineExceeded,
    Code::InvalidArgument,
    Code::Cancelled,
];

type Predicate = Arc<dyn Fn(&Failure<'_>) -> bool + Send + Sync>;

/// A retry policy, as gRFC A6's `retryPolicy` (revised in 2024): at most
/// [`max_attempts`](RetryPolicyBuilder::max_attempts) attempts in all; the
/// `n`-th retry waits `min(initial · multiplier^(n−1), max) × random(0.8, 1.2)`
/// (`n` counted since the last server pushback); failures retried by
/// [kind](RetryPolicyBuilder::retryable_kinds), by
/// [gRPC code](RetryPolicyBuilder::retryable_codes) or by a
/// [predicate](RetryPolicyBuilder::retry_if).
///
/// Never retried, whatever the policy says: deadline exceeded, malformed
/// input (bad request, `INVALID_ARGUMENT`) and cancelled.
///
/// Cheap to clone (an `Arc`); clones share the jitter's random stream.
///
/// ```
/// use std::time::Duration;
/// use atscale_core::Kind;
/// use atscale_retry::{Code, RetryPolicy};
///
/// let policy = RetryPolicy::builder()
///     .max_attempts(4)
///     .initial_backoff(Duration::from_millis(100))
///     .max_backoff(Duration::from_secs(1))
///     .multiplier(2.0)
///     .retryable_codes([Code::Unavailable, Code::Aborted])
///     .retryable_kinds([Kind::Unreachable, Kind::Overloaded, Kind::RateLimited])
///     .build()?;
/// let third = policy.backoff(3); // 400 ms × random(0.8, 1.2)
/// assert!(third >= Duration::from_millis(320) && third <= Duration::from_millis(480));
/// # Ok::<(), atscale_retry::InvalidConfig>(())
/// ```
#[derive(Clone)]
pub struct RetryPolicy {
    inner: Arc<Inner>,
}

struct Inner {
    max_attempts: u8,
    initial: Duration,
    max: Duration,
    multiplier: f64,
    kinds: Vec<Kind>,
    codes: CodeSet,
    predicate: Option<Predicate>,
    non_idempotent: bool,
    min_attempt: Duration,
    jitter: AtomicU64,
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &*self.inner;
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &p.max_attempts)
            .field("initial_backoff", &p.initial)
            .field("max_backoff", &p.max)
            .field("multiplier", &p.multiplier)
            .field("retryable_kinds", &p.kinds)
            .field("retryable_codes", &p.codes)
            .field("predicate", &p.predicate.is_some())
            .field("non_idempotent", &p.non_idempotent)
            .field("min_attempt", &p.min_attempt)
            .finish()
    }
}

/// Builds a [`RetryPolicy`]; see [`RetryPolicy::builder`] for the defaults.
#[derive(Clone)]
#[must_use = "a builder does nothing until built"]
pub struct RetryPolicyBuilder {
    max_attempts: u32,
    initial: Duration,
    max: Duration,
    multiplier: f64,
    kinds: Vec<Kind>,
    codes: Vec<Code>,
    predicate: Option<Predicate>,
    non_idempotent: bool,
    min_attempt: Duration,
    seed: Option<u64>,
}

impl fmt::Debug for RetryPolicyBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicyBuilder")
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff", &self.initial)
            .field("max_backoff", &self.max)
            .field("multiplier", &self.multiplier)
            .field("retryable_kinds", &self.kinds)
            .field("retryable_codes", &self.codes)
            .field("predicate", &self.predicate.is_some())
            .field("non_idempotent", &self.non_idempotent)
            .field("min_attempt", &self.min_attempt)
            .finish_non_exhaustive()
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::builder()
            .build()
            .expect("the defaults are valid")
    }
}

impl RetryPolicy {
    /// A builder, starting from the defaults: 3 attempts, backoff 100 ms
    /// doubling up to 1 s (A6's example), retryable kinds
    /// [`Kind::Unreachable`] and [`Kind::Overloaded`], retryable code
    /// `UNAVAILABLE`, idempotent requests only, a minimal attempt of 1 ms.
    pub fn builder() -> RetryPolicyBuilder {
        RetryPolicyBuilder {
            max_attempts: 3,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            multiplier: 2.0,
            kinds: vec![Kind::Unreachable, Kind::Overloaded],
            codes: vec![Code::Unavailable],
            predicate: None,
            non_idempotent: false,
            min_attempt: Duration::from_millis(1),
            seed: None,
        }
    }

    /// The most attempts a call makes, the first included (2 to 5).
    pub fn max_attempts(&self) -> u8 {
        self.inner.max_attempts
    }

    /// The retryable gRPC codes.
    pub fn retryable_codes(&self) -> CodeSet {
        self.inner.codes
    }

    /// Whether requests that are not idempotent are retried.
    pub fn non_idempotent(&self) -> bool {
        self.inner.non_idempotent
    }

    /// The time an attempt needs at least: a retry is sent only if its
    /// backoff plus this fits before the deadline.
    pub fn min_attempt(&self) -> Duration {
        self.inner.min_attempt
    }

    /// The backoff before the `n`-th retry since the last pushback (`n` from
    /// 1), without jitter: `min(initial · multiplier^(n−1), max)`.
    pub fn base_backoff(&self, n: u32) -> Duration {
        let p = &*self.inner;
        let exp = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = p.initial.as_secs_f64() * p.multiplier.powi(exp);
        // Also catches an overflow to infinity (and NaN).
        if secs.is_nan() || secs >= p.max.as_secs_f64() {
            return p.max;
        }
        Duration::from_secs_f64(secs)
    }

    /// The backoff before the `n`-th retry since the last pushback, with
    /// jitter: [`base_backoff`](Self::base_backoff) `× random(0.8, 1.2)`.
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 0.8 + 0.4 * self.unit();
        self.base_backoff(n).mul_f64(factor)
    }

    /// A uniform draw in `[0, 1)` from the policy's SplitMix64 stream (one
    /// atomic add: clones share the stream without a lock).
    fn unit(&self) -> f64 {
        const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut z = self
            .inner
            .jitter
            .fetch_add(GAMMA, Ordering::Relaxed)
            .wrapping_add(GAMMA);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Whether `failure` is worth another attempt: never for deadline
    /// exceeded, malformed input or cancelled, nor for a local refusal of
    /// the client-side adaptive throttle
    /// ([`Throttled`](atscale_overload::error::Throttled): the backend's
    /// own refusals, replayed locally; retrying it would only count more
    /// requests against the backend); otherwise when its kind or its code
    /// is retryable, or the predicate says so.
    pub fn is_retryable(&self, failure: &Failure<'_>) -> bool {
        let p = &*self.inner;
        if failure.kind.is_some_and(|k| NEVER_KINDS.contains(&k))
            || failure.code.is_some_and(|c| NEVER_CODES.contains(&c))
            || failure.error.is_some_and(|e| {
                atscale_core::find::<atscale_overload::error::Throttled>(e).is_some()
            })
        {
            return false;
        }
        failure.kind.is_some_and(|k| p.kinds.contains(&k))
            || failure.code.is_some_and(|c| p.codes.contains(c))
            || p.predicate.as_ref().is_some_and(|f| f(failure))
    }
}

impl RetryPolicyBuilder {
    /// The most attempts a call makes, the first included (default 3). Must
    /// be 2 or more; values over 5 are treated as 5, as gRPC does.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// The backoff before the first retry, before jitter (default 100 ms).
    pub fn initial_backoff(mut self, backoff: Duration) -> Self {
        self.initial = backoff;
        self
    }

    /// The longest backoff, before jitter (default 1 s).
    pub fn max_backoff(mut self, backoff: Duration) -> Self {
        self.max = backoff;
        self
    }

    /// How much each backoff grows over the one before (default 2).
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// The kinds of failure retried (default [`Kind::Unreachable`] and
    /// [`Kind::Overloaded`]). [`Kind::RateLimited`] may be added: a
    /// rate-limited call is then retried when its retry-after (plus a
    /// minimal attempt) fits before the deadline.
    pub fn retryable_kinds(mut self, kinds: impl IntoIterator<Item = Kind>) -> Self {
        self.kinds = kinds.into_iter().collect();
        self
    }

    /// The gRPC status codes retried (default `UNAVAILABLE`), as A6's
    /// `retryableStatusCodes`.
    pub fn retryable_codes(mut self, codes: impl IntoIterator<Item = Code>) -> Self {
        self.codes = codes.into_iter().collect();
        self
    }

    /// Also retries the failures `predicate` accepts (it is asked only for
    /// failures that are neither never-retried nor retryable by kind or code).
    pub fn retry_if<F>(mut self, predicate: F) -> Self
    where
        F: Fn(&Failure<'_>) -> bool + Send + Sync + 'static,
    {
        self.predicate = Some(Arc::new(predicate));
        self
    }

    /// Whether requests that are not idempotent (POST, PATCH: every gRPC
    /// call) are retried too (default `false`). A gRPC client whose methods
    /// are safe to repeat must say so here; a service config's policy says
    /// so for its methods.
    pub fn non_idempotent(mut self, retry: bool) -> Self {
        self.non_idempotent = retry;
        self
    }

    /// The time an attempt needs at least (default 1 ms): a retry is sent
    /// only if its backoff plus this fits before the request's deadline.
    pub fn min_attempt(mut self, min: Duration) -> Self {
        self.min_attempt = min;
        self
    }

    /// Seeds the jitter's random stream, for reproducible runs (default: a
    /// seed drawn from the process's hash randomness).
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The policy.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`], naming the setting, when `max_attempts` is under
    /// 2, a backoff is zero, the multiplier is not a positive number, no
    /// kind, code or predicate is retryable, or a never-retried kind or
    /// code (deadline exceeded, malformed input, cancelled) is listed.
    pub fn build(self) -> Result<RetryPolicy, InvalidConfig> {
        if self.max_attempts < 2 {
            return Err(InvalidConfig::new("max_attempts", "must be 2 or more"));
        }
        if self.initial.is_zero() {
            return Err(InvalidConfig::new(
                "initial_backoff",
                "must be greater than zero",
            ));
        }
        if self.max.is_zero() {
            return Err(InvalidConfig::new(
                "max_backoff",
                "must be greater than zero",
            ));
        }
        if !(self.multiplier.is_finite() && self.multiplier > 0.0) {
            return Err(InvalidConfig::new(
                "multiplier",
                "must be a number greater than zero",
            ));
        }
        if let Some(k) = self.kinds.iter().find(|k| NEVER_KINDS.contains(k)) {
            return Err(InvalidConfig::new(
                "retryable_kinds",
                format!(
                    "must not list {k}: deadline exceeded, bad requests and cancelled calls are never retried"
                ),
            ));
        }
        check_codes(&self.codes).map_err(|rule| InvalidConfig::new("retryable_codes", rule))?;
        if self.kinds.is_empty() && self.codes.is_empty() && self.predicate.is_none() {
            return Err(InvalidConfig::new(
                "retryable_codes",
                "must not be empty when no kind or predicate is retryable",
            ));
        }
        let seed = self
            .seed
            .unwrap_or_else(|| RandomState::new().hash_one(0x5eed_u64));
        Ok(RetryPolicy {
            inner: Arc::new(Inner {
                max_attempts: self.max_attempts.min(u32::from(MAX_ATTEMPTS)) as u8,
                initial: self.initial,
                max: self.max,
                multiplier: self.multiplier,
                kinds: self.kinds,
                codes: self.codes.into_iter().collect(),
                predicate: self.predicate,
                non_idempotent: self.non_idempotent,
                min_attempt: self.min_attempt,
                jitter: AtomicU64::new(seed),
            }),
        })
    }
}

/// The rule a list of retryable codes breaks, if any.
pub(crate) fn check_codes(codes: &[Code]) -> Result<(), String> {
    if let Some(c) = codes.iter().find(|c| NEVER_CODES.contains(c)) {
        return Err(format!(
            "must not list {c}: deadline exceeded, invalid argument and cancelled are never retried"
        ));
    }
    if codes.contains(&Code::Ok) {
        return Err("must not list OK".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_local_throttle_refusal_is_never_retried() {
        use atscale_core::{BoxError, Overloaded};
        use atscale_overload::throttle::ThrottleLayer;
        use tower::{Layer, ServiceExt, service_fn};

        let default = policy().build().unwrap();
        // The backend's own refusal is retryable (overloaded, by default)…
        let refused: BoxError = Overloaded::new().into();
        assert!(default.is_retryable(&Failure::of_error(&*refused)));
        // …its local replay by the throttle is not, even when asked for.
        let throttle = ThrottleLayer::builder().k(1.0).seed(1).build().unwrap();
        let refusing = service_fn(|_req: ()| async {
            Err::<http::Response<()>, BoxError>(Overloaded::new().into())
        });
        let svc = throttle.layer(refusing);
        let mut throttled = None;
        for _ in 0..100 {
            let err = svc.clone().oneshot(()).await.unwrap_err();
            if atscale_core::find::<atscale_overload::error::Throttled>(&*err).is_some() {
                throttled = Some(err);
                break;
            }
        }
        let throttled = throttled.expect("the throttle refuses a backend that refuses everything");
        assert_eq!(Kind::find(&*throttled), Some(Kind::Overloaded));
        assert!(!default.is_retryable(&Failure::of_error(&*throttled)));
        let eager = policy().retry_if(|_| true).build().unwrap();
        assert!(!eager.is_retryable(&Failure::of_error(&*throttled)));
    }

    fn policy() -> RetryPolicyBuilder {
        RetryPolicy::builder()
            .initial_backoff(Duration::from_millis(100))
            .max_backoff(Duration::from_secs(1))
            .multiplier(2.0)
            .jitter_seed(7)
    }

    #[test]
    fn backoff_grows_to_its_cap() {
        let p = policy().build().unwrap();
        let ms = |n| p.base_backoff(n).as_millis();
        assert_eq!(
            [ms(1), ms(2), ms(3), ms(4), ms(5), ms(40)],
            [100, 200, 400, 800, 1000, 1000]
        );
        let huge = policy().multiplier(1e300).build().unwrap();
        assert_eq!(huge.base_backoff(3), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_in_0_8_to_1_2_and_covers_it() {
        for seed in 0..20 {
            let p = policy().jitter_seed(seed).build().unwrap();
            let (mut lo, mut hi) = (f64::MAX, 0f64);
            for n in 1..=6u32 {
                for _ in 0..500 {
                    let base = p.base_backoff(n).as_secs_f64();
                    let r = p.backoff(n).as_secs_f64() / base;
                    assert!(
                        (0.8 - 1e-9..=1.2 + 1e-9).contains(&r),
                        "seed {seed} n {n}: {r}"
                    );
                    lo = lo.min(r);
                    hi = hi.max(r);
                }
            }
            // 3,000 draws: both ends of the range are reached within 1%.
            assert!(lo < 0.81 && hi > 1.19, "seed {seed}: {lo}..{hi}");
        }
    }

    #[test]
    fn a_seed_makes_the_jitter_reproducible() {
        let a = policy().jitter_seed(42).build().unwrap();
        let b = policy().jitter_seed(42).build().unwrap();
        let c = policy().jitter_seed(43).build().unwrap();
        let draw = |p: &RetryPolicy| (1..=4).map(|n| p.backoff(n)).collect::<Vec<_>>();
        assert_eq!(draw(&a), draw(&b));
        assert_ne!(draw(&a), draw(&c));
    }

    #[test]
    fn attempts_are_capped_at_5_and_at_least_2() {
        assert_eq!(policy().max_attempts(2).build().unwrap().max_attempts(), 2);
        assert_eq!(policy().max_attempts(5).build().unwrap().max_attempts(), 5);
        assert_eq!(policy().max_attempts(6).build().unwrap().max_attempts(), 5);
        assert_eq!(
            policy()
                .max_attempts(u32::MAX)
                .build()
                .unwrap()
                .max_attempts(),
            5
        );
        for bad in [0, 1] {
            let err = policy().max_attempts(bad).build().unwrap_err();
            assert_eq!(
                (err.path(), err.rule()),
                ("max_attempts", "must be 2 or more")
            );
        }
    }

    #[test]
    fn invalid_settings_name_the_setting() {
        let path = |b: RetryPolicyBuilder| b.build().unwrap_err().path().to_owned();
        assert_eq!(
            path(policy().initial_backoff(Duration::ZERO)),
            "initial_backoff"
        );
        assert_eq!(path(policy().max_backoff(Duration::ZERO)), "max_backoff");
        assert_eq!(path(policy().multiplier(0.0)), "multiplier");
        assert_eq!(path(policy().multiplier(f64::NAN)), "multiplier");
        assert_eq!(
            path(policy().retryable_kinds([Kind::Cancelled])),
            "retryable_kinds"
        );
        assert_eq!(
            path(policy().retryable_codes([Code::Unavailable, Code::DeadlineExceeded])),
            "retryable_codes"
        );
        assert_eq!(
            path(policy().retryable_kinds([]).retryable_codes([])),
            "retryable_codes"
        );
        assert!(
            policy()
                .retryable_kinds([])
                .retryable_codes([])
                .retry_if(|_| true)
                .build()
                .is_ok()
        );
    }

    #[test]
    fn what_is_retried() {
        let p = policy()
            .retryable_codes([Code::Unavailable, Code::Aborted])
            .retry_if(|f| f.http_status().is_some_and(|s| s == 502))
            .build()
            .unwrap();
        let yes = |f: Failure<'_>| p.is_retryable(&f);
        assert!(yes(Failure::of_kind(Kind::Unreachable)));
        assert!(yes(Failure::of_kind(Kind::Overloaded)));
        assert!(!yes(Failure::of_kind(Kind::RateLimited)), "not by default");
        assert!(!yes(Failure::of_kind(Kind::Internal)));
        assert!(!yes(Failure::of_kind(Kind::Upstream)));
        assert!(yes(Failure::of_code(Code::Unavailable)));
        assert!(yes(Failure::of_code(Code::Aborted)));
        assert!(!yes(Failure::of_code(Code::Internal)));
        for never in [
            Code::DeadlineExceeded,
            Code::InvalidArgument,
            Code::Cancelled,
        ] {
            assert!(!yes(Failure::of_code(never)), "{never}");
        }
        let bad_gateway = Failure {
            http_status: Some(http::StatusCode::BAD_GATEWAY),
            ..Failure::of_kind(Kind::Upstream)
        };
        assert!(yes(bad_gateway), "the predicate");
        let deadline_502 = Failure {
            http_status: Some(http::StatusCode::BAD_GATEWAY),
            ..Failure::of_kind(Kind::DeadlineExceeded)
        };
        assert!(
            !yes(deadline_502),
            "never, even when the predicate says yes"
        );
        let limited = policy()
            .retryable_kinds([Kind::RateLimited])
            .build()
            .unwrap();
        assert!(limited.is_retryable(&Failure::of_kind(Kind::RateLimited)));
    }
}
