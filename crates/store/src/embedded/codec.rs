//! Byte layouts of stored values. Message records are laid out by hand (the body is copied
//! once, not element by element); small structured records use postcard.

use crate::{ConsumerSettings, NewRecord, QueueState, StoreError, StoredMessage};
use serde::Serialize;
use serde::de::DeserializeOwned;

const HEADER: usize = 16 + 8 + 8 + 8 + 4;

/// Set in `keys_len` when the born host follows the keys. Records written before the born
/// host existed never have it (keys are far shorter than 2 GiB), so they read as they are.
const BORN_HOST_FOLLOWS: u32 = 1 << 31;

/// `msg_id[16] store_ms[8] store_seq[8] born_ms[8] keys_len[4] keys [host_len[1] host] body`,
/// integers big-endian; the host part only with [`BORN_HOST_FOLLOWS`] in `keys_len`.
pub(super) fn encode_message(record: &NewRecord, store_ms: u64, store_seq: u64) -> Vec<u8> {
    let keys = record.keys.as_deref().unwrap_or("").as_bytes();
    // The engine bounds it far below 255 bytes; a longer one is cut, never a corrupt record.
    let host = record.born_host.as_deref().map(|h| &h.as_bytes()[..h.len().min(255)]);
    let mut out = Vec::with_capacity(HEADER + keys.len() + host.map_or(0, |h| 1 + h.len()) + record.body.len());
    out.extend_from_slice(&record.msg_id);
    out.extend_from_slice(&store_ms.to_be_bytes());
    out.extend_from_slice(&store_seq.to_be_bytes());
    out.extend_from_slice(&record.born_ms.to_be_bytes());
    let keys_len = u32::try_from(keys.len()).unwrap_or(u32::MAX) & !BORN_HOST_FOLLOWS;
    let flag = if host.is_some() { BORN_HOST_FOLLOWS } else { 0 };
    out.extend_from_slice(&(keys_len | flag).to_be_bytes());
    out.extend_from_slice(keys);
    if let Some(host) = host {
        out.push(host.len() as u8);
        out.extend_from_slice(host);
    }
    out.extend_from_slice(&record.body);
    out
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

fn be_u64(bytes: &[u8], at: usize) -> Result<u64, StoreError> {
    bytes
        .get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt("short message header"))
}

/// The record back as it was appended (the inverse of [`encode_message`]).
pub(super) fn decode_record(bytes: &[u8]) -> Result<(NewRecord, u64), StoreError> {
    let msg_id: [u8; 16] = bytes
        .get(..16)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| corrupt("short message id"))?;
    let store_ms = be_u64(bytes, 16)?;
    let born_ms = be_u64(bytes, 32)?;
    let keys_len = bytes
        .get(40..44)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| corrupt("short keys length"))?;
    let has_host = keys_len & BORN_HOST_FOLLOWS != 0;
    let keys_end = HEADER + (keys_len & !BORN_HOST_FOLLOWS) as usize;
    let keys = bytes.get(HEADER..keys_end).ok_or_else(|| corrupt("short keys"))?;
    let keys = String::from_utf8(keys.to_vec()).map_err(|_| corrupt("keys not UTF-8"))?;
    let (born_host, body_at) = if has_host {
        let len = *bytes.get(keys_end).ok_or_else(|| corrupt("short born host length"))? as usize;
        let host = bytes
            .get(keys_end + 1..keys_end + 1 + len)
            .ok_or_else(|| corrupt("short born host"))?;
        let host = String::from_utf8(host.to_vec()).map_err(|_| corrupt("born host not UTF-8"))?;
        (Some(host), keys_end + 1 + len)
    } else {
        (None, keys_end)
    };
    let body = bytes.get(body_at..).ok_or_else(|| corrupt("short body"))?.to_vec();
    let keys = (!keys.is_empty()).then_some(keys);
    Ok((
        NewRecord {
            msg_id,
            keys,
            born_ms,
            born_host,
            body,
            lite_topics: Vec::new(),
        },
        store_ms,
    ))
}

pub(super) fn decode_message(offset: u64, bytes: &[u8]) -> Result<StoredMessage, StoreError> {
    let (record, store_ms) = decode_record(bytes)?;
    Ok(StoredMessage {
        msg_id: record.msg_id,
        client_msg_id: None,
        offset,
        store_ms,
        keys: record.keys,
        born_host: record.born_host,
        body: record.body,
    })
}

/// A message in the commit log, as decoded from its record.
#[derive(Debug, Clone)]
pub(super) struct LogMessage {
    /// The queue (its store-wide number) the record was appended to.
    pub(super) queue_number: u32,
    /// The lite queues it was also delivered to.
    pub(super) lite_queues: Vec<u32>,
    /// A copy made by the conversion from the redb layout: not in the msgId lookup.
    pub(super) copy: bool,
    pub(super) store_ms: u64,
    pub(super) record: NewRecord,
}

const LOG_KEYS: u8 = 1;
const LOG_BORN_HOST: u8 = 1 << 1;
/// `born_ms` is a full u64, not a 4-byte lag behind `store_ms`.
const LOG_BORN_FULL: u8 = 1 << 2;
const LOG_COPY: u8 = 1 << 3;
const LOG_LITE: u8 = 1 << 4;

/// A commit-log record's payload: `flags[1] queue[4] msg_id[16] store_ms[8] born[4|8]
/// [keys_len[4] keys] [host_len[1] host] [lite_count[1] lite_queue[4]..] body`, little-endian.
/// `born` is `store_ms - born_ms` when that fits in 4 bytes (it is the time the message waited
/// for its commit): 33 bytes of header for a plain message, 41 with the frame.
pub(super) fn encode_log_message(
    out: &mut Vec<u8>,
    queue_number: u32,
    record: &NewRecord,
    store_ms: u64,
    lite_queues: &[u32],
    copy: bool,
) {
    let keys = record.keys.as_deref().unwrap_or("").as_bytes();
    let host = record.born_host.as_deref().map(|h| &h.as_bytes()[..h.len().min(255)]);
    let lag = store_ms
        .checked_sub(record.born_ms)
        .and_then(|lag| u32::try_from(lag).ok());
    // The engine bounds lite topics per message far below 255.
    let lite_queues = &lite_queues[..lite_queues.len().min(255)];
    let mut flags = 0;
    for (set, flag) in [
        (!keys.is_empty(), LOG_KEYS),
        (host.is_some(), LOG_BORN_HOST),
        (lag.is_none(), LOG_BORN_FULL),
        (copy, LOG_COPY),
        (!lite_queues.is_empty(), LOG_LITE),
    ] {
        if set {
            flags |= flag;
        }
    }
    out.push(flags);
    out.extend_from_slice(&queue_number.to_le_bytes());
    out.extend_from_slice(&record.msg_id);
    out.extend_from_slice(&store_ms.to_le_bytes());
    match lag {
        Some(lag) => out.extend_from_slice(&lag.to_le_bytes()),
        None => out.extend_from_slice(&record.born_ms.to_le_bytes()),
    }
    if !keys.is_empty() {
        out.extend_from_slice(&u32::try_from(keys.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(keys);
    }
    if let Some(host) = host {
        out.push(host.len() as u8);
        out.extend_from_slice(host);
    }
    if !lite_queues.is_empty() {
        out.push(lite_queues.len() as u8);
        for queue in lite_queues {
            out.extend_from_slice(&queue.to_le_bytes());
        }
    }
    out.extend_from_slice(&record.body);
}

/// Reads a commit-log payload front to back.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], StoreError> {
        let out = self
            .bytes
            .get(self.at..self.at + n)
            .ok_or_else(|| corrupt(&format!("short {what} in a log record")))?;
        self.at += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], StoreError> {
        self.take(N, what)?
            .try_into()
            .map_err(|_| corrupt(&format!("short {what} in a log record")))
    }

    fn string(&mut self, n: usize, what: &str) -> Result<String, StoreError> {
        String::from_utf8(self.take(n, what)?.to_vec()).map_err(|_| corrupt(&format!("{what} not UTF-8")))
    }
}

/// The message of a commit-log payload (the inverse of [`encode_log_message`]).
pub(super) fn decode_log_message(bytes: &[u8]) -> Result<LogMessage, StoreError> {
    let mut cursor = Cursor { bytes, at: 0 };
    let [flags] = cursor.array::<1>("flags")?;
    let queue_number = u32::from_le_bytes(cursor.array("queue")?);
    let msg_id = cursor.array::<16>("msgId")?;
    let store_ms = u64::from_le_bytes(cursor.array("store time")?);
    let born_ms = if flags & LOG_BORN_FULL == 0 {
        store_ms.saturating_sub(u64::from(u32::from_le_bytes(cursor.array("born time")?)))
    } else {
        u64::from_le_bytes(cursor.array("born time")?)
    };
    let keys = if flags & LOG_KEYS == 0 {
        None
    } else {
        let len = u32::from_le_bytes(cursor.array("keys length")?) as usize;
        Some(cursor.string(len, "keys")?)
    };
    let born_host = if flags & LOG_BORN_HOST == 0 {
        None
    } else {
        let [len] = cursor.array::<1>("born host length")?;
        Some(cursor.string(usize::from(len), "born host")?)
    };
    let mut lite_queues = Vec::new();
    if flags & LOG_LITE != 0 {
        let [count] = cursor.array::<1>("lite count")?;
        for _ in 0..count {
            lite_queues.push(u32::from_le_bytes(cursor.array("lite queue")?));
        }
    }
    let body = bytes.get(cursor.at..).unwrap_or_default().to_vec();
    Ok(LogMessage {
        queue_number,
        lite_queues,
        copy: flags & LOG_COPY != 0,
        store_ms,
        record: NewRecord {
            msg_id,
            keys,
            born_ms,
            born_host,
            body,
            lite_topics: Vec::new(),
        },
    })
}

/// A scheduled message: `topic_len[2] topic queue[4]` then the message layout.
pub(super) fn encode_scheduled(topic: &str, queue: u32, record: &NewRecord) -> Vec<u8> {
    let topic = topic.as_bytes();
    let mut out = Vec::with_capacity(2 + topic.len() + 4);
    out.extend_from_slice(&u16::try_from(topic.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(topic);
    out.extend_from_slice(&queue.to_be_bytes());
    out.extend_from_slice(&encode_message(record, 0, 0));
    out
}

pub(super) fn decode_scheduled(bytes: &[u8]) -> Result<(String, u32, NewRecord), StoreError> {
    let topic_len = bytes
        .get(..2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_be_bytes)
        .ok_or_else(|| corrupt("short schedule entry"))? as usize;
    let topic = bytes
        .get(2..2 + topic_len)
        .ok_or_else(|| corrupt("short schedule topic"))?;
    let topic = String::from_utf8(topic.to_vec()).map_err(|_| corrupt("schedule topic not UTF-8"))?;
    let queue = bytes
        .get(2 + topic_len..6 + topic_len)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| corrupt("short schedule queue"))?;
    let (record, _) = decode_record(
        bytes
            .get(6 + topic_len..)
            .ok_or_else(|| corrupt("short schedule record"))?,
    )?;
    Ok((topic, queue, record))
}

pub(super) fn to_postcard<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(value).map_err(|e| StoreError::Corrupt(format!("encode: {e}")))
}

pub(super) fn from_postcard<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("decode: {e}")))
}

/// A queue's consumer state as written before a lock could carry its own timeout.
#[derive(serde::Deserialize)]
struct QueueStateV1 {
    committed: Option<u64>,
    lock_time: Option<u64>,
    last_pull_ms: u64,
    client_ip: Option<String>,
}

/// A record in the current layout, or in its first one, converted (postcard has no field
/// names, so a record without the newer trailing fields fails the current layout).
fn current_or_first<T: DeserializeOwned, First: DeserializeOwned>(
    bytes: &[u8],
    from_first: impl FnOnce(First) -> T,
) -> Result<T, StoreError> {
    from_postcard(bytes).or_else(|e| from_postcard::<First>(bytes).map(from_first).map_err(|_| e))
}

/// A queue's consumer state, current layout or the first one.
pub(super) fn decode_queue_state(bytes: &[u8]) -> Result<QueueState, StoreError> {
    current_or_first(bytes, |v1: QueueStateV1| QueueState {
        committed: v1.committed,
        lock_time: v1.lock_time,
        last_pull_ms: v1.last_pull_ms,
        client_ip: v1.client_ip,
        lock_timeout_ms: None,
    })
}

/// Consumer settings as written before the timeout / pull size overrides existed.
#[derive(serde::Deserialize)]
struct SettingsV1 {
    paused: bool,
    rate_limit_enabled: bool,
    limit_rate: u64,
}

/// Consumer settings, current layout or the first one.
pub(super) fn decode_settings(bytes: &[u8]) -> Result<ConsumerSettings, StoreError> {
    current_or_first(bytes, |v1: SettingsV1| ConsumerSettings {
        paused: v1.paused,
        rate_limit_enabled: v1.rate_limit_enabled,
        limit_rate: v1.limit_rate,
        consume_timeout_ms: None,
        max_pull_size: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trips() {
        let record = NewRecord {
            msg_id: [7; 16],
            keys: Some("k1 k2".into()),
            born_ms: 5,
            born_host: Some("203.0.113.7".into()),
            body: b"hello".to_vec(),
            lite_topics: Vec::new(),
        };
        let bytes = encode_message(&record, 11, 12);
        let msg = decode_message(3, &bytes).expect("decode");
        assert_eq!(
            (msg.msg_id, msg.offset, msg.store_ms, msg.keys.as_deref()),
            ([7; 16], 3, 11, Some("k1 k2"))
        );
        assert_eq!(msg.born_host.as_deref(), Some("203.0.113.7"));
        assert_eq!(msg.body, b"hello");
        let sched = encode_scheduled("t", 2, &record);
        let (topic, queue, back) = decode_scheduled(&sched).expect("decode scheduled");
        assert_eq!((topic.as_str(), queue, back.body), ("t", 2, b"hello".to_vec()));
        assert_eq!(back.born_host.as_deref(), Some("203.0.113.7"));
        assert!(decode_message(0, &bytes[..10]).is_err());
        // Cut inside the born host: corrupt, not a shorter host.
        assert!(decode_message(0, &bytes[..HEADER + 5 + 3]).is_err());
        let plain = NewRecord {
            born_host: None,
            keys: None,
            ..record
        };
        let msg = decode_message(0, &encode_message(&plain, 1, 1)).expect("decode");
        assert_eq!((msg.born_host, msg.keys, msg.body), (None, None, b"hello".to_vec()));
    }

    #[test]
    fn log_message_round_trips_and_stays_small() {
        let record = NewRecord {
            msg_id: [3; 16],
            keys: Some("k".into()),
            born_ms: 1_000,
            born_host: Some("10.1.2.3".into()),
            body: vec![7; 128],
            lite_topics: Vec::new(),
        };
        let mut out = Vec::new();
        encode_log_message(&mut out, 9, &record, 1_005, &[4, 5], false);
        let back = decode_log_message(&out).expect("decode");
        assert_eq!(
            (back.queue_number, back.lite_queues.as_slice(), back.copy, back.store_ms),
            (9, &[4, 5][..], false, 1_005)
        );
        assert_eq!(back.record.msg_id, record.msg_id);
        assert_eq!(
            (back.record.keys, back.record.born_host, back.record.born_ms),
            (record.keys.clone(), record.born_host.clone(), 1_000)
        );
        assert_eq!(back.record.body, record.body);
        // Born after it was stored (another clock): the full time is kept.
        let plain = NewRecord {
            keys: None,
            born_host: None,
            born_ms: 2_000,
            ..record
        };
        out.clear();
        encode_log_message(&mut out, 1, &plain, 1_005, &[], true);
        let back = decode_log_message(&out).expect("decode");
        assert_eq!((back.record.born_ms, back.copy, back.record.keys), (2_000, true, None));
        out.clear();
        encode_log_message(
            &mut out,
            1,
            &NewRecord {
                born_ms: 1_000,
                ..plain
            },
            1_005,
            &[],
            false,
        );
        assert_eq!(out.len(), 33 + 128, "a plain message's header");
        assert!(decode_log_message(&out[..20]).is_err());
    }

    /// A record written before the born host existed (this layout, no flag) reads unchanged.
    #[test]
    fn messages_written_before_the_born_host_still_read() {
        let mut old = Vec::new();
        old.extend_from_slice(&[9; 16]);
        old.extend_from_slice(&4u64.to_be_bytes());
        old.extend_from_slice(&5u64.to_be_bytes());
        old.extend_from_slice(&6u64.to_be_bytes());
        old.extend_from_slice(&2u32.to_be_bytes());
        old.extend_from_slice(b"k1body");
        let msg = decode_message(1, &old).expect("old layout");
        assert_eq!(
            (msg.keys.as_deref(), msg.born_host, msg.body, msg.store_ms),
            (Some("k1"), None, b"body".to_vec(), 4)
        );
    }
}

#[cfg(test)]
mod settings_tests {
    use super::*;

    #[test]
    fn settings_written_before_the_overrides_still_read() {
        #[derive(serde::Serialize)]
        struct Old {
            paused: bool,
            rate_limit_enabled: bool,
            limit_rate: u64,
        }
        let old = to_postcard(&Old {
            paused: true,
            rate_limit_enabled: false,
            limit_rate: 9,
        })
        .expect("encode");
        let read = decode_settings(&old).expect("decode");
        assert_eq!((read.paused, read.limit_rate, read.consume_timeout_ms), (true, 9, None));
        let new = ConsumerSettings {
            consume_timeout_ms: Some(10_000),
            max_pull_size: Some(3),
            ..read
        };
        assert_eq!(
            decode_settings(&to_postcard(&new).expect("encode")).expect("decode"),
            new
        );
    }

    #[test]
    fn queue_state_written_before_lock_timeouts_still_reads() {
        #[derive(serde::Serialize)]
        struct Old {
            committed: Option<u64>,
            lock_time: Option<u64>,
            last_pull_ms: u64,
            client_ip: Option<String>,
        }
        let old = to_postcard(&Old {
            committed: Some(7),
            lock_time: Some(11),
            last_pull_ms: 11,
            client_ip: Some("10.0.0.1".into()),
        })
        .expect("encode");
        let read = decode_queue_state(&old).expect("decode");
        assert_eq!(
            (read.committed, read.lock_time, read.last_pull_ms, read.lock_timeout_ms),
            (Some(7), Some(11), 11, None)
        );
        assert_eq!(read.client_ip.as_deref(), Some("10.0.0.1"));
        let new = QueueState {
            lock_timeout_ms: Some(60_000),
            ..read
        };
        assert_eq!(
            decode_queue_state(&to_postcard(&new).expect("encode")).expect("decode"),
            new
        );
    }
}
