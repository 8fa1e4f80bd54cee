//! gRPC: an enriched error as a trailers-only response.
//!
//! With the `tonic` feature the status carries rich details
//! (`grpc-status-details-bin`); without it, the code and message only.

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response};

use crate::body::ResponseBody;
use crate::error::Enriched;

/// A trailers-only gRPC response: HTTP 200, the request's content type,
/// `grpc-status`, `grpc-message` (and details) in the headers, and an empty
/// body that ends the stream.
pub(crate) fn response<B>(err: &Enriched, internal_details: bool) -> Response<ResponseBody<B>> {
    #[cfg(feature = "tonic")]
    {
        let mut res = status(err, internal_details)
            .into_http::<()>()
            .map(|()| ResponseBody::empty());
        res.headers_mut().insert(CONTENT_TYPE, content_type(err));
        res
    }
    #[cfg(not(feature = "tonic"))]
    {
        let _ = internal_details;
        let mut res = Response::new(ResponseBody::empty());
        let headers = res.headers_mut();
        headers.insert(CONTENT_TYPE, content_type(err));
        headers.insert(
            "grpc-status",
            HeaderValue::from(err.kind().grpc_code() as i32),
        );
        headers.insert(
            "grpc-message",
            HeaderValue::from_str(&atscale_core::grpc::percent_encode(err.message()))
                .expect("percent-encoding leaves only visible ASCII"),
        );
        if let Some(after) = err.retry_after() {
            headers.insert(PUSHBACK, HeaderValue::from(pushback_ms(after)));
        }
        res
    }
}

/// The request's own gRPC content type (so a gRPC-Web client gets
/// `application/grpc-web…` back), or `application/grpc`.
fn content_type(err: &Enriched) -> HeaderValue {
    err.grpc_content_type()
        .cloned()
        .unwrap_or(HeaderValue::from_static("application/grpc"))
}

/// The `tonic::Status` for `err`, with rich details:
///
/// - `ErrorInfo`: reason = the kind in upper snake case (`RATE_LIMITED`,
///   as AIP-193 asks), domain = the service name, metadata = `error_id`,
///   `timestamp`, `route`, and `layer`, `attempts`, `deadline_origin` when known;
/// - `RequestInfo`: request id = the error id;
/// - `RetryInfo`: the retry delay, when rate limited;
/// - `Help`: the help link, when the layer has a template;
/// - `LocalizedMessage`: the user-safe message (`en-US`);
/// - `DebugInfo`: the source chain, only when internal details are exposed.
#[cfg(feature = "tonic")]
pub(crate) fn status(err: &Enriched, internal_details: bool) -> tonic::Status {
    use std::collections::HashMap;
    use tonic_types::{
        DebugInfo, ErrorDetail, ErrorInfo, Help, LocalizedMessage, RequestInfo, RetryInfo,
        StatusExt,
    };

    let mut metadata = HashMap::from([
        ("error_id".to_owned(), err.id().to_string()),
        ("timestamp".to_owned(), err.timestamp().to_string()),
        ("route".to_owned(), err.route().to_owned()),
    ]);
    if let Some(layer) = err.layer() {
        metadata.insert("layer".to_owned(), layer.to_owned());
    }
    if let Some(attempts) = err.attempts() {
        metadata.insert("attempts".to_owned(), attempts.to_string());
    }
    if let Some(origin) = err.deadline_origin() {
        metadata.insert("deadline_origin".to_owned(), origin.as_str().to_owned());
    }
    let mut details: Vec<ErrorDetail> = vec![
        ErrorInfo::new(
            err.kind().as_str().to_ascii_uppercase(),
            err.service(),
            metadata,
        )
        .into(),
        RequestInfo::new(err.id().to_string(), "").into(),
    ];
    if let Some(after) = err.retry_after() {
        details.push(RetryInfo::new(Some(after)).into());
    }
    if let Some(link) = err.help_link() {
        details.push(Help::with_link(err.title(), link).into());
    }
    details.push(LocalizedMessage::new("en-US", err.message()).into());
    if internal_details {
        let chain: Vec<String> = atscale_core::chain(err.inner())
            .map(|e| e.to_string())
            .collect();
        details.push(DebugInfo::new(chain, err.report().to_string()).into());
    }
    let code = tonic::Code::from(err.kind().grpc_code() as i32);
    let mut status = tonic::Status::with_error_details_vec(code, err.message(), details);
    if let Some(after) = err.retry_after() {
        status.metadata_mut().insert(
            PUSHBACK,
            tonic::metadata::MetadataValue::from(pushback_ms(after)),
        );
    }
    status
}

/// gRFC A6 server pushback, written with every retry-after (rate limited,
/// overloaded): a retrying client waits exactly this many milliseconds.
const PUSHBACK: &str = "grpc-retry-pushback-ms";

/// The pushback for `after`: whole milliseconds rounded up (a client that
/// waits exactly this is never early), at most `i32::MAX` (A6: a signed
/// 32-bit integer; anything larger reads as "do not retry").
fn pushback_ms(after: std::time::Duration) -> i32 {
    i32::try_from(after.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushback_rounds_up_and_fits_a6s_i32() {
        use std::time::Duration;
        assert_eq!(pushback_ms(Duration::from_millis(1500)), 1500);
        assert_eq!(pushback_ms(Duration::from_micros(1_500_001)), 1501);
        assert_eq!(pushback_ms(Duration::from_nanos(1)), 1);
        assert_eq!(pushback_ms(Duration::ZERO), 0);
        assert_eq!(pushback_ms(Duration::from_secs(u64::MAX)), i32::MAX);
    }
}
