//! `grpc-timeout` honoured by a real tonic server and written by a real tonic
//! client, on loopback (tonic-health's generated service: no protoc needed).

mod loopback;

use std::net::SocketAddr;
use std::time::Duration;

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

    // A stalled call is cut by the server at the caller's 150 ms, not its own 30 s.
    // tonic's server enforces grpc-timeout itself too, from further out, so
    // its timer (CANCELLED "Timeout expired") and ours (DEADLINE_EXCEEDED)
    // race; either way the request's context must end up cancelled.
    let status = client
        .check(check(true, Some(Duration::from_millis(150))))
        .await
        .unwrap_err();
    let ours = status.message().contains("deadline exceeded after")
        && status.message().contains("grpc-timeout");
    let tonics = status.code() == tonic::Code::Cancelled && status.message() == "Timeout expired";
    assert!(ours || tonics, "{status:?}");
    let (_, cx) = seen.recv().await.unwrap();
    assert_eq!(cx.deadline().unwrap().budget(), Duration::from_millis(150));
    cx.cancelled().await;

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
