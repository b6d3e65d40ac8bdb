//! The engine's config sections, `[produce]` and `[consume]`: deserialized by the server's
//! config file straight into these, checked here (their ranges live with them).

use crate::limits;
use mqproxy_store::settings::{Bounds, SettingError};

const DAY_MS: u64 = 86_400_000;

/// The `[produce]` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProduceSettings {
    /// How far ahead a `deliveryTimestamp` may be (default 3 days).
    pub max_delivery_delay_ms: u64,
}

impl Default for ProduceSettings {
    fn default() -> Self {
        Self {
            max_delivery_delay_ms: 3 * DAY_MS,
        }
    }
}

impl ProduceSettings {
    /// # Errors
    /// A value out of its range, named by its key in the section.
    pub fn check(&self) -> Result<(), SettingError> {
        Bounds::new(1_000, 365 * DAY_MS).setting("max_delivery_delay_ms", self.max_delivery_delay_ms)
    }
}

/// The `[consume]` section: the default rate, and bounds on the state anonymous clients can
/// make the proxy keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumeSettings {
    /// Pulls per second per consumer until an operator sets another rate.
    pub default_rate_limit: u64,
    /// A broadcast clientId with no pull for this long is forgotten (offsets, locks, retry
    /// entries); coming back, it starts where a new client starts.
    pub broadcast_client_idle_ms: u64,
    /// ClientIds one broadcast consumer may have; a new one past it is refused (429) until a
    /// client has been idle for `broadcast_client_idle_ms`.
    pub max_broadcast_clients: u32,
    /// Broadcast clientIds per consumer with their own lag series in `/metrics` (the most
    /// lagging); every broadcast consumer also has sum / max / client-count series.
    pub metrics_max_client_series: u32,
    /// gRPC Consume streams open at once on this proxy (ResourceExhausted past it).
    pub max_consume_streams: u32,
    /// A lite topic with no send and no pull for this long is reclaimed: its messages (on the
    /// embedded store) and its consumers' offsets go.
    pub lite_topic_idle_ms: u64,
}

impl Default for ConsumeSettings {
    fn default() -> Self {
        Self {
            default_rate_limit: 1_024,
            // A day: a client gone that long is gone (an app instance replaced, a browser
            // closed); a client that pulls even once a day keeps its offsets.
            broadcast_client_idle_ms: DAY_MS,
            max_broadcast_clients: 10_000,
            metrics_max_client_series: 100,
            max_consume_streams: 10_000,
            // MQCloud's rule: about a day after the last send, when nobody consumes it.
            lite_topic_idle_ms: DAY_MS,
        }
    }
}

impl ConsumeSettings {
    /// # Errors
    /// The first value out of its range, named by its key in the section.
    pub fn check(&self) -> Result<(), SettingError> {
        limits::RATE_LIMIT.setting("default_rate_limit", self.default_rate_limit)?;
        Bounds::new(1_000, 365 * DAY_MS).setting("broadcast_client_idle_ms", self.broadcast_client_idle_ms)?;
        Bounds::new(1, 10_000_000).setting("max_broadcast_clients", u64::from(self.max_broadcast_clients))?;
        Bounds::new(0, 100_000).setting("metrics_max_client_series", u64::from(self.metrics_max_client_series))?;
        Bounds::new(1, 10_000_000).setting("max_consume_streams", u64::from(self.max_consume_streams))?;
        Bounds::new(1_000, 365 * DAY_MS).setting("lite_topic_idle_ms", self.lite_topic_idle_ms)
    }
}
