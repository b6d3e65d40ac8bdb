//! The admin API and its access rule, through the public HTTP API.

use crate::common::*;

/// With `admin_token` set, admin calls need it (bearer header or `token` parameter); the seed's
/// endpoints do not.
#[tokio::test]
async fn admin_calls_need_the_token_when_one_is_set() {
    let s = TestServer::with_toml(&format!("admin_token = \"t0k-3n\"\n{}", one_queue(""))).await;
    let url = format!("{}/admin/consumer/config", s.base);
    let status_of = |resp: reqwest::Response| resp.status().as_u16();
    let missing = s
        .client
        .get(&url)
        .query(&[("consumer", "c")])
        .send()
        .await
        .expect("get");
    assert_eq!(status_of(missing), 401);
    let wrong = s
        .client
        .get(&url)
        .query(&[("consumer", "c")])
        .bearer_auth("t0k-3")
        .send()
        .await
        .expect("get");
    assert_eq!(status_of(wrong), 403);
    let by_header = s
        .client
        .get(&url)
        .query(&[("consumer", "c")])
        .bearer_auth("t0k-3n")
        .send()
        .await
        .expect("get");
    let v: serde_json::Value = by_header.json().await.expect("json");
    assert_eq!(v["status"], 200, "{v}");
    let by_param = s
        .get("/admin/consumer/config", &[("consumer", "c"), ("token", "t0k-3n")])
        .await;
    assert_eq!(by_param["status"], 200, "{by_param}");
    // The seed's endpoints stay open.
    s.produce("open").await;
    assert_eq!(s.fetch("c", None).await["result"]["status"], "FOUND");
}

/// Without a token, loopback clients administer (the default a fresh `cargo run` gives).
#[tokio::test]
async fn loopback_administers_without_a_token() {
    let s = TestServer::with_toml(&one_queue("")).await;
    let v = s.get("/admin/consumer/config", &[("consumer", "c")]).await;
    assert_eq!(v["status"], 200, "{v}");
}

fn lag_of(v: &serde_json::Value) -> i64 {
    v["result"]["lag"].as_i64().unwrap_or_else(|| panic!("no lag in {v}"))
}

/// The offsets view follows produce and consume: max, committed offset and lag per queue.
#[tokio::test]
async fn offsets_view_tracks_produce_and_consume() {
    let s = TestServer::with_toml(&one_queue("max_pull_size = 2\n")).await;
    for i in 0..5 {
        s.produce(&format!("m{i}")).await;
    }
    let v = s.get("/admin/consumer/offsets", &[("consumer", "c")]).await;
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(lag_of(&v), 5, "{v}");
    let queue = &v["result"]["clients"][0]["queues"][0];
    assert_eq!(
        (queue["minOffset"].as_i64(), queue["maxOffset"].as_i64()),
        (Some(0), Some(5))
    );
    assert!(queue["committedOffset"].is_null(), "{queue}");
    // One batch out, not acknowledged: still lag 5, and the lock shows.
    let first = s.fetch("c", None).await;
    let v = s.get("/admin/consumer/offsets", &[("consumer", "c")]).await;
    assert_eq!(lag_of(&v), 5);
    assert!(v["result"]["clients"][0]["queues"][0]["lockTimestamp"].is_i64(), "{v}");
    // Acknowledged by the next pull: lag 3; drained: lag 0 and committed = max.
    let second = s.fetch("c", Some(&rid(&first))).await;
    assert_eq!(bodies_of(&first), ["m0", "m1"]);
    let v = s.get("/admin/consumer/offsets", &[("consumer", "c")]).await;
    assert_eq!(lag_of(&v), 3, "{v}");
    let ack = s
        .post(
            "/mq/ack",
            &[("topic", TOPIC), ("consumer", "c"), ("requestId", &rid(&second))],
        )
        .await;
    assert_eq!(ack["status"], 200, "{ack}");
    let v = s.get("/admin/consumer/offsets", &[("consumer", "c")]).await;
    assert_eq!(lag_of(&v), 1, "{v}");
    s.drain("c", None).await;
    let v = s.get("/admin/consumer/offsets", &[("consumer", "c")]).await;
    assert_eq!(lag_of(&v), 0, "{v}");
    assert_eq!(v["result"]["clients"][0]["queues"][0]["committedOffset"], 5);
    // The Java proxy's view of the same queues.
    let java = s.get("/mq/clustering/queue/offset", &[("consumer", "c")]).await;
    assert_eq!(java["result"][0]["committedOffset"], 5, "{java}");
    assert_eq!(java["result"][0]["messageQueue"]["topic"], TOPIC);
    let wrong = s.get("/mq/broadcast/queue/offset", &[("consumer", "c")]).await;
    assert_eq!(wrong["status"], 400, "{wrong}");
}

/// Skip the backlog: the next pull has only messages produced afterwards.
#[tokio::test]
async fn skip_backlog_then_only_newer_messages() {
    let s = TestServer::with_toml(&one_queue("")).await;
    for i in 0..3 {
        s.produce(&format!("old{i}")).await;
    }
    let v = s
        .post(
            "/admin/consumer/offsets/reset",
            &[("consumer", "c"), ("toNewest", "true")],
        )
        .await;
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(lag_of(&v), 0, "{v}");
    s.produce("new").await;
    assert_eq!(s.drain("c", None).await, ["new"]);
}

/// A reset of one queue leaves the others alone.
#[tokio::test]
async fn reset_of_one_queue() {
    let s = TestServer::with_toml(&format!(
        "[[topic]]\nname=\"{TOPIC}\"\nqueues=2\n[[producer]]\nname=\"{PRODUCER}\"\ntopic=\"{TOPIC}\"\n\
         [[consumer]]\nname=\"c\"\ntopic=\"{TOPIC}\"\n"
    ))
    .await;
    let produced = 4 * brokers();
    for i in 0..produced {
        s.produce(&format!("m{i}")).await;
    }
    assert_eq!(s.drain("c", None).await.len(), produced as usize);
    // Queue 1 of the first broker (on a cluster a queue id alone names one queue per broker).
    let before = s.get("/admin/consumer/offsets", &[("consumer", "c")]).await;
    let queues = before["result"]["clients"][0]["queues"]
        .as_array()
        .expect("queues")
        .clone();
    let target = queues
        .iter()
        .position(|q| q["messageQueue"]["queueId"] == 1)
        .expect("a queue 1");
    let broker = queues[target]["messageQueue"]["brokerName"]
        .as_str()
        .expect("brokerName")
        .to_owned();
    let stored = |q: &serde_json::Value| q["maxOffset"].as_i64().unwrap_or(-1) - q["minOffset"].as_i64().unwrap_or(0);
    let expected: Vec<i64> = queues
        .iter()
        .enumerate()
        .map(|(i, q)| if i == target { stored(q) } else { 0 })
        .collect();
    let v = s
        .post(
            "/admin/consumer/offsets/reset",
            &[
                ("consumer", "c"),
                ("timestamp", "0"),
                ("queueId", "1"),
                ("brokerName", &broker),
            ],
        )
        .await;
    assert_eq!(v["status"], 200, "{v}");
    let queues = v["result"]["clients"][0]["queues"].as_array().expect("queues").clone();
    let lag: Vec<i64> = queues.iter().map(|q| q["lag"].as_i64().unwrap_or(-1)).collect();
    assert_eq!(lag, expected, "only queue 1 goes back");
    let mut again = s.drain("c", None).await;
    again.sort();
    assert_eq!(again.len() as i64, expected[target]);
    let missing = s
        .post(
            "/admin/consumer/offsets/reset",
            &[("consumer", "c"), ("toNewest", "true"), ("queueId", "7")],
        )
        .await;
    assert_eq!(missing["status"], 400, "{missing}");
}

/// Reset to a timestamp: the messages stored from then on come again (acknowledged or not),
/// the older ones do not.
#[tokio::test]
async fn reset_to_a_timestamp_consumes_from_then_again() {
    let s = TestServer::with_toml(&one_queue("")).await;
    s.produce("old").await;
    let stored = s.drain("c", None).await;
    assert_eq!(stored, ["old"]);
    // A time after the old message was stored (the clock passed its pull, ms resolution).
    let after_old = {
        let v = s.get("/admin/consumer/offsets", &[("consumer", "c")]).await;
        let last_pull = v["result"]["clients"][0]["queues"][0]["lastConsumeTimestamp"]
            .as_i64()
            .expect("last pull");
        eventually(std::time::Duration::from_secs(2), "the clock to move on", || async {
            (now_ms() > last_pull).then_some(())
        })
        .await;
        now_ms()
    };
    s.produce("x").await;
    s.produce("y").await;
    assert_eq!(s.drain("c", None).await, ["x", "y"]);
    let at = after_old.to_string();
    let v = s
        .post(
            "/admin/consumer/offsets/reset",
            &[("consumer", "c"), ("timestamp", at.as_str())],
        )
        .await;
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(lag_of(&v), 2, "{v}");
    assert_eq!(s.drain("c", None).await, ["x", "y"]);
    // Both or neither is a 400 naming them.
    let bad = s.post("/admin/consumer/offsets/reset", &[("consumer", "c")]).await;
    assert_eq!(bad["status"], 400);
    assert!(
        bad["message"].as_str().unwrap_or_default().contains("toNewest"),
        "{bad}"
    );
}

/// Broadcast: one entry per clientId; a reset of one clientId leaves the others alone.
#[tokio::test]
async fn broadcast_offsets_per_client() {
    let s = TestServer::start().await;
    s.produce("b1").await;
    let a = s.drain(BROADCAST, Some("client-a")).await;
    let b = s.drain(BROADCAST, Some("client-b")).await;
    assert_eq!((a.len(), b.len()), (1, 1));
    let v = s.get("/admin/consumer/offsets", &[("consumer", BROADCAST)]).await;
    let mut connected: Vec<&str> = v["result"]["connected"]
        .as_array()
        .expect("connected")
        .iter()
        .map(|c| {
            assert_eq!(c["clientIp"], "127.0.0.1", "{c}");
            assert!(c["lastSeen"].as_i64().is_some_and(|t| t > 0), "{c}");
            c["clientId"].as_str().unwrap_or_default()
        })
        .collect();
    connected.sort_unstable();
    assert_eq!(connected, ["client-a", "client-b"], "{v}");
    let java = s.get("/mq/broadcast/queue/offset", &[("consumer", BROADCAST)]).await;
    let map = java["result"].as_object().unwrap_or_else(|| panic!("{java}"));
    let mut clients: Vec<&String> = map.keys().collect();
    clients.sort();
    assert_eq!(clients, ["client-a", "client-b"]);
    let v = s
        .post(
            "/admin/consumer/offsets/reset",
            &[("consumer", BROADCAST), ("clientId", "client-a"), ("timestamp", "0")],
        )
        .await;
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(s.drain(BROADCAST, Some("client-a")).await, ["b1"]);
    assert!(s.drain(BROADCAST, Some("client-b")).await.is_empty());
}

/// The value of the first sample of `metric` whose labels include every `labels` pair.
fn sample(text: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
        .find(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `/metrics`: the lag matches the offsets view after produce and after consume; produce,
/// pull and ack counters and request latencies are there.
#[tokio::test]
async fn metrics_lag_matches_the_queue_views() {
    let s = TestServer::with_toml(&one_queue("")).await;
    for i in 0..5 {
        s.produce(&format!("m{i}")).await;
    }
    let view = s.get("/admin/consumer/offsets", &[("consumer", "c")]).await;
    let queue = &view["result"]["clients"][0]["queues"][0];
    let labels = |queue: &serde_json::Value| {
        (
            queue["messageQueue"]["brokerName"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            queue["messageQueue"]["queueId"].to_string(),
        )
    };
    let (broker, queue_id) = labels(queue);
    let lag_labels = [
        ("consumer", "c"),
        ("broker", broker.as_str()),
        ("queue", queue_id.as_str()),
    ];
    let text = s.metrics_text().await;
    assert_eq!(
        sample(&text, "mqproxy_consumer_lag_messages", &lag_labels),
        queue["lag"].as_f64(),
        "{text}"
    );
    assert_eq!(queue["lag"], 5);
    assert_eq!(
        sample(
            &text,
            "mqproxy_produced_messages_total",
            &[("producer", PRODUCER), ("status", "200")]
        ),
        Some(5.0)
    );
    assert!(
        sample(
            &text,
            "mqproxy_request_duration_seconds_count",
            &[("operation", "/mq/produce")]
        )
        .is_some_and(|n| n >= 5.0),
        "{text}"
    );
    assert_eq!(s.drain("c", None).await.len(), 5);
    let text = s.metrics_text().await;
    let view = s.get("/admin/consumer/offsets", &[("consumer", "c")]).await;
    assert_eq!(view["result"]["clients"][0]["queues"][0]["lag"], 0);
    assert_eq!(sample(&text, "mqproxy_consumer_lag_messages", &lag_labels), Some(0.0));
    assert_eq!(
        sample(&text, "mqproxy_delivered_messages_total", &[("consumer", "c")]),
        Some(5.0)
    );
    assert!(
        sample(
            &text,
            "mqproxy_acks_total",
            &[("consumer", "c"), ("outcome", "committed")]
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        sample(&text, "mqproxy_pulls_total", &[("consumer", "c"), ("status", "FOUND")]).is_some_and(|n| n >= 1.0),
        "{text}"
    );
}

/// The console and the demos are served from the binary; the registry view lists the demo
/// registry with its queues.
#[tokio::test]
async fn console_demos_and_registry_are_served() {
    let s = TestServer::start().await;
    for (path, content_type, needle) in [
        ("/console/", "text/html", "mqproxy console"),
        ("/console/console.js", "text/javascript", "/admin/consumer/offsets"),
        ("/demo/", "text/html", "produce.html"),
        ("/demo/produce.html", "text/html", "send ok"),
        ("/demo/jquery-3.7.1.min.js", "text/javascript", "jQuery v3.7.1"),
    ] {
        let resp = s.client.get(format!("{}{path}", s.base)).send().await.expect("get");
        assert_eq!(resp.status(), 200, "{path}");
        let ct = resp.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .expect("ct")
            .to_owned();
        assert!(ct.starts_with(content_type), "{path}: {ct}");
        assert!(resp.text().await.expect("body").contains(needle), "{path}");
    }
    let missing = s
        .client
        .get(format!("{}/demo/nope.js", s.base))
        .send()
        .await
        .expect("get");
    assert_eq!(missing.status(), 404);
    let registry = s.get("/admin/registry", &[]).await;
    assert_eq!(registry["result"]["topics"][0]["name"], TOPIC, "{registry}");
    assert_eq!(
        registry["result"]["topics"][0]["queues"].as_array().map(Vec::len),
        Some(4 * brokers() as usize)
    );
    let consumers: Vec<&str> = registry["result"]["consumers"]
        .as_array()
        .expect("consumers")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(consumers, [BROADCAST, CLUSTERING], "sorted by name");
}

/// An operator's max pull size and consume timeout override the config: smaller batches at
/// once, and an unacknowledged batch comes back after the new lock time (10 s, not 300 s).
#[tokio::test]
async fn pull_size_and_consume_timeout_overrides() {
    let s = TestServer::with_toml(&one_queue("")).await;
    for i in 0..3 {
        s.produce(&format!("m{i}")).await;
    }
    let v = s
        .post(
            "/admin/consumer/config",
            &[("consumer", "c"), ("maxPullSize", "1"), ("consumeTimeoutMs", "10000")],
        )
        .await;
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(
        (
            v["result"]["maxPullSize"].as_i64(),
            v["result"]["consumeTimeoutMs"].as_i64()
        ),
        (Some(1), Some(10_000))
    );
    let bad = s
        .post(
            "/admin/consumer/config",
            &[("consumer", "c"), ("consumeTimeoutMs", "5")],
        )
        .await;
    assert_eq!(bad["status"], 400, "{bad}");
    assert!(
        bad["message"].as_str().unwrap_or_default().contains("consumeTimeoutMs"),
        "{bad}"
    );
    let first = s.fetch("c", None).await;
    assert_eq!(bodies_of(&first), ["m0"], "one message per pull");
    // Not acknowledged: after the overridden 10 s lock the same message comes again.
    let again = eventually(std::time::Duration::from_secs(20), "redelivery after 10 s", || async {
        let v = s.fetch("c", None).await;
        (bodies_of(&v) == ["m0"]).then_some(v)
    })
    .await;
    assert_ne!(rid(&again), rid(&first), "a new lock");
}

/// Topics, producers and consumers created through the admin API work at once and survive a
/// restart; deletions are checked and take effect at once.
#[tokio::test]
async fn registry_changes_apply_at_once_and_survive_restarts() {
    let s = TestServer::with_toml(&one_queue("")).await;
    let ok = |v: &serde_json::Value| assert_eq!(v["status"], 200, "{v}");
    ok(&s.post("/admin/topic", &[("name", "orders"), ("queues", "2")]).await);
    ok(&s
        .post("/admin/producer", &[("name", "orders-p"), ("topic", "orders")])
        .await);
    let v = s
        .post(
            "/admin/consumer",
            &[("name", "orders-c"), ("topic", "orders"), ("maxPullSize", "8")],
        )
        .await;
    ok(&v);
    let topics: Vec<&str> = v["result"]["topics"]
        .as_array()
        .expect("topics")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(topics, [TOPIC, "orders"]);
    for i in 0..4 {
        let p = s
            .post(
                "/mq/produce",
                &[("producer", "orders-p"), ("message", &format!("o{i}"))],
            )
            .await;
        ok(&p);
    }
    let first = s
        .get("/mq/message", &[("topic", "orders"), ("consumer", "orders-c")])
        .await;
    assert_eq!(first["result"]["status"], "FOUND", "{first}");
    let ack = s
        .post(
            "/mq/ack",
            &[
                ("topic", "orders"),
                ("consumer", "orders-c"),
                ("requestId", &rid(&first)),
            ],
        )
        .await;
    ok(&ack);

    // Checked changes.
    let in_use = s.post("/admin/topic/delete", &[("name", "orders")]).await;
    assert_eq!(in_use["status"], 400, "{in_use}");
    let message = in_use["message"].as_str().unwrap_or_default();
    assert!(message.contains("orders-c") && message.contains("orders-p"), "{in_use}");
    let shrink = s.post("/admin/topic", &[("name", "orders"), ("queues", "1")]).await;
    assert_eq!(shrink["status"], 400, "{shrink}");
    let bad = s.post("/admin/topic", &[("name", "no spaces"), ("queues", "1")]).await;
    assert_eq!(bad["status"], 400, "{bad}");
    let dangling = s.post("/admin/producer", &[("name", "x"), ("topic", "nope")]).await;
    assert_eq!(dangling["status"], 400, "{dangling}");
    ok(&s.post("/admin/topic", &[("name", "orders"), ("queues", "3")]).await);
    let registry = s.get("/admin/registry", &[]).await;
    let orders = registry["result"]["topics"]
        .as_array()
        .expect("topics")
        .iter()
        .find(|t| t["name"] == "orders")
        .cloned()
        .expect("orders");
    assert_eq!(orders["queues"].as_array().map(Vec::len), Some(3));
    // The new queue takes messages at once (three produces in a row cover every queue).
    let mut queues = std::collections::BTreeSet::new();
    for i in 4..7 {
        let p = s
            .post(
                "/mq/produce",
                &[("producer", "orders-p"), ("message", &format!("o{i}"))],
            )
            .await;
        ok(&p);
        queues.insert(p["result"]["messageQueue"]["queueId"].as_i64().unwrap_or(-1));
    }
    assert_eq!(queues.into_iter().collect::<Vec<_>>(), [0, 1, 2]);

    // Across a restart: registered, and the consumer continues after what it acknowledged.
    let s = s.restart().await;
    let rest = {
        let mut got = Vec::new();
        let mut request_id: Option<String> = None;
        for _ in 0..12 {
            let mut q = vec![("topic", "orders"), ("consumer", "orders-c")];
            if let Some(r) = request_id.as_deref() {
                q.push(("requestId", r));
            }
            let v = s.get("/mq/message", &q).await;
            ok(&v);
            got.extend(bodies_of(&v));
            request_id = v["result"]["requestId"].as_str().map(str::to_owned);
        }
        got
    };
    let mut all: Vec<String> = bodies_of(&first).into_iter().chain(rest).collect();
    all.sort();
    assert_eq!(
        all,
        ["o0", "o1", "o2", "o3", "o4", "o5", "o6"],
        "each message once across the restart"
    );

    // Deletions take effect at once.
    ok(&s.post("/admin/consumer/delete", &[("name", "orders-c")]).await);
    ok(&s.post("/admin/producer/delete", &[("name", "orders-p")]).await);
    let gone = s
        .get("/mq/message", &[("topic", "orders"), ("consumer", "orders-c")])
        .await;
    assert_eq!(gone["status"], 400, "{gone}");
    let gone = s
        .post("/mq/produce", &[("producer", "orders-p"), ("message", "x")])
        .await;
    assert_eq!(gone["status"], 400, "{gone}");
    ok(&s.post("/admin/topic/delete", &[("name", "orders")]).await);
}

/// A rate of 1 pull per second: the second pull within the second answers RATE_LIMITED.
#[tokio::test]
async fn rate_one_per_second_limits_the_second_pull() {
    let s = TestServer::with_toml(&one_queue("")).await;
    let v = s
        .post("/admin/consumer/config", &[("consumer", "c"), ("limitRate", "1")])
        .await;
    assert_eq!(v["status"], 200, "{v}");
    let started = std::time::Instant::now();
    let first = s.fetch("c", None).await;
    let second = s.fetch("c", None).await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "both within a second"
    );
    assert_ne!(first["result"]["status"], "RATE_LIMITED", "{first}");
    assert_eq!(second["result"]["status"], "RATE_LIMITED", "{second}");
}
