// The SDK against the real binary on the memory engine: resume after a killed
// socket, token expiry (4002) and refresh, a slow-consumer close (4008), a drain
// (4012). Run by `make test` (`npm test` in clients/js).

import { test } from "node:test";
import assert from "node:assert/strict";
import { Client } from "../dist/index.js";
import { apiPublish, collect, next, startNode, token, trackedWebSocket, until } from "./helpers.mjs";

test("a killed socket: the subscription resumes with exactly the missed publications", async () => {
  const node = await startNode();
  const ws = trackedWebSocket();
  // The largest delay of the first backoff bound: the publications below are
  // written while the client is away.
  const client = new Client(node.ws, { token: token("kim"), WebSocket: ws.WebSocket, random: () => 0.999, backoff: { minMs: 800 } });
  try {
    client.connect();
    const sub = client.subscribe("chat.room.kill");
    const got = collect(sub);
    await next(sub, "subscribed");
    for (let i = 0; i < 5; i++) await apiPublish(node, "chat.room.kill", { i });
    await until(() => got.seqs.length === 5, "the first five");
    const down = next(client, "disconnected");
    ws.last().terminate();
    const { willRetry, retryInMs } = await down;
    assert.equal(willRetry, true);
    const missed = [];
    for (let i = 5; i < 15; i++) missed.push((await apiPublish(node, "chat.room.kill", { i })).seq);
    const resumed = await next(sub, "subscribed");
    assert.ok(retryInMs >= 700, `the retry waited ${retryInMs} ms`);
    assert.equal(resumed.resumed, true);
    assert.equal(resumed.recovered, true);
    assert.equal(resumed.replayed, 10, "exactly the ten missed publications are replayed");
    await until(() => got.seqs.length === 15, "all fifteen");
    assert.deepEqual(got.data.map((d) => d.i), [...Array(15).keys()]);
    assert.deepEqual(got.seqs.slice(5), missed);
    await apiPublish(node, "chat.room.kill", { i: 15 });
    await until(() => got.seqs.length === 16, "live after the resume");
  } finally {
    client.close();
    await node.kill();
  }
});

test("4002: a token that expires unrefreshed gets a new one, and the subscription resumes", async () => {
  const node = await startNode({ SWITCHYARD_AUTH__EXPIRING_NOTICE: "1s" });
  const reasons = [];
  const client = new Client(node.ws, {
    getToken: ({ reason }) => {
      reasons.push(reason);
      // The refresh fails (an auth service that is down): the connection runs
      // into its expiry, and the next one fetches a token of its own.
      if (reason === "refresh") throw new Error("auth service unavailable");
      return token("exp", reasons.length === 1 ? "3s" : "1h");
    },
    WebSocket: trackedWebSocket().WebSocket,
  });
  const errors = console.error;
  console.error = () => {};
  try {
    client.connect();
    const sub = client.subscribe("chat.room.expiry");
    const got = collect(sub);
    await next(sub, "subscribed");
    await apiPublish(node, "chat.room.expiry", { n: 1 });
    const closed = await next(client, "disconnected", 10_000);
    assert.equal(closed.code, 4002);
    assert.equal(closed.willRetry, true);
    await apiPublish(node, "chat.room.expiry", { n: 2 });
    const resumed = await next(sub, "subscribed");
    assert.equal(resumed.recovered, true);
    await until(() => got.data.length === 2, "both publications");
    assert.deepEqual(got.data, [{ n: 1 }, { n: 2 }]);
    assert.deepEqual(reasons, ["connect", "refresh", "expired"]);
  } finally {
    console.error = errors;
    client.close();
    await node.kill();
  }
});

test("expiring: the token is refreshed in place, one refresh per notice, the connection stays", async () => {
  const node = await startNode({ SWITCHYARD_AUTH__EXPIRING_NOTICE: "1s" });
  const reasons = [];
  const client = new Client(node.ws, {
    getToken: ({ reason }) => (reasons.push(reason), token("fresh", "3s")),
    WebSocket: trackedWebSocket().WebSocket,
  });
  let disconnects = 0;
  client.on("disconnected", () => disconnects++);
  try {
    client.connect();
    const { welcome } = await next(client, "connected");
    // Two lifetimes of the first token: alive only if both refreshes took.
    await next(client, "token", 10_000, (t) => t.reason === "refresh");
    await next(client, "token", 10_000, (t) => t.reason === "refresh");
    // The refreshed connection still serves requests.
    const published = await client.publish("chat.room.fresh", { alive: true });
    assert.equal(published.duplicate, false);
    assert.equal(disconnects, 0);
    assert.equal(client.welcome.conn_id, welcome.conn_id);
    assert.deepEqual(reasons.slice(0, 3), ["connect", "refresh", "refresh"]);
  } finally {
    client.close();
    await node.kill();
  }
});

test("4008: a slow consumer is closed, resumes at once, and loses nothing", async () => {
  const node = await startNode({ SWITCHYARD_SESSION__OUTBOX_MESSAGES: "32", SWITCHYARD_SESSION__OUTBOX_BYTES: "65536" });
  const ws = trackedWebSocket();
  const client = new Client(node.ws, { token: token("slow"), WebSocket: ws.WebSocket });
  try {
    client.connect();
    const sub = client.subscribe("chat.room.slow");
    const got = collect(sub);
    await next(sub, "subscribed");
    const closed = next(client, "disconnected", 60_000);
    // The client stops reading; the server's outbox for it fills.
    ws.last()._socket.pause();
    const text = "x".repeat(12_000);
    const seqs = [];
    for (let i = 0; i < 600; i++) seqs.push((await apiPublish(node, "chat.room.slow", { i, text })).seq);
    ws.last()._socket.resume();
    const { code, retryInMs } = await closed;
    assert.equal(code, 4008);
    assert.equal(retryInMs, 0, "a slow-consumer close reconnects at once");
    await until(() => got.seqs.length === 600, "all 600 publications", 30_000);
    assert.deepEqual(got.seqs, seqs);
  } finally {
    client.close();
    await node.kill();
  }
});

test("4012: a draining node's reconnect {after_ms} is honoured, and a new stream is a gap", async () => {
  const node = await startNode({ SWITCHYARD_SERVER__RECONNECT_JITTER: "1500ms", SWITCHYARD_SERVER__DRAIN_TIMEOUT: "5s" });
  const client = new Client(node.ws, { token: token("drain"), WebSocket: trackedWebSocket().WebSocket, backoff: { minMs: 50, maxMs: 200 } });
  try {
    client.connect();
    const sub = client.subscribe("chat.room.drain");
    const got = collect(sub);
    await next(sub, "subscribed");
    await apiPublish(node, "chat.room.drain", { before: true });
    await until(() => got.data.length === 1, "the first publication");
    const closed = next(client, "disconnected");
    void node.drain();
    const { code, retryInMs } = await closed;
    const at = Date.now();
    assert.equal(code, 4012);
    assert.ok(retryInMs >= 0 && retryInMs <= 1500, `retryInMs ${retryInMs} is the server's after_ms`);
    const attempt = next(client, "connecting");
    await node.exited;
    // The same port, a new process: the memory engine's stream is a new incarnation.
    const again = startNode({}, node.port);
    await attempt;
    assert.ok(Date.now() - at >= retryInMs - 5, "no attempt before after_ms");
    const restarted = await again;
    try {
      const gap = await next(sub, "gap", 20_000);
      assert.equal(gap.channel, "chat.room.drain");
      assert.ok(gap.previousEpoch && gap.previousEpoch !== gap.position.epoch);
      await apiPublish(restarted, "chat.room.drain", { after: true });
      await until(() => got.data.length === 2, "a publication on the new stream");
      assert.deepEqual(got.data[1], { after: true });
    } finally {
      client.close();
      await restarted.kill();
    }
  } finally {
    client.close();
    if (node.proc.exitCode === null) await node.kill();
  }
});

test("publishes issued before connecting wait in a bounded queue, are stored once, and close() refuses more", async () => {
  const node = await startNode();
  const client = new Client(node.ws, { token: token("queue"), WebSocket: trackedWebSocket().WebSocket, queueLimit: 2 });
  const sub = client.subscribe("chat.room.queue");
  const got = collect(sub);
  const early = [client.publish("chat.room.queue", { n: 1 }), client.publish("chat.room.queue", { n: 2 }, { msgId: "fixed-2" })];
  await assert.rejects(client.publish("chat.room.queue", { n: 9 }), { name: "QueueFullError" });
  client.connect();
  const replies = await Promise.all(early);
  assert.deepEqual(replies.map((r) => r.duplicate), [false, false]);
  const again = await client.publish("chat.room.queue", { n: 2 }, { msgId: "fixed-2" });
  assert.equal(again.duplicate, true);
  assert.equal(again.seq, replies[1].seq);
  await until(() => got.data.length === 2, "both publications");
  client.close();
  await assert.rejects(client.publish("chat.room.queue", { n: 3 }), { name: "ClosedError" });
  await node.kill();
});
