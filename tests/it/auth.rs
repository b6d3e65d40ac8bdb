//! Per-producer and per-consumer access tokens over REST and gRPC: missing → 401 /
//! Unauthenticated, wrong → 403 / PermissionDenied, right (bearer header, `token` parameter,
//! gRPC metadata) → served; set by config or the admin API, kept as digests, never logged.

use crate::common::*;
use mqproxy::grpc::pb;
use pb::messaging_service_client::MessagingServiceClient;
use serde_json::Value;

const PRODUCER_TOKEN: &str = "prod-s3cret-4711";
const CONSUMER_TOKEN: &str = "cons-s3cret-0815";

/// One queue; the producer has a token, consumer `c` a token given as its SHA-256, consumer
/// `open` none.
fn secured(extra: &str) -> String {
    let digest = mqproxy::engine::AccessToken::from_secret(CONSUMER_TOKEN).sha256_hex();
    format!(
        "{extra}\n[[topic]]\nname=\"{TOPIC}\"\nqueues=1\n\
         [[producer]]\nname=\"{PRODUCER}\"\ntopic=\"{TOPIC}\"\ntoken=\"{PRODUCER_TOKEN}\"\n\
         [[consumer]]\nname=\"c\"\ntopic=\"{TOPIC}\"\ntoken_sha256=\"{digest}\"\n\
         [[consumer]]\nname=\"open\"\ntopic=\"{TOPIC}\"\n"
    )
}

/// Sends `req` with an optional bearer token: (HTTP status, JSON body).
async fn send_as(req: reqwest::RequestBuilder, bearer: Option<&str>) -> (u16, Value) {
    let req = match bearer {
        Some(t) => req.bearer_auth(t),
        None => req,
    };
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON answer"))
}

async fn post_as(s: &TestServer, path: &str, bearer: Option<&str>, form: &[(&str, &str)]) -> (u16, Value) {
    send_as(s.client.post(format!("{}{path}", s.base)).form(form), bearer).await
}

async fn get_as(s: &TestServer, path: &str, bearer: Option<&str>, query: &[(&str, &str)]) -> (u16, Value) {
    send_as(s.client.get(format!("{}{path}", s.base)).query(query), bearer).await
}

#[tokio::test]
async fn rest_producers_and_consumers_need_their_tokens() {
    let s = TestServer::with_toml(&secured("")).await;
    let produce = |m: &'static str| [("producer", PRODUCER), ("message", m)];

    // Producer: missing → 401, wrong → 403 (in the body; HTTP 200 by the default policy).
    let (http, v) = post_as(&s, "/mq/produce", None, &produce("m0")).await;
    assert_eq!((http, v["status"].as_i64()), (200, Some(401)), "{v}");
    assert!(
        v["message"].as_str().unwrap_or_default().contains("needs a token"),
        "{v}"
    );
    let (_, v) = post_as(&s, "/mq/produce", Some("prod-s3cret-471"), &produce("m0")).await;
    assert_eq!(v["status"], 403, "{v}");
    let (_, v) = post_as(&s, "/mq/produce", Some(CONSUMER_TOKEN), &produce("m0")).await;
    assert_eq!(v["status"], 403, "another entry's token is a wrong token: {v}");
    // Right: bearer header, or the `token` form parameter (what a jQuery client sends).
    let (_, v) = post_as(&s, "/mq/produce", Some(PRODUCER_TOKEN), &produce("m1")).await;
    assert_eq!(v["status"], 200, "{v}");
    let (_, v) = post_as(
        &s,
        "/mq/produce",
        None,
        &[("producer", PRODUCER), ("message", "m2"), ("token", PRODUCER_TOKEN)],
    )
    .await;
    assert_eq!(v["status"], 200, "{v}");
    let batch = [("producer", PRODUCER), ("messages", r#"["m3","m4"]"#)];
    let (_, v) = post_as(&s, "/mq/produce/batch", None, &batch).await;
    assert_eq!(v["status"], 401, "{v}");
    let (_, v) = post_as(&s, "/mq/produce/batch", Some(PRODUCER_TOKEN), &batch).await;
    assert_eq!(v["status"], 200, "{v}");

    // Consumer `c`: pull, ack and unlock each check the token.
    let pull = [("topic", TOPIC), ("consumer", "c")];
    let (_, v) = get_as(&s, "/mq/message", None, &pull).await;
    assert_eq!(v["status"], 401, "{v}");
    let (_, v) = get_as(&s, "/mq/message", Some(PRODUCER_TOKEN), &pull).await;
    assert_eq!(v["status"], 403, "{v}");
    let (_, v) = get_as(
        &s,
        "/mq/message",
        None,
        &[("topic", TOPIC), ("consumer", "c"), ("token", CONSUMER_TOKEN)],
    )
    .await;
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(
        bodies_of(&v),
        ["m1", "m2", "m3", "m4"],
        "nothing refused was stored: {v}"
    );
    let request_id = rid(&v);
    let with_rid = [("topic", TOPIC), ("consumer", "c"), ("requestId", request_id.as_str())];
    for path in ["/mq/unlock", "/mq/ack"] {
        let (_, v) = post_as(&s, path, None, &with_rid).await;
        assert_eq!(v["status"], 401, "{path}: {v}");
        let (_, v) = post_as(&s, path, Some("nope"), &with_rid).await;
        assert_eq!(v["status"], 403, "{path}: {v}");
    }
    let (_, v) = post_as(&s, "/mq/ack", Some(CONSUMER_TOKEN), &with_rid).await;
    assert_eq!(v["status"], 200, "{v}");
    // The ack committed: the batch does not come again.
    let (_, v) = get_as(&s, "/mq/message", Some(CONSUMER_TOKEN), &pull).await;
    assert_eq!(v["result"]["status"], "NO_NEW_MSG", "{v}");

    // A consumer without a token stays open; the registry says who needs one.
    let (_, v) = get_as(&s, "/mq/message", None, &[("topic", TOPIC), ("consumer", "open")]).await;
    assert_eq!(v["status"], 200, "{v}");
    let registry = s.get("/admin/registry", &[]).await;
    assert_eq!(registry["result"]["producers"][0]["tokenRequired"], true, "{registry}");
    let consumers = &registry["result"]["consumers"];
    assert_eq!(consumers[0]["name"], "c");
    assert_eq!(consumers[0]["tokenRequired"], true, "{registry}");
    assert_eq!(consumers[1]["tokenRequired"], false, "{registry}");
    assert!(!registry.to_string().contains(PRODUCER_TOKEN), "{registry}");
}

/// With `[http] status = "mirror"` the HTTP status is the body's 401 / 403.
#[tokio::test]
async fn mirror_mode_answers_401_and_403() {
    let s = TestServer::with_toml(&secured("http.status = \"mirror\"")).await;
    let form = [("producer", PRODUCER), ("message", "x")];
    assert_eq!(post_as(&s, "/mq/produce", None, &form).await.0, 401);
    assert_eq!(post_as(&s, "/mq/produce", Some("wrong"), &form).await.0, 403);
    assert_eq!(post_as(&s, "/mq/produce", Some(PRODUCER_TOKEN), &form).await.0, 200);
}

/// The error code of a call, None when it succeeded.
fn code<T>(r: Result<T, tonic::Status>) -> Option<tonic::Code> {
    r.err().map(|s| s.code())
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().expect("metadata"));
    }
    req
}

#[tokio::test]
async fn grpc_calls_need_the_same_tokens() {
    let s = TestServer::with_toml(&secured("")).await;
    let mut c = MessagingServiceClient::connect(s.base.clone()).await.expect("connect");
    let produce = |t: Option<&str>| {
        with_token(
            pb::ProduceRequest {
                producer: PRODUCER.into(),
                body: b"g1".to_vec(),
                ..Default::default()
            },
            t,
        )
    };
    assert_eq!(code(c.produce(produce(None)).await), Some(tonic::Code::Unauthenticated));
    assert_eq!(
        code(c.produce(produce(Some("wrong"))).await),
        Some(tonic::Code::PermissionDenied)
    );
    c.produce(produce(Some(PRODUCER_TOKEN)))
        .await
        .expect("produce with the token");
    let batch = |t: Option<&str>| {
        with_token(
            pb::ProduceBatchRequest {
                producer: PRODUCER.into(),
                bodies: vec![b"g2".to_vec()],
                client_ip: None,
            },
            t,
        )
    };
    assert_eq!(
        code(c.produce_batch(batch(None)).await),
        Some(tonic::Code::Unauthenticated)
    );
    c.produce_batch(batch(Some(PRODUCER_TOKEN)))
        .await
        .expect("batch with the token");

    let target = || {
        Some(pb::ConsumeTarget {
            topic: TOPIC.into(),
            consumer: "c".into(),
            client_id: None,
            lite_topic: None,
        })
    };
    let fetch = |t: Option<&str>| {
        with_token(
            pb::FetchRequest {
                target: target(),
                ..Default::default()
            },
            t,
        )
    };
    assert_eq!(code(c.fetch(fetch(None)).await), Some(tonic::Code::Unauthenticated));
    assert_eq!(
        code(c.fetch(fetch(Some(PRODUCER_TOKEN))).await),
        Some(tonic::Code::PermissionDenied)
    );
    let got = c.fetch(fetch(Some(CONSUMER_TOKEN))).await.expect("fetch").into_inner();
    let bodies: Vec<&[u8]> = got.messages.iter().map(|m| m.body.as_slice()).collect();
    assert_eq!(bodies, [b"g1".as_slice(), b"g2".as_slice()]);
    let ack = |t: Option<&str>| {
        with_token(
            pb::AckRequest {
                target: target(),
                request_id: got.request_id.clone().unwrap_or_default(),
            },
            t,
        )
    };
    assert_eq!(code(c.ack(ack(None)).await), Some(tonic::Code::Unauthenticated));
    let unlock = with_token(
        pb::UnlockRequest {
            target: target(),
            request_id: got.request_id.clone().unwrap_or_default(),
        },
        Some("wrong"),
    );
    assert_eq!(code(c.unlock(unlock).await), Some(tonic::Code::PermissionDenied));
    assert!(
        c.ack(ack(Some(CONSUMER_TOKEN)))
            .await
            .expect("ack")
            .into_inner()
            .committed
    );

    // The Consume stream: refused at subscribe without the token, served with it.
    let subscribe = pb::ConsumeRequest {
        command: Some(pb::consume_request::Command::Subscribe(pb::Subscribe {
            target: target(),
            ..Default::default()
        })),
    };
    let stream = |t: Option<&str>| with_token(tokio_stream::iter(vec![subscribe.clone()]), t);
    assert_eq!(code(c.consume(stream(None)).await), Some(tonic::Code::Unauthenticated));
    assert_eq!(
        code(c.consume(stream(Some("wrong"))).await),
        Some(tonic::Code::PermissionDenied)
    );
    c.consume(stream(Some(CONSUMER_TOKEN)))
        .await
        .expect("consume with the token");
}

/// The admin API sets, keeps and clears tokens; the saved registry holds digests only and
/// the tokens survive a restart.
#[tokio::test]
async fn admin_api_sets_keeps_and_clears_tokens() {
    let s = TestServer::with_toml(&one_queue("")).await;
    let v = s
        .post(
            "/admin/producer",
            &[("name", "p2"), ("topic", TOPIC), ("accessToken", "new-t0ken-99")],
        )
        .await;
    assert_eq!(v["status"], 200, "{v}");
    let form = [("producer", "p2"), ("message", "x")];
    assert_eq!(post_as(&s, "/mq/produce", None, &form).await.1["status"], 401);
    assert_eq!(
        post_as(&s, "/mq/produce", Some("new-t0ken-99"), &form).await.1["status"],
        200
    );
    // Changed without accessToken: the token stays.
    let v = s.post("/admin/producer", &[("name", "p2"), ("topic", TOPIC)]).await;
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(post_as(&s, "/mq/produce", None, &form).await.1["status"], 401);
    let v = s
        .post(
            "/admin/consumer",
            &[("name", "c2"), ("topic", TOPIC), ("accessToken", "c2-t0ken")],
        )
        .await;
    assert_eq!(v["status"], 200, "{v}");

    let saved = std::fs::read_to_string(s.data_dir.join("registry.json")).expect("registry.json");
    assert!(
        !saved.contains("new-t0ken-99") && !saved.contains("c2-t0ken"),
        "{saved}"
    );
    assert!(saved.contains("token_sha256"), "{saved}");

    let s = s.restart().await;
    assert_eq!(post_as(&s, "/mq/produce", None, &form).await.1["status"], 401);
    assert_eq!(
        post_as(&s, "/mq/produce", Some("new-t0ken-99"), &form).await.1["status"],
        200
    );
    let pull = [("topic", TOPIC), ("consumer", "c2")];
    assert_eq!(get_as(&s, "/mq/message", None, &pull).await.1["status"], 401);
    assert_eq!(
        get_as(&s, "/mq/message", Some("c2-t0ken"), &pull).await.1["status"],
        200
    );

    // clearAccessToken removes the token; with a new token too it is a 400.
    let both = [
        ("name", "p2"),
        ("topic", TOPIC),
        ("accessToken", "x"),
        ("clearAccessToken", "true"),
    ];
    let v = s.post("/admin/producer", &both).await;
    assert_eq!(v["status"], 400, "{v}");
    let v = s
        .post(
            "/admin/producer",
            &[("name", "p2"), ("topic", TOPIC), ("clearAccessToken", "true")],
        )
        .await;
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(post_as(&s, "/mq/produce", None, &form).await.1["status"], 200);
}

/// Refusals are logged with the name and the reason, never with the token presented (not
/// even at debug level, where requests are logged: by path, without the query string).
#[tokio::test]
async fn refusals_are_logged_without_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("mqproxy.toml");
    std::fs::write(&config, secured("")).expect("config");
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let data = dir.path().join("data");
    let server = Proc::spawn_logging(
        env!("CARGO_BIN_EXE_mqproxy"),
        &[
            "--config".into(),
            config.display().to_string(),
            "--data-dir".into(),
            data.display().to_string(),
        ],
        "debug",
        log,
    );
    let client = reqwest::Client::new();
    let wrong = "w4ong-token-presented";
    let v: Value = client
        .post(format!("{}/mq/produce", server.base))
        .bearer_auth(wrong)
        .form(&[("producer", PRODUCER), ("message", "x")])
        .send()
        .await
        .expect("POST")
        .json()
        .await
        .expect("json");
    assert_eq!(v["status"], 403, "{v}");
    let in_query = "q4ery-token-presented";
    let v: Value = client
        .get(format!("{}/mq/message", server.base))
        .query(&[("topic", TOPIC), ("consumer", "c"), ("token", in_query)])
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    assert_eq!(v["status"], 403, "{v}");
    let logged = eventually(std::time::Duration::from_secs(10), "the refusal in the log", || {
        let path = log_path.clone();
        async move {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            (text.matches("wrong token").count() >= 2).then_some(text)
        }
    })
    .await;
    assert!(logged.contains(PRODUCER), "{logged}");
    assert!(logged.contains("/mq/message"), "debug logs name the request: {logged}");
    for secret in [wrong, in_query, PRODUCER_TOKEN, CONSUMER_TOKEN] {
        assert!(!logged.contains(secret), "{secret} in the log: {logged}");
    }
}
