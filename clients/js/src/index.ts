/** switchyard's client: reconnect, resume, token refresh and queued publishes over one WebSocket. */

export { Client, tokenExpiry } from "./client.js";
export type { ClientEvents, ClientOptions, State, TokenReason, WebSocketConstructor, WebSocketLike } from "./client.js";
export { Subscription } from "./subscription.js";
export type { AckMode, Gap, SubscribeOptions, SubscriptionEvents } from "./subscription.js";
export { Backoff } from "./backoff.js";
export type { BackoffOptions } from "./backoff.js";
export { ClosedError, QueueFullError, ServerError } from "./errors.js";
export { Close, ErrorCode } from "./protocol.js";
export type {
  HistoryPage,
  JoinLeave,
  Position,
  PresenceClient,
  PresencePage,
  Publication,
  Published,
  Subscribed,
  Welcome,
} from "./protocol.js";
