//! Error types

use std::fmt;

/// A [`HedgeBuilder`](crate::HedgeBuilder) setting out of range; nothing is
/// built.
///
/// Failures of hedged requests themselves use the shared vocabulary:
/// [`HedgeExhausted`](atscale_core::HedgeExhausted) when every attempt
/// failed, or the single attempt's own error when only one was sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidConfig {
    setting: &'static str,
    reason: &'static str,
}

impl InvalidConfig {
    pub(crate) const fn new(setting: &'static str, reason: &'static str) -> Self {
        InvalidConfig { setting, reason }
    }

    /// The setting that was out of range, for example `"percentile"`.
    pub const fn setting(&self) -> &'static str {
        self.setting
    }

    /// Why it was refused.
    pub const fn reason(&self) -> &'static str {
        self.reason
    }
}

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!("invalid hedge {}: {}", self.setting, self.reason))
    }
}

impl std::error::Error for InvalidConfig {}
