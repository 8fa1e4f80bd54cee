//! Error types: the enriched error, its id and timestamp, and configuration errors.

use std::any::Any;
use std::borrow::Cow;
use std::error::Error;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use atscale_core::{
    BoxError, DeadlineExceeded, HedgeExhausted, Interrupted, Kind, MalformedDeadline, Origin,
    Unreachable, find,
};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, Method, StatusCode, Uri};

use crate::config::Config;
use crate::metrics::{self, Observed};
use crate::trace::{self, TraceId};

pub use crate::id::ErrorId;
pub use crate::time::Timestamp;

/// One failure, enriched: what happened, when, where, what to tell the user,
/// and how to learn more, with the original error kept as its `source()`.
///
/// Made by [`ErrorEnrich`](crate::ErrorEnrich): in server mode it becomes a
/// response (and is logged), in client mode it is the service's error type.
///
/// - what: [`kind`](Enriched::kind), found by walking the `source()` chain
///   for the first type of the failure vocabulary ([`Kind::find`]); an error
///   with none is [`Kind::Internal`] on the server side and
///   [`Kind::Upstream`] on the client side;
/// - when: [`timestamp`](Enriched::timestamp), wall-clock, shown in RFC 3339;
/// - where: [`service`](Enriched::service), [`method`](Enriched::method),
///   [`route`](Enriched::route) and [`path`](Enriched::path) (or
///   [`rpc`](Enriched::rpc) for gRPC),
///   [`target`](Enriched::target) for outgoing calls, the
///   [`layer`](Enriched::layer) that failed and the hedge
///   [`attempts`](Enriched::attempts);
/// - the user-safe [`message`](Enriched::message);
/// - how to learn more: the [`id`](Enriched::id) and the
///   [`help_link`](Enriched::help_link);
/// - the full chain for logs: [`report`](Enriched::report).
///
/// `Display` shows the kind and the where, never the inner error's text.
#[derive(Debug)]
pub struct Enriched {
    // Boxed: an error type should be small, and this one is made only on failure.
    f: Box<Fields>,
}

#[derive(Debug)]
struct Fields {
    kind: Kind,
    id: ErrorId,
    at: SystemTime,
    service: Arc<str>,
    side: Side,
    method: Method,
    target: Target,
    matched: MatchedRoute,
    grpc: Option<HeaderValue>,
    message: Cow<'static, str>,
    help: Option<String>,
    retry_after: Option<Duration>,
    deadline: Option<Origin>,
    attempts: Option<usize>,
    layer: Option<&'static str>,
    trace_id: Option<TraceId>,
    obs: Observed,
    source: BoxError,
}

/// Which side of a call an error was enriched on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// Serving a request: foreign errors are internal.
    Server,
    /// Making an outgoing call: foreign errors are upstream failures.
    Client,
}

/// What the layer keeps of a request to say where an error happened.
///
/// Cloning its parts copies no bytes for requests hyper parsed (they are
/// reference-counted), and nothing is boxed: the response future holds it.
#[derive(Clone, Debug)]
pub(crate) struct RequestMeta {
    pub(crate) method: Method,
    pub(crate) target: Target,
    pub(crate) matched: MatchedRoute,
    /// The content type of a gRPC request (echoed in the answer), `None` for plain HTTP.
    pub(crate) grpc: Option<HeaderValue>,
    /// The request's one `traceparent`, unparsed until an error needs it.
    pub(crate) traceparent: Option<HeaderValue>,
    /// The request's span and arrival time (the `metrics` feature; zero-sized without).
    pub(crate) obs: Observed,
}

/// The parts of the request's URI an error names: its path, and for an
/// outgoing call the authority called. A server keeps no authority (it is
/// its own), so it clones one reference-counted part of the URI, not three.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    path: Option<PathAndQuery>,
    authority: Option<Authority>,
}

impl Target {
    fn of(uri: &Uri, side: Side) -> Self {
        Target {
            path: uri.path_and_query().cloned(),
            authority: match side {
                Side::Client => uri.authority().cloned(),
                Side::Server => None,
            },
        }
    }

    /// As [`Uri::path`] (`""` for an authority-form URI, the only kind
    /// without a path and query).
    fn path(&self) -> &str {
        self.path.as_ref().map_or("", PathAndQuery::path)
    }
}

impl RequestMeta {
    pub(crate) fn of<B>(req: &http::Request<B>, side: Side) -> Self {
        let matched = MatchedRoute::of(req.extensions());
        let traceparent = trace::raw(req.headers());
        let obs = metrics::start(req, matched.as_str(), traceparent.as_ref());
        RequestMeta {
            method: req.method().clone(),
            target: Target::of(req.uri(), side),
            matched,
            grpc: grpc_content_type(req.headers()),
            traceparent,
            obs,
        }
    }

    /// The route template, when the router tells.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn route(&self) -> Option<&str> {
        self.matched.as_str()
    }
}

/// The route template the request matched, when the router says (axum's
/// `MatchedPath`, with the `axum` feature).
#[derive(Clone, Debug, Default)]
pub(crate) struct MatchedRoute {
    #[cfg(feature = "axum")]
    axum: Option<axum::extract::MatchedPath>,
}

impl MatchedRoute {
    #[cfg_attr(not(feature = "axum"), allow(unused_variables))]
    fn of(extensions: &http::Extensions) -> Self {
        MatchedRoute {
            #[cfg(feature = "axum")]
            axum: extensions.get().cloned(),
        }
    }

    fn as_str(&self) -> Option<&str> {
        #[cfg(feature = "axum")]
        {
            self.axum.as_ref().map(|m| m.as_str())
        }
        #[cfg(not(feature = "axum"))]
        {
            None
        }
    }
}

/// A request is gRPC when its content type is `application/grpc`, with or
/// without a suffix (`application/grpc+proto`, `application/grpc-web+proto`).
fn grpc_content_type(headers: &http::HeaderMap) -> Option<HeaderValue> {
    // One lookup; the check itself is the one in core.
    let ct = headers.get(http::header::CONTENT_TYPE)?;
    if !atscale_core::grpc::is_grpc_content_type(ct) {
        return None;
    }
    // The usual values as static ones: a clone of an HTTP/2 request's value
    // (a `Bytes` of its own) would first make it a shared one, an
    // allocation per gRPC call.
    // (Constants: `from_static` at run time checks every byte.)
    const GRPC: HeaderValue = HeaderValue::from_static("application/grpc");
    const GRPC_PROTO: HeaderValue = HeaderValue::from_static("application/grpc+proto");
    Some(match ct.as_bytes() {
        b"application/grpc" if !ct.is_sensitive() => GRPC,
        b"application/grpc+proto" if !ct.is_sensitive() => GRPC_PROTO,
        _ => ct.clone(),
    })
}

/// Teaches [`atscale_core::classify`] an [`Enriched`] error's own kind and
/// retry-after, so that [`Kind::of`] and [`atscale_core::retry_after`] on a
/// chain holding one agree with [`Enriched::kind`] (a client's failure
/// that atscale does not know is [`Kind::Upstream`]: its chain alone would
/// say [`Kind::Internal`]). Registered once, when the first is made.
fn classify_enriched() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        atscale_core::classify::map(|e: &Enriched| {
            let kind = atscale_core::classify::Classification::new(e.kind());
            match e.retry_after() {
                Some(after) => kind.with_retry_after(after),
                None => kind,
            }
        });
    });
}

impl Enriched {
    pub(crate) fn new(config: &Config, side: Side, meta: RequestMeta, error: BoxError) -> Self {
        classify_enriched();
        let err: &(dyn Error + 'static) = &*error;
        let nested = find::<Enriched>(err);
        let kind = Kind::find(err)
            .or_else(|| nested.map(Enriched::kind))
            .unwrap_or(match side {
                Side::Server => Kind::Internal,
                Side::Client => Kind::Upstream,
            });
        // Only where a client is told to come back: a rate limit, or a
        // service with no room that said when it expects some.
        let retry_after = matches!(kind, Kind::RateLimited | Kind::Overloaded)
            .then(|| atscale_core::retry_after(err))
            .flatten();
        let deadline = (kind == Kind::DeadlineExceeded)
            .then(|| deadline_of(err).map(|d| d.origin()))
            .flatten();
        let attempts = (kind == Kind::HedgeExhausted)
            .then(|| find::<HedgeExhausted>(err).map(|h| h.attempts().len()))
            .flatten();
        let id = ErrorId::random();
        let help = config.help.as_ref().map(|t| t.render(kind, id));
        Enriched {
            f: Box::new(Fields {
                kind,
                id,
                at: SystemTime::now(),
                service: config.service.clone(),
                side,
                method: meta.method,
                target: meta.target,
                matched: meta.matched,
                grpc: meta.grpc,
                message: safe_message(kind, err, retry_after, deadline),
                help,
                retry_after,
                deadline,
                attempts,
                layer: layer_of(kind, nested),
                trace_id: meta.traceparent.as_ref().and_then(TraceId::parse),
                obs: meta.obs,
                source: error,
            }),
        }
    }

    /// What happened. [`Kind::of`] on this error, or on a chain holding
    /// it, answers the same.
    pub fn kind(&self) -> Kind {
        self.f.kind
    }

    /// The random, 128-bit id that finds this error's log line.
    pub fn id(&self) -> ErrorId {
        self.f.id
    }

    /// When the error was enriched (wall clock; `Display` gives RFC 3339).
    pub fn timestamp(&self) -> Timestamp {
        Timestamp::new(self.f.at)
    }

    /// The name of the service that enriched the error.
    pub fn service(&self) -> &str {
        &self.f.service
    }

    /// The HTTP method of the request (gRPC calls are all `POST`).
    pub fn method(&self) -> &Method {
        &self.f.method
    }

    /// The route: the template the request matched (`/orders/{id}`) when
    /// the router tells (axum's `MatchedPath`, with the `axum` feature and
    /// the layer added with `Router::layer`), otherwise the [`path`](Enriched::path).
    pub fn route(&self) -> &str {
        self.f.matched.as_str().unwrap_or_else(|| self.path())
    }

    /// The path of the request (for gRPC, `/package.Service/Method`); never
    /// the query, which may hold secrets.
    pub fn path(&self) -> &str {
        self.f.target.path()
    }

    /// For a gRPC request, the service and method names.
    pub fn rpc(&self) -> Option<(&str, &str)> {
        self.f.grpc.as_ref()?;
        self.path().strip_prefix('/')?.split_once('/')
    }

    /// Whether the request was gRPC (its content type is `application/grpc…`).
    pub fn is_grpc(&self) -> bool {
        self.f.grpc.is_some()
    }

    /// The gRPC request's content type, which the answer repeats.
    pub(crate) fn grpc_content_type(&self) -> Option<&HeaderValue> {
        self.f.grpc.as_ref()
    }

    /// For an outgoing call (client mode), the authority called (`host:port`).
    pub fn target(&self) -> Option<&str> {
        match self.f.side {
            Side::Client => self.f.target.authority.as_ref().map(|a| a.as_str()),
            Side::Server => None,
        }
    }

    /// Whether the error was enriched on an outgoing call (client mode).
    pub fn is_outgoing(&self) -> bool {
        self.f.side == Side::Client
    }

    /// The atscale layer that produced the failure, inferred from the
    /// vocabulary type: `deadline`, `ratelimit`, `heartbeat`, `hedge`;
    /// `service` for an internal error, `upstream` for a dependency's failure;
    /// `None` when no one layer is to blame (overload, cancellation).
    pub fn layer(&self) -> Option<&'static str> {
        self.f.layer
    }

    /// How many hedged attempts were made, when a hedge was exhausted.
    pub fn attempts(&self) -> Option<usize> {
        self.f.attempts
    }

    /// When rate limited: how long until the limits would admit the request.
    pub fn retry_after(&self) -> Option<Duration> {
        self.f.retry_after
    }

    /// When a deadline was exceeded: where that deadline came from.
    pub fn deadline_origin(&self) -> Option<Origin> {
        self.f.deadline
    }

    /// When a deadline was exceeded: whether a caller chose it (rather than
    /// this hop's own budget).
    pub fn deadline_inherited(&self) -> Option<bool> {
        self.f.deadline.map(Origin::is_inherited)
    }

    /// The message safe to show a user: it says what happened and what to do,
    /// never what an inner error said.
    pub fn message(&self) -> &str {
        &self.f.message
    }

    /// A short title for the kind (`"Deadline exceeded"`).
    pub fn title(&self) -> &'static str {
        title(self.f.kind)
    }

    /// The HTTP status for the kind ([`Kind::http_status`]).
    pub fn status(&self) -> StatusCode {
        self.f.kind.http_status()
    }

    /// The help link, when the layer has a template.
    pub fn help_link(&self) -> Option<&str> {
        self.f.help.as_deref()
    }

    /// The whole `source()` chain, for logs: each error's `Display`,
    /// outermost first, separated by `": "`; every attempt of an exhausted
    /// hedge is listed. May contain internal details: never show it to users.
    pub fn report(&self) -> Report<'_> {
        Report(&*self.f.source)
    }

    pub(crate) fn inner(&self) -> &(dyn Error + 'static) {
        &*self.f.source
    }

    /// The W3C trace id (32 lower-case hex digits) of the request's
    /// `traceparent` header, when it had exactly one well-formed value; a
    /// malformed value is ignored, never echoed. It is in the log line and,
    /// for HTTP, in the problem+json answer (`trace_id`).
    pub fn trace_id(&self) -> Option<&str> {
        self.f.trace_id.as_ref().map(TraceId::as_str)
    }

    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn observed(&self) -> &Observed {
        &self.f.obs
    }

    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn matched_route(&self) -> Option<&str> {
        self.f.matched.as_str()
    }

    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn service_arc(&self) -> Arc<str> {
        self.f.service.clone()
    }

    /// The original error.
    pub fn into_source(self) -> BoxError {
        self.f.source
    }
}

#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
impl Enriched {
    /// The `tonic::Status` a server-mode layer answers a gRPC request with:
    /// the kind's code, the user-safe message, and rich details
    /// (`ErrorInfo`, `RequestInfo`, `RetryInfo`, `Help`, `LocalizedMessage`;
    /// see the crate docs). Internal details are not included.
    pub fn to_status(&self) -> tonic::Status {
        crate::grpc::status(self, false)
    }
}

#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
impl From<Enriched> for tonic::Status {
    fn from(err: Enriched) -> tonic::Status {
        err.to_status()
    }
}

impl fmt::Display for Enriched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::with_capacity(96);
        s.push_str(words(self.f.kind));
        match self.target() {
            Some(target) => {
                s.push_str(" calling ");
                s.push_str(target);
            }
            None => {
                s.push_str(" in ");
                s.push_str(&self.f.service);
            }
        }
        s.push_str(&format!(" ({} {}", self.f.method, self.path()));
        if let Some(inherited) = self.deadline_inherited() {
            s.push_str(if inherited {
                ", deadline inherited"
            } else {
                ", local deadline"
            });
        }
        s.push_str(&format!("), error id {}", self.f.id));
        f.pad(&s)
    }
}

impl Error for Enriched {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&*self.f.source)
    }
}

/// The full `source()` chain of an error, for logs (see [`Enriched::report`]).
#[derive(Clone, Copy, Debug)]
pub struct Report<'a>(&'a (dyn Error + 'static));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut next = Some(self.0);
        let mut first = true;
        while let Some(err) = next {
            if !first {
                f.write_str(": ")?;
            }
            first = false;
            write!(f, "{err}")?;
            if let Some(hedge) = err.downcast_ref::<HedgeExhausted>() {
                // The hedge's source is only its first attempt: list them all.
                f.write_str(" [")?;
                for (n, attempt) in hedge.attempts().iter().enumerate() {
                    if n > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "attempt {}: {}", n + 1, Report(&**attempt))?;
                }
                return f.write_str("]");
            }
            next = err.source();
        }
        Ok(())
    }
}

fn deadline_of<'a>(err: &'a (dyn Error + 'static)) -> Option<&'a DeadlineExceeded> {
    atscale_core::chain(err).find_map(|e| {
        e.downcast_ref::<DeadlineExceeded>()
            .or_else(|| match e.downcast_ref::<Interrupted>() {
                Some(Interrupted::DeadlineExceeded(d)) => Some(d),
                _ => None,
            })
    })
}

fn layer_of(kind: Kind, nested: Option<&Enriched>) -> Option<&'static str> {
    match kind {
        Kind::DeadlineExceeded | Kind::BadRequest => Some("deadline"),
        Kind::RateLimited => Some("ratelimit"),
        Kind::Stalled => Some("heartbeat"),
        Kind::HedgeExhausted => Some("hedge"),
        Kind::Upstream | Kind::Unreachable => Some("upstream"),
        Kind::Internal => Some("service"),
        _ => nested.and_then(Enriched::layer),
    }
}

/// Lower-case words for a kind, for `Display`.
fn words(kind: Kind) -> &'static str {
    match kind {
        Kind::DeadlineExceeded => "deadline exceeded",
        Kind::RateLimited => "rate limited",
        Kind::Overloaded => "overloaded",
        Kind::Stalled => "stalled",
        Kind::HedgeExhausted => "hedged attempts exhausted",
        Kind::Unreachable => "dependency unreachable",
        Kind::Cancelled => "cancelled",
        Kind::BadRequest => "bad request",
        Kind::Upstream => "upstream failure",
        Kind::Internal => "internal error",
        _ => "failure",
    }
}

pub(crate) fn title(kind: Kind) -> &'static str {
    match kind {
        Kind::DeadlineExceeded => "Deadline exceeded",
        Kind::RateLimited => "Rate limited",
        Kind::Overloaded => "Service overloaded",
        Kind::Stalled => "Request stalled",
        Kind::HedgeExhausted => "All attempts failed",
        Kind::Unreachable => "Dependency unreachable",
        Kind::Cancelled => "Request cancelled",
        Kind::BadRequest => "Bad request",
        Kind::Upstream => "Upstream failure",
        Kind::Internal => "Internal error",
        _ => "Request failed",
    }
}

fn safe_message(
    kind: Kind,
    err: &(dyn Error + 'static),
    retry_after: Option<Duration>,
    deadline: Option<Origin>,
) -> Cow<'static, str> {
    Cow::Borrowed(match kind {
        Kind::DeadlineExceeded => match deadline.map(Origin::is_inherited) {
            Some(true) => "The request did not finish within the deadline its caller set.",
            Some(false) => "The request did not finish within the service's time budget.",
            None => "The request did not finish within its deadline.",
        },
        Kind::RateLimited => {
            return match retry_after {
                Some(after) => Cow::Owned(format!(
                    "Too many requests: retry after {} s.",
                    retry_after_secs(after)
                )),
                None => Cow::Borrowed("Too many requests: retry later."),
            };
        }
        Kind::Overloaded => {
            return match retry_after {
                Some(after) => Cow::Owned(format!(
                    "The service is overloaded: retry after {} s.",
                    retry_after_secs(after)
                )),
                None => Cow::Borrowed("The service is overloaded: retry later."),
            };
        }
        Kind::Unreachable => {
            // The dependency's name is the one this service gave it (a
            // client stack's name), never an address from the error text.
            return match find::<Unreachable>(err) {
                Some(u) => Cow::Owned(format!(
                    "A service this one depends on ({}) could not be reached: retry later.",
                    u.dependency()
                )),
                None => Cow::Borrowed(
                    "A service this one depends on could not be reached: retry later.",
                ),
            };
        }
        Kind::Stalled => "The request stopped making progress and was stopped: retry later.",
        Kind::HedgeExhausted => "Every attempt to serve the request failed.",
        Kind::Cancelled => "The request was cancelled.",
        Kind::BadRequest => {
            // The header name and reason describe the client's own input.
            return match find::<MalformedDeadline>(err) {
                Some(m) => Cow::Owned(format!(
                    "The {} header is malformed: {}.",
                    m.header(),
                    m.reason()
                )),
                None => Cow::Borrowed("The request is malformed."),
            };
        }
        Kind::Upstream => "A service this one depends on failed.",
        Kind::Internal => "The service failed unexpectedly.",
        _ => "The request failed.",
    })
}

/// `Retry-After` is whole seconds: round up, so a client that waits that
/// long is admitted.
pub(crate) fn retry_after_secs(after: Duration) -> u64 {
    after.as_secs() + u64::from(after.subsec_nanos() > 0)
}

/// The inner service panicked; the panic was caught and answered as an
/// internal error.
#[derive(Debug)]
pub struct Panicked {
    message: String,
}

impl Panicked {
    pub(crate) fn from_payload(payload: Box<dyn Any + Send>) -> Self {
        let message = match payload.downcast::<String>() {
            Ok(s) => *s,
            Err(payload) => match payload.downcast::<&'static str>() {
                Ok(s) => (*s).to_owned(),
                Err(_) => "a panic payload that is not a string".to_owned(),
            },
        };
        Panicked { message }
    }

    /// The panic's message (for logs only).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Panicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!("inner service panicked: {}", self.message))
    }
}

impl Error for Panicked {}

/// An [`ErrorEnrichLayer`](crate::ErrorEnrichLayer) could not be built from
/// the values given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    what: &'static str,
    value: String,
    reason: &'static str,
}

impl ConfigError {
    pub(crate) fn service_name(value: &str, reason: &'static str) -> Self {
        ConfigError {
            what: "service name",
            value: value.to_owned(),
            reason,
        }
    }

    pub(crate) fn help_link(value: &str, reason: &'static str) -> Self {
        ConfigError {
            what: "help link template",
            value: value.to_owned(),
            reason,
        }
    }

    /// The value that was rejected.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// Why it was rejected.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!(
            "invalid {} {:?}: {}",
            self.what, self.value, self.reason
        ))
    }
}

impl Error for ConfigError {}

/// A string is not an error id: 32 hexadecimal digits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidErrorId {
    _priv: (),
}

impl InvalidErrorId {
    pub(crate) const fn new() -> Self {
        InvalidErrorId { _priv: () }
    }
}

impl fmt::Display for InvalidErrorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad("invalid error id: expected 32 hexadecimal digits")
    }
}

impl Error for InvalidErrorId {}

impl FromStr for ErrorId {
    type Err = InvalidErrorId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(InvalidErrorId::new());
        }
        u128::from_str_radix(s, 16)
            .map(ErrorId::from_u128)
            .map_err(|_| InvalidErrorId::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atscale_core::{Cancelled, Overloaded, RateLimited, Stalled};

    fn config() -> Config {
        Config::new("checkout".into(), None, false).unwrap()
    }

    /// What a client keeps (a server keeps the same but the authority).
    fn meta(uri: &str) -> RequestMeta {
        let req = http::Request::builder().uri(uri).body(()).unwrap();
        RequestMeta::of(&req, Side::Client)
    }

    #[test]
    fn the_kept_target_gives_the_uris_path_and_only_a_client_its_authority() {
        for uri in [
            "/a",
            "/a/b?token=x",
            "/",
            "*",
            "http://billing:8080/charge?token=x",
            "http://billing",
            "https://billing?q",
            "billing:443",
        ] {
            let uri: Uri = uri.parse().unwrap();
            for side in [Side::Server, Side::Client] {
                let target = Target::of(&uri, side);
                assert_eq!(target.path(), uri.path(), "{uri} {side:?}");
                let authority = target.authority.as_ref().map(|a| a.as_str());
                match side {
                    Side::Client => assert_eq!(authority, uri.authority().map(|a| a.as_str())),
                    Side::Server => assert_eq!(authority, None),
                }
            }
        }
    }

    #[derive(Debug)]
    struct Wrap(&'static str, BoxError);
    impl fmt::Display for Wrap {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }
    impl Error for Wrap {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&*self.1)
        }
    }

    #[test]
    fn foreign_errors_are_internal_on_servers_and_upstream_on_clients() {
        let server = Enriched::new(
            &config(),
            Side::Server,
            meta("/a"),
            "secret: db password".into(),
        );
        assert_eq!(server.kind(), Kind::Internal);
        assert_eq!(server.layer(), Some("service"));
        assert!(!server.to_string().contains("secret"));
        assert!(!server.message().contains("secret"));
        assert_eq!(server.report().to_string(), "secret: db password");

        let client = Enriched::new(
            &config(),
            Side::Client,
            meta("http://billing:8080/charge?token=x"),
            "connection refused".into(),
        );
        assert_eq!(client.kind(), Kind::Upstream);
        // The vocabulary agrees, on the error and on a chain holding it.
        assert_eq!(Kind::of(&client), Kind::Upstream);
        assert_eq!(Kind::of(&server), Kind::Internal);
        assert_eq!(client.target(), Some("billing:8080"));
        assert_eq!(client.route(), "/charge");
        assert!(
            client
                .to_string()
                .starts_with("upstream failure calling billing:8080 (GET /charge), error id "),
            "{client}"
        );
        let wrapped = Wrap("handler", Box::new(client));
        assert_eq!(Kind::of(&wrapped), Kind::Upstream);
    }

    #[test]
    fn a_nested_enriched_error_keeps_its_kind() {
        let client = Enriched::new(
            &config(),
            Side::Client,
            meta("http://billing/x"),
            "connection refused".into(),
        );
        let server = Enriched::new(
            &config(),
            Side::Server,
            meta("/pay"),
            Box::new(Wrap("paying", Box::new(client))),
        );
        assert_eq!(server.kind(), Kind::Upstream);
        assert_eq!(server.status(), StatusCode::BAD_GATEWAY);
        assert!(
            server
                .report()
                .to_string()
                .starts_with("paying: upstream failure calling billing")
        );
        assert!(
            server
                .report()
                .to_string()
                .ends_with(": connection refused")
        );
    }

    #[test]
    fn overloaded_with_a_retry_after_tells_the_client_when() {
        let err = Enriched::new(
            &config(),
            Side::Server,
            meta("/a"),
            Box::new(Wrap(
                "admitting",
                Box::new(Overloaded::with_retry_after(Duration::from_millis(2500))),
            )),
        );
        assert_eq!(err.kind(), Kind::Overloaded);
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(err.retry_after(), Some(Duration::from_millis(2500)));
        assert_eq!(err.message(), "The service is overloaded: retry after 3 s.");
        let plain = Enriched::new(
            &config(),
            Side::Server,
            meta("/a"),
            Box::new(Overloaded::new()),
        );
        assert_eq!(plain.retry_after(), None);
    }

    #[cfg(feature = "tonic")]
    #[test]
    fn grpc_answers_carry_server_pushback() {
        let err = Enriched::new(
            &config(),
            Side::Server,
            meta("/a"),
            Box::new(RateLimited::new(Duration::from_millis(1500))),
        );
        let status = crate::grpc::status(&err, false);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status.metadata().get("grpc-retry-pushback-ms").unwrap(),
            "1500"
        );
        let err = Enriched::new(
            &config(),
            Side::Server,
            meta("/a"),
            Box::new(Overloaded::new()),
        );
        let status = crate::grpc::status(&err, false);
        assert!(status.metadata().get("grpc-retry-pushback-ms").is_none());
    }

    #[test]
    fn unreachable_names_the_dependency_not_the_address() {
        let refused = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connect to 10.1.2.3:8080 refused",
        );
        let err = Enriched::new(
            &config(),
            Side::Client,
            meta("http://10.1.2.3:8080/x"),
            Box::new(Unreachable::new("billing").with_source(refused)),
        );
        assert_eq!(err.kind(), Kind::Unreachable);
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            err.message(),
            "A service this one depends on (billing) could not be reached: retry later."
        );
        assert_eq!(err.layer(), Some("upstream"));
        // A bare refused connection is the same kind, without a name.
        let bare = Enriched::new(
            &config(),
            Side::Client,
            meta("http://10.1.2.3:8080/x"),
            Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        );
        assert_eq!(bare.kind(), Kind::Unreachable);
        assert!(!bare.message().contains("10.1.2.3"), "{}", bare.message());
    }

    #[test]
    fn vocabulary_details_are_extracted() {
        let rl = Enriched::new(
            &config(),
            Side::Server,
            meta("/a"),
            Box::new(Wrap(
                "calling",
                Box::new(RateLimited::new(Duration::from_millis(1500))),
            )),
        );
        assert_eq!(rl.kind(), Kind::RateLimited);
        assert_eq!(rl.retry_after(), Some(Duration::from_millis(1500)));
        assert_eq!(rl.message(), "Too many requests: retry after 2 s.");
        assert_eq!(rl.layer(), Some("ratelimit"));

        let dl = Enriched::new(
            &config(),
            Side::Client,
            meta("http://x/a"),
            Box::new(Interrupted::DeadlineExceeded(DeadlineExceeded::new(
                Duration::from_secs(1),
                Duration::from_secs(1),
                Origin::GrpcTimeout,
            ))),
        );
        assert_eq!(dl.deadline_origin(), Some(Origin::GrpcTimeout));
        assert_eq!(dl.deadline_inherited(), Some(true));
        assert!(dl.to_string().contains("deadline inherited"), "{dl}");

        let hedge = Enriched::new(
            &config(),
            Side::Server,
            meta("/a"),
            Box::new(HedgeExhausted::new(vec![
                Box::new(Overloaded::new()),
                Box::new(Stalled::new(Duration::from_secs(3))),
            ])),
        );
        assert_eq!(hedge.attempts(), Some(2));
        assert_eq!(
            hedge.report().to_string(),
            "all 2 hedged attempts failed [attempt 1: service overloaded; attempt 2: stalled: no progress for 3s]"
        );

        let bad = Enriched::new(
            &config(),
            Side::Server,
            meta("/a"),
            Box::new(MalformedDeadline::new("grpc-timeout", "unknown unit")),
        );
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            bad.message(),
            "The grpc-timeout header is malformed: unknown unit."
        );

        let cancelled = Enriched::new(
            &config(),
            Side::Server,
            meta("/a"),
            Box::new(Cancelled::new()),
        );
        assert_eq!(cancelled.layer(), None);
    }

    #[test]
    fn grpc_is_recognised_by_content_type() {
        let mut h = http::HeaderMap::new();
        assert!(grpc_content_type(&h).is_none());
        for (ct, grpc) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("Application/GRPC", true),
            ("application/grpc-web", true),
            ("application/grpcx", false),
            ("application/json", false),
        ] {
            h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
            assert_eq!(grpc_content_type(&h).is_some(), grpc, "{ct}");
        }
    }

    #[test]
    fn rpc_splits_the_grpc_path() {
        let mut m = meta("/grpc.health.v1.Health/Check");
        m.grpc = Some(HeaderValue::from_static("application/grpc"));
        let e = Enriched::new(&config(), Side::Server, m, "x".into());
        assert_eq!(e.rpc(), Some(("grpc.health.v1.Health", "Check")));
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 0);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }

    #[test]
    fn panic_payloads_become_messages() {
        let p = std::panic::catch_unwind(|| panic!("boom {}", 1)).unwrap_err();
        assert_eq!(Panicked::from_payload(p).message(), "boom 1");
        let p = std::panic::catch_unwind(|| panic!("static")).unwrap_err();
        assert_eq!(
            Panicked::from_payload(p).to_string(),
            "inner service panicked: static"
        );
        let p = std::panic::catch_unwind(|| std::panic::panic_any(7_u8)).unwrap_err();
        assert_eq!(
            Panicked::from_payload(p).message(),
            "a panic payload that is not a string"
        );
    }

    #[test]
    fn error_ids_parse_back() {
        let id = ErrorId::random();
        assert_eq!(id.to_string().parse::<ErrorId>().unwrap(), id);
        assert!("xyz".parse::<ErrorId>().is_err());
        assert!(
            "+0000000000000000000000000000000"
                .parse::<ErrorId>()
                .is_err()
        );
    }
}
