//! What a server says about retrying: `grpc-retry-pushback-ms`, HTTP
//! `Retry-After`, and the `RetryInfo` detail of a gRPC status.

use std::time::{Duration, SystemTime};

use http::HeaderMap;
use http::header::RETRY_AFTER;

/// The gRPC metadata key of server pushback (gRFC A6).
pub const GRPC_RETRY_PUSHBACK_MS: &str = "grpc-retry-pushback-ms";

/// The gRPC metadata key a client sets on every attempt after the first: the
/// number of attempts before it (gRFC A6).
pub const GRPC_PREVIOUS_RPC_ATTEMPTS: &str = "grpc-previous-rpc-attempts";

/// What a failed attempt's answer said about trying again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pushback {
    /// Nothing: the retry policy's backoff decides.
    #[default]
    None,
    /// Try again after exactly this long, instead of the backoff (the
    /// backoff then starts over from its initial value).
    After(Duration),
    /// Do not try again (a negative or malformed `grpc-retry-pushback-ms`).
    Stop,
}

impl Pushback {
    /// The wait the server asked for, if it asked for one.
    pub const fn after(self) -> Option<Duration> {
        match self {
            Pushback::After(d) => Some(d),
            _ => None,
        }
    }
}

/// Reads a `grpc-retry-pushback-ms` value as gRFC A6 defines it: an ASCII
/// signed 32-bit integer with no unnecessary leading zeros. A non-negative
/// value is the wait in milliseconds; a negative or unparseable one asks
/// the client not to retry at all.
///
/// ```
/// use std::time::Duration;
/// use atscale_retry::{Pushback, parse_grpc_pushback};
///
/// assert_eq!(parse_grpc_pushback(b"250"), Pushback::After(Duration::from_millis(250)));
/// assert_eq!(parse_grpc_pushback(b"0"), Pushback::After(Duration::ZERO));
/// assert_eq!(parse_grpc_pushback(b"-1"), Pushback::Stop);
/// assert_eq!(parse_grpc_pushback(b"soon"), Pushback::Stop);
/// assert_eq!(parse_grpc_pushback(b"007"), Pushback::Stop);
/// ```
pub fn parse_grpc_pushback(value: &[u8]) -> Pushback {
    let (negative, digits) = match value.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, value),
    };
    let well_formed = !digits.is_empty()
        && digits.iter().all(u8::is_ascii_digit)
        && (digits.len() == 1 || digits[0] != b'0')
        && !(negative && digits == b"0");
    if !well_formed {
        return Pushback::Stop;
    }
    let text = std::str::from_utf8(value).expect("ASCII digits");
    match text.parse::<i32>() {
        Ok(ms) if ms >= 0 => Pushback::After(Duration::from_millis(ms as u64)),
        _ => Pushback::Stop,
    }
}

/// The pushback in gRPC metadata (response headers of a trailers-only
/// answer, or trailers): [`parse_grpc_pushback`] of the one
/// `grpc-retry-pushback-ms` value; several values mean
/// [`Stop`](Pushback::Stop) (as gRPC Go reads them), none means
/// [`None`](Pushback::None).
pub fn grpc_pushback(headers: &HeaderMap) -> Pushback {
    let mut values = headers.get_all(GRPC_RETRY_PUSHBACK_MS).iter();
    match (values.next(), values.next()) {
        (None, _) => Pushback::None,
        (Some(one), None) => parse_grpc_pushback(one.as_bytes()),
        (Some(_), Some(_)) => Pushback::Stop,
    }
}

/// Reads an HTTP `Retry-After` value (RFC 9110, 10.2.3): delta-seconds, or
/// an HTTP-date, which counts from `now` (a date in the past is zero).
/// `None` when malformed: HTTP has no "do not retry" value, so a bad header
/// is ignored and the backoff decides.
///
/// ```
/// use std::time::{Duration, SystemTime, UNIX_EPOCH};
/// use atscale_retry::parse_retry_after;
///
/// let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
/// assert_eq!(parse_retry_after(b"120", now), Some(Duration::from_secs(120)));
/// assert_eq!(
///     parse_retry_after(b"Wed, 21 Oct 2015 07:29:30 GMT", now),
///     Some(Duration::from_secs(90)),
/// );
/// assert_eq!(parse_retry_after(b"soon", now), None);
/// ```
pub fn parse_retry_after(value: &[u8], now: SystemTime) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // Absurdly large values saturate rather than fail.
        return Some(Duration::from_secs(text.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The `Retry-After` of an HTTP answer, read with [`parse_retry_after`]
/// against the system clock.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?;
    parse_retry_after(value.as_bytes(), SystemTime::now())
}

/// The pushback of a gRPC status: `grpc-retry-pushback-ms` in its metadata,
/// or else the delay of its `google.rpc.RetryInfo` detail.
#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
pub fn status_pushback(status: &tonic::Status) -> Pushback {
    use tonic_types::StatusExt;
    match grpc_pushback(status.metadata().as_ref()) {
        Pushback::None => status
            .get_details_retry_info()
            .and_then(|info| info.retry_delay)
            .map_or(Pushback::None, Pushback::After),
        said => said,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_pushback_values() {
        let ms = |n| Pushback::After(Duration::from_millis(n));
        assert_eq!(parse_grpc_pushback(b"1"), ms(1));
        assert_eq!(parse_grpc_pushback(b"2147483647"), ms(2_147_483_647));
        for stop in [
            &b"-1"[..],
            b"-2147483648",
            b"2147483648",
            b"",
            b"-",
            b"+5",
            b" 5",
            b"5 ",
            b"1.5",
            b"00",
            b"-0",
            b"0x10",
        ] {
            assert_eq!(
                parse_grpc_pushback(stop),
                Pushback::Stop,
                "{}",
                String::from_utf8_lossy(stop)
            );
        }
    }

    #[test]
    fn grpc_pushback_in_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(grpc_pushback(&h), Pushback::None);
        h.append(GRPC_RETRY_PUSHBACK_MS, "30".parse().unwrap());
        assert_eq!(
            grpc_pushback(&h),
            Pushback::After(Duration::from_millis(30))
        );
        h.append(GRPC_RETRY_PUSHBACK_MS, "30".parse().unwrap());
        assert_eq!(grpc_pushback(&h), Pushback::Stop, "two values");
    }

    #[test]
    fn retry_after_values() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(parse_retry_after(b"0", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after(b"Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past"
        );
        // The obsolete forms RFC 9110 still asks recipients to accept.
        assert_eq!(
            parse_retry_after(b"Wednesday, 21-Oct-15 07:28:10 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after(b"Wed Oct 21 07:28:20 2015", now),
            Some(Duration::from_secs(20))
        );
        assert_eq!(parse_retry_after(b"-1", now), None);
        assert_eq!(parse_retry_after(b"1.5", now), None);
        assert_eq!(parse_retry_after(b"", now), None);
    }
}
