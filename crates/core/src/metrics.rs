//! Prometheus metrics of one engine (`prometheus-client`: a registry per engine, no global
//! state, so several servers in one process — the tests — keep their figures apart).
//! Counters are bumped by the engine's operations; lag and offsets are computed at scrape time.

use super::{ConsumeMode, Engine, EngineError};
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
    /// Lite topics this proxy knows, per parent topic.
    pub lite_topics: Family<Vec<(String, String)>, Gauge>,
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
        let lite_topics = Family::default();
        registry.register(
            "lite_topics",
            "Lite topics this proxy knows (made on first use, reclaimed when idle), per parent topic",
            lite_topics.clone(),
        );
        Self {
            registry,
            lite_topics,
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

impl Engine {
    /// Records how long a request took (adapters call it: protocol "http" or "grpc").
    pub fn observe_request(&self, protocol: &str, operation: &str, seconds: f64) {
        self.inner.metrics.observe_request(protocol, operation, seconds);
    }

    /// The Prometheus text exposition: counters, latency histograms, and (computed now) every
    /// consumer's lag per queue, queue offsets, store size and waiting delayed messages.
    ///
    /// # Errors
    /// A store failure while reading consumer state.
    pub async fn render_metrics(&self) -> Result<String, EngineError> {
        let m = &self.inner.metrics;
        for family in [&m.broadcast_lag_sum, &m.broadcast_lag_max] {
            family.clear();
        }
        m.lag.clear();
        m.broadcast_clients.clear();
        let registry = self.snapshot();
        let per_client_series = self.inner.consuming.settings().metrics_max_client_series as usize;
        for spec in registry.consumers.values() {
            let contexts = match spec.mode {
                ConsumeMode::Clustering => self.consumer_offsets(&spec.name, None, None).await?.contexts,
                ConsumeMode::Broadcast => {
                    // Clients choose their ids, so their number must not decide the size of a
                    // scrape: per clientId only the most lagging, plus aggregates.
                    let lag = self.broadcast_lag(spec, per_client_series).await?;
                    let consumer = ConsumerLabels {
                        topic: spec.topic.clone(),
                        consumer: spec.name.clone(),
                    };
                    m.broadcast_clients
                        .get_or_create(&consumer)
                        .set(gauge_value(lag.clients as u64));
                    for ((broker, queue), (sum, max)) in lag.per_queue {
                        let labels = ConsumerQueueLabels {
                            topic: spec.topic.clone(),
                            consumer: spec.name.clone(),
                            broker,
                            queue: queue.to_string(),
                        };
                        m.broadcast_lag_sum.get_or_create(&labels).set(gauge_value(sum));
                        m.broadcast_lag_max.get_or_create(&labels).set(gauge_value(max));
                    }
                    lag.top
                }
            };
            for context in &contexts {
                for q in &context.queues {
                    m.lag
                        .get_or_create(&LagLabels {
                            topic: spec.topic.clone(),
                            consumer: spec.name.clone(),
                            client_id: context.client_id.clone().unwrap_or_default(),
                            broker: q.broker_name.clone(),
                            queue: q.queue_id.to_string(),
                        })
                        .set(gauge_value(q.lag));
                }
            }
        }
        for topic in registry.topics.keys() {
            for (i, q) in self.inner.messages.queues(topic).iter().enumerate() {
                let range = self
                    .inner
                    .messages
                    .queue_range(topic, u32::try_from(i).unwrap_or(u32::MAX));
                m.max_offset
                    .get_or_create(&QueueLabels {
                        topic: topic.clone(),
                        broker: q.broker_name.clone(),
                        queue: q.queue_id.to_string(),
                    })
                    .set(gauge_value(range.max));
            }
        }
        m.lite_topics.clear();
        for (parent, count) in self.inner.lite.count_by_parent() {
            m.lite_topics
                .get_or_create(&vec![("topic".to_owned(), parent)])
                .set(gauge_value(count as u64));
        }
        let stats = self.inner.messages.stats().await;
        for (family, value) in [(&m.store_bytes, stats.size_bytes), (&m.delayed, stats.delayed)] {
            family.clear();
            if let Some(v) = value {
                family.get_or_create(&Vec::new()).set(gauge_value(v));
            }
        }
        Ok(m.encode())
    }
}
