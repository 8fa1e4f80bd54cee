//! Error types
//!
//! The heartbeat adds one failure mode, a stall, and reports it with the
//! shared vocabulary's [`Stalled`], so [`Kind::of`](atscale_core::Kind::of)
//! classifies it as [`Kind::Stalled`](atscale_core::Kind::Stalled) (HTTP 503,
//! gRPC `UNAVAILABLE`) from anywhere in a `source()` chain. A request whose
//! caller gave up is not an error anyone sees; the monitor records it as
//! [`Outcome::Cancelled`](crate::Outcome::Cancelled).

pub use atscale_core::{BoxError, Stalled};
