//! Cluster reports: every node's summary, for `/api/cluster` and `/dashboard`.
//!
//! Every `metrics.report_s` a node turns its counters into a report (rates over the last
//! interval, batch size, delivery latency p50/p99 from the histogram's bucket deltas) and
//! keeps the last `metrics.history` reports. With Redis, it also writes the report to the
//! hash `metrics:<serverId>` (TTL 300 s, the reference servers' field names, plus
//! volley's counters and the history as JSON) and adds its id to the set `volley:nodes`.
//! `/api/cluster` reads that set and the hashes, never `KEYS`; ids whose hash has expired
//! are removed from the set as they are found. Without Redis the cluster is this node.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use crate::broker::redis::{manager_config, Keys};
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

pub struct Cluster {
    node_id: String,
    redis_url: String,
    keys: Keys,
    history_len: usize,
    history: Mutex<VecDeque<Report>>,
    redis: OnceCell<ConnectionManager>,
}

impl Cluster {
    pub fn new(config: &Config) -> Cluster {
        let node_id = config.server.node_id.clone();
        Cluster {
            keys: Keys::new(&config.redis.key_prefix, &node_id),
            node_id,
            redis_url: config.redis.url.clone(),
            history_len: config.metrics.history,
            history: Mutex::new(VecDeque::new()),
            redis: OnceCell::new(),
        }
    }

    /// Every live node's report, sorted by id: from Redis when configured, else this
    /// node's own.
    pub async fn nodes(&self) -> Result<Vec<NodeReport>, redis::RedisError> {
        if self.redis_url.is_empty() {
            return Ok(vec![self.own()]);
        }
        let mut conn = self.connection().await?;
        let mut ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&self.keys.nodes)
            .query_async(&mut conn)
            .await?;
        ids.sort();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET").arg(self.keys.metrics_of(id)).arg(&[
                "updatedAt",
                "latest",
                "history",
            ]);
        }
        let rows: Vec<(Option<u64>, Option<String>, Option<String>)> =
            pipe.query_async(&mut conn).await?;
        let mut nodes = Vec::with_capacity(ids.len());
        let mut gone = Vec::new();
        for (id, row) in ids.into_iter().zip(rows) {
            match row {
                (Some(updated_at), Some(latest), history) => nodes.push(NodeReport {
                    latest: serde_json::from_str(&latest).unwrap_or_default(),
                    history: history
                        .and_then(|h| serde_json::from_str(&h).ok())
                        .unwrap_or_default(),
                    server_id: id,
                    updated_at,
                }),
                _ => gone.push(id),
            }
        }
        if !gone.is_empty() {
            // Their hashes expired: those nodes stopped reporting.
            let _: Result<(), _> = redis::cmd("SREM")
                .arg(&self.keys.nodes)
                .arg(&gone)
                .query_async(&mut conn)
                .await;
        }
        Ok(nodes)
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

    async fn connection(&self) -> Result<ConnectionManager, redis::RedisError> {
        self.redis
            .get_or_try_init(|| async {
                let client = redis::Client::open(self.redis_url.as_str())?;
                // A report waits at most 2 s: the next one comes an interval later.
                let config = manager_config().set_response_timeout(Some(Duration::from_secs(2)));
                ConnectionManager::new_with_config(client, config).await
            })
            .await
            .cloned()
    }

    fn remember(&self, report: Report) {
        let mut history = self.history.lock();
        if history.len() >= self.history_len {
            history.pop_front();
        }
        history.push_back(report);
    }

    /// Writes the report to Redis: the reference servers' fields, volley's, and the history.
    async fn publish(
        &self,
        report: &Report,
        totals: &StatsSnapshot,
        publish_avg_ms: f64,
    ) -> Result<(), redis::RedisError> {
        let latest = serde_json::to_string(report).unwrap_or_default();
        let history = serde_json::to_string(&self.own().history).unwrap_or_default();
        let mut conn = self.connection().await?;
        redis::pipe()
            .atomic()
            .cmd("HSET")
            .arg(&self.keys.metrics)
            .arg("serverId")
            .arg(&self.node_id)
            .arg("timestamp")
            .arg(report.timestamp)
            .arg("updatedAt")
            .arg(report.timestamp)
            .arg("messagesPublished")
            .arg(totals.messages_in() - totals.messages_in_broker)
            .arg("messagesReceived")
            .arg(totals.messages_in_broker)
            .arg("avgPublishLatencyMs")
            .arg(format!("{publish_avg_ms:.2}"))
            .arg("avgDeliveryLatencyMs")
            .arg(format!("{:.2}", report.delivery_p50_ms))
            .arg("errors")
            .arg(totals.protocol_errors)
            .arg("connections")
            .arg(report.connections)
            .arg("latest")
            .arg(latest)
            .arg("history")
            .arg(history)
            .ignore()
            .cmd("EXPIRE")
            .arg(&self.keys.metrics)
            .arg(REPORT_TTL_S)
            .ignore()
            .cmd("SADD")
            .arg(&self.keys.nodes)
            .arg(&self.node_id)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
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
pub async fn run(node: Arc<Node>, cluster: Arc<Cluster>, stop: CancellationToken) {
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
            cluster.remember(report.clone());
            if !cluster.redis_url.is_empty() {
                let (sum, count) = (publish.0 - prev.publish.0, publish.1 - prev.publish.1);
                let publish_avg_ms = if count == 0 {
                    0.0
                } else {
                    sum as f64 / count as f64 / 1000.0
                };
                let written = tokio::select! {
                    written = cluster.publish(&report, &totals, publish_avg_ms) => written,
                    _ = stop.cancelled() => return,
                };
                match written {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("cluster report written again");
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "cluster report not written; retrying every interval");
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
