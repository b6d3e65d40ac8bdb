// `pub` only for what another crate uses; the rest is `pub(crate)` (the lint keeps it so).
#![warn(unreachable_pub)]
//! THE core: produce, produce_batch, fetch, ack, unlock and the consumer admin settings, with
//! the MQCloud HTTP proxy's semantics (registry, orderId queue hash, delay levels, queue choice,
//! queue locks, requestId acks, retry messages, pause and rate limit).
//!
//! Knows nothing of HTTP or gRPC: adapters convert their wire types to the plain types here.
//! Holds the stores through the traits of [`mqproxy_store`].
//!
//! [`Engine`] is a facade over four services, each with its own state whose fields only its
//! module sees: the registry (`registry.rs`: the snapshot and its serialized writes),
//! producing (`produce.rs`: msgIds, the round robin, delivery limits), consuming
//! (`consume/`: the consumer state store, requestId keys, rate limits, the change signal;
//! `consume/offsets.rs` the operator's views) and streams (`stream.rs`: the stream permits).
//! They share only the clock, the message store and the metrics.

pub mod auth;
pub mod clock;
mod consume;
#[cfg(test)]
mod engine_tests;
mod error;
pub mod ids;
pub mod limits;
mod lite;
mod messages;
mod metrics;
mod produce;
mod rate_limit;
mod registry;
pub mod request_id;
mod settings;
mod stream;

pub use auth::{AccessToken, ConsumerCall, ProducerCall, TokenChange};
pub use clock::{Clock, ManualClock, SystemClock};
pub use consume::offsets::{
    ClientPage, ConnectedClient, ConsumerOffsets, ContextView, OffsetReset, PopSegmentView, PopSegments, QueueSelector,
    QueueView,
};
pub use consume::{
    AckOutcome, ConsumeTarget, ConsumerView, Delivered, FetchOutcome, FetchRequest, FetchStatus, SettingsChange,
    UnlockOutcome,
};
pub use error::{EngineError, ErrorCode, ErrorKind, GrpcCode, LogLevel, http_status_of_envelope};
pub use messages::MessageView;
pub use mqproxy_store::settings::SettingError;
pub use registry::RegistryView;
pub use settings::{ConsumeSettings, ProduceSettings};
pub use stream::{ConsumeCommand, ConsumeEvent, ConsumeStream, Subscription};

use mqproxy_store::RegistryStore;
use mqproxy_store::consumer_state::ConsumerStateStore;
use mqproxy_store::{AppendStatus, MessageStore, QueueRef};
use std::sync::Arc;

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
    /// A lite-message parent: produces may name lite topics under it (`liteTopics`).
    pub lite: bool,
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
    /// Strictly in turn over the topic's queues (`roundRobin`), one turn per topic shared by
    /// the proxies of one consumer-state store; not with `order_id`.
    pub round_robin: bool,
    /// The producing client's address (`clientIp`, else what the transport saw), stored with
    /// the message.
    pub client_ip: Option<String>,
    /// Lite topics under the (lite-message) topic the message is also delivered to.
    pub lite_topics: Vec<String>,
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

/// The facade's state: the infrastructure every service shares (clock, stores, metrics) and
/// one state per service, each struct's fields private to its module.
struct Inner {
    clock: Arc<dyn Clock>,
    messages: Arc<dyn MessageStore>,
    metrics: metrics::Metrics,
    registry: registry::RegistryState,
    producing: produce::ProduceState,
    consuming: consume::ConsumeState,
    streams: stream::StreamState,
    lite: lite::LiteState,
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
        Self {
            inner: Arc::new(Inner {
                registry: registry::RegistryState::new(&config, registry_store),
                producing: produce::ProduceState::new(&config, messages.identity(), state.clone()),
                consuming: consume::ConsumeState::new(config.consume, state, request_id_keys, clock.clone()),
                streams: stream::StreamState::new(config.consume.max_consume_streams),
                metrics: metrics::Metrics::new(),
                lite: lite::LiteState::new(messages.lite_topics(), clock.now_ms()),
                clock,
                messages,
            }),
        }
    }

    /// Runs `sweep` every tenth of `idle_ms` (at most a minute apart) until the engine is
    /// dropped: what forgets state idle for `idle_ms`.
    pub(crate) fn spawn_idle_sweep<F, Fut>(&self, idle_ms: u64, sweep: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn(Engine) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let engine = Arc::downgrade(&self.inner);
        let every = std::time::Duration::from_millis((idle_ms / 10).clamp(100, 60_000));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = engine.upgrade() else { return };
                sweep(Engine { inner }).await;
            }
        })
    }

    /// The engine's time, epoch ms.
    pub(crate) fn now_ms(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    /// Ready when the store takes a durable write.
    ///
    /// # Errors
    /// The store's failure.
    pub async fn ready(&self) -> Result<(), EngineError> {
        Ok(self.inner.messages.probe().await?)
    }

    /// The queues of a registered topic, in route order.
    pub fn topic_queues(&self, topic: &str) -> Vec<QueueRef> {
        self.inner.messages.queues(topic).to_vec()
    }
}
