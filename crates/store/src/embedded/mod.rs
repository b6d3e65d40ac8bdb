//! The embedded store (the default), under `data_dir`: message bodies in a commit log
//! (`log/`: append-only segments, [`log`]) with an index file per queue (`index/`, [`index`]),
//! and the small, rarely written state (consumer offsets, the delay schedule, identity, queue
//! numbers) in one redb database. `layout = "redb"` keeps the bodies in redb too (the layout
//! before the commit log).
//!
//! All writes go through one writer thread ([`writer`]) that takes every write waiting in its
//! channel, applies them together and flushes once: concurrent produce requests share one
//! fdatasync (group commit). A caller is answered only after the flush that holds its write.
//! The same thread moves due delayed messages into their queues and drops expired messages,
//! so the store has exactly one writer and the in-memory queue ranges change only after a
//! flush.

mod codec;
mod index;
mod log;
mod writer;

use super::{
    AppendOutcome, ConsumerOp, ConsumerSnapshot, ConsumerStore, DELAY_LEVELS_MS, Delivery, MessageLocation,
    MessageStore, NewRecord, PendingWrite, QueueRange, QueueRef, ReadOutcome, StoreError, StoreIdentity, StoreStats,
    StoredMessage,
};
use crate::settings::{Bounds, SettingError};
use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock, mpsc};
use tokio::sync::oneshot;
use writer::WriteOp;

/// Messages by (topic, queue, offset).
const MESSAGES: TableDefinition<(&str, u32, u64), &[u8]> = TableDefinition::new("messages");
/// Delayed and timer messages by (due epoch ms, schedule sequence).
const SCHEDULE: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("schedule");
/// msgId -> location, for the operator's "resend message".
const MSG_INDEX: TableDefinition<&[u8], &[u8]> = TableDefinition::new("msg_index");
/// (topic, queue) -> the queue's number in the commit log's records and index files.
const QUEUE_NUMBERS: TableDefinition<(&str, u32), u32> = TableDefinition::new("queue_numbers");
/// (context, queue) -> queue state.
const CONSUMER_QUEUES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("consumer_queues");
/// (context, seq) -> retry entry.
const RETRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("retries");
/// consumer -> settings.
const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("consumer_settings");
/// Identity and counters.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// When a produce is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlushPolicy {
    /// After the commit is on disk (fsync): nothing answered 200 is lost by a crash.
    Sync,
    /// After the commit, before it is durable; a background flush makes it durable every
    /// `async_flush_interval_ms`. redb keeps non-durable commits in the process, so any crash
    /// (kill -9 included, not only power loss) may lose the last interval.
    Async,
}

/// Where the embedded store keeps message bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// A commit log of fixed-size segments and an index file per queue (the default).
    Log,
    /// In the redb database, beside the consumer state (the layout before the commit log).
    Redb,
}

/// The `[store]` section: how the embedded store writes, caches and expires.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedSettings {
    pub layout: Layout,
    /// The size of a commit-log segment (MiB): retention removes whole segments.
    pub segment_mib: u64,
    pub flush: FlushPolicy,
    /// A flush longer than this answers FLUSH_DISK_TIMEOUT (the message is kept).
    pub flush_timeout_ms: u64,
    /// With `flush = "async"`: how often the data is made durable.
    pub async_flush_interval_ms: u64,
    /// redb's page cache in MiB (its default, 1 GiB, would be the process's RSS under load;
    /// the OS page cache holds the rest of the hot data).
    pub cache_mib: u64,
    /// Below this much free disk (MiB) no message is stored (507), below a quarter of it no
    /// write at all; 0 turns the check off.
    pub min_free_disk_mib: u64,
    /// Appends (MiB) that may wait for the writer; more are refused at once (503).
    pub max_pending_write_mib: u64,
    /// Most writes one commit takes; 1 turns group commit off (one flush per write).
    pub group_commit_max: u64,
    /// Messages older than this are deleted.
    pub retention_ms: u64,
    /// How often expired messages are looked for.
    pub retention_check_interval_ms: u64,
}

impl Default for EmbeddedSettings {
    fn default() -> Self {
        Self {
            layout: Layout::Log,
            segment_mib: 128,
            flush: FlushPolicy::Sync,
            flush_timeout_ms: 5_000,
            // Each durable checkpoint stalls the writer in proportion to what piled up: 1 s
            // gave a p99.9 of ~80-100 ms at 64 producers, 200 ms ~40 ms (BENCHMARKS.md).
            async_flush_interval_ms: 200,
            cache_mib: 64,
            min_free_disk_mib: 256,
            max_pending_write_mib: 256,
            group_commit_max: 4_096,
            retention_ms: 72 * 3_600_000,
            retention_check_interval_ms: 60_000,
        }
    }
}

const MIB: u64 = 1 << 20;
const DAY_MS: u64 = 86_400_000;

impl EmbeddedSettings {
    /// Checks every range.
    ///
    /// # Errors
    /// The first value out of its range, named by its key in the section.
    pub fn check(&self) -> Result<(), SettingError> {
        Bounds::new(1, 4_096).setting("segment_mib", self.segment_mib)?;
        Bounds::new(1, 600_000).setting("flush_timeout_ms", self.flush_timeout_ms)?;
        Bounds::new(1, 600_000).setting("async_flush_interval_ms", self.async_flush_interval_ms)?;
        Bounds::new(1, 1 << 20).setting("cache_mib", self.cache_mib)?;
        Bounds::new(0, 1 << 30).setting("min_free_disk_mib", self.min_free_disk_mib)?;
        Bounds::new(1, 1 << 20).setting("max_pending_write_mib", self.max_pending_write_mib)?;
        Bounds::new(1, 1_000_000).setting("group_commit_max", self.group_commit_max)?;
        Bounds::new(1_000, 10 * 365 * DAY_MS).setting("retention_ms", self.retention_ms)?;
        Bounds::new(100, DAY_MS).setting("retention_check_interval_ms", self.retention_check_interval_ms)
    }

    fn cache_bytes(&self) -> usize {
        usize::try_from(self.cache_mib.saturating_mul(MIB)).unwrap_or(usize::MAX)
    }

    fn max_pending_write_bytes(&self) -> usize {
        usize::try_from(self.max_pending_write_mib.saturating_mul(MIB)).unwrap_or(usize::MAX)
    }

    fn segment_bytes(&self) -> u64 {
        self.segment_mib.saturating_mul(MIB)
    }

    pub(crate) fn min_free_disk_bytes(&self) -> u64 {
        self.min_free_disk_mib.saturating_mul(MIB)
    }
}

/// What the embedded store is opened with: where, which queues, and its settings.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    pub data_dir: PathBuf,
    /// The topics and their queue counts (the queues whose ranges are tracked).
    pub topics: Vec<(String, u32)>,
    /// The broker name of every queue (one store, one "broker").
    pub broker_name: String,
    pub settings: EmbeddedSettings,
}

/// The embedded store handle (cheap to clone).
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Bytes of appends sent to the writer and not yet taken by it.
    pending_bytes: Arc<std::sync::atomic::AtomicUsize>,
    max_pending_bytes: usize,
    db: Arc<Database>,
    ranges: Arc<RwLock<HashMap<(String, u32), QueueRange>>>,
    tx: std::sync::Mutex<Option<mpsc::Sender<WriteOp>>>,
    identity: StoreIdentity,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    visible: Arc<crate::TopicSignals>,
    queues: RwLock<HashMap<String, Arc<[QueueRef]>>>,
    /// The route of every lite topic (queue 0 of this store), shared by all of them.
    lite_route: Arc<[QueueRef]>,
    /// The commit log, with `layout = "log"`.
    log: Option<Arc<LogShared>>,
    path: PathBuf,
    broker_name: String,
}

/// The numbers commit-log records and index files name queues by (assigned on a queue's
/// first append, kept in redb). By topic, then queue id: a look-up by `&str` allocates nothing.
#[derive(Debug, Default)]
pub(super) struct QueueNumbers {
    by_topic: HashMap<String, HashMap<u32, u32>>,
    by_number: HashMap<u32, (String, u32)>,
}

impl QueueNumbers {
    pub(super) fn get(&self, topic: &str, queue: u32) -> Option<u32> {
        self.by_topic.get(topic)?.get(&queue).copied()
    }

    pub(super) fn name(&self, number: u32) -> Option<&(String, u32)> {
        self.by_number.get(&number)
    }

    pub(super) fn insert(&mut self, topic: &str, queue: u32, number: u32) {
        self.by_topic.entry(topic.to_owned()).or_default().insert(queue, number);
        self.by_number.insert(number, (topic.to_owned(), queue));
    }

    pub(super) fn remove(&mut self, topic: &str, queue: u32) -> Option<u32> {
        let queues = self.by_topic.get_mut(topic)?;
        let number = queues.remove(&queue)?;
        if queues.is_empty() {
            self.by_topic.remove(topic);
        }
        self.by_number.remove(&number);
        Some(number)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&(String, u32), u32)> {
        self.by_number.iter().map(|(n, k)| (k, *n))
    }
}

/// The commit log as readers see it: its segments, the index files, the queue numbers.
#[derive(Debug)]
pub(super) struct LogShared {
    segments: Arc<log::Segments>,
    indexes: Arc<index::Indexes>,
    numbers: RwLock<QueueNumbers>,
}

impl LogShared {
    fn number(&self, topic: &str, queue: u32) -> Option<u32> {
        self.numbers.read().ok()?.get(topic, queue)
    }

    /// Up to `max` messages of a queue from `from` (within `range`, already clamped), stopping
    /// before the bodies pass `max_bytes` (the first always comes). A record the disk damaged
    /// is left out with an error in the log, so consumers go on past it.
    fn read(&self, number: u32, from: u64, max: usize, max_bytes: usize) -> Result<Vec<StoredMessage>, StoreError> {
        let entries = self.indexes.read(number, from, max)?;
        // Records within the byte budget (sizes include the small headers).
        let mut budget = 0usize;
        let mut take = 0;
        for entry in &entries {
            budget += entry.size as usize;
            if budget > max_bytes.saturating_add(256) && take > 0 {
                break;
            }
            take += 1;
        }
        let mut out = Vec::with_capacity(take);
        let mut bytes = 0;
        let mut i = 0;
        while i < take {
            // Records side by side in the log are read with one pread.
            let mut end = i + 1;
            while end < take && entries[end].pos == entries[end - 1].pos + u64::from(entries[end - 1].size) {
                end += 1;
            }
            let first = entries[i].pos;
            let span = (entries[end - 1].pos + u64::from(entries[end - 1].size) - first) as usize;
            let chunk = match self.segments.read(first, span) {
                Ok(chunk) => chunk,
                // Retention removed its segment since the range was read: nothing to read here.
                Err(_) if self.segments.start().is_none_or(|start| first < start) => break,
                Err(e) if out.is_empty() => return Err(e),
                Err(_) => break,
            };
            for (k, entry) in entries[i..end].iter().enumerate() {
                let at = (entry.pos - first) as usize;
                let offset = from + (i + k) as u64;
                let Some(payload) = chunk.get(at..at + entry.size as usize).and_then(log::payload_of) else {
                    tracing::error!(
                        number,
                        offset,
                        pos = entry.pos,
                        "a damaged commit-log record is skipped"
                    );
                    continue;
                };
                let message = codec::decode_log_message(payload)?;
                bytes += message.record.body.len();
                if bytes > max_bytes && !out.is_empty() {
                    return Ok(out);
                }
                out.push(StoredMessage {
                    msg_id: message.record.msg_id,
                    client_msg_id: None,
                    offset,
                    store_ms: message.store_ms,
                    keys: message.record.keys,
                    born_host: message.record.born_host,
                    body: message.record.body,
                });
            }
            i = end;
        }
        Ok(out)
    }

    /// Where the message with `msg_id` sits: the newest segment's msgIds first.
    fn locate(&self, msg_id: &[u8; 16]) -> Result<Option<MessageLocation>, StoreError> {
        let fp = index::fingerprint(msg_id);
        for base in self.segments.bases().into_iter().rev() {
            for pos in self.indexes.id_candidates(base, fp)? {
                let Ok(payload) = self.segments.read_record_at(pos) else {
                    continue;
                };
                let message = codec::decode_log_message(&payload)?;
                if message.record.msg_id != *msg_id || message.copy {
                    continue;
                }
                let Some((topic, queue)) = self
                    .numbers
                    .read()
                    .ok()
                    .and_then(|n| n.name(message.queue_number).cloned())
                else {
                    continue;
                };
                if let Some(offset) = self.indexes.offset_of(message.queue_number, pos)? {
                    return Ok(Some(MessageLocation { topic, queue, offset }));
                }
            }
        }
        Ok(None)
    }
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Database(e.to_string())
}

impl EmbeddedStore {
    /// Opens (or creates) the database in `config.data_dir` and starts the writer thread.
    ///
    /// # Errors
    /// When the directory cannot be created or the database cannot be opened.
    pub fn open(config: EmbeddedConfig) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&config.data_dir)?;
        let path = config.data_dir.join("mqproxy.redb");
        let db = Arc::new(
            redb::Builder::new()
                .set_cache_size(config.settings.cache_bytes())
                .create(&path)
                .map_err(db_err)?,
        );
        let (identity, counters) = writer::init(&db)?;
        let (ranges, lite_topics, log) = match config.settings.layout {
            Layout::Redb => {
                writer::refuse_log_data(&config.data_dir)?;
                let (ranges, lite_topics) = load_ranges(&db, &config.topics)?;
                (ranges, lite_topics, None)
            }
            Layout::Log => {
                let opened = writer::open_log(&db, &config)?;
                (opened.ranges, opened.lite_topics, Some((opened.shared, opened.state)))
            }
        };
        let ranges = Arc::new(RwLock::new(ranges));
        let (tx, rx) = mpsc::channel();
        let visible = Arc::new(crate::TopicSignals::default());
        let pending_bytes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (log_shared, log_state) = log.unzip();
        let writer = writer::Writer::new(
            db.clone(),
            ranges.clone(),
            visible.clone(),
            &config,
            counters,
            pending_bytes.clone(),
            log_state,
        )?;
        let thread = writer::spawn(writer, rx)?;
        tracing::info!(
            path = %config.data_dir.display(),
            layout = ?config.settings.layout,
            flush = ?config.settings.flush,
            "embedded store open"
        );
        let lite_route: Arc<[QueueRef]> = Arc::from(vec![QueueRef {
            broker_name: config.broker_name.clone(),
            queue_id: 0,
        }]);
        let mut queues: HashMap<String, Arc<[QueueRef]>> = config
            .topics
            .iter()
            .map(|(topic, n)| {
                let refs: Arc<[QueueRef]> = (0..*n)
                    .map(|queue_id| QueueRef {
                        broker_name: config.broker_name.clone(),
                        queue_id,
                    })
                    .collect();
                (topic.clone(), refs)
            })
            .collect();
        queues.extend(lite_topics.into_iter().map(|t| (t, lite_route.clone())));
        Ok(Self {
            inner: Arc::new(Inner {
                pending_bytes,
                max_pending_bytes: config.settings.max_pending_write_bytes(),
                db,
                ranges,
                tx: std::sync::Mutex::new(Some(tx)),
                identity,
                thread: std::sync::Mutex::new(Some(thread)),
                visible,
                queues: RwLock::new(queues),
                lite_route,
                log: log_shared,
                path,
                broker_name: config.broker_name.clone(),
            }),
        })
    }

    fn send(&self, op: WriteOp) -> Result<(), StoreError> {
        let guard = self.inner.tx.lock().map_err(|_| StoreError::Closed)?;
        guard
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(op)
            .map_err(|_| StoreError::Closed)
    }

    /// Stops the writer after it has committed every write already sent, and waits for it.
    pub fn close(&self) {
        if let Ok(mut tx) = self.inner.tx.lock() {
            tx.take();
        }
        let handle = self.inner.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::error!("the store writer thread panicked");
        }
    }
}

/// The offsets a queue holds in the messages table.
fn range_in_table(
    table: &impl ReadableTable<(&'static str, u32, u64), &'static [u8]>,
    topic: &str,
    queue: u32,
) -> Result<QueueRange, StoreError> {
    let mut iter = table
        .range((topic, queue, 0)..=(topic, queue, u64::MAX))
        .map_err(db_err)?;
    let first = iter.next().transpose().map_err(db_err)?.map(|(k, _)| k.value().2);
    let last = iter.next_back().transpose().map_err(db_err)?.map(|(k, _)| k.value().2);
    Ok(match first {
        Some(min) => QueueRange {
            min,
            max: last.unwrap_or(min) + 1,
        },
        None => QueueRange::default(),
    })
}

type Ranges = HashMap<(String, u32), QueueRange>;

/// The ranges of the configured topics' queues and of every lite topic holding messages (and
/// the names of those lite topics).
fn load_ranges(db: &Database, topics: &[(String, u32)]) -> Result<(Ranges, Vec<String>), StoreError> {
    let txn = db.begin_read().map_err(db_err)?;
    let table = txn.open_table(MESSAGES).map_err(db_err)?;
    let mut ranges = HashMap::new();
    for (topic, queues) in topics {
        for queue in 0..*queues {
            ranges.insert((topic.clone(), queue), range_in_table(&table, topic, queue)?);
        }
    }
    // Lite topics: one queue each; one look-up per topic (jumping past its messages).
    let mut lite_topics = Vec::new();
    let mut from = crate::LITE_TOPIC_PREFIX.to_owned();
    loop {
        let next = table
            .range((from.as_str(), 0, 0)..)
            .map_err(db_err)?
            .next()
            .transpose()
            .map_err(db_err)?
            .map(|(k, _)| k.value().0.to_owned());
        let Some(topic) = next.filter(|t| t.starts_with(crate::LITE_TOPIC_PREFIX)) else {
            break;
        };
        ranges.insert((topic.clone(), 0), range_in_table(&table, &topic, 0)?);
        // The smallest name after `topic` and every (topic, ..) key.
        from = format!("{topic}\0");
        lite_topics.push(topic);
    }
    Ok((ranges, lite_topics))
}

async fn await_reply<T>(rx: oneshot::Receiver<Result<T, StoreError>>) -> Result<T, StoreError> {
    rx.await.map_err(|_| StoreError::Closed)?
}

#[async_trait]
impl MessageStore for EmbeddedStore {
    async fn append(
        &self,
        topic: &str,
        queue: u32,
        delivery: Delivery,
        records: Vec<NewRecord>,
    ) -> Result<AppendOutcome, StoreError> {
        let deliver_at_ms = match delivery {
            Delivery::Now => None,
            Delivery::DelayLevel(level) => {
                let delay = usize::from(level)
                    .checked_sub(1)
                    .and_then(|i| DELAY_LEVELS_MS.get(i))
                    .ok_or_else(|| StoreError::Rejected(format!("delayLevel must be between 1 and 18, got {level}")))?;
                Some(writer::now_ms() + delay)
            }
            Delivery::At(at) => Some(at),
        };
        let (reply, rx) = oneshot::channel();
        let op = WriteOp::Append {
            topic: topic.to_owned(),
            queue,
            deliver_at_ms,
            records,
            reply,
        };
        // A bounded queue in front of the writer: past the bound, refuse at once (the client
        // backs off) rather than queue without end and answer late.
        let bytes = op.pending_bytes();
        let pending = &self.inner.pending_bytes;
        let before = pending.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        if before > 0 && before + bytes > self.inner.max_pending_bytes {
            pending.fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
            return Err(StoreError::Overloaded(format!(
                "the store is overloaded: {} MiB of messages wait to be written ([store] max_pending_write_mib); \
                 nothing was stored, retry shortly",
                before >> 20
            )));
        }
        if let Err(e) = self.send(op) {
            pending.fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
            return Err(e);
        }
        await_reply(rx).await
    }

    async fn add_topic(&self, topic: &str, queues: u32) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::Track {
            topic: topic.to_owned(),
            queues,
            reply,
        })?;
        await_reply(rx).await?;
        let refs: Arc<[QueueRef]> = (0..queues)
            .map(|queue_id| QueueRef {
                broker_name: self.inner.broker_name.clone(),
                queue_id,
            })
            .collect();
        if let Ok(mut map) = self.inner.queues.write() {
            map.insert(topic.to_owned(), refs);
        }
        Ok(())
    }

    async fn open_lite_topic(&self, _parent: &str, lite_topic: &str) -> Result<(), StoreError> {
        if self.inner.queues.read().is_ok_and(|m| m.contains_key(lite_topic)) {
            return Ok(());
        }
        // Only its route: the table holds no rows of a lite topic whose range is not loaded (those
        // with messages were loaded at start, a reclaimed one's rows went with it), so an unknown
        // range is the empty one `queue_range` answers, until the writer's first append.
        if let Ok(mut map) = self.inner.queues.write() {
            map.entry(lite_topic.to_owned())
                .or_insert_with(|| self.inner.lite_route.clone());
        }
        Ok(())
    }

    async fn drop_lite_topic(&self, lite_topic: &str) -> Result<(), StoreError> {
        if let Ok(mut map) = self.inner.queues.write() {
            map.remove(lite_topic);
        }
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::DropQueue {
            topic: lite_topic.to_owned(),
            reply,
        })?;
        await_reply(rx).await
    }

    fn lite_topics(&self) -> Vec<String> {
        self.inner.queues.read().map_or_else(
            |_| Vec::new(),
            |m| {
                m.keys()
                    .filter(|t| crate::split_lite_queue_topic(t).is_some())
                    .cloned()
                    .collect()
            },
        )
    }

    fn queues(&self, topic: &str) -> Arc<[QueueRef]> {
        self.inner
            .queues
            .read()
            .ok()
            .and_then(|m| m.get(topic).cloned())
            .unwrap_or_else(|| Arc::from(Vec::new()))
    }

    fn queue_range(&self, topic: &str, queue: u32) -> QueueRange {
        self.inner
            .ranges
            .read()
            .map(|r| r.get(&(topic.to_owned(), queue)).copied().unwrap_or_default())
            .unwrap_or_default()
    }

    async fn read(
        &self,
        topic: &str,
        queue: u32,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<ReadOutcome, StoreError> {
        if let Some(log) = &self.inner.log {
            let range = self.queue_range(topic, queue);
            let from = from.max(range.min);
            let Some(number) = log.number(topic, queue).filter(|_| from < range.max) else {
                return Ok(ReadOutcome::default());
            };
            let max = max.min(usize::try_from(range.max - from).unwrap_or(usize::MAX));
            let log = log.clone();
            return tokio::task::spawn_blocking(move || {
                Ok(ReadOutcome {
                    messages: log.read(number, from, max, max_bytes)?,
                    skip_to: None,
                })
            })
            .await
            .map_err(|e| StoreError::Database(format!("read task failed: {e}")))?;
        }
        let db = self.inner.db.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(db_err)?;
            let table = match txn.open_table(MESSAGES) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(ReadOutcome::default()),
                Err(e) => return Err(db_err(e)),
            };
            let mut out: Vec<StoredMessage> = Vec::new();
            let mut bytes = 0;
            for entry in table
                .range((topic.as_str(), queue, from)..=(topic.as_str(), queue, u64::MAX))
                .map_err(db_err)?
            {
                if out.len() >= max {
                    break;
                }
                let (key, value) = entry.map_err(db_err)?;
                let message = codec::decode_message(key.value().2, value.value())?;
                bytes += message.body.len();
                if bytes > max_bytes && !out.is_empty() {
                    break;
                }
                out.push(message);
            }
            Ok(ReadOutcome {
                messages: out,
                skip_to: None,
            })
        })
        .await
        .map_err(|e| StoreError::Database(format!("read task failed: {e}")))?
    }

    async fn stats(&self) -> StoreStats {
        let db = self.inner.db.clone();
        let path = self.inner.path.clone();
        let log = self.inner.log.clone();
        tokio::task::spawn_blocking(move || {
            let delayed = db
                .begin_read()
                .ok()
                .and_then(|txn| txn.open_table(SCHEDULE).ok().and_then(|t| t.len().ok()));
            let log_bytes = log.map_or(0, |log| log.segments.bytes());
            StoreStats {
                size_bytes: std::fs::metadata(&path).ok().map(|m| m.len() + log_bytes),
                delayed: Some(delayed.unwrap_or(0)),
            }
        })
        .await
        .unwrap_or_default()
    }

    async fn search_offset(&self, topic: &str, queue: u32, timestamp_ms: u64) -> Result<u64, StoreError> {
        // Store times grow with offsets: binary search, one point read per step.
        let range = self.queue_range(topic, queue);
        let (mut low, mut high) = (range.min, range.max);
        while low < high {
            let mid = low + (high - low) / 2;
            let stored = self.read(topic, queue, mid, 1, 0).await?.messages.pop();
            match stored {
                Some(m) if m.store_ms >= timestamp_ms => high = m.offset.min(mid),
                Some(m) => low = m.offset + 1,
                None => high = mid,
            }
        }
        Ok(low)
    }

    async fn locate(&self, msg_id: &str) -> Result<Option<(MessageLocation, [u8; 16])>, StoreError> {
        // This store's ids are all 16 bytes: any other is not here.
        let Some(msg_id) = hex::decode(msg_id).ok().and_then(|b| <[u8; 16]>::try_from(b).ok()) else {
            return Ok(None);
        };
        if let Some(log) = &self.inner.log {
            let log = log.clone();
            return tokio::task::spawn_blocking(move || Ok(log.locate(&msg_id)?.map(|at| (at, msg_id))))
                .await
                .map_err(|e| StoreError::Database(format!("lookup task failed: {e}")))?;
        }
        let db = self.inner.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(db_err)?;
            let table = match txn.open_table(MSG_INDEX) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(db_err(e)),
            };
            match table.get(msg_id.as_slice()).map_err(db_err)? {
                Some(v) => Ok(Some((codec::from_postcard(v.value())?, msg_id))),
                None => Ok(None),
            }
        })
        .await
        .map_err(|e| StoreError::Database(format!("lookup task failed: {e}")))?
    }

    async fn probe(&self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::Probe { reply })?;
        await_reply(rx).await
    }

    fn identity(&self) -> &StoreIdentity {
        &self.inner.identity
    }

    fn visible_changes(&self, topic: &str) -> tokio::sync::watch::Receiver<u64> {
        self.inner.visible.subscribe(topic)
    }
}

impl ConsumerStore for EmbeddedStore {
    fn load(&self) -> Result<ConsumerSnapshot, StoreError> {
        writer::load_consumer_state(&self.inner.db)
    }

    fn save(&self, ops: Vec<ConsumerOp>) -> PendingWrite {
        let (reply, rx) = oneshot::channel();
        let sent = self.send(WriteOp::Consumer { ops, reply });
        Box::pin(async move {
            sent?;
            await_reply(rx).await
        })
    }
}
