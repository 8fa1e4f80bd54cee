//! The steward over a real axum server on loopback: a worker that stops
//! answering is replaced, callers get `503 stalled` meanwhile instead of
//! hanging, the next requests succeed, and the old worker is cleaned up.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use atscale::core::{BoxError, Kind};
use atscale::heartbeat::Steward;
use axum::Router;
use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::http::{Request, Response, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder};

type Job = oneshot::Sender<String>;

/// A handle to a worker task (the "ward"): requests go to it over a channel.
/// Worker 0 breaks after two jobs: it keeps taking jobs but never answers.
#[derive(Clone)]
struct Worker {
    jobs: mpsc::UnboundedSender<Job>,
}

fn start_worker(n: u64) -> (Worker, JoinHandle<()>) {
    let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
    let task = tokio::spawn(async move {
        let mut done = 0;
        let mut unanswered = Vec::new();
        // ends when every handle (the steward's instance) is gone
        while let Some(reply) = rx.recv().await {
            if n == 0 && done == 2 {
                unanswered.push(reply); // wedged
                continue;
            }
            done += 1;
            let _ = reply.send(format!("worker {n}: job {done}"));
        }
    });
    (Worker { jobs }, task)
}

impl Service<Request<Body>> for Worker {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<Body>) -> Self::Future {
        let (reply, answer) = oneshot::channel();
        let sent = self.jobs.send(reply);
        Box::pin(async move {
            sent.map_err(|_| "worker gone")?;
            let text = answer.await.map_err(|_| "worker dropped the job")?;
            Ok(Response::new(Full::new(Bytes::from(text))))
        })
    }
}

async fn to_status(err: BoxError) -> (StatusCode, String) {
    (Kind::of(&*err).http_status(), err.to_string())
}

async fn get(addr: SocketAddr) -> (StatusCode, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = client
        .get(format!("http://{addr}/work").parse().unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_stops_answering_is_replaced_and_the_next_requests_succeed() {
    let (tasks_tx, mut tasks) = mpsc::unbounded_channel::<JoinHandle<()>>();
    let built = Arc::new(AtomicU64::new(0));
    let steward = Steward::builder(move || {
        let (worker, task) = start_worker(built.fetch_add(1, Ordering::SeqCst));
        tasks_tx.send(task).unwrap();
        worker
    })
    .stall(Duration::from_secs(1))
    .failures(2.try_into().unwrap())
    .build();
    let restarts = {
        let steward = steward.clone();
        move || steward.restarts()
    };
    let router = Router::new().route_service(
        "/work",
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(to_status))
            .service(steward),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let first_worker = tasks.recv().await.unwrap();

    assert_eq!(get(addr).await, (StatusCode::OK, "worker 0: job 1".into()));
    assert_eq!(get(addr).await, (StatusCode::OK, "worker 0: job 2".into()));

    // worker 0 is wedged: callers are cut at the stall limit, not left hanging
    for _ in 0..2 {
        let start = Instant::now();
        let (status, body) = get(addr).await;
        assert_eq!(
            (status, body.as_str()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "stalled: no progress for 1s"
            )
        );
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }
    assert_eq!(restarts(), 1, "two failures in a row: rebuilt");

    assert_eq!(get(addr).await, (StatusCode::OK, "worker 1: job 1".into()));
    assert_eq!(get(addr).await, (StatusCode::OK, "worker 1: job 2".into()));
    assert_eq!(restarts(), 1);

    // nothing holds the old instance any more: its worker task has ended
    first_worker.await.unwrap();
    let _second_worker = tasks.recv().await.unwrap();
}
