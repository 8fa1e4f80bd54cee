//! The Deadline layer on the paused clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use atscale_core::{BoxError, Context, DeadlineExceeded, Kind, MalformedDeadline, Origin, find};
use atscale_deadline::DeadlineLayer;
use http::{HeaderName, Request};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

const X_DEADLINE: HeaderName = HeaderName::from_static("x-deadline-ms");

/// An inner service that reports the context it saw, then waits for `release`.
fn seen_context(
    calls: Arc<AtomicUsize>,
) -> impl Service<Request<()>, Response = Context, Error = BoxError, Future: Send> + Clone {
    service_fn(move |req: Request<()>| {
        calls.fetch_add(1, Ordering::SeqCst);
        let from_extension = req.extensions().get::<Context>().cloned();
        async move {
            let current = Context::current().expect("task-local context in scope");
            let ext = from_extension.expect("context in extensions");
            assert_eq!(current.deadline(), ext.deadline());
            Ok::<_, BoxError>(current)
        }
    })
}

fn req() -> Request<()> {
    Request::new(())
}

#[tokio::test(start_paused = true)]
async fn slow_inner_future_is_cut_dropped_and_its_context_cancelled() {
    let (cx_tx, cx_rx) = oneshot::channel();
    let (dropped_tx, dropped_rx) = oneshot::channel::<()>();
    let cx_tx = std::sync::Mutex::new(Some(cx_tx));
    let dropped_tx = std::sync::Mutex::new(Some(dropped_tx));
    let svc = DeadlineLayer::new(Duration::from_millis(200)).layer(service_fn(
        move |_req: Request<()>| {
            let cx_tx = cx_tx.lock().unwrap().take().unwrap();
            let keep_alive = dropped_tx.lock().unwrap().take().unwrap();
            async move {
                cx_tx.send(Context::current().unwrap()).unwrap();
                let _keep = keep_alive;
                std::future::pending::<Result<(), BoxError>>().await
            }
        },
    ));
    let start = Instant::now();
    let call = tokio::spawn(svc.oneshot(req()));
    let cx = cx_rx.await.unwrap();
    assert!(!cx.is_cancelled());
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(200));
    let exceeded = find::<DeadlineExceeded>(&*err).expect("a DeadlineExceeded");
    assert_eq!(exceeded.budget(), Duration::from_millis(200));
    assert_eq!(exceeded.elapsed(), Duration::from_millis(200));
    assert_eq!(exceeded.origin(), Origin::Local);
    assert!(cx.is_cancelled(), "expiry cancels the request's context");
    assert!(dropped_rx.await.is_err(), "expiry drops the inner future");
}

#[tokio::test(start_paused = true)]
async fn an_expired_deadline_fails_fast_without_calling_the_inner_service() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = DeadlineLayer::server(Duration::from_secs(1)).layer(seen_context(calls.clone()));
    let req = Request::builder()
        .header("grpc-timeout", "0n")
        .body(())
        .unwrap();
    let err = svc.clone().oneshot(req).await.unwrap_err();
    assert_eq!(Kind::of(&*err), Kind::DeadlineExceeded);
    assert_eq!(
        find::<DeadlineExceeded>(&*err).unwrap().origin(),
        Origin::GrpcTimeout
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // Inherited in-process, already past.
    let parent = Context::new().with_budget(Duration::from_millis(10), Origin::Local);
    tokio::time::advance(Duration::from_millis(10)).await;
    let err = parent.scope(svc.oneshot(req_plain())).await.unwrap_err();
    let exceeded = find::<DeadlineExceeded>(&*err).unwrap();
    assert_eq!(exceeded.origin(), Origin::Parent);
    assert!(exceeded.is_inherited());
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

fn req_plain() -> Request<()> {
    req()
}

#[tokio::test(start_paused = true)]
async fn the_earliest_of_budget_parent_and_headers_wins() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = DeadlineLayer::server(Duration::from_secs(10))
        .with_header(X_DEADLINE)
        .layer(seen_context(calls.clone()));
    let cases = [
        (None, None, None, Duration::from_secs(10), Origin::Local),
        (
            Some("3S"),
            None,
            None,
            Duration::from_secs(3),
            Origin::GrpcTimeout,
        ),
        (
            Some("3S"),
            Some("2500"),
            None,
            Duration::from_millis(2500),
            Origin::Header,
        ),
        (
            Some("1S"),
            Some("2500"),
            None,
            Duration::from_secs(1),
            Origin::GrpcTimeout,
        ),
        (
            Some("1S"),
            None,
            Some(Duration::from_millis(400)),
            Duration::from_millis(400),
            Origin::Parent,
        ),
        (
            None,
            None,
            Some(Duration::from_secs(60)),
            Duration::from_secs(10),
            Origin::Local,
        ),
    ];
    for (grpc, header, parent, want, origin) in cases {
        let mut builder = Request::builder();
        if let Some(v) = grpc {
            builder = builder.header("grpc-timeout", v);
        }
        if let Some(v) = header {
            builder = builder.header(X_DEADLINE, v);
        }
        let mut req = builder.body(()).unwrap();
        if let Some(budget) = parent {
            req.extensions_mut()
                .insert(Context::new().with_budget(budget, Origin::Local));
        }
        let cx = svc.clone().oneshot(req).await.unwrap();
        let deadline = cx.deadline().unwrap();
        assert_eq!(deadline.remaining(), want, "{grpc:?} {header:?} {parent:?}");
        assert_eq!(deadline.budget(), want);
        assert_eq!(deadline.origin(), origin, "{grpc:?} {header:?} {parent:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn malformed_or_repeated_deadlines_are_bad_requests_and_call_nothing() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = DeadlineLayer::server(Duration::from_secs(10))
        .with_header(X_DEADLINE)
        .layer(seen_context(calls.clone()));
    let bad: [(&str, &[u8]); 6] = [
        ("grpc-timeout", b"123456789S"),
        ("grpc-timeout", b"5"),
        ("grpc-timeout", b"5d"),
        ("grpc-timeout", b"\xc3\xa9S"),
        ("x-deadline-ms", b"1e3"),
        ("x-deadline-ms", b"99999999999999999999"),
    ];
    for (name, value) in bad {
        let req = Request::builder()
            .header(name, http::HeaderValue::from_bytes(value).unwrap())
            .body(())
            .unwrap();
        let err = svc.clone().oneshot(req).await.unwrap_err();
        assert_eq!(Kind::of(&*err), Kind::BadRequest, "{name}: {value:?}");
        assert_eq!(find::<MalformedDeadline>(&*err).unwrap().header(), name);
    }
    let req = Request::builder()
        .header("grpc-timeout", "1S")
        .header("grpc-timeout", "1H")
        .body(())
        .unwrap();
    let err = svc.clone().oneshot(req).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "malformed grpc-timeout header: header repeated"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn in_process_layers_ignore_headers() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = DeadlineLayer::new(Duration::from_secs(10)).layer(seen_context(calls));
    let req = Request::builder()
        .header("grpc-timeout", "garbage")
        .body(())
        .unwrap();
    let cx = svc.oneshot(req).await.unwrap();
    assert_eq!(cx.deadline().unwrap().origin(), Origin::Local);
}

#[tokio::test(start_paused = true)]
async fn clients_write_the_remaining_budget() {
    let echo =
        service_fn(|req: Request<()>| async move { Ok::<_, BoxError>(req.headers().clone()) });
    let client = DeadlineLayer::client(Duration::from_secs(30))
        .with_header(X_DEADLINE)
        .layer(echo);

    // No parent: the client's own budget.
    let headers = client.clone().oneshot(req()).await.unwrap();
    assert_eq!(headers["grpc-timeout"], "30000000u");
    assert_eq!(headers[&X_DEADLINE], "30000");

    // Inside a request with 1.5 s left, 0.5 s after it started.
    let served = Context::new().with_budget(Duration::from_secs(2), Origin::GrpcTimeout);
    tokio::time::advance(Duration::from_millis(500)).await;
    let headers = served.scope(client.clone().oneshot(req())).await.unwrap();
    assert_eq!(headers["grpc-timeout"], "1500000u");
    assert_eq!(headers[&X_DEADLINE], "1500");

    // A grpc-timeout set by the caller on this request is respected and replaced.
    let req = Request::builder()
        .header("grpc-timeout", "20m")
        .body(())
        .unwrap();
    let headers = client.clone().oneshot(req).await.unwrap();
    assert_eq!(headers.get_all("grpc-timeout").iter().count(), 1);
    assert_eq!(headers["grpc-timeout"], "20000000n");
}

#[tokio::test(start_paused = true)]
async fn duration_max_only_inherits() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = DeadlineLayer::server(Duration::MAX).layer(seen_context(calls));
    let cx = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(cx.deadline(), None);
    let req = Request::builder()
        .header("grpc-timeout", "7S")
        .body(())
        .unwrap();
    let cx = svc.oneshot(req).await.unwrap();
    assert_eq!(cx.remaining(), Some(Duration::from_secs(7)));

    // A far-future grpc-timeout (99,999,999 hours) does not overflow.
    let client =
        DeadlineLayer::client(Duration::MAX).layer(service_fn(|req: Request<()>| async move {
            Ok::<_, BoxError>(req.headers().get("grpc-timeout").cloned())
        }));
    let served =
        Context::new().with_budget(Duration::from_secs(99_999_999 * 3600), Origin::GrpcTimeout);
    let sent = served.scope(client.oneshot(req_plain())).await.unwrap();
    assert_eq!(sent.unwrap(), "99999999H");
}

#[tokio::test(start_paused = true)]
async fn dropping_the_future_cancels_the_context_success_does_not() {
    let (cx_tx, mut cx_rx) = tokio::sync::mpsc::unbounded_channel();
    let gate = Arc::new(tokio::sync::Notify::new());
    let svc = DeadlineLayer::new(Duration::from_secs(5)).layer(service_fn({
        let gate = gate.clone();
        move |_req: Request<()>| {
            let gate = gate.clone();
            let cx_tx = cx_tx.clone();
            async move {
                cx_tx.send(Context::current().unwrap()).unwrap();
                gate.notified().await;
                Ok::<_, BoxError>(())
            }
        }
    }));

    // Dropped mid-flight: cancelled.
    let mut fut = Box::pin(svc.clone().oneshot(req()));
    assert!(futures_poll_once(&mut fut).await.is_none());
    let cx = cx_rx.recv().await.unwrap();
    drop(fut);
    assert!(cx.is_cancelled());

    // Completed: left alone for a streaming body.
    let call = tokio::spawn(svc.clone().oneshot(req()));
    let cx = cx_rx.recv().await.unwrap();
    gate.notify_one();
    call.await.unwrap().unwrap();
    assert!(!cx.is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn inner_errors_pass_through_and_cancel_the_context() {
    #[derive(Debug, thiserror::Error)]
    #[error("backend said no")]
    struct No;
    let (cx_tx, cx_rx) = oneshot::channel();
    let cx_tx = std::sync::Mutex::new(Some(cx_tx));
    let svc =
        DeadlineLayer::new(Duration::from_secs(5)).layer(service_fn(move |_req: Request<()>| {
            let tx = cx_tx.lock().unwrap().take().unwrap();
            async move {
                tx.send(Context::current().unwrap()).unwrap();
                Err::<(), _>(No)
            }
        }));
    let err = svc.oneshot(req()).await.unwrap_err();
    assert!(err.is::<No>());
    assert!(cx_rx.await.unwrap().is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn an_inner_failure_at_the_deadline_is_the_deadline() {
    // An inner service that enforces the same deadline and fails first,
    // as tonic's Channel does with the grpc-timeout the client layer wrote.
    #[derive(Debug, thiserror::Error)]
    #[error("timeout expired")]
    struct InnerTimeout;
    let svc = DeadlineLayer::new(Duration::from_millis(100)).layer(service_fn(
        |_req: Request<()>| async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Err::<(), _>(InnerTimeout)
        },
    ));
    let err = svc.oneshot(req()).await.unwrap_err();
    let exceeded = find::<DeadlineExceeded>(&*err).expect("reported as the deadline");
    assert_eq!(exceeded.budget(), Duration::from_millis(100));

    // Before the deadline, the inner error is the inner error.
    let svc = DeadlineLayer::new(Duration::from_millis(100)).layer(service_fn(
        |_req: Request<()>| async {
            tokio::time::sleep(Duration::from_millis(99)).await;
            Err::<(), _>(InnerTimeout)
        },
    ));
    let err = svc.oneshot(req_plain()).await.unwrap_err();
    assert!(err.is::<InnerTimeout>());
}

#[tokio::test(start_paused = true)]
async fn expiry_cancels_a_child_not_the_parent() {
    let parent = Context::new();
    let svc =
        DeadlineLayer::new(Duration::from_millis(50)).layer(service_fn(|_req: Request<()>| {
            std::future::pending::<Result<(), BoxError>>()
        }));
    let mut req = req();
    req.extensions_mut().insert(parent.clone());
    svc.oneshot(req).await.unwrap_err();
    assert!(!parent.is_cancelled());

    // But the parent's cancellation reaches the request.
    let (cx_tx, cx_rx) = oneshot::channel();
    let cx_tx = std::sync::Mutex::new(Some(cx_tx));
    let svc =
        DeadlineLayer::new(Duration::from_secs(50)).layer(service_fn(move |_req: Request<()>| {
            let tx = cx_tx.lock().unwrap().take().unwrap();
            async move {
                tx.send(Context::current().unwrap()).unwrap();
                std::future::pending::<Result<(), BoxError>>().await
            }
        }));
    let mut req = req_plain();
    req.extensions_mut().insert(parent.clone());
    let _call = tokio::spawn(svc.oneshot(req));
    let child = cx_rx.await.unwrap();
    parent.cancel();
    assert!(child.is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn poll_ready_delegates() {
    let (mock, mut handle) = tower_test::mock::pair::<Request<()>, ()>();
    let mut svc = DeadlineLayer::new(Duration::from_secs(1)).layer(mock);
    handle.allow(0);
    let mut ready = tokio_test_ready(&mut svc);
    assert!(futures_poll_once(&mut ready).await.is_none());
    handle.allow(1);
    ready.await.unwrap();
}

fn tokio_test_ready<S: Service<Request<()>>>(
    svc: &mut S,
) -> std::pin::Pin<Box<tower::util::Ready<'_, S, Request<()>>>> {
    Box::pin(svc.ready())
}

/// Polls a future once; `Some` if it was ready.
async fn futures_poll_once<F: std::future::Future + Unpin>(fut: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| match std::pin::Pin::new(&mut *fut).poll(cx) {
        std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await
}

#[test]
fn layer_service_and_future_are_send_sync_clone() {
    fn send_sync_clone<T: Send + Sync + Clone>() {}
    fn send_sync<T: Send + Sync>() {}
    send_sync_clone::<DeadlineLayer>();
    send_sync_clone::<
        atscale_deadline::Deadline<tower::util::BoxCloneSyncService<Request<()>, (), BoxError>>,
    >();
    send_sync::<atscale_deadline::future::ResponseFuture<std::future::Ready<Result<(), BoxError>>>>(
    );
}
