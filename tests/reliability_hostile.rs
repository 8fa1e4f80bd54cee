//! Reliability: hostile requests against the recommended server stack.
//!
//! - Huge, repeated, non-ASCII and invalid UTF-8 deadline headers are bad
//!   requests (400), answered fast, never a panic or "no deadline".
//! - A deadline header on a request that already carries a context: the
//!   earliest deadline wins, and a malformed header is still refused.
//! - Error responses never echo request data unescaped, never include
//!   internal error text or panic messages unless asked to, and their error
//!   ids cannot be guessed (unique, full-entropy over many responses).

use std::collections::HashSet;
use std::convert::Infallible;
use std::time::Duration;

use atscale::core::{BoxError, Carrier, Context, Origin};
use atscale::deadline::DeadlineLayer;
use atscale::error::{ErrorEnrichLayer, ErrorId};
use atscale::heartbeat::Monitor;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

const X_DEADLINE: HeaderName = HeaderName::from_static("x-deadline-ms");
const SECRET: &str = "password=hunter2";

/// ErrorEnrich → Deadline → Heartbeat → a handler that fails on `/fail`,
/// panics on `/panic`, and otherwise reports the deadline it runs under.
fn stack(
    enrich: ErrorEnrichLayer,
) -> impl Service<
    Request<()>,
    Response = Response<impl http_body::Body<Data = Bytes, Error: std::fmt::Debug>>,
    Error = Infallible,
> + Clone {
    ServiceBuilder::new()
        .layer(enrich)
        .layer(DeadlineLayer::server(Duration::from_secs(10)).with_header(X_DEADLINE))
        .layer(Monitor::new().layer())
        .service(service_fn(|req: Request<()>| async move {
            match req.uri().path() {
                p if p.starts_with("/fail") => {
                    Err(BoxError::from(format!("upstream said: {SECRET}")))
                }
                "/panic" => panic!("invariant broken, {SECRET}"),
                _ => {
                    let cx = Context::current().expect("set by the layer");
                    let d = cx.deadline().expect("a deadline");
                    let text = format!("{} {}", d.remaining().as_millis(), d.origin());
                    Ok(Response::new(Full::new(Bytes::from(text))))
                }
            }
        }))
}

struct Answer {
    status: StatusCode,
    body: String,
    problem: Option<serde_json::Value>,
}

async fn send<S, B>(svc: &S, req: Request<()>) -> Answer
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body<Data = Bytes, Error: std::fmt::Debug>,
{
    let res = svc.clone().oneshot(req).await.expect("infallible");
    let status = res.status();
    let is_problem = res
        .headers()
        .get("content-type")
        .is_some_and(|v| v == "application/problem+json");
    let bytes = res.into_body().collect().await.expect("a body").to_bytes();
    let body = String::from_utf8(bytes.to_vec()).expect("UTF-8");
    let problem = is_problem.then(|| serde_json::from_str(&body).expect("valid JSON"));
    Answer {
        status,
        body,
        problem,
    }
}

fn with_header(name: &str, value: HeaderValue) -> Request<()> {
    let mut req = Request::new(());
    req.headers_mut()
        .append(HeaderName::from_bytes(name.as_bytes()).unwrap(), value);
    req
}

#[tokio::test(start_paused = true)]
async fn huge_repeated_non_ascii_and_invalid_utf8_deadline_headers_are_bad_requests() {
    let svc = stack(ErrorEnrichLayer::new("hostile"));
    let huge_digits = "9".repeat(1 << 20);
    let huge_zeros = format!("{}1S", "0".repeat(64 * 1024));
    let cases: Vec<(&str, HeaderValue)> = vec![
        ("grpc-timeout", HeaderValue::from_str(&huge_digits).unwrap()),
        ("grpc-timeout", HeaderValue::from_str(&huge_zeros).unwrap()),
        (
            "x-deadline-ms",
            HeaderValue::from_str(&huge_digits).unwrap(),
        ),
        ("grpc-timeout", HeaderValue::from_bytes(b"1\xffS").unwrap()),
        (
            "grpc-timeout",
            HeaderValue::from_bytes("١٢S".as_bytes()).unwrap(),
        ),
        (
            "x-deadline-ms",
            HeaderValue::from_bytes(b"\xc3\x28").unwrap(),
        ),
        (
            "x-deadline-ms",
            HeaderValue::from_bytes("１００".as_bytes()).unwrap(),
        ),
        (
            "x-deadline-ms",
            HeaderValue::from_static("<script>alert(1)</script>"),
        ),
    ];
    for (name, value) in cases {
        let shown: String = value
            .as_bytes()
            .escape_ascii()
            .to_string()
            .chars()
            .take(40)
            .collect();
        let a = send(&svc, with_header(name, value)).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{name}: {shown}");
        let problem = a.problem.expect("problem+json");
        assert_eq!(problem["code"], "bad_request");
        // the value is never echoed back, escaped or not
        assert!(a.body.len() < 1024, "{name}: {} bytes", a.body.len());
        assert!(
            !a.body.contains("999999") && !a.body.contains("script"),
            "{}",
            a.body
        );
    }
    // The same header a thousand times.
    let mut req = Request::new(());
    for i in 0..1000 {
        req.headers_mut().append(
            "grpc-timeout",
            HeaderValue::from_str(&format!("{i}m")).unwrap(),
        );
    }
    let a = send(&svc, req).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.problem.unwrap()["detail"].as_str().is_some());
    // Even twice the same value is refused: no guessing which one counts.
    let mut req = Request::new(());
    req.headers_mut()
        .append(X_DEADLINE, HeaderValue::from_static("100"));
    req.headers_mut()
        .append(X_DEADLINE, HeaderValue::from_static("100"));
    assert_eq!(send(&svc, req).await.status, StatusCode::BAD_REQUEST);
    // Many unrelated huge headers do not confuse it.
    let mut req = with_header("x-deadline-ms", HeaderValue::from_static("250"));
    for i in 0..100 {
        let name = HeaderName::from_bytes(format!("x-junk-{i}").as_bytes()).unwrap();
        let value = HeaderValue::from_str(&"\u{e9}9".repeat(4096)).unwrap();
        req.headers_mut().insert(name, value);
    }
    let a = send(&svc, req).await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "250 header"));
}

#[tokio::test(start_paused = true)]
async fn a_deadline_header_on_a_request_that_already_carries_a_context() {
    let svc = stack(ErrorEnrichLayer::new("hostile"));
    // The context is earlier: it wins, and says where it came from.
    let mut req = with_header("x-deadline-ms", HeaderValue::from_static("5000"));
    req.set_context(Context::new().with_budget(Duration::from_millis(300), Origin::GrpcTimeout));
    let a = send(&svc, req).await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (StatusCode::OK, "300 grpc-timeout")
    );
    // The header is earlier: it wins.
    let mut req = with_header("x-deadline-ms", HeaderValue::from_static("100"));
    req.set_context(Context::new().with_budget(Duration::from_secs(5), Origin::Local));
    let a = send(&svc, req).await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "100 header"));
    // A malformed header is refused even though the context has a deadline.
    let mut req = with_header("x-deadline-ms", HeaderValue::from_static("soon"));
    req.set_context(Context::new().with_budget(Duration::from_secs(5), Origin::Local));
    assert_eq!(send(&svc, req).await.status, StatusCode::BAD_REQUEST);
    // A cancelled context: the request carries its cancellation inward.
    let parent = Context::new();
    let mut req = with_header("x-deadline-ms", HeaderValue::from_static("100"));
    req.set_context(parent.clone());
    parent.cancel();
    let seen = ServiceBuilder::new()
        .layer(DeadlineLayer::server(Duration::from_secs(10)).with_header(X_DEADLINE))
        .service(service_fn(|_: Request<()>| async {
            Ok::<_, BoxError>(Context::current().expect("set").is_cancelled())
        }))
        .oneshot(req)
        .await
        .unwrap();
    assert!(seen, "a child of a cancelled context is cancelled");
}

#[tokio::test]
async fn error_responses_never_echo_request_data_unescaped() {
    let svc = stack(ErrorEnrichLayer::new("hostile"));
    let nasty_paths = [
        "/fail",
        "/fail/%3Cscript%3Ealert(1)%3C/script%3E",
        "/fail/%22%7D,%22code%22:%22ok%22,%22x%22:%7B%22",
        "/fail/%00%0d%0aSet-Cookie:%20a=b",
        "/fail/%C3%A9t%C3%A9",
        "/fail/..%2F..%2Fetc%2Fpasswd",
        "/fail/'onmouseover='alert(1)",
        "/fail/a\\b",
    ];
    for path in nasty_paths {
        let uri = format!("{path}?q=%3Cimg%20src=x%3E&token={SECRET}");
        let req = Request::get(uri.as_str())
            .header("x-evil", "<img src=x onerror=alert(1)>")
            .header("user-agent", "\"},{\"injected\":true")
            .body(())
            .unwrap();
        let a = send(&svc, req).await;
        assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR, "{path}");
        let problem = a.problem.expect("problem+json");
        // A JSON document whose members are exactly ours: nothing injected.
        let keys: HashSet<&str> = problem
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let ours: HashSet<&str> = [
            "type",
            "title",
            "status",
            "detail",
            "instance",
            "error_id",
            "code",
            "timestamp",
            "service",
        ]
        .into();
        assert_eq!(keys, ours, "{path}: {}", a.body);
        assert_eq!(problem["code"], "internal");
        // The path comes back only as the `instance` string, exactly as sent.
        assert_eq!(problem["instance"], path, "{path}");
        // No query string, no header, no secret, no raw control character.
        for never in ["hunter2", "token", "img", "onerror", "injected", "\r", "\n"] {
            assert!(!a.body.contains(never), "{path}: {never:?} in {}", a.body);
        }
        assert!(
            !a.body.bytes().any(|b| b < 0x20),
            "{path}: a raw control byte"
        );
    }
}

#[tokio::test]
async fn internal_error_text_and_panic_messages_stay_inside_unless_asked_for() {
    let hidden = stack(ErrorEnrichLayer::new("hostile"));
    let exposed = stack(
        ErrorEnrichLayer::builder("hostile")
            .internal_details(true)
            .build()
            .unwrap(),
    );
    for path in ["/fail", "/panic"] {
        let a = send(&hidden, Request::get(path).body(()).unwrap()).await;
        assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            !a.body.contains("hunter2") && !a.body.contains("invariant"),
            "{}",
            a.body
        );
        assert_eq!(
            a.problem.unwrap()["detail"],
            "The service failed unexpectedly."
        );
        // ... and the opt-in shows what the default keeps back (so the
        // check above is a real one).
        let a = send(&exposed, Request::get(path).body(()).unwrap()).await;
        assert!(a.body.contains("hunter2"), "{}", a.body);
    }
    // gRPC callers neither.
    let req = Request::post("/fail")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let res = hidden.clone().oneshot(req).await.unwrap();
    let status = tonic::Status::from_header_map(res.headers()).expect("a status");
    assert_eq!(status.code(), tonic::Code::Internal);
    assert!(!status.message().contains("hunter2"));
    assert!(!String::from_utf8_lossy(status.details()).contains("hunter2"));
}

/// 20 000 error responses: every id unique, 32 lower-case hex digits, the
/// same as the one in the response's extensions, and the bits of the ids as
/// a whole indistinguishable from coin flips: each of the 128 positions set
/// in 50 % ± 3 % of ids (8σ), consecutive ids differing in 64 ± 1 bits on
/// average, and no fixed step from one id to the next.
#[tokio::test]
async fn error_ids_cannot_be_guessed() {
    const N: usize = 20_000;
    let svc = stack(ErrorEnrichLayer::new("hostile"));
    let mut ids = Vec::with_capacity(N);
    for _ in 0..N {
        let res = svc
            .clone()
            .oneshot(Request::get("/fail").body(()).unwrap())
            .await
            .unwrap();
        let in_ext = *res
            .extensions()
            .get::<ErrorId>()
            .expect("the id in extensions");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let text = doc["error_id"].as_str().unwrap();
        assert_eq!(text.len(), 32);
        assert!(
            text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "{text}"
        );
        let id: ErrorId = text.parse().unwrap();
        assert_eq!(id, in_ext);
        ids.push(id.as_u128());
    }
    let unique: HashSet<u128> = ids.iter().copied().collect();
    assert_eq!(unique.len(), N, "repeated ids");
    for bit in 0..128 {
        let ones = ids.iter().filter(|id| (*id >> bit) & 1 == 1).count();
        let share = ones as f64 / N as f64;
        assert!(
            (0.47..=0.53).contains(&share),
            "bit {bit} set in {share:.3} of ids"
        );
    }
    let flips: u64 = ids
        .windows(2)
        .map(|w| u64::from((w[0] ^ w[1]).count_ones()))
        .sum();
    let mean = flips as f64 / (N - 1) as f64;
    assert!(
        (63.0..=65.0).contains(&mean),
        "consecutive ids differ in {mean:.2} bits"
    );
    assert!(ids.windows(2).all(|w| w[1] != w[0].wrapping_add(1)));
    // No fixed step between ids (a counter times a constant would pass the
    // bit counts): the steps are all different.
    let steps: HashSet<u128> = ids.windows(2).map(|w| w[1].wrapping_sub(w[0])).collect();
    assert_eq!(steps.len(), N - 1, "ids repeat a step");
    // Nor do ids made back to back by different layers share a prefix.
    let prefixes: HashSet<u128> = ids.iter().map(|id| id >> 96).collect();
    assert!(
        prefixes.len() > N * 99 / 100,
        "{} distinct 32-bit prefixes",
        prefixes.len()
    );
    // An id quoted back with a changed digit names no error we made.
    let quoted = format!("{:032x}", ids[0] ^ 1);
    assert!(!unique.contains(&quoted.parse::<ErrorId>().unwrap().as_u128()));
}

/// A trusted forwarded header a megabyte long, or repeated a thousand
/// times: the rate limit's key is still the rightmost address, found in
/// time linear in the header, and a client cannot pick another by padding.
#[test]
fn huge_and_repeated_forwarded_headers_still_give_the_rightmost_address() {
    use atscale::ratelimit::{PeerIp, RequestKey};
    use std::net::{IpAddr, SocketAddr};
    let key = PeerIp::trusting_header(HeaderName::from_static("x-forwarded-for"));
    let peer: IpAddr = "10.0.0.1".parse().unwrap();
    let mut req = Request::new(());
    req.extensions_mut().insert(SocketAddr::new(peer, 1));
    let padding = "6.6.6.6, ".repeat(100_000); // ~0.9 MB written by the client
    let value = format!("{padding}203.0.113.7");
    req.headers_mut()
        .insert("x-forwarded-for", HeaderValue::from_str(&value).unwrap());
    let start = std::time::Instant::now();
    assert_eq!(key.key(&req), Some("203.0.113.7".parse().unwrap()));
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );

    let mut req = Request::new(());
    req.extensions_mut().insert(SocketAddr::new(peer, 1));
    for i in 0..1000 {
        let forged = HeaderValue::from_str(&format!("6.6.{}.{}", i / 256, i % 256)).unwrap();
        req.headers_mut().append("x-forwarded-for", forged);
    }
    req.headers_mut()
        .append("x-forwarded-for", HeaderValue::from_static("198.51.100.9"));
    assert_eq!(key.key(&req), Some("198.51.100.9".parse().unwrap()));
    // ... and a last line the proxy could not have written falls back to
    // the peer, never to a line the client wrote before it.
    req.headers_mut().append(
        "x-forwarded-for",
        HeaderValue::from_static("not-an-address"),
    );
    assert_eq!(key.key(&req), Some(peer));
}
