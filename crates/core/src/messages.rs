//! Operators' message lookup: one stored message by its msgId, with what was recorded with it
//! (store time, keys, the producing client's address).

use crate::{Engine, EngineError, ids};
use mqproxy_store::MessageLocation;

fn not_found_text(msg_id: &str) -> String {
    format!("message {msg_id} not found (never stored, not yet due, or expired)")
}

/// A stored message as operators see it.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageView {
    pub msg_id: String,
    pub topic: String,
    pub broker_name: String,
    pub queue_id: u32,
    pub queue_offset: u64,
    pub store_ms: u64,
    pub keys: Option<String>,
    /// The producing client's address (`clientIp`), when it was recorded.
    pub client_ip: Option<String>,
    pub body: Vec<u8>,
}

impl Engine {
    /// The message with this msgId, once it is in a queue (a delayed message is found once due).
    ///
    /// # Errors
    /// Not a msgId, no such message, or a store failure.
    pub async fn message(&self, msg_id: &str) -> Result<MessageView, EngineError> {
        let msg_id = msg_id.trim();
        let (location, id) = self.locate_message("msgId", msg_id).await?;
        let not_found = || EngineError::invalid(not_found_text(msg_id));
        // One message: no byte cap applies (a read always returns its first message).
        let read = self
            .inner
            .messages
            .read(&location.topic, location.queue, location.offset, 1, usize::MAX)
            .await?;
        let stored = read
            .messages
            .into_iter()
            .find(|m| m.offset == location.offset && m.msg_id == id)
            .ok_or_else(not_found)?;
        let queue = self
            .inner
            .messages
            .queues(&location.topic)
            .get(location.queue as usize)
            .cloned()
            .ok_or_else(not_found)?;
        Ok(MessageView {
            msg_id: stored.client_msg_id.unwrap_or_else(|| ids::hex_id(&stored.msg_id)),
            topic: location.topic,
            broker_name: queue.broker_name,
            queue_id: queue.queue_id,
            queue_offset: stored.offset,
            store_ms: stored.store_ms,
            keys: stored.keys,
            client_ip: stored.born_host,
            body: stored.body,
        })
    }

    /// Where the message named by `msg_id` (the request's `parameter`) sits, and its identity
    /// there: a 400 naming the parameter when it is not a msgId, or when no queue holds it.
    pub(crate) async fn locate_message(
        &self,
        parameter: &str,
        msg_id: &str,
    ) -> Result<(MessageLocation, [u8; 16]), EngineError> {
        if !ids::is_msg_id(msg_id) {
            return Err(EngineError::invalid(format!(
                "{parameter} {msg_id:?} is not a msgId ({})",
                ids::MSG_ID_RULE
            )));
        }
        self.inner
            .messages
            .locate(msg_id)
            .await?
            .ok_or_else(|| EngineError::invalid(not_found_text(msg_id)))
    }
}
