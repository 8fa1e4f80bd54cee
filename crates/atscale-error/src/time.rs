//! Wall-clock timestamps shown in RFC 3339.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// When an error was enriched: a wall-clock [`SystemTime`] whose `Display` is
/// RFC 3339 in UTC with milliseconds, such as `2026-11-26T22:07:13.042Z`.
///
/// Times before 1970 show as the epoch, times after the year 9999 as its
/// last millisecond (RFC 3339 has four-digit years).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(SystemTime);

/// 9999-12-31T23:59:59Z, the last second RFC 3339 can write.
const MAX_SECS: u64 = 253_402_300_799;

impl Timestamp {
    pub(crate) const fn new(at: SystemTime) -> Self {
        Timestamp(at)
    }

    /// The wall-clock time.
    pub const fn system_time(self) -> SystemTime {
        self.0
    }
}

impl From<Timestamp> for SystemTime {
    fn from(t: Timestamp) -> SystemTime {
        t.0
    }
}

/// Splits seconds and milliseconds since the epoch into
/// (year, month, day, hour, minute, second, millisecond).
fn civil(secs: u64, millis: u32) -> (u64, u64, u64, u64, u64, u64, u32) {
    let (secs, millis) = if secs > MAX_SECS {
        (MAX_SECS, 999)
    } else {
        (secs, millis)
    };
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Howard Hinnant's `civil_from_days`, for days on or after 1970-01-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (
        year,
        month,
        day,
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60,
        millis,
    )
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let since = self.0.duration_since(UNIX_EPOCH).unwrap_or_default();
        let (y, mo, d, h, mi, s, ms) = civil(since.as_secs(), since.subsec_millis());
        f.pad(&format!(
            "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn show(secs: u64, millis: u64) -> String {
        Timestamp::new(UNIX_EPOCH + Duration::from_millis(secs * 1000 + millis)).to_string()
    }

    #[test]
    fn known_instants() {
        assert_eq!(show(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(show(951_782_400, 7), "2000-02-29T00:00:00.007Z");
        assert_eq!(show(1_078_099_199, 999), "2004-02-29T23:59:59.999Z");
        assert_eq!(show(2_147_483_647, 0), "2038-01-19T03:14:07.000Z");
        assert_eq!(show(4_107_542_400, 0), "2100-03-01T00:00:00.000Z");
        assert_eq!(show(MAX_SECS, 0), "9999-12-31T23:59:59.000Z");
        assert_eq!(show(MAX_SECS + 1, 0), "9999-12-31T23:59:59.999Z");
        let before = Timestamp::new(UNIX_EPOCH - Duration::from_secs(5));
        assert_eq!(before.to_string(), "1970-01-01T00:00:00.000Z");
    }

    fn is_leap(y: u64) -> bool {
        (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400)
    }

    /// A slow, obviously correct count of days from 1970-01-01.
    fn days_since_epoch(y: u64, m: u64, d: u64) -> u64 {
        let mut days = 0;
        for year in 1970..y {
            days += if is_leap(year) { 366 } else { 365 };
        }
        let lengths = [
            31,
            if is_leap(y) { 29 } else { 28 },
            31,
            30,
            31,
            30,
            31,
            31,
            30,
            31,
            30,
            31,
        ];
        days + lengths[..(m - 1) as usize].iter().sum::<u64>() + d - 1
    }

    proptest! {
        #[test]
        fn civil_agrees_with_counting_days(secs in 0..=MAX_SECS, millis in 0_u32..1000) {
            let (y, mo, d, h, mi, s, ms) = civil(secs, millis);
            prop_assert!((1..=12).contains(&mo));
            prop_assert!((1..=31).contains(&d));
            prop_assert_eq!(days_since_epoch(y, mo, d) * 86_400 + h * 3_600 + mi * 60 + s, secs);
            prop_assert_eq!(ms, millis);
        }
    }
}
