//! Metrics: what a Prometheus scrape would have said after the tour's runs.

use atscale::core::BoxError;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::table::Section;

/// Installs the Prometheus recorder, before any run, so every layer's
/// metrics of the whole tour are counted.
pub(crate) fn install() -> Result<PrometheusHandle, BoxError> {
    let handle = PrometheusBuilder::new()
        .with_recommended_naming(true)
        .install_recorder()?;
    atscale::metrics::enable();
    Ok(handle)
}

/// The snapshot: every atscale counter, gauge and histogram count the tour
/// moved, summed over its labels but one (the one that tells most).
pub(crate) fn snapshot(handle: &PrometheusHandle) -> Section {
    let mut section = Section::new(
        "Metrics",
        "What GET /metrics (metrics-exporter-prometheus) said after the runs above: \
         every layer's decisions, counted (atscale::metrics).",
    );
    let text = handle.render();
    let mut totals = std::collections::BTreeMap::<String, f64>::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let counted = name.ends_with("_total") || name.ends_with("_count");
        let gauge = !counted && !name.ends_with("_sum") && !labels.contains("quantile");
        if !(name.starts_with("atscale_")
            || name.starts_with("http_server")
            || name.starts_with("rpc_server"))
            || !(counted || gauge)
        {
            continue;
        }
        let shown = ["kind=", "reason=", "origin=", "http_response_status_code="]
            .iter()
            .find_map(|key| {
                labels
                    .split(',')
                    .find(|l| l.trim_start_matches('{').starts_with(key))
            })
            .map(|l| format!("{{{}}}", l.trim_end_matches('}')))
            .unwrap_or_default();
        let value: f64 = value.parse().unwrap_or(0.0);
        *totals.entry(format!("{name}{shown}")).or_default() += value;
    }
    for (series, value) in totals.into_iter().filter(|(_, v)| *v != 0.0) {
        section.row(series, format!("{value}"));
    }
    section
}
