"use strict";
// Several `fawkes serve` nodes sharing Redis or PostgreSQL: phoenix.js clients on different
// nodes chat and see one Presence list; a long-poll client whose every request lands on another
// node (through a round-robin proxy) takes part, and so does an SSE client whose POSTs do; killing a node removes its users from the
// survivors' lists within the presence timeout; after the backend restarts, every list converges
// and chat resumes.

const { describe, test, before, after } = require("node:test");
const assert = require("node:assert/strict");

const { connect, disconnect, disconnectAll, join, pushOk, waitForEvent } = require("../lib/client");
const {
  REDIS_URL,
  POSTGRES_URL,
  freePort,
  psql,
  requireBackend,
  roundRobinProxy,
  startNode,
  startRedis,
  trackPresence,
} = require("../lib/cluster");

const PRESENCE_TIMEOUT_S = 3;

function uniqueName(prefix) {
  return `${prefix}_${process.pid}_${Date.now().toString(36)}`;
}

/** A user on `target` (a node, or the proxy) over `transport`, joined to `topic` with Presence. */
async function user(target, topic, name, transport = "websocket") {
  const socket = await connect(target, { transport });
  const channel = socket.channel(topic, { user: name });
  const presence = trackPresence(channel);
  const messages = [];
  channel.on("new_msg", (m) => messages.push(m));
  await join(channel);
  return { name, socket, channel, presence, messages };
}

/** Resolves once `u` has received a new_msg with `body`; returns how many it has of that body. */
async function received(u, body, timeout = 10000) {
  if (!u.messages.some((m) => m.body === body)) {
    await waitForEvent(u.channel, "new_msg", { timeout, predicate: (m) => m.body === body });
  }
  return u.messages.filter((m) => m.body === body).length;
}

/** Every user's Presence list becomes `names`. */
function allSee(users, names, timeout) {
  return Promise.all(users.map((u) => u.presence.waitFor(names, timeout, `${u.name}'s presence list`)));
}

/** Sends `body` from `from`; every user gets it exactly once (a second message is the barrier). */
async function chatReachesEveryoneOnce(from, users) {
  const body = `hello from ${from.name} ${Date.now()}`;
  const barrier = `${body} (barrier)`;
  await pushOk(from.channel, "new_msg", { body });
  await pushOk(from.channel, "new_msg", { body: barrier });
  for (const u of users) {
    await received(u, barrier);
    assert.equal(await received(u, body), 1, `${u.name} got "${body}" once`);
    const first = u.messages.findIndex((m) => m.body === body);
    assert.equal(u.messages[first].user, from.name);
  }
}

const BACKENDS = [
  { name: "Redis", url: REDIS_URL },
  { name: "PostgreSQL", url: POSTGRES_URL },
];

for (const backend of BACKENDS) {
  describe(`three nodes sharing ${backend.name}`, () => {
    let nodes = [];
    let proxy;
    let available = false;
    const cluster = uniqueName("chat");

    before(async (t) => {
      available = await requireBackend(t, backend.name, backend.url);
      if (!available) return;
      nodes = await Promise.all(
        [0, 1, 2].map(() => startNode({ pubsub: backend.url, cluster, presenceTimeout: PRESENCE_TIMEOUT_S }))
      );
      proxy = await roundRobinProxy(nodes);
    });

    after(async () => {
      await disconnectAll();
      if (proxy) await proxy.close();
      await Promise.all(nodes.map((n) => n.stop()));
    });

    test("clients on every node, one alternating nodes over long-poll, chat and share one presence list", async (t) => {
      if (!available) return t.skip(`${backend.name} unreachable`);
      const topic = `room:${uniqueName("lobby")}`;
      const alice = await user(nodes[0], topic, "alice");
      const bob = await user(nodes[1], topic, "bob");
      const carol = await user(nodes[2], topic, "carol");
      const lp = await user(proxy, topic, "lp", "longpoll");
      const everyone = [alice, bob, carol, lp];
      await allSee(everyone, ["alice", "bob", "carol", "lp"]);

      await chatReachesEveryoneOnce(alice, everyone);
      await chatReachesEveryoneOnce(lp, everyone);
      await chatReachesEveryoneOnce(carol, everyone);
      // Every node carried part of the long-poll client's requests.
      assert.ok(proxy.hits.every((n) => n >= 2), `requests per node: ${proxy.hits}`);

      await disconnect(bob.socket);
      await allSee([alice, carol, lp], ["alice", "carol", "lp"]);
      // A long-poll session outlives a closed client by the idle window; leaving is immediate.
      await new Promise((resolve, reject) =>
        lp.channel.leave().receive("ok", resolve).receive("error", reject).receive("timeout", reject)
      );
      await allSee([alice, carol], ["alice", "carol"]);
      await disconnect(lp.socket);
    });

    test("an SSE client whose stream stays on one node and whose POSTs land on the others chats", async (t) => {
      if (!available) return t.skip(`${backend.name} unreachable`);
      const topic = `room:${uniqueName("sse")}`;
      const alice = await user(nodes[0], topic, "alice");
      const sse = await user(proxy, topic, "sse", "sse");
      const everyone = [alice, sse];
      await allSee(everyone, ["alice", "sse"]);
      const before = proxy.hits.slice();
      await chatReachesEveryoneOnce(sse, everyone);
      await chatReachesEveryoneOnce(alice, everyone);
      // Its POSTs went through several nodes (round robin), though its stream stays on one.
      const posts = proxy.hits.map((n, i) => n - before[i]);
      assert.ok(posts.filter((n) => n > 0).length >= 2, `POSTs per node: ${posts}`);
      // An SSE session outlives a closed client by the idle window; leaving is immediate.
      await new Promise((resolve, reject) =>
        sse.channel.leave().receive("ok", resolve).receive("error", reject).receive("timeout", reject)
      );
      await allSee([alice], ["alice"]);
      await disconnect(sse.socket);
      await disconnect(alice.socket);
    });

    test("killing a node removes its users from the survivors' lists within the timeout", async (t) => {
      if (!available) return t.skip(`${backend.name} unreachable`);
      const topic = `room:${uniqueName("kill")}`;
      const alice = await user(nodes[0], topic, "alice");
      const bob = await user(nodes[1], topic, "bob");
      const dave = await user(nodes[2], topic, "dave");
      await allSee([alice, bob, dave], ["alice", "bob", "dave"]);

      const killedAt = Date.now();
      await nodes[2].kill();
      await allSee([alice, bob], ["alice", "bob"], (PRESENCE_TIMEOUT_S + 5) * 1000);
      const took = (Date.now() - killedAt) / 1000;
      assert.ok(took <= PRESENCE_TIMEOUT_S + 2, `dave removed ${took.toFixed(1)} s after the kill`);
      await chatReachesEveryoneOnce(bob, [alice, bob]);
      void dave;
    });

    test("a node shut down with SIGTERM takes its users off the other nodes' lists at once", async (t) => {
      if (!available) return t.skip(`${backend.name} unreachable`);
      // A presence timeout far longer than the wait below: only the node's own goodbye can do it.
      const byeCluster = uniqueName("bye");
      const pair = await Promise.all(
        [0, 1].map(() => startNode({ pubsub: backend.url, cluster: byeCluster, presenceTimeout: 120 }))
      );
      try {
        const topic = `room:${uniqueName("bye")}`;
        const alice = await user(pair[0], topic, "alice");
        const bob = await user(pair[1], topic, "bob");
        await allSee([alice, bob], ["alice", "bob"]);
        const stopped = await pair[1].stop();
        assert.equal(stopped.code, 0, "a clean exit");
        await alice.presence.waitFor(["alice"], 10000, "alice's list after bob's node left");
      } finally {
        await Promise.all(pair.map((n) => n.stop()));
      }
    });
  });
}

describe("a backend restart", () => {
  let nodes = [];
  let redis;
  const cleanups = [];

  after(async () => {
    await disconnectAll();
    await Promise.all(nodes.map((n) => n.stop()));
    nodes = [];
    for (const c of cleanups) await c();
  });

  /** Two nodes, users on both, an outage during which one leaves and one joins, then recovery. */
  async function survivesOutage(pubsub, outage) {
    const cluster = uniqueName("restart");
    nodes = await Promise.all([0, 1].map(() => startNode({ pubsub, cluster, presenceTimeout: PRESENCE_TIMEOUT_S })));
    const topic = `room:${uniqueName("restart")}`;
    const alice = await user(nodes[0], topic, "alice");
    const bob = await user(nodes[1], topic, "bob");
    const erin = await user(nodes[1], topic, "erin");
    await allSee([alice, bob, erin], ["alice", "bob", "erin"]);

    await outage(async () => {
      // While the backend is away: erin leaves on node 1, frank joins on node 0.
      await disconnect(erin.socket);
      return user(nodes[0], topic, "frank");
    }).then(async (frank) => {
      await allSee([alice, bob, frank], ["alice", "bob", "frank"], 20000);
      await chatReachesEveryoneOnce(bob, [alice, bob, frank]);
      await chatReachesEveryoneOnce(frank, [alice, bob, frank]);
      // Each node says what happened at /metrics.
      for (const node of nodes) {
        const text = await (await fetch(`${node.httpUrl}/metrics`)).text();
        const metric = (name) => Number((new RegExp(`^${name} (\\d+)$`, "m").exec(text) || [])[1]);
        assert.equal(metric("fawkes_pubsub_connected"), 1, text);
        assert.ok(metric("fawkes_pubsub_disconnects_total") >= 1, text);
        assert.ok(metric("fawkes_pubsub_received_total") > 0, text);
      }
    });
    await disconnectAll();
    await Promise.all(nodes.map((n) => n.stop()));
    nodes = [];
  }

  test("Redis restarted: presence lists converge and chat resumes", async (t) => {
    if (!(await requireBackend(t, "Redis", REDIS_URL))) return;
    const port = await freePort();
    redis = await startRedis(port);
    cleanups.push(() => redis.kill());
    await survivesOutage(`redis://127.0.0.1:${port}`, async (during) => {
      await redis.kill();
      const frank = await during();
      redis = await startRedis(port);
      return frank;
    });
  });

  test("PostgreSQL connections cut: presence lists converge and chat resumes", async (t) => {
    if (!(await requireBackend(t, "PostgreSQL", POSTGRES_URL))) return;
    const app = uniqueName("fawkes_restart");
    const url = `${POSTGRES_URL}${POSTGRES_URL.includes("?") ? "&" : "?"}application_name=${app}`;
    await survivesOutage(url, async (during) => {
      const cut = await psql(
        POSTGRES_URL,
        `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = '${app}'`
      );
      assert.ok(Number(cut) >= 2, `terminated ${cut} connections of the two nodes`);
      return during();
    });
  });
});
