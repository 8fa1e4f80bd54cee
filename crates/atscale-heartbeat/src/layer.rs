use tower_layer::Layer;

use crate::monitor::Monitor;
use crate::service::Heartbeat;

/// Applies [`Heartbeat`] to a service: its requests report to a [`Monitor`].
///
/// Made with [`HeartbeatLayer::new`] or [`Monitor::layer`]; the monitor's
/// settings (stall watchdog, interval pulses) apply to every service built.
#[derive(Clone, Debug)]
pub struct HeartbeatLayer {
    monitor: Monitor,
}

impl HeartbeatLayer {
    /// A layer whose services report to `monitor`.
    pub const fn new(monitor: Monitor) -> Self {
        HeartbeatLayer { monitor }
    }

    /// The monitor the services report to.
    pub const fn monitor(&self) -> &Monitor {
        &self.monitor
    }
}

impl<S> Layer<S> for HeartbeatLayer {
    type Service = Heartbeat<S>;

    fn layer(&self, inner: S) -> Heartbeat<S> {
        Heartbeat::new(inner, self.monitor.clone())
    }
}
