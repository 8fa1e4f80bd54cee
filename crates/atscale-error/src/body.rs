//! The response body of a server-mode [`ErrorEnrich`](crate::ErrorEnrich).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::metrics::Tail;

pin_project! {
    /// The inner service's body, passed through untouched, or the body of an
    /// error response made by the layer (a problem+json document, or nothing
    /// for a trailers-only gRPC response).
    ///
    /// Implements [`http_body::Body`] with the inner body's error type, so
    /// axum's `IntoResponse`, hyper and tonic take it as it is.
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        inner: Inner<B>,
    }
}

pin_project! {
    #[project = InnerProj]
    #[derive(Debug)]
    enum Inner<B> {
        Passthrough { #[pin] body: B },
        // A gRPC body whose status (and so its duration) comes in the trailers.
        Grpc { #[pin] body: B, tail: Tail },
        Full { data: Option<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    /// The inner body; `tail` records the call's duration at its trailers
    /// when pending (a gRPC call with the `metrics` feature).
    #[inline]
    pub(crate) fn observed(body: B, tail: Tail) -> Self {
        let inner = if tail.is_pending() {
            Inner::Grpc { body, tail }
        } else {
            Inner::Passthrough { body }
        };
        ResponseBody { inner }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        ResponseBody {
            inner: Inner::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(crate) const fn empty() -> Self {
        ResponseBody {
            inner: Inner::Full { data: None },
        }
    }

    /// Whether this body was made by the layer for an error.
    pub fn is_error(&self) -> bool {
        matches!(self.inner, Inner::Full { .. })
    }
}

#[cfg(feature = "axum")]
impl<B> ResponseBody<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<atscale_core::BoxError>,
{
    /// As axum's `Body`: the inner body as it is when it is one (axum's
    /// `Body::new` takes its own type back without a box), the layer's
    /// bytes as a `Body` of them; only a body that waits for its gRPC
    /// trailers stays wrapped (boxed).
    pub(crate) fn into_axum(self) -> axum::body::Body {
        match self.inner {
            Inner::Passthrough { body } => axum::body::Body::new(body),
            Inner::Full { data } => {
                data.map_or_else(axum::body::Body::empty, axum::body::Body::from)
            }
            inner @ Inner::Grpc { .. } => axum::body::Body::new(ResponseBody { inner }),
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().inner.project() {
            InnerProj::Passthrough { body } => body.poll_frame(cx),
            InnerProj::Grpc { body, tail } => {
                let frame = ready!(body.poll_frame(cx));
                match &frame {
                    Some(Ok(frame)) => {
                        if let Some(trailers) = frame.trailers_ref() {
                            tail.trailers(trailers);
                        }
                    }
                    Some(Err(_)) | None => tail.ended(),
                }
                Poll::Ready(frame)
            }
            InnerProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Passthrough { body } | Inner::Grpc { body, .. } => body.is_end_stream(),
            Inner::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Passthrough { body } | Inner::Grpc { body, .. } => body.size_hint(),
            Inner::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
