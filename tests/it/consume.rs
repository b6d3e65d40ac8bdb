//! `/mq/message`, `/mq/ack`, `/mq/unlock` against the real server.

use crate::common::*;
use serde_json::Value;
use std::collections::HashSet;
use std::time::Duration;

/// First pull starts at the smallest offset; the answer has the seed's shape; an empty pull is
/// NO_NEW_MSG without requestId but with both sizes.
#[tokio::test]
async fn fetch_shape_and_first_consumption_from_smallest_offset() {
    let s = TestServer::with_toml(&one_queue("")).await;
    let empty = s.fetch("c", None).await;
    assert_eq!(
        empty["result"].as_object().map(|o| (
            o["status"].clone(),
            o["msgListSize"].clone(),
            o["retryMsgListSize"].clone(),
            o.contains_key("requestId")
        )),
        Some(("NO_NEW_MSG".into(), 0.into(), 0.into(), false))
    );
    let sent: Vec<Value> = [s.produce("a").await, s.produce("b").await].into();
    let v = s.fetch("c", None).await;
    let r = &v["result"];
    assert_eq!(r["status"], "FOUND");
    assert_eq!(r["msgListSize"], 2);
    assert_eq!(r["retryMsgListSize"], 0);
    for (m, p) in r["msgList"].as_array().expect("list").iter().zip(&sent) {
        assert_eq!(m["messageId"], p["result"]["msgId"]);
        let ts = m["timestamp"].as_i64().expect("timestamp");
        assert!((now_ms() - ts).abs() < 60_000, "store time, epoch ms: {ts}");
        assert_eq!(
            m.as_object().map(|o| o.len()),
            Some(3),
            "messageId, message, timestamp: {m}"
        );
    }
    assert_eq!(bodies_of(&v), ["a", "b"]);
}

/// Passing the requestId to the next pull acknowledges: nothing comes back, ackInfo says ok.
#[tokio::test]
async fn ack_by_next_pull() {
    let s = TestServer::with_toml(&one_queue("")).await;
    s.produce("a").await;
    let first = s.fetch("c", None).await;
    let second = s.fetch("c", Some(&rid(&first))).await;
    assert_eq!(second["result"]["status"], "NO_NEW_MSG", "{second}");
    assert_eq!(second["result"]["ackInfo"]["status"], 200);
    assert!(
        second["result"]["ackInfo"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("ok")),
        "{second}"
    );
    s.produce("b").await;
    assert_eq!(bodies_of(&s.fetch("c", None).await), ["b"]);
}

/// `/mq/ack` commits without pulling; acking the same batch twice changes nothing.
#[tokio::test]
async fn ack_endpoint_commits() {
    let s = TestServer::with_toml(&one_queue("")).await;
    s.produce("a").await;
    let first = s.fetch("c", None).await;
    let q = [("topic", TOPIC), ("consumer", "c"), ("requestId", &rid(&first))];
    let ack = s.get("/mq/ack", &q).await;
    assert_eq!(ack["status"], 200, "{ack}");
    assert!(ack["message"].as_str().is_some_and(|m| m.starts_with("ok")), "{ack}");
    let again = s.post("/mq/ack", &q).await;
    assert_eq!(again["status"], 200);
    assert!(
        again["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("lock not exist")),
        "{again}"
    );
    assert_eq!(s.fetch("c", None).await["result"]["status"], "NO_NEW_MSG");
}

/// `/mq/unlock` releases at once: the same batch comes again on the next pull.
#[tokio::test]
async fn unlock_redelivers_at_once() {
    let s = TestServer::with_toml(&one_queue("")).await;
    s.produce("a").await;
    let first = s.fetch("c", None).await;
    // Locked: another pull gets nothing.
    assert_eq!(s.fetch("c", None).await["result"]["status"], "NO_NEW_MSG");
    let u = s
        .get(
            "/mq/unlock",
            &[("topic", TOPIC), ("consumer", "c"), ("requestId", &rid(&first))],
        )
        .await;
    assert_eq!(u["status"], 200);
    assert!(u["message"].as_str().is_some_and(|m| m.ends_with("unlock:true")), "{u}");
    let again = s.fetch("c", None).await;
    assert_eq!(bodies_of(&again), ["a"]);
    assert_ne!(rid(&again), rid(&first));
}

/// An unacknowledged batch comes back after the consumer's lock timeout (10 s here).
#[tokio::test]
async fn lock_expiry_redelivers() {
    let s = TestServer::with_toml(&one_queue("consume_timeout_ms=10000\n")).await;
    s.produce("a").await;
    let first = s.fetch("c", None).await;
    let started = std::time::Instant::now();
    let again = eventually(Duration::from_secs(20), "redelivery after lock expiry", || async {
        let v = s.fetch("c", None).await;
        (v["result"]["status"] == "FOUND").then_some(v)
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "not before the lock expired"
    );
    assert_eq!(bodies_of(&again), ["a"]);
    // The first holder's ack is now stale: it changes nothing, the new holder's ack commits.
    let stale = s
        .get(
            "/mq/ack",
            &[("topic", TOPIC), ("consumer", "c"), ("requestId", &rid(&first))],
        )
        .await;
    assert!(
        stale["message"].as_str().is_some_and(|m| m.starts_with("ack ignored")),
        "{stale}"
    );
    let ok = s
        .get(
            "/mq/ack",
            &[("topic", TOPIC), ("consumer", "c"), ("requestId", &rid(&again))],
        )
        .await;
    assert!(ok["message"].as_str().is_some_and(|m| m.starts_with("ok")), "{ok}");
}

/// A stale ack (queue re-locked since) moves nothing: the re-delivered batch is still owed.
#[tokio::test]
async fn stale_ack_after_unlock_changes_nothing() {
    let s = TestServer::with_toml(&one_queue("")).await;
    s.produce("a").await;
    let first = s.fetch("c", None).await;
    s.get(
        "/mq/unlock",
        &[("topic", TOPIC), ("consumer", "c"), ("requestId", &rid(&first))],
    )
    .await;
    let second = s.fetch("c", None).await;
    let stale = s
        .get(
            "/mq/ack",
            &[("topic", TOPIC), ("consumer", "c"), ("requestId", &rid(&first))],
        )
        .await;
    assert_eq!(stale["status"], 200);
    assert!(
        stale["message"].as_str().is_some_and(|m| m.starts_with("ack ignored")),
        "{stale}"
    );
    // Still locked by the second pull, and not committed: unlocking it brings "a" back.
    assert_eq!(s.fetch("c", None).await["result"]["status"], "NO_NEW_MSG");
    s.get(
        "/mq/unlock",
        &[("topic", TOPIC), ("consumer", "c"), ("requestId", &rid(&second))],
    )
    .await;
    assert_eq!(bodies_of(&s.fetch("c", None).await), ["a"]);
}

/// A forged or foreign requestId moves nothing: 400 on /mq/ack and /mq/unlock, and on
/// /mq/message it is reported in ackInfo without blocking the pull.
#[tokio::test]
async fn forged_request_id() {
    let s = TestServer::with_toml(&one_queue(
        "[[consumer]]\nname=\"other\"\ntopic=\"mqcloud-http-test-topic\"\n",
    ))
    .await;
    s.produce("a").await;
    let first = s.fetch("c", None).await;
    let genuine = rid(&first);
    // The Java proxy's unsigned form, a tampered token, another consumer's token, garbage.
    use base64::Engine as _;
    let text =
        String::from_utf8(base64::engine::general_purpose::URL_SAFE.decode(&genuine).expect("b64")).expect("utf8");
    let fields: Vec<&str> = text.split(',').collect();
    let tampered = base64::engine::general_purpose::URL_SAFE.encode(format!(
        "{},{},{},{},{},true,{}",
        fields[0], fields[1], fields[2], 999, fields[4], fields[6]
    ));
    let unsigned = base64::engine::general_purpose::URL_SAFE
        .encode(format!("{},{},0,999,{},true", fields[0], fields[1], fields[4]));
    let other = {
        s.produce("b").await;
        rid(&s.fetch("other", None).await)
    };
    for bad in [tampered.as_str(), unsigned.as_str(), other.as_str(), "!!not-base64!!"] {
        for path in ["/mq/ack", "/mq/unlock"] {
            let v = s
                .get(path, &[("topic", TOPIC), ("consumer", "c"), ("requestId", bad)])
                .await;
            assert_eq!(v["status"], 400, "{path} {bad} -> {v}");
        }
        let v = s.fetch("c", Some(bad)).await;
        assert_eq!(v["result"]["ackInfo"]["status"], 400, "{v}");
    }
    // Nothing moved: the genuine ack still commits exactly the first batch.
    let ok = s
        .get(
            "/mq/ack",
            &[("topic", TOPIC), ("consumer", "c"), ("requestId", &genuine)],
        )
        .await;
    assert!(ok["message"].as_str().is_some_and(|m| m.starts_with("ok")), "{ok}");
    assert_eq!(s.drain("c", None).await, ["b"]);
}

/// Broadcast: each clientId gets every message, with its own offsets; clientId rules.
#[tokio::test]
async fn broadcast_two_clients_each_get_all() {
    let s = TestServer::start().await;
    for i in 0..10 {
        s.produce(&format!("m{i}")).await;
    }
    let mut a = s.drain(BROADCAST, Some("10.0.0.1")).await;
    let mut b = s.drain(BROADCAST, Some("10.0.0.2")).await;
    a.sort();
    b.sort();
    let all: Vec<String> = {
        let mut v: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
        v.sort();
        v
    };
    assert_eq!((a, b), (all.clone(), all));
    let no_client = s.get("/mq/message", &[("topic", TOPIC), ("consumer", BROADCAST)]).await;
    assert_eq!(no_client["status"], 400);
    assert!(
        no_client["message"].as_str().is_some_and(|m| m.contains("clientId")),
        "{no_client}"
    );
    let clustering_with_client = s
        .get(
            "/mq/message",
            &[("topic", TOPIC), ("consumer", CLUSTERING), ("clientId", "x")],
        )
        .await;
    assert_eq!(clustering_with_client["status"], 400);
    let wrong_topic = s
        .get("/mq/message", &[("topic", "other-topic"), ("consumer", CLUSTERING)])
        .await;
    assert_eq!(wrong_topic["status"], 400);
    let unknown = s.get("/mq/message", &[("topic", TOPIC), ("consumer", "nobody")]).await;
    assert_eq!(unknown["status"], 400);
    assert!(unknown["message"].as_str().is_some_and(|m| m.contains("nobody")));
    let missing = s.get("/mq/message", &[("consumer", CLUSTERING)]).await;
    assert_eq!(missing["status"], 400);
    assert!(missing["message"].as_str().is_some_and(|m| m.contains("topic")));
}

/// useCookie=true: the requestId travels in cookie `rid` and acknowledges automatically.
#[tokio::test]
async fn cookie_mode() {
    let s = TestServer::with_toml(&one_queue("")).await;
    s.produce("a").await;
    let q = [("topic", TOPIC), ("consumer", "c"), ("useCookie", "true")];
    let (cookie, v) = s.fetch_with_cookie(&q).await;
    assert_eq!(cookie, format!("rid={}; Path=/", rid(&v)));
    s.produce("b").await;
    // The client's cookie store sends rid back: the first batch is acknowledged, "b" comes.
    let v2 = s.get("/mq/message", &q).await;
    assert_eq!(v2["result"]["ackInfo"]["status"], 200, "{v2}");
    assert_eq!(bodies_of(&v2), ["b"]);
    let v3 = s.get("/mq/message", &q).await;
    assert_eq!(v3["result"]["status"], "NO_NEW_MSG");
    // Nothing to hand out: the cookie is deleted.
    let (cookie, _) = s.fetch_with_cookie(&q).await;
    assert!(cookie.starts_with("rid=;") && cookie.contains("Max-Age=0"), "{cookie}");
}

/// clientIp: the parameter, else X-Forwarded-For, else X-Real-IP, else the socket.
#[tokio::test]
async fn client_ip_resolution() {
    let s = TestServer::with_toml(&one_queue("")).await;
    let ip_of = |v: &Value| {
        v["result"]["queueInfo"]["lastConsumeClientIp"]
            .as_str()
            .map(str::to_owned)
    };
    let q = [("topic", TOPIC), ("consumer", "c")];
    let get = |headers: Vec<(&'static str, &'static str)>, extra: Option<(&'static str, &'static str)>| {
        let mut req = s.client.get(format!("{}/mq/message", s.base)).query(&q);
        if let Some(e) = extra {
            req = req.query(&[e]);
        }
        for (k, v) in headers {
            req = req.header(k, v);
        }
        async move { req.send().await.expect("get").json::<Value>().await.expect("json") }
    };
    assert_eq!(
        ip_of(
            &get(
                vec![("x-forwarded-for", "1.1.1.1, 2.2.2.2")],
                Some(("clientIp", "9.9.9.9"))
            )
            .await
        )
        .as_deref(),
        Some("9.9.9.9")
    );
    assert_eq!(
        ip_of(
            &get(
                vec![("x-forwarded-for", "1.1.1.1, 2.2.2.2"), ("x-real-ip", "3.3.3.3")],
                None
            )
            .await
        )
        .as_deref(),
        Some("1.1.1.1")
    );
    assert_eq!(
        ip_of(&get(vec![("x-real-ip", "3.3.3.3")], None).await).as_deref(),
        Some("3.3.3.3")
    );
    assert_eq!(ip_of(&get(vec![], None).await).as_deref(), Some("127.0.0.1"));
}

/// Queue choice: the biggest backlog first; every queue locked -> 200 NO_NEW_MSG.
#[tokio::test]
async fn queue_choice_and_all_locked() {
    let s = TestServer::start().await;
    // Queue 2 gets three messages ("order-1" hashes there), the others one each.
    for _ in 0..3 {
        s.post(
            "/mq/produce",
            &[("producer", PRODUCER), ("message", "q2"), ("orderId", "order-1")],
        )
        .await;
    }
    let first = s.fetch(CLUSTERING, None).await;
    assert_eq!(first["result"]["queueInfo"]["messageQueue"]["queueId"], 2, "{first}");
    assert_eq!(first["result"]["msgListSize"], 3);
    // One message in each other queue ("k3", "k0", "k2" hash to queues 0, 1, 3): three more
    // pulls lock them, one each, while queue 2 stays locked by the first pull.
    for order_id in ["k3", "k0", "k2"] {
        s.post(
            "/mq/produce",
            &[("producer", PRODUCER), ("message", "x"), ("orderId", order_id)],
        )
        .await;
    }
    let mut held = vec![rid(&first)];
    for _ in 0..3 {
        let v = s.fetch(CLUSTERING, None).await;
        assert_eq!(v["result"]["status"], "FOUND", "{v}");
        held.push(rid(&v));
    }
    let all_locked = s.fetch(CLUSTERING, None).await;
    assert_eq!(all_locked["status"], 200);
    assert_eq!(all_locked["result"]["status"], "NO_NEW_MSG", "{all_locked}");
    assert!(all_locked["result"].get("requestId").is_none());
}

/// Several consumers pulling and acking concurrently see every message exactly once.
#[tokio::test]
async fn concurrent_consumers_see_no_duplicates() {
    let s = std::sync::Arc::new(TestServer::start().await);
    let total = 400;
    let messages: Vec<String> = (0..total).map(|i| format!("m{i}")).collect();
    for chunk in messages.chunks(50) {
        let batch = serde_json::to_string(chunk).expect("json");
        assert_eq!(
            s.post("/mq/produce/batch", &[("producer", PRODUCER), ("messages", &batch)])
                .await["status"],
            200
        );
    }
    let mut workers = Vec::new();
    for _ in 0..6 {
        let s = s.clone();
        workers.push(tokio::spawn(async move { s.drain(CLUSTERING, None).await }));
    }
    let mut seen = Vec::new();
    for w in workers {
        seen.extend(w.await.expect("worker"));
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), total, "every message delivered");
    assert_eq!(seen.len(), total, "no message delivered twice");
}

/// Equal backlogs: the least recently pulled queue is chosen next.
#[tokio::test]
async fn queue_choice_round_robins_by_staleness() {
    let s = TestServer::start().await;
    for i in 0..4 {
        s.produce(&format!("m{i}")).await;
    }
    let mut order = Vec::new();
    for _ in 0..4 {
        let v = s.fetch(CLUSTERING, None).await;
        order.push(
            v["result"]["queueInfo"]["messageQueue"]["queueId"]
                .as_i64()
                .expect("queue"),
        );
        s.get(
            "/mq/unlock",
            &[("topic", TOPIC), ("consumer", CLUSTERING), ("requestId", &rid(&v))],
        )
        .await;
    }
    assert_eq!(order, [0, 1, 2, 3]);
}

/// A pull stops before its bodies pass 4 MiB (always at least one message).
#[tokio::test]
async fn a_batch_is_capped_near_4_mib() {
    let s = TestServer::with_toml(&one_queue("")).await;
    let big = "b".repeat(3 * 1024 * 1024);
    for _ in 0..3 {
        s.produce(&big).await;
    }
    s.produce("small").await;
    let mut sizes = Vec::new();
    let mut previous: Option<String> = None;
    loop {
        let v = s.fetch("c", previous.as_deref()).await;
        if v["result"]["status"] != "FOUND" {
            break;
        }
        sizes.push(v["result"]["msgListSize"].as_i64().unwrap_or(0));
        previous = Some(rid(&v));
    }
    assert_eq!(sizes, [1, 1, 2], "3 MiB, 3 MiB, then 3 MiB + the small one");
}

/// `maxPullSize` (the newer MQCloud parameter) makes a pull smaller; out of range is a 400.
#[tokio::test]
async fn max_pull_size_parameter() {
    let s = TestServer::with_toml(&one_queue("")).await;
    for m in ["a", "b", "c"] {
        s.produce(m).await;
    }
    let v = s
        .get(
            "/mq/message",
            &[("topic", TOPIC), ("consumer", "c"), ("maxPullSize", "2")],
        )
        .await;
    assert_eq!(bodies_of(&v), ["a", "b"]);
    let v = s
        .post(
            "/mq/message",
            &[
                ("topic", TOPIC),
                ("consumer", "c"),
                ("maxPullSize", "1"),
                ("requestId", &rid(&v)),
            ],
        )
        .await;
    assert_eq!(bodies_of(&v), ["c"]);
    let bad = s
        .get(
            "/mq/message",
            &[("topic", TOPIC), ("consumer", "c"), ("maxPullSize", "129")],
        )
        .await;
    assert_eq!(bad["status"], 400);
    assert!(
        bad["message"].as_str().is_some_and(|m| m.contains("maxPullSize")),
        "{bad}"
    );
}

/// `consumeTimeout` (seconds, the newer MQCloud parameter) sets this pull's lock time: a batch
/// pulled with 10 s comes back after 10 s although the consumer's own lock time is 5 minutes;
/// out of range, and `pullTimeout` out of range, are 400s naming the parameter and its range.
#[tokio::test]
async fn consume_timeout_parameter_sets_the_batch_s_lock_time() {
    let s = TestServer::with_toml(&one_queue("")).await;
    s.produce("a").await;
    let q = |timeout: &'static str| [("topic", TOPIC), ("consumer", "c"), ("consumeTimeout", timeout)];
    let first = s.get("/mq/message", &q("10")).await;
    assert_eq!(bodies_of(&first), ["a"], "{first}");
    let started = std::time::Instant::now();
    let again = eventually(
        Duration::from_secs(20),
        "redelivery after the pull's own lock time",
        || async {
            let v = s.fetch("c", None).await;
            (v["result"]["status"] == "FOUND").then_some(v)
        },
    )
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "not before the 10 s lock expired"
    );
    assert_eq!(bodies_of(&again), ["a"]);
    for (name, value, range) in [
        ("consumeTimeout", "9", "10"),
        ("consumeTimeout", "129601", "129600"),
        ("pullTimeout", "0", "1"),
        ("pullTimeout", "61", "60"),
        ("maxPullSize", "0", "128"),
        ("waitMs", "30001", "30000"),
    ] {
        let bad = s
            .post("/mq/message", &[("topic", TOPIC), ("consumer", "c"), (name, value)])
            .await;
        assert_eq!(bad["status"], 400, "{name}={value}: {bad}");
        let message = bad["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(name) && message.contains(range),
            "{name}={value}: {bad}"
        );
    }
    let within = s
        .get(
            "/mq/message",
            &[("topic", TOPIC), ("consumer", "c"), ("pullTimeout", "1")],
        )
        .await;
    assert_eq!(within["status"], 200, "{within}");
}

/// Long polling (`waitMs`): a pull that finds nothing waits and answers as soon as a message
/// is produced (not at the end of its wait); with nothing produced it answers `NO_NEW_MSG` once
/// its time is up.
#[tokio::test]
async fn long_polling_answers_when_a_message_arrives() {
    let s = TestServer::with_toml(&one_queue("")).await;
    let q = [("topic", TOPIC), ("consumer", "c"), ("waitMs", "1000")];
    let started = std::time::Instant::now();
    let empty = s.get("/mq/message", &q).await;
    assert_eq!(empty["result"]["status"], "NO_NEW_MSG", "{empty}");
    assert!(started.elapsed() >= Duration::from_millis(1000), "waited its time out");

    let q = [("topic", TOPIC), ("consumer", "c"), ("waitMs", "20000")];
    let started = std::time::Instant::now();
    let (pulled, _) = tokio::join!(s.get("/mq/message", &q), async {
        // The producer comes a moment after the pull started waiting.
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.produce("late").await
    });
    assert_eq!(bodies_of(&pulled), ["late"], "{pulled}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered when the message came, not at the end of the wait: {:?}",
        started.elapsed()
    );
}

/// Two pulls wait on one queue: one message wakes both, one takes it (no lock is held while
/// waiting), the other waits on and answers `NO_NEW_MSG` at its time; the ack that rode on a
/// long-polling pull is answered with it.
#[tokio::test]
async fn waiting_pulls_hold_no_lock_and_one_message_goes_once() {
    let s = TestServer::with_toml(&one_queue("")).await;
    s.produce("first").await;
    let first = s.fetch("c", None).await;
    let waiting = |rid: Option<String>| {
        let s = &s;
        async move {
            let mut q = vec![
                ("topic", TOPIC.to_owned()),
                ("consumer", "c".into()),
                ("waitMs", "3000".into()),
            ];
            if let Some(rid) = rid {
                q.push(("requestId", rid));
            }
            let q: Vec<(&str, &str)> = q.iter().map(|(k, v)| (*k, v.as_str())).collect();
            s.get("/mq/message", &q).await
        }
    };
    let (a, b, _) = tokio::join!(waiting(Some(rid(&first))), waiting(None), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.produce("second").await
    });
    let got: Vec<Vec<String>> = [&a, &b].iter().map(|v| bodies_of(v)).collect();
    assert!(
        got.contains(&vec!["second".to_owned()]) && got.contains(&vec![]),
        "one pull gets the message, the other nothing: {a} {b}"
    );
    assert!(
        a["result"]["ackInfo"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("ok")),
        "the first batch's ack rode on the waiting pull: {a}"
    );
}
