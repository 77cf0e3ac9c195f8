"use strict";
// Nothing lost on reconnect: phoenix.js clients (unmodified, with clients/js/history.js) whose
// connections a TCP proxy kills every fraction of a second, while a publisher sends a numbered
// sequence on a `feed:` topic, end with every message exactly once, in order: on one node, and on
// two `fawkes serve` nodes sharing Redis (history in Redis Streams), the publisher on one and the
// reconnecting clients recovering through the other. And a server restart (a new in-memory
// history) answers `recovered: false`.

const { describe, it, after, afterEach } = require("node:test");
const assert = require("node:assert/strict");
const net = require("node:net");
const server = require("../lib/server");
const c = require("../lib/client");
const { REDIS_URL, requireBackend, startNode } = require("../lib/cluster");
const FawkesHistory = require("../../../clients/js/history.js");

afterEach(c.disconnectAll);
after(server.stopAll);

/** A TCP proxy to `target` that can cut every connection through it at once. */
async function cuttingProxy(target) {
  const pairs = new Set();
  const proxy = net.createServer((client) => {
    const upstream = net.connect(target.port, target.host);
    const pair = { client, upstream };
    pairs.add(pair);
    const drop = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on("error", drop).on("close", drop);
    upstream.on("error", drop).on("close", drop);
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((resolve) => proxy.listen(0, "127.0.0.1", resolve));
  const { port } = proxy.address();
  return {
    url: `ws://127.0.0.1:${port}/socket`,
    /** Destroys every open connection; returns how many. */
    cut() {
      const n = pairs.size;
      for (const { client, upstream } of [...pairs]) {
        client.destroy();
        upstream.destroy();
      }
      pairs.clear();
      return n;
    },
    close: () =>
      new Promise((resolve) => {
        for (const { client, upstream } of pairs) {
          client.destroy();
          upstream.destroy();
        }
        proxy.close(() => resolve());
      }),
  };
}

/**
 * Clients (WebSocket and long-poll, through a proxy that cuts their connections every 100 to
 * 300 ms) join a `feed:` topic on `clientsTo` while a publisher on `publishTo` sends a numbered
 * sequence; every client must end with every message exactly once, in order, with no rejoin
 * answered "not recovered". Prints the figures.
 */
async function randomDisconnects(label, publishTo, clientsTo) {
  const MESSAGES = Number(process.env.FAWKES_HISTORY_MESSAGES || 400);
  const CLIENTS_PER_TRANSPORT = Number(process.env.FAWKES_HISTORY_CLIENTS || 3);
  const proxy = await cuttingProxy({ host: clientsTo.host, port: clientsTo.port });
  const topic = c.uniqueTopic("feed");
  try {
    const clients = [];
    for (const transport of ["websocket", "longpoll"]) {
      for (let i = 0; i < CLIENTS_PER_TRANSPORT; i++) {
        const socket = c.makeSocket(proxy.url, {
          transport,
          reconnectAfterMs: () => 20,
          rejoinAfterMs: () => 20,
          longpollerTimeout: 2000,
        });
        const stats = { transport, got: [], joins: 0, resets: 0, recovered: 0 };
        const ch = FawkesHistory.channel(socket, topic, { user: `${transport}-${i}` }, {
          onReset: () => stats.resets++,
          onRecovered: () => stats.recovered++,
        });
        ch.on("new_msg", (msg) => stats.got.push(msg.body));
        socket.connect();
        await c.join(ch, { timeout: 10000 });
        stats.joins = 1;
        const done = new Promise((resolve) => {
          ch.on("new_msg", (msg) => msg.body === MESSAGES - 1 && resolve());
        });
        clients.push({ socket, ch, stats, done });
      }
    }

    // Cut every proxied connection at random intervals of 100 to 300 ms.
    let cuts = 0;
    let cutConnections = 0;
    let cutting = true;
    const cutter = (async () => {
      while (cutting) {
        await new Promise((resolve) => setTimeout(resolve, 100 + Math.random() * 200));
        if (!cutting) break;
        cuts += 1;
        cutConnections += proxy.cut();
      }
    })();

    // The publisher connects directly and sends 0..MESSAGES-1, one every few milliseconds.
    const publisher = await c.connect(publishTo);
    const pub = publisher.channel(topic, { user: "publisher" });
    await c.join(pub);
    for (let n = 0; n < MESSAGES; n++) {
      const reply = await c.push(pub, "new_msg", { body: n });
      assert.equal(reply.status, "ok");
      assert.equal(typeof reply.response.pos, "string");
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    // Keep cutting a little longer, then let every client catch up.
    await new Promise((resolve) => setTimeout(resolve, 500));
    cutting = false;
    await cutter;
    await c.withTimeout(Promise.all(clients.map((cl) => cl.done)), 30000, "every client to get the last message");

    const expected = Array.from({ length: MESSAGES }, (_, n) => n);
    const figures = [];
    for (const { stats } of clients) {
      assert.deepEqual(stats.got, expected, `${stats.transport} client: every message exactly once, in order`);
      assert.equal(stats.resets, 0, `${stats.transport} client: no rejoin was "not recovered"`);
      figures.push(`${stats.transport}: ${stats.got.length}/${MESSAGES} received, ${stats.recovered} recovered rejoins`);
    }
    assert.ok(cuts >= 5, `the proxy cut connections only ${cuts} times`);
    assert.ok(
      clients.every(({ stats }) => stats.recovered > 0),
      "every client rejoined with recovery at least once"
    );
    console.log(
      `history (${label}): ${clients.length} clients, ${MESSAGES} messages, ${cuts} cuts (${cutConnections} connections killed), loss 0\n  ` +
        figures.join("\n  ")
    );
  } finally {
    await proxy.close();
  }
}

describe("history: recovery through random disconnects", () => {
  it(
    "websocket and long-poll clients get every message exactly once, in order, while their connections are cut",
    { timeout: 120000 },
    async () => {
      const srv = await server.start();
      await randomDisconnects("one node", srv, srv);
    }
  );
});

describe("history: recovery through random disconnects on two nodes sharing Redis", () => {
  let nodes = [];
  after(async () => Promise.all(nodes.map((n) => n.stop())));

  it(
    "the publisher on node A, the cut clients on node B: every message exactly once, in order",
    { timeout: 150000 },
    async (t) => {
      if (!(await requireBackend(t, "Redis", REDIS_URL))) return;
      const cluster = `hist_${process.pid}_${Date.now().toString(36)}`;
      nodes = await Promise.all([0, 1].map(() => startNode({ pubsub: REDIS_URL, cluster })));
      await randomDisconnects("two nodes over Redis", nodes[0], nodes[1]);
    }
  );

  it("a position from node A recovers on node B, then live messages follow once", { timeout: 40000 }, async (t) => {
    if (!(await requireBackend(t, "Redis", REDIS_URL))) return;
    if (nodes.length < 2) {
      const cluster = `hist_${process.pid}_${Date.now().toString(36)}`;
      nodes = await Promise.all([0, 1].map(() => startNode({ pubsub: REDIS_URL, cluster })));
    }
    const topic = c.uniqueTopic("feed");
    const onA = await c.connect(nodes[0]);
    const a = onA.channel(topic, { user: "ann" });
    await c.join(a);
    const first = await c.push(a, "new_msg", { body: "one" });
    await c.push(a, "new_msg", { body: "two" });

    const onB = await c.connect(nodes[1]);
    const b = onB.channel(topic, { since: first.response.pos });
    const got = [];
    b.on("new_msg", (m) => got.push(m.body));
    const reply = await c.join(b);
    assert.equal(reply.recovered, true);
    const three = c.waitForEvent(b, "new_msg", { timeout: 10000, predicate: (m) => m.body === "three" });
    await c.push(a, "new_msg", { body: "three" });
    await three;
    assert.deepEqual(got, ["two", "three"]);
    await c.disconnect(onA);
    await c.disconnect(onB);
  });
});

describe("history: a server restart", () => {
  it("a new in-memory history has a new epoch: the rejoin answers recovered false", { timeout: 40000 }, async () => {
    const first = await server.start();
    const topic = c.uniqueTopic("feed");
    const socket = await c.connect(first);
    const ch = socket.channel(topic, { user: "ann" });
    const joined = await c.join(ch);
    assert.equal(joined.recovered, false, "no since: not recovered");
    const sent = await c.push(ch, "new_msg", { body: "before" });
    const seen = sent.response.pos;
    // The same server: that position recovers.
    const again = await c.connect(first);
    const ok = await c.join(again.channel(topic, { since: seen }));
    assert.equal(ok.recovered, true);
    assert.equal(ok.pos, seen);
    await c.disconnect(socket);
    await c.disconnect(again);

    await first.kill();
    const second = await first.restart();
    const back = await c.connect(second);
    const rejoined = back.channel(topic, { since: seen });
    const got = [];
    rejoined.on("new_msg", (m) => got.push(m));
    const reply = await c.join(rejoined);
    assert.equal(reply.recovered, false);
    assert.equal(typeof reply.pos, "string");
    assert.notEqual(reply.pos.split(":")[0], seen.split(":")[0], "a new epoch");
    // Nothing is replayed: the next message is the first one it gets.
    await c.push(rejoined, "new_msg", { body: "after" });
    assert.deepEqual(
      got.map((m) => m.body),
      ["after"]
    );
    await c.disconnect(back);
    await second.stop();
  });
});
