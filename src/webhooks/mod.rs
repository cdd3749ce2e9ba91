//! Webhooks: the backend hears when a room gets its first subscriber anywhere
//! (`room_occupied`), when the last one anywhere left (`room_vacated`, after
//! `webhooks.vacate_delay_ms`, so a reload does not flap), and when a user's first socket
//! anywhere appears or their last one goes (`user_online`, `user_offline`, after the same
//! delay). Each event is sent once for the whole deployment: the node whose change made
//! it true decides it, through the broker's ledger (`broker::Ledger`: one atomic step per
//! change), and a node that dies has its rooms and users taken over by the first
//! survivor to see its liveness end (`webhooks.node_timeout_ms`).
//!
//! | file | job |
//! | --- | --- |
//! | `mod.rs` | the tracker: the node's holdings to the ledger, the delay, the renewals |
//! | `sender.rs` | the bounded queue and the signed, batched, retried POSTs |
//!
//! A node shutting down does not release what it holds: it shortens its liveness to the
//! vacate delay, so rooms whose sockets move to other nodes do not flap, and those left
//! empty vacate when a surviving node takes the node over.

mod sender;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, Own, Subject};
use crate::config::WebhooksConfig;
use crate::node::Node;
use sender::{Event, Queue};

/// How often the tracker looks at due releases.
const TICK: Duration = Duration::from_millis(100);
/// How often a node renews its liveness (and takes over dead nodes).
const RENEW: Duration = Duration::from_secs(1);

/// Whether the node sends webhooks.
pub fn needed(node: &Node) -> bool {
    node.config().webhooks.enabled()
}

/// Follows the node's holdings until `stop`; the sender posts what they decide.
pub async fn run(node: Arc<Node>, stop: CancellationToken) {
    let config = node.config().webhooks.clone();
    node.holdings().follow();
    let stats = node.stats().clone();
    let queue = Arc::new(Queue::new(config.queue_size, stats.clone()));
    let sending = tokio::spawn(sender::run(
        queue.clone(),
        config.clone(),
        stats,
        stop.clone(),
    ));
    let mut tracker = Tracker {
        ids: Ids::new(node.id()),
        told: HashMap::new(),
        waiting: HashMap::new(),
        silent: Default::default(),
        queue,
        config,
    };
    tracker.run(&node, &stop).await;
    // Gone in a vacate delay, unless this node comes back sooner.
    let _ = node.broker().reap(tracker.delay()).await;
    let _ = sending.await;
}

/// What the ledger was told of a subject this node holds.
#[derive(Debug, Clone, Copy)]
enum Told {
    Held,
    /// No local member since; released at this time unless one comes back.
    Leaving(Instant),
}

struct Tracker {
    ids: Ids,
    told: HashMap<Subject, Told>,
    /// Changes not yet told (the ledger was away): each subject's latest.
    waiting: HashMap<Subject, bool>,
    /// Held again after the ledger lost them: nobody announced them gone, so their
    /// hold announces nothing.
    silent: std::collections::HashSet<Subject>,
    queue: Arc<Queue>,
    config: WebhooksConfig,
}

impl Tracker {
    fn delay(&self) -> Duration {
        Duration::from_millis(self.config.vacate_delay_ms)
    }

    async fn run(&mut self, node: &Node, stop: &CancellationToken) {
        let broker = node.broker().as_ref();
        let mut tick = tokio::time::interval(TICK);
        let mut renewed: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = node.holdings().changed() => {}
                _ = tick.tick() => {}
            }
            self.waiting.extend(node.holdings().take());
            let told = self.tell_changes(broker).await && self.release_due(broker).await;
            if told && renewed.is_none_or(|at| at.elapsed() >= RENEW) {
                renewed = Some(Instant::now());
                self.renew(broker).await;
            }
        }
    }

    /// Tells the ledger what changed; false when it is away (the rest waits).
    async fn tell_changes(&mut self, broker: &dyn Broker) -> bool {
        let subjects: Vec<Subject> = self.waiting.keys().cloned().collect();
        for subject in subjects {
            let held = self.waiting[&subject];
            if !held {
                self.silent.remove(&subject);
            }
            match (held, self.told.get(&subject).copied()) {
                (true, None) => match broker.hold(&subject).await {
                    Ok(first) => {
                        self.told.insert(subject.clone(), Told::Held);
                        if !self.silent.remove(&subject) && first {
                            self.emit(&subject, true);
                        }
                    }
                    Err(e) => return self.away(&e),
                },
                (true, Some(_)) => {
                    self.told.insert(subject.clone(), Told::Held);
                }
                (false, Some(Told::Held)) => {
                    let at = Instant::now() + self.delay();
                    self.told.insert(subject.clone(), Told::Leaving(at));
                }
                (false, _) => {}
            }
            self.waiting.remove(&subject);
        }
        true
    }

    /// Releases what stayed without a local member for the vacate delay.
    async fn release_due(&mut self, broker: &dyn Broker) -> bool {
        let now = Instant::now();
        let due: Vec<Subject> = self
            .told
            .iter()
            .filter(|(_, told)| matches!(told, Told::Leaving(at) if *at <= now))
            .map(|(subject, _)| subject.clone())
            .collect();
        for subject in due {
            match broker.release(&subject).await {
                Ok(last) => {
                    self.told.remove(&subject);
                    if last {
                        self.emit(&subject, false);
                    }
                }
                Err(e) => return self.away(&e),
            }
        }
        true
    }

    /// Renews this node's liveness; announces what dead nodes left; tells the ledger
    /// again what this node holds if it was taken for dead itself.
    async fn renew(&mut self, broker: &dyn Broker) {
        let ttl = Duration::from_millis(self.config.node_timeout_ms);
        match broker.reap(ttl).await {
            Ok(reaped) => {
                for subject in &reaped.gone {
                    self.emit(subject, false);
                }
                match reaped.own {
                    Own::Kept => {}
                    _ if self.told.is_empty() => {}
                    Own::TakenOver => {
                        tracing::warn!(
                            held = self.told.len(),
                            "webhooks: this node was taken for dead (Redis out of reach for longer than webhooks.node_timeout_ms); announcing its rooms and users again"
                        );
                        self.hold_again(false);
                    }
                    Own::Missing => {
                        tracing::info!(
                            held = self.told.len(),
                            "webhooks: the ledger lost this node's entry (Redis restarted empty?); holding its rooms and users again"
                        );
                        self.hold_again(true);
                    }
                }
            }
            Err(e) => {
                self.away(&e);
            }
        }
    }

    /// Tells the ledger again what this node still holds: announced as new when a node
    /// that took this one over announced it gone, else (`silent`) not. What was leaving
    /// is left to the ledger as it is.
    fn hold_again(&mut self, silent: bool) {
        for (subject, told) in self.told.drain() {
            if matches!(told, Told::Held) {
                if silent {
                    self.silent.insert(subject.clone());
                }
                self.waiting.insert(subject, true);
            }
        }
    }

    fn away(&self, e: &crate::broker::LedgerError) -> bool {
        tracing::debug!(error = %e, waiting = self.waiting.len(), "webhooks: ledger call failed");
        static LOG: crate::throttle::LogThrottle =
            crate::throttle::LogThrottle::new(Duration::from_secs(10));
        if let Some(held_back) = LOG.allow() {
            tracing::warn!(error = %e, held_back, "webhooks: the ledger is away; changes wait");
        }
        false
    }

    /// Queues the event a subject's first (`arrived`) or last holder decided.
    fn emit(&self, subject: &Subject, arrived: bool) {
        let name = match (subject, arrived) {
            (Subject::Room(_), true) => "room_occupied",
            (Subject::Room(_), false) => "room_vacated",
            (Subject::User(_), true) => "user_online",
            (Subject::User(_), false) => "user_offline",
        };
        tracing::debug!(event = name, ?subject, "webhooks: decided");
        if self.config.sends(name) {
            self.queue.push(Event::new(name, self.ids.next(), subject));
        }
    }
}

/// Event ids: the node, when it started, and a count; unique across the deployment and
/// its restarts, so a receiver can drop a repeat (a POST answered but not heard).
struct Ids {
    prefix: String,
    next: std::sync::atomic::AtomicU64,
}

impl Ids {
    fn new(node: &str) -> Ids {
        Ids {
            prefix: format!("{node}-{:x}-", crate::protocol::now_ms()),
            next: std::sync::atomic::AtomicU64::new(1),
        }
    }

    fn next(&self) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{}{n}", self.prefix)
    }
}
