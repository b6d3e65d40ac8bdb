//! Consumer state in Redis, shared by several proxies (the Java proxy's layout): one hash per
//! consumption context, key `<prefix><group>` or `<prefix><group>:<clientId>`, fields
//! `<broker>:<queue>:cmt` (committed offset), `:l` (lock time), `:t` (last pull), `:ip`, and
//! `:lto` (`<lockTime>,<ms>`: a lock's own timeout, honoured only beside that lock time, so a
//! proxy that does not know the field cannot leave one behind for a lock it takes).
//! POP segments live in `<ctx>:pop`: `<broker>:<queue>:next` (the end of what POP pulls handed
//! out) and `<broker>:<queue>:s:<lockTime>` = `offset,nextOffset,timeoutMs,retryTimes,clientIp`.
//! Retry entries live in `<ctx>:retry` (field = seq, value = `mark|msgId,queue,offset,topic`
//! with mark empty or `queue,lockTime`), settings in `<prefix>consumer_config`
//! (`<consumer>:p`, `:rl`, `:rt`), broadcast clientIds with their last pull in the sorted set
//! `<prefix>@clients:<group>` (the set `<prefix><group>:clients` of older versions is folded in
//! on first use; `@` keeps the key apart from every context key); a topic's strict round-robin
//! counter in `<prefix>@rr:<topic>` (INCR, as the Java proxy keeps one per topic).
//!
//! Each step of [`ConsumerStateStore`] that must be atomic is one Lua script, so two proxies
//! never take the same lock or finish each other's batch. Durability is Redis's own (AOF).
//! Only this module imports the Redis client.

use super::consumer_state::{
    ConsumerStateStore, ContextSnapshot, Finished, LockGrant, LockRequest, PopFate, PopFinished, PopGrant, PopTake,
    PopTakeKind, RetryFate,
};
use super::{ConsumerSettings, ContextKey, MessageLocation, PopQueue, PopSegment, QueueState, RetryEntry, StoreError};
use async_trait::async_trait;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Takes a lock if it is still as seen and later than the last pull; claims retry entries
/// whose mark is still as seen. Returns nil, or {committed, ip, seq1, value1, seq2, ...}: the
/// state as locked and the claimed entries, read in the same atomic step.
const TRY_LOCK: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if cur ~= ARGV[4] then return nil end
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[2]) or '0')
if tonumber(ARGV[5]) <= last then return nil end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[5], ARGV[2], ARGV[5])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], ARGV[3], ARGV[6]) end
if ARGV[10] ~= '' then redis.call('HSET', KEYS[1], ARGV[9], ARGV[10]) else redis.call('HDEL', KEYS[1], ARGV[9]) end
local claimed = {redis.call('HGET', KEYS[1], ARGV[8]) or '', redis.call('HGET', KEYS[1], ARGV[3]) or ''}
claim(11, ARGV[7], claimed)
return claimed
";

/// Finishes a batch if the lock is still the one given: commit (if any), unlock, retries
/// done or freed. Returns 1 if the lock matched.
const FINISH: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur ~= ARGV[3] then return 0 end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], ARGV[2], ARGV[4]) end
redis.call('HDEL', KEYS[1], ARGV[1], ARGV[7])
settle(ARGV[6], ARGV[5])
return 1
";

/// The claim loop of a take: retry entries in KEYS[2] (pairs from ARGV[first]) whose mark is
/// still as seen get the mark `mark`; appended to `out` as seq, value.
const CLAIM_RETRIES: &str = r"
local function claim(first, mark, out)
  for i = first, #ARGV, 2 do
    local v = redis.call('HGET', KEYS[2], ARGV[i])
    if v then
      local sep = string.find(v, '|', 1, true)
      if string.sub(v, 1, sep - 1) == ARGV[i + 1] then
        local claimed_value = mark .. '|' .. string.sub(v, sep + 1)
        redis.call('HSET', KEYS[2], ARGV[i], claimed_value)
        table.insert(out, ARGV[i])
        table.insert(out, claimed_value)
      end
    end
  end
end
";

/// Settles the retry entries in KEYS[2] marked `mark`: deleted ('done') or freed.
const SETTLE_RETRIES: &str = r"
local function settle(mark, fate)
  local all = redis.call('HGETALL', KEYS[2])
  for i = 1, #all, 2 do
    local v = all[i + 1]
    local sep = string.find(v, '|', 1, true)
    if string.sub(v, 1, sep - 1) == mark then
      if fate == 'done' then
        redis.call('HDEL', KEYS[2], all[i])
      else
        redis.call('HSET', KEYS[2], all[i], '|' .. string.sub(v, sep + 1))
      end
    end
  end
end
";

/// Hands out a POP segment (KEYS: context hash, retry hash, pop hash). ARGV: 1 queue name,
/// 2 'next' or 'again', 3 the POP end seen ('' for none) or the lock time seen, 4 offset,
/// 5 next offset, 6 lock time, 7 timeout ms, 8 client ip, 9 retry mark, 10.. claims.
/// Returns nil, or {offset, nextOffset, retryTimes, seq1, value1, ...}.
const POP_TAKE: &str = r"
local q = ARGV[1]
local last = tonumber(redis.call('HGET', KEYS[1], q .. ':t') or '0')
if tonumber(ARGV[6]) <= last then return nil end
local prefix = q .. ':s:'
local offset, next_offset, retry_times
if ARGV[2] == 'next' then
  local cur = redis.call('HGET', KEYS[3], q .. ':next') or ''
  if cur ~= ARGV[3] then return nil end
  offset, next_offset, retry_times = ARGV[4], ARGV[5], '0'
  local busy = false
  local all = redis.call('HGETALL', KEYS[3])
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, #prefix) == prefix then
      local o, n = string.match(all[i + 1], '^(%d+),(%d+),')
      if o ~= n then busy = true end
    end
  end
  if not busy then redis.call('HSET', KEYS[1], q .. ':cmt', offset) end
  if tonumber(next_offset) > tonumber(offset) then redis.call('HSET', KEYS[3], q .. ':next', next_offset) end
else
  local v = redis.call('HGET', KEYS[3], prefix .. ARGV[3])
  if not v then return nil end
  local o, n, _, r = string.match(v, '^(%d+),(%d+),(%d+),(%d+),')
  offset, next_offset, retry_times = o, n, tostring(tonumber(r) + 1)
  redis.call('HDEL', KEYS[3], prefix .. ARGV[3])
end
redis.call('HSET', KEYS[3], prefix .. ARGV[6], offset .. ',' .. next_offset .. ',' .. ARGV[7] .. ',' .. retry_times .. ',' .. ARGV[8])
redis.call('HSET', KEYS[1], q .. ':t', ARGV[6])
if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], q .. ':ip', ARGV[8]) end
local out = {offset, next_offset, retry_times}
claim(10, ARGV[9], out)
return out
";

/// Ends a POP segment (KEYS as POP_TAKE). ARGV: 1 queue name, 2 lock time, 3 'ack' or
/// 'release', 4 retry mark. Returns 0 (no such segment), 1 (acked), 2 (released), 3 (acked,
/// and the committed offset moved to the first segment still in flight, or the POP end).
const POP_FINISH: &str = r"
local q = ARGV[1]
local prefix = q .. ':s:'
local field = prefix .. ARGV[2]
local v = redis.call('HGET', KEYS[3], field)
if not v then return 0 end
local o, n, _, r, ip = string.match(v, '^(%d+),(%d+),(%d+),(%d+),(.*)$')
if ARGV[3] == 'release' then
  if o == n then redis.call('HDEL', KEYS[3], field)
  else redis.call('HSET', KEYS[3], field, o .. ',' .. n .. ',0,' .. r .. ',' .. ip) end
  settle(ARGV[4], 'free')
  return 2
end
redis.call('HDEL', KEYS[3], field)
settle(ARGV[4], 'done')
local low = redis.call('HGET', KEYS[3], q .. ':next')
local all = redis.call('HGETALL', KEYS[3])
for i = 1, #all, 2 do
  if string.sub(all[i], 1, #prefix) == prefix then
    local so, sn = string.match(all[i + 1], '^(%d+),(%d+),')
    if so ~= sn and (not low or tonumber(so) < tonumber(low)) then low = so end
  end
end
if low and low ~= redis.call('HGET', KEYS[1], q .. ':cmt') then
  redis.call('HSET', KEYS[1], q .. ':cmt', low)
  return 3
end
return 1
";

/// An operator's reset (KEYS: context hash, pop hash; ARGV: queue name, offset): sets the
/// committed offset and forgets the queue's POP state.
const SET_COMMITTED: &str = r"
redis.call('HSET', KEYS[1], ARGV[1] .. ':cmt', ARGV[2])
local prefix = ARGV[1] .. ':'
local all = redis.call('HKEYS', KEYS[2])
for _, f in ipairs(all) do
  if string.sub(f, 1, #prefix) == prefix then redis.call('HDEL', KEYS[2], f) end
end
return 1
";

/// Raises the last-pull time (never lowers it: lock times must keep growing).
const TOUCH: &str = r"
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > last then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], ARGV[3], ARGV[4]) end
return 1
";

/// Admits a broadcast client: a known one gets its last pull raised, a new one is added while
/// the group has fewer than ARGV[3]. KEYS[1] the sorted set, KEYS[2] the older plain set
/// (folded in once). Returns 1 if admitted.
const ADMIT: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then
  for _, c in ipairs(redis.call('SMEMBERS', KEYS[2])) do redis.call('ZADD', KEYS[1], 'NX', ARGV[2], c) end
  redis.call('DEL', KEYS[2])
end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], 'GT', ARGV[2], ARGV[1])
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
";

/// Forgets up to ARGV[3] clients whose last pull is before ARGV[1]: their context hash, retry
/// hash and retry counter (keys ARGV[2] .. clientId), then their set entry. Checked and deleted
/// in one step, so a client admitted meanwhile is never half-forgotten. Returns how many.
const FORGET_IDLE: &str = r"
local idle = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, c in ipairs(idle) do
  local k = ARGV[2] .. c
  redis.call('DEL', k, k .. ':retry', k .. ':retry:seq', k .. ':pop')
  redis.call('ZREM', KEYS[1], c)
end
return #idle
";

/// Clients one forget step handles (a Lua script blocks Redis while it runs).
const FORGET_BATCH: usize = 500;

fn redis_err(e: redis::RedisError) -> StoreError {
    StoreError::Database(format!("redis: {e}"))
}

/// The `<broker>:<queueId>` of a topic's queue index (the route's broker name and queue id).
pub type QueueNames = Arc<dyn Fn(&str, u32) -> String + Send + Sync>;

/// The group part of a context's keys: the consumer group, or for a lite topic's context
/// `<group>$<lite>` (a group consumes one parent topic; lite names have no ':' or '$').
fn group_of<'a>(topic: &str, group: &'a str) -> std::borrow::Cow<'a, str> {
    match crate::split_lite_queue_topic(topic) {
        Some((_, lite)) => std::borrow::Cow::Owned(format!("{group}${lite}")),
        None => std::borrow::Cow::Borrowed(group),
    }
}

/// Consumer state shared through Redis.
#[derive(Clone)]
pub struct RedisConsumerState {
    connection: ConnectionManager,
    prefix: String,
    queue_names: QueueNames,
    try_lock: redis::Script,
    finish: redis::Script,
    pop_take: redis::Script,
    pop_finish: redis::Script,
    set_committed: redis::Script,
    touch: redis::Script,
    admit: redis::Script,
    forget_idle: redis::Script,
}

impl RedisConsumerState {
    /// Connects (with automatic reconnection). `prefix` namespaces every key; `broker_name`
    /// is the `<broker>` of the field names.
    ///
    /// # Errors
    /// The URL is malformed or Redis cannot be reached.
    pub async fn connect(url: &str, prefix: &str, broker_name: &str, timeout: Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(redis_err)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout));
        let connection = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(redis_err)?;
        Ok(Self {
            connection,
            prefix: prefix.to_owned(),
            queue_names: {
                let broker_name = broker_name.to_owned();
                Arc::new(move |_, queue| format!("{broker_name}:{queue}"))
            },
            try_lock: redis::Script::new(&format!("{CLAIM_RETRIES}{TRY_LOCK}")),
            finish: redis::Script::new(&format!("{SETTLE_RETRIES}{FINISH}")),
            pop_take: redis::Script::new(&format!("{CLAIM_RETRIES}{POP_TAKE}")),
            pop_finish: redis::Script::new(&format!("{SETTLE_RETRIES}{POP_FINISH}")),
            set_committed: redis::Script::new(SET_COMMITTED),
            touch: redis::Script::new(TOUCH),
            admit: redis::Script::new(ADMIT),
            forget_idle: redis::Script::new(FORGET_IDLE),
        })
    }

    fn key(&self, ctx: &ContextKey) -> String {
        let group = group_of(&ctx.topic, &ctx.group);
        match &ctx.client_id {
            Some(c) => format!("{}{group}:{c}", self.prefix),
            None => format!("{}{group}", self.prefix),
        }
    }

    fn retry_key(&self, ctx: &ContextKey) -> String {
        format!("{}:retry", self.key(ctx))
    }

    fn pop_key(&self, ctx: &ContextKey) -> String {
        format!("{}:pop", self.key(ctx))
    }

    fn clients_key(&self, group: &str) -> String {
        format!("{}@clients:{group}", self.prefix)
    }

    /// The plain set of clientIds older versions kept.
    fn legacy_clients_key(&self, group: &str) -> String {
        format!("{}{group}:clients", self.prefix)
    }

    /// Names queues as the message store's route does (a RocketMQ topic spans brokers).
    #[must_use]
    pub fn with_queue_names(mut self, names: QueueNames) -> Self {
        self.queue_names = names;
        self
    }

    fn field(&self, ctx: &ContextKey, queue: u32, flag: &str) -> String {
        format!("{}:{flag}", (self.queue_names)(&ctx.topic, queue))
    }

    /// The `<ctx>:pop` hash back to one [`PopQueue`] per queue.
    fn parse_pop(
        &self,
        ctx: &ContextKey,
        queues: u32,
        fields: &HashMap<String, String>,
    ) -> Result<Vec<PopQueue>, StoreError> {
        let mut pop = vec![PopQueue::default(); queues as usize];
        if fields.is_empty() {
            return Ok(pop);
        }
        let index: HashMap<String, usize> = (0..queues)
            .map(|q| ((self.queue_names)(&ctx.topic, q), q as usize))
            .collect();
        let corrupt = |f: &str, v: &str| StoreError::Corrupt(format!("POP field {f}: {v:?}"));
        for (field, value) in fields {
            if let Some(name) = field.strip_suffix(":next") {
                if let Some(&q) = index.get(name) {
                    pop[q].next = Some(value.parse().map_err(|_| corrupt(field, value))?);
                }
            } else if let Some((name, lock_time)) = field.rsplit_once(":s:")
                && let Some(&q) = index.get(name)
            {
                let lock_time = lock_time.parse().map_err(|_| corrupt(field, value))?;
                pop[q]
                    .segments
                    .push(parse_segment(lock_time, value).ok_or_else(|| corrupt(field, value))?);
            }
        }
        for p in &mut pop {
            p.segments.sort_by_key(|s| (s.offset, s.lock_time));
        }
        Ok(pop)
    }
}

/// `offset,nextOffset,timeoutMs,retryTimes,clientIp` back to a segment.
fn parse_segment(lock_time: u64, value: &str) -> Option<PopSegment> {
    let mut parts = value.splitn(5, ',');
    let mut number = || parts.next()?.parse::<u64>().ok();
    let (offset, next_offset, timeout_ms, retry_times) = (number()?, number()?, number()?, number()?);
    let ip = parts.next()?;
    Some(PopSegment {
        lock_time,
        offset,
        next_offset,
        timeout_ms,
        retry_times: u32::try_from(retry_times).ok()?,
        client_ip: (!ip.is_empty()).then(|| ip.to_owned()),
    })
}

fn mark(in_flight: Option<(u32, u64)>) -> String {
    in_flight.map(|(q, l)| format!("{q},{l}")).unwrap_or_default()
}

/// A `:lto` value (`<lockTime>,<ms>`): the timeout, when it belongs to `lock_time`.
fn parse_lock_timeout(value: &str, lock_time: u64) -> Option<u64> {
    let (lock, timeout) = value.split_once(',')?;
    (lock.parse::<u64>().ok()? == lock_time).then(|| timeout.parse().ok())?
}

fn parse_mark(s: &str) -> Option<(u32, u64)> {
    let (q, l) = s.split_once(',')?;
    Some((q.parse().ok()?, l.parse().ok()?))
}

fn payload(entry_msg_id: &[u8; 16], location: &MessageLocation) -> String {
    format!(
        "{},{},{},{}",
        hex::encode_upper(entry_msg_id),
        location.queue,
        location.offset,
        location.topic
    )
}

/// `mark|msgId,queue,offset,topic` back to an entry.
fn parse_retry(seq: &str, value: &str) -> Result<RetryEntry, StoreError> {
    let corrupt = || StoreError::Corrupt(format!("retry entry {seq}: {value:?}"));
    let (mark_text, rest) = value.split_once('|').ok_or_else(corrupt)?;
    let mut parts = rest.splitn(4, ',');
    let (Some(id), Some(queue), Some(offset), Some(topic)) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(corrupt());
    };
    let msg_id: [u8; 16] = hex::decode(id)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(corrupt)?;
    Ok(RetryEntry {
        seq: seq.parse().map_err(|_| corrupt())?,
        msg_id,
        location: MessageLocation {
            topic: topic.to_owned(),
            queue: queue.parse().map_err(|_| corrupt())?,
            offset: offset.parse().map_err(|_| corrupt())?,
        },
        in_flight: parse_mark(mark_text),
    })
}

#[async_trait]
impl ConsumerStateStore for RedisConsumerState {
    async fn shared_secret(&self) -> Result<Option<[u8; 32]>, StoreError> {
        // The first proxy sets it; everyone reads the winner ('@' is not in RocketMQ group names).
        let key = format!("{}@secret", self.prefix);
        let mut con = self.connection.clone();
        let mine: [u8; 32] = rand::random();
        let _: bool = con.set_nx(&key, hex::encode(mine)).await.map_err(redis_err)?;
        let stored: String = con.get(&key).await.map_err(redis_err)?;
        let mut secret = [0u8; 32];
        hex::decode_to_slice(stored.trim(), &mut secret)
            .map_err(|e| StoreError::Corrupt(format!("{key} is not a 64-hex-digit key: {e}")))?;
        Ok(Some(secret))
    }

    async fn snapshot(&self, ctx: &ContextKey, queues: u32) -> Result<ContextSnapshot, StoreError> {
        let mut con = self.connection.clone();
        let (fields, retry_fields, pop_fields): (
            HashMap<String, String>,
            HashMap<String, String>,
            HashMap<String, String>,
        ) = redis::pipe()
            .hgetall(self.key(ctx))
            .hgetall(self.retry_key(ctx))
            .hgetall(self.pop_key(ctx))
            .query_async(&mut con)
            .await
            .map_err(redis_err)?;
        let number = |queue: u32, flag: &str| {
            fields
                .get(&self.field(ctx, queue, flag))
                .and_then(|v| v.parse::<u64>().ok())
        };
        let queue_states = (0..queues)
            .map(|q| {
                let lock_time = number(q, "l");
                QueueState {
                    committed: number(q, "cmt"),
                    lock_time,
                    last_pull_ms: number(q, "t").unwrap_or(0),
                    client_ip: fields.get(&self.field(ctx, q, "ip")).cloned(),
                    lock_timeout_ms: lock_time
                        .and_then(|l| parse_lock_timeout(fields.get(&self.field(ctx, q, "lto"))?, l)),
                }
            })
            .collect();
        let mut retries = retry_fields
            .iter()
            .map(|(k, v)| parse_retry(k, v))
            .collect::<Result<Vec<_>, _>>()?;
        retries.sort_by_key(|e| e.seq);
        Ok(ContextSnapshot {
            queues: queue_states,
            retries,
            pop: self.parse_pop(ctx, queues, &pop_fields)?,
        })
    }

    async fn try_lock(&self, ctx: &ContextKey, request: LockRequest) -> Result<Option<LockGrant>, StoreError> {
        let mut con = self.connection.clone();
        let new_mark = mark(Some((request.queue, request.lock_time)));
        let mut invocation = self.try_lock.key(self.key(ctx));
        invocation
            .key(self.retry_key(ctx))
            .arg(self.field(ctx, request.queue, "l"))
            .arg(self.field(ctx, request.queue, "t"))
            .arg(self.field(ctx, request.queue, "ip"))
            .arg(request.seen.map(|s| s.to_string()).unwrap_or_default())
            .arg(request.lock_time)
            .arg(request.client_ip.clone().unwrap_or_default())
            .arg(&new_mark)
            .arg(self.field(ctx, request.queue, "cmt"))
            .arg(self.field(ctx, request.queue, "lto"))
            .arg(
                request
                    .timeout_ms
                    .map(|t| format!("{},{t}", request.lock_time))
                    .unwrap_or_default(),
            );
        for (seq, seen) in &request.claim_retries {
            invocation.arg(seq).arg(mark(*seen));
        }
        let reply: Option<Vec<String>> = invocation.invoke_async(&mut con).await.map_err(redis_err)?;
        let Some(reply) = reply else { return Ok(None) };
        let [committed, ip, claimed @ ..] = reply.as_slice() else {
            return Err(StoreError::Corrupt("try_lock script answered too few values".into()));
        };
        let state = QueueState {
            committed: committed.parse().ok(),
            lock_time: Some(request.lock_time),
            last_pull_ms: request.lock_time,
            client_ip: (!ip.is_empty()).then(|| ip.clone()),
            lock_timeout_ms: request.timeout_ms,
        };
        let retries = claimed
            .chunks_exact(2)
            .map(|pair| parse_retry(&pair[0], &pair[1]))
            .collect::<Result<_, _>>()?;
        Ok(Some(LockGrant { state, retries }))
    }

    async fn touch(
        &self,
        ctx: &ContextKey,
        queue: u32,
        now_ms: u64,
        client_ip: Option<String>,
    ) -> Result<(), StoreError> {
        let mut con = self.connection.clone();
        let _: i64 = self
            .touch
            .key(self.key(ctx))
            .arg(self.field(ctx, queue, "t"))
            .arg(now_ms)
            .arg(self.field(ctx, queue, "ip"))
            .arg(client_ip.unwrap_or_default())
            .invoke_async(&mut con)
            .await
            .map_err(redis_err)?;
        Ok(())
    }

    async fn set_committed(&self, ctx: &ContextKey, queue: u32, offset: u64) -> Result<(), StoreError> {
        let mut con = self.connection.clone();
        let _: i64 = self
            .set_committed
            .key(self.key(ctx))
            .key(self.pop_key(ctx))
            .arg((self.queue_names)(&ctx.topic, queue))
            .arg(offset)
            .invoke_async(&mut con)
            .await
            .map_err(redis_err)?;
        Ok(())
    }

    async fn pop_take(&self, ctx: &ContextKey, take: PopTake) -> Result<Option<PopGrant>, StoreError> {
        let mut con = self.connection.clone();
        let mut invocation = self.pop_take.key(self.key(ctx));
        invocation
            .key(self.retry_key(ctx))
            .key(self.pop_key(ctx))
            .arg((self.queue_names)(&ctx.topic, take.queue));
        match &take.kind {
            PopTakeKind::Next {
                expected_next,
                offset,
                next_offset,
            } => invocation
                .arg("next")
                .arg(expected_next.map(|n| n.to_string()).unwrap_or_default())
                .arg(offset)
                .arg(next_offset),
            PopTakeKind::Again { seen_lock_time } => invocation.arg("again").arg(seen_lock_time).arg(0).arg(0),
        };
        invocation
            .arg(take.lock_time)
            .arg(take.timeout_ms)
            .arg(take.client_ip.clone().unwrap_or_default())
            .arg(mark(Some((take.queue, take.lock_time))));
        for (seq, seen) in &take.claim_retries {
            invocation.arg(seq).arg(mark(*seen));
        }
        let reply: Option<Vec<String>> = invocation.invoke_async(&mut con).await.map_err(redis_err)?;
        let Some(reply) = reply else { return Ok(None) };
        let [offset, next_offset, retry_times, claimed @ ..] = reply.as_slice() else {
            return Err(StoreError::Corrupt("pop_take script answered too few values".into()));
        };
        let corrupt = || StoreError::Corrupt(format!("pop_take script answered {reply:?}"));
        let segment = PopSegment {
            lock_time: take.lock_time,
            offset: offset.parse().map_err(|_| corrupt())?,
            next_offset: next_offset.parse().map_err(|_| corrupt())?,
            timeout_ms: take.timeout_ms,
            retry_times: retry_times.parse().map_err(|_| corrupt())?,
            client_ip: take.client_ip,
        };
        let retries = claimed
            .chunks_exact(2)
            .map(|pair| parse_retry(&pair[0], &pair[1]))
            .collect::<Result<_, _>>()?;
        Ok(Some(PopGrant { segment, retries }))
    }

    async fn pop_finish(
        &self,
        ctx: &ContextKey,
        queue: u32,
        lock_time: u64,
        fate: PopFate,
    ) -> Result<PopFinished, StoreError> {
        let mut con = self.connection.clone();
        let code: i64 = self
            .pop_finish
            .key(self.key(ctx))
            .key(self.retry_key(ctx))
            .key(self.pop_key(ctx))
            .arg((self.queue_names)(&ctx.topic, queue))
            .arg(lock_time)
            .arg(if fate == PopFate::Ack { "ack" } else { "release" })
            .arg(mark(Some((queue, lock_time))))
            .invoke_async(&mut con)
            .await
            .map_err(redis_err)?;
        Ok(match code {
            0 => PopFinished::NotFound,
            2 => PopFinished::Released,
            3 => PopFinished::Acked { committed: true },
            _ => PopFinished::Acked { committed: false },
        })
    }

    async fn finish(
        &self,
        ctx: &ContextKey,
        queue: u32,
        lock_time: u64,
        commit: Option<u64>,
        retries: RetryFate,
    ) -> Result<Finished, StoreError> {
        let mut con = self.connection.clone();
        let matched: i64 = self
            .finish
            .key(self.key(ctx))
            .key(self.retry_key(ctx))
            .arg(self.field(ctx, queue, "l"))
            .arg(self.field(ctx, queue, "cmt"))
            .arg(lock_time)
            .arg(commit.map(|c| c.to_string()).unwrap_or_default())
            .arg(if retries == RetryFate::Done { "done" } else { "free" })
            .arg(mark(Some((queue, lock_time))))
            .arg(self.field(ctx, queue, "lto"))
            .invoke_async(&mut con)
            .await
            .map_err(redis_err)?;
        Ok(Finished::done(matched == 1))
    }

    async fn drop_retries(&self, ctx: &ContextKey, seqs: &[u64]) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let mut con = self.connection.clone();
        let _: usize = con.hdel(self.retry_key(ctx), seqs).await.map_err(redis_err)?;
        Ok(())
    }

    async fn add_retry(&self, ctx: &ContextKey, msg_id: [u8; 16], location: MessageLocation) -> Result<(), StoreError> {
        let mut con = self.connection.clone();
        let seq: i64 = con
            .incr(format!("{}:seq", self.retry_key(ctx)), 1)
            .await
            .map_err(redis_err)?;
        let value = format!("|{}", payload(&msg_id, &location));
        let _: usize = con.hset(self.retry_key(ctx), seq, value).await.map_err(redis_err)?;
        Ok(())
    }

    async fn client_ids(&self, topic: &str, group: &str) -> Result<Vec<String>, StoreError> {
        let group = &group_of(topic, group);
        let mut con = self.connection.clone();
        let mut ids: std::collections::BTreeSet<String> = con
            .zrange::<_, Vec<String>>(self.clients_key(group), 0, -1)
            .await
            .map_err(redis_err)?
            .into_iter()
            .collect();
        let legacy: Vec<String> = con.smembers(self.legacy_clients_key(group)).await.map_err(redis_err)?;
        ids.extend(legacy);
        Ok(ids.into_iter().collect())
    }

    async fn admit_client(&self, ctx: &ContextKey, now_ms: u64, max_clients: u32) -> Result<bool, StoreError> {
        let Some(client) = &ctx.client_id else { return Ok(true) };
        let mut con = self.connection.clone();
        let admitted: i64 = self
            .admit
            .key(self.clients_key(&group_of(&ctx.topic, &ctx.group)))
            .key(self.legacy_clients_key(&group_of(&ctx.topic, &ctx.group)))
            .arg(client)
            .arg(now_ms)
            .arg(max_clients)
            .invoke_async(&mut con)
            .await
            .map_err(redis_err)?;
        Ok(admitted == 1)
    }

    async fn forget_idle_clients(&self, topic: &str, group: &str, idle_before_ms: u64) -> Result<usize, StoreError> {
        let group = &group_of(topic, group);
        let mut con = self.connection.clone();
        let mut forgotten = 0;
        loop {
            let n: usize = self
                .forget_idle
                .key(self.clients_key(group))
                .arg(idle_before_ms)
                .arg(format!("{}{group}:", self.prefix))
                .arg(FORGET_BATCH)
                .invoke_async(&mut con)
                .await
                .map_err(redis_err)?;
            forgotten += n;
            if n < FORGET_BATCH {
                return Ok(forgotten);
            }
        }
    }

    async fn forget_context(&self, ctx: &ContextKey) -> Result<(), StoreError> {
        let mut con = self.connection.clone();
        let key = self.key(ctx);
        let _: usize = con
            .del(&[
                key.clone(),
                self.retry_key(ctx),
                format!("{}:seq", self.retry_key(ctx)),
                self.pop_key(ctx),
            ])
            .await
            .map_err(redis_err)?;
        if let Some(client) = &ctx.client_id {
            let _: usize = con
                .zrem(self.clients_key(&group_of(&ctx.topic, &ctx.group)), client)
                .await
                .map_err(redis_err)?;
        }
        Ok(())
    }

    async fn settings(&self, consumer: &str) -> Result<Option<ConsumerSettings>, StoreError> {
        let mut con = self.connection.clone();
        let key = format!("{}consumer_config", self.prefix);
        let values: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&key)
            .arg(format!("{consumer}:p"))
            .arg(format!("{consumer}:rl"))
            .arg(format!("{consumer}:rt"))
            .arg(format!("{consumer}:ct"))
            .arg(format!("{consumer}:mps"))
            .query_async(&mut con)
            .await
            .map_err(redis_err)?;
        let [paused, limited, rate, timeout, pull] = values.as_slice() else {
            return Err(StoreError::Corrupt("HMGET answered the wrong number of fields".into()));
        };
        let Some(rate) = rate.as_deref().and_then(|r| r.parse::<f64>().ok()) else {
            return Ok(None);
        };
        Ok(Some(ConsumerSettings {
            paused: paused.as_deref() == Some("1"),
            rate_limit_enabled: limited.as_deref() == Some("1"),
            limit_rate: rate.max(1.0) as u64,
            consume_timeout_ms: timeout.as_deref().and_then(|v| v.parse().ok()),
            max_pull_size: pull.as_deref().and_then(|v| v.parse().ok()),
        }))
    }

    async fn put_settings(&self, consumer: &str, settings: ConsumerSettings) -> Result<(), StoreError> {
        let mut con = self.connection.clone();
        let key = format!("{}consumer_config", self.prefix);
        let flag = |b: bool| if b { "1" } else { "0" }.to_owned();
        let items = [
            (format!("{consumer}:p"), flag(settings.paused)),
            (format!("{consumer}:rl"), flag(settings.rate_limit_enabled)),
            (format!("{consumer}:rt"), settings.limit_rate.to_string()),
        ];
        let _: () = con.hset_multiple(&key, &items).await.map_err(redis_err)?;
        // Overrides: set, or removed when back to the registry's value.
        for (field, value) in [
            (
                format!("{consumer}:ct"),
                settings.consume_timeout_ms.map(|v| v.to_string()),
            ),
            (format!("{consumer}:mps"), settings.max_pull_size.map(|v| v.to_string())),
        ] {
            let _: () = match value {
                Some(v) => con.hset(&key, field, v).await.map_err(redis_err)?,
                None => con.hdel(&key, field).await.map_err(redis_err)?,
            };
        }
        Ok(())
    }

    async fn next_turn(&self, topic: &str) -> Result<u64, StoreError> {
        // INCR answers the count after this turn; turns count from 0 ('@' keeps the key apart
        // from every context key).
        let mut con = self.connection.clone();
        let after: u64 = con
            .incr(format!("{}@rr:{topic}", self.prefix), 1)
            .await
            .map_err(redis_err)?;
        Ok(after.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared contract against a real Redis: `MQPROXY_TEST_REDIS_URL` (CI starts one).
    #[tokio::test]
    async fn redis_state_keeps_the_contract() {
        let Ok(url) = std::env::var("MQPROXY_TEST_REDIS_URL") else {
            eprintln!("skipped: set MQPROXY_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379) to run");
            return;
        };
        let prefix = format!("mqproxy-test-{}:", rand::random::<u64>());
        let state = RedisConsumerState::connect(&url, &prefix, "broker-a", Duration::from_secs(3))
            .await
            .expect("connect to Redis");
        crate::consumer_state::contract::check(&state).await;
    }

    #[test]
    fn retry_values_round_trip() {
        let location = MessageLocation {
            topic: "t-1".into(),
            queue: 3,
            offset: 9,
        };
        let value = format!("2,7|{}", payload(&[0xAB; 16], &location));
        let entry = parse_retry("5", &value).expect("parse");
        assert_eq!(
            (entry.seq, entry.in_flight, entry.location),
            (5, Some((2, 7)), location)
        );
        assert!(parse_retry("x", "no separator").is_err());
    }
}
