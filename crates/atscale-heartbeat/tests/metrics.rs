//! The in-flight gauge (the `metrics` feature): set from the monitor's own
//! counters at idle, on reads and once a second, never per request; the
//! sum over monitors.
//!
//! One process-wide recorder, so one test.
#![cfg(feature = "metrics")]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use atscale_heartbeat::Monitor;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::Notify;
use tower::{Layer, Service, ServiceExt, service_fn};

type Req = http::Request<()>;

fn gated(
    gate: Arc<Notify>,
) -> impl Service<Req, Response = String, Error = Infallible, Future: Send> + Clone {
    service_fn(move |_req: Req| {
        let gate = gate.clone();
        async move {
            gate.notified().await;
            Ok::<_, Infallible>(String::from("done"))
        }
    })
}

async fn bounded<F: std::future::Future>(signal: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), signal)
        .await
        .expect("a signal the test waits for never came within 60 s")
}

/// The gauge's value in a scrape (0 before it was ever set).
fn in_flight(prometheus: &PrometheusHandle) -> f64 {
    prometheus
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("atscale_heartbeat_in_flight "))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test(start_paused = true)]
async fn the_in_flight_gauge_is_the_sum_of_the_monitors_counts_exact_when_idle_or_read() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    metrics::set_global_recorder(recorder).expect("the only recorder of this binary");
    atscale_core::metrics::enable();

    let (a, b) = (Monitor::new(), Monitor::new());
    let gate = Arc::new(Notify::new());
    let svc_a = a.layer().layer(gated(gate.clone()));
    let svc_b = b.layer().layer(gated(gate.clone()));

    // One request at a time: each leaves the monitor idle, the gauge stays 0.
    for _ in 0..3 {
        let call = tokio::spawn(svc_a.clone().oneshot(http::Request::new(())));
        bounded(a.wait_started(a.counts().started() + 1)).await;
        gate.notify_one();
        bounded(call).await.unwrap().unwrap();
    }
    assert_eq!(in_flight(&prometheus), 0.0);

    // Three in flight across two monitors, seen once the monitors are read.
    let calls: Vec<_> = [&svc_a, &svc_a, &svc_b]
        .into_iter()
        .map(|svc| tokio::spawn(svc.clone().oneshot(http::Request::new(()))))
        .collect();
    bounded(a.wait_in_flight(2)).await;
    bounded(b.wait_in_flight(1)).await;
    assert_eq!(in_flight(&prometheus), 3.0, "the sum over monitors");

    // Not read: the refresher task shows a change within a second.
    let more = tokio::spawn(svc_b.clone().oneshot(http::Request::new(())));
    tokio::task::yield_now().await;
    assert_eq!(in_flight(&prometheus), 3.0, "not per request");
    tokio::time::advance(Duration::from_secs(1)).await;
    tokio::task::yield_now().await;
    assert_eq!(in_flight(&prometheus), 4.0, "the refresher's tick");

    // All done: exact at idle, with no read and no tick.
    for _ in 0..4 {
        gate.notify_one();
    }
    for call in calls.into_iter().chain([more]) {
        assert_eq!(bounded(call).await.unwrap().unwrap(), "done");
    }
    assert_eq!(in_flight(&prometheus), 0.0);
}
