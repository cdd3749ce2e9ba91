//! Background features: the node reporter, the demo feed, boards' entry expiry, and
//! webhooks. The server starts them once the node exists and
//! stops them first on shutdown, under one cancellation token and task tracker, so none
//! publishes while sockets drain or the broker flushes. The node itself starts only what
//! a node is: its delivery clock.

use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::node::Node;
use crate::reports::{self, NodeReports};
use crate::{boards, demo, webhooks};

pub struct Features {
    stop: CancellationToken,
    tasks: TaskTracker,
    /// The node reports, also read by `/api/cluster`.
    pub reports: Arc<NodeReports>,
}

impl Features {
    pub fn start(node: &Arc<Node>) -> Features {
        let config = node.config();
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let reports = Arc::new(NodeReports::new(config));
        tasks.spawn(reports::run(node.clone(), reports.clone(), stop.clone()));
        if boards::needed(node) {
            tasks.spawn(boards::run(node.clone(), stop.clone()));
        }
        if webhooks::needed(node) {
            tasks.spawn(webhooks::run(node.clone(), stop.clone()));
        }
        if config.demo.enabled {
            tasks.spawn(demo::run(node.clone(), config.demo.clone(), stop.clone()));
        }
        tasks.close();
        Features {
            stop,
            tasks,
            reports,
        }
    }

    /// Stops every feature; waits for them until `deadline` at most.
    pub async fn stop(&self, deadline: Instant) {
        self.stop.cancel();
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("a background feature did not stop by the drain deadline");
        }
    }
}
