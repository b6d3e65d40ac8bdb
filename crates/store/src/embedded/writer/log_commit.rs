//! The writer's side of the commit log: a group's records appended and flushed once, their
//! index entries written after them, checkpoints, recovery at open, retention by segment,
//! and the one-time conversion of a data directory written in the redb layout.

use super::super::index::{Entry, IndexFile, IndexWriter, Indexes};
use super::super::log::{self as commit_log, LogWriter};
use super::super::{LogShared, MESSAGES, META, MSG_INDEX, QUEUE_NUMBERS, QueueNumbers, SCHEDULE, codec, db_err};
use super::{EmbeddedConfig, MAINTENANCE_BATCH, Reply, Work, Writer};
use crate::{Appended, NewRecord, QueueRange, StoreError};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// A checkpoint is written at least this often while messages arrive (it bounds the log a
/// recovery after a crash reads again).
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
/// ... and after this many bytes of log.
const CHECKPOINT_BYTES: u64 = 256 << 20;
/// `store_seq` of a delayed message (it has no log position until it is due): kept apart
/// from every log position.
const DELAYED_SEQ: u64 = 1 << 63;
/// Present while a redb-layout data directory is converted; a start that finds it converts again.
const CONVERTING: &str = "CONVERTING";

/// A delayed append of a group: its reply's index, topic, queue, due time, records.
type Delayed = (usize, String, u32, u64, Vec<NewRecord>);
/// A due delayed message: its schedule key, topic, queue, record.
type Due = ((u64, u64), String, u32, NewRecord);

/// What one group commit does besides its writes.
#[derive(Debug, Clone, Copy)]
pub(in crate::embedded) struct Group {
    pub(in crate::embedded) now: u64,
    /// Deliver due delayed messages.
    pub(in crate::embedded) due: bool,
    /// Look for expired segments.
    pub(in crate::embedded) purge: bool,
    /// Make the group durable before answering.
    pub(in crate::embedded) sync_now: bool,
}

/// The log's state in the writer.
pub(in crate::embedded) struct LogState {
    shared: Arc<LogShared>,
    writer: LogWriter,
    index: IndexWriter,
    /// The log position up to which the indexes are durable.
    checkpoint: u64,
    last_checkpoint: Instant,
    next_number: u32,
}

/// What opening the log found.
pub(in crate::embedded) struct OpenedLog {
    pub(in crate::embedded) shared: Arc<LogShared>,
    pub(in crate::embedded) state: LogState,
    pub(in crate::embedded) ranges: HashMap<(String, u32), QueueRange>,
    pub(in crate::embedded) lite_topics: Vec<String>,
}

fn checkpoint_path(dir: &Path) -> PathBuf {
    dir.join("checkpoint")
}

/// The saved checkpoint (0 without one, or a damaged one: everything is checked again).
fn read_checkpoint(dir: &Path) -> u64 {
    let Ok(bytes) = std::fs::read(checkpoint_path(dir)) else {
        return 0;
    };
    match (bytes.get(..8), bytes.get(8..12)) {
        (Some(pos), Some(crc)) if crc32c::crc32c(pos).to_le_bytes() == crc => {
            u64::from_le_bytes(pos.try_into().unwrap_or_default())
        }
        _ => 0,
    }
}

fn write_checkpoint(dir: &Path, pos: u64) -> Result<(), StoreError> {
    let mut bytes = pos.to_le_bytes().to_vec();
    bytes.extend_from_slice(&crc32c::crc32c(&pos.to_le_bytes()).to_le_bytes());
    let tmp = dir.join("checkpoint.new");
    std::fs::write(&tmp, &bytes)?;
    std::fs::File::open(&tmp)?.sync_data()?;
    std::fs::rename(&tmp, checkpoint_path(dir))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// With `layout = "redb"`: a data directory whose messages are in a commit log is refused (it
/// would look empty).
pub(in crate::embedded) fn refuse_log_data(data_dir: &Path) -> Result<(), StoreError> {
    let log = data_dir.join("log");
    let has_segments = std::fs::read_dir(&log)
        .map(|d| d.filter_map(Result::ok).any(|e| e.file_name().len() == 20))
        .unwrap_or(false);
    if has_segments {
        return Err(StoreError::Database(format!(
            "{} holds a commit log (the default layout) and [store] layout = \"redb\" cannot read it: \
             remove the layout setting, or point data_dir at another directory",
            log.display()
        )));
    }
    Ok(())
}

fn load_numbers(db: &Database) -> Result<(QueueNumbers, u32), StoreError> {
    let txn = db.begin_read().map_err(db_err)?;
    let mut numbers = QueueNumbers::default();
    let mut next = 0;
    for entry in txn.open_table(QUEUE_NUMBERS).map_err(db_err)?.iter().map_err(db_err)? {
        let (k, v) = entry.map_err(db_err)?;
        let (topic, queue) = k.value();
        numbers.insert(topic, queue, v.value());
        next = next.max(v.value() + 1);
    }
    Ok((numbers, next))
}

/// Opens the commit log: converts a redb-layout directory first, finds the tail (cutting what
/// is damaged), completes the indexes from the last checkpoint, and reads every queue's range.
pub(in crate::embedded) fn open_log(db: &Database, config: &EmbeddedConfig) -> Result<OpenedLog, StoreError> {
    let log_dir = config.data_dir.join("log");
    if log_dir.join(CONVERTING).exists() {
        tracing::warn!("a conversion from the redb layout was cut short: starting it again");
        std::fs::remove_dir_all(&log_dir)?;
        std::fs::remove_dir_all(config.data_dir.join("index")).or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })?;
    }
    let segments = commit_log::open_segments(&log_dir)?;
    let indexes = Arc::new(Indexes::new(&config.data_dir)?);
    let (numbers, next_number) = load_numbers(db)?;
    let shared = Arc::new(LogShared {
        segments: segments.clone(),
        indexes: indexes.clone(),
        numbers: RwLock::new(numbers),
    });
    let checkpoint = read_checkpoint(&log_dir);
    let writer = LogWriter::new(segments.clone(), checkpoint, config.settings.segment_bytes())?;
    let mut state = LogState {
        shared: shared.clone(),
        writer,
        index: IndexWriter::new(indexes.clone()),
        checkpoint,
        last_checkpoint: Instant::now(),
        next_number,
    };
    if redb_messages(db)? {
        convert_from_redb(db, &mut state, &log_dir)?;
    }
    state.recover(config.settings.segment_bytes())?;
    let log_start = segments.start().unwrap_or(state.writer.tail());
    let mut ranges = HashMap::new();
    let mut lite_topics = Vec::new();
    let numbered: Vec<((String, u32), u32)> = shared
        .numbers
        .read()
        .map_err(|_| StoreError::Closed)?
        .iter()
        .map(|(k, n)| (k.clone(), n))
        .collect();
    for ((topic, queue), number) in numbered {
        let range = indexes
            .queue_range(number, log_start)?
            .map_or_else(QueueRange::default, |(min, max)| QueueRange { min, max });
        if crate::split_lite_queue_topic(&topic).is_some() && range.max > range.min {
            lite_topics.push(topic.clone());
        }
        ranges.insert((topic, queue), range);
    }
    for (topic, queues) in &config.topics {
        for queue in 0..*queues {
            ranges.entry((topic.clone(), queue)).or_default();
        }
    }
    Ok(OpenedLog {
        shared,
        state,
        ranges,
        lite_topics,
    })
}

/// Whether the redb database holds messages (a directory of the layout before the log).
fn redb_messages(db: &Database) -> Result<bool, StoreError> {
    let txn = db.begin_read().map_err(db_err)?;
    let messages = txn.open_table(MESSAGES).map_err(db_err)?.len().map_err(db_err)?;
    Ok(messages > 0)
}

/// Moves the messages of the redb layout into the log, each queue keeping its offsets, then
/// deletes them from redb. Done once; a crash in the middle starts it again from the redb copy.
fn convert_from_redb(db: &Database, state: &mut LogState, log_dir: &Path) -> Result<(), StoreError> {
    std::fs::write(log_dir.join(CONVERTING), b"")?;
    let started = Instant::now();
    let mut next: HashMap<(String, u32), u64> = HashMap::new();
    let mut count = 0u64;
    {
        let txn = db.begin_read().map_err(db_err)?;
        let table = txn.open_table(MESSAGES).map_err(db_err)?;
        let mut pending = 0u64;
        for entry in table.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let (topic, queue, offset) = k.value();
            let (record, store_ms) = codec::decode_record(v.value())?;
            let key = (topic.to_owned(), queue);
            let expected = next.get(&key).copied().unwrap_or(offset);
            if offset != expected {
                return Err(StoreError::Corrupt(format!(
                    "converting the redb layout: {topic} queue {queue} jumps from offset {expected} to {offset}"
                )));
            }
            next.insert(key, offset + 1);
            let number = state.number_for(db, topic, queue)?;
            let copy = crate::split_lite_queue_topic(topic).is_some();
            let (pos, size) = state.writer.append(|out| {
                codec::encode_log_message(out, number, &record, store_ms, &[], copy);
            });
            state.index.stage_queue(number, offset, Entry { pos, size });
            if !copy {
                state.stage_id(&record.msg_id, pos);
            }
            count += 1;
            pending += u64::from(size);
            if pending >= 64 << 20 {
                state.writer.flush(false)?;
                state.index.write()?;
                pending = 0;
            }
        }
    }
    state.writer.flush(true)?;
    state.index.write()?;
    state.checkpoint_now(log_dir)?;
    let txn = db.begin_write().map_err(db_err)?;
    txn.delete_table(MESSAGES).map_err(db_err)?;
    txn.delete_table(MSG_INDEX).map_err(db_err)?;
    txn.open_table(MESSAGES).map_err(db_err)?;
    txn.open_table(MSG_INDEX).map_err(db_err)?;
    txn.commit().map_err(db_err)?;
    std::fs::remove_file(log_dir.join(CONVERTING))?;
    tracing::warn!(
        messages = count,
        queues = next.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "converted the data directory from the redb layout to the commit log"
    );
    Ok(())
}

impl LogState {
    /// The number of a queue, assigned (durably, before any record names it) if new.
    fn number_for(&mut self, db: &Database, topic: &str, queue: u32) -> Result<u32, StoreError> {
        self.number_all(db, &[(topic, queue)])?;
        self.shared
            .number(topic, queue)
            .ok_or_else(|| StoreError::Database(format!("queue {topic}/{queue} got no number")))
    }

    /// Numbers for every queue in `queues` that has none, in one durable commit.
    fn number_all(&mut self, db: &Database, queues: &[(&str, u32)]) -> Result<(), StoreError> {
        let new: Vec<(&str, u32)> = queues
            .iter()
            .copied()
            .filter(|(t, q)| self.shared.number(t, *q).is_none())
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let txn = db.begin_write().map_err(db_err)?;
        let mut assigned = Vec::new();
        {
            let mut table = txn.open_table(QUEUE_NUMBERS).map_err(db_err)?;
            let mut next = self.next_number;
            for (topic, queue) in new {
                if assigned.iter().any(|(t, q, _)| *t == topic && *q == queue) {
                    continue;
                }
                table.insert((topic, queue), next).map_err(db_err)?;
                assigned.push((topic, queue, next));
                next += 1;
            }
        }
        txn.commit().map_err(db_err)?;
        self.next_number += assigned.len() as u32;
        if let Ok(mut numbers) = self.shared.numbers.write() {
            for (topic, queue, number) in assigned {
                numbers.insert(topic, queue, number);
            }
        }
        Ok(())
    }

    /// Stages the msgId of the record just appended at `pos` (in the active segment).
    fn stage_id(&mut self, msg_id: &[u8; 16], pos: u64) {
        self.index
            .stage_id(self.writer.active_base().unwrap_or(pos), msg_id, pos);
    }

    /// At close: everything durable, and a checkpoint at the tail (the next start reads no log
    /// again but the last segment, which it checks).
    pub(in crate::embedded) fn close(&mut self, data_dir: &Path) -> Result<(), StoreError> {
        self.checkpoint_now(&data_dir.join("log"))
    }

    /// Makes the indexes durable up to the log's tail and records it.
    fn checkpoint_now(&mut self, log_dir: &Path) -> Result<(), StoreError> {
        // Never past records whose index entries are not written yet.
        self.index.write()?;
        let tail = self.writer.tail();
        self.writer.sync()?;
        self.index.sync()?;
        write_checkpoint(log_dir, tail)?;
        self.checkpoint = tail;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Finds the tail from the checkpoint (the whole last segment is checked too), cuts the
    /// indexes back to what the checkpoint covered and completes them from the log.
    fn recover(&mut self, segment_bytes: u64) -> Result<(), StoreError> {
        let segments = self.shared.segments.clone();
        let log_dir = segments.dir().to_owned();
        let from = self
            .checkpoint
            .min(segments.bases().last().copied().unwrap_or(self.checkpoint));
        let numbers: std::collections::HashSet<u32> = self
            .shared
            .numbers
            .read()
            .map_err(|_| StoreError::Closed)?
            .iter()
            .map(|(_, n)| n)
            .collect();
        let mut ends: HashMap<u32, u64> = HashMap::new();
        for &number in &numbers {
            if let Some((_, end)) = self.index.cut_queue(number, self.checkpoint)? {
                ends.insert(number, end);
            }
        }
        let bases = segments.bases();
        // The msgId files of the segments the scan reads (from the one holding `from` on).
        let scanned = &bases[bases.partition_point(|b| *b <= from).saturating_sub(1)..];
        for &base in scanned {
            self.index.cut_ids(base, self.checkpoint)?;
        }
        let checkpoint = self.checkpoint;
        let mut replayed = 0u64;
        let mut staged = 0u64;
        let index = &mut self.index;
        let mut unknown = 0u64;
        let tail = commit_log::recover(&segments, from, &mut |record| {
            if record.pos < checkpoint {
                return Ok(());
            }
            let message = codec::decode_log_message(record.payload)?;
            for number in std::iter::once(message.queue_number).chain(message.lite_queues.iter().copied()) {
                if !numbers.contains(&number) {
                    // A reclaimed lite topic's, or a queue whose number was never made durable.
                    unknown += 1;
                    continue;
                }
                let end = ends.entry(number).or_insert(0);
                index.stage_queue(
                    number,
                    *end,
                    Entry {
                        pos: record.pos,
                        size: record.size,
                    },
                );
                *end += 1;
            }
            if !message.copy {
                let holding = bases.partition_point(|b| *b <= record.pos).saturating_sub(1);
                let base = bases.get(holding).copied().unwrap_or(record.pos);
                index.stage_id(base, &message.record.msg_id, record.pos);
            }
            replayed += 1;
            staged += 1;
            if staged >= 100_000 {
                index.write()?;
                staged = 0;
            }
            Ok(())
        })?;
        self.index.write()?;
        if tail.pos < checkpoint {
            // Damage before the checkpoint (in the last segment, checked whole): nothing after
            // it stays indexed.
            for &number in &numbers {
                self.index.cut_queue(number, tail.pos)?;
            }
            for base in segments.bases() {
                self.index.cut_ids(base, tail.pos)?;
            }
        }
        if tail.damaged {
            tracing::error!(
                tail = tail.pos,
                "the commit log was damaged (a torn or corrupt record): cut at its last good record"
            );
        }
        if replayed > 0 || unknown > 0 {
            tracing::info!(
                replayed,
                unknown,
                tail = tail.pos,
                "commit log recovered past its checkpoint"
            );
        }
        self.writer = LogWriter::new(segments, tail.pos, segment_bytes)?;
        self.checkpoint_now(&log_dir)
    }
}

impl Writer {
    /// Applies a group on the commit log: new queues numbered (durably), the records appended
    /// and flushed once, their index entries written, then the small state (consumer changes,
    /// the delay schedule) in one redb commit. Once the records are flushed they are indexed
    /// and their appends answered OK whatever the redb commit does (it answers the rest).
    pub(super) fn apply_log(
        &mut self,
        log: &mut LogState,
        works: Vec<Work>,
        group: Group,
        replies: &mut [Reply],
    ) -> Result<(), StoreError> {
        let Group { now, due, sync_now, .. } = group;
        let staged = self.stage_log(log, works, now, due, replies);
        let (redb_work, delayed, due_entries) = match staged {
            Ok(staged) => staged,
            Err(e) => {
                log.writer.discard();
                log.index.discard();
                return Err(e);
            }
        };
        if let Err(e) = log.writer.flush(sync_now) {
            log.index.discard();
            return Err(e);
        }
        if let Err(e) = log.index.write() {
            // The records are in the log: their entries are written with the next group (or
            // from the log at the next start: no checkpoint passes them before).
            tracing::error!(error = %e, "writing the queue indexes failed; retried with the next write");
        }
        self.apply_log_rest(log, redb_work, delayed, due_entries, group, replies);
        Ok(())
    }

    /// A group's messages appended to the log buffer (not yet written), and the rest of it.
    #[allow(clippy::type_complexity)]
    fn stage_log(
        &mut self,
        log: &mut LogState,
        works: Vec<Work>,
        now: u64,
        due: bool,
        replies: &mut [Reply],
    ) -> Result<(Vec<(usize, Work)>, Vec<Delayed>, Vec<Due>), StoreError> {
        // Index entries of earlier records whose write failed go first: until they are
        // written, no new record is (a full disk refuses appends until space returns).
        log.index.write()?;
        let due_entries = if due { self.take_due(now)? } else { Vec::new() };
        let mut queues: Vec<(&str, u32)> = Vec::new();
        for work in &works {
            if let Work::Append {
                topic,
                queue,
                deliver_at_ms,
                records,
            } = work
                && deliver_at_ms.is_none_or(|d| d <= now)
            {
                queues.push((topic, *queue));
                for record in records {
                    queues.extend(record.lite_topics.iter().map(|t| (t.as_str(), 0)));
                }
            }
        }
        queues.extend(due_entries.iter().map(|(_, topic, queue, _)| (topic.as_str(), *queue)));
        log.number_all(&self.db, &queues)?;
        log.writer.seal_if_older(self.retention / 4);
        let mut delayed: Vec<Delayed> = Vec::new();
        let mut redb_work = Vec::new();
        for (i, work) in works.into_iter().enumerate() {
            match work {
                Work::Append {
                    topic,
                    queue,
                    deliver_at_ms,
                    records,
                } => match deliver_at_ms.filter(|d| *d > now) {
                    Some(due_at) => delayed.push((i, topic, queue, due_at, records)),
                    None => {
                        let mut appended = Vec::with_capacity(records.len());
                        for record in &records {
                            appended.push(self.append_log_record(log, &topic, queue, record, now)?);
                        }
                        if let Reply::Append(_, slot) = &mut replies[i] {
                            *slot = appended;
                        }
                    }
                },
                Work::Track { topic, queues } => self.track_log(log, &topic, queues)?,
                other => redb_work.push((i, other)),
            }
        }
        for (_, topic, queue, record) in &due_entries {
            self.append_log_record(log, topic, *queue, record, now)?;
        }
        Ok((redb_work, delayed, due_entries))
    }

    /// After the log flush: the small state in redb (whatever fails there fails only its own
    /// writes), retention, the checkpoint.
    fn apply_log_rest(
        &mut self,
        log: &mut LogState,
        redb_work: Vec<(usize, Work)>,
        delayed: Vec<Delayed>,
        due_entries: Vec<Due>,
        group: Group,
        replies: &mut [Reply],
    ) {
        let Group {
            now, purge, sync_now, ..
        } = group;
        if !redb_work.is_empty() || !delayed.is_empty() || !due_entries.is_empty() {
            // The replies of the writes in the redb commit, answered if it fails.
            let in_commit: Vec<usize> = redb_work
                .iter()
                .map(|(i, _)| *i)
                .chain(delayed.iter().map(|d| d.0))
                .collect();
            let result = self.apply_log_state(
                log,
                redb_work.into_iter().map(|(_, w)| w),
                &delayed,
                &due_entries,
                now,
                sync_now,
            );
            match result {
                Ok(seqs) => {
                    for ((i, ..), appended) in delayed.iter().zip(seqs) {
                        if let Reply::Append(_, slot) = &mut replies[*i] {
                            *slot = appended;
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "store state commit failed; its writes are answered with an error");
                    if !due_entries.is_empty() {
                        tracing::warn!(
                            count = due_entries.len(),
                            "due delayed messages stay scheduled and will be delivered again"
                        );
                    }
                    for i in in_commit {
                        let reply = std::mem::replace(&mut replies[i], Reply::Answered);
                        reply.fail(e.duplicate());
                    }
                }
            }
        }
        if purge {
            self.purge_log(log, now);
        }
        if log.writer.tail() > log.checkpoint
            && !log.index.has_staged()
            && (log.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL
                || log.writer.tail() - log.checkpoint >= CHECKPOINT_BYTES)
        {
            let dir = self.data_dir.join("log");
            if let Err(e) = log.checkpoint_now(&dir) {
                tracing::warn!(error = %e, "commit log checkpoint failed; retried after the next commit");
            }
        }
    }

    /// Due delayed messages (read, not yet removed: that happens after they are in the log).
    fn take_due(&self, now: u64) -> Result<Vec<Due>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(SCHEDULE).map_err(db_err)?;
        let mut due = Vec::new();
        for entry in table
            .range((0, 0)..=(now, u64::MAX))
            .map_err(db_err)?
            .take(MAINTENANCE_BATCH)
        {
            let (k, v) = entry.map_err(db_err)?;
            let (topic, queue, record) = codec::decode_scheduled(v.value())?;
            due.push((k.value(), topic, queue, record));
        }
        Ok(due)
    }

    /// Appends one message to the log buffer and stages its index entries (its queue's, its
    /// lite topics', its msgId).
    fn append_log_record(
        &mut self,
        log: &mut LogState,
        topic: &str,
        queue: u32,
        record: &NewRecord,
        now: u64,
    ) -> Result<Appended, StoreError> {
        let number = log
            .shared
            .number(topic, queue)
            .ok_or_else(|| StoreError::Database(format!("queue {topic}/{queue} has no number")))?;
        let lite: Vec<u32> = record
            .lite_topics
            .iter()
            .filter_map(|t| log.shared.number(t, 0))
            .collect();
        let (pos, size) = log
            .writer
            .append(|out| codec::encode_log_message(out, number, record, now, &lite, false));
        let entry = Entry { pos, size };
        let offset = self.next_offset(topic, queue);
        log.index.stage_queue(number, offset, entry);
        for (lite_topic, lite_number) in record.lite_topics.iter().zip(&lite) {
            let lite_offset = self.next_offset(lite_topic, 0);
            log.index.stage_queue(*lite_number, lite_offset, entry);
        }
        log.stage_id(&record.msg_id, pos);
        Ok(Appended {
            queue_offset: offset,
            store_seq: pos,
            offset_msg_id: None,
        })
    }

    /// The offset the next message of a queue gets (its range grows by one).
    fn next_offset(&mut self, topic: &str, queue: u32) -> u64 {
        let key = (topic.to_owned(), queue);
        Self::touch_range(&mut self.touched, &self.ranges, &key);
        if !self.appended.contains(topic) {
            self.appended.insert(topic.to_owned());
        }
        let range = self.ranges.entry(key).or_default();
        range.max += 1;
        range.max - 1
    }

    /// A topic added at run time: its queues' ranges as their indexes hold them.
    fn track_log(&mut self, log: &LogState, topic: &str, queues: u32) -> Result<(), StoreError> {
        let start = log.shared.segments.start().unwrap_or(log.writer.tail());
        for queue in 0..queues {
            let key = (topic.to_owned(), queue);
            if self.ranges.contains_key(&key) {
                continue;
            }
            Self::touch_range(&mut self.touched, &self.ranges, &key);
            let range = match log.shared.number(topic, queue) {
                Some(n) => log
                    .shared
                    .indexes
                    .queue_range(n, start)?
                    .map_or_else(QueueRange::default, |(min, max)| QueueRange { min, max }),
                None => QueueRange::default(),
            };
            self.ranges.insert(key, range);
        }
        Ok(())
    }

    /// The redb part of a group: consumer changes, probes, dropped lite queues, new delayed
    /// messages (their `Appended`, in order, returned) and the removal of delivered ones.
    fn apply_log_state(
        &mut self,
        log: &mut LogState,
        works: impl Iterator<Item = Work>,
        delayed: &[Delayed],
        delivered: &[Due],
        now: u64,
        sync_now: bool,
    ) -> Result<Vec<Vec<Appended>>, StoreError> {
        let txn = super::begin_write(&self.db, sync_now)?;
        let mut dropped = Vec::new();
        for work in works {
            match work {
                Work::Consumer(ops) => super::apply_consumer_ops(&txn, ops)?,
                Work::Probe => {
                    let mut meta = txn.open_table(META).map_err(db_err)?;
                    meta.insert("probe", now.to_be_bytes().as_slice()).map_err(db_err)?;
                }
                Work::DropQueue { topic } => {
                    txn.open_table(QUEUE_NUMBERS)
                        .map_err(db_err)?
                        .remove((topic.as_str(), 0))
                        .map_err(db_err)?;
                    dropped.push(topic);
                }
                Work::Append { .. } | Work::Track { .. } => {}
            }
        }
        let mut appended = Vec::with_capacity(delayed.len());
        {
            let mut schedule = txn.open_table(SCHEDULE).map_err(db_err)?;
            for (_, topic, queue, due_at, records) in delayed {
                let mut out = Vec::with_capacity(records.len());
                for record in records {
                    let seq = self.counters.schedule_seq;
                    self.counters.schedule_seq += 1;
                    schedule
                        .insert(
                            (*due_at, seq),
                            codec::encode_scheduled(topic, *queue, record).as_slice(),
                        )
                        .map_err(db_err)?;
                    out.push(Appended {
                        queue_offset: seq,
                        store_seq: DELAYED_SEQ | seq,
                        offset_msg_id: None,
                    });
                }
                self.next_due = Some(self.next_due.map_or(*due_at, |d| d.min(*due_at)));
                appended.push(out);
            }
            for (key, ..) in delivered {
                schedule.remove(key).map_err(db_err)?;
            }
            if !delivered.is_empty() {
                self.next_due = schedule.first().map_err(db_err)?.map(|(k, _)| k.value().0);
                tracing::debug!(count = delivered.len(), "delivered due delayed messages");
            }
            let mut meta = txn.open_table(META).map_err(db_err)?;
            meta.insert("schedule_seq", self.counters.schedule_seq.to_be_bytes().as_slice())
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        for topic in dropped {
            let key = (topic.clone(), 0);
            Self::touch_range(&mut self.touched, &self.ranges, &key);
            self.ranges.remove(&key);
            let number = log.shared.numbers.write().ok().and_then(|mut n| n.remove(&topic, 0));
            if let Some(number) = number {
                log.index.remove(IndexFile::Queue(number))?;
            }
            tracing::debug!(topic, "lite topic reclaimed");
        }
        Ok(appended)
    }

    /// Retention: removes the oldest sealed segments last written before `now - retention`
    /// (with their msgId indexes), then moves each queue's smallest offset past them.
    fn purge_log(&mut self, log: &mut LogState, now: u64) {
        let cutoff =
            std::time::UNIX_EPOCH + Duration::from_millis(now.saturating_sub(self.retention.as_millis() as u64));
        let segments = log.shared.segments.clone();
        let mut removed = 0;
        for base in segments.bases() {
            if Some(base) == log.writer.active_base() || base + 1 > log.writer.tail() {
                break;
            }
            let path = segments.dir().join(format!("{base:020}"));
            let expired = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|modified| modified < cutoff);
            if !expired {
                break;
            }
            if let Err(e) = segments
                .remove(base)
                .and_then(|()| log.index.remove(IndexFile::Ids(base)))
            {
                tracing::warn!(error = %e, segment = base, "retention could not remove a segment");
                break;
            }
            removed += 1;
        }
        if removed == 0 {
            return;
        }
        let start = segments.start().unwrap_or(log.writer.tail());
        let numbered: Vec<((String, u32), u32)> = log
            .shared
            .numbers
            .read()
            .map(|n| n.iter().map(|(k, n)| (k.clone(), n)).collect())
            .unwrap_or_default();
        let mut dropped_messages = 0;
        for (key, number) in numbered {
            let Some(range) = self.ranges.get(&key).copied() else {
                continue;
            };
            match log.shared.indexes.queue_range(number, start) {
                Ok(Some((min, _))) if min > range.min => {
                    Self::touch_range(&mut self.touched, &self.ranges, &key);
                    if let Some(r) = self.ranges.get_mut(&key) {
                        r.min = min.min(r.max);
                    }
                    dropped_messages += min - range.min;
                    if let Err(e) = log.index.trim_queue(number, min) {
                        tracing::warn!(error = %e, queue = number, "trimming a queue index failed");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, queue = number, "reading a queue index failed"),
            }
        }
        tracing::info!(
            segments = removed,
            removed = dropped_messages,
            "retention deleted expired messages"
        );
    }
}
