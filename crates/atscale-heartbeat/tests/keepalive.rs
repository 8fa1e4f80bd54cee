//! The keep-alive body and layer.

use std::convert::Infallible;
use std::time::Duration;

use atscale_heartbeat::{KeepAliveBody, KeepAliveLayer, Monitor};
use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tower::{ServiceBuilder, ServiceExt, service_fn};

type Chunks = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

fn chunks() -> (mpsc::Sender<Result<Frame<Bytes>, Infallible>>, Chunks) {
    let (tx, rx) = mpsc::channel(4);
    (tx, StreamBody::new(ReceiverStream::new(rx)))
}

/// Reads `body` to its end, noting when each frame arrived (in ms since `start`).
async fn read_all<B>(body: B, start: Instant) -> (Vec<(u64, Bytes)>, Option<String>)
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    let mut seen = Vec::new();
    loop {
        match body.frame().await {
            Some(Ok(frame)) => seen.push((
                start.elapsed().as_millis() as u64,
                frame.into_data().unwrap(),
            )),
            Some(Err(err)) => return (seen, Some(err.to_string())),
            None => return (seen, None),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn quiet_streams_get_keep_alive_frames_and_real_frames_reset_the_clock() {
    let (tx, body) = chunks();
    let start = Instant::now();
    let body = KeepAliveBody::new(body, Duration::from_secs(1), Bytes::from_static(b":\n\n"));
    let reader = tokio::spawn(read_all(body, start));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    tx.send(Ok(Frame::data(Bytes::from("data: x\n\n"))))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(tx);
    let (seen, err) = reader.await.unwrap();
    assert_eq!(err, None);
    let expected: Vec<(u64, Bytes)> = vec![
        (1000, Bytes::from(":\n\n")),
        (2000, Bytes::from(":\n\n")),
        (2500, Bytes::from("data: x\n\n")),
        (3500, Bytes::from(":\n\n")),
    ];
    assert_eq!(seen, expected);
}

#[tokio::test(start_paused = true)]
async fn the_layer_wraps_every_response_and_outside_a_heartbeat_does_not_count_as_progress() {
    let monitor = Monitor::builder()
        .stall(Duration::from_millis(2500))
        .build();
    let (tx, body) = chunks();
    let body = std::sync::Mutex::new(Some(body));
    let svc = ServiceBuilder::new()
        .layer(KeepAliveLayer::sse(Duration::from_secs(1)))
        .layer(monitor.layer())
        .service(service_fn(move |_req: http::Request<()>| {
            let body = body.lock().unwrap().take().unwrap();
            async move { Ok::<_, Infallible>(http::Response::new(body)) }
        }));
    let start = Instant::now();
    let response = svc.oneshot(http::Request::new(())).await.unwrap();
    let (seen, err) = read_all(response.into_body(), start).await;
    // two keep-alives, then the watchdog cuts the silent producer at 2.5 s
    let times: Vec<u64> = seen.iter().map(|(t, _)| *t).collect();
    assert_eq!(times, [1000, 2000]);
    assert_eq!(err.as_deref(), Some("stalled: no progress for 2.5s"));
    assert!(tx.is_closed());
    assert_eq!(monitor.counts().stalled(), 1);
}

#[test]
#[should_panic(expected = "must not be zero")]
fn a_zero_interval_is_refused() {
    let _ = KeepAliveLayer::sse(Duration::ZERO);
}
