//! Bounds on the state anonymous clients can make the proxy keep: broadcast clientIds (capped
//! per consumer, forgotten when idle), per-client metric series, Consume streams, clientId and
//! header sizes, metric labels of unregistered names.

use crate::common::*;
use mqproxy::grpc::pb;
use pb::messaging_service_client::MessagingServiceClient;
use std::time::Duration;

/// One queue, a broadcast consumer `b`, and `extra` top-level TOML.
fn broadcast_config(extra: &str) -> String {
    format!(
        "{extra}\n[[topic]]\nname=\"{TOPIC}\"\nqueues=1\n[[producer]]\nname=\"{PRODUCER}\"\ntopic=\"{TOPIC}\"\n\
         [[consumer]]\nname=\"b\"\ntopic=\"{TOPIC}\"\nmode=\"broadcast\"\n"
    )
}

async fn pull_as(s: &TestServer, client_id: &str, request_id: Option<&str>) -> serde_json::Value {
    let mut q = vec![("topic", TOPIC), ("consumer", "b"), ("clientId", client_id)];
    if let Some(r) = request_id {
        q.push(("requestId", r));
    }
    s.get("/mq/message", &q).await
}

async fn known_clients(s: &TestServer) -> Vec<String> {
    let v = s
        .get("/admin/consumer/offsets", &[("consumer", "b"), ("pageSize", "1000")])
        .await;
    assert_eq!(v["status"], 200, "{v}");
    let mut ids: Vec<String> = v["result"]["clients"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["clientId"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// A consumer's clientIds are capped (a new one past the cap is a 429 naming the key); an idle
/// client is forgotten with its offsets, which makes room; a forgotten client that comes back
/// starts where a new client starts (here: the smallest offset, so it gets everything again).
#[tokio::test]
async fn broadcast_clients_are_capped_and_idle_ones_forgotten() {
    let s = TestServer::with_toml(&broadcast_config(
        "consume.broadcast_client_idle_ms = 1500\nconsume.max_broadcast_clients = 3",
    ))
    .await;
    s.produce("m0").await;
    s.produce("m1").await;
    // c2 consumes both and acknowledges.
    let first = pull_as(&s, "c2", None).await;
    assert_eq!(bodies_of(&first), ["m0", "m1"], "{first}");
    let acked = pull_as(&s, "c2", Some(&rid(&first))).await;
    assert_eq!(acked["result"]["ackInfo"]["status"], 200, "{acked}");
    for c in ["c1", "c3"] {
        assert_eq!(pull_as(&s, c, None).await["status"], 200);
    }
    let refused = pull_as(&s, "c4", None).await;
    assert_eq!(refused["status"], 429, "{refused}");
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(message.contains("max_broadcast_clients"), "{message}");
    assert_eq!(known_clients(&s).await, ["c1", "c2", "c3"]);

    // c1 keeps pulling; c2 and c3 go quiet and are forgotten.
    let forgotten = eventually(Duration::from_secs(30), "c2 and c3 forgotten", || async {
        let v = pull_as(&s, "c1", None).await;
        assert_eq!(v["status"], 200, "{v}");
        // Acknowledge what c1 got so its next pull is a plain poll.
        if v["result"]["requestId"].is_string() {
            pull_as(&s, "c1", Some(&rid(&v))).await;
        }
        let known = known_clients(&s).await;
        (known == ["c1"]).then_some(known)
    })
    .await;
    assert_eq!(forgotten, ["c1"]);
    assert_eq!(pull_as(&s, "c4", None).await["status"], 200, "room again");
    let back = pull_as(&s, "c2", None).await;
    assert_eq!(
        bodies_of(&back),
        ["m0", "m1"],
        "a forgotten client starts afresh: {back}"
    );
}

/// `/metrics` has per-clientId lag series for the most lagging clients only, and per-consumer
/// aggregates for all; the offsets view pages its clients and counts them.
#[tokio::test]
async fn per_client_series_and_the_offsets_view_are_bounded() {
    let s = TestServer::with_toml(&broadcast_config("consume.metrics_max_client_series = 2")).await;
    for i in 0..3 {
        s.produce(&format!("m{i}")).await;
    }
    // a consumes everything, b one batch of one, the others nothing: lags 0, 2, 3, 3, 3.
    let a = pull_as(&s, "a", None).await;
    pull_as(&s, "a", Some(&rid(&a))).await;
    let b = s
        .get(
            "/mq/message",
            &[
                ("topic", TOPIC),
                ("consumer", "b"),
                ("clientId", "b"),
                ("maxPullSize", "1"),
            ],
        )
        .await;
    pull_as(&s, "b", Some(&rid(&b))).await;
    for c in ["c", "d", "e"] {
        pull_as(&s, c, None).await;
    }
    // c, d, e hold their batches unacknowledged: lag counts from the committed offset.
    let text = s.metrics_text().await;
    let lag_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("mqproxy_consumer_lag_messages{") && l.contains("consumer=\"b\""))
        .collect();
    assert_eq!(lag_lines.len(), 2, "two per-client series: {lag_lines:?}");
    assert!(
        lag_lines.iter().all(|l| l.ends_with(" 3")),
        "the most lagging: {lag_lines:?}"
    );
    let value = |metric: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{metric}{{")) && l.contains("consumer=\"b\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    assert_eq!(value("mqproxy_broadcast_clients"), Some(5), "{text}");
    assert_eq!(
        value("mqproxy_broadcast_lag_sum_messages"),
        Some(2 + 3 + 3 + 3),
        "{text}"
    );
    assert_eq!(value("mqproxy_broadcast_lag_max_messages"), Some(3), "{text}");

    let page = s
        .get(
            "/admin/consumer/offsets",
            &[("consumer", "b"), ("page", "2"), ("pageSize", "2")],
        )
        .await;
    assert_eq!(page["result"]["clientCount"], 5, "{page}");
    let ids: Vec<&str> = page["result"]["clients"]
        .as_array()
        .expect("clients")
        .iter()
        .filter_map(|c| c["clientId"].as_str())
        .collect();
    assert_eq!(ids, ["c", "d"], "sorted, second page");
    assert_eq!(page["result"]["lag"], 3, "the lag is over every client");
    let too_big = s
        .get("/admin/consumer/offsets", &[("consumer", "b"), ("pageSize", "1001")])
        .await;
    assert_eq!(too_big["status"], 400, "{too_big}");
    assert!(
        too_big["message"].as_str().unwrap_or_default().contains("pageSize"),
        "{too_big}"
    );
}

/// ClientIds are bounded in size and may not name another context's Redis keys.
#[tokio::test]
async fn client_ids_are_checked() {
    let s = TestServer::with_toml(&broadcast_config("")).await;
    let long = "x".repeat(129);
    for bad in [long.as_str(), "victim:retry", "victim:retry:seq"] {
        let v = pull_as(&s, bad, None).await;
        assert_eq!(v["status"], 400, "{v}");
        assert!(v["message"].as_str().unwrap_or_default().contains("clientId"), "{v}");
    }
    assert_eq!(pull_as(&s, &"x".repeat(128), None).await["status"], 200);
    assert_eq!(pull_as(&s, "::1", None).await["status"], 200, "IPv6 addresses are fine");
}

/// Names the registry does not know never become metric labels.
#[tokio::test]
async fn unregistered_names_are_not_metric_labels() {
    let s = TestServer::with_toml(&broadcast_config("")).await;
    for i in 0..20 {
        let name = format!("stranger-{i}");
        let v = s.post("/mq/produce", &[("producer", &name), ("message", "x")]).await;
        assert_eq!(v["status"], 400, "{v}");
        let v = s.get("/mq/message", &[("topic", &name), ("consumer", &name)]).await;
        assert_eq!(v["status"], 400, "{v}");
    }
    let unmatched = s
        .client
        .post(format!("{}/stranger.Service/Method", s.base))
        .header("content-type", "application/grpc")
        .send()
        .await
        .expect("post");
    drop(unmatched);
    let text = s.metrics_text().await;
    assert!(!text.contains("stranger"), "{text}");
    assert!(text.contains("operation=\"(unmatched)\""), "{text}");
}

/// A request head past `max_header_bytes` is refused (431) before it reaches a handler.
#[tokio::test]
async fn request_heads_are_bounded() {
    let s = TestServer::with_toml(&broadcast_config("listener.max_header_bytes = 16384")).await;
    let resp = s
        .client
        .get(format!("{}/healthz", s.base))
        .header("x-padding", "p".repeat(20_000))
        .send()
        .await
        .expect("answered");
    assert_eq!(resp.status(), 431);
    let ok = s.client.get(format!("{}/healthz", s.base)).send().await.expect("get");
    assert_eq!(ok.status(), 200);
}

/// `max_consume_streams` Consume streams at once; one more is ResourceExhausted until one
/// closes.
#[tokio::test]
async fn consume_streams_are_capped() {
    let s = TestServer::with_toml(&broadcast_config("consume.max_consume_streams = 1")).await;
    let mut grpc = MessagingServiceClient::connect(s.base.clone())
        .await
        .expect("gRPC connect");
    let subscribe = |client_id: &str| pb::ConsumeRequest {
        command: Some(pb::consume_request::Command::Subscribe(pb::Subscribe {
            target: Some(pb::ConsumeTarget {
                topic: TOPIC.into(),
                consumer: "b".into(),
                client_id: Some(client_id.into()),
                lite_topic: None,
            }),
            ..Default::default()
        })),
    };
    let (first_tx, first_rx) = tokio::sync::mpsc::channel(4);
    first_tx.send(subscribe("s1")).await.expect("subscribe");
    let first = grpc
        .consume(tokio_stream::wrappers::ReceiverStream::new(first_rx))
        .await
        .expect("first stream");
    let second = grpc
        .consume(tokio_stream::iter(vec![subscribe("s2")]))
        .await
        .map(|_| ())
        .expect_err("second stream refused");
    assert_eq!(second.code(), tonic::Code::ResourceExhausted, "{second:?}");
    assert!(second.message().contains("max_consume_streams"), "{second:?}");
    drop((first, first_tx));
    eventually(Duration::from_secs(10), "a stream slot frees up", || {
        let mut grpc = grpc.clone();
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(subscribe("s3")).await.ok()?;
            let stream = grpc
                .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .ok()?;
            drop((stream, tx));
            Some(())
        }
    })
    .await;
}

/// A gRPC request message is bounded by `max_request_bytes`, as a REST body is.
#[tokio::test]
async fn grpc_messages_are_bounded_like_rest_bodies() {
    let s = TestServer::with_toml(&broadcast_config("http.max_request_bytes = 8388608")).await;
    let mut grpc = MessagingServiceClient::connect(s.base.clone())
        .await
        .expect("gRPC connect")
        .max_encoding_message_size(usize::MAX);
    let produce = |bytes: usize| pb::ProduceRequest {
        producer: PRODUCER.into(),
        body: vec![b'x'; bytes],
        ..Default::default()
    };
    let too_big = grpc
        .produce(produce(9 << 20))
        .await
        .expect_err("a 9 MiB message past max_request_bytes");
    assert_eq!(too_big.code(), tonic::Code::OutOfRange, "{too_big:?}");
    let fine = grpc.produce(produce(1 << 20)).await.expect("1 MiB is fine");
    assert!(fine.into_inner().result.is_some());
}
