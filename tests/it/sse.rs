//! `/mq/stream` (Server-Sent Events) against the real server with a plain HTTP client: batches
//! pushed as they arrive, credit freed by `/mq/ack`, a dropped connection's batches given back
//! at once, `Last-Event-ID`, heartbeats, refusals with their HTTP status.
//!
//! The client reads the raw event stream (a few lines below) rather than through an SSE client
//! crate: those hide comment lines, and the heartbeats are comment lines.

use crate::common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// One event as the wire has it; a block of comment lines only is `comment`.
#[derive(Debug, Default)]
struct SseEvent {
    event: String,
    id: Option<String>,
    data: String,
    retry: Option<u64>,
    comment: Option<String>,
}

pub struct EventStream {
    response: reqwest::Response,
    buffer: String,
}

impl EventStream {
    async fn open(s: &TestServer, query: &[(&str, &str)], last_event_id: Option<&str>) -> Self {
        Self::open_at(&s.client, &s.base, query, last_event_id).await
    }

    /// `/mq/stream` of the server (or reverse proxy) at `base`.
    pub async fn open_at(
        client: &reqwest::Client,
        base: &str,
        query: &[(&str, &str)],
        last_event_id: Option<&str>,
    ) -> Self {
        let mut request = client.get(format!("{base}/mq/stream")).query(query);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.expect("GET /mq/stream");
        assert_eq!(response.status(), 200, "{query:?}");
        assert_eq!(
            response.headers().get("content-type").and_then(|v| v.to_str().ok()),
            Some("text/event-stream")
        );
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event (comments included), or None when `within` passes first.
    async fn next(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                return Some(parse(&block));
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk()).await.ok()?;
            let chunk = chunk.expect("stream readable").expect("stream still open");
            self.buffer.push_str(std::str::from_utf8(&chunk).expect("UTF-8 events"));
        }
    }

    /// The next event that is not a heartbeat or the opening `retry:`.
    async fn next_event(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = self.next(left).await?;
            if e.comment.is_none() && !e.data.is_empty() {
                return Some(e);
            }
        }
    }

    /// The next batch: (requestId, bodies); panics on any other event.
    pub async fn batch(&mut self, within: Duration) -> (String, Vec<String>) {
        let e = self.next_event(within).await.expect("a batch within the time");
        assert_eq!(e.event, "batch", "{e:?}");
        let data: Value = serde_json::from_str(&e.data).expect("JSON data");
        let id = e.id.expect("a batch has an id");
        assert_eq!(data["requestId"], id.as_str(), "the id is the requestId");
        let bodies = data["msgList"]
            .as_array()
            .expect("msgList")
            .iter()
            .map(|m| m["message"].as_str().unwrap_or_default().to_owned())
            .collect::<Vec<_>>();
        assert_eq!(data["msgListSize"], bodies.len());
        (id, bodies)
    }

    /// Waits for a heartbeat with no batch before it: nothing was pushed for a heartbeat period.
    pub async fn heartbeat_without_batch(&mut self) {
        let e = self.next_event_or_heartbeat().await;
        assert_eq!(e.comment.as_deref(), Some("heartbeat"), "no batch expected now: {e:?}");
    }

    async fn next_event_or_heartbeat(&mut self) -> SseEvent {
        loop {
            let e = self
                .next(Duration::from_secs(10))
                .await
                .expect("heartbeat=1 sends within seconds");
            if e.retry.is_none() {
                return e;
            }
        }
    }
}

fn parse(block: &str) -> SseEvent {
    let mut e = SseEvent::default();
    let mut data: Vec<&str> = Vec::new();
    for line in block.lines() {
        if let Some(comment) = line.strip_prefix(':') {
            e.comment = Some(comment.trim().to_owned());
            continue;
        }
        let (field, value) = line
            .split_once(':')
            .map_or((line, ""), |(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)));
        match field {
            "event" => e.event = value.to_owned(),
            "id" => e.id = Some(value.to_owned()),
            "data" => data.push(value),
            "retry" => e.retry = value.parse().ok(),
            _ => {}
        }
    }
    e.data = data.join("\n");
    e
}

fn lag(v: &Value) -> i64 {
    v["result"]["lag"].as_i64().unwrap_or_else(|| panic!("no lag in {v}"))
}

/// A produce onto the topic's next queue in turn.
async fn produce_in_turn(s: &TestServer, message: &str) -> Value {
    s.post(
        "/mq/produce",
        &[("producer", PRODUCER), ("message", message), ("roundRobin", "true")],
    )
    .await
}

/// Batches come as they are produced; with maxInFlight=1 the next waits for the first's
/// `/mq/ack` (a separate request: the stream learns of it at once).
#[tokio::test]
async fn batches_are_pushed_and_wait_for_their_ack() {
    let s = TestServer::with_toml(&format!(
        "[[topic]]\nname=\"{TOPIC}\"\nqueues=4\n[[producer]]\nname=\"{PRODUCER}\"\ntopic=\"{TOPIC}\"\n\
         [[consumer]]\nname=\"c\"\ntopic=\"{TOPIC}\"\n"
    ))
    .await;
    let query = [
        ("topic", TOPIC),
        ("consumer", "c"),
        ("maxInFlight", "1"),
        ("heartbeat", "1"),
    ];
    let mut stream = EventStream::open(&s, &query, None).await;
    let opening = stream.next(Duration::from_secs(5)).await.expect("retry line");
    assert_eq!(opening.retry, Some(1000), "{opening:?}");
    // Nothing produced yet: only heartbeats.
    stream.heartbeat_without_batch().await;
    assert_eq!(produce_in_turn(&s, "m1").await["status"], 200);
    let (first, bodies) = stream.batch(Duration::from_secs(10)).await;
    assert_eq!(bodies, ["m1"]);
    // On another queue, free to take: held back by maxInFlight=1 alone.
    assert_eq!(produce_in_turn(&s, "m2").await["status"], 200);
    stream.heartbeat_without_batch().await;
    let ack = s
        .post("/mq/ack", &[("topic", TOPIC), ("consumer", "c"), ("requestId", &first)])
        .await;
    assert_eq!(ack["status"], 200, "{ack}");
    assert!(ack["message"].as_str().is_some_and(|m| m.starts_with("ok")), "{ack}");
    let (second, bodies) = stream.batch(Duration::from_secs(10)).await;
    assert_eq!(bodies, ["m2"]);
    assert_ne!(first, second);
}

/// When the connection drops, its unacknowledged batches are unlocked at once: a long-polling
/// pull gets the same message long before the 300 s lock time.
#[tokio::test]
async fn a_dropped_stream_gives_its_batches_back_at_once() {
    let s = TestServer::with_toml(&one_queue("")).await;
    s.produce("x").await;
    let query = [("topic", TOPIC), ("consumer", "c"), ("heartbeat", "1")];
    let mut stream = EventStream::open(&s, &query, None).await;
    let (_, bodies) = stream.batch(Duration::from_secs(10)).await;
    assert_eq!(bodies, ["x"]);
    drop(stream);
    let started = Instant::now();
    let again = s
        .get(
            "/mq/message",
            &[("topic", TOPIC), ("consumer", "c"), ("waitMs", "20000")],
        )
        .await;
    assert_eq!(bodies_of(&again), ["x"], "{again}");
    assert!(started.elapsed() < Duration::from_secs(20), "given back, not expired");
}

/// An EventSource reconnecting sends `Last-Event-ID`: that batch is acknowledged first and the
/// outcome is the stream's first event.
#[tokio::test]
async fn last_event_id_acknowledges_on_reconnect() {
    let s = TestServer::with_toml(&one_queue("")).await;
    s.produce("x").await;
    let query = [("topic", TOPIC), ("consumer", "c")];
    let mut first = EventStream::open(&s, &query, None).await;
    let (id, _) = first.batch(Duration::from_secs(10)).await;
    assert_eq!(lag(&s.get("/admin/consumer/offsets", &[("consumer", "c")]).await), 1);
    // The reconnect (the browser's new request) before this proxy saw the first one drop.
    let mut second = EventStream::open(&s, &query, Some(&id)).await;
    let ack = second
        .next_event(Duration::from_secs(10))
        .await
        .expect("the ack's outcome");
    assert_eq!(ack.event, "ack", "{ack:?}");
    let outcome: Value = serde_json::from_str(&ack.data).expect("JSON");
    assert_eq!(outcome["status"], 200, "{outcome}");
    assert!(
        outcome["message"].as_str().is_some_and(|m| m.starts_with("ok")),
        "{outcome}"
    );
    drop(first);
    assert_eq!(lag(&s.get("/admin/consumer/offsets", &[("consumer", "c")]).await), 0);
    // A forged id is reported the same way, and the stream goes on.
    let mut third = EventStream::open(&s, &query, Some("not-a-request-id")).await;
    let ack = third
        .next_event(Duration::from_secs(10))
        .await
        .expect("the ack's outcome");
    let outcome: Value = serde_json::from_str(&ack.data).expect("JSON");
    assert_eq!(
        (ack.event.as_str(), &outcome["status"]),
        ("ack", &Value::from(400)),
        "{outcome}"
    );
    drop(second);
    s.produce("y").await;
    let (_, bodies) = third.batch(Duration::from_secs(10)).await;
    assert_eq!(bodies, ["y"]);
}

/// `autoAck=true`: each batch is acknowledged once written; the lag goes to 0 with no ack call.
#[tokio::test]
async fn auto_ack_commits_what_was_pushed() {
    let s = TestServer::with_toml(&one_queue("")).await;
    let query = [("topic", TOPIC), ("consumer", "c"), ("autoAck", "true")];
    let mut stream = EventStream::open(&s, &query, None).await;
    for m in ["a", "b", "c"] {
        s.produce(m).await;
        let (_, bodies) = stream.batch(Duration::from_secs(10)).await;
        assert_eq!(bodies, [m]);
    }
    eventually(Duration::from_secs(10), "lag 0 after auto-acked batches", || async {
        (lag(&s.get("/admin/consumer/offsets", &[("consumer", "c")]).await) == 0).then_some(())
    })
    .await;
}

/// Broadcast: every clientId's stream gets every message.
#[tokio::test]
async fn broadcast_streams_each_get_every_message() {
    let s = TestServer::start().await;
    let mut a = EventStream::open(
        &s,
        &[("topic", TOPIC), ("consumer", BROADCAST), ("clientId", "a")],
        None,
    )
    .await;
    let mut b = EventStream::open(
        &s,
        &[("topic", TOPIC), ("consumer", BROADCAST), ("clientId", "b")],
        None,
    )
    .await;
    s.produce("to-all").await;
    assert_eq!(a.batch(Duration::from_secs(10)).await.1, ["to-all"]);
    assert_eq!(b.batch(Duration::from_secs(10)).await.1, ["to-all"]);
}

/// A stream refused before it opens answers the JSON envelope with the failure's HTTP status,
/// whatever `[http] status` says: an EventSource sees nothing else.
#[tokio::test]
async fn refusals_carry_their_http_status() {
    let s = TestServer::start().await;
    let refused = |query: Vec<(&'static str, &'static str)>| {
        let request = s.client.get(s.url("/mq/stream")).query(&query);
        async move {
            let r = request.send().await.expect("GET");
            let status = r.status().as_u16();
            let body: Value = r.json().await.expect("JSON envelope");
            assert_eq!(body["status"], status, "{body}");
            (status, body["message"].as_str().unwrap_or_default().to_owned())
        }
    };
    let (status, message) = refused(vec![("topic", TOPIC), ("consumer", CLUSTERING), ("maxInFlight", "0")]).await;
    assert_eq!(status, 400);
    assert!(
        message.contains("maxInFlight") && message.contains("1") && message.contains("1024"),
        "{message}"
    );
    let (status, message) = refused(vec![("topic", TOPIC), ("consumer", CLUSTERING), ("heartbeat", "301")]).await;
    assert_eq!(status, 400);
    assert!(message.contains("heartbeat"), "{message}");
    let (status, message) = refused(vec![("topic", TOPIC), ("consumer", "no-such-consumer")]).await;
    assert!(status >= 400, "{status} {message}");
    assert!(message.contains("no-such-consumer"), "{message}");
    let (status, message) = refused(vec![("topic", TOPIC), ("consumer", BROADCAST)]).await;
    assert_eq!(status, 400);
    assert!(message.contains("clientId"), "{message}");
    let (status, message) = refused(vec![
        ("topic", TOPIC),
        ("consumer", CLUSTERING),
        ("consumeTimeout", "5"),
    ])
    .await;
    assert_eq!(status, 400);
    assert!(message.contains("consumeTimeout"), "{message}");
}

/// Empty pulls a consumer made (its `NO_NEW_MSG` count in `/metrics`).
async fn empty_pulls(s: &TestServer, consumer: &str) -> u64 {
    let text = s.metrics_text().await;
    text.lines()
        .filter(|l| {
            l.starts_with("mqproxy_pulls_total{")
                && l.contains(&format!("consumer=\"{consumer}\""))
                && l.contains("NO_NEW_MSG")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A stream waits on its own topic: produces and acks on another topic do not wake it (with
/// one signal for every topic, each produce anywhere cost every open stream an empty pull).
#[tokio::test]
async fn a_stream_is_not_woken_by_other_topics() {
    let s = TestServer::with_toml(
        "[[topic]]\nname=\"busy\"\nqueues=1\n[[topic]]\nname=\"quiet\"\nqueues=1\n\
         [[producer]]\nname=\"busy-p\"\ntopic=\"busy\"\n[[producer]]\nname=\"quiet-p\"\ntopic=\"quiet\"\n\
         [[consumer]]\nname=\"busy-c\"\ntopic=\"busy\"\n[[consumer]]\nname=\"quiet-c\"\ntopic=\"quiet\"\n",
    )
    .await;
    let mut quiet = EventStream::open(
        &s,
        &[("topic", "quiet"), ("consumer", "quiet-c"), ("autoAck", "true")],
        None,
    )
    .await;
    // Its first pull found nothing; from here on it waits.
    eventually(Duration::from_secs(10), "the quiet stream's first pull", || async {
        (empty_pulls(&s, "quiet-c").await >= 1).then_some(())
    })
    .await;
    let before = empty_pulls(&s, "quiet-c").await;
    let mut busy = EventStream::open(
        &s,
        &[("topic", "busy"), ("consumer", "busy-c"), ("autoAck", "true")],
        None,
    )
    .await;
    for i in 0..20 {
        let v = s
            .post("/mq/produce", &[("producer", "busy-p"), ("message", &format!("b{i}"))])
            .await;
        assert_eq!(v["status"], 200, "{v}");
        busy.batch(Duration::from_secs(10)).await;
    }
    assert_eq!(
        empty_pulls(&s, "quiet-c").await,
        before,
        "20 produces and acks on another topic woke the quiet stream"
    );
    // Its own topic still wakes it at once. (Counted before: its auto-ack wakes it for one
    // more, empty, pull.)
    let v = s
        .post("/mq/produce", &[("producer", "quiet-p"), ("message", "q")])
        .await;
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(quiet.batch(Duration::from_secs(10)).await.1, ["q"]);
}

/// `pop=true`: two pushed batches from the one queue at once (segments, not the queue, are
/// locked); a dropped stream gives its segments back at once, to come in `retryMsgList`.
#[tokio::test]
async fn pop_streams_hold_several_segments_of_one_queue() {
    let s = TestServer::with_toml(&one_queue("max_pull_size=1\n")).await;
    s.produce("x").await;
    s.produce("y").await;
    let query = [
        ("topic", TOPIC),
        ("consumer", "c"),
        ("pop", "true"),
        ("maxInFlight", "2"),
        ("heartbeat", "1"),
    ];
    let mut stream = EventStream::open(&s, &query, None).await;
    let (_, first) = stream.batch(Duration::from_secs(10)).await;
    let (_, second) = stream.batch(Duration::from_secs(10)).await;
    assert_eq!((first, second), (vec!["x".to_owned()], vec!["y".to_owned()]));
    drop(stream);
    let started = Instant::now();
    let again = s
        .get(
            "/mq/message",
            &[
                ("topic", TOPIC),
                ("consumer", "c"),
                ("pop", "true"),
                ("waitMs", "20000"),
            ],
        )
        .await;
    assert_eq!(again["result"]["retryMsgList"][0]["message"], "x", "{again}");
    assert_eq!(
        again["result"]["retryMsgListSize"], 1,
        "only the first segment, oldest first: {again}"
    );
    assert!(started.elapsed() < Duration::from_secs(20), "given back, not expired");
}

/// The guide's lite-topic use: a session's replies pushed over SSE as they are produced to its
/// lite topic, and nothing of another session's; an ack names the lite topic.
#[tokio::test]
async fn a_lite_topic_stream_gets_only_its_sessions_replies() {
    let s = TestServer::start().await;
    let session = format!("s{}", unique_suffix().replace('-', "_"));
    let query = [
        ("topic", TOPIC),
        ("consumer", CLUSTERING),
        ("liteTopic", session.as_str()),
        ("heartbeat", "1"),
    ];
    let mut stream = EventStream::open(&s, &query, None).await;
    for (message, lite) in [("other", "another-session"), ("reply", session.as_str())] {
        let v = s
            .post(
                "/mq/produce",
                &[("producer", PRODUCER), ("message", message), ("liteTopics", lite)],
            )
            .await;
        assert_eq!(v["status"], 200, "{v}");
    }
    let (id, bodies) = stream.batch(Duration::from_secs(20)).await;
    assert_eq!(bodies, ["reply"]);
    let acked = s
        .get(
            "/mq/ack",
            &[
                ("topic", TOPIC),
                ("consumer", CLUSTERING),
                ("liteTopic", session.as_str()),
                ("requestId", id.as_str()),
            ],
        )
        .await;
    assert_eq!(acked["status"], 200, "{acked}");
    assert!(
        acked["message"].as_str().is_some_and(|m| m.starts_with("ok")),
        "{acked}"
    );
}
