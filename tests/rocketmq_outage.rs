//! The broker goes away under a running mqproxy (its own test binary: it stops the shared
//! local broker, so no other test may run meanwhile). Run with `MQPROXY_TEST_BACKEND=rocketmq`
//! against the cluster of `scripts/rocketmq-local.sh`.

mod common;
use common::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The local cluster's run directory (pid files), as `scripts/rocketmq-local.sh` uses it.
fn rmq_run() -> PathBuf {
    std::env::var_os("RMQ_RUN").map_or_else(
        || PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/mqproxy-rocketmq/run"),
        PathBuf::from,
    )
}

fn broker_pid() -> i32 {
    let path = rmq_run().join("broker.pid");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .expect("pid")
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a valid signal number.
    unsafe { libc::kill(pid, sig) };
}

fn start_cluster() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/rocketmq-local.sh");
    let status = std::process::Command::new(script)
        .arg("start")
        .status()
        .expect("run rocketmq-local.sh");
    assert!(status.success(), "rocketmq-local.sh start failed");
}

/// Whatever happens in the test, the broker runs again afterwards.
struct BrokerBack;

impl Drop for BrokerBack {
    fn drop(&mut self) {
        signal(broker_pid(), libc::SIGCONT);
        start_cluster();
    }
}

/// A hung broker: the send times out, and since it may have been stored the answer is 300
/// (outcome unknown) within the send timeout. A dead broker: 500 with the reason, fast. The
/// server stays up all along and works again once the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_answers_300_or_500_and_recovers() {
    if !rocketmq_backend() {
        eprintln!("skipped: set MQPROXY_TEST_BACKEND=rocketmq with a running cluster (scripts/test does)");
        return;
    }
    let mut config = config(Some(&one_queue("")));
    use_rocketmq(&mut config, &format!("outage-{}-", unique_suffix()));
    config.rocketmq.send_timeout_ms = 1_000;
    config.rocketmq.pull_timeout_ms = 1_000;
    let s = TestServer::with_config(config).await;
    s.produce("before").await;
    let _back = BrokerBack;

    // Hung broker (SIGSTOP): 300 within the send timeout (plus scheduling slack).
    signal(broker_pid(), libc::SIGSTOP);
    let started = Instant::now();
    let v = s
        .post("/mq/produce", &[("producer", PRODUCER), ("message", "while hung")])
        .await;
    let took = started.elapsed();
    assert_eq!(v["status"], 300, "{v}");
    assert!(
        v["message"].as_str().unwrap_or_default().contains("outcome unknown"),
        "{v}"
    );
    assert!(took < Duration::from_secs(4), "answered after {took:?}");
    let health = s.get("/healthz", &[]).await;
    assert_eq!(health["status"], 200, "the server stays up: {health}");
    signal(broker_pid(), libc::SIGCONT);

    // Dead broker (kill -9): 500 naming the failure, quickly, and not ready.
    signal(broker_pid(), libc::SIGKILL);
    let v = eventually(Duration::from_secs(10), "a 500 from the dead broker", || async {
        let v = s
            .post("/mq/produce", &[("producer", PRODUCER), ("message", "while dead")])
            .await;
        (v["status"] == 500).then_some(v)
    })
    .await;
    assert!(v["message"].as_str().unwrap_or_default().contains("send failed"), "{v}");
    let ready = s.client.get(format!("{}/readyz", s.base)).send().await.expect("readyz");
    assert_ne!(ready.status(), 200, "not ready without a broker");
    let pull = s.get("/mq/message", &[("topic", TOPIC), ("consumer", "c")]).await;
    assert_eq!(pull["status"], 500, "{pull}");

    // Back: produce and consume work again, and what was stored before is still there.
    tokio::task::spawn_blocking(start_cluster).await.expect("restart");
    eventually(Duration::from_secs(30), "produce after the broker is back", || async {
        let v = s
            .post("/mq/produce", &[("producer", PRODUCER), ("message", "after")])
            .await;
        (v["status"] == 200).then_some(())
    })
    .await;
    // Sends recover at once; the client's pulls only after about 30 s (see ARCHITECTURE.md).
    let bodies = eventually(Duration::from_secs(60), "consume after the broker is back", || async {
        let v = s.get("/mq/message", &[("topic", TOPIC), ("consumer", "c")]).await;
        let b = bodies_of(&v);
        b.contains(&"after".to_owned()).then_some(b)
    })
    .await;
    assert_eq!(bodies.first().map(String::as_str), Some("before"), "{bodies:?}");
}
