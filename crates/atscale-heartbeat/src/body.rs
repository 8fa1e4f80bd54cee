//! Body types: the heartbeat's tracked body, and the keep-alive body.

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use atscale_core::{BoxError, Kind, Stalled};
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::future::watchdog;
use crate::pulse::Outcome;
use crate::track::Ticket;

pub use crate::keepalive::KeepAliveBody;

pin_project! {
    /// The body of a response that passed through a
    /// [`Heartbeat`](crate::Heartbeat) layer: each frame is a unit of
    /// progress, and its end (or failure, stall, or being dropped) ends the request.
    ///
    /// With the stall watchdog on, a body that produces no frame for the
    /// limit is cut: the inner body is dropped, the request's context is
    /// cancelled, and the body fails with [`Stalled`] — except for a gRPC
    /// response (`content-type: application/grpc…`), which ends instead with
    /// trailers carrying `grpc-status: 14` (`UNAVAILABLE`, the code of
    /// [`Kind::Stalled`]) and the stall as `grpc-message`, so the client sees
    /// a proper status rather than a broken stream.
    ///
    /// The request ends as its answer says: a 5xx head (but 501 and 505) or
    /// a `grpc-status` a server gives when it cannot serve (`UNKNOWN`,
    /// `DEADLINE_EXCEEDED`, `INTERNAL`, `UNAVAILABLE`, `DATA_LOSS`), in the
    /// trailers or in a trailers-only head, is [`Outcome::Error`]; a 429 or
    /// `RESOURCE_EXHAUSTED` is [`Outcome::Refused`]; anything else delivered
    /// is [`Outcome::Ok`].
    #[derive(Debug)]
    pub struct TrackedBody<B> {
        #[pin]
        inner: Option<B>,
        // Boxed: the timer is large, and only the stall watchdog needs it,
        // so every response moved through the stack stays small.
        timer: Option<Pin<Box<Sleep>>>,
        ticket: Option<Ticket>,
        grpc: bool,
        // How the request ends when the body does: from the head, then
        // from the trailers' `grpc-status`.
        outcome: Outcome,
    }
}

impl<B: Body> TrackedBody<B> {
    pub(crate) fn new(inner: B, mut ticket: Ticket, grpc: bool, outcome: Outcome) -> Self {
        if inner.is_end_stream() {
            // Nothing to follow: the request ends with its head.
            ticket.finish(outcome);
            return TrackedBody {
                inner: Some(inner),
                timer: None,
                ticket: None,
                grpc,
                outcome,
            };
        }
        ticket.touch();
        let timer = ticket
            .stall()
            .and_then(|stall| Instant::now().checked_add(stall))
            .map(|due| Box::pin(tokio::time::sleep_until(due)));
        let ticket = Some(ticket);
        TrackedBody {
            inner: Some(inner),
            timer,
            ticket,
            grpc,
            outcome,
        }
    }
}

impl<B> TrackedBody<B> {
    /// The inner body, unless the stall watchdog already dropped it.
    pub fn get_ref(&self) -> Option<&B> {
        self.inner.as_ref()
    }

    fn finish(ticket: &mut Option<Ticket>, outcome: Outcome) {
        if let Some(ticket) = ticket.take() {
            ticket.finish(outcome);
        }
    }
}

impl<B> Body for TrackedBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        match inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                // Trailers are a body's last frame, whether or not it says
                // so (a server sends them and stops polling).
                let trailers = frame.trailers_ref();
                if let Some(said) = trailers.and_then(crate::verdict::of_grpc) {
                    *this.outcome = said;
                }
                let ended = trailers.is_some()
                    || this
                        .inner
                        .as_ref()
                        .as_pin_ref()
                        .is_some_and(|b| b.is_end_stream());
                if ended {
                    if let Some(ticket) = this.ticket.take() {
                        ticket.last_frame(*this.outcome);
                    }
                } else if let Some(ticket) = this.ticket.as_mut() {
                    // The watchdog reads the progress when it fires: no timer reset per frame.
                    ticket.frame();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                Self::finish(this.ticket, Outcome::Error);
                Poll::Ready(Some(Err(err.into())))
            }
            Poll::Ready(None) => {
                Self::finish(this.ticket, *this.outcome);
                Poll::Ready(None)
            }
            Poll::Pending => {
                let (Some(timer), Some(ticket)) = (this.timer.as_mut(), this.ticket.as_ref())
                else {
                    return Poll::Pending;
                };
                let Some(idle) = watchdog(timer.as_mut(), ticket, cx) else {
                    return Poll::Pending;
                };
                // Stalled: drop the inner body now, cancel the request's context.
                this.inner.set(None);
                *this.timer = None;
                Self::finish(this.ticket, Outcome::Stalled);
                let stalled = Stalled::new(idle);
                if *this.grpc {
                    return Poll::Ready(Some(Ok(Frame::trailers(grpc_trailers(&stalled)))));
                }
                Poll::Ready(Some(Err(Box::new(stalled))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// The trailers that end a stalled gRPC stream: `UNAVAILABLE` and the error's text.
fn grpc_trailers(stalled: &Stalled) -> HeaderMap {
    let mut trailers = HeaderMap::with_capacity(2);
    let code = Kind::Stalled.grpc_code() as i32;
    trailers.insert("grpc-status", HeaderValue::from(code));
    let message = atscale_core::grpc::percent_encode(&stalled.to_string());
    if let Ok(message) = HeaderValue::from_str(&message) {
        trailers.insert("grpc-message", message);
    }
    trailers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalled_grpc_trailers_say_unavailable() {
        let trailers = grpc_trailers(&Stalled::new(std::time::Duration::from_secs(2)));
        assert_eq!(trailers["grpc-status"], "14");
        assert_eq!(trailers["grpc-message"], "stalled: no progress for 2s");
    }
}
