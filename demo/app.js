// The demo page: live prices, a chat room with history and presence, a status
// line. Everything goes through the SDK (switchyard.min.js, built from clients/js).
import { Client } from "./switchyard.min.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let user = params.get("user") ?? undefined;
let setup = null;

// Demo tokens come from the node itself (POST /demo/token, only with server.demo on);
// a real app asks its own auth service. Called again for refreshes and reconnects.
async function getToken() {
  const res = await fetch("/demo/token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(user ? { user } : {}),
  });
  if (!res.ok) throw new Error(`demo token: ${res.status} ${await res.text()}`);
  const reply = await res.json();
  user = reply.user;
  setup ??= reply;
  return reply.token;
}

const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
let client;

function status(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}
function watch() {
  client.on("connecting", ({ attempt }) => status("connecting", attempt > 1 ? `reconnecting (attempt ${attempt})…` : "connecting…"));
  client.on("connected", ({ welcome }) => {
    status("connected", `connected to ${welcome.node}`);
    $("me").textContent = `you are ${welcome.user}`;
  });
  client.on("disconnected", ({ code, willRetry, retryInMs }) =>
    status("disconnected", `disconnected (${code})${willRetry ? `, retrying in ${retryInMs} ms` : ""}`),
  );
  client.on("closed", ({ reason }) => status("closed", `closed: ${reason}`));
}

function text(tag, content, cls) {
  const el = document.createElement(tag);
  el.textContent = content;
  if (cls) el.className = cls;
  return el;
}

// ---- prices ----
function priceRow(channel) {
  const symbol = channel.split(".").slice(1).join(".");
  const tr = document.createElement("tr");
  tr.dataset.symbol = symbol;
  tr.append(text("td", symbol), text("td", "–", "price"), text("td", "–", "bid"), text("td", "–", "ask"), text("td", "0", "ticks"));
  $("price-rows").append(tr);
  let last = null;
  let ticks = 0;
  client.subscribe(channel).on("publication", ({ data }) => {
    const cell = tr.querySelector(".price");
    const price = Number(data.price);
    cell.textContent = data.price;
    cell.className = `price${last === null ? "" : price >= last ? " up" : " down"}`;
    last = price;
    tr.querySelector(".bid").textContent = data.best_bid ?? "–";
    tr.querySelector(".ask").textContent = data.best_ask ?? "–";
    tr.querySelector(".ticks").textContent = String(++ticks);
  });
}

// ---- chat ----
function addMessage(from, body, seq) {
  const li = document.createElement("li");
  li.className = "msg";
  if (seq !== undefined) li.dataset.seq = String(seq);
  li.append(text("span", from, "from"), text("span", body, "body"));
  $("messages").append(li);
  $("messages").scrollTop = $("messages").scrollHeight;
}
function note(body) {
  $("messages").append(text("li", body, "note"));
}

const members = new Map(); // device → user
function renderPresence() {
  const counts = new Map();
  for (const u of members.values()) counts.set(u, (counts.get(u) ?? 0) + 1);
  $("presence").replaceChildren(
    ...[...counts].sort().map(([u, n]) => {
      const li = text("li", n > 1 ? `${u} (${n} tabs)` : u);
      li.dataset.user = u;
      return li;
    }),
  );
}

function joinRoom(room) {
  $("room").textContent = room;
  const sub = client.subscribe(room, { snapshot: 50 });
  sub.on("publication", (p) => addMessage(p.from ?? "server", String(p.data?.text ?? JSON.stringify(p.data)), p.seq));
  sub.on("subscribed", async ({ resumed, replayed }) => {
    if (resumed && replayed > 0) note(`reconnected: ${replayed} missed message(s) replayed`);
    members.clear();
    for (const c of await client.presenceAll(room)) members.set(c.device, c.user);
    renderPresence();
  });
  sub.on("gap", () => note("the room's history could not be recovered after the reconnect; showing what the server has"));
  sub.on("join", ({ device, user: u }) => (members.set(device, u), renderPresence()));
  sub.on("leave", ({ device }) => (members.delete(device), renderPresence()));
  $("send").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = $("text");
    const body = input.value.trim();
    if (!body) return;
    input.value = "";
    client.publish(room, { text: body }).catch((err) => note(`not sent: ${err.message}`));
  });
}

// The first token also says which room and symbols this node's demo has; the
// first connection uses it, later ones (reconnects, refreshes) fetch their own.
getToken()
  .then((first) => {
    let pending = first;
    client = new Client(wsUrl, {
      WebSocket,
      getToken: () => {
        const t = pending;
        pending = null;
        return t ?? getToken();
      },
    });
    watch();
    setup.prices.forEach(priceRow);
    joinRoom(setup.room);
    client.connect();
  })
  .catch((e) => status("closed", String(e)));
