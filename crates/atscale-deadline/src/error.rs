//! Error types
//!
//! The Deadline layer fails with two types of the shared vocabulary in
//! [`atscale_core::error`], re-exported here so their paths are stable:
//! [`DeadlineExceeded`] (HTTP 504, gRPC `DEADLINE_EXCEEDED`) and
//! [`MalformedDeadline`] (HTTP 400, gRPC `INVALID_ARGUMENT`).

pub use atscale_core::{DeadlineExceeded, MalformedDeadline};
