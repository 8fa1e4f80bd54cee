//! The hedge's metrics through a recorder that counts: one
//! `atscale.hedge.requests` per request, and the `atscale.hedge.delay`
//! gauge set when the delay changes, not per request.
//!
//! One global recorder and one test in this binary.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atscale_core::{BoxError, Carrier, Context};
use atscale_hedge::{Budget, Delay, HedgeLayer, Replay};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
    Unit,
};
use tower::{Layer, ServiceExt, service_fn};

#[derive(Clone, Debug)]
struct Req;

impl Carrier for Req {
    fn context(&self) -> Option<&Context> {
        None
    }
    fn set_context(&mut self, _: Context) {}
}

impl Replay for Req {
    fn replay(&self) -> Option<Self> {
        Some(Req)
    }
    fn is_idempotent(&self) -> bool {
        true
    }
}

/// The requests counted and every value the delay gauge was set to.
#[derive(Debug, Default)]
struct Seen {
    requests: Arc<AtomicU64>,
    delays: Arc<Mutex<Vec<f64>>>,
}

#[derive(Debug)]
struct Requests(Arc<AtomicU64>);
impl CounterFn for Requests {
    fn increment(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    fn absolute(&self, _: u64) {}
}

#[derive(Debug)]
struct Delays(Arc<Mutex<Vec<f64>>>);
impl GaugeFn for Delays {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

impl Recorder for &'static Seen {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        match key.name() {
            atscale_core::metrics::HEDGE_REQUESTS => {
                Counter::from_arc(Arc::new(Requests(self.requests.clone())))
            }
            _ => Counter::noop(),
        }
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        match key.name() {
            atscale_core::metrics::HEDGE_DELAY => {
                Gauge::from_arc(Arc::new(Delays(self.delays.clone())))
            }
            _ => Gauge::noop(),
        }
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

async fn send(layer: &HedgeLayer, n: usize) {
    let svc = layer.layer(service_fn(|_: Req| async { Ok::<_, BoxError>(()) }));
    for _ in 0..n {
        svc.clone().oneshot(Req).await.unwrap();
    }
}

fn fixed(ms: u64) -> HedgeLayer {
    HedgeLayer::builder()
        .delay(Delay::fixed(Duration::from_millis(ms)))
        .budget(Budget::unlimited())
        .build()
        .unwrap()
}

#[tokio::test]
async fn the_delay_gauge_is_set_when_the_delay_changes_not_per_request() {
    let seen: &'static Seen = Box::leak(Box::default());
    metrics::set_global_recorder(seen).expect("the only recorder of this binary");
    atscale_core::metrics::enable();

    send(&fixed(30), 5).await;
    send(&fixed(50), 3).await;
    send(&fixed(30), 2).await;

    assert_eq!(seen.requests.load(Ordering::Relaxed), 10);
    assert_eq!(*seen.delays.lock().unwrap(), [0.03, 0.05, 0.03]);
}
