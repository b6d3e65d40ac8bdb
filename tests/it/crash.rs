//! Crash rounds: 8 REST and 2 gRPC writers and one consumer against the `mqproxy` binary,
//! `kill -9` at a random moment, restart, repeat. Checks, over all rounds: every message
//! answered 200 (or OK over gRPC) is delivered (lost = 0), and no message of a batch whose ack
//! was answered "ok" is delivered again (committed offsets hold). Duplicates (messages of
//! batches pulled but not acknowledged when the server died) are counted and reported.
//!
//! Ignored by default (it takes a while): `scripts/test` runs it with 3 rounds;
//! `MQPROXY_CRASH_ROUNDS=20 cargo test --release --test it crash:: -- --ignored --nocapture` is the
//! full mode.

use crate::common::*;
use mqproxy::grpc::pb;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_mqproxy");
/// The consumer's lock time (the config's minimum).
const LOCK_MS: u64 = 10_000;

#[derive(Default)]
struct Ledger {
    /// Bodies answered 200 / OK by a produce.
    produced: HashSet<String>,
    /// How often each body was delivered.
    delivered: HashMap<String, u32>,
    /// Bodies of batches whose ack was answered "ok": never to be delivered again.
    acked: HashSet<String>,
    /// Deliveries of acknowledged bodies (a committed offset that did not hold).
    regressions: Vec<String>,
}

impl Ledger {
    fn deliver(&mut self, bodies: &[String]) {
        for body in bodies {
            if self.acked.contains(body) {
                self.regressions.push(body.clone());
            }
            *self.delivered.entry(body.clone()).or_default() += 1;
        }
    }
}

/// GET with a query; the JSON answer, or None once the server is gone.
async fn get_answer(client: &reqwest::Client, url: String, query: &[(&str, &str)]) -> Option<Value> {
    client.get(url).query(query).send().await.ok()?.json().await.ok()
}

/// One pull and its explicit ack; how many messages came (None once the server is gone).
async fn pull_and_ack(client: &reqwest::Client, base: &str, ledger: &Mutex<Ledger>) -> Option<usize> {
    let query = [("topic", TOPIC), ("consumer", CLUSTERING)];
    let v = get_answer(client, format!("{base}/mq/message"), &query).await?;
    let bodies = bodies_of(&v);
    ledger.lock().expect("ledger").deliver(&bodies);
    if let Some(request_id) = v["result"]["requestId"].as_str() {
        let query = [("topic", TOPIC), ("consumer", CLUSTERING), ("requestId", request_id)];
        let ack = get_answer(client, format!("{base}/mq/ack"), &query).await?;
        if ack["message"].as_str().is_some_and(|m| m.starts_with("ok")) {
            ledger.lock().expect("ledger").acked.extend(bodies.iter().cloned());
        }
    }
    Some(bodies.len())
}

async fn rest_writer(base: String, tag: String, ledger: Arc<Mutex<Ledger>>) {
    let client = reqwest::Client::new();
    for i in 0.. {
        let body = format!("{tag}-{i}");
        let answer = client
            .post(format!("{base}/mq/produce"))
            .form(&[("producer", PRODUCER), ("message", &body)])
            .send()
            .await;
        let Ok(answer) = answer else { return };
        match answer.json::<Value>().await {
            Ok(v) if v["status"] == 200 => {
                ledger.lock().expect("ledger").produced.insert(body);
            }
            _ => return,
        }
    }
}

async fn grpc_writer(base: String, tag: String, ledger: Arc<Mutex<Ledger>>) {
    let Ok(mut client) = pb::messaging_service_client::MessagingServiceClient::connect(base).await else {
        return;
    };
    for i in 0.. {
        let body = format!("{tag}-{i}");
        let request = pb::ProduceRequest {
            producer: PRODUCER.into(),
            body: body.clone().into_bytes(),
            ..Default::default()
        };
        if client.produce(request).await.is_err() {
            return;
        }
        ledger.lock().expect("ledger").produced.insert(body);
    }
}

async fn consumer(base: String, ledger: Arc<Mutex<Ledger>>) {
    let client = reqwest::Client::new();
    while pull_and_ack(&client, &base, &ledger).await.is_some() {}
}

#[test]
#[ignore = "crash rounds take a while: scripts/test runs them"]
fn kill_9_rounds_lose_nothing_and_committed_offsets_hold() {
    let rounds: usize = std::env::var("MQPROXY_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().expect("tmp");
    // The demo registry with the shortest consume timeout: batches pulled but not acknowledged
    // when the server died are locked that long after the restart.
    let config = dir.path().join("crash.toml");
    let mut text = format!(
        "data_dir = \"{}\"\n[[topic]]\nname = \"{TOPIC}\"\nqueues = 4\n[[producer]]\nname = \"{PRODUCER}\"\ntopic = \"{TOPIC}\"\n[[consumer]]\nname = \"{CLUSTERING}\"\ntopic = \"{TOPIC}\"\nconsume_timeout_ms = {LOCK_MS}\n",
        dir.path().join("data").display()
    );
    // On a RocketMQ cluster (MQPROXY_TEST_BACKEND=rocketmq) only mqproxy dies: the messages
    // stay on the brokers, the consumer state in the data dir (or Redis, MQPROXY_TEST_STATE).
    if rocketmq_backend() {
        text = format!(
            "backend = \"rocketmq\"\n{text}[rocketmq]\nnamesrv_addr = \"{}\"\nauto_create_topics = true\ntopic_prefix = \"crash-{}-\"\noffset_refresh_ms = 100\n",
            namesrv_addr(),
            unique_suffix()
        );
        if std::env::var("MQPROXY_TEST_STATE").as_deref() == Ok("redis") {
            let url =
                std::env::var("MQPROXY_TEST_REDIS_URL").expect("MQPROXY_TEST_STATE=redis needs MQPROXY_TEST_REDIS_URL");
            text.push_str(&format!(
                "[consumer_state]\nkind = \"redis\"\nurl = \"{url}\"\nprefix = \"mqproxy-crash-{}:\"\n",
                unique_suffix()
            ));
        }
    }
    std::fs::write(&config, text).expect("config");
    let data_dir = ["--config".to_owned(), config.display().to_string()];
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    for round in 0..rounds {
        let mut server = Proc::spawn(BIN, &data_dir);
        let base = server.base.clone();
        rt.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for w in 0..8 {
                tasks.spawn(rest_writer(base.clone(), format!("r{round}-rest{w}"), ledger.clone()));
            }
            for w in 0..2 {
                tasks.spawn(grpc_writer(base.clone(), format!("r{round}-grpc{w}"), ledger.clone()));
            }
            tasks.spawn(consumer(base.clone(), ledger.clone()));
            // Some traffic first, then a kill at a random moment of the next 1.5 s.
            let before = ledger.lock().expect("ledger").produced.len();
            eventually(Duration::from_secs(30), "writers under way", || async {
                (ledger.lock().expect("ledger").produced.len() > before + 200).then_some(())
            })
            .await;
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..1_500))).await;
            server.kill_9();
            // Every writer and the consumer stop at their first failed request.
            while tasks.join_next().await.is_some() {}
        });
    }
    // A last start: drain what is left, including the queues still locked by batches of the
    // last round (they open when their lock expires): done when nothing came for longer than
    // a lock lasts.
    let server = Proc::spawn(BIN, &data_dir);
    rt.block_on(async {
        let client = reqwest::Client::new();
        let mut last_delivery = std::time::Instant::now();
        while last_delivery.elapsed() < Duration::from_millis(LOCK_MS + 2_000) {
            match pull_and_ack(&client, &server.base, &ledger).await {
                Some(0) => tokio::time::sleep(Duration::from_millis(100)).await,
                Some(_) => last_delivery = std::time::Instant::now(),
                None => panic!("the restarted server stopped answering"),
            }
        }
    });
    let ledger = ledger.lock().expect("ledger");
    let lost: Vec<&String> = ledger
        .produced
        .iter()
        .filter(|b| !ledger.delivered.contains_key(*b))
        .collect();
    let duplicates: u32 = ledger.delivered.values().map(|n| n - 1).sum();
    println!(
        "crash rounds: {rounds}, messages acknowledged to producers: {}, lost: {}, duplicates: {duplicates}, committed-offset regressions: {}",
        ledger.produced.len(),
        lost.len(),
        ledger.regressions.len()
    );
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        ledger.produced.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(
        ledger.regressions.is_empty(),
        "{} acknowledged messages delivered again, e.g. {:?}",
        ledger.regressions.len(),
        &ledger.regressions[..ledger.regressions.len().min(5)]
    );
    assert!(ledger.produced.len() > 200 * rounds, "writers made progress");
}
