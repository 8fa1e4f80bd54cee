use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use tower_layer::{Identity, Layer};

use crate::attempt;
use crate::body::BodyDeadlineLayer;
use crate::service::Deadline;

/// Which side of a call the layer sits on: it decides whether deadlines are
/// read from the wire or written to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Context only: no headers read or written (non-HTTP requests).
    InProcess,
    /// Reads the caller's deadline from incoming headers.
    Server,
    /// Writes the remaining budget into outgoing headers.
    Client,
}

/// The layer's settings, shared by every service it builds.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) budget: Duration,
    pub(crate) role: Role,
    pub(crate) grpc_timeout: bool,
    pub(crate) header: Option<HeaderName>,
}

/// Applies a deadline with context to every request: see [`Deadline`] and the
/// [crate documentation](crate).
///
/// The effective deadline is the earliest of now + `budget` and every
/// inherited one: the request's [`Context`](atscale_core::Context), the
/// task-local one of the request being served, and (server side) the
/// caller's `grpc-timeout` or configured header.
///
/// The deadline covers a request until its response head;
/// [`with_bodies`](Self::with_bodies) extends it over the request and
/// response bodies (the layer's second type parameter is then a
/// [`BodyDeadlineLayer`] inside it).
#[derive(Clone, Debug)]
pub struct DeadlineLayer<L = Identity> {
    config: Config,
    inner: L,
}

impl DeadlineLayer {
    /// Enforces `budget` and inherits deadlines in-process only (request
    /// extensions and the task-local scope); reads and writes no headers.
    ///
    /// A budget of [`Duration::MAX`] adds no deadline of its own: the layer
    /// then only inherits, propagates and enforces.
    pub const fn new(budget: Duration) -> Self {
        DeadlineLayer {
            config: Config {
                budget,
                role: Role::InProcess,
                grpc_timeout: false,
                header: None,
            },
            inner: Identity::new(),
        }
    }

    /// For servers: also inherits the caller's deadline from an incoming
    /// `grpc-timeout` header (and from [`with_header`](Self::with_header)'s
    /// header when set). A malformed value fails the request with
    /// [`MalformedDeadline`](atscale_core::MalformedDeadline).
    pub const fn server(budget: Duration) -> Self {
        DeadlineLayer {
            config: Config {
                budget,
                role: Role::Server,
                grpc_timeout: true,
                header: None,
            },
            inner: Identity::new(),
        }
    }

    /// For clients: also writes the remaining budget into the outgoing
    /// `grpc-timeout` header (and [`with_header`](Self::with_header)'s header
    /// when set), so the callee inherits the deadline. A `grpc-timeout` already
    /// on the request (tonic's `Request::set_timeout`) counts as one more
    /// deadline to respect.
    pub const fn client(budget: Duration) -> Self {
        DeadlineLayer {
            config: Config {
                budget,
                role: Role::Client,
                grpc_timeout: true,
                header: None,
            },
            inner: Identity::new(),
        }
    }

    /// Also enforces the deadline over the request's bodies, as
    /// `bodies` says (a gRPC stream or an SSE response that outlives the
    /// deadline is cut): see [`BodyDeadlineLayer`].
    pub fn with_bodies(self, bodies: BodyDeadlineLayer) -> DeadlineLayer<BodyDeadlineLayer> {
        DeadlineLayer {
            config: self.config,
            inner: bodies,
        }
    }
}

impl<L> DeadlineLayer<L> {
    /// Also reads (server) or writes (client) `name`, holding a budget in
    /// whole milliseconds, for plain HTTP hops.
    ///
    /// The name is also remembered for [`attempt::refresh`]: a retry or a
    /// hedge below a client layer rewrites this header, when a request
    /// carries it, on every copy it sends.
    #[must_use]
    pub fn with_header(mut self, name: HeaderName) -> Self {
        attempt::register(&name);
        self.config.header = Some(name);
        self
    }

    /// Neither reads nor writes `grpc-timeout` (for HTTP-only stacks that want
    /// only their own header).
    #[must_use]
    pub fn without_grpc_timeout(mut self) -> Self {
        self.config.grpc_timeout = false;
        self
    }

    /// The layer's own budget.
    pub const fn budget(&self) -> Duration {
        self.config.budget
    }
}

impl<S, L: Layer<S>> Layer<S> for DeadlineLayer<L> {
    type Service = Deadline<L::Service>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline::new(self.inner.layer(inner), Arc::new(self.config.clone()))
    }
}
