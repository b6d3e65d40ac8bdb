//! Torn tails of the commit log: writers killed with `kill -9` in the middle, then the last
//! segment cut short, a byte flipped, or garbage written after the tail, at random offsets. A
//! restart keeps every record before the damage and nothing after it; nothing answered 200
//! before the kill is lost while the log is whole.
//!
//! Ignored by default: `scripts/test` runs it (`MQPROXY_TORN_ROUNDS`, default 6 rounds: each
//! kind of damage twice).

use crate::common::*;
use serde_json::Value;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_mqproxy");

/// Records of a segment file as the log frames them: (start, size) of each, up to the first
/// frame that is not a record (zeros, the end marker, a bad length).
fn frames(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        if len == 0 || len == u32::MAX as usize || at + 8 + len > bytes.len() {
            break;
        }
        out.push((at, 8 + len));
        at += 8 + len;
    }
    out
}

fn last_segment(data: &Path) -> PathBuf {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(data.join("log"))
        .expect("log dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.len() == 20))
        .collect();
    segments.sort();
    segments.pop().expect("a segment")
}

/// Every body of the queue, in order, through a consumer group that has read nothing yet.
async fn read_all(client: &reqwest::Client, base: &str, consumer: &str) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let query = [("topic", TOPIC), ("consumer", consumer)];
        let v = get_json(client, &format!("{base}/mq/message"), &query).await;
        let bodies = bodies_of(&v);
        if bodies.is_empty() {
            assert_eq!(v["result"]["status"], "NO_NEW_MSG", "{v}");
            return out;
        }
        out.extend(bodies);
        let query = [("topic", TOPIC), ("consumer", consumer), ("requestId", &rid(&v))];
        let ack = get_json(client, &format!("{base}/mq/ack"), &query).await;
        assert!(ack["message"].as_str().is_some_and(|m| m.starts_with("ok")), "{ack}");
    }
}

async fn writer(base: String, tag: String, produced: Arc<Mutex<HashSet<String>>>) {
    let client = reqwest::Client::new();
    // ~300-byte bodies: a 1 MiB segment holds a few thousand.
    let pad = "x".repeat(280);
    for i in 0.. {
        let body = format!("{tag}-{i}-{pad}");
        let answer = client
            .post(format!("{base}/mq/produce"))
            .form(&[("producer", PRODUCER), ("message", &body)])
            .send()
            .await;
        let Ok(answer) = answer else { return };
        match answer.json::<Value>().await {
            Ok(v) if v["status"] == 200 => {
                produced.lock().expect("produced").insert(body);
            }
            _ => return,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Damage {
    /// The segment file cut short at the offset.
    Truncate,
    /// One byte changed at the offset.
    Flip,
    /// Random bytes written after the last record.
    GarbageAfterTail,
}

#[test]
#[ignore = "kill -9 rounds with damaged files: scripts/test runs them"]
fn damage_at_the_tail_keeps_every_record_before_it_and_nothing_after() {
    if rocketmq_backend() {
        return;
    }
    let rounds: usize = std::env::var("MQPROXY_TORN_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(6);
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let consumers: String = (0..rounds)
        .flat_map(|r| [format!("before{r}"), format!("after{r}")])
        .map(|c| format!("[[consumer]]\nname = \"{c}\"\ntopic = \"{TOPIC}\"\nmax_pull_size = 128\n"))
        .collect();
    let config = dir.path().join("torn.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[store]\nsegment_mib = 1\n[[topic]]\nname = \"{TOPIC}\"\nqueues = 1\n\
             [[producer]]\nname = \"{PRODUCER}\"\ntopic = \"{TOPIC}\"\n{consumers}",
            data.display()
        ),
    )
    .expect("config");
    let args = ["--config".to_owned(), config.display().to_string()];
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let client = reqwest::Client::new();
    let produced = Arc::new(Mutex::new(HashSet::new()));
    for round in 0..rounds {
        let damage = [Damage::Truncate, Damage::Flip, Damage::GarbageAfterTail][round % 3];
        // Writers killed in the middle.
        let mut server = Proc::spawn(BIN, &args);
        rt.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for w in 0..4 {
                tasks.spawn(writer(server.base.clone(), format!("r{round}w{w}"), produced.clone()));
            }
            let before = produced.lock().expect("produced").len();
            eventually(Duration::from_secs(30), "writers under way", || async {
                (produced.lock().expect("produced").len() > before + 300).then_some(())
            })
            .await;
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..500))).await;
            server.kill_9();
            while tasks.join_next().await.is_some() {}
        });
        // The log after the crash: everything answered 200 is there.
        let mut server = Proc::spawn(BIN, &args);
        let whole = rt.block_on(read_all(&client, &server.base, &format!("before{round}")));
        let read: HashSet<&String> = whole.iter().collect();
        let produced_now = produced.lock().expect("produced").clone();
        let lost = produced_now.iter().filter(|b| !read.contains(b)).count();
        assert_eq!(lost, 0, "round {round}: acknowledged messages lost after kill -9");
        server.kill_9();
        // The damage, in the last segment.
        let segment = last_segment(&data);
        let bytes = std::fs::read(&segment).expect("segment");
        let records = frames(&bytes);
        let used = records.last().map_or(0, |(at, size)| at + size);
        let in_earlier_segments = whole.len() - records.len();
        let kept = match damage {
            Damage::GarbageAfterTail => {
                let garbage: Vec<u8> = (0..4_096.min(bytes.len() - used)).map(|_| rand::random()).collect();
                write_at(&segment, used as u64, &garbage);
                records.len()
            }
            Damage::Truncate | Damage::Flip => {
                let at = rand::random_range(0..used.max(1));
                match damage {
                    Damage::Truncate => std::fs::OpenOptions::new()
                        .write(true)
                        .open(&segment)
                        .and_then(|f| f.set_len(at as u64))
                        .expect("truncate"),
                    _ => write_at(&segment, at as u64, &[bytes[at] ^ 0x5A]),
                }
                records.iter().filter(|(start, size)| start + size <= at).count()
            }
        };
        let expected = &whole[..in_earlier_segments + kept];
        // After the damage: exactly the records before it, in order.
        let server = Proc::spawn(BIN, &args);
        let after = rt.block_on(read_all(&client, &server.base, &format!("after{round}")));
        println!(
            "torn tail round {round}: {damage:?}, {} records in the last segment, {kept} kept, {} messages in all",
            records.len(),
            after.len()
        );
        assert_eq!(after.len(), expected.len(), "round {round} ({damage:?}): records kept");
        assert!(
            after == expected,
            "round {round} ({damage:?}): the records before the damage, in order"
        );
        // What the damage removed no longer counts as produced.
        let gone: HashSet<String> = whole[expected.len()..].iter().cloned().collect();
        produced.lock().expect("produced").retain(|b| !gone.contains(b));
        drop(server);
    }
}

fn write_at(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.write_all_at(bytes, at))
        .expect("damage the segment");
}
