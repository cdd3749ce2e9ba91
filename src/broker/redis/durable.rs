//! Durable rooms on Redis: a stream per room (`stream:<roomId>`, field `data` = the
//! message frame, entry id `<offset>-1`) and its position hash beside it (`offset`,
//! `epoch`).
//!
//! Publishing is one script call per room per window, in the window's pipeline: it gives
//! each message the room's next offset, appends it to the stream (trimmed to the class's
//! size, expiring after its TTL) and publishes it, in one atomic step, so stream order and
//! delivery order agree on every node. A history read is one script call too.
//!
//! Receiving: every node tracks the last offset it delivered per durable room. A message
//! whose offset is not the next one holds the room's later messages while the missing
//! range is read from the stream and delivered first; a periodic position check (the
//! stream's offset against what was delivered) finds a silent loss, as after a pub/sub
//! reconnect, and repairs it the same way. Offset 1 after a higher one is a new epoch.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::LazyLock;
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::ConnectionManager;

use super::Shared;
use crate::broker::{Envelope, History, HistoryError, Kind, Target};
use crate::config::Durability;
use crate::protocol::inbound::Replay;
use crate::protocol::{outbound, Encoded};

/// KEYS: stream, position. ARGV: channel, maxlen, ttl_s, envelope head
/// (`{"serverId":S,`), `batch` or `single` (with `-check`: skip frames already in the
/// stream), then the message frames. Returns the receivers of the (last) PUBLISH.
///
/// The check is for frames sent before in a pipeline whose answer was lost (a master
/// killed, a connection cut): those the stream has were appended and published then,
/// the others never ran. Sent again with the check, none is lost and none doubled.
pub(super) const PUBLISH: &str = r#"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  local t = redis.call('TIME')
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', t[1] .. '-' .. t[2], 'offset', 0)
end
local single = ARGV[5] == 'single' or ARGV[5] == 'single-check'
local seen = {}
if string.sub(ARGV[5], -6) == '-check' then
  for _, row in ipairs(redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 2000)) do
    local body = string.match(row[2][2], '^(.*),"offset":%d+}$')
    if body then seen[body] = (seen[body] or 0) + 1 end
  end
end
local offset = tonumber(redis.call('HGET', KEYS[2], 'offset'))
local frames = {}
local receivers = 0
for i = 6, #ARGV do
  local body = string.sub(ARGV[i], 1, -2)
  if (seen[body] or 0) > 0 then
    seen[body] = seen[body] - 1
  else
    offset = offset + 1
    local frame = body .. ',"offset":' .. offset .. '}'
    redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], offset .. '-1', 'data', frame)
    if single then
      receivers = redis.call('PUBLISH', ARGV[1], ARGV[4] .. '"payload":' .. frame .. '}')
    else
      frames[#frames + 1] = frame
    end
  end
end
redis.call('HSET', KEYS[2], 'offset', offset)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
if #frames == 1 then
  receivers = redis.call('PUBLISH', ARGV[1], ARGV[4] .. '"payload":' .. frames[1] .. '}')
elseif #frames > 1 then
  receivers = redis.call('PUBLISH', ARGV[1], ARGV[4] .. '"batch":[' .. table.concat(frames, ',') .. ']}')
end
return receivers
"#;

/// KEYS: stream, position. ARGV: ttl_s, `last` or `since`, N or the offset, the epoch
/// (for `since`), the cap. Returns {epoch, recovered ("" / "1" / "0"), {frames...}}.
const HISTORY: &str = r#"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  local t = redis.call('TIME')
  epoch = t[1] .. '-' .. t[2]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'offset', 0)
  redis.call('EXPIRE', KEYS[2], ARGV[1])
end
local last = tonumber(redis.call('HGET', KEYS[2], 'offset'))
local cap = tonumber(ARGV[5])
local function latest(n)
  local out = {}
  if n <= 0 then return out end
  local rows = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', n)
  for i = #rows, 1, -1 do out[#out + 1] = rows[i][2][2] end
  return out
end
if ARGV[2] == 'last' then
  return {epoch, '', latest(math.min(tonumber(ARGV[3]), cap))}
end
local o = tonumber(ARGV[3])
if ARGV[4] == epoch and o <= last then
  if o == last then return {epoch, '1', {}} end
  local first = (o + 1) .. '-1'
  local rows = redis.call('XRANGE', KEYS[1], first, '+')
  if #rows > 0 and rows[1][1] == first then
    local out = {}
    for i = 1, #rows do out[#out + 1] = rows[i][2][2] end
    return {epoch, '1', out}
  end
end
return {epoch, '0', latest(cap)}
"#;

/// The range read while a room's later messages wait.
const REPAIR: &str = r#"
local rows = redis.call('XRANGE', KEYS[1], ARGV[1] .. '-1', ARGV[2] .. '-1')
local out = {}
for i = 1, #rows do out[#out + 1] = rows[i][2][2] end
return out
"#;

/// The same in a Redis Cluster.
static PUBLISH_SHARDED: LazyLock<String> = LazyLock::new(|| super::sharded_script(PUBLISH));

/// How long a history read or a repair may take.
const READ_WAIT: Duration = Duration::from_secs(5);

/// How a window's durable messages are appended.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mode {
    /// One `PUBLISH` per message (`redis.envelope = "single"`), else one per window.
    pub single: bool,
    /// Skip messages the stream already has: they were sent before, answer lost.
    pub check: bool,
}

/// Adds one room's durable messages of a window to the pipeline: one script call
/// (`check`: skip those the stream already has, see `PUBLISH`).
pub(super) fn add_publish(
    pipe: &mut redis::Pipeline,
    shared: &Shared,
    room: &str,
    durability: Durability,
    head: &[u8],
    mode: Mode,
    frames: impl Iterator<Item = Vec<u8>>,
) {
    let cmd = pipe
        .cmd("EVAL")
        .arg(if shared.sharded() {
            PUBLISH_SHARDED.as_str()
        } else {
            PUBLISH
        })
        .arg(2)
        .arg(shared.keys.stream(room))
        .arg(shared.keys.position(room))
        .arg(shared.keys.room(room))
        .arg(durability.history_size)
        .arg(durability.ttl.as_secs().max(1))
        .arg(head)
        .arg(match (mode.single, mode.check) {
            (true, false) => "single",
            (false, false) => "batch",
            (true, true) => "single-check",
            (false, true) => "batch-check",
        });
    for frame in frames {
        cmd.arg(frame);
    }
}

/// Reads a durable room's history as a join asks for it.
pub(super) async fn history(
    shared: &Shared,
    mut conn: ConnectionManager,
    room: &str,
    replay: &Replay,
    durability: Durability,
) -> Result<History, HistoryError> {
    let (mode, position, epoch) = match replay {
        Replay::Last(n) => ("last", *n as u64, ""),
        Replay::Since { offset, epoch } => ("since", *offset, epoch.as_str()),
    };
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(HISTORY)
        .arg(2)
        .arg(shared.keys.stream(room))
        .arg(shared.keys.position(room))
        .arg(durability.ttl.as_secs().max(1))
        .arg(mode)
        .arg(position)
        .arg(epoch)
        .arg(durability.history_size);
    let read = cmd.query_async::<(String, String, Vec<Vec<u8>>)>(&mut conn);
    let (epoch, recovered, frames) = tokio::time::timeout(READ_WAIT, read)
        .await
        .map_err(|_| HistoryError::Unavailable("Redis did not answer in time".into()))?
        .map_err(|e| HistoryError::Unavailable(e.to_string()))?;
    Ok(History {
        epoch: Arc::from(epoch),
        messages: frames.iter().map(|f| Encoded::from_json(f)).collect(),
        recovered: match recovered.as_str() {
            "1" => Some(true),
            "0" => Some(false),
            _ => None,
        },
    })
}

/// Per durable room: the last offset delivered here, and messages held during a repair.
#[derive(Default)]
pub(super) struct Positions {
    rooms: Mutex<HashMap<Arc<str>, Position>>,
}

struct Position {
    last: u64,
    /// Set while a repair reads the stream: later messages wait here, in order.
    held: Option<Vec<(u64, Encoded, Arc<str>)>>,
    /// The last position check found the stream ahead: (what was delivered then, the
    /// stream's offset then). Still there at the next check, it was lost, not in flight.
    behind: Option<(u64, u64)>,
}

impl Positions {
    /// A durable message from pub/sub: delivered if it is the next one, held behind a
    /// repair if one runs or this one shows a gap, dropped if it was delivered already.
    pub(super) fn receive(
        &self,
        shared: &Arc<Shared>,
        room: &Arc<str>,
        origin: &Arc<str>,
        offset: u64,
        message: Encoded,
    ) {
        let mut rooms = self.rooms.lock();
        let position = rooms.entry(room.clone()).or_insert(Position {
            last: offset - 1,
            held: None,
            behind: None,
        });
        if let Some(held) = position.held.as_mut() {
            held.push((offset, message, origin.clone()));
            return;
        }
        if offset == position.last + 1 || (offset == 1 && position.last > 1) {
            // The next one, or the first of a new epoch.
            position.last = offset;
            deliver(shared, room, origin, message);
        } else if offset > position.last + 1 {
            let from = position.last + 1;
            position.held = Some(vec![(offset, message, origin.clone())]);
            spawn_repair(shared.clone(), room.clone(), from, offset - 1);
        }
        // Otherwise a duplicate of what was delivered: dropped.
    }

    /// Rooms with their last delivered offsets, for the periodic position check.
    pub(super) fn snapshot(&self) -> Vec<(Arc<str>, u64)> {
        self.rooms
            .lock()
            .iter()
            .filter(|(_, p)| p.held.is_none())
            .map(|(room, p)| (room.clone(), p.last))
            .collect()
    }

    /// The last offset delivered here of a durable room.
    pub(super) fn last(&self, room: &str) -> Option<u64> {
        self.rooms.lock().get(room).map(|p| p.last)
    }

    /// Continues a room delivered up to `last` elsewhere (another engine), so the first
    /// message here after a gap is repaired instead of taken as the start.
    pub(super) fn resume(&self, room: &Arc<str>, last: u64) {
        self.rooms.lock().entry(room.clone()).or_insert(Position {
            last,
            held: None,
            behind: None,
        });
    }

    /// Forgets a room this node no longer subscribes to.
    pub(super) fn forget(&self, room: &str) {
        self.rooms.lock().remove(room);
    }

    /// A position check read the stream's offset `top` while `last` was delivered here.
    /// Messages just published may still be on their way, so a room is repaired only
    /// when it is still behind, not having moved, at the next check: then up to the
    /// offset the earlier check saw.
    pub(super) fn behind(&self, shared: &Arc<Shared>, room: &Arc<str>, last: u64, top: u64) {
        let mut rooms = self.rooms.lock();
        let Some(position) = rooms.get_mut(room) else {
            return;
        };
        if position.held.is_some() || position.last != last || top <= last {
            position.behind = None;
            return;
        }
        match position.behind.take() {
            Some((then, seen)) if then == last && seen > last => {
                position.held = Some(Vec::new());
                spawn_repair(shared.clone(), room.clone(), last + 1, seen);
            }
            _ => position.behind = Some((last, top)),
        }
    }
}

fn deliver(shared: &Shared, room: &Arc<str>, origin: &Arc<str>, payload: Encoded) {
    if let Some(sink) = shared.sink() {
        sink.deliver(Envelope {
            origin: origin.clone(),
            target: Target::Room(room.clone()),
            payload,
            kind: Kind::Message,
        });
    }
}

/// Reads offsets `from..=to` of the room's stream, delivers them, then what was held
/// meanwhile, in order; repairs again if what was held shows another gap.
fn spawn_repair(shared: Arc<Shared>, room: Arc<str>, from: u64, to: u64) {
    tokio::spawn(async move {
        shared
            .counters
            .repairs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let read = match shared.reader.get() {
            Some(conn) => {
                let mut conn = conn.clone();
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(REPAIR)
                    .arg(1)
                    .arg(shared.keys.stream(&room))
                    .arg(from)
                    .arg(to);
                let query = cmd.query_async::<Vec<Vec<u8>>>(&mut conn);
                tokio::time::timeout(READ_WAIT, query)
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            None => None,
        };
        let origin: Arc<str> = Arc::from("stream");
        let mut rooms = shared.positions.rooms.lock();
        let Some(position) = rooms.get_mut(&room) else {
            return;
        };
        let held = position.held.take().unwrap_or_default();
        match read {
            Some(frames) => {
                for frame in frames {
                    let message = Encoded::from_json(&frame);
                    let Some(offset) = outbound::offset_of(message.json()) else {
                        continue;
                    };
                    if offset > position.last {
                        position.last = offset;
                        deliver(&shared, &room, &origin, message);
                    }
                }
            }
            None => {
                tracing::warn!(room = %room, from, to, "could not read a durable room's missed messages from Redis; they are skipped");
                shared
                    .counters
                    .repair_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                position.last = to;
            }
        }
        // What waited: in order, and into another repair if it starts past a gap.
        let mut rest = held.into_iter();
        for (offset, message, from_node) in rest.by_ref() {
            if offset <= position.last {
                continue;
            }
            if offset == position.last + 1 {
                position.last = offset;
                deliver(&shared, &room, &from_node, message);
            } else {
                let mut again = vec![(offset, message, from_node)];
                again.extend(rest);
                let from = position.last + 1;
                position.held = Some(again);
                drop(rooms);
                spawn_repair(shared.clone(), room.clone(), from, offset - 1);
                return;
            }
        }
    });
}
