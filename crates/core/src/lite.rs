//! Lite topics (MQCloud's lite messages): any number of small topics under a parent topic
//! registered with `lite`, named by `liteTopics` on produce and `liteTopic` on consume. Each is
//! the single queue (per broker) of its queue topic `%LMQ%<parent>$<lite>`, RocketMQ's light
//! message queue, so every consume rule (locks, POP, retries, streams) holds for it unchanged;
//! made on first use, reclaimed when nobody sent or pulled for `lite_topic_idle_ms`.

use super::{ConsumeMode, Engine, EngineError, TopicSpec, limits};
use mqproxy_store::ContextKey;
use std::collections::HashMap;
use std::sync::Mutex;

/// The lite topics this proxy knows and when each was last used.
pub(crate) struct LiteState {
    /// Lite queue topic -> last send or pull through this proxy (epoch ms).
    last_use: Mutex<HashMap<String, u64>>,
}

impl LiteState {
    /// The store's lite topics at start, each counted as used now (idle from here on).
    pub(crate) fn new(known: Vec<String>, now_ms: u64) -> Self {
        Self {
            last_use: Mutex::new(known.into_iter().map(|t| (t, now_ms)).collect()),
        }
    }

    fn uses(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        // Every change under it is an insert or a remove: a poisoned lock still holds a map.
        self.last_use.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn touch(&self, topic: &str, now_ms: u64) {
        let mut uses = self.uses();
        match uses.get_mut(topic) {
            Some(last) => *last = (*last).max(now_ms),
            None => {
                uses.insert(topic.to_owned(), now_ms);
            }
        }
    }

    /// How many lite topics are known (tests).
    pub(crate) fn len(&self) -> usize {
        self.uses().len()
    }

    /// How many lite topics each parent topic has (metrics).
    pub(crate) fn count_by_parent(&self) -> HashMap<String, usize> {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for topic in self.uses().keys() {
            if let Some((parent, _)) = mqproxy_store::split_lite_queue_topic(topic) {
                *counts.entry(parent.to_owned()).or_default() += 1;
            }
        }
        counts
    }
}

/// Checks a lite topic's name (`parameter` names it in the refusal) under `parent`; its
/// queue topic.
fn lite_queue_topic(parent: &TopicSpec, lite: &str, parameter: &str) -> Result<String, EngineError> {
    if !parent.lite {
        return Err(EngineError::invalid(format!(
            "{parameter}: topic {} is not a lite-message topic (an operator registers it with lite=true)",
            parent.name
        )));
    }
    if lite.is_empty()
        || !lite
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    {
        return Err(EngineError::invalid(format!(
            "{parameter}: lite topic {lite:?} must be letters, digits, '-' and '_'"
        )));
    }
    let total = parent.name.len() + lite.len();
    if total > limits::MAX_LITE_TOPIC_CHARS {
        return Err(EngineError::invalid(format!(
            "{parameter}: topic and lite topic names together must be at most {} characters, got {total} ({} + {lite:?})",
            limits::MAX_LITE_TOPIC_CHARS,
            parent.name
        )));
    }
    Ok(mqproxy_store::lite_queue_topic(&parent.name, lite))
}

impl Engine {
    /// The lite topic `lite` under `parent`, opened in the store and counted as used now; its
    /// queue topic.
    pub(crate) async fn open_lite(
        &self,
        parent: &TopicSpec,
        lite: &str,
        parameter: &str,
    ) -> Result<String, EngineError> {
        let topic = lite_queue_topic(parent, lite, parameter)?;
        self.inner.messages.open_lite_topic(&parent.name, &topic).await?;
        self.inner.lite.touch(&topic, self.now_ms());
        Ok(topic)
    }

    /// The queue topics of a produce's `liteTopics` (each checked and opened), without repeats.
    pub(crate) async fn open_lite_topics(
        &self,
        parent: &TopicSpec,
        lites: &[String],
    ) -> Result<Vec<String>, EngineError> {
        let mut names: Vec<&str> = lites.iter().map(|l| l.trim()).filter(|l| !l.is_empty()).collect();
        names.sort_unstable();
        names.dedup();
        if names.len() > limits::MAX_LITE_TOPICS_PER_MESSAGE {
            return Err(EngineError::invalid(format!(
                "liteTopics must name at most {} lite topics, got {}",
                limits::MAX_LITE_TOPICS_PER_MESSAGE,
                names.len()
            )));
        }
        let mut topics = Vec::with_capacity(names.len());
        for lite in names {
            topics.push(self.open_lite(parent, lite, "liteTopics").await?);
        }
        Ok(topics)
    }

    /// How many lite topics this proxy knows.
    pub fn lite_topic_count(&self) -> usize {
        self.inner.lite.len()
    }

    /// Reclaims, every tenth of `lite_topic_idle_ms` (at most a minute apart), the lite topics
    /// idle longer than that; ends when the engine is dropped.
    pub fn spawn_lite_topic_sweep(&self) -> tokio::task::JoinHandle<()> {
        let idle_ms = self.inner.consuming.settings().lite_topic_idle_ms;
        self.spawn_idle_sweep(idle_ms, move |engine| async move {
            engine.reclaim_idle_lite_topics(idle_ms).await;
        })
    }

    /// Reclaims the lite topics with no send or pull here for `idle_ms`, nobody waiting on
    /// them, and no consumer context that another proxy (sharing the consumer state) pulled
    /// meanwhile: their consumers' state goes, then the store forgets them.
    pub(crate) async fn reclaim_idle_lite_topics(&self, idle_ms: u64) -> usize {
        let idle_before = self.now_ms().saturating_sub(idle_ms);
        let candidates: Vec<String> = self
            .inner
            .lite
            .uses()
            .iter()
            .filter(|&(_, &last)| last < idle_before)
            .map(|(t, _)| t.clone())
            .collect();
        let mut reclaimed = 0;
        for topic in candidates {
            match self.reclaim_lite_topic(&topic, idle_before).await {
                Ok(true) => reclaimed += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(topic, error = %e, "cannot reclaim the idle lite topic"),
            }
        }
        if reclaimed > 0 {
            tracing::info!(reclaimed, idle_ms, "reclaimed lite topics idle for lite_topic_idle_ms");
        }
        reclaimed
    }

    async fn reclaim_lite_topic(&self, topic: &str, idle_before: u64) -> Result<bool, EngineError> {
        if self.inner.consuming.is_waited_on(topic) {
            self.inner.lite.touch(topic, self.now_ms());
            return Ok(false);
        }
        let Some((parent, _)) = mqproxy_store::split_lite_queue_topic(topic) else {
            return Ok(false);
        };
        let registry = self.snapshot();
        let consumers: Vec<_> = registry
            .consumers
            .values()
            .filter(|c| c.topic == parent)
            .cloned()
            .collect();
        let queues = self.queue_count(topic);
        // First look, then forget: a context pulled since (through another proxy) keeps all.
        let mut contexts = Vec::new();
        for spec in &consumers {
            let key = ContextKey {
                topic: topic.to_owned(),
                group: spec.name.clone(),
                client_id: None,
            };
            if spec.mode == ConsumeMode::Broadcast {
                let clients = self.inner.consuming.state().client_ids(topic, &spec.name).await?;
                for client_id in clients {
                    contexts.push(ContextKey {
                        client_id: Some(client_id),
                        ..key.clone()
                    });
                }
            } else {
                contexts.push(key);
            }
        }
        for key in &contexts {
            let snapshot = self.inner.consuming.state().snapshot(key, queues).await?;
            let last_pull = snapshot.queues.iter().map(|q| q.last_pull_ms).max().unwrap_or(0);
            if last_pull >= idle_before {
                self.inner.lite.touch(topic, last_pull);
                return Ok(false);
            }
        }
        for key in &contexts {
            self.inner.consuming.state().forget_context(key).await?;
        }
        self.inner.lite.uses().remove(topic);
        self.inner.messages.drop_lite_topic(topic).await?;
        tracing::debug!(topic, contexts = contexts.len(), "lite topic reclaimed");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_against_the_parent() {
        let parent = |lite| TopicSpec {
            name: "agent-replies".into(),
            queues: 1,
            lite,
        };
        assert_eq!(
            lite_queue_topic(&parent(true), "session-1", "liteTopic").expect("ok"),
            "%LMQ%agent-replies$session-1"
        );
        let not_lite = lite_queue_topic(&parent(false), "s", "liteTopic").expect_err("not a parent");
        assert!(not_lite.to_string().contains("not a lite-message topic"), "{not_lite}");
        let bad = lite_queue_topic(&parent(true), "a:b", "liteTopics").expect_err("bad chars");
        assert!(bad.to_string().starts_with("liteTopics:"), "{bad}");
        let long = "x".repeat(100 - "agent-replies".len());
        assert!(lite_queue_topic(&parent(true), &long, "liteTopic").is_ok());
        let too_long = lite_queue_topic(&parent(true), &format!("{long}x"), "liteTopic").expect_err("101");
        assert!(
            too_long.to_string().contains("at most 100 characters, got 101"),
            "{too_long}"
        );
    }
}
