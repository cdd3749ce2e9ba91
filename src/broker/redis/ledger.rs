//! The ledger on Redis: per subject, the set of nodes that hold it
//! (`volley:ledger:<room:R | user:U>`), per node the set of what it holds
//! (`volley:ledger:node:<serverId>`), and the nodes' liveness (`volley:ledger:nodes`,
//! scored by when each expires), and per subject its last word (`said:<subject>`: which
//! node made it held, or held by none), so a call whose answer was lost (Redis stalled
//! past the wait) and is made again gets the same answer. Each change is one script, so
//! "the first node" and "the last node" are decided once; a dead node's holdings are
//! taken over by the first node whose renewal finds it expired. In a Redis Cluster every name carries the home
//! tag, and the routed set asks the home engine.

use std::time::Duration;

use super::RedisBroker;
use crate::broker::{BoxFuture, Ledger, LedgerError, Own, Reaped, Subject};
use crate::protocol::now_ms;

/// How long a ledger call may take before it counts as failed (and is tried again).
const WAIT: Duration = Duration::from_secs(5);
/// Most dead nodes one renewal takes over (the rest wait for the next).
const REAP_BATCH: usize = 16;

/// KEYS: the subject's node set, this node's set, the subject's last word. ARGV: node
/// id, subject key. 1 when this node made the subject held: now, or by an earlier call
/// whose answer was lost (a retry asks again; the last word remembers).
const HOLD: &str = r"
local added = redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
if added == 1 and redis.call('SCARD', KEYS[1]) == 1 then
  redis.call('SET', KEYS[3], 'held:' .. ARGV[1], 'EX', 86400)
  return 1
end
if added == 0 and redis.call('GET', KEYS[3]) == 'held:' .. ARGV[1] then return 1 end
return 0
";

/// KEYS and ARGV as `HOLD`. 1 when this node's release left the subject held by none
/// (now, or by an earlier call whose answer was lost).
const RELEASE: &str = r"
local removed = redis.call('SREM', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if removed == 1 then
  redis.call('SET', KEYS[3], 'gone:' .. ARGV[1], 'EX', 86400)
  return 1
end
if redis.call('GET', KEYS[3]) == 'gone:' .. ARGV[1] then return 1 end
return 0
";

/// KEYS: the liveness set. ARGV: node id, now (ms), this node's expiry (ms), the
/// subject key prefix, the node set prefix, the batch. Returns {own, gone...}: own is 0
/// (kept), 1 (taken over: a mark the taker left, for a day) or 2 (missing).
const REAP: &str = r"
local lost = 0
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  lost = 2
  if redis.call('DEL', ARGV[4] .. 'taken:' .. ARGV[1]) == 1 then lost = 1 end
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[6]))
local out = {lost}
for _, node in ipairs(dead) do
  local held_key = ARGV[5] .. node
  for _, subject in ipairs(redis.call('SMEMBERS', held_key)) do
    local set = ARGV[4] .. subject
    if redis.call('SREM', set, node) == 1 and redis.call('EXISTS', set) == 0 then
      redis.call('SET', ARGV[4] .. 'said:' .. subject, 'gone:' .. ARGV[1], 'EX', 86400)
      out[#out + 1] = subject
    end
  end
  redis.call('DEL', held_key)
  redis.call('ZREM', KEYS[1], node)
  redis.call('SET', ARGV[4] .. 'taken:' .. node, '1', 'EX', 86400)
end
return out
";

fn unavailable(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Unavailable(e.to_string())
}

impl RedisBroker {
    async fn ledger_call<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, LedgerError> {
        let mut conn = self.core.reader_for(LedgerError::Unavailable)?;
        tokio::time::timeout(WAIT, cmd.query_async::<T>(&mut conn))
            .await
            .map_err(|_| unavailable("Redis did not answer in time"))?
            .map_err(unavailable)
    }

    fn change(&self, script: &str, subject: &Subject) -> redis::Cmd {
        let keys = &self.core.keys;
        let key = subject.key();
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script)
            .arg(3)
            .arg(keys.ledger(&key))
            .arg(keys.ledger_node(&self.core.node_id))
            .arg(keys.ledger(&format!("said:{key}")))
            .arg(&*self.core.node_id)
            .arg(key);
        cmd
    }
}

impl Ledger for RedisBroker {
    fn hold<'a>(&'a self, subject: &'a Subject) -> BoxFuture<'a, Result<bool, LedgerError>> {
        Box::pin(
            async move { Ok(self.ledger_call::<i64>(&self.change(HOLD, subject)).await? == 1) },
        )
    }

    fn release<'a>(&'a self, subject: &'a Subject) -> BoxFuture<'a, Result<bool, LedgerError>> {
        Box::pin(async move {
            Ok(self
                .ledger_call::<i64>(&self.change(RELEASE, subject))
                .await?
                == 1)
        })
    }

    fn reap(&self, ttl: Duration) -> BoxFuture<'_, Result<Reaped, LedgerError>> {
        Box::pin(async move {
            let keys = &self.core.keys;
            let now = now_ms();
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(REAP)
                .arg(1)
                .arg(&keys.ledger_nodes)
                .arg(&*self.core.node_id)
                .arg(now)
                .arg(now + ttl.as_millis() as u64)
                .arg(keys.ledger(""))
                .arg(keys.ledger_node(""))
                .arg(REAP_BATCH);
            let reply: Vec<redis::Value> = self.ledger_call(&cmd).await?;
            let mut reply = reply.into_iter();
            let own = match reply.next() {
                Some(redis::Value::Int(1)) => Own::TakenOver,
                Some(redis::Value::Int(2)) => Own::Missing,
                _ => Own::Kept,
            };
            let gone = reply
                .filter_map(|v| redis::from_redis_value::<String>(v).ok())
                .filter_map(|key| Subject::from_key(&key))
                .collect();
            Ok(Reaped { gone, own })
        })
    }
}
