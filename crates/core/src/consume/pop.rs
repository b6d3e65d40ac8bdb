//! POP consumption (`pop=true`): the lock is on a segment `[offset, nextOffset)` of a queue,
//! not on the queue, so several clients consume one queue at once. A pull reads the queue's
//! next segment after those handed out and takes it by compare-and-set on the queue's POP end
//! (two pulls, on two proxies too, never hand out one segment); a segment whose
//! `consumeTimeout` passed unacknowledged, or that was given back, is handed out again in
//! `retryMsgList` before anything new; the committed offset stays at the first segment still
//! in flight.
//!
//! A context consumes either way, not both at once: a POP pull is refused while a pull without
//! `pop` holds a queue lock, and a pull without `pop` while POP segments are in flight (each
//! would hand out the other's messages again).

use super::{
    AckOutcome, Choice, Delivered, FetchOutcome, FetchStatus, Issued, PullContext, PullOptions, QueueSnapshot,
    UnlockOutcome, retry_is_free, to_delivered,
};
use crate::limits::{self, MAX_PULL_BYTES};
use crate::request_id::{self, BatchToken};
use crate::{Engine, EngineError};
use mqproxy_store::consumer_state::{ContextSnapshot, PopFate, PopFinished, PopGrant, PopTake, PopTakeKind};
use mqproxy_store::{ContextKey, PopSegment, RetryEntry};

/// How often a POP pull reads again after another pull took the segment it read.
const TAKE_ATTEMPTS: usize = 16;

/// The refusal of a POP pull while a pull without `pop` holds a queue of the context.
pub(super) fn queue_locked(consumer: &str, queue: u32) -> EngineError {
    EngineError::invalid(format!(
        "consumer:{consumer} has a batch pulled without pop=true in flight (queue {queue}); pull with pop=true once it is acknowledged, unlocked or its consumeTimeout passed"
    ))
}

/// The refusal of a pull without `pop` while POP segments are in flight.
pub(super) fn segments_in_flight(consumer: &str, segments: usize) -> EngineError {
    EngineError::invalid(format!(
        "consumer:{consumer} has {segments} POP segments in flight; pull with pop=true until they are acknowledged"
    ))
}

/// A segment found ready to be handed out.
struct Candidate {
    queue: u32,
    kind: PopTakeKind,
    /// The queue messages a `Next` segment holds (read before the take); a segment handed out
    /// again is read after it.
    messages: Vec<mqproxy_store::StoredMessage>,
    /// The queue had nothing at the segment's offset: the segment skips to its end (forced ack).
    force_ack: bool,
}

impl Engine {
    /// One POP pull in `ctx` (paused, rate limit and admission already passed).
    pub(super) async fn pull_pop(
        &self,
        ctx: &PullContext,
        mut outcome: FetchOutcome,
        options: &PullOptions,
    ) -> Result<(FetchOutcome, Option<Issued>), EngineError> {
        let (spec, key) = (&ctx.spec, &ctx.key);
        let max_pull = options.max_pull_size.unwrap_or(spec.max_pull_size);
        let timeout_ms = options.lock_timeout(spec);
        for _ in 0..TAKE_ATTEMPTS {
            let snapshot = self
                .inner
                .consuming
                .state
                .snapshot(key, self.queue_count(&key.topic))
                .await?;
            let now = self.now_ms();
            if let Some(queue) = snapshot
                .queues
                .iter()
                .position(|q| q.live_lock(now, spec.consume_timeout_ms).is_some())
            {
                return Err(queue_locked(&spec.name, u32::try_from(queue).unwrap_or(u32::MAX)));
            }
            let claims: Vec<(u64, Option<(u32, u64)>)> = snapshot
                .retries
                .iter()
                .filter(|e| retry_is_free(e, &snapshot, now, spec.consume_timeout_ms))
                .take(max_pull as usize)
                .map(|e| (e.seq, e.in_flight))
                .collect();
            let candidate = match self
                .pop_candidate(ctx, &snapshot, options, max_pull, !claims.is_empty())
                .await?
            {
                Choice::Locked(c) => c,
                Choice::Idle(queue) => {
                    outcome.queue = Some(queue);
                    return Ok((outcome, None));
                }
                Choice::AllLocked => return Ok((outcome, None)),
            };
            let queue = candidate.queue;
            let take = PopTake {
                queue,
                kind: candidate.kind.clone(),
                // Strictly later than the last pull: a segment's lock time names it in its queue.
                lock_time: now.max(snapshot.queues[queue as usize].last_pull_ms + 1),
                timeout_ms,
                client_ip: options.client_ip.clone(),
                claim_retries: claims,
            };
            let Some(grant) = self.inner.consuming.state.pop_take(key, take).await? else {
                // Another pull was faster: look again.
                continue;
            };
            return self.deliver_segment(ctx, outcome, candidate, grant, &snapshot).await;
        }
        tracing::debug!(consumer = %spec.name, "POP pull lost every race for a segment; answering no message");
        Ok((outcome, None))
    }

    /// The segment this pull hands out: one whose time ran out first (oldest first), else the
    /// next segment of the queue with the biggest backlog. Reads the next segment's messages.
    async fn pop_candidate(
        &self,
        ctx: &PullContext,
        snapshot: &ContextSnapshot,
        options: &PullOptions,
        max_pull: u32,
        retries_waiting: bool,
    ) -> Result<Choice<Candidate>, EngineError> {
        let (spec, key) = (&ctx.spec, &ctx.key);
        let now = self.now_ms();
        let mut expired: Vec<(u32, &PopSegment)> = snapshot
            .pop
            .iter()
            .zip(0u32..)
            .flat_map(|(p, q)| p.segments.iter().map(move |s| (q, s)))
            .filter(|(_, s)| !s.is_live(now))
            .collect();
        expired.sort_by_key(|(_, s)| s.expires_ms());
        for (queue, segment) in &expired {
            if segment.is_empty() {
                // Retry messages only: they are free again on their own; forget the carrier.
                self.inner
                    .consuming
                    .state
                    .pop_finish(key, *queue, segment.lock_time, PopFate::Release)
                    .await?;
            } else {
                return Ok(Choice::Locked(Candidate {
                    queue: *queue,
                    kind: PopTakeKind::Again {
                        seen_lock_time: segment.lock_time,
                    },
                    messages: Vec::new(),
                    force_ack: false,
                }));
            }
        }
        let queues = self.queue_count(&key.topic);
        let ranges: Vec<_> = (0..queues)
            .map(|q| self.inner.messages.queue_range(&key.topic, q))
            .collect();
        let exact_ranges = self.inner.messages.ranges_are_exact();
        // Where each queue's next segment starts: after what was handed out, never before the
        // committed offset (a pull without pop may have moved it) nor the queue's first message.
        let start = |q: u32| {
            let (pop, range) = (&snapshot.pop[q as usize], ranges[q as usize]);
            let start = pop
                .next
                .max(snapshot.queues[q as usize].committed)
                .unwrap_or(range.min)
                .max(range.min);
            if exact_ranges && start > range.max && pop.segments.is_empty() {
                range.max
            } else {
                start
            }
        };
        let backlog = |q: u32| ranges[q as usize].max.saturating_sub(start(q));
        let mut order: Vec<u32> = (0..queues)
            .filter(|&q| snapshot.pop[q as usize].segments.len() < limits::MAX_POP_SEGMENTS_PER_QUEUE)
            .collect();
        if order.is_empty() {
            return Ok(Choice::AllLocked);
        }
        order.sort_by(|&a, &b| {
            let avoided = |q| !self.inner.messages.queue_available(&key.topic, q);
            avoided(a).cmp(&avoided(b)).then(backlog(b).cmp(&backlog(a))).then(
                snapshot.queues[a as usize]
                    .last_pull_ms
                    .cmp(&snapshot.queues[b as usize].last_pull_ms),
            )
        });
        let mut failed = false;
        for &queue in &order {
            let from = start(queue);
            let next = |next_offset| PopTakeKind::Next {
                expected_next: snapshot.pop[queue as usize].next,
                offset: from,
                next_offset,
            };
            if backlog(queue) == 0 {
                if retries_waiting {
                    // Nothing new here: a segment of retry messages only.
                    return Ok(Choice::Locked(Candidate {
                        queue,
                        kind: next(from),
                        messages: Vec::new(),
                        force_ack: false,
                    }));
                }
                continue;
            }
            let read = tokio::time::timeout(
                options.read_timeout,
                self.inner
                    .messages
                    .read(&key.topic, queue, from, max_pull as usize, MAX_PULL_BYTES),
            )
            .await
            .unwrap_or_else(|_| {
                Err(mqproxy_store::StoreError::Backend(format!(
                    "the pull's read of the message store took longer than pullTimeout ({} s)",
                    options.read_timeout.as_secs()
                )))
            });
            let read = match read {
                Ok(read) => read,
                // One dead broker does not fail the pulls of the others' queues (once).
                Err(e @ mqproxy_store::StoreError::Backend(_)) if !failed && order.len() > 1 => {
                    tracing::warn!(consumer = %spec.name, queue, error = %e, "POP read failed, trying another queue");
                    failed = true;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            match (read.messages.last().map(|m| m.offset + 1), read.skip_to) {
                (Some(next_offset), _) => {
                    return Ok(Choice::Locked(Candidate {
                        queue,
                        kind: next(next_offset),
                        messages: read.messages,
                        force_ack: false,
                    }));
                }
                (None, Some(skip_to)) if skip_to > from => {
                    tracing::warn!(consumer = %spec.name, queue, from, to = skip_to, "offset illegal at the backend, POP skips ahead");
                    return Ok(Choice::Locked(Candidate {
                        queue,
                        kind: next(skip_to),
                        messages: Vec::new(),
                        force_ack: true,
                    }));
                }
                (None, _) => {}
            }
        }
        // Nothing to hand out: report the queue with the biggest backlog as it stands.
        let queue = order[0];
        self.inner
            .consuming
            .state
            .touch(key, queue, now, options.client_ip.clone())
            .await?;
        Ok(Choice::Idle(self.pop_queue_snapshot(ctx, snapshot, queue, None)))
    }

    fn pop_queue_snapshot(
        &self,
        ctx: &PullContext,
        snapshot: &ContextSnapshot,
        queue: u32,
        segment: Option<&PopSegment>,
    ) -> QueueSnapshot {
        let refs = self.inner.messages.queues(&ctx.key.topic);
        let range = self.inner.messages.queue_range(&ctx.key.topic, queue);
        let qs = &snapshot.queues[queue as usize];
        QueueSnapshot {
            topic: ctx.key.topic.clone(),
            broker_name: refs
                .get(queue as usize)
                .map(|r| r.broker_name.clone())
                .unwrap_or_default(),
            queue_id: refs.get(queue as usize).map_or(queue, |r| r.queue_id),
            min_offset: range.min,
            max_offset: range.max,
            committed: qs.committed,
            lock_time: segment.map(|s| s.lock_time),
            client_ip: segment
                .and_then(|s| s.client_ip.clone())
                .or_else(|| qs.client_ip.clone()),
        }
    }

    /// The answer for a segment taken: its messages (read now when it is handed out again),
    /// its retry messages, and its requestId.
    async fn deliver_segment(
        &self,
        ctx: &PullContext,
        mut outcome: FetchOutcome,
        candidate: Candidate,
        grant: PopGrant,
        snapshot: &ContextSnapshot,
    ) -> Result<(FetchOutcome, Option<Issued>), EngineError> {
        let key = &ctx.key;
        let segment = &grant.segment;
        let queue = candidate.queue;
        let mut retry_messages = Vec::new();
        if matches!(candidate.kind, PopTakeKind::Again { .. }) {
            let count = usize::try_from(segment.next_offset - segment.offset).unwrap_or(usize::MAX);
            let read = self
                .inner
                .messages
                .read(&key.topic, queue, segment.offset, count, usize::MAX)
                .await?;
            retry_messages.extend(
                read.messages
                    .into_iter()
                    .filter(|m| m.offset < segment.next_offset)
                    .map(to_delivered),
            );
        }
        let (found, missing) = self.read_retries(&grant.retries).await?;
        retry_messages.extend(found);
        if !missing.is_empty() {
            self.inner.consuming.state.drop_retries(key, &missing).await?;
        }
        outcome.queue = Some(self.pop_queue_snapshot(ctx, snapshot, queue, Some(segment)));
        let snapshot_queue = outcome.queue.as_ref().map(|q| (q.broker_name.clone(), q.queue_id));
        let (broker_name, queue_id) = snapshot_queue.unwrap_or_default();
        let token = BatchToken {
            broker_name,
            queue_id,
            offset: segment.offset,
            next_offset: segment.next_offset,
            lock_time: segment.lock_time,
            force_ack: candidate.force_ack,
            pop: true,
        };
        outcome.messages = candidate.messages.into_iter().map(to_delivered).collect();
        outcome.retry_messages = retry_messages;
        outcome.status = if candidate.force_ack {
            FetchStatus::OffsetIllegal
        } else if outcome.messages.is_empty() && outcome.retry_messages.is_empty() {
            // Its messages are gone (retention) or its retry messages were: done with it.
            self.inner
                .consuming
                .state
                .pop_finish(key, queue, segment.lock_time, PopFate::Ack)
                .await?;
            self.inner.consuming.notify(&key.topic);
            return Ok((
                FetchOutcome {
                    request_id: None,
                    ..outcome
                },
                None,
            ));
        } else {
            FetchStatus::Found
        };
        outcome.request_id = Some(request_id::encode(&token, &self.inner.consuming.request_id_keys, key));
        Ok((outcome, Some(Issued { token, queue })))
    }

    /// The messages of retry entries; entries whose message is gone come back separately.
    pub(super) async fn read_retries(&self, entries: &[RetryEntry]) -> Result<(Vec<Delivered>, Vec<u64>), EngineError> {
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for entry in entries {
            let location = &entry.location;
            let message = self
                .inner
                .messages
                .read(&location.topic, location.queue, location.offset, 1, MAX_PULL_BYTES)
                .await?
                .messages
                .pop();
            match message {
                Some(m) if m.offset == location.offset && m.msg_id == entry.msg_id => found.push(to_delivered(m)),
                _ => missing.push(entry.seq),
            }
        }
        Ok((found, missing))
    }

    /// Acknowledges a POP segment: it is done; the committed offset moves once every segment
    /// before it is done too.
    pub(super) async fn ack_segment(&self, key: &ContextKey, issued: &Issued) -> Result<AckOutcome, EngineError> {
        let token = &issued.token;
        let info = token.info();
        let finished = self
            .inner
            .consuming
            .state
            .pop_finish(key, issued.queue, token.lock_time, PopFate::Ack)
            .await?;
        self.inner.consuming.notify(&key.topic);
        Ok(match finished {
            PopFinished::Acked { committed: true } => AckOutcome {
                committed: true,
                message: format!("ok {info}"),
            },
            PopFinished::Acked { committed: false } => AckOutcome {
                committed: false,
                message: format!("ok, the committed offset moves once the segments before it are acknowledged {info}"),
            },
            PopFinished::NotFound | PopFinished::Released => AckOutcome {
                committed: false,
                message: format!(
                    "ack ignored: the segment is no longer in flight (acknowledged already, or handed out again after its consumeTimeout) {info}"
                ),
            },
        })
    }

    /// Gives a POP segment back: the next POP pull hands it out again, in `retryMsgList`.
    pub(super) async fn unlock_segment(&self, key: &ContextKey, issued: &Issued) -> Result<UnlockOutcome, EngineError> {
        let token = &issued.token;
        let released = self
            .inner
            .consuming
            .state
            .pop_finish(key, issued.queue, token.lock_time, PopFate::Release)
            .await?
            == PopFinished::Released;
        if released {
            self.inner.consuming.notify(&key.topic);
        }
        Ok(UnlockOutcome {
            unlocked: released,
            message: format!("{} unlock:{released}", token.info()),
        })
    }
}
