//! `grpc-timeout` honoured by a real tonic server and written by a real tonic
//! client, on loopback (tonic-health's generated service: no protoc needed).
//!
//! What the server answers on expiry is read with a raw HTTP/2 client
//! ([`raw_check`]) that writes `grpc-timeout` itself and runs no timer: a
//! tonic `Channel` wraps every call in its own `grpc-timeout` timer and
//! reports its expiry as `CANCELLED` "Timeout expired" before any server
//! answer can arrive, so through it the server's answer cannot be seen.

mod loopback;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

use atscale::core::{BoxError, Context, Kind, Origin};
use atscale::deadline::DeadlineLayer;
use loopback::channel;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Endpoint, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::ServiceBuilder;
use tower::layer::layer_fn;
use tower::util::{MapResultLayer, ServiceExt};

/// What the server saw: the `grpc-timeout` header and the request's context.
type Seen = mpsc::UnboundedSender<(Option<String>, Context)>;

/// Starts a health server behind `DeadlineLayer::server`; requests whose
/// `x-stall` header is set never reach the health service.
async fn health_server(seen: Seen) -> SocketAddr {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let record_and_stall = layer_fn(move |inner: tonic::service::Routes| {
        let seen = seen.clone();
        tower::service_fn(move |req: http::Request<tonic::body::Body>| {
            let header = req
                .headers()
                .get("grpc-timeout")
                .map(|v| v.to_str().unwrap().to_owned());
            let stall = req.headers().contains_key("x-stall");
            seen.send((
                header,
                Context::current().expect("set by the deadline layer"),
            ))
            .unwrap();
            let inner = inner.clone();
            async move {
                if stall {
                    std::future::pending::<()>().await;
                }
                inner.oneshot(req).await
            }
        })
    });
    tokio::spawn(
        Server::builder()
            .layer(MapResultLayer::new(errors_to_status))
            .layer(DeadlineLayer::server(Duration::from_secs(30)))
            .layer(record_and_stall)
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

/// Answers a layer error with a gRPC status, as ErrorEnrich does in
/// production (tonic's server resets the stream on a service error).
fn errors_to_status(
    result: Result<http::Response<tonic::body::Body>, BoxError>,
) -> Result<http::Response<tonic::body::Body>, BoxError> {
    result.or_else(|err| {
        let code = tonic::Code::from(Kind::of(&*err).grpc_code() as i32);
        Ok(tonic::Status::new(code, err.to_string()).into_http())
    })
}

/// The longest any awaited signal may take before the test fails.
const BOUND: Duration = Duration::from_secs(30);

/// Awaits `fut`, failing the test with `what` if it takes longer than [`BOUND`].
async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(BOUND, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: not within {BOUND:?}"),
    }
}

/// A raw HTTP/2 connection to `addr`: no tonic, no timer of its own.
async fn raw_connection(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let io = TokioIo::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// `grpc.health.v1.Health/Check` for the empty service name, written by
/// hand: `grpc-timeout` as given (`"150m"`), and stalled by the server when
/// `stall`. Answers `grpc-status` and the decoded `grpc-message`, read from
/// the response head (a trailers-only answer) or else from the trailers.
async fn raw_check(
    send: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    timeout: &str,
    stall: bool,
) -> (String, String) {
    // One gRPC frame: not compressed, length 0 (the empty HealthCheckRequest).
    let frame = Bytes::from_static(&[0, 0, 0, 0, 0]);
    let mut req = http::Request::post("http://localhost/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout);
    if stall {
        req = req.header("x-stall", "1");
    }
    send.ready().await.unwrap();
    let res = send
        .send_request(req.body(Full::new(frame)).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (head, body) = res.into_parts();
    let trailers = if head.headers.contains_key("grpc-status") {
        head.headers
    } else {
        body.collect()
            .await
            .unwrap()
            .trailers()
            .cloned()
            .expect("a gRPC answer ends with trailers")
    };
    let text = |name: &str| {
        trailers
            .get(name)
            .map(|v| percent_decode(v.to_str().unwrap()))
            .unwrap_or_default()
    };
    (text("grpc-status"), text("grpc-message"))
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2, "Responses").
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn check(stall: bool, timeout: Option<Duration>) -> tonic::Request<HealthCheckRequest> {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    if stall {
        req.metadata_mut().insert("x-stall", "1".parse().unwrap());
    }
    if let Some(timeout) = timeout {
        req.set_timeout(timeout);
    }
    req
}

#[tokio::test]
async fn the_server_honours_grpc_timeout() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let mut client = HealthClient::new(channel(health_server(seen_tx).await).await);

    // Within its deadline the call succeeds, and the server's context carries it.
    client
        .check(check(false, Some(Duration::from_secs(2))))
        .await
        .unwrap();
    let (header, cx) = seen.recv().await.unwrap();
    assert!(header.is_some());
    let deadline = cx.deadline().unwrap();
    assert_eq!(deadline.origin(), Origin::GrpcTimeout);
    assert!(deadline.budget() <= Duration::from_secs(2));

    // Through a tonic client, a stalled call ends at the caller's 150 ms
    // (not the server's own 30 s) with tonic's own CANCELLED "Timeout
    // expired": its Channel runs a grpc-timeout timer of its own and gives
    // up before the server's answer can arrive. What the server answered
    // is read below without tonic.
    let status = client
        .check(check(true, Some(Duration::from_millis(150))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Cancelled, "{status:?}");
    assert_eq!(status.message(), "Timeout expired", "{status:?}");
    let (_, cx) = bounded("the stalled call reaching the server", seen.recv())
        .await
        .unwrap();
    assert_eq!(cx.deadline().unwrap().budget(), Duration::from_millis(150));
    bounded("the stalled call's context cancelled", cx.cancelled()).await;

    // A malformed grpc-timeout is rejected, not ignored (tonic alone would ignore it).
    let mut req = check(false, None);
    req.metadata_mut()
        .insert("grpc-timeout", "forever".parse().unwrap());
    let status = client.check(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("malformed grpc-timeout header"),
        "{status:?}"
    );
}

/// The server's own answer to an expired call, many times over, with
/// budgets spread over a few milliseconds so the timers' deadlines fall at
/// every phase of tokio's 1 ms tick: `DEADLINE_EXCEEDED` from our layer,
/// with its details, never tonic's server timer (`CANCELLED`), and every
/// expired request's context cancelled.
#[tokio::test]
async fn an_expired_call_is_answered_deadline_exceeded_by_the_layer() {
    const CALLS: usize = 200;
    const AT_ONCE: usize = 20;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let addr = health_server(seen_tx).await;
    let send = raw_connection(addr).await;

    // A call within its deadline answers OK through the same raw client.
    let (status, message) = bounded("an OK call", raw_check(&mut send.clone(), "2S", false)).await;
    assert_eq!((status.as_str(), message.as_str()), ("0", ""));
    let _ = bounded("the OK call reaching the server", seen.recv()).await;

    let mut answered = 0;
    while answered < CALLS {
        let calls: Vec<_> = (0..AT_ONCE)
            .map(|i| {
                let mut send = send.clone();
                let budget_ms = 20 + (answered + i) % 7;
                tokio::spawn(async move {
                    let timeout = format!("{budget_ms}m");
                    (budget_ms, raw_check(&mut send, &timeout, true).await)
                })
            })
            .collect();
        for call in calls {
            let (budget_ms, (status, message)) =
                bounded("a stalled call's answer", call).await.unwrap();
            assert_eq!(
                status, "4",
                "DEADLINE_EXCEEDED, not tonic's own timer: {message:?}"
            );
            assert!(message.starts_with("deadline exceeded after "), "{message}");
            assert!(
                message.ends_with(&format!("(budget {budget_ms}ms, grpc-timeout)")),
                "{message}"
            );
            answered += 1;
        }
    }
    for _ in 0..CALLS {
        let (header, cx) = bounded("a stalled call reaching the server", seen.recv())
            .await
            .unwrap();
        assert!(header.is_some_and(|h| h.ends_with('m')));
        assert_eq!(cx.deadline().unwrap().origin(), Origin::GrpcTimeout);
        bounded("an expired call's context cancelled", cx.cancelled()).await;
    }
}

#[tokio::test]
async fn the_client_writes_the_deadline_of_the_request_being_served() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let addr = health_server(seen_tx).await;
    let stack = ServiceBuilder::new()
        .layer(DeadlineLayer::client(Duration::from_secs(10)))
        .service(channel(addr).await);
    let mut client = HealthClient::new(stack);

    // The client's own budget.
    client.check(check(false, None)).await.unwrap();
    let (header, _) = seen.recv().await.unwrap();
    let header = header.expect("the client wrote grpc-timeout");
    assert!(header.ends_with('u') || header.ends_with('m'), "{header}");

    // Inside a request being served with 400 ms left, the outgoing call inherits them.
    let served = Context::new().with_budget(Duration::from_millis(400), Origin::GrpcTimeout);
    served
        .scope(client.check(check(false, None)))
        .await
        .unwrap();
    let (_, cx) = seen.recv().await.unwrap();
    let deadline = cx.deadline().unwrap();
    assert_eq!(deadline.origin(), Origin::GrpcTimeout);
    assert!(
        deadline.budget() <= Duration::from_millis(400),
        "{deadline:?}"
    );
}

#[tokio::test]
async fn the_client_enforces_the_deadline_when_the_server_never_answers() {
    // A listener that accepts connections and never speaks HTTP/2.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (held_tx, mut held) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            held_tx.send(socket).unwrap();
        }
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let mut client = HealthClient::new(
        ServiceBuilder::new()
            .layer(DeadlineLayer::client(Duration::from_secs(10)))
            .service(channel),
    );

    let served = Context::new().with_budget(Duration::from_millis(100), Origin::Header);
    let status = served
        .clone()
        .scope(client.check(check(false, None)))
        .await
        .unwrap_err();
    assert!(
        status.message().contains("deadline exceeded after"),
        "{status:?}"
    );
    assert!(status.message().contains("budget"), "{status:?}");
    assert!(
        held.recv().await.is_some(),
        "the call did reach the silent server"
    );
    assert!(
        !served.is_cancelled(),
        "the outgoing call's expiry does not cancel the request being served"
    );
}
