//! The Prometheus text exposition format, read back: the series a scrape
//! returned, for tests that check what the exporter really wrote.

#![allow(dead_code)] // each test binary uses part of it

use std::collections::BTreeMap;

/// A sample's labels.
pub(crate) type Labels = BTreeMap<String, String>;

/// One scrape: every sample, keyed by metric name, then by its label set.
#[derive(Clone, Debug, Default)]
pub(crate) struct Scrape {
    pub(crate) samples: BTreeMap<String, Vec<(Labels, f64)>>,
    /// `# TYPE` lines: name → `counter`, `gauge`, `histogram`, `summary`.
    pub(crate) types: BTreeMap<String, String>,
}

impl Scrape {
    /// Parses the text format (as `metrics-exporter-prometheus` renders it).
    pub(crate) fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
                scrape.types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("series value");
            let value: f64 = value.parse().expect("a number");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').expect("}"))),
                None => (series, BTreeMap::new()),
            };
            scrape
                .samples
                .entry(name.to_owned())
                .or_default()
                .push((labels, value));
        }
        scrape
    }

    /// The sum of the samples of `name` whose labels include all of `labels`
    /// (0 when there is none).
    pub(crate) fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples.get(name).map_or(0.0, |series| {
            series
                .iter()
                .filter(|(l, _)| {
                    labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
                })
                .map(|(_, v)| v)
                .sum()
        })
    }

    /// Every metric name in the scrape, samples and `# TYPE` lines alike.
    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.samples
            .keys()
            .chain(self.types.keys())
            .map(String::as_str)
    }
}

fn parse_labels(s: &str) -> Labels {
    let mut labels = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").expect("key=\"value\"");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().expect("a closing quote") {
                (_, '\\') => value.push(chars.next().expect("an escaped char").1),
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim_start_matches(',').to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    labels
}

/// GETs `http://{addr}/metrics` over a real connection and parses it.
pub(crate) async fn scrape(addr: std::net::SocketAddr) -> Scrape {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let res = client
        .get(format!("http://{addr}/metrics").parse().unwrap())
        .await
        .expect("GET /metrics");
    assert_eq!(res.status(), 200, "GET /metrics");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Scrape::parse(std::str::from_utf8(&body).expect("UTF-8"))
}
