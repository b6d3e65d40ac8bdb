//! Delayed and timer messages, durability across restarts, retention, admin settings.

use crate::common;
use crate::common::*;
use std::time::{Duration, Instant};

/// delayLevel 1 (1 s): invisible until due, then delivered.
#[tokio::test]
async fn delay_level_is_invisible_until_due() {
    let s = TestServer::with_toml(&one_queue("")).await;
    let sent_at = Instant::now();
    let v = s
        .post(
            "/mq/produce",
            &[("producer", PRODUCER), ("message", "later"), ("delayLevel", "1")],
        )
        .await;
    assert_eq!(v["status"], 200, "{v}");
    s.produce("now").await;
    assert_eq!(s.drain("c", None).await, ["now"], "the delayed one is not there yet");
    let got = eventually(Duration::from_secs(10), "the delayed message", || async {
        let v = s.drain("c", None).await;
        (!v.is_empty()).then_some(v)
    })
    .await;
    assert!(
        sent_at.elapsed() >= Duration::from_millis(900),
        "delivered after its delay"
    );
    assert_eq!(got, ["later"]);
}

/// deliveryTimestamp: delivered at that time, not before; a past time is delivered at once.
/// On RocketMQ 4.x (no timer messages): refused with a 400 naming that, never delivered early.
#[tokio::test]
async fn timer_message_is_delivered_at_its_time() {
    let s = TestServer::with_toml(&one_queue("")).await;
    let at = now_ms() + 1_500;
    let v = s
        .post(
            "/mq/produce",
            &[
                ("producer", PRODUCER),
                ("message", "timer"),
                ("deliveryTimestamp", &at.to_string()),
            ],
        )
        .await;
    if !timer_messages() {
        assert_no_timer_messages(&v);
        s.produce("now").await;
        assert_eq!(
            s.drain("c", None).await,
            ["now"],
            "the refused timer message was not stored"
        );
        return;
    }
    assert_eq!(v["status"], 200, "{v}");
    let past = (now_ms() - 10_000).to_string();
    s.post(
        "/mq/produce",
        &[
            ("producer", PRODUCER),
            ("message", "past"),
            ("deliveryTimestamp", &past),
        ],
    )
    .await;
    assert_eq!(s.drain("c", None).await, ["past"]);
    let got = eventually(Duration::from_secs(10), "the timer message", || async {
        let v = s.drain("c", None).await;
        (!v.is_empty()).then_some(v)
    })
    .await;
    assert!(now_ms() >= at, "not before its deliveryTimestamp");
    assert_eq!(got, ["timer"]);
}

/// Messages, delayed messages and committed offsets survive a restart.
#[tokio::test]
async fn restart_keeps_messages_schedule_and_offsets() {
    let s = TestServer::with_toml(&one_queue("max_pull_size=2\n")).await;
    for m in ["a", "b", "c", "d"] {
        s.produce(m).await;
    }
    let at = (now_ms() + 2_000).to_string();
    let timer = s
        .post(
            "/mq/produce",
            &[("producer", PRODUCER), ("message", "timer"), ("deliveryTimestamp", &at)],
        )
        .await;
    if !timer_messages() {
        assert_no_timer_messages(&timer);
    }
    let first = s.fetch("c", None).await;
    assert_eq!(bodies_of(&first), ["a", "b"]);
    let ack = s
        .get(
            "/mq/ack",
            &[("topic", TOPIC), ("consumer", "c"), ("requestId", &rid(&first))],
        )
        .await;
    assert!(ack["message"].as_str().is_some_and(|m| m.starts_with("ok")), "{ack}");
    let s = s.restart().await;
    let second = s.fetch("c", None).await;
    assert_eq!(bodies_of(&second), ["c", "d"], "the committed offset held");
    let s = s.restart().await;
    // The unacknowledged batch's lock survived the restart: nothing to pull until it is unlocked.
    assert_eq!(s.fetch("c", None).await["result"]["status"], "NO_NEW_MSG");
    let u = s
        .get(
            "/mq/unlock",
            &[("topic", TOPIC), ("consumer", "c"), ("requestId", &rid(&second))],
        )
        .await;
    assert!(
        u["message"].as_str().is_some_and(|m| m.ends_with("unlock:true")),
        "requestIds survive restarts: {u}"
    );
    // The timer message may be due already when restarts were slow (a RocketMQ cluster): it
    // comes after the unlocked batch, and at the latest soon after its time.
    let again = s.drain("c", None).await;
    assert_eq!(again[..2], ["c", "d"], "{again:?}");
    if timer_messages() && !again.contains(&"timer".to_owned()) {
        eventually(Duration::from_secs(10), "the timer message after restart", || async {
            let v = s.drain("c", None).await;
            (v == ["timer"]).then_some(())
        })
        .await;
    }
}

/// Retention deletes old messages; a consumer left behind gets OFFSET_ILLEGAL once and then
/// continues from the smallest offset.
#[tokio::test]
async fn retention_and_offset_illegal_reset() {
    if common::embedded_only("retention is the broker's on RocketMQ") {
        return;
    }
    let s = TestServer::with_toml(&format!(
        "store.retention_ms=1500\nstore.retention_check_interval_ms=100\n{}",
        one_queue("max_pull_size=1\n")
    ))
    .await;
    for m in ["a", "b", "c"] {
        s.produce(m).await;
    }
    let first = s.fetch("c", None).await;
    assert_eq!(bodies_of(&first), ["a"]);
    s.get(
        "/mq/ack",
        &[("topic", TOPIC), ("consumer", "c"), ("requestId", &rid(&first))],
    )
    .await;
    // Wait until retention removed b and c (the queue's smallest offset moved past them).
    let illegal = eventually(Duration::from_secs(10), "retention to delete old messages", || async {
        s.produce("fresh").await;
        let v = s.fetch("c", None).await;
        match v["result"]["status"].as_str() {
            Some("OFFSET_ILLEGAL") => Some(v),
            Some("FOUND") => {
                // Still old messages: give the batch back and look again.
                s.get(
                    "/mq/unlock",
                    &[("topic", TOPIC), ("consumer", "c"), ("requestId", &rid(&v))],
                )
                .await;
                None
            }
            _ => None,
        }
    })
    .await;
    // The OFFSET_ILLEGAL answer carries a requestId whose ack moves the offset to the smallest.
    let next = s.fetch("c", Some(&rid(&illegal))).await;
    assert!(
        next["result"]["ackInfo"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("ok")),
        "{next}"
    );
    assert_eq!(
        next["result"]["status"], "FOUND",
        "continues from the smallest offset: {next}"
    );
    // b and c were stored a moment apart: a purge may fall between them, so the smallest
    // message left is c or a fresh one, never a or b.
    let bodies = bodies_of(&next);
    assert!(bodies == ["c"] || bodies == ["fresh"], "{next}");
    assert_eq!(
        next["result"]["queueInfo"]["committedOffset"], next["result"]["queueInfo"]["minOffset"],
        "{next}"
    );
}

/// Admin: pause -> PAUSED, rate limit -> RATE_LIMITED, both durable; resume works.
#[tokio::test]
async fn pause_and_rate_limit() {
    let s = TestServer::with_toml(&one_queue("")).await;
    s.produce("a").await;
    let v = s
        .post("/admin/consumer/config", &[("consumer", "c"), ("pause", "true")])
        .await;
    assert_eq!(v["result"]["paused"], true, "{v}");
    let paused = s.fetch("c", None).await;
    assert_eq!(paused["result"]["status"], "PAUSED");
    assert!(paused["result"].get("requestId").is_none());
    let s = s.restart().await;
    assert_eq!(
        s.fetch("c", None).await["result"]["status"],
        "PAUSED",
        "the pause is durable"
    );
    s.post(
        "/admin/consumer/config",
        &[("consumer", "c"), ("pause", "false"), ("limitRate", "2")],
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(
            s.fetch("c", None).await["result"]["status"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        );
    }
    assert!(statuses.contains(&"RATE_LIMITED".to_owned()), "{statuses:?}");
    assert_eq!(statuses[0], "FOUND");
    let bad = s
        .post("/admin/consumer/config", &[("consumer", "c"), ("limitRate", "0")])
        .await;
    assert_eq!(bad["status"], 400);
    assert_eq!(
        s.get("/admin/consumer/config", &[("consumer", "nobody")]).await["status"],
        400
    );
}

async fn retry_queued(s: &TestServer) -> serde_json::Value {
    s.get("/admin/consumer/config", &[("consumer", "c")]).await["result"]["retryQueued"].clone()
}

/// Admin resend: the message comes back in retryMsgList, is acknowledged with the batch's
/// requestId, and comes again when that batch is not acknowledged. `retryQueued` is the same
/// figure on POST and GET: the retry messages not yet acknowledged; a repeated resend of a
/// message still waiting does not queue it twice.
#[tokio::test]
async fn retry_messages_are_durable_and_acknowledged() {
    let s = TestServer::with_toml(&one_queue("")).await;
    let id = s.produce("original").await["result"]["msgId"]
        .as_str()
        .expect("id")
        .to_owned();
    assert_eq!(s.drain("c", None).await, ["original"]);
    let v = s
        .post("/admin/consumer/config", &[("consumer", "c"), ("retryMsgId", &id)])
        .await;
    assert_eq!(v["result"]["retryQueued"], 1, "{v}");
    let again = s
        .post("/admin/consumer/config", &[("consumer", "c"), ("retryMsgId", &id)])
        .await;
    assert_eq!(again["result"]["retryQueued"], 1, "{again}");
    assert_eq!(retry_queued(&s).await, 1);
    let s = s.restart().await;
    assert_eq!(retry_queued(&s).await, 1);
    let first = s.fetch("c", None).await;
    assert_eq!(first["result"]["retryMsgListSize"], 1, "{first}");
    assert_eq!(first["result"]["retryMsgList"][0]["messageId"], id.as_str());
    assert_eq!(first["result"]["retryMsgList"][0]["message"], "original");
    // Not acknowledged: unlock, it comes again.
    s.get(
        "/mq/unlock",
        &[("topic", TOPIC), ("consumer", "c"), ("requestId", &rid(&first))],
    )
    .await;
    let second = s.fetch("c", None).await;
    assert_eq!(second["result"]["retryMsgListSize"], 1, "{second}");
    // Delivered, not yet acknowledged: still counted.
    assert_eq!(retry_queued(&s).await, 1);
    // Acknowledged: gone.
    let third = s.fetch("c", Some(&rid(&second))).await;
    assert_eq!(third["result"]["retryMsgListSize"], 0, "{third}");
    assert_eq!(retry_queued(&s).await, 0);
    let bad = s
        .post(
            "/admin/consumer/config",
            &[("consumer", "c"), ("retryMsgId", "00000000000000000000000000000000")],
        )
        .await;
    assert_eq!(bad["status"], 400);
}

/// `[store] flush = "async"`: answered before fsync, made durable by the periodic flush and at shutdown.
#[tokio::test]
async fn async_flush_keeps_messages_across_a_graceful_restart() {
    let s = TestServer::with_toml(&format!(
        "store.flush=\"async\"\nstore.async_flush_interval_ms=50\n{}",
        one_queue("")
    ))
    .await;
    for m in ["a", "b"] {
        s.produce(m).await;
    }
    let s = s.restart().await;
    assert_eq!(s.drain("c", None).await, ["a", "b"]);
}

/// requestId secret rotation: a batch pulled before the rotation is acknowledged after it
/// (the previous secret is still accepted); one rotation later, a requestId of the oldest
/// secret is refused with a 400 naming the requestId.
#[tokio::test]
async fn request_id_secret_rotation_keeps_pulled_batches_ackable() {
    const FIRST: &str = "first-secret-0123456789";
    const SECOND: &str = "second-secret-0123456789";
    let mut config = config(Some(&one_queue("")));
    config.request_id.secret = Some(FIRST.into());
    let s = TestServer::with_config(config).await;
    s.produce("before").await;
    let before = s.fetch("c", None).await;
    assert_eq!(bodies_of(&before), ["before"]);

    let s = s
        .restart_with(|c| {
            c.request_id.secret = Some(SECOND.into());
            c.request_id.previous_secret = Some(FIRST.into());
        })
        .await;
    let q = [("topic", TOPIC), ("consumer", "c"), ("requestId", &rid(&before))];
    let ack = s.post("/mq/ack", &q).await;
    assert_eq!(ack["status"], 200, "{ack}");
    assert!(ack["message"].as_str().is_some_and(|m| m.starts_with("ok")), "{ack}");
    s.produce("after").await;
    let after = s.fetch("c", None).await;
    assert_eq!(bodies_of(&after), ["after"]);

    // FIRST is two rotations old now: its requestIds are forged as far as the server knows.
    let s = s
        .restart_with(|c| {
            c.request_id.secret = Some("third-secret-0123456789".into());
            c.request_id.previous_secret = Some(SECOND.into());
        })
        .await;
    let stale = s.post("/mq/ack", &q).await;
    assert_eq!(stale["status"], 400, "{stale}");
    assert!(
        stale["message"].as_str().is_some_and(|m| m.contains("requestId")),
        "{stale}"
    );
    let q = [("topic", TOPIC), ("consumer", "c"), ("requestId", &rid(&after))];
    let ack = s.post("/mq/ack", &q).await;
    assert_eq!(ack["status"], 200, "{ack}");
    assert_eq!(s.fetch("c", None).await["result"]["status"], "NO_NEW_MSG");
}

/// The secrets are checked at start: too short, or a previous secret without a current one.
#[test]
fn request_id_secrets_are_validated() {
    let short = mqproxy::config::Config::from_toml("[request_id]\nsecret = \"short\"", "(test)").unwrap_err();
    assert_eq!(short.key, "request_id.secret", "{short}");
    let alone = mqproxy::config::Config::from_toml("[request_id]\nprevious_secret = \"0123456789abcdef\"", "(test)")
        .unwrap_err();
    assert_eq!(alone.key, "request_id.previous_secret", "{alone}");
}

/// A data directory of the redb layout (the store before the commit log) is converted at the
/// first start with the log: messages keep their offsets and msgIds, committed offsets hold,
/// new messages continue the queue; the redb layout then refuses the directory.
#[tokio::test]
async fn a_redb_data_directory_is_converted_to_the_commit_log() {
    if common::embedded_only("the layouts are the embedded store's") {
        return;
    }
    let mut config = common::config(Some(&one_queue("max_pull_size=2\n")));
    config.store.layout = mqproxy::store::embedded::Layout::Redb;
    let s = TestServer::with_config(config).await;
    let mut ids = Vec::new();
    for m in ["a", "b", "c", "d", "e"] {
        ids.push(
            s.produce(m).await["result"]["msgId"]
                .as_str()
                .expect("msgId")
                .to_owned(),
        );
    }
    let first = s.fetch("c", None).await;
    assert_eq!(bodies_of(&first), ["a", "b"]);
    let next = s.fetch("c", Some(&rid(&first))).await;
    assert_eq!(bodies_of(&next), ["c", "d"], "{next}");
    let s = s
        .restart_with(|c| c.store.layout = mqproxy::store::embedded::Layout::Log)
        .await;
    // The batch handed out before the restart is still locked; given back, it comes again.
    s.get(
        "/mq/unlock",
        &[("topic", TOPIC), ("consumer", "c"), ("requestId", &rid(&next))],
    )
    .await;
    let again = s.fetch("c", None).await;
    assert_eq!(bodies_of(&again), ["c", "d"], "{again}");
    assert!(s.config.data_dir.join("log").is_dir(), "the commit log exists");
    assert_eq!(again["result"]["queueInfo"]["committedOffset"], 2, "{again}");
    let view = s.get("/admin/message", &[("msgId", &ids[4])]).await;
    assert_eq!(
        view["result"]["queueOffset"], 4,
        "the msgId lookup finds a converted message: {view}"
    );
    assert_eq!(view["result"]["body"], "e", "{view}");
    s.produce("f").await;
    let rest = s.fetch("c", Some(&rid(&again))).await;
    assert_eq!(bodies_of(&rest), ["e", "f"], "{rest}");
    let data_dir = s.config.data_dir.clone();
    let mut s = s;
    s.shutdown().await;
    let mut redb = s.config.clone();
    redb.store.layout = mqproxy::store::embedded::Layout::Redb;
    let refused = mqproxy::store::embedded::EmbeddedStore::open(mqproxy::server::embedded_config(&redb));
    let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("commit log") && message.contains(&data_dir.join("log").display().to_string()),
        "the redb layout refuses a commit log: {message:?}"
    );
}
