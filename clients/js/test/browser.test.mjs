// The demo page in a real browser (Debian's chromium, driven by playwright-core)
// against the real binary with server.demo on and the synthetic feed: two pages,
// one chats, the other sees the message and the first user in presence; prices
// update. A screenshot is kept in test-artifacts/demo.png.

import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { ROOT, startNode } from "./helpers.mjs";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const ARTIFACTS = join(ROOT, "clients", "js", "test-artifacts");

test("the demo: two pages chat, see each other in presence, and watch prices move", async () => {
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install chromium (make test-js does)`);
  const node = await startNode({ SWITCHYARD_SERVER__DEMO: "true", SWITCHYARD_FEED__EMBEDDED: "true", SWITCHYARD_FEED__SYNTHETIC__RATE: "5" });
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
  });
  try {
    const alice = await browser.newPage();
    const bob = await browser.newPage();
    const errors = [];
    for (const p of [alice, bob]) p.on("pageerror", (e) => errors.push(e));
    await alice.goto(`${node.http}/demo/?user=alice`);
    await bob.goto(`${node.http}/demo/?user=bob`);
    for (const p of [alice, bob]) await p.waitForSelector('#status[data-state="connected"]', { timeout: 15_000 });
    assert.match(await alice.textContent("#status"), /connected to /);

    // Bob sees Alice in presence (and himself).
    await bob.waitForSelector('#presence li[data-user="alice"]', { timeout: 15_000 });
    await bob.waitForSelector('#presence li[data-user="bob"]');

    await alice.fill("#text", "hello from alice");
    await alice.press("#text", "Enter");
    const seen = await bob.waitForSelector('#messages li.msg:has-text("hello from alice")', { timeout: 15_000 });
    assert.equal(await seen.$eval(".from", (e) => e.textContent), "alice");

    // Prices move: the tick counter of a symbol passes 3 on Alice's page.
    await alice.waitForFunction(() => Number(document.querySelector('tr[data-symbol="BTC-USDT"] .ticks')?.textContent) >= 3, null, {
      timeout: 15_000,
    });
    const price = await alice.textContent('tr[data-symbol="BTC-USDT"] .price');
    assert.match(price, /^\d+(\.\d+)?$/);

    // A page opened later gets the room's history on join.
    const carol = await browser.newPage();
    await carol.goto(`${node.http}/demo/?user=carol`);
    await carol.waitForSelector('#messages li.msg:has-text("hello from alice")', { timeout: 15_000 });

    mkdirSync(ARTIFACTS, { recursive: true });
    await alice.screenshot({ path: join(ARTIFACTS, "demo.png"), fullPage: true });
    assert.deepEqual(errors, [], "no page errors");
  } finally {
    await browser.close();
    await node.kill();
  }
});
