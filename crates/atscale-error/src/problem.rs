//! HTTP: an enriched error as an RFC 9457 `application/problem+json` response.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use serde_json::{Map, Value, json};

use crate::body::ResponseBody;
use crate::error::{Enriched, retry_after_secs};

pub(crate) const PROBLEM_JSON: &str = "application/problem+json";

/// The problem details document for `err` (RFC 9457, section 3).
///
/// - `type`: the help link when there is one (it documents the problem
///   type), otherwise `about:blank`;
/// - `title`: with a help link the kind's title, with `about:blank` the HTTP
///   status phrase, as section 4.2.1 asks;
/// - `status`, `detail` (the user-safe message), `instance` (the request path);
/// - extension members: `error_id`, `code`, `timestamp`, `service`, and
///   `retry_after` (seconds) when rate limited, `attempts` when a hedge was
///   exhausted, `deadline_origin` when a deadline fired, `trace_id` when the
///   request had a well-formed W3C `traceparent`, `chain` only when
///   internal details are exposed.
pub(crate) fn document(err: &Enriched, internal_details: bool) -> Value {
    let status = err.status();
    let (kind_type, title) = match err.help_link() {
        Some(link) => (link.to_owned(), err.title()),
        None => ("about:blank".to_owned(), status_phrase(status)),
    };
    let mut doc = json!({
        "type": kind_type,
        "title": title,
        "status": status.as_u16(),
        "detail": err.message(),
        "instance": err.path(),
        "error_id": err.id().to_string(),
        "code": err.kind().as_str(),
        "timestamp": err.timestamp().to_string(),
        "service": err.service(),
    });
    let members: &mut Map<String, Value> = doc.as_object_mut().expect("an object");
    if let Some(after) = err.retry_after() {
        members.insert("retry_after".into(), retry_after_secs(after).into());
    }
    if let Some(attempts) = err.attempts() {
        members.insert("attempts".into(), attempts.into());
    }
    if let Some(origin) = err.deadline_origin() {
        members.insert("deadline_origin".into(), origin.as_str().into());
    }
    if let Some(trace_id) = err.trace_id() {
        members.insert("trace_id".into(), trace_id.into());
    }
    if internal_details {
        let chain = atscale_core::chain(err.inner())
            .map(|e| Value::String(e.to_string()))
            .collect();
        members.insert("chain".into(), Value::Array(chain));
    }
    doc
}

/// The response for `err`: its status, `Content-Type: application/problem+json`,
/// `Cache-Control: no-store`, `Retry-After` when rate limited, and the document.
pub(crate) fn response<B>(err: &Enriched, internal_details: bool) -> Response<ResponseBody<B>> {
    let body = serde_json::to_vec(&document(err, internal_details))
        .expect("a JSON value always serializes");
    let mut res = Response::new(ResponseBody::full(Bytes::from(body)));
    *res.status_mut() = err.status();
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(after) = err.retry_after() {
        headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(after)));
    }
    res
}

/// The recommended phrase of a status, for `title` with `about:blank`.
fn status_phrase(status: StatusCode) -> &'static str {
    match status.as_u16() {
        499 => "Client Closed Request",
        _ => status.canonical_reason().unwrap_or("Error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_the_vocabulary_uses_has_a_phrase() {
        for (code, phrase) in [
            (400, "Bad Request"),
            (429, "Too Many Requests"),
            (499, "Client Closed Request"),
            (500, "Internal Server Error"),
            (502, "Bad Gateway"),
            (503, "Service Unavailable"),
            (504, "Gateway Timeout"),
        ] {
            assert_eq!(status_phrase(StatusCode::from_u16(code).unwrap()), phrase);
        }
    }
}
