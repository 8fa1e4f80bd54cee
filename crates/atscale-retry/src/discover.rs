//! Retrying across replicas found by a `tower::discover::Discover` source.

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use atscale_core::BoxError;
use tower::discover::{Change, Discover};
use tower_service::Service;

use crate::future::ResponseFuture;
use crate::outcome::{RetryRequest, RetryResponse};
use crate::service::Retry;

/// [`Retry`] across the replicas a [`Discover`] source yields, kept up to
/// date as replicas come and go; built by
/// [`RetryLayer::discover`](crate::RetryLayer::discover).
///
/// Calls in flight keep the replica list they started with; a change
/// applies to the next calls (the list is copied on change, which is rare,
/// so that no call takes a lock).
///
/// # Backpressure
///
/// `poll_ready` applies the changes the source has ready, and is pending
/// while there is no replica at all (woken by the source). With replicas,
/// it is ready, and every attempt drives its replica's own `ready()`.
///
/// # Errors
///
/// A discovery error is returned by `poll_ready`; so is a source that ended
/// with no replica.
pub struct RetryDiscover<D: Discover> {
    discover: D,
    keys: Vec<D::Key>,
    retry: Retry<D::Service>,
}

impl<D: Discover> RetryDiscover<D> {
    pub(crate) fn new(discover: D, retry: Retry<D::Service>) -> Self {
        RetryDiscover {
            discover,
            keys: Vec::new(),
            retry,
        }
    }

    /// The replicas known now.
    pub fn replicas(&self) -> &[D::Service] {
        self.retry.replicas()
    }
}

impl<D: Discover> std::fmt::Debug for RetryDiscover<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryDiscover")
            .field("replicas", &self.keys.len())
            .field("policy", self.retry.policy())
            .finish_non_exhaustive()
    }
}

impl<D, Req> Service<Req> for RetryDiscover<D>
where
    D: Discover + Unpin,
    D::Error: Into<BoxError>,
    D::Service: Service<Req> + Clone,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
    <D::Service as Service<Req>>::Response: RetryResponse,
    Req: RetryRequest,
{
    type Response = <D::Service as Service<Req>>::Response;
    type Error = BoxError;
    type Future = ResponseFuture<D::Service, Req>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            match Pin::new(&mut self.discover).poll_discover(cx) {
                Poll::Ready(Some(Ok(Change::Insert(key, svc)))) => {
                    match self.keys.iter().position(|k| *k == key) {
                        Some(i) => self.retry.list_mut()[i] = svc,
                        None => {
                            self.keys.push(key);
                            self.retry.list_mut().push(svc);
                        }
                    }
                }
                Poll::Ready(Some(Ok(Change::Remove(key)))) => {
                    if let Some(i) = self.keys.iter().position(|k| *k == key) {
                        self.keys.swap_remove(i);
                        self.retry.list_mut().swap_remove(i);
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                Poll::Ready(None) if self.keys.is_empty() => {
                    return Poll::Ready(Err(
                        "retry: the discovery source ended with no replica".into()
                    ));
                }
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        if self.keys.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.retry.call(req)
    }
}
