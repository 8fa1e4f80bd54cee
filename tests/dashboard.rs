//! The Grafana dashboard (`dashboards/atscale.json`) cannot rot: every
//! metric name its PromQL queries use is one the code emits.
//!
//! Names are checked in Prometheus form, as `metrics-exporter-prometheus`
//! (recommended naming) really writes them: the conversion from the shared
//! names ([`atscale::metrics::ALL`]) is itself checked against the exporter's
//! output, and the server-side names against a scrape of real traffic.

mod loopback;
mod prom;

use std::collections::BTreeSet;
use std::time::Duration;

use atscale::heartbeat::Monitor;
use atscale::metrics::{ALL, Instrument, Metric, Unit};
use atscale::ratelimit::{Limit, Limiter, RateLimitLayer};
use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::Empty;
use loopback::{bounded, http_client, serve_router};
use metrics_exporter_prometheus::PrometheusBuilder;
use prom::{Scrape, scrape};

const DASHBOARD: &str = include_str!("../dashboards/atscale.json");

/// Every `expr` in the dashboard.
fn queries() -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("valid JSON");
    let mut out = Vec::new();
    walk(&dashboard, &mut out);
    out
}

/// The metric names a PromQL expression reads: identifiers that are not
/// function calls, keywords, label names (matchers, `by (...)`), durations,
/// numbers or strings.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Drop strings, label matchers and range selectors.
    let mut plain = String::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        let close = match c {
            '"' => '"',
            '{' => '}',
            '[' => ']',
            _ => {
                plain.push(c);
                continue;
            }
        };
        let mut in_string = false;
        for c in chars.by_ref() {
            match c {
                '"' if close != '"' => in_string = !in_string,
                c if c == close && !in_string => break,
                _ => {}
            }
        }
        plain.push(' ');
    }
    const GROUPING: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    // Keywords, and aggregation operators (their `(` may come after `by (..)`).
    const KEYWORDS: [&str; 19] = [
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "group_left",
        "group_right",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let is_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_part = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let chars: Vec<char> = plain.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() || c == '.' {
            // a number (0.99, 1e3): not a name
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        if !is_start(c) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_part(chars[i]) {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        let mut j = i;
        while j < chars.len() && chars[j] == ' ' {
            j += 1;
        }
        let called = j < chars.len() && chars[j] == '(';
        if GROUPING.contains(&word.as_str()) && called {
            // skip the label list
            while j < chars.len() && chars[j] != ')' {
                j += 1;
            }
            i = j + 1;
        } else if !called && !KEYWORDS.contains(&word.as_str()) {
            names.insert(word);
        }
    }
    names
}

/// What `metrics-exporter-prometheus` with recommended naming calls `m`'s
/// series: dots become underscores, the unit is appended (none for plain
/// counts), counters end in `_total`, histograms (with buckets) have
/// `_bucket`, `_sum` and `_count`.
fn prometheus_names(m: &Metric) -> Vec<String> {
    let mut base = m.name.replace('.', "_");
    match m.unit {
        Unit::Count => {}
        Unit::Percent => base.push_str("_ratio"),
        unit => {
            base.push('_');
            base.push_str(unit.as_str());
        }
    }
    match m.instrument {
        Instrument::Counter => vec![format!("{base}_total")],
        Instrument::Gauge => vec![base],
        Instrument::Histogram => ["_bucket", "_sum", "_count"]
            .iter()
            .map(|s| format!("{base}{s}"))
            .collect(),
        other => panic!("an instrument this test does not know: {other:?}"),
    }
}

/// Every series name the code's metrics take in Prometheus.
fn emitted() -> BTreeSet<String> {
    ALL.iter().flat_map(prometheus_names).collect()
}

#[test]
fn the_query_parser_finds_names_and_only_names() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le, origin) (rate(a_seconds_bucket{x="y{z}", k=~"2.."}[$__rate_interval]))) / on (job) group_left b_total or max without (instance) (c) > bool 1e3"#,
    );
    let expected: BTreeSet<String> = ["a_seconds_bucket", "b_total", "c"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(names, expected);
}

#[test]
fn the_dashboard_has_queries_for_each_thing_the_issue_asks() {
    let all = queries().join("\n");
    for needle in [
        "http_server_request_duration_seconds_count", // goodput
        "atscale_ratelimit_refused_total",            // refusals by reason
        "atscale_overload_shed_total",
        "atscale_deadline_exceeded_total", // deadline origins
        "atscale_hedge_sent_total",        // hedge rate against budget
        "atscale_hedge_denied_total",
        "atscale_heartbeat_in_flight", // in flight
        "atscale_heartbeat_stalls_total",
        "atscale_overload_limit", // overload limit and queue
        "atscale_overload_queue_depth",
        "atscale_retry_attempts_total", // retries
    ] {
        assert!(all.contains(needle), "no query reads {needle}");
    }
}

/// One process-wide recorder (the `metrics` facade has one per process), so
/// one test does everything that needs it.
#[tokio::test]
async fn every_name_the_dashboard_reads_is_emitted_by_the_code() {
    let prometheus = PrometheusBuilder::new()
        .with_recommended_naming(true)
        .set_buckets(&[0.001, 0.01, 0.1, 1.0, 10.0])
        .unwrap()
        .install_recorder()
        .expect("the only recorder of this binary");
    atscale::metrics::enable();

    // 1. Real traffic through the server stack: these names come from the
    //    layers' own code, as a scrape over HTTP shows them.
    let monitor = Monitor::builder().stall(Duration::from_millis(200)).build();
    let limiter = Limiter::new(Limit::per_hour(1).unwrap().burst(3).unwrap());
    let stack = atscale::stack::server("dashboard", Duration::from_secs(10))
        .with_rate_limit(RateLimitLayer::reject(limiter))
        .with_monitor(monitor);
    let render = prometheus.clone();
    let app = Router::new()
        .route("/ok", get(|| async { "ok" }))
        .route("/hang", get(std::future::pending::<&'static str>))
        .layer(stack)
        .merge(Router::new().route("/metrics", get(move || async move { render.render() })));
    let addr = serve_router(app).await;
    for (path, deadline) in [
        ("/ok", "1000"),
        ("/hang", "50"),
        ("/hang", "5000"),
        ("/ok", "1000"),
        ("/ok", "soon"),
    ] {
        let req = http::Request::get(format!("http://{addr}{path}"))
            .header("x-deadline-ms", deadline)
            .body(Empty::<Bytes>::new())
            .unwrap();
        bounded(path, http_client().request(req)).await.unwrap();
    }
    let traffic = scrape(addr).await;
    let from_traffic: BTreeSet<String> = traffic.names().map(String::from).collect();
    let converted = emitted();
    let server_side = [
        "http_server_request_duration_seconds_bucket",
        "http_server_request_duration_seconds_count",
        "atscale_errors_total",
        "atscale_deadline_exceeded_total",
        "atscale_deadline_remaining_seconds_count",
        "atscale_deadline_malformed_total",
        "atscale_ratelimit_admitted_total",
        "atscale_ratelimit_refused_total",
        "atscale_heartbeat_in_flight",
        "atscale_heartbeat_stalls_total",
    ];
    for name in server_side {
        assert!(from_traffic.contains(name), "traffic did not emit {name}");
        assert!(converted.contains(name), "{name} is not a converted name");
    }

    // 2. Every metric of the shared list, through the same exporter: its
    //    output names are exactly the converted ones, so the conversion is
    //    the exporter's.
    for m in ALL {
        let labels: Vec<metrics::Label> = m
            .labels
            .iter()
            .map(|k| metrics::Label::new(*k, "x"))
            .collect();
        let key = metrics::Key::from_parts(m.name, labels);
        let meta = metrics::Metadata::new(module_path!(), metrics::Level::INFO, None);
        metrics::with_recorder(|r| match m.instrument {
            Instrument::Counter => r.register_counter(&key, &meta).increment(1),
            Instrument::Gauge => r.register_gauge(&key, &meta).set(1.0),
            Instrument::Histogram => r.register_histogram(&key, &meta).record(0.5),
            other => panic!("an instrument this test does not know: {other:?}"),
        });
    }
    let all = Scrape::parse(&prometheus.render());
    let written: BTreeSet<String> = all.samples.keys().cloned().collect();
    assert_eq!(
        written, converted,
        "the exporter's names and the converted ones differ"
    );

    // 3. The dashboard reads only those names, and reads some.
    let mut read = BTreeSet::new();
    for expr in queries() {
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "a query reads no metric: {expr}");
        for name in names {
            assert!(
                converted.contains(&name),
                "the dashboard reads {name}, which no code emits (in: {expr})"
            );
            read.insert(name);
        }
    }
    assert!(read.len() >= 20, "only {} names read", read.len());
}
