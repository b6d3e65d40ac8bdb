//! A full disk under the data directory (a small tmpfs): produce answers a non-200 status
//! naming the cause, the server stays up, what was stored stays readable, and produce works
//! again once space returns, without a restart. Needs root for the mount, so it is ignored by
//! default; `scripts/test` runs it when it runs as root (CI does).

use crate::common::*;
use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mqproxy");

/// A tmpfs of `mib` MiB mounted on a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u32) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mount tmpfs (needs root)");
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Writes a file until the file system is full; returns its path.
fn fill(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0u8; 64 * 1024];
    loop {
        if f.write_all(&chunk).and_then(|()| f.sync_all()).is_err() {
            break;
        }
    }
    // The last partial chunks too, down to single bytes.
    for size in [4096usize, 512, 1] {
        while f.write_all(&vec![0u8; size]).and_then(|()| f.sync_all()).is_ok() {}
    }
    path
}

async fn produce(client: &reqwest::Client, base: &str, message: &str) -> Value {
    post_json(
        client,
        &format!("{base}/mq/produce"),
        &[("producer", PRODUCER), ("message", message)],
    )
    .await
}

#[tokio::test]
#[ignore = "needs root to mount a tmpfs; scripts/test runs it as root"]
async fn a_full_disk_refuses_produce_clearly_and_recovers() {
    let fs = Tmpfs::mount(48);
    let data = fs.path().join("data");
    let config = fs.path().join("mqproxy.toml");
    // A 4 MiB reserve on a 48 MiB disk.
    std::fs::write(&config, format!("store.min_free_disk_mib = 4\n{}", one_queue(""))).expect("config");
    let args = [
        "--config".to_owned(),
        config.display().to_string(),
        "--data-dir".to_owned(),
        data.display().to_string(),
    ];
    let mut server = Proc::spawn(BIN, &args);
    let client = reqwest::Client::new();
    let body = "x".repeat(1000);
    for i in 0..50 {
        let v = produce(&client, &server.base, &format!("before-{i}-{body}")).await;
        assert_eq!(v["status"], 200, "{v}");
    }

    let filler = fill(fs.path());
    let mut refused = 0;
    let mut last = Value::Null;
    // The store may still have room in pages it already holds: produce until it is refused.
    for i in 0..5_000 {
        let v = produce(&client, &server.base, &format!("during-{i}-{body}")).await;
        if v["status"] != 200 {
            refused += 1;
            last = v;
            if refused == 5 {
                break;
            }
        } else {
            assert_eq!(refused, 0, "a produce succeeded after a refusal: {v}");
        }
    }
    assert_eq!(refused, 5, "produce never refused on a full disk");
    let status = last["status"].as_i64().unwrap_or_default();
    assert_eq!(status, 507, "{last}");
    let message = last["message"].as_str().unwrap_or_default();
    assert!(message.contains("disk") && message.contains("full"), "{last}");
    // A batch is refused as a whole with the same status.
    let batch = post_json(
        &client,
        &format!("{}/mq/produce/batch", server.base),
        &[
            ("producer", PRODUCER),
            ("messages", r#"["during-batch-1","during-batch-2"]"#),
        ],
    )
    .await;
    assert_eq!(batch["status"], 507, "{batch}");
    // Still up.
    let health = get_json(&client, &format!("{}/healthz", server.base), &[] as &[(&str, &str)]).await;
    assert_eq!(health["status"], 200, "{health}");

    // Space returns: produce works again, in the same process.
    std::fs::remove_file(&filler).expect("remove the filler");
    let v = eventually(
        std::time::Duration::from_secs(10),
        "produce after space returns",
        || {
            let (client, base) = (client.clone(), server.base.clone());
            async move {
                let v = produce(&client, &base, "after").await;
                (v["status"] == 200).then_some(v)
            }
        },
    )
    .await;
    assert_eq!(v["status"], 200, "{v}");

    // Nothing stored was damaged: after a kill -9 and restart, every message answered 200 is
    // there, in order, and no refused one.
    server.kill_9();
    let server = Proc::spawn(BIN, &args);
    let mut bodies = Vec::new();
    let mut request_id: Option<String> = None;
    loop {
        let mut q = vec![("topic", TOPIC.to_owned()), ("consumer", "c".to_owned())];
        if let Some(r) = &request_id {
            q.push(("requestId", r.clone()));
        }
        let v = get_json(&client, &format!("{}/mq/message", server.base), &q).await;
        assert_eq!(v["status"], 200, "{v}");
        let got = bodies_of(&v);
        if got.is_empty() {
            break;
        }
        request_id = v["result"]["requestId"].as_str().map(str::to_owned);
        bodies.extend(got);
    }
    let before = bodies.iter().filter(|b| b.starts_with("before-")).count();
    let during = bodies.iter().filter(|b| b.starts_with("during-")).count();
    assert_eq!(before, 50);
    assert_eq!(bodies.last().map(String::as_str), Some("after"));
    assert_eq!(bodies.len(), 50 + during + 1, "{bodies:?}");
    println!("disk full: {during} produced into the last free pages, then 5 refused with: {message}");
}
