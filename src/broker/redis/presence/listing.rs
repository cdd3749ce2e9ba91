//! Reading who is online: the live part of the index, then one `HMGET` of the listing
//! entries.

use redis::aio::ConnectionManager;

use super::super::Core;
use crate::broker::{OnlineUsers, PresenceError, UserPresence};
use crate::protocol::now_ms;

/// Who is online: the live part of the index (at most `max`), then their listing
/// entries, in two commands.
pub(in crate::broker::redis) async fn online_users(
    core: &Core,
    mut conn: ConnectionManager,
    max: usize,
) -> Result<OnlineUsers, PresenceError> {
    let unavailable = |e: redis::RedisError| PresenceError::Unavailable(e.to_string());
    let now = now_ms();
    let mut listed: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(&core.keys.presence_index)
        .arg(now)
        .arg("+inf")
        .arg("BYSCORE")
        .arg("LIMIT")
        .arg(0)
        .arg(max + 1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await
        .map_err(unavailable)?;
    let truncated = listed.len() > max;
    listed.truncate(max);
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    let users = entries(core, &mut conn, &listed).await?;
    Ok(OnlineUsers { users, truncated })
}

pub(in crate::broker::redis) async fn presence_of(
    core: &Core,
    mut conn: ConnectionManager,
    user: &str,
) -> Result<Option<UserPresence>, PresenceError> {
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg(&core.keys.presence_index)
        .arg(user)
        .query_async(&mut conn)
        .await
        .map_err(|e| PresenceError::Unavailable(e.to_string()))?;
    let Some(expires) = score.filter(|expires| *expires > now_ms() as f64) else {
        return Ok(None);
    };
    Ok(entries(core, &mut conn, &[(user.to_string(), expires)])
        .await?
        .pop())
}

/// The listing entries of users (with their index scores: when each expires), from the
/// info hash in one `HMGET`; a user without one (written by an older node) is read from
/// its reference hash instead.
async fn entries(
    core: &Core,
    conn: &mut ConnectionManager,
    listed: &[(String, f64)],
) -> Result<Vec<UserPresence>, PresenceError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Entry {
        server_id: String,
        #[serde(default)]
        connected_at: f64,
    }
    if listed.is_empty() {
        return Ok(Vec::new());
    }
    let unavailable = |e: redis::RedisError| PresenceError::Unavailable(e.to_string());
    let ids: Vec<&str> = listed.iter().map(|(id, _)| id.as_str()).collect();
    let infos: Vec<Option<String>> = redis::cmd("HMGET")
        .arg(&core.keys.presence_info)
        .arg(&ids)
        .query_async(conn)
        .await
        .map_err(unavailable)?;
    let ttl_ms = core.presence_ttl_ms;
    let mut users = Vec::with_capacity(listed.len());
    let mut missing = Vec::new();
    for ((id, expires), info) in listed.iter().zip(infos) {
        let last_seen = (*expires as u64).saturating_sub(ttl_ms);
        match info.and_then(|i| serde_json::from_str::<Entry>(&i).ok()) {
            Some(entry) => users.push(UserPresence {
                user_id: id.clone(),
                server_id: entry.server_id,
                connected_at: entry.connected_at as u64,
                last_seen,
            }),
            None => missing.push(id.clone()),
        }
    }
    if !missing.is_empty() {
        let mut pipe = redis::pipe();
        for id in &missing {
            pipe.cmd("HMGET").arg(core.keys.presence(id)).arg(&[
                "serverId",
                "connectedAt",
                "lastSeen",
            ]);
        }
        let rows: Vec<(Option<String>, Option<u64>, Option<u64>)> =
            pipe.query_async(conn).await.map_err(unavailable)?;
        users.extend(missing.into_iter().zip(rows).filter_map(
            |(id, (server, connected, seen))| {
                Some(UserPresence {
                    user_id: id,
                    server_id: server?,
                    connected_at: connected.unwrap_or(0),
                    last_seen: seen.unwrap_or(0),
                })
            },
        ));
        users.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    }
    Ok(users)
}
