// `pub` only for what another crate uses; the rest is `pub(crate)` (the lint keeps it so).
#![warn(unreachable_pub)]
// The RocketMQ client's request futures nest deeply: proving them Send needs a deeper limit.
#![recursion_limit = "256"]

//! Where messages and consumer state live, behind two traits the engine holds:
//! [`MessageStore`] (queues of messages, the delay/timer schedule, lookup by msgId) and
//! [`ConsumerStore`] (durable consumer offsets, locks, retry lists and settings).
//!
//! The engine keeps the consumer state it works on in memory and writes every change through
//! [`ConsumerStore::save`], which is ordered: changes enqueued in order are applied in order.
//! Only `embedded/` imports the database crate; only `rocketmq/client.rs` imports the RocketMQ client.

pub mod consumer_state;
pub mod embedded;
pub mod redis;
pub mod registry_file;
pub mod rocketmq;
pub mod settings;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;

/// A storage failure. The engine reports it as an internal error (status 500).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Database(String),
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt record in the store: {0}")]
    Corrupt(String),
    #[error("the store is closed")]
    Closed,
    /// The message backend surely did not do it (refused, unreachable before sending).
    #[error("message backend error: {0}")]
    Backend(String),
    /// The backend refused the request as invalid (e.g. a delay it does not support).
    #[error("{0}")]
    Rejected(String),
    /// A send timed out after it may have reached the backend: it may or may not be stored.
    #[error("send outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// The disk under the store is (nearly) full: nothing was stored.
    #[error("{0}")]
    StorageFull(String),
    /// Too many writes are waiting for the store: nothing was stored; retry shortly.
    #[error("{0}")]
    Overloaded(String),
}

impl StoreError {
    /// The same failure again, for each element of a batch that failed as a whole.
    pub fn duplicate(&self) -> Self {
        match self {
            Self::Closed => Self::Closed,
            Self::Backend(m) => Self::Backend(m.clone()),
            Self::Rejected(m) => Self::Rejected(m.clone()),
            Self::OutcomeUnknown(m) => Self::OutcomeUnknown(m.clone()),
            Self::Corrupt(m) => Self::Corrupt(m.clone()),
            Self::StorageFull(m) => Self::StorageFull(m.clone()),
            Self::Overloaded(m) => Self::Overloaded(m.clone()),
            other => Self::Database(other.to_string()),
        }
    }
}

/// Delay of each `delayLevel` 1..=18 in milliseconds (RocketMQ's default `messageDelayLevel`,
/// which MQCloud's brokers use too).
/// The most queues a topic has (the engine's `limits::QUEUES`): saved state of a queue id
/// beyond it comes from no config and is ignored at load.
pub const MAX_QUEUES_PER_TOPIC: u32 = 1024;

pub const DELAY_LEVELS_MS: [u64; 18] = [
    1_000, 5_000, 10_000, 30_000, 60_000, 120_000, 180_000, 240_000, 300_000, 360_000, 420_000, 480_000, 540_000,
    600_000, 1_200_000, 1_800_000, 3_600_000, 7_200_000,
];

/// When appended messages become visible to consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Now,
    /// A RocketMQ delay level, 1..=18 (1 s .. 2 h).
    DelayLevel(u8),
    /// At this time (epoch ms), later than now.
    At(u64),
}

/// What starts the name of a lite topic's queue topic: RocketMQ's light message queues (LMQ).
pub const LITE_TOPIC_PREFIX: &str = "%LMQ%";

/// The topic whose single queue (per broker) holds a lite topic: `%LMQ%<parent>$<lite>`, the
/// name RocketMQ's multi-dispatch writes to and MQCloud's proxy reads.
pub fn lite_queue_topic(parent: &str, lite: &str) -> String {
    format!("{LITE_TOPIC_PREFIX}{parent}${lite}")
}

/// The (parent, lite) names of a lite queue topic; None for any other topic.
pub fn split_lite_queue_topic(topic: &str) -> Option<(&str, &str)> {
    topic.strip_prefix(LITE_TOPIC_PREFIX)?.rsplit_once('$')
}

/// A queue of a topic: the broker holding it and its id there. A topic's queues are listed in
/// RocketMQ's route order (broker name, then queue id); the engine's queue index is the
/// position in that list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QueueRef {
    pub broker_name: String,
    pub queue_id: u32,
}

/// A message as the engine hands it to the store.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub msg_id: [u8; 16],
    pub keys: Option<String>,
    pub born_ms: u64,
    /// The producing client's address (`clientIp`), as the proxy learned it.
    pub born_host: Option<String>,
    pub body: Vec<u8>,
    /// The lite topics' queue topics (`lite_queue_topic`) the message is also delivered to,
    /// beside its own queue: each gets it at the end of its queue 0 (of each broker).
    pub lite_topics: Vec<String>,
}

/// A message as read back from a queue.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    /// The message's identity in the store: its 16-byte msgId, or for a message whose msgId
    /// is longer (a Java client on an IPv6 host makes 28-byte ones) its offsetMsgId.
    pub msg_id: [u8; 16],
    /// The msgId clients know the message by, when it is not `msg_id` (the longer ones).
    pub client_msg_id: Option<String>,
    pub offset: u64,
    pub store_ms: u64,
    pub keys: Option<String>,
    /// The producing client's address, when it was recorded.
    pub born_host: Option<String>,
    pub body: Vec<u8>,
}

/// Where one appended message went.
#[derive(Debug, Clone, PartialEq)]
pub struct Appended {
    /// Offset in the topic queue, or in the delay schedule for a delayed message.
    pub queue_offset: u64,
    /// Store-wide sequence number (the store's "commit log position"), unique for ever.
    pub store_seq: u64,
    /// The offsetMsgId when the backend assigns it (RocketMQ); else made from `store_seq`.
    pub offset_msg_id: Option<String>,
}

/// How a stored append went (RocketMQ's send statuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendStatus {
    Ok,
    /// Stored, but the flush took longer than the flush timeout.
    FlushDiskTimeout,
    FlushSlaveTimeout,
    SlaveNotAvailable,
}

/// The result of one durable append.
#[derive(Debug, Clone)]
pub struct AppendOutcome {
    pub appended: Vec<Appended>,
    pub status: AppendStatus,
    /// The broker's region, when the backend reports one.
    pub region_id: Option<String>,
    /// The broker's trace switch, when the backend reports one.
    pub trace_on: Option<bool>,
}

/// What one read found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadOutcome {
    pub messages: Vec<StoredMessage>,
    /// Nothing can be read at the requested offset (out of range, or removed): consumption
    /// should go on from here (the Java proxy's forced reset).
    pub skip_to: Option<u64>,
}

/// The offsets present in a queue: `min..max` (max is the offset the next message gets).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueRange {
    pub min: u64,
    pub max: u64,
}

/// Identity values the store keeps for the server across restarts.
#[derive(Debug, Clone)]
pub struct StoreIdentity {
    /// Key of the requestId MAC.
    pub secret: [u8; 32],
    /// Random per data directory; part of every msgId.
    pub node_id: u32,
    /// Incremented at every start; part of every msgId, so ids never repeat across restarts.
    pub boot: u32,
}

/// Where a message made by a producer sits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageLocation {
    pub topic: String,
    pub queue: u32,
    pub offset: u64,
}

/// Who consumes: a consumer group (clustering) or one client of it (broadcast).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContextKey {
    pub topic: String,
    pub group: String,
    pub client_id: Option<String>,
}

/// The consumption state of one queue for one context.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueState {
    /// Committed offset: the next offset to consume. None until the first ack.
    pub committed: Option<u64>,
    /// Lock time (epoch ms) of the batch handed out and not yet acknowledged or unlocked.
    pub lock_time: Option<u64>,
    /// When this queue was last pulled (epoch ms): the queue-choice tie-break.
    pub last_pull_ms: u64,
    /// The client that last pulled it.
    pub client_ip: Option<String>,
    /// How long the held lock lasts (ms), when the pull that took it named its own
    /// `consumeTimeout`; None: the consumer's setting at the time it is checked.
    pub lock_timeout_ms: Option<u64>,
}

impl QueueState {
    /// The held lock's time, if it has not expired by `now_ms`; `default_timeout_ms` is the
    /// consumer's setting, for a lock that named no timeout of its own.
    pub fn live_lock(&self, now_ms: u64, default_timeout_ms: u64) -> Option<u64> {
        let lock = self.lock_time?;
        (now_ms.saturating_sub(lock) <= self.lock_timeout(default_timeout_ms)).then_some(lock)
    }

    /// How long the held lock lasts: its own timeout, or the consumer's setting.
    pub fn lock_timeout(&self, default_timeout_ms: u64) -> u64 {
        self.lock_timeout_ms.unwrap_or(default_timeout_ms)
    }
}

/// A POP segment: a batch `[offset, next_offset)` of one queue handed out to one client while
/// others consume the same queue, kept until it is acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PopSegment {
    /// When it was handed out (epoch ms); unique per queue, so it names the segment.
    pub lock_time: u64,
    pub offset: u64,
    pub next_offset: u64,
    /// How long the client has to acknowledge it (ms); 0 once given back (`/mq/unlock`).
    pub timeout_ms: u64,
    /// How many times it was handed out again after its time ran out.
    pub retry_times: u32,
    pub client_ip: Option<String>,
}

impl PopSegment {
    /// Whether its client may still acknowledge it before it is handed out again.
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.timeout_ms > 0 && now_ms.saturating_sub(self.lock_time) <= self.timeout_ms
    }

    /// When it can be handed out again (epoch ms).
    pub fn expires_ms(&self) -> u64 {
        self.lock_time + self.timeout_ms
    }

    /// A segment with no queue messages (it carries only retry messages).
    pub fn is_empty(&self) -> bool {
        self.offset >= self.next_offset
    }
}

/// The POP state of one queue for one context.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PopQueue {
    /// The end of what POP pulls have handed out: the next segment starts here.
    pub next: Option<u64>,
    /// The segments in flight, by offset.
    pub segments: Vec<PopSegment>,
}

/// A message re-sent to a consumer context by an operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryEntry {
    pub seq: u64,
    pub msg_id: [u8; 16],
    pub location: MessageLocation,
    /// The (queue, lockTime) of the batch it was last delivered with.
    pub in_flight: Option<(u32, u64)>,
}

/// Per-consumer settings changed by an operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsumerSettings {
    pub paused: bool,
    pub rate_limit_enabled: bool,
    pub limit_rate: u64,
    /// Overrides the registry's lock time of an unacknowledged batch (10 s .. 36 h).
    pub consume_timeout_ms: Option<u64>,
    /// Overrides the registry's messages per pull (1 .. 128).
    pub max_pull_size: Option<u32>,
}

/// One change of consumer state.
#[derive(Debug, Clone, PartialEq)]
pub enum ConsumerOp {
    PutQueue {
        context: ContextKey,
        queue: u32,
        state: QueueState,
    },
    PutRetry {
        context: ContextKey,
        entry: RetryEntry,
    },
    /// A forgotten broadcast client's queue state.
    DeleteQueue {
        context: ContextKey,
        queue: u32,
    },
    DeleteRetry {
        context: ContextKey,
        seq: u64,
    },
    PutSettings {
        consumer: String,
        settings: ConsumerSettings,
    },
}

/// Everything [`ConsumerStore::load`] returns at start-up.
#[derive(Debug, Default)]
pub struct ConsumerSnapshot {
    pub queues: Vec<(ContextKey, u32, QueueState)>,
    pub retries: Vec<(ContextKey, RetryEntry)>,
    pub settings: Vec<(String, ConsumerSettings)>,
}

/// Resolves when a write is durable (or failed).
pub type PendingWrite = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// The registry as persisted: topics, producers and consumers created by the config or the
/// admin API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryEntries {
    pub topics: Vec<StoredTopic>,
    pub producers: Vec<StoredProducer>,
    pub consumers: Vec<StoredConsumer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredTopic {
    pub name: String,
    pub queues: u32,
    /// A lite-message parent: produces may name lite topics under it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lite: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredProducer {
    pub name: String,
    pub topic: String,
    /// Hex SHA-256 of the producer's token, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredConsumer {
    pub name: String,
    pub topic: String,
    pub broadcast: bool,
    pub consume_timeout_ms: u64,
    pub max_pull_size: u32,
    /// Hex SHA-256 of the consumer's token, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
}

/// Where the registry is kept between runs.
pub trait RegistryStore: Send + Sync + 'static {
    /// Replaces the saved registry (durably) with `entries`.
    fn save(&self, entries: &RegistryEntries) -> Result<(), StoreError>;
}

/// Figures of a store for metrics (None: the backend does not know).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub size_bytes: Option<u64>,
    pub delayed: Option<u64>,
}

/// Queues of messages.
#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Appends `records` to one queue (by index) in one durable write, in order. Delayed ones
    /// go to the delay schedule instead and reach the queue when due.
    async fn append(
        &self,
        topic: &str,
        queue: u32,
        delivery: Delivery,
        records: Vec<NewRecord>,
    ) -> Result<AppendOutcome, StoreError>;

    /// Most bytes one append of several records may carry (bodies plus per-message overhead);
    /// bigger batches are split by the engine.
    fn max_batch_bytes(&self) -> usize {
        usize::MAX
    }

    /// Makes a topic (added or grown at run time) known with `queues` queues: the embedded
    /// store tracks their offsets; a cluster creates the topic if needed and reads its route.
    async fn add_topic(&self, topic: &str, queues: u32) -> Result<(), StoreError>;

    /// Makes a lite topic's queue topic (`lite_queue_topic(parent, ..)`) known: one queue (queue
    /// 0) per broker of `parent`. Cheap once known; created on first use.
    async fn open_lite_topic(&self, parent: &str, lite_topic: &str) -> Result<(), StoreError>;

    /// Reclaims an idle lite topic: the embedded store deletes its messages and forgets it; a
    /// cluster forgets it (the broker's LMQ stays until the broker drops it).
    async fn drop_lite_topic(&self, lite_topic: &str) -> Result<(), StoreError>;

    /// The lite topics' queue topics that hold messages at start (reclaimed when idle).
    fn lite_topics(&self) -> Vec<String> {
        Vec::new()
    }

    /// The queues of a topic in route order (empty for a topic the store does not know).
    fn queues(&self, topic: &str) -> std::sync::Arc<[QueueRef]>;

    /// The offsets present in a queue (cheap: kept in memory; for a remote backend, as last
    /// seen by a send, a pull or the periodic refresh).
    fn queue_range(&self, topic: &str, queue: u32) -> QueueRange;

    /// Whether `queue_range` is exact: true when this process makes every append (the
    /// embedded store); false for a cluster other clients write to, whose cached max may lag
    /// behind a committed offset another proxy moved.
    fn ranges_are_exact(&self) -> bool {
        true
    }

    /// Whether a queue's broker answered its last call (false for a while after it failed):
    /// where a topic spans several brokers, the engine prefers queues that are, so one dead
    /// broker stalls neither unordered produces nor the pulls of the others' queues.
    fn queue_available(&self, _topic: &str, _queue: u32) -> bool {
        true
    }

    /// Up to `max` messages of a queue from offset `from` on, stopping before the bodies would
    /// pass `max_bytes` (the first message is always included, whatever its size).
    async fn read(
        &self,
        topic: &str,
        queue: u32,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<ReadOutcome, StoreError>;

    /// The first offset of a queue whose message was stored at or after `timestamp_ms` (the
    /// queue's max when none was).
    async fn search_offset(&self, topic: &str, queue: u32, timestamp_ms: u64) -> Result<u64, StoreError>;

    /// Where the message with this msgId (as clients know it: hex digits) sits, if it is in
    /// a queue, and its identity there (`StoredMessage::msg_id`).
    async fn locate(&self, msg_id: &str) -> Result<Option<(MessageLocation, [u8; 16])>, StoreError>;

    /// A durable write that changes nothing visible: readiness.
    async fn probe(&self) -> Result<(), StoreError>;

    /// Identity values kept across restarts.
    fn identity(&self) -> &StoreIdentity;

    /// Size and waiting delayed messages, for metrics.
    async fn stats(&self) -> StoreStats {
        StoreStats::default()
    }

    /// Lets go of remote resources (a backend's clients unregister from the cluster). The
    /// embedded store is closed by its owner instead (it flushes on close).
    async fn shutdown(&self) {}

    /// Changes (to a new count) whenever messages become visible in a queue of `topic`:
    /// appended, or a delayed message fell due. Streaming and long-polling consumers wait on it
    /// instead of polling; a topic's signal wakes only its own consumers.
    fn visible_changes(&self, topic: &str) -> tokio::sync::watch::Receiver<u64>;
}

/// One signal per topic ("messages became visible", "a lock was released"), made when a
/// consumer first waits on it and dropped once nobody does, so thousands of idle topics cost
/// nothing and a produce or an ack wakes only the waiters of its topic.
#[derive(Debug, Default)]
pub struct TopicSignals {
    topics: std::sync::Mutex<std::collections::HashMap<String, tokio::sync::watch::Sender<u64>>>,
}

impl TopicSignals {
    fn topics(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, tokio::sync::watch::Sender<u64>>> {
        // Every change under it is an insert or a remove: a poisoned lock still holds a map.
        self.topics.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Changes of `topic` from now on.
    pub fn subscribe(&self, topic: &str) -> tokio::sync::watch::Receiver<u64> {
        let mut topics = self.topics();
        match topics.get(topic) {
            Some(sender) => sender.subscribe(),
            None => {
                let (sender, receiver) = tokio::sync::watch::channel(0);
                topics.insert(topic.to_owned(), sender);
                receiver
            }
        }
    }

    /// Messages became visible in `topic`: wakes its waiters (if it has none, forgets it).
    pub fn notify(&self, topic: &str) {
        let mut topics = self.topics();
        if let Some(sender) = topics.get(topic) {
            if sender.receiver_count() == 0 {
                topics.remove(topic);
            } else {
                sender.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }

    /// Wakes the waiters of every topic (a change that concerns them all: the registry).
    pub fn notify_all(&self) {
        let mut topics = self.topics();
        topics.retain(|_, sender| sender.receiver_count() > 0);
        for sender in topics.values() {
            sender.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Whether anybody waits on `topic` now.
    pub fn is_waited_on(&self, topic: &str) -> bool {
        self.topics().get(topic).is_some_and(|s| s.receiver_count() > 0)
    }

    /// How many topics have a signal (waiters, or had some since the last notify).
    pub fn len(&self) -> usize {
        self.topics().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Durable consumer state.
pub trait ConsumerStore: Send + Sync + 'static {
    /// Everything saved so far.
    fn load(&self) -> Result<ConsumerSnapshot, StoreError>;
    /// Enqueues changes now (in call order) and returns a future that resolves when durable.
    fn save(&self, ops: Vec<ConsumerOp>) -> PendingWrite;
}

#[cfg(test)]
mod topic_signal_tests {
    use super::TopicSignals;

    #[test]
    fn a_topic_wakes_only_its_waiters_and_is_forgotten_without_them() {
        let signals = TopicSignals::default();
        let mut a = signals.subscribe("a");
        let b = signals.subscribe("b");
        signals.notify("a");
        assert!(a.has_changed().expect("open"));
        assert!(!b.has_changed().expect("open"));
        a.borrow_and_update();
        drop(b);
        signals.notify("b");
        assert_eq!(signals.len(), 1, "b had no waiter left");
        signals.notify("never-waited-on");
        assert_eq!(signals.len(), 1);
        assert!(!a.has_changed().expect("open"));
    }
}
