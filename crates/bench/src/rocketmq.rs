//! mqproxy on the RocketMQ backend against its ceiling: the direct `rocketmq-client-rust`
//! producer on the same broker, same concurrency, alternating in every round.

use crate::client::{closed_loop, form, histogram, record};
use crate::report::{self, Ceiling, Row};
use crate::scenarios::Env;
use crate::server::{PRODUCER, TOPIC};
use anyhow::Context;
use rocketmq_client_rust::{ClientRuntime, ClientRuntimeConfig, DefaultMQProducer, TelemetryHandle};
use rocketmq_model::common::message::message_single::Message;
use std::time::Instant;

/// Messages per second and latencies of `writers` tasks sending through one direct producer.
pub async fn direct_run(
    producer: &DefaultMQProducer,
    topic: &str,
    writers: usize,
    env: &Env,
    body: &[u8],
) -> anyhow::Result<(f64, hdrhistogram::Histogram<u64>)> {
    let measure_from = Instant::now() + env.warmup;
    let end = measure_from + env.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..writers {
        let (producer, topic, body) = (producer.clone(), topic.to_owned(), body.to_vec());
        tasks.spawn(async move {
            let mut hist = histogram();
            let mut n = 0u64;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let message = Message::builder()
                    .topic(topic.as_str())
                    .body_slice(&body)
                    .build()
                    .map_err(|e| anyhow::anyhow!("message: {e}"))?;
                producer
                    .send_with_timeout(message, 3_000)
                    .await
                    .map_err(|e| anyhow::anyhow!("direct send: {e}"))?
                    .context("no send result")?;
                if sent >= measure_from {
                    record(&mut hist, sent.elapsed());
                    n += 1;
                }
            }
            anyhow::Ok((n, hist))
        });
    }
    let mut latency = histogram();
    let mut total = 0;
    while let Some(joined) = tasks.join_next().await {
        let (n, hist) = joined??;
        total += n;
        latency.add(&hist)?;
    }
    Ok((total as f64 / env.duration.as_secs_f64(), latency))
}

/// The direct `rocketmq-client-rust` producer (group `<prefix>direct`), started.
pub async fn direct_producer(namesrv: &str, prefix: &str) -> anyhow::Result<DefaultMQProducer> {
    let context = rocketmq_runtime::RuntimeContext::try_from_current("bench-direct")
        .map_err(|e| anyhow::anyhow!("runtime: {e}"))?;
    let runtime = ClientRuntime::try_new(
        context.service_context("client"),
        ClientRuntimeConfig::default(),
        TelemetryHandle::noop(),
    )
    .map_err(|e| anyhow::anyhow!("client runtime: {e}"))?;
    let mut producer = DefaultMQProducer::builder(runtime)
        .producer_group(format!("{prefix}direct").as_str())
        .name_server_addr(namesrv)
        .build();
    producer
        .start()
        .await
        .map_err(|e| anyhow::anyhow!("direct producer: {e}"))?;
    Ok(producer)
}

/// Topic prefix of one bench run: topics of different runs never mix.
pub fn default_prefix() -> String {
    format!("bench-{}-", std::process::id())
}

/// Produce of 1 KiB: mqproxy (RocketMQ backend) and the direct client, per concurrency, on
/// the topic `<prefix>bench-topic` (created through mqproxy when missing).
pub async fn compare(
    env: &Env,
    namesrv: &str,
    prefix: &str,
    rounds: usize,
    concurrencies: &[usize],
) -> anyhow::Result<()> {
    let proc = crate::apache::start_on_cluster(env, namesrv, prefix, 128).await?;
    let idle_rss = proc.rss_mib().0;
    let mut producer = direct_producer(namesrv, prefix).await?;
    let topic = format!("{prefix}{TOPIC}");
    let body = vec![b'x'; 1024];
    let form_body = form(&[("producer", PRODUCER), ("message", &"x".repeat(1024))]);
    println!("RocketMQ backend ({namesrv}): produce 1 KiB, direct client and mqproxy alternating");
    for &writers in concurrencies {
        let mut all = Vec::new();
        for _ in 0..rounds.max(1) {
            let (direct, direct_latency) = direct_run(&producer, &topic, writers, env, &body).await?;
            let proxied = closed_loop(
                proc.addr,
                writers,
                env.warmup,
                env.duration,
                "/mq/produce",
                form_body.clone(),
            )
            .await?;
            let peak = proc.rss_mib().1;
            all.push(vec![
                Row::measured(
                    &format!("rocketmq produce 1 KiB x{writers}"),
                    proxied.requests_per_s,
                    Some(proxied.latency),
                    vec![Ceiling::new("direct client", direct)],
                )
                .with_rss(idle_rss, peak),
                Row::ceiling("  direct rocketmq-client-rust", direct, Some(direct_latency)),
            ]);
        }
        for row in report::median_rows(all) {
            println!("{}", report::render(&row));
        }
    }
    producer.shutdown().await;
    drop(proc);
    Ok(())
}
