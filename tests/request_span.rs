//! One `request` span per request per stack, with each layer's decision
//! recorded on it as it is made, and the W3C trace id.
#![cfg(feature = "metrics")]

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atscale::core::BoxError;
use atscale::ratelimit::{Limit, Limiter, RateLimitLayer};
use tower::{Layer, ServiceExt, service_fn};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

type Fields = BTreeMap<String, String>;

/// Every closed span named `request`, with its fields.
#[derive(Clone, Default)]
struct Spans {
    open: Arc<Mutex<BTreeMap<u64, Fields>>>,
    closed: Arc<Mutex<Vec<Fields>>>,
}

struct Collect<'a>(&'a mut Fields);

impl Visit for Collect<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        if attrs.metadata().name() == "request" {
            let mut fields = Fields::new();
            attrs.record(&mut Collect(&mut fields));
            self.open.lock().unwrap().insert(id.into_u64(), fields);
        }
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some(fields) = self.open.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Collect(fields));
        }
    }
    fn on_close(&self, id: Id, _: Context<'_, S>) {
        if let Some(fields) = self.open.lock().unwrap().remove(&id.into_u64()) {
            self.closed.lock().unwrap().push(fields);
        }
    }
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test(flavor = "current_thread")]
async fn each_request_has_one_span_with_every_decision() {
    let spans = Spans::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));

    let limiter = Limiter::new(Limit::per_hour(1).unwrap().burst(1).unwrap());
    let stack = atscale::stack::server("spans", Duration::from_secs(10))
        .with_rate_limit(RateLimitLayer::reject(limiter));
    let svc = stack.layer(service_fn(|_: http::Request<()>| async {
        Ok::<_, BoxError>(http::Response::new(String::from("ok")))
    }));
    let request = || {
        http::Request::get("/orders")
            .header("x-deadline-ms", "500")
            .header("traceparent", TRACEPARENT)
            .body(())
            .unwrap()
    };
    let ok = svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(ok.status(), 200);
    let refused = svc.oneshot(request()).await.unwrap();
    assert_eq!(refused.status(), 429);

    let closed = spans.closed.lock().unwrap().clone();
    assert_eq!(closed.len(), 2, "one span per request: {closed:?}");
    let (first, second) = (&closed[0], &closed[1]);
    let field = |s: &Fields, k: &str| s.get(k).cloned().unwrap_or_default();
    for span in [first, second] {
        assert_eq!(field(span, "http.request.method"), "GET");
        assert_eq!(field(span, "trace_id"), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(field(span, "deadline.origin"), "header");
        let remaining: u64 = field(span, "deadline.remaining_ms").parse().unwrap();
        assert!((1..=500).contains(&remaining), "{remaining}");
    }
    assert_eq!(field(first, "ratelimit.outcome"), "admitted");
    assert_eq!(field(first, "http.response.status_code"), "200");
    assert!(!first.contains_key("error.kind"));
    assert_eq!(field(second, "ratelimit.outcome"), "rate_limited");
    assert_eq!(field(second, "error.kind"), "rate_limited");
    assert_eq!(field(second, "http.response.status_code"), "429");
    assert_eq!(field(second, "error.id").len(), 32);
}
