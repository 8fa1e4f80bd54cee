//! `rpc.server.duration` takes a gRPC call's status where the call sends
//! it: in the headers of a trailers-only answer, in the trailers of every
//! other (a successful unary call, a streaming call's error), and the call
//! is timed until then.
//!
//! One recorder for the whole test binary (the `metrics` facade has one
//! global recorder per process), so one test.
#![cfg(all(feature = "metrics", feature = "tonic"))]

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use atscale_error::ErrorEnrichLayer;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::{Layer, ServiceExt, service_fn};

/// How many values each histogram (name and sorted labels) recorded.
#[derive(Clone, Default)]
struct Counts(Arc<Mutex<BTreeMap<String, usize>>>);

impl Counts {
    fn rpc(&self, code: &str) -> usize {
        let key = format!("rpc.server.duration{{rpc.grpc.status_code={code},rpc.system=grpc}}");
        self.0.lock().unwrap().get(&key).copied().unwrap_or(0)
    }

    fn total(&self) -> usize {
        self.0.lock().unwrap().values().sum()
    }
}

struct Values(String, Counts);

impl HistogramFn for Values {
    fn record(&self, _: f64) {
        *self.1.0.lock().unwrap().entry(self.0.clone()).or_default() += 1;
    }
}

impl Recorder for Counts {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        Histogram::from_arc(Arc::new(Values(name, self.clone())))
    }
}

/// A body of the given frames, then its end.
struct Frames(VecDeque<Frame<Bytes>>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}

fn grpc_request() -> Request<()> {
    Request::builder()
        .method("POST")
        .uri("/pkg.Svc/Call")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap()
}

/// An answer of `status` headers (and `grpc-status` in them if
/// `in_headers`), a message, and trailers with `grpc-status: trailer` if
/// given.
fn answer(in_headers: Option<&str>, trailer: Option<&str>) -> Response<Frames> {
    let mut frames = VecDeque::from([Frame::data(Bytes::from_static(b"\0\0\0\0\0"))]);
    if let Some(code) = trailer {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_str(code).unwrap());
        frames.push_back(Frame::trailers(trailers));
    }
    let mut res = Response::new(Frames(frames));
    res.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    if let Some(code) = in_headers {
        res.headers_mut()
            .insert("grpc-status", HeaderValue::from_str(code).unwrap());
    }
    res
}

/// Calls ErrorEnrich over a service answering `res`, returns the body.
async fn call(res: Response<Frames>) -> impl Body<Data = Bytes, Error = Infallible> {
    let res = Mutex::new(Some(res));
    let inner = service_fn(move |_: Request<()>| {
        let res = res.lock().unwrap().take().expect("one call");
        async move { Ok::<_, Infallible>(res) }
    });
    let svc = ErrorEnrichLayer::new("grpc").layer(inner);
    svc.oneshot(grpc_request()).await.unwrap().into_body()
}

async fn serve_health() -> HealthClient<Channel> {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::builder()
        .layer(ErrorEnrichLayer::new("health"))
        .add_service(health)
        .serve_with_incoming(TcpIncoming::from(listener));
    tokio::spawn(async move { server.await.unwrap() });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

#[tokio::test]
async fn the_grpc_status_is_read_where_the_call_sends_it() {
    let counts = Counts::default();
    metrics::set_global_recorder(counts.clone()).expect("the only recorder");
    atscale_core::metrics::enable();

    // Trailers: nothing recorded until the body yields them, then their code.
    let mut body = call(answer(None, Some("7"))).await;
    assert_eq!(counts.total(), 0, "recorded before the trailers");
    let frame = body.frame().await.unwrap().unwrap();
    assert!(frame.is_data());
    assert_eq!(counts.total(), 0, "recorded before the trailers");
    let frame = body.frame().await.unwrap().unwrap();
    assert!(frame.is_trailers());
    assert_eq!(counts.rpc("7"), 1);
    assert!(body.frame().await.is_none());
    drop(body);
    assert_eq!(counts.total(), 1, "recorded once");

    // Trailers-only (the status in the headers): recorded at the answer.
    let body = call(answer(Some("5"), None)).await;
    assert_eq!(counts.rpc("5"), 1);
    body.collect().await.unwrap();
    assert_eq!(counts.total(), 2);

    // No status at all: UNKNOWN at the body's end.
    let body = call(answer(None, None)).await;
    body.collect().await.unwrap();
    assert_eq!(counts.rpc("2"), 1);

    // Dropped before its trailers (the client went away): CANCELLED.
    drop(call(answer(None, Some("0"))).await);
    assert_eq!(counts.rpc("1"), 1);
    assert_eq!(counts.rpc("0"), 0);
    assert_eq!(counts.total(), 4);

    // In axum mode too (the body boxed into axum's `Body` keeps waiting
    // for the trailers).
    #[cfg(feature = "axum")]
    {
        let res = Mutex::new(Some(answer(None, Some("9"))));
        let inner = service_fn(move |_: Request<()>| {
            let res = res.lock().unwrap().take().expect("one call");
            async move { Ok::<_, Infallible>(res) }
        });
        let svc = ErrorEnrichLayer::new("grpc").for_axum().layer(inner);
        let body = svc.oneshot(grpc_request()).await.unwrap().into_body();
        assert_eq!(counts.rpc("9"), 0, "recorded before the trailers");
        body.collect().await.unwrap();
        assert_eq!(counts.rpc("9"), 1);
    }
    let before = counts.total();

    // A real tonic server: a successful unary call sends grpc-status 0 in
    // its trailers, an error of a unary call in the headers.
    let mut client = serve_health().await;
    let check = |service: &str| {
        tonic::Request::new(HealthCheckRequest {
            service: service.to_owned(),
        })
    };
    let bound = Duration::from_secs(30);
    let ok = tokio::time::timeout(bound, client.check(check("")))
        .await
        .expect("answered in time");
    assert!(ok.is_ok(), "{ok:?}");
    let unknown = tokio::time::timeout(bound, client.check(check("no.such.Service")))
        .await
        .expect("answered in time")
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    // The server records a call as its body yields the trailers, before
    // they reach the client.
    assert_eq!(counts.rpc("0"), 1, "{:?}", counts.0.lock().unwrap());
    assert_eq!(counts.rpc("5"), 2);
    assert_eq!(counts.total(), before + 2);
}
