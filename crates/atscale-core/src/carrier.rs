//! How a request carries its [`Context`].

use http::HeaderMap;

use crate::context::Context;

/// A request type that can carry a [`Context`] (and, optionally, headers).
///
/// Implemented for [`http::Request`], which keeps the context in its
/// extensions: that covers axum, hyper, and tonic (whose `Channel` and
/// `Server` see `http::Request`s). Implement it for your own request type to
/// use atscale layers outside HTTP.
///
/// # Example
///
/// ```
/// use atscale_core::{Carrier, Context};
///
/// struct Job {
///     id: u64,
///     cx: Option<Context>,
/// }
///
/// impl Carrier for Job {
///     fn context(&self) -> Option<&Context> {
///         self.cx.as_ref()
///     }
///     fn set_context(&mut self, cx: Context) {
///         self.cx = Some(cx);
///     }
/// }
/// ```
pub trait Carrier {
    /// The context the request carries, if any.
    fn context(&self) -> Option<&Context>;

    /// Attaches `cx` to the request, replacing any context it carried.
    fn set_context(&mut self, cx: Context);

    /// The request's headers, for layers that read deadlines from the wire.
    fn headers(&self) -> Option<&HeaderMap> {
        None
    }

    /// The request's headers, for layers that write deadlines to the wire.
    fn headers_mut(&mut self) -> Option<&mut HeaderMap> {
        None
    }
}

impl<B> Carrier for http::Request<B> {
    fn context(&self) -> Option<&Context> {
        self.extensions().get::<Context>()
    }

    fn set_context(&mut self, cx: Context) {
        // A context already carried (a parent's, as a child context replaces
        // it at each layer that makes one) is overwritten in its box: an
        // insert would box the new one and free the old.
        match self.extensions_mut().get_mut::<Context>() {
            Some(carried) => *carried = cx,
            None => {
                self.extensions_mut().insert(cx);
            }
        }
    }

    fn headers(&self) -> Option<&HeaderMap> {
        Some(http::Request::headers(self))
    }

    fn headers_mut(&mut self) -> Option<&mut HeaderMap> {
        Some(http::Request::headers_mut(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_requests_carry_a_context_in_extensions() {
        let mut req = http::Request::new(());
        assert!(Carrier::context(&req).is_none());
        let cx = Context::new();
        req.set_context(cx.clone());
        req.context().unwrap().cancel();
        assert!(cx.is_cancelled(), "the carried context shares the signal");
    }

    #[test]
    fn a_new_context_replaces_the_carried_one() {
        let mut req = http::Request::new(());
        req.extensions_mut().insert(7u32);
        let first = Context::new();
        req.set_context(first.clone());
        let second = first.child();
        req.set_context(second.clone());
        req.context().unwrap().cancel();
        assert!(second.is_cancelled(), "the request carries the new context");
        assert!(!first.is_cancelled(), "and no longer the old one");
        assert_eq!(
            req.extensions().get::<u32>(),
            Some(&7),
            "other extensions stay"
        );
    }
}
