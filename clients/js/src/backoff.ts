/** Reconnect delays: exponential growth with full jitter (a uniform draw between 0 and the bound). */

/** Bounds of the reconnect delay. */
export interface BackoffOptions {
  /** The bound of the first retry, in ms (default 250). */
  minMs?: number;
  /** The largest bound, in ms (default 30,000). */
  maxMs?: number;
}

/** Delays for consecutive failed attempts; `reset` after a connection that worked. */
export class Backoff {
  private attempt = 0;
  readonly minMs: number;
  readonly maxMs: number;

  constructor(options: BackoffOptions = {}, private readonly random: () => number = Math.random) {
    this.minMs = Math.max(1, options.minMs ?? 250);
    this.maxMs = Math.max(this.minMs, options.maxMs ?? 30_000);
  }

  /** The upper bound for the next attempt: minMs·2^attempt, capped at maxMs. */
  bound(): number {
    return Math.min(this.maxMs, this.minMs * 2 ** Math.min(this.attempt, 30));
  }

  /** The delay before the next attempt; every call counts one more failure. */
  next(): number {
    // Full jitter: clients that lost the same node do not come back in step.
    const delay = Math.floor(this.random() * this.bound());
    this.attempt += 1;
    return delay;
  }

  /** Back to the first bound. */
  reset(): void {
    this.attempt = 0;
  }
}
