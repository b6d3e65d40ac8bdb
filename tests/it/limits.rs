//! Limits that keep one client from holding the server: slow request heads and bodies time
//! out, connections above `max_connections` are closed on arrival, bodies above
//! `max_request_bytes` are refused.

use crate::common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn addr_of(s: &TestServer) -> String {
    s.base.trim_start_matches("http://").to_owned()
}

/// Reads until the peer closes (or `limit` passes); returns what was read and whether it
/// closed.
async fn read_until_closed(conn: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
        }
    }
}

/// A slowloris client sends its request head a line at a time, never finishing it: the
/// connection is closed after `header_timeout_ms`, while normal requests go on.
#[tokio::test]
async fn slow_request_heads_are_cut_off() {
    let s = TestServer::with_toml(&format!("listener.header_timeout_ms = 500\n{}", one_queue(""))).await;
    let mut slow = TcpStream::connect(addr_of(&s)).await.expect("connect");
    slow.write_all(b"POST /mq/produce HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    let mut closed = false;
    for i in 0..50 {
        // One more header line every 200 ms: each arrives well within any per-read timeout.
        if slow.write_all(format!("X-Drip-{i}: y\r\n").as_bytes()).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 1024];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(200), slow.read(&mut buf)).await {
            closed = true;
            break;
        }
    }
    let held = started.elapsed();
    assert!(closed, "the dripping connection was still open after {held:?}");
    assert!(held < Duration::from_secs(5), "closed only after {held:?}");
    // A connection that sends nothing at all is closed too.
    let mut silent = TcpStream::connect(addr_of(&s)).await.expect("connect");
    let (_, closed) = read_until_closed(&mut silent, Duration::from_secs(5)).await;
    assert!(closed, "a silent connection was held for 5 s");
    // Meanwhile and afterwards the server serves.
    s.produce("after the slowloris").await;
}

/// A body that stops arriving gets 408 after the same timeout, not a held request.
#[tokio::test]
async fn stalled_bodies_get_408() {
    let s = TestServer::with_toml(&format!(
        "listener.header_timeout_ms = 500\nhttp.status = \"mirror\"\n{}",
        one_queue("")
    ))
    .await;
    let mut conn = TcpStream::connect(addr_of(&s)).await.expect("connect");
    conn.write_all(
        format!(
            "POST /mq/produce HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: 100\r\n\r\nproducer={PRODUCER}&message="
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let started = Instant::now();
    let (answer, _) = read_until_closed(&mut conn, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("header_timeout_ms"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

/// Above `max_connections`, a new connection is closed at once; when one closes, there is
/// room again.
#[tokio::test]
async fn connections_above_the_cap_are_closed() {
    let s = TestServer::with_toml(&format!("listener.max_connections = 2\n{}", one_queue(""))).await;
    let first = TcpStream::connect(addr_of(&s)).await.expect("connect 1");
    let second = TcpStream::connect(addr_of(&s)).await.expect("connect 2");
    // The server takes them in order; a request on the second proves both were accepted.
    let mut second = second;
    second
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let n = second.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    let mut third = TcpStream::connect(addr_of(&s)).await.expect("connect 3");
    let _ = third.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (answer, closed) = read_until_closed(&mut third, Duration::from_secs(5)).await;
    assert!(
        closed && answer.is_empty(),
        "the third connection was served: {answer:?}"
    );

    drop(first);
    let v = eventually(Duration::from_secs(5), "room for a new connection", || {
        let client = reqwest::Client::new();
        let url = format!("{}/healthz", s.base);
        async move {
            let resp = client.get(url).send().await.ok()?;
            resp.status().is_success().then_some(())
        }
    })
    .await;
    let () = v;
}

/// A body above `max_request_bytes` is refused with 413 before it is stored.
#[tokio::test]
async fn bodies_above_the_limit_get_413() {
    let limit = 8 * 1024 * 1024;
    let s = TestServer::with_toml(&format!(
        "http.max_request_bytes = {limit}\nhttp.status = \"mirror\"\n{}",
        one_queue("")
    ))
    .await;
    let big = "x".repeat(limit + 1);
    let resp = s
        .client
        .post(format!("{}/mq/produce/batch", s.base))
        .form(&[("producer", PRODUCER), ("messages", big.as_str())])
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status().as_u16(), 413);
    let v: serde_json::Value = resp.json().await.expect("json");
    assert!(
        v["message"].as_str().unwrap_or_default().contains("max_request_bytes"),
        "{v}"
    );
    assert_eq!(s.fetch("c", None).await["result"]["status"], "NO_NEW_MSG");
}

/// An HTTP/1.1 keep-alive connection left idle is closed after `idle_timeout_ms`; a quiet gRPC
/// Consume stream on the same settings lives on (h2 pings are traffic) and still delivers.
#[tokio::test]
async fn idle_connections_close_but_quiet_streams_live() {
    use mqproxy::grpc::pb;
    use pb::messaging_service_client::MessagingServiceClient;
    let s = TestServer::with_toml(&format!("listener.idle_timeout_ms = 1000\n{}", one_queue(""))).await;

    let mut client = MessagingServiceClient::connect(s.base.clone()).await.expect("connect");
    let (commands, rx) = tokio::sync::mpsc::channel(4);
    commands
        .send(pb::ConsumeRequest {
            command: Some(pb::consume_request::Command::Subscribe(pb::Subscribe {
                target: Some(pb::ConsumeTarget {
                    topic: TOPIC.into(),
                    consumer: "c".into(),
                    client_id: None,
                    lite_topic: None,
                }),
                auto_ack: true,
                ..Default::default()
            })),
        })
        .await
        .expect("subscribe");
    let mut events = client
        .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("consume")
        .into_inner();

    // Two idle keep-alive connections one after the other: each closed after ~1 s, and the
    // stream stays quiet for both periods.
    for _ in 0..2 {
        let mut idle = TcpStream::connect(addr_of(&s)).await.expect("connect");
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 1024];
        let n = idle.read(&mut buf).await.expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        let started = Instant::now();
        let (_, closed) = read_until_closed(&mut idle, Duration::from_secs(10)).await;
        let held = started.elapsed();
        assert!(closed, "the idle keep-alive connection was held for {held:?}");
        assert!(held >= Duration::from_millis(900), "closed too early: {held:?}");
    }

    // The stream has been quiet for twice idle_timeout_ms by now; it still delivers.
    s.produce("after a quiet while").await;
    let event = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .expect("a batch within 10 s")
        .expect("the stream is alive")
        .expect("an event");
    let Some(pb::consume_response::Event::Batch(batch)) = event.event else {
        panic!("expected a batch, got {event:?}");
    };
    assert_eq!(batch.messages[0].body, b"after a quiet while");
    drop(commands);
}

/// More writes than the store takes: past `max_pending_write_mib` produce answers HTTP 503
/// with `Retry-After` at once (whatever the status policy) and stores nothing; every produce
/// answered 200 is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_overloaded_store_answers_503_with_retry_after() {
    if embedded_only("the pending-writes bound is the embedded store's") {
        return;
    }
    // One write per flush (no group commit): the writer falls behind 16 concurrent 1 MiB writes.
    let s = TestServer::with_toml(&format!(
        "store.max_pending_write_mib = 1\nstore.group_commit_max = 1\n{}",
        one_queue("")
    ))
    .await;
    let body = "o".repeat(1 << 20);
    let mut stored = 0usize;
    let mut overloaded = None;
    for round in 0..20 {
        let answers = futures_join(16, |i| {
            let (client, url, message) = (
                s.client.clone(),
                format!("{}/mq/produce", s.base),
                format!("{round}-{i}-{body}"),
            );
            async move {
                let resp = client
                    .post(url)
                    .form(&[("producer", PRODUCER), ("message", message.as_str())])
                    .send()
                    .await
                    .expect("POST");
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let http = resp.status().as_u16();
                let v: serde_json::Value = resp.json().await.expect("json");
                (http, retry_after, v)
            }
        })
        .await;
        for (http, retry_after, v) in answers {
            match v["status"].as_i64() {
                Some(200) => stored += 1,
                Some(503) => overloaded = Some((http, retry_after, v)),
                _ => panic!("unexpected answer {http} {v}"),
            }
        }
        if overloaded.is_some() {
            break;
        }
    }
    let (http, retry_after, v) = overloaded.expect("16 concurrent 1 MiB produces never met the 1 MiB bound");
    assert_eq!(http, 503, "{v}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(v["message"].as_str().unwrap_or_default().contains("overloaded"), "{v}");
    // Exactly the produces answered 200 were stored.
    assert_eq!(s.drain("c", None).await.len(), stored);
}

/// Runs `n` futures made by `make` concurrently; their outputs in order.
async fn futures_join<F, Fut, T>(n: usize, make: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = (0..n).map(|i| tokio::spawn(make(i))).collect();
    let mut out = Vec::with_capacity(n);
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

/// A client that sends requests but stops reading the answers (its TCP window fills) is idle
/// too: the connection is closed after `idle_timeout_ms` instead of holding a task and a
/// connection slot for as long as the client likes.
#[tokio::test]
async fn clients_that_stop_reading_are_cut_off() {
    let s = TestServer::with_toml(&format!("listener.idle_timeout_ms = 1000\n{}", one_queue(""))).await;
    let one = reqwest::get(format!("{}/openapi.json", s.base))
        .await
        .expect("GET")
        .bytes()
        .await
        .expect("body")
        .len();
    // Far more answer bytes than loopback socket buffers hold.
    let requests = (64 << 20) / one + 1;
    let mut conn = TcpStream::connect(addr_of(&s)).await.expect("connect");
    let pipelined = "GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n".repeat(requests);
    conn.write_all(pipelined.as_bytes()).await.expect("write");
    // Not reading for three idle periods: the server's writes stall meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => total += n,
            Err(_) => panic!("the connection neither closed nor answered"),
        }
    }
    assert!(
        total < requests * one,
        "all {requests} answers arrived ({total} bytes): the stalled connection was kept"
    );
}
