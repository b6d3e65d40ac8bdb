//! Streaming consume: one task per stream that hands out batches as soon as messages are
//! visible, holds at most `max_in_flight` unacknowledged batches, and gives them back (unlock)
//! the moment the stream ends. It is the REST fetch/ack/unlock semantics driven by wake-ups
//! instead of polling: the store signals visible messages, the engine signals released locks
//! and settings changes, and a timer covers the next lock expiry.

use super::{ConsumeTarget, Delivered, Engine, EngineError, FetchRequest, FetchStatus, now_ms};
use mqproxy_store::ContextKey;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};

/// How soon a rate-limited stream asks again (the bucket refills continuously).
const RATE_LIMITED_RETRY_MS: u64 = 50;

/// What a streaming consumer subscribes to.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub target: ConsumeTarget,
    /// 0 means [`super::limits::DEFAULT_IN_FLIGHT`].
    pub max_in_flight: u32,
    pub max_pull_size: Option<u32>,
    /// Acknowledge each batch as soon as the transport took it (at-most-once).
    pub auto_ack: bool,
    pub client_ip: Option<String>,
}

/// What a streaming consumer sends after subscribing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumeCommand {
    Ack(String),
    Unlock(String),
}

/// What a stream delivers.
#[derive(Debug, Clone)]
pub enum ConsumeEvent {
    Batch {
        request_id: String,
        messages: Vec<Delivered>,
        retry_messages: Vec<Delivered>,
    },
    /// The outcome of an ack or unlock sent on the stream (refused ones too: not fatal).
    CommandResult { ok: bool, message: String },
}

type EventSender = mpsc::Sender<Result<ConsumeEvent, EngineError>>;

impl Engine {
    /// Opens a consume stream. The subscription is checked at once (unknown consumer, topic,
    /// clientId rules); the stream then runs until the returned receiver is dropped.
    ///
    /// # Errors
    /// The subscription names no registered consumer, or breaks its rules.
    pub fn consume<C>(
        &self,
        sub: Subscription,
        commands: C,
    ) -> Result<ReceiverStream<Result<ConsumeEvent, EngineError>>, EngineError>
    where
        C: Stream<Item = ConsumeCommand> + Send + Unpin + 'static,
    {
        let (_, key) = self.resolve(&sub.target)?;
        let permit = self.inner.consume_streams.clone().try_acquire_owned().map_err(|_| {
            EngineError::LimitReached(format!(
                "{} Consume streams are open, the most max_consume_streams allows",
                self.inner.config.limits.max_consume_streams
            ))
        })?;
        // One batch buffered at most: a slow client holds the task back (HTTP/2 flow control
        // reaches the engine), so the server's memory does not grow with it.
        let (tx, rx) = mpsc::channel(1);
        let engine = self.clone();
        tokio::spawn(async move {
            engine.run_stream(sub, key, commands, tx).await;
            drop(permit);
        });
        Ok(ReceiverStream::new(rx))
    }

    async fn run_stream<C>(self, sub: Subscription, key: ContextKey, mut commands: C, tx: EventSender)
    where
        C: Stream<Item = ConsumeCommand> + Send + Unpin + 'static,
    {
        let mut visible = self.inner.messages.visible_changes();
        let mut released = self.inner.consumer_changes.subscribe();
        let max_in_flight = match sub.max_in_flight {
            0 => u64::from(super::limits::DEFAULT_IN_FLIGHT),
            n => super::limits::IN_FLIGHT.clamp(u64::from(n)),
        } as usize;
        // request_id -> when its lock expires (then the batch is someone's to take again).
        let mut in_flight: HashMap<String, u64> = HashMap::new();
        let mut commands_open = true;
        // A broadcast stream pulls at least this often, so a quiet but live client is never
        // taken for an idle one and forgotten.
        let keep_known =
            (key.client_id.is_some()).then(|| (self.inner.config.limits.broadcast_client_idle_ms / 4).max(250));
        tracing::debug!(consumer = %sub.target.consumer, client = ?sub.target.client_id, "consume stream opened");
        'stream: loop {
            // Read each round: an operator may change it while the stream runs.
            let timeout_ms = match self.consume_timeout(&sub.target.consumer).await {
                Ok(t) => t,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    break 'stream;
                }
            };
            let now = now_ms();
            in_flight.retain(|_, expires| *expires > now);
            let mut wake_at = in_flight.values().min().copied();
            if in_flight.len() < max_in_flight {
                // Seen before fetching, so a change during the fetch wakes the wait below.
                visible.borrow_and_update();
                released.borrow_and_update();
                let request = FetchRequest {
                    target: sub.target.clone(),
                    request_id: None,
                    client_ip: sub.client_ip.clone(),
                    max_pull_size: sub.max_pull_size,
                };
                let outcome = match self.fetch(request).await {
                    Ok(o) => o,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        break 'stream;
                    }
                };
                match (outcome.status, outcome.request_id) {
                    (FetchStatus::Found, Some(request_id)) => {
                        let lock_time = outcome.queue.and_then(|q| q.lock_time).unwrap_or(now);
                        let event = ConsumeEvent::Batch {
                            request_id: request_id.clone(),
                            messages: outcome.messages,
                            retry_messages: outcome.retry_messages,
                        };
                        let Ok(permit) = tx.reserve().await else {
                            let _ = self.unlock(&sub.target, &request_id).await;
                            break 'stream;
                        };
                        permit.send(Ok(event));
                        if sub.auto_ack {
                            if let Err(e) = self.ack(&sub.target, &request_id).await {
                                tracing::warn!(error = %e, "auto-ack failed; the batch will come again");
                            }
                        } else {
                            in_flight.insert(request_id, lock_time + timeout_ms + 1);
                        }
                        continue 'stream;
                    }
                    (FetchStatus::OffsetIllegal, Some(request_id)) => {
                        // Nothing to hand out: apply the forced reset at once and go on.
                        let _ = self.ack(&sub.target, &request_id).await;
                        continue 'stream;
                    }
                    (FetchStatus::RateLimited, _) => {
                        wake_at =
                            Some(wake_at.map_or(now + RATE_LIMITED_RETRY_MS, |w| w.min(now + RATE_LIMITED_RETRY_MS)));
                    }
                    // PAUSED waits for a settings change; NO_NEW_MSG for messages, a released
                    // lock, or the next lock expiry.
                    _ => match self.next_lock_expiry(&key, timeout_ms).await {
                        Ok(Some(expiry)) => wake_at = Some(wake_at.map_or(expiry, |w| w.min(expiry))),
                        Ok(None) => {}
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            break 'stream;
                        }
                    },
                }
            }
            if let Some(every) = keep_known {
                wake_at = Some(wake_at.map_or(now + every, |w| w.min(now + every)));
            }
            let sleep = async {
                match wake_at {
                    Some(at) => tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                command = commands.next(), if commands_open => match command {
                    Some(command) => {
                        let event = self.apply_command(&sub.target, &mut in_flight, command).await;
                        tokio::select! {
                            sent = tx.send(Ok(event)) => if sent.is_err() { break 'stream },
                            () = tx.closed() => break 'stream,
                        }
                    }
                    // The client stopped sending (half-close): keep delivering until it goes.
                    None => commands_open = false,
                },
                Ok(()) = visible.changed() => {}
                Ok(()) = released.changed() => {}
                () = sleep => {}
                () = tx.closed() => break 'stream,
            }
        }
        // The stream is gone: its unacknowledged batches go back at once, not at lock expiry.
        let unlocked = in_flight.len();
        for request_id in in_flight.into_keys() {
            if let Err(e) = self.unlock(&sub.target, &request_id).await {
                tracing::warn!(error = %e, "cannot unlock a batch of a closed stream; it comes back at lock expiry");
            }
        }
        tracing::debug!(consumer = %sub.target.consumer, unlocked, "consume stream closed");
    }

    async fn apply_command(
        &self,
        target: &ConsumeTarget,
        in_flight: &mut HashMap<String, u64>,
        command: ConsumeCommand,
    ) -> ConsumeEvent {
        let outcome = match &command {
            ConsumeCommand::Ack(request_id) => self.ack(target, request_id).await.map(|o| o.message),
            ConsumeCommand::Unlock(request_id) => self.unlock(target, request_id).await.map(|o| o.message),
        };
        let (ConsumeCommand::Ack(request_id) | ConsumeCommand::Unlock(request_id)) = command;
        in_flight.remove(&request_id);
        match outcome {
            Ok(message) => ConsumeEvent::CommandResult { ok: true, message },
            Err(e) => ConsumeEvent::CommandResult {
                ok: false,
                message: e.to_string(),
            },
        }
    }
}
