// Real parts for the SDK tests: the switchyard binary (SDK_TEST_BINARY, not a
// SWITCHYARD_* name: the binary reads those as config; memory engine, or nats
// engine against a real nats-server -js), on free loopback ports, stopped by PID.

import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer, Socket } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";

const here = dirname(fileURLToPath(import.meta.url));
export const ROOT = resolve(here, "..", "..", "..");
export const BIN = process.env.SDK_TEST_BINARY ?? join(ROOT, "target", "debug", "switchyard");
export const CONFIG = join(ROOT, "config", "switchyard.toml");
export const HMAC = "sdk-test-hmac-secret-0123456789";
export const API_KEY = "sdk-test-api-key-0123456789";
const CAPS = ["chat.>=sub+pub+history+presence", "prices.>=sub+history"];

/** A free loopback port. */
export function freePort() {
  return new Promise((ok, fail) => {
    const srv = createServer();
    srv.on("error", fail);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => ok(port));
    });
  });
}

/** Resolves when `check` returns a truthy value, polling; rejects after `ms` (an upper bound). */
export async function until(check, what, ms = 15_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Resolves with the next `name` event of `emitter` (rejects after `ms`). */
export function next(emitter, name, ms = 15_000, filter = () => true) {
  return new Promise((ok, fail) => {
    const timer = setTimeout(() => {
      off();
      fail(new Error(`timed out waiting for "${name}"`));
    }, ms);
    const off = emitter.on(name, (e) => {
      if (!filter(e)) return;
      clearTimeout(timer);
      off();
      ok(e);
    });
  });
}

/** A development token from the binary itself. */
export function token(user, ttl = "1h") {
  return execFileSync(BIN, ["-c", CONFIG, "token", "--user", user, "--ttl", ttl, ...CAPS.flatMap((c) => ["--caps", c])], {
    env: { ...process.env, SWITCHYARD_AUTH__HMAC_SECRET: HMAC },
  })
    .toString()
    .trim();
}

/** nats-server with JetStream on a free port, in a temp dir. */
export async function startNats() {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "sy-sdk-nats-"));
  const bin = process.env.NATS_SERVER ?? join(ROOT, ".venv", "bin", "nats-server");
  const proc = spawn(bin, ["-js", "-a", "127.0.0.1", "-p", String(port), "-sd", dir], { stdio: "ignore" });
  await until(
    () =>
      new Promise((ok) => {
        const s = new Socket();
        s.once("connect", () => (s.destroy(), ok(true)));
        s.once("error", () => ok(false));
        s.connect(port, "127.0.0.1");
      }),
    "nats-server",
  );
  return {
    url: `nats://127.0.0.1:${port}`,
    stop() {
      proc.kill("SIGKILL");
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * A node: `switchyard serve` with the shipped config and `env` on top. Resolves
 * once /readyz answers 200. `port` reuses a port (a restart).
 */
export async function startNode(env = {}, port = undefined) {
  port ??= await freePort();
  const proc = spawn(BIN, ["-c", CONFIG, "serve"], {
    env: {
      ...process.env,
      SWITCHYARD_SERVER__LISTEN: `127.0.0.1:${port}`,
      SWITCHYARD_AUTH__HMAC_SECRET: HMAC,
      SWITCHYARD_API__KEY: API_KEY,
      SWITCHYARD_FEED__EMBEDDED: "false",
      RUST_LOG: "warn",
      ...env,
    },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  proc.stderr.on("data", (d) => (stderr += d));
  const exited = new Promise((ok) => proc.once("exit", (code, signal) => ok({ code, signal })));
  const http = `http://127.0.0.1:${port}`;
  await until(async () => {
    if (proc.exitCode !== null) throw new Error(`node exited: ${stderr}`);
    try {
      return (await fetch(`${http}/readyz`)).status === 200;
    } catch {
      return false;
    }
  }, "the node to be ready");
  return {
    port,
    http,
    ws: `ws://127.0.0.1:${port}/ws`,
    proc,
    exited,
    /** SIGTERM: the node drains (reconnect + 4012) and exits. */
    drain() {
      proc.kill("SIGTERM");
      return exited;
    },
    kill() {
      proc.kill("SIGKILL");
      return exited;
    },
  };
}

/** Publishes through the node's HTTP API; resolves with `{seq, duplicate}`. */
export async function apiPublish(node, channel, data, msgId) {
  const res = await fetch(`${node.http}/api/v1/publish`, {
    method: "POST",
    headers: { authorization: `apikey ${API_KEY}`, "content-type": "application/json" },
    body: JSON.stringify({ channel, data, ...(msgId ? { msg_id: msgId } : {}) }),
  });
  if (res.status !== 200) throw new Error(`publish: ${res.status} ${await res.text()}`);
  return res.json();
}

/** `ws`'s WebSocket, remembering every socket it opens (tests kill them). */
export function trackedWebSocket() {
  const sockets = [];
  class Tracked extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      sockets.push(this);
    }
  }
  return { WebSocket: Tracked, sockets, last: () => sockets[sockets.length - 1] };
}

/** Collects a subscription's publications. */
export function collect(sub) {
  const seqs = [];
  const data = [];
  sub.on("publication", (p) => {
    seqs.push(p.seq);
    data.push(p.data);
  });
  return { seqs, data };
}
