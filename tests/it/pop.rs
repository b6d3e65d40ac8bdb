//! POP consumption (`pop=true`) against the real server: several clients on one queue, each
//! message once; segments given back come in `retryMsgList`; the console's `pop/ack` views and
//! their "skip"; the refusal to mix POP and queue-locking pulls; two proxies sharing Redis.

use crate::common::*;
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};

/// A topic with one queue (on a RocketMQ cluster: one broker's), a clustering and a broadcast
/// consumer.
fn pop_toml() -> String {
    format!(
        "[[topic]]\nname=\"{TOPIC}\"\nqueues=1\n[[producer]]\nname=\"{PRODUCER}\"\ntopic=\"{TOPIC}\"\n\
         [[consumer]]\nname=\"c\"\ntopic=\"{TOPIC}\"\nmax_pull_size=4\n\
         [[consumer]]\nname=\"b\"\ntopic=\"{TOPIC}\"\nmode=\"broadcast\"\nmax_pull_size=4\n"
    )
}

/// The guide's use (1): messages sent with `orderId=<topic>` (one queue keeps them in order).
async fn produce_ordered(s: &TestServer, bodies: impl IntoIterator<Item = String>) {
    for body in bodies {
        let v = s
            .post(
                "/mq/produce",
                &[("producer", PRODUCER), ("message", &body), ("orderId", TOPIC)],
            )
            .await;
        assert_eq!(v["status"], 200, "{v}");
    }
}

async fn pop_pull(s: &TestServer, consumer: &str, client_id: Option<&str>) -> Value {
    let mut q = vec![("topic", TOPIC), ("consumer", consumer), ("pop", "true")];
    if let Some(c) = client_id {
        q.push(("clientId", c));
    }
    let v = s.get("/mq/message", &q).await;
    assert_eq!(v["status"], 200, "{v}");
    v
}

async fn pop_ack(s: &TestServer, consumer: &str, client_id: Option<&str>, request_id: &str) -> Value {
    let mut q = vec![
        ("topic", TOPIC),
        ("consumer", consumer),
        ("requestId", request_id),
        ("pop", "true"),
    ];
    if let Some(c) = client_id {
        q.push(("clientId", c));
    }
    let v = s.get("/mq/ack", &q).await;
    assert_eq!(v["status"], 200, "{v}");
    v
}

fn retry_bodies(v: &Value) -> Vec<String> {
    v["result"]["retryMsgList"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| m["message"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn msg_bodies(v: &Value) -> Vec<String> {
    v["result"]["msgList"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| m["message"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// One POP consumer at `base` until three long polls in a row find nothing: each pull's new
/// messages (acknowledged with `/mq/ack?pop=true` before the next pull).
async fn pop_until_drained(base: String) -> Vec<Vec<String>> {
    let client = reqwest::Client::new();
    let mut got = Vec::new();
    let mut empty = 0;
    while empty < 3 {
        let v: Value = get_json(
            &client,
            &format!("{base}/mq/message"),
            &[("topic", TOPIC), ("consumer", "c"), ("pop", "true"), ("waitMs", "300")],
        )
        .await;
        assert_eq!(v["status"], 200, "{v}");
        assert!(retry_bodies(&v).is_empty(), "nothing was given back: {v}");
        let bodies = msg_bodies(&v);
        if bodies.is_empty() {
            empty += 1;
            continue;
        }
        empty = 0;
        let ack: Value = get_json(
            &client,
            &format!("{base}/mq/ack"),
            &[
                ("topic", TOPIC),
                ("consumer", "c"),
                ("pop", "true"),
                ("requestId", &rid(&v)),
            ],
        )
        .await;
        assert_eq!(ack["status"], 200, "{ack}");
        got.push(bodies);
    }
    got
}

/// Message number `i` of the run, zero-padded so order is visible in the text.
fn numbered(i: usize) -> String {
    format!("m{i:04}")
}

/// A pull's new messages are consecutive numbers, in order.
fn assert_in_order(bodies: &[String]) {
    for pair in bodies.windows(2) {
        let n = |b: &str| b[1..].parse::<usize>().expect("numbered body");
        assert_eq!(n(&pair[1]), n(&pair[0]) + 1, "out of order within one pull: {bodies:?}");
    }
}

/// Several POP consumers drain one queue concurrently: every message once, in order within
/// each pull; while one holds a segment, another gets the next.
#[tokio::test]
async fn pop_consumers_share_one_queue_each_message_once() {
    let s = TestServer::with_toml(&pop_toml()).await;
    const N: usize = 120;
    produce_ordered(&s, (0..N).map(numbered)).await;

    // Two clients on the one queue at once: the second is not blocked by the first.
    let first = pop_pull(&s, "c", None).await;
    let second = pop_pull(&s, "c", None).await;
    assert_eq!(msg_bodies(&first), ["m0000", "m0001", "m0002", "m0003"], "{first}");
    assert_eq!(msg_bodies(&second), ["m0004", "m0005", "m0006", "m0007"], "{second}");
    let view = s.get("/mq/clustering/pop/ack", &[("consumer", "c")]).await;
    assert_eq!(view["status"], 200, "{view}");
    let segments = view["result"].as_array().expect("segments");
    let spans: Vec<(i64, i64)> = segments
        .iter()
        .map(|g| {
            (
                g["offset"].as_i64().unwrap_or(-1),
                g["nextOffset"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    let base = spans[0].0;
    assert_eq!(spans, [(base, base + 4), (base + 4, base + 8)], "{view}");
    for g in segments {
        assert!(g["expireTime"].as_i64() > g["lockTime"].as_i64(), "{g}");
        assert_eq!((&g["retryTimes"], &g["forceAck"]), (&0.into(), &false.into()), "{g}");
        assert!(g["clientIp"].is_string() && g["brokerName"].is_string(), "{g}");
    }
    let mut seen: Vec<String> = msg_bodies(&first).into_iter().chain(msg_bodies(&second)).collect();
    pop_ack(&s, "c", None, &rid(&second)).await;
    pop_ack(&s, "c", None, &rid(&first)).await;

    // Four concurrent consumers for the rest.
    let consumers = (0..4).map(|_| tokio::spawn(pop_until_drained(s.base.clone())));
    let mut pulls = 0;
    for c in consumers {
        for pull in c.await.expect("consumer task") {
            assert_in_order(&pull);
            pulls += 1;
            seen.extend(pull);
        }
    }
    let distinct: HashSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), seen.len(), "a message came twice");
    assert_eq!(seen.len(), N, "every message once ({pulls} pulls)");
    let offsets = s.get("/admin/consumer/offsets", &[("consumer", "c")]).await;
    assert_eq!(offsets["result"]["lag"], 0, "all committed: {offsets}");
}

/// `/mq/unlock?pop=true` gives a segment back: the next POP pull has it in `retryMsgList`
/// before anything new; the console's "skip" (`/mq/ack` with the view's requestId) ends a
/// segment; pulls with and without `pop` do not mix (400 saying why).
#[tokio::test]
async fn given_back_segments_come_in_the_retry_list_and_the_view_skips() {
    let s = TestServer::with_toml(&pop_toml()).await;
    produce_ordered(&s, (0..6).map(numbered)).await;
    let held = pop_pull(&s, "c", None).await;
    let unlocked = s
        .get(
            "/mq/unlock",
            &[
                ("topic", TOPIC),
                ("consumer", "c"),
                ("requestId", &rid(&held)),
                ("pop", "true"),
            ],
        )
        .await;
    assert_eq!(unlocked["status"], 200, "{unlocked}");
    assert!(
        unlocked["message"].as_str().is_some_and(|m| m.ends_with("unlock:true")),
        "{unlocked}"
    );
    let again = pop_pull(&s, "c", None).await;
    assert_eq!(retry_bodies(&again), msg_bodies(&held), "{again}");
    assert!(msg_bodies(&again).is_empty(), "{again}");
    let next = pop_pull(&s, "c", None).await;
    assert_eq!(msg_bodies(&next), ["m0004", "m0005"], "{next}");

    // Mixing: a pull without pop while segments are in flight is refused, naming pop.
    let refused = s.get("/mq/message", &[("topic", TOPIC), ("consumer", "c")]).await;
    assert_eq!(refused["status"], 400, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("POP segments in flight") && m.contains("pop=true")),
        "{refused}"
    );

    // The console skips the first segment by its requestId, as the view gives it.
    let view = s.get("/mq/clustering/pop/ack", &[("consumer", "c")]).await;
    let segments = view["result"].as_array().expect("segments").clone();
    assert_eq!(segments.len(), 2, "{view}");
    assert_eq!(segments[0]["retryTimes"], 1, "{view}");
    for g in &segments {
        pop_ack(&s, "c", None, g["requestId"].as_str().expect("requestId")).await;
    }
    let view = s.get("/mq/clustering/pop/ack", &[("consumer", "c")]).await;
    assert_eq!(view["result"], serde_json::json!([]), "{view}");
    assert_eq!(view["message"], "0 segments in flight", "{view}");
    let offsets = s.get("/admin/consumer/offsets", &[("consumer", "c")]).await;
    assert_eq!(offsets["result"]["lag"], 0, "{offsets}");

    // The queue-locking pull works again, and then POP is refused while it holds the queue.
    produce_ordered(&s, [numbered(6)]).await;
    let normal = s.get("/mq/message", &[("topic", TOPIC), ("consumer", "c")]).await;
    assert_eq!(msg_bodies(&normal), ["m0006"], "{normal}");
    let refused = s
        .get("/mq/message", &[("topic", TOPIC), ("consumer", "c"), ("pop", "true")])
        .await;
    assert_eq!(refused["status"], 400, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("without pop=true")),
        "{refused}"
    );

    // The views belong to their mode, and to the admin.
    let wrong = s.get("/mq/broadcast/pop/ack", &[("consumer", "c")]).await;
    assert_eq!(wrong["status"], 400, "{wrong}");
    let public = s
        .client
        .get(format!("{}/mq/clustering/pop/ack", s.base))
        .query(&[("consumer", "c")])
        .send()
        .await
        .expect("GET");
    let public: Value = public.json().await.expect("JSON");
    assert_eq!(
        public["status"], 403,
        "the public listener refuses admin paths: {public}"
    );
}

/// Broadcast POP: each clientId gets every message, its segments shown per clientId.
#[tokio::test]
async fn broadcast_pop_gives_every_client_every_message() {
    let s = TestServer::with_toml(&pop_toml()).await;
    produce_ordered(&s, (0..3).map(numbered)).await;
    let x = pop_pull(&s, "b", Some("x")).await;
    let y = pop_pull(&s, "b", Some("y")).await;
    assert_eq!(msg_bodies(&x), ["m0000", "m0001", "m0002"], "{x}");
    assert_eq!(msg_bodies(&y), msg_bodies(&x), "{y}");
    let view = s
        .get("/mq/broadcast/pop/ack", &[("consumer", "b"), ("clientId", "x")])
        .await;
    let segments = view["result"].as_array().expect("segments");
    assert_eq!(segments.len(), 1, "{view}");
    assert_eq!(segments[0]["clientId"], "x", "{view}");
    let all = s.get("/mq/broadcast/pop/ack", &[("consumer", "b")]).await;
    let clients: Vec<&str> = all["result"]
        .as_array()
        .expect("segments")
        .iter()
        .filter_map(|g| g["clientId"].as_str())
        .collect();
    assert_eq!(clients, ["x", "y"], "{all}");
    pop_ack(&s, "b", Some("x"), &rid(&x)).await;
    let view = s
        .get("/mq/broadcast/pop/ack", &[("consumer", "b"), ("clientId", "x")])
        .await;
    assert_eq!(view["result"], serde_json::json!([]), "{view}");
    assert!(msg_bodies(&pop_pull(&s, "b", Some("x")).await).is_empty());
}

/// Two proxies on one Redis consumer state: POP consumers on both never get one segment twice.
/// On the embedded store each proxy has its own messages: both get the same ones, in the same
/// order (same offsets), so a segment handed out by both would show as a message seen twice.
#[tokio::test]
async fn pop_across_two_proxies_sharing_redis_hands_out_each_segment_once() {
    let Ok(url) = std::env::var("MQPROXY_TEST_REDIS_URL") else {
        eprintln!("skipped: set MQPROXY_TEST_REDIS_URL to run");
        return;
    };
    let prefix = format!("pop-{}:", unique_suffix());
    let topic_prefix = format!("t{}-", unique_suffix());
    let shared = || {
        let mut config = config(Some(&pop_toml()));
        config.consumer_state.kind = mqproxy::store::consumer_state::ConsumerStateKind::Redis;
        config.consumer_state.url = Some(url.clone());
        config.consumer_state.prefix = prefix.clone();
        if rocketmq_backend() {
            use_rocketmq(&mut config, &topic_prefix);
        }
        config
    };
    let a = TestServer::with_config(shared()).await;
    let b = TestServer::with_config(shared()).await;
    const N: usize = 80;
    produce_ordered(&a, (0..N).map(numbered)).await;
    if !rocketmq_backend() {
        produce_ordered(&b, (0..N).map(numbered)).await;
    }
    let proxies = [a.base.clone(), b.base.clone(), a.base.clone(), b.base.clone()];
    let consumers = proxies.into_iter().map(|base| tokio::spawn(pop_until_drained(base)));
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for c in consumers {
        for pull in c.await.expect("consumer task") {
            assert_in_order(&pull);
            for body in pull {
                *count.entry(body).or_default() += 1;
            }
        }
    }
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "handed out twice: {twice:?}");
    assert_eq!(count.len(), N, "every message once");
}
