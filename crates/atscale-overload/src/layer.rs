use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use atscale_core::Clock;
use http::HeaderName;
use tower_layer::Layer;

use crate::codel::CoDel;
use crate::criticality::CRITICALITY_HEADER;
use crate::error::ConfigError;
use crate::limit::{Algorithm, Vegas};
use crate::queue::{Settings, Shared};
use crate::service::Overload;

/// Adaptive concurrency limit, CoDel / adaptive-LIFO admission queue,
/// deadline-aware admission and criticality: see [`Overload`] and the
/// [crate documentation](crate).
///
/// The limit, the requests in flight and the queue live behind an `Arc`:
/// every service this layer (or a clone of it) builds shares them, so no
/// clone escapes the limit. Build another layer for another limit.
#[derive(Clone)]
pub struct OverloadLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for OverloadLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OverloadLayer")
            .field("admission", &self.admission())
            .field("header", &self.shared.header)
            .finish()
    }
}

impl Default for OverloadLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl OverloadLayer {
    /// The defaults: [`Vegas`], limits 1..=1000 starting at 20, a queue of
    /// 1024, CoDel 5 ms / 100 ms, deadline-aware admission, criticality from
    /// `x-criticality`.
    pub fn new() -> Self {
        Self::builder().build().expect("the defaults are valid")
    }

    /// Every setting.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The shared state: the current limit, in flight, queue depth.
    pub fn admission(&self) -> Admission {
        Admission {
            shared: self.shared.clone(),
        }
    }
}

impl<S> Layer<S> for OverloadLayer {
    type Service = Overload<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Overload::new(inner, self.shared.clone())
    }
}

/// Read-only view of an overload layer's shared state, cheap to clone.
#[derive(Clone)]
pub struct Admission {
    pub(crate) shared: Arc<Shared>,
}

impl Admission {
    /// The current concurrency limit.
    pub fn limit(&self) -> usize {
        self.shared.limit()
    }

    /// Requests in service now.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight()
    }

    /// Requests waiting in the admission queue now.
    pub fn queue_depth(&self) -> usize {
        self.shared.queued()
    }

    /// The typical service time (a moving average of successful requests'),
    /// once one has finished.
    pub fn service_time(&self) -> Option<Duration> {
        self.shared.service_time()
    }

    /// Whether CoDel judges the queue standing (it then serves newest first).
    pub fn is_standing(&self) -> bool {
        self.shared.standing()
    }
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("limit", &self.limit())
            .field("in_flight", &self.in_flight())
            .field("queue_depth", &self.queue_depth())
            .finish()
    }
}

/// Builds an [`OverloadLayer`]; every setting is checked by [`build`](Builder::build).
#[must_use]
pub struct Builder {
    algorithm: Box<dyn Algorithm>,
    min: usize,
    max: usize,
    initial: usize,
    capacity: usize,
    codel: CoDel,
    deadline_aware: bool,
    sampling: u32,
    header: HeaderName,
    clock: Clock,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            algorithm: Box::new(Vegas::default()),
            min: 1,
            max: 1000,
            initial: 20,
            capacity: 1024,
            codel: CoDel::default(),
            deadline_aware: true,
            sampling: 64,
            header: CRITICALITY_HEADER,
            clock: Clock::default(),
        }
    }
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("algorithm", &self.algorithm)
            .field("min_limit", &self.min)
            .field("max_limit", &self.max)
            .field("initial_limit", &self.initial)
            .field("queue_capacity", &self.capacity)
            .field("codel", &self.codel)
            .field("deadline_aware", &self.deadline_aware)
            .field("sampling", &self.sampling)
            .field("criticality_header", &self.header)
            .finish()
    }
}

impl Builder {
    /// The limit algorithm ([`Vegas`] by default; [`Gradient2`](crate::limit::Gradient2),
    /// [`Aimd`](crate::limit::Aimd), or your own).
    pub fn algorithm(mut self, algorithm: impl Algorithm) -> Self {
        self.algorithm = Box::new(algorithm);
        self
    }

    /// The lowest the limit goes (default 1, at least 1).
    pub fn min_limit(mut self, min: usize) -> Self {
        self.min = min;
        self
    }

    /// The highest the limit goes (default 1000).
    pub fn max_limit(mut self, max: usize) -> Self {
        self.max = max;
        self
    }

    /// The limit to start from (default 20, clamped to the bounds).
    pub fn initial_limit(mut self, initial: usize) -> Self {
        self.initial = initial;
        self
    }

    /// How many requests may wait for a slot (default 1024; 0: none wait).
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// CoDel's target and interval (5 ms / 100 ms by default).
    pub fn codel(mut self, codel: CoDel) -> Self {
        self.codel = codel;
        self
    }

    /// Whether to refuse at arrival a request whose remaining deadline cannot
    /// cover its expected wait and a typical service time (default true).
    pub fn deadline_aware(mut self, on: bool) -> Self {
        self.deadline_aware = on;
        self
    }

    /// At low load, time one request in `every` (default 64; 1 times every
    /// request).
    ///
    /// A timed request reads the clock at admission and at its end and
    /// teaches the algorithm and the service-time estimate under the
    /// layer's lock; the others only take and give back their slot (the
    /// lock is taken only if someone waits for it), which is most of the
    /// layer's cost at low load. While an eighth to half of the limit is in
    /// flight (where an algorithm only cuts the limit: it is not the
    /// bottleneck) one request in `every / 8` is timed. Every request is
    /// timed while others are in flight with it and at least half of the
    /// limit is (where the limit moves and requests may wait), during the
    /// layer's first 1,000 requests
    /// (which set the
    /// algorithm's minimum latency and the service-time estimate), and for
    /// the next `every` requests after an untimed one failed overloaded or
    /// past its deadline, or was dropped in service (its deadline is not
    /// read, so a caller that went away counts too).
    pub fn sampling(mut self, every: u32) -> Self {
        self.sampling = every;
        self
    }

    /// The header (or gRPC metadata key) holding a request's
    /// [`Criticality`](crate::Criticality) (default `x-criticality`).
    pub fn criticality_header(mut self, name: HeaderName) -> Self {
        self.header = name;
        self
    }

    /// The clock timing waits and service times (default [`Clock::quanta`];
    /// [`Clock::tokio`] for tests on tokio's paused clock).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Checks the settings and builds the layer.
    pub fn build(self) -> Result<OverloadLayer, ConfigError> {
        if self.min == 0 {
            return Err(ConfigError::new("min_limit", "must be at least 1"));
        }
        if self.max < self.min {
            return Err(ConfigError::new("max_limit", "must be at least min_limit"));
        }
        if self.sampling == 0 {
            return Err(ConfigError::new("sampling", "must be at least 1"));
        }
        let settings = Settings {
            min: self.min,
            max: self.max,
            initial: self.initial.clamp(self.min, self.max),
            capacity: self.capacity,
            deadline_aware: self.deadline_aware,
            sampling: self.sampling,
        };
        Ok(OverloadLayer {
            shared: Arc::new(Shared::new(
                self.algorithm,
                settings,
                self.codel,
                self.clock,
                self.header,
            )),
        })
    }
}
