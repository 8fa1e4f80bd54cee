//! The W3C trace id: read from `traceparent`, put in the log line and in
//! problem+json; a malformed value is ignored, never echoed.

mod support;

use atscale_core::{BoxError, RateLimited};
use atscale_error::ErrorEnrichLayer;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use support::capture_logs;
use tower::{Layer, ServiceExt, service_fn};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Answers one request with a rate-limit error; returns the problem document.
async fn problem(traceparent: &[&str]) -> serde_json::Value {
    let svc = ErrorEnrichLayer::new("checkout").layer(service_fn(|_: Request<()>| async {
        Err::<Response<Full<Bytes>>, BoxError>(Box::new(RateLimited::new(
            std::time::Duration::from_secs(1),
        )))
    }));
    let mut req = Request::get("/orders").body(()).unwrap();
    for value in traceparent {
        req.headers_mut()
            .append("traceparent", value.parse().unwrap());
    }
    let res = svc.oneshot(req).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test]
async fn a_well_formed_traceparent_puts_its_trace_id_in_the_answer_and_the_log() {
    let (logs, _guard) = capture_logs();
    let doc = problem(&[VALID]).await;
    assert_eq!(doc["trace_id"], TRACE_ID);
    let line = logs.by_id(doc["error_id"].as_str().unwrap());
    assert_eq!(line.field("trace_id"), Some(TRACE_ID));
}

#[tokio::test]
async fn a_malformed_or_repeated_traceparent_is_ignored_never_echoed() {
    let (logs, _guard) = capture_logs();
    let upper = VALID.to_uppercase();
    let zeros = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
    let injected = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01<script>";
    for values in [
        &[upper.as_str()][..],
        &[zeros],
        &[injected],
        &[VALID, VALID],
    ] {
        let doc = problem(values).await;
        assert!(doc.get("trace_id").is_none(), "{values:?}: {doc}");
        assert!(!doc.to_string().contains("script"), "{values:?}");
        let line = logs.by_id(doc["error_id"].as_str().unwrap());
        assert_eq!(line.field("trace_id"), None, "{values:?}");
    }
}

#[tokio::test]
async fn no_traceparent_no_trace_id() {
    let doc = problem(&[]).await;
    assert!(doc.get("trace_id").is_none());
}

#[tokio::test]
async fn a_client_mode_error_carries_the_trace_id() {
    let svc = ErrorEnrichLayer::client("checkout").layer(service_fn(|_: Request<()>| async {
        Err::<(), BoxError>("refused".into())
    }));
    let req = Request::get("http://inventory/items")
        .header("traceparent", VALID)
        .body(())
        .unwrap();
    let err = svc.oneshot(req).await.unwrap_err();
    assert_eq!(err.trace_id(), Some(TRACE_ID));
}
