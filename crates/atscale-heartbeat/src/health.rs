//! Health: the monitor's state as serving / not serving, for probes.
//!
//! [`Monitor::health`] gives a [`Health`] snapshot. With the `axum` feature,
//! `route` serves it as an HTTP probe (200 or 503); with the `tonic`
//! feature, `report` keeps a `tonic_health` reporter up to date, so the
//! standard `grpc.health.v1.Health` service answers from the heartbeat.

use std::fmt;

#[allow(unused_imports)] // used by the feature-gated items and their docs
use crate::monitor::Monitor;

/// A snapshot of a [`Monitor`]'s health; see [`Monitor::health`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Health {
    in_flight: usize,
    stuck: usize,
    failures_in_a_row: u32,
    unhealthy_after: u32,
}

impl Health {
    pub(crate) const fn new(
        in_flight: usize,
        stuck: usize,
        failures_in_a_row: u32,
        unhealthy_after: u32,
    ) -> Self {
        Health {
            in_flight,
            stuck,
            failures_in_a_row,
            unhealthy_after,
        }
    }

    /// Serving: fewer failures in a row than the monitor's limit, and no
    /// request in flight without progress for the stall limit.
    pub const fn is_serving(&self) -> bool {
        self.failures_in_a_row < self.unhealthy_after && self.stuck == 0
    }

    /// Requests in flight.
    pub const fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Requests in flight that have shown no progress for the stall limit or longer.
    pub const fn stuck(&self) -> usize {
        self.stuck
    }

    /// Requests that failed (error or stall) since the last success; a
    /// refused or cancelled request neither counts nor resets the count.
    pub const fn failures_in_a_row(&self) -> u32 {
        self.failures_in_a_row
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.stuck > 0 {
            format!("not serving: {} in flight without progress", self.stuck)
        } else if !self.is_serving() {
            format!("not serving: {} failures in a row", self.failures_in_a_row)
        } else {
            format!("serving: {} in flight", self.in_flight)
        };
        f.pad(&s)
    }
}

#[cfg(feature = "axum")]
mod with_axum {
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::{MethodRouter, get};

    use super::Health;
    use crate::monitor::Monitor;

    /// `200 OK` when serving, `503 Service Unavailable` when not, with the
    /// [`Display`](std::fmt::Display) text as a plain-text body.
    impl IntoResponse for Health {
        fn into_response(self) -> Response {
            let status = if self.is_serving() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, self.to_string()).into_response()
        }
    }

    /// An axum `GET` route answering with `monitor`'s [`Health`].
    ///
    /// ```
    /// use atscale_heartbeat::{Monitor, health};
    ///
    /// let monitor = Monitor::new();
    /// let app: axum::Router = axum::Router::new().route("/healthz", health::route(monitor));
    /// ```
    pub fn route<S>(monitor: Monitor) -> MethodRouter<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        get(move || {
            let health = monitor.health();
            async move { health }
        })
    }
}

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use with_axum::route;

#[cfg(feature = "tonic")]
mod with_tonic {
    use std::time::Duration;

    use tonic_health::ServingStatus;
    use tonic_health::server::HealthReporter;

    use crate::monitor::Monitor;

    /// Keeps `reporter`'s status for `service` in step with `monitor`'s
    /// [`Health`](super::Health), checking every `every`.
    ///
    /// Spawn it next to the tonic server. It holds no strong handle to the
    /// monitor: once the monitor and all its services are dropped, it sets
    /// `service` to `NotServing` and returns.
    ///
    /// ```
    /// use std::time::Duration;
    /// use atscale_heartbeat::{Monitor, health};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let monitor = Monitor::new();
    /// let (reporter, _grpc_health_service) = tonic_health::server::health_reporter();
    /// tokio::spawn(health::report(&monitor, reporter, "my.Service", Duration::from_secs(1)));
    /// # }
    /// ```
    pub fn report(
        monitor: &Monitor,
        reporter: HealthReporter,
        service: impl Into<String>,
        every: Duration,
    ) -> impl Future<Output = ()> + Send + 'static {
        let weak = monitor.downgrade();
        let service = service.into();
        async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = None;
            loop {
                interval.tick().await;
                let status = match Monitor::upgrade(&weak) {
                    Some(monitor) if monitor.health().is_serving() => ServingStatus::Serving,
                    Some(_) => ServingStatus::NotServing,
                    None => {
                        reporter
                            .set_service_status(&service, ServingStatus::NotServing)
                            .await;
                        return;
                    }
                };
                if last != Some(status) {
                    reporter.set_service_status(&service, status).await;
                    last = Some(status);
                }
            }
        }
    }
}

#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
pub use with_tonic::report;
