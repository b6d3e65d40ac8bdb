//! The configuration: a TOML file (or the demo registry when there is none), then command-line
//! flags. Every value is checked here; an error names the file, the key and the reason.

use crate::engine::{AccessToken, ConsumeMode, ConsumerSpec, ProducerSpec, TopicSpec, limits};
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// A configuration error: which file, which key, why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config error in {file}: {key}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
}

/// The answer policy of the HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpStatusPolicy {
    /// Always 200, the outcome in the body's `status` (the Java proxy's behaviour).
    Body,
    /// The HTTP status follows the body's `status` (400, 500).
    Mirror,
}

/// When a produce is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flush {
    Sync,
    Async,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    pub name: String,
    pub queues: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProducerConfig {
    pub name: String,
    pub topic: String,
    /// Requests must present this token (`Authorization: Bearer` or the `token` parameter).
    #[serde(default)]
    pub token: Option<String>,
    /// The same, given as the hex SHA-256 of the token (keeps the secret out of the file).
    #[serde(default)]
    pub token_sha256: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Clustering,
    Broadcast,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    pub name: String,
    pub topic: String,
    #[serde(default = "default_mode")]
    pub mode: Mode,
    #[serde(default = "default_consume_timeout_ms")]
    pub consume_timeout_ms: u64,
    #[serde(default = "default_max_pull_size")]
    pub max_pull_size: u32,
    /// Requests must present this token (`Authorization: Bearer` or the `token` parameter).
    #[serde(default)]
    pub token: Option<String>,
    /// The same, given as the hex SHA-256 of the token.
    #[serde(default)]
    pub token_sha256: Option<String>,
}

/// The access token of a registry entry from its two config keys (checked by `validate`).
fn access_token(token: Option<&String>, token_sha256: Option<&String>) -> Option<AccessToken> {
    token
        .map(|t| AccessToken::from_secret(t))
        .or_else(|| token_sha256.and_then(|h| AccessToken::from_sha256_hex(h)))
}

/// Checks the two token keys of `entry` (e.g. `producer[0]`).
fn check_token(entry: &str, token: Option<&String>, token_sha256: Option<&String>) -> Result<(), (String, String)> {
    match (token, token_sha256) {
        (Some(_), Some(_)) => Err((
            format!("{entry}.token_sha256"),
            "give token or token_sha256, not both".into(),
        )),
        (Some(t), None) if t.is_empty() => Err((format!("{entry}.token"), "must not be empty".into())),
        (None, Some(h)) if AccessToken::from_sha256_hex(h).is_none() => Err((
            format!("{entry}.token_sha256"),
            "must be 64 hex digits (the SHA-256 of the token)".into(),
        )),
        _ => Ok(()),
    }
}

/// Where messages live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The embedded store in `data_dir` (nothing else to run).
    Embedded,
    /// A RocketMQ cluster (`[rocketmq] namesrv_addr`).
    Rocketmq,
}

/// The RocketMQ cluster behind `backend = "rocketmq"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RocketmqConfig {
    /// Name server address(es), `host:port[;host:port]`.
    #[serde(default = "default_namesrv_addr")]
    pub namesrv_addr: String,
    /// A send that takes longer answers 300 (outcome unknown).
    #[serde(default = "default_send_timeout_ms")]
    pub send_timeout_ms: u64,
    /// A pull or offset query that takes longer fails (500).
    #[serde(default = "default_pull_timeout_ms")]
    pub pull_timeout_ms: u64,
    /// How often every topic's queue offsets are re-read from the brokers (messages produced
    /// by other clients, due delayed messages): the longest a new message waits unseen.
    #[serde(default = "default_offset_refresh_ms")]
    pub offset_refresh_ms: u64,
    /// Create registered topics missing on the cluster (with the configured queue count);
    /// otherwise start-up fails naming them.
    #[serde(default)]
    pub auto_create_topics: bool,
    /// Where topics mqproxy creates go (`auto_create_topics`, the admin API): a cluster name
    /// (each of its master brokers gets the topic's `queues`) or one broker's name.
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// Prefix of every topic name on the cluster (many environments on one cluster).
    #[serde(default)]
    pub topic_prefix: String,
    /// Group name of the proxy's own producer and pull consumer (never used for offsets).
    #[serde(default = "default_client_group")]
    pub client_group: String,
    /// ACL credentials, when the cluster requires them.
    #[serde(default)]
    pub access_key: Option<String>,
    #[serde(default)]
    pub secret_key: Option<String>,
}

impl Default for RocketmqConfig {
    fn default() -> Self {
        Self {
            namesrv_addr: default_namesrv_addr(),
            send_timeout_ms: default_send_timeout_ms(),
            pull_timeout_ms: default_pull_timeout_ms(),
            offset_refresh_ms: default_offset_refresh_ms(),
            auto_create_topics: false,
            cluster: default_cluster(),
            topic_prefix: String::new(),
            client_group: default_client_group(),
            access_key: None,
            secret_key: None,
        }
    }
}

fn default_backend() -> Backend {
    Backend::Embedded
}
fn default_namesrv_addr() -> String {
    "127.0.0.1:9876".into()
}
fn default_send_timeout_ms() -> u64 {
    3_000
}
fn default_pull_timeout_ms() -> u64 {
    10_000
}
fn default_offset_refresh_ms() -> u64 {
    500
}
fn default_cluster() -> String {
    "DefaultCluster".into()
}
fn default_client_group() -> String {
    "mqproxy".into()
}

/// Where consumer offsets, locks and retry entries live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsumerStateKind {
    /// In the embedded store (one proxy).
    Embedded,
    /// In Redis, shared by several proxies.
    Redis,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerStateConfig {
    #[serde(default = "default_state_kind")]
    pub kind: ConsumerStateKind,
    /// `redis://host:port[/db]` when `kind = "redis"`.
    #[serde(default)]
    pub url: Option<String>,
    /// Prefix of every Redis key (keeps mqproxy's keys apart from other users of the server).
    #[serde(default = "default_state_prefix")]
    pub prefix: String,
    /// How long one Redis call may take before it fails (the request then answers 500).
    #[serde(default = "default_state_timeout_ms")]
    pub timeout_ms: u64,
}

impl Default for ConsumerStateConfig {
    fn default() -> Self {
        Self {
            kind: default_state_kind(),
            url: None,
            prefix: default_state_prefix(),
            timeout_ms: default_state_timeout_ms(),
        }
    }
}

fn default_state_kind() -> ConsumerStateKind {
    ConsumerStateKind::Embedded
}
fn default_state_prefix() -> String {
    "mqproxy:".into()
}
/// The redis crate's own default (500 ms) failed calls on a loaded 2-core machine.
fn default_state_timeout_ms() -> u64 {
    3_000
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// `["*"]` (the default) allows any origin; `[]` turns CORS off.
    #[serde(default = "default_cors_origins")]
    pub allowed_origins: Vec<String>,
}

impl Default for CorsConfig {
    fn default() -> Self {
        Self {
            allowed_origins: default_cors_origins(),
        }
    }
}

/// TLS on the listener (both files PEM).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The whole configuration, with its defaults.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Where messages live: `"embedded"` (default) or `"rocketmq"`.
    #[serde(default = "default_backend")]
    pub backend: Backend,
    #[serde(default)]
    pub rocketmq: RocketmqConfig,
    /// The broker name in answers and requestIds.
    #[serde(default = "default_broker_name")]
    pub broker_name: String,
    #[serde(default = "default_region_id")]
    pub region_id: String,
    #[serde(default = "default_http_status")]
    pub http_status: HttpStatusPolicy,
    #[serde(default = "default_flush")]
    pub flush: Flush,
    /// A flush slower than this answers FLUSH_DISK_TIMEOUT (the message is kept).
    #[serde(default = "default_flush_timeout_ms")]
    pub flush_timeout_ms: u64,
    /// With `flush = "async"`: how often the data is made durable.
    #[serde(default = "default_async_flush_interval_ms")]
    pub async_flush_interval_ms: u64,
    /// Memory the embedded store may use to cache its pages (MiB); the OS page cache holds
    /// the rest of the hot data.
    #[serde(default = "default_store_cache_mib")]
    pub store_cache_mib: u64,
    /// Free disk space (MiB) below which produce is refused (507) and, below a quarter of it,
    /// every write; 0 turns the check off.
    #[serde(default = "default_min_free_disk_mib")]
    pub min_free_disk_mib: u64,
    /// Messages (MiB) that may wait for the store's writer; past it produce answers 503 with
    /// Retry-After instead of queueing without end.
    #[serde(default = "default_max_pending_write_mib")]
    pub max_pending_write_mib: u64,
    /// Most writes one commit takes (1 turns group commit off).
    #[serde(default = "default_group_commit_max")]
    pub group_commit_max: usize,
    /// Messages older than this are deleted.
    #[serde(default = "default_retention_ms")]
    pub retention_ms: u64,
    /// How often expired messages are looked for.
    #[serde(default = "default_retention_check_interval_ms")]
    pub retention_check_interval_ms: u64,
    /// How far ahead a `deliveryTimestamp` may be (default 3 days).
    #[serde(default = "default_max_delivery_delay_ms")]
    pub max_delivery_delay_ms: u64,
    /// Largest request body (above 4 MiB so an oversize message gets the documented answer).
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// Pulls per second per consumer until an operator sets another rate.
    #[serde(default = "default_rate_limit")]
    pub default_rate_limit: u64,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    #[serde(default)]
    pub cors: CorsConfig,
    /// Serve HTTPS (and gRPC over TLS) instead of plain text.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Connections open at once; more are closed on arrival.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time a client has for the TLS handshake and for each HTTP/1.1 request head, and a REST
    /// request for its body (slow clients cannot hold connections).
    #[serde(default = "default_header_timeout_ms")]
    pub header_timeout_ms: u64,
    /// A connection with no traffic either way for this long is closed (idle gRPC streams
    /// are pinged four times per period, so they live on).
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Token of the admin API (`Authorization: Bearer TOKEN` or `token=TOKEN`); without one
    /// the admin API answers loopback clients only.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// The admin listener: the admin API and the console for loopback clients without a token
    /// (a reverse proxy of the public port never reaches it). `"off"` turns it off; unset, it
    /// is `127.0.0.1` on the port after `listen`'s (an ephemeral port when that one is 0).
    #[serde(default)]
    pub admin_listen: Option<String>,
    /// A broadcast clientId with no pull for this long is forgotten (offsets, locks, retry
    /// entries); coming back, it starts where a new client starts.
    #[serde(default = "default_broadcast_client_idle_ms")]
    pub broadcast_client_idle_ms: u64,
    /// ClientIds one broadcast consumer may have; a new one past it is refused (429) until a
    /// client has been idle for `broadcast_client_idle_ms`.
    #[serde(default = "default_max_broadcast_clients")]
    pub max_broadcast_clients: u32,
    /// Broadcast clientIds per consumer with their own lag series in `/metrics` (the most
    /// lagging); every broadcast consumer also has sum / max / client-count series.
    #[serde(default = "default_metrics_max_client_series")]
    pub metrics_max_client_series: u32,
    /// Concurrent HTTP/2 streams (gRPC calls) per connection.
    #[serde(default = "default_max_h2_streams")]
    pub max_h2_streams: u32,
    /// Largest request head: an HTTP/1.1 head, or an HTTP/2 header list (431 past it).
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: u32,
    /// gRPC Consume streams open at once on this proxy (ResourceExhausted past it).
    #[serde(default = "default_max_consume_streams")]
    pub max_consume_streams: u32,
    /// Secret of the requestId MAC (any text, 16+ characters); without it the key is made at
    /// first start and kept in the data directory (or shared through Redis).
    #[serde(default)]
    pub request_id_secret: Option<String>,
    /// The secret before a rotation: requestIds it signed are still accepted. Defaults, when
    /// `request_id_secret` is set, to the key kept in the data directory (or Redis), so the
    /// first configured secret is a rotation too.
    #[serde(default)]
    pub request_id_previous_secret: Option<String>,
    #[serde(default)]
    pub consumer_state: ConsumerStateConfig,
    #[serde(default, rename = "topic")]
    pub topics: Vec<TopicConfig>,
    #[serde(default, rename = "producer")]
    pub producers: Vec<ProducerConfig>,
    #[serde(default, rename = "consumer")]
    pub consumers: Vec<ConsumerConfig>,
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}
fn default_broker_name() -> String {
    "mqproxy".into()
}
fn default_region_id() -> String {
    "DefaultRegion".into()
}
fn default_http_status() -> HttpStatusPolicy {
    HttpStatusPolicy::Body
}
fn default_flush() -> Flush {
    Flush::Sync
}
fn default_flush_timeout_ms() -> u64 {
    5_000
}
fn default_async_flush_interval_ms() -> u64 {
    // Each durable checkpoint stalls the writer in proportion to what piled up: 1 s gave a
    // p99.9 of ~80-100 ms at 64 producers, 200 ms ~40 ms (BENCHMARKS.md).
    200
}
fn default_store_cache_mib() -> u64 {
    64
}
fn default_min_free_disk_mib() -> u64 {
    256
}
fn default_max_pending_write_mib() -> u64 {
    256
}
fn default_group_commit_max() -> usize {
    4_096
}
fn default_retention_ms() -> u64 {
    72 * 3_600_000
}
fn default_retention_check_interval_ms() -> u64 {
    60_000
}
fn default_max_delivery_delay_ms() -> u64 {
    3 * 24 * 3_600_000
}
fn default_max_request_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_max_connections() -> usize {
    10_000
}
fn default_header_timeout_ms() -> u64 {
    10_000
}
fn default_idle_timeout_ms() -> u64 {
    120_000
}
fn default_broadcast_client_idle_ms() -> u64 {
    // A day: a client gone that long is gone (an app instance replaced, a browser closed); a
    // client that pulls even once a day keeps its offsets.
    86_400_000
}
fn default_max_broadcast_clients() -> u32 {
    10_000
}
fn default_metrics_max_client_series() -> u32 {
    100
}
fn default_max_h2_streams() -> u32 {
    // hyper's own default, made explicit.
    200
}
fn default_max_header_bytes() -> u32 {
    64 * 1024
}
fn default_max_consume_streams() -> u32 {
    10_000
}
fn default_rate_limit() -> u64 {
    1_024
}
fn default_shutdown_grace_ms() -> u64 {
    10_000
}
fn default_cors_origins() -> Vec<String> {
    vec!["*".into()]
}
fn default_mode() -> Mode {
    Mode::Clustering
}
fn default_consume_timeout_ms() -> u64 {
    limits::DEFAULT_CONSUME_TIMEOUT_MS
}
fn default_max_pull_size() -> u32 {
    limits::DEFAULT_PULL_SIZE
}

/// The demo topic, producer and consumers the seed's examples use.
pub const DEMO_TOPIC: &str = "mqcloud-http-test-topic";

impl Config {
    /// The configuration without a file: the demo registry of the seed's examples.
    pub fn demo() -> Self {
        let mut config: Config = toml::from_str("").unwrap_or_else(|e| unreachable!("empty config parses: {e}"));
        config.topics = vec![TopicConfig {
            name: DEMO_TOPIC.into(),
            queues: 4,
        }];
        config.producers = vec![ProducerConfig {
            name: format!("{DEMO_TOPIC}-producer"),
            topic: DEMO_TOPIC.into(),
            token: None,
            token_sha256: None,
        }];
        let consumer = |name: &str, mode| ConsumerConfig {
            name: name.into(),
            topic: DEMO_TOPIC.into(),
            mode,
            consume_timeout_ms: default_consume_timeout_ms(),
            max_pull_size: default_max_pull_size(),
            token: None,
            token_sha256: None,
        };
        config.consumers = vec![
            consumer("http-clustering-consumer", Mode::Clustering),
            consumer("http-broadcast-consumer", Mode::Broadcast),
        ];
        config
    }

    /// Reads and checks a config file.
    ///
    /// # Errors
    /// Unreadable file, TOML syntax, unknown key, wrong type, or a value out of range.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "(file)".into(),
            reason: e.to_string(),
        })?;
        Self::from_toml(&text, &file)
    }

    /// Parses and checks TOML text; `file` names it in errors.
    ///
    /// # Errors
    /// TOML syntax, unknown key, wrong type, or a value out of range.
    pub fn from_toml(text: &str, file: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            file: file.to_owned(),
            key: key_of(&e, text),
            reason: match unquoted_string_hint(&e, text) {
                Some(hint) => format!("{} ({hint})", e.message()),
                None => e.message().to_owned(),
            },
        })?;
        config.validate(file)?;
        Ok(config)
    }

    /// Checks ranges and cross references.
    ///
    /// # Errors
    /// The first value out of range or reference to nothing.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let err = |key: String, reason: String| {
            Err(ConfigError {
                file: file.to_owned(),
                key,
                reason,
            })
        };
        for (key, secret) in [
            ("request_id_secret", &self.request_id_secret),
            ("request_id_previous_secret", &self.request_id_previous_secret),
        ] {
            if secret.as_ref().is_some_and(|s| s.chars().count() < 16) {
                return err(key.into(), "must be at least 16 characters".into());
            }
        }
        if self.request_id_previous_secret.is_some() && self.request_id_secret.is_none() {
            return err(
                "request_id_previous_secret".into(),
                "needs request_id_secret (the secret now in use)".into(),
            );
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return err(
                "listen".into(),
                format!("{:?} is not an address like 127.0.0.1:8080", self.listen),
            );
        }
        if let Err(reason) = self.admin_listen_addr() {
            return err("admin_listen".into(), reason);
        }
        if self.broker_name.is_empty() || self.broker_name.contains(',') {
            return err("broker_name".into(), "must be non-empty and contain no comma".into());
        }
        for (key, value, min, max) in [
            ("flush_timeout_ms", self.flush_timeout_ms, 1, 600_000),
            ("async_flush_interval_ms", self.async_flush_interval_ms, 1, 600_000),
            ("group_commit_max", self.group_commit_max as u64, 1, 1_000_000),
            ("store_cache_mib", self.store_cache_mib, 1, 1 << 20),
            ("min_free_disk_mib", self.min_free_disk_mib, 0, 1 << 30),
            ("max_pending_write_mib", self.max_pending_write_mib, 1, 1 << 20),
            ("retention_ms", self.retention_ms, 1_000, 10 * 365 * 86_400_000),
            (
                "retention_check_interval_ms",
                self.retention_check_interval_ms,
                100,
                86_400_000,
            ),
            (
                "max_delivery_delay_ms",
                self.max_delivery_delay_ms,
                1_000,
                365 * 86_400_000,
            ),
            (
                "max_request_bytes",
                self.max_request_bytes as u64,
                8 * 1024 * 1024,
                1 << 31,
            ),
            (
                "default_rate_limit",
                self.default_rate_limit,
                limits::RATE_LIMIT.min,
                limits::RATE_LIMIT.max,
            ),
            ("shutdown_grace_ms", self.shutdown_grace_ms, 0, 600_000),
            ("max_connections", self.max_connections as u64, 1, 1_000_000),
            ("header_timeout_ms", self.header_timeout_ms, 100, 600_000),
            ("idle_timeout_ms", self.idle_timeout_ms, 1_000, 86_400_000),
            (
                "broadcast_client_idle_ms",
                self.broadcast_client_idle_ms,
                1_000,
                365 * 86_400_000,
            ),
            (
                "max_broadcast_clients",
                u64::from(self.max_broadcast_clients),
                1,
                10_000_000,
            ),
            (
                "metrics_max_client_series",
                u64::from(self.metrics_max_client_series),
                0,
                100_000,
            ),
            ("max_h2_streams", u64::from(self.max_h2_streams), 1, 100_000),
            ("consumer_state.timeout_ms", self.consumer_state.timeout_ms, 100, 60_000),
            ("max_header_bytes", u64::from(self.max_header_bytes), 8_192, 16 << 20),
            (
                "max_consume_streams",
                u64::from(self.max_consume_streams),
                1,
                10_000_000,
            ),
        ] {
            if value < min || value > max {
                return err(key.into(), format!("must be between {min} and {max}, got {value}"));
            }
        }
        if self.consumer_state.kind == ConsumerStateKind::Redis
            && !self
                .consumer_state
                .url
                .as_deref()
                .is_some_and(|u| u.starts_with("redis://") || u.starts_with("rediss://"))
        {
            return err(
                "consumer_state.url".into(),
                "kind = \"redis\" needs url = \"redis://host:port\"".into(),
            );
        }
        if self.backend == Backend::Rocketmq {
            let r = &self.rocketmq;
            if r.namesrv_addr.trim().is_empty() {
                return err(
                    "rocketmq.namesrv_addr".into(),
                    "must name the name server, like 127.0.0.1:9876".into(),
                );
            }
            for (key, value, min, max) in [
                ("rocketmq.send_timeout_ms", r.send_timeout_ms, 10, 600_000),
                ("rocketmq.pull_timeout_ms", r.pull_timeout_ms, 10, 600_000),
                ("rocketmq.offset_refresh_ms", r.offset_refresh_ms, 10, 600_000),
            ] {
                if value < min || value > max {
                    return err(key.into(), format!("must be between {min} and {max}, got {value}"));
                }
            }
            if r.access_key.is_some() != r.secret_key.is_some() {
                return err(
                    "rocketmq.access_key".into(),
                    "access_key and secret_key go together".into(),
                );
            }
        }
        let mut topics = HashSet::new();
        for (i, t) in self.topics.iter().enumerate() {
            if t.name.trim().is_empty() {
                return err(format!("topic[{i}].name"), "must not be empty".into());
            }
            if !topics.insert(t.name.as_str()) {
                return err(
                    format!("topic[{i}].name"),
                    format!("topic {:?} is defined twice", t.name),
                );
            }
            if let Some(reason) = limits::QUEUES.refusal(u64::from(t.queues)) {
                return err(format!("topic[{i}].queues"), reason);
            }
        }
        let mut names = HashSet::new();
        for (i, p) in self.producers.iter().enumerate() {
            if p.name.trim().is_empty() || !names.insert(p.name.as_str()) {
                return err(
                    format!("producer[{i}].name"),
                    format!("{:?} is empty or defined twice", p.name),
                );
            }
            if !topics.contains(p.topic.as_str()) {
                return err(
                    format!("producer[{i}].topic"),
                    format!("no [[topic]] named {:?}", p.topic),
                );
            }
            if let Err((key, reason)) =
                check_token(&format!("producer[{i}]"), p.token.as_ref(), p.token_sha256.as_ref())
            {
                return err(key, reason);
            }
        }
        let mut names = HashSet::new();
        for (i, c) in self.consumers.iter().enumerate() {
            if c.name.trim().is_empty() || !names.insert(c.name.as_str()) {
                return err(
                    format!("consumer[{i}].name"),
                    format!("{:?} is empty or defined twice", c.name),
                );
            }
            if !topics.contains(c.topic.as_str()) {
                return err(
                    format!("consumer[{i}].topic"),
                    format!("no [[topic]] named {:?}", c.topic),
                );
            }
            if let Some(reason) = limits::CONSUME_TIMEOUT_MS.refusal(c.consume_timeout_ms) {
                return err(format!("consumer[{i}].consume_timeout_ms"), reason);
            }
            if let Some(reason) = limits::PULL_SIZE.refusal(u64::from(c.max_pull_size)) {
                return err(format!("consumer[{i}].max_pull_size"), reason);
            }
            if let Err((key, reason)) =
                check_token(&format!("consumer[{i}]"), c.token.as_ref(), c.token_sha256.as_ref())
            {
                return err(key, reason);
            }
        }
        Ok(())
    }

    /// Where the admin listener binds: None when `admin_listen = "off"`.
    ///
    /// # Errors
    /// `admin_listen` is neither `"off"` nor an address, or the default port does not exist.
    pub fn admin_listen_addr(&self) -> Result<Option<std::net::SocketAddr>, String> {
        use std::net::{Ipv4Addr, SocketAddr};
        match self.admin_listen.as_deref().map(str::trim) {
            Some("off") => Ok(None),
            Some(addr) => addr
                .parse()
                .map(Some)
                .map_err(|_| format!("{addr:?} is not an address like 127.0.0.1:8081 (or \"off\")")),
            None => {
                let public: SocketAddr = self
                    .listen
                    .parse()
                    .map_err(|_| "needs a valid listen address to derive its default".to_owned())?;
                let port = match public.port() {
                    0 => 0,
                    p => p
                        .checked_add(1)
                        .ok_or_else(|| format!("listen's port {p} has no next port: set admin_listen (or \"off\")"))?,
                };
                Ok(Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port))))
            }
        }
    }

    pub fn topic_specs(&self) -> Vec<TopicSpec> {
        self.topics
            .iter()
            .map(|t| TopicSpec {
                name: t.name.clone(),
                queues: t.queues,
            })
            .collect()
    }

    pub fn producer_specs(&self) -> Vec<ProducerSpec> {
        self.producers
            .iter()
            .map(|p| ProducerSpec {
                name: p.name.clone(),
                topic: p.topic.clone(),
                token: access_token(p.token.as_ref(), p.token_sha256.as_ref()),
            })
            .collect()
    }

    pub fn consumer_specs(&self) -> Vec<ConsumerSpec> {
        self.consumers
            .iter()
            .map(|c| ConsumerSpec {
                name: c.name.clone(),
                topic: c.topic.clone(),
                mode: match c.mode {
                    Mode::Clustering => ConsumeMode::Clustering,
                    Mode::Broadcast => ConsumeMode::Broadcast,
                },
                consume_timeout_ms: c.consume_timeout_ms,
                max_pull_size: c.max_pull_size,
                token: access_token(c.token.as_ref(), c.token_sha256.as_ref()),
            })
            .collect()
    }
}

/// Where a TOML error points: the line number and that line's text (which names the key).
fn key_of(e: &toml::de::Error, text: &str) -> String {
    match e.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let line_no = text[..start].matches('\n').count() + 1;
            let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
            format!("line {line_no} `{line}`")
        }
        None => "(document)".into(),
    }
}

/// The commonest slip in a TOML config, a string without quotes (`listen = 127.0.0.1:0`),
/// reads as "invalid float": when the line at the error is `key = value` with a bare value
/// that is no number, boolean, array or table, say what to write instead.
fn unquoted_string_hint(e: &toml::de::Error, text: &str) -> Option<String> {
    let start = e.span()?.start.min(text.len());
    let line =
        text[..start].rsplit('\n').next().unwrap_or("").to_owned() + text[start..].split('\n').next().unwrap_or("");
    let (key, value) = line.split_once('=')?;
    let key = key.trim();
    let value = value.split(" #").next().unwrap_or("").trim();
    let bare = !value.is_empty()
        && !value.starts_with(['"', '\'', '[', '{'])
        && !value.contains(char::is_whitespace)
        && !matches!(value, "true" | "false")
        && value.replace('_', "").parse::<f64>().is_err();
    (bare && !key.is_empty() && !key.starts_with('[')).then(|| format!("a string needs quotes: {key} = \"{value}\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unquoted_strings_get_a_hint() {
        let e = Config::from_toml("data_dir = \"d\"\nlisten = 127.0.0.1:0   # here\n", "f.toml").expect_err("syntax");
        assert_eq!(e.key, "line 2 `listen = 127.0.0.1:0   # here`");
        assert!(
            e.reason.contains("a string needs quotes: listen = \"127.0.0.1:0\""),
            "{e}"
        );
        let e = Config::from_toml("[consumer_state]\nkind = redis", "f.toml").expect_err("syntax");
        assert!(e.reason.contains("kind = \"redis\""), "{e}");
        // Not every syntax error is a missing quote.
        let e = Config::from_toml("max_connections = 10 000", "f.toml").expect_err("syntax");
        assert!(!e.reason.contains("needs quotes"), "{e}");
        let e = Config::from_toml("listen = \"127.0.0.1:0", "f.toml").expect_err("syntax");
        assert!(!e.reason.contains("needs quotes"), "{e}");
    }

    #[test]
    fn demo_is_valid() {
        let demo = Config::demo();
        assert_eq!(demo.validate("(demo)"), Ok(()));
        assert_eq!(demo.topics[0].queues, 4);
        assert_eq!(demo.consumers.len(), 2);
    }

    #[test]
    fn admin_listen_defaults_to_the_next_loopback_port() {
        let admin = |toml: &str| Config::from_toml(toml, "f.toml").map(|c| c.admin_listen_addr());
        let addr = |a: &str| Ok(Ok(Some(a.parse().expect("addr"))));
        assert_eq!(admin(""), addr("127.0.0.1:8081"));
        assert_eq!(admin("listen = \"0.0.0.0:9000\""), addr("127.0.0.1:9001"));
        assert_eq!(admin("listen = \"127.0.0.1:0\""), addr("127.0.0.1:0"));
        assert_eq!(admin("admin_listen = \"127.0.0.1:7000\""), addr("127.0.0.1:7000"));
        assert_eq!(admin("admin_listen = \"off\""), Ok(Ok(None)));
        let bad = Config::from_toml("admin_listen = \"nowhere\"", "f.toml").expect_err("bad");
        assert_eq!(bad.key, "admin_listen");
        let last = Config::from_toml("listen = \"127.0.0.1:65535\"", "f.toml").expect_err("no next port");
        assert!(last.reason.contains("admin_listen"), "{last}");
    }

    #[test]
    fn out_of_range_values_are_errors() {
        let base = "[[topic]]\nname = \"t\"\nqueues = QUEUES\n[[consumer]]\nname = \"c\"\ntopic = \"t\"\nmax_pull_size = MPS\nconsume_timeout_ms = CT\n";
        let cfg = |q: &str, m: &str, c: &str| {
            Config::from_toml(&base.replace("QUEUES", q).replace("MPS", m).replace("CT", c), "f.toml")
        };
        assert!(cfg("4", "32", "300000").is_ok());
        assert_eq!(cfg("0", "32", "300000").unwrap_err().key, "topic[0].queues");
        assert_eq!(cfg("4", "500", "300000").unwrap_err().key, "consumer[0].max_pull_size");
        assert_eq!(cfg("4", "32", "5").unwrap_err().key, "consumer[0].consume_timeout_ms");
        let redis = Config::from_toml("[consumer_state]\nkind = \"redis\"\n", "f.toml").unwrap_err();
        assert_eq!(redis.key, "consumer_state.url");
        assert!(
            Config::from_toml(
                "[consumer_state]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n",
                "f.toml"
            )
            .is_ok()
        );
        let tokens = |extra: &str| {
            Config::from_toml(
                &format!("[[topic]]\nname = \"t\"\nqueues = 1\n[[producer]]\nname = \"p\"\ntopic = \"t\"\n{extra}"),
                "f.toml",
            )
        };
        assert!(tokens("token = \"abc\"\n").is_ok());
        assert_eq!(tokens("token = \"\"\n").unwrap_err().key, "producer[0].token");
        assert_eq!(
            tokens("token_sha256 = \"xyz\"\n").unwrap_err().key,
            "producer[0].token_sha256"
        );
        assert_eq!(
            tokens(&format!("token = \"a\"\ntoken_sha256 = \"{}\"\n", "0".repeat(64)))
                .unwrap_err()
                .key,
            "producer[0].token_sha256"
        );
        let hashed = tokens(&format!(
            "token_sha256 = \"{}\"\n",
            AccessToken::from_secret("abc").sha256_hex()
        ))
        .expect("hashed token");
        assert_eq!(hashed.producer_specs()[0].token, Some(AccessToken::from_secret("abc")));
        let unknown = Config::from_toml("listen = \"127.0.0.1:1\"\nqueuez = 3\n", "f.toml").unwrap_err();
        assert!(unknown.reason.contains("queuez"), "{unknown}");
        assert!(
            unknown.to_string().starts_with("config error in f.toml: line 2"),
            "{unknown}"
        );
    }
}
