//! Heartbeats over a real axum server streaming server-sent events on
//! loopback, read by a real hyper client: keep-alive frames while the stream
//! is quiet, a stalled stream cut with the stalled error, a handler that
//! never answers turned into 503.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use atscale::core::{BoxError, Context, Kind};
use atscale::heartbeat::{KeepAliveLayer, Monitor, Outcome, Pulse};
use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::routing::get;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::ServiceBuilder;

const STALL: Duration = Duration::from_millis(4500);
const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// Where the handler gets its event stream, and where it reports its context.
#[derive(Clone)]
struct App {
    streams: std::sync::Arc<std::sync::Mutex<Vec<mpsc::Receiver<Event>>>>,
    contexts: mpsc::UnboundedSender<Context>,
}

async fn events(
    State(app): State<App>,
    axum::Extension(cx): axum::Extension<Context>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    app.contexts.send(cx).unwrap();
    let rx = app.streams.lock().unwrap().remove(0);
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok))
}

async fn never(State(app): State<App>, axum::Extension(cx): axum::Extension<Context>) -> String {
    app.contexts.send(cx).unwrap();
    std::future::pending::<()>().await;
    unreachable!()
}

/// Maps the layer's errors to a status, as ErrorEnrich does in production.
async fn to_status(err: BoxError) -> (StatusCode, String) {
    (Kind::of(&*err).http_status(), err.to_string())
}

struct Server {
    addr: SocketAddr,
    monitor: Monitor,
    streams: std::sync::Arc<std::sync::Mutex<Vec<mpsc::Receiver<Event>>>>,
    contexts: mpsc::UnboundedReceiver<Context>,
}

async fn serve() -> Server {
    let monitor = Monitor::builder().stall(STALL).build();
    let (contexts_tx, contexts) = mpsc::unbounded_channel();
    let streams = std::sync::Arc::default();
    let app = App {
        streams: std::sync::Arc::clone(&streams),
        contexts: contexts_tx,
    };
    let router = Router::new()
        .route("/events", get(events))
        .route("/never", get(never))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(to_status))
                .layer(KeepAliveLayer::sse(KEEP_ALIVE))
                .layer(monitor.layer()),
        )
        .with_state(app);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    Server {
        addr,
        monitor,
        streams,
        contexts,
    }
}

impl Server {
    /// A stream for the next `/events` request; the sender feeds it.
    fn stream(&self) -> mpsc::Sender<Event> {
        let (tx, rx) = mpsc::channel(8);
        self.streams.lock().unwrap().push(rx);
        tx
    }
}

/// What the client read: each frame's text with its arrival (ms after the
/// response head), and how the body ended.
#[derive(Debug, PartialEq)]
struct Read {
    frames: Vec<(u64, String)>,
    error: Option<String>,
}

async fn get_events(addr: SocketAddr, path: &str) -> (StatusCode, Read) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri = format!("http://{addr}{path}").parse().unwrap();
    let response = client.get(uri).await.unwrap();
    let status = response.status();
    let start = Instant::now();
    let mut body = response.into_body();
    let mut frames = Vec::new();
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                let text = String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap();
                frames.push((start.elapsed().as_millis() as u64, text));
            }
            Some(Err(err)) => {
                return (
                    status,
                    Read {
                        frames,
                        error: Some(err.to_string()),
                    },
                );
            }
            None => {
                return (
                    status,
                    Read {
                        frames,
                        error: None,
                    },
                );
            }
        }
    }
}

fn frames(list: &[(u64, &str)]) -> Vec<(u64, String)> {
    list.iter().map(|(t, s)| (*t, s.to_string())).collect()
}

#[tokio::test(start_paused = true)]
async fn keep_alive_frames_arrive_while_the_stream_is_quiet() {
    let mut server = serve().await;
    let events = server.stream();
    let reader = tokio::spawn(get_events(server.addr, "/events"));
    let cx = server.contexts.recv().await.unwrap();

    events.send(Event::default().data("hello")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await; // quiet, under the stall limit
    events.send(Event::default().data("bye")).await.unwrap();
    drop(events);

    let (status, read) = reader.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        read,
        Read {
            frames: frames(&[
                (0, "data: hello\n\n"),
                (1000, ":\n\n"),
                (2000, ":\n\n"),
                (3000, ":\n\n"),
                (3500, "data: bye\n\n"),
            ]),
            error: None,
        }
    );
    server.monitor.wait_finished(1).await;
    let counts = server.monitor.counts();
    assert_eq!((counts.ok(), counts.stalled()), (1, 0));
    assert!(!cx.is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn a_stalled_stream_is_cut_with_the_stalled_error() {
    let mut server = serve().await;
    let mut pulses = server.monitor.subscribe();
    let events = server.stream();
    let reader = tokio::spawn(get_events(server.addr, "/events"));
    let cx = server.contexts.recv().await.unwrap();
    events.send(Event::default().data("hello")).await.unwrap();
    // ...and then the producer goes quiet for good (but stays alive).

    let (status, read) = reader.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        read.frames,
        frames(&[
            (0, "data: hello\n\n"),
            (1000, ":\n\n"),
            (2000, ":\n\n"),
            (3000, ":\n\n"),
            (4000, ":\n\n"),
        ])
    );
    assert!(
        read.error.is_some(),
        "the stream is cut, not ended: {read:?}"
    );

    // on the server: the stalled error, the stream dropped, the context cancelled
    let finished = loop {
        if let Some(Pulse::Finished {
            outcome, elapsed, ..
        }) = pulses.next().await
        {
            break (outcome, elapsed);
        }
    };
    assert_eq!(finished, (Outcome::Stalled, STALL));
    assert!(events.is_closed(), "the handler's stream was dropped");
    assert!(cx.is_cancelled(), "the request's context was cancelled");
}

#[tokio::test(start_paused = true)]
async fn a_handler_that_never_answers_gets_503_stalled() {
    let mut server = serve().await;
    let started = Instant::now();
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri = format!("http://{}/never", server.addr).parse().unwrap();
    let response = client.get(uri).await.unwrap();
    assert_eq!(started.elapsed(), STALL);
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "stalled: no progress for 4.5s");
    assert!(server.contexts.recv().await.unwrap().is_cancelled());
    assert_eq!(server.monitor.counts().stalled(), 1);
}
