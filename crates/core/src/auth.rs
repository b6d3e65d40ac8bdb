//! Per-producer and per-consumer access tokens (optional): a registry entry with a token
//! accepts only requests presenting it. Tokens are held as SHA-256 digests, so neither the
//! memory nor the saved registry holds them, and are compared in constant time.

use super::{
    AckOutcome, ConsumeCommand, ConsumeStream, ConsumeTarget, ConsumerSpec, Engine, EngineError, FetchOutcome,
    FetchRequest, ProduceRequest, ProducerSpec, SendReceipt, Subscription, TopicSpec, UnlockOutcome,
};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tokio_stream::Stream;

/// An access token, as its SHA-256 digest.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken([u8; 32]);

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken(..)")
    }
}

impl AccessToken {
    /// The token whose secret text is `secret`.
    pub fn from_secret(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    /// A token given as the hex SHA-256 digest of its secret (64 hex digits).
    pub fn from_sha256_hex(hex_digest: &str) -> Option<Self> {
        let mut digest = [0u8; 32];
        hex::decode_to_slice(hex_digest.trim(), &mut digest).ok()?;
        Some(Self(digest))
    }

    /// The hex SHA-256 digest (what the saved registry keeps).
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// True when `presented` is this token's secret. Digests of equal length are compared, in
    /// constant time: neither the secret's bytes nor its length leak through timing.
    pub fn accepts(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(self.0.ct_eq(&digest))
    }
}

/// How an admin change treats an entry's token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TokenChange {
    /// Keep the entry's token (none for a new entry).
    #[default]
    Keep,
    /// Require this token from now on.
    Set(AccessToken),
    /// Require no token.
    Clear,
}

impl TokenChange {
    pub(super) fn apply(self, existing: Option<&AccessToken>) -> Option<AccessToken> {
        match self {
            Self::Keep => existing.cloned(),
            Self::Set(t) => Some(t),
            Self::Clear => None,
        }
    }
}

/// A producer's request, its token accepted, bound to the registry snapshot it was checked
/// against: the call runs against that snapshot (one per request).
pub struct ProducerCall<'a> {
    engine: &'a Engine,
    producer: Arc<ProducerSpec>,
    topic: Arc<TopicSpec>,
}

/// A consumer's request, its token accepted, bound to the registry snapshot it was checked
/// against (the consumer's entry as it was then).
pub struct ConsumerCall<'a> {
    engine: &'a Engine,
    spec: Arc<ConsumerSpec>,
    target: ConsumeTarget,
}

/// Checks the token `presented` for a registry entry that has `token`: entries without one
/// accept anyone. Refusals are logged with the name and the reason, never the token.
fn check_token(
    kind: &str,
    name: &str,
    token: Option<&AccessToken>,
    presented: Option<&str>,
) -> Result<(), EngineError> {
    let Some(token) = token else { return Ok(()) };
    match presented.filter(|p| !p.is_empty()) {
        None => {
            tracing::warn!(kind, name, "request refused: no token presented");
            Err(EngineError::Unauthenticated(format!(
                "{kind}:{name} needs a token: Authorization: Bearer TOKEN, or the token parameter"
            )))
        }
        Some(p) if token.accepts(p) => Ok(()),
        Some(_) => {
            tracing::warn!(kind, name, "request refused: wrong token");
            Err(EngineError::PermissionDenied(format!("wrong token for {kind}:{name}")))
        }
    }
}

impl Engine {
    /// A request of producer `name` presenting `presented` (None: no token).
    ///
    /// # Errors
    /// The name is not registered; a token is required and none was presented
    /// (Unauthenticated) or another one was (PermissionDenied).
    pub fn producer(&self, name: &str, presented: Option<&str>) -> Result<ProducerCall<'_>, EngineError> {
        let registry = self.snapshot();
        let producer = registry
            .producers
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::UnknownProducer(name.to_owned()))?;
        check_token("producer", name, producer.token.as_ref(), presented)?;
        let topic = registry
            .topics
            .get(&producer.topic)
            .cloned()
            .ok_or_else(|| EngineError::invalid(format!("producer:{name} has unknown topic {}", producer.topic)))?;
        Ok(ProducerCall {
            engine: self,
            producer,
            topic,
        })
    }

    /// A request of the consumer `target` names, presenting `presented` (None: no token). The
    /// target's topic and clientId are checked by each call.
    ///
    /// # Errors
    /// As [`Engine::producer`].
    pub fn consumer(&self, target: ConsumeTarget, presented: Option<&str>) -> Result<ConsumerCall<'_>, EngineError> {
        let spec = self.consumer_spec(&self.snapshot(), &target.consumer)?;
        check_token("consumer", &spec.name, spec.token.as_ref(), presented)?;
        Ok(ConsumerCall {
            engine: self,
            spec,
            target,
        })
    }
}

impl ProducerCall<'_> {
    /// Produces one message; answered once it is durable.
    ///
    /// # Errors
    /// Bad parameters (body size, delay), or a store failure.
    pub async fn produce(&self, req: ProduceRequest) -> Result<SendReceipt, EngineError> {
        self.engine.produce(&self.topic, &self.producer.name, req).await
    }

    /// Produces a batch to one queue, in order (see [`Engine::produce_batch`]'s rules).
    ///
    /// # Errors
    /// An empty batch.
    pub async fn produce_batch(
        &self,
        bodies: Vec<Vec<u8>>,
        client_ip: Option<String>,
    ) -> Result<Vec<Result<SendReceipt, EngineError>>, EngineError> {
        self.engine
            .produce_batch(&self.topic, &self.producer.name, bodies, client_ip)
            .await
    }
}

impl ConsumerCall<'_> {
    /// Pulls one batch from one queue (acknowledging the request's `request_id` first).
    ///
    /// # Errors
    /// Topic mismatch, clientId rules, or a store failure.
    pub async fn fetch(&self, req: FetchRequest) -> Result<FetchOutcome, EngineError> {
        self.engine.fetch(&self.spec, &self.target, req).await
    }

    /// Acknowledges a batch by its requestId.
    ///
    /// # Errors
    /// Bad target, a malformed or forged requestId, or a store failure.
    pub async fn ack(&self, request_id: &str) -> Result<AckOutcome, EngineError> {
        self.engine.ack(&self.spec, &self.target, request_id).await
    }

    /// Unlocks the queue of an unacknowledged batch so it is delivered again at once.
    ///
    /// # Errors
    /// Bad target, a malformed or forged requestId, or a store failure.
    pub async fn unlock(&self, request_id: &str) -> Result<UnlockOutcome, EngineError> {
        self.engine.unlock(&self.spec, &self.target, request_id).await
    }

    /// Opens a consume stream (see [`Engine::consume`]'s rules); it runs until the returned
    /// receiver is dropped.
    ///
    /// # Errors
    /// The subscription breaks the consumer's rules, or too many streams are open.
    pub async fn consume<C>(self, sub: Subscription, commands: C) -> Result<ConsumeStream, EngineError>
    where
        C: Stream<Item = ConsumeCommand> + Send + Unpin + 'static,
    {
        self.engine.consume(&self.spec, self.target, sub, commands).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_their_secret() {
        let t = AccessToken::from_secret("s3cret-token");
        assert!(t.accepts("s3cret-token"));
        assert!(!t.accepts("s3cret-toke"));
        assert!(!t.accepts(""));
        let same = AccessToken::from_sha256_hex(&t.sha256_hex()).expect("hex round trip");
        assert_eq!(same, t);
        assert!(AccessToken::from_sha256_hex("abc").is_none());
        assert_eq!(format!("{t:?}"), "AccessToken(..)");
    }

    #[test]
    fn changes_keep_set_or_clear() {
        let (a, b) = (AccessToken::from_secret("a"), AccessToken::from_secret("b"));
        assert_eq!(TokenChange::Keep.apply(Some(&a)), Some(a.clone()));
        assert_eq!(TokenChange::Keep.apply(None), None);
        assert_eq!(TokenChange::Set(b.clone()).apply(Some(&a)), Some(b));
        assert_eq!(TokenChange::Clear.apply(Some(&a)), None);
    }
}
