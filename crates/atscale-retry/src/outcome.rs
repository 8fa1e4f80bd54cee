//! What the layer needs from requests and responses, and what it reads from
//! a failed attempt.

use std::error::Error;

use atscale_core::{Carrier, Kind};
use atscale_hedge::{Replay, ReplayBody};
use http::{HeaderValue, StatusCode};

use crate::code::Code;
use crate::pushback::{GRPC_PREVIOUS_RPC_ATTEMPTS, Pushback, grpc_pushback, retry_after};

/// A request the retry layer can send again: it can be copied
/// ([`Replay`], shared with the hedge), carries a
/// [`Context`](atscale_core::Context) ([`Carrier`]), and can say how many
/// attempts came before it.
///
/// Implemented for `http::Request` with a [`ReplayBody`] (wrap a streaming
/// body, a tonic request's say, in [`BufferedBody`](atscale_hedge::BufferedBody)
/// with [`BufferBodyLayer`](atscale_hedge::BufferBodyLayer)). For your own
/// request types the method has a default that does nothing.
pub trait RetryRequest: Replay + Carrier {
    /// Marks this copy as attempt `previous + 1`: for HTTP, the
    /// `grpc-previous-rpc-attempts` header (gRFC A6), set on every attempt
    /// after the first.
    fn set_previous_attempts(&mut self, previous: u8) {
        let _ = previous;
    }
}

impl<B: ReplayBody> RetryRequest for http::Request<B> {
    fn set_previous_attempts(&mut self, previous: u8) {
        self.headers_mut().insert(
            GRPC_PREVIOUS_RPC_ATTEMPTS,
            HeaderValue::from(u16::from(previous)),
        );
    }
}

/// A response that may report a failure: a gRPC trailers-only answer
/// (`grpc-status` in the headers) or an HTTP error status.
///
/// Implemented for `http::Response`; implement it for your own response
/// types (the default: every response is a success).
pub trait RetryResponse {
    /// The failure this response reports, or `None` for a success. A
    /// response that returns `None` commits the call: it is never retried.
    fn failure(&self) -> Option<Failure<'_>> {
        None
    }

    /// Called on the response returned after more than one attempt, with
    /// the number of attempts made. For `http::Response`, inserts
    /// [`Attempts`] into its extensions.
    fn set_attempts(&mut self, attempts: u8) {
        let _ = attempts;
    }
}

/// How many attempts a call made, in the extensions of an `http::Response`
/// returned after more than one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempts(pub u8);

impl<B> RetryResponse for http::Response<B> {
    /// A gRPC answer whose headers hold `grpc-status` (trailers-only) fails
    /// with that code unless it is `OK`; one with only response headers
    /// commits the call (gRFC A6). Any other HTTP answer fails when its
    /// status is 4xx or 5xx, with the kind that status stands for (503
    /// overloaded, 429 rate limited, 504 and 408 deadline exceeded, …) and
    /// its `Retry-After`.
    fn failure(&self) -> Option<Failure<'_>> {
        let headers = self.headers();
        if let Some(status) = headers.get("grpc-status") {
            let code = Code::from_bytes(status.as_bytes()).unwrap_or(Code::Unknown);
            if code == Code::Ok {
                return None;
            }
            #[cfg(feature = "tonic")]
            let pushback = match grpc_pushback(headers) {
                Pushback::None => tonic::Status::from_header_map(headers)
                    .map_or(Pushback::None, |s| crate::pushback::status_pushback(&s)),
                said => said,
            };
            #[cfg(not(feature = "tonic"))]
            let pushback = grpc_pushback(headers);
            return Some(Failure {
                kind: code_kind(code),
                code: Some(code),
                http_status: None,
                pushback,
                error: None,
            });
        }
        let status = self.status();
        if !(status.is_client_error() || status.is_server_error()) {
            return None;
        }
        let is_grpc = atscale_core::grpc::is_grpc(headers);
        let code = is_grpc
            .then_some(Code::Unavailable)
            .filter(|_| status == 503);
        Some(Failure {
            kind: Some(status_kind(status)),
            code,
            http_status: Some(status),
            pushback: retry_after(headers).map_or(Pushback::None, Pushback::After),
            error: None,
        })
    }

    fn set_attempts(&mut self, attempts: u8) {
        self.extensions_mut().insert(Attempts(attempts));
    }
}

impl RetryResponse for () {}

/// The kind an HTTP status stands for, as atscale servers answer them.
fn status_kind(status: StatusCode) -> Kind {
    match status.as_u16() {
        503 => Kind::Overloaded,
        429 => Kind::RateLimited,
        504 | 408 => Kind::DeadlineExceeded,
        499 => Kind::Cancelled,
        500 => Kind::Internal,
        400..=499 => Kind::BadRequest,
        _ => Kind::Upstream,
    }
}

/// The kind a gRPC code stands for where it is unambiguous.
pub(crate) fn code_kind(code: Code) -> Option<Kind> {
    Some(match code {
        Code::DeadlineExceeded => Kind::DeadlineExceeded,
        Code::Cancelled => Kind::Cancelled,
        Code::InvalidArgument => Kind::BadRequest,
        Code::ResourceExhausted => Kind::RateLimited,
        _ => return None,
    })
}

/// A failed attempt, as the retry policy sees it: the error or the failing
/// response's kind, gRPC code and pushback.
///
/// Handed to a [`retry_if`](crate::RetryPolicyBuilder::retry_if) predicate.
#[derive(Clone, Copy, Debug)]
pub struct Failure<'a> {
    pub(crate) kind: Option<Kind>,
    pub(crate) code: Option<Code>,
    pub(crate) http_status: Option<StatusCode>,
    pub(crate) pushback: Pushback,
    pub(crate) error: Option<&'a (dyn Error + 'static)>,
}

impl<'a> Failure<'a> {
    /// A failure of `kind` (for [`RetryResponse`] implementations).
    pub fn of_kind(kind: Kind) -> Self {
        Failure {
            kind: Some(kind),
            code: None,
            http_status: None,
            pushback: Pushback::None,
            error: None,
        }
    }

    /// A failure with gRPC status `code` (for [`RetryResponse`] implementations).
    pub fn of_code(code: Code) -> Self {
        Failure {
            kind: code_kind(code),
            code: Some(code),
            http_status: None,
            pushback: Pushback::None,
            error: None,
        }
    }

    /// The same failure, with what the server said about retrying.
    #[must_use]
    pub fn with_pushback(mut self, pushback: Pushback) -> Self {
        self.pushback = pushback;
        self
    }

    /// The failure of an error: its kind ([`Kind::find`]), its gRPC code
    /// (a `tonic::Status` in its chain, with the `tonic` feature) and its
    /// pushback (the status's `grpc-retry-pushback-ms` or `RetryInfo`, else
    /// the retry-after of a rate-limited or overloaded error).
    pub fn of_error(err: &'a (dyn Error + 'static)) -> Self {
        let kind = Kind::find(err);
        #[cfg(feature = "tonic")]
        if let Some(status) = atscale_core::find::<tonic::Status>(err) {
            let code = Code::from(status.code());
            let pushback = match crate::pushback::status_pushback(status) {
                Pushback::None => {
                    atscale_core::retry_after(err).map_or(Pushback::None, Pushback::After)
                }
                said => said,
            };
            return Failure {
                kind: kind.or_else(|| code_kind(code)),
                code: Some(code),
                http_status: None,
                pushback,
                error: Some(err),
            };
        }
        Failure {
            kind,
            code: None,
            http_status: None,
            pushback: atscale_core::retry_after(err).map_or(Pushback::None, Pushback::After),
            error: Some(err),
        }
    }

    /// The kind of failure, when known.
    pub fn kind(&self) -> Option<Kind> {
        self.kind
    }

    /// The gRPC status code, when the answer had one.
    pub fn code(&self) -> Option<Code> {
        self.code
    }

    /// The HTTP status of a failing HTTP response.
    pub fn http_status(&self) -> Option<StatusCode> {
        self.http_status
    }

    /// What the server said about retrying.
    pub fn pushback(&self) -> Pushback {
        self.pushback
    }

    /// The error, when the attempt failed with one (not with a response).
    pub fn error(&self) -> Option<&'a (dyn Error + 'static)> {
        self.error
    }
}
