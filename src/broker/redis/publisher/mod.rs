//! The publish batcher: one pipeline per publish window, and what happens when Redis
//! goes away.
//!
//! Callers only append to the queue. This task wakes on the first publish of a window,
//! sleeps until the window's tick (on the wall clock, in phase with every node's delivery
//! ticks: see `batch`), takes everything queued in one swap and sends it as one
//! pipeline.
//!
//! Three promises, and how they are kept:
//! - **Nothing accepted is dropped while Redis is healthy.** The bound
//!   (`redis.outage_buffer`) covers the queue and what this task holds, and is enforced
//!   where a publish is accepted (`PublishQueue::push`): past it, the caller is refused
//!   with `overloaded`; nothing already taken is thrown away to make room.
//! - **No duplicates, ever.** A pipeline Redis may have run (it was written, and then the
//!   reply timed out or the connection broke) is never sent again: its messages are
//!   counted as unconfirmed and logged. Only a pipeline that certainly never left (the
//!   connection was refused) is kept and retried. A timed-out pipeline stays ahead of
//!   later ones on the same connection, so per-publisher order holds.
//! - **Held publishes wait for their listeners.** Pub/sub delivers only to who is
//!   subscribed when the message arrives. After an outage, held publishes wait until
//!   every node that was alive before it has re-subscribed (each resubscribes its rooms
//!   before its probe channel, so its probe channel counts for all of them) and every
//!   channel has its subscribers from before, at most `redis.recovery_wait_ms` counted
//!   from the moment Redis answers again.

mod outcome;
mod pipeline;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;

use self::outcome::{classify, Failure, Recent};
use self::pipeline::Built;
use super::start::BACKOFF;
use super::{Core, EnvelopeWriter, PublishQueue};
use crate::batch::Clock;
use crate::broker::Envelope;
use crate::config::{Config, EnvelopeMode};

const RECOVERY_POLL: Duration = Duration::from_millis(50);
/// Channels whose subscriber counts are remembered (for recovery).
const MAX_REMEMBERED_CHANNELS: usize = 65_536;
/// How long before the shutdown deadline the publisher stops waiting for Redis.
const GIVE_UP_MARGIN: Duration = Duration::from_millis(100);

pub(super) struct Publisher {
    core: Arc<Core>,
    queue: Arc<PublishQueue>,
    conn: ConnectionManager,
    writer: EnvelopeWriter,
    mode: EnvelopeMode,
    /// Each publish pace's ticks (`PublishPaces`); `None` for window 0 (send as soon as
    /// the previous pipeline returns).
    clocks: Vec<Option<Clock>>,
    /// Per pace with something queued: the tick it waits for.
    ticks: Vec<Option<Instant>>,
    max_pipeline: usize,
    max_envelope_messages: usize,
    recovery_wait: Duration,
    stop: CancellationToken,
    /// Per channel, at its last successful PUBLISH: its subscribers (after an outage, held
    /// publishes wait until each channel has as many again).
    listeners: HashMap<String, i64>,
    recent: Recent,
    held: Held,
    /// The engine is shutting down: send what is held, then stop.
    stopping: bool,
    /// The pause before the next try after a failure.
    backoff: Duration,
    /// Set while an outage is being recovered from.
    recovery: Option<Recovery>,
    /// Scratch for what is taken from the queue.
    incoming: Vec<Envelope>,
}

/// What the task holds: taken from the queue, not yet confirmed by Redis.
#[derive(Default)]
struct Held {
    pending: VecDeque<Envelope>,
    /// How many at the front of `pending` are durable messages sent before without an
    /// answer: they go first, checked against the stream (see `durable::PUBLISH`).
    recheck: usize,
    /// When the oldest pending publish was queued.
    since: Option<Instant>,
}

/// An outage being recovered from.
struct Recovery {
    /// The other nodes alive before the outage.
    peers: Vec<String>,
    /// When Redis first answered again.
    answered: Option<Instant>,
}

impl Recovery {
    fn begin(core: &Core) -> Recovery {
        Recovery {
            peers: core.peers.lock().clone(),
            answered: None,
        }
    }
}

/// Whether the task goes on after a step.
#[derive(PartialEq)]
enum Step {
    Again,
    Stop,
}

pub(super) async fn run(mut p: Publisher) {
    loop {
        let due = p.wait_due().await;
        p.take(due);
        if p.held.pending.is_empty() {
            if p.stopping {
                p.give_up("");
                return;
            }
            continue;
        }
        if p.core.gate.is_some() {
            p.wait_gate().await;
        }
        if !p.recovered().await {
            continue;
        }
        if p.send().await == Step::Stop {
            return;
        }
    }
}

impl Publisher {
    pub(super) fn new(
        core: Arc<Core>,
        queue: Arc<PublishQueue>,
        conn: ConnectionManager,
        config: &Config,
        stop: CancellationToken,
    ) -> Publisher {
        let core_keeps_recent = core.hand_back.is_some();
        Publisher {
            writer: EnvelopeWriter::new(&core.node_id),
            core,
            conn,
            mode: config.redis.envelope,
            clocks: (0..queue.paces().count())
                .map(|pace| {
                    Some(queue.paces().window(pace))
                        .filter(|w| !w.is_zero())
                        .map(|w| Clock::new(w, Duration::ZERO))
                })
                .collect(),
            ticks: vec![None; queue.paces().count()],
            queue,
            max_pipeline: config.redis.max_pipeline,
            max_envelope_messages: config.redis.max_envelope_messages,
            recovery_wait: Duration::from_millis(config.redis.recovery_wait_ms),
            stop,
            listeners: HashMap::new(),
            recent: Recent::new(core_keeps_recent),
            held: Held::default(),
            stopping: false,
            backoff: BACKOFF.start(),
            recovery: None,
            incoming: Vec::new(),
        }
    }

    /// Which paces to take: all of them while something is held (a retry) or when
    /// stopping, else those whose window's tick has come (waiting for it).
    async fn wait_due(&mut self) -> u64 {
        if !self.held.pending.is_empty() || self.stopping {
            return u64::MAX;
        }
        let (queue, stop) = (self.queue.clone(), self.stop.clone());
        loop {
            // What another engine handed over goes at once, with nothing else queued
            // too (the last publishes before a failover may be all there is).
            if queue.has_doubtful() {
                return 0;
            }
            let queued = queue.queued_paces();
            let next = (queued != 0).then(|| self.next_due(queued, Instant::now()));
            let Some((at, due)) = next else {
                tokio::select! {
                    _ = queue.ready.notified() => continue,
                    _ = stop.cancelled() => {
                        self.stopping = true;
                        return u64::MAX;
                    }
                }
            };
            if at <= Instant::now() {
                return due;
            }
            // A pace that had nothing queued may be due sooner: look again then.
            tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => {}
                _ = queue.ready.notified() => {}
                _ = stop.cancelled() => {
                    self.stopping = true;
                    return u64::MAX;
                }
            }
        }
    }

    /// Takes the due paces' publishes, and doubtful ones first.
    fn take(&mut self, due: u64) {
        for (pace, tick) in self.ticks.iter_mut().enumerate() {
            if due & (1 << pace) != 0 {
                *tick = None;
            }
        }
        if let Some(since) = self.queue.take_paces(due, &mut self.incoming) {
            self.held.since.get_or_insert(since);
        }
        self.held.pending.extend(self.incoming.drain(..));
        self.take_doubtful();
        self.queue.held.store(self.held.pending.len(), Relaxed);
    }

    /// Durable messages handed over as doubtful go to the front, to be sent checked.
    fn take_doubtful(&mut self) {
        self.queue.take_doubtful(&mut self.incoming);
        self.held.recheck += self.incoming.len();
        for envelope in self.incoming.drain(..).rev() {
            self.held.pending.push_front(envelope);
        }
    }

    /// Taking over from another engine: what it hands over goes first, so nothing is
    /// sent before it has.
    async fn wait_gate(&mut self) {
        let (core, stop) = (self.core.clone(), self.stop.clone());
        let Some(gate) = &core.gate else { return };
        tokio::select! {
            _ = gate.wait() => {}
            _ = stop.cancelled() => self.stopping = true,
        }
        self.take_doubtful();
        if let Some(since) = self.queue.take(&mut self.incoming) {
            self.held.since.get_or_insert(since);
        }
        self.held.pending.extend(self.incoming.drain(..));
    }

    /// Whether held publishes may be sent. The probe or the subscriber may have seen
    /// Redis go away before any publish failed: then hold, and let a harmless NUMSUB
    /// find out, instead of writing a pipeline into a dead connection and having to
    /// count it as unconfirmed. After an outage, until the listeners are back (or
    /// `redis.recovery_wait_ms` has passed since Redis answered again).
    async fn recovered(&mut self) -> bool {
        let healthy = self.core.publisher_ok.load(Relaxed) && self.core.subscriber_ok.load(Relaxed);
        if !healthy && self.recovery.is_none() {
            self.recovery = Some(Recovery::begin(&self.core));
        }
        if self.stopping {
            return true;
        }
        let Some(mut recovery) = self.recovery.take() else {
            return true;
        };
        let stop = self.stop.clone();
        let back = tokio::select! {
            back = self.listeners_back(&recovery) => Some(back),
            _ = stop.cancelled() => None,
        };
        match back {
            None => {
                self.stopping = true;
                self.recovery = Some(recovery);
                return false;
            }
            Some(Ok(true)) => return true,
            Some(Ok(false)) => {
                let answered = *recovery.answered.get_or_insert_with(Instant::now);
                if answered.elapsed() >= self.recovery_wait {
                    tracing::warn!(
                        held = self.held.pending.len(),
                        waited_ms = self.recovery_wait.as_millis() as u64,
                        "not every node re-subscribed after the Redis outage; sending the held publishes anyway"
                    );
                    return true;
                }
            }
            Some(Err(_)) => {}
        }
        self.recovery = Some(recovery);
        tokio::select! {
            _ = tokio::time::sleep(RECOVERY_POLL) => {}
            _ = stop.cancelled() => self.stopping = true,
        }
        false
    }

    /// Sends one pipeline from the front of what is held, and sorts out the answer.
    async fn send(&mut self) -> Step {
        let built = self.build(&self.held.pending, self.held.recheck);
        let sent = match self.core.shutdown_deadline().filter(|_| self.stopping) {
            Some(deadline) => {
                // A little before the engine's deadline, when the task is aborted: what is
                // held must be handed back (or counted) first.
                let deadline = deadline.checked_sub(GIVE_UP_MARGIN).unwrap_or(deadline);
                let query = built.pipe.query_async(&mut self.conn);
                match tokio::time::timeout_at(deadline.into(), query).await {
                    Ok(result) => result,
                    Err(_) => {
                        self.unconfirmed(built.used, "the drain timeout passed");
                        self.give_up(
                            "drain timeout reached with Redis not answering: publishes dropped",
                        );
                        return Step::Stop;
                    }
                }
            }
            None => {
                built
                    .pipe
                    .query_async::<Vec<redis::RedisResult<redis::Value>>>(&mut self.conn)
                    .await
            }
        };
        match sent {
            Ok(replies) => self.answered(&built, &replies).await,
            Err(e) => self.failed(&e, built.used).await,
        }
    }

    /// Redis answered the pipeline, command by command.
    async fn answered(
        &mut self,
        built: &Built,
        replies: &[redis::RedisResult<redis::Value>],
    ) -> Step {
        let used = built.used;
        let refused = self.tell_outcomes(built, replies);
        let kept_here = if replies.iter().all(Result::is_ok) {
            let confirmed = self.held.pending.drain(..used).enumerate();
            self.recent.confirmed(
                confirmed
                    .filter(|(i, _)| !refused.contains(i))
                    .map(|(_, e)| e),
            );
            0
        } else {
            self.sort_refusals(built, replies, &refused)
        };
        let held = &mut self.held;
        held.recheck = held.recheck.saturating_sub(used) + if built.check { kept_here } else { 0 };
        self.queue.held.store(held.pending.len(), Relaxed);
        self.remember(&built.channels, replies);
        if kept_here > 0 {
            // A demoted master: hold everything until Redis (or the Sentinel set's
            // switch to the new master) lets publishes run again.
            self.core.counters.publish_failures.fetch_add(1, Relaxed);
            if self.core.publisher_ok.swap(false, Relaxed) {
                tracing::warn!(
                    held = self.held.pending.len(),
                    "Redis refuses publishes (READONLY or NOREPLICAS); holding them"
                );
            }
            return self
                .pause_or_give_up("shutting down with Redis refusing publishes: publishes dropped")
                .await;
        }
        let commands = built.channels.len() as u64;
        if let Some(stats) = self.core.stats.get() {
            stats.pipeline_commands.record(commands);
            if let Some(since) = self.held.since {
                stats.publish_latency.record_duration(since.elapsed());
            }
        }
        // Anything left keeps the old mark: an upper bound of its wait.
        if self.held.pending.is_empty() {
            self.held.since = None;
        }
        let f = &self.core.counters;
        f.pipelines.fetch_add(1, Relaxed);
        f.publish_commands.fetch_add(commands, Relaxed);
        f.published_messages.fetch_add(used as u64, Relaxed);
        if !self.core.publisher_ok.swap(true, Relaxed) {
            f.reconnects.fetch_add(1, Relaxed);
            tracing::info!(
                still_held = self.held.pending.len(),
                "Redis publishing resumed"
            );
        }
        self.backoff = BACKOFF.start();
        Step::Again
    }

    /// The pipeline failed as a whole: Redis unreachable, or its answer lost.
    async fn failed(&mut self, e: &redis::RedisError, used: usize) -> Step {
        self.core.counters.publish_failures.fetch_add(1, Relaxed);
        if let Failure::Unconfirmed = classify(e) {
            self.unconfirmed(used, &e.to_string());
        }
        if self.core.publisher_ok.swap(false, Relaxed) {
            tracing::warn!(error = %e, held = self.held.pending.len(), "Redis publish failed; holding publishes until it is back");
        }
        if self.recovery.is_none() {
            self.recovery = Some(Recovery::begin(&self.core));
        }
        self.pause_or_give_up("shutting down with Redis unreachable: publishes dropped")
            .await
    }

    /// After a failure: when stopping, give up what is held (handed back, or dropped and
    /// counted with `why`); else wait the backoff before the next try.
    async fn pause_or_give_up(&mut self, why: &str) -> Step {
        if self.stopping {
            self.give_up(why);
            return Step::Stop;
        }
        let stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(self.backoff) => {}
            _ = stop.cancelled() => self.stopping = true,
        }
        self.backoff = BACKOFF.next(self.backoff);
        Step::Again
    }

    /// For the queued paces (bits): when the first of them is due, and which are due
    /// then. A pace without a window is due at once; one with a window waits for the
    /// tick after it first had something queued.
    fn next_due(&mut self, queued: u64, now: Instant) -> (Instant, u64) {
        let mut first: Option<Instant> = None;
        for (pace, clock) in self.clocks.iter().enumerate() {
            if queued & (1 << pace) == 0 {
                continue;
            }
            let at = match clock {
                None => now,
                Some(clock) => *self.ticks[pace].get_or_insert_with(|| clock.next_tick(now)),
            };
            first = Some(first.map_or(at, |f| f.min(at)));
        }
        let first = first.unwrap_or(now);
        let due = (0..self.clocks.len())
            .filter(|pace| queued & (1 << pace) != 0)
            .filter(|pace| self.ticks[*pace].is_none_or(|t| t <= first))
            .fold(0, |bits, pace| bits | 1 << pace);
        (first, due)
    }

    /// Whether every node alive before the outage is subscribed again, and every channel
    /// with held publishes has its subscribers from before. An error means Redis is still
    /// unreachable.
    async fn listeners_back(&mut self, recovery: &Recovery) -> redis::RedisResult<bool> {
        let mut channels: Vec<String> = self.held.pending.iter().map(|e| self.channel(e)).collect();
        channels.sort_unstable();
        channels.dedup();
        let probes: Vec<String> = recovery
            .peers
            .iter()
            .map(|peer| self.core.keys.probe_of(peer))
            .collect();
        let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg(if self.core.spublish() {
                "SHARDNUMSUB"
            } else {
                "NUMSUB"
            })
            .arg(&probes)
            .arg(&channels)
            .query_async(&mut self.conn)
            .await?;
        let (peer_counts, channel_counts) = counts.split_at(probes.len().min(counts.len()));
        Ok(peer_counts.iter().all(|(_, n)| *n >= 1)
            && channel_counts
                .iter()
                .all(|(channel, n)| *n >= self.listeners.get(channel).copied().unwrap_or(0)))
    }
}
