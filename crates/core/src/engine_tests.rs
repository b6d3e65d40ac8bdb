//! The engine's rules on its injected clock: lock expiry, redelivery, retry messages, rate
//! limits and stream credit, over the real embedded store in a temporary directory. Time moves
//! only when a test moves it, so a 10 s lock expires in no time at all.

use super::*;
use crate::clock::ManualClock;
use crate::request_id::RequestIdKeys;
use mqproxy_store::consumer_state::LocalConsumerState;
use mqproxy_store::embedded::{EmbeddedConfig, EmbeddedSettings, EmbeddedStore, FlushPolicy};
use mqproxy_store::registry_file::RegistryFile;
use std::time::Duration;
use tokio_stream::StreamExt;

const TOPIC: &str = "t";
const PRODUCER: &str = "p";
const CONSUMER: &str = "c";
const LOCK_MS: u64 = 10_000;
const LITE_IDLE_MS: u64 = 3_600_000;

struct Harness {
    engine: Engine,
    clock: Arc<ManualClock>,
    store: EmbeddedStore,
    _dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.store.close();
    }
}

fn harness(queues: u32) -> Harness {
    let dir = tempfile::tempdir().expect("tmp dir");
    let store = EmbeddedStore::open(EmbeddedConfig {
        data_dir: dir.path().to_owned(),
        topics: vec![(TOPIC.into(), queues)],
        broker_name: "b".into(),
        settings: EmbeddedSettings {
            flush: FlushPolicy::Async,
            async_flush_interval_ms: 60_000,
            group_commit_max: 64,
            cache_mib: 1,
            min_free_disk_mib: 0,
            ..EmbeddedSettings::default()
        },
    })
    .expect("store opens");
    let state = LocalConsumerState::load(Arc::new(store.clone())).expect("state loads");
    let config = EngineConfig {
        region_id: "r".into(),
        store_host: [127, 0, 0, 1, 0, 0, 0, 1],
        produce: ProduceSettings {
            max_delivery_delay_ms: 86_400_000,
        },
        consume: ConsumeSettings {
            default_rate_limit: 1_000,
            broadcast_client_idle_ms: 60_000,
            max_broadcast_clients: 16,
            metrics_max_client_series: 4,
            max_consume_streams: 4,
            lite_topic_idle_ms: LITE_IDLE_MS,
        },
        topics: vec![TopicSpec {
            name: TOPIC.into(),
            queues,
            lite: true,
        }],
        producers: vec![ProducerSpec {
            name: PRODUCER.into(),
            topic: TOPIC.into(),
            token: None,
        }],
        consumers: vec![ConsumerSpec {
            name: CONSUMER.into(),
            topic: TOPIC.into(),
            mode: ConsumeMode::Clustering,
            consume_timeout_ms: LOCK_MS,
            max_pull_size: 32,
            token: None,
        }],
    };
    let clock = ManualClock::starting_at(1_700_000_000_000);
    let engine = Engine::with_clock(
        config,
        Arc::new(store.clone()),
        Arc::new(state),
        RequestIdKeys::new([7; 32], None),
        Arc::new(RegistryFile::new(dir.path())),
        clock.clone(),
    );
    Harness {
        engine,
        clock,
        store,
        _dir: dir,
    }
}

fn target() -> ConsumeTarget {
    ConsumeTarget {
        topic: TOPIC.into(),
        consumer: CONSUMER.into(),
        client_id: None,
        lite_topic: None,
    }
}

impl Harness {
    async fn produce(&self, body: &str) -> SendReceipt {
        self.engine
            .producer(PRODUCER, None)
            .expect("producer")
            .produce(ProduceRequest {
                body: body.as_bytes().to_vec(),
                ..Default::default()
            })
            .await
            .expect("produced")
    }

    async fn fetch(&self) -> FetchOutcome {
        self.engine
            .consumer(target(), None)
            .expect("consumer")
            .fetch(FetchRequest::default())
            .await
            .expect("fetched")
    }

    async fn ack(&self, request_id: &str) -> AckOutcome {
        self.engine
            .consumer(target(), None)
            .expect("consumer")
            .ack(request_id)
            .await
            .expect("acked")
    }
}

fn lite_target(lite: &str) -> ConsumeTarget {
    ConsumeTarget {
        lite_topic: Some(lite.into()),
        ..target()
    }
}

impl Harness {
    async fn produce_lite(&self, body: &str, lites: &[&str]) -> Result<SendReceipt, EngineError> {
        self.engine
            .producer(PRODUCER, None)
            .expect("producer")
            .produce(ProduceRequest {
                body: body.as_bytes().to_vec(),
                lite_topics: lites.iter().map(|l| (*l).to_owned()).collect(),
                ..Default::default()
            })
            .await
    }

    async fn fetch_lite(&self, lite: &str) -> FetchOutcome {
        self.engine
            .consumer(lite_target(lite), None)
            .expect("consumer")
            .fetch(FetchRequest::default())
            .await
            .expect("fetched")
    }

    async fn ack_lite(&self, lite: &str, request_id: &str) -> AckOutcome {
        self.engine
            .consumer(lite_target(lite), None)
            .expect("consumer")
            .ack(request_id)
            .await
            .expect("acked")
    }
}

fn bodies(o: &FetchOutcome) -> Vec<String> {
    o.messages
        .iter()
        .chain(&o.retry_messages)
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect()
}

#[tokio::test]
async fn an_unacknowledged_batch_comes_again_once_its_lock_expires() {
    let h = harness(1);
    for i in 0..3 {
        h.produce(&format!("m{i}")).await;
    }
    let first = h.fetch().await;
    assert_eq!(first.status, FetchStatus::Found);
    assert_eq!(bodies(&first), ["m0", "m1", "m2"]);
    let first_rid = first.request_id.clone().expect("requestId");

    // The only queue is locked for the lock time, to the millisecond.
    h.clock.advance(LOCK_MS);
    assert_eq!(
        h.fetch().await.status,
        FetchStatus::NoNewMsg,
        "still locked at the lock time"
    );
    h.clock.advance(1);
    let again = h.fetch().await;
    assert_eq!(again.status, FetchStatus::Found, "redelivered once the lock expired");
    assert_eq!(bodies(&again), ["m0", "m1", "m2"]);

    // The first batch's ack comes too late: the queue was locked again since.
    let late = h.ack(&first_rid).await;
    assert!(!late.committed, "{late:?}");
    assert!(late.message.contains("locked again"), "{late:?}");
    let acked = h.ack(again.request_id.as_deref().expect("requestId")).await;
    assert!(acked.committed, "{acked:?}");
    assert_eq!(h.fetch().await.status, FetchStatus::NoNewMsg, "nothing left");
}

#[tokio::test]
async fn an_ack_after_expiry_still_commits_when_nobody_took_the_queue() {
    let h = harness(1);
    h.produce("m").await;
    let batch = h.fetch().await;
    h.clock.advance(LOCK_MS + 1);
    let acked = h.ack(batch.request_id.as_deref().expect("requestId")).await;
    assert!(acked.committed, "{acked:?}");
    assert!(acked.message.starts_with("lock expired, ok"), "{acked:?}");
    assert_eq!(h.fetch().await.status, FetchStatus::NoNewMsg);
}

#[tokio::test]
async fn a_retry_message_rides_with_pulls_until_acknowledged() {
    let h = harness(1);
    let receipt = h.produce("old").await;
    let batch = h.fetch().await;
    assert!(h.ack(batch.request_id.as_deref().expect("rid")).await.committed);

    let view = h
        .engine
        .configure_consumer(
            CONSUMER,
            SettingsChange {
                retry_msg_id: Some(receipt.msg_id.clone()),
                ..Default::default()
            },
        )
        .await
        .expect("retry queued");
    assert_eq!(view.retry_queued, 1);
    let retried = h.fetch().await;
    assert_eq!(retried.status, FetchStatus::Found);
    assert!(retried.messages.is_empty());
    assert_eq!(bodies(&retried), ["old"]);
    // Not acknowledged: it comes back after the lock time, not before. (The clock has not
    // moved since the first pull, so this lock was taken 1 ms "later": lock times strictly
    // increase per queue, or an old batch's ack could match a new lock.)
    assert_eq!(h.fetch().await.status, FetchStatus::NoNewMsg);
    h.clock.advance(LOCK_MS + 2);
    let again = h.fetch().await;
    assert_eq!(bodies(&again), ["old"], "{again:?}");
    // The batch carried no new offset: the ack moves none, but its retry message is done.
    let acked = h.ack(again.request_id.as_deref().expect("rid")).await;
    assert!(acked.message.contains("offset has committed"), "{acked:?}");
    h.clock.advance(LOCK_MS + 2);
    assert_eq!(h.fetch().await.status, FetchStatus::NoNewMsg, "done once acknowledged");
}

#[tokio::test]
async fn the_pull_rate_limit_refills_on_the_engine_clock() {
    let h = harness(1);
    h.engine
        .configure_consumer(
            CONSUMER,
            SettingsChange {
                limit_rate: Some(2),
                ..Default::default()
            },
        )
        .await
        .expect("rate set");
    assert_eq!(h.fetch().await.status, FetchStatus::NoNewMsg);
    assert_eq!(h.fetch().await.status, FetchStatus::NoNewMsg);
    assert_eq!(h.fetch().await.status, FetchStatus::RateLimited, "a burst of 2");
    h.clock.advance(499);
    assert_eq!(h.fetch().await.status, FetchStatus::RateLimited, "one pull per 500 ms");
    h.clock.advance(1);
    assert_eq!(h.fetch().await.status, FetchStatus::NoNewMsg);
}

async fn next_batch(events: &mut ConsumeStream) -> (String, usize) {
    match events.next().await.expect("event").expect("no error") {
        ConsumeEvent::Batch {
            request_id, messages, ..
        } => (request_id, messages.len()),
        ConsumeEvent::CommandResult(r) => panic!("unexpected command result {r:?}"),
    }
}

/// A stream holds at most `max_in_flight` unacknowledged batches: the next comes only when
/// one is acknowledged on the stream. Tokio's clock is paused, so "nothing more comes" is
/// observed as the stream going idle, not waited out.
#[tokio::test(start_paused = true)]
async fn a_stream_holds_at_most_its_credit_of_batches() {
    let h = harness(4);
    for i in 0..4 {
        h.produce(&format!("m{i}")).await;
    }
    let (commands, command_rx) = tokio::sync::mpsc::channel(4);
    let mut events = h
        .engine
        .consumer(target(), None)
        .expect("consumer")
        .consume(
            Subscription {
                max_in_flight: 2,
                ..Default::default()
            },
            tokio_stream::wrappers::ReceiverStream::new(command_rx),
        )
        .await
        .expect("stream opens");
    let (first, n1) = next_batch(&mut events).await;
    let (_second, n2) = next_batch(&mut events).await;
    assert_eq!((n1, n2), (1, 1), "one message per queue");
    let idle = tokio::time::timeout(Duration::from_secs(60), events.next()).await;
    assert!(idle.is_err(), "a third batch beyond the credit: {idle:?}");

    commands.send(ConsumeCommand::Ack(first)).await.expect("command");
    match events.next().await.expect("event").expect("no error") {
        ConsumeEvent::CommandResult(Ok(message)) => assert!(message.starts_with("ok"), "{message}"),
        other => panic!("expected the ack's result, got {other:?}"),
    }
    match events.next().await.expect("event").expect("no error") {
        ConsumeEvent::Batch { messages, .. } => assert_eq!(messages.len(), 1),
        other => panic!("expected a third batch, got {other:?}"),
    }
    let idle = tokio::time::timeout(Duration::from_secs(60), events.next()).await;
    assert!(idle.is_err(), "credit spent again: {idle:?}");
}

impl Harness {
    async fn fetch_with(&self, req: FetchRequest) -> Result<FetchOutcome, EngineError> {
        self.engine.consumer(target(), None).expect("consumer").fetch(req).await
    }
}

#[tokio::test]
async fn a_pull_s_own_consume_timeout_sets_its_lock_time() {
    let h = harness(2);
    h.produce("a").await;
    h.produce("b").await;
    // A short lock (20 s) and a long one (60 s) on a consumer whose own lock time is 10 s.
    let short = h
        .fetch_with(FetchRequest {
            consume_timeout_s: Some(20),
            ..Default::default()
        })
        .await
        .expect("fetched");
    let long = h
        .fetch_with(FetchRequest {
            consume_timeout_s: Some(60),
            ..Default::default()
        })
        .await
        .expect("fetched");
    assert_eq!(bodies(&short).len() + bodies(&long).len(), 2, "one message per queue");

    // Past the consumer's 10 s, both are still locked.
    h.clock.advance(LOCK_MS + 1);
    assert_eq!(h.fetch().await.status, FetchStatus::NoNewMsg, "both locks still held");
    // Past 20 s, the short one comes again, the long one stays.
    h.clock.advance(20_000 - LOCK_MS);
    let again = h.fetch().await;
    assert_eq!(bodies(&again), bodies(&short), "the short lock expired");
    assert_eq!(h.fetch().await.status, FetchStatus::NoNewMsg, "the long lock holds");
    // The long one's ack at 21 s is in time; the short one's was overtaken.
    let acked = h.ack(long.request_id.as_deref().expect("requestId")).await;
    assert!(acked.committed && !acked.message.contains("expired"), "{acked:?}");
    let late = h.ack(short.request_id.as_deref().expect("requestId")).await;
    assert!(!late.committed, "{late:?}");
    // Past 60 s nothing of the long one comes back: it was acknowledged.
    h.clock.advance(60_000);
    let after = h.fetch().await;
    assert_eq!(bodies(&after), bodies(&short), "only the unacknowledged one: {after:?}");
}

#[tokio::test]
async fn pull_parameters_out_of_range_are_refused_naming_their_range() {
    let h = harness(1);
    h.produce("m").await;
    for (req, expected) in [
        (
            FetchRequest {
                consume_timeout_s: Some(9),
                ..Default::default()
            },
            "consumeTimeout must be between 10 and 129600, got 9",
        ),
        (
            FetchRequest {
                consume_timeout_s: Some(129_601),
                ..Default::default()
            },
            "consumeTimeout must be between 10 and 129600, got 129601",
        ),
        (
            FetchRequest {
                pull_timeout_s: Some(0),
                ..Default::default()
            },
            "pullTimeout must be between 1 and 60, got 0",
        ),
        (
            FetchRequest {
                pull_timeout_s: Some(61),
                ..Default::default()
            },
            "pullTimeout must be between 1 and 60, got 61",
        ),
        (
            FetchRequest {
                max_pull_size: Some(0),
                ..Default::default()
            },
            "maxPullSize must be between 1 and 128, got 0",
        ),
    ] {
        let e = h.fetch_with(req).await.expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(e.to_string(), expected);
    }
    // Nothing was locked by the refused pulls.
    assert_eq!(h.fetch().await.status, FetchStatus::Found);
}

impl Harness {
    async fn pop(&self, max_pull_size: u32) -> FetchOutcome {
        self.fetch_with(FetchRequest {
            max_pull_size: Some(max_pull_size),
            pop: true,
            ..Default::default()
        })
        .await
        .expect("POP pull")
    }

    async fn committed(&self) -> Option<u64> {
        let offsets = self
            .engine
            .consumer_offsets(CONSUMER, None, None)
            .await
            .expect("offsets");
        offsets.contexts[0].queues[0].committed
    }
}

fn rid(o: &FetchOutcome) -> &str {
    o.request_id.as_deref().expect("requestId")
}

#[tokio::test]
async fn pop_pulls_share_one_queue_and_commit_past_acknowledged_segments_only() {
    let h = harness(1);
    for i in 0..10 {
        h.produce(&format!("m{i}")).await;
    }
    let (a, b, c) = (h.pop(3).await, h.pop(3).await, h.pop(3).await);
    assert_eq!(bodies(&a), ["m0", "m1", "m2"]);
    assert_eq!(
        bodies(&b),
        ["m3", "m4", "m5"],
        "the next segment, while the first is in flight"
    );
    assert_eq!(bodies(&c), ["m6", "m7", "m8"]);
    let view = h.engine.pop_segments(CONSUMER, None, None).await.expect("segments");
    let spans: Vec<(u64, u64)> = view.segments.iter().map(|s| (s.offset, s.next_offset)).collect();
    assert_eq!(spans, [(0, 3), (3, 6), (6, 9)]);
    assert_eq!(
        view.segments[1].request_id,
        rid(&b),
        "the view's requestId acknowledges it"
    );

    // Out of order: the offset waits for the first segment.
    let acked = h.ack(rid(&b)).await;
    assert!(!acked.committed, "{acked:?}");
    assert_eq!(h.committed().await, Some(0));
    assert!(h.ack(rid(&a)).await.committed);
    assert_eq!(h.committed().await, Some(6), "past a and b, up to c still in flight");
    assert!(h.ack(rid(&c)).await.committed);
    assert_eq!(h.committed().await, Some(9));
    let again = h.ack(rid(&c)).await;
    assert!(
        !again.committed && again.message.contains("no longer in flight"),
        "{again:?}"
    );

    let last = h.pop(3).await;
    assert_eq!(bodies(&last), ["m9"]);
    assert!(h.ack(rid(&last)).await.committed);
    assert_eq!(h.pop(3).await.status, FetchStatus::NoNewMsg);
    assert!(
        h.engine
            .pop_segments(CONSUMER, None, None)
            .await
            .expect("segments")
            .segments
            .is_empty()
    );
}

#[tokio::test]
async fn an_expired_pop_segment_comes_back_in_the_retry_list() {
    let h = harness(1);
    for i in 0..4 {
        h.produce(&format!("m{i}")).await;
    }
    let first = h.pop(2).await;
    assert_eq!(bodies(&first), ["m0", "m1"]);
    h.clock.advance(LOCK_MS);
    let second = h.pop(2).await;
    assert_eq!(second.messages.len(), 2, "still in time: the next segment: {second:?}");
    h.clock.advance(1);
    let again = h.pop(2).await;
    assert!(again.messages.is_empty(), "{again:?}");
    let retried: Vec<_> = again.retry_messages.iter().map(|m| m.body.clone()).collect();
    assert_eq!(retried, [b"m0".to_vec(), b"m1".to_vec()]);
    let view = h.engine.pop_segments(CONSUMER, None, None).await.expect("segments");
    let first_seg = view.segments.iter().find(|s| s.offset == 0).expect("the first segment");
    assert_eq!(first_seg.retry_times, 1);
    assert_eq!(first_seg.request_id, rid(&again));

    // The first hand-out's ack is too late: the segment went out again.
    let late = h.ack(rid(&first)).await;
    assert!(
        !late.committed && late.message.contains("no longer in flight"),
        "{late:?}"
    );
    assert!(h.ack(rid(&again)).await.committed);
    assert_eq!(h.committed().await, Some(2));
    assert!(h.ack(rid(&second)).await.committed);
    assert_eq!(h.committed().await, Some(4));
}

#[tokio::test]
async fn an_unlocked_pop_segment_is_handed_out_again_at_once() {
    let h = harness(1);
    for i in 0..3 {
        h.produce(&format!("m{i}")).await;
    }
    let first = h.pop(2).await;
    let unlocked = h
        .engine
        .consumer(target(), None)
        .expect("consumer")
        .unlock(rid(&first))
        .await
        .expect("unlocked");
    assert!(unlocked.unlocked, "{unlocked:?}");
    let again = h.pop(2).await;
    assert_eq!(bodies(&again), ["m0", "m1"], "given back, first out: {again:?}");
    assert!(again.messages.is_empty(), "in the retry list");
    let next = h.pop(2).await;
    assert_eq!(bodies(&next), ["m2"]);
    assert!(
        !h.ack(rid(&next)).await.committed,
        "m0..m1 before it are still in flight"
    );
    assert_eq!(h.committed().await, Some(0));
    assert!(h.ack(rid(&again)).await.committed);
    assert_eq!(h.committed().await, Some(3));
}

#[tokio::test]
async fn pulls_with_and_without_pop_do_not_mix_in_one_consumer() {
    let h = harness(1);
    for i in 0..4 {
        h.produce(&format!("m{i}")).await;
    }
    let pop = h.pop(2).await;
    let refused = h.fetch_with(FetchRequest::default()).await.expect_err("refused");
    assert_eq!(refused.kind(), ErrorKind::InvalidArgument);
    assert!(refused.to_string().contains("1 POP segments in flight"), "{refused}");
    assert!(h.ack(rid(&pop)).await.committed);

    let normal = h.fetch().await;
    assert_eq!(bodies(&normal), ["m2", "m3"], "the queue's committed offset is shared");
    let refused = h
        .fetch_with(FetchRequest {
            pop: true,
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(refused.kind(), ErrorKind::InvalidArgument);
    assert!(refused.to_string().contains("without pop=true"), "{refused}");
    assert!(h.ack(rid(&normal)).await.committed);
    assert_eq!(
        h.pop(2).await.status,
        FetchStatus::NoNewMsg,
        "POP starts at the committed offset"
    );
}

#[tokio::test]
async fn a_lite_message_reaches_each_named_lite_topic_and_its_parent() {
    let h = harness(2);
    h.produce_lite("m1", &["a", "b", "a"]).await.expect("produced");
    h.produce_lite("m2", &["a"]).await.expect("produced");
    let a = h.fetch_lite("a").await;
    assert_eq!(bodies(&a), ["m1", "m2"], "in order, once although named twice");
    let queue = a.queue.clone().expect("queue");
    assert_eq!((queue.topic.as_str(), queue.queue_id), ("%LMQ%t$a", 0));
    assert!(h.ack_lite("a", a.request_id.as_deref().expect("rid")).await.committed);
    assert_eq!(h.fetch_lite("a").await.status, FetchStatus::NoNewMsg);
    // Each lite topic has its own offsets; an ack names its lite topic.
    let b = h.fetch_lite("b").await;
    assert_eq!(bodies(&b), ["m1"]);
    let wrong = h
        .engine
        .consumer(target(), None)
        .expect("consumer")
        .ack(b.request_id.as_deref().expect("rid"))
        .await;
    assert!(
        wrong.is_err(),
        "a lite batch's requestId is not the parent's: {wrong:?}"
    );
    assert!(h.ack_lite("b", b.request_id.as_deref().expect("rid")).await.committed);
    // The parent's queues hold them too (as a broker's LMQ dispatch leaves them there).
    let mut parent = Vec::new();
    for _ in 0..2 {
        let batch = h.fetch().await;
        parent.extend(bodies(&batch));
        if let Some(rid) = batch.request_id.as_deref() {
            h.ack(rid).await;
        }
    }
    parent.sort();
    assert_eq!(parent, ["m1", "m2"]);
}

#[tokio::test]
async fn lite_topics_are_refused_with_a_reason() {
    let h = harness(1);
    let delayed = h
        .engine
        .producer(PRODUCER, None)
        .expect("producer")
        .produce(ProduceRequest {
            body: b"x".to_vec(),
            delay_level: Some(1),
            lite_topics: vec!["a".into()],
            ..Default::default()
        })
        .await
        .expect_err("delay with lite");
    assert!(
        delayed
            .to_string()
            .contains("liteTopics cannot be used with delayLevel"),
        "{delayed}"
    );
    let long = "x".repeat(100);
    let e = h.produce_lite("x", &[long.as_str()]).await.expect_err("too long");
    assert!(e.to_string().contains("at most 100 characters, got 101"), "{e}");
    let many: Vec<String> = (0..33).map(|i| format!("l{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let e = h.produce_lite("x", &many).await.expect_err("too many");
    assert!(e.to_string().contains("at most 32 lite topics, got 33"), "{e}");
    let e = h
        .engine
        .consumer(lite_target("no/slash"), None)
        .expect("consumer")
        .fetch(FetchRequest::default())
        .await
        .expect_err("bad name");
    assert!(e.to_string().starts_with("liteTopic:"), "{e}");
}

#[tokio::test]
async fn an_idle_lite_topic_is_reclaimed_and_a_used_one_kept() {
    let h = harness(1);
    h.produce_lite("old", &["idle", "busy"]).await.expect("produced");
    let batch = h.fetch_lite("idle").await;
    assert!(
        h.ack_lite("idle", batch.request_id.as_deref().expect("rid"))
            .await
            .committed
    );
    assert_eq!(h.engine.lite_topic_count(), 2);
    h.clock.advance(LITE_IDLE_MS - 1_000);
    // Pulled (nothing new) shortly before the idle time: kept.
    assert_eq!(bodies(&h.fetch_lite("busy").await), ["old"]);
    h.clock.advance(1_001);
    assert_eq!(
        h.engine.reclaim_idle_lite_topics(LITE_IDLE_MS).await,
        1,
        "idle goes, busy stays"
    );
    assert_eq!(h.engine.lite_topic_count(), 1);
    assert!(h.engine.topic_queues("%LMQ%t$idle").is_empty(), "the store forgot it");
    // Used again: a new lite topic, from its first message (the old one and its offsets went).
    h.produce_lite("new", &["idle"]).await.expect("produced");
    let again = h.fetch_lite("idle").await;
    assert_eq!(bodies(&again), ["new"]);
    assert_eq!(again.queue.expect("queue").min_offset, 0);
}
