//! The node's levels that `/metrics` reads when it is asked for (not kept by `Stats`):
//! readiness, the broker's connection, open files against the limit. The alert rules in
//! `deploy/prometheus/` read them.

use super::gauge;

/// The node's levels, read when `/metrics` is asked for (not kept by `Stats`).
pub struct Levels {
    pub rooms: usize,
    /// What `/readyz` answers: 200 is 1.
    pub ready: bool,
    /// The broker is connected (Redis reachable and its subscriber delivering).
    pub broker_connected: bool,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

impl Levels {
    pub(super) fn render(&self, out: &mut String) {
        gauge(
            out,
            "volley_ready",
            "1 while /readyz answers 200: the broker connected and the node not draining.",
            &format!(" {}", u8::from(self.ready)),
        );
        gauge(
            out,
            "volley_broker_connected",
            "1 while the broker is connected (every Redis engine reachable, its subscriber delivering).",
            &format!(" {}", u8::from(self.broker_connected)),
        );
        if let (Some(open), Some(max)) = (self.open_fds, self.max_fds) {
            gauge(
                out,
                "process_open_fds",
                "Open file descriptors.",
                &format!(" {open}"),
            );
            gauge(
                out,
                "process_max_fds",
                "The open-file limit (soft).",
                &format!(" {max}"),
            );
        }
    }
}
