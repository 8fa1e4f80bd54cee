//! The overload layer in a real axum server on loopback, inside the server
//! stack (ErrorEnrich → Deadline → Overload): over the limit a request
//! queues, beyond the queue it is refused with a 503, `Retry-After` and a
//! problem+json body, sheddable requests go first, and queued ones are served
//! once a slot frees.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use atscale::ServiceBuilderExt;
use atscale::core::{BoxError, Clock};
use atscale::deadline::DeadlineLayer;
use atscale::error::ErrorEnrichLayer;
use atscale::overload::OverloadLayer;
use atscale::overload::limit::Vegas;
use axum::Router;
use axum::routing::get;
use http::HeaderName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::timeout;
use tower::ServiceBuilder;

const BOUND: Duration = Duration::from_secs(10);

/// One HTTP/1.1 GET on a fresh connection; the raw answer.
async fn http_get(server: SocketAddr, headers: &str) -> Result<String, BoxError> {
    let mut stream = TcpStream::connect(server).await?;
    let req = format!("GET / HTTP/1.1\r\nhost: test\r\n{headers}connection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    Ok(answer)
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    timeout(BOUND, async {
        while !cond() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

#[tokio::test]
async fn over_the_limit_requests_queue_then_are_refused_with_503_and_retry_after()
-> Result<(), BoxError> {
    let overload = OverloadLayer::builder()
        .algorithm(Vegas::new())
        .min_limit(2)
        .max_limit(2)
        .initial_limit(2)
        .queue_capacity(1)
        .clock(Clock::tokio())
        .build()?;
    let admission = overload.admission();
    // The handler holds its slot until the test opens the gate.
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let router = Router::new()
        .route(
            "/",
            get({
                let gate = gate.clone();
                move || async move {
                    let _ = started_tx.send(());
                    gate.acquire().await.unwrap().forget();
                    "done"
                }
            }),
        )
        .layer(
            ServiceBuilder::new()
                .enrich_errors(ErrorEnrichLayer::new("orders"))
                .deadline(
                    DeadlineLayer::server(Duration::from_secs(30))
                        .with_header(HeaderName::from_static("x-deadline-ms")),
                )
                .overload(overload),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let server = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router).await });

    // Two run...
    let running: Vec<_> = (0..2).map(|_| tokio::spawn(http_get(server, ""))).collect();
    for _ in 0..2 {
        timeout(BOUND, started.recv()).await?.unwrap();
    }
    assert_eq!(admission.in_flight(), 2);
    // ...one waits...
    let queued = tokio::spawn(http_get(server, ""));
    until("the third request queues", || admission.queue_depth() == 1).await;
    // ...a sheddable one is refused first (nothing below it to evict)...
    let shed = http_get(server, "x-criticality: sheddable\r\n").await?;
    // ...and so is the next: the queue is full.
    let refused = http_get(server, "").await?;
    for answer in [&shed, &refused] {
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("\r\nretry-after: 1\r\n"),
            "{answer}"
        );
        assert!(answer.contains("application/problem+json"), "{answer}");
        assert!(answer.contains(r#""code":"overloaded""#), "{answer}");
    }
    assert_eq!(started.try_recv().ok(), None, "no refused request ran");

    // A slot frees: the queued request is served, then everyone finishes.
    gate.add_permits(3);
    for call in running.into_iter().chain([queued]) {
        let answer = timeout(BOUND, call).await???;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("done"), "{answer}");
    }
    assert_eq!((admission.in_flight(), admission.queue_depth()), (0, 0));
    Ok(())
}
