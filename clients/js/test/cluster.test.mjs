// The SDK against two nodes on a real nats-server with JetStream: the node the
// client is on is killed; the client reconnects to the other URL and resumes with
// no gap and no duplicate while a publisher keeps going.

import { test } from "node:test";
import assert from "node:assert/strict";
import { Client } from "../dist/index.js";
import { apiPublish, collect, next, startNats, startNode, token, trackedWebSocket, until } from "./helpers.mjs";

test("the client's node is killed: it resumes on the other node, no gap, no duplicate, publisher running", async () => {
  const nats = await startNats();
  const env = { SWITCHYARD_ENGINE__KIND: "nats", SWITCHYARD_NATS__URL: nats.url };
  const nodes = await Promise.all([startNode(env), startNode(env)]);
  const client = new Client(
    nodes.map((n) => n.ws),
    { token: token("roamer"), WebSocket: trackedWebSocket().WebSocket, backoff: { minMs: 100, maxMs: 1_000 } },
  );
  let publishing = true;
  const published = [];
  let publisher;
  try {
    client.connect();
    const { url } = await next(client, "connected");
    const doomed = nodes.find((n) => n.ws === url);
    const survivor = nodes.find((n) => n !== doomed);
    const sub = client.subscribe("chat.room.roam");
    const got = collect(sub);
    await next(sub, "subscribed");
    // Publishes through the survivor the whole time, one after another.
    publisher = (async () => {
      for (let i = 0; publishing; i++) {
        published.push((await apiPublish(survivor, "chat.room.roam", { i })).seq);
        await new Promise((r) => setTimeout(r, 5));
      }
    })();
    await until(() => got.seqs.length >= 50, "fifty publications before the kill");
    const moved = next(client, "connected", 20_000);
    await doomed.kill();
    const after = await moved;
    assert.equal(after.url, survivor.ws, "the client moved to the other URL");
    const resumed = await next(sub, "subscribed", 20_000, (s) => s.resumed);
    assert.equal(resumed.recovered, true);
    const atResume = published.length;
    await until(() => published.length >= atResume + 50, "fifty more publications after the resume");
    publishing = false;
    await publisher;
    await until(() => got.seqs.length === published.length, `all ${published.length} publications`, 20_000);
    assert.deepEqual(got.seqs, published, "every publication once, in order");
  } finally {
    publishing = false;
    await publisher?.catch(() => {});
    client.close();
    await Promise.all(nodes.map((n) => (n.proc.exitCode === null ? n.kill() : null)));
    nats.stop();
  }
});
