//! Error types.
//!
//! Requests refused by a limit fail with [`atscale_core::RateLimited`] (with
//! its retry-after), exactly as in-process. The types here cover what Redis
//! adds: a store that cannot be reached under
//! [`FaultPolicy::FailClosed`](crate::FaultPolicy::FailClosed)
//! ([`StoreUnavailable`], classified as
//! [`Kind::Overloaded`](atscale_core::Kind::Overloaded): 503 /
//! `UNAVAILABLE`), and configuration rejected at construction
//! ([`InvalidConfig`]).

use std::error::Error;
use std::fmt;

use atscale_core::{BoxError, Overloaded};

/// The rate-limit store could not be asked (Redis down, slow past the
/// timeout, or answering with an error) and the store fails closed.
///
/// Its [`source()`](Error::source) is [`Overloaded`], so
/// [`Kind::of`](atscale_core::Kind::of) classifies it as
/// [`Kind::Overloaded`](atscale_core::Kind::Overloaded) (503 /
/// `UNAVAILABLE`): the request was refused for want of capacity to decide,
/// not because its client exceeded a limit.
///
/// ```
/// use atscale_core::{BoxError, Kind};
/// use atscale_ratelimit_redis::StoreUnavailable;
///
/// let err: BoxError = Box::new(StoreUnavailable::new("redis timed out after 50ms"));
/// assert_eq!(Kind::of(&*err), Kind::Overloaded);
/// assert_eq!(
///     err.to_string(),
///     "rate-limit store unavailable, failing closed: redis timed out after 50ms"
/// );
/// ```
#[derive(Clone, Debug)]
pub struct StoreUnavailable {
    cause: String,
    overloaded: Overloaded,
}

impl StoreUnavailable {
    /// The store could not be asked, because of `cause`.
    pub fn new(cause: impl Into<String>) -> Self {
        StoreUnavailable {
            cause: cause.into(),
            overloaded: Overloaded::new(),
        }
    }

    /// What went wrong with the store (the Redis error, or the timeout).
    pub fn cause(&self) -> &str {
        &self.cause
    }
}

impl fmt::Display for StoreUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!(
            "rate-limit store unavailable, failing closed: {}",
            self.cause
        ))
    }
}

impl Error for StoreUnavailable {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.overloaded)
    }
}

/// A Redis store or limiter configuration that cannot work, rejected at
/// construction.
///
/// ```
/// use std::time::Duration;
/// use atscale_ratelimit_redis::RedisStore;
///
/// let err = RedisStore::builder("not a url").timeout(Duration::ZERO).build().unwrap_err();
/// assert!(err.to_string().starts_with("invalid redis rate limit: "), "{err}");
/// ```
#[derive(Debug)]
pub struct InvalidConfig {
    what: String,
    source: Option<BoxError>,
}

impl InvalidConfig {
    pub(crate) fn new(what: impl Into<String>) -> Self {
        InvalidConfig {
            what: what.into(),
            source: None,
        }
    }

    pub(crate) fn with_source(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        InvalidConfig {
            what: what.into(),
            source: Some(source.into()),
        }
    }

    /// What was wrong, in words.
    pub fn what(&self) -> &str {
        &self.what
    }
}

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!("invalid redis rate limit: {}", self.what))
    }
}

impl Error for InvalidConfig {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn Error + 'static))
    }
}
