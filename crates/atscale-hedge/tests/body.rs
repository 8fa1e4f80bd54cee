//! Buffering request bodies for replay: within the limit they replay and are
//! hedged; past it, failing, or lying about their length they are sent once,
//! intact.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use atscale_core::BoxError;
use atscale_hedge::{Budget, BufferBodyLayer, BufferedBody, Delay, HedgeLayer, ReplayBody};
use bytes::Bytes;
use http::{HeaderMap, Method};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};

/// A streaming body: frames handed out one by one, optionally an error.
struct Chunks {
    frames: VecDeque<Result<Frame<Bytes>, String>>,
    hint: Option<u64>,
}

impl Chunks {
    fn new(parts: &[&'static str]) -> Self {
        Chunks {
            frames: parts
                .iter()
                .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
                .collect(),
            hint: None,
        }
    }

    fn then_fail(mut self) -> Self {
        self.frames.push_back(Err("connection reset".into()));
        self
    }

    fn then_trailers(mut self) -> Self {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        self.frames.push_back(Ok(Frame::trailers(t)));
        self
    }

    fn claiming(mut self, len: u64) -> Self {
        self.hint = Some(len);
        self
    }
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = String;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, String>>> {
        Poll::Ready(self.frames.pop_front())
    }

    fn size_hint(&self) -> SizeHint {
        match self.hint {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// Everything a body yields: the data, the trailers, and the error if any.
async fn drain<B: Body<Data = Bytes>>(body: B) -> (String, Option<HeaderMap>, Option<String>)
where
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    let (mut data, mut trailers, mut error) = (String::new(), None, None);
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => match f.into_data() {
                Ok(d) => data.push_str(std::str::from_utf8(&d).unwrap()),
                Err(f) => trailers = f.into_trailers().ok(),
            },
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    (data, trailers, error)
}

type Seen = Arc<Mutex<Vec<(String, Option<String>, bool)>>>;

/// A stack BufferBody → Hedge (fixed 10 ms, unlimited) → a backend whose
/// first call is slow; the backend logs each body it got.
fn stack(
    limit: usize,
    non_idempotent: bool,
) -> (
    impl tower::Service<http::Request<Chunks>, Response = String, Error = BoxError, Future = impl Send>
    + Clone,
    Seen,
) {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let backend = service_fn(move |req: http::Request<BufferedBody<Chunks>>| {
        let log = log.clone();
        async move {
            let first = log.lock().unwrap().is_empty();
            let replayable = req.body().is_replayable();
            let (data, _, error) = drain(req.into_body()).await;
            log.lock()
                .unwrap()
                .push((data.clone(), error.clone(), replayable));
            tokio::time::sleep(Duration::from_millis(if first { 100 } else { 5 })).await;
            match error {
                Some(e) => Err::<String, BoxError>(e.into()),
                None => Ok(data),
            }
        }
    });
    let hedge = HedgeLayer::builder()
        .delay(Delay::fixed(Duration::from_millis(10)))
        .budget(Budget::unlimited())
        .non_idempotent(non_idempotent)
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(BufferBodyLayer::new(limit).non_idempotent(non_idempotent))
        .layer(hedge)
        .service(backend);
    (svc, seen)
}

fn request(method: Method, body: Chunks) -> http::Request<Chunks> {
    http::Request::builder()
        .method(method)
        .uri("/")
        .body(body)
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_body_within_the_limit_is_replayed_by_the_hedge() {
    let (svc, seen) = stack(16, false);
    let out = svc
        .oneshot(request(Method::PUT, Chunks::new(&["hel", "lo"])))
        .await
        .unwrap();
    assert_eq!(out, "hello");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "primary and hedge");
    assert!(
        seen.iter()
            .all(|(d, e, r)| d == "hello" && e.is_none() && *r)
    );
}

#[tokio::test(start_paused = true)]
async fn a_body_past_the_limit_is_sent_once_and_whole() {
    let (svc, seen) = stack(8, false);
    let out = svc
        .oneshot(request(
            Method::PUT,
            Chunks::new(&["0123", "4567", "89", "ab"]),
        ))
        .await
        .unwrap();
    assert_eq!(out, "0123456789ab");
    assert_eq!(
        *seen.lock().unwrap(),
        [("0123456789ab".to_string(), None, false)]
    );
}

#[tokio::test(start_paused = true)]
async fn a_size_hint_past_the_limit_is_not_buffered_at_all() {
    let (svc, seen) = stack(8, false);
    let out = svc
        .oneshot(request(
            Method::GET,
            Chunks::new(&["0123456789"]).claiming(10),
        ))
        .await
        .unwrap();
    assert_eq!(out, "0123456789");
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_lying_content_length_is_sent_once_and_intact() {
    let (svc, seen) = stack(64, false);
    let mut req = request(Method::PUT, Chunks::new(&["more than four"]));
    req.headers_mut()
        .insert(http::header::CONTENT_LENGTH, "4".parse().unwrap());
    let out = svc.oneshot(req).await.unwrap();
    assert_eq!(out, "more than four");
    assert_eq!(
        *seen.lock().unwrap(),
        [("more than four".to_string(), None, false)]
    );
}

#[tokio::test(start_paused = true)]
async fn a_body_that_fails_while_buffered_is_passed_on_with_its_error() {
    let (svc, seen) = stack(64, false);
    let err = svc
        .oneshot(request(
            Method::PUT,
            Chunks::new(&["par", "tial"]).then_fail(),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "connection reset");
    assert_eq!(
        *seen.lock().unwrap(),
        [(
            "partial".to_string(),
            Some("connection reset".to_string()),
            false
        )]
    );
}

#[tokio::test(start_paused = true)]
async fn non_idempotent_methods_are_neither_buffered_nor_hedged_unless_opted_in() {
    let (svc, seen) = stack(64, false);
    let out = svc
        .oneshot(request(Method::POST, Chunks::new(&["once"])))
        .await
        .unwrap();
    assert_eq!(out, "once");
    assert_eq!(*seen.lock().unwrap(), [("once".to_string(), None, false)]);

    let (svc, seen) = stack(64, true);
    let out = svc
        .oneshot(request(Method::POST, Chunks::new(&["twice"])))
        .await
        .unwrap();
    assert_eq!(out, "twice");
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn trailers_are_kept_and_replayed() {
    let layer = BufferBodyLayer::new(64);
    let svc = layer.layer(service_fn(
        |req: http::Request<BufferedBody<Chunks>>| async move {
            let copy = req.body().replay_body().expect("complete and honest");
            let a = drain(req.into_body()).await;
            let b = drain(copy).await;
            Ok::<_, BoxError>((a, b))
        },
    ));
    let (a, b) = svc
        .oneshot(request(
            Method::GET,
            Chunks::new(&["x", "y"]).then_trailers(),
        ))
        .await
        .unwrap();
    assert_eq!(a.0, "xy");
    assert_eq!(a.1.as_ref().unwrap()["grpc-status"], "0");
    assert_eq!((a.0, a.1), (b.0, b.1));
}

#[test]
fn bodies_report_their_size_and_end() {
    let body: BufferedBody<Chunks> = BufferedBody::from_bytes(Bytes::from_static(b"abc"));
    assert_eq!(body.size_hint().exact(), Some(3));
    assert!(!body.is_end_stream());
    let empty: BufferedBody<Chunks> = BufferedBody::from_bytes(Bytes::new());
    assert!(empty.is_end_stream());
}
