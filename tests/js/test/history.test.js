"use strict";
// Nothing lost on reconnect: phoenix.js clients (unmodified, with clients/js/history.js; SSE
// through clients/js/sse-transport.js) whose connections a TCP proxy kills every fraction of a
// second, sometimes in the middle of an answer carrying broadcasts, while a publisher sends a
// numbered sequence on a `feed:` topic, end with every message exactly once, in order: on one
// node, and on two `fawkes serve` nodes sharing Redis (history in Redis Streams), the publisher on
// one and the reconnecting clients recovering through the other. A client away for 5,000
// broadcasts gets them all. And a server restart (a new in-memory history)
// answers `recovered: false`.

const { describe, it, after, afterEach } = require("node:test");
const assert = require("node:assert/strict");
const server = require("../lib/server");
const c = require("../lib/client");
const { cuttingProxy } = require("../lib/proxy");
const { REDIS_URL, requireBackend, startNode } = require("../lib/cluster");
const FawkesHistory = require("../../../clients/js/history.js");

afterEach(c.disconnectAll);
after(server.stopAll);

// phoenix.js ships WebSocket and long-poll; SSE is clients/js/sse-transport.js.
const TRANSPORTS = ["websocket", "longpoll", "sse"];

/** A phoenix.js client through `proxy`, on `topic` with clients/js/history.js. */
function historyClient(proxy, transport, topic, user) {
  const socket = c.makeSocket(proxy.url, {
    transport,
    reconnectAfterMs: () => 20,
    rejoinAfterMs: () => 20,
    longpollerTimeout: 2000,
  });
  const stats = { transport, got: [], resets: 0, recovered: 0 };
  const ch = FawkesHistory.channel(socket, topic, { user }, {
    onReset: () => stats.resets++,
    onRecovered: () => stats.recovered++,
  });
  ch.on("new_msg", (msg) => stats.got.push(msg.body));
  return { socket, ch, stats };
}

/**
 * Clients on every transport (through proxies that cut their connections at random, in the
 * middle of answers too) join a `feed:` topic on `clientsTo` while a publisher on `publishTo`
 * sends a numbered sequence; every client must end with every message exactly once, in order,
 * with no rejoin answered "not recovered". Prints the figures.
 */
async function randomDisconnects(label, publishTo, clientsTo) {
  const MESSAGES = Number(process.env.FAWKES_HISTORY_MESSAGES || 400);
  const CLIENTS_PER_TRANSPORT = Number(process.env.FAWKES_HISTORY_CLIENTS || 3);
  // One proxy per transport, so each transport's cuts are counted apart.
  const proxies = {};
  for (const transport of TRANSPORTS) proxies[transport] = await cuttingProxy({ host: clientsTo.host, port: clientsTo.port });
  const topic = c.uniqueTopic("feed");
  try {
    const clients = [];
    for (const transport of TRANSPORTS) {
      for (let i = 0; i < CLIENTS_PER_TRANSPORT; i++) {
        const cl = historyClient(proxies[transport], transport, topic, `${transport}-${i}`);
        cl.socket.connect();
        await c.join(cl.ch, { timeout: 10000 });
        cl.done = new Promise((resolve) => {
          cl.ch.on("new_msg", (msg) => msg.body === MESSAGES - 1 && resolve());
        });
        clients.push(cl);
      }
    }

    // Every 100 to 300 ms, at random: cut every proxied connection; or cut them and refuse
    // new ones for 100 ms (the SSE transport resumes its own session after a plain cut, so
    // this is what makes it reconnect and rejoin too); or cut the next answer that carries
    // broadcasts in half on each proxy.
    let cuts = 0;
    let cutConnections = 0;
    let cutting = true;
    const cutter = (async () => {
      while (cutting) {
        await new Promise((resolve) => setTimeout(resolve, 100 + Math.random() * 200));
        if (!cutting) break;
        const dice = Math.random();
        if (dice < 2 / 3) {
          const block = dice < 1 / 3;
          cuts += 1;
          for (const proxy of Object.values(proxies)) {
            proxy.state.blocked = block;
            cutConnections += proxy.cut();
          }
          if (block) {
            await new Promise((resolve) => setTimeout(resolve, 100));
            for (const proxy of Object.values(proxies)) proxy.state.blocked = false;
          }
        } else {
          for (const proxy of Object.values(proxies)) proxy.cutMidAnswer();
        }
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
    for (const proxy of Object.values(proxies)) proxy.state.armed = false;
    await c.withTimeout(Promise.all(clients.map((cl) => cl.done)), 30000, "every client to get the last message");

    const expected = Array.from({ length: MESSAGES }, (_, n) => n);
    const midAnswer = TRANSPORTS.map((t) => `${t} ${proxies[t].state.midAnswerCuts}`).join(", ");
    const figures = clients.map(
      ({ stats }) => `${stats.transport}: ${stats.got.length}/${MESSAGES} received, ${stats.recovered} recovered rejoins`
    );
    console.log(
      `history (${label}): ${clients.length} clients, ${MESSAGES} messages, ${cuts} cuts (${cutConnections} connections killed), ` +
        `answers cut in the middle: ${midAnswer}\n  ` +
        figures.join("\n  ")
    );
    for (const { stats } of clients) {
      assert.deepEqual(stats.got, expected, `${stats.transport} client: every message exactly once, in order`);
      assert.equal(stats.resets, 0, `${stats.transport} client: no rejoin was "not recovered"`);
      assert.ok(stats.recovered > 0, `${stats.transport} client: rejoined with recovery at least once`);
    }
    assert.ok(cuts >= 5, `the proxies cut every connection only ${cuts} times`);
    for (const transport of TRANSPORTS) {
      assert.ok(
        proxies[transport].state.midAnswerCuts >= 1,
        `${transport}: no answer carrying broadcasts was cut in the middle`
      );
    }
  } finally {
    for (const proxy of Object.values(proxies)) await proxy.close();
  }
}

describe("history: recovery through random disconnects", () => {
  it(
    "websocket, long-poll and SSE clients get every message exactly once, in order, while their connections are cut, in the middle of answers too",
    { timeout: 180000 },
    async () => {
      const srv = await server.start();
      await randomDisconnects("one node", srv, srv);
    }
  );

  for (const transport of TRANSPORTS) {
    it(`${transport}: an answer that died in the middle is recovered by the rejoin`, { timeout: 60000 }, async () => {
      const srv = await server.start();
      const proxy = await cuttingProxy({ host: "127.0.0.1", port: srv.port });
      const topic = c.uniqueTopic("feed");
      try {
        const cl = historyClient(proxy, transport, topic, "reader");
        cl.socket.connect();
        await c.join(cl.ch, { timeout: 10000 });
        const publisher = await c.connect(srv);
        const pub = publisher.channel(topic, { user: "publisher" });
        await c.join(pub);
        const got = (body) =>
          c.withTimeout(
            new Promise((resolve) => cl.ch.on("new_msg", (m) => m.body === body && resolve())),
            20000,
            `the reader to get ${body}`
          );

        const one = got("one");
        await c.pushOk(pub, "new_msg", { body: "one" });
        await one;
        // The answer carrying "two" reaches the reader half-way, then its connection dies, and
        // for a moment no new one is let through (so SSE cannot resume its own session either):
        // the server sent "two", the reader never saw it.
        proxy.cutMidAnswer();
        proxy.state.onMidAnswerCut = () => {
          proxy.state.blocked = true;
          proxy.cut();
          setTimeout(() => (proxy.state.blocked = false), 300);
        };
        const recoveredBefore = cl.stats.recovered;
        const two = got("two");
        await c.pushOk(pub, "new_msg", { body: "two" });
        await two;
        assert.equal(proxy.state.midAnswerCuts, 1, "the answer carrying two was cut");
        assert.ok(cl.stats.recovered > recoveredBefore, "two came with a recovered rejoin");
        const three = got("three");
        await c.pushOk(pub, "new_msg", { body: "three" });
        await three;
        assert.deepEqual(cl.stats.got, ["one", "two", "three"]);
        assert.equal(cl.stats.resets, 0);
      } finally {
        await proxy.close();
      }
    });
  }

  it(
    "a client that missed 5,000 broadcasts (five outbound queues' worth) gets them all after reconnecting, on every transport",
    { timeout: 180000 },
    async () => {
      const MISSED = 5000;
      const srv = await server.start();
      const topic = c.uniqueTopic("feed");
      const proxies = {};
      const clients = [];
      try {
        for (const transport of TRANSPORTS) {
          proxies[transport] = await cuttingProxy({ host: "127.0.0.1", port: srv.port });
          const cl = historyClient(proxies[transport], transport, topic, transport);
          cl.socket.connect();
          await c.join(cl.ch, { timeout: 10000 });
          clients.push(cl);
        }
        // Every client loses its connection, and cannot get a new one for now.
        for (const proxy of Object.values(proxies)) {
          proxy.state.blocked = true;
          proxy.cut();
        }
        const publisher = await c.connect(srv);
        const pub = publisher.channel(topic, { user: "publisher" });
        await c.join(pub);
        for (let n = 0; n < MISSED; n += 250) {
          const batch = [];
          for (let k = n; k < Math.min(n + 250, MISSED); k++) batch.push(c.push(pub, "new_msg", { body: k }, { timeout: 30000 }));
          for (const reply of await Promise.all(batch)) assert.equal(reply.status, "ok");
        }
        const done = clients.map(
          (cl) => new Promise((resolve) => cl.ch.on("new_msg", (msg) => msg.body === MISSED && resolve()))
        );
        for (const proxy of Object.values(proxies)) proxy.state.blocked = false;
        // Once back, a live one after the replay.
        await c.withTimeout(
          Promise.all(clients.map((cl) => new Promise((resolve) => cl.ch.on("new_msg", (m) => m.body === MISSED - 1 && resolve())))),
          60000,
          "every client to get the missed broadcasts"
        );
        await c.pushOk(pub, "new_msg", { body: MISSED });
        await c.withTimeout(Promise.all(done), 30000, "every client to get the live broadcast");

        const expected = Array.from({ length: MISSED + 1 }, (_, n) => n);
        for (const { stats } of clients) {
          assert.deepEqual(stats.got, expected, `${stats.transport}: every message exactly once, in order`);
          assert.equal(stats.resets, 0, `${stats.transport}: the rejoin was recovered`);
          assert.ok(stats.recovered >= 1, `${stats.transport}: a recovered rejoin`);
        }
      } finally {
        for (const proxy of Object.values(proxies)) await proxy.close();
      }
    }
  );
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
