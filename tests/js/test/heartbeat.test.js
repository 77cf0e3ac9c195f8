"use strict";
// Heartbeats and the idle timeout (server started with --heartbeat-timeout-ms 1500).

const { describe, it, before, after, afterEach } = require("node:test");
const assert = require("node:assert/strict");
const server = require("../lib/server");
const c = require("../lib/client");

const TIMEOUT_MS = 1500;
let srv;
before(async () => {
  srv = await server.start({ heartbeatTimeoutMs: TIMEOUT_MS });
});
afterEach(c.disconnectAll);
after(server.stopAll);

describe("heartbeat", () => {
  it("[null,'h1','phoenix','heartbeat',{}] is answered ok with the same ref", async () => {
    const raw = await c.RawSocket.open(srv);
    raw.send([null, "h1", "phoenix", "heartbeat", {}]);
    assert.deepEqual(await raw.reply("h1"), [null, "h1", "phoenix", "phx_reply", { status: "ok", response: {} }]);
  });

  it(`an idle socket is closed after the heartbeat timeout (${TIMEOUT_MS} ms)`, { timeout: 15000 }, async () => {
    const raw = await c.RawSocket.open(srv);
    const info = await c.withTimeout(raw.closed, TIMEOUT_MS * 3 + 2000, "the server to close an idle socket");
    const elapsed = info.at - raw.openedAt;
    assert.ok(elapsed >= TIMEOUT_MS - 100, `closed after ${elapsed} ms, before the ${TIMEOUT_MS} ms timeout`);
    assert.ok(elapsed <= TIMEOUT_MS * 2 + 1000, `closed only after ${elapsed} ms (timeout ${TIMEOUT_MS} ms)`);
    assert.deepEqual(raw.frames, [], "nothing should be sent to an idle socket");
    assert.equal(info.code, 1000, `idle close code (PROTOCOL.md: Phoenix closes with 1000), closed after ${elapsed} ms`);
  });

  it("an idle socket's timeout does not close other sockets that heartbeat", { timeout: 20000 }, async () => {
    const socket = await c.connect(srv, { transport: "websocket", heartbeatIntervalMs: 300 });
    const openedAt = Date.now();
    let closed = null;
    socket.onClose((e) => (closed = e));
    const room = socket.channel(c.uniqueTopic("room"));
    await c.join(room);
    const idle = await c.RawSocket.open(srv);
    await c.withTimeout(idle.closed, TIMEOUT_MS * 3 + 2000, "the idle socket to be closed");
    // Keep going until well past twice the timeout, measured on heartbeat replies.
    await c.waitForMessage(
      socket,
      (m) => m.topic === "phoenix" && m.event === "phx_reply" && Date.now() - openedAt > TIMEOUT_MS * 2 + 200,
      "a heartbeat reply after twice the timeout",
      { timeout: TIMEOUT_MS * 4 + 2000 }
    );
    assert.equal(closed, null, `the heartbeating socket was closed: ${c.safeJson(closed)}`);
    assert.ok(socket.isConnected());
    assert.deepEqual(await c.push(room, "ping", { ok: 1 }), { status: "ok", response: { ok: 1 } });
  });
});
