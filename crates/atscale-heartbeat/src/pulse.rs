//! Pulses: what a [`Monitor`](crate::Monitor) tells its subscribers.

use std::fmt;
use std::time::Duration;

/// Identifies one request for the life of a monitor; ids are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(u64);

impl RequestId {
    pub(crate) const fn new(n: u64) -> Self {
        RequestId(n)
    }

    /// The id as a number: requests are numbered from 1 in the order they started.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!("#{}", self.0))
    }
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The response (and its whole body, for streaming responses) was
    /// delivered, and does not say the service failed (a 4xx, or a gRPC
    /// status such as `NOT_FOUND`, is the caller's mistake, served).
    Ok,
    /// The service failed: the inner service or the response body failed,
    /// or the answer says so (a 5xx but 501 and 505; a gRPC `UNKNOWN`,
    /// `DEADLINE_EXCEEDED`, `INTERNAL`, `UNAVAILABLE` or `DATA_LOSS`, in the
    /// trailers or in a trailers-only head).
    Error,
    /// The caller gave up: the response future or body was dropped before the end.
    Cancelled,
    /// The stall watchdog cut the request: no progress for the configured time.
    Stalled,
    /// A limit turned the request away instead of serving it: the inner
    /// service failed with a rate-limited or overloaded error, or answered
    /// 429 or gRPC `RESOURCE_EXHAUSTED`. Counted, not a failure: a service
    /// shedding what it was told to shed is working.
    Refused,
}

impl Outcome {
    /// A short lower-case name: `ok`, `error`, `cancelled`, `stalled` or `refused`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
            Outcome::Stalled => "stalled",
            Outcome::Refused => "refused",
        }
    }

    /// Whether the outcome counts against the service's health
    /// ([`Outcome::Error`] and [`Outcome::Stalled`]; a caller giving up, or a
    /// limit refusing the request, does not).
    pub const fn is_failure(self) -> bool {
        matches!(self, Outcome::Error | Outcome::Stalled)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One heartbeat, as seen by a subscriber of a [`Monitor`](crate::Monitor).
///
/// `Started`, `Progress` and `Finished` are pulses *per unit of work*;
/// `Beat` is the pulse *at an interval*, sent by the monitor's own task
/// while requests are in flight (and while idle, if asked).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Pulse {
    /// A request reached the layer and was handed to the inner service.
    Started {
        /// The request.
        id: RequestId,
    },
    /// A request made progress: its streaming response produced a body
    /// frame, or its handler reported a unit of work ([`Progress`](crate::Progress)).
    Progress {
        /// The request.
        id: RequestId,
        /// Units of progress so far, this one included.
        units: u64,
    },
    /// A request ended.
    Finished {
        /// The request.
        id: RequestId,
        /// How it ended.
        outcome: Outcome,
        /// Time from start to end (including the body, for streaming responses).
        elapsed: Duration,
    },
    /// The interval pulse: the monitor is alive, and this is how busy it is.
    Beat {
        /// Requests in flight.
        in_flight: usize,
        /// The longest time any in-flight request has gone without progress.
        longest_idle: Option<Duration>,
    },
}

impl Pulse {
    /// The request the pulse is about; `None` for [`Pulse::Beat`].
    pub const fn id(&self) -> Option<RequestId> {
        match self {
            Pulse::Started { id } | Pulse::Progress { id, .. } | Pulse::Finished { id, .. } => {
                Some(*id)
            }
            Pulse::Beat { .. } => None,
        }
    }
}

impl fmt::Display for Pulse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Pulse::Started { id } => format!("{id} started"),
            Pulse::Progress { id, units } => format!("{id} progress ({units})"),
            Pulse::Finished {
                id,
                outcome,
                elapsed,
            } => format!("{id} finished {outcome} after {elapsed:?}"),
            Pulse::Beat {
                in_flight,
                longest_idle: Some(idle),
            } => format!("beat: {in_flight} in flight, longest idle {idle:?}"),
            Pulse::Beat { in_flight, .. } => format!("beat: {in_flight} in flight"),
        };
        f.pad(&s)
    }
}
