//! Durable rooms on Redis: a stream per room (`stream:<roomId>`, field `data` = the
//! message frame, entry id `<offset>-1`) and its position hash beside it (`offset`,
//! `epoch`).
//!
//! Publishing is one script call per room per window, in the window's pipeline: it gives
//! each message the room's next offset, appends it to the stream (trimmed to the class's
//! size, expiring after its TTL) and publishes it, in one atomic step, so stream order and
//! delivery order agree on every node. A history read is one script call too.
//!
//! Receiving: every node tracks, per durable room, the epoch and the last offset it
//! delivered. A message whose offset is not the next one holds the room's later messages
//! while the missing range is read from the stream and delivered first; a periodic
//! position check (the stream's epoch and offset against what was delivered) finds a
//! silent loss, as after a pub/sub reconnect, and repairs it the same way. A new epoch
//! (Redis lost the room's history: restarted empty, or the TTL passed) is read from the
//! envelope's `epoch`, never guessed from offsets: its offsets start again at 1, and the
//! node tells the room's subscribers (`epoch_changed`) before its first message.
//!
//! A read never writes: the history of a room that has no stream is empty, with the
//! epoch `""`, and creates nothing (an anonymous join on a made-up room id must not
//! leave a key behind for a day).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::LazyLock;
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::ConnectionManager;

use super::Core;
use crate::broker::{Envelope, History, HistoryError, Kind, Target};
use crate::config::Durability;
use crate::protocol::inbound::Replay;
use crate::protocol::{outbound, Encoded};

/// KEYS: stream, position. ARGV: channel, maxlen, ttl_s, envelope head
/// (`{"serverId":S,`), `batch` or `single` (with `-check`: skip frames already in the
/// stream), then the message frames. Returns the receivers of the (last) PUBLISH.
///
/// The envelope carries the room's epoch (`{"serverId":S,"epoch":E,"payload":P}`): that
/// is how a receiver knows a durable message, and its epoch, from the envelope itself.
///
/// The check is for frames sent before in a pipeline whose answer was lost (a master
/// killed, a connection cut): those the stream has were appended and published then,
/// the others never ran. Sent again with the check, none is lost and none doubled.
pub(super) static PUBLISH: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{APPEND_PRELUDE}{}{APPEND_EPILOGUE}return receivers\n",
        r#"
for i = 6, #ARGV do
  local body = string.sub(ARGV[i], 1, -2)
  if (seen[body] or 0) > 0 then
    seen[body] = seen[body] - 1
  else
    emit(body)
  end
end
"#
    )
});

/// What every append script (a durable room's, a board's) starts with: the room's epoch
/// (a new one, and every key of the room cleared, when the position is gone), the
/// envelope head, the mode, in check mode the bodies the stream has already, the offset,
/// and `emit`, which appends one message with the next offset and publishes it (or keeps
/// it for the window's one `PUBLISH`). `KEYS[1]` is the stream, `KEYS[2]` the position.
pub(super) const APPEND_PRELUDE: &str = r#"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  local t = redis.call('TIME')
  epoch = t[1] .. '-' .. t[2]
  redis.call('DEL', unpack(KEYS))
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'offset', 0)
end
local head = ARGV[4] .. '"epoch":' .. cjson.encode(epoch) .. ','
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
local function emit(body)
  offset = offset + 1
  local frame = body .. ',"offset":' .. offset .. '}'
  redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], offset .. '-1', 'data', frame)
  if single then
    receivers = redis.call('PUBLISH', ARGV[1], head .. '"payload":' .. frame .. '}')
  else
    frames[#frames + 1] = frame
  end
end
"#;

/// What every append script ends with: the offset stored, every key's expiry renewed, and
/// the window's messages published in one envelope (`batch` mode).
pub(super) const APPEND_EPILOGUE: &str = r#"
redis.call('HSET', KEYS[2], 'offset', offset)
for k = 1, #KEYS do redis.call('EXPIRE', KEYS[k], ARGV[3]) end
if #frames == 1 then
  receivers = redis.call('PUBLISH', ARGV[1], head .. '"payload":' .. frames[1] .. '}')
elseif #frames > 1 then
  receivers = redis.call('PUBLISH', ARGV[1], head .. '"batch":[' .. table.concat(frames, ',') .. ']}')
end
"#;

/// KEYS: stream, position. ARGV: `last` or `since`, N or the offset, the epoch (for
/// `since`), the cap. Returns {epoch, recovered ("" / "1" / "0"), {frames...}, the last
/// offset}. Reads
/// only: a room without a stream has the epoch "" and no messages, and a `since` from
/// epoch "" (the client saw the room before it had any) is served whole while there is
/// still no stream.
const HISTORY: &str = r#"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  if ARGV[1] == 'last' then return {'', '', {}, 0} end
  if ARGV[3] == '' then return {'', '1', {}, 0} end
  return {'', '0', {}, 0}
end
local last = tonumber(redis.call('HGET', KEYS[2], 'offset')) or 0
local cap = tonumber(ARGV[4])
local function latest(n)
  local out = {}
  if n <= 0 then return out end
  local rows = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', n)
  for i = #rows, 1, -1 do out[#out + 1] = rows[i][2][2] end
  return out
end
if ARGV[1] == 'last' then
  return {epoch, '', latest(math.min(tonumber(ARGV[2]), cap)), last}
end
local o = tonumber(ARGV[2])
if ARGV[3] == epoch and o <= last then
  if o == last then return {epoch, '1', {}, last} end
  local first = (o + 1) .. '-1'
  local rows = redis.call('XRANGE', KEYS[1], first, '+')
  if #rows > 0 and rows[1][1] == first then
    local out = {}
    for i = 1, #rows do out[#out + 1] = rows[i][2][2] end
    return {epoch, '1', out, last}
  end
end
return {epoch, '0', latest(cap), last}
"#;

/// The range read while a room's later messages wait. KEYS: stream, position. ARGV:
/// from, to, the epoch they belong to. Returns {epoch, {frames...}}: no frames when the
/// room's epoch is another one by now (its stream started again meanwhile).
const REPAIR: &str = r#"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if epoch ~= ARGV[3] then return {epoch or '', {}} end
local rows = redis.call('XRANGE', KEYS[1], ARGV[1] .. '-1', ARGV[2] .. '-1')
local out = {}
for i = 1, #rows do out[#out + 1] = rows[i][2][2] end
return {epoch, out}
"#;

/// The same in a Redis Cluster.
static PUBLISH_SPUBLISH: LazyLock<String> =
    LazyLock::new(|| super::start::spublish_script(&PUBLISH));

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

/// What every append script (a durable room's, a board's) takes before its messages:
/// the script (`PUBLISH` or `SPUBLISH` in a Redis Cluster), the keys, then ARGV channel,
/// maxlen, ttl_s, envelope head and mode.
pub(super) struct Append<'a> {
    pub core: &'a Core,
    pub room: &'a str,
    pub durability: Durability,
    pub head: &'a [u8],
    pub mode: Mode,
}

impl Append<'_> {
    /// An `EVAL` of `script` (or, in a Redis Cluster, `spublish`) with `keys` and the
    /// common arguments; the caller adds its own and the messages.
    pub(super) fn call(&self, script: &str, spublish: &str, keys: &[String]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(if self.core.spublish() {
            spublish
        } else {
            script
        })
        .arg(keys.len())
        .arg(keys)
        .arg(self.core.keys.room(self.room))
        .arg(self.durability.history_size)
        .arg(self.durability.ttl.as_secs().max(1))
        .arg(self.head)
        .arg(match (self.mode.single, self.mode.check) {
            (true, false) => "single",
            (false, false) => "batch",
            (true, true) => "single-check",
            (false, true) => "batch-check",
        });
        cmd
    }
}

/// Adds one room's durable messages of a window to the pipeline: one script call
/// (`check`: skip those the stream already has, see `PUBLISH`).
pub(super) fn add_publish(
    pipe: &mut redis::Pipeline,
    append: &Append<'_>,
    frames: impl Iterator<Item = Vec<u8>>,
) {
    let (core, room) = (append.core, append.room);
    let keys = [core.keys.stream(room), core.keys.position(room)];
    let mut cmd = append.call(&PUBLISH, &PUBLISH_SPUBLISH, &keys);
    for frame in frames {
        cmd.arg(frame);
    }
    pipe.add_command(cmd);
}

/// Runs a read script within `READ_WAIT`; Redis away or slow is `Unavailable`.
pub(super) async fn read_script<T: redis::FromRedisValue>(
    conn: &mut ConnectionManager,
    cmd: &redis::Cmd,
) -> Result<T, HistoryError> {
    tokio::time::timeout(READ_WAIT, cmd.query_async::<T>(conn))
        .await
        .map_err(|_| HistoryError::Unavailable("Redis did not answer in time".into()))?
        .map_err(|e| HistoryError::Unavailable(e.to_string()))
}

/// A read script's `recovered`: "1" / "0" for a `since`, "" for anything else.
pub(super) fn recovered_flag(answer: &str) -> Option<bool> {
    match answer {
        "1" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

/// Reads a durable room's history as a join asks for it.
pub(super) async fn history(
    core: &Core,
    mut conn: ConnectionManager,
    room: &str,
    replay: &Replay,
    durability: Durability,
) -> Result<History, HistoryError> {
    let (mode, position, epoch) = match replay {
        Replay::Last(n) => ("last", *n as u64, ""),
        Replay::Since { offset, epoch } => ("since", *offset, epoch.as_str()),
        Replay::Snapshot | Replay::SinceOrSnapshot { .. } => {
            return super::board::read(core, conn, room, replay, durability).await
        }
    };
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(HISTORY)
        .arg(2)
        .arg(core.keys.stream(room))
        .arg(core.keys.position(room))
        .arg(mode)
        .arg(position)
        .arg(epoch)
        .arg(durability.history_size);
    let (epoch, recovered, frames, offset) =
        read_script::<(String, String, Vec<Vec<u8>>, u64)>(&mut conn, &cmd).await?;
    Ok(History {
        epoch: Arc::from(epoch),
        messages: frames.iter().map(|f| Encoded::from_json(f)).collect(),
        offset,
        recovered: recovered_flag(&recovered),
        board: None,
    })
}

/// Per durable room: the epoch and last offset delivered here, and messages held during
/// a repair.
#[derive(Default)]
pub(super) struct Positions {
    rooms: Mutex<HashMap<Arc<str>, Position>>,
}

struct Position {
    /// The epoch of what was delivered here.
    epoch: Arc<str>,
    last: u64,
    /// Set while a repair reads the stream: later messages wait here, in order.
    held: Option<Vec<Held>>,
    /// The last position check found the stream ahead (or in another epoch): what was
    /// delivered then, and what the stream had then. Still so at the next check, it was
    /// lost, not in flight.
    behind: Option<Behind>,
}

/// A durable message waiting for a repair to finish.
struct Held {
    epoch: Arc<str>,
    offset: u64,
    message: Encoded,
    origin: Arc<str>,
}

#[derive(Clone, PartialEq)]
struct Behind {
    delivered: (Arc<str>, u64),
    stream: (Arc<str>, u64),
}

/// A range to read back from the stream: offsets `from..=to` of `epoch`.
struct Gap {
    epoch: Arc<str>,
    from: u64,
    to: u64,
}

impl Position {
    /// Takes one message in order: delivers it if it is the next one of its epoch (a new
    /// epoch starts again after 0), drops a duplicate, or returns the gap before it.
    fn step(&mut self, core: &Core, room: &Arc<str>, item: &Held) -> Option<Gap> {
        if self.epoch != item.epoch {
            // The room's history started again (Redis lost it): so do its offsets.
            self.epoch = item.epoch.clone();
            self.last = 0;
        }
        if item.offset == self.last + 1 {
            self.last = item.offset;
            deliver(core, room, &item.origin, &self.epoch, item.message.clone());
            None
        } else if item.offset > self.last + 1 {
            Some(Gap {
                epoch: self.epoch.clone(),
                from: self.last + 1,
                to: item.offset - 1,
            })
        } else {
            // Delivered already.
            None
        }
    }
}

impl Positions {
    /// A durable message from pub/sub: delivered if it is the next one, held behind a
    /// repair if one runs or this one shows a gap, dropped if it was delivered already.
    pub(super) fn receive(
        &self,
        core: &Arc<Core>,
        room: &Arc<str>,
        epoch: &str,
        origin: &Arc<str>,
        offset: u64,
        message: Encoded,
    ) {
        let mut rooms = self.rooms.lock();
        let position = rooms.entry(room.clone()).or_insert_with(|| Position {
            epoch: Arc::from(epoch),
            last: offset - 1,
            held: None,
            behind: None,
        });
        // The position's own epoch when it is this one: no allocation per message.
        let epoch = if *position.epoch == *epoch {
            position.epoch.clone()
        } else {
            Arc::from(epoch)
        };
        let item = Held {
            epoch,
            offset,
            message,
            origin: origin.clone(),
        };
        if let Some(held) = position.held.as_mut() {
            held.push(item);
            return;
        }
        if let Some(gap) = position.step(core, room, &item) {
            position.held = Some(vec![item]);
            spawn_repair(core.clone(), room.clone(), gap);
        }
    }

    /// Rooms with their epoch and last delivered offset, for the periodic position check.
    pub(super) fn snapshot(&self) -> Vec<(Arc<str>, Arc<str>, u64)> {
        self.rooms
            .lock()
            .iter()
            .filter(|(_, p)| p.held.is_none())
            .map(|(room, p)| (room.clone(), p.epoch.clone(), p.last))
            .collect()
    }

    /// The epoch and last offset delivered here of a durable room.
    pub(super) fn position(&self, room: &str) -> Option<(Arc<str>, u64)> {
        self.rooms
            .lock()
            .get(room)
            .map(|p| (p.epoch.clone(), p.last))
    }

    /// Continues a room delivered up to `last` of `epoch` elsewhere (another engine), so
    /// the first message here after a gap is repaired instead of taken as the start.
    pub(super) fn resume(&self, room: &Arc<str>, epoch: Arc<str>, last: u64) {
        self.rooms.lock().entry(room.clone()).or_insert(Position {
            epoch,
            last,
            held: None,
            behind: None,
        });
    }

    /// Forgets a room this node no longer subscribes to.
    pub(super) fn forget(&self, room: &str) {
        self.rooms.lock().remove(room);
    }

    /// A position check read the stream's epoch and offset (`stream`) while `delivered`
    /// was delivered here. Messages just published may still be on their way, so a room
    /// is repaired only when it is still behind, not having moved, at the next check:
    /// then up to the offset the earlier check saw (from 1, in a new epoch).
    pub(super) fn behind(
        &self,
        core: &Arc<Core>,
        room: &Arc<str>,
        delivered: (Arc<str>, u64),
        stream: (Arc<str>, u64),
    ) {
        let mut rooms = self.rooms.lock();
        let Some(position) = rooms.get_mut(room) else {
            return;
        };
        let moved = position.epoch != delivered.0 || position.last != delivered.1;
        let ahead = stream.0 != position.epoch || stream.1 > position.last;
        if position.held.is_some() || moved || !ahead {
            position.behind = None;
            return;
        }
        let now = Behind { delivered, stream };
        match position.behind.take() {
            Some(then) if then == now => {
                if position.epoch != now.stream.0 {
                    position.epoch = now.stream.0.clone();
                    position.last = 0;
                }
                position.held = Some(Vec::new());
                let gap = Gap {
                    epoch: position.epoch.clone(),
                    from: position.last + 1,
                    to: now.stream.1,
                };
                spawn_repair(core.clone(), room.clone(), gap);
            }
            _ => position.behind = Some(now),
        }
    }
}

fn deliver(core: &Core, room: &Arc<str>, origin: &Arc<str>, epoch: &Arc<str>, payload: Encoded) {
    if let Some(sink) = core.sink() {
        let mut envelope = Envelope::new(
            origin.clone(),
            Target::Room(room.clone()),
            payload,
            Kind::Message,
        );
        envelope.epoch = Some(epoch.clone());
        sink.deliver(envelope);
    }
}

/// Reads the gap's offsets from the room's stream, delivers them, then what was held
/// meanwhile, in order; repairs again if what was held shows another gap.
fn spawn_repair(core: Arc<Core>, room: Arc<str>, gap: Gap) {
    tokio::spawn(async move {
        core.counters
            .repairs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let read = match core.reader.get() {
            Some(conn) => {
                let mut conn = conn.clone();
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(REPAIR)
                    .arg(2)
                    .arg(core.keys.stream(&room))
                    .arg(core.keys.position(&room))
                    .arg(gap.from)
                    .arg(gap.to)
                    .arg(&*gap.epoch);
                let query = cmd.query_async::<(String, Vec<Vec<u8>>)>(&mut conn);
                tokio::time::timeout(READ_WAIT, query)
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            None => None,
        };
        let origin: Arc<str> = Arc::from("stream");
        let mut rooms = core.positions.rooms.lock();
        let Some(position) = rooms.get_mut(&room) else {
            return;
        };
        // No repair in progress: the room was forgotten and joined again meanwhile.
        let Some(held) = position.held.take() else {
            return;
        };
        match read {
            Some((epoch, frames)) if *epoch == *gap.epoch && position.epoch == gap.epoch => {
                for frame in frames {
                    let message = Encoded::from_json(&frame);
                    let Some(offset) = outbound::offset_of(message.json()) else {
                        continue;
                    };
                    if offset > position.last {
                        position.last = offset;
                        deliver(&core, &room, &origin, &position.epoch, message);
                    }
                }
            }
            read => {
                let why = match read {
                    Some(_) => "the room's history started again meanwhile",
                    None => "Redis did not answer",
                };
                tracing::warn!(room = %room, from = gap.from, to = gap.to, why, "could not read a durable room's missed messages from Redis; they are skipped");
                core.counters
                    .repair_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if position.epoch == gap.epoch {
                    position.last = position.last.max(gap.to);
                }
            }
        }
        // What waited: in order, and into another repair if it shows another gap.
        let mut rest = held.into_iter();
        while let Some(item) = rest.next() {
            if let Some(gap) = position.step(&core, &room, &item) {
                let mut again = vec![item];
                again.extend(rest);
                position.held = Some(again);
                drop(rooms);
                spawn_repair(core.clone(), room.clone(), gap);
                return;
            }
        }
    });
}
