//! Presence on Redis: who is online on any node, without ghosts and without `KEYS`.
//!
//! A user's presence is the reference servers' hash `presence:<userId>` (`serverId`,
//! `connectedAt`, `lastSeen`), plus a sorted set of the nodes the user has sockets on
//! (`presence:<userId>:nodes`, scored by when each entry expires) and one index of online
//! users (`presence:online`, scored likewise). A user's first node announces `connected`
//! on `presence:updates`, the last one to leave `disconnected`, each in one script.
//! Every `presence.refresh_s` a node refreshes all its users in one pipeline; a node that
//! dies stops refreshing, and its users expire from the index after `presence.ttl_s`.
//! Listing reads the index by score (the live ones), then the hashes, in two round trips.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::broker::{OnlineUsers, PresenceError, PresenceEvent, UserPresence};
use crate::config::PresenceConfig;
use crate::protocol::now_ms;

/// KEYS: hash, nodes, index. ARGV: user, node, now ms, ttl ms, updates channel.
const ONLINE: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
local was = redis.call('ZCARD', KEYS[2])
local expires = tonumber(ARGV[3]) + tonumber(ARGV[4])
redis.call('ZADD', KEYS[2], expires, ARGV[2])
if was == 0 then redis.call('HSET', KEYS[1], 'connectedAt', ARGV[3]) end
redis.call('HSET', KEYS[1], 'serverId', ARGV[2], 'lastSeen', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[3], expires, ARGV[1])
if was == 0 then
  redis.call('PUBLISH', ARGV[5], cjson.encode({type = 'connected', userId = ARGV[1], serverId = ARGV[2]}))
end
return was
"#;

/// KEYS: hash, nodes, index. ARGV: user, node, now ms, updates channel.
const OFFLINE: &str = r#"
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
if redis.call('ZCARD', KEYS[2]) > 0 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('PUBLISH', ARGV[4], cjson.encode({type = 'disconnected', userId = ARGV[1], serverId = ARGV[2]}))
return 1
"#;

/// The same in a Redis Cluster.
static ONLINE_SHARDED: LazyLock<String> = LazyLock::new(|| super::sharded_script(ONLINE));
static OFFLINE_SHARDED: LazyLock<String> = LazyLock::new(|| super::sharded_script(OFFLINE));

pub(super) enum Change {
    Online(Arc<str>),
    Offline(Arc<str>),
}

/// Applies this node's presence changes in order and refreshes its users.
pub(super) async fn run(
    shared: Arc<Shared>,
    mut conn: ConnectionManager,
    mut changes: mpsc::UnboundedReceiver<Change>,
    config: PresenceConfig,
    stop: CancellationToken,
) {
    let ttl_ms = config.ttl_s * 1000;
    let mut users: HashSet<Arc<str>> = HashSet::new();
    let mut refresh = tokio::time::interval(Duration::from_secs(config.refresh_s));
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            change = changes.recv() => {
                let Some(change) = change else { return };
                let (user, online) = match change {
                    Change::Online(user) => (user, true),
                    Change::Offline(user) => (user, false),
                };
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(match (online, shared.sharded()) {
                    (true, false) => ONLINE,
                    (false, false) => OFFLINE,
                    (true, true) => ONLINE_SHARDED.as_str(),
                    (false, true) => OFFLINE_SHARDED.as_str(),
                })
                    .arg(3)
                    .arg(shared.keys.presence(&user))
                    .arg(shared.keys.presence_nodes(&user))
                    .arg(&shared.keys.presence_index)
                    .arg(&*user)
                    .arg(&*shared.node_id)
                    .arg(now_ms());
                if online {
                    cmd.arg(ttl_ms);
                    users.insert(user.clone());
                } else {
                    users.remove(&user);
                }
                cmd.arg(&shared.keys.presence_updates);
                if let Err(e) = cmd.query_async::<i64>(&mut conn).await {
                    // The next refresh puts an online user back; an offline one expires.
                    tracing::warn!(user = %user, error = %e, "presence change not written to Redis");
                }
            }
            _ = refresh.tick() => {
                if users.is_empty() {
                    continue;
                }
                let now = now_ms();
                let expires = now + ttl_ms;
                let mut pipe = redis::pipe();
                for user in &users {
                    let nodes = shared.keys.presence_nodes(user);
                    let hash = shared.keys.presence(user);
                    pipe.zadd(&nodes, &*shared.node_id, expires).ignore()
                        .cmd("PEXPIRE").arg(&nodes).arg(ttl_ms).ignore()
                        .hset(&hash, "lastSeen", now).ignore()
                        .cmd("HSETNX").arg(&hash).arg("serverId").arg(&*shared.node_id).ignore()
                        .cmd("PEXPIRE").arg(&hash).arg(ttl_ms).ignore()
                        .zadd(&shared.keys.presence_index, &**user, expires).ignore();
                }
                pipe.cmd("ZREMRANGEBYSCORE").arg(&shared.keys.presence_index).arg("-inf").arg(now).ignore();
                if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                    tracing::warn!(users = users.len(), error = %e, "presence refresh failed; retrying next interval");
                }
            }
        }
    }
}

/// Who is online: the live part of the index, then their hashes.
pub(super) async fn online_users(
    shared: &Shared,
    mut conn: ConnectionManager,
    max: usize,
) -> Result<OnlineUsers, PresenceError> {
    let unavailable = |e: redis::RedisError| PresenceError::Unavailable(e.to_string());
    let now = now_ms();
    let mut ids: Vec<String> = redis::cmd("ZRANGE")
        .arg(&shared.keys.presence_index)
        .arg(now)
        .arg("+inf")
        .arg("BYSCORE")
        .arg("LIMIT")
        .arg(0)
        .arg(max + 1)
        .query_async(&mut conn)
        .await
        .map_err(unavailable)?;
    let truncated = ids.len() > max;
    ids.truncate(max);
    ids.sort();
    let users = read_hashes(shared, &mut conn, &ids).await?;
    Ok(OnlineUsers { users, truncated })
}

pub(super) async fn presence_of(
    shared: &Shared,
    mut conn: ConnectionManager,
    user: &str,
) -> Result<Option<UserPresence>, PresenceError> {
    let score: Option<u64> = redis::cmd("ZSCORE")
        .arg(&shared.keys.presence_index)
        .arg(user)
        .query_async(&mut conn)
        .await
        .map_err(|e| PresenceError::Unavailable(e.to_string()))?;
    if score.is_none_or(|expires| expires <= now_ms()) {
        return Ok(None);
    }
    Ok(read_hashes(shared, &mut conn, &[user.to_string()])
        .await?
        .pop())
}

async fn read_hashes(
    shared: &Shared,
    conn: &mut ConnectionManager,
    ids: &[String],
) -> Result<Vec<UserPresence>, PresenceError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.cmd("HMGET").arg(shared.keys.presence(id)).arg(&[
            "serverId",
            "connectedAt",
            "lastSeen",
        ]);
    }
    let rows: Vec<(Option<String>, Option<u64>, Option<u64>)> = pipe
        .query_async(conn)
        .await
        .map_err(|e| PresenceError::Unavailable(e.to_string()))?;
    Ok(ids
        .iter()
        .zip(rows)
        .filter_map(|(id, (server, connected, seen))| {
            Some(UserPresence {
                user_id: id.clone(),
                server_id: server?,
                connected_at: connected.unwrap_or(0),
                last_seen: seen.unwrap_or(0),
            })
        })
        .collect())
}

/// A message on `presence:updates`.
pub(super) fn event(message: &[u8]) -> Option<PresenceEvent> {
    #[derive(serde::Deserialize)]
    struct Update {
        #[serde(rename = "type")]
        kind: String,
        #[serde(rename = "userId")]
        user_id: String,
        #[serde(rename = "serverId")]
        server_id: String,
    }
    let update: Update = serde_json::from_slice(message).ok()?;
    Some(PresenceEvent {
        connected: match update.kind.as_str() {
            "connected" => true,
            "disconnected" => false,
            _ => return None,
        },
        user_id: Arc::from(update.user_id),
        server_id: Arc::from(update.server_id),
    })
}
