//! Presence on Redis: who is online on any node, without ghosts and without `KEYS`.
//!
//! A user's presence is the reference servers' hash `presence:<userId>` (`serverId`,
//! `connectedAt`, `lastSeen`), plus a sorted set of the nodes the user has sockets on
//! (`presence:<userId>:nodes`, scored by when each entry expires), one index of online
//! users (`presence:online`, scored likewise) and one hash of their listing entries
//! (`volley:presence:info`: user -> `{"serverId","connectedAt"}`), so listing is two
//! commands whatever the number of users. A user's first node announces `connected` on
//! `presence:updates`, the last one to leave `disconnected`, each in one script.
//!
//! Every `presence.refresh_s` a node refreshes all its users in one pipeline, and its own
//! liveness (`volley:presence:nodes`, scored by when it expires) and its record
//! (`volley:presence:node:<serverId>`: user -> the rooms its sockets are in here, as the
//! node's hub knows them; written again whenever they change). A
//! node that dies stops refreshing: once its liveness expired, the first surviving node
//! to look claims it (one script: exactly one node does, cluster-wide), takes each of its
//! users off it as a live node would (`disconnected` when no other node has them), and
//! announces `user_left` in each room it had them in. A node shutting down says goodbye
//! for its users itself. A node that finds itself claimed while alive (Redis was out of
//! its reach for longer than `presence.ttl_s`) announces its users again.

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

/// Takes a user off a node: the node's entry in the user's node set goes; with no node
/// left the user is offline everywhere (hash, index and listing entry go, `disconnected`
/// is published), else the listing names a node the user is still on. Shared by the
/// offline and the reaping scripts. Returns 1 when the user went offline.
const GONE: &str = r#"
local function gone(hash, nodes, index, info, user, node, now, channel)
  redis.call('ZREM', nodes, node)
  redis.call('ZREMRANGEBYSCORE', nodes, '-inf', now)
  local left = redis.call('ZRANGE', nodes, 0, 0)
  if #left > 0 then
    redis.call('HSET', hash, 'serverId', left[1])
    local entry = redis.call('HGET', info, user)
    if entry then
      local ok, e = pcall(cjson.decode, entry)
      if ok and type(e) == 'table' then
        e.serverId = left[1]
        redis.call('HSET', info, user, cjson.encode(e))
      end
    end
    return 0
  end
  redis.call('DEL', hash, nodes)
  redis.call('ZREM', index, user)
  redis.call('HDEL', info, user)
  redis.call('PUBLISH', channel, cjson.encode({type = 'disconnected', userId = user, serverId = node}))
  return 1
end
"#;

/// KEYS: hash, nodes, index, info, live nodes, this node's record. ARGV: user, node, now
/// ms, ttl ms, updates channel.
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
local since = tonumber(redis.call('HGET', KEYS[1], 'connectedAt')) or tonumber(ARGV[3])
redis.call('HSET', KEYS[4], ARGV[1], cjson.encode({serverId = ARGV[2], connectedAt = since}))
redis.call('ZADD', KEYS[5], expires, ARGV[2])
redis.call('HSETNX', KEYS[6], ARGV[1], '[]')
redis.call('PEXPIRE', KEYS[6], 3 * tonumber(ARGV[4]))
if was == 0 then
  redis.call('PUBLISH', ARGV[5], cjson.encode({type = 'connected', userId = ARGV[1], serverId = ARGV[2]}))
end
return was
"#;

/// KEYS: hash, nodes, index, info, this node's record. ARGV: user, node, now ms, updates
/// channel.
static OFFLINE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{GONE}\nredis.call('HDEL', KEYS[5], ARGV[1])\n\
         return gone(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4])\n"
    )
});

/// Claims the nodes whose liveness expired (at most ARGV[5]), or with ARGV[6] that one
/// node whatever its liveness (a node claims its own previous life at start), and takes
/// their users off them. KEYS: live nodes, index, info. ARGV: now ms, the users' hash
/// prefix (`presence:`), the node record prefix, updates channel, most nodes, a node or
/// "". Returns, per claimed node, `{node, room, users in it, room, users in it, ...}`.
static REAP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{GONE}{}",
        r#"
local now = tonumber(ARGV[1])
local dead
if ARGV[6] ~= '' then
  dead = {}
  if redis.call('ZSCORE', KEYS[1], ARGV[6]) then dead[1] = ARGV[6] end
else
  dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[5]))
end
local out = {}
for _, node in ipairs(dead) do
  redis.call('ZREM', KEYS[1], node)
  local record = ARGV[3] .. node
  local rows = redis.call('HGETALL', record)
  local counts, order = {}, {}
  for i = 1, #rows, 2 do
    local user = rows[i]
    local hash = ARGV[2] .. user
    gone(hash, hash .. ':nodes', KEYS[2], KEYS[3], user, node, now, ARGV[4])
    local ok, rooms = pcall(cjson.decode, rows[i + 1])
    if ok and type(rooms) == 'table' then
      for _, room in ipairs(rooms) do
        if type(room) == 'string' then
          if not counts[room] then
            counts[room] = 0
            order[#order + 1] = room
          end
          counts[room] = counts[room] + 1
        end
      end
    end
  end
  redis.call('DEL', record)
  local entry = {node}
  for _, room in ipairs(order) do
    entry[#entry + 1] = room
    entry[#entry + 1] = counts[room]
  end
  out[#out + 1] = entry
end
return out
"#
    )
});

/// The same in a Redis Cluster (`SPUBLISH`: every name here shares the home tag).
static ONLINE_SHARDED: LazyLock<String> = LazyLock::new(|| super::sharded_script(ONLINE));
static OFFLINE_SHARDED: LazyLock<String> = LazyLock::new(|| super::sharded_script(&OFFLINE));
static REAP_SHARDED: LazyLock<String> = LazyLock::new(|| super::sharded_script(&REAP));

/// Most dead nodes one reaping call claims (the rest wait for the next refresh).
const REAP_BATCH: usize = 16;

/// A change in who is online on this node, in the order it happened.
pub(super) enum Change {
    Online(Arc<str>),
    Offline(Arc<str>),
    /// The rooms the user's sockets here are in changed (the node knows which).
    Rooms(Arc<str>),
}

/// This node's users, as this task has written them.
#[derive(Default)]
struct Here {
    users: HashSet<Arc<str>>,
    /// Users whose record (their rooms) must be written again.
    dirty: HashSet<Arc<str>>,
}

/// What one batch of changes sends to Redis.
#[derive(Default)]
struct Writes {
    /// Online (true) and offline (false) scripts, in order.
    scripts: Vec<(Arc<str>, bool)>,
}

impl Here {
    fn apply(&mut self, change: Change, writes: &mut Writes) {
        match change {
            Change::Online(user) => {
                self.users.insert(user.clone());
                self.dirty.insert(user.clone());
                writes.scripts.push((user, true));
            }
            Change::Offline(user) => {
                self.users.remove(&user);
                self.dirty.remove(&user);
                writes.scripts.push((user, false));
            }
            Change::Rooms(user) => {
                if self.users.contains(&user) {
                    self.dirty.insert(user);
                }
            }
        }
    }
}

/// A user's rooms on this node, as the record keeps them: a JSON list of room ids.
fn record(shared: &Shared, user: &str) -> Option<String> {
    let rooms = shared.sink()?.rooms_of(user);
    let rooms: Vec<&str> = rooms.iter().map(|r| &**r).collect();
    serde_json::to_string(&rooms).ok()
}

/// Applies this node's presence changes in order, refreshes its users and its liveness,
/// and (on the engine that serves the presence keys) announces the users of nodes that
/// died. At shutdown it says goodbye for its users.
pub(super) async fn run(
    shared: Arc<Shared>,
    mut conn: ConnectionManager,
    mut changes: mpsc::UnboundedReceiver<Change>,
    config: PresenceConfig,
    mut previous_life: bool,
    stop: CancellationToken,
) {
    let ttl_ms = config.ttl_s * 1000;
    let mut here = Here::default();
    // With `previous_life` (an engine that starts with the node, not one taking over
    // from a live engine): a node that comes back under the id of one that died (a
    // restart with the same server.node_id, before the dead one's liveness expired)
    // first announces what its previous life left behind; only before any user of its
    // own is online.
    let mut refresh = tokio::time::interval(Duration::from_secs(config.refresh_s));
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                // What the node's sockets did last (their leaves, their users going
                // offline), then a goodbye for whoever is still here.
                let mut writes = Writes::default();
                while let Ok(change) = changes.try_recv() {
                    here.apply(change, &mut writes);
                }
                write(&shared, &mut conn, &mut here, writes, ttl_ms).await;
                goodbye(&shared, &mut conn, &here).await;
                return;
            }
            change = changes.recv() => {
                let Some(change) = change else { return };
                previous_life = false;
                let mut writes = Writes::default();
                here.apply(change, &mut writes);
                while let Ok(change) = changes.try_recv() {
                    here.apply(change, &mut writes);
                }
                write(&shared, &mut conn, &mut here, writes, ttl_ms).await;
            }
            _ = refresh.tick() => {
                if std::mem::take(&mut previous_life) {
                    reap(&shared, &mut conn, Some(&shared.node_id)).await;
                }
                refresh_here(&shared, &mut conn, &mut here, ttl_ms).await;
                if shared.home.load(std::sync::atomic::Ordering::Relaxed) {
                    reap(&shared, &mut conn, None).await;
                }
            }
        }
    }
}

/// The node's record: `volley:presence:node:<id>`; it outlives the node's liveness, so
/// the node that announces its users gone can still read it.
fn record_ttl_ms(ttl_ms: u64) -> u64 {
    3 * ttl_ms
}

/// One pipeline: the online and offline scripts in order, then the records of users
/// whose rooms changed.
async fn write(
    shared: &Shared,
    conn: &mut ConnectionManager,
    here: &mut Here,
    writes: Writes,
    ttl_ms: u64,
) {
    let dirty: Vec<Arc<str>> = here.dirty.drain().collect();
    if writes.scripts.is_empty() && dirty.is_empty() {
        return;
    }
    let now = now_ms();
    let record_key = shared.keys.presence_node(&shared.node_id);
    let mut pipe = redis::pipe();
    for (user, online) in &writes.scripts {
        add_change(&mut pipe, shared, user, *online, now, ttl_ms);
    }
    let mut written = 0;
    for user in dirty.iter().filter(|u| here.users.contains(*u)) {
        if let Some(rooms) = record(shared, user) {
            pipe.hset(&record_key, &**user, rooms).ignore();
            written += 1;
        }
    }
    if written > 0 {
        pipe.cmd("PEXPIRE")
            .arg(&record_key)
            .arg(record_ttl_ms(ttl_ms))
            .ignore();
    }
    if let Err(e) = pipe.query_async::<()>(conn).await {
        // The next refresh puts an online user back and writes every record again; an
        // offline one expires.
        tracing::warn!(changes = writes.scripts.len(), error = %e, "presence changes not written to Redis");
        here.dirty.extend(dirty);
    }
}

/// One user's online or offline script.
fn add_change(
    pipe: &mut redis::Pipeline,
    shared: &Shared,
    user: &str,
    online: bool,
    now: u64,
    ttl_ms: u64,
) {
    let keys = &shared.keys;
    let cmd = pipe.cmd("EVAL");
    if online {
        cmd.arg(if shared.sharded() {
            ONLINE_SHARDED.as_str()
        } else {
            ONLINE
        })
        .arg(6)
        .arg(keys.presence(user))
        .arg(keys.presence_nodes(user))
        .arg(&keys.presence_index)
        .arg(&keys.presence_info)
        .arg(&keys.presence_nodes)
        .arg(keys.presence_node(&shared.node_id))
        .arg(user)
        .arg(&*shared.node_id)
        .arg(now)
        .arg(ttl_ms)
        .arg(&keys.presence_updates);
    } else {
        cmd.arg(if shared.sharded() {
            OFFLINE_SHARDED.as_str()
        } else {
            OFFLINE.as_str()
        })
        .arg(5)
        .arg(keys.presence(user))
        .arg(keys.presence_nodes(user))
        .arg(&keys.presence_index)
        .arg(&keys.presence_info)
        .arg(keys.presence_node(&shared.node_id))
        .arg(user)
        .arg(&*shared.node_id)
        .arg(now)
        .arg(&keys.presence_updates);
    }
    cmd.ignore();
}

/// Refreshes every user here, the node's liveness and its record. A node that finds its
/// liveness gone while it has users was announced dead (Redis was out of its reach for
/// longer than the TTL): its users are announced online again and its record rewritten.
async fn refresh_here(shared: &Shared, conn: &mut ConnectionManager, here: &mut Here, ttl_ms: u64) {
    let keys = &shared.keys;
    let now = now_ms();
    let expires = now + ttl_ms;
    let record_key = keys.presence_node(&shared.node_id);
    if !here.users.is_empty() {
        let listed: Result<Option<f64>, _> = redis::cmd("ZSCORE")
            .arg(&keys.presence_nodes)
            .arg(&*shared.node_id)
            .query_async(conn)
            .await;
        if let Ok(None) = listed {
            tracing::warn!(
                users = here.users.len(),
                "this node's presence had expired (announced gone); announcing its users again"
            );
            let writes = Writes {
                scripts: here.users.iter().map(|u| (u.clone(), true)).collect(),
            };
            here.dirty.extend(here.users.iter().cloned());
            write(shared, conn, here, writes, ttl_ms).await;
            return;
        }
    }
    // Records that could not be written before go again now.
    if !here.dirty.is_empty() {
        write(shared, conn, here, Writes::default(), ttl_ms).await;
    }
    // Six commands a user: the listing entry and the record change only with the user's
    // presence and rooms (written then, and all again when Redis lost them).
    let mut pipe = redis::pipe();
    for user in &here.users {
        let nodes = keys.presence_nodes(user);
        let hash = keys.presence(user);
        pipe.zadd(&nodes, &*shared.node_id, expires)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&nodes)
            .arg(ttl_ms)
            .ignore()
            .hset(&hash, "lastSeen", now)
            .ignore()
            .cmd("HSETNX")
            .arg(&hash)
            .arg("serverId")
            .arg(&*shared.node_id)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&hash)
            .arg(ttl_ms)
            .ignore()
            .zadd(&keys.presence_index, &**user, expires)
            .ignore();
    }
    // The node is alive, users or not: only a node that stops refreshing is announced
    // dead (a node that shuts down takes itself off).
    pipe.zadd(&keys.presence_nodes, &*shared.node_id, expires)
        .ignore()
        .cmd("PEXPIRE")
        .arg(&record_key)
        .arg(record_ttl_ms(ttl_ms))
        .ignore();
    if !here.users.is_empty() {
        pipe.cmd("PEXPIRE")
            .arg(&keys.presence_info)
            .arg(record_ttl_ms(ttl_ms))
            .ignore();
    }
    pipe.cmd("ZREMRANGEBYSCORE")
        .arg(&keys.presence_index)
        .arg("-inf")
        .arg(now)
        .ignore();
    if let Err(e) = pipe.query_async::<()>(conn).await {
        tracing::warn!(users = here.users.len(), error = %e, "presence refresh failed; retrying next interval");
    }
}

/// Claims the nodes whose liveness expired (or `node`, this node's previous life) and
/// announces their users gone: the script publishes `disconnected` for each user no
/// other node has; the rooms it returns get a `user_left` per user, from this node.
async fn reap(shared: &Shared, conn: &mut ConnectionManager, node: Option<&str>) {
    let keys = &shared.keys;
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(if shared.sharded() {
        REAP_SHARDED.as_str()
    } else {
        REAP.as_str()
    })
    .arg(3)
    .arg(&keys.presence_nodes)
    .arg(&keys.presence_index)
    .arg(&keys.presence_info)
    .arg(now_ms())
    .arg(keys.presence_prefix())
    .arg(keys.presence_node(""))
    .arg(&keys.presence_updates)
    .arg(REAP_BATCH)
    .arg(node.unwrap_or(""));
    let reaped: Vec<Vec<redis::Value>> = match cmd.query_async(conn).await {
        Ok(reaped) => reaped,
        Err(e) => {
            tracing::debug!(error = %e, "could not look for dead nodes' users");
            return;
        }
    };
    for entry in reaped {
        let mut fields = entry.into_iter();
        let Some(Ok(node)) = fields.next().map(redis::from_redis_value::<String>) else {
            continue;
        };
        let mut rooms = Vec::new();
        while let (Some(room), Some(count)) = (fields.next(), fields.next()) {
            if let (Ok(room), Ok(count)) = (
                redis::from_redis_value::<String>(room),
                redis::from_redis_value::<u64>(count),
            ) {
                rooms.push((room, count));
            }
        }
        if node == *shared.node_id {
            tracing::info!(rooms = rooms.len(), "this node's previous life left users behind (it died without a goodbye): they are announced gone");
        } else {
            tracing::info!(node = %node, rooms = rooms.len(), "a node's presence expired: its users are announced gone");
        }
        shared
            .counters
            .nodes_reaped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(sink) = shared.sink() {
            sink.users_gone(&node, &rooms);
        }
    }
}

/// At shutdown: every user still here goes offline as a live node would take them, and
/// the node leaves the live set, so nobody announces it dead later.
async fn goodbye(shared: &Shared, conn: &mut ConnectionManager, here: &Here) {
    let keys = &shared.keys;
    let now = now_ms();
    let mut pipe = redis::pipe();
    for user in &here.users {
        add_change(&mut pipe, shared, user, false, now, 0);
    }
    pipe.zrem(&keys.presence_nodes, &*shared.node_id)
        .ignore()
        .del(keys.presence_node(&shared.node_id))
        .ignore();
    if let Err(e) = pipe.query_async::<()>(conn).await {
        tracing::warn!(users = here.users.len(), error = %e, "could not say goodbye for this node's users; they expire after presence.ttl_s and are announced gone then");
    }
}

/// Who is online: the live part of the index (at most `max`), then their listing
/// entries, in two commands.
pub(super) async fn online_users(
    shared: &Shared,
    mut conn: ConnectionManager,
    max: usize,
) -> Result<OnlineUsers, PresenceError> {
    let unavailable = |e: redis::RedisError| PresenceError::Unavailable(e.to_string());
    let now = now_ms();
    let mut listed: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(&shared.keys.presence_index)
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
    let users = entries(shared, &mut conn, &listed).await?;
    Ok(OnlineUsers { users, truncated })
}

pub(super) async fn presence_of(
    shared: &Shared,
    mut conn: ConnectionManager,
    user: &str,
) -> Result<Option<UserPresence>, PresenceError> {
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg(&shared.keys.presence_index)
        .arg(user)
        .query_async(&mut conn)
        .await
        .map_err(|e| PresenceError::Unavailable(e.to_string()))?;
    let Some(expires) = score.filter(|expires| *expires > now_ms() as f64) else {
        return Ok(None);
    };
    Ok(entries(shared, &mut conn, &[(user.to_string(), expires)])
        .await?
        .pop())
}

/// The listing entries of users (with their index scores: when each expires), from the
/// info hash in one `HMGET`; a user without one (written by an older node) is read from
/// its reference hash instead.
async fn entries(
    shared: &Shared,
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
        .arg(&shared.keys.presence_info)
        .arg(&ids)
        .query_async(conn)
        .await
        .map_err(unavailable)?;
    let ttl_ms = shared.presence_ttl_ms;
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
            pipe.cmd("HMGET").arg(shared.keys.presence(id)).arg(&[
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
