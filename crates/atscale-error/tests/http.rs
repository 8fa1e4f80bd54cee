//! ErrorEnrich in server mode, end to end: a real axum server on loopback, a
//! real hyper client, and the status, headers, body and log line of every
//! kind of the failure vocabulary.

mod support;

use std::net::SocketAddr;

use atscale_error::ErrorEnrichLayer;
use axum::Router;
use axum::extract::Path;
use axum::routing::get;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use support::{FAIL, FailingLayer, Logs, SECRET, capture_logs, is_rfc3339};
use tower::ServiceBuilder;

const HELP: &str = "https://docs.example.com/errors/{code}";

/// What the log calls the route of `/orders/42`: the template axum matched
/// with the `axum` feature, the path without it.
const ROUTE: &str = if cfg!(feature = "axum") {
    "/orders/{id}"
} else {
    "/orders/42"
};

/// Serves `/orders/{id}` behind `enrich` and the failing layer; returns the address.
async fn serve(enrich: ErrorEnrichLayer) -> SocketAddr {
    let app = Router::new()
        .route(
            "/orders/{id}",
            get(|Path(id): Path<String>| async move { format!("order {id}") }),
        )
        // No HandleErrorLayer: the enriched stack cannot fail.
        .layer(ServiceBuilder::new().layer(enrich).layer(FailingLayer));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    fn all_text(&self) -> String {
        let mut s = String::from_utf8_lossy(&self.body).into_owned();
        for (name, value) in &self.headers {
            s.push_str(&format!("\n{name}: {}", value.to_str().unwrap_or("")));
        }
        s
    }
}

async fn get_with(
    client: &Client<HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
    path: &str,
    fail: &str,
) -> Answer {
    let req = Request::get(format!("http://{addr}{path}"))
        .header(FAIL, fail)
        .body(Empty::new())
        .unwrap();
    let res = client.request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// Checks `doc` against RFC 9457 member by member, for a response with `status`.
fn check_rfc9457(doc: &Value, status: StatusCode, path: &str) {
    let members = doc
        .as_object()
        .expect("a problem details object (section 3)");
    // type: a URI reference (3.1.1); about:blank when nothing else is given.
    let kind_type = members["type"].as_str().expect("type is a string");
    assert!(
        kind_type == "about:blank" || kind_type.parse::<http::Uri>().is_ok(),
        "{kind_type}"
    );
    // status: a number equal to the response's status (3.1.2).
    assert_eq!(members["status"].as_u64(), Some(u64::from(status.as_u16())));
    // title: a string (3.1.3); with about:blank, the status phrase (4.2.1).
    let title = members["title"].as_str().expect("title is a string");
    if kind_type == "about:blank" {
        let phrase = status.canonical_reason().unwrap_or("Client Closed Request");
        assert_eq!(title, phrase);
    }
    // detail: a string for the client, not debugging information (3.1.4).
    let detail = members["detail"].as_str().expect("detail is a string");
    assert!(
        detail.ends_with('.') && !detail.contains(SECRET),
        "{detail}"
    );
    // instance: a URI reference for this occurrence (3.1.5).
    let instance = members["instance"].as_str().expect("instance is a string");
    assert_eq!(instance, path.split('?').next().unwrap());
    assert!(instance.parse::<http::Uri>().is_ok());
    // Extension members: names of at least three letters, digits or
    // underscores, starting with a letter (3.2).
    for name in members.keys() {
        let ok = name.len() >= 3
            && name.starts_with(|c: char| c.is_ascii_alphabetic())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        assert!(ok, "member name {name}");
    }
}

/// What a client must see for each failure the test layer can produce.
struct Expect {
    fail: &'static str,
    status: u16,
    code: &'static str,
    retry_after: Option<&'static str>,
    layer: Option<&'static str>,
    level: tracing::Level,
    detail: &'static str,
    chain: &'static str,
}

const EXPECTED: &[Expect] = &[
    Expect {
        fail: "deadline",
        status: 504,
        code: "deadline_exceeded",
        retry_after: None,
        layer: Some("deadline"),
        level: tracing::Level::WARN,
        detail: "The request did not finish within the deadline its caller set.",
        chain: "deadline exceeded after 301ms (budget 300ms, header)",
    },
    Expect {
        fail: "deadline-local",
        status: 504,
        code: "deadline_exceeded",
        retry_after: None,
        layer: Some("deadline"),
        level: tracing::Level::WARN,
        detail: "The request did not finish within the service's time budget.",
        chain: "waiting for the inventory: deadline exceeded after 2s (budget 2s, local)",
    },
    Expect {
        fail: "malformed",
        status: 400,
        code: "bad_request",
        retry_after: None,
        layer: Some("deadline"),
        level: tracing::Level::INFO,
        detail: "The x-request-timeout header is malformed: not a number.",
        chain: "malformed x-request-timeout header: not a number",
    },
    Expect {
        fail: "rate",
        status: 429,
        code: "rate_limited",
        retry_after: Some("2"),
        layer: Some("ratelimit"),
        level: tracing::Level::INFO,
        detail: "Too many requests: retry after 2 s.",
        chain: "checking quota: rate limited, retry after 1.5s",
    },
    Expect {
        fail: "overloaded",
        status: 503,
        code: "overloaded",
        retry_after: None,
        layer: None,
        level: tracing::Level::WARN,
        detail: "The service is overloaded: retry later.",
        chain: "service overloaded",
    },
    Expect {
        fail: "stalled",
        status: 503,
        code: "stalled",
        retry_after: None,
        layer: Some("heartbeat"),
        level: tracing::Level::WARN,
        detail: "The request stopped making progress and was stopped: retry later.",
        chain: "stalled: no progress for 4s",
    },
    Expect {
        fail: "hedge",
        status: 502,
        code: "hedge_exhausted",
        retry_after: None,
        layer: Some("hedge"),
        level: tracing::Level::ERROR,
        detail: "Every attempt to serve the request failed.",
        chain: "all 3 hedged attempts failed [attempt 1: connecting to postgres://app:password=hunter2@db failed; attempt 2: service overloaded; attempt 3: stalled: no progress for 1s]",
    },
    Expect {
        fail: "cancelled",
        status: 499,
        code: "cancelled",
        retry_after: None,
        layer: None,
        level: tracing::Level::INFO,
        detail: "The request was cancelled.",
        chain: "request cancelled",
    },
    Expect {
        fail: "internal",
        status: 500,
        code: "internal",
        retry_after: None,
        layer: Some("service"),
        level: tracing::Level::ERROR,
        detail: "The service failed unexpectedly.",
        chain: "loading the order: connecting to postgres://app:password=hunter2@db failed",
    },
    Expect {
        fail: "panic-call",
        status: 500,
        code: "internal",
        retry_after: None,
        layer: Some("service"),
        level: tracing::Level::ERROR,
        detail: "The service failed unexpectedly.",
        chain: "inner service panicked: handler bug: password=hunter2",
    },
    Expect {
        fail: "panic-poll",
        status: 500,
        code: "internal",
        retry_after: None,
        layer: Some("service"),
        level: tracing::Level::ERROR,
        detail: "The service failed unexpectedly.",
        chain: "inner service panicked: async handler bug: password=hunter2",
    },
];

fn check_log(logs: &Logs, id: &str, e: &Expect, path: &str) {
    let line = logs.by_id(id);
    assert_eq!(line.level, e.level, "{}", e.fail);
    assert_eq!(line.field("kind"), Some(e.code));
    assert_eq!(line.field("service"), Some("checkout"));
    assert_eq!(line.field("method"), Some("GET"));
    assert_eq!(line.field("route"), Some(ROUTE));
    assert_eq!(line.field("path"), Some(path));
    assert_eq!(line.field("status"), Some(e.status.to_string().as_str()));
    assert_eq!(line.field("layer"), e.layer);
    assert_eq!(line.field("chain"), Some(e.chain), "{}", e.fail);
    assert!(is_rfc3339(line.field("timestamp").unwrap()));
}

#[tokio::test]
async fn every_kind_becomes_the_right_problem_response_and_one_log_line() {
    let (logs, _guard) = capture_logs();
    let enrich = ErrorEnrichLayer::builder("checkout")
        .help_link(HELP)
        .build()
        .unwrap();
    let addr = serve(enrich).await;
    let client = client();
    let path = "/orders/42";

    for e in EXPECTED {
        let answer = get_with(&client, addr, path, e.fail).await;
        assert_eq!(answer.status.as_u16(), e.status, "{}", e.fail);
        assert_eq!(
            answer.headers["content-type"], "application/problem+json",
            "{}",
            e.fail
        );
        assert_eq!(answer.headers["cache-control"], "no-store");
        assert_eq!(
            answer
                .headers
                .get("retry-after")
                .map(|v| v.to_str().unwrap()),
            e.retry_after,
            "{}",
            e.fail
        );

        let doc = answer.json();
        check_rfc9457(&doc, answer.status, path);
        let mut expected_members = vec![
            "code",
            "detail",
            "error_id",
            "instance",
            "service",
            "status",
            "timestamp",
            "title",
            "type",
        ];
        if e.retry_after.is_some() {
            expected_members.push("retry_after");
        }
        if e.fail == "hedge" {
            expected_members.push("attempts");
        }
        if e.fail.starts_with("deadline") {
            expected_members.push("deadline_origin");
        }
        expected_members.sort_unstable();
        let members: Vec<&str> = doc
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(members, expected_members, "{}", e.fail);

        assert_eq!(
            doc["type"],
            format!("https://docs.example.com/errors/{}", e.code)
        );
        assert_eq!(doc["code"], e.code);
        assert_eq!(doc["detail"], e.detail);
        assert_eq!(doc["service"], "checkout");
        assert!(is_rfc3339(doc["timestamp"].as_str().unwrap()));
        if let Some(after) = e.retry_after {
            assert_eq!(doc["retry_after"].to_string(), after);
        }
        if e.fail == "hedge" {
            assert_eq!(doc["attempts"], 3);
        }
        match e.fail {
            "deadline" => assert_eq!(doc["deadline_origin"], "header"),
            "deadline-local" => assert_eq!(doc["deadline_origin"], "local"),
            _ => {}
        }
        let id = doc["error_id"].as_str().unwrap();
        assert_eq!(id.len(), 32);
        assert!(id.parse::<atscale_error::ErrorId>().is_ok());
        assert!(!answer.all_text().contains("hunter2"), "{}", e.fail);

        check_log(&logs, id, e, path);
    }
    assert_eq!(
        logs.enrich_lines().len(),
        EXPECTED.len(),
        "one line per error"
    );
}

#[tokio::test]
async fn without_a_help_link_the_type_is_about_blank_and_the_title_the_status_phrase() {
    let (_logs, _guard) = capture_logs();
    let addr = serve(ErrorEnrichLayer::new("checkout")).await;
    let client = client();
    for (fail, title) in [
        ("deadline", "Gateway Timeout"),
        ("rate", "Too Many Requests"),
        ("overloaded", "Service Unavailable"),
        ("hedge", "Bad Gateway"),
        ("cancelled", "Client Closed Request"),
        ("malformed", "Bad Request"),
        ("internal", "Internal Server Error"),
    ] {
        let answer = get_with(&client, addr, "/orders/7", fail).await;
        let doc = answer.json();
        check_rfc9457(&doc, answer.status, "/orders/7");
        assert_eq!(doc["type"], "about:blank");
        assert_eq!(doc["title"], title);
    }
}

#[tokio::test]
async fn successful_responses_pass_through_untouched() {
    let (logs, _guard) = capture_logs();
    let addr = serve(ErrorEnrichLayer::new("checkout")).await;
    let answer = get_with(&client(), addr, "/orders/42", "").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, "order 42");
    assert_eq!(answer.headers["content-type"], "text/plain; charset=utf-8");
    assert!(answer.headers.get("cache-control").is_none());
    assert!(logs.enrich_lines().is_empty());
}

#[tokio::test]
async fn the_query_string_is_neither_shown_nor_logged() {
    let (logs, _guard) = capture_logs();
    let addr = serve(ErrorEnrichLayer::new("checkout")).await;
    let answer = get_with(&client(), addr, "/orders/42?token=s3cr3t", "internal").await;
    let doc = answer.json();
    assert_eq!(doc["instance"], "/orders/42");
    let line = logs.by_id(doc["error_id"].as_str().unwrap());
    assert_eq!(line.field("route"), Some(ROUTE));
    assert_eq!(line.field("path"), Some("/orders/42"));
    assert!(!format!("{line:?}").contains("s3cr3t"));
    assert!(!answer.all_text().contains("s3cr3t"));
}

#[tokio::test]
async fn internal_details_are_shown_only_when_asked_for() {
    let (_logs, _guard) = capture_logs();
    let enrich = ErrorEnrichLayer::builder("checkout")
        .internal_details(true)
        .build()
        .unwrap();
    let addr = serve(enrich).await;
    let doc = get_with(&client(), addr, "/orders/1", "internal")
        .await
        .json();
    assert_eq!(
        doc["chain"],
        serde_json::json!([
            "loading the order",
            "connecting to postgres://app:password=hunter2@db failed"
        ])
    );
    // The safe message stays safe even then.
    assert_eq!(doc["detail"], "The service failed unexpectedly.");
}

#[tokio::test]
async fn a_panic_leaves_the_connection_and_the_server_serving() {
    let (logs, _guard) = capture_logs();
    let addr = serve(ErrorEnrichLayer::new("checkout")).await;
    // One HTTP/1.1 connection for every request below.
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);

    for fail in ["panic-call", "panic-poll", ""] {
        sender.ready().await.unwrap();
        let req = Request::get("/orders/9")
            .header("host", addr.to_string())
            .header(FAIL, fail)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let res = sender.send_request(req).await.unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        if fail.is_empty() {
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body, "order 9");
        } else {
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{fail}");
            let doc: Value = serde_json::from_slice(&body).unwrap();
            let line = logs.by_id(doc["error_id"].as_str().unwrap());
            assert!(
                line.field("chain")
                    .unwrap()
                    .starts_with("inner service panicked")
            );
        }
    }
    assert!(!conn.is_finished(), "the connection is still open");
}

#[tokio::test]
async fn a_grpc_request_gets_a_trailers_only_grpc_answer_from_the_same_layer() {
    let (logs, _guard) = capture_logs();
    let addr = serve(ErrorEnrichLayer::new("checkout")).await;
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = Request::post(format!("http://{addr}/orders/42"))
        .header("content-type", "application/grpc+proto")
        .header("te", "trailers")
        .header(FAIL, "rate")
        .body(Empty::new())
        .unwrap();
    let res = client.request(req).await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "gRPC errors travel in grpc-status"
    );
    let headers = res.headers().clone();
    assert_eq!(headers["content-type"], "application/grpc+proto", "echoed");
    assert_eq!(headers["grpc-status"], "8", "RESOURCE_EXHAUSTED");
    let message = headers["grpc-message"].to_str().unwrap();
    assert_eq!(
        percent_decode(message),
        "Too many requests: retry after 2 s."
    );
    assert!(headers.get("retry-after").is_none());
    assert_eq!(
        headers.contains_key("grpc-status-details-bin"),
        cfg!(feature = "tonic"),
        "rich details come with the tonic feature"
    );
    let body = res.into_body().collect().await.unwrap();
    assert!(body.trailers().is_none());
    assert!(body.to_bytes().is_empty(), "trailers-only: no body");
    let lines = logs.enrich_lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].field("kind"), Some("rate_limited"));
    assert_eq!(lines[0].field("method"), Some("POST"));
}

/// Decodes a percent-encoded `grpc-message`.
fn percent_decode(s: &str) -> String {
    let mut out = Vec::new();
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex: String = bytes.by_ref().take(2).map(char::from).collect();
            out.push(u8::from_str_radix(&hex, 16).unwrap());
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).unwrap()
}

/// As [`serve`], with the layer in axum mode (`for_axum`).
#[cfg(feature = "axum")]
async fn serve_axum(enrich: ErrorEnrichLayer) -> SocketAddr {
    let app = Router::new()
        .route(
            "/orders/{id}",
            get(|Path(id): Path<String>| async move { format!("order {id}") }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(enrich.for_axum())
                .layer(FailingLayer),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[cfg(feature = "axum")]
#[tokio::test]
async fn in_axum_mode_answers_are_the_same() {
    let (logs, _guard) = capture_logs();
    let addr = serve_axum(
        ErrorEnrichLayer::builder("checkout")
            .help_link(HELP)
            .build()
            .unwrap(),
    )
    .await;
    let client = client();

    let ok = get_with(&client, addr, "/orders/42", "").await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.body, "order 42");
    assert_eq!(ok.headers["content-type"], "text/plain; charset=utf-8");
    assert!(logs.enrich_lines().is_empty());

    let limited = get_with(&client, addr, "/orders/42", "rate").await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.headers["content-type"], "application/problem+json");
    assert_eq!(limited.headers["retry-after"], "2");
    let doc = limited.json();
    check_rfc9457(&doc, StatusCode::TOO_MANY_REQUESTS, "/orders/42");
    assert_eq!(doc["code"], "rate_limited");
    assert_eq!(logs.enrich_lines().len(), 1);
    let line = logs.by_id(doc["error_id"].as_str().unwrap());
    assert_eq!(line.field("route"), Some(ROUTE));
    assert_eq!(line.field("kind"), Some("rate_limited"));

    let panicked = get_with(&client, addr, "/orders/42", "panic-poll").await;
    assert_eq!(panicked.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(panicked.json()["code"], "internal");
}
