// volley.js: the client for a volley node, in browsers and in Node. An ES module, no
// build step; the node serves it at /volley.js and it is the npm package `volley-client`
// (clients/js in volley's repository):
//
//   import { connect } from "/volley.js";            // a page served by the node
//   import { connect } from "volley-client";         // a bundler, or Node
//   const volley = connect(`ws://${location.host}/ws`);
//
// Node 22 and browsers have a WebSocket; on older Node the package's optional dependency
// `ws` is used (or pass `options.WebSocket`).
//   volley.join("scores:m1", { history: 1 }, (message, { fromHistory }) => render(message));
//
// It reconnects by itself (exponential backoff with full jitter), unpacks `batch`
// frames, and after a reconnect joins every room again: a durable room with
// `since: {offset, epoch}` from the last message it delivered, so nothing is missed or
// doubled; when the node cannot serve that whole (`recovered: false`), `onRecovery`
// hears of it so the application can refetch its state. When a durable room's history
// starts again (`epoch_changed`: Redis lost it), offsets count from 1 in the new epoch
// and a later rejoin asks from there. A room's callback gets the room's `message`
// frames only (membership notices go to `options.onNotice`).
//
// A state room (a board: the latest message per key) is joined with `state: true`:
//
//   const quotes = volley.join("ticker", { state: true, delta: true });
//   quotes.on("change", (key, content) => render(key, content));
//   quotes.on("remove", (key) => unrender(key));
//   quotes.state; // a Map: key -> content, opened from the node's snapshot
//
// `delta: true` asks for Fossil deltas (where the room's class offers them): a key's
// update comes as the delta of its content against the one the client last received,
// applied here (`applyDelta`). After a reconnect the board rejoins with `since`: only
// the changes when the node still has them, else a fresh snapshot; either way the board
// is whole. A delta that does not apply (it never should) asks for a fresh snapshot.

// A WebSocket: the platform's, else (Node before 22) the `ws` package's, if installed.
const PlatformWebSocket =
  globalThis.WebSocket ?? (await import("ws").then((m) => m.default ?? m.WebSocket, () => null));
const OPEN = 1;

/**
 * @param {string} url the node's WebSocket URL
 * @param {object} [options]
 * @param {(frame: object) => void} [options.onFrame] every frame as received (before
 *   batches are unpacked)
 * @param {(error: object) => void} [options.onError] `error` frames
 * @param {(roomId: string, recovered: boolean) => void} [options.onRecovery] after a
 *   rejoin with `since`: whether everything missed was replayed
 * @param {(up: boolean) => void} [options.onStatus] connected or not
 * @param {string} [options.token] a JWT, sent first on every connection (see `auth`)
 * @param {(event: object) => void} [options.onPresence] presence events, after `subscribePresence()`
 * @param {(answer: object) => void} [options.onOnlineUsers] answers to `getOnlineUsers()`
 * @param {(message: object) => void} [options.onDirectMessage] direct messages to this user
 * @param {(userId: string) => void} [options.onAuthenticated] the identity the node took
 * @param {(notice: object) => void} [options.onNotice] `user_joined` / `user_left` of joined rooms
 * @param {number} [options.minDelay] first reconnect delay bound, ms (250)
 * @param {number} [options.maxDelay] largest reconnect delay bound, ms (10000)
 * @param {typeof WebSocket} [options.WebSocket] the WebSocket class to use (default: the
 *   platform's, or the `ws` package's on Node before 22)
 */
export function connect(url, options = {}) {
  return new VolleyClient(url, options);
}

export class VolleyClient {
  constructor(url, options = {}) {
    this.url = url;
    this.options = options;
    this.rooms = new Map();
    this.token = options.token ?? null;
    this.attempt = 0;
    // Boards joined again for a fresh snapshot because a delta did not apply.
    this.resyncs = 0;
    this.closed = false;
    this.ws = null;
    this.open();
  }

  /** Identifies the socket with a JWT; sent again after every reconnect. */
  auth(token) {
    this.token = token;
    this.send({ type: "auth", token });
  }

  /**
   * Joins a room and returns it. `history: N` asks a durable room for its last N
   * messages first; `state: true` a state room's board (`room.state`, a Map, with
   * `change` / `remove` / `snapshot` events: `room.on(name, fn)`); `delta: true` (with
   * `state`) its updates as Fossil deltas.
   */
  join(roomId, { history, state, delta } = {}, onMessage = () => {}) {
    const room = new Room(roomId, { history, state, delta, onMessage });
    this.rooms.set(roomId, room);
    this.sendJoin(roomId, room);
    return room;
  }

  /** Presence events (`{type:"presence",event,userId,serverId}`) to `options.onPresence`. */
  subscribePresence() {
    this.presence = true;
    this.send({ type: "subscribe_presence" });
  }

  /** Asks who is online; the answer (`{type:"online_users",users,truncated}`) comes to `options.onOnlineUsers`. */
  getOnlineUsers() {
    this.send({ type: "get_online_users" });
  }

  /** A direct message to every socket of `userId` (needs an identity: `auth`). */
  directMessage(userId, content) {
    this.send({ type: "direct_message", toUserId: userId, content });
  }

  leave(roomId) {
    this.rooms.delete(roomId);
    this.send({ type: "leave", roomId });
  }

  publish(roomId, content) {
    this.send({ type: "message", roomId, content });
  }

  close() {
    this.closed = true;
    if (this.ws) this.ws.close(1000);
  }

  send(frame) {
    if (this.ws && this.ws.readyState === OPEN) this.ws.send(JSON.stringify(frame));
  }

  sendJoin(roomId, room) {
    const join = { type: "join", roomId };
    if (room.state) join.state = true;
    if (room.state && room.delta) join.delta = "fossil";
    if (room.offset !== null && room.epoch !== null) join.since = { offset: room.offset, epoch: room.epoch };
    else if (room.history && !room.state) join.history = room.history;
    this.send(join);
  }

  /** A board that lost track (a delta without its base): joined again for a fresh snapshot. */
  resync(roomId, room) {
    this.resyncs += 1;
    // Why, for whoever debugs it: the key, the offset and what failed.
    this.lastResync = { roomId, ...room.failure };
    room.offset = null;
    room.epoch = null;
    this.send({ type: "leave", roomId });
    this.sendJoin(roomId, room);
  }

  open() {
    const Socket = this.options.WebSocket ?? PlatformWebSocket;
    if (!Socket) throw new Error("volley: no WebSocket here: on Node before 22, npm install ws (or pass options.WebSocket)");
    const ws = new Socket(this.url);
    this.ws = ws;
    ws.onopen = () => {
      this.attempt = 0;
      this.options.onStatus?.(true);
      if (this.token) this.send({ type: "auth", token: this.token });
      if (this.presence) this.send({ type: "subscribe_presence" });
      for (const [roomId, room] of this.rooms) this.sendJoin(roomId, room);
    };
    ws.onmessage = (event) => {
      const text = typeof event.data === "string" ? event.data : String(event.data);
      let frame;
      try { frame = JSON.parse(text); } catch { return; }
      this.options.onFrame?.(frame);
      const messages = frame.type === "batch" ? frame.messages : [frame];
      // A delta applies to the content's bytes as sent, so delta boards keep them raw.
      let raw = null;
      const rawOf = (i) => (raw ??= frame.type === "batch" ? batchItems(text) : [text])[i];
      messages.forEach((message, i) => this.dispatch(message, () => rawOf(i)));
    };
    // A failed connection closes too (and `ws` would throw an unheard error).
    ws.onerror = () => {};
    ws.onclose = () => {
      this.options.onStatus?.(false);
      if (this.closed) return;
      // Full jitter: a restarted node is not met by every browser at the same moment.
      const bound = Math.min(this.options.maxDelay ?? 10000, (this.options.minDelay ?? 250) * 2 ** this.attempt);
      this.attempt += 1;
      setTimeout(() => this.open(), Math.random() * bound);
    };
  }

  dispatch(message, rawOf = () => null) {
    if (message.type === "error") {
      this.options.onError?.(message);
      return;
    }
    if (message.type === "presence") return this.options.onPresence?.(message);
    if (message.type === "online_users") return this.options.onOnlineUsers?.(message);
    if (message.type === "direct_message") return this.options.onDirectMessage?.(message);
    if (message.type === "authenticated") return this.options.onAuthenticated?.(message.userId);
    const room = this.rooms.get(message.roomId);
    if (!room) return;
    if (message.type === "snapshot") {
      room.epoch = message.epoch || null;
      room.offset = message.offset;
      if (message.recovered === false) this.options.onRecovery?.(message.roomId, false);
      room.openSnapshot(message);
      return;
    }
    if (message.type === "history") {
      // Another epoch, or a position it could not serve: offsets start over from here.
      if (message.epoch !== room.epoch || message.recovered === false) room.offset = null;
      // "" is a durable room with no history yet (or a plain room): nothing to resume.
      room.epoch = message.epoch || null;
      if (message.recovered !== undefined) this.options.onRecovery?.(message.roomId, message.recovered);
      for (const m of message.messages) this.deliver(room, m, { fromHistory: true });
      // Where the history ends (the room's last offset when read): live messages follow.
      if (typeof message.offset === "number" && room.epoch !== null && (room.offset === null || message.offset > room.offset)) {
        room.offset = message.offset;
      }
      return;
    }
    if (message.type === "epoch_changed") {
      // The room's history started again: its offsets count from 1 in this epoch, and a
      // rejoin asks for everything of it from there.
      room.epoch = message.epoch;
      room.offset = 0;
      // A board starts again too: the new epoch's messages, from offset 1, rebuild it.
      if (room.state) room.openSnapshot({ entries: [] });
      return;
    }
    if (message.type === "user_joined" || message.type === "user_left") {
      this.options.onNotice?.(message);
      return;
    }
    if (message.type !== "message") return;
    this.deliver(room, message, { fromHistory: false }, rawOf);
  }

  deliver(room, message, info, rawOf = () => null) {
    if (typeof message.offset === "number") {
      // Delivered already (a replay that overlaps what came live).
      if (room.offset !== null && message.offset <= room.offset) return;
      room.offset = message.offset;
    }
    if (room.state && !room.apply(message, rawOf)) {
      this.resync(message.roomId, room);
      return;
    }
    room.onMessage(message, info);
  }
}

/** A joined room; for a state room, its board (`state`) and the board's events. */
export class Room {
  constructor(roomId, { history, state, delta, onMessage }) {
    this.roomId = roomId;
    this.history = history;
    this.onMessage = onMessage;
    this.offset = null;
    this.epoch = null;
    this.delta = !!delta;
    this.state = state ? new Map() : null;
    // Per key, the content's JSON as sent: the base of the key's next delta.
    this.raw = new Map();
    this.handlers = { change: [], remove: [], snapshot: [] };
  }

  /** `change` (key, content, message), `remove` (key, message), `snapshot` (state). */
  on(event, handler) {
    this.handlers[event]?.push(handler);
    return this;
  }

  emit(event, ...args) {
    for (const handler of this.handlers[event] ?? []) handler(...args);
  }

  openSnapshot(snapshot) {
    this.state?.clear();
    this.raw.clear();
    for (const entry of snapshot.entries) this.state?.set(entry.key, entry.content);
    this.emit("snapshot", this.state);
  }

  /** Applies a board message; false when a delta cannot be applied (resync). */
  apply(message, rawOf) {
    const key = message.key;
    if (key === undefined) return true;
    if (message.removed) {
      this.state.delete(key);
      this.raw.delete(key);
      this.emit("remove", key, message);
      return true;
    }
    let text;
    if (typeof message.delta === "string") {
      const base = this.raw.get(key);
      if (base === undefined) {
        this.failure = { key, offset: message.offset, reason: "no base" };
        return false;
      }
      try {
        text = DECODER.decode(applyDelta(ENCODER.encode(base), ENCODER.encode(message.delta)));
        message.content = JSON.parse(text);
      } catch (e) {
        this.failure = { key, offset: message.offset, reason: String(e) };
        return false;
      }
    } else if (this.delta) {
      text = rawContent(rawOf());
    }
    // No raw text (a replayed message): no base either; the node sends the key in full next.
    if (typeof text === "string") this.raw.set(key, text);
    else this.raw.delete(key);
    this.state.set(key, message.content);
    this.emit("change", key, message.content, message);
    return true;
  }
}

const ENCODER = new TextEncoder();
const DECODER = new TextDecoder("utf-8", { fatal: true });
const B64 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~";
const B64VALUE = new Int16Array(128).fill(-1);
for (let i = 0; i < B64.length; i++) B64VALUE[B64.charCodeAt(i)] = i;

/**
 * Applies a Fossil delta (the format of fossil-scm's delta.c, as volley's Rust encoder
 * writes it) to `source`; both are bytes. Throws when the delta is malformed, reaches
 * outside its source, or its checksum does not match.
 */
export function applyDelta(source, delta) {
  let at = 0;
  const number = () => {
    let value = 0, digits = 0;
    while (at < delta.length && delta[at] < 128 && B64VALUE[delta[at]] >= 0) {
      value = value * 64 + B64VALUE[delta[at++]];
      digits++;
    }
    if (!digits) throw new Error("delta: a number expected");
    return value;
  };
  const limit = number();
  if (delta[at++] !== 0x0a) throw new Error("delta: no size line");
  const out = new Uint8Array(limit);
  let total = 0;
  while (at < delta.length) {
    const count = number();
    const op = delta[at++];
    if (op === 0x40) { // '@': copy `count` bytes of the source from an offset
      const offset = number();
      if (delta[at++] !== 0x2c) throw new Error("delta: ',' expected");
      if (total + count > limit || offset + count > source.length) throw new Error("delta: copy out of range");
      out.set(source.subarray(offset, offset + count), total);
      total += count;
    } else if (op === 0x3a) { // ':': `count` literal bytes
      if (total + count > limit || at + count > delta.length) throw new Error("delta: literal out of range");
      out.set(delta.subarray(at, at + count), total);
      total += count;
      at += count;
    } else if (op === 0x3b) { // ';': the checksum of the output
      if (total !== limit) throw new Error("delta: size mismatch");
      if (count !== checksum(out)) throw new Error("delta: bad checksum");
      return out;
    } else {
      throw new Error("delta: unexpected byte");
    }
  }
  throw new Error("delta: no checksum");
}

/** fossil's checksum: the sum of the big-endian 32-bit words, zero-padded, mod 2^32. */
function checksum(bytes) {
  let sum = 0;
  let i = 0;
  for (; i + 4 <= bytes.length; i += 4) {
    sum = (sum + ((bytes[i] << 24) | (bytes[i + 1] << 16) | (bytes[i + 2] << 8) | bytes[i + 3])) >>> 0;
  }
  let last = 0;
  for (let k = 0; k < 4; k++) last = (last << 8) | (i + k < bytes.length ? bytes[i + k] : 0);
  return (sum + (last >>> 0)) >>> 0;
}

/** The end (exclusive) of the JSON value that starts at `i` of `text` (no whitespace, as volley writes it). */
function valueEnd(text, i) {
  let depth = 0;
  for (; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x22) { // a string: to its closing quote
      for (i++; i < text.length && text.charCodeAt(i) !== 0x22; i++) if (text.charCodeAt(i) === 0x5c) i++;
      if (depth === 0) return i + 1;
    } else if (c === 0x7b || c === 0x5b) {
      depth++;
    } else if (c === 0x7d || c === 0x5d) {
      if (--depth === 0) return i + 1;
      if (depth < 0) return i;
    } else if (depth === 0 && (c === 0x2c)) {
      return i;
    }
  }
  return i;
}

/** The raw JSON text of each message of a `batch` frame. */
function batchItems(text) {
  const items = [];
  let i = text.indexOf('"messages":[') + 12;
  while (i > 11 && i < text.length && text[i] !== "]") {
    const end = valueEnd(text, i);
    items.push(text.slice(i, end));
    i = end + 1;
  }
  return items;
}

/** The raw JSON text of a board message's content (after `"key"`, the first top-level `,"content":`). */
function rawContent(text) {
  if (typeof text !== "string") return null;
  const at = text.indexOf(',"content":');
  if (at < 0) return null;
  const start = at + 11;
  return text.slice(start, valueEnd(text, start));
}
