//! `impl MqApi for HttpAdapter`: one short method per handler of the spec. Converts
//! parameters to engine requests and engine results to the seed's reply shapes.

use super::api::{
    AckParams, BatchReply, BroadcastPopSegmentsParams, BroadcastQueueOffsetsParams, BroadcastQueueOffsetsReply,
    ClientOffsets, ClusteringPopSegmentsParams, ClusteringQueueOffsetsParams, ConfigureConsumerParams,
    ConsumerConfigParams, ConsumerConfigReply, ConsumerEntry, ConsumerOffsetsParams, ConsumerOffsetsReply,
    ConsumerSettings, DeleteConsumerParams, DeleteProducerParams, DeleteTopicParams, FetchParams, FetchReply,
    FetchResult, HealthzParams, Message, MessageParams, MessageQueue, MessageReply, MqApi, PopSegment,
    PopSegmentsReply, ProduceBatchParams, ProduceParams, ProduceReply, ProducerEntry, PutConsumerParams,
    PutProducerParams, PutTopicParams, QueueInfo, QueueOffset, QueueOffsetsReply, ReadyzParams, Registry,
    RegistryParams, RegistryReply, ResetOffsetsParams, SendResult, StatusReply, StoredMessageInfo, StreamParams,
    TopicEntry, UnlockParams,
};
use super::support::{Envelope, Reply, RequestContext, batch_bodies, bearer_token};
use crate::engine::{
    AccessToken, ClientPage, ConsumeMode, ConsumeTarget, ConsumerCall, ConsumerSpec, Delivered, Engine, EngineError,
    ErrorKind, FetchRequest, OffsetReset, PopSegments, ProduceRequest, ProducerCall, QueueSelector, QueueView,
    RegistryView, SendReceipt, SettingsChange, Subscription, TokenChange, limits,
};
use axum::http::header;

/// The cookie that carries the requestId with `useCookie=true`.
const RID_COOKIE: &str = "rid";

/// The HTTP adapter: holds the engine, nothing else.
#[derive(Clone)]
pub(crate) struct HttpAdapter {
    pub engine: Engine,
}

fn error_status(e: &EngineError) -> i32 {
    e.kind().status()
}

/// The engine error as the seed's envelope: its row of the engine's error table, logged there.
fn fail<T: Envelope>(e: &EngineError) -> Reply<T> {
    e.log_answered("http", "request");
    Reply::new(T::error(error_status(e), e.to_string()))
}

/// What an ack or unlock did (200 and its message), or why it failed (its envelope status,
/// logged as `operation`): the `StatusReply` of an outcome that rides on another answer.
pub(super) fn outcome_reply(outcome: Result<String, EngineError>, operation: &str) -> StatusReply {
    match outcome {
        Ok(message) => StatusReply {
            status: 200,
            message: Some(message),
        },
        Err(e) => {
            e.log_answered("http", operation);
            StatusReply {
                status: error_status(&e),
                message: Some(e.to_string()),
            }
        }
    }
}

fn send_result(r: SendReceipt) -> SendResult {
    SendResult {
        send_status: r.status.as_str().to_owned(),
        msg_id: r.msg_id,
        message_queue: message_queue(r.topic, r.broker_name, r.queue_id),
        queue_offset: r.queue_offset as i64,
        offset_msg_id: r.offset_msg_id,
        region_id: r.region_id,
        trace_on: r.trace_on,
    }
}

/// A body as JSON text: the stored bytes themselves when they are UTF-8 (no copy), else with
/// U+FFFD for what is not (the contract's bodies are text; a gRPC producer may store any bytes).
fn body_text(body: Vec<u8>) -> String {
    String::from_utf8(body).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn message(d: Delivered) -> Message {
    Message {
        message_id: d.msg_id,
        message: body_text(d.body),
        timestamp: d.store_ms as i64,
    }
}

/// The requestId of a consume call: the parameter, else (useCookie) the `rid` cookie.
fn request_id(param: Option<String>, use_cookie: bool, ctx: &RequestContext) -> Option<String> {
    param.or_else(|| {
        if !use_cookie {
            return None;
        }
        ctx.headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(cookie::Cookie::split_parse)
            .filter_map(Result::ok)
            .find(|c| c.name() == RID_COOKIE && !c.value().is_empty())
            .map(|c| c.value().to_owned())
    })
}

/// The clientIp parameter, else X-Forwarded-For (first), else X-Real-IP, else the socket: the
/// consumer's address kept with its queue, the producer's stored with its message.
fn client_ip(param: Option<String>, ctx: &RequestContext) -> Option<String> {
    let header_value = |name: &str| {
        ctx.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    param
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .or_else(|| header_value("x-forwarded-for"))
        .or_else(|| header_value("x-real-ip"))
        .or_else(|| ctx.peer.map(|p| p.ip().to_string()))
}

/// An admin form's `accessToken` / `clearAccessToken`: neither keeps the entry's token.
fn token_change(access_token: Option<String>, clear: Option<bool>) -> Result<TokenChange, EngineError> {
    match (access_token, clear.unwrap_or(false)) {
        (None, false) => Ok(TokenChange::Keep),
        (None, true) => Ok(TokenChange::Clear),
        (Some(t), false) => Ok(TokenChange::Set(AccessToken::from_secret(&t))),
        (Some(_), true) => Err(EngineError::invalid(
            "give accessToken or clearAccessToken=true, not both",
        )),
    }
}

/// The page a view asks for: None when it gives neither `page` nor `pageSize` (their ranges
/// are checked by the generated code).
fn client_page(page: Option<i32>, page_size: Option<i32>) -> Option<ClientPage> {
    if page.is_none() && page_size.is_none() {
        return None;
    }
    let default = ClientPage::default();
    Some(ClientPage {
        page: page.and_then(|p| u32::try_from(p).ok()).unwrap_or(default.page),
        size: page_size.and_then(|p| u32::try_from(p).ok()).unwrap_or(default.size),
    })
}

fn target(topic: String, consumer: String, client_id: Option<String>, lite_topic: Option<String>) -> ConsumeTarget {
    ConsumeTarget {
        topic,
        consumer,
        client_id,
        lite_topic,
    }
}

impl HttpAdapter {
    /// The request's producer, once it accepted the access token the request presents (the
    /// bearer header, else the `token` parameter).
    fn producer(&self, name: &str, param: Option<&str>, ctx: &RequestContext) -> Result<ProducerCall<'_>, EngineError> {
        self.engine.producer(name, bearer_token(&ctx.headers).or(param))
    }

    /// The request's consumer, as [`HttpAdapter::producer`].
    fn consumer(
        &self,
        target: ConsumeTarget,
        param: Option<&str>,
        ctx: &RequestContext,
    ) -> Result<ConsumerCall<'_>, EngineError> {
        self.engine.consumer(target, bearer_token(&ctx.headers).or(param))
    }

    async fn configure(&self, consumer: &str, change: SettingsChange) -> Reply<ConsumerConfigReply> {
        match self.engine.configure_consumer(consumer, change).await {
            Ok(v) => Reply::new(ConsumerConfigReply {
                status: 200,
                message: None,
                result: Some(ConsumerSettings {
                    consumer: v.consumer,
                    topic: v.topic,
                    mode: v.mode.as_str().to_owned(),
                    paused: v.settings.paused,
                    rate_limit_enabled: v.settings.rate_limit_enabled,
                    limit_rate: v.settings.limit_rate as i64,
                    max_pull_size: v.max_pull_size as i32,
                    consume_timeout_ms: v.consume_timeout_ms as i64,
                    retry_queued: Some(v.retry_queued as i32),
                }),
            }),
            Err(e) => fail(&e),
        }
    }

    fn offsets_reply(
        &self,
        result: Result<crate::engine::ConsumerOffsets, EngineError>,
    ) -> Reply<ConsumerOffsetsReply> {
        match result {
            Ok(o) => Reply::new(ConsumerOffsetsReply {
                status: 200,
                message: None,
                result: Some(super::api::ConsumerOffsets {
                    mode: o.mode.as_str().to_owned(),
                    lag: to_i64(o.lag),
                    client_count: Some(to_i64(o.context_count as u64)),
                    clients: o
                        .contexts
                        .into_iter()
                        .map(|c| ClientOffsets {
                            lag: Some(to_i64(c.lag)),
                            queues: c.queues.iter().map(|q| queue_offset(&o.topic, q)).collect(),
                            client_id: c.client_id,
                        })
                        .collect(),
                    connected: Some(
                        o.connected
                            .into_iter()
                            .map(|c| super::api::ConnectedClient {
                                client_id: c.client_id,
                                client_ip: c.client_ip,
                                last_seen: to_i64(c.last_seen_ms),
                            })
                            .collect(),
                    ),
                    consumer: o.consumer,
                    topic: o.topic,
                }),
            }),
            Err(e) => fail(&e),
        }
    }

    fn registry_reply(&self, result: Result<RegistryView, EngineError>) -> Reply<RegistryReply> {
        let view = match result {
            Ok(v) => v,
            Err(e) => return fail(&e),
        };
        Reply::new(RegistryReply {
            status: 200,
            message: None,
            result: Some(Registry {
                topics: view
                    .topics
                    .iter()
                    .map(|t| TopicEntry {
                        name: t.name.clone(),
                        lite: t.lite,
                        queues: self
                            .engine
                            .topic_queues(&t.name)
                            .into_iter()
                            .map(|q| message_queue(t.name.clone(), q.broker_name, q.queue_id))
                            .collect(),
                    })
                    .collect(),
                producers: view
                    .producers
                    .into_iter()
                    .map(|p| ProducerEntry {
                        token_required: Some(p.token.is_some()),
                        name: p.name,
                        topic: p.topic,
                    })
                    .collect(),
                consumers: view
                    .consumers
                    .into_iter()
                    .map(|c| ConsumerEntry {
                        token_required: Some(c.token.is_some()),
                        mode: c.mode.as_str().to_owned(),
                        name: c.name,
                        topic: c.topic,
                    })
                    .collect(),
            }),
        })
    }

    /// The Java proxy's queue views: the consumer's queue records, for one mode.
    async fn queue_records(
        &self,
        consumer: &str,
        mode: ConsumeMode,
        page: Option<ClientPage>,
    ) -> Result<Vec<(Option<String>, Vec<QueueOffset>)>, EngineError> {
        let o = self.engine.consumer_offsets(consumer, None, page).await?;
        expect_mode(consumer, o.mode, mode)?;
        Ok(o.contexts
            .into_iter()
            .map(|c| {
                (
                    c.client_id,
                    c.queues.iter().map(|q| queue_offset(&o.topic, q)).collect(),
                )
            })
            .collect())
    }
}

/// The Java proxy's views are per mode: a consumer of the other mode is a 400.
fn expect_mode(consumer: &str, actual: ConsumeMode, wanted: ConsumeMode) -> Result<(), EngineError> {
    if actual == wanted {
        Ok(())
    } else {
        Err(EngineError::InvalidArgument(format!(
            "consumer:{consumer} is a {} consumer",
            actual.as_str()
        )))
    }
}

fn pop_segments_reply(
    consumer: &str,
    wanted: ConsumeMode,
    found: Result<PopSegments, EngineError>,
) -> Reply<PopSegmentsReply> {
    let found = found.and_then(|f| expect_mode(consumer, f.mode, wanted).map(|()| f));
    match found {
        Ok(f) => Reply::new(PopSegmentsReply {
            status: 200,
            message: Some(format!("{} segments in flight", f.total)),
            result: Some(
                f.segments
                    .into_iter()
                    .map(|s| PopSegment {
                        client_id: s.client_id,
                        broker_name: s.broker_name,
                        queue_id: i32::try_from(s.queue_id).unwrap_or(i32::MAX),
                        offset: to_i64(s.offset),
                        next_offset: to_i64(s.next_offset),
                        lock_time: to_i64(s.lock_time),
                        force_ack: s.force_ack,
                        expire_time: to_i64(s.expire_time),
                        request_id: s.request_id,
                        retry_times: i32::try_from(s.retry_times).unwrap_or(i32::MAX),
                        client_ip: s.client_ip,
                    })
                    .collect(),
            ),
        }),
        Err(e) => fail(&e),
    }
}

fn message_queue(topic: String, broker_name: String, queue_id: u32) -> MessageQueue {
    MessageQueue {
        topic,
        broker_name,
        queue_id: i32::try_from(queue_id).unwrap_or(i32::MAX),
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn queue_offset(topic: &str, q: &QueueView) -> QueueOffset {
    QueueOffset {
        message_queue: message_queue(topic.to_owned(), q.broker_name.clone(), q.queue_id),
        min_offset: to_i64(q.min_offset),
        max_offset: to_i64(q.max_offset),
        committed_offset: q.committed.map(to_i64),
        lag: to_i64(q.lag),
        lock_timestamp: q.lock_time.map(to_i64),
        last_consume_timestamp: to_i64(q.last_pull_ms),
        last_consume_client_ip: q.client_ip.clone(),
    }
}

impl MqApi for HttpAdapter {
    async fn produce(&self, p: ProduceParams, ctx: RequestContext) -> Reply<ProduceReply> {
        let producer = match self.producer(&p.producer, p.token.as_deref(), &ctx) {
            Ok(call) => call,
            Err(e) => return fail(&e),
        };
        let req = ProduceRequest {
            body: p.message.into_bytes(),
            keys: p.keys,
            order_id: p.order_id,
            delay_level: p.delay_level,
            delivery_timestamp_ms: p.delivery_timestamp,
            round_robin: p.round_robin.unwrap_or(false),
            client_ip: client_ip(p.client_ip, &ctx),
            lite_topics: p
                .lite_topics
                .map(|l| l.split(',').map(str::to_owned).collect())
                .unwrap_or_default(),
        };
        match producer.produce(req).await {
            Ok(r) => Reply::new(ProduceReply {
                status: 200,
                message: None,
                result: Some(send_result(r)),
            }),
            Err(e) => fail(&e),
        }
    }

    async fn produce_batch(&self, p: ProduceBatchParams, ctx: RequestContext) -> Reply<BatchReply> {
        let producer = match self.producer(&p.producer, p.token.as_deref(), &ctx) {
            Ok(call) => call,
            Err(e) => return fail(&e),
        };
        let Some(bodies) = batch_bodies(&p.messages) else {
            return Reply::new(BatchReply::error(
                400,
                "parameter messages: must be a JSON array".into(),
            ));
        };
        match producer.produce_batch(bodies, client_ip(p.client_ip, &ctx)).await {
            Ok(results) if results.iter().all(Result::is_ok) => Reply::new(BatchReply {
                status: 200,
                message: None,
                result: None,
            }),
            Ok(results) => {
                let items = results
                    .iter()
                    .map(|r| match r {
                        Ok(_) => StatusReply {
                            status: 200,
                            message: None,
                        },
                        Err(e) => StatusReply {
                            status: error_status(e),
                            message: Some(e.to_string()),
                        },
                    })
                    .collect();
                // Every element refused for one reason the client can act on (back-pressure:
                // overloaded, disk full; or bad input: nothing was sent): that status for the
                // whole batch; a mix, or a store failure, gets the seed's 500.
                let first = results.iter().find_map(|r| r.as_ref().err());
                let whole = first
                    .filter(|f| {
                        matches!(
                            f.kind(),
                            ErrorKind::Overloaded | ErrorKind::StorageFull | ErrorKind::InvalidArgument
                        )
                    })
                    .filter(|f| results.iter().all(|r| r.as_ref().is_err_and(|e| e.kind() == f.kind())));
                Reply::new(BatchReply {
                    status: whole.map_or(500, error_status),
                    message: Some(whole.map_or_else(|| "some messages failed to send".into(), ToString::to_string)),
                    result: Some(items),
                })
            }
            Err(e) => fail(&e),
        }
    }

    async fn fetch(&self, p: FetchParams, ctx: RequestContext) -> Reply<FetchReply> {
        let consumer = match self.consumer(
            target(p.topic, p.consumer, p.client_id, p.lite_topic),
            p.token.as_deref(),
            &ctx,
        ) {
            Ok(call) => call,
            Err(e) => return fail(&e),
        };
        let use_cookie = p.use_cookie.unwrap_or(false);
        let req = FetchRequest {
            request_id: request_id(p.request_id, use_cookie, &ctx),
            client_ip: client_ip(p.client_ip, &ctx),
            max_pull_size: p.max_pull_size.and_then(|m| u32::try_from(m).ok()),
            consume_timeout_s: p.consume_timeout.and_then(|t| u64::try_from(t).ok()),
            pull_timeout_s: p.pull_timeout.and_then(|t| u64::try_from(t).ok()),
            wait_ms: p.wait_ms.and_then(|t| u64::try_from(t).ok()),
            pop: p.pop.unwrap_or(false),
        };
        let mut reply = match consumer.fetch(req).await {
            Ok(o) => {
                let ack_info = o.ack.map(|a| outcome_reply(a.map(|a| a.message), "piggy-backed ack"));
                let msg_list: Vec<Message> = o.messages.into_iter().map(message).collect();
                let retry_list: Vec<Message> = o.retry_messages.into_iter().map(message).collect();
                Reply::new(FetchReply {
                    status: 200,
                    message: None,
                    result: Some(FetchResult {
                        status: o.status.as_str().to_owned(),
                        request_id: o.request_id,
                        msg_list_size: msg_list.len() as i32,
                        msg_list: (!msg_list.is_empty()).then_some(msg_list),
                        retry_msg_list_size: retry_list.len() as i32,
                        retry_msg_list: (!retry_list.is_empty()).then_some(retry_list),
                        ack_info,
                        queue_info: o.queue.map(|q| QueueInfo {
                            message_queue: message_queue(q.topic, q.broker_name.clone(), q.queue_id),
                            min_offset: q.min_offset as i64,
                            max_offset: q.max_offset as i64,
                            committed_offset: q.committed.map(|c| c as i64),
                            lock_timestamp: q.lock_time.map(|l| l as i64),
                            last_consume_client_ip: q.client_ip,
                        }),
                    }),
                })
            }
            Err(e) => fail(&e),
        };
        if use_cookie && reply.body.status == 200 {
            let rid = reply.body.result.as_ref().and_then(|r| r.request_id.clone());
            reply.set_cookie = Some(match rid {
                Some(rid) => format!("{RID_COOKIE}={rid}; Path=/"),
                None => format!("{RID_COOKIE}=; Path=/; Max-Age=0"),
            });
        }
        reply
    }

    async fn ack(&self, p: AckParams, ctx: RequestContext) -> Reply<StatusReply> {
        let consumer = match self.consumer(
            target(p.topic, p.consumer, p.client_id, p.lite_topic),
            p.token.as_deref(),
            &ctx,
        ) {
            Ok(call) => call,
            Err(e) => return fail(&e),
        };
        let Some(rid) = request_id(p.request_id, p.use_cookie.unwrap_or(false), &ctx) else {
            return Reply::new(StatusReply::error(400, "parameter requestId: is required".into()));
        };
        match consumer.ack(&rid).await {
            Ok(o) => Reply::new(StatusReply {
                status: 200,
                message: Some(o.message),
            }),
            Err(e) => fail(&e),
        }
    }

    async fn stream(
        &self,
        p: StreamParams,
        ctx: RequestContext,
    ) -> Result<axum::response::Response, Reply<StatusReply>> {
        let consumer = self
            .consumer(
                target(p.topic, p.consumer, p.client_id, p.lite_topic),
                p.token.as_deref(),
                &ctx,
            )
            .map_err(|e| fail(&e))?;
        // An EventSource reconnecting names the last batch it received: acknowledge it first.
        let last_event_id = ctx
            .headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty());
        let last_event_ack = match last_event_id {
            Some(rid) => Some(outcome_reply(
                consumer.ack(rid).await.map(|o| o.message),
                "Last-Event-ID ack",
            )),
            None => None,
        };
        let sub = Subscription {
            max_in_flight: p.max_in_flight.and_then(|m| u32::try_from(m).ok()).unwrap_or(0),
            max_pull_size: p.max_pull_size.and_then(|m| u32::try_from(m).ok()),
            consume_timeout_s: p.consume_timeout.and_then(|t| u64::try_from(t).ok()),
            pull_timeout_s: p.pull_timeout.and_then(|t| u64::try_from(t).ok()),
            auto_ack: p.auto_ack.unwrap_or(false),
            client_ip: client_ip(p.client_ip, &ctx),
            pop: p.pop.unwrap_or(false),
        };
        let stream = consumer
            .consume(sub, tokio_stream::empty())
            .await
            .map_err(|e| fail(&e))?;
        let heartbeat = p
            .heartbeat
            .and_then(|h| u64::try_from(h).ok())
            .unwrap_or(limits::DEFAULT_HEARTBEAT_S);
        Ok(super::sse::respond(
            stream,
            last_event_ack,
            std::time::Duration::from_secs(heartbeat),
            message,
        ))
    }

    async fn unlock(&self, p: UnlockParams, ctx: RequestContext) -> Reply<StatusReply> {
        let consumer = match self.consumer(
            target(p.topic, p.consumer, p.client_id, p.lite_topic),
            p.token.as_deref(),
            &ctx,
        ) {
            Ok(call) => call,
            Err(e) => return fail(&e),
        };
        let Some(rid) = request_id(p.request_id, p.use_cookie.unwrap_or(false), &ctx) else {
            return Reply::new(StatusReply::error(400, "parameter requestId: is required".into()));
        };
        match consumer.unlock(&rid).await {
            Ok(o) => Reply::new(StatusReply {
                status: 200,
                message: Some(o.message),
            }),
            Err(e) => fail(&e),
        }
    }

    async fn consumer_config(&self, p: ConsumerConfigParams, _ctx: RequestContext) -> Reply<ConsumerConfigReply> {
        self.configure(&p.consumer, SettingsChange::default()).await
    }

    async fn configure_consumer(&self, p: ConfigureConsumerParams, _ctx: RequestContext) -> Reply<ConsumerConfigReply> {
        let change = SettingsChange {
            client_id: p.client_id,
            paused: p.pause,
            rate_limit_enabled: p.rate_limit_enabled,
            limit_rate: p.limit_rate.map(|r| r as u64),
            consume_timeout_ms: p.consume_timeout_ms.and_then(|t| u64::try_from(t).ok()),
            max_pull_size: p.max_pull_size.and_then(|m| u32::try_from(m).ok()),
            retry_msg_id: p.retry_msg_id,
        };
        self.configure(&p.consumer, change).await
    }

    async fn message(&self, p: MessageParams, _ctx: RequestContext) -> Reply<MessageReply> {
        match self.engine.message(&p.msg_id).await {
            Ok(m) => Reply::new(MessageReply {
                status: 200,
                message: None,
                result: Some(StoredMessageInfo {
                    msg_id: m.msg_id,
                    topic: m.topic,
                    broker_name: m.broker_name,
                    queue_id: m.queue_id as i32,
                    queue_offset: to_i64(m.queue_offset),
                    store_timestamp: to_i64(m.store_ms),
                    keys: m.keys,
                    client_ip: m.client_ip,
                    body: body_text(m.body),
                }),
            }),
            Err(e) => fail(&e),
        }
    }

    async fn registry(&self, _p: RegistryParams, _ctx: RequestContext) -> Reply<RegistryReply> {
        self.registry_reply(Ok(self.engine.registry()))
    }

    async fn put_topic(&self, p: PutTopicParams, _ctx: RequestContext) -> Reply<RegistryReply> {
        let queues = u32::try_from(p.queues).unwrap_or(0);
        self.registry_reply(self.engine.put_topic(p.name.trim(), queues, p.lite).await)
    }

    async fn delete_topic(&self, p: DeleteTopicParams, _ctx: RequestContext) -> Reply<RegistryReply> {
        self.registry_reply(self.engine.delete_topic(p.name.trim()).await)
    }

    async fn put_producer(&self, p: PutProducerParams, _ctx: RequestContext) -> Reply<RegistryReply> {
        let token = match token_change(p.access_token, p.clear_access_token) {
            Ok(t) => t,
            Err(e) => return fail(&e),
        };
        self.registry_reply(self.engine.put_producer(p.name.trim(), p.topic.trim(), token).await)
    }

    async fn delete_producer(&self, p: DeleteProducerParams, _ctx: RequestContext) -> Reply<RegistryReply> {
        self.registry_reply(self.engine.delete_producer(p.name.trim()).await)
    }

    async fn put_consumer(&self, p: PutConsumerParams, _ctx: RequestContext) -> Reply<RegistryReply> {
        let token = match token_change(p.access_token, p.clear_access_token) {
            Ok(t) => t,
            Err(e) => return fail(&e),
        };
        let mode = match p.mode.as_deref().map(str::trim) {
            None | Some("" | "clustering") => ConsumeMode::Clustering,
            Some("broadcast") => ConsumeMode::Broadcast,
            Some(other) => {
                return fail(&EngineError::InvalidArgument(format!(
                    "mode must be clustering or broadcast, got {other:?}"
                )));
            }
        };
        let spec = ConsumerSpec {
            name: p.name.trim().to_owned(),
            topic: p.topic.trim().to_owned(),
            mode,
            consume_timeout_ms: p
                .consume_timeout_ms
                .and_then(|t| u64::try_from(t).ok())
                .unwrap_or(limits::DEFAULT_CONSUME_TIMEOUT_MS),
            max_pull_size: p
                .max_pull_size
                .and_then(|m| u32::try_from(m).ok())
                .unwrap_or(limits::DEFAULT_PULL_SIZE),
            token: None,
        };
        self.registry_reply(self.engine.put_consumer(spec, token).await)
    }

    async fn delete_consumer(&self, p: DeleteConsumerParams, _ctx: RequestContext) -> Reply<RegistryReply> {
        self.registry_reply(self.engine.delete_consumer(p.name.trim()).await)
    }

    async fn consumer_offsets(&self, p: ConsumerOffsetsParams, _ctx: RequestContext) -> Reply<ConsumerOffsetsReply> {
        let page = client_page(p.page, p.page_size).unwrap_or_default();
        self.offsets_reply(
            self.engine
                .consumer_offsets(&p.consumer, p.client_id.as_deref(), Some(page))
                .await,
        )
    }

    async fn reset_offsets(&self, p: ResetOffsetsParams, _ctx: RequestContext) -> Reply<ConsumerOffsetsReply> {
        let to = match (p.timestamp, p.to_newest) {
            (Some(ts), None | Some(false)) => OffsetReset::Timestamp(u64::try_from(ts).unwrap_or(0)),
            (None, Some(true)) => OffsetReset::Newest,
            (Some(_), Some(true)) => {
                return fail(&EngineError::InvalidArgument(
                    "give timestamp or toNewest=true, not both".into(),
                ));
            }
            (None, _) => {
                return fail(&EngineError::InvalidArgument(
                    "give timestamp (epoch ms) or toNewest=true".into(),
                ));
            }
        };
        let only = match (p.queue_id, p.broker_name) {
            (Some(q), broker) => Some(QueueSelector {
                queue_id: u32::try_from(q).unwrap_or(u32::MAX),
                broker_name: broker.filter(|b| !b.trim().is_empty()),
            }),
            (None, Some(b)) if !b.trim().is_empty() => {
                return fail(&EngineError::InvalidArgument("brokerName needs queueId".into()));
            }
            (None, _) => None,
        };
        self.offsets_reply(
            self.engine
                .reset_offsets(&p.consumer, p.client_id.as_deref(), to, only)
                .await,
        )
    }

    async fn clustering_queue_offsets(
        &self,
        p: ClusteringQueueOffsetsParams,
        _ctx: RequestContext,
    ) -> Reply<QueueOffsetsReply> {
        match self.queue_records(&p.consumer, ConsumeMode::Clustering, None).await {
            Ok(mut records) => Reply::new(QueueOffsetsReply {
                status: 200,
                message: None,
                result: Some(records.pop().map(|(_, q)| q).unwrap_or_default()),
            }),
            Err(e) => fail(&e),
        }
    }

    async fn broadcast_queue_offsets(
        &self,
        p: BroadcastQueueOffsetsParams,
        _ctx: RequestContext,
    ) -> Reply<BroadcastQueueOffsetsReply> {
        match self
            .queue_records(&p.consumer, ConsumeMode::Broadcast, client_page(p.page, p.page_size))
            .await
        {
            Ok(records) => Reply::new(BroadcastQueueOffsetsReply {
                status: 200,
                message: None,
                result: Some(
                    records
                        .into_iter()
                        .map(|(client, q)| (client.unwrap_or_default(), q))
                        .collect(),
                ),
            }),
            Err(e) => fail(&e),
        }
    }

    async fn clustering_pop_segments(
        &self,
        p: ClusteringPopSegmentsParams,
        _ctx: RequestContext,
    ) -> Reply<PopSegmentsReply> {
        let page = client_page(p.page, p.page_size);
        let found = self.engine.pop_segments(&p.consumer, None, page).await;
        pop_segments_reply(&p.consumer, ConsumeMode::Clustering, found)
    }

    async fn broadcast_pop_segments(
        &self,
        p: BroadcastPopSegmentsParams,
        _ctx: RequestContext,
    ) -> Reply<PopSegmentsReply> {
        let page = client_page(p.page, p.page_size);
        let found = self
            .engine
            .pop_segments(&p.consumer, p.client_id.as_deref(), page)
            .await;
        pop_segments_reply(&p.consumer, ConsumeMode::Broadcast, found)
    }

    async fn healthz(&self, _p: HealthzParams, _ctx: RequestContext) -> Reply<StatusReply> {
        let mut reply = Reply::new(StatusReply {
            status: 200,
            message: None,
        });
        reply.always_mirror = true;
        reply
    }

    async fn readyz(&self, _p: ReadyzParams, _ctx: RequestContext) -> Reply<StatusReply> {
        let mut reply = match self.engine.ready().await {
            Ok(()) => Reply::new(StatusReply {
                status: 200,
                message: None,
            }),
            Err(e) => Reply::new(StatusReply {
                status: 500,
                message: Some(format!("store not writable: {e}")),
            }),
        };
        reply.always_mirror = true;
        reply
    }
}
