//! Error types

use std::error::Error;
use std::fmt;

use atscale_core::BoxError;

/// Why the layer stopped trying.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Stop {
    /// The policy's `max_attempts` were all made.
    MaxAttempts,
    /// The next backoff plus a minimal attempt would not fit before the
    /// request's deadline.
    Deadline,
    /// The [retry throttle](atscale_core::RetryThrottle) had too few tokens.
    Throttled,
    /// The server's pushback said not to retry.
    Pushback,
    /// The request's context was cancelled during the backoff.
    Cancelled,
    /// The last outcome was not retryable.
    NotRetryable,
}

impl Stop {
    fn says(self) -> &'static str {
        match self {
            Stop::MaxAttempts => "no attempts left",
            Stop::Deadline => "the deadline leaves no time for another",
            Stop::Throttled => "retries throttled",
            Stop::Pushback => "the server said not to retry",
            Stop::Cancelled => "the request was cancelled",
            Stop::NotRetryable => "the last failure is not retryable",
        }
    }
}

/// The last attempt's error, and how many attempts were made: returned when
/// a call that failed retryably was retried, or could have been and was not
/// (throttled, no time left before the deadline, the server said not to).
///
/// Its `source()` is the last attempt's error, so [`Kind::of`] classifies
/// the failure as that error (an unreachable server stays a 503 /
/// `UNAVAILABLE`).
///
/// [`Kind::of`]: atscale_core::Kind::of
#[derive(Debug)]
pub struct RetryFailed {
    attempts: u8,
    stop: Stop,
    last: BoxError,
}

impl RetryFailed {
    pub(crate) fn new(attempts: u8, stop: Stop, last: BoxError) -> Self {
        RetryFailed {
            attempts,
            stop,
            last,
        }
    }

    /// How many attempts were made, the first included.
    pub fn attempts(&self) -> u8 {
        self.attempts
    }

    /// Why no further attempt was made.
    pub fn stop(&self) -> Stop {
        self.stop
    }

    /// The last attempt's error.
    pub fn last(&self) -> &(dyn Error + Send + Sync + 'static) {
        &*self.last
    }

    /// The last attempt's error, owned.
    pub fn into_last(self) -> BoxError {
        self.last
    }
}

impl fmt::Display for RetryFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = if self.attempts == 1 { "" } else { "s" };
        f.pad(&format!(
            "failed after {} attempt{plural} ({})",
            self.attempts,
            self.stop.says()
        ))
    }
}

impl Error for RetryFailed {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&*self.last)
    }
}

/// A setting or a service config field that breaks a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidConfig {
    path: String,
    rule: String,
}

impl InvalidConfig {
    pub(crate) fn new(path: impl Into<String>, rule: impl Into<String>) -> Self {
        InvalidConfig {
            path: path.into(),
            rule: rule.into(),
        }
    }

    /// The setting, or the field's path in a service config
    /// (`methodConfig[0].retryPolicy.maxAttempts`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The rule it broke.
    pub fn rule(&self) -> &str {
        &self.rule
    }

    #[allow(dead_code)] // used by the service config
    pub(crate) fn under(mut self, prefix: &str) -> Self {
        self.path = if self.path.is_empty() {
            prefix.to_owned()
        } else {
            format!("{prefix}.{}", self.path)
        };
        self
    }
}

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.pad(&format!("invalid retry config: {}", self.rule))
        } else {
            f.pad(&format!(
                "invalid retry config: {} {}",
                self.path, self.rule
            ))
        }
    }
}

impl Error for InvalidConfig {}

#[cfg(test)]
mod tests {
    use super::*;
    use atscale_core::{Kind, Unreachable};

    #[test]
    fn the_last_error_decides_the_kind() {
        let err = RetryFailed::new(3, Stop::MaxAttempts, Unreachable::new("db").into());
        assert_eq!(
            err.to_string(),
            "failed after 3 attempts (no attempts left)"
        );
        assert_eq!(Kind::of(&err), Kind::Unreachable);
        assert_eq!(err.source().unwrap().to_string(), "could not reach db");
        let one = RetryFailed::new(1, Stop::Throttled, Unreachable::new("db").into());
        assert_eq!(
            one.to_string(),
            "failed after 1 attempt (retries throttled)"
        );
    }
}
