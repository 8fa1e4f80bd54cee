//! Shared pieces of the end-to-end tests: a layer that fails on demand, and
//! a tracing layer that captures the log lines.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use atscale_core::{
    BoxError, Cancelled, DeadlineExceeded, HedgeExhausted, Interrupted, MalformedDeadline, Origin,
    Overloaded, RateLimited, Stalled,
};
use tower::Service;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::{Layer, Registry};

/// The request header (or gRPC metadata) that picks the failure.
pub const FAIL: &str = "x-fail";

/// A secret an inner error holds: it must reach the logs, never a client.
pub const SECRET: &str = "password=hunter2";

/// An error outside the vocabulary, carrying a secret.
#[derive(Debug)]
pub struct DbError;

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connecting to postgres://app:{SECRET}@db failed")
    }
}

impl std::error::Error for DbError {}

/// A wrapper that hides the vocabulary type one level down the chain.
#[derive(Debug)]
pub struct Wrapped(pub &'static str, pub BoxError);

impl fmt::Display for Wrapped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Wrapped {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.1)
    }
}

/// The error named `name`, or `None` to let the request through.
pub fn failure(name: &str) -> Option<BoxError> {
    Some(match name {
        "deadline" => Box::new(DeadlineExceeded::new(
            Duration::from_millis(300),
            Duration::from_millis(301),
            Origin::Header,
        )),
        "deadline-local" => Box::new(Wrapped(
            "waiting for the inventory",
            Box::new(Interrupted::DeadlineExceeded(DeadlineExceeded::new(
                Duration::from_secs(2),
                Duration::from_secs(2),
                Origin::Local,
            ))),
        )),
        "malformed" => Box::new(MalformedDeadline::new("x-request-timeout", "not a number")),
        "rate" => Box::new(Wrapped(
            "checking quota",
            Box::new(RateLimited::new(Duration::from_millis(1500))),
        )),
        "overloaded" => Box::new(Overloaded::new()),
        "stalled" => Box::new(Stalled::new(Duration::from_secs(4))),
        "hedge" => Box::new(HedgeExhausted::new(vec![
            Box::new(DbError),
            Box::new(Overloaded::new()),
            Box::new(Stalled::new(Duration::from_secs(1))),
        ])),
        "cancelled" => Box::new(Cancelled::new()),
        "internal" => Box::new(Wrapped("loading the order", Box::new(DbError))),
        _ => return None,
    })
}

/// Fails requests whose `x-fail` header names a failure; panics for
/// `panic-call` (in `call`) and `panic-poll` (in the future); never answers
/// `hang` (only a deadline ends it); passes the rest on.
#[derive(Clone, Debug)]
pub struct Failing<S> {
    inner: S,
}

/// Makes [`Failing`] services.
#[derive(Clone, Copy, Debug, Default)]
pub struct FailingLayer;

impl<S> tower::Layer<S> for FailingLayer {
    type Service = Failing<S>;

    fn layer(&self, inner: S) -> Failing<S> {
        Failing { inner }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> Service<http::Request<B>> for Failing<S>
where
    S: Service<http::Request<B>, Response = R>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = R;
    type Error = BoxError;
    type Future = BoxFuture<Result<R, BoxError>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let name = req
            .headers()
            .get(FAIL)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        match name.as_str() {
            "panic-call" => panic!("handler bug: {SECRET}"),
            "panic-poll" => Box::pin(async move { panic!("async handler bug: {SECRET}") }),
            "hang" => Box::pin(std::future::pending()),
            _ => match failure(&name) {
                Some(err) => Box::pin(async move { Err(err) }),
                None => {
                    let fut = self.inner.call(req);
                    Box::pin(async move { fut.await.map_err(Into::into) })
                }
            },
        }
    }
}

/// One captured event: its level, target and fields (as text).
#[derive(Clone, Debug)]
pub struct Line {
    pub level: tracing::Level,
    pub target: String,
    pub fields: BTreeMap<String, String>,
}

impl Line {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

/// The events captured so far.
#[derive(Clone, Debug, Default)]
pub struct Logs(Arc<Mutex<Vec<Line>>>);

impl Logs {
    pub fn lines(&self) -> Vec<Line> {
        self.0.lock().unwrap().clone()
    }

    /// The lines of this crate (target `atscale_error`).
    pub fn enrich_lines(&self) -> Vec<Line> {
        self.lines()
            .into_iter()
            .filter(|l| l.target == "atscale_error")
            .collect()
    }

    /// The one line with error id `id`.
    pub fn by_id(&self, id: &str) -> Line {
        let lines: Vec<Line> = self
            .enrich_lines()
            .into_iter()
            .filter(|l| l.field("id") == Some(id))
            .collect();
        assert_eq!(lines.len(), 1, "exactly one log line per error id {id}");
        lines.into_iter().next().unwrap()
    }
}

/// The one subscriber of the test binary: it hands each event to the
/// capture of the thread that emits it, if any.
struct Routed;

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<Logs>> = const { std::cell::RefCell::new(None) };
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: Subscriber> Layer<S> for Routed {
    fn on_event(&self, event: &Event<'_>, _cx: Context<'_, S>) {
        let Some(logs) = CAPTURE.with(|c| c.borrow().clone()) else {
            return;
        };
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        logs.0.lock().unwrap().push(Line {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            fields,
        });
    }
}

/// Stops this thread's capture when dropped (restoring an outer one).
#[must_use]
pub struct CaptureGuard {
    outer: Option<Logs>,
}

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        let outer = self.outer.take();
        CAPTURE.with(|c| *c.borrow_mut() = outer);
    }
}

/// Captures every event on this thread while the guard lives (the tests run
/// servers and clients on a current-thread runtime, so that is all of them).
///
/// One global subscriber routes events by thread. (A scoped subscriber per
/// test, `set_default`, lost events when tests ran in parallel: tracing
/// recomputes callsite interest and the global max level as scoped
/// dispatchers come and go on other threads, and an event emitted during a
/// recomputation could be filtered out.)
pub fn capture_logs() -> (Logs, CaptureGuard) {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        tracing::subscriber::set_global_default(Registry::default().with(Routed))
            .expect("the test binary installs no other global subscriber");
    });
    let logs = Logs::default();
    let outer = CAPTURE.with(|c| c.borrow_mut().replace(logs.clone()));
    (logs, CaptureGuard { outer })
}

/// Whether `s` is an RFC 3339 UTC timestamp with milliseconds, as the layer writes them.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 24
        && s.char_indices().all(|(i, c)| match i {
            4 | 7 => c == '-',
            10 => c == 'T',
            13 | 16 => c == ':',
            19 => c == '.',
            23 => c == 'Z',
            _ => c.is_ascii_digit(),
        })
}
