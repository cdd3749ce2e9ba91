// volley.js: the browser client for a volley node. An ES module, no build step:
//
//   import { connect } from "/volley.js";
//   const volley = connect(`ws://${location.host}/ws`);
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
    this.closed = false;
    this.ws = null;
    this.open();
  }

  /** Identifies the socket with a JWT; sent again after every reconnect. */
  auth(token) {
    this.token = token;
    this.send({ type: "auth", token });
  }

  /** Joins a room. `history: N` asks a durable room for its last N messages first. */
  join(roomId, { history } = {}, onMessage = () => {}) {
    const room = { history, onMessage, offset: null, epoch: null };
    this.rooms.set(roomId, room);
    this.sendJoin(roomId, room);
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
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(frame));
  }

  sendJoin(roomId, room) {
    const join = { type: "join", roomId };
    if (room.offset !== null && room.epoch !== null) join.since = { offset: room.offset, epoch: room.epoch };
    else if (room.history) join.history = room.history;
    this.send(join);
  }

  open() {
    const ws = new WebSocket(this.url);
    this.ws = ws;
    ws.onopen = () => {
      this.attempt = 0;
      this.options.onStatus?.(true);
      if (this.token) this.send({ type: "auth", token: this.token });
      if (this.presence) this.send({ type: "subscribe_presence" });
      for (const [roomId, room] of this.rooms) this.sendJoin(roomId, room);
    };
    ws.onmessage = (event) => {
      let frame;
      try { frame = JSON.parse(event.data); } catch { return; }
      this.options.onFrame?.(frame);
      for (const message of frame.type === "batch" ? frame.messages : [frame]) this.dispatch(message);
    };
    ws.onclose = () => {
      this.options.onStatus?.(false);
      if (this.closed) return;
      // Full jitter: a restarted node is not met by every browser at the same moment.
      const bound = Math.min(this.options.maxDelay ?? 10000, (this.options.minDelay ?? 250) * 2 ** this.attempt);
      this.attempt += 1;
      setTimeout(() => this.open(), Math.random() * bound);
    };
  }

  dispatch(message) {
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
    if (message.type === "history") {
      // Another epoch, or a position it could not serve: offsets start over from here.
      if (message.epoch !== room.epoch || message.recovered === false) room.offset = null;
      // "" is a durable room with no history yet (or a plain room): nothing to resume.
      room.epoch = message.epoch || null;
      if (message.recovered !== undefined) this.options.onRecovery?.(message.roomId, message.recovered);
      for (const m of message.messages) this.deliver(room, m, { fromHistory: true });
      return;
    }
    if (message.type === "epoch_changed") {
      // The room's history started again: its offsets count from 1 in this epoch, and a
      // rejoin asks for everything of it from there.
      room.epoch = message.epoch;
      room.offset = 0;
      return;
    }
    if (message.type === "user_joined" || message.type === "user_left") {
      this.options.onNotice?.(message);
      return;
    }
    if (message.type !== "message") return;
    this.deliver(room, message, { fromHistory: false });
  }

  deliver(room, message, info) {
    if (typeof message.offset === "number") {
      // Delivered already (a replay that overlaps what came live).
      if (room.offset !== null && message.offset <= room.offset) return;
      room.offset = message.offset;
    }
    room.onMessage(message, info);
  }
}
