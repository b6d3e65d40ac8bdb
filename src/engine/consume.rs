//! Consuming: queue choice and locks, fetch, ack, unlock, retry messages, pause and rate limit.
//!
//! State per consumer context (a group, or group + clientId in broadcast) sits in memory
//! behind one mutex per context and is written through to the [`ConsumerStore`] while the
//! mutex is held, so the store sees changes in the order they happened. Commits (acks) are
//! awaited before answering; lock-only changes are written behind (losing one in a crash only
//! makes a batch come back sooner, which at-least-once allows).

use super::rate_limit::TokenBucket;
use super::request_id::{self, BatchToken};
use super::{ConsumeMode, ConsumerSpec, Engine, EngineError, now_ms};
use crate::store::{
    ConsumerOp, ConsumerSettings, ConsumerSnapshot, ContextKey, MessageLocation, QueueState, RetryEntry, StoredMessage,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

/// Who consumes what, as a request names it.
#[derive(Debug, Clone)]
pub struct ConsumeTarget {
    pub topic: String,
    pub consumer: String,
    /// Broadcast consumers only.
    pub client_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct FetchRequest {
    pub target: ConsumeTarget,
    /// The previous batch's requestId: acknowledged before pulling.
    pub request_id: Option<String>,
    pub client_ip: Option<String>,
    /// Fewer messages per batch than the consumer's `max_pull_size` (at most 128).
    pub max_pull_size: Option<u32>,
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
#[derive(Debug, Clone)]
pub struct FetchOutcome {
    pub status: FetchStatus,
    pub request_id: Option<String>,
    pub messages: Vec<Delivered>,
    pub retry_messages: Vec<Delivered>,
    /// The piggy-backed ack: Ok(what it did) or Err(why the requestId was refused).
    pub ack: Option<Result<AckOutcome, String>>,
    /// The queue this pull used.
    pub queue: Option<QueueSnapshot>,
}

/// A queue as one pull saw it (debugging aid).
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSnapshot {
    pub topic: String,
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
    pub retry_queued: u32,
}

#[derive(Debug, Default)]
struct ContextState {
    queues: Vec<QueueState>,
    retries: BTreeMap<u64, RetryEntry>,
    next_retry_seq: u64,
}

impl ContextState {
    fn ensure_queues(&mut self, n: u32) {
        if self.queues.len() < n as usize {
            self.queues.resize_with(n as usize, QueueState::default);
        }
    }

    /// The lock of `queue` if it is held and not expired.
    fn live_lock(&self, queue: u32, now: u64, timeout_ms: u64) -> Option<u64> {
        let lock = self.queues.get(queue as usize)?.lock_time?;
        (now.saturating_sub(lock) <= timeout_ms).then_some(lock)
    }
}

/// All consumer contexts, plus settings and rate limiters per consumer.
pub(super) struct ConsumerState {
    contexts: Mutex<HashMap<ContextKey, Arc<Mutex<ContextState>>>>,
    settings: Mutex<HashMap<String, ConsumerSettings>>,
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a state mutex leaves consistent data (every change is a plain
    // assignment), so a poisoned mutex is taken over rather than propagated.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ConsumerState {
    pub(super) fn from_snapshot(snapshot: ConsumerSnapshot) -> Self {
        let mut contexts: HashMap<ContextKey, ContextState> = HashMap::new();
        for (key, queue, state) in snapshot.queues {
            if queue >= MAX_QUEUES {
                tracing::warn!(?key, queue, "ignoring saved state of a queue id beyond any topic");
                continue;
            }
            let ctx = contexts.entry(key).or_default();
            ctx.ensure_queues(queue + 1);
            ctx.queues[queue as usize] = state;
        }
        for (key, entry) in snapshot.retries {
            let ctx = contexts.entry(key).or_default();
            ctx.next_retry_seq = ctx.next_retry_seq.max(entry.seq + 1);
            ctx.retries.insert(entry.seq, entry);
        }
        Self {
            contexts: Mutex::new(
                contexts
                    .into_iter()
                    .map(|(k, v)| (k, Arc::new(Mutex::new(v))))
                    .collect(),
            ),
            settings: Mutex::new(snapshot.settings.into_iter().collect()),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn context(&self, key: &ContextKey) -> Arc<Mutex<ContextState>> {
        lock(&self.contexts).entry(key.clone()).or_default().clone()
    }
}

/// What queue choice found.
enum Choice {
    /// Every queue is locked by other pulls (or the topic has none).
    AllLocked,
    /// The best queue has nothing to hand out: not locked.
    Idle(QueueSnapshot),
    Locked(Chosen),
}

/// Bodies per batch: a pull stops before passing it (but always returns one message), so an
/// answer stays near the 4 MiB a gRPC client accepts by default, as RocketMQ caps a pull by
/// bytes too.
const MAX_BATCH_BYTES: usize = super::MAX_MESSAGE_BYTES;

/// Queue ids beyond this come from no config (topics have at most 1024 queues).
const MAX_QUEUES: u32 = 1024;

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
        msg_id: super::ids::hex_id(&m.msg_id),
        body: m.body,
        store_ms: m.store_ms,
    }
}

impl Engine {
    fn consumer_spec(&self, name: &str) -> Result<&ConsumerSpec, EngineError> {
        self.inner
            .consumers
            .get(name)
            .ok_or_else(|| EngineError::UnknownConsumer(name.to_owned()))
    }

    /// Checks the request against the registry and names its consumption context.
    pub(super) fn resolve(&self, target: &ConsumeTarget) -> Result<(&ConsumerSpec, ContextKey), EngineError> {
        let spec = self.consumer_spec(&target.consumer)?;
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
            (_, c) => c.map(str::to_owned),
        };
        Ok((
            spec,
            ContextKey {
                topic: spec.topic.clone(),
                group: spec.name.clone(),
                client_id,
            },
        ))
    }

    /// When the earliest live lock of this context expires (epoch ms), if any.
    pub(super) fn next_lock_expiry(&self, key: &ContextKey, timeout_ms: u64) -> Option<u64> {
        let ctx = self.inner.state.context(key);
        let st = lock(&ctx);
        let now = now_ms();
        st.queues
            .iter()
            .filter_map(|q| q.lock_time)
            .map(|l| l + timeout_ms + 1)
            .filter(|&expiry| expiry > now)
            .min()
    }

    fn queue_count(&self, topic: &str) -> u32 {
        self.inner.topics.get(topic).map_or(0, |t| t.queues)
    }

    fn settings_of(&self, consumer: &str) -> ConsumerSettings {
        lock(&self.inner.state.settings)
            .get(consumer)
            .cloned()
            .unwrap_or(ConsumerSettings {
                paused: false,
                rate_limit_enabled: true,
                limit_rate: self.inner.config.default_rate_limit,
            })
    }

    fn decode_token(&self, request_id: &str, key: &ContextKey, queues: u32) -> Result<BatchToken, EngineError> {
        let token = request_id::decode(request_id, &self.inner.messages.identity().secret, key)
            .map_err(|e| EngineError::invalid(e.to_string()))?;
        if token.broker_name != self.inner.config.broker_name || token.queue_id >= queues {
            return Err(EngineError::invalid(format!("ack illegal {}", token.info())));
        }
        Ok(token)
    }

    /// Pulls one batch from one queue (acknowledging `request_id` first).
    ///
    /// # Errors
    /// Unknown consumer, topic mismatch, clientId rules, or a store failure.
    pub async fn fetch(&self, req: FetchRequest) -> Result<FetchOutcome, EngineError> {
        let (spec, key) = self.resolve(&req.target)?;
        let ack = match req.request_id.as_deref().map(str::trim).filter(|r| !r.is_empty()) {
            Some(rid) => Some(self.ack_in_context(spec, &key, rid).await.map_err(|e| e.to_string())),
            None => None,
        };
        let mut outcome = FetchOutcome {
            status: FetchStatus::NoNewMsg,
            request_id: None,
            messages: Vec::new(),
            retry_messages: Vec::new(),
            ack,
            queue: None,
        };
        let settings = self.settings_of(&spec.name);
        if settings.paused {
            outcome.status = FetchStatus::Paused;
            return Ok(outcome);
        }
        if settings.rate_limit_enabled
            && !lock(&self.inner.state.buckets)
                .entry(spec.name.clone())
                .or_insert_with(|| TokenBucket::new(settings.limit_rate))
                .try_acquire(settings.limit_rate)
        {
            outcome.status = FetchStatus::RateLimited;
            return Ok(outcome);
        }

        let ctx = self.inner.state.context(&key);
        let max_pull = req.max_pull_size.map_or(spec.max_pull_size, |m| m.clamp(1, 128));
        let chosen = match self.choose_and_lock(spec, &key, &ctx, req.client_ip, max_pull) {
            Choice::Locked(chosen) => chosen,
            Choice::Idle(snapshot) => {
                outcome.queue = Some(snapshot);
                return Ok(outcome);
            }
            Choice::AllLocked => return Ok(outcome),
        };
        outcome.queue = Some(chosen.snapshot.clone());
        let secret = &self.inner.messages.identity().secret;
        let token = |start: u64, next: u64, force_ack: bool| {
            request_id::encode(
                &BatchToken {
                    broker_name: self.inner.config.broker_name.clone(),
                    queue_id: chosen.queue,
                    offset: start,
                    next_offset: next,
                    lock_time: chosen.lock_time,
                    force_ack,
                },
                secret,
                &key,
            )
        };
        if let Some(reset_to) = chosen.reset_to {
            // Java proxy's forced reset: keep the lock, the ack moves the offset to reset_to.
            tracing::warn!(consumer = %spec.name, queue = chosen.queue, from = chosen.start, to = reset_to, "offset illegal, resetting");
            outcome.status = FetchStatus::OffsetIllegal;
            outcome.request_id = Some(token(chosen.start, reset_to, true));
            return Ok(outcome);
        }

        let read = self.read_batch(spec, &chosen, max_pull).await;
        let (messages, retry_messages, missing_retries) = match read {
            Ok(v) => v,
            Err(e) => {
                self.release(&key, &ctx, &chosen, &[]);
                return Err(e);
            }
        };
        if messages.is_empty() && retry_messages.is_empty() {
            self.release(&key, &ctx, &chosen, &missing_retries);
            if let Some(q) = outcome.queue.as_mut() {
                q.lock_time = None;
            }
            return Ok(outcome);
        }
        if !missing_retries.is_empty() {
            let mut st = lock(&ctx);
            let ops = drop_retries(&mut st, &key, &missing_retries);
            drop(self.inner.consumer_store.save(ops));
        }
        let next = messages.last().map_or(chosen.start, |m| m.offset + 1);
        outcome.status = FetchStatus::Found;
        outcome.request_id = Some(token(chosen.start, next, false));
        outcome.messages = messages.into_iter().map(to_delivered).collect();
        outcome.retry_messages = retry_messages;
        Ok(outcome)
    }

    /// Picks the queue with the biggest backlog (then the least recently pulled) among those
    /// not locked for this context, and locks it.
    fn choose_and_lock(
        &self,
        spec: &ConsumerSpec,
        key: &ContextKey,
        ctx: &Mutex<ContextState>,
        client_ip: Option<String>,
        max_pull: u32,
    ) -> Choice {
        let queues = self.queue_count(&spec.topic);
        let now = now_ms();
        let mut st = lock(ctx);
        st.ensure_queues(queues);
        let ranges: Vec<_> = (0..queues)
            .map(|q| self.inner.messages.queue_range(&spec.topic, q))
            .collect();
        let mut order: Vec<u32> = (0..queues).collect();
        let backlog = |q: u32| {
            let r = ranges[q as usize];
            r.max
                .saturating_sub(st.queues[q as usize].committed.unwrap_or(r.min).max(r.min))
        };
        order.sort_by(|&a, &b| {
            backlog(b).cmp(&backlog(a)).then(
                st.queues[a as usize]
                    .last_pull_ms
                    .cmp(&st.queues[b as usize].last_pull_ms),
            )
        });
        let Some(queue) = order
            .into_iter()
            .find(|&q| st.live_lock(q, now, spec.consume_timeout_ms).is_none())
        else {
            return Choice::AllLocked;
        };
        let range = ranges[queue as usize];
        let committed = st.queues[queue as usize].committed;
        let start = committed.unwrap_or(range.min);
        let reset_to = committed.and_then(|c| {
            if c < range.min {
                Some(range.min)
            } else if c > range.max {
                Some(range.max)
            } else {
                None
            }
        });
        let retry_is_free = |e: &RetryEntry| match e.in_flight {
            None => true,
            Some((q, l)) => st.live_lock(q, now, spec.consume_timeout_ms) != Some(l),
        };
        let idle = reset_to.is_none() && start >= range.max && !st.retries.values().any(retry_is_free);
        let qs = &mut st.queues[queue as usize];
        if client_ip.is_some() {
            qs.client_ip = client_ip;
        }
        if idle {
            // Nothing to hand out: no lock and no store write, so idle polling costs no I/O.
            // (last_pull_ms only orders queues and bounds lock times; it need not be durable.)
            qs.last_pull_ms = now.max(qs.last_pull_ms);
            return Choice::Idle(QueueSnapshot {
                topic: spec.topic.clone(),
                queue_id: queue,
                min_offset: range.min,
                max_offset: range.max,
                committed: qs.committed,
                lock_time: None,
                client_ip: qs.client_ip.clone(),
            });
        }
        // Strictly increasing per queue, so an ack of an older lock never matches a newer one.
        let lock_time = now.max(qs.last_pull_ms + 1);
        qs.lock_time = Some(lock_time);
        qs.last_pull_ms = lock_time;
        let mut ops = vec![ConsumerOp::PutQueue {
            context: key.clone(),
            queue,
            state: qs.clone(),
        }];
        let mut retries = Vec::new();
        if reset_to.is_none() {
            let free: Vec<u64> = st
                .retries
                .values()
                .filter(|e| match e.in_flight {
                    None => true,
                    Some((q, l)) => st.live_lock(q, now, spec.consume_timeout_ms) != Some(l),
                })
                .map(|e| e.seq)
                .take(max_pull as usize)
                .collect();
            for seq in free {
                if let Some(entry) = st.retries.get_mut(&seq) {
                    entry.in_flight = Some((queue, lock_time));
                    ops.push(ConsumerOp::PutRetry {
                        context: key.clone(),
                        entry: entry.clone(),
                    });
                    retries.push(entry.clone());
                }
            }
        }
        drop(self.inner.consumer_store.save(ops));
        let qs = &st.queues[queue as usize];
        let snapshot = QueueSnapshot {
            topic: spec.topic.clone(),
            queue_id: queue,
            min_offset: range.min,
            max_offset: range.max,
            committed: qs.committed,
            lock_time: qs.lock_time,
            client_ip: qs.client_ip.clone(),
        };
        Choice::Locked(Chosen {
            queue,
            lock_time,
            start,
            reset_to,
            retries,
            snapshot,
        })
    }

    /// The batch's messages and retry messages; retry entries whose message is gone come back
    /// separately so they can be dropped.
    async fn read_batch(
        &self,
        spec: &ConsumerSpec,
        chosen: &Chosen,
        max_pull: u32,
    ) -> Result<(Vec<StoredMessage>, Vec<Delivered>, Vec<u64>), EngineError> {
        let messages = self
            .inner
            .messages
            .read(
                &spec.topic,
                chosen.queue,
                chosen.start,
                max_pull as usize,
                MAX_BATCH_BYTES,
            )
            .await?;
        let mut retry_messages = Vec::new();
        let mut missing = Vec::new();
        for entry in &chosen.retries {
            let MessageLocation { topic, queue, offset } = &entry.location;
            match self
                .inner
                .messages
                .read(topic, *queue, *offset, 1, MAX_BATCH_BYTES)
                .await?
                .pop()
            {
                Some(m) if m.offset == *offset && m.msg_id == entry.msg_id => retry_messages.push(to_delivered(m)),
                _ => missing.push(entry.seq),
            }
        }
        Ok((messages, retry_messages, missing))
    }

    /// Unlocks a queue chosen for a pull that delivers nothing.
    fn release(&self, key: &ContextKey, ctx: &Mutex<ContextState>, chosen: &Chosen, missing_retries: &[u64]) {
        let mut st = lock(ctx);
        let mut ops = drop_retries(&mut st, key, missing_retries);
        if let Some(qs) = st.queues.get_mut(chosen.queue as usize)
            && qs.lock_time == Some(chosen.lock_time)
        {
            qs.lock_time = None;
            ops.push(ConsumerOp::PutQueue {
                context: key.clone(),
                queue: chosen.queue,
                state: qs.clone(),
            });
        }
        ops.extend(free_retries(&mut st, key, chosen.queue, chosen.lock_time));
        drop(self.inner.consumer_store.save(ops));
        drop(st);
        self.notify_consumers();
    }

    /// Acknowledges a batch by its requestId.
    ///
    /// # Errors
    /// Unknown consumer, bad target, a malformed or forged requestId, or a store failure.
    pub async fn ack(&self, target: &ConsumeTarget, request_id: &str) -> Result<AckOutcome, EngineError> {
        let (spec, key) = self.resolve(target)?;
        self.ack_in_context(spec, &key, request_id.trim()).await
    }

    /// The Java proxy's ack algorithm, with "the lock that issued the batch" checked exactly.
    async fn ack_in_context(
        &self,
        spec: &ConsumerSpec,
        key: &ContextKey,
        request_id: &str,
    ) -> Result<AckOutcome, EngineError> {
        let token = self.decode_token(request_id, key, self.queue_count(&spec.topic))?;
        let info = token.info();
        let ctx = self.inner.state.context(key);
        let (outcome, pending) = {
            let mut st = lock(&ctx);
            st.ensure_queues(self.queue_count(&spec.topic));
            let now = now_ms();
            let qs = &mut st.queues[token.queue_id as usize];
            // The batch's own lock is still there (live or expired, not re-taken).
            let matched = qs.lock_time == Some(token.lock_time);
            let outcome = match qs.lock_time {
                None => AckOutcome {
                    committed: false,
                    message: format!("lock not exist {info}"),
                },
                Some(t) if t != token.lock_time => AckOutcome {
                    committed: false,
                    message: format!("ack ignored: the queue was locked again since (lockTime {t}) {info}"),
                },
                Some(t) => {
                    let expired = now.saturating_sub(t) > spec.consume_timeout_ms;
                    let prefix = if expired { "lock expired, " } else { "" };
                    let (committed, what) = match qs.committed {
                        None => (true, "ok"),
                        Some(_) if token.force_ack => (true, "ok"),
                        Some(c) if token.offset == c && token.next_offset > c => (true, "ok"),
                        Some(c) if token.offset == c || token.next_offset == c => (false, "offset has committed"),
                        Some(_) => (false, "offset changed since the batch was handed out"),
                    };
                    if committed {
                        qs.committed = Some(token.next_offset);
                    }
                    qs.lock_time = None;
                    AckOutcome {
                        committed,
                        message: format!("{prefix}{what} {info}"),
                    }
                }
            };
            let state = st.queues[token.queue_id as usize].clone();
            let mut ops = vec![ConsumerOp::PutQueue {
                context: key.clone(),
                queue: token.queue_id,
                state,
            }];
            // Retry messages delivered with this batch are done (whether or not the offset moved:
            // the batch reached the consumer and it acknowledged it).
            if matched {
                let done: Vec<u64> = st
                    .retries
                    .values()
                    .filter(|e| e.in_flight == Some((token.queue_id, token.lock_time)))
                    .map(|e| e.seq)
                    .collect();
                ops.extend(drop_retries(&mut st, key, &done));
            }
            (outcome, self.inner.consumer_store.save(ops))
        };
        pending.await?;
        self.notify_consumers();
        Ok(outcome)
    }

    /// Unlocks the queue of an unacknowledged batch so it is delivered again at once.
    ///
    /// # Errors
    /// Unknown consumer, bad target, a malformed or forged requestId, or a store failure.
    pub async fn unlock(&self, target: &ConsumeTarget, request_id: &str) -> Result<UnlockOutcome, EngineError> {
        let (spec, key) = self.resolve(target)?;
        let token = self.decode_token(request_id.trim(), &key, self.queue_count(&spec.topic))?;
        let ctx = self.inner.state.context(&key);
        let (unlocked, pending) = {
            let mut st = lock(&ctx);
            st.ensure_queues(self.queue_count(&spec.topic));
            let qs = &mut st.queues[token.queue_id as usize];
            let unlocked = qs.lock_time == Some(token.lock_time);
            let mut ops = Vec::new();
            if unlocked {
                qs.lock_time = None;
                let state = qs.clone();
                ops.push(ConsumerOp::PutQueue {
                    context: key.clone(),
                    queue: token.queue_id,
                    state,
                });
                ops.extend(free_retries(&mut st, &key, token.queue_id, token.lock_time));
            }
            (unlocked, self.inner.consumer_store.save(ops))
        };
        pending.await?;
        if unlocked {
            self.notify_consumers();
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
        let spec = self.consumer_spec(consumer)?.clone();
        let mut retry_queued = 0;
        if let Some(retry) = change.retry_msg_id.as_deref() {
            retry_queued = self.queue_retry(&spec, retry, change.client_id.as_deref()).await?;
        }
        let settings = {
            let mut all = lock(&self.inner.state.settings);
            let mut settings = all.get(consumer).cloned().unwrap_or_else(|| self.settings_of_default());
            if let Some(p) = change.paused {
                settings.paused = p;
            }
            if let Some(e) = change.rate_limit_enabled {
                settings.rate_limit_enabled = e;
            }
            if let Some(r) = change.limit_rate {
                settings.limit_rate = r;
                lock(&self.inner.state.buckets).remove(consumer);
            }
            all.insert(consumer.to_owned(), settings.clone());
            let pending = (change.paused.is_some()
                || change.rate_limit_enabled.is_some()
                || change.limit_rate.is_some())
            .then(|| {
                self.inner.consumer_store.save(vec![ConsumerOp::PutSettings {
                    consumer: consumer.to_owned(),
                    settings: settings.clone(),
                }])
            });
            (settings, pending)
        };
        if let Some(pending) = settings.1 {
            pending.await?;
        }
        self.notify_consumers();
        Ok(ConsumerView {
            consumer: spec.name.clone(),
            topic: spec.topic.clone(),
            mode: spec.mode,
            settings: settings.0,
            max_pull_size: spec.max_pull_size,
            consume_timeout_ms: spec.consume_timeout_ms,
            retry_queued,
        })
    }

    fn settings_of_default(&self) -> ConsumerSettings {
        ConsumerSettings {
            paused: false,
            rate_limit_enabled: true,
            limit_rate: self.inner.config.default_rate_limit,
        }
    }

    async fn queue_retry(
        &self,
        spec: &ConsumerSpec,
        msg_id: &str,
        client_id: Option<&str>,
    ) -> Result<u32, EngineError> {
        let id = super::ids::parse_hex_id(msg_id)
            .ok_or_else(|| EngineError::invalid(format!("retryMsgId {msg_id:?} is not a 32-hex-digit msgId")))?;
        let location = self.inner.messages.locate(id).await?.ok_or_else(|| {
            EngineError::invalid(format!(
                "message {msg_id} not found (never stored, not yet due, or expired)"
            ))
        })?;
        if location.topic != spec.topic {
            return Err(EngineError::invalid(format!(
                "message {msg_id} is not in topic {}",
                spec.topic
            )));
        }
        let keys: Vec<ContextKey> = match (spec.mode, client_id.map(str::trim).filter(|c| !c.is_empty())) {
            (ConsumeMode::Clustering, _) => {
                vec![ContextKey {
                    topic: spec.topic.clone(),
                    group: spec.name.clone(),
                    client_id: None,
                }]
            }
            (ConsumeMode::Broadcast, Some(c)) => {
                vec![ContextKey {
                    topic: spec.topic.clone(),
                    group: spec.name.clone(),
                    client_id: Some(c.to_owned()),
                }]
            }
            (ConsumeMode::Broadcast, None) => lock(&self.inner.state.contexts)
                .keys()
                .filter(|k| k.group == spec.name && k.topic == spec.topic && k.client_id.is_some())
                .cloned()
                .collect(),
        };
        let mut pendings = Vec::new();
        for key in &keys {
            let ctx = self.inner.state.context(key);
            let mut st = lock(&ctx);
            let seq = st.next_retry_seq;
            st.next_retry_seq += 1;
            let entry = RetryEntry {
                seq,
                msg_id: id,
                location: location.clone(),
                in_flight: None,
            };
            st.retries.insert(seq, entry.clone());
            pendings.push(self.inner.consumer_store.save(vec![ConsumerOp::PutRetry {
                context: key.clone(),
                entry,
            }]));
        }
        for p in pendings {
            p.await?;
        }
        Ok(keys.len() as u32)
    }
}

fn drop_retries(st: &mut ContextState, key: &ContextKey, seqs: &[u64]) -> Vec<ConsumerOp> {
    seqs.iter()
        .filter_map(|seq| st.retries.remove(seq))
        .map(|e| ConsumerOp::DeleteRetry {
            context: key.clone(),
            seq: e.seq,
        })
        .collect()
}

/// Retry messages delivered with the batch of (queue, lock) become deliverable again.
fn free_retries(st: &mut ContextState, key: &ContextKey, queue: u32, lock_time: u64) -> Vec<ConsumerOp> {
    st.retries
        .values_mut()
        .filter(|e| e.in_flight == Some((queue, lock_time)))
        .map(|e| {
            e.in_flight = None;
            ConsumerOp::PutRetry {
                context: key.clone(),
                entry: e.clone(),
            }
        })
        .collect()
}
