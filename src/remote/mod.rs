//! Failures a downstream service answered, back in the shared vocabulary.
//!
//! A server running the recommended stack answers each failure in the form
//! its protocol expects: a trailers-only gRPC response (`grpc-status` in the
//! response head, rich details in `grpc-status-details-bin`), or an RFC 9457
//! `application/problem+json` document (see `atscale::error`). For the
//! client both are successful responses, so without help its own layers
//! see no error at all, and a gateway could not tell a downstream deadline
//! from a bug. [`GrpcErrorsLayer`] (part of
//! [`ClientStack`](crate::stack::ClientStack)) and [`HttpErrorsLayer`] (part
//! of [`HttpClientStack`](crate::stack::HttpClientStack)) turn such
//! responses into one error type, [`RemoteFailure`], whose `source()` chain
//! holds the vocabulary type of the downstream kind, so:
//!
//! - the client's own layers see an error (the heartbeat counts it, a hedge
//!   returns it) and the client-mode ErrorEnrich logs it with an id;
//! - a tonic generated client still returns the downstream `Status` (tonic
//!   finds it in the chain), with the whole chain as its `source()`;
//! - returned from a handler (`Err(err.into())`) under a server-mode
//!   ErrorEnrich, the failure keeps its kind: a downstream deadline is a 504
//!   (or `DEADLINE_EXCEEDED`), a downstream rate limit a 429 with the same
//!   `Retry-After`, and the log line names the downstream service, its error
//!   id and the layer that failed there, while the caller sees only the
//!   user-safe message of this service, never the downstream's text.
//!
//! Both protocols share one mapping from an answer to a kind:
//!
//! | the answer says | gRPC | HTTP | vocabulary |
//! | --- | --- | --- | --- |
//! | a deadline passed | `DEADLINE_EXCEEDED` | 504 | [`DeadlineExceeded`]: a downstream's own budget (`deadline_origin` `local`) is `local` here, an inherited one `parent` |
//! | rate limited | `RESOURCE_EXHAUSTED` | 429 | [`RateLimited`], after the `RetryInfo` delay / `Retry-After` (1 s when absent) |
//! | unavailable, naming `stalled` | `UNAVAILABLE`, reason `STALLED` | 503, problem `code` `stalled` | [`Stalled`] |
//! | unavailable, naming `overloaded` | `UNAVAILABLE`, reason `OVERLOADED` | 503, problem `code` `overloaded`; or a plain 503 that names nothing (RFC 9110: temporary overload), with its `Retry-After` | [`Overloaded`] |
//! | cancelled | `CANCELLED` (tonic's own "Timeout expired": [`DeadlineExceeded`], `parent`) | — | [`Cancelled`] |
//! | anything else | any other code | any other 5xx | none: the client stack makes it `Kind::Upstream` (502), and keeps that kind up through a server-mode ErrorEnrich |
//!
//! A transport error that shows the request never reached the server (a
//! refused connection) is [`Kind::Unreachable`] (503, `UNAVAILABLE`, safe to
//! retry), distinct from a server that answered an error; [`HttpErrors`]
//! given the dependency's name makes it [`Unreachable`] naming it, so the
//! 503 says which dependency is down.

use std::error::Error;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use atscale_core::{
    BoxError, Cancelled, DeadlineExceeded, Kind, Origin, Overloaded, RateLimited, Stalled,
    Unreachable,
};

#[cfg(feature = "tonic")]
mod grpc;
mod http;

#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
pub use grpc::{GrpcErrors, GrpcErrorsFuture, GrpcErrorsLayer};
pub use http::{HttpErrors, HttpErrorsFuture, HttpErrorsLayer};

/// A failure a downstream service answered: a gRPC status, or an HTTP
/// error response (a problem+json document when the server sent one).
///
/// Made by [`GrpcErrorsLayer`] and [`HttpErrorsLayer`], or by
/// [`RemoteFailure::new`] from a `tonic::Status` in hand. Its `source()`
/// leads to the vocabulary error standing for the downstream kind, when the
/// answer maps to one (the table in the [module docs](self)); for gRPC the
/// `source()` is the `Status` itself, whose source in turn is that error.
///
/// The durations in these errors (a deadline's budget and elapsed time, a
/// stall's idle time) are the caller's view, how long the call ran: the
/// downstream's own figures do not cross the wire. A downstream
/// `INVALID_ARGUMENT` or 400 stays outside the vocabulary: the request it
/// refused was this service's, so this service's caller is not to blame
/// (502, not 400).
///
/// `Display` names the downstream service (the `ErrorInfo` domain, or the
/// problem's `service`), the code or status, the layer that failed there and
/// its error id; it never holds the downstream's message or `detail`.
#[derive(Debug)]
pub struct RemoteFailure {
    service: Option<String>,
    layer: Option<String>,
    id: Option<String>,
    answer: Answer,
}

#[derive(Debug)]
enum Answer {
    #[cfg(feature = "tonic")]
    Grpc(tonic::Status),
    Http {
        status: ::http::StatusCode,
        kind: Option<Arc<dyn Error + Send + Sync>>,
    },
}

/// What a remote answer's code or status says by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Implied {
    /// This kind, whatever else the answer says.
    Kind(Kind),
    /// Unavailable: the kind the answer names (stalled, overloaded) decides.
    Unavailable,
    /// Nothing the vocabulary has a type for.
    Nothing,
}

/// A remote answer, read from either protocol: the one place an answer
/// becomes a kind.
#[derive(Debug)]
struct Said<'a> {
    implied: Implied,
    /// The kind the answer names: the `ErrorInfo` reason (`STALLED`) or the
    /// problem's `code` (`stalled`).
    named: Option<&'a str>,
    retry_after: Option<Duration>,
    /// The `deadline_origin` the downstream reported.
    deadline_origin: Option<&'a str>,
}

impl Said<'_> {
    fn kind(&self) -> Option<Kind> {
        match self.implied {
            Implied::Kind(kind) => Some(kind),
            Implied::Unavailable => match self.named {
                Some(n) if n.eq_ignore_ascii_case(Kind::Stalled.as_str()) => Some(Kind::Stalled),
                Some(n) if n.eq_ignore_ascii_case(Kind::Overloaded.as_str()) => {
                    Some(Kind::Overloaded)
                }
                _ => None,
            },
            Implied::Nothing => None,
        }
    }

    /// The vocabulary error standing for the answer, `elapsed` being how
    /// long the call ran.
    fn vocabulary(&self, elapsed: Duration) -> Option<Arc<dyn Error + Send + Sync>> {
        Some(match self.kind()? {
            Kind::DeadlineExceeded => {
                // The downstream's own budget is a local deadline from here;
                // one it inherited came from us or our callers.
                let origin = match self.deadline_origin {
                    Some("local") | None => Origin::Local,
                    Some(_) => Origin::Parent,
                };
                Arc::new(DeadlineExceeded::new(elapsed, elapsed, origin))
            }
            Kind::RateLimited => Arc::new(RateLimited::new(
                self.retry_after.unwrap_or(Duration::from_secs(1)),
            )),
            Kind::Stalled => Arc::new(Stalled::new(elapsed)),
            Kind::Overloaded => Arc::new(match self.retry_after {
                Some(after) => Overloaded::with_retry_after(after),
                None => Overloaded::new(),
            }),
            Kind::Cancelled => Arc::new(Cancelled::new()),
            _ => return None,
        })
    }
}

impl RemoteFailure {
    /// The downstream service that failed (its `ErrorInfo` domain, or the
    /// problem's `service`), when it said.
    pub fn service(&self) -> Option<&str> {
        self.service.as_deref()
    }

    /// The layer that failed downstream (`deadline`, `ratelimit`, …), when it said.
    pub fn layer(&self) -> Option<&str> {
        self.layer.as_deref()
    }

    /// The downstream error id, to find its log line there.
    pub fn error_id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The status as a gRPC downstream answered it (`None` for HTTP).
    #[cfg(feature = "tonic")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
    pub fn grpc_status(&self) -> Option<&tonic::Status> {
        match &self.answer {
            Answer::Grpc(status) => Some(status),
            Answer::Http { .. } => None,
        }
    }

    /// The HTTP status of the answer (200 for a gRPC one: gRPC errors
    /// travel in a successful HTTP response).
    pub fn http_status(&self) -> ::http::StatusCode {
        match &self.answer {
            #[cfg(feature = "tonic")]
            Answer::Grpc(_) => ::http::StatusCode::OK,
            Answer::Http { status, .. } => *status,
        }
    }

    /// The kind the failure has in the shared vocabulary, if any (`None`:
    /// the client stack reports it as `Kind::Upstream`).
    pub fn kind(&self) -> Option<Kind> {
        Kind::find(self)
    }
}

impl fmt::Display for RemoteFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let service = self.service.as_deref().unwrap_or("a downstream service");
        let mut s = match &self.answer {
            #[cfg(feature = "tonic")]
            Answer::Grpc(status) => format!("{service} answered {:?}", status.code()),
            Answer::Http { status, .. } => format!("{service} answered {status}"),
        };
        if let Some(layer) = &self.layer {
            s.push_str(&format!(" from its {layer} layer"));
        }
        if let Some(id) = &self.id {
            s.push_str(&format!(" (error id {id})"));
        }
        f.pad(&s)
    }
}

impl Error for RemoteFailure {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match &self.answer {
            #[cfg(feature = "tonic")]
            Answer::Grpc(status) => Some(status),
            Answer::Http { kind, .. } => kind.as_deref().map(|e| e as &(dyn Error + 'static)),
        }
    }
}

/// A transport error that shows the request never reached `dependency`
/// (its chain classifies as [`Kind::Unreachable`]), as [`Unreachable`]
/// naming it; any other error as it is.
fn unreachable(err: BoxError, dependency: &str) -> BoxError {
    if Kind::find(&*err) == Some(Kind::Unreachable)
        && atscale_core::find::<Unreachable>(&*err).is_none()
    {
        Box::new(Unreachable::new(dependency).with_source(err))
    } else {
        err
    }
}
