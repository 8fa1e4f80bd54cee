//! The layer.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use atscale_core::RetryThrottle;
use tower::discover::Discover;
use tower_layer::Layer;

use crate::discover::RetryDiscover;
use crate::error::InvalidConfig;
use crate::policy::RetryPolicy;
use crate::service::{Backends, Retry};

/// Applies [`Retry`] to a service: gRFC A6 retries with a [`RetryPolicy`],
/// optionally throttled by a [`RetryThrottle`] shared with other layers
/// (the hedge's, another method's retries) calling the same backend.
///
/// ```
/// use std::time::Duration;
/// use atscale_core::RetryThrottle;
/// use atscale_retry::{RetryLayer, RetryPolicy};
///
/// let throttle = RetryThrottle::new(10, 0.1)?; // one per backend
/// let layer = RetryLayer::new(RetryPolicy::builder().max_attempts(4).build()?)
///     .throttle(throttle.clone());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct RetryLayer {
    policy: RetryPolicy,
    throttle: Option<RetryThrottle>,
}

impl RetryLayer {
    /// Retries with `policy`, unthrottled.
    pub fn new(policy: RetryPolicy) -> Self {
        RetryLayer {
            policy,
            throttle: None,
        }
    }

    /// Retries only while `throttle` allows (A6 `retryThrottling`): every
    /// retryable failure takes a token from it, every success gives back
    /// its token ratio.
    #[must_use]
    pub fn throttle(mut self, throttle: RetryThrottle) -> Self {
        self.throttle = Some(throttle);
        self
    }

    /// The policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// The throttle, if one is set.
    pub fn throttle_ref(&self) -> Option<&RetryThrottle> {
        self.throttle.as_ref()
    }

    /// Retries across distinct replicas of one backend: a call's first
    /// attempt goes to the next replica in turn, attempt `k` to the `k`-th
    /// one after it, so a retry never lands on the replica that just failed
    /// (while there are others).
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] when `replicas` is empty.
    pub fn replicas<S>(&self, replicas: Vec<S>) -> Result<Retry<S>, InvalidConfig> {
        if replicas.is_empty() {
            return Err(InvalidConfig::new("replicas", "must not be empty"));
        }
        Ok(self.around(Backends::Many {
            list: Arc::new(replicas),
            next: Arc::new(AtomicUsize::new(0)),
        }))
    }

    /// Retries across the replicas a `tower::discover` source yields (a
    /// [`ServiceList`](tower::discover::ServiceList), or a stream of changes
    /// from service discovery), as [`replicas`](Self::replicas) does for a
    /// fixed list.
    pub fn discover<D: Discover>(&self, discover: D) -> RetryDiscover<D> {
        RetryDiscover::new(
            discover,
            self.around(Backends::Many {
                list: Arc::new(Vec::new()),
                next: Arc::new(AtomicUsize::new(0)),
            }),
        )
    }

    fn around<S>(&self, backends: Backends<S>) -> Retry<S> {
        Retry {
            backends,
            policy: self.policy.clone(),
            throttle: self.throttle.clone(),
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        self.around(Backends::One(inner))
    }
}
