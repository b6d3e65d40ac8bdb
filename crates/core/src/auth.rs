//! Per-producer and per-consumer access tokens (optional): a registry entry with a token
//! accepts only requests presenting it. Tokens are held as SHA-256 digests, so neither the
//! memory nor the saved registry holds them, and are compared in constant time.

use super::{Engine, EngineError};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

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

/// Who a request acts as.
#[derive(Debug, Clone, Copy)]
pub enum Client<'a> {
    Producer(&'a str),
    Consumer(&'a str),
}

impl Engine {
    /// Checks the token `presented` for `client`: entries without a token accept anyone.
    /// Refusals are logged with the name and the reason, never the token.
    ///
    /// # Errors
    /// The name is not registered; a token is required and none was presented
    /// (Unauthenticated) or another one was (PermissionDenied).
    pub fn authorize(&self, client: Client<'_>, presented: Option<&str>) -> Result<(), EngineError> {
        let registry = self.snapshot();
        let (kind, name, token) = match client {
            Client::Producer(name) => (
                "producer",
                name,
                registry
                    .producers
                    .get(name)
                    .ok_or_else(|| EngineError::UnknownProducer(name.to_owned()))?
                    .token
                    .clone(),
            ),
            Client::Consumer(name) => (
                "consumer",
                name,
                registry
                    .consumers
                    .get(name)
                    .ok_or_else(|| EngineError::UnknownConsumer(name.to_owned()))?
                    .token
                    .clone(),
            ),
        };
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
