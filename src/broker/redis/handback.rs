//! What an engine hands back to the set it belongs to (see `routed`).

use parking_lot::Mutex;

use crate::broker::Envelope;

/// Publishes an engine in a routed set hands back to the set, to route again: those its
/// Redis refused to run (a cluster's `MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`: the slot
/// is moving or lives on another master; a demoted master's `READONLY`), and at shutdown
/// those it still held. Redis did not run them, so sending them again duplicates
/// nothing. "Handed back" is the one name for this, in code and in the
/// `redis_handed_back_publishes` counter.
#[derive(Default)]
pub struct HandBack {
    envelopes: Mutex<Vec<Envelope>>,
    /// Durable messages whose pipeline's answer was lost: sent again with a check that
    /// skips those the stream already has (`publish_doubtful`).
    doubtful: Mutex<Vec<Envelope>>,
    /// Wakes the set's watch: look at the deployment again, and route what came back.
    pub notify: tokio::sync::Notify,
}

impl HandBack {
    pub fn hand_back(&self, envelopes: impl IntoIterator<Item = Envelope>) {
        self.envelopes.lock().extend(envelopes);
        self.notify.notify_one();
    }

    pub fn hand_back_doubtful(&self, envelopes: impl IntoIterator<Item = Envelope>) {
        self.doubtful.lock().extend(envelopes);
        self.notify.notify_one();
    }

    /// Takes every envelope handed back, oldest first.
    pub fn take(&self) -> Vec<Envelope> {
        std::mem::take(&mut *self.envelopes.lock())
    }

    /// Takes the doubtful durable messages handed back, oldest first.
    pub fn take_doubtful(&self) -> Vec<Envelope> {
        std::mem::take(&mut *self.doubtful.lock())
    }

    pub fn len(&self) -> usize {
        self.envelopes.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
