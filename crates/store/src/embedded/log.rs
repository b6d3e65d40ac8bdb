//! The commit log: message records appended to fixed-size segment files, RocketMQ's layout.
//!
//! A segment is named by the log position of its first byte (20 digits) and preallocated to
//! its size. A record is framed `len[4] crc32c[4] payload` (little-endian; `len` is the
//! payload's), never spans two segments, and a segment whose next record did not fit ends with
//! the [`SEGMENT_END`] marker. So the log's tail is the first frame that is not a record:
//! zeros (never written), or a torn or corrupt record, found by the CRCs at start and cut.

use crate::StoreError;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// Bytes in front of every payload: its length and its CRC-32C.
pub(super) const FRAME_BYTES: u64 = 8;
/// The length field of the marker that ends a segment early (the next record did not fit).
const SEGMENT_END: u32 = u32::MAX;
/// The biggest payload a frame may announce (a message is far smaller; a bigger length is
/// garbage, not a record).
const MAX_PAYLOAD: u32 = 256 << 20;

fn io(e: std::io::Error) -> StoreError {
    StoreError::Io(e)
}

/// The file name of the segment starting at `base`.
fn segment_name(base: u64) -> String {
    format!("{base:020}")
}

/// The frame of one record around `payload` (what [`LogWriter::append`] writes).
pub(super) fn frame_header(payload: &[u8]) -> [u8; 8] {
    let mut header = [0u8; 8];
    header[..4].copy_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_le_bytes());
    header[4..].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    header
}

/// The payload of a framed record, if `bytes` (a whole record) is one: length and CRC match.
pub(super) fn payload_of(bytes: &[u8]) -> Option<&[u8]> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    let payload = bytes.get(8..8 + len)?;
    (len > 0 && crc32c::crc32c(payload) == crc).then_some(payload)
}

/// The segment files, shared by the writer and the readers.
#[derive(Debug)]
pub(super) struct Segments {
    dir: PathBuf,
    files: RwLock<BTreeMap<u64, Arc<File>>>,
}

impl Segments {
    /// The segment holding `pos` and its base.
    fn holding(&self, pos: u64) -> Result<(u64, Arc<File>), StoreError> {
        let files = self.files.read().map_err(|_| StoreError::Closed)?;
        files
            .range(..=pos)
            .next_back()
            .map(|(base, file)| (*base, file.clone()))
            .ok_or_else(|| StoreError::Corrupt(format!("log position {pos} is in no segment (removed by retention?)")))
    }

    /// `len` bytes of the log from `pos` (within one segment).
    pub(super) fn read(&self, pos: u64, len: usize) -> Result<Vec<u8>, StoreError> {
        let (base, file) = self.holding(pos)?;
        let mut out = vec![0u8; len];
        file.read_exact_at(&mut out, pos - base).map_err(io)?;
        Ok(out)
    }

    /// The record at `pos` whose frame and payload are `size` bytes: its payload, CRC checked.
    pub(super) fn read_record(&self, pos: u64, size: u32) -> Result<Vec<u8>, StoreError> {
        let bytes = self.read(pos, size as usize)?;
        match payload_of(&bytes) {
            Some(payload) if payload.len() + FRAME_BYTES as usize == bytes.len() => Ok(payload.to_vec()),
            _ => Err(self.damaged(pos)),
        }
    }

    /// The record at `pos`, its size unknown (read the frame first).
    pub(super) fn read_record_at(&self, pos: u64) -> Result<Vec<u8>, StoreError> {
        let header = self.read(pos, FRAME_BYTES as usize)?;
        let len = u32::from_le_bytes(header[..4].try_into().map_err(|_| self.damaged(pos))?);
        if len == 0 || len > MAX_PAYLOAD {
            return Err(self.damaged(pos));
        }
        self.read_record(pos, len + FRAME_BYTES as u32)
    }

    fn damaged(&self, pos: u64) -> StoreError {
        StoreError::Corrupt(format!(
            "the commit log record at position {pos} in {} fails its CRC check (the disk damaged it)",
            self.dir.display()
        ))
    }

    /// The first position still in the log (None: no segment yet).
    pub(super) fn start(&self) -> Option<u64> {
        self.files.read().ok()?.keys().next().copied()
    }

    /// Bases of all segments, oldest first.
    pub(super) fn bases(&self) -> Vec<u64> {
        self.files
            .read()
            .map(|f| f.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Bytes the segment files take (their preallocated sizes).
    pub(super) fn bytes(&self) -> u64 {
        self.files
            .read()
            .map(|f| {
                f.values()
                    .filter_map(|file| file.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, base: u64) -> PathBuf {
        self.dir.join(segment_name(base))
    }

    /// Deletes the segment at `base` (retention, or garbage past the tail at recovery).
    pub(super) fn remove(&self, base: u64) -> Result<(), StoreError> {
        if let Ok(mut files) = self.files.write() {
            files.remove(&base);
        }
        match std::fs::remove_file(self.path(base)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
            _ => Ok(()),
        }
    }
}

/// Reserves `size` bytes for `file` (zeros), so appends do not grow it; a file system
/// without `fallocate` gets a sparse file.
fn preallocate(file: &File, size: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(size).map_err(|_| std::io::Error::other("segment too big"))?;
    // SAFETY: a valid open file descriptor and a non-negative range.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    match rc {
        0 => Ok(()),
        libc::EOPNOTSUPP | libc::EINVAL => file.set_len(size),
        libc::ENOSPC => {
            // Less free space than a segment: a sparse one, filled as far as the disk allows
            // (the free-space reserve refuses produce before the disk is full).
            tracing::warn!(size, "no room to preallocate a commit log segment: it grows as written");
            file.set_len(size)
        }
        errno => Err(std::io::Error::from_raw_os_error(errno)),
    }
}

/// One record found by a scan: its position, its whole size (frame included), its payload.
pub(super) struct Scanned<'a> {
    pub(super) pos: u64,
    pub(super) size: u32,
    pub(super) payload: &'a [u8],
}

/// Where a scan of the log ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tail {
    /// The position after the last good record: the next record goes here.
    pub(super) pos: u64,
    /// Whether the scan stopped at damage (a torn or corrupt record, a segment cut short,
    /// or segments after a cut one) rather than at never-written space.
    pub(super) damaged: bool,
}

/// Reads records of one segment from `from` (a position in it) on, checking each frame, until
/// its end marker, never-written space or damage; calls `each` for every good record.
fn scan_segment(
    base: u64,
    file: &File,
    from: u64,
    each: &mut dyn FnMut(Scanned<'_>) -> Result<(), StoreError>,
) -> Result<(u64, Ending), StoreError> {
    use std::io::Seek;
    let size = file.metadata().map_err(io)?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    reader.seek(std::io::SeekFrom::Start(from - base)).map_err(io)?;
    let mut at = from - base;
    let mut payload = Vec::new();
    loop {
        let mut header = [0u8; 8];
        if at + FRAME_BYTES > size || reader.read_exact(&mut header).is_err() {
            return Ok((base + at, Ending::Unwritten));
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        match len {
            0 if crc == 0 => return Ok((base + at, Ending::Unwritten)),
            SEGMENT_END => return Ok((base + at, Ending::Marker)),
            len if len > MAX_PAYLOAD || at + FRAME_BYTES + u64::from(len) > size => {
                return Ok((base + at, Ending::Damaged));
            }
            _ => {}
        }
        payload.resize(len as usize, 0);
        if reader.read_exact(&mut payload).is_err() || crc32c::crc32c(&payload) != crc {
            return Ok((base + at, Ending::Damaged));
        }
        let record_size = len + FRAME_BYTES as u32;
        each(Scanned {
            pos: base + at,
            size: record_size,
            payload: &payload,
        })?;
        at += u64::from(record_size);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Zeros: the rest of the segment was never written.
    Unwritten,
    /// The end marker: the log goes on in the next segment.
    Marker,
    Damaged,
}

/// The segment files of `dir` (created if missing), opened.
pub(super) fn open_segments(dir: &Path) -> Result<Arc<Segments>, StoreError> {
    std::fs::create_dir_all(dir)?;
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(base) = name
            .to_str()
            .filter(|n| n.len() == 20)
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let file = OpenOptions::new().read(true).write(true).open(entry.path())?;
        files.insert(base, Arc::new(file));
    }
    Ok(Arc::new(Segments {
        dir: dir.to_owned(),
        files: RwLock::new(files),
    }))
}

/// Checks the log from `from` to its end and finds its tail, calling `each` for every good
/// record on the way; then cuts what lies past the tail (the rest of its segment zeroed, later
/// segments deleted), so nothing written before a crash and not found good comes back later.
pub(super) fn recover(
    segments: &Segments,
    from: u64,
    each: &mut dyn FnMut(Scanned<'_>) -> Result<(), StoreError>,
) -> Result<Tail, StoreError> {
    let bases = segments.bases();
    let mut tail = Tail {
        pos: from.max(bases.first().copied().unwrap_or(0)),
        damaged: false,
    };
    // The first segment not wholly before `from`; those after the tail are cut.
    let mut cut_from = bases.len();
    for (i, &base) in bases.iter().enumerate() {
        let (_, file) = segments.holding(base)?;
        let size = file.metadata().map_err(io)?.len();
        if base + size <= tail.pos {
            continue;
        }
        if base > tail.pos {
            // A gap: the segment before did not end where this one starts.
            tail.damaged = true;
            cut_from = i;
            break;
        }
        let (end, ending) = scan_segment(base, &file, tail.pos, each)?;
        match ending {
            Ending::Marker => tail.pos = base + size,
            Ending::Unwritten | Ending::Damaged => {
                tail.pos = end;
                tail.damaged = ending == Ending::Damaged || i + 1 < bases.len();
                zero_from(&file, end - base, size)?;
                cut_from = i + 1;
                break;
            }
        }
    }
    for &base in &bases[cut_from..] {
        tracing::warn!(segment = base, "commit log segment past the tail removed");
        segments.remove(base)?;
    }
    Ok(tail)
}

/// Zeros a segment from `at` to its end (what lies past the tail), durably.
fn zero_from(file: &File, at: u64, size: u64) -> Result<(), StoreError> {
    if at >= size {
        return Ok(());
    }
    file.set_len(at).map_err(io)?;
    preallocate(file, size).map_err(io)?;
    file.sync_data().map_err(io)
}

/// The single appender of the log. Records are appended to a buffer and written, then made
/// durable, by [`LogWriter::flush`]: one write and one fdatasync per group commit.
pub(super) struct LogWriter {
    segments: Arc<Segments>,
    segment_bytes: u64,
    /// The segment appends go to (base, size); None before the first segment exists.
    active: Option<(u64, u64)>,
    /// Where the next record goes.
    tail: u64,
    /// Records appended since the last flush, by segment (base, first position, bytes).
    pending: Vec<(u64, u64, Vec<u8>)>,
    /// The tail and active segment before the pending records (put back if they fail).
    flushed: (u64, Option<(u64, u64)>),
    /// Segments whose data is written but not yet durable.
    unsynced: Vec<u64>,
    /// The record being framed (kept for its allocation).
    scratch: Vec<u8>,
    /// A pending buffer's allocation, kept for the next group (growing a fresh one to a
    /// group's size was 2% of a batch produce's CPU).
    spare: Vec<u8>,
    /// When the active segment got its first record (None: not since this start).
    active_since: Option<std::time::Instant>,
    /// The next record starts a new segment.
    sealing: bool,
}

impl LogWriter {
    pub(super) fn new(segments: Arc<Segments>, tail: u64, segment_bytes: u64) -> Result<Self, StoreError> {
        let active = match segments.holding(tail) {
            Ok((base, file)) => {
                let size = file.metadata().map_err(io)?.len();
                (tail < base + size).then_some((base, size))
            }
            Err(_) => None,
        };
        let tail = match active {
            Some(_) => tail,
            // The last segment is full (or none exists): the next one starts at the tail.
            None => tail.max(segments.bases().last().map_or(0, |&b| {
                segments
                    .holding(b)
                    .ok()
                    .and_then(|(_, f)| f.metadata().ok())
                    .map_or(b, |m| b + m.len())
            })),
        };
        Ok(Self {
            segments,
            segment_bytes,
            active,
            tail,
            pending: Vec::new(),
            flushed: (tail, active),
            unsynced: Vec::new(),
            scratch: Vec::new(),
            spare: Vec::new(),
            active_since: None,
            sealing: false,
        })
    }

    /// Where the next record goes.
    pub(super) fn tail(&self) -> u64 {
        self.tail
    }

    /// Appends one record whose payload `write` puts in the buffer; returns its position and
    /// whole size. Nothing is on disk before [`LogWriter::flush`].
    pub(super) fn append(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> (u64, u32) {
        let mut record = std::mem::take(&mut self.scratch);
        record.clear();
        record.extend_from_slice(&[0; FRAME_BYTES as usize]);
        write(&mut record);
        let header = frame_header(&record[FRAME_BYTES as usize..]);
        record[..FRAME_BYTES as usize].copy_from_slice(&header);
        let size = record.len() as u64;
        // Room for the record and, after it, the end marker.
        let fits = !self.sealing
            && self
                .active
                .is_some_and(|(base, seg_size)| self.tail + size + FRAME_BYTES <= base + seg_size);
        if !fits {
            self.sealing = false;
            self.active_since = Some(std::time::Instant::now());
            if let Some((base, seg_size)) = self.active {
                let mut marker = [0u8; FRAME_BYTES as usize];
                marker[..4].copy_from_slice(&SEGMENT_END.to_le_bytes());
                self.push(base, &marker);
                self.tail = base + seg_size;
            }
            self.active = Some((self.tail, self.segment_bytes.max(size + FRAME_BYTES)));
        }
        let pos = self.tail;
        let base = self.active.map_or(pos, |(b, _)| b);
        self.push(base, &record);
        self.scratch = record;
        (pos, size as u32)
    }

    /// Ends the active segment if its first record is older than `age`: the next record starts
    /// a new one (retention removes whole segments, so a quiet queue's still go in time).
    pub(super) fn seal_if_older(&mut self, age: std::time::Duration) {
        match self.active_since {
            Some(since) if self.active.is_some() && since.elapsed() >= age => self.sealing = true,
            None if self.active.is_some() => self.active_since = Some(std::time::Instant::now()),
            _ => {}
        }
    }

    /// Puts `bytes` at the tail of segment `base` in the pending buffer.
    fn push(&mut self, base: u64, bytes: &[u8]) {
        match self.pending.last_mut() {
            Some((b, _, buf)) if *b == base => buf.extend_from_slice(bytes),
            _ => {
                let mut buf = std::mem::take(&mut self.spare);
                buf.extend_from_slice(bytes);
                self.pending.push((base, self.tail, buf));
            }
        }
        self.tail += bytes.len() as u64;
    }

    /// Drops the records appended since the last flush (their group failed before it).
    pub(super) fn discard(&mut self) {
        self.clear_pending();
        (self.tail, self.active) = self.flushed;
    }

    /// Writes the pending records; with `sync`, makes them (and earlier unsynced ones) durable.
    /// On failure the records are dropped and the tail goes back: the caller answers them with
    /// the error, and the next records are written where they would have been.
    pub(super) fn flush(&mut self, sync: bool) -> Result<(), StoreError> {
        let result = self
            .write_pending()
            .and_then(|()| if sync { self.sync() } else { Ok(()) });
        if result.is_err() {
            let created: Vec<u64> = self
                .pending
                .iter()
                .map(|(base, ..)| *base)
                .filter(|b| Some(*b) != self.flushed.1.map(|(b, _)| b) && *b >= self.flushed.0)
                .collect();
            for base in created {
                if self.segments.holding(base).is_ok_and(|(b, _)| b == base) {
                    let _ = self.segments.remove(base);
                }
            }
            (self.tail, self.active) = self.flushed;
        } else {
            self.flushed = (self.tail, self.active);
        }
        self.clear_pending();
        result
    }

    fn clear_pending(&mut self) {
        /// A bigger buffer (a burst of large messages) is freed, not kept as RSS.
        const SPARE_MAX: usize = 8 << 20;
        if let Some((_, _, mut buf)) = self.pending.drain(..).next()
            && buf.capacity() <= SPARE_MAX
        {
            buf.clear();
            self.spare = buf;
        }
    }

    fn write_pending(&mut self) -> Result<(), StoreError> {
        for (base, start, bytes) in &self.pending {
            let file = match self.segments.holding(*base) {
                Ok((b, file)) if b == *base => file,
                _ => self.create_segment(*base)?,
            };
            file.write_all_at(bytes, start - base).map_err(io)?;
            if !self.unsynced.contains(base) {
                self.unsynced.push(*base);
            }
        }
        Ok(())
    }

    fn create_segment(&self, base: u64) -> Result<Arc<File>, StoreError> {
        let size = self
            .active
            .filter(|(b, _)| *b == base)
            .map_or(self.segment_bytes, |(_, s)| s);
        let path = self.segments.path(base);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io)?;
        if let Err(e) = preallocate(&file, size) {
            let _ = std::fs::remove_file(&path);
            return Err(io(e));
        }
        // The new name must survive a crash as the data does.
        File::open(self.segments.dir()).and_then(|d| d.sync_all()).map_err(io)?;
        let file = Arc::new(file);
        if let Ok(mut files) = self.segments.files.write() {
            files.insert(base, file.clone());
        }
        tracing::debug!(segment = base, size, "commit log segment created");
        Ok(file)
    }

    /// Makes everything written so far durable.
    pub(super) fn sync(&mut self) -> Result<(), StoreError> {
        for base in std::mem::take(&mut self.unsynced) {
            if let Ok((b, file)) = self.segments.holding(base)
                && b == base
            {
                file.sync_data().map_err(io)?;
            }
        }
        Ok(())
    }

    /// The active segment's base (retention never removes it).
    pub(super) fn active_base(&self) -> Option<u64> {
        self.active.map(|(b, _)| b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(writer: &mut LogWriter, n: usize, len: usize) -> Vec<(u64, u32)> {
        (0..n)
            .map(|i| writer.append(|out| out.extend(std::iter::repeat_n(i as u8 + 1, len))))
            .collect()
    }

    fn scan_all(segments: &Segments) -> (Vec<u64>, Tail) {
        let mut seen = Vec::new();
        let tail = recover(segments, 0, &mut |r| {
            seen.push(r.pos);
            Ok(())
        })
        .expect("recover");
        (seen, tail)
    }

    #[test]
    fn records_roll_over_segments_and_are_found_again() {
        let dir = tempfile::tempdir().expect("tmp");
        let segments = open_segments(dir.path()).expect("open");
        let mut writer = LogWriter::new(segments.clone(), 0, 1_000).expect("writer");
        let written = records(&mut writer, 30, 100);
        writer.flush(true).expect("flush");
        assert!(segments.bases().len() >= 3, "rolled over: {:?}", segments.bases());
        for (pos, size) in &written {
            let payload = segments.read_record(*pos, *size).expect("read");
            assert_eq!(payload.len(), 100);
            assert_eq!(segments.read_record_at(*pos).expect("read"), payload);
        }
        let segments = open_segments(dir.path()).expect("reopen");
        let (seen, tail) = scan_all(&segments);
        assert_eq!(seen, written.iter().map(|w| w.0).collect::<Vec<_>>());
        assert_eq!(
            tail,
            Tail {
                pos: writer.tail(),
                damaged: false
            }
        );
    }

    #[test]
    fn damage_cuts_the_log_there_and_later_segments_go() {
        let dir = tempfile::tempdir().expect("tmp");
        let segments = open_segments(dir.path()).expect("open");
        let mut writer = LogWriter::new(segments.clone(), 0, 1_000).expect("writer");
        let written = records(&mut writer, 30, 100);
        writer.flush(true).expect("flush");
        // A flipped byte in the 5th record.
        let (pos, _) = written[4];
        let base = segments.holding(pos).expect("seg").0;
        let file = OpenOptions::new()
            .write(true)
            .open(dir.path().join(segment_name(base)))
            .expect("file");
        file.write_all_at(&[0xAB], pos - base + 20).expect("damage");
        let segments = open_segments(dir.path()).expect("reopen");
        let (seen, tail) = scan_all(&segments);
        assert_eq!(seen, written[..4].iter().map(|w| w.0).collect::<Vec<_>>());
        assert_eq!(tail, Tail { pos, damaged: true });
        assert_eq!(segments.bases(), vec![base], "later segments removed");
        // Appends go on at the cut, and a second recovery finds exactly them.
        let mut writer = LogWriter::new(segments.clone(), tail.pos, 1_000).expect("writer");
        let more = records(&mut writer, 3, 50);
        writer.flush(true).expect("flush");
        let (seen, _) = scan_all(&open_segments(dir.path()).expect("reopen"));
        let expected: Vec<u64> = written[..4].iter().chain(&more).map(|w| w.0).collect();
        assert_eq!(seen, expected);
    }
}
