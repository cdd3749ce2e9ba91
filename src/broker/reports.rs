//! The node-report side of the broker seam: where each node's report (the `reports`
//! feature writes one every `metrics.report_s`) is kept so every node can read every
//! node's, for `/api/cluster` and the dashboard. On Redis, in every topology, that is
//! the home engine's server (the one that also keeps presence); an engine without a
//! shared store keeps none, and a node then shows only itself.

use super::BoxFuture;

/// One node's stored report: its id and the asked-for fields (`None` where missing).
pub type StoredReport = (String, Vec<Option<String>>);

/// Why reports could not be written or read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReportError {
    #[error("node reports are not available: {0}")]
    Unavailable(String),
}

pub trait Reports: Send + Sync {
    /// Whether this engine keeps reports where other nodes read them.
    fn keeps_reports(&self) -> bool {
        false
    }

    /// Writes this node's report (`fields`, replacing those it had) for `ttl_s` seconds,
    /// and lists the node among those that report.
    fn write_report(
        &self,
        fields: Vec<(&'static str, String)>,
        ttl_s: u64,
    ) -> BoxFuture<'_, Result<(), ReportError>> {
        let _ = (fields, ttl_s);
        Box::pin(std::future::ready(Err(ReportError::Unavailable(
            "this engine keeps no reports".into(),
        ))))
    }

    /// Every reporting node's `fields`, sorted by node id. Nodes whose report expired
    /// are forgotten on the way.
    fn read_reports<'a>(
        &'a self,
        fields: &'a [&'static str],
    ) -> BoxFuture<'a, Result<Vec<StoredReport>, ReportError>> {
        let _ = fields;
        Box::pin(std::future::ready(Ok(Vec::new())))
    }
}
