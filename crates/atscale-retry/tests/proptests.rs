//! Arithmetic on time and tokens, against simple models.

use std::time::Duration;

use atscale_core::RetryThrottle;
use atscale_retry::{Pushback, RetryPolicy, parse_grpc_pushback};
use proptest::prelude::*;

proptest! {
    /// Every backoff is min(initial · multiplier^(n−1), max) × [0.8, 1.2].
    #[test]
    fn backoff_stays_within_its_bounds(
        initial_ms in 1u64..10_000,
        max_ms in 1u64..100_000,
        multiplier in 0.1f64..10.0,
        n in 1u32..40,
        seed in any::<u64>(),
    ) {
        let p = RetryPolicy::builder()
            .initial_backoff(Duration::from_millis(initial_ms))
            .max_backoff(Duration::from_millis(max_ms))
            .multiplier(multiplier)
            .jitter_seed(seed)
            .build()
            .unwrap();
        let model = (initial_ms as f64 * multiplier.powi(n as i32 - 1)).min(max_ms as f64) / 1e3;
        let base = p.base_backoff(n).as_secs_f64();
        prop_assert!((base - model).abs() <= model * 1e-9 + 1e-9, "{base} vs {model}");
        let jittered = p.backoff(n).as_secs_f64();
        prop_assert!(jittered >= base * 0.8 - 1e-9 && jittered <= base * 1.2 + 1e-9);
    }

    /// The lock-free count in thousandths follows the A6 rules exactly: a
    /// model in whole thousandths, clamped to [0, max].
    #[test]
    fn throttle_matches_the_a6_model(
        max in 1u32..=1000,
        ratio_milli in 1u32..=5000,
        steps in proptest::collection::vec(any::<bool>(), 0..400),
    ) {
        let t = RetryThrottle::new(max, f64::from(ratio_milli) / 1000.0).unwrap();
        let mut model = i64::from(max) * 1000;
        for success in steps {
            if success {
                t.success();
                model = (model + i64::from(ratio_milli)).min(i64::from(max) * 1000);
            } else {
                let allowed = t.failure();
                model = (model - 1000).max(0);
                prop_assert_eq!(allowed, model * 2 > i64::from(max) * 1000);
            }
            prop_assert_eq!(i64::from(t.milli_tokens()), model);
            prop_assert_eq!(t.allows(), model * 2 > i64::from(max) * 1000);
        }
    }

    /// `grpc-retry-pushback-ms`: a canonical non-negative i32 is that many
    /// milliseconds; anything else says not to retry.
    #[test]
    fn pushback_values(v in any::<i64>(), junk in "[ -~]{0,12}") {
        let text = v.to_string();
        let want = if (0..=i64::from(i32::MAX)).contains(&v) {
            Pushback::After(Duration::from_millis(v as u64))
        } else {
            Pushback::Stop
        };
        prop_assert_eq!(parse_grpc_pushback(text.as_bytes()), want);
        let canonical = junk.parse::<i32>().ok().filter(|n| n.to_string() == junk);
        let want = match canonical {
            Some(n) if n >= 0 => Pushback::After(Duration::from_millis(n as u64)),
            _ => Pushback::Stop,
        };
        prop_assert_eq!(parse_grpc_pushback(junk.as_bytes()), want);
    }
}
