//! Node reports: every node's summary, for `/api/cluster` and `/dashboard` (the route
//! keeps the reference servers' name; "cluster" elsewhere in volley means Redis Cluster).
//!
//! Every `metrics.report_s` a node turns its counters into a report (rates over the last
//! interval, batch size, delivery latency p50/p99 from the histogram's bucket deltas) and
//! keeps the last `metrics.history` reports. Where the broker keeps reports (Redis, in
//! every topology: `broker::Reports`), it also writes the report there (the hash
//! `metrics:<serverId>`, TTL 300 s, the reference servers' field names, plus volley's
//! counters and the history as JSON, and its id in the set `volley:nodes`), and
//! `/api/cluster` reads every node's. Without one, the deployment shown is this node.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, ReportError};
use crate::config::Config;
use crate::metrics::StatsSnapshot;
use crate::node::Node;
use crate::protocol::now_ms;

/// Seconds a node's hash outlives its last report.
const REPORT_TTL_S: u64 = 300;

/// One report: what a node did during the last interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub timestamp: u64,
    pub connections: u64,
    pub rooms: u64,
    pub messages_in_per_sec: f64,
    pub deliveries_per_sec: f64,
    pub frames_per_sec: f64,
    /// Messages per frame written.
    pub batch_avg: f64,
    /// How long the oldest message of a write waited, in milliseconds.
    pub delivery_p50_ms: f64,
    pub delivery_p99_ms: f64,
}

/// One node as `/api/cluster` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    pub server_id: String,
    pub updated_at: u64,
    pub latest: Report,
    pub history: Vec<Report>,
}

pub struct NodeReports {
    node_id: String,
    history_len: usize,
    history: Mutex<VecDeque<Report>>,
}

/// The fields `/api/cluster` reads back.
const READ: [&str; 3] = ["updatedAt", "latest", "history"];

impl NodeReports {
    pub fn new(config: &Config) -> NodeReports {
        NodeReports {
            node_id: config.server.node_id.clone(),
            history_len: config.metrics.history,
            history: Mutex::new(VecDeque::new()),
        }
    }

    /// Every live node's report, sorted by id: from the broker's store where it keeps
    /// one, else this node's own.
    pub async fn nodes(&self, broker: &dyn Broker) -> Result<Vec<NodeReport>, ReportError> {
        if !broker.keeps_reports() {
            return Ok(vec![self.own()]);
        }
        let rows = broker.read_reports(&READ).await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, fields)| {
                let [updated_at, latest, history] = <[Option<String>; 3]>::try_from(fields).ok()?;
                Some(NodeReport {
                    latest: serde_json::from_str(&latest?).unwrap_or_default(),
                    history: history
                        .and_then(|h| serde_json::from_str(&h).ok())
                        .unwrap_or_default(),
                    server_id: id,
                    updated_at: updated_at?.parse().ok()?,
                })
            })
            .collect())
    }

    fn own(&self) -> NodeReport {
        let history: Vec<Report> = self.history.lock().iter().cloned().collect();
        NodeReport {
            server_id: self.node_id.clone(),
            updated_at: history.last().map_or(0, |s| s.timestamp),
            latest: history.last().cloned().unwrap_or_default(),
            history,
        }
    }

    fn remember(&self, report: Report) {
        let mut history = self.history.lock();
        if history.len() >= self.history_len {
            history.pop_front();
        }
        history.push_back(report);
    }

    /// Writes the report where every node reads it: the reference servers' fields,
    /// volley's, and the history.
    async fn publish(
        &self,
        broker: &dyn Broker,
        report: &Report,
        totals: &StatsSnapshot,
        publish_avg_ms: f64,
    ) -> Result<(), ReportError> {
        let latest = serde_json::to_string(report).unwrap_or_default();
        let history = serde_json::to_string(&self.own().history).unwrap_or_default();
        let fields = vec![
            ("serverId", self.node_id.clone()),
            ("timestamp", report.timestamp.to_string()),
            ("updatedAt", report.timestamp.to_string()),
            (
                "messagesPublished",
                (totals.messages_in() - totals.messages_in_broker).to_string(),
            ),
            ("messagesReceived", totals.messages_in_broker.to_string()),
            ("avgPublishLatencyMs", format!("{publish_avg_ms:.2}")),
            (
                "avgDeliveryLatencyMs",
                format!("{:.2}", report.delivery_p50_ms),
            ),
            ("errors", totals.protocol_errors.to_string()),
            ("connections", report.connections.to_string()),
            ("latest", latest),
            ("history", history),
        ];
        broker.write_report(fields, REPORT_TTL_S).await
    }
}

/// What the previous report saw, to turn totals into rates.
struct Previous {
    at: Instant,
    totals: StatsSnapshot,
    latency: Vec<u64>,
    /// Publish latency histogram's (sum, count).
    publish: (u64, u64),
}

/// Reports every `metrics.report_s` until `stop` is cancelled.
pub async fn run(node: Arc<Node>, reports: Arc<NodeReports>, stop: CancellationToken) {
    let every = Duration::from_secs(node.config().metrics.report_s);
    let mut previous: Option<Previous> = None;
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        let stats = node.stats();
        let now = Instant::now();
        let totals = stats.snapshot();
        let latency = stats.delivery_latency.counts();
        let publish = stats.publish_latency.sum_count();
        if let Some(prev) = &previous {
            let report = report(&node, prev, now, &totals, &latency);
            reports.remember(report.clone());
            let broker = node.broker();
            if broker.keeps_reports() {
                let (sum, count) = (publish.0 - prev.publish.0, publish.1 - prev.publish.1);
                let publish_avg_ms = if count == 0 {
                    0.0
                } else {
                    sum as f64 / count as f64 / 1000.0
                };
                let written = tokio::select! {
                    written = reports.publish(&**broker, &report, &totals, publish_avg_ms) => written,
                    _ = stop.cancelled() => return,
                };
                match written {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("node report written again");
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "node report not written; retrying every interval");
                    }
                    Err(_) => {}
                }
            }
        }
        previous = Some(Previous {
            at: now,
            totals,
            latency,
            publish,
        });
    }
}

fn report(
    node: &Node,
    prev: &Previous,
    now: Instant,
    totals: &StatsSnapshot,
    latency: &[u64],
) -> Report {
    let secs = now.duration_since(prev.at).as_secs_f64().max(1e-3);
    let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
    let deliveries = totals.deliveries.saturating_sub(prev.totals.deliveries);
    let frames = totals.frames_out.saturating_sub(prev.totals.frames_out);
    let delta: Vec<u64> = latency
        .iter()
        .zip(&prev.latency)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let h = &node.stats().delivery_latency;
    let ms = |q| h.quantile(&delta, q).map_or(0.0, |us| us / 1000.0);
    Report {
        timestamp: now_ms(),
        connections: totals.connections,
        rooms: node.rooms() as u64,
        messages_in_per_sec: rate(totals.messages_in(), prev.totals.messages_in()),
        deliveries_per_sec: rate(totals.deliveries, prev.totals.deliveries),
        frames_per_sec: rate(totals.frames_out, prev.totals.frames_out),
        batch_avg: if frames == 0 {
            0.0
        } else {
            deliveries as f64 / frames as f64
        },
        delivery_p50_ms: ms(0.5),
        delivery_p99_ms: ms(0.99),
    }
}
