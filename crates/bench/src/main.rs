//! `mqproxy-bench`: the load generator. It starts the real `mqproxy` binary on a fresh data
//! directory for every scenario, drives it over HTTP/1.1 keep-alive connections or gRPC
//! streams, and measures in the same run what bounds it: a bare axum handler answering the
//! same bytes (HTTP ceiling), the disk's flush rate, and the embedded store without HTTP.
//!
//! `cargo build --release --workspace --bins && target/release/mqproxy-bench all --quick` (or
//! `scripts/bench.sh`).

// The RocketMQ client's futures nest deeply (see the server's src/lib.rs).
#![recursion_limit = "256"]

mod apache;
mod ceilings;
mod client;
mod grpc_ceiling;
mod report;
mod rocketmq;
mod scenarios;
mod server;

use clap::{Parser, Subcommand};
use mqproxy::store::embedded::Layout;
use report::Row;
use scenarios::Env;
use std::path::PathBuf;
use std::time::{Duration, Instant};

// The same allocator as the server's: the HTTP ceiling is the best a bare server does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "mqproxy-bench", about = "Load generator for mqproxy, with same-run ceilings")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Clone)]
struct Common {
    /// The server binary (default: `mqproxy` next to this binary).
    #[arg(long, global = true)]
    server_bin: Option<PathBuf>,
    /// Where data directories are made (on the disk being measured).
    #[arg(long, global = true, env = "MQPROXY_BENCH_DIR")]
    data_root: Option<PathBuf>,
    /// Seconds of warm-up before measuring.
    #[arg(long, global = true)]
    warmup: Option<f64>,
    /// Seconds measured.
    #[arg(long, global = true)]
    duration: Option<f64>,
    /// Runs of each scenario; the report shows the median run.
    #[arg(long, global = true)]
    rounds: Option<usize>,
    /// TOML keys added to the top of the server's config, dotted for a section's key, e.g.
    /// `store.async_flush_interval_ms = 200`.
    #[arg(long, global = true, default_value = "")]
    server_toml: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Every scenario with its ceilings: `--quick` (under 2 minutes) or `--full`; `--smoke`:
    /// every scenario once with small counts (for debug builds: does it run, not how fast).
    All {
        #[arg(long, conflicts_with_all = ["full", "smoke"])]
        quick: bool,
        #[arg(long, conflicts_with = "smoke")]
        full: bool,
        #[arg(long)]
        smoke: bool,
        /// A RocketMQ name server: adds mqproxy (RocketMQ backend) against the direct client.
        #[arg(long, env = "MQPROXY_BENCH_NAMESRV")]
        namesrv: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// `GET /healthz` against a bare axum handler: the HTTP stack's own cost.
    Healthz {
        #[arg(long, default_value_t = 64)]
        connections: usize,
        #[command(flatten)]
        common: Common,
    },
    /// REST produce, one message per request.
    Produce {
        #[arg(long, default_value_t = 64)]
        connections: usize,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// `sync` (answer after fsync) or `async`.
        #[arg(long, default_value = "sync", value_parser = ["sync", "async"])]
        flush: String,
        #[command(flatten)]
        common: Common,
    },
    /// REST batch produce.
    ProduceBatch {
        #[arg(long, default_value_t = 8)]
        connections: usize,
        #[arg(long, default_value_t = 100)]
        batch: usize,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[command(flatten)]
        common: Common,
    },
    /// REST pull loop with ack over a preloaded topic.
    Consume {
        #[arg(long, default_value_t = 8)]
        consumers: usize,
        #[arg(long, default_value_t = 1_000_000)]
        messages: u64,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[command(flatten)]
        common: Common,
    },
    /// gRPC Consume streams over a preloaded topic.
    Stream {
        #[arg(long, default_value_t = 4)]
        streams: usize,
        #[arg(long, default_value_t = 2_000_000)]
        messages: u64,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[command(flatten)]
        common: Common,
    },
    /// Produce over REST, delivered on a gRPC stream and on `/mq/stream` (SSE): latency.
    E2eLatency {
        #[arg(long, default_value_t = 2_000)]
        count: usize,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[command(flatten)]
        common: Common,
    },
    /// Pull latency over stored backlogs of 128-byte messages.
    Backlog {
        /// Backlog sizes, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1_000_000u64, 10_000_000, 50_000_000])]
        stored: Vec<u64>,
        #[command(flatten)]
        common: Common,
    },
    /// mqproxy on the RocketMQ backend against the direct `rocketmq-client-rust` producer.
    Rocketmq {
        #[arg(long, env = "MQPROXY_BENCH_NAMESRV", default_value = "127.0.0.1:9876")]
        namesrv: String,
        /// Prefix of the topic made on the cluster (`<prefix>bench-topic`; default
        /// `bench-<pid>-`), so other clients can be pointed at it.
        #[arg(long)]
        topic_prefix: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// mqproxy in front of an Apache RocketMQ cluster next to the official clients: the Java
    /// producer, the direct Rust client, the RocketMQ 5 proxy with the Java 5.x client, the
    /// Java lite pull consumer, Java produce -> push-consume latency (`scripts/bench-apache.sh`).
    Apache {
        #[arg(long, env = "MQPROXY_BENCH_NAMESRV", default_value = "127.0.0.1:9876")]
        namesrv: String,
        /// The Java tool's classpath (`scripts/rocketmq-apache.sh tool-classpath`).
        #[arg(long, env = "MQPROXY_BENCH_JAVA_CLASSPATH")]
        java_classpath: String,
        /// The RocketMQ 5 proxy's gRPC endpoint, e.g. `127.0.0.1:8091` (none: that peer is left out).
        #[arg(long)]
        proxy: Option<String>,
        /// Produce concurrencies, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16, 64, 256])]
        connections: Vec<usize>,
        /// Messages stored for each consume row.
        #[arg(long, default_value_t = 200_000)]
        consume_messages: u64,
        /// Messages of the produce -> deliver latency rows.
        #[arg(long, default_value_t = 1_000)]
        e2e_count: usize,
        #[command(flatten)]
        common: Common,
    },
    /// (internal) The bare axum HTTP ceiling server.
    #[command(hide = true)]
    HttpCeiling {
        #[arg(long)]
        reply_file: PathBuf,
    },
    /// (internal) The bare tonic Consume server.
    #[command(hide = true)]
    GrpcCeiling {
        #[arg(long)]
        size: usize,
    },
}

/// Durations and sizes of one mode.
struct Plan {
    warmup: f64,
    duration: f64,
    rounds: usize,
    produce_sizes: Vec<usize>,
    consume_messages: u64,
    stream_messages: u64,
    e2e_count: usize,
    backlogs: Vec<u64>,
    /// Also run the 1 KiB produce, batch, consume and stream rows on the redb layout (the
    /// store before the commit log), in the same run.
    redb_rows: bool,
}

impl Plan {
    fn quick() -> Self {
        Self {
            warmup: 0.5,
            duration: 2.0,
            rounds: 1,
            produce_sizes: vec![1024],
            consume_messages: 200_000,
            stream_messages: 300_000,
            e2e_count: 500,
            backlogs: vec![100_000, 1_000_000],
            redb_rows: false,
        }
    }

    fn smoke() -> Self {
        Self {
            warmup: 0.5,
            duration: 2.0,
            rounds: 1,
            produce_sizes: vec![1024],
            consume_messages: 20_000,
            stream_messages: 30_000,
            e2e_count: 100,
            backlogs: vec![100_000],
            redb_rows: false,
        }
    }

    fn full() -> Self {
        Self {
            warmup: 2.0,
            duration: 10.0,
            rounds: 3,
            produce_sizes: vec![128, 1024, 16 * 1024],
            consume_messages: 2_000_000,
            stream_messages: 4_000_000,
            e2e_count: 5_000,
            backlogs: vec![1_000_000, 10_000_000, 50_000_000],
            redb_rows: true,
        }
    }
}

fn env_from(common: &Common, default_warmup: f64, default_duration: f64) -> anyhow::Result<Env> {
    let data_root = common.data_root.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&data_root)?;
    let flush_rate = ceilings::flush_rate(&data_root, Duration::from_secs(1))?;
    let sequential_rate = ceilings::sequential_write_rate(&data_root, Duration::from_secs(1))?;
    Ok(Env {
        sequential_rate,
        server_bin: common.server_bin.clone().unwrap_or_else(server::default_server_bin),
        data_root,
        warmup: Duration::from_secs_f64(common.warmup.unwrap_or(default_warmup)),
        duration: Duration::from_secs_f64(common.duration.unwrap_or(default_duration)),
        flush_rate,
        server_toml: common.server_toml.clone(),
        layout: Layout::Log,
    })
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or_else(String::new, |kib| format!(", {:.0} GiB memory", kib / 1024.0 / 1024.0));
    format!("{cores} cores{mem}")
}

/// Runs `scenario` `rounds` times and prints the median rows.
async fn run_rounds<F, Fut>(rounds: usize, mut scenario: F) -> anyhow::Result<Vec<Row>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<Row>>>,
{
    let mut all = Vec::new();
    for _ in 0..rounds.max(1) {
        all.push(scenario().await?);
    }
    let rows = report::median_rows(all);
    for row in &rows {
        println!("{}", report::render(row));
    }
    Ok(rows)
}

fn print_preamble(env: &Env, rounds: usize) {
    println!(
        "machine: {}; data dir {}; flush rate (1 KiB write + fdatasync): {:.0}/s ({:.2} ms each); sequential write {:.0} MiB/s",
        machine(),
        env.data_root.display(),
        env.flush_rate,
        1000.0 / env.flush_rate,
        env.sequential_rate / f64::from(1 << 20)
    );
    println!(
        "warm-up {:.1} s, measured {:.1} s, median of {rounds} run(s); latency in ms; RSS of the server at start/peak",
        env.warmup.as_secs_f64(),
        env.duration.as_secs_f64()
    );
    println!("{}", report::header());
}

/// `quick`: one RocketMQ concurrency instead of three.
async fn all(plan: Plan, quick: bool, namesrv: Option<String>, common: Common) -> anyhow::Result<()> {
    let env = env_from(&common, plan.warmup, plan.duration)?;
    let rounds = common.rounds.unwrap_or(plan.rounds);
    let started = Instant::now();
    print_preamble(&env, rounds);
    run_rounds(rounds, || scenarios::healthz(&env, 64)).await?;
    for &size in &plan.produce_sizes {
        run_rounds(rounds, || scenarios::produce(&env, 64, size, "sync")).await?;
    }
    run_rounds(rounds, || scenarios::produce(&env, 256, 1024, "sync")).await?;
    run_rounds(rounds, || scenarios::produce(&env, 64, 1024, "async")).await?;
    run_rounds(rounds, || scenarios::produce_batch(&env, 8, 100, 1024)).await?;
    run_rounds(rounds, || scenarios::consume(&env, 8, plan.consume_messages, 1024)).await?;
    run_rounds(rounds, || scenarios::stream(&env, 4, plan.stream_messages, 1024)).await?;
    if plan.redb_rows {
        let redb = Env {
            server_toml: format!("{}\nstore.layout = \"redb\"", env.server_toml),
            layout: Layout::Redb,
            ..env.clone()
        };
        let on_redb = |rows: anyhow::Result<Vec<Row>>| {
            rows.map(|rows| {
                rows.into_iter()
                    .map(|mut r| {
                        if !r.label.starts_with(' ') {
                            r.label = format!("redb: {}", r.label);
                        }
                        r
                    })
                    .collect::<Vec<Row>>()
            })
        };
        run_rounds(rounds, || async {
            on_redb(scenarios::produce(&redb, 64, 1024, "sync").await)
        })
        .await?;
        run_rounds(rounds, || async {
            on_redb(scenarios::produce_batch(&redb, 8, 100, 1024).await)
        })
        .await?;
        run_rounds(rounds, || async {
            on_redb(scenarios::consume(&redb, 8, plan.consume_messages, 1024).await)
        })
        .await?;
        run_rounds(rounds, || async {
            on_redb(scenarios::stream(&redb, 4, plan.stream_messages, 1024).await)
        })
        .await?;
    }
    run_rounds(rounds, || scenarios::e2e_latency(&env, plan.e2e_count, 1024)).await?;
    let mut backlog_rows = Vec::new();
    for &stored in &plan.backlogs {
        let row = scenarios::backlog(&env, stored).await?;
        println!("{}", report::render(&row));
        backlog_rows.push(row);
    }
    if let (Some(first), Some(last)) = (backlog_rows.first(), backlog_rows.last())
        && let (Some(a), Some(b)) = (&first.latency, &last.latency)
    {
        println!(
            "backlog: pull p50 with {} is {:.2}x that with {} (p99 {:.2}x)",
            last.label.trim_start_matches("backlog "),
            b.value_at_quantile(0.5) as f64 / a.value_at_quantile(0.5).max(1) as f64,
            first.label.trim_start_matches("backlog "),
            b.value_at_quantile(0.99) as f64 / a.value_at_quantile(0.99).max(1) as f64,
        );
    }
    if let Some(namesrv) = namesrv {
        let concurrencies: &[usize] = if quick { &[16] } else { &[1, 16, 64] };
        rocketmq::compare(&env, &namesrv, &rocketmq::default_prefix(), rounds, concurrencies).await?;
    }
    println!("total bench time {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

async fn single(common: Common, scenario: impl AsyncFn(&Env) -> anyhow::Result<Vec<Row>>) -> anyhow::Result<()> {
    let env = env_from(&common, 1.0, 5.0)?;
    let rounds = common.rounds.unwrap_or(1);
    print_preamble(&env, rounds);
    run_rounds(rounds, || scenario(&env)).await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::HttpCeiling { reply_file } => server::serve_http_ceiling(&reply_file).await,
            Command::GrpcCeiling { size } => grpc_ceiling::serve(size).await,
            Command::All {
                quick: _,
                full,
                smoke,
                namesrv,
                common,
            } => {
                let plan = match (smoke, full) {
                    (true, _) => Plan::smoke(),
                    (false, true) => Plan::full(),
                    (false, false) => Plan::quick(),
                };
                all(plan, !full, namesrv, common).await
            }
            Command::Healthz { connections, common } => {
                single(common, async |env| scenarios::healthz(env, connections).await).await
            }
            Command::Produce {
                connections,
                size,
                flush,
                common,
            } => {
                let flush: &'static str = if flush == "async" { "async" } else { "sync" };
                single(common, async |env| {
                    scenarios::produce(env, connections, size, flush).await
                })
                .await
            }
            Command::ProduceBatch {
                connections,
                batch,
                size,
                common,
            } => {
                single(common, async |env| {
                    scenarios::produce_batch(env, connections, batch, size).await
                })
                .await
            }
            Command::Consume {
                consumers,
                messages,
                size,
                common,
            } => {
                single(common, async |env| {
                    scenarios::consume(env, consumers, messages, size).await
                })
                .await
            }
            Command::Stream {
                streams,
                messages,
                size,
                common,
            } => {
                single(common, async |env| {
                    scenarios::stream(env, streams, messages, size).await
                })
                .await
            }
            Command::E2eLatency { count, size, common } => {
                single(common, async |env| scenarios::e2e_latency(env, count, size).await).await
            }
            Command::Backlog { stored, common } => {
                single(common, async |env| {
                    let mut rows = Vec::new();
                    for &n in &stored {
                        rows.push(scenarios::backlog(env, n).await?);
                    }
                    Ok(rows)
                })
                .await
            }
            Command::Apache {
                namesrv,
                java_classpath,
                proxy,
                connections,
                consume_messages,
                e2e_count,
                common,
            } => {
                let env = env_from(&common, 1.0, 5.0)?;
                let rounds = common.rounds.unwrap_or(1);
                print_preamble(&env, rounds);
                let plan = apache::ApachePlan {
                    rounds,
                    concurrencies: connections,
                    consume_messages,
                    e2e_count,
                };
                let peers = apache::Peers { java_classpath, proxy };
                apache::run(&env, &namesrv, &rocketmq::default_prefix(), &peers, &plan).await
            }
            Command::Rocketmq {
                namesrv,
                topic_prefix,
                common,
            } => {
                let env = env_from(&common, 1.0, 5.0)?;
                print_preamble(&env, common.rounds.unwrap_or(3));
                let prefix = topic_prefix.unwrap_or_else(rocketmq::default_prefix);
                rocketmq::compare(&env, &namesrv, &prefix, common.rounds.unwrap_or(3), &[1, 16, 64]).await
            }
        }
    })
}
