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

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use redis::aio::ConnectionManager;
use redis::{ErrorKind, RedisError, ServerErrorKind};
use tokio_util::sync::CancellationToken;

use super::{durable, EnvelopeWriter, PublishQueue, Shared, BACKOFF};
use crate::batch::Clock;
use crate::broker::{Envelope, Kind, Target};
use crate::config::{Config, Durability, EnvelopeMode};
use crate::throttle::LogThrottle;

const RECOVERY_POLL: Duration = Duration::from_millis(50);
/// Channels whose subscriber counts are remembered (for recovery).
const MAX_REMEMBERED_CHANNELS: usize = 65_536;
/// How long before the shutdown deadline the publisher stops waiting for Redis.
const GIVE_UP_MARGIN: Duration = Duration::from_millis(100);
/// How long, and how many, confirmed durable messages are kept for a failover.
const RECENT: Duration = Duration::from_secs(5);
const MAX_RECENT: usize = 1000;

pub(super) struct Publisher {
    shared: Arc<Shared>,
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
    /// Durable messages Redis confirmed in the last `RECENT` (at most `MAX_RECENT`), kept
    /// only under an owner engine (Sentinel, cluster): when this engine is replaced at a
    /// failover they go to the next master as doubtful, so those the old master took but
    /// never replicated are appended again, and the others skipped.
    recent: VecDeque<(Instant, Envelope)>,
}

/// An outage being recovered from.
struct Recovery {
    /// The other nodes alive before the outage.
    peers: Vec<String>,
    /// When Redis first answered again.
    answered: Option<Instant>,
}

impl Recovery {
    fn begin(shared: &Shared) -> Recovery {
        Recovery {
            peers: shared.peers.lock().clone(),
            answered: None,
        }
    }
}

/// How a failed pipeline failed.
enum Failure {
    /// It never reached Redis: keep it and send it again.
    NotSent,
    /// Redis may have run it: never send it again.
    Unconfirmed,
}

/// One window's pipeline and which envelopes each of its commands carries.
struct Built {
    pipe: redis::Pipeline,
    /// Each command's channel.
    channels: Vec<String>,
    /// Indices into `pending`, command after command.
    members: Vec<usize>,
    /// Each command's part of `members`.
    spans: Vec<Range<usize>>,
    /// The envelopes at the front of `pending` the pipeline carries.
    used: usize,
    /// Sent in check mode (durable messages sent before without an answer).
    check: bool,
}

/// Whether Redis answered an error that means the command did not run, and would run
/// elsewhere or later: a demoted master (`READONLY`), a master cut off from its replicas
/// (`NOREPLICAS`, with `min-replicas-to-write`: a promoted replica has left it), a
/// cluster redirection.
fn not_run(e: &RedisError) -> bool {
    e.is_cluster_error()
        || e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
        || e.code() == Some("NOREPLICAS")
}

fn classify(e: &RedisError) -> Failure {
    // A refused connection happens before anything is written; every other error may
    // come after the pipeline was written (a reply timeout, a connection reset).
    if e.is_connection_refusal() {
        Failure::NotSent
    } else {
        Failure::Unconfirmed
    }
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
            recent: VecDeque::new(),
        }
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
    async fn listeners_back(
        &mut self,
        recovery: &Recovery,
        pending: &VecDeque<Envelope>,
    ) -> redis::RedisResult<bool> {
        let mut channels: Vec<String> = pending.iter().map(|e| self.channel(e)).collect();
        channels.sort_unstable();
        channels.dedup();
        let probes: Vec<String> = recovery
            .peers
            .iter()
            .map(|peer| self.shared.keys.probe_of(peer))
            .collect();
        let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg(if self.shared.sharded() {
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

    fn channel(&self, envelope: &Envelope) -> String {
        match &envelope.target {
            Target::Room(room) => self.shared.keys.room(room),
            Target::Broadcast => self.shared.keys.broadcast.clone(),
            Target::User(user) => self.shared.keys.user(user),
        }
    }

    /// One pipeline from the front of `pending`: the pipeline, the channel of each of its
    /// commands, and how many envelopes it carries. Plain messages: one `PUBLISH` per
    /// channel (per `max_envelope_messages`) in `batch` mode, one per message in `single`
    /// mode. A durable room's messages: one script call per room per window (see
    /// `durable`), which publishes them in either shape.
    /// With `recheck > 0`, only those first ones, in check mode.
    fn build(&self, pending: &VecDeque<Envelope>, recheck: usize) -> Built {
        let check = recheck > 0;
        let limit = if check { recheck } else { pending.len() };
        let mut pipe = redis::pipe();
        // Each command's reply on its own: a command Redis refused did not run and can be
        // kept (or handed back in a cluster) while the others count as sent.
        pipe.ignore_errors();
        let single = self.mode == EnvelopeMode::Single;
        // Groups in order of first appearance, messages in publish order within each.
        let mut groups: IndexMap<(String, bool), Vec<usize>> = IndexMap::new();
        let mut commands = 0;
        let mut used = 0;
        for (i, envelope) in pending.iter().take(limit).enumerate() {
            let key = (self.channel(envelope), durability(envelope).is_some());
            let group = groups.get(&key).map_or(0, Vec::len);
            let new_command = if single && !key.1 {
                true
            } else {
                group.is_multiple_of(self.max_envelope_messages)
            };
            if new_command {
                if commands == self.max_pipeline {
                    break;
                }
                commands += 1;
            }
            groups.entry(key).or_default().push(i);
            used = i + 1;
        }
        let mut channels = Vec::with_capacity(commands);
        let mut members = Vec::with_capacity(used);
        let mut spans = Vec::with_capacity(commands);
        for ((channel, _), indices) in groups {
            let per_command = if single && durability(&pending[indices[0]]).is_none() {
                1
            } else {
                self.max_envelope_messages
            };
            for chunk in indices.chunks(per_command) {
                let first = &pending[chunk[0]];
                match (durability(first), &first.target) {
                    (Some(durability), Target::Room(room)) => durable::add_publish(
                        &mut pipe,
                        &self.shared,
                        room,
                        durability,
                        self.writer.head(),
                        durable::Mode { single, check },
                        chunk.iter().map(|&i| pending[i].payload.json().to_vec()),
                    ),
                    _ if chunk.len() == 1 => {
                        pipe.cmd(self.shared.publish_command())
                            .arg(&channel)
                            .arg(self.writer.single(first.payload.json()));
                    }
                    _ => {
                        let message = self
                            .writer
                            .batch(chunk.iter().map(|&i| pending[i].payload.json()));
                        pipe.cmd(self.shared.publish_command())
                            .arg(&channel)
                            .arg(message);
                    }
                }
                channels.push(channel.clone());
                spans.push(members.len()..members.len() + chunk.len());
                members.extend_from_slice(chunk);
            }
        }
        Built {
            pipe,
            channels,
            members,
            spans,
            used,
            check,
        }
    }

    fn remember(&mut self, channels: &[String], replies: &[redis::RedisResult<i64>]) {
        if self.listeners.len() > MAX_REMEMBERED_CHANNELS {
            // Only a hint for recovery: forgetting it is safe.
            self.listeners.clear();
        }
        for (channel, reply) in channels.iter().zip(replies) {
            let Ok(&all) = reply.as_ref() else { continue };
            self.listeners.insert(channel.clone(), all);
        }
    }

    /// Sorts out a pipeline some of whose commands Redis refused. A command refused by a
    /// cluster redirection did not run and belongs to another master: handed back to the
    /// cluster engine to route again. One refused by this server for now (`READONLY`,
    /// `NOREPLICAS`) did not run either: kept at the front of `pending`, in order, to try
    /// again here (or to hand over at shutdown). Other refusals are counted and dropped.
    /// Returns how many were kept here, to retry after a pause.
    fn sort_refusals(
        &mut self,
        pending: &mut VecDeque<Envelope>,
        built: &Built,
        replies: &[redis::RedisResult<i64>],
    ) -> usize {
        #[derive(Clone, Copy, PartialEq)]
        enum Fate {
            Ran,
            Redirect,
            Retry,
            Dropped,
        }
        let mut fates = vec![Fate::Dropped; built.used];
        let mut dropped = 0;
        for (span, reply) in built.spans.iter().zip(replies) {
            let fate = match reply {
                Ok(_) => Fate::Ran,
                Err(e) if e.is_cluster_error() && self.shared.redirected.is_some() => {
                    Fate::Redirect
                }
                Err(e) if not_run(e) => Fate::Retry,
                Err(e) => {
                    dropped += span.len();
                    static LOG: LogThrottle = LogThrottle::new(Duration::from_secs(10));
                    if let Some(held_back) = LOG.allow() {
                        tracing::warn!(error = %e, messages = span.len(), held_back, "Redis refused a publish; dropped");
                    }
                    Fate::Dropped
                }
            };
            for &i in &built.members[span.clone()] {
                fates[i] = fate;
            }
        }
        if dropped > 0 {
            self.shared
                .counters
                .dropped_publishes
                .fetch_add(dropped as u64, Relaxed);
        }
        let (mut ran, mut redirect, mut retry) = (Vec::new(), Vec::new(), Vec::new());
        for (i, envelope) in pending.drain(..built.used).enumerate() {
            match fates[i] {
                Fate::Ran => ran.push(envelope),
                Fate::Redirect => redirect.push(envelope),
                Fate::Retry => retry.push(envelope),
                Fate::Dropped => {}
            }
        }
        self.confirmed(ran.into_iter());
        if let (Some(redirected), false) = (&self.shared.redirected, redirect.is_empty()) {
            if built.check {
                redirected.hand_back_doubtful(redirect);
            } else {
                redirected.hand_back(redirect);
            }
        }
        let kept = retry.len();
        for envelope in retry.into_iter().rev() {
            pending.push_front(envelope);
        }
        kept
    }

    /// Redis confirmed these: kept a while if durable and an owner engine could need
    /// them again (see `recent`).
    fn confirmed(&mut self, envelopes: impl Iterator<Item = Envelope>) {
        if self.shared.redirected.is_none() {
            envelopes.for_each(drop);
            return;
        }
        let now = Instant::now();
        self.recent.extend(
            envelopes
                .filter(|e| durability(e).is_some())
                .map(|e| (now, e)),
        );
        while self
            .recent
            .front()
            .is_some_and(|(at, _)| at.elapsed() > RECENT)
            || self.recent.len() > MAX_RECENT
        {
            self.recent.pop_front();
        }
    }

    /// A pipeline Redis may or may not have run (its answer was lost). Its plain messages
    /// are never sent again (no duplicates) and are counted as unconfirmed; its durable
    /// ones go back to the front, to be sent again with the stream check, which skips
    /// those that did run: durable rooms lose nothing and double nothing.
    fn unconfirmed(
        &self,
        pending: &mut VecDeque<Envelope>,
        used: usize,
        recheck: &mut usize,
        why: &str,
    ) {
        let mut durable = Vec::new();
        let mut plain = 0u64;
        for envelope in pending.drain(..used) {
            if durability(&envelope).is_some() {
                durable.push(envelope);
            } else {
                plain += 1;
            }
        }
        *recheck = recheck.saturating_sub(used) + durable.len();
        for envelope in durable.into_iter().rev() {
            pending.push_front(envelope);
        }
        if plain > 0 {
            let total = self
                .shared
                .counters
                .unconfirmed_publishes
                .fetch_add(plain, Relaxed)
                + plain;
            tracing::warn!(
                error = why,
                messages = plain,
                total,
                "Redis may or may not have run a publish pipeline; its plain messages are not sent again (no duplicates), counted as unconfirmed"
            );
        }
    }

    /// At shutdown: publishes this engine will not send, and whatever is still queued.
    /// Handed back to the engine that owns this one (the next master's engine sends
    /// them), or else counted as dropped.
    /// The first `recheck` of `pending` are doubtful (see `unconfirmed`): they go back
    /// as such.
    fn give_up(&mut self, pending: &mut VecDeque<Envelope>, recheck: usize, why: &str) {
        let mut rest = Vec::new();
        self.queue.take_doubtful(&mut rest);
        let recheck = recheck.min(pending.len());
        // The recently confirmed first: they are the oldest.
        let mut doubtful: Vec<Envelope> = std::mem::take(&mut self.recent)
            .into_iter()
            .filter(|(at, _)| at.elapsed() <= RECENT)
            .map(|(_, e)| e)
            .collect();
        doubtful.extend(pending.drain(..recheck));
        doubtful.append(&mut rest);
        self.queue.take(&mut rest);
        let envelopes: Vec<Envelope> = pending.drain(..).chain(rest).collect();
        let n = envelopes.len() + doubtful.len();
        if n == 0 {
            return;
        }
        if let Some(redirected) = &self.shared.redirected {
            let held = n - doubtful.len();
            redirected.hand_back_doubtful(doubtful);
            redirected.hand_back(envelopes);
            if held > 0 {
                tracing::info!(
                    publishes = held,
                    "held publishes handed to the engine taking over"
                );
            }
            return;
        }
        let f = &self.shared.counters;
        let total = f.dropped_publishes.fetch_add(n as u64, Relaxed) + n as u64;
        tracing::warn!(dropped = n, total, "{why}");
    }
}

pub(super) async fn run(mut p: Publisher) {
    let mut pending: VecDeque<Envelope> = VecDeque::new();
    let mut incoming: Vec<Envelope> = Vec::new();
    let mut backoff = BACKOFF.start();
    let mut stopping = false;
    let mut recovery: Option<Recovery> = None;
    // When the oldest pending publish was queued.
    let mut pending_since: Option<Instant> = None;
    // How many at the front of `pending` are durable messages sent before without an
    // answer: they go first, checked against the stream (see `durable::PUBLISH`).
    let mut recheck = 0usize;
    let mut doubtful: Vec<Envelope> = Vec::new();
    loop {
        // Which paces to take: all of them while something is pending (a retry) or when
        // stopping, else those whose window's tick has come.
        let mut due = u64::MAX;
        if pending.is_empty() && !stopping {
            due = loop {
                let queued = p.queue.queued_paces();
                let next = (queued != 0).then(|| p.next_due(queued, Instant::now()));
                let Some((at, due)) = next else {
                    tokio::select! {
                        _ = p.queue.ready.notified() => continue,
                        _ = p.stop.cancelled() => {
                            stopping = true;
                            break u64::MAX;
                        }
                    }
                };
                if at <= Instant::now() {
                    break due;
                }
                // A pace that had nothing queued may be due sooner: look again then.
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = p.queue.ready.notified() => {}
                    _ = p.stop.cancelled() => {
                        stopping = true;
                        break u64::MAX;
                    }
                }
            };
        }
        for (pace, tick) in p.ticks.iter_mut().enumerate() {
            if due & (1 << pace) != 0 {
                *tick = None;
            }
        }
        if let Some(since) = p.queue.take_paces(due, &mut incoming) {
            pending_since.get_or_insert(since);
        }
        pending.extend(incoming.drain(..));
        p.queue.take_doubtful(&mut doubtful);
        recheck += doubtful.len();
        for envelope in doubtful.drain(..).rev() {
            pending.push_front(envelope);
        }
        p.queue.held.store(pending.len(), Relaxed);
        if pending.is_empty() {
            if stopping {
                p.give_up(&mut pending, 0, "");
                return;
            }
            continue;
        }
        if let Some(gate) = &p.shared.gate {
            // Taking over from another engine: what it held goes first.
            tokio::select! {
                _ = gate.wait() => {}
                _ = p.stop.cancelled() => stopping = true,
            }
            p.queue.take_doubtful(&mut doubtful);
            recheck += doubtful.len();
            for envelope in doubtful.drain(..).rev() {
                pending.push_front(envelope);
            }
            if let Some(since) = p.queue.take(&mut incoming) {
                pending_since.get_or_insert(since);
            }
            pending.extend(incoming.drain(..));
        }
        // The probe or the subscriber may have seen Redis go away before any publish
        // failed: hold, and let a harmless NUMSUB find out, instead of writing a pipeline
        // into a dead connection and having to count it as unconfirmed.
        let healthy = p.shared.publisher_ok.load(Relaxed) && p.shared.subscriber_ok.load(Relaxed);
        if !healthy && recovery.is_none() {
            recovery = Some(Recovery::begin(&p.shared));
        }
        if let (Some(r), false) = (recovery.as_mut(), stopping) {
            let stop = p.stop.clone();
            let back = tokio::select! {
                back = p.listeners_back(r, &pending) => back,
                _ = stop.cancelled() => {
                    stopping = true;
                    continue;
                }
            };
            match back {
                Ok(true) => recovery = None,
                Ok(false) => {
                    let answered = *r.answered.get_or_insert_with(Instant::now);
                    if answered.elapsed() >= p.recovery_wait {
                        tracing::warn!(
                            held = pending.len(),
                            waited_ms = p.recovery_wait.as_millis() as u64,
                            "not every node re-subscribed after the Redis outage; sending the held publishes anyway"
                        );
                        recovery = None;
                    }
                }
                Err(_) => {}
            }
            if recovery.is_some() {
                tokio::select! {
                    _ = tokio::time::sleep(RECOVERY_POLL) => {}
                    _ = p.stop.cancelled() => stopping = true,
                }
                continue;
            }
        }
        let built = p.build(&pending, recheck);
        let (channels, used) = (&built.channels, built.used);
        let sent = match p.shared.shutdown_deadline().filter(|_| stopping) {
            Some(deadline) => {
                // A little before the engine's deadline, when the task is aborted: what is
                // held must be handed back (or counted) first.
                let deadline = deadline.checked_sub(GIVE_UP_MARGIN).unwrap_or(deadline);
                match tokio::time::timeout_at(deadline.into(), built.pipe.query_async(&mut p.conn))
                    .await
                {
                    Ok(result) => result,
                    Err(_) => {
                        p.unconfirmed(&mut pending, used, &mut recheck, "the drain timeout passed");
                        p.give_up(
                            &mut pending,
                            recheck,
                            "drain timeout reached with Redis not answering: publishes dropped",
                        );
                        return;
                    }
                }
            }
            None => {
                built
                    .pipe
                    .query_async::<Vec<redis::RedisResult<i64>>>(&mut p.conn)
                    .await
            }
        };
        match sent {
            Ok(replies) => {
                let kept_here = if replies.iter().all(Result::is_ok) {
                    p.confirmed(pending.drain(..used));
                    0
                } else {
                    p.sort_refusals(&mut pending, &built, &replies)
                };
                recheck = recheck.saturating_sub(used) + if built.check { kept_here } else { 0 };
                p.queue.held.store(pending.len(), Relaxed);
                p.remember(channels, &replies);
                if kept_here > 0 {
                    // A demoted master: hold everything until Redis (or the Sentinel
                    // engine's switch to the new master) lets publishes run again.
                    p.shared.counters.publish_failures.fetch_add(1, Relaxed);
                    if p.shared.publisher_ok.swap(false, Relaxed) {
                        tracing::warn!(
                            held = pending.len(),
                            "Redis refuses publishes (READONLY or NOREPLICAS); holding them"
                        );
                    }
                    if stopping {
                        p.give_up(
                            &mut pending,
                            recheck,
                            "shutting down with Redis refusing publishes: publishes dropped",
                        );
                        return;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = p.stop.cancelled() => stopping = true,
                    }
                    backoff = BACKOFF.next(backoff);
                    continue;
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
                let f = &p.shared.counters;
                f.pipelines.fetch_add(1, Relaxed);
                f.publish_commands.fetch_add(channels.len() as u64, Relaxed);
                f.published_messages.fetch_add(used as u64, Relaxed);
                if !p.shared.publisher_ok.swap(true, Relaxed) {
                    f.reconnects.fetch_add(1, Relaxed);
                    tracing::info!(still_held = pending.len(), "Redis publishing resumed");
                }
                backoff = BACKOFF.start();
            }
            Err(e) => {
                p.shared.counters.publish_failures.fetch_add(1, Relaxed);
                if let Failure::Unconfirmed = classify(&e) {
                    p.unconfirmed(&mut pending, used, &mut recheck, &e.to_string());
                    p.queue.held.store(pending.len(), Relaxed);
                }
                if p.shared.publisher_ok.swap(false, Relaxed) {
                    tracing::warn!(error = %e, held = pending.len(), "Redis publish failed; holding publishes until it is back");
                }
                if recovery.is_none() {
                    recovery = Some(Recovery::begin(&p.shared));
                }
                if stopping {
                    p.give_up(
                        &mut pending,
                        recheck,
                        "shutting down with Redis unreachable: publishes dropped",
                    );
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = p.stop.cancelled() => stopping = true,
                }
                backoff = BACKOFF.next(backoff);
            }
        }
    }
}

fn durability(envelope: &Envelope) -> Option<Durability> {
    match envelope.kind {
        Kind::Durable(durability) => Some(durability),
        _ => None,
    }
}
