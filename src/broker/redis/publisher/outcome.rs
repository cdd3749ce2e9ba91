//! What became of a pipeline: which commands ran, which Redis refused (and what that
//! means for each), which may or may not have run; and, at shutdown, what is handed back
//! or dropped.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use redis::{ErrorKind, RedisError, ServerErrorKind, Value};

use super::super::board;
use super::pipeline::{durability, Built};
use super::{Publisher, MAX_REMEMBERED_CHANNELS};
use crate::broker::{Envelope, Refused};
use crate::throttle::LogThrottle;

/// How long, and how many, confirmed durable messages are kept for a failover.
const RECENT: Duration = Duration::from_secs(5);
const MAX_RECENT: usize = 1000;

/// How a failed pipeline failed.
pub(super) enum Failure {
    /// It never reached Redis: keep it and send it again.
    NotSent,
    /// Redis may have run it: never send it again.
    Unconfirmed,
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

pub(super) fn classify(e: &RedisError) -> Failure {
    // A refused connection happens before anything is written; every other error may
    // come after the pipeline was written (a reply timeout, a connection reset).
    if e.is_connection_refusal() {
        Failure::NotSent
    } else {
        Failure::Unconfirmed
    }
}

/// Durable messages Redis confirmed in the last `RECENT` (at most `MAX_RECENT`), kept
/// only under a routed set (Sentinel, cluster): when this engine is replaced at a
/// failover they go to the next master as doubtful, so those the old master took but
/// never replicated are appended again, and the others skipped.
pub(super) struct Recent {
    keep: bool,
    entries: VecDeque<(Instant, Envelope)>,
}

impl Recent {
    pub(super) fn new(keep: bool) -> Recent {
        Recent {
            keep,
            entries: VecDeque::new(),
        }
    }

    /// Redis confirmed these.
    pub(super) fn confirmed(&mut self, envelopes: impl Iterator<Item = Envelope>) {
        if !self.keep {
            envelopes.for_each(drop);
            return;
        }
        let now = Instant::now();
        self.entries.extend(
            envelopes
                .filter(|e| durability(e).is_some())
                .map(|e| (now, e)),
        );
        while self
            .entries
            .front()
            .is_some_and(|(at, _)| at.elapsed() > RECENT)
            || self.entries.len() > MAX_RECENT
        {
            self.entries.pop_front();
        }
    }

    /// Those still recent, oldest first.
    fn take(&mut self) -> impl Iterator<Item = Envelope> {
        std::mem::take(&mut self.entries)
            .into_iter()
            .filter(|(at, _)| at.elapsed() <= RECENT)
            .map(|(_, e)| e)
    }
}

impl Publisher {
    /// Per channel, its subscribers at this PUBLISH (a hint for recovery).
    pub(super) fn remember(&mut self, channels: &[String], replies: &[redis::RedisResult<Value>]) {
        if self.listeners.len() > MAX_REMEMBERED_CHANNELS {
            // Only a hint for recovery: forgetting it is safe.
            self.listeners.clear();
        }
        for (channel, reply) in channels.iter().zip(replies) {
            // A PUBLISH answers its receivers; a state room's script, those first.
            let all = match reply {
                Ok(Value::Int(all)) => *all,
                Ok(Value::Array(items)) => match items.first() {
                    Some(Value::Int(all)) => *all,
                    _ => continue,
                },
                _ => continue,
            };
            self.listeners.insert(channel.clone(), all);
        }
    }

    /// Tells each state room's message what became of it (its offset, or `state_full`),
    /// as its script call answered. Returns the refused ones (indices into `pending`):
    /// they were not appended, so they are no confirmed messages.
    pub(super) fn tell_outcomes(
        &self,
        built: &Built,
        replies: &[redis::RedisResult<Value>],
    ) -> Vec<usize> {
        let mut refused = Vec::new();
        for (span, reply) in built.spans.iter().zip(replies) {
            let Some(offsets) = reply.as_ref().ok().and_then(board::offsets) else {
                continue;
            };
            for (&i, offset) in built.members[span.clone()].iter().zip(offsets) {
                let envelope = &self.held.pending[i];
                let outcome = match offset {
                    Some(offset) => Ok(offset),
                    None => {
                        refused.push(i);
                        let max_keys = durability(envelope)
                            .and_then(|d| d.board)
                            .map_or(0, |b| b.max_keys);
                        Err(Refused::StateFull { max_keys })
                    }
                };
                if let Some(tell) = &envelope.outcome {
                    tell.tell(outcome);
                }
            }
        }
        refused
    }

    /// Sorts out a pipeline some of whose commands Redis refused. A command refused by a
    /// cluster redirection did not run and belongs to another master: handed back to the
    /// set to route again. One refused by this server for now (`READONLY`, `NOREPLICAS`)
    /// did not run either: kept at the front of `pending`, in order, to try again here
    /// (or to hand back at shutdown). Other refusals are counted and dropped.
    /// Returns how many were kept here, to retry after a pause.
    pub(super) fn sort_refusals(
        &mut self,
        built: &Built,
        replies: &[redis::RedisResult<Value>],
        refused: &[usize],
    ) -> usize {
        #[derive(Clone, Copy, PartialEq)]
        enum Fate {
            Ran,
            HandBack,
            Retry,
            Dropped,
        }
        let mut fates = vec![Fate::Dropped; built.used];
        let mut dropped = 0;
        for (span, reply) in built.spans.iter().zip(replies) {
            let fate = match reply {
                Ok(_) => Fate::Ran,
                Err(e) if e.is_cluster_error() && self.core.hand_back.is_some() => Fate::HandBack,
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
            self.core
                .counters
                .dropped_publishes
                .fetch_add(dropped as u64, Relaxed);
        }
        for &i in refused {
            // The board refused it: it ran, and appended nothing.
            fates[i] = Fate::Dropped;
        }
        let (mut ran, mut back, mut retry) = (Vec::new(), Vec::new(), Vec::new());
        for (i, envelope) in self.held.pending.drain(..built.used).enumerate() {
            match fates[i] {
                Fate::Ran => ran.push(envelope),
                Fate::HandBack => back.push(envelope),
                Fate::Retry => retry.push(envelope),
                Fate::Dropped => {}
            }
        }
        self.recent.confirmed(ran.into_iter());
        if let (Some(hand_back), false) = (&self.core.hand_back, back.is_empty()) {
            if built.check {
                hand_back.hand_back_doubtful(back);
            } else {
                hand_back.hand_back(back);
            }
        }
        let kept = retry.len();
        for envelope in retry.into_iter().rev() {
            self.held.pending.push_front(envelope);
        }
        kept
    }

    /// A pipeline of the first `used` held publishes Redis may or may not have run (its
    /// answer was lost). Its plain messages are never sent again (no duplicates) and are
    /// counted as unconfirmed; its durable ones go back to the front, to be sent again
    /// with the stream check, which skips those that did run: durable rooms lose nothing
    /// and double nothing.
    pub(super) fn unconfirmed(&mut self, used: usize, why: &str) {
        let held = &mut self.held;
        let mut durable = Vec::new();
        let mut plain = 0u64;
        for envelope in held.pending.drain(..used) {
            if durability(&envelope).is_some() {
                durable.push(envelope);
            } else {
                plain += 1;
            }
        }
        held.recheck = held.recheck.saturating_sub(used) + durable.len();
        for envelope in durable.into_iter().rev() {
            held.pending.push_front(envelope);
        }
        self.queue.held.store(held.pending.len(), Relaxed);
        if plain > 0 {
            let total = self
                .core
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
    /// Handed back to the set that owns this engine (the next master's engine sends
    /// them), or else counted as dropped. The doubtful ones (see `unconfirmed`) go back
    /// as such.
    pub(super) fn give_up(&mut self, why: &str) {
        let mut rest = Vec::new();
        self.queue.take_doubtful(&mut rest);
        let held = &mut self.held;
        let recheck = held.recheck.min(held.pending.len());
        // The recently confirmed first: they are the oldest.
        let mut doubtful: Vec<Envelope> = self.recent.take().collect();
        doubtful.extend(held.pending.drain(..recheck));
        doubtful.append(&mut rest);
        self.queue.take(&mut rest);
        let envelopes: Vec<Envelope> = held.pending.drain(..).chain(rest).collect();
        let n = envelopes.len() + doubtful.len();
        if n == 0 {
            return;
        }
        if let Some(hand_back) = &self.core.hand_back {
            let kept = n - doubtful.len();
            hand_back.hand_back_doubtful(doubtful);
            hand_back.hand_back(envelopes);
            if kept > 0 {
                tracing::info!(
                    publishes = kept,
                    "held publishes handed back to the engine taking over"
                );
            }
            return;
        }
        let f = &self.core.counters;
        let total = f.dropped_publishes.fetch_add(n as u64, Relaxed) + n as u64;
        tracing::warn!(dropped = n, total, "{why}");
    }
}
