//! ErrorEnrich in server mode over gRPC, end to end: a tonic server (the
//! ready-made health service) on loopback behind the layer, a tonic client,
//! and the status, code, message and rich details every kind becomes.
#![cfg(feature = "tonic")]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use atscale_error::ErrorEnrichLayer;
use support::{FAIL, FailingLayer, SECRET, capture_logs, is_rfc3339};
use tonic::Code;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;
use tower::ServiceBuilder;

async fn serve(enrich: ErrorEnrichLayer) -> SocketAddr {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::builder()
        .layer(ServiceBuilder::new().layer(enrich).layer(FailingLayer))
        .add_service(health)
        .serve_with_incoming(TcpIncoming::from(listener));
    tokio::spawn(async move { server.await.unwrap() });
    addr
}

async fn connect(addr: SocketAddr) -> HealthClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

async fn check(client: &mut HealthClient<Channel>, fail: &str) -> Result<i32, tonic::Status> {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    req.metadata_mut().insert(FAIL, fail.parse().unwrap());
    client.check(req).await.map(|res| res.into_inner().status)
}

#[tokio::test]
async fn every_kind_becomes_a_status_with_rich_details() {
    let (logs, _guard) = capture_logs();
    let enrich = ErrorEnrichLayer::builder("health")
        .help_link("https://docs.example.com/errors/{code}")
        .build()
        .unwrap();
    let addr = serve(enrich).await;
    let mut client = connect(addr).await;

    let cases = [
        ("deadline", Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
        (
            "deadline-local",
            Code::DeadlineExceeded,
            "DEADLINE_EXCEEDED",
        ),
        ("malformed", Code::InvalidArgument, "BAD_REQUEST"),
        ("rate", Code::ResourceExhausted, "RATE_LIMITED"),
        ("overloaded", Code::Unavailable, "OVERLOADED"),
        ("stalled", Code::Unavailable, "STALLED"),
        ("hedge", Code::Unavailable, "HEDGE_EXHAUSTED"),
        ("cancelled", Code::Cancelled, "CANCELLED"),
        ("internal", Code::Internal, "INTERNAL"),
        ("panic-call", Code::Internal, "INTERNAL"),
        ("panic-poll", Code::Internal, "INTERNAL"),
    ];
    for (fail, code, reason) in cases {
        let status = check(&mut client, fail).await.unwrap_err();
        assert_eq!(status.code(), code, "{fail}");
        assert!(!status.message().is_empty());
        assert!(!status.message().contains(SECRET), "{fail}");

        let details = status.get_error_details();
        let info = details.error_info().expect("ErrorInfo");
        assert_eq!(info.reason, reason);
        assert_eq!(info.domain, "health");
        let id = info.metadata["error_id"].clone();
        assert_eq!(id.len(), 32);
        assert!(is_rfc3339(&info.metadata["timestamp"]));
        assert_eq!(info.metadata["route"], "/grpc.health.v1.Health/Check");

        let request = details.request_info().expect("RequestInfo");
        assert_eq!(request.request_id, id);

        let retry = details.retry_info();
        if fail == "rate" {
            assert_eq!(
                retry.expect("RetryInfo").retry_delay,
                Some(Duration::from_millis(1500))
            );
        } else {
            assert!(retry.is_none(), "{fail}");
        }
        if fail == "hedge" {
            assert_eq!(info.metadata["attempts"], "3");
        }
        if fail.starts_with("deadline") {
            let origin = if fail == "deadline" {
                "header"
            } else {
                "local"
            };
            assert_eq!(info.metadata["deadline_origin"], origin);
        }

        let help = details.help().expect("Help");
        assert_eq!(
            help.links[0].url,
            format!(
                "https://docs.example.com/errors/{}",
                reason.to_ascii_lowercase()
            )
        );
        let localized = details.localized_message().expect("LocalizedMessage");
        assert_eq!(localized.locale, "en-US");
        assert_eq!(localized.message, status.message());
        assert!(details.debug_info().is_none(), "no internal details");
        let wire = format!("{status:?}");
        assert!(!wire.contains(SECRET), "{fail}: {wire}");

        // The id in the client's hands finds the one log line with the whole chain.
        let line = logs.by_id(&id);
        assert_eq!(line.field("route"), Some("/grpc.health.v1.Health/Check"));
        assert_eq!(line.field("method"), Some("POST"));
        assert_eq!(
            line.field("kind"),
            Some(reason.to_ascii_lowercase().as_str())
        );
        if matches!(fail, "internal" | "panic-call" | "panic-poll" | "hedge") {
            assert!(line.field("chain").unwrap().contains(SECRET), "{fail}");
        }
    }

    // The same channel (one HTTP/2 connection) still serves after two panics.
    assert_eq!(check(&mut client, "").await.unwrap(), 1 /* SERVING */);
    assert_eq!(logs.enrich_lines().len(), cases.len());
}

#[tokio::test]
async fn internal_details_go_in_debug_info_only_when_asked_for() {
    let (_logs, _guard) = capture_logs();
    let enrich = ErrorEnrichLayer::builder("health")
        .internal_details(true)
        .build()
        .unwrap();
    let addr = serve(enrich).await;
    let mut client = connect(addr).await;
    let status = check(&mut client, "internal").await.unwrap_err();
    let details = status.get_error_details();
    let debug = details.debug_info().expect("DebugInfo");
    assert_eq!(
        debug.stack_entries,
        [
            "loading the order",
            "connecting to postgres://app:password=hunter2@db failed"
        ]
    );
    assert!(details.help().is_none(), "no help link configured");
    assert_eq!(status.message(), "The service failed unexpectedly.");
}

/// A client-mode error handed back to a gRPC caller keeps its kind and id,
/// and none of the transport's text.
#[tokio::test]
async fn a_client_side_error_becomes_a_status_with_the_same_id() {
    use atscale_core::BoxError;
    use tower::{ServiceExt, service_fn};

    let (logs, _guard) = capture_logs();
    let transport = service_fn(|_req: http::Request<()>| async {
        Err::<http::Response<()>, BoxError>(format!("reset by peer, {SECRET}").into())
    });
    let billing = ServiceBuilder::new()
        .layer(ErrorEnrichLayer::client("checkout"))
        .service(transport);
    let req = http::Request::post("http://billing:8080/charge")
        .body(())
        .unwrap();
    let err = billing.oneshot(req).await.unwrap_err();
    let id = err.id().to_string();

    let status: tonic::Status = err.into();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "A service this one depends on failed.");
    let details = status.get_error_details();
    let info = details.error_info().unwrap();
    assert_eq!(info.reason, "UPSTREAM");
    assert_eq!(info.domain, "checkout");
    assert_eq!(info.metadata["layer"], "upstream");
    assert_eq!(details.request_info().unwrap().request_id, id);
    assert!(!format!("{status:?}").contains(SECRET));
    assert!(logs.by_id(&id).field("chain").unwrap().contains(SECRET));
}
