//! Node figures: plain atomic counters, cheap enough for the hot path.
//!
//! They are read by `/healthz` today; the Prometheus exporter reads the same counters.
//! Relaxed ordering everywhere: these are statistics, not synchronisation.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

#[derive(Default)]
pub struct Stats {
    connections: AtomicU64,
    messages_in_socket: AtomicU64,
    messages_in_api: AtomicU64,
    messages_in_broker: AtomicU64,
    deliveries: AtomicU64,
    frames_out: AtomicU64,
    slow_consumers_closed: AtomicU64,
    protocol_errors: AtomicU64,
}

/// Where a published message entered this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Socket,
    Api,
    Broker,
}

/// A point-in-time copy of the counters.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub connections: u64,
    pub messages_in_socket: u64,
    pub messages_in_api: u64,
    pub messages_in_broker: u64,
    pub deliveries: u64,
    pub frames_out: u64,
    pub slow_consumers_closed: u64,
    pub protocol_errors: u64,
}

impl Stats {
    pub fn connection_opened(&self) -> u64 {
        self.connections.fetch_add(1, Relaxed) + 1
    }

    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Relaxed);
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Relaxed)
    }

    pub fn message_in(&self, source: Source) {
        let counter = match source {
            Source::Socket => &self.messages_in_socket,
            Source::Api => &self.messages_in_api,
            Source::Broker => &self.messages_in_broker,
        };
        counter.fetch_add(1, Relaxed);
    }

    pub fn record_write(&self, messages: usize, frames: usize) {
        self.deliveries.fetch_add(messages as u64, Relaxed);
        self.frames_out.fetch_add(frames as u64, Relaxed);
    }

    pub fn slow_consumer(&self) {
        self.slow_consumers_closed.fetch_add(1, Relaxed);
    }

    pub fn protocol_error(&self) {
        self.protocol_errors.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            connections: self.connections.load(Relaxed),
            messages_in_socket: self.messages_in_socket.load(Relaxed),
            messages_in_api: self.messages_in_api.load(Relaxed),
            messages_in_broker: self.messages_in_broker.load(Relaxed),
            deliveries: self.deliveries.load(Relaxed),
            frames_out: self.frames_out.load(Relaxed),
            slow_consumers_closed: self.slow_consumers_closed.load(Relaxed),
            protocol_errors: self.protocol_errors.load(Relaxed),
        }
    }
}
