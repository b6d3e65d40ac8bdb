//! The REST contract: the served OpenAPI document is the checked-in file, it covers the seed's
//! endpoints, every operation is routed, and Swagger UI is served from the binary.

use crate::common::*;
use serde_json::Value;

fn spec_from_file() -> Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/mqproxy.yaml")).expect("spec file");
    yaml_serde::from_str(&text).expect("spec parses")
}

#[tokio::test]
async fn served_document_equals_the_file_and_covers_the_seed() {
    let s = TestServer::start().await;
    let served: Value = s
        .client
        .get(format!("{}/openapi.json", s.base))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    let file = spec_from_file();
    assert_eq!(served, file);
    assert_eq!(served["openapi"], "3.1.0");
    let paths = served["paths"].as_object().expect("paths");
    // The seed's endpoints, read from the seed document when it is beside the repository.
    let mut seed_paths: Vec<String> = [
        "/mq/produce",
        "/mq/produce/batch",
        "/mq/message",
        "/mq/ack",
        "/mq/unlock",
    ]
    .map(String::from)
    .to_vec();
    if let Ok(seed) = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/seed/http-api.en.md")) {
        for word in seed.split(|c: char| c.is_whitespace() || c == '`' || c == ',' || c == '(' || c == ')') {
            if word.starts_with("/mq/") {
                seed_paths.push(word.trim_end_matches(['.', ':']).to_owned());
            }
        }
    }
    for p in &seed_paths {
        assert!(paths.contains_key(p), "seed path {p} is in the spec");
    }
    for (path, methods) in [
        ("/mq/message", ["get", "post"]),
        ("/mq/ack", ["get", "post"]),
        ("/mq/unlock", ["get", "post"]),
    ] {
        for m in methods {
            assert!(paths[path].get(m).is_some(), "{m} {path}");
        }
    }
}

/// Every operation of the spec is routed and answers its JSON envelope (nothing 404/405/5xx
/// for a request with no parameters: a 400 naming the missing one, or 200).
#[tokio::test]
async fn every_operation_is_implemented() {
    let s = TestServer::start().await;
    for (method, path, op, _) in mqproxy::http::api::OPERATIONS {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let resp = s
            .client
            .request(method.clone(), s.url(path))
            .send()
            .await
            .expect("send");
        let http_status = resp.status().as_u16();
        let v: Value = resp.json().await.expect("JSON envelope");
        let status = v["status"].as_i64().expect("status");
        assert!(status == 200 || status == 400, "{op}: {v}");
        // The event stream answers a refusal with its HTTP status too (an EventSource reads
        // no body); every other operation with 200 under the default policy.
        let expected = if *op == "stream" { status as u16 } else { 200 };
        assert_eq!(http_status, expected, "{method} {path} ({op})");
    }
    // And the generated operations are exactly the spec's.
    let spec = spec_from_file();
    let count: usize = spec["paths"]
        .as_object()
        .expect("paths")
        .values()
        .map(|p| p.as_object().map_or(0, |o| o.len()))
        .sum();
    assert_eq!(count, mqproxy::http::api::OPERATIONS.len());
}

/// A REST request no route matches gets a 404 envelope naming method and path (never the
/// gRPC fallback's 200), and a known path asked with the wrong method a 405 envelope with
/// `Allow`, whatever the status policy; on the admin listener too.
#[tokio::test]
async fn unknown_paths_and_methods_get_envelopes() {
    let s = TestServer::start().await;
    for base in [&s.base, &s.admin_base] {
        for (method, path) in [("GET", "/mq/nope"), ("POST", "/nope/at/all"), ("PUT", "/")] {
            let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
            let resp = s
                .client
                .request(method.clone(), format!("{base}{path}"))
                .send()
                .await
                .expect("send");
            assert_eq!(resp.status(), 404, "{method} {base}{path}");
            assert!(resp.headers().get("grpc-status").is_none());
            let v: Value = resp.json().await.expect("JSON envelope");
            assert_eq!(v["status"], 404, "{v}");
            assert_eq!(v["message"], format!("no such endpoint: {method} {path}"));
        }
        // /mq/produce/batch is POST only.
        let resp = s
            .client
            .get(format!("{base}/mq/produce/batch"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 405);
        assert_eq!(resp.headers().get("allow").and_then(|v| v.to_str().ok()), Some("POST"));
        let v: Value = resp.json().await.expect("JSON envelope");
        assert_eq!(v["status"], 405, "{v}");
        assert_eq!(v["message"], "method GET not allowed on /mq/produce/batch");
    }
    // The documented failure lists 404 and 405.
    let failure = spec_from_file()["components"]["responses"]["Failure"]["description"]
        .as_str()
        .expect("Failure description")
        .to_owned();
    assert!(
        failure.contains("404 no such endpoint") && failure.contains("405"),
        "{failure}"
    );
}

/// Swagger UI and its assets come from the binary and load the served document.
#[tokio::test]
async fn swagger_ui_is_served() {
    let s = TestServer::start().await;
    let get = |p: &str| s.client.get(format!("{}{p}", s.base)).send();
    let page = get("/swagger-ui/").await.expect("page");
    assert_eq!(page.status(), 200);
    assert!(page.text().await.expect("html").contains("swagger-ui"));
    let bundle = get("/swagger-ui/swagger-ui-bundle.js").await.expect("bundle");
    assert_eq!(bundle.status(), 200);
    assert!(bundle.bytes().await.expect("js").len() > 100_000);
    let init = get("/swagger-ui/swagger-initializer.js")
        .await
        .expect("init")
        .text()
        .await
        .expect("js");
    assert!(init.contains("/openapi.json"), "{init}");
}

/// What Swagger UI's "Try it out" sends for a POST form operation works.
#[tokio::test]
async fn try_it_out_form_request_works() {
    let s = TestServer::start().await;
    let resp = s
        .client
        .post(format!("{}/mq/produce", s.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("accept", "application/json")
        .body(format!(
            "producer={PRODUCER}&message=%7B%22id%22%3A1%2C%22name%22%3A%22tv1%22%7D"
        ))
        .send()
        .await
        .expect("post");
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["status"], 200, "{v}");
    let fetched = s
        .get("/mq/message", &[("topic", TOPIC), ("consumer", CLUSTERING)])
        .await;
    assert_eq!(bodies_of(&fetched), ["{\"id\":1,\"name\":\"tv1\"}"]);
}

/// Whether a string schema of the spec (`pattern`, `minLength`, `maxLength`) admits a value.
fn admits(schema: &Value, value: &str) -> bool {
    let chars = value.chars().count() as u64;
    let pattern = schema["pattern"]
        .as_str()
        .map(|p| regex::Regex::new(p).expect("the spec's pattern compiles"));
    pattern.is_none_or(|p| p.is_match(value))
        && schema["minLength"].as_u64().is_none_or(|min| chars >= min)
        && schema["maxLength"].as_u64().is_none_or(|max| chars <= max)
}

/// The string rules the spec writes (names, clientIds, msgIds, requestIds) are the server's:
/// the server accepts a sample exactly when the spec's schema admits it, so generated requests
/// (schemathesis) reach the handlers and a client reading the spec knows the rule.
#[tokio::test]
async fn spec_string_rules_are_the_servers() {
    let spec = spec_from_file();
    let schema = |name: &str| spec["components"]["schemas"][name].clone();
    let s = TestServer::start().await;

    let (name, longest, too_long) = (schema("Name"), "n".repeat(127), "n".repeat(128));
    for sample in [
        "a", "A-z_0%9|", &longest, &too_long, "a b", "a.b", "é", "a/b", "a:b", "a\u{1}",
    ] {
        let v = s.post("/admin/topic", &[("name", sample), ("queues", "1")]).await;
        if rocketmq_backend() && sample == longest {
            // The suite's topic prefix makes it longer than the cluster allows: a 400 naming it.
            assert_eq!(v["status"], 400, "{v}");
            assert!(v["message"].as_str().is_some_and(|m| m.contains("prefix")), "{v}");
            continue;
        }
        assert_eq!(v["status"] == 200, admits(&name, sample), "topic {sample:?} -> {v}");
    }

    // A broadcast pull with each clientId (the `:retry` suffixes are refused too, as the
    // schema's description says: a regex without lookbehind cannot).
    let (client_id, longest, too_long) = (schema("ClientId"), "c".repeat(128), "c".repeat(129));
    for sample in [
        "c1",
        "中文-id",
        &longest,
        &too_long,
        "a\u{1}b",
        "a\u{7f}",
        "a\u{9f}",
        "tab\tin",
    ] {
        let v = s
            .get(
                "/mq/message",
                &[("topic", TOPIC), ("consumer", BROADCAST), ("clientId", sample)],
            )
            .await;
        assert_eq!(
            v["status"] == 200,
            admits(&client_id, sample),
            "clientId {sample:?} -> {v}"
        );
    }

    let msg_id = s.produce("retry me").await["result"]["msgId"]
        .as_str()
        .expect("msgId")
        .to_owned();
    let msg_id_schema = schema("MsgId");
    let lower = msg_id.to_lowercase();
    for sample in [
        msg_id.as_str(),
        &lower,
        &msg_id[1..],
        &format!("{msg_id}0"),
        &"G".repeat(32),
    ] {
        let v = s
            .post(
                "/admin/consumer/config",
                &[("consumer", CLUSTERING), ("retryMsgId", sample)],
            )
            .await;
        assert_eq!(
            v["status"] == 200,
            admits(&msg_id_schema, sample),
            "retryMsgId {sample:?} -> {v}"
        );
    }
    // A Java client on an IPv6 host makes 56-digit msgIds: the shape is admitted, and this one
    // is refused only because no such message exists.
    let long = "FD".repeat(28);
    assert!(admits(&msg_id_schema, &long));
    let v = s
        .post(
            "/admin/consumer/config",
            &[("consumer", CLUSTERING), ("retryMsgId", &long)],
        )
        .await;
    assert!(v["message"].as_str().is_some_and(|m| m.contains("not found")), "{v}");

    // A requestId the server issued is admitted; one outside the pattern is refused. (One
    // inside it may still be refused: it must carry the server's signature.)
    let request_id = rid(&s.fetch(CLUSTERING, None).await);
    let request_id_schema = schema("RequestId");
    assert!(admits(&request_id_schema, &request_id), "{request_id}");
    for sample in ["not base64!", "a+b/c"] {
        assert!(!admits(&request_id_schema, sample), "{sample}");
        let v = s
            .get(
                "/mq/ack",
                &[("topic", TOPIC), ("consumer", CLUSTERING), ("requestId", sample)],
            )
            .await;
        assert_eq!(v["status"], 400, "requestId {sample:?} -> {v}");
    }
}

/// Every (minimum, maximum) the document gives a parameter or property named `name`.
fn bounds_named(node: &Value, name: &str, found: &mut Vec<(u64, u64)>) {
    let bounds = |schema: &Value| Some((schema.get("minimum")?.as_u64()?, schema.get("maximum")?.as_u64()?));
    match node {
        Value::Object(map) => {
            if map.get("name").and_then(Value::as_str) == Some(name)
                && let Some(b) = map.get("schema").and_then(bounds)
            {
                found.push(b);
            }
            if let Some(b) = map.get("properties").and_then(|p| p.get(name)).and_then(bounds) {
                found.push(b);
            }
            map.values().for_each(|v| bounds_named(v, name, found));
        }
        Value::Array(items) => items.iter().for_each(|v| bounds_named(v, name, found)),
        _ => {}
    }
}

/// The document's ranges are the engine's limits (`crates/core/src/limits.rs`), so a limit
/// changed in one place and not the other fails here.
#[test]
fn documented_ranges_are_the_engine_limits() {
    use mqproxy::engine::limits;
    let spec = spec_from_file();
    for (name, bounds) in [
        ("maxPullSize", limits::PULL_SIZE),
        ("consumeTimeoutMs", limits::CONSUME_TIMEOUT_MS),
        ("consumeTimeout", limits::CONSUME_TIMEOUT_S),
        ("pullTimeout", limits::PULL_TIMEOUT_S),
        ("waitMs", limits::WAIT_MS),
        ("maxInFlight", limits::IN_FLIGHT),
        ("heartbeat", limits::HEARTBEAT_S),
        ("queues", limits::QUEUES),
        ("limitRate", limits::RATE_LIMIT),
        ("delayLevel", limits::DELAY_LEVEL),
    ] {
        let mut found = Vec::new();
        bounds_named(&spec, name, &mut found);
        assert!(!found.is_empty(), "{name}: no range in the document");
        for b in found {
            assert_eq!(b, (bounds.min, bounds.max), "{name}");
        }
    }
    let schemas = &spec["components"]["schemas"];
    assert_eq!(
        schemas["ClientId"]["maxLength"].as_u64(),
        Some(limits::MAX_CLIENT_ID_CHARS as u64)
    );
    assert_eq!(
        schemas["Name"]["maxLength"].as_u64(),
        Some(limits::MAX_NAME_CHARS as u64)
    );
}
