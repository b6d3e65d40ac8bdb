//! The registry (topics, producers, consumers), changed at run time by the admin API: every
//! change is checked, made known to the message store (a new or grown topic), saved, and only
//! then visible to requests. Changes are serialized; readers take a snapshot.

use super::{
    AccessToken, ConsumeMode, ConsumerSpec, Engine, EngineConfig, EngineError, ProducerSpec, TokenChange, TopicSpec,
    limits,
};
use mqproxy_store::{RegistryEntries, RegistryStore, StoredConsumer, StoredProducer, StoredTopic};
use std::collections::HashMap;
use std::sync::Arc;

/// The registry in memory.
#[derive(Debug, Default)]
pub(super) struct Registry {
    pub topics: HashMap<String, Arc<TopicSpec>>,
    pub producers: HashMap<String, Arc<ProducerSpec>>,
    pub consumers: HashMap<String, Arc<ConsumerSpec>>,
}

/// The registry as the admin API lists it, sorted by name.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryView {
    pub topics: Vec<TopicSpec>,
    pub producers: Vec<ProducerSpec>,
    pub consumers: Vec<ConsumerSpec>,
}

fn sorted<T: Clone>(map: &HashMap<String, Arc<T>>) -> Vec<T> {
    let mut names: Vec<&String> = map.keys().collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|n| map.get(n))
        .map(|v| (**v).clone())
        .collect()
}

impl Registry {
    fn new(topics: &[TopicSpec], producers: &[ProducerSpec], consumers: &[ConsumerSpec]) -> Self {
        Self {
            topics: topics.iter().map(|t| (t.name.clone(), Arc::new(t.clone()))).collect(),
            producers: producers
                .iter()
                .map(|p| (p.name.clone(), Arc::new(p.clone())))
                .collect(),
            consumers: consumers
                .iter()
                .map(|c| (c.name.clone(), Arc::new(c.clone())))
                .collect(),
        }
    }

    fn copy(&self) -> Self {
        Self {
            topics: self.topics.clone(),
            producers: self.producers.clone(),
            consumers: self.consumers.clone(),
        }
    }

    pub(crate) fn view(&self) -> RegistryView {
        RegistryView {
            topics: sorted(&self.topics),
            producers: sorted(&self.producers),
            consumers: sorted(&self.consumers),
        }
    }

    fn entries(&self) -> RegistryEntries {
        let view = self.view();
        RegistryEntries {
            topics: view
                .topics
                .into_iter()
                .map(|t| StoredTopic {
                    name: t.name,
                    queues: t.queues,
                    lite: t.lite,
                })
                .collect(),
            producers: view
                .producers
                .into_iter()
                .map(|p| StoredProducer {
                    name: p.name,
                    topic: p.topic,
                    token_sha256: p.token.as_ref().map(AccessToken::sha256_hex),
                })
                .collect(),
            consumers: view
                .consumers
                .into_iter()
                .map(|c| StoredConsumer {
                    name: c.name,
                    topic: c.topic,
                    broadcast: c.mode == ConsumeMode::Broadcast,
                    consume_timeout_ms: c.consume_timeout_ms,
                    max_pull_size: c.max_pull_size,
                    token_sha256: c.token.as_ref().map(AccessToken::sha256_hex),
                })
                .collect(),
        }
    }
}

/// Names the admin API accepts: what RocketMQ accepts for topics and groups.
fn check_name(what: &str, name: &str) -> Result<(), EngineError> {
    let ok = !name.is_empty()
        && name.len() <= limits::MAX_NAME_CHARS
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '%' | '|'));
    if ok {
        Ok(())
    } else {
        Err(EngineError::invalid(format!(
            "{what} {name:?} must be 1..{} characters of letters, digits, '-', '_', '%', '|'",
            limits::MAX_NAME_CHARS
        )))
    }
}

/// The registry service's state: the snapshot requests read and the serialized writes.
pub(crate) struct RegistryState {
    /// Topics, producers, consumers: a snapshot swapped whole by the admin API.
    current: std::sync::RwLock<Arc<Registry>>,
    /// Serializes registry changes (each awaits the store).
    writes: tokio::sync::Mutex<()>,
    store: Arc<dyn RegistryStore>,
}

impl RegistryState {
    /// The config's entries, kept in `store` as the admin API changes them.
    pub(crate) fn new(config: &EngineConfig, store: Arc<dyn RegistryStore>) -> Self {
        let registry = Registry::new(&config.topics, &config.producers, &config.consumers);
        Self {
            current: std::sync::RwLock::new(Arc::new(registry)),
            writes: tokio::sync::Mutex::new(()),
            store,
        }
    }
}

impl Engine {
    /// A snapshot of the registry.
    pub(super) fn snapshot(&self) -> Arc<Registry> {
        self.inner
            .registry
            .current
            .read()
            .map_or_else(|p| p.into_inner().clone(), |r| r.clone())
    }

    /// The registry, sorted by name.
    pub fn registry(&self) -> RegistryView {
        self.snapshot().view()
    }

    /// Applies one change under the write lock: `change` edits a copy; `topic` (name, queues)
    /// is made known to the message store first; the result is saved, then published.
    async fn change_registry(
        &self,
        topic: Option<(String, u32)>,
        change: impl FnOnce(&mut Registry) -> Result<(), EngineError>,
    ) -> Result<RegistryView, EngineError> {
        let _writing = self.inner.registry.writes.lock().await;
        let mut next = self.snapshot().copy();
        change(&mut next)?;
        if let Some((name, queues)) = topic {
            self.inner.messages.add_topic(&name, queues).await?;
        }
        let entries = next.entries();
        let store = self.inner.registry.store.clone();
        tokio::task::spawn_blocking(move || store.save(&entries))
            .await
            .map_err(|e| EngineError::Store(mqproxy_store::StoreError::Database(format!("registry save: {e}"))))??;
        let view = next.view();
        match self.inner.registry.current.write() {
            Ok(mut r) => *r = Arc::new(next),
            Err(p) => *p.into_inner() = Arc::new(next),
        }
        self.inner.consuming.notify_all();
        Ok(view)
    }

    /// Creates a topic, or grows its queue count (queues are never taken away: they may hold
    /// messages and consumer offsets).
    ///
    /// `lite`: whether it is a lite-message parent (None: as it is, or not for a new topic).
    ///
    /// # Errors
    /// A bad name or queue count, fewer queues than before, or a store failure.
    pub async fn put_topic(&self, name: &str, queues: u32, lite: Option<bool>) -> Result<RegistryView, EngineError> {
        check_name("topic", name)?;
        if name.starts_with(mqproxy_store::LITE_TOPIC_PREFIX) {
            return Err(EngineError::invalid(format!(
                "topic {name:?}: names starting with {} are lite topics' queues",
                mqproxy_store::LITE_TOPIC_PREFIX
            )));
        }
        limits::check(limits::QUEUES, "queues", u64::from(queues))?;
        let old = self.snapshot().topics.get(name).cloned();
        if let Some(old) = &old
            && queues < old.queues
        {
            return Err(EngineError::invalid(format!(
                "topic {name} has {} queues; queues can be added, not removed",
                old.queues
            )));
        }
        let spec = TopicSpec {
            name: name.to_owned(),
            queues,
            lite: lite.unwrap_or_else(|| old.is_some_and(|o| o.lite)),
        };
        let view = self
            .change_registry(Some((name.to_owned(), queues)), |r| {
                r.topics.insert(spec.name.clone(), Arc::new(spec));
                Ok(())
            })
            .await?;
        tracing::info!(topic = name, queues, "topic registered");
        Ok(view)
    }

    /// Deletes a topic no producer or consumer uses (its messages stay in the store).
    ///
    /// # Errors
    /// Unknown topic, a producer or consumer still on it, or a store failure.
    pub async fn delete_topic(&self, name: &str) -> Result<RegistryView, EngineError> {
        let view = self
            .change_registry(None, |r| {
                if !r.topics.contains_key(name) {
                    return Err(EngineError::invalid(format!("topic {name} is not registered")));
                }
                let mut users: Vec<&str> = r
                    .producers
                    .values()
                    .filter(|p| p.topic == name)
                    .map(|p| p.name.as_str())
                    .chain(
                        r.consumers
                            .values()
                            .filter(|c| c.topic == name)
                            .map(|c| c.name.as_str()),
                    )
                    .collect();
                if !users.is_empty() {
                    users.sort_unstable();
                    return Err(EngineError::invalid(format!(
                        "topic {name} is used by {}; delete them first",
                        users.join(", ")
                    )));
                }
                r.topics.remove(name);
                Ok(())
            })
            .await?;
        tracing::info!(topic = name, "topic deleted from the registry");
        Ok(view)
    }

    /// Creates or changes a producer; `token` keeps, sets or clears its access token.
    ///
    /// # Errors
    /// A bad name, an unknown topic, or a store failure.
    pub async fn put_producer(&self, name: &str, topic: &str, token: TokenChange) -> Result<RegistryView, EngineError> {
        check_name("producer", name)?;
        let view = self
            .change_registry(None, |r| {
                if !r.topics.contains_key(topic) {
                    return Err(EngineError::invalid(format!("topic {topic} is not registered")));
                }
                let spec = ProducerSpec {
                    name: name.to_owned(),
                    topic: topic.to_owned(),
                    token: token.apply(r.producers.get(name).and_then(|p| p.token.as_ref())),
                };
                r.producers.insert(spec.name.clone(), Arc::new(spec));
                Ok(())
            })
            .await?;
        tracing::info!(producer = name, topic, "producer registered");
        Ok(view)
    }

    /// Deletes a producer.
    ///
    /// # Errors
    /// Unknown producer, or a store failure.
    pub async fn delete_producer(&self, name: &str) -> Result<RegistryView, EngineError> {
        let view = self
            .change_registry(None, |r| {
                r.producers
                    .remove(name)
                    .map(|_| ())
                    .ok_or_else(|| EngineError::UnknownProducer(name.to_owned()))
            })
            .await?;
        tracing::info!(producer = name, "producer deleted");
        Ok(view)
    }

    /// Creates or changes a consumer (its offsets and settings are kept across changes);
    /// `token` keeps, sets or clears its access token (`spec.token` is ignored).
    ///
    /// # Errors
    /// A bad name or value, an unknown topic, or a store failure.
    pub async fn put_consumer(&self, mut spec: ConsumerSpec, token: TokenChange) -> Result<RegistryView, EngineError> {
        check_name("consumer", &spec.name)?;
        limits::check(limits::CONSUME_TIMEOUT_MS, "consumeTimeoutMs", spec.consume_timeout_ms)?;
        limits::check(limits::PULL_SIZE, "maxPullSize", u64::from(spec.max_pull_size))?;
        let (name, topic) = (spec.name.clone(), spec.topic.clone());
        let view = self
            .change_registry(None, |r| {
                if !r.topics.contains_key(&spec.topic) {
                    return Err(EngineError::invalid(format!("topic {} is not registered", spec.topic)));
                }
                spec.token = token.apply(r.consumers.get(&spec.name).and_then(|c| c.token.as_ref()));
                r.consumers.insert(spec.name.clone(), Arc::new(spec));
                Ok(())
            })
            .await?;
        tracing::info!(consumer = %name, topic = %topic, "consumer registered");
        Ok(view)
    }

    /// Deletes a consumer (its offsets stay in the state store, for a consumer of the same
    /// name created later).
    ///
    /// # Errors
    /// Unknown consumer, or a store failure.
    pub async fn delete_consumer(&self, name: &str) -> Result<RegistryView, EngineError> {
        let view = self
            .change_registry(None, |r| {
                r.consumers
                    .remove(name)
                    .map(|_| ())
                    .ok_or_else(|| EngineError::UnknownConsumer(name.to_owned()))
            })
            .await?;
        tracing::info!(consumer = name, "consumer deleted");
        Ok(view)
    }

    /// Saves the registry as it is now (at start-up: the config's entries are created).
    ///
    /// # Errors
    /// The registry store's failure.
    pub async fn save_registry(&self) -> Result<(), EngineError> {
        self.change_registry(None, |_| Ok(())).await.map(|_| ())
    }
}
