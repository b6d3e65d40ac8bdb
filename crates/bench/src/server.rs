//! Processes under test: the real `mqproxy` binary on a fresh data directory, and the bare
//! axum "HTTP ceiling" (this binary in its `http-ceiling` mode). Each runs in its own process
//! so its RSS is its own and the load generator's CPU is not counted as the server's.

use anyhow::{Context, bail};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TOPIC: &str = "bench-topic";
pub const PRODUCER: &str = "bench-producer";
pub const CONSUMER: &str = "bench-consumer";
/// Queues of the bench topic: at least the largest consumer count, so consumers do not wait
/// for each other's queue locks.
pub const QUEUES: u32 = 8;

/// How the server under test is set up.
#[derive(Clone, Debug)]
pub struct ServerSetup {
    pub flush: &'static str,
    pub max_pull_size: u32,
    /// Extra TOML appended to the generated config (e.g. the RocketMQ backend).
    pub extra_toml: String,
}

impl Default for ServerSetup {
    fn default() -> Self {
        Self {
            flush: "sync",
            max_pull_size: 128,
            extra_toml: String::new(),
        }
    }
}

/// A child process that is killed (and its data directory removed) when dropped.
pub struct Proc {
    child: Child,
    pub addr: SocketAddr,
    dir: Option<PathBuf>,
}

impl Proc {
    /// Resident set size now and its peak so far, in MiB (Linux `/proc`).
    pub fn rss_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .map_or(f64::NAN, |kib| kib / 1024.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    fn terminate(&mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is shared.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate();
        // MQPROXY_BENCH_KEEP=1 keeps data directories (and the server's log) for a look.
        if let Some(dir) = &self.dir
            && std::env::var_os("MQPROXY_BENCH_KEEP").is_none()
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Waits for the line `prefix ADDR ...` on the child's stdout; the address.
fn await_listening(child: &mut Child, prefix: &str) -> anyhow::Result<SocketAddr> {
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line?;
        if let Some(rest) = line.strip_prefix(prefix) {
            let addr = rest
                .trim_start_matches("http://")
                .split_whitespace()
                .next()
                .unwrap_or_default();
            // Keep draining stdout so the child never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return addr.parse().with_context(|| format!("bad address in {line:?}"));
        }
    }
    bail!("the process ended before listening (see its log)")
}

/// The `mqproxy` binary next to this one (`cargo build --release` builds both).
pub fn default_server_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("mqproxy")))
        .unwrap_or_else(|| PathBuf::from("mqproxy"))
}

/// A fresh directory under `root`.
pub fn fresh_dir(root: &Path, label: &str) -> anyhow::Result<PathBuf> {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = root.join(format!("mqproxy-bench-{}-{n}-{label}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

/// Starts `mqproxy` on `data_dir` (created when missing) with the bench registry.
pub fn start_mqproxy(bin: &Path, data_dir: PathBuf, setup: &ServerSetup) -> anyhow::Result<Proc> {
    if !bin.exists() {
        bail!(
            "server binary {} not found: run `cargo build --release --bins` first (or pass --server-bin)",
            bin.display()
        );
    }
    std::fs::create_dir_all(&data_dir)?;
    let config = format!(
        r#"listen = "127.0.0.1:0"
data_dir = "{data}"
store.flush = "{flush}"
consume.default_rate_limit = 1000000
{extra}

[[topic]]
name = "{TOPIC}"
queues = {QUEUES}

[[producer]]
name = "{PRODUCER}"
topic = "{TOPIC}"

[[consumer]]
name = "{CONSUMER}"
topic = "{TOPIC}"
max_pull_size = {pull}
"#,
        data = data_dir.display(),
        flush = setup.flush,
        extra = setup.extra_toml,
        pull = setup.max_pull_size,
    );
    let config_path = data_dir.join("bench.toml");
    std::fs::write(&config_path, config)?;
    let log = std::fs::File::create(data_dir.join("server.log"))?;
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(&config_path)
        .env(
            "RUST_LOG",
            std::env::var("MQPROXY_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    let addr = match await_listening(&mut child, "mqproxy listening on ") {
        Ok(addr) => addr,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            let log = data_dir.join("server.log");
            return Err(e.context(format!("mqproxy did not start; its log: {}", log.display())));
        }
    };
    Ok(Proc {
        child,
        addr,
        dir: Some(data_dir),
    })
}

/// Starts this binary's bare axum handler answering every request with `reply`.
pub fn start_http_ceiling(reply_file: &Path) -> anyhow::Result<Proc> {
    start_ceiling(
        &["http-ceiling".as_ref(), "--reply-file".as_ref(), reply_file.as_os_str()],
        "http ceiling listening on ",
    )
}

/// Starts this binary's bare gRPC Consume server sending batches of `size`-byte messages.
pub fn start_grpc_ceiling(size: usize) -> anyhow::Result<Proc> {
    let size = size.to_string();
    start_ceiling(
        &["grpc-ceiling".as_ref(), "--size".as_ref(), size.as_ref()],
        "grpc ceiling listening on ",
    )
}

fn start_ceiling(args: &[&std::ffi::OsStr], listening: &str) -> anyhow::Result<Proc> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start a ceiling server")?;
    match await_listening(&mut child, listening) {
        Ok(addr) => Ok(Proc { child, addr, dir: None }),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// The `http-ceiling` mode: a bare axum server (tokio's default multi-thread runtime, as
/// mqproxy's) answering every request with the same bytes, after reading the request body.
pub async fn serve_http_ceiling(reply_file: &Path) -> anyhow::Result<()> {
    let reply = bytes::Bytes::from(std::fs::read(reply_file)?);
    let app = axum::Router::new().fallback(move |_body: bytes::Bytes| {
        let reply = reply.clone();
        async move { ([(axum::http::header::CONTENT_TYPE, "application/json")], reply) }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("http ceiling listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
