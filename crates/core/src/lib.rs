// `pub` only for what another crate uses; the rest is `pub(crate)` (the lint keeps it so).
#![warn(unreachable_pub)]
//! THE core: produce, produce_batch, fetch, ack, unlock and the consumer admin settings, with
//! the MQCloud HTTP proxy's semantics (registry, orderId queue hash, delay levels, queue choice,
//! queue locks, requestId acks, retry messages, pause and rate limit).
//!
//! Knows nothing of HTTP or gRPC: adapters convert their wire types to the plain types here.
//! Holds the stores through the traits of [`mqproxy_store`].

pub mod auth;
pub mod clock;
mod consume;
#[cfg(test)]
mod engine_tests;
mod error;
pub mod ids;
pub mod limits;
mod metrics;
mod offsets;
mod rate_limit;
mod registry;
pub mod request_id;
mod settings;
mod stream;

pub use auth::{AccessToken, ConsumerCall, ProducerCall, TokenChange};
pub use clock::{Clock, ManualClock, SystemClock};
pub use consume::{
    AckOutcome, ConsumeTarget, ConsumerView, Delivered, FetchOutcome, FetchRequest, FetchStatus, SettingsChange,
    UnlockOutcome,
};
pub use error::{EngineError, ErrorCode, ErrorKind, GrpcCode, LogLevel, http_status_of_envelope};
pub use mqproxy_store::settings::SettingError;
pub use offsets::{ClientPage, ConnectedClient, ConsumerOffsets, ContextView, OffsetReset, QueueSelector, QueueView};
pub use registry::RegistryView;
pub use settings::{ConsumeSettings, ProduceSettings};
pub use stream::{ConsumeCommand, ConsumeEvent, ConsumeStream, Subscription};

use ids::MsgIdGenerator;
use mqproxy_store::RegistryStore;
use mqproxy_store::consumer_state::ConsumerStateStore;
use mqproxy_store::{AppendOutcome, AppendStatus, Delivery, MessageStore, NewRecord, QueueRef};
use rate_limit::RateLimiters;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// What one message adds to a batch besides its body (RocketMQ's batch encoding: sizes, flag,
/// properties with the msgId), counted against the backend's batch size.
const BATCH_OVERHEAD_BYTES: usize = 256;

/// Clustering (a group shares the stream) or broadcast (each clientId gets all of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsumeMode {
    Clustering,
    Broadcast,
}

impl ConsumeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Clustering => "clustering",
            Self::Broadcast => "broadcast",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub queues: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerSpec {
    pub name: String,
    pub topic: String,
    /// Requests must present this token (none: anyone may produce).
    pub token: Option<AccessToken>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    pub name: String,
    pub topic: String,
    pub mode: ConsumeMode,
    pub consume_timeout_ms: u64,
    pub max_pull_size: u32,
    /// Requests must present this token (none: anyone may consume).
    pub token: Option<AccessToken>,
}

/// What the engine needs to know; built by the caller (config file, tests).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub region_id: String,
    /// IPv4 address and port of this server, the first half of every offsetMsgId.
    pub store_host: [u8; 8],
    pub produce: ProduceSettings,
    pub consume: ConsumeSettings,
    pub topics: Vec<TopicSpec>,
    pub producers: Vec<ProducerSpec>,
    pub consumers: Vec<ConsumerSpec>,
}

/// A message to produce (the producer is the [`ProducerCall`]'s).
#[derive(Debug, Clone, Default)]
pub struct ProduceRequest {
    pub body: Vec<u8>,
    pub keys: Option<String>,
    pub order_id: Option<String>,
    pub delay_level: Option<i32>,
    pub delivery_timestamp_ms: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendStatus {
    SendOk,
    /// Stored, but the flush took longer than the flush timeout.
    FlushDiskTimeout,
    /// Stored on the master; the slave did not confirm in time (RocketMQ backend).
    FlushSlaveTimeout,
    /// Stored on the master; no slave to replicate to (RocketMQ backend).
    SlaveNotAvailable,
}

impl SendStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SendOk => "SEND_OK",
            Self::FlushDiskTimeout => "FLUSH_DISK_TIMEOUT",
            Self::FlushSlaveTimeout => "FLUSH_SLAVE_TIMEOUT",
            Self::SlaveNotAvailable => "SLAVE_NOT_AVAILABLE",
        }
    }
}

impl From<AppendStatus> for SendStatus {
    fn from(s: AppendStatus) -> Self {
        match s {
            AppendStatus::Ok => Self::SendOk,
            AppendStatus::FlushDiskTimeout => Self::FlushDiskTimeout,
            AppendStatus::FlushSlaveTimeout => Self::FlushSlaveTimeout,
            AppendStatus::SlaveNotAvailable => Self::SlaveNotAvailable,
        }
    }
}

/// Where a produced message went.
#[derive(Debug, Clone, PartialEq)]
pub struct SendReceipt {
    pub status: SendStatus,
    pub msg_id: String,
    pub topic: String,
    pub broker_name: String,
    pub queue_id: u32,
    pub queue_offset: u64,
    pub offset_msg_id: String,
    pub region_id: String,
    pub trace_on: bool,
}

/// The core engine (cheap to clone; all clones share state).
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    config: EngineConfig,
    clock: Arc<dyn Clock>,
    /// Topics, producers, consumers: a snapshot swapped whole by the admin API.
    registry: std::sync::RwLock<Arc<registry::Registry>>,
    /// Serializes registry changes (each awaits the store).
    registry_writes: tokio::sync::Mutex<()>,
    registry_store: Arc<dyn RegistryStore>,
    messages: Arc<dyn MessageStore>,
    /// Consumer offsets, locks, retry entries and settings.
    state: Arc<dyn ConsumerStateStore>,
    /// Keys of the requestId MAC (shared by every proxy on one consumer state store).
    request_id_keys: request_id::RequestIdKeys,
    metrics: metrics::Metrics,
    ids: MsgIdGenerator,
    round_robin: AtomicU32,
    rate_limiters: RateLimiters,
    /// Bumped when a queue lock is released or consumer settings change: streaming consumers
    /// waiting for a free queue wake up on it.
    consumer_changes: tokio::sync::watch::Sender<u64>,
    /// One permit per open Consume stream (`max_consume_streams`).
    consume_streams: Arc<tokio::sync::Semaphore>,
}

impl Engine {
    /// Builds the engine over its message store and consumer state store; `request_id_keys`
    /// sign and check requestIds.
    /// `config` holds the registry to start with; `registry_store` keeps the admin API's
    /// changes.
    pub fn new(
        config: EngineConfig,
        messages: Arc<dyn MessageStore>,
        state: Arc<dyn ConsumerStateStore>,
        request_id_keys: request_id::RequestIdKeys,
        registry_store: Arc<dyn RegistryStore>,
    ) -> Self {
        Self::with_clock(
            config,
            messages,
            state,
            request_id_keys,
            registry_store,
            Arc::new(SystemClock),
        )
    }

    /// [`Engine::new`] on a clock of the caller's (tests: a [`ManualClock`]).
    pub fn with_clock(
        config: EngineConfig,
        messages: Arc<dyn MessageStore>,
        state: Arc<dyn ConsumerStateStore>,
        request_id_keys: request_id::RequestIdKeys,
        registry_store: Arc<dyn RegistryStore>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let registry = registry::Registry::new(&config.topics, &config.producers, &config.consumers);
        let ids = MsgIdGenerator::new(messages.identity());
        let consume_streams = Arc::new(tokio::sync::Semaphore::new(config.consume.max_consume_streams as usize));
        Self {
            inner: Arc::new(Inner {
                state,
                request_id_keys,
                metrics: metrics::Metrics::new(),
                rate_limiters: RateLimiters::new(clock.clone()),
                clock,
                config,
                registry: std::sync::RwLock::new(Arc::new(registry)),
                registry_writes: tokio::sync::Mutex::new(()),
                registry_store,
                messages,
                ids,
                round_robin: AtomicU32::new(0),
                consumer_changes: tokio::sync::watch::Sender::new(0),
                consume_streams,
            }),
        }
    }

    /// The engine's time, epoch ms.
    pub(crate) fn now_ms(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    /// Wakes streaming consumers: a lock was released or settings changed.
    pub(crate) fn notify_consumers(&self) {
        self.inner.consumer_changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The registry and settings the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Ready when the store takes a durable write.
    ///
    /// # Errors
    /// The store's failure.
    pub async fn ready(&self) -> Result<(), EngineError> {
        Ok(self.inner.messages.probe().await?)
    }

    fn check_body(body: &[u8]) -> Result<(), EngineError> {
        if body.is_empty() {
            return Err(EngineError::invalid("message is empty"));
        }
        if body.len() > limits::MAX_MESSAGE_BYTES {
            return Err(EngineError::invalid(format!(
                "message body too long:{}",
                limits::MAX_MESSAGE_BYTES
            )));
        }
        Ok(())
    }

    /// When a delayed or timer message becomes visible.
    fn delivery(&self, delay_level: Option<i32>, delivery_ts: Option<i64>, now: u64) -> Result<Delivery, EngineError> {
        match (delay_level, delivery_ts) {
            (Some(_), Some(_)) => Err(EngineError::invalid(
                "delayLevel and deliveryTimestamp cannot be used together",
            )),
            (Some(level), None) => u8::try_from(level)
                .ok()
                .filter(|l| limits::DELAY_LEVEL.contains(u64::from(*l)))
                .map(Delivery::DelayLevel)
                .ok_or_else(|| EngineError::invalid(format!("delayLevel must be between 1 and 18, got {level}"))),
            (None, Some(ts)) => {
                let ts = u64::try_from(ts)
                    .map_err(|_| EngineError::invalid(format!("deliveryTimestamp must not be negative, got {ts}")))?;
                let limit = now + self.inner.config.produce.max_delivery_delay_ms;
                if ts > limit {
                    return Err(EngineError::invalid(format!(
                        "deliveryTimestamp {ts} is more than {} ms ahead (limit {limit})",
                        self.inner.config.produce.max_delivery_delay_ms
                    )));
                }
                Ok(if ts > now { Delivery::At(ts) } else { Delivery::Now })
            }
            (None, None) => Ok(Delivery::Now),
        }
    }

    /// The queues of a topic (route order) and the one to send to.
    fn pick_queue(&self, topic: &TopicSpec, order_id: Option<&str>) -> Result<(u32, QueueRef), EngineError> {
        let queues = self.inner.messages.queues(&topic.name);
        let n = u32::try_from(queues.len()).unwrap_or(u32::MAX);
        if n == 0 {
            return Err(EngineError::Store(mqproxy_store::StoreError::Backend(format!(
                "topic {} has no writable queue",
                topic.name
            ))));
        }
        let index = match order_id {
            Some(order_id) => ids::order_queue(order_id, n),
            // In turn, skipping queues of a broker that just failed (all failed: in turn).
            None => {
                let start = self.inner.round_robin.fetch_add(1, Ordering::Relaxed) % n;
                (0..n)
                    .map(|k| (start + k) % n)
                    .find(|&i| self.inner.messages.queue_available(&topic.name, i))
                    .unwrap_or(start)
            }
        };
        let queue = queues[index as usize].clone();
        Ok((index, queue))
    }

    /// For an unordered send that surely failed on `failed`'s broker: the next queue in turn
    /// on another broker that is not avoided, if the topic has one.
    /// `advance`: take a turn of the round robin (a real failover), or only look (whether one
    /// exists, which must not shift the turns of later sends).
    fn failover_queue(&self, topic: &TopicSpec, failed: &QueueRef, advance: bool) -> Option<(u32, QueueRef)> {
        let queues = self.inner.messages.queues(&topic.name);
        let n = u32::try_from(queues.len()).unwrap_or(u32::MAX);
        let turn = if advance {
            self.inner.round_robin.fetch_add(1, Ordering::Relaxed)
        } else {
            0
        };
        let start = turn % n.max(1);
        (0..n).map(|k| (start + k) % n).find_map(|i| {
            let q = &queues[i as usize];
            (q.broker_name != failed.broker_name && self.inner.messages.queue_available(&topic.name, i))
                .then(|| (i, q.clone()))
        })
    }

    /// Appends to the chosen queue; an unordered send that surely failed there (the broker
    /// answered an error or could not be reached: not a timeout, which may have stored it) is
    /// sent once more to another broker's queue. Returns where it went.
    async fn append_with_failover(
        &self,
        topic: &TopicSpec,
        (index, queue): (u32, QueueRef),
        unordered: bool,
        delivery: Delivery,
        records: Vec<NewRecord>,
    ) -> Result<(u32, QueueRef, AppendOutcome), mqproxy_store::StoreError> {
        // A copy for the second try only where there is another broker to try.
        let spare = (unordered && self.failover_queue(topic, &queue, false).is_some()).then(|| records.clone());
        match self.inner.messages.append(&topic.name, index, delivery, records).await {
            Ok(outcome) => Ok((index, queue, outcome)),
            Err(mqproxy_store::StoreError::Backend(first)) if spare.is_some() => {
                let Some((other, other_queue)) = self.failover_queue(topic, &queue, true) else {
                    return Err(mqproxy_store::StoreError::Backend(first));
                };
                tracing::warn!(topic = %topic.name, from = %queue.broker_name, to = %other_queue.broker_name, error = %first, "send failed, sending to another broker");
                let outcome = self
                    .inner
                    .messages
                    .append(&topic.name, other, delivery, spare.unwrap_or_default())
                    .await?;
                Ok((other, other_queue, outcome))
            }
            Err(e) => Err(e),
        }
    }

    fn receipt(
        &self,
        topic: &TopicSpec,
        queue: &QueueRef,
        msg_id: &[u8; 16],
        outcome: &AppendOutcome,
        i: usize,
    ) -> Result<SendReceipt, EngineError> {
        let appended = outcome.appended.get(i).ok_or_else(|| {
            EngineError::Store(mqproxy_store::StoreError::Corrupt(
                "append answered too few offsets".into(),
            ))
        })?;
        let config = &self.inner.config;
        Ok(SendReceipt {
            status: outcome.status.into(),
            msg_id: ids::hex_id(msg_id),
            topic: topic.name.clone(),
            broker_name: queue.broker_name.clone(),
            queue_id: queue.queue_id,
            queue_offset: appended.queue_offset,
            offset_msg_id: appended
                .offset_msg_id
                .clone()
                .unwrap_or_else(|| ids::offset_msg_id(config.store_host, appended.store_seq)),
            region_id: outcome.region_id.clone().unwrap_or_else(|| config.region_id.clone()),
            trace_on: outcome.trace_on.unwrap_or(true),
        })
    }

    /// Produces one message to the producer's topic; answered once it is durable.
    pub(crate) async fn produce(
        &self,
        topic: &TopicSpec,
        producer: &str,
        req: ProduceRequest,
    ) -> Result<SendReceipt, EngineError> {
        let result = self.produce_one(topic, req).await;
        self.count_produced(&topic.name, producer, result.as_ref().err(), 1);
        result
    }

    /// Counts produced messages by topic, producer and status (200, or the error's status).
    fn count_produced(&self, topic: &str, producer: &str, error: Option<&EngineError>, n: u64) {
        let status = error.map_or("200", |e| e.kind().status_label());
        let topic = topic.to_owned();
        self.inner
            .metrics
            .produced
            .get_or_create(&metrics::ProduceLabels {
                topic,
                producer: producer.to_owned(),
                status: status.to_owned(),
            })
            .inc_by(n);
    }

    /// The queues of a registered topic, in route order.
    pub fn topic_queues(&self, topic: &str) -> Vec<QueueRef> {
        self.inner.messages.queues(topic).to_vec()
    }

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
        let per_client_series = self.inner.config.consume.metrics_max_client_series as usize;
        for spec in registry.consumers.values() {
            let contexts = match spec.mode {
                ConsumeMode::Clustering => self.consumer_offsets(&spec.name, None, None).await?.contexts,
                ConsumeMode::Broadcast => {
                    // Clients choose their ids, so their number must not decide the size of a
                    // scrape: per clientId only the most lagging, plus aggregates.
                    let lag = self.broadcast_lag(spec, per_client_series).await?;
                    let consumer = metrics::ConsumerLabels {
                        topic: spec.topic.clone(),
                        consumer: spec.name.clone(),
                    };
                    m.broadcast_clients
                        .get_or_create(&consumer)
                        .set(metrics::gauge_value(lag.clients as u64));
                    for ((broker, queue), (sum, max)) in lag.per_queue {
                        let labels = metrics::ConsumerQueueLabels {
                            topic: spec.topic.clone(),
                            consumer: spec.name.clone(),
                            broker,
                            queue: queue.to_string(),
                        };
                        m.broadcast_lag_sum
                            .get_or_create(&labels)
                            .set(metrics::gauge_value(sum));
                        m.broadcast_lag_max
                            .get_or_create(&labels)
                            .set(metrics::gauge_value(max));
                    }
                    lag.top
                }
            };
            for context in &contexts {
                for q in &context.queues {
                    m.lag
                        .get_or_create(&metrics::LagLabels {
                            topic: spec.topic.clone(),
                            consumer: spec.name.clone(),
                            client_id: context.client_id.clone().unwrap_or_default(),
                            broker: q.broker_name.clone(),
                            queue: q.queue_id.to_string(),
                        })
                        .set(metrics::gauge_value(q.lag));
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
                    .get_or_create(&metrics::QueueLabels {
                        topic: topic.clone(),
                        broker: q.broker_name.clone(),
                        queue: q.queue_id.to_string(),
                    })
                    .set(metrics::gauge_value(range.max));
            }
        }
        let stats = self.inner.messages.stats().await;
        for (family, value) in [(&m.store_bytes, stats.size_bytes), (&m.delayed, stats.delayed)] {
            family.clear();
            if let Some(v) = value {
                family.get_or_create(&Vec::new()).set(metrics::gauge_value(v));
            }
        }
        Ok(m.encode())
    }

    async fn produce_one(&self, topic: &TopicSpec, req: ProduceRequest) -> Result<SendReceipt, EngineError> {
        Self::check_body(&req.body)?;
        let now = self.now_ms();
        let delivery = self.delivery(req.delay_level, req.delivery_timestamp_ms, now)?;
        let order_id = req.order_id.as_deref().map(str::trim).filter(|o| !o.is_empty());
        let chosen = self.pick_queue(topic, order_id)?;
        let msg_id = self.inner.ids.next();
        let keys = req.keys.filter(|k| !k.is_empty());
        let record = NewRecord {
            msg_id,
            keys,
            born_ms: now,
            body: req.body,
        };
        let (_, queue, outcome) = self
            .append_with_failover(topic, chosen, order_id.is_none(), delivery, vec![record])
            .await?;
        self.receipt(topic, &queue, &msg_id, &outcome, 0)
    }

    /// Produces a batch to one queue of the producer's topic, in order: in one durable write on
    /// the embedded store, in as few sends as the backend's batch size allows on RocketMQ. The
    /// outer error is request-level (an empty batch); each element has its own result.
    pub(crate) async fn produce_batch(
        &self,
        topic: &TopicSpec,
        producer: &str,
        bodies: Vec<Vec<u8>>,
    ) -> Result<Vec<Result<SendReceipt, EngineError>>, EngineError> {
        let count = bodies.len() as u64;
        let results = self.produce_batch_elements(topic, bodies).await;
        match &results {
            Ok(elements) => {
                // One counter update per status, not per element.
                let ok = elements.iter().filter(|e| e.is_ok()).count() as u64;
                if ok > 0 {
                    self.count_produced(&topic.name, producer, None, ok);
                }
                for failed in elements.iter().filter_map(|e| e.as_ref().err()) {
                    self.count_produced(&topic.name, producer, Some(failed), 1);
                }
            }
            Err(e) => self.count_produced(&topic.name, producer, Some(e), count.max(1)),
        }
        results
    }

    async fn produce_batch_elements(
        &self,
        topic: &TopicSpec,
        bodies: Vec<Vec<u8>>,
    ) -> Result<Vec<Result<SendReceipt, EngineError>>, EngineError> {
        if bodies.is_empty() {
            return Err(EngineError::invalid("messages is an empty array"));
        }
        let now = self.now_ms();
        let mut chosen = self.pick_queue(topic, None)?;
        let mut results: Vec<Option<Result<SendReceipt, EngineError>>> = Vec::with_capacity(bodies.len());
        // Groups of (element index, record), each within the backend's batch size.
        let max_bytes = self.inner.messages.max_batch_bytes();
        let mut groups: Vec<Vec<(usize, NewRecord)>> = Vec::new();
        let mut group_bytes = 0usize;
        for (i, body) in bodies.into_iter().enumerate() {
            match Self::check_body(&body) {
                Ok(()) => {
                    let size = body.len() + BATCH_OVERHEAD_BYTES;
                    if groups
                        .last()
                        .is_none_or(|g| !g.is_empty() && group_bytes + size > max_bytes)
                    {
                        groups.push(Vec::new());
                        group_bytes = 0;
                    }
                    group_bytes += size;
                    let record = NewRecord {
                        msg_id: self.inner.ids.next(),
                        keys: None,
                        born_ms: now,
                        body,
                    };
                    if let Some(group) = groups.last_mut() {
                        group.push((i, record));
                    }
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        for group in groups {
            let (positions, records): (Vec<usize>, Vec<NewRecord>) = group.into_iter().unzip();
            let ids: Vec<[u8; 16]> = records.iter().map(|r| r.msg_id).collect();
            match self
                .append_with_failover(topic, chosen.clone(), true, Delivery::Now, records)
                .await
            {
                Ok((index, queue, outcome)) => {
                    // The rest of the batch follows to where this part went (in order there).
                    chosen = (index, queue.clone());
                    for (j, &i) in positions.iter().enumerate() {
                        results[i] = Some(self.receipt(topic, &queue, &ids[j], &outcome, j));
                    }
                }
                Err(e) => {
                    for &i in &positions {
                        results[i] = Some(Err(EngineError::Store(e.duplicate())));
                    }
                }
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(EngineError::invalid("not sent"))))
            .collect())
    }
}
