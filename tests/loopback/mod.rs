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
