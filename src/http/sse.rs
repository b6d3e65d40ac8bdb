//! `/mq/stream`: a consume stream as Server-Sent Events. Only converts: the engine's stream
//! events to SSE events (`batch` with the requestId as its id, `ack`, `error`), plus the
//! transport's own lines (`retry:`, heartbeat comments).

use super::api::{Message, StatusReply, StreamBatch};
use super::handlers::outcome_reply;
use crate::engine::{ConsumeEvent, ConsumeStream};
use axum::http::HeaderValue;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use std::convert::Infallible;
use std::time::Duration;
use tokio_stream::StreamExt;

/// What an `EventSource` waits before reconnecting after the connection dropped.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

fn status_event(name: &str, reply: &StatusReply) -> Event {
    Event::default().event(name).json_data(reply).unwrap_or_else(|e| {
        Event::default()
            .event(name)
            .data(format!("{{\"status\":500,\"message\":\"{e}\"}}"))
    })
}

fn batch_event(request_id: String, messages: Vec<Message>, retry_messages: Vec<Message>) -> Event {
    let batch = StreamBatch {
        msg_list_size: messages.len() as i32,
        msg_list: messages,
        retry_msg_list_size: retry_messages.len() as i32,
        retry_msg_list: retry_messages,
        request_id: request_id.clone(),
    };
    match Event::default().event("batch").id(request_id).json_data(&batch) {
        Ok(event) => event,
        // Serializing plain strings and numbers cannot fail; say so on the stream if it does.
        Err(e) => status_event(
            "error",
            &StatusReply {
                status: 500,
                message: Some(format!("cannot encode a batch: {e}")),
            },
        ),
    }
}

/// The stream as the SSE answer: `retry:` first, then the outcome of the `Last-Event-ID` ack
/// (if one was asked), then the batches; a failure is the last event. Heartbeat comments fill
/// the silences.
pub(super) fn respond(
    stream: ConsumeStream,
    last_event_ack: Option<StatusReply>,
    heartbeat: Duration,
    message: fn(crate::engine::Delivered) -> Message,
) -> Response {
    let opening = std::iter::once(Event::default().retry(RECONNECT_AFTER))
        .chain(last_event_ack.map(|reply| status_event("ack", &reply)));
    let events = stream.map(move |event| match event {
        Ok(ConsumeEvent::Batch {
            request_id,
            messages,
            retry_messages,
        }) => batch_event(
            request_id,
            messages.into_iter().map(message).collect(),
            retry_messages.into_iter().map(message).collect(),
        ),
        // No commands are sent on this stream: acks come as separate requests.
        Ok(ConsumeEvent::CommandResult(outcome)) => status_event("ack", &outcome_reply(outcome, "stream command")),
        Err(e) => status_event("error", &outcome_reply(Err(e), "event stream")),
    });
    let all = tokio_stream::iter(opening).chain(events).map(Ok::<_, Infallible>);
    let mut response = Sse::new(all)
        .keep_alive(KeepAlive::new().interval(heartbeat).text("heartbeat"))
        .into_response();
    // nginx buffers proxied answers by default, which would hold events back.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}
