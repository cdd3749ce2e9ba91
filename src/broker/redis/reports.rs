//! Node reports on Redis: each node's hash `metrics:<serverId>` (with a TTL) and the set
//! `volley:nodes` of the ids that report. Reads go through the set, never `KEYS`; ids
//! whose hash expired leave the set as they are found. In a Redis Cluster both names
//! carry the home tag, and the routed set asks the home engine.

use super::RedisBroker;
use crate::broker::{BoxFuture, ReportError, Reports, StoredReport};

fn unavailable(e: redis::RedisError) -> ReportError {
    ReportError::Unavailable(e.to_string())
}

impl Reports for RedisBroker {
    fn keeps_reports(&self) -> bool {
        true
    }

    fn write_report(
        &self,
        fields: Vec<(&'static str, String)>,
        ttl_s: u64,
    ) -> BoxFuture<'_, Result<(), ReportError>> {
        Box::pin(async move {
            let keys = &self.core.keys;
            let mut conn = self.core.reader_for(ReportError::Unavailable)?;
            redis::pipe()
                .atomic()
                .hset_multiple(&keys.metrics, &fields)
                .ignore()
                .expire(&keys.metrics, i64::try_from(ttl_s).unwrap_or(i64::MAX))
                .ignore()
                .sadd(&keys.nodes, &*self.core.node_id)
                .ignore()
                .query_async::<()>(&mut conn)
                .await
                .map_err(unavailable)
        })
    }

    fn read_reports<'a>(
        &'a self,
        fields: &'a [&'static str],
    ) -> BoxFuture<'a, Result<Vec<StoredReport>, ReportError>> {
        Box::pin(async move {
            let keys = &self.core.keys;
            let mut conn = self.core.reader_for(ReportError::Unavailable)?;
            let mut ids: Vec<String> = redis::cmd("SMEMBERS")
                .arg(&keys.nodes)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            ids.sort();
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HMGET").arg(keys.metrics_of(id)).arg(fields);
            }
            let rows: Vec<Vec<Option<String>>> =
                pipe.query_async(&mut conn).await.map_err(unavailable)?;
            let mut reports = Vec::with_capacity(ids.len());
            let mut gone = Vec::new();
            for (id, row) in ids.into_iter().zip(rows) {
                if row.iter().all(Option::is_none) {
                    gone.push(id);
                } else {
                    reports.push((id, row));
                }
            }
            if !gone.is_empty() {
                // Their hashes expired: those nodes stopped reporting.
                let _: Result<(), _> = redis::cmd("SREM")
                    .arg(&keys.nodes)
                    .arg(&gone)
                    .query_async(&mut conn)
                    .await;
            }
            Ok(reports)
        })
    }
}
