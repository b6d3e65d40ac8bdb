//! The requestId decoder: any text is refused or decoded, never a panic; a requestId the
//! encoder made from fields taken from the input decodes back to those fields, and only for
//! the context it was made for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqproxy::engine::request_id::{self, BatchToken, RequestIdKeys};
use mqproxy::store::ContextKey;

fn context(client_id: Option<&str>) -> ContextKey {
    ContextKey {
        topic: "topic".into(),
        group: "group".into(),
        client_id: client_id.map(str::to_owned),
    }
}

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, v) in data.iter().skip(at).take(8).enumerate() {
        b[i] = *v;
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let keys = RequestIdKeys::new([7u8; 32], Some([9u8; 32]));
    let ctx = context(None);
    // Arbitrary text: Ok or Err, nothing else.
    let text = String::from_utf8_lossy(data);
    let _ = request_id::decode(&text, &keys, &ctx);

    // Round trip of fields made from the input (a broker name without commas, as routes have).
    let broker_name: String = text.chars().filter(|c| *c != ',').take(32).collect();
    let token = BatchToken {
        broker_name,
        queue_id: u64_at(data, 0) as u32,
        offset: u64_at(data, 4),
        next_offset: u64_at(data, 12),
        lock_time: u64_at(data, 20),
        force_ack: data.first().is_some_and(|b| b & 1 == 1),
        pop: data.first().is_some_and(|b| b & 2 == 2),
    };
    let encoded = request_id::encode(&token, &keys, &ctx);
    let decoded = request_id::decode(&encoded, &keys, &ctx).expect("an encoded requestId decodes");
    assert_eq!(decoded, token);
    assert!(request_id::decode(&encoded, &keys, &context(Some("other"))).is_err());
    // One flipped character is refused (or, if it lands in padding-free base64 slack, decodes
    // to the same fields).
    if !encoded.is_empty() {
        let at = usize::from(data.first().copied().unwrap_or(0)) % encoded.len();
        let mut flipped: Vec<u8> = encoded.into_bytes();
        flipped[at] = if flipped[at] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8_lossy(&flipped).into_owned();
        if let Ok(t) = request_id::decode(&flipped, &keys, &ctx) {
            assert_eq!(t, token, "a changed requestId decoded to other fields");
        }
    }
});
