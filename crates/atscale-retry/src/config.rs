//! The gRPC service config (`methodConfig`, `retryPolicy`, `hedgingPolicy`,
//! `retryThrottling`), parsed with serde and validated by gRFC A6's rules.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use atscale_core::{Kind, RetryThrottle};
use serde::Deserialize;
use serde_json::Value;

use crate::code::{Code, CodeSet};
use crate::error::InvalidConfig;
use crate::policy::{MAX_ATTEMPTS, RetryPolicy, check_codes};

/// A gRPC service config: per-method timeouts and retry or hedging
/// policies, and the channel's retry throttling, validated as gRFC A6 asks
/// (an invalid field is an error naming it and its rule, never a silent
/// default).
///
/// Fields this crate does not use (`loadBalancingConfig`, `waitForReady`,
/// message size limits, …) are accepted and ignored, as gRPC does.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use atscale_retry::{MethodPolicy, ServiceConfig};
///
/// let config: ServiceConfig = r#"{
///   "methodConfig": [{
///     "name": [{"service": "helloworld.Greeter"}],
///     "timeout": "1.5s",
///     "retryPolicy": {
///       "maxAttempts": 4,
///       "initialBackoff": "0.1s",
///       "maxBackoff": "1s",
///       "backoffMultiplier": 2,
///       "retryableStatusCodes": ["UNAVAILABLE"]
///     }
///   }],
///   "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}
/// }"#
/// .parse()?;
///
/// let method = config.method("/helloworld.Greeter/SayHello").unwrap();
/// assert_eq!(method.timeout(), Some(Duration::from_millis(1500)));
/// let Some(MethodPolicy::Retry(retry)) = method.policy() else { panic!() };
/// assert_eq!(retry.max_attempts(), 4);
/// assert!(config.method("/other.Service/Call").is_none());
///
/// let bad = r#"{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 1}}]}"#;
/// let err = bad.parse::<ServiceConfig>().unwrap_err();
/// assert_eq!(err.path(), "methodConfig[0].retryPolicy.maxAttempts");
/// # Ok::<(), atscale_retry::InvalidConfig>(())
/// ```
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(try_from = "RawServiceConfig")]
pub struct ServiceConfig {
    configs: Vec<Arc<MethodConfig>>,
    /// `"service/method"` → index into `configs`.
    methods: HashMap<String, usize>,
    /// `"service"` → index.
    services: HashMap<String, usize>,
    default: Option<usize>,
    throttling: Option<Throttling>,
}

/// One `methodConfig` entry: the timeout and the retry or hedging policy of
/// the methods it names.
#[derive(Clone, Debug, Default)]
pub struct MethodConfig {
    timeout: Option<Duration>,
    policy: Option<MethodPolicy>,
}

impl MethodConfig {
    /// The deadline of each call (`timeout`), if set.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The retry or hedging policy, if either is set (never both: A6).
    pub fn policy(&self) -> Option<&MethodPolicy> {
        self.policy.as_ref()
    }
}

/// A method's policy: retries or hedges, one or the other (gRFC A6).
#[derive(Clone, Debug)]
pub enum MethodPolicy {
    /// `retryPolicy`.
    Retry(RetryPolicy),
    /// `hedgingPolicy`.
    Hedge(HedgingPolicy),
}

/// A6's `hedgingPolicy`: up to `max_attempts` copies of a call, one every
/// `delay`, until one succeeds or fails with a code not in `non_fatal`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HedgingPolicy {
    max_attempts: u8,
    delay: Duration,
    non_fatal: CodeSet,
}

impl HedgingPolicy {
    /// The most attempts, the first included (2 to 5).
    pub fn max_attempts(&self) -> u8 {
        self.max_attempts
    }

    /// The delay between copies (`hedgingDelay`, zero when unset: all at once).
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// The codes after which the other copies may still succeed.
    pub fn non_fatal_codes(&self) -> CodeSet {
        self.non_fatal
    }
}

/// A6's `retryThrottling`: the settings of the channel's [`RetryThrottle`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Throttling {
    max_tokens: u32,
    token_ratio: f64,
}

impl Throttling {
    /// `maxTokens` (1 to 1000).
    pub fn max_tokens(&self) -> u32 {
        self.max_tokens
    }

    /// `tokenRatio`, three decimals.
    pub fn token_ratio(&self) -> f64 {
        self.token_ratio
    }

    /// A new throttle with these settings (one per channel: clones share it).
    pub fn throttle(&self) -> RetryThrottle {
        RetryThrottle::new(self.max_tokens, self.token_ratio).expect("validated when parsed")
    }
}

impl ServiceConfig {
    /// Parses and validates a service config in JSON.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] naming the field (`methodConfig[1].name[0].method`,
    /// `retryThrottling.maxTokens`, …) and the rule it broke; JSON that is
    /// not a service config at all names no field.
    pub fn from_json(json: &str) -> Result<Self, InvalidConfig> {
        let raw: RawServiceConfig = serde_json::from_str(json)
            .map_err(|e| InvalidConfig::new("", format!("not a service config: {e}")))?;
        raw.try_into()
    }

    /// The config of the method at `path` (`/pkg.Service/Method`, an HTTP/2
    /// `:path`), by gRPC's rule: the entry naming the method, else the one
    /// naming its service, else the default (a name with neither).
    pub fn method(&self, path: &str) -> Option<&MethodConfig> {
        self.index(path).map(|i| &*self.configs[i])
    }

    pub(crate) fn index(&self, path: &str) -> Option<usize> {
        let path = path.strip_prefix('/').unwrap_or(path);
        if let Some(&i) = self.methods.get(path) {
            return Some(i);
        }
        let service = path.split_once('/').map_or(path, |(s, _)| s);
        self.services.get(service).copied().or(self.default)
    }

    pub(crate) fn configs(&self) -> &[Arc<MethodConfig>] {
        &self.configs
    }

    /// The `retryThrottling` settings, if any.
    pub fn throttling(&self) -> Option<&Throttling> {
        self.throttling.as_ref()
    }
}

impl FromStr for ServiceConfig {
    type Err = InvalidConfig;

    fn from_str(json: &str) -> Result<Self, InvalidConfig> {
        ServiceConfig::from_json(json)
    }
}

// The wire form: structure by serde, every leaf kept as JSON so that each
// rule can name its field. Field names in lowerCamelCase (proto3 JSON), and
// also as the proto spells them (snake_case) and in PascalCase, which gRPC
// Go's case-insensitive decoder accepts and its examples use.

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawServiceConfig {
    #[serde(default, alias = "MethodConfig", alias = "method_config")]
    method_config: Option<Vec<RawMethodConfig>>,
    #[serde(default, alias = "RetryThrottling", alias = "retry_throttling")]
    retry_throttling: Option<RawThrottling>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMethodConfig {
    #[serde(default, alias = "Name")]
    name: Option<Vec<RawName>>,
    #[serde(default, alias = "Timeout")]
    timeout: Option<Value>,
    #[serde(default, alias = "RetryPolicy", alias = "retry_policy")]
    retry_policy: Option<RawRetryPolicy>,
    #[serde(default, alias = "HedgingPolicy", alias = "hedging_policy")]
    hedging_policy: Option<RawHedgingPolicy>,
}

#[derive(Deserialize)]
struct RawName {
    #[serde(default, alias = "Service")]
    service: Option<Value>,
    #[serde(default, alias = "Method")]
    method: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRetryPolicy {
    #[serde(default, alias = "MaxAttempts", alias = "max_attempts")]
    max_attempts: Option<Value>,
    #[serde(default, alias = "InitialBackoff", alias = "initial_backoff")]
    initial_backoff: Option<Value>,
    #[serde(default, alias = "MaxBackoff", alias = "max_backoff")]
    max_backoff: Option<Value>,
    #[serde(default, alias = "BackoffMultiplier", alias = "backoff_multiplier")]
    backoff_multiplier: Option<Value>,
    #[serde(
        default,
        alias = "RetryableStatusCodes",
        alias = "retryable_status_codes"
    )]
    retryable_status_codes: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawHedgingPolicy {
    #[serde(default, alias = "MaxAttempts", alias = "max_attempts")]
    max_attempts: Option<Value>,
    #[serde(default, alias = "HedgingDelay", alias = "hedging_delay")]
    hedging_delay: Option<Value>,
    #[serde(
        default,
        alias = "NonFatalStatusCodes",
        alias = "non_fatal_status_codes"
    )]
    non_fatal_status_codes: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawThrottling {
    #[serde(default, alias = "MaxTokens", alias = "max_tokens")]
    max_tokens: Option<Value>,
    #[serde(default, alias = "TokenRatio", alias = "token_ratio")]
    token_ratio: Option<Value>,
}

fn invalid(path: &str, rule: impl Into<String>) -> InvalidConfig {
    InvalidConfig::new(path, rule)
}

fn required<'a>(value: &'a Option<Value>, path: &str) -> Result<&'a Value, InvalidConfig> {
    match value {
        Some(Value::Null) | None => Err(invalid(path, "is required")),
        Some(v) => Ok(v),
    }
}

/// `maxAttempts`: a JSON integer greater than 1; more than 5 is 5.
fn max_attempts(value: &Option<Value>, path: &str) -> Result<u8, InvalidConfig> {
    let v = required(value, path)?;
    let rule = "must be a JSON integer greater than 1";
    if let Some(n) = v.as_u64() {
        return if n >= 2 {
            Ok(n.min(u64::from(MAX_ATTEMPTS)) as u8)
        } else {
            Err(invalid(path, rule))
        };
    }
    Err(invalid(path, rule))
}

/// A proto3 `Duration` in JSON: decimal seconds with up to nine fractional
/// digits and an `s` (`"1s"`, `"0.250s"`, `"1.000000001s"`, `".01s"`); negative
/// durations are refused here, as no field takes one.
fn duration(value: &Value, path: &str) -> Result<Duration, InvalidConfig> {
    let rule = "must be a proto3 JSON duration: decimal seconds ending in \"s\", such as \"0.1s\"";
    let Some(text) = value.as_str() else {
        return Err(invalid(path, rule));
    };
    let Some(number) = text.strip_suffix('s') else {
        return Err(invalid(path, rule));
    };
    if number.starts_with('-') {
        return Err(invalid(path, "must not be negative"));
    }
    // The whole part or the fraction may be left out, not both (".5s" and
    // "1.s" are read as gRPC Go reads them).
    let (secs, frac) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !digits(secs) || !digits(frac) || (secs.is_empty() && frac.is_empty()) || frac.len() > 9 {
        return Err(invalid(path, rule));
    }
    let secs: u64 = if secs.is_empty() {
        0
    } else {
        secs.parse().map_err(|_| invalid(path, "is too large"))?
    };
    let nanos: u32 = format!("{frac:0<9}").parse().expect("nine digits");
    Ok(Duration::new(secs, nanos))
}

fn positive_duration(value: &Option<Value>, path: &str) -> Result<Duration, InvalidConfig> {
    let d = duration(required(value, path)?, path)?;
    if d.is_zero() {
        return Err(invalid(path, "must be greater than zero"));
    }
    Ok(d)
}

/// A list of status codes, each an integer or a case-insensitive name.
fn codes(value: &Value, path: &str) -> Result<Vec<Code>, InvalidConfig> {
    let Some(list) = value.as_array() else {
        return Err(invalid(path, "must be a JSON array of status codes"));
    };
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            let code = match v {
                Value::Number(n) => n
                    .as_i64()
                    .and_then(|n| i32::try_from(n).ok())
                    .and_then(Code::from_i32),
                Value::String(s) => Code::from_name(s),
                _ => None,
            };
            code.ok_or_else(|| {
                invalid(
                    &format!("{path}[{i}]"),
                    "must be a gRPC status code, as an integer (14) or a name (\"UNAVAILABLE\")",
                )
            })
        })
        .collect()
}

fn retry_policy(raw: &RawRetryPolicy, path: &str) -> Result<RetryPolicy, InvalidConfig> {
    let at = |field: &str| format!("{path}.{field}");
    let attempts = max_attempts(&raw.max_attempts, &at("maxAttempts"))?;
    let initial = positive_duration(&raw.initial_backoff, &at("initialBackoff"))?;
    let max = positive_duration(&raw.max_backoff, &at("maxBackoff"))?;
    let multiplier_path = at("backoffMultiplier");
    let multiplier = required(&raw.backoff_multiplier, &multiplier_path)?
        .as_f64()
        .filter(|m| *m > 0.0 && m.is_finite())
        .ok_or_else(|| invalid(&multiplier_path, "must be a JSON number greater than 0"))?;
    let codes_path = at("retryableStatusCodes");
    let list = codes(
        required(&raw.retryable_status_codes, &codes_path)?,
        &codes_path,
    )?;
    if list.is_empty() {
        return Err(invalid(&codes_path, "must not be empty"));
    }
    check_codes(&list).map_err(|rule| invalid(&codes_path, rule))?;
    // Calls that never reached the server are always retried (A6's
    // transparent retries); atscale's overloaded and rate-limited errors
    // when their code is listed.
    let set: CodeSet = list.iter().copied().collect();
    let mut kinds = vec![Kind::Unreachable];
    if set.contains(Code::Unavailable) {
        kinds.push(Kind::Overloaded);
    }
    if set.contains(Code::ResourceExhausted) {
        kinds.push(Kind::RateLimited);
    }
    RetryPolicy::builder()
        .max_attempts(u32::from(attempts))
        .initial_backoff(initial)
        .max_backoff(max)
        .multiplier(multiplier)
        .retryable_codes(list)
        .retryable_kinds(kinds)
        .non_idempotent(true) // the service owner chose to retry these methods
        .build()
        .map_err(|e| e.under(path))
}

fn hedging_policy(raw: &RawHedgingPolicy, path: &str) -> Result<HedgingPolicy, InvalidConfig> {
    let at = |field: &str| format!("{path}.{field}");
    let max_attempts = max_attempts(&raw.max_attempts, &at("maxAttempts"))?;
    let delay = match &raw.hedging_delay {
        None | Some(Value::Null) => Duration::ZERO,
        Some(v) => duration(v, &at("hedgingDelay"))?,
    };
    let non_fatal = match &raw.non_fatal_status_codes {
        None | Some(Value::Null) => CodeSet::empty(),
        Some(v) => codes(v, &at("nonFatalStatusCodes"))?.into_iter().collect(),
    };
    Ok(HedgingPolicy {
        max_attempts,
        delay,
        non_fatal,
    })
}

fn throttling(raw: &RawThrottling) -> Result<Throttling, InvalidConfig> {
    let tokens_path = "retryThrottling.maxTokens";
    let max_tokens = required(&raw.max_tokens, tokens_path)?
        .as_u64()
        .filter(|n| (1..=1000).contains(n))
        .ok_or_else(|| invalid(tokens_path, "must be a JSON integer in (0, 1000]"))?;
    let ratio_path = "retryThrottling.tokenRatio";
    let ratio = required(&raw.token_ratio, ratio_path)?
        .as_f64()
        .ok_or_else(|| invalid(ratio_path, "must be a JSON number greater than 0"))?;
    let throttle = RetryThrottle::new(max_tokens as u32, ratio).map_err(|_| {
        invalid(
            ratio_path,
            "must be a JSON number greater than 0 (decimal places beyond 3 are ignored, so at least 0.001)",
        )
    })?;
    Ok(Throttling {
        max_tokens: max_tokens as u32,
        token_ratio: throttle.token_ratio(),
    })
}

fn name_string(value: &Option<Value>, path: &str) -> Result<String, InvalidConfig> {
    match value {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(invalid(path, "must be a string")),
    }
}

impl TryFrom<RawServiceConfig> for ServiceConfig {
    type Error = InvalidConfig;

    fn try_from(raw: RawServiceConfig) -> Result<Self, InvalidConfig> {
        let mut config = ServiceConfig {
            throttling: raw.retry_throttling.as_ref().map(throttling).transpose()?,
            ..ServiceConfig::default()
        };
        // Where each name was first seen, to report duplicates.
        let mut seen: HashMap<(String, String), String> = HashMap::new();
        for (i, mc) in raw.method_config.unwrap_or_default().iter().enumerate() {
            let path = format!("methodConfig[{i}]");
            let timeout = match &mc.timeout {
                None | Some(Value::Null) => None,
                Some(v) => Some(duration(v, &format!("{path}.timeout"))?),
            };
            let policy = match (&mc.retry_policy, &mc.hedging_policy) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        &path,
                        "must not set both retryPolicy and hedgingPolicy (one or the other: gRFC A6)",
                    ));
                }
                (Some(r), None) => Some(MethodPolicy::Retry(retry_policy(
                    r,
                    &format!("{path}.retryPolicy"),
                )?)),
                (None, Some(h)) => Some(MethodPolicy::Hedge(hedging_policy(
                    h,
                    &format!("{path}.hedgingPolicy"),
                )?)),
                (None, None) => None,
            };
            let names = mc.name.as_deref().unwrap_or_default();
            if names.is_empty() {
                continue; // an entry without names applies to nothing (service_config.proto)
            }
            let index = config.configs.len();
            config
                .configs
                .push(Arc::new(MethodConfig { timeout, policy }));
            for (j, name) in names.iter().enumerate() {
                let at = format!("{path}.name[{j}]");
                let service = name_string(&name.service, &format!("{at}.service"))?;
                let method = name_string(&name.method, &format!("{at}.method"))?;
                if service.is_empty() && !method.is_empty() {
                    return Err(invalid(
                        &format!("{at}.method"),
                        "must be empty when service is empty",
                    ));
                }
                if let Some(first) = seen.insert((service.clone(), method.clone()), at.clone()) {
                    return Err(invalid(
                        &at,
                        format!("must be unique in the service config (same as {first})"),
                    ));
                }
                match (service.is_empty(), method.is_empty()) {
                    (true, _) => config.default = Some(index),
                    (false, true) => {
                        config.services.insert(service, index);
                    }
                    (false, false) => {
                        config.methods.insert(format!("{service}/{method}"), index);
                    }
                }
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> (String, String) {
        let e = ServiceConfig::from_json(json).unwrap_err();
        (e.path().to_owned(), e.rule().to_owned())
    }

    fn retry(body: &str) -> String {
        format!(r#"{{"methodConfig": [{{"name": [{{"service": "s"}}], "retryPolicy": {body}}}]}}"#)
    }

    const GOOD_RETRY: &str = r#"{"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}"#;

    /// The configurations of gRFC A6 and the gRPC retry examples.
    #[test]
    fn valid_configs_from_the_grpc_docs() {
        // A6, "Integration with Service Config", with both policies spelt out.
        let a6 = r#"{
          "loadBalancingPolicy": "round_robin",
          "methodConfig": [
            {"name": [{"service": "helloworld.Greeter", "method": "SayHello"}],
             "waitForReady": true,
             "timeout": "2.5s",
             "maxRequestMessageBytes": 1024,
             "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "1s",
                             "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}},
            {"name": [{"service": "helloworld.Greeter"}],
             "hedgingPolicy": {"maxAttempts": 4, "hedgingDelay": "0.5s",
                               "nonFatalStatusCodes": ["UNAVAILABLE", "INTERNAL", "ABORTED"]}},
            {"name": [{}],
             "hedgingPolicy": {"maxAttempts": 4, "hedgingDelay": "0s",
                               "nonFatalStatusCodes": ["UNAVAILABLE", "INTERNAL", "ABORTED"]}}
          ],
          "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}
        }"#;
        let c = ServiceConfig::from_json(a6).unwrap();
        let m = c.method("/helloworld.Greeter/SayHello").unwrap();
        assert_eq!(m.timeout(), Some(Duration::from_millis(2500)));
        let Some(MethodPolicy::Retry(r)) = m.policy() else {
            panic!("a retry policy")
        };
        assert_eq!(r.max_attempts(), 4);
        assert_eq!(r.base_backoff(1), Duration::from_millis(100));
        assert_eq!(r.base_backoff(5), Duration::from_secs(1));
        assert!(r.retryable_codes().contains(Code::Unavailable));
        let Some(MethodPolicy::Hedge(h)) = c.method("/helloworld.Greeter/Other").unwrap().policy()
        else {
            panic!("the service's hedging policy")
        };
        assert_eq!(
            (h.max_attempts(), h.delay()),
            (4, Duration::from_millis(500))
        );
        assert!(h.non_fatal_codes().contains(Code::Aborted));
        let Some(MethodPolicy::Hedge(d)) = c.method("/any.Other/Call").unwrap().policy() else {
            panic!("the default")
        };
        assert_eq!(d.delay(), Duration::ZERO);
        let t = c.throttling().unwrap();
        assert_eq!((t.max_tokens(), t.token_ratio()), (10, 0.1));

        // gRPC Go's retry example (examples/features/retry), as written there.
        let example = r#"{"methodConfig": [{"name": [{"service": "grpc.examples.echo.Echo"}],
            "waitForReady": true,
            "retryPolicy": {"MaxAttempts": 4, "InitialBackoff": ".01s", "MaxBackoff": ".01s",
              "BackoffMultiplier": 1.0, "RetryableStatusCodes": ["UNAVAILABLE"]}}]}"#;
        let c = ServiceConfig::from_json(example).unwrap();
        let Some(MethodPolicy::Retry(r)) = c
            .method("/grpc.examples.echo.Echo/UnaryEcho")
            .unwrap()
            .policy()
        else {
            panic!()
        };
        assert_eq!(r.max_attempts(), 4);
        assert_eq!(r.base_backoff(3), Duration::from_millis(10));

        // Codes as integers and in lower case, fields as the proto spells them.
        let mixed = r#"{"method_config": [{"name": [{"service": "s"}],
            "retry_policy": {"max_attempts": 2, "initial_backoff": "1s", "max_backoff": "2s",
              "backoff_multiplier": 1.5, "retryable_status_codes": ["unavailable", 8]}}]}"#;
        let c = ServiceConfig::from_json(mixed).unwrap();
        let Some(MethodPolicy::Retry(r)) = c.method("/s/m").unwrap().policy() else {
            panic!()
        };
        assert!(r.retryable_codes().contains(Code::ResourceExhausted));
        assert!(r.retryable_codes().contains(Code::Unavailable));

        // Empty configs, and entries without names.
        assert!(
            ServiceConfig::from_json("{}")
                .unwrap()
                .method("/a.B/C")
                .is_none()
        );
        let unnamed = r#"{"methodConfig": [{"timeout": "1s"}]}"#;
        assert!(
            ServiceConfig::from_json(unnamed)
                .unwrap()
                .method("/a.B/C")
                .is_none()
        );
    }

    #[test]
    fn more_than_five_attempts_are_five() {
        let c = ServiceConfig::from_json(&retry(&GOOD_RETRY.replace("4,", "9,"))).unwrap();
        let Some(MethodPolicy::Retry(r)) = c.method("/s/m").unwrap().policy() else {
            panic!()
        };
        assert_eq!(r.max_attempts(), 5);
    }

    /// Every invalid case A6 lists for retryPolicy, hedgingPolicy and
    /// retryThrottling, and the name rules of service_config.proto.
    #[test]
    fn each_invalid_case_names_its_field() {
        let p = "methodConfig[0].retryPolicy";
        let without = |field: &str| {
            let mut v: serde_json::Value = serde_json::from_str(GOOD_RETRY).unwrap();
            v.as_object_mut().unwrap().remove(field);
            retry(&v.to_string())
        };
        let with = |field: &str, value: &str| {
            let mut v: serde_json::Value = serde_json::from_str(GOOD_RETRY).unwrap();
            v[field] = serde_json::from_str(value).unwrap();
            retry(&v.to_string())
        };
        let cases = [
            // 1. maxAttempts: required, a JSON integer greater than 1.
            (without("maxAttempts"), format!("{p}.maxAttempts")),
            (with("maxAttempts", "1"), format!("{p}.maxAttempts")),
            (with("maxAttempts", "0"), format!("{p}.maxAttempts")),
            (with("maxAttempts", "-3"), format!("{p}.maxAttempts")),
            (with("maxAttempts", "2.5"), format!("{p}.maxAttempts")),
            (with("maxAttempts", "\"3\""), format!("{p}.maxAttempts")),
            // 2. backoffs: required proto3 durations greater than 0.
            (without("initialBackoff"), format!("{p}.initialBackoff")),
            (with("initialBackoff", "\"0s\""), format!("{p}.initialBackoff")),
            (with("initialBackoff", "\"-1s\""), format!("{p}.initialBackoff")),
            (with("initialBackoff", "\"100ms\""), format!("{p}.initialBackoff")),
            (with("initialBackoff", "0.1"), format!("{p}.initialBackoff")),
            (with("initialBackoff", "\"0.1234567891s\""), format!("{p}.initialBackoff")),
            (without("maxBackoff"), format!("{p}.maxBackoff")),
            (with("maxBackoff", "\"0.0s\""), format!("{p}.maxBackoff")),
            (with("maxBackoff", "\".s\""), format!("{p}.maxBackoff")),
            (with("maxBackoff", "\"1m\""), format!("{p}.maxBackoff")),
            // 3. backoffMultiplier: required, a number greater than 0.
            (without("backoffMultiplier"), format!("{p}.backoffMultiplier")),
            (with("backoffMultiplier", "0"), format!("{p}.backoffMultiplier")),
            (with("backoffMultiplier", "-2"), format!("{p}.backoffMultiplier")),
            (with("backoffMultiplier", "\"2\""), format!("{p}.backoffMultiplier")),
            // 4. retryableStatusCodes: required, non-empty, valid codes.
            (without("retryableStatusCodes"), format!("{p}.retryableStatusCodes")),
            (with("retryableStatusCodes", "[]"), format!("{p}.retryableStatusCodes")),
            (with("retryableStatusCodes", "\"UNAVAILABLE\""), format!("{p}.retryableStatusCodes")),
            (with("retryableStatusCodes", "[\"UNAVAILABLE\", \"NOPE\"]"), format!("{p}.retryableStatusCodes[1]")),
            (with("retryableStatusCodes", "[17]"), format!("{p}.retryableStatusCodes[0]")),
            // atscale's rule: never retried codes are refused, not ignored.
            (with("retryableStatusCodes", "[\"DEADLINE_EXCEEDED\"]"), format!("{p}.retryableStatusCodes")),
            // hedgingPolicy: maxAttempts as above; hedgingDelay and codes well-formed.
            (
                r#"{"methodConfig": [{"name": [{"service": "s"}], "hedgingPolicy": {"maxAttempts": 1}}]}"#.into(),
                "methodConfig[0].hedgingPolicy.maxAttempts".into(),
            ),
            (
                r#"{"methodConfig": [{"name": [{"service": "s"}], "hedgingPolicy": {}}]}"#.into(),
                "methodConfig[0].hedgingPolicy.maxAttempts".into(),
            ),
            (
                r#"{"methodConfig": [{"name": [{"service": "s"}], "hedgingPolicy": {"maxAttempts": 2, "hedgingDelay": "1"}}]}"#.into(),
                "methodConfig[0].hedgingPolicy.hedgingDelay".into(),
            ),
            (
                r#"{"methodConfig": [{"name": [{"service": "s"}], "hedgingPolicy": {"maxAttempts": 2, "nonFatalStatusCodes": ["BAD"]}}]}"#.into(),
                "methodConfig[0].hedgingPolicy.nonFatalStatusCodes[0]".into(),
            ),
            // One or the other.
            (
                format!(r#"{{"methodConfig": [{{"name": [{{"service": "s"}}], "retryPolicy": {GOOD_RETRY}, "hedgingPolicy": {{"maxAttempts": 2}}}}]}}"#),
                "methodConfig[0]".into(),
            ),
            // retryThrottling: maxTokens in (0, 1000], tokenRatio > 0.
            (r#"{"retryThrottling": {"tokenRatio": 0.1}}"#.into(), "retryThrottling.maxTokens".into()),
            (r#"{"retryThrottling": {"maxTokens": 0, "tokenRatio": 0.1}}"#.into(), "retryThrottling.maxTokens".into()),
            (r#"{"retryThrottling": {"maxTokens": 1001, "tokenRatio": 0.1}}"#.into(), "retryThrottling.maxTokens".into()),
            (r#"{"retryThrottling": {"maxTokens": 10.5, "tokenRatio": 0.1}}"#.into(), "retryThrottling.maxTokens".into()),
            (r#"{"retryThrottling": {"maxTokens": 10}}"#.into(), "retryThrottling.tokenRatio".into()),
            (r#"{"retryThrottling": {"maxTokens": 10, "tokenRatio": 0}}"#.into(), "retryThrottling.tokenRatio".into()),
            (r#"{"retryThrottling": {"maxTokens": 10, "tokenRatio": -1}}"#.into(), "retryThrottling.tokenRatio".into()),
            (r#"{"retryThrottling": {"maxTokens": 10, "tokenRatio": 0.0001}}"#.into(), "retryThrottling.tokenRatio".into()),
            // Names: a method needs its service; each name once.
            (
                r#"{"methodConfig": [{"name": [{"method": "M"}]}]}"#.into(),
                "methodConfig[0].name[0].method".into(),
            ),
            (
                r#"{"methodConfig": [{"name": [{"service": "s"}]}, {"name": [{"service": "t"}, {"service": "s"}]}]}"#.into(),
                "methodConfig[1].name[1]".into(),
            ),
            (
                r#"{"methodConfig": [{"name": [{}]}, {"name": [{}]}]}"#.into(),
                "methodConfig[1].name[0]".into(),
            ),
            (
                r#"{"methodConfig": [{"name": [{"service": 3}]}]}"#.into(),
                "methodConfig[0].name[0].service".into(),
            ),
            (
                r#"{"methodConfig": [{"name": [{"service": "s"}], "timeout": "soon"}]}"#.into(),
                "methodConfig[0].timeout".into(),
            ),
        ];
        for (json, path) in cases {
            let (got, rule) = err(&json);
            assert_eq!(got, path, "{json}: {rule}");
            assert!(!rule.is_empty());
        }
        assert_eq!(
            err(&with("maxAttempts", "1")).1,
            "must be a JSON integer greater than 1"
        );
        let (path, rule) = err("[1, 2]");
        assert_eq!(path, "");
        assert!(rule.starts_with("not a service config"), "{rule}");
    }

    #[test]
    fn the_most_specific_name_wins() {
        let c = ServiceConfig::from_json(
            r#"{"methodConfig": [
                {"name": [{}], "timeout": "1s"},
                {"name": [{"service": "MyService"}], "timeout": "2s"},
                {"name": [{"service": "MyService", "method": "Foo"}, {"service": "Other", "method": "Bar"}], "timeout": "3s"}
            ]}"#,
        )
        .unwrap();
        let t = |path: &str| c.method(path).unwrap().timeout().unwrap().as_secs();
        assert_eq!(t("/MyService/Foo"), 3);
        assert_eq!(t("/Other/Bar"), 3);
        assert_eq!(t("/MyService/Bar"), 2);
        assert_eq!(t("/Other/Baz"), 1);
        assert_eq!(t("/Unknown/Foo"), 1);
    }

    #[test]
    fn token_ratio_keeps_three_decimals() {
        let c = ServiceConfig::from_json(
            r#"{"retryThrottling": {"maxTokens": 1000, "tokenRatio": 0.5466}}"#,
        )
        .unwrap();
        let t = c.throttling().unwrap();
        assert_eq!((t.max_tokens(), t.token_ratio()), (1000, 0.546));
        assert_eq!(t.throttle().max_tokens(), 1000);
    }

    #[test]
    fn durations_in_proto3_json() {
        let d = |s: &str| duration(&Value::String(s.into()), "f");
        assert_eq!(d("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(d("0.5s").unwrap(), Duration::from_millis(500));
        assert_eq!(d("1.000000001s").unwrap(), Duration::new(1, 1));
        assert_eq!(d("0s").unwrap(), Duration::ZERO);
        assert_eq!(d(".01s").unwrap(), Duration::from_millis(10));
        assert_eq!(d("1.s").unwrap(), Duration::from_secs(1));
        for bad in [
            "1",
            "s",
            ".s",
            "1.2.3s",
            "1.5ms",
            "+1s",
            "1e3s",
            " 1s",
            "1.0000000001s",
        ] {
            assert!(d(bad).is_err(), "{bad}");
        }
    }
}
