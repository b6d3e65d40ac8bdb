//! Produce throughput of the real server over HTTP on loopback: group commit (the default)
//! against one flush per message (`group_commit_max = 1`), at 1 and 64 concurrent producers,
//! plus a consume (pull + ack) rate. Prints medians of 3 runs and the ratio to the baseline.
//!
//! With `MQPROXY_BENCH_NAMESRV=127.0.0.1:9876` (a cluster from `scripts/rocketmq-local.sh`) it
//! also measures produce through mqproxy on the RocketMQ backend against the direct
//! `rocketmq-client-rust` producer on the same broker, at the same concurrency.
//!
//! Run: `cargo bench --bench produce` (env BENCH_SECONDS, default 3, sets each run's length).

// The RocketMQ client's futures nest deeply (see src/lib.rs).
#![recursion_limit = "256"]

use mqproxy::config::Config;
use serde_json::Value;
use std::time::{Duration, Instant};

const PRODUCER: &str = "mqcloud-http-test-topic-producer";
const TOPIC: &str = "mqcloud-http-test-topic";

struct Server {
    base: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

async fn start(group_commit_max: usize) -> Server {
    start_with(|config| config.group_commit_max = group_commit_max).await
}

async fn start_with(adjust: impl FnOnce(&mut Config)) -> Server {
    let dir = tempfile::tempdir().expect("tmp");
    let mut config = Config::demo();
    config.data_dir = dir.path().to_path_buf();
    config.default_rate_limit = 1_000_000;
    adjust(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        mqproxy::server::run(config, listener, async {
            let _ = stopped.await;
        })
        .await
        .expect("server");
    });
    Server {
        base,
        stop,
        task,
        _dir: dir,
    }
}

/// Messages per second and per-request latencies (ms) of `writers` producers for `secs`.
async fn produce_run(base: &str, writers: usize, secs: f64, body: &str) -> (f64, Vec<f64>) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(writers)
        .build()
        .expect("client");
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (client, url, body) = (client.clone(), format!("{base}/mq/produce"), body.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let v: Value = client
                    .post(&url)
                    .form(&[("producer", PRODUCER), ("message", body.as_str())])
                    .send()
                    .await
                    .expect("post")
                    .json()
                    .await
                    .expect("json");
                assert_eq!(v["status"], 200, "{v}");
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("writer"));
    }
    (lat.len() as f64 / started.elapsed().as_secs_f64(), lat)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    percentile(&mut v, 0.5)
}

async fn consume_run(base: &str) -> f64 {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let (mut n, mut rid, mut empty) = (0usize, None::<String>, 0);
    while empty < 4 {
        let mut q = vec![
            ("topic", TOPIC.to_owned()),
            ("consumer", "http-clustering-consumer".to_owned()),
        ];
        if let Some(r) = &rid {
            q.push(("requestId", r.clone()));
        }
        let v: Value = client
            .get(format!("{base}/mq/message"))
            .query(&q)
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json");
        rid = v["result"]["requestId"].as_str().map(str::to_owned);
        let got = v["result"]["msgListSize"].as_u64().unwrap_or(0) as usize;
        if got == 0 {
            empty += 1;
        }
        n += got;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// The disk's own floor: appends of 1 KiB, each followed by fdatasync, for one second.
fn raw_fdatasync_per_second(dir: &std::path::Path) -> f64 {
    use std::io::Write;
    let mut file = std::fs::File::create(dir.join("fsync-probe")).expect("probe file");
    let block = [7u8; 1024];
    let started = Instant::now();
    let mut n = 0u32;
    while started.elapsed() < Duration::from_secs(1) {
        file.write_all(&block).expect("write");
        file.sync_data().expect("fdatasync");
        n += 1;
    }
    f64::from(n) / started.elapsed().as_secs_f64()
}

/// Produce over REST one message at a time; time until a gRPC Consume stream delivers it.
async fn stream_latency(base: &str, n: usize) -> (f64, f64) {
    use mqproxy::grpc::pb;
    use pb::consume_request::Command;
    use pb::consume_response::Event;
    use tokio_stream::StreamExt;
    let mut grpc = pb::messaging_service_client::MessagingServiceClient::connect(base.to_owned())
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let target = pb::ConsumeTarget {
        topic: TOPIC.into(),
        consumer: "http-clustering-consumer".into(),
        client_id: None,
    };
    let subscribe = pb::Subscribe {
        target: Some(target),
        max_in_flight: Some(4),
        max_pull_size: None,
        auto_ack: false,
    };
    tx.send(pb::ConsumeRequest {
        command: Some(Command::Subscribe(subscribe)),
    })
    .await
    .expect("subscribe");
    let mut events = grpc
        .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("consume")
        .into_inner();
    let client = reqwest::Client::new();
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let v: Value = client
            .post(format!("{base}/mq/produce"))
            .form(&[("producer", PRODUCER), ("message", &format!("latency-{i}"))])
            .send()
            .await
            .expect("post")
            .json()
            .await
            .expect("json");
        assert_eq!(v["status"], 200);
        loop {
            match events.next().await.expect("stream open").expect("event").event {
                Some(Event::Batch(batch)) => {
                    latencies.push(started.elapsed().as_secs_f64() * 1000.0);
                    tx.send(pb::ConsumeRequest {
                        command: Some(Command::Ack(batch.request_id)),
                    })
                    .await
                    .expect("ack");
                    break;
                }
                _ => continue,
            }
        }
    }
    (percentile(&mut latencies, 0.5), percentile(&mut latencies, 0.99))
}

#[tokio::main]
async fn main() {
    let secs: f64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let body = "x".repeat(1024);
    let probe_dir = tempfile::tempdir().expect("tmp");
    let fsyncs = raw_fdatasync_per_second(probe_dir.path());
    println!(
        "raw 1 KiB write + fdatasync on this disk: {fsyncs:.0}/s ({:.2} ms each)",
        1000.0 / fsyncs
    );
    println!("produce of 1 KiB messages over HTTP, flush = sync, {secs} s per run, median of 3 runs");
    println!(
        "{:<34} {:>10} {:>9} {:>9} {:>8}",
        "configuration", "msg/s", "p50 ms", "p99 ms", "ratio"
    );
    let mut baseline = None;
    for (label, group_max, writers) in [
        ("one flush per message, 1 writer", 1, 1),
        ("one flush per message, 64 writers", 1, 64),
        ("group commit, 1 writer", 4096, 1),
        ("group commit, 64 writers", 4096, 64),
    ] {
        let mut rates = Vec::new();
        let mut all_lat = Vec::new();
        for _ in 0..3 {
            let server = start(group_max).await;
            let (rate, lat) = produce_run(&server.base, writers, secs, &body).await;
            rates.push(rate);
            all_lat.extend(lat);
            let _ = server.stop.send(());
            server.task.await.expect("stop");
        }
        let rate = median(rates);
        let base = *baseline.get_or_insert(rate);
        println!(
            "{label:<34} {rate:>10.0} {:>9.2} {:>9.2} {:>7.1}x",
            percentile(&mut all_lat, 0.5),
            percentile(&mut all_lat, 0.99),
            rate / base
        );
    }
    let server = start(4096).await;
    let (p50, p99) = stream_latency(&server.base, 500).await;
    println!(
        "produce (REST) -> deliver (gRPC Consume stream) latency, 500 messages one at a time: p50 {p50:.2} ms, p99 {p99:.2} ms"
    );
    produce_run(&server.base, 64, secs, &body).await;
    let rates: Vec<f64> = vec![consume_run(&server.base).await];
    println!(
        "consume (pull 32 + ack by next pull, 1 consumer): {:.0} msg/s",
        median(rates)
    );
    let _ = server.stop.send(());
    server.task.await.expect("stop");
    if let Ok(namesrv) = std::env::var("MQPROXY_BENCH_NAMESRV") {
        rocketmq_section(&namesrv, secs, &body).await;
    }
}

/// Messages per second of `writers` tasks sending through one direct producer for `secs`.
async fn direct_run(
    producer: &rocketmq_client_rust::DefaultMQProducer,
    topic: &str,
    writers: usize,
    secs: f64,
    body: &str,
) -> (f64, Vec<f64>) {
    use rocketmq_model::common::message::message_single::Message;
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut lat = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..writers {
        let (producer, topic, body) = (producer.clone(), topic.to_owned(), body.to_owned());
        tasks.spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let message = Message::builder()
                    .topic(topic.as_str())
                    .body_slice(body.as_bytes())
                    .build()
                    .expect("message");
                let t = Instant::now();
                producer
                    .send_with_timeout(message, 3_000)
                    .await
                    .expect("direct send")
                    .expect("send result");
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            lat
        });
    }
    while let Some(l) = tasks.join_next().await {
        lat.extend(l.expect("writer"));
    }
    (lat.len() as f64 / started.elapsed().as_secs_f64(), lat)
}

/// mqproxy (RocketMQ backend) against the direct client on the same broker.
async fn rocketmq_section(namesrv: &str, secs: f64, body: &str) {
    use rocketmq_client_rust::{ClientRuntime, ClientRuntimeConfig, DefaultMQProducer, TelemetryHandle};
    let prefix = format!("bench-{}-", std::process::id());
    let server = start_with(|config| {
        config.backend = mqproxy::config::Backend::Rocketmq;
        config.rocketmq.namesrv_addr = namesrv.to_owned();
        config.rocketmq.auto_create_topics = true;
        config.rocketmq.topic_prefix = prefix.clone();
    })
    .await;
    // The server creates the topic; wait until it answers.
    let client = reqwest::Client::new();
    for _ in 0..100 {
        if client
            .get(format!("{}/readyz", server.base))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let context = rocketmq_runtime::RuntimeContext::try_from_current("bench-direct").expect("runtime");
    let runtime = ClientRuntime::try_new(
        context.service_context("client"),
        ClientRuntimeConfig::default(),
        TelemetryHandle::noop(),
    )
    .expect("client runtime");
    let mut producer = DefaultMQProducer::builder(runtime)
        .producer_group(format!("{prefix}direct").as_str())
        .name_server_addr(namesrv)
        .build();
    producer.start().await.expect("direct producer");
    let topic = format!("{prefix}{TOPIC}");
    println!(
        "\nRocketMQ backend ({namesrv}): produce 1 KiB, {secs} s per run, median of 3 runs (direct client runs first)"
    );
    println!(
        "{:<34} {:>10} {:>9} {:>9} {:>8}",
        "configuration", "msg/s", "p50 ms", "p99 ms", "ratio"
    );
    for writers in [1, 16, 64] {
        let (mut direct, mut proxied) = (Vec::new(), Vec::new());
        let (mut direct_lat, mut proxied_lat) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let (rate, lat) = direct_run(&producer, &topic, writers, secs, body).await;
            direct.push(rate);
            direct_lat.extend(lat);
            let (rate, lat) = produce_run(&server.base, writers, secs, body).await;
            proxied.push(rate);
            proxied_lat.extend(lat);
        }
        let base = median(direct);
        for (label, rate, lat) in [
            ("direct client", base, &mut direct_lat),
            ("mqproxy REST", median(proxied), &mut proxied_lat),
        ] {
            println!(
                "{:<34} {rate:>10.0} {:>9.2} {:>9.2} {:>7.2}x",
                format!("{label}, {writers} writers"),
                percentile(lat, 0.5),
                percentile(lat, 0.99),
                rate / base
            );
        }
    }
    producer.shutdown().await;
    let _ = server.stop.send(());
    server.task.await.expect("stop");
}
