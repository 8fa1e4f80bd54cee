//! Error types

use std::error::Error;
use std::fmt;

pub use atscale_core::{DeadlineExceeded, Overloaded};

/// A setting was out of range: names the field and the rule it broke.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    field: &'static str,
    rule: &'static str,
}

impl ConfigError {
    pub(crate) const fn new(field: &'static str, rule: &'static str) -> Self {
        ConfigError { field, rule }
    }

    /// The setting, e.g. `min_limit`.
    pub const fn field(&self) -> &'static str {
        self.field
    }

    /// The rule it broke, e.g. `must be at least 1`.
    pub const fn rule(&self) -> &'static str {
        self.rule
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!(
            "invalid overload setting {}: {}",
            self.field, self.rule
        ))
    }
}

impl Error for ConfigError {}

/// The client-side throttle refused a request locally, because the backend has
/// been refusing work (Google SRE book, "Handling Overload").
///
/// Its `source()` is an [`Overloaded`], so it classifies as
/// [`Kind::Overloaded`](atscale_core::Kind::Overloaded): 503 / `UNAVAILABLE`.
#[derive(Clone, Debug, PartialEq)]
pub struct Throttled {
    probability: f64,
    overloaded: Overloaded,
}

impl Throttled {
    pub(crate) fn new(probability: f64) -> Self {
        Throttled {
            probability,
            overloaded: Overloaded::new(),
        }
    }

    /// The rejection probability the request was refused with.
    pub const fn probability(&self) -> f64 {
        self.probability
    }
}

impl fmt::Display for Throttled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!(
            "throttled locally: the backend is refusing work (rejecting {:.0}%)",
            self.probability * 100.0
        ))
    }
}

impl Error for Throttled {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.overloaded)
    }
}
