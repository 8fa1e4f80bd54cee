//! An axum server with the recommended server stack and a Prometheus
//! `/metrics` endpoint (`metrics-exporter-prometheus`).
//!
//! It sends itself some traffic (answered, rate limited, past its deadline,
//! with a malformed deadline), prints what `/metrics` says about it, keeps
//! serving for `--seconds N` (default 0) so you can `curl` it, and exits.
//!
//! ```text
//! cargo run --example metrics_server -- --seconds 30
//! curl -s localhost:<port>/metrics | grep atscale_
//! ```

use std::time::Duration;

use atscale::core::BoxError;
use atscale::ratelimit::{Limit, Limiter, RateLimitLayer};
use axum::Router;
use axum::routing::get;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let seconds: u64 = match std::env::args().skip(1).collect::<Vec<_>>().as_slice() {
        [] => 0,
        [flag, n] if flag == "--seconds" => n.parse()?,
        _ => return Err("usage: metrics_server [--seconds N]".into()),
    };

    // 1. The recorder, once, before any traffic: Prometheus naming (`_total`,
    //    unit suffixes) and buckets for the histograms a dashboard reads with
    //    `histogram_quantile`; then the metrics' units and help text.
    let prometheus = PrometheusBuilder::new()
        .with_recommended_naming(true)
        .set_buckets_for_metric(
            Matcher::Full("http.server.request.duration".into()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )?
        .install_recorder()?;
    atscale::metrics::enable();

    // 2. The service: the recommended server stack, with a small rate limit
    //    so that some of our own traffic is refused.
    let limiter = Limiter::new(Limit::per_second(20)?.burst(12)?);
    let stack = atscale::stack::server("metrics-example", Duration::from_secs(2))
        .with_rate_limit(RateLimitLayer::reject(limiter));
    let app = Router::new()
        .route("/orders/{id}", get(|| async { "an order" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "too late"
            }),
        )
        .layer(stack)
        // Outside the stack: scrapes are not counted as traffic.
        .merge(Router::new().route("/metrics", get(move || async move { prometheus.render() })));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    println!("serving on http://{addr} (GET /metrics)");

    // 3. Some traffic.
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let get = |path: String, deadline: &'static str| {
        let req = http::Request::get(format!("http://{addr}{path}"))
            .header("x-deadline-ms", deadline)
            .body(Empty::new());
        let client = client.clone();
        async move { Ok::<_, BoxError>(client.request(req?).await?.status()) }
    };
    let mut statuses = std::collections::BTreeMap::<u16, u32>::new();
    for _ in 0..2 {
        *statuses
            .entry(get("/slow".into(), "50").await?.as_u16())
            .or_default() += 1;
    }
    for i in 0..15 {
        *statuses
            .entry(get(format!("/orders/{i}"), "1000").await?.as_u16())
            .or_default() += 1;
    }
    *statuses
        .entry(get("/orders/1".into(), "soon").await?.as_u16())
        .or_default() += 1;
    println!("answers by status: {statuses:?}");

    // 4. What /metrics says (over HTTP, as Prometheus would read it).
    let res = client
        .get(format!("http://{addr}/metrics").parse()?)
        .await?;
    let text = res.into_body().collect().await?.to_bytes();
    let text = std::str::from_utf8(&text)?;
    for line in text.lines().filter(|l| {
        !l.starts_with('#')
            && !l.contains("quantile")
            && (l.starts_with("atscale_")
                || l.starts_with("http_server_request_duration_seconds_count"))
    }) {
        println!("  {line}");
    }

    if seconds > 0 {
        println!("serving for {seconds} s more");
        tokio::time::sleep(Duration::from_secs(seconds)).await;
    }
    Ok(())
}
