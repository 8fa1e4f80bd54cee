//! The W3C `traceparent` header: the trace id an error answer and its log
//! line carry, so an operator can find the trace. No tracing backend is
//! needed: the id is read from the request.

use std::fmt;

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};

/// `traceparent` (W3C Trace Context, section 3.2).
pub(crate) static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The request's one `traceparent` value, kept unparsed: it is parsed only
/// when an error needs it. Two or more values are no trace context at all.
#[inline]
pub(crate) fn raw(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut values = headers.get_all(&TRACEPARENT).iter();
    let first = values.next()?;
    match values.next() {
        None => Some(first.clone()),
        Some(_) => None,
    }
}

/// A 16-byte W3C trace id, shown as 32 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct TraceId([u8; 32]);

impl TraceId {
    /// The trace id of a well-formed `traceparent`, `None` otherwise.
    ///
    /// Strict, as the specification asks of a receiver: version two hex
    /// digits and not `ff`; trace id 32 and parent id 16 lower-case hex
    /// digits, neither all zeros; flags two hex digits; fields separated by
    /// single dashes; version `00` exactly 55 characters, a later version
    /// at least that and, if longer, a dash after the flags. A malformed
    /// value is ignored, never echoed.
    pub(crate) fn parse(value: &HeaderValue) -> Option<TraceId> {
        let b = value.as_bytes();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let (version, trace, parent, flags) = (&b[..2], &b[3..35], &b[36..52], &b[53..55]);
        if !version.iter().all(is_lower_hex) || version == b"ff" {
            return None;
        }
        if version == b"00" && b.len() != 55 {
            return None;
        }
        if b.len() > 55 && b[55] != b'-' {
            return None;
        }
        let all_hex = |s: &[u8]| s.iter().all(is_lower_hex);
        let all_zero = |s: &[u8]| s.iter().all(|&c| c == b'0');
        if !all_hex(trace) || all_zero(trace) || !all_hex(parent) || all_zero(parent) {
            return None;
        }
        if !all_hex(flags) {
            return None;
        }
        let mut id = [0; 32];
        id.copy_from_slice(trace);
        Some(TraceId(id))
    }

    /// The 32 hex digits.
    pub(crate) fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("checked to be ASCII hex digits")
    }
}

fn is_lower_hex(c: &u8) -> bool {
    matches!(c, b'0'..=b'9' | b'a'..=b'f')
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceId({})", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn parse(s: &str) -> Option<String> {
        TraceId::parse(&HeaderValue::from_str(s).unwrap()).map(|t| t.to_string())
    }

    #[test]
    fn the_specification_example_parses() {
        assert_eq!(
            parse(VALID).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        // a later version may append fields after a dash
        assert!(parse(&format!("01{}-what-the-future-holds", &VALID[2..])).is_some());
        assert!(parse(&format!("01{}", &VALID[2..])).is_some());
    }

    #[test]
    fn malformed_values_are_ignored() {
        for bad in [
            "",
            "00",
            &VALID.to_uppercase(),
            &VALID.replace("4bf92f", "4bf92g"),
            &VALID[..54],
            &format!("{VALID}0"),
            &format!("{VALID}-x"), // version 00 has exactly four fields
            &format!("01{}x", &VALID[2..]),
            &format!("ff{}", &VALID[2..]),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0z",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "<script>-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert_eq!(parse(bad), None, "{bad:?} was accepted");
        }
    }

    #[test]
    fn two_values_are_no_trace_context() {
        let mut headers = HeaderMap::new();
        headers.append(&TRACEPARENT, HeaderValue::from_static(VALID));
        assert!(raw(&headers).is_some());
        headers.append(&TRACEPARENT, HeaderValue::from_static(VALID));
        assert!(raw(&headers).is_none());
    }
}
