//! mqproxy in front of a real RocketMQ cluster (run with `MQPROXY_TEST_BACKEND=rocketmq`;
//! `scripts/test` starts a local cluster and Redis): several proxy processes sharing Redis, and
//! interoperability with native RocketMQ clients on the same topics.

// The RocketMQ client's futures nest deeply (see src/lib.rs).
#![allow(deprecated)] // the classic pull consumer: the native client a Java-style app would use

use crate::common::*;
use rand::Rng;
use rocketmq_client_rust::{
    ClientRuntime, ClientRuntimeConfig, DefaultMQProducer, DefaultMQPullConsumer, MessageQueueSelector,
    MessageSelector, PullOptions, PullStatus, SelectMessageQueueByHash, TelemetryHandle,
};
use rocketmq_model::common::message::MessageTrait;
use rocketmq_model::common::message::message_single::Message;
use rocketmq_model::message::MessageQueue;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_mqproxy");

fn skip_without_cluster(needs_redis: bool) -> bool {
    if !rocketmq_backend() {
        eprintln!("skipped: set MQPROXY_TEST_BACKEND=rocketmq with a running cluster (scripts/test does)");
        return true;
    }
    if needs_redis && std::env::var("MQPROXY_TEST_REDIS_URL").is_err() {
        eprintln!("skipped: needs MQPROXY_TEST_REDIS_URL");
        return true;
    }
    false
}

/// Two `mqproxy` processes on one cluster and one Redis; consumers pick a proxy at random for
/// every pull (no sticky sessions), so a batch handed out by one proxy is acknowledged at the
/// other. Every message arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxy_processes_share_consumers_through_redis() {
    if skip_without_cluster(true) {
        return;
    }
    let suffix = unique_suffix();
    let dir = tempfile::tempdir().expect("tmp");
    let config = format!(
        "backend = \"rocketmq\"\n\
         [rocketmq]\nnamesrv_addr = \"{}\"\nauto_create_topics = true\ntopic_prefix = \"two-{suffix}-\"\noffset_refresh_ms = 100\n\
         [consumer_state]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"two-{suffix}:\"\n\
         [[topic]]\nname = \"{TOPIC}\"\nqueues = 4\n\
         [[producer]]\nname = \"{PRODUCER}\"\ntopic = \"{TOPIC}\"\n\
         [[consumer]]\nname = \"c\"\ntopic = \"{TOPIC}\"\nmax_pull_size = 8\n",
        namesrv_addr(),
        std::env::var("MQPROXY_TEST_REDIS_URL").expect("redis url"),
    );
    let path = dir.path().join("mqproxy.toml");
    std::fs::write(&path, config).expect("write config");
    let proxy = |name: &str| {
        let data = dir.path().join(name);
        Proc::spawn(
            BIN,
            &[
                "--config".into(),
                path.display().to_string(),
                "--data-dir".into(),
                data.display().to_string(),
            ],
        )
    };
    // The second starts once the first has created the topic on both brokers: started
    // together, it could read the route half made (one broker's queues), and two proxies that
    // disagree on a topic's queues misread each other's requestIds (see the closing notes of
    // issue 15).
    let client = reqwest::Client::new();
    let a = proxy("a");
    eventually(Duration::from_secs(30), "the first proxy ready", || async {
        let v = get_json(&client, &format!("{}/readyz", a.base), &[("", ""); 0]).await;
        (v["status"] == 200).then_some(())
    })
    .await;
    let b = proxy("b");
    let bases = [a.base.clone(), b.base.clone()];

    // A requestId issued by one proxy is acknowledged at the other (shared requestId key).
    let first = post_json(
        &client,
        &format!("{}/mq/produce", bases[0]),
        &[("producer", PRODUCER), ("message", "first")],
    )
    .await;
    assert_eq!(first["status"], 200, "{first}");
    let pulled = eventually(Duration::from_secs(10), "the first message at proxy A", || {
        let (client, url) = (client.clone(), format!("{}/mq/message", bases[0]));
        async move {
            let v = get_json(&client, &url, &[("topic", TOPIC), ("consumer", "c")]).await;
            (!bodies_of(&v).is_empty()).then_some(v)
        }
    })
    .await;
    assert_eq!(bodies_of(&pulled), ["first"]);
    let ack = post_json(
        &client,
        &format!("{}/mq/ack", bases[1]),
        &[("topic", TOPIC), ("consumer", "c"), ("requestId", &rid(&pulled))],
    )
    .await;
    assert_eq!(ack["status"], 200, "{ack}");
    assert!(ack["message"].as_str().unwrap_or_default().starts_with("ok"), "{ack}");
    // The shared state uses the Java proxy's hash layout with the route's broker and queue id.
    let queue = &pulled["result"]["queueInfo"]["messageQueue"];
    let field = format!(
        "{}:{}:cmt",
        queue["brokerName"].as_str().expect("brokerName"),
        queue["queueId"]
    );
    let redis = redis::Client::open(std::env::var("MQPROXY_TEST_REDIS_URL").expect("redis url")).expect("redis");
    let mut con = redis
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let committed: Option<String> = redis::cmd("HGET")
        .arg(format!("two-{suffix}:c"))
        .arg(&field)
        .query_async(&mut con)
        .await
        .expect("HGET");
    assert_eq!(committed.as_deref(), Some("1"), "{field} after the ack");

    // 400 messages through both proxies (batches of 50), consumed by 4 consumers that pick a
    // proxy at random for every pull.
    let total = 400;
    for chunk in 0..8 {
        let messages: Vec<String> = (0..50).map(|i| format!("m-{}", chunk * 50 + i)).collect();
        let body = serde_json::to_string(&messages).expect("json");
        let v = post_json(
            &client,
            &format!("{}/mq/produce/batch", bases[chunk % 2]),
            &[("producer", PRODUCER), ("messages", &body)],
        )
        .await;
        assert_eq!(v["status"], 200, "{v}");
    }
    // They stop when all 400 came, or when none came for 5 s (a proxy sees the other's sends
    // only at its next offset refresh, and a busy CI machine stretches that).
    let delivered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let last_delivery = std::sync::Arc::new(std::sync::Mutex::new(std::time::Instant::now()));
    let mut consumers = Vec::new();
    for _ in 0..4 {
        let (client, bases) = (client.clone(), bases.clone());
        let (delivered, last_delivery) = (delivered.clone(), last_delivery.clone());
        consumers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            let mut request_id: Option<String> = None;
            let idle = || last_delivery.lock().expect("last delivery").elapsed() > Duration::from_secs(5);
            while delivered.load(std::sync::atomic::Ordering::Relaxed) < total && !idle() {
                let base = &bases[rand::rng().random_range(0..2)];
                let mut q = vec![("topic", TOPIC.to_owned()), ("consumer", "c".to_owned())];
                if let Some(r) = request_id.take() {
                    q.push(("requestId", r));
                }
                let v = get_json(&client, &format!("{base}/mq/message"), &q).await;
                assert_eq!(v["status"], 200, "{v}");
                request_id = v["result"]["requestId"].as_str().map(str::to_owned);
                let bodies = bodies_of(&v);
                if bodies.is_empty() {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                } else {
                    delivered.fetch_add(bodies.len(), std::sync::atomic::Ordering::Relaxed);
                    *last_delivery.lock().expect("last delivery") = std::time::Instant::now();
                }
                got.extend(bodies);
            }
            if let Some(r) = request_id {
                let base = &bases[rand::rng().random_range(0..2)];
                let v = post_json(
                    &client,
                    &format!("{base}/mq/ack"),
                    &[("topic", TOPIC), ("consumer", "c"), ("requestId", &r)],
                )
                .await;
                assert_eq!(v["status"], 200, "{v}");
            }
            got
        }));
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for c in consumers {
        for body in c.await.expect("consumer") {
            *seen.entry(body).or_default() += 1;
        }
    }
    let duplicates: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicates.is_empty(), "delivered twice: {duplicates:?}");
    let missing: Vec<_> = (0..total)
        .map(|i| format!("m-{i}"))
        .filter(|m| !seen.contains_key(m))
        .collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    assert_eq!(seen.len(), total);
}

/// A native client on the same cluster: the test's own `rocketmq-client-rust` producer and
/// pull consumer, as a Java service would use them.
struct Native {
    producer: DefaultMQProducer,
    consumer: DefaultMQPullConsumer,
}

impl Native {
    async fn start() -> Self {
        let context = rocketmq_runtime::RuntimeContext::try_from_current("native-test-client").expect("tokio runtime");
        let runtime = ClientRuntime::try_new(
            context.service_context("client"),
            ClientRuntimeConfig::default(),
            TelemetryHandle::noop(),
        )
        .expect("client runtime");
        let group = format!("native-{}", unique_suffix());
        let mut producer = DefaultMQProducer::builder(runtime.clone())
            .producer_group(group.as_str())
            .name_server_addr(namesrv_addr().as_str())
            .build();
        producer.start().await.expect("native producer");
        let consumer = DefaultMQPullConsumer::builder(runtime)
            .consumer_group(group.as_str())
            .name_server_addr(namesrv_addr().as_str())
            .build()
            .expect("native consumer");
        consumer.start().await.expect("native consumer start");
        Self { producer, consumer }
    }
}

fn queue_of(v: &Value, remote_topic: &str) -> MessageQueue {
    let mq = &v["result"]["messageQueue"];
    MessageQueue::from_parts(
        remote_topic,
        mq["brokerName"].as_str().expect("brokerName"),
        i32::try_from(mq["queueId"].as_i64().expect("queueId")).expect("queue id"),
    )
}

/// What mqproxy produces a native consumer reads (body, keys, msgId, queue, offset), and what
/// a native producer sends mqproxy delivers with the native msgId; `orderId` picks the queue a
/// native client's hash selector picks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_clients_and_mqproxy_interoperate() {
    if skip_without_cluster(false) {
        return;
    }
    let prefix = format!("native-{}-", unique_suffix());
    let mut config = config(None);
    use_rocketmq(&mut config, &prefix);
    let s = TestServer::with_config(config).await;
    let remote_topic = format!("{prefix}{TOPIC}");
    let native = Native::start().await;

    // mqproxy -> native consumer.
    let produced = s
        .post(
            "/mq/produce",
            &[("producer", PRODUCER), ("message", "from mqproxy"), ("keys", "k1 k2")],
        )
        .await;
    assert_eq!(produced["status"], 200, "{produced}");
    let mq = queue_of(&produced, &remote_topic);
    let offset = produced["result"]["queueOffset"].as_i64().expect("offset");
    // A native consumer learns the topic's route first, as a subscription would.
    let queues = native
        .consumer
        .fetch_subscribe_message_queues(&remote_topic)
        .await
        .expect("route");
    assert!(queues.contains(&mq), "{mq:?} in the route {queues:?}");
    let options = PullOptions::new(mq.clone(), MessageSelector::by_tag("*"), offset, 1)
        .expect("pull options")
        .max_size_in_bytes(1 << 20);
    let pulled = native.consumer.pull_with_options(options).await.expect("native pull");
    assert_eq!(*pulled.pull_status(), PullStatus::Found);
    let found = &pulled.msg_found_list().expect("messages")[0];
    assert_eq!(found.body().as_deref(), Some(&b"from mqproxy"[..]));
    assert_eq!(
        found.message_inner().property("UNIQ_KEY"),
        produced["result"]["msgId"].as_str(),
        "the msgId mqproxy answered is the one native clients see"
    );
    assert_eq!(
        found.message_inner().get_keys().map(|k| k.to_string()).as_deref(),
        Some("k1 k2")
    );
    assert_eq!(found.queue_offset(), offset);

    // native producer (hash selector on an orderId) -> mqproxy consumer.
    let message = Message::builder()
        .topic(remote_topic.as_str())
        .body_slice(b"from a native producer")
        .build()
        .expect("message");
    let selector = |mqs: &[MessageQueue], m: &Message, arg: &String| SelectMessageQueueByHash.select(mqs, m, arg);
    let sent = native
        .producer
        .send_with_selector(message, selector, "order-42".to_owned())
        .await
        .expect("native send")
        .expect("send result");
    let native_id = sent.msg_id.as_ref().expect("msgId").to_string();
    let native_queue = sent.message_queue.as_ref().expect("queue").queue_id();
    let delivered = eventually(Duration::from_secs(10), "the native message via mqproxy", || async {
        let v = s
            .get(
                "/mq/message",
                &[("topic", TOPIC), ("consumer", CLUSTERING), ("maxPullSize", "32")],
            )
            .await;
        let ack = v["result"]["requestId"].as_str().map(str::to_owned);
        let list = v["result"]["msgList"].as_array().cloned().unwrap_or_default();
        if let Some(r) = ack {
            s.post(
                "/mq/ack",
                &[("topic", TOPIC), ("consumer", CLUSTERING), ("requestId", &r)],
            )
            .await;
        }
        list.into_iter().find(|m| m["message"] == "from a native producer")
    })
    .await;
    assert_eq!(delivered["messageId"].as_str(), Some(native_id.as_str()));

    // The same orderId through mqproxy lands on the native client's queue.
    let ordered = s
        .post(
            "/mq/produce",
            &[("producer", PRODUCER), ("message", "ordered"), ("orderId", "order-42")],
        )
        .await;
    assert_eq!(
        ordered["result"]["messageQueue"]["queueId"].as_i64(),
        Some(i64::from(native_queue)),
        "{ordered}"
    );
}

/// A registered topic missing on the cluster stops start-up with its name (unless
/// `auto_create_topics`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_is_named_at_start_up() {
    if skip_without_cluster(false) {
        return;
    }
    let mut config = config(Some(&one_queue("")));
    let prefix = format!("missing-{}-", unique_suffix());
    use_rocketmq(&mut config, &prefix);
    config.rocketmq.auto_create_topics = false;
    let dir = tempfile::tempdir().expect("tmp");
    config.data_dir = dir.path().to_path_buf();
    config.listen = "127.0.0.1:0".into();
    let listeners = mqproxy::server::Listeners::bind(&config).await.expect("bind");
    let error = mqproxy::server::run(config, listeners, std::future::pending())
        .await
        .expect_err("start-up fails");
    let text = error.to_string();
    assert!(text.contains(&format!("{prefix}{TOPIC}")), "{text}");
    assert!(text.contains("auto_create_topics"), "{text}");
}
