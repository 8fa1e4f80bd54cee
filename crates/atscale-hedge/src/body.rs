//! Buffering streaming request bodies so that they can be replayed.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::future::BufferFuture;
use crate::replay::{ReplayBody, idempotent};

pin_project! {
    /// A request body read ahead by [`BufferBodyLayer`]: either complete in
    /// memory, so it can be replayed by a hedge, or — when it was larger than
    /// the limit, failed, or did not match its `Content-Length` — the part
    /// read so far followed by the rest of the original body, sent once.
    ///
    /// Either way it yields exactly the bytes, trailers and error of the
    /// original body.
    pub struct BufferedBody<B: Body> {
        #[pin]
        state: State<B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<B: Body> {
        Complete {
            data: Bytes,
            trailers: Option<HeaderMap>,
            replayable: bool,
            next: u8,
        },
        Partial {
            prefix: VecDeque<Frame<Bytes>>,
            error: Option<B::Error>,
            #[pin]
            rest: B,
            done: bool,
        },
    }
}

const DATA: u8 = 0;
const TRAILERS: u8 = 1;
const END: u8 = 2;

impl<B: Body> BufferedBody<B> {
    /// A body held in memory, replayable.
    pub fn from_bytes(data: Bytes) -> Self {
        BufferedBody::complete(data, None, true)
    }

    pub(crate) fn complete(data: Bytes, trailers: Option<HeaderMap>, replayable: bool) -> Self {
        BufferedBody {
            state: State::Complete {
                data,
                trailers,
                replayable,
                next: DATA,
            },
        }
    }

    pub(crate) fn partial(
        prefix: VecDeque<Frame<Bytes>>,
        rest: B,
        error: Option<B::Error>,
    ) -> Self {
        let done = error.is_some();
        BufferedBody {
            state: State::Partial {
                prefix,
                error,
                rest,
                done,
            },
        }
    }

    /// Whether the whole body is in memory and can be replayed.
    pub fn is_replayable(&self) -> bool {
        matches!(
            self.state,
            State::Complete {
                replayable: true,
                ..
            }
        )
    }
}

impl<B: Body> ReplayBody for BufferedBody<B> {
    fn replay_body(&self) -> Option<Self> {
        match &self.state {
            State::Complete {
                data,
                trailers,
                replayable: true,
                ..
            } => Some(BufferedBody::complete(data.clone(), trailers.clone(), true)),
            _ => None,
        }
    }
}

impl<B: Body> std::fmt::Debug for BufferedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.state {
            State::Complete {
                data, replayable, ..
            } => f
                .debug_struct("BufferedBody::Complete")
                .field("len", &data.len())
                .field("replayable", replayable)
                .finish(),
            State::Partial { prefix, .. } => f
                .debug_struct("BufferedBody::Partial")
                .field("buffered_frames", &prefix.len())
                .finish_non_exhaustive(),
        }
    }
}

impl<B> Body for BufferedBody<B>
where
    B: Body,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().state.project() {
            StateProj::Complete {
                data,
                trailers,
                next,
                ..
            } => {
                if *next == DATA {
                    *next = TRAILERS;
                    if !data.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(data.clone()))));
                    }
                }
                if *next == TRAILERS {
                    *next = END;
                    if let Some(t) = trailers {
                        return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
                    }
                }
                Poll::Ready(None)
            }
            StateProj::Partial {
                prefix,
                error,
                rest,
                done,
            } => {
                if let Some(frame) = prefix.pop_front() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                if let Some(e) = error.take() {
                    return Poll::Ready(Some(Err(e)));
                }
                if *done {
                    return Poll::Ready(None);
                }
                let frame = ready!(rest.poll_frame(cx));
                Poll::Ready(match frame {
                    None => {
                        *done = true;
                        None
                    }
                    Some(Err(e)) => {
                        *done = true;
                        Some(Err(e))
                    }
                    Some(Ok(frame)) => {
                        Some(Ok(frame.map_data(|mut d| d.copy_to_bytes(d.remaining()))))
                    }
                })
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Complete {
                data,
                trailers,
                next,
                ..
            } => {
                *next == END
                    || (*next == TRAILERS && trailers.is_none())
                    || (*next == DATA && data.is_empty() && trailers.is_none())
            }
            State::Partial {
                prefix,
                error,
                rest,
                done,
            } => prefix.is_empty() && error.is_none() && (*done || rest.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Complete { data, next, .. } => {
                SizeHint::with_exact(if *next == DATA { data.len() as u64 } else { 0 })
            }
            State::Partial {
                prefix, rest, done, ..
            } => {
                let buffered: u64 = prefix
                    .iter()
                    .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
                    .sum();
                if *done {
                    return SizeHint::with_exact(buffered);
                }
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + buffered);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + buffered);
                }
                hint
            }
        }
    }
}

/// Reads request bodies into memory, up to a byte limit, so that a
/// [`Hedge`](crate::Hedge) below can replay them: the inner service sees
/// `http::Request<BufferedBody<B>>`.
///
/// A body is buffered only when the request may be hedged: its method is
/// idempotent (or the layer was built with
/// [`non_idempotent`](BufferBodyLayer::non_idempotent)), and neither its
/// `Content-Length` nor its size hint is over the limit. A body that turns
/// out to be over the limit, fails while being read, or does not match its
/// `Content-Length` is passed on as it is — the part read so far, then the
/// rest — and the request is sent once, unhedged. Nothing is lost or
/// reordered.
///
/// Made for gRPC unary calls (one small message): tonic's request body is a
/// stream, so without buffering no hedge could be sent.
///
/// # Backpressure
///
/// `poll_ready` delegates to the inner service; the ready service is moved
/// into the response future and called once the body is read.
#[derive(Clone, Copy, Debug)]
pub struct BufferBodyLayer {
    limit: usize,
    non_idempotent: bool,
}

impl BufferBodyLayer {
    /// Buffers bodies of up to `limit` bytes, for idempotent methods only.
    pub const fn new(limit: usize) -> Self {
        BufferBodyLayer {
            limit,
            non_idempotent: false,
        }
    }

    /// Also buffers requests whose method is not idempotent (POST, PATCH):
    /// needed for gRPC, where every call is a POST. Pair it with
    /// [`HedgeBuilder::non_idempotent`](crate::HedgeBuilder::non_idempotent).
    #[must_use]
    pub const fn non_idempotent(mut self, allow: bool) -> Self {
        self.non_idempotent = allow;
        self
    }
}

impl<S> Layer<S> for BufferBodyLayer {
    type Service = BufferBody<S>;

    fn layer(&self, inner: S) -> BufferBody<S> {
        BufferBody {
            inner,
            limit: self.limit,
            non_idempotent: self.non_idempotent,
        }
    }
}

/// The service of [`BufferBodyLayer`].
#[derive(Clone, Debug)]
pub struct BufferBody<S> {
    inner: S,
    limit: usize,
    non_idempotent: bool,
}

impl<S> BufferBody<S> {
    atscale_core::inner_accessors!();
}

impl<S, B> Service<http::Request<B>> for BufferBody<S>
where
    S: Service<http::Request<BufferedBody<B>>> + Clone,
    B: Body + Unpin,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BufferFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut svc = std::mem::replace(&mut self.inner, clone);
        let declared = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let limit = self.limit as u64;
        let may_hedge = self.non_idempotent || idempotent(req.method());
        let fits = req.body().size_hint().lower() <= limit && declared.is_none_or(|n| n <= limit);
        if !(may_hedge && fits) {
            let (parts, body) = req.into_parts();
            let req = http::Request::from_parts(
                parts,
                BufferedBody::partial(VecDeque::new(), body, None),
            );
            return BufferFuture::calling(svc.call(req));
        }
        let (parts, body) = req.into_parts();
        BufferFuture::buffering(svc, parts, body, self.limit, declared)
    }
}

/// Reading a body into memory, as the buffering future does it.
#[derive(Debug)]
pub(crate) struct Reader {
    pub(crate) frames: VecDeque<Frame<Bytes>>,
    pub(crate) len: usize,
    pub(crate) limit: usize,
    pub(crate) declared: Option<u64>,
}

/// What reading one more frame led to.
pub(crate) enum Step<B: Body> {
    More,
    Done(BufferedBody<B>),
}

impl Reader {
    pub(crate) fn step<B: Body + Unpin>(
        &mut self,
        body: &mut Option<B>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Step<B>> {
        let Some(inner) = body.as_mut() else {
            unreachable!("polled after the body was handed on")
        };
        match ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                let frame = frame.map_data(|mut d| d.copy_to_bytes(d.remaining()));
                if let Some(d) = frame.data_ref() {
                    self.len += d.len();
                }
                self.frames.push_back(frame);
                if self.len > self.limit {
                    let rest = body.take().expect("checked above");
                    let frames = std::mem::take(&mut self.frames);
                    return Poll::Ready(Step::Done(BufferedBody::partial(frames, rest, None)));
                }
                Poll::Ready(Step::More)
            }
            Some(Err(e)) => {
                let rest = body.take().expect("checked above");
                let frames = std::mem::take(&mut self.frames);
                Poll::Ready(Step::Done(BufferedBody::partial(frames, rest, Some(e))))
            }
            None => {
                let mut data = BytesMut::new();
                let mut single = None;
                let mut trailers = None;
                let chunks = self.frames.iter().filter(|f| f.is_data()).count();
                for frame in self.frames.drain(..) {
                    match frame.into_data() {
                        Ok(d) if chunks == 1 => single = Some(d),
                        Ok(d) => data.extend_from_slice(&d),
                        Err(frame) => {
                            if let Ok(t) = frame.into_trailers() {
                                trailers = Some(t);
                            }
                        }
                    }
                }
                let data = single.unwrap_or_else(|| data.freeze());
                let honest = self.declared.is_none_or(|n| n == data.len() as u64);
                body.take();
                Poll::Ready(Step::Done(BufferedBody::complete(data, trailers, honest)))
            }
        }
    }
}
