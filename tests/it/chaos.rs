//! Consumer chaos: 8 consumers (4 REST pullers, 4 gRPC Consume streams) are killed and
//! restarted at random while 100,000 messages flow in. Checks: every message answered 200 is
//! delivered at least once, and a message comes again only after a delivery whose batch was
//! not acknowledged (a batch whose ack was confirmed committed is never delivered again).
//!
//! Ignored by default (about a minute); `scripts/test` runs it. `MQPROXY_CHAOS_MESSAGES` sets
//! the message count (default 100000).

use crate::common::*;
use mqproxy::grpc::pb;
use pb::consume_request::Command;
use pb::consume_response::Event;
use pb::messaging_service_client::MessagingServiceClient;
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const QUEUES: u32 = 8;
const BATCH: usize = 100;

/// What the consumers saw, in the order they saw it.
#[derive(Default)]
struct Log {
    /// Per message: the batches that delivered it, in order.
    deliveries: HashMap<u64, Vec<u64>>,
    /// Batches whose ack was confirmed as committed.
    committed: HashSet<u64>,
    next_batch: u64,
    kills: u64,
    /// Batches received over REST and over gRPC streams.
    rest_batches: u64,
    grpc_batches: u64,
}

impl Log {
    fn delivered(&mut self, grpc: bool, bodies: impl IntoIterator<Item = String>) -> u64 {
        if grpc {
            self.grpc_batches += 1;
        } else {
            self.rest_batches += 1;
        }
        let batch = self.next_batch;
        self.next_batch += 1;
        for body in bodies {
            let seq = body
                .strip_prefix('m')
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("unexpected body {body:?}"));
            self.deliveries.entry(seq).or_default().push(batch);
        }
        batch
    }

    /// An ack answer for `batch`: committed when the message says so ("ok ...", or "lock
    /// expired, ok ..." when nobody took the queue since).
    fn acked(&mut self, batch: u64, message: &str) {
        if message.starts_with("ok ") || message.starts_with("lock expired, ok ") {
            self.committed.insert(batch);
        }
    }
}

fn chaos_toml() -> String {
    format!(
        "[[topic]]\nname=\"{TOPIC}\"\nqueues={QUEUES}\n[[producer]]\nname=\"{PRODUCER}\"\ntopic=\"{TOPIC}\"\n\
         [[consumer]]\nname=\"c\"\ntopic=\"{TOPIC}\"\nconsume_timeout_ms=10000\nmax_pull_size=32\n"
    )
}

/// One REST consumer: pulls, acknowledging the previous batch with the next pull.
async fn rest_consumer(base: String, log: Arc<Mutex<Log>>) {
    let client = reqwest::Client::new();
    let mut previous: Option<(u64, String)> = None;
    loop {
        let mut query = vec![("topic", TOPIC.to_owned()), ("consumer", "c".to_owned())];
        if let Some((_, rid)) = &previous {
            query.push(("requestId", rid.clone()));
        }
        let Ok(resp) = client.get(format!("{base}/mq/message")).query(&query).send().await else {
            continue;
        };
        let Ok(v) = resp.json::<serde_json::Value>().await else {
            continue;
        };
        assert_eq!(v["status"], 200, "{v}");
        {
            let mut log = log.lock().expect("log");
            if let Some((batch, _)) = previous.take() {
                log.acked(batch, v["result"]["ackInfo"]["message"].as_str().unwrap_or_default());
            }
            let bodies = bodies_of(&v);
            if !bodies.is_empty() {
                let batch = log.delivered(false, bodies);
                previous = Some((batch, rid(&v)));
            }
        }
        if previous.is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One gRPC consumer: a Consume stream with one batch in flight, acknowledged explicitly.
async fn grpc_consumer(base: String, log: Arc<Mutex<Log>>) {
    let Ok(mut client) = MessagingServiceClient::connect(base).await else {
        return;
    };
    let (commands, rx) = tokio::sync::mpsc::channel(4);
    let subscribe = pb::ConsumeRequest {
        command: Some(Command::Subscribe(pb::Subscribe {
            target: Some(pb::ConsumeTarget {
                topic: TOPIC.into(),
                consumer: "c".into(),
                client_id: None,
                lite_topic: None,
            }),
            max_in_flight: Some(1),
            ..Default::default()
        })),
    };
    if commands.send(subscribe).await.is_err() {
        return;
    }
    let Ok(events) = client.consume(tokio_stream::wrappers::ReceiverStream::new(rx)).await else {
        return;
    };
    let mut events = events.into_inner();
    let mut waiting: Option<u64> = None;
    while let Ok(Some(event)) = events.message().await {
        match event.event {
            Some(Event::Batch(b)) => {
                let bodies = b
                    .messages
                    .iter()
                    .chain(&b.retry_messages)
                    .map(|m| String::from_utf8_lossy(&m.body).into_owned());
                let batch = log.lock().expect("log").delivered(true, bodies);
                waiting = Some(batch);
                let ack = pb::ConsumeRequest {
                    command: Some(Command::Ack(b.request_id)),
                };
                if commands.send(ack).await.is_err() {
                    return;
                }
            }
            Some(Event::AckResult(r)) => {
                // One batch in flight: this answers the last batch's ack.
                if let Some(batch) = waiting.take() {
                    log.lock().expect("log").acked(batch, &r.message);
                }
            }
            None => {}
        }
    }
}

/// Runs consumer instances in one slot, killing each after a random 0.2..2 s.
async fn chaos_slot(base: String, log: Arc<Mutex<Log>>, grpc: bool) {
    loop {
        let instance: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = if grpc {
            Box::pin(grpc_consumer(base.clone(), log.clone()))
        } else {
            Box::pin(rest_consumer(base.clone(), log.clone()))
        };
        let lifetime = Duration::from_millis(rand::rng().random_range(200..2_000));
        // The chaos itself: the instance lives this long, then is dropped mid-whatever (its
        // connections close, no goodbye). Aborting the slot drops its instance too.
        tokio::select! {
            () = instance => {}
            () = tokio::time::sleep(lifetime) => {}
        }
        log.lock().expect("log").kills += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "about a minute; scripts/test runs it"]
async fn killed_consumers_lose_nothing() {
    let total: u64 = std::env::var("MQPROXY_CHAOS_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let mut s = TestServer::with_toml(&chaos_toml()).await;
    let log = Arc::new(Mutex::new(Log::default()));
    let slots: Vec<_> = (0..8)
        .map(|i| tokio::spawn(chaos_slot(s.base.clone(), log.clone(), i % 2 == 1)))
        .collect();

    // Two producers send batches of 100 while the consumers churn.
    let started = std::time::Instant::now();
    let produced = Arc::new(Mutex::new(HashSet::new()));
    let producers: Vec<_> = (0..2u64)
        .map(|p| {
            let (client, base, produced) = (s.client.clone(), s.base.clone(), produced.clone());
            tokio::spawn(async move {
                let mut seq = p * BATCH as u64;
                while seq < total {
                    let bodies: Vec<String> = (seq..(seq + BATCH as u64).min(total))
                        .map(|n| format!("m{n}"))
                        .collect();
                    let messages = serde_json::to_string(&bodies).expect("json");
                    let v = post_json(
                        &client,
                        &format!("{base}/mq/produce/batch"),
                        &[("producer", PRODUCER), ("messages", messages.as_str())],
                    )
                    .await;
                    assert_eq!(v["status"], 200, "{v}");
                    produced
                        .lock()
                        .expect("produced")
                        .extend(seq..(seq + BATCH as u64).min(total));
                    seq += 2 * BATCH as u64;
                }
            })
        })
        .collect();
    for p in producers {
        p.await.expect("producer");
    }
    let produce_s = started.elapsed().as_secs_f64();
    let produced = produced.lock().expect("produced").clone();
    assert_eq!(produced.len() as u64, total);

    eventually(
        Duration::from_secs(300),
        "every message delivered at least once",
        || {
            let log = log.clone();
            let n = produced.len();
            async move { (log.lock().expect("log").deliveries.len() >= n).then_some(()) }
        },
    )
    .await;
    for slot in slots {
        slot.abort();
    }
    // Stopped before the runtime goes: its store closes in a blocking task the runtime's
    // shutdown would cancel.
    s.shutdown().await;

    let log = log.lock().expect("log");
    let missing = produced.iter().filter(|m| !log.deliveries.contains_key(m)).count();
    assert_eq!(missing, 0, "messages never delivered");
    let mut duplicates = 0u64;
    for (message, batches) in &log.deliveries {
        assert!(produced.contains(message), "m{message} was never produced");
        duplicates += batches.len() as u64 - 1;
        // Every delivery but the last came in a batch whose ack was not confirmed.
        for earlier in &batches[..batches.len() - 1] {
            assert!(
                !log.committed.contains(earlier),
                "m{message} came again after its batch {earlier} was acknowledged (deliveries {batches:?})"
            );
        }
    }
    assert!(
        log.rest_batches > 0 && log.grpc_batches > 0,
        "both kinds of consumer took part"
    );
    let deliveries: u64 = log.deliveries.values().map(|b| b.len() as u64).sum();
    println!(
        "chaos: {total} messages produced in {produce_s:.1} s; all delivered in {:.1} s; {} consumer kills; \
         {} batches ({} REST, {} gRPC), {} acknowledged; {deliveries} deliveries, {duplicates} duplicates \
         (all from unacknowledged batches)",
        started.elapsed().as_secs_f64(),
        log.kills,
        log.next_batch,
        log.rest_batches,
        log.grpc_batches,
        log.committed.len(),
    );
}
