//! Every bound of the contract, once: the config's checks, the admin API's, the engine's
//! clamps and the OpenAPI document's `minimum`/`maximum` all come from here (the document is
//! checked against these by `tests/it/contract.rs`).

use crate::EngineError;

pub use mqproxy_store::settings::Bounds;

/// The engine's 400 naming the parameter when `value` is outside `bounds`.
///
/// # Errors
/// `value` is outside the range.
pub fn check(bounds: Bounds, parameter: &str, value: u64) -> Result<(), EngineError> {
    match bounds.refusal(value) {
        Some(reason) => Err(EngineError::invalid(format!("{parameter} {reason}"))),
        None => Ok(()),
    }
}

/// The largest message body (the Java proxy's and RocketMQ's default `maxMessageSize`).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Body bytes per pull answer: a pull stops before passing it (but always returns one
/// message), so an answer stays within the 4 MiB a gRPC client decodes by default. Its own
/// rule: that it equals the message limit is the gRPC default's doing.
pub const MAX_PULL_BYTES: usize = 4 * 1024 * 1024;

/// Messages per pull: the consumer's `max_pull_size` and a request's `maxPullSize`.
pub const PULL_SIZE: Bounds = Bounds { min: 1, max: 128 };
pub const DEFAULT_PULL_SIZE: u32 = 32;

/// How long an unacknowledged batch keeps its queue locked (`consumeTimeoutMs`): 10 s .. 36 h,
/// the Java proxy's range.
pub const CONSUME_TIMEOUT_MS: Bounds = Bounds {
    min: 10_000,
    max: 36 * 3_600_000,
};
pub const DEFAULT_CONSUME_TIMEOUT_MS: u64 = 300_000;

/// A pull's own `consumeTimeout`, in seconds (the newer MQCloud contract): the same range.
pub const CONSUME_TIMEOUT_S: Bounds = Bounds {
    min: CONSUME_TIMEOUT_MS.min / 1000,
    max: CONSUME_TIMEOUT_MS.max / 1000,
};

/// A pull's `pullTimeout`, in seconds: how long its read of the message store may take.
pub const PULL_TIMEOUT_S: Bounds = Bounds { min: 1, max: 60 };
pub const DEFAULT_PULL_TIMEOUT_S: u64 = 10;

/// A pull's `waitMs`: how long a pull that finds nothing waits for a message (long polling);
/// 0, the default, answers at once.
pub const WAIT_MS: Bounds = Bounds { min: 0, max: 30_000 };

/// Queues of a topic (the consumer state store ignores saved state beyond them).
pub const QUEUES: Bounds = Bounds {
    min: 1,
    max: mqproxy_store::MAX_QUEUES_PER_TOPIC as u64,
};

/// Pulls per second of a consumer's rate limit (`limitRate`, `default_rate_limit`).
pub const RATE_LIMIT: Bounds = Bounds { min: 1, max: 1_000_000 };

/// Unacknowledged batches of a Consume stream (0 asks for the default).
pub const IN_FLIGHT: Bounds = Bounds { min: 1, max: 1024 };
pub const DEFAULT_IN_FLIGHT: u32 = 4;

/// POP segments in flight per queue of one consumer context: a POP pull passes over a queue
/// with this many unacknowledged segments (they bound the state one queue keeps, and the work
/// of each ack on Redis).
pub const MAX_POP_SEGMENTS_PER_QUEUE: usize = 1024;

/// Seconds between heartbeats of an idle Server-Sent Events stream (`/mq/stream`).
pub const HEARTBEAT_S: Bounds = Bounds { min: 1, max: 300 };
pub const DEFAULT_HEARTBEAT_S: u64 = 15;

/// The longest clientId (it names state the proxy keeps, so its size is bounded too), and of
/// the client address kept with a queue's state.
pub const MAX_CLIENT_ID_CHARS: usize = 128;

/// A client's address as it is kept (a consumer's with its queue, a producer's with its
/// message): trimmed, blank as none, at most [`MAX_CLIENT_ID_CHARS`] characters (cut, not
/// refused: it may come from a forwarding header the client does not control).
pub fn client_address(ip: Option<String>) -> Option<String> {
    let ip = ip?;
    let ip = ip.trim();
    (!ip.is_empty()).then(|| ip.chars().take(MAX_CLIENT_ID_CHARS).collect())
}

/// The longest topic, producer or consumer name (RocketMQ's).
pub const MAX_NAME_CHARS: usize = 127;

/// The longest parent + lite topic name together (MQCloud's rule for lite topics).
pub const MAX_LITE_TOPIC_CHARS: usize = 100;

/// Lite topics one message may name (`liteTopics`): each is a copy on the embedded store and
/// a dispatch on the broker.
pub const MAX_LITE_TOPICS_PER_MESSAGE: usize = 32;

/// `delayLevel`: an index into the store's delay table.
pub const DELAY_LEVEL: Bounds = Bounds {
    min: 1,
    max: mqproxy_store::DELAY_LEVELS_MS.len() as u64,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_check_and_say_why() {
        assert!(check(PULL_SIZE, "maxPullSize", 128).is_ok());
        let e = check(PULL_SIZE, "maxPullSize", 129).expect_err("out of range");
        assert_eq!(e.to_string(), "maxPullSize must be between 1 and 128, got 129");
        assert_eq!(PULL_SIZE.clamp(0), 1);
        assert_eq!(CONSUME_TIMEOUT_MS.max, 129_600_000);
        assert_eq!((CONSUME_TIMEOUT_S.min, CONSUME_TIMEOUT_S.max), (10, 129_600));
        assert!(QUEUES.contains(1024) && !QUEUES.contains(1025));
        assert!(CONSUME_TIMEOUT_MS.contains(DEFAULT_CONSUME_TIMEOUT_MS));
        assert!(PULL_SIZE.contains(u64::from(DEFAULT_PULL_SIZE)));
        assert!(IN_FLIGHT.contains(u64::from(DEFAULT_IN_FLIGHT)));
        assert!(HEARTBEAT_S.contains(DEFAULT_HEARTBEAT_S));
        assert_eq!(DELAY_LEVEL.max, 18);
    }
}
