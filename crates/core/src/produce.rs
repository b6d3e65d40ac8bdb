//! Producing: checks, the delay or delivery time, the queue (orderId hash or in turn, skipping
//! a broker that just failed), msgIds, one failover to another broker, the receipts.

use super::{Engine, EngineConfig, EngineError, ProduceRequest, ProduceSettings, SendReceipt, TopicSpec};
use super::{ids, limits, metrics};
use ids::MsgIdGenerator;
use mqproxy_store::consumer_state::ConsumerStateStore;
use mqproxy_store::{AppendOutcome, Delivery, NewRecord, QueueRef, StoreIdentity};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// What one message adds to a batch besides its body (RocketMQ's batch encoding: sizes, flag,
/// properties with the msgId), counted against the backend's batch size.
const BATCH_OVERHEAD_BYTES: usize = 256;

/// The producing service's state.
pub(crate) struct ProduceState {
    settings: ProduceSettings,
    region_id: String,
    /// IPv4 address and port of this server, the first half of every offsetMsgId.
    store_host: [u8; 8],
    ids: MsgIdGenerator,
    /// The turn of unordered sends over a topic's queues.
    round_robin: AtomicU32,
    /// Where `roundRobin` produces take their turn (per topic, shared by proxies on Redis).
    turns: Arc<dyn ConsumerStateStore>,
}

impl ProduceState {
    pub(crate) fn new(config: &EngineConfig, identity: &StoreIdentity, turns: Arc<dyn ConsumerStateStore>) -> Self {
        Self {
            settings: config.produce,
            region_id: config.region_id.clone(),
            store_host: config.store_host,
            ids: MsgIdGenerator::new(identity),
            round_robin: AtomicU32::new(0),
            turns,
        }
    }
}

impl Engine {
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
                let limit = now + self.inner.producing.settings.max_delivery_delay_ms;
                if ts > limit {
                    return Err(EngineError::invalid(format!(
                        "deliveryTimestamp {ts} is more than {} ms ahead (limit {limit})",
                        self.inner.producing.settings.max_delivery_delay_ms
                    )));
                }
                Ok(if ts > now { Delivery::At(ts) } else { Delivery::Now })
            }
            (None, None) => Ok(Delivery::Now),
        }
    }

    /// The queue of a `roundRobin` produce: the topic's next turn, strictly (a queue of a broker
    /// that just failed is not skipped: the failover of the send still applies).
    async fn strict_turn_queue(&self, topic: &TopicSpec) -> Result<(u32, QueueRef), EngineError> {
        let queues = self.inner.messages.queues(&topic.name);
        let n = queues.len() as u64;
        if n == 0 {
            return self.pick_queue(topic, None);
        }
        let turn = self.inner.producing.turns.next_turn(&topic.name).await?;
        let index = u32::try_from(turn % n).unwrap_or(0);
        Ok((index, queues[index as usize].clone()))
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
                let start = self.inner.producing.round_robin.fetch_add(1, Ordering::Relaxed) % n;
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
            self.inner.producing.round_robin.fetch_add(1, Ordering::Relaxed)
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
        let producing = &self.inner.producing;
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
                .unwrap_or_else(|| ids::offset_msg_id(producing.store_host, appended.store_seq)),
            region_id: outcome.region_id.clone().unwrap_or_else(|| producing.region_id.clone()),
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

    async fn produce_one(&self, topic: &TopicSpec, req: ProduceRequest) -> Result<SendReceipt, EngineError> {
        Self::check_body(&req.body)?;
        let now = self.now_ms();
        let delivery = self.delivery(req.delay_level, req.delivery_timestamp_ms, now)?;
        let order_id = req.order_id.as_deref().map(str::trim).filter(|o| !o.is_empty());
        let chosen = match (req.round_robin, order_id) {
            (true, Some(_)) => {
                return Err(EngineError::invalid(
                    "roundRobin and orderId cannot be used together: orderId picks the queue",
                ));
            }
            (true, None) => self.strict_turn_queue(topic).await?,
            (false, _) => self.pick_queue(topic, order_id)?,
        };
        let lite_topics = if req.lite_topics.iter().any(|l| !l.trim().is_empty()) {
            if delivery != Delivery::Now {
                return Err(EngineError::invalid(
                    "liteTopics cannot be used with delayLevel or a future deliveryTimestamp: a lite message is delivered at once",
                ));
            }
            self.open_lite_topics(topic, &req.lite_topics).await?
        } else {
            Vec::new()
        };
        let born_host = limits::client_address(req.client_ip);
        let msg_id = self.inner.producing.ids.next();
        let keys = req.keys.filter(|k| !k.is_empty());
        let record = NewRecord {
            msg_id,
            keys,
            born_ms: now,
            born_host,
            body: req.body,
            lite_topics,
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
        client_ip: Option<String>,
    ) -> Result<Vec<Result<SendReceipt, EngineError>>, EngineError> {
        let count = bodies.len() as u64;
        let results = self.produce_batch_elements(topic, bodies, client_ip).await;
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
        client_ip: Option<String>,
    ) -> Result<Vec<Result<SendReceipt, EngineError>>, EngineError> {
        if bodies.is_empty() {
            return Err(EngineError::invalid("messages is an empty array"));
        }
        let born_host = limits::client_address(client_ip);
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
                        msg_id: self.inner.producing.ids.next(),
                        keys: None,
                        born_ms: now,
                        born_host: born_host.clone(),
                        body,
                        lite_topics: Vec::new(),
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
