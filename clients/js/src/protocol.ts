/** The frames of switchyard client protocol v1 (docs/protocol.md) that the client reads and writes. */

/** A position in a channel's stream: resume after `seq` in stream incarnation `epoch`. */
export interface Position {
  seq: number;
  epoch: string;
}

/** The first frame of every connection. */
export interface Welcome {
  conn_id: string;
  node: string;
  user: string;
  expires_at: number;
  ping_interval_ms: number;
}

/** One publication on a channel. */
export interface Publication {
  channel: string;
  seq: number;
  ts: number;
  data: unknown;
  from?: string;
}

/** The answer to `subscribe`. */
export interface Subscribed {
  channel: string;
  position: Position;
  recovered: boolean;
  replayed: number;
  stored_cursor?: boolean;
}

/** A presence change (`join` / `leave`). */
export interface JoinLeave {
  channel: string;
  user: string;
  device: string;
}

/** One member of a channel's presence. */
export interface PresenceClient {
  conn_id: string;
  user: string;
  device: string;
  node: string;
  since: number;
}

/** One page of presence. */
export interface PresencePage {
  channel: string;
  clients: PresenceClient[];
  next?: string;
}

/** The answer to `history`. */
export interface HistoryPage {
  channel: string;
  publications: Publication[];
  position: Position;
}

/** The answer to `publish`. */
export interface Published {
  channel: string;
  seq: number;
  duplicate: boolean;
}

/** Any frame the server sends: `type` says which. */
export type ServerFrame = { type: string; id?: number | string; [field: string]: unknown };

/** Close codes the client acts on (docs/protocol.md, "Close codes"). */
export const Close = {
  NORMAL: 1000,
  TRY_AGAIN_LATER: 1013,
  TOKEN_EXPIRED: 4002,
  KICKED: 4003,
  IDLE: 4005,
  SLOW_CONSUMER: 4008,
  RATE_LIMITED: 4009,
  FRAME_TOO_LARGE: 4010,
  PROTOCOL_VIOLATION: 4011,
  SHUTTING_DOWN: 4012,
  /** Sent by this client when the link went silent (not a server code). */
  DEAD_LINK: 4000,
} as const;

/** Error codes the client acts on. */
export const ErrorCode = {
  UNAVAILABLE: 113,
  REFRESH_REFUSED: 114,
} as const;
