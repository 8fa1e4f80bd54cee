//! Health as an axum route and through tonic-health.
#![cfg(all(feature = "axum", feature = "tonic"))]

use std::time::Duration;

use atscale_core::BoxError;
use atscale_heartbeat::{Monitor, health};
use http_body_util::BodyExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health as _;
use tonic_health::server::{HealthService, health_reporter};
use tower::{ServiceBuilder, ServiceExt, service_fn};

/// Two failing requests through `monitor`, which then reports not serving.
async fn fail_twice(monitor: &Monitor) {
    let svc = ServiceBuilder::new()
        .layer(monitor.layer())
        .service(service_fn(|_req: http::Request<()>| async {
            Err::<String, _>(BoxError::from("down"))
        }));
    for _ in 0..2 {
        svc.clone()
            .oneshot(http::Request::new(()))
            .await
            .unwrap_err();
    }
}

fn monitor() -> Monitor {
    Monitor::builder()
        .unhealthy_after(2.try_into().unwrap())
        .build()
}

#[tokio::test(start_paused = true)]
async fn the_axum_route_answers_200_then_503() {
    let monitor = monitor();
    let app: axum::Router = axum::Router::new().route("/healthz", health::route(monitor.clone()));
    let get = || {
        http::Request::get("/healthz")
            .body(axum::body::Body::empty())
            .unwrap()
    };

    let ok = app.clone().oneshot(get()).await.unwrap();
    assert_eq!(ok.status(), 200);
    let body = ok.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "serving: 0 in flight");

    fail_twice(&monitor).await;
    let down = app.oneshot(get()).await.unwrap();
    assert_eq!(down.status(), 503);
    let body = down.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "not serving: 2 failures in a row");
}

#[tokio::test(start_paused = true)]
async fn tonic_health_follows_the_monitor_and_stops_with_it() {
    let monitor = monitor();
    let (reporter, _server) = health_reporter();
    let grpc = HealthService::from_health_reporter(reporter.clone());
    let status = || async {
        let req = tonic::Request::new(HealthCheckRequest {
            service: "demo.Echo".into(),
        });
        grpc.check(req).await.map(|r| r.into_inner().status)
    };
    assert!(
        status().await.is_err(),
        "not registered before the reporter runs"
    );

    let task = tokio::spawn(health::report(
        &monitor,
        reporter,
        "demo.Echo",
        Duration::from_secs(1),
    ));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(status().await.unwrap(), ServingStatus::Serving as i32);

    fail_twice(&monitor).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(status().await.unwrap(), ServingStatus::NotServing as i32);

    // a success brings it back
    let svc = ServiceBuilder::new()
        .layer(monitor.layer())
        .service(service_fn(|_req: http::Request<()>| async {
            Ok::<_, BoxError>(String::new())
        }));
    svc.oneshot(http::Request::new(())).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(status().await.unwrap(), ServingStatus::Serving as i32);

    drop(monitor);
    task.await.unwrap();
    assert_eq!(status().await.unwrap(), ServingStatus::NotServing as i32);
}
