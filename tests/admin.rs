//! The admin API and its access rule, through the public HTTP API.

mod common;
use common::*;

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
