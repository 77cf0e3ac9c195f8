"use strict";
// phoenix.js over the SSE transport (clients/js/sse-transport.js): Server-Sent Events down,
// POST up, sharing rooms with WebSocket clients.
const { describe, test, after } = require("node:test");
const assert = require("node:assert/strict");
const server = require("../lib/server");
const c = require("../lib/client");

after(async () => {
  await c.disconnectAll();
  await server.stopAll();
});

describe("an SSE client", () => {
  test("chats in one room with a WebSocket client, each seeing the other's messages", async () => {
    const srv = await server.start();
    const ws = await c.connect(srv, { transport: "websocket" });
    const sse = await c.connect(srv, { transport: "sse" });
    assert.equal(sse.transport, c.sseTransport());
    const topic = c.uniqueTopic("room:sse");
    const wsRoom = ws.channel(topic, { user: "wendy" });
    const sseRoom = sse.channel(topic, { user: "sam" });
    await c.join(wsRoom);
    await c.join(sseRoom);

    const sseHears = c.waitForEvent(sseRoom, "new_msg", { predicate: (p) => p.user === "wendy" });
    await c.pushOk(wsRoom, "new_msg", { body: "hello from websocket" });
    assert.deepEqual(await sseHears, { body: "hello from websocket", user: "wendy" });

    const wsHears = c.waitForEvent(wsRoom, "new_msg", { predicate: (p) => p.user === "sam" });
    await c.pushOk(sseRoom, "new_msg", { body: "hello from sse" });
    assert.deepEqual(await wsHears, { body: "hello from sse", user: "sam" });
  });

  test("gets replies in order, server pushes, heartbeat replies and the connect params", async () => {
    const srv = await server.start();
    const sse = await c.connect(srv, { transport: "sse", params: { who: "sam" } });
    const room = sse.channel(c.uniqueTopic("test:sse"), {});
    const joined = await c.join(room);
    assert.deepEqual(joined.params, { who: "sam" }, "the connect params reach the server, without vsn");

    const replies = await Promise.all([...Array(50).keys()].map((i) => c.pushOk(room, "echo", { i })));
    assert.deepEqual(replies, [...Array(50).keys()].map((i) => ({ i })));

    const pushed = c.waitForEvent(room, "private");
    await c.pushOk(room, "push", { event: "private", payload: { only: "me" } });
    assert.deepEqual(await pushed, { only: "me" });

    const binary = c.waitForEvent(room, "binary");
    await c.pushOk(room, "binary_push", {});
    assert.deepEqual(await binary, { binary: "AQID/w==" }, "binary payloads arrive as base64 text");

    const rtt = await c.withTimeout(new Promise((resolve) => sse.ping(resolve)), c.DEFAULT_TIMEOUT_MS, "a heartbeat reply");
    assert.ok(rtt >= 0);
  });

  test("a POST is answered as on long-poll; a 410 in the answer closes the transport, and phoenix.js rejoins", async () => {
    const srv = await server.start();
    const post = async (path) => {
      const resp = await fetch(`${srv.httpUrl}/socket/${path}?token=forged`, {
        method: "POST",
        headers: { "Content-Type": "application/x-ndjson" },
        body: '[null,"1","phoenix","heartbeat",{}]',
      });
      return [resp.status, await resp.json()];
    };
    const gone = [200, { status: 410, token: null, messages: [] }];
    assert.deepEqual(await post("longpoll"), gone);
    assert.deepEqual(await post("sse"), gone, "the same answer as long-poll's");

    const sse = await c.connect(srv, { transport: "sse", reconnectAfterMs: () => 50, rejoinAfterMs: () => 50 });
    const room = sse.channel(c.uniqueTopic("test:sse_gone"), {});
    const joins = c.countJoins(room);
    await c.join(room);
    const closed = c.withTimeout(new Promise((resolve) => sse.onClose(resolve)), c.DEFAULT_TIMEOUT_MS, "a close");
    sse.conn.token = "forged";
    room.push("echo", { lost: true });
    assert.equal((await closed).code, 3410, "the transport closes as session_gone");
    await joins.until(2);
    assert.deepEqual(await c.pushOk(room, "echo", { i: 1 }), { i: 1 }, "pushes work after the rejoin");
  });

  test("a refused connect errors and does not open", async () => {
    const srv = await server.start();
    const socket = c.makeSocket(srv, { transport: "sse", params: { reject: "true" } });
    const errored = c.withTimeout(new Promise((resolve) => socket.onError(resolve)), c.DEFAULT_TIMEOUT_MS, "an error");
    let opened = false;
    socket.onOpen(() => (opened = true));
    socket.connect();
    await errored;
    assert.equal(opened, false);
  });
});
