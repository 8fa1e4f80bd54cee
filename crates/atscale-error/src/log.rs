//! The one log line per enriched error.

use atscale_core::Kind;
use tracing::Level;

use crate::error::Enriched;

/// The target of every event this crate emits.
pub(crate) const TARGET: &str = "atscale_error";

/// The level an error is logged at.
///
/// Server side: internal and upstream failures and exhausted hedges are
/// `ERROR` (something is broken); deadlines, overload and stalls are `WARN`
/// (the service is struggling); rate limiting, bad requests and
/// cancellations are `INFO` (the service did what it should).
/// Client side everything is `DEBUG`: the caller decides what the failure
/// means, and a server-mode layer above logs it again with the full chain.
pub(crate) fn level(err: &Enriched) -> Level {
    if err.is_outgoing() {
        return Level::DEBUG;
    }
    match err.kind() {
        Kind::DeadlineExceeded | Kind::Overloaded | Kind::Stalled => Level::WARN,
        Kind::RateLimited | Kind::BadRequest | Kind::Cancelled => Level::INFO,
        _ => Level::ERROR,
    }
}

macro_rules! emit {
    ($level:expr, $err:expr) => {{
        let err: &Enriched = $err;
        tracing::event!(
            target: TARGET,
            $level,
            id = %err.id(),
            kind = %err.kind(),
            service = %err.service(),
            method = %err.method(),
            route = %err.route(),
            path = %err.path(),
            target_authority = err.target().map(tracing::field::display),
            layer = err.layer().map(tracing::field::display),
            attempts = err.attempts().map(|n| n as u64),
            retry_after_ms = err.retry_after().map(|d| d.as_millis() as u64),
            deadline_origin = err.deadline_origin().map(tracing::field::display),
            trace_id = err.trace_id(),
            status = err.status().as_u16(),
            timestamp = %err.timestamp(),
            chain = %err.report(),
            "{}",
            err,
        )
    }};
}

/// Logs `err` with its full chain, once, at [`level`].
pub(crate) fn record(err: &Enriched) {
    match level(err) {
        Level::ERROR => emit!(Level::ERROR, err),
        Level::WARN => emit!(Level::WARN, err),
        Level::INFO => emit!(Level::INFO, err),
        _ => emit!(Level::DEBUG, err),
    }
}
