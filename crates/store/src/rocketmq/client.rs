use super::RocketMqSettings;
use crate::{
    AppendOutcome, AppendStatus, Appended, Delivery, MessageLocation, MessageStore, NewRecord, QueueRange, QueueRef,
    ReadOutcome, StoreError, StoreIdentity, StoredMessage,
};
use async_trait::async_trait;
use cheetah_string::CheetahString;
use rocketmq_client_rust::{
    AclClientRPCHook, ClientError, ClientRuntime, ClientRuntimeConfig, DefaultMQProducer, PullResult, PullStatus,
    SendStatus, SessionCredentials, TelemetryHandle,
};
use rocketmq_model::common::boundary_type::BoundaryType;
use rocketmq_model::common::constant::PermName;
use rocketmq_model::common::message::MessageTrait;
use rocketmq_model::common::message::message_single::Message;
use rocketmq_model::common::sys_flag::pull_sys_flag::PullSysFlag;
use rocketmq_model::message::MessageQueue;
use rocketmq_model::version::RocketMqVersion;
use rocketmq_protocol::RpcRequestHeader;
use rocketmq_protocol::protocol::header::namesrv::topic_operation_header::TopicRequestHeader;
use rocketmq_protocol::protocol::header::pull_message_request_header::PullMessageRequestHeader;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The message property that carries the client-made msgId (Java's `MessageConst.PROPERTY_UNIQ_CLIENT_MESSAGE_ID_KEYIDX`).
const UNIQ_KEY: &str = "UNIQ_KEY";
/// The user property that carries the producing client's address (`clientIp`): the broker's
/// born host is the proxy's own address, which the client sets and mqproxy cannot.
const CLIENT_IP_PROPERTY: &str = "CLIENT_IP";
/// The LMQ topics a message is dispatched to (comma-separated), and the broker's answer: its
/// offset in each of them, in the same order.
const MULTI_DISPATCH_PROPERTY: &str = "INNER_MULTI_DISPATCH";
const MULTI_QUEUE_OFFSET_PROPERTY: &str = "INNER_MULTI_QUEUE_OFFSET";
/// How long a lite topic's offsets read from its brokers are trusted: lite topics are not in
/// the periodic refresh (there may be millions); a pull refreshes them when older.
const LITE_OFFSETS_FRESH_FOR: Duration = Duration::from_secs(1);
/// Broker response code of a message the broker refuses as invalid (MESSAGE_ILLEGAL: too big,
/// a timer too far ahead): the caller's fault, 400. Every other code is the server's, 500.
const CALLER_FAULT_CODES: [i32; 1] = [13];
/// The longest topic name a RocketMQ broker accepts (its `TOPIC_MAX_LENGTH`).
const MAX_TOPIC_CHARS: usize = 127;
/// The first RocketMQ version with timer messages (a delivery time of the sender's choice).
const FIRST_TIMER_VERSION: RocketMqVersion = RocketMqVersion::V5_0_0;
/// The broker id of a master (Java's `MixAll.MASTER_ID`).
const MASTER_ID: u64 = 0;
/// How long a broker that failed a call, and whose address the client did not know, is
/// avoided (its queues not chosen while others answer) before a call tries it again.
const BROKER_AVOID_FOR: Duration = Duration::from_secs(2);
/// How often a failed broker's address is probed (and each probe's connect timeout).
const BROKER_PROBE_EVERY: Duration = Duration::from_millis(200);
/// How often a pull is tried when the broker has not yet dispatched our own sends to the
/// queue, and how long it waits between tries.
const DISPATCH_WAIT_TRIES: u32 = 4;
const DISPATCH_WAIT: Duration = Duration::from_millis(3);
/// A batch travels as one message: the broker's `maxMessageSize` (4 MiB by default) bounds it.
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Why the backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum RocketMqStartError {
    #[error("the RocketMQ client could not start: {0}")]
    Client(String),
    #[error(
        "topic {topic:?} does not exist on the RocketMQ cluster at {namesrv} ({reason}); create it, or set [rocketmq] auto_create_topics = true"
    )]
    MissingTopic {
        topic: String,
        namesrv: String,
        reason: String,
    },
}

/// One topic: its queues in route order and their cached offsets.
struct Topic {
    /// The registry's name.
    local: String,
    /// The name on the cluster (with the prefix).
    remote: String,
    refs: Arc<[QueueRef]>,
    queues: Vec<MessageQueue>,
    ranges: Vec<Mutex<QueueRange>>,
    /// A lite topic's LMQ: when its offsets were last read from the brokers (None: stale).
    lite_refreshed: Option<Mutex<Option<std::time::Instant>>>,
}

struct Inner {
    settings: RocketMqSettings,
    /// Sends, and (through its client instance) pulls, offset queries and routes.
    producer: DefaultMQProducer,
    /// Registry name -> topic (topics are added at run time by the admin API).
    topics: std::sync::RwLock<HashMap<String, Arc<Topic>>>,
    identity: StoreIdentity,
    visible: crate::TopicSignals,
    /// Brokers whose last call failed (probed by `probe_failed_brokers`).
    failed_brokers: Arc<Mutex<HashMap<String, FailedBroker>>>,
}

/// A broker that failed a call.
struct FailedBroker {
    /// Where it listened, if the client knew: probed with plain TCP connects.
    addr: Option<String>,
    since: std::time::Instant,
    /// A probe connected: the next call may go to it.
    reachable: bool,
}

impl FailedBroker {
    /// Avoided for [`BROKER_AVOID_FOR`] after each failure, and beyond that until a probe
    /// connects (when its address is known). A broker that accepts connections can still fail
    /// calls (the client's circuit breaker for it is open, or it is still starting): then it is
    /// tried again every [`BROKER_AVOID_FOR`], not at every call.
    fn avoided(&self) -> bool {
        self.since.elapsed() < BROKER_AVOID_FOR || (self.addr.is_some() && !self.reachable)
    }
}

/// The address an earlier failure of this broker recorded (a second failure after the client
/// forgot it).
fn brokers_addr(brokers: &HashMap<String, FailedBroker>, broker: &str) -> Option<String> {
    brokers.get(broker).and_then(|b| b.addr.clone())
}

/// Probes failed brokers with plain TCP connects until each accepts one. Not through the
/// client: rocketmq-client-rust's transport opens a circuit breaker per address after 5 failed
/// connects and then refuses that address for 30 s, so calls to a dead broker would push its
/// recovery back by up to 30 s after it restarts.
async fn probe_failed_brokers(brokers: std::sync::Weak<Mutex<HashMap<String, FailedBroker>>>) {
    loop {
        tokio::time::sleep(BROKER_PROBE_EVERY).await;
        let Some(brokers) = brokers.upgrade() else { return };
        let targets: Vec<(String, String)> = brokers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|(_, b)| !b.reachable)
            .filter_map(|(name, b)| b.addr.clone().map(|a| (name.clone(), a)))
            .collect();
        for (name, addr) in targets {
            let connected = tokio::time::timeout(BROKER_PROBE_EVERY, tokio::net::TcpStream::connect(addr.as_str()))
                .await
                .is_ok_and(|r| r.is_ok());
            if !connected {
                continue;
            }
            if let Some(b) = brokers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get_mut(&name)
            {
                tracing::info!(broker = %name, addr, "RocketMQ broker accepts connections again");
                b.reachable = true;
            }
        }
    }
}

/// The RocketMQ backend (cheap to clone).
#[derive(Clone)]
pub struct RocketMqStore {
    inner: Arc<Inner>,
    _refresher: Arc<AbortOnDrop>,
    _prober: Arc<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A client error in words: the library redacts its Display, so name the kind, the broker
/// response code, the broker and the innermost cause (which carries the detail).
fn describe(e: &ClientError) -> String {
    let mut s = e.descriptor().public_message().to_owned();
    let mut cause = std::error::Error::source(e);
    let mut innermost = None;
    while let Some(c) = cause {
        innermost = Some(c);
        cause = c.source();
    }
    if let Some(c) = innermost {
        let detail = c.to_string();
        let detail = detail.split("\nFor more information").next().unwrap_or_default();
        if !detail.is_empty() && !s.contains(detail) {
            s.push_str(": ");
            s.push_str(detail);
        }
    }
    if let Some(code) = e.broker_response_code() {
        s.push_str(&format!(" (broker response code {code})"));
    }
    if let Some(addr) = e.broker_addr() {
        s.push_str(&format!(" from broker {addr}"));
    }
    if s.contains("enableActingMaster") {
        s.push_str(OLD_NAME_SERVER_HINT);
    }
    s
}

/// rocketmq-client-rust 1.0.0 reads a topic route only with the `enableActingMaster` field a
/// 5.x name server writes; a 4.x name server's routes fail to parse. 4.x brokers register with
/// a 5.x name server (RocketMQ supports that mix), which is the way round it.
const OLD_NAME_SERVER_HINT: &str =
    " (a RocketMQ 4.x name server: mqproxy's RocketMQ client needs a 5.x name server; 4.x brokers work behind one)";

fn is_timeout(e: &ClientError) -> bool {
    e.descriptor().class() == rocketmq_error::ErrorClass::TIMEOUT
}

/// A failed send: 300 when it timed out (it may be stored), 400 when the broker refused the
/// message as invalid, else 500.
fn send_error(e: &ClientError) -> StoreError {
    let what = describe(e);
    if is_timeout(e) {
        StoreError::OutcomeUnknown(format!("the broker did not answer in time: {what}"))
    } else if e
        .broker_response_code()
        .is_some_and(|c| CALLER_FAULT_CODES.contains(&c))
    {
        StoreError::Rejected(format!("the broker refused the message: {what}"))
    } else {
        StoreError::Backend(format!("send failed: {what}"))
    }
}

fn backend_error(op: &str, e: &ClientError) -> StoreError {
    StoreError::Backend(format!("{op} failed: {}", describe(e)))
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl RocketMqStore {
    /// Starts the producer (the one client) on the current Tokio runtime, checks (or
    /// creates) every registered topic and reads its route and offsets.
    ///
    /// # Errors
    /// The client cannot start, or a topic is missing (and may not be created).
    pub async fn start(
        settings: RocketMqSettings,
        topics: &[(String, u32)],
        max_message_bytes: usize,
        identity: StoreIdentity,
    ) -> Result<Self, RocketMqStartError> {
        let client_err = |what: &str, e: &dyn std::fmt::Display| RocketMqStartError::Client(format!("{what}: {e}"));
        let context = rocketmq_runtime::RuntimeContext::try_from_current("mqproxy-rocketmq")
            .map_err(|e| client_err("no Tokio runtime", &e))?;
        let runtime = ClientRuntime::try_new(
            context.service_context("client"),
            ClientRuntimeConfig::default(),
            TelemetryHandle::noop(),
        )
        .map_err(|e| client_err("client runtime", &describe(&e)))?;
        let hook = || {
            settings
                .credentials()
                .map(|(ak, sk)| Arc::new(AclClientRPCHook::new(SessionCredentials::with_keys(ak, sk))))
        };
        let send_timeout_ms = u32::try_from(settings.send_timeout_ms).unwrap_or(u32::MAX);
        let mut producer = DefaultMQProducer::builder(runtime.clone())
            .producer_group(settings.client_group.as_str())
            .name_server_addr(settings.namesrv_addr.as_str())
            .send_msg_timeout(send_timeout_ms)
            .retry_times_when_send_failed(0)
            .max_message_size(u32::try_from(max_message_bytes + 64 * 1024).unwrap_or(u32::MAX));
        if let Some(hook) = hook() {
            producer = producer.rpc_hook(hook);
        }
        let mut producer = producer.build();
        producer
            .start()
            .await
            .map_err(|e| client_err("producer start", &describe(&e)))?;
        let mut loaded = HashMap::new();
        for (name, queue_count) in topics {
            let topic = Self::load_topic(&mut producer, &settings, name, *queue_count, false).await?;
            loaded.insert(name.clone(), Arc::new(topic));
        }
        let inner = Arc::new(Inner {
            settings,
            producer,
            topics: std::sync::RwLock::new(loaded),
            identity,
            visible: crate::TopicSignals::default(),
            failed_brokers: Arc::new(Mutex::new(HashMap::new())),
        });
        let prober = tokio::spawn(probe_failed_brokers(Arc::downgrade(&inner.failed_brokers)));
        inner.refresh_offsets().await;
        // Holds only a weak reference, so dropping the last store handle stops it.
        let weak = Arc::downgrade(&inner);
        let refresher = tokio::spawn(async move {
            loop {
                let Some(every) = weak.upgrade().map(|i| i.settings.offset_refresh()) else {
                    return;
                };
                tokio::time::sleep(every).await;
                let Some(inner) = weak.upgrade() else { return };
                inner.refresh_offsets().await;
            }
        });
        Ok(Self {
            inner,
            _refresher: Arc::new(AbortOnDrop(refresher)),
            _prober: Arc::new(AbortOnDrop(prober)),
        })
    }

    /// A topic's route (created first when missing and allowed), in route order.
    async fn load_topic(
        producer: &mut DefaultMQProducer,
        settings: &RocketMqSettings,
        name: &str,
        queue_count: u32,
        operator: bool,
    ) -> Result<Topic, RocketMqStartError> {
        let remote = format!("{}{name}", settings.topic_prefix);
        let mut queues = Self::route(&remote, settings, producer, queue_count, operator).await?;
        queues.sort_by(|a, b| (a.broker_name().as_str(), a.queue_id()).cmp(&(b.broker_name().as_str(), b.queue_id())));
        let refs: Arc<[QueueRef]> = queues
            .iter()
            .map(|q| QueueRef {
                broker_name: q.broker_name().to_string(),
                queue_id: u32::try_from(q.queue_id()).unwrap_or(0),
            })
            .collect();
        tracing::info!(topic = %remote, queues = refs.len(), "RocketMQ topic route");
        let ranges = queues.iter().map(|_| Mutex::new(QueueRange::default())).collect();
        Ok(Topic {
            local: name.to_owned(),
            remote,
            refs,
            queues,
            ranges,
            lite_refreshed: None,
        })
    }

    /// The topic's queues, creating the topic first when it is missing and allowed.
    /// At start-up (`operator = false`) an existing topic is used as the cluster has it and a
    /// missing one is created only with `auto_create_topics`; an operator's request (the admin
    /// API) creates the topic or raises its queue count on the cluster.
    async fn route(
        remote: &str,
        settings: &RocketMqSettings,
        producer: &mut DefaultMQProducer,
        queue_count: u32,
        operator: bool,
    ) -> Result<Vec<MessageQueue>, RocketMqStartError> {
        let missing = |reason: String| RocketMqStartError::MissingTopic {
            topic: remote.to_owned(),
            namesrv: settings.namesrv_addr.clone(),
            reason,
        };
        let wanted = queue_count as usize;
        let existing = read_queues(producer, remote, settings.pull_timeout()).await;
        // Brokers already holding the topic: a grown topic gets the new queues on each of them.
        let brokers: Vec<CheetahString> = match &existing {
            Ok(queues) => {
                let mut b: Vec<CheetahString> = queues.iter().map(|q| q.broker_name().clone()).collect();
                b.sort();
                b.dedup();
                b
            }
            Err(_) => Vec::new(),
        };
        match existing {
            Ok(queues) if !queues.is_empty() && (!operator || queues.len() >= wanted) => return Ok(queues),
            Ok(queues) if queues.is_empty() && !operator && !settings.auto_create_topics => {
                return Err(missing("no queues".into()));
            }
            Err(e) if !operator && !settings.auto_create_topics => return Err(missing(e.to_string())),
            _ => {}
        }
        tracing::info!(
            topic = remote,
            queues = queue_count,
            "creating or growing RocketMQ topic"
        );
        producer
            .create_topic(
                &settings.cluster,
                remote,
                i32::try_from(queue_count).unwrap_or(i32::MAX),
                HashMap::new(),
            )
            .await
            .map_err(|e| {
                missing(format!(
                    "creating it on {:?} ([rocketmq] cluster: a cluster or broker name) failed: {}",
                    settings.cluster,
                    describe(&e)
                ))
            })?;
        if !brokers.is_empty() {
            // Grown: the Rust broker tells the name server only at its next periodic
            // registration (up to 30 s), so name the queues it now has rather than wait.
            return Ok(brokers
                .iter()
                .flat_map(|b| {
                    (0..queue_count)
                        .map(move |q| MessageQueue::from_parts(remote, b.clone(), i32::try_from(q).unwrap_or(i32::MAX)))
                })
                .collect());
        }
        // The broker registers a new topic with the name server at once; wait for the route.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match read_queues(producer, remote, settings.pull_timeout()).await {
                Ok(queues) if !queues.is_empty() && queues.len() >= wanted => return Ok(queues),
                Ok(queues) if tokio::time::Instant::now() >= deadline => {
                    return Err(missing(format!(
                        "created with {wanted} queues, but the route shows {} after 30 s",
                        queues.len()
                    )));
                }
                Ok(_) => {}
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(missing(format!("created, but no route within 30 s: {e}")));
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn topic(&self, topic: &str) -> Result<Arc<Topic>, StoreError> {
        self.inner
            .topic(topic)
            .ok_or_else(|| StoreError::Backend(format!("topic {topic} is not registered")))
    }

    fn queue<'a>(&self, topic: &'a Topic, queue: u32) -> Result<(&'a MessageQueue, &'a Mutex<QueueRange>), StoreError> {
        let i = queue as usize;
        match (topic.queues.get(i), topic.ranges.get(i)) {
            (Some(q), Some(r)) => Ok((q, r)),
            _ => Err(StoreError::Backend(format!(
                "topic {} has no queue index {queue}",
                topic.remote
            ))),
        }
    }

    fn message(topic: &Topic, delivery: Delivery, record: &NewRecord) -> Result<Message, StoreError> {
        let mut builder = Message::builder()
            .topic(topic.remote.as_str())
            .body_slice(&record.body)
            .property(
                rocketmq_model::common::message::message_property::MessagePropertyKey::UniqueClientMsgId,
                hex::encode_upper(record.msg_id),
            );
        if let Some(keys) = &record.keys {
            builder = builder.key(keys.as_str());
        }
        if !record.lite_topics.is_empty() {
            // The broker (enableLmq, enableMultiDispatch) adds it to queue 0 of each LMQ.
            let lmqs: Vec<String> = record
                .lite_topics
                .iter()
                .filter_map(|t| crate::split_lite_queue_topic(t))
                .map(|(_, lite)| crate::lite_queue_topic(&topic.remote, lite))
                .collect();
            builder = builder.property(
                rocketmq_model::common::message::message_property::MessagePropertyKey::InnerMultiDispatch,
                lmqs.join(","),
            );
        }
        if let Some(host) = &record.born_host {
            builder = builder
                .raw_property(CLIENT_IP_PROPERTY, host.as_str())
                .map_err(|e| StoreError::Rejected(format!("clientIp not accepted by the RocketMQ client: {e}")))?;
        }
        builder = match delivery {
            Delivery::Now => builder,
            Delivery::DelayLevel(level) => builder.delay_level(i32::from(level)),
            Delivery::At(at) => builder.deliver_time_ms(at),
        };
        builder
            .build()
            .map_err(|e| StoreError::Rejected(format!("message not accepted by the RocketMQ client: {e}")))
    }
}

/// The producer's client instance (a macro: its type is not public in rocketmq-client-rust).
macro_rules! client_of {
    ($producer:expr) => {
        $producer
            .default_mq_producer_impl()
            .ok_or(StoreError::Closed)?
            .get_mq_client_factory()
            .map_err(|e| backend_error("client lookup", &e))?
    };
}

/// Which offset of a queue a broker is asked for.
enum OffsetEnd {
    Min,
    Max,
    /// The first offset stored at or after this time (epoch ms).
    At(i64),
}

/// A topic's readable queues as the name server lists them (Java's subscribe queues: each
/// readable broker's `readQueueNums`); empty when the topic has no route.
async fn read_queues(
    producer: &DefaultMQProducer,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<MessageQueue>, StoreError> {
    let client = client_of!(producer);
    let route = client
        .get_mq_client_api_impl()
        .map_err(|e| backend_error("client lookup", &e))?
        .get_topic_route_info_from_name_server(topic, duration_ms(timeout))
        .await
        .map_err(|e| backend_error("route lookup", &e))?;
    Ok(route
        .map(|route| {
            route
                .queue_datas
                .iter()
                .filter(|q| PermName::is_readable(q.perm))
                .flat_map(|q| {
                    (0..q.read_queue_nums).map(|i| {
                        MessageQueue::from_parts(topic, q.broker_name.clone(), i32::try_from(i).unwrap_or(i32::MAX))
                    })
                })
                .collect()
        })
        .unwrap_or_default())
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Inner {
    /// The master address of a queue's broker, from the client's route table (re-read from the
    /// name server when the broker is not in it).
    async fn master_addr(&self, mq: &MessageQueue) -> Result<CheetahString, StoreError> {
        let client = client_of!(self.producer);
        if let Some(addr) = client.find_broker_address_in_publish(mq.broker_name()) {
            return Ok(addr);
        }
        client.update_topic_route_info_from_name_server_topic(mq.topic()).await;
        client.find_broker_address_in_publish(mq.broker_name()).ok_or_else(|| {
            StoreError::Backend(format!(
                "broker {} has no master on the name server's route of {}",
                mq.broker_name(),
                mq.topic()
            ))
        })
    }

    /// One pull at `from`, without committing an offset (the group's broker offsets stay
    /// untouched): up to `max` messages and about `max_bytes`.
    async fn pull(&self, mq: &MessageQueue, from: u64, max: usize, max_bytes: usize) -> Result<PullResult, StoreError> {
        let failed = |e: &ClientError| backend_error(&format!("pull from broker {}", mq.broker_name()), e);
        let addr = self.master_addr(mq).await?;
        let timeout = self.settings.pull_timeout();
        let header = PullMessageRequestHeader {
            consumer_group: CheetahString::from(self.settings.client_group.as_str()),
            topic: mq.topic().clone(),
            lite_topic: None,
            queue_id: mq.queue_id(),
            queue_offset: to_i64(from),
            max_msg_nums: i32::try_from(max.max(1)).unwrap_or(i32::MAX),
            // The subscription travels with the request: the broker needs no heartbeat of ours.
            sys_flag: PullSysFlag::build_sys_flag(false, false, true, false) as i32,
            commit_offset: 0,
            suspend_timeout_millis: 0,
            subscription: Some(CheetahString::from_static_str("*")),
            // As Java's subscription data does: its creation time (no import from the engine).
            sub_version: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            // Without it the broker is asked for i32::MAX bytes and warns at every pull.
            max_msg_bytes: Some(i32::try_from(max_bytes.max(1)).unwrap_or(i32::MAX)),
            request_source: None,
            proxy_forward_client_id: None,
            expression_type: Some(CheetahString::from_static_str("TAG")),
            topic_request: Some(TopicRequestHeader {
                lo: None,
                rpc: Some(RpcRequestHeader {
                    namespace: None,
                    namespaced: None,
                    broker_name: Some(mq.broker_name().clone()),
                    oneway: None,
                }),
            }),
        };
        let client = client_of!(self.producer);
        match tokio::time::timeout(
            timeout,
            client.pull_message_from_broker(addr.as_str(), header, duration_ms(timeout)),
        )
        .await
        {
            Ok(result) => result.map_err(|e| failed(&e)),
            Err(_) => Err(StoreError::Backend(format!(
                "pull from broker {} failed: no answer within {} ms",
                mq.broker_name(),
                timeout.as_millis()
            ))),
        }
    }

    /// A queue's min or max offset, or the offset of a time, from its broker.
    async fn offset(&self, mq: &MessageQueue, end: OffsetEnd) -> Result<u64, StoreError> {
        let addr = self.master_addr(mq).await?;
        let timeout = duration_ms(self.settings.pull_timeout());
        let client = client_of!(self.producer);
        let offset = match end {
            OffsetEnd::Min => client.get_min_offset(addr.as_str(), mq, timeout).await,
            OffsetEnd::Max => client.get_max_offset(addr.as_str(), mq, timeout).await,
            OffsetEnd::At(at) => {
                client
                    .search_offset_by_timestamp(addr.as_str(), mq, at, BoundaryType::Lower, timeout)
                    .await
            }
        };
        offset
            .map(to_u64)
            .map_err(|e| backend_error(&format!("offset query to broker {}", mq.broker_name()), &e))
    }

    /// Records how a call to a broker went: a failure (no answer, a refused connection, a
    /// timeout) makes it avoided until it accepts TCP connections again; an answer clears it.
    fn broker_answered<T>(&self, broker: &str, result: &Result<T, StoreError>) {
        let failed = matches!(result, Err(StoreError::Backend(_) | StoreError::OutcomeUnknown(_)));
        let addr = failed
            .then(|| {
                self.producer
                    .default_mq_producer_impl()
                    .and_then(|p| p.get_mq_client_factory().ok())
                    .and_then(|f| f.find_broker_address_in_publish(&CheetahString::from(broker)))
                    .map(|a| a.to_string())
            })
            .flatten();
        let mut brokers = self
            .failed_brokers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if failed {
            let addr = addr.or_else(|| brokers_addr(&brokers, broker));
            let was = brokers.insert(
                broker.to_owned(),
                FailedBroker {
                    addr: addr.clone(),
                    since: std::time::Instant::now(),
                    reachable: false,
                },
            );
            if was.is_none() {
                tracing::warn!(
                    broker,
                    addr,
                    "RocketMQ broker failed a call: avoided until it accepts connections again"
                );
            }
        } else if brokers.remove(broker).is_some() {
            tracing::info!(broker, "RocketMQ broker answers again");
        }
    }

    /// Before a call to `broker`: an error if it is avoided; when it has just become reachable
    /// again, the topic's route is read from the name server first (the client dropped the
    /// dead broker's address and would learn it back only at its 30 s route poll).
    async fn before_call(&self, topic: &str, broker: &str) -> Result<(), StoreError> {
        let state = self
            .failed_brokers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(broker)
            .map(FailedBroker::avoided);
        match state {
            None => Ok(()),
            Some(true) => Err(StoreError::Backend(format!(
                "broker {broker} is not reachable (it failed a call and refuses connections); waiting for it to come back"
            ))),
            Some(false) => {
                if let Some(factory) = self
                    .producer
                    .default_mq_producer_impl()
                    .and_then(|p| p.get_mq_client_factory().ok())
                {
                    factory
                        .update_topic_route_info_from_name_server_topic(&CheetahString::from(topic))
                        .await;
                }
                Ok(())
            }
        }
    }

    fn broker_avoided(&self, broker: &str) -> bool {
        self.failed_brokers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(broker)
            .is_some_and(FailedBroker::avoided)
    }

    /// A broker's RocketMQ version, as its heartbeat answers carry it (0: not heard from).
    async fn broker_version(&self, topic: &str, broker: &CheetahString) -> Result<u32, StoreError> {
        let factory = client_of!(self.producer);
        // The producer's client learns a broker's address from a route of a topic it sent to,
        // and its version from the heartbeat that follows: before a topic's first send, fetch
        // the route and send the heartbeat now.
        for attempt in 0..2 {
            if attempt > 0 {
                factory
                    .update_topic_route_info_from_name_server_topic(&CheetahString::from(topic))
                    .await;
                factory.send_heartbeat_to_all_broker_with_lock().await;
            }
            let version = factory
                .find_broker_address_in_subscribe(broker, MASTER_ID, true)
                .await
                .map_or(0, |found| u32::try_from(found.broker_version).unwrap_or(0));
            if version != 0 {
                return Ok(version);
            }
        }
        Ok(0)
    }

    /// Timer messages (`deliveryTimestamp`) exist since RocketMQ 5.0: a 4.x broker stores the
    /// property and delivers at once, so such a send is refused before it reaches one.
    async fn check_timer_support(&self, topic: &str, broker: &CheetahString) -> Result<(), StoreError> {
        let version = self.broker_version(topic, broker).await?;
        if version >= FIRST_TIMER_VERSION.ordinal() {
            return Ok(());
        }
        Err(if version == 0 {
            StoreError::Backend(format!(
                "deliveryTimestamp: broker {broker} has not answered a heartbeat, so whether it has timer messages (RocketMQ 5.0 and later) is unknown; not sent"
            ))
        } else {
            StoreError::Rejected(format!(
                "deliveryTimestamp needs timer messages, which broker {broker} lacks: it runs RocketMQ {} (timer messages exist since 5.0); use delayLevel",
                RocketMqVersion::from_ordinal(version)
                    .name()
                    .trim_start_matches('V')
                    .replace('_', ".")
            ))
        })
    }

    fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics.read().ok().and_then(|t| t.get(name).cloned())
    }

    /// The topics now (a snapshot: never hold the lock across an await).
    fn all_topics(&self) -> Vec<Arc<Topic>> {
        self.topics
            .read()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Re-reads every queue's min and max offset; wakes streams when a max grew.
    async fn refresh_offsets(&self) {
        for topic in self.all_topics() {
            // Lite topics only while a consumer waits on one (a long poll, a stream).
            if topic.lite_refreshed.is_none() || self.visible.is_waited_on(&topic.local) {
                self.refresh_topic(&topic).await;
            }
        }
    }

    /// Re-reads the min and max offset of a topic's queues; wakes streams when a max grew.
    async fn refresh_topic(&self, topic: &Topic) {
        let mut grew = false;
        for (mq, range) in topic.queues.iter().zip(&topic.ranges) {
            // A failed broker is left to the prober: every failed call would count
            // towards the client's circuit breaker for its address.
            if self.broker_avoided(mq.broker_name()) {
                continue;
            }
            // One call at a time: a broker that fails the first is not asked the second.
            let both = match self.offset(mq, OffsetEnd::Min).await {
                Ok(min) => self.offset(mq, OffsetEnd::Max).await.map(|max| (min, max)),
                Err(e) => Err(e),
            };
            let (min, max) = match both {
                Ok(both) => both,
                Err(e) => {
                    tracing::debug!(topic = %topic.remote, queue = mq.queue_id(), error = %e, "offset refresh failed");
                    self.broker_answered::<()>(mq.broker_name(), &Err(e));
                    continue;
                }
            };
            self.broker_answered(mq.broker_name(), &Ok(()));
            grew |= update_range(range, Some(min), max);
        }
        if grew {
            self.visible.notify(&topic.local);
        }
    }
}

/// Records offsets seen at the broker; true when the max grew. The max only grows (queue
/// offsets never go back in RocketMQ), so a refresh that read the broker before one of our
/// sends cannot hide that send.
fn update_range(range: &Mutex<QueueRange>, min: Option<u64>, max: u64) -> bool {
    let mut r = range.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let grew = max > r.max;
    r.max = r.max.max(max);
    if let Some(min) = min {
        r.min = min.min(r.max);
    }
    grew
}

/// The offset of a message in `lmq`, from the properties the broker's multi-dispatch set.
fn lmq_offset(lmq: &str, dispatched: Option<&str>, offsets: Option<&str>) -> Option<u64> {
    let position = dispatched?.split(',').position(|t| t == lmq)?;
    offsets?.split(',').nth(position)?.trim().parse().ok()
}

fn append_status(status: SendStatus) -> AppendStatus {
    match status {
        SendStatus::SendOk => AppendStatus::Ok,
        SendStatus::FlushDiskTimeout => AppendStatus::FlushDiskTimeout,
        SendStatus::FlushSlaveTimeout => AppendStatus::FlushSlaveTimeout,
        SendStatus::SlaveNotAvailable => AppendStatus::SlaveNotAvailable,
    }
}

fn parse_id(hex_id: &str) -> Option<[u8; 16]> {
    let mut id = [0u8; 16];
    hex::decode_to_slice(hex_id.trim(), &mut id).ok().map(|()| id)
}

impl RocketMqStore {
    async fn append_to(
        &self,
        topic: &Topic,
        mq: &MessageQueue,
        range: &Mutex<QueueRange>,
        delivery: Delivery,
        records: Vec<NewRecord>,
    ) -> Result<AppendOutcome, StoreError> {
        if let Delivery::At(_) = delivery {
            self.inner.check_timer_support(&topic.remote, mq.broker_name()).await?;
        }
        let count = records.len() as u64;
        let timeout = self.inner.settings.send_timeout_ms;
        let messages = records
            .iter()
            .map(|r| Self::message(topic, delivery, r))
            .collect::<Result<Vec<_>, _>>()?;
        let result = if messages.len() == 1 {
            let message = messages.into_iter().next().ok_or(StoreError::Closed)?;
            self.inner
                .producer
                .send_to_queue_with_timeout(message, mq.clone(), timeout)
                .await
                .map_err(|e| send_error(&e))?
                .ok_or_else(|| StoreError::Backend("the broker answered no send result".into()))?
        } else {
            self.inner
                .producer
                .send_batch_to_queue_with_timeout(messages, mq.clone(), timeout)
                .await
                .map_err(|e| send_error(&e))?
        };
        let offset_ids: Vec<&str> = result.offset_msg_id.as_deref().unwrap_or_default().split(',').collect();
        let appended = (0..count)
            .map(|j| Appended {
                queue_offset: result.queue_offset + j,
                store_seq: 0,
                offset_msg_id: offset_ids
                    .get(j as usize)
                    .map(|s| (*s).to_owned())
                    .filter(|s| !s.is_empty()),
            })
            .collect();
        if delivery == Delivery::Now && update_range(range, None, result.queue_offset + count) {
            self.inner.visible.notify(&topic.local);
        }
        // Their offsets are the broker's: read again at their next pull, which this wakes.
        for lite_topic in records.iter().flat_map(|r| &r.lite_topics) {
            if let Some(lite) = self.inner.topic(lite_topic)
                && let Some(refreshed) = &lite.lite_refreshed
            {
                *refreshed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
            }
            self.inner.visible.notify(lite_topic);
        }
        Ok(AppendOutcome {
            appended,
            status: append_status(result.send_status),
            region_id: result.region_id.clone(),
            trace_on: Some(result.trace_on),
        })
    }
}

#[async_trait]
impl MessageStore for RocketMqStore {
    async fn append(
        &self,
        topic: &str,
        queue: u32,
        delivery: Delivery,
        records: Vec<NewRecord>,
    ) -> Result<AppendOutcome, StoreError> {
        let topic = &*self.topic(topic)?;
        let (mq, range) = self.queue(topic, queue)?;
        self.inner.before_call(&topic.remote, mq.broker_name()).await?;
        let result = self.append_to(topic, mq, range, delivery, records).await;
        self.inner.broker_answered(mq.broker_name(), &result);
        // Name the broker: an ordered send cannot go elsewhere, its caller should know where.
        result.map_err(|e| match e {
            StoreError::Backend(m) => StoreError::Backend(format!("broker {}: {m}", mq.broker_name())),
            StoreError::OutcomeUnknown(m) => StoreError::OutcomeUnknown(format!("broker {}: {m}", mq.broker_name())),
            other => other,
        })
    }

    fn queue_available(&self, topic: &str, queue: u32) -> bool {
        self.inner
            .topic(topic)
            .and_then(|t| {
                t.queues
                    .get(queue as usize)
                    .map(|q| !self.inner.broker_avoided(q.broker_name()))
            })
            .unwrap_or(true)
    }

    fn max_batch_bytes(&self) -> usize {
        MAX_BATCH_BYTES
    }

    fn ranges_are_exact(&self) -> bool {
        false
    }

    async fn add_topic(&self, topic: &str, queues: u32) -> Result<(), StoreError> {
        let prefix = &self.inner.settings.topic_prefix;
        let remote_chars = prefix.chars().count() + topic.chars().count();
        if remote_chars > MAX_TOPIC_CHARS {
            return Err(StoreError::Rejected(format!(
                "topic {topic:?} is {remote_chars} characters on the cluster with the prefix {prefix:?}; RocketMQ allows at most {MAX_TOPIC_CHARS}"
            )));
        }
        let mut producer = self.inner.producer.clone();
        let loaded = Self::load_topic(&mut producer, &self.inner.settings, topic, queues, true)
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        if let Ok(mut topics) = self.inner.topics.write() {
            // A known topic keeps its cached offsets when its route did not change.
            let same_route = topics.get(topic).is_some_and(|t| t.refs == loaded.refs);
            if !same_route {
                topics.insert(topic.to_owned(), Arc::new(loaded));
            }
        }
        self.inner.refresh_offsets().await;
        Ok(())
    }

    async fn open_lite_topic(&self, parent: &str, lite_topic: &str) -> Result<(), StoreError> {
        let topic = match self.inner.topic(lite_topic) {
            Some(known) => known,
            None => {
                let parent = self.topic(parent)?;
                let (_, lite) = crate::split_lite_queue_topic(lite_topic)
                    .ok_or_else(|| StoreError::Rejected(format!("{lite_topic} is not a lite topic's queue topic")))?;
                let remote = crate::lite_queue_topic(&parent.remote, lite);
                // Queue 0 of the LMQ on each broker of the parent, in route order.
                let mut brokers: Vec<&CheetahString> = parent.queues.iter().map(MessageQueue::broker_name).collect();
                brokers.dedup();
                let queues: Vec<MessageQueue> = brokers
                    .into_iter()
                    .map(|b| MessageQueue::from_parts(remote.as_str(), b.clone(), 0))
                    .collect();
                let opened = Arc::new(Topic {
                    local: lite_topic.to_owned(),
                    refs: queues
                        .iter()
                        .map(|q| QueueRef {
                            broker_name: q.broker_name().to_string(),
                            queue_id: 0,
                        })
                        .collect(),
                    ranges: queues.iter().map(|_| Mutex::new(QueueRange::default())).collect(),
                    queues,
                    remote,
                    lite_refreshed: Some(Mutex::new(None)),
                });
                let mut topics = self.inner.topics.write().map_err(|_| StoreError::Closed)?;
                topics.entry(lite_topic.to_owned()).or_insert(opened).clone()
            }
        };
        let stale = topic.lite_refreshed.as_ref().is_some_and(|r| {
            let mut at = r.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let stale = at.is_none_or(|t| t.elapsed() >= LITE_OFFSETS_FRESH_FOR);
            if stale {
                *at = Some(std::time::Instant::now());
            }
            stale
        });
        if stale {
            self.inner.refresh_topic(&topic).await;
        }
        Ok(())
    }

    async fn drop_lite_topic(&self, lite_topic: &str) -> Result<(), StoreError> {
        if let Ok(mut topics) = self.inner.topics.write() {
            topics.remove(lite_topic);
        }
        Ok(())
    }

    fn lite_topics(&self) -> Vec<String> {
        self.inner
            .all_topics()
            .into_iter()
            .filter(|t| t.lite_refreshed.is_some())
            .map(|t| t.local.clone())
            .collect()
    }

    fn queues(&self, topic: &str) -> Arc<[QueueRef]> {
        self.inner
            .topic(topic)
            .map_or_else(|| Arc::from(Vec::new()), |t| t.refs.clone())
    }

    fn queue_range(&self, topic: &str, queue: u32) -> QueueRange {
        self.inner
            .topic(topic)
            .and_then(|t| {
                t.ranges
                    .get(queue as usize)
                    .map(|r| *r.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
            })
            .unwrap_or_default()
    }

    async fn read(
        &self,
        topic: &str,
        queue: u32,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<ReadOutcome, StoreError> {
        let topic = &*self.topic(topic)?;
        let (mq, range) = self.queue(topic, queue)?;
        self.inner.before_call(&topic.remote, mq.broker_name()).await?;
        // Read-your-writes: a broker stores a message before it dispatches it to the queue
        // (about a millisecond later), so a pull right after our own send can miss it. When the
        // broker's queue is shorter than our sends made it, pull again a moment later.
        let sent_up_to = range.lock().unwrap_or_else(std::sync::PoisonError::into_inner).max;
        let mut attempt = 1;
        let result = loop {
            let result = self.inner.pull(mq, from, max, max_bytes).await;
            self.inner.broker_answered(mq.broker_name(), &result);
            let result = result?;
            let found = result.msg_found_list().map_or(0, |m| m.len());
            let behind = result.max_offset() < sent_up_to && found < max;
            if !behind || attempt == DISPATCH_WAIT_TRIES {
                break result;
            }
            attempt += 1;
            tokio::time::sleep(DISPATCH_WAIT).await;
        };
        if update_range(range, Some(result.min_offset()), result.max_offset()) {
            self.inner.visible.notify(&topic.local);
        }
        match result.pull_status() {
            PullStatus::Found => {}
            PullStatus::NoNewMsg => return Ok(ReadOutcome::default()),
            PullStatus::NoMatchedMsg | PullStatus::OffsetIllegal => {
                let next = result.next_begin_offset();
                return Ok(ReadOutcome {
                    messages: Vec::new(),
                    skip_to: (next != from).then_some(next),
                });
            }
        }
        let mut messages = Vec::new();
        let mut bytes = 0;
        for m in result.msg_found_list().unwrap_or_default() {
            let body = m.body().map(|b| b.to_vec()).unwrap_or_default();
            bytes += body.len();
            if bytes > max_bytes && !messages.is_empty() {
                break;
            }
            let inner = m.message_inner();
            let uniq_key = inner.property(UNIQ_KEY);
            // A longer client msgId (28 bytes from an IPv6 host) is shown as it is; the
            // offsetMsgId (16 bytes) is then the message's identity inside mqproxy.
            let (msg_id, client_msg_id) = match uniq_key.and_then(parse_id) {
                Some(id) => (id, None),
                None => (
                    parse_id(m.msg_id().as_str()).unwrap_or_else(|| {
                        tracing::warn!(topic = %topic.remote, offset = m.queue_offset(), "message without a 16-byte offsetMsgId");
                        [0; 16]
                    }),
                    uniq_key.map(|k| k.to_string()),
                ),
            };
            // A message read from an LMQ carries its offset in the parent's queue; its offset
            // in this LMQ is the broker's answer beside this LMQ's name.
            let offset = if topic.lite_refreshed.is_some() {
                lmq_offset(
                    &topic.remote,
                    inner.property(MULTI_DISPATCH_PROPERTY),
                    inner.property(MULTI_QUEUE_OFFSET_PROPERTY),
                )
                .ok_or_else(|| StoreError::Corrupt(format!("a message of {} without its LMQ offset", topic.remote)))?
            } else {
                to_u64(m.queue_offset())
            };
            messages.push(StoredMessage {
                msg_id,
                client_msg_id,
                offset,
                store_ms: to_u64(m.store_timestamp()),
                keys: inner.get_keys().map(|k| k.to_string()).filter(|k| !k.is_empty()),
                born_host: inner.property(CLIENT_IP_PROPERTY).map(|h| h.to_string()),
                body,
            });
            if messages.len() >= max {
                break;
            }
        }
        Ok(ReadOutcome {
            messages,
            skip_to: None,
        })
    }

    async fn search_offset(&self, topic: &str, queue: u32, timestamp_ms: u64) -> Result<u64, StoreError> {
        let topic = &*self.topic(topic)?;
        let (mq, _) = self.queue(topic, queue)?;
        let timestamp = i64::try_from(timestamp_ms).unwrap_or(i64::MAX);
        self.inner.offset(mq, OffsetEnd::At(timestamp)).await
    }

    async fn locate(&self, msg_id: &str) -> Result<Option<(MessageLocation, [u8; 16])>, StoreError> {
        let Some(producer) = self.inner.producer.default_mq_producer_impl() else {
            return Err(StoreError::Backend("the producer is not started".into()));
        };
        let key = msg_id.to_ascii_uppercase();
        for topic in self.inner.all_topics() {
            let Ok(found) = producer.query_message_by_uniq_key(&topic.remote, &key).await else {
                continue;
            };
            // The identity `read` gives it: the client msgId when 16 bytes, else the offsetMsgId.
            let Some(id) = parse_id(&key).or_else(|| parse_id(found.msg_id().as_str())) else {
                continue;
            };
            // A query by key does not say which broker answered (its broker name is empty):
            // every broker has a queue of that id, so the one holding the message is found by
            // reading each candidate's message at that offset.
            let broker = found.broker_name();
            let queue_id = u32::try_from(found.queue_id()).unwrap_or(u32::MAX);
            let offset = to_u64(found.queue_offset());
            let candidates = topic
                .refs
                .iter()
                .enumerate()
                .filter(|(_, q)| (broker.is_empty() || q.broker_name == broker) && q.queue_id == queue_id);
            for (index, _) in candidates {
                let queue = u32::try_from(index).unwrap_or(u32::MAX);
                // One message: no byte cap applies (a read always returns its first message).
                let read = self.read(&topic.local, queue, offset, 1, usize::MAX).await?;
                if read
                    .messages
                    .first()
                    .is_some_and(|m| m.offset == offset && m.msg_id == id)
                {
                    let location = MessageLocation {
                        topic: topic.local.clone(),
                        queue,
                        offset,
                    };
                    return Ok(Some((location, id)));
                }
            }
        }
        Ok(None)
    }

    async fn probe(&self) -> Result<(), StoreError> {
        // Ready when every topic's first queue answers an offset query.
        for topic in self.inner.all_topics() {
            if let Some(mq) = topic.queues.first() {
                self.inner.offset(mq, OffsetEnd::Max).await?;
            }
        }
        Ok(())
    }

    fn identity(&self) -> &StoreIdentity {
        &self.inner.identity
    }

    async fn shutdown(&self) {
        // Unregister from the brokers (bounded: a dead broker must not hold up the exit).
        let mut producer = self.inner.producer.clone();
        if tokio::time::timeout(Duration::from_secs(5), producer.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("the RocketMQ client did not shut down within 5 s");
        }
    }

    fn visible_changes(&self, topic: &str) -> tokio::sync::watch::Receiver<u64> {
        self.inner.visible.subscribe(topic)
    }
}

impl std::fmt::Debug for RocketMqStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocketMqStore")
            .field("namesrv_addr", &self.inner.settings.namesrv_addr)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_refresh_never_hides_a_send() {
        let range = Mutex::new(QueueRange::default());
        // Our send stored offset 4: max 5 at once.
        assert!(update_range(&range, None, 5));
        // A refresh that read the broker before that send answers max 4: ignored.
        assert!(!update_range(&range, Some(0), 4));
        assert_eq!(*range.lock().unwrap(), QueueRange { min: 0, max: 5 });
        // Retention moved the min; a later read sees more messages.
        assert!(update_range(&range, Some(3), 7));
        assert_eq!(*range.lock().unwrap(), QueueRange { min: 3, max: 7 });
    }

    #[test]
    fn unique_keys_parse_as_msg_ids() {
        assert_eq!(parse_id("7F00000100002A9F00000000000000E1").map(|b| b[0]), Some(0x7f));
        assert_eq!(parse_id("not hex"), None);
        assert_eq!(parse_id("7F00"), None);
    }
}
