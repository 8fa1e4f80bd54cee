//! What a request's answer says of how it ended: the service failed, a limit
//! refused it, or it was served (the client's own mistakes included).
//!
//! The monitor's health counts failures in a row, and a steward replaces an
//! instance on them, so a failure must be the service's: a handler's error
//! or 5xx, a gRPC status a server gives when it cannot serve. A refusal (a
//! rate limit or an overload guard saying no, 429, `RESOURCE_EXHAUSTED`) is
//! the service working as told; a 4xx or a client-side gRPC status is the
//! caller's mistake, served.

use std::error::Error;

use atscale_core::Kind;
use http::{HeaderMap, HeaderName, StatusCode};

use crate::pulse::Outcome;

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The outcome of a request whose inner service failed with `err`.
pub(crate) fn of_error(err: &(dyn Error + 'static)) -> Outcome {
    match Kind::of(err) {
        Kind::RateLimited | Kind::Overloaded => Outcome::Refused,
        _ => Outcome::Error,
    }
}

/// The outcome an HTTP status says, before the body: a 5xx is a failure
/// (but 501 and 505, which say the request asked for what the server does
/// not do), a 429 a refusal, anything else served.
pub(crate) fn of_status(status: StatusCode) -> Outcome {
    match status.as_u16() {
        429 => Outcome::Refused,
        501 | 505 => Outcome::Ok,
        500..=599 => Outcome::Error,
        _ => Outcome::Ok,
    }
}

/// The outcome the `grpc-status` in `headers` says (the trailers, or the
/// head of a trailers-only answer), `None` without one. The codes a server
/// gives when it cannot serve (`UNKNOWN`, `DEADLINE_EXCEEDED`, `INTERNAL`,
/// `UNAVAILABLE`, `DATA_LOSS`, and a status that is not a code) are
/// failures; `RESOURCE_EXHAUSTED` a refusal; `OK` and the codes that say
/// the call itself was wrong (`INVALID_ARGUMENT`, `NOT_FOUND`,
/// `UNIMPLEMENTED`, …) served.
pub(crate) fn of_grpc(headers: &HeaderMap) -> Option<Outcome> {
    // Trailers hold a header or two: comparing names costs less than
    // hashing one (a gRPC request measured 162 instructions with `get`).
    let status = if headers.len() <= 4 {
        headers.iter().find(|(name, _)| **name == GRPC_STATUS)?.1
    } else {
        headers.get(GRPC_STATUS)?
    };
    Some(match atscale_core::grpc::status_code(status.as_bytes()) {
        Some(8) => Outcome::Refused,
        Some(2 | 4 | 13 | 14 | 15) | None => Outcome::Error,
        Some(_) => Outcome::Ok,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(of_status(StatusCode::OK), Outcome::Ok);
        assert_eq!(of_status(StatusCode::NOT_FOUND), Outcome::Ok);
        assert_eq!(of_status(StatusCode::TOO_MANY_REQUESTS), Outcome::Refused);
        assert_eq!(of_status(StatusCode::INTERNAL_SERVER_ERROR), Outcome::Error);
        assert_eq!(of_status(StatusCode::SERVICE_UNAVAILABLE), Outcome::Error);
        assert_eq!(of_status(StatusCode::GATEWAY_TIMEOUT), Outcome::Error);
        assert_eq!(of_status(StatusCode::NOT_IMPLEMENTED), Outcome::Ok);
    }

    #[test]
    fn grpc_codes() {
        let of = |code: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(GRPC_STATUS, http::HeaderValue::from_static(code));
            of_grpc(&headers).expect("a status")
        };
        for code in ["0", "1", "3", "5", "6", "7", "9", "10", "11", "12", "16"] {
            assert_eq!(of(code), Outcome::Ok, "code {code}");
        }
        for code in ["2", "4", "13", "14", "15", "17", "", "x", "013"] {
            assert_eq!(of(code), Outcome::Error, "code {code:?}");
        }
        assert_eq!(of("8"), Outcome::Refused);
        assert_eq!(of_grpc(&HeaderMap::new()), None);
    }

    #[test]
    fn errors() {
        let limited = atscale_core::RateLimited::new(std::time::Duration::from_secs(1));
        assert_eq!(of_error(&limited), Outcome::Refused);
        assert_eq!(of_error(&atscale_core::Overloaded::new()), Outcome::Refused);
        let boom: Box<dyn Error + Send + Sync> = "boom".into();
        assert_eq!(of_error(&*boom), Outcome::Error);
    }
}
