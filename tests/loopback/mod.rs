//! tonic servers and channels on loopback, shared by the top-level tests.

#![allow(dead_code)] // each test binary uses part of it

use std::net::SocketAddr;

use atscale::core::BoxError;
use bytes::Bytes;
use tokio::net::TcpListener;
use tonic::body::Body as GrpcBody;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic_health::ServingStatus;
use tower::Layer;

/// Serves tonic-health (reporting SERVING) behind `layer` on 127.0.0.1, on a
/// port of its own; the server runs until the test's runtime ends.
pub(crate) async fn serve_health<L, ResB>(layer: L) -> SocketAddr
where
    L: Layer<Routes> + Clone + Send + 'static,
    L::Service: tower::Service<http::Request<GrpcBody>, Response = http::Response<ResB>>
        + Clone
        + Send
        + Sync
        + 'static,
    <L::Service as tower::Service<http::Request<GrpcBody>>>::Future: Send + 'static,
    <L::Service as tower::Service<http::Request<GrpcBody>>>::Error: Into<BoxError> + Send,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::builder()
        .layer(layer)
        .add_service(health)
        .serve_with_incoming(TcpIncoming::from(listener));
    tokio::spawn(async move {
        // Keep the reporter alive as long as the server.
        let _reporter = reporter;
        server.await.unwrap()
    });
    addr
}

/// A connected channel to the server at `addr`.
pub(crate) async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Serves `app` (an axum router) on 127.0.0.1, on a port of its own; the
/// server runs until the test's runtime ends.
pub(crate) async fn serve_router(app: axum::Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// An address on 127.0.0.1 where nothing listens (a port that was just
/// bound and released): connecting to it is refused.
pub(crate) async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A hyper-util client for plain HTTP/1 over loopback, sending bodies of type `B`.
pub(crate) fn http_client<B>()
-> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// Awaits `fut`, failing the test (naming `what`) after 10 s.
pub(crate) async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within 10 s"))
}
