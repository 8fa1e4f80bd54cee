//! Metrics and spans from every layer: what each decision costs and how
//! often it is made, on a dashboard rather than in the logs.
//!
//! With the `metrics` feature (in `full`), every layer emits through the
//! [`metrics`](https://docs.rs/metrics) facade: counters, gauges and
//! histograms with the stable names and bounded labels listed below (and in
//! [`ALL`]). Install any recorder: `metrics-exporter-prometheus` for a
//! `/metrics` endpoint, or OpenTelemetry through a `metrics` → OpenTelemetry
//! bridge. Then call [`enable`] once: it gives the recorder each metric's
//! unit and help text, and turns the layers' emissions on. Until then
//! nothing is emitted, and each emission site costs one relaxed atomic load
//! (the facade cannot tell whether a recorder is installed, and asking it
//! costs 10–20 ns per emission: benches/README.md, "Metrics").
//!
//! Why the `metrics` facade rather than the OpenTelemetry API: names are
//! plain strings and handles are looked up by the installed recorder, so
//! the hot path stays free of generics and of a meter handed to every
//! layer; every exporter, OpenTelemetry's included (through a `metrics` →
//! OpenTelemetry bridge), plugs in behind it; and until [`enable`] an
//! emission costs one atomic load, so the feature sits in `full`.
//!
//! Each request also gets one `tracing` span per stack (`request`, target
//! `atscale`, opened by ErrorEnrich), on which every layer records its
//! decision as it makes it ([`field`]: `deadline.origin`,
//! `ratelimit.outcome`, `error.kind`, …). The W3C `traceparent` trace id,
//! when the request has a well-formed one, is a field of that span, of the
//! error's log line, and an extension member (`trace_id`) of problem+json
//! answers, with or without this feature.
//!
//! # Example
//!
//! A Prometheus endpoint for the server stack (see
//! `examples/metrics_server.rs` for a whole server, and
//! `dashboards/atscale.json` for a Grafana dashboard over these names):
//!
//! ```
//! use std::time::Duration;
//! use atscale::prelude::*;
//! use metrics_exporter_prometheus::PrometheusBuilder;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! // Once, at start-up: Prometheus names (`_total`, unit suffixes), then enable.
//! let prometheus = PrometheusBuilder::new()
//!     .with_recommended_naming(true)
//!     .install_recorder()?;
//! atscale::metrics::enable();
//!
//! let stack = atscale::stack::server("checkout", Duration::from_secs(2));
//! let svc = stack.layer(service_fn(|_req: http::Request<()>| async {
//!     Ok::<_, BoxError>(http::Response::new(String::from("ok")))
//! }));
//! let req = http::Request::get("/orders").header("x-deadline-ms", "250").body(())?;
//! let _ = svc.clone().oneshot(req).await?;
//! let malformed = http::Request::get("/orders").header("x-deadline-ms", "soon").body(())?;
//! let _ = svc.oneshot(malformed).await?;
//!
//! // Serve this text at GET /metrics.
//! let text = prometheus.render();
//! assert!(text.contains("atscale_deadline_malformed_total 1"));
//! assert!(text.contains("atscale_deadline_remaining_seconds_count{origin=\"header\"} 1"));
//! assert!(text.contains("http_server_request_duration_seconds_count{"));
//! # Ok(())
//! # }
//! ```
//!
//! Histograms are summaries in that exporter unless given buckets
//! (`PrometheusBuilder::set_buckets_for_metric`); `histogram_quantile` on a
//! dashboard needs buckets.
//!
//! # Names
//!
//! Every metric, with its instrument, unit and labels, is in
//! [`atscale_core::metrics`](crate::core::metrics) (and [`ALL`]); dots
//! become underscores in Prometheus, counters end in `_total`, units are
//! appended (`http_server_request_duration_seconds`).

pub use atscale_core::metrics::*;
