//! The presence scripts: each presence change runs in Redis as one atomic step.

use std::sync::LazyLock;

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
pub(super) const ONLINE: &str = r#"
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
pub(super) static OFFLINE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{GONE}\nredis.call('HDEL', KEYS[5], ARGV[1])\n\
         return gone(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4])\n"
    )
});

/// Claims the nodes whose liveness expired (at most `ARGV[5]`), or with `ARGV[6]` that one
/// node whatever its liveness (a node claims its own previous life at start), and takes
/// their users off them. KEYS: live nodes, index, info. ARGV: now ms, the users' hash
/// prefix (`presence:`), the node record prefix, updates channel, most nodes, a node or
/// "". Returns, per claimed node, `{node, room, users in it, room, users in it, ...}`.
pub(super) static REAP: LazyLock<String> = LazyLock::new(|| {
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
pub(super) static ONLINE_SPUBLISH: LazyLock<String> =
    LazyLock::new(|| super::super::start::spublish_script(ONLINE));
pub(super) static OFFLINE_SPUBLISH: LazyLock<String> =
    LazyLock::new(|| super::super::start::spublish_script(&OFFLINE));
pub(super) static REAP_SPUBLISH: LazyLock<String> =
    LazyLock::new(|| super::super::start::spublish_script(&REAP));
