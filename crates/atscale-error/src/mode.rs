//! The modes of the layer, as types: serving requests (as any tower
//! service, or inside an axum `Router`), or making calls.

/// Server mode: every error becomes a response (problem+json, or a gRPC
/// status) and the service's error type is [`Infallible`](std::convert::Infallible).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Server {
    _priv: (),
}

/// Client mode: errors of outgoing calls become [`Enriched`](crate::Enriched)
/// errors naming the target; responses pass through untouched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Client {
    _priv: (),
}

/// Server mode inside an axum `Router` (the `axum` feature): as [`Server`],
/// but the response body is axum's own `Body`, so `Router::layer` takes the
/// inner service's response as it is. A [`Server`]-mode layer answers its
/// own [`ResponseBody`](crate::body::ResponseBody), which axum boxes into a
/// `Body` on every request (an allocation `HandleErrorLayer` does not make).
#[cfg(feature = "axum")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Axum {
    _priv: (),
}
