//! The publish batcher: one pipeline per publish window, and the outage buffer.
//!
//! Callers only append to the queue. This task wakes on the first publish of a window,
//! sleeps until the window's tick (on the wall clock, in phase with every node's delivery
//! ticks: see `batch`), takes everything queued in one swap and sends it as one
//! pipeline. While Redis is unreachable, envelopes wait in order in `pending`, up to
//! `redis.outage_buffer`; what arrives beyond that is dropped, counted and logged.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;

use super::{EnvelopeWriter, PublishQueue, Shared};
use crate::batch::Clock;
use crate::broker::{Envelope, Target};
use crate::config::{Config, EnvelopeMode};

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// After an outage, how long buffered publishes may wait for the other nodes' subscribers
/// to come back (Redis Pub/Sub delivers only to who is subscribed at that moment).
const RECOVERY_WAIT: Duration = Duration::from_secs(5);
const RECOVERY_POLL: Duration = Duration::from_millis(50);
/// Channels whose subscriber counts are remembered for outage recovery.
const MAX_REMEMBERED_CHANNELS: usize = 65_536;

pub(super) struct Publisher {
    shared: Arc<Shared>,
    queue: Arc<PublishQueue>,
    conn: ConnectionManager,
    writer: EnvelopeWriter,
    mode: EnvelopeMode,
    /// The publish window's ticks; `None` for window 0 (send as soon as possible).
    clock: Option<Clock>,
    max_pipeline: usize,
    outage_buffer: usize,
    stop: CancellationToken,
    /// Subscribers each channel had at its last successful PUBLISH.
    receivers: HashMap<String, i64>,
}

impl Publisher {
    pub(super) fn new(
        shared: Arc<Shared>,
        queue: Arc<PublishQueue>,
        conn: ConnectionManager,
        config: &Config,
        stop: CancellationToken,
    ) -> Publisher {
        Publisher {
            writer: EnvelopeWriter::new(&shared.node_id),
            shared,
            queue,
            conn,
            mode: config.redis.envelope,
            clock: Some(config.publish_window())
                .filter(|w| !w.is_zero())
                .map(|w| Clock::new(w, Duration::ZERO)),
            max_pipeline: config.redis.max_pipeline,
            outage_buffer: config.redis.outage_buffer,
            stop,
            receivers: HashMap::new(),
        }
    }

    /// Whether every channel with buffered publishes has its subscribers from before the
    /// outage back. An error means Redis is still unreachable.
    async fn subscribers_back(&mut self, pending: &VecDeque<Envelope>) -> redis::RedisResult<bool> {
        let mut channels: Vec<String> = pending.iter().map(|e| self.channel(e)).collect();
        channels.sort_unstable();
        channels.dedup();
        let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channels)
            .query_async(&mut self.conn)
            .await?;
        Ok(counts
            .iter()
            .all(|(channel, n)| *n >= self.receivers.get(channel).copied().unwrap_or(0)))
    }

    fn channel(&self, envelope: &Envelope) -> String {
        match &envelope.target {
            Target::Room(room) => self.shared.channels.room(room),
            Target::Broadcast => self.shared.channels.broadcast.clone(),
        }
    }

    /// Moves newly queued envelopes behind the pending ones, within the outage bound.
    fn absorb(&self, pending: &mut VecDeque<Envelope>, incoming: &mut Vec<Envelope>) {
        let room = self.outage_buffer.saturating_sub(pending.len());
        if incoming.len() > room {
            let dropped = (incoming.len() - room) as u64;
            let total = self
                .shared
                .figures
                .dropped_publishes
                .fetch_add(dropped, Relaxed)
                + dropped;
            tracing::warn!(
                dropped,
                total,
                "Redis outage buffer full: dropping publishes"
            );
            incoming.truncate(room);
        }
        pending.extend(incoming.drain(..));
    }

    /// One pipeline from the front of `pending`: the pipeline, the channel of each of its
    /// commands, and how many envelopes it carries.
    fn build(&self, pending: &VecDeque<Envelope>) -> (redis::Pipeline, Vec<String>, usize) {
        let mut pipe = redis::pipe();
        match self.mode {
            EnvelopeMode::Single => {
                let used = pending.len().min(self.max_pipeline);
                let mut channels = Vec::with_capacity(used);
                for envelope in pending.iter().take(used) {
                    let channel = self.channel(envelope);
                    pipe.publish(&channel, self.writer.single(envelope.payload.json()));
                    channels.push(channel);
                }
                (pipe, channels, used)
            }
            EnvelopeMode::Batch => {
                // One PUBLISH per channel, channels in order of first appearance,
                // messages in publish order within each.
                let mut groups: IndexMap<String, Vec<usize>> = IndexMap::new();
                let mut used = 0;
                for (i, envelope) in pending.iter().enumerate() {
                    let channel = self.channel(envelope);
                    if !groups.contains_key(&channel) && groups.len() == self.max_pipeline {
                        break;
                    }
                    groups.entry(channel).or_default().push(i);
                    used = i + 1;
                }
                let mut channels = Vec::with_capacity(groups.len());
                for (channel, indices) in groups {
                    let message = if indices.len() == 1 {
                        self.writer.single(pending[indices[0]].payload.json())
                    } else {
                        self.writer
                            .batch(indices.iter().map(|&i| pending[i].payload.json()))
                    };
                    pipe.publish(&channel, message);
                    channels.push(channel);
                }
                (pipe, channels, used)
            }
        }
    }
}

pub(super) async fn run(mut p: Publisher) {
    let mut pending: VecDeque<Envelope> = VecDeque::new();
    let mut incoming: Vec<Envelope> = Vec::new();
    let mut backoff = MIN_BACKOFF;
    let mut stopping = false;
    // Set by a failed pipeline: buffered publishes wait for subscribers to return.
    let mut recovering: Option<tokio::time::Instant> = None;
    // When the oldest pending publish was queued.
    let mut pending_since: Option<std::time::Instant> = None;
    loop {
        if pending.is_empty() && !stopping {
            tokio::select! {
                _ = p.queue.ready.notified() => {}
                _ = p.stop.cancelled() => stopping = true,
            }
            if let Some(clock) = p.clock.filter(|_| !stopping) {
                let tick = clock.next_tick(std::time::Instant::now());
                tokio::select! {
                    _ = tokio::time::sleep_until(tick.into()) => {}
                    _ = p.stop.cancelled() => stopping = true,
                }
            }
        }
        if let Some(since) = p.queue.take(&mut incoming) {
            pending_since.get_or_insert(since);
        }
        p.absorb(&mut pending, &mut incoming);
        if pending.is_empty() {
            if stopping {
                return;
            }
            continue;
        }
        // The probe may have seen Redis go away before any publish failed.
        if !p.shared.publisher_ok.load(Relaxed) {
            recovering.get_or_insert_with(tokio::time::Instant::now);
        }
        if let Some(since) = recovering {
            match p.subscribers_back(&pending).await {
                Ok(true) => recovering = None,
                Ok(false) if since.elapsed() >= RECOVERY_WAIT => {
                    tracing::warn!("subscribers did not all return after the Redis outage; sending the buffer anyway");
                    recovering = None;
                }
                Ok(false) | Err(_) => {
                    tokio::select! {
                        _ = tokio::time::sleep(RECOVERY_POLL) => {}
                        _ = p.stop.cancelled() => stopping = true,
                    }
                    if !stopping {
                        continue;
                    }
                }
            }
        }
        let (pipe, channels, used) = p.build(&pending);
        match pipe.query_async::<Vec<i64>>(&mut p.conn).await {
            Ok(receivers) => {
                pending.drain(..used);
                if p.receivers.len() > MAX_REMEMBERED_CHANNELS {
                    // Only a hint for outage recovery: forgetting it is safe.
                    p.receivers.clear();
                }
                for (channel, n) in channels.iter().zip(receivers) {
                    p.receivers.insert(channel.clone(), n);
                }
                if let Some(stats) = p.shared.stats.get() {
                    stats.pipeline_commands.record(channels.len() as u64);
                    if let Some(since) = pending_since {
                        stats.publish_latency.record_duration(since.elapsed());
                    }
                }
                // Anything left keeps the old mark: an upper bound of its wait.
                if pending.is_empty() {
                    pending_since = None;
                }
                let f = &p.shared.figures;
                f.pipelines.fetch_add(1, Relaxed);
                f.publish_commands.fetch_add(channels.len() as u64, Relaxed);
                f.published_messages.fetch_add(used as u64, Relaxed);
                if !p.shared.publisher_ok.swap(true, Relaxed) {
                    f.reconnects.fetch_add(1, Relaxed);
                    tracing::info!(
                        still_buffered = pending.len(),
                        dropped_so_far = f.dropped_publishes.load(Relaxed),
                        "Redis publishing resumed"
                    );
                }
                backoff = MIN_BACKOFF;
            }
            Err(e) => {
                p.shared.figures.publish_failures.fetch_add(1, Relaxed);
                if p.shared.publisher_ok.swap(false, Relaxed) {
                    tracing::warn!(error = %e, buffered = pending.len(), "Redis publish failed; buffering and retrying");
                }
                recovering.get_or_insert_with(tokio::time::Instant::now);
                if stopping {
                    let dropped = pending.len() as u64;
                    p.shared
                        .figures
                        .dropped_publishes
                        .fetch_add(dropped, Relaxed);
                    tracing::warn!(
                        dropped,
                        "shutting down with Redis unreachable: publishes dropped"
                    );
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = p.stop.cancelled() => stopping = true,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
