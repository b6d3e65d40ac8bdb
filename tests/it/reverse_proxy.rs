//! mqproxy behind a real nginx on the same host (the stock recipe with forwarding headers, and
//! a bare `proxy_pass`): in the default config no admin operation passes through it without
//! the admin token; with the token it does; the admin listener still serves local operators;
//! produce and consume through nginx are unaffected and record the forwarded client IP.
//! Needs nginx (Debian `nginx-light`, which `.ci/run` installs); without it the test says so
//! and passes, except under CI, where it fails.

use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A free loopback port (bound and released: nginx binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The stock server's `proxy_read_timeout` (nginx's default is 60 s): an upstream silent this
/// long is cut off, so a stream lives past it only on its heartbeats.
const READ_TIMEOUT_S: u64 = 2;

struct Nginx {
    child: Child,
    /// The stock recipe: Host, X-Real-IP, X-Forwarded-For, X-Forwarded-Proto.
    stock: String,
    /// `proxy_pass` alone: no forwarding header at all.
    bare: String,
    _dir: tempfile::TempDir,
}

impl Nginx {
    async fn start(binary: &Path, upstream: &str) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let (stock_port, bare_port) = (free_port(), free_port());
        let upstream = upstream.trim_start_matches("http://");
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             server {{\n    listen 127.0.0.1:{stock_port};\n    location / {{\n      proxy_pass http://{upstream};\n      \
             proxy_set_header Host $host;\n      proxy_set_header X-Real-IP $remote_addr;\n      \
             proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n      \
             proxy_set_header X-Forwarded-Proto $scheme;\n      proxy_read_timeout {READ_TIMEOUT_S}s;\n    }}\n  }}\n  \
             server {{\n    listen 127.0.0.1:{bare_port};\n    location / {{\n      proxy_pass http://{upstream};\n    }}\n  }}\n}}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("nginx.conf");
        let child = Command::new(binary)
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nginx");
        let nginx = Self {
            child,
            stock: format!("http://127.0.0.1:{stock_port}"),
            bare: format!("http://127.0.0.1:{bare_port}"),
            _dir: dir,
        };
        let client = reqwest::Client::new();
        for base in [nginx.stock.clone(), nginx.bare.clone()] {
            eventually(Duration::from_secs(20), "nginx forwards /healthz", || {
                let (client, base) = (client.clone(), base.clone());
                async move {
                    let resp = client.get(format!("{base}/healthz")).send().await.ok()?;
                    (resp.status() == 200).then_some(())
                }
            })
            .await;
        }
        nginx
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_or_skip() -> Option<PathBuf> {
    let found = nginx_binary();
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "nginx is missing: .ci/run installs nginx-light"
        );
        eprintln!("skipped: needs nginx (apt-get install nginx-light)");
    }
    found
}

/// (HTTP status, body status) of an admin call.
async fn admin_call(client: &reqwest::Client, base: &str, token: Option<&str>) -> (u16, i64) {
    let mut req = client
        .post(format!("{base}/admin/consumer/config"))
        .form(&[("consumer", "c"), ("pause", "true")]);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("admin call");
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.expect("json");
    (status, body["status"].as_i64().unwrap_or_default())
}

async fn paused(s: &TestServer) -> bool {
    let v = s.get("/admin/consumer/config", &[("consumer", "c")]).await;
    v["result"]["paused"]
        .as_bool()
        .unwrap_or_else(|| panic!("no paused in {v}"))
}

#[tokio::test]
async fn no_admin_through_a_reverse_proxy_without_the_token() {
    let Some(binary) = nginx_or_skip() else { return };
    let s = TestServer::with_toml(&one_queue("")).await;
    let nginx = Nginx::start(&binary, &s.base).await;
    let client = reqwest::Client::new();
    for base in [&nginx.stock, &nginx.bare] {
        assert_eq!(admin_call(&client, base, None).await, (403, 403), "through {base}");
        // The Java proxy's views and the console's metrics-free calls are admin paths too.
        let view = client
            .get(format!("{base}/mq/clustering/queue/offset?consumer=c"))
            .send()
            .await
            .expect("view");
        assert_eq!(view.status(), 403, "through {base}");
        let registry = client
            .get(format!("{base}/admin/registry"))
            .send()
            .await
            .expect("registry");
        assert_eq!(registry.status(), 403, "through {base}");
    }
    assert!(!paused(&s).await, "nothing was paused");
    // The admin listener serves a local operator without a token, but not a proxied request.
    assert_eq!(admin_call(&client, &s.admin_base, None).await, (200, 200));
    assert!(paused(&s).await);
    let forwarded = client
        .get(format!("{}/admin/registry", s.admin_base))
        .header("X-Forwarded-For", "203.0.113.7")
        .send()
        .await
        .expect("registry");
    assert_eq!(forwarded.status(), 403);
    // The public listener itself refuses admin calls without a configured token.
    assert_eq!(admin_call(&client, &s.base, None).await, (403, 403));
    s.post("/admin/consumer/config", &[("consumer", "c"), ("pause", "false")])
        .await;

    // Produce and consume through nginx as through the server; the forwarded client IP is the
    // one recorded with the queue.
    let produced = post_json(
        &client,
        &format!("{}/mq/produce", nginx.stock),
        &[("producer", PRODUCER), ("message", "via nginx")],
    )
    .await;
    assert_eq!(produced["status"], 200, "{produced}");
    let pulled: serde_json::Value = client
        .get(format!("{}/mq/message", nginx.stock))
        .query(&[("topic", TOPIC), ("consumer", "c")])
        .header("X-Forwarded-For", "203.0.113.7")
        .send()
        .await
        .expect("pull")
        .json()
        .await
        .expect("json");
    assert_eq!(bodies_of(&pulled), ["via nginx"], "{pulled}");
    let view = s.get("/admin/consumer/offsets", &[("consumer", "c")]).await;
    assert_eq!(
        view["result"]["clients"][0]["queues"][0]["lastConsumeClientIp"], "203.0.113.7",
        "{view}"
    );
    let bare_pull = get_json(
        &client,
        &format!("{}/mq/message", nginx.bare),
        &[("topic", TOPIC), ("consumer", "c"), ("requestId", &rid(&pulled))],
    )
    .await;
    assert_eq!(bare_pull["result"]["ackInfo"]["status"], 200, "{bare_pull}");
}

#[tokio::test]
async fn with_the_admin_token_proxied_admin_calls_work() {
    let Some(binary) = nginx_or_skip() else { return };
    let s = TestServer::with_toml(&format!("admin_token = \"n9inx-t0ken\"\n{}", one_queue(""))).await;
    let nginx = Nginx::start(&binary, &s.base).await;
    let client = reqwest::Client::new();
    for base in [&nginx.stock, &nginx.bare] {
        assert_eq!(admin_call(&client, base, None).await, (401, 401), "through {base}");
        assert_eq!(
            admin_call(&client, base, Some("wrong")).await,
            (403, 403),
            "through {base}"
        );
        assert_eq!(
            admin_call(&client, base, Some("n9inx-t0ken")).await,
            (200, 200),
            "through {base}"
        );
    }
    // With a token configured the admin listener needs it as well.
    assert_eq!(admin_call(&client, &s.admin_base, None).await, (401, 401));
}

/// `/mq/stream` through nginx with a read timeout of 2 s: heartbeats (every second) keep it
/// open past that, and events are not held in nginx's buffers (`X-Accel-Buffering: no`).
#[tokio::test]
async fn an_event_stream_lives_through_nginx_on_its_heartbeats() {
    let Some(binary) = nginx_or_skip() else { return };
    let s = TestServer::with_toml(&one_queue("")).await;
    let nginx = Nginx::start(&binary, &s.base).await;
    let client = reqwest::Client::new();
    let query = [("topic", TOPIC), ("consumer", "c"), ("heartbeat", "1")];
    let mut stream = crate::sse::EventStream::open_at(&client, &nginx.stock, &query, None).await;
    let quiet_since = std::time::Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(READ_TIMEOUT_S + 1) {
        stream.heartbeat_without_batch().await;
    }
    s.produce("after a quiet spell").await;
    let (_, bodies) = stream.batch(Duration::from_secs(10)).await;
    assert_eq!(bodies, ["after a quiet spell"]);
}
