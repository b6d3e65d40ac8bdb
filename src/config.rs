//! The configuration: a TOML file (or the demo registry when there is none), then command-line
//! flags. The server's own keys sit at the top level; each part's settings are a section
//! that deserializes straight into the struct its module defines and checks its own ranges
//! (`[store]`, `[listener]`, `[http]`, `[request_id]`, `[produce]`, `[consume]`, `[rocketmq]`,
//! `[consumer_state]`). Keys of the flat layout before the sections still work (see
//! [`MOVED_KEYS`]), each named in a warning. An error names the file, the key and the reason.

use crate::engine::request_id::RequestIdSecrets;
use crate::engine::{
    AccessToken, ConsumeMode, ConsumeSettings, ConsumerSpec, ProduceSettings, ProducerSpec, SettingError, TopicSpec,
    limits,
};
use crate::http::HttpSettings;
use crate::listener::ListenerSettings;
use crate::store::consumer_state::ConsumerStateSettings;
use crate::store::embedded::EmbeddedSettings;
use crate::store::rocketmq::RocketMqSettings;
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// A configuration error: which file, which key, why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config error in {file}: {key}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    pub name: String,
    pub queues: u32,
    /// A lite-message parent: produces may name lite topics under it.
    #[serde(default)]
    pub lite: bool,
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

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    pub name: String,
    pub topic: String,
    #[serde(default = "clustering")]
    pub mode: ConsumeMode,
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

fn clustering() -> ConsumeMode {
    ConsumeMode::Clustering
}
fn default_consume_timeout_ms() -> u64 {
    limits::DEFAULT_CONSUME_TIMEOUT_MS
}
fn default_max_pull_size() -> u32 {
    limits::DEFAULT_PULL_SIZE
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

/// The whole configuration, with its defaults.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: String,
    /// The admin listener: the admin API and the console for loopback clients without a token
    /// (a reverse proxy of the public port never reaches it). `"off"` turns it off; unset, it
    /// is `127.0.0.1` on the port after `listen`'s (an ephemeral port when that one is 0).
    pub admin_listen: Option<String>,
    /// Token of the admin API (`Authorization: Bearer TOKEN` or `token=TOKEN`); without one
    /// the admin API answers loopback clients of the admin listener only.
    pub admin_token: Option<String>,
    pub data_dir: PathBuf,
    /// Where messages live: `"embedded"` (default) or `"rocketmq"`.
    pub backend: Backend,
    /// The broker name in answers and requestIds.
    pub broker_name: String,
    pub region_id: String,
    /// Milliseconds in-flight requests get to finish after SIGTERM/SIGINT.
    pub shutdown_grace_ms: u64,
    pub store: EmbeddedSettings,
    pub listener: ListenerSettings,
    pub http: HttpSettings,
    pub request_id: RequestIdSecrets,
    pub produce: ProduceSettings,
    pub consume: ConsumeSettings,
    pub rocketmq: RocketMqSettings,
    pub consumer_state: ConsumerStateSettings,
    #[serde(rename = "topic")]
    pub topics: Vec<TopicConfig>,
    #[serde(rename = "producer")]
    pub producers: Vec<ProducerConfig>,
    #[serde(rename = "consumer")]
    pub consumers: Vec<ConsumerConfig>,
    /// Keys this file gave in their old place, `(old, new)`: the server warns about each.
    #[serde(skip)]
    pub moved_keys: Vec<(&'static str, &'static str)>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin_listen: None,
            admin_token: None,
            data_dir: PathBuf::from("./data"),
            backend: Backend::Embedded,
            broker_name: "mqproxy".into(),
            region_id: "DefaultRegion".into(),
            shutdown_grace_ms: 10_000,
            store: EmbeddedSettings::default(),
            listener: ListenerSettings::default(),
            http: HttpSettings::default(),
            request_id: RequestIdSecrets::default(),
            produce: ProduceSettings::default(),
            consume: ConsumeSettings::default(),
            rocketmq: RocketMqSettings::default(),
            consumer_state: ConsumerStateSettings::default(),
            topics: Vec::new(),
            producers: Vec::new(),
            consumers: Vec::new(),
            moved_keys: Vec::new(),
        }
    }
}

/// Keys of the flat layout (before the sections) and where each lives now, as dotted paths.
/// A file may still give the old one: it is read as the new one, with a warning at start-up;
/// giving both is an error naming them.
pub const MOVED_KEYS: &[(&str, &str)] = &[
    ("flush", "store.flush"),
    ("flush_timeout_ms", "store.flush_timeout_ms"),
    ("async_flush_interval_ms", "store.async_flush_interval_ms"),
    ("store_cache_mib", "store.cache_mib"),
    ("min_free_disk_mib", "store.min_free_disk_mib"),
    ("max_pending_write_mib", "store.max_pending_write_mib"),
    ("group_commit_max", "store.group_commit_max"),
    ("retention_ms", "store.retention_ms"),
    ("retention_check_interval_ms", "store.retention_check_interval_ms"),
    ("max_connections", "listener.max_connections"),
    ("header_timeout_ms", "listener.header_timeout_ms"),
    ("idle_timeout_ms", "listener.idle_timeout_ms"),
    ("max_h2_streams", "listener.max_h2_streams"),
    ("max_header_bytes", "listener.max_header_bytes"),
    ("tls", "listener.tls"),
    ("http_status", "http.status"),
    ("max_request_bytes", "http.max_request_bytes"),
    ("cors.allowed_origins", "http.cors_allowed_origins"),
    ("request_id_secret", "request_id.secret"),
    ("request_id_previous_secret", "request_id.previous_secret"),
    ("max_delivery_delay_ms", "produce.max_delivery_delay_ms"),
    ("default_rate_limit", "consume.default_rate_limit"),
    ("broadcast_client_idle_ms", "consume.broadcast_client_idle_ms"),
    ("max_broadcast_clients", "consume.max_broadcast_clients"),
    ("metrics_max_client_series", "consume.metrics_max_client_series"),
    ("max_consume_streams", "consume.max_consume_streams"),
];

/// A key path as it reads in a file: `store.flush` is `flush` under `[store]`.
fn spelled(path: &str) -> String {
    match path.rsplit_once('.') {
        Some((section, key)) => format!("`{key}` under [{section}]"),
        None => format!("`{path}` at the top"),
    }
}

/// The table at `path` (its parent sections), created on the way when `create`.
fn table_at<'t, 'i>(root: &'t mut DeTable<'i>, path: &[&str], create: bool) -> Option<&'t mut DeTable<'i>> {
    let Some((first, rest)) = path.split_first() else {
        return Some(root);
    };
    if create && !root.contains_key(*first) {
        root.insert(
            Spanned::new(0..0, Cow::Owned((*first).to_owned())),
            Spanned::new(0..0, DeValue::Table(DeTable::new())),
        );
    }
    match root.get_mut(*first).map(Spanned::get_mut) {
        Some(DeValue::Table(t)) => table_at(t, rest, create),
        _ => None,
    }
}

/// Moves each old key of [`MOVED_KEYS`] the document gives to its new path (keeping its span,
/// so later errors still point at the line written). Returns the moves made.
///
/// # Errors
/// A key is given at both its old and its new path: `(old key, reason)`.
fn move_old_keys(root: &mut DeTable<'_>) -> Result<Vec<(&'static str, &'static str)>, (String, String)> {
    let mut moved = Vec::new();
    for &(old, new) in MOVED_KEYS {
        let old_path: Vec<&str> = old.split('.').collect();
        let Some((old_key, old_parents)) = old_path.split_last() else {
            continue;
        };
        let Some(parent) = table_at(root, old_parents, false) else {
            continue;
        };
        let Some((key, value)) = parent.remove_entry(*old_key) else {
            continue;
        };
        // An old section left empty (`[cors]`) goes too: today's layout has no such section.
        if parent.is_empty()
            && let Some((last, grand)) = old_parents.split_last()
            && let Some(g) = table_at(root, grand, false)
        {
            g.remove(*last);
        }
        let new_path: Vec<&str> = new.split('.').collect();
        let Some((new_key, new_parents)) = new_path.split_last() else {
            continue;
        };
        let Some(section) = table_at(root, new_parents, true) else {
            return Err((new_parents.join("."), "must be a table (a [section])".into()));
        };
        if section.contains_key(*new_key) {
            return Err((
                old.to_owned(),
                format!(
                    "given twice: as {} (the old name) and as {}; keep the second",
                    spelled(old),
                    spelled(new)
                ),
            ));
        }
        section.insert(Spanned::new(key.span(), Cow::Owned((*new_key).to_owned())), value);
        moved.push((old, new));
    }
    Ok(moved)
}

/// The demo topic, producer and consumers the seed's examples use.
pub const DEMO_TOPIC: &str = "mqcloud-http-test-topic";

impl Config {
    /// The configuration without a file: the demo registry of the seed's examples.
    pub fn demo() -> Self {
        let consumer = |name: &str, mode| ConsumerConfig {
            name: name.into(),
            topic: DEMO_TOPIC.into(),
            mode,
            consume_timeout_ms: default_consume_timeout_ms(),
            max_pull_size: default_max_pull_size(),
            token: None,
            token_sha256: None,
        };
        Self {
            // A lite-message parent too, so the README's lite-topic example works at once.
            topics: vec![TopicConfig {
                name: DEMO_TOPIC.into(),
                queues: 4,
                lite: true,
            }],
            producers: vec![ProducerConfig {
                name: format!("{DEMO_TOPIC}-producer"),
                topic: DEMO_TOPIC.into(),
                token: None,
                token_sha256: None,
            }],
            consumers: vec![
                consumer("http-clustering-consumer", ConsumeMode::Clustering),
                consumer("http-broadcast-consumer", ConsumeMode::Broadcast),
            ],
            ..Self::default()
        }
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
    /// TOML syntax, unknown key, wrong type, a key given at its old and new place, or a value
    /// out of range.
    pub fn from_toml(text: &str, file: &str) -> Result<Self, ConfigError> {
        let toml_error = |e: toml::de::Error| ConfigError {
            file: file.to_owned(),
            key: key_of(&e, text),
            reason: match unquoted_string_hint(&e, text) {
                Some(hint) => format!("{} ({hint})", e.message()),
                None => e.message().to_owned(),
            },
        };
        let mut document = DeTable::parse(text).map_err(toml_error)?;
        let moved = move_old_keys(document.get_mut()).map_err(|(key, reason)| ConfigError {
            file: file.to_owned(),
            key,
            reason,
        })?;
        let mut config = Config::deserialize(toml::de::Deserializer::from(document)).map_err(toml_error)?;
        config.moved_keys = moved;
        config.validate(file)?;
        Ok(config)
    }

    /// One sentence per key this file gave at its old place (logged as warnings at start).
    pub fn moved_key_notes(&self) -> Vec<String> {
        self.moved_keys
            .iter()
            .map(|(old, new)| {
                format!(
                    "config key {} has moved to {}; the old name still works, but write the new one",
                    spelled(old),
                    spelled(new)
                )
            })
            .collect()
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
        // A refused setting is named as the file wrote it (an old key: also its new name).
        let refused = |e: SettingError| {
            let key = match self.moved_keys.iter().find(|(_, new)| *new == e.key) {
                Some((old, new)) => format!("{old} (now {new})"),
                None => e.key,
            };
            err(key, e.reason)
        };
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
        if let Err(e) = limits::Bounds::new(0, 600_000).setting("shutdown_grace_ms", self.shutdown_grace_ms) {
            return refused(e);
        }
        let sections = [
            ("store", self.store.check()),
            ("listener", self.listener.check()),
            ("http", self.http.check()),
            ("request_id", self.request_id.check()),
            ("produce", self.produce.check()),
            ("consume", self.consume.check()),
            ("consumer_state", self.consumer_state.check()),
            (
                "rocketmq",
                if self.backend == Backend::Rocketmq {
                    self.rocketmq.check()
                } else {
                    Ok(())
                },
            ),
        ];
        for (section, checked) in sections {
            if let Err(e) = checked {
                return refused(e.in_section(section));
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
                lite: t.lite,
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
                mode: c.mode,
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
    fn sections_deserialize_into_their_owners_settings() {
        let c = Config::from_toml(
            "[store]\nflush = \"async\"\ncache_mib = 8\n[listener]\nmax_connections = 7\n\
             [http]\nstatus = \"mirror\"\ncors_allowed_origins = []\n[request_id]\nsecret = \"0123456789abcdef\"\n\
             [produce]\nmax_delivery_delay_ms = 5000\n[consume]\nmax_consume_streams = 3\n",
            "f.toml",
        )
        .expect("valid");
        assert_eq!(c.store.flush, crate::store::embedded::FlushPolicy::Async);
        assert_eq!(c.store.cache_mib, 8);
        assert_eq!(c.store.retention_ms, EmbeddedSettings::default().retention_ms);
        assert_eq!(c.listener.max_connections, 7);
        assert_eq!(c.http.status, crate::http::HttpStatusPolicy::Mirror);
        assert!(c.http.cors_allowed_origins.is_empty());
        assert_eq!(c.request_id.secret.as_deref(), Some("0123456789abcdef"));
        assert_eq!(c.produce.max_delivery_delay_ms, 5000);
        assert_eq!(c.consume.max_consume_streams, 3);
        assert!(c.moved_keys.is_empty());
        let e = Config::from_toml("[store]\ncache_mib = 0\n", "f.toml").expect_err("range");
        assert_eq!(e.key, "store.cache_mib");
        assert!(e.reason.contains("between 1 and"), "{e}");
        let e = Config::from_toml("[listener]\nmax_conections = 1\n", "f.toml").expect_err("typo");
        assert!(e.reason.contains("max_conections"), "{e}");
        assert!(e.key.starts_with("line 2"), "{e}");
    }

    #[test]
    fn old_flat_keys_still_work_and_are_named() {
        let old = "flush = \"async\"\nstore_cache_mib = 8\nmax_connections = 7\nhttp_status = \"mirror\"\n\
                   request_id_secret = \"0123456789abcdef\"\ndefault_rate_limit = 5\n\
                   [cors]\nallowed_origins = []\n[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let c = Config::from_toml(old, "f.toml").expect("old layout");
        assert_eq!(c.store.flush, crate::store::embedded::FlushPolicy::Async);
        assert_eq!(c.store.cache_mib, 8);
        assert_eq!(c.listener.max_connections, 7);
        assert_eq!(c.http.status, crate::http::HttpStatusPolicy::Mirror);
        assert!(c.http.cors_allowed_origins.is_empty());
        assert_eq!(c.request_id.secret.as_deref(), Some("0123456789abcdef"));
        assert_eq!(c.consume.default_rate_limit, 5);
        assert_eq!(
            c.listener.tls.as_ref().map(|t| t.cert.clone()),
            Some(PathBuf::from("c.pem"))
        );
        assert_eq!(c.moved_keys.len(), 8);
        let notes = c.moved_key_notes();
        assert!(
            notes.contains(&"config key `store_cache_mib` at the top has moved to `cache_mib` under [store]; the old name still works, but write the new one".to_owned()),
            "{notes:?}"
        );
        // Every old key maps to a key the sections have: none is silently dropped.
        for (old, new) in MOVED_KEYS {
            let value = match *old {
                "flush" => "\"sync\"".to_owned(),
                "http_status" => "\"body\"".to_owned(),
                "cors.allowed_origins" => "[\"*\"]".to_owned(),
                "tls" => "{ cert = \"c\", key = \"k\" }".to_owned(),
                "max_request_bytes" => "8388608".to_owned(),
                k if k.contains("secret") => "\"0123456789abcdef0\"".to_owned(),
                _ => "10000".to_owned(),
            };
            let text = match old.split_once('.') {
                Some((section, key)) => {
                    format!("request_id.secret = \"0123456789abcdef\"\n[{section}]\n{key} = {value}\n")
                }
                None => format!("request_id.secret = \"0123456789abcdef\"\n{old} = {value}\n"),
            };
            let text = if *old == "request_id_secret" {
                format!("{old} = {value}\n")
            } else {
                text
            };
            let c = Config::from_toml(&text, "f.toml").unwrap_or_else(|e| panic!("{old} -> {new}: {e}"));
            assert_eq!(c.moved_keys, vec![(*old, *new)], "{text}");
        }
        // An old key's value out of range is named as written, with its new name.
        let e = Config::from_toml("retention_ms = 5\n", "f.toml").expect_err("range");
        assert_eq!(e.key, "retention_ms (now store.retention_ms)");
        // Both places: refused, naming both.
        let e = Config::from_toml("flush = \"sync\"\n[store]\nflush = \"async\"\n", "f.toml").expect_err("twice");
        assert_eq!(e.key, "flush");
        assert!(e.reason.contains("`flush` under [store]"), "{e}");
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
