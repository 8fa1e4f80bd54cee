//! The two modes of the layer, as types: serving requests, or making calls.

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
