//! The broker goes away under a running mqproxy (its own test binary: it stops the shared
//! local broker, so no other test may run meanwhile). Run with `MQPROXY_TEST_BACKEND=rocketmq`
//! against the cluster of `scripts/rocketmq-local.sh`, or of `scripts/rocketmq-apache.sh` with
//! `MQPROXY_TEST_CLUSTER=apache` (the test's one-queue topic lives on broker-a).

mod common;
use common::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The local cluster's script: `scripts/rocketmq-apache.sh` with `MQPROXY_TEST_CLUSTER=apache`,
/// else `scripts/rocketmq-local.sh` (the Rust broker).
fn cluster_script() -> PathBuf {
    let name = if std::env::var("MQPROXY_TEST_CLUSTER").as_deref() == Ok("apache") {
        "scripts/rocketmq-apache.sh"
    } else {
        "scripts/rocketmq-local.sh"
    };
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// The pid of the broker holding the test's topic (`broker-a`; one-queue topics live there).
fn broker_pid() -> i32 {
    let out = std::process::Command::new(cluster_script())
        .args(["pid", "broker-a"])
        .output()
        .expect("run the cluster script");
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("no broker pid from {}: {text:?}", cluster_script().display()))
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a valid signal number.
    unsafe { libc::kill(pid, sig) };
}

fn start_cluster() {
    let status = std::process::Command::new(cluster_script())
        .arg("start")
        .status()
        .expect("run the cluster script");
    assert!(status.success(), "{} start failed", cluster_script().display());
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
