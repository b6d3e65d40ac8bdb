//! Consuming: queue choice and locks, fetch, ack, unlock, retry messages, pause and rate limit.
//!
//! The rules live here; the state lives behind [`ConsumerStateStore`], whose steps are atomic
//! compare-and-set operations (take a lock only if it is still what was seen; finish a batch
//! only with the lock that handed it out), so the same rules hold for one proxy's memory and
//! for a state store shared by several proxies.

pub(crate) mod offsets;
mod pop;

use super::rate_limit::RateLimiters;
use super::registry::Registry;
use super::request_id::{self, BatchToken, RequestIdKeys};
use super::{Clock, ConsumeMode, ConsumeSettings, ConsumerSpec, Engine, EngineError};
use mqproxy_store::consumer_state::{ConsumerStateStore, ContextSnapshot, LockRequest, RetryFate};
use mqproxy_store::{ConsumerSettings, ContextKey, QueueState, ReadOutcome, RetryEntry, StoredMessage};
use std::collections::HashSet;
use std::sync::Arc;

/// The consuming service's state.
pub(crate) struct ConsumeState {
    settings: ConsumeSettings,
    /// Consumer offsets, locks, retry entries and settings.
    state: Arc<dyn ConsumerStateStore>,
    /// Keys of the requestId MAC (shared by every proxy on one consumer state store).
    request_id_keys: RequestIdKeys,
    rate_limiters: RateLimiters,
    /// Per topic, bumped when a queue lock is released or consumer settings change: streaming
    /// and long-polling consumers waiting for a free queue wake up on it.
    changes: mqproxy_store::TopicSignals,
}

impl ConsumeState {
    pub(crate) fn new(
        settings: ConsumeSettings,
        state: Arc<dyn ConsumerStateStore>,
        request_id_keys: RequestIdKeys,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            settings,
            state,
            request_id_keys,
            rate_limiters: RateLimiters::new(clock),
            changes: mqproxy_store::TopicSignals::default(),
        }
    }

    pub(crate) fn settings(&self) -> &ConsumeSettings {
        &self.settings
    }

    /// Wakes the streaming consumers of `topic`: a lock was released or settings changed.
    pub(crate) fn notify(&self, topic: &str) {
        self.changes.notify(topic);
    }

    /// Wakes every streaming consumer (the registry changed: each looks at its entry again).
    pub(crate) fn notify_all(&self) {
        self.changes.notify_all();
    }

    /// Whether a streaming or long-polling consumer waits on `topic` now.
    pub(crate) fn is_waited_on(&self, topic: &str) -> bool {
        self.changes.is_waited_on(topic)
    }

    /// The consumer state store (the lite topics' reclaim forgets contexts in it).
    pub(crate) fn state(&self) -> &Arc<dyn ConsumerStateStore> {
        &self.state
    }

    /// Changes of `topic` from now on (see [`ConsumeState::notify`]).
    pub(crate) fn subscribe(&self, topic: &str) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe(topic)
    }
}

/// Who consumes what, as a request names it.
#[derive(Debug, Clone)]
pub struct ConsumeTarget {
    pub topic: String,
    pub consumer: String,
    /// Broadcast consumers only.
    pub client_id: Option<String>,
    /// A lite topic under the consumer's (parent) topic: its context and queue instead.
    pub lite_topic: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct FetchRequest {
    /// The previous batch's requestId: acknowledged before pulling.
    pub request_id: Option<String>,
    pub client_ip: Option<String>,
    /// Messages per batch instead of the consumer's `max_pull_size` (`limits::PULL_SIZE`).
    pub max_pull_size: Option<u32>,
    /// This batch's lock time in seconds instead of the consumer's (`consumeTimeout`,
    /// `limits::CONSUME_TIMEOUT_S`).
    pub consume_timeout_s: Option<u64>,
    /// How long this pull's read of the message store may take, in seconds (`pullTimeout`,
    /// `limits::PULL_TIMEOUT_S`; default `limits::DEFAULT_PULL_TIMEOUT_S`).
    pub pull_timeout_s: Option<u64>,
    /// Long polling: how long a pull that finds nothing waits for a message, in ms (`waitMs`,
    /// `limits::WAIT_MS`; 0 or None answers at once).
    pub wait_ms: Option<u64>,
    /// POP consumption: a segment of a queue, not the queue, is locked (see `consume::pop`).
    pub pop: bool,
}

/// How one pull runs, as its request (or a stream's subscription) asked, checked.
#[derive(Debug, Clone)]
pub(super) struct PullOptions {
    pub client_ip: Option<String>,
    pub max_pull_size: Option<u32>,
    /// The lock's own timeout; None: the consumer's setting.
    pub lock_timeout_ms: Option<u64>,
    pub read_timeout: std::time::Duration,
    /// False for the pulls a long-polling request repeats after its first: the consumer's rate
    /// limit counts requests, not wake-ups.
    pub charge_rate_limit: bool,
    /// POP consumption.
    pub pop: bool,
}

impl PullOptions {
    /// Checks each value against its limit (a 400 naming the parameter and its range).
    pub(super) fn checked(
        client_ip: Option<String>,
        max_pull_size: Option<u32>,
        consume_timeout_s: Option<u64>,
        pull_timeout_s: Option<u64>,
    ) -> Result<Self, EngineError> {
        if let Some(m) = max_pull_size {
            limits::check(limits::PULL_SIZE, "maxPullSize", u64::from(m))?;
        }
        if let Some(t) = consume_timeout_s {
            limits::check(limits::CONSUME_TIMEOUT_S, "consumeTimeout", t)?;
        }
        if let Some(t) = pull_timeout_s {
            limits::check(limits::PULL_TIMEOUT_S, "pullTimeout", t)?;
        }
        Ok(Self {
            // Kept with the queue's state (the last client that pulled it).
            client_ip: limits::client_address(client_ip),
            max_pull_size,
            lock_timeout_ms: consume_timeout_s.map(|s| s * 1000),
            read_timeout: std::time::Duration::from_secs(pull_timeout_s.unwrap_or(limits::DEFAULT_PULL_TIMEOUT_S)),
            charge_rate_limit: true,
            pop: false,
        })
    }

    /// The lock time of a batch this pull hands out for `spec`'s consumer.
    pub(super) fn lock_timeout(&self, spec: &ConsumerSpec) -> u64 {
        self.lock_timeout_ms.unwrap_or(spec.consume_timeout_ms)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchStatus {
    Found,
    NoNewMsg,
    OffsetIllegal,
    Paused,
    RateLimited,
}

impl FetchStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Found => "FOUND",
            Self::NoNewMsg => "NO_NEW_MSG",
            Self::OffsetIllegal => "OFFSET_ILLEGAL",
            Self::Paused => "PAUSED",
            Self::RateLimited => "RATE_LIMITED",
        }
    }
}

/// One delivered message.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivered {
    pub msg_id: String,
    pub body: Vec<u8>,
    /// Store time, epoch ms.
    pub store_ms: u64,
}

/// What a fetch answers.
#[derive(Debug)]
pub struct FetchOutcome {
    pub status: FetchStatus,
    pub request_id: Option<String>,
    pub messages: Vec<Delivered>,
    pub retry_messages: Vec<Delivered>,
    /// The piggy-backed ack: Ok(what it did) or Err(why it failed: a refused requestId, or
    /// a store failure, each of its own kind).
    pub ack: Option<Result<AckOutcome, EngineError>>,
    /// The queue this pull used.
    pub queue: Option<QueueSnapshot>,
}

/// A queue as one pull saw it (debugging aid).
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSnapshot {
    pub topic: String,
    pub broker_name: String,
    pub queue_id: u32,
    pub min_offset: u64,
    pub max_offset: u64,
    pub committed: Option<u64>,
    pub lock_time: Option<u64>,
    pub client_ip: Option<String>,
}

/// What an ack did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckOutcome {
    /// The committed offset moved.
    pub committed: bool,
    pub message: String,
}

/// An ack applied, its commit possibly still being flushed.
#[must_use = "an ack is answered only once `durably` has resolved"]
pub(crate) struct PendingAck {
    outcome: AckOutcome,
    durable: mqproxy_store::PendingWrite,
}

impl PendingAck {
    fn done(outcome: AckOutcome) -> Self {
        Self {
            outcome,
            durable: Box::pin(std::future::ready(Ok(()))),
        }
    }

    /// The outcome, once the commit is durable.
    pub(crate) async fn durably(self) -> Result<AckOutcome, EngineError> {
        self.durable.await?;
        Ok(self.outcome)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnlockOutcome {
    pub unlocked: bool,
    pub message: String,
}

/// An operator's change of a consumer's settings; None leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct SettingsChange {
    pub client_id: Option<String>,
    pub paused: Option<bool>,
    pub rate_limit_enabled: Option<bool>,
    pub limit_rate: Option<u64>,
    /// Lock time of an unacknowledged batch (10 s .. 36 h).
    pub consume_timeout_ms: Option<u64>,
    /// Messages per pull (1 .. 128).
    pub max_pull_size: Option<u32>,
    pub retry_msg_id: Option<String>,
}

/// A consumer's effective settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerView {
    pub consumer: String,
    pub topic: String,
    pub mode: ConsumeMode,
    pub settings: ConsumerSettings,
    pub max_pull_size: u32,
    pub consume_timeout_ms: u64,
    /// Retry messages queued by operators and not yet acknowledged (waiting for a pull, or
    /// delivered and awaiting the ack): for a broadcast consumer, over the clientId asked for
    /// or, without one, over all its clients.
    pub retry_queued: u32,
}

/// A retry entry not delivered with a live batch (a queue lock or a POP segment).
fn retry_is_free(e: &RetryEntry, snapshot: &ContextSnapshot, now: u64, timeout_ms: u64) -> bool {
    let Some((q, l)) = e.in_flight else { return true };
    let queue_lock = snapshot
        .queues
        .get(q as usize)
        .and_then(|qs| qs.live_lock(now, timeout_ms))
        == Some(l);
    let segment = snapshot
        .pop
        .get(q as usize)
        .is_some_and(|p| p.segments.iter().any(|s| s.lock_time == l && s.is_live(now)));
    !(queue_lock || segment)
}

/// What queue choice found.
enum Choice<T> {
    /// Every queue is locked by other pulls (or the topic has none).
    AllLocked,
    /// The best queue has nothing to hand out: not locked.
    Idle(QueueSnapshot),
    /// What was chosen and locked (a queue), or found to be taken (a POP segment).
    Locked(T),
}

use super::limits::{self, MAX_PULL_BYTES};

/// A queue chosen and locked for one fetch.
struct Chosen {
    queue: u32,
    lock_time: u64,
    start: u64,
    /// The committed offset is outside the queue's range: reset to this offset on ack.
    reset_to: Option<u64>,
    retries: Vec<RetryEntry>,
    snapshot: QueueSnapshot,
}

fn to_delivered(m: StoredMessage) -> Delivered {
    Delivered {
        msg_id: m.client_msg_id.unwrap_or_else(|| super::ids::hex_id(&m.msg_id)),
        body: m.body,
        store_ms: m.store_ms,
    }
}

/// A clientId names state the proxy keeps (and Redis keys `<group>:<clientId>`, beside the
/// context's `:retry` keys), so it is bounded and may not end like one of those keys.
fn check_client_id(client_id: &str) -> Result<String, EngineError> {
    let chars = client_id.chars().count();
    if chars > limits::MAX_CLIENT_ID_CHARS {
        return Err(EngineError::invalid(format!(
            "clientId must be at most {} characters, got {chars}",
            limits::MAX_CLIENT_ID_CHARS
        )));
    }
    if client_id.chars().any(char::is_control) {
        return Err(EngineError::invalid("clientId must not contain control characters"));
    }
    if client_id.ends_with(":retry") || client_id.ends_with(":retry:seq") {
        return Err(EngineError::invalid("clientId must not end with :retry or :retry:seq"));
    }
    Ok(client_id.to_owned())
}

/// What one pull runs with, read once: the consumer's entry with an operator's overrides
/// applied, its consumption context and its settings.
pub(super) struct PullContext {
    pub spec: ConsumerSpec,
    pub key: ContextKey,
    pub settings: ConsumerSettings,
}

/// What a waiting consumer (a long poll, a stream) waits on (see [`Engine::pull_changes`]).
pub(super) struct PullChanges {
    visible: tokio::sync::watch::Receiver<u64>,
    released: tokio::sync::watch::Receiver<u64>,
}

impl PullChanges {
    /// Marks what happened so far as seen: only a later change wakes [`PullChanges::changed`].
    /// Called before pulling, so a change during the pull wakes the wait after it.
    pub(super) fn mark_seen(&mut self) {
        self.visible.borrow_and_update();
        self.released.borrow_and_update();
    }

    /// Waits for the next change; false once the signals are gone (the engine is shutting down).
    pub(super) async fn changed(&mut self) -> bool {
        tokio::select! {
            r = self.visible.changed() => r.is_ok(),
            r = self.released.changed() => r.is_ok(),
        }
    }
}

/// A batch handed out, as the engine knows it: the fields its requestId carries, and the
/// index of its queue in the topic's route. What issued it acks and unlocks it from this,
/// with no signature to check.
#[derive(Debug, Clone)]
pub(super) struct Issued {
    pub token: BatchToken,
    pub queue: u32,
}

impl Engine {
    /// Admits a broadcast client (a new clientId only while its consumer has room).
    async fn admit(&self, spec: &ConsumerSpec, key: &ContextKey) -> Result<(), EngineError> {
        if key.client_id.is_none() {
            return Ok(());
        }
        let limits = &self.inner.consuming.settings;
        if self
            .inner
            .consuming
            .state
            .admit_client(key, self.now_ms(), limits.max_broadcast_clients)
            .await?
        {
            return Ok(());
        }
        Err(EngineError::LimitReached(format!(
            "consumer:{} has {} broadcast clients, the most [consume] max_broadcast_clients allows; a new clientId is accepted once a client has had no pull for broadcast_client_idle_ms ({} ms)",
            spec.name, limits.max_broadcast_clients, limits.broadcast_client_idle_ms
        )))
    }

    /// Forgets, every tenth of `broadcast_client_idle_ms` (at most a minute apart), the
    /// broadcast clients idle longer than that; ends when the engine is dropped.
    pub fn spawn_idle_client_sweep(&self) -> tokio::task::JoinHandle<()> {
        let idle_ms = self.inner.consuming.settings.broadcast_client_idle_ms;
        self.spawn_idle_sweep(idle_ms, move |engine| async move {
            engine.forget_idle_clients(idle_ms).await;
        })
    }

    async fn forget_idle_clients(&self, idle_ms: u64) {
        let idle_before = self.now_ms().saturating_sub(idle_ms);
        let registry = self.snapshot();
        for spec in registry.consumers.values().filter(|c| c.mode == ConsumeMode::Broadcast) {
            match self
                .inner
                .consuming
                .state
                .forget_idle_clients(&spec.topic, &spec.name, idle_before)
                .await
            {
                Ok(0) => {}
                Ok(forgotten) => tracing::info!(
                    consumer = %spec.name,
                    forgotten,
                    idle_ms,
                    "forgot broadcast clients with no pull for broadcast_client_idle_ms"
                ),
                Err(e) => tracing::warn!(consumer = %spec.name, error = %e, "cannot forget idle broadcast clients"),
            }
        }
    }

    /// A consumer's entry in `registry`.
    pub(super) fn consumer_spec(&self, registry: &Registry, name: &str) -> Result<Arc<ConsumerSpec>, EngineError> {
        registry
            .consumers
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::UnknownConsumer(name.to_owned()))
    }

    /// A consumer's entry in the registry as it is now (operators' calls, a stream's rounds).
    pub(super) fn registered_consumer(&self, name: &str) -> Result<Arc<ConsumerSpec>, EngineError> {
        self.consumer_spec(&self.snapshot(), name)
    }

    /// Checks the request against its consumer's entry and names its consumption context: the
    /// consumer's topic, or the lite topic it names (opened on first use).
    pub(super) async fn resolve(&self, spec: &ConsumerSpec, target: &ConsumeTarget) -> Result<ContextKey, EngineError> {
        if target.topic != spec.topic {
            return Err(EngineError::invalid(format!(
                "consumer:{} subscribe:{} but fetch:{}",
                spec.name, spec.topic, target.topic
            )));
        }
        let client_id = target.client_id.as_deref().map(str::trim).filter(|c| !c.is_empty());
        let client_id = match (spec.mode, client_id) {
            (ConsumeMode::Broadcast, None) => {
                return Err(EngineError::invalid(format!("consumer:{} clientId is null", spec.name)));
            }
            (ConsumeMode::Clustering, Some(_)) => {
                return Err(EngineError::invalid(format!("consumer:{} no need clientId", spec.name)));
            }
            (_, c) => c.map(check_client_id).transpose()?,
        };
        let topic = match target.lite_topic.as_deref().map(str::trim).filter(|l| !l.is_empty()) {
            Some(lite) => {
                let parent = self
                    .snapshot()
                    .topics
                    .get(&spec.topic)
                    .cloned()
                    .ok_or_else(|| EngineError::invalid(format!("topic {} is not registered", spec.topic)))?;
                self.open_lite(&parent, lite, "liteTopic").await?
            }
            None => spec.topic.clone(),
        };
        Ok(ContextKey {
            topic,
            group: spec.name.clone(),
            client_id,
        })
    }

    /// When the earliest live lock or POP segment of this context expires (epoch ms), if any.
    pub(super) async fn next_lock_expiry(&self, key: &ContextKey, timeout_ms: u64) -> Result<Option<u64>, EngineError> {
        let snapshot = self.context_snapshot(key).await?;
        let now = self.now_ms();
        let locks = snapshot
            .queues
            .iter()
            .filter_map(|q| Some(q.lock_time? + q.lock_timeout(timeout_ms) + 1));
        let segments = snapshot
            .pop
            .iter()
            .flat_map(|p| p.segments.iter().map(|s| s.expires_ms() + 1));
        Ok(locks.chain(segments).filter(|&expiry| expiry > now).min())
    }

    /// The batches of this context still held, as (queue, lock time): queue locks (expired ones
    /// included) and POP segments in flight.
    pub(super) async fn held_batches(&self, key: &ContextKey) -> Result<HashSet<(u32, u64)>, EngineError> {
        let snapshot = self.context_snapshot(key).await?;
        let locks = snapshot
            .queues
            .iter()
            .zip(0u32..)
            .filter_map(|(q, i)| Some((i, q.lock_time?)));
        let segments = snapshot
            .pop
            .iter()
            .zip(0u32..)
            .flat_map(|(p, i)| p.segments.iter().map(move |s| (i, s.lock_time)));
        Ok(locks.chain(segments).collect())
    }

    /// The context's state over every queue of its topic.
    async fn context_snapshot(
        &self,
        key: &ContextKey,
    ) -> Result<mqproxy_store::consumer_state::ContextSnapshot, EngineError> {
        Ok(self
            .inner
            .consuming
            .state
            .snapshot(key, self.queue_count(&key.topic))
            .await?)
    }

    pub(super) fn queue_count(&self, topic: &str) -> u32 {
        u32::try_from(self.inner.messages.queues(topic).len()).unwrap_or(u32::MAX)
    }

    fn default_settings(&self) -> ConsumerSettings {
        ConsumerSettings {
            paused: false,
            rate_limit_enabled: true,
            limit_rate: self.inner.consuming.settings.default_rate_limit,
            consume_timeout_ms: None,
            max_pull_size: None,
        }
    }

    /// The consumer's registry entry with an operator's overrides applied.
    fn effective(spec: &ConsumerSpec, settings: &ConsumerSettings) -> ConsumerSpec {
        ConsumerSpec {
            consume_timeout_ms: settings.consume_timeout_ms.unwrap_or(spec.consume_timeout_ms),
            max_pull_size: settings.max_pull_size.unwrap_or(spec.max_pull_size),
            ..spec.clone()
        }
    }

    /// What a pull of `spec`'s consumer in context `key` runs with (its settings read once).
    pub(super) async fn pull_context(&self, spec: &ConsumerSpec, key: ContextKey) -> Result<PullContext, EngineError> {
        let settings = self.settings_of(&spec.name).await?;
        Ok(PullContext {
            spec: Self::effective(spec, &settings),
            key,
            settings,
        })
    }

    async fn settings_of(&self, consumer: &str) -> Result<ConsumerSettings, EngineError> {
        Ok(self
            .inner
            .consuming
            .state
            .settings(consumer)
            .await?
            .unwrap_or_else(|| self.default_settings()))
    }

    /// The batch a requestId names and the index of its queue in the topic's route.
    fn decode_token(&self, request_id: &str, key: &ContextKey) -> Result<(BatchToken, u32), EngineError> {
        let token = request_id::decode(request_id, &self.inner.consuming.request_id_keys, key)
            .map_err(|e| EngineError::invalid(e.to_string()))?;
        let index = self
            .inner
            .messages
            .queues(&key.topic)
            .iter()
            .position(|q| q.broker_name == token.broker_name && q.queue_id == token.queue_id)
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| EngineError::invalid(format!("ack illegal {}", token.info())))?;
        Ok((token, index))
    }

    /// Pulls one batch from one queue (acknowledging `request_id` first), and counts it.
    pub(super) async fn fetch(
        &self,
        spec: &ConsumerSpec,
        target: &ConsumeTarget,
        req: FetchRequest,
    ) -> Result<FetchOutcome, EngineError> {
        let result = async {
            let key = self.resolve(spec, target).await?;
            let options = PullOptions {
                pop: req.pop,
                ..PullOptions::checked(
                    req.client_ip,
                    req.max_pull_size,
                    req.consume_timeout_s,
                    req.pull_timeout_s,
                )?
            };
            let wait_ms = req.wait_ms.unwrap_or(0);
            limits::check(limits::WAIT_MS, "waitMs", wait_ms)?;
            // Seen before the first pull, so what happens during it ends a wait at once.
            let mut changes = (wait_ms > 0).then(|| self.pull_changes(&key.topic));
            // Settings once per pull: they gate the pull and set the lock time the ack checks.
            let ctx = self.pull_context(spec, key).await?;
            // The ack's commit is flushed while the next batch is read and locked: the pull sees
            // the ack at once, and nothing is answered before the commit is durable.
            let (ack, ack_durable) = match req.request_id.as_deref().map(str::trim).filter(|r| !r.is_empty()) {
                Some(rid) => match self.start_ack(&ctx.spec, &ctx.key, rid).await {
                    Ok(PendingAck { outcome, durable }) => (Some(Ok(outcome)), Some(durable)),
                    Err(e) => (Some(Err(e)), None),
                },
                None => (None, None),
            };
            let pulled = self.pull(&ctx, ack, &options).await;
            let flushed = match ack_durable {
                Some(durable) => durable.await,
                None => Ok(()),
            };
            let (mut outcome, _) = pulled?;
            if let Err(e) = flushed {
                outcome.ack = Some(Err(e.into()));
            }
            match changes.as_mut() {
                Some(changes) if outcome.status == FetchStatus::NoNewMsg => {
                    self.long_poll(spec, ctx, options, outcome, changes, wait_ms).await
                }
                _ => Ok(outcome),
            }
        }
        .await;
        self.count_pull(spec, result.as_ref());
        result
    }

    /// The signals that can make a pull that found nothing find something: messages became
    /// visible in `topic`, or a lock was released or settings changed.
    pub(super) fn pull_changes(&self, topic: &str) -> PullChanges {
        PullChanges {
            visible: self.inner.messages.visible_changes(topic),
            released: self.inner.consuming.subscribe(topic),
        }
    }

    /// Long polling: after a first pull found nothing (`first`), pulls again whenever something
    /// may have changed (a signal, or a lock of this context expiring) until a pull finds
    /// something or `wait_ms` passes. It holds no lock while it waits, and costs nothing while
    /// nothing happens. The answer carries the first pull's ack outcome.
    async fn long_poll(
        &self,
        spec: &ConsumerSpec,
        mut ctx: PullContext,
        mut options: PullOptions,
        first: FetchOutcome,
        changes: &mut PullChanges,
        wait_ms: u64,
    ) -> Result<FetchOutcome, EngineError> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(wait_ms);
        let ack = first.ack;
        let mut outcome = FetchOutcome { ack: None, ..first };
        options.charge_rate_limit = false;
        loop {
            let expiry = self.next_lock_expiry(&ctx.key, ctx.spec.consume_timeout_ms).await?;
            let wake_at = expiry.map_or(deadline, |at| {
                let in_ms = at.saturating_sub(self.now_ms());
                deadline.min(tokio::time::Instant::now() + std::time::Duration::from_millis(in_ms))
            });
            tokio::select! {
                open = changes.changed() => if !open { break },
                () = tokio::time::sleep_until(wake_at) => {}
            }
            changes.mark_seen();
            // An operator may have paused the consumer or changed its settings meanwhile.
            ctx = self.pull_context(spec, ctx.key).await?;
            let (again, _) = self.pull(&ctx, None, &options).await?;
            outcome = again;
            if outcome.status != FetchStatus::NoNewMsg || tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        outcome.ack = ack;
        Ok(outcome)
    }

    /// Counts a pull by its status, the messages it delivered and the ack that rode on it.
    pub(super) fn count_pull(&self, spec: &ConsumerSpec, result: Result<&FetchOutcome, &EngineError>) {
        let metrics = &self.inner.metrics;
        let labels = |status: &str| super::metrics::PullLabels {
            topic: spec.topic.clone(),
            consumer: spec.name.clone(),
            status: status.to_owned(),
        };
        match result {
            Ok(outcome) => {
                metrics.pulls.get_or_create(&labels(outcome.status.as_str())).inc();
                let n = outcome.messages.len() + outcome.retry_messages.len();
                if n > 0 {
                    metrics
                        .delivered
                        .get_or_create(&super::metrics::ConsumerLabels {
                            topic: spec.topic.clone(),
                            consumer: spec.name.clone(),
                        })
                        .inc_by(n as u64);
                }
                if let Some(ack) = &outcome.ack {
                    self.count_ack(spec, ack.as_ref().map(|a| a.committed).map_err(|_| ()));
                }
            }
            Err(e) => {
                metrics.pulls.get_or_create(&labels(e.kind().status_label())).inc();
            }
        }
    }

    pub(super) fn count_ack(&self, spec: &ConsumerSpec, committed: Result<bool, ()>) {
        let outcome = match committed {
            Ok(true) => "committed",
            Ok(false) => "ignored",
            Err(()) => "refused",
        };
        self.inner
            .metrics
            .acks
            .get_or_create(&super::metrics::AckLabels {
                topic: spec.topic.clone(),
                consumer: spec.name.clone(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// One pull in `ctx`: the batch and, when one was handed out, what its requestId names.
    /// `ack` is the outcome of the ack that rode on the request, answered with it.
    pub(super) async fn pull(
        &self,
        ctx: &PullContext,
        ack: Option<Result<AckOutcome, EngineError>>,
        options: &PullOptions,
    ) -> Result<(FetchOutcome, Option<Issued>), EngineError> {
        let (spec, key, settings) = (&ctx.spec, &ctx.key, &ctx.settings);
        let mut outcome = FetchOutcome {
            status: FetchStatus::NoNewMsg,
            request_id: None,
            messages: Vec::new(),
            retry_messages: Vec::new(),
            ack,
            queue: None,
        };
        if settings.paused {
            outcome.status = FetchStatus::Paused;
            return Ok((outcome, None));
        }
        if settings.rate_limit_enabled
            && options.charge_rate_limit
            && !self
                .inner
                .consuming
                .rate_limiters
                .try_acquire(&spec.name, settings.limit_rate)
        {
            outcome.status = FetchStatus::RateLimited;
            return Ok((outcome, None));
        }

        self.admit(spec, key).await?;
        if options.pop {
            return self.pull_pop(ctx, outcome, options).await;
        }
        // Within limits::PULL_SIZE: PullOptions::checked refused anything else.
        let max_pull = options.max_pull_size.unwrap_or(spec.max_pull_size);
        // A queue whose broker fails the read is left for this pull, once, when another
        // broker's queue can be tried: one dead broker does not fail the pulls of the others.
        let mut failed_queue = None;
        let (chosen, (read, retry_messages, missing_retries)) = loop {
            let chosen = match self.choose_and_lock(spec, key, options, max_pull, failed_queue).await? {
                Choice::Locked(chosen) => chosen,
                Choice::Idle(snapshot) => {
                    outcome.queue = Some(snapshot);
                    return Ok((outcome, None));
                }
                Choice::AllLocked => return Ok((outcome, None)),
            };
            if chosen.reset_to.is_some() {
                break (chosen, Default::default());
            }
            let read = tokio::time::timeout(options.read_timeout, self.read_batch(&key.topic, &chosen, max_pull)).await;
            let read = read.unwrap_or_else(|_| {
                Err(EngineError::Unavailable(format!(
                    "the pull's read of the message store took longer than pullTimeout ({} s)",
                    options.read_timeout.as_secs()
                )))
            });
            match read {
                Ok(v) => break (chosen, v),
                Err(e) => {
                    self.release(key, &chosen, &[]).await?;
                    let retry_elsewhere = failed_queue.is_none()
                        && matches!(e, EngineError::Store(mqproxy_store::StoreError::Backend(_)))
                        && self.other_broker_available(&key.topic, chosen.queue);
                    if !retry_elsewhere {
                        return Err(e);
                    }
                    tracing::warn!(consumer = %spec.name, queue = chosen.queue, error = %e, "pull failed, trying another broker's queue");
                    failed_queue = Some(chosen.queue);
                }
            }
        };
        outcome.queue = Some(chosen.snapshot.clone());
        let keys = &self.inner.consuming.request_id_keys;
        // The batch's requestId, and the batch as its issuer keeps it.
        let issue = |outcome: &mut FetchOutcome, start: u64, next: u64, force_ack: bool| {
            let token = BatchToken {
                broker_name: chosen.snapshot.broker_name.clone(),
                queue_id: chosen.snapshot.queue_id,
                offset: start,
                next_offset: next,
                lock_time: chosen.lock_time,
                force_ack,
                pop: false,
            };
            outcome.request_id = Some(request_id::encode(&token, keys, key));
            Issued {
                token,
                queue: chosen.queue,
            }
        };
        if let Some(reset_to) = chosen.reset_to {
            // Java proxy's forced reset: keep the lock, the ack moves the offset to reset_to.
            tracing::warn!(consumer = %spec.name, queue = chosen.queue, from = chosen.start, to = reset_to, "offset illegal, resetting");
            outcome.status = FetchStatus::OffsetIllegal;
            let issued = issue(&mut outcome, chosen.start, reset_to, true);
            return Ok((outcome, Some(issued)));
        }

        if let (Some(skip_to), true) = (read.skip_to, read.messages.is_empty()) {
            // The backend has nothing at this offset (moved or removed): the Java proxy's forced
            // reset, as when the committed offset is out of the queue's range.
            tracing::warn!(consumer = %spec.name, queue = chosen.queue, from = chosen.start, to = skip_to, "offset illegal at the backend, resetting");
            if !missing_retries.is_empty() {
                self.inner.consuming.state.drop_retries(key, &missing_retries).await?;
            }
            outcome.status = FetchStatus::OffsetIllegal;
            let issued = issue(&mut outcome, chosen.start, skip_to, true);
            return Ok((outcome, Some(issued)));
        }
        let messages = read.messages;
        if messages.is_empty() && retry_messages.is_empty() {
            self.release(key, &chosen, &missing_retries).await?;
            if let Some(q) = outcome.queue.as_mut() {
                q.lock_time = None;
            }
            return Ok((outcome, None));
        }
        if !missing_retries.is_empty() {
            self.inner.consuming.state.drop_retries(key, &missing_retries).await?;
        }
        let next = messages.last().map_or(chosen.start, |m| m.offset + 1);
        outcome.status = FetchStatus::Found;
        let issued = issue(&mut outcome, chosen.start, next, false);
        outcome.messages = messages.into_iter().map(to_delivered).collect();
        outcome.retry_messages = retry_messages;
        Ok((outcome, Some(issued)))
    }

    /// Whether a queue of the topic on another broker than `queue`'s is not avoided.
    fn other_broker_available(&self, topic: &str, queue: u32) -> bool {
        let refs = self.inner.messages.queues(topic);
        let Some(failed) = refs.get(queue as usize) else {
            return false;
        };
        refs.iter().enumerate().any(|(i, q)| {
            q.broker_name != failed.broker_name
                && self
                    .inner
                    .messages
                    .queue_available(topic, u32::try_from(i).unwrap_or(u32::MAX))
        })
    }

    /// Picks the queue with the biggest backlog (then the least recently pulled) among those
    /// not locked for this context, and locks it; if another pull takes it first, the next.
    /// Queues of an avoided broker, and `failed` (a queue whose read just failed), come last.
    async fn choose_and_lock(
        &self,
        spec: &ConsumerSpec,
        key: &ContextKey,
        options: &PullOptions,
        max_pull: u32,
        failed: Option<u32>,
    ) -> Result<Choice<Chosen>, EngineError> {
        let client_ip = &options.client_ip;
        let queues = self.queue_count(&key.topic);
        let now = self.now_ms();
        let timeout = spec.consume_timeout_ms;
        let snapshot = self.inner.consuming.state.snapshot(key, queues).await?;
        match snapshot.pop_in_flight() {
            0 => {}
            segments => return Err(pop::segments_in_flight(&spec.name, segments)),
        }
        let refs = self.inner.messages.queues(&key.topic);
        let ranges: Vec<_> = (0..queues)
            .map(|q| self.inner.messages.queue_range(&key.topic, q))
            .collect();
        let exact_ranges = self.inner.messages.ranges_are_exact();
        let backlog = |q: u32| {
            let r = ranges[q as usize];
            r.max
                .saturating_sub(snapshot.queues[q as usize].committed.unwrap_or(r.min).max(r.min))
        };
        let avoided = |q: u32| failed == Some(q) || !self.inner.messages.queue_available(&key.topic, q);
        let mut order: Vec<u32> = (0..queues).collect();
        order.sort_by(|&a, &b| {
            avoided(a).cmp(&avoided(b)).then(backlog(b).cmp(&backlog(a))).then(
                snapshot.queues[a as usize]
                    .last_pull_ms
                    .cmp(&snapshot.queues[b as usize].last_pull_ms),
            )
        });
        let any_free_retry = snapshot
            .retries
            .iter()
            .any(|e| retry_is_free(e, &snapshot, now, timeout));
        for queue in order {
            let qs = &snapshot.queues[queue as usize];
            if qs.live_lock(now, timeout).is_some() {
                continue;
            }
            let range = ranges[queue as usize];
            // Where to start and whether the offset is out of range; computed again from the
            // state the lock was granted on, since the committed offset may have moved between
            // this look and the lock.
            let offsets = |committed: Option<u64>| {
                let reset_to = committed.and_then(|c| {
                    if c < range.min {
                        Some(range.min)
                    } else if c > range.max && exact_ranges {
                        // Past the end of a queue this process alone writes: really illegal.
                        // On a cluster, the cached max may lag behind an offset another proxy
                        // committed: nothing new yet (resetting would deliver again).
                        Some(range.max)
                    } else {
                        None
                    }
                });
                (committed.unwrap_or(range.min), reset_to)
            };
            let (start, reset_to) = offsets(qs.committed);
            let queue_ref = &refs[queue as usize];
            let queue_snapshot = |state: &QueueState| QueueSnapshot {
                topic: key.topic.clone(),
                broker_name: queue_ref.broker_name.clone(),
                queue_id: queue_ref.queue_id,
                min_offset: range.min,
                max_offset: range.max,
                committed: state.committed,
                lock_time: state.lock_time,
                client_ip: state.client_ip.clone(),
            };
            if reset_to.is_none() && start >= range.max && !any_free_retry {
                // Nothing to hand out: no lock and no store write, so idle polling costs no I/O.
                self.inner
                    .consuming
                    .state
                    .touch(key, queue, now, client_ip.clone())
                    .await?;
                let mut seen = qs.clone();
                seen.lock_time = None;
                if client_ip.is_some() {
                    seen.client_ip.clone_from(client_ip);
                }
                return Ok(Choice::Idle(queue_snapshot(&seen)));
            }
            let claim_retries = if reset_to.is_none() {
                snapshot
                    .retries
                    .iter()
                    .filter(|e| retry_is_free(e, &snapshot, now, timeout))
                    .take(max_pull as usize)
                    .map(|e| (e.seq, e.in_flight))
                    .collect()
            } else {
                Vec::new()
            };
            // Strictly later than the last pull, so an ack of an older lock never matches.
            let lock_time = now.max(qs.last_pull_ms + 1);
            let request = LockRequest {
                queue,
                seen: qs.lock_time,
                lock_time,
                client_ip: client_ip.clone(),
                timeout_ms: options.lock_timeout_ms,
                claim_retries,
            };
            if let Some(grant) = self.inner.consuming.state.try_lock(key, request).await? {
                let (start, reset_to) = offsets(grant.state.committed);
                return Ok(Choice::Locked(Chosen {
                    queue,
                    lock_time,
                    start,
                    reset_to,
                    retries: grant.retries,
                    snapshot: queue_snapshot(&grant.state),
                }));
            }
            // Another pull took this queue between our look and our lock: try the next one.
        }
        Ok(Choice::AllLocked)
    }

    /// The batch's messages and retry messages; retry entries whose message is gone come back
    /// separately so they can be dropped.
    async fn read_batch(
        &self,
        topic: &str,
        chosen: &Chosen,
        max_pull: u32,
    ) -> Result<(ReadOutcome, Vec<Delivered>, Vec<u64>), EngineError> {
        let read = self
            .inner
            .messages
            .read(topic, chosen.queue, chosen.start, max_pull as usize, MAX_PULL_BYTES)
            .await?;
        let (retry_messages, missing) = self.read_retries(&chosen.retries).await?;
        Ok((read, retry_messages, missing))
    }

    /// Unlocks a queue chosen for a pull that delivers nothing.
    async fn release(&self, key: &ContextKey, chosen: &Chosen, missing_retries: &[u64]) -> Result<(), EngineError> {
        if !missing_retries.is_empty() {
            self.inner.consuming.state.drop_retries(key, missing_retries).await?;
        }
        self.inner
            .consuming
            .state
            .finish(key, chosen.queue, chosen.lock_time, None, RetryFate::Free)
            .await?
            .durably()
            .await?;
        self.inner.consuming.notify(&key.topic);
        Ok(())
    }

    /// Acknowledges a batch by its requestId.
    ///
    /// # Errors
    /// Unknown consumer, bad target, a malformed or forged requestId, or a store failure.
    pub(super) async fn ack(
        &self,
        spec: &ConsumerSpec,
        target: &ConsumeTarget,
        request_id: &str,
    ) -> Result<AckOutcome, EngineError> {
        let key = self.resolve(spec, target).await?;
        let effective = Self::effective(spec, &self.settings_of(&spec.name).await?);
        let result = self.ack_in_context(&effective, &key, request_id.trim()).await;
        self.count_ack(spec, result.as_ref().map(|a| a.committed).map_err(|_| ()));
        result
    }

    /// Acknowledges the batch a requestId names, once its signature is checked.
    pub(super) async fn ack_in_context(
        &self,
        spec: &ConsumerSpec,
        key: &ContextKey,
        request_id: &str,
    ) -> Result<AckOutcome, EngineError> {
        self.start_ack(spec, key, request_id).await?.durably().await
    }

    /// [`Self::ack_in_context`] up to its commit being flushed: every later step sees the ack,
    /// and the caller awaits [`PendingAck::durably`] before it answers.
    pub(super) async fn start_ack(
        &self,
        spec: &ConsumerSpec,
        key: &ContextKey,
        request_id: &str,
    ) -> Result<PendingAck, EngineError> {
        let (token, queue) = self.decode_token(request_id, key)?;
        self.start_ack_issued(spec, key, &Issued { token, queue }).await
    }

    /// The Java proxy's ack algorithm, with "the lock that issued the batch" checked exactly.
    pub(super) async fn ack_issued(
        &self,
        spec: &ConsumerSpec,
        key: &ContextKey,
        issued: &Issued,
    ) -> Result<AckOutcome, EngineError> {
        self.start_ack_issued(spec, key, issued).await?.durably().await
    }

    pub(super) async fn start_ack_issued(
        &self,
        spec: &ConsumerSpec,
        key: &ContextKey,
        issued: &Issued,
    ) -> Result<PendingAck, EngineError> {
        if issued.token.pop {
            return Ok(PendingAck::done(self.ack_segment(key, issued).await?));
        }
        let queues = self.queue_count(&key.topic);
        let (token, queue) = (&issued.token, issued.queue);
        let info = token.info();
        let snapshot = self.inner.consuming.state.snapshot(key, queues).await?;
        let qs = &snapshot.queues[queue as usize];
        let pending = match qs.lock_time {
            None => PendingAck::done(AckOutcome {
                committed: false,
                message: format!("lock not exist {info}"),
            }),
            Some(t) if t != token.lock_time => PendingAck::done(AckOutcome {
                committed: false,
                message: format!("ack ignored: the queue was locked again since (lockTime {t}) {info}"),
            }),
            Some(t) => {
                let expired = self.now_ms().saturating_sub(t) > qs.lock_timeout(spec.consume_timeout_ms);
                let prefix = if expired { "lock expired, " } else { "" };
                let (commit, what) = match qs.committed {
                    None => (true, "ok"),
                    Some(_) if token.force_ack => (true, "ok"),
                    Some(c) if token.offset == c && token.next_offset > c => (true, "ok"),
                    Some(c) if token.offset == c || token.next_offset == c => (false, "offset has committed"),
                    Some(_) => (false, "offset changed since the batch was handed out"),
                };
                // The batch reached the consumer and it acknowledged it: its retry messages are
                // done whether or not the offset moved.
                let commit_to = commit.then_some(token.next_offset);
                let finished = self
                    .inner
                    .consuming
                    .state
                    .finish(key, queue, t, commit_to, RetryFate::Done)
                    .await?;
                if finished.matched {
                    PendingAck {
                        outcome: AckOutcome {
                            committed: commit,
                            message: format!("{prefix}{what} {info}"),
                        },
                        durable: finished.durable,
                    }
                } else {
                    PendingAck::done(AckOutcome {
                        committed: false,
                        message: format!("ack ignored: the lock changed meanwhile {info}"),
                    })
                }
            }
        };
        self.inner.consuming.notify(&key.topic);
        Ok(pending)
    }

    /// Unlocks the queue of an unacknowledged batch so it is delivered again at once.
    ///
    /// # Errors
    /// Unknown consumer, bad target, a malformed or forged requestId, or a store failure.
    pub(super) async fn unlock(
        &self,
        spec: &ConsumerSpec,
        target: &ConsumeTarget,
        request_id: &str,
    ) -> Result<UnlockOutcome, EngineError> {
        let key = self.resolve(spec, target).await?;
        self.unlock_in_context(&key, request_id).await
    }

    /// Unlocks the batch a requestId names, once its signature is checked.
    pub(super) async fn unlock_in_context(
        &self,
        key: &ContextKey,
        request_id: &str,
    ) -> Result<UnlockOutcome, EngineError> {
        let (token, queue) = self.decode_token(request_id.trim(), key)?;
        self.unlock_issued(key, &Issued { token, queue }).await
    }

    /// Gives back the queue of a batch handed out and not acknowledged.
    pub(super) async fn unlock_issued(&self, key: &ContextKey, issued: &Issued) -> Result<UnlockOutcome, EngineError> {
        if issued.token.pop {
            return self.unlock_segment(key, issued).await;
        }
        let token = &issued.token;
        let unlocked = self
            .inner
            .consuming
            .state
            .finish(key, issued.queue, token.lock_time, None, RetryFate::Free)
            .await?
            .durably()
            .await?;
        if unlocked {
            self.inner.consuming.notify(&key.topic);
        }
        Ok(UnlockOutcome {
            unlocked,
            message: format!("{} unlock:{unlocked}", token.info()),
        })
    }

    /// Reads or changes a consumer's settings; may queue a retry message for it.
    ///
    /// # Errors
    /// Unknown consumer, unknown or malformed retry msgId, or a store failure.
    pub async fn configure_consumer(
        &self,
        consumer: &str,
        change: SettingsChange,
    ) -> Result<ConsumerView, EngineError> {
        let spec = self.registered_consumer(consumer)?;
        // A clientId given for a clustering consumer is ignored here (the group is meant).
        let client_id = change
            .client_id
            .as_deref()
            .filter(|_| spec.mode == ConsumeMode::Broadcast);
        let contexts = self.operator_contexts(&spec, client_id).await?;
        let retry_queued = match change.retry_msg_id.as_deref() {
            Some(retry) => self.queue_retry(&spec, retry, &contexts).await?,
            None => self.unacknowledged_retries(&spec, &contexts).await?,
        };
        let mut settings = self.settings_of(consumer).await?;
        if let Some(t) = change.consume_timeout_ms {
            limits::check(limits::CONSUME_TIMEOUT_MS, "consumeTimeoutMs", t)?;
        }
        if let Some(m) = change.max_pull_size {
            limits::check(limits::PULL_SIZE, "maxPullSize", u64::from(m))?;
        }
        if change.paused.is_some()
            || change.rate_limit_enabled.is_some()
            || change.limit_rate.is_some()
            || change.consume_timeout_ms.is_some()
            || change.max_pull_size.is_some()
        {
            if let Some(t) = change.consume_timeout_ms {
                settings.consume_timeout_ms = Some(t);
            }
            if let Some(m) = change.max_pull_size {
                settings.max_pull_size = Some(m);
            }
            if let Some(p) = change.paused {
                settings.paused = p;
            }
            if let Some(e) = change.rate_limit_enabled {
                settings.rate_limit_enabled = e;
            }
            if let Some(r) = change.limit_rate {
                settings.limit_rate = r;
                self.inner.consuming.rate_limiters.reset(consumer);
            }
            self.inner
                .consuming
                .state
                .put_settings(consumer, settings.clone())
                .await?;
        }
        self.inner.consuming.notify(&spec.topic);
        let effective = Self::effective(&spec, &settings);
        Ok(ConsumerView {
            consumer: spec.name.clone(),
            topic: spec.topic.clone(),
            mode: spec.mode,
            settings,
            max_pull_size: effective.max_pull_size,
            consume_timeout_ms: effective.consume_timeout_ms,
            retry_queued,
        })
    }

    /// Queues a stored message as a retry message in each context, once: where the same msgId
    /// already waits undelivered it is not queued again (a repeated click would otherwise put
    /// it twice into one batch). Returns the retry messages of these contexts not yet
    /// acknowledged, this one included (read in the same pass).
    async fn queue_retry(
        &self,
        spec: &ConsumerSpec,
        msg_id: &str,
        contexts: &[ContextKey],
    ) -> Result<u32, EngineError> {
        let msg_id = msg_id.trim();
        let (location, id) = self.locate_message("retryMsgId", msg_id).await?;
        if location.topic != spec.topic {
            return Err(EngineError::invalid(format!(
                "message {msg_id} is not in topic {}",
                spec.topic
            )));
        }
        let queues = self.queue_count(&spec.topic);
        let mut count = 0usize;
        for key in contexts {
            let waiting = self.inner.consuming.state.snapshot(key, queues).await?.retries;
            count += waiting.len();
            if !waiting.iter().any(|r| r.msg_id == id && r.in_flight.is_none()) {
                self.inner.consuming.state.add_retry(key, id, location.clone()).await?;
                count += 1;
            }
        }
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }

    /// The retry messages of these contexts not yet acknowledged.
    async fn unacknowledged_retries(&self, spec: &ConsumerSpec, contexts: &[ContextKey]) -> Result<u32, EngineError> {
        let queues = self.queue_count(&spec.topic);
        let mut count = 0usize;
        for key in contexts {
            count += self.inner.consuming.state.snapshot(key, queues).await?.retries.len();
        }
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }
}
