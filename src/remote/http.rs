//! The HTTP side: error answers (and their problem+json documents) as
//! [`RemoteFailure`]s.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, ready};
use std::time::{Duration, Instant};

use atscale_core::{BoxError, Kind};
use bytes::Buf;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::{Answer, Implied, RemoteFailure, Said};

/// The most of an error answer's body read for its problem document.
const PROBLEM_LIMIT: usize = 16 * 1024;

impl RemoteFailure {
    /// Reads an HTTP error answer: its `status`, its `Retry-After` header,
    /// and the problem+json document `problem` when the server sent one;
    /// `elapsed` is how long the call took.
    fn from_http(
        status: StatusCode,
        headers: &HeaderMap,
        problem: Option<&serde_json::Value>,
        elapsed: Duration,
    ) -> Self {
        let member = |key: &str| problem.and_then(|p| p.get(key)).and_then(|v| v.as_str());
        // The kind an atscale server names in `code`; another server's
        // problem `type` may end with it.
        let named = member("code").or_else(|| {
            member("type")
                .filter(|t| *t != "about:blank")
                .and_then(|t| t.rsplit('/').next())
        });
        let retry_after = headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .or_else(|| {
                problem
                    .and_then(|p| p.get("retry_after"))
                    .and_then(|v| v.as_u64())
            })
            .map(Duration::from_secs);
        let said = Said {
            implied: match status {
                StatusCode::GATEWAY_TIMEOUT => Implied::Kind(Kind::DeadlineExceeded),
                StatusCode::TOO_MANY_REQUESTS => Implied::Kind(Kind::RateLimited),
                // RFC 9110: a 503 is a temporary overload (or maintenance);
                // one that names nothing is read as that, so that it keeps
                // its `Retry-After` and a retry policy sees a refusal.
                StatusCode::SERVICE_UNAVAILABLE if named.is_none() => {
                    Implied::Kind(Kind::Overloaded)
                }
                StatusCode::SERVICE_UNAVAILABLE => Implied::Unavailable,
                _ => Implied::Nothing,
            },
            named,
            retry_after,
            deadline_origin: member("deadline_origin"),
        };
        RemoteFailure {
            service: member("service").map(str::to_owned),
            layer: member("layer").map(str::to_owned),
            id: member("error_id").map(str::to_owned),
            answer: Answer::Http {
                status,
                kind: said.vocabulary(elapsed),
            },
        }
    }
}

/// Turns HTTP error answers (429 and 5xx) into [`RemoteFailure`] errors,
/// and refused connections to a named dependency into
/// [`Unreachable`](atscale_core::Unreachable); see the [module docs](super).
#[derive(Clone, Debug, Default)]
pub struct HttpErrorsLayer {
    dependency: Option<Arc<str>>,
}

impl HttpErrorsLayer {
    /// The layer, for a dependency without a name: a refused connection
    /// is still [`Kind::Unreachable`] (its `std::io::Error` says so), but
    /// answers do not say which dependency it was.
    pub const fn new() -> Self {
        HttpErrorsLayer { dependency: None }
    }

    /// Names the dependency `name` (`inventory`) in
    /// [`Unreachable`](atscale_core::Unreachable) errors: the name (never
    /// an address) is in the user-safe message of the 503.
    #[must_use]
    pub fn dependency(mut self, name: impl Into<Arc<str>>) -> Self {
        self.dependency = Some(name.into());
        self
    }
}

impl<S> Layer<S> for HttpErrorsLayer {
    type Service = HttpErrors<S>;

    fn layer(&self, inner: S) -> HttpErrors<S> {
        HttpErrors {
            inner,
            dependency: self.dependency.clone(),
        }
    }
}

/// Fails a call answered with 429 or a 5xx status with a
/// [`RemoteFailure`], after reading the answer's problem+json document (up
/// to 16 KiB); made by [`HttpErrorsLayer`].
///
/// Other answers, 4xx included (a 404 is an answer the caller's code
/// handles), pass through untouched. A transport error showing that the
/// request never reached the server (a refused connection, a DNS failure)
/// becomes [`Unreachable`](atscale_core::Unreachable) naming the
/// dependency, when the layer has its name; any other transport error
/// passes as it is.
///
/// # Backpressure
///
/// `poll_ready` delegates to the inner service.
#[derive(Clone, Debug)]
pub struct HttpErrors<S> {
    inner: S,
    dependency: Option<Arc<str>>,
}

impl<S> HttpErrors<S> {
    atscale_core::inner_accessors!();
}

impl<S, ReqB, ResB> Service<http::Request<ReqB>> for HttpErrors<S>
where
    S: Service<http::Request<ReqB>, Response = http::Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: Body,
{
    type Response = http::Response<ResB>;
    type Error = BoxError;
    type Future = HttpErrorsFuture<S::Future, ResB>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        HttpErrorsFuture {
            state: State::Waiting {
                inner: self.inner.call(req),
            },
            started: Instant::now(),
            dependency: self.dependency.clone(),
        }
    }
}

pin_project! {
    /// The response future of [`HttpErrors`].
    #[derive(Debug)]
    pub struct HttpErrorsFuture<F, B> {
        #[pin]
        state: State<F, B>,
        started: Instant,
        dependency: Option<Arc<str>>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F, B> {
        Waiting { #[pin] inner: F },
        // An error answer: reading its problem document.
        Reading {
            #[pin]
            body: B,
            status: StatusCode,
            headers: HeaderMap,
            read: Vec<u8>,
        },
    }
}

impl<F, ResB, E> Future for HttpErrorsFuture<F, ResB>
where
    F: Future<Output = Result<http::Response<ResB>, E>>,
    E: Into<BoxError>,
    ResB: Body,
{
    type Output = Result<http::Response<ResB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Waiting { inner } => {
                    let res = match ready!(inner.poll(cx)) {
                        Ok(res) => res,
                        Err(err) => {
                            let err = err.into();
                            return Poll::Ready(Err(match this.dependency {
                                Some(name) => super::unreachable(err, name),
                                None => err,
                            }));
                        }
                    };
                    let status = res.status();
                    if status != StatusCode::TOO_MANY_REQUESTS && !status.is_server_error() {
                        return Poll::Ready(Ok(res));
                    }
                    let (parts, body) = res.into_parts();
                    if !is_problem(&parts.headers) {
                        let failure = RemoteFailure::from_http(
                            status,
                            &parts.headers,
                            None,
                            this.started.elapsed(),
                        );
                        return Poll::Ready(Err(Box::new(failure)));
                    }
                    this.state.set(State::Reading {
                        body,
                        status,
                        headers: parts.headers,
                        read: Vec::new(),
                    });
                }
                StateProj::Reading {
                    mut body,
                    status,
                    headers,
                    read,
                } => {
                    // Read to the end, the limit, or a failure of the body:
                    // a document cut short just says less.
                    while read.len() < PROBLEM_LIMIT {
                        match ready!(body.as_mut().poll_frame(cx)) {
                            Some(Ok(frame)) => {
                                if let Ok(mut data) = frame.into_data() {
                                    while data.has_remaining() && read.len() < PROBLEM_LIMIT {
                                        let chunk = data.chunk();
                                        let n = chunk.len().min(PROBLEM_LIMIT - read.len());
                                        read.extend_from_slice(&chunk[..n]);
                                        data.advance(n);
                                    }
                                }
                            }
                            Some(Err(_)) | None => break,
                        }
                    }
                    let problem = serde_json::from_slice::<serde_json::Value>(read).ok();
                    let failure = RemoteFailure::from_http(
                        *status,
                        headers,
                        problem.as_ref().filter(|p| p.is_object()),
                        this.started.elapsed(),
                    );
                    return Poll::Ready(Err(Box::new(failure)));
                }
            }
        }
    }
}

fn is_problem(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            let v = v.trim();
            v.eq_ignore_ascii_case("application/problem+json")
                || v.eq_ignore_ascii_case("application/json")
        })
}

#[cfg(test)]
mod tests {
    use atscale_core::{DeadlineExceeded, Origin, Overloaded, RateLimited, Unreachable};
    use bytes::Bytes;
    use http_body_util::Full;
    use tower::{ServiceExt, service_fn};

    use super::*;

    fn answer(
        status: u16,
        retry_after: Option<&str>,
        problem: Option<&str>,
    ) -> http::Response<Full<Bytes>> {
        let mut res = http::Response::builder().status(status);
        if let Some(after) = retry_after {
            res = res.header(RETRY_AFTER, after);
        }
        if problem.is_some() {
            res = res.header(CONTENT_TYPE, "application/problem+json");
        }
        res.body(Full::new(Bytes::from(problem.unwrap_or("").to_owned())))
            .unwrap()
    }

    async fn call(
        res: http::Response<Full<Bytes>>,
    ) -> Result<http::Response<Full<Bytes>>, BoxError> {
        let transport = service_fn(move |_req: http::Request<()>| {
            let res = http::Response::from_parts(res.clone().into_parts().0, res.body().clone());
            async move { Ok::<_, BoxError>(res) }
        });
        HttpErrorsLayer::new()
            .layer(transport)
            .oneshot(
                http::Request::get("http://backend:8080/x")
                    .body(())
                    .unwrap(),
            )
            .await
    }

    fn failure(err: &BoxError) -> &RemoteFailure {
        atscale_core::find::<RemoteFailure>(&**err).expect("a remote failure")
    }

    #[tokio::test]
    async fn a_429_keeps_its_retry_after_service_and_id_but_not_the_text() {
        let problem = r#"{"type":"about:blank","status":429,"detail":"secret downstream text",
            "code":"rate_limited","error_id":"0123456789abcdef0123456789abcdef","service":"backend","retry_after":7}"#;
        let err = call(answer(429, Some("3"), Some(problem)))
            .await
            .unwrap_err();
        let failure = failure(&err);
        assert_eq!(failure.kind(), Some(Kind::RateLimited));
        // The header wins over the member.
        let limited = atscale_core::find::<RateLimited>(&*err).unwrap();
        assert_eq!(limited.retry_after(), Duration::from_secs(3));
        assert_eq!(failure.service(), Some("backend"));
        assert_eq!(failure.error_id(), Some("0123456789abcdef0123456789abcdef"));
        assert_eq!(failure.http_status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            failure.to_string(),
            "backend answered 429 Too Many Requests (error id 0123456789abcdef0123456789abcdef)"
        );
        for e in atscale_core::chain(&*err) {
            assert!(!e.to_string().contains("secret"), "{e}");
        }
        // Without a header, the member; without either, 1 s.
        let err = call(answer(429, None, Some(problem))).await.unwrap_err();
        assert_eq!(
            atscale_core::retry_after(&*err),
            Some(Duration::from_secs(7))
        );
        let err = call(answer(429, None, None)).await.unwrap_err();
        assert_eq!(
            atscale_core::retry_after(&*err),
            Some(Duration::from_secs(1))
        );
    }

    #[tokio::test]
    async fn statuses_and_problem_codes_map_to_the_vocabulary() {
        let deadline = r#"{"code":"deadline_exceeded","deadline_origin":"header"}"#;
        let err = call(answer(504, None, Some(deadline))).await.unwrap_err();
        let exceeded = atscale_core::find::<DeadlineExceeded>(&*err).unwrap();
        assert_eq!(exceeded.origin(), Origin::Parent);
        let own = r#"{"code":"deadline_exceeded","deadline_origin":"local"}"#;
        let err = call(answer(504, None, Some(own))).await.unwrap_err();
        let exceeded = atscale_core::find::<DeadlineExceeded>(&*err).unwrap();
        assert_eq!(exceeded.origin(), Origin::Local);

        let cases = [
            (
                503,
                Some(r#"{"code":"overloaded"}"#),
                Some(Kind::Overloaded),
            ),
            (503, Some(r#"{"code":"stalled"}"#), Some(Kind::Stalled)),
            (
                503,
                Some(r#"{"type":"https://docs.example.com/errors/stalled"}"#),
                Some(Kind::Stalled),
            ),
            (503, Some(r#"{"code":"unreachable"}"#), None),
            (503, Some(r#"{"code":"maintenance"}"#), None),
            // A 503 naming nothing: RFC 9110's temporary overload.
            (503, None, Some(Kind::Overloaded)),
            (
                503,
                Some(r#"{"type":"about:blank","status":503}"#),
                Some(Kind::Overloaded),
            ),
            (502, Some(r#"{"code":"upstream"}"#), None),
            (500, Some("not json"), None),
            (504, None, Some(Kind::DeadlineExceeded)),
        ];
        for (status, problem, kind) in cases {
            let err = call(answer(status, None, problem)).await.unwrap_err();
            assert_eq!(failure(&err).kind(), kind, "{status} {problem:?}");
            assert_eq!(Kind::find(&*err), kind, "{status} {problem:?}");
        }
        // Anything else is an answer.
        for status in [200, 204, 400, 404, 409] {
            let res = call(answer(status, None, Some("{}"))).await.unwrap();
            assert_eq!(res.status(), status);
        }
    }

    #[tokio::test]
    async fn a_plain_503_is_overloaded_with_its_retry_after() {
        let err = call(answer(503, Some("2"), None)).await.unwrap_err();
        let overloaded = atscale_core::find::<Overloaded>(&*err).expect("overloaded");
        assert_eq!(overloaded.retry_after(), Some(Duration::from_secs(2)));
        assert_eq!(Kind::of(&*err), Kind::Overloaded);
        assert_eq!(failure(&err).http_status(), StatusCode::SERVICE_UNAVAILABLE);
        // Without a Retry-After, none is made up.
        let err = call(answer(503, None, None)).await.unwrap_err();
        assert_eq!(atscale_core::retry_after(&*err), None);
        assert_eq!(Kind::of(&*err), Kind::Overloaded);
    }

    #[tokio::test]
    async fn a_refused_connection_is_unreachable_naming_the_dependency() {
        let refused = |name: Option<&str>| {
            let transport = service_fn(|_req: http::Request<()>| async {
                Err::<http::Response<Full<Bytes>>, _>(BoxError::from(std::io::Error::from(
                    std::io::ErrorKind::ConnectionRefused,
                )))
            });
            let layer = match name {
                Some(name) => HttpErrorsLayer::new().dependency(name),
                None => HttpErrorsLayer::new(),
            };
            layer.layer(transport).oneshot(
                http::Request::get("http://10.0.0.7:8080/x")
                    .body(())
                    .unwrap(),
            )
        };
        let err = refused(Some("backend")).await.unwrap_err();
        assert_eq!(err.to_string(), "could not reach backend");
        assert_eq!(Kind::of(&*err), Kind::Unreachable);
        // Without a name, never the address: the kind alone.
        let err = refused(None).await.unwrap_err();
        assert!(atscale_core::find::<Unreachable>(&*err).is_none());
        assert_eq!(Kind::of(&*err), Kind::Unreachable);
        // Other transport errors pass as they are.
        let transport = service_fn(|_req: http::Request<()>| async {
            Err::<http::Response<Full<Bytes>>, _>(BoxError::from("boom"))
        });
        let err = HttpErrorsLayer::new()
            .layer(transport)
            .oneshot(http::Request::get("/").body(()).unwrap())
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "boom");
    }
}
