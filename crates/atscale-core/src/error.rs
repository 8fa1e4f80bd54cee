//! Error types: the failure vocabulary shared by every atscale layer.
//!
//! Each layer fails with one of these types (or wraps one in its `source()`
//! chain), so that [`Kind::of`] can classify any [`BoxError`] that leaves a
//! stack, and ErrorEnrich can turn it into the right HTTP status or gRPC code.

use std::error::Error;
use std::fmt;
use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

use crate::deadline::{Deadline, Origin};

/// A duration as people read it in an error message: `250ms`, `2.5ms`,
/// `1.5s`, `80µs`, without the nanosecond noise of `Debug`.
pub(crate) struct Short(pub(crate) Duration);

impl fmt::Display for Short {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d < Duration::from_millis(1) {
            write!(f, "{d:?}")
        } else if d < Duration::from_millis(10) {
            write!(f, "{}ms", trim(format!("{:.1}", d.as_secs_f64() * 1e3)))
        } else if d < Duration::from_secs(1) {
            write!(f, "{}ms", (d.as_secs_f64() * 1e3).round())
        } else {
            write!(f, "{}s", trim(format!("{:.3}", d.as_secs_f64())))
        }
    }
}

fn trim(mut number: String) -> String {
    if number.contains('.') {
        while number.ends_with('0') {
            number.pop();
        }
        if number.ends_with('.') {
            number.pop();
        }
    }
    number
}

/// The error type every atscale layer that adds a failure mode returns.
pub type BoxError = Box<dyn Error + Send + Sync + 'static>;

/// The request's deadline passed before it finished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadlineExceeded {
    budget: Duration,
    elapsed: Duration,
    origin: Origin,
}

impl DeadlineExceeded {
    /// A deadline with `budget`, of `origin`, exceeded after `elapsed`.
    pub const fn new(budget: Duration, elapsed: Duration, origin: Origin) -> Self {
        DeadlineExceeded {
            budget,
            elapsed,
            origin,
        }
    }

    /// `deadline`, observed as exceeded at `now`: the elapsed time counts from
    /// when the deadline was set.
    pub fn at(deadline: Deadline, now: Instant) -> Self {
        let late = now.saturating_duration_since(deadline.instant());
        DeadlineExceeded::new(
            deadline.budget(),
            deadline.budget().saturating_add(late),
            deadline.origin(),
        )
    }

    /// The budget the deadline allowed, at the hop that set it.
    pub const fn budget(&self) -> Duration {
        self.budget
    }

    /// The time that had passed when the deadline was found exceeded.
    pub const fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// Where the deadline came from.
    pub const fn origin(&self) -> Origin {
        self.origin
    }

    /// Whether a caller chose the deadline (rather than this hop's own budget).
    pub const fn is_inherited(&self) -> bool {
        self.origin.is_inherited()
    }
}

impl fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!(
            "deadline exceeded after {} (budget {}, {})",
            Short(self.elapsed),
            Short(self.budget),
            self.origin
        ))
    }
}

impl Error for DeadlineExceeded {}

/// An incoming deadline (`grpc-timeout` or the HTTP deadline header) could not be parsed.
///
/// Classified as [`Kind::BadRequest`]: a malformed deadline is never read as "no deadline".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MalformedDeadline {
    header: String,
    reason: &'static str,
}

impl MalformedDeadline {
    /// The value of `header` is malformed for `reason` (lower case, no period).
    pub fn new(header: impl Into<String>, reason: &'static str) -> Self {
        MalformedDeadline {
            header: header.into(),
            reason,
        }
    }

    /// The header that held the malformed value.
    pub fn header(&self) -> &str {
        &self.header
    }

    /// Why the value was rejected.
    pub const fn reason(&self) -> &'static str {
        self.reason
    }
}

impl fmt::Display for MalformedDeadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!(
            "malformed {} header: {}",
            self.header, self.reason
        ))
    }
}

impl Error for MalformedDeadline {}

/// A rate limit refused the request; it may be retried after [`RateLimited::retry_after`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimited {
    retry_after: Duration,
}

impl RateLimited {
    /// Refused; the limits would admit the request `retry_after` from now.
    pub const fn new(retry_after: Duration) -> Self {
        RateLimited { retry_after }
    }

    /// How long until the limits would admit the request.
    pub const fn retry_after(&self) -> Duration {
        self.retry_after
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!(
            "rate limited, retry after {}",
            Short(self.retry_after)
        ))
    }
}

impl Error for RateLimited {}

/// The service refused work it has no capacity for, optionally saying when
/// to come back ([`Overloaded::retry_after`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overloaded {
    retry_after: Option<Duration>,
}

impl Overloaded {
    /// The service is overloaded.
    pub const fn new() -> Self {
        Overloaded { retry_after: None }
    }

    /// The service is overloaded; it expects to have room `retry_after` from now.
    pub const fn with_retry_after(retry_after: Duration) -> Self {
        Overloaded {
            retry_after: Some(retry_after),
        }
    }

    /// When the service expects to have room again, if it said.
    pub const fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Display for Overloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.retry_after {
            Some(after) => f.pad(&format!("service overloaded, retry after {}", Short(after))),
            None => f.pad("service overloaded"),
        }
    }
}

impl Error for Overloaded {}

/// The request never reached the server: the connection was refused, the
/// name did not resolve, the server refused the stream before processing it.
///
/// Unlike [`Kind::Upstream`] (the server answered with a failure), the
/// server did no work, so the request is safe to send again, even when it is
/// not idempotent.
#[derive(Debug)]
pub struct Unreachable {
    dependency: String,
    source: Option<BoxError>,
}

impl Unreachable {
    /// `dependency` (a service name or an address) could not be reached.
    pub fn new(dependency: impl Into<String>) -> Self {
        Unreachable {
            dependency: dependency.into(),
            source: None,
        }
    }

    /// The transport error that showed it (kept as the `source()`).
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The dependency that could not be reached.
    pub fn dependency(&self) -> &str {
        &self.dependency
    }
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!("could not reach {}", self.dependency))
    }
}

impl Error for Unreachable {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn Error + 'static))
    }
}

/// Work showed no progress for longer than allowed and was cut.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stalled {
    idle: Duration,
}

impl Stalled {
    /// No progress for `idle`.
    pub const fn new(idle: Duration) -> Self {
        Stalled { idle }
    }

    /// How long the work had shown no progress when it was cut.
    pub const fn idle(&self) -> Duration {
        self.idle
    }
}

impl fmt::Display for Stalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!("stalled: no progress for {}", Short(self.idle)))
    }
}

impl Error for Stalled {}

/// Every attempt of a hedged request failed; each attempt's error is kept, in
/// the order the attempts were sent.
#[derive(Debug)]
pub struct HedgeExhausted {
    attempts: Vec<BoxError>,
}

impl HedgeExhausted {
    /// All `attempts` failed (in the order they were sent).
    pub fn new(attempts: Vec<BoxError>) -> Self {
        HedgeExhausted { attempts }
    }

    /// The error of each attempt, in the order the attempts were sent.
    pub fn attempts(&self) -> &[BoxError] {
        &self.attempts
    }
}

impl fmt::Display for HedgeExhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!(
            "all {} hedged attempts failed",
            self.attempts.len()
        ))
    }
}

impl Error for HedgeExhausted {
    /// The first attempt's error: the one the request would have had unhedged.
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.attempts
            .first()
            .map(|e| &**e as &(dyn Error + 'static))
    }
}

/// The request's context was cancelled (the caller went away, or a sibling won).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cancelled {
    _priv: (),
}

impl Cancelled {
    /// The request was cancelled.
    pub const fn new() -> Self {
        Cancelled { _priv: () }
    }
}

impl fmt::Display for Cancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad("request cancelled")
    }
}

impl Error for Cancelled {}

/// Why preemptable work ([`Context::run`](crate::Context::run)) was stopped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Interrupted {
    /// The context was cancelled.
    #[error(transparent)]
    Cancelled(Cancelled),
    /// The context's deadline passed.
    #[error(transparent)]
    DeadlineExceeded(DeadlineExceeded),
}

/// The kind of a failure, found by walking an error's `source()` chain.
///
/// Each kind maps to one HTTP status ([`Kind::http_status`]) and one gRPC
/// code ([`Kind::grpc_code`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// A deadline passed ([`DeadlineExceeded`]).
    DeadlineExceeded,
    /// A rate limit refused the request ([`RateLimited`]).
    RateLimited,
    /// No capacity ([`Overloaded`]).
    Overloaded,
    /// No progress for too long ([`Stalled`]).
    Stalled,
    /// Every hedged attempt failed ([`HedgeExhausted`]).
    HedgeExhausted,
    /// The request never reached the server ([`Unreachable`]): safe to retry.
    Unreachable,
    /// The request was cancelled ([`Cancelled`]).
    Cancelled,
    /// The request itself was malformed ([`MalformedDeadline`]).
    BadRequest,
    /// A dependency answered with a failure, or failed in a way atscale does
    /// not know (an unclassified error on the client side).
    Upstream,
    /// Anything else: a bug or an unknown error on the server side.
    Internal,
}

impl Kind {
    /// Classifies `err` by the first error in its `source()` chain
    /// (outermost first) that [`classify`](crate::classify) knows: an atscale
    /// vocabulary type, a type an application mapped with
    /// [`classify::register`](crate::classify::register), or a foreign type
    /// recognised behind its crate's feature. An error with none is
    /// [`Kind::Internal`].
    pub fn of(err: &(dyn Error + 'static)) -> Kind {
        Kind::find(err).unwrap_or(Kind::Internal)
    }

    /// Like [`Kind::of`], but `None` when nothing in the chain is known,
    /// so the caller can decide between [`Kind::Upstream`] and [`Kind::Internal`].
    pub fn find(err: &(dyn Error + 'static)) -> Option<Kind> {
        crate::classify::classify(err).map(|c| c.kind())
    }

    /// The kind of one error (not its chain), if it is an atscale vocabulary type.
    pub(crate) fn of_one(err: &(dyn Error + 'static)) -> Option<Kind> {
        Some(if err.is::<DeadlineExceeded>() {
            Kind::DeadlineExceeded
        } else if err.is::<RateLimited>() {
            Kind::RateLimited
        } else if err.is::<Overloaded>() {
            Kind::Overloaded
        } else if err.is::<Stalled>() {
            Kind::Stalled
        } else if err.is::<HedgeExhausted>() {
            Kind::HedgeExhausted
        } else if err.is::<Unreachable>() {
            Kind::Unreachable
        } else if err.is::<Cancelled>() {
            Kind::Cancelled
        } else if err.is::<MalformedDeadline>() {
            Kind::BadRequest
        } else if let Some(i) = err.downcast_ref::<Interrupted>() {
            match i {
                Interrupted::Cancelled(_) => Kind::Cancelled,
                Interrupted::DeadlineExceeded(_) => Kind::DeadlineExceeded,
            }
        } else {
            return None;
        })
    }

    /// The HTTP status a server answers with for this kind.
    ///
    /// A cancelled request gets 499 (nginx's "client closed request"): the
    /// client that asked is gone, so nobody should see it but the logs.
    pub fn http_status(self) -> StatusCode {
        match self {
            Kind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Kind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Kind::Overloaded | Kind::Stalled | Kind::Unreachable => StatusCode::SERVICE_UNAVAILABLE,
            Kind::HedgeExhausted | Kind::Upstream => StatusCode::BAD_GATEWAY,
            Kind::Cancelled => StatusCode::from_u16(499).expect("499 is a valid status"),
            Kind::BadRequest => StatusCode::BAD_REQUEST,
            Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The gRPC status code for this kind.
    pub fn grpc_code(self) -> GrpcCode {
        match self {
            Kind::DeadlineExceeded => GrpcCode::DeadlineExceeded,
            Kind::RateLimited => GrpcCode::ResourceExhausted,
            Kind::Overloaded
            | Kind::Stalled
            | Kind::HedgeExhausted
            | Kind::Unreachable
            | Kind::Upstream => GrpcCode::Unavailable,
            Kind::Cancelled => GrpcCode::Cancelled,
            Kind::BadRequest => GrpcCode::InvalidArgument,
            Kind::Internal => GrpcCode::Internal,
        }
    }

    /// A stable snake-case name, usable as an error code in URLs and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::DeadlineExceeded => "deadline_exceeded",
            Kind::RateLimited => "rate_limited",
            Kind::Overloaded => "overloaded",
            Kind::Stalled => "stalled",
            Kind::HedgeExhausted => "hedge_exhausted",
            Kind::Unreachable => "unreachable",
            Kind::Cancelled => "cancelled",
            Kind::BadRequest => "bad_request",
            Kind::Upstream => "upstream",
            Kind::Internal => "internal",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The gRPC status codes the vocabulary maps to, with their wire values
/// (so `atscale-core` needs no tonic; `tonic::Code::from(code as i32)` converts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(i32)]
pub enum GrpcCode {
    /// `CANCELLED` (1).
    Cancelled = 1,
    /// `INVALID_ARGUMENT` (3).
    InvalidArgument = 3,
    /// `DEADLINE_EXCEEDED` (4).
    DeadlineExceeded = 4,
    /// `RESOURCE_EXHAUSTED` (8).
    ResourceExhausted = 8,
    /// `INTERNAL` (13).
    Internal = 13,
    /// `UNAVAILABLE` (14).
    Unavailable = 14,
}

/// Iterates over `err` and its `source()` chain, outermost first.
pub fn chain<'a>(
    err: &'a (dyn Error + 'static),
) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(err), |&e| e.source())
}

/// Finds the first error of type `T` in `err`'s `source()` chain.
///
/// `err.is::<T>()` only sees the top of the chain; this sees all of it.
///
/// ```
/// use atscale_core::{BoxError, RateLimited, find};
/// use std::time::Duration;
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("calling the billing service")]
/// struct Billing(#[source] RateLimited);
///
/// let err: BoxError = Billing(RateLimited::new(Duration::from_secs(2))).into();
/// assert!(!err.is::<RateLimited>());
/// assert_eq!(find::<RateLimited>(&*err).unwrap().retry_after(), Duration::from_secs(2));
/// ```
pub fn find<'a, T: Error + 'static>(err: &'a (dyn Error + 'static)) -> Option<&'a T> {
    chain(err).find_map(|e| e.downcast_ref::<T>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] BoxError);

    #[test]
    fn durations_read_like_people_write_them() {
        let cases = [
            (Duration::from_nanos(80_500), "80.5µs"),
            (Duration::from_micros(2_500), "2.5ms"),
            (Duration::from_millis(3), "3ms"),
            (Duration::from_nanos(250_970_001), "251ms"),
            (Duration::from_nanos(249_986_600), "250ms"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_secs(2), "2s"),
            (Duration::from_millis(61_234), "61.234s"),
        ];
        for (d, want) in cases {
            assert_eq!(Short(d).to_string(), want, "{d:?}");
        }
    }

    #[test]
    fn kind_walks_the_chain() {
        let err: BoxError = Outer(Box::new(Outer(Box::new(Stalled::new(
            Duration::from_secs(1),
        )))))
        .into();
        assert_eq!(Kind::of(&*err), Kind::Stalled);
        let err: BoxError = Outer("plain".into()).into();
        assert_eq!(Kind::of(&*err), Kind::Internal);
        assert_eq!(Kind::find(&*err), None);
    }

    #[test]
    fn outermost_vocabulary_type_wins() {
        let inner: BoxError = Box::new(DeadlineExceeded::new(
            Duration::from_secs(1),
            Duration::from_secs(1),
            Origin::Local,
        ));
        let err: BoxError = Box::new(HedgeExhausted::new(vec![inner]));
        assert_eq!(Kind::of(&*err), Kind::HedgeExhausted);
        assert!(find::<DeadlineExceeded>(&*err).is_some());
    }

    #[test]
    fn every_kind_has_one_status_and_code() {
        let all = [
            (Kind::DeadlineExceeded, 504, 4),
            (Kind::RateLimited, 429, 8),
            (Kind::Overloaded, 503, 14),
            (Kind::Stalled, 503, 14),
            (Kind::HedgeExhausted, 502, 14),
            (Kind::Unreachable, 503, 14),
            (Kind::Cancelled, 499, 1),
            (Kind::BadRequest, 400, 3),
            (Kind::Upstream, 502, 14),
            (Kind::Internal, 500, 13),
        ];
        for (kind, status, code) in all {
            assert_eq!(kind.http_status().as_u16(), status, "{kind}");
            assert_eq!(kind.grpc_code() as i32, code, "{kind}");
        }
    }

    #[test]
    fn display_is_lower_case_without_trailing_period() {
        let errors: Vec<BoxError> = vec![
            Box::new(DeadlineExceeded::new(
                Duration::from_millis(5),
                Duration::from_millis(6),
                Origin::Header,
            )),
            Box::new(MalformedDeadline::new("grpc-timeout", "unknown unit")),
            Box::new(RateLimited::new(Duration::from_millis(500))),
            Box::new(Overloaded::new()),
            Box::new(Stalled::new(Duration::from_secs(2))),
            Box::new(HedgeExhausted::new(vec!["a".into(), "b".into()])),
            Box::new(Cancelled::new()),
            Box::new(Unreachable::new("billing")),
            Box::new(Overloaded::with_retry_after(Duration::from_secs(1))),
        ];
        for e in errors {
            let s = e.to_string();
            assert!(s.chars().next().unwrap().is_lowercase(), "{s}");
            assert!(!s.ends_with('.'), "{s}");
        }
        assert_eq!(
            DeadlineExceeded::new(
                Duration::from_millis(5),
                Duration::from_millis(6),
                Origin::Header
            )
            .to_string(),
            "deadline exceeded after 6ms (budget 5ms, header)"
        );
    }
}
