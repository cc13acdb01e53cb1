// Unit tests: the backoff, and the client against a scripted fake server (a real
// `ws` WebSocketServer whose every frame the test writes) for what a real node
// cannot be made to do on cue: refresh races, dead links, duplicates, 4003.

import { afterEach, test } from "node:test";
import assert from "node:assert/strict";
import { WebSocketServer } from "ws";
import WebSocket from "ws";
import { Backoff, Client, tokenExpiry } from "../dist/index.js";
import { next, until } from "./helpers.mjs";

// Everything a test opened is closed after it, passed or failed.
const opened = [];
afterEach(async () => {
  for (const x of opened.splice(0).reverse()) await x.close();
});
const track = (x) => (opened.push(x), x);

/** A fake token whose `exp` is `inS` seconds away (the client reads `exp`; nothing verifies it). */
function fakeToken(inS, tag = "t") {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${b64({ alg: "none" })}.${b64({ sub: "u", exp: Math.floor(Date.now() / 1000) + inS, tag })}.sig`;
}

/** A scripted server: `onConnection(conn)` per connection; `conn.frames` is what the client sent. */
async function fakeServer(onConnection) {
  const wss = new WebSocketServer({ port: 0, host: "127.0.0.1", handleProtocols: () => "switchyard.v1" });
  await new Promise((r) => wss.once("listening", r));
  const conns = [];
  wss.on("connection", (ws, req) => {
    const conn = {
      ws,
      frames: [],
      token: (req.headers["sec-websocket-protocol"] ?? "").split(",").map((s) => s.trim()).find((p) => p.startsWith("bearer."))?.slice(7),
      send: (f) => ws.send(JSON.stringify(f)),
      welcome: (extra = {}) =>
        conn.send({ type: "welcome", conn_id: `c${conns.length}`, node: "fake", user: "u", expires_at: 0, ping_interval_ms: 25_000, ...extra }),
      waiters: [],
    };
    conns.push(conn);
    ws.on("message", (data) => {
      const f = JSON.parse(String(data));
      conn.frames.push(f);
      for (const w of [...conn.waiters]) w(f);
    });
    onConnection(conn, conns.length - 1);
  });
  return track({
    url: `ws://127.0.0.1:${wss.address().port}/ws`,
    conns,
    /** The next frame of `type` this connection receives (or already received, not yet taken). */
    frame(conn, type, ms = 10_000) {
      return until(() => conn.frames.find((f) => f.type === type && !f.taken && (f.taken = true)), `a ${type} frame`, ms);
    },
    close: () => new Promise((r) => (wss.clients.forEach((c) => c.terminate()), wss.close(() => r()))),
  });
}

test("backoff: full jitter under a doubling bound, capped, reset", () => {
  const draws = [0.999, 0.5, 0, 0.999, 0.999, 0.999, 0.999];
  const b = new Backoff({ minMs: 100, maxMs: 1_000 }, () => draws.shift());
  assert.equal(b.bound(), 100);
  assert.equal(b.next(), 99); // 0.999 × 100
  assert.equal(b.next(), 100); // 0.5 × 200
  assert.equal(b.next(), 0); // 0 × 400: full jitter reaches zero
  assert.equal(b.next(), 799); // 0.999 × 800
  assert.equal(b.next(), 999); // capped at 1,000
  assert.equal(b.bound(), 1_000);
  b.reset();
  assert.equal(b.bound(), 100);
  // Defaults: 250 ms doubling up to 30 s.
  const d = new Backoff({}, () => 0.5);
  for (let i = 0; i < 20; i++) d.next();
  assert.equal(d.bound(), 30_000);
});

test("tokenExpiry reads exp, and nothing from a malformed token", () => {
  const t = fakeToken(100);
  assert.ok(Math.abs(tokenExpiry(t) - (Date.now() / 1000 + 100)) < 2);
  assert.equal(tokenExpiry("not-a-jwt"), null);
  assert.equal(tokenExpiry("a.%%%.b"), null);
});

test("a fixed token that has expired: the client closes instead of reconnecting forever", async () => {
  const server = await fakeServer((c) => c.welcome());
  const client = track(new Client(server.url, { token: fakeToken(-60), WebSocket }));
  const closed = next(client, "closed");
  client.connect();
  const { reason } = await closed;
  assert.match(reason, /expired/);
  assert.equal(server.conns.length, 0, "no connection was attempted");
  await server.close();
});

test("refresh: one refresh per connection; a refresh outlived by its connection is dropped, the reconnect gets its own token", async () => {
  const server = await fakeServer((c) => c.welcome());
  const calls = [];
  let releaseRefresh;
  const client = track(new Client(server.url, {
    WebSocket,
    backoff: { minMs: 10, maxMs: 20 },
    getToken: ({ reason }) => {
      calls.push(reason);
      // The first refresh waits until the test lets it finish.
      if (reason === "refresh" && !releaseRefresh) return new Promise((r) => (releaseRefresh = () => r(fakeToken(3600, "late"))));
      return fakeToken(3600, `t${calls.length}`);
    },
  }));
  client.connect();
  await next(client, "connected");
  const first = server.conns[0];
  first.send({ type: "expiring", in_ms: 1000 });
  first.send({ type: "expiring", in_ms: 900 });
  await until(() => calls.length === 2, "the refresh's getToken");
  // The connection dies while the refresh is waiting for its token.
  const reconnected = next(client, "connected");
  first.ws.terminate();
  await reconnected;
  const second = server.conns[1];
  assert.match(Buffer.from(second.token.split(".")[1], "base64url").toString(), /"tag":"t3"/, "the reconnect fetched its own token");
  // The late token arrives after its connection died.
  const late = next(client, "token", 5_000, (t) => t.reason === "refresh");
  releaseRefresh();
  await late;
  assert.deepEqual(calls, ["connect", "refresh", "expired"]);
  assert.equal(first.frames.filter((f) => f.type === "refresh").length, 0, "nothing was sent on the dead connection");
  // The new connection's own expiring starts its own chain; had the stale refresh
  // been sent, it would be the first refresh frame here (its token came first).
  second.send({ type: "expiring", in_ms: 1000 });
  const refresh = await server.frame(second, "refresh");
  assert.match(Buffer.from(refresh.token.split(".")[1], "base64url").toString(), /"tag":"t4"/, "the stale refresh was not sent on the new connection");
  second.send({ type: "refreshed", id: refresh.id, expires_at: 1 });
  assert.deepEqual(calls, ["connect", "refresh", "expired", "refresh"], "two expiring frames on the first connection, one refresh");
  assert.equal(second.frames.filter((f) => f.type === "refresh").length, 1);
  client.close();
  await server.close();
});

test("a refresh that arrives on its connection is sent there once", async () => {
  const server = await fakeServer((c) => c.welcome());
  const client = track(new Client(server.url, { WebSocket, getToken: ({ reason }) => fakeToken(3600, reason) }));
  client.connect();
  await next(client, "connected");
  const conn = server.conns[0];
  conn.send({ type: "expiring", in_ms: 1000 });
  const refresh = await server.frame(conn, "refresh");
  assert.match(Buffer.from(refresh.token.split(".")[1], "base64url").toString(), /"tag":"refresh"/);
  conn.send({ type: "refreshed", id: refresh.id, expires_at: 2 });
  assert.equal(conn.frames.filter((f) => f.type === "refresh").length, 1);
  client.close();
  await server.close();
});

test("a silent link: an app-level ping after two intervals, a reconnect after three", async () => {
  const server = await fakeServer((c) => c.welcome({ ping_interval_ms: 1_000 }));
  const client = track(new Client(server.url, { WebSocket, token: fakeToken(3600), backoff: { minMs: 10, maxMs: 20 } }));
  client.connect();
  await next(client, "connected");
  const conn = server.conns[0];
  await server.frame(conn, "ping", 5_000);
  const { code } = await next(client, "disconnected", 5_000);
  assert.equal(code, 4000);
  await until(() => server.conns.length === 2, "a new connection");
  client.close();
  await server.close();
});

test("a resume sends since = the last seq and epoch; duplicates are dropped; recovered false is a gap", async () => {
  const server = await fakeServer((c) => c.welcome());
  const client = track(new Client(server.url, { WebSocket, token: fakeToken(3600), backoff: { minMs: 10, maxMs: 20 } }));
  client.connect();
  const sub = client.subscribe("chat.room.x");
  const seqs = [];
  sub.on("publication", (p) => seqs.push(p.seq));
  const first = await until(() => server.conns[0], "a connection");
  const s1 = await server.frame(first, "subscribe");
  assert.equal(s1.since, undefined);
  first.send({ type: "subscribed", id: s1.id, channel: "chat.room.x", position: { seq: 10, epoch: "e1" }, recovered: true, replayed: 0 });
  for (const seq of [11, 12, 12, 11, 14]) first.send({ type: "msg", channel: "chat.room.x", seq, ts: 0, data: {} });
  await until(() => seqs.length === 3, "three publications");
  assert.deepEqual(seqs, [11, 12, 14]);
  first.ws.terminate();
  const second = await until(() => server.conns[1], "a reconnect");
  const s2 = await server.frame(second, "subscribe");
  assert.deepEqual(s2.since, { seq: 14, epoch: "e1" });
  const gapped = next(sub, "gap");
  second.send({ type: "subscribed", id: s2.id, channel: "chat.room.x", position: { seq: 3, epoch: "e2" }, recovered: false, replayed: 3 });
  const gap = await gapped;
  assert.deepEqual(gap, { channel: "chat.room.x", position: { seq: 3, epoch: "e2" }, replayed: 3, previousEpoch: "e1" });
  // The new incarnation's seqs start over: they are not taken for duplicates.
  for (const seq of [1, 2, 3]) second.send({ type: "msg", channel: "chat.room.x", seq, ts: 0, data: {} });
  await until(() => seqs.length === 6, "the new stream's publications");
  assert.deepEqual(seqs, [11, 12, 14, 1, 2, 3]);
  client.close();
  await server.close();
});

test("a publish lost with its connection is sent again with the same msg_id", async () => {
  const server = await fakeServer((c) => c.welcome());
  const client = track(new Client(server.url, { WebSocket, token: fakeToken(3600), backoff: { minMs: 10, maxMs: 20 } }));
  client.connect();
  const reply = client.publish("chat.room.p", { hello: 1 });
  const first = await until(() => server.conns[0], "a connection");
  const p1 = await server.frame(first, "publish");
  assert.ok(p1.msg_id, "a msg_id is generated");
  first.ws.terminate();
  const second = await until(() => server.conns[1], "a reconnect");
  const p2 = await server.frame(second, "publish");
  assert.equal(p2.msg_id, p1.msg_id);
  second.send({ type: "published", id: p2.id, channel: "chat.room.p", seq: 7, duplicate: true });
  assert.deepEqual(await reply, { channel: "chat.room.p", seq: 7, duplicate: true });
  client.close();
  await server.close();
});

test("auto-ack: acks what the handlers finished, in order, batched", async () => {
  const server = await fakeServer((c) => c.welcome());
  const client = track(new Client(server.url, { WebSocket, token: fakeToken(3600), ackDelayMs: 20, backoff: { minMs: 10, maxMs: 20 } }));
  client.connect();
  const sub = client.subscribe("chat.room.a", { ack: "auto" });
  const finish = new Map();
  sub.on("publication", (p) => (p.seq === 2 ? new Promise((r) => finish.set(2, r)) : undefined));
  const conn = await until(() => server.conns[0], "a connection");
  const s = await server.frame(conn, "subscribe");
  conn.send({ type: "subscribed", id: s.id, channel: "chat.room.a", position: { seq: 0, epoch: "e" }, recovered: true, replayed: 0 });
  for (const seq of [1, 2, 3]) conn.send({ type: "msg", channel: "chat.room.a", seq, ts: 0, data: {} });
  const a1 = await server.frame(conn, "ack");
  assert.equal(a1.seq, 1, "seq 2 is still being processed: nothing past 1");
  await until(() => finish.has(2), "the slow handler");
  finish.get(2)();
  const a2 = await server.frame(conn, "ack");
  assert.equal(a2.seq, 3, "one ack covers 2 and 3");
  // After a reconnect the last ack is said again (the first may have been lost with the socket).
  conn.ws.terminate();
  const again = await until(() => server.conns[1], "a reconnect");
  const s2 = await server.frame(again, "subscribe");
  assert.deepEqual(s2.since, { seq: 3, epoch: "e" });
  again.send({ type: "subscribed", id: s2.id, channel: "chat.room.a", position: { seq: 3, epoch: "e" }, recovered: true, replayed: 0 });
  assert.equal((await server.frame(again, "ack")).seq, 3);
});

test("4003: a kicked client stops, unless told to reconnect", async () => {
  const server = await fakeServer((c) => (c.welcome(), setTimeout(() => c.ws.close(4003, "kicked"), 20)));
  const stopping = track(new Client(server.url, { WebSocket, token: fakeToken(3600) }));
  const closed = next(stopping, "closed");
  stopping.connect();
  assert.match((await closed).reason, /4003/);
  assert.equal(stopping.state, "closed");
  const persistent = track(new Client(server.url, { WebSocket, token: fakeToken(3600), reconnectAfterKick: true, backoff: { minMs: 10, maxMs: 20 } }));
  persistent.connect();
  const down = await next(persistent, "disconnected");
  assert.equal(down.willRetry, true);
  await until(() => server.conns.length >= 3, "a reconnect after the kick");
  persistent.close();
  await server.close();
});

test("a refusal before the upgrade backs off and asks getToken again", async () => {
  let refuse = 2;
  const wss = new WebSocketServer({ noServer: true });
  const { createServer } = await import("node:http");
  const http = createServer();
  http.on("upgrade", (req, socket, head) => {
    if (refuse-- > 0) {
      socket.end("HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n");
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) =>
      ws.send(JSON.stringify({ type: "welcome", conn_id: "c", node: "n", user: "u", expires_at: 0, ping_interval_ms: 25_000 })),
    );
  });
  await new Promise((r) => http.listen(0, "127.0.0.1", r));
  track({ close: () => new Promise((r) => (wss.clients.forEach((c) => c.terminate()), wss.close(), http.close(() => r()))) });
  const reasons = [];
  const delays = [];
  const client = track(new Client(`ws://127.0.0.1:${http.address().port}/ws`, {
    WebSocket,
    backoff: { minMs: 40, maxMs: 1_000 },
    random: () => 0.999,
    getToken: ({ reason }) => (reasons.push(reason), fakeToken(3600)),
  }));
  client.on("disconnected", (d) => delays.push(d.retryInMs));
  const errors = console.error;
  console.error = () => {};
  client.connect();
  await next(client, "connected", 10_000);
  console.error = errors;
  assert.deepEqual(reasons, ["connect", "refused", "refused"]);
  assert.deepEqual(delays, [39, 79], "exponential, full jitter at its top");
});
