//! A tonic unary call hedged across two real tonic servers on loopback
//! (tonic-health's generated service: no protoc needed). The first attempt
//! goes to a server that never answers; the hedge goes to the other one,
//! which answers; the slow server sees its call cancelled.

mod loopback;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atscale::core::Context;
use atscale::hedge::{Budget, BufferBodyLayer, BufferedBody, Delay, HedgeLayer};
use loopback::channel;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::body::Body;
use tonic::transport::{Channel, Server};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as Wire;
use tonic_health::pb::health_client::HealthClient;
use tower::ServiceBuilder;
use tower::layer::layer_fn;
use tower::util::ServiceExt;

#[derive(Debug, PartialEq)]
enum Event {
    Started(&'static str),
    Answered(&'static str),
    Cancelled(&'static str),
}

/// Tells when its call's future is dropped before it answered.
struct Watch {
    name: &'static str,
    events: mpsc::UnboundedSender<Event>,
    answered: std::cell::Cell<bool>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let event = if self.answered.get() {
            Event::Answered(self.name)
        } else {
            Event::Cancelled(self.name)
        };
        let _ = self.events.send(event);
    }
}

/// A health server reporting every call; `stall` makes it never answer.
async fn server(
    name: &'static str,
    stall: bool,
    events: mpsc::UnboundedSender<Event>,
) -> SocketAddr {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("hedged", ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let watch = layer_fn(move |inner: tonic::service::Routes| {
        let events = events.clone();
        tower::service_fn(move |req: http::Request<Body>| {
            let inner = inner.clone();
            let watch = Watch {
                name,
                events: events.clone(),
                answered: std::cell::Cell::new(false),
            };
            async move {
                let _ = watch.events.send(Event::Started(name));
                if stall {
                    std::future::pending::<()>().await;
                }
                let res = inner.oneshot(req).await;
                watch.answered.set(true);
                res
            }
        })
    });
    tokio::spawn(
        Server::builder()
            .layer(watch)
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

#[tokio::test]
async fn a_unary_call_is_answered_by_the_fast_replica_and_the_slow_one_is_cancelled() {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let slow = channel(server("slow", true, events_tx.clone()).await).await;
    let fast = channel(server("fast", false, events_tx).await).await;

    // Client side: each replica is a Channel fed a tonic body again; the
    // contexts every attempt carried are kept to check them afterwards.
    let contexts: Arc<Mutex<Vec<Context>>> = Arc::default();
    let replica = |channel: Channel| {
        let contexts = contexts.clone();
        ServiceBuilder::new()
            .map_request(move |req: http::Request<BufferedBody<Body>>| {
                contexts
                    .lock()
                    .unwrap()
                    .push(req.extensions().get::<Context>().cloned().unwrap());
                req.map(Body::new)
            })
            .service(channel)
    };
    let hedge = HedgeLayer::builder()
        .delay(Delay::fixed(Duration::from_millis(20)))
        .budget(Budget::unlimited())
        .non_idempotent(true) // gRPC calls are POSTs; a health check is safe to repeat
        .build()
        .unwrap();
    let stats = hedge.stats();
    let replicas = hedge
        .replicas(vec![replica(slow), replica(fast)])
        .unwrap()
        .pick(|_: &http::Request<BufferedBody<Body>>, _: usize| 0); // first attempts to "slow"
    let stack = ServiceBuilder::new()
        .layer(BufferBodyLayer::new(64 * 1024).non_idempotent(true))
        .service(replicas);
    let mut client = HealthClient::new(stack);

    let request_cx = Context::new();
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: "hedged".into(),
    });
    req.extensions_mut().insert(request_cx.clone());
    let res = client
        .check(req)
        .await
        .expect("answered by the fast replica");
    assert_eq!(res.into_inner().status, Wire::Serving as i32);
    assert_eq!((stats.hedges_sent(), stats.hedges_won()), (1, 1));

    // The servers' side of the story, in order; a bound only so that a bug
    // fails the test instead of hanging it.
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("the slow server sees its call cancelled")
            .unwrap();
        seen.push(event);
    }
    assert_eq!(seen[0], Event::Started("slow"));
    assert!(seen.contains(&Event::Started("fast")));
    assert!(seen.contains(&Event::Answered("fast")));
    assert!(seen.contains(&Event::Cancelled("slow")));

    // The client's side: the loser's context was cancelled, the winner's not,
    // the caller's not.
    let contexts = contexts.lock().unwrap();
    assert_eq!(contexts.len(), 2);
    assert!(contexts[0].is_cancelled());
    assert!(!contexts[1].is_cancelled());
    assert!(!request_cx.is_cancelled());
}
