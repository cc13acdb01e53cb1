/** Errors the client rejects with. */

/** The server answered a request with an `error` frame (docs/protocol.md, "Error codes"). */
export class ServerError extends Error {
  constructor(readonly code: number, readonly reason: string) {
    super(`switchyard error ${code}: ${reason}`);
    this.name = "ServerError";
  }
}

/** The client was closed (by `close()`, or for good: e.g. kicked, or a token that cannot be renewed). */
export class ClosedError extends Error {
  constructor(message = "the client is closed") {
    super(message);
    this.name = "ClosedError";
  }
}

/** The queue of publishes waiting for a connection is full. */
export class QueueFullError extends Error {
  constructor(limit: number) {
    super(`the publish queue is full (${limit} waiting for a connection)`);
    this.name = "QueueFullError";
  }
}
