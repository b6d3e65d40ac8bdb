//! The RocketMQ cluster backend: a [`MessageStore`] over `rocketmq-client-rust`, the only
//! module that imports the RocketMQ crates (`client.rs`, compiled with the `rocketmq` feature;
//! its settings, the `[rocketmq]` section, parse without it).
//!
//! - Sends go to the queue the engine picked (route order: broker name, then queue id, as the
//!   Java client lists them, so `orderId` lands where the Java proxy would put it), with the
//!   engine's msgId as the message's `UNIQ_KEY` (what Java consumers see as its msgId).
//! - Reads are plain pulls at an explicit offset with a group of our own that never commits an
//!   offset to the broker: consumer offsets live in the proxy's consumer state store, as in
//!   the Java proxy (its `EmptyOffsetStore`), so the broker's offsets of a group stay untouched.
//! - Every broker call goes through the producer's client instance (one route table, one
//!   connection and one circuit breaker per broker). No consumer of the client library is
//!   started: rocketmq-client-rust 1.0.0's `DefaultMQPullConsumer` subscribes the topic of its
//!   first pull and then pulls every queue of it in the background, ignoring its own manual
//!   mode: memory and broker load for nothing, and a dead broker's address hammered until the
//!   transport's circuit breaker refuses it for 30 s (so its queues were read again only up to
//!   30 s after it came back).
//! - The brokers push no "new message" signal, so each queue's min/max offsets are cached:
//!   updated by our own sends and pulls and re-read every `offset_refresh`; a change of a max
//!   wakes streaming consumers (messages from other clients, due delayed messages).
//! - The route of every registered topic is read once at start-up (missing topics are named,
//!   or created with `auto_create_topics`). The queue list is the engine's queue index space,
//!   so a route change needs a restart.

#[cfg(feature = "rocketmq")]
mod client;
#[cfg(feature = "rocketmq")]
pub use client::{RocketMqStartError, RocketMqStore};

use crate::settings::{Bounds, SettingError};
use std::time::Duration;

/// The `[rocketmq]` section: the cluster behind `backend = "rocketmq"`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RocketMqSettings {
    /// Name server address(es), `host:port[;host:port]`.
    pub namesrv_addr: String,
    /// A send that takes longer answers 300 (outcome unknown).
    pub send_timeout_ms: u64,
    /// A pull or offset query that takes longer fails (500).
    pub pull_timeout_ms: u64,
    /// How often every topic's queue offsets are re-read from the brokers (messages produced
    /// by other clients, due delayed messages): the longest a new message waits unseen.
    pub offset_refresh_ms: u64,
    /// Create registered topics missing on the cluster (with the configured queue count);
    /// otherwise start-up fails naming them.
    pub auto_create_topics: bool,
    /// Where topics mqproxy creates go (`auto_create_topics`, the admin API): a cluster name
    /// (each of its master brokers gets the topic's `queues`) or one broker's name. Every broker
    /// registers a topic of each name (RocketMQ's `clusterTopicEnable`, `brokerTopicEnable`),
    /// and the brokers on that topic's route are the ones a topic is created on.
    pub cluster: String,
    /// Prefix of every topic name on the cluster (many environments on one cluster).
    pub topic_prefix: String,
    /// Group name of the proxy's own producer and pull consumer (never used for offsets).
    pub client_group: String,
    /// ACL credentials, when the cluster requires them (both or neither).
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
}

impl Default for RocketMqSettings {
    fn default() -> Self {
        Self {
            namesrv_addr: "127.0.0.1:9876".into(),
            send_timeout_ms: 3_000,
            pull_timeout_ms: 10_000,
            offset_refresh_ms: 500,
            auto_create_topics: false,
            cluster: "DefaultCluster".into(),
            topic_prefix: String::new(),
            client_group: "mqproxy".into(),
            access_key: None,
            secret_key: None,
        }
    }
}

impl RocketMqSettings {
    /// Checks the address, the ranges and the credentials' pairing.
    ///
    /// # Errors
    /// The first value refused, named by its key in the section.
    pub fn check(&self) -> Result<(), SettingError> {
        if self.namesrv_addr.trim().is_empty() {
            return Err(SettingError::new(
                "namesrv_addr",
                "must name the name server, like 127.0.0.1:9876",
            ));
        }
        let timeouts = Bounds::new(10, 600_000);
        timeouts.setting("send_timeout_ms", self.send_timeout_ms)?;
        timeouts.setting("pull_timeout_ms", self.pull_timeout_ms)?;
        timeouts.setting("offset_refresh_ms", self.offset_refresh_ms)?;
        if self.access_key.is_some() != self.secret_key.is_some() {
            return Err(SettingError::new("access_key", "access_key and secret_key go together"));
        }
        Ok(())
    }

    pub fn pull_timeout(&self) -> Duration {
        Duration::from_millis(self.pull_timeout_ms)
    }

    pub fn offset_refresh(&self) -> Duration {
        Duration::from_millis(self.offset_refresh_ms)
    }

    /// (access key, secret key) when both are set.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.access_key.as_deref().zip(self.secret_key.as_deref())
    }
}
