use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use atscale_core::{
    BoxError, Carrier, Context, Deadline as RequestDeadline, DeadlineExceeded, MalformedDeadline,
    Origin,
};
use http::HeaderMap;
use tokio::time::Instant;
use tower_service::Service;

use crate::codec::{self, GRPC_TIMEOUT};
use crate::future::ResponseFuture;
use crate::layer::{Config, Role};
use crate::metrics::{self, Stage};

/// Enforces a deadline with context on each request: see the [crate documentation](crate).
///
/// Built by [`DeadlineLayer`](crate::DeadlineLayer).
///
/// # Backpressure
///
/// `poll_ready` delegates to the inner service. The deadline starts when
/// `call` is made, so time spent waiting for readiness is not charged to it;
/// put a [`DeadlineLayer`](crate::DeadlineLayer) outside layers that wait in
/// `poll_ready` if that time should count.
#[derive(Clone, Debug)]
pub struct Deadline<S> {
    inner: S,
    // Shared: hyper and tonic clone the service per request, and a clone is
    // then one reference count, not the settings (and a header name) copied.
    config: Arc<Config>,
}

impl<S> Deadline<S> {
    pub(crate) const fn new(inner: S, config: Arc<Config>) -> Self {
        Deadline { inner, config }
    }

    atscale_core::inner_accessors!();
}

impl<S, Req> Service<Req> for Deadline<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    Req: Carrier,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    // Always inlined: out of line, the request is copied into this frame
    // and the returned future read back through the stack, which cost a
    // field-carried request 20-25 ns more in benches/deadline.rs (the
    // compiler's choice flipped with unrelated edits). The header scan is
    // out of line instead (`wire_deadline`).
    #[inline(always)]
    fn call(&mut self, mut req: Req) -> Self::Future {
        let now = Instant::now();
        let current;
        let parent = match req.context() {
            Some(cx) => Some(cx),
            None => {
                current = Context::current();
                current.as_ref()
            }
        };
        let deadline = match effective_deadline(&self.config, &req, parent, now) {
            Ok(deadline) => deadline,
            Err(malformed) => {
                metrics::malformed();
                return ResponseFuture::failed(malformed.into());
            }
        };
        if let Some(deadline) = deadline {
            if deadline.is_expired_at(now) {
                metrics::exceeded(deadline.origin(), Stage::Arrival);
                return ResponseFuture::failed(DeadlineExceeded::at(deadline, now).into());
            }
            // Every candidate was made from `now` (`after(now, ..)`,
            // `inherited(now, ..)`), so the budget of the one chosen is what
            // remains of it now: no second subtraction of instants.
            debug_assert_eq!(deadline.budget(), deadline.remaining_at(now));
            metrics::arrived(deadline.origin(), deadline.budget());
        }
        let cx = match (deadline, parent) {
            (Some(deadline), Some(parent)) => parent.child_until(deadline),
            (Some(deadline), None) => Context::until(deadline),
            (None, Some(parent)) => parent.child(),
            (None, None) => Context::new(),
        };
        if let Some(deadline) = deadline
            && self.config.role == Role::Client
        {
            write_budget(&self.config, &mut req, deadline.budget());
        }
        req.set_context(cx.clone());
        // The context's deadline is `deadline` (a child never outlives its
        // parent, and the parent's is part of `deadline` already).
        let inner = cx.scope_with(|| self.inner.call(req));
        ResponseFuture::running(inner)
    }
}

/// The earliest of the layer's budget, the parent context's deadline and the
/// deadlines on the wire (server: incoming; client: already on the request).
#[inline(always)]
fn effective_deadline<Req: Carrier>(
    config: &Config,
    req: &Req,
    parent: Option<&Context>,
    now: Instant,
) -> Result<Option<RequestDeadline>, MalformedDeadline> {
    let own = RequestDeadline::after(now, config.budget, Origin::Local);
    let inherited = parent.and_then(Context::deadline).map(|d| {
        // A parent's local budget is this hop's inherited one; deadlines the
        // parent itself inherited keep saying where they came from.
        let origin = match d.origin() {
            Origin::Local => Origin::Parent,
            other => other,
        };
        d.inherited(now, origin)
    });
    let deadline = RequestDeadline::earliest(own, inherited);
    if config.role == Role::InProcess {
        return Ok(deadline);
    }
    match req.headers() {
        Some(headers) => wire_deadline(config, headers, now, deadline),
        None => Ok(deadline),
    }
}

/// `deadline` tightened by the deadlines on the wire (server: incoming;
/// client: already on the request).
#[inline(never)]
fn wire_deadline(
    config: &Config,
    headers: &HeaderMap,
    now: Instant,
    mut deadline: Option<RequestDeadline>,
) -> Result<Option<RequestDeadline>, MalformedDeadline> {
    // On a client, a grpc-timeout already on the request is the caller's own
    // choice for this call (tonic's `Request::set_timeout`): a local budget.
    let (grpc_origin, header_origin) = match config.role {
        Role::Client => (Origin::Local, Origin::Local),
        _ => (Origin::GrpcTimeout, Origin::Header),
    };
    let (grpc_timeout, own_header) =
        codec::deadline_headers(headers, config.grpc_timeout, config.header.as_ref());
    if let Some(value) = grpc_timeout? {
        let budget = codec::parse_grpc_timeout(value.as_bytes())?;
        deadline =
            RequestDeadline::earliest(deadline, RequestDeadline::after(now, budget, grpc_origin));
    }
    if let (Some(name), Some(value)) = (&config.header, own_header?) {
        let budget = codec::parse_millis(name, value.as_bytes())?;
        deadline =
            RequestDeadline::earliest(deadline, RequestDeadline::after(now, budget, header_origin));
    }
    Ok(deadline)
}

fn write_budget<Req: Carrier>(config: &Config, req: &mut Req, remaining: std::time::Duration) {
    let Some(headers) = req.headers_mut() else {
        return;
    };
    if config.grpc_timeout {
        headers.insert(GRPC_TIMEOUT, codec::encode_grpc_timeout(remaining));
    }
    if let Some(name) = &config.header {
        headers.insert(name.clone(), codec::encode_millis(remaining));
    }
}
