//! The gRPC ceiling of the stream scenario: a bare tonic `MessagingService` whose Consume
//! stream sends the same batch over and over (128 messages of the scenario's size), with
//! mqproxy's flow control (at most `max_in_flight` unacknowledged batches), and nothing else.

use mqproxy::grpc::pb;
use pb::consume_request::Command;
use pb::consume_response::Event;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

struct BareConsume {
    batch: pb::Batch,
}

type ConsumeStream = Pin<Box<dyn Stream<Item = Result<pb::ConsumeResponse, Status>> + Send>>;

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("the gRPC ceiling serves Consume only"))
}

#[tonic::async_trait]
impl pb::messaging_service_server::MessagingService for BareConsume {
    async fn produce(&self, _: Request<pb::ProduceRequest>) -> Result<Response<pb::ProduceResponse>, Status> {
        unimplemented()
    }
    async fn produce_batch(
        &self,
        _: Request<pb::ProduceBatchRequest>,
    ) -> Result<Response<pb::ProduceBatchResponse>, Status> {
        unimplemented()
    }
    async fn fetch(&self, _: Request<pb::FetchRequest>) -> Result<Response<pb::FetchResponse>, Status> {
        unimplemented()
    }
    async fn ack(&self, _: Request<pb::AckRequest>) -> Result<Response<pb::AckResponse>, Status> {
        unimplemented()
    }
    async fn unlock(&self, _: Request<pb::UnlockRequest>) -> Result<Response<pb::UnlockResponse>, Status> {
        unimplemented()
    }

    type ConsumeStream = ConsumeStream;

    async fn consume(
        &self,
        request: Request<Streaming<pb::ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        let mut inbound = request.into_inner();
        let Some(Command::Subscribe(subscribe)) = inbound.message().await?.and_then(|m| m.command) else {
            return Err(Status::invalid_argument("subscribe first"));
        };
        let in_flight = subscribe.max_in_flight.unwrap_or(4).max(1) as usize;
        let permits = Arc::new(tokio::sync::Semaphore::new(in_flight));
        let acks = permits.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if matches!(message.command, Some(Command::Ack(_))) {
                    acks.add_permits(1);
                }
            }
        });
        let (tx, rx) = tokio::sync::mpsc::channel(in_flight);
        let batch = self.batch.clone();
        tokio::spawn(async move {
            while let Ok(permit) = permits.acquire().await {
                permit.forget();
                let event = pb::ConsumeResponse {
                    event: Some(Event::Batch(batch.clone())),
                };
                if tx.send(Ok(event)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// The `grpc-ceiling` mode: serves until killed.
pub async fn serve(size: usize) -> anyhow::Result<()> {
    let messages = (0..128u64)
        .map(|i| pb::Message {
            message_id: format!("7F00000100002A9F{i:016X}"),
            body: vec![b'x'; size],
            timestamp: 1_764_000_000_000 + i as i64,
        })
        .collect();
    let batch = pb::Batch {
        request_id: "Ym9ndXMtcmVxdWVzdC1pZC1vZi10aGUtc2FtZS1sZW5ndGgtYXMtYS1yZWFsLW9uZQ".into(),
        messages,
        retry_messages: Vec::new(),
    };
    let service = pb::messaging_service_server::MessagingServiceServer::new(BareConsume { batch });
    let app = tonic::service::Routes::new(service).into_axum_router();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("grpc ceiling listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
