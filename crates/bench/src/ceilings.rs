//! What no server could beat on this machine, measured in the same run as the server: the
//! disk's flush rate and the embedded store's own write and read rates without HTTP (same
//! durability, same batch sizes, same group commit). The HTTP ceiling (a bare axum handler)
//! is `server::serve_http_ceiling`, driven by the same client as mqproxy.

use crate::server::{QUEUES, TOPIC};
use mqproxy::config::{Config, TopicConfig};
use mqproxy::store::embedded::EmbeddedStore;
use mqproxy::store::embedded::{FlushPolicy, Layout};
use mqproxy::store::{Delivery, MessageStore, NewRecord};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Appends of 1 KiB to a file in `dir`, each followed by fdatasync, for `duration`: flushes/s.
pub fn flush_rate(dir: &Path, duration: Duration) -> anyhow::Result<f64> {
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path)?;
    let block = [7u8; 1024];
    let started = Instant::now();
    let mut n = 0u32;
    while started.elapsed() < duration {
        file.write_all(&block)?;
        file.sync_data()?;
        n += 1;
    }
    let rate = f64::from(n) / started.elapsed().as_secs_f64();
    std::fs::remove_file(path)?;
    Ok(rate)
}

/// Writes of 1 MiB to a new file in `dir` for `duration`, then one fdatasync: the disk's
/// sequential write rate in bytes/s (what a log-structured store could reach at best).
pub fn sequential_write_rate(dir: &Path, duration: Duration) -> anyhow::Result<f64> {
    let path = dir.join("sequential-probe");
    let mut file = std::fs::File::create(&path)?;
    let block = vec![7u8; 1 << 20];
    let started = Instant::now();
    let mut bytes = 0u64;
    while started.elapsed() < duration {
        file.write_all(&block)?;
        bytes += block.len() as u64;
    }
    file.sync_data()?;
    let rate = bytes as f64 / started.elapsed().as_secs_f64();
    std::fs::remove_file(path)?;
    Ok(rate)
}

/// The embedded store as the server opens it (same settings), on `dir`, with the bench topic.
pub fn open_store(dir: &Path, flush: FlushPolicy) -> anyhow::Result<EmbeddedStore> {
    open_store_with(dir, flush, Layout::Log)
}

/// [`open_store`] with the bodies in `layout` (the redb layout is the comparison of the log's).
pub fn open_store_with(dir: &Path, flush: FlushPolicy, layout: Layout) -> anyhow::Result<EmbeddedStore> {
    let mut config = Config::demo();
    config.data_dir = dir.to_path_buf();
    config.store.flush = flush;
    config.store.layout = layout;
    config.topics = vec![TopicConfig {
        name: TOPIC.into(),
        queues: QUEUES,
        lite: false,
    }];
    Ok(EmbeddedStore::open(mqproxy::server::embedded_config(&config))?)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub fn records(n: usize, size: usize) -> Vec<NewRecord> {
    (0..n)
        .map(|_| {
            let mut msg_id = [0u8; 16];
            msg_id[8..].copy_from_slice(&NEXT_ID.fetch_add(1, Ordering::Relaxed).to_be_bytes());
            NewRecord {
                msg_id,
                keys: None,
                born_ms: now_ms(),
                born_host: None,
                body: vec![b'x'; size],
                lite_topics: Vec::new(),
            }
        })
        .collect()
}

/// Sums what `tasks` tasks return; task `i` runs `task(i, store)` on its own store handle.
async fn sum_over_tasks<F, Fut>(store: &EmbeddedStore, tasks: usize, task: F) -> anyhow::Result<u64>
where
    F: Fn(usize, EmbeddedStore) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<u64>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for i in 0..tasks {
        set.spawn(task(i, store.clone()));
    }
    let mut total = 0;
    while let Some(n) = set.join_next().await {
        total += n??;
    }
    Ok(total)
}

/// Appends up to `per_append` messages of `size` bytes at a time, each append to the next
/// queue from `first_queue` on, until `limit` messages are in or `end` has passed.
async fn append_loop(
    store: EmbeddedStore,
    first_queue: u32,
    per_append: usize,
    size: usize,
    limit: u64,
    end: Option<Instant>,
) -> anyhow::Result<u64> {
    let (mut done, mut queue) = (0u64, first_queue % QUEUES);
    while done < limit && end.is_none_or(|end| Instant::now() < end) {
        let n = (limit - done).min(per_append as u64) as usize;
        store.append(TOPIC, queue, Delivery::Now, records(n, size)).await?;
        done += n as u64;
        queue = (queue + 1) % QUEUES;
    }
    Ok(done)
}

/// `writers` tasks appending `per_append` messages of `size` bytes back to back, each to the
/// next queue, for `duration`: messages/s.
pub async fn store_write_rate(
    store: &EmbeddedStore,
    writers: usize,
    per_append: usize,
    size: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let end = started + duration;
    let total = sum_over_tasks(store, writers, |w, store| {
        append_loop(store, w as u32, per_append, size, u64::MAX, Some(end))
    })
    .await?;
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// `readers` tasks reading every queue from its start in reads of `per_read` messages until
/// each queue's end: messages/s.
pub async fn store_read_rate(store: &EmbeddedStore, readers: usize, per_read: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let total = sum_over_tasks(store, readers, |r, store| async move {
        let mut n = 0u64;
        // Reader r reads queues r, r + readers, ...: each queue read once.
        for queue in (r as u32..QUEUES).step_by(readers) {
            let range = store.queue_range(TOPIC, queue);
            let mut from = range.min;
            while from < range.max {
                let read = store.read(TOPIC, queue, from, per_read, 4 << 20).await?;
                let Some(last) = read.messages.last() else { break };
                from = last.offset + 1;
                n += read.messages.len() as u64;
            }
        }
        Ok(n)
    })
    .await?;
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Fills the store with `total` messages of `size` bytes in appends of `per_append`, spread
/// over the queues (used to preload consume scenarios and the backlog).
pub async fn fill(store: &EmbeddedStore, total: u64, per_append: usize, size: usize) -> anyhow::Result<()> {
    const WRITERS: usize = 4;
    let share = |w: usize| total / WRITERS as u64 + u64::from((w as u64) < total % WRITERS as u64);
    sum_over_tasks(store, WRITERS, |w, store| {
        append_loop(store, w as u32, per_append, size, share(w), None)
    })
    .await?;
    Ok(())
}
