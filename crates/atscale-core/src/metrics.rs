//! The names of every metric and span field atscale emits, in one place.
//!
//! Each layer crate emits through the [`metrics`](https://docs.rs/metrics)
//! facade behind its own `metrics` feature (the facade crate's `metrics`
//! feature turns them all on). With the feature off nothing is compiled in;
//! with it on, nothing is emitted until [`enable`] is called (after
//! installing a recorder), and until then each emission costs one relaxed
//! atomic load.
//! Any exporter plugs in: `metrics-exporter-prometheus` for a `/metrics`
//! endpoint, or OpenTelemetry through a `metrics` → OpenTelemetry bridge.
//!
//! Names follow the OpenTelemetry semantic conventions where one exists
//! ([`HTTP_SERVER_REQUEST_DURATION`], [`RPC_SERVER_DURATION`]); the others
//! live in the `atscale.*` namespace. [`ALL`] lists each with its
//! instrument, unit and labels. Labels are bounded by construction: kinds,
//! origins, reasons, criticalities, status codes, methods and route
//! *templates*, never raw paths or keys.
//!
//! | name | instrument | unit | labels | what |
//! | --- | --- | --- | --- | --- |
//! | `http.server.request.duration` | histogram | s | `http.request.method`, `http.response.status_code`, `http.route`¹, `error.type`¹ | every HTTP answer of a server-mode ErrorEnrich |
//! | `rpc.server.duration` | histogram | ms | `rpc.system`, `rpc.grpc.status_code`, `error.type`¹ | every gRPC answer of a server-mode ErrorEnrich |
//! | `atscale.errors` | counter | | `service`, `side`, `kind`, `http.response.status_code` | enriched errors |
//! | `atscale.panics` | counter | | `service` | panics caught by ErrorEnrich |
//! | `atscale.deadline.exceeded` | counter | | `origin`, `stage` | deadlines that passed (`stage`: `arrival` or `running`) |
//! | `atscale.deadline.remaining` | histogram | s | `origin` | budget left when a request with a deadline arrives |
//! | `atscale.deadline.malformed` | counter | | | requests refused for a malformed deadline header |
//! | `atscale.ratelimit.admitted` | counter | | | requests admitted at once |
//! | `atscale.ratelimit.waited` | counter | | | requests made to wait for admission |
//! | `atscale.ratelimit.refused` | counter | | `reason` | requests refused (`rate_limited`, `queue_full`, `key_table_full`, `insufficient_capacity`, `store`, `cancelled`) |
//! | `atscale.ratelimit.wait.duration` | histogram | s | | the wait given to each request made to wait |
//! | `atscale.ratelimit.queue.depth` | gauge | | | requests waiting for admission |
//! | `atscale.ratelimit.keys` | gauge | | | live keys in keyed limiters |
//! | `atscale.ratelimit.redis.duration` | histogram | s | | round trip of each Redis store call |
//! | `atscale.ratelimit.redis.failures` | counter | | | Redis store calls that failed |
//! | `atscale.ratelimit.redis.fallback` | counter | | `decision` | failed calls answered by the failure policy (`open` or `closed`) |
//! | `atscale.hedge.requests` | counter | | | requests through a hedge |
//! | `atscale.hedge.sent` | counter | | | hedged (extra) attempts sent |
//! | `atscale.hedge.won` | counter | | | requests answered by a hedged attempt |
//! | `atscale.hedge.denied` | counter | | `reason` | hedges not sent (`budget` or `throttle`) |
//! | `atscale.hedge.delay` | gauge | s | | the current hedge delay |
//! | `atscale.heartbeat.in_flight` | gauge | | | requests in flight under a heartbeat |
//! | `atscale.heartbeat.stalls` | counter | | | requests the watchdog found stalled |
//! | `atscale.heartbeat.pulses.dropped` | counter | | | pulses dropped for slow subscribers |
//! | `atscale.overload.limit` | gauge | | | the adaptive concurrency limit |
//! | `atscale.overload.in_flight` | gauge | | | requests holding a concurrency slot |
//! | `atscale.overload.queue.depth` | gauge | | | requests queued for a slot |
//! | `atscale.overload.shed` | counter | | `reason`, `criticality` | requests shed |
//! | `atscale.retry.attempts` | counter | | `attempt` | attempts made by the retry layer (`first` or `retry`) |
//! | `atscale.retry.throttle.tokens` | gauge | | | tokens left in the retry throttle |
//!
//! ¹ only when known: the route template (axum's `MatchedPath`, never the
//! raw path), and `error.type` (the [`Kind`](crate::Kind)) on errors.
//!
//! In Prometheus (`metrics-exporter-prometheus` with
//! `with_recommended_naming(true)`, after [`enable`]): dots become
//! underscores, counters end in `_total`, and the unit is appended
//! (`atscale_deadline_exceeded_total`,
//! `http_server_request_duration_seconds`, `rpc_server_duration_milliseconds`).
//!
//! # Example
//!
//! ```
//! use atscale_core::metrics;
//!
//! // After installing a recorder (the exporter's), once:
//! metrics::enable();
//! assert!(metrics::enabled());
//! assert!(metrics::ALL.iter().any(|m| m.name == metrics::DEADLINE_EXCEEDED));
//! ```

use std::sync::atomic::{AtomicBool, Ordering};

pub use ::metrics::Unit;

/// What kind of instrument a metric is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Instrument {
    /// A monotonic count.
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A distribution of observations.
    Histogram,
}

/// One metric atscale emits: its name, instrument, unit, labels and meaning.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    /// The name given to the `metrics` facade.
    pub name: &'static str,
    /// The instrument.
    pub instrument: Instrument,
    /// The unit ([`Unit::Count`] for plain counts).
    pub unit: Unit,
    /// The label keys it may carry.
    pub labels: &'static [&'static str],
    /// One line on what it counts.
    pub description: &'static str,
}

/// `http.server.request.duration` (OpenTelemetry): seconds per HTTP answer.
pub const HTTP_SERVER_REQUEST_DURATION: &str = "http.server.request.duration";
/// `rpc.server.duration` (OpenTelemetry): milliseconds per gRPC answer.
pub const RPC_SERVER_DURATION: &str = "rpc.server.duration";
/// Enriched errors, by `service`, `side`, `kind` and status.
pub const ERRORS: &str = "atscale.errors";
/// Panics caught by ErrorEnrich.
pub const PANICS: &str = "atscale.panics";

/// Deadlines that passed, by `origin` and `stage`.
pub const DEADLINE_EXCEEDED: &str = "atscale.deadline.exceeded";
/// Budget left at arrival (seconds), by `origin`.
pub const DEADLINE_REMAINING: &str = "atscale.deadline.remaining";
/// Requests refused for a malformed deadline header.
pub const DEADLINE_MALFORMED: &str = "atscale.deadline.malformed";

/// Requests admitted at once by a rate limit.
pub const RATELIMIT_ADMITTED: &str = "atscale.ratelimit.admitted";
/// Requests made to wait by a rate limit.
pub const RATELIMIT_WAITED: &str = "atscale.ratelimit.waited";
/// Requests refused by a rate limit, by `reason`.
pub const RATELIMIT_REFUSED: &str = "atscale.ratelimit.refused";
/// The wait given to each request made to wait (seconds).
pub const RATELIMIT_WAIT_DURATION: &str = "atscale.ratelimit.wait.duration";
/// Requests waiting for admission.
pub const RATELIMIT_QUEUE_DEPTH: &str = "atscale.ratelimit.queue.depth";
/// Live keys in keyed limiters.
pub const RATELIMIT_KEYS: &str = "atscale.ratelimit.keys";
/// Round trip of each Redis store call (seconds).
pub const REDIS_DURATION: &str = "atscale.ratelimit.redis.duration";
/// Redis store calls that failed.
pub const REDIS_FAILURES: &str = "atscale.ratelimit.redis.failures";
/// Failed Redis calls answered by the failure policy, by `decision`.
pub const REDIS_FALLBACK: &str = "atscale.ratelimit.redis.fallback";

/// Requests through a hedge.
pub const HEDGE_REQUESTS: &str = "atscale.hedge.requests";
/// Hedged (extra) attempts sent.
pub const HEDGE_SENT: &str = "atscale.hedge.sent";
/// Requests answered by a hedged attempt.
pub const HEDGE_WON: &str = "atscale.hedge.won";
/// Hedges not sent, by `reason`.
pub const HEDGE_DENIED: &str = "atscale.hedge.denied";
/// The current hedge delay (seconds).
pub const HEDGE_DELAY: &str = "atscale.hedge.delay";

/// Requests in flight under a heartbeat.
pub const HEARTBEAT_IN_FLIGHT: &str = "atscale.heartbeat.in_flight";
/// Requests found stalled.
pub const HEARTBEAT_STALLS: &str = "atscale.heartbeat.stalls";
/// Pulses dropped for slow subscribers.
pub const HEARTBEAT_PULSES_DROPPED: &str = "atscale.heartbeat.pulses.dropped";

/// The adaptive concurrency limit.
pub const OVERLOAD_LIMIT: &str = "atscale.overload.limit";
/// Requests holding a concurrency slot.
pub const OVERLOAD_IN_FLIGHT: &str = "atscale.overload.in_flight";
/// Requests queued for a concurrency slot.
pub const OVERLOAD_QUEUE_DEPTH: &str = "atscale.overload.queue.depth";
/// Requests shed, by `reason` and `criticality`.
pub const OVERLOAD_SHED: &str = "atscale.overload.shed";

/// Attempts made by the retry layer, by `attempt`.
pub const RETRY_ATTEMPTS: &str = "atscale.retry.attempts";
/// Tokens left in the retry throttle.
pub const RETRY_THROTTLE_TOKENS: &str = "atscale.retry.throttle.tokens";

const fn counter(
    name: &'static str,
    labels: &'static [&'static str],
    description: &'static str,
) -> Metric {
    Metric {
        name,
        instrument: Instrument::Counter,
        unit: Unit::Count,
        labels,
        description,
    }
}

const fn gauge(
    name: &'static str,
    unit: Unit,
    labels: &'static [&'static str],
    description: &'static str,
) -> Metric {
    Metric {
        name,
        instrument: Instrument::Gauge,
        unit,
        labels,
        description,
    }
}

const fn histogram(
    name: &'static str,
    unit: Unit,
    labels: &'static [&'static str],
    description: &'static str,
) -> Metric {
    Metric {
        name,
        instrument: Instrument::Histogram,
        unit,
        labels,
        description,
    }
}

/// Every metric atscale emits.
pub const ALL: &[Metric] = &[
    histogram(
        HTTP_SERVER_REQUEST_DURATION,
        Unit::Seconds,
        &[
            "http.request.method",
            "http.response.status_code",
            "http.route",
            "error.type",
        ],
        "Duration of HTTP server requests",
    ),
    histogram(
        RPC_SERVER_DURATION,
        Unit::Milliseconds,
        &["rpc.system", "rpc.grpc.status_code", "error.type"],
        "Duration of gRPC server calls",
    ),
    counter(
        ERRORS,
        &["service", "side", "kind", "http.response.status_code"],
        "Errors enriched by ErrorEnrich",
    ),
    counter(PANICS, &["service"], "Panics caught by ErrorEnrich"),
    counter(
        DEADLINE_EXCEEDED,
        &["origin", "stage"],
        "Deadlines that passed",
    ),
    histogram(
        DEADLINE_REMAINING,
        Unit::Seconds,
        &["origin"],
        "Budget left when a request with a deadline arrives",
    ),
    counter(
        DEADLINE_MALFORMED,
        &[],
        "Requests refused for a malformed deadline header",
    ),
    counter(
        RATELIMIT_ADMITTED,
        &[],
        "Requests admitted at once by a rate limit",
    ),
    counter(
        RATELIMIT_WAITED,
        &[],
        "Requests made to wait for admission by a rate limit",
    ),
    counter(
        RATELIMIT_REFUSED,
        &["reason"],
        "Requests refused by a rate limit",
    ),
    histogram(
        RATELIMIT_WAIT_DURATION,
        Unit::Seconds,
        &[],
        "Wait given to each request made to wait by a rate limit",
    ),
    gauge(
        RATELIMIT_QUEUE_DEPTH,
        Unit::Count,
        &[],
        "Requests waiting for rate-limit admission",
    ),
    gauge(
        RATELIMIT_KEYS,
        Unit::Count,
        &[],
        "Live keys in keyed rate limiters",
    ),
    histogram(
        REDIS_DURATION,
        Unit::Seconds,
        &[],
        "Round trip of each Redis rate-limit store call",
    ),
    counter(
        REDIS_FAILURES,
        &[],
        "Redis rate-limit store calls that failed",
    ),
    counter(
        REDIS_FALLBACK,
        &["decision"],
        "Failed Redis store calls answered by the failure policy",
    ),
    counter(HEDGE_REQUESTS, &[], "Requests through a hedge"),
    counter(HEDGE_SENT, &[], "Hedged (extra) attempts sent"),
    counter(HEDGE_WON, &[], "Requests answered by a hedged attempt"),
    counter(
        HEDGE_DENIED,
        &["reason"],
        "Hedges not sent for lack of budget or throttle tokens",
    ),
    gauge(HEDGE_DELAY, Unit::Seconds, &[], "The current hedge delay"),
    gauge(
        HEARTBEAT_IN_FLIGHT,
        Unit::Count,
        &[],
        "Requests in flight under a heartbeat",
    ),
    counter(
        HEARTBEAT_STALLS,
        &[],
        "Requests the heartbeat's watchdog found stalled",
    ),
    counter(
        HEARTBEAT_PULSES_DROPPED,
        &[],
        "Heartbeat pulses dropped for slow subscribers",
    ),
    gauge(
        OVERLOAD_LIMIT,
        Unit::Count,
        &[],
        "The adaptive concurrency limit",
    ),
    gauge(
        OVERLOAD_IN_FLIGHT,
        Unit::Count,
        &[],
        "Requests holding a concurrency slot",
    ),
    gauge(
        OVERLOAD_QUEUE_DEPTH,
        Unit::Count,
        &[],
        "Requests queued for a concurrency slot",
    ),
    counter(
        OVERLOAD_SHED,
        &["reason", "criticality"],
        "Requests shed by the overload layer",
    ),
    counter(
        RETRY_ATTEMPTS,
        &["attempt"],
        "Attempts made by the retry layer",
    ),
    gauge(
        RETRY_THROTTLE_TOKENS,
        Unit::Count,
        &[],
        "Tokens left in the retry throttle",
    ),
];

/// The names of the fields of the per-request span (`request`) that the
/// server- or client-mode ErrorEnrich opens; each layer records its
/// decision on the current span as it makes it.
pub mod field {
    /// Where the request's deadline came from (`local`, `parent`, `grpc-timeout`, `header`).
    pub const DEADLINE_ORIGIN: &str = "deadline.origin";
    /// The budget left at arrival, in milliseconds.
    pub const DEADLINE_REMAINING_MS: &str = "deadline.remaining_ms";
    /// The rate limit's decision (`admitted`, `waited`, or the refusal's reason).
    pub const RATELIMIT_OUTCOME: &str = "ratelimit.outcome";
    /// The rate limit's wait, in milliseconds.
    pub const RATELIMIT_WAIT_MS: &str = "ratelimit.wait_ms";
    /// `true` once a hedged attempt was sent for the request.
    pub const HEDGE_SENT: &str = "hedge.sent";
    /// The error's kind, when the request failed.
    pub const ERROR_KIND: &str = "error.kind";
    /// The error id, when the request failed.
    pub const ERROR_ID: &str = "error.id";
    /// The status answered.
    pub const STATUS: &str = "http.response.status_code";
    /// The W3C trace id of the request's `traceparent`, when valid.
    pub const TRACE_ID: &str = "trace_id";
}

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns atscale's metrics on: describes every metric in [`ALL`] (unit and
/// help text) to the installed recorder, then every layer starts emitting.
///
/// Call it once, at start-up, after installing the recorder (and before
/// traffic: the in-flight gauges count from then on). The handles of the
/// metrics emitted on every request are registered with the recorder at
/// their first use after this call and kept (a lookup costs ~100 ns, an
/// emission through a kept handle one atomic add): install the global
/// recorder first and keep it; a thread-local recorder set later is not
/// seen by them. Until it is called
/// nothing is emitted and each emission site costs one relaxed atomic load:
/// the `metrics` facade itself cannot say whether a recorder is installed,
/// and asking it (the key, the thread-local and global recorder lookups, the
/// no-op handle) costs 10–20 ns per emission (benches/README.md, "Metrics").
pub fn enable() {
    for m in ALL {
        ::metrics::with_recorder(|r| {
            let key = ::metrics::KeyName::from_const_str(m.name);
            let unit = Some(m.unit);
            let text = ::metrics::SharedString::const_str(m.description);
            match m.instrument {
                Instrument::Counter => r.describe_counter(key, unit, text),
                Instrument::Gauge => r.describe_gauge(key, unit, text),
                Instrument::Histogram => r.describe_histogram(key, unit, text),
            }
        });
    }
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether a `tracing` subscriber may record the request span and the
/// decisions the layers write on it (one was set, and it is at `INFO`):
/// every layer checks this before touching a span.
///
/// The level alone does not tell: once any `Dispatch` has been made (some
/// crates make one without installing it), tracing's maximum level is
/// `TRACE` even though no subscriber was ever set, and looking up the
/// current span (which is then none) costs about 20 ns per request.
#[inline(always)]
pub fn span_wanted() -> bool {
    use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};
    tracing::Level::INFO <= STATIC_MAX_LEVEL
        && tracing::dispatcher::has_been_set()
        && tracing::Level::INFO <= LevelFilter::current()
}

/// Whether [`enable`] was called: every layer checks this before emitting.
#[inline(always)]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_namespaced() {
        let mut names: Vec<_> = ALL.iter().map(|m| m.name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before, "a name is listed twice");
        for m in ALL {
            let otel = [HTTP_SERVER_REQUEST_DURATION, RPC_SERVER_DURATION];
            assert!(
                m.name.starts_with("atscale.") || otel.contains(&m.name),
                "{} is neither atscale.* nor an OpenTelemetry name",
                m.name
            );
        }
    }
}
