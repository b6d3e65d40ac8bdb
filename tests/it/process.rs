//! The `mqproxy` binary as a user runs it: CLI, config errors, SIGTERM, kill -9 durability.

use crate::common::*;
use serde_json::Value;
use std::process::{Child, Command};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_mqproxy");

/// Starts `mqproxy serve` on a free port with `data_dir` and waits for its "listening" line.
fn spawn(data_dir: &std::path::Path, extra: &[&str]) -> Proc {
    let mut args = vec!["--data-dir".to_owned(), data_dir.display().to_string()];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    Proc::spawn(BIN, &args)
}

fn signal(child: &Child, sig: i32) {
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) with a pid we own and a valid signal number.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

#[test]
fn help_explains_each_option() {
    let out = Command::new(BIN).args(["serve", "--help"]).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for opt in ["--config", "--listen", "--data-dir"] {
        assert!(text.contains(opt), "{opt} in {text}");
    }
    assert!(text.contains("demo registry"), "{text}");
}

/// Config errors name the file, the key and the reason, and the process exits non-zero.
#[test]
fn config_errors_exit_non_zero_naming_file_key_and_reason() {
    let dir = tempfile::tempdir().expect("tmp");
    let cases = [
        ("[[topic]]\nname = \"t\"\nqueues = 0\n", "topic[0].queues"),
        (
            "[[topic]]\nname = \"t\"\nqueues = 1\n[[consumer]]\nname = \"c\"\ntopic = \"t\"\nmax_pull_size = 500\n",
            "consumer[0].max_pull_size",
        ),
        (
            "[[topic]]\nname = \"t\"\nqueues = 1\n[[consumer]]\nname = \"c\"\ntopic = \"t\"\nconsume_timeout_ms = 5\n",
            "consumer[0].consume_timeout_ms",
        ),
        ("listen = \"127.0.0.1:0\"\nqueuez = 3\n", "queuez"),
        ("[[producer]]\nname = \"p\"\ntopic = \"missing\"\n", "producer[0].topic"),
    ];
    for (i, (toml, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, toml).expect("write");
        let out = Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{toml} must fail");
        assert!(err.contains(&path.display().to_string()), "file named: {err}");
        assert!(err.contains(key), "key {key} named: {err}");
    }
    let out = Command::new(BIN)
        .args(["serve", "--config", "/nonexistent/mqproxy.toml"])
        .output()
        .expect("run");
    assert!(!out.status.success());
}

/// SIGTERM: in-flight work finishes, the process exits 0, and what it answered is kept.
#[test]
fn sigterm_shuts_down_gracefully() {
    let dir = tempfile::tempdir().expect("tmp");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let mut p = spawn(dir.path(), &[]);
    let client = reqwest::Client::new();
    rt.block_on(async {
        let v: Value = post_json(
            &client,
            &format!("{}/mq/produce", p.base),
            &[("producer", PRODUCER), ("message", "kept")],
        )
        .await;
        assert_eq!(v["status"], 200);
    });
    signal(&p.child, libc::SIGTERM);
    let status = p.child.wait().expect("wait");
    assert!(status.success(), "exit 0 after SIGTERM: {status:?}");
    let mut p = spawn(dir.path(), &[]);
    let got: Value = rt.block_on(async {
        get_json(
            &client,
            &format!("{}/mq/message", p.base),
            &[("topic", TOPIC), ("consumer", CLUSTERING)],
        )
        .await
    });
    assert_eq!(bodies_of(&got), ["kept"]);
    signal(&p.child, libc::SIGINT);
    assert!(p.child.wait().expect("wait").success(), "exit 0 after SIGINT");
}

/// kill -9 while 8 writers produce: after restart every message answered 200 is there and
/// the offset committed before the crash holds.
#[test]
fn kill_9_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().expect("tmp");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let mut p = spawn(dir.path(), &[]);
    let base = p.base.clone();
    // A committed offset before the crash: "pre" is consumed and acknowledged.
    rt.block_on(async {
        let client = reqwest::Client::new();
        let v: Value = post_json(
            &client,
            &format!("{base}/mq/produce"),
            &[("producer", PRODUCER), ("message", "pre")],
        )
        .await;
        assert_eq!(v["status"], 200);
        let got: Value = get_json(
            &client,
            &format!("{base}/mq/message"),
            &[("topic", TOPIC), ("consumer", CLUSTERING)],
        )
        .await;
        assert_eq!(bodies_of(&got), ["pre"]);
        let rid = got["result"]["requestId"].as_str().expect("rid");
        let ack: Value = get_json(
            &client,
            &format!("{base}/mq/ack"),
            &[("topic", TOPIC), ("consumer", CLUSTERING), ("requestId", rid)],
        )
        .await;
        assert!(ack["message"].as_str().is_some_and(|m| m.starts_with("ok")), "{ack}");
    });
    let acknowledged = rt.block_on(async {
        let client = reqwest::Client::new();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut writers = Vec::new();
        for w in 0..8 {
            let (client, base, stop_rx, written) = (client.clone(), base.clone(), stop_rx.clone(), written.clone());
            writers.push(tokio::spawn(async move {
                let mut ok = Vec::new();
                for i in 0..100_000 {
                    if *stop_rx.borrow() {
                        break;
                    }
                    let body = format!("w{w}-{i}");
                    let sent = client
                        .post(format!("{base}/mq/produce"))
                        .form(&[("producer", PRODUCER), ("message", &body)])
                        .send()
                        .await;
                    match sent {
                        Ok(resp) => match resp.json::<Value>().await {
                            Ok(v) if v["status"] == 200 => {
                                ok.push(body);
                                written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            _ => break,
                        },
                        Err(_) => break,
                    }
                }
                ok
            }));
        }
        // Let the writers get going, then kill the server under them.
        eventually(Duration::from_secs(20), "some messages written", || async {
            (written.load(std::sync::atomic::Ordering::Relaxed) > 300).then_some(())
        })
        .await;
        signal(&p.child, libc::SIGKILL);
        let _ = p.child.wait();
        let _ = stop_tx.send(true);
        let mut all = Vec::new();
        for w in writers {
            all.extend(w.await.expect("writer"));
        }
        all
    });
    assert!(
        acknowledged.len() > 200,
        "writers made progress: {}",
        acknowledged.len()
    );
    let mut p = spawn(dir.path(), &[]);
    let found: std::collections::HashSet<String> = rt.block_on(async {
        let client = reqwest::Client::new();
        let mut found = std::collections::HashSet::new();
        let mut rid: Option<String> = None;
        let mut empty = 0;
        while empty < 8 {
            let mut q = vec![("topic", TOPIC.to_owned()), ("consumer", CLUSTERING.to_owned())];
            if let Some(r) = &rid {
                q.push(("requestId", r.clone()));
            }
            let v: Value = get_json(&client, &format!("{}/mq/message", p.base), &q).await;
            rid = v["result"]["requestId"].as_str().map(str::to_owned);
            let bodies = bodies_of(&v);
            if bodies.is_empty() {
                empty += 1;
            } else {
                empty = 0;
            }
            found.extend(bodies);
        }
        found
    });
    let lost: Vec<&String> = acknowledged.iter().filter(|b| !found.contains(*b)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        acknowledged.len(),
        &lost[..lost.len().min(5)]
    );
    signal(&p.child, libc::SIGTERM);
    let _ = p.child.wait();
}

/// Runs the binary on a fresh data dir with `extra` arguments and `RUST_LOG=info`, its
/// stderr piped, until SIGTERM after its "listening" line: what it logged.
fn logs_of_a_short_run(extra: &[&str]) -> String {
    use std::io::{BufRead, BufReader, Read};
    let dir = tempfile::tempdir().expect("tmp");
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(extra)
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    stdout.read_line(&mut line).expect("listening line");
    assert!(line.contains("listening"), "{line}");
    signal(&child, libc::SIGTERM);
    let status = child.wait().expect("wait");
    let mut logs = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut logs)
        .expect("logs");
    assert!(status.success(), "{status}: {logs}");
    logs
}

/// `--log-format json`: every log line on stderr is one JSON object.
#[test]
fn json_logs_are_one_object_per_line() {
    let logs = logs_of_a_short_run(&["--log-format", "json"]);
    let lines: Vec<&str> = logs.lines().collect();
    assert!(lines.len() >= 2, "{logs}");
    for l in lines {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["level"].is_string() && v["fields"]["message"].is_string(), "{l}");
    }
}

/// Text logs that go to a pipe or a file carry no ANSI colour codes, and the start-up log
/// states the admin rule this server runs with.
#[test]
fn redirected_text_logs_are_plain_and_state_the_admin_rule() {
    let logs = logs_of_a_short_run(&[]);
    assert!(!logs.contains('\u{1b}'), "colour codes in a redirected log: {logs:?}");
    assert!(
        logs.contains("admin access: the admin API and console only on the admin listener 127.0.0.1:"),
        "{logs}"
    );
}

/// A config file of the flat layout before the sections still starts the server, which names
/// every old key and its new place in a warning (never silently ignored).
#[test]
fn old_config_keys_start_the_server_with_a_warning_naming_the_new_key() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("old.toml");
    std::fs::write(
        &path,
        "flush = \"sync\"\nmax_connections = 100\n[cors]\nallowed_origins = [\"*\"]\n",
    )
    .expect("write");
    let config = path.to_str().expect("utf-8 path");
    let logs = logs_of_a_short_run(&["--config", config]);
    for (old, new) in [
        ("`flush` at the top", "`flush` under [store]"),
        ("`max_connections` at the top", "`max_connections` under [listener]"),
        ("`allowed_origins` under [cors]", "`cors_allowed_origins` under [http]"),
    ] {
        assert!(
            logs.lines()
                .any(|l| l.contains("WARN") && l.contains(&format!("config key {old} has moved to {new}"))),
            "{old} -> {new}: {logs}"
        );
    }
}
