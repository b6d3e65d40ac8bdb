//! The commit log's indexes, in files beside it: one per queue (offset -> record, fixed-width
//! entries, RocketMQ's consume queue) and one per segment (msgId fingerprint -> record).
//!
//! Both are appended after the log records they point to are written, and made durable only
//! at a checkpoint: after a crash each is cut back to what the last checkpoint covered and
//! completed again from the log.

use crate::StoreError;
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A queue index file: a 12-byte header (`MQIX`, the offset of the first entry), then one
/// 12-byte entry per offset: the record's log position and whole size.
pub(super) const ENTRY_BYTES: u64 = 12;
const QUEUE_MAGIC: &[u8; 4] = b"MQIX";
/// A msgId file entry: the id's fingerprint and the record's position in its segment, plus 1
/// (so never-written zeros are no entry).
const ID_ENTRY_BYTES: u64 = 8;
/// How many stale entries at the front of a queue index make it worth rewriting.
const REWRITE_DEAD_ENTRIES: u64 = 1 << 16;
/// Index files kept open, by the writer and by readers each (more are closed and reopened on
/// use), so the store's descriptors stay few beside the segments' and the connections'.
const OPEN_FILES: usize = 256;

fn io(e: std::io::Error) -> StoreError {
    StoreError::Io(e)
}

/// Where one record is in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) pos: u64,
    pub(super) size: u32,
}

impl Entry {
    fn encode(self) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[..8].copy_from_slice(&self.pos.to_le_bytes());
        out[8..].copy_from_slice(&self.size.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Self {
        let mut pos = [0u8; 8];
        let mut size = [0u8; 4];
        pos.copy_from_slice(&bytes[..8]);
        size.copy_from_slice(&bytes[8..12]);
        Self {
            pos: u64::from_le_bytes(pos),
            size: u32::from_le_bytes(size),
        }
    }
}

/// The fingerprint of a msgId in the msgId files (a collision only costs a record read).
pub(super) fn fingerprint(msg_id: &[u8; 16]) -> u32 {
    crc32c::crc32c(msg_id)
}

/// Which index file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum IndexFile {
    /// A queue's, by its store-wide number.
    Queue(u32),
    /// A segment's msgIds, by the segment's base.
    Ids(u64),
}

/// The index files' directory, for readers.
#[derive(Debug)]
pub(super) struct Indexes {
    queues: PathBuf,
    log: PathBuf,
    /// Queue index files open for reading (a pull opens none); the writer forgets one it
    /// replaces or deletes.
    open_queues: std::sync::Mutex<HashMap<u32, std::sync::Arc<File>>>,
}

impl Indexes {
    pub(super) fn new(data_dir: &Path) -> Result<Self, StoreError> {
        let queues = data_dir.join("index");
        std::fs::create_dir_all(&queues)?;
        Ok(Self {
            queues,
            log: data_dir.join("log"),
            open_queues: std::sync::Mutex::new(HashMap::new()),
        })
    }

    pub(super) fn path(&self, file: IndexFile) -> PathBuf {
        match file {
            IndexFile::Queue(number) => self.queues.join(format!("{number:08x}")),
            IndexFile::Ids(base) => self.log.join(format!("{base:020}.ids")),
        }
    }

    fn open(&self, file: IndexFile) -> Result<Option<File>, StoreError> {
        match File::open(self.path(file)) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    /// A queue's index file, open for reading (kept open).
    fn queue_file(&self, queue: u32) -> Result<Option<std::sync::Arc<File>>, StoreError> {
        let mut open = self.open_queues.lock().map_err(|_| StoreError::Closed)?;
        if let Some(file) = open.get(&queue) {
            return Ok(Some(file.clone()));
        }
        let Some(file) = self.open(IndexFile::Queue(queue))? else {
            return Ok(None);
        };
        if open.len() >= OPEN_FILES {
            open.clear();
        }
        let file = std::sync::Arc::new(file);
        open.insert(queue, file.clone());
        Ok(Some(file))
    }

    /// Closes the reading handle of a queue index the writer replaced or deleted.
    fn forget(&self, queue: u32) {
        if let Ok(mut open) = self.open_queues.lock() {
            open.remove(&queue);
        }
    }

    /// Up to `max` entries of a queue from `offset` on (fewer at its end).
    pub(super) fn read(&self, queue: u32, offset: u64, max: usize) -> Result<Vec<Entry>, StoreError> {
        let Some(file) = self.queue_file(queue)? else {
            return Ok(Vec::new());
        };
        let base = queue_base(&file)?;
        let Some(first) = offset.checked_sub(base) else {
            return Ok(Vec::new());
        };
        let len = file.metadata().map_err(io)?.len();
        let at = ENTRY_BYTES + first * ENTRY_BYTES;
        let n = (len.saturating_sub(at) / ENTRY_BYTES).min(max as u64);
        let mut bytes = vec![0u8; (n * ENTRY_BYTES) as usize];
        file.read_exact_at(&mut bytes, at).map_err(io)?;
        Ok(bytes.chunks_exact(ENTRY_BYTES as usize).map(Entry::decode).collect())
    }

    /// The offset of the queue's entry for the record at `pos`, if it has one.
    pub(super) fn offset_of(&self, queue: u32, pos: u64) -> Result<Option<u64>, StoreError> {
        let Some(file) = self.queue_file(queue)? else {
            return Ok(None);
        };
        let (base, count) = queue_extent(&file)?;
        let i = first_entry_where(&file, count, |e| e.pos >= pos)?;
        Ok((i < count && entry_at(&file, i)?.pos == pos).then_some(base + i))
    }

    /// Log positions (in segment `base`) of records whose msgId has `fp` as fingerprint.
    pub(super) fn id_candidates(&self, base: u64, fp: u32) -> Result<Vec<u64>, StoreError> {
        let Some(file) = self.open(IndexFile::Ids(base))? else {
            return Ok(Vec::new());
        };
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut bytes).map_err(io)?;
        Ok(bytes
            .chunks_exact(ID_ENTRY_BYTES as usize)
            .filter_map(|e| {
                let f = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
                let rel = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
                (f == fp && rel > 0).then(|| base + u64::from(rel - 1))
            })
            .collect())
    }

    /// A queue's offsets `min..max` with records at or after `log_start`; None without a file.
    pub(super) fn queue_range(&self, queue: u32, log_start: u64) -> Result<Option<(u64, u64)>, StoreError> {
        let Some(file) = self.queue_file(queue)? else {
            return Ok(None);
        };
        let (base, count) = queue_extent(&file)?;
        let first_live = first_entry_where(&file, count, |e| e.pos >= log_start)?;
        Ok(Some((base + first_live, base + count)))
    }
}

fn queue_base(file: &File) -> Result<u64, StoreError> {
    let mut header = [0u8; 12];
    file.read_exact_at(&mut header, 0)
        .map_err(|_| StoreError::Corrupt("a queue index file has no header".into()))?;
    if &header[..4] != QUEUE_MAGIC {
        return Err(StoreError::Corrupt("a queue index file has a wrong header".into()));
    }
    let mut base = [0u8; 8];
    base.copy_from_slice(&header[4..]);
    Ok(u64::from_le_bytes(base))
}

/// A queue index's first offset and number of entries.
fn queue_extent(file: &File) -> Result<(u64, u64), StoreError> {
    let base = queue_base(file)?;
    let len = file.metadata().map_err(io)?.len();
    Ok((base, len.saturating_sub(ENTRY_BYTES) / ENTRY_BYTES))
}

fn entry_at(file: &File, i: u64) -> Result<Entry, StoreError> {
    let mut bytes = [0u8; 12];
    file.read_exact_at(&mut bytes, ENTRY_BYTES + i * ENTRY_BYTES)
        .map_err(io)?;
    Ok(Entry::decode(&bytes))
}

/// The first of `count` entries for which `after` holds (it holds for every later one), or
/// `count`.
fn first_entry_where(file: &File, count: u64, after: impl Fn(Entry) -> bool) -> Result<u64, StoreError> {
    let (mut low, mut high) = (0, count);
    while low < high {
        let mid = low + (high - low) / 2;
        if after(entry_at(file, mid)?) {
            high = mid;
        } else {
            low = mid + 1;
        }
    }
    Ok(low)
}

/// The writer's side: entries staged during a group commit, written after its log records,
/// made durable at checkpoints.
pub(super) struct IndexWriter {
    indexes: std::sync::Arc<Indexes>,
    /// Open files and their lengths.
    open: HashMap<IndexFile, (File, u64)>,
    staged: HashMap<IndexFile, Vec<u8>>,
    /// The first offset of a queue index created by the staged entries.
    new_bases: HashMap<u32, u64>,
    /// Written since the last checkpoint.
    dirty: HashSet<IndexFile>,
}

impl IndexWriter {
    pub(super) fn new(indexes: std::sync::Arc<Indexes>) -> Self {
        Self {
            indexes,
            open: HashMap::new(),
            staged: HashMap::new(),
            new_bases: HashMap::new(),
            dirty: HashSet::new(),
        }
    }

    /// Stages the entry of `queue`'s `offset` (the next one of the queue).
    pub(super) fn stage_queue(&mut self, queue: u32, offset: u64, entry: Entry) {
        let staged = self.staged.entry(IndexFile::Queue(queue)).or_default();
        if staged.is_empty() {
            // The file's first offset, if this creates it.
            self.new_bases.entry(queue).or_insert(offset);
        }
        staged.extend_from_slice(&entry.encode());
    }

    /// Stages a msgId entry of segment `base`.
    pub(super) fn stage_id(&mut self, base: u64, msg_id: &[u8; 16], pos: u64) {
        let rel = u32::try_from(pos - base + 1).unwrap_or(u32::MAX);
        let staged = self.staged.entry(IndexFile::Ids(base)).or_default();
        staged.extend_from_slice(&fingerprint(msg_id).to_le_bytes());
        staged.extend_from_slice(&rel.to_le_bytes());
    }

    /// Drops what is staged (its log records failed).
    pub(super) fn discard(&mut self) {
        self.staged.clear();
        self.new_bases.clear();
    }

    /// Writes what is staged. What fails stays staged (in order) and is written again by the
    /// next call: the log records it points to are already written.
    pub(super) fn write(&mut self) -> Result<(), StoreError> {
        let staged = std::mem::take(&mut self.staged);
        let mut result = Ok(());
        for (file, bytes) in staged {
            let base = match file {
                IndexFile::Queue(q) => self.new_bases.get(&q).copied(),
                IndexFile::Ids(_) => None,
            };
            match self.append(file, base, &bytes) {
                Ok(()) => {
                    if let IndexFile::Queue(q) = file {
                        self.new_bases.remove(&q);
                    }
                }
                Err(e) => {
                    self.open.remove(&file);
                    self.staged.insert(file, bytes);
                    result = Err(e);
                }
            }
        }
        result
    }

    /// Whether entries wait to be written again (a checkpoint must not pass their records).
    pub(super) fn has_staged(&self) -> bool {
        !self.staged.is_empty()
    }

    fn handle(&mut self, file: IndexFile, base: Option<u64>) -> Result<&mut (File, u64), StoreError> {
        if !self.open.contains_key(&file) {
            if self.open.len() >= OPEN_FILES {
                self.open.clear();
            }
            let path = self.indexes.path(file);
            let handle = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io)?;
            let mut len = handle.metadata().map_err(io)?.len();
            if let (IndexFile::Queue(_), 0) = (file, len) {
                let mut header = [0u8; 12];
                header[..4].copy_from_slice(QUEUE_MAGIC);
                header[4..].copy_from_slice(&base.unwrap_or(0).to_le_bytes());
                handle.write_all_at(&header, 0).map_err(io)?;
                len = ENTRY_BYTES;
            }
            self.open.insert(file, (handle, len));
        }
        self.open
            .get_mut(&file)
            .ok_or_else(|| StoreError::Database("index handle vanished".into()))
    }

    fn append(&mut self, file: IndexFile, base: Option<u64>, bytes: &[u8]) -> Result<(), StoreError> {
        let (handle, len) = self.handle(file, base)?;
        let at = *len;
        handle.write_all_at(bytes, at).map_err(io)?;
        *len += bytes.len() as u64;
        self.dirty.insert(file);
        Ok(())
    }

    /// Makes every index written since the last checkpoint durable.
    pub(super) fn sync(&mut self) -> Result<(), StoreError> {
        for file in std::mem::take(&mut self.dirty) {
            match self.open.get(&file) {
                Some((handle, _)) => handle.sync_data().map_err(io)?,
                None => {
                    if let Some(handle) = self.indexes.open(file)? {
                        handle.sync_data().map_err(io)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Deletes an index (a dropped queue, a removed segment's msgIds).
    pub(super) fn remove(&mut self, file: IndexFile) -> Result<(), StoreError> {
        self.open.remove(&file);
        if let IndexFile::Queue(queue) = file {
            self.indexes.forget(queue);
        }
        self.dirty.remove(&file);
        match std::fs::remove_file(self.indexes.path(file)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
            _ => Ok(()),
        }
    }

    /// Cuts a queue index back to its entries of records before `cut` (recovery); returns its
    /// offsets `(base, end)`, None without a file.
    pub(super) fn cut_queue(&mut self, queue: u32, cut: u64) -> Result<Option<(u64, u64)>, StoreError> {
        let file = IndexFile::Queue(queue);
        self.open.remove(&file);
        let Some(handle) = self.indexes.open(file)? else {
            return Ok(None);
        };
        let Ok((base, count)) = queue_extent(&handle) else {
            // A header never written: the file holds nothing the log needs.
            self.remove(file)?;
            return Ok(None);
        };
        // Entries past the checkpoint may be torn or zeros: keep the prefix of good ones.
        let keep = first_entry_where(&handle, count, |e| e.size == 0 || e.pos >= cut)?;
        if keep < count || handle.metadata().map_err(io)?.len() != ENTRY_BYTES + count * ENTRY_BYTES {
            let handle = OpenOptions::new()
                .write(true)
                .open(self.indexes.path(file))
                .map_err(io)?;
            handle.set_len(ENTRY_BYTES + keep * ENTRY_BYTES).map_err(io)?;
            self.dirty.insert(file);
        }
        Ok(Some((base, base + keep)))
    }

    /// Cuts a segment's msgId index back to records before `cut` (recovery).
    pub(super) fn cut_ids(&mut self, base: u64, cut: u64) -> Result<(), StoreError> {
        let file = IndexFile::Ids(base);
        self.open.remove(&file);
        let Some(handle) = self.indexes.open(file)? else {
            return Ok(());
        };
        let count = handle.metadata().map_err(io)?.len() / ID_ENTRY_BYTES;
        let (mut low, mut high) = (0, count);
        while low < high {
            let mid = low + (high - low) / 2;
            let mut e = [0u8; 8];
            handle.read_exact_at(&mut e, mid * ID_ENTRY_BYTES).map_err(io)?;
            let rel = u64::from(u32::from_le_bytes([e[4], e[5], e[6], e[7]]));
            if rel == 0 || base + rel > cut {
                high = mid;
            } else {
                low = mid + 1;
            }
        }
        let handle = OpenOptions::new()
            .write(true)
            .open(self.indexes.path(file))
            .map_err(io)?;
        handle.set_len(low * ID_ENTRY_BYTES).map_err(io)?;
        self.dirty.insert(file);
        Ok(())
    }

    /// Drops the stale front of a queue index (records removed by retention) when it is big:
    /// the live entries are copied to a new file that replaces it (readers holding the old
    /// one read it unchanged).
    pub(super) fn trim_queue(&mut self, queue: u32, min: u64) -> Result<(), StoreError> {
        let file = IndexFile::Queue(queue);
        let Some(handle) = self.indexes.open(file)? else {
            return Ok(());
        };
        let (base, count) = queue_extent(&handle)?;
        let dead = min.saturating_sub(base).min(count);
        if dead < REWRITE_DEAD_ENTRIES || dead * 2 < count {
            return Ok(());
        }
        let mut live = vec![0u8; ((count - dead) * ENTRY_BYTES) as usize];
        handle
            .read_exact_at(&mut live, ENTRY_BYTES + dead * ENTRY_BYTES)
            .map_err(io)?;
        let path = self.indexes.path(file);
        let tmp = path.with_extension("new");
        let out = File::create(&tmp).map_err(io)?;
        let mut header = [0u8; 12];
        header[..4].copy_from_slice(QUEUE_MAGIC);
        header[4..].copy_from_slice(&(base + dead).to_le_bytes());
        out.write_all_at(&header, 0).map_err(io)?;
        out.write_all_at(&live, ENTRY_BYTES).map_err(io)?;
        out.sync_data().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        self.open.remove(&file);
        self.indexes.forget(queue);
        tracing::debug!(queue, dropped = dead, "queue index trimmed");
        Ok(())
    }
}
