//! The gRPC service against the real server (same port as REST), with tonic's generated client.

use crate::common::*;
use mqproxy::grpc::pb;
use pb::consume_request::Command;
use pb::consume_response::Event;
use pb::messaging_service_client::MessagingServiceClient;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

async fn channel(s: &TestServer) -> Channel {
    Channel::from_shared(s.base.clone())
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

async fn client(s: &TestServer) -> MessagingServiceClient<Channel> {
    MessagingServiceClient::new(channel(s).await)
}

fn target(consumer: &str, client_id: Option<&str>) -> Option<pb::ConsumeTarget> {
    Some(pb::ConsumeTarget {
        topic: TOPIC.into(),
        consumer: consumer.into(),
        client_id: client_id.map(str::to_owned),
        lite_topic: None,
    })
}

/// An open Consume stream: send acks/unlocks, receive batches.
struct Stream {
    commands: mpsc::Sender<pb::ConsumeRequest>,
    events: tonic::Streaming<pb::ConsumeResponse>,
    /// Batches that arrived while waiting for an ack result.
    pending: std::collections::VecDeque<pb::Batch>,
}

impl Stream {
    async fn open(c: &mut MessagingServiceClient<Channel>, sub: pb::Subscribe) -> Self {
        let (commands, rx) = mpsc::channel(16);
        commands
            .send(pb::ConsumeRequest {
                command: Some(Command::Subscribe(sub)),
            })
            .await
            .expect("subscribe");
        let events = c.consume(ReceiverStream::new(rx)).await.expect("consume").into_inner();
        Self {
            commands,
            events,
            pending: Default::default(),
        }
    }

    /// The next batch (ack results are skipped).
    async fn batch(&mut self, within: Duration) -> Option<pb::Batch> {
        if let Some(b) = self.pending.pop_front() {
            return Some(b);
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.events.next()).await {
                Ok(Some(Ok(pb::ConsumeResponse {
                    event: Some(Event::Batch(b)),
                }))) => return Some(b),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(status))) => panic!("stream failed: {status}"),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    async fn ack(&self, request_id: &str) {
        self.commands
            .send(pb::ConsumeRequest {
                command: Some(Command::Ack(request_id.into())),
            })
            .await
            .expect("ack");
    }

    /// Acks and waits until the server reports the ack applied.
    async fn ack_confirmed(&mut self, request_id: &str) {
        self.ack(request_id).await;
        loop {
            match self.events.next().await {
                Some(Ok(pb::ConsumeResponse {
                    event: Some(Event::AckResult(r)),
                })) => {
                    assert_eq!(r.status, 200, "{r:?}");
                    return;
                }
                Some(Ok(pb::ConsumeResponse {
                    event: Some(Event::Batch(b)),
                })) => self.pending.push_back(b),
                other => panic!("no ack result: {other:?}"),
            }
        }
    }
}

/// A unary Fetch of `consumer` with no options.
async fn fetch_plain(c: &mut MessagingServiceClient<Channel>, consumer: &str) -> pb::FetchResponse {
    c.fetch(pb::FetchRequest {
        target: target(consumer, None),
        ..Default::default()
    })
    .await
    .expect("fetch")
    .into_inner()
}

fn bodies(b: &pb::Batch) -> Vec<String> {
    b.messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect()
}

fn sub(consumer: &str, client_id: Option<&str>, max_in_flight: u32, max_pull: Option<u32>) -> pb::Subscribe {
    pb::Subscribe {
        target: target(consumer, client_id),
        max_in_flight: Some(max_in_flight),
        max_pull_size: max_pull,
        auto_ack: false,
        ..Default::default()
    }
}

/// Produce, ProduceBatch, Fetch, Ack, Unlock: the REST semantics over gRPC.
#[tokio::test]
async fn unary_calls() {
    let s = TestServer::with_toml(&one_queue("")).await;
    let mut c = client(&s).await;
    let r = c
        .produce(pb::ProduceRequest {
            producer: PRODUCER.into(),
            body: b"one".to_vec(),
            ..Default::default()
        })
        .await
        .expect("produce")
        .into_inner()
        .result
        .expect("result");
    assert_eq!(
        (r.send_status.as_str(), r.msg_id.len(), r.queue_offset),
        ("SEND_OK", 32, 0)
    );
    let batch = c
        .produce_batch(pb::ProduceBatchRequest {
            producer: PRODUCER.into(),
            bodies: vec![b"two".to_vec(), vec![]],
            client_ip: None,
        })
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(batch.results.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 400]);
    let f = fetch_plain(&mut c, "c").await;
    assert_eq!(f.status, "FOUND");
    assert_eq!(
        f.messages.iter().map(|m| m.body.clone()).collect::<Vec<_>>(),
        [b"one".to_vec(), b"two".to_vec()]
    );
    assert_eq!(f.messages[0].message_id, r.msg_id);
    let rid = f.request_id.expect("request id");
    let u = c
        .unlock(pb::UnlockRequest {
            target: target("c", None),
            request_id: rid.clone(),
        })
        .await
        .expect("unlock")
        .into_inner();
    assert!(u.unlocked, "{u:?}");
    let again = fetch_plain(&mut c, "c").await;
    assert_eq!(again.messages.len(), 2);
    let a = c
        .ack(pb::AckRequest {
            target: target("c", None),
            request_id: again.request_id.expect("rid"),
        })
        .await
        .expect("ack")
        .into_inner();
    assert!(a.committed, "{a:?}");
    let empty = fetch_plain(&mut c, "c").await;
    assert_eq!(empty.status, "NO_NEW_MSG");
}

/// One error table: the same text as REST, mapped to gRPC codes.
#[tokio::test]
async fn errors_map_to_grpc_codes() {
    let s = TestServer::start().await;
    let mut c = client(&s).await;
    let e = c
        .produce(pb::ProduceRequest {
            producer: "nobody".into(),
            body: b"x".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (tonic::Code::NotFound, "producer:nobody haven't registered")
    );
    let rest = s.post("/mq/produce", &[("producer", "nobody"), ("message", "x")]).await;
    assert_eq!(rest["message"], e.message());
    let e = c
        .produce(pb::ProduceRequest {
            producer: PRODUCER.into(),
            body: b"x".to_vec(),
            delay_level: Some(19),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = c
        .ack(pb::AckRequest {
            target: target(CLUSTERING, None),
            request_id: "forged".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = c
        .fetch(pb::FetchRequest {
            target: target(BROADCAST, None),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let (tx, rx) = mpsc::channel(1);
    tx.send(pb::ConsumeRequest {
        command: Some(Command::Subscribe(sub("nobody", None, 1, None))),
    })
    .await
    .expect("send");
    let e = c.consume(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    // A subscription outside its ranges is refused, naming the field's range (not clamped).
    for (in_flight, pull) in [(1025, None), (1, Some(129))] {
        let (tx, rx) = mpsc::channel(1);
        tx.send(pb::ConsumeRequest {
            command: Some(Command::Subscribe(sub(CLUSTERING, None, in_flight, pull))),
        })
        .await
        .expect("send");
        let e = c.consume(ReceiverStream::new(rx)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{in_flight} {pull:?}");
        let named = if pull.is_some() { "maxPullSize" } else { "maxInFlight" };
        assert!(e.message().contains(named), "{}", e.message());
    }
}

/// gRPC clients asking for a service or method the server lacks get `UNIMPLEMENTED`, also
/// on paths that look like REST ones (the content type decides, not the path).
#[tokio::test]
async fn unknown_grpc_methods_are_unimplemented() {
    let s = TestServer::start().await;
    let channel = channel(&s).await;
    for path in [
        "/mqproxy.v1.NoSuchService/Fetch",
        "/mqproxy.v1.MessagingService/NoSuchMethod",
        "/mq/nope",
    ] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.expect("ready");
        let codec = tonic_prost::ProstCodec::<pb::FetchRequest, pb::FetchResponse>::default();
        let e = grpc
            .unary(
                tonic::Request::new(pb::FetchRequest::default()),
                path.parse().expect("path"),
                codec,
            )
            .await
            .expect_err(path);
        assert_eq!(e.code(), tonic::Code::Unimplemented, "{path}: {e:?}");
    }
}

/// A stream delivers the moment messages exist (no polling interval); latency in the log.
#[tokio::test]
async fn stream_delivers_as_messages_are_produced() {
    let s = TestServer::with_toml(&one_queue("")).await;
    let mut c = client(&s).await;
    let mut stream = Stream::open(&mut c, sub("c", None, 4, None)).await;
    let mut latencies = Vec::new();
    for i in 0..200 {
        let sent = Instant::now();
        s.produce(&format!("m{i}")).await;
        let batch = stream.batch(Duration::from_secs(5)).await.expect("delivered");
        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(bodies(&batch), [format!("m{i}")]);
        stream.ack(&batch.request_id).await;
    }
    latencies.sort_by(f64::total_cmp);
    let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    eprintln!(
        "produce->deliver latency over REST produce + gRPC stream (debug build): p50 {:.2} ms, p99 {:.2} ms",
        p(0.5),
        p(0.99)
    );
}

/// Never more unacknowledged batches than max_in_flight; an ack frees credit.
#[tokio::test]
async fn credit_limit_is_held() {
    let s = TestServer::with_toml(&one_queue("max_pull_size=1\n")).await;
    for i in 0..5 {
        s.produce(&format!("m{i}")).await;
    }
    // Two queues would make the test depend on queue choice; one queue, one message a batch.
    let mut c = client(&s).await;
    let mut stream = Stream::open(&mut c, sub("c", None, 2, None)).await;
    let first = stream.batch(Duration::from_secs(5)).await.expect("first");
    // The queue is locked by the first batch, so the second comes only after the ack... with
    // one queue the credit limit and the queue lock coincide; use Fetch to see the lock.
    assert_eq!(bodies(&first), ["m0"]);
    assert!(
        stream.batch(Duration::from_millis(300)).await.is_none(),
        "the queue's lock holds the rest"
    );
    stream.ack(&first.request_id).await;
    let second = stream.batch(Duration::from_secs(5)).await.expect("second");
    assert_eq!(bodies(&second), ["m1"]);
}

/// With 4 queues (per broker) and max_in_flight 2, a stream holds exactly 2 batches until it acks.
#[tokio::test]
async fn credit_limit_across_queues() {
    let s = TestServer::start().await;
    // Two messages on every queue of the topic.
    for i in 0..8 * brokers() {
        s.produce(&format!("m{i}")).await;
    }
    let mut c = client(&s).await;
    let mut stream = Stream::open(&mut c, sub(CLUSTERING, None, 2, None)).await;
    let a = stream.batch(Duration::from_secs(5)).await.expect("a");
    let b = stream.batch(Duration::from_secs(5)).await.expect("b");
    assert!(
        stream.batch(Duration::from_millis(300)).await.is_none(),
        "credit 2 is held"
    );
    stream.ack(&a.request_id).await;
    let c3 = stream.batch(Duration::from_secs(5)).await.expect("third after an ack");
    let all: HashSet<String> = [a, b, c3].iter().flat_map(bodies).collect();
    assert_eq!(all.len(), 6, "three distinct queues, two messages each");
}

/// A dropped stream's unacknowledged batch goes to another consumer at once.
#[tokio::test]
async fn dropped_stream_redelivers_at_once() {
    let s = TestServer::with_toml(&one_queue("")).await;
    s.produce("x").await;
    let mut c = client(&s).await;
    let mut first = Stream::open(&mut c, sub("c", None, 1, None)).await;
    let batch = first.batch(Duration::from_secs(5)).await.expect("batch");
    assert_eq!(bodies(&batch), ["x"]);
    drop(first);
    let started = Instant::now();
    let mut second = Stream::open(&mut c, sub("c", None, 1, None)).await;
    let again = second.batch(Duration::from_secs(10)).await.expect("redelivered");
    assert_eq!(bodies(&again), ["x"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "not at lock expiry (300 s)"
    );
}

/// A batch not acknowledged within the lock timeout comes again on the same stream.
#[tokio::test]
async fn lock_expiry_redelivers_on_the_stream() {
    let s = TestServer::with_toml(&one_queue("consume_timeout_ms=10000\n")).await;
    s.produce("x").await;
    let mut c = client(&s).await;
    let mut stream = Stream::open(&mut c, sub("c", None, 1, None)).await;
    let first = stream.batch(Duration::from_secs(5)).await.expect("first");
    let started = Instant::now();
    let again = stream
        .batch(Duration::from_secs(20))
        .await
        .expect("again after the lock timeout");
    assert!(started.elapsed() >= Duration::from_secs(9));
    assert_eq!(bodies(&again), bodies(&first));
    assert_ne!(again.request_id, first.request_id);
}

/// Broadcast: each clientId's stream gets every message.
#[tokio::test]
async fn broadcast_streams_each_get_all() {
    let s = TestServer::start().await;
    let mut c = client(&s).await;
    let mut a = Stream::open(&mut c, sub(BROADCAST, Some("a"), 4, None)).await;
    let mut b = Stream::open(&mut c, sub(BROADCAST, Some("b"), 4, None)).await;
    for i in 0..20 {
        s.produce(&format!("m{i}")).await;
    }
    for stream in [&mut a, &mut b] {
        let mut got = HashSet::new();
        while got.len() < 20 {
            let batch = stream.batch(Duration::from_secs(5)).await.expect("batch");
            got.extend(bodies(&batch));
            stream.ack(&batch.request_id).await;
        }
        assert_eq!(got.len(), 20);
    }
}

/// REST -> gRPC and gRPC -> REST.
#[tokio::test]
async fn cross_protocol() {
    let s = TestServer::with_toml(&one_queue("")).await;
    let mut c = client(&s).await;
    let id = s.produce("from rest").await["result"]["msgId"]
        .as_str()
        .expect("id")
        .to_owned();
    let f = fetch_plain(&mut c, "c").await;
    assert_eq!(
        (f.messages[0].message_id.as_str(), f.messages[0].body.as_slice()),
        (id.as_str(), b"from rest".as_slice())
    );
    c.ack(pb::AckRequest {
        target: target("c", None),
        request_id: f.request_id.expect("rid"),
    })
    .await
    .expect("ack");
    c.produce(pb::ProduceRequest {
        producer: PRODUCER.into(),
        body: "from grpc ✓".as_bytes().to_vec(),
        ..Default::default()
    })
    .await
    .expect("produce");
    assert_eq!(s.drain("c", None).await, ["from grpc ✓"]);
}

/// PAUSED makes a stream wait, not fail; resuming delivers.
#[tokio::test]
async fn paused_stream_waits() {
    let s = TestServer::with_toml(&one_queue("")).await;
    s.post("/admin/consumer/config", &[("consumer", "c"), ("pause", "true")])
        .await;
    let mut c = client(&s).await;
    let mut stream = Stream::open(&mut c, sub("c", None, 1, None)).await;
    s.produce("x").await;
    assert!(stream.batch(Duration::from_millis(300)).await.is_none(), "paused");
    s.post("/admin/consumer/config", &[("consumer", "c"), ("pause", "false")])
        .await;
    let batch = stream.batch(Duration::from_secs(5)).await.expect("after resume");
    assert_eq!(bodies(&batch), ["x"]);
}

/// 4 streams of one consumer, 10,000 messages produced over REST: exactly once when acked.
/// Then with one stream killed mid-way: every message still arrives, and the duplicates come
/// only from the killed stream's unacknowledged batches.
#[tokio::test]
async fn four_streams_exactly_once_and_a_killed_stream() {
    for kill in [false, true] {
        let s = TestServer::start().await;
        let total = 10_000;
        let bodies_all: Vec<String> = (0..total).map(|i| format!("m{i}")).collect();
        for chunk in bodies_all.chunks(500) {
            let batch = serde_json::to_string(chunk).expect("json");
            assert_eq!(
                s.post("/mq/produce/batch", &[("producer", PRODUCER), ("messages", &batch)])
                    .await["status"],
                200
            );
        }
        let mut c = client(&s).await;
        let consume_started = Instant::now();
        let mut handles = Vec::new();
        for n in 0..4 {
            let mut stream = Stream::open(&mut c, sub(CLUSTERING, None, 4, None)).await;
            let doomed = kill && n == 0;
            handles.push(tokio::spawn(async move {
                let (mut acked, mut unacked) = (Vec::new(), Vec::new());
                let mut batches = 0;
                while let Some(batch) = stream.batch(Duration::from_secs(3)).await {
                    batches += 1;
                    if doomed && batches > 5 {
                        // Killed mid-way: this batch and those already received are never acked.
                        unacked.extend(bodies(&batch));
                        unacked.extend(stream.pending.iter().flat_map(bodies));
                        break;
                    }
                    acked.extend(bodies(&batch));
                    if doomed {
                        // Its acks count only once the server applied them (the kill would
                        // lose an ack still on the wire, and rightly redeliver that batch).
                        stream.ack_confirmed(&batch.request_id).await;
                    } else {
                        stream.ack(&batch.request_id).await;
                    }
                }
                (acked, unacked)
            }));
        }
        let mut count: HashMap<String, usize> = HashMap::new();
        let mut killed_unacked = HashSet::new();
        for (n, h) in handles.into_iter().enumerate() {
            let (acked, unacked) = h.await.expect("stream task");
            for b in acked.iter().chain(&unacked) {
                *count.entry(b.clone()).or_default() += 1;
            }
            if kill && n == 0 {
                killed_unacked.extend(unacked);
            }
        }
        eprintln!(
            "4 streams consumed {total} messages in {:?} (kill={kill}, incl. 3 s idle wait)",
            consume_started.elapsed()
        );
        assert_eq!(count.len(), total, "every message delivered (kill={kill})");
        let dups: Vec<&String> = count.iter().filter(|(_, n)| **n > 1).map(|(b, _)| b).collect();
        if kill {
            assert!(
                dups.iter().all(|d| killed_unacked.contains(*d)),
                "duplicates only from the killed stream's batches"
            );
        } else {
            assert!(dups.is_empty(), "exactly once: {} duplicates", dups.len());
        }
    }
}

/// The delay scheduler wakes a waiting stream when a delayed message falls due.
#[tokio::test]
async fn delayed_message_wakes_the_stream_when_due() {
    let s = TestServer::with_toml(&one_queue("")).await;
    let mut c = client(&s).await;
    let mut stream = Stream::open(&mut c, sub("c", None, 1, None)).await;
    let sent = Instant::now();
    s.post(
        "/mq/produce",
        &[("producer", PRODUCER), ("message", "later"), ("delayLevel", "1")],
    )
    .await;
    let batch = stream.batch(Duration::from_secs(10)).await.expect("delivered when due");
    assert!(sent.elapsed() >= Duration::from_millis(900), "not before its delay");
    assert_eq!(bodies(&batch), ["later"]);
}

/// The standard health service answers SERVING for the messaging service.
#[tokio::test]
async fn health_service_reports_serving() {
    let s = TestServer::start().await;
    let channel = channel(&s).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = eventually(Duration::from_secs(5), "SERVING", || {
        let mut health = health.clone();
        async move {
            let r = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "mqproxy.v1.MessagingService".into(),
                })
                .await
                .ok()?
                .into_inner();
            (r.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32).then_some(r.status)
        }
    })
    .await;
    assert_eq!(status, 1);
    let _ = health
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .expect("overall");
}

/// Fetch takes the newer pull parameters (max_pull_size, consume_timeout, pull_timeout) with
/// the REST ranges: a smaller batch, a lock of its own, INVALID_ARGUMENT naming the parameter
/// and its range; a Consume subscription out of range is refused at once too.
#[tokio::test]
async fn fetch_takes_the_newer_pull_parameters() {
    let s = TestServer::with_toml(&one_queue("")).await;
    let mut c = client(&s).await;
    for body in ["a", "b", "c"] {
        s.produce(body).await;
    }
    let f = c
        .fetch(pb::FetchRequest {
            target: target("c", None),
            max_pull_size: Some(2),
            consume_timeout: Some(10),
            pull_timeout: Some(1),
            ..Default::default()
        })
        .await
        .expect("fetch")
        .into_inner();
    assert_eq!(f.messages.len(), 2, "{f:?}");
    let started = Instant::now();
    let again = eventually(
        Duration::from_secs(20),
        "redelivery after the fetch's own lock time",
        || {
            let mut c = c.clone();
            async move {
                let f = fetch_plain(&mut c, "c").await;
                (f.status == "FOUND").then_some(f)
            }
        },
    )
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "not before the 10 s lock expired"
    );
    assert_eq!(again.messages.len(), 3, "the whole queue from the uncommitted offset");
    for (req, name, range) in [
        (
            pb::FetchRequest {
                consume_timeout: Some(9),
                ..Default::default()
            },
            "consumeTimeout",
            "between 10 and 129600",
        ),
        (
            pb::FetchRequest {
                pull_timeout: Some(61),
                ..Default::default()
            },
            "pullTimeout",
            "between 1 and 60",
        ),
        (
            pb::FetchRequest {
                max_pull_size: Some(0),
                ..Default::default()
            },
            "maxPullSize",
            "between 1 and 128",
        ),
    ] {
        let refused = c
            .fetch(pb::FetchRequest {
                target: target("c", None),
                ..req
            })
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(
            refused.message().contains(name) && refused.message().contains(range),
            "{refused:?}"
        );
    }
    let (tx, rx) = mpsc::channel(1);
    tx.send(pb::ConsumeRequest {
        command: Some(Command::Subscribe(pb::Subscribe {
            consume_timeout: Some(200_000),
            ..sub("c", None, 1, None)
        })),
    })
    .await
    .expect("subscribe");
    let refused = match c.consume(ReceiverStream::new(rx)).await {
        Err(status) => status,
        Ok(stream) => {
            let mut stream = stream.into_inner();
            stream.next().await.expect("an answer").expect_err("refused")
        }
    };
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("consumeTimeout"), "{refused:?}");
}

/// Fetch with `wait_ms` long-polls: it answers with a message produced while it waits.
#[tokio::test]
async fn fetch_long_polls_with_wait_ms() {
    let s = TestServer::with_toml(&one_queue("")).await;
    let mut c = client(&s).await;
    let started = Instant::now();
    let (fetched, _) = tokio::join!(
        c.fetch(pb::FetchRequest {
            target: target("c", None),
            wait_ms: Some(20_000),
            ..Default::default()
        }),
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.produce("late").await
        }
    );
    let fetched = fetched.expect("fetch").into_inner();
    assert_eq!(fetched.status, "FOUND", "{fetched:?}");
    assert_eq!(fetched.messages.len(), 1);
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    let refused = c
        .fetch(pb::FetchRequest {
            target: target("c", None),
            wait_ms: Some(30_001),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert!(
        refused.message().contains("waitMs must be between 0 and 30000"),
        "{refused:?}"
    );
}

/// POP over gRPC: Fetch with `pop` takes consecutive segments of one queue while the first is
/// in flight; a Consume stream with `pop` holds several batches of that one queue at once.
#[tokio::test]
async fn pop_fetch_and_stream_share_one_queue() {
    let s = TestServer::with_toml(&one_queue("max_pull_size=2\n")).await;
    for i in 0..8 {
        s.produce(&format!("m{i}")).await;
    }
    let mut c = client(&s).await;
    let pop_fetch = |c: &mut MessagingServiceClient<Channel>| {
        let mut c = c.clone();
        async move {
            c.fetch(pb::FetchRequest {
                target: target("c", None),
                pop: true,
                ..Default::default()
            })
            .await
            .expect("fetch")
            .into_inner()
        }
    };
    let text = |m: &[pb::Message]| -> Vec<String> {
        m.iter()
            .map(|m| String::from_utf8_lossy(&m.body).into_owned())
            .collect()
    };
    let first = pop_fetch(&mut c).await;
    let second = pop_fetch(&mut c).await;
    assert_eq!(text(&first.messages), ["m0", "m1"]);
    assert_eq!(text(&second.messages), ["m2", "m3"], "not blocked by the first segment");
    let refused = c
        .fetch(pb::FetchRequest {
            target: target("c", None),
            ..Default::default()
        })
        .await
        .expect_err("no mixing");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    for r in [&second, &first] {
        let a = c
            .ack(pb::AckRequest {
                target: target("c", None),
                request_id: r.request_id.clone().expect("rid"),
            })
            .await
            .expect("ack")
            .into_inner();
        assert_eq!(
            a.committed,
            std::ptr::eq(r, &first),
            "the offset moves with the first: {a:?}"
        );
    }

    let mut stream = Stream::open(
        &mut c,
        pb::Subscribe {
            pop: true,
            ..sub("c", None, 2, None)
        },
    )
    .await;
    let a = stream.batch(Duration::from_secs(10)).await.expect("a batch");
    let b = stream
        .batch(Duration::from_secs(10))
        .await
        .expect("a second batch of the one queue");
    assert_eq!(
        (bodies(&a), bodies(&b)),
        (vec!["m4".into(), "m5".into()], vec!["m6".into(), "m7".into()])
    );
    stream.ack_confirmed(&b.request_id).await;
    stream.ack_confirmed(&a.request_id).await;
    let offsets = s.get("/admin/consumer/offsets", &[("consumer", "c")]).await;
    assert_eq!(offsets["result"]["lag"], 0, "{offsets}");
}
