//! Request parameter parsing: query string plus a form, JSON or other body (what
//! `read_request` does), then every generated `XxxParams::from_pairs` of the seed's endpoints.
//! Any input is parameters or a 4xx error, never a panic; the form fast path
//! (`support::form_pairs`) decodes every input as `form_urlencoded::parse` does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqproxy::http::api;
use mqproxy::http::support::{RouterSettings, read_request};

fuzz_target!(|data: &[u8]| {
    // The form body's fast path decodes exactly as the form_urlencoded crate does.
    let fast: Vec<(String, String)> = mqproxy::http::support::form_pairs(data).collect();
    let reference: Vec<(String, String)> = form_urlencoded::parse(data).into_owned().collect();
    assert_eq!(fast, reference);
    // Layout: first byte picks the content type; up to the first 0xFF is the query string.
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let (query, body) = match rest.iter().position(|b| *b == 0xFF) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let query: String = form_urlencoded::byte_serialize(query).collect();
    let content_type = match kind % 4 {
        0 => "application/x-www-form-urlencoded",
        1 => "application/json",
        2 => "text/plain",
        _ => "application/x-www-form-urlencoded; charset=UTF-8",
    };
    let Ok(request) = axum::http::Request::builder()
        .method("POST")
        .uri(format!("/mq/produce?{query}"))
        .header("content-type", content_type)
        .body(axum::body::Body::from(body.to_vec()))
    else {
        return;
    };
    let settings = RouterSettings {
        mirror_http_status: false,
        max_request_bytes: 1 << 20,
        body_timeout: std::time::Duration::from_secs(5),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let pairs = match runtime.block_on(read_request(request, &settings)) {
        Ok((pairs, _)) => pairs,
        Err(e) => {
            assert!((400..500).contains(&e.status), "{} {}", e.status, e.message);
            return;
        }
    };
    let _ = api::ProduceParams::from_pairs(&pairs);
    let _ = api::ProduceBatchParams::from_pairs(&pairs);
    let _ = api::FetchParams::from_pairs(&pairs);
    let _ = api::AckParams::from_pairs(&pairs);
    let _ = api::UnlockParams::from_pairs(&pairs);
    let _ = api::ConfigureConsumerParams::from_pairs(&pairs);
    let _ = api::PutConsumerParams::from_pairs(&pairs);
    let _ = api::ResetOffsetsParams::from_pairs(&pairs);
});
