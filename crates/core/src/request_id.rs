//! The requestId: `brokerName,queueId,offset,nextOffset,lockTime,forceAck` as the Java proxy
//! writes it, plus a seventh field, an HMAC-SHA256 tag (keyed by the store's secret) over
//! those fields and the consumer context, so a forged or foreign requestId moves nothing.
//! URL-safe base64 with padding; decoding accepts it with or without padding. A POP segment's
//! requestId has one more field before the tag, `pop` (a normal batch's keeps the six).

use base64::Engine as _;
use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hmac::{Hmac, Mac};
use mqproxy_store::ContextKey;
use mqproxy_store::settings::SettingError;
use sha2::{Digest, Sha256};

const ENCODER: GeneralPurpose = GeneralPurpose::new(&URL_SAFE, GeneralPurposeConfig::new());
const DECODER: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
/// Bytes of the tag kept (128 bits).
const TAG_LEN: usize = 16;

/// What a requestId names: one batch handed out from one locked queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchToken {
    pub broker_name: String,
    pub queue_id: u32,
    pub offset: u64,
    pub next_offset: u64,
    pub lock_time: u64,
    pub force_ack: bool,
    /// A POP segment (`pop=true`), not a queue lock.
    pub pop: bool,
}

impl BatchToken {
    /// The Java proxy's debug form, quoted in ack messages.
    pub fn info(&self) -> String {
        format!(
            "{}-{}:{},{},{},{}",
            self.broker_name, self.queue_id, self.offset, self.next_offset, self.lock_time, self.force_ack
        )
    }

    fn fields(&self) -> String {
        format!(
            "{},{},{},{},{},{}{}",
            self.broker_name,
            self.queue_id,
            self.offset,
            self.next_offset,
            self.lock_time,
            self.force_ack,
            if self.pop { ",pop" } else { "" }
        )
    }
}

/// Why a requestId was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("requestId is not URL-safe base64")]
    Encoding,
    #[error("requestId is malformed: {0}")]
    Malformed(&'static str),
    #[error("requestId was not issued by this server for this consumer")]
    BadSignature,
}

/// The keys of the requestId MAC: new requestIds are signed with `current`; a requestId signed
/// with `previous` (the key before a rotation) is still accepted, so batches pulled before a
/// rotation can be acknowledged after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestIdKeys {
    current: [u8; 32],
    previous: Option<[u8; 32]>,
}

impl RequestIdKeys {
    pub fn new(current: [u8; 32], previous: Option<[u8; 32]>) -> Self {
        Self { current, previous }
    }

    /// The key of a configured secret (any text): its SHA-256.
    pub fn key_of(secret: &str) -> [u8; 32] {
        Sha256::digest(secret.as_bytes()).into()
    }

    fn accepted(&self) -> impl Iterator<Item = &[u8; 32]> {
        std::iter::once(&self.current).chain(self.previous.as_ref())
    }
}

/// The `[request_id]` section: the secrets of the requestId MAC.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RequestIdSecrets {
    /// Any text, 16+ characters (give every proxy the same one); without it the key is made at
    /// first start and kept in the data directory (or shared through Redis).
    pub secret: Option<String>,
    /// The secret before a rotation: requestIds it signed are still accepted. Defaults, when
    /// `secret` is set, to the kept key, so the first configured secret is a rotation too.
    pub previous_secret: Option<String>,
}

/// The shortest secret accepted (a MAC key guessable by brute force forges every requestId).
const MIN_SECRET_CHARS: usize = 16;

impl RequestIdSecrets {
    /// Checks the secrets' lengths and that a previous secret has a current one.
    ///
    /// # Errors
    /// The first key refused.
    pub fn check(&self) -> Result<(), SettingError> {
        for (key, secret) in [("secret", &self.secret), ("previous_secret", &self.previous_secret)] {
            if secret.as_ref().is_some_and(|s| s.chars().count() < MIN_SECRET_CHARS) {
                return Err(SettingError::new(
                    key,
                    format!("must be at least {MIN_SECRET_CHARS} characters"),
                ));
            }
        }
        if self.previous_secret.is_some() && self.secret.is_none() {
            return Err(SettingError::new(
                "previous_secret",
                "needs secret (the secret now in use)",
            ));
        }
        Ok(())
    }

    /// The MAC keys: the configured secret (the previous one, or else the kept key, still
    /// accepted), or the key kept in the data directory / Redis.
    pub fn keys(&self, kept: [u8; 32]) -> RequestIdKeys {
        match &self.secret {
            Some(current) => RequestIdKeys::new(
                RequestIdKeys::key_of(current),
                Some(self.previous_secret.as_deref().map_or(kept, RequestIdKeys::key_of)),
            ),
            None => RequestIdKeys::new(kept, None),
        }
    }
}

fn tag(secret: &[u8; 32], fields: &str, context: &ContextKey) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    for part in [
        fields,
        "\n",
        &context.topic,
        "\n",
        &context.group,
        "\n",
        context.client_id.as_deref().unwrap_or(""),
    ] {
        mac.update(part.as_bytes());
    }
    mac
}

pub fn encode(token: &BatchToken, keys: &RequestIdKeys, context: &ContextKey) -> String {
    let fields = token.fields();
    let digest = tag(&keys.current, &fields, context).finalize().into_bytes();
    ENCODER.encode(format!("{fields},{}", hex::encode(&digest[..TAG_LEN])))
}

pub fn decode(request_id: &str, keys: &RequestIdKeys, context: &ContextKey) -> Result<BatchToken, TokenError> {
    let bytes = DECODER.decode(request_id.trim()).map_err(|_| TokenError::Encoding)?;
    let text = String::from_utf8(bytes).map_err(|_| TokenError::Malformed("not UTF-8"))?;
    let (fields, tag_hex) = text.rsplit_once(',').ok_or(TokenError::Malformed("too few fields"))?;
    let parts: Vec<&str> = fields.split(',').collect();
    let (pop, parts) = match parts.as_slice() {
        [six @ .., "pop"] => (true, six),
        all => (false, all),
    };
    let [broker_name, queue_id, offset, next_offset, lock_time, force_ack] = parts else {
        return Err(TokenError::Malformed("expected 7 fields"));
    };
    let tag_bytes = hex::decode(tag_hex).map_err(|_| TokenError::Malformed("bad tag"))?;
    let signed = keys
        .accepted()
        .any(|key| tag(key, fields, context).verify_truncated_left(&tag_bytes).is_ok());
    if !signed || tag_bytes.len() != TAG_LEN {
        return Err(TokenError::BadSignature);
    }
    let num = |s: &str, what: &'static str| s.parse::<u64>().map_err(|_| TokenError::Malformed(what));
    Ok(BatchToken {
        broker_name: (*broker_name).to_owned(),
        queue_id: queue_id.parse().map_err(|_| TokenError::Malformed("queueId"))?,
        offset: num(offset, "offset")?,
        next_offset: num(next_offset, "nextOffset")?,
        lock_time: num(lock_time, "lockTime")?,
        force_ack: force_ack.eq_ignore_ascii_case("true"),
        pop,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(client: Option<&str>) -> ContextKey {
        ContextKey {
            topic: "t".into(),
            group: "g".into(),
            client_id: client.map(str::to_owned),
        }
    }

    #[test]
    fn round_trip_and_forgery() {
        let token = BatchToken {
            broker_name: "broker-a".into(),
            queue_id: 3,
            offset: 10,
            next_offset: 42,
            lock_time: 1_655_882_634_054,
            force_ack: false,
            pop: false,
        };
        let secret = RequestIdKeys::new([9u8; 32], None);
        let id = encode(&token, &secret, &ctx(None));
        assert!(!id.contains('+') && !id.contains('/'));
        assert_eq!(decode(&id, &secret, &ctx(None)), Ok(token.clone()));
        assert_eq!(decode(id.trim_end_matches('='), &secret, &ctx(None)), Ok(token.clone()));
        // Another consumer context, another secret: refused.
        assert_eq!(decode(&id, &secret, &ctx(Some("c1"))), Err(TokenError::BadSignature));
        let other = RequestIdKeys::new([1u8; 32], None);
        assert_eq!(decode(&id, &other, &ctx(None)), Err(TokenError::BadSignature));
        // The Java proxy's unsigned form (the seed's sample) and edited fields: refused.
        assert!(decode("YnJva2VyLWMsNCwyMTU2OSwyMTYwMSwxNjU1ODgyNjM0MDU0", &secret, &ctx(None)).is_err());
        let text = String::from_utf8(DECODER.decode(&id).expect("b64")).expect("utf8");
        let forged = ENCODER.encode(text.replace(",42,", ",99,"));
        assert_eq!(decode(&forged, &secret, &ctx(None)), Err(TokenError::BadSignature));
        assert_eq!(decode("%%%", &secret, &ctx(None)), Err(TokenError::Encoding));
        // A POP segment's requestId says so, signed like the rest; dropping the flag breaks it.
        let segment = BatchToken { pop: true, ..token };
        let id = encode(&segment, &secret, &ctx(None));
        assert_eq!(decode(&id, &secret, &ctx(None)), Ok(segment));
        let text = String::from_utf8(DECODER.decode(&id).expect("b64")).expect("utf8");
        let unflagged = ENCODER.encode(text.replace(",pop,", ","));
        assert_eq!(decode(&unflagged, &secret, &ctx(None)), Err(TokenError::BadSignature));
    }

    /// After a rotation, requestIds of the previous key still decode; new ones use the new key;
    /// one rotation later the oldest key is refused.
    #[test]
    fn rotation_accepts_the_previous_key() {
        let token = BatchToken {
            broker_name: "b".into(),
            queue_id: 0,
            offset: 1,
            next_offset: 2,
            lock_time: 3,
            force_ack: true,
            pop: false,
        };
        let (a, b, c) = (
            RequestIdKeys::key_of("a-secret"),
            RequestIdKeys::key_of("b-secret"),
            [7u8; 32],
        );
        let before = encode(&token, &RequestIdKeys::new(a, None), &ctx(None));
        let rotated = RequestIdKeys::new(b, Some(a));
        assert_eq!(decode(&before, &rotated, &ctx(None)), Ok(token.clone()));
        let after = encode(&token, &rotated, &ctx(None));
        assert_eq!(
            decode(&after, &RequestIdKeys::new(b, None), &ctx(None)),
            Ok(token.clone())
        );
        let twice = RequestIdKeys::new(c, Some(b));
        assert_eq!(decode(&after, &twice, &ctx(None)), Ok(token));
        assert_eq!(decode(&before, &twice, &ctx(None)), Err(TokenError::BadSignature));
    }
}
