//! Streaming consume: one task per stream that hands out batches as soon as messages are
//! visible, holds at most `max_in_flight` unacknowledged batches, and gives them back (unlock)
//! the moment the stream ends. It is the REST fetch/ack/unlock semantics driven by wake-ups
//! instead of polling: the store signals visible messages, the engine signals released locks
//! and settings changes, and a timer covers the next lock expiry.

use super::consume::{Issued, PullContext, PullOptions};
use super::{ConsumeTarget, ConsumerSpec, Delivered, Engine, EngineError, FetchStatus, limits};
use futures_util::stream::FuturesOrdered;
use mqproxy_store::ContextKey;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};

/// How soon a rate-limited stream asks again (the bucket refills continuously).
const RATE_LIMITED_RETRY_MS: u64 = 50;

/// How often a stream with all its batches out looks whether one was acknowledged elsewhere
/// (`/mq/ack`, perhaps on another proxy sharing Redis: no local signal reaches it).
const FULL_RECHECK_MS: u64 = 1_000;

/// The answer to a command on the stream, ready once the ack it made is durable.
type CommandResult = Pin<Box<dyn Future<Output = ConsumeEvent> + Send>>;

/// What a streaming consumer subscribes to (the consumer is the [`super::ConsumerCall`]'s).
#[derive(Debug, Clone, Default)]
pub struct Subscription {
    /// 0 means [`super::limits::DEFAULT_IN_FLIGHT`]; else within [`super::limits::IN_FLIGHT`].
    pub max_in_flight: u32,
    pub max_pull_size: Option<u32>,
    /// Each batch's lock time in seconds instead of the consumer's (`consumeTimeout`).
    pub consume_timeout_s: Option<u64>,
    /// How long each pull's read of the message store may take, in seconds (`pullTimeout`).
    pub pull_timeout_s: Option<u64>,
    /// Acknowledge each batch as soon as the transport took it (at-most-once).
    pub auto_ack: bool,
    pub client_ip: Option<String>,
    /// POP consumption: each batch is a segment of a queue (several may come from one queue).
    pub pop: bool,
}

/// What a streaming consumer sends after subscribing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumeCommand {
    Ack(String),
    Unlock(String),
}

/// What a stream delivers.
#[derive(Debug)]
pub enum ConsumeEvent {
    Batch {
        request_id: String,
        messages: Vec<Delivered>,
        retry_messages: Vec<Delivered>,
    },
    /// The outcome of an ack or unlock sent on the stream: what it did, or why it failed (a
    /// failure is reported, not fatal).
    CommandResult(Result<String, EngineError>),
}

type EventSender = mpsc::Sender<Result<ConsumeEvent, EngineError>>;

/// The events of an open Consume stream; dropping it ends the stream.
pub type ConsumeStream = ReceiverStream<Result<ConsumeEvent, EngineError>>;

/// A batch the stream handed out and holds until it is acknowledged or its lock expires.
struct InFlight {
    issued: Issued,
    /// When its lock expires (then the batch is someone's to take again).
    expires_ms: u64,
}

/// The streams service's state.
pub(crate) struct StreamState {
    /// One permit per open Consume stream (`max_consume_streams`).
    permits: Arc<tokio::sync::Semaphore>,
}

impl StreamState {
    pub(crate) fn new(max_streams: u32) -> Self {
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(max_streams as usize)),
        }
    }
}

impl Engine {
    /// Opens a consume stream for `spec`'s consumer. The subscription is checked at once
    /// (topic, clientId rules); the stream then runs until the returned receiver is dropped.
    pub(super) async fn consume<C>(
        &self,
        spec: &ConsumerSpec,
        target: ConsumeTarget,
        sub: Subscription,
        commands: C,
    ) -> Result<ConsumeStream, EngineError>
    where
        C: Stream<Item = ConsumeCommand> + Send + Unpin + 'static,
    {
        let key = self.resolve(spec, &target).await?;
        if sub.max_in_flight != 0 {
            limits::check(limits::IN_FLIGHT, "maxInFlight", u64::from(sub.max_in_flight))?;
        }
        let options = PullOptions {
            pop: sub.pop,
            ..PullOptions::checked(
                sub.client_ip.clone(),
                sub.max_pull_size,
                sub.consume_timeout_s,
                sub.pull_timeout_s,
            )?
        };
        let permit = self.inner.streams.permits.clone().try_acquire_owned().map_err(|_| {
            EngineError::LimitReached(format!(
                "{} Consume streams are open, the most [consume] max_consume_streams allows",
                self.inner.consuming.settings().max_consume_streams
            ))
        })?;
        // One batch buffered at most: a slow client holds the task back (HTTP/2 flow control
        // reaches the engine), so the server's memory does not grow with it.
        let (tx, rx) = mpsc::channel(1);
        let engine = self.clone();
        tokio::spawn(async move {
            engine.run_stream(target, key, sub, options, commands, tx).await;
            drop(permit);
        });
        Ok(ReceiverStream::new(rx))
    }

    /// One round's view of the consumer: its entry as the registry has it now (an operator may
    /// change or remove it while the stream runs) and its settings, read once.
    async fn stream_round(&self, target: &ConsumeTarget) -> Result<(Arc<ConsumerSpec>, PullContext), EngineError> {
        let spec = self.registered_consumer(&target.consumer)?;
        let key = self.resolve(&spec, target).await?;
        let ctx = self.pull_context(&spec, key).await?;
        Ok((spec, ctx))
    }

    async fn run_stream<C>(
        self,
        target: ConsumeTarget,
        key: ContextKey,
        sub: Subscription,
        options: PullOptions,
        mut commands: C,
        tx: EventSender,
    ) where
        C: Stream<Item = ConsumeCommand> + Send + Unpin + 'static,
    {
        let mut changes = self.pull_changes(&key.topic);
        // Checked in `consume`: 0 or within limits::IN_FLIGHT.
        let max_in_flight = match sub.max_in_flight {
            0 => limits::DEFAULT_IN_FLIGHT,
            n => n,
        } as usize;
        // Keyed by requestId: what a client acknowledges on the stream is found here, with no
        // signature to check.
        let mut in_flight: HashMap<String, InFlight> = HashMap::new();
        // Answers to commands, in command order, each sent once its ack's commit is durable;
        // meanwhile the stream goes on reading its next batch (the pull sees the ack at once).
        let mut results: FuturesOrdered<CommandResult> = FuturesOrdered::new();
        let mut commands_open = true;
        // A broadcast stream pulls at least this often, so a quiet but live client is never
        // taken for an idle one and forgotten.
        let keep_known =
            (key.client_id.is_some()).then(|| (self.inner.consuming.settings().broadcast_client_idle_ms / 4).max(250));
        tracing::debug!(consumer = %target.consumer, client = ?target.client_id, "consume stream opened");
        'stream: loop {
            // This round's view; a command that arrives in the round is applied with it.
            let (spec, ctx) = &match self.stream_round(&target).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    break 'stream;
                }
            };
            // The consumer's lock time (for others' locks) and this stream's (for its batches).
            let timeout_ms = ctx.spec.consume_timeout_ms;
            let own_timeout_ms = options.lock_timeout(&ctx.spec);
            let now = self.now_ms();
            in_flight.retain(|_, b| b.expires_ms > now);
            let mut recheck_at = None;
            if in_flight.len() >= max_in_flight {
                if let Err(e) = self.forget_finished(&ctx.key, &mut in_flight).await {
                    let _ = tx.send(Err(e)).await;
                    break 'stream;
                }
                recheck_at = (in_flight.len() >= max_in_flight).then_some(now + FULL_RECHECK_MS);
            }
            let expiry = in_flight.values().map(|b| b.expires_ms).min();
            let mut wake_at = [expiry, recheck_at].into_iter().flatten().min();
            if in_flight.len() < max_in_flight {
                changes.mark_seen();
                let (outcome, issued) = match self.pull(ctx, None, &options).await {
                    Ok(pulled) => {
                        self.count_pull(spec, Ok(&pulled.0));
                        pulled
                    }
                    Err(e) => {
                        self.count_pull(spec, Err(&e));
                        let _ = tx.send(Err(e)).await;
                        break 'stream;
                    }
                };
                match (outcome.status, outcome.request_id, issued) {
                    (FetchStatus::Found, Some(request_id), Some(issued)) => {
                        let lock_time = issued.token.lock_time;
                        let event = ConsumeEvent::Batch {
                            request_id: request_id.clone(),
                            messages: outcome.messages,
                            retry_messages: outcome.retry_messages,
                        };
                        // The answers to earlier commands go first (their commits were flushed
                        // while this batch was read), so events keep the order things happened.
                        let mut open = true;
                        while let Some(answer) = results.next().await {
                            open = tx.send(Ok(answer)).await.is_ok();
                            if !open {
                                break;
                            }
                        }
                        let reserved = if open { tx.reserve().await.ok() } else { None };
                        let Some(permit) = reserved else {
                            let _ = self.unlock_issued(&ctx.key, &issued).await;
                            break 'stream;
                        };
                        permit.send(Ok(event));
                        if sub.auto_ack {
                            let acked = self.ack_issued(&ctx.spec, &ctx.key, &issued).await;
                            self.count_ack(spec, acked.as_ref().map(|a| a.committed).map_err(|_| ()));
                            if let Err(e) = acked {
                                tracing::warn!(error = %e, "auto-ack failed; the batch will come again");
                            }
                        } else {
                            in_flight.insert(
                                request_id,
                                InFlight {
                                    issued,
                                    expires_ms: lock_time + own_timeout_ms + 1,
                                },
                            );
                        }
                        continue 'stream;
                    }
                    (FetchStatus::OffsetIllegal, Some(_), Some(issued)) => {
                        // Nothing to hand out: apply the forced reset at once and go on.
                        let acked = self.ack_issued(&ctx.spec, &ctx.key, &issued).await;
                        self.count_ack(spec, acked.as_ref().map(|a| a.committed).map_err(|_| ()));
                        continue 'stream;
                    }
                    (FetchStatus::RateLimited, _, _) => {
                        wake_at =
                            Some(wake_at.map_or(now + RATE_LIMITED_RETRY_MS, |w| w.min(now + RATE_LIMITED_RETRY_MS)));
                    }
                    // PAUSED waits for a settings change; NO_NEW_MSG for messages, a released
                    // lock, or the next lock expiry.
                    _ => match self.next_lock_expiry(&ctx.key, timeout_ms).await {
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
                    Some(at) => tokio::time::sleep(Duration::from_millis(at.saturating_sub(self.now_ms()))).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                command = commands.next(), if commands_open => match command {
                    Some(command) => results.push_back(self.apply_command(spec, ctx, &mut in_flight, command).await),
                    // The client stopped sending (half-close): keep delivering until it goes.
                    None => commands_open = false,
                },
                Some(event) = results.next(), if !results.is_empty() => {
                    tokio::select! {
                        sent = tx.send(Ok(event)) => if sent.is_err() { break 'stream },
                        () = tx.closed() => break 'stream,
                    }
                }
                true = changes.changed() => {}
                () = sleep => {}
                () = tx.closed() => break 'stream,
            }
        }
        // The stream is gone: its unacknowledged batches go back at once, not at lock expiry.
        let unlocked = in_flight.len();
        // Oldest first: a pull racing the give-back sees the batches in the order they went
        // out (POP hands given-back segments out oldest first).
        let mut batches: Vec<InFlight> = in_flight.into_values().collect();
        batches.sort_by_key(|b| b.expires_ms);
        for batch in batches {
            if let Err(e) = self.unlock_issued(&key, &batch.issued).await {
                tracing::warn!(error = %e, "cannot unlock a batch of a closed stream; it comes back at lock expiry");
            }
        }
        tracing::debug!(consumer = %target.consumer, unlocked, "consume stream closed");
    }

    /// Forgets the batches whose lock is no longer theirs: acknowledged or unlocked by a call
    /// that did not come through this stream (`/mq/ack` with its requestId), or taken again.
    async fn forget_finished(
        &self,
        key: &ContextKey,
        in_flight: &mut HashMap<String, InFlight>,
    ) -> Result<(), EngineError> {
        let held = self.held_batches(key).await?;
        in_flight.retain(|_, b| held.contains(&(b.issued.queue, b.issued.token.lock_time)));
        Ok(())
    }

    /// An ack or unlock sent on the stream: of a batch this stream holds, from what it kept;
    /// of any other (a requestId from elsewhere), once its signature is checked. Applied now;
    /// answered by the returned future once an ack's commit is durable.
    async fn apply_command(
        &self,
        spec: &Arc<ConsumerSpec>,
        ctx: &PullContext,
        in_flight: &mut HashMap<String, InFlight>,
        command: ConsumeCommand,
    ) -> CommandResult {
        let (ConsumeCommand::Ack(request_id) | ConsumeCommand::Unlock(request_id)) = &command;
        let held = in_flight.remove(request_id.trim());
        let ack = match (&command, held) {
            (ConsumeCommand::Ack(_), Some(b)) => self.start_ack_issued(&ctx.spec, &ctx.key, &b.issued).await,
            (ConsumeCommand::Ack(rid), None) => self.start_ack(&ctx.spec, &ctx.key, rid.trim()).await,
            (ConsumeCommand::Unlock(_), Some(b)) => {
                let unlocked = self.unlock_issued(&ctx.key, &b.issued).await.map(|o| o.message);
                return Box::pin(std::future::ready(ConsumeEvent::CommandResult(unlocked)));
            }
            (ConsumeCommand::Unlock(rid), None) => {
                let unlocked = self.unlock_in_context(&ctx.key, rid).await.map(|o| o.message);
                return Box::pin(std::future::ready(ConsumeEvent::CommandResult(unlocked)));
            }
        };
        let (engine, spec) = (self.clone(), spec.clone());
        Box::pin(async move {
            let acked = match ack {
                Ok(pending) => pending.durably().await,
                Err(e) => Err(e),
            };
            engine.count_ack(&spec, acked.as_ref().map(|a| a.committed).map_err(|_| ()));
            ConsumeEvent::CommandResult(acked.map(|o| o.message))
        })
    }
}
