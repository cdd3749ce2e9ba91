//! Feature: state rooms' entries past their `state_ttl_s` leave the board even when
//! nobody publishes to the room. Once a second the node asks the engine to expire the
//! entries of the state rooms it has members in (one script call per room on Redis,
//! idempotent: the first node to ask removes, the others find nothing). Publishes expire
//! entries too, and reads leave expired ones out, so this only makes quiet rooms'
//! removals arrive on time.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::node::Node;

/// How often quiet rooms' entries are checked: removals arrive within about this of
/// their TTL.
const EVERY: Duration = Duration::from_secs(1);

/// Whether any room class gives its entries a TTL (else there is nothing to run).
pub fn needed(node: &Node) -> bool {
    node.config()
        .rooms
        .iter()
        .any(|c| c.state_key.is_some() && c.state_ttl_s > 0)
}

pub async fn run(node: Arc<Node>, stop: CancellationToken) {
    let mut every = tokio::time::interval(EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => node.expire_board_entries(),
        }
    }
}
