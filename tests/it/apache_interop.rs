//! mqproxy beside the official Java client on an Apache RocketMQ 5 cluster (two brokers; run
//! with `MQPROXY_TEST_BACKEND=rocketmq MQPROXY_TEST_CLUSTER=apache`, as `.ci/run` does). The
//! Java side is `tests/apache-rocketmq/src/main/java/mqproxy/apache/Tool.java`, run through
//! `scripts/rocketmq-apache.sh tool`: one JSON line per message on its stdout.

// The RocketMQ client's futures nest deeply (see src/lib.rs).

use crate::common::*;
use mqproxy::grpc::pb;
use pb::messaging_service_client::MessagingServiceClient;
use serde_json::Value;
use std::collections::HashMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn skip_without_apache() -> bool {
    let apache = std::env::var("MQPROXY_TEST_CLUSTER").as_deref() == Ok("apache");
    if !rocketmq_backend() || !apache || !timer_messages() {
        eprintln!(
            "skipped: needs an Apache RocketMQ 5 cluster (MQPROXY_TEST_BACKEND=rocketmq MQPROXY_TEST_CLUSTER=apache; scripts/rocketmq-apache.sh start)"
        );
        return true;
    }
    false
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/rocketmq-apache.sh")
}

fn parse_lines(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("Java tool line {l:?}: {e}")))
        .collect()
}

/// The Java producer: `count` messages `<body>0`, `<body>1`.. with a tag, keys and user properties (and an
/// orderId through `SelectMessageQueueByHash`); what it answered per message.
fn java_produce(topic: &str, count: u32, body: &str, keys: &str, props: &str, order_id: Option<&str>) -> Vec<Value> {
    let out = Command::new(script())
        .args([
            "tool",
            "produce",
            &namesrv_addr(),
            topic,
            &count.to_string(),
            body,
            "tagA",
            keys,
            props,
        ])
        .arg(order_id.unwrap_or("-"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run the Java tool");
    assert!(out.status.success(), "Java produce failed: {:?}", out.status);
    let sent = parse_lines(&out.stdout);
    assert_eq!(sent.len(), count as usize, "{sent:?}");
    sent
}

/// A Java consumer group (a lite pull consumer assigned every queue) running in the background.
struct JavaConsumer {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl JavaConsumer {
    /// Starts it and waits until it holds every queue of the topic; it stops after `count`
    /// messages, or when none came for `idle_seconds`.
    fn start(topic: &str, group: &str, count: u32, idle_seconds: u32) -> Self {
        let mut child = Command::new(script())
            .args(["tool", "consume", &namesrv_addr(), topic, group])
            .args([count.to_string(), idle_seconds.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run the Java tool");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && tx.send(v).is_err()
                {
                    return;
                }
            }
        });
        let ready = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the Java consumer started");
        assert_eq!(ready["ready"], true, "{ready}");
        Self { child, lines }
    }

    /// The next `n` messages (by body), or a panic after `limit`.
    fn take(&self, n: usize, limit: Duration) -> HashMap<String, Value> {
        let deadline = std::time::Instant::now() + limit;
        let mut got = HashMap::new();
        while got.len() < n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let v = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("the Java consumer got {} of {n} messages: {got:?}", got.len()));
            got.insert(v["body"].as_str().unwrap_or_default().to_owned(), v);
        }
        got
    }

    /// Waits for it to exit (its offsets committed) and returns what it printed meanwhile.
    fn finish(mut self) -> Vec<Value> {
        let status = self.child.wait().expect("wait for the Java consumer");
        assert!(status.success(), "Java consumer failed: {status:?}");
        // The reader thread ends at the end of the output, after the last line.
        self.lines.iter().collect()
    }
}

impl Drop for JavaConsumer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn grpc(s: &TestServer) -> MessagingServiceClient<tonic::transport::Channel> {
    MessagingServiceClient::connect(s.base.clone())
        .await
        .expect("gRPC connect")
}

/// A server on the demo registry with its topic on both brokers, under a fresh prefix; the
/// topic's name on the cluster.
async fn server(name: &str) -> (TestServer, String) {
    let prefix = format!("{name}-{}-", unique_suffix());
    let mut config = config(None);
    use_rocketmq(&mut config, &prefix);
    (TestServer::with_config(config).await, format!("{prefix}{TOPIC}"))
}

/// REST and gRPC produces reach a Java consumer with the same body, keys, msgId and a born
/// time inside the request; an orderId picks the queue a Java producer's hash selector picks;
/// delayLevel 2 arrives 5 s after its send, a deliveryTimestamp at its time (each within 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_mqproxy_produces_a_java_consumer_reads() {
    if skip_without_apache() {
        return;
    }
    let (s, remote) = server("java-in").await;
    let java = JavaConsumer::start(&remote, &format!("java-in-{}", unique_suffix()), 5, 60);

    let before = now_ms();
    let rest = s
        .post(
            "/mq/produce",
            &[
                ("producer", PRODUCER),
                ("message", "rest"),
                ("keys", "k1 k2"),
                ("clientIp", "198.51.100.23"),
            ],
        )
        .await;
    let after = now_ms();
    assert_eq!(rest["status"], 200, "{rest}");
    let mut client = grpc(&s).await;
    let via_grpc = client
        .produce(pb::ProduceRequest {
            producer: PRODUCER.into(),
            body: b"grpc".to_vec(),
            keys: Some("g1".into()),
            ..Default::default()
        })
        .await
        .expect("gRPC produce")
        .into_inner()
        .result
        .expect("send result");
    let delayed = s
        .post(
            "/mq/produce",
            &[("producer", PRODUCER), ("message", "delayLevel 2"), ("delayLevel", "2")],
        )
        .await;
    assert_eq!(delayed["status"], 200, "{delayed}");
    let delayed_sent = now_ms();
    let at = now_ms() + 3_000;
    let timer = s
        .post(
            "/mq/produce",
            &[
                ("producer", PRODUCER),
                ("message", "timer"),
                ("deliveryTimestamp", &at.to_string()),
            ],
        )
        .await;
    assert_eq!(timer["status"], 200, "{timer}");
    let ordered = s
        .post(
            "/mq/produce",
            &[("producer", PRODUCER), ("message", "ordered"), ("orderId", "order-42")],
        )
        .await;
    assert_eq!(ordered["status"], 200, "{ordered}");

    let got = java.take(5, Duration::from_secs(30));
    let m = &got["rest"];
    assert_eq!(m["msgId"], rest["result"]["msgId"], "{m}");
    assert_eq!(m["keys"], "k1 k2");
    // The producing client's address, as the documented user property.
    assert_eq!(m["userProperties"]["CLIENT_IP"], "198.51.100.23", "{m}");
    let born = m["bornTimestamp"].as_i64().expect("born");
    assert!(
        (before..=after).contains(&born),
        "born {born} within the request [{before}, {after}]"
    );
    assert_eq!(m["brokerName"], rest["result"]["messageQueue"]["brokerName"]);
    assert_eq!(m["queueId"], rest["result"]["messageQueue"]["queueId"]);
    let g = &got["grpc"];
    assert_eq!(g["msgId"].as_str(), Some(via_grpc.msg_id.as_str()), "{g}");
    assert_eq!(g["keys"], "g1");
    assert_eq!(
        g["userProperties"]["CLIENT_IP"], "127.0.0.1",
        "the gRPC caller's address: {g}"
    );

    let late = got["delayLevel 2"]["arrivedAt"].as_i64().expect("arrival") - delayed_sent;
    assert!(
        (4_000..=6_000).contains(&late),
        "delayLevel 2 arrived {late} ms after its send"
    );
    // The broker's timer wheel has slots of `timerPrecisionMs` (1000 ms, its default, which
    // scripts/rocketmq-apache.sh keeps as users run it): a message due at T sits in the slot
    // starting at T rounded down and is dequeued once the clock has passed that slot's end, so
    // it arrives up to one slot after T, plus the dequeue and the consumer's pull.
    const TIMER_PRECISION_MS: i64 = 1_000;
    let late = got["timer"]["arrivedAt"].as_i64().expect("arrival") - at;
    assert!(
        (-100..=TIMER_PRECISION_MS + 500).contains(&late),
        "the timer message arrived {late} ms after its deliveryTimestamp"
    );

    let o = &got["ordered"];
    let java_sent = java_produce(&remote, 1, "java-ordered-", "-", "-", Some("order-42"));
    assert_eq!(
        (&o["brokerName"], &o["queueId"]),
        (&java_sent[0]["brokerName"], &java_sent[0]["queueId"]),
        "the queue of orderId order-42: mqproxy's and the Java hash selector's"
    );
}

/// What a Java producer sends (tag, keys, user properties) mqproxy delivers over REST and gRPC
/// with the same body and msgId.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_java_producer_sends_mqproxy_delivers() {
    if skip_without_apache() {
        return;
    }
    let (s, remote) = server("java-out").await;
    let sent = java_produce(&remote, 6, "java-", "jk1 jk2", "color=blue,size=2", None);
    let want: HashMap<String, String> = sent
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("java-{i}"), v["msgId"].as_str().expect("msgId").to_owned()))
        .collect();

    // REST, a clustering consumer.
    let mut rest = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while rest.len() < want.len() && std::time::Instant::now() < deadline {
        let v = s.fetch(CLUSTERING, None).await;
        for m in v["result"]["msgList"].as_array().cloned().unwrap_or_default() {
            rest.insert(
                m["message"].as_str().unwrap_or_default().to_owned(),
                m["messageId"].as_str().unwrap_or_default().to_owned(),
            );
        }
        match v["result"]["requestId"].as_str() {
            Some(r) => {
                let ack = s
                    .post(
                        "/mq/ack",
                        &[("topic", TOPIC), ("consumer", CLUSTERING), ("requestId", r)],
                    )
                    .await;
                assert_eq!(ack["status"], 200, "{ack}");
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(rest, want, "REST: body -> msgId");
    // Each Java msgId (28 bytes on an IPv6 host, 16 on IPv4) also names its message for a
    // retry, on whichever broker it is (six messages in turn over eight queues: both).
    for id in want.values() {
        let queued = s
            .post(
                "/admin/consumer/config",
                &[("consumer", CLUSTERING), ("retryMsgId", id)],
            )
            .await;
        assert_eq!(queued["status"], 200, "{queued}");
    }
    let mut retried = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while retried.len() < want.len() {
        assert!(std::time::Instant::now() < deadline, "retried so far: {retried:?}");
        let v = s.fetch(CLUSTERING, None).await;
        for m in v["result"]["retryMsgList"].as_array().cloned().unwrap_or_default() {
            retried.insert(
                m["message"].as_str().unwrap_or_default().to_owned(),
                m["messageId"].as_str().unwrap_or_default().to_owned(),
            );
        }
        if let Some(r) = v["result"]["requestId"].as_str() {
            s.post(
                "/mq/ack",
                &[("topic", TOPIC), ("consumer", CLUSTERING), ("requestId", r)],
            )
            .await;
        }
    }
    assert_eq!(retried, want, "retry: body -> msgId");

    // gRPC Fetch, the broadcast consumer (its own offsets).
    let mut client = grpc(&s).await;
    let mut via_grpc = HashMap::new();
    let target = pb::ConsumeTarget {
        topic: TOPIC.into(),
        consumer: BROADCAST.into(),
        client_id: Some("java-out".into()),
        lite_topic: None,
    };
    for _ in 0..200 {
        let f = client
            .fetch(pb::FetchRequest {
                target: Some(target.clone()),
                ..Default::default()
            })
            .await
            .expect("gRPC fetch")
            .into_inner();
        for m in &f.messages {
            via_grpc.insert(String::from_utf8_lossy(&m.body).into_owned(), m.message_id.clone());
        }
        if let Some(r) = f.request_id {
            client
                .ack(pb::AckRequest {
                    target: Some(target.clone()),
                    request_id: r,
                })
                .await
                .expect("gRPC ack");
        }
        if via_grpc.len() >= want.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(via_grpc, want, "gRPC: body -> msgId");
}

/// The clustering consumer's messages (pulled and acknowledged) until `n` came, sorted.
async fn drain_sorted(s: &TestServer, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while got.len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} messages via mqproxy: {got:?}",
            got.len()
        );
        let more = s.drain(CLUSTERING, None).await;
        if more.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        got.extend(more);
    }
    got.sort();
    got
}

/// A Java consumer group and an mqproxy consumer of the same name keep their own offsets: each
/// reads everything once, and what one commits never moves the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_java_group_and_an_mqproxy_consumer_of_one_name_keep_their_offsets() {
    if skip_without_apache() {
        return;
    }
    let (s, remote) = server("same-name").await;
    java_produce(&remote, 6, "old-", "-", "-", None);
    let first = JavaConsumer::start(&remote, CLUSTERING, 6, 60);
    assert_eq!(first.take(6, Duration::from_secs(30)).len(), 6);
    assert!(first.finish().is_empty(), "nothing beyond the 6");

    let ours = drain_sorted(&s, 6).await;
    assert_eq!(
        ours,
        (0..6).map(|i| format!("old-{i}")).collect::<Vec<_>>(),
        "mqproxy reads all"
    );

    // Three more: each side reads exactly those, from where it stopped (the Java consumer runs
    // until nothing came for 10 s, so anything it read again would show).
    java_produce(&remote, 3, "new-", "-", "-", None);
    let again = JavaConsumer::start(&remote, CLUSTERING, 100, 10);
    let mut java_new: Vec<String> = again
        .finish()
        .iter()
        .map(|v| v["body"].as_str().unwrap_or_default().to_owned())
        .collect();
    java_new.sort();
    let want = ["new-0", "new-1", "new-2"];
    assert_eq!(java_new, want, "the Java group's offsets held");
    assert_eq!(drain_sorted(&s, 3).await, want, "mqproxy's offsets held");
    assert!(s.drain(CLUSTERING, None).await.is_empty());
}

/// Lite topics on the broker's LMQ: what mqproxy produces with `liteTopics` a Java LMQ pull
/// consumer reads from queue 0 of `%LMQ%<parent>$<lite>` (each message once, with the msgId
/// mqproxy answered); a Java producer's message dispatched to the same LMQ reaches mqproxy's
/// `liteTopic` consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lite_topics_are_the_brokers_lmq_both_ways() {
    if skip_without_apache() {
        return;
    }
    let (s, remote) = server("lite").await;
    let lite = format!("session_{}", unique_suffix().replace('-', "_"));
    let lmq = format!("%LMQ%{remote}${lite}");
    let mut sent = HashMap::new();
    for i in 0..4 {
        let body = format!("reply-{i}");
        let v = s
            .post(
                "/mq/produce",
                &[("producer", PRODUCER), ("message", &body), ("liteTopics", &lite)],
            )
            .await;
        assert_eq!(v["status"], 200, "{v}");
        sent.insert(body, v["result"]["msgId"].as_str().expect("msgId").to_owned());
    }
    let out = Command::new(script())
        .args(["tool", "lmq-consume", &namesrv_addr(), &remote, &lmq])
        .args([format!("lmq-java-{}", unique_suffix()), "4".into(), "20".into()])
        .stderr(Stdio::inherit())
        .output()
        .expect("run the Java tool");
    let read = parse_lines(&out.stdout);
    assert!(out.status.success(), "the Java LMQ consumer read {read:?}");
    let got: HashMap<String, String> = read
        .iter()
        .map(|v| {
            assert!(
                v["dispatch"].as_str().is_some_and(|d| d.split(',').any(|t| t == lmq)),
                "{v}"
            );
            (
                v["body"].as_str().unwrap_or_default().to_owned(),
                v["msgId"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(got, sent, "each message once, with its msgId");

    // The other way: a Java producer's message with the LMQ dispatch property.
    let props = format!("INNER_MULTI_DISPATCH={lmq}");
    let java = java_produce(&remote, 1, "from-java", "-", &props, None);
    let mut bodies = Vec::new();
    for _ in 0..20 {
        let v = s
            .get(
                "/mq/message",
                &[
                    ("topic", TOPIC),
                    ("consumer", CLUSTERING),
                    ("liteTopic", &lite),
                    ("waitMs", "1000"),
                ],
            )
            .await;
        assert_eq!(v["status"], 200, "{v}");
        bodies.extend(bodies_of(&v));
        if let Some(request_id) = v["result"]["requestId"].as_str() {
            let a = s
                .get(
                    "/mq/ack",
                    &[
                        ("topic", TOPIC),
                        ("consumer", CLUSTERING),
                        ("liteTopic", &lite),
                        ("requestId", request_id),
                    ],
                )
                .await;
            assert_eq!(a["status"], 200, "{a}");
        }
        if bodies.len() >= 5 {
            break;
        }
    }
    bodies.sort();
    assert_eq!(
        bodies,
        ["from-java0", "reply-0", "reply-1", "reply-2", "reply-3"],
        "{java:?}"
    );
}
