"use strict";
// Presence under a storm, as phoenix.js's `Presence` helper sees it: hundreds of clients join one
// room as distinct users, some leaving while others still join, on one node and on two nodes
// sharing Redis. Afterwards every client's `Presence.list()` holds exactly the users still there,
// with the same metas (phx_ref and all) as the server's own list (the presence_state a fresh
// joiner gets from each node), and no client saw a join or a leave applied twice.

const { describe, test, before, after } = require("node:test");
const assert = require("node:assert/strict");
const { Presence } = require("phoenix");

const { connect, disconnectAll, join } = require("../lib/client");
const { REDIS_URL, requireBackend, startNode } = require("../lib/cluster");

const CLIENTS = 300;
const LEAVERS = 90;

function uniqueName(prefix) {
  return `${prefix}_${process.pid}_${Date.now().toString(36)}`;
}

/**
 * A client's list as phoenix.js keeps it, with a record of every change applied twice: a join of
 * a phx_ref the list already had, or a leave of one it did not have.
 */
function watch(channel) {
  const presence = new Presence(channel);
  const refs = new Set();
  const twice = [];
  presence.onJoin((key, _current, joined) => {
    for (const m of joined.metas) {
      if (refs.has(m.phx_ref)) twice.push(`join ${key} ${m.phx_ref}`);
      refs.add(m.phx_ref);
    }
  });
  presence.onLeave((key, _current, left) => {
    for (const m of left.metas) {
      if (!refs.has(m.phx_ref)) twice.push(`leave ${key} ${m.phx_ref}`);
      refs.delete(m.phx_ref);
    }
  });
  const synced = new Set();
  presence.onSync(() => {
    for (const f of [...synced]) f();
  });
  return { presence, twice, synced };
}

/** `{key: [metas sorted by phx_ref]}` of a phoenix.js Presence, for comparing lists in full. */
function snapshot(presence) {
  const out = {};
  presence.list((key, { metas }) => {
    out[key] = [...metas].sort((a, b) => (a.phx_ref < b.phx_ref ? -1 : 1));
  });
  return Object.fromEntries(Object.entries(out).sort(([a], [b]) => (a < b ? -1 : 1)));
}

/** Resolves once `w`'s list has exactly the keys `want` (sorted); rejects after `timeout` ms. */
function until(w, want, what, timeout = 30000) {
  const wanted = want.join(",");
  const keys = () => {
    const list = w.presence.list((key) => key);
    return list.length === want.length ? list.sort().join(",") : list.join(",");
  };
  return new Promise((resolve, reject) => {
    const check = () => {
      if (keys() === wanted) {
        w.synced.delete(check);
        clearTimeout(timer);
        resolve();
      }
    };
    const timer = setTimeout(() => {
      w.synced.delete(check);
      const have = w.presence.list((key) => key).length;
      reject(new Error(`${what}: expected ${want.length} users, have ${have}`));
    }, timeout);
    w.synced.add(check);
    check();
  });
}

/**
 * The storm on `nodes` (clients spread over them in turn): CLIENTS users join `topic` at once;
 * LEAVERS of them leave as soon as they have joined (half by leaving the channel, half by
 * closing the socket), while the others are still joining. Then every remaining client's list,
 * and a fresh observer's on every node, is the same: every user still there, metas and all.
 */
async function storm(nodes, topic) {
  const name = (i) => `user${String(i).padStart(4, "0")}`;
  const clients = await Promise.all(
    Array.from({ length: CLIENTS }, async (_, i) => {
      const socket = await connect(nodes[i % nodes.length]);
      return { i, socket, channel: socket.channel(topic, { user: name(i) }) };
    })
  );
  for (const c of clients) c.watch = watch(c.channel);
  const leaving = new Set(Array.from({ length: LEAVERS }, (_, k) => Math.floor((k * CLIENTS) / LEAVERS)));
  await Promise.all(
    clients.map(async (c) => {
      await join(c.channel, { timeout: 30000 });
      if (!leaving.has(c.i)) return;
      if (c.i % 2 === 0) {
        await new Promise((resolve, reject) =>
          c.channel.leave().receive("ok", resolve).receive("error", reject).receive("timeout", reject)
        );
      }
      // Closed without waiting for the close to finish: the others are still joining.
      c.socket.disconnect();
    })
  );
  const staying = clients.filter((c) => !leaving.has(c.i));
  const want = staying.map((c) => name(c.i)).sort();
  await Promise.all(staying.map((c) => until(c.watch, want, `${name(c.i)}'s list`)));

  const settled = staying.map((c) => snapshot(c.watch.presence));

  // The server's list: what a fresh joiner on each node is given (less the joiners themselves).
  const lists = [];
  const observers = [];
  for (const [k, node] of nodes.entries()) {
    const socket = await connect(node);
    observers.push(`observer${k}`);
    const channel = socket.channel(topic, { user: `observer${k}` });
    const w = watch(channel);
    await join(channel, { timeout: 30000 });
    await until(w, [...want, ...observers].sort(), "an observer's list");
    const list = snapshot(w.presence);
    for (const o of observers) delete list[o];
    lists.push(list);
    assert.deepEqual(w.twice, [], "the observer applied no change twice");
  }
  for (const list of lists.slice(1)) assert.deepEqual(list, lists[0], "every node lists the same");
  for (const [j, c] of staying.entries()) {
    assert.deepEqual(settled[j], lists[0], `${name(c.i)}'s list is the server's`);
    assert.deepEqual(c.watch.twice, [], `${name(c.i)} applied no change twice`);
  }
  assert.equal(Object.keys(lists[0]).length, CLIENTS - LEAVERS);
  for (const c of staying) c.socket.disconnect();
}

describe("presence storm", () => {
  after(disconnectAll);

  describe("one node", () => {
    let node;
    before(async () => {
      node = await startNode({});
    });
    after(async () => node && node.stop());

    test(`${CLIENTS} users join one room, ${LEAVERS} leave while others join: every list is the server's`, async () => {
      await storm([node], `room:${uniqueName("storm")}`);
    });
  });

  describe("two nodes sharing Redis", () => {
    let nodes = [];
    let available = false;
    before(async (t) => {
      available = await requireBackend(t, "Redis", REDIS_URL);
      if (!available) return;
      const cluster = uniqueName("presence");
      nodes = await Promise.all([0, 1].map(() => startNode({ pubsub: REDIS_URL, cluster })));
    });
    after(async () => Promise.all(nodes.map((n) => n.stop())));

    test(`${CLIENTS} users over two nodes, ${LEAVERS} leaving during the storm: every list is the server's`, async (t) => {
      if (!available) return t.skip("Redis unreachable");
      await storm(nodes, `room:${uniqueName("storm")}`);
    });
  });
});
