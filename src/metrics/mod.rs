//! Node stats: plain atomic counters and fixed-bucket histograms, cheap enough for the
//! hot path, read by `/healthz`, `/metrics` (Prometheus text format) and the cluster
//! report.
//!
//! Relaxed ordering everywhere: these are statistics, not synchronisation. Histograms are
//! recorded once per write or per pipeline, never per delivery: a record is a bucket
//! search over a dozen bounds and two atomic adds. Bucket counts are kept by hand (not by
//! a metrics registry) because the cluster report needs them too, to give the dashboard
//! the p50/p99 of the last interval.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

use crate::protocol::ErrorCode;

mod levels;
pub use levels::Levels;

/// Where a published message entered this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Socket,
    Api,
    Broker,
    /// The built-in demo feed (`--demo`).
    Demo,
}

impl Source {
    const ALL: [Source; 4] = [Source::Socket, Source::Api, Source::Broker, Source::Demo];

    fn as_str(self) -> &'static str {
        match self {
            Source::Socket => "socket",
            Source::Api => "api",
            Source::Broker => "broker",
            Source::Demo => "demo",
        }
    }
}

/// Latency bounds in microseconds: 50 µs to 5 s.
const LATENCY_US: &[u64] = &[
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 75_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000,
];
/// Messages per frame.
const BATCH_MESSAGES: &[u64] = &[1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000];
/// Commands per Redis pipeline.
const PIPELINE_COMMANDS: &[u64] = &[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];

/// A histogram over fixed integer bounds (`le`), Prometheus style: a value lands in the
/// first bucket whose bound is at least the value, or in `+Inf`.
pub struct Histogram {
    bounds: &'static [u64],
    /// One per bound, then `+Inf`; not cumulative.
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [u64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    pub fn record(&self, value: u64) {
        self.record_n(value, 1);
    }

    /// Records `n` observations of `value` at once.
    pub fn record_n(&self, value: u64, n: u64) {
        let i = self.bounds.partition_point(|&b| b < value);
        self.counts[i].fetch_add(n, Relaxed);
        self.sum.fetch_add(value.saturating_mul(n), Relaxed);
    }

    pub fn record_duration(&self, d: Duration) {
        self.record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    /// Sum and count of everything recorded.
    pub fn sum_count(&self) -> (u64, u64) {
        let count = self.counts.iter().map(|c| c.load(Relaxed)).sum();
        (self.sum.load(Relaxed), count)
    }

    /// Bucket counts now (not cumulative, `+Inf` last).
    pub fn counts(&self) -> Vec<u64> {
        self.counts.iter().map(|c| c.load(Relaxed)).collect()
    }

    /// The `q` quantile (0..=1) of the observations counted in `counts` (e.g. the
    /// difference of two `counts()`), interpolated within its bucket; `None` if empty.
    pub fn quantile(&self, counts: &[u64], q: f64) -> Option<f64> {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
        let mut below = 0u64;
        for (i, &n) in counts.iter().enumerate() {
            if n > 0 && (below + n) as f64 >= rank {
                let lower = if i == 0 { 0 } else { self.bounds[i - 1] } as f64;
                let Some(&upper) = self.bounds.get(i) else {
                    // +Inf: the best answer is the highest bound.
                    return Some(lower);
                };
                let within = (rank - below as f64) / n as f64;
                return Some(lower + (upper as f64 - lower) * within);
            }
            below += n;
        }
        None
    }

    /// Writes the histogram in the text format; `scale` turns recorded units into the
    /// exposed unit (1e-6 for microseconds to seconds).
    fn render(&self, out: &mut String, name: &str, help: &str, scale: f64) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Relaxed);
            match self.bounds.get(i) {
                Some(&b) => {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{le=\"{}\"}} {cumulative}",
                        b as f64 * scale
                    );
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = self.sum.load(Relaxed) as f64 * scale;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

pub struct Stats {
    connections: AtomicU64,
    joins: AtomicU64,
    leaves: AtomicU64,
    messages_in: [AtomicU64; Source::ALL.len()],
    deliveries: AtomicU64,
    frames_out: AtomicU64,
    slow_consumers_closed: AtomicU64,
    /// Queued messages replaced by a newer one with the same conflation key.
    conflated: AtomicU64,
    /// Socket writes submitted through io_uring (`server.io_uring`).
    io_uring_writes: AtomicU64,
    errors: [AtomicU64; ErrorCode::ALL.len()],
    /// Messages per frame written.
    pub batch_messages: Histogram,
    /// Per write: how long its oldest message waited in the outbox (µs).
    pub delivery_latency: Histogram,
    /// Commands per Redis publish pipeline.
    pub pipeline_commands: Histogram,
    /// Per pipeline: from its oldest message's enqueue to Redis's reply (µs).
    pub publish_latency: Histogram,
    /// The webhooks feature's figures.
    pub webhooks: WebhookStats,
}

/// What the webhooks feature decided, sent, failed and dropped.
#[derive(Default)]
pub struct WebhookStats {
    pub events: AtomicU64,
    pub sent: AtomicU64,
    pub failed_posts: AtomicU64,
    pub dropped: AtomicU64,
    pub queued: AtomicU64,
}

impl WebhookStats {
    fn counters(&self) -> [Counter; 5] {
        let get = |a: &AtomicU64| a.load(Relaxed);
        [
            Counter::count(
                "webhook_events",
                "Webhook events this node decided (the deployment's first or last holder of a room or user), queued to send.",
                get(&self.events),
            ),
            Counter::count(
                "webhook_sent",
                "Webhook events the receiver accepted (a 2xx answer to their POST).",
                get(&self.sent),
            ),
            Counter::count(
                "webhook_failed_posts",
                "Webhook POSTs that failed (no connection, no answer within webhooks.timeout_ms, or not 2xx); their events are retried.",
                get(&self.failed_posts),
            ),
            Counter::count(
                "webhook_dropped",
                "Webhook events dropped because webhooks.queue_size were waiting already.",
                get(&self.dropped),
            ),
            Counter::level(
                "webhook_queued",
                "Webhook events waiting to be sent.",
                get(&self.queued),
            ),
        ]
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            connections: AtomicU64::new(0),
            joins: AtomicU64::new(0),
            leaves: AtomicU64::new(0),
            messages_in: Default::default(),
            deliveries: AtomicU64::new(0),
            frames_out: AtomicU64::new(0),
            slow_consumers_closed: AtomicU64::new(0),
            conflated: AtomicU64::new(0),
            io_uring_writes: AtomicU64::new(0),
            errors: Default::default(),
            batch_messages: Histogram::new(BATCH_MESSAGES),
            delivery_latency: Histogram::new(LATENCY_US),
            pipeline_commands: Histogram::new(PIPELINE_COMMANDS),
            publish_latency: Histogram::new(LATENCY_US),
            webhooks: WebhookStats::default(),
        }
    }
}

/// A point-in-time copy of the counters.
#[derive(Debug, Clone, Serialize)]
pub struct StatsSnapshot {
    pub connections: u64,
    pub joins: u64,
    pub leaves: u64,
    pub messages_in_socket: u64,
    pub messages_in_api: u64,
    pub messages_in_broker: u64,
    pub messages_in_demo: u64,
    pub deliveries: u64,
    pub frames_out: u64,
    pub slow_consumers_closed: u64,
    pub protocol_errors: u64,
}

impl StatsSnapshot {
    pub fn messages_in(&self) -> u64 {
        self.messages_in_socket
            + self.messages_in_api
            + self.messages_in_broker
            + self.messages_in_demo
    }
}

impl Stats {
    pub fn connection_opened(&self) -> u64 {
        self.connections.fetch_add(1, Relaxed) + 1
    }

    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Relaxed);
    }

    pub fn joined(&self) {
        self.joins.fetch_add(1, Relaxed);
    }

    pub fn left(&self) {
        self.leaves.fetch_add(1, Relaxed);
    }

    pub fn message_in(&self, source: Source) {
        self.messages_in[source as usize].fetch_add(1, Relaxed);
    }

    /// One write of `messages` messages in `frames` frames.
    pub fn record_write(&self, messages: usize, frames: usize) {
        self.deliveries.fetch_add(messages as u64, Relaxed);
        self.frames_out.fetch_add(frames as u64, Relaxed);
    }

    pub fn slow_consumer(&self) {
        self.slow_consumers_closed.fetch_add(1, Relaxed);
    }

    /// A queued message gave way to a newer one with the same conflation key.
    pub fn conflated(&self) {
        self.conflated.fetch_add(1, Relaxed);
    }

    /// `n` socket writes went out in one io_uring submission.
    pub fn io_uring_writes(&self, n: usize) {
        self.io_uring_writes.fetch_add(n as u64, Relaxed);
    }

    pub fn protocol_error(&self, code: ErrorCode) {
        self.errors[code as usize].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let source = |s: Source| self.messages_in[s as usize].load(Relaxed);
        StatsSnapshot {
            connections: self.connections.load(Relaxed),
            joins: self.joins.load(Relaxed),
            leaves: self.leaves.load(Relaxed),
            messages_in_socket: source(Source::Socket),
            messages_in_api: source(Source::Api),
            messages_in_broker: source(Source::Broker),
            messages_in_demo: source(Source::Demo),
            deliveries: self.deliveries.load(Relaxed),
            frames_out: self.frames_out.load(Relaxed),
            slow_consumers_closed: self.slow_consumers_closed.load(Relaxed),
            protocol_errors: self.errors.iter().map(|e| e.load(Relaxed)).sum(),
        }
    }

    /// Everything in the Prometheus text exposition format (version 0.0.4).
    /// `node_id`, `broker` (the engine) and `rooms` name and size the node; the broker's
    /// own counters follow the node's, as the engine describes them.
    pub fn render_prometheus(
        &self,
        node_id: &str,
        broker: &str,
        levels: &Levels,
        broker_counters: &[Counter],
    ) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let s = self.snapshot();
        levels.render(&mut out);
        gauge(
            &mut out,
            "volley_node_info",
            "Always 1; labels name this node and its broker engine.",
            &format!("{{node=\"{}\",broker=\"{}\"}} 1", escape(node_id), broker),
        );
        gauge(
            &mut out,
            "volley_connections",
            "Open connections: WebSockets and SSE streams.",
            &format!(" {}", s.connections),
        );
        gauge(
            &mut out,
            "volley_rooms",
            "Rooms with at least one socket on this node.",
            &format!(" {}", levels.rooms),
        );
        counter(
            &mut out,
            "volley_joins_total",
            "Room joins by sockets of this node.",
            s.joins,
        );
        counter(
            &mut out,
            "volley_leaves_total",
            "Room leaves (including by disconnecting).",
            s.leaves,
        );
        labelled_counter(
            &mut out,
            "volley_messages_in_total",
            "Messages published into this node, by where they entered.",
            "source",
            Source::ALL.map(|s| (s.as_str(), self.messages_in[s as usize].load(Relaxed))),
        );
        counter(
            &mut out,
            "volley_deliveries_total",
            "Messages written to sockets (one per message per socket).",
            s.deliveries,
        );
        counter(
            &mut out,
            "volley_frames_out_total",
            "WebSocket frames carrying messages written to sockets.",
            s.frames_out,
        );
        counter(
            &mut out,
            "volley_slow_consumers_closed_total",
            "Sockets closed 1008 because their outbox overflowed.",
            s.slow_consumers_closed,
        );
        counter(
            &mut out,
            "volley_conflated_total",
            "Messages replaced by a newer one with the same conflation key (rooms with conflate): in a room's window, counted once for all its subscribers, or in a slow reader's outbox, counted per socket.",
            self.conflated.load(Relaxed),
        );
        counter(
            &mut out,
            "volley_io_uring_writes_total",
            "Socket writes submitted through io_uring (server.io_uring); the others are writev calls.",
            self.io_uring_writes.load(Relaxed),
        );
        labelled_counter(
            &mut out,
            "volley_errors_total",
            "Error frames sent to clients, by code.",
            "code",
            ErrorCode::ALL.map(|c| (c.as_str(), self.errors[c as usize].load(Relaxed))),
        );
        for c in broker_counters.iter().chain(&self.webhooks.counters()) {
            match c.kind {
                CounterKind::Level => {
                    let metric = format!("volley_{}", c.name);
                    gauge(&mut out, &metric, c.help, &format!(" {}", c.value));
                }
                CounterKind::Count => {
                    let metric = format!("volley_{}_total", c.name);
                    counter(&mut out, &metric, c.help, c.value);
                }
            }
        }
        self.render_histograms(&mut out);
        out
    }

    fn render_histograms(&self, out: &mut String) {
        self.batch_messages.render(
            out,
            "volley_batch_messages",
            "Messages per frame written to a socket.",
            1.0,
        );
        self.pipeline_commands.render(
            out,
            "volley_publish_pipeline_commands",
            "Commands per Redis publish pipeline.",
            1.0,
        );
        self.publish_latency.render(
            out,
            "volley_publish_latency_seconds",
            "Per Redis pipeline: from its oldest message's enqueue to Redis's reply.",
            1e-6,
        );
        self.delivery_latency.render(
            out,
            "volley_delivery_latency_seconds",
            "Per socket write: how long its oldest message waited in the outbox.",
            1e-6,
        );
    }
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

/// A counter family with one label: `name{label="value"} n` per value.
fn labelled_counter<const N: usize>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: [(&str, u64); N],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (value, n) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {n}");
    }
}

/// `sample` is what follows the name: ` 5`, or `{label="x"} 1`.
fn gauge(out: &mut String, name: &str, help: &str, sample: &str) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{sample}"
    );
}

/// Whether a counter only grows or is a level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterKind {
    /// Only grows: exposed as `volley_<name>_total`; summed over engines, and an engine
    /// shut down keeps counting in the total.
    Count,
    /// A level now: exposed as `volley_<name>`; an engine shut down no longer has one.
    Level,
}

/// One figure of an engine, as it describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    /// Without the `volley_` prefix and `_total` suffix: `redis_pipelines`.
    pub name: &'static str,
    pub help: &'static str,
    pub kind: CounterKind,
    pub value: u64,
}

impl Counter {
    pub const fn count(name: &'static str, help: &'static str, value: u64) -> Counter {
        Counter {
            name,
            help,
            kind: CounterKind::Count,
            value,
        }
    }

    pub const fn level(name: &'static str, help: &'static str, value: u64) -> Counter {
        Counter {
            name,
            help,
            kind: CounterKind::Level,
            value,
        }
    }
}

/// Escapes a label value (backslash, quote, newline).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let h = Histogram::new(&[10, 20, 40]);
        for v in [5, 15, 15, 30] {
            h.record(v);
        }
        let counts = h.counts();
        assert_eq!(counts, vec![1, 2, 1, 0]);
        assert_eq!(h.quantile(&counts, 0.25), Some(10.0));
        assert_eq!(h.quantile(&counts, 0.5), Some(15.0));
        assert_eq!(h.quantile(&counts, 1.0), Some(40.0));
        assert_eq!(h.quantile(&[0, 0, 0, 0], 0.5), None);
        h.record(1000);
        assert_eq!(h.quantile(&h.counts(), 1.0), Some(40.0));
    }

    #[test]
    fn histogram_text_is_cumulative() {
        let h = Histogram::new(&[1, 2]);
        h.record_n(1, 3);
        h.record(5);
        let mut out = String::new();
        h.render(&mut out, "x", "help", 1.0);
        assert!(out.contains("x_bucket{le=\"1\"} 3\nx_bucket{le=\"2\"} 3\nx_bucket{le=\"+Inf\"} 4\nx_sum 8\nx_count 4\n"), "{out}");
    }
}
