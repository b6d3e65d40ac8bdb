//! `impl MessagingService for GrpcAdapter`: converts protobuf messages to engine calls and
//! engine results back; engine errors map to gRPC codes with the same text as REST.

use super::pb;
use crate::engine::{
    ConsumeCommand, ConsumeEvent, ConsumeTarget, ConsumerCall, Delivered, Engine, EngineError, FetchRequest,
    ProduceRequest, SendReceipt, Subscription,
};
use std::pin::Pin;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

pub(crate) struct GrpcAdapter {
    pub engine: Engine,
}

/// The engine error as a gRPC status: its row of the engine's error table, logged there.
fn status(e: EngineError) -> Status {
    e.log_answered("grpc", "call");
    Status::new(tonic::Code::from_i32(e.code().grpc as i32), e.to_string())
}

fn send_result(r: SendReceipt) -> pb::SendResult {
    pb::SendResult {
        send_status: r.status.as_str().to_owned(),
        msg_id: r.msg_id,
        message_queue: Some(pb::MessageQueue {
            topic: r.topic,
            broker_name: r.broker_name,
            queue_id: r.queue_id as i32,
        }),
        queue_offset: r.queue_offset as i64,
        offset_msg_id: r.offset_msg_id,
        region_id: r.region_id,
        trace_on: r.trace_on,
    }
}

fn message(d: Delivered) -> pb::Message {
    pb::Message {
        message_id: d.msg_id,
        body: d.body,
        timestamp: d.store_ms as i64,
    }
}

fn target(t: Option<pb::ConsumeTarget>) -> Result<ConsumeTarget, Status> {
    let t = t.ok_or_else(|| Status::invalid_argument("target is required"))?;
    Ok(ConsumeTarget {
        topic: t.topic,
        consumer: t.consumer,
        client_id: t.client_id,
        lite_topic: t.lite_topic,
    })
}

/// The access token a call presents: metadata `authorization: Bearer TOKEN`.
fn presented_token<T>(req: &Request<T>) -> Option<String> {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

impl GrpcAdapter {
    /// The call's consumer, once it accepted the token presented.
    fn consumer(&self, t: Option<pb::ConsumeTarget>, token: Option<&str>) -> Result<ConsumerCall<'_>, Status> {
        self.engine.consumer(target(t)?, token).map_err(status)
    }
}

/// An ack's or unlock's outcome as the seed's status and message.
fn ack_info(outcome: Result<String, EngineError>, operation: &str) -> pb::AckInfo {
    match outcome {
        Ok(message) => pb::AckInfo { status: 200, message },
        Err(e) => {
            e.log_answered("grpc", operation);
            pb::AckInfo {
                status: e.code().envelope_status,
                message: e.to_string(),
            }
        }
    }
}

fn peer_ip<T>(req: &Request<T>) -> Option<String> {
    req.remote_addr().map(|a| a.ip().to_string())
}

type ConsumeStream = Pin<Box<dyn Stream<Item = Result<pb::ConsumeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::messaging_service_server::MessagingService for GrpcAdapter {
    async fn produce(&self, request: Request<pb::ProduceRequest>) -> Result<Response<pb::ProduceResponse>, Status> {
        let (peer, token) = (peer_ip(&request), presented_token(&request));
        let r = request.into_inner();
        let receipt = self
            .engine
            .producer(&r.producer, token.as_deref())
            .map_err(status)?
            .produce(ProduceRequest {
                body: r.body,
                keys: r.keys,
                order_id: r.order_id,
                delay_level: r.delay_level,
                delivery_timestamp_ms: r.delivery_timestamp,
                round_robin: r.round_robin,
                client_ip: r.client_ip.or(peer),
                lite_topics: r.lite_topics,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ProduceResponse {
            result: Some(send_result(receipt)),
        }))
    }

    async fn produce_batch(
        &self,
        request: Request<pb::ProduceBatchRequest>,
    ) -> Result<Response<pb::ProduceBatchResponse>, Status> {
        let (peer, token) = (peer_ip(&request), presented_token(&request));
        let r = request.into_inner();
        let results = self
            .engine
            .producer(&r.producer, token.as_deref())
            .map_err(status)?
            .produce_batch(r.bodies, r.client_ip.or(peer))
            .await
            .map_err(status)?;
        let results = results
            .into_iter()
            .map(|item| match item {
                Ok(receipt) => pb::BatchItemResult {
                    status: 200,
                    message: String::new(),
                    result: Some(send_result(receipt)),
                },
                Err(e) => pb::BatchItemResult {
                    status: e.kind().status(),
                    message: e.to_string(),
                    result: None,
                },
            })
            .collect();
        Ok(Response::new(pb::ProduceBatchResponse { results }))
    }

    async fn fetch(&self, request: Request<pb::FetchRequest>) -> Result<Response<pb::FetchResponse>, Status> {
        let (peer, token) = (peer_ip(&request), presented_token(&request));
        let r = request.into_inner();
        let outcome = self
            .consumer(r.target, token.as_deref())?
            .fetch(FetchRequest {
                request_id: r.request_id,
                client_ip: r.client_ip.or(peer),
                max_pull_size: r.max_pull_size,
                consume_timeout_s: r.consume_timeout,
                pull_timeout_s: r.pull_timeout,
                wait_ms: r.wait_ms,
                pop: r.pop,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(pb::FetchResponse {
            status: outcome.status.as_str().to_owned(),
            request_id: outcome.request_id,
            messages: outcome.messages.into_iter().map(message).collect(),
            retry_messages: outcome.retry_messages.into_iter().map(message).collect(),
            ack_info: outcome.ack.map(|a| ack_info(a.map(|a| a.message), "piggy-backed ack")),
        }))
    }

    async fn ack(&self, request: Request<pb::AckRequest>) -> Result<Response<pb::AckResponse>, Status> {
        let token = presented_token(&request);
        let r = request.into_inner();
        let o = self
            .consumer(r.target, token.as_deref())?
            .ack(&r.request_id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::AckResponse {
            committed: o.committed,
            message: o.message,
        }))
    }

    async fn unlock(&self, request: Request<pb::UnlockRequest>) -> Result<Response<pb::UnlockResponse>, Status> {
        let token = presented_token(&request);
        let r = request.into_inner();
        let o = self
            .consumer(r.target, token.as_deref())?
            .unlock(&r.request_id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::UnlockResponse {
            unlocked: o.unlocked,
            message: o.message,
        }))
    }

    type ConsumeStream = ConsumeStream;

    async fn consume(
        &self,
        request: Request<Streaming<pb::ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        let (peer, token) = (peer_ip(&request), presented_token(&request));
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .and_then(|m| m.command)
            .ok_or_else(|| Status::invalid_argument("the first message of Consume must be subscribe"))?;
        let pb::consume_request::Command::Subscribe(sub) = first else {
            return Err(Status::invalid_argument(
                "the first message of Consume must be subscribe",
            ));
        };
        // Later messages: acks and unlocks; a malformed one or a transport error ends input.
        let commands = inbound
            .take_while(Result::is_ok)
            .filter_map(|m| match m.ok()?.command? {
                pb::consume_request::Command::Ack(id) => Some(ConsumeCommand::Ack(id)),
                pb::consume_request::Command::Unlock(id) => Some(ConsumeCommand::Unlock(id)),
                pb::consume_request::Command::Subscribe(_) => None,
            });
        let events = self
            .consumer(sub.target, token.as_deref())?
            .consume(
                Subscription {
                    max_in_flight: sub.max_in_flight.unwrap_or(0),
                    max_pull_size: sub.max_pull_size,
                    consume_timeout_s: sub.consume_timeout,
                    pull_timeout_s: sub.pull_timeout,
                    auto_ack: sub.auto_ack,
                    client_ip: peer,
                    pop: sub.pop,
                },
                Box::pin(commands),
            )
            .await
            .map_err(status)?;
        let responses = events.map(|event| {
            event.map_err(status).map(|event| pb::ConsumeResponse {
                event: Some(match event {
                    ConsumeEvent::Batch {
                        request_id,
                        messages,
                        retry_messages,
                    } => pb::consume_response::Event::Batch(pb::Batch {
                        request_id,
                        messages: messages.into_iter().map(message).collect(),
                        retry_messages: retry_messages.into_iter().map(message).collect(),
                    }),
                    ConsumeEvent::CommandResult(outcome) => {
                        pb::consume_response::Event::AckResult(ack_info(outcome, "stream command"))
                    }
                }),
            })
        });
        Ok(Response::new(Box::pin(responses)))
    }
}
