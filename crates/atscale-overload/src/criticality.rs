//! How important a request is: [`Criticality`], and where the layer finds it.

use std::fmt;
use std::str::FromStr;

use http::{HeaderMap, HeaderName};

/// The header (and gRPC metadata key) the layer reads a request's
/// criticality from, unless configured otherwise:
/// `x-criticality: critical | default | sheddable`.
pub const CRITICALITY_HEADER: HeaderName = HeaderName::from_static("x-criticality");

/// How important a request is; under pressure sheddable work goes first and
/// critical work last.
///
/// A request gets its criticality, first found first:
/// 1. in-process, from its extensions (`req.extensions_mut().insert(Criticality::Critical)`),
/// 2. from the criticality header ([`CRITICALITY_HEADER`] by default, see
///    [`Builder::criticality_header`](crate::Builder::criticality_header)),
///    whose value is `critical`, `default` or `sheddable` (ASCII case
///    ignored; anything else counts as `default`),
/// 3. else [`Criticality::Default`].
///
/// Over gRPC the header is a metadata entry of the same name
/// (`request.metadata_mut().insert("x-criticality", "sheddable".parse()?)`).
///
/// What it changes: the admission queue serves critical waiters before
/// default ones and default before sheddable; when the queue is full, or CoDel
/// drops, the oldest waiter of the lowest criticality leaves first; while the
/// queue is standing, sheddable requests are refused at arrival instead of
/// queueing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Criticality {
    /// Best effort: prefetches, batch work, retries of retries.
    Sheddable,
    /// Ordinary traffic.
    #[default]
    Default,
    /// Work whose failure users see first: served first, shed last.
    Critical,
}

impl Criticality {
    /// `critical`, `default` or `sheddable`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Criticality::Sheddable => "sheddable",
            Criticality::Default => "default",
            Criticality::Critical => "critical",
        }
    }

    /// The criticality in `headers` under `name`, if present and well-formed.
    pub fn from_headers(headers: &HeaderMap, name: &HeaderName) -> Option<Criticality> {
        headers.get(name)?.to_str().ok()?.trim().parse().ok()
    }

    pub(crate) const fn index(self) -> usize {
        match self {
            Criticality::Critical => 0,
            Criticality::Default => 1,
            Criticality::Sheddable => 2,
        }
    }
}

impl fmt::Display for Criticality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The value was not `critical`, `default` or `sheddable`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseCriticalityError(());

impl fmt::Display for ParseCriticalityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad("criticality must be critical, default or sheddable")
    }
}

impl std::error::Error for ParseCriticalityError {}

impl FromStr for Criticality {
    type Err = ParseCriticalityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("critical") {
            Ok(Criticality::Critical)
        } else if s.eq_ignore_ascii_case("default") {
            Ok(Criticality::Default)
        } else if s.eq_ignore_ascii_case("sheddable") {
            Ok(Criticality::Sheddable)
        } else {
            Err(ParseCriticalityError(()))
        }
    }
}

/// A request type whose [`Criticality`] the layer can read.
///
/// Implemented for [`http::Request`] (extensions, then the header); implement
/// it for your own request type (the default says [`Criticality::Default`]).
pub trait Prioritized {
    /// The request's criticality; `header` is the configured header name.
    fn criticality(&self, header: &HeaderName) -> Criticality {
        let _ = header;
        Criticality::Default
    }
}

impl<B> Prioritized for http::Request<B> {
    fn criticality(&self, header: &HeaderName) -> Criticality {
        if let Some(c) = self.extensions().get::<Criticality>() {
            return *c;
        }
        Criticality::from_headers(self.headers(), header).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_win_over_the_header() {
        let mut req = http::Request::builder()
            .header("x-criticality", "SHEDDABLE")
            .body(())
            .unwrap();
        assert_eq!(req.criticality(&CRITICALITY_HEADER), Criticality::Sheddable);
        req.extensions_mut().insert(Criticality::Critical);
        assert_eq!(req.criticality(&CRITICALITY_HEADER), Criticality::Critical);
        let junk = http::Request::builder()
            .header("x-criticality", "urgent!!")
            .body(())
            .unwrap();
        assert_eq!(junk.criticality(&CRITICALITY_HEADER), Criticality::Default);
        assert!(Criticality::Critical > Criticality::Default);
        assert!(Criticality::Default > Criticality::Sheddable);
    }
}
