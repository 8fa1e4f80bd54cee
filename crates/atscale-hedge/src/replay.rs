//! Requests that can be sent more than once.

use bytes::Bytes;
use http::Method;

/// A request that can be sent again, as a hedge.
///
/// Implemented for [`http::Request`] whose body implements [`ReplayBody`]
/// (wrap a streaming body in [`BufferedBody`](crate::BufferedBody) with
/// [`BufferBodyLayer`](crate::BufferBodyLayer) to get one). Implement it for
/// your own request types; together with
/// [`Carrier`](atscale_core::Carrier) it is all a request needs to be hedged.
///
/// # Example
///
/// ```
/// use atscale_core::{Carrier, Context};
/// use atscale_hedge::Replay;
///
/// #[derive(Clone)]
/// struct Lookup {
///     key: String,
///     cx: Option<Context>,
/// }
///
/// impl Replay for Lookup {
///     fn replay(&self) -> Option<Self> {
///         Some(self.clone())
///     }
/// }
/// # impl Carrier for Lookup {
/// #     fn context(&self) -> Option<&Context> { self.cx.as_ref() }
/// #     fn set_context(&mut self, cx: Context) { self.cx = Some(cx); }
/// # }
/// ```
pub trait Replay: Sized {
    /// A copy to send as one more attempt, or `None` when this request cannot
    /// be replayed (it is then sent once, unhedged).
    fn replay(&self) -> Option<Self>;

    /// Whether sending the request twice is harmless. Requests that are not
    /// idempotent are sent once, unless the layer opts in with
    /// [`HedgeBuilder::non_idempotent`](crate::HedgeBuilder::non_idempotent).
    /// Defaults to `true`.
    fn is_idempotent(&self) -> bool {
        true
    }
}

/// An HTTP body that can be copied for another attempt.
///
/// Implemented for the bodies that hold their bytes (`()`, [`String`],
/// [`Vec<u8>`], [`Bytes`], `&'static str`, http-body-util's [`Full`] and
/// [`Empty`]) and for [`BufferedBody`](crate::BufferedBody), which buffers a
/// streaming body (a tonic request, say) up to a byte limit.
///
/// [`Full`]: http_body_util::Full
/// [`Empty`]: http_body_util::Empty
pub trait ReplayBody: Sized {
    /// A copy of the body, or `None` when it cannot be replayed.
    fn replay_body(&self) -> Option<Self>;
}

macro_rules! clone_bodies {
    ($($t:ty),*) => {
        $(impl ReplayBody for $t {
            fn replay_body(&self) -> Option<Self> {
                Some(self.clone())
            }
        })*
    };
}

clone_bodies!((), String, Vec<u8>, Bytes, &'static str);

impl<D: Clone> ReplayBody for http_body_util::Full<D> {
    fn replay_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl<D> ReplayBody for http_body_util::Empty<D> {
    fn replay_body(&self) -> Option<Self> {
        Some(http_body_util::Empty::new())
    }
}

/// Whether `method` is idempotent (RFC 9110, section 9.2.2).
pub(crate) fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

impl<B: ReplayBody> Replay for http::Request<B> {
    /// Copies method, URI, version, headers and extensions, and the body
    /// through [`ReplayBody`].
    fn replay(&self) -> Option<Self> {
        let body = self.body().replay_body()?;
        let mut req = http::Request::new(body);
        *req.method_mut() = self.method().clone();
        *req.uri_mut() = self.uri().clone();
        *req.version_mut() = self.version();
        *req.headers_mut() = self.headers().clone();
        *req.extensions_mut() = self.extensions().clone();
        Some(req)
    }

    /// GET, HEAD, OPTIONS, TRACE, PUT and DELETE are idempotent; POST (so
    /// every gRPC call) and PATCH are not.
    fn is_idempotent(&self) -> bool {
        idempotent(self.method())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_requests_replay_everything_but_need_an_idempotent_method() {
        let mut req = http::Request::builder()
            .method(Method::PUT)
            .uri("http://a/b?c")
            .header("x-k", "v")
            .body(Bytes::from_static(b"body"))
            .unwrap();
        req.extensions_mut().insert(7u32);
        let copy = req.replay().unwrap();
        assert_eq!(copy.method(), Method::PUT);
        assert_eq!(copy.uri(), "http://a/b?c");
        assert_eq!(copy.headers()["x-k"], "v");
        assert_eq!(copy.extensions().get::<u32>(), Some(&7));
        assert_eq!(copy.body(), "body");
        assert!(req.is_idempotent());
        *req.method_mut() = Method::POST;
        assert!(!req.is_idempotent());
    }
}
