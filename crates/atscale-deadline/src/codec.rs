//! Wire formats for deadlines: gRPC's `grpc-timeout` and a budget in milliseconds.
//!
//! Parsers reject anything the format does not allow with a
//! [`MalformedDeadline`] that names the header and the reason; they never
//! read a bad value as "no deadline" and never panic.

use std::time::Duration;

use atscale_core::MalformedDeadline;
use http::{HeaderMap, HeaderName, HeaderValue};

/// The `grpc-timeout` header name.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// The largest value `grpc-timeout` allows: eight ASCII digits.
const GRPC_MAX_VALUE: u64 = 99_999_999;

/// Parses a `grpc-timeout` value as the gRPC over HTTP/2 spec defines it:
/// `TimeoutValue TimeoutUnit`, where the value is 1 to 8 ASCII digits and the
/// unit one of `H` (hours), `M` (minutes), `S` (seconds), `m` (milliseconds),
/// `u` (microseconds), `n` (nanoseconds).
///
/// ```
/// use std::time::Duration;
/// use atscale_deadline::codec::parse_grpc_timeout;
///
/// assert_eq!(parse_grpc_timeout(b"250m"), Ok(Duration::from_millis(250)));
/// assert!(parse_grpc_timeout(b"123456789S").is_err()); // nine digits
/// ```
///
/// # Errors
///
/// [`MalformedDeadline`] when the value is empty, has no unit or an unknown
/// one, has no digits or more than eight, or holds anything but ASCII digits
/// before the unit.
pub fn parse_grpc_timeout(value: &[u8]) -> Result<Duration, MalformedDeadline> {
    let bad = |reason| MalformedDeadline::new("grpc-timeout", reason);
    let (&unit, digits) = value.split_last().ok_or_else(|| bad("empty value"))?;
    let amount = parse_digits(digits, 8).map_err(bad)?;
    Ok(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        b'0'..=b'9' => return Err(bad("missing unit")),
        _ => return Err(bad("unknown unit, expected one of H M S m u n")),
    })
}

/// Encodes `budget` as a `grpc-timeout` value: the finest unit whose value
/// fits in eight digits, rounded up so the callee never gets less time than
/// the caller has left. Budgets beyond the format's range (about 11,400 years)
/// are written as its maximum.
pub fn encode_grpc_timeout(budget: Duration) -> HeaderValue {
    const UNITS: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    let nanos = budget.as_nanos();
    let (amount, unit) = UNITS
        .iter()
        .find_map(|&(size, unit)| {
            let amount = nanos.div_ceil(size);
            (amount <= u128::from(GRPC_MAX_VALUE)).then_some((amount, unit))
        })
        .unwrap_or((u128::from(GRPC_MAX_VALUE), 'H'));
    HeaderValue::try_from(format!("{amount}{unit}"))
        .expect("digits and a letter are a valid header value")
}

/// Parses a budget in whole milliseconds: 1 to 20 ASCII digits, no sign, no
/// spaces, no unit.
///
/// # Errors
///
/// [`MalformedDeadline`] naming `header` when the value is empty, holds
/// anything but ASCII digits, or does not fit in a `u64`.
pub fn parse_millis(header: &HeaderName, value: &[u8]) -> Result<Duration, MalformedDeadline> {
    parse_digits(value, 20)
        .map(Duration::from_millis)
        .map_err(|reason| MalformedDeadline::new(header.as_str(), reason))
}

/// Encodes `budget` as whole milliseconds, rounded up.
pub fn encode_millis(budget: Duration) -> HeaderValue {
    let millis = u64::try_from(budget.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    HeaderValue::from(millis)
}

/// The single value of `name` in `headers`: `None` when absent, an error when
/// repeated (two deadlines from one caller are a bug or an attack, and
/// picking one silently would hide it).
pub(crate) fn single<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Result<Option<&'a HeaderValue>, MalformedDeadline> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => Ok(None),
        (Some(value), None) => Ok(Some(value)),
        (Some(_), Some(_)) => Err(MalformedDeadline::new(name.as_str(), "header repeated")),
    }
}

/// Up to this many header values, [`deadline_headers`] scans the map once
/// instead of hashing each name for a lookup.
const SCAN_LIMIT: usize = 16;

/// The single values of `grpc-timeout` (when `grpc`) and of `header` (when
/// set), each as [`single`] finds it.
///
/// A request's map is small: one pass comparing names (a standard header
/// against a custom name differs at its first word) costs less than hashing
/// two custom names; a larger map gets the lookups.
pub(crate) fn deadline_headers<'a>(
    headers: &'a HeaderMap,
    grpc: bool,
    header: Option<&HeaderName>,
) -> (Found<'a>, Found<'a>) {
    if headers.len() > SCAN_LIMIT {
        let grpc = if grpc {
            single(headers, &GRPC_TIMEOUT)
        } else {
            Ok(None)
        };
        let own = header.map_or(Ok(None), |name| single(headers, name));
        return (grpc, own);
    }
    let (mut found_grpc, mut found_own) = ((None, 0u8), (None, 0u8));
    for (name, value) in headers {
        if grpc && *name == GRPC_TIMEOUT {
            found_grpc = (Some(value), found_grpc.1.saturating_add(1));
        }
        if header == Some(name) {
            found_own = (Some(value), found_own.1.saturating_add(1));
        }
    }
    let own = match header {
        Some(name) => only(found_own, name),
        None => Ok(None),
    };
    (only(found_grpc, &GRPC_TIMEOUT), own)
}

/// A value seen `n` times while scanning: repeated is an error, as in [`single`].
fn only<'a>((value, n): (Option<&'a HeaderValue>, u8), name: &HeaderName) -> Found<'a> {
    if n > 1 {
        return Err(MalformedDeadline::new(name.as_str(), "header repeated"));
    }
    Ok(value)
}

/// What [`deadline_headers`] found of one header.
pub(crate) type Found<'a> = Result<Option<&'a HeaderValue>, MalformedDeadline>;

fn parse_digits(digits: &[u8], max_len: usize) -> Result<u64, &'static str> {
    if digits.is_empty() {
        return Err("missing digits");
    }
    if !digits.iter().all(u8::is_ascii_digit) {
        return Err("expected only ASCII digits");
    }
    if digits.len() > max_len {
        return Err("too many digits");
    }
    digits
        .iter()
        .try_fold(0u64, |n, d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .ok_or("value too large")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_grpc_unit() {
        let cases = [
            ("2H", Duration::from_secs(7200)),
            ("3M", Duration::from_secs(180)),
            ("4S", Duration::from_secs(4)),
            ("5m", Duration::from_millis(5)),
            ("6u", Duration::from_micros(6)),
            ("7n", Duration::from_nanos(7)),
            ("0S", Duration::ZERO),
            ("00000001m", Duration::from_millis(1)),
            ("99999999H", Duration::from_secs(99_999_999 * 3600)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_grpc_timeout(text.as_bytes()), Ok(want), "{text}");
        }
    }

    #[test]
    fn bad_grpc_values_are_rejected_with_a_reason() {
        let cases: [(&[u8], &str); 10] = [
            (b"", "empty value"),
            (b"m", "missing digits"),
            (b"123456789S", "too many digits"),
            (b"10", "missing unit"),
            (b"10s", "unknown unit, expected one of H M S m u n"),
            (b"10x", "unknown unit, expected one of H M S m u n"),
            (b"-1S", "expected only ASCII digits"),
            (b" 1S", "expected only ASCII digits"),
            ("١٢S".as_bytes(), "expected only ASCII digits"),
            (b"1\xffS", "expected only ASCII digits"),
        ];
        for (text, reason) in cases {
            let err = parse_grpc_timeout(text).unwrap_err();
            assert_eq!(err.reason(), reason, "{text:?}");
            assert_eq!(err.header(), "grpc-timeout");
        }
        // A non-ASCII unit: the last byte of a multi-byte character.
        assert!(parse_grpc_timeout("1µ".as_bytes()).is_err());
    }

    #[test]
    fn millis_overflow_and_junk_are_rejected() {
        let name = HeaderName::from_static("x-deadline-ms");
        assert_eq!(
            parse_millis(&name, b"1500"),
            Ok(Duration::from_millis(1500))
        );
        assert_eq!(parse_millis(&name, b"0"), Ok(Duration::ZERO));
        let too_big = b"18446744073709551616"; // u64::MAX + 1
        assert_eq!(
            parse_millis(&name, too_big).unwrap_err().reason(),
            "value too large"
        );
        assert_eq!(
            parse_millis(&name, b"123456789012345678901")
                .unwrap_err()
                .reason(),
            "too many digits"
        );
        for bad in [&b""[..], b"1.5", b"+1", b"1ms", b"1 "] {
            let err = parse_millis(&name, bad).unwrap_err();
            assert_eq!(err.header(), "x-deadline-ms");
        }
    }

    #[test]
    fn repeated_headers_are_rejected() {
        let mut headers = HeaderMap::new();
        assert_eq!(single(&headers, &GRPC_TIMEOUT), Ok(None));
        headers.append(GRPC_TIMEOUT, HeaderValue::from_static("1S"));
        assert!(single(&headers, &GRPC_TIMEOUT).unwrap().is_some());
        headers.append(GRPC_TIMEOUT, HeaderValue::from_static("2S"));
        assert_eq!(
            single(&headers, &GRPC_TIMEOUT).unwrap_err().reason(),
            "header repeated"
        );
    }

    #[test]
    fn both_deadline_headers_are_found_alike_in_small_and_large_maps() {
        let own = HeaderName::from_static("x-deadline-ms");
        // Padding past the scan limit switches to hashed lookups: both ways
        // must find the same values and reject the same repeats.
        for padding in [0, SCAN_LIMIT] {
            let mut headers = HeaderMap::new();
            for i in 0..padding {
                let name = HeaderName::try_from(format!("x-pad-{i}")).unwrap();
                headers.insert(name, HeaderValue::from_static("1"));
            }
            headers.insert(http::header::HOST, HeaderValue::from_static("example.com"));
            let (grpc, mine) = deadline_headers(&headers, true, Some(&own));
            assert_eq!((grpc, mine), (Ok(None), Ok(None)), "padding {padding}");

            headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("1S"));
            headers.insert(own.clone(), HeaderValue::from_static("250"));
            let (grpc, mine) = deadline_headers(&headers, true, Some(&own));
            assert_eq!(grpc.unwrap().unwrap(), "1S", "padding {padding}");
            assert_eq!(mine.unwrap().unwrap(), "250", "padding {padding}");
            // a header not asked for is not looked at
            let (grpc, mine) = deadline_headers(&headers, false, None);
            assert_eq!((grpc, mine), (Ok(None), Ok(None)), "padding {padding}");

            headers.append(own.clone(), HeaderValue::from_static("300"));
            let (grpc, mine) = deadline_headers(&headers, true, Some(&own));
            assert_eq!(grpc.unwrap().unwrap(), "1S", "padding {padding}");
            let err = mine.unwrap_err();
            assert_eq!(
                (err.header(), err.reason()),
                ("x-deadline-ms", "header repeated")
            );

            headers.append(GRPC_TIMEOUT, HeaderValue::from_static("2S"));
            let (grpc, _) = deadline_headers(&headers, true, Some(&own));
            let err = grpc.unwrap_err();
            assert_eq!(
                (err.header(), err.reason()),
                ("grpc-timeout", "header repeated")
            );
        }
    }

    #[test]
    fn encoding_picks_the_finest_unit_and_saturates() {
        assert_eq!(
            encode_grpc_timeout(Duration::from_nanos(99_999_999)),
            "99999999n"
        );
        assert_eq!(encode_grpc_timeout(Duration::from_millis(250)), "250000u");
        assert_eq!(encode_grpc_timeout(Duration::from_secs(30)), "30000000u");
        assert_eq!(encode_grpc_timeout(Duration::from_secs(300)), "300000m");
        assert_eq!(encode_grpc_timeout(Duration::MAX), "99999999H");
        assert_eq!(encode_millis(Duration::from_micros(1)), "1");
        assert_eq!(encode_millis(Duration::MAX), u64::MAX.to_string().as_str());
    }

    proptest! {
        #[test]
        fn grpc_encoding_round_trips_without_losing_time(nanos in 0u64..u64::MAX) {
            let budget = Duration::from_nanos(nanos);
            let value = encode_grpc_timeout(budget);
            let back = parse_grpc_timeout(value.as_bytes()).unwrap();
            prop_assert!(back >= budget, "{value:?} -> {back:?} < {budget:?}");
            // rounding up costs less than one unit, and a unit is at most 1/10^5 of a value that needs it
            prop_assert!(back - budget <= budget / 100_000);
        }

        #[test]
        fn grpc_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..12)) {
            let _ = parse_grpc_timeout(&bytes);
        }

        #[test]
        fn millis_round_trip(ms in any::<u64>()) {
            let name = HeaderName::from_static("x-deadline-ms");
            let value = encode_millis(Duration::from_millis(ms));
            prop_assert_eq!(parse_millis(&name, value.as_bytes()), Ok(Duration::from_millis(ms)));
        }
    }
}
