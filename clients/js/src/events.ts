/** A small typed event emitter (no dependency on Node's or the DOM's). */

type Listener<T> = (event: T) => unknown;

/** Emits events of the map `E` (event name → payload). */
export class Emitter<E extends object> {
  private listeners: { [K in keyof E]?: Listener<E[K]>[] } = {};

  /** Calls `listener` for every `name` event; returns a function that removes it. */
  on<K extends keyof E>(name: K, listener: Listener<E[K]>): () => void {
    (this.listeners[name] ??= []).push(listener);
    return () => this.off(name, listener);
  }

  /** Calls `listener` for the next `name` event only. */
  once<K extends keyof E>(name: K, listener: Listener<E[K]>): () => void {
    const off = this.on(name, (event) => {
      off();
      return listener(event);
    });
    return off;
  }

  off<K extends keyof E>(name: K, listener: Listener<E[K]>): void {
    const list = this.listeners[name];
    if (list) this.listeners[name] = list.filter((l) => l !== listener);
  }

  /** Whether anything listens for `name`. */
  listens<K extends keyof E>(name: K): boolean {
    return (this.listeners[name]?.length ?? 0) > 0;
  }

  /**
   * Calls the listeners in order and returns what they returned (promises
   * included, so a caller can wait for asynchronous handlers). A listener that
   * throws does not stop the others; the error is reported on the console.
   */
  protected emit<K extends keyof E>(name: K, event: E[K]): unknown[] {
    const results: unknown[] = [];
    for (const l of [...(this.listeners[name] ?? [])]) {
      try {
        results.push(l(event));
      } catch (e) {
        console.error(`switchyard: a "${String(name)}" listener threw`, e);
      }
    }
    return results;
  }
}
