//! The single writer of the embedded store: group commit, delayed-message delivery, retention.

mod log_commit;

pub(super) use log_commit::{LogState, open_log, refuse_log_data};

use super::codec;
use super::{
    CONSUMER_QUEUES, EmbeddedConfig, FlushPolicy, MESSAGES, META, MSG_INDEX, QUEUE_NUMBERS, RETRIES, SCHEDULE,
    SETTINGS, db_err,
};
use crate::{
    AppendOutcome, AppendStatus, Appended, ConsumerOp, ConsumerSnapshot, ContextKey, MessageLocation, NewRecord,
    QueueRange, StoreError, StoreIdentity,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, WriteTransaction};
use std::collections::HashMap;
use std::sync::{Arc, RwLock, mpsc};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Most due or expired messages moved in one commit, so one commit stays short.
const MAINTENANCE_BATCH: usize = 10_000;

pub(super) enum WriteOp {
    Append {
        topic: String,
        queue: u32,
        deliver_at_ms: Option<u64>,
        records: Vec<NewRecord>,
        reply: oneshot::Sender<Result<AppendOutcome, StoreError>>,
    },
    Consumer {
        ops: Vec<ConsumerOp>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Probe {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Start tracking a topic's queues (added at run time): their ranges as the table holds
    /// them, so a topic added again continues after its old messages.
    Track {
        topic: String,
        queues: u32,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Deletes a reclaimed lite topic's queue (its messages) and forgets its range.
    DropQueue {
        topic: String,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// A write without its answer channel (what a commit applies).
enum Work {
    Append {
        topic: String,
        queue: u32,
        deliver_at_ms: Option<u64>,
        records: Vec<NewRecord>,
    },
    Consumer(Vec<ConsumerOp>),
    Probe,
    Track {
        topic: String,
        queues: u32,
    },
    DropQueue {
        topic: String,
    },
}

impl WriteOp {
    /// Bytes an append adds to the store's queue of pending writes (what the overload bound
    /// counts); 0 for the small bookkeeping writes.
    pub(super) fn pending_bytes(&self) -> usize {
        match self {
            Self::Append { records, .. } => records.iter().map(record_bytes).sum(),
            _ => 0,
        }
    }

    fn split(self) -> (Work, Reply) {
        match self {
            Self::Append {
                topic,
                queue,
                deliver_at_ms,
                records,
                reply,
            } => (
                Work::Append {
                    topic,
                    queue,
                    deliver_at_ms,
                    records,
                },
                Reply::Append(reply, Vec::new()),
            ),
            Self::Consumer { ops, reply } => (Work::Consumer(ops), Reply::Done(reply)),
            Self::Probe { reply } => (Work::Probe, Reply::Done(reply)),
            Self::Track { topic, queues, reply } => (Work::Track { topic, queues }, Reply::Done(reply)),
            Self::DropQueue { topic, reply } => (Work::DropQueue { topic }, Reply::Done(reply)),
        }
    }
}

/// What one record weighs in the pending-writes bound.
pub(super) fn record_bytes(r: &NewRecord) -> usize {
    (r.body.len() + r.keys.as_ref().map_or(0, String::len) + 64) * (1 + r.lite_topics.len())
}

/// Free bytes for unprivileged writers on the file system holding `dir` (None: unknown).
fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid NUL-terminated string and `stat` is a writable statvfs.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// How full the disk is, for what a commit may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiskRoom {
    /// At or above the reserve: everything.
    Room,
    /// Below the reserve: no new messages; acks, locks and maintenance still (they are small
    /// and let consumers drain).
    NoAppends,
    /// Below a quarter of the reserve: nothing, so the database never meets ENOSPC
    /// mid-commit (after which redb refuses every write until it is reopened).
    Nothing,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Counters {
    store_seq: u64,
    schedule_seq: u64,
}

pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn meta_u64(txn: &WriteTransaction, key: &str) -> Result<Option<u64>, StoreError> {
    let table = txn.open_table(META).map_err(db_err)?;
    let value = table.get(key).map_err(db_err)?;
    Ok(value.and_then(|v| v.value().try_into().ok().map(u64::from_be_bytes)))
}

/// Creates the tables, the secret and node id on first open; counts this start.
pub(super) fn init(db: &Database) -> Result<(StoreIdentity, Counters), StoreError> {
    let txn = db.begin_write().map_err(db_err)?;
    for table in [MSG_INDEX, CONSUMER_QUEUES, RETRIES] {
        txn.open_table(table).map_err(db_err)?;
    }
    txn.open_table(MESSAGES).map_err(db_err)?;
    txn.open_table(SCHEDULE).map_err(db_err)?;
    txn.open_table(SETTINGS).map_err(db_err)?;
    txn.open_table(QUEUE_NUMBERS).map_err(db_err)?;
    let secret: [u8; 32] = {
        let mut meta = txn.open_table(META).map_err(db_err)?;
        let existing = meta
            .get("secret")
            .map_err(db_err)?
            .and_then(|v| v.value().try_into().ok());
        match existing {
            Some(s) => s,
            None => {
                let s: [u8; 32] = rand::random();
                meta.insert("secret", s.as_slice()).map_err(db_err)?;
                s
            }
        }
    };
    let node_id = match meta_u64(&txn, "node_id")? {
        Some(n) => n as u32,
        None => u64::from(rand::random::<u32>()) as u32,
    };
    let boot = meta_u64(&txn, "boot")?.unwrap_or(0) + 1;
    let counters = Counters {
        store_seq: meta_u64(&txn, "store_seq")?.unwrap_or(0),
        schedule_seq: meta_u64(&txn, "schedule_seq")?.unwrap_or(0),
    };
    {
        let mut meta = txn.open_table(META).map_err(db_err)?;
        meta.insert("node_id", u64::from(node_id).to_be_bytes().as_slice())
            .map_err(db_err)?;
        meta.insert("boot", boot.to_be_bytes().as_slice()).map_err(db_err)?;
    }
    txn.commit().map_err(db_err)?;
    Ok((
        StoreIdentity {
            secret,
            node_id,
            boot: boot as u32,
        },
        counters,
    ))
}

pub(super) fn load_consumer_state(db: &Database) -> Result<ConsumerSnapshot, StoreError> {
    let txn = db.begin_read().map_err(db_err)?;
    let mut snapshot = ConsumerSnapshot::default();
    for entry in txn
        .open_table(CONSUMER_QUEUES)
        .map_err(db_err)?
        .iter()
        .map_err(db_err)?
    {
        let (k, v) = entry.map_err(db_err)?;
        let (context, queue): (ContextKey, u32) = codec::from_postcard(k.value())?;
        snapshot
            .queues
            .push((context, queue, codec::decode_queue_state(v.value())?));
    }
    for entry in txn.open_table(RETRIES).map_err(db_err)?.iter().map_err(db_err)? {
        let (k, v) = entry.map_err(db_err)?;
        let (context, _seq): (ContextKey, u64) = codec::from_postcard(k.value())?;
        snapshot.retries.push((context, codec::from_postcard(v.value())?));
    }
    for entry in txn.open_table(SETTINGS).map_err(db_err)?.iter().map_err(db_err)? {
        let (k, v) = entry.map_err(db_err)?;
        snapshot
            .settings
            .push((k.value().to_owned(), codec::decode_settings(v.value())?));
    }
    Ok(snapshot)
}

/// The tables one commit writes, opened once per commit.
struct Tables<'t> {
    messages: redb::Table<'t, (&'static str, u32, u64), &'static [u8]>,
    index: redb::Table<'t, &'static [u8], &'static [u8]>,
    schedule: redb::Table<'t, (u64, u64), &'static [u8]>,
}

pub(super) struct Writer {
    db: Arc<Database>,
    shared_ranges: Arc<RwLock<HashMap<(String, u32), QueueRange>>>,
    ranges: HashMap<(String, u32), QueueRange>,
    /// The queues whose range the commit under way changed, with their range before it: only
    /// these are published after the commit (or put back when it fails), so a commit costs the
    /// same with 10 queues or 100,000 lite ones.
    touched: HashMap<(String, u32), Option<QueueRange>>,
    /// Notified, per topic, after a commit that made messages visible there.
    visible: Arc<crate::TopicSignals>,
    /// Topics with messages appended in the commit under way (their waiters are woken after it).
    appended: std::collections::HashSet<String>,
    counters: Counters,
    flush: FlushPolicy,
    flush_timeout: Duration,
    group_commit_max: usize,
    async_flush_interval: Duration,
    retention: Duration,
    retention_check_interval: Duration,
    next_due: Option<u64>,
    last_purge: Instant,
    last_sync: Instant,
    unsynced: bool,
    data_dir: std::path::PathBuf,
    /// Free disk space below which no message is stored (0: no check).
    min_free_bytes: u64,
    /// The room the last commit saw (state changes are logged).
    room: DiskRoom,
    /// Bytes of appends sent and not yet taken by this writer (the store's overload bound).
    pending_bytes: Arc<std::sync::atomic::AtomicUsize>,
    /// The commit log, with `layout = "log"` (messages are in redb without it).
    log: Option<LogState>,
}

enum Reply {
    Append(oneshot::Sender<Result<AppendOutcome, StoreError>>, Vec<Appended>),
    Done(oneshot::Sender<Result<(), StoreError>>),
    /// Already answered (with an error) while the rest of its group went on.
    Answered,
}

impl Reply {
    fn fail(self, error: StoreError) {
        match self {
            Self::Append(tx, _) => {
                let _ = tx.send(Err(error));
            }
            Self::Done(tx) => {
                let _ = tx.send(Err(error));
            }
            Self::Answered => {}
        }
    }
}

/// True when a failed commit met a full disk (ENOSPC somewhere in redb's error text: redb
/// reports I/O errors as text through our error type).
fn is_disk_full(e: &StoreError) -> bool {
    match e {
        StoreError::Io(io) => io.kind() == std::io::ErrorKind::StorageFull,
        StoreError::Database(text) => text.contains("No space left on device"),
        _ => false,
    }
}

impl Writer {
    pub(super) fn new(
        db: Arc<Database>,
        shared_ranges: Arc<RwLock<HashMap<(String, u32), QueueRange>>>,
        visible: Arc<crate::TopicSignals>,
        config: &EmbeddedConfig,
        counters: Counters,
        pending_bytes: Arc<std::sync::atomic::AtomicUsize>,
        log: Option<LogState>,
    ) -> Result<Self, StoreError> {
        let settings = &config.settings;
        let ranges = shared_ranges.read().map_err(|_| StoreError::Closed)?.clone();
        let next_due = {
            let txn = db.begin_read().map_err(db_err)?;
            let table = txn.open_table(SCHEDULE).map_err(db_err)?;
            table.first().map_err(db_err)?.map(|(k, _)| k.value().0)
        };
        Ok(Self {
            db,
            shared_ranges,
            ranges,
            touched: HashMap::new(),
            visible,
            appended: std::collections::HashSet::new(),
            counters,
            flush: settings.flush,
            flush_timeout: Duration::from_millis(settings.flush_timeout_ms),
            group_commit_max: usize::try_from(settings.group_commit_max).unwrap_or(usize::MAX).max(1),
            async_flush_interval: Duration::from_millis(settings.async_flush_interval_ms),
            retention: Duration::from_millis(settings.retention_ms),
            retention_check_interval: Duration::from_millis(settings.retention_check_interval_ms),
            next_due,
            last_purge: Instant::now(),
            last_sync: Instant::now(),
            unsynced: false,
            data_dir: config.data_dir.clone(),
            min_free_bytes: settings.min_free_disk_bytes(),
            room: DiskRoom::Room,
            pending_bytes,
            log,
        })
    }

    /// What the disk has room for now; logs when that changes.
    fn disk_room(&mut self) -> DiskRoom {
        if self.min_free_bytes == 0 {
            return DiskRoom::Room;
        }
        let Some(free) = free_bytes(&self.data_dir) else {
            return DiskRoom::Room;
        };
        let room = if free >= self.min_free_bytes {
            DiskRoom::Room
        } else if free >= self.min_free_bytes / 4 {
            DiskRoom::NoAppends
        } else {
            DiskRoom::Nothing
        };
        if room != self.room {
            let (free_mib, reserve_mib) = (free >> 20, self.min_free_bytes >> 20);
            match room {
                DiskRoom::Room => tracing::warn!(free_mib, reserve_mib, "disk space is back: storing messages again"),
                DiskRoom::NoAppends => {
                    tracing::error!(
                        free_mib,
                        reserve_mib,
                        "disk nearly full: produce refused until space returns"
                    );
                }
                DiskRoom::Nothing => {
                    tracing::error!(
                        free_mib,
                        reserve_mib,
                        "disk full: every write refused until space returns"
                    );
                }
            }
            self.room = room;
        }
        room
    }

    fn disk_full_error(&self) -> StoreError {
        StoreError::StorageFull(format!(
            "the disk of the data directory is full (less than [store] min_free_disk_mib = {} MiB free): nothing was stored; \
             retry when space is freed",
            self.min_free_bytes >> 20
        ))
    }

    /// How long the writer may sleep before it has maintenance to do.
    fn next_wakeup(&self) -> Duration {
        let mut wait = self.retention_check_interval.saturating_sub(self.last_purge.elapsed());
        if let Some(due) = self.next_due {
            wait = wait.min(Duration::from_millis(due.saturating_sub(now_ms())));
        }
        if self.unsynced {
            wait = wait.min(self.async_flush_interval.saturating_sub(self.last_sync.elapsed()));
        }
        wait
    }

    fn run(mut self, rx: mpsc::Receiver<WriteOp>) {
        loop {
            let mut batch = Vec::new();
            match rx.recv_timeout(self.next_wakeup()) {
                Ok(op) => batch.push(op),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            while batch.len() < self.group_commit_max {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let taken: usize = batch.iter().map(WriteOp::pending_bytes).sum();
            self.pending_bytes
                .fetch_sub(taken, std::sync::atomic::Ordering::Relaxed);
            self.commit(batch, false);
        }
        // Closing: make everything durable whatever the flush policy.
        self.commit(Vec::new(), true);
        if let Some(log) = self.log.as_mut()
            && let Err(e) = log.close(&self.data_dir)
        {
            tracing::error!(error = %e, "commit log checkpoint at close failed");
        }
        tracing::info!("embedded store writer stopped");
    }

    fn commit(&mut self, ops: Vec<WriteOp>, closing: bool) {
        let now = now_ms();
        let room = self.disk_room();
        let (mut works, mut replies): (Vec<Work>, Vec<Reply>) = ops.into_iter().map(WriteOp::split).unzip();
        if room != DiskRoom::Room {
            // Refused writes are answered now and left out of the commit.
            let mut kept = (Vec::new(), Vec::new());
            for (work, reply) in works.into_iter().zip(replies) {
                if room == DiskRoom::Nothing || matches!(work, Work::Append { .. }) {
                    reply.fail(self.disk_full_error());
                } else {
                    kept.0.push(work);
                    kept.1.push(reply);
                }
            }
            (works, replies) = kept;
        }
        let maintenance = room != DiskRoom::Nothing;
        let due = maintenance && self.next_due.is_some_and(|d| d <= now);
        let purge = maintenance && self.last_purge.elapsed() >= self.retention_check_interval;
        let sync_now = self.flush == FlushPolicy::Sync
            || (self.unsynced && (closing || self.last_sync.elapsed() >= self.async_flush_interval));
        let flush_due = maintenance && sync_now && self.unsynced;
        if works.is_empty() && !due && !purge && !flush_due {
            return;
        }
        let saved_counters = self.counters;
        let saved_due = self.next_due;
        let started = Instant::now();
        let result = match self.log.take() {
            Some(mut log) => {
                let group = log_commit::Group {
                    now,
                    due,
                    purge,
                    sync_now,
                };
                let result = self.apply_log(&mut log, works, group, &mut replies);
                self.log = Some(log);
                result
            }
            None => self.apply(works, now, due, purge, sync_now, &mut replies),
        };
        let elapsed = started.elapsed();
        match result {
            Ok(()) => {
                if sync_now {
                    self.last_sync = Instant::now();
                    self.unsynced = false;
                } else {
                    self.unsynced = true;
                }
                if purge {
                    self.last_purge = Instant::now();
                }
                self.publish_ranges();
                for topic in self.appended.drain() {
                    self.visible.notify(&topic);
                }
                let flush_timed_out = sync_now && elapsed > self.flush_timeout;
                if flush_timed_out {
                    tracing::warn!(
                        elapsed_ms = elapsed.as_millis() as u64,
                        "flush exceeded [store] flush_timeout_ms"
                    );
                }
                for reply in replies {
                    match reply {
                        Reply::Append(tx, appended) => {
                            let _ = tx.send(Ok(AppendOutcome {
                                appended,
                                status: if flush_timed_out {
                                    AppendStatus::FlushDiskTimeout
                                } else {
                                    AppendStatus::Ok
                                },
                                region_id: None,
                                trace_on: None,
                            }));
                        }
                        Reply::Done(tx) => {
                            let _ = tx.send(Ok(()));
                        }
                        Reply::Answered => {}
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed; its writes are answered with an error");
                self.counters = saved_counters;
                self.appended.clear();
                self.restore_ranges();
                self.next_due = saved_due;
                let error = if is_disk_full(&e) { self.disk_full_error() } else { e };
                for reply in replies {
                    reply.fail(error.duplicate());
                }
            }
        }
    }

    /// Remembers a queue's range as it was before this commit changed it.
    fn touch_range(
        touched: &mut HashMap<(String, u32), Option<QueueRange>>,
        ranges: &HashMap<(String, u32), QueueRange>,
        key: &(String, u32),
    ) {
        if !touched.contains_key(key) {
            touched.insert(key.clone(), ranges.get(key).copied());
        }
    }

    /// After a commit: the changed ranges become what readers see.
    fn publish_ranges(&mut self) {
        let Ok(mut shared) = self.shared_ranges.write() else {
            return;
        };
        for (key, _) in self.touched.drain() {
            match self.ranges.get(&key) {
                Some(range) => shared.insert(key, *range),
                None => shared.remove(&key),
            };
        }
    }

    /// After a failed commit: the changed ranges go back to what they were.
    fn restore_ranges(&mut self) {
        for (key, before) in self.touched.drain() {
            match before {
                Some(range) => self.ranges.insert(key, range),
                None => self.ranges.remove(&key),
            };
        }
    }

    /// Applies `works` in one transaction; `replies[i]` answers `works[i]` (appends get
    /// their offsets here).
    fn apply(
        &mut self,
        works: Vec<Work>,
        now: u64,
        due: bool,
        purge: bool,
        sync_now: bool,
        replies: &mut [Reply],
    ) -> Result<(), StoreError> {
        let txn = begin_write(&self.db, sync_now)?;
        let mut tables = Tables {
            messages: txn.open_table(MESSAGES).map_err(db_err)?,
            index: txn.open_table(MSG_INDEX).map_err(db_err)?,
            schedule: txn.open_table(SCHEDULE).map_err(db_err)?,
        };
        for (work, reply) in works.into_iter().zip(replies.iter_mut()) {
            match work {
                Work::Append {
                    topic,
                    queue,
                    deliver_at_ms,
                    records,
                } => {
                    let appended = self.append(
                        &mut tables,
                        &topic,
                        queue,
                        deliver_at_ms.filter(|d| *d > now),
                        records,
                        now,
                    )?;
                    if let Reply::Append(_, slot) = reply {
                        *slot = appended;
                    }
                }
                Work::Consumer(ops) => apply_consumer_ops(&txn, ops)?,
                Work::Probe => {
                    let mut meta = txn.open_table(META).map_err(db_err)?;
                    meta.insert("probe", now.to_be_bytes().as_slice()).map_err(db_err)?;
                }
                Work::Track { topic, queues } => {
                    for queue in 0..queues {
                        let key = (topic.clone(), queue);
                        if !self.ranges.contains_key(&key) {
                            Self::touch_range(&mut self.touched, &self.ranges, &key);
                            let range = super::range_in_table(&tables.messages, &topic, queue)?;
                            self.ranges.insert(key, range);
                        }
                    }
                }
                Work::DropQueue { topic } => self.drop_queue(&mut tables, &topic)?,
            }
        }
        if due {
            self.deliver_due(&mut tables, now)?;
        }
        if purge {
            self.purge(&mut tables, now)?;
        }
        drop(tables);
        {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            meta.insert("store_seq", self.counters.store_seq.to_be_bytes().as_slice())
                .map_err(db_err)?;
            meta.insert("schedule_seq", self.counters.schedule_seq.to_be_bytes().as_slice())
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    fn append(
        &mut self,
        tables: &mut Tables<'_>,
        topic: &str,
        queue: u32,
        deliver_at_ms: Option<u64>,
        records: Vec<NewRecord>,
        now: u64,
    ) -> Result<Vec<Appended>, StoreError> {
        let mut appended = Vec::with_capacity(records.len());
        if let Some(due) = deliver_at_ms {
            for record in &records {
                let seq = self.counters.schedule_seq;
                self.counters.schedule_seq += 1;
                tables
                    .schedule
                    .insert((due, seq), codec::encode_scheduled(topic, queue, record).as_slice())
                    .map_err(db_err)?;
                appended.push(Appended {
                    queue_offset: seq,
                    store_seq: self.next_store_seq(),
                    offset_msg_id: None,
                });
            }
            self.next_due = Some(self.next_due.map_or(due, |d| d.min(due)));
            return Ok(appended);
        }
        for record in records {
            appended.push(self.append_to_queue(tables, topic, queue, &record, now, true)?);
            // A lite message's copies: the msgId names the message in its own queue.
            for lite_topic in &record.lite_topics {
                self.append_to_queue(tables, lite_topic, 0, &record, now, false)?;
            }
        }
        Ok(appended)
    }

    /// Deletes every message of a lite topic's queue and forgets the queue.
    fn drop_queue(&mut self, tables: &mut Tables<'_>, topic: &str) -> Result<(), StoreError> {
        let key = (topic.to_owned(), 0);
        Self::touch_range(&mut self.touched, &self.ranges, &key);
        self.ranges.remove(&key);
        let mut removed = 0u64;
        tables
            .messages
            .retain_in((topic, 0, 0)..=(topic, 0, u64::MAX), |_, _| {
                removed += 1;
                false
            })
            .map_err(db_err)?;
        tracing::debug!(topic, removed, "lite topic reclaimed");
        Ok(())
    }

    fn next_store_seq(&mut self) -> u64 {
        let seq = self.counters.store_seq;
        self.counters.store_seq += 1;
        seq
    }

    fn append_to_queue(
        &mut self,
        tables: &mut Tables<'_>,
        topic: &str,
        queue: u32,
        record: &NewRecord,
        now: u64,
        index: bool,
    ) -> Result<Appended, StoreError> {
        let key = (topic.to_owned(), queue);
        Self::touch_range(&mut self.touched, &self.ranges, &key);
        if !self.ranges.contains_key(&key) {
            // A queue not tracked since start (its topic was not configured then, e.g. a due
            // delayed message of a removed topic): continue after what the table holds, never
            // overwrite.
            let range = super::range_in_table(&tables.messages, topic, queue)?;
            self.ranges.insert(key.clone(), range);
        }
        let offset = {
            let range = self.ranges.entry(key).or_default();
            range.max += 1;
            range.max - 1
        };
        let store_seq = self.next_store_seq();
        if !self.appended.contains(topic) {
            self.appended.insert(topic.to_owned());
        }
        tables
            .messages
            .insert(
                (topic, queue, offset),
                codec::encode_message(record, now, store_seq).as_slice(),
            )
            .map_err(db_err)?;
        if index {
            let location = MessageLocation {
                topic: topic.to_owned(),
                queue,
                offset,
            };
            tables
                .index
                .insert(record.msg_id.as_slice(), codec::to_postcard(&location)?.as_slice())
                .map_err(db_err)?;
        }
        Ok(Appended {
            queue_offset: offset,
            store_seq,
            offset_msg_id: None,
        })
    }

    /// Moves due delayed/timer messages into their queues (stored "now", as RocketMQ does).
    fn deliver_due(&mut self, tables: &mut Tables<'_>, now: u64) -> Result<(), StoreError> {
        let due: Vec<((u64, u64), Vec<u8>)> = {
            let mut due = Vec::new();
            for entry in tables
                .schedule
                .range((0, 0)..=(now, u64::MAX))
                .map_err(db_err)?
                .take(MAINTENANCE_BATCH)
            {
                let (k, v) = entry.map_err(db_err)?;
                due.push((k.value(), v.value().to_vec()));
            }
            due
        };
        for (key, value) in &due {
            let (topic, queue, record) = codec::decode_scheduled(value)?;
            self.append_to_queue(tables, &topic, queue, &record, now, true)?;
            tables.schedule.remove(key).map_err(db_err)?;
        }
        self.next_due = tables.schedule.first().map_err(db_err)?.map(|(k, _)| k.value().0);
        if !due.is_empty() {
            tracing::debug!(count = due.len(), "delivered due delayed messages");
        }
        Ok(())
    }

    /// Deletes messages stored before `now - retention`, oldest first, per queue.
    fn purge(&mut self, tables: &mut Tables<'_>, now: u64) -> Result<(), StoreError> {
        let cutoff = now.saturating_sub(self.retention.as_millis() as u64);
        let mut budget = MAINTENANCE_BATCH;
        let Tables { messages, index, .. } = tables;
        let mut removed_total = 0;
        for ((topic, queue), range) in &mut self.ranges {
            let before = *range;
            let lite_copy = crate::split_lite_queue_topic(topic).is_some();
            while range.min < range.max && budget > 0 {
                let expired_id = match messages.get((topic.as_str(), *queue, range.min)).map_err(db_err)? {
                    Some(v) => {
                        let (record, store_ms) = codec::decode_record(v.value())?;
                        (store_ms < cutoff).then_some(record.msg_id)
                    }
                    None => None,
                };
                let Some(msg_id) = expired_id else { break };
                messages.remove((topic.as_str(), *queue, range.min)).map_err(db_err)?;
                // The msgId index names the message's own queue, not its lite copies.
                if !lite_copy {
                    index.remove(msg_id.as_slice()).map_err(db_err)?;
                }
                range.min += 1;
                budget -= 1;
                removed_total += 1;
            }
            if *range != before {
                self.touched.entry((topic.clone(), *queue)).or_insert(Some(before));
            }
        }
        if removed_total > 0 {
            tracing::info!(removed = removed_total, "retention deleted expired messages");
        }
        Ok(())
    }
}

/// A write transaction, durable at commit when `sync_now`.
fn begin_write(db: &Database, sync_now: bool) -> Result<WriteTransaction, StoreError> {
    let mut txn = db.begin_write().map_err(db_err)?;
    txn.set_durability(if sync_now {
        Durability::Immediate
    } else {
        Durability::None
    })
    .map_err(db_err)?;
    Ok(txn)
}

fn apply_consumer_ops(txn: &WriteTransaction, ops: Vec<ConsumerOp>) -> Result<(), StoreError> {
    for op in ops {
        match op {
            ConsumerOp::PutQueue { context, queue, state } => {
                let mut table = txn.open_table(CONSUMER_QUEUES).map_err(db_err)?;
                let key = codec::to_postcard(&(context, queue))?;
                table
                    .insert(key.as_slice(), codec::to_postcard(&state)?.as_slice())
                    .map_err(db_err)?;
            }
            ConsumerOp::PutRetry { context, entry } => {
                let mut table = txn.open_table(RETRIES).map_err(db_err)?;
                let key = codec::to_postcard(&(context, entry.seq))?;
                table
                    .insert(key.as_slice(), codec::to_postcard(&entry)?.as_slice())
                    .map_err(db_err)?;
            }
            ConsumerOp::DeleteQueue { context, queue } => {
                let mut table = txn.open_table(CONSUMER_QUEUES).map_err(db_err)?;
                table
                    .remove(codec::to_postcard(&(context, queue))?.as_slice())
                    .map_err(db_err)?;
            }
            ConsumerOp::DeleteRetry { context, seq } => {
                let mut table = txn.open_table(RETRIES).map_err(db_err)?;
                table
                    .remove(codec::to_postcard(&(context, seq))?.as_slice())
                    .map_err(db_err)?;
            }
            ConsumerOp::PutSettings { consumer, settings } => {
                let mut table = txn.open_table(SETTINGS).map_err(db_err)?;
                table
                    .insert(consumer.as_str(), codec::to_postcard(&settings)?.as_slice())
                    .map_err(db_err)?;
            }
        }
    }
    Ok(())
}

pub(super) fn spawn(writer: Writer, rx: mpsc::Receiver<WriteOp>) -> Result<std::thread::JoinHandle<()>, StoreError> {
    Ok(std::thread::Builder::new()
        .name("mqproxy-store-writer".into())
        .spawn(move || writer.run(rx))?)
}
