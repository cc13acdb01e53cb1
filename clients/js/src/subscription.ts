/** One channel subscription: where its stream stands, in-order exactly-once delivery across reconnects, and acks. */

import { Emitter } from "./events.js";
import { ServerError } from "./errors.js";
import type { JoinLeave, Position, Publication, Subscribed } from "./protocol.js";

/** How a subscription acks in an acked namespace. */
export type AckMode = "auto" | "manual" | false;

/** What `subscribe` takes. */
export interface SubscribeOptions {
  /** Start after this position (a `{seq, epoch}` the app stored). */
  since?: Position;
  /** The newest N publications first (when there is no `since`). */
  snapshot?: number;
  /**
   * Acked namespaces: `"auto"` acks each publication once every `publication`
   * listener has returned (and any promise it returned has resolved), batched;
   * `"manual"`: call `ack(seq)`; `false` (default): never ack.
   */
  ack?: AckMode;
}

/** Why the app must reload its state for this channel. */
export interface Gap {
  channel: string;
  /** Where the channel's stream stands now. */
  position: Position;
  /** The epoch this subscription had before, if any (a different one: the stream was recreated). */
  previousEpoch?: string;
  /** How many publications the server is about to replay. */
  replayed: number;
}

/** Events of a subscription. */
export interface SubscriptionEvents {
  /** A publication, in seq order, never twice (also across reconnects). */
  publication: Publication;
  /** Every `subscribed` reply: the first one and each resume after a reconnect. */
  subscribed: Subscribed & { resumed: boolean };
  /**
   * The server could not prove that nothing was missed (`recovered: false`):
   * history was trimmed, the stream was recreated, or a stored cursor was lost.
   * Reload the channel's state from your backend. Never silent: without a
   * listener the client logs it as an error.
   */
  gap: Gap;
  join: JoinLeave;
  leave: JoinLeave;
  /** The server refused the subscription (e.g. permission denied); it is over. */
  error: ServerError;
  /** The subscription ended (`unsubscribe()`, a refusal, or `client.close()`). */
  unsubscribed: { channel: string };
}

/** The client side a subscription needs: sending frames. */
export interface SubscriptionHost {
  sendAck(channel: string, seq: number): void;
  unsubscribe(sub: Subscription): void;
}

/** A subscription to one channel; it lives across reconnects until `unsubscribe()`. */
export class Subscription extends Emitter<SubscriptionEvents> {
  /** Everything up to here was delivered (or deliberately skipped); `null`: nothing yet. */
  private cursor: Position | null;
  private epoch: string | null = null;
  private subscribedOnce = false;
  private active = true;
  /** Auto-ack: publications handed to the app whose handlers have not finished, in order. */
  private processing: { seq: number; done: boolean }[] = [];
  private acked = 0;
  /** The highest seq whose processing (and everything's before it) finished. */
  private pendingAck = 0;
  private ackTimer: ReturnType<typeof setTimeout> | null = null;

  constructor(
    readonly channel: string,
    private readonly options: SubscribeOptions,
    private readonly host: SubscriptionHost,
    private readonly ackDelayMs: number,
  ) {
    super();
    this.cursor = options.since ? { ...options.since } : null;
  }

  /** Where a resume starts: after the last delivered publication, in its epoch. */
  get position(): Position | null {
    return this.cursor ? { ...this.cursor } : null;
  }

  /** Whether the subscription is still wanted. */
  get isActive(): boolean {
    return this.active;
  }

  /** Ends the subscription. */
  unsubscribe(): void {
    if (!this.active) return;
    this.host.unsubscribe(this);
  }

  /** Acks `seq` (manual mode; auto mode does this itself). */
  ack(seq: number): void {
    if (!this.active || seq <= this.acked) return;
    this.acked = seq;
    this.host.sendAck(this.channel, seq);
  }

  /** The `subscribe` frame for the next (re)subscription. @internal */
  frame(id: number): Record<string, unknown> {
    const frame: Record<string, unknown> = { type: "subscribe", channel: this.channel, id };
    if (this.cursor) frame.since = { seq: this.cursor.seq, epoch: this.cursor.epoch };
    else if (this.options.snapshot !== undefined) frame.snapshot = this.options.snapshot;
    return frame;
  }

  /** The server's `subscribed` reply. @internal */
  subscribed(reply: Subscribed): void {
    if (!this.active) return;
    const previousEpoch = this.epoch ?? this.cursor?.epoch;
    const resumed = this.subscribedOnce;
    this.subscribedOnce = true;
    this.epoch = reply.position.epoch;
    if (this.cursor && this.cursor.epoch !== reply.position.epoch) {
      // Another incarnation of the stream: its seqs start over, and the server
      // replays what it retains from the start.
      this.cursor = { seq: 0, epoch: reply.position.epoch };
    } else if (!this.cursor && reply.replayed === 0) {
      // Live from here: a resume continues after the top seen now.
      this.cursor = { ...reply.position };
    }
    // An ack written on a connection that then died may never have arrived: the
    // cursor only moves forward, so saying it again is harmless.
    if (resumed && this.acked > 0) this.host.sendAck(this.channel, this.acked);
    this.emit("subscribed", { ...reply, resumed });
    if (!reply.recovered) {
      const gap: Gap = {
        channel: this.channel,
        position: { ...reply.position },
        replayed: reply.replayed,
        ...(previousEpoch !== undefined && previousEpoch !== reply.position.epoch ? { previousEpoch } : {}),
      };
      if (this.listens("gap")) this.emit("gap", gap);
      else
        console.error(
          `switchyard: channel ${this.channel} has a gap (recovered: false): reload its state; ` +
            `listen for subscription.on("gap") to handle it`,
          gap,
        );
    }
  }

  /** A `msg` frame for this channel. @internal */
  deliver(publication: Publication): void {
    if (!this.active || this.epoch === null) return;
    if (this.cursor && publication.seq <= this.cursor.seq) return;
    this.cursor = { seq: publication.seq, epoch: this.epoch };
    const results = this.emit("publication", publication);
    if (this.options.ack === "auto") this.track(publication.seq, results);
  }

  /** A `join` or `leave` frame for this channel. @internal */
  presence(kind: "join" | "leave", event: JoinLeave): void {
    if (this.active) this.emit(kind, event);
  }

  /** The server refused the subscription. @internal */
  refused(error: ServerError): void {
    this.emit("error", error);
    this.end();
  }

  /** The subscription is over. @internal */
  end(): void {
    if (!this.active) return;
    this.flushAck();
    this.active = false;
    this.processing = [];
    this.emit("unsubscribed", { channel: this.channel });
  }

  private track(seq: number, results: unknown[]): void {
    const entry = { seq, done: false };
    this.processing.push(entry);
    const pending = results.filter((r): r is Promise<unknown> => r instanceof Promise);
    if (pending.length === 0) {
      entry.done = true;
      this.advance();
      return;
    }
    // An app that failed to process a publication does not ack it, nor anything after.
    Promise.all(pending).then(
      () => {
        entry.done = true;
        this.advance();
      },
      (e) => console.error(`switchyard: a publication handler on ${this.channel} failed; not acking seq ${seq}`, e),
    );
  }

  private advance(): void {
    while (this.processing.length > 0 && this.processing[0]!.done) this.pendingAck = this.processing.shift()!.seq;
    if (this.pendingAck > this.acked && this.ackTimer === null) {
      this.ackTimer = setTimeout(() => this.flushAck(), this.ackDelayMs);
    }
  }

  private flushAck(): void {
    if (this.ackTimer !== null) clearTimeout(this.ackTimer);
    this.ackTimer = null;
    if (this.pendingAck > this.acked) this.ack(this.pendingAck);
  }
}
