/**
 * The client: one WebSocket at a time to one of the gateway URLs, reconnecting
 * with backoff, resuming every subscription after a reconnect, refreshing the
 * token, and queueing requests while disconnected (docs/protocol.md is the
 * contract it speaks).
 */

import { Backoff, type BackoffOptions } from "./backoff.js";
import { ClosedError, QueueFullError, ServerError } from "./errors.js";
import { Emitter } from "./events.js";
import {
  Close,
  ErrorCode,
  type HistoryPage,
  type JoinLeave,
  type Position,
  type PresenceClient,
  type PresencePage,
  type Publication,
  type Published,
  type ServerFrame,
  type Subscribed,
  type Welcome,
} from "./protocol.js";
import { Subscription, type SubscribeOptions } from "./subscription.js";

/** The part of the WebSocket API the client uses (the browser's, or `ws` in Node). */
export interface WebSocketLike {
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

/** A WebSocket constructor: `globalThis.WebSocket` in browsers, `ws`'s in Node. */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/** Why the client asks for a token. */
export type TokenReason = "connect" | "refresh" | "expired" | "refused";

/** What `new Client` takes. */
export interface ClientOptions {
  /** A fixed token. When it expires the client stops (give `getToken` to renew). */
  token?: string;
  /** Fetches a token: called for a connection that needs one and before expiry. */
  getToken?: (context: { reason: TokenReason }) => string | Promise<string>;
  /** A stable id of this installation: keys the read cursors of acked namespaces. */
  device?: string;
  /** The WebSocket constructor (default: `globalThis.WebSocket`). */
  WebSocket?: WebSocketConstructor;
  /** Reconnect delays (full jitter; default 250 ms doubling up to 30 s). */
  backoff?: BackoffOptions;
  /** Most requests waiting for a connection (default 1,000); more are refused. */
  queueLimit?: number;
  /** How long a connection may take to reach `welcome` (default 10 s). */
  connectTimeoutMs?: number;
  /** Delay before auto-acks are sent, batching them (default 200 ms). */
  ackDelayMs?: number;
  /** Retries of a publish answered 113 (outcome unknown), with the same msg_id (default 5). */
  publishRetries?: number;
  /** Reconnect after an operator disconnect (4003); default false: the client closes. */
  reconnectAfterKick?: boolean;
  /** Uniform random numbers in [0, 1) (tests pass their own). */
  random?: () => number;
}

/** The client's connection state. */
export type State = "idle" | "connecting" | "connected" | "disconnected" | "closed";

/** Events of the client. */
export interface ClientEvents {
  state: State;
  connecting: { url: string; attempt: number };
  connected: { url: string; welcome: Welcome };
  /** The connection ended; `willRetry` says whether the client reconnects, after `retryInMs`. */
  disconnected: { code: number; reason: string; willRetry: boolean; retryInMs?: number };
  /** The client stopped for good. */
  closed: { reason: string };
  /** A token was fetched through `getToken`. */
  token: { reason: TokenReason };
  /** An error frame that answers no request. */
  error: ServerError;
}

interface Pending {
  /** Publishes and reads are resent on the next connection; a refresh is not. */
  kind: "publish" | "read" | "refresh";
  frame: Record<string, unknown>;
  resolve: (frame: ServerFrame) => void;
  reject: (error: Error) => void;
  /** Publish retries after 113 so far. */
  retries: number;
}

interface Connection {
  ws: WebSocketLike;
  url: string;
  welcome: Welcome | null;
  openedAt: number;
  lastInbound: number;
  pinged: boolean;
  timer: ReturnType<typeof setInterval> | null;
  /** `reconnect {after_ms}` from a draining node. */
  reconnectAfterMs: number | null;
  /** One token refresh at a time per connection. */
  refreshing: boolean;
  /** The server said the token expires soon. */
  expiring: boolean;
  ended: boolean;
}

/** Ends a connection that has been up this long resets the backoff. */
const STABLE_MS = 10_000;

/** A token with less left than this is replaced before a connection uses it. */
const TOKEN_MARGIN_S = 30;

/** The `exp` of a JWT (seconds), or null when it cannot be read. */
export function tokenExpiry(token: string): number | null {
  try {
    const part = token.split(".")[1];
    if (!part) return null;
    const json = atob(part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "="));
    const exp = (JSON.parse(json) as { exp?: unknown }).exp;
    return typeof exp === "number" ? exp : null;
  } catch {
    return null;
  }
}

function randomId(random: () => number): string {
  const c = globalThis.crypto as Crypto | undefined;
  if (c?.randomUUID) return c.randomUUID();
  let s = "";
  for (let i = 0; i < 32; i++) s += Math.floor(random() * 16).toString(16);
  return s;
}

/** A switchyard client. Call `connect()`, then subscribe and publish at any time. */
export class Client extends Emitter<ClientEvents> {
  private readonly urls: string[];
  private urlIndex = 0;
  private readonly WS: WebSocketConstructor;
  private readonly backoff: Backoff;
  private readonly random: () => number;
  private currentState: State = "idle";
  private conn: Connection | null = null;
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private attempt = 0;
  private token: string | null;
  /** Why the current token must not be used again (refused, expired, or about to); null: it may. */
  private tokenStale: TokenReason | null = null;
  private nextId = 1;
  private readonly inflight = new Map<number, Pending>();
  private readonly queue: Pending[] = [];
  private readonly subs = new Map<string, Subscription>();
  private readonly subscribing = new Map<number, Subscription>();

  constructor(urls: string | string[], private readonly options: ClientOptions = {}) {
    super();
    const list = Array.isArray(urls) ? [...urls] : [urls];
    if (list.length === 0) throw new TypeError("switchyard: at least one URL is needed");
    if (!options.token && !options.getToken) throw new TypeError("switchyard: give a token or getToken");
    this.random = options.random ?? Math.random;
    // Tried in random order, so clients of one region spread over its nodes.
    for (let i = list.length - 1; i > 0; i--) {
      const j = Math.floor(this.random() * (i + 1));
      [list[i], list[j]] = [list[j]!, list[i]!];
    }
    this.urls = list;
    const WS = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) throw new TypeError("switchyard: no WebSocket: pass options.WebSocket (e.g. from the ws package)");
    this.WS = WS;
    this.backoff = new Backoff(options.backoff, this.random);
    this.token = options.token ?? null;
  }

  /** The connection state. */
  get state(): State {
    return this.currentState;
  }

  /** The `welcome` of the current connection (its node, connection id), if connected. */
  get welcome(): Welcome | null {
    return this.conn?.welcome ?? null;
  }

  /** Starts connecting (again, after `disconnected`); a no-op while connecting or connected. */
  connect(): void {
    if (this.currentState === "closed") throw new ClosedError();
    if (this.currentState === "connecting" || this.currentState === "connected") return;
    this.cancelRetry();
    void this.open();
  }

  /** Closes the connection and stops: pending requests are rejected, subscriptions end. */
  close(): void {
    this.stop("closed by the application");
  }

  /** Subscribes to `channel`; the subscription resumes by itself after every reconnect. */
  subscribe(channel: string, options: SubscribeOptions = {}): Subscription {
    if (this.currentState === "closed") throw new ClosedError();
    if (this.subs.has(channel)) throw new Error(`switchyard: already subscribed to ${channel}`);
    const sub = new Subscription(
      channel,
      options,
      {
        sendAck: (ch, seq) => this.sendNow({ type: "ack", channel: ch, seq }),
        unsubscribe: (s) => this.unsubscribe(s),
      },
      this.options.ackDelayMs ?? 200,
    );
    this.subs.set(channel, sub);
    if (this.conn?.welcome) this.sendSubscribe(sub);
    return sub;
  }

  /**
   * Publishes `data` on `channel`. A `msgId` is generated when absent, so a publish
   * resent after a reconnect is stored once (the reply then says `duplicate: true`).
   */
  publish(channel: string, data: unknown, options: { msgId?: string } = {}): Promise<Published> {
    const frame = { type: "publish", channel, data, msg_id: options.msgId ?? randomId(this.random) };
    return this.request("publish", frame).then((f) => ({
      channel: f.channel as string,
      seq: f.seq as number,
      duplicate: f.duplicate as boolean,
    }));
  }

  /** A channel's stored publications (after `since`, at most `limit`). */
  history(channel: string, options: { since?: Position; limit?: number } = {}): Promise<HistoryPage> {
    return this.request("read", { type: "history", channel, ...options }) as Promise<unknown> as Promise<HistoryPage>;
  }

  /** One page of a channel's presence; pass the previous page's `next` as `cursor`. */
  presence(channel: string, options: { limit?: number; cursor?: string } = {}): Promise<PresencePage> {
    return this.request("read", { type: "presence", channel, ...options }) as Promise<unknown> as Promise<PresencePage>;
  }

  /** Every member of a channel's presence, page after page. */
  async presenceAll(channel: string, limit?: number): Promise<PresenceClient[]> {
    const all: PresenceClient[] = [];
    let cursor: string | undefined;
    do {
      const page = await this.presence(channel, { ...(limit ? { limit } : {}), ...(cursor ? { cursor } : {}) });
      all.push(...page.clients);
      cursor = page.next;
    } while (cursor);
    return all;
  }

  /** Replaces the connection's token now (through `getToken`); resolves with the new expiry. */
  async refresh(): Promise<number> {
    const conn = this.conn;
    if (!conn?.welcome) throw new Error("switchyard: not connected");
    if (!this.options.getToken) throw new Error("switchyard: refresh needs getToken");
    const token = await this.fetchToken("refresh");
    if (this.conn !== conn || conn.ended) throw new Error("switchyard: the connection changed during the refresh");
    const reply = await this.requestOn(conn, { type: "refresh", token });
    conn.expiring = false;
    return reply.expires_at as number;
  }

  // ---- connection lifecycle ----

  private setState(state: State): void {
    if (this.currentState === state) return;
    this.currentState = state;
    this.emit("state", state);
  }

  private async open(): Promise<void> {
    this.setState("connecting");
    const url = this.urls[this.urlIndex % this.urls.length]!;
    this.urlIndex += 1;
    this.attempt += 1;
    this.emit("connecting", { url, attempt: this.attempt });
    let token: string;
    try {
      token = await this.tokenForConnection();
    } catch (e) {
      if (this.currentState === "closed") return;
      if (e instanceof ClosedError) return this.stop(e.message);
      console.error("switchyard: getToken failed", e);
      return this.retry(0, "getToken failed", this.backoff.next());
    }
    if (this.currentState !== "connecting") return;
    const target = this.options.device ? `${url}${url.includes("?") ? "&" : "?"}device=${encodeURIComponent(this.options.device)}` : url;
    let ws: WebSocketLike;
    try {
      // The browser form: headers cannot be set, a subprotocol can.
      ws = new this.WS(target, ["switchyard.v1", `bearer.${token}`]);
    } catch (e) {
      console.error("switchyard: cannot open a WebSocket", e);
      return this.retry(0, String(e), this.backoff.next());
    }
    const now = Date.now();
    const conn: Connection = {
      ws,
      url,
      welcome: null,
      openedAt: now,
      lastInbound: now,
      pinged: false,
      timer: null,
      reconnectAfterMs: null,
      refreshing: false,
      expiring: false,
      ended: false,
    };
    this.conn = conn;
    const connectTimeout = setTimeout(() => {
      if (!conn.welcome) this.lost(conn, 0, "no welcome in time");
    }, this.options.connectTimeoutMs ?? 10_000);
    ws.onmessage = (event) => {
      if (conn.ended) return;
      conn.lastInbound = Date.now();
      conn.pinged = false;
      let frame: ServerFrame;
      try {
        frame = JSON.parse(typeof event.data === "string" ? event.data : String(event.data)) as ServerFrame;
      } catch {
        return;
      }
      if (frame.type === "welcome") {
        clearTimeout(connectTimeout);
        this.welcomed(conn, frame as unknown as Welcome);
      } else {
        this.handle(conn, frame);
      }
    };
    ws.onclose = (event) => {
      clearTimeout(connectTimeout);
      this.lost(conn, event.code, event.reason);
    };
    ws.onerror = () => {
      // A close event follows; nothing to do here.
    };
  }

  private welcomed(conn: Connection, welcome: Welcome): void {
    conn.welcome = welcome;
    this.attempt = 0;
    const interval = Math.max(1_000, welcome.ping_interval_ms);
    // Browsers do not show WebSocket pings: a link silent for two intervals gets an
    // app-level ping, and one silent for three is dead.
    conn.timer = setInterval(() => {
      const silent = Date.now() - conn.lastInbound;
      if (silent > 3 * interval) this.lost(conn, Close.DEAD_LINK, "no traffic for three ping intervals");
      else if (silent > 2 * interval && !conn.pinged) {
        conn.pinged = true;
        this.sendOn(conn, { type: "ping" });
      }
    }, interval / 2);
    this.setState("connected");
    this.emit("connected", { url: conn.url, welcome });
    for (const sub of this.subs.values()) this.sendSubscribe(sub);
    for (const p of this.queue.splice(0)) this.dispatch(conn, p);
  }

  /** The connection ended (closed by the server, failed, or given up on here). */
  private lost(conn: Connection, code: number, reason: string): void {
    if (conn.ended) return;
    conn.ended = true;
    if (conn.timer) clearInterval(conn.timer);
    conn.ws.onmessage = null;
    conn.ws.onclose = null;
    if (code === Close.DEAD_LINK || code === 0) {
      // Do not wait for a close handshake on a link that is gone.
      try {
        conn.ws.close(Close.DEAD_LINK, reason.slice(0, 100));
      } catch {
        // already closed
      }
    }
    if (this.conn === conn) this.conn = null;
    this.subscribing.clear();
    // What was sent and not answered goes again on the next connection; publishes
    // keep their msg_id, so the server stores each once.
    for (const [id, p] of this.inflight) {
      this.inflight.delete(id);
      if (p.kind === "publish" || p.kind === "read") this.queue.push(p);
      else p.reject(new Error("switchyard: disconnected during the refresh"));
    }
    if (this.currentState === "closed") return;
    const welcomed = conn.welcome !== null;
    if (welcomed && Date.now() - conn.openedAt >= STABLE_MS) this.backoff.reset();
    // The first quick retry after a stable connection is immediate; repeats back off.
    const fresh = this.backoff.bound() === this.backoff.minMs;
    const quick = () => {
      const delay = this.backoff.next();
      return fresh ? 0 : delay;
    };
    if (conn.expiring) this.tokenStale = "expired";
    switch (code) {
      case Close.KICKED:
        if (!this.options.reconnectAfterKick) return this.stop(`disconnected by the server (4003): ${reason}`, code);
        return this.retry(code, reason, this.backoff.next());
      case Close.FRAME_TOO_LARGE:
      case Close.PROTOCOL_VIOLATION:
        // Reconnecting would only repeat it.
        return this.stop(`refused by the server (${code}): ${reason}`, code);
      case Close.TOKEN_EXPIRED:
        this.tokenStale = "expired";
        return this.retry(code, reason, quick());
      case Close.SLOW_CONSUMER:
      case Close.DEAD_LINK:
        return this.retry(code, reason, quick());
      case Close.SHUTTING_DOWN:
        return this.retry(code, reason, conn.reconnectAfterMs ?? this.backoff.next());
      default:
        if (!welcomed) {
          // Refused before the upgrade (a bad or expired token among the reasons a
          // browser cannot tell apart): back off, and ask for another token.
          this.tokenStale ??= "refused";
        }
        return this.retry(code, reason, this.backoff.next());
    }
  }

  private retry(code: number, reason: string, delay: number): void {
    if (this.currentState === "closed") return;
    this.setState("disconnected");
    this.emit("disconnected", { code, reason, willRetry: true, retryInMs: delay });
    this.cancelRetry();
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      if (this.currentState === "disconnected") void this.open();
    }, delay);
  }

  private cancelRetry(): void {
    if (this.retryTimer !== null) clearTimeout(this.retryTimer);
    this.retryTimer = null;
  }

  private stop(reason: string, code = Close.NORMAL as number): void {
    if (this.currentState === "closed") return;
    const wasConnected = this.conn !== null;
    this.setState("closed");
    this.cancelRetry();
    const conn = this.conn;
    this.conn = null;
    if (conn && !conn.ended) {
      conn.ended = true;
      if (conn.timer) clearInterval(conn.timer);
      conn.ws.onmessage = null;
      conn.ws.onclose = null;
      try {
        conn.ws.close(Close.NORMAL, "client closed");
      } catch {
        // already closed
      }
    }
    const error = new ClosedError(`switchyard: ${reason}`);
    for (const p of [...this.inflight.values(), ...this.queue.splice(0)]) p.reject(error);
    this.inflight.clear();
    for (const sub of this.subs.values()) sub.end();
    this.subs.clear();
    if (wasConnected || code !== Close.NORMAL) {
      this.emit("disconnected", { code, reason, willRetry: false });
    }
    this.emit("closed", { reason });
  }

  // ---- tokens ----

  private async tokenForConnection(): Promise<string> {
    const exp = this.token ? tokenExpiry(this.token) : null;
    const nearExpiry = exp !== null && exp - Date.now() / 1000 < TOKEN_MARGIN_S;
    if (this.token && !this.tokenStale && !nearExpiry) return this.token;
    if (!this.options.getToken) {
      if (!this.token || (exp !== null && exp <= Date.now() / 1000)) {
        // A fixed token that expired can never connect again.
        throw new ClosedError("the token expired and there is no getToken to renew it");
      }
      return this.token;
    }
    const reason: TokenReason = !this.token ? "connect" : nearExpiry ? "expired" : (this.tokenStale ?? "refused");
    return this.fetchToken(reason);
  }

  private async fetchToken(reason: TokenReason): Promise<string> {
    const getToken = this.options.getToken;
    if (!getToken) throw new Error("switchyard: no getToken");
    const token = await getToken({ reason });
    if (typeof token !== "string" || token === "") throw new Error("switchyard: getToken returned no token");
    this.token = token;
    this.tokenStale = null;
    this.emit("token", { reason });
    return token;
  }

  /** `expiring`: one refresh in flight per connection, dropped if the connection ends. */
  private async refreshFor(conn: Connection): Promise<void> {
    conn.expiring = true;
    if (!this.options.getToken || conn.refreshing) return;
    conn.refreshing = true;
    try {
      const token = await this.fetchToken("refresh");
      // The connection this refresh was for is gone: the next one has its own token.
      if (this.conn !== conn || conn.ended) return;
      await this.requestOn(conn, { type: "refresh", token });
      conn.expiring = false;
    } catch (e) {
      if (e instanceof ServerError && e.code === ErrorCode.REFRESH_REFUSED) this.tokenStale = "refused";
      if (!conn.ended) console.error("switchyard: token refresh failed; the connection will end at expiry", e);
    } finally {
      conn.refreshing = false;
    }
  }

  // ---- frames ----

  private handle(conn: Connection, frame: ServerFrame): void {
    switch (frame.type) {
      case "msg": {
        this.subs.get(frame.channel as string)?.deliver(frame as unknown as Publication);
        return;
      }
      case "join":
      case "leave":
        this.subs.get(frame.channel as string)?.presence(frame.type, frame as unknown as JoinLeave);
        return;
      case "expiring":
        void this.refreshFor(conn);
        return;
      case "reconnect":
        conn.reconnectAfterMs = typeof frame.after_ms === "number" ? frame.after_ms : null;
        return;
      case "pong":
        return;
    }
    if (typeof frame.id !== "number") {
      if (frame.type === "error") this.emit("error", new ServerError(frame.code as number, String(frame.reason)));
      return;
    }
    const sub = this.subscribing.get(frame.id);
    if (sub) {
      this.subscribing.delete(frame.id);
      if (frame.type === "subscribed") sub.subscribed(frame as unknown as Subscribed);
      else if (frame.type === "error") this.subscribeFailed(sub, new ServerError(frame.code as number, String(frame.reason)));
      return;
    }
    const p = this.inflight.get(frame.id);
    if (!p) return;
    this.inflight.delete(frame.id);
    if (frame.type !== "error") return p.resolve(frame);
    const error = new ServerError(frame.code as number, String(frame.reason));
    const retries = this.options.publishRetries ?? 5;
    if (p.kind === "publish" && error.code === ErrorCode.UNAVAILABLE && p.retries < retries) {
      // Outcome unknown: the same msg_id again, after a pause.
      p.retries += 1;
      setTimeout(() => {
        try {
          this.enqueue(p);
        } catch (e) {
          p.reject(e as Error);
        }
      }, Math.floor(this.random() * 250 * 2 ** p.retries));
      return;
    }
    p.reject(error);
  }

  private subscribeFailed(sub: Subscription, error: ServerError): void {
    if (!sub.isActive) return;
    if (error.code === ErrorCode.UNAVAILABLE) {
      // The backbone is away for a moment: try again on this connection.
      setTimeout(() => {
        if (sub.isActive && this.conn?.welcome) this.sendSubscribe(sub);
      }, 250 + Math.floor(this.random() * 1_000));
      return;
    }
    this.subs.delete(sub.channel);
    sub.refused(error);
  }

  private sendSubscribe(sub: Subscription): void {
    const conn = this.conn;
    if (!conn?.welcome) return;
    const id = this.nextId++;
    this.subscribing.set(id, sub);
    this.sendOn(conn, sub.frame(id));
  }

  private unsubscribe(sub: Subscription): void {
    if (this.subs.get(sub.channel) !== sub) return;
    this.subs.delete(sub.channel);
    sub.end();
    if (this.conn?.welcome) {
      for (const [id, s] of this.subscribing) if (s === sub) this.subscribing.delete(id);
      this.sendNow({ type: "unsubscribe", channel: sub.channel, id: this.nextId++ });
    }
  }

  private request(kind: Pending["kind"], frame: Record<string, unknown>): Promise<ServerFrame> {
    if (this.currentState === "closed") return Promise.reject(new ClosedError());
    return new Promise((resolve, reject) => {
      const p: Pending = { kind, frame, resolve, reject, retries: 0 };
      try {
        this.enqueue(p);
      } catch (e) {
        reject(e as Error);
      }
    });
  }

  /** A request on this connection only (never queued for the next). */
  private requestOn(conn: Connection, frame: Record<string, unknown>): Promise<ServerFrame> {
    return new Promise((resolve, reject) => {
      const p: Pending = { kind: "refresh", frame, resolve, reject, retries: 0 };
      this.dispatch(conn, p);
    });
  }

  private enqueue(p: Pending): void {
    if (this.currentState === "closed") return p.reject(new ClosedError());
    const conn = this.conn;
    if (conn?.welcome && !conn.ended) return this.dispatch(conn, p);
    if (this.queue.length >= (this.options.queueLimit ?? 1_000)) throw new QueueFullError(this.options.queueLimit ?? 1_000);
    this.queue.push(p);
  }

  private dispatch(conn: Connection, p: Pending): void {
    const id = this.nextId++;
    this.inflight.set(id, p);
    this.sendOn(conn, { ...p.frame, id });
  }

  private sendNow(frame: Record<string, unknown>): void {
    if (this.conn?.welcome) this.sendOn(this.conn, frame);
  }

  private sendOn(conn: Connection, frame: Record<string, unknown>): void {
    if (conn.ended) return;
    try {
      conn.ws.send(JSON.stringify(frame));
    } catch {
      // The close event follows and requeues what is in flight.
    }
  }
}
