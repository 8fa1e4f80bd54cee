//! gRFC A6 retries for tower, tonic and HTTP clients.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod code;
mod discover;
pub mod error;
pub mod future;
mod layer;
mod outcome;
mod policy;
mod pushback;
mod service;

pub use atscale_core::RetryThrottle;
pub use code::{Code, CodeSet};
pub use discover::RetryDiscover;
pub use error::{InvalidConfig, RetryFailed, Stop};
pub use layer::RetryLayer;
pub use outcome::{Attempts, Failure, RetryRequest, RetryResponse};
pub use policy::{MAX_ATTEMPTS, RetryPolicy, RetryPolicyBuilder};
#[cfg(feature = "tonic")]
pub use pushback::status_pushback;
pub use pushback::{
    GRPC_PREVIOUS_RPC_ATTEMPTS, GRPC_RETRY_PUSHBACK_MS, Pushback, grpc_pushback,
    parse_grpc_pushback, parse_retry_after, retry_after,
};
pub use service::Retry;
