//! Operators' view of consumer offsets (per queue: range, committed offset, lag, lock, last
//! pull) and their resets (to a time, or to the newest offset: skip the backlog).

use crate::{ConsumeMode, ConsumerSpec, Engine, EngineError};
use mqproxy_store::ContextKey;

/// One queue of one consumer context.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueView {
    pub broker_name: String,
    pub queue_id: u32,
    pub min_offset: u64,
    pub max_offset: u64,
    pub committed: Option<u64>,
    /// Messages not yet consumed: max minus where the next pull starts.
    pub lag: u64,
    pub lock_time: Option<u64>,
    pub last_pull_ms: u64,
    pub client_ip: Option<String>,
}

/// The queues of one context: the consumer group (clustering) or one clientId (broadcast).
#[derive(Debug, Clone, PartialEq)]
pub struct ContextView {
    pub client_id: Option<String>,
    pub lag: u64,
    pub queues: Vec<QueueView>,
}

/// A client seen pulling: its clientId (broadcast), address and last pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectedClient {
    pub client_id: Option<String>,
    pub client_ip: String,
    pub last_seen_ms: u64,
}

/// A consumer's offsets.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerOffsets {
    pub consumer: String,
    pub topic: String,
    pub mode: ConsumeMode,
    /// Total lag (clustering), or the largest lag of one clientId (broadcast), over every
    /// context, not only the page.
    pub lag: u64,
    /// How many contexts there are; `contexts` holds the page asked for.
    pub context_count: usize,
    pub contexts: Vec<ContextView>,
    /// Clients seen pulling (the last client of each queue), most recent first.
    pub connected: Vec<ConnectedClient>,
}

/// What `/metrics` shows of a broadcast consumer's lag.
#[derive(Debug, Default)]
pub(crate) struct BroadcastLag {
    pub clients: usize,
    /// (broker, queue id) -> (sum, max) of the clients' lag.
    pub per_queue: std::collections::BTreeMap<(String, u32), (u64, u64)>,
    /// The most lagging clients, most lagging first.
    pub top: Vec<ContextView>,
}

/// A page of a broadcast consumer's clientIds (sorted), from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientPage {
    pub page: u32,
    pub size: u32,
}

impl ClientPage {
    /// How many entries come before this page.
    fn skip(self) -> usize {
        (self.page.max(1) as usize - 1).saturating_mul(self.size as usize)
    }
}

impl Default for ClientPage {
    fn default() -> Self {
        Self { page: 1, size: 100 }
    }
}

/// One queue of a topic, as an operator names it (broker optional with a single broker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSelector {
    pub broker_name: Option<String>,
    pub queue_id: u32,
}

/// One POP segment handed out and not yet acknowledged (the console's `pop/ack` views).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PopSegmentView {
    /// Broadcast consumers: whose segment it is.
    pub client_id: Option<String>,
    pub broker_name: String,
    pub queue_id: u32,
    pub offset: u64,
    pub next_offset: u64,
    pub lock_time: u64,
    /// Its messages are gone from the queue (retention): acknowledging it only moves the offset.
    pub force_ack: bool,
    /// When it is handed out again unless acknowledged (its lock time if it was given back).
    pub expire_time: u64,
    /// Acknowledges it (`/mq/ack?pop=true`: the console's "skip").
    pub request_id: String,
    /// How often it was handed out again.
    pub retry_times: u32,
    pub client_ip: Option<String>,
}

/// A consumer's POP segments in flight: one page of them, and how many there are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PopSegments {
    pub mode: ConsumeMode,
    pub total: usize,
    pub segments: Vec<PopSegmentView>,
}

/// Where a reset moves the committed offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    /// To the first message stored at or after this time (epoch ms).
    Timestamp(u64),
    /// To the newest offset: skip the backlog.
    Newest,
}

impl Engine {
    /// The contexts of a consumer an operator names: the group, one clientId, or every
    /// clientId seen so far.
    pub(crate) async fn operator_contexts(
        &self,
        spec: &ConsumerSpec,
        client_id: Option<&str>,
    ) -> Result<Vec<ContextKey>, EngineError> {
        let context = |client_id: Option<String>| ContextKey {
            topic: spec.topic.clone(),
            group: spec.name.clone(),
            client_id,
        };
        let client_id = client_id.map(str::trim).filter(|c| !c.is_empty());
        Ok(match (spec.mode, client_id) {
            (ConsumeMode::Clustering, None) => vec![context(None)],
            (ConsumeMode::Clustering, Some(_)) => {
                return Err(EngineError::invalid(format!("consumer:{} no need clientId", spec.name)));
            }
            (ConsumeMode::Broadcast, Some(c)) => vec![context(Some(c.to_owned()))],
            (ConsumeMode::Broadcast, None) => self
                .inner
                .consuming
                .state
                .client_ids(&spec.topic, &spec.name)
                .await?
                .into_iter()
                .map(|c| context(Some(c)))
                .collect(),
        })
    }

    async fn context_view(&self, key: &ContextKey) -> Result<ContextView, EngineError> {
        let refs = self.inner.messages.queues(&key.topic);
        let n = u32::try_from(refs.len()).unwrap_or(u32::MAX);
        let snapshot = self.inner.consuming.state.snapshot(key, n).await?;
        let queues: Vec<QueueView> = refs
            .iter()
            .zip(&snapshot.queues)
            .enumerate()
            .map(|(i, (r, q))| {
                let range = self.inner.messages.queue_range(&key.topic, i as u32);
                let next = q.committed.unwrap_or(range.min).max(range.min);
                QueueView {
                    broker_name: r.broker_name.clone(),
                    queue_id: r.queue_id,
                    min_offset: range.min,
                    max_offset: range.max,
                    committed: q.committed,
                    lag: range.max.saturating_sub(next),
                    lock_time: q.lock_time,
                    last_pull_ms: q.last_pull_ms,
                    client_ip: q.client_ip.clone(),
                }
            })
            .collect();
        Ok(ContextView {
            client_id: key.client_id.clone(),
            lag: queues.iter().map(|q| q.lag).sum(),
            queues,
        })
    }

    /// Every queue's offsets, lag, lock and last pull, per context.
    ///
    /// # Errors
    /// Unknown consumer, a clientId for a clustering consumer, or a store failure.
    /// `page`: one page of the contexts (None: all; their number is bounded by
    /// `max_broadcast_clients`).
    pub async fn consumer_offsets(
        &self,
        consumer: &str,
        client_id: Option<&str>,
        page: Option<ClientPage>,
    ) -> Result<ConsumerOffsets, EngineError> {
        let spec = self.registered_consumer(consumer)?;
        let keys = self.operator_contexts(&spec, client_id).await?;
        let context_count = keys.len();
        let (skip, take) = page.map_or((0, usize::MAX), |p| (p.skip(), p.size as usize));
        // One view at a time: only the page is kept, whatever the number of clients.
        let (mut lag, mut contexts) = (0, Vec::new());
        for (i, key) in keys.iter().enumerate() {
            let view = self.context_view(key).await?;
            lag = lag.max(view.lag);
            if i >= skip && contexts.len() < take {
                contexts.push(view);
            }
        }
        let mut seen: std::collections::HashMap<(Option<String>, String), u64> = std::collections::HashMap::new();
        for c in &contexts {
            for q in &c.queues {
                if let Some(ip) = &q.client_ip {
                    let last = seen.entry((c.client_id.clone(), ip.clone())).or_default();
                    *last = (*last).max(q.last_pull_ms);
                }
            }
        }
        let mut connected: Vec<ConnectedClient> = seen
            .into_iter()
            .map(|((client_id, client_ip), last_seen_ms)| ConnectedClient {
                client_id,
                client_ip,
                last_seen_ms,
            })
            .collect();
        connected.sort_by(|a, b| {
            b.last_seen_ms
                .cmp(&a.last_seen_ms)
                .then_with(|| a.client_ip.cmp(&b.client_ip))
        });
        Ok(ConsumerOffsets {
            consumer: spec.name.clone(),
            topic: spec.topic.clone(),
            mode: spec.mode,
            lag,
            context_count,
            contexts,
            connected,
        })
    }

    /// The POP segments in flight of a consumer (or of one broadcast clientId), ordered by
    /// clientId, queue and offset; `page` picks a page of them (default: the first 100).
    ///
    /// # Errors
    /// Unknown consumer, a clientId for a clustering consumer, or a store failure.
    pub async fn pop_segments(
        &self,
        consumer: &str,
        client_id: Option<&str>,
        page: Option<ClientPage>,
    ) -> Result<PopSegments, EngineError> {
        let spec = self.registered_consumer(consumer)?;
        let keys = self.operator_contexts(&spec, client_id).await?;
        let refs = self.inner.messages.queues(&spec.topic);
        let queues = u32::try_from(refs.len()).unwrap_or(u32::MAX);
        let mut segments = Vec::new();
        for key in &keys {
            let snapshot = self.inner.consuming.state.snapshot(key, queues).await?;
            for ((queue, pop), r) in (0u32..).zip(&snapshot.pop).zip(refs.iter()) {
                let first = self.inner.messages.queue_range(&spec.topic, queue).min;
                let mut in_order: Vec<_> = pop.segments.iter().collect();
                in_order.sort_by_key(|s| (s.offset, s.lock_time));
                for s in in_order {
                    let force_ack = s.next_offset <= first && s.next_offset > s.offset;
                    let token = crate::request_id::BatchToken {
                        broker_name: r.broker_name.clone(),
                        queue_id: r.queue_id,
                        offset: s.offset,
                        next_offset: s.next_offset,
                        lock_time: s.lock_time,
                        force_ack,
                        pop: true,
                    };
                    segments.push(PopSegmentView {
                        client_id: key.client_id.clone(),
                        broker_name: r.broker_name.clone(),
                        queue_id: r.queue_id,
                        offset: s.offset,
                        next_offset: s.next_offset,
                        lock_time: s.lock_time,
                        force_ack,
                        expire_time: s.expires_ms(),
                        request_id: crate::request_id::encode(&token, &self.inner.consuming.request_id_keys, key),
                        retry_times: s.retry_times,
                        client_ip: s.client_ip.clone(),
                    });
                }
            }
        }
        let total = segments.len();
        let page = page.unwrap_or_default();
        Ok(PopSegments {
            mode: spec.mode,
            total,
            segments: segments
                .into_iter()
                .skip(page.skip())
                .take(page.size as usize)
                .collect(),
        })
    }

    /// A broadcast consumer's lag for `/metrics`: its number of clients, per queue the sum and
    /// the max over them, and the `top` most lagging clients' views (in memory one view at a
    /// time plus those, whatever the number of clients).
    pub(crate) async fn broadcast_lag(&self, spec: &ConsumerSpec, top: usize) -> Result<BroadcastLag, EngineError> {
        let keys = self.operator_contexts(spec, None).await?;
        let mut summary = BroadcastLag {
            clients: keys.len(),
            ..BroadcastLag::default()
        };
        let most_lagging_first =
            |a: &ContextView, b: &ContextView| b.lag.cmp(&a.lag).then_with(|| a.client_id.cmp(&b.client_id));
        for key in &keys {
            let view = self.context_view(key).await?;
            for q in &view.queues {
                let (sum, max) = summary
                    .per_queue
                    .entry((q.broker_name.clone(), q.queue_id))
                    .or_default();
                *sum = sum.saturating_add(q.lag);
                *max = (*max).max(q.lag);
            }
            if top > 0 {
                summary.top.push(view);
                if summary.top.len() >= 2 * top {
                    summary.top.sort_by(most_lagging_first);
                    summary.top.truncate(top);
                }
            }
        }
        summary.top.sort_by(most_lagging_first);
        summary.top.truncate(top);
        Ok(summary)
    }

    /// Moves committed offsets to a time or to the newest offset; locks stay (a batch handed
    /// out before can no longer commit).
    ///
    /// # Errors
    /// Unknown consumer, a clientId for a clustering consumer, or a store failure.
    pub async fn reset_offsets(
        &self,
        consumer: &str,
        client_id: Option<&str>,
        to: OffsetReset,
        only: Option<QueueSelector>,
    ) -> Result<ConsumerOffsets, EngineError> {
        let spec = self.registered_consumer(consumer)?;
        let keys = self.operator_contexts(&spec, client_id).await?;
        let refs = self.inner.messages.queues(&spec.topic);
        let chosen: Vec<u32> = (0..u32::try_from(refs.len()).unwrap_or(u32::MAX))
            .filter(|&i| {
                only.as_ref().is_none_or(|sel| {
                    let r = &refs[i as usize];
                    r.queue_id == sel.queue_id && sel.broker_name.as_ref().is_none_or(|b| *b == r.broker_name)
                })
            })
            .collect();
        if let (Some(sel), true) = (&only, chosen.is_empty()) {
            return Err(EngineError::invalid(format!(
                "topic {} has no queue {}{}",
                spec.topic,
                sel.broker_name.as_deref().map(|b| format!("{b}:")).unwrap_or_default(),
                sel.queue_id
            )));
        }
        for queue in chosen {
            let offset = match to {
                OffsetReset::Newest => self.inner.messages.queue_range(&spec.topic, queue).max,
                OffsetReset::Timestamp(ts) => self.inner.messages.search_offset(&spec.topic, queue, ts).await?,
            };
            for key in &keys {
                self.inner.consuming.state.set_committed(key, queue, offset).await?;
            }
        }
        tracing::info!(
            consumer,
            client_id,
            ?to,
            contexts = keys.len(),
            "consumer offsets reset"
        );
        self.inner.consuming.notify(&spec.topic);
        self.consumer_offsets(consumer, client_id, Some(ClientPage::default()))
            .await
    }
}
