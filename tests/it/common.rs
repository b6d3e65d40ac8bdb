//! The test harness: the real server (`mqproxy::server::run`) on 127.0.0.1:0 with its own
//! data directory, and an HTTP client. Every test talks HTTP to it.

#![allow(dead_code)]

use mqproxy::config::Config;
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub const TOPIC: &str = "mqcloud-http-test-topic";
pub const PRODUCER: &str = "mqcloud-http-test-topic-producer";
pub const CLUSTERING: &str = "http-clustering-consumer";
pub const BROADCAST: &str = "http-broadcast-consumer";

pub struct TestServer {
    /// The public listener.
    pub base: String,
    /// The admin listener (admin API and console for loopback clients without a token).
    pub admin_base: String,
    pub client: reqwest::Client,
    pub data_dir: PathBuf,
    pub config: Config,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _tmp: Option<tempfile::TempDir>,
}

/// The demo registry, or the given TOML.
pub fn config(toml: Option<&str>) -> Config {
    match toml {
        Some(t) => Config::from_toml(t, "(test)").expect("test config is valid"),
        None => Config::demo(),
    }
}

impl TestServer {
    pub async fn start() -> Self {
        Self::with_config(config(None)).await
    }

    pub async fn with_toml(toml: &str) -> Self {
        Self::with_config(config(Some(toml))).await
    }

    pub async fn with_config(mut config: Config) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        config.data_dir = tmp.path().to_path_buf();
        // The same suite runs with the consumer state in Redis when asked (scripts/test does);
        // a test that set its own Redis state (proxies sharing one) keeps it.
        let own_redis = config.consumer_state.kind == mqproxy::store::consumer_state::ConsumerStateKind::Redis;
        if std::env::var("MQPROXY_TEST_STATE").as_deref() == Ok("redis") && !own_redis {
            config.consumer_state.kind = mqproxy::store::consumer_state::ConsumerStateKind::Redis;
            config.consumer_state.url = Some(
                std::env::var("MQPROXY_TEST_REDIS_URL").expect("MQPROXY_TEST_STATE=redis needs MQPROXY_TEST_REDIS_URL"),
            );
            config.consumer_state.prefix = format!("mqproxy-test-{}:", unique_suffix());
        }
        // ... and with the messages on a RocketMQ cluster (scripts/test starts a local one).
        if rocketmq_backend() && config.backend == mqproxy::config::Backend::Embedded {
            use_rocketmq(&mut config, &format!("t{}-", unique_suffix()));
        }
        let mut server = Self::launch(config).await;
        server._tmp = Some(tmp);
        server
    }

    async fn launch(mut config: Config) -> Self {
        config.listen = "127.0.0.1:0".into();
        config.admin_listen = Some("127.0.0.1:0".into());
        let listeners = mqproxy::server::Listeners::bind(&config).await.expect("bind");
        let base = format!("http://{}", listeners.public.local_addr().expect("addr"));
        let admin_base = format!(
            "http://{}",
            listeners
                .admin
                .as_ref()
                .expect("admin listener")
                .local_addr()
                .expect("addr")
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run_config = config.clone();
        let task = tokio::spawn(async move {
            mqproxy::server::run(run_config, listeners, async {
                let _ = stopped.await;
            })
            .await
            .expect("server runs");
        });
        let client = reqwest::Client::builder().cookie_store(true).build().expect("client");
        Self {
            base,
            admin_base,
            client,
            data_dir: config.data_dir.clone(),
            config,
            stop: Some(stop),
            task: Some(task),
            _tmp: None,
        }
    }

    /// Graceful stop (flush), then a new server on the same data directory.
    pub async fn restart(self) -> Self {
        self.restart_with(|_| {}).await
    }

    /// Graceful stop, then a new server on the same data directory with a changed config.
    pub async fn restart_with(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(&mut self.config);
        self.shutdown().await;
        let tmp = self._tmp.take();
        let mut server = Self::launch(self.config.clone()).await;
        server._tmp = tmp;
        server
    }

    pub async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }

    /// The URL of `path`: admin paths on the admin listener, the rest on the public one.
    pub fn url(&self, path: &str) -> String {
        if mqproxy::http::admin_auth::is_admin_path(path) {
            format!("{}{path}", self.admin_base)
        } else {
            format!("{}{path}", self.base)
        }
    }

    pub async fn post(&self, path: &str, form: &[(&str, &str)]) -> Value {
        let resp = self.client.post(self.url(path)).form(form).send().await.expect("POST");
        resp.json().await.expect("JSON answer")
    }

    pub async fn get(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let resp = self.client.get(self.url(path)).query(query).send().await.expect("GET");
        resp.json().await.expect("JSON answer")
    }

    /// `GET /metrics` (the text exposition).
    pub async fn metrics_text(&self) -> String {
        let resp = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("metrics");
        assert_eq!(resp.status(), 200);
        resp.text().await.expect("text")
    }

    pub async fn produce(&self, message: &str) -> Value {
        let v = self
            .post("/mq/produce", &[("producer", PRODUCER), ("message", message)])
            .await;
        assert_eq!(v["status"], 200, "{v}");
        v
    }

    /// One `/mq/message` call of a clustering consumer.
    pub async fn fetch(&self, consumer: &str, request_id: Option<&str>) -> Value {
        let mut q = vec![("topic", TOPIC), ("consumer", consumer)];
        if let Some(r) = request_id {
            q.push(("requestId", r));
        }
        let v = self.get("/mq/message", &q).await;
        assert_eq!(v["status"], 200, "{v}");
        v
    }

    /// Pulls (acking as it goes) until nothing new comes; returns the bodies.
    pub async fn drain(&self, consumer: &str, client_id: Option<&str>) -> Vec<String> {
        let mut bodies = Vec::new();
        let mut rid: Option<String> = None;
        let mut empty_in_a_row = 0;
        while empty_in_a_row < 8 {
            let mut q = vec![("topic", TOPIC), ("consumer", consumer)];
            if let Some(c) = client_id {
                q.push(("clientId", c));
            }
            if let Some(r) = &rid {
                q.push(("requestId", r));
            }
            let v = self.get("/mq/message", &q).await;
            assert_eq!(v["status"], 200, "{v}");
            rid = v["result"]["requestId"].as_str().map(str::to_owned);
            let list = bodies_of(&v);
            if list.is_empty() {
                empty_in_a_row += 1;
            } else {
                empty_in_a_row = 0;
            }
            bodies.extend(list);
        }
        bodies
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// POST a form, read the JSON answer.
pub async fn post_json(client: &reqwest::Client, url: &str, form: &[(&str, &str)]) -> Value {
    let resp = client.post(url).form(form).send().await.expect("POST");
    resp.json().await.expect("JSON answer")
}

/// GET with a query, read the JSON answer.
pub async fn get_json<Q: serde::Serialize + ?Sized>(client: &reqwest::Client, url: &str, query: &Q) -> Value {
    let resp = client.get(url).query(query).send().await.expect("GET");
    resp.json().await.expect("JSON answer")
}

pub fn bodies_of(v: &Value) -> Vec<String> {
    v["result"]["msgList"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|m| m["message"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `check` until it returns Some, or panics after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// True when the suite runs against a RocketMQ cluster (`MQPROXY_TEST_BACKEND=rocketmq`).
pub fn rocketmq_backend() -> bool {
    std::env::var("MQPROXY_TEST_BACKEND").as_deref() == Ok("rocketmq")
}

/// Whether the backend has timer messages (`deliveryTimestamp`): not on a RocketMQ 4.x cluster
/// (`MQPROXY_TEST_ROCKETMQ_MAJOR=4`, the smoke pass), where mqproxy refuses them with a 400.
pub fn timer_messages() -> bool {
    !(rocketmq_backend() && std::env::var("MQPROXY_TEST_ROCKETMQ_MAJOR").as_deref() == Ok("4"))
}

/// A 4.x cluster's answer to a `deliveryTimestamp`: a 400 that names the missing feature.
pub fn assert_no_timer_messages(v: &serde_json::Value) {
    assert_eq!(v["status"], 400, "{v}");
    let message = v["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("deliveryTimestamp needs timer messages") && message.contains("4.9"),
        "{v}"
    );
}

/// How many brokers a topic of the suite spreads over: `MQPROXY_TEST_BROKERS` on a RocketMQ
/// cluster (default 1), else 1. A topic of `queues = n` has `n * brokers()` queues.
pub fn brokers() -> u32 {
    if !rocketmq_backend() {
        return 1;
    }
    std::env::var("MQPROXY_TEST_BROKERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

/// The test cluster's name server (`MQPROXY_TEST_NAMESRV`, default 127.0.0.1:9876).
pub fn namesrv_addr() -> String {
    std::env::var("MQPROXY_TEST_NAMESRV").unwrap_or_else(|_| "127.0.0.1:9876".into())
}

/// Points `config` at the test cluster; `topic_prefix` keeps this server's topics apart from
/// every other test's on the shared broker.
pub fn use_rocketmq(config: &mut Config, topic_prefix: &str) {
    config.backend = mqproxy::config::Backend::Rocketmq;
    config.rocketmq.namesrv_addr = namesrv_addr();
    config.rocketmq.auto_create_topics = true;
    // RocketMQ gives a topic its `queues` on every broker it is created on: a test about one
    // queue (every topic has one) gets its topics on one broker, all others' spread over all.
    if config.topics.iter().all(|t| t.queues == 1) {
        config.rocketmq.cluster = std::env::var("MQPROXY_TEST_BROKER").unwrap_or_else(|_| "broker-a".into());
    }
    config.rocketmq.topic_prefix = topic_prefix.to_owned();
    config.rocketmq.offset_refresh_ms = 100;
}

/// Skips a test that is about the embedded store itself when the suite runs on RocketMQ.
pub fn embedded_only(what: &str) -> bool {
    if rocketmq_backend() {
        eprintln!("skipped on the RocketMQ backend: {what}");
        return true;
    }
    false
}

/// A suffix that keeps each test server's Redis keys apart.
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        now_ms(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

/// The requestId of a fetch answer.
pub fn rid(v: &Value) -> String {
    v["result"]["requestId"]
        .as_str()
        .unwrap_or_else(|| panic!("no requestId in {v}"))
        .to_owned()
}

/// One topic with one queue, its producer and a clustering consumer `c` (plus `extra` TOML,
/// which continues the consumer's table first).
pub fn one_queue(extra: &str) -> String {
    format!(
        "[[topic]]\nname=\"{TOPIC}\"\nqueues=1\n[[producer]]\nname=\"{PRODUCER}\"\ntopic=\"{TOPIC}\"\n\
         [[consumer]]\nname=\"c\"\ntopic=\"{TOPIC}\"\n{extra}"
    )
}

impl TestServer {
    /// The Set-Cookie header of one GET /mq/message, and its JSON answer.
    pub async fn fetch_with_cookie(&self, query: &[(&str, &str)]) -> (String, Value) {
        let resp = self
            .client
            .get(format!("{}/mq/message", self.base))
            .query(query)
            .send()
            .await
            .expect("get");
        let cookie = resp
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        (cookie, resp.json().await.expect("json"))
    }
}

/// The `mqproxy` binary running as a child process.
pub struct Proc {
    pub child: std::process::Child,
    pub base: String,
    /// The admin listener, from the "listening" line.
    pub admin_base: String,
}

impl Proc {
    /// Starts `BIN serve --listen 127.0.0.1:0 ARGS...` and waits for its "listening" line.
    pub fn spawn(bin: &str, args: &[String]) -> Self {
        Self::spawn_logging(bin, args, "warn", std::process::Stdio::null())
    }

    /// [`Proc::spawn`] with these environment variables set for the server.
    pub fn spawn_with_env(bin: &str, args: &[String], env: &[(&str, &str)]) -> Self {
        Self::start(bin, args, env, "warn", std::process::Stdio::null())
    }

    /// [`Proc::spawn`] with the server's log (stderr, `RUST_LOG=level`) sent to `log`.
    pub fn spawn_logging(bin: &str, args: &[String], level: &str, log: impl Into<std::process::Stdio>) -> Self {
        Self::start(bin, args, &[], level, log)
    }

    fn start(
        bin: &str,
        args: &[String],
        env: &[(&str, &str)],
        level: &str,
        log: impl Into<std::process::Stdio>,
    ) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", level)
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn mqproxy");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the listening line");
        let base = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        let admin_base = line
            .split_once("admin API and console: ")
            .and_then(|(_, rest)| rest.split("/console/").next())
            .unwrap_or_else(|| panic!("no admin address in {line:?}"))
            .to_owned();
        Self {
            child,
            base,
            admin_base,
        }
    }

    /// SIGKILL (no shutdown of any kind), and reap it.
    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
