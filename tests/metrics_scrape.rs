//! Known traffic through a real axum server with the recommended server
//! stack, then `GET /metrics` over HTTP: every counter and histogram count
//! moved by exactly the traffic's amount.
//!
//! One Prometheus recorder for the whole test binary (the `metrics` facade
//! has one global recorder per process), and one test, so no other traffic
//! shares it; amounts are checked as the difference between two scrapes.

mod loopback;
mod prom;

use std::net::SocketAddr;
use std::time::Duration;

use atscale::heartbeat::Monitor;
use atscale::ratelimit::{Limit, Limiter, RateLimitLayer};
use axum::Router;
use axum::extract::Path;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::Empty;
use loopback::{bounded, http_client, serve_router};
use metrics_exporter_prometheus::PrometheusBuilder;
use prom::{Scrape, scrape};

/// 5 OK, 200 and 201 from one route, 2 past their deadline, 1 stalled, then
/// 3 rate limited (burst 10,
/// then nothing for an hour).
const BURST: u32 = 10;

async fn server(monitor: Monitor) -> SocketAddr {
    let prometheus = PrometheusBuilder::new()
        .with_recommended_naming(true)
        .install_recorder()
        .expect("the only recorder of this binary");
    atscale::metrics::enable();

    let limiter = Limiter::new(Limit::per_hour(1).unwrap().burst(BURST).unwrap());
    let stack = atscale::stack::server("scrape", Duration::from_secs(10))
        .with_rate_limit(RateLimitLayer::reject(limiter))
        .with_monitor(monitor);
    let app = Router::new()
        .route("/work", get(|| async { "done" }))
        // one route template, two statuses
        .route(
            "/echo/{code}",
            get(|Path(code): Path<u16>| async move { http::StatusCode::from_u16(code).unwrap() }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "too late"
            }),
        )
        // No progress at all: cut by the heartbeat's watchdog.
        .route("/hang", get(std::future::pending::<&'static str>))
        .layer(stack)
        // After `.layer`: the scrape itself is not counted.
        .merge(Router::new().route("/metrics", get(move || async move { prometheus.render() })));
    serve_router(app).await
}

async fn get_status(addr: SocketAddr, path: &str, deadline: &str) -> u16 {
    let req = http::Request::get(format!("http://{addr}{path}"))
        .header("x-deadline-ms", deadline)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = bounded(path, http_client().request(req)).await.unwrap();
    res.status().as_u16()
}

/// `after - before` for one series (summed over the label sets that include `labels`).
fn moved(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.sum(name, labels) - before.sum(name, labels)
}

#[tokio::test]
async fn known_traffic_moves_each_metric_by_its_exact_amount() {
    let monitor = Monitor::builder().stall(Duration::from_millis(300)).build();
    let addr = server(monitor.clone()).await;
    let before = scrape(addr).await;
    assert_eq!(before.sum("atscale_heartbeat_in_flight", &[]), 0.0);

    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(get_status(addr, "/work", "5000").await);
    }
    statuses.push(get_status(addr, "/echo/200", "5000").await);
    statuses.push(get_status(addr, "/echo/201", "5000").await);
    for _ in 0..2 {
        statuses.push(get_status(addr, "/slow", "50").await);
    }
    // one request in flight, seen by a scrape, then cut as stalled
    let hang = tokio::spawn(get_status(addr, "/hang", "5000"));
    bounded("the hanging request in flight", monitor.wait_in_flight(1)).await;
    let during = scrape(addr).await;
    assert_eq!(during.sum("atscale_heartbeat_in_flight", &[]), 1.0);
    statuses.push(hang.await.unwrap());
    for _ in 0..3 {
        statuses.push(get_status(addr, "/work", "5000").await);
    }
    statuses.push(get_status(addr, "/work", "soon").await);
    assert_eq!(
        statuses,
        [
            200, 200, 200, 200, 200, 200, 201, 504, 504, 503, 429, 429, 429, 400
        ],
        "the traffic itself"
    );

    let after = scrape(addr).await;
    let m = |name: &str, labels: &[(&str, &str)]| moved(&before, &after, name, labels);

    // deadline: 13 requests arrived with a header deadline, 2 passed while
    // running, 1 was malformed
    assert_eq!(
        m(
            "atscale_deadline_remaining_seconds_count",
            &[("origin", "header")]
        ),
        13.0
    );
    assert_eq!(
        m(
            "atscale_deadline_exceeded_total",
            &[("origin", "header"), ("stage", "running")]
        ),
        2.0
    );
    assert_eq!(m("atscale_deadline_exceeded_total", &[]), 2.0);
    assert_eq!(m("atscale_deadline_malformed_total", &[]), 1.0);

    // rate limit: the malformed request never reached it
    assert_eq!(m("atscale_ratelimit_admitted_total", &[]), 10.0);
    assert_eq!(
        m(
            "atscale_ratelimit_refused_total",
            &[("reason", "rate_limited")]
        ),
        3.0
    );
    assert_eq!(m("atscale_ratelimit_refused_total", &[]), 3.0);
    assert_eq!(m("atscale_ratelimit_waited_total", &[]), 0.0);

    // errors, by kind and status
    let errors = "atscale_errors_total";
    let server = [("service", "scrape"), ("side", "server")];
    let by = |kind: &'static str, status: &'static str| {
        let mut labels = server.to_vec();
        labels.extend([("kind", kind), ("http_response_status_code", status)]);
        m(errors, &labels)
    };
    assert_eq!(by("deadline_exceeded", "504"), 2.0);
    assert_eq!(by("rate_limited", "429"), 3.0);
    assert_eq!(by("bad_request", "400"), 1.0);
    assert_eq!(by("stalled", "503"), 1.0);
    assert_eq!(m(errors, &[]), 7.0);

    // heartbeat: the stall, and nothing left in flight
    assert_eq!(m("atscale_heartbeat_stalls_total", &[]), 1.0);
    assert_eq!(after.sum("atscale_heartbeat_in_flight", &[]), 0.0);
    assert_eq!(m("atscale_panics_total", &[]), 0.0);

    // every answer's duration, by route template, method and status
    let duration = "http_server_request_duration_seconds_count";
    let answer = |route: &'static str, status: &'static str| {
        m(
            duration,
            &[
                ("http_request_method", "GET"),
                ("http_route", route),
                ("http_response_status_code", status),
            ],
        )
    };
    assert_eq!(answer("/work", "200"), 5.0);
    assert_eq!(answer("/echo/{code}", "200"), 1.0);
    assert_eq!(answer("/echo/{code}", "201"), 1.0);
    assert_eq!(answer("/slow", "504"), 2.0);
    assert_eq!(answer("/work", "429"), 3.0);
    assert_eq!(answer("/work", "400"), 1.0);
    assert_eq!(answer("/hang", "503"), 1.0);
    assert_eq!(m(duration, &[]), 14.0);
    assert_eq!(m(duration, &[("error_type", "rate_limited")]), 3.0);
    assert!(
        after.sum(
            "http_server_request_duration_seconds_sum",
            &[("http_route", "/slow")]
        ) >= 0.1,
        "two requests of at least 50 ms each"
    );
    // raw paths never become labels
    for series in after.samples.values().flatten() {
        for value in series.0.values() {
            assert!(
                !value.contains("soon"),
                "a header value became a label: {series:?}"
            );
        }
    }
}
