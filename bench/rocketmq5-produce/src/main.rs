//! Produce load through a RocketMQ 5 gRPC proxy with the official Rust 5.x client:
//! `rocketmq5-produce ACCESS_URL TOPIC WRITERS SECONDS` prints msg/s and latency percentiles
//! (1 KiB bodies, closed loop, 1 s warm-up), in the same shape as `mqproxy-bench`.

use rocketmq::conf::{ClientOption, ProducerOption};
use rocketmq::model::message::MessageBuilder;
use rocketmq::Producer;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, topic, writers, seconds] = args.as_slice() else {
        eprintln!("usage: rocketmq5-produce ACCESS_URL TOPIC WRITERS SECONDS");
        std::process::exit(2);
    };
    let writers: usize = writers.parse().expect("WRITERS");
    let seconds: f64 = seconds.parse().expect("SECONDS");
    let mut producer_option = ProducerOption::default();
    producer_option.set_topics(vec![topic.clone()]);
    let mut client_option = ClientOption::default();
    client_option.set_access_url(url.clone());
    let mut producer = Producer::new(producer_option, client_option).expect("producer");
    producer.start().await.expect("producer start");
    let producer = Arc::new(producer);
    let measure_from = Instant::now() + Duration::from_secs(1);
    let end = measure_from + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (producer, topic) = (producer.clone(), topic.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("hist");
            let mut n = 0u64;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let message = MessageBuilder::builder()
                    .set_topic(topic.clone())
                    .set_body(vec![b'x'; 1024])
                    .build()
                    .expect("message");
                producer.send(message).await.expect("send");
                if sent >= measure_from {
                    hist.saturating_record(sent.elapsed().as_micros() as u64);
                    n += 1;
                }
            }
            (n, hist)
        }));
    }
    let mut total = 0;
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("hist");
    for t in tasks {
        let (n, h) = t.await.expect("writer");
        total += n;
        hist.add(&h).expect("merge");
    }
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "rocketmq-proxy-rust x{writers}: {:.0} msg/s, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        total as f64 / seconds,
        ms(0.5),
        ms(0.99),
        ms(0.999),
        hist.max() as f64 / 1000.0
    );
}
