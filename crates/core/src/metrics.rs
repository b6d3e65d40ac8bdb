//! Prometheus metrics of one engine (`prometheus-client`: a registry per engine, no global
//! state, so several servers in one process — the tests — keep their figures apart).
//! Counters are bumped by the engine's operations; lag and offsets are computed at scrape time.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ProduceLabels {
    pub topic: String,
    pub producer: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct PullLabels {
    pub topic: String,
    pub consumer: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ConsumerLabels {
    pub topic: String,
    pub consumer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct AckLabels {
    pub topic: String,
    pub consumer: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct LagLabels {
    pub topic: String,
    pub consumer: String,
    pub client_id: String,
    pub broker: String,
    pub queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ConsumerQueueLabels {
    pub topic: String,
    pub consumer: String,
    pub broker: String,
    pub queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct QueueLabels {
    pub topic: String,
    pub broker: String,
    pub queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    protocol: String,
    operation: String,
}

fn latency_histogram() -> Histogram {
    // 0.1 ms .. ~3.3 s.
    Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
}

/// The engine's metric families and their registry.
#[derive(Debug)]
pub(super) struct Metrics {
    registry: Registry,
    pub produced: Family<ProduceLabels, Counter>,
    pub pulls: Family<PullLabels, Counter>,
    pub delivered: Family<ConsumerLabels, Counter>,
    pub acks: Family<AckLabels, Counter>,
    requests: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub lag: Family<LagLabels, Gauge>,
    pub broadcast_clients: Family<ConsumerLabels, Gauge>,
    pub broadcast_lag_sum: Family<ConsumerQueueLabels, Gauge>,
    pub broadcast_lag_max: Family<ConsumerQueueLabels, Gauge>,
    pub max_offset: Family<QueueLabels, Gauge>,
    /// Only when the store knows (the embedded one): no label, no sample otherwise.
    pub store_bytes: Family<Vec<(String, String)>, Gauge>,
    pub delayed: Family<Vec<(String, String)>, Gauge>,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("mqproxy");
        let produced = Family::default();
        registry.register(
            "produced_messages",
            "Messages produced, by topic, producer and status (200, or the error status)",
            produced.clone(),
        );
        let pulls = Family::default();
        registry.register(
            "pulls",
            "Pulls (REST /mq/message, gRPC Fetch and stream batches) by topic, consumer and result status",
            pulls.clone(),
        );
        let delivered = Family::default();
        registry.register(
            "delivered_messages",
            "Messages handed out to consumers (retry messages included)",
            delivered.clone(),
        );
        let acks = Family::default();
        registry.register(
            "acks",
            "Acknowledgements by outcome: committed, ignored (nothing to commit), refused (bad requestId)",
            acks.clone(),
        );
        let requests = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "request_duration_seconds",
            "Time to answer a request, by protocol and operation",
            requests.clone(),
        );
        let lag = Family::default();
        registry.register(
            "consumer_lag_messages",
            "Messages not yet consumed, per consumer (and broadcast clientId: the most lagging ones, up to metrics_max_client_series) and queue",
            lag.clone(),
        );
        let broadcast_clients = Family::default();
        registry.register(
            "broadcast_clients",
            "Known clientIds of each broadcast consumer",
            broadcast_clients.clone(),
        );
        let broadcast_lag_sum = Family::default();
        registry.register(
            "broadcast_lag_sum_messages",
            "Lag of a broadcast consumer per queue, summed over its clientIds",
            broadcast_lag_sum.clone(),
        );
        let broadcast_lag_max = Family::default();
        registry.register(
            "broadcast_lag_max_messages",
            "Lag of a broadcast consumer per queue, its most lagging clientId's",
            broadcast_lag_max.clone(),
        );
        let max_offset = Family::default();
        registry.register("queue_max_offset", "The next offset of each queue", max_offset.clone());
        let store_bytes = Family::default();
        registry.register(
            "store_bytes",
            "Size of the embedded store's database file",
            store_bytes.clone(),
        );
        let delayed = Family::default();
        registry.register(
            "delayed_messages",
            "Delayed and timer messages waiting in the embedded store's schedule",
            delayed.clone(),
        );
        Self {
            registry,
            produced,
            pulls,
            delivered,
            acks,
            requests,
            lag,
            broadcast_clients,
            broadcast_lag_sum,
            broadcast_lag_max,
            max_offset,
            store_bytes,
            delayed,
        }
    }

    pub(crate) fn observe_request(&self, protocol: &str, operation: &str, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                protocol: protocol.to_owned(),
                operation: operation.to_owned(),
            })
            .observe(seconds);
    }

    /// The text exposition format.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

pub(super) fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
