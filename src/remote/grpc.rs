//! The gRPC side: trailers-only error responses as [`RemoteFailure`]s.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, ready};
use std::time::{Duration, Instant};

use atscale_core::{BoxError, DeadlineExceeded};
use pin_project_lite::pin_project;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use tower_layer::Layer;
use tower_service::Service;

use super::{Answer, Implied, RemoteFailure, Said};

impl RemoteFailure {
    /// Reads `status` (its code and rich details); `elapsed` is how long the
    /// call took, used as the budget of a [`DeadlineExceeded`].
    #[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
    pub fn new(mut status: Status, elapsed: Duration) -> Self {
        let details = status.get_error_details();
        let info = details.error_info();
        // An atscale server names the kind in `ErrorInfo.reason`; any other
        // server only gives the code.
        let reason = info.map(|i| i.reason.as_str());
        let meta = |key: &str| info.and_then(|i| i.metadata.get(key)).map(String::as_str);
        let mut said = Said {
            implied: match status.code() {
                Code::DeadlineExceeded => Implied::Kind(atscale_core::Kind::DeadlineExceeded),
                Code::ResourceExhausted => Implied::Kind(atscale_core::Kind::RateLimited),
                Code::Unavailable => Implied::Unavailable,
                Code::Cancelled => Implied::Kind(atscale_core::Kind::Cancelled),
                _ => Implied::Nothing,
            },
            named: reason,
            retry_after: details.retry_info().and_then(|r| r.retry_delay),
            deadline_origin: meta("deadline_origin"),
        };
        // tonic's server enforces `grpc-timeout` itself, answering
        // CANCELLED "Timeout expired" (no details): the deadline we sent.
        if status.code() == Code::Cancelled
            && reason.is_none()
            && status.message() == "Timeout expired"
        {
            said.implied = Implied::Kind(atscale_core::Kind::DeadlineExceeded);
            said.deadline_origin = Some("grpc-timeout");
        }
        let vocabulary = said.vocabulary(elapsed);
        let service = info.map(|i| i.domain.clone());
        let layer = meta("layer").map(str::to_owned);
        let id = details
            .request_info()
            .map(|r| r.request_id.clone())
            .or_else(|| meta("error_id").map(str::to_owned));
        if let Some(source) = vocabulary {
            status.set_source(source);
        }
        RemoteFailure {
            service,
            layer,
            id,
            answer: Answer::Grpc(status),
        }
    }
}

/// Turns trailers-only gRPC error responses into [`RemoteFailure`] errors;
/// see the [module docs](super).
#[derive(Clone, Debug, Default)]
pub struct GrpcErrorsLayer {
    dependency: Option<Arc<str>>,
}

impl GrpcErrorsLayer {
    /// The layer, for a dependency without a name: a refused connection
    /// is still [`Kind::Unreachable`](atscale_core::Kind::Unreachable), but
    /// answers do not say which dependency it was.
    pub const fn new() -> Self {
        GrpcErrorsLayer { dependency: None }
    }

    /// Names the dependency `name` in
    /// [`Unreachable`](atscale_core::Unreachable) errors, as
    /// [`HttpErrorsLayer::dependency`](super::HttpErrorsLayer::dependency)
    /// does.
    #[must_use]
    pub fn dependency(mut self, name: impl Into<Arc<str>>) -> Self {
        self.dependency = Some(name.into());
        self
    }
}

impl<S> Layer<S> for GrpcErrorsLayer {
    type Service = GrpcErrors<S>;

    fn layer(&self, inner: S) -> GrpcErrors<S> {
        GrpcErrors {
            inner,
            dependency: self.dependency.clone(),
        }
    }
}

/// Fails a call whose response head carries a non-zero `grpc-status` with a
/// [`RemoteFailure`]; made by [`GrpcErrorsLayer`].
///
/// Only trailers-only responses are seen (the form a failing atscale server,
/// and most gRPC servers, answer errors before any message with); a status
/// in the trailers of a streamed response is left to the gRPC client.
///
/// tonic's `Channel` enforces the `grpc-timeout` header by itself, failing
/// with `TimeoutExpired` (which tonic would make `UNAVAILABLE`): when it does,
/// [`GrpcErrors`] fails with [`DeadlineExceeded`] for the deadline of the
/// request's [`Context`](atscale_core::Context), the one the header came
/// from, so the deadline is reported as such whichever timer fires first.
/// A transport error showing that the call never reached the server (a
/// refused connection, a refused stream) is
/// [`Unreachable`](atscale_core::Unreachable) naming the dependency, when
/// the layer has its name.
///
/// # Backpressure
///
/// `poll_ready` delegates to the inner service.
#[derive(Clone, Debug)]
pub struct GrpcErrors<S> {
    inner: S,
    dependency: Option<Arc<str>>,
}

impl<S> GrpcErrors<S> {
    atscale_core::inner_accessors!();
}

impl<S, ReqB, ResB> Service<http::Request<ReqB>> for GrpcErrors<S>
where
    S: Service<http::Request<ReqB>, Response = http::Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<ResB>;
    type Error = BoxError;
    type Future = GrpcErrorsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        let deadline = req
            .extensions()
            .get::<atscale_core::Context>()
            .and_then(atscale_core::Context::deadline);
        GrpcErrorsFuture {
            inner: self.inner.call(req),
            started: Instant::now(),
            deadline,
            dependency: self.dependency.clone(),
        }
    }
}

pin_project! {
    /// The response future of [`GrpcErrors`].
    #[derive(Debug)]
    pub struct GrpcErrorsFuture<F> {
        #[pin]
        inner: F,
        started: Instant,
        deadline: Option<atscale_core::Deadline>,
        dependency: Option<Arc<str>>,
    }
}

impl<F, ResB, E> Future for GrpcErrorsFuture<F>
where
    F: Future<Output = Result<http::Response<ResB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<http::Response<ResB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = match ready!(this.inner.poll(cx)) {
            Ok(res) => res,
            Err(err) => {
                let err: BoxError = err.into();
                // tonic's Channel enforces the `grpc-timeout` the deadline
                // layer wrote, and may fire first: it is our deadline.
                return Poll::Ready(Err(
                    match (
                        atscale_core::find::<tonic::TimeoutExpired>(&*err),
                        this.deadline,
                    ) {
                        (Some(_), Some(deadline)) => {
                            Box::new(DeadlineExceeded::at(*deadline, tokio::time::Instant::now()))
                        }
                        _ => match this.dependency {
                            Some(name) => super::unreachable(err, name),
                            None => err,
                        },
                    },
                ));
            }
        };
        match Status::from_header_map(res.headers()) {
            Some(status) if status.code() != Code::Ok => Poll::Ready(Err(Box::new(
                RemoteFailure::new(status, this.started.elapsed()),
            ))),
            _ => Poll::Ready(Ok(res)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use atscale_core::{Kind, Origin, RateLimited};
    use tonic_types::{ErrorDetail, ErrorInfo, RequestInfo, RetryInfo};

    use super::*;

    fn atscale_status(code: Code, reason: &str, extra: Vec<ErrorDetail>) -> Status {
        let metadata = HashMap::from([
            ("layer".to_owned(), "ratelimit".to_owned()),
            ("deadline_origin".to_owned(), "grpc-timeout".to_owned()),
        ]);
        let mut details = vec![
            ErrorInfo::new(reason, "inventory", metadata).into(),
            RequestInfo::new("0123456789abcdef0123456789abcdef", "").into(),
        ];
        details.extend(extra);
        Status::with_error_details_vec(code, "safe message", details)
    }

    fn kind(status: Status) -> Option<Kind> {
        RemoteFailure::new(status, Duration::from_millis(7)).kind()
    }

    #[test]
    fn an_atscale_status_keeps_its_kind_service_layer_and_id() {
        let after = Duration::from_millis(1500);
        let status = atscale_status(
            Code::ResourceExhausted,
            "RATE_LIMITED",
            vec![RetryInfo::new(Some(after)).into()],
        );
        let failure = RemoteFailure::new(status, Duration::from_millis(7));
        assert_eq!(failure.kind(), Some(Kind::RateLimited));
        assert_eq!(
            atscale_core::find::<RateLimited>(&failure).map(RateLimited::retry_after),
            Some(after)
        );
        assert_eq!(failure.service(), Some("inventory"));
        assert_eq!(failure.layer(), Some("ratelimit"));
        assert_eq!(failure.error_id(), Some("0123456789abcdef0123456789abcdef"));
        assert_eq!(
            failure.to_string(),
            "inventory answered ResourceExhausted from its ratelimit layer \
             (error id 0123456789abcdef0123456789abcdef)"
        );
        assert!(!failure.to_string().contains("safe message"));
        assert_eq!(
            failure.grpc_status().unwrap().code(),
            Code::ResourceExhausted
        );
    }

    #[test]
    fn codes_and_reasons_map_to_the_vocabulary() {
        let deadline = atscale_status(Code::DeadlineExceeded, "DEADLINE_EXCEEDED", vec![]);
        let failure = RemoteFailure::new(deadline, Duration::from_millis(7));
        let exceeded = atscale_core::find::<DeadlineExceeded>(&failure).unwrap();
        // The downstream's deadline was inherited: from this side, the parent's.
        assert_eq!(exceeded.origin(), Origin::Parent);
        assert_eq!(exceeded.elapsed(), Duration::from_millis(7));

        let cases = [
            (Code::Unavailable, "STALLED", Some(Kind::Stalled)),
            (Code::Unavailable, "OVERLOADED", Some(Kind::Overloaded)),
            (Code::Unavailable, "UPSTREAM", None),
            (Code::Unavailable, "HEDGE_EXHAUSTED", None),
            (Code::Cancelled, "CANCELLED", Some(Kind::Cancelled)),
            (Code::InvalidArgument, "BAD_REQUEST", None),
            (Code::Internal, "INTERNAL", None),
        ];
        for (code, reason, expected) in cases {
            assert_eq!(
                kind(atscale_status(code, reason, vec![])),
                expected,
                "{reason}"
            );
        }
    }

    #[test]
    fn statuses_of_other_servers_map_by_code_alone() {
        assert_eq!(
            kind(Status::deadline_exceeded("slow")),
            Some(Kind::DeadlineExceeded)
        );
        assert_eq!(
            kind(Status::resource_exhausted("quota")),
            Some(Kind::RateLimited)
        );
        assert_eq!(kind(Status::unavailable("down")), None);
        assert_eq!(kind(Status::internal("bug")), None);
        // tonic's own server-side grpc-timeout enforcement.
        assert_eq!(
            kind(Status::cancelled("Timeout expired")),
            Some(Kind::DeadlineExceeded)
        );
        assert_eq!(kind(Status::cancelled("gone")), Some(Kind::Cancelled));
        let failure = RemoteFailure::new(Status::internal("bug"), Duration::ZERO);
        assert_eq!(
            failure.to_string(),
            "a downstream service answered Internal"
        );
    }

    #[tokio::test]
    async fn tonic_timeouts_and_error_heads_become_errors_and_the_rest_passes() {
        use tower::{ServiceExt, service_fn};

        let transport = service_fn(|req: http::Request<()>| async move {
            match req.uri().path() {
                "/timeout" => Err(BoxError::from(tonic::TimeoutExpired(()))),
                "/refused" => Err(BoxError::from("connection refused")),
                "/failed" => Ok(Status::unavailable("down").into_http::<()>()),
                _ => Ok(http::Response::new(())),
            }
        });
        let svc = GrpcErrorsLayer::new().layer(transport);
        let served =
            atscale_core::Context::new().with_budget(Duration::from_millis(200), Origin::Header);
        let call = |path: &str| {
            let mut req = http::Request::get(path).body(()).unwrap();
            req.extensions_mut().insert(served.clone());
            svc.clone().oneshot(req)
        };

        // tonic's channel enforced the grpc-timeout we wrote: our deadline.
        let err = call("/timeout").await.unwrap_err();
        let exceeded = atscale_core::find::<DeadlineExceeded>(&*err).unwrap();
        assert_eq!(exceeded.origin(), Origin::Header);
        assert_eq!(exceeded.budget(), Duration::from_millis(200));
        // Other transport errors pass through as they are.
        let err = call("/refused").await.unwrap_err();
        assert_eq!(err.to_string(), "connection refused");
        // A refused connection names the dependency, when it has a name.
        let refused = service_fn(|_req: http::Request<()>| async {
            Err::<http::Response<()>, _>(BoxError::from(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            )))
        });
        let err = GrpcErrorsLayer::new()
            .dependency("inventory")
            .layer(refused)
            .oneshot(http::Request::new(()))
            .await
            .unwrap_err();
        let unreachable = atscale_core::find::<atscale_core::Unreachable>(&*err).unwrap();
        assert_eq!(unreachable.dependency(), "inventory");
        // An error status in the head is a RemoteFailure.
        let err = call("/failed").await.unwrap_err();
        let failure = atscale_core::find::<RemoteFailure>(&*err).unwrap();
        assert_eq!(failure.grpc_status().unwrap().code(), Code::Unavailable);
        // Anything else is a response.
        call("/").await.unwrap();
    }
}
