//! Shared helpers of the overload tests.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use atscale_core::{BoxError, Context, Origin};
use atscale_overload::Criticality;
use tower::service_fn;

/// A request with id `id` (in its body).
pub(crate) fn req(id: usize) -> http::Request<usize> {
    http::Request::new(id)
}

/// A request with a deadline `budget` from now.
pub(crate) fn req_with_budget(id: usize, budget: Duration) -> http::Request<usize> {
    let mut r = req(id);
    r.extensions_mut()
        .insert(Context::new().with_budget(budget, Origin::Header));
    r
}

/// A request of the given criticality (set in-process).
pub(crate) fn req_of(id: usize, c: Criticality) -> http::Request<usize> {
    let mut r = req(id);
    r.extensions_mut().insert(c);
    r
}

/// A backend that takes `work` per request and records the order it served
/// ids in, and the most requests it ever had at once.
#[derive(Clone, Default)]
pub(crate) struct Recorder {
    pub(crate) served: Arc<std::sync::Mutex<Vec<usize>>>,
    pub(crate) now: Arc<AtomicUsize>,
    pub(crate) peak: Arc<AtomicUsize>,
}

impl Recorder {
    pub(crate) fn service(
        &self,
        work: Duration,
    ) -> impl tower::Service<
        http::Request<usize>,
        Response = usize,
        Error = BoxError,
        Future = impl Future<Output = Result<usize, BoxError>> + Send,
    > + Clone
    + Send
    + 'static {
        let me = self.clone();
        service_fn(move |r: http::Request<usize>| {
            let me = me.clone();
            async move {
                let id = *r.body();
                me.served.lock().unwrap().push(id);
                let n = me.now.fetch_add(1, Ordering::SeqCst) + 1;
                me.peak.fetch_max(n, Ordering::SeqCst);
                struct Leave(Arc<AtomicUsize>);
                impl Drop for Leave {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let _leave = Leave(me.now.clone());
                tokio::time::sleep(work).await;
                Ok::<_, BoxError>(id)
            }
        })
    }

    pub(crate) fn served(&self) -> Vec<usize> {
        self.served.lock().unwrap().clone()
    }
}

/// Lets spawned tasks run (paused clock: no time passes).
pub(crate) async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}
