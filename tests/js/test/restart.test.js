"use strict";
// Server restart: the phoenix client reconnects and rejoins all its channels by itself; with a
// durable history (SQLite or PostgreSQL), a `feed:` client recovers what it missed while the
// server was down.

const { describe, it, after, afterEach } = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const net = require("node:net");
const os = require("node:os");
const path = require("node:path");
const server = require("../lib/server");
const c = require("../lib/client");
const FawkesHistory = require("../../../clients/js/history.js");

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

/** Whether something listens at the host and port of a postgres:// URL. */
function reachable(url) {
  const { hostname, port } = new URL(url);
  return new Promise((resolve) => {
    const conn = net.connect(Number(port || 5432), hostname || "127.0.0.1");
    const done = (ok) => {
      conn.destroy();
      resolve(ok);
    };
    conn.setTimeout(2000, () => done(false));
    conn.once("connect", () => done(true)).once("error", () => done(false));
  });
}

/** The `--history` URL of a store, or null (with a loud SKIP) when PostgreSQL is unreachable. */
async function historyUrl(store, dirs) {
  if (store === "sqlite") {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "fawkes-history-"));
    dirs.push(dir);
    return `sqlite://${path.join(dir, "history.db")}`;
  }
  // Shared tables in the test database; every test uses topics of its own (c.uniqueTopic).
  const url = process.env.FAWKES_TEST_POSTGRES || "postgres://postgres@127.0.0.1:5432/test";
  if (await reachable(url)) return url;
  if (process.env.CI === "true") throw new Error(`PostgreSQL unreachable at ${url}`);
  console.error(`\n*** SKIP: PostgreSQL unreachable at ${url} ***\n`);
  return null;
}

describe("durable feed history across a server restart", () => {
  const dirs = [];
  after(() => dirs.forEach((dir) => fs.rmSync(dir, { recursive: true, force: true })));

  for (const store of ["sqlite", "postgres"]) {
    for (const transport of ["websocket", "longpoll"]) {
      it(`a ${transport} client recovers what it missed while the server was down (${store} store)`, { timeout: 40000 }, async (t) => {
        const url = await historyUrl(store, dirs);
        if (url == null) return t.skip("PostgreSQL unreachable");
        const args = ["--history", url];
        const first = await server.start({ args });
        const topic = c.uniqueTopic("feed");

        const got = [];
        const waiters = [];
        const stats = { resets: 0, rejoins: [] };
        const socket = c.makeSocket(first, { transport, reconnectAfterMs: () => 100, rejoinAfterMs: () => 100 });
        const ch = FawkesHistory.channel(socket, topic, { user: "ann" }, {
          onRecovered: (reply) => stats.rejoins.forEach((resolve) => resolve(reply)),
          onReset: (reply) => {
            stats.resets++;
            stats.rejoins.forEach((resolve) => resolve(reply));
          },
        });
        ch.on("new_msg", (msg) => {
          got.push(msg.body);
          waiters.filter((w) => got.length >= w.n).forEach((w) => w.resolve());
        });
        const received = (n) =>
          c.withTimeout(new Promise((resolve) => (got.length >= n ? resolve() : waiters.push({ n, resolve }))), 15000, `${n} messages`);
        socket.connect();
        await c.join(ch);

        const publish = async (srv, bodies) => {
          const pub = await c.connect(srv);
          const chan = pub.channel(topic, { user: "pub" });
          await c.join(chan);
          const positions = [];
          for (const body of bodies) {
            const reply = await c.push(chan, "new_msg", { body });
            assert.equal(reply.status, "ok");
            positions.push(reply.response.pos);
          }
          await c.disconnect(pub);
          return positions;
        };
        const before = await publish(first, ["a", "b"]);
        await received(2);
        assert.equal(FawkesHistory.last(ch), before[1]);

        // The server dies; the client stops retrying until the messages it misses are sent.
        const closed = new Promise((resolve) => socket.onClose(resolve));
        await first.kill();
        await c.withTimeout(closed, 10000, "the client to see the server go");
        socket.disconnect();
        const second = await first.restart({ args });
        const missed = await publish(second, ["c", "d"]);
        assert.equal(missed[0].split(":")[0], before[1].split(":")[0], "the same epoch after the restart");

        const rejoined = new Promise((resolve) => stats.rejoins.push(resolve));
        socket.connect();
        const reply = await c.withTimeout(rejoined, 15000, "the rejoin");
        assert.deepEqual(reply, { pos: missed[1], recovered: true });
        await received(4);
        await publish(second, ["e"]);
        await received(5);
        assert.deepEqual(got, ["a", "b", "c", "d", "e"], "every message once, in order, across the restart");
        assert.equal(stats.resets, 0);
        await c.disconnect(socket);
        await second.stop();
      });
    }
  }
});
