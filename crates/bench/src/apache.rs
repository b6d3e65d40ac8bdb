//! mqproxy in front of an Apache RocketMQ cluster against the official clients on the same
//! cluster, in one run: the Java `DefaultMQProducer`, the direct `rocketmq-client-rust`
//! producer, the Java 5.x client through the RocketMQ 5 proxy, the Java lite pull consumer and
//! a Java producer -> push consumer pair for the end-to-end latency. The Java side is the
//! `Tool` of `tests/apache-rocketmq` (its `bench-*` subcommands), run as child processes that
//! measure themselves (warm-up excluded) and hand their latencies over in a file.

use crate::client::{HttpConn, body_status, closed_loop, form, histogram};
use crate::report::{self, Ceiling, Row};
use crate::rocketmq::{direct_producer, direct_run};
use crate::scenarios::{self, Env};
use crate::server::{self, PRODUCER, Proc, ServerSetup, TOPIC};
use anyhow::{Context, bail, ensure};
use hdrhistogram::Histogram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What the Apache comparison needs besides the cluster.
pub struct Peers {
    /// The Java tool's classpath (`scripts/rocketmq-apache.sh tool-classpath`).
    pub java_classpath: String,
    /// The RocketMQ 5 proxy's gRPC endpoint (`scripts/rocketmq-apache.sh start-proxy`).
    pub proxy: Option<String>,
}

/// Sizes of one run.
pub struct ApachePlan {
    pub rounds: usize,
    pub concurrencies: Vec<usize>,
    /// Messages stored for each consume row.
    pub consume_messages: u64,
    pub e2e_count: usize,
}

const SIZE: usize = 1024;

/// A Java peer's rate and latencies.
struct JavaRun {
    rate: f64,
    latency: Histogram<u64>,
}

/// Runs `Tool ARGS... LATENCY_FILE` and reads what it measured.
async fn java(env: &Env, peers: &Peers, args: &[String]) -> anyhow::Result<JavaRun> {
    static N: AtomicU64 = AtomicU64::new(0);
    let file = env.data_root.join(format!(
        "mqproxy-bench-{}-java-{}.txt",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let out = tokio::process::Command::new("java")
        .arg(format!("-Drocketmq.client.logRoot={}", java_log_dir(env).display()))
        .args(["-cp", &peers.java_classpath, "mqproxy.apache.Tool"])
        .args(args)
        .arg(&file)
        .kill_on_drop(true)
        .output()
        .await
        .context("starting java (the Java tool needs a JDK on PATH)")?;
    ensure!(
        out.status.success(),
        "Java tool {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    #[derive(serde::Deserialize)]
    struct Report {
        rate: f64,
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().context("the Java tool printed nothing")?;
    let report: Report = serde_json::from_str(line).with_context(|| format!("Java tool report {line:?}"))?;
    let mut latency = histogram();
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let _ = std::fs::remove_file(&file);
    for v in text.lines() {
        latency.saturating_record(v.parse::<u64>().context("latency sample")?.max(1));
    }
    Ok(JavaRun {
        rate: report.rate,
        latency,
    })
}

/// The server's TOML for the cluster at `namesrv` with topics under `prefix`.
fn cluster_toml(env: &Env, namesrv: &str, prefix: &str) -> String {
    // Top-level (and dotted) keys first: the [rocketmq] table ends the top level.
    format!(
        "backend = \"rocketmq\"\n{}\n[rocketmq]\nnamesrv_addr = \"{namesrv}\"\nauto_create_topics = true\ntopic_prefix = \"{prefix}\"\n",
        env.server_toml
    )
}

/// mqproxy on a fresh data directory (fresh consumer state) in front of the cluster, ready.
pub async fn start_on_cluster(env: &Env, namesrv: &str, prefix: &str, max_pull_size: u32) -> anyhow::Result<Proc> {
    let setup = ServerSetup {
        extra_toml: cluster_toml(env, namesrv, prefix),
        max_pull_size,
        ..env.setup()
    };
    let proc = server::start_mqproxy(&env.server_bin, server::fresh_dir(&env.data_root, "apache")?, &setup)?;
    wait_ready(&proc).await?;
    Ok(proc)
}

/// The server reads (or creates) its topics' routes before it answers `/readyz`.
pub async fn wait_ready(proc: &Proc) -> anyhow::Result<()> {
    let mut probe = HttpConn::connect(proc.addr).await?;
    let ready_by = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(reply) = probe.get("/readyz").await
            && body_status(&reply).is_ok_and(|s| s == 200)
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < ready_by,
            "mqproxy (RocketMQ backend) not ready in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stores `total` messages through mqproxy's batch produce (100 per request, 8 connections).
async fn fill(proc: &Proc, total: u64) -> anyhow::Result<()> {
    const PER_BATCH: u64 = 100;
    const CONNECTIONS: u64 = 8;
    let messages = serde_json::to_string(&vec!["x".repeat(SIZE); PER_BATCH as usize])?;
    let body = form(&[("producer", PRODUCER), ("messages", &messages)]);
    let batches = total.div_ceil(PER_BATCH);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CONNECTIONS {
        let (addr, body) = (proc.addr, body.clone());
        let mine = batches / CONNECTIONS + u64::from(c < batches % CONNECTIONS);
        tasks.spawn(async move {
            let mut conn = HttpConn::connect(addr).await?;
            for _ in 0..mine {
                let reply = conn.post_form("/mq/produce/batch", body.clone()).await?;
                if body_status(&reply)? != 200 {
                    bail!("fill: {}", String::from_utf8_lossy(&reply));
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

fn secs(d: Duration) -> String {
    format!("{}", d.as_secs_f64())
}

/// Every Apache row, printed as it is measured.
pub async fn run(env: &Env, namesrv: &str, prefix: &str, peers: &Peers, plan: &ApachePlan) -> anyhow::Result<()> {
    let started = Instant::now();
    println!(
        "Apache RocketMQ cluster {namesrv}: mqproxy next to the official clients{}",
        peers
            .proxy
            .as_deref()
            .map(|p| format!(", the RocketMQ 5 proxy at {p}"))
            .unwrap_or_default()
    );
    produce(env, namesrv, prefix, peers, plan).await?;
    consume(env, namesrv, &format!("{prefix}c-"), peers, plan).await?;
    e2e(env, namesrv, &format!("{prefix}e-"), peers, plan).await?;
    println!("apache bench time {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// REST produce of 1 KiB at each concurrency: mqproxy, the Java producer, the direct Rust
/// client and (when given) the Java 5.x client through the RocketMQ 5 proxy, in turn.
async fn produce(env: &Env, namesrv: &str, prefix: &str, peers: &Peers, plan: &ApachePlan) -> anyhow::Result<()> {
    let proc = start_on_cluster(env, namesrv, prefix, 128).await?;
    let idle_rss = proc.rss_mib().0;
    let mut producer = direct_producer(namesrv, prefix).await?;
    let topic = format!("{prefix}{TOPIC}");
    let body = vec![b'x'; SIZE];
    let form_body = form(&[("producer", PRODUCER), ("message", &"x".repeat(SIZE))]);
    let timing = |threads: usize| {
        vec![
            threads.to_string(),
            secs(env.warmup),
            secs(env.duration),
            SIZE.to_string(),
        ]
    };
    for &c in &plan.concurrencies {
        let mut all = Vec::new();
        for _ in 0..plan.rounds.max(1) {
            let proxied = closed_loop(proc.addr, c, env.warmup, env.duration, "/mq/produce", form_body.clone()).await?;
            let peak = proc.rss_mib().1;
            let java_run = java(
                env,
                peers,
                &[
                    ["bench-produce".into(), namesrv.into(), topic.clone()].as_slice(),
                    &timing(c),
                ]
                .concat(),
            )
            .await?;
            let (rust, rust_latency) = direct_run(&producer, &topic, c, env, &body).await?;
            let proxy5 = match &peers.proxy {
                Some(endpoint) => Some(
                    java(
                        env,
                        peers,
                        &[
                            ["bench-produce-proxy".into(), endpoint.clone(), topic.clone()].as_slice(),
                            &timing(c),
                        ]
                        .concat(),
                    )
                    .await?,
                ),
                None => None,
            };
            let mut ceilings = vec![
                Ceiling::new("direct Java producer", java_run.rate),
                Ceiling::new("direct rocketmq-client-rust", rust),
            ];
            if let Some(p) = &proxy5 {
                ceilings.push(Ceiling::new("RocketMQ 5 proxy", p.rate));
            }
            let mut rows = vec![
                Row::measured(
                    &format!("apache produce 1 KiB x{c}"),
                    proxied.requests_per_s,
                    Some(proxied.latency),
                    ceilings,
                )
                .with_rss(idle_rss, peak),
                Row::ceiling("  direct Java DefaultMQProducer", java_run.rate, Some(java_run.latency)),
                Row::ceiling("  direct rocketmq-client-rust", rust, Some(rust_latency)),
            ];
            if let Some(p) = proxy5 {
                rows.push(Row::ceiling(
                    "  Java 5.x client via RocketMQ 5 proxy",
                    p.rate,
                    Some(p.latency),
                ));
            }
            all.push(rows);
        }
        for row in report::median_rows(all) {
            println!("{}", report::render(&row));
        }
    }
    producer.shutdown().await;
    Ok(())
}

/// REST consume (pull 32 and 128, each batch acknowledged by the next pull) by 8 consumers and
/// the gRPC stream by 4, each from a fresh consumer state over the same stored messages, next
/// to the Java lite pull consumer of a fresh group with the same pull size.
async fn consume(env: &Env, namesrv: &str, prefix: &str, peers: &Peers, plan: &ApachePlan) -> anyhow::Result<()> {
    let total = plan.consume_messages;
    {
        let filler = start_on_cluster(env, namesrv, prefix, 128).await?;
        let at = Instant::now();
        fill(&filler, total).await?;
        println!(
            "  (stored {} messages of 1 KiB through mqproxy's batch produce at {:.0} msg/s)",
            scenarios::count_label(total),
            total as f64 / at.elapsed().as_secs_f64()
        );
    }
    let topic = format!("{prefix}{TOPIC}");
    static GROUP: AtomicU64 = AtomicU64::new(0);
    let java_consume = |batch: u32| {
        let group = format!("{prefix}java-{}", GROUP.fetch_add(1, Ordering::Relaxed));
        let args = vec![
            "bench-consume".to_owned(),
            namesrv.to_owned(),
            topic.clone(),
            group,
            total.to_string(),
            batch.to_string(),
        ];
        async move { java(env, peers, &args).await }
    };
    for (label, pull, consumers) in [
        ("pull 32 + ack", 32u32, 8usize),
        ("pull 128 + ack", 128, 8),
        ("gRPC stream", 128, 4),
    ] {
        let mut all = Vec::new();
        for _ in 0..plan.rounds.max(1) {
            let proc = start_on_cluster(env, namesrv, prefix, pull).await?;
            let idle_rss = proc.rss_mib().0;
            let (rate, latency) = if label == "gRPC stream" {
                scenarios::stream_run(proc.addr, consumers, total).await?
            } else {
                scenarios::pull_run(proc.addr, consumers, total).await?
            };
            let peak = proc.rss_mib().1;
            drop(proc);
            let java_run = java_consume(pull).await?;
            all.push(vec![
                Row::measured(
                    &format!("apache consume 1 KiB x{consumers} ({label})"),
                    rate,
                    Some(latency),
                    vec![Ceiling::new("direct Java pull consumer", java_run.rate)],
                )
                .with_rss(idle_rss, peak),
                Row::ceiling(
                    &format!("  direct Java lite pull consumer, batch {pull}"),
                    java_run.rate,
                    Some(java_run.latency),
                ),
            ]);
        }
        for row in report::median_rows(all) {
            println!("{}", report::render(&row));
        }
    }
    Ok(())
}

/// Produce -> deliver, one message at a time: mqproxy (REST produce, gRPC stream delivery)
/// against the Java producer and push consumer on the same cluster.
async fn e2e(env: &Env, namesrv: &str, prefix: &str, peers: &Peers, plan: &ApachePlan) -> anyhow::Result<()> {
    let on_cluster = Env {
        server_toml: cluster_toml(env, namesrv, prefix),
        ..env.clone()
    };
    let rows = scenarios::e2e_latency(&on_cluster, plan.e2e_count, SIZE).await?;
    let java_run = java(
        env,
        peers,
        &[
            "bench-e2e".into(),
            namesrv.into(),
            format!("{prefix}{TOPIC}"),
            format!("{prefix}java-e2e"),
            plan.e2e_count.to_string(),
            SIZE.to_string(),
        ],
    )
    .await?;
    let p50 = |h: &Histogram<u64>| h.value_at_quantile(0.5) as f64 / 1000.0;
    for row in rows {
        let note = row.latency.as_ref().map(|h| {
            format!(
                "p50 {:.2} ms vs {:.2} ms direct: {:+.2} ms",
                p50(h),
                p50(&java_run.latency),
                p50(h) - p50(&java_run.latency)
            )
        });
        let mut row = Row {
            label: "apache e2e-latency 1 KiB produce -> stream".into(),
            ..row
        };
        row.note = note;
        println!("{}", report::render(&row));
    }
    println!(
        "{}",
        report::render(&Row::ceiling(
            "  direct Java producer -> push consumer",
            java_run.rate,
            Some(java_run.latency)
        ))
    );
    Ok(())
}

/// Where a run's Java client logs go (kept out of the home directory).
fn java_log_dir(env: &Env) -> PathBuf {
    env.data_root.join("java-client-logs")
}
