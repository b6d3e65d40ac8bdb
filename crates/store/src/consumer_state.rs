//! Consumer state (offsets, locks, retry entries, settings) behind a few atomic steps, so the
//! queue-choice and ack rules of the engine run unchanged over one proxy's memory or over a
//! store shared by several proxies (Redis, issue 4), where each step becomes one atomic call.
//!
//! The rules stay in the engine; a store only guarantees that each step is all-or-nothing and
//! compares before it sets: a lock is taken only if it is still what the caller saw, and a
//! batch is finished only by the lock that handed it out.

use super::{
    ConsumerOp, ConsumerSettings, ConsumerStore, ContextKey, MessageLocation, PendingWrite, PopQueue, PopSegment,
    QueueState, RetryEntry, StoreError,
};
use crate::settings::{Bounds, SettingError};
use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

/// Where consumer offsets, locks and retry entries live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsumerStateKind {
    /// In the embedded store (one proxy).
    Embedded,
    /// In Redis, shared by several proxies.
    Redis,
}

/// The `[consumer_state]` section.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerStateSettings {
    pub kind: ConsumerStateKind,
    /// `redis://host:port[/db]` when `kind = "redis"`.
    pub url: Option<String>,
    /// Prefix of every Redis key (keeps mqproxy's keys apart from other users of the server).
    pub prefix: String,
    /// How long one Redis call may take before it fails (the request then answers 500).
    pub timeout_ms: u64,
}

impl Default for ConsumerStateSettings {
    fn default() -> Self {
        Self {
            kind: ConsumerStateKind::Embedded,
            url: None,
            prefix: "mqproxy:".into(),
            // The redis crate's own default (500 ms) failed calls on a loaded 2-core machine.
            timeout_ms: 3_000,
        }
    }
}

impl ConsumerStateSettings {
    /// Checks the range and that Redis has an address.
    ///
    /// # Errors
    /// The first value refused, named by its key in the section.
    pub fn check(&self) -> Result<(), SettingError> {
        Bounds::new(100, 60_000).setting("timeout_ms", self.timeout_ms)?;
        let redis_url = |u: &str| u.starts_with("redis://") || u.starts_with("rediss://");
        if self.kind == ConsumerStateKind::Redis && !self.url.as_deref().is_some_and(redis_url) {
            return Err(SettingError::new(
                "url",
                "kind = \"redis\" needs url = \"redis://host:port\"",
            ));
        }
        Ok(())
    }
}

/// A context's state as read at one moment.
#[derive(Debug, Clone, Default)]
pub struct ContextSnapshot {
    /// One entry per queue of the topic.
    pub queues: Vec<QueueState>,
    pub retries: Vec<RetryEntry>,
    /// One entry per queue: the POP segments in flight.
    pub pop: Vec<PopQueue>,
}

impl ContextSnapshot {
    /// Whether any POP segment of this context is in flight (acknowledged or not yet).
    pub fn pop_in_flight(&self) -> usize {
        self.pop.iter().map(|p| p.segments.len()).sum()
    }
}

/// Take a queue's lock.
#[derive(Debug, Clone)]
pub struct LockRequest {
    pub queue: u32,
    /// The lock the caller saw (None, or an expired lock time): the lock is taken only if it is
    /// still exactly this.
    pub seen: Option<u64>,
    /// The new lock time; must be later than the queue's last pull (so a lock time is never
    /// reused, even after lock and unlock in between).
    pub lock_time: u64,
    pub client_ip: Option<String>,
    /// The lock's own timeout (a pull's `consumeTimeout`), kept with it until it is released.
    pub timeout_ms: Option<u64>,
    /// Retry entries to deliver with the batch: (seq, the in-flight mark the caller saw). Each
    /// is claimed only if its mark is unchanged.
    pub claim_retries: Vec<(u64, Option<(u32, u64)>)>,
}

/// A lock taken.
#[derive(Debug, Clone)]
pub struct LockGrant {
    /// The queue's state as locked, read atomically with taking the lock (the committed
    /// offset here, not the one seen before, is where the batch starts).
    pub state: QueueState,
    /// The retry entries claimed for this batch.
    pub retries: Vec<RetryEntry>,
}

/// What [`ConsumerStateStore::finish`] did.
#[must_use = "the committed offset is durable only when `durable` has resolved"]
pub struct Finished {
    /// Whether the lock matched (the batch was finished).
    pub matched: bool,
    /// Resolves when the new committed offset is durable (at once where each step is durable
    /// when it returns, as on Redis). Awaited by the caller before it answers, so a pull can
    /// read its next batch while the ack's commit is flushed.
    pub durable: PendingWrite,
}

impl Finished {
    /// Finished, and durable already.
    pub fn done(matched: bool) -> Self {
        Self {
            matched,
            durable: Box::pin(std::future::ready(Ok(()))),
        }
    }

    /// Waits for durability: whether the lock matched.
    ///
    /// # Errors
    /// The durable store's failure to write the change.
    pub async fn durably(self) -> Result<bool, StoreError> {
        self.durable.await?;
        Ok(self.matched)
    }
}

impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Finished")
            .field("matched", &self.matched)
            .finish_non_exhaustive()
    }
}

/// What happens to the retry entries delivered with a finished batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryFate {
    /// Acknowledged: deleted.
    Done,
    /// Given back: deliverable again.
    Free,
}

/// Which POP segment a [`PopTake`] hands out.
#[derive(Debug, Clone)]
pub enum PopTakeKind {
    /// The queue's next segment `[offset, next_offset)`, read by the caller from the queue's
    /// POP end it saw (`expected_next`): taken only if that end is unchanged, so two pulls
    /// never hand out one segment. `offset == next_offset` carries retry messages only.
    Next {
        expected_next: Option<u64>,
        offset: u64,
        next_offset: u64,
    },
    /// A segment whose time ran out (or was given back), handed out again: taken only if it
    /// is still in flight under `seen_lock_time`.
    Again { seen_lock_time: u64 },
}

/// Hand out a POP segment.
#[derive(Debug, Clone)]
pub struct PopTake {
    pub queue: u32,
    pub kind: PopTakeKind,
    /// The segment's lock time: later than the queue's last pull, as a queue lock's.
    pub lock_time: u64,
    pub timeout_ms: u64,
    pub client_ip: Option<String>,
    /// As [`LockRequest::claim_retries`], marked with this segment's (queue, lock time).
    pub claim_retries: Vec<(u64, Option<(u32, u64)>)>,
}

/// A POP segment handed out.
#[derive(Debug, Clone)]
pub struct PopGrant {
    pub segment: PopSegment,
    pub retries: Vec<RetryEntry>,
}

/// How a POP segment ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PopFate {
    /// Acknowledged: forgotten; the committed offset moves to the first segment still in
    /// flight (or the end of what was handed out); its retry entries are done.
    Ack,
    /// Given back: handed out again (as retry messages) by the next POP pull; its retry
    /// entries are free.
    Release,
}

/// What [`ConsumerStateStore::pop_finish`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PopFinished {
    /// No such segment in flight (acknowledged already, or handed out again since).
    NotFound,
    Acked {
        /// The committed offset moved.
        committed: bool,
    },
    Released,
}

/// Consumer state in atomic steps.
#[async_trait]
pub trait ConsumerStateStore: Send + Sync + 'static {
    /// The requestId MAC key every proxy on this state store shares, when it is shared (a
    /// requestId issued by one proxy is acknowledged at another). None: one proxy's own key.
    async fn shared_secret(&self) -> Result<Option<[u8; 32]>, StoreError> {
        Ok(None)
    }

    /// The state of a context's first `queues` queues and its retry entries.
    async fn snapshot(&self, ctx: &ContextKey, queues: u32) -> Result<ContextSnapshot, StoreError>;

    /// Takes a lock if the queue's lock is still `seen` and `lock_time` is later than its last
    /// pull; None when another pull was faster.
    async fn try_lock(&self, ctx: &ContextKey, request: LockRequest) -> Result<Option<LockGrant>, StoreError>;

    /// Hands out a POP segment (see [`PopTakeKind`]) and claims retry entries with it; None
    /// when another pull was faster. A `Next` segment taken while no other non-empty segment
    /// of the queue is in flight sets the committed offset to its offset (what lies before
    /// was acknowledged, or is gone from the queue).
    async fn pop_take(&self, ctx: &ContextKey, take: PopTake) -> Result<Option<PopGrant>, StoreError>;

    /// Ends the POP segment `lock_time` of a queue (see [`PopFate`]); the committed offset is
    /// durable before this returns.
    async fn pop_finish(
        &self,
        ctx: &ContextKey,
        queue: u32,
        lock_time: u64,
        fate: PopFate,
    ) -> Result<PopFinished, StoreError>;

    /// Records a pull that found nothing to hand out (no lock taken).
    async fn touch(
        &self,
        ctx: &ContextKey,
        queue: u32,
        now_ms: u64,
        client_ip: Option<String>,
    ) -> Result<(), StoreError>;

    /// If the queue is still locked with `lock_time`: sets the committed offset to `commit` when
    /// given (durable when [`Finished::durable`] resolves), clears the lock, and applies
    /// `retries` to the entries delivered with that lock. Every later step sees the change.
    async fn finish(
        &self,
        ctx: &ContextKey,
        queue: u32,
        lock_time: u64,
        commit: Option<u64>,
        retries: RetryFate,
    ) -> Result<Finished, StoreError>;

    /// An operator's reset: sets the committed offset whatever it was (durably). A lock stays:
    /// the batch it holds can no longer commit, since its offset no longer matches. The
    /// queue's POP segments are forgotten (POP starts again at the new offset).
    async fn set_committed(&self, ctx: &ContextKey, queue: u32, offset: u64) -> Result<(), StoreError>;

    /// Deletes retry entries (their message is gone).
    async fn drop_retries(&self, ctx: &ContextKey, seqs: &[u64]) -> Result<(), StoreError>;

    /// Queues a retry message for a context (durably).
    async fn add_retry(&self, ctx: &ContextKey, msg_id: [u8; 16], location: MessageLocation) -> Result<(), StoreError>;

    /// The broadcast clientIds of this group that are known (admitted and not forgotten),
    /// sorted.
    async fn client_ids(&self, topic: &str, group: &str) -> Result<Vec<String>, StoreError>;

    /// Admits a broadcast client before its pull: records `now_ms` as its last pull; a clientId
    /// not yet known is admitted only while the group has fewer than `max_clients`. False:
    /// refused (the group is full).
    async fn admit_client(&self, ctx: &ContextKey, now_ms: u64, max_clients: u32) -> Result<bool, StoreError>;

    /// Forgets the broadcast clients of a group whose last pull was before `idle_before_ms`:
    /// their offsets, locks and retry entries go. Returns how many were forgotten.
    async fn forget_idle_clients(&self, topic: &str, group: &str, idle_before_ms: u64) -> Result<usize, StoreError>;

    /// Forgets a context (a reclaimed lite topic's): offsets, locks, POP segments and retry
    /// entries.
    async fn forget_context(&self, ctx: &ContextKey) -> Result<(), StoreError>;

    async fn settings(&self, consumer: &str) -> Result<Option<ConsumerSettings>, StoreError>;

    /// Saves a consumer's settings (durably).
    async fn put_settings(&self, consumer: &str, settings: ConsumerSettings) -> Result<(), StoreError>;

    /// The next turn of a topic's strict round robin (`roundRobin=true` produces): 0, 1, 2, ...
    /// per topic, one sequence for every proxy sharing this store (kept here because this is
    /// the state proxies share; it is not durable on one proxy, where a restart starts again).
    async fn next_turn(&self, topic: &str) -> Result<u64, StoreError>;
}

use crate::MAX_QUEUES_PER_TOPIC as MAX_QUEUES;

#[derive(Debug, Default)]
struct ContextState {
    queues: Vec<QueueState>,
    retries: BTreeMap<u64, RetryEntry>,
    next_retry_seq: u64,
    /// Memory only: after a restart POP starts again at the committed offset (segments in
    /// flight then are delivered again: at least once).
    pop: Vec<PopQueue>,
}

impl ContextState {
    fn ensure_queues(&mut self, n: u32) {
        let n = n as usize;
        if self.queues.len() < n {
            // Room for exactly the queues used: a broadcast client that polled one empty queue
            // keeps one queue's state, not the four a growing Vec reserves (a flood of clientIds
            // made that a quarter of the state it kept).
            self.queues.reserve_exact(n - self.queues.len());
            self.queues.resize_with(n, QueueState::default);
        }
    }

    fn queue_mut(&mut self, queue: u32) -> &mut QueueState {
        self.ensure_queues(queue + 1);
        &mut self.queues[queue as usize]
    }

    fn pop_mut(&mut self, queue: u32) -> &mut PopQueue {
        let n = queue as usize + 1;
        if self.pop.len() < n {
            self.pop.resize_with(n, PopQueue::default);
        }
        &mut self.pop[queue as usize]
    }

    /// Applies a retry fate to the entries delivered with (queue, lock_time); the ops to save.
    fn settle_retries(&mut self, ctx: &ContextKey, queue: u32, lock_time: u64, fate: RetryFate) -> Vec<ConsumerOp> {
        let delivered: Vec<u64> = self
            .retries
            .values()
            .filter(|e| e.in_flight == Some((queue, lock_time)))
            .map(|e| e.seq)
            .collect();
        let mut ops = Vec::new();
        for seq in delivered {
            match fate {
                RetryFate::Done => {
                    self.retries.remove(&seq);
                    ops.push(ConsumerOp::DeleteRetry {
                        context: ctx.clone(),
                        seq,
                    });
                }
                RetryFate::Free => {
                    if let Some(entry) = self.retries.get_mut(&seq) {
                        entry.in_flight = None;
                        ops.push(ConsumerOp::PutRetry {
                            context: ctx.clone(),
                            entry: entry.clone(),
                        });
                    }
                }
            }
        }
        ops
    }

    /// Claims the retry entries whose mark is still as seen, for (queue, lock_time).
    fn claim_retries(
        &mut self,
        ctx: &ContextKey,
        claims: Vec<(u64, Option<(u32, u64)>)>,
        queue: u32,
        lock_time: u64,
        ops: &mut Vec<ConsumerOp>,
    ) -> Vec<RetryEntry> {
        let mut claimed = Vec::new();
        for (seq, seen) in claims {
            if let Some(entry) = self.retries.get_mut(&seq)
                && entry.in_flight == seen
            {
                entry.in_flight = Some((queue, lock_time));
                ops.push(ConsumerOp::PutRetry {
                    context: ctx.clone(),
                    entry: entry.clone(),
                });
                claimed.push(entry.clone());
            }
        }
        claimed
    }
}

/// The committed offset POP state implies: the first non-empty segment in flight, else the
/// end of what was handed out.
fn pop_committed(pop: &PopQueue) -> Option<u64> {
    pop.segments
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| s.offset)
        .min()
        .or(pop.next)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change under these mutexes is a plain assignment, so a poisoned mutex still holds
    // consistent data: take it over rather than propagate a panic.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// (topic, group) -> clientId -> last pull (epoch ms): the admitted broadcast clients.
type ClientIndex = HashMap<(String, String), HashMap<String, u64>>;

/// One proxy's consumer state: in memory, each change written through to a [`ConsumerStore`]
/// while the context's mutex is held (so the store applies changes in the order they happened).
/// Commits and operator changes are awaited before returning; lock-only changes are written
/// behind (losing one in a crash only brings a batch back sooner).
pub struct LocalConsumerState {
    contexts: Mutex<HashMap<ContextKey, Arc<Mutex<ContextState>>>>,
    turns: Mutex<HashMap<String, u64>>,
    clients: Mutex<ClientIndex>,
    settings: Mutex<HashMap<String, ConsumerSettings>>,
    durable: Arc<dyn ConsumerStore>,
}

impl LocalConsumerState {
    /// Loads everything `durable` holds.
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn load(durable: Arc<dyn ConsumerStore>) -> Result<Self, StoreError> {
        let snapshot = durable.load()?;
        let mut contexts: HashMap<ContextKey, ContextState> = HashMap::new();
        for (key, queue, state) in snapshot.queues {
            if queue >= MAX_QUEUES {
                tracing::warn!(?key, queue, "ignoring saved state of a queue id beyond any topic");
                continue;
            }
            *contexts.entry(key).or_default().queue_mut(queue) = state;
        }
        for (key, entry) in snapshot.retries {
            let ctx = contexts.entry(key).or_default();
            ctx.next_retry_seq = ctx.next_retry_seq.max(entry.seq + 1);
            ctx.retries.insert(entry.seq, entry);
        }
        // Broadcast clients as loaded: last seen at their last durable pull (or now, when they
        // hold only retry entries), so the idle rule counts from there.
        let loaded_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut clients = ClientIndex::new();
        for (key, ctx) in &contexts {
            if let Some(client) = &key.client_id {
                let last = ctx.queues.iter().map(|q| q.last_pull_ms).max().unwrap_or(0);
                clients
                    .entry((key.topic.clone(), key.group.clone()))
                    .or_default()
                    .insert(client.clone(), if last == 0 { loaded_at } else { last });
            }
        }
        Ok(Self {
            contexts: Mutex::new(
                contexts
                    .into_iter()
                    .map(|(k, v)| (k, Arc::new(Mutex::new(v))))
                    .collect(),
            ),
            turns: Mutex::new(HashMap::new()),
            clients: Mutex::new(clients),
            settings: Mutex::new(snapshot.settings.into_iter().collect()),
            durable,
        })
    }

    /// The context, created if new (only steps that follow an admitted pull, or an operator's
    /// change, create one).
    fn context(&self, key: &ContextKey) -> Arc<Mutex<ContextState>> {
        lock(&self.contexts).entry(key.clone()).or_default().clone()
    }

    /// The context if it exists: reads and steps that only finish something create nothing.
    fn existing(&self, key: &ContextKey) -> Option<Arc<Mutex<ContextState>>> {
        lock(&self.contexts).get(key).cloned()
    }

    /// Drops a context from memory; the changes that delete it from the durable store.
    fn remove_context(&self, key: &ContextKey) -> Vec<ConsumerOp> {
        let Some(context) = lock(&self.contexts).remove(key) else {
            return Vec::new();
        };
        let st = lock(&context);
        let queues = (0..u32::try_from(st.queues.len()).unwrap_or(u32::MAX)).map(|queue| ConsumerOp::DeleteQueue {
            context: key.clone(),
            queue,
        });
        let retries = st.retries.keys().map(|&seq| ConsumerOp::DeleteRetry {
            context: key.clone(),
            seq,
        });
        queues.chain(retries).collect()
    }

    fn put_queue(key: &ContextKey, queue: u32, state: &QueueState) -> ConsumerOp {
        ConsumerOp::PutQueue {
            context: key.clone(),
            queue,
            state: state.clone(),
        }
    }
}

#[async_trait]
impl ConsumerStateStore for LocalConsumerState {
    async fn snapshot(&self, ctx: &ContextKey, queues: u32) -> Result<ContextSnapshot, StoreError> {
        let mut snapshot = match self.existing(ctx) {
            Some(context) => {
                let st = lock(&context);
                ContextSnapshot {
                    queues: st.queues.iter().take(queues as usize).cloned().collect(),
                    retries: st.retries.values().cloned().collect(),
                    pop: st.pop.iter().take(queues as usize).cloned().collect(),
                }
            }
            None => ContextSnapshot::default(),
        };
        snapshot.queues.resize_with(queues as usize, QueueState::default);
        snapshot.pop.resize_with(queues as usize, PopQueue::default);
        Ok(snapshot)
    }

    async fn try_lock(&self, ctx: &ContextKey, request: LockRequest) -> Result<Option<LockGrant>, StoreError> {
        let context = self.context(ctx);
        let mut st = lock(&context);
        let qs = st.queue_mut(request.queue);
        if qs.lock_time != request.seen || request.lock_time <= qs.last_pull_ms {
            return Ok(None);
        }
        qs.lock_time = Some(request.lock_time);
        qs.lock_timeout_ms = request.timeout_ms;
        qs.last_pull_ms = request.lock_time;
        if request.client_ip.is_some() {
            qs.client_ip = request.client_ip;
        }
        let state = qs.clone();
        let mut ops = vec![Self::put_queue(ctx, request.queue, &state)];
        let retries = st.claim_retries(ctx, request.claim_retries, request.queue, request.lock_time, &mut ops);
        drop(self.durable.save(ops));
        Ok(Some(LockGrant { state, retries }))
    }

    async fn pop_take(&self, ctx: &ContextKey, take: PopTake) -> Result<Option<PopGrant>, StoreError> {
        let context = self.context(ctx);
        let mut st = lock(&context);
        let queue = take.queue;
        if take.lock_time <= st.queue_mut(queue).last_pull_ms {
            return Ok(None);
        }
        let mut ops = Vec::new();
        let pop = st.pop_mut(queue);
        let segment = match take.kind {
            PopTakeKind::Next {
                expected_next,
                offset,
                next_offset,
            } => {
                if pop.next != expected_next {
                    return Ok(None);
                }
                let starts_committed = pop.segments.iter().all(PopSegment::is_empty);
                if next_offset > offset {
                    pop.next = Some(next_offset);
                }
                let segment = PopSegment {
                    lock_time: take.lock_time,
                    offset,
                    next_offset,
                    timeout_ms: take.timeout_ms,
                    retry_times: 0,
                    client_ip: take.client_ip.clone(),
                };
                let at = pop.segments.partition_point(|s| s.offset <= offset);
                pop.segments.insert(at, segment.clone());
                if starts_committed {
                    st.queue_mut(queue).committed = Some(offset);
                }
                segment
            }
            PopTakeKind::Again { seen_lock_time } => {
                let Some(segment) = pop.segments.iter_mut().find(|s| s.lock_time == seen_lock_time) else {
                    return Ok(None);
                };
                segment.lock_time = take.lock_time;
                segment.timeout_ms = take.timeout_ms;
                segment.retry_times += 1;
                segment.client_ip.clone_from(&take.client_ip);
                segment.clone()
            }
        };
        let qs = st.queue_mut(queue);
        qs.last_pull_ms = take.lock_time;
        if take.client_ip.is_some() {
            qs.client_ip = take.client_ip;
        }
        ops.push(Self::put_queue(ctx, queue, qs));
        let retries = st.claim_retries(ctx, take.claim_retries, queue, take.lock_time, &mut ops);
        drop(self.durable.save(ops));
        Ok(Some(PopGrant { segment, retries }))
    }

    async fn pop_finish(
        &self,
        ctx: &ContextKey,
        queue: u32,
        lock_time: u64,
        fate: PopFate,
    ) -> Result<PopFinished, StoreError> {
        let Some(context) = self.existing(ctx) else {
            return Ok(PopFinished::NotFound);
        };
        let (finished, pending) = {
            let mut st = lock(&context);
            let pop = st.pop_mut(queue);
            let Some(at) = pop.segments.iter().position(|s| s.lock_time == lock_time) else {
                return Ok(PopFinished::NotFound);
            };
            match fate {
                PopFate::Release => {
                    if pop.segments[at].is_empty() {
                        pop.segments.remove(at);
                    } else {
                        pop.segments[at].timeout_ms = 0;
                    }
                    let ops = st.settle_retries(ctx, queue, lock_time, RetryFate::Free);
                    drop(self.durable.save(ops));
                    return Ok(PopFinished::Released);
                }
                PopFate::Ack => {
                    pop.segments.remove(at);
                    let committed = pop_committed(pop);
                    let mut ops = st.settle_retries(ctx, queue, lock_time, RetryFate::Done);
                    let qs = st.queue_mut(queue);
                    let moved = committed.is_some() && committed != qs.committed;
                    if moved {
                        qs.committed = committed;
                        ops.push(Self::put_queue(ctx, queue, qs));
                    }
                    (PopFinished::Acked { committed: moved }, self.durable.save(ops))
                }
            }
        };
        pending.await?;
        Ok(finished)
    }

    async fn touch(
        &self,
        ctx: &ContextKey,
        queue: u32,
        now_ms: u64,
        client_ip: Option<String>,
    ) -> Result<(), StoreError> {
        // Memory only: the last pull time orders queues and bounds lock times, and the durable
        // value (written with every lock) is never older than a lock time handed out.
        let context = self.context(ctx);
        let mut st = lock(&context);
        let qs = st.queue_mut(queue);
        qs.last_pull_ms = qs.last_pull_ms.max(now_ms);
        if client_ip.is_some() {
            qs.client_ip = client_ip;
        }
        Ok(())
    }

    async fn finish(
        &self,
        ctx: &ContextKey,
        queue: u32,
        lock_time: u64,
        commit: Option<u64>,
        retries: RetryFate,
    ) -> Result<Finished, StoreError> {
        let Some(context) = self.existing(ctx) else {
            return Ok(Finished::done(false));
        };
        let pending = {
            let mut st = lock(&context);
            let qs = st.queue_mut(queue);
            if qs.lock_time != Some(lock_time) {
                return Ok(Finished::done(false));
            }
            if commit.is_some() {
                qs.committed = commit;
            }
            qs.lock_time = None;
            qs.lock_timeout_ms = None;
            let mut ops = vec![Self::put_queue(ctx, queue, qs)];
            ops.extend(st.settle_retries(ctx, queue, lock_time, retries));
            self.durable.save(ops)
        };
        if commit.is_none() {
            // Only the lock and retry entries changed: a crash before they are written
            // delivers the batch again, as an expired lock would.
            return Ok(Finished::done(true));
        }
        Ok(Finished {
            matched: true,
            durable: pending,
        })
    }

    async fn set_committed(&self, ctx: &ContextKey, queue: u32, offset: u64) -> Result<(), StoreError> {
        let context = self.context(ctx);
        let pending = {
            let mut st = lock(&context);
            *st.pop_mut(queue) = PopQueue::default();
            let qs = st.queue_mut(queue);
            qs.committed = Some(offset);
            self.durable.save(vec![Self::put_queue(ctx, queue, qs)])
        };
        pending.await
    }

    async fn drop_retries(&self, ctx: &ContextKey, seqs: &[u64]) -> Result<(), StoreError> {
        let Some(context) = self.existing(ctx) else {
            return Ok(());
        };
        let mut st = lock(&context);
        let ops = seqs
            .iter()
            .filter_map(|seq| st.retries.remove(seq))
            .map(|e| ConsumerOp::DeleteRetry {
                context: ctx.clone(),
                seq: e.seq,
            })
            .collect();
        drop(self.durable.save(ops));
        Ok(())
    }

    async fn add_retry(&self, ctx: &ContextKey, msg_id: [u8; 16], location: MessageLocation) -> Result<(), StoreError> {
        let context = self.context(ctx);
        let pending = {
            let mut st = lock(&context);
            let seq = st.next_retry_seq;
            st.next_retry_seq += 1;
            let entry = RetryEntry {
                seq,
                msg_id,
                location,
                in_flight: None,
            };
            st.retries.insert(seq, entry.clone());
            self.durable.save(vec![ConsumerOp::PutRetry {
                context: ctx.clone(),
                entry,
            }])
        };
        pending.await
    }

    async fn client_ids(&self, topic: &str, group: &str) -> Result<Vec<String>, StoreError> {
        let mut ids: Vec<String> = lock(&self.clients)
            .get(&(topic.to_owned(), group.to_owned()))
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default();
        ids.sort();
        Ok(ids)
    }

    async fn admit_client(&self, ctx: &ContextKey, now_ms: u64, max_clients: u32) -> Result<bool, StoreError> {
        let Some(client) = &ctx.client_id else { return Ok(true) };
        let mut all = lock(&self.clients);
        let group = all.entry((ctx.topic.clone(), ctx.group.clone())).or_default();
        if let Some(last) = group.get_mut(client) {
            *last = (*last).max(now_ms);
            return Ok(true);
        }
        if group.len() >= max_clients as usize {
            return Ok(false);
        }
        group.insert(client.clone(), now_ms);
        Ok(true)
    }

    async fn forget_idle_clients(&self, topic: &str, group: &str, idle_before_ms: u64) -> Result<usize, StoreError> {
        let idle: Vec<String> = {
            let mut all = lock(&self.clients);
            let Some(clients) = all.get_mut(&(topic.to_owned(), group.to_owned())) else {
                return Ok(0);
            };
            let idle: Vec<String> = clients
                .iter()
                .filter(|&(_, &last)| last < idle_before_ms)
                .map(|(c, _)| c.clone())
                .collect();
            for c in &idle {
                clients.remove(c);
            }
            idle
        };
        let mut ops = Vec::new();
        for client in &idle {
            let key = ContextKey {
                topic: topic.to_owned(),
                group: group.to_owned(),
                client_id: Some(client.clone()),
            };
            ops.extend(self.remove_context(&key));
        }
        if !ops.is_empty() {
            self.durable.save(ops).await?;
        }
        Ok(idle.len())
    }

    async fn forget_context(&self, ctx: &ContextKey) -> Result<(), StoreError> {
        if let Some(client) = &ctx.client_id
            && let Some(clients) = lock(&self.clients).get_mut(&(ctx.topic.clone(), ctx.group.clone()))
        {
            clients.remove(client);
        }
        let ops = self.remove_context(ctx);
        if !ops.is_empty() {
            self.durable.save(ops).await?;
        }
        Ok(())
    }

    async fn settings(&self, consumer: &str) -> Result<Option<ConsumerSettings>, StoreError> {
        Ok(lock(&self.settings).get(consumer).cloned())
    }

    async fn put_settings(&self, consumer: &str, settings: ConsumerSettings) -> Result<(), StoreError> {
        let pending = {
            let mut all = lock(&self.settings);
            all.insert(consumer.to_owned(), settings.clone());
            self.durable.save(vec![ConsumerOp::PutSettings {
                consumer: consumer.to_owned(),
                settings,
            }])
        };
        pending.await
    }

    async fn next_turn(&self, topic: &str) -> Result<u64, StoreError> {
        let mut turns = lock(&self.turns);
        let turn = turns.entry(topic.to_owned()).or_insert(0);
        let this = *turn;
        *turn += 1;
        Ok(this)
    }
}

/// The contract every [`ConsumerStateStore`] must keep (run against each implementation).
#[cfg(test)]
pub(crate) mod contract {
    use super::*;

    fn ctx() -> ContextKey {
        ContextKey {
            topic: "t".into(),
            group: "g".into(),
            client_id: None,
        }
    }

    fn request(queue: u32, seen: Option<u64>, lock_time: u64) -> LockRequest {
        LockRequest {
            queue,
            seen,
            lock_time,
            client_ip: None,
            timeout_ms: None,
            claim_retries: Vec::new(),
        }
    }

    fn take(kind: PopTakeKind, lock_time: u64) -> PopTake {
        PopTake {
            queue: 0,
            kind,
            lock_time,
            timeout_ms: 60_000,
            client_ip: Some("10.0.0.9".into()),
            claim_retries: Vec::new(),
        }
    }

    fn next(expected_next: Option<u64>, offset: u64, next_offset: u64) -> PopTakeKind {
        PopTakeKind::Next {
            expected_next,
            offset,
            next_offset,
        }
    }

    /// POP segments: handed out in turn by compare-and-set on the queue's POP end, the
    /// committed offset at the first segment still in flight, given back and handed out again.
    async fn check_pop(state: &dyn ConsumerStateStore) {
        let c = ContextKey {
            group: "gp".into(),
            ..ctx()
        };
        let committed = |snap: &ContextSnapshot| snap.queues[0].committed;
        let first = state.pop_take(&c, take(next(None, 0, 3), 100)).await.expect("take");
        assert_eq!(first.expect("granted").segment.client_ip.as_deref(), Some("10.0.0.9"));
        assert!(
            state
                .pop_take(&c, take(next(None, 0, 3), 101))
                .await
                .expect("take")
                .is_none(),
            "the POP end moved: another pull was faster"
        );
        assert!(
            state
                .pop_take(&c, take(next(Some(3), 3, 5), 101))
                .await
                .expect("take")
                .is_some()
        );
        assert!(
            state
                .pop_take(&c, take(next(Some(5), 5, 6), 101))
                .await
                .expect("take")
                .is_none(),
            "a lock time not later than the last pull"
        );
        let snap = state.snapshot(&c, 1).await.expect("snapshot");
        assert_eq!(
            (snap.pop[0].next, snap.pop[0].segments.len(), committed(&snap)),
            (Some(5), 2, Some(0))
        );
        assert_eq!(snap.pop_in_flight(), 2);
        // Acked out of order: the committed offset waits for the first segment.
        assert_eq!(
            state.pop_finish(&c, 0, 101, PopFate::Ack).await.expect("ack"),
            PopFinished::Acked { committed: false }
        );
        assert_eq!(committed(&state.snapshot(&c, 1).await.expect("snapshot")), Some(0));
        assert_eq!(
            state.pop_finish(&c, 0, 100, PopFate::Ack).await.expect("ack"),
            PopFinished::Acked { committed: true }
        );
        assert_eq!(committed(&state.snapshot(&c, 1).await.expect("snapshot")), Some(5));
        assert_eq!(
            state.pop_finish(&c, 0, 100, PopFate::Ack).await.expect("ack"),
            PopFinished::NotFound,
            "twice"
        );
        // Given back: expired at once, then handed out again (once) with its retry count.
        assert!(
            state
                .pop_take(&c, take(next(Some(5), 5, 7), 102))
                .await
                .expect("take")
                .is_some()
        );
        assert_eq!(
            state.pop_finish(&c, 0, 102, PopFate::Release).await.expect("release"),
            PopFinished::Released
        );
        let snap = state.snapshot(&c, 1).await.expect("snapshot");
        assert_eq!(snap.pop[0].segments[0].timeout_ms, 0);
        assert!(!snap.pop[0].segments[0].is_live(103));
        let again = state
            .pop_take(&c, take(PopTakeKind::Again { seen_lock_time: 102 }, 103))
            .await
            .expect("take")
            .expect("granted");
        assert_eq!(
            (
                again.segment.offset,
                again.segment.next_offset,
                again.segment.retry_times
            ),
            (5, 7, 1)
        );
        assert!(
            state
                .pop_take(&c, take(PopTakeKind::Again { seen_lock_time: 102 }, 104))
                .await
                .expect("take")
                .is_none(),
            "handed out again once"
        );
        // A segment of retry messages only: claims them, and its ack settles them.
        let location = MessageLocation {
            topic: "t".into(),
            queue: 0,
            offset: 1,
        };
        state.add_retry(&c, [2; 16], location).await.expect("retry");
        let seq = state.snapshot(&c, 1).await.expect("snapshot").retries[0].seq;
        let mut carrier = take(next(Some(7), 7, 7), 105);
        carrier.claim_retries = vec![(seq, None)];
        let grant = state.pop_take(&c, carrier).await.expect("take").expect("granted");
        assert_eq!(grant.retries[0].in_flight, Some((0, 105)));
        assert_eq!(state.snapshot(&c, 1).await.expect("snapshot").pop[0].next, Some(7));
        assert_eq!(
            state.pop_finish(&c, 0, 105, PopFate::Ack).await.expect("ack"),
            PopFinished::Acked { committed: false }
        );
        assert!(state.snapshot(&c, 1).await.expect("snapshot").retries.is_empty());
        assert_eq!(
            state.pop_finish(&c, 0, 103, PopFate::Ack).await.expect("ack"),
            PopFinished::Acked { committed: true }
        );
        assert_eq!(committed(&state.snapshot(&c, 1).await.expect("snapshot")), Some(7));
        // An operator's reset forgets the POP state; the next segment starts the offset.
        assert!(
            state
                .pop_take(&c, take(next(Some(7), 7, 9), 106))
                .await
                .expect("take")
                .is_some()
        );
        state.set_committed(&c, 0, 2).await.expect("reset");
        let snap = state.snapshot(&c, 1).await.expect("snapshot");
        assert_eq!((snap.pop[0].clone(), committed(&snap)), (PopQueue::default(), Some(2)));
        assert!(
            state
                .pop_take(&c, take(next(None, 2, 4), 107))
                .await
                .expect("take")
                .is_some()
        );
        assert_eq!(committed(&state.snapshot(&c, 1).await.expect("snapshot")), Some(2));
    }

    /// A lite topic's contexts are apart from the group's own and from each other, and go
    /// whole when forgotten.
    async fn check_lite_contexts(state: &dyn ConsumerStateStore) {
        let lite = |name: &str, client: Option<&str>| ContextKey {
            topic: crate::lite_queue_topic("t", name),
            group: "g".into(),
            client_id: client.map(str::to_owned),
        };
        let (a, b) = (lite("a", None), lite("b", None));
        state.set_committed(&a, 0, 7).await.expect("commit a");
        state.set_committed(&b, 0, 9).await.expect("commit b");
        assert!(state.try_lock(&a, request(0, None, 5)).await.expect("lock").is_some());
        state
            .add_retry(
                &a,
                [1; 16],
                MessageLocation {
                    topic: a.topic.clone(),
                    queue: 0,
                    offset: 3,
                },
            )
            .await
            .expect("retry");
        let committed = |s: &ContextSnapshot| s.queues[0].committed;
        assert_eq!(committed(&state.snapshot(&a, 1).await.expect("a")), Some(7));
        assert_eq!(
            committed(&state.snapshot(&ctx(), 1).await.expect("own")),
            None,
            "the group's own context is apart"
        );
        state.forget_context(&a).await.expect("forget");
        let gone = state.snapshot(&a, 1).await.expect("a again");
        assert_eq!(
            (committed(&gone), gone.queues[0].lock_time, gone.retries.len()),
            (None, None, 0)
        );
        assert_eq!(
            committed(&state.snapshot(&b, 1).await.expect("b")),
            Some(9),
            "b is kept"
        );
        state.forget_context(&b).await.expect("forget b");
        // A broadcast client of a lite topic: admitted per lite topic, forgotten with it.
        let client = lite("a", Some("c1"));
        assert!(state.admit_client(&client, 1, 1).await.expect("admit"));
        assert_eq!(
            state.client_ids(&client.topic, "g").await.expect("ids"),
            vec!["c1".to_owned()]
        );
        assert!(
            state.client_ids("t", "g").await.expect("ids").is_empty(),
            "not the group's own"
        );
        state.forget_context(&client).await.expect("forget client");
        assert!(state.client_ids(&client.topic, "g").await.expect("ids").is_empty());
    }

    pub(crate) async fn check(state: &dyn ConsumerStateStore) {
        check_pop(state).await;
        check_lite_contexts(state).await;
        let c = ctx();
        // A lock is taken only if it is still what the caller saw.
        assert!(state.try_lock(&c, request(0, None, 10)).await.expect("lock").is_some());
        assert!(
            state.try_lock(&c, request(0, None, 11)).await.expect("lock").is_none(),
            "already locked"
        );
        // Taking over an expired lock needs the exact lock seen, and a later lock time.
        assert!(
            state
                .try_lock(&c, request(0, Some(9), 12))
                .await
                .expect("lock")
                .is_none()
        );
        assert!(
            state
                .try_lock(&c, request(0, Some(10), 10))
                .await
                .expect("lock")
                .is_none(),
            "not later"
        );
        assert!(
            state
                .try_lock(&c, request(0, Some(10), 12))
                .await
                .expect("lock")
                .is_some()
        );
        // Only the current lock finishes a batch; finishing commits and unlocks.
        assert!(
            !state
                .finish(&c, 0, 10, Some(5), RetryFate::Done)
                .await
                .expect("finish")
                .durably()
                .await
                .expect("finish")
        );
        assert!(
            state
                .finish(&c, 0, 12, Some(5), RetryFate::Done)
                .await
                .expect("finish")
                .durably()
                .await
                .expect("finish")
        );
        let snap = state.snapshot(&c, 2).await.expect("snapshot");
        assert_eq!(
            (snap.queues.len(), snap.queues[0].committed, snap.queues[0].lock_time),
            (2, Some(5), None)
        );
        assert!(
            !state
                .finish(&c, 0, 12, Some(9), RetryFate::Done)
                .await
                .expect("finish")
                .durably()
                .await
                .expect("finish"),
            "twice"
        );
        // No ABA: after lock and release, a lock time not later than the last pull is refused.
        assert!(state.try_lock(&c, request(0, None, 12)).await.expect("lock").is_none());
        // Retry entries: claimed with a lock, freed by an unlock, deleted by an ack.
        let location = MessageLocation {
            topic: "t".into(),
            queue: 1,
            offset: 0,
        };
        state.add_retry(&c, [1; 16], location).await.expect("retry");
        let seq = state.snapshot(&c, 2).await.expect("snapshot").retries[0].seq;
        let mut claim = request(1, None, 20);
        claim.claim_retries = vec![(seq, None)];
        let grant = state.try_lock(&c, claim).await.expect("lock").expect("granted");
        assert_eq!(grant.retries.len(), 1);
        assert!(
            state
                .finish(&c, 1, 20, None, RetryFate::Free)
                .await
                .expect("unlock")
                .durably()
                .await
                .expect("unlock")
        );
        assert_eq!(
            state.snapshot(&c, 2).await.expect("snapshot").retries[0].in_flight,
            None
        );
        let mut claim = request(1, None, 21);
        claim.claim_retries = vec![(seq, Some((9, 9)))];
        let grant = state.try_lock(&c, claim).await.expect("lock").expect("granted");
        assert!(
            grant.retries.is_empty(),
            "a retry is claimed only if its mark is as seen"
        );
        assert!(
            state
                .finish(&c, 1, 21, None, RetryFate::Free)
                .await
                .expect("unlock")
                .durably()
                .await
                .expect("unlock")
        );
        let mut claim = request(1, None, 22);
        claim.claim_retries = vec![(seq, None)];
        assert_eq!(
            state
                .try_lock(&c, claim)
                .await
                .expect("lock")
                .expect("granted")
                .retries
                .len(),
            1
        );
        assert!(
            state
                .finish(&c, 1, 22, Some(1), RetryFate::Done)
                .await
                .expect("ack")
                .durably()
                .await
                .expect("ack")
        );
        assert!(state.snapshot(&c, 2).await.expect("snapshot").retries.is_empty());
        // An operator's reset sets the offset and leaves a lock in place; that lock's batch then
        // finishes as the engine decides (it sees the new offset).
        assert!(state.try_lock(&c, request(1, None, 30)).await.expect("lock").is_some());
        state.set_committed(&c, 1, 40).await.expect("reset");
        let snap = state.snapshot(&c, 2).await.expect("snapshot");
        assert_eq!(
            (snap.queues[1].committed, snap.queues[1].lock_time),
            (Some(40), Some(30))
        );
        assert!(
            state
                .finish(&c, 1, 30, None, RetryFate::Free)
                .await
                .expect("unlock")
                .durably()
                .await
                .expect("unlock")
        );
        // A lock's own timeout is kept with it, read back with it, and goes when it is released;
        // the next lock without one has none.
        let mut timed = request(1, None, 31);
        timed.timeout_ms = Some(15_000);
        let grant = state.try_lock(&c, timed).await.expect("lock").expect("granted");
        assert_eq!(grant.state.lock_timeout_ms, Some(15_000));
        let snap = state.snapshot(&c, 2).await.expect("snapshot");
        assert_eq!(
            (snap.queues[1].lock_time, snap.queues[1].lock_timeout_ms),
            (Some(31), Some(15_000))
        );
        assert!(
            state
                .finish(&c, 1, 31, None, RetryFate::Free)
                .await
                .expect("unlock")
                .durably()
                .await
                .expect("unlock")
        );
        assert_eq!(
            state.snapshot(&c, 2).await.expect("snapshot").queues[1].lock_timeout_ms,
            None
        );
        let grant = state
            .try_lock(&c, request(1, None, 32))
            .await
            .expect("lock")
            .expect("granted");
        assert_eq!(grant.state.lock_timeout_ms, None);
        let snap = state.snapshot(&c, 2).await.expect("snapshot");
        assert_eq!(
            (snap.queues[1].lock_time, snap.queues[1].lock_timeout_ms),
            (Some(32), None)
        );
        assert!(
            state
                .finish(&c, 1, 32, None, RetryFate::Free)
                .await
                .expect("unlock")
                .durably()
                .await
                .expect("unlock")
        );
        // Round-robin turns: one sequence per topic.
        assert_eq!(state.next_turn("t").await.expect("turn"), 0);
        assert_eq!(state.next_turn("t").await.expect("turn"), 1);
        assert_eq!(state.next_turn("u").await.expect("turn"), 0);
        assert_eq!(state.next_turn("t").await.expect("turn"), 2);
        // Settings and broadcast clients.
        let s = ConsumerSettings {
            paused: true,
            rate_limit_enabled: false,
            limit_rate: 7,
            consume_timeout_ms: Some(20_000),
            max_pull_size: None,
        };
        state.put_settings("g", s.clone()).await.expect("settings");
        assert_eq!(state.settings("g").await.expect("settings"), Some(s));
        let b = ContextKey {
            client_id: Some("c1".into()),
            ..ctx()
        };
        assert!(state.admit_client(&b, 1, 2).await.expect("admit"));
        state.touch(&b, 0, 1, None).await.expect("touch");
        assert_eq!(state.client_ids("t", "g").await.expect("ids"), ["c1"]);
        // A group's clients are capped; a known client is always admitted (and seen again).
        let client = |id: &str| ContextKey {
            client_id: Some(id.into()),
            ..ctx()
        };
        assert!(state.admit_client(&client("c2"), 5, 2).await.expect("admit"));
        assert!(!state.admit_client(&client("c3"), 5, 2).await.expect("admit"), "full");
        assert!(state.admit_client(&client("c1"), 9, 2).await.expect("admit"), "known");
        // Idle clients are forgotten with their state; the others stay.
        assert!(
            state
                .try_lock(&client("c2"), request(0, None, 6))
                .await
                .expect("lock")
                .is_some()
        );
        assert_eq!(state.forget_idle_clients("t", "g", 8).await.expect("forget"), 1);
        assert_eq!(state.client_ids("t", "g").await.expect("ids"), ["c1"]);
        let gone = state.snapshot(&client("c2"), 1).await.expect("snapshot");
        assert_eq!((gone.queues[0].lock_time, gone.queues[0].last_pull_ms), (None, 0));
        assert!(
            state.admit_client(&client("c3"), 10, 2).await.expect("admit"),
            "room again"
        );
    }

    #[tokio::test]
    async fn local_state_keeps_the_contract_and_survives_reload() {
        use crate::embedded::{EmbeddedConfig, EmbeddedSettings, EmbeddedStore};
        let dir = tempfile::tempdir().expect("tmp");
        let config = EmbeddedConfig {
            data_dir: dir.path().to_path_buf(),
            topics: vec![("t".into(), 2)],
            broker_name: "broker-a".into(),
            settings: EmbeddedSettings {
                group_commit_max: 64,
                cache_mib: 8,
                min_free_disk_mib: 0,
                ..EmbeddedSettings::default()
            },
        };
        let store = EmbeddedStore::open(config.clone()).expect("open");
        let state = LocalConsumerState::load(Arc::new(store.clone())).expect("load");
        check(&state).await;
        store.close();
        // The database file is released when the last handle goes.
        drop((state, store));
        let store = EmbeddedStore::open(config).expect("reopen");
        let state = LocalConsumerState::load(Arc::new(store.clone())).expect("reload");
        let snap = state.snapshot(&ctx(), 2).await.expect("snapshot");
        assert_eq!(
            (snap.queues[0].committed, snap.queues[1].committed),
            (Some(5), Some(40)),
            "commits are durable"
        );
        assert_eq!(
            state.settings("g").await.expect("settings").map(|s| s.limit_rate),
            Some(7)
        );
        store.close();
    }
}
