//! Message ids, the orderId queue hash and the delay-level table.

use mqproxy_store::StoreIdentity;
use std::sync::atomic::{AtomicU64, Ordering};

pub use mqproxy_store::DELAY_LEVELS_MS;

/// Java `String.hashCode`: over UTF-16 code units, `h = 31*h + c`, wrapping in 32 bits.
pub fn java_string_hash(s: &str) -> i32 {
    s.encode_utf16()
        .fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(i32::from(c)))
}

/// The queue of an ordered message: `|hash(orderId) % queues|` with Java's truncating
/// remainder on the hash widened to 64 bits, as the Java proxy computes it.
pub fn order_queue(order_id: &str, queues: u32) -> u32 {
    let hash = i64::from(java_string_hash(order_id));
    (hash % i64::from(queues.max(1))).unsigned_abs() as u32
}

/// Makes msgIds: node id (random per data directory), boot count (incremented per start)
/// and a counter, so ids are unique across restarts without coordination.
#[derive(Debug)]
pub struct MsgIdGenerator {
    prefix: [u8; 8],
    counter: AtomicU64,
}

impl MsgIdGenerator {
    pub fn new(identity: &StoreIdentity) -> Self {
        let mut prefix = [0u8; 8];
        prefix[..4].copy_from_slice(&identity.node_id.to_be_bytes());
        prefix[4..].copy_from_slice(&identity.boot.to_be_bytes());
        Self {
            prefix,
            counter: AtomicU64::new(0),
        }
    }

    pub fn next(&self) -> [u8; 16] {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.prefix);
        id[8..].copy_from_slice(&n.to_be_bytes());
        id
    }
}

/// 32 upper-case hex digits, as RocketMQ prints ids.
pub fn hex_id(id: &[u8; 16]) -> String {
    // By table into bytes: `hex::encode_upper` builds the String a char at a time, which was 4%
    // of a pull's CPU (one msgId per delivered message).
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let digits: Vec<u8> = id
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xF)]])
        .collect();
    String::from_utf8(digits).unwrap_or_default()
}

/// The msgIds clients make: 16 bytes (mqproxy's, and a Java client's on an IPv4 host) or 28
/// (a Java client's on an IPv6 host: the address takes 16 bytes instead of 4).
pub const MSG_ID_HEX_DIGITS: [usize; 2] = [32, 56];
pub const MSG_ID_RULE: &str = "32 or 56 hex digits";

/// Whether `s` has the shape of a msgId ([`MSG_ID_HEX_DIGITS`] hex digits).
pub fn is_msg_id(s: &str) -> bool {
    MSG_ID_HEX_DIGITS.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The store-made id: store host (IPv4 + port, 8 bytes) and the store sequence (8 bytes),
/// laid out as RocketMQ's offsetMsgId (host, port, commit-log position).
pub fn offset_msg_id(store_host: [u8; 8], store_seq: u64) -> String {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&store_host);
    id[8..].copy_from_slice(&store_seq.to_be_bytes());
    hex_id(&id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_queue_matches_java() {
        // "order-1".hashCode() is -1207111310 in Java; -1207111310 % 4 = -2 -> queue 2.
        assert_eq!(java_string_hash("order-1"), -1_207_111_310);
        assert_eq!(order_queue("order-1", 4), 2);
        assert_eq!(order_queue("12345", 3), 0);
        assert_eq!(java_string_hash("12345"), 46_792_755);
        assert_eq!(java_string_hash(""), 0);
        // Beyond the BMP: two UTF-16 code units, as Java sees it.
        assert_eq!(java_string_hash("😀"), 0xD83D * 31 + 0xDE00);
    }

    #[test]
    fn ids_are_unique_and_hex() {
        let ids = MsgIdGenerator::new(&StoreIdentity {
            secret: [0; 32],
            node_id: 1,
            boot: 2,
        });
        let (a, b) = (hex_id(&ids.next()), hex_id(&ids.next()));
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(is_msg_id(&a) && is_msg_id(&a.to_lowercase()));
        assert!(is_msg_id(&"A".repeat(56)) && !is_msg_id(&a[1..]) && !is_msg_id(&"G".repeat(32)));
        let id: [u8; 16] = std::array::from_fn(|i| (i as u8).wrapping_mul(37));
        assert_eq!(hex_id(&id), hex::encode_upper(id));
    }
}
