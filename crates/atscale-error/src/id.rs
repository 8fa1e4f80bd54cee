//! Error ids: 128 random bits from the operating system.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The id of one enriched error: 128 bits from the operating system's random
/// number generator, shown as 32 lower-case hexadecimal digits.
///
/// It is what a user quotes to support, and what finds the error's log line.
/// It cannot be guessed, so it reveals nothing and cannot be enumerated.
/// Parse one back with [`str::parse`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ErrorId(u128);

impl ErrorId {
    /// A new random id.
    ///
    /// Should the operating system's generator fail (it does not on any
    /// supported platform once booted), the id is derived from the standard
    /// library's randomly keyed hasher instead of failing the error path.
    pub fn random() -> Self {
        let mut bytes = [0_u8; 16];
        match getrandom::fill(&mut bytes) {
            Ok(()) => ErrorId(u128::from_ne_bytes(bytes)),
            Err(_) => ErrorId(fallback()),
        }
    }

    pub(crate) const fn from_u128(bits: u128) -> Self {
        ErrorId(bits)
    }

    /// The id's 128 bits.
    pub const fn as_u128(self) -> u128 {
        self.0
    }
}

fn fallback() -> u128 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let hi = RandomState::new().hash_one((n, t));
    let lo = RandomState::new().hash_one((t, n));
    (u128::from(hi) << 64) | u128::from(lo)
}

impl fmt::Display for ErrorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!("{:032x}", self.0))
    }
}

impl fmt::Debug for ErrorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ErrorId({:032x})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_32_hex_digits_and_distinct() {
        let ids: HashSet<String> = (0..1000).map(|_| ErrorId::random().to_string()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(id.len(), 32);
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            );
        }
        assert_eq!(ErrorId::from_u128(1).to_string(), format!("{:032}", 1));
    }

    #[test]
    fn ids_use_all_128_bits() {
        // Over 64 random ids, every bit position is set at least once and
        // cleared at least once, unless the generator is broken (chance 2^-57).
        let ids: Vec<u128> = (0..64).map(|_| ErrorId::random().as_u128()).collect();
        let ones = ids.iter().fold(0, |acc, id| acc | id);
        let zeros = ids.iter().fold(0, |acc, id| acc | !id);
        assert_eq!(ones, u128::MAX);
        assert_eq!(zeros, u128::MAX);
    }

    #[test]
    fn the_fallback_differs_between_calls() {
        assert_ne!(fallback(), fallback());
    }
}
