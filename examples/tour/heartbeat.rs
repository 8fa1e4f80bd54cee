//! The heartbeat part of the tour: a real axum server on loopback streaming
//! server-sent events behind `KeepAliveLayer` and `HeartbeatLayer`, watched
//! through the monitor's pulses.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use atscale::core::{BoxError, Context, Kind};
use atscale::heartbeat::{KeepAliveLayer, Monitor, Outcome, Pulse, Pulses, RequestId, health};
use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::routing::get;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;

use crate::table::Section;

const STALL: Duration = Duration::from_millis(300);
const KEEP_ALIVE: Duration = Duration::from_millis(100);
const INTERVAL: Duration = Duration::from_millis(100);

type Events = Sse<std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>>>;

/// Three events, 50 ms apart, then the end.
async fn events() -> Events {
    let stream = futures_util::stream::iter(1..=3).then(|n| async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(Event::default().data(format!("tick {n}")))
    });
    Sse::new(Box::pin(stream))
}

/// One event, then silence: the producer is stuck until the request's
/// context (attached by the heartbeat layer) is cancelled by the watchdog.
async fn stuck(axum::Extension(cx): axum::Extension<Context>) -> Events {
    let first = futures_util::stream::once(async { Ok(Event::default().data("tick 1")) });
    let silence = futures_util::stream::once(async move {
        cx.cancelled().await; // waits until the watchdog cancels the request
        Ok(Event::default().data("never sent"))
    })
    .filter(|_| async { false });
    Sse::new(Box::pin(first.chain(silence)))
}

/// Never answers.
async fn hang() -> &'static str {
    std::future::pending::<()>().await;
    unreachable!()
}

/// Maps the layer's errors to a status, as ErrorEnrich does in a full stack.
async fn to_status(err: BoxError) -> (StatusCode, String) {
    (Kind::of(&*err).http_status(), err.to_string())
}

struct Read {
    status: StatusCode,
    data: usize,
    keep_alives: usize,
    cut: Option<String>,
    took: Duration,
}

async fn fetch(
    client: &Client<HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
    path: &str,
) -> Result<Read, BoxError> {
    let start = Instant::now();
    let response = client.get(format!("http://{addr}{path}").parse()?).await?;
    let status = response.status();
    let mut body = response.into_body();
    let (mut data, mut keep_alives, mut cut) = (0, 0, None);
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => match frame.into_data() {
                Ok(bytes) if bytes.starts_with(b":") => keep_alives += 1,
                Ok(_) => data += 1,
                Err(_) => {}
            },
            Err(err) => {
                cut = Some(err.to_string());
                break;
            }
        }
    }
    Ok(Read {
        status,
        data,
        keep_alives,
        cut,
        took: start.elapsed(),
    })
}

/// The pulses about the next request to start, up to its end, and the beats meanwhile.
async fn follow(pulses: &mut Pulses) -> (RequestId, Vec<Pulse>, Vec<Pulse>) {
    let (mut id, mut about, mut beats) = (None, Vec::new(), Vec::new());
    while let Some(pulse) = pulses.next().await {
        match (&pulse, id) {
            (Pulse::Beat { .. }, _) => beats.push(pulse),
            (Pulse::Started { id: started }, None) => {
                id = Some(*started);
                about.push(pulse);
            }
            (Pulse::Finished { id: done, .. }, Some(mine)) if *done == mine => {
                about.push(pulse);
                break;
            }
            (_, Some(mine)) if pulse.id() == Some(mine) => about.push(pulse),
            _ => {}
        }
    }
    (id.expect("a request started"), about, beats)
}

fn outcome(about: &[Pulse]) -> String {
    match about.last() {
        Some(Pulse::Finished {
            outcome, elapsed, ..
        }) => format!("finished {outcome} after {} ms", elapsed.as_millis()),
        _ => "not finished".into(),
    }
}

pub(crate) async fn run() -> Result<Section, BoxError> {
    let mut section = Section::new(
        "Heartbeat",
        "Pulses per request and per body frame, keep-alive frames on quiet SSE streams, \
         a stall watchdog (300 ms) that cuts silent work, health from the monitor",
    );
    let monitor = Monitor::builder()
        .stall(STALL)
        .interval(INTERVAL)
        .unhealthy_after(2.try_into()?)
        .build();
    let mut pulses = monitor.subscribe();

    let app = Router::new()
        .route("/events", get(events))
        .route("/stuck", get(stuck))
        .route("/hang", get(hang))
        .route("/busy", get(|| async { StatusCode::TOO_MANY_REQUESTS }))
        .layer(
            tower::ServiceBuilder::new()
                .layer(HandleErrorLayer::new(to_status))
                .layer(KeepAliveLayer::sse(KEEP_ALIVE))
                .layer(monitor.layer()),
        )
        .route("/healthz", health::route(monitor.clone()));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();

    // 1. A healthy stream: each event is a progress pulse.
    let read = fetch(&client, addr, "/events").await?;
    let (id, about, _) = follow(&mut pulses).await;
    let progress = about
        .iter()
        .filter(|p| matches!(p, Pulse::Progress { .. }))
        .count();
    section.row(
        format!("GET /events: 3 SSE events, 50 ms apart ({id})"),
        format!(
            "{} {} events; pulses: started, {progress} progress, {}",
            read.status.as_u16(),
            read.data,
            outcome(&about)
        ),
    );

    // 2. A stream whose producer goes quiet: keep-alives, then the watchdog cuts it.
    let read = fetch(&client, addr, "/stuck").await?;
    let (id, about, beats) = follow(&mut pulses).await;
    section.row(
        format!("GET /stuck: 1 event, then silence ({id})"),
        format!(
            "{} event, {} keep-alive frames in the silence, then cut after {} ms ({})",
            read.data,
            read.keep_alives,
            read.took.as_millis(),
            read.cut.as_deref().unwrap_or("ended cleanly: unexpected")
        ),
    );
    let last_beat = match beats.last() {
        Some(Pulse::Beat {
            in_flight,
            longest_idle: Some(idle),
        }) => format!("{in_flight} in flight, idle {} ms", idle.as_millis()),
        Some(other) => other.to_string(),
        None => "none".into(),
    };
    section.row(
        "  the server's view of it",
        format!(
            "{}; {} interval beats meanwhile, the last: {last_beat}",
            outcome(&about),
            beats.len(),
        ),
    );

    // 3. A handler that never answers: 503 with the stalled error.
    let start = Instant::now();
    let response = client.get(format!("http://{addr}/hang").parse()?).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    let (id, about, _) = follow(&mut pulses).await;
    section.row(
        format!("GET /hang: never answers ({id})"),
        format!(
            "{} \"{}\" after {} ms; {}",
            status.as_u16(),
            String::from_utf8_lossy(&body),
            start.elapsed().as_millis(),
            outcome(&about)
        ),
    );

    // 4. A refusal: counted as refused, not a failure of the service.
    let response = client.get(format!("http://{addr}/busy").parse()?).await?;
    let status = response.status();
    response.into_body().collect().await?;
    let (id, about, _) = follow(&mut pulses).await;
    section.row(
        format!("GET /busy: a handler saying 429 ({id})"),
        format!(
            "{}; {}: a limit saying no is not a failure (a 5xx would be)",
            status.as_u16(),
            outcome(&about)
        ),
    );

    // 5. Two stalls in a row: the health probe says so.
    let response = client
        .get(format!("http://{addr}/healthz").parse()?)
        .await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    section.row(
        "GET /healthz after two stalls",
        format!("{} {}", status.as_u16(), String::from_utf8_lossy(&body)),
    );
    let counts = monitor.counts();
    section.row(
        "monitor counts",
        format!(
            "started {}, ok {}, stalled {}, refused {}, in flight {}; subscriber missed {} pulses",
            counts.started(),
            counts.of(Outcome::Ok),
            counts.stalled(),
            counts.refused(),
            counts.in_flight(),
            pulses.missed()
        ),
    );

    server.abort();
    Ok(section)
}
