//! State rooms on Redis: the board beside the durable room's stream and position.
//!
//! A board is a hash (`stream:<roomId>:board`: key -> `{"key","content","offset"}`) and a
//! sorted set of when each entry was last written (`stream:<roomId>:board-times`), both
//! beside the stream (the same hash tag in a Redis Cluster). A state room's messages are
//! appended by `PUBLISH` below, one script call per room per window as for any durable
//! room: each message gets its offset, goes into the stream, writes (or removes) its
//! entry and is published, in one atomic step, so the board, the stream and the live
//! messages never disagree. Entries past `state_ttl_s` leave in the same step, each as a
//! removal with its own offset; `expire` runs the script with no messages for rooms that
//! are quiet. A new key past `state_max_keys` is refused and nothing else changes: the
//! script answers, per message, its offset or 0 for a refusal. The write times are kept
//! only for classes with a `state_ttl_s` (an entry written while a class had none gets
//! its time at its next update).
//!
//! A join's board is one read (`READ`): the entries and the offset they are at, or, for
//! a `since` the stream can still serve, the messages after it instead.

use std::sync::{Arc, LazyLock};

use redis::aio::ConnectionManager;

use super::durable::{read_script, recovered_flag, Append, Mode, APPEND_EPILOGUE, APPEND_PRELUDE};
use super::{Core, EnvelopeWriter};
use crate::broker::{History, HistoryError, Snapshot};
use crate::config::{BoardLimits, Durability};
use crate::protocol::board::BoardWrite;
use crate::protocol::inbound::Replay;
use crate::protocol::Encoded;

/// KEYS: stream, position, board, board-times. ARGV: channel, maxlen, ttl_s, envelope
/// head, mode (as `durable::PUBLISH`), max keys, entry TTL in ms (0 = keep), the room id
/// as JSON (for the removals of expired entries), then four per message: its key (raw
/// JSON), the first and last byte of its entry body in the frame (0 0 = a removal), the
/// frame. Returns {receivers, per message: its offset (the room's offset for a removal
/// that found nothing), 0 when refused, -1 when the stream had it already (check mode)}.
static PUBLISH: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{APPEND_PRELUDE}{}{APPEND_EPILOGUE}out[1] = receivers\nreturn out\n",
        r#"
local out = {0}
local ttl = tonumber(ARGV[7])
local now = 0
if ttl > 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now - ttl, 'LIMIT', 0, 1000)
  for _, key in ipairs(old) do
    redis.call('HDEL', KEYS[3], key)
    redis.call('ZREM', KEYS[4], key)
    emit('{"type":"message","roomId":' .. ARGV[8] .. ',"key":' .. key .. ',"removed":true')
  end
end
local max = tonumber(ARGV[6])
for i = 9, #ARGV, 4 do
  local key, first, last, frame = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), ARGV[i + 3]
  local body = string.sub(frame, 1, -2)
  if (seen[body] or 0) > 0 then
    seen[body] = seen[body] - 1
    out[#out + 1] = -1
  elseif first == 0 then
    if redis.call('HDEL', KEYS[3], key) == 1 then
      if ttl > 0 then redis.call('ZREM', KEYS[4], key) end
      emit(body)
    end
    out[#out + 1] = offset
  else
    -- Written first (one command for an update, the common case); a new key past the
    -- limit is taken back, and nothing else happened.
    local entry = '{' .. string.sub(frame, first, last) .. ',"offset":' .. (offset + 1) .. '}'
    if redis.call('HSET', KEYS[3], key, entry) == 1 and redis.call('HLEN', KEYS[3]) > max then
      redis.call('HDEL', KEYS[3], key)
      out[#out + 1] = 0
    else
      emit(body)
      if ttl > 0 then redis.call('ZADD', KEYS[4], now, key) end
      out[#out + 1] = offset
    end
  end
end
"#
    )
});

/// KEYS: stream, position, board, board-times. ARGV: `snapshot` or `since`, the offset
/// and epoch (for `since`), the history cap, the entry TTL in ms (0 = keep). Returns
/// {epoch, recovered ("" / "1" / "0"), the offset, {entries or messages...}, `board` or
/// `messages`}. Reads only; entries past their TTL are left out (the next write takes
/// them off, announced).
const READ: &str = r#"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
local since = ARGV[1] == 'since'
if not epoch then
  if since and ARGV[3] == '' then return {'', '1', 0, {}, 'messages'} end
  return {'', since and '0' or '', 0, {}, 'board'}
end
local last = tonumber(redis.call('HGET', KEYS[2], 'offset'))
local o = tonumber(ARGV[2])
if since and ARGV[3] == epoch and o <= last then
  if o == last then return {epoch, '1', last, {}, 'messages'} end
  local first = (o + 1) .. '-1'
  local rows = redis.call('XRANGE', KEYS[1], first, '+')
  if #rows > 0 and rows[1][1] == first then
    local out = {}
    for i = 1, #rows do out[#out + 1] = rows[i][2][2] end
    return {epoch, '1', last, out, 'messages'}
  end
end
local entries
local ttl = tonumber(ARGV[5])
if ttl > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local live = redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. (now - ttl), '+inf')
  entries = {}
  for i = 1, #live, 500 do
    local values = redis.call('HMGET', KEYS[3], unpack(live, i, math.min(i + 499, #live)))
    for _, v in ipairs(values) do
      if v then entries[#entries + 1] = v end
    end
  end
else
  entries = redis.call('HVALS', KEYS[3])
end
return {epoch, since and '0' or '', last, entries, 'board'}
"#;

/// The same in a Redis Cluster.
static PUBLISH_SPUBLISH: LazyLock<String> =
    LazyLock::new(|| super::start::spublish_script(&PUBLISH));

fn entry_ttl_ms(limits: BoardLimits) -> u64 {
    limits
        .entry_ttl
        .map_or(0, |ttl| ttl.as_millis().max(1) as u64)
}

/// Adds one state room's messages of a window to the pipeline: one script call.
pub(super) fn add_publish<'a>(
    pipe: &mut redis::Pipeline,
    append: &Append<'_>,
    messages: impl Iterator<Item = (&'a Encoded, &'a BoardWrite)>,
) {
    let mut cmd = script_call(append);
    for (frame, write) in messages {
        let (first, last) = if write.is_removal() {
            (0, 0)
        } else {
            (write.span.start + 1, write.span.end)
        };
        cmd.arg(&write.key[..])
            .arg(first)
            .arg(last)
            .arg(frame.json());
    }
    pipe.add_command(cmd);
}

/// The script and its arguments before the messages: the append's, then max keys, the
/// entry TTL and the room id as JSON.
fn script_call(append: &Append<'_>) -> redis::Cmd {
    let (core, room) = (append.core, append.room);
    let limits = append.durability.board.unwrap_or(BoardLimits {
        max_keys: usize::MAX,
        entry_ttl: None,
    });
    let keys = [
        core.keys.stream(room),
        core.keys.position(room),
        core.keys.board(room),
        core.keys.board_times(room),
    ];
    let mut cmd = append.call(&PUBLISH, &PUBLISH_SPUBLISH, &keys);
    cmd.arg(limits.max_keys)
        .arg(entry_ttl_ms(limits))
        .arg(serde_json::to_string(room).unwrap_or_else(|_| "\"\"".into()));
    cmd
}

/// What the script answered for each message of its call: its offset, or `None` when the
/// board refused it (`state_full`); `-1` (appended before, check mode) is the offset 0.
pub(super) fn offsets(reply: &redis::Value) -> Option<Vec<Option<u64>>> {
    let redis::Value::Array(items) = reply else {
        return None;
    };
    let mut out = Vec::with_capacity(items.len().saturating_sub(1));
    for item in items.iter().skip(1) {
        let redis::Value::Int(n) = item else {
            return None;
        };
        out.push(match *n {
            0 => None,
            n => Some(n.max(0) as u64),
        });
    }
    Some(out)
}

/// Takes a state room's expired entries off its board now, each announced as a removal
/// (the script with no messages). Errors are logged: the next write or sweep tries again.
pub(super) async fn expire(core: Arc<Core>, room: Arc<str>, durability: Durability) {
    let Ok(mut conn) = core.reader_for(|e| e) else {
        return;
    };
    let head = EnvelopeWriter::new(&core.node_id);
    let cmd = script_call(&Append {
        core: &core,
        room: &room,
        durability,
        head: head.head(),
        mode: Mode {
            single: true,
            check: false,
        },
    });
    if let Err(e) = read_script::<redis::Value>(&mut conn, &cmd).await {
        tracing::debug!(room = %room, "expiring a board's entries failed: {e}");
    }
}

/// Reads a state room's board (or, for a `since` it can serve, the messages after it).
pub(super) async fn read(
    core: &Core,
    mut conn: ConnectionManager,
    room: &str,
    replay: &Replay,
    durability: Durability,
) -> Result<History, HistoryError> {
    let (mode, offset, epoch) = match replay {
        Replay::SinceOrSnapshot { offset, epoch } => ("since", *offset, epoch.as_str()),
        _ => ("snapshot", 0, ""),
    };
    let ttl = durability.board.map_or(0, entry_ttl_ms);
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(READ)
        .arg(4)
        .arg(core.keys.stream(room))
        .arg(core.keys.position(room))
        .arg(core.keys.board(room))
        .arg(core.keys.board_times(room))
        .arg(mode)
        .arg(offset)
        .arg(epoch)
        .arg(durability.history_size)
        .arg(ttl);
    let (epoch, recovered, last, items, kind) =
        read_script::<(String, String, u64, Vec<Vec<u8>>, String)>(&mut conn, &cmd).await?;
    let recovered = recovered_flag(&recovered);
    let epoch = Arc::from(epoch);
    if kind == "messages" {
        return Ok(History {
            epoch,
            messages: items.iter().map(|f| Encoded::from_json(f)).collect(),
            offset: last,
            recovered,
            board: None,
        });
    }
    Ok(History {
        epoch,
        messages: Vec::new(),
        offset: last,
        recovered,
        board: Some(Snapshot {
            offset: last,
            entries: items.into_iter().map(bytes::Bytes::from).collect(),
        }),
    })
}
