//! Deadline headers on a request sent again: a retry after its backoff, a
//! hedge after its delay.
//!
//! A client [`DeadlineLayer`](crate::DeadlineLayer) writes what is left of
//! the deadline into `grpc-timeout` (and its
//! [`with_header`](crate::DeadlineLayer::with_header) header) when the call
//! starts. A retry or hedge layer below it copies that request later: left
//! as they are, the headers would tell the backend it has the time that was
//! left at the start, and it would keep working after the caller gave up.
//! [`refresh`] rewrites them, on each copy, to what is left when the copy is
//! sent: `atscale-retry` calls it on every attempt after the first,
//! `atscale-hedge` on every hedge.
//!
//! ```
//! use std::time::Duration;
//! use atscale_core::{Carrier, Context, Origin};
//! use atscale_deadline::attempt;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let cx = Context::new().with_budget(Duration::from_secs(1), Origin::Local);
//! let mut req = http::Request::builder().header("grpc-timeout", "1000000u").body(()).unwrap();
//! req.set_context(cx.child());
//!
//! tokio::time::advance(Duration::from_millis(100)).await; // a backoff
//! attempt::refresh(&mut req);
//! assert_eq!(req.headers()["grpc-timeout"], "900000u");
//! # }
//! ```

use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use atscale_core::{Carrier, Context};
use http::{HeaderMap, HeaderName};

use crate::codec::{self, GRPC_TIMEOUT};

/// The names given to [`DeadlineLayer::with_header`](crate::DeadlineLayer::with_header)
/// in this process: the headers that hold a budget in milliseconds.
static MILLIS_HEADERS: RwLock<Vec<HeaderName>> = RwLock::new(Vec::new());

/// Whether [`MILLIS_HEADERS`] holds any name (skips the lock when not).
static ANY_MILLIS_HEADER: AtomicBool = AtomicBool::new(false);

/// Remembers `name` as a header holding a budget in milliseconds, for
/// [`refresh`]. Called when a layer is configured, never per request.
pub(crate) fn register(name: &HeaderName) {
    if *name == GRPC_TIMEOUT {
        return;
    }
    let mut names = MILLIS_HEADERS
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !names.contains(name) {
        names.push(name.clone());
    }
    ANY_MILLIS_HEADER.store(true, Ordering::Release);
}

/// Rewrites the deadline headers `req` carries to what is left of its
/// [`Context`]'s deadline now: for a copy of a request, sent later than the
/// original (a retry, a hedge).
///
/// The headers rewritten are `grpc-timeout` and every header a
/// [`DeadlineLayer`](crate::DeadlineLayer) in this process was told to use
/// ([`with_header`](crate::DeadlineLayer::with_header)); each only when the
/// request carries it (the deadline layer chose which to write), never
/// added. See [`refresh_headers`] for the values.
///
/// Nothing changes when the request carries no context, or one without a
/// deadline, or has no headers (a request type of your own whose
/// [`Carrier::headers_mut`] says `None`).
pub fn refresh<Req: Carrier>(req: &mut Req) {
    let Some(remaining) = req.context().and_then(Context::remaining) else {
        return;
    };
    if let Some(headers) = req.headers_mut() {
        refresh_headers(headers, remaining);
    }
}

/// Rewrites the deadline headers in `headers` to `remaining`, as [`refresh`]
/// does: `grpc-timeout` in the finest unit that fits, rounded up
/// ([`encode_grpc_timeout`](codec::encode_grpc_timeout)); a milliseconds
/// header in whole milliseconds, rounded up
/// ([`encode_millis`](codec::encode_millis)).
///
/// A value is only ever lowered: a header that already says less than
/// `remaining` (set by hand, tighter than the context) keeps its value. A
/// header that is absent stays absent; one that is malformed or repeated is
/// left as it is (the deadline layer refuses to send those; without one, the
/// server will).
pub fn refresh_headers(headers: &mut HeaderMap, remaining: Duration) {
    refresh_one(headers, &GRPC_TIMEOUT, remaining, |value| {
        codec::parse_grpc_timeout(value).ok()
    });
    if !ANY_MILLIS_HEADER.load(Ordering::Acquire) {
        return;
    }
    let names = MILLIS_HEADERS
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for name in names.iter() {
        refresh_one(headers, name, remaining, |value| {
            codec::parse_millis(name, value).ok()
        });
    }
}

/// Lowers `name`'s single value to `remaining` when it says more.
fn refresh_one(
    headers: &mut HeaderMap,
    name: &HeaderName,
    remaining: Duration,
    parse: impl FnOnce(&[u8]) -> Option<Duration>,
) {
    let Ok(Some(value)) = codec::single(headers, name) else {
        return;
    };
    let Some(said) = parse(value.as_bytes()) else {
        return;
    };
    if said <= remaining {
        return;
    }
    let value = if *name == GRPC_TIMEOUT {
        codec::encode_grpc_timeout(remaining)
    } else {
        codec::encode_millis(remaining)
    };
    headers.insert(name.clone(), value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use atscale_core::Origin;
    use http::HeaderValue;

    const MS: HeaderName = HeaderName::from_static("x-attempt-test-ms");

    fn request(headers: &[(&HeaderName, &'static str)]) -> http::Request<()> {
        let mut req = http::Request::new(());
        for (name, value) in headers {
            req.headers_mut()
                .append((*name).clone(), HeaderValue::from_static(value));
        }
        req
    }

    #[tokio::test(start_paused = true)]
    async fn present_headers_are_lowered_to_what_is_left_rounded_up() {
        register(&MS);
        let cx = Context::new().with_budget(Duration::from_secs(1), Origin::Local);
        let mut req = request(&[(&GRPC_TIMEOUT, "1000000u"), (&MS, "1000")]);
        req.set_context(cx.child());
        tokio::time::advance(Duration::from_micros(100_500)).await;
        refresh(&mut req);
        // 899.5 ms left: the finest unit that fits, and whole ms, both rounded up
        assert_eq!(req.headers()[GRPC_TIMEOUT], "899500u");
        assert_eq!(req.headers()[MS], "900");
        assert_eq!(req.headers().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn absent_headers_stay_absent() {
        register(&MS);
        let cx = Context::new().with_budget(Duration::from_secs(1), Origin::Local);
        let mut req = request(&[(&MS, "1000")]);
        req.set_context(cx);
        tokio::time::advance(Duration::from_millis(100)).await;
        refresh(&mut req);
        assert_eq!(req.headers()[MS], "900");
        assert!(!req.headers().contains_key(GRPC_TIMEOUT));

        let mut bare = request(&[]);
        bare.set_context(Context::new().with_budget(Duration::from_secs(1), Origin::Local));
        refresh(&mut bare);
        assert!(bare.headers().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_value_is_never_raised_nor_a_bad_one_touched() {
        let cx = Context::new().with_budget(Duration::from_secs(1), Origin::Local);
        // tighter than the context: kept
        let mut req = request(&[(&GRPC_TIMEOUT, "50m")]);
        req.set_context(cx.clone());
        refresh(&mut req);
        assert_eq!(req.headers()[GRPC_TIMEOUT], "50m");
        // malformed or repeated: left as they are
        for values in [&["soon"][..], &["5S", "6S"]] {
            let mut req = http::Request::new(());
            for v in values {
                req.headers_mut()
                    .append(GRPC_TIMEOUT, HeaderValue::from_static(v));
            }
            req.set_context(cx.clone());
            refresh(&mut req);
            let kept: Vec<_> = req.headers().get_all(GRPC_TIMEOUT).iter().collect();
            assert_eq!(kept, values.to_vec(), "{values:?}");
        }
        // no context, or no deadline: nothing to say
        let mut req = request(&[(&GRPC_TIMEOUT, "5S")]);
        refresh(&mut req);
        req.set_context(Context::new());
        refresh(&mut req);
        assert_eq!(req.headers()[GRPC_TIMEOUT], "5S");
    }

    #[test]
    fn an_unregistered_header_is_not_a_deadline() {
        let other = HeaderName::from_static("x-attempt-test-unregistered");
        let mut headers = HeaderMap::new();
        headers.insert(other.clone(), HeaderValue::from_static("1000"));
        refresh_headers(&mut headers, Duration::from_millis(10));
        assert_eq!(headers[other], "1000");
    }
}
