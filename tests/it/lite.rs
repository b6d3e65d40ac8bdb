//! Lite topics against the real server (embedded store, or a RocketMQ cluster's LMQ): one
//! produce reaches each named lite topic; each lite topic is consumed on its own, in clustering,
//! broadcast and POP, over REST and gRPC; refusals name the rule; offsets survive a restart.

use crate::common::*;
use mqproxy::grpc::pb;
use pb::messaging_service_client::MessagingServiceClient;
use serde_json::Value;

/// A lite topic name of this test run (a RocketMQ cluster keeps its LMQs between runs).
fn lite(name: &str) -> String {
    format!("{name}-{}", unique_suffix().replace('-', "_"))
}

async fn produce_lite(s: &TestServer, message: &str, lites: &str) -> Value {
    let v = s
        .post(
            "/mq/produce",
            &[("producer", PRODUCER), ("message", message), ("liteTopics", lites)],
        )
        .await;
    assert_eq!(v["status"], 200, "{v}");
    v
}

/// Pulls a lite topic (acking as it goes) until three long polls in a row find nothing.
async fn drain_lite(s: &TestServer, consumer: &str, client_id: Option<&str>, lite: &str, pop: bool) -> Vec<String> {
    let mut got = Vec::new();
    let mut empty = 0;
    while empty < 3 {
        let mut q = vec![
            ("topic", TOPIC),
            ("consumer", consumer),
            ("liteTopic", lite),
            ("waitMs", "300"),
        ];
        if let Some(c) = client_id {
            q.push(("clientId", c));
        }
        if pop {
            q.push(("pop", "true"));
        }
        let v = s.get("/mq/message", &q).await;
        assert_eq!(v["status"], 200, "{v}");
        let bodies = bodies_of(&v);
        if bodies.is_empty() {
            empty += 1;
            continue;
        }
        empty = 0;
        got.extend(bodies);
        let mut ack = vec![("topic", TOPIC), ("consumer", consumer), ("liteTopic", lite)];
        let request_id = rid(&v);
        ack.push(("requestId", &request_id));
        if let Some(c) = client_id {
            ack.push(("clientId", c));
        }
        let a = s.get("/mq/ack", &ack).await;
        assert_eq!(a["status"], 200, "{a}");
        assert!(a["message"].as_str().is_some_and(|m| !m.contains("ignored")), "{a}");
    }
    got
}

/// Messages as consumed: in the order sent where a lite topic is one queue (the embedded
/// store, one broker); on several brokers each broker's LMQ keeps its own order, so sorted.
fn ordered(mut bodies: Vec<String>) -> Vec<String> {
    if rocketmq_backend() && brokers() > 1 {
        bodies.sort();
    }
    bodies
}

/// One message to several lite topics: each lite topic's consumers get it once, apart from the
/// others; clustering, broadcast and POP; the lite topic's queue is named in the answer.
#[tokio::test]
async fn each_lite_topic_gets_its_messages_once() {
    let s = TestServer::start().await;
    let (a, b) = (lite("session-a"), lite("session-b"));
    produce_lite(&s, "to-both", &format!("{a},{b}")).await;
    for i in 0..5 {
        produce_lite(&s, &format!("a{i}"), &a).await;
    }
    let first = s
        .get(
            "/mq/message",
            &[
                ("topic", TOPIC),
                ("consumer", CLUSTERING),
                ("liteTopic", &a),
                ("waitMs", "5000"),
            ],
        )
        .await;
    assert_eq!(first["status"], 200, "{first}");
    let queue = &first["result"]["queue"];
    if !queue.is_null() {
        assert_eq!(queue["queueId"], 0, "{first}");
    }
    // Unlocked again, so the drain below sees the lite topic whole.
    let unlocked = s
        .get(
            "/mq/unlock",
            &[
                ("topic", TOPIC),
                ("consumer", CLUSTERING),
                ("liteTopic", &a),
                ("requestId", &rid(&first)),
            ],
        )
        .await;
    assert_eq!(unlocked["status"], 200, "{unlocked}");
    let expected_a: Vec<String> = std::iter::once("to-both".to_owned())
        .chain((0..5).map(|i| format!("a{i}")))
        .collect();
    assert_eq!(
        ordered(drain_lite(&s, CLUSTERING, None, &a, false).await),
        ordered(expected_a),
        "in order, once"
    );
    assert_eq!(drain_lite(&s, CLUSTERING, None, &b, false).await, ["to-both"]);
    // Broadcast: every client of the lite topic gets all of it.
    for client in ["c1", "c2"] {
        assert_eq!(
            drain_lite(&s, BROADCAST, Some(client), &b, false).await,
            ["to-both"],
            "{client}"
        );
    }
    // POP on a lite topic: segments of its one queue.
    let c = lite("pop");
    for i in 0..6 {
        produce_lite(&s, &format!("p{i}"), &c).await;
    }
    let popped = ordered(drain_lite(&s, CLUSTERING, None, &c, true).await);
    assert_eq!(popped, (0..6).map(|i| format!("p{i}")).collect::<Vec<_>>());
}

/// What is refused, and why: a topic that is no lite parent, a name too long (the range named),
/// bad characters, a delay.
#[tokio::test]
async fn lite_topic_refusals_name_the_rule() {
    let s = TestServer::with_toml(&one_queue("")).await;
    let v = s
        .post(
            "/mq/produce",
            &[("producer", PRODUCER), ("message", "x"), ("liteTopics", "a")],
        )
        .await;
    assert_eq!(v["status"], 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("not a lite-message topic")),
        "{v}"
    );
    let v = s
        .get(
            "/mq/message",
            &[("topic", TOPIC), ("consumer", "c"), ("liteTopic", "a")],
        )
        .await;
    assert_eq!(v["status"], 400, "{v}");
    // Made a lite parent by the admin API, it takes them.
    let put = s
        .post("/admin/topic", &[("name", TOPIC), ("queues", "1"), ("lite", "true")])
        .await;
    assert_eq!(put["status"], 200, "{put}");
    let entry = put["result"]["topics"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == TOPIC))
        .cloned()
        .expect("topic entry");
    assert_eq!(entry["lite"], true, "{entry}");
    let name = lite("ok");
    produce_lite(&s, "fine", &name).await;
    assert_eq!(drain_lite(&s, "c", None, &name, false).await, ["fine"]);
    let long = "x".repeat(100 - TOPIC.len() + 1);
    let v = s
        .post(
            "/mq/produce",
            &[("producer", PRODUCER), ("message", "x"), ("liteTopics", &long)],
        )
        .await;
    assert_eq!(v["status"], 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("liteTopics") && m.contains("at most 100 characters, got 101")),
        "{v}"
    );
    let v = s
        .get(
            "/mq/message",
            &[("topic", TOPIC), ("consumer", "c"), ("liteTopic", "a:b")],
        )
        .await;
    assert_eq!(v["status"], 400, "{v}");
    assert!(
        v["message"].as_str().is_some_and(|m| m.starts_with("liteTopic:")),
        "{v}"
    );
    let v = s
        .post(
            "/mq/produce",
            &[
                ("producer", PRODUCER),
                ("message", "x"),
                ("liteTopics", "a"),
                ("delayLevel", "1"),
            ],
        )
        .await;
    assert_eq!(v["status"], 400, "{v}");
}

/// gRPC: Produce with lite_topics, Fetch and a Consume stream on a lite topic.
#[tokio::test]
async fn grpc_produces_to_and_consumes_lite_topics() {
    let s = TestServer::start().await;
    let mut c = MessagingServiceClient::connect(s.base.clone()).await.expect("connect");
    let name = lite("grpc");
    let target = || {
        Some(pb::ConsumeTarget {
            topic: TOPIC.into(),
            consumer: CLUSTERING.into(),
            client_id: None,
            lite_topic: Some(name.clone()),
        })
    };
    for body in ["g0", "g1"] {
        c.produce(pb::ProduceRequest {
            producer: PRODUCER.into(),
            body: body.into(),
            lite_topics: vec![name.clone()],
            ..Default::default()
        })
        .await
        .expect("produce");
    }
    let fetched = c
        .fetch(pb::FetchRequest {
            target: target(),
            wait_ms: Some(5_000),
            ..Default::default()
        })
        .await
        .expect("fetch")
        .into_inner();
    let bodies: Vec<Vec<u8>> = fetched.messages.iter().map(|m| m.body.clone()).collect();
    assert_eq!(bodies, [b"g0".to_vec(), b"g1".to_vec()], "{fetched:?}");
    c.ack(pb::AckRequest {
        target: target(),
        request_id: fetched.request_id.clone().expect("requestId"),
    })
    .await
    .expect("ack");
    // A stream on the lite topic gets what is produced to it next, and nothing of the parent.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::ConsumeRequest {
        command: Some(pb::consume_request::Command::Subscribe(pb::Subscribe {
            target: target(),
            auto_ack: true,
            ..Default::default()
        })),
    })
    .await
    .expect("subscribe");
    let mut events = c
        .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("consume")
        .into_inner();
    s.produce("parent-only").await;
    c.produce(pb::ProduceRequest {
        producer: PRODUCER.into(),
        body: b"pushed".to_vec(),
        lite_topics: vec![name.clone()],
        ..Default::default()
    })
    .await
    .expect("produce");
    let batch = loop {
        let next = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            tokio_stream::StreamExt::next(&mut events),
        )
        .await
        .expect("a batch within 20 s")
        .expect("stream open")
        .expect("no error");
        if let Some(pb::consume_response::Event::Batch(b)) = next.event {
            break b;
        }
    };
    let bodies: Vec<Vec<u8>> = batch.messages.iter().map(|m| m.body.clone()).collect();
    assert_eq!(bodies, [b"pushed".to_vec()]);
    drop(tx);
}

/// A lite topic's messages and its consumer's offsets survive a restart (embedded store).
#[tokio::test]
async fn lite_topics_survive_a_restart() {
    if embedded_only("the embedded store's lite queues at start") {
        return;
    }
    let s = TestServer::start().await;
    let name = lite("kept");
    for i in 0..3 {
        produce_lite(&s, &format!("k{i}"), &name).await;
    }
    let v = s
        .get(
            "/mq/message",
            &[("topic", TOPIC), ("consumer", CLUSTERING), ("liteTopic", &name)],
        )
        .await;
    assert_eq!(bodies_of(&v), ["k0", "k1", "k2"], "{v}");
    let a = s
        .get(
            "/mq/ack",
            &[
                ("topic", TOPIC),
                ("consumer", CLUSTERING),
                ("liteTopic", &name),
                ("requestId", &rid(&v)),
            ],
        )
        .await;
    assert_eq!(a["status"], 200, "{a}");
    produce_lite(&s, "k3", &name).await;
    let s = s.restart().await;
    assert_eq!(
        drain_lite(&s, CLUSTERING, None, &name, false).await,
        ["k3"],
        "only what was not acknowledged"
    );
    produce_lite(&s, "k4", &name).await;
    assert_eq!(
        drain_lite(&s, CLUSTERING, None, &name, false).await,
        ["k4"],
        "continues after its old messages"
    );
}

/// The lite gauge of `/metrics` for the demo topic (0 when absent).
async fn lite_topics_gauge(s: &TestServer) -> u64 {
    let text = s.metrics_text().await;
    let needle = format!("mqproxy_lite_topics{{topic=\"{TOPIC}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(needle.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The sweep reclaims a lite topic idle for `lite_topic_idle_ms` (here a second): the gauge
/// drops to 0; on the embedded store its messages went with it, so a pull finds nothing.
#[tokio::test]
async fn an_idle_lite_topic_is_reclaimed_by_the_sweep() {
    let mut config = config(None);
    config.consume.lite_topic_idle_ms = 1_000;
    let s = TestServer::with_config(config).await;
    let name = lite("short-lived");
    produce_lite(&s, "gone-soon", &name).await;
    assert_eq!(lite_topics_gauge(&s).await, 1);
    eventually(
        std::time::Duration::from_secs(10),
        "the lite topic reclaimed",
        || async { (lite_topics_gauge(&s).await == 0).then_some(()) },
    )
    .await;
    if !rocketmq_backend() {
        let v = s
            .get(
                "/mq/message",
                &[("topic", TOPIC), ("consumer", CLUSTERING), ("liteTopic", &name)],
            )
            .await;
        assert_eq!(v["status"], 200, "{v}");
        assert!(bodies_of(&v).is_empty(), "its messages went with it: {v}");
    }
}
