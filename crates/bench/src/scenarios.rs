//! The scenarios. Each starts the server under test on a fresh data directory, measures it,
//! then measures its ceilings with the same load shape, and returns rows for the report.

use crate::ceilings;
use crate::client::{self, HttpConn, closed_loop, form, histogram, record};
use crate::report::{Ceiling, Row};
use crate::server::{self, CONSUMER, PRODUCER, ServerSetup, TOPIC};
use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use mqproxy::grpc::pb;
use mqproxy::store::embedded::{FlushPolicy, Layout};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What every scenario needs to know about the run.
#[derive(Clone, Debug)]
pub struct Env {
    pub server_bin: PathBuf,
    pub data_root: PathBuf,
    pub warmup: Duration,
    pub duration: Duration,
    /// fdatasync'd 1 KiB appends per second on the data directory's disk.
    pub flush_rate: f64,
    /// The disk's sequential write rate (bytes/s), measured at start.
    pub sequential_rate: f64,
    /// TOML appended to every generated server config (`--server-toml`).
    pub server_toml: String,
    /// The layout preloaded data directories are written in (the server's, set in
    /// `server_toml` when not the default).
    pub layout: Layout,
}

impl Env {
    /// The server set-up of a scenario: defaults plus the user's extra TOML.
    pub fn setup(&self) -> ServerSetup {
        ServerSetup {
            extra_toml: self.server_toml.clone(),
            ..ServerSetup::default()
        }
    }
}

fn flush_of(name: &str) -> FlushPolicy {
    if name == "async" {
        FlushPolicy::Async
    } else {
        FlushPolicy::Sync
    }
}

/// One message body of `size` bytes (form-encoded as is: plain ASCII).
fn message_body(size: usize) -> String {
    "x".repeat(size)
}

/// The bare-axum ceiling for requests answered by `reply`, with the same load.
async fn http_ceiling(
    env: &Env,
    reply: &Bytes,
    connections: usize,
    path: &'static str,
    body: Bytes,
) -> anyhow::Result<client::LoadResult> {
    let dir = server::fresh_dir(&env.data_root, "http-ceiling")?;
    let reply_file = dir.join("reply.json");
    std::fs::write(&reply_file, reply)?;
    let ceiling = server::start_http_ceiling(&reply_file)?;
    let result = closed_loop(ceiling.addr, connections, env.warmup, env.duration, path, body).await;
    drop(ceiling);
    let _ = std::fs::remove_dir_all(dir);
    result
}

/// `GET /healthz`, `connections` clients: the HTTP stack itself (listener, middleware, routing,
/// envelope) against a bare axum handler answering the same bytes.
pub async fn healthz(env: &Env, connections: usize) -> anyhow::Result<Vec<Row>> {
    let proc = server::start_mqproxy(
        &env.server_bin,
        server::fresh_dir(&env.data_root, "healthz")?,
        &env.setup(),
    )?;
    let idle_rss = proc.rss_mib().0;
    let reply = HttpConn::connect(proc.addr).await?.get("/healthz").await?;
    let measured = closed_loop(
        proc.addr,
        connections,
        env.warmup,
        env.duration,
        "/healthz",
        Bytes::new(),
    )
    .await?;
    let peak_rss = proc.rss_mib().1;
    drop(proc);
    let http = http_ceiling(env, &reply, connections, "/healthz", Bytes::new()).await?;
    Ok(vec![
        Row::measured(
            &format!("healthz x{connections}"),
            measured.requests_per_s,
            Some(measured.latency),
            vec![Ceiling::new("axum", http.requests_per_s)],
        )
        .with_rss(idle_rss, peak_rss),
        Row::ceiling("  bare axum, same load", http.requests_per_s, Some(http.latency)),
    ])
}

/// One produce shape: `per_request` messages of `size` bytes per POST to `path`.
struct ProduceLoad {
    path: &'static str,
    body: Bytes,
    per_request: usize,
    size: usize,
    flush: &'static str,
}

/// What a produce load measured: mqproxy, the bare axum ceiling and the store alone (all in
/// messages per second), and the server's RSS.
struct ProduceFigures {
    measured: client::LoadResult,
    http: client::LoadResult,
    store_rate: f64,
    /// The same store with the bodies in redb (the layout before the commit log).
    redb_rate: f64,
    rss: (f64, f64),
}

impl ProduceFigures {
    /// The store alone with the redb layout, and how many times faster the log is.
    fn redb_row(&self) -> Row {
        let label = format!(
            "  store alone, redb layout (log {:.2}x)",
            self.store_rate / self.redb_rate.max(1.0)
        );
        Row::ceiling(&label, self.redb_rate, None)
    }
}

async fn measure_produce(env: &Env, connections: usize, load: &ProduceLoad) -> anyhow::Result<ProduceFigures> {
    let setup = ServerSetup {
        flush: load.flush,
        ..env.setup()
    };
    let proc = server::start_mqproxy(&env.server_bin, server::fresh_dir(&env.data_root, "produce")?, &setup)?;
    let idle_rss = proc.rss_mib().0;
    let reply = HttpConn::connect(proc.addr)
        .await?
        .post_form(load.path, load.body.clone())
        .await?;
    let measured = closed_loop(
        proc.addr,
        connections,
        env.warmup,
        env.duration,
        load.path,
        load.body.clone(),
    )
    .await?;
    let peak_rss = proc.rss_mib().1;
    drop(proc);

    let http = http_ceiling(env, &reply, connections, load.path, load.body.clone()).await?;
    let store_rate = store_alone(env, connections, load, Layout::Log).await?;
    let redb_rate = store_alone(env, connections, load, Layout::Redb).await?;
    Ok(ProduceFigures {
        measured,
        http,
        store_rate,
        redb_rate,
        rss: (idle_rss, peak_rss),
    })
}

/// The embedded store's own write rate (no HTTP) with the load's writers and batches.
async fn store_alone(env: &Env, connections: usize, load: &ProduceLoad, layout: Layout) -> anyhow::Result<f64> {
    let store_dir = server::fresh_dir(&env.data_root, "store-ceiling")?;
    let store = ceilings::open_store_with(&store_dir, flush_of(load.flush), layout)?;
    let rate = ceilings::store_write_rate(&store, connections, load.per_request, load.size, env.duration).await?;
    store.close();
    let _ = std::fs::remove_dir_all(store_dir);
    Ok(rate)
}

/// REST produce, one message per request, `connections` clients.
pub async fn produce(env: &Env, connections: usize, size: usize, flush: &'static str) -> anyhow::Result<Vec<Row>> {
    let load = ProduceLoad {
        path: "/mq/produce",
        body: form(&[("producer", PRODUCER), ("message", &message_body(size))]),
        per_request: 1,
        size,
        flush,
    };
    let f = measure_produce(env, connections, &load).await?;
    let mut ceilings = vec![
        Ceiling::new("axum", f.http.requests_per_s),
        Ceiling::new("store", f.store_rate),
    ];
    if flush == "sync" {
        ceilings.push(Ceiling::new("conns x flush", connections as f64 * env.flush_rate));
    }
    let label = format!("produce {flush} {} x{connections}", size_label(size));
    let redb = f.redb_row();
    Ok(vec![
        Row::measured(&label, f.measured.requests_per_s, Some(f.measured.latency), ceilings).with_rss(f.rss.0, f.rss.1),
        Row::ceiling("  bare axum, same load", f.http.requests_per_s, Some(f.http.latency)),
        Row::ceiling("  store alone, same writers", f.store_rate, None),
        redb,
    ])
}

/// REST batch produce, `per_batch` messages per request.
pub async fn produce_batch(env: &Env, connections: usize, per_batch: usize, size: usize) -> anyhow::Result<Vec<Row>> {
    let messages = serde_json::to_string(&vec![message_body(size); per_batch])?;
    let load = ProduceLoad {
        path: "/mq/produce/batch",
        body: form(&[("producer", PRODUCER), ("messages", &messages)]),
        per_request: per_batch,
        size,
        flush: "sync",
    };
    let f = measure_produce(env, connections, &load).await?;
    let n = per_batch as f64;
    let label = format!("produce-batch {per_batch} {} x{connections}", size_label(size));
    let redb = f.redb_row();
    Ok(vec![
        Row::measured(
            &label,
            f.measured.requests_per_s * n,
            Some(f.measured.latency),
            vec![
                Ceiling::new("axum", f.http.requests_per_s * n),
                Ceiling::new("store", f.store_rate),
                Ceiling::new("disk seq", env.sequential_rate / (size as f64 + 53.0)),
            ],
        )
        .with_rss(f.rss.0, f.rss.1),
        Row::ceiling(
            "  bare axum, same load",
            f.http.requests_per_s * n,
            Some(f.http.latency),
        ),
        Row::ceiling("  store alone, same batches", f.store_rate, None),
        redb,
        Row::ceiling(
            "  disk sequential write, in messages",
            env.sequential_rate / (size as f64 + 53.0),
            None,
        ),
    ])
}

/// A data directory holding `total` messages of `size` bytes, and the store's own read rate
/// of them with `readers` readers of `per_read` messages.
async fn preloaded(env: &Env, label: &str, total: u64, size: usize, readers: usize) -> anyhow::Result<(PathBuf, f64)> {
    let dir = server::fresh_dir(&env.data_root, label)?;
    let store = ceilings::open_store_with(&dir, FlushPolicy::Async, env.layout)?;
    ceilings::fill(&store, total, 1000, size).await?;
    let read_rate = ceilings::store_read_rate(&store, readers, 128).await?;
    store.close();
    drop(store); // releases the database file for the server
    Ok((dir, read_rate))
}

#[derive(serde::Deserialize)]
struct FetchReply {
    status: i64,
    result: Option<FetchResult>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct FetchResult {
    request_id: Option<String>,
    msg_list_size: u64,
}

fn fetch_path(request_id: Option<&str>) -> String {
    let mut path = format!("/mq/message?topic={TOPIC}&consumer={CONSUMER}");
    if let Some(id) = request_id {
        path.push_str("&requestId=");
        path.push_str(&form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>());
    }
    path
}

/// Pulls (acknowledging the previous batch with the next pull) until `consumed` reaches
/// `total`; the pull latencies.
async fn pull_loop(
    addr: SocketAddr,
    consumed: Arc<AtomicU64>,
    total: u64,
    deadline: Instant,
) -> anyhow::Result<Histogram<u64>> {
    let mut conn = HttpConn::connect(addr).await?;
    let mut hist = histogram();
    let mut request_id: Option<String> = None;
    while consumed.load(Ordering::Relaxed) < total {
        if Instant::now() > deadline {
            bail!(
                "consumed {} of {total} before the deadline",
                consumed.load(Ordering::Relaxed)
            );
        }
        let sent = Instant::now();
        let reply = conn.get(&fetch_path(request_id.as_deref())).await?;
        record(&mut hist, sent.elapsed());
        let reply: FetchReply = serde_json::from_slice(&reply).context("pull reply")?;
        if reply.status != 200 {
            bail!("pull status {}", reply.status);
        }
        let result = reply.result.context("pull reply without result")?;
        consumed.fetch_add(result.msg_list_size, Ordering::Relaxed);
        request_id = result.request_id;
    }
    Ok(hist)
}

/// REST consume: `consumers` clients pulling (max_pull_size 128) and acking `total` stored
/// messages of `size` bytes.
pub async fn consume(env: &Env, consumers: usize, total: u64, size: usize) -> anyhow::Result<Vec<Row>> {
    let (dir, read_rate) = preloaded(env, "consume", total, size, consumers).await?;
    let proc = server::start_mqproxy(&env.server_bin, dir, &env.setup())?;
    let idle_rss = proc.rss_mib().0;
    let (rate, latency) = pull_run(proc.addr, consumers, total).await?;
    // A full pull's reply, for the HTTP ceiling: reset the consumer by pulling from a fresh
    // server would cost a second fill; the ceiling answers a reply of the same size instead.
    let peak_rss = proc.rss_mib().1;
    drop(proc);

    let reply = full_pull_reply(size);
    let per_reply = 128.0;
    let http = http_ceiling(env, &reply, consumers, "/mq/message", Bytes::new()).await?;
    let label = format!("consume {} x{consumers} (pull 128 + ack)", size_label(size));
    Ok(vec![
        Row::measured(
            &label,
            rate,
            Some(latency),
            vec![
                Ceiling::new("axum", http.requests_per_s * per_reply),
                Ceiling::new("store reads", read_rate),
            ],
        )
        .with_rss(idle_rss, peak_rss),
        Row::ceiling(
            "  bare axum, same reply size",
            http.requests_per_s * per_reply,
            Some(http.latency),
        ),
        Row::ceiling("  store reads alone", read_rate, None),
    ])
}

/// Waits for every consumer task (each returns its latencies): messages/s since `started`.
async fn join_consumers(
    mut tasks: tokio::task::JoinSet<anyhow::Result<Histogram<u64>>>,
    consumed: &AtomicU64,
    started: Instant,
) -> anyhow::Result<(f64, Histogram<u64>)> {
    let mut latency = histogram();
    while let Some(h) = tasks.join_next().await {
        latency.add(&h??)?;
    }
    Ok((
        consumed.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64(),
        latency,
    ))
}

/// `consumers` REST pull loops until `total` messages came: messages/s and pull latencies.
pub async fn pull_run(addr: SocketAddr, consumers: usize, total: u64) -> anyhow::Result<(f64, Histogram<u64>)> {
    let consumed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..consumers {
        tasks.spawn(pull_loop(addr, consumed.clone(), total, deadline));
    }
    join_consumers(tasks, &consumed, started).await
}

/// A pull reply of 128 messages of `size` bytes, shaped as mqproxy's (for the HTTP ceiling).
fn full_pull_reply(size: usize) -> Bytes {
    let body = message_body(size);
    let messages: Vec<serde_json::Value> = (0..128)
        .map(|i| {
            serde_json::json!({
                "msgId": format!("7F00000100002A9F00000000{:08X}", i),
                "message": body,
                "timestamp": 1_764_000_000_000u64 + i,
            })
        })
        .collect();
    let reply = serde_json::json!({
        "status": 200,
        "result": {
            "status": "FOUND",
            "requestId": "Ym9ndXMtcmVxdWVzdC1pZC1vZi10aGUtc2FtZS1sZW5ndGgtYXMtYS1yZWFsLW9uZS0xMjM0NTY3ODkw",
            "msgListSize": 128,
            "msgList": messages,
            "retryMsgListSize": 0,
            "retryMsgList": [],
        }
    });
    Bytes::from(reply.to_string())
}

/// A gRPC Consume stream: subscribes, acks every batch; counts messages into `consumed` until
/// it reaches `total`. Per-batch gaps are its latencies.
async fn stream_loop(
    addr: SocketAddr,
    consumed: Arc<AtomicU64>,
    total: u64,
    deadline: Instant,
    done: tokio::sync::watch::Sender<bool>,
) -> anyhow::Result<Histogram<u64>> {
    use pb::consume_request::Command;
    use pb::consume_response::Event;
    let mut grpc = pb::messaging_service_client::MessagingServiceClient::connect(format!("http://{addr}")).await?;
    grpc = grpc.max_decoding_message_size(64 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tx.send(subscribe(8)).await?;
    let mut events = grpc
        .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut hist = histogram();
    let mut last = Instant::now();
    let mut finished = done.subscribe();
    while !*finished.borrow() {
        let event = tokio::select! {
            event = tokio::time::timeout_at(deadline.into(), events.message()) => event,
            _ = finished.changed() => break,
        };
        let event = event.context("stream consume deadline")??.context("stream ended")?;
        if let Some(Event::Batch(batch)) = event.event {
            record(&mut hist, last.elapsed());
            last = Instant::now();
            let n = batch.messages.len() as u64;
            if consumed.fetch_add(n, Ordering::Relaxed) + n >= total {
                done.send_replace(true);
            }
            tx.send(pb::ConsumeRequest {
                command: Some(Command::Ack(batch.request_id)),
            })
            .await?;
        }
    }
    Ok(hist)
}

fn subscribe(max_in_flight: u32) -> pb::ConsumeRequest {
    pb::ConsumeRequest {
        command: Some(pb::consume_request::Command::Subscribe(pb::Subscribe {
            target: Some(pb::ConsumeTarget {
                topic: TOPIC.into(),
                consumer: CONSUMER.into(),
                client_id: None,
                lite_topic: None,
            }),
            max_in_flight: Some(max_in_flight),
            max_pull_size: None,
            auto_ack: false,
            ..Default::default()
        })),
    }
}

/// gRPC streaming consume: `streams` Consume streams acking `total` stored messages.
pub async fn stream(env: &Env, streams: usize, total: u64, size: usize) -> anyhow::Result<Vec<Row>> {
    let (dir, read_rate) = preloaded(env, "stream", total, size, streams).await?;
    let proc = server::start_mqproxy(&env.server_bin, dir, &env.setup())?;
    let idle_rss = proc.rss_mib().0;
    let (rate, latency) = stream_run(proc.addr, streams, total).await?;
    let peak_rss = proc.rss_mib().1;
    drop(proc);
    let ceiling = server::start_grpc_ceiling(size)?;
    let (grpc_rate, grpc_latency) = stream_run(ceiling.addr, streams, total).await?;
    drop(ceiling);
    Ok(vec![
        Row::measured(
            &format!("stream {} x{streams} (gRPC, batches of 128)", size_label(size)),
            rate,
            Some(latency),
            vec![Ceiling::new("tonic", grpc_rate), Ceiling::new("store reads", read_rate)],
        )
        .with_rss(idle_rss, peak_rss),
        Row::ceiling("  bare tonic stream, same batches", grpc_rate, Some(grpc_latency)),
        Row::ceiling("  store reads alone", read_rate, None),
    ])
}

/// `streams` Consume streams against `addr` until `total` messages arrived: messages/s and
/// the gaps between batches.
pub async fn stream_run(addr: SocketAddr, streams: usize, total: u64) -> anyhow::Result<(f64, Histogram<u64>)> {
    let consumed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let done = tokio::sync::watch::Sender::new(false);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        tasks.spawn(stream_loop(addr, consumed.clone(), total, deadline, done.clone()));
    }
    join_consumers(tasks, &consumed, started).await
}

/// Produce one message at a time over REST; the time until a waiting gRPC Consume stream
/// delivers it.
pub async fn e2e_latency(env: &Env, count: usize, size: usize) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for push in [Push::Grpc, Push::Sse] {
        rows.push(e2e_latency_of(env, push, count, size).await?);
    }
    Ok(rows)
}

/// How the e2e scenario receives what it produced.
#[derive(Clone, Copy)]
enum Push {
    /// A gRPC Consume stream, acked on the stream.
    Grpc,
    /// `/mq/stream` (Server-Sent Events), acked with `/mq/ack`.
    Sse,
}

/// The open receiving side of one e2e run.
enum Receiver {
    Grpc {
        events: tonic::Streaming<pb::ConsumeResponse>,
        acks: tokio::sync::mpsc::Sender<pb::ConsumeRequest>,
    },
    Sse {
        events: client::EventStream,
        acks: HttpConn,
    },
}

impl Receiver {
    async fn open(push: Push, addr: SocketAddr) -> anyhow::Result<Self> {
        Ok(match push {
            Push::Grpc => {
                let mut grpc =
                    pb::messaging_service_client::MessagingServiceClient::connect(format!("http://{addr}")).await?;
                let (acks, rx) = tokio::sync::mpsc::channel(16);
                acks.send(subscribe(4)).await?;
                let events = grpc
                    .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await?
                    .into_inner();
                Self::Grpc { events, acks }
            }
            Push::Sse => Self::Sse {
                events: HttpConn::connect(addr)
                    .await?
                    .event_stream(&format!("/mq/stream?topic={TOPIC}&consumer={CONSUMER}&maxInFlight=4"))
                    .await?,
                acks: HttpConn::connect(addr).await?,
            },
        })
    }

    /// Waits for the next batch; returns once it arrived, after sending its ack.
    async fn delivered(&mut self, latency: &mut Histogram<u64>, sent: Instant) -> anyhow::Result<()> {
        match self {
            Self::Grpc { events, acks } => loop {
                let event = events.message().await?.context("stream ended")?;
                if let Some(pb::consume_response::Event::Batch(batch)) = event.event {
                    record(latency, sent.elapsed());
                    let ack = pb::consume_request::Command::Ack(batch.request_id);
                    acks.send(pb::ConsumeRequest { command: Some(ack) }).await?;
                    return Ok(());
                }
            },
            Self::Sse { events, acks } => {
                let request_id = events.next_batch_id().await?;
                record(latency, sent.elapsed());
                let ack = form(&[("topic", TOPIC), ("consumer", CONSUMER), ("requestId", &request_id)]);
                let reply = acks.post_form("/mq/ack", ack).await?;
                if client::body_status(&reply)? != 200 {
                    bail!("ack: {}", String::from_utf8_lossy(&reply));
                }
                Ok(())
            }
        }
    }
}

/// Produce one message at a time over REST and time until `push` delivers it.
async fn e2e_latency_of(env: &Env, push: Push, count: usize, size: usize) -> anyhow::Result<Row> {
    let proc = server::start_mqproxy(&env.server_bin, server::fresh_dir(&env.data_root, "e2e")?, &env.setup())?;
    let idle_rss = proc.rss_mib().0;
    let mut receiver = Receiver::open(push, proc.addr).await?;
    let mut producer = HttpConn::connect(proc.addr).await?;
    let body = form(&[("producer", PRODUCER), ("message", &message_body(size))]);
    let mut latency = histogram();
    let started = Instant::now();
    for _ in 0..count {
        let sent = Instant::now();
        let reply = producer.post_form("/mq/produce", body.clone()).await?;
        if client::body_status(&reply)? != 200 {
            bail!("produce: {}", String::from_utf8_lossy(&reply));
        }
        tokio::time::timeout(Duration::from_secs(10), receiver.delivered(&mut latency, sent))
            .await
            .context("no delivery within 10 s")??;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    let peak_rss = proc.rss_mib().1;
    drop(proc);
    let how = match push {
        Push::Grpc => "gRPC stream",
        Push::Sse => "SSE",
    };
    Ok(Row::measured(
        &format!("e2e-latency {} produce -> {how}", size_label(size)),
        rate,
        Some(latency),
        vec![],
    )
    .with_rss(idle_rss, peak_rss)
    .with_note(format!("floor: one fdatasync = {:.2} ms", 1000.0 / env.flush_rate)))
}

/// Pull latency of one consumer (pull 128 + ack) over a backlog of `stored` 128-byte
/// messages, for the run's duration.
pub async fn backlog(env: &Env, stored: u64) -> anyhow::Result<Row> {
    // Up to ~570 bytes per stored 128-byte message (the redb layout), plus room to spare.
    let needed = stored.saturating_mul(600) + (4 << 30);
    let free = free_bytes(&env.data_root);
    if free < needed {
        return Ok(Row::measured(
            &format!("backlog {} stored, pull 128", count_label(stored)),
            0.0,
            None,
            vec![],
        )
        .with_note(format!(
            "skipped: needs ~{} GiB free under {}, has {}",
            needed >> 30,
            env.data_root.display(),
            free >> 30
        )));
    }
    let dir = server::fresh_dir(&env.data_root, "backlog")?;
    let fill_started = Instant::now();
    let store = ceilings::open_store(&dir, FlushPolicy::Async)?;
    ceilings::fill(&store, stored, 4096, 128).await?;
    store.close();
    drop(store); // releases the database file for the server
    let fill_s = fill_started.elapsed().as_secs_f64();
    let disk = dir_size(&dir);
    // Start-up: from the spawn to the first answer of /readyz (the "listening" line comes
    // before the store is open; requests wait for it).
    let start = Instant::now();
    let proc = server::start_mqproxy(&env.server_bin, dir, &env.setup())?;
    HttpConn::connect(proc.addr).await?.get("/readyz").await?;
    let start_s = start.elapsed().as_secs_f64();
    let idle_rss = proc.rss_mib().0;
    // The first WARMUP_PULLS pulls warm up; then pull until the time is up or half the
    // backlog is read (the backlog stays deep).
    const WARMUP_PULLS: u32 = 20;
    let mut conn = HttpConn::connect(proc.addr).await?;
    let mut latency = histogram();
    let mut request_id: Option<String> = None;
    let (mut read, mut measured, mut pulls) = (0u64, 0u64, 0u32);
    let mut measure_from = Instant::now();
    let mut end = measure_from + env.duration;
    while Instant::now() < end && read < stored / 2 {
        if pulls == WARMUP_PULLS {
            measure_from = Instant::now();
            end = measure_from + env.duration;
        }
        pulls += 1;
        let sent = Instant::now();
        let reply = conn.get(&fetch_path(request_id.as_deref())).await?;
        let reply: FetchReply = serde_json::from_slice(&reply)?;
        let result = reply.result.context("pull reply without result")?;
        if result.msg_list_size == 0 {
            bail!("the backlog ran dry after {read} messages");
        }
        read += result.msg_list_size;
        if pulls > WARMUP_PULLS {
            record(&mut latency, sent.elapsed());
            measured += result.msg_list_size;
        }
        request_id = result.request_id;
    }
    let rate = measured as f64 / measure_from.elapsed().as_secs_f64().max(1e-3);
    let peak_rss = proc.rss_mib().1;
    drop(proc);
    Ok(Row::measured(
        &format!("backlog {} stored, pull 128", count_label(stored)),
        rate,
        Some(latency),
        vec![],
    )
    .with_rss(idle_rss, peak_rss)
    .with_note(format!(
        "filled in {fill_s:.1} s, {:.0} MiB on disk ({:.0} B per message), server up in {start_s:.2} s",
        disk as f64 / f64::from(1u32 << 20),
        disk as f64 / stored.max(1) as f64
    )))
}

/// Free bytes on the file system holding `dir` (0 when unknown).
fn free_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return 0;
    };
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a zeroed statvfs the call fills in.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return 0;
    }
    stat.f_bavail.saturating_mul(stat.f_frsize)
}

/// Disk space the files under `dir` take (allocated blocks, subdirectories included: the
/// commit log's preallocated segments count whole).
fn dir_size(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.blocks() * 512,
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

pub fn size_label(size: usize) -> String {
    if size >= 1024 && size.is_multiple_of(1024) {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

pub fn count_label(n: u64) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else if n >= 1_000 && n.is_multiple_of(1_000) {
        format!("{}k", n / 1_000)
    } else {
        n.to_string()
    }
}
