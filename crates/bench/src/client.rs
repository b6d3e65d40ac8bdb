//! The load generator's HTTP side: one keep-alive HTTP/1.1 connection per simulated client
//! (hyper's connection API, no pool in between), and latency histograms.

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Latencies in microseconds, 1 µs .. 10 min, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|e| unreachable!("fixed bounds are valid: {e}"))
}

pub fn record(hist: &mut Histogram<u64>, elapsed: Duration) {
    hist.saturating_record(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX).max(1));
}

/// One HTTP/1.1 connection.
pub struct HttpConn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

impl HttpConn {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self {
            sender,
            host: addr.to_string(),
        })
    }

    /// POST a form body; the response body.
    pub async fn post_form(&mut self, path: &str, body: Bytes) -> anyhow::Result<Bytes> {
        let request = Request::post(path)
            .header(hyper::header::HOST, &self.host)
            .header(hyper::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Full::new(body))?;
        self.send(request).await
    }

    /// GET `path_and_query`; the response body.
    pub async fn get(&mut self, path_and_query: &str) -> anyhow::Result<Bytes> {
        let request = Request::get(path_and_query)
            .header(hyper::header::HOST, &self.host)
            .body(Full::new(Bytes::new()))?;
        self.send(request).await
    }

    /// GET an event stream (`/mq/stream`): its events as they come.
    pub async fn event_stream(mut self, path_and_query: &str) -> anyhow::Result<EventStream> {
        let request = Request::get(path_and_query)
            .header(hyper::header::HOST, &self.host)
            .body(Full::new(Bytes::new()))?;
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        if !response.status().is_success() {
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(EventStream {
            body: response.into_body(),
            buffer: Vec::new(),
        })
    }

    async fn send(&mut self, request: Request<Full<Bytes>>) -> anyhow::Result<Bytes> {
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(body)
    }
}

/// A Server-Sent Events answer read as it arrives.
pub struct EventStream {
    body: hyper::body::Incoming,
    buffer: Vec<u8>,
}

impl EventStream {
    /// The id of the next `batch` event (other events and comments are skipped).
    pub async fn next_batch_id(&mut self) -> anyhow::Result<String> {
        loop {
            while let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let block = String::from_utf8_lossy(&block);
                if block.lines().any(|l| l == "event: batch")
                    && let Some(id) = block.lines().find_map(|l| l.strip_prefix("id: "))
                {
                    return Ok(id.to_owned());
                }
            }
            let frame = self.body.frame().await.context("the event stream ended")??;
            if let Ok(data) = frame.into_data() {
                self.buffer.extend_from_slice(&data);
            }
        }
    }
}

/// `application/x-www-form-urlencoded` of the pairs.
pub fn form(pairs: &[(&str, &str)]) -> Bytes {
    let mut encoder = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        encoder.append_pair(k, v);
    }
    Bytes::from(encoder.finish())
}

/// The body's `status` field (the API's outcome; HTTP is 200 either way by default).
pub fn body_status(body: &[u8]) -> anyhow::Result<i64> {
    #[derive(serde::Deserialize)]
    struct Envelope {
        status: i64,
    }
    let envelope: Envelope = serde_json::from_slice(body).with_context(|| {
        format!(
            "not an API reply: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )
    })?;
    Ok(envelope.status)
}

/// What a closed-loop load run measured after its warm-up.
pub struct LoadResult {
    /// Requests per second.
    pub requests_per_s: f64,
    pub latency: Histogram<u64>,
}

/// `connections` clients, each sending the same request back to back for `warmup + duration`;
/// requests answered during the warm-up are not counted. Every reply must have body status 200.
pub async fn closed_loop(
    addr: SocketAddr,
    connections: usize,
    warmup: Duration,
    duration: Duration,
    path: &'static str,
    body: Bytes,
) -> anyhow::Result<LoadResult> {
    let started = Instant::now();
    let measure_from = started + warmup;
    let end = measure_from + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let body = body.clone();
        tasks.spawn(async move {
            let mut conn = HttpConn::connect(addr).await?;
            let mut hist = histogram();
            let mut counted = 0u64;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                // No body: a GET (the health check); else a form POST.
                let reply = if body.is_empty() {
                    conn.get(path).await?
                } else {
                    conn.post_form(path, body.clone()).await?
                };
                let status = body_status(&reply)?;
                if status != 200 {
                    bail!("status {status}: {}", String::from_utf8_lossy(&reply));
                }
                if sent >= measure_from {
                    record(&mut hist, sent.elapsed());
                    counted += 1;
                }
            }
            anyhow::Ok((counted, hist))
        });
    }
    let mut latency = histogram();
    let mut requests = 0u64;
    while let Some(joined) = tasks.join_next().await {
        let (counted, hist) = joined??;
        requests += counted;
        latency.add(&hist)?;
    }
    Ok(LoadResult {
        requests_per_s: requests as f64 / duration.as_secs_f64(),
        latency,
    })
}
