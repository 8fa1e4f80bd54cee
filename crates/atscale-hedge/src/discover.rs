//! Hedging across replicas found by a `tower::discover::Discover` source.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use atscale_core::{BoxError, Carrier};
use tower::discover::{Change, Discover};
use tower_service::Service;

use crate::future::ResponseFuture;
use crate::policy::{Classify, Pick};
use crate::replay::Replay;
use crate::service::{Backends, Hedge};
use crate::stats::HedgeStats;

/// [`Hedge`] across the replicas a [`Discover`] source yields, kept up to
/// date as replicas come and go; built by
/// [`HedgeLayer::discover`](crate::HedgeLayer::discover).
///
/// Requests in flight keep the replica list they started with; a change
/// applies to the next requests (the list is copied on change, which is rare,
/// so that no request takes a lock).
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
pub struct HedgeDiscover<D: Discover, C, P> {
    discover: D,
    keys: Vec<D::Key>,
    hedge: Hedge<D::Service, C, P>,
}

impl<D: Discover, C, P> HedgeDiscover<D, C, P> {
    pub(crate) fn new(discover: D, hedge: Hedge<D::Service, C, P>) -> Self {
        HedgeDiscover {
            discover,
            keys: Vec::new(),
            hedge,
        }
    }

    /// Sends first attempts to the replica `pick` chooses; see [`Hedge::pick`].
    pub fn pick<P2>(self, pick: P2) -> HedgeDiscover<D, C, P2> {
        HedgeDiscover {
            discover: self.discover,
            keys: self.keys,
            hedge: self.hedge.pick(pick),
        }
    }

    /// The replicas known now.
    pub fn replicas(&self) -> &[D::Service] {
        self.hedge.replicas()
    }

    /// The counters shared with the layer.
    pub fn stats(&self) -> HedgeStats {
        self.hedge.stats()
    }

    fn list_mut(&mut self) -> &mut Vec<D::Service>
    where
        D::Service: Clone,
    {
        match &mut self.hedge.backends {
            Backends::Many(list) => Arc::make_mut(list),
            Backends::One(_) => unreachable!("built around a list"),
        }
    }
}

impl<D, C, P> std::fmt::Debug for HedgeDiscover<D, C, P>
where
    D: Discover,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HedgeDiscover")
            .field("replicas", &self.keys.len())
            .field("stats", &self.hedge.stats())
            .finish_non_exhaustive()
    }
}

impl<D, Req, C, P> Service<Req> for HedgeDiscover<D, C, P>
where
    D: Discover + Unpin,
    D::Error: Into<BoxError>,
    D::Service: Service<Req> + Clone,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
    Req: Replay + Carrier,
    C: Classify<<D::Service as Service<Req>>::Response, <D::Service as Service<Req>>::Error>
        + Clone,
    P: Pick<Req>,
{
    type Response = <D::Service as Service<Req>>::Response;
    type Error = BoxError;
    type Future = ResponseFuture<D::Service, Req, C>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            match Pin::new(&mut self.discover).poll_discover(cx) {
                Poll::Ready(Some(Ok(Change::Insert(key, svc)))) => {
                    match self.keys.iter().position(|k| *k == key) {
                        Some(i) => self.list_mut()[i] = svc,
                        None => {
                            self.keys.push(key);
                            self.list_mut().push(svc);
                        }
                    }
                }
                Poll::Ready(Some(Ok(Change::Remove(key)))) => {
                    if let Some(i) = self.keys.iter().position(|k| *k == key) {
                        self.keys.swap_remove(i);
                        self.list_mut().swap_remove(i);
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                Poll::Ready(None) if self.keys.is_empty() => {
                    return Poll::Ready(Err(
                        "hedge: the discovery source ended with no replica".into()
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
        self.hedge.call(req)
    }
}
