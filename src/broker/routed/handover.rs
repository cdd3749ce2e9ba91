//! The hand-over to a new layout, the retiring of engines that left it, and routing
//! what engines hand back (see the module docs of `routed`).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{EngineSet, Layout, Route, Topology, RETIRE_WITHIN};
use crate::broker::{add_counters, Counter, CounterKind, Envelope, Health, RedisBroker};
use crate::broker::{Broker, Presence, PublishError};

impl<T: Topology> EngineSet<T> {
    /// Follows a new layout (see the module docs).
    pub(super) fn replace(self: &Arc<Self>, next: Layout<T::Route>) {
        let current = self.layout();
        let next = Arc::new(next);
        let retiring: Vec<Arc<RedisBroker>> = current
            .engines
            .iter()
            .filter(|e| !next.has(e))
            .cloned()
            .collect();
        let started: Vec<Arc<RedisBroker>> = next
            .engines
            .iter()
            .filter(|e| !current.has(e))
            .cloned()
            .collect();
        if let Some((id, sink, stats)) = self.attached.get() {
            for engine in &started {
                engine.attach(id.clone(), sink.clone(), stats.clone());
            }
        }
        // From now on only the new engines' messages are delivered, and durable rooms go
        // on from what was delivered here: a message an old master took after the
        // change, and the new one gets again, is not delivered twice.
        for engine in &retiring {
            engine.stop_delivering();
        }
        let stays = |engine: &Arc<RedisBroker>| next.has(engine);
        // Holding both sets until the swap: a join or a user arriving meanwhile waits and
        // then reaches the engine of the new layout (their calls take the set's lock
        // first).
        let rooms = self.rooms.lock();
        let users = self.users.lock();
        for room in rooms.iter() {
            let (was, now) = (current.room(room), next.room(room));
            if same(was, now) {
                continue;
            }
            if let Some(now) = now {
                if let Some(was) = was {
                    now.take_position(was, room);
                }
                now.subscribe(room);
            }
            // One that leaves is shut down instead.
            if let Some(was) = was.filter(|e| stays(e)) {
                was.unsubscribe(room);
            }
        }
        for user in users.iter() {
            let (was, now) = (current.user(user), next.user(user));
            if same(was, now) {
                continue;
            }
            if let Some(now) = now {
                now.user_online(user);
            }
            if let Some(was) = was.filter(|e| stays(e)) {
                was.user_offline(user);
            }
        }
        let home = next.home();
        for engine in &next.engines {
            engine.set_home(home.is_some_and(|home| Arc::ptr_eq(home, engine)));
        }
        *self.layout.write() = next.clone();
        drop((rooms, users));
        self.topology.changed(&current, &next);
        self.retire(retiring, started);
    }

    /// Shuts engines down in the background; what they held comes back and is routed
    /// by the new layout; then the new engines may send.
    fn retire(self: &Arc<Self>, engines: Vec<Arc<RedisBroker>>, started: Vec<Arc<RedisBroker>>) {
        self.retiring.lock().extend(engines.iter().cloned());
        let set = Arc::downgrade(self);
        tokio::spawn(async move {
            let deadline = Instant::now() + RETIRE_WITHIN;
            for engine in &engines {
                engine.shutdown(deadline).await;
            }
            if let Some(set) = set.upgrade() {
                // Both locks at once, so `counters` never counts an engine twice or not
                // at all.
                let mut retiring = set.retiring.lock();
                let mut retired = set.retired.lock();
                for engine in &engines {
                    retiring.retain(|e| !Arc::ptr_eq(e, engine));
                    add_counters(&mut retired, counts_only(engine.counters()));
                }
                drop((retiring, retired));
                set.route_handed_back();
            }
            for engine in &started {
                engine.open_gate();
            }
        });
    }

    /// Routes again what engines handed back: doubtful durable messages first (they are
    /// the older ones, and are checked against the stream), then the rest, in order.
    /// What nothing serves yet waits for the next layout.
    pub(super) fn route_handed_back(&self) {
        let layout = self.layout();
        let mut unroutable = Vec::new();
        for envelope in self.hand_back.take_doubtful() {
            match layout.at(layout.target(&envelope.target)) {
                Some(engine) => {
                    self.handed_back.fetch_add(1, Relaxed);
                    engine.publish_doubtful(std::slice::from_ref(&envelope));
                }
                None => unroutable.push(envelope),
            }
        }
        if !unroutable.is_empty() {
            self.hand_back.hand_back_doubtful(unroutable);
        }
        let envelopes = self.hand_back.take();
        let mut unroutable = Vec::new();
        for_each_run(&layout, &envelopes, |engine, run| {
            match layout.at(engine) {
                Some(engine) => {
                    self.handed_back.fetch_add(run.len() as u64, Relaxed);
                    if let Err(e) = engine.publish(run) {
                        self.dropped.fetch_add(run.len() as u64, Relaxed);
                        tracing::warn!(publishes = run.len(), "publishes handed back dropped: {e}");
                    }
                }
                None => unroutable.extend_from_slice(run),
            }
            Ok::<(), PublishError>(())
        })
        .ok();
        if !unroutable.is_empty() {
            self.hand_back.hand_back(unroutable);
        }
    }
}

/// Calls `f` with each run of consecutive envelopes that go to the same engine.
pub(super) fn for_each_run<R: Route, E>(
    layout: &Layout<R>,
    envelopes: &[Envelope],
    mut f: impl FnMut(Option<usize>, &[Envelope]) -> Result<(), E>,
) -> Result<(), E> {
    let mut start = 0;
    let mut engine = None;
    for (i, envelope) in envelopes.iter().enumerate() {
        let this = layout.target(&envelope.target);
        if i > start && this != engine {
            f(engine, &envelopes[start..i])?;
            start = i;
        }
        engine = this;
    }
    if start < envelopes.len() {
        f(engine, &envelopes[start..])?;
    }
    Ok(())
}

/// An engine's counts without its levels: an engine that left has no level any more.
pub(super) fn counts_only(counters: Vec<Counter>) -> impl Iterator<Item = Counter> {
    counters
        .into_iter()
        .filter(|c| c.kind == CounterKind::Count)
}

/// Whether two lookups found the same engine (or both none).
fn same(a: Option<&Arc<RedisBroker>>, b: Option<&Arc<RedisBroker>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// Looks every `every` (at least `soonest` after the last look, sooner when an engine
/// handed something back) and routes what came back.
pub(super) async fn watch<T: Topology>(
    set: Weak<EngineSet<T>>,
    every: Duration,
    soonest: Duration,
    stop: CancellationToken,
) {
    let Some(hand_back) = set.upgrade().map(|s| s.hand_back.clone()) else {
        return;
    };
    let mut state = T::Watch::default();
    loop {
        let Some(set) = set.upgrade() else { return };
        let current = set.layout();
        if let Some(next) = set.topology.look(&set.starter, &current, &mut state).await {
            set.replace(next);
        }
        set.route_handed_back();
        drop((set, current));
        tokio::select! {
            _ = tokio::time::sleep(soonest) => {}
            _ = stop.cancelled() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(every.saturating_sub(soonest)) => {}
            _ = hand_back.notify.notified() => {}
            _ = stop.cancelled() => return,
        }
    }
}
