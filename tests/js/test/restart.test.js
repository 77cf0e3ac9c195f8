"use strict";
// Server restart: the phoenix client reconnects and rejoins all its channels by itself.

const { describe, it, after, afterEach } = require("node:test");
const assert = require("node:assert/strict");
const server = require("../lib/server");
const c = require("../lib/client");

afterEach(c.disconnectAll);
after(server.stopAll);

c.forEachTransport((transport) => {
  describe("reconnect after a server restart", () => {
    for (const how of ["SIGKILL", "SIGTERM"]) {
      it(`the client rejoins both topics after a ${how} and a restart on the same port`, { timeout: 40000 }, async () => {
        const first = await server.start();
        const socket = await c.connect(first, { transport });
        const room = socket.channel(c.uniqueTopic("room"), { user: "carol" });
        const test = socket.channel(c.uniqueTopic("test"));
        const roomJoins = c.countJoins(room);
        const testJoins = c.countJoins(test);
        await Promise.all([c.join(room), c.join(test)]);
        assert.deepEqual(await c.push(test, "echo", { before: 1 }), { status: "ok", response: { before: 1 } });

        const closed = new Promise((resolve) => socket.onClose(resolve));
        const exit = how === "SIGKILL" ? await first.kill() : await first.stop();
        if (transport === "websocket") await c.withTimeout(closed, 5000, "the client to see the connection close");

        const second = await first.restart();
        assert.equal(second.port, first.port);
        await roomJoins.until(2, { timeout: 20000 });
        await testJoins.until(2, { timeout: 20000 });

        assert.deepEqual(await c.push(test, "echo", { after: 1 }), { status: "ok", response: { after: 1 } });
        const msg = c.waitForEvent(room, "new_msg");
        assert.deepEqual(await c.push(room, "new_msg", { body: "back" }), { status: "ok", response: {} });
        assert.deepEqual(await msg, { body: "back", user: "carol" });
        await c.disconnect(socket);
        await second.stop();
        if (how === "SIGTERM") {
          assert.deepEqual(exit, { code: 0, signal: null }, "the server should exit cleanly on SIGTERM");
        }
      });
    }
  });
});

describe("server process", () => {
  it("exits with code 0 on SIGTERM while a client is connected", { timeout: 15000 }, async () => {
    const srv = await server.start();
    const raw = await c.RawSocket.open(srv);
    await raw.call(null, "h", "phoenix", "heartbeat", {});
    const exit = await srv.stop();
    assert.deepEqual(exit, { code: 0, signal: null });
  });

  it("serves on the port its ready line names", async () => {
    const srv = await server.start();
    assert.ok(srv.port > 0 && srv.port < 65536);
    const raw = await c.RawSocket.open(srv);
    assert.deepEqual(await raw.call(null, "h", "phoenix", "heartbeat", {}), [
      null,
      "h",
      "phoenix",
      "phx_reply",
      { status: "ok", response: {} },
    ]);
    await raw.close();
    await srv.stop();
  });
});
