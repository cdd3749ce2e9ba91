// Types of volley-client (volley.js), the client for a volley node.

/** A JSON value as published: a message's `content`, a broadcast's payload. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A state room's entry key: the raw value of its class's `state_key` field. */
export type EntryKey = string | number;

/** A room message as the node sends it. Durable rooms add `offset`; state rooms `key`,
 * and a removal (`removed`) or, for delta subscribers, `delta` (applied for you: the
 * message you get has `content`). */
export interface RoomMessage {
  type: "message";
  roomId: string;
  content?: Json;
  timestamp?: number;
  offset?: number;
  key?: EntryKey;
  removed?: true;
  delta?: string;
}

/** Any frame the node sends (after `batch` frames are taken apart). */
export interface Frame {
  type: string;
  roomId?: string;
  [field: string]: unknown;
}

export interface MessageInfo {
  /** The message came in a `history` frame (a replay), not live. */
  fromHistory: boolean;
}

export interface ConnectOptions {
  /** Every frame as received (before batches are unpacked). */
  onFrame?: (frame: Frame) => void;
  /** `error` frames. */
  onError?: (error: { type: "error"; code: string; message: string }) => void;
  /** After a rejoin with `since`: whether everything missed was replayed. */
  onRecovery?: (roomId: string, recovered: boolean) => void;
  /** Connected or not. */
  onStatus?: (up: boolean) => void;
  /** A JWT, sent first on every connection. */
  token?: string;
  onPresence?: (event: { type: "presence"; event: "connected" | "disconnected"; userId: string; serverId: string }) => void;
  onOnlineUsers?: (answer: { type: "online_users"; users: Array<{ userId: string; serverId: string; connectedAt: number; lastSeen: number }>; truncated?: boolean }) => void;
  onDirectMessage?: (message: { type: "direct_message"; fromUserId?: string; content: Json }) => void;
  onAuthenticated?: (userId: string) => void;
  /** `user_joined` / `user_left` of joined rooms. */
  onNotice?: (notice: { type: "user_joined" | "user_left"; roomId: string; timestamp: number }) => void;
  /** First reconnect delay bound, ms (250). */
  minDelay?: number;
  /** Largest reconnect delay bound, ms (10000). */
  maxDelay?: number;
  /** The WebSocket class to use (default: the platform's, or the `ws` package's on Node before 22). */
  WebSocket?: unknown;
}

export interface JoinOptions {
  /** A durable room's last N messages first (`1`: the current value). */
  history?: number;
  /** A state room's board: `room.state`, opened from the node's snapshot. */
  state?: boolean;
  /** With `state`: updates as Fossil deltas where the room's class offers them. */
  delta?: boolean;
}

export interface RoomEvents {
  change: (key: EntryKey, content: Json, message: RoomMessage) => void;
  remove: (key: EntryKey, message: RoomMessage) => void;
  snapshot: (state: Map<EntryKey, Json>) => void;
}

/** A joined room; a state room keeps its board. */
export declare class Room {
  readonly roomId: string;
  /** The offset of the last message delivered (durable rooms), or null. */
  offset: number | null;
  /** The room's epoch, or null before it is known. */
  epoch: string | null;
  /** A state room's board: entry key -> latest content; null for other rooms. */
  readonly state: Map<EntryKey, Json> | null;
  on<E extends keyof RoomEvents>(event: E, handler: RoomEvents[E]): this;
}

export declare class VolleyClient {
  constructor(url: string, options?: ConnectOptions);
  /** Boards joined again for a fresh snapshot because a delta did not apply. */
  readonly resyncs: number;
  /** The last resync's room, key, offset and reason ("no base", or the delta's error). */
  lastResync?: { roomId: string; key?: string | number; offset?: number; reason?: string };
  /** Identifies the socket with a JWT; sent again after every reconnect. */
  auth(token: string): void;
  join(roomId: string, options?: JoinOptions, onMessage?: (message: RoomMessage, info: MessageInfo) => void): Room;
  leave(roomId: string): void;
  /** Publishes `content` to a room (a state room's content names its entry). */
  publish(roomId: string, content: Json): void;
  subscribePresence(): void;
  getOnlineUsers(): void;
  directMessage(userId: string, content: Json): void;
  close(): void;
}

/** Connects (and reconnects by itself) to a volley node's WebSocket URL. */
export declare function connect(url: string, options?: ConnectOptions): VolleyClient;

/** Applies a Fossil delta to `source`; throws when it does not apply (checksum, range). */
export declare function applyDelta(source: Uint8Array, delta: Uint8Array): Uint8Array;
