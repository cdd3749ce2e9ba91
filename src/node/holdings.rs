//! What this node holds, for features that speak for the whole deployment (webhooks):
//! a room from its first local member to its last, a user from their first local socket
//! to their last. Changes coalesce per subject, the latest state winning, so a flood of
//! joins and leaves costs one entry per room, however fast it goes; nothing is kept
//! until a feature follows them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::broker::Subject;

#[derive(Default)]
pub struct Holdings {
    followed: AtomicBool,
    /// Per subject changed since the last `take`: whether the node holds it now.
    changed: Mutex<HashMap<Subject, bool>>,
    wake: Notify,
}

impl Holdings {
    /// From now on, changes are kept for `take`.
    pub fn follow(&self) {
        self.followed.store(true, Ordering::Release);
    }

    /// The node holds `subject` now (`held`), or no more.
    pub(super) fn set(&self, subject: impl FnOnce() -> Subject, held: bool) {
        if !self.followed.load(Ordering::Acquire) {
            return;
        }
        self.changed.lock().insert(subject(), held);
        self.wake.notify_one();
    }

    /// The changes since the last call, each subject's latest.
    pub fn take(&self) -> HashMap<Subject, bool> {
        std::mem::take(&mut *self.changed.lock())
    }

    /// Resolves when something changed since the last `take` (at once if it did).
    pub async fn changed(&self) {
        self.wake.notified().await
    }
}
