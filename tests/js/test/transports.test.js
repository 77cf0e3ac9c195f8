"use strict";
// Clients of different transports share rooms, and phoenix's WebSocket-to-long-poll fallback.
const { describe, test, after } = require("node:test");
const assert = require("node:assert/strict");
const { LongPoll } = require("phoenix");
const server = require("../lib/server");
const c = require("../lib/client");

after(async () => {
  await c.disconnectAll();
  await server.stopAll();
});

describe("a WebSocket client and a long-poll client", () => {
  test("chat in one room, each seeing the other's messages", async () => {
    const srv = await server.start();
    const ws = await c.connect(srv, { transport: "websocket" });
    const lp = await c.connect(srv, { transport: "longpoll" });
    assert.equal(lp.transport, LongPoll);
    const topic = c.uniqueTopic("room:mixed");
    const wsRoom = ws.channel(topic, { user: "wendy" });
    const lpRoom = lp.channel(topic, { user: "lars" });
    await c.join(wsRoom);
    await c.join(lpRoom);

    const lpHears = c.waitForEvent(lpRoom, "new_msg", { predicate: (p) => p.user === "wendy" });
    await c.pushOk(wsRoom, "new_msg", { body: "hello from websocket" });
    assert.deepEqual(await lpHears, { body: "hello from websocket", user: "wendy" });

    const wsHears = c.waitForEvent(wsRoom, "new_msg", { predicate: (p) => p.user === "lars" });
    await c.pushOk(lpRoom, "new_msg", { body: "hello from long-poll" });
    assert.deepEqual(await wsHears, { body: "hello from long-poll", user: "lars" });
  });
});

describe("longPollFallbackMs", () => {
  test("falls back to long-poll when the WebSocket route is unreachable", async () => {
    const srv = await server.start({ args: ["--no-websocket"] });
    const storage = new Map();
    const sessionStorage = {
      getItem: (k) => (storage.has(k) ? storage.get(k) : null),
      setItem: (k, v) => storage.set(k, String(v)),
      removeItem: (k) => storage.delete(k),
    };
    const started = Date.now();
    const socket = c.makeSocket(srv, { transport: "websocket", longPollFallbackMs: 1000, sessionStorage });
    const errors = [];
    socket.onError((err) => errors.push(err));
    // The WebSocket attempt fails (404); the socket must still open, on long-poll.
    const opened = c.withTimeout(new Promise((resolve) => socket.onOpen(resolve)), 1000 + c.DEFAULT_TIMEOUT_MS, "the fallback to open");
    socket.connect();
    await opened;
    const tookMs = Date.now() - started;
    assert.ok(errors.length >= 1, "the WebSocket attempt did fail");
    assert.equal(socket.transport, LongPoll, "the socket runs on long-poll");
    assert.ok(tookMs < 1000 + c.DEFAULT_TIMEOUT_MS, `opened after ${tookMs} ms`);
    const room = socket.channel(c.uniqueTopic("room:fallback"), { user: "fay" });
    await c.join(room);
    assert.deepEqual(await c.pushOk(room, "ping", { via: "fallback" }), { via: "fallback" });
    assert.equal(storage.get("phx:fallback:LongPoll"), "true", "the client remembers the fallback");
  });
});
